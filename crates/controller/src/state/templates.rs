//! Resource templates, and the checks of the settings a template or a run request gives an
//! instance (environment, file-system view, capabilities).

use vane_proto::api::{SpaceSpec, Template};
use vane_proto::validate;

use super::{ApiError, State};
use crate::store::Batch;

impl State {
    /// Adds or replaces a template.
    pub fn put_template(&mut self, t: Template) -> Result<(Template, Batch), ApiError> {
        validate::name("template name", &t.name)?;
        check_settings(&t.env, &t.space)?;
        let mut batch = Batch::default();
        batch.put(&t);
        self.templates.insert(t.name.clone(), t.clone());
        Ok((t, batch))
    }

    pub fn remove_template(&mut self, name: &str) -> Result<Batch, ApiError> {
        let t = self
            .templates
            .remove(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown template {name:?}")))?;
        let mut batch = Batch::default();
        batch.delete(&t);
        Ok(batch)
    }
}

/// Checks the environment and file-system settings of a request or template: well-formed
/// pairs and paths, known variables only. Limits are checked as they are parsed (CLI) and
/// again by the agent, which knows what its host can give.
pub(super) fn check_settings(env: &[(String, String)], space: &SpaceSpec) -> Result<(), ApiError> {
    for (k, v) in env {
        validate::env_pair(&format!("{k}={v}"))?;
        validate::variables("environment variable", v)?;
    }
    if let Some(root) = &space.rootfs {
        validate::rootfs(root)?;
    }
    for v in &space.volumes {
        validate::volume(&v.to_string())?;
    }
    for (target, source) in &space.redirects {
        validate::redirect(&format!("{target}={source}"))?;
    }
    validate::capability_set(&space.cap_add, &space.cap_drop)?;
    Ok(())
}

//! `vane template`: resource templates (limits, environment, file-system settings) that
//! runs start from.

use anyhow::Result;

use vane_proto::api::Template;
use vane_proto::validate;

use super::instances::{env_pairs, settings};
use super::output::{limits_summary, listing};
use super::path_segment;
use crate::cli::TemplateCmd;
use crate::client::Client;

pub fn template(c: &Client, cmd: TemplateCmd) -> Result<()> {
    match cmd {
        TemplateCmd::Create {
            name,
            env,
            settings: s,
        } => {
            validate::name("template name", &name)?;
            let env = env_pairs(&env)?;
            let (limits, space) = settings(*s)?;
            let t: Template = c.post(
                "/v1/templates",
                &Template {
                    name,
                    limits,
                    env,
                    space,
                    tenant: None,
                },
            )?;
            println!("{}", t.name);
        }
        TemplateCmd::Ls(how) => {
            let list: Vec<Template> = c.get("/v1/templates")?;
            listing(
                how,
                list,
                &["NAME", "LIMITS", "ROOTFS", "VOLUMES", "REDIRECTS", "ENV"],
                |t| t.name.clone(),
                |t| {
                    vec![
                        t.name,
                        limits_summary(&t.limits),
                        t.space.rootfs.unwrap_or_else(|| "-".into()),
                        t.space.volumes.len().to_string(),
                        t.space.redirects.len().to_string(),
                        t.env.len().to_string(),
                    ]
                },
            );
        }
        TemplateCmd::Rm { name } => {
            c.delete(&format!("/v1/templates/{}", path_segment(&name)?))?;
            println!("{name}");
        }
    }
    Ok(())
}

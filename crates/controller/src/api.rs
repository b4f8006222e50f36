//! HTTP/JSON API (docs/api.md). Handlers validate against the model, commit, talk to the
//! agent that owns the instance, and answer with the stored object or `{"error": "..."}`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as AxState, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use vane_proto::api::{
    frame, ErrorBody, ExecSpec, Host, HostState, HostStats, Instance, InstanceState, InstanceStats,
    JoinToken, MigrateSpec, Migration, Net, NetSpec, Policy, PolicySpec, RestoreSpec, RunSpec,
    SnapshotSpec, Status, Template, TokenSpec,
};
use vane_proto::stream::{AgentReply, AgentRequest};

use crate::auth::Caller;
use crate::state::ApiError;
use crate::{now, transfers, Controller};
use tokio::sync::mpsc;

type Ctl = AxState<Arc<Controller>>;
type ApiResult<T> = Result<T, ApiError>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

pub fn router(ctl: Arc<Controller>) -> Router {
    // The administrator's alone: hosts, join tokens, credentials.
    let admin = Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/tokens", post(create_token).get(list_tokens))
        .route("/v1/hosts/tokens/{id}", delete(revoke_token))
        .route("/v1/hosts/{name}", delete(remove_host))
        .route("/v1/hosts/{name}/stats", get(host_stats))
        .route(
            "/v1/credentials",
            post(create_credential).get(list_credentials),
        )
        .route("/v1/credentials/{id}", delete(revoke_credential))
        .route_layer(axum::middleware::from_fn(admin_only));
    // One instance: its tenant's, or the administrator's.
    let instance = Router::new()
        .route(
            "/v1/instances/{name}",
            get(inspect_instance).delete(remove_instance),
        )
        .route("/v1/instances/{name}/stop", post(stop_instance))
        .route("/v1/instances/{name}/migrate", post(migrate_instance))
        .route("/v1/instances/{name}/snapshot", post(snapshot_instance))
        .route("/v1/instances/{name}/exec", post(exec_instance))
        .route("/v1/instances/{name}/logs", get(instance_logs))
        .route("/v1/instances/{name}/stats", get(instance_stats))
        .route_layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            instance_scope,
        ));
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nets", get(list_nets).post(create_net))
        .route("/v1/nets/{name}", delete(remove_net))
        .route("/v1/instances", get(list_instances).post(run_instance))
        .route(
            "/v1/restore",
            // Streamed: frames are bounded, the images as long as they say.
            post(restore_instance).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/policies", get(list_policies).post(create_policy))
        .route("/v1/policies/{id}", delete(remove_policy))
        .route("/v1/templates", get(list_templates).post(put_template))
        .route(
            "/v1/templates/{name}",
            get(get_template).delete(remove_template),
        )
        .merge(admin)
        .merge(instance)
        .fallback(|| async { ApiError::NotFound("no such API endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            authenticate,
        ))
        // Agents prove who they are in their hello, inside TLS (join token or credential),
        // and with their credential when they claim a transfer.
        .route("/v1/agents/connect", get(agent_connect))
        .route("/v1/agents/transfers/{ticket}", get(agent_transfer))
        .with_state(ctl)
}

type Who = axum::Extension<Caller>;

async fn admin_only(
    axum::Extension(who): Who,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match who.admin_only("managing hosts, join tokens and credentials") {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Lets a request about instance `name` through if the caller may see its net's tenant.
async fn instance_scope(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(params): Path<std::collections::HashMap<String, String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let name = params.get("name").cloned().unwrap_or_default();
    let allowed = {
        let s = c.state();
        s.instance_by_name(&name)
            .and_then(|i| s.net_tenant(&i.net))
            .and_then(|t| who.check(&t, &format!("instance {name:?}")))
    };
    match allowed {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Lets through only requests that carry a credential (`Authorization: Bearer`): the
/// admin credential or a tenant's; says who asks to the handlers (a `Caller`).
async fn authenticate(
    AxState(c): Ctl,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let caller = given.as_deref().and_then(|token| {
        if c.credentials.is_admin(token) {
            Some(Caller::Admin)
        } else {
            c.state().tenant_of(token, now()).map(Caller::Tenant)
        }
    });
    match (caller, given) {
        (Some(who), _) => {
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        (None, Some(_)) => {
            ApiError::Unauthorized("the controller does not accept this credential".into())
                .into_response()
        }
        (None, None) => ApiError::Unauthorized(
            "no credential: give one with --token or VANE_TOKEN (the admin credential is in the \
             controller's data directory, admin.token)"
                .into(),
        )
        .into_response(),
    }
}

/// Parses a JSON body with an error that says what is wrong with it.
fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))
}

async fn status(AxState(c): Ctl) -> Json<Status> {
    let s = c.state();
    let counts = [
        ("nets".to_string(), s.nets.len()),
        ("instances".to_string(), s.instances.len()),
        ("hosts".to_string(), s.hosts.len()),
        ("policies".to_string(), s.policies.len()),
        ("templates".to_string(), s.templates.len()),
    ]
    .into_iter()
    .collect();
    Json(Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        config: s.config.clone(),
        counts,
    })
}

async fn list_nets(AxState(c): Ctl, axum::Extension(who): Who) -> Json<Vec<Net>> {
    Json(
        c.state()
            .nets
            .values()
            .filter(|n| who.may(&n.tenant))
            .cloned()
            .collect(),
    )
}

async fn create_net(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Net>)> {
    let mut spec: NetSpec = parse(&body)?;
    // A tenant's nets are its own: the default tenant means the caller's.
    if let Caller::Tenant(t) = &who {
        if spec.tenant == vane_proto::api::default_tenant() {
            spec.tenant = t.clone();
        }
        who.check(&spec.tenant, &format!("tenant {:?}", spec.tenant))?;
    }
    let mut s = c.state();
    let (net, batch) = s.create_net(spec, now())?;
    c.commit(batch)?;
    Ok((StatusCode::CREATED, Json(net)))
}

async fn remove_net(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let mut s = c.state();
    who.check(&s.net_tenant(&name)?, &format!("net {name:?}"))?;
    let batch = s.remove_net(&name)?;
    c.commit(batch)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_hosts(AxState(c): Ctl) -> Json<Vec<Host>> {
    let s = c.state();
    Json(
        s.hosts
            .values()
            .map(|h| Host {
                instances: s.instances_on(&h.name),
                ..h.clone()
            })
            .collect(),
    )
}

async fn create_token(AxState(c): Ctl, body: Bytes) -> ApiResult<(StatusCode, Json<JoinToken>)> {
    let spec: TokenSpec = parse(&body)?;
    let mut s = c.state();
    let (token, expires, id, batch) = s.create_token(spec.ttl_secs, spec.reusable, now())?;
    c.commit(batch)?;
    // The agent that joins with it checks the controller against the pin it carries.
    let token = vane_proto::trust::join_token(&token, &c.tls_pin);
    Ok((StatusCode::CREATED, Json(JoinToken { token, expires, id })))
}

async fn create_credential(
    AxState(c): Ctl,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<vane_proto::api::TenantCredential>)> {
    let spec: vane_proto::api::CredentialSpec = parse(&body)?;
    let mut s = c.state();
    let (cred, batch) = s.create_credential(&spec.tenant, spec.ttl_secs, now())?;
    c.commit(batch)?;
    Ok((StatusCode::CREATED, Json(cred)))
}

async fn list_credentials(AxState(c): Ctl) -> Json<Vec<vane_proto::api::CredentialInfo>> {
    Json(c.state().credentials(now()))
}

async fn revoke_credential(AxState(c): Ctl, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let mut s = c.state();
    let batch = s.revoke_credential(&id)?;
    c.commit(batch)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tokens(AxState(c): Ctl) -> Json<Vec<vane_proto::api::TokenInfo>> {
    Json(c.state().tokens(now()))
}

async fn revoke_token(AxState(c): Ctl, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let mut s = c.state();
    let batch = s.revoke_token(&id)?;
    c.commit(batch)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_host(
    AxState(c): Ctl,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<StatusCode> {
    {
        let mut s = c.state();
        let batch = s.remove_host(&name, q.force)?;
        c.commit(batch)?;
    }
    if q.force {
        // Evicted: its stream ends with the reason, and its credential no longer admits it.
        c.agents.evict(
            &name,
            "this host was evicted from the cluster (vane host rm --force)",
        );
    }
    // The other switches forget its key: they drop their sessions with it at once and
    // accept no new one.
    c.push_views();
    Ok(StatusCode::NO_CONTENT)
}

async fn host_stats(AxState(c): Ctl, Path(name): Path<String>) -> ApiResult<Json<HostStats>> {
    {
        let s = c.state();
        let host = s
            .hosts
            .get(&name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown host {name:?}")))?;
        if host.state != HostState::Online {
            return Err(ApiError::Unavailable(format!("host {name:?} is offline")));
        }
    }
    match c.agents.request(&name, AgentRequest::HostStats).await? {
        AgentReply::HostStats(stats) => Ok(Json(stats)),
        other => Err(ApiError::Internal(format!(
            "unexpected answer from host {name:?}: {other:?}"
        ))),
    }
}

async fn list_instances(AxState(c): Ctl, axum::Extension(who): Who) -> Json<Vec<Instance>> {
    let s = c.state();
    let mut v: Vec<Instance> = s
        .instances
        .values()
        .filter(|i| s.net_tenant(&i.net).is_ok_and(|t| who.may(&t)))
        .map(|i| c.with_progress(i.clone()))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Json(v)
}

async fn inspect_instance(AxState(c): Ctl, Path(name): Path<String>) -> ApiResult<Json<Instance>> {
    let inst = c.state().instance_by_name(&name)?.clone();
    Ok(Json(c.with_progress(inst)))
}

fn new_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn run_instance(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let spec: RunSpec = parse(&body)?;
    {
        let s = c.state();
        who.check(&s.net_tenant(&spec.net)?, &format!("net {:?}", spec.net))?;
        if let Some(t) = &spec.template {
            if let Some(owner) = s.templates.get(t).and_then(|t| t.tenant.clone()) {
                who.check(&owner, &format!("template {t:?}"))?;
            }
        }
    }
    let agents = &c.agents;
    start_instance(&c, spec, |spec, host| async move {
        let reply = agents
            .request(
                &host,
                AgentRequest::Create {
                    instance: Box::new(spec),
                },
            )
            .await?;
        Ok(match reply {
            AgentReply::Created { pid } => Some(pid),
            _ => None,
        })
    })
    .await
}

/// Plans an instance from `run` (recorded as creating), has `start` set it up on its host,
/// and settles the record: running with the pid `start` returns, or forgotten if it failed
/// (the host has cleaned up its side: nothing half-made). The host gets the net's policies
/// and members before `start`, so the instance starts with its rules in place.
async fn start_instance<F, Fut>(
    c: &Controller,
    run: RunSpec,
    start: F,
) -> ApiResult<(StatusCode, Json<Instance>)>
where
    F: FnOnce(vane_proto::stream::InstanceSpec, String) -> Fut,
    Fut: std::future::Future<Output = ApiResult<Option<u32>>>,
{
    let (spec, host) = {
        let mut s = c.state();
        let (spec, batch) = s.plan_instance(run, new_instance_id(), now())?;
        c.commit(batch)?;
        let host = s.instances[&spec.id].host.clone();
        (spec, host)
    };
    let id = spec.id.clone();
    c.push_views();
    let result = start(spec, host).await;
    let answer = {
        let mut s = c.state();
        match result {
            Ok(pid) => {
                let Some(inst) = s.instances.get_mut(&id) else {
                    return Err(ApiError::Internal(
                        "instance vanished while starting".into(),
                    ));
                };
                // A report that the program already exited may have overtaken us.
                if inst.state == InstanceState::Creating {
                    inst.state = InstanceState::Running;
                    if pid.is_some() {
                        inst.pid = pid;
                    }
                }
                let inst = inst.clone();
                let mut batch = crate::store::Batch::default();
                batch.put(&inst);
                c.commit(batch)?;
                Ok((StatusCode::CREATED, Json(inst)))
            }
            Err(e) => {
                let batch = s.drop_instance(&id);
                c.commit(batch)?;
                Err(e)
            }
        }
    };
    c.push_views();
    answer
}

/// Stops instance `id` on `host` (SIGTERM, SIGKILL after 10 s) and pushes the views.
async fn stop_on(c: &Controller, host: &str, id: &str) -> ApiResult<()> {
    c.agents
        .request(
            host,
            AgentRequest::Stop {
                id: id.to_string(),
                timeout_secs: 10,
            },
        )
        .await?;
    c.push_views();
    Ok(())
}

async fn stop_instance(AxState(c): Ctl, Path(name): Path<String>) -> ApiResult<Json<Instance>> {
    let (id, host) = settled(&c, &name)?;
    stop_on(&c, &host, &id).await?;
    let s = c.state();
    Ok(Json(s.instances.get(&id).cloned().ok_or_else(|| {
        ApiError::NotFound(format!("unknown instance {name:?}"))
    })?))
}

/// Live migration (docs/api.md): prepare the destination, dump on the source, stream the
/// images from the source to the destination (`transfers`), restore, flip the directory,
/// clean the source up. A failed restore resumes the instance on the source.
async fn migrate_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Instance>> {
    let spec: MigrateSpec = parse(&body)?;
    let (to, post_copy) = (spec.to, spec.post_copy);
    let (id, from, inst_spec) = {
        let s = c.state();
        let inst = s.instance_by_name(&name)?;
        if inst.state != InstanceState::Running {
            return Err(ApiError::Conflict(format!(
                "instance {name:?} is not running ({})",
                inst.state.as_str()
            )));
        }
        let host = s
            .hosts
            .get(&to)
            .ok_or_else(|| ApiError::NotFound(format!("unknown host {to:?}")))?;
        if host.state != HostState::Online || !c.agents.is_connected(&to) {
            return Err(ApiError::Unavailable(format!("host {to:?} is offline")));
        }
        if inst.host == to {
            return Err(ApiError::BadRequest(format!(
                "instance {name:?} already runs on host {to:?}"
            )));
        }
        if let Some(other) = &inst.migrating {
            return Err(ApiError::Conflict(format!(
                "instance {name:?} is already moving to host {other:?}"
            )));
        }
        (inst.id.clone(), inst.host.clone(), s.instance_spec(inst)?)
    };
    if !c.agents.is_connected(&from) {
        return Err(ApiError::Unavailable(format!(
            "host {from:?} of instance {name:?} is offline"
        )));
    }
    set_migrating(&c, &id, Some(to.clone()))?;
    let result: ApiResult<Json<Instance>> = async {
        // Before anything is frozen: the destination checks its CRIU and makes the space.
        c.agents
            .request(
                &to,
                AgentRequest::Prepare {
                    instance: Box::new(inst_spec),
                },
            )
            .await
            .map_err(|e| on_host(&to, e))?;
        crate::die_at("prepared");
        let discard = |c: Arc<Controller>, id: String, to: String| async move {
            let _ = c.agents.request(&to, AgentRequest::Discard { id }).await;
        };
        // Post-copy where the images can go host to host: the memory follows on the same
        // link after the freeze.
        let lazy = post_copy && direct_path(&c, &from, &to).is_some();
        let frozen = std::time::Instant::now();
        c.set_progress(&id, Some(("dump", 0)));
        let (bytes, lazy) = match c
            .agents
            .request_watched(
                &from,
                AgentRequest::Checkpoint {
                    id: id.clone(),
                    leave_running: false,
                    lazy,
                },
                crate::agents::REQUEST_TIMEOUT,
                |b| c.set_progress(&id, Some(("dump", b))),
            )
            .await
        {
            Ok(AgentReply::Checkpointed { bytes, lazy }) => (bytes, lazy),
            Ok(other) => {
                discard(c.clone(), id.clone(), to.clone()).await;
                return Err(ApiError::Internal(format!(
                    "unexpected answer from host {from:?}: {other:?}"
                )));
            }
            Err(e) => {
                // A failed dump leaves the instance running where it was.
                discard(c.clone(), id.clone(), to.clone()).await;
                return Err(on_host(&from, e));
            }
        };
        let dumped = frozen.elapsed();
        crate::die_at("dumped");
        c.set_progress(&id, Some(("transfer", 0)));
        let moved = move_images(&c, &from, &to, &id, bytes, lazy).await;
        let transferred = frozen.elapsed();
        if moved.is_ok() {
            crate::die_at("transferred");
        }
        c.set_progress(&id, Some(("restore", 0)));
        let restored = match moved {
            Ok(()) => c
                .agents
                .request(
                    &to,
                    AgentRequest::Restore {
                        id: id.clone(),
                        tcp_close: false,
                    },
                )
                .await
                .map_err(|e| on_host(&to, e)),
            Err(e) => Err(e),
        };
        let restored_at = frozen.elapsed();
        let pid = match restored {
            Ok(AgentReply::Created { pid }) => pid,
            Ok(other) => {
                return Err(ApiError::Internal(format!(
                    "unexpected answer from host {to:?}: {other:?}"
                )))
            }
            Err(e) => {
                discard(c.clone(), id.clone(), to.clone()).await;
                let resumed = c
                    .agents
                    .request(
                        &from,
                        AgentRequest::Restore {
                            id: id.clone(),
                            tcp_close: false,
                        },
                    )
                    .await;
                return Err(match resumed {
                    Ok(reply) => {
                        if let AgentReply::Created { pid } = reply {
                            let mut s = c.state();
                            if let Some(inst) = s.instances.get_mut(&id) {
                                inst.pid = Some(pid);
                                let mut batch = crate::store::Batch::default();
                                batch.put(&*inst);
                                c.commit(batch)?;
                            }
                        }
                        ApiError::Conflict(format!(
                            "migration of instance {name:?} to host {to:?} failed, it runs on host {from:?} again: {e}"
                        ))
                    }
                    Err(e2) => {
                        // Nowhere running: say so, rather than keep it `running`.
                        record_lost(&c, &id)?;
                        ApiError::Internal(format!(
                            "migration of instance {name:?} to host {to:?} failed ({e}), and resuming it on host {from:?} failed too: {e2}"
                        ))
                    }
                });
            }
        };
        crate::die_at("restored");
        // The directory now sends to the destination; the source's switch, whose view says the
        // same, forwards what its own instances still send there.
        {
            let mut s = c.state();
            if let Some(inst) = s.instances.get_mut(&id) {
                inst.host = to.clone();
                inst.pid = Some(pid);
                let mut batch = crate::store::Batch::default();
                batch.put(&*inst);
                c.commit(batch)?;
            }
        }
        c.push_views();
        let switched = frozen.elapsed();
        if lazy {
            c.set_progress(&id, Some(("pages", 0)));
        }
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        // Differences of whole milliseconds, so that the phases add up to the freeze.
        let phases = vane_proto::api::Phases {
            dump_ms: ms(dumped),
            transfer_ms: ms(transferred) - ms(dumped),
            restore_ms: ms(restored_at) - ms(transferred),
            switch_ms: ms(switched) - ms(restored_at),
        };
        let freeze_ms = ms(switched);
        tracing::info!(
            instance = %name, %from, %to, freeze_ms, image_bytes = bytes, ?phases, lazy,
            "migrated"
        );
        // Post-copy: the instance runs on the destination, its memory still coming from the
        // source, which is released once the last page is through.
        let post_copy_ms = if lazy {
            let served = c
                .agents
                .request_within(
                    &from,
                    AgentRequest::AwaitPages { id: id.clone() },
                    POST_COPY_LIMIT,
                )
                .await;
            if let Err(e) = served {
                // The destination's copy is missing memory: it must not run on.
                let _ = c
                    .agents
                    .request(&to, AgentRequest::Remove { id: id.clone() })
                    .await;
                record_lost(&c, &id)?;
                c.push_views();
                return Err(ApiError::Internal(format!(
                    "instance {name:?} was lost: its memory could not all be moved from host {from:?} after it resumed on host {to:?} ({e})"
                )));
            }
            Some(ms(frozen.elapsed()) - freeze_ms)
        } else {
            None
        };
        if let Err(e) = c
            .agents
            .request(&from, AgentRequest::Remove { id: id.clone() })
            .await
        {
            tracing::warn!(instance = %name, host = %from, "cleaning up after migration: {e}");
        }
        let mut s = c.state();
        let inst = s
            .instances
            .get_mut(&id)
            .ok_or_else(|| ApiError::NotFound(format!("unknown instance {name:?}")))?;
        inst.migrations.push(Migration {
            from,
            to,
            at: now(),
            freeze_ms,
            image_bytes: bytes,
            phases,
            post_copy_ms,
        });
        let inst = inst.clone();
        let mut batch = crate::store::Batch::default();
        batch.put(&inst);
        c.commit(batch)?;
        Ok(Json(inst))
    }
    .await;
    c.set_progress(&id, None);
    set_migrating(&c, &id, None)?;
    let inst = c.state().instances.get(&id).cloned();
    match (result, inst) {
        (Ok(_), Some(inst)) => Ok(Json(inst)),
        (Ok(j), None) => Ok(j),
        (Err(e), _) => Err(e),
    }
}

/// Records that instance `id` runs nowhere any more.
fn record_lost(c: &Controller, id: &str) -> ApiResult<()> {
    let mut s = c.state();
    if let Some(inst) = s.instances.get_mut(id) {
        inst.state = InstanceState::Lost;
        inst.pid = None;
        let mut batch = crate::store::Batch::default();
        batch.put(&*inst);
        c.commit(batch)?;
    }
    Ok(())
}

/// A failure of `host`'s agent, as the API answers it.
fn on_host(host: &str, e: ApiError) -> ApiError {
    ApiError::Unavailable(format!("host {host:?}: {e}"))
}

/// Marks instance `id` as moving to a host (`vane ps` shows it), or no longer.
fn set_migrating(c: &Controller, id: &str, to: Option<String>) -> ApiResult<()> {
    let mut s = c.state();
    if let Some(inst) = s.instances.get_mut(id) {
        inst.migrating = to;
        let mut batch = crate::store::Batch::default();
        batch.put(&*inst);
        c.commit(batch)?;
    }
    Ok(())
}

/// Streams the packed images of instance `id` (`bytes` long) from host `from` to host `to`:
/// straight from agent to agent when the controller knows where the destination's switch
/// is and both hosts' keys, else through the controller.
/// How long a post-copy migration's source may take to serve the last page after the
/// freeze: the agents break a link off after 30 s without progress, so this only bounds a
/// transfer that keeps moving.
pub(crate) const POST_COPY_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The source's key and the destination's address and key, when the images of a migration
/// can go straight from one host to the other.
fn direct_path(
    c: &Controller,
    from: &str,
    to: &str,
) -> Option<(String, vane_proto::stream::DirectPeer)> {
    let s = c.state();
    let (src, dst) = (s.hosts.get(from), s.hosts.get(to));
    Some((
        src?.public_key.clone()?,
        vane_proto::stream::DirectPeer {
            locator: dst?.locator?,
            public_key: dst?.public_key.clone()?,
        },
    ))
}

/// Moves the images of a checkpoint from host to host (`pages`: and keeps the link for the
/// memory of a lazy dump, which needs the direct path).
async fn move_images(
    c: &Controller,
    from: &str,
    to: &str,
    id: &str,
    bytes: u64,
    pages: bool,
) -> ApiResult<()> {
    let direct = direct_path(c, from, to);
    if let Some((sender, peer)) = direct {
        let ticket = crate::enroll::new_secret("vanexfer-");
        let within = transfers::answer_within(bytes);
        let receive = c.agents.request_watched(
            to,
            AgentRequest::ReceiveImages {
                id: id.to_string(),
                ticket: ticket.clone(),
                bytes,
                from: Some(sender),
                pages,
            },
            within,
            |b| c.set_progress(id, Some(("transfer", b))),
        );
        let send = c.agents.request_within(
            from,
            AgentRequest::SendImages {
                id: id.to_string(),
                ticket,
                to: Some(peer),
            },
            within,
        );
        tokio::pin!(receive, send);
        // Whichever fails first says why, at once: a source that cannot reach the
        // destination does not wait for the destination to give up waiting.
        tokio::select! {
            sent = &mut send => {
                sent.map_err(|e| on_host(from, e))?;
                receive.await.map_err(|e| on_host(to, e))?;
            }
            received = &mut receive => {
                received.map_err(|e| on_host(to, e))?;
                send.await.map_err(|e| on_host(from, e))?;
            }
        }
        return Ok(());
    }
    let (up, rx) = c.transfers.sent_by(from);
    let (down, tx) = c.transfers.sent_to(to);
    let within = transfers::answer_within(bytes);
    let send = agent_transfer_request(
        c,
        from,
        &up,
        AgentRequest::SendImages {
            id: id.to_string(),
            ticket: up.clone(),
            to: None,
        },
        within,
    );
    let receive = agent_transfer_request(
        c,
        to,
        &down,
        AgentRequest::ReceiveImages {
            id: id.to_string(),
            ticket: down.clone(),
            bytes,
            from: None,
            pages: false,
        },
        within,
    );
    let (sent, received, piped) = tokio::join!(send, receive, transfers::pipe(rx, tx));
    sent.map_err(|e| on_host(from, e))?;
    received.map_err(|e| on_host(to, e))?;
    let piped = piped?;
    if piped != bytes {
        return Err(ApiError::Internal(format!(
            "host {from:?} sent {piped} bytes of images, not the {bytes} it dumped"
        )));
    }
    Ok(())
}

/// Asks `host` to move transfer `ticket`; once it answers, the ticket goes, so that a
/// transfer its agent never claimed ends for the other side too.
async fn agent_transfer_request(
    c: &Controller,
    host: &str,
    ticket: &str,
    request: AgentRequest,
    within: std::time::Duration,
) -> ApiResult<AgentReply> {
    let answer = c.agents.request_within(host, request, within).await;
    c.transfers.cancel(ticket);
    answer
}

/// Dumps a running instance, leaving it running (or stopping it), and streams it to the
/// caller (`RestoreSpec`): its record, its packed images as they arrive from its host, then
/// the cluster's seal of both (or an error frame).
async fn snapshot_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: SnapshotSpec = if body.is_empty() {
        SnapshotSpec::default()
    } else {
        parse(&body)?
    };
    let (id, host) = running_instance(&c, &name)?;
    let bytes = match c
        .agents
        .request(
            &host,
            AgentRequest::Checkpoint {
                id: id.clone(),
                leave_running: true,
                lazy: false,
            },
        )
        .await?
    {
        AgentReply::Checkpointed { bytes, .. } => bytes,
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected answer from host {host:?}: {other:?}"
            )))
        }
    };
    let instance = c.state().instance_by_name(&name)?.clone();
    let (out, body) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        let mut sealing = c.sealer.begin(&instance);
        let record = serde_json::to_vec(&instance).expect("serializes");
        let _ = out
            .send(Ok(frame::encoded(frame::RECORD, &record).into()))
            .await;
        let (ticket, mut rx) = c.transfers.sent_by(&host);
        let send = agent_transfer_request(
            &c,
            &host,
            &ticket,
            AgentRequest::SendImages {
                id: id.clone(),
                ticket: ticket.clone(),
                to: None,
            },
            transfers::answer_within(bytes),
        );
        let out2 = out.clone();
        let from = host.clone();
        let forward = async move {
            let mut seen = 0u64;
            loop {
                match transfers::next(&mut rx).await? {
                    transfers::Piece::Data(d) => {
                        sealing.update(&d);
                        seen += d.len() as u64;
                        if out2
                            .send(Ok(frame::encoded(frame::IMAGES, &d).into()))
                            .await
                            .is_err()
                        {
                            return Err(ApiError::Unavailable("the client went away".into()));
                        }
                    }
                    transfers::Piece::End if seen == bytes => return Ok(sealing),
                    transfers::Piece::End => {
                        return Err(ApiError::Internal(format!(
                            "host {from:?} sent {seen} bytes of images, not the {bytes} it dumped"
                        )))
                    }
                }
            }
        };
        let (sent, forwarded) = tokio::join!(send, forward);
        let result = match (sent, forwarded) {
            (Ok(_), Ok(sealing)) => Ok(sealing),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let result = match result {
            Ok(sealing) if spec.stop => stop_on(&c, &host, &id).await.map(|_| sealing),
            other => other,
        };
        let last = match result {
            Ok(sealing) => frame::encoded(frame::SEAL, sealing.seal().as_bytes()),
            Err(e) => {
                tracing::warn!(instance = %name, "snapshot: {e}");
                frame::encoded(frame::ERROR, e.to_string().as_bytes())
            }
        };
        let _ = out.send(Ok(last.into())).await;
    });
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            vane_proto::api::SNAPSHOT_MEDIA_TYPE,
        )],
        Body::from_stream(receiver_stream(body)),
    )
        .into_response())
}

/// The items of `rx` as a stream.
fn receiver_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Frames (`vane_proto::api::frame`) read from a request body as it arrives.
struct FrameReader {
    body: axum::body::BodyDataStream,
    buf: bytes::BytesMut,
}

impl FrameReader {
    fn new(body: Body) -> FrameReader {
        FrameReader {
            body: body.into_data_stream(),
            buf: bytes::BytesMut::new(),
        }
    }

    /// Reads what is left of the body, for nothing.
    async fn drain(&mut self) {
        use futures_util::StreamExt;
        self.buf.clear();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(transfers::STALL, self.body.next()).await {
        }
    }

    /// The next frame, `None` at a clean end of the body.
    async fn next(&mut self) -> ApiResult<Option<(u8, Bytes)>> {
        use futures_util::StreamExt;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if len > frame::MAX_LEN {
                    return Err(ApiError::BadRequest(format!(
                        "a frame of {len} bytes is over the limit of {}",
                        frame::MAX_LEN
                    )));
                }
                if self.buf.len() >= 5 + len {
                    let mut whole = self.buf.split_to(5 + len);
                    let kind = whole[0];
                    let data = whole.split_off(5).freeze();
                    return Ok(Some((kind, data)));
                }
            }
            match tokio::time::timeout(transfers::STALL, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => {
                    return Err(ApiError::BadRequest(format!("reading the request: {e}")))
                }
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(ApiError::BadRequest(
                        "the request ends inside a frame".into(),
                    ))
                }
                Err(_) => {
                    return Err(ApiError::BadRequest(format!(
                        "the request made no progress for {}s",
                        transfers::STALL.as_secs()
                    )))
                }
            }
        }
    }
}

/// A new instance from a snapshot (a stream: `RestoreSpec`): with the snapshot's
/// identity, or a clone with its own name, address and hostname. The images go to the
/// host as they arrive; the host restores them only once the seal has checked out.
async fn restore_instance(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Body,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let frames = Arc::new(tokio::sync::Mutex::new(FrameReader::new(body)));
    let answer = restore_stream(c, who, frames.clone()).await;
    if answer.is_err() {
        // A client blocked sending the rest of its images would never read the answer: the
        // images are read to their end (and thrown away) first.
        frames.lock().await.drain().await;
    }
    answer
}

async fn restore_stream(
    c: Arc<Controller>,
    who: Caller,
    frames: Arc<tokio::sync::Mutex<FrameReader>>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let first = frames.lock().await.next().await?;
    let spec: RestoreSpec = match first {
        Some((frame::RECORD, record)) => parse(&record)?,
        _ => {
            return Err(ApiError::BadRequest(format!(
                "a restore is a snapshot stream ({}): its record first",
                vane_proto::api::SNAPSHOT_MEDIA_TYPE
            )))
        }
    };
    {
        let net = &spec.instance.net;
        who.check(&c.state().net_tenant(net)?, &format!("net {net:?}"))?;
    }
    if vane_proto::hex::decode::<32>(&spec.seal).is_none() {
        return Err(not_sealed());
    }
    let from = spec.instance.clone();
    // Under a new name it is a clone: a free address and its name as hostname unless told.
    let clone = spec.name.is_some();
    let run = RunSpec {
        ip: spec.ip.or((!clone).then_some(from.ip)),
        hostname: spec.hostname.or((!clone).then_some(from.hostname)),
        name: Some(spec.name.unwrap_or(from.name)),
        net: from.net,
        host: spec.host,
        env: from.env,
        cmd: from.cmd,
        template: None,
        limits: from.limits,
        space: from.space,
    };
    let sealing = c.sealer.begin(&spec.instance);
    let images = Incoming {
        frames,
        bytes: spec.images_bytes,
        sealing,
        seal: spec.seal,
    };
    let ctl: &Controller = &c;
    start_instance(ctl, run, |spec, host| async move {
        restore_on(ctl, &host, spec, images).await.map(Some)
    })
    .await
}

fn not_sealed() -> ApiError {
    ApiError::BadRequest(
        "the snapshot is not sealed by this cluster: it was changed since it was made, \
         or another cluster made it"
            .into(),
    )
}

/// The images of a restore, as they arrive, with what they must add up to.
struct Incoming {
    frames: Arc<tokio::sync::Mutex<FrameReader>>,
    bytes: u64,
    sealing: crate::seal::Sealing,
    seal: String,
}

impl Incoming {
    /// Passes the images on to `tx`; the end only if they are all there and sealed.
    async fn forward(mut self, tx: mpsc::Sender<transfers::Piece>) -> ApiResult<()> {
        let mut seen = 0u64;
        let mut frames = self.frames.lock().await;
        while let Some((kind, data)) = frames.next().await? {
            if kind != frame::IMAGES {
                return Err(ApiError::BadRequest(format!(
                    "unexpected frame of kind {kind} in a snapshot's images"
                )));
            }
            seen += data.len() as u64;
            if seen > self.bytes {
                return Err(ApiError::BadRequest(format!(
                    "the snapshot's images are longer than the {} bytes announced",
                    self.bytes
                )));
            }
            self.sealing.update(&data);
            transfers::put(&tx, transfers::Piece::Data(data)).await?;
        }
        if seen != self.bytes {
            return Err(ApiError::BadRequest(format!(
                "the snapshot's images end after {seen} of {} bytes",
                self.bytes
            )));
        }
        if !self.sealing.verify(&self.seal) {
            return Err(not_sealed());
        }
        transfers::put(&tx, transfers::Piece::End).await
    }
}

/// Prepares `spec` on `host`, streams it the images and restores them there.
async fn restore_on(
    c: &Controller,
    host: &str,
    spec: vane_proto::stream::InstanceSpec,
    images: Incoming,
) -> ApiResult<u32> {
    let id = spec.id.clone();
    c.agents
        .request(
            host,
            AgentRequest::Prepare {
                instance: Box::new(spec),
            },
        )
        .await?;
    let result = async {
        let (ticket, tx) = c.transfers.sent_to(host);
        let bytes = images.bytes;
        let receive = agent_transfer_request(
            c,
            host,
            &ticket,
            AgentRequest::ReceiveImages {
                id: id.clone(),
                ticket: ticket.clone(),
                bytes,
                from: None,
                pages: false,
            },
            transfers::answer_within(bytes),
        );
        let (received, forwarded) = tokio::join!(receive, images.forward(tx));
        // What the client sent says more than what the host made of it.
        forwarded?;
        received?;
        match c
            .agents
            .request(
                host,
                AgentRequest::Restore {
                    id: id.clone(),
                    tcp_close: true,
                },
            )
            .await?
        {
            AgentReply::Created { pid } => Ok(pid),
            other => Err(ApiError::Internal(format!(
                "unexpected answer from host {host:?}: {other:?}"
            ))),
        }
    }
    .await;
    if result.is_err() {
        let _ = c.agents.request(host, AgentRequest::Discard { id }).await;
    }
    result
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<StatusCode> {
    let (id, host) = settled(&c, &name)?;
    if c.agents.is_connected(&host) {
        c.agents
            .request(&host, AgentRequest::Remove { id: id.clone() })
            .await?;
    } else if !q.force {
        return Err(ApiError::Unavailable(format!(
            "host {host:?} of instance {name:?} is offline (--force forgets the instance anyway)"
        )));
    }
    {
        let mut s = c.state();
        let batch = s.drop_instance(&id);
        c.commit(batch)?;
    }
    c.push_views();
    Ok(StatusCode::NO_CONTENT)
}

/// The id and host of instance `name`.
fn locate(c: &Controller, name: &str) -> ApiResult<(String, String)> {
    let s = c.state();
    let inst = s.instance_by_name(name)?;
    Ok((inst.id.clone(), inst.host.clone()))
}

/// The id and host of instance `name`, which must not be moving between hosts.
fn settled(c: &Controller, name: &str) -> ApiResult<(String, String)> {
    let s = c.state();
    let inst = s.instance_by_name(name)?;
    if let Some(to) = &inst.migrating {
        return Err(ApiError::Conflict(format!(
            "instance {name:?} is moving to host {to:?}; try again once it has"
        )));
    }
    Ok((inst.id.clone(), inst.host.clone()))
}

/// The id and host of instance `name`, which must be running.
fn running_instance(c: &Controller, name: &str) -> ApiResult<(String, String)> {
    let s = c.state();
    let inst = s.instance_by_name(name)?;
    if inst.state != InstanceState::Running {
        return Err(ApiError::Conflict(format!(
            "instance {name:?} is not running ({})",
            inst.state.as_str()
        )));
    }
    Ok((inst.id.clone(), inst.host.clone()))
}

async fn exec_instance(
    AxState(c): Ctl,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: ExecSpec = parse(&body)?;
    if spec.cmd.is_empty() {
        return Err(ApiError::BadRequest(
            "no command given: vane exec NAME -- CMD [ARGS...]".into(),
        ));
    }
    let (id, host) = running_instance(&c, &name)?;
    streamed(c, host, |ticket| AgentRequest::Exec {
        id,
        ticket,
        cmd: spec.cmd,
        env: spec.env,
    })
    .await
}

async fn instance_logs(AxState(c): Ctl, Path(name): Path<String>) -> ApiResult<Response> {
    let (id, host) = locate(&c, &name)?;
    streamed(c, host, |ticket| AgentRequest::Logs { id, ticket }).await
}

/// Sends a request whose answer is a stream of frames (the agent sends it over a transfer
/// connection), and passes the frames on as the response body, at the pace the client
/// reads them.
async fn streamed(
    c: Arc<Controller>,
    host: String,
    request: impl FnOnce(String) -> AgentRequest,
) -> ApiResult<Response> {
    let (ticket, rx) = c.transfers.output_of(&host);
    if let Err(e) = c.agents.request(&host, request(ticket.clone())).await {
        c.transfers.cancel(&ticket);
        return Err(e);
    }
    // An agent that dies before it claims the stream must not leave the client waiting.
    {
        let (c, ticket) = (c.clone(), ticket.clone());
        tokio::spawn(async move {
            tokio::time::sleep(transfers::UNCLAIMED).await;
            c.transfers.cancel(&ticket);
        });
    }
    // A broken stream ends the body without its exit frame: the client says so.
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await? {
            transfers::Piece::Data(frame) => Some((Ok::<_, std::convert::Infallible>(frame), rx)),
            transfers::Piece::End => None,
        }
    });
    Ok(Response::builder()
        .header("content-type", "application/vnd.vane.stream")
        .body(Body::from_stream(body))
        .expect("static response parts"))
}

async fn instance_stats(
    AxState(c): Ctl,
    Path(name): Path<String>,
) -> ApiResult<Json<InstanceStats>> {
    let (id, host) = running_instance(&c, &name)?;
    match c.agents.request(&host, AgentRequest::Stats { id }).await? {
        AgentReply::Stats { port, usage } => Ok(Json(InstanceStats { name, port, usage })),
        other => Err(ApiError::Internal(format!(
            "unexpected answer from host {host:?}: {other:?}"
        ))),
    }
}

/// Whether the caller may see and change a policy between nets `from` and `to`: both
/// nets its tenant's (one that crosses tenants is the administrator's). A net that does
/// not exist protects nothing: the request fails on it as for anyone.
fn may_touch_policy(s: &crate::state::State, who: &Caller, from: &str, to: &str) -> bool {
    [from, to]
        .iter()
        .all(|n| s.net_tenant(n).map_or(true, |t| who.may(&t)))
}

async fn list_policies(AxState(c): Ctl, axum::Extension(who): Who) -> Json<Vec<Policy>> {
    let s = c.state();
    Json(
        s.policies
            .values()
            .filter(|p| may_touch_policy(&s, &who, &p.from, &p.to))
            .cloned()
            .collect(),
    )
}

async fn create_policy(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Policy>)> {
    let spec: PolicySpec = parse(&body)?;
    let policy = {
        let mut s = c.state();
        if !may_touch_policy(&s, &who, &spec.from, &spec.to) {
            return Err(ApiError::Forbidden(
                "a policy between nets of other tenants (or across tenants) is the administrator's"
                    .into(),
            ));
        }
        let (policy, batch) = s.add_policy(spec)?;
        c.commit(batch)?;
        policy
    };
    c.push_views();
    Ok((StatusCode::CREATED, Json(policy)))
}

async fn remove_policy(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id: u32 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid policy id {id:?}")))?;
    {
        let mut s = c.state();
        if let Some(p) = s.policies.get(&id) {
            if !may_touch_policy(&s, &who, &p.from, &p.to) {
                return Err(ApiError::Forbidden(format!(
                    "policy {id} belongs to another tenant"
                )));
            }
        }
        let batch = s.remove_policy(id)?;
        c.commit(batch)?;
    }
    c.push_views();
    Ok(StatusCode::NO_CONTENT)
}

/// A template is its tenant's, or everybody's when it has none.
fn sees_template(who: &Caller, t: &Template) -> bool {
    t.tenant.as_deref().is_none_or(|owner| who.may(owner))
}

async fn list_templates(AxState(c): Ctl, axum::Extension(who): Who) -> Json<Vec<Template>> {
    Json(
        c.state()
            .templates
            .values()
            .filter(|t| sees_template(&who, t))
            .cloned()
            .collect(),
    )
}

async fn get_template(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(name): Path<String>,
) -> ApiResult<Json<Template>> {
    c.state()
        .templates
        .get(&name)
        .filter(|t| sees_template(&who, t))
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("unknown template {name:?}")))
}

async fn put_template(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Template>)> {
    let mut t: Template = parse(&body)?;
    let mut s = c.state();
    // A tenant's templates are its own; it changes no other (shared ones included).
    if let Caller::Tenant(tenant) = &who {
        if let Some(existing) = s.templates.get(&t.name) {
            if existing.tenant.as_ref() != Some(tenant) {
                return Err(ApiError::Forbidden(format!(
                    "template {:?} belongs to another tenant",
                    t.name
                )));
            }
        }
        t.tenant = Some(tenant.clone());
    }
    let (t, batch) = s.put_template(t)?;
    c.commit(batch)?;
    Ok((StatusCode::CREATED, Json(t)))
}

async fn remove_template(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let mut s = c.state();
    if let Some(t) = s.templates.get(&name) {
        // Shared templates are the administrator's to remove.
        let mine = match (&who, &t.tenant) {
            (Caller::Admin, _) => true,
            (Caller::Tenant(me), Some(owner)) => me == owner,
            (Caller::Tenant(_), None) => false,
        };
        if !mine {
            return Err(ApiError::Forbidden(format!(
                "template {name:?} belongs to another tenant"
            )));
        }
    }
    let batch = s.remove_template(&name)?;
    c.commit(batch)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn agent_connect(AxState(c): Ctl, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| crate::session::run(c, socket))
}

/// An agent claims a transfer of images (`transfers`): its host name and credential, then
/// a ticket the controller gave that host.
async fn agent_transfer(
    AxState(c): Ctl,
    Path(ticket): Path<String>,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let host = header("x-vane-host").unwrap_or_default();
    let credential = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !c.state().host_credential_ok(host, credential) {
        return ApiError::Unauthorized("a transfer is claimed with a host's credential".into())
            .into_response();
    }
    // The credential first: a stranger learns nothing, not even how to ask.
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    match c.transfers.claim(&ticket, host) {
        Some(claimed) => ws
            .max_message_size(2 * crate::transfers::MAX_PIECE)
            .on_upgrade(move |socket| claimed.serve(socket)),
        None => ApiError::NotFound("no such transfer (unknown, spent or expired)".into())
            .into_response(),
    }
}

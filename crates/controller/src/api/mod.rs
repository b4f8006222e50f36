//! The HTTP/JSON API (docs/api.md): routes, who may call them, and how errors answer.
//! Handlers parse and check the request and answer with the stored object or
//! `{"error": "..."}`; what takes several steps on agents is a workflow (`crate::workflow`).

mod instances;
mod metrics;
mod objects;
#[cfg(test)]
mod tests;
mod ui;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State as AxState, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use vane_proto::api::ErrorBody;

use crate::auth::Caller;
use crate::state::ApiError;
use crate::{now, Controller};

use instances::*;
use objects::*;

type Ctl = AxState<Arc<Controller>>;

type ApiResult<T> = Result<T, ApiError>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::Moved(_) => StatusCode::CONFLICT,
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

/// What a standby replica answers to everything: 503, naming the leader when it knows it
/// (in `vane_proto::LEADER_HEADER` too). It holds nothing of the store, so it has nothing else to say.
pub fn standby_router(me: String, leader: Arc<std::sync::Mutex<Option<String>>>) -> Router {
    Router::new().fallback(move || {
        let seen = leader.lock().expect("hint lock").clone();
        let me = me.clone();
        async move {
            let error = match &seen {
                Some(l) if *l != me => {
                    format!("the controller at {me} is a standby: the leader is {l}")
                }
                _ => format!("the controller at {me} is a standby, and no replica leads yet"),
            };
            let mut resp =
                (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody { error })).into_response();
            resp.headers_mut().insert(
                "x-vane-role",
                axum::http::HeaderValue::from_static("standby"),
            );
            if let Some(l) = seen.filter(|l| *l != me) {
                if let Ok(v) = l.parse() {
                    resp.headers_mut().insert(vane_proto::LEADER_HEADER, v);
                }
            }
            resp
        }
    })
}

/// What a new leader answers, but to its agents, until they are back or a moment has
/// passed: 503, which clients wait through as they wait through an election. A request
/// that needs a host (`vane run --host`) would otherwise fail because its agent had not
/// reconnected yet.
pub fn settling_router(me: String) -> Router {
    Router::new().fallback(move || {
        let error = format!(
            "the controller at {me} took the lead just now and waits for its hosts' agents"
        );
        async move {
            let mut resp =
                (StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody { error })).into_response();
            resp.headers_mut().insert(
                "x-vane-role",
                axum::http::HeaderValue::from_static("standby"),
            );
            resp
        }
    })
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
        .route(
            "/v1/instances/{name}/exec",
            post(exec_instance).get(exec_session),
        )
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
        .route("/v1/services", get(list_services).post(create_service))
        .route("/v1/services/{name}", delete(remove_service))
        .route("/v1/gateways", get(list_gateways).post(create_gateway))
        .route(
            "/v1/gateways/{name}",
            get(get_gateway).delete(remove_gateway),
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
        .merge(metrics::routes())
        .fallback(|| async { ApiError::NotFound("no such API endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            authenticate,
        ))
        // Agents prove who they are in their hello, inside TLS (join token or credential),
        // and with their credential when they claim a transfer.
        .route("/v1/agents/connect", get(agent_connect))
        .route("/v1/agents/transfers/{ticket}", get(agent_transfer))
        // The live picture's page holds no data: its script asks the routes above.
        .merge(ui::routes())
        // Outermost, so refusals count too.
        .layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            metrics::count_requests,
        ))
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
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))
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

//! `GET /metrics` and `GET /v1/hosts/{name}/metrics`: Prometheus scrapes, the
//! administrator's alone (they name every tenant's instances and nets); and the count of
//! API requests behind `vane_api_requests_total`.

use std::sync::Arc;

use axum::extract::{MatchedPath, Path, State as AxState};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use vane_proto::api::InstanceState;
use vane_proto::stream::{AgentReply, AgentRequest};

use super::{ApiResult, Ctl, Who};
use crate::metrics::{self, ControllerView, InstanceSample};
use crate::state::ApiError;
use crate::Controller;

/// The two scrape routes, behind the admin credential (a tenant's is refused with 403).
pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/metrics", get(controller_metrics))
        .route("/v1/hosts/{name}/metrics", get(host_metrics))
        .route_layer(axum::middleware::from_fn(admin_only))
}

async fn admin_only(
    axum::Extension(who): Who,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match who.admin_only("metrics") {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn text(body: String) -> Response {
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn controller_metrics(AxState(c): Ctl) -> Response {
    let connected = c.streams.connected().len();
    let view = ControllerView::of(&c.state(), connected);
    text(metrics::controller_text(&view, &c.metrics))
}

/// Asks the host's agent for its counters and for the counters of every instance running
/// there, all at once: a scrape waits for the slowest answer, not their sum.
async fn host_metrics(AxState(c): Ctl, Path(name): Path<String>) -> ApiResult<Response> {
    let running: Vec<_> = {
        let s = c.state();
        super::objects::online_host(&s, &name)?;
        s.instances
            .values()
            .filter(|i| i.host == name && i.state == InstanceState::Running)
            .cloned()
            .collect()
    };
    let host_stats = c.agents.request(&name, AgentRequest::HostStats);
    let per_instance = futures_util::future::join_all(running.iter().map(|i| {
        c.agents
            .request(&name, AgentRequest::Stats { id: i.id.clone() })
    }));
    let (host_stats, per_instance) = tokio::join!(host_stats, per_instance);
    let stats = match host_stats? {
        AgentReply::HostStats(stats) => stats,
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected answer from host {name:?}: {other:?}"
            )))
        }
    };
    let mut instances = Vec::new();
    for (inst, answer) in running.iter().zip(per_instance) {
        match answer {
            Ok(AgentReply::Stats { port, usage }) => {
                instances.push(InstanceSample::new(inst, port, usage))
            }
            // An instance that ended or moved since the state was read has no series in
            // this scrape; the host's own still count.
            other => tracing::debug!(instance = %inst.name, host = %name, "metrics: {other:?}"),
        }
    }
    Ok(text(metrics::host_text(&name, &stats, &instances)))
}

/// Counts every answered request by its route's template (`MatchedPath`; `unmatched` for
/// paths no route has), method and status.
pub(super) async fn count_requests(
    AxState(c): Ctl,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().clone();
    let response = next.run(req).await;
    c.metrics
        .request(&route, &method, response.status().as_u16());
    response
}

//! Handlers of the cluster's objects: status, nets, hosts, join tokens, credentials,
//! policies and templates. Each is one check and one commit.

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::Json;

use vane_proto::api::{
    Gateway, GatewayCreated, GatewaySpec, Host, HostState, HostStats, JoinToken, Net, NetSpec,
    Policy, PolicySpec, Service, ServiceSpec, Status, Template, TokenSpec,
};
use vane_proto::stream::{AgentReply, AgentRequest};

use super::instances::RemoveQuery;
use super::{parse, ApiResult, Ctl, Who};
use crate::auth::Caller;
use crate::now;
use crate::state::ApiError;

pub(super) async fn status(AxState(c): Ctl) -> Json<Status> {
    let s = c.state();
    let counts = [
        ("nets".to_string(), s.nets.len()),
        ("instances".to_string(), s.instances.len()),
        ("hosts".to_string(), s.hosts.len()),
        ("policies".to_string(), s.policies.len()),
        ("services".to_string(), s.services.len()),
        ("gateways".to_string(), s.gateways.len()),
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

pub(super) async fn list_nets(AxState(c): Ctl, axum::Extension(who): Who) -> Json<Vec<Net>> {
    Json(
        c.state()
            .nets
            .values()
            .filter(|n| who.may(&n.tenant))
            .cloned()
            .collect(),
    )
}

pub(super) async fn create_net(
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

pub(super) async fn remove_net(
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

/// Services of the caller's nets, with their backends.
pub(super) async fn list_services(
    AxState(c): Ctl,
    axum::Extension(who): Who,
) -> Json<Vec<Service>> {
    let s = c.state();
    Json(
        s.services
            .values()
            .filter(|v| s.net_tenant(&v.net).is_ok_and(|t| who.may(&t)))
            .map(|v| s.service_listing(v))
            .collect(),
    )
}

pub(super) async fn create_service(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Service>)> {
    let spec: ServiceSpec = parse(&body)?;
    let service = {
        let mut s = c.state();
        who.check(&s.net_tenant(&spec.net)?, &format!("net {:?}", spec.net))?;
        let (service, batch) = s.create_service(spec, now())?;
        c.commit(batch)?;
        service
    };
    c.push_views();
    Ok((StatusCode::CREATED, Json(service)))
}

pub(super) async fn remove_service(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    {
        let mut s = c.state();
        let net = s.service(&name)?.net.clone();
        who.check(&s.net_tenant(&net)?, &format!("service {name:?}"))?;
        let batch = s.remove_service(&name)?;
        c.commit(batch)?;
    }
    c.push_views();
    Ok(StatusCode::NO_CONTENT)
}

/// Gateways of the caller's nets.
pub(super) async fn list_gateways(
    AxState(c): Ctl,
    axum::Extension(who): Who,
) -> Json<Vec<Gateway>> {
    let s = c.state();
    Json(
        s.gateways
            .values()
            .filter(|g| s.net_tenant(&g.net).is_ok_and(|t| who.may(&t)))
            .cloned()
            .collect(),
    )
}

pub(super) async fn get_gateway(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(name): Path<String>,
) -> ApiResult<Json<Gateway>> {
    let s = c.state();
    let gateway = s.gateway(&name)?;
    who.check(&s.net_tenant(&gateway.net)?, &format!("gateway {name:?}"))?;
    Ok(Json(gateway.clone()))
}

/// Makes a gateway and answers with its client's configuration, which holds the client's
/// private key when the controller made it: that key is in this answer only.
pub(super) async fn create_gateway(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<GatewayCreated>)> {
    let spec: GatewaySpec = parse(&body)?;
    let created = {
        let mut s = c.state();
        who.check(&s.net_tenant(&spec.net)?, &format!("net {:?}", spec.net))?;
        let (created, batch) = s.create_gateway(spec, now(), crate::state::new_private_key)?;
        c.commit(batch)?;
        created
    };
    tracing::info!(
        gateway = %created.gateway.name,
        net = %created.gateway.net,
        host = %created.gateway.host,
        ip = %created.gateway.ip,
        "gateway added"
    );
    c.push_views();
    Ok((StatusCode::CREATED, Json(created)))
}

pub(super) async fn remove_gateway(
    AxState(c): Ctl,
    axum::Extension(who): Who,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    {
        let mut s = c.state();
        let net = s.gateway(&name)?.net.clone();
        who.check(&s.net_tenant(&net)?, &format!("gateway {name:?}"))?;
        let batch = s.remove_gateway(&name)?;
        c.commit(batch)?;
    }
    c.push_views();
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_hosts(AxState(c): Ctl) -> Json<Vec<Host>> {
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

pub(super) async fn create_token(
    AxState(c): Ctl,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<JoinToken>)> {
    let spec: TokenSpec = parse(&body)?;
    let mut s = c.state();
    let (token, expires, id, batch) = s.create_token(spec.ttl_secs, spec.reusable, now())?;
    c.commit(batch)?;
    // The agent that joins with it checks the controller against the pin it carries.
    let token = vane_proto::trust::join_token(&token, &c.tls_pin);
    Ok((StatusCode::CREATED, Json(JoinToken { token, expires, id })))
}

pub(super) async fn create_credential(
    AxState(c): Ctl,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<vane_proto::api::TenantCredential>)> {
    let spec: vane_proto::api::CredentialSpec = parse(&body)?;
    let mut s = c.state();
    let (cred, batch) = s.create_credential(&spec.tenant, spec.ttl_secs, now())?;
    c.commit(batch)?;
    Ok((StatusCode::CREATED, Json(cred)))
}

pub(super) async fn list_credentials(
    AxState(c): Ctl,
) -> Json<Vec<vane_proto::api::CredentialInfo>> {
    Json(c.state().credentials(now()))
}

pub(super) async fn revoke_credential(
    AxState(c): Ctl,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut s = c.state();
    let batch = s.revoke_credential(&id)?;
    c.commit(batch)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_tokens(AxState(c): Ctl) -> Json<Vec<vane_proto::api::TokenInfo>> {
    Json(c.state().tokens(now()))
}

pub(super) async fn revoke_token(AxState(c): Ctl, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let mut s = c.state();
    let batch = s.revoke_token(&id)?;
    c.commit(batch)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn remove_host(
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
        c.streams.evict(
            &name,
            "this host was evicted from the cluster (vane host rm --force)",
        );
    }
    // The other switches forget its key: they drop their sessions with it at once and
    // accept no new one.
    c.push_views();
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn host_stats(
    AxState(c): Ctl,
    Path(name): Path<String>,
) -> ApiResult<Json<HostStats>> {
    online_host(&c.state(), &name)?;
    match c.agents.request(&name, AgentRequest::HostStats).await? {
        AgentReply::HostStats(stats) => Ok(Json(stats)),
        other => Err(ApiError::Internal(format!(
            "unexpected answer from host {name:?}: {other:?}"
        ))),
    }
}

/// Host `name`, if it is known and online (its agent can be asked); else why not.
pub(super) fn online_host<'a>(
    s: &'a crate::state::State,
    name: &str,
) -> ApiResult<&'a vane_proto::api::Host> {
    let host = s
        .hosts
        .get(name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown host {name:?}")))?;
    if host.state != HostState::Online {
        return Err(ApiError::Unavailable(format!("host {name:?} is offline")));
    }
    Ok(host)
}

/// Whether the caller may see and change a policy between nets `from` and `to`: both
/// nets its tenant's (one that crosses tenants is the administrator's). A net that does
/// not exist protects nothing: the request fails on it as for anyone.
pub(super) fn may_touch_policy(
    s: &crate::state::State,
    who: &Caller,
    from: &str,
    to: &str,
) -> bool {
    [from, to]
        .iter()
        .all(|n| s.net_tenant(n).map_or(true, |t| who.may(&t)))
}

pub(super) async fn list_policies(AxState(c): Ctl, axum::Extension(who): Who) -> Json<Vec<Policy>> {
    let s = c.state();
    Json(
        s.policies
            .values()
            .filter(|p| may_touch_policy(&s, &who, &p.from, &p.to))
            .cloned()
            .collect(),
    )
}

pub(super) async fn create_policy(
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

pub(super) async fn remove_policy(
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
pub(super) fn sees_template(who: &Caller, t: &Template) -> bool {
    t.tenant.as_deref().is_none_or(|owner| who.may(owner))
}

pub(super) async fn list_templates(
    AxState(c): Ctl,
    axum::Extension(who): Who,
) -> Json<Vec<Template>> {
    Json(
        c.state()
            .templates
            .values()
            .filter(|t| sees_template(&who, t))
            .cloned()
            .collect(),
    )
}

pub(super) async fn get_template(
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

pub(super) async fn put_template(
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

pub(super) async fn remove_template(
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

//! The routes of gateways in-process, through the router with its credentials: who may add,
//! see and remove which gateway, and what each answer holds.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use vane_proto::api::{ClusterConfig, Gateway, GatewayCreated, GatewayEndpoint, NetSpec};

use crate::agents::Agents;
use crate::{Controller, ControllerConfig};

struct Api {
    c: Arc<Controller>,
    admin: String,
    /// Tenant "b"'s credential.
    tenant_b: String,
    _dir: tempfile::TempDir,
}

/// A controller with host h1 taking WireGuard clients, net "red" of tenant "a" and net
/// "blue" of tenant "b".
fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControllerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        store: crate::StoreLocation::Embedded,
        cluster: ClusterConfig::default(),
        host_grace: crate::DEFAULT_HOST_GRACE,
        ready: None,
        advertise: None,
    };
    let store = crate::store::Store::open(&cfg.store, &cfg.data_dir).unwrap();
    let agents = Arc::new(Agents::default());
    let c = Controller::open_with(&cfg, [0; 32], store, agents.clone(), agents).unwrap();
    let tenant_b = {
        let mut s = c.state();
        let mut batch = s.host_online(
            "h1",
            Some("198.18.0.1:7947".parse().unwrap()),
            Some(&"01".repeat(32)),
            0,
        );
        let endpoint = GatewayEndpoint {
            public_key: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
            port: 51820,
        };
        batch.extend(s.host_gateway("h1", Some(endpoint)).0);
        c.commit(batch).unwrap();
        for (name, subnet, tenant) in [("red", "10.1.0.0/24", "a"), ("blue", "10.2.0.0/24", "b")] {
            let spec = NetSpec {
                name: name.into(),
                subnet: subnet.parse().unwrap(),
                tenant: tenant.into(),
                egress: false,
            };
            let (_, batch) = s.create_net(spec, 0).unwrap();
            c.commit(batch).unwrap();
        }
        let (cred, batch) = s.create_credential("b", None, 0).unwrap();
        c.commit(batch).unwrap();
        cred.credential
    };
    let admin = std::fs::read_to_string(dir.path().join(crate::auth::ADMIN_TOKEN_FILE))
        .unwrap()
        .trim()
        .to_string();
    Api {
        c: Arc::new(c),
        admin,
        tenant_b,
        _dir: dir,
    }
}

impl Api {
    async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = super::router(self.c.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, value)
    }
}

#[tokio::test]
async fn gateways_are_added_seen_and_removed_within_their_tenant() {
    let api = api();
    let (admin, b) = (api.admin.as_str(), api.tenant_b.as_str());
    let add = |net: &str, name: &str| serde_json::json!({"name": name, "net": net});

    // A tenant adds none to another tenant's net.
    let (status, body) = api
        .call(b, "POST", "/v1/gateways", Some(add("red", "x")))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(api.c.state().gateways.is_empty());

    // Its own net: the answer holds the gateway and its client's configuration.
    let (status, body) = api
        .call(b, "POST", "/v1/gateways", Some(add("blue", "laptop")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let created: GatewayCreated = serde_json::from_value(body).unwrap();
    assert_eq!(created.gateway.ip.to_string(), "10.2.0.1");
    assert!(created.config.contains("\nPrivateKey = "));
    assert!(created.config.contains("\nEndpoint = 198.18.0.1:51820\n"));
    // Kept: the gateway, never its private key.
    let kept = api.c.state().gateways["laptop"].clone();
    assert_eq!(kept, created.gateway);
    let stored = api.c.store.load().unwrap().gateways;
    assert_eq!(stored, vec![kept]);

    let (status, body) = api
        .call(admin, "POST", "/v1/gateways", Some(add("red", "desk")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, body) = api
        .call(admin, "POST", "/v1/gateways", Some(add("red", "desk")))
        .await;
    assert!(body["error"].as_str().unwrap().contains("already exists"));

    // Each sees its own; the administrator sees all.
    let names = |v: serde_json::Value| -> Vec<String> {
        serde_json::from_value::<Vec<Gateway>>(v)
            .unwrap()
            .into_iter()
            .map(|g| g.name)
            .collect()
    };
    let (_, body) = api.call(b, "GET", "/v1/gateways", None).await;
    assert_eq!(names(body), ["laptop"]);
    let (_, body) = api.call(admin, "GET", "/v1/gateways", None).await;
    assert_eq!(names(body), ["desk", "laptop"]);
    let (status, _) = api.call(b, "GET", "/v1/gateways/desk", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = api.call(b, "GET", "/v1/gateways/laptop", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "laptop");

    // Removal: not another tenant's; gone from the state and the store.
    let (status, _) = api.call(b, "DELETE", "/v1/gateways/desk", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.call(b, "DELETE", "/v1/gateways/laptop", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api.call(b, "DELETE", "/v1/gateways/laptop", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stored = api.c.store.load().unwrap().gateways;
    assert_eq!(
        stored.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["desk"]
    );
}

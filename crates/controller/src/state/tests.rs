use std::net::Ipv4Addr;

use vane_proto::api::{ClusterConfig, Net, NetSpec, PolicySpec, RunSpec};
use vane_proto::stream::HostAuth;
use vane_proto::validate::PortSpec;

use super::{ApiError, State};
use crate::enroll::Refusal;
use crate::store::Snapshot;

fn state_with_host() -> State {
    let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
    s.host_online("h1", None, None, 0);
    s
}

fn net(s: &mut State, name: &str, subnet: &str, tenant: &str) -> Result<Net, ApiError> {
    s.create_net(
        NetSpec {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            tenant: tenant.into(),
            egress: false,
        },
        0,
    )
    .map(|(n, _)| n)
}

fn run(s: &mut State, name: &str, net: &str, ip: Option<&str>) -> Result<Ipv4Addr, ApiError> {
    let id = format!("{name}-0123456789");
    s.plan_instance(
        RunSpec {
            name: Some(name.into()),
            net: net.into(),
            ip: ip.map(|i| i.parse().unwrap()),
            cmd: vec!["true".into()],
            ..Default::default()
        },
        id,
        0,
    )
    .map(|(spec, _)| spec.ip)
}

#[test]
fn nets_of_different_tenants_may_overlap() {
    let mut s = state_with_host();
    let red = net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    let blue = net(&mut s, "blue", "10.10.2.0/24", "b").unwrap();
    assert_ne!(red.id, blue.id);
    assert!(matches!(
        net(&mut s, "pink", "10.10.0.0/16", "a"),
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        net(&mut s, "red", "10.30.0.0/24", "c"),
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        net(&mut s, "out", "192.168.0.0/24", "c"),
        Err(ApiError::BadRequest(_))
    ));
    assert!(matches!(
        net(&mut s, "bits", "10.40.0.1/24", "c"),
        Err(ApiError::BadRequest(_))
    ));
}

#[test]
fn addresses_are_allocated_and_checked() {
    let mut s = state_with_host();
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    assert_eq!(
        run(&mut s, "web1", "red", Some("10.10.2.1")).unwrap(),
        "10.10.2.1".parse::<Ipv4Addr>().unwrap()
    );
    assert_eq!(
        run(&mut s, "cli1", "red", None).unwrap(),
        "10.10.2.2".parse::<Ipv4Addr>().unwrap()
    );
    let e = run(&mut s, "web2", "red", Some("10.10.2.1")).unwrap_err();
    assert!(e.to_string().contains("already in use"), "{e}");
    let e = run(&mut s, "web3", "red", Some("10.10.3.1")).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let e = run(&mut s, "web1", "red", None).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = run(&mut s, "x", "nope", None).unwrap_err();
    assert_eq!(e, ApiError::NotFound("unknown net \"nope\"".into()));
    let e = s.remove_net("red").unwrap_err();
    assert!(e.to_string().contains("web1"), "{e}");
}

#[test]
fn ambiguous_policies_are_refused() {
    let mut s = state_with_host();
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "blue", "10.10.2.0/24", "b").unwrap();
    net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
    net(&mut s, "teal", "10.10.2.0/25", "c").unwrap();
    let allow = |s: &mut State, from: &str, to: &str, port: Option<&str>| {
        s.add_policy(PolicySpec {
            from: from.into(),
            to: to.into(),
            port: port.map(|p| p.parse::<PortSpec>().unwrap()),
        })
    };
    allow(&mut s, "green", "red", Some("80/tcp")).unwrap();
    allow(&mut s, "green", "red", Some("443/tcp")).unwrap();
    assert!(matches!(
        allow(&mut s, "green", "red", Some("80/tcp")),
        Err(ApiError::Conflict(_))
    ));
    let e = allow(&mut s, "green", "teal", None).unwrap_err();
    assert!(e.to_string().contains("ambiguous"), "{e}");
    let e = allow(&mut s, "red", "blue", None).unwrap_err();
    assert!(e.to_string().contains("ambiguous"), "{e}");
    assert!(allow(&mut s, "red", "red", None).is_err());
    allow(&mut s, "red", "green", None).unwrap();
    let e = s.remove_net("green").unwrap_err();
    assert!(e.to_string().contains("policies"), "{e}");
}

#[test]
fn views_hold_what_a_host_needs() {
    let mut s = state_with_host();
    s.host_online("h2", None, None, 0);
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
    net(&mut s, "blue", "10.10.2.0/24", "b").unwrap();
    run(&mut s, "web1", "red", None).unwrap();
    s.plan_instance(
        RunSpec {
            name: Some("g1".into()),
            net: "green".into(),
            host: Some("h2".into()),
            cmd: vec!["true".into()],
            ..Default::default()
        },
        "g1-0123456789".into(),
        0,
    )
    .unwrap();
    let v = s.view_for("h1");
    assert_eq!(v.nets.len(), 1);
    assert_eq!(v.members.len(), 1);
    s.add_policy(PolicySpec {
        from: "green".into(),
        to: "red".into(),
        port: None,
    })
    .unwrap();
    let v = s.view_for("h1");
    let names: Vec<&str> = v.nets.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["green", "red"]);
    assert_eq!(v.members.len(), 2);
    assert_eq!(v.policies.len(), 1);
}

#[test]
fn tenant_credentials_name_their_tenant_until_they_expire_or_are_revoked() {
    let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
    let (a, _) = s.create_credential("a", None, 0).unwrap();
    let (b, _) = s.create_credential("b", Some(100), 0).unwrap();
    assert_eq!(s.tenant_of(&a.credential, 50).as_deref(), Some("a"));
    assert_eq!(s.tenant_of(&b.credential, 50).as_deref(), Some("b"));
    assert_eq!(s.tenant_of(&b.credential, 100), None);
    assert_eq!(s.tenant_of("vanetenant-00", 0), None);
    assert_eq!(s.credentials(50).len(), 2);
    assert_eq!(s.credentials(200).len(), 1);
    s.revoke_credential(&a.info.id).unwrap();
    assert_eq!(s.tenant_of(&a.credential, 50), None);
    assert!(s.revoke_credential(&a.info.id).is_err());
    assert!(s.create_credential("Not A Name", None, 0).is_err());
    assert!(s.create_credential("a", Some(0), 0).is_err());
}

#[test]
fn join_tokens_are_spent_listed_and_revoked() {
    let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
    let key = |n: u8| format!("{n:02x}").repeat(32);
    let join = |s: &mut State, name: &str, n: u8, token: &str| {
        s.admit_host(name, &key(n), &HostAuth::Token(token.into()), 10)
    };
    let (once, _, id, _) = s.create_token(60, false, 0).unwrap();
    let (many, _, _, _) = s.create_token(60, true, 0).unwrap();
    assert_eq!(s.tokens(0).len(), 2);
    assert!(s.tokens(0).iter().any(|t| t.id == id && t.single_use));
    // The single-use token enrolls one host, then no other.
    assert!(join(&mut s, "a", 1, &once).unwrap().0.is_some());
    assert!(matches!(
        join(&mut s, "b", 2, &once),
        Err(Refusal::BadToken)
    ));
    assert_eq!(s.tokens(0).len(), 1);
    // The reusable one enrolls several (a token as printed carries the CA's pin).
    let printed = vane_proto::trust::join_token(&many, &[9; 32]);
    assert!(join(&mut s, "b", 2, &printed).unwrap().0.is_some());
    assert!(join(&mut s, "c", 3, &many).unwrap().0.is_some());
    // Revoked, it enrolls nobody; expired tokens are not listed.
    let many_id = s.tokens(0)[0].id.clone();
    s.revoke_token(&many_id).unwrap();
    assert!(matches!(
        join(&mut s, "d", 4, &many),
        Err(Refusal::BadToken)
    ));
    assert!(s.revoke_token(&many_id).is_err());
    s.create_token(5, false, 0).unwrap();
    assert!(s.tokens(10).is_empty());
}

#[test]
fn templates_apply_first_and_flags_override_them() {
    use vane_proto::api::{Limits, SpaceSpec, Template};
    let mut s = state_with_host();
    net(&mut s, "red", "10.1.0.0/24", "a").unwrap();
    s.put_template(Template {
        name: "small".into(),
        tenant: None,
        limits: Limits {
            memory: Some(128 << 20),
            cpu_millis: Some(250),
            ..Limits::default()
        },
        env: vec![
            ("HOME".into(), "/srv/{name}".into()),
            ("A".into(), "1".into()),
        ],
        space: SpaceSpec {
            redirects: vec![("/etc/app".into(), "{state}/app".into())],
            ..SpaceSpec::default()
        },
    })
    .unwrap();
    let (spec, _) = s
        .plan_instance(
            RunSpec {
                name: Some("web".into()),
                net: "red".into(),
                cmd: vec!["true".into()],
                template: Some("small".into()),
                env: vec![("A".into(), "2".into())],
                limits: Limits {
                    cpu_millis: Some(500),
                    pids: Some(10),
                    ..Limits::default()
                },
                ..Default::default()
            },
            "web-0123456789".into(),
            0,
        )
        .unwrap();
    assert_eq!(
        spec.limits,
        Limits {
            memory: Some(128 << 20),
            cpu_millis: Some(500),
            pids: Some(10),
            bandwidth: None
        }
    );
    assert_eq!(
        spec.env,
        vec![
            ("HOME".to_string(), "/srv/{name}".to_string()),
            ("A".to_string(), "2".to_string())
        ]
    );
    assert_eq!(spec.space.redirects.len(), 1);
    assert_eq!(
        s.instance_by_name("web").unwrap().template.as_deref(),
        Some("small")
    );

    let unknown = RunSpec {
        name: Some("x".into()),
        net: "red".into(),
        cmd: vec!["true".into()],
        template: Some("nope".into()),
        ..Default::default()
    };
    let e = s
        .plan_instance(unknown, "x-0123456789".into(), 0)
        .unwrap_err();
    assert!(e.to_string().contains("unknown template \"nope\""), "{e}");
    let bad = Template {
        name: "bad".into(),
        env: vec![("X".into(), "{nope}".into())],
        ..Template::default()
    };
    assert!(s.put_template(bad).is_err());
    let bad_cap = Template {
        name: "bad".into(),
        space: SpaceSpec {
            cap_add: vec!["SYS_FOO".into()],
            ..SpaceSpec::default()
        },
        ..Template::default()
    };
    let e = s.put_template(bad_cap).unwrap_err();
    assert!(e.to_string().contains("SYS_FOO"), "{e}");
    assert!(s.remove_template("small").is_ok());
    assert!(s.remove_template("small").is_err());
}

/// Views made from a `ViewCache` are those `view_for` makes, and a host's key changes when
/// something its view holds does, not when another host's does.
#[test]
fn views_are_made_again_only_where_their_parts_changed() {
    use super::ViewCache;
    let key = |h: &str| Some("ab".repeat(16) + &format!("{h:0>32}"));
    let mut s = state_with_host();
    for h in ["h1", "h2", "h3"] {
        s.host_online(h, None, key(h).as_deref(), 0);
    }
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
    net(&mut s, "blue", "10.30.0.0/24", "a").unwrap();
    let run_on = |s: &mut State, name: &str, net: &str, host: &str| {
        s.plan_instance(
            RunSpec {
                name: Some(name.into()),
                net: net.into(),
                host: Some(host.into()),
                cmd: vec!["true".into()],
                ..Default::default()
            },
            format!("{name}-0123456789"),
            0,
        )
        .unwrap();
    };
    run_on(&mut s, "r1", "red", "h1");
    run_on(&mut s, "g1", "green", "h2");
    let hosts = ["h1", "h2", "h3"];
    let mut cache = super::views::ViewCache::default();
    let keys = |cache: &mut ViewCache, s: &State| {
        cache.refresh(s);
        for h in hosts {
            assert_eq!(cache.view(s, h), s.view_for(h), "view of {h}");
        }
        hosts.map(|h| cache.key(s, h))
    };
    let k0 = keys(&mut cache, &s);
    assert_eq!(keys(&mut cache, &s), k0, "nothing changed");

    // A member of red: h1's view changes, h2's (green) and h3's (no instances) do not.
    run_on(&mut s, "r2", "red", "h3");
    let k1 = keys(&mut cache, &s);
    assert_ne!(k1[0], k0[0]);
    assert_eq!(k1[1], k0[1]);
    assert_ne!(k1[2], k0[2], "h3 now has an instance in red");

    // A net no host uses, and a member of it: nobody's view.
    run_on(&mut s, "b1", "blue", "h3");
    let k2 = keys(&mut cache, &s);
    assert_eq!(k2[0], k1[0]);
    assert_eq!(k2[1], k1[1]);

    // A policy between green and red: both sides see both nets.
    s.add_policy(PolicySpec {
        from: "green".into(),
        to: "red".into(),
        port: None,
    })
    .unwrap();
    let k3 = keys(&mut cache, &s);
    assert_ne!(k3[0], k2[0]);
    assert_ne!(k3[1], k2[1]);
    assert_eq!(cache.view(&s, "h2").members.len(), 3);

    // A new host with a key is everyone's new peer.
    s.host_online("h4", None, key("h4").as_deref(), 0);
    let k4 = keys(&mut cache, &s);
    for i in 0..3 {
        assert_ne!(k4[i], k3[i]);
    }
    assert_eq!(cache.view(&s, "h1").peers.len(), 3);

    // An instance removed: its net's hosts.
    s.drop_instance("r2-0123456789");
    let k5 = keys(&mut cache, &s);
    assert_ne!(k5[0], k4[0]);

    // A service of red, then a member of it running: red's hosts (h1 and, by the
    // policy, h2), not h3 (blue only).
    s.create_service(
        vane_proto::api::ServiceSpec {
            name: "web".into(),
            net: "red".into(),
            ports: vec!["80/tcp".parse().unwrap()],
        },
        0,
    )
    .unwrap();
    let k6 = keys(&mut cache, &s);
    assert_ne!(k6[0], k5[0]);
    assert_ne!(k6[1], k5[1]);
    assert_eq!(k6[2], k5[2]);
    s.plan_instance(
        RunSpec {
            name: Some("w1".into()),
            net: "red".into(),
            host: Some("h3".into()),
            service: Some("web".into()),
            cmd: vec!["true".into()],
            ..Default::default()
        },
        "w1-0123456789".into(),
        0,
    )
    .unwrap();
    let k7 = keys(&mut cache, &s);
    assert!(cache.view(&s, "h1").services[0].backends.is_empty());
    s.change_instance("w1-0123456789", |i| {
        i.state = vane_proto::api::InstanceState::Running
    });
    let k8 = keys(&mut cache, &s);
    assert_ne!(k8[0], k7[0], "a new backend");
    assert_eq!(cache.view(&s, "h1").services[0].backends.len(), 1);
}

fn service(s: &mut State, name: &str, net: &str) -> Result<vane_proto::api::Service, ApiError> {
    s.create_service(
        vane_proto::api::ServiceSpec {
            name: name.into(),
            net: net.into(),
            ports: vec!["80/tcp".parse().unwrap()],
        },
        0,
    )
    .map(|(v, _)| v)
}

fn member(s: &mut State, name: &str, net: &str, host: &str, svc: &str) -> Result<(), ApiError> {
    s.plan_instance(
        RunSpec {
            name: Some(name.into()),
            net: net.into(),
            host: Some(host.into()),
            service: Some(svc.into()),
            cmd: vec!["true".into()],
            ..Default::default()
        },
        format!("{name}-0123456789"),
        0,
    )?;
    s.change_instance(&format!("{name}-0123456789"), |i| {
        i.state = vane_proto::api::InstanceState::Running
    });
    Ok(())
}

#[test]
fn services_take_an_address_no_instance_gets() {
    let mut s = state_with_host();
    net(&mut s, "red", "10.10.2.0/29", "a").unwrap();
    net(&mut s, "blue", "10.10.3.0/29", "a").unwrap();
    let web = service(&mut s, "web", "red").unwrap();
    assert_eq!(web.vip, "10.10.2.6".parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        service(&mut s, "api", "red").unwrap().vip,
        "10.10.2.5".parse::<Ipv4Addr>().unwrap()
    );
    assert!(matches!(
        service(&mut s, "web", "blue"),
        Err(ApiError::Conflict(_))
    ));
    let e = s
        .create_service(
            vane_proto::api::ServiceSpec {
                name: "none".into(),
                net: "red".into(),
                ports: vec![],
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
    // Instances fill the rest from the bottom, never a service's address.
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        assert_eq!(
            run(&mut s, name, "red", None).unwrap(),
            Ipv4Addr::new(10, 10, 2, i as u8 + 1)
        );
    }
    assert!(run(&mut s, "e", "red", None).is_err(), "the net is full");
    let e = run(&mut s, "f", "blue", Some("10.10.3.6")).unwrap();
    assert_eq!(e, Ipv4Addr::new(10, 10, 3, 6));
    let e = run(&mut s, "g", "red", Some("10.10.2.6")).unwrap_err();
    assert!(e.to_string().contains("service \"web\""), "{e}");
    // A service's name is not an instance's of its net, and the other way round.
    assert!(matches!(
        service(&mut s, "a", "red"),
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        run(&mut s, "web", "red", None),
        Err(ApiError::Conflict(_))
    ));
    let e = s.remove_net("blue").unwrap_err();
    assert!(e.to_string().contains("instances"), "{e}");
}

#[test]
fn members_join_services_of_their_net_and_views_list_the_running_ones() {
    let mut s = state_with_host();
    s.host_online("h2", None, None, 0);
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "blue", "10.10.3.0/24", "a").unwrap();
    service(&mut s, "web", "red").unwrap();
    let e = member(&mut s, "w0", "blue", "h1", "web").unwrap_err();
    assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
    let e = member(&mut s, "w0", "red", "h1", "nope").unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");
    member(&mut s, "w1", "red", "h1", "web").unwrap();
    member(&mut s, "w2", "red", "h2", "web").unwrap();
    run(&mut s, "plain", "red", None).unwrap();
    let backends = |s: &State, host: &str| {
        let view = s.view_for(host);
        assert_eq!(view.services.len(), 1);
        assert_eq!(view.services[0].name, "web");
        view.services[0].backends.clone()
    };
    let (w1, w2) = (Ipv4Addr::new(10, 10, 2, 1), Ipv4Addr::new(10, 10, 2, 2));
    assert_eq!(backends(&s, "h1"), vec![w1, w2]);
    assert_eq!(
        s.service_listing(s.service("web").unwrap()).backends,
        vec!["w1".to_string(), "w2".to_string()]
    );
    // Stopped, exited, or on a dead host: no new flows.
    s.change_instance("w1-0123456789", |i| i.stopped = true);
    assert_eq!(backends(&s, "h2"), vec![w2]);
    s.change_instance("w1-0123456789", |i| {
        i.stopped = false;
        i.state = vane_proto::api::InstanceState::Exited
    });
    assert_eq!(backends(&s, "h2"), vec![w2]);
    s.change_instance("w1-0123456789", |i| {
        i.state = vane_proto::api::InstanceState::Running
    });
    assert_eq!(backends(&s, "h2"), vec![w1, w2]);
    s.hosts.get_mut("h2").unwrap().state = vane_proto::api::HostState::Dead;
    assert_eq!(backends(&s, "h1"), vec![w1]);
    // A host without the net sees no services; removal takes it from the views.
    assert!(s.view_for("h3").services.is_empty());
    s.remove_service("web").unwrap();
    assert!(s.view_for("h1").services.is_empty());
    assert!(s.remove_service("web").is_err());
    s.remove_net("blue").unwrap();
}

/// A host whose agent takes WireGuard clients (`--gateway-listen`), with a tunnel key.
fn gateway_host(s: &mut State, name: &str, last: u8) {
    let key = format!("{last:02x}").repeat(32);
    let locator = format!("198.18.0.{last}:7947").parse().unwrap();
    s.host_online(name, Some(locator), Some(&key), 0);
    let endpoint = vane_proto::api::GatewayEndpoint {
        public_key: wg_key(last),
        port: 51820,
    };
    let (_, refused) = s.host_gateway(name, Some(endpoint));
    assert_eq!(refused, None);
}

/// A WireGuard key (base64) made of byte `b`.
fn wg_key(b: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}

fn gateway(
    s: &mut State,
    name: &str,
    net: &str,
    host: Option<&str>,
    ip: Option<&str>,
) -> Result<vane_proto::api::GatewayCreated, ApiError> {
    s.create_gateway(
        vane_proto::api::GatewaySpec {
            name: name.into(),
            net: net.into(),
            host: host.map(Into::into),
            ip: ip.map(|i| i.parse().unwrap()),
            public_key: None,
        },
        7,
        || [9; 32],
    )
    .map(|(g, _)| g)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn gateways_take_addresses_and_share_their_net_resolver() {
    let mut s = state_with_host();
    gateway_host(&mut s, "h2", 2);
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "blue", "10.20.0.0/24", "a").unwrap();
    run(&mut s, "web1", "red", None).unwrap();
    let a = gateway(&mut s, "laptop", "red", None, None).unwrap();
    // h1 takes no clients: the chosen host is h2.
    assert_eq!(a.gateway.host, "h2");
    assert_eq!(a.gateway.ip, ip("10.10.2.2"));
    assert_eq!(a.gateway.resolver, ip("10.10.2.254"));
    assert_eq!(a.gateway.created, 7);
    // The generated key pair: the private key in the configuration only.
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(
        super::gateways::clamp([9; 32]),
    ));
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(a.gateway.public_key, b64.encode(public.as_bytes()));
    let private = b64.encode(super::gateways::clamp([9; 32]));
    assert!(a.config.contains(&format!("\nPrivateKey = {private}\n")));
    assert!(a
        .config
        .contains("\nPublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n"));
    assert!(a.config.contains("\nEndpoint = 198.18.0.2:51820\n"));
    assert!(a.config.contains("\nDNS = 10.10.2.254, red\n"));
    assert!(a.config.contains("\nAllowedIPs = 10.10.2.0/24\n"));

    // A second one of red shares the resolver; its own address is given.
    let b = gateway(&mut s, "phone", "red", Some("h2"), Some("10.10.2.100")).unwrap();
    assert_eq!(
        (b.gateway.ip, b.gateway.resolver),
        (ip("10.10.2.100"), ip("10.10.2.254"))
    );
    // Instances and services never get a gateway's address or resolver.
    assert_eq!(run(&mut s, "web2", "red", None).unwrap(), ip("10.10.2.3"));
    assert_eq!(
        service(&mut s, "api", "red").unwrap().vip,
        ip("10.10.2.253")
    );
    let e = run(&mut s, "web3", "red", Some("10.10.2.254")).unwrap_err();
    assert!(
        e.to_string().contains("resolver of gateway \"laptop\""),
        "{e}"
    );
    let e = run(&mut s, "web3", "red", Some("10.10.2.100")).unwrap_err();
    assert!(matches!(e, ApiError::Conflict(_)), "{e}");
    // A policy from red: its target's subnet is in the next client's AllowedIPs.
    s.add_policy(PolicySpec {
        from: "red".into(),
        to: "blue".into(),
        port: None,
    })
    .unwrap();
    let c = gateway(&mut s, "tablet", "red", None, None).unwrap();
    assert!(c
        .config
        .contains("\nAllowedIPs = 10.10.2.0/24, 10.20.0.0/24\n"));
    // Another net's gateway gets that net's own resolver.
    let d = gateway(&mut s, "desk", "blue", None, None).unwrap();
    assert_eq!(
        (d.gateway.ip, d.gateway.resolver),
        (ip("10.20.0.1"), ip("10.20.0.254"))
    );

    // The net cannot go while it has gateways; removing them frees their addresses.
    let e = s.remove_net("blue").unwrap_err();
    assert!(e.to_string().contains("gateways: desk"), "{e}");
    s.remove_gateway("desk").unwrap();
    assert!(s.remove_gateway("desk").is_err());
    assert_eq!(run(&mut s, "b1", "blue", None).unwrap(), ip("10.20.0.1"));
}

#[test]
fn gateways_are_checked_before_they_are_made() {
    let mut s = state_with_host();
    gateway_host(&mut s, "h2", 2);
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    run(&mut s, "web1", "red", None).unwrap();
    service(&mut s, "api", "red").unwrap();
    gateway(&mut s, "laptop", "red", None, None).unwrap();
    let conflict = |r: Result<_, ApiError>, says: &str| match r {
        Err(ApiError::Conflict(e)) => assert!(e.contains(says), "{e}"),
        other => panic!("{:?}", other.map(|_: vane_proto::api::GatewayCreated| ())),
    };
    conflict(
        gateway(&mut s, "laptop", "red", None, None),
        "already exists",
    );
    conflict(
        gateway(&mut s, "web1", "red", None, None),
        "instance \"web1\"",
    );
    conflict(gateway(&mut s, "api", "red", None, None), "service \"api\"");
    conflict(gateway(&mut s, "x", "red", None, Some("10.10.2.1")), "web1");
    conflict(
        gateway(&mut s, "x", "red", None, Some("10.10.2.2")),
        "laptop",
    );
    conflict(
        gateway(&mut s, "x", "red", None, Some("10.10.2.254")),
        "api",
    );
    // An instance or a service cannot take a gateway's name in its net.
    let e = run(&mut s, "laptop", "red", None).unwrap_err();
    assert!(e.to_string().contains("gateway \"laptop\""), "{e}");
    let e = service(&mut s, "laptop", "red").unwrap_err();
    assert!(e.to_string().contains("gateway \"laptop\""), "{e}");

    let bad = |r: Result<_, ApiError>, says: &str| match r {
        Err(ApiError::BadRequest(e)) => assert!(e.contains(says), "{e}"),
        other => panic!("{:?}", other.map(|_: vane_proto::api::GatewayCreated| ())),
    };
    bad(
        gateway(&mut s, "x", "red", None, Some("10.10.3.1")),
        "outside",
    );
    bad(
        gateway(&mut s, "x", "red", None, Some("10.10.2.255")),
        "broadcast",
    );
    bad(gateway(&mut s, "X_", "red", None, None), "gateway name");
    bad(
        gateway(&mut s, "x", "red", Some("h1"), None),
        "host \"h1\" takes no WireGuard clients",
    );
    assert!(matches!(
        gateway(&mut s, "x", "nope", None, None),
        Err(ApiError::NotFound(_))
    ));
    assert!(matches!(
        gateway(&mut s, "x", "red", Some("h9"), None),
        Err(ApiError::NotFound(_))
    ));
    let with_key = |s: &mut State, key: &str| {
        s.create_gateway(
            vane_proto::api::GatewaySpec {
                name: "own".into(),
                net: "red".into(),
                public_key: Some(key.into()),
                ..Default::default()
            },
            0,
            || panic!("no key is made for a client that has one"),
        )
    };
    bad(with_key(&mut s, "not a key").map(|(g, _)| g), "public key");
    bad(with_key(&mut s, "AAAA").map(|(g, _)| g), "32-byte");
    let (own, _) = with_key(&mut s, &wg_key(5)).unwrap();
    assert_eq!(own.gateway.public_key, wg_key(5));
    assert!(!own.config.lines().any(|l| l.starts_with("PrivateKey")));
    assert!(own.config.contains(&format!(
        "# PrivateKey = the private key of {}\n",
        wg_key(5)
    )));
    // An offline host takes none; nor does any host once none is online with an endpoint.
    s.host_offline("h2", 0);
    assert!(matches!(
        gateway(&mut s, "y", "red", Some("h2"), None),
        Err(ApiError::Unavailable(_))
    ));
    assert!(matches!(
        gateway(&mut s, "y", "red", None, None),
        Err(ApiError::Unavailable(_))
    ));
    // Nothing refused left a trace.
    assert_eq!(s.gateways.keys().collect::<Vec<_>>(), vec!["laptop", "own"]);
}

#[test]
fn a_host_says_in_its_hello_whether_it_takes_clients() {
    let mut s = state_with_host();
    gateway_host(&mut s, "h2", 2);
    assert_eq!(s.hosts["h2"].gateway.as_ref().unwrap().port, 51820);
    // Back without an endpoint: none.
    let (batch, refused) = s.host_gateway("h2", None);
    assert_eq!(
        (format!("{batch:?}"), refused),
        ("[(\"hosts\", \"h2\")]".into(), None)
    );
    assert_eq!(s.hosts["h2"].gateway, None);
    // A key that is not one is not taken.
    let bad = vane_proto::api::GatewayEndpoint {
        public_key: "nope".into(),
        port: 51820,
    };
    let (_, refused) = s.host_gateway("h2", Some(bad));
    assert!(refused.is_some());
    assert_eq!(s.hosts["h2"].gateway, None);

    // A host with gateways is not forgotten without --force; evicted, they go with it.
    gateway_host(&mut s, "h2", 2);
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    gateway(&mut s, "laptop", "red", None, None).unwrap();
    gateway(&mut s, "phone", "red", None, None).unwrap();
    s.host_offline("h2", 0);
    let e = s.remove_host("h2", false).unwrap_err();
    assert!(e.to_string().contains("gateways: laptop, phone"), "{e}");
    let batch = s.remove_host("h2", true).unwrap();
    assert!(format!("{batch:?}").contains("(\"gateways\", \"phone\")"));
    assert!(s.gateways.is_empty());
}

/// A gateway is a member of its net on its host in every view of the net; only its host's
/// view lists it as a gateway to serve; the cache agrees with `view_for` as gateways come
/// and go.
#[test]
fn gateways_are_members_in_views_and_served_by_their_host() {
    use super::ViewCache;
    let mut s = state_with_host();
    s.host_online("h1", None, Some(&"01".repeat(32)), 0);
    gateway_host(&mut s, "h2", 2);
    gateway_host(&mut s, "h3", 3);
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
    run(&mut s, "web1", "red", None).unwrap(); // on h1
    let hosts = ["h1", "h2", "h3"];
    let mut cache = super::views::ViewCache::default();
    let keys = |cache: &mut ViewCache, s: &State| {
        cache.refresh(s);
        for h in hosts {
            assert_eq!(cache.view(s, h), s.view_for(h), "view of {h}");
        }
        hosts.map(|h| cache.key(s, h))
    };
    let k0 = keys(&mut cache, &s);
    assert!(s.view_for("h2").members.is_empty());

    let g = gateway(&mut s, "laptop", "red", Some("h2"), None)
        .unwrap()
        .gateway;
    let k1 = keys(&mut cache, &s);
    assert_ne!(k1[0], k0[0], "h1 has red: a new member");
    assert_ne!(k1[1], k0[1], "h2 serves it");
    assert_eq!(k1[2], k0[2], "h3 has nothing of red");
    let red = s.nets["red"].id;
    let member = vane_proto::stream::Member {
        net: red,
        ip: g.ip,
        name: "laptop".into(),
        hostname: "laptop".into(),
        host: "h2".into(),
        host_id: s.hosts["h2"].id,
        instance: String::new(),
        moving_to: None,
        gateway: true,
    };
    let h1 = s.view_for("h1");
    assert!(h1.members.contains(&member));
    assert!(h1.gateways.is_empty());
    let h2 = s.view_for("h2");
    assert_eq!(
        h2.nets.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["red"]
    );
    assert_eq!(h2.members.len(), 2, "web1 and the gateway");
    assert_eq!(
        h2.gateways,
        vec![vane_proto::stream::GatewayView {
            net: red,
            name: "laptop".into(),
            ip: g.ip,
            resolver: g.resolver,
            public_key: g.public_key.clone(),
        }]
    );
    // A switch's miss finds it, from hosts that have its net.
    assert_eq!(s.lookup("h1", red, g.ip), Some(member.clone()));
    assert_eq!(s.lookup("h3", red, g.ip), None);

    // A policy from green to red: a host with green sees the gateway too.
    s.add_policy(PolicySpec {
        from: "green".into(),
        to: "red".into(),
        port: None,
    })
    .unwrap();
    let k2 = keys(&mut cache, &s);
    assert_ne!(k2[0], k1[0]);

    // Its host dead: still a member, and still served there when it is back.
    s.hosts.get_mut("h2").unwrap().state = vane_proto::api::HostState::Dead;
    let k3 = keys(&mut cache, &s);
    assert!(s.view_for("h1").members.contains(&member));
    assert_eq!(s.view_for("h2").gateways.len(), 1);
    assert_ne!(k3[0], k2[0], "h2 left the peers");

    // Removed: out of every view at once.
    s.remove_gateway("laptop").unwrap();
    let k4 = keys(&mut cache, &s);
    assert_ne!(k4[0], k3[0]);
    assert_ne!(k4[1], k3[1]);
    assert!(!s.view_for("h1").members.iter().any(|m| m.gateway));
    assert!(s.view_for("h2").gateways.is_empty());
    assert!(s.view_for("h2").members.is_empty());
    assert_eq!(s.lookup("h1", red, g.ip), None);
}

#[test]
fn outside_policies_reach_the_views_of_their_net_and_name_no_net() {
    let mut s = state_with_host();
    net(&mut s, "red", "10.10.2.0/24", "a").unwrap();
    net(&mut s, "green", "10.20.0.0/24", "a").unwrap();
    run(&mut s, "web1", "red", None).unwrap();
    let allow = |s: &mut State, from: &str, to: &str| {
        s.add_policy(PolicySpec {
            from: from.into(),
            to: to.into(),
            port: Some("80/tcp".parse::<PortSpec>().unwrap()),
        })
    };
    let (p, _) = allow(&mut s, "198.51.100.7/24", "red").unwrap();
    assert_eq!(p.from, "198.51.100.0/24", "kept as its network");
    assert!(matches!(
        allow(&mut s, "198.51.100.0/24", "red"),
        Err(ApiError::Conflict(_))
    ));
    let e = allow(&mut s, "198.51.100.0/33", "red").unwrap_err();
    assert!(e.to_string().contains("198.51.100.0/33"), "{e}");
    assert!(matches!(
        allow(&mut s, "203.0.113.0/24", "nope"),
        Err(ApiError::NotFound(_))
    ));
    allow(&mut s, "203.0.113.0/24", "green").unwrap();

    let v = s.view_for("h1");
    let names: Vec<&str> = v.nets.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["red"], "an address range brings no net");
    assert!(v.policies.is_empty());
    let red = s.nets["red"].id;
    assert_eq!(
        v.outside,
        vec![vane_proto::stream::OutsidePolicy {
            from: "198.51.100.0/24".parse().unwrap(),
            to: red,
            port: Some("80/tcp".parse().unwrap()),
        }]
    );
    // The cache makes the same view.
    let mut cache = super::views::ViewCache::default();
    cache.refresh(&s);
    assert_eq!(cache.view(&s, "h1").outside, v.outside);
    // A net named in an outside policy is not removed under it.
    let e = s.remove_net("green").unwrap_err();
    assert!(e.to_string().contains("policies"), "{e}");
}

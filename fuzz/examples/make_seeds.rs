//! Writes the seed corpus of the fuzz targets: well-formed packets, frames, tunnel
//! messages and control-stream and API messages, built with the project's own types where
//! it has them so that the seeds follow the code. Run from the repository root with
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`; it (re)writes the
//! `seed-*` files of `fuzz/corpus/<target>/` and touches nothing else. The seeds of
//! `vnet_coalescer`, whose input `arbitrary` decodes, are inputs a run found instead.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use vane_fuzz::{
    icmp_echo, ipv4, record, tcp, udp, ACK, FIN, PROTO_ICMP, PROTO_TCP, PROTO_UDP, PSH, SYN,
};
use vane_proto::api::{
    frame, ClusterConfig, CredentialSpec, ExecSpec, ExitStatus, Instance, InstanceState, Limits,
    MigrateSpec, Net, NetSpec, PolicySpec, RestartPolicy, RestoreSpec, RunSpec, SnapshotSpec,
    SpaceSpec, Template, TokenSpec,
};
use vane_proto::stream::{
    AgentError, AgentReply, AgentRequest, AgentView, FromAgent, HostAuth, InstanceReport,
    InstanceSpec, Member, Peer, PolicyRule, ToAgent,
};
use vane_proto::validate::{PortSpec, Proto};
use vane_tunnel::{Config, Keypair, Seal, Tunnels};
use vane_wire::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, VNET_HDR_LEN};

const A1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const A2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const A_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
const B1: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const B_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 9);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const EGRESS_OF_PORT_0: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
}

fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("encodes")
}

fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    ipv4(
        PROTO_TCP,
        src,
        dst,
        1,
        &tcp(40000, dport, 1000, flags, payload),
    )
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    ipv4(PROTO_UDP, src, dst, 2, &udp(5353, dport, b"query"))
}

fn ping(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4(PROTO_ICMP, src, dst, 3, &icmp_echo(77, b"ping"))
}

/// `p` with 4 bytes of IP options (NOPs) and its header checksum made again.
fn with_ip_options(mut p: Vec<u8>) -> Vec<u8> {
    p.splice(20..20, [1u8; 4]);
    p[0] = 0x46;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[10..12].fill(0);
    let sum = vane_fuzz::internet_checksum(&p[..24], 0);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn ipv4_seeds() {
    let cases = [
        ("tcp-syn", 0, tcp_packet(A1, A2, 80, SYN, b"GET /")),
        ("udp-dst", 1, udp_packet(A1, B1, 53)),
        ("icmp-echo", 0, ping(A1, OUTSIDE)),
        ("ip-options", 1, with_ip_options(udp_packet(A1, A2, 53))),
    ];
    for (name, rewrite, packet) in cases {
        let mut input = vec![rewrite];
        input.extend_from_slice(&EGRESS_OF_PORT_0.octets());
        input.extend_from_slice(&packet);
        write("ipv4_packet", name, &input);
    }
    let mut fragment = tcp_packet(A1, A2, 80, ACK, b"0123456789abcdef");
    fragment[6..8].copy_from_slice(&(0x2000u16 | 2).to_be_bytes());
    let mut input = vec![0, 100, 64, 0, 2];
    input.extend_from_slice(&fragment);
    write("ipv4_packet", "fragment", &input);
}

fn vnet_seeds() {
    let payload: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    let gso = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 200,
        csum_start: 20,
        csum_offset: 16,
    };
    let cases = [
        (
            "gso-tcp",
            gso,
            tcp_packet(A1, A2, 80, ACK | PSH | FIN, &payload),
        ),
        (
            "gso-ecn-cwr",
            VnetHdr {
                gso_type: GSO_TCPV4 | GSO_ECN,
                gso_size: 256,
                ..gso
            },
            tcp_packet(A1, A2, 80, ACK | 0x80, &payload),
        ),
        (
            "partial-udp",
            VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 20,
                csum_offset: 6,
                ..VnetHdr::PLAIN
            },
            udp_packet(A1, A2, 53),
        ),
        (
            "plain-syn",
            VnetHdr::PLAIN,
            tcp_packet(A1, A2, 80, SYN, b""),
        ),
    ];
    for (name, hdr, packet) in cases {
        let mut input = vec![0u8; VNET_HDR_LEN];
        assert!(hdr.write(&mut input));
        input.extend_from_slice(&packet);
        write("vnet_segments", name, &input);
    }
}

fn overlay_seeds() {
    let packet = udp_packet(A_REMOTE, A1, 53);
    let mut frame = vec![0u8; vane_wire::overlay::NETS_LEN];
    assert!(vane_wire::overlay::write_nets(&mut frame, 1, 1, 0));
    frame.extend_from_slice(&packet);
    write("overlay_frame", "frame", &frame);
    let mut partial = frame.clone();
    partial[0] = vane_wire::overlay::FLAG_CSUM_PARTIAL;
    let mut datagram = vec![0u8; vane_wire::overlay::PLAIN_HEADER_LEN];
    assert!(vane_wire::overlay::write_plain_header(&mut datagram, 7));
    datagram.extend_from_slice(&partial);
    write("overlay_frame", "plain-datagram", &datagram);

    let mut big = tcp_packet(A1, A2, 80, ACK, &[0x55; 200]);
    big[6] |= 0x40; // DF
    let mut input = 1420u16.to_be_bytes().to_vec();
    input.extend_from_slice(&128u16.to_be_bytes());
    input.extend_from_slice(&big);
    write("icmp_frag_needed", "tcp-df", &input);
    let mut input = 576u16.to_be_bytes().to_vec();
    input.extend_from_slice(&40u16.to_be_bytes());
    input.extend_from_slice(&with_ip_options(udp_packet(A1, A2, 53)));
    write("icmp_frag_needed", "short-room", &input);
}

/// Records for the switch target: `tag` 0 from a port, 1 from the tunnel, 2 from outside,
/// 3 time, 4 and 5 changes (see its source).
fn switch_seeds() {
    let from_port = |port: u8, packet: Vec<u8>| record(0, &[vec![port], packet].concat());
    let from_tunnel = |host: u8, src_net: u8, dst_net: u8, packet: Vec<u8>| {
        record(1, &[vec![host, src_net, dst_net], packet].concat())
    };
    let within_net = [
        from_port(0, tcp_packet(A1, A2, 80, SYN, b"")),
        from_port(0, udp_packet(A1, A_REMOTE, 53)),
        from_tunnel(0, 0, 0, tcp_packet(A_REMOTE, A1, 22, SYN, b"")),
        from_port(1, ping(A2, A1)),
    ]
    .concat();
    write("switch", "within-net", &within_net);
    let across_nets = [
        from_port(0, tcp_packet(A1, B1, 80, SYN, b"")),
        from_port(
            2,
            ipv4(PROTO_TCP, B1, A1, 9, &tcp(80, 40000, 5, SYN | ACK, b"")),
        ),
        from_tunnel(1, 1, 0, udp_packet(B_REMOTE, A1, 53)),
        record(3, &[0, 100]),
        from_port(0, ping(A1, B1)),
    ]
    .concat();
    write("switch", "across-nets", &across_nets);
    let egress = [
        from_port(0, udp_packet(A1, OUTSIDE, 53)),
        record(
            2,
            &ipv4(
                PROTO_UDP,
                OUTSIDE,
                EGRESS_OF_PORT_0,
                4,
                &udp(53, 5353, b"answer"),
            ),
        ),
        from_port(2, udp_packet(B1, OUTSIDE, 53)),
        record(4, &[2, 0, 1]),
        from_port(0, udp_packet(A1, OUTSIDE, 53)),
    ]
    .concat();
    write("switch", "egress", &egress);
}

/// Input for node_pair: a mode byte (1: plaintext cluster), then records: 0 a device
/// packet (selector: host in bit 0, then instance A, B or egress), 1 an exchange, 2 an
/// altered datagram, 3 a raw one, 4 time, 5 the directory, 6 a hold (see its source).
fn node_seeds() {
    let vnet = |hdr: VnetHdr, packet: Vec<u8>| {
        let mut read = vec![0u8; VNET_HDR_LEN];
        assert!(hdr.write(&mut read));
        read.extend_from_slice(&packet);
        read
    };
    let device = |sel: u8, hdr: VnetHdr, packet: Vec<u8>| {
        record(0, &[vec![sel], vnet(hdr, packet)].concat())
    };
    let plain = VnetHdr::PLAIN;
    let a1 = Ipv4Addr::new(10, 1, 0, 1);
    let a2 = Ipv4Addr::new(10, 1, 0, 2);
    let b2 = Ipv4Addr::new(10, 2, 0, 2);
    let exchange = record(1, &[]);
    let payload: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    let gso = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 200,
        csum_start: 20,
        csum_offset: 16,
    };
    let conversation = [
        device(0, plain, udp_packet(a1, a2, 53)),
        exchange.clone(),
        device(
            1,
            plain,
            ipv4(PROTO_UDP, a2, a1, 5, &udp(53, 5353, b"answer")),
        ),
        exchange.clone(),
        device(0, gso, tcp_packet(a1, a2, 80, ACK | PSH, &payload)),
        exchange.clone(),
        record(2, &[0, 3, 0, 40, 0x01]),
        record(3, &[0, 3, 0, 0, 0]),
        record(4, &[0x0b, 0xb8]),
        record(6, &[5]),
        device(1, plain, udp_packet(a2, a1, 53)),
        exchange.clone(),
    ]
    .concat();
    for (mode, name) in [(0u8, "encrypted"), (1, "plaintext")] {
        write(
            "node_pair",
            name,
            &[vec![mode], conversation.clone()].concat(),
        );
    }
    let across_and_out = [
        device(0, plain, tcp_packet(a1, b2, 80, SYN, b"")),
        exchange.clone(),
        device(
            3,
            plain,
            ipv4(PROTO_TCP, b2, a1, 6, &tcp(80, 40000, 9, SYN | ACK, b"")),
        ),
        exchange.clone(),
        device(0, plain, udp_packet(a1, OUTSIDE, 53)),
        device(
            4,
            plain,
            ipv4(
                PROTO_UDP,
                OUTSIDE,
                Ipv4Addr::new(100, 64, 0, 2),
                7,
                &udp(53, 5353, b"from outside"),
            ),
        ),
        device(0, plain, udp_packet(a1, Ipv4Addr::new(10, 1, 0, 77), 53)),
        record(5, &[2]),
        exchange,
    ]
    .concat();
    write(
        "node_pair",
        "across-nets-egress-lookup",
        &[vec![0], across_and_out].concat(),
    );
}

fn keys(i: u8) -> Keypair {
    Keypair::from_private([i + 1; 32])
}

/// An initiation from the peer the tunnel targets use (host 0) to their endpoint (host 1):
/// what a replay of a captured one looks like.
fn captured_initiation() -> Vec<u8> {
    let mut t = Tunnels::new(Config::default(), keys(0));
    t.set_peer(1, keys(1).public);
    let mut out = [0u8; 256];
    let wall = 1_700_000_000_000_000_000 + 5_000_000_000;
    match t.seal(1, b"", &mut out, Instant::now(), wall) {
        Seal::Handshake(n) => out[..n].to_vec(),
        other => panic!("expected an initiation, got {other:?}"),
    }
}

/// Records for the tunnel targets (see their sources for the tags).
fn tunnel_seeds() {
    let initiation = captured_initiation();
    write(
        "tunnel_responder",
        "genuine-handshake",
        &[record(3, &[0, 0]), record(4, &[]), record(3, &[1, 0])].concat(),
    );
    write(
        "tunnel_responder",
        "captured-initiation",
        &[
            record(0, &[[0].as_slice(), &initiation].concat()),
            record(0, &[[1].as_slice(), &initiation].concat()),
        ]
        .concat(),
    );
    write(
        "tunnel_responder",
        "shaped",
        &[
            record(1, &[0, 0, 0xaa, 0xbb]),
            record(1, &[0, 2, 0xcc]),
            record(1, &[0, 3]),
            record(1, &[0, 4, 0, 0, 0, 0, 0, 0, 0, 1]),
        ]
        .concat(),
    );
    write(
        "tunnel_responder",
        "flood",
        &[
            record(2, &[2, 120, 0x55]),
            record(3, &[0, 0]),
            record(5, &[4, 0]),
            record(3, &[0, 0]),
        ]
        .concat(),
    );

    let ops = [
        record(0, b"\0\0first"),
        record(0, b"\0\0second"),
        record(1, &[0, 1]),
        record(1, &[0, 0]),
        record(1, &[0, 0]),
        record(2, &[0, 1, 0, 20, 0x01]),
        record(
            3,
            &[[0, 0, 0, 0, 0, 0, 0, 7].as_slice(), &[0x42; 30]].concat(),
        ),
        record(6, b"\0\0back"),
    ]
    .concat();
    write("tunnel_session", "deliver-alter-forge", &ops);
    let rekey = [
        record(0, b"\0\0before"),
        record(5, &[0x30, 0x00]),
        record(0, b"\0\0after"),
        record(1, &[0, 1]),
        record(1, &[0, 0]),
    ]
    .concat();
    write("tunnel_session", "rekey", &rekey);
}

fn net() -> Net {
    Net {
        id: 1,
        name: "web".into(),
        tenant: "default".into(),
        subnet: "10.1.0.0/16".parse().unwrap(),
        egress: true,
        created: 1_700_000_000,
    }
}

fn space() -> SpaceSpec {
    SpaceSpec {
        rootfs: Some("/srv/root".into()),
        volumes: vec![vane_proto::api::Volume {
            host: "/srv/data".into(),
            inside: "/data".into(),
            shared: true,
        }],
        redirects: vec![("/etc/app.conf".into(), "{state}/app.conf".into())],
        cap_add: vec!["NET_ADMIN".into()],
        cap_drop: vec!["ALL".into()],
        privileged: false,
    }
}

fn limits() -> Limits {
    Limits {
        memory: Some(256 << 20),
        cpu_millis: Some(500),
        pids: Some(100),
        bandwidth: Some(50_000_000),
    }
}

fn instance() -> Instance {
    Instance {
        id: "i-1".into(),
        name: "web-1".into(),
        net: "web".into(),
        ip: A1,
        hostname: "web-1".into(),
        host: "h1".into(),
        cmd: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
        env: vec![("KEY".into(), "value".into())],
        state: InstanceState::Running,
        pid: Some(42),
        exit: None,
        created: 1_700_000_000,
        template: None,
        limits: limits(),
        space: space(),
        publish: vec![published()],
        service: Some("front".into()),
        request: Some("0123456789abcdef0123456789abcdef".into()),
        migrating: None,
        progress: None,
        migrations: Vec::new(),
        restart: RestartPolicy::Always,
        restarts: 2,
        restart_reason: Some("host h2 died".into()),
        stopped: false,
        checkpoint_every: Some(30),
        checkpointed: Some(1_700_000_100),
    }
}

/// A published port with every field set.
fn published() -> vane_proto::validate::Publish {
    "192.0.2.1:8080:80/tcp".parse().unwrap()
}

fn control_seeds() {
    let spec = InstanceSpec {
        id: "i-1".into(),
        name: "web-1".into(),
        net: net(),
        ip: A1,
        hostname: "web-1".into(),
        cmd: vec!["/bin/true".into()],
        env: vec![("HOME".into(), "{state}".into())],
        limits: limits(),
        space: space(),
        publish: vec![published()],
    };
    let to_agent = [
        (
            "welcome",
            ToAgent::Welcome {
                host_id: 3,
                config: ClusterConfig::default(),
                credential: Some("vanecred-x".into()),
                stale: vec!["i-2".into()],
            },
        ),
        (
            "refused",
            ToAgent::Refused {
                reason: "bad token".into(),
            },
        ),
        (
            "resolved",
            ToAgent::Resolved {
                net: 1,
                ip: A2,
                member: None,
            },
        ),
        (
            "create",
            ToAgent::Request {
                id: 9,
                body: AgentRequest::Create {
                    instance: Box::new(spec),
                },
            },
        ),
        (
            "exec",
            ToAgent::Request {
                id: 10,
                body: AgentRequest::Exec {
                    id: "i-1".into(),
                    ticket: "t".into(),
                    cmd: vec!["ls".into()],
                    env: Vec::new(),
                    stdin: true,
                    tty: Some(vane_proto::api::TtySize { rows: 24, cols: 80 }),
                },
            },
        ),
        (
            "view",
            ToAgent::View(AgentView {
                revision: vane_proto::stream::ViewRevision { term: 4, seq: 17 },
                services: vec![vane_proto::stream::ServiceView {
                    net: 1,
                    name: "front".into(),
                    vip: "10.1.0.254".parse().unwrap(),
                    ports: vec!["80/tcp".parse().unwrap()],
                    backends: vec![A1],
                }],
                peers: vec![Peer {
                    id: 2,
                    name: "h2".into(),
                    locator: Some("192.0.2.2:7947".parse().unwrap()),
                    public_key: vane_proto::hex::encode(&[7u8; 32]),
                }],
                nets: vec![net()],
                members: vec![Member {
                    net: 1,
                    ip: A2,
                    name: "web-2".into(),
                    hostname: "web-2".into(),
                    host: "h2".into(),
                    host_id: 2,
                    instance: "i-2".into(),
                    moving_to: Some(1),
                    gateway: false,
                }],
                policies: vec![PolicyRule {
                    from: 1,
                    to: 2,
                    port: Some(PortSpec {
                        port: 80,
                        proto: Proto::Tcp,
                    }),
                }],
                outside: vec![vane_proto::stream::OutsidePolicy {
                    from: "198.51.100.0/24".parse().unwrap(),
                    to: 1,
                    port: None,
                }],
                gateways: vec![vane_proto::stream::GatewayView {
                    net: 1,
                    name: "laptop".into(),
                    ip: "10.1.0.9".parse().unwrap(),
                    resolver: "10.1.0.253".parse().unwrap(),
                    public_key: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
                }],
            }),
        ),
    ];
    for (name, msg) in to_agent {
        write("control_stream", &format!("to-agent-{name}"), &json(&msg));
    }
    let report = InstanceReport {
        id: "i-1".into(),
        state: InstanceState::Exited,
        pid: None,
        exit: Some(ExitStatus {
            code: Some(1),
            signal: None,
            at: 1_700_000_100,
            oom: false,
        }),
    };
    let from_agent = [
        (
            "hello",
            FromAgent::Hello {
                name: "h1".into(),
                locator: Some("192.0.2.1:7947".parse().unwrap()),
                public_key: vane_proto::hex::encode(&[9u8; 32]),
                gateway: Some(vane_proto::api::GatewayEndpoint {
                    public_key: "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=".into(),
                    port: 51820,
                }),
                auth: HostAuth::Token("vanejoin-abc".into()),
                instances: vec![report.clone()],
            },
        ),
        ("lookup", FromAgent::Lookup { net: 1, ip: A2 }),
        (
            "created",
            FromAgent::Response {
                id: 9,
                result: Ok(AgentReply::Created { pid: 42 }),
            },
        ),
        (
            "error",
            FromAgent::Response {
                id: 10,
                result: Err(AgentError::not_found("no such instance")),
            },
        ),
        (
            "progress",
            FromAgent::Progress {
                id: 11,
                bytes: 4096,
            },
        ),
        ("report", FromAgent::Report(report)),
    ];
    for (name, msg) in from_agent {
        write("control_stream", &format!("from-agent-{name}"), &json(&msg));
    }
}

fn api_seeds() {
    let bodies = [
        (
            "net",
            json(&NetSpec {
                name: "web".into(),
                subnet: "10.1.0.0/16".parse().unwrap(),
                tenant: "default".into(),
                egress: true,
            }),
        ),
        (
            "token",
            json(&TokenSpec {
                ttl_secs: 3600,
                reusable: true,
            }),
        ),
        (
            "credential",
            json(&CredentialSpec {
                tenant: "acme".into(),
                ttl_secs: Some(60),
            }),
        ),
        (
            "run",
            json(&RunSpec {
                name: Some("web-1".into()),
                net: "web".into(),
                ip: Some(A1),
                hostname: None,
                host: Some("h1".into()),
                env: vec![("A".into(), "{ip}".into())],
                cmd: vec!["/bin/sh".into()],
                template: Some("small".into()),
                limits: limits(),
                space: space(),
                restart: RestartPolicy::OnFailure,
                publish: vec![published()],
                service: Some("front".into()),
                checkpoint_every: Some(30),
            }),
        ),
        (
            "migrate",
            json(&MigrateSpec {
                to: "h2".into(),
                post_copy: true,
            }),
        ),
        ("snapshot", json(&SnapshotSpec { stop: true })),
        (
            "restore",
            json(&RestoreSpec {
                instance: instance(),
                seal: "00ff".into(),
                images_bytes: 1024,
                host: None,
                name: Some("clone".into()),
                ip: None,
                hostname: None,
            }),
        ),
        (
            "exec",
            json(&ExecSpec {
                cmd: vec!["ls".into(), "-l".into()],
                env: Vec::new(),
                stdin: true,
                tty: Some(vane_proto::api::TtySize { rows: 24, cols: 80 }),
            }),
        ),
        (
            "policy",
            json(&PolicySpec {
                from: "web".into(),
                to: "db".into(),
                port: Some(PortSpec {
                    port: 5432,
                    proto: Proto::Tcp,
                }),
            }),
        ),
        (
            "template",
            json(&Template {
                name: "small".into(),
                tenant: None,
                limits: limits(),
                env: Vec::new(),
                space: space(),
            }),
        ),
    ];
    for (name, body) in &bodies {
        write("api_requests", name, body);
    }

    let mut exec = Vec::new();
    frame::encode(&mut exec, frame::STDOUT, b"hello\n");
    frame::encode(&mut exec, frame::STDERR, b"warning\n");
    frame::encode(&mut exec, frame::EXIT, &0i32.to_be_bytes());
    write("stream_frames", "exec", &exec);
    let restore = &bodies
        .iter()
        .find(|(name, _)| *name == "restore")
        .unwrap()
        .1;
    let mut snapshot = frame::encoded(frame::RECORD, restore);
    frame::encode(&mut snapshot, frame::IMAGES, &[0x1f, 0x8b, 8, 0, 0, 0]);
    write("stream_frames", "restore", &snapshot);
    write(
        "stream_frames",
        "error",
        &frame::encoded(frame::ERROR, b"no such instance"),
    );
}

fn text_seeds() {
    let pin = [0xab; 32];
    write(
        "join_token",
        "token",
        vane_proto::trust::join_token("vanejoin-0123456789", &pin).as_bytes(),
    );
    write(
        "join_token",
        "key-hex",
        vane_proto::hex::encode(&[0x5a; 32]).as_bytes(),
    );
    let inputs = [
        ("name", "web-1"),
        ("hostname", "db.internal.example"),
        ("port", "53/udp"),
        ("env", "PATH=/usr/bin:{state}/bin"),
        ("size", "1.5GiB"),
        ("rate", "50Mbit"),
        ("cpus", "0.5"),
        ("pids", "100"),
        ("redirect", "/etc/app.conf={state}/app.conf"),
        ("volume", "/srv/{name}:/data"),
        ("rootfs", "/var/lib/root"),
        ("capabilities", "NET_ADMIN,cap_sys_time|ALL,KILL"),
    ];
    for (name, s) in inputs {
        write("validate", name, s.as_bytes());
    }
}

fn main() {
    ipv4_seeds();
    vnet_seeds();
    overlay_seeds();
    switch_seeds();
    tunnel_seeds();
    node_seeds();
    control_seeds();
    api_seeds();
    text_seeds();
}

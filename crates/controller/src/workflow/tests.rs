//! The workflows step by step against scripted agents, in-process and without root: which
//! agent is asked what, in which order, and what each failure leaves in the directory.
//! (The same workflows run for real on labs in crates/vane/tests.)

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use axum::body::Bytes;
use futures_util::future::BoxFuture;

use vane_proto::api::{ClusterConfig, Instance, InstanceState, MigrateSpec, NetSpec, RunSpec};
use vane_proto::stream::{AgentReply, AgentRequest};

use crate::agents::{AgentLink, Agents};
use crate::state::ApiError;
use crate::transfers::{self, Piece, Side};
use crate::{Controller, ControllerConfig};

type Script = dyn Fn(&str, &AgentRequest) -> Result<AgentReply, ApiError> + Send + Sync;

/// Agents that answer from a script, and remember what they were asked. Images that go
/// through the controller (`SendImages`, `ReceiveImages` without a peer) move over its
/// transfers as a real agent's do, once the script has agreed to the request.
pub(super) struct Scripted {
    pub(super) online: Mutex<BTreeSet<String>>,
    asked: Mutex<Vec<String>>,
    script: Box<Script>,
    /// `(host, request kind)`: that host's agent stops when asked that, before answering.
    pub(super) dies_at: Mutex<Option<(String, String)>>,
    /// The pieces of packed images an agent sends through the controller.
    pub(super) images: Mutex<Vec<Bytes>>,
    /// The images agents received through the controller up to their end, with the host.
    pub(super) received: Mutex<Vec<(String, Vec<u8>)>>,
    /// Whose transfers the images go through.
    controller: OnceLock<Weak<Controller>>,
}

impl Scripted {
    /// What the agents were asked since the last call, as `host Request`.
    pub(super) fn asked(&self) -> Vec<String> {
        std::mem::take(&mut *self.asked.lock().unwrap())
    }

    /// The agent's end of transfer `ticket`, claimed as `host`'s.
    fn claim(&self, host: &str, ticket: &str) -> Result<Side, ApiError> {
        let c = self.controller.get().and_then(Weak::upgrade);
        c.and_then(|c| c.transfers.claim(ticket, host))
            .map(transfers::Claimed::side)
            .ok_or_else(|| ApiError::NotFound(format!("no transfer {ticket} for host {host}")))
    }

    /// Sends `images` over transfer `ticket`, then its end.
    async fn send_images(&self, host: &str, ticket: &str) -> Result<(), ApiError> {
        let Side::FromAgent(tx) = self.claim(host, ticket)? else {
            return Err(ApiError::BadRequest("a transfer to the agent".into()));
        };
        let pieces = self.images.lock().unwrap().clone();
        for piece in pieces.into_iter().map(Piece::Data).chain([Piece::End]) {
            if tx.send(piece).await.is_err() {
                return Err(ApiError::Unavailable(
                    "nobody waits for the images any more".into(),
                ));
            }
        }
        Ok(())
    }

    /// Takes the images of transfer `ticket` up to their end (into `received`).
    async fn receive_images(&self, host: &str, ticket: &str) -> Result<(), ApiError> {
        let Side::ToAgent(mut rx) = self.claim(host, ticket)? else {
            return Err(ApiError::BadRequest("a transfer from the agent".into()));
        };
        let mut got = Vec::new();
        while let Piece::Data(d) = transfers::next(&mut rx).await? {
            got.extend_from_slice(&d);
        }
        self.received.lock().unwrap().push((host.to_string(), got));
        Ok(())
    }
}

/// The name of a request's kind (`Checkpoint`, `Restore`, ...).
fn kind(req: &AgentRequest) -> String {
    let debug = format!("{req:?}");
    debug
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

impl AgentLink for Scripted {
    fn is_connected(&self, host: &str) -> bool {
        self.online.lock().unwrap().contains(host)
    }

    fn request_watched<'a>(
        &'a self,
        host: &'a str,
        body: AgentRequest,
        _timeout: Duration,
        _on_progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<AgentReply, ApiError>> {
        self.asked
            .lock()
            .unwrap()
            .push(format!("{host} {}", kind(&body)));
        let dies = self.dies_at.lock().unwrap().as_ref() == Some(&(host.into(), kind(&body)));
        let answer = if dies {
            self.online.lock().unwrap().remove(host);
            Err(ApiError::Unavailable(format!(
                "host {host:?} disconnected before answering"
            )))
        } else if self.is_connected(host) {
            (self.script)(host, &body)
        } else {
            Err(ApiError::Unavailable(format!("host {host:?} is offline")))
        };
        Box::pin(async move {
            let reply = answer?;
            match body {
                AgentRequest::SendImages {
                    ticket, to: None, ..
                } => self.send_images(host, &ticket).await?,
                AgentRequest::ReceiveImages {
                    ticket, from: None, ..
                } => self.receive_images(host, &ticket).await?,
                _ => {}
            }
            Ok(reply)
        })
    }
}

/// A controller on a fresh store with hosts h1 and h2 online (keys and locators known, so
/// images go host to host), net `red`, and instance `srv` running on h1 as pid 100. An
/// agent that sends images through the controller sends [`images`].
pub(super) struct Cluster {
    pub(super) c: Arc<Controller>,
    pub(super) agents: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

/// The packed images agents send through the controller: 4096 bytes (what `agreeable`
/// dumps) in four pieces, each of its own bytes.
pub(super) fn images() -> Vec<Bytes> {
    (1..=4u8).map(|i| Bytes::from(vec![i; 1024])).collect()
}

pub(super) async fn cluster(
    script: impl Fn(&str, &AgentRequest) -> Result<AgentReply, ApiError> + Send + Sync + 'static,
) -> Cluster {
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
    let agents = Arc::new(Scripted {
        online: Mutex::new(["h1".to_string(), "h2".to_string()].into()),
        asked: Mutex::new(Vec::new()),
        dies_at: Mutex::new(None),
        images: Mutex::new(images()),
        received: Mutex::new(Vec::new()),
        controller: OnceLock::new(),
        script: Box::new(move |host, req| match req {
            AgentRequest::Create { instance } if instance.name == "srv" => {
                Ok(AgentReply::Created { pid: 100 })
            }
            _ => script(host, req),
        }),
    });
    let store = crate::store::Store::open(&cfg.store, &cfg.data_dir).unwrap();
    let c = Controller::open_with(
        &cfg,
        [0; 32],
        store,
        Arc::new(Agents::default()),
        agents.clone(),
    )
    .unwrap();
    {
        let mut s = c.state();
        for (host, last) in [("h1", 1), ("h2", 2)] {
            let locator = format!("198.18.0.{last}:7947").parse().unwrap();
            let key = format!("{last:02x}").repeat(32);
            let batch = s.host_online(host, Some(locator), Some(&key), 0);
            c.commit(batch).unwrap();
        }
        let net = NetSpec {
            name: "red".into(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            tenant: "default".into(),
            egress: false,
        };
        let (_, batch) = s.create_net(net, 0).unwrap();
        c.commit(batch).unwrap();
    }
    let c = Arc::new(c);
    let _ = agents.controller.set(Arc::downgrade(&c));
    let run = RunSpec {
        name: Some("srv".into()),
        net: "red".into(),
        host: Some("h1".into()),
        cmd: vec!["server".into()],
        ..Default::default()
    };
    let inst = super::create(&c, run, None).await.unwrap();
    assert_eq!((inst.state, inst.pid), (InstanceState::Running, Some(100)));
    agents.asked();
    Cluster {
        c,
        agents,
        _dir: dir,
    }
}

impl Cluster {
    pub(super) fn srv(&self) -> Instance {
        self.c.state().instance_by_name("srv").unwrap().clone()
    }

    pub(super) async fn migrate(&self, to: &str, post_copy: bool) -> Result<Instance, ApiError> {
        let spec = MigrateSpec {
            to: to.into(),
            post_copy,
        };
        super::migrate(&self.c, "srv", spec).await
    }
}

pub(super) fn failed(what: &str) -> Result<AgentReply, ApiError> {
    Err(ApiError::Internal(what.into()))
}

/// Checkpoints of `bytes`, post-copy (lazy) when asked, and restores as pid 200.
pub(super) fn agreeable(_host: &str, req: &AgentRequest) -> Result<AgentReply, ApiError> {
    match req {
        AgentRequest::Checkpoint { lazy, .. } => Ok(AgentReply::Checkpointed {
            bytes: 4096,
            lazy: *lazy,
        }),
        AgentRequest::Restore { .. } => Ok(AgentReply::Created { pid: 200 }),
        _ => Ok(AgentReply::Done),
    }
}

/// The two requests of a transfer run at once: their order is the runtime's.
fn with_transfer_sorted(mut asked: Vec<String>) -> Vec<String> {
    if let Some(i) = asked.iter().position(|a| a.ends_with("Images")) {
        asked[i..i + 2].sort();
    }
    asked
}

#[tokio::test]
async fn a_migration_runs_its_steps_in_order_and_moves_the_instance() {
    let cl = cluster(agreeable).await;
    let moved = cl.migrate("h2", false).await.unwrap();
    assert_eq!(
        with_transfer_sorted(cl.agents.asked()),
        [
            "h2 Prepare",
            "h1 Checkpoint",
            "h1 SendImages",
            "h2 ReceiveImages",
            "h2 Restore",
            "h2 Sync",
            "h1 Remove"
        ]
    );
    let srv = cl.srv();
    assert_eq!((srv.host.as_str(), srv.pid), ("h2", Some(200)));
    assert_eq!(srv.state, InstanceState::Running);
    assert!(srv.migrating.is_none() && moved.migrating.is_none());
    assert_eq!(srv.migrations.len(), 1);
    let m = &srv.migrations[0];
    assert_eq!((m.from.as_str(), m.to.as_str()), ("h1", "h2"));
    assert_eq!((m.image_bytes, m.post_copy_ms), (4096, None));
    assert!(cl.c.with_progress(srv).progress.is_none());
    // Started, not failed, its freeze in the histogram.
    assert_eq!(cl.c.metrics.migrations(), (1, 0, 1));
}

/// While the instance is frozen, views mark its member moving and a switch's lookup for
/// it waits; once it runs on the destination (which has taken its view first: the `Sync`
/// after `Restore`), the lookups are answered, naming the destination.
#[tokio::test]
async fn lookups_for_a_frozen_instance_wait_until_it_runs_on_its_destination() {
    let during: Arc<std::sync::OnceLock<std::sync::Weak<Controller>>> = Default::default();
    let seen = Arc::new(Mutex::new(None));
    let (during2, seen2) = (during.clone(), seen.clone());
    let cl = cluster(move |host, req| {
        if let AgentRequest::Checkpoint { id, .. } = req {
            let c = during2.get().and_then(|c| c.upgrade()).expect("controller");
            let mut s = c.state();
            let srv = s.instances[id].clone();
            let net = s.nets[&srv.net].id;
            let moving = s
                .view_for("h1")
                .members
                .iter()
                .any(|m| m.instance == *id && m.moving_to.is_some());
            let answer = s.lookup_or_wait("h1", net, srv.ip);
            *seen2.lock().unwrap() = Some((moving, answer.is_none()));
        }
        agreeable(host, req)
    })
    .await;
    during.set(Arc::downgrade(&cl.c)).unwrap();
    cl.migrate("h2", false).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        Some((true, true)),
        "moving, lookup waits"
    );
    let srv = cl.srv();
    let mut s = cl.c.state();
    assert!(
        s.thaw(&srv.id).is_empty(),
        "the waiting lookup was answered"
    );
    let net = s.nets[&srv.net].id;
    let answer = s
        .lookup_or_wait("h2", net, srv.ip)
        .expect("answered at once");
    let member = answer.expect("a member");
    assert_eq!((member.host.as_str(), member.moving_to), ("h2", None));
}

#[tokio::test]
async fn a_post_copy_migration_releases_its_source_once_the_pages_are_through() {
    let cl = cluster(agreeable).await;
    cl.migrate("h2", true).await.unwrap();
    let asked = with_transfer_sorted(cl.agents.asked());
    assert_eq!(
        asked[4..],
        ["h2 Restore", "h2 Sync", "h1 AwaitPages", "h1 Remove"],
        "{asked:?}"
    );
    let srv = cl.srv();
    assert_eq!(srv.host, "h2");
    assert!(srv.migrations[0].post_copy_ms.is_some());
}

#[tokio::test]
async fn refused_migrations_ask_no_agent_anything() {
    let cl = cluster(agreeable).await;
    cl.agents.online.lock().unwrap().remove("h2");
    for (to, says) in [
        ("h2", "offline"),
        ("h9", "unknown host"),
        ("h1", "already runs on host"),
    ] {
        let e = cl.migrate(to, false).await.unwrap_err().to_string();
        assert!(e.contains(says), "to {to}: {e}");
    }
    assert!(cl.agents.asked().is_empty());
    let srv = cl.srv();
    assert_eq!(
        (srv.host.as_str(), srv.state),
        ("h1", InstanceState::Running)
    );
    assert!(srv.migrating.is_none());
    // Refusals are no migrations.
    assert_eq!(cl.c.metrics.migrations(), (0, 0, 0));
}

#[tokio::test]
async fn a_failed_dump_discards_the_prepared_space_and_the_instance_stays() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Checkpoint { .. } => failed("criu dump failed"),
        _ => agreeable(host, req),
    })
    .await;
    let e = cl.migrate("h2", false).await.unwrap_err().to_string();
    assert!(e.contains("h1") && e.contains("criu dump failed"), "{e}");
    assert_eq!(
        cl.agents.asked(),
        ["h2 Prepare", "h1 Checkpoint", "h2 Discard"]
    );
    let srv = cl.srv();
    assert_eq!((srv.host.as_str(), srv.pid), ("h1", Some(100)));
    assert!(srv.migrating.is_none() && srv.migrations.is_empty());
}

#[tokio::test]
async fn a_failed_restore_resumes_the_instance_on_its_source() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Restore { .. } if host == "h2" => failed("criu restore failed"),
        AgentRequest::Restore { .. } => Ok(AgentReply::Created { pid: 300 }),
        _ => agreeable(host, req),
    })
    .await;
    let e = cl.migrate("h2", false).await.unwrap_err();
    assert!(matches!(e, ApiError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("runs on host \"h1\" again"), "{e}");
    assert_eq!(
        with_transfer_sorted(cl.agents.asked())[4..],
        ["h2 Restore", "h2 Discard", "h1 Restore"]
    );
    let srv = cl.srv();
    assert_eq!((srv.host.as_str(), srv.pid), ("h1", Some(300)));
    assert_eq!(srv.state, InstanceState::Running);
    assert_eq!(cl.c.metrics.migrations(), (1, 1, 0));
}

#[tokio::test]
async fn a_restore_that_fails_on_both_hosts_says_the_instance_is_lost() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Restore { .. } => failed("criu restore failed"),
        _ => agreeable(host, req),
    })
    .await;
    let e = cl.migrate("h2", false).await.unwrap_err().to_string();
    assert!(e.contains("resuming it on host \"h1\" failed too"), "{e}");
    let srv = cl.srv();
    assert_eq!((srv.state, srv.pid), (InstanceState::Lost, None));
    assert!(srv.migrating.is_none());
}

#[tokio::test]
async fn post_copy_memory_that_cannot_follow_removes_the_copy_and_says_it_is_lost() {
    let cl = cluster(|host, req| match req {
        AgentRequest::AwaitPages { .. } => failed("the page link broke"),
        _ => agreeable(host, req),
    })
    .await;
    let e = cl.migrate("h2", true).await.unwrap_err().to_string();
    assert!(
        e.contains("was lost") && e.contains("the page link broke"),
        "{e}"
    );
    let asked = cl.agents.asked();
    assert_eq!(asked[asked.len() - 2..], ["h1 AwaitPages", "h2 Remove"]);
    assert_eq!(cl.srv().state, InstanceState::Lost);
}

#[tokio::test]
async fn a_transfer_that_fails_resumes_the_instance_on_its_source() {
    let cl = cluster(|host, req| match req {
        AgentRequest::SendImages { .. } => failed("no route to the destination"),
        AgentRequest::Restore { .. } => Ok(AgentReply::Created { pid: 300 }),
        _ => agreeable(host, req),
    })
    .await;
    let e = cl.migrate("h2", false).await.unwrap_err().to_string();
    assert!(e.contains("no route to the destination"), "{e}");
    let asked = cl.agents.asked();
    assert!(!asked.contains(&"h2 Restore".to_string()), "{asked:?}");
    assert_eq!(asked[asked.len() - 2..], ["h2 Discard", "h1 Restore"]);
    let srv = cl.srv();
    assert_eq!((srv.host.as_str(), srv.pid), ("h1", Some(300)));
}

#[tokio::test]
async fn a_run_its_host_refuses_leaves_no_record() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Create { .. } => Err(ApiError::BadRequest(
            "program not found: no-such-program".into(),
        )),
        _ => agreeable(host, req),
    })
    .await;
    let run = RunSpec {
        name: Some("web".into()),
        net: "red".into(),
        host: Some("h1".into()),
        cmd: vec!["no-such-program".into()],
        ..Default::default()
    };
    let e = super::create(&cl.c, run, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("program not found"), "{e}");
    assert_eq!(cl.agents.asked(), ["h1 Create"]);
    assert!(cl.c.state().instance_by_name("web").is_err());
    assert!(cl.c.state().instance_by_name("srv").is_ok());
}

/// A client whose answer was lost (the replica that took its `vane run` died) sends it
/// again with the same key: it gets the instance the first sending made, not a second one
/// nor a conflict on the name; a first sending that never started is made anew.
#[tokio::test]
async fn a_run_sent_again_with_its_key_makes_one_instance() {
    let cl = cluster(agreeable).await;
    let run = || RunSpec {
        name: Some("web".into()),
        net: "red".into(),
        host: Some("h1".into()),
        cmd: vec!["server".into()],
        ..Default::default()
    };
    let key = Some("0123456789abcdef".to_string());
    let first = super::create(&cl.c, run(), key.clone()).await.unwrap();
    let again = super::create(&cl.c, run(), key.clone()).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(cl.agents.asked(), ["h1 Create"]);
    let e = super::create(&cl.c, run(), Some("another-key-0000".into()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("web"), "{e}");
    // The key in another net (another tenant's, maybe) is another request.
    {
        let mut s = cl.c.state();
        let net = vane_proto::api::NetSpec {
            name: "blue".into(),
            subnet: "10.10.3.0/24".parse().unwrap(),
            tenant: "b".into(),
            egress: false,
        };
        let (_, batch) = s.create_net(net, 0).unwrap();
        cl.c.commit(batch).unwrap();
    }
    let other = RunSpec {
        name: Some("theirs".into()),
        net: "blue".into(),
        ..run()
    };
    let theirs = super::create(&cl.c, other, key.clone()).await.unwrap();
    assert_ne!(theirs.id, first.id);

    // The first sending's host said it never had it (its record is lost): made anew.
    cl.c.change_instance(&first.id, |i| i.state = InstanceState::Lost)
        .unwrap();
    let anew = super::create(&cl.c, run(), key).await.unwrap();
    assert_ne!(anew.id, first.id);
    assert_eq!(anew.state, InstanceState::Running);
    assert!(!cl.c.state().instances.contains_key(&first.id));
}

/// A removal that its host carried out but whose controller died before recording it,
/// sent again to the next leader: the host has no copy, and the record goes.
#[tokio::test]
async fn removing_an_instance_its_host_already_removed_forgets_it() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Remove { .. } => Err(ApiError::NotFound(
            "instance 0123 is not on this host".into(),
        )),
        _ => agreeable(host, req),
    })
    .await;
    super::remove(&cl.c, "srv", false).await.unwrap();
    assert!(cl.c.state().instance_by_name("srv").is_err());
}

#[tokio::test]
async fn removing_an_instance_of_an_offline_host_needs_force() {
    let cl = cluster(agreeable).await;
    cl.agents.online.lock().unwrap().remove("h1");
    let e = super::remove(&cl.c, "srv", false).await.unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(cl.c.state().instance_by_name("srv").is_ok());
    super::remove(&cl.c, "srv", true).await.unwrap();
    assert!(cl.c.state().instance_by_name("srv").is_err());
    assert!(cl.agents.asked().is_empty());
}

#[tokio::test]
async fn a_destination_that_stops_after_a_post_copy_took_all_the_memory_keeps_the_instance() {
    let cl = cluster(|host, req| match req {
        // The source's lazy dump served every page before the destination stopped.
        AgentRequest::Restore { .. } if host == "h1" => Err(ApiError::Moved(
            "its memory had all gone to the destination".into(),
        )),
        _ => agreeable(host, req),
    })
    .await;
    *cl.agents.dies_at.lock().unwrap() = Some(("h2".into(), "Restore".into()));
    let e = cl.migrate("h2", true).await.unwrap_err().to_string();
    assert!(e.contains("it runs on host \"h2\""), "{e}");
    let srv = cl.srv();
    assert_eq!(
        (srv.host.as_str(), srv.state),
        ("h2", InstanceState::Running)
    );
    assert!(srv.migrating.is_none());
    // The copy h2 brings back is its own: nothing tells it to remove it.
    let (_, unknown) = cl.c.state().reconcile("h2", &[]);
    assert!(unknown.is_empty());
}

#[tokio::test]
async fn a_destination_that_refuses_after_a_post_copy_took_all_the_memory_loses_the_instance() {
    // The destination answered (its failed restore removed its copy): nothing is left.
    let cl = cluster(|host, req| match req {
        AgentRequest::Restore { .. } if host == "h1" => Err(ApiError::Moved(
            "its memory had all gone to the destination".into(),
        )),
        AgentRequest::Restore { .. } => failed("restored tree not confined"),
        AgentRequest::Stats { .. } => Err(ApiError::NotFound("not running here".into())),
        _ => agreeable(host, req),
    })
    .await;
    cl.migrate("h2", true).await.unwrap_err();
    assert_eq!(cl.srv().state, InstanceState::Lost);
}

#[tokio::test]
async fn a_destination_back_before_the_resume_keeps_the_instance_it_runs() {
    // Its agent restarted at once and runs the copy (its stats answer): it is the one.
    let cl = cluster(|host, req| match req {
        AgentRequest::Restore { .. } if host == "h1" => Err(ApiError::Moved(
            "its memory had all gone to the destination".into(),
        )),
        AgentRequest::Restore { .. } => Err(ApiError::Unavailable(
            "host \"h2\" disconnected before answering".into(),
        )),
        _ => agreeable(host, req),
    })
    .await;
    cl.migrate("h2", true).await.unwrap_err();
    let asked = cl.agents.asked();
    assert_eq!(asked[asked.len() - 2..], ["h1 Restore", "h2 Stats"]);
    let srv = cl.srv();
    assert_eq!(
        (srv.host.as_str(), srv.state),
        ("h2", InstanceState::Running)
    );
}

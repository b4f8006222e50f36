//! Snapshots and restores step by step against the scripted agents of `tests`: what the
//! caller gets, which agent is asked what, in which order, and what each failure leaves.
//! The images go through the controller's transfers as a real agent's do.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use tokio::sync::mpsc;

use vane_proto::api::{frame, Instance, InstanceState, RestoreSpec, SnapshotSpec};
use vane_proto::stream::{AgentReply, AgentRequest};

use super::tests::{agreeable, cluster, failed, images, Cluster};
use super::ApiResult;
use crate::auth::Caller;
use crate::state::ApiError;

/// The frames of a snapshot stream, to its end.
async fn frames_of(mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Vec<(u8, Vec<u8>)> {
    let mut all = Vec::new();
    while let Some(chunk) = rx.recv().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    let mut r = &all[..];
    let mut frames = Vec::new();
    while let Some(f) = frame::read(&mut r).unwrap() {
        frames.push(f);
    }
    frames
}

/// The kinds of `frames`, in order.
fn kinds(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
    frames.iter().map(|(kind, _)| *kind).collect()
}

/// The images agents send, whole.
fn all_images() -> Vec<u8> {
    images().concat()
}

/// Takes a snapshot of `srv`, its frames once they are all there.
async fn take(cl: &Cluster, stop: bool) -> ApiResult<Vec<(u8, Vec<u8>)>> {
    let rx = super::snapshot(cl.c.clone(), "srv".into(), SnapshotSpec { stop }).await?;
    Ok(frames_of(rx).await)
}

/// Why a snapshot of `srv` was refused.
async fn refused(cl: &Cluster, stop: bool) -> ApiError {
    match take(cl, stop).await {
        Ok(frames) => panic!("a snapshot was taken: {:?}", kinds(&frames)),
        Err(e) => e,
    }
}

/// A snapshot of `srv` as `vane snapshot` keeps it, ready to be restored as `name` (a
/// clone) or as itself; on `host` if given.
async fn snapshot_of_srv(
    cl: &Cluster,
    stop: bool,
    name: Option<&str>,
    host: Option<&str>,
) -> RestoreSpec {
    let frames = take(cl, stop).await.unwrap();
    let (last, seal) = frames.last().unwrap();
    assert_eq!(*last, frame::SEAL, "{:?}", kinds(&frames));
    cl.agents.asked();
    RestoreSpec {
        instance: serde_json::from_slice(&frames[0].1).unwrap(),
        seal: String::from_utf8(seal.clone()).unwrap(),
        images_bytes: all_images().len() as u64,
        host: host.map(Into::into),
        name: name.map(Into::into),
        ip: None,
        hostname: None,
    }
}

/// A restore's body as `vane restore` sends it: the record `spec`, then `images` in
/// frames of 1 KiB.
fn body(spec: &RestoreSpec, images: &[u8]) -> Vec<u8> {
    let mut out = frame::encoded(frame::RECORD, &serde_json::to_vec(spec).unwrap());
    for piece in images.chunks(1024) {
        frame::encode(&mut out, frame::IMAGES, piece);
    }
    out
}

/// Restores from `body`, as `who`.
async fn restore(cl: &Cluster, who: Caller, body: Body) -> ApiResult<Instance> {
    let frames = Arc::new(tokio::sync::Mutex::new(super::FrameReader::new(body)));
    super::restore(cl.c.clone(), who, frames).await
}

/// Instance `name`, if the directory has it.
fn instance(cl: &Cluster, name: &str) -> Option<Instance> {
    cl.c.state().instance_by_name(name).ok().cloned()
}

#[tokio::test]
async fn a_snapshot_streams_the_record_the_images_and_the_seal_and_the_instance_runs_on() {
    let cl = cluster(|host, req| match req {
        // A snapshot's dump leaves the tree running, and dumps it whole.
        AgentRequest::Checkpoint {
            leave_running: true,
            lazy: false,
            ..
        } => agreeable(host, req),
        AgentRequest::Checkpoint { .. } => failed("not a snapshot's dump"),
        _ => agreeable(host, req),
    })
    .await;
    let before = cl.srv();
    let frames = take(&cl, false).await.unwrap();
    assert_eq!(cl.agents.asked(), ["h1 Checkpoint", "h1 SendImages"]);
    assert_eq!(
        kinds(&frames),
        [
            frame::RECORD,
            frame::IMAGES,
            frame::IMAGES,
            frame::IMAGES,
            frame::IMAGES,
            frame::SEAL
        ]
    );
    let record: Instance = serde_json::from_slice(&frames[0].1).unwrap();
    assert_eq!(record, before);
    // The images as they came from the host, piece by piece.
    let pieces: Vec<&[u8]> = frames[1..5].iter().map(|(_, d)| &d[..]).collect();
    let sent = images();
    assert_eq!(pieces, sent.iter().map(|p| &p[..]).collect::<Vec<_>>());
    // The seal is this cluster's, of the record and the images.
    let seal = String::from_utf8(frames[5].1.clone()).unwrap();
    let mut sealing = cl.c.sealer.begin(&record);
    sealing.update(&all_images());
    assert!(sealing.verify(&seal));
    assert_eq!(cl.srv(), before);
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn a_snapshot_that_stops_its_instance_stops_it_once_the_images_are_out() {
    let cl = cluster(agreeable).await;
    let frames = take(&cl, true).await.unwrap();
    assert_eq!(
        cl.agents.asked(),
        ["h1 Checkpoint", "h1 SendImages", "h1 Stop"]
    );
    assert_eq!(kinds(&frames).last(), Some(&frame::SEAL));
}

#[tokio::test]
async fn a_snapshot_whose_instance_cannot_be_stopped_ends_without_a_seal() {
    // Without a seal nothing can be restored: no second copy of an instance that runs on.
    let cl = cluster(|host, req| match req {
        AgentRequest::Stop { .. } => failed("cannot signal the program"),
        _ => agreeable(host, req),
    })
    .await;
    let frames = take(&cl, true).await.unwrap();
    assert!(
        !kinds(&frames).contains(&frame::SEAL),
        "{:?}",
        kinds(&frames)
    );
    let (kind, says) = frames.last().unwrap();
    assert_eq!(*kind, frame::ERROR);
    let says = String::from_utf8_lossy(says);
    assert!(says.contains("cannot signal the program"), "{says}");
}

#[tokio::test]
async fn a_snapshot_of_a_stopped_instance_is_refused() {
    let cl = cluster(agreeable).await;
    let id = cl.srv().id;
    cl.c.change_instance(&id, |inst| {
        inst.state = InstanceState::Exited;
        inst.pid = None;
    })
    .unwrap();
    let e = refused(&cl, false).await;
    assert!(matches!(e, ApiError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("is not running (exited)"), "{e}");
    assert!(cl.agents.asked().is_empty());
}

#[tokio::test]
async fn a_snapshot_of_an_instance_moving_between_hosts_is_refused() {
    // Its dump would be of the tree the migration is dumping, into the same images.
    let cl = cluster(agreeable).await;
    super::set_migrating(&cl.c, &cl.srv().id, Some("h2".into())).unwrap();
    let e = refused(&cl, false).await;
    assert!(matches!(e, ApiError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("is moving to host \"h2\""), "{e}");
    assert!(cl.agents.asked().is_empty());
}

#[tokio::test]
async fn a_failed_dump_reaches_the_caller_and_leaves_the_instance_as_it_was() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Checkpoint { .. } => failed("criu dump failed"),
        _ => agreeable(host, req),
    })
    .await;
    let before = cl.srv();
    let e = refused(&cl, true).await;
    assert!(matches!(e, ApiError::Internal(_)), "{e}");
    assert!(e.to_string().contains("criu dump failed"), "{e}");
    assert!(
        e.to_string().starts_with("host \"h1\": "),
        "the host named: {e}"
    );
    // Nothing streamed, nothing stopped, no transfer waiting for an agent.
    assert_eq!(cl.agents.asked(), ["h1 Checkpoint"]);
    assert_eq!(cl.srv(), before);
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn a_snapshot_of_an_instance_whose_host_is_offline_is_unavailable() {
    let cl = cluster(agreeable).await;
    cl.agents.online.lock().unwrap().remove("h1");
    {
        let mut s = cl.c.state();
        let batch = s.host_offline("h1", 0);
        cl.c.commit(batch).unwrap();
    }
    let before = cl.srv();
    let e = refused(&cl, false).await;
    assert!(matches!(e, ApiError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("host \"h1\" is offline"), "{e}");
    // Asked, and refused by the link: no further step.
    assert_eq!(cl.agents.asked(), ["h1 Checkpoint"]);
    assert_eq!(cl.srv(), before);
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn images_that_do_not_all_arrive_end_the_snapshot_in_an_error_and_the_instance_runs_on() {
    type Script = fn(&str, &AgentRequest) -> Result<AgentReply, ApiError>;
    let cases: [(Script, usize, &str); 2] = [
        // The host ends its images after 3 of 4 pieces, and says it sent them all.
        (
            agreeable,
            3,
            "host \"h1\" sent 3072 bytes of images, not the 4096 it dumped",
        ),
        // The host cannot send its images at all.
        (
            |host, req| match req {
                AgentRequest::SendImages { .. } => failed("the pack is gone"),
                _ => agreeable(host, req),
            },
            4,
            "the pack is gone",
        ),
    ];
    for (script, pieces, says) in cases {
        let cl = cluster(script).await;
        cl.agents.images.lock().unwrap().truncate(pieces);
        let frames = take(&cl, true).await.unwrap();
        let k = kinds(&frames);
        assert!(!k.contains(&frame::SEAL), "{k:?}");
        let (kind, error) = frames.last().unwrap();
        assert_eq!(*kind, frame::ERROR, "{k:?}");
        let error = String::from_utf8_lossy(error);
        assert!(error.contains(says), "{error}");
        // Not stopped: a failed snapshot leaves the instance running.
        assert_eq!(cl.agents.asked(), ["h1 Checkpoint", "h1 SendImages"]);
        assert_eq!(cl.srv().state, InstanceState::Running);
        assert_eq!(cl.c.transfers.unclaimed(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_its_client_abandons_does_not_stop_the_instance() {
    let cl = cluster(agreeable).await;
    let rx = super::snapshot(cl.c.clone(), "srv".into(), SnapshotSpec { stop: true })
        .await
        .unwrap();
    drop(rx);
    // Everything settles long before a transfer would be given up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cl.agents.asked(), ["h1 Checkpoint", "h1 SendImages"]);
    assert_eq!(cl.srv().state, InstanceState::Running);
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_restore_makes_a_clone_on_the_host_asked_streaming_the_images_as_they_come() {
    let cl = cluster(|host, req| match req {
        // Restored from a snapshot: its connections are closed, not repaired.
        AgentRequest::Restore {
            tcp_close: false, ..
        } => failed("not a snapshot's restore"),
        _ => agreeable(host, req),
    })
    .await;
    let srv = cl.srv();
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let whole = body(&spec, &all_images());
    // The client sends the record and half the images, then waits.
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let restoring = {
        let cl_c = cl.c.clone();
        let frames = Arc::new(tokio::sync::Mutex::new(super::FrameReader::new(
            Body::from_stream(stream),
        )));
        tokio::spawn(super::restore(cl_c, Caller::Admin, frames))
    };
    let half = whole.len() - 2 * (5 + 1024);
    tx.send(Ok(Bytes::copy_from_slice(&whole[..half])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Planned (its name and address taken), its space made, its images on their way.
    let creating = instance(&cl, "copy").unwrap();
    assert_eq!(
        (creating.state, creating.host.as_str()),
        (InstanceState::Creating, "h2")
    );
    assert_eq!(cl.agents.asked(), ["h2 Prepare", "h2 ReceiveImages"]);
    assert!(cl.agents.received.lock().unwrap().is_empty());
    tx.send(Ok(Bytes::copy_from_slice(&whole[half..])))
        .await
        .unwrap();
    drop(tx);
    let copy = restoring.await.unwrap().unwrap();
    assert_eq!(cl.agents.asked(), ["h2 Restore"]);
    assert_eq!(
        *cl.agents.received.lock().unwrap(),
        [("h2".to_string(), all_images())]
    );
    assert_eq!(instance(&cl, "copy"), Some(copy.clone()));
    assert_eq!(
        (copy.state, copy.pid, copy.host.as_str()),
        (InstanceState::Running, Some(200), "h2")
    );
    // A clone: its own id, address and hostname; the snapshot's program and net.
    assert_ne!(copy.id, srv.id);
    assert_ne!(copy.ip, srv.ip);
    assert_eq!(copy.hostname, "copy");
    assert_eq!((&copy.cmd, &copy.net), (&srv.cmd, &srv.net));
    assert_eq!(cl.srv(), srv);
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn a_snapshot_stopped_and_removed_restores_with_its_own_name_and_address() {
    let cl = cluster(agreeable).await;
    let srv = cl.srv();
    let spec = snapshot_of_srv(&cl, true, None, None).await;
    super::remove(&cl.c, "srv", false).await.unwrap();
    let back = restore(&cl, Caller::Admin, body(&spec, &all_images()).into())
        .await
        .unwrap();
    assert_eq!((back.state, back.pid), (InstanceState::Running, Some(200)));
    assert_eq!(
        (back.name.as_str(), back.ip, back.hostname.as_str()),
        (srv.name.as_str(), srv.ip, srv.hostname.as_str())
    );
    // A new instance all the same: the old id is gone with the old one.
    assert_ne!(back.id, srv.id);
}

#[tokio::test]
async fn restoring_under_a_name_in_use_is_refused_before_any_agent_is_asked() {
    let cl = cluster(agreeable).await;
    let before = cl.srv();
    for name in [None, Some("srv")] {
        let spec = snapshot_of_srv(&cl, false, name, Some("h2")).await;
        let e = restore(&cl, Caller::Admin, body(&spec, &all_images()).into())
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("\"srv\" already exists"), "{e}");
        assert!(cl.agents.asked().is_empty());
        assert_eq!(cl.srv(), before);
    }
}

#[tokio::test]
async fn restores_refused_on_their_record_ask_no_agent_anything() {
    let cl = cluster(agreeable).await;
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let images = all_images();
    let unsealed = RestoreSpec {
        seal: "made up".into(),
        ..spec.clone()
    };
    let elsewhere = RestoreSpec {
        host: Some("h9".into()),
        ..spec.clone()
    };
    let cases: Vec<(Vec<u8>, Caller, &str)> = vec![
        (Vec::new(), Caller::Admin, "its record first"),
        (
            frame::encoded(frame::IMAGES, &images),
            Caller::Admin,
            "its record first",
        ),
        (
            frame::encoded(frame::RECORD, b"{\"instance\": 1}"),
            Caller::Admin,
            "invalid request",
        ),
        (
            body(&unsealed, &images),
            Caller::Admin,
            "not sealed by this cluster",
        ),
        (
            body(&spec, &images),
            Caller::Tenant("blue".into()),
            "net \"red\" belongs to another tenant",
        ),
        (body(&elsewhere, &images), Caller::Admin, "unknown host"),
    ];
    for (body, who, says) in cases {
        let e = restore(&cl, who, body.into()).await.unwrap_err();
        assert!(e.to_string().contains(says), "{says}: {e}");
        assert!(cl.agents.asked().is_empty(), "{says}");
        assert!(instance(&cl, "copy").is_none(), "{says}");
    }
}

#[tokio::test]
async fn a_restore_its_host_cannot_prepare_for_leaves_no_record() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Prepare { .. } => failed("criu check failed"),
        _ => agreeable(host, req),
    })
    .await;
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let e = restore(&cl, Caller::Admin, body(&spec, &all_images()).into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("criu check failed"), "{e}");
    // Nothing prepared, nothing to discard.
    assert_eq!(cl.agents.asked(), ["h2 Prepare"]);
    assert!(instance(&cl, "copy").is_none());
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn a_restore_its_host_fails_discards_the_prepared_space_and_leaves_no_record() {
    let cl = cluster(|host, req| match req {
        AgentRequest::Restore { .. } => failed("criu restore failed"),
        _ => agreeable(host, req),
    })
    .await;
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let e = restore(&cl, Caller::Admin, body(&spec, &all_images()).into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("criu restore failed"), "{e}");
    assert_eq!(
        cl.agents.asked(),
        ["h2 Prepare", "h2 ReceiveImages", "h2 Restore", "h2 Discard"]
    );
    assert!(instance(&cl, "copy").is_none());
}

#[tokio::test]
async fn a_restore_whose_host_cannot_take_the_images_says_why() {
    let cl = cluster(|host, req| match req {
        AgentRequest::ReceiveImages { .. } => failed("no space left on device"),
        _ => agreeable(host, req),
    })
    .await;
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let e = restore(&cl, Caller::Admin, body(&spec, &all_images()).into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no space left on device"), "{e}");
    assert!(
        e.to_string().starts_with("host \"h2\": "),
        "the host named: {e}"
    );
    assert_eq!(
        cl.agents.asked(),
        ["h2 Prepare", "h2 ReceiveImages", "h2 Discard"]
    );
    assert!(instance(&cl, "copy").is_none());
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn a_short_or_malformed_upload_is_refused_and_its_host_never_gets_the_images_whole() {
    let cl = cluster(agreeable).await;
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let images = all_images();
    let whole = body(&spec, &images);
    let announced_less = RestoreSpec {
        images_bytes: 3072,
        ..spec.clone()
    };
    let mut sealed_twice = whole.clone();
    frame::encode(&mut sealed_twice, frame::SEAL, spec.seal.as_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            body(&spec, &images[..3072]),
            "the snapshot's images end after 3072 of 4096 bytes",
        ),
        (
            whole[..whole.len() - 100].to_vec(),
            "the request ends inside a frame",
        ),
        (
            body(&announced_less, &images),
            "longer than the 3072 bytes announced",
        ),
        (sealed_twice, "unexpected frame of kind 7"),
    ];
    // The same name each time: a refused restore leaves no record behind.
    for (body, says) in cases {
        let e = restore(&cl, Caller::Admin, body.into()).await.unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{says}: {e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
        assert_eq!(
            cl.agents.asked(),
            ["h2 Prepare", "h2 ReceiveImages", "h2 Discard"],
            "{says}"
        );
        assert!(cl.agents.received.lock().unwrap().is_empty(), "{says}");
        assert!(instance(&cl, "copy").is_none(), "{says}");
    }
    assert_eq!(cl.c.transfers.unclaimed(), 0);
}

#[tokio::test]
async fn a_restore_of_changed_images_or_record_is_refused_before_its_host_restores_them() {
    let cl = cluster(agreeable).await;
    let spec = snapshot_of_srv(&cl, false, Some("copy"), Some("h2")).await;
    let mut changed_images = all_images();
    changed_images[2000] ^= 1;
    let mut changed_record = spec.clone();
    changed_record.instance.cmd = vec!["something-else".into()];
    for (body, what) in [
        (body(&spec, &changed_images), "images"),
        (body(&changed_record, &all_images()), "record"),
    ] {
        let e = restore(&cl, Caller::Admin, body.into()).await.unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{what}: {e}");
        assert!(
            e.to_string().contains("not sealed by this cluster"),
            "{what}: {e}"
        );
        // The images went to the host as they came, but never their end: no restore.
        assert_eq!(
            cl.agents.asked(),
            ["h2 Prepare", "h2 ReceiveImages", "h2 Discard"],
            "{what}"
        );
        assert!(cl.agents.received.lock().unwrap().is_empty(), "{what}");
        assert!(instance(&cl, "copy").is_none(), "{what}");
    }
}

#[tokio::test]
async fn no_migration_nor_second_snapshot_while_a_snapshot_sends_its_images() {
    // Both dump into and send from one pack on the instance's host: a migration between a
    // snapshot's dump and the end of its stream would send the snapshot other images.
    let cl = cluster(agreeable).await;
    let unread = super::snapshot(cl.c.clone(), "srv".into(), SnapshotSpec { stop: false })
        .await
        .unwrap();
    let e = cl.migrate("h2", false).await.unwrap_err();
    assert!(matches!(e, ApiError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("is being snapshotted"), "{e}");
    let e = refused(&cl, false).await;
    assert!(e.to_string().contains("is being snapshotted"), "{e}");
    assert_eq!(cl.srv().host, "h1");
    // The stream read to its end, the instance is free again: it moves.
    let frames = frames_of(unread).await;
    assert_eq!(
        frames.last().unwrap().0,
        frame::SEAL,
        "{:?}",
        kinds(&frames)
    );
    assert_eq!(cl.migrate("h2", false).await.unwrap().host, "h2");
}

//! Failover and restarts against scripted agents: which host is asked what when a host
//! dies or a program ends, and what the directory says afterwards.

use std::time::Duration;

use vane_proto::api::{ExitStatus, HostState, InstanceState, RestartPolicy};
use vane_proto::stream::{AgentReply, InstanceReport};

use super::tests::{agreeable, cluster, failed, Cluster};
use crate::state::ApiError;

async fn with_policy(policy: RestartPolicy) -> Cluster {
    let cl = cluster(|_, _| Ok(AgentReply::Done)).await;
    let id = cl.srv().id;
    cl.c.change_instance(&id, |i| i.restart = policy).unwrap();
    cl
}

/// h1's agent is gone and the controller knows it.
fn h1_offline(cl: &Cluster) {
    cl.agents.online.lock().unwrap().remove("h1");
    let mut s = cl.c.state();
    let batch = s.host_offline("h1", 1);
    cl.c.commit(batch).unwrap();
}

/// The agent of h1 reports that srv ended with `code`, as the session hands it on.
fn ended(cl: &Cluster, code: i32) {
    let report = InstanceReport {
        id: cl.srv().id,
        state: InstanceState::Exited,
        pid: None,
        exit: Some(ExitStatus {
            code: Some(code),
            signal: None,
            at: 1,
            oom: false,
        }),
    };
    let batch = cl.c.state().apply_report("h1", &report).unwrap();
    cl.c.commit(batch).unwrap();
    super::schedule_restart(&cl.c, &report.id);
}

#[tokio::test(start_paused = true)]
async fn a_host_silent_past_its_grace_is_dead_and_its_instance_runs_elsewhere_as_itself() {
    let cl = with_policy(RestartPolicy::Always).await;
    let before = cl.srv();
    h1_offline(&cl);
    super::watch_silence(&cl.c, "h1", 7, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(cl.c.state().hosts["h1"].state, HostState::Offline);
    assert!(cl.agents.asked().is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cl.c.state().hosts["h1"].state, HostState::Dead);
    assert_eq!(cl.agents.asked(), ["h2 Create"]);
    let after = cl.srv();
    assert_eq!(
        (after.host.as_str(), after.state),
        ("h2", InstanceState::Running)
    );
    assert_eq!(
        (after.id, after.ip, after.hostname),
        (before.id, before.ip, before.hostname)
    );
    assert_eq!((after.pid, after.restarts), (Some(100), 1));
}

#[tokio::test(start_paused = true)]
async fn a_host_back_within_its_grace_keeps_its_instances() {
    let cl = with_policy(RestartPolicy::Always).await;
    h1_offline(&cl);
    super::watch_silence(&cl.c, "h1", 7, Duration::from_secs(5));
    // Its agent connects again (a new stream).
    let (_epoch, _rx, _) = cl.c.streams.attach("h1");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_ne!(cl.c.state().hosts["h1"].state, HostState::Dead);
    assert!(cl.agents.asked().is_empty());
    assert_eq!(cl.srv().host, "h1");
}

#[tokio::test(start_paused = true)]
async fn without_a_policy_a_dead_host_s_instance_is_lost() {
    let cl = with_policy(RestartPolicy::No).await;
    h1_offline(&cl);
    super::failover::declare_dead(&cl.c, "h1").await;
    assert!(cl.agents.asked().is_empty());
    let srv = cl.srv();
    assert_eq!((srv.host.as_str(), srv.state), ("h1", InstanceState::Lost));
}

#[tokio::test(start_paused = true)]
async fn on_failure_starts_a_failed_program_again_on_its_host_after_a_second() {
    let cl = with_policy(RestartPolicy::OnFailure).await;
    ended(&cl, 0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(cl.agents.asked().is_empty(), "not after exit 0");
    assert_eq!(cl.srv().state, InstanceState::Exited);
    ended(&cl, 2);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(cl.agents.asked().is_empty(), "not before its backoff");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cl.agents.asked(), ["h1 Remove", "h1 Create"]);
    let srv = cl.srv();
    assert_eq!(
        (srv.host.as_str(), srv.state),
        ("h1", InstanceState::Running)
    );
    assert_eq!(srv.restarts, 1);
    assert_eq!(srv.restart_reason.as_deref(), Some("exit code 2"));
}

#[tokio::test(start_paused = true)]
async fn a_stopped_instance_is_not_started_again() {
    let cl = with_policy(RestartPolicy::Always).await;
    let srv = cl.srv();
    super::stop_on(&cl.c, "h1", &srv.id).await.unwrap();
    cl.agents.asked();
    ended(&cl, 143);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(cl.agents.asked().is_empty());
    assert!(cl.srv().stopped);
}

/// srv (restart always) has a checkpoint of 100 000 bytes kept, and h1 is offline.
async fn checkpointed(
    script: impl Fn(&str, &vane_proto::stream::AgentRequest) -> Result<AgentReply, ApiError>
        + Send
        + Sync
        + 'static,
) -> Cluster {
    let cl = cluster(script).await;
    let id = cl.srv().id;
    cl.c.change_instance(&id, |i| i.restart = RestartPolicy::Always)
        .unwrap();
    std::fs::create_dir_all(&cl.c.checkpoints).unwrap();
    std::fs::write(super::checkpoints::pack_of(&cl.c, &id), vec![7u8; 100_000]).unwrap();
    h1_offline(&cl);
    cl
}

#[tokio::test]
async fn a_dead_host_s_instance_with_a_checkpoint_is_restored_from_it() {
    let cl = checkpointed(agreeable).await;
    super::failover::declare_dead(&cl.c, "h1").await;
    let mut asked = cl.agents.asked();
    asked.sort();
    assert_eq!(asked, ["h2 Prepare", "h2 ReceiveImages", "h2 Restore"]);
    let received = cl.agents.received.lock().unwrap().clone();
    assert_eq!(received, [("h2".to_string(), vec![7u8; 100_000])]);
    let srv = cl.srv();
    assert_eq!(
        (srv.host.as_str(), srv.state),
        ("h2", InstanceState::Running)
    );
    assert_eq!(srv.pid, Some(200));
    assert_eq!(
        srv.restart_reason.as_deref(),
        Some("host h1 died, restored from its checkpoint")
    );
}

#[tokio::test]
async fn a_checkpoint_that_does_not_restore_gives_way_to_a_fresh_start() {
    let cl = checkpointed(|host, req| match req {
        vane_proto::stream::AgentRequest::Restore { .. } => failed("criu says no"),
        _ => agreeable(host, req),
    })
    .await;
    super::failover::declare_dead(&cl.c, "h1").await;
    let asked = cl.agents.asked();
    assert_eq!(
        asked[asked.len() - 3..],
        ["h2 Restore", "h2 Discard", "h2 Create"]
    );
    let srv = cl.srv();
    assert_eq!(
        (srv.host.as_str(), srv.state),
        ("h2", InstanceState::Running)
    );
    assert_eq!(srv.restart_reason.as_deref(), Some("host h1 died"));
}

//! Restart policies in the model: a host declared dead (its instances placed again on the
//! hosts still online, or lost), an ended program started again on its host, and the
//! backoff between such starts. The workflow that carries them out is
//! `workflow::failover`; the clock is the caller's.

use std::time::{Duration, Instant};

use vane_proto::api::{HostState, InstanceState};
use vane_proto::stream::InstanceSpec;

use super::State;
use crate::store::Batch;

/// An instance to start again (fresh) on `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub id: String,
    pub host: String,
    pub spec: InstanceSpec,
}

impl State {
    /// Declares host `name` dead, if it is offline (an online host, or one already dead,
    /// gives `None`): each of its instances that its restart policy would have running is
    /// placed on the least loaded online host, keeping its id, name, address, hostname and
    /// net, and recorded as `creating` there; the others are lost. A dead host leaves the
    /// other hosts' views, so they drop their sessions with it. Instances in a migration
    /// are left to it.
    pub fn declare_dead(&mut self, name: &str, now: u64) -> Option<(Batch, Vec<Restart>)> {
        let host = self.hosts.get_mut(name)?;
        if host.state != HostState::Offline {
            return None;
        }
        host.state = HostState::Dead;
        host.since = now;
        let mut batch = Batch::default();
        batch.put(&*host);
        let ids: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.host == name && i.migrating.is_none())
            .map(|i| i.id.clone())
            .collect();
        let mut restarts = Vec::new();
        for id in ids {
            let inst = &self.instances[&id];
            let wanted = !inst.stopped
                && match inst.state {
                    InstanceState::Creating | InstanceState::Running => !inst.restart.is_no(),
                    // Ended, and waiting for its restart on the host that died.
                    InstanceState::Exited => inst.restart.restarts_after(inst.exit.as_ref()),
                    InstanceState::Lost => false,
                };
            let to = if wanted {
                let inst = &self.instances[&id];
                self.least_loaded_host_for(&inst.publish, Some(&id)).ok()
            } else {
                None
            };
            let inst = self.instances.get_mut(&id).expect("listed above");
            match to {
                Some(to) => {
                    inst.host = to.clone();
                    inst.state = InstanceState::Creating;
                    inst.pid = None;
                    inst.exit = None;
                    inst.restarts += 1;
                    inst.restart_reason = Some(format!("host {name} died"));
                    batch.put(&*inst);
                    let spec = self.instance_spec(&self.instances[&id]).ok();
                    if let Some(spec) = spec {
                        restarts.push(Restart { id, host: to, spec });
                    }
                }
                None => {
                    if inst.state != InstanceState::Lost || inst.pid.is_some() {
                        inst.state = InstanceState::Lost;
                        inst.pid = None;
                        batch.put(&*inst);
                    }
                }
            }
        }
        Some((batch, restarts))
    }

    /// Whether instance `id`, ended on `host`, is one its restart policy starts again
    /// there: not stopped, not moving, and its end one the policy restarts after.
    pub fn restart_wanted(&self, id: &str, host: &str) -> bool {
        self.instances.get(id).is_some_and(|i| {
            i.host == host
                && i.state == InstanceState::Exited
                && !i.stopped
                && i.migrating.is_none()
                && i.restart.restarts_after(i.exit.as_ref())
                && self
                    .hosts
                    .get(host)
                    .is_some_and(|h| h.state == HostState::Online)
        })
    }

    /// The instances of `host` that wait to be started again (after its agent reconnects:
    /// programs that ended while the controller did not hear).
    pub fn restarts_wanted_on(&self, host: &str) -> Vec<String> {
        self.instances
            .values()
            .filter(|i| self.restart_wanted(&i.id, host))
            .map(|i| i.id.clone())
            .collect()
    }

    /// Records that instance `id`, ended on `host`, starts again there, if it still is to
    /// (`restart_wanted`): `creating`, one more restart, why, and no checkpoint (one of the
    /// program that ended is not one of the program that starts). Returns what its host
    /// needs.
    pub fn begin_restart(&mut self, id: &str, host: &str) -> Option<(Batch, Restart)> {
        if !self.restart_wanted(id, host) {
            return None;
        }
        let inst = self.instances.get_mut(id)?;
        let reason = inst
            .exit
            .map_or_else(|| "ended".to_string(), |e| e.to_string());
        inst.state = InstanceState::Creating;
        inst.pid = None;
        inst.restarts += 1;
        inst.restart_reason = Some(reason);
        inst.checkpointed = None;
        let mut batch = Batch::default();
        batch.put(&*inst);
        let spec = self.instance_spec(&self.instances[id]).ok()?;
        Some((
            batch,
            Restart {
                id: id.to_string(),
                host: host.to_string(),
                spec,
            },
        ))
    }

    /// Settles a start again of instance `id` on `host`: running with `pid`, or, if it
    /// failed, `failed` (lost when placed there by a dead host, exited when its own host
    /// could not start it). Nothing if the record has moved on since (a report that the
    /// program ended already overtook the answer, or it was removed).
    pub fn end_restart(
        &mut self,
        id: &str,
        host: &str,
        pid: Result<Option<u32>, InstanceState>,
    ) -> Option<Batch> {
        let inst = self
            .instances
            .get_mut(id)
            .filter(|i| i.host == host && i.state == InstanceState::Creating)?;
        match pid {
            Ok(pid) => {
                inst.state = InstanceState::Running;
                inst.pid = pid;
                inst.exit = None;
            }
            Err(state) => {
                inst.state = state;
                inst.pid = None;
            }
        }
        let mut batch = Batch::default();
        batch.put(&*inst);
        Some(batch)
    }
}

/// The wait before an ended program starts again on its host: 1 s, doubling up to 30 s,
/// back to 1 s once it ran 10 s. Sans-IO: the caller gives the time.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    delay: Option<Duration>,
    started: Option<Instant>,
}

pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_MOST: Duration = Duration::from_secs(30);
/// Running this long makes the next wait the first again.
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);

impl Backoff {
    /// How long to wait before the next start, the program having ended at `now`.
    pub fn next(&mut self, now: Instant) -> Duration {
        let ran_long = self
            .started
            .is_some_and(|s| now.saturating_duration_since(s) >= BACKOFF_RESET);
        let delay = match self.delay {
            Some(d) if !ran_long => (d * 2).min(BACKOFF_MOST),
            _ => BACKOFF_FIRST,
        };
        self.delay = Some(delay);
        delay
    }

    /// The program started (again) at `now`.
    pub fn started(&mut self, now: Instant) {
        self.started = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use vane_proto::api::{
        ClusterConfig, ExitStatus, HostState, InstanceState, NetSpec, RestartPolicy, RunSpec,
    };
    use vane_proto::stream::InstanceReport;

    use super::*;
    use crate::store::Snapshot;

    /// Hosts h1, h2 and h3 online, net red, and on h1: `web` (restart always), `db` (no
    /// policy), `job` (on-failure, stopped by its user); `cache` on h3.
    fn cluster() -> State {
        let (mut s, _) = State::from_snapshot(Snapshot::default(), ClusterConfig::default());
        for h in ["h1", "h2", "h3"] {
            s.host_online(h, None, Some("00"), 0);
        }
        s.create_net(
            NetSpec {
                name: "red".into(),
                subnet: "10.1.0.0/24".parse().unwrap(),
                tenant: "default".into(),
                egress: false,
            },
            0,
        )
        .unwrap();
        for (name, host, restart) in [
            ("web", "h1", RestartPolicy::Always),
            ("db", "h1", RestartPolicy::No),
            ("job", "h1", RestartPolicy::OnFailure),
            ("cache", "h3", RestartPolicy::No),
        ] {
            let run = RunSpec {
                name: Some(name.into()),
                net: "red".into(),
                host: Some(host.into()),
                cmd: vec!["true".into()],
                restart,
                ..Default::default()
            };
            s.plan_instance(run, format!("{name}-id"), 0).unwrap();
            s.instances.get_mut(&format!("{name}-id")).unwrap().state = InstanceState::Running;
        }
        s.instances.get_mut("job-id").unwrap().stopped = true;
        s
    }

    #[test]
    fn a_dead_host_s_restartable_instances_move_with_their_identity_and_the_rest_are_lost() {
        let mut s = cluster();
        let web = s.instances["web-id"].clone();
        assert!(
            s.declare_dead("h1", 9).is_none(),
            "an online host is not dead"
        );
        s.host_offline("h1", 5);
        let (_, restarts) = s.declare_dead("h1", 9).unwrap();
        assert_eq!(s.hosts["h1"].state, HostState::Dead);
        // Least loaded: h2 (h3 has cache).
        assert_eq!(restarts.len(), 1);
        let r = &restarts[0];
        assert_eq!((r.id.as_str(), r.host.as_str()), ("web-id", "h2"));
        assert_eq!((r.spec.ip, &r.spec.hostname), (web.ip, &web.hostname));
        let moved = &s.instances["web-id"];
        assert_eq!(moved.host, "h2");
        assert_eq!(moved.state, InstanceState::Creating);
        assert_eq!((moved.name.as_str(), moved.ip), ("web", web.ip));
        assert_eq!(moved.restarts, 1);
        assert_eq!(moved.restart_reason.as_deref(), Some("host h1 died"));
        for lost in ["db-id", "job-id"] {
            assert_eq!(s.instances[lost].state, InstanceState::Lost, "{lost}");
            assert_eq!(
                s.instances[lost].host, "h1",
                "{lost} stays listed where it was"
            );
        }
        // Declared once; the dead host is nobody's peer, and the views place web on h2.
        assert!(s.declare_dead("h1", 10).is_none());
        let view = s.view_for("h3");
        assert!(view.peers.iter().all(|p| p.name != "h1"));
        let member = view.members.iter().find(|m| m.name == "web").unwrap();
        assert_eq!(member.host, "h2");
        assert!(view.members.iter().all(|m| m.name != "db"), "lost");
        assert!(s.end_restart("web-id", "h2", Ok(Some(42))).is_some());
        assert_eq!(s.instances["web-id"].state, InstanceState::Running);
        // It comes back: its copy of web is stale (removed before anything else), its
        // ended db is its own again.
        s.host_online("h1", None, None, 20);
        let reports = [
            InstanceReport {
                id: "web-id".into(),
                state: InstanceState::Exited,
                pid: None,
                exit: None,
            },
            InstanceReport {
                id: "db-id".into(),
                state: InstanceState::Exited,
                pid: None,
                exit: None,
            },
        ];
        let (_, stale) = s.reconcile("h1", &reports);
        assert_eq!(stale, ["web-id"]);
        assert_eq!(s.instances["web-id"].host, "h2");
        assert_eq!(s.instances["db-id"].state, InstanceState::Exited);
        assert_eq!(s.hosts["h1"].state, HostState::Online);
    }

    #[test]
    fn with_no_host_left_a_restartable_instance_is_lost() {
        let mut s = cluster();
        for h in ["h2", "h3"] {
            s.host_offline(h, 1);
            s.declare_dead(h, 2);
        }
        s.host_offline("h1", 3);
        let (_, restarts) = s.declare_dead("h1", 4).unwrap();
        assert!(restarts.is_empty());
        assert_eq!(s.instances["web-id"].state, InstanceState::Lost);
        assert_eq!(s.instances["cache-id"].state, InstanceState::Lost);
        assert_eq!(s.hosts["h2"].state, HostState::Dead);
    }

    #[test]
    fn an_ended_program_starts_again_as_its_policy_says() {
        let mut s = cluster();
        let exit = |code| ExitStatus {
            code: Some(code),
            signal: None,
            at: 1,
            oom: false,
        };
        let report = |id: &str, code| InstanceReport {
            id: id.into(),
            state: InstanceState::Exited,
            pid: None,
            exit: Some(exit(code)),
        };
        s.apply_report("h1", &report("web-id", 0));
        s.instances.get_mut("web-id").unwrap().checkpointed = Some(1);
        assert!(s.restart_wanted("web-id", "h1"), "always: after exit 0 too");
        assert!(!s.restart_wanted("web-id", "h2"), "only on its own host");
        let (_, r) = s.begin_restart("web-id", "h1").unwrap();
        assert_eq!(r.host, "h1");
        let web = &s.instances["web-id"];
        assert_eq!((web.state, web.restarts), (InstanceState::Creating, 1));
        assert_eq!(web.restart_reason.as_deref(), Some("exit code 0"));
        assert_eq!(
            web.checkpointed, None,
            "its checkpoint is of the program that ended"
        );
        assert!(s.begin_restart("web-id", "h1").is_none(), "once");
        // A report that it ended again overtakes the answer: the answer changes nothing.
        s.apply_report("h1", &report("web-id", 3));
        assert!(s.end_restart("web-id", "h1", Ok(Some(7))).is_none());
        // on-failure: not after 0, after anything else; never once stopped.
        s.instances.get_mut("job-id").unwrap().stopped = false;
        s.apply_report("h1", &report("job-id", 0));
        assert!(!s.restart_wanted("job-id", "h1"));
        s.apply_report("h1", &report("job-id", 1));
        assert!(s.restart_wanted("job-id", "h1"));
        s.instances.get_mut("job-id").unwrap().stopped = true;
        assert!(!s.restart_wanted("job-id", "h1"));
        // No policy: never.
        s.apply_report("h1", &report("db-id", 1));
        assert!(!s.restart_wanted("db-id", "h1"));
        assert_eq!(s.restarts_wanted_on("h1"), ["web-id"]);
    }

    #[test]
    fn the_backoff_doubles_to_its_most_and_resets_after_a_long_run() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..7).map(|_| b.next(t0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        b.started(t0);
        assert_eq!(b.next(t0 + Duration::from_secs(3)).as_secs(), 30);
        b.started(t0 + Duration::from_secs(40));
        assert_eq!(b.next(t0 + Duration::from_secs(51)).as_secs(), 1);
        b.started(t0 + Duration::from_secs(52));
        assert_eq!(b.next(t0 + Duration::from_secs(53)).as_secs(), 2);
    }
}

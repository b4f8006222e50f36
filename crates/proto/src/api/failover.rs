//! What failover goes by: the states of a host (dead after the controller's grace period)
//! and the restart policies of instances (`vane run --restart`).

use serde::{Deserialize, Serialize};

use super::ExitStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Online,
    /// Its control stream is gone, for less than the controller's grace period so far.
    Offline,
    /// Silent past the grace period (`vane controller --host-grace`): its instances with a
    /// restart policy were started again on other hosts, the others are lost, and the other
    /// hosts no longer talk to it. Online again when its agent connects.
    Dead,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Online => "online",
            HostState::Offline => "offline",
            HostState::Dead => "dead",
        }
    }
}

/// When an instance's program is started again (`vane run --restart`, podman's words).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never: an ended program stays exited, an instance of a dead host is lost.
    #[default]
    No,
    /// After the program failed (a non-zero exit code, a signal, out of memory), not after
    /// it exited with 0 or was stopped (`vane stop`); and on another host when its host dies.
    OnFailure,
    /// After the program ended in any way but `vane stop`; and on another host when its
    /// host dies.
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    pub fn is_no(&self) -> bool {
        *self == RestartPolicy::No
    }

    /// Whether a program that ended as `exit` says is started again.
    pub fn restarts_after(self, exit: Option<&ExitStatus>) -> bool {
        match self {
            RestartPolicy::No => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit.is_none_or(|e| e.oom || e.code != Some(0)),
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = crate::validate::InputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err(crate::validate::InputError::Invalid {
                what: "restart policy",
                value: s.to_string(),
                why: "use no, on-failure or always",
            }),
        }
    }
}

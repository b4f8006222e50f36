//! Checks of user input shared by the CLI and the controller.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a piece of user input was refused. The message names the input at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

fn invalid(what: &'static str, value: &str, why: &'static str) -> InputError {
    InputError::Invalid {
        what,
        value: value.to_string(),
        why,
    }
}

/// Names of nets, instances, hosts and tenants: they end up in file names, host names and
/// /etc/hosts, so they follow the DNS label rules (RFC 1123), at most 63 characters.
pub fn name(what: &'static str, value: &str) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(invalid(what, value, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(invalid(what, value, "must be at most 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            what,
            value,
            "use lowercase letters, digits and '-' only",
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(invalid(what, value, "must not start or end with '-'"));
    }
    Ok(())
}

/// A virtual hostname: one or more labels separated by dots, at most 253 characters.
pub fn hostname(value: &str) -> Result<(), InputError> {
    if value.len() > 253 {
        return Err(invalid("hostname", value, "must be at most 253 characters"));
    }
    for label in value.split('.') {
        name("hostname", label).map_err(|_| {
            invalid(
                "hostname",
                value,
                "each label: 1-63 of lowercase letters, digits and '-', not at the ends",
            )
        })?;
    }
    Ok(())
}

/// Transport protocol of a policy port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// `PORT/PROTO` as in `--port 80/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct PortSpec {
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}/{}", self.port, proto)
    }
}

impl FromStr for PortSpec {
    type Err = InputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(invalid("port", s, "protocol must be tcp or udp")),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("port", s, "expected PORT/PROTO, e.g. 80/tcp"))?;
        if port == 0 {
            return Err(invalid("port", s, "port must be 1-65535"));
        }
        Ok(PortSpec { port, proto })
    }
}

/// `KEY=VALUE` of `--env`.
pub fn env_pair(s: &str) -> Result<(String, String), InputError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| invalid("environment variable", s, "expected KEY=VALUE"))?;
    if k.is_empty() || k.contains('\0') || v.contains('\0') {
        return Err(invalid(
            "environment variable",
            s,
            "key must be non-empty, no NUL bytes",
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("net", "red").is_ok());
        assert!(name("net", "web-1").is_ok());
        assert!(name("net", "").is_err());
        assert!(name("net", "Red").is_err());
        assert!(name("net", "-a").is_err());
        assert!(name("net", "a_b").is_err());
        assert!(name("net", &"a".repeat(64)).is_err());
        assert!(hostname("db.internal").is_ok());
        assert!(hostname("db..internal").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(
            "80/tcp".parse::<PortSpec>().unwrap(),
            PortSpec {
                port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!("53/udp".parse::<PortSpec>().unwrap().proto, Proto::Udp);
        assert_eq!("8080".parse::<PortSpec>().unwrap().port, 8080);
        assert!("0/tcp".parse::<PortSpec>().is_err());
        assert!("80/sctp".parse::<PortSpec>().is_err());
        assert!("x/tcp".parse::<PortSpec>().is_err());
        assert_eq!(
            "80/udp".parse::<PortSpec>().unwrap().to_string(),
            "80/udp".to_string()
        );
    }

    #[test]
    fn envs() {
        assert_eq!(env_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(env_pair("A").is_err());
        assert!(env_pair("=x").is_err());
    }
}

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
    #[error("unknown variable {{{var}}} in {what} {value:?}: known are {{name}}, {{hostname}}, {{ip}}, {{net}}, {{state}}")]
    UnknownVariable {
        what: &'static str,
        value: String,
        var: String,
    },
}

fn invalid(what: &'static str, value: &str, why: &'static str) -> InputError {
    InputError::Invalid {
        what,
        value: value.to_string(),
        why,
    }
}

/// Whether `key` can be a request's idempotency key: 8 to 64 letters, digits and '-'.
pub fn request_key(key: &str) -> bool {
    (8..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A WireGuard key as `wg` writes it: 32 bytes in standard base64 (44 characters).
pub fn wireguard_key(what: &'static str, value: &str) -> Result<[u8; 32], InputError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| {
            invalid(
                what,
                value,
                "not base64 (a key as `wg genkey | wg pubkey` prints it)",
            )
        })?;
    bytes
        .try_into()
        .map_err(|_| invalid(what, value, "not a 32-byte key (44 base64 characters)"))
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

/// A duration: a number with a unit, `ms`, `s`, `m` or `h` (`500ms`, `5s`, `2m`), or
/// seconds alone (`5`).
pub fn duration(what: &'static str, value: &str) -> Result<std::time::Duration, InputError> {
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, "s"),
    };
    let millis: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(invalid(
                what,
                value,
                "use a number and ms, s, m or h (e.g. 5s)",
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| invalid(what, value, "use a number and ms, s, m or h (e.g. 5s)"))?;
    n.checked_mul(millis)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| invalid(what, value, "too long"))
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

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
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

/// `[HOSTIP:]HOSTPORT:PORT[/PROTO]` of `vane run --publish`: a port of the instance that
/// clients outside vane reach at a port of its host (at every address of the host, or at
/// HOSTIP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Publish {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<std::net::Ipv4Addr>,
    pub host_port: u16,
    pub port: u16,
    pub proto: Proto,
}

impl Publish {
    /// Whether `self` and `other` cannot both be published on one host: the same host port
    /// and protocol, at addresses that overlap (every address overlaps any).
    pub fn clashes_with(&self, other: &Publish) -> bool {
        self.host_port == other.host_port
            && self.proto == other.proto
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        let target = PortSpec {
            port: self.port,
            proto: self.proto,
        };
        write!(f, "{}:{target}", self.host_port)
    }
}

impl FromStr for Publish {
    type Err = InputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "expected [HOSTIP:]HOSTPORT:PORT[/PROTO], e.g. 8080:80/tcp";
        let parts: Vec<&str> = s.split(':').collect();
        let (host_ip, host_port, target) = match parts[..] {
            [hp, t] => (None, hp, t),
            [ip, hp, t] => (
                Some(
                    ip.parse::<std::net::Ipv4Addr>()
                        .map_err(|_| invalid("published port", s, FORM))?,
                ),
                hp,
                t,
            ),
            _ => return Err(invalid("published port", s, FORM)),
        };
        let host_port: u16 = host_port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("published port", s, "host port must be 1-65535"))?;
        if host_ip.is_some_and(|ip| ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()) {
            return Err(invalid(
                "published port",
                s,
                "the host address must be one of the host's (or left out for all)",
            ));
        }
        let target: PortSpec = target
            .parse()
            .map_err(|_| invalid("published port", s, FORM))?;
        Ok(Publish {
            host_ip,
            host_port,
            port: target.port,
            proto: target.proto,
        })
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

/// `--memory`: bytes, with an optional binary unit: `K`, `M`, `G`, `T` (also written `Ki`,
/// `KiB`, `KB`...; all are powers of 1024, as with docker and podman), e.g. `256M`, `1.5G`.
/// At least 4 MiB, so that the instance's init itself fits.
pub fn size(s: &str) -> Result<u64, InputError> {
    const WHY: &str = "expected a size like 256M, 1G or 512Ki";
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| invalid("size", s, WHY))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(invalid("size", s, WHY)),
    };
    let bytes = num * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid("size", s, "too large"));
    }
    let bytes = bytes as u64;
    if bytes < 4 << 20 {
        return Err(invalid("size", s, "a memory limit must be at least 4M"));
    }
    Ok(bytes)
}

/// `--bandwidth`: bits per second, e.g. `50Mbit`, `1Gbit`, `800kbit` (decimal units, as
/// with `tc`; `k`, `m`, `g` alone and `Mbps`-style mean the same bits). At least 8kbit.
pub fn rate(s: &str) -> Result<u64, InputError> {
    const WHY: &str = "expected a rate like 50Mbit, 1Gbit or 800kbit";
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| invalid("rate", s, WHY))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("bit")
        .or_else(|| unit.strip_suffix("bps"))
        .or_else(|| unit.strip_suffix("bit/s"))
        .unwrap_or(&unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        _ => return Err(invalid("rate", s, WHY)),
    };
    let bits = num * mult;
    if !bits.is_finite() || bits >= 1e13 {
        return Err(invalid("rate", s, "too large"));
    }
    if bits < 8e3 {
        return Err(invalid(
            "rate",
            s,
            "a bandwidth limit must be at least 8kbit",
        ));
    }
    Ok(bits as u64)
}

/// `--cpus`: a number of CPUs, e.g. `0.5` or `2`, as thousandths of a CPU; at least 0.01.
pub fn cpus(s: &str) -> Result<u32, InputError> {
    let n: f64 = s
        .trim()
        .parse()
        .map_err(|_| invalid("cpus", s, "expected a number of CPUs like 0.5 or 2"))?;
    if !n.is_finite() || n < 0.01 {
        return Err(invalid("cpus", s, "must be at least 0.01"));
    }
    if n > 4096.0 {
        return Err(invalid("cpus", s, "too large"));
    }
    Ok((n * 1000.0).round() as u32)
}

/// `--pids`: most processes at once; at least 2 (the instance's init counts as one).
pub fn pids(s: &str) -> Result<u32, InputError> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| invalid("pids", s, "expected a number of processes like 100"))?;
    if n < 2 {
        return Err(invalid(
            "pids",
            s,
            "must be at least 2 (the instance's init counts as one)",
        ));
    }
    Ok(n)
}

/// Variables that paths and environment values may hold, expanded per instance.
pub const VARIABLES: &[&str] = &["name", "hostname", "ip", "net", "state"];

/// The `{identifier}` variables of `s`, in order: (byte range, identifier). Braces around
/// anything else (JSON, shell code) are left as they are.
fn variables_in(s: &str) -> Vec<(std::ops::Range<usize>, &str)> {
    let mut out = Vec::new();
    let mut rest = 0;
    while let Some(open) = s[rest..].find('{').map(|i| i + rest) {
        let after = &s[open + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let ident = &after[..len];
        if !ident.is_empty()
            && !ident.starts_with(|c: char| c.is_ascii_digit())
            && after[len..].starts_with('}')
        {
            out.push((open..open + len + 2, ident));
            rest = open + len + 2;
        } else {
            rest = open + 1;
        }
    }
    out
}

/// Checks that `s` (a path or an environment value, named `what`) only uses known variables.
pub fn variables(what: &'static str, s: &str) -> Result<(), InputError> {
    for (_, ident) in variables_in(s) {
        if !VARIABLES.contains(&ident) {
            return Err(InputError::UnknownVariable {
                what,
                value: s.to_string(),
                var: ident.to_string(),
            });
        }
    }
    Ok(())
}

/// `s` with each known variable replaced by its value from `vars`.
pub fn expand(what: &'static str, s: &str, vars: &[(&str, &str)]) -> Result<String, InputError> {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (range, ident) in variables_in(s) {
        let Some((_, value)) = vars.iter().find(|(k, _)| *k == ident) else {
            return Err(InputError::UnknownVariable {
                what,
                value: s.to_string(),
                var: ident.to_string(),
            });
        };
        out.push_str(&s[last..range.start]);
        out.push_str(value);
        last = range.end;
    }
    out.push_str(&s[last..]);
    Ok(out)
}

/// An absolute path (possibly starting with a variable that expands to one, like
/// `{state}/config`), without `..` components.
fn absolute_path(what: &'static str, whole: &str, p: &str) -> Result<(), InputError> {
    if !(p.starts_with('/') || p.starts_with("{state}")) {
        return Err(invalid(what, whole, "paths must be absolute"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(invalid(what, whole, "paths must not contain '..'"));
    }
    variables(what, p)
}

/// `TARGET=SOURCE` of `--redirect`: the program sees SOURCE at TARGET.
pub fn redirect(s: &str) -> Result<(String, String), InputError> {
    let (target, source) = s
        .split_once('=')
        .ok_or_else(|| invalid("redirect", s, "expected TARGET=SOURCE"))?;
    if !target.starts_with('/') {
        return Err(invalid("redirect", s, "target must be an absolute path"));
    }
    if target.trim_end_matches('/').is_empty() {
        return Err(invalid("redirect", s, "target must not be /"));
    }
    variables("redirect", s)?;
    if !(source.starts_with('/') || source.starts_with("{state}")) {
        return Err(invalid(
            "redirect",
            s,
            "source must be an absolute path (or start with {state})",
        ));
    }
    absolute_path("redirect", s, target)?;
    absolute_path("redirect", s, source)?;
    Ok((target.to_string(), source.to_string()))
}

/// `HOST_DIR:PATH[:shared]` of `--volume`.
pub fn volume(s: &str) -> Result<crate::api::Volume, InputError> {
    let (rest, shared) = match s.strip_suffix(":shared") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (host, inside) = rest.split_once(':').ok_or_else(|| {
        invalid(
            "volume",
            s,
            "expected HOST_DIR:PATH or HOST_DIR:PATH:shared",
        )
    })?;
    absolute_path("volume", s, host)?;
    if !inside.starts_with('/') || inside.trim_end_matches('/').is_empty() {
        return Err(invalid(
            "volume",
            s,
            "path inside must be absolute and not /",
        ));
    }
    if inside.contains(':') {
        return Err(invalid(
            "volume",
            s,
            "the only option after PATH is :shared",
        ));
    }
    absolute_path("volume", s, inside)?;
    Ok(crate::api::Volume {
        host: host.to_string(),
        inside: inside.to_string(),
        shared,
    })
}

/// `--rootfs DIR`.
pub fn rootfs(s: &str) -> Result<(), InputError> {
    absolute_path("rootfs", s, s)?;
    if s.trim_end_matches('/').is_empty() {
        return Err(invalid("rootfs", s, "must not be / itself"));
    }
    Ok(())
}

/// Capability names as `capabilities(7)` gives them without the `CAP_` prefix, indexed by
/// number.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities an instance's root holds unless told otherwise: the set mainstream
/// container engines give (Docker's default), everything else dropped.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The bit of capability `name` (`NET_ADMIN`, `cap_net_admin`), or all bits for `ALL`.
pub fn capability(name: &str) -> Result<u64, InputError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" {
        return Ok((1u64 << CAPABILITIES.len()) - 1);
    }
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|n| 1u64 << n)
        .ok_or_else(|| {
            invalid(
                "capability",
                name,
                "not a Linux capability (see capabilities(7))",
            )
        })
}

/// The capability set of an instance: the default set less `drop`, plus `add`; a capability
/// dropped by name stays dropped even with `--cap-add ALL`.
pub fn capability_set(add: &[String], drop: &[String]) -> Result<u64, InputError> {
    let mut set = 0u64;
    for c in DEFAULT_CAPABILITIES {
        set |= capability(c)?;
    }
    let drops = drop
        .iter()
        .map(|c| capability(c))
        .collect::<Result<Vec<_>, _>>()?;
    let adds = add
        .iter()
        .map(|c| capability(c))
        .collect::<Result<Vec<_>, _>>()?;
    for d in &drops {
        set &= !d;
    }
    for a in adds {
        // An explicit drop of one capability still holds against `--cap-add ALL`.
        let all = a.count_ones() > 1;
        set |= if all {
            a & !drops
                .iter()
                .filter(|d| d.count_ones() == 1)
                .fold(0, |m, d| m | d)
        } else {
            a
        };
    }
    Ok(set)
}

/// Names of the capabilities in `set`, in number order.
pub fn capability_names(set: u64) -> Vec<&'static str> {
    CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(n, _)| set & (1 << n) != 0)
        .map(|(_, c)| *c)
        .collect()
}

#[cfg(test)]
mod tests;

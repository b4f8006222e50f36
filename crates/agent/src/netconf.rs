//! Network configuration of an instance's namespace: its TUN device, address and route
//! (through iproute2), the nftables rules that make a refused connection fail at once, and
//! the /etc/hosts that resolves the names of its net's members.
//!
//! The rules inside the namespace only make refusals friendly (connect() and sendto() fail
//! with EPERM instead of timing out); a root program inside can remove them, and the switch
//! still drops what they would have refused: the switch is the boundary, these are manners.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use vane_proto::validate::{PortSpec, Proto};

/// Name of the TUN device inside every instance's namespace.
pub const TUN_NAME: &str = "vane0";
/// Bytes the underlay adds to every tunnelled packet beyond the inner IPv4 packet: outer
/// IPv4 and UDP headers (28), the tunnel's data header and AEAD tag (32), the frame header
/// with the flags and both nets (12).
pub const ENCAPSULATION: usize = 28 + vane_tunnel::DATA_OVERHEAD + vane_wire::overlay::NETS_LEN;

/// MTU of the underlay device this host reaches `dst` through (`ip route get`), if iproute2
/// can tell.
pub fn underlay_mtu(dst: std::net::IpAddr) -> Option<usize> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &dst.to_string()])
        .output()
        .ok()?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let dev = routes.get(0)?.get("dev")?.as_str()?.to_string();
    let out = Command::new("ip")
        .args(["-j", "link", "show", "dev", &dev])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mtu = links.get(0)?.get("mtu")?.as_u64()?;
    usize::try_from(mtu).ok()
}

/// Runs a command, turning a non-zero exit into an error carrying its stderr.
pub fn run(cmd: &mut Command, input: Option<&str>) -> io::Result<()> {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("run {:?}: {e}", cmd.get_program())))?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return Err(io::Error::other(format!(
            "{} {} failed: {}",
            cmd.get_program().to_string_lossy(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

pub fn netns_path(netns: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(netns)
}

/// Makes the named network namespace, owned by the user namespace `owner` when given (an
/// instance's: its root then holds its capabilities over its own network, such as raw
/// sockets, and CRIU finds every namespace of the instance in its user namespace).
pub fn create_netns(netns: &str, owner: Option<&std::os::fd::OwnedFd>) -> io::Result<()> {
    use std::os::fd::AsFd;
    let Some(owner) = owner else {
        return run(Command::new("ip").args(["netns", "add", netns]), None);
    };
    let holder = vane_sys::confine::Holder::spawn(Some(owner.as_fd()), libc::CLONE_NEWNET)
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {netns}: {e}")))?;
    run(
        Command::new("ip").args(["netns", "attach", netns, &holder.pid().to_string()]),
        None,
    )
}

pub fn delete_netns(netns: &str) -> io::Result<()> {
    if !netns_path(netns).exists() {
        return Ok(());
    }
    run(Command::new("ip").args(["netns", "delete", netns]), None)
}

/// Brings up loopback and the instance's TUN device with its address, and turns IPv6 off
/// (instances are IPv4-only; the switch drops IPv6 anyway). Routes come with the rules.
pub fn configure(netns: &str, ip: Ipv4Addr, mtu: usize) -> io::Result<()> {
    let batch = format!(
        "link set lo up\n\
         link set {TUN_NAME} mtu {mtu} up\n\
         addr add {ip}/32 dev {TUN_NAME}\n"
    );
    run(
        Command::new("ip").args(["-n", netns, "-batch", "-"]),
        Some(&batch),
    )?;
    run(
        Command::new("ip").args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]),
        None,
    )
}

/// What an instance may reach, from its net and the policies that name it.
///
/// Refusals are made friendly in two layers inside the instance's namespace:
/// - routes: the instance's own subnet and the subnets of nets that share a policy with it
///   go to the TUN device, and so does the default route; the rest of the global space is a
///   `prohibit` route, so connect() and sendto() to another net fail at once with EACCES;
/// - nftables: to a routed net, only what a policy allows may open a flow (plus replies);
///   anything else, and without egress anything outside the global space, is rejected at
///   once (EPERM for datagrams, "administratively prohibited" for connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRules {
    pub own: Ipv4Net,
    /// (subnet, port) pairs allowed by policies from the instance's net; `None` allows
    /// every protocol.
    pub allowed: Vec<(Ipv4Net, Option<PortSpec>)>,
    /// Subnets of every net that shares a policy with the instance's net, either way: they
    /// need a route, if only for replies.
    pub routed: Vec<Ipv4Net>,
    pub global_space: Ipv4Net,
    pub egress: bool,
}

impl OutboundRules {
    /// The nftables ruleset, replacing any previous one atomically.
    pub fn render_nft(&self) -> String {
        let mut r = String::new();
        r.push_str("table inet vane\nflush table inet vane\ntable inet vane {\n");
        r.push_str("  chain output {\n    type filter hook output priority 0; policy accept;\n");
        r.push_str("    oif \"lo\" accept\n    meta nfproto ipv6 drop\n");
        r.push_str("    ct state established,related accept\n");
        let _ = writeln!(r, "    ip daddr {} accept", self.own);
        for (subnet, port) in &self.allowed {
            match port {
                None => {
                    let _ = writeln!(r, "    ip daddr {subnet} accept");
                }
                Some(p) => {
                    let proto = match p.proto {
                        Proto::Tcp => "tcp",
                        Proto::Udp => "udp",
                    };
                    let _ = writeln!(r, "    ip daddr {subnet} {proto} dport {} accept", p.port);
                }
            }
        }
        let _ = writeln!(
            r,
            "    ip daddr {} reject with icmpx type admin-prohibited",
            self.global_space
        );
        if !self.egress {
            r.push_str("    reject with icmpx type admin-prohibited\n");
        }
        r.push_str("  }\n}\n");
        r
    }

    /// `ip -batch` lines that make the routes what these rules want, removing the routes
    /// of `previous` that are no longer wanted.
    pub fn render_routes(&self, previous: Option<&OutboundRules>) -> String {
        let mut r = String::new();
        // The default route always leads to the switch; without egress, nftables refuses
        // what would leave the global space.
        let _ = writeln!(r, "route replace prohibit {}", self.global_space);
        let _ = writeln!(r, "route replace default dev {TUN_NAME}");
        let _ = writeln!(r, "route replace {} dev {TUN_NAME}", self.own);
        for subnet in &self.routed {
            let _ = writeln!(r, "route replace {subnet} dev {TUN_NAME}");
        }
        if let Some(prev) = previous {
            for subnet in &prev.routed {
                if !self.routed.contains(subnet) && *subnet != self.own {
                    let _ = writeln!(r, "route del {subnet} dev {TUN_NAME}");
                }
            }
        }
        r
    }
}

/// Applies `rules` in the namespace `netns` (replacing `previous`, if any).
pub fn apply_rules(
    netns: &str,
    rules: &OutboundRules,
    previous: Option<&OutboundRules>,
) -> io::Result<()> {
    run(
        Command::new("ip").args(["-n", netns, "-batch", "-"]),
        Some(&rules.render_routes(previous)),
    )?;
    run(
        Command::new("ip").args(["netns", "exec", netns, "nft", "-f", "-"]),
        Some(&rules.render_nft()),
    )
}

/// /etc/hosts of an instance: itself first, then the other members of its net.
pub fn render_hosts(own: (&str, &str, Ipv4Addr), members: &[(String, String, Ipv4Addr)]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n");
    let line = |out: &mut String, name: &str, hostname: &str, ip: Ipv4Addr| {
        if name == hostname {
            let _ = writeln!(out, "{ip}\t{hostname}");
        } else {
            let _ = writeln!(out, "{ip}\t{hostname} {name}");
        }
    };
    line(&mut out, own.0, own.1, own.2);
    for (name, hostname, ip) in members {
        if name != own.0 {
            line(&mut out, name, hostname, *ip);
        }
    }
    out
}

/// Rewrites `path` in place. The file is bind-mounted into the instance, so it must keep
/// its inode: a rename would leave the instance looking at the old file.
pub fn rewrite_in_place(path: &Path, content: &str) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(content.as_bytes())
}

/// The host side of egress: a TUN device that the switch writes egress packets to (their
/// source already rewritten to a per-instance address of the egress space), with a route
/// back and masquerading onto whatever interface leads out.
pub fn setup_egress(device: &str, egress_space: Ipv4Net) -> io::Result<()> {
    run(
        Command::new("ip").args(["-batch", "-"]),
        Some(&format!(
            "link set {device} up\nroute replace {egress_space} dev {device}\n"
        )),
    )?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    let rules = format!(
        "table ip vane_egress\nflush table ip vane_egress\ntable ip vane_egress {{\n  \
         chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {egress_space} oifname != \"{device}\" masquerade\n  }}\n}}\n"
    );
    run(Command::new("nft").args(["-f", "-"]), Some(&rules))
}

/// The host's NAT for published ports, the whole table at once: each `(publish, to)` sends
/// new connections to the host port (at the address given, or at any of the host's own)
/// on to `to`, the instance's egress address, which leads to the switch (`setup_egress`).
/// Only the destination changes: the program sees its client's address. The output chain
/// does the same for the host's own programs.
pub fn render_published(rules: &[(vane_proto::validate::Publish, Ipv4Addr)]) -> String {
    let mut lines = String::new();
    for (p, to) in rules {
        let at = match p.host_ip {
            Some(ip) => format!("ip daddr {ip}"),
            None => "fib daddr type local".to_string(),
        };
        let proto = p.proto.as_str();
        let _ = writeln!(
            lines,
            "    {at} {proto} dport {} dnat to {to}:{}",
            p.host_port, p.port
        );
    }
    let mut r = String::from(
        "table ip vane_publish\nflush table ip vane_publish\ntable ip vane_publish {\n",
    );
    for (chain, hook, priority) in [
        ("prerouting", "prerouting", "dstnat"),
        ("output", "output", "-100"),
    ] {
        let _ = writeln!(
            r,
            "  chain {chain} {{\n    type nat hook {hook} priority {priority}; policy accept;"
        );
        r.push_str(&lines);
        r.push_str("  }\n");
    }
    r.push_str("}\n");
    r
}

/// Applies `render_published` in the agent's own namespace.
pub fn apply_published(rules: &[(vane_proto::validate::Publish, Ipv4Addr)]) -> io::Result<()> {
    run(
        Command::new("nft").args(["-f", "-"]),
        Some(&render_published(rules)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_become_dnat_rules_at_their_addresses() {
        let rules = [
            ("8080:80".parse().unwrap(), Ipv4Addr::new(100, 64, 0, 3)),
            (
                "198.18.0.1:5353:53/udp".parse().unwrap(),
                Ipv4Addr::new(100, 64, 0, 4),
            ),
        ];
        let nft = render_published(&rules);
        assert!(nft.starts_with("table ip vane_publish\nflush table ip vane_publish\n"));
        for chain in ["prerouting", "output"] {
            assert!(nft.contains(&format!("chain {chain} {{")), "{nft}");
        }
        let any = "    fib daddr type local tcp dport 8080 dnat to 100.64.0.3:80\n";
        let at = "    ip daddr 198.18.0.1 udp dport 5353 dnat to 100.64.0.4:53\n";
        assert_eq!(nft.matches(any).count(), 2, "{nft}");
        assert_eq!(nft.matches(at).count(), 2, "{nft}");
        // Nothing published: the table stays, empty.
        assert!(!render_published(&[]).contains("dnat"));
    }

    #[test]
    fn rules_render_policies() {
        let red: Ipv4Net = "10.10.2.0/24".parse().unwrap();
        let teal: Ipv4Net = "10.30.0.0/24".parse().unwrap();
        let blue: Ipv4Net = "10.40.0.0/24".parse().unwrap();
        let rules = OutboundRules {
            own: "10.20.0.0/24".parse().unwrap(),
            allowed: vec![(red, Some("80/tcp".parse().unwrap())), (teal, None)],
            routed: vec![red, teal, blue],
            global_space: "10.0.0.0/8".parse().unwrap(),
            egress: false,
        };
        let r = rules.render_nft();
        assert!(r.contains("ip daddr 10.20.0.0/24 accept"));
        assert!(r.contains("ip daddr 10.10.2.0/24 tcp dport 80 accept"));
        assert!(r.contains("ip daddr 10.30.0.0/24 accept"));
        assert!(!r.contains("ip daddr 10.40.0.0/24"));
        assert!(r.contains("ip daddr 10.0.0.0/8 reject"));
        assert!(r.contains("    reject with icmpx type admin-prohibited\n  }"));
        let routes = rules.render_routes(None);
        assert!(routes.contains("route replace prohibit 10.0.0.0/8\n"));
        assert!(routes.contains("route replace default dev vane0\n"));
        assert!(routes.contains("route replace 10.40.0.0/24 dev vane0\n"));
        let egress = OutboundRules {
            egress: true,
            routed: vec![red],
            ..rules.clone()
        };
        assert!(!egress
            .render_nft()
            .contains("    reject with icmpx type admin-prohibited\n  }"));
        let routes = egress.render_routes(Some(&rules));
        assert!(routes.contains("route replace default dev vane0\n"));
        assert!(routes.contains("route del 10.30.0.0/24 dev vane0\n"));
        assert!(routes.contains("route del 10.40.0.0/24 dev vane0\n"));
        assert!(!routes.contains("route del 10.10.2.0/24"));
    }

    #[test]
    fn hosts_file() {
        let h = render_hosts(
            ("cli1", "cli1", "10.10.2.2".parse().unwrap()),
            &[
                ("web1".into(), "www".into(), "10.10.2.1".parse().unwrap()),
                ("cli1".into(), "cli1".into(), "10.10.2.2".parse().unwrap()),
            ],
        );
        assert_eq!(
            h,
            "127.0.0.1\tlocalhost\n10.10.2.2\tcli1\n10.10.2.1\twww web1\n"
        );
    }
}

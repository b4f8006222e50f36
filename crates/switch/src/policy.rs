//! Allow rules between nets, compiled for per-packet lookup.
//!
//! Nets are isolated by default (the outgoing and incoming checks); a rule opens one
//! direction, optionally for one TCP/UDP destination port. The rule list is what the
//! controller sends; per packet the switch needs "which net does this destination belong to,
//! seen from the sender's net, and is this port allowed", so `set_rules` precomputes, for each
//! source net, the short vector of destinations it may reach. A packet then costs one hash
//! probe by source net and a scan of that net's own rules only, never of all rules.
//!
//! Rules are sorted so the first match is stable whatever order the controller sent them in:
//! longest destination prefix first (the most specific net wins where subnets nest), then
//! net id. Making overlapping allows unambiguous is the controller's job; this order only
//! keeps the switch deterministic when it is not done.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use vane_wire::{PROTO_TCP, PROTO_UDP};

use crate::{Map, NetConfig, NetId};

/// A transport protocol a port policy can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl L4Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => PROTO_TCP,
            L4Proto::Udp => PROTO_UDP,
        }
    }
}

/// Allows members of net `from` to open flows to members of net `to`. Replies of an allowed
/// flow pass back; `to` cannot open flows to `from` without a rule of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    /// The net allowed to open flows.
    pub from: NetId,
    /// The net that may be reached.
    pub to: NetId,
    /// Only this protocol and destination port; `None` allows every protocol, ICMP included.
    pub port: Option<(L4Proto, u16)>,
}

/// One compiled rule: a destination subnet reachable from some net.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) subnet: Ipv4Net,
    pub(crate) net: NetId,
    /// `(IP protocol number, destination port)`, or any.
    pub(crate) port: Option<(u8, u16)>,
}

impl Route {
    fn matches(&self, dst: Ipv4Addr, proto: u8, dst_port: u16) -> bool {
        self.subnet.contains(&dst) && self.port.is_none_or(|p| p == (proto, dst_port))
    }

    /// Sort key: most specific subnet first, then net id, then port (any-port first).
    fn order(&self) -> (std::cmp::Reverse<u8>, NetId, Option<(u8, u16)>) {
        (
            std::cmp::Reverse(self.subnet.prefix_len()),
            self.net,
            self.port,
        )
    }
}

/// A net that may open flows into another: where replies to it may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Opener {
    pub(crate) subnet: Ipv4Net,
    pub(crate) net: NetId,
}

#[derive(Debug, Default)]
pub(crate) struct Policy {
    rules: Vec<PolicyRule>,
    /// For each source net, the destinations its members may open flows to, in match order.
    outgoing: Map<NetId, Vec<Route>>,
    /// For each net, the nets with a rule into it, in match order: a packet from the net to an
    /// address outside it may be a reply to a flow one of these opened.
    openers: Map<NetId, Vec<Opener>>,
}

impl Policy {
    /// Replaces the rules and compiles them against `nets`.
    pub(crate) fn set_rules(&mut self, rules: Vec<PolicyRule>, nets: &Map<NetId, NetConfig>) {
        self.rules = rules;
        self.compile(nets);
    }

    /// Recompiles after a net changed. Rules naming a net not (yet) known are kept but inert
    /// until the net arrives; rules within one net are inert because a net always reaches
    /// itself.
    pub(crate) fn compile(&mut self, nets: &Map<NetId, NetConfig>) {
        self.outgoing.clear();
        self.openers.clear();
        for rule in &self.rules {
            let (Some(from), Some(to)) = (nets.get(&rule.from), nets.get(&rule.to)) else {
                continue;
            };
            if rule.from == rule.to {
                continue;
            }
            self.outgoing.entry(rule.from).or_default().push(Route {
                subnet: to.subnet,
                net: rule.to,
                port: rule.port.map(|(p, n)| (p.number(), n)),
            });
            self.openers.entry(rule.to).or_default().push(Opener {
                subnet: from.subnet,
                net: rule.from,
            });
        }
        for routes in self.outgoing.values_mut() {
            routes.sort_by_key(Route::order);
            routes.dedup();
            // An any-port route makes the port routes of the same net redundant; they sort
            // after it, so keep the first route per (net) when it is any-port.
            routes.dedup_by(|later, first| first.net == later.net && first.port.is_none());
        }
        for openers in self.openers.values_mut() {
            openers.sort_by_key(|o| (std::cmp::Reverse(o.subnet.prefix_len()), o.net));
            openers.dedup();
        }
    }

    /// The net that a packet from `from` to `dst` (with `proto` and `dst_port`) is allowed to
    /// open a flow into, if any: the first matching route.
    pub(crate) fn route(
        &self,
        from: NetId,
        dst: Ipv4Addr,
        proto: u8,
        dst_port: u16,
    ) -> Option<NetId> {
        self.outgoing
            .get(&from)?
            .iter()
            .find(|r| r.matches(dst, proto, dst_port))
            .map(|r| r.net)
    }

    /// Whether some rule lets `from` open a flow to `dst` in net `to`. Unlike [`Self::route`]
    /// the destination net is given (it came with a tunnel frame or a flow key), so this asks
    /// whether any rule allows it, not which rule matches first.
    pub(crate) fn allows(
        &self,
        from: NetId,
        to: NetId,
        dst: Ipv4Addr,
        proto: u8,
        dst_port: u16,
    ) -> bool {
        self.outgoing.get(&from).is_some_and(|rs| {
            rs.iter()
                .any(|r| r.net == to && r.matches(dst, proto, dst_port))
        })
    }

    /// The nets with a rule into `to`, in match order.
    pub(crate) fn openers(&self, to: NetId) -> &[Opener] {
        self.openers.get(&to).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(id: NetId, subnet: &str) -> (NetId, NetConfig) {
        let subnet = subnet.parse().unwrap();
        (
            id,
            NetConfig {
                id,
                subnet,
                egress: false,
            },
        )
    }

    #[test]
    fn most_specific_subnet_wins_whatever_the_rule_order() {
        let nets: Map<_, _> = [
            net(1, "10.1.0.0/16"),
            net(2, "10.2.0.0/16"),
            net(3, "10.2.5.0/24"),
        ]
        .into_iter()
        .collect();
        let to = |to| PolicyRule {
            from: 1,
            to,
            port: None,
        };
        let dst = Ipv4Addr::new(10, 2, 5, 1);
        for rules in [vec![to(2), to(3)], vec![to(3), to(2)]] {
            let mut p = Policy::default();
            p.set_rules(rules, &nets);
            assert_eq!(p.route(1, dst, 6, 80), Some(3));
            assert_eq!(p.route(1, Ipv4Addr::new(10, 2, 6, 1), 6, 80), Some(2));
            assert_eq!(p.route(2, dst, 6, 80), None);
        }
    }

    #[test]
    fn port_rules_and_inert_rules() {
        let nets: Map<_, _> = [net(1, "10.1.0.0/16"), net(2, "10.2.0.0/16")]
            .into_iter()
            .collect();
        let mut p = Policy::default();
        p.set_rules(
            vec![
                PolicyRule {
                    from: 1,
                    to: 2,
                    port: Some((L4Proto::Udp, 53)),
                },
                PolicyRule {
                    from: 1,
                    to: 9,
                    port: None,
                }, // unknown net
                PolicyRule {
                    from: 1,
                    to: 1,
                    port: None,
                }, // same net
            ],
            &nets,
        );
        let dst = Ipv4Addr::new(10, 2, 0, 1);
        assert_eq!(p.route(1, dst, PROTO_UDP, 53), Some(2));
        assert_eq!(p.route(1, dst, PROTO_TCP, 53), None);
        assert!(p.allows(1, 2, dst, PROTO_UDP, 53));
        assert!(!p.allows(1, 2, Ipv4Addr::new(10, 3, 0, 1), PROTO_UDP, 53));
        assert_eq!(p.openers(2).len(), 1);
        assert!(p.openers(1).is_empty());
    }
}

//! What the resolver answers, from the directory alone: no sockets, no clock. `Zone` is the
//! view (nets, members, policies) indexed for names; `answer` decides what one query gets
//! for the instance that asked (`Client`).
//!
//! An instance of net A sees the names of the nets it may reach: A itself, and each net B
//! that a policy from A to B lets it open connections to (whatever its ports). There,
//! `NAME` (a member of A), `NAME.B` and the reverse names of their addresses answer. Every
//! other name is treated alike, whether a net of that name exists or not: sent on to the
//! host's resolvers when A has egress, else "no such name". So the names of a net that A
//! may not reach answer exactly as names nobody made, and nothing tells them apart.
//!
//! A service's name answers like a member's, with the service's virtual address, where
//! the net is visible: `NAME` in its own net, `NAME.NET` from nets that reach it. The
//! controller keeps service names apart from its net's instance names.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;

use vane_proto::stream::AgentView;

/// Time to live of every answer: none, so that an answer changes with the directory at
/// once, whatever caches the instance runs.
const TTL: u32 = 0;
/// The largest UDP answer offered to clients that speak EDNS (the DNS flag day's size:
/// no fragments on common paths).
pub(crate) const EDNS_PAYLOAD: u16 = 1232;

/// The directory as the resolver reads it.
#[derive(Debug, Default)]
pub(crate) struct Zone {
    nets: BTreeMap<u32, NetZone>,
    /// Net name -> id.
    by_name: BTreeMap<String, u32>,
    /// Net id -> the nets a policy lets it reach (itself not included).
    reach: BTreeMap<u32, BTreeSet<u32>>,
}

#[derive(Debug)]
struct NetZone {
    name: String,
    subnet: Ipv4Net,
    egress: bool,
    members: Vec<Entry>,
    /// Services by name, with their virtual addresses.
    services: Vec<(String, Ipv4Addr)>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    hostname: String,
    ip: Ipv4Addr,
}

/// The instance that asks: its net and itself (which answers even before a view lists it).
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) net: u32,
    pub(crate) net_name: String,
    pub(crate) egress: bool,
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) ip: Ipv4Addr,
}

impl Client {
    pub(crate) fn of(spec: &vane_proto::stream::InstanceSpec) -> Client {
        Client {
            net: spec.net.id,
            net_name: spec.net.name.clone(),
            egress: spec.net.egress,
            name: spec.name.clone(),
            hostname: spec.hostname.clone(),
            ip: spec.ip,
        }
    }
}

/// What to do with a query.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// This answer.
    Answer(Message),
    /// Not a name of the instance's world, and its net has egress: the host's resolvers
    /// answer it.
    Forward,
}

impl Zone {
    pub(crate) fn from_view(view: &AgentView) -> Zone {
        let mut nets: BTreeMap<u32, NetZone> = view
            .nets
            .iter()
            .map(|n| {
                (
                    n.id,
                    NetZone {
                        name: n.name.clone(),
                        subnet: n.subnet,
                        egress: n.egress,
                        members: Vec::new(),
                        services: Vec::new(),
                    },
                )
            })
            .collect();
        for m in &view.members {
            if let Some(net) = nets.get_mut(&m.net) {
                net.members.push(Entry {
                    name: m.name.clone(),
                    hostname: m.hostname.clone(),
                    ip: m.ip,
                });
            }
        }
        for v in &view.services {
            if let Some(net) = nets.get_mut(&v.net) {
                net.services.push((v.name.to_ascii_lowercase(), v.vip));
            }
        }
        let by_name = nets.iter().map(|(id, n)| (n.name.clone(), *id)).collect();
        let mut reach: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for p in &view.policies {
            if p.from != p.to {
                reach.entry(p.from).or_default().insert(p.to);
            }
        }
        Zone {
            nets,
            by_name,
            reach,
        }
    }

    /// Whether an instance of net `from` may see the names of net `to`.
    fn reaches(&self, from: u32, to: u32) -> bool {
        from == to || self.reach.get(&from).is_some_and(|r| r.contains(&to))
    }

    /// The nets `client` may see, its own first.
    fn visible<'a>(&'a self, client: &'a Client) -> impl Iterator<Item = (u32, &'a NetZone)> {
        let own = self.nets.get(&client.net).map(|n| (client.net, n));
        let others = self
            .reach
            .get(&client.net)
            .into_iter()
            .flatten()
            .filter_map(|id| Some((*id, self.nets.get(id)?)));
        own.into_iter().chain(others)
    }

    /// Whether `client`'s net has egress (as the view says, else as its spec said).
    fn egress(&self, client: &Client) -> bool {
        self.nets
            .get(&client.net)
            .map_or(client.egress, |n| n.egress)
    }
}

impl NetZone {
    /// The addresses `label` (lowercase) names in this net: a service by name, else
    /// members by name, else by hostname.
    fn lookup(&self, label: &str) -> Vec<Ipv4Addr> {
        if let Some((_, vip)) = self.services.iter().find(|(name, _)| name == label) {
            return vec![*vip];
        }
        let by_name: Vec<Ipv4Addr> = self
            .members
            .iter()
            .filter(|m| m.name == label)
            .map(|m| m.ip)
            .collect();
        if !by_name.is_empty() {
            return by_name;
        }
        self.members
            .iter()
            .filter(|m| m.hostname == label)
            .map(|m| m.ip)
            .collect()
    }
}

/// Where a name points in the instance's world.
enum Found {
    /// Addresses of a name of the zone (none: the name exists, not with this type).
    Addresses(Vec<Ipv4Addr>),
    /// The name of an address.
    Name(Name),
    /// Below a zone the instance sees, but nothing there.
    Nothing,
    /// Not a name of the instance's world.
    Outside,
}

/// The answer to `query` for `client`, from `zone`.
pub(crate) fn answer(zone: &Zone, client: &Client, query: &Message) -> Outcome {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.checking_disabled = query.metadata.checking_disabled;
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    if query.metadata.message_type != MessageType::Query {
        reply.metadata.response_code = ResponseCode::FormErr;
        return Outcome::Answer(reply);
    }
    if query.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return Outcome::Answer(reply);
    }
    let [question] = query.queries.as_slice() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return Outcome::Answer(reply);
    };
    reply.add_query(question.clone());
    let egress = zone.egress(client);
    reply.metadata.recursion_available = egress;
    if question.query_class() != DNSClass::IN {
        reply.metadata.response_code = ResponseCode::Refused;
        return Outcome::Answer(reply);
    }
    let name = question.name();
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    let found = find(zone, client, &labels);
    let qtype = question.query_type();
    match found {
        Found::Outside if egress => return Outcome::Forward,
        Found::Outside | Found::Nothing => {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        Found::Addresses(ips) => {
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                for ip in ips {
                    reply.add_answer(Record::from_rdata(name.clone(), TTL, RData::A(A(ip))));
                }
            }
        }
        Found::Name(target) => {
            if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                reply.add_answer(Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
            }
        }
    }
    // Ours alone says so, be it "no such name" for what lies outside.
    reply.metadata.authoritative = true;
    Outcome::Answer(reply)
}

fn find(zone: &Zone, client: &Client, labels: &[String]) -> Found {
    match labels {
        [name] => {
            let mut ips = zone
                .nets
                .get(&client.net)
                .map(|n| n.lookup(name))
                .unwrap_or_default();
            if ips.is_empty() && (*name == client.name || *name == client.hostname) {
                ips.push(client.ip);
            }
            if ips.is_empty() {
                Found::Outside
            } else {
                Found::Addresses(ips)
            }
        }
        [name, net] => {
            let Some(id) = zone.by_name.get(net.as_str()).copied() else {
                return if *net == client.net_name {
                    own_fallback(client, name)
                } else {
                    Found::Outside
                };
            };
            if !zone.reaches(client.net, id) {
                return Found::Outside;
            }
            let mut ips = zone.nets[&id].lookup(name);
            if ips.is_empty() && id == client.net {
                return own_fallback(client, name);
            }
            ips.dedup();
            if ips.is_empty() {
                Found::Nothing
            } else {
                Found::Addresses(ips)
            }
        }
        [a, b, c, d, in_addr, arpa] if in_addr == "in-addr" && arpa == "arpa" => {
            let octets: Option<Vec<u8>> = [d, c, b, a].iter().map(|o| octet(o)).collect();
            let Some(o) = octets else {
                return Found::Outside;
            };
            let ip = Ipv4Addr::new(o[0], o[1], o[2], o[3]);
            reverse(zone, client, ip)
        }
        _ => Found::Outside,
    }
}

/// The instance itself, by its name within its own net, before a view lists it.
fn own_fallback(client: &Client, name: &str) -> Found {
    if name == client.name || name == client.hostname {
        Found::Addresses(vec![client.ip])
    } else {
        Found::Nothing
    }
}

/// An address label: decimal, no leading zero, at most 255.
fn octet(label: &str) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label.starts_with('0')) {
        return None;
    }
    if !label.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    label.parse().ok()
}

fn reverse(zone: &Zone, client: &Client, ip: Ipv4Addr) -> Found {
    for (_, net) in zone.visible(client) {
        if let Some(m) = net.members.iter().find(|m| m.ip == ip) {
            return fqdn(&m.name, &net.name).map_or(Found::Nothing, Found::Name);
        }
        if let Some((name, _)) = net.services.iter().find(|(_, vip)| *vip == ip) {
            return fqdn(name, &net.name).map_or(Found::Nothing, Found::Name);
        }
        if net.subnet.contains(&ip) {
            return Found::Nothing;
        }
    }
    if ip == client.ip {
        return fqdn(&client.name, &client.net_name).map_or(Found::Nothing, Found::Name);
    }
    Found::Outside
}

fn fqdn(name: &str, net: &str) -> Option<Name> {
    let mut n = Name::from_ascii(format!("{name}.{net}.")).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// The instance's /etc/resolv.conf: the agent's resolver inside its network namespace, and
/// its own net as the search domain (so `NAME` and `NAME.NET` both work).
pub(crate) fn resolv_conf(net: &str) -> String {
    format!(
        "# vane: this host's agent answers at this address inside the instance\n\
         nameserver {}\nsearch {net}\n",
        super::ADDR.ip()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use vane_proto::api::Net;
    use vane_proto::stream::{Member, PolicyRule, ServiceView};

    fn net(id: u32, name: &str, subnet: &str, egress: bool) -> Net {
        Net {
            id,
            name: name.into(),
            tenant: "t".into(),
            subnet: subnet.parse().unwrap(),
            egress,
            created: 0,
        }
    }

    fn member(net: u32, name: &str, ip: &str) -> Member {
        Member {
            net,
            ip: ip.parse().unwrap(),
            name: name.into(),
            hostname: name.into(),
            host: "h1".into(),
            host_id: 1,
            instance: format!("id-{name}"),
            moving_to: None,
            gateway: false,
        }
    }

    /// red (1) may reach blue (2); blue reaches nothing; green (3) has egress and shares a
    /// policy with nobody; secret (4) reaches red, not the other way.
    fn view() -> AgentView {
        let mut www = member(2, "web2", "10.2.0.2");
        www.hostname = "www".into();
        AgentView {
            revision: Default::default(),
            peers: vec![],
            nets: vec![
                net(1, "red", "10.1.0.0/24", false),
                net(2, "blue", "10.2.0.0/24", false),
                net(3, "green", "10.3.0.0/24", true),
                net(4, "secret", "10.4.0.0/24", false),
            ],
            members: vec![
                member(1, "web1", "10.1.0.1"),
                member(1, "cli1", "10.1.0.2"),
                www,
                member(3, "g1", "10.3.0.1"),
                member(4, "s1", "10.4.0.1"),
            ],
            policies: vec![
                PolicyRule {
                    from: 1,
                    to: 2,
                    port: Some("80/tcp".parse().unwrap()),
                },
                PolicyRule {
                    from: 4,
                    to: 1,
                    port: None,
                },
            ],
            services: vec![ServiceView {
                net: 2,
                name: "api".into(),
                vip: ip("10.2.0.254"),
                ports: vec!["80/tcp".parse().unwrap()],
                backends: vec![ip("10.2.0.2")],
            }],
            outside: Vec::new(),
            gateways: Vec::new(),
        }
    }

    fn client(net: u32, net_name: &str, name: &str, ip: &str, egress: bool) -> Client {
        Client {
            net,
            net_name: net_name.into(),
            egress,
            name: name.into(),
            hostname: name.into(),
            ip: ip.parse().unwrap(),
        }
    }

    fn ask(zone: &Zone, c: &Client, name: &str, qtype: RecordType) -> Outcome {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        // Through the wire both ways, as a client's query comes.
        let q = Message::from_vec(&q.to_vec().unwrap()).unwrap();
        match answer(zone, c, &q) {
            Outcome::Answer(m) => {
                assert_eq!(m.metadata.id, q.metadata.id);
                Outcome::Answer(Message::from_vec(&m.to_vec().unwrap()).unwrap())
            }
            f => f,
        }
    }

    fn addresses(o: &Outcome) -> Result<Vec<Ipv4Addr>, ResponseCode> {
        let Outcome::Answer(m) = o else {
            panic!("forwarded: {o:?}")
        };
        if m.metadata.response_code != ResponseCode::NoError {
            return Err(m.metadata.response_code);
        }
        Ok(m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    fn ptr(o: &Outcome) -> Result<Vec<String>, ResponseCode> {
        let Outcome::Answer(m) = o else {
            panic!("forwarded: {o:?}")
        };
        if m.metadata.response_code != ResponseCode::NoError {
            return Err(m.metadata.response_code);
        }
        Ok(m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect())
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn service_names_answer_their_address_where_the_net_is_visible() {
        let zone = Zone::from_view(&view());
        let blue = client(2, "blue", "web2", "10.2.0.2", false);
        for name in ["api", "api.blue.", "API.Blue"] {
            let o = ask(&zone, &blue, name, RecordType::A);
            assert_eq!(addresses(&o), Ok(vec![ip("10.2.0.254")]), "{name}");
        }
        let red = client(1, "red", "cli1", "10.1.0.2", false);
        let o = ask(&zone, &red, "api.blue.", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.2.0.254")]));
        let o = ask(&zone, &red, "254.0.2.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Ok(vec!["api.blue.".to_string()]));
        // Not from a net that does not reach blue.
        let secret = client(4, "secret", "s1", "10.4.0.1", false);
        let o = ask(&zone, &secret, "api.blue.", RecordType::A);
        assert_eq!(addresses(&o), Err(ResponseCode::NXDomain));
    }

    #[test]
    fn own_net_names_answer_bare_and_qualified_in_any_case() {
        let zone = Zone::from_view(&view());
        let c = client(1, "red", "cli1", "10.1.0.2", false);
        for name in ["web1", "web1.red", "web1.red.", "WEB1.Red."] {
            let o = ask(&zone, &c, name, RecordType::A);
            assert_eq!(addresses(&o), Ok(vec![ip("10.1.0.1")]), "{name}");
        }
        // A name that exists, without an address of that type: no error, no answer.
        let o = ask(&zone, &c, "web1.red.", RecordType::AAAA);
        assert_eq!(addresses(&o), Ok(vec![]));
        let o = ask(&zone, &c, "nobody.red.", RecordType::A);
        assert_eq!(addresses(&o), Err(ResponseCode::NXDomain));
    }

    #[test]
    fn a_net_reached_by_policy_answers_only_in_that_direction() {
        let zone = Zone::from_view(&view());
        let red = client(1, "red", "cli1", "10.1.0.2", false);
        let o = ask(&zone, &red, "web2.blue.", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.2.0.2")]));
        // By hostname too.
        let o = ask(&zone, &red, "www.blue.", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.2.0.2")]));
        // Bare names are the own net's only.
        let o = ask(&zone, &red, "web2.", RecordType::A);
        assert_eq!(addresses(&o), Err(ResponseCode::NXDomain));
        // blue may not reach red; secret reaches red but red not secret.
        let blue = client(2, "blue", "web2", "10.2.0.2", false);
        let o = ask(&zone, &blue, "web1.red.", RecordType::A);
        assert_eq!(addresses(&o), Err(ResponseCode::NXDomain));
        let o = ask(&zone, &red, "s1.secret.", RecordType::A);
        assert_eq!(addresses(&o), Err(ResponseCode::NXDomain));
        let secret = client(4, "secret", "s1", "10.4.0.1", false);
        let o = ask(&zone, &secret, "web1.red.", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.1.0.1")]));
    }

    #[test]
    fn names_of_unreachable_nets_answer_as_unknown_names_do() {
        let zone = Zone::from_view(&view());
        // Without egress: the same "no such name", authoritative, for both.
        let red = client(1, "red", "cli1", "10.1.0.2", false);
        let hidden = ask(&zone, &red, "s1.secret.", RecordType::A);
        let unknown = ask(&zone, &red, "s1.nowhere.", RecordType::A);
        let (Outcome::Answer(h), Outcome::Answer(u)) = (&hidden, &unknown) else {
            panic!("forwarded")
        };
        let (mut hm, mut um) = (h.metadata, u.metadata);
        (hm.id, um.id) = (0, 0);
        assert_eq!(hm, um);
        assert_eq!(h.answers.len() + h.authorities.len(), 0);
        assert_eq!(u.answers.len() + u.authorities.len(), 0);
        // With egress, both go to the host's resolvers.
        let green = client(3, "green", "g1", "10.3.0.1", true);
        for name in ["web1.red.", "example.com.", "s1.secret."] {
            assert!(matches!(
                ask(&zone, &green, name, RecordType::A),
                Outcome::Forward
            ));
        }
        assert!(matches!(
            ask(&zone, &green, "1.0.1.10.in-addr.arpa.", RecordType::PTR),
            Outcome::Forward
        ));
        // Its own names stay its own.
        let o = ask(&zone, &green, "g1", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.3.0.1")]));
    }

    #[test]
    fn reverse_names_of_visible_members() {
        let zone = Zone::from_view(&view());
        let red = client(1, "red", "cli1", "10.1.0.2", false);
        let o = ask(&zone, &red, "1.0.1.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Ok(vec!["web1.red.".to_string()]));
        let o = ask(&zone, &red, "2.0.2.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Ok(vec!["web2.blue.".to_string()]));
        // A free address of a visible net, and a member of a net it may not reach.
        let o = ask(&zone, &red, "9.0.1.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Err(ResponseCode::NXDomain));
        let o = ask(&zone, &red, "1.0.4.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Err(ResponseCode::NXDomain));
        // Not addresses.
        let o = ask(&zone, &red, "01.0.1.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Err(ResponseCode::NXDomain));
        let o = ask(&zone, &red, "0.1.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Err(ResponseCode::NXDomain));
    }

    #[test]
    fn the_instance_knows_itself_before_a_view_lists_it() {
        let zone = Zone::from_view(&AgentView::default());
        let c = client(7, "new", "fresh", "10.7.0.5", false);
        let o = ask(&zone, &c, "fresh", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.7.0.5")]));
        let o = ask(&zone, &c, "fresh.new", RecordType::A);
        assert_eq!(addresses(&o), Ok(vec![ip("10.7.0.5")]));
        let o = ask(&zone, &c, "5.0.7.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr(&o), Ok(vec!["fresh.new.".to_string()]));
    }

    #[test]
    fn odd_queries_are_refused_politely() {
        let zone = Zone::from_view(&view());
        let c = client(1, "red", "cli1", "10.1.0.2", false);
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("a.red.").unwrap(),
            RecordType::A,
        ));
        q.add_query(Query::query(
            Name::from_ascii("b.red.").unwrap(),
            RecordType::A,
        ));
        let Outcome::Answer(m) = answer(&zone, &c, &q) else {
            panic!()
        };
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        let mut q = Message::query();
        let mut question = Query::query(Name::from_ascii("web1.red.").unwrap(), RecordType::A);
        question.set_query_class(DNSClass::CH);
        q.add_query(question);
        let Outcome::Answer(m) = answer(&zone, &c, &q) else {
            panic!()
        };
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn resolv_conf_names_the_resolver_and_the_net() {
        let r = resolv_conf("red");
        assert!(r.contains("nameserver 127.0.0.53\n"));
        assert!(r.contains("search red\n"));
    }
}

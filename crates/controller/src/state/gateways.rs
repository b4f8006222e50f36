//! WireGuard gateways: a member of a net that one stock WireGuard client becomes by
//! connecting to the agent of the gateway's host (`vane gateway add`).
//!
//! A gateway's address is taken like an instance's (the next free one, from the bottom
//! up), and its resolver like a service's address (from the top down), one resolver for
//! all the gateways of a net; both are reserved, so no instance or service gets them. The
//! switches see the gateway as a member of its net placed on its host (`views.rs`), so
//! routes, names and policies treat it as any member. Only the client's public key is
//! kept: a key pair the controller makes is handed out once, in the client's
//! configuration, and forgotten.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use base64::Engine as _;
use ipnet::Ipv4Net;

use vane_proto::api::{Gateway, GatewayCreated, GatewaySpec, HostState, Net};
use vane_proto::validate;

use super::{ApiError, State};
use crate::store::Batch;

/// The MTU the client's interface gets: the gateway's packets travel inside the host's
/// tunnels, so it is that of an instance's device.
const CLIENT_MTU: u16 = 1420;

/// How often the client sends a keepalive, in seconds: a client behind NAT stays reachable.
const KEEPALIVE_SECS: u16 = 25;

impl State {
    pub fn gateway(&self, name: &str) -> Result<&Gateway, ApiError> {
        self.gateways
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown gateway {name:?}")))
    }

    /// Makes gateway `spec`: checks it, places it, gives it its address and resolver, and
    /// answers with the client's configuration. Without a public key in `spec`,
    /// `new_private_key` makes the client's private key, which the configuration carries
    /// and nothing else keeps.
    pub fn create_gateway(
        &mut self,
        spec: GatewaySpec,
        now: u64,
        new_private_key: impl FnOnce() -> [u8; 32],
    ) -> Result<(GatewayCreated, Batch), ApiError> {
        validate::name("gateway name", &spec.name)?;
        let net = self.net(&spec.net)?.clone();
        let given_key = spec
            .public_key
            .as_deref()
            .map(|k| validate::wireguard_key("public key", k))
            .transpose()?;
        if self.gateways.contains_key(&spec.name) {
            return Err(ApiError::Conflict(format!(
                "gateway {:?} already exists",
                spec.name
            )));
        }
        self.check_member_name(&net, &spec.name)?;
        let host = match &spec.host {
            Some(h) => {
                self.check_gateway_host(h)?;
                h.clone()
            }
            None => self.least_loaded_gateway_host()?,
        };
        let ip = match spec.ip {
            Some(ip) => {
                self.check_free_address(&net, ip)?;
                ip
            }
            None => self.free_address(&net)?,
        };
        let resolver = match self.gateways.values().find(|g| g.net == net.name) {
            Some(g) => g.resolver,
            None => self.free_service_address(&net)?,
        };
        let (public_key, private_key) = match given_key {
            Some(key) => (key, None),
            None => {
                let private = clamp(new_private_key());
                let public =
                    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
                (*public.as_bytes(), Some(private))
            }
        };
        let gateway = Gateway {
            name: spec.name,
            net: net.name.clone(),
            host,
            ip,
            resolver,
            public_key: BASE64.encode(public_key),
            created: now,
        };
        let config = self.gateway_config(&gateway, private_key.as_ref())?;
        let mut batch = Batch::default();
        batch.put(&gateway);
        self.gateways.insert(gateway.name.clone(), gateway.clone());
        Ok((GatewayCreated { gateway, config }, batch))
    }

    /// Removes a gateway: once views are pushed, its host takes no packet from its client.
    pub fn remove_gateway(&mut self, name: &str) -> Result<Batch, ApiError> {
        let gateway = self.gateway(name)?.clone();
        self.gateways.remove(name);
        let mut batch = Batch::default();
        batch.delete(&gateway);
        Ok(batch)
    }

    /// The gateway of `net` at `ip`, or whose resolver `ip` is.
    pub(super) fn gateway_at(&self, net: &str, ip: Ipv4Addr) -> Option<&Gateway> {
        self.gateways
            .values()
            .find(|g| g.net == net && (g.ip == ip || g.resolver == ip))
    }

    /// Gateways placed on `host`.
    pub(super) fn gateways_on(&self, host: &str) -> impl Iterator<Item = &Gateway> {
        let host = host.to_string();
        self.gateways.values().filter(move |g| g.host == host)
    }

    /// Checks that a member of `net` (instance, service or gateway) may be named `name`:
    /// the resolver answers each name of a net with one address.
    pub(super) fn check_member_name(&self, net: &Net, name: &str) -> Result<(), ApiError> {
        let taken = |what: &str| {
            Err(ApiError::Conflict(format!(
                "{what} {name:?} of net {:?} has that name already: a net's instances, services and gateways are named apart",
                net.name
            )))
        };
        if self
            .instances
            .values()
            .any(|i| i.net == net.name && i.name == name)
        {
            return taken("instance");
        }
        if self
            .services
            .values()
            .any(|s| s.net == net.name && s.name == name)
        {
            return taken("service");
        }
        if self
            .gateways
            .values()
            .any(|g| g.net == net.name && g.name == name)
        {
            return taken("gateway");
        }
        Ok(())
    }

    /// Checks that `ip` may be given to a new member of `net`: a host address of its
    /// subnet that no instance, service or gateway has.
    pub(super) fn check_free_address(&self, net: &Net, ip: Ipv4Addr) -> Result<(), ApiError> {
        if !net.subnet.contains(&ip) {
            return Err(ApiError::BadRequest(format!(
                "address {ip} is outside net {:?} ({})",
                net.name, net.subnet
            )));
        }
        if ip == net.subnet.network() || ip == net.subnet.broadcast() {
            return Err(ApiError::BadRequest(format!(
                "address {ip} is the network or broadcast address of {}",
                net.subnet
            )));
        }
        if let Some(s) = self.service_at(&net.name, ip) {
            return Err(ApiError::Conflict(format!(
                "address {ip} is service {:?}'s in net {:?}",
                s.name, net.name
            )));
        }
        if let Some(g) = self.gateway_at(&net.name, ip) {
            let what = if g.ip == ip { "address" } else { "resolver" };
            return Err(ApiError::Conflict(format!(
                "address {ip} is the {what} of gateway {:?} in net {:?}",
                g.name, net.name
            )));
        }
        if let Some(other) = self.member_at(&net.name, ip) {
            return Err(ApiError::Conflict(format!(
                "address {ip} is already in use by instance {:?} in net {:?}",
                other.name, net.name
            )));
        }
        Ok(())
    }

    /// Checks that host `name` can take a gateway's client now.
    fn check_gateway_host(&self, name: &str) -> Result<(), ApiError> {
        let host = self
            .hosts
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown host {name:?}")))?;
        if host.gateway.is_none() || host.locator.is_none() {
            return Err(ApiError::BadRequest(format!(
                "host {name:?} takes no WireGuard clients (its agent runs without --gateway-listen)"
            )));
        }
        match host.state {
            HostState::Online => Ok(()),
            HostState::Offline => Err(ApiError::Unavailable(format!("host {name:?} is offline"))),
            HostState::Dead => Err(ApiError::Unavailable(format!(
                "host {name:?} is offline (declared dead)"
            ))),
        }
    }

    /// The online host that takes WireGuard clients with the fewest instances and
    /// gateways.
    fn least_loaded_gateway_host(&self) -> Result<String, ApiError> {
        self.hosts
            .values()
            .filter(|h| h.state == HostState::Online && h.gateway.is_some() && h.locator.is_some())
            .min_by_key(|h| {
                (
                    self.instances_on(&h.name) + self.gateways_on(&h.name).count(),
                    h.name.clone(),
                )
            })
            .map(|h| h.name.clone())
            .ok_or_else(|| {
                ApiError::Unavailable(
                    "no online host takes WireGuard clients: start an agent with --gateway-listen"
                        .into(),
                )
            })
    }

    /// The WireGuard configuration of `gateway`'s client: its address and resolver, its
    /// host's key and endpoint, and the subnets it may reach (its net's, and those of the
    /// nets a policy lets its net reach).
    fn gateway_config(
        &self,
        gateway: &Gateway,
        private_key: Option<&[u8; 32]>,
    ) -> Result<String, ApiError> {
        let net = self.net(&gateway.net)?;
        let host = self
            .hosts
            .get(&gateway.host)
            .ok_or_else(|| ApiError::NotFound(format!("unknown host {:?}", gateway.host)))?;
        let (Some(endpoint), Some(locator)) = (&host.gateway, host.locator) else {
            return Err(ApiError::BadRequest(format!(
                "host {:?} takes no WireGuard clients (its agent runs without --gateway-listen)",
                host.name
            )));
        };
        let mut reached: Vec<Ipv4Net> = self
            .policies
            .values()
            .filter(|p| p.from == net.name)
            .filter_map(|p| self.nets.get(&p.to).map(|n| n.subnet))
            .collect();
        reached.sort();
        reached.dedup();
        Ok(client_config(&ClientConfig {
            gateway,
            private_key: private_key.map(|k| BASE64.encode(k)),
            host_key: &endpoint.public_key,
            endpoint: std::net::SocketAddr::new(locator.ip(), endpoint.port),
            subnet: net.subnet,
            reached: &reached,
        }))
    }
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A new private key for a client, as `wg genkey` makes one.
pub fn new_private_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    clamp(key)
}

/// A Curve25519 private key as WireGuard writes it (`wg genkey` clamps).
pub(super) fn clamp(mut key: [u8; 32]) -> [u8; 32] {
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    key
}

/// What a client's configuration says.
struct ClientConfig<'a> {
    gateway: &'a Gateway,
    /// The client's private key (base64), when the controller made it.
    private_key: Option<String>,
    /// The host's gateway key (base64).
    host_key: &'a str,
    endpoint: std::net::SocketAddr,
    subnet: Ipv4Net,
    /// The subnets of the nets its net may reach, sorted.
    reached: &'a [Ipv4Net],
}

/// A client's configuration in `wg-quick` format.
fn client_config(c: &ClientConfig<'_>) -> String {
    let g = c.gateway;
    let mut s = String::new();
    let endpoint = match c.endpoint.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", c.endpoint.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", c.endpoint.port()),
    };
    let allowed: Vec<String> = std::iter::once(c.subnet)
        .chain(c.reached.iter().copied().filter(|n| *n != c.subnet))
        .map(|n| n.to_string())
        .collect();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "# vane gateway {}: member {:?} of net {:?} at {}, through host {}",
        g.name, g.name, g.net, g.ip, g.host
    );
    let _ = writeln!(s, "[Interface]");
    match &c.private_key {
        Some(k) => {
            let _ = writeln!(s, "PrivateKey = {k}");
        }
        None => {
            let _ = writeln!(s, "# PrivateKey = the private key of {}", g.public_key);
        }
    }
    let _ = writeln!(s, "Address = {}/32", g.ip);
    let _ = writeln!(s, "DNS = {}, {}", g.resolver, g.net);
    let _ = writeln!(s, "MTU = {CLIENT_MTU}");
    let _ = writeln!(s);
    let _ = writeln!(s, "[Peer]");
    let _ = writeln!(s, "PublicKey = {}", c.host_key);
    let _ = writeln!(s, "Endpoint = {endpoint}");
    let _ = writeln!(s, "AllowedIPs = {}", allowed.join(", "));
    let _ = writeln!(s, "PersistentKeepalive = {KEEPALIVE_SECS}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Gateway {
        Gateway {
            name: "web-laptop".into(),
            net: "red".into(),
            host: "h1".into(),
            ip: "10.1.0.7".parse().unwrap(),
            resolver: "10.1.0.254".parse().unwrap(),
            public_key: "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8=".into(),
            created: 1,
        }
    }

    #[test]
    fn a_client_configuration_is_wg_quick_format() {
        let g = gateway();
        let reached = ["10.2.0.0/24".parse().unwrap()];
        let config = client_config(&ClientConfig {
            gateway: &g,
            private_key: Some("cHJpdmF0ZXByaXZhdGVwcml2YXRlcHJpdmF0ZXByaXY=".into()),
            host_key: "aG9zdGhvc3Rob3N0aG9zdGhvc3Rob3N0aG9zdGhvc3Q=",
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            reached: &reached,
        });
        assert_eq!(
            config,
            "# vane gateway web-laptop: member \"web-laptop\" of net \"red\" at 10.1.0.7, through host h1
[Interface]
PrivateKey = cHJpdmF0ZXByaXZhdGVwcml2YXRlcHJpdmF0ZXByaXY=
Address = 10.1.0.7/32
DNS = 10.1.0.254, red
MTU = 1420

[Peer]
PublicKey = aG9zdGhvc3Rob3N0aG9zdGhvc3Rob3N0aG9zdGhvc3Q=
Endpoint = 192.168.1.10:51820
AllowedIPs = 10.1.0.0/24, 10.2.0.0/24
PersistentKeepalive = 25
"
        );
    }

    #[test]
    fn a_client_with_its_own_key_gets_no_private_key() {
        let g = gateway();
        let config = client_config(&ClientConfig {
            gateway: &g,
            private_key: None,
            host_key: "aG9zdGhvc3Rob3N0aG9zdGhvc3Rob3N0aG9zdGhvc3Q=",
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            reached: &[],
        });
        assert!(
            !config.lines().any(|l| l.starts_with("PrivateKey")),
            "{config}"
        );
        assert!(config.contains(&format!(
            "# PrivateKey = the private key of {}\n",
            g.public_key
        )));
        assert!(config.contains("AllowedIPs = 10.1.0.0/24\n"));
    }

    #[test]
    fn a_new_private_key_is_clamped_and_its_public_key_matches() {
        let k = new_private_key();
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 0xc0, 0x40);
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(k));
        assert_ne!(public.as_bytes(), &[0u8; 32]);
    }
}

//! Nets and the policies between them: creation and removal, with the address rules that
//! keep every address naming one member (subnets of one tenant, and of the nets a net may
//! reach, do not overlap).

use ipnet::Ipv4Net;

use vane_proto::api::{Net, NetSpec, Policy, PolicySpec};
use vane_proto::validate::{self, PortSpec};

use super::{ApiError, State};
use crate::store::Batch;

impl State {
    pub fn create_net(&mut self, spec: NetSpec, now: u64) -> Result<(Net, Batch), ApiError> {
        validate::name("net name", &spec.name)?;
        validate::name("tenant", &spec.tenant)?;
        if self.nets.contains_key(&spec.name) {
            return Err(ApiError::Conflict(format!(
                "net {:?} already exists",
                spec.name
            )));
        }
        if spec.subnet.trunc() != spec.subnet {
            return Err(ApiError::BadRequest(format!(
                "subnet {} has host bits set (did you mean {}?)",
                spec.subnet,
                spec.subnet.trunc()
            )));
        }
        if spec.subnet.prefix_len() > 30 {
            return Err(ApiError::BadRequest(format!(
                "subnet {} is too small: a net needs at least a /30",
                spec.subnet
            )));
        }
        if !self.config.global_space.contains(&spec.subnet) {
            return Err(ApiError::BadRequest(format!(
                "subnet {} is outside the global virtual space {}",
                spec.subnet, self.config.global_space
            )));
        }
        // Overlapping subnets are how tenants keep their own address plans; within one
        // tenant they would make addresses ambiguous.
        if let Some(other) = self
            .nets
            .values()
            .find(|n| n.tenant == spec.tenant && overlaps(&n.subnet, &spec.subnet))
        {
            return Err(ApiError::Conflict(format!(
                "subnet {} overlaps net {:?} ({}) of the same tenant {:?}",
                spec.subnet, other.name, other.subnet, spec.tenant
            )));
        }
        self.counters.net += 1;
        let net = Net {
            id: self.counters.net,
            name: spec.name,
            tenant: spec.tenant,
            subnet: spec.subnet,
            egress: spec.egress,
            created: now,
        };
        let mut batch = Batch::default();
        batch.put(&net).counters(&self.counters);
        self.nets.insert(net.name.clone(), net.clone());
        Ok((net, batch))
    }

    pub fn remove_net(&mut self, name: &str) -> Result<Batch, ApiError> {
        let net = self.net(name)?.clone();
        // What still stands in the net refuses its removal, named, with how to remove it.
        let refuse_if_any = |names: Vec<&str>, what: &str, how: &str| -> Result<(), ApiError> {
            if names.is_empty() {
                return Ok(());
            }
            Err(ApiError::Conflict(format!(
                "net {name:?} {what}: {}{how}",
                names.join(", ")
            )))
        };
        refuse_if_any(
            self.instances
                .values()
                .filter(|i| i.net == net.name)
                .map(|i| i.name.as_str())
                .collect(),
            "is used by instances",
            "",
        )?;
        refuse_if_any(
            self.services
                .values()
                .filter(|s| s.net == net.name)
                .map(|s| s.name.as_str())
                .collect(),
            "has services",
            " (vane service rm)",
        )?;
        refuse_if_any(
            self.gateways
                .values()
                .filter(|g| g.net == net.name)
                .map(|g| g.name.as_str())
                .collect(),
            "has gateways",
            " (vane gateway rm)",
        )?;
        let rules: Vec<String> = self
            .policies
            .values()
            .filter(|p| p.from == net.name || p.to == net.name)
            .map(|p| p.id.to_string())
            .collect();
        if !rules.is_empty() {
            return Err(ApiError::Conflict(format!(
                "net {name:?} is named in policies {}: remove them first",
                rules.join(", ")
            )));
        }
        self.nets.remove(name);
        let mut batch = Batch::default();
        batch.delete(&net);
        Ok(batch)
    }

    pub fn add_policy(&mut self, spec: PolicySpec) -> Result<(Policy, Batch), ApiError> {
        if spec.from.contains('/') {
            return self.add_outside_policy(spec);
        }
        let from = self.net(&spec.from)?.clone();
        let to = self.net(&spec.to)?.clone();
        if from.name == to.name {
            return Err(ApiError::BadRequest(format!(
                "net {:?} always reaches itself: a policy needs two different nets",
                from.name
            )));
        }
        if let Some(p) = self
            .policies
            .values()
            .find(|p| p.from == from.name && p.to == to.name && p.port == spec.port)
        {
            return Err(ApiError::Conflict(format!(
                "policy {} already allows this",
                p.id
            )));
        }
        // An address must name one member: from `from`'s point of view its own subnet and
        // the subnets of every net it may reach must not overlap.
        if overlaps(&from.subnet, &to.subnet) {
            return Err(ApiError::Conflict(format!(
                "ambiguous: {:?} ({}) overlaps {:?}'s own subnet {}",
                to.name, to.subnet, from.name, from.subnet
            )));
        }
        for p in self.policies.values().filter(|p| p.from == from.name) {
            let other = self.net(&p.to)?;
            if other.name != to.name && overlaps(&other.subnet, &to.subnet) {
                return Err(ApiError::Conflict(format!(
                    "ambiguous: {:?} may already reach {:?} ({}), which overlaps {:?} ({})",
                    from.name, other.name, other.subnet, to.name, to.subnet
                )));
            }
        }
        Ok(self.record_policy(from.name, to.name, spec.port))
    }

    /// A policy from an outside address range to the published ports of `spec.to`'s
    /// instances (see [`Policy`]).
    fn add_outside_policy(&mut self, spec: PolicySpec) -> Result<(Policy, Batch), ApiError> {
        let range = vane_proto::api::outside_range(&spec.from).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{:?} is neither a net nor an address range like 198.51.100.0/24",
                spec.from
            ))
        })?;
        let to = self.net(&spec.to)?.clone();
        let from = range.trunc().to_string();
        if let Some(p) = self
            .policies
            .values()
            .find(|p| p.from == from && p.to == to.name && p.port == spec.port)
        {
            return Err(ApiError::Conflict(format!(
                "policy {} already allows this",
                p.id
            )));
        }
        Ok(self.record_policy(from, to.name, spec.port))
    }

    fn record_policy(
        &mut self,
        from: String,
        to: String,
        port: Option<PortSpec>,
    ) -> (Policy, Batch) {
        self.counters.policy += 1;
        let policy = Policy {
            id: self.counters.policy,
            from,
            to,
            port,
        };
        let mut batch = Batch::default();
        batch.put(&policy).counters(&self.counters);
        self.policies.insert(policy.id, policy.clone());
        (policy, batch)
    }

    pub fn remove_policy(&mut self, id: u32) -> Result<Batch, ApiError> {
        let policy = self
            .policies
            .remove(&id)
            .ok_or_else(|| ApiError::NotFound(format!("unknown policy {id}")))?;
        let mut batch = Batch::default();
        batch.delete(&policy);
        Ok(batch)
    }
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

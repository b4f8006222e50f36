//! Services: a name and a virtual address in a net, spread by the switches over the
//! instances that joined it (`vane run --service NAME`).
//!
//! The address comes from the net's subnet, from the top down (instances take theirs from
//! the bottom up), and is reserved like an instance's: no instance gets it. So the
//! service's net reaches it without a policy, and a policy to the net covers its services,
//! as it covers its members. The members that take new flows, its backends, are computed
//! for each view: running, on a host that is not dead.

use std::net::Ipv4Addr;

use vane_proto::api::{HostState, Instance, InstanceState, Net, Service, ServiceSpec};
use vane_proto::validate;

use super::{ApiError, State};
use crate::store::Batch;

impl State {
    pub fn service(&self, name: &str) -> Result<&Service, ApiError> {
        self.services
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("unknown service {name:?}")))
    }

    pub fn create_service(
        &mut self,
        spec: ServiceSpec,
        now: u64,
    ) -> Result<(Service, Batch), ApiError> {
        validate::name("service name", &spec.name)?;
        let net = self.net(&spec.net)?.clone();
        if self.services.contains_key(&spec.name) {
            return Err(ApiError::Conflict(format!(
                "service {:?} already exists",
                spec.name
            )));
        }
        self.check_member_name(&net, &spec.name)?;
        if spec.ports.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "service {:?} needs at least one port (--port 80/tcp)",
                spec.name
            )));
        }
        let mut ports = spec.ports;
        ports.sort();
        ports.dedup();
        let vip = self.free_service_address(&net)?;
        let service = Service {
            name: spec.name,
            net: net.name,
            vip,
            ports,
            created: now,
            backends: Vec::new(),
        };
        let mut batch = Batch::default();
        batch.put(&service);
        self.services.insert(service.name.clone(), service.clone());
        Ok((service, batch))
    }

    /// Removes a service. Its members keep running, as plain instances of its net.
    pub fn remove_service(&mut self, name: &str) -> Result<Batch, ApiError> {
        let service = self.service(name)?.clone();
        self.services.remove(name);
        let mut batch = Batch::default();
        batch.delete(&service);
        Ok(batch)
    }

    /// The service with its backends filled in.
    pub fn service_listing(&self, service: &Service) -> Service {
        let mut s = service.clone();
        s.backends = self
            .backends(service)
            .into_iter()
            .map(|i| i.name.clone())
            .collect();
        s
    }

    /// The members of `service` that take new flows: running and not being stopped, on a
    /// host not dead, in address order.
    pub fn backends(&self, service: &Service) -> Vec<&Instance> {
        let mut members: Vec<&Instance> = self
            .instances
            .values()
            .filter(|i| i.service.as_deref() == Some(service.name.as_str()))
            .filter(|i| i.net == service.net && i.state == InstanceState::Running && !i.stopped)
            .filter(|i| {
                self.hosts
                    .get(&i.host)
                    .is_some_and(|h| h.state != HostState::Dead)
            })
            .collect();
        members.sort_by_key(|i| i.ip);
        members
    }

    /// Whether `ip` is the address of a service of `net`.
    pub(super) fn service_at(&self, net: &str, ip: Ipv4Addr) -> Option<&Service> {
        self.services.values().find(|s| s.net == net && s.vip == ip)
    }

    /// Checks that an instance of `net` named `name` may join `service`.
    pub(super) fn check_join(
        &self,
        service: Option<&str>,
        net: &Net,
        name: &str,
    ) -> Result<(), ApiError> {
        self.check_member_name(net, name)?;
        let Some(service) = service else {
            return Ok(());
        };
        let service = self.service(service)?;
        if service.net != net.name {
            return Err(ApiError::BadRequest(format!(
                "service {:?} is in net {:?}, not {:?}: its members run in its net",
                service.name, service.net, net.name
            )));
        }
        Ok(())
    }

    /// The highest address of `net` that no instance, service or gateway has.
    pub(super) fn free_service_address(&self, net: &Net) -> Result<Ipv4Addr, ApiError> {
        let used = self.used_addresses(net);
        net.subnet
            .hosts()
            .rev()
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| super::instances::net_full(net))
    }
}

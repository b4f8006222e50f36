//! `vane net`, `vane policy` and `vane service`: nets, the policies that let one net
//! reach another, and the services spread over their members.

use anyhow::{bail, Result};

use vane_proto::api::{Net, NetSpec, Policy, PolicySpec, Service, ServiceSpec};
use vane_proto::validate::PortSpec;

use super::output::listing;
use super::path_segment;
use crate::cli::{NetCmd, PolicyCmd, ServiceCmd};
use crate::client::Client;

pub fn net(c: &Client, cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::Create {
            name,
            subnet,
            tenant,
            egress,
        } => {
            let net: Net = c.post(
                "/v1/nets",
                &NetSpec {
                    name,
                    subnet,
                    tenant,
                    egress,
                },
            )?;
            println!("{}", net.name);
        }
        NetCmd::Ls(how) => {
            let nets: Vec<Net> = c.get("/v1/nets")?;
            listing(
                how,
                nets,
                &["NAME", "TENANT", "SUBNET", "EGRESS", "ID"],
                |n| n.name.clone(),
                |n| {
                    vec![
                        n.name,
                        n.tenant,
                        n.subnet.to_string(),
                        if n.egress { "yes" } else { "no" }.into(),
                        n.id.to_string(),
                    ]
                },
            );
        }
        NetCmd::Rm { name } => {
            c.delete(&format!("/v1/nets/{}", path_segment(&name)?))?;
            println!("{name}");
        }
    }
    Ok(())
}

pub fn policy(c: &Client, cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Allow { from, to, port } => {
            let port = port.map(|p| p.parse::<PortSpec>()).transpose()?;
            let p: Policy = c.post("/v1/policies", &PolicySpec { from, to, port })?;
            println!("{}", p.id);
        }
        PolicyCmd::Ls(how) => {
            let list: Vec<Policy> = c.get("/v1/policies")?;
            listing(
                how,
                list,
                &["ID", "FROM", "TO", "PORT"],
                |p| p.id.to_string(),
                |p| {
                    vec![
                        p.id.to_string(),
                        p.from,
                        p.to,
                        p.port
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "any".into()),
                    ]
                },
            );
        }
        PolicyCmd::Rm { first, to, port } => {
            let ids: Vec<u32> = match (first.parse::<u32>(), to) {
                (Ok(id), None) => vec![id],
                (_, Some(to)) => {
                    let port = port.map(|p| p.parse::<PortSpec>()).transpose()?;
                    let list: Vec<Policy> = c.get("/v1/policies")?;
                    let ids: Vec<u32> = list
                        .into_iter()
                        .filter(|p| p.from == first && p.to == to)
                        .filter(|p| port.is_none() || p.port == port)
                        .map(|p| p.id)
                        .collect();
                    if ids.is_empty() {
                        bail!("no policy from {first:?} to {to:?}");
                    }
                    ids
                }
                (Err(_), None) => bail!("invalid policy {first:?}: give an id, or FROM TO"),
            };
            for id in ids {
                c.delete(&format!("/v1/policies/{id}"))?;
                println!("{id}");
            }
        }
    }
    Ok(())
}

pub fn service(c: &Client, cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create { name, net, ports } => {
            let ports = ports
                .iter()
                .map(|p| p.parse::<PortSpec>())
                .collect::<Result<Vec<_>, _>>()?;
            let s: Service = c.post("/v1/services", &ServiceSpec { name, net, ports })?;
            println!("{}", s.name);
        }
        ServiceCmd::Ls(how) => {
            let list: Vec<Service> = c.get("/v1/services")?;
            listing(
                how,
                list,
                &["NAME", "NET", "IP", "PORTS", "MEMBERS"],
                |s| s.name.clone(),
                |s| {
                    let ports: Vec<String> = s.ports.iter().map(|p| p.to_string()).collect();
                    vec![
                        s.name,
                        s.net,
                        s.vip.to_string(),
                        ports.join(","),
                        if s.backends.is_empty() {
                            "-".into()
                        } else {
                            s.backends.join(",")
                        },
                    ]
                },
            );
        }
        ServiceCmd::Rm { name } => {
            c.delete(&format!("/v1/services/{}", path_segment(&name)?))?;
            println!("{name}");
        }
    }
    Ok(())
}

//! `vane gateway`: WireGuard gateways, through which a stock WireGuard client becomes a
//! member of a net.

use anyhow::Result;

use vane_proto::api::{Gateway, GatewayCreated, GatewaySpec};
use vane_proto::validate;

use super::output::{age, json, listing};
use super::path_segment;
use crate::cli::{GatewayCmd, Output};
use crate::client::Client;

pub fn gateway(c: &Client, cmd: GatewayCmd) -> Result<()> {
    match cmd {
        GatewayCmd::Add {
            name,
            net,
            host,
            ip,
            public_key,
            output,
        } => {
            let spec = spec(name, net, host, ip, public_key)?;
            let created: GatewayCreated = c.post("/v1/gateways", &spec)?;
            // Only the configuration on stdout: `vane gateway add x --net red > x.conf`.
            match output.output {
                Output::Json => json(&created),
                Output::Table => print!("{}", created.config),
            }
        }
        GatewayCmd::Ls(how) => {
            let list: Vec<Gateway> = c.get("/v1/gateways")?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            listing(
                how,
                list,
                &["NAME", "NET", "IP", "HOST", "RESOLVER", "PUBLIC-KEY", "AGE"],
                |g| g.name.clone(),
                |g| {
                    vec![
                        g.name,
                        g.net,
                        g.ip.to_string(),
                        g.host,
                        g.resolver.to_string(),
                        g.public_key,
                        age(now, g.created),
                    ]
                },
            );
        }
        GatewayCmd::Rm { names } => {
            for name in &names {
                path_segment(name)?;
            }
            for name in names {
                c.delete(&format!("/v1/gateways/{name}"))?;
                println!("{name}");
            }
        }
    }
    Ok(())
}

/// The request of `vane gateway add`, checked as the controller checks it.
fn spec(
    name: String,
    net: String,
    host: Option<String>,
    ip: Option<std::net::Ipv4Addr>,
    public_key: Option<String>,
) -> Result<GatewaySpec> {
    validate::name("gateway name", &name)?;
    validate::name("net name", &net)?;
    if let Some(h) = &host {
        validate::name("host name", h)?;
    }
    let public_key = match public_key {
        Some(k) => {
            validate::wireguard_key("public key", &k)?;
            Some(k.trim().to_string())
        }
        None => None,
    };
    Ok(GatewaySpec {
        name,
        net,
        host,
        ip,
        public_key,
    })
}

#[cfg(test)]
mod tests {
    use super::spec;

    #[test]
    fn gateway_requests_are_checked_before_they_are_sent() {
        let key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
        let ok = spec(
            "laptop".into(),
            "red".into(),
            Some("h1".into()),
            None,
            Some(format!("{key}\n")),
        )
        .unwrap();
        assert_eq!(ok.public_key.as_deref(), Some(key));
        let e = spec("Laptop!".into(), "red".into(), None, None, None).unwrap_err();
        assert!(e.to_string().contains("gateway name"), "{e}");
        let e = spec(
            "laptop".into(),
            "red".into(),
            None,
            None,
            Some("abc".into()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("public key"), "{e}");
        let e = spec(
            "laptop".into(),
            "red".into(),
            Some("H_1".into()),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("host name"), "{e}");
    }
}

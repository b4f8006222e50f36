#[test]
fn capability_sets() {
    use super::*;
    let default = capability_set(&[], &[]).unwrap();
    assert_eq!(capability_names(default).len(), 14);
    assert!(capability_names(default).contains(&"NET_RAW"));
    assert!(!capability_names(default).contains(&"SYS_ADMIN"));
    let s = capability_set(&["net_admin".into()], &["CAP_NET_RAW".into()]).unwrap();
    assert!(capability_names(s).contains(&"NET_ADMIN"));
    assert!(!capability_names(s).contains(&"NET_RAW"));
    let none = capability_set(&[], &["ALL".into()]).unwrap();
    assert_eq!(none, 0);
    let one = capability_set(&["KILL".into()], &["ALL".into()]).unwrap();
    assert_eq!(capability_names(one), vec!["KILL"]);
    let all_but = capability_set(&["ALL".into()], &["SYS_ADMIN".into()]).unwrap();
    assert!(!capability_names(all_but).contains(&"SYS_ADMIN"));
    assert!(capability_names(all_but).contains(&"SYS_MODULE"));
    let e = capability("SYS_FOO").unwrap_err().to_string();
    assert!(e.contains("SYS_FOO"), "{e}");
}

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

#[test]
fn sizes() {
    assert_eq!(size("256M").unwrap(), 256 << 20);
    assert_eq!(size("1G").unwrap(), 1 << 30);
    assert_eq!(size("1gib").unwrap(), 1 << 30);
    assert_eq!(size("512Mi").unwrap(), 512 << 20);
    assert_eq!(size("1.5G").unwrap(), 3 << 29);
    assert_eq!(size("8388608").unwrap(), 8 << 20);
    assert!(size("12Q").is_err());
    assert!(size("lots").is_err());
    assert!(size("1K").is_err(), "below 4M");
    let e = size("12Q").unwrap_err().to_string();
    assert!(e.contains("\"12Q\""), "{e}");
}

#[test]
fn rates_cpus_pids() {
    assert_eq!(rate("50Mbit").unwrap(), 50_000_000);
    assert_eq!(rate("1gbit").unwrap(), 1_000_000_000);
    assert_eq!(rate("800kbit").unwrap(), 800_000);
    assert_eq!(rate("10Mbps").unwrap(), 10_000_000);
    assert_eq!(rate("2.5M").unwrap(), 2_500_000);
    assert!(rate("fast").is_err());
    assert!(rate("5MB/s").is_err());
    assert!(rate("100").is_err(), "below 8kbit");
    assert_eq!(cpus("0.5").unwrap(), 500);
    assert_eq!(cpus("2").unwrap(), 2000);
    assert!(cpus("0").is_err());
    assert!(cpus("half").is_err());
    assert_eq!(pids("100").unwrap(), 100);
    assert!(pids("1").is_err());
    assert!(pids("-3").is_err());
}

#[test]
fn variables_expand() {
    let vars = [
        ("name", "web1"),
        ("state", "/var/lib/x"),
        ("ip", "10.0.0.2"),
    ];
    assert_eq!(
        expand("env", "/srv/{name}/{ip}", &vars).unwrap(),
        "/srv/web1/10.0.0.2"
    );
    assert_eq!(
        expand("env", "{state}/config", &vars).unwrap(),
        "/var/lib/x/config"
    );
    // Braces that are not a variable stay.
    assert_eq!(
        expand("env", r#"{"a": 1} {} {1x}"#, &vars).unwrap(),
        r#"{"a": 1} {} {1x}"#
    );
    let e = expand("env", "/srv/{nmae}", &vars).unwrap_err().to_string();
    assert!(e.contains("unknown variable {nmae}"), "{e}");
    assert!(variables("env", "{hostname}-{net}").is_ok());
    assert!(variables("env", "{user}").is_err());
}

#[test]
fn path_rules() {
    assert_eq!(
        redirect("/etc/app/config={state}/config").unwrap(),
        ("/etc/app/config".into(), "{state}/config".into())
    );
    assert!(redirect("/etc/app/config=/srv/{name}/config").is_ok());
    let e = redirect("/etc/a=relative/x").unwrap_err().to_string();
    assert!(e.contains("source must be an absolute path"), "{e}");
    assert!(redirect("etc/a=/x").is_err());
    assert!(redirect("/=/x").is_err());
    assert!(redirect("/etc/a").is_err());
    assert!(redirect("/etc/a=/x/../y").is_err());
    assert!(redirect("/etc/a=/x/{bogus}").is_err());
    let v = volume("/srv/data:/data").unwrap();
    assert_eq!(
        (v.host.as_str(), v.inside.as_str(), v.shared),
        ("/srv/data", "/data", false)
    );
    let v = volume("/nfs/data:/data:shared").unwrap();
    assert_eq!(
        (v.host.as_str(), v.inside.as_str(), v.shared),
        ("/nfs/data", "/data", true)
    );
    assert_eq!(v.to_string(), "/nfs/data:/data:shared");
    let e = volume("/nfs/data:/data:ro").unwrap_err().to_string();
    assert!(e.contains("the only option after PATH is :shared"), "{e}");
    // Volumes as they were written before they could be shared still read, and unshared
    // ones are written that way still.
    let old: crate::api::Volume = serde_json::from_str(r#"["/srv","/data"]"#).unwrap();
    assert!(!old.shared);
    assert_eq!(serde_json::to_string(&old).unwrap(), r#"["/srv","/data"]"#);
    let shared: crate::api::Volume =
        serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(shared, v);
    assert!(volume("/srv/data").is_err());
    assert!(volume("data:/data").is_err());
    assert!(volume("/srv:/").is_err());
    assert!(rootfs("/srv/root").is_ok());
    assert!(rootfs("root").is_err());
    assert!(rootfs("/").is_err());
}

#[test]
fn durations_and_restart_policies() {
    use super::*;
    use std::time::Duration;
    assert_eq!(duration("grace", "5s").unwrap(), Duration::from_secs(5));
    assert_eq!(duration("grace", "5").unwrap(), Duration::from_secs(5));
    assert_eq!(
        duration("grace", "500ms").unwrap(),
        Duration::from_millis(500)
    );
    assert_eq!(duration("grace", "2m").unwrap(), Duration::from_secs(120));
    for bad in ["", "s", "5x", "-1s", "1.5s"] {
        let e = duration("grace", bad).unwrap_err().to_string();
        assert!(e.starts_with("invalid grace"), "{e}");
    }
    use crate::api::{ExitStatus, RestartPolicy};
    let exit = |code: Option<i32>, signal: Option<i32>| ExitStatus {
        code,
        signal,
        at: 0,
        oom: false,
    };
    let ok = exit(Some(0), None);
    let failed = exit(Some(3), None);
    let killed = exit(None, Some(9));
    assert!(!RestartPolicy::No.restarts_after(Some(&failed)));
    assert!(RestartPolicy::Always.restarts_after(Some(&ok)));
    assert!(!RestartPolicy::OnFailure.restarts_after(Some(&ok)));
    assert!(RestartPolicy::OnFailure.restarts_after(Some(&failed)));
    assert!(RestartPolicy::OnFailure.restarts_after(Some(&killed)));
    assert_eq!(
        "on-failure".parse::<RestartPolicy>(),
        Ok(RestartPolicy::OnFailure)
    );
    let e = "sometimes"
        .parse::<RestartPolicy>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("restart policy \"sometimes\""), "{e}");
    // Records stored before restart policies read as `no`.
    assert_eq!(
        serde_json::from_str::<RestartPolicy>("\"always\"").unwrap(),
        RestartPolicy::Always
    );
}

//! WireGuard gateways (`vane gateway add`): the stock client (Debian's wireguard-go and
//! wg), in a network namespace of its own on the lab's underlay, set up from the printed
//! configuration, becomes a member of its net: it reaches instances by IP and by name
//! (through the resolver address the configuration names), instances reach it by name,
//! policies apply to it as to any member, a forged source address gets nowhere, and
//! `vane gateway rm` cuts it at once.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, TestLab};

/// The client's namespace on the lab's underlay, with wireguard-go running in it; all of it
/// removed on drop, even when the test fails.
struct WgClient {
    netns: String,
    veth: String,
    device: String,
    wireguard: Option<Child>,
}

impl WgClient {
    /// A namespace with address `addr` on the lab's bridge and a WireGuard device set up
    /// from `config` as wg-quick would (address, MTU, routes of AllowedIPs, DNS).
    fn up(lab: &TestLab, addr: &str, config: &str) -> WgClient {
        let netns = format!("vane-{}-wgc", lab.name);
        let mut client = WgClient {
            netns: netns.clone(),
            veth: format!("vw-{}", lab.name),
            device: format!("wg{}", lab.name),
            wireguard: None,
        };
        client.remove();
        sh(&["ip", "netns", "add", &netns]);
        sh(&[
            "ip",
            "link",
            "add",
            &client.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        sh(&[
            "ip",
            "link",
            "set",
            &client.veth,
            "master",
            &lab.bridge(),
            "up",
        ]);
        client.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["link", "set", "lo", "up"]);

        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "wireguard-go",
                "-f",
                &client.device,
            ])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wireguard-go");
        client.wireguard = Some(child);
        // Its device, then its control socket, which `wg` talks to.
        let socket = format!("/var/run/wireguard/{}.sock", client.device);
        assert!(
            wait_until(Duration::from_secs(5), || Command::new("ip")
                .args(["-n", &netns, "link", "show", &client.device])
                .output()
                .is_ok_and(|o| o.status.success())
                && std::path::Path::new(&socket).exists()),
            "wireguard-go made no device"
        );

        // What `wg setconf` takes: the configuration without wg-quick's own keys.
        let (mut stripped, mut addresses, mut dns, mut allowed, mut mtu) = (
            String::new(),
            Vec::new(),
            String::new(),
            Vec::new(),
            "1420".to_string(),
        );
        for line in config.lines() {
            let (key, value) = match line.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => ("", ""),
            };
            match key {
                "Address" => addresses.push(value.to_string()),
                "DNS" => dns = value.to_string(),
                "MTU" => mtu = value.to_string(),
                _ => {
                    if key == "AllowedIPs" {
                        allowed.extend(value.split(',').map(|s| s.trim().to_string()));
                    }
                    stripped.push_str(line);
                    stripped.push('\n');
                }
            }
        }
        let file = format!("/run/vane-{}-wg.conf", lab.name);
        std::fs::write(&file, stripped).expect("write the client's configuration");
        let set = client.exec(&["wg", "setconf", &client.device, &file]);
        let _ = std::fs::remove_file(&file);
        assert!(
            set.status.success(),
            "wg setconf: {}",
            String::from_utf8_lossy(&set.stderr)
        );
        for a in &addresses {
            client.ip(&["addr", "add", a, "dev", &client.device]);
        }
        client.ip(&["link", "set", &client.device, "mtu", &mtu, "up"]);
        for net in &allowed {
            client.ip(&["route", "add", net, "dev", &client.device]);
        }
        // What wg-quick does with DNS through resolvconf: the namespace's resolv.conf
        // (`ip netns exec` binds /etc/netns/NAME/ over /etc).
        let mut servers = dns.split(',').map(str::trim);
        let server = servers.next().expect("a DNS server in the configuration");
        let search: Vec<&str> = servers.collect();
        std::fs::create_dir_all(format!("/etc/netns/{netns}")).expect("/etc/netns");
        std::fs::write(
            format!("/etc/netns/{netns}/resolv.conf"),
            format!("nameserver {server}\nsearch {}\n", search.join(" ")),
        )
        .expect("write the namespace's resolv.conf");
        client
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.netns];
        all.extend(args);
        sh(&all);
    }

    /// Runs `args` in the client's namespace.
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .output()
            .expect("run in the client's namespace")
    }

    /// What curl gets from `url` in the client's namespace, or `None`.
    fn fetch(&self, url: &str, extra: &[&str]) -> Option<String> {
        let mut args = vec!["curl", "-sf", "-m", "3"];
        args.extend(extra);
        args.push(url);
        let out = self.exec(&args);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `dig +short` of `name` at the resolver the namespace's resolv.conf names.
    fn dig(&self, args: &[&str]) -> String {
        let mut all = vec!["dig", "+short", "+time=2", "+tries=1"];
        all.extend(args);
        String::from_utf8_lossy(&self.exec(&all).stdout)
            .trim()
            .to_string()
    }

    fn remove(&mut self) {
        if let Some(mut child) = self.wireguard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.netns));
        // Only if no other namespace has files there.
        let _ = std::fs::remove_dir("/etc/netns");
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.device));
    }
}

impl Drop for WgClient {
    fn drop(&mut self) {
        self.remove();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run a command");
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A web server for instance `name` answering `body` at `/` and a 2 MiB file at `/big`.
fn serve(lab: &TestLab, net: &str, name: &str, host: &str, body: &str) {
    let script = format!(
        "cd $(mktemp -d) && echo {body} > index.html && head -c 2097152 /dev/zero > big && exec python3 -m http.server 80"
    );
    lab.ok(&[
        "run", "--net", net, "--name", name, "--host", host, "--", "sh", "-c", &script,
    ]);
}

fn value<'c>(config: &'c str, key: &str) -> &'c str {
    config
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim())
        })
        .unwrap_or_else(|| panic!("no {key} in the configuration:\n{config}"))
}

#[test]
fn a_stock_wireguard_client_joins_a_net_through_a_gateway() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.51.0/24"]);
    lab.ok(&["net", "create", "blue", "--subnet", "10.10.52.0/24"]);
    lab.ok(&["net", "create", "green", "--subnet", "10.10.53.0/24"]);
    lab.ok(&["policy", "allow", "red", "blue", "--port", "80/tcp"]);
    serve(&lab, "red", "web", "h2", "red-web");
    serve(&lab, "blue", "shop", "h1", "blue-shop");
    serve(&lab, "green", "vault", "h2", "green-vault");

    // Bad input: one line each, nothing made.
    for (args, says) in [
        (vec!["gateway", "add", "laptop", "--net", "nope"], "nope"),
        (
            vec![
                "gateway",
                "add",
                "laptop",
                "--net",
                "red",
                "--public-key",
                "abc",
            ],
            "public key",
        ),
        (
            vec![
                "gateway",
                "add",
                "laptop",
                "--net",
                "red",
                "--ip",
                "10.10.52.3",
            ],
            "10.10.52.3",
        ),
    ] {
        let err = lab.fails(&args);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(lab.ok(&["gateway", "ls", "-q"]).trim(), "");

    let config = lab.ok(&["gateway", "add", "laptop", "--net", "red", "--host", "h1"]);
    let address = value(&config, "Address")
        .trim_end_matches("/32")
        .to_string();
    assert_eq!(
        value(&config, "Endpoint"),
        format!("{}:51820", lab.host_addr(1))
    );
    assert!(
        value(&config, "AllowedIPs").contains("10.10.52.0/24"),
        "{config}"
    );
    assert!(
        !value(&config, "AllowedIPs").contains("10.10.53."),
        "{config}"
    );
    let listed = lab.ok(&["gateway", "ls"]);
    assert!(
        listed.contains("laptop") && listed.contains(&address),
        "{listed}"
    );

    let client = WgClient::up(&lab, &format!("198.18.{}.200", lab.octet), &config);

    // By IP, across the tunnel from h1 to h2; the handshake comes first.
    let web_ip = lab.inspect("web")["ip"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || client
            .fetch(&format!("http://{web_ip}/"), &[])
            .is_some_and(|b| b.trim() == "red-web")),
        "the client never reached web by IP"
    );
    // By name: NAME and NAME.NET of its own net, NAME.NET of a net its net may reach.
    assert_eq!(client.dig(&["web.red"]), web_ip);
    assert_eq!(
        client.fetch("http://web/", &[]).as_deref().map(str::trim),
        Some("red-web")
    );
    let shop_ip = lab.inspect("shop")["ip"].as_str().unwrap().to_string();
    assert_eq!(client.dig(&["shop.blue"]), shop_ip);
    assert_eq!(
        client
            .fetch("http://shop.blue/", &[])
            .as_deref()
            .map(str::trim),
        Some("blue-shop")
    );
    // A large download: the server's large segments are cut into whole packets for it.
    let big = client
        .fetch(&format!("http://{web_ip}/big"), &[])
        .expect("the 2 MiB file");
    assert_eq!(big.len(), 2 << 20);

    // Policy refuses as for any member of red: green has no policy from red.
    let vault_ip = lab.inspect("vault")["ip"].as_str().unwrap().to_string();
    assert_eq!(
        client.dig(&["vault.green"]),
        "",
        "a name of a net red may not reach"
    );
    assert_eq!(client.fetch(&format!("http://{vault_ip}/"), &[]), None);

    // Instances reach the client by its name (served from its namespace).
    let _server = ClientServer::start(&client, &address);
    let from_web = lab.run(&[
        "exec",
        "web",
        "--",
        "curl",
        "-sf",
        "-m",
        "3",
        "http://laptop:8000/hello",
    ]);
    assert!(
        String::from_utf8_lossy(&from_web.stdout).contains("from-the-laptop"),
        "web did not reach the client by name: {}",
        String::from_utf8_lossy(&from_web.stderr)
    );

    // A forged source address goes nowhere.
    client.ip(&["addr", "add", "10.10.51.77/32", "dev", &client.device]);
    assert_eq!(
        client.fetch(
            &format!("http://{web_ip}/"),
            &["--interface", "10.10.51.77"]
        ),
        None
    );
    // ... while its own address still works.
    assert!(client.fetch(&format!("http://{web_ip}/"), &[]).is_some());

    // rm cuts it at once: the next request fails.
    lab.ok(&["gateway", "rm", "laptop"]);
    let cut = Instant::now();
    assert_eq!(client.fetch(&format!("http://{web_ip}/"), &[]), None);
    assert!(cut.elapsed() < Duration::from_secs(4));
    assert_eq!(lab.ok(&["gateway", "ls", "-q"]).trim(), "");
    assert_ne!(client.dig(&["web.red"]), web_ip);
}

/// A web server in the client's namespace, answering `from-the-laptop` at `/hello`, and
/// the directory it serves.
struct ClientServer(Child, String);

impl ClientServer {
    fn start(client: &WgClient, address: &str) -> ClientServer {
        let dir = format!("/run/vane-wgc-{}", std::process::id());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/hello"), "from-the-laptop\n").unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.netns,
                "python3",
                "-m",
                "http.server",
                "8000",
            ])
            .args(["--bind", address, "--directory", &dir])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the client's server");
        let mut server = ClientServer(child, dir);
        let up = wait_until(Duration::from_secs(5), || {
            client
                .fetch(&format!("http://{address}:8000/hello"), &[])
                .is_some()
        });
        if !up {
            let mut err = String::new();
            let _ = server.0.kill();
            if let Some(mut e) = server.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the client's server did not start: {err}");
        }
        server
    }
}

impl Drop for ClientServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

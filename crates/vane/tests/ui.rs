//! The live picture (`GET /ui`) in a real headless browser: Debian's Chromium, driven over
//! the DevTools protocol. The page shows a three-host lab's hosts and instances, takes an
//! instance started after it opened without a reload, follows an instance's traffic, shows
//! refusals, shows hostile commands as text, and refuses to show anything without the
//! admin credential.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, stream::MaybeTlsStream, Message};

use common::TestLab;

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 900;

/// Echoes every UDP datagram on port 9100.
const ECHO: &str = "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 9100))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
";

/// Sends a 200-byte datagram to the echo every 20 ms, for ever: steady traffic through the
/// tunnel between two hosts.
const SENDER: &str = "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
while True:
    try:
        s.sendto(b'x' * 200, (sys.argv[1], 9100))
        while True:
            s.recv(2048)
    except OSError:
        pass
    time.sleep(0.02)
";

/// With NET_ADMIN, removes the rules that would refuse at once inside the instance and
/// sends to a net no policy lets it reach, so the switch refuses (and counts) each
/// datagram; again every 2 s, in case the agent put its rules back.
const ROGUE: &str = "
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
last = 0
while True:
    if time.time() - last > 2:
        os.system('nft flush ruleset; ip route replace 10.81.0.0/24 dev vane0')
        last = time.time()
    try:
        s.sendto(b'x' * 64, (sys.argv[1], 9100))
    except OSError:
        pass
    time.sleep(0.1)
";

/// What an instance's command may hold, since users write it: the page must show it as
/// text, never run or load it.
const HOSTILE: &str = "<img src=x onerror=window.pwned=1><script>window.pwned=2</script>";

/// Collects, in `vaneTestProblems`, the page's policy violations and uncaught errors.
const PROBLEMS: &str = "
window.vaneTestProblems = [];
document.addEventListener('securitypolicyviolation',
  (e) => vaneTestProblems.push(`blocked by ${e.violatedDirective}: ${e.blockedURI}`));
window.addEventListener('error', (e) => vaneTestProblems.push(`error: ${e.message}`));
window.addEventListener('unhandledrejection', (e) => vaneTestProblems.push(`rejected: ${e.reason}`));
";

/// Headless Chromium with its DevTools endpoint; killed with its whole process group, and
/// its profile removed, when dropped, whether the test passed or not.
struct Browser {
    child: Child,
    ws: String,
    profile: tempfile::TempDir,
}

impl Browser {
    fn start(spki: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile directory");
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                // The test runs as root, where Chromium's sandbox does not start.
                "--no-sandbox",
                "--remote-debugging-port=0",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-breakpad",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                &format!("--window-size={WIDTH},{HEIGHT}"),
                // The controller's chain ends at the lab's own CA: trust that key alone,
                // not every certificate.
                &format!("--ignore-certificate-errors-spki-list={spki}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // A group of its own: its helpers (renderer, GPU, zygotes) go with it.
            .process_group(0)
            .spawn()
            .expect("start chromium (scripts/install-deps.sh installs it)");
        let stderr = child.stderr.take().expect("chromium's stderr");
        // Owned from here: a failure below kills it on the way out.
        let mut browser = Browser {
            child,
            ws: String::new(),
            profile,
        };
        // Its stderr is read to the end by a thread, so Chromium never blocks on a full
        // pipe; the DevTools address comes from the line that announces it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let url = line.strip_prefix("DevTools listening on ").map(str::trim);
                let _ = tx.send(url.map(str::to_string).ok_or(line));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut said = Vec::new();
        browser.ws = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(url)) => break url,
                Ok(Err(line)) => said.push(line),
                Err(_) => panic!("chromium gave no DevTools address: {}", said.join("\n")),
            }
        };
        browser
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let group = Pid::from_raw(self.child.id() as i32);
        // Asked first, so the browser reaps its own helpers; then the whole group killed.
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
        // Helpers that outlived the browser are gone before the profile is removed.
        common::wait_until(Duration::from_secs(5), || {
            killpg(group, None::<Signal>).is_err()
        });
        let _ = std::fs::remove_dir_all(self.profile.path());
    }
}

/// A DevTools connection to the browser; each tab is a session on it.
struct Cdp {
    ws: tungstenite::WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Cdp {
    fn connect(browser: &Browser) -> Cdp {
        let (mut ws, _) = tungstenite::connect(browser.ws.as_str()).expect("DevTools WebSocket");
        if let MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
        }
        Cdp { ws, next: 1 }
    }

    /// Calls `method` (in tab `session`, or on the browser) and returns its result;
    /// events that arrive meanwhile are skipped.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        loop {
            let answer = self.ws.read().unwrap_or_else(|e| panic!("{method}: {e}"));
            let Ok(text) = answer.to_text() else { continue };
            let v: Value = serde_json::from_str(text).expect("DevTools sends JSON");
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab, 1400x900, and returns the tab's session. Each tab has
    /// its own sessionStorage, so the credential of one is unknown to the next.
    fn open(&mut self, url: &str) -> String {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let session = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        self.call(
            Some(&session),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
        );
        // Before the page's own script: what its policy blocked and what it threw, so a
        // page that half works under its Content-Security-Policy fails the test.
        self.call(Some(&session), "Page.enable", json!({}));
        self.call(
            Some(&session),
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": PROBLEMS}),
        );
        self.call(Some(&session), "Page.navigate", json!({"url": url}));
        // Navigating answers before the page has replaced about:blank: wait for it, and
        // for its script, which runs once the document is parsed.
        let page = url.split('#').next().unwrap_or(url);
        self.wait(
            &session,
            Duration::from_secs(10),
            &format!("{page} loaded"),
            &format!(
                "location.href.startsWith({}) && document.readyState === 'complete'",
                json!(page)
            ),
        );
        session
    }

    /// The value of a JavaScript expression in the tab.
    fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        assert!(
            r["exceptionDetails"].is_null(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is true in the tab; panics with `what` and the page's text if
    /// it never is.
    fn wait(&mut self, session: &str, limit: Duration, what: &str, expr: &str) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.eval(session, expr) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = self.eval(
            session,
            "location.href + '\\n' + (document.body ? document.body.innerText : '')",
        );
        panic!(
            "{what}: not within {limit:?}; the page:\n{}",
            text.as_str().unwrap_or("")
        );
    }

    fn text(&mut self, session: &str, selector: &str) -> String {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent : null }})()",
            json!(selector)
        );
        match self.eval(session, &expr) {
            Value::String(s) => s,
            other => panic!("no {selector} on the page ({other})"),
        }
    }

    fn screenshot(&mut self, session: &str) -> Vec<u8> {
        let shot = self.call(
            Some(session),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        );
        base64(shot["data"].as_str().expect("a screenshot"))
    }
}

fn base64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Width and height of a PNG, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG"
    );
    let word = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (word(16), word(20))
}

/// The base64 SHA-256 of the lab CA's public key, as Chromium names keys it trusts.
fn ca_spki(lab: &TestLab) -> String {
    let ca = format!("{}/controller/ca.crt", lab.state_dir());
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
        )
        .args(["sh", &ca])
        .output()
        .expect("openssl");
    let spki = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && spki.len() == 44,
        "spki of {ca}: {spki:?}"
    );
    spki
}

/// Status and headers (names lowercase) of a GET without a credential.
fn head(lab: &TestLab, path: &str) -> (u16, Vec<(String, String)>) {
    let ca = format!("{}/controller/ca.crt", lab.state_dir());
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--cacert",
            &ca,
        ])
        .arg(format!("{}{path}", lab.controller))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

fn run(lab: &TestLab, name: &str, net: &str, host: &str, ip: &str, extra: &[&str], cmd: &[&str]) {
    let mut args = vec![
        "run", "--net", net, "--name", name, "--host", host, "--ip", ip,
    ];
    args.extend(extra);
    args.push("--");
    args.extend(cmd);
    lab.ok(&args);
}

/// Number in a rate cell such as "12.5" or "1.2 kB/s"; 0 for "-".
fn leading_number(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_live_picture_shows_the_lab_and_follows_it_without_a_reload() {
    let lab = TestLab::up(3);
    let admin = std::fs::read_to_string(format!("{}/controller/admin.token", lab.state_dir()))
        .expect("admin credential");
    let admin = admin.trim();

    // The page and its script need no credential, and carry a strict policy; the API
    // still does.
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let (status, headers) = head(&lab, path);
        assert_eq!(status, 200, "{path}: {headers:?}");
        assert!(header(&headers, "content-type").starts_with(kind), "{path}");
        let csp = header(&headers, "content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        assert_eq!(header(&headers, "cache-control"), "no-store");
    }
    assert_eq!(head(&lab, "/v1/hosts").0, 401);

    lab.ok(&["net", "create", "red", "--subnet", "10.81.0.0/24"]);
    lab.ok(&[
        "net",
        "create",
        "blue",
        "--subnet",
        "10.82.0.0/24",
        "--tenant",
        "b",
    ]);
    lab.ok(&["policy", "allow", "red", "blue", "--port", "9100/udp"]);
    run(
        &lab,
        "echo",
        "red",
        "h1",
        "10.81.0.1",
        &[],
        &["python3", "-c", ECHO],
    );
    run(
        &lab,
        "client",
        "red",
        "h2",
        "10.81.0.2",
        &[],
        &["python3", "-c", SENDER, "10.81.0.1"],
    );
    run(
        &lab,
        "rogue",
        "blue",
        "h3",
        "10.82.0.3",
        &["--cap-add", "NET_ADMIN"],
        &["python3", "-c", ROGUE, "10.81.0.1", HOSTILE],
    );

    let browser = Browser::start(&ca_spki(&lab));
    let mut cdp = Cdp::connect(&browser);
    let tab = cdp.open(&format!("{}/ui#token={admin}", lab.controller));
    cdp.wait(
        &tab,
        Duration::from_secs(15),
        "three hosts and their instances",
        "['h1', 'h2', 'h3'].every(h => document.querySelector(`[data-host=\"${h}\"]`)) && \
         [['echo', 'h1'], ['client', 'h2'], ['rogue', 'h3']].every(([i, h]) => \
           document.querySelector(`[data-host=\"${h}\"] [data-instance=\"${i}\"]`))",
    );
    // The credential left the address bar for the tab's storage.
    assert_eq!(cdp.eval(&tab, "location.hash"), json!(""));
    assert_eq!(
        cdp.eval(&tab, "sessionStorage.getItem('vane-admin-credential')"),
        json!(admin)
    );
    let body = cdp.eval(&tab, "document.body.innerText");
    let body = body.as_str().unwrap();
    for text in [
        "red",
        "blue",
        "10.81.0.0/24",
        "10.82.0.0/24",
        "9100/udp",
        "h1 ⇄ h2",
    ] {
        assert!(body.contains(text), "no {text:?} on the page:\n{body}");
    }
    // Lost with a reload, or with any navigation.
    cdp.eval(&tab, "window.vaneTestMarker = 'still the first load'");

    // The hostile command shows as text; nothing of it ran or became an element.
    let cmd = cdp.text(&tab, "[data-instance=\"rogue\"] .cmd");
    assert!(cmd.contains(HOSTILE), "{cmd}");
    assert_eq!(cdp.eval(&tab, "window.pwned === undefined"), json!(true));
    assert_eq!(
        cdp.eval(
            &tab,
            "document.querySelectorAll('main img, main script').length"
        ),
        json!(0)
    );

    // Followed: echo's live rates, from the echo's traffic through the tunnel from h2.
    cdp.eval(
        &tab,
        "document.querySelector('[data-instance=\"echo\"]').click()",
    );
    cdp.wait(
        &tab,
        Duration::from_secs(10),
        "echo's traffic while followed",
        "(() => { const r = document.querySelector('#follow [data-rate=\"rx_packets\"]'); \
           return !!r && parseFloat(r.textContent) > 0 })()",
    );
    assert_eq!(cdp.text(&tab, "#follow .title"), "echo");
    for field in ["rx_packets", "tx_packets", "rx_bytes", "tx_bytes"] {
        let rate = cdp.text(&tab, &format!("#follow [data-rate=\"{field}\"]"));
        assert!(leading_number(&rate) > 0.0, "{field}: {rate:?}");
    }
    // The rogue's refusals: on its card and in its host's counters.
    cdp.wait(
        &tab,
        Duration::from_secs(10),
        "the rogue's refusals",
        "(() => { const r = document.querySelector('[data-instance=\"rogue\"] .refused'); \
           return !!r && /refused [1-9]/.test(r.textContent) })()",
    );
    let h3 = cdp.text(&tab, "[data-host=\"h3\"] .host-traffic");
    assert!(h3.contains("refused") && !h3.contains("refused 0"), "{h3}");
    // The tunnel between h1 and h2 is up and carries the echo both ways.
    let tunnel = cdp.text(&tab, "[data-tunnel=\"h1-h2\"]");
    assert!(tunnel.contains("up, "), "{tunnel}");

    // Started after the page opened: it appears with no reload.
    let started = Instant::now();
    run(
        &lab,
        "late",
        "blue",
        "h1",
        "10.82.0.4",
        &[],
        &["sleep", "infinity"],
    );
    cdp.wait(
        &tab,
        Duration::from_secs(5),
        "late, started after the page opened",
        "!!document.querySelector('[data-host=\"h1\"] [data-instance=\"late\"]')",
    );
    eprintln!("late shown {:?} after vane run ended", started.elapsed());
    assert_eq!(
        cdp.eval(&tab, "window.vaneTestMarker"),
        json!("still the first load")
    );

    // A picture for the README when asked for (VANE_UI_SCREENSHOT=docs/ui.png), with a
    // longer trace of the followed traffic.
    let out = std::env::var_os("VANE_UI_SCREENSHOT");
    if out.is_some() {
        std::thread::sleep(Duration::from_secs(40));
    }
    let png = cdp.screenshot(&tab);
    assert_eq!(png_size(&png), (WIDTH, HEIGHT));
    let shot = tempfile::NamedTempFile::new().expect("screenshot file");
    std::fs::write(shot.path(), &png).expect("write the screenshot");
    assert_eq!(
        png_size(&std::fs::read(shot.path()).unwrap()),
        (WIDTH, HEIGHT)
    );
    if let Some(out) = out {
        std::fs::write(&out, &png).expect("write VANE_UI_SCREENSHOT");
    }

    // No credential: the form, nothing else. A wrong one: 401, said; a tenant's: 403.
    let bare = cdp.open(&format!("{}/ui", lab.controller));
    cdp.wait(
        &bare,
        Duration::from_secs(10),
        "the credential form",
        "document.readyState === 'complete' && !document.getElementById('login').hidden",
    );
    assert_eq!(
        cdp.eval(
            &bare,
            "document.getElementById('live').hidden && document.getElementById('message').hidden"
        ),
        json!(true)
    );
    let tenant = lab.ok(&["token", "create", "--tenant", "b"]);
    for (token, status) in [("vaneadmin-0000", "401"), (tenant.trim(), "403")] {
        let wrong = cdp.open(&format!("{}/ui#token={token}", lab.controller));
        cdp.wait(
            &wrong,
            Duration::from_secs(10),
            &format!("the {status} refusal"),
            &format!(
                "!document.getElementById('message').hidden && \
                 document.getElementById('message').textContent.includes('{status}')"
            ),
        );
        assert_eq!(
            cdp.eval(
                &wrong,
                "document.getElementById('live').hidden && \
                 !document.getElementById('login').hidden && \
                 sessionStorage.getItem('vane-admin-credential') === null && \
                 document.querySelectorAll('[data-host]').length === 0"
            ),
            json!(true),
            "a refused credential shows nothing but the form"
        );
    }
    assert_eq!(
        cdp.eval(&tab, "vaneTestProblems"),
        json!([]),
        "the page ran into its policy or threw"
    );
    drop(cdp);
    drop(browser);
}

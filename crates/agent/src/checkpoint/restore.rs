//! Restoring a dumped tree: an instance's space prepared without a program, then CRIU run
//! into it (inside the instance's user namespace when confined, as the host's root when
//! privileged, lazily with a `criu lazy-pages` daemon for post-copy), and the restored tree
//! checked to be confined as this host requires.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vane_proto::stream::InstanceSpec;

use super::{
    criu, criu_version, last_lines, run_criu, serve_pages, HOSTNAME_KEY, HOSTS_KEY, IMAGES_DIR,
    NET_KEY, RESOLV_KEY, STATE_KEY, UFFD_DEV_FD,
};
use crate::cgroup;
use crate::instance::{self, CreateError, Record, Setup};
use crate::netconf;

/// An instance's space made ready for a restore: what `instance::create` makes before it
/// starts the program, and for a confined instance its restore helper, already waiting.
pub struct Prepared {
    pub tun: std::os::fd::OwnedFd,
    pub record: Record,
    pub helper: Option<RestoreHelper>,
}

/// Makes the instance's space as a new instance's (`instance::prepare_space`: the same
/// checks, namespaces, device, rules, cgroups and expanded settings), without starting
/// anything, and starts a confined instance's `vane __restore` (`exe`), which does now
/// what does not need the images. Undoes it all on failure.
pub fn prepare(
    dir: &Path,
    exe: &Path,
    key: &str,
    spec: &InstanceSpec,
    setup: &Setup,
) -> Result<Prepared, String> {
    criu_version()?;
    let (record, tun, _) = instance::prepare_space(dir, key, spec, setup).map_err(|e| match e {
        CreateError::Input(m) | CreateError::Host(m) => m,
    })?;
    let helper = match record.confinement().idmap {
        Some(idmap) => match RestoreHelper::start(dir, exe, &record, idmap.base, true) {
            Ok(helper) => Some(helper),
            Err(e) => {
                drop(tun);
                instance::teardown(dir, key, &setup.layout);
                return Err(e);
            }
        },
        None => None,
    };
    Ok(Prepared {
        tun,
        record,
        helper,
    })
}

/// A confined instance's `vane __restore`, started before its images are here: it joins
/// the instance's cgroups (a process's first move into a cgroup v1 hierarchy waits some
/// 20 ms for the kernel's lock on thread groups), execs vane and lays out what CRIU reads
/// that the images do not change, then waits for [`RestoreHelper::go`]. Dropped unused
/// (a discarded migration), it is stopped and reaped, and its mounts go with it.
pub struct RestoreHelper {
    child: Option<std::process::Child>,
    /// It holds /dev/userfaultfd, which a lazy restore needs.
    uffd: bool,
}

impl RestoreHelper {
    /// Writes the spec (`launch::RESTORE_FILE`) and starts the helper on it. `owner`: the
    /// instance's root, host id. `fresh`: nothing of the instance runs in its user namespace
    /// (`RestoreSpec::may_probe`).
    fn start(
        dir: &Path,
        exe: &Path,
        record: &Record,
        owner: u32,
        fresh: bool,
    ) -> Result<RestoreHelper, String> {
        let spec = crate::launch::RestoreSpec {
            criu: criu(),
            netns: record.netns.clone(),
            cgroups: record.cgroups.clone(),
            hostname: record.spec.hostname.clone(),
            rootfs: record.spec.space.rootfs.as_ref().map(PathBuf::from),
            owner,
            volumes: shared_volumes(record),
            redirects: redirect_sources(record),
            may_probe: fresh,
        };
        instance::write_private(
            &dir.join(crate::launch::RESTORE_FILE),
            &serde_json::to_vec(&spec).expect("serializes"),
        )
        .map_err(|e| format!("writing the restore spec: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("__restore")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // For a lazy restore: /dev/userfaultfd, which CRIU in a user namespace makes its
        // userfaultfd from (the system call is refused there). Kernels before 6.1 have none:
        // their restores are whole.
        let uffd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open("/dev/userfaultfd")
            .ok();
        if let Some(uffd) = &uffd {
            vane_sys::spawn::with_fds(&mut cmd, &[(std::os::fd::AsFd::as_fd(uffd), UFFD_DEV_FD)]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("running vane __restore: {e}"))?;
        Ok(RestoreHelper {
            child: Some(child),
            uffd: uffd.is_some(),
        })
    }

    /// Lets the helper run CRIU on the images now in place, and waits for the restore.
    fn go(mut self, images: &Path, tcp_close: bool, lazy: bool) -> Result<(), String> {
        use std::io::Write;
        if lazy && !self.uffd {
            return Err("lazy pages need /dev/userfaultfd (Linux >= 6.1)".to_string());
        }
        let mut child = self.child.take().expect("taken once");
        let go = crate::launch::RestoreGo { tcp_close, lazy };
        let mut line = serde_json::to_vec(&go).expect("serializes");
        line.push(b'\n');
        // A helper that failed before it waits has closed its end: its error is on stderr.
        let _ = child.stdin.take().expect("piped").write_all(&line);
        let out = child
            .wait_with_output()
            .map_err(|e| format!("running criu: {e}"))?;
        if !out.status.success() {
            let log = images.join("restore.log");
            let why = if log.exists() {
                last_lines(&log, 2)
            } else {
                String::from_utf8_lossy(&out.stderr).trim().to_string()
            };
            return Err(format!("criu restore failed: {why}"));
        }
        Ok(())
    }
}

impl Drop for RestoreHelper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Restores the tree dumped in `DIR/images` into the instance's namespace (prepared, or
/// the one it was dumped from), detached. Fills in and writes the record's pids. The port
/// of a tree restored where it was dumped is still on hold: the caller lifts it.
/// `tcp_close`: restore the connections closed (a clone). The restored tree takes the
/// record's hostname.
/// `pages`: the images are of a lazy dump, whose page server is at the other end of this
/// socket: the tree is restored without its memory, which a `criu lazy-pages` daemon (in
/// the instance's user namespace for a confined one) fetches on demand and in the
/// background until it has all.
/// `helper`: a confined instance's restore helper, started with its prepared space (else
/// one starts now).
pub fn restore(
    dir: &Path,
    exe: &Path,
    record: &mut Record,
    tcp_close: bool,
    pages: Option<std::os::unix::net::UnixStream>,
    helper: Option<RestoreHelper>,
) -> Result<(), String> {
    let images = dir.join(IMAGES_DIR);
    let pidfile = images.join("restored.pid");
    let _ = std::fs::remove_file(&pidfile);
    let confinement = record.confinement();
    match confinement.idmap {
        Some(idmap) => {
            if let Some(pages) = &pages {
                start_lazy_daemon(&images, pages)?;
            }
            restore_confined(
                dir,
                exe,
                record,
                idmap.base,
                tcp_close,
                pages.is_some(),
                helper,
            )?
        }
        None => {
            if let Some(pages) = &pages {
                start_lazy_daemon(&images, pages)?;
            }
            restore_privileged(dir, record, tcp_close, pages.is_some())?
        }
    }
    let init_pid: u32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| "criu restore wrote no pid".to_string())?;
    record.init_pid = init_pid;
    record.init_start = vane_sys::pidfd::start_time(init_pid).unwrap_or(0);
    if let Err(e) = check_confined(record) {
        cgroup::kill_all(&record.cgroups);
        return Err(e);
    }
    let children = std::fs::read_to_string(format!("/proc/{init_pid}/task/{init_pid}/children"))
        .unwrap_or_default();
    record.pid = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(init_pid);
    instance::write_record(dir, record).map_err(|e| format!("writing the record: {e}"))
}

/// Restores a confined instance: CRIU runs in its user namespace (`vane __restore`), with
/// the images' own user namespace taken out of them, so the tree is the instance's root's
/// here (host id `owner` up) whatever the images say.
fn restore_confined(
    dir: &Path,
    exe: &Path,
    record: &Record,
    owner: u32,
    tcp_close: bool,
    lazy: bool,
    helper: Option<RestoreHelper>,
) -> Result<(), String> {
    let images = dir.join(IMAGES_DIR);
    crate::images::inherit_namespaces(&images)?;
    crate::images::forget_thread_cgroups(&images)?;
    // CRIU, as the instance's root, reads the images and writes its log and pid file there.
    chown_tree(&images, owner).map_err(|e| format!("{}: {e}", images.display()))?;
    let helper = match helper {
        Some(helper) => helper,
        None => RestoreHelper::start(dir, exe, record, owner, false)?,
    };
    helper.go(&images, tcp_close, lazy)
}

/// The host directories of the instance's shared volumes, in order (`volume_key`).
fn shared_volumes(record: &Record) -> Vec<PathBuf> {
    record
        .spec
        .space
        .volumes
        .iter()
        .filter(|v| v.shared)
        .map(|v| PathBuf::from(&v.host))
        .collect()
}

/// The sources of the instance's path rules, in order (`redirect_key`).
fn redirect_sources(record: &Record) -> Vec<PathBuf> {
    record
        .spec
        .space
        .redirects
        .iter()
        .map(|(_, source)| PathBuf::from(source))
        .collect()
}

fn chown_tree(path: &Path, owner: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner), Some(owner))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), owner)?;
        }
    }
    Ok(())
}

/// Starts `criu lazy-pages` on the images at `images`, its page server at the other end of
/// `pages`, and waits until it listens for the restore. The daemon runs as the host's root
/// (outside the instance's cgroups, whose limits and kills it must not share) and on by
/// itself until it has every page; it logs to `lazy.log` beside the images. It reads only
/// what describes the tree's memory, and writes pages into the descriptors the restored
/// tasks hand it; its socket is open to the restore, which runs as the instance's root.
fn start_lazy_daemon(images: &Path, pages: &std::os::unix::net::UnixStream) -> Result<(), String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 0; exec \"$@\"")
        .arg("sh")
        .arg(criu())
        .arg("lazy-pages")
        .arg("-D")
        .arg(images)
        .arg("-o")
        .arg("lazy.log")
        .arg("--page-server");
    let mut daemon = serve_pages(cmd, pages, "criu lazy-pages", &images.join("lazy.log"))?;
    // Reaped when it ends (its outcome is the source's to report: its page server ends
    // with it).
    std::thread::spawn(move || daemon.wait());
    Ok(())
}

/// Restores a privileged instance as the host's root, as CRIU dumped it.
fn restore_privileged(
    dir: &Path,
    record: &Record,
    tcp_close: bool,
    lazy: bool,
) -> Result<(), String> {
    let images = dir.join(IMAGES_DIR);
    let ns = netconf::netns_path(&record.netns);
    let cgroups: Vec<String> = record
        .cgroups
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    // The shell joins the instance's cgroups (CRIU leaves cgroups alone: the source's may
    // still exist on a shared kernel) and opens the namespace as descriptor 3 for criu,
    // which gives it to the restored tree in place of the original. The state directory and
    // the hosts and hostname files are bound from this host's.
    let tcp = match (tcp_close, lazy) {
        (true, _) => "--tcp-close",
        (false, false) => "--tcp-established",
        (false, true) => "--tcp-established --lazy-pages",
    };
    // Arguments past the seventh are more of CRIU's (the externals of shared volumes and path
    // rules).
    let script = format!(
        "IFS=:; for c in $VANE_CGROUPS; do echo $$ > \"$c/cgroup.procs\" || exit 1; done; \
         criu=$0 images=$1 pidfile=$2 ns=$3 state=$4 hosts=$5 hostname=$6 resolv=$7; shift 7; \
         exec \"$criu\" restore -D \"$images\" -o restore.log {tcp} --file-locks --root / -d \
         --manage-cgroups=ignore --pidfile \"$pidfile\" --inherit-fd 'fd[3]:{NET_KEY}' \
         --external \"mnt[{STATE_KEY}]:$state\" --external \"mnt[{HOSTS_KEY}]:$hosts\" \
         --external \"mnt[{HOSTNAME_KEY}]:$hostname\" --external \"mnt[{RESOLV_KEY}]:$resolv\" \
         \"$@\" 3<\"$ns\""
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(criu())
        .arg(&images)
        .arg(images.join("restored.pid"))
        .arg(&ns)
        .arg(dir.join(crate::launch::SHARED_DIR))
        .arg(dir.join(crate::launch::HOSTS_FILE))
        .arg(dir.join(crate::launch::HOSTNAME_FILE))
        .arg(dir.join(crate::launch::RESOLV_FILE));
    let volumes = shared_volumes(record).into_iter().enumerate();
    let redirects = redirect_sources(record).into_iter().enumerate();
    let keyed = volumes
        .map(|(n, p)| (super::volume_key(n), p))
        .chain(redirects.map(|(n, p)| (super::redirect_key(n), p)));
    for (key, path) in keyed {
        let mut external = std::ffi::OsString::from(format!("mnt[{key}]:"));
        external.push(path);
        cmd.arg("--external").arg(external);
    }
    cmd.env("VANE_CGROUPS", cgroups.join(":"));
    run_criu(&mut cmd, "restore", &images.join("restore.log"))?;
    // The images hold the original's hostname; a clone has its own.
    let init_pid = std::fs::read_to_string(images.join("restored.pid")).unwrap_or_default();
    let named = Command::new("nsenter")
        .arg("-t")
        .arg(init_pid.trim())
        .arg("-u")
        .arg("hostname")
        .arg(&record.spec.hostname)
        .stdin(Stdio::null())
        .output();
    if !named.is_ok_and(|o| o.status.success()) {
        tracing::warn!(instance = %record.spec.name, "cannot set the restored instance's hostname");
    }
    Ok(())
}

/// Checks that every process of a restored confined instance is confined as the agent
/// decided: its user namespace's mapping, its bounding set within the instance's
/// capabilities, its seccomp filter. Images are the instance's word; a tree that claims
/// more is not let run.
fn check_confined(record: &Record) -> Result<(), String> {
    let confinement = record.confinement();
    let Some(idmap) = confinement.idmap else {
        return Ok(());
    };
    let want_map = idmap.map_line();
    let pids = cgroup::procs(&record.cgroups);
    if pids.is_empty() {
        return Err("the restored instance has no process".into());
    }
    for pid in pids {
        // The tree runs already: a process listed a moment ago may have ended since (a
        // shell's `sleep` does every few ms). One that has ended runs nothing and is not
        // judged; every other one is.
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if is_zombie(&status) {
            continue;
        }
        let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap_or_default();
        if map.is_empty() && ended(pid) {
            continue;
        }
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let bounding = field("CapBnd:").and_then(|v| u64::from_str_radix(&v, 16).ok());
        let seccomp = field("Seccomp:");
        let mapped = map.split_whitespace().collect::<Vec<_>>()
            == want_map.split_whitespace().collect::<Vec<_>>();
        let bounded = bounding.is_some_and(|b| b & !confinement.caps == 0);
        if !mapped || !bounded || seccomp.as_deref() != Some("2") {
            return Err(format!(
                "the restored instance is not confined as this host requires (process {pid}); \
                 it was stopped"
            ));
        }
    }
    Ok(())
}

/// Whether process `pid` has ended: gone, or a zombie waiting to be reaped.
fn ended(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(true, |s| is_zombie(&s))
}

/// Whether a `/proc/PID/status` is that of a process that has exited, not yet reaped.
fn is_zombie(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .is_some_and(|v| v.trim_start().starts_with(['Z', 'X']))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_has_ended_once_a_zombie_or_reaped_not_while_it_runs() {
        let mut running = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        assert!(!super::ended(running.id()));
        let mut quick = std::process::Command::new("true").spawn().unwrap();
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !super::ended(quick.id()) {
            assert!(std::time::Instant::now() < deadline, "`true` still runs");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let pid = quick.id();
        quick.wait().unwrap();
        assert!(super::ended(pid));
        running.kill().unwrap();
        running.wait().unwrap();
    }
}

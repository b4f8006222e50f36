//! What confines an instance beyond its namespaces (ARCHITECTURE.md, "Security model"):
//! a user namespace whose ids map to a range of host ids that no one else uses, so root
//! inside is an unprivileged user outside; a capability bounding set (a mainstream
//! engine's default set unless told otherwise); a seccomp filter that refuses what such
//! engines refuse. `--privileged` instances have none of these.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vane_sys::confine::BpfInstruction;

/// How many ids an instance's user namespace maps (0..65535 inside), as podman's
/// `--userns=auto` gives by default.
pub const ID_COUNT: u32 = 65_536;
/// Ranges are handed out in slots of `ID_COUNT` host ids; the first slots are left to the
/// host's own users and their /etc/subuid ranges (up to 4,194,303).
const FIRST_SLOT: u32 = 64;
/// The last slot whose range ends below 4,294,967,295 (which means "no id").
const LAST_SLOT: u32 = 65_534;
/// Where the claims on id ranges live: one directory per machine, whatever the agent's
/// state directory, because lab hosts share one kernel and so one space of ids.
pub const CLAIMS_DIR: &str = "/var/lib/vane/idmap";

/// The host ids an instance's user namespace maps: inside id N is host id `base + N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub base: u32,
    pub count: u32,
}

impl IdMap {
    /// The line written to `uid_map` and `gid_map`.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.base, self.count)
    }
}

/// How an instance is confined, as the agent decided it (never as the instance says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// `None` only for privileged instances.
    pub idmap: Option<IdMap>,
    /// Bits of the capabilities root inside may hold.
    pub caps: u64,
}

impl Confinement {
    pub fn privileged(&self) -> bool {
        self.idmap.is_none()
    }
}

fn claim_path(dir: &Path, slot: u32) -> PathBuf {
    dir.join(slot.to_string())
}

/// Claims a free range of host ids for the instance whose private directory is `owner`.
/// A claim is a file naming its owner; a claim whose owner directory is gone (the instance
/// was removed while its agent was down) is stale and taken over.
pub fn allocate(dir: &Path, owner: &Path) -> io::Result<IdMap> {
    std::fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(".lock"))?;
    // Agents of lab hosts share the claims: one allocation at a time on the machine.
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))?;
    for slot in FIRST_SLOT..=LAST_SLOT {
        let path = claim_path(dir, slot);
        let free = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
            Ok(holder) => !Path::new(holder.trim()).exists(),
        };
        if free {
            let tmp = dir.join(format!(".{slot}.tmp"));
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(owner.as_os_str().as_encoded_bytes())?;
            std::fs::rename(&tmp, &path)?;
            return Ok(IdMap {
                base: slot * ID_COUNT,
                count: ID_COUNT,
            });
        }
    }
    Err(io::Error::other(
        "no free range of host ids for a user namespace",
    ))
}

/// Gives back whatever range `owner` holds (when its directory goes).
pub fn release(dir: &Path, owner: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let mut holder = String::new();
        if File::open(e.path())
            .and_then(|mut f| f.read_to_string(&mut holder))
            .is_ok()
            && Path::new(holder.trim()) == owner
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Syscalls an instance is refused (EPERM) unless it holds the capability named beside
/// them, after Docker's default seccomp profile: the kernel's own interfaces (modules,
/// kexec, reboot, swap, accounting, clocks, keyrings, kernel logs), file handles that walk
/// around mount boundaries, mounting and new namespaces, and obsolete calls.
fn refused() -> Vec<(i64, Option<&'static str>)> {
    let mut list = vec![
        (libc::SYS_kexec_load, None),
        (libc::SYS_kexec_file_load, None),
        (libc::SYS_init_module, None),
        (libc::SYS_finit_module, None),
        (libc::SYS_delete_module, None),
        (libc::SYS_reboot, None),
        (libc::SYS_swapon, None),
        (libc::SYS_swapoff, None),
        (libc::SYS_acct, None),
        (libc::SYS_add_key, None),
        (libc::SYS_keyctl, None),
        (libc::SYS_request_key, None),
        (libc::SYS_open_by_handle_at, None),
        (libc::SYS_quotactl, None),
        (libc::SYS_lookup_dcookie, None),
        (libc::SYS_userfaultfd, Some("SYS_PTRACE")),
        (libc::SYS_settimeofday, Some("SYS_TIME")),
        (libc::SYS_clock_settime, Some("SYS_TIME")),
        (libc::SYS_clock_adjtime, Some("SYS_TIME")),
        (libc::SYS_adjtimex, Some("SYS_TIME")),
        (libc::SYS_syslog, Some("SYSLOG")),
        (libc::SYS_bpf, Some("BPF")),
        (libc::SYS_perf_event_open, Some("PERFMON")),
        (libc::SYS_kcmp, Some("SYS_PTRACE")),
        (libc::SYS_process_vm_readv, Some("SYS_PTRACE")),
        (libc::SYS_process_vm_writev, Some("SYS_PTRACE")),
        (libc::SYS_vhangup, Some("SYS_TTY_CONFIG")),
        (libc::SYS_mount, Some("SYS_ADMIN")),
        (libc::SYS_umount2, Some("SYS_ADMIN")),
        (libc::SYS_pivot_root, Some("SYS_ADMIN")),
        (libc::SYS_open_tree, Some("SYS_ADMIN")),
        (libc::SYS_move_mount, Some("SYS_ADMIN")),
        (libc::SYS_fsopen, Some("SYS_ADMIN")),
        (libc::SYS_fsconfig, Some("SYS_ADMIN")),
        (libc::SYS_fsmount, Some("SYS_ADMIN")),
        (libc::SYS_fspick, Some("SYS_ADMIN")),
        (libc::SYS_mount_setattr, Some("SYS_ADMIN")),
        (libc::SYS_unshare, Some("SYS_ADMIN")),
        (libc::SYS_setns, Some("SYS_ADMIN")),
        (libc::SYS_name_to_handle_at, Some("DAC_READ_SEARCH")),
        (libc::SYS_mbind, Some("SYS_NICE")),
        (libc::SYS_set_mempolicy, Some("SYS_NICE")),
        (libc::SYS_move_pages, Some("SYS_NICE")),
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        (libc::SYS_iopl, None),
        (libc::SYS_ioperm, None),
        (libc::SYS_nfsservctl, None),
        (libc::SYS_uselib, None),
        (libc::SYS__sysctl, None),
        (libc::SYS_ustat, None),
        (libc::SYS_sysfs, None),
    ]);
    list
}

/// Namespace flags of clone(2) refused without SYS_ADMIN (a nested user namespace would
/// give a program every capability over namespaces of its own).
const CLONE_NAMESPACES: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn has(caps: u64, name: &str) -> bool {
    vane_proto::validate::capability(name).is_ok_and(|bit| caps & bit != 0)
}

/// The seccomp filters of an instance whose root holds `caps`, in the order to install
/// them. clone3(2) answers ENOSYS (its flags sit in memory a filter cannot read; C
/// libraries fall back to clone(2), whose flags it can).
pub fn seccomp_filters(caps: u64) -> Result<Vec<Vec<BpfInstruction>>, String> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e:?}"))?;
    let mut rules = std::collections::BTreeMap::new();
    for (nr, unless) in refused() {
        if unless.is_none_or(|cap| !has(caps, cap)) {
            rules.insert(nr, Vec::new());
        }
    }
    if !has(caps, "SYS_ADMIN") {
        let mut chain = Vec::new();
        for flag in CLONE_NAMESPACES {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| format!("seccomp: {e}"))?;
            chain.push(SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp: {e}"))?);
        }
        rules.insert(libc::SYS_clone, chain);
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    [deny, clone3]
        .into_iter()
        .map(|f| {
            let program: seccompiler::BpfProgram =
                f.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
            Ok(program
                .into_iter()
                .map(|i| BpfInstruction {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect())
        })
        .collect()
}

/// Confines the calling process and whatever it starts: the bounding set cut to `caps`, the
/// seccomp filters installed. Call it in the instance's user namespace, holding
/// CAP_SYS_ADMIN there (installing a filter without no_new_privs needs it; setuid programs
/// keep working).
pub fn confine(c: &Confinement) -> io::Result<()> {
    if c.privileged() {
        return Ok(());
    }
    let filters = seccomp_filters(c.caps).map_err(io::Error::other)?;
    vane_sys::confine::limit_bounding_set(c.caps)
        .map_err(|e| io::Error::new(e.kind(), format!("capability bounding set: {e}")))?;
    for f in &filters {
        vane_sys::confine::install_seccomp(f)
            .map_err(|e| io::Error::new(e.kind(), format!("seccomp filter: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_claimed_once_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let claims = dir.path().join("claims");
        let owner = |name: &str| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (a, b, c, d) = (owner("a"), owner("b"), owner("c"), owner("d"));
        let ma = allocate(&claims, &a).unwrap();
        let mb = allocate(&claims, &b).unwrap();
        assert_ne!(ma.base, mb.base);
        assert!(ma.base >= FIRST_SLOT * ID_COUNT);
        assert_eq!(ma.map_line(), format!("0 {} 65536\n", ma.base));
        // Someone else's release does nothing; the owner's gives the range back.
        release(&claims, &c);
        assert_ne!(allocate(&claims, &c).unwrap().base, ma.base);
        release(&claims, &a);
        assert_eq!(allocate(&claims, &d).unwrap().base, ma.base);
        // A claim whose owner directory is gone is stale, and taken over.
        std::fs::remove_dir(&b).unwrap();
        let e = owner("e");
        assert_eq!(allocate(&claims, &e).unwrap().base, mb.base);
    }

    #[test]
    fn filters_follow_the_capabilities() {
        let default = vane_proto::validate::capability_set(&[], &[]).unwrap();
        let admin = vane_proto::validate::capability_set(&["SYS_ADMIN".into()], &[]).unwrap();
        let d = seccomp_filters(default).unwrap();
        let a = seccomp_filters(admin).unwrap();
        assert_eq!(d.len(), 2);
        // Mount, unshare, setns and the clone flags are allowed with SYS_ADMIN: a shorter
        // first filter.
        assert!(a[0].len() < d[0].len(), "{} {}", a[0].len(), d[0].len());
        assert_eq!(a[1], d[1]);
    }
}

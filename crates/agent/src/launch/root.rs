//! The instance's view of the file system, built by `__launch` as the host's root in a mount
//! namespace of its own: the root (the host's, or a directory under a copy-on-write layer),
//! fresh /proc /sys /dev, private /tmp and /run, the state directory, hosts files, volumes
//! and path rules, and vane's own state hidden.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::mounts::{
    bind, fd_path, make_mounts_private, minimal_dev, open_path, overlay, private_tmpfs,
    read_only_bind,
};
use super::{
    errno, LaunchSpec, HOSTNAME_FILE, HOSTS_FILE, PATHS_DIR, RESOLV_FILE, ROOTFS_DIR, SHARED_DIR,
    STATE_MOUNT,
};

/// Where the instance's root is staged (bound from the host's) in its private directory.
pub const ROOT_DIR: &str = "root";

/// Mounts the root of a `--rootfs` instance at `target`: directory `lower`, seen through
/// the instance's id mapping (its files are root's inside as they are outside), under the
/// instance's copy-on-write layer `DIR/rootfs/upper`. The launch makes the layer (owned by
/// `owner`, the instance's root, when confined); a restore finds it where the source left
/// it, or unpacked from the images.
pub(super) fn rootfs_overlay(
    dir: &Path,
    lower: &Path,
    userns: Option<&OwnedFd>,
    owner: Option<u32>,
    target: &Path,
) -> io::Result<()> {
    let layer = dir.join(ROOTFS_DIR);
    let (upper, work, mapped) = (layer.join("upper"), layer.join("work"), layer.join("lower"));
    for d in [&upper, &work, &mapped] {
        std::fs::create_dir_all(d)?;
    }
    if let Some(owner) = owner {
        std::os::unix::fs::chown(&upper, Some(owner), Some(owner))?;
    }
    let lower = match userns {
        Some(ns) => vane_sys::confine::bind_idmapped(lower, &mapped, ns.as_fd())
            .map(|_| mapped.clone())
            .unwrap_or_else(|_| lower.to_path_buf()),
        None => lower.to_path_buf(),
    };
    overlay(&lower, &upper, &work, target)
        .map_err(|e| io::Error::other(format!("root {}: {e}", lower.display())))
}

/// Builds the instance's root in its mount namespace and moves into it: the host's root
/// (read-only when confined) or a directory under a private copy-on-write layer; fresh
/// /proc, /sys, /dev; private /tmp and /run; the state directory at /tmp/.vane; vane's own
/// state hidden; hosts and hostname files; volumes and path rules (idmapped when confined,
/// so root inside owns what root owns on the host).
pub(super) fn build_root(
    dir: &Path,
    spec: &LaunchSpec,
    userns: Option<&OwnedFd>,
) -> io::Result<PathBuf> {
    make_mounts_private()?;
    // Named network namespaces are nsfs bind mounts, which checkpointing cannot handle, and
    // the instance has no business with other namespaces anyway.
    let _ = umount2("/run/netns", MntFlags::MNT_DETACH);
    let confined = !spec.confinement.privileged();
    let owner = spec.confinement.idmap.map_or(0, |m| m.base);
    // Host paths are opened before anything is mounted over them: the shared directory,
    // vane's binaries, the sources of volumes and path rules. They are reached afterwards
    // through /proc/self/fd links, which work whatever the mounts.
    let shared_dir = dir.join(SHARED_DIR);
    let shared = open_path(&shared_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", shared_dir.display())))?;
    let bin = open_path(Path::new(crate::binary::DIR)).ok();
    let mut sources = Vec::new();
    for source in spec
        .volumes
        .iter()
        .map(|(host, _)| host)
        .chain(spec.redirects.iter().map(|(_, source)| source))
    {
        let f = open_path(source)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
        // Files of the shared directory are the instance's own ids already.
        let idmap = userns.filter(|_| !source.starts_with(&shared_dir));
        sources.push((source.is_dir(), fd_path(&f), f, idmap));
    }
    let own_root = spec.rootfs.is_some();
    let root = match &spec.rootfs {
        Some(lower) => {
            let merged = dir.join(ROOTFS_DIR).join("merged");
            std::fs::create_dir_all(&merged)?;
            rootfs_overlay(dir, lower, userns, confined.then_some(owner), &merged)?;
            merged
        }
        None => {
            let stage = dir.join(ROOT_DIR);
            std::fs::create_dir_all(&stage)?;
            // Confined, the host's root file system alone: none of the host's other mounts
            // (its /run, its other disks) is seen, nor hidden below the instance's own
            // (checkpoints could not take those). Privileged, every host mount as it is.
            if confined {
                read_only_bind(Path::new("/"), &stage)
                    .map_err(|e| errno("bind the host's root", e))?;
            } else {
                bind(Path::new("/"), &stage, true).map_err(|e| errno("bind the host's root", e))?;
            }
            stage
        }
    };
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    // The kernel's views are the instance's own; privileged instances keep the host's
    // devices and /run.
    let fresh: &[&str] = if confined {
        &["proc", "sys", "dev", "run", "tmp"]
    } else {
        &["proc", "sys", "tmp"]
    };
    for d in fresh {
        if !own_root {
            let _ = umount2(&at(d), MntFlags::MNT_DETACH);
        }
        std::fs::create_dir_all(at(d))?;
    }
    // A proc of the host's PID namespace, covered by init's own: the kernel lets init mount
    // a proc only where one is fully visible already. Locked below init's, it cannot be
    // uncovered.
    mount(
        Some("proc"),
        &at("/proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /proc", e))?;
    // A sysfs of the instance's own network namespace, so /sys/class/net shows its devices
    // rather than the host's; read-only, as sysfs also reaches host-wide kernel settings.
    mount(
        Some("sysfs"),
        &at("/sys"),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| errno("mount /sys", e))?;
    if confined {
        mask_dir(&at("/sys/firmware"))?;
        minimal_dev(&at("/dev"), owner)?;
        private_tmpfs(&at("/run"), owner, "0755").map_err(|e| errno("mount /run", e))?;
    } else if own_root {
        minimal_dev(&at("/dev"), owner)?;
    }
    private_tmpfs(&at("/tmp"), owner, "1777").map_err(|e| errno("mount /tmp", e))?;
    // The state directory, bound at the same place in every instance: init writes there, the
    // program's output goes there, and a checkpoint names it as an external mount, so a
    // restored instance finds its own host's directory there.
    let state_inside = at(STATE_MOUNT);
    std::fs::create_dir_all(&state_inside)?;
    bind(&fd_path(&shared), &state_inside, false)
        .map_err(|e| errno("bind the state directory", e))?;
    if own_root {
        // Init runs from vane's binary: it must be where it was (a checkpoint finds the
        // files of the tree by their paths).
        if let Some(bin) = &bin {
            let inside = at(crate::binary::DIR);
            std::fs::create_dir_all(&inside)?;
            read_only_bind(&fd_path(bin), &inside).map_err(|e| errno("bind vane's binaries", e))?;
        }
    } else if confined {
        hide_vane_state(&at, &spec.hide, bin.as_ref())?;
    }
    // Room for targets that do not exist yet, before anything is bound below them (a layer
    // laid over a directory hides the mounts under it).
    let mut layered: Vec<PathBuf> = Vec::new();
    let targets = spec
        .volumes
        .iter()
        .map(|(host, inside)| (inside, host))
        .chain(spec.redirects.iter().map(|(t, s)| (t, s)));
    let (volume_sources, redirect_sources) = sources.split_at(spec.volumes.len());
    for (n, ((target, _), (dir_wanted, _, _, _))) in targets.zip(&sources).enumerate() {
        make_target(dir, &root, own_root, target, *dir_wanted, n, &mut layered)?;
    }
    for (file, target) in [(HOSTS_FILE, "/etc/hosts"), (HOSTNAME_FILE, "/etc/hostname")] {
        let target = at(target);
        if own_root && at("/etc").is_dir() && !target.exists() {
            let _ = File::create(&target);
        }
        if target.exists() {
            read_only_bind(&dir.join(file), &target)
                .map_err(|e| io::Error::other(format!("bind {}: {e}", target.display())))?;
        }
    }
    bind_resolv_conf(dir, &root, own_root, confined)?;
    for ((_, inside), (_, source, _, idmap)) in spec.volumes.iter().zip(volume_sources) {
        bind_source(
            source,
            &root.join(inside.strip_prefix("/").unwrap_or(inside)),
            *idmap,
            true,
        )
        .map_err(|e| io::Error::other(format!("volume {}: {e}", inside.display())))?;
    }
    for ((target, _), (_, source, _, idmap)) in spec.redirects.iter().zip(redirect_sources) {
        bind_source(
            source,
            &root.join(target.strip_prefix("/").unwrap_or(target)),
            *idmap,
            false,
        )
        .map_err(|e| io::Error::other(format!("redirect {}: {e}", target.display())))?;
    }
    drop(sources);
    Ok(root)
}

/// Puts the instance's resolv.conf (`DIR/resolv.conf`) at its /etc/resolv.conf: bound
/// read-only over the file, as the hosts file is (a root of its own without one gets an
/// empty one to bind over). Where /etc/resolv.conf is a link (systemd-resolved's, say, into
/// /run), the file is written where the link leads if that lies in the instance's own
/// /run or /tmp, fresh tmpfs that nothing runs in yet; the link is read, never followed.
/// Anywhere else the instance keeps what it has, and its /etc/hosts.
fn bind_resolv_conf(dir: &Path, root: &Path, own_root: bool, confined: bool) -> io::Result<()> {
    let target = root.join("etc/resolv.conf");
    let source = dir.join(RESOLV_FILE);
    let meta = match std::fs::symlink_metadata(&target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound && own_root && root.join("etc").is_dir() => {
            File::create(&target)?;
            std::fs::symlink_metadata(&target)?
        }
        Err(_) => return Ok(()),
    };
    if meta.file_type().is_file() {
        return read_only_bind(&source, &target)
            .map_err(|e| io::Error::other(format!("bind {}: {e}", target.display())));
    }
    if !meta.file_type().is_symlink() {
        return Ok(());
    }
    let link = std::fs::read_link(&target)?;
    let Some(inside) = lexical(&Path::new("/etc").join(link)) else {
        return Ok(());
    };
    let private = inside.starts_with("/tmp/") || (confined && inside.starts_with("/run/"));
    if !private {
        return Ok(());
    }
    let at = root.join(inside.strip_prefix("/").unwrap_or(&inside));
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(&source, &at).map(|_| ())
}

/// `path` with `.` and `..` taken away without looking at the file system; `None` if it
/// climbs above the root.
fn lexical(path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Binds a volume or path rule's source: through the instance's id mapping where the file
/// system allows it (root inside writes as root on the host), plainly otherwise.
pub(super) fn bind_source(
    source: &Path,
    target: &Path,
    idmap: Option<&OwnedFd>,
    recursive: bool,
) -> io::Result<()> {
    if let Some(ns) = idmap {
        if vane_sys::confine::bind_idmapped(source, target, ns.as_fd()).is_ok() {
            return Ok(());
        }
    }
    bind(source, target, recursive).map_err(io::Error::from)
}

/// Hides vane's own state (keys, credentials, other instances' directories) under empty
/// read-only directories; only vane's binaries stay, read-only, for the instance's init.
fn hide_vane_state(
    at: &dyn Fn(&str) -> PathBuf,
    extra: &[PathBuf],
    bin: Option<&File>,
) -> io::Result<()> {
    let vane = at(VANE_DIR);
    for hidden in extra.iter().map(|p| at(&p.to_string_lossy())) {
        if !hidden.starts_with(&vane) && hidden.is_dir() {
            mask_dir(&hidden)?;
        }
    }
    if !vane.is_dir() {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        &vane,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| errno(&format!("hide {VANE_DIR}"), e))?;
    if let Some(bin) = bin {
        let inside = vane.join("bin");
        std::fs::create_dir_all(&inside)?;
        read_only_bind(&fd_path(bin), &inside).map_err(|e| errno("bind vane's binaries", e))?;
    }
    mount(
        None::<&str>,
        &vane,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| errno(&format!("hide {VANE_DIR}"), e))
}

/// Where vane keeps its state on every host (agents, controllers, labs, binaries).
const VANE_DIR: &str = "/var/lib/vane";

/// An empty read-only directory over `path`.
fn mask_dir(path: &Path) -> io::Result<()> {
    if !path.is_dir() {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=0"),
    )
    .map_err(|e| errno(&format!("hide {}", path.display()), e))
}

/// Makes `target` (a path inside the instance) exist, as a directory or an empty file, without
/// changing the host: inside a root of its own or the private /tmp and /run it is simply
/// created; elsewhere the nearest existing directory above it gets a private copy-on-write
/// layer (in the instance's directory `dir`) and the missing part is created in that layer.
fn make_target(
    dir: &Path,
    root: &Path,
    own_root: bool,
    target: &Path,
    dir_wanted: bool,
    n: usize,
    layered: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let at = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let seen = at(target);
    if seen.exists() {
        return Ok(());
    }
    let private = own_root
        || target.starts_with("/tmp")
        || target.starts_with("/run")
        || layered.iter().any(|l| target.starts_with(l));
    if !private {
        let ancestor = target
            .ancestors()
            .skip(1)
            .find(|a| at(a).is_dir())
            .unwrap_or(Path::new("/"));
        if ancestor == Path::new("/") {
            return Err(io::Error::other(format!(
                "cannot make {}: its top directory does not exist",
                target.display()
            )));
        }
        let layer = dir.join(PATHS_DIR).join(n.to_string());
        let (upper, work) = (layer.join("upper"), layer.join("work"));
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&work)?;
        overlay(&at(ancestor), &upper, &work, &at(ancestor))
            .map_err(|e| io::Error::other(format!("layer over {}: {e}", ancestor.display())))?;
        layered.push(ancestor.to_path_buf());
    }
    if dir_wanted {
        std::fs::create_dir_all(&seen)
    } else {
        if let Some(parent) = seen.parent() {
            std::fs::create_dir_all(parent)?;
        }
        File::create(&seen).map(|_| ())
    }
    .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", target.display())))
}

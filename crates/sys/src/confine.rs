//! The kernel interfaces that confine an instance and that `nix` does not wrap: user
//! namespaces made for a chosen id mapping, the new mount API (recursive read-only trees,
//! idmapped binds), the capability bounding set, seccomp filters, and opening a path below a
//! directory without following links.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A child process that holds namespaces of its own while the caller gives them names
/// (writes a user namespace's id maps, attaches a network namespace with `ip netns attach`),
/// then exits when dropped.
pub struct Holder {
    pid: libc::pid_t,
    go: Option<OwnedFd>,
}

impl Holder {
    /// Forks a child that joins the user namespace `join_user` if given, then unshares
    /// `flags` (CLONE_NEW*). The child runs raw system calls only, so the caller may have
    /// threads.
    pub fn spawn(join_user: Option<BorrowedFd<'_>>, flags: libc::c_int) -> io::Result<Holder> {
        let (ready_r, ready_w) = nix::unistd::pipe()?;
        let (go_r, go_w) = nix::unistd::pipe()?;
        let user = join_user.map_or(-1, |fd| fd.as_raw_fd());
        // SAFETY: the child only makes async-signal-safe system calls on descriptors it
        // owns and a one-byte buffer, then `_exit`s: nothing of the parent's state (locks,
        // allocator) is touched, which makes forking a threaded process sound.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: as above; the child never returns into Rust code of the parent.
            unsafe {
                // The parent's ends: closed, so that the parent closing its own is seen here.
                libc::close(ready_r.as_raw_fd());
                libc::close(go_w.as_raw_fd());
                let joined = user < 0 || libc::setns(user, libc::CLONE_NEWUSER) == 0;
                let ok: u8 = u8::from(joined && libc::unshare(flags) == 0);
                libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
                let mut b = 0u8;
                libc::read(go_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(ready_w);
        drop(go_r);
        let holder = Holder {
            pid,
            go: Some(go_w),
        };
        let mut ok = [0u8];
        nix::unistd::read(ready_r.as_raw_fd(), &mut ok)?;
        if ok[0] != 1 {
            return Err(io::Error::other("cannot create namespaces"));
        }
        Ok(holder)
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.go = None;
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
    }
}

/// Makes a user namespace whose uid and gid maps are `map` (lines of `inside outside count`)
/// and returns a descriptor of it; the namespace lives as long as something refers to it.
pub fn new_userns(map: &str) -> io::Result<OwnedFd> {
    let holder = Holder::spawn(None, libc::CLONE_NEWUSER)?;
    let pid = holder.pid();
    std::fs::write(format!("/proc/{pid}/uid_map"), map)
        .map_err(|e| io::Error::new(e.kind(), format!("write uid_map: {e}")))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), map)
        .map_err(|e| io::Error::new(e.kind(), format!("write gid_map: {e}")))?;
    Ok(OwnedFd::from(File::open(format!("/proc/{pid}/ns/user"))?))
}

/// The user namespace that owns the namespace `ns` (ioctl NS_GET_USERNS).
pub fn owning_userns(ns: &File) -> io::Result<OwnedFd> {
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    // SAFETY: an ioctl without arguments on a valid namespace descriptor.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl just returned this descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

fn mount_setattr(
    fd: BorrowedFd<'_>,
    path: &Path,
    flags: libc::c_uint,
    attr: &MountAttr,
) -> io::Result<()> {
    let p = cstring(path)?;
    // SAFETY: `p` is NUL-terminated and outlives the call; `attr` points to a properly laid
    // out `struct mount_attr` of the size passed; `fd` is a valid descriptor.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            p.as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Makes the mount at `path` and every mount below it read-only (mount_setattr(2) with
/// AT_RECURSIVE): a tree bound from the host becomes one that cannot be written through.
pub fn make_tree_readonly(path: &Path) -> io::Result<()> {
    let cwd = File::open(".")?;
    mount_setattr(
        cwd.as_fd(),
        path,
        libc::AT_RECURSIVE as libc::c_uint,
        &MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        },
    )
}

/// A detached copy of the mount at `path` (open_tree(2) with OPEN_TREE_CLONE), with the
/// mounts below it when `recursive`.
fn clone_tree(path: &Path, recursive: bool) -> io::Result<OwnedFd> {
    let p = cstring(path)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `p` is NUL-terminated and outlives the call.
    let tree =
        check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, p.as_ptr(), flags) })?;
    // SAFETY: open_tree just returned this descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// Attaches the detached mount `tree` at `target` (move_mount(2)).
fn attach(tree: &OwnedFd, target: &Path) -> io::Result<()> {
    let empty = CString::default();
    let dst = cstring(target)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; `tree` is a detached
    // mount made by open_tree.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Binds `source` at `target` through the id mapping of the user namespace `userns`
/// (an idmapped mount): a file owned by on-disk id N is seen as owned by whatever N maps to
/// in that namespace, so root inside owns what root owns on the host, and what it creates
/// is owned by root on disk. Fails where the file system does not support idmapped mounts.
pub fn bind_idmapped(source: &Path, target: &Path, userns: BorrowedFd<'_>) -> io::Result<()> {
    let tree = clone_tree(source, false)?;
    mount_setattr(
        tree.as_fd(),
        Path::new(""),
        libc::AT_EMPTY_PATH as libc::c_uint,
        &MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        },
    )?;
    attach(&tree, target)
}

/// Stacks a copy of the mount tree at the working directory on top of it and moves the
/// working directory into the copy. The copy's top is a mount of this mount namespace's own
/// (not locked), which pivot_root(2) requires; the mounts below it keep their locks.
pub fn restack_cwd() -> io::Result<()> {
    let here = Path::new(".");
    let tree = clone_tree(here, true)?;
    attach(&tree, here)?;
    nix::unistd::fchdir(tree.as_raw_fd()).map_err(io::Error::from)
}

/// The highest capability number this kernel knows.
pub fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Removes from the calling thread's bounding set every capability whose bit is not set in
/// `keep`: neither this process nor anything it executes can hold them again.
pub fn limit_bounding_set(keep: u64) -> io::Result<()> {
    for cap in 0..=last_capability().min(63) {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// One instruction of a classic BPF program (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInstruction {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Installs a seccomp filter on the calling thread, inherited by its children. Without
/// setting no_new_privs: the caller must hold CAP_SYS_ADMIN in its user namespace.
pub fn install_seccomp(program: &[BpfInstruction]) -> io::Result<()> {
    let filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len())
            .map_err(|_| io::Error::other("seccomp filter too long"))?,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points to `filter`, which outlives the call; the kernel copies it.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    })
    .map(drop)
}

/// Opens `rel` below the directory `dir` without following any symbolic link and without
/// leaving `dir` (openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS), with `flags` (O_CLOEXEC is added). For files an instance can
/// write: a link it planted there is refused (ELOOP), never followed.
pub fn open_beneath(dir: &File, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let path = cstring(rel)?;
    // SAFETY: open_how is a plain C struct; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is NUL-terminated and outlives the call; `how` is a valid open_how of
    // the size passed; `dir` is an open descriptor.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: openat2 just returned this descriptor; we are its only owner.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

//! Images packed for the trip to another host (or into a snapshot): a tar of the images,
//! the instance's shared directory and the copy-on-write layer of a `--rootfs` root, with the
//! host ids the instance's ids were, and its unpacking, which moves the files' owners into
//! this host's range.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{IMAGES_DIR, PACK_FILE};
use crate::sandbox::IdMap;

/// Packs `DIR/images`, the instance's shared directory (its log, exit status and the
/// files of its `{state}` paths) and the copy-on-write layer of its `--rootfs` root, if it
/// has one, into `DIR/images.tar`, with the host ids the instance's ids were (`ids`: its
/// range here; `None` for a privileged instance); returns its size. The layer keeps its
/// overlay attributes (opaque directories) and whiteouts (device nodes 0:0).
pub fn pack(dir: &Path, ids: Option<IdMap>) -> Result<u64, String> {
    write_ids(dir, ids)?;
    let packed = run_tar(
        &mut pack_command(dir, &dir.join(PACK_FILE)),
        "packing images",
    );
    let _ = std::fs::remove_file(dir.join(IDS_FILE));
    packed?;
    std::fs::metadata(dir.join(PACK_FILE))
        .map(|m| m.len())
        .map_err(|e| format!("packing images: {e}"))
}

/// Packs as [`pack`] does, into a pipe, for a transfer that goes as the pack is made: the
/// pipe's end, and the packing's end (awaited once the pipe is read to its end: whether
/// all of the pack came through it).
pub fn pack_to_pipe(
    dir: &Path,
    ids: Option<IdMap>,
) -> Result<
    (
        tokio::process::ChildStdout,
        impl std::future::Future<Output = Result<(), String>>,
    ),
    String,
> {
    write_ids(dir, ids)?;
    let mut child = tokio::process::Command::from(pack_command(dir, Path::new("-")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running tar: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    widen_pipe(&stdout);
    let ids_file = dir.join(IDS_FILE);
    let ended = async move {
        let out = child.wait_with_output().await;
        let _ = std::fs::remove_file(ids_file);
        tar_status(out, "packing images")
    };
    Ok((stdout, ended))
}

/// The most bytes a pack of `DIR` can take ([`pack`] or [`pack_to_pipe`]): what a
/// destination that unpacks as the pack arrives accepts, at most. Each entry counts its
/// header, its data in whole blocks, a long name's and its extended attributes' own
/// headers; then the end of the archive and the padding of its last record.
pub fn pack_bound(dir: &Path) -> u64 {
    fn entries(path: &Path, bound: &mut u64) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        let blocks = |n: u64| n.div_ceil(512) * 512;
        let name = path.as_os_str().len() as u64 + 1;
        *bound += 512 + blocks(if meta.is_file() { meta.len() } else { 0 });
        *bound += 512 + blocks(name) + 2 * 1024;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                entries(&entry.path(), bound);
            }
        }
    }
    let mut bound = 2 * RECORD;
    for member in [IMAGES_DIR, crate::launch::SHARED_DIR, IDS_FILE, UPPER] {
        entries(&dir.join(member), &mut bound);
    }
    // The ids file is written when the pack is made.
    bound + 3 * 512
}

fn write_ids(dir: &Path, ids: Option<IdMap>) -> Result<(), String> {
    let ids_text = match ids {
        Some(m) => format!("{} {}\n", m.base, m.count),
        None => "host\n".to_string(),
    };
    std::fs::write(dir.join(IDS_FILE), ids_text).map_err(|e| format!("packing images: {e}"))
}

/// The size of a pack's records: what tar writes at once, as much as one message of a
/// direct transfer carries (its default, 10 KiB, made a pipeline of two tars and two
/// agents switch five times as often).
const RECORD: u64 = 64 << 10;
/// What the pipes between tar and the agent hold: a record in flight leaves room for the
/// next ones, so that neither side waits on each record.
const PIPE_BYTES: nix::libc::c_int = 1 << 20;

/// Widens a pipe to tar to [`PIPE_BYTES`] where `fs.pipe-max-size` lets it (the agent
/// raises it for CRIU's page server); a narrower one only costs speed.
fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    let _ = nix::fcntl::fcntl(
        pipe.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES),
    );
}

/// The tar that packs `DIR`'s members into `out` (`-`: its standard output).
fn pack_command(dir: &Path, out: &Path) -> Command {
    let mut cmd = Command::new("tar");
    cmd.arg("-C")
        .arg(dir)
        .arg("--blocking-factor")
        .arg((RECORD / 512).to_string())
        .arg("--numeric-owner")
        .args(OVERLAY_XATTRS)
        .arg("-cf")
        .arg(out)
        .arg(IMAGES_DIR)
        .arg(crate::launch::SHARED_DIR)
        .arg(IDS_FILE)
        .args(dir.join(UPPER).is_dir().then_some(UPPER));
    cmd
}

/// In a pack: the host ids the instance's ids were where it was packed.
const IDS_FILE: &str = "ids";
/// The copy-on-write layer of a `--rootfs` root, in the instance's directory (`upper` in
/// `launch::ROOTFS_DIR`).
const UPPER: &str = "rootfs/upper";
/// What tar must keep of the layer's extended attributes: overlayfs's marks of an opaque
/// directory (which hides the lower one's files), a renamed directory and a whiteout. Not
/// `origin`, a file handle of the lower file on the source's file system.
const OVERLAY_XATTRS: &[&str] = &[
    "--xattrs",
    "--xattrs-include=trusted.overlay.opaque",
    "--xattrs-include=trusted.overlay.redirect",
    "--xattrs-include=trusted.overlay.whiteout*",
];

/// Unpacks `DIR/images.tar` (received from another host, or a snapshot) into `DIR`. The
/// files of the shared directory and of a `--rootfs` layer become the instance's here: each file's owner and group move
/// from the packing host's range of ids to `owner` (this host's range for the instance),
/// at the same place in it, so that a file its program's user wrote stays that user's.
/// Ids from outside the packed range (or a pack that does not say it) become the
/// instance's root. GNU tar makes the links of a pack last, so none is followed while it
/// extracts.
pub fn unpack(dir: &Path, owner: Option<IdMap>) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir.join(IMAGES_DIR));
    run_tar(
        &mut unpack_command(dir, &dir.join(PACK_FILE)),
        "unpacking images",
    )?;
    take_ids(dir, owner)
}

/// Unpacks a pack as it arrives (a direct transfer): what [`unpack`] does, fed by pieces,
/// never taking more than the bound it was started with. Whatever it unpacked goes if it
/// does not finish.
pub struct Unpacker {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    dir: PathBuf,
    received: u64,
    bound: u64,
}

impl Unpacker {
    /// Starts unpacking into `DIR` (its images and any pack there go first) a pack of at
    /// most `bound` bytes.
    pub fn start(dir: &Path, bound: u64) -> Result<Unpacker, String> {
        let _ = std::fs::remove_dir_all(dir.join(IMAGES_DIR));
        let _ = std::fs::remove_file(dir.join(PACK_FILE));
        let mut child = tokio::process::Command::from(unpack_command(dir, Path::new("-")))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("running tar: {e}"))?;
        let stdin = child.stdin.take();
        if let Some(pipe) = &stdin {
            widen_pipe(pipe);
        }
        Ok(Unpacker {
            stdin,
            child,
            dir: dir.to_path_buf(),
            received: 0,
            bound,
        })
    }

    /// The next bytes of the pack.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        self.received += data.len() as u64;
        if self.received > self.bound {
            return Err(format!(
                "the images are longer than the {} bytes announced",
                self.bound
            ));
        }
        // tar has read the archive's end (what follows is the padding of its last record,
        // which it leaves unread): nothing more to unpack.
        let Some(stdin) = self.stdin.as_mut() else {
            return Ok(());
        };
        if let Err(e) = stdin.write_all(data).await {
            // tar stopped reading: at the archive's end, or it says why.
            let _ = self.stdin.take();
            let out = self.child.wait().await;
            if e.kind() == io::ErrorKind::BrokenPipe && out.as_ref().is_ok_and(|s| s.success()) {
                return Ok(());
            }
            let why = match self.child.stderr.take() {
                Some(mut err) => {
                    let mut text = String::new();
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut text).await;
                    text
                }
                None => String::new(),
            };
            return Err(format!("unpacking images: {} ({e}, {out:?})", why.trim()));
        }
        Ok(())
    }

    /// The end of the pack: its files in place and theirs (see [`unpack`]), or an error.
    pub async fn finish(mut self, owner: Option<IdMap>) -> Result<(), String> {
        drop(self.stdin.take());
        let out = self.child.wait_with_output().await;
        tar_status(out, "unpacking images")?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || take_ids(&dir, owner))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Gives up: tar is stopped and what it unpacked removed.
    pub async fn abandon(mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill().await;
        let images = self.dir.join(IMAGES_DIR);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(images)).await;
    }
}

/// The tar that unpacks `pack` (`-`: its standard input) into `DIR`.
fn unpack_command(dir: &Path, pack: &Path) -> Command {
    let mut cmd = Command::new("tar");
    cmd.arg("-C")
        .arg(dir)
        .arg("--same-owner")
        .arg("--numeric-owner")
        .args(OVERLAY_XATTRS)
        .arg("-xf")
        .arg(pack);
    cmd
}

/// After an unpack: the pack's ids file read and removed, and the owners of the shared
/// directory and the layer moved into `owner` (see [`unpack`]).
fn take_ids(dir: &Path, owner: Option<IdMap>) -> Result<(), String> {
    let packed = std::fs::read_to_string(dir.join(IDS_FILE)).unwrap_or_default();
    let _ = std::fs::remove_file(dir.join(IDS_FILE));
    let from = {
        let mut words = packed.split_whitespace().map(|w| w.parse::<u32>().ok());
        match (words.next().flatten(), words.next().flatten()) {
            (Some(base), Some(count)) => Some(IdMap { base, count }),
            _ => None,
        }
    };
    if let Some(owner) = owner {
        for tree in [dir.join(crate::launch::SHARED_DIR), dir.join(UPPER)] {
            if tree.exists() {
                shift_ids(&tree, from, owner)
                    .map_err(|e| format!("unpacking images: {}: {e}", tree.display()))?;
            }
        }
    }
    Ok(())
}

/// Moves the owners of the tree at `path` (links not followed) from range `from` to `to`.
fn shift_ids(path: &Path, from: Option<IdMap>, to: IdMap) -> io::Result<()> {
    let shift = |id: u32| match from {
        Some(f) if id >= f.base && id - f.base < f.count.min(to.count) => to.base + (id - f.base),
        _ => to.base,
    };
    let meta = std::fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, Some(shift(meta.uid())), Some(shift(meta.gid())))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            shift_ids(&entry?.path(), from, to)?;
        }
    }
    Ok(())
}

/// Runs a tar command to its end; when it fails, says what it was `doing` and tar's error.
fn run_tar(cmd: &mut Command, doing: &str) -> Result<(), String> {
    tar_status(cmd.stdin(Stdio::null()).output(), doing)
}

/// How a tar ended: when it failed, what it was `doing` and tar's error.
fn tar_status(out: io::Result<std::process::Output>, doing: &str) -> Result<(), String> {
    let out = out.map_err(|e| format!("running tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{doing}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

//! Images packed for the trip to another host (or into a snapshot): a tar of the images,
//! the instance's shared directory and the copy-on-write layer of a `--rootfs` root, with the
//! host ids the instance's ids were, and its unpacking, which moves the files' owners into
//! this host's range.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{IMAGES_DIR, PACK_FILE};
use crate::sandbox::IdMap;

/// Packs `DIR/images`, the instance's shared directory (its log, exit status and the
/// files of its `{state}` paths) and the copy-on-write layer of its `--rootfs` root, if it
/// has one, into `DIR/images.tar`, with the host ids the instance's ids were (`ids`: its
/// range here; `None` for a privileged instance); returns its size. The layer keeps its
/// overlay attributes (opaque directories) and whiteouts (device nodes 0:0).
pub fn pack(dir: &Path, ids: Option<IdMap>) -> Result<u64, String> {
    let ids_text = match ids {
        Some(m) => format!("{} {}\n", m.base, m.count),
        None => "host\n".to_string(),
    };
    std::fs::write(dir.join(IDS_FILE), ids_text).map_err(|e| format!("packing images: {e}"))?;
    run_tar(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("--numeric-owner")
            .args(OVERLAY_XATTRS)
            .arg("-cf")
            .arg(dir.join(PACK_FILE))
            .arg(IMAGES_DIR)
            .arg(crate::launch::SHARED_DIR)
            .arg(IDS_FILE)
            .args(dir.join(UPPER).is_dir().then_some(UPPER)),
        "packing images",
    )?;
    let _ = std::fs::remove_file(dir.join(IDS_FILE));
    std::fs::metadata(dir.join(PACK_FILE))
        .map(|m| m.len())
        .map_err(|e| format!("packing images: {e}"))
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
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("--same-owner")
            .arg("--numeric-owner")
            .args(OVERLAY_XATTRS)
            .arg("-xf")
            .arg(dir.join(PACK_FILE)),
        "unpacking images",
    )?;
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
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{doing}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

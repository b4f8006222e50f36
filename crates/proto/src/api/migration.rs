//! Migrations, snapshots and restores: their requests, the record each migration leaves,
//! and the progress of one under way.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::Instance;

/// One live migration of an instance (`vane migrate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub from: String,
    pub to: String,
    /// Unix time, seconds, when it completed.
    pub at: u64,
    /// From the freeze on the source until the directory sends to the destination.
    pub freeze_ms: u64,
    /// Size of the images moved.
    pub image_bytes: u64,
    /// Where the freeze went.
    #[serde(default)]
    pub phases: Phases,
    /// Post-copy (lazy pages): the images moved without the memory, which the destination
    /// fetched from the source after the freeze; this long from the end of the freeze until
    /// the source had served every page and was released. `None`: a whole dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy_ms: Option<u64>,
}

/// What a migration under way is doing: its phase (`dump`, `transfer`, `restore`,
/// `switch`, `pages`), the bytes of it done so far (where they can be counted), and how long
/// the phase has lasted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: String,
    pub bytes: u64,
    pub phase_ms: u64,
}

/// The parts of a migration's freeze, in milliseconds: they add up to `freeze_ms`, which
/// runs from the moment other hosts start holding what they send to the instance until
/// they send it on to where it runs again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    /// The switches that send to the instance taking the view that holds it (the
    /// instance still runs and answers what reached it before).
    #[serde(default)]
    pub hold_ms: u64,
    /// Freezing and dumping the tree on the source, packing its images.
    pub dump_ms: u64,
    /// Moving the images to the destination.
    pub transfer_ms: u64,
    /// Unpacking and restoring them there.
    pub restore_ms: u64,
    /// Recording the new host, the destination taking its view, then the others, and
    /// the held lookups answered (their switches send what they held).
    pub switch_ms: u64,
}

/// `POST /v1/instances/{name}/migrate` (`vane migrate NAME --to HOST`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateSpec {
    pub to: String,
    /// Post-copy: move the instance without its memory, which follows from the source
    /// after the freeze (a freeze that does not grow with memory). Inside that window the
    /// instance needs both hosts: if the source or the link fails before the last page,
    /// the instance is lost. Needs the direct path between the hosts; without it, or where
    /// CRIU cannot, the migration copies the memory inside the freeze as without this.
    #[serde(default)]
    pub post_copy: bool,
}

/// `POST /v1/instances/{name}/snapshot` (`vane snapshot NAME --out DIR [--stop]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// Stop the instance once it is dumped.
    #[serde(default)]
    pub stop: bool,
}

/// `POST /v1/restore` (`vane restore DIR [--host H] [--name N --ip IP --hostname H]`): a new
/// instance from a snapshot, with the snapshot's identity or (a clone) a new one.
///
/// Snapshots travel as a stream of frames (`frame`), never whole: the answer of
/// `POST /v1/instances/NAME/snapshot` is a `RECORD` frame (the `Instance`, JSON), `IMAGES`
/// frames (the packed images: a tar of CRIU's image files and the program's log) and a
/// `SEAL` frame, or an `ERROR` frame where it failed; the body of `POST /v1/restore` is a
/// `RECORD` frame (this, JSON) followed by the `IMAGES` frames.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The instance the snapshot was made of.
    pub instance: Instance,
    /// The cluster's seal of `instance` and the images (HMAC-SHA256, hex): a restore
    /// accepts only snapshots sealed by its own cluster, unchanged.
    pub seal: String,
    /// Length of the packed images that follow.
    pub images_bytes: u64,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Media type of snapshot streams (`RestoreSpec`).
pub const SNAPSHOT_MEDIA_TYPE: &str = "application/vnd.vane.snapshot";

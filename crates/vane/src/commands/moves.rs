//! Moving instances: `migrate` (with its progress line), `snapshot` (the controller's sealed
//! stream written to a directory) and `restore` (that directory streamed back).

use anyhow::{bail, Result};

use vane_proto::api::Instance;

use super::output::json;
use super::path_segment;
use super::progress::{phase_line, Counted, Progress};
use crate::cli::Output;
use crate::client::Client;

pub fn migrate(c: &Client, name: &str, to: &str, post_copy: bool, output: Output) -> Result<()> {
    let path = path_segment(name)?;
    let spec = vane_proto::api::MigrateSpec {
        to: to.to_string(),
        post_copy,
    };
    // Where the migration is while it lasts: its phase, bytes and rate.
    let progress = Progress::spinner(output != Output::Json);
    let inst: Instance = std::thread::scope(|scope| {
        let moving = scope.spawn(|| c.post(&format!("/v1/instances/{path}/migrate"), &spec));
        while progress.shown() && !moving.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(250));
            if let Ok(now) = c.get::<Instance>(&format!("/v1/instances/{path}")) {
                if let Some(p) = now.progress {
                    progress.message(format!("{name}: {}", phase_line(&p)));
                }
            }
        }
        moving.join().expect("the migration's thread")
    })?;
    drop(progress);
    let last = inst.migrations.last();
    if output == Output::Json {
        json(&last);
        return Ok(());
    }
    match last {
        Some(m) => {
            let p = m.phases;
            let memory = match m.post_copy_ms {
                Some(ms) => format!(", memory after it (post-copy, source released in {ms} ms)"),
                None => String::new(),
            };
            println!(
                "{name}: {} -> {}, freeze {} ms (hold {}, dump {}, transfer {}, restore {}, switch {}), image {:.1} MiB{memory}",
                m.from,
                m.to,
                m.freeze_ms,
                p.hold_ms,
                p.dump_ms,
                p.transfer_ms,
                p.restore_ms,
                p.switch_ms,
                m.image_bytes as f64 / (1024.0 * 1024.0)
            )
        }
        None => println!("{name}"),
    }
    Ok(())
}

/// The snapshot's description in its directory.
const SNAPSHOT_INSTANCE: &str = "instance.json";
/// The snapshot's packed CRIU images in its directory.
const SNAPSHOT_IMAGES: &str = "images.tar";
/// The cluster's seal of the other two files.
const SNAPSHOT_SEAL: &str = "seal";

pub fn snapshot(c: &Client, name: &str, out: &std::path::Path, stop: bool) -> Result<()> {
    let mut stream = c.stream(
        &format!("/v1/instances/{}/snapshot", path_segment(name)?),
        Some(&vane_proto::api::SnapshotSpec { stop }),
    )?;
    // A snapshot holds the instance's memory: the directory and its files are the user's
    // alone, and nothing already there (a link, say) is written through.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .and_then(|_| std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    }
    let files = [SNAPSHOT_INSTANCE, SNAPSHOT_IMAGES, SNAPSHOT_SEAL].map(|f| out.join(f));
    let progress = Progress::counter(true);
    progress.message(format!("{name}: snapshot"));
    let result = receive_snapshot(&mut stream, &files, &progress);
    drop(progress);
    if result.is_err() {
        // Nothing half-made: a snapshot is whole or absent.
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
    }
    let bytes = result.map_err(|e| anyhow::anyhow!("snapshot of {name}: {e}"))?;
    println!(
        "{name}: snapshot in {}, {:.1} MiB",
        out.display(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// A new file only the user can read, in place of whatever was at `path`.
fn create_private(path: &std::path::Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Writes a snapshot stream (`vane_proto::api::RestoreSpec`) into the snapshot's `files`
/// (record, images, seal) as it arrives; returns the images' size.
fn receive_snapshot(
    stream: &mut impl std::io::Read,
    files: &[std::path::PathBuf; 3],
    progress: &Progress,
) -> Result<u64> {
    use std::io::Write;
    use vane_proto::api::frame;
    let [record_file, images_file, seal_file] = files;
    let broken = |e: std::io::Error| anyhow::anyhow!("the controller's stream broke: {e}");
    let mut images: Option<std::io::BufWriter<std::fs::File>> = None;
    let mut bytes = 0u64;
    loop {
        let Some((kind, data)) = frame::read(stream).map_err(broken)? else {
            bail!("the controller's stream ended before the snapshot was sealed");
        };
        match kind {
            frame::RECORD => {
                let instance: Instance = serde_json::from_slice(&data)
                    .map_err(|e| anyhow::anyhow!("bad record from the controller: {e}"))?;
                create_private(record_file)?
                    .write_all(&serde_json::to_vec_pretty(&instance).expect("serializes"))
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", record_file.display()))?;
                images = Some(std::io::BufWriter::with_capacity(
                    1 << 20,
                    create_private(images_file)?,
                ));
            }
            frame::IMAGES => {
                let Some(w) = images.as_mut() else {
                    bail!("images before the record in the controller's stream");
                };
                w.write_all(&data)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", images_file.display()))?;
                bytes += data.len() as u64;
                progress.advance(data.len() as u64);
            }
            frame::SEAL => {
                let Some(w) = images.take() else {
                    bail!("a seal before the record in the controller's stream");
                };
                w.into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", images_file.display()))?;
                let mut seal = data;
                seal.push(b'\n');
                create_private(seal_file)?
                    .write_all(&seal)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", seal_file.display()))?;
                return Ok(bytes);
            }
            frame::ERROR => bail!("{}", String::from_utf8_lossy(&data)),
            other => bail!("unexpected frame of kind {other} in the controller's stream"),
        }
    }
}

pub fn restore(
    c: &Client,
    dir: &std::path::Path,
    host: Option<String>,
    name: Option<String>,
    ip: Option<std::net::Ipv4Addr>,
    hostname: Option<String>,
) -> Result<()> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    let instance: Instance = serde_json::from_slice(&read(SNAPSHOT_INSTANCE)?).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a snapshot: {e}",
            dir.join(SNAPSHOT_INSTANCE).display()
        )
    })?;
    let seal = String::from_utf8_lossy(&read(SNAPSHOT_SEAL)?)
        .trim()
        .to_string();
    let images_path = dir.join(SNAPSHOT_IMAGES);
    let images = std::fs::File::open(&images_path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", images_path.display()))?;
    let images_bytes = images
        .metadata()
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", images_path.display()))?
        .len();
    let spec = vane_proto::api::RestoreSpec {
        instance,
        seal,
        images_bytes,
        host,
        name,
        ip,
        hostname,
    };
    let record = vane_proto::api::frame::encoded(
        vane_proto::api::frame::RECORD,
        &serde_json::to_vec(&spec).expect("serializes"),
    );
    let progress = Progress::bar(true, images_bytes);
    progress.message(format!(
        "{}: restore",
        spec.name.as_ref().unwrap_or(&spec.instance.name)
    ));
    let body = std::io::Read::chain(
        std::io::Cursor::new(record),
        ImageFrames {
            file: images,
            frame: Vec::new(),
            at: 0,
            progress: progress.counter_handle(),
        },
    );
    let inst: Instance =
        c.post_stream("/v1/restore", vane_proto::api::SNAPSHOT_MEDIA_TYPE, body)?;
    drop(progress);
    println!("{}", inst.name);
    Ok(())
}

/// A snapshot's packed images as `IMAGES` frames of up to 1 MiB, read as they are sent.
struct ImageFrames {
    file: std::fs::File,
    /// The frame being sent, and how much of it is.
    frame: Vec<u8>,
    at: usize,
    /// Told of each piece of the file as it is read.
    progress: Counted,
}

impl std::io::Read for ImageFrames {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.frame.len() {
            let mut data = vec![0u8; 1 << 20];
            let n = self.file.read(&mut data)?;
            if n == 0 {
                return Ok(0);
            }
            self.progress.advance(n as u64);
            self.frame =
                vane_proto::api::frame::encoded(vane_proto::api::frame::IMAGES, &data[..n]);
            self.at = 0;
        }
        let n = buf.len().min(self.frame.len() - self.at);
        buf[..n].copy_from_slice(&self.frame[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

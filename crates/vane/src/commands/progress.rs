//! Progress of long work (migrations, snapshots, restores) on standard error: a line that
//! redraws itself on a terminal, nothing at all when standard error is piped or the output
//! is JSON, so scripts read only the result.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(super) struct Progress(Option<ProgressBar>);

impl Progress {
    /// Work whose size is not known in advance: a spinner and a message (which says how
    /// far the work is).
    pub fn spinner(wanted: bool) -> Progress {
        Progress::drawn(wanted, || {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("template"));
            bar
        })
    }

    /// Bytes arriving without a known total: a spinner, the bytes so far and their rate.
    pub fn counter(wanted: bool) -> Progress {
        Progress::drawn(wanted, || {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} {binary_bytes} ({binary_bytes_per_sec}, {elapsed})",
                )
                .expect("template"),
            );
            bar
        })
    }

    /// Work of `total` bytes: a bar with bytes, rate and time left.
    pub fn bar(wanted: bool, total: u64) -> Progress {
        Progress::drawn(wanted, || {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta} left)",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            bar
        })
    }

    fn drawn(wanted: bool, make: impl FnOnce() -> ProgressBar) -> Progress {
        if !wanted || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = make();
        bar.set_draw_target(ProgressDrawTarget::stderr());
        // Redrawn by its own thread: a spinner keeps turning while a request blocks.
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress(Some(bar))
    }

    /// Whether anything is drawn: the work's own polling for progress can stop otherwise.
    pub fn shown(&self) -> bool {
        self.0.is_some()
    }

    pub fn message(&self, msg: String) {
        if let Some(bar) = &self.0 {
            bar.set_message(msg);
        }
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    /// A handle that counts bytes from where the work happens (a request body's reader,
    /// say), while this owner still decides when the line goes.
    pub fn counter_handle(&self) -> Counted {
        Counted(self.0.clone())
    }
}

pub(super) struct Counted(Option<ProgressBar>);

impl Counted {
    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }
}

impl Drop for Progress {
    /// Gone once dropped: neither the result's line nor an error's follows a half-drawn one.
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// `PHASE 123.4 MiB (56.7 MiB/s, 2.2 s)` of a migration's current phase, or without bytes
/// where none are counted.
pub(super) fn phase_line(p: &vane_proto::api::Progress) -> String {
    let secs = p.phase_ms as f64 / 1000.0;
    if p.bytes == 0 {
        return format!("{} ({secs:.1} s)", p.phase);
    }
    let mib = p.bytes as f64 / (1024.0 * 1024.0);
    format!(
        "{} {mib:.1} MiB ({:.1} MiB/s, {secs:.1} s)",
        p.phase,
        mib / secs.max(0.001)
    )
}

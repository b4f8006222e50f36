//! The timers of [`Tunnels`]: handshake retries and give-ups, rekeys, session expiry and
//! idle teardown, and when the next of them is due.

use std::time::{Duration, Instant};

use crate::session::usable;
#[cfg(doc)]
use crate::INITIATION_LEN;
use crate::{Config, PeerId, Tunnels};

impl Tunnels {
    /// Runs the timers: handshake retries and give-ups, rekeys by time and message count,
    /// session expiry, idle teardown. Call after every batch of datagrams and when
    /// [`Tunnels::next_timer`] is due, repeatedly until it returns `None`: each `Some` is an
    /// initiation in `out[..n]` (at least [`INITIATION_LEN`] bytes) to send to that peer.
    pub fn poll_timers(
        &mut self,
        now: Instant,
        wall: u64,
        out: &mut [u8],
    ) -> Option<(PeerId, usize)> {
        let cfg = &self.cfg;
        let mut initiate = None;
        for (&id, p) in self.peers.iter_mut() {
            let idle = p
                .last_activity
                .is_none_or(|t| now.saturating_duration_since(t) >= cfg.idle_timeout);
            if p.has_sessions() && idle {
                p.clear(&mut self.indexes);
                self.counters.idle_teardowns += 1;
                continue;
            }
            for slot in [&mut p.current, &mut p.previous, &mut p.next] {
                if slot.as_ref().is_some_and(|s| !usable(s, cfg, now)) {
                    if let Some(s) = slot.take() {
                        self.indexes.remove(&s.local_index);
                    }
                    self.counters.sessions_expired += 1;
                }
            }
            if let Some(pending) = &p.pending {
                if now.saturating_duration_since(pending.first) >= cfg.handshake_timeout {
                    self.indexes.remove(&pending.index);
                    p.pending = None;
                    self.counters.handshake_timeouts += 1;
                } else if now.saturating_duration_since(pending.sent) >= cfg.handshake_retry {
                    initiate = Some(id);
                    break;
                }
                continue;
            }
            if let Some(s) = &p.current {
                if now.saturating_duration_since(s.established) >= rekey_after(s.initiator, cfg)
                    || s.sent >= cfg.rekey_after_messages
                {
                    self.counters.rekeys += 1;
                    initiate = Some(id);
                    break;
                }
            }
        }
        let id = initiate?;
        // If `out` is too small, the retry or rekey comes again on the next call.
        self.start_handshake(id, out, now, wall).map(|n| (id, n))
    }

    /// When [`Tunnels::poll_timers`] has something to do next by time (an idle teardown, a
    /// session's expiry, a handshake's retry or timeout, a rekey); `None` if nothing is
    /// due ever without new traffic. A rekey by message count is not timed: it is found by
    /// the `poll_timers` call after the seals that reach it.
    pub fn next_timer(&self) -> Option<Instant> {
        let cfg = &self.cfg;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.peers.values() {
            for s in [&p.current, &p.previous, &p.next].into_iter().flatten() {
                at(s.established + cfg.reject_after_time);
                // Idle teardown, after the last activity (or the session's start: a wake-up
                // a little late for a session never used costs nothing).
                at(p.last_activity.unwrap_or(s.established) + cfg.idle_timeout);
            }
            if let Some(pending) = &p.pending {
                at((pending.first + cfg.handshake_timeout).min(pending.sent + cfg.handshake_retry));
                continue;
            }
            if let Some(s) = &p.current {
                at(s.established + rekey_after(s.initiator, cfg));
            }
        }
        next
    }
}

/// How long after its start a session is rekeyed by time: by its initiator at
/// `rekey_after_time`; by its responder `10 * handshake_retry` later, so that both sides do
/// not rekey at once while still covering an initiator that went away.
fn rekey_after(initiator: bool, cfg: &Config) -> Duration {
    if initiator {
        cfg.rekey_after_time
    } else {
        cfg.rekey_after_time + cfg.handshake_retry * 10
    }
}

//! Time: when the node has work next, and that work (tunnel timers, the expiry of waiting
//! packets and remembered misses, the sweep of forgotten flows).

use std::time::Instant;

use crate::*;

impl Node {
    /// When [`Node::handle_timeout`] has work next: a tunnel timer, a waiting packet's
    /// expiry, a remembered "nobody" to forget, the sweep of forgotten flows.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.tunnels.next_timer();
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for p in self.peers.values() {
            if let Some((since, _)) = p.waiting.front() {
                at(*since + HANDSHAKE_WAIT);
            }
        }
        for m in self.misses.values() {
            at(m.since + MISS_WAIT);
        }
        for since in self.negative.values() {
            at(*since + NEGATIVE_TTL);
        }
        if self.switch.flow_count() > 0 {
            at(self
                .last_sweep
                .map_or_else(Instant::now, |t| t + FLOW_SWEEP));
        }
        next
    }

    /// Runs what is due at `now`: tunnel timers (handshake retries, rekeys, expiry, idle
    /// teardown), the expiry of packets that waited too long, the sweep of flows.
    pub fn handle_timeout<I: Io>(&mut self, io: &mut I, now: Instant) {
        if matches!(self.identity, Some((_, false))) {
            let wall = crate::wall_at(&mut self.epoch, now);
            while let Some((peer, n)) = self.tunnels.poll_timers(now, wall, &mut self.scratch) {
                if let Some(endpoint) = self.peers.get(&peer).and_then(|p| p.endpoint) {
                    io.send_now(&self.scratch[..n], endpoint);
                }
            }
        }
        for peer in self.peers.values_mut() {
            while peer
                .waiting
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HANDSHAKE_WAIT)
            {
                peer.waiting.pop_front();
                self.counters.handshake_queue_dropped += 1;
            }
        }
        let mut expired = 0;
        self.misses.retain(|_, m| {
            let keep = now.saturating_duration_since(m.since) < MISS_WAIT;
            if !keep {
                expired += m.packets.len() as u64;
            }
            keep
        });
        self.counters.miss_queue_dropped += expired;
        self.negative
            .retain(|_, at| now.saturating_duration_since(*at) < NEGATIVE_TTL);
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= FLOW_SWEEP)
        {
            self.switch.expire_flows(now);
            self.last_sweep = Some(now);
        }
    }
}

//! Estimates of what KV costs to compute and to restore, for the routing and eviction policies.
//! They start from defaults and follow what the engine is seen to do, as moving averages.

use std::sync::atomic::{AtomicU64, Ordering};

/// Weight of a new observation in the moving averages.
const WEIGHT: f64 = 0.2;

/// Prefill and restore speeds, in microseconds per token.
pub struct Costs {
    prefill_us_per_token: AtomicU64,
    restore_us_per_token: AtomicU64,
    /// Snapshot bytes per token; zero until a snapshot is stored.
    snapshot_bytes_per_token: AtomicU64,
    /// Bytes per millisecond of snapshot pulls from peers, compression and verification included.
    pull_bytes_per_ms: AtomicU64,
}

/// Fixed part of a restore: writing the slot file and the engine's load call.
const RESTORE_FIXED_MS: f64 = 5.0;

impl Default for Costs {
    fn default() -> Self {
        // A small model on CPU, as measured by the restore benchmark: about 1.8 ms a token of
        // prefill and 25 us a token of restore for a 12-layer model. Observations replace them.
        Costs {
            prefill_us_per_token: AtomicU64::new(1000f64.to_bits()),
            restore_us_per_token: AtomicU64::new(50f64.to_bits()),
            snapshot_bytes_per_token: AtomicU64::new(0f64.to_bits()),
            // 100 MB/s, below what a data-centre link gives, until a pull is measured.
            pull_bytes_per_ms: AtomicU64::new(100_000f64.to_bits()),
        }
    }
}

fn load(value: &AtomicU64) -> f64 {
    f64::from_bits(value.load(Ordering::Relaxed))
}

fn observe(value: &AtomicU64, sample: f64) {
    if !sample.is_finite() || sample <= 0.0 {
        return;
    }
    // Concurrent updates may lose one sample; the average stays a valid estimate either way.
    let next = load(value) * (1.0 - WEIGHT) + sample * WEIGHT;
    value.store(next.to_bits(), Ordering::Relaxed);
}

impl Costs {
    /// Records that the engine computed `tokens` prompt tokens in `ms` milliseconds.
    pub fn observe_prefill(&self, tokens: u64, ms: f64) {
        if tokens >= 16 {
            observe(&self.prefill_us_per_token, ms * 1000.0 / tokens as f64);
        }
    }

    /// Records that a restore of `tokens` tokens took `ms` milliseconds in all.
    pub fn observe_restore(&self, tokens: u64, ms: f64) {
        if tokens >= 16 {
            observe(&self.restore_us_per_token, (ms - RESTORE_FIXED_MS).max(0.0) * 1000.0 / tokens as f64);
        }
    }

    /// Records that a snapshot of `tokens` tokens took `bytes` bytes. Every snapshot of one
    /// engine has the same size per token, so the latest replaces the estimate.
    pub fn observe_snapshot(&self, tokens: u64, bytes: u64) {
        if tokens > 0 {
            self.snapshot_bytes_per_token.store((bytes as f64 / tokens as f64).to_bits(), Ordering::Relaxed);
        }
    }

    /// Records that a pull of `bytes` bytes from a peer took `ms` milliseconds.
    pub fn observe_pull(&self, bytes: u64, ms: f64) {
        if bytes >= 64 << 10 {
            observe(&self.pull_bytes_per_ms, bytes as f64 / ms.max(0.001));
        }
    }

    /// Estimated milliseconds to pull a snapshot of `tokens` tokens from a peer and restore it.
    pub fn pull_ms(&self, tokens: u64) -> f64 {
        self.snapshot_bytes(tokens) as f64 / load(&self.pull_bytes_per_ms) + self.restore_ms(tokens)
    }

    /// Estimated size of a snapshot of `tokens` tokens; zero before the first snapshot.
    pub fn snapshot_bytes(&self, tokens: u64) -> u64 {
        (load(&self.snapshot_bytes_per_token) * tokens as f64) as u64
    }

    /// Estimated milliseconds of prefill for `tokens` tokens.
    pub fn recompute_ms(&self, tokens: u64) -> f64 {
        load(&self.prefill_us_per_token) * tokens as f64 / 1000.0
    }

    /// Estimated milliseconds to restore a snapshot of `tokens` tokens into a slot.
    pub fn restore_ms(&self, tokens: u64) -> f64 {
        RESTORE_FIXED_MS + load(&self.restore_us_per_token) * tokens as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::Costs;

    #[test]
    fn observe_updates_estimates_ignores_invalid() {
        let costs = Costs::default();
        let before = costs.recompute_ms(1000);
        costs.observe_prefill(1000, 100.0);
        assert!(costs.recompute_ms(1000) < before);
        let settled = costs.recompute_ms(1000);
        costs.observe_prefill(1000, f64::NAN);
        costs.observe_prefill(1000, -5.0);
        costs.observe_prefill(3, 1e9);
        assert_eq!(costs.recompute_ms(1000), settled);
        assert!(costs.restore_ms(0) > 0.0);
    }
}

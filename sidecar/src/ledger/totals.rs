//! In-memory totals of what this process committed to the ledger, for the metrics exporter, and
//! the rate limit of the ledger's repeated warnings.

use std::sync::atomic::{AtomicU64, Ordering};

use super::encoding::StoredRecord;

/// Sums over the requests this process committed to the ledger, and the records it lost. While
/// no task passes `ledger.max_requests_per_task`, they equal the sums over the request records
/// this process wrote. Sums saturate at u64::MAX.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Prompt tokens the engine computed: `prompt_tokens - cached_tokens`.
    pub computed_tokens: u64,
    pub output_tokens: u64,
    /// Costs in pico-units (1e-12) of `ledger.currency`.
    pub cost_served_pico: u64,
    pub cost_uncached_pico: u64,
    /// Records dropped because the write queue was full or the writer had stopped.
    pub dropped: u64,
    /// Records lost because their batch failed to write.
    pub failed: u64,
}

impl Totals {
    /// Adds one committed request.
    pub(super) fn add_request(&mut self, record: &StoredRecord) {
        self.requests = self.requests.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(record.prompt_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(record.cached_tokens);
        self.computed_tokens = self.computed_tokens.saturating_add(record.prompt_tokens - record.cached_tokens);
        self.output_tokens = self.output_tokens.saturating_add(record.output_tokens);
        self.cost_served_pico = self.cost_served_pico.saturating_add(record.cost_served_pico);
        self.cost_uncached_pico = self.cost_uncached_pico.saturating_add(record.cost_uncached_pico);
    }
}

/// The atomic form of `Totals`, shared by the recording path and the writer thread.
#[derive(Default)]
pub(super) struct Counters {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    computed_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cost_served_pico: AtomicU64,
    cost_uncached_pico: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

/// Adds `amount` to `counter`, saturating at u64::MAX.
pub(super) fn add(counter: &AtomicU64, amount: u64) {
    // The closure always returns Some, so the update cannot fail.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| Some(value.saturating_add(amount)));
}

impl Counters {
    /// Adds the totals of a committed batch.
    pub fn commit(&self, batch: &Totals) {
        add(&self.requests, batch.requests);
        add(&self.prompt_tokens, batch.prompt_tokens);
        add(&self.cached_tokens, batch.cached_tokens);
        add(&self.computed_tokens, batch.computed_tokens);
        add(&self.output_tokens, batch.output_tokens);
        add(&self.cost_served_pico, batch.cost_served_pico);
        add(&self.cost_uncached_pico, batch.cost_uncached_pico);
    }

    pub fn snapshot(&self) -> Totals {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Totals {
            requests: get(&self.requests),
            prompt_tokens: get(&self.prompt_tokens),
            cached_tokens: get(&self.cached_tokens),
            computed_tokens: get(&self.computed_tokens),
            output_tokens: get(&self.output_tokens),
            cost_served_pico: get(&self.cost_served_pico),
            cost_uncached_pico: get(&self.cost_uncached_pico),
            dropped: get(&self.dropped),
            failed: get(&self.failed),
        }
    }
}

/// Shortest time between two warnings of one kind.
const WARN_INTERVAL_MS: u64 = 10_000;

/// Allows one warning per `WARN_INTERVAL_MS` and counts the ones suppressed in between.
#[derive(Default)]
pub(super) struct RateLimit {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// Returns Some(number of warnings suppressed since the last one) when a warning may be
    /// logged now, else None.
    pub fn allow(&self) -> Option<u64> {
        let now = super::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_INTERVAL_MS;
        if due && self.last_ms.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

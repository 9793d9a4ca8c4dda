//! Cost-aware eviction by greedy-dual-size-frequency. Each snapshot has the value
//!
//! ```text
//! value = clock + frequency * recompute_cost / size
//! ```
//!
//! where frequency is one plus the snapshot's hits. The snapshot of lowest value leaves first,
//! and the clock rises to the value of each victim, so snapshots that stop being used age out
//! even when their value was once high.
//!
//! Config keys: `size_exponent` (default 1.0): the size is raised to this power, so values below
//! 1 punish large snapshots less.

use std::collections::{BTreeMap, HashMap};

use kvsidecar_sdk::{Config, Evictor, Snapshot};

/// A total order on finite values, for the priority queue.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Value(f64);

impl Eq for Value {}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The greedy-dual-size-frequency evictor.
pub struct CostAware {
    size_exponent: f64,
    clock: f64,
    /// Value and size of each stored snapshot.
    entries: HashMap<String, (Value, u64)>,
    /// (value, id), lowest first.
    queue: BTreeMap<(Value, String), ()>,
}

impl CostAware {
    fn value(&self, snapshot: &Snapshot) -> Value {
        let size = (snapshot.bytes.max(1) as f64).powf(self.size_exponent);
        let cost = if snapshot.recompute_cost_ms.is_finite() { snapshot.recompute_cost_ms.max(0.0) } else { 0.0 };
        let frequency = snapshot.hits.saturating_add(1) as f64;
        Value(self.clock + frequency * cost / size)
    }

    fn put(&mut self, snapshot: Snapshot) {
        self.on_remove(&snapshot.id.clone());
        let value = self.value(&snapshot);
        self.queue.insert((value, snapshot.id.clone()), ());
        self.entries.insert(snapshot.id, (value, snapshot.bytes));
    }
}

impl Evictor for CostAware {
    fn new(config: &Config) -> Result<Self, String> {
        let size_exponent = config.f64("size_exponent", 1.0)?;
        if !(0.0..=2.0).contains(&size_exponent) {
            return Err(format!("config key `size_exponent`: {size_exponent} is not between 0 and 2"));
        }
        Ok(CostAware { size_exponent, clock: 0.0, entries: HashMap::new(), queue: BTreeMap::new() })
    }

    fn on_insert(&mut self, snapshot: Snapshot) {
        self.put(snapshot);
    }

    fn on_access(&mut self, snapshot: Snapshot) {
        self.put(snapshot);
    }

    fn on_remove(&mut self, id: &str) {
        if let Some((value, _)) = self.entries.remove(id) {
            self.queue.remove(&(value, id.to_string()));
        }
    }

    fn choose_victims(&mut self, bytes: u64) -> Vec<String> {
        let mut freed = 0u64;
        let mut victims = Vec::new();
        for ((value, id), ()) in &self.queue {
            if freed >= bytes {
                break;
            }
            freed += self.entries[id].1;
            self.clock = self.clock.max(value.0);
            victims.push(id.clone());
        }
        victims
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_evictor!(CostAware);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::testing::EvictorHarness;

    #[test]
    fn evict_keeps_high_value_per_byte() {
        let mut evictor = EvictorHarness::<super::CostAware>::new("").unwrap();
        evictor.insert("cheap-large", 1000, 100, 100.0);
        evictor.insert("costly-small", 100, 100, 100.0);
        evictor.insert("popular", 1000, 100, 100.0);
        for _ in 0..20 {
            evictor.access("popular");
        }
        assert_eq!(evictor.evict(500).unwrap(), vec!["cheap-large".to_string()]);
        assert_eq!(evictor.stored(), vec!["costly-small".to_string(), "popular".to_string()]);
    }

    #[test]
    fn evict_ages_idle_snapshots_out() {
        let mut evictor = EvictorHarness::<super::CostAware>::new("").unwrap();
        evictor.insert("old-favourite", 100, 10, 10.0);
        for _ in 0..5 {
            evictor.access("old-favourite");
        }
        // Each round stores a snapshot and evicts one, raising the clock past the favourite's value.
        let mut evicted = Vec::new();
        for round in 0..20 {
            evictor.insert(&format!("new-{round}"), 100, 10, 10.0);
            evicted.extend(evictor.evict(100).unwrap());
        }
        assert!(evicted.contains(&"old-favourite".to_string()), "{evicted:?}");
    }
}

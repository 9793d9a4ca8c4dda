//! Least-recently-used eviction: the snapshots restored or stored longest ago leave first.
//!
//! Config keys: none.

use std::collections::{BTreeSet, HashMap};

use kvsidecar_sdk::{Config, Evictor, Snapshot};

/// The LRU evictor.
#[derive(Default)]
pub struct Lru {
    /// Last access and size of each stored snapshot.
    entries: HashMap<String, (u64, u64)>,
    /// (last access, id), oldest first.
    order: BTreeSet<(u64, String)>,
}

impl Lru {
    fn put(&mut self, snapshot: Snapshot) {
        self.on_remove(&snapshot.id.clone());
        self.order.insert((snapshot.last_access_ms, snapshot.id.clone()));
        self.entries.insert(snapshot.id, (snapshot.last_access_ms, snapshot.bytes));
    }
}

impl Evictor for Lru {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(Lru::default())
    }

    fn on_insert(&mut self, snapshot: Snapshot) {
        self.put(snapshot);
    }

    fn on_access(&mut self, snapshot: Snapshot) {
        self.put(snapshot);
    }

    fn on_remove(&mut self, id: &str) {
        if let Some((last_access, _)) = self.entries.remove(id) {
            self.order.remove(&(last_access, id.to_string()));
        }
    }

    fn choose_victims(&mut self, bytes: u64) -> Vec<String> {
        let mut freed = 0u64;
        let mut victims = Vec::new();
        for (_, id) in &self.order {
            if freed >= bytes {
                break;
            }
            freed += self.entries[id].1;
            victims.push(id.clone());
        }
        victims
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_evictor!(Lru);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::testing::EvictorHarness;

    #[test]
    fn evict_least_recently_used_first() {
        let mut evictor = EvictorHarness::<super::Lru>::new("").unwrap();
        for id in ["a", "b", "c"] {
            evictor.insert(id, 100, 10, 1.0);
        }
        evictor.access("a");
        assert_eq!(evictor.evict(150).unwrap(), vec!["b".to_string(), "c".to_string()]);
        assert_eq!(evictor.stored(), vec!["a".to_string()]);
    }
}

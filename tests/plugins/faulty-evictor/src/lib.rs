//! Test evictor whose bug shows only after its first victim list: the first `choose-victims` call of
//! an instance (the load check's sample call, or the first real one) names the oldest stored
//! snapshots, and every later call names a snapshot that does not exist.

use std::collections::BTreeMap;

use kvsidecar_sdk::{Config, Evictor, Snapshot};

#[derive(Default)]
pub struct FaultyEvictor {
    /// Creation time and id of each stored snapshot, with its size.
    stored: BTreeMap<(u64, String), u64>,
    answers: u64,
}

impl Evictor for FaultyEvictor {
    fn new(_config: &Config) -> Result<Self, String> {
        Ok(FaultyEvictor::default())
    }

    fn on_insert(&mut self, snapshot: Snapshot) {
        self.stored.insert((snapshot.created_ms, snapshot.id), snapshot.bytes);
    }

    fn on_access(&mut self, _snapshot: Snapshot) {}

    fn on_remove(&mut self, id: &str) {
        self.stored.retain(|(_, stored), _| stored != id);
    }

    fn choose_victims(&mut self, bytes: u64) -> Vec<String> {
        self.answers += 1;
        if self.answers > 1 {
            return vec!["f".repeat(64)];
        }
        let mut freed = 0;
        let mut victims = Vec::new();
        for ((_, id), size) in &self.stored {
            if freed >= bytes {
                break;
            }
            freed += size;
            victims.push(id.clone());
        }
        victims
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_evictor!(FaultyEvictor);

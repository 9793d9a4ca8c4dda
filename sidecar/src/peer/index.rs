//! The fleet index: for each peer, the snapshots it stores and what its engine slots hold, as
//! chained block hashes learnt from its journal. It finds a request's longest stored prefix on a
//! peer with a binary search over block hashes, without scanning, and keeps at most
//! `peers.index_blocks` block hashes per peer, dropping that peer's oldest snapshots beyond it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::json;

use super::journal::IndexEvent;
use crate::prefix::Digest;

/// One snapshot as a peer announced it.
struct Entry {
    blocks: Vec<Digest>,
    /// Insertion number, matched against `PeerView::order` to skip its stale items.
    inserted: u64,
}

/// One peer's part of the index.
#[derive(Default)]
struct PeerView {
    generation: String,
    last: u64,
    snapshots: HashMap<Digest, Entry>,
    /// Snapshots per block hash (chained hashes make prefixes distinct).
    blocks: HashMap<Digest, u32>,
    /// Snapshot ids with their insertion numbers, oldest first, for the memory bound. An item
    /// whose number differs from the entry's is stale: the snapshot left or came again since.
    order: VecDeque<(Digest, u64)>,
    inserted: u64,
    dropped: u64,
    /// Chained block hashes of the KV each engine slot holds.
    slots: HashMap<u32, Vec<Digest>>,
}

/// Most engine slots recorded per peer.
const MAX_SLOTS: usize = 1024;

/// Size of the fleet index, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexSize {
    /// Distinct block hashes of peers' snapshots.
    pub stored_blocks: u64,
    /// Block hashes of peers' engine slots.
    pub slot_blocks: u64,
    /// Estimated bytes of the index's maps and lists.
    pub memory_bytes: u64,
}

/// A request's longest prefix on one peer, in blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerMatch {
    /// Blocks held by a snapshot in the peer's store.
    pub stored: usize,
    /// Blocks held by one of the peer's engine slots.
    pub slot: usize,
}

impl PeerView {
    fn insert(&mut self, id: Digest, blocks: Vec<Digest>, max_blocks: usize) {
        self.remove(&id);
        for block in &blocks {
            *self.blocks.entry(*block).or_default() += 1;
        }
        self.inserted += 1;
        self.snapshots.insert(id, Entry { blocks, inserted: self.inserted });
        self.order.push_back((id, self.inserted));
        while self.blocks.len() > max_blocks {
            let Some((oldest, inserted)) = self.order.pop_front() else { break };
            if self.snapshots.get(&oldest).is_some_and(|entry| entry.inserted == inserted) && self.remove(&oldest) {
                self.dropped += 1;
            }
        }
        // Stale items pile up when snapshots come and go below the bound; drop them.
        if self.order.len() > 2 * self.snapshots.len() + 64 {
            let snapshots = &self.snapshots;
            self.order.retain(|(id, inserted)| snapshots.get(id).is_some_and(|entry| entry.inserted == *inserted));
        }
    }

    fn remove(&mut self, id: &Digest) -> bool {
        let Some(entry) = self.snapshots.remove(id) else { return false };
        for block in &entry.blocks {
            if let Some(count) = self.blocks.get_mut(block) {
                *count -= 1;
                if *count == 0 {
                    self.blocks.remove(block);
                }
            }
        }
        // Its item in `order` becomes stale and is skipped or dropped later.
        true
    }

    fn set_slot(&mut self, slot: u32, blocks: &[String], max_blocks: usize) {
        if blocks.is_empty() {
            self.slots.remove(&slot);
            return;
        }
        if self.slots.len() >= MAX_SLOTS && !self.slots.contains_key(&slot) {
            return;
        }
        // All slots together keep at most `max_blocks` hashes; a slot beyond that keeps a prefix.
        let others: usize = self.slots.iter().filter(|(other, _)| **other != slot).map(|(_, blocks)| blocks.len()).sum();
        let room = max_blocks.saturating_sub(others);
        let parsed: Option<Vec<Digest>> = blocks.iter().take(room).map(|block| Digest::from_hex(block)).collect();
        match parsed {
            Some(parsed) => self.slots.insert(slot, parsed),
            None => self.slots.remove(&slot),
        };
    }

    fn apply(&mut self, event: IndexEvent, max_blocks: usize) {
        match event {
            IndexEvent::Stored { id, blocks, .. } => {
                if let Some((id, blocks)) = parse_stored(&id, &blocks) {
                    self.insert(id, blocks, max_blocks);
                }
            }
            IndexEvent::Removed { id } => {
                if let Some(id) = Digest::from_hex(&id) {
                    self.remove(&id);
                }
            }
            IndexEvent::Slot { slot, blocks } => self.set_slot(slot, &blocks, max_blocks),
            IndexEvent::SlotsCleared => self.slots.clear(),
        }
    }
}

/// The index of every peer, keyed by peer URL.
pub struct FleetIndex {
    peers: Mutex<HashMap<String, PeerView>>,
    max_blocks: usize,
}

/// Parses an announced snapshot; None when a field is not what the journal writes.
fn parse_stored(id: &str, blocks: &[String]) -> Option<(Digest, Vec<Digest>)> {
    let id = Digest::from_hex(id)?;
    let blocks = blocks.iter().map(|block| Digest::from_hex(block)).collect::<Option<Vec<_>>>()?;
    Some((id, blocks))
}

impl FleetIndex {
    pub fn new(max_blocks: usize) -> FleetIndex {
        FleetIndex { peers: Mutex::new(HashMap::new()), max_blocks: max_blocks.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PeerView>> {
        self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the generation and sequence number the index of `peer` is at.
    pub fn position(&self, peer: &str) -> Option<(String, u64)> {
        self.lock().get(peer).map(|view| (view.generation.clone(), view.last))
    }

    /// Replaces the index of `peer` with a full listing.
    pub fn replace(&self, peer: &str, generation: String, last: u64, snapshots: Vec<IndexEvent>) {
        let mut view = PeerView { generation, last, ..PeerView::default() };
        for snapshot in snapshots {
            view.apply(snapshot, self.max_blocks);
        }
        self.lock().insert(peer.to_string(), view);
    }

    /// Applies the journal events of `peer` up to sequence `last`.
    pub fn apply(&self, peer: &str, last: u64, events: Vec<IndexEvent>) {
        let mut peers = self.lock();
        let Some(view) = peers.get_mut(peer) else { return };
        for event in events {
            view.apply(event, self.max_blocks);
        }
        view.last = last;
    }

    /// Forgets `peer`.
    pub fn forget(&self, peer: &str) {
        self.lock().remove(peer);
    }

    /// Returns how many leading blocks of `hashes` a snapshot on `peer` holds. Because each block
    /// hash chains its parents, holding block `i` means holding blocks `0..=i`.
    pub fn longest(&self, peer: &str, hashes: &[Digest]) -> usize {
        self.matches(peer, hashes).stored
    }

    /// Returns the longest prefix of `hashes` that `peer` stores, and the longest in its slots.
    pub fn matches(&self, peer: &str, hashes: &[Digest]) -> PeerMatch {
        let peers = self.lock();
        let Some(view) = peers.get(peer) else { return PeerMatch::default() };
        let (mut low, mut high) = (0usize, hashes.len());
        while low < high {
            let middle = (low + high) / 2;
            if view.blocks.contains_key(&hashes[middle]) {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let slot = view.slots.values().map(|blocks| blocks.iter().zip(hashes).take_while(|(a, b)| a == b).count()).max().unwrap_or(0);
        PeerMatch { stored: low, slot }
    }

    /// Returns the stored snapshot ids of `peer`, for comparisons.
    pub fn snapshot_ids(&self, peer: &str) -> Vec<String> {
        let peers = self.lock();
        let mut ids: Vec<String> = peers.get(peer).map(|view| view.snapshots.keys().map(Digest::to_hex).collect()).unwrap_or_default();
        ids.sort();
        ids
    }

    /// Returns the size of the index over all peers.
    pub fn size(&self) -> IndexSize {
        let peers = self.lock();
        let mut size = IndexSize::default();
        let digest = std::mem::size_of::<Digest>();
        for view in peers.values() {
            let stored: usize = view.snapshots.values().map(|entry| entry.blocks.len()).sum();
            let slots: usize = view.slots.values().map(Vec::len).sum();
            size.stored_blocks += view.blocks.len() as u64;
            size.slot_blocks += slots as u64;
            // Hash maps hold about one spare bucket per entry; each entry's vectors hold its blocks.
            size.memory_bytes += (view.blocks.capacity() * (digest + 4) * 2
                + view.snapshots.capacity() * (digest + std::mem::size_of::<Entry>()) * 2
                + stored * digest
                + view.order.capacity() * (digest + 8)
                + slots * digest) as u64;
        }
        size
    }

    /// Returns the index of `peer` as `/admin/peers` shows it.
    pub fn describe(&self, peer: &str) -> serde_json::Value {
        let peers = self.lock();
        match peers.get(peer) {
            Some(view) => json!({
                "generation": view.generation,
                "seq": view.last,
                "snapshots": view.snapshots.len(),
                "blocks": view.blocks.len(),
                "dropped_for_memory": view.dropped,
                "slot_blocks": view.slots.values().map(Vec::len).sum::<usize>(),
            }),
            None => serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FleetIndex, IndexEvent};
    use crate::prefix::Digest;

    fn digest(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn stored(id: u8, blocks: &[u8]) -> IndexEvent {
        IndexEvent::Stored { id: digest(id).to_hex(), namespace: String::new(), tokens: 0, bytes: 0, blocks: blocks.iter().map(|b| digest(*b).to_hex()).collect() }
    }

    #[test]
    fn longest_prefix_follows_events() {
        let index = FleetIndex::new(100);
        index.replace("a", "g1".into(), 2, vec![stored(1, &[10, 11, 12])]);
        let request = [digest(10), digest(11), digest(12), digest(13)];
        assert_eq!(index.longest("a", &request), 3);
        assert_eq!(index.longest("b", &request), 0);
        index.apply("a", 3, vec![IndexEvent::Removed { id: digest(1).to_hex() }]);
        assert_eq!(index.longest("a", &request), 0);
        assert_eq!(index.position("a"), Some(("g1".to_string(), 3)));
    }

    #[test]
    fn memory_bound_drops_oldest_snapshots() {
        let index = FleetIndex::new(4);
        index.replace("a", "g".into(), 0, vec![stored(1, &[10, 11]), stored(2, &[20, 21]), stored(3, &[30, 31])]);
        assert_eq!(index.snapshot_ids("a").len(), 2);
        assert_eq!(index.longest("a", &[digest(10)]), 0);
        assert_eq!(index.longest("a", &[digest(30), digest(31)]), 2);
        assert_eq!(index.describe("a")["dropped_for_memory"], 1);
    }

    #[test]
    fn slot_contents_match_until_cleared() {
        let index = FleetIndex::new(100);
        let slot = |slot: u32, blocks: &[u8]| IndexEvent::Slot { slot, blocks: blocks.iter().map(|b| digest(*b).to_hex()).collect() };
        index.replace("a", "g".into(), 0, vec![stored(1, &[10]), slot(0, &[10, 11, 12])]);
        let request = [digest(10), digest(11), digest(19)];
        assert_eq!(index.matches("a", &request), super::PeerMatch { stored: 1, slot: 2 });
        index.apply("a", 1, vec![IndexEvent::SlotsCleared]);
        assert_eq!(index.matches("a", &request), super::PeerMatch { stored: 1, slot: 0 });
        index.apply("a", 2, vec![slot(3, &[10, 11]), slot(3, &[])]);
        assert_eq!(index.matches("a", &request).slot, 0);
    }
}

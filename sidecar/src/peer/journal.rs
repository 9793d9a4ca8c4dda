//! The index journal: this sidecar's store and engine-slot changes, numbered, in a bounded queue
//! that peers read with `GET /peer/v1/index?since=SEQ` long-polls. A peer that fell behind the
//! queue, or whose view belongs to an earlier generation of this sidecar, reads the whole index
//! again.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::prefix::Digest;
use crate::store::{SnapshotMeta, StoreObserver};

/// One change of the index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum IndexEvent {
    Stored { id: String, namespace: String, tokens: u32, bytes: u64, blocks: Vec<String> },
    Removed { id: String },
    /// Engine slot `slot` now holds the KV of these chained blocks; none when its contents are
    /// unknown or reusable by no request.
    Slot { slot: u32, blocks: Vec<String> },
    /// The engine stopped or restarted, so no slot contains reusable KV.
    SlotsCleared,
}

struct Entries {
    /// Sequence number of the newest event; 0 before the first.
    last: u64,
    /// Sequence number of the newest event dropped for capacity: a reader further behind has
    /// missed changes. Slot events replaced by newer ones do not count, because the newer one
    /// carries the slot's whole state.
    lost_through: u64,
    events: VecDeque<(u64, IndexEvent)>,
}

/// The journal, bounded to `capacity` events.
pub struct Journal {
    entries: Mutex<Entries>,
    capacity: usize,
    changed: tokio::sync::Notify,
}

/// Result of reading the journal from a position.
pub enum Since {
    /// The events after `since`, up to sequence `last`.
    Events { last: u64, events: Vec<IndexEvent> },
    /// `since` fell out of the journal (or is from the future): read the whole index.
    Resync { last: u64 },
}

impl Journal {
    pub fn new(capacity: usize) -> Journal {
        Journal { entries: Mutex::new(Entries { last: 0, lost_through: 0, events: VecDeque::new() }), capacity: capacity.max(1), changed: tokio::sync::Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends `event` and wakes the peers waiting for one.
    pub fn push(&self, event: IndexEvent) {
        let mut entries = self.lock();
        // A slot event replaces the slot's contents whole, so an older one for the same slot
        // is dropped: the journal keeps at most one per slot however long the prompts are.
        if let IndexEvent::Slot { slot, .. } = &event {
            let slot = *slot;
            entries.events.retain(|(_, old)| !matches!(old, IndexEvent::Slot { slot: earlier, .. } if *earlier == slot));
        }
        entries.last += 1;
        let seq = entries.last;
        entries.events.push_back((seq, event));
        while entries.events.len() > self.capacity {
            if let Some((dropped, _)) = entries.events.pop_front() {
                entries.lost_through = dropped;
            }
        }
        drop(entries);
        self.changed.notify_waiters();
    }

    /// Returns the sequence number of the newest event.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// Returns the events after `since`.
    pub fn since(&self, since: u64) -> Since {
        let entries = self.lock();
        if since > entries.last || since < entries.lost_through {
            return Since::Resync { last: entries.last };
        }
        let events = entries.events.iter().filter(|(seq, _)| *seq > since).map(|(_, event)| event.clone()).collect();
        Since::Events { last: entries.last, events }
    }

    /// Waits up to `within` for an event after `since`.
    pub async fn wait(&self, since: u64, within: Duration) {
        let changed = self.changed.notified();
        if self.last() > since {
            return;
        }
        let _ = tokio::time::timeout(within, changed).await;
    }
}

/// Publishes engine slot contents to the journal as chained block hashes.
pub struct SlotJournal {
    pub journal: std::sync::Arc<Journal>,
    pub block_tokens: usize,
}

impl crate::slots::SlotObserver for SlotJournal {
    fn changed(&self, slot: u32, contents: &crate::slots::SlotContents) {
        let blocks = match &contents.owner {
            Some(namespace) => crate::prefix::block_hashes(namespace, &contents.tokens, self.block_tokens).iter().map(Digest::to_hex).collect(),
            None => Vec::new(),
        };
        self.journal.push(IndexEvent::Slot { slot, blocks });
    }
}

impl StoreObserver for Journal {
    fn stored(&self, meta: &SnapshotMeta, blocks: &[Digest]) {
        self.push(IndexEvent::Stored {
            id: meta.id.to_hex(),
            namespace: meta.namespace.to_hex(),
            tokens: meta.tokens,
            bytes: meta.bytes,
            blocks: blocks.iter().map(Digest::to_hex).collect(),
        });
    }

    fn removed(&self, ids: &[Digest]) {
        for id in ids {
            self.push(IndexEvent::Removed { id: id.to_hex() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{IndexEvent, Journal, Since};

    fn removed(n: u32) -> IndexEvent {
        IndexEvent::Removed { id: n.to_string() }
    }

    #[test]
    fn since_returns_new_events_or_asks_for_resync() {
        let journal = Journal::new(3);
        assert!(matches!(journal.since(0), Since::Events { last: 0, ref events } if events.is_empty()));
        for n in 1..=5 {
            journal.push(removed(n));
        }
        // Events 3, 4 and 5 are kept.
        assert!(matches!(journal.since(2), Since::Events { last: 5, ref events } if events.len() == 3));
        assert!(matches!(journal.since(4), Since::Events { last: 5, ref events } if events.len() == 1));
        assert!(matches!(journal.since(1), Since::Resync { last: 5 }));
        assert!(matches!(journal.since(9), Since::Resync { last: 5 }));
    }

    #[test]
    fn slot_event_replaces_older_one_of_slot() {
        let journal = Journal::new(10);
        let slot = |slot: u32, block: &str| IndexEvent::Slot { slot, blocks: vec![block.to_string()] };
        journal.push(slot(0, "a"));
        journal.push(slot(1, "b"));
        journal.push(slot(0, "c"));
        let Since::Events { last, events } = journal.since(0) else { panic!("resync from 0") };
        assert_eq!(last, 3);
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[1], IndexEvent::Slot { slot: 0, blocks } if blocks == &["c"]));
    }
}

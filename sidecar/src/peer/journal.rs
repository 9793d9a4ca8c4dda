//! The index journal: this sidecar's store changes, numbered, in a bounded queue that peers read
//! with `GET /peer/v1/index?since=SEQ` long-polls. A peer that fell behind the queue, or whose
//! view belongs to an earlier generation of this sidecar, reads the whole index again.

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
}

struct Entries {
    /// Sequence number of the newest event; 0 before the first.
    last: u64,
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
        Journal { entries: Mutex::new(Entries { last: 0, events: VecDeque::new() }), capacity: capacity.max(1), changed: tokio::sync::Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, event: IndexEvent) {
        let mut entries = self.lock();
        entries.last += 1;
        let seq = entries.last;
        entries.events.push_back((seq, event));
        while entries.events.len() > self.capacity {
            entries.events.pop_front();
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
        let oldest = entries.events.front().map(|(seq, _)| *seq).unwrap_or(entries.last + 1);
        if since > entries.last || since + 1 < oldest {
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
}

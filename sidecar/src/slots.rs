//! The engine's slots as the sidecar tracks them: which tokens each slot holds, one request at a
//! time per slot, and the choice of slot for a new prompt.

use std::sync::Arc;
use std::sync::Mutex as SyncMutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::prefix::{Namespace, common_prefix};

/// Contents of one slot, as far as the sidecar has seen them.
#[derive(Debug, Default, Clone)]
pub struct SlotContents {
    /// Tokens known to be in the slot's KV cache, in order. The engine may keep more tokens (the
    /// generated tokens of the last response) but never a different prefix.
    pub tokens: Arc<Vec<u32>>,
    /// Namespace (model, tenant, salt) of the request that filled the slot. None when the
    /// contents came from elsewhere: before the sidecar started, the layout probe, or a request
    /// that failed midway.
    pub owner: Option<Namespace>,
}

struct Slot {
    /// Held for the whole life of a request on this slot, so requests on one slot run in turn.
    lock: Arc<Mutex<()>>,
    contents: SyncMutex<SlotContents>,
    last_used: AtomicU64,
    /// Requests waiting for the lock.
    waiting: AtomicU32,
}

/// Told about every change of a slot's contents (the fleet's index journal).
pub trait SlotObserver: Send + Sync {
    fn changed(&self, slot: u32, contents: &SlotContents);
}

/// The slot table of one engine process.
pub struct Slots {
    slots: Vec<Slot>,
    clock: AtomicU64,
    observer: Option<Arc<dyn SlotObserver>>,
}

/// A slot held by one request. Dropping it lets the next request use the slot.
pub struct SlotLease {
    pub slot: u32,
    _guard: OwnedMutexGuard<()>,
}

/// State of a slot as the router receives it.
#[derive(Debug, Clone, Copy)]
pub struct SlotView {
    pub slot: u32,
    /// Tokens of the prompt the slot holds for the request's namespace.
    pub common: usize,
    /// Tokens the slot holds, of any namespace.
    pub resident: usize,
    /// Whether a request runs on the slot now.
    pub busy: bool,
    /// Requests waiting for the slot.
    pub waiting: u32,
}

/// The slot chosen for a prompt and what it is expected to reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotChoice {
    pub slot: u32,
    /// Tokens of the prompt that the slot already holds.
    pub common: usize,
}

impl Slots {
    pub fn new(count: u32) -> Slots {
        Slots::observed(count, None)
    }

    /// Returns a slot table that reports every change of a slot's contents to `observer`.
    pub fn observed(count: u32, observer: Option<Arc<dyn SlotObserver>>) -> Slots {
        let slots = (0..count)
            .map(|_| Slot { lock: Arc::new(Mutex::new(())), contents: SyncMutex::default(), last_used: AtomicU64::new(0), waiting: AtomicU32::new(0) })
            .collect();
        Slots { slots, clock: AtomicU64::new(1), observer }
    }

    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Returns whether `slot` is an id this engine has.
    pub fn contains(&self, slot: u32) -> bool {
        (slot as usize) < self.slots.len()
    }

    /// Returns the tokens `slot` is known to contain.
    pub fn tokens(&self, slot: u32) -> Arc<Vec<u32>> {
        self.contents(slot).tokens
    }

    pub fn contents(&self, slot: u32) -> SlotContents {
        self.slots.get(slot as usize).map(|s| lock(&s.contents).clone()).unwrap_or_default()
    }

    /// Records that `slot` contains `tokens`, computed for a request of `owner`.
    pub fn set_tokens(&self, slot: u32, tokens: Vec<u32>, owner: Namespace) {
        self.set(slot, SlotContents { tokens: Arc::new(tokens), owner: Some(owner) });
    }

    /// Records that the contents of `slot` are unknown or not owned by any namespace, so no
    /// request reuses them.
    pub fn set_foreign(&self, slot: u32, tokens: Vec<u32>) {
        self.set(slot, SlotContents { tokens: Arc::new(tokens), owner: None });
    }

    /// Marks every slot's contents unknown, after a request the engine placed in a slot itself.
    pub fn set_all_foreign(&self) {
        for slot in 0..self.len() {
            self.set_foreign(slot, Vec::new());
        }
    }

    fn set(&self, slot: u32, contents: SlotContents) {
        if let Some(s) = self.slots.get(slot as usize) {
            // Published under the slot's lock, so the journal orders a slot's changes as they happen.
            let mut current = lock(&s.contents);
            if let Some(observer) = &self.observer {
                observer.changed(slot, &contents);
            }
            *current = contents;
        }
    }

    /// Returns each slot's contents, for a full listing of the index.
    pub fn all_contents(&self) -> Vec<SlotContents> {
        self.slots.iter().map(|slot| lock(&slot.contents).clone()).collect()
    }

    /// Returns whether a request of `namespace` may reuse what `slot` contains. Reusing another
    /// namespace's KV would reveal, through timing and the cached-token count, what another
    /// tenant sent.
    pub fn reusable_by(&self, slot: u32, namespace: &Namespace) -> bool {
        self.contents(slot).owner.as_ref() == Some(namespace)
    }

    /// Returns the number of slots a request runs on now.
    pub fn busy_count(&self) -> usize {
        self.slots.iter().filter(|slot| slot.lock.try_lock().is_err()).count()
    }

    /// Returns each slot's state as the router receives it for `prompt`.
    pub fn views(&self, prompt: &[u32], namespace: &Namespace) -> Vec<SlotView> {
        self.slots
            .iter()
            .enumerate()
            .map(|(id, slot)| {
                let contents = lock(&slot.contents);
                let owned = contents.owner.as_ref() == Some(namespace);
                SlotView {
                    slot: id as u32,
                    common: if owned { common_prefix(&contents.tokens, prompt) } else { 0 },
                    resident: contents.tokens.len(),
                    busy: slot.lock.try_lock().is_err(),
                    waiting: slot.waiting.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Chooses the slot for `prompt`: the one holding the longest common prefix, preferring a
    /// free slot on ties and then the least recently used.
    pub fn best_for(&self, prompt: &[u32], namespace: &Namespace) -> Option<SlotChoice> {
        self.views(prompt, namespace)
            .iter()
            .max_by_key(|view| (view.common, !view.busy, std::cmp::Reverse(self.last_used(view.slot))))
            .map(|view| SlotChoice { slot: view.slot, common: view.common })
    }

    fn last_used(&self, slot: u32) -> u64 {
        self.slots.get(slot as usize).map(|s| s.last_used.load(Ordering::Relaxed)).unwrap_or_default()
    }

    /// Waits until `slot` is free and takes it.
    pub async fn acquire(&self, slot: u32) -> Option<SlotLease> {
        let entry = self.slots.get(slot as usize)?;
        entry.waiting.fetch_add(1, Ordering::Relaxed);
        // Counted down even when the waiting request is cancelled.
        let _waiting = Waiting(&entry.waiting);
        let guard = entry.lock.clone().lock_owned().await;
        entry.last_used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(SlotLease { slot, _guard: guard })
    }
}

/// Decrements a waiting counter when dropped.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Slot contents are replaced whole, so a poisoned lock still holds a consistent value.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! The ledger's writer thread: takes priced records from the bounded queue, writes them in
//! batches, and deletes tasks past their retention.
//!
//! All writes to the ledger database happen on this thread, so the count of stored records per
//! task, which enforces `ledger.max_requests_per_task`, never races with another writer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use rocksdb::{DB, IteratorMode, WriteBatch, WriteOptions};

use super::db::{META, NEXT_SEQUENCE, REQUESTS, TASKS, family};
use super::encoding::{FLAG_GENERATED, StoredRecord, TaskTotals, record_key, records_end};
use super::totals::{Counters, RateLimit, Totals, add};

/// Records written in one batch at most.
const MAX_BATCH: usize = 512;
/// Task deletions written in one batch by the retention sweep.
const SWEEP_BATCH: usize = 1024;
/// Tasks whose stored record count the writer keeps in memory; past it, the counts are dropped
/// and read again from the task totals.
const MAX_CACHED_TASKS: usize = 65_536;

/// A request on the queue to the writer.
pub(super) enum Message {
    Record(Box<Pending>),
    /// Write every record queued before this message, then send the result.
    Flush(SyncSender<Result<(), String>>),
    /// Run the retention sweep now, then send the number of tasks deleted.
    Sweep(SyncSender<Result<u64, String>>),
    Stop,
}

/// A priced record waiting to be written.
pub(super) struct Pending {
    pub task_key: Vec<u8>,
    pub generated: bool,
    pub record: StoredRecord,
}

/// Writes that go to the database together.
#[derive(Default)]
struct Batch {
    writes: WriteBatch,
    totals: Totals,
}

pub(super) struct Writer {
    pub db: Arc<DB>,
    pub receiver: Receiver<Message>,
    pub counters: Arc<Counters>,
    pub retention: Duration,
    pub max_records: u64,
    pub next_sequence: u64,
    /// Stored request records per task key, for tasks seen lately.
    pub records: HashMap<Vec<u8>, u64>,
    pub errors: RateLimit,
}

impl Writer {
    /// Runs until a `Stop` message arrives or every sender is gone. Sweeps every
    /// min(retention / 4, 1 h), but at most once a second. `Ledger::open` runs the first sweep.
    pub fn run(mut self) {
        let interval = (self.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let mut next_sweep = Instant::now() + interval;
        loop {
            if Instant::now() >= next_sweep {
                if let Err(error) = self.sweep() {
                    tracing::error!(error = %error, "ledger retention sweep failed; retrying at the next interval");
                }
                next_sweep = Instant::now() + interval;
            }
            let wait = next_sweep.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(wait) {
                Ok(message) => {
                    if !self.handle(message) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Handles `first` and the messages already queued behind it, up to a few batches. Returns
    /// false on `Stop`.
    fn handle(&mut self, first: Message) -> bool {
        let mut batch = Batch::default();
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(message) = next.take() {
            handled += 1;
            match message {
                Message::Record(pending) => {
                    self.add(&mut batch, *pending);
                    if batch.totals.requests as usize >= MAX_BATCH {
                        let _ = self.commit(&mut batch);
                    }
                }
                Message::Flush(reply) => {
                    let _ = reply.send(self.commit(&mut batch));
                }
                Message::Sweep(reply) => {
                    let result = self.commit(&mut batch).and_then(|()| self.sweep().map_err(|error| error.to_string()));
                    let _ = reply.send(result);
                }
                Message::Stop => {
                    let _ = self.commit(&mut batch);
                    return false;
                }
            }
            // Bounded, so that a steady stream of records cannot delay the retention sweep.
            if handled < 8 * MAX_BATCH {
                next = self.receiver.try_recv().ok();
            }
        }
        let _ = self.commit(&mut batch);
        true
    }

    /// Adds a record to the batch: its request record while the task has fewer than
    /// `max_records`, and its delta to the task totals in any case.
    fn add(&mut self, batch: &mut Batch, pending: Pending) {
        let stored = self.stored_records(&pending.task_key, pending.generated);
        let keep = stored < self.max_records;
        if keep {
            let key = record_key(&pending.task_key, self.next_sequence);
            self.next_sequence = self.next_sequence.saturating_add(1);
            batch.writes.put_cf(family(&self.db, REQUESTS), key, pending.record.encode());
            if !pending.generated {
                self.records.insert(pending.task_key.clone(), stored + 1);
            }
        }
        let flags = if pending.generated { FLAG_GENERATED } else { 0 };
        batch.writes.merge_cf(family(&self.db, TASKS), &pending.task_key, pending.record.delta(flags, keep).encode());
        batch.totals.add_request(&pending.record);
    }

    /// Returns the number of request records stored for a task, from memory or its totals. A
    /// generated id is new, so its task has none.
    fn stored_records(&mut self, task_key: &[u8], generated: bool) -> u64 {
        if generated {
            return 0;
        }
        if let Some(count) = self.records.get(task_key) {
            return *count;
        }
        let count = match self.db.get_cf(family(&self.db, TASKS), task_key) {
            Ok(Some(value)) => TaskTotals::decode(&value).map(|totals| totals.records).unwrap_or(0),
            Ok(None) => 0,
            Err(error) => {
                tracing::warn!(error = %error, "failed to read a task's record count; counting its records from 0");
                0
            }
        };
        self.records.insert(task_key.to_vec(), count);
        count
    }

    /// Writes the batch with the WAL and without an fsync, and adds it to the process totals.
    fn commit(&mut self, batch: &mut Batch) -> Result<(), String> {
        let Batch { mut writes, totals } = std::mem::take(batch);
        if writes.is_empty() {
            return Ok(());
        }
        writes.put_cf(family(&self.db, META), NEXT_SEQUENCE, self.next_sequence.to_be_bytes());
        let mut options = WriteOptions::default();
        options.set_sync(false);
        let result = self.db.write_opt(writes, &options);
        // Past the bound, the counts are read again from the committed totals.
        if result.is_err() || self.records.len() > MAX_CACHED_TASKS {
            self.records.clear();
        }
        match result {
            Ok(()) => {
                self.counters.commit(&totals);
                Ok(())
            }
            Err(error) => {
                add(&self.counters.failed, totals.requests);
                if let Some(suppressed) = self.errors.allow() {
                    tracing::error!(error = %error, records = totals.requests, suppressed, "failed to write ledger records; they are lost");
                }
                Err(error.to_string())
            }
        }
    }

    /// Deletes every task whose last request is older than the retention, with its request
    /// records. Returns the number of tasks deleted.
    ///
    /// NOTE: the sweep reads every task's totals on this thread. Records queued meanwhile wait,
    /// and a queue that fills up drops them, so a ledger of millions of tasks may lose records
    /// during a sweep.
    pub fn sweep(&mut self) -> Result<u64, rocksdb::Error> {
        let cutoff = super::now_ms().saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX));
        let tasks = family(&self.db, TASKS);
        let requests = family(&self.db, REQUESTS);
        let mut writes = WriteBatch::default();
        let mut deleted = 0u64;
        for item in self.db.iterator_cf(tasks, IteratorMode::Start) {
            let (key, value) = item?;
            let last_seen_ms = match TaskTotals::decode(&value) {
                Ok(totals) => totals.last_seen_ms,
                Err(reason) => {
                    tracing::warn!(reason = %reason, "deleting a ledger task whose totals cannot be read");
                    0
                }
            };
            if last_seen_ms >= cutoff {
                continue;
            }
            writes.delete_cf(tasks, &key);
            writes.delete_range_cf(requests, key.to_vec(), records_end(&key));
            self.records.remove(&key[..]);
            deleted += 1;
            if writes.len() >= 2 * SWEEP_BATCH {
                self.db.write(std::mem::take(&mut writes))?;
            }
        }
        if !writes.is_empty() {
            self.db.write(writes)?;
        }
        if deleted > 0 {
            tracing::info!(tasks = deleted, retention = %humantime::format_duration(self.retention), "deleted ledger tasks past their retention");
        }
        Ok(deleted)
    }
}

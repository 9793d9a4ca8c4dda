//! The cost-per-task ledger: per-request records and per-task totals of tokens, time to first
//! token and cost, in a RocksDB database of their own under `<store.data_dir>/ledger`.
//!
//! Column families:
//!
//! | family | key | value |
//! | --- | --- | --- |
//! | `tasks` | tenant and task id, each after its length (4 bytes big-endian) | task totals, 105 bytes, merged from per-request deltas |
//! | `requests` | task key, sequence number (8 bytes big-endian) | one request as versioned JSON |
//! | `meta` | `next_sequence` | the next sequence number |
//!
//! Costs are integers in pico-units (1e-12) of `ledger.currency`, rounded once per request and
//! stored in its record, so every total is the exact sum of the records it counts. Recording
//! never blocks a request: `Ledger::record` prices the request and queues it, and one writer
//! thread writes the queue in batches.

pub mod command;
mod db;
mod encoding;
pub mod endpoints;
mod pricing;
mod report;
mod task_id;
mod totals;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::DB;

use crate::app::CacheSource;
use crate::config::LedgerConfig;
use crate::costs::Costs;

pub use report::{RequestReport, TaskReport, TopBy, TotalsReport, decimal, rfc3339};
pub use task_id::{MAX_TASK_ID_LEN, TaskId, TaskIdError, task_id};
pub use totals::Totals;

use encoding::{StoredRecord, task_key};
use pricing::{Measured, Usage};
use totals::{Counters, RateLimit};
use writer::{Message, Pending, Writer};

/// Records that may wait for the writer; more are dropped and counted in `Totals::dropped`.
const QUEUE_RECORDS: usize = 8192;

/// Weight of a new decode-time observation in the moving average.
const DECODE_WEIGHT: f64 = 0.2;

/// Failure of a ledger operation.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("failed to open the ledger at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("ledger database error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("damaged ledger data for {what}: {reason}; other tasks are unaffected, and the retention sweep deletes this task once it is older than ledger.retention")]
    Damaged { what: String, reason: String },
    #[error("the ledger writer thread has stopped, so records are no longer written")]
    Stopped,
    #[error("failed to write ledger records: {0}")]
    Write(String),
}

/// One finished request, as the request path reports it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub tenant: String,
    pub task: TaskId,
    /// The request's `model` field, or the engine's model id when the request has none. Prices
    /// in `ledger.models` are looked up by this name.
    pub model: String,
    /// Time of the request, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub cache_source: CacheSource,
    /// Node id of the sidecar that served the request, in a fleet.
    pub served_by: Option<String>,
    pub prompt_tokens: u64,
    /// Prompt tokens the engine did not compute. A count above `prompt_tokens` is cut to it.
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Time to first token.
    pub ttft: Duration,
    /// The engine's measured prompt-processing and generation times, which price the request
    /// under an hourly price without configured rates.
    pub prefill_ms: Option<f64>,
    pub decode_ms: Option<f64>,
}

/// The ledger: prices and queues request records, and reads task reports.
pub struct Ledger {
    db: Arc<DB>,
    path: PathBuf,
    config: LedgerConfig,
    costs: Arc<Costs>,
    sender: mpsc::SyncSender<Message>,
    writer: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    /// Moving average of decode time per output token in microseconds, as f64 bits; 0 until a
    /// request reports its decode time.
    decode_us_per_token: AtomicU64,
    drop_warnings: RateLimit,
    input_warnings: RateLimit,
    price_warnings: RateLimit,
}

/// Returns the current time in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|since| since.as_millis() as u64).unwrap_or_default()
}

impl Ledger {
    /// Opens or creates the ledger under `data_dir/ledger`, deletes the tasks past
    /// `config.retention`, and starts the writer thread. That sweep reads every task's totals, so
    /// a database that RocksDB finds damaged then, or while opening it, is moved aside to
    /// `ledger.damaged-<unix ms>` and replaced by an empty one, and the sidecar keeps serving.
    /// `costs` gives the measured prefill rate for hourly prices.
    pub fn open(config: &LedgerConfig, data_dir: &Path, costs: Arc<Costs>) -> Result<Ledger, LedgerError> {
        Self::open_with_queue(config, data_dir, costs, QUEUE_RECORDS)
    }

    /// Opens the ledger with a write queue of `queue` records.
    fn open_with_queue(config: &LedgerConfig, data_dir: &Path, costs: Arc<Costs>, queue: usize) -> Result<Ledger, LedgerError> {
        let path = data_dir.join("ledger");
        let (db, writer, sender) = match Self::prepare(config, &path, queue) {
            Err(error) if db::is_corruption(&error) => {
                db::move_aside(&path, &error)?;
                Self::prepare(config, &path, queue)?
            }
            other => other?,
        };
        let counters = writer.counters.clone();
        let handle = std::thread::Builder::new()
            .name("kvsidecar-ledger".into())
            .spawn(move || writer.run())
            .map_err(|error| LedgerError::Open { path: path.display().to_string(), reason: format!("failed to start the writer thread: {error}") })?;
        tracing::info!(ledger.path = %path.display(), retention = %humantime::format_duration(config.retention), "ledger opened");
        Ok(Ledger {
            db,
            path,
            config: config.clone(),
            costs,
            sender,
            writer: Mutex::new(Some(handle)),
            counters,
            decode_us_per_token: AtomicU64::new(0),
            drop_warnings: RateLimit::default(),
            input_warnings: RateLimit::default(),
            price_warnings: RateLimit::default(),
        })
    }

    /// Opens the database, runs the first retention sweep, and returns the writer that has yet
    /// to start with the sender of its queue.
    fn prepare(config: &LedgerConfig, path: &Path, queue: usize) -> Result<(Arc<DB>, Writer, mpsc::SyncSender<Message>), LedgerError> {
        let db = Arc::new(db::open(path)?);
        let next_sequence = db::next_sequence(&db)?;
        let (sender, receiver) = mpsc::sync_channel(queue);
        let mut writer = Writer {
            db: db.clone(),
            receiver,
            counters: Arc::new(Counters::default()),
            retention: config.retention,
            max_records: u64::from(config.max_requests_per_task),
            next_sequence,
            records: Default::default(),
            errors: RateLimit::default(),
        };
        writer.sweep()?;
        Ok((db, writer, sender))
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Prices a finished request and queues it for the writer. Never blocks: when the queue is
    /// full, the record is dropped, counted in `Totals::dropped` and a warning is logged at most
    /// every 10 s.
    pub fn record(&self, record: RequestRecord) {
        let cached_tokens = if record.cached_tokens > record.prompt_tokens {
            if let Some(suppressed) = self.input_warnings.allow() {
                tracing::warn!(cached = record.cached_tokens, prompt = record.prompt_tokens, suppressed, "ledger record has more cached than prompt tokens; counting all prompt tokens as cached");
            }
            record.prompt_tokens
        } else {
            record.cached_tokens
        };
        let usage = Usage {
            prompt_tokens: record.prompt_tokens,
            cached_tokens,
            output_tokens: record.output_tokens,
            prefill_ms: record.prefill_ms,
            decode_ms: record.decode_ms,
        };
        // The estimated milliseconds of prefill for 1000 tokens are the microseconds per token.
        let measured = Measured { prefill_us_per_token: self.costs.recompute_ms(1000), decode_us_per_token: self.decode_average() };
        self.observe_decode(record.output_tokens, record.decode_ms);
        let price = self.config.models.get(&record.model).or(self.config.price.as_ref());
        let charge = pricing::charge(price, &usage, &measured);
        if charge.decode_unpriced
            && let Some(suppressed) = self.price_warnings.allow()
        {
            tracing::warn!(model = %record.model, suppressed, "the hourly price has no decode_tokens_per_second and the engine reported no decode time, so output tokens cost 0; set decode_tokens_per_second");
        }

        let ttft_us = u64::try_from(record.ttft.as_micros()).unwrap_or(u64::MAX);
        let stored = StoredRecord {
            v: encoding::RECORD_VERSION,
            unix_ms: record.unix_ms,
            model: record.model,
            cache_source: record.cache_source.as_str().to_string(),
            served_by: record.served_by,
            prompt_tokens: record.prompt_tokens,
            cached_tokens,
            output_tokens: record.output_tokens,
            ttft_us,
            cost_served_pico: charge.served_pico,
            cost_uncached_pico: charge.uncached_pico,
        };
        let pending = Pending { task_key: task_key(&record.tenant, record.task.as_str()), generated: record.task.is_generated(), record: stored };
        let reason = match self.sender.try_send(Message::Record(Box::new(pending))) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "the write queue is full",
            Err(TrySendError::Disconnected(_)) => "the writer thread has stopped",
        };
        totals::add(&self.counters.dropped, 1);
        if let Some(suppressed) = self.drop_warnings.allow() {
            tracing::warn!(reason, suppressed, dropped = self.counters.dropped.load(Ordering::Relaxed), "ledger record dropped");
        }
    }

    fn decode_average(&self) -> Option<f64> {
        let average = f64::from_bits(self.decode_us_per_token.load(Ordering::Relaxed));
        (average > 0.0).then_some(average)
    }

    /// Updates the moving average of decode time per token from a request with at least 16
    /// output tokens.
    fn observe_decode(&self, output_tokens: u64, decode_ms: Option<f64>) {
        let Some(ms) = pricing::valid_ms(decode_ms) else { return };
        if output_tokens < 16 || ms == 0.0 {
            return;
        }
        let sample = ms * 1000.0 / output_tokens as f64;
        // Concurrent updates may lose one sample; the average stays a valid estimate either way.
        let next = match self.decode_average() {
            Some(average) => average * (1.0 - DECODE_WEIGHT) + sample * DECODE_WEIGHT,
            None => sample,
        };
        self.decode_us_per_token.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Waits until every record queued before the call is written. Call it before shutdown, so
    /// that a restart loses nothing.
    pub fn flush(&self) -> Result<(), LedgerError> {
        let (reply, result) = mpsc::sync_channel(1);
        self.sender.send(Message::Flush(reply)).map_err(|_| LedgerError::Stopped)?;
        result.recv().map_err(|_| LedgerError::Stopped)?.map_err(LedgerError::Write)
    }

    /// Writes the queued records, then deletes the tasks past `ledger.retention` now instead of
    /// at the next interval. Returns the number of tasks deleted.
    pub fn sweep(&self) -> Result<u64, LedgerError> {
        let (reply, result) = mpsc::sync_channel(1);
        self.sender.send(Message::Sweep(reply)).map_err(|_| LedgerError::Stopped)?;
        result.recv().map_err(|_| LedgerError::Stopped)?.map_err(LedgerError::Write)
    }

    /// Reads the task `id` of `tenant`, with its request records when `with_requests` is set.
    /// Returns None when the tenant has no such task. Blocks on disk reads.
    pub fn task(&self, tenant: &str, id: &str, with_requests: bool) -> Result<Option<TaskReport>, LedgerError> {
        report::task(&self.db, &self.config.currency, tenant, id, with_requests)
    }

    /// Returns the `n` tasks of all tenants that rank highest by `by`, without request records.
    /// Blocks while it reads every task's totals.
    pub fn top(&self, n: usize, by: TopBy) -> Result<Vec<TaskReport>, LedgerError> {
        report::top(&self.db, &self.config.currency, n, by)
    }

    /// Returns the totals of what this process committed, for metrics.
    pub fn totals(&self) -> Totals {
        self.counters.snapshot()
    }
}

impl Drop for Ledger {
    /// Writes the queued records and stops the writer thread, which closes the database.
    fn drop(&mut self) {
        let _ = self.sender.send(Message::Stop);
        let handle = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!(ledger.path = %self.path.display(), "the ledger writer thread panicked");
        }
    }
}

#[cfg(test)]
mod tests;

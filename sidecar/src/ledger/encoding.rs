//! Keys and values of the ledger database, and the merge operator that adds up task totals.

use serde::{Deserialize, Serialize};

/// Version byte of the binary task totals.
const TOTALS_VERSION: u8 = 1;
/// Number of u64 fields in the binary task totals.
const TOTALS_FIELDS: usize = 13;
/// Length of the binary task totals: the version byte and the fields, 8 bytes little-endian each.
const TOTALS_LEN: usize = 1 + TOTALS_FIELDS * 8;

/// Version of the JSON request records.
pub(super) const RECORD_VERSION: u32 = 1;

/// Bit of `TaskTotals::flags`: the task id was generated, so the task is a single request.
pub(super) const FLAG_GENERATED: u64 = 1;

/// Returns the key of a task: the tenant and the task id, each preceded by its length as 4 bytes
/// big-endian. The lengths make the key of one task a prefix of no other task's key, so every
/// request record of a task sits in one contiguous range that starts with this key.
pub(super) fn task_key(tenant: &str, task: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + tenant.len() + task.len());
    for part in [tenant, task] {
        key.extend_from_slice(&(part.len() as u32).to_be_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// Splits a task key into tenant and task id. Returns None for a key that is not one.
pub(super) fn split_task_key(key: &[u8]) -> Option<(String, String)> {
    let mut rest = key;
    let mut parts = Vec::with_capacity(2);
    for _ in 0..2 {
        let length = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let part = rest.get(4..4 + length)?;
        parts.push(String::from_utf8(part.to_vec()).ok()?);
        rest = &rest[4 + length..];
    }
    let task = parts.pop()?;
    let tenant = parts.pop()?;
    rest.is_empty().then_some((tenant, task))
}

/// Returns the key of a request record: the task key and the record's sequence number, 8 bytes
/// big-endian, so a task's records sort in the order they were written.
pub(super) fn record_key(task_key: &[u8], sequence: u64) -> Vec<u8> {
    let mut key = task_key.to_vec();
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// Returns the exclusive end of the range of a task's request records.
pub(super) fn records_end(task_key: &[u8]) -> Vec<u8> {
    let mut key = task_key.to_vec();
    key.extend_from_slice(&[0xff; 9]);
    key
}

/// Totals of one task, stored as a merge of per-request deltas. Every field combines
/// associatively (sum, min or max), so RocksDB may merge the deltas in any grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TaskTotals {
    pub requests: u64,
    /// Request records stored; fewer than `requests` once the task passed
    /// `ledger.max_requests_per_task`.
    pub records: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub ttft_sum_us: u64,
    pub ttft_max_us: u64,
    pub cost_served_pico: u64,
    pub cost_uncached_pico: u64,
    /// Milliseconds since the Unix epoch of the first and last request (min and max).
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// `FLAG_*` bits, combined with OR.
    pub flags: u64,
    /// Stored deltas that could not be decoded, so the other fields miss their amounts.
    pub damaged: u64,
}

impl TaskTotals {
    /// The identity of `add`.
    pub const EMPTY: TaskTotals = TaskTotals {
        requests: 0,
        records: 0,
        prompt_tokens: 0,
        cached_tokens: 0,
        output_tokens: 0,
        ttft_sum_us: 0,
        ttft_max_us: 0,
        cost_served_pico: 0,
        cost_uncached_pico: 0,
        first_seen_ms: u64::MAX,
        last_seen_ms: 0,
        flags: 0,
        damaged: 0,
    };

    /// Adds `other` field by field. Sums saturate at u64::MAX, which keeps them associative.
    pub fn add(&mut self, other: &TaskTotals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.records = self.records.saturating_add(other.records);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(other.cached_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.ttft_sum_us = self.ttft_sum_us.saturating_add(other.ttft_sum_us);
        self.ttft_max_us = self.ttft_max_us.max(other.ttft_max_us);
        self.cost_served_pico = self.cost_served_pico.saturating_add(other.cost_served_pico);
        self.cost_uncached_pico = self.cost_uncached_pico.saturating_add(other.cost_uncached_pico);
        self.first_seen_ms = self.first_seen_ms.min(other.first_seen_ms);
        self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
        self.flags |= other.flags;
        self.damaged = self.damaged.saturating_add(other.damaged);
    }

    fn fields(&self) -> [u64; TOTALS_FIELDS] {
        [
            self.requests,
            self.records,
            self.prompt_tokens,
            self.cached_tokens,
            self.output_tokens,
            self.ttft_sum_us,
            self.ttft_max_us,
            self.cost_served_pico,
            self.cost_uncached_pico,
            self.first_seen_ms,
            self.last_seen_ms,
            self.flags,
            self.damaged,
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(TOTALS_LEN);
        bytes.push(TOTALS_VERSION);
        for field in self.fields() {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    /// Decodes totals written by `encode`. Returns the reason on failure.
    pub fn decode(bytes: &[u8]) -> Result<TaskTotals, String> {
        match bytes.first() {
            Some(&TOTALS_VERSION) if bytes.len() == TOTALS_LEN => {}
            Some(&TOTALS_VERSION) => return Err(format!("task totals of {} bytes, expected {TOTALS_LEN}", bytes.len())),
            Some(version) => return Err(format!("task totals of unknown version {version}, expected {TOTALS_VERSION}")),
            None => return Err("empty task totals".into()),
        }
        let mut fields = [0u64; TOTALS_FIELDS];
        for (field, chunk) in fields.iter_mut().zip(bytes[1..].chunks_exact(8)) {
            *field = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        }
        let [requests, records, prompt_tokens, cached_tokens, output_tokens, ttft_sum_us, ttft_max_us, cost_served_pico, cost_uncached_pico, first_seen_ms, last_seen_ms, flags, damaged] =
            fields;
        Ok(TaskTotals {
            requests,
            records,
            prompt_tokens,
            cached_tokens,
            output_tokens,
            ttft_sum_us,
            ttft_max_us,
            cost_served_pico,
            cost_uncached_pico,
            first_seen_ms,
            last_seen_ms,
            flags,
            damaged,
        })
    }
}

/// Name of the merge operator, stored by RocksDB in the database options.
pub(super) const MERGE_OPERATOR: &str = "kvsidecar.ledger.task_totals.v1";

/// The merge operator of task totals, for full and partial merges. It never fails: a value or
/// delta that cannot be decoded counts in `damaged` instead, because a failed merge would stop
/// RocksDB's compactions.
pub(super) fn merge_totals(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut total = TaskTotals::EMPTY;
    for value in existing.into_iter().chain(operands) {
        match TaskTotals::decode(value) {
            Ok(delta) => total.add(&delta),
            Err(_) => total.damaged = total.damaged.saturating_add(1),
        }
    }
    Some(total.encode())
}

/// One request as stored: tokens, time to first token and its costs, rounded once to whole
/// pico-units so that every sum over records is exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredRecord {
    pub v: u32,
    pub unix_ms: u64,
    pub model: String,
    pub cache_source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub ttft_us: u64,
    pub cost_served_pico: u64,
    pub cost_uncached_pico: u64,
}

impl StoredRecord {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a stored record and checks its version and fields. Returns the reason on failure.
    pub fn decode(bytes: &[u8]) -> Result<StoredRecord, String> {
        let record: StoredRecord = serde_json::from_slice(bytes).map_err(|error| format!("invalid request record: {error}"))?;
        if record.v != RECORD_VERSION {
            return Err(format!("request record of unknown version {}, expected {RECORD_VERSION}", record.v));
        }
        if !["none", "slot", "local", "peer"].contains(&record.cache_source.as_str()) {
            return Err(format!("request record with unknown cache source {:?}", record.cache_source));
        }
        if record.cached_tokens > record.prompt_tokens {
            return Err(format!("request record with {} cached of {} prompt tokens", record.cached_tokens, record.prompt_tokens));
        }
        Ok(record)
    }

    /// Returns the delta this record adds to its task's totals.
    pub fn delta(&self, flags: u64, stored: bool) -> TaskTotals {
        TaskTotals {
            requests: 1,
            records: u64::from(stored),
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            output_tokens: self.output_tokens,
            ttft_sum_us: self.ttft_us,
            ttft_max_us: self.ttft_us,
            cost_served_pico: self.cost_served_pico,
            cost_uncached_pico: self.cost_uncached_pico,
            first_seen_ms: self.unix_ms,
            last_seen_ms: self.unix_ms,
            flags,
            damaged: 0,
        }
    }
}

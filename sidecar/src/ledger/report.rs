//! Reports of tasks read from the ledger, with costs as exact decimal strings.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, UNIX_EPOCH};

use rocksdb::{DB, Direction, IteratorMode};
use serde::Serialize;

use super::LedgerError;
use super::db::{REQUESTS, TASKS, family};
use super::encoding::{FLAG_GENERATED, StoredRecord, TaskTotals, split_task_key, task_key};
use super::totals::Totals;

/// Pico-units (1e-12) in one unit of currency.
const PICO: i128 = 1_000_000_000_000;

/// Formats an amount in pico-units as an exact decimal, trailing zeros trimmed but with at least
/// one decimal place: 123_000_000 is "0.000123", 0 is "0.0".
pub fn decimal(pico: i128) -> String {
    let sign = if pico < 0 { "-" } else { "" };
    let magnitude = pico.unsigned_abs();
    let unit = PICO.unsigned_abs();
    let fraction = format!("{:012}", magnitude % unit);
    let fraction = fraction.trim_end_matches('0');
    format!("{sign}{}.{}", magnitude / unit, if fraction.is_empty() { "0" } else { fraction })
}

/// Latest instant that RFC 3339 can write with a four-digit year: 9999-12-31T23:59:59.999Z.
const MAX_RFC3339_MS: u64 = 253_402_300_799_999;

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC, such as 2025-01-31T12:00:00.000Z.
pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms.min(MAX_RFC3339_MS))).to_string()
}

/// Order of `top`: the largest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopBy {
    /// Cost as served.
    Cost,
    /// Cost saved by the cache: uncached minus served.
    Saved,
    /// Number of requests.
    Requests,
    /// Time of the last request.
    Recent,
}

impl TopBy {
    pub fn as_str(self) -> &'static str {
        match self {
            TopBy::Cost => "cost",
            TopBy::Saved => "saved",
            TopBy::Requests => "requests",
            TopBy::Recent => "recent",
        }
    }

    /// Parses the names that `as_str` returns.
    pub fn parse(name: &str) -> Option<TopBy> {
        [TopBy::Cost, TopBy::Saved, TopBy::Requests, TopBy::Recent].into_iter().find(|by| by.as_str() == name)
    }

    fn score(self, totals: &TaskTotals) -> i128 {
        match self {
            TopBy::Cost => i128::from(totals.cost_served_pico),
            TopBy::Saved => i128::from(totals.cost_uncached_pico) - i128::from(totals.cost_served_pico),
            TopBy::Requests => i128::from(totals.requests),
            TopBy::Recent => i128::from(totals.last_seen_ms),
        }
    }
}

/// One task's totals. Every figure is the sum over the task's requests. While `records_kept`
/// equals `requests`, it is also the sum over `records`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskReport {
    pub task: String,
    pub tenant: String,
    /// True when the id was generated for a request without a task header.
    pub own_task: bool,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub computed_tokens: u64,
    pub output_tokens: u64,
    /// Fraction of the prompt tokens that were cached, rounded to 4 decimal places.
    pub cached_share: f64,
    pub ttft_mean_ms: f64,
    pub ttft_max_ms: f64,
    pub first_seen: String,
    pub last_seen: String,
    pub currency: String,
    /// Costs in `currency` as exact decimals.
    pub cost_served: String,
    pub cost_uncached: String,
    pub cost_saved: String,
    /// Request records stored; fewer than `requests` past `ledger.max_requests_per_task`.
    pub records_kept: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<RequestReport>>,
    /// Costs in pico-units (1e-12) of `currency`.
    #[serde(skip)]
    pub cost_served_pico: u64,
    #[serde(skip)]
    pub cost_uncached_pico: u64,
}

/// One request of a task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestReport {
    /// Position among all request records of the ledger. It increases with each record.
    pub sequence: u64,
    pub time: String,
    pub model: String,
    pub cache_source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub computed_tokens: u64,
    pub output_tokens: u64,
    pub ttft_ms: f64,
    pub cost_served: String,
    pub cost_uncached: String,
    pub cost_saved: String,
    #[serde(skip)]
    pub cost_served_pico: u64,
    #[serde(skip)]
    pub cost_uncached_pico: u64,
}

/// `Totals` of this process as reported by `/admin/tasks`, with costs as exact decimals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TotalsReport {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub computed_tokens: u64,
    pub output_tokens: u64,
    pub currency: String,
    pub cost_served: String,
    pub cost_uncached: String,
    pub cost_saved: String,
    pub dropped: u64,
    pub failed: u64,
}

impl TotalsReport {
    pub fn new(totals: &Totals, currency: &str) -> TotalsReport {
        let (served, uncached) = (i128::from(totals.cost_served_pico), i128::from(totals.cost_uncached_pico));
        TotalsReport {
            requests: totals.requests,
            prompt_tokens: totals.prompt_tokens,
            cached_tokens: totals.cached_tokens,
            computed_tokens: totals.computed_tokens,
            output_tokens: totals.output_tokens,
            currency: currency.to_string(),
            cost_served: decimal(served),
            cost_uncached: decimal(uncached),
            cost_saved: decimal(uncached - served),
            dropped: totals.dropped,
            failed: totals.failed,
        }
    }
}

fn round_to(value: f64, places: i32) -> f64 {
    let factor = 10f64.powi(places);
    (value * factor).round() / factor
}

fn task_report(tenant: String, task: String, totals: &TaskTotals, currency: &str) -> TaskReport {
    let (served, uncached) = (i128::from(totals.cost_served_pico), i128::from(totals.cost_uncached_pico));
    let share = if totals.prompt_tokens == 0 { 0.0 } else { totals.cached_tokens as f64 / totals.prompt_tokens as f64 };
    let mean_us = if totals.requests == 0 { 0.0 } else { totals.ttft_sum_us as f64 / totals.requests as f64 };
    TaskReport {
        task,
        tenant,
        own_task: totals.flags & FLAG_GENERATED != 0,
        requests: totals.requests,
        prompt_tokens: totals.prompt_tokens,
        cached_tokens: totals.cached_tokens,
        computed_tokens: totals.prompt_tokens.saturating_sub(totals.cached_tokens),
        output_tokens: totals.output_tokens,
        cached_share: round_to(share, 4),
        ttft_mean_ms: round_to(mean_us / 1000.0, 3),
        ttft_max_ms: totals.ttft_max_us as f64 / 1000.0,
        first_seen: rfc3339(totals.first_seen_ms.min(totals.last_seen_ms)),
        last_seen: rfc3339(totals.last_seen_ms),
        currency: currency.to_string(),
        cost_served: decimal(served),
        cost_uncached: decimal(uncached),
        cost_saved: decimal(uncached - served),
        records_kept: totals.records,
        records: None,
        cost_served_pico: totals.cost_served_pico,
        cost_uncached_pico: totals.cost_uncached_pico,
    }
}

fn request_report(sequence: u64, record: StoredRecord) -> RequestReport {
    let (served, uncached) = (i128::from(record.cost_served_pico), i128::from(record.cost_uncached_pico));
    RequestReport {
        sequence,
        time: rfc3339(record.unix_ms),
        computed_tokens: record.prompt_tokens - record.cached_tokens,
        ttft_ms: record.ttft_us as f64 / 1000.0,
        cost_served: decimal(served),
        cost_uncached: decimal(uncached),
        cost_saved: decimal(uncached - served),
        cost_served_pico: record.cost_served_pico,
        cost_uncached_pico: record.cost_uncached_pico,
        model: record.model,
        cache_source: record.cache_source,
        served_by: record.served_by,
        prompt_tokens: record.prompt_tokens,
        cached_tokens: record.cached_tokens,
        output_tokens: record.output_tokens,
    }
}

/// Decodes task totals, turning stored deltas that could not be decoded into an error.
fn checked_totals(tenant: &str, task: &str, value: &[u8]) -> Result<TaskTotals, LedgerError> {
    let subject = || format!("task {task:?} of tenant {tenant:?}");
    let totals = TaskTotals::decode(value).map_err(|reason| LedgerError::Damaged { what: subject(), reason })?;
    if totals.damaged > 0 {
        return Err(LedgerError::Damaged { what: subject(), reason: format!("{} stored updates of its totals cannot be decoded", totals.damaged) });
    }
    Ok(totals)
}

/// Reads one task of one tenant, with its request records when `with_requests` is set.
pub(super) fn task(db: &DB, currency: &str, tenant: &str, id: &str, with_requests: bool) -> Result<Option<TaskReport>, LedgerError> {
    let key = task_key(tenant, id);
    let Some(value) = db.get_cf(family(db, TASKS), &key)? else { return Ok(None) };
    let totals = checked_totals(tenant, id, &value)?;
    let mut report = task_report(tenant.to_string(), id.to_string(), &totals, currency);
    if with_requests {
        report.records = Some(records(db, tenant, id, &key)?);
    }
    Ok(Some(report))
}

/// Reads the request records of a task in the order they were written.
fn records(db: &DB, tenant: &str, id: &str, key: &[u8]) -> Result<Vec<RequestReport>, LedgerError> {
    let mut found = Vec::new();
    for item in db.iterator_cf(family(db, REQUESTS), IteratorMode::From(key, Direction::Forward)) {
        let (record_key, value) = item?;
        let Some(sequence) = record_key.strip_prefix(key) else { break };
        let sequence = <[u8; 8]>::try_from(sequence).map(u64::from_be_bytes).map_err(|_| LedgerError::Damaged {
            what: format!("a request record of task {id:?} of tenant {tenant:?}"),
            reason: format!("key of {} bytes", record_key.len()),
        })?;
        let record = StoredRecord::decode(&value).map_err(|reason| LedgerError::Damaged {
            what: format!("request record {sequence} of task {id:?} of tenant {tenant:?}"),
            reason,
        })?;
        found.push(request_report(sequence, record));
    }
    Ok(found)
}

/// A task in the ranking of `top`, ordered by score, then by its last request, then by key.
struct Ranked {
    score: i128,
    key: Vec<u8>,
    tenant: String,
    task: String,
    totals: TaskTotals,
}

impl Ranked {
    fn order(&self) -> (i128, u64, &[u8]) {
        (self.score, self.totals.last_seen_ms, &self.key)
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

/// Returns the `n` tasks of all tenants that rank highest by `by`, without their request
/// records. Ties go to the most recent task. Tasks whose totals are damaged are left out and
/// logged.
pub(super) fn top(db: &DB, currency: &str, n: usize, by: TopBy) -> Result<Vec<TaskReport>, LedgerError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // A min-heap of the best n so far, so each task costs O(log n).
    let mut best: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(n + 1);
    let mut damaged = 0u64;
    let mut damage_example = None;
    for item in db.iterator_cf(family(db, TASKS), IteratorMode::Start) {
        let (key, value) = item?;
        let Some((tenant, task)) = split_task_key(&key) else {
            damaged += 1;
            damage_example.get_or_insert_with(|| format!("invalid task key {}", hex::encode(&key)));
            continue;
        };
        let totals = match checked_totals(&tenant, &task, &value) {
            Ok(totals) => totals,
            Err(error) => {
                damaged += 1;
                damage_example.get_or_insert(error.to_string());
                continue;
            }
        };
        best.push(Reverse(Ranked { score: by.score(&totals), key: key.to_vec(), tenant, task, totals }));
        if best.len() > n {
            best.pop();
        }
    }
    if let Some(example) = damage_example {
        tracing::warn!(tasks = damaged, example = %example, "ledger tasks with damaged data left out of the ranking");
    }
    // Sorting the reversed entries ascending puts the highest rank first.
    Ok(best.into_sorted_vec().into_iter().map(|Reverse(ranked)| task_report(ranked.tenant, ranked.task, &ranked.totals, currency)).collect())
}

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::encoding::{TaskTotals, task_key};
use super::*;
use crate::config::{ConfigError, ConfigIssue, Micros, Overrides, Price};

const HOUR_MS: u64 = 3_600_000;

/// Input 0.15, cached input 0.075 and output 0.6 per million tokens.
fn token_price() -> Price {
    Price::Tokens { input: Micros(150_000), cached_input: Micros(75_000), output: Micros(600_000) }
}

fn ledger_config(price: Option<Price>) -> LedgerConfig {
    LedgerConfig { price, ..crate::config::Config::defaults().ledger }
}

fn open(dir: &Path, config: &LedgerConfig) -> Ledger {
    Ledger::open(config, dir, Arc::new(Costs::default())).unwrap()
}

fn request(tenant: &str, task: &str, prompt: u64, cached: u64, output: u64) -> RequestRecord {
    RequestRecord {
        tenant: tenant.into(),
        task: TaskId::parse(task).unwrap(),
        model: "tiny".into(),
        unix_ms: now_ms(),
        cache_source: if cached > 0 { CacheSource::Local } else { CacheSource::None },
        served_by: None,
        prompt_tokens: prompt,
        cached_tokens: cached,
        output_tokens: output,
        ttft: Duration::from_millis(40),
        prefill_ms: None,
        decode_ms: None,
    }
}

fn report(ledger: &Ledger, tenant: &str, task: &str) -> TaskReport {
    ledger.flush().unwrap();
    ledger.task(tenant, task, true).unwrap().expect("task recorded")
}

#[test]
fn decimal_is_exact_and_trimmed() {
    assert_eq!(decimal(0), "0.0");
    assert_eq!(decimal(1), "0.000000000001");
    assert_eq!(decimal(123_000_000), "0.000123");
    assert_eq!(decimal(1_500_000_000_000), "1.5");
    assert_eq!(decimal(2_000_000_000_000), "2.0");
    assert_eq!(decimal(-45_000_000), "-0.000045");
    assert_eq!(decimal(i128::from(u64::MAX)), "18446744.073709551615");
}

#[test]
fn token_prices_give_exact_costs() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(Some(token_price())));
    ledger.record(request("default", "build-42", 1000, 600, 200));
    ledger.record(request("default", "build-42", 7, 0, 3));
    ledger.record(request("default", "build-42", 1_234_567, 1_000_000, 0));
    let task = report(&ledger, "default", "build-42");

    // served: computed x 150000 + cached x 75000 + output x 600000 pico-units.
    let records = task.records.as_ref().unwrap();
    let served: Vec<u64> = records.iter().map(|record| record.cost_served_pico).collect();
    let uncached: Vec<u64> = records.iter().map(|record| record.cost_uncached_pico).collect();
    assert_eq!(served, [225_000_000, 2_850_000, 110_185_050_000]);
    assert_eq!(uncached, [270_000_000, 2_850_000, 185_185_050_000]);
    assert_eq!((records[0].cost_served.as_str(), records[0].cost_uncached.as_str(), records[0].cost_saved.as_str()), ("0.000225", "0.00027", "0.000045"));
    assert_eq!(records[1].cost_saved, "0.0");

    assert_eq!(task.requests, 3);
    assert_eq!((task.prompt_tokens, task.cached_tokens, task.computed_tokens, task.output_tokens), (1_235_574, 1_000_600, 234_974, 203));
    assert_eq!(task.cost_served, "0.1104129");
    assert_eq!(task.cost_uncached, "0.1854579");
    assert_eq!(task.cost_saved, "0.075045");
    assert_eq!(task.currency, "USD");
    assert!(!task.own_task);
}

#[test]
fn hourly_prices_round_once_per_request() {
    let dir = tempfile::tempdir().unwrap();
    // 1 per hour at 3 tokens per second: a token costs 92_592_592.59 pico-units.
    let slow = Price::Hourly { engine_per_hour: Micros(1_000_000), prefill_tokens_per_second: Some(Micros(3_000_000)), decode_tokens_per_second: Some(Micros(3_000_000)) };
    // 3.6 per hour is 1e9 pico-units a second: 1e6 per token at 1000 tokens/s, 2e7 at 50 tokens/s.
    let round = Price::Hourly { engine_per_hour: Micros(3_600_000), prefill_tokens_per_second: Some(Micros(1_000_000_000)), decode_tokens_per_second: Some(Micros(50_000_000)) };
    let mut config = ledger_config(Some(slow));
    config.models.insert("round".into(), round);
    let ledger = open(dir.path(), &config);

    ledger.record(request("default", "slow", 2, 0, 0));
    ledger.record(request("default", "slow", 1, 0, 0));
    ledger.record(request("default", "slow", 3, 2, 0));
    ledger.record(RequestRecord { model: "round".into(), ..request("default", "round", 1000, 600, 200) });

    let slow = report(&ledger, "default", "slow");
    let served: Vec<u64> = slow.records.as_ref().unwrap().iter().map(|record| record.cost_served_pico).collect();
    let uncached: Vec<u64> = slow.records.as_ref().unwrap().iter().map(|record| record.cost_uncached_pico).collect();
    // Cached tokens cost nothing as served; each request is rounded once, not each token.
    assert_eq!(served, [185_185_185, 92_592_593, 92_592_593]);
    assert_eq!(uncached, [185_185_185, 92_592_593, 277_777_778]);
    assert_eq!(slow.cost_served_pico, 370_370_371);
    assert_eq!(slow.cost_served, "0.000370370371");

    let round = report(&ledger, "default", "round");
    assert_eq!(round.cost_served, "0.0044");
    assert_eq!(round.cost_uncached, "0.005");
}

#[test]
fn hourly_prices_use_measured_times() {
    let dir = tempfile::tempdir().unwrap();
    // 3.6 per hour is 1000 pico-units per microsecond of engine time.
    let price = Price::Hourly { engine_per_hour: Micros(3_600_000), prefill_tokens_per_second: None, decode_tokens_per_second: None };
    let costs = Arc::new(Costs::default());
    assert_eq!(costs.recompute_ms(1000), 1000.0, "the starting prefill estimate is 1000 us per token");
    let ledger = Ledger::open(&ledger_config(Some(price)), dir.path(), costs).unwrap();

    // Before any decode time is known, output tokens cannot be priced.
    ledger.record(request("default", "unpriced", 0, 0, 10));
    // 400 computed tokens in 200 ms is 500 us per token; 600 cached tokens add 300 ms uncached.
    ledger.record(RequestRecord { prefill_ms: Some(200.0), decode_ms: Some(1000.0), ..request("default", "timed", 1000, 600, 100) });
    // No times: prefill at the 1000 us starting estimate, decode at the 10 ms per token measured above.
    ledger.record(request("default", "estimated", 100, 0, 20));

    assert_eq!(report(&ledger, "default", "unpriced").cost_served_pico, 0);
    let timed = report(&ledger, "default", "timed");
    assert_eq!((timed.cost_served_pico, timed.cost_uncached_pico), (1_200_000_000, 1_500_000_000));
    let estimated = report(&ledger, "default", "estimated");
    assert_eq!((estimated.cost_served_pico, estimated.cost_uncached_pico), (300_000_000, 300_000_000));
}

#[test]
fn no_price_counts_tokens_at_zero_cost() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(None));
    ledger.record(request("default", "free", 500, 100, 50));
    let task = report(&ledger, "default", "free");
    assert_eq!((task.prompt_tokens, task.cached_tokens, task.output_tokens), (500, 100, 50));
    assert_eq!((task.cost_served.as_str(), task.cost_uncached.as_str(), task.cost_saved.as_str()), ("0.0", "0.0", "0.0"));
}

#[test]
fn task_totals_equal_sum_of_records() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(Some(token_price())));
    let tasks = ["alpha", "beta", "gamma"];
    // A fixed pseudo-random sequence of token counts and times.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    for number in 0..60 {
        let prompt = next(5000);
        let record = RequestRecord {
            ttft: Duration::from_micros(next(2_000_000)),
            unix_ms: now_ms() - next(HOUR_MS),
            ..request("default", tasks[number % 3], prompt, next(prompt + 1), next(800))
        };
        ledger.record(record);
    }
    ledger.flush().unwrap();

    let mut all = Totals::default();
    for name in tasks {
        let task = ledger.task("default", name, true).unwrap().unwrap();
        let records = task.records.as_ref().unwrap();
        assert_eq!(task.requests, records.len() as u64, "{name}");
        assert_eq!(task.records_kept, task.requests, "{name}");
        assert_eq!(task.prompt_tokens, records.iter().map(|record| record.prompt_tokens).sum::<u64>(), "{name}");
        assert_eq!(task.cached_tokens, records.iter().map(|record| record.cached_tokens).sum::<u64>(), "{name}");
        assert_eq!(task.computed_tokens, records.iter().map(|record| record.computed_tokens).sum::<u64>(), "{name}");
        assert_eq!(task.output_tokens, records.iter().map(|record| record.output_tokens).sum::<u64>(), "{name}");
        assert_eq!(task.cost_served_pico, records.iter().map(|record| record.cost_served_pico).sum::<u64>(), "{name}");
        assert_eq!(task.cost_uncached_pico, records.iter().map(|record| record.cost_uncached_pico).sum::<u64>(), "{name}");
        assert_eq!(task.ttft_max_ms, records.iter().map(|record| record.ttft_ms).fold(0.0, f64::max), "{name}");
        let sequences: Vec<u64> = records.iter().map(|record| record.sequence).collect();
        assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]), "{name}: records in write order");
        assert_eq!(task.first_seen, records.iter().map(|record| record.time.clone()).min().unwrap(), "{name}");
        assert_eq!(task.last_seen, records.iter().map(|record| record.time.clone()).max().unwrap(), "{name}");
        for record in records {
            all.requests += 1;
            all.prompt_tokens += record.prompt_tokens;
            all.cached_tokens += record.cached_tokens;
            all.computed_tokens += record.computed_tokens;
            all.output_tokens += record.output_tokens;
            all.cost_served_pico += record.cost_served_pico;
            all.cost_uncached_pico += record.cost_uncached_pico;
        }
    }
    assert_eq!(ledger.totals(), all);
}

#[test]
fn ledger_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = ledger_config(Some(token_price()));
    let ledger = open(dir.path(), &config);
    ledger.record(request("default", "build-42", 1000, 600, 200));
    // Dropping the ledger writes what is queued.
    drop(ledger);

    let ledger = open(dir.path(), &config);
    ledger.record(request("default", "build-42", 7, 0, 3));
    let task = report(&ledger, "default", "build-42");
    assert_eq!(task.requests, 2);
    assert_eq!(task.cost_served_pico, 227_850_000);
    let records = task.records.unwrap();
    assert_eq!(records.len(), 2);
    assert!(records[0].sequence < records[1].sequence);
    assert_eq!(records[0].prompt_tokens, 1000);
    assert_eq!(ledger.totals().requests, 1, "totals count this process only");
}

#[test]
fn tenants_never_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(Some(token_price())));
    ledger.record(request("acme", "build-42", 1000, 0, 0));
    ledger.record(request("globex", "build-42", 10, 0, 0));
    ledger.flush().unwrap();

    assert_eq!(ledger.task("acme", "build-42", true).unwrap().unwrap().prompt_tokens, 1000);
    assert_eq!(ledger.task("globex", "build-42", true).unwrap().unwrap().records.unwrap().len(), 1);
    assert!(ledger.task("initech", "build-42", false).unwrap().is_none());
    // Length prefixes keep "ab" + "c" apart from "a" + "bc".
    ledger.record(request("ab", "c", 1, 0, 0));
    ledger.flush().unwrap();
    assert!(ledger.task("a", "bc", false).unwrap().is_none());
}

#[test]
fn own_task_gets_generated_id() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(None));
    let id = TaskId::generate();
    assert!(id.is_generated());
    assert!(id.as_str().starts_with("req-"), "{id}");
    assert_eq!(id.as_str().len(), 20, "{id}");
    ledger.record(RequestRecord { task: id.clone(), ..request("default", "unused", 10, 0, 1) });
    let task = report(&ledger, "default", id.as_str());
    assert!(task.own_task);
    assert_eq!(task.requests, 1);
}

#[test]
fn record_cap_keeps_totals_counting() {
    let dir = tempfile::tempdir().unwrap();
    let config = LedgerConfig { max_requests_per_task: 2, ..ledger_config(Some(token_price())) };
    let ledger = open(dir.path(), &config);
    for _ in 0..5 {
        ledger.record(request("default", "long", 10, 0, 0));
    }
    let task = report(&ledger, "default", "long");
    assert_eq!((task.requests, task.records_kept, task.records.as_ref().unwrap().len()), (5, 2, 2));
    assert_eq!(task.cost_served_pico, 5 * 10 * 150_000);
    drop(ledger);

    // After a restart the count of stored records comes from the task totals.
    let ledger = open(dir.path(), &config);
    ledger.record(request("default", "long", 10, 0, 0));
    let task = report(&ledger, "default", "long");
    assert_eq!((task.requests, task.records_kept), (6, 2));
}

#[test]
fn retention_sweep_deletes_old_tasks_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = LedgerConfig { retention: Duration::from_secs(3600), ..ledger_config(Some(token_price())) };
    let ledger = open(dir.path(), &config);
    ledger.record(RequestRecord { unix_ms: now_ms() - 2 * HOUR_MS, ..request("default", "old", 10, 0, 0) });
    ledger.record(RequestRecord { unix_ms: now_ms() - 2 * HOUR_MS, ..request("default", "revived", 10, 0, 0) });
    ledger.record(RequestRecord { unix_ms: now_ms() - HOUR_MS / 2, ..request("default", "revived", 10, 0, 0) });
    ledger.record(request("default", "new", 10, 0, 0));
    assert_eq!(ledger.sweep().unwrap(), 1);
    assert!(ledger.task("default", "old", false).unwrap().is_none());
    assert_eq!(report(&ledger, "default", "revived").requests, 2);
    assert_eq!(report(&ledger, "default", "new").requests, 1);

    // The records of a deleted task are gone too: the id starts afresh.
    ledger.record(request("default", "old", 20, 0, 0));
    let task = report(&ledger, "default", "old");
    assert_eq!((task.requests, task.records.unwrap().len()), (1, 1));

    // The writer sweeps when the ledger opens.
    ledger.record(RequestRecord { unix_ms: now_ms() - 2 * HOUR_MS, ..request("default", "stale", 10, 0, 0) });
    drop(ledger);
    let ledger = open(dir.path(), &config);
    ledger.flush().unwrap();
    assert!(ledger.task("default", "stale", false).unwrap().is_none());
    assert!(ledger.task("default", "new", false).unwrap().is_some());
}

#[test]
fn top_ranks_by_each_order() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(Some(token_price())));
    // "costly": most served cost. "saver": most saved. "busy": most requests. "latest": most recent.
    ledger.record(RequestRecord { unix_ms: now_ms() - 3000, ..request("acme", "costly", 100_000, 0, 1000) });
    ledger.record(RequestRecord { unix_ms: now_ms() - 2000, ..request("globex", "saver", 50_000, 49_000, 0) });
    for _ in 0..4 {
        ledger.record(RequestRecord { unix_ms: now_ms() - 1000, ..request("acme", "busy", 10, 0, 0) });
    }
    ledger.record(request("acme", "latest", 1, 0, 0));
    ledger.flush().unwrap();

    let names = |by: TopBy, n: usize| -> Vec<String> { ledger.top(n, by).unwrap().into_iter().map(|task| task.task).collect() };
    assert_eq!(names(TopBy::Cost, 2), ["costly", "saver"]);
    assert_eq!(names(TopBy::Saved, 1), ["saver"]);
    assert_eq!(names(TopBy::Requests, 1), ["busy"]);
    assert_eq!(names(TopBy::Recent, 4), ["latest", "busy", "saver", "costly"]);
    assert!(names(TopBy::Cost, 0).is_empty());
    let top = ledger.top(10, TopBy::Cost).unwrap();
    assert!(top.iter().all(|task| task.records.is_none()));
    assert_eq!(top.iter().find(|task| task.task == "saver").unwrap().tenant, "globex");
}

#[test]
fn merge_operator_adds_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let db = db::open(&dir.path().join("ledger")).unwrap();
    let tasks = db::family(&db, db::TASKS);
    let delta = |requests: u64, cost: u64, ttft: u64, at_ms: u64, flags: u64| TaskTotals {
        requests,
        records: requests,
        prompt_tokens: 10 * requests,
        cached_tokens: 4 * requests,
        output_tokens: requests,
        ttft_sum_us: ttft,
        ttft_max_us: ttft,
        cost_served_pico: cost,
        cost_uncached_pico: cost.saturating_mul(2),
        first_seen_ms: at_ms,
        last_seen_ms: at_ms,
        flags,
        damaged: 0,
    };
    let key = task_key("default", "merged");
    db.merge_cf(tasks, &key, delta(1, 100, 500, 2000, 0).encode()).unwrap();
    // Flushing moves the first delta to an SST file, so the read merges across levels.
    db.flush_cf(tasks).unwrap();
    db.merge_cf(tasks, &key, delta(2, 7, 900, 1000, 1).encode()).unwrap();
    db.merge_cf(tasks, &key, delta(1, u64::MAX, 100, 3000, 0).encode()).unwrap();
    let expected = TaskTotals {
        requests: 4,
        records: 4,
        prompt_tokens: 40,
        cached_tokens: 16,
        output_tokens: 4,
        ttft_sum_us: 1500,
        ttft_max_us: 900,
        cost_served_pico: u64::MAX,
        cost_uncached_pico: u64::MAX,
        first_seen_ms: 1000,
        last_seen_ms: 3000,
        flags: 1,
        damaged: 0,
    };
    assert_eq!(TaskTotals::decode(&db.get_cf(tasks, &key).unwrap().unwrap()).unwrap(), expected);
    db.compact_range_cf(tasks, None::<&[u8]>, None::<&[u8]>);
    assert_eq!(TaskTotals::decode(&db.get_cf(tasks, &key).unwrap().unwrap()).unwrap(), expected);

    // A delta that cannot be decoded is counted, and the others still add up.
    db.merge_cf(tasks, &key, b"garbage").unwrap();
    let damaged = TaskTotals::decode(&db.get_cf(tasks, &key).unwrap().unwrap()).unwrap();
    assert_eq!(damaged.damaged, 1);
    assert_eq!(damaged.requests, 4);
}

#[test]
fn damaged_values_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path(), &ledger_config(Some(token_price())));
    ledger.record(request("default", "broken-record", 10, 0, 0));
    ledger.record(request("default", "broken-totals", 10, 0, 0));
    ledger.record(request("default", "intact", 10, 0, 0));
    ledger.flush().unwrap();
    let requests = db::family(&ledger.db, db::REQUESTS);
    let tasks = db::family(&ledger.db, db::TASKS);
    ledger.db.put_cf(requests, encoding::record_key(&task_key("default", "broken-record"), u64::MAX), b"{not json").unwrap();
    ledger.db.merge_cf(tasks, task_key("default", "broken-totals"), [9u8, 1, 2]).unwrap();

    let error = ledger.task("default", "broken-record", true).unwrap_err().to_string();
    assert!(error.contains("\"broken-record\""), "{error}");
    assert!(error.contains("invalid request record"), "{error}");
    assert!(ledger.task("default", "broken-record", false).is_ok(), "totals alone are intact");
    let error = ledger.task("default", "broken-totals", false).unwrap_err().to_string();
    assert!(error.contains("\"broken-totals\""), "{error}");
    assert!(error.contains("cannot be decoded"), "{error}");
    let ranked: Vec<String> = ledger.top(10, TopBy::Cost).unwrap().into_iter().map(|task| task.task).collect();
    assert_eq!(ranked.len(), 2, "{ranked:?}");
    assert!(!ranked.contains(&"broken-totals".to_string()));
}

#[test]
fn full_queue_drops_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    // A queue without room accepts a record only while the writer waits for one.
    let ledger = Ledger::open_with_queue(&ledger_config(Some(token_price())), dir.path(), Arc::new(Costs::default()), 0).unwrap();
    for _ in 0..2000 {
        ledger.record(request("default", "flood", 10, 0, 0));
    }
    ledger.flush().unwrap();
    let totals = ledger.totals();
    assert!(totals.dropped > 0, "{totals:?}");
    assert_eq!(totals.requests + totals.dropped, 2000, "every record is written or counted as dropped");
    // Every record may have been dropped, and then the task does not exist.
    let written = ledger.task("default", "flood", true).unwrap().map_or(0, |task| task.requests);
    assert_eq!(written, totals.requests);
}

#[test]
fn damaged_database_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let config = ledger_config(Some(token_price()));
    {
        let ledger = open(dir.path(), &config);
        ledger.record(request("default", "lost", 10, 0, 0));
        ledger.flush().unwrap();
        ledger.db.flush_cf(db::family(&ledger.db, db::TASKS)).unwrap();
    }
    for entry in std::fs::read_dir(dir.path().join("ledger")).unwrap().filter_map(Result::ok) {
        if entry.path().extension().is_some_and(|ext| ext == "sst") {
            let mut bytes = std::fs::read(entry.path()).unwrap();
            bytes[0] ^= 0x01;
            std::fs::write(entry.path(), bytes).unwrap();
        }
    }

    let ledger = Ledger::open(&config, dir.path(), Arc::new(Costs::default())).expect("a damaged ledger is replaced, not fatal");
    assert!(ledger.task("default", "lost", false).unwrap().is_none());
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().filter_map(Result::ok).map(|entry| entry.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|name| name.starts_with("ledger.damaged-")), "{names:?}");
    ledger.record(request("default", "new", 10, 0, 0));
    assert_eq!(report(&ledger, "default", "new").requests, 1);
}

#[test]
fn task_id_from_header_or_generated() {
    let config = ledger_config(None);
    let mut headers = http::HeaderMap::new();
    assert!(task_id(&headers, &config).unwrap().is_generated());

    headers.insert("x-task-id", http::HeaderValue::from_static("build-42"));
    let id = task_id(&headers, &config).unwrap();
    assert_eq!((id.as_str(), id.is_generated()), ("build-42", false));

    headers.append("x-task-id", http::HeaderValue::from_static("other"));
    let error = task_id(&headers, &config).unwrap_err();
    assert_eq!(error.to_string(), "header x-task-id appears more than once; send exactly one task id");

    let long = "t".repeat(MAX_TASK_ID_LEN + 1);
    for bad in ["", "two words", long.as_str()] {
        headers.insert("x-task-id", http::HeaderValue::from_str(bad).unwrap());
        let error = task_id(&headers, &config).unwrap_err();
        assert!(matches!(error, TaskIdError::InvalidHeader { .. }), "{bad:?}");
        let api = crate::error::ApiError::from(error);
        assert_eq!((api.status.as_u16(), api.param.as_deref()), (400, Some("x-task-id")), "{bad:?}");
    }
    headers.insert("x-task-id", http::HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap());
    assert!(task_id(&headers, &config).is_err());
    assert!(TaskId::parse(&"t".repeat(MAX_TASK_ID_LEN)).is_ok());
}

fn config_issues(file: Option<&str>, variables: &[(&str, &str)]) -> Vec<ConfigIssue> {
    let dir = tempfile::tempdir().unwrap();
    let config_file = file.map(|text| {
        let path = dir.path().join("kvsidecar.toml");
        std::fs::write(&path, text).unwrap();
        path
    });
    let environment = variables.iter().map(|(name, value)| (name.to_string(), value.to_string()));
    match crate::config::load(&Overrides { config_file, ..Overrides::default() }, environment) {
        Err(ConfigError::Invalid(issues)) => issues,
        other => panic!("expected invalid configuration, got {other:?}"),
    }
}

fn issue<'a>(issues: &'a [ConfigIssue], path: &str) -> &'a ConfigIssue {
    issues.iter().find(|issue| issue.path == path).unwrap_or_else(|| panic!("no issue for {path} in {issues:?}"))
}

#[test]
fn config_prices_parse_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvsidecar.toml");
    let text = "[ledger.price]\ninput_per_million = 0.15\ncached_input_per_million = 2\noutput_per_million = \"0.000001\"\n\
                [ledger.models.\"qwen2.5-7b\"]\nengine_per_hour = 1.2\ndecode_tokens_per_second = 42.5\n";
    std::fs::write(&path, text).unwrap();
    let config = crate::config::load(&Overrides { config_file: Some(path.clone()), ..Overrides::default() }, [("KVSIDECAR_LEDGER_CURRENCY".to_string(), "EUR".to_string())]).unwrap();
    assert_eq!(config.ledger.price, Some(Price::Tokens { input: Micros(150_000), cached_input: Micros(2_000_000), output: Micros(1) }));
    assert_eq!(
        config.ledger.models["qwen2.5-7b"],
        Price::Hourly { engine_per_hour: Micros(1_200_000), prefill_tokens_per_second: None, decode_tokens_per_second: Some(Micros(42_500_000)) }
    );
    assert_eq!(config.ledger.currency, "EUR");
    assert_eq!(config.ledger.retention, Duration::from_secs(30 * 24 * 3600));

    // The rendered configuration loads back equal.
    std::fs::write(&path, config.to_toml()).unwrap();
    let reloaded = crate::config::load(&Overrides { config_file: Some(path), ..Overrides::default() }, std::iter::empty()).unwrap();
    assert_eq!(reloaded.ledger, config.ledger);
}

#[test]
fn config_errors_name_key_and_value() {
    let found = config_issues(
        None,
        &[
            ("KVSIDECAR_LEDGER_PRICE_INPUT_PER_MILLION", "0.1234567"),
            ("KVSIDECAR_LEDGER_PRICE_OUTPUT_PER_MILLION", "-1"),
            ("KVSIDECAR_LEDGER_TASK_HEADER", "X-Task-Id"),
            ("KVSIDECAR_LEDGER_RETENTION", "500ms"),
            ("KVSIDECAR_LEDGER_CURRENCY", "US-D"),
        ],
    );
    let input = issue(&found, "ledger.price.input_per_million");
    assert_eq!(input.value, "\"0.1234567\"");
    assert!(input.rule.contains("more than 6 decimal places"), "{input}");
    assert!(issue(&found, "ledger.price.output_per_million").rule.starts_with("is negative"));
    assert!(issue(&found, "ledger.price.cached_input_per_million").rule.starts_with("missing"));
    assert!(issue(&found, "ledger.task_header").rule.contains("lowercase"));
    assert!(issue(&found, "ledger.retention").rule.contains("at least 1s"));
    assert_eq!(issue(&found, "ledger.currency").value, "\"US-D\"");

    let mixed = config_issues(Some("[ledger.price]\ninput_per_million = 1\ncached_input_per_million = 1\noutput_per_million = 1\nengine_per_hour = 2\n"), &[]);
    assert!(issue(&mixed, "ledger.price.engine_per_hour").rule.contains("not both"));

    let models = config_issues(
        Some("[ledger.models.m]\nengine_per_hour = 1\nprefill_tokens_per_second = 0\ncolour = 1\n[ledger.models.qwen2.5]\nengine_per_hour = 1\n"),
        &[],
    );
    assert!(issue(&models, "ledger.models.\"m\".prefill_tokens_per_second").rule.contains("above 0"));
    assert!(issue(&models, "ledger.models.\"m\".colour").rule.starts_with("unknown key"));
    assert!(issue(&models, "ledger.models.\"qwen2\".5").rule.contains("quote a model name"));

    let header = config_issues(None, &[("KVSIDECAR_LEDGER_TASK_HEADER", "x-kvsidecar-tenant"), ("KVSIDECAR_LEDGER_RETENTION", "soon"), ("KVSIDECAR_LEDGER_COLOUR", "red")]);
    assert!(issue(&header, "ledger.task_header").rule.contains("request.tenant_header"));
    assert!(issue(&header, "ledger.retention").rule.contains("duration"));
    assert!(issue(&header, "ledger.colour").rule.contains("unknown key in [ledger]"));
}

#[test]
fn tasks_table_aligns_columns() {
    let listing: command::Listing = serde_json::from_value(serde_json::json!({
        "by": "cost",
        "currency": "USD",
        "tasks": [
            {"task": "build-42", "tenant": "default", "requests": 3, "prompt_tokens": 1235574, "cached_tokens": 1000600, "output_tokens": 203,
             "ttft_mean_ms": 40.0, "cost_served": "0.1104129", "cost_uncached": "0.1854579", "cost_saved": "0.075045"},
            {"task": "req-00ff", "tenant": "acme", "requests": 1, "prompt_tokens": 7, "cached_tokens": 0, "output_tokens": 3,
             "ttft_mean_ms": 12.25, "cost_served": "0.00000285", "cost_uncached": "0.00000285", "cost_saved": "0.0"}
        ],
        "totals": {"requests": 4, "cost_served": "0.11041575", "cost_saved": "0.075045", "dropped": 0, "failed": 0}
    }))
    .unwrap();
    let expected = "\
task      tenant   requests   prompt   cached  output  ttft ms  served USD  uncached USD  saved USD
build-42  default         3  1235574  1000600     203     40.0   0.1104129     0.1854579   0.075045
req-00ff  acme            1        7        0       3     12.2  0.00000285    0.00000285        0.0

since the sidecar started: 4 requests, served 0.11041575 USD, saved 0.075045 USD, 0 records dropped, 0 failed to write
";
    assert_eq!(command::table(&listing), expected);
    assert_eq!(command::admin_url("0.0.0.0:9090".parse().unwrap()), "http://127.0.0.1:9090");
    assert_eq!(command::admin_url("[::]:9090".parse().unwrap()), "http://[::1]:9090");
}

//! The cost-per-task ledger seen by a client: a scripted task with known token counts and
//! per-token prices, its figures after a restart, and their agreement with `/metrics`.

use std::time::Duration;

use kvsidecar_tests::{Engine, Reply, Sidecar, SidecarSpec, Workspace, get, send, tokens};
use serde_json::{Value, json};

/// Prices in micro-units per million tokens, which is pico-units per token.
const INPUT: u64 = 150_000;
const CACHED_INPUT: u64 = 75_000;
const OUTPUT: u64 = 600_000;
const GENERATED: u64 = 4;

fn priced(mut spec: SidecarSpec) -> SidecarSpec {
    spec.env.extend([
        ("KVSIDECAR_LEDGER_PRICE_INPUT_PER_MILLION".to_string(), "0.15".to_string()),
        ("KVSIDECAR_LEDGER_PRICE_CACHED_INPUT_PER_MILLION".to_string(), "0.075".to_string()),
        ("KVSIDECAR_LEDGER_PRICE_OUTPUT_PER_MILLION".to_string(), "0.6".to_string()),
    ]);
    spec
}

/// Sends a native completion of `prompt` that generates exactly `GENERATED` tokens, in `task`.
async fn complete(sidecar: &Sidecar, prompt: &[u32], task: Option<&str>) -> Reply {
    let body = json!({"prompt": prompt, "n_predict": GENERATED, "ignore_eos": true, "temperature": 0.0});
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(task.map(|task| ("x-task-id", task)));
    let reply = send(http::Method::POST, &format!("{}/completion", sidecar.url), body.to_string().into(), &headers).await.expect("completion request");
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    reply
}

/// Formats pico-units as the ledger writes amounts: a decimal with trailing zeros trimmed and at
/// least one decimal place.
fn amount(pico: u64) -> String {
    let text = format!("{}.{:012}", pico / 1_000_000_000_000, pico % 1_000_000_000_000);
    let trimmed = text.trim_end_matches('0');
    if trimmed.ends_with('.') { format!("{trimmed}0") } else { trimmed.to_string() }
}

/// Returns the value of the sample `name` (with its labels, if any) in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|line| line.split(' ').next() == Some(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// Waits until the ledger lists `task` with `requests` requests.
async fn task_report(sidecar: &Sidecar, task: &str, requests: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(&format!("{}/v1/tasks/{task}", sidecar.url)).await.unwrap();
        if reply.status == 200 && reply.json()["requests"].as_u64() == Some(requests) {
            return reply.json();
        }
        assert!(std::time::Instant::now() < deadline, "task {task} not recorded: {} {}", reply.status, String::from_utf8_lossy(&reply.body));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn scripted_task_costs_exactly() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let spec = priced(ws.sidecar(&engine));
    let mut sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();

    // A miss, a slot hit of the same prompt, and a longer prompt that extends it.
    let prompt = tokens(71, 600);
    let mut longer = prompt.clone();
    longer.extend(tokens(72, 100));
    let replies = [
        complete(&sidecar, &prompt, Some("script-1")).await,
        complete(&sidecar, &prompt, Some("script-1")).await,
        complete(&sidecar, &longer, Some("script-1")).await,
    ];
    let prompts = [600u64, 600, 700];
    let cached: Vec<u64> = replies.iter().map(|reply| u64::from(reply.cached_tokens())).collect();
    assert_eq!(cached[0], 0);
    assert_eq!(cached[1], 599, "the engine reuses all but the last prompt token");
    assert!(cached[2] >= 576, "the longer prompt reuses the first one: {cached:?}");
    for reply in &replies {
        assert_eq!(reply.header("x-task-id"), Some("script-1"));
        assert_eq!(reply.json()["tokens_predicted"], GENERATED);
    }

    let mut served = 0;
    let mut uncached = 0;
    for (prompt, cached) in prompts.iter().zip(&cached) {
        served += (prompt - cached) * INPUT + cached * CACHED_INPUT + GENERATED * OUTPUT;
        uncached += prompt * INPUT + GENERATED * OUTPUT;
    }
    let report = task_report(&sidecar, "script-1", 3).await;
    let check = |report: &Value| {
        assert_eq!(report["task"], "script-1");
        assert_eq!(report["prompt_tokens"], 1900);
        assert_eq!(report["cached_tokens"], cached.iter().sum::<u64>());
        assert_eq!(report["output_tokens"], 3 * GENERATED);
        assert_eq!(report["currency"], "USD");
        assert_eq!(report["cost_served"], amount(served), "{report}");
        assert_eq!(report["cost_uncached"], amount(uncached), "{report}");
        assert_eq!(report["cost_saved"], amount(uncached - served), "{report}");
        let records = report["records"].as_array().expect("request records");
        assert_eq!(records.len(), 3);
        for (record, (prompt, cached)) in records.iter().zip(prompts.iter().zip(&cached)) {
            assert_eq!(record["prompt_tokens"], *prompt);
            assert_eq!(record["cached_tokens"], *cached);
            assert_eq!(record["cost_served"], amount((prompt - cached) * INPUT + cached * CACHED_INPUT + GENERATED * OUTPUT));
        }
    };
    check(&report);

    // The metrics carry the same totals: this process recorded only this task.
    let metrics = String::from_utf8_lossy(&get(&format!("{}/metrics", sidecar.admin_url)).await.unwrap().body).to_string();
    assert_eq!(sample(&metrics, "kvsidecar_cost_served_total"), served as f64 / 1e12);
    assert_eq!(sample(&metrics, "kvsidecar_cost_uncached_total"), uncached as f64 / 1e12);
    assert_eq!(sample(&metrics, "kvsidecar_cost_saved_total"), (uncached - served) as f64 / 1e12);
    assert_eq!(sample(&metrics, "kvsidecar_prompt_tokens_total"), 1900.0);
    assert_eq!(sample(&metrics, "kvsidecar_output_tokens_total"), (3 * GENERATED) as f64);
    assert_eq!(sample(&metrics, "kvsidecar_ledger_requests_total"), 3.0);

    // Another tenant does not see the task, and a request without a task id is its own task.
    let other = send(http::Method::GET, &format!("{}/v1/tasks/script-1", sidecar.url), bytes::Bytes::new(), &[("x-kvsidecar-tenant", "other")]).await.unwrap();
    assert_eq!(other.status, 404);
    let own = complete(&sidecar, &tokens(73, 40), None).await;
    let generated = own.header("x-task-id").expect("generated task id").to_string();
    assert!(generated.starts_with("req-"), "{generated}");
    task_report(&sidecar, &generated, 1).await;

    // A clean restart keeps every figure.
    let _ = sidecar.terminate();
    drop(sidecar);
    let sidecar = Sidecar::start(&spec, &ws.logs()).await.unwrap();
    check(&task_report(&sidecar, "script-1", 3).await);

    // The CLI reads the same task from the admin API.
    let output = std::process::Command::new(kvsidecar_tests::sidecar_binary())
        .args(["tasks", "--json", "--top", "5", "--admin", &sidecar.admin_url])
        .output()
        .expect("run kvsidecar tasks");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listing: Value = serde_json::from_slice(&output.stdout).expect("JSON listing");
    let listed = listing["tasks"].as_array().unwrap().iter().find(|task| task["task"] == "script-1").expect("script-1 listed").clone();
    assert_eq!(listed["cost_served"], amount(served));
}

#[tokio::test]
async fn invalid_task_header_rejected() {
    let ws = Workspace::new();
    let engine = Engine::start(&ws.tiny_engine(1), &ws.logs()).await.unwrap();
    let sidecar = Sidecar::start(&ws.sidecar(&engine), &ws.logs()).await.unwrap();
    let body = json!({"prompt": tokens(74, 20), "n_predict": 1}).to_string();
    let long = "t".repeat(300);
    for value in ["two words", long.as_str()] {
        let reply = send(http::Method::POST, &format!("{}/completion", sidecar.url), body.clone().into(), &[("x-task-id", value)]).await.unwrap();
        assert_eq!(reply.status, 400, "{value:?}");
        let message = reply.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains("x-task-id"), "{message}");
    }
    let stats = sidecar.stats().await;
    assert_eq!(stats["requests"]["outcome"]["rejected"], 2, "{stats}");
}

//! The cache path of a completion request. The steps run in this order: parse, identify the
//! prefix, pick a slot, restore a stored snapshot when it beats the slot, forward, stream back,
//! and schedule a snapshot of the slot after the response.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kvsidecar_sdk::{AdmissionCandidate, Candidate, CandidateKind, Request as RouteRequest, Tier};
use opentelemetry::trace::{FutureExt as _, SpanKind};
use opentelemetry::{Context, KeyValue};
use tracing::Instrument as _;

use super::body::{StreamEnd, TrackedBody};
use super::observe::{Ending, ObservedBody, Usage};
use super::{ResponseBody, full, strip_hop_by_hop};
use crate::app::{App, CacheSource, Counters, Ready};
use crate::engine::http_client::{full_body, read_limited};
use crate::error::ApiError;
use crate::prefix::{Namespace, block_hashes, common_prefix};
use crate::request::{self, CompletionRequest, Endpoint};
use crate::slots::SlotLease;
use crate::telemetry::{self, trace};
use crate::{restore, snapshot};

/// Response header: prompt tokens the engine did not compute.
pub const CACHED_TOKENS_HEADER: &str = "x-kvsidecar-cached-tokens";
/// Response header: where the reused KV came from (`none`, `slot`, `local`, `peer`).
pub const CACHE_SOURCE_HEADER: &str = "x-kvsidecar-cache-source";
/// Response header: the engine slot that served the request.
pub const SLOT_HEADER: &str = "x-kvsidecar-slot";

/// Largest non-streaming engine response read to find its cache figures.
const MAX_RESPONSE_BODY: usize = 256 << 20;

pub async fn handle(app: Arc<App>, request: Request<Incoming>, endpoint: Endpoint) -> Response<ResponseBody> {
    handle_from(app, request, endpoint, false).await
}

/// Serves a request that a peer forwarded: like `handle`, but never forwarded again.
pub async fn handle_forwarded(app: Arc<App>, request: Request<Incoming>, endpoint: Endpoint) -> Response<ResponseBody> {
    Counters::add(&app.counters.forwarded_in, 1);
    handle_from(app, request, endpoint, true).await
}

async fn handle_from(app: Arc<App>, request: Request<Incoming>, endpoint: Endpoint, forwarded: bool) -> Response<ResponseBody> {
    let started = Instant::now();
    Counters::add(&app.counters.requests, 1);
    let parent = trace::extract(request.headers());
    let route = request.uri().path().to_string();
    let attributes = server_attributes(&request, &route, endpoint, forwarded);
    let cx = trace::start(format!("POST {route}"), SpanKind::Server, &parent, attributes);
    let log_span = tracing::info_span!("request", trace_id = %trace::trace_id(&cx));
    let mut pending = Pending { app: app.clone(), cx: cx.clone(), log_span: log_span.clone(), started, forwarded, task: None, done: false };
    let task = match crate::ledger::task_id(request.headers(), &app.config.ledger) {
        Ok(task) => task,
        Err(error) => {
            let error = ApiError::from(error);
            pending.rejected(&error);
            return error.into_response();
        }
    };
    trace::set(&cx, || vec![KeyValue::new("kvsidecar.task.id", task.as_str().to_string())]);
    pending.task = Some(task.clone());

    let served_by = app.fleet.as_ref().map(|fleet| HeaderValue::from_str(&fleet.identity.node_id).unwrap_or(HeaderValue::from_static("")));
    let mut response = match serve(&app, request, endpoint, forwarded, &task).with_context(cx).instrument(log_span.clone()).await {
        Ok(response) => response,
        Err(error) => {
            let _entered = log_span.enter();
            Counters::add(&app.counters.requests_failed, 1);
            // Plugin failures are logged by the plugin host, rate-limited.
            if error.status.is_server_error() && error.code != "policy_failed" {
                tracing::warn!(endpoint = endpoint.as_str(), http.status = error.status.as_u16(), error = %error.message, "completion request failed");
            } else {
                tracing::debug!(endpoint = endpoint.as_str(), http.status = error.status.as_u16(), error = %error.message, "completion request rejected");
            }
            pending.rejected(&error);
            return error.into_response();
        }
    };
    if let Some(node) = served_by {
        // A forwarded response already names the peer that served it.
        response.headers_mut().entry(crate::peer::forward::SERVED_BY_HEADER).or_insert(node);
    }
    // The client learns the task its request counts in, generated or not.
    if let Ok(value) = HeaderValue::from_str(task.as_str()) {
        response.headers_mut().insert(app.config.ledger.task_header.clone(), value);
    }
    let served = response.extensions_mut().remove::<Served>();
    let events = response.headers().get(http::header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).is_some_and(|value| value.starts_with("text/event-stream"));
    let status = response.status().as_u16();
    let (head, body) = response.into_parts();
    // A non-streamed response of this node's engine was parsed on the request path already.
    let known = served.as_ref().and_then(|served| served.usage);
    let on_end = move |ending| pending.finish(served, ending, status, events);
    let observed = match known {
        Some(usage) => ObservedBody::with_usage(body, usage, on_end),
        None => ObservedBody::new(body, events, on_end),
    };
    Response::from_parts(head, observed.boxed())
}

/// Attributes of a completion request's server span, known before its body is read.
fn server_attributes(request: &Request<Incoming>, route: &str, endpoint: Endpoint, forwarded: bool) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("http.request.method", "POST"),
        KeyValue::new("http.route", route.to_string()),
        KeyValue::new("url.path", route.to_string()),
        KeyValue::new("url.scheme", "http"),
        KeyValue::new("network.protocol.version", if request.version() == http::Version::HTTP_2 { "2" } else { "1.1" }),
        KeyValue::new("gen_ai.operation.name", operation(endpoint)),
        KeyValue::new("kvsidecar.forwarded", forwarded),
    ];
    if let Some(agent) = request.headers().get(http::header::USER_AGENT).and_then(|value| value.to_str().ok()) {
        attributes.push(KeyValue::new("user_agent.original", agent.chars().take(256).collect::<String>()));
    }
    if let Some(host) = request.headers().get(http::header::HOST).and_then(|value| value.to_str().ok()).and_then(|host| host.parse::<http::uri::Authority>().ok()) {
        attributes.push(KeyValue::new("server.address", host.host().to_string()));
        if let Some(port) = host.port_u16() {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
    }
    attributes
}

/// Returns the GenAI operation name of an endpoint.
fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat",
        Endpoint::Completions | Endpoint::NativeCompletion => "text_completion",
    }
}

/// The request path's figures of a response, passed to its end through the response's
/// extensions.
#[derive(Debug, Clone)]
struct Served {
    /// Prompt tokens as this node counted them; 0 for a batch.
    prompt_tokens: u64,
    /// Reused prompt tokens as planned, or as the engine reported for a non-streamed response.
    cached_tokens: u64,
    source: CacheSource,
    /// Node id of the peer that served the request; None when this node's engine did.
    peer: Option<String>,
    slot: Option<u32>,
    tenant: String,
    model: String,
    /// The engine's figures, when the request path parsed the whole response body.
    usage: Option<Usage>,
}

/// A request between its arrival and the end of its response. Dropped before either (the client
/// left while the request was planned or waited for its slot), it counts as aborted.
struct Pending {
    app: Arc<App>,
    cx: Context,
    log_span: tracing::Span,
    started: Instant,
    /// Whether a peer forwarded the request: the peer counts it, its time and its cost.
    forwarded: bool,
    /// The task the ledger records the request in; None until the task header is read.
    task: Option<crate::ledger::TaskId>,
    done: bool,
}

impl Pending {
    /// Ends a request that got an error response.
    fn rejected(mut self, error: &ApiError) {
        self.done = true;
        let outcome = if error.status.is_server_error() { "failed" } else { "rejected" };
        if !self.forwarded {
            let counters = &self.app.counters;
            Counters::add(if error.status.is_server_error() { &counters.failed } else { &counters.rejected }, 1);
            telemetry::instruments().request_duration(self.started.elapsed(), outcome);
        }
        trace::set(&self.cx, || vec![KeyValue::new("http.response.status_code", i64::from(error.status.as_u16()))]);
        if error.status.is_server_error() {
            trace::fail(&self.cx, error.status.as_u16().to_string(), error.message.clone());
        } else {
            trace::set(&self.cx, || vec![KeyValue::new("error.type", error.status.as_u16().to_string())]);
        }
        trace::end(&self.cx);
    }

    /// Ends a request whose response body ended as `ending` describes.
    fn finish(mut self, served: Option<Served>, ending: Ending, status: u16, events: bool) {
        self.done = true;
        let _entered = self.log_span.enter();
        let app = &self.app;
        let usage = ending.usage;
        let served = served.unwrap_or_else(|| Served {
            prompt_tokens: 0,
            cached_tokens: 0,
            source: CacheSource::None,
            peer: None,
            slot: None,
            tenant: app.config.request.default_tenant.clone(),
            model: String::new(),
            usage: None,
        });
        let prompt = usage.prompt_tokens.unwrap_or(served.prompt_tokens);
        // The engine's own count is the truth; the plan is the fallback when it reported none.
        let cached = usage.cached_tokens.unwrap_or(served.cached_tokens).min(prompt);
        let source = if cached == 0 { CacheSource::None } else { served.source };
        let output = usage.output_tokens.unwrap_or(0);
        let outcome = if ending.completed { "completed" } else { "aborted" };

        if served.peer.is_none() {
            // The engine work is counted where it ran.
            record(app, source, prompt, cached, output);
        }
        let ttft = time_to_first_token(self.started, &ending, events);

        // The node the client called records the request's cost; a peer that served it does not.
        if let (false, Some(ledger), Some(task)) = (self.forwarded, &app.ledger, self.task.take()) {
            ledger.record(crate::ledger::RequestRecord {
                tenant: served.tenant.clone(),
                task,
                model: served.model.clone(),
                unix_ms: crate::store::now_ms(),
                cache_source: source,
                served_by: served.peer.clone(),
                prompt_tokens: prompt,
                cached_tokens: cached,
                output_tokens: output,
                ttft: ttft.unwrap_or_else(|| ending.ended.duration_since(self.started)),
                prefill_ms: usage.prompt_ms,
                decode_ms: usage.generation_ms,
            });
        }

        if !self.forwarded {
            Counters::add(if ending.completed { &app.counters.completed } else { &app.counters.aborted }, 1);
            let instruments = telemetry::instruments();
            instruments.request_duration(ending.ended.duration_since(self.started), outcome);
            if let Some(ttft) = ttft {
                instruments.time_to_first_token(ttft, cached > 0);
            }
        }
        trace::set(&self.cx, || {
            let figures = Figures { status, prompt, cached, output, source, ttft };
            figures.attributes(&served)
        });
        if !ending.completed {
            trace::fail(&self.cx, "aborted", "the client left or the response stream broke before its end");
        }
        trace::end(&self.cx);
        tracing::info!(
            outcome,
            prompt.tokens = prompt,
            cache.tokens = cached,
            cache.source = source.as_str(),
            output.tokens = output,
            ttft_ms = ttft.map(|ttft| ttft.as_secs_f64() * 1000.0),
            served_by = served.peer.as_deref(),
            "request finished"
        );
    }
}

/// The end figures of a request, as its server span shows them.
#[derive(Clone, Copy)]
struct Figures {
    status: u16,
    prompt: u64,
    cached: u64,
    output: u64,
    source: CacheSource,
    ttft: Option<Duration>,
}

impl Figures {
    fn attributes(&self, served: &Served) -> Vec<KeyValue> {
        let Figures { status, prompt, cached, output, source, ttft } = *self;
        let mut attributes = vec![
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("gen_ai.usage.input_tokens", prompt as i64),
            KeyValue::new("gen_ai.usage.output_tokens", output as i64),
            KeyValue::new("kvsidecar.cache.source", source.as_str()),
            KeyValue::new("kvsidecar.cache.cached_tokens", cached as i64),
            KeyValue::new("kvsidecar.cache.computed_tokens", prompt.saturating_sub(cached) as i64),
        ];
        if let Some(ttft) = ttft {
            attributes.push(KeyValue::new("kvsidecar.time_to_first_token", ttft.as_secs_f64()));
        }
        if let Some(peer) = &served.peer {
            attributes.push(KeyValue::new("kvsidecar.served_by", peer.clone()));
        }
        if let Some(slot) = served.slot {
            attributes.push(KeyValue::new("kvsidecar.slot", i64::from(slot)));
        }
        attributes
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if !self.forwarded {
            Counters::add(&self.app.counters.aborted, 1);
            telemetry::instruments().request_duration(self.started.elapsed(), "aborted");
        }
        trace::fail(&self.cx, "aborted", "the client left before the response");
        trace::end(&self.cx);
    }
}

/// Returns the time from the request's arrival to its first token. For a stream that is the
/// first body frame. A non-streamed body arrives whole, so the engine's generation time after
/// the first token is taken off its arrival time.
fn time_to_first_token(started: Instant, ending: &Ending, events: bool) -> Option<Duration> {
    let first = ending.first_frame?;
    let arrived = first.duration_since(started);
    let after_first = match (ending.usage.generation_ms, ending.usage.output_tokens) {
        (Some(ms), Some(tokens)) if !events && tokens > 1 => {
            Duration::from_secs_f64((ms.max(0.0) / 1000.0) * (tokens - 1) as f64 / tokens as f64)
        }
        _ => Duration::ZERO,
    };
    Some(arrived.saturating_sub(after_first))
}

/// Request header: a namespace listed in `request.shared_namespaces`, whose cached prefixes
/// every tenant shares.
pub const NAMESPACE_HEADER: &str = "x-kvsidecar-namespace";

/// Source of a request's KV, as the router chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvSource {
    /// The serving slot's own prefix.
    Slot,
    /// A snapshot from the local store, restored into the serving slot.
    Store,
    /// A snapshot pulled from peer number `n` of the routing candidates.
    Peer(usize),
    /// Nothing: the engine computes the whole prompt.
    Compute,
    /// The built-in rule, for a slot the client chose.
    Builtin,
}

/// A peer as a routing candidate: its load and URL, and its longest prefix of the prompt in its
/// store (which a pull can bring here) and in its engine slots.
struct PeerOption {
    load: crate::peer::PeerLoad,
    found: crate::peer::index::PeerMatch,
}

/// Place where a request runs.
enum Routed {
    /// On an engine slot here, with its KV from `kv`.
    Local { slot: u32, kv: KvSource },
    /// On peer number `n`, by forwarding.
    Forward(usize),
}

/// Returns the fleet's live peers as routing candidates for a prompt with block hashes `hashes`,
/// with each peer's longest match.
fn peer_options(app: &App, ready: &Ready, hashes: &[crate::prefix::Digest]) -> Vec<PeerOption> {
    let Some(fleet) = app.fleet.as_ref() else { return Vec::new() };
    // Only peers whose engine runs the same model with the same KV settings can serve the
    // request or provide its KV.
    let fingerprint = ready.info.fingerprint.to_hex();
    fleet
        .peers
        .routable()
        .into_iter()
        .filter(|load| load.fingerprint.as_deref() == Some(fingerprint.as_str()))
        .map(|load| PeerOption { found: fleet.index.matches(&load.url, hashes), load })
        .collect()
}

/// Asks the router policy where the request runs and where its KV comes from. The policy runs on
/// the blocking pool: a plugin call may run up to `plugins.deadline`, which must not hold up the
/// async workers (and with them the engine health checks).
#[allow(clippy::too_many_arguments)]
async fn route(
    app: &App,
    ready: &Ready,
    task: &crate::ledger::TaskId,
    parsed: &CompletionRequest,
    tokens: &[u32],
    namespace: &Namespace,
    tenant: &str,
    stored: usize,
    peers: &[PeerOption],
) -> Result<Routed, ApiError> {
    let step = trace::Step::start("kvsidecar.route");
    let views = ready.slots.views(tokens, namespace);
    if views.is_empty() {
        return Err(ApiError::not_ready("the engine reports no slots"));
    }
    let prompt = tokens.len() as u64;
    let block = app.config.prefix.block_tokens.get() as u64;
    let mut candidates: Vec<Candidate> = views
        .iter()
        .map(|view| Candidate {
            id: view.slot,
            kind: CandidateKind::EngineSlot,
            matched_tokens: view.common as u32,
            resident_tokens: view.resident as u32,
            tier: Tier::Device,
            in_flight: u32::from(view.busy),
            queue_depth: view.waiting,
            healthy: true,
            transfer_cost_ms: 0.0,
            recompute_cost_ms: app.costs.recompute_ms(prompt.saturating_sub(view.common as u64)),
        })
        .collect();
    if stored > 0 {
        candidates.push(Candidate {
            id: 0,
            kind: CandidateKind::LocalStore,
            matched_tokens: stored as u32,
            resident_tokens: stored as u32,
            tier: Tier::Disk,
            in_flight: 0,
            queue_depth: 0,
            healthy: true,
            transfer_cost_ms: app.costs.restore_ms(stored as u64),
            recompute_cost_ms: app.costs.recompute_ms(prompt.saturating_sub(stored as u64)),
        });
    }
    // Each peer is offered once per tier that contains part of the prompt: its engine slots
    // (device: it can serve, but its KV cannot move) and its store (remote: it can serve, or send
    // its snapshot). A peer with no match is offered once, for its load.
    let mut peer_of_candidate: Vec<(usize, usize)> = Vec::new();
    for (number, option) in peers.iter().enumerate() {
        let found = option.found;
        let base = Candidate {
            id: number as u32,
            kind: CandidateKind::Peer,
            matched_tokens: 0,
            resident_tokens: 0,
            tier: Tier::Remote,
            in_flight: option.load.busy_slots.min(u64::from(u32::MAX)) as u32,
            queue_depth: 0,
            healthy: option.load.engine_ready,
            transfer_cost_ms: f64::INFINITY,
            recompute_cost_ms: app.costs.recompute_ms(prompt),
        };
        let slot_tokens = (found.slot as u64 * block).min(prompt);
        let stored_tokens = (found.stored as u64 * block).min(prompt);
        if slot_tokens > 0 {
            peer_of_candidate.push((candidates.len(), number));
            candidates.push(Candidate {
                matched_tokens: slot_tokens as u32,
                resident_tokens: slot_tokens as u32,
                tier: Tier::Device,
                recompute_cost_ms: app.costs.recompute_ms(prompt - slot_tokens),
                ..base.clone()
            });
        }
        if stored_tokens > 0 || slot_tokens == 0 {
            peer_of_candidate.push((candidates.len(), number));
            candidates.push(Candidate {
                matched_tokens: stored_tokens as u32,
                resident_tokens: stored_tokens as u32,
                tier: Tier::Remote,
                transfer_cost_ms: if stored_tokens > 0 { app.costs.pull_ms(stored_tokens) } else { f64::INFINITY },
                recompute_cost_ms: app.costs.recompute_ms(prompt - stored_tokens),
                ..base
            });
        }
    }
    // A generated id names a one-request task, which gives the router no information.
    let task_id = (!task.is_generated()).then(|| task.as_str().to_string());
    let request = RouteRequest {
        namespace: namespace.0.to_hex(),
        prompt_tokens: tokens.len() as u32,
        task_id,
        tenant: tenant.to_string(),
        model: parsed.model.clone().unwrap_or_else(|| ready.info.model_id.clone()),
    };
    let plugins = app.plugins.clone();
    let offered = candidates.clone();
    let plan = tokio::task::spawn_blocking(move || plugins.router.route(&request, &offered))
        .await
        .map_err(|error| ApiError::internal(format!("router task failed: {error}")))?
        .map_err(|error| ApiError::policy_failed(&error))?;
    let peer_at = |index: usize| peer_of_candidate.iter().find(|(at, _)| *at == index).map(|(_, number)| *number);
    let serve = plan.choice.serve;
    step.set(|| {
        let figures = app.plugins.router.plugin.figures();
        vec![
            KeyValue::new("kvsidecar.plugin.name", figures.name),
            KeyValue::new("kvsidecar.plugin.version", figures.version),
            KeyValue::new("kvsidecar.route.decider", format!("{:?}", plan.decider).to_ascii_lowercase()),
            KeyValue::new("kvsidecar.route.candidates", candidates.len() as i64),
            KeyValue::new("kvsidecar.route.peer_candidates", peer_of_candidate.len() as i64),
        ]
    });
    if let Some(number) = peer_at(serve) {
        step.set(|| vec![KeyValue::new("kvsidecar.route.decision", "forward"), KeyValue::new("kvsidecar.route.peer", peers[number].load.node_id.clone())]);
        return Ok(Routed::Forward(number));
    }
    let slot = views.get(serve).map(|view| view.slot).ok_or_else(|| ApiError::internal(format!("router chose candidate {serve}, which is not a slot")))?;
    let kv = match plan.choice.kv_source {
        None => KvSource::Compute,
        Some(index) if index == serve => KvSource::Slot,
        Some(index) => match peer_at(index) {
            // KV held only in a peer's engine slot cannot be sent.
            Some(_) if !candidates[index].transfer_cost_ms.is_finite() => KvSource::Compute,
            Some(number) => KvSource::Peer(number),
            None => KvSource::Store,
        },
    };
    step.set(|| {
        let source = match kv {
            KvSource::Slot => "slot",
            KvSource::Store => "local",
            KvSource::Peer(_) => "peer",
            KvSource::Compute | KvSource::Builtin => "none",
        };
        vec![KeyValue::new("kvsidecar.route.decision", "local"), KeyValue::new("kvsidecar.route.slot", i64::from(slot)), KeyValue::new("kvsidecar.route.kv_source", source)]
    });
    Ok(Routed::Local { slot, kv })
}

/// The cache path's decision for one request.
struct Plan {
    tokens: Vec<u32>,
    namespace: Namespace,
    tenant: String,
    source: CacheSource,
    /// Prompt tokens the engine is expected to take from the slot.
    cached: u32,
    /// Prompt tokens already covered by a stored snapshot (block-aligned).
    stored: usize,
}

async fn serve(app: &Arc<App>, request: Request<Incoming>, endpoint: Endpoint, forwarded: bool, task: &crate::ledger::TaskId) -> Result<Response<ResponseBody>, ApiError> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();

    // Parse: bounded body, valid JSON, the fields the cache depends on.
    let limit = app.config.server.max_body.as_u64();
    let within = app.config.server.body_timeout;
    let bytes = tokio::time::timeout(within, read_limited(body, limit as usize + 1))
        .await
        .map_err(|_| ApiError::body_timeout(within))?
        .map_err(|_| ApiError::body_too_large(limit))?;
    if bytes.len() as u64 > limit {
        return Err(ApiError::body_too_large(limit));
    }
    let mut parsed = request::parse(endpoint, &bytes)?;
    let ready = app.ready().ok_or_else(|| app.not_ready_error())?;
    trace::set(&Context::current(), || {
        let model = parsed.model.clone().unwrap_or_else(|| ready.info.model_id.clone());
        vec![KeyValue::new("gen_ai.request.model", model), KeyValue::new("gen_ai.request.stream", parsed.stream)]
    });
    let model = priced_model(app, &ready);
    check_model(app, &ready, parsed.model.as_deref())?;
    if let Some(slot) = parsed.requested_slot.filter(|slot| !ready.slots.contains(*slot)) {
        return Err(ApiError::invalid_value(
            "id_slot",
            format!("invalid id_slot {slot}: the engine has {} slots, numbered from 0", ready.slots.len()),
        ));
    }
    let tenant = if forwarded { forwarded_tenant(app, &parts.headers)? } else { tenant_of(app, &parts.headers)? };
    if !parsed.single_prompt {
        return forward_uncached(app, parsed, tenant).await;
    }

    // Prefix: the engine's own tokens, hashed in chained blocks under the request's namespace.
    let step = trace::Step::start("kvsidecar.prefix");
    let tokens = app.engine.prompt_tokens(endpoint, &parsed.body).await.map_err(|error| ApiError::from_engine(&error))?;
    if let Some(bad) = tokens.iter().find(|token| **token >= ready.info.n_vocab) {
        return Err(ApiError::invalid_value("prompt", format!("invalid token id {bad} in 'prompt': the model's vocabulary has {} tokens", ready.info.n_vocab)));
    }
    let namespace = Namespace::new(&ready.info.fingerprint, &cache_owner(app, &parts.headers, &tenant)?, parsed.cache_salt.as_deref());
    let block = app.config.prefix.block_tokens.get() as usize;
    let hashes = block_hashes(&namespace, &tokens, block);
    let snapshots_enabled = ready.info.snapshots_disabled.is_none();
    let stored_match = if snapshots_enabled { app.store.longest_prefix(&hashes).map_err(|error| ApiError::internal(error.to_string()))? } else { None };
    let stored = stored_match.map(|found| found.blocks as usize * block).unwrap_or(0);
    step.set(|| {
        vec![
            KeyValue::new("kvsidecar.prompt.tokens", tokens.len() as i64),
            KeyValue::new("kvsidecar.prefix.blocks", hashes.len() as i64),
            KeyValue::new("kvsidecar.store.matched_tokens", stored as i64),
        ]
    });
    drop(step);

    // Route: the router policy picks the serving slot and the KV source among the slots and
    // the store. A slot the client pinned with id_slot keeps the built-in rule: restore when the
    // store contains at least snapshot.restore_min_gain more tokens than the slot.
    let min_gain = app.config.snapshot.restore_min_gain as usize;
    // Peers are candidates unless the request came from one or pins a slot here.
    let peers = if forwarded || parsed.requested_slot.is_some() || !snapshots_enabled { Vec::new() } else { peer_options(app, &ready, &hashes) };
    let (slot, kv) = match parsed.requested_slot {
        Some(slot) => (slot, KvSource::Builtin),
        None => match route(app, &ready, task, &parsed, &tokens, &namespace, &tenant, stored, &peers).await? {
            Routed::Local { slot, kv } => (slot, kv),
            Routed::Forward(number) => {
                let peer = &peers[number].load;
                match forward_to_peer(app, peer, endpoint, &parts.headers, &tenant, bytes.clone(), tokens.len() as u64, &model).await {
                    Some(response) => return Ok(response),
                    // Served here, as the router would have chosen among this node's slots.
                    None => match route(app, &ready, task, &parsed, &tokens, &namespace, &tenant, stored, &[]).await? {
                        Routed::Local { slot, kv } => (slot, kv),
                        Routed::Forward(_) => return Err(ApiError::internal("the router chose a peer among none".into())),
                    },
                }
            }
        },
    };
    let lease = ready.slots.acquire(slot).await.ok_or_else(|| ApiError::internal(format!("slot {slot} vanished")))?;

    // Restore: the slot's contents may have changed while waiting, so the store is used only
    // when it still contains more of the prompt than the slot.
    let mut reusable = ready.slots.reusable_by(slot, &namespace);
    let mut common = if reusable { common_prefix(&ready.slots.tokens(slot), &tokens) } else { 0 };
    let mut source = CacheSource::Slot;
    let restore_wanted = match kv {
        KvSource::Builtin => stored > common + min_gain,
        KvSource::Store => stored > common,
        KvSource::Slot | KvSource::Peer(_) => false,
        KvSource::Compute => {
            reusable = false;
            false
        }
    };
    // A pull whose estimated transfer takes longer than computing the same tokens is skipped,
    // whatever the router chose: the estimates follow measured link and prefill speeds.
    let pull_worth = |number: usize| {
        let stored = (peers[number].found.stored * block) as u64;
        let worth = app.costs.pull_ms(stored) < app.costs.recompute_ms(stored.saturating_sub(common as u64));
        if !worth {
            Counters::add(&app.counters.pulls_skipped, 1);
        }
        worth
    };
    if let KvSource::Peer(number) = kv
        && peers[number].found.stored * block > common
        && pull_worth(number)
    {
        let blocks = peers[number].found.stored.min(hashes.len());
        let pulled = restore::from_peer(app, &ready, slot, &peers[number].load, &hashes[..blocks], namespace, &tenant).await;
        if let Some(restored) = pulled {
            common = common_prefix(&restored, &tokens);
            source = CacheSource::Peer;
            reusable = true;
        } else {
            reusable = ready.slots.reusable_by(slot, &namespace);
            common = if reusable { common_prefix(&ready.slots.tokens(slot), &tokens) } else { 0 };
        }
    }
    if let Some(found) = stored_match.filter(|_| restore_wanted) {
        if let Some(restored) = restore::into_slot(app, &ready, slot, found, namespace).await {
            common = common_prefix(&restored, &tokens);
            source = CacheSource::Local;
            reusable = true;
        } else {
            // A failed restore may have emptied the slot or left it as it was; read it again.
            reusable = ready.slots.reusable_by(slot, &namespace);
            common = if reusable { common_prefix(&ready.slots.tokens(slot), &tokens) } else { 0 };
        }
    }
    if !reusable {
        // The slot may contain another tenant's or salt's KV, and the engine would reuse any
        // common prefix of it, so this request is computed in full. The router can ask for
        // this too, by naming no KV source.
        disable_prompt_cache(&mut parsed.body);
    }
    let reuse = parsed.body.get("cache_prompt").and_then(serde_json::Value::as_bool).unwrap_or(true);
    let cached = if reuse { common.min(tokens.len().saturating_sub(1)) as u32 } else { 0 };
    if cached == 0 {
        source = CacheSource::None;
    }
    let served_for = (tenant.clone(), model);
    let plan = Plan { tokens, namespace, tenant, source, cached, stored };
    if app.config.log.log_prompts {
        tracing::debug!(slot, tokens = ?plan.tokens, "prompt tokens");
    }
    tracing::debug!(endpoint = endpoint.as_str(), slot, prompt.tokens = plan.tokens.len(), cache.source = source.as_str(), cache.tokens = cached, elapsed_us = started.elapsed().as_micros() as u64, "request planned");

    // Forward, pinned to the slot.
    app.engine.pin_to_slot(&mut parsed.body, slot);
    forward(app, InFlight::new(app, ready, lease, plan), parsed, served_for).await
}

/// Sends the planned request to the engine. `(tenant, model)` are the request's, for its end.
async fn forward(app: &Arc<App>, in_flight: InFlight, parsed: CompletionRequest, (tenant, model): (String, String)) -> Result<Response<ResponseBody>, ApiError> {
    let plan = in_flight.summary();
    // The engine call is a GenAI client span; its end is the end of the engine's response.
    let engine = app.engine.client().base();
    let call = trace::start(
        format!("{} {model}", operation(parsed.endpoint)),
        SpanKind::Client,
        &Context::current(),
        vec![
            KeyValue::new("gen_ai.operation.name", operation(parsed.endpoint)),
            KeyValue::new("gen_ai.request.model", model.clone()),
            KeyValue::new("gen_ai.provider.name", "llama.cpp"),
            KeyValue::new("server.address", engine.host().unwrap_or_default().to_string()),
            KeyValue::new("server.port", i64::from(engine.port_u16().unwrap_or(80))),
            KeyValue::new("gen_ai.usage.input_tokens", plan.prompt_tokens as i64),
            KeyValue::new("kvsidecar.slot", i64::from(plan.slot)),
        ],
    );
    let mut upstream = upstream_request(app, &parsed)?;
    {
        let _attached = call.clone().attach();
        trace::inject_current(upstream.headers_mut());
    }
    let (response, connection) = match app.engine.client().send_cancellable(upstream).await {
        Ok(pair) => pair,
        Err(error) => {
            trace::fail(&call, "engine_unreachable", error.to_string());
            trace::end(&call);
            in_flight.finish(Outcome::Failed);
            return Err(ApiError::from_engine(&error));
        }
    };

    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let success = head.status.is_success();
    trace::set(&call, || vec![KeyValue::new("http.response.status_code", i64::from(head.status.as_u16()))]);
    let served = move |source: CacheSource, cached: u32| Served {
        prompt_tokens: plan.prompt_tokens as u64,
        cached_tokens: u64::from(cached),
        source,
        peer: None,
        slot: Some(plan.slot),
        tenant: tenant.clone(),
        model: model.clone(),
        usage: None,
    };

    if parsed.stream && success {
        // NOTE: stream headers leave before the engine reports its reuse, so they carry the
        // planned count. The engine's own count is in the stream's final event (timings.cache_n).
        set_cache_headers(&mut head.headers, plan.source, plan.cached);
        head.headers.insert(SLOT_HEADER, HeaderValue::from(plan.slot));
        let tracked = TrackedBody::new(body, connection, move |end| {
            if end != StreamEnd::Completed {
                trace::fail(&call, "aborted", "the engine stream ended early or the client left");
            }
            trace::end(&call);
            in_flight.finish(if end == StreamEnd::Completed { Outcome::Completed } else { Outcome::Aborted })
        });
        let mut response = Response::from_parts(head, tracked.boxed());
        response.extensions_mut().insert(served(plan.source, plan.cached));
        return Ok(response);
    }

    // A non-streaming response is one JSON document that the engine sends only when complete, so
    // reading it whole adds no delay and gives the engine's own count of reused tokens.
    let read = read_limited(body, MAX_RESPONSE_BODY).await;
    drop(connection);
    trace::end(&call);
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(detail) => {
            in_flight.finish(Outcome::Failed);
            return Err(ApiError::from_engine(&crate::engine::EngineError::InvalidResponse { path: "completion".into(), detail }));
        }
    };
    if !success {
        in_flight.finish(Outcome::Failed);
        return Err(ApiError::engine_rejected(head.status, &bytes));
    }

    let value: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let reported = value.as_ref().and_then(|value| app.engine.cached_tokens_in_response(value));
    if let Some(timings) = value.as_ref().and_then(|value| value.get("timings")) {
        // llama-server reports the prompt tokens it computed and the time they took.
        if let (Some(computed), Some(ms)) = (timings.get("prompt_n").and_then(serde_json::Value::as_u64), timings.get("prompt_ms").and_then(serde_json::Value::as_f64)) {
            app.costs.observe_prefill(computed, ms);
        }
    }
    let cached = reported.unwrap_or(plan.cached);
    let source = if cached == 0 { CacheSource::None } else { plan.source };
    if reported.is_some_and(|n| n != plan.cached) {
        tracing::debug!(expected = plan.cached, reported = cached, "engine reused a different number of tokens than planned");
    }
    set_cache_headers(&mut head.headers, source, cached);
    head.headers.insert(SLOT_HEADER, HeaderValue::from(plan.slot));
    head.headers.remove(http::header::CONTENT_LENGTH);
    in_flight.finish(Outcome::Completed);
    let mut usage = Usage::default();
    if let Some(value) = &value {
        usage.read(value);
    }
    let mut response = Response::from_parts(head, full(bytes));
    response.extensions_mut().insert(Served { usage: Some(usage), ..served(source, cached) });
    Ok(response)
}

/// A forwarded request that still owns its slot lease. hyper drops the request's future when the
/// client disconnects, and with it this value, which then records the request as aborted and
/// closes the engine connection.
///
/// NOTE: llama-server (llama-cpp-python 0.3.36's tree) polls a non-streaming request's
/// connection about once a second and was seen to miss the close and generate to the end.
/// Streams stop at the engine's next write.
struct InFlight {
    app: Arc<App>,
    ready: Arc<Ready>,
    /// The slot lease and the plan, until `finish` or the drop consumes them.
    pending: Option<(SlotLease, Plan)>,
    summary: PlanSummary,
}

/// The figures of a plan that the response needs, copied so the plan itself can move.
#[derive(Clone, Copy)]
struct PlanSummary {
    slot: u32,
    source: CacheSource,
    cached: u32,
    prompt_tokens: usize,
}

impl InFlight {
    fn new(app: &Arc<App>, ready: Arc<Ready>, lease: SlotLease, plan: Plan) -> InFlight {
        let summary = PlanSummary { slot: lease.slot, source: plan.source, cached: plan.cached, prompt_tokens: plan.tokens.len() };
        InFlight { app: app.clone(), ready, pending: Some((lease, plan)), summary }
    }

    fn summary(&self) -> PlanSummary {
        self.summary
    }

    fn finish(mut self, outcome: Outcome) {
        if let Some((lease, plan)) = self.pending.take() {
            finish(self.app.clone(), self.ready.clone(), lease, plan, outcome);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((lease, plan)) = self.pending.take() {
            tracing::debug!(slot = lease.slot, "client closed the connection before the response; engine request cancelled");
            finish(self.app.clone(), self.ready.clone(), lease, plan, Outcome::Aborted);
        }
    }
}

/// End state of a forwarded request, for the slot table and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The engine finished and the client received everything.
    Completed,
    /// The engine could not be reached, timed out, or rejected the request.
    Failed,
    /// The client went away or the stream broke midway.
    Aborted,
}

/// Counts the engine work of one request: its prompt, reused and generated tokens.
fn record(app: &App, source: CacheSource, prompt_tokens: u64, cached: u64, output: u64) {
    let counters = &app.counters;
    counters.count_source(source);
    Counters::add(&counters.prompt_tokens, prompt_tokens);
    Counters::add(&counters.cached_tokens, cached);
    Counters::add(&counters.output_tokens, output);
    let by_source = match source {
        CacheSource::None => None,
        CacheSource::Slot => Some(&counters.cached_slot),
        CacheSource::Local => Some(&counters.cached_local),
        CacheSource::Peer => Some(&counters.cached_peer),
    };
    if let Some(counter) = by_source {
        Counters::add(counter, cached);
    }
}

/// Runs after the response: records the slot's new contents and, for a long prompt not yet
/// stored, saves the slot as a snapshot off the response path.
fn finish(app: Arc<App>, ready: Arc<Ready>, lease: SlotLease, plan: Plan, outcome: Outcome) {
    match outcome {
        Outcome::Completed => ready.slots.set_tokens(lease.slot, plan.tokens.clone(), plan.namespace),
        Outcome::Failed | Outcome::Aborted => {
            // The engine may have stopped anywhere in the prompt, so the slot's contents are unknown.
            // A failed request is counted where its error is returned.
            ready.slots.set_foreign(lease.slot, Vec::new());
            if outcome == Outcome::Aborted {
                Counters::add(&app.counters.client_disconnects, 1);
            }
            return;
        }
    }

    let block = app.config.prefix.block_tokens.get() as usize;
    let long_enough = plan.tokens.len() >= app.config.snapshot.min_tokens as usize;
    let already_stored = plan.stored >= plan.tokens.len() / block * block;
    if !long_enough || already_stored || ready.info.snapshots_disabled.is_some() {
        return;
    }
    let tokens = plan.tokens.len() as u64;
    let candidate = AdmissionCandidate {
        namespace: plan.namespace.0.to_hex(),
        tenant: plan.tenant.clone(),
        tokens: tokens as u32,
        stored_tokens: plan.stored as u32,
        estimated_bytes: app.costs.snapshot_bytes(tokens),
        recompute_cost_ms: app.costs.recompute_ms(tokens),
        store_bytes: app.store.bytes(),
        store_capacity: app.config.store.capacity.as_u64(),
    };
    let Ok(permit) = app.snapshot_permits.clone().try_acquire_owned() else {
        Counters::add(&app.counters.snapshots_skipped, 1);
        tracing::debug!(slot = lease.slot, "snapshot skipped: saves already in progress");
        return;
    };
    // The save runs after the response, in the request's trace and log span.
    let cx = Context::current();
    let log_span = tracing::Span::current();
    tokio::spawn(async move {
        // The admission policy runs on the blocking pool, as the router does.
        let plugins = app.plugins.clone();
        let admitted = tokio::task::spawn_blocking(move || plugins.admission.admit(&candidate)).await.unwrap_or(false);
        if !admitted {
            tracing::debug!(slot = lease.slot, tokens, "snapshot not admitted by the admission policy");
            return;
        }
        snapshot::save(&app, &ready, lease, plan.namespace, plan.tenant).await;
        drop(permit);
    }
    .with_context(cx)
    .instrument(log_span));
}

fn upstream_request(app: &App, parsed: &CompletionRequest) -> Result<Request<crate::engine::UpstreamBody>, ApiError> {
    let path = match parsed.endpoint {
        Endpoint::ChatCompletions => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
        Endpoint::NativeCompletion => "/completion",
    };
    let payload = serde_json::to_vec(&parsed.body).map_err(|error| ApiError::internal(error.to_string()))?;
    Request::builder()
        .method(http::Method::POST)
        .uri(app.engine.client().uri(path))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full_body(Bytes::from(payload)))
        .map_err(|error| ApiError::internal(error.to_string()))
}

/// Forwards a batch of prompts without slot pinning or snapshots. The engine places the prompts
/// in slots itself, so they must not reuse any slot's prefix, and the slots' contents become
/// unknown.
async fn forward_uncached(app: &App, mut parsed: CompletionRequest, tenant: String) -> Result<Response<ResponseBody>, ApiError> {
    disable_prompt_cache(&mut parsed.body);
    if let Some(ready) = app.ready() {
        ready.slots.set_all_foreign();
    }
    let response = app.engine.client().send(upstream_request(app, &parsed)?).await.map_err(|error| ApiError::from_engine(&error))?;
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    set_cache_headers(&mut head.headers, CacheSource::None, 0);
    let model = app.ready().map(|ready| priced_model(app, &ready)).unwrap_or_default();
    let mut response = Response::from_parts(head, body.map_err(|error| Box::new(error) as _).boxed());
    response.extensions_mut().insert(Served { prompt_tokens: 0, cached_tokens: 0, source: CacheSource::None, peer: None, slot: None, tenant, model, usage: None });
    Ok(response)
}

/// Makes the engine compute the whole prompt instead of reusing its slot's prefix.
fn disable_prompt_cache(body: &mut serde_json::Value) {
    if let Some(object) = body.as_object_mut() {
        object.insert("cache_prompt".into(), serde_json::Value::Bool(false));
    }
}

fn set_cache_headers(headers: &mut http::HeaderMap, source: CacheSource, cached: u32) {
    headers.insert(CACHED_TOKENS_HEADER, HeaderValue::from(cached));
    headers.insert(CACHE_SOURCE_HEADER, HeaderValue::from_static(source.as_str()));
}

/// Returns the model name the ledger records and prices a request under. Every name of the
/// engine's model (its id, file name and aliases) is the same model, so the `ledger.models` key
/// among them is used whatever name the request gave, and the model id when none is a key.
fn priced_model(app: &App, ready: &Ready) -> String {
    let names = model_names(app, &ready.info);
    names.iter().find(|name| app.config.ledger.models.contains_key(name.as_str())).unwrap_or(&ready.info.model_id).clone()
}

/// Returns the names a request may give the engine's model: its id, file name and aliases.
pub fn model_names(app: &App, info: &crate::engine::EngineInfo) -> Vec<String> {
    let mut names = vec![info.model_id.clone(), info.fingerprint_inputs.model_file.clone()];
    names.extend(app.config.engine.model_aliases.iter().cloned());
    names.retain(|name| !name.is_empty());
    names
}

fn check_model(app: &App, ready: &Ready, requested: Option<&str>) -> Result<(), ApiError> {
    let Some(requested) = requested else { return Ok(()) };
    let names = model_names(app, &ready.info);
    if names.iter().any(|name| name == requested) {
        return Ok(());
    }
    Err(ApiError::unknown_model(requested, &names))
}

/// Forwards the request to `peer`. Returns its response when the peer took the request, or None
/// when the forward failed before any byte reached the client, so the request is served here.
#[allow(clippy::too_many_arguments)]
async fn forward_to_peer(app: &App, peer: &crate::peer::PeerLoad, endpoint: Endpoint, headers: &http::HeaderMap, tenant: &str, body: Bytes, prompt_tokens: u64, model: &str) -> Option<Response<ResponseBody>> {
    let fleet = app.fleet.as_ref()?;
    Counters::add(&app.counters.forwards, 1);
    // The span covers the forward until the peer's response head; the peer's own server span,
    // a child of this one, covers the rest.
    let call = trace::start(
        "kvsidecar.forward",
        SpanKind::Client,
        &Context::current(),
        vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("url.full", format!("{}{}", peer.url, crate::peer::forward::PATH_PREFIX)),
            KeyValue::new("kvsidecar.peer.node_id", peer.node_id.clone()),
        ],
    );
    let sent = crate::peer::forward::send(app, fleet, &peer.url, endpoint, headers, tenant, body).with_context(call.clone()).await;
    let answer = match sent {
        Ok(response) if crate::peer::forward::deliverable(response.status()) => {
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            if !head.headers.contains_key(crate::peer::forward::SERVED_BY_HEADER)
                && let Ok(node) = HeaderValue::from_str(&peer.node_id)
            {
                head.headers.insert(crate::peer::forward::SERVED_BY_HEADER, node);
            }
            trace::set(&call, || vec![KeyValue::new("http.response.status_code", i64::from(head.status.as_u16()))]);
            tracing::debug!(peer.url = %peer.url, peer.node_id = %peer.node_id, http.status = head.status.as_u16(), "request forwarded to a peer");
            let header = |name: &str| head.headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_string);
            let source = match header(CACHE_SOURCE_HEADER).as_deref() {
                Some("slot") => CacheSource::Slot,
                Some("local") => CacheSource::Local,
                Some("peer") => CacheSource::Peer,
                _ => CacheSource::None,
            };
            let served = Served {
                prompt_tokens,
                cached_tokens: header(CACHED_TOKENS_HEADER).and_then(|text| text.parse().ok()).unwrap_or(0),
                source,
                peer: Some(peer.node_id.clone()),
                slot: None,
                tenant: tenant.to_string(),
                model: model.to_string(),
                usage: None,
            };
            let mut response = Response::from_parts(head, body.map_err(|error| Box::new(error) as _).boxed());
            response.extensions_mut().insert(served);
            Some(response)
        }
        Ok(response) => {
            Counters::add(&app.counters.forwards_failed, 1);
            trace::set(&call, || vec![KeyValue::new("http.response.status_code", i64::from(response.status().as_u16()))]);
            trace::fail(&call, response.status().as_u16().to_string(), "the peer could not serve the request; served here");
            tracing::info!(peer.url = %peer.url, http.status = response.status().as_u16(), "peer could not serve a forwarded request; serving it here");
            None
        }
        Err(error) => {
            Counters::add(&app.counters.forwards_failed, 1);
            trace::fail(&call, "peer_unreachable", error.clone());
            tracing::info!(peer.url = %peer.url, error = %error, "forward to a peer failed; serving the request here");
            None
        }
    };
    trace::end(&call);
    answer
}

/// Returns whose cache a request uses: its tenant's own, or a shared namespace it names with
/// `x-kvsidecar-namespace` that `request.shared_namespaces` lists. Tenant ids are visible ASCII,
/// so the shared owner, which starts with a NUL byte, never equals a tenant.
fn cache_owner(app: &App, headers: &http::HeaderMap, tenant: &str) -> Result<String, ApiError> {
    let mut values = headers.get_all(NAMESPACE_HEADER).iter();
    let Some(value) = values.next() else { return Ok(tenant.to_string()) };
    let name = value.to_str().unwrap_or_default();
    if values.next().is_some() {
        return Err(ApiError::invalid_value(NAMESPACE_HEADER, format!("header {NAMESPACE_HEADER} appears more than once; send one shared namespace")));
    }
    if !app.config.request.shared_namespaces.iter().any(|shared| shared == name) {
        let listed = if app.config.request.shared_namespaces.is_empty() { "none is configured".to_string() } else { format!("configured: {}", app.config.request.shared_namespaces.join(", ")) };
        return Err(ApiError::invalid_value(
            NAMESPACE_HEADER,
            format!("{NAMESPACE_HEADER} {name:?} is not a shared namespace ({listed}); add it to request.shared_namespaces or drop the header"),
        ));
    }
    Ok(format!("\0shared\0{name}"))
}

/// Maximum length of a tenant id in the tenant header, in bytes.
const MAX_TENANT_LEN: usize = 256;

/// Returns the tenant of a request a peer forwarded, as the forwarding node resolved it.
fn forwarded_tenant(app: &App, headers: &http::HeaderMap) -> Result<String, ApiError> {
    tenant_in(app, headers, &http::HeaderName::from_static(crate::peer::forward::TENANT_HEADER))
}

pub(crate) fn tenant_of(app: &App, headers: &http::HeaderMap) -> Result<String, ApiError> {
    tenant_in(app, headers, &app.config.request.tenant_header)
}

fn tenant_in(app: &App, headers: &http::HeaderMap, name: &http::HeaderName) -> Result<String, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(app.config.request.default_tenant.clone()) };
    if values.next().is_some() {
        // A gateway that appends the header instead of replacing it would let the client pick.
        return Err(ApiError::invalid_value(name.as_str(), format!("header {name} appears more than once; send exactly one tenant id")));
    }
    match value.to_str() {
        Ok(text) if !text.is_empty() && text.len() <= MAX_TENANT_LEN && text.bytes().all(|byte| byte.is_ascii_graphic()) => Ok(text.to_string()),
        _ => Err(ApiError::invalid_value(
            name.as_str(),
            format!("invalid header {name}: a tenant id is 1 to {MAX_TENANT_LEN} visible ASCII characters"),
        )),
    }
}

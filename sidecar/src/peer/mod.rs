//! The fleet: this sidecar's identity, its authenticated peer API, and the health of the other
//! sidecars listed in `peers.urls` or found through `peers.dns`.
//!
//! Every sidecar has a node id, kept in `DATA_DIR/node-id` so it survives restarts, and a
//! generation that changes on every start and whenever its engine is probed anew (a restart), so
//! a peer can tell that the state it learnt from this node is stale.

pub mod forward;
mod follow;
mod health;
pub mod index;
pub mod journal;
pub mod tls;
pub mod transfer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde_json::json;
use subtle::ConstantTimeEq;

pub use health::{PeerLoad, PeerTable, run as run_health};
use index::FleetIndex;
use journal::{IndexEvent, Journal, Since};

use crate::app::App;
use crate::config::Config;
use crate::engine::UpstreamBody;
use crate::engine::http_client::full_body;
use crate::proxy::{ResponseBody, json_response};

/// Environment variable that can hold the peer token instead of `peers.token_file`.
pub const TOKEN_VARIABLE: &str = "KVSIDECAR_PEER_TOKEN";

/// Shortest peer token accepted, in bytes.
const MIN_TOKEN_BYTES: usize = 16;

/// Path prefix of the peer API.
pub const API_PREFIX: &str = "/peer/v1/";

/// This sidecar as its peers know it.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Stable across restarts: 32 hex digits.
    pub node_id: String,
    /// Random per process start.
    pub start: u64,
}

impl Identity {
    /// Reads the node id from `DATA_DIR/node-id`, creating it on the first start, and draws a
    /// new start value.
    pub fn load(data_dir: &Path) -> Result<Identity, String> {
        let path = data_dir.join("node-id");
        let node_id = match std::fs::read_to_string(&path) {
            Ok(text) if is_node_id(text.trim()) => text.trim().to_string(),
            Ok(text) => return Err(format!("{} holds {:?}, not a node id of 32 hex digits; delete the file to get a new id", path.display(), text.trim())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let node_id = hex::encode(random_bytes::<16>()?);
                std::fs::create_dir_all(data_dir).map_err(|error| format!("cannot create {}: {error}", data_dir.display()))?;
                std::fs::write(&path, format!("{node_id}\n")).map_err(|error| format!("cannot write {}: {error}", path.display()))?;
                node_id
            }
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        };
        Ok(Identity { node_id, start: u64::from_le_bytes(random_bytes::<8>()?) })
    }

    /// Returns the generation for engine generation `engine`: it changes when this process
    /// restarts and when its engine does.
    pub fn generation(&self, engine: u64) -> String {
        format!("{:016x}.{engine}", self.start)
    }
}

fn is_node_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|error| format!("the system random source failed: {error}"))?;
    Ok(bytes)
}

/// The bearer token that sidecars of one fleet present to each other.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the token from `peers.token_file`, or else from `KVSIDECAR_PEER_TOKEN`. A fleet
    /// without a token is an error: the peer API would serve anyone.
    pub fn load(config: &Config, variable: Option<String>) -> Result<Option<Token>, String> {
        if !config.peers.enabled() {
            return Ok(None);
        }
        let (text, source) = match (&config.peers.token_file, variable) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read the peer token file {} (peers.token_file): {error}", path.display()))?;
                (text, format!("file {}", path.display()))
            }
            (None, Some(text)) => (text, format!("environment {TOKEN_VARIABLE}")),
            (None, None) => {
                return Err(format!(
                    "peers are configured but no peer token is: set peers.token_file (--peer-token-file) or {TOKEN_VARIABLE}, the same on every sidecar of the fleet"
                ));
            }
        };
        let token = text.trim();
        if token.len() < MIN_TOKEN_BYTES || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(format!(
                "the peer token from {source} must be at least {MIN_TOKEN_BYTES} visible ASCII characters; generate one with `head -c 32 /dev/urandom | base64`"
            ));
        }
        Ok(Some(Token(Arc::from(token.as_bytes()))))
    }

    /// Returns the `authorization` header value that presents this token.
    pub fn header(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    /// Returns whether `headers` present this token, comparing in constant time.
    pub fn admits(&self, headers: &http::HeaderMap) -> bool {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else { return false };
        let Some(presented) = value.as_bytes().strip_prefix(b"Bearer ") else { return false };
        bool::from(presented.ct_eq(&self.0))
    }
}

/// Serves the peer API. Every request must present the fleet's token; without it the response
/// is 401 and reveals nothing, not even which paths exist.
pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<ResponseBody> {
    let admitted = app.fleet.as_ref().is_some_and(|fleet| fleet.token.admits(request.headers()));
    if !admitted {
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": {"message": "missing or invalid peer token: send `authorization: Bearer TOKEN` with the fleet's token", "code": "unauthorized"}}),
        );
        response.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        return response;
    }
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/peer/v1/info") => json_response(StatusCode::OK, &info(&app)),
        ("GET", "/peer/v1/index") => index(&app, request.uri().query()).await,
        ("GET", "/peer/v1/snapshot") => {
            // The span joins the puller's trace and ends when the snapshot starts streaming.
            let parent = crate::telemetry::trace::extract(request.headers());
            let cx = crate::telemetry::trace::start("GET /peer/v1/snapshot", opentelemetry::trace::SpanKind::Server, &parent, vec![
                opentelemetry::KeyValue::new("http.request.method", "GET"),
                opentelemetry::KeyValue::new("http.route", "/peer/v1/snapshot"),
            ]);
            let response = transfer::serve(&app, request.uri().query()).await;
            crate::telemetry::trace::set(&cx, || {
                let bytes = response.headers().get(transfer::BYTES_HEADER).and_then(|value| value.to_str().ok()).and_then(|text| text.parse::<i64>().ok());
                let mut attributes = vec![opentelemetry::KeyValue::new("http.response.status_code", i64::from(response.status().as_u16()))];
                attributes.extend(bytes.map(|bytes| opentelemetry::KeyValue::new("kvsidecar.snapshot.bytes", bytes)));
                attributes
            });
            crate::telemetry::trace::end(&cx);
            response
        }
        ("POST", path) if path.starts_with(forward::PATH_PREFIX) => forward::serve(app, request).await,
        (_, "/peer/v1/info") => json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": {"message": "use GET /peer/v1/info", "code": "method_not_allowed"}})),
        (_, path) => json_response(StatusCode::NOT_FOUND, &json!({"error": {"message": format!("no peer endpoint {path}"), "code": "not_found"}})),
    }
}

/// This node's identity, engine state and load, as its peers read them.
pub fn info(app: &App) -> serde_json::Value {
    let ready = app.ready();
    let fleet = app.fleet.as_ref();
    let engine_generation = ready.as_ref().map(|ready| ready.generation).unwrap_or(0);
    json!({
        "node_id": fleet.map(|fleet| fleet.identity.node_id.clone()),
        "generation": fleet.map(|fleet| fleet.identity.generation(engine_generation)),
        "engine_ready": ready.is_some(),
        "fingerprint": ready.as_ref().map(|ready| ready.info.fingerprint.to_hex()),
        "slots": ready.as_ref().map(|ready| ready.slots.len()).unwrap_or(0),
        "busy_slots": ready.as_ref().map(|ready| ready.slots.busy_count()).unwrap_or(0),
        "snapshots": app.store.len(),
        "snapshot_bytes": app.store.bytes(),
    })
}

/// This sidecar's place in a fleet: who it is, the token, the peers it follows, its own index
/// journal and its view of the peers' indexes.
pub struct Fleet {
    pub identity: Identity,
    pub token: Token,
    pub peers: PeerTable,
    pub journal: Arc<Journal>,
    pub index: FleetIndex,
    /// One connection pool for health checks, index followers, transfers and forwards.
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
}

impl Fleet {
    /// Returns the fleet state; `tls` makes peer requests use mutual TLS.
    pub fn new(identity: Identity, token: Token, peers: PeerTable, journal: Arc<Journal>, index: FleetIndex, tls: Option<&tls::Tls>) -> Fleet {
        let client = Client::builder(TokioExecutor::new()).build(tls::connector(tls));
        Fleet { identity, token, peers, journal, index, client }
    }

    /// Sends `GET path` (with its query) to the peer API at `url` with the fleet's token, and
    /// returns the response head with its body still streaming.
    pub async fn get(&self, url: &str, path: &str) -> Result<Response<Incoming>, String> {
        let request = http::Request::get(format!("{url}{path}"))
            .header(http::header::AUTHORIZATION, self.token.header())
            .body(full_body(Bytes::new()))
            .map_err(|error| format!("invalid peer URL {url}: {error}"))?;
        self.send(request).await
    }

    /// Sends `request` to a peer; the caller set its URL and token. A request sent while a span
    /// is current carries its `traceparent`, so the peer's spans join the trace.
    pub async fn send(&self, mut request: http::Request<UpstreamBody>) -> Result<Response<Incoming>, String> {
        crate::telemetry::trace::inject_current(request.headers_mut());
        self.client.request(request).await.map_err(|error| format!("unreachable: {error}"))
    }

    /// Reads `path` (with its query) from the peer API at `url` with the fleet's token, and
    /// parses its JSON body of at most `limit` bytes, all within `within`.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str, path: &str, limit: usize, within: Duration) -> Result<T, String> {
        let exchange = async {
            let response = self.get(url, path).await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED {
                return Err("rejected our peer token (401): the fleet's sidecars must share one token".to_string());
            }
            if !status.is_success() {
                return Err(format!("responded {status} to {path}"));
            }
            let body = http_body_util::Limited::new(response.into_body(), limit).collect().await.map_err(|error| format!("body failed: {error}"))?.to_bytes();
            serde_json::from_slice::<T>(&body).map_err(|error| format!("invalid response to {path}: {error}"))
        };
        tokio::time::timeout(within, exchange).await.map_err(|_| format!("no response within {}", humantime::format_duration(within)))?
    }
}

/// Maximum wait of an index long-poll.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Returns this node's index changes after `since`, waiting up to `wait_ms` for one, or the whole
/// index when the reader's `generation` is not this node's or `since` left the journal.
async fn index(app: &Arc<App>, query: Option<&str>) -> Response<ResponseBody> {
    let Some(fleet) = app.fleet.as_ref() else { return json_response(StatusCode::NOT_FOUND, &json!({"error": {"message": "not in a fleet", "code": "not_found"}})) };
    let mut since = 0u64;
    let mut reader_generation = String::new();
    let mut wait = Duration::ZERO;
    for pair in query.unwrap_or_default().split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("since", value)) => since = value.parse().unwrap_or(u64::MAX),
            Some(("generation", value)) => reader_generation = value.to_string(),
            Some(("wait_ms", value)) => wait = Duration::from_millis(value.parse().unwrap_or(0)).min(MAX_WAIT),
            _ => {}
        }
    }
    let generation = fleet.identity.generation(app.ready().map(|ready| ready.generation).unwrap_or(0));
    if reader_generation == generation {
        fleet.journal.wait(since, wait).await;
        if let Since::Events { last, events } = fleet.journal.since(since) {
            return json_response(StatusCode::OK, &json!({"generation": generation, "last": last, "events": events, "info": info(app)}));
        }
    }
    // The journal position is read before the listing, so changes during the listing come again
    // as events, and applying an event twice changes nothing.
    let last = fleet.journal.last();
    let slots: Vec<IndexEvent> = match app.ready() {
        Some(ready) => {
            let block = app.config.prefix.block_tokens.get() as usize;
            ready
                .slots
                .all_contents()
                .iter()
                .enumerate()
                .filter_map(|(slot, contents)| {
                    let namespace = contents.owner.as_ref()?;
                    let blocks = crate::prefix::block_hashes(namespace, &contents.tokens, block);
                    (!blocks.is_empty()).then(|| IndexEvent::Slot { slot: slot as u32, blocks: blocks.iter().map(crate::prefix::Digest::to_hex).collect() })
                })
                .collect()
        }
        None => Vec::new(),
    };
    let store = app.store.clone();
    let listing = tokio::task::spawn_blocking(move || -> Result<Vec<IndexEvent>, String> {
        let mut snapshots = slots;
        for meta in store.list().map_err(|error| error.to_string())? {
            let Ok(blocks) = store.blocks(&meta.id) else { continue };
            snapshots.push(IndexEvent::Stored {
                id: meta.id.to_hex(),
                namespace: meta.namespace.to_hex(),
                tokens: meta.tokens,
                bytes: meta.bytes,
                blocks: blocks.iter().map(crate::prefix::Digest::to_hex).collect(),
            });
        }
        Ok(snapshots)
    })
    .await;
    match listing {
        Ok(Ok(snapshots)) => json_response(StatusCode::OK, &json!({"generation": generation, "last": last, "resync": true, "snapshots": snapshots, "info": info(app)})),
        Ok(Err(error)) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": format!("cannot list the store: {error}"), "code": "store_error"}})),
        Err(error) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "internal_error"}})),
    }
}

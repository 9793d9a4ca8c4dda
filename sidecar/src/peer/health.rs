//! Peer health: every `peers.health_interval` each known peer's `/peer/v1/info` is read. A peer
//! without a successful read for `peers.dead_after` is dead. Peers come from `peers.urls` and from
//! the addresses of `peers.dns`, resolved again every `peers.dns_interval`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use crate::app::App;

/// Largest `/peer/v1/info` body read.
const MAX_INFO_BYTES: usize = 64 << 10;

/// State of one peer as this sidecar last saw it.
#[derive(Debug, Clone, Default)]
struct PeerState {
    node_id: Option<String>,
    generation: Option<String>,
    engine_ready: bool,
    /// Model fingerprint (hex) of the peer's engine.
    fingerprint: Option<String>,
    slots: u64,
    busy_slots: u64,
    snapshots: u64,
    last_ok: Option<Instant>,
    last_error: Option<String>,
    /// Whether the URL came from `peers.dns` rather than `peers.urls`.
    from_dns: bool,
    /// Whether the peer's death was logged since its last successful health check.
    reported_dead: bool,
    /// First failed health check of a peer that never responded, to warn about it once.
    failing_since: Option<Instant>,
}

/// A live peer and its load, as routing uses them.
#[derive(Debug, Clone)]
pub struct PeerLoad {
    pub url: String,
    pub node_id: String,
    pub engine_ready: bool,
    /// Model fingerprint (hex) of the peer's engine; None while it is not ready.
    pub fingerprint: Option<String>,
    pub slots: u64,
    pub busy_slots: u64,
}

/// The peers of this sidecar and their health.
pub struct PeerTable {
    entries: Mutex<BTreeMap<String, PeerState>>,
    dead_after: Duration,
}

impl PeerTable {
    pub fn new(dead_after: Duration) -> PeerTable {
        PeerTable { entries: Mutex::new(BTreeMap::new()), dead_after }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerState>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the peers as `/admin/peers` shows them, with each one's part of `index`.
    pub fn describe(&self, index: &super::index::FleetIndex) -> serde_json::Value {
        let entries = self.lock();
        let peers: Vec<serde_json::Value> = entries
            .iter()
            .map(|(url, peer)| {
                json!({
                    "url": url,
                    "source": if peer.from_dns { "dns" } else { "static" },
                    "alive": peer.last_ok.is_some_and(|at| at.elapsed() < self.dead_after),
                    "node_id": peer.node_id,
                    "generation": peer.generation,
                    "fingerprint": peer.fingerprint,
                    "engine_ready": peer.engine_ready,
                    "slots": peer.slots,
                    "busy_slots": peer.busy_slots,
                    "snapshots": peer.snapshots,
                    "last_seen_ms_ago": peer.last_ok.map(|at| at.elapsed().as_millis() as u64),
                    "last_error": peer.last_error,
                    "index": index.describe(url),
                })
            })
            .collect();
        json!({ "peers": peers })
    }

    /// Returns the numbers of alive and dead peers.
    pub fn counts(&self) -> (usize, usize) {
        let liveness = self.liveness();
        let alive = liveness.iter().filter(|(_, alive)| *alive).count();
        (alive, liveness.len() - alive)
    }

    /// Returns each peer URL with whether the peer is alive.
    pub fn liveness(&self) -> Vec<(String, bool)> {
        self.lock().iter().map(|(url, peer)| (url.clone(), peer.last_ok.is_some_and(|at| at.elapsed() < self.dead_after))).collect()
    }

    /// Returns the peers that can take part in routing: alive, with a node id.
    pub fn routable(&self) -> Vec<PeerLoad> {
        self.lock()
            .iter()
            .filter(|(_, peer)| peer.last_ok.is_some_and(|at| at.elapsed() < self.dead_after))
            .filter_map(|(url, peer)| {
                Some(PeerLoad {
                    url: url.clone(),
                    node_id: peer.node_id.clone()?,
                    engine_ready: peer.engine_ready,
                    fingerprint: peer.fingerprint.clone(),
                    slots: peer.slots,
                    busy_slots: peer.busy_slots,
                })
            })
            .collect()
    }

    /// Replaces the set of peer URLs, keeping what is known of those that stay.
    fn set_urls(&self, urls: &BTreeMap<String, bool>) {
        let mut entries = self.lock();
        entries.retain(|url, _| urls.contains_key(url));
        for (url, from_dns) in urls {
            entries.entry(url.clone()).or_default().from_dns = *from_dns;
        }
    }

    pub(super) fn record_ok(&self, url: &str, info: &serde_json::Value) {
        let mut entries = self.lock();
        let Some(peer) = entries.get_mut(url) else { return };
        let generation = info["generation"].as_str().map(str::to_string);
        if peer.generation.is_some() && peer.generation != generation {
            tracing::info!(peer.url = %url, peer.node_id = ?peer.node_id, old = ?peer.generation, new = ?generation, "peer restarted, or its engine did");
        }
        if peer.last_ok.is_none_or(|at| at.elapsed() >= self.dead_after) {
            tracing::info!(peer.url = %url, peer.node_id = ?info["node_id"].as_str(), "peer alive");
        }
        peer.node_id = info["node_id"].as_str().map(str::to_string);
        peer.generation = generation;
        peer.engine_ready = info["engine_ready"].as_bool().unwrap_or(false);
        peer.fingerprint = info["fingerprint"].as_str().map(str::to_string);
        peer.slots = info["slots"].as_u64().unwrap_or(0);
        peer.busy_slots = info["busy_slots"].as_u64().unwrap_or(0);
        peer.snapshots = info["snapshots"].as_u64().unwrap_or(0);
        peer.last_ok = Some(Instant::now());
        peer.last_error = None;
        peer.reported_dead = false;
    }

    fn record_error(&self, url: &str, error: String) {
        let mut entries = self.lock();
        let Some(peer) = entries.get_mut(url) else { return };
        if peer.last_error.as_deref() != Some(error.as_str()) {
            tracing::debug!(peer.url = %url, error = %error, "peer health check failed");
        }
        if peer.last_ok.is_none() && !peer.reported_dead {
            // A peer that never responded (a wrong URL, port, token or certificate) gets one
            // warning once it has failed for peers.dead_after.
            let since = *peer.failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.dead_after {
                tracing::warn!(peer.url = %url, error = %error, "peer unreachable since this sidecar started; check its URL, port, token and certificate");
                peer.reported_dead = true;
            }
        }
        if !peer.reported_dead && peer.last_ok.is_some_and(|at| at.elapsed() >= self.dead_after) {
            tracing::warn!(peer.url = %url, peer.node_id = ?peer.node_id, error = %error, "peer dead: no successful health check within peers.dead_after");
            peer.reported_dead = true;
        }
        peer.last_error = Some(error);
    }

    /// Forgets a URL that turned out to be this sidecar itself.
    fn remove(&self, url: &str) {
        self.lock().remove(url);
    }
}

/// Follows the peers' health until `shutdown` changes.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let Some(fleet) = app.fleet.clone() else { return };
    let config = &app.config.peers;
    let mut interval = tokio::time::interval(config.health_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resolved: BTreeSet<String> = BTreeSet::new();
    let mut next_resolve = Instant::now();
    let mut own_urls: BTreeSet<String> = BTreeSet::new();
    let mut followers: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => {
                for follower in followers.values() {
                    follower.abort();
                }
                return;
            }
        }
        if let Some(dns) = config.dns.as_deref().filter(|_| Instant::now() >= next_resolve) {
            next_resolve = Instant::now() + config.dns_interval;
            match tokio::net::lookup_host(dns).await {
                Ok(addresses) => resolved = addresses.map(|address| format!("{}://{address}", config.scheme())).collect(),
                Err(error) => tracing::warn!(peers.dns = %dns, error = %error, "failed to resolve the peer name; keeping the last addresses"),
            }
        }
        let mut urls: BTreeMap<String, bool> = config.urls.iter().map(|url| (url.trim_end_matches('/').to_string(), false)).collect();
        for url in &resolved {
            urls.entry(url.clone()).or_insert(true);
        }
        urls.retain(|url, _| !own_urls.contains(url));
        fleet.peers.set_urls(&urls);
        followers.retain(|url, follower| {
            let keep = urls.contains_key(url);
            if !keep {
                follower.abort();
                fleet.index.forget(url);
            }
            keep
        });
        for url in urls.keys() {
            followers.entry(url.clone()).or_insert_with(|| tokio::spawn(super::follow::follow(app.clone(), url.clone())));
        }

        let checks = urls.keys().map(|url| fleet.get_json::<serde_json::Value>(url, "/peer/v1/info", MAX_INFO_BYTES, config.health_interval));
        for (url, outcome) in urls.keys().zip(futures_util::future::join_all(checks).await) {
            match outcome {
                Ok(info) if info["node_id"].as_str() == Some(fleet.identity.node_id.as_str()) => {
                    // A DNS name of the whole fleet includes this sidecar.
                    own_urls.insert(url.clone());
                    fleet.peers.remove(url);
                }
                Ok(info) => fleet.peers.record_ok(url, &info),
                Err(error) => fleet.peers.record_error(url, error),
            }
        }
    }
}

//! The restore step: a stored snapshot, or one pulled from a peer, written into the shared slot
//! folder, verified, and loaded into an engine slot before the request is forwarded.

use std::path::PathBuf;
use std::sync::Arc;

use kvsidecar_sdk::AdmissionCandidate;
use opentelemetry::KeyValue;
use opentelemetry::trace::{FutureExt as _, SpanKind};

use crate::app::{App, Counters, Ready};
use crate::engine::slot_file;
use crate::peer::PeerLoad;
use crate::peer::transfer::{self, PullError};
use crate::prefix::{Digest, Namespace, block_hashes, sequence_id};
use crate::store::{NewSnapshot, PrefixMatch, StoreError};
use crate::telemetry::{self, trace};

/// Restores snapshot `found` of `namespace` into `slot`, which the caller holds. Returns the
/// tokens the slot now contains, or None when the restore did not happen (a miss: the request is
/// computed cold).
pub async fn into_slot(app: &Arc<App>, ready: &Ready, slot: u32, found: PrefixMatch, namespace: Namespace) -> Option<Vec<u32>> {
    let started = std::time::Instant::now();
    let step = trace::Step::start("kvsidecar.restore");
    step.set(|| vec![KeyValue::new("kvsidecar.restore.source", "local"), KeyValue::new("kvsidecar.snapshot.id", found.id.to_hex()), KeyValue::new("kvsidecar.slot", i64::from(slot))]);
    let restored = local(app, ready, slot, found, namespace).await;
    let ok = restored.is_some();
    telemetry::instruments().restore(started.elapsed(), "local", ok);
    match &restored {
        Some((tokens, bytes)) => {
            Counters::add(&app.counters.restored_bytes, *bytes);
            step.set(|| vec![KeyValue::new("kvsidecar.restore.tokens", tokens.len() as i64), KeyValue::new("kvsidecar.restore.bytes", *bytes as i64)]);
        }
        None => step.fail("restore_failed", "the snapshot was not restored; the prompt is computed"),
    }
    restored.map(|(tokens, _)| tokens)
}

/// Restores a stored snapshot; returns the slot's tokens and the snapshot's bytes.
async fn local(app: &Arc<App>, ready: &Ready, slot: u32, found: PrefixMatch, namespace: Namespace) -> Option<(Vec<u32>, u64)> {
    let id = found.id;
    let meta = match app.store.meta(&id) {
        Ok(Some(meta)) => meta,
        Ok(None) => return None,
        Err(error) => {
            app.store.discard_unreadable(&id, &format!("metadata read failed: {error}"));
            Counters::add(&app.counters.restores_failed, 1);
            return None;
        }
    };
    if meta.fingerprint != ready.info.fingerprint.to_hex() {
        tracing::warn!(snapshot.id = %id, snapshot.fingerprint = %meta.fingerprint, engine.fingerprint = %ready.info.fingerprint, "snapshot was made by another model or KV layout; not restoring it");
        return None;
    }
    let tokens = match app.store.tokens(&id) {
        Ok(tokens) if tokens.len() == meta.tokens as usize => tokens,
        Ok(tokens) => {
            app.store.discard_unreadable(&id, &format!("{} stored tokens, metadata says {}", tokens.len(), meta.tokens));
            Counters::add(&app.counters.restores_failed, 1);
            return None;
        }
        Err(error) => {
            app.store.discard_unreadable(&id, &format!("token list read failed: {error}"));
            Counters::add(&app.counters.restores_failed, 1);
            return None;
        }
    };

    let name = app.slot_file_name("restore", slot);
    let path = app.config.engine.slot_dir.join(&name);
    let store = app.store.clone();
    let target = path.clone();
    let written = tokio::task::spawn_blocking(move || store.read_into(&id, &target)).await;
    match written {
        Ok(Ok(_)) => {}
        Ok(Err(StoreError::Corrupt { .. })) => {
            // The store already logged the reason and deleted the snapshot.
            Counters::add(&app.counters.restores_failed, 1);
            return None;
        }
        Ok(Err(error)) => {
            tracing::warn!(snapshot.id = %id, error = %error, "failed to write snapshot into the slot folder; computing the prompt instead");
            Counters::add(&app.counters.restores_failed, 1);
            return None;
        }
        Err(error) => {
            tracing::error!(snapshot.id = %id, error = %error, "snapshot read task failed");
            return None;
        }
    }

    let loaded = load_file(app, ready, slot, &name, tokens, namespace, false).await;
    let _ = tokio::fs::remove_file(&path).await;
    if loaded.is_some() {
        app.store.record_access(&id);
    }
    loaded.map(|tokens| (tokens, meta.bytes))
}

/// Loads the slot file `name` of the shared slot folder, which contains the KV of `tokens`, into
/// `slot`. Returns the tokens on success. On failure the slot's contents are marked unknown.
async fn load_file(app: &Arc<App>, ready: &Ready, slot: u32, name: &str, tokens: Vec<u32>, namespace: Namespace, pulled: bool) -> Option<Vec<u32>> {
    // Restores of pulled snapshots are also counted apart, so the metrics can tell the sources.
    let count = |total: &std::sync::atomic::AtomicU64, of_pulled: &std::sync::atomic::AtomicU64| {
        Counters::add(total, 1);
        if pulled {
            Counters::add(of_pulled, 1);
        }
    };
    if !app.engine_unchanged(ready).await {
        return None;
    }
    match app.engine.restore_slot(slot, name).await {
        Ok(outcome) if outcome.tokens as usize == tokens.len() => {
            tracing::debug!(slot, tokens = outcome.tokens, restore_ms = outcome.elapsed.as_secs_f64() * 1000.0, "snapshot restored");
            count(&app.counters.restores, &app.counters.restores_pulled);
            app.costs.observe_restore(u64::from(outcome.tokens), outcome.elapsed.as_secs_f64() * 1000.0);
            ready.slots.set_tokens(slot, tokens.clone(), namespace);
            Some(tokens)
        }
        Ok(outcome) => {
            tracing::warn!(slot, restored = outcome.tokens, expected = tokens.len(), "engine restored a different token count; treating the slot as unknown");
            count(&app.counters.restores_failed, &app.counters.restores_pulled_failed);
            ready.slots.set_foreign(slot, Vec::new());
            None
        }
        Err(error) => {
            // A failed restore leaves the engine's slot empty.
            tracing::warn!(slot, error = %error, "engine rejected the snapshot; computing the prompt instead");
            count(&app.counters.restores_failed, &app.counters.restores_pulled_failed);
            ready.slots.set_foreign(slot, Vec::new());
            None
        }
    }
}

/// Pulls from `peer` the snapshot holding the prompt blocks `hashes` of `namespace`, checks that
/// it holds exactly those blocks in this engine's KV layout, and loads it into `slot`, which the
/// caller holds. The admission policy then decides, off the request path, whether the store
/// keeps a copy. Returns the tokens the slot now contains, or None: a miss, never a partial or
/// unverified restore.
pub async fn from_peer(app: &Arc<App>, ready: &Arc<Ready>, slot: u32, peer: &PeerLoad, hashes: &[Digest], namespace: Namespace, tenant: &str) -> Option<Vec<u32>> {
    let started = std::time::Instant::now();
    let step = trace::Step::start("kvsidecar.restore");
    step.set(|| vec![KeyValue::new("kvsidecar.restore.source", "peer"), KeyValue::new("kvsidecar.peer.node_id", peer.node_id.clone()), KeyValue::new("kvsidecar.slot", i64::from(slot))]);
    let restored = pull_and_load(app, ready, slot, peer, hashes, namespace, tenant, step.context()).await;
    telemetry::instruments().restore(started.elapsed(), "peer", restored.is_some());
    match &restored {
        Some(tokens) => step.set(|| vec![KeyValue::new("kvsidecar.restore.tokens", tokens.len() as i64)]),
        None => step.fail("restore_failed", "the peer's snapshot was not restored; the prompt is computed"),
    }
    restored
}

#[allow(clippy::too_many_arguments)]
async fn pull_and_load(
    app: &Arc<App>,
    ready: &Arc<Ready>,
    slot: u32,
    peer: &PeerLoad,
    hashes: &[Digest],
    namespace: Namespace,
    tenant: &str,
    parent: &opentelemetry::Context,
) -> Option<Vec<u32>> {
    let fleet = app.fleet.as_ref()?;
    let last = hashes.last()?;
    let name = app.slot_file_name("pull", slot);
    let path = app.config.engine.slot_dir.join(&name);
    let max_bytes = app.config.store.max_snapshot.as_u64();
    let call = trace::start(
        "kvsidecar.pull",
        SpanKind::Client,
        parent,
        vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("url.full", format!("{}/peer/v1/snapshot", peer.url)),
            KeyValue::new("kvsidecar.peer.node_id", peer.node_id.clone()),
        ],
    );
    let pull_started = std::time::Instant::now();
    let pulled = transfer::pull(fleet, &peer.url, &namespace.0, last, &path, max_bytes, app.config.peers.transfer_timeout).with_context(call.clone()).await;
    telemetry::instruments().pull(pull_started.elapsed(), pulled.is_ok());
    match &pulled {
        Ok(pulled) => trace::set(&call, || vec![KeyValue::new("kvsidecar.pull.bytes", pulled.bytes as i64), KeyValue::new("kvsidecar.snapshot.id", pulled.id.to_hex())]),
        Err(error) => trace::fail(&call, if matches!(error, PullError::Corrupt(_)) { "corrupt" } else { "pull_failed" }, error.to_string()),
    }
    trace::end(&call);
    let pulled = match pulled {
        Ok(pulled) => pulled,
        Err(PullError::Corrupt(reason)) => {
            Counters::add(&app.counters.pulls_corrupt, 1);
            tracing::warn!(peer.url = %peer.url, peer.node_id = %peer.node_id, reason = %reason, "snapshot from a peer failed verification; computing the prompt instead");
            return None;
        }
        Err(error) => {
            Counters::add(&app.counters.pulls_failed, 1);
            tracing::info!(peer.url = %peer.url, peer.node_id = %peer.node_id, error = %error, "snapshot pull from a peer failed; computing the prompt instead");
            return None;
        }
    };

    // The bytes are what the peer announced; now they must be what this request needs.
    let block = app.config.prefix.block_tokens.get() as usize;
    let layout = ready.info.fingerprint_inputs.layout.clone();
    let parse_path = path.clone();
    let expected: Vec<Digest> = hashes.to_vec();
    let checked = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, String> {
        let file = std::fs::File::open(&parse_path).map_err(|error| error.to_string())?;
        let summary = slot_file::parse(std::io::BufReader::new(file)).map_err(|error| format!("invalid slot file: {error}"))?;
        if summary.layout != layout {
            return Err("its KV layout differs from this engine's".into());
        }
        if summary.tokens.len() != summary.cells as usize {
            return Err(format!("it lists {} tokens for {} KV cells", summary.tokens.len(), summary.cells));
        }
        if sequence_id(&namespace, &summary.tokens) != pulled.id {
            return Err("its tokens do not give the snapshot id the peer announced".into());
        }
        let blocks = block_hashes(&namespace, &summary.tokens, block);
        if !blocks.starts_with(&expected) {
            return Err("it does not hold the requested prefix blocks".into());
        }
        Ok(summary.tokens)
    })
    .await;
    let tokens = match checked {
        Ok(Ok(tokens)) => tokens,
        Ok(Err(reason)) => {
            Counters::add(&app.counters.pulls_corrupt, 1);
            tracing::warn!(peer.url = %peer.url, peer.node_id = %peer.node_id, snapshot.id = %pulled.id, reason = %reason, "snapshot from a peer rejected; computing the prompt instead");
            let _ = tokio::fs::remove_file(&path).await;
            return None;
        }
        Err(error) => {
            tracing::error!(error = %error, "pulled snapshot check task failed");
            let _ = tokio::fs::remove_file(&path).await;
            return None;
        }
    };

    Counters::add(&app.counters.pulls, 1);
    Counters::add(&app.counters.pulled_bytes, pulled.bytes);
    app.costs.observe_pull(pulled.bytes, pulled.elapsed.as_secs_f64() * 1000.0);
    tracing::debug!(peer.url = %peer.url, snapshot.id = %pulled.id, bytes = pulled.bytes, pull_ms = pulled.elapsed.as_secs_f64() * 1000.0, "snapshot pulled from a peer");
    let loaded = load_file(app, ready, slot, &name, tokens.clone(), namespace, true).await;
    keep_copy(app.clone(), ready.clone(), path, pulled.id, namespace, tenant.to_string(), tokens);
    loaded
}

/// Asks the admission policy whether the store keeps the pulled snapshot at `path`, stores it if
/// so, and removes the file, all off the request path.
fn keep_copy(app: Arc<App>, ready: Arc<Ready>, path: PathBuf, id: Digest, namespace: Namespace, tenant: String, tokens: Vec<u32>) {
    // Copies share the bound on snapshots being stored at once; beyond it the file goes.
    let Ok(permit) = app.snapshot_permits.clone().try_acquire_owned() else {
        Counters::add(&app.counters.snapshots_skipped, 1);
        tokio::spawn(async move {
            let _ = tokio::fs::remove_file(&path).await;
        });
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let bytes = tokio::fs::metadata(&path).await.map(|meta| meta.len()).unwrap_or(0);
        let block = app.config.prefix.block_tokens.get();
        let candidate = AdmissionCandidate {
            namespace: namespace.0.to_hex(),
            tenant: tenant.clone(),
            tokens: tokens.len() as u32,
            stored_tokens: 0,
            estimated_bytes: bytes,
            recompute_cost_ms: app.costs.recompute_ms(tokens.len() as u64),
            store_bytes: app.store.bytes(),
            store_capacity: app.config.store.capacity.as_u64(),
        };
        let plugins = app.plugins.clone();
        let admitted = !app.store.contains(&id) && tokio::task::spawn_blocking(move || plugins.admission.admit(&candidate)).await.unwrap_or(false);
        if admitted {
            let new = NewSnapshot {
                id,
                namespace: namespace.0,
                fingerprint: ready.info.fingerprint.to_hex(),
                tenant,
                block_hashes: block_hashes(&namespace, &tokens, block as usize),
                tokens,
                block_tokens: block,
            };
            let store = app.store.clone();
            let file = path.clone();
            match tokio::task::spawn_blocking(move || store.insert(&new, &file)).await {
                Ok(Ok(Some(_))) => {
                    Counters::add(&app.counters.snapshots_saved, 1);
                    tracing::debug!(snapshot.id = %id, "pulled snapshot stored");
                }
                Ok(Ok(None)) => {}
                Ok(Err(error)) => tracing::warn!(snapshot.id = %id, error = %error, "failed to store a pulled snapshot"),
                Err(error) => tracing::error!(snapshot.id = %id, error = %error, "pulled snapshot store task failed"),
            }
        }
        let _ = tokio::fs::remove_file(&path).await;
    });
}

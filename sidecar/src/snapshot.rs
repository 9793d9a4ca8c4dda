//! The snapshot step: after a response, the slot is saved by the engine, its file checked against
//! the engine's KV layout, and ingested into the store, all off the response path.

use std::sync::Arc;

use crate::app::{App, Counters, Ready};
use crate::engine::slot_file;
use crate::prefix::{Namespace, block_hashes, sequence_id};
use crate::slots::SlotLease;
use crate::store::NewSnapshot;
use crate::telemetry::trace;
use opentelemetry::KeyValue;

/// Saves the slot held by `lease` and stores it. The lease is released as soon as the engine has
/// written the file, so the next request on the slot waits only for the engine's save, not for
/// parsing and ingestion into RocksDB.
pub async fn save(app: &Arc<App>, ready: &Arc<Ready>, lease: SlotLease, namespace: Namespace, tenant: String) {
    let started = std::time::Instant::now();
    let step = trace::Step::start("kvsidecar.snapshot.save");
    step.set(|| vec![KeyValue::new("kvsidecar.slot", i64::from(lease.slot))]);
    let saved = save_slot(app, ready, lease, namespace, tenant).await;
    crate::telemetry::instruments().snapshot_save(started.elapsed(), saved.is_some());
    match saved {
        Some((tokens, bytes)) => step.set(|| vec![KeyValue::new("kvsidecar.snapshot.tokens", tokens as i64), KeyValue::new("kvsidecar.snapshot.bytes", bytes as i64)]),
        None => step.fail("not_saved", "no snapshot stored"),
    }
}

/// Saves and stores the slot; returns the snapshot's tokens and bytes when a new one was stored.
async fn save_slot(app: &Arc<App>, ready: &Arc<Ready>, lease: SlotLease, namespace: Namespace, tenant: String) -> Option<(usize, u64)> {
    let slot = lease.slot;
    let name = app.slot_file_name("save", slot);
    let path = app.config.engine.slot_dir.join(&name);

    // The engine is checked before and after the save, so the file cannot come from an engine
    // that replaced the probed one in between.
    if !app.engine_unchanged(ready).await {
        return None;
    }
    let saved = app.engine.save_slot(slot, &name).await;
    drop(lease);
    if let Err(error) = saved {
        tracing::warn!(slot, error = %error, "engine failed to save the slot; no snapshot taken");
        Counters::add(&app.counters.snapshots_failed, 1);
        let _ = tokio::fs::remove_file(&path).await;
        return None;
    }
    let parse_path = path.clone();
    let parsed = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&parse_path).map_err(slot_file::SlotFileError::Io).and_then(|file| slot_file::parse(std::io::BufReader::new(file)))
    })
    .await;
    let summary = match parsed {
        Ok(Ok(summary)) => summary,
        Ok(Err(error)) => {
            tracing::warn!(slot, file = %name, error = %error, "slot file saved by the engine is invalid; no snapshot taken");
            Counters::add(&app.counters.snapshots_failed, 1);
            let _ = tokio::fs::remove_file(&path).await;
            return None;
        }
        Err(error) => {
            tracing::error!(slot, error = %error, "slot file parse task failed");
            let _ = tokio::fs::remove_file(&path).await;
            return None;
        }
    };

    let remove = || async { let _ = tokio::fs::remove_file(&path).await; };
    if !app.engine_unchanged(ready).await {
        remove().await;
        return None;
    }
    if summary.layout != ready.info.fingerprint_inputs.layout {
        tracing::warn!(slot, file = %name, "slot file KV layout differs from the engine's probed layout; no snapshot taken, probing the engine again");
        Counters::add(&app.counters.snapshots_failed, 1);
        app.reprobe(ready, "engine KV layout changed since it was probed");
        remove().await;
        return None;
    }
    if summary.tokens.len() != summary.cells as usize {
        tracing::warn!(slot, tokens = summary.tokens.len(), cells = summary.cells, "slot file token count differs from its KV cell count; no snapshot taken");
        Counters::add(&app.counters.snapshots_failed, 1);
        remove().await;
        return None;
    }

    let id = sequence_id(&namespace, &summary.tokens);
    if app.store.contains(&id) {
        remove().await;
        return None;
    }
    let block = app.config.prefix.block_tokens.get();
    let new = NewSnapshot {
        id,
        namespace: namespace.0,
        fingerprint: ready.info.fingerprint.to_hex(),
        tenant,
        block_hashes: block_hashes(&namespace, &summary.tokens, block as usize),
        tokens: summary.tokens,
        block_tokens: block,
    };
    let store = app.store.clone();
    let file = path.clone();
    let inserted = tokio::task::spawn_blocking(move || store.insert(&new, &file).map(|evicted| (new, evicted))).await;
    remove().await;
    match inserted {
        Ok(Ok((_, None))) => {
            tracing::debug!(snapshot.id = %id, slot, "snapshot already stored");
            None
        }
        Ok(Ok((new, Some(evicted)))) => {
            Counters::add(&app.counters.snapshots_saved, 1);
            app.costs.observe_snapshot(new.tokens.len() as u64, summary.len);
            tracing::debug!(snapshot.id = %new.id, slot, tokens = new.tokens.len(), bytes = summary.len, evicted = evicted.len(), "snapshot stored");
            for victim in evicted {
                tracing::debug!(snapshot.id = %victim, reason = "capacity", "snapshot evicted");
            }
            Some((new.tokens.len(), summary.len))
        }
        Ok(Err(error)) => {
            tracing::warn!(snapshot.id = %id, error = %error, "failed to store snapshot");
            Counters::add(&app.counters.snapshots_failed, 1);
            None
        }
        Err(error) => {
            tracing::error!(snapshot.id = %id, error = %error, "snapshot store task failed");
            None
        }
    }
}

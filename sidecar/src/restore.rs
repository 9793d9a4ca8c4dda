//! The restore step: a stored snapshot written into the shared slot folder, verified, and loaded
//! into an engine slot before the request is forwarded.

use std::sync::Arc;

use crate::app::{App, Counters, Ready};
use crate::prefix::Namespace;
use crate::store::{PrefixMatch, StoreError};

/// Restores snapshot `found` of `namespace` into `slot`, which the caller holds. Returns the
/// tokens the slot now contains, or None when the restore did not happen (a miss: the request is
/// computed cold).
pub async fn into_slot(app: &Arc<App>, ready: &Ready, slot: u32, found: PrefixMatch, namespace: Namespace) -> Option<Vec<u32>> {
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

    if !app.engine_unchanged(ready).await {
        let _ = tokio::fs::remove_file(&path).await;
        return None;
    }
    let restored = app.engine.restore_slot(slot, &name).await;
    let _ = tokio::fs::remove_file(&path).await;
    match restored {
        Ok(outcome) if outcome.tokens as usize == tokens.len() => {
            tracing::debug!(snapshot.id = %id, slot, tokens = outcome.tokens, restore_ms = outcome.elapsed.as_secs_f64() * 1000.0, "snapshot restored");
            Counters::add(&app.counters.restores, 1);
            app.costs.observe_restore(u64::from(outcome.tokens), outcome.elapsed.as_secs_f64() * 1000.0);
            app.store.record_access(&id);
            ready.slots.set_tokens(slot, tokens.clone(), namespace);
            Some(tokens)
        }
        Ok(outcome) => {
            tracing::warn!(snapshot.id = %id, slot, restored = outcome.tokens, expected = tokens.len(), "engine restored a different token count; treating the slot as unknown");
            Counters::add(&app.counters.restores_failed, 1);
            ready.slots.set_foreign(slot, Vec::new());
            None
        }
        Err(error) => {
            // A failed restore leaves the engine's slot empty.
            tracing::warn!(snapshot.id = %id, slot, error = %error, "engine rejected the snapshot; computing the prompt instead");
            Counters::add(&app.counters.restores_failed, 1);
            ready.slots.set_foreign(slot, Vec::new());
            None
        }
    }
}

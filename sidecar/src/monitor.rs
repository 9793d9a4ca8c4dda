//! The engine monitor: probes the engine until it is ready, then watches its health and slot
//! activity to detect restarts, after which the slot table is rebuilt and the engine probed anew.

use std::sync::Arc;

use tokio::sync::watch;

use crate::app::{App, Ready};
use crate::slots::Slots;

/// Runs until `shutdown` changes, probing every `engine.probe_interval`.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(app.config.engine.probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = 0u64;
    let mut last_error = String::new();
    let mut last_task_id: Option<u64> = None;

    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = app.probe_now.notified() => {}
            _ = shutdown.changed() => return,
        }

        let Some(ready) = app.ready() else {
            match app.engine.probe().await {
                Ok(info) => {
                    generation += 1;
                    let observer = app.fleet.as_ref().map(|fleet| {
                        let journal = crate::peer::journal::SlotJournal { journal: fleet.journal.clone(), block_tokens: app.config.prefix.block_tokens.get() as usize };
                        Arc::new(journal) as Arc<dyn crate::slots::SlotObserver>
                    });
                    let slots = Slots::observed(info.total_slots, observer);
                    // The probe's completions ran in slot 0, so its contents belong to no request.
                    slots.set_foreign(0, Vec::new());
                    tracing::info!(
                        engine.url = %app.config.engine.url,
                        engine.model = %info.model_id,
                        engine.slots = info.total_slots,
                        engine.generation = generation,
                        fingerprint = %info.fingerprint,
                        "engine ready"
                    );
                    let ready_names = crate::proxy::completion::model_names(&app, &info);
                    for key in app.config.ledger.models.keys().filter(|key| !ready_names.contains(key)) {
                        tracing::warn!(
                            ledger.model = %key,
                            engine.model = %info.model_id,
                            engine.model_file = %info.fingerprint_inputs.model_file,
                            "ledger.models.{key:?} names no model this engine serves, so its price is never used; key it by the engine's model id, file name or one of engine.model_aliases"
                        );
                    }
                                        if let Some(reason) = &info.snapshots_disabled {
                        tracing::error!(reason = %reason, "snapshots disabled: the engine's slot files cannot be saved or restored");
                    }
                    last_task_id = app.engine.slot_activity().await.ok().and_then(|activity| activity.max_task_id);
                    app.set_ready(Ready { info, slots, generation });
                    last_error.clear();
                }
                Err(error) => {
                    let message = error.to_string();
                    if message != last_error {
                        tracing::warn!(engine.url = %app.config.engine.url, error = %message, "engine not ready");
                        last_error = message.clone();
                    }
                    let unreachable = matches!(error, crate::engine::EngineError::Unreachable { .. });
                    app.set_not_ready(message, unreachable);
                }
            }
            continue;
        };

        if !app.engine.healthy().await {
            tracing::warn!(engine.url = %app.config.engine.url, engine.generation = ready.generation, "engine health check failed; slot contents are forgotten until the engine is probed again");
            app.set_not_ready("engine health check failed".into(), true);
            last_task_id = None;
            continue;
        }

        match app.engine.identity().await {
            Ok(current) if ready.info.fingerprint_inputs.same_engine(&current) => {}
            Ok(_) => {
                tracing::warn!(engine.generation = ready.generation, "engine model or settings changed since it was probed; probing it again");
                app.set_not_ready("engine changed since it was probed".into(), false);
                last_task_id = None;
                continue;
            }
            Err(error) => {
                // An engine that passes its health check but fails the identity check is restarting
                // or failing, so it is probed again.
                tracing::warn!(engine.generation = ready.generation, error = %error, "engine identity check failed; probing it again");
                app.set_not_ready(format!("engine identity check failed: {error}"), true);
                last_task_id = None;
                continue;
            }
        }

        // Task ids only grow within one engine process, so a smaller maximum means a restart
        // that happened between two health checks.
        if let Ok(activity) = app.engine.slot_activity().await {
            let restarted = match (last_task_id, activity.max_task_id) {
                (Some(before), Some(now)) => now < before,
                (Some(_), None) => true,
                _ => false,
            };
            if restarted {
                tracing::warn!(engine.url = %app.config.engine.url, engine.generation = ready.generation, "engine restarted; probing it again");
                app.set_not_ready("engine restarted".into(), false);
                last_task_id = None;
                continue;
            }
            last_task_id = activity.max_task_id.or(last_task_id);
        }
    }
}

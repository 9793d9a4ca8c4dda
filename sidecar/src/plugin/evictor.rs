//! The evictor plugin: follows the store's snapshots and chooses which leave when the store
//! needs room. Its instance keeps state between calls, so calls run one at a time, and a fresh
//! instance first receives an insert event for every stored snapshot.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use kvsidecar_sdk::check;
use wasmtime::Store as WasmStore;

use super::bindings::evictor::EvictorPolicyPre;
use super::bindings::evictor::kvsidecar::policy::types as wit;
use super::runtime::HostState;
use super::{Instance, Interface, Kind, Plugin, describe};
use crate::config::OnFailure;
use crate::costs::Costs;
use crate::prefix::Digest;
use crate::store::{EvictionHook, SnapshotMeta, Store};

pub struct EvictorInterface;

impl Interface for EvictorInterface {
    const REUSE_CHECKED_INSTANCE: bool = false;
    const KIND: Kind = Kind::Evictor;
    type Pre = EvictorPolicyPre<HostState>;
    type Bindings = super::bindings::evictor::EvictorPolicy;

    fn pre(pre: wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<Self::Pre> {
        EvictorPolicyPre::new(pre)
    }

    fn instantiate(pre: &Self::Pre, store: &mut WasmStore<HostState>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }

    fn info(bindings: &Self::Bindings, store: &mut WasmStore<HostState>) -> wasmtime::Result<(String, String)> {
        let info = bindings.kvsidecar_policy_evictor().call_info(store)?;
        Ok((info.name, info.version))
    }

    fn init(bindings: &Self::Bindings, store: &mut WasmStore<HostState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        bindings.kvsidecar_policy_evictor().call_init(store, config)
    }

    fn smoke(bindings: &Self::Bindings, store: &mut WasmStore<HostState>) -> Result<(), String> {
        let evictor = bindings.kvsidecar_policy_evictor();
        let samples: Vec<wit::Snapshot> = (0..3u64)
            .map(|n| wit::Snapshot {
                id: format!("{n:064x}"),
                namespace: "0".repeat(64),
                bytes: (n + 1) << 20,
                tokens: 512,
                created_ms: 1_000 + n,
                last_access_ms: 1_000 + n,
                hits: n,
                recompute_cost_ms: 500.0,
            })
            .collect();
        for sample in &samples {
            evictor.call_on_insert(&mut *store, sample).map_err(|error| describe(&error))?;
        }
        let victims = evictor.call_choose_victims(&mut *store, 1 << 20).map_err(|error| describe(&error))?;
        check::victims(victims, samples.len(), |id| samples.iter().any(|sample| sample.id == id)).map_err(|invalid| invalid.to_string())?;
        Ok(())
    }
}

/// The evictor slot of a sidecar, installed in the store as its eviction hook.
pub struct EvictionPolicy {
    pub plugin: Plugin<EvictorInterface>,
    /// Held for each call: the instance's state must see events in order.
    serial: Mutex<()>,
    store: OnceLock<Weak<Store>>,
    costs: OnceLock<Arc<Costs>>,
}

impl EvictionPolicy {
    pub fn new(plugin: Plugin<EvictorInterface>) -> EvictionPolicy {
        EvictionPolicy { plugin, serial: Mutex::new(()), store: OnceLock::new(), costs: OnceLock::new() }
    }

    /// Connects the policy to `store` and installs it as the store's eviction hook.
    pub fn attach(self: &Arc<Self>, store: &Arc<Store>, costs: Arc<Costs>) {
        let _ = self.store.set(Arc::downgrade(store));
        let _ = self.costs.set(costs);
        store.set_eviction_hook(self.clone());
    }

    fn snapshot(&self, meta: &SnapshotMeta) -> wit::Snapshot {
        let recompute_cost_ms = self.costs.get().map(|costs| costs.recompute_ms(u64::from(meta.tokens))).unwrap_or(0.0);
        wit::Snapshot {
            id: meta.id.to_hex(),
            namespace: meta.namespace.to_hex(),
            bytes: meta.bytes,
            tokens: meta.tokens,
            created_ms: meta.created_ms,
            last_access_ms: meta.last_access_ms,
            hits: meta.hits,
            recompute_cost_ms,
        }
    }

    /// Runs `call` on the evictor's instance. A fresh instance first receives every stored snapshot.
    fn call<T>(&self, call: impl FnOnce(&mut Instance<EvictorInterface>) -> Result<T, String>) -> Option<Result<T, super::CallError>> {
        let _serial = self.serial.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.plugin.call(|instance| self.replay(instance), call)
    }

    /// Delivers the events of one store change. A fresh instance gets none of them: its replay
    /// read the store after the change, so it already reflects it.
    fn deliver(&self, events: impl FnOnce(&mut Instance<EvictorInterface>) -> Result<(), String>) {
        let replayed = Cell::new(false);
        let _serial = self.serial.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.plugin.call(
            |instance| {
                replayed.set(true);
                self.replay(instance)
            },
            |instance| if replayed.get() { Ok(()) } else { events(instance) },
        );
    }

    fn replay(&self, instance: &mut Instance<EvictorInterface>) -> Result<(), String> {
        let Some(store) = self.store.get().and_then(Weak::upgrade) else { return Ok(()) };
        let stored = store.list().map_err(|error| format!("cannot list the stored snapshots: {error}"))?;
        for meta in &stored {
            self.plugin.arm(&mut instance.store);
            let snapshot = self.snapshot(meta);
            instance.bindings.kvsidecar_policy_evictor().call_on_insert(&mut instance.store, &snapshot).map_err(|error| describe(&error))?;
        }
        Ok(())
    }
}

impl EvictionHook for EvictionPolicy {
    fn changed(&self, removed: &[Digest], inserted: Option<&SnapshotMeta>) {
        let inserted = inserted.map(|meta| self.snapshot(meta));
        self.deliver(|instance| {
            for id in removed {
                self.plugin.arm(&mut instance.store);
                instance.bindings.kvsidecar_policy_evictor().call_on_remove(&mut instance.store, &id.to_hex()).map_err(|error| describe(&error))?;
            }
            if let Some(snapshot) = &inserted {
                self.plugin.arm(&mut instance.store);
                instance.bindings.kvsidecar_policy_evictor().call_on_insert(&mut instance.store, snapshot).map_err(|error| describe(&error))?;
            }
            Ok(())
        });
    }

    fn accessed(&self, updated: &[SnapshotMeta]) {
        let snapshots: Vec<wit::Snapshot> = updated.iter().map(|meta| self.snapshot(meta)).collect();
        self.deliver(|instance| {
            for snapshot in &snapshots {
                self.plugin.arm(&mut instance.store);
                instance.bindings.kvsidecar_policy_evictor().call_on_access(&mut instance.store, snapshot).map_err(|error| describe(&error))?;
            }
            Ok(())
        });
    }

    fn choose_victims(&self, bytes: u64) -> Option<Vec<Digest>> {
        let store = self.store.get().and_then(Weak::upgrade);
        let stored_count = store.as_ref().map(|store| store.len()).unwrap_or(0);
        let stored = |id: &str| Digest::from_hex(id).is_some_and(|digest| store.as_ref().is_some_and(|store| store.contains(&digest)));
        let called = self.call(|instance| {
            let answer = instance.bindings.kvsidecar_policy_evictor().call_choose_victims(&mut instance.store, bytes).map_err(|error| describe(&error))?;
            let victims = check::victims(answer, stored_count, stored).map_err(|invalid| format!("invalid victims: {invalid}"))?;
            Ok(victims.iter().filter_map(|id| Digest::from_hex(id)).collect::<Vec<_>>())
        });
        match called {
            // No plugin: the store evicts least recently used snapshots itself.
            None => Some(Vec::new()),
            Some(Ok(victims)) => Some(victims),
            Some(Err(_)) if self.plugin.on_failure() == OnFailure::Reject => {
                self.plugin.rejections.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(Err(_)) => {
                self.plugin.fallbacks.fetch_add(1, Ordering::Relaxed);
                Some(Vec::new())
            }
        }
    }
}

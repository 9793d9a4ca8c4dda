//! The admission plugin: whether a finished request's slot is saved as a snapshot.

use std::sync::atomic::Ordering;

use kvsidecar_sdk::AdmissionCandidate;
use wasmtime::Store;

use super::bindings::admission::AdmissionPolicyPre;
use super::bindings::admission::kvsidecar::policy::types as wit;
use super::runtime::HostState;
use super::{Instance, Interface, Kind, Plugin, describe, native};
use crate::config::OnFailure;

pub struct AdmissionInterface;

impl Interface for AdmissionInterface {
    const REUSE_CHECKED_INSTANCE: bool = true;
    const KIND: Kind = Kind::Admission;
    type Pre = AdmissionPolicyPre<HostState>;
    type Bindings = super::bindings::admission::AdmissionPolicy;

    fn pre(pre: wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<Self::Pre> {
        AdmissionPolicyPre::new(pre)
    }

    fn instantiate(pre: &Self::Pre, store: &mut Store<HostState>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }

    fn info(bindings: &Self::Bindings, store: &mut Store<HostState>) -> wasmtime::Result<(String, String)> {
        let info = bindings.kvsidecar_policy_admission().call_info(store)?;
        Ok((info.name, info.version))
    }

    fn init(bindings: &Self::Bindings, store: &mut Store<HostState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        bindings.kvsidecar_policy_admission().call_init(store, config)
    }

    fn smoke(bindings: &Self::Bindings, store: &mut Store<HostState>) -> Result<(), String> {
        let sample = AdmissionCandidate { tokens: 1024, estimated_bytes: 1 << 20, recompute_cost_ms: 500.0, store_capacity: 1 << 30, ..Default::default() };
        bindings.kvsidecar_policy_admission().call_admit(store, &to_wit(&sample)).map(|_| ()).map_err(|error| describe(&error))
    }
}

/// The admission slot of a sidecar.
pub struct AdmissionPolicy {
    pub plugin: Plugin<AdmissionInterface>,
}

impl AdmissionPolicy {
    pub fn new(plugin: Plugin<AdmissionInterface>) -> AdmissionPolicy {
        AdmissionPolicy { plugin }
    }

    /// Returns whether to store `candidate`. A failed plugin call falls back to the built-in
    /// policy, or stores nothing with `on_failure = "reject"`.
    pub fn admit(&self, candidate: &AdmissionCandidate) -> bool {
        let called = self.plugin.call(
            |_| Ok(()),
            |instance: &mut Instance<AdmissionInterface>| {
                instance.bindings.kvsidecar_policy_admission().call_admit(&mut instance.store, &to_wit(candidate)).map_err(|error| describe(&error))
            },
        );
        match called {
            Some(Ok(admit)) => admit,
            Some(Err(_)) if self.plugin.on_failure() == OnFailure::Reject => {
                self.plugin.rejections.fetch_add(1, Ordering::Relaxed);
                false
            }
            Some(Err(_)) => {
                self.plugin.fallbacks.fetch_add(1, Ordering::Relaxed);
                native::admit(candidate.tokens, candidate.stored_tokens)
            }
            None => native::admit(candidate.tokens, candidate.stored_tokens),
        }
    }
}

fn to_wit(candidate: &AdmissionCandidate) -> wit::AdmissionCandidate {
    wit::AdmissionCandidate {
        namespace: candidate.namespace.clone(),
        tenant: candidate.tenant.clone(),
        tokens: candidate.tokens,
        stored_tokens: candidate.stored_tokens,
        estimated_bytes: candidate.estimated_bytes,
        recompute_cost_ms: candidate.recompute_cost_ms,
        store_bytes: candidate.store_bytes,
        store_capacity: candidate.store_capacity,
    }
}

//! The router plugin: which slot serves a request and where its KV comes from.

use std::sync::atomic::Ordering;

use kvsidecar_sdk::check::{self, Choice};
use kvsidecar_sdk::{Candidate, CandidateKind, Decision, Request, Tier};
use wasmtime::Store;

use super::bindings::router::RouterPolicyPre;
use super::bindings::router::kvsidecar::policy::types as wit;
use super::runtime::HostState;
use super::{CallError, Instance, Interface, Kind, Plugin, describe, native};
use crate::config::{Config, OnFailure};

pub struct RouterInterface;

impl Interface for RouterInterface {
    const REUSE_CHECKED_INSTANCE: bool = true;
    const KIND: Kind = Kind::Router;
    type Pre = RouterPolicyPre<HostState>;
    type Bindings = super::bindings::router::RouterPolicy;

    fn pre(pre: wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<Self::Pre> {
        RouterPolicyPre::new(pre)
    }

    fn instantiate(pre: &Self::Pre, store: &mut Store<HostState>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }

    fn info(bindings: &Self::Bindings, store: &mut Store<HostState>) -> wasmtime::Result<(String, String)> {
        let info = bindings.kvsidecar_policy_router().call_info(store)?;
        Ok((info.name, info.version))
    }

    fn init(bindings: &Self::Bindings, store: &mut Store<HostState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        bindings.kvsidecar_policy_router().call_init(store, config)
    }

    fn smoke(bindings: &Self::Bindings, store: &mut Store<HostState>) -> Result<(), String> {
        let request = Request { namespace: "0".repeat(64), prompt_tokens: 512, task_id: None, tenant: "default".into(), model: "sample".into() };
        let candidates = [Candidate::slot(0).matched(128).load(1, 0), Candidate::slot(1), Candidate::store(384)];
        let (wit_request, wit_candidates) = to_wit(&request, &candidates);
        let decision = bindings.kvsidecar_policy_router().call_route(store, &wit_request, &wit_candidates).map_err(|error| describe(&error))?;
        check_decision(decision, &candidates).map(|_| ())
    }
}

/// Source of a request's routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    Plugin,
    Builtin,
    /// The plugin failed and the built-in policy decided instead.
    Fallback,
}

/// A routing decision and who made it.
#[derive(Debug, Clone, Copy)]
pub struct RoutePlan {
    pub choice: Choice,
    pub decider: Decider,
}

/// The router slot of a sidecar.
pub struct RouterPolicy {
    pub plugin: Plugin<RouterInterface>,
    min_gain: u32,
}

impl RouterPolicy {
    pub fn new(plugin: Plugin<RouterInterface>, config: &Config) -> RouterPolicy {
        RouterPolicy { plugin, min_gain: config.snapshot.restore_min_gain }
    }

    /// Routes one request. Fails only when the plugin fails and `on_failure` is `reject`, or
    /// when no candidate can serve.
    pub fn route(&self, request: &Request, candidates: &[Candidate]) -> Result<RoutePlan, CallError> {
        let called = self.plugin.call(
            |_| Ok(()),
            |instance: &mut Instance<RouterInterface>| {
                let (wit_request, wit_candidates) = to_wit(request, candidates);
                let decision = instance.bindings.kvsidecar_policy_router().call_route(&mut instance.store, &wit_request, &wit_candidates).map_err(|error| describe(&error))?;
                check_decision(decision, candidates)
            },
        );
        let builtin = |decider| {
            native::route(candidates, self.min_gain)
                .map(|choice| RoutePlan { choice, decider })
                .ok_or_else(|| CallError { plugin: "builtin-router".into(), reason: "no engine slot among the candidates".into() })
        };
        match called {
            None => builtin(Decider::Builtin),
            Some(Ok(choice)) => Ok(RoutePlan { choice, decider: Decider::Plugin }),
            Some(Err(error)) if self.plugin.on_failure() == OnFailure::Reject => {
                self.plugin.rejections.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
            Some(Err(_)) => {
                self.plugin.fallbacks.fetch_add(1, Ordering::Relaxed);
                builtin(Decider::Fallback)
            }
        }
    }
}

fn check_decision(decision: wit::Decision, candidates: &[Candidate]) -> Result<Choice, String> {
    let kinds: Vec<CandidateKind> = candidates.iter().map(|candidate| candidate.kind).collect();
    let decision = Decision { scores: decision.scores, kv_source: decision.kv_source };
    check::decision(&decision, &kinds).map_err(|invalid| format!("invalid decision: {invalid}"))
}

/// Converts a request and its candidates into the interface's records.
pub fn to_wit(request: &Request, candidates: &[Candidate]) -> (wit::Request, Vec<wit::Candidate>) {
    let request = wit::Request {
        namespace: request.namespace.clone(),
        prompt_tokens: request.prompt_tokens,
        task_id: request.task_id.clone(),
        tenant: request.tenant.clone(),
        model: request.model.clone(),
    };
    let candidates = candidates
        .iter()
        .map(|candidate| wit::Candidate {
            id: candidate.id,
            kind: match candidate.kind {
                CandidateKind::EngineSlot => wit::CandidateKind::EngineSlot,
                CandidateKind::LocalStore => wit::CandidateKind::LocalStore,
                CandidateKind::Peer => wit::CandidateKind::Peer,
            },
            matched_tokens: candidate.matched_tokens,
            resident_tokens: candidate.resident_tokens,
            tier: match candidate.tier {
                Tier::Device => wit::Tier::Device,
                Tier::Host => wit::Tier::Host,
                Tier::Disk => wit::Tier::Disk,
                Tier::Remote => wit::Tier::Remote,
            },
            in_flight: candidate.in_flight,
            queue_depth: candidate.queue_depth,
            healthy: candidate.healthy,
            transfer_cost_ms: candidate.transfer_cost_ms,
            recompute_cost_ms: candidate.recompute_cost_ms,
        })
        .collect();
    (request, candidates)
}

//! Glue between the WebAssembly bindings of `wit/policy.wit` and the policy traits. The export
//! macros expand to calls into this module; it is public only for them.

use std::any::Any;
use std::cell::RefCell;

use crate::{Admission, Config, Evictor, Router};

/// Bindings of the `router-policy` world.
pub mod router {
    wit_bindgen::generate!({
        path: "wit",
        world: "router-policy",
        pub_export_macro: true,
        export_macro_name: "__export_router_policy",
        default_bindings_module: "kvsidecar_sdk::guest::router",
        runtime_path: "kvsidecar_sdk::guest::rt",
    });
}

/// Bindings of the `evictor-policy` world.
pub mod evictor {
    wit_bindgen::generate!({
        path: "wit",
        world: "evictor-policy",
        pub_export_macro: true,
        export_macro_name: "__export_evictor_policy",
        default_bindings_module: "kvsidecar_sdk::guest::evictor",
        runtime_path: "kvsidecar_sdk::guest::rt",
    });
}

/// Bindings of the `admission-policy` world.
pub mod admission {
    wit_bindgen::generate!({
        path: "wit",
        world: "admission-policy",
        pub_export_macro: true,
        export_macro_name: "__export_admission_policy",
        default_bindings_module: "kvsidecar_sdk::guest::admission",
        runtime_path: "kvsidecar_sdk::guest::rt",
    });
}

pub use wit_bindgen::rt;

thread_local! {
    /// The policy of this instance, built by `init`. A component instance runs one policy.
    static POLICY: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn init<P: 'static>(config: &str, new: impl FnOnce(&Config) -> Result<P, String>) -> Result<(), String> {
    let config = Config::parse(config)?;
    let policy = new(&config)?;
    config.finish()?;
    POLICY.with(|slot| *slot.borrow_mut() = Some(Box::new(policy)));
    Ok(())
}

/// Runs `call` on the instance's policy, building it with an empty config if `init` was skipped.
fn with_policy<P: 'static, T>(new: impl FnOnce(&Config) -> Result<P, String>, call: impl FnOnce(&mut P) -> T) -> T {
    POLICY.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.as_ref().is_none_or(|policy| !policy.is::<P>()) {
            let policy = new(&Config::default()).unwrap_or_else(|error| panic!("plugin called before init and its defaults fail: {error}"));
            *slot = Some(Box::new(policy));
        }
        let policy = slot.as_mut().and_then(|policy| policy.downcast_mut::<P>()).expect("policy type checked above");
        call(policy)
    })
}

mod convert {
    use super::{admission as a, evictor as e, router as r};
    use crate::{AdmissionCandidate, Candidate, CandidateKind, Decision, Request, Snapshot, Tier};

    type WitRequest = r::kvsidecar::policy::types::Request;
    type WitCandidate = r::kvsidecar::policy::types::Candidate;
    type WitDecision = r::kvsidecar::policy::types::Decision;
    type WitKind = r::kvsidecar::policy::types::CandidateKind;
    type WitTier = r::kvsidecar::policy::types::Tier;

    pub fn request(request: WitRequest) -> Request {
        Request { namespace: request.namespace, prompt_tokens: request.prompt_tokens, task_id: request.task_id, tenant: request.tenant, model: request.model }
    }

    pub fn candidate(candidate: WitCandidate) -> Candidate {
        Candidate {
            id: candidate.id,
            kind: match candidate.kind {
                WitKind::EngineSlot => CandidateKind::EngineSlot,
                WitKind::LocalStore => CandidateKind::LocalStore,
                WitKind::Peer => CandidateKind::Peer,
            },
            matched_tokens: candidate.matched_tokens,
            resident_tokens: candidate.resident_tokens,
            tier: match candidate.tier {
                WitTier::Device => Tier::Device,
                WitTier::Host => Tier::Host,
                WitTier::Disk => Tier::Disk,
                WitTier::Remote => Tier::Remote,
            },
            in_flight: candidate.in_flight,
            queue_depth: candidate.queue_depth,
            healthy: candidate.healthy,
            transfer_cost_ms: candidate.transfer_cost_ms,
            recompute_cost_ms: candidate.recompute_cost_ms,
        }
    }

    pub fn decision(decision: Decision) -> WitDecision {
        WitDecision { scores: decision.scores, kv_source: decision.kv_source }
    }

    pub fn snapshot(snapshot: e::kvsidecar::policy::types::Snapshot) -> Snapshot {
        Snapshot {
            id: snapshot.id,
            namespace: snapshot.namespace,
            bytes: snapshot.bytes,
            tokens: snapshot.tokens,
            created_ms: snapshot.created_ms,
            last_access_ms: snapshot.last_access_ms,
            hits: snapshot.hits,
            recompute_cost_ms: snapshot.recompute_cost_ms,
        }
    }

    pub fn admission_candidate(candidate: a::kvsidecar::policy::types::AdmissionCandidate) -> AdmissionCandidate {
        AdmissionCandidate {
            namespace: candidate.namespace,
            tenant: candidate.tenant,
            tokens: candidate.tokens,
            stored_tokens: candidate.stored_tokens,
            estimated_bytes: candidate.estimated_bytes,
            recompute_cost_ms: candidate.recompute_cost_ms,
            store_bytes: candidate.store_bytes,
            store_capacity: candidate.store_capacity,
        }
    }
}

/// Plugin name and version as the router world spells them.
pub fn router_info(name: &str, version: &str) -> router::kvsidecar::policy::types::PluginInfo {
    router::kvsidecar::policy::types::PluginInfo { name: name.into(), version: version.into() }
}

/// Plugin name and version as the evictor world spells them.
pub fn evictor_info(name: &str, version: &str) -> evictor::kvsidecar::policy::types::PluginInfo {
    evictor::kvsidecar::policy::types::PluginInfo { name: name.into(), version: version.into() }
}

/// Plugin name and version as the admission world spells them.
pub fn admission_info(name: &str, version: &str) -> admission::kvsidecar::policy::types::PluginInfo {
    admission::kvsidecar::policy::types::PluginInfo { name: name.into(), version: version.into() }
}

/// `router.init`.
pub fn router_init<R: Router>(config: &str) -> Result<(), String> {
    init(config, R::new)
}

/// `router.route`.
pub fn router_route<R: Router>(
    request: router::kvsidecar::policy::types::Request,
    candidates: Vec<router::kvsidecar::policy::types::Candidate>,
) -> router::kvsidecar::policy::types::Decision {
    let request = convert::request(request);
    let candidates: Vec<_> = candidates.into_iter().map(convert::candidate).collect();
    convert::decision(with_policy(R::new, |policy: &mut R| policy.route(&request, &candidates)))
}

/// `evictor.init`.
pub fn evictor_init<E: Evictor>(config: &str) -> Result<(), String> {
    init(config, E::new)
}

/// `evictor.on-insert`.
pub fn evictor_on_insert<E: Evictor>(snapshot: evictor::kvsidecar::policy::types::Snapshot) {
    with_policy(E::new, |policy: &mut E| policy.on_insert(convert::snapshot(snapshot)))
}

/// `evictor.on-access`.
pub fn evictor_on_access<E: Evictor>(snapshot: evictor::kvsidecar::policy::types::Snapshot) {
    with_policy(E::new, |policy: &mut E| policy.on_access(convert::snapshot(snapshot)))
}

/// `evictor.on-remove`.
pub fn evictor_on_remove<E: Evictor>(id: &str) {
    with_policy(E::new, |policy: &mut E| policy.on_remove(id))
}

/// `evictor.choose-victims`.
pub fn evictor_choose_victims<E: Evictor>(bytes: u64) -> Vec<String> {
    with_policy(E::new, |policy: &mut E| policy.choose_victims(bytes))
}

/// `admission.init`.
pub fn admission_init<A: Admission>(config: &str) -> Result<(), String> {
    init(config, A::new)
}

/// `admission.admit`.
pub fn admission_admit<A: Admission>(candidate: admission::kvsidecar::policy::types::AdmissionCandidate) -> bool {
    let candidate = convert::admission_candidate(candidate);
    with_policy(A::new, |policy: &mut A| policy.admit(&candidate))
}

/// Exports a [`Router`] type as the plugin's router.
#[macro_export]
macro_rules! export_router {
    ($policy:ty) => {
        const _: () = {
            use $crate::guest::router::exports::kvsidecar::policy::router as wit;
            use $crate::guest::router::kvsidecar::policy::types as wit_types;

            struct Export;

            impl wit::Guest for Export {
                fn info() -> wit_types::PluginInfo {
                    $crate::guest::router_info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
                }

                fn init(config: String) -> Result<(), String> {
                    $crate::guest::router_init::<$policy>(&config)
                }

                fn route(request: wit_types::Request, candidates: Vec<wit_types::Candidate>) -> wit_types::Decision {
                    $crate::guest::router_route::<$policy>(request, candidates)
                }
            }

            $crate::guest::router::__export_router_policy!(Export with_types_in $crate::guest::router);
        };
    };
}

/// Exports an [`Evictor`] type as the plugin's evictor.
#[macro_export]
macro_rules! export_evictor {
    ($policy:ty) => {
        const _: () = {
            use $crate::guest::evictor::exports::kvsidecar::policy::evictor as wit;
            use $crate::guest::evictor::kvsidecar::policy::types as wit_types;

            struct Export;

            impl wit::Guest for Export {
                fn info() -> wit_types::PluginInfo {
                    $crate::guest::evictor_info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
                }

                fn init(config: String) -> Result<(), String> {
                    $crate::guest::evictor_init::<$policy>(&config)
                }

                fn on_insert(snapshot: wit_types::Snapshot) {
                    $crate::guest::evictor_on_insert::<$policy>(snapshot)
                }

                fn on_access(snapshot: wit_types::Snapshot) {
                    $crate::guest::evictor_on_access::<$policy>(snapshot)
                }

                fn on_remove(id: String) {
                    $crate::guest::evictor_on_remove::<$policy>(&id)
                }

                fn choose_victims(bytes: u64) -> Vec<String> {
                    $crate::guest::evictor_choose_victims::<$policy>(bytes)
                }
            }

            $crate::guest::evictor::__export_evictor_policy!(Export with_types_in $crate::guest::evictor);
        };
    };
}

/// Exports an [`Admission`] type as the plugin's admission policy.
#[macro_export]
macro_rules! export_admission {
    ($policy:ty) => {
        const _: () = {
            use $crate::guest::admission::exports::kvsidecar::policy::admission as wit;
            use $crate::guest::admission::kvsidecar::policy::types as wit_types;

            struct Export;

            impl wit::Guest for Export {
                fn info() -> wit_types::PluginInfo {
                    $crate::guest::admission_info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
                }

                fn init(config: String) -> Result<(), String> {
                    $crate::guest::admission_init::<$policy>(&config)
                }

                fn admit(candidate: wit_types::AdmissionCandidate) -> bool {
                    $crate::guest::admission_admit::<$policy>(candidate)
                }
            }

            $crate::guest::admission::__export_admission_policy!(Export with_types_in $crate::guest::admission);
        };
    };
}

//! The policy-plugin SDK of kvsidecar: interfaces and types for routing, eviction and admission plugins.
#![forbid(unsafe_code)]

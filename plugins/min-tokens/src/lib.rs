//! Admission by prompt length and size: a finished request's slot is stored when it holds at
//! least `min_tokens` tokens, adds tokens to the store, and fits in `max_fraction` of the store's
//! capacity, so one huge prompt cannot flush the store.
//!
//! The sidecar never offers prompts shorter than its `snapshot.min_tokens`; `min_tokens` here
//! raises that floor for this policy only.
//!
//! Config keys: `min_tokens` (default 0), `max_fraction` (default 0.5).

use kvsidecar_sdk::{Admission, AdmissionCandidate, Config};

/// The min-tokens admission policy.
pub struct MinTokens {
    min_tokens: u64,
    max_fraction: f64,
}

impl Admission for MinTokens {
    fn new(config: &Config) -> Result<Self, String> {
        let min_tokens = config.u64("min_tokens", 0)?;
        let max_fraction = config.f64("max_fraction", 0.5)?;
        if !(max_fraction > 0.0 && max_fraction <= 1.0) {
            return Err(format!("config key `max_fraction`: {max_fraction} is not in (0, 1]"));
        }
        Ok(MinTokens { min_tokens, max_fraction })
    }

    fn admit(&mut self, candidate: &AdmissionCandidate) -> bool {
        let fits = candidate.store_capacity == 0 || (candidate.estimated_bytes as f64) <= self.max_fraction * candidate.store_capacity as f64;
        u64::from(candidate.tokens) >= self.min_tokens && candidate.tokens > candidate.stored_tokens && fits
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_admission!(MinTokens);

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::AdmissionCandidate;
    use kvsidecar_sdk::testing::AdmissionHarness;

    #[test]
    fn admit_long_new_fitting_prompts() {
        let mut admission = AdmissionHarness::<super::MinTokens>::new("min_tokens = 100").unwrap();
        let candidate = AdmissionCandidate { tokens: 150, estimated_bytes: 1000, store_capacity: 10_000, ..Default::default() };
        assert!(admission.admit(&candidate));
        assert!(!admission.admit(&AdmissionCandidate { tokens: 99, ..candidate.clone() }));
        assert!(!admission.admit(&AdmissionCandidate { stored_tokens: 150, ..candidate.clone() }));
        assert!(!admission.admit(&AdmissionCandidate { estimated_bytes: 6000, ..candidate }));
        assert!(AdmissionHarness::<super::MinTokens>::new("max_fraction = 0").is_err());
    }
}

//! The built-in policies: they decide when a kind has no plugin file, and for any call its
//! plugin fails.

use kvsidecar_sdk::check::Choice;
use kvsidecar_sdk::{Candidate, CandidateKind};

/// Built-in routing: the slot with the longest matched prefix, a free one on ties; when the
/// store holds at least `min_gain` more tokens than that slot, its snapshot is restored into the
/// free slot with the shortest match and fewest resident tokens.
pub fn route(candidates: &[Candidate], min_gain: u32) -> Option<Choice> {
    let slots = || candidates.iter().enumerate().filter(|(_, candidate)| candidate.kind == CandidateKind::EngineSlot);
    let (best, best_slot) = slots().max_by_key(|(index, candidate)| (candidate.matched_tokens, candidate.total_load() == 0, std::cmp::Reverse(*index)))?;
    let store = candidates.iter().enumerate().filter(|(_, candidate)| candidate.kind == CandidateKind::LocalStore).max_by_key(|(_, candidate)| candidate.matched_tokens);
    if let Some((source, stored)) = store
        && stored.matched_tokens > best_slot.matched_tokens.saturating_add(min_gain)
    {
        let target = slots().min_by_key(|(index, candidate)| (candidate.total_load(), candidate.matched_tokens, candidate.resident_tokens, *index)).map(|(index, _)| index)?;
        return Some(Choice { serve: target, kv_source: Some(source) });
    }
    Some(Choice { serve: best, kv_source: Some(best) })
}

/// Built-in admission: every snapshot that adds tokens to the store. The sidecar has already
/// skipped prompts shorter than `snapshot.min_tokens`.
pub fn admit(tokens: u32, stored_tokens: u32) -> bool {
    tokens > stored_tokens
}

#[cfg(test)]
mod tests {
    use kvsidecar_sdk::Candidate;

    #[test]
    fn route_prefers_store_only_past_gain() {
        let candidates = [Candidate::slot(0).matched(100).load(1, 0), Candidate::slot(1), Candidate::store(150)];
        let choice = super::route(&candidates, 64).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (0, Some(0)));
        let candidates = [Candidate::slot(0).matched(100).load(1, 0), Candidate::slot(1), Candidate::store(400)];
        let choice = super::route(&candidates, 64).unwrap();
        assert_eq!((choice.serve, choice.kv_source), (1, Some(2)));
    }
}

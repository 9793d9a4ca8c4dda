//! The checks kvsidecar applies to every plugin result. The host and the native test harnesses
//! both use them, so a policy that passes its tests is not rejected at run time.

use std::collections::HashSet;
use std::fmt;

use crate::{CandidateKind, Decision};

/// A valid router decision, as indexes into the candidate list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The candidate that serves the request: an engine slot or a peer.
    pub serve: usize,
    /// The candidate whose KV the request reuses; None computes the whole prompt.
    pub kv_source: Option<usize>,
}

/// Reason a router decision is invalid.
#[derive(Debug, Clone, PartialEq)]
pub enum InvalidDecision {
    /// The score list is not one score per candidate.
    WrongLength {
        /// Scores returned.
        scores: usize,
        /// Candidates offered.
        candidates: usize,
    },
    /// A score is NaN or infinite.
    NotFinite {
        /// Position of the score.
        index: usize,
        /// The score.
        value: f64,
    },
    /// No candidate that can serve was offered.
    NoServer,
    /// The KV source is past the end of the candidate list.
    KvSourceOutOfRange {
        /// The KV source returned.
        index: u32,
        /// Candidates offered.
        candidates: usize,
    },
    /// The KV source is an engine slot other than the serving one; KV does not move between slots.
    KvSourceOtherSlot {
        /// The KV source returned.
        index: usize,
        /// The serving candidate.
        serve: usize,
    },
}

impl fmt::Display for InvalidDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidDecision::WrongLength { scores, candidates } => write!(f, "returned {scores} scores for {candidates} candidates"),
            InvalidDecision::NotFinite { index, value } => write!(f, "score {index} is {value}; scores must be finite"),
            InvalidDecision::NoServer => write!(f, "no candidate can serve the request"),
            InvalidDecision::KvSourceOutOfRange { index, candidates } => write!(f, "kv-source {index} is out of range for {candidates} candidates"),
            InvalidDecision::KvSourceOtherSlot { index, serve } => {
                write!(f, "kv-source {index} is an engine slot other than the serving candidate {serve}")
            }
        }
    }
}

impl std::error::Error for InvalidDecision {}

/// Checks `decision` against the kinds of its candidates, and returns the serving
/// candidate (the highest-scoring one that can serve, the first on a tie) and the KV source.
pub fn decision(decision: &Decision, kinds: &[CandidateKind]) -> Result<Choice, InvalidDecision> {
    if decision.scores.len() != kinds.len() {
        return Err(InvalidDecision::WrongLength { scores: decision.scores.len(), candidates: kinds.len() });
    }
    if let Some((index, value)) = decision.scores.iter().enumerate().find(|(_, score)| !score.is_finite()) {
        return Err(InvalidDecision::NotFinite { index, value: *value });
    }
    let mut serve: Option<usize> = None;
    for (index, kind) in kinds.iter().enumerate() {
        if kind.can_serve() && serve.is_none_or(|best| decision.scores[index] > decision.scores[best]) {
            serve = Some(index);
        }
    }
    let serve = serve.ok_or(InvalidDecision::NoServer)?;
    let kv_source = match decision.kv_source {
        None => None,
        Some(index) if index as usize >= kinds.len() => return Err(InvalidDecision::KvSourceOutOfRange { index, candidates: kinds.len() }),
        Some(index) => {
            let index = index as usize;
            if index != serve && kinds[index] == CandidateKind::EngineSlot {
                return Err(InvalidDecision::KvSourceOtherSlot { index, serve });
            }
            Some(index)
        }
    };
    Ok(Choice { serve, kv_source })
}

/// Reason an evictor's victim list is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidVictims {
    /// An id that names no stored snapshot.
    Unknown(String),
    /// More ids than there are stored snapshots.
    TooMany {
        /// Ids returned.
        ids: usize,
        /// Snapshots stored.
        stored: usize,
    },
}

impl fmt::Display for InvalidVictims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidVictims::Unknown(id) if id.chars().count() > 80 => write!(f, "a victim id of {} characters is not a stored snapshot", id.chars().count()),
            InvalidVictims::Unknown(id) => write!(f, "victim {id:?} is not a stored snapshot"),
            InvalidVictims::TooMany { ids, stored } => write!(f, "{ids} victim ids for {stored} stored snapshots"),
        }
    }
}

impl std::error::Error for InvalidVictims {}

/// Checks that `victims` has at most one id per stored snapshot (`stored` of them) and that every
/// id names a stored snapshot, and returns the ids without repeats, in their order.
pub fn victims(victims: Vec<String>, stored: usize, is_stored: impl Fn(&str) -> bool) -> Result<Vec<String>, InvalidVictims> {
    if victims.len() > stored {
        return Err(InvalidVictims::TooMany { ids: victims.len(), stored });
    }
    let mut seen = HashSet::new();
    let mut unique = Vec::with_capacity(victims.len());
    for id in victims {
        if !is_stored(&id) {
            return Err(InvalidVictims::Unknown(id));
        }
        if seen.insert(id.clone()) {
            unique.push(id);
        }
    }
    Ok(unique)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CandidateKind::{EngineSlot, LocalStore};

    fn scored(scores: &[f64], kv_source: Option<u32>) -> Decision {
        Decision { scores: scores.to_vec(), kv_source }
    }

    #[test]
    fn decision_serves_highest_score_first_on_tie() {
        let kinds = [EngineSlot, LocalStore, EngineSlot, EngineSlot];
        assert_eq!(decision(&scored(&[1.0, 9.0, 3.0, 3.0], Some(1)), &kinds), Ok(Choice { serve: 2, kv_source: Some(1) }));
        assert_eq!(decision(&scored(&[0.0, 0.0, 0.0, 0.0], None), &kinds), Ok(Choice { serve: 0, kv_source: None }));
    }

    #[test]
    fn decision_malformed_is_rejected() {
        let kinds = [EngineSlot, LocalStore, EngineSlot];
        assert!(matches!(decision(&scored(&[], None), &kinds), Err(InvalidDecision::WrongLength { scores: 0, candidates: 3 })));
        assert!(matches!(decision(&scored(&[1.0, f64::NAN, 0.0], None), &kinds), Err(InvalidDecision::NotFinite { index: 1, .. })));
        assert!(matches!(decision(&scored(&[1.0, 0.0, 0.0], Some(3)), &kinds), Err(InvalidDecision::KvSourceOutOfRange { .. })));
        assert!(matches!(decision(&scored(&[1.0, 0.0, 0.0], Some(2)), &kinds), Err(InvalidDecision::KvSourceOtherSlot { index: 2, serve: 0 })));
        assert_eq!(decision(&scored(&[1.0], None), &[LocalStore]), Err(InvalidDecision::NoServer));
    }

    #[test]
    fn victims_unknown_rejected_repeats_dropped() {
        let stored = |id: &str| id == "a" || id == "b";
        assert_eq!(victims(vec!["a".into(), "b".into(), "a".into()], 3, stored), Ok(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(victims(vec!["a".into(), "z".into()], 3, stored), Err(InvalidVictims::Unknown("z".into())));
        assert_eq!(victims(vec!["a".into(); 3], 2, stored), Err(InvalidVictims::TooMany { ids: 3, stored: 2 }));
    }
}

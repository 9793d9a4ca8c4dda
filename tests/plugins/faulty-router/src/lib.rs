//! Test router that fails on purpose. It serves every request on the second candidate, except
//! requests whose task id is `fault`, for which it does what its `fault` config key names:
//!
//! | fault | behaviour |
//! | --- | --- |
//! | `loop` | never returns |
//! | `memory` | allocates until the memory cap stops it |
//! | `trap` | panics, which traps |
//! | `wrong-length` | returns one score more than there are candidates |
//! | `nan` | returns NaN scores |
//! | `empty` | returns no scores |

use kvsidecar_sdk::{Candidate, Config, Decision, Request, Router};

pub struct FaultyRouter {
    fault: String,
    /// Memory held by the `memory` fault, so the allocations are not optimised away.
    hoard: Vec<Vec<u8>>,
}

impl Router for FaultyRouter {
    fn new(config: &Config) -> Result<Self, String> {
        let fault = config.string("fault", "trap")?;
        const FAULTS: [&str; 6] = ["loop", "memory", "trap", "wrong-length", "nan", "empty"];
        if !FAULTS.contains(&fault.as_str()) {
            return Err(format!("config key `fault`: {fault:?} is not one of {}", FAULTS.join(", ")));
        }
        Ok(FaultyRouter { fault, hoard: Vec::new() })
    }

    fn route(&mut self, request: &Request, candidates: &[Candidate]) -> Decision {
        let mut decision = Decision::serve(1.min(candidates.len().saturating_sub(1)), candidates.len());
        if request.task_id.as_deref() != Some("fault") {
            return decision;
        }
        match self.fault.as_str() {
            "loop" => {
                let mut counter = 0u64;
                loop {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            "memory" => loop {
                let mut block = vec![0u8; 1 << 20];
                block[0] = 1;
                self.hoard.push(std::hint::black_box(block));
            },
            "trap" => panic!("faulty-router was asked to fail"),
            "wrong-length" => decision.scores.push(0.0),
            "nan" => decision.scores.iter_mut().for_each(|score| *score = f64::NAN),
            _ => decision.scores.clear(),
        }
        decision
    }
}

#[cfg(target_arch = "wasm32")]
kvsidecar_sdk::export_router!(FaultyRouter);

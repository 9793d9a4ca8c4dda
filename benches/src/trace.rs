//! Mooncake-format request traces turned into token-id prompts.
//!
//! A trace line is `{"timestamp", "input_length", "output_length", "hash_ids"}`, where each hash
//! id names a 512-token block of the original prompt. Here every id becomes `block_tokens`
//! deterministic token ids, and lengths are scaled by `block_tokens / 512`, so two requests that
//! share leading ids share exactly that token prefix.
//!
//! With `--sessions N` only the first N conversations are kept: a conversation is the requests
//! whose first two block ids are equal, and it counts when it has at least two requests in the
//! whole trace. Their requests keep their trace order and interleaving. One node cannot compute
//! the whole trace in minutes, and one-off requests in between would only add cold prefill.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

/// Tokens per block in the original trace.
pub const TRACE_BLOCK_TOKENS: u32 = 512;

/// Scaling of a trace to what the machine serves.
#[derive(Debug, Clone, clap::Args)]
pub struct Scale {
    /// Skip this many requests at the start of the trace.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Number of requests to replay.
    #[arg(long, default_value_t = 40)]
    pub requests: usize,
    /// Keep only the requests of the first N multi-request conversations (0 keeps every request).
    #[arg(long, default_value_t = 0)]
    pub sessions: usize,
    /// Tokens each trace block becomes.
    #[arg(long, default_value_t = 64)]
    pub block_tokens: u32,
    /// Maximum prompt length sent, in tokens. Longer prompts keep their leading blocks.
    #[arg(long, default_value_t = 3000)]
    pub max_prompt_tokens: u32,
    /// Most output tokens requested.
    #[arg(long, default_value_t = 16)]
    pub max_output_tokens: u32,
    /// First token id used for prompt tokens, past the vocabulary's control and byte tokens.
    #[arg(long, default_value_t = 261)]
    pub first_token: u32,
    /// Number of distinct token ids prompts are drawn from.
    #[arg(long, default_value_t = 300)]
    pub token_range: u32,
}

#[derive(Deserialize)]
struct Line {
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// A request ready to send.
pub struct Request {
    pub prompt: Vec<u32>,
    pub output_tokens: u32,
}

/// Returns the token ids of trace block `id`: the same id always gives the same tokens.
pub fn block(id: u64, scale: &Scale) -> Vec<u32> {
    let mut state = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..scale.block_tokens)
        .map(|_| {
            // SplitMix64: a fixed, well-mixed sequence per block id.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            scale.first_token + (z % u64::from(scale.token_range)) as u32
        })
        .collect()
}

/// Reads the requests `offset..offset + requests` of the trace at `path`, scaled.
pub fn load(path: &Path, scale: &Scale) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read trace {}", path.display()))?;
    let mut lines = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line: Line = serde_json::from_str(line).with_context(|| format!("trace line {}", number + 1))?;
        lines.push(line);
    }
    if scale.sessions > 0 {
        lines = first_sessions(lines, scale.sessions);
    }

    let mut requests = Vec::new();
    for line in lines.into_iter().skip(scale.offset).take(scale.requests) {
        let length = (u64::from(line.input_length) * u64::from(scale.block_tokens) / u64::from(TRACE_BLOCK_TOKENS)) as usize;
        let length = length.clamp(1, scale.max_prompt_tokens as usize);
        let mut prompt = Vec::with_capacity(length);
        for id in &line.hash_ids {
            if prompt.len() >= length {
                break;
            }
            prompt.extend(block(*id, scale));
        }
        prompt.truncate(length);
        let output_tokens = line.output_length.clamp(1, scale.max_output_tokens);
        requests.push(Request { prompt, output_tokens });
    }
    Ok(requests)
}

/// Keeps the requests of the first `count` conversations that have at least two requests.
fn first_sessions(lines: Vec<Line>, count: usize) -> Vec<Line> {
    let key = |line: &Line| (line.hash_ids.len() >= 2).then(|| (line.hash_ids[0], line.hash_ids[1]));
    let mut sizes: HashMap<(u64, u64), usize> = HashMap::new();
    for session in lines.iter().filter_map(key) {
        *sizes.entry(session).or_default() += 1;
    }
    let mut chosen = HashSet::new();
    for session in lines.iter().filter_map(key) {
        if chosen.len() == count {
            break;
        }
        if sizes[&session] >= 2 {
            chosen.insert(session);
        }
    }
    lines.into_iter().filter(|line| key(line).is_some_and(|session| chosen.contains(&session))).collect()
}

//! One replayed trace request: sending it and what it cost.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::client::post_streaming;

/// Cost of one replayed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub index: usize,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub source: String,
    /// Position of the target the request was sent to.
    #[serde(default)]
    pub target: usize,
    /// The node that served it (`x-kvsidecar-served-by`), when a sidecar responded.
    #[serde(default)]
    pub served_by: Option<String>,
    pub ttft_ms: f64,
    pub total_ms: f64,
}

/// Sends one streaming completion of `prompt` (token ids or text), with the fields of `extra`
/// added to the body, and measures the time to its first content event. `prompt_tokens` is the
/// count recorded when the engine reports none.
pub async fn send(target: &str, index: usize, (prompt, prompt_tokens): (serde_json::Value, u64), output_tokens: u32, extra: &serde_json::Map<String, serde_json::Value>) -> Result<Record> {
    let mut body = serde_json::json!({
        "prompt": prompt,
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(object) = body.as_object_mut() {
        object.extend(extra.iter().map(|(key, value)| (key.clone(), value.clone())));
    }
    let streamed = post_streaming(&format!("{target}/v1/completions"), &body).await.with_context(|| format!("request {index}"))?;
    let source = streamed.header("x-kvsidecar-cache-source").unwrap_or("-").to_string();
    let header_cached = streamed.header("x-kvsidecar-cached-tokens").and_then(|v| v.parse().ok());

    // The last events carry the engine's own counts.
    let mut prompt_tokens = prompt_tokens;
    let mut cached_tokens = header_cached.unwrap_or(0);
    for line in streamed.text.lines().filter_map(|line| line.strip_prefix("data: ")) {
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(n) = event.pointer("/usage/prompt_tokens").and_then(|v| v.as_u64()) {
                prompt_tokens = n;
            }
            // llama-server reports reused tokens in its timings, and OpenAI-style in the usage.
            if let Some(n) = event.pointer("/timings/cache_n").or_else(|| event.pointer("/usage/prompt_tokens_details/cached_tokens")).and_then(|v| v.as_u64()) {
                cached_tokens = n;
            }
        }
    }
    Ok(Record {
        index,
        prompt_tokens,
        cached_tokens,
        source,
        target: 0,
        served_by: streamed.header("x-kvsidecar-served-by").map(str::to_string),
        ttft_ms: streamed.first_frame.as_secs_f64() * 1000.0,
        total_ms: streamed.total.as_secs_f64() * 1000.0,
    })
}


/// Returns the prompt tokens of `prompts` that an unbounded prefix cache could have reused: for
/// each prompt, its longest common prefix with any earlier prompt, less one token, because an
/// engine computes at least the last prompt token.
pub fn ideal_reuse(prompts: &[&[u32]]) -> u64 {
    let mut total = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let longest = prompts[..i].iter().map(|earlier| kvsidecar::prefix::common_prefix(earlier, prompt)).max().unwrap_or(0);
        total += longest.min(prompt.len().saturating_sub(1)) as u64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ideal_reuse_counts_the_longest_earlier_prefix() {
        let (a, b, c): (&[u32], &[u32], &[u32]) = (&[1, 2, 3, 4], &[1, 2, 9], &[1, 2, 3, 4]);
        // b reuses 2 tokens of a; c repeats a, and the last token is computed again.
        assert_eq!(ideal_reuse(&[a, b, c]), 2 + 3);
    }
}

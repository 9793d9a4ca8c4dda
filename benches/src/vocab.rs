//! Text prompts with a known token count. Routers that balance on prompt text (SGLang's accepts
//! no token ids at all) need text, and a benchmark needs to know what the engine will compute.
//! The generated models' vocabularies hold pieces that start with a word-boundary marker. The
//! tokenizer produces the short ones whole (two letters, or one letter or digit). Text of those
//! words, separated by single spaces, is one token per word.

use anyhow::{Context, Result, bail};
use kvsidecar_tests::{Reply, get, post_json};
use serde_json::json;

/// Words that are one token each in the engine's vocabulary, in token-id order.
#[derive(Debug, Clone)]
pub struct Words(Vec<String>);

impl Words {
    /// Reads the engine's vocabulary through `/detokenize`. Keeps each token that is a space
    /// followed by ASCII letters or digits and that `/tokenize` gives back as one token. The word
    /// is tokenized without its space, because the tokenizer adds the word boundary at the start
    /// of a text itself. Then
    /// checks that a text of all of them tokenizes to exactly one token a word.
    pub async fn from_engine(engine_url: &str) -> Result<Words> {
        let models = json(get(&format!("{engine_url}/v1/models")).await?, "/v1/models")?;
        let vocabulary = models.pointer("/data/0/meta/n_vocab").and_then(|n| n.as_u64()).context("/v1/models gives no n_vocab")?;
        let mut words = Vec::new();
        for id in 0..vocabulary {
            let reply = json(post_json(&format!("{engine_url}/detokenize"), &json!({"tokens": [id]})).await?, "/detokenize")?;
            let piece = reply["content"].as_str().unwrap_or_default().to_string();
            let Some(word) = piece.strip_prefix(' ') else { continue };
            if word.is_empty() || !word.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
                continue;
            }
            // The tokenizer puts a word boundary before the text's start, as the space does.
            let alone = json(post_json(&format!("{engine_url}/tokenize"), &json!({"content": word})).await?, "/tokenize")?;
            if alone["tokens"].as_array().is_some_and(|tokens| tokens.len() == 1) {
                words.push(word.to_string());
            }
        }
        if words.len() < 16 {
            bail!("the engine's vocabulary has only {} whole-word tokens; the benchmark needs a model from scripts/make_model.py", words.len());
        }
        let words = Words(words);
        let text = words.text((0..words.len() as u64).collect::<Vec<_>>().as_slice());
        let tokens = json(post_json(&format!("{engine_url}/tokenize"), &json!({"content": text})).await?, "/tokenize")?;
        let count = tokens["tokens"].as_array().map_or(0, Vec::len);
        if count != words.len() {
            bail!("{} words tokenize to {count} tokens; expected one token a word", words.len());
        }
        Ok(words)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Returns the words as a lua table constructor.
    pub fn lua_table(&self) -> String {
        let quoted: Vec<String> = self.0.iter().map(|word| format!("\"{word}\"")).collect();
        format!("{{{}}}", quoted.join(","))
    }

    /// Returns the text of `indices`, each taken modulo the number of words, separated by spaces.
    pub fn text(&self, indices: &[u64]) -> String {
        let mut text = String::with_capacity(indices.len() * 6);
        for (n, index) in indices.iter().enumerate() {
            if n > 0 {
                text.push(' ');
            }
            text.push_str(&self.0[(*index % self.0.len() as u64) as usize]);
        }
        text
    }
}

/// Returns the JSON body of an engine reply, failing on a non-2xx status or a body that is not JSON.
pub fn json(reply: Reply, path: &str) -> Result<serde_json::Value> {
    if !(200..300).contains(&reply.status) {
        bail!("the engine returned {} for {path}: {}", reply.status, String::from_utf8_lossy(&reply.body));
    }
    serde_json::from_slice(&reply.body).with_context(|| format!("the engine's {path} reply is not JSON"))
}

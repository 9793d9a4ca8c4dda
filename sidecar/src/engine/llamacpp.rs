//! The engine adapter for llama.cpp's `llama-server`.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use http::Method;
use serde_json::{Value, json};

use super::slot_file::{self, SlotFileSummary};
use super::{
    Engine, EngineClient, EngineError, EngineInfo, Fingerprint, FingerprintInputs, SlotActivity,
    SlotRestored, SlotSaved,
};
use crate::config::EngineConfig;
use crate::request::Endpoint;

/// Time allowed for the engine's small control calls (health, props, tokenize).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Name of the slot file the layout probe writes; it is removed after use.
const PROBE_FILE_NAME: &str = "kvsidecar-probe.bin";

/// A `llama-server` process reached over HTTP.
pub struct LlamaCpp {
    client: EngineClient,
    config: EngineConfig,
    slot_timeout: Duration,
}

impl LlamaCpp {
    pub fn new(config: &EngineConfig) -> LlamaCpp {
        let client = EngineClient::new(config.url.clone(), config.connect_timeout, config.response_timeout);
        LlamaCpp { client, config: config.clone(), slot_timeout: config.response_timeout }
    }

    async fn get(&self, path: &str) -> Result<Value, EngineError> {
        self.client.json(Method::GET, path, None, CONTROL_TIMEOUT).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, EngineError> {
        self.client.json(Method::POST, path, Some(body), CONTROL_TIMEOUT).await
    }

    async fn tokenize(&self, content: &Value) -> Result<Vec<u32>, EngineError> {
        let answer = self.post("/tokenize", &json!({"content": content, "add_special": true, "parse_special": true})).await?;
        let tokens = answer.get("tokens").and_then(Value::as_array).ok_or_else(|| invalid("/tokenize", "missing tokens array"))?;
        tokens
            .iter()
            .map(|token| token.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| invalid("/tokenize", "token id is not a u32")))
            .collect()
    }

    /// Saves slot 0 to a probe file and parses it, filling the slot first when it is empty, so
    /// the fingerprint carries the KV layout the engine really uses.
    async fn probe_layout(&self) -> Result<SlotFileSummary, EngineError> {
        // A fixed name: when the engine writes into a folder the sidecar cannot see, each start
        // overwrites the same file there instead of leaving a new one.
        let name = PROBE_FILE_NAME.to_string();
        let path = self.config.slot_dir.join(&name);
        let mut summary = self.save_and_parse(&name, &path).await?;
        if summary.layout.is_none() {
            let tokens = self.tokenize(&json!("kvsidecar layout probe")).await?;
            let body = json!({"prompt": tokens, "n_predict": 1, "id_slot": 0, "cache_prompt": true, "temperature": 0.0});
            self.client.json(Method::POST, "/completion", Some(&body), self.slot_timeout).await?;
            summary = self.save_and_parse(&name, &path).await?;
        }
        Ok(summary)
    }

    /// Generates a few tokens greedily from a fixed prompt in slot 0. Models of the same name and
    /// shape with other weights generate other tokens, which the reported metadata cannot show.
    async fn probe_output(&self) -> Result<Vec<u32>, EngineError> {
        let prompt = self.tokenize(&json!("kvsidecar fingerprint probe: the cache")).await?;
        let body = json!({
            "prompt": prompt, "n_predict": 8, "id_slot": 0, "cache_prompt": false,
            "temperature": 0.0, "top_k": 1, "ignore_eos": true, "return_tokens": true,
        });
        let answer = self.client.json(Method::POST, "/completion", Some(&body), self.slot_timeout).await?;
        let tokens = answer.get("tokens").and_then(Value::as_array).ok_or_else(|| invalid("/completion", "missing tokens array"))?;
        Ok(tokens.iter().filter_map(|token| token.as_u64().and_then(|id| u32::try_from(id).ok())).collect())
    }

    async fn save_and_parse(&self, name: &str, path: &PathBuf) -> Result<SlotFileSummary, EngineError> {
        match self.save_slot(0, name).await {
            Err(EngineError::Status { message, .. }) if message.contains("slot-save-path") => {
                return Err(EngineError::SlotApi(format!(
                    "llama-server was started without --slot-save-path; start it with --slot-save-path {}",
                    self.config.slot_dir.display()
                )));
            }
            other => other?,
        };
        let file = std::fs::File::open(path).map_err(|error| {
            EngineError::SlotApi(format!(
                "the engine saved a slot file that is not in {} ({error}); start llama-server with \
                 --slot-save-path pointing at the same folder as kvsidecar's engine.slot_dir",
                self.config.slot_dir.display()
            ))
        })?;
        let parsed = slot_file::parse(std::io::BufReader::new(file));
        let _ = std::fs::remove_file(path);
        parsed.map_err(|error| EngineError::SlotFile { path: path.display().to_string(), reason: error.to_string() })
    }
}

fn invalid(path: &str, detail: &str) -> EngineError {
    EngineError::InvalidResponse { path: path.into(), detail: detail.into() }
}

fn number(value: &Value, pointer: &str, path: &str) -> Result<u64, EngineError> {
    value.pointer(pointer).and_then(Value::as_u64).ok_or_else(|| invalid(path, &format!("missing number {pointer}")))
}

fn text(value: &Value, pointer: &str) -> String {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string()
}

#[async_trait]
impl Engine for LlamaCpp {
    async fn probe(&self) -> Result<EngineInfo, EngineError> {
        self.get("/health").await?;
        let mut inputs = self.identity().await?;
        let (layout, snapshots_disabled) = match self.probe_layout().await {
            Ok(summary) => (summary.layout, None),
            Err(EngineError::SlotApi(reason)) => (None, Some(reason)),
            Err(error) => return Err(error),
        };
        inputs.layout = layout;
        inputs.probe_output = self.probe_output().await?;

        let to_u32 = |value: u64, what: &str| u32::try_from(value).map_err(|_| invalid("/props", &format!("{what} {value} is out of range")));
        Ok(EngineInfo {
            model_id: inputs.model_id.clone(),
            total_slots: to_u32(inputs.total_slots, "total_slots")?,
            slot_context: to_u32(inputs.slot_context, "n_ctx")?,
            n_vocab: to_u32(inputs.n_vocab, "n_vocab")?,
            fingerprint: Fingerprint::of(&inputs),
            fingerprint_inputs: inputs,
            snapshots_disabled,
        })
    }

    async fn identity(&self) -> Result<FingerprintInputs, EngineError> {
        let props = self.get("/props").await?;
        let models = self.get("/v1/models").await?;
        let model_path = text(&props, "/model_path");
        let model_file = std::path::Path::new(&model_path).file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let model_id = text(&models, "/data/0/id");
        if model_id.is_empty() {
            return Err(invalid("/v1/models", "missing data[0].id"));
        }
        let meta = |key: &str| number(&models, &format!("/data/0/meta/{key}"), "/v1/models");
        Ok(FingerprintInputs {
            engine: "llama.cpp".into(),
            model_id,
            model_file,
            model_ftype: text(&props, "/model_ftype"),
            n_vocab: meta("n_vocab")?,
            n_ctx_train: meta("n_ctx_train")?,
            n_embd: meta("n_embd")?,
            n_params: meta("n_params")?,
            model_bytes: meta("size")?,
            slot_context: number(&props, "/default_generation_settings/n_ctx", "/props")?,
            total_slots: number(&props, "/total_slots", "/props")?,
            cache_type_k: self.config.cache_type_k,
            cache_type_v: self.config.cache_type_v,
            flash_attention: self.config.flash_attention,
            unified_kv: self.config.unified_kv,
            layout: None,
            probe_output: Vec::new(),
        })
    }

    async fn healthy(&self) -> bool {
        self.client.json(Method::GET, "/health", None, self.config.probe_interval.max(Duration::from_secs(1))).await.is_ok()
    }

    async fn slot_activity(&self) -> Result<SlotActivity, EngineError> {
        let slots = self.get("/slots").await?;
        let max_task_id = slots.as_array().and_then(|list| list.iter().filter_map(|slot| slot.get("id_task").and_then(Value::as_u64)).max());
        Ok(SlotActivity { max_task_id })
    }

    async fn prompt_tokens(&self, endpoint: Endpoint, body: &Value) -> Result<Vec<u32>, EngineError> {
        let prompt = match endpoint {
            Endpoint::ChatCompletions => {
                let rendered = self.post("/apply-template", body).await?;
                let prompt = rendered.get("prompt").and_then(Value::as_str).ok_or_else(|| invalid("/apply-template", "missing prompt string"))?;
                Value::String(prompt.to_string())
            }
            Endpoint::Completions | Endpoint::NativeCompletion => body.get("prompt").cloned().unwrap_or(Value::Null),
        };
        // A prompt of token ids is evaluated as given. Strings and mixed arrays go through the
        // engine's tokenizer with the same flags its completion handler uses.
        if let Some(ids) = prompt.as_array().and_then(|items| items.iter().map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok())).collect::<Option<Vec<u32>>>()) {
            return Ok(ids);
        }
        self.tokenize(&prompt).await
    }

    fn pin_to_slot(&self, body: &mut Value, slot: u32) {
        if let Some(object) = body.as_object_mut() {
            object.insert("id_slot".into(), json!(slot));
            object.entry("cache_prompt").or_insert(json!(true));
        }
    }

    async fn save_slot(&self, slot: u32, file_name: &str) -> Result<SlotSaved, EngineError> {
        let path = format!("/slots/{slot}?action=save");
        let answer = self.client.json(Method::POST, &path, Some(&json!({"filename": file_name})), self.slot_timeout).await?;
        Ok(SlotSaved {
            tokens: number(&answer, "/n_saved", &path)? as u32,
            bytes: number(&answer, "/n_written", &path)?,
        })
    }

    async fn restore_slot(&self, slot: u32, file_name: &str) -> Result<SlotRestored, EngineError> {
        let path = format!("/slots/{slot}?action=restore");
        let answer = self.client.json(Method::POST, &path, Some(&json!({"filename": file_name})), self.slot_timeout).await?;
        let elapsed_ms = answer.pointer("/timings/restore_ms").and_then(Value::as_f64).unwrap_or_default();
        Ok(SlotRestored {
            tokens: number(&answer, "/n_restored", &path)? as u32,
            elapsed: Duration::from_secs_f64(elapsed_ms.max(0.0) / 1000.0),
        })
    }

    fn client(&self) -> &EngineClient {
        &self.client
    }

    fn cached_tokens_in_response(&self, body: &Value) -> Option<u32> {
        body.pointer("/timings/cache_n")
            .or_else(|| body.pointer("/usage/prompt_tokens_details/cached_tokens"))
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    }
}

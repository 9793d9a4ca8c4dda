//! Parsing and validation of completion requests: the fields the cache depends on, checked
//! before anything reaches the engine.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The completion endpoints whose prompts the sidecar caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /completion`, llama.cpp's native endpoint.
    NativeCompletion,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" | "/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" | "/completions" => Some(Endpoint::Completions),
            "/completion" => Some(Endpoint::NativeCompletion),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::NativeCompletion => "completion",
        }
    }
}

/// The cache-relevant fields of a valid completion request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub endpoint: Endpoint,
    /// The body with kvsidecar's own fields (`cache_salt`) removed, as it is sent to the engine.
    pub body: Value,
    pub model: Option<String>,
    pub stream: bool,
    pub cache_salt: Option<String>,
    /// Slot the client asked for with `id_slot`, if any.
    pub requested_slot: Option<u32>,
    /// False for a batch of prompts, which is forwarded without slot pinning or snapshots.
    pub single_prompt: bool,
}

/// Parses a request body for `endpoint`, rejecting invalid input with an error that names the field.
pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<CompletionRequest, ApiError> {
    if let Err(error) = std::str::from_utf8(bytes) {
        return Err(ApiError::invalid_utf8(error.valid_up_to()));
    }
    let body: Value = serde_json::from_slice(bytes).map_err(ApiError::invalid_json)?;
    let Value::Object(mut object) = body else {
        return Err(ApiError::invalid_json("the body is not a JSON object"));
    };

    let model = optional_string(&object, "model")?;
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err(ApiError::wrong_type("stream", "a boolean")),
    };
    let cache_salt = optional_string(&object, "cache_salt")?;
    object.remove("cache_salt");
    let requested_slot = match object.get("id_slot") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => None,
        Some(Value::Number(n)) => Some(n.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
            ApiError::invalid_value("id_slot", format!("invalid id_slot {n}: expected a slot number from 0, or -1 for any slot"))
        })?),
        Some(_) => return Err(ApiError::wrong_type("id_slot", "an integer")),
    };

    let single_prompt = match endpoint {
        Endpoint::ChatCompletions => {
            check_messages(&object)?;
            true
        }
        Endpoint::Completions | Endpoint::NativeCompletion => check_prompt(&object)?,
    };

    Ok(CompletionRequest { endpoint, body: Value::Object(object), model, stream, cache_salt, requested_slot, single_prompt })
}

fn optional_string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ApiError::wrong_type(field, "a string")),
    }
}

fn check_messages(object: &Map<String, Value>) -> Result<(), ApiError> {
    let messages = match object.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::missing_field("messages", "a chat completion needs a list of {\"role\", \"content\"} messages"));
        }
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::wrong_type("messages", "an array of message objects")),
    };
    if messages.is_empty() {
        return Err(ApiError::invalid_value("messages", "'messages' is empty; send at least one message".into()));
    }
    for (index, message) in messages.iter().enumerate() {
        let field = format!("messages[{index}]");
        let Value::Object(message) = message else {
            return Err(ApiError::wrong_type(&field, "an object with 'role' and 'content'"));
        };
        let role = match message.get("role") {
            Some(Value::String(role)) => role.as_str(),
            None => return Err(ApiError::missing_field(&format!("{field}.role"), "every message needs a role such as \"user\"")),
            Some(_) => return Err(ApiError::wrong_type(&format!("{field}.role"), "a string")),
        };
        match message.get("content") {
            // Only an assistant message may omit its content, when it carries tool calls instead.
            None | Some(Value::Null) if role != "assistant" => {
                return Err(ApiError::missing_field(&format!("{field}.content"), &format!("a {role} message needs content")));
            }
            None | Some(Value::Null | Value::String(_) | Value::Array(_)) => {}
            Some(_) => return Err(ApiError::wrong_type(&format!("{field}.content"), "a string or an array of content parts")),
        }
    }
    Ok(())
}

/// Checks `prompt` and returns whether it is a single prompt (a string, or an array of token ids
/// and strings) rather than a batch (an array of prompts).
fn check_prompt(object: &Map<String, Value>) -> Result<bool, ApiError> {
    let expected = "a string, an array of token ids, or an array of prompts";
    match object.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::missing_field("prompt", "a completion needs a prompt string or token ids")),
        Some(Value::String(_)) => Ok(true),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::invalid_value("prompt", "'prompt' is an empty array; send a string or token ids".into()));
            }
            let mut strings = 0;
            for item in items {
                match item {
                    Value::Number(n) if n.as_u64().is_some_and(|id| id <= u64::from(u32::MAX)) => {}
                    Value::Number(n) => {
                        return Err(ApiError::invalid_value("prompt", format!("invalid token id {n} in 'prompt': token ids are non-negative integers")));
                    }
                    Value::String(_) => strings += 1,
                    Value::Array(_) | Value::Object(_) => return Ok(false),
                    _ => return Err(ApiError::wrong_type("prompt", expected)),
                }
            }
            // Several strings alone are a batch of prompts; ids with at most one string are one prompt.
            Ok(strings <= 1 || strings < items.len())
        }
        Some(_) => Err(ApiError::wrong_type("prompt", expected)),
    }
}

#[cfg(test)]
mod tests;

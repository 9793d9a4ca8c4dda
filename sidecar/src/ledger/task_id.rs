//! Task ids: read from the configured request header, or generated for a request that has none.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::LedgerConfig;
use crate::error::ApiError;

/// Maximum length of a task id, in bytes.
pub const MAX_TASK_ID_LEN: usize = 256;

/// Prefix of generated task ids.
const GENERATED_PREFIX: &str = "req-";

/// The task a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskId {
    id: String,
    /// True for an id the sidecar generated because the request carried none: the request is a
    /// task of its own.
    generated: bool,
}

/// A task id that breaks the rules, from a request header or a URL path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskIdError {
    #[error("header {header} appears more than once; send exactly one task id")]
    RepeatedHeader { header: http::HeaderName },
    #[error("invalid header {header} value {value:?} of {length} bytes: a task id is 1 to {MAX_TASK_ID_LEN} visible ASCII characters, without spaces")]
    InvalidHeader {
        header: http::HeaderName,
        /// The value, cut to 64 characters for the message.
        value: String,
        length: usize,
    },
    #[error("invalid task id {value:?} of {length} bytes: a task id is 1 to {MAX_TASK_ID_LEN} visible ASCII characters, without spaces")]
    Invalid {
        /// The id, cut to 64 characters for the message.
        value: String,
        length: usize,
    },
}

impl From<TaskIdError> for ApiError {
    /// Maps the error to a 400 that names the header or the id.
    fn from(error: TaskIdError) -> ApiError {
        let field = match &error {
            TaskIdError::RepeatedHeader { header } | TaskIdError::InvalidHeader { header, .. } => header.as_str().to_string(),
            TaskIdError::Invalid { .. } => "task_id".to_string(),
        };
        ApiError::invalid_value(&field, error.to_string())
    }
}

fn valid(text: &str) -> bool {
    (1..=MAX_TASK_ID_LEN).contains(&text.len()) && text.bytes().all(|byte| byte.is_ascii_graphic())
}

impl TaskId {
    /// Parses a task id given by a client: 1 to 256 visible ASCII characters.
    pub fn parse(text: &str) -> Result<TaskId, TaskIdError> {
        if valid(text) {
            Ok(TaskId { id: text.to_string(), generated: false })
        } else {
            // The value goes into an error message, so it is cut to a readable length.
            let value: String = text.chars().take(64).collect();
            Err(TaskIdError::Invalid { value, length: text.len() })
        }
    }

    /// Generates an id `req-` followed by 16 random hex digits, for a request without a task id.
    pub fn generate() -> TaskId {
        let mut bytes = [0u8; 8];
        if let Err(error) = getrandom::fill(&mut bytes) {
            // A process counter and the clock still give ids unique within this ledger.
            static FALLBACK: AtomicU64 = AtomicU64::new(0);
            let count = FALLBACK.fetch_add(1, Ordering::Relaxed);
            if count == 0 {
                tracing::warn!(error = %error, "the system random source failed; task ids of requests without a task header come from the clock");
            }
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_nanos()).unwrap_or_default();
            let digest = blake3::hash(format!("{nanos}/{}/{count}", std::process::id()).as_bytes());
            bytes.copy_from_slice(&digest.as_bytes()[..8]);
        }
        TaskId { id: format!("{GENERATED_PREFIX}{}", hex::encode(bytes)), generated: true }
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Returns whether the sidecar generated the id, which makes the request a task of its own.
    pub fn is_generated(&self) -> bool {
        self.generated
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Returns the task of a request: the value of `config.task_header`, or a generated id when the
/// header is absent. A repeated header or an invalid value is an error, which the caller returns
/// as a 400 response.
pub fn task_id(headers: &http::HeaderMap, config: &LedgerConfig) -> Result<TaskId, TaskIdError> {
    let header = &config.task_header;
    let mut values = headers.get_all(header).iter();
    let Some(value) = values.next() else { return Ok(TaskId::generate()) };
    if values.next().is_some() {
        return Err(TaskIdError::RepeatedHeader { header: header.clone() });
    }
    match value.to_str() {
        Ok(text) if valid(text) => Ok(TaskId { id: text.to_string(), generated: false }),
        _ => {
            let text = String::from_utf8_lossy(value.as_bytes());
            Err(TaskIdError::InvalidHeader { header: header.clone(), value: text.chars().take(64).collect(), length: value.len() })
        }
    }
}

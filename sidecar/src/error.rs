//! Client-facing errors in OpenAI's error shape, each mapped to its HTTP status and a stable code.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use serde_json::json;

use crate::engine::EngineError;
use crate::proxy::ResponseBody;

/// An error returned to the client as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI error type, such as `invalid_request_error`.
    pub kind: &'static str,
    /// Stable machine-readable code, such as `missing_field`.
    pub code: &'static str,
    /// The request field the error is about, if any.
    pub param: Option<String>,
    pub message: String,
}

impl ApiError {
    fn invalid_request(code: &'static str, param: Option<&str>, message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            param: param.map(str::to_string),
            message,
        }
    }

    pub fn invalid_json(detail: impl std::fmt::Display) -> ApiError {
        Self::invalid_request("invalid_json", None, format!("request body is not valid JSON: {detail}; send a JSON object"))
    }

    pub fn invalid_utf8(offset: usize) -> ApiError {
        Self::invalid_request("invalid_utf8", None, format!("request body is not valid UTF-8 at byte {offset}; send UTF-8 encoded JSON"))
    }

    pub fn missing_field(field: &str, hint: &str) -> ApiError {
        Self::invalid_request("missing_field", Some(field), format!("missing required field '{field}': {hint}"))
    }

    pub fn wrong_type(field: &str, expected: &str) -> ApiError {
        Self::invalid_request("invalid_type", Some(field), format!("invalid type for '{field}': expected {expected}"))
    }

    pub fn invalid_value(field: &str, message: String) -> ApiError {
        Self::invalid_request("invalid_value", Some(field), message)
    }

    pub fn body_too_large(limit: u64) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            code: "body_too_large",
            param: None,
            message: format!("request body is larger than the limit of {limit} bytes; send a smaller body or raise server.max_body"),
        }
    }

    pub fn body_timeout(after: std::time::Duration) -> ApiError {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: "invalid_request_error",
            code: "body_timeout",
            param: None,
            message: format!("the request body did not arrive within {}; send it faster or raise server.body_timeout", humantime::format_duration(after)),
        }
    }

    pub fn unknown_model(requested: &str, known: &[String]) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            param: Some("model".into()),
            message: format!("model '{requested}' is not served here; use one of: {}", known.join(", ")),
        }
    }

    pub fn not_ready(reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: "engine_not_ready",
            param: None,
            message: format!("the inference engine is not ready: {reason}; retry shortly"),
        }
    }

    /// Returns the 503 for a failed policy plugin whose `on_failure` setting is `reject`.
    pub fn policy_failed(error: &crate::plugin::CallError) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: "policy_failed",
            param: None,
            message: format!("{error}; plugins.router.on_failure is \"reject\", so the request was not served. Retry, or set on_failure = \"fallback\""),
        }
    }

    pub fn engine_down(reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "server_error",
            code: "engine_unreachable",
            param: None,
            message: format!("the inference engine is down: {reason}; check that llama-server is running at engine.url"),
        }
    }

    pub fn method_not_allowed(method: &http::Method, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "invalid_request_error",
            code: "method_not_allowed",
            param: None,
            message: format!("{method} is not allowed on {path}; use POST"),
        }
    }

    pub fn not_passed_through(method: &http::Method, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_IMPLEMENTED,
            kind: "invalid_request_error",
            code: "not_passed_through",
            param: None,
            message: format!(
                "{method} {path} is not passed through: the engine would place it in a slot that may hold another tenant's KV; \
                 use /v1/chat/completions, /v1/completions or /completion"
            ),
        }
    }

    pub fn forbidden(path: &str, reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "invalid_request_error",
            code: "forbidden",
            param: None,
            message: format!("{path} is not available through kvsidecar: {reason}"),
        }
    }

    pub fn internal(message: String) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", code: "internal_error", param: None, message }
    }

    /// Maps a failed upstream call: unreachable engine is 502, a slow one 504.
    pub fn from_engine(error: &EngineError) -> ApiError {
        let (status, code) = match error {
            EngineError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "engine_timeout"),
            EngineError::Unreachable { .. } => (StatusCode::BAD_GATEWAY, "engine_unreachable"),
            EngineError::Status { status, message, .. } if *status < 500 => {
                return ApiError {
                    status: StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
                    kind: "invalid_request_error",
                    code: "engine_rejected_request",
                    param: None,
                    message: format!("the engine rejected the request: {message}"),
                };
            }
            _ => (StatusCode::BAD_GATEWAY, "engine_error"),
        };
        ApiError { status, kind: "server_error", code, param: None, message: error.to_string() }
    }

    /// Reshapes an engine's error response (`status`, JSON `body`) into the OpenAI error shape.
    /// The engine's 4xx statuses are kept, and its 5xx statuses become 502.
    pub fn engine_rejected(status: StatusCode, body: &[u8]) -> ApiError {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let detail = parsed
            .as_ref()
            .and_then(|value| value.pointer("/error/message").or_else(|| value.get("message")).and_then(serde_json::Value::as_str))
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
        if status.is_client_error() {
            ApiError {
                status,
                kind: "invalid_request_error",
                code: "engine_rejected_request",
                param: None,
                message: format!("the engine rejected the request: {detail}"),
            }
        } else {
            ApiError {
                status: StatusCode::BAD_GATEWAY,
                kind: "server_error",
                code: "engine_error",
                param: None,
                message: format!("the engine failed with HTTP {}: {detail}", status.as_u16()),
            }
        }
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let body = json!({
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        });
        let mut response = Response::new(crate::proxy::full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        if self.code == "method_not_allowed" {
            // Completion endpoints accept POST only.
            response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        response
    }
}

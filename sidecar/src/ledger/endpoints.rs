//! HTTP views of the ledger: `GET /v1/tasks/{id}` on the client listener, for the tenant of the
//! request, and `GET /admin/tasks` on the admin listener, across tenants.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;

use super::{Ledger, LedgerError, TaskId, TaskReport, TopBy, TotalsReport};
use crate::app::App;
use crate::error::ApiError;
use crate::proxy::{ResponseBody, json_response};

/// Path of one task on the client listener, followed by the task id.
pub const TASK_PATH: &str = "/v1/tasks/";

/// Tasks listed by `/admin/tasks` when `top` is not given, and the most it accepts.
const DEFAULT_TOP: usize = 20;
const MAX_TOP: usize = 10_000;

/// Splits a query string into percent-decoded `name=value` pairs.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text: &str| percent_encoding::percent_decode_str(&text.replace('+', " ")).decode_utf8_lossy().into_owned();
            (decode(name), decode(value))
        })
        .collect()
}

/// Builds a JSON response that keeps the fields in the order of their struct.
fn ordered_json(status: StatusCode, value: &impl Serialize) -> Response<ResponseBody> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(crate::proxy::full(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => ApiError::internal(format!("failed to encode a ledger report: {error}")).into_response(),
    }
}

fn ledger_disabled() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "ledger_disabled",
        param: None,
        message: "the cost ledger is disabled on this sidecar; set ledger.enabled = true to record tasks".into(),
    }
}

fn ledger_failed(error: &LedgerError) -> ApiError {
    let code = if matches!(error, LedgerError::Damaged { .. }) { "ledger_damaged" } else { "ledger_error" };
    tracing::error!(error = %error, "ledger read failed");
    ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", code, param: None, message: error.to_string() }
}

/// Serves `/v1/tasks/{id}`: 200 with the task and its request records (`?requests=false` omits
/// them), 404 for a task the tenant does not have, 400 for an invalid id or query.
pub async fn task(app: Arc<App>, request: Request<Incoming>, path: &str) -> Response<ResponseBody> {
    if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        let message = format!("{} is not allowed on {path}; use GET", request.method());
        let mut response = ApiError { status: StatusCode::METHOD_NOT_ALLOWED, kind: "invalid_request_error", code: "method_not_allowed", param: None, message }.into_response();
        response.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
        return response;
    }
    match read_task(&app, &request, path).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn read_task(app: &Arc<App>, request: &Request<Incoming>, path: &str) -> Result<Response<ResponseBody>, ApiError> {
    let ledger = app.ledger.clone().ok_or_else(ledger_disabled)?;
    let id = path.strip_prefix(TASK_PATH).unwrap_or_default();
    if id.is_empty() {
        return Err(ApiError::invalid_value("task_id", format!("missing task id: request {TASK_PATH}{{id}}, such as {TASK_PATH}build-42")));
    }
    let id = TaskId::parse(id)?;
    let mut with_requests = true;
    for (name, value) in query_pairs(request.uri().query()) {
        with_requests = match (name.as_str(), value.as_str()) {
            ("requests", "true" | "1") => true,
            ("requests", "false" | "0") => false,
            ("requests", other) => return Err(ApiError::invalid_value("requests", format!("invalid requests={other:?}: use true or false"))),
            (other, _) => return Err(ApiError::invalid_value(other, format!("unknown query parameter {other:?}; the only parameter is requests=true|false"))),
        };
    }
    let tenant = crate::proxy::completion::tenant_of(app, request.headers())?;

    let reading = ledger.clone();
    let (tenant_id, task_id) = (tenant.clone(), id.as_str().to_string());
    let found = tokio::task::spawn_blocking(move || reading.task(&tenant_id, &task_id, with_requests))
        .await
        .map_err(|error| ApiError::internal(format!("ledger read task failed: {error}")))?
        .map_err(|error| ledger_failed(&error))?;
    match found {
        Some(report) => Ok(ordered_json(StatusCode::OK, &report)),
        None => Err(task_not_found(app, &ledger, &tenant, &id)),
    }
}

fn task_not_found(app: &App, ledger: &Ledger, tenant: &str, id: &TaskId) -> ApiError {
    let config = ledger.config();
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "task_not_found",
        param: Some("task_id".into()),
        message: format!(
            "no task {:?} for tenant {tenant:?}: a task appears once a request with the header {}: {id} has finished, stays for {} after its last request, and is visible only to its own tenant (header {})",
            id.as_str(),
            config.task_header,
            humantime::format_duration(config.retention),
            app.config.request.tenant_header,
        ),
    }
}

/// Serves `GET /admin/tasks?top=N&by=cost|saved|requests|recent` with the top tasks of all
/// tenants and the totals of this process.
pub async fn admin_tasks(app: &Arc<App>, query: Option<&str>) -> Response<ResponseBody> {
    let bad_request = |message: String, param: &str| json_response(StatusCode::BAD_REQUEST, &json!({"error": {"message": message, "code": "invalid_value", "param": param}}));
    let Some(ledger) = app.ledger.clone() else {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": {"message": ledger_disabled().message, "code": "ledger_disabled"}}));
    };
    let (mut top, mut by) = (DEFAULT_TOP, TopBy::Cost);
    for (name, value) in query_pairs(query) {
        match name.as_str() {
            "top" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_TOP).contains(&n) => top = n,
                _ => return bad_request(format!("invalid top={value:?}: use a number of tasks from 1 to {MAX_TOP}"), "top"),
            },
            "by" => match TopBy::parse(&value) {
                Some(order) => by = order,
                None => return bad_request(format!("invalid by={value:?}: use cost, saved, requests or recent"), "by"),
            },
            other => return bad_request(format!("unknown query parameter {other:?}; the parameters are top=N and by=cost|saved|requests|recent"), other),
        }
    }
    let reading = ledger.clone();
    let ranked = tokio::task::spawn_blocking(move || reading.top(top, by)).await;
    let tasks = match ranked {
        Ok(Ok(tasks)) => tasks,
        Ok(Err(error)) => {
            tracing::error!(error = %error, "ledger read failed");
            return json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": error.to_string(), "code": "ledger_error"}}));
        }
        Err(error) => return json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": {"message": format!("ledger read task failed: {error}"), "code": "internal_error"}})),
    };
    let currency = ledger.config().currency.clone();
    let totals = TotalsReport::new(&ledger.totals(), &currency);
    ordered_json(StatusCode::OK, &TaskList { by: by.as_str(), currency, tasks, totals })
}

/// The response of `/admin/tasks`.
#[derive(Serialize)]
struct TaskList {
    by: &'static str,
    currency: String,
    tasks: Vec<TaskReport>,
    /// Totals of what this sidecar process committed since it started.
    totals: TotalsReport,
}

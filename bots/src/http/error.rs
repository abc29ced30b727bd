//! API errors in OpenAI's JSON shape, with honest status codes and no internals.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use natter_shared::proto::ErrorCode;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_request",
            message: message.into(),
        }
    }

    /// OpenAI's answer to a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: "invalid_api_key",
            message: message.into(),
        }
    }

    pub fn unknown_model(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            message: format!("the model `{model}` does not exist; GET /v1/models lists the models being served"),
        }
    }

    pub fn no_worker(model: &str) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: "no_worker",
            message: format!("no worker serves `{model}` right now; start one with `natter-worker --serve {model}`"),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: "unavailable",
            message: message.into(),
        }
    }

    /// The model's queue is full: OpenAI's 429, which its clients retry
    /// after the `Retry-After` the response carries.
    pub fn busy(model: &str) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "server_error",
            code: "fleet_busy",
            message: format!("every worker serving `{model}` is busy and its queue is full; try again shortly"),
        }
    }

    pub fn timeout() -> Self {
        ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            kind: "server_error",
            code: "timeout",
            message: "the job did not finish in time; it was cancelled".into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "not_found",
            message: message.into(),
        }
    }

    /// A job's `failed` event, as the HTTP answer.
    pub fn from_job(code: ErrorCode, message: String) -> Self {
        let (status, name) = match code {
            ErrorCode::MalformedJob => (StatusCode::BAD_REQUEST, "malformed_job"),
            ErrorCode::BadInput => (StatusCode::BAD_REQUEST, "bad_input"),
            ErrorCode::InvalidParams => (StatusCode::BAD_REQUEST, "invalid_params"),
            ErrorCode::PromptTooLong => (StatusCode::BAD_REQUEST, "context_length_exceeded"),
            ErrorCode::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ErrorCode::UnknownModel => (StatusCode::NOT_FOUND, "model_not_found"),
            ErrorCode::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
            ErrorCode::RetriesExhausted => (StatusCode::BAD_GATEWAY, "retries_exhausted"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
        ApiError { status, kind, code: name, message }
    }

    pub fn cancelled() -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            kind: "invalid_request_error",
            code: "cancelled",
            message: "the job was cancelled".into(),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": null, "code": self.code }
        })
    }
}

/// Seconds a client is asked to wait when the fleet is busy: about the time
/// a short chat takes, so a slot has likely come free.
pub const BUSY_RETRY_AFTER_SECS: u32 = 5;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, BUSY_RETRY_AFTER_SECS.into());
        }
        response
    }
}

impl From<crate::client::ClientError> for ApiError {
    fn from(e: crate::client::ClientError) -> Self {
        if let crate::client::ClientError::Busy { model } = &e {
            return ApiError::busy(model);
        }
        tracing::error!("job client: {e}");
        ApiError::unavailable("the job queue is unreachable; try again shortly")
    }
}

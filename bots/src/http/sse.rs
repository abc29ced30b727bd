//! Server-Sent Events as the dashboard's streaming endpoints write them: a named
//! event with a JSON payload, and failures as an `error` event carrying the
//! same message, code and status an HTTP error would.

use super::error::ApiError;
use axum::response::sse::Event;
use serde_json::{json, Value};

pub fn json_event(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

pub fn error_event(e: &ApiError) -> Event {
    json_event("error", json!({ "message": e.message, "code": e.code, "status": e.status.as_u16() }))
}

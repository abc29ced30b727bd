//! The dashboard: one self-contained page (no JS build step) plus the small JSON
//! endpoints it uses beyond the OpenAI API.

use super::auth::Caller;
use super::error::ApiError;
use super::AppState;
use axum::extract::{Extension, Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use uuid::Uuid;

const PAGE: &str = include_str!("dashboard.html");

pub async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], PAGE)
}

/// The live workers and what they serve.
pub async fn fleet(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "workers": state.fleet.workers().await }))
}

/// Stops a job on the worker. Accepts the bare job id or the `chatcmpl-` id
/// the completions API returns. With API keys, only the key's own jobs: any
/// other id is answered as one that does not exist.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: Uuid =
        id.strip_prefix("chatcmpl-").unwrap_or(&id).parse().map_err(|_| ApiError::bad_request("not a job id"))?;
    if let Caller(Some(user)) = &caller {
        if state.jobs.owner(id).as_ref() != Some(user) {
            return Err(ApiError::not_found("no such job of yours"));
        }
    }
    state.jobs.cancel(id).await?;
    Ok(Json(serde_json::json!({ "cancelled": id })))
}

//! `POST /api/ner`: text in, entities with character offsets out.

use super::auth::Caller;
use super::error::ApiError;
use super::openai::resolve_model;
use super::AppState;
use crate::client::JobEnd;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Extension;
use axum::Json;
use natter_shared::proto::{Job, JobInput, JobKind, JobResult, NerInput, Origin};
use serde::Deserialize;

/// Longest text accepted, in characters (the worker enforces the same limit).
pub const MAX_TEXT_CHARS: usize = 100_000;

#[derive(Deserialize)]
pub struct NerRequest {
    text: String,
    #[serde(default)]
    model: Option<String>,
}

pub async fn ner(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NerRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if request.text.trim().is_empty() {
        return Err(ApiError::bad_request("the text is empty"));
    }
    let chars = request.text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(ApiError::from_job(
            natter_shared::proto::ErrorCode::TooLarge,
            format!("the text is {chars} characters; the limit is {MAX_TEXT_CHARS}"),
        ));
    }
    let model = resolve_model(&state, request.model.as_deref(), JobKind::Ner).await?;
    let origin = Origin { frontend: "http".into(), user: caller.user(None), conversation: None };
    let mut job = Job::new(model.clone(), origin, JobInput::Ner(NerInput { text: request.text }));
    job.deadline = Some(job.created_at + state.job_timeout);
    let outcome =
        tokio::time::timeout(state.job_timeout, state.jobs.run_job(&job)).await.map_err(|_| ApiError::timeout())?;
    match outcome {
        Ok((JobResult::Ner { entities }, metrics)) => {
            Ok(Json(serde_json::json!({ "id": job.id, "model": model, "entities": entities, "metrics": metrics })))
        }
        Ok(_) => Err(ApiError::unavailable("the worker returned a result of another kind")),
        Err(JobEnd::Failed { code, message }) => Err(ApiError::from_job(code, message)),
        Err(JobEnd::Cancelled) => Err(ApiError::cancelled()),
        Err(JobEnd::Lost(e)) => Err(e.into()),
    }
}

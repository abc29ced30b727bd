//! The HTTP front-end: the OpenAI-compatible API and the dashboard, one router.

mod audio;
pub mod auth;
mod dashboard;
pub mod error;
mod followed;
mod health;
mod ner;
mod ocr;
pub mod openai;
mod sse;
mod upload;

use crate::client::JobClient;
use crate::fleet::Fleet;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use natter_shared::catalog::Catalog;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct AppState {
    pub jobs: JobClient,
    pub fleet: Fleet,
    pub catalog: Arc<Catalog>,
    pub job_timeout: Duration,
    /// Largest uploaded file (audio, image) accepted, in bytes.
    pub max_upload: usize,
    /// The API's keys; empty leaves it open.
    pub api_keys: auth::ApiKeys,
}

pub fn app(state: AppState) -> Router {
    // Only the upload routes take bodies this large; the rest keep axum's 2 MB.
    let uploads = DefaultBodyLimit::max(state.max_upload.saturating_add(upload::FORM_OVERHEAD));
    // The page itself is open: it asks for a key when the API answers 401.
    let open = Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(health::ready))
        .route("/metrics", get(health::metrics));
    let keyed = Router::new()
        .route("/api/fleet", get(dashboard::fleet))
        .route("/api/jobs/{id}/cancel", post(dashboard::cancel))
        .route("/api/ner", post(ner::ner))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/audio/transcriptions", post(audio::transcriptions).layer(uploads))
        .route("/v1/audio/translations", post(audio::translations).layer(uploads))
        .route("/api/transcribe", post(audio::transcribe_stream).layer(uploads))
        .route("/api/ocr", post(ocr::ocr).layer(uploads))
        .route("/api/ocr/stream", post(ocr::ocr_stream).layer(uploads))
        .fallback(|| async { error::ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(state.api_keys.clone(), auth::require_key));
    let jobs = state.jobs.clone();
    open.merge(keyed).layer(middleware::from_fn_with_state(jobs, health::count_requests)).with_state(state)
}

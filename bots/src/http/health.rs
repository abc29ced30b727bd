//! `/readyz` (NATS connected, the job stream reachable), `/metrics`, and the
//! middleware that counts every request by route and status.

use super::AppState;
use crate::client::JobClient;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use natter_shared::jetstream::JOBS_STREAM;
use std::time::{Duration, Instant};

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    if state.jobs.nats().connection_state() != async_nats::connection::State::Connected {
        return (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS".into());
    }
    match tokio::time::timeout(Duration::from_secs(2), state.jobs.jetstream().get_stream(JOBS_STREAM)).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready".into()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("stream {JOBS_STREAM} unreachable: {e}")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, format!("stream {JOBS_STREAM} did not answer within 2 s")),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.jobs.refresh_queue_depths(&state.catalog).await;
    ([(header::CONTENT_TYPE, OPENMETRICS)], state.jobs.metrics().encode())
}

/// Counts each request under its route's pattern; unmatched paths count as
/// one `unmatched` route, so scanners cannot make series without end.
pub async fn count_requests(State(jobs): State<JobClient>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    jobs.metrics().request(&route, response.status().as_u16(), started.elapsed());
    response
}

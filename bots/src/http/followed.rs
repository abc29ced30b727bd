//! A job an HTTP request submitted and now follows: its updates, its
//! deadline, and a guard that cancels it if the client goes away. The
//! streaming endpoints turn its updates into Server-Sent Events with
//! [`sse_events`], each kind rendering its own partial and final events.

use super::error::ApiError;
use super::openai::CancelOnDrop;
use super::sse::error_event;
use crate::client::JobUpdate;
use axum::response::sse::Event as SseEvent;
use futures::{Stream, StreamExt};
use std::convert::Infallible;
use std::pin::Pin;
use uuid::Uuid;

pub(super) struct Running<U> {
    pub id: Uuid,
    pub model: String,
    pub updates: Pin<Box<dyn Stream<Item = U> + Send>>,
    pub guard: CancelOnDrop,
    pub deadline: tokio::time::Instant,
}

/// Waits for the first update worth showing (a partial result or the end),
/// so a job that fails at once becomes a real HTTP error rather than a stream
/// that opens only to report one. `failure` names the updates that are errors.
pub(super) async fn first_shown<U: JobUpdate>(
    job: &mut Running<U>,
    failure: impl Fn(U) -> Result<U, ApiError>,
) -> Result<U, ApiError> {
    loop {
        let update =
            tokio::time::timeout_at(job.deadline, job.updates.next()).await.map_err(|_| ApiError::timeout())?;
        let update = update.ok_or_else(|| ApiError::unavailable("lost the job's event stream"))?;
        if update.is_terminal() {
            job.guard.armed = false;
        }
        let update = failure(update)?;
        if update.is_partial() || update.is_terminal() {
            return Ok(update);
        }
    }
}

/// The stream after its first update: whatever `render` makes of each update
/// (`None` skips it) until a terminal one, which disarms the cancel guard and
/// ends the stream. A deadline passed or a lost event stream ends it with an
/// `error` event; a client that drops it cancels the job.
pub(super) fn sse_events<U, F>(first: U, job: Running<U>, render: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    U: JobUpdate + Send + 'static,
    F: FnMut(U, Uuid, &str) -> Option<SseEvent> + Send + 'static,
{
    struct Follow<U, F> {
        job: Running<U>,
        pending: Option<U>,
        render: F,
        ended: bool,
    }
    let state = Follow { job, pending: Some(first), render, ended: false };
    futures::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        loop {
            let update = match s.pending.take() {
                Some(update) => Some(update),
                None => match tokio::time::timeout_at(s.job.deadline, s.job.updates.next()).await {
                    Ok(update) => update,
                    Err(_) => {
                        // Still armed: dropping the stream cancels the job.
                        s.ended = true;
                        return Some((error_event(&ApiError::timeout()), s));
                    }
                },
            };
            let Some(update) = update else {
                s.ended = true;
                return Some((error_event(&ApiError::unavailable("lost the job's event stream")), s));
            };
            if update.is_terminal() {
                s.job.guard.armed = false;
                s.ended = true;
            }
            let (id, model) = (s.job.id, s.job.model.clone());
            match (s.render)(update, id, &model) {
                Some(event) => return Some((event, s)),
                None if s.ended => return None,
                None => continue,
            }
        }
    })
    .map(Ok)
}

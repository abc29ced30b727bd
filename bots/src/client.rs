//! The job client every front-end uses: submit a job, follow its events, cancel it.

use async_nats::jetstream::{self, consumer, stream};
use futures::{Stream, StreamExt};
use natter_shared::jetstream::{ensure_streams, JetStreamSettings};
use natter_shared::proto::{ErrorCode, Event, EventBody, FinishReason, Job, JobResult, Metrics};
use natter_shared::subjects;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error(transparent)]
    Setup(#[from] natter_shared::jetstream::SetupError),
    #[error("cannot submit the job: {0}")]
    Submit(String),
    #[error("cannot follow the job's events: {0}")]
    Events(String),
    #[error("cannot cancel the job: {0}")]
    Cancel(String),
}

#[derive(Clone)]
pub struct JobClient {
    client: async_nats::Client,
    js: jetstream::Context,
    events: stream::Stream,
}

impl JobClient {
    pub async fn connect(url: &str, settings: &JetStreamSettings) -> Result<Self, ClientError> {
        let client = async_nats::ConnectOptions::new()
            .name("natter-bots")
            .connect(url)
            .await
            .map_err(|source| ClientError::Connect { url: url.into(), source })?;
        let js = jetstream::new(client.clone());
        let streams = ensure_streams(&js, settings).await?;
        Ok(JobClient { client, js, events: streams.events })
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Publishes `job` to its work queue and waits for JetStream to store it.
    pub async fn submit(&self, job: &Job) -> Result<(), ClientError> {
        let payload = serde_json::to_vec(job).map_err(|e| ClientError::Submit(e.to_string()))?;
        self.publish_stored(subjects::job(job.kind(), &job.model), payload.into()).await.map_err(ClientError::Submit)
    }

    /// Publishes to a JetStream subject and waits until the stream has stored it.
    async fn publish_stored(&self, subject: String, payload: bytes::Bytes) -> Result<(), String> {
        self.js.publish(subject, payload).await.map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Every event of the job from the first, then live ones: the events stream
    /// keeps them, so this may be called after submitting, or after a restart.
    pub async fn events(
        &self,
        job_id: Uuid,
    ) -> Result<impl Stream<Item = Result<Event, ClientError>> + Send + 'static, ClientError> {
        let consumer = self
            .events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subjects::events(job_id),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ClientError::Events(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| ClientError::Events(e.to_string()))?;
        Ok(messages.map(|m| {
            let m = m.map_err(|e| ClientError::Events(e.to_string()))?;
            serde_json::from_slice::<Event>(&m.payload).map_err(|e| ClientError::Events(format!("bad event: {e}")))
        }))
    }

    /// Asks the worker running the job to stop; a job still queued is dropped when
    /// a worker fetches it (the cancel is kept in the NATTER_CANCEL stream).
    pub async fn cancel(&self, job_id: Uuid) -> Result<(), ClientError> {
        self.publish_stored(subjects::cancel(job_id), "cancel".into()).await.map_err(ClientError::Cancel)
    }

    /// Follows a chat job as [`ChatUpdate`]s, resolving attempts.
    pub async fn chat_updates(
        &self,
        job_id: Uuid,
    ) -> Result<impl Stream<Item = ChatUpdate> + Send + 'static, ClientError> {
        let events = Box::pin(self.events(job_id).await?);
        let state = (events, AttemptTracker::default(), std::collections::VecDeque::<ChatUpdate>::new(), false);
        // Ends right after the first terminal update.
        Ok(futures::stream::unfold(state, |(mut events, mut tracker, mut pending, mut ended)| async move {
            loop {
                if let Some(update) = pending.pop_front() {
                    if update.is_terminal() {
                        ended = true;
                        pending.clear();
                    }
                    return Some((update, (events, tracker, pending, ended)));
                }
                if ended {
                    return None;
                }
                match events.next().await {
                    Some(Ok(event)) => pending.extend(tracker.apply(event)),
                    Some(Err(e)) => {
                        pending.push_back(ChatUpdate::Failed { code: ErrorCode::Internal, message: e.to_string() })
                    }
                    None => return None,
                }
            }
        }))
    }
}

/// How a non-streaming job ended, when it did not succeed.
#[derive(Debug)]
pub enum JobEnd {
    Failed { code: ErrorCode, message: String },
    Cancelled,
    Lost(ClientError),
}

impl JobClient {
    /// Submits `job` and waits for the outcome of its latest attempt.
    pub async fn run_job(&self, job: &Job) -> Result<(JobResult, Metrics), JobEnd> {
        let mut events = Box::pin(self.events(job.id).await.map_err(JobEnd::Lost)?);
        self.submit(job).await.map_err(JobEnd::Lost)?;
        let mut attempt = 0;
        while let Some(event) = events.next().await {
            let event = event.map_err(JobEnd::Lost)?;
            if event.attempt < attempt {
                continue;
            }
            attempt = event.attempt;
            match event.body {
                EventBody::Done { result, metrics } => return Ok((result, metrics)),
                EventBody::Failed { code, message } => return Err(JobEnd::Failed { code, message }),
                EventBody::Cancelled => return Err(JobEnd::Cancelled),
                _ => {}
            }
        }
        Err(JobEnd::Lost(ClientError::Events("the event stream ended".into())))
    }
}

/// A chat job's progress as a front-end needs it.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatUpdate {
    Accepted {
        worker: String,
        model: String,
        attempt: u32,
    },
    /// Append this to the answer.
    Delta(String),
    /// A new attempt started after a worker died: drop the partial answer.
    Restart {
        attempt: u32,
    },
    Done {
        text: String,
        finish_reason: FinishReason,
        metrics: Metrics,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
    Cancelled,
}

impl ChatUpdate {
    pub fn is_terminal(&self) -> bool {
        matches!(self, ChatUpdate::Done { .. } | ChatUpdate::Failed { .. } | ChatUpdate::Cancelled)
    }
}

/// Turns raw events into updates: events of an attempt older than the newest seen
/// are stale; the first event of a newer attempt restarts the answer.
#[derive(Default)]
pub struct AttemptTracker {
    attempt: u32,
    has_text: bool,
}

impl AttemptTracker {
    pub fn apply(&mut self, event: Event) -> Vec<ChatUpdate> {
        let mut out = Vec::new();
        if event.attempt < self.attempt {
            return out;
        }
        if event.attempt > self.attempt {
            if self.has_text {
                out.push(ChatUpdate::Restart { attempt: event.attempt });
            }
            self.attempt = event.attempt;
            self.has_text = false;
        }
        match event.body {
            EventBody::Accepted { worker, model } => {
                out.push(ChatUpdate::Accepted { worker, model, attempt: event.attempt })
            }
            EventBody::Token { text } => {
                self.has_text = true;
                out.push(ChatUpdate::Delta(text));
            }
            EventBody::Done { result: JobResult::Chat { text, finish_reason }, metrics } => {
                out.push(ChatUpdate::Done { text, finish_reason, metrics })
            }
            EventBody::Done { .. } => out.push(ChatUpdate::Failed {
                code: ErrorCode::Internal,
                message: "the worker returned a result of another kind".into(),
            }),
            EventBody::Failed { code, message } => out.push(ChatUpdate::Failed { code, message }),
            EventBody::Cancelled => out.push(ChatUpdate::Cancelled),
            EventBody::Segment { .. } | EventBody::Progress { .. } => {}
        }
        out
    }
}

/// For outputs that cannot retract text (an SSE stream already read): a retried
/// attempt regenerates the same prefix from the job's seed, and only what goes
/// beyond what was already sent is passed on.
#[derive(Default)]
pub struct AppendOnly {
    sent: String,
    attempt_text: String,
}

impl AppendOnly {
    pub fn restart(&mut self) {
        self.attempt_text.clear();
    }

    /// The part of `delta` not yet sent.
    pub fn push(&mut self, delta: &str) -> String {
        self.attempt_text.push_str(delta);
        if self.attempt_text.len() <= self.sent.len() {
            return String::new();
        }
        let start =
            if self.attempt_text.is_char_boundary(self.sent.len()) { self.sent.len() } else { return String::new() };
        let new = self.attempt_text[start..].to_string();
        self.sent.push_str(&new);
        new
    }

    pub fn sent(&self) -> &str {
        &self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_shared::proto::V1;

    fn ev(attempt: u32, body: EventBody) -> Event {
        Event { v: V1, job_id: Uuid::nil(), attempt, seq: 0, body }
    }

    fn tok(attempt: u32, t: &str) -> Event {
        ev(attempt, EventBody::Token { text: t.into() })
    }

    #[test]
    fn a_new_attempt_restarts_the_answer_and_stale_events_are_dropped() {
        let mut t = AttemptTracker::default();
        assert_eq!(t.apply(tok(1, "Hel")), [ChatUpdate::Delta("Hel".into())]);
        let restart = t.apply(ev(2, EventBody::Accepted { worker: "w2".into(), model: "m".into() }));
        assert_eq!(restart[0], ChatUpdate::Restart { attempt: 2 });
        assert!(t.apply(tok(1, "lo")).is_empty(), "late event of the dead attempt is ignored");
        assert_eq!(t.apply(tok(2, "Hello")), [ChatUpdate::Delta("Hello".into())]);
    }

    #[test]
    fn append_only_skips_the_regenerated_prefix() {
        let mut a = AppendOnly::default();
        assert_eq!(a.push("Hel"), "Hel");
        assert_eq!(a.push("lo"), "lo");
        a.restart();
        assert_eq!(a.push("He"), "");
        assert_eq!(a.push("llo wo"), " wo");
        assert_eq!(a.push("rld"), "rld");
        assert_eq!(a.sent(), "Hello world");
    }
}

//! The job client every front-end uses: submit a job, follow its events, cancel it.

use crate::follow::Follower;
use crate::metrics::{FrontMetrics, JobWatch};
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::{self, stream};
use futures::{Stream, StreamExt};
use natter_shared::blob::BlobError;
use natter_shared::jetstream::{consumer_name, ensure_streams, retry_while_electing, JetStreamSettings, JOBS_STREAM};
use natter_shared::nats::NatsSettings;
use natter_shared::proto::{
    Blob, ErrorCode, Event, EventBody, FinishReason, Job, JobKind, JobResult, Metrics, OcrLine, OcrTimings, Segment,
};
use natter_shared::subjects;
use std::sync::Arc;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] natter_shared::nats::NatsError),
    #[error(transparent)]
    Setup(#[from] natter_shared::jetstream::SetupError),
    #[error("cannot submit the job: {0}")]
    Submit(String),
    /// The model's queue holds as many jobs as it may (`max_pending`).
    #[error("the fleet is busy: every worker serving `{model}` has a full queue; please try again in a minute")]
    Busy { model: String },
    #[error("cannot follow the job's events: {0}")]
    Events(String),
    #[error("cannot cancel the job: {0}")]
    Cancel(String),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

#[derive(Clone)]
pub struct JobClient {
    client: async_nats::Client,
    js: jetstream::Context,
    events: stream::Stream,
    /// Where inputs too large to travel inside a job message go.
    blobs: ObjectStore,
    metrics: Arc<FrontMetrics>,
    owners: Arc<std::sync::Mutex<Owners>>,
}

/// Who submitted the jobs this process submitted lately, so a caller can
/// cancel only their own. Bounded: the oldest are forgotten first.
#[derive(Default)]
struct Owners {
    users: std::collections::HashMap<Uuid, String>,
    order: std::collections::VecDeque<Uuid>,
}

/// Jobs whose submitter a front-end remembers.
const OWNERS_KEPT: usize = 100_000;

impl Owners {
    fn remember(&mut self, job_id: Uuid, user: &str) {
        self.users.insert(job_id, user.to_string());
        self.order.push_back(job_id);
        if self.order.len() > OWNERS_KEPT {
            let oldest = self.order.pop_front().expect("the log is not empty");
            self.users.remove(&oldest);
        }
    }
}

impl JobClient {
    pub async fn connect(nats: &NatsSettings, settings: &JetStreamSettings) -> Result<Self, ClientError> {
        let client = nats.connect("natter-bots").await?;
        let js = jetstream::new(client.clone());
        let streams = ensure_streams(&js, settings).await?;
        let metrics = Arc::new(FrontMetrics::default());
        let owners = Arc::default();
        Ok(JobClient { client, js, events: streams.events, blobs: streams.blobs, metrics, owners })
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn metrics(&self) -> &FrontMetrics {
        &self.metrics
    }

    /// Publishes `job` to its work queue and waits for JetStream to store it;
    /// [`ClientError::Busy`] when the model's queue is full.
    pub async fn submit(&self, job: &Job) -> Result<(), ClientError> {
        let payload = serde_json::to_vec(job).map_err(|e| ClientError::Submit(e.to_string()))?;
        match self.publish_stored(subjects::job(job.kind(), &job.model), job.id.to_string(), payload.into()).await {
            Ok(()) => {
                self.owners.lock().unwrap().remember(job.id, &job.origin.user);
                Ok(())
            }
            Err(e) if queue_full(&e) => {
                self.metrics.job_ended(job.kind(), "busy");
                Err(ClientError::Busy { model: job.model.clone() })
            }
            Err(e) => Err(ClientError::Submit(e.to_string())),
        }
    }

    /// The user who submitted `job_id` through this process, if it did lately.
    pub fn owner(&self, job_id: Uuid) -> Option<String> {
        self.owners.lock().unwrap().users.get(&job_id).cloned()
    }

    /// Sets the queue-depth gauge of every model in `catalog` that workers
    /// have bound a queue for, just before a scrape reads it.
    pub async fn refresh_queue_depths(&self, catalog: &natter_shared::catalog::Catalog) {
        let Ok(jobs) = self.js.get_stream(JOBS_STREAM).await else { return };
        for model in &catalog.models {
            if let Ok(info) = jobs.consumer_info(consumer_name(model.kind, &model.id)).await {
                self.metrics.set_queue_depth(&model.id, info.num_pending);
            }
        }
    }

    /// How many jobs for `model` are waiting for a worker, this one included
    /// when it is still waiting: the position a "queued" notice shows. `None`
    /// when no worker has ever bound the model's queue, or NATS cannot say.
    pub async fn queue_position(&self, kind: JobKind, model: &str) -> Option<u64> {
        let jobs = self.js.get_stream(JOBS_STREAM).await.ok()?;
        let info = jobs.consumer_info(consumer_name(kind, model)).await.ok()?;
        Some(info.num_pending)
    }

    /// Jobs in the work queues, waiting or running, over every model.
    pub async fn queue_depth(&self) -> Option<u64> {
        let mut jobs = self.js.get_stream(JOBS_STREAM).await.ok()?;
        Some(jobs.info().await.ok()?.state.messages)
    }

    /// Wraps a binary input (audio, an image) for a job: inline when small,
    /// otherwise stored in the blob bucket, which expires with the jobs.
    pub async fn put_blob(&self, data: Vec<u8>, content_type: &str) -> Result<Blob, ClientError> {
        Ok(natter_shared::blob::put(&self.blobs, data, content_type).await?)
    }

    /// Publishes to a JetStream subject and waits until the stream has stored it.
    ///
    /// While a cluster elects a new leader for the stream (its node went
    /// away) publishes fail for a few seconds; they are tried again for up to
    /// [`natter_shared::jetstream::ELECTION_RETRY`], and `message_id` lets JetStream drop a copy that was
    /// stored although its ack was lost.
    async fn publish_stored(
        &self,
        subject: String,
        message_id: String,
        payload: bytes::Bytes,
    ) -> Result<(), jetstream::context::PublishError> {
        let store = || async {
            let publish =
                jetstream::message::PublishMessage::build().message_id(message_id.as_str()).payload(payload.clone());
            self.js.send_publish(subject.clone(), publish).await?.await.map(|_| ())
        };
        retry_while_electing(&format!("store on {subject}"), store, queue_full).await
    }

    /// Every event of the job from the first, then live ones, in order and once
    /// each: the events stream keeps them, so this may be called after
    /// submitting, or after a restart. See [`Follower`] for how it outlives
    /// the loss of a NATS node.
    pub async fn events(
        &self,
        job_id: Uuid,
    ) -> Result<impl Stream<Item = Result<Event, ClientError>> + Send + 'static, ClientError> {
        let follower = Follower::start(&self.client, self.events.clone(), job_id)
            .await
            .map_err(|e| ClientError::Events(e.to_string()))?;
        Ok(futures::stream::unfold(follower, |mut follower| async move {
            let event = follower.next().await?;
            Some((Ok(event), follower))
        }))
    }

    /// Asks the worker running the job to stop; a job still queued is dropped when
    /// a worker fetches it (the cancel is kept in the NATTER_CANCEL stream).
    pub async fn cancel(&self, job_id: Uuid) -> Result<(), ClientError> {
        self.publish_stored(subjects::cancel(job_id), format!("cancel-{job_id}"), "cancel".into())
            .await
            .map_err(|e| ClientError::Cancel(e.to_string()))
    }

    /// Follows a chat job as [`ChatUpdate`]s, resolving attempts.
    pub async fn chat_updates(
        &self,
        job_id: Uuid,
    ) -> Result<impl Stream<Item = ChatUpdate> + Send + 'static, ClientError> {
        self.updates(job_id, JobKind::Chat).await
    }

    /// Follows a speech-to-text job as [`AsrUpdate`]s, resolving attempts.
    pub async fn asr_updates(
        &self,
        job_id: Uuid,
    ) -> Result<impl Stream<Item = AsrUpdate> + Send + 'static, ClientError> {
        self.updates(job_id, JobKind::Asr).await
    }

    /// Follows an OCR job as [`OcrUpdate`]s, resolving attempts.
    pub async fn ocr_updates(
        &self,
        job_id: Uuid,
    ) -> Result<impl Stream<Item = OcrUpdate> + Send + 'static, ClientError> {
        self.updates(job_id, JobKind::Ocr).await
    }

    /// A job's events as updates of one kind, ending right after the first
    /// terminal update (so a caller's loop ends with the job).
    async fn updates<U: JobUpdate + Send + 'static>(
        &self,
        job_id: Uuid,
        kind: JobKind,
    ) -> Result<impl Stream<Item = U> + Send + 'static, ClientError> {
        let events = Box::pin(self.events(job_id).await?);
        let watched = (self.metrics.clone(), JobWatch::new(kind));
        let state = (events, AttemptTracker::<U>::default(), std::collections::VecDeque::<U>::new(), false, watched);
        Ok(futures::stream::unfold(
            state,
            |(mut events, mut tracker, mut pending, mut ended, mut watched)| async move {
                loop {
                    if let Some(update) = pending.pop_front() {
                        if update.is_terminal() {
                            ended = true;
                            pending.clear();
                        }
                        return Some((update, (events, tracker, pending, ended, watched)));
                    }
                    if ended {
                        return None;
                    }
                    let (metrics, watch) = &mut watched;
                    match events.next().await {
                        Some(Ok(event)) => {
                            watch.see(metrics, &event);
                            pending.extend(tracker.apply(event));
                        }
                        Some(Err(e)) => {
                            watch.lost(metrics);
                            pending.push_back(U::failed(ErrorCode::Internal, e.to_string()));
                        }
                        None => {
                            watch.lost(metrics);
                            return None;
                        }
                    }
                }
            },
        ))
    }
}

/// Whether JetStream refused a job because its model's queue is full (the
/// jobs stream's per-subject limit, with new messages discarded).
fn queue_full(error: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.to_string().contains("maximum messages per subject exceeded"))
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
        let mut watch = JobWatch::new(job.kind());
        let mut attempt = 0;
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| {
                watch.lost(&self.metrics);
                JobEnd::Lost(e)
            })?;
            watch.see(&self.metrics, &event);
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
        watch.lost(&self.metrics);
        Err(JobEnd::Lost(ClientError::Events("the event stream ended".into())))
    }
}

/// One job kind's progress as a front-end needs it; [`AttemptTracker`] builds
/// these from raw events, so every kind resolves attempts the same way.
pub trait JobUpdate: Sized {
    /// The update an event of the current attempt becomes; `None` for events
    /// this kind does not show.
    fn from_event(attempt: u32, body: EventBody) -> Option<Self>;
    /// A newer attempt began after partial output was shown: drop that output.
    fn restart(attempt: u32) -> Self;
    fn failed(code: ErrorCode, message: String) -> Self;
    /// Whether this update shows partial output that a newer attempt retracts.
    fn is_partial(&self) -> bool;
    fn is_terminal(&self) -> bool;
}

/// A `done` whose result is of another kind than the job's: a worker bug, told
/// to the user as an internal failure rather than misread.
fn wrong_kind<U: JobUpdate>() -> U {
    U::failed(ErrorCode::Internal, "the worker returned a result of another kind".into())
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

impl JobUpdate for ChatUpdate {
    fn from_event(attempt: u32, body: EventBody) -> Option<Self> {
        Some(match body {
            EventBody::Accepted { worker, model } => ChatUpdate::Accepted { worker, model, attempt },
            EventBody::Token { text, .. } => ChatUpdate::Delta(text),
            EventBody::Done { result: JobResult::Chat { text, finish_reason }, metrics } => {
                ChatUpdate::Done { text, finish_reason, metrics }
            }
            EventBody::Done { .. } => wrong_kind(),
            EventBody::Failed { code, message } => ChatUpdate::Failed { code, message },
            EventBody::Cancelled => ChatUpdate::Cancelled,
            EventBody::Segment { .. } | EventBody::Line { .. } | EventBody::Progress { .. } => return None,
        })
    }

    fn restart(attempt: u32) -> Self {
        ChatUpdate::Restart { attempt }
    }

    fn failed(code: ErrorCode, message: String) -> Self {
        ChatUpdate::Failed { code, message }
    }

    fn is_partial(&self) -> bool {
        matches!(self, ChatUpdate::Delta(_))
    }

    fn is_terminal(&self) -> bool {
        matches!(self, ChatUpdate::Done { .. } | ChatUpdate::Failed { .. } | ChatUpdate::Cancelled)
    }
}

/// A speech-to-text job's progress as a front-end needs it.
#[derive(Clone, Debug, PartialEq)]
pub enum AsrUpdate {
    Accepted {
        worker: String,
        model: String,
        attempt: u32,
    },
    /// The next piece of the transcript, as the worker decodes it.
    Segment(Segment),
    /// A new attempt started after a worker died: drop the segments so far.
    Restart {
        attempt: u32,
    },
    Done {
        text: String,
        language: Option<String>,
        segments: Vec<Segment>,
        metrics: Metrics,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
    Cancelled,
}

impl JobUpdate for AsrUpdate {
    fn from_event(attempt: u32, body: EventBody) -> Option<Self> {
        Some(match body {
            EventBody::Accepted { worker, model } => AsrUpdate::Accepted { worker, model, attempt },
            EventBody::Segment { segment } => AsrUpdate::Segment(segment),
            EventBody::Done { result: JobResult::Asr { text, language, segments }, metrics } => {
                AsrUpdate::Done { text, language, segments, metrics }
            }
            EventBody::Done { .. } => wrong_kind(),
            EventBody::Failed { code, message } => AsrUpdate::Failed { code, message },
            EventBody::Cancelled => AsrUpdate::Cancelled,
            EventBody::Token { .. } | EventBody::Line { .. } | EventBody::Progress { .. } => return None,
        })
    }

    fn restart(attempt: u32) -> Self {
        AsrUpdate::Restart { attempt }
    }

    fn failed(code: ErrorCode, message: String) -> Self {
        AsrUpdate::Failed { code, message }
    }

    fn is_partial(&self) -> bool {
        matches!(self, AsrUpdate::Segment(_))
    }

    fn is_terminal(&self) -> bool {
        matches!(self, AsrUpdate::Done { .. } | AsrUpdate::Failed { .. } | AsrUpdate::Cancelled)
    }
}

/// An OCR job's progress as a front-end needs it.
#[derive(Clone, Debug, PartialEq)]
pub enum OcrUpdate {
    Accepted {
        worker: String,
        model: String,
        attempt: u32,
    },
    /// The next recognised line, in reading order, as soon as it is read.
    Line(OcrLine),
    /// A new attempt started after a worker died: drop the lines so far.
    Restart {
        attempt: u32,
    },
    Done {
        text: String,
        lines: Vec<OcrLine>,
        /// The image's size after EXIF orientation: the space the boxes are in.
        width: u32,
        height: u32,
        timings: OcrTimings,
        metrics: Metrics,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
    Cancelled,
}

impl JobUpdate for OcrUpdate {
    fn from_event(attempt: u32, body: EventBody) -> Option<Self> {
        Some(match body {
            EventBody::Accepted { worker, model } => OcrUpdate::Accepted { worker, model, attempt },
            EventBody::Line { line } => OcrUpdate::Line(line),
            EventBody::Done { result: JobResult::Ocr { text, lines, width, height, timings }, metrics } => {
                OcrUpdate::Done { text, lines, width, height, timings, metrics }
            }
            EventBody::Done { .. } => wrong_kind(),
            EventBody::Failed { code, message } => OcrUpdate::Failed { code, message },
            EventBody::Cancelled => OcrUpdate::Cancelled,
            EventBody::Token { .. } | EventBody::Segment { .. } | EventBody::Progress { .. } => return None,
        })
    }

    fn restart(attempt: u32) -> Self {
        OcrUpdate::Restart { attempt }
    }

    fn failed(code: ErrorCode, message: String) -> Self {
        OcrUpdate::Failed { code, message }
    }

    fn is_partial(&self) -> bool {
        matches!(self, OcrUpdate::Line(_))
    }

    fn is_terminal(&self) -> bool {
        matches!(self, OcrUpdate::Done { .. } | OcrUpdate::Failed { .. } | OcrUpdate::Cancelled)
    }
}

/// Turns raw events into updates: events of an attempt older than the newest seen
/// are stale; the first event of a newer attempt restarts the output, if any was
/// shown.
pub struct AttemptTracker<U> {
    attempt: u32,
    has_output: bool,
    kind: std::marker::PhantomData<fn() -> U>,
}

impl<U> Default for AttemptTracker<U> {
    fn default() -> Self {
        AttemptTracker { attempt: 0, has_output: false, kind: std::marker::PhantomData }
    }
}

impl<U: JobUpdate> AttemptTracker<U> {
    pub fn apply(&mut self, event: Event) -> Vec<U> {
        let mut out = Vec::new();
        if event.attempt < self.attempt {
            return out;
        }
        if event.attempt > self.attempt {
            if self.has_output {
                out.push(U::restart(event.attempt));
            }
            self.attempt = event.attempt;
            self.has_output = false;
        }
        if let Some(update) = U::from_event(event.attempt, event.body) {
            self.has_output |= update.is_partial();
            out.push(update);
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
        ev(attempt, EventBody::Token { text: t.into(), tokens: Vec::new() })
    }

    #[test]
    fn a_new_attempt_restarts_the_answer_and_stale_events_are_dropped() {
        let mut t = AttemptTracker::<ChatUpdate>::default();
        assert_eq!(t.apply(tok(1, "Hel")), [ChatUpdate::Delta("Hel".into())]);
        let restart = t.apply(ev(2, EventBody::Accepted { worker: "w2".into(), model: "m".into() }));
        assert_eq!(restart[0], ChatUpdate::Restart { attempt: 2 });
        assert!(t.apply(tok(1, "lo")).is_empty(), "late event of the dead attempt is ignored");
        assert_eq!(t.apply(tok(2, "Hello")), [ChatUpdate::Delta("Hello".into())]);
    }

    #[test]
    fn a_new_asr_attempt_discards_the_segments_so_far() {
        let seg = |attempt, text: &str| {
            ev(attempt, EventBody::Segment { segment: Segment { start: 0.0, end: 1.0, text: text.into() } })
        };
        let mut t = AttemptTracker::<AsrUpdate>::default();
        let accepted = t.apply(ev(1, EventBody::Accepted { worker: "w1".into(), model: "m".into() }));
        assert_eq!(accepted, [AsrUpdate::Accepted { worker: "w1".into(), model: "m".into(), attempt: 1 }]);
        assert!(matches!(&t.apply(seg(1, "hello"))[..], [AsrUpdate::Segment(s)] if s.text == "hello"));
        assert!(
            t.apply(ev(1, EventBody::Token { text: "x".into(), tokens: Vec::new() })).is_empty(),
            "tokens are not shown for asr"
        );
        let restarted = t.apply(seg(2, "hello again"));
        assert_eq!(restarted.len(), 2);
        assert_eq!(restarted[0], AsrUpdate::Restart { attempt: 2 });
        assert!(t.apply(seg(1, "late")).is_empty(), "late segment of the dead attempt is ignored");
        let done = t.apply(ev(
            2,
            EventBody::Done {
                result: JobResult::Asr { text: "hello again".into(), language: Some("en".into()), segments: vec![] },
                metrics: Metrics::default(),
            },
        ));
        assert!(matches!(&done[..], [AsrUpdate::Done { language: Some(l), .. }] if l == "en"));
    }

    #[test]
    fn a_new_ocr_attempt_discards_the_lines_so_far() {
        let line = |attempt, text: &str| {
            let bbox = [[1.0, 2.0], [40.0, 2.0], [40.0, 12.0], [1.0, 12.0]];
            ev(attempt, EventBody::Line { line: OcrLine { text: text.into(), confidence: 0.97, bbox } })
        };
        let mut t = AttemptTracker::<OcrUpdate>::default();
        let accepted = t.apply(ev(1, EventBody::Accepted { worker: "w1".into(), model: "ppocr-v5".into() }));
        assert_eq!(accepted, [OcrUpdate::Accepted { worker: "w1".into(), model: "ppocr-v5".into(), attempt: 1 }]);
        assert!(matches!(&t.apply(line(1, "Invoice"))[..], [OcrUpdate::Line(l)] if l.text == "Invoice"));
        let progress = EventBody::Progress { stage: "detect".into(), done: 1, total: None };
        assert!(t.apply(ev(1, progress)).is_empty(), "progress is not shown for ocr");
        let restarted = t.apply(line(2, "Invoice"));
        assert_eq!(restarted.len(), 2);
        assert_eq!(restarted[0], OcrUpdate::Restart { attempt: 2 });
        assert!(t.apply(line(1, "late")).is_empty(), "late line of the dead attempt is ignored");
        let timings = OcrTimings { decode_ms: 1.0, detect_ms: 20.0, classify_ms: 2.0, recognize_ms: 30.0 };
        let result = JobResult::Ocr { text: "Invoice".into(), lines: vec![], width: 640, height: 480, timings };
        let done = t.apply(ev(2, EventBody::Done { result, metrics: Metrics::default() }));
        assert!(matches!(&done[..], [OcrUpdate::Done { width: 640, height: 480, .. }]));
        assert!(done[0].is_terminal());
    }

    #[test]
    fn a_result_of_another_kind_is_a_failure() {
        let mut t = AttemptTracker::<AsrUpdate>::default();
        let done = EventBody::Done {
            result: JobResult::Chat { text: "hi".into(), finish_reason: FinishReason::Stop },
            metrics: Metrics::default(),
        };
        assert!(matches!(&t.apply(ev(1, done))[..], [AsrUpdate::Failed { code: ErrorCode::Internal, .. }]));
    }

    #[test]
    fn a_new_attempt_without_output_needs_no_restart() {
        let mut t = AttemptTracker::<AsrUpdate>::default();
        t.apply(ev(1, EventBody::Accepted { worker: "w1".into(), model: "m".into() }));
        let second = t.apply(ev(2, EventBody::Accepted { worker: "w2".into(), model: "m".into() }));
        assert!(matches!(&second[..], [AsrUpdate::Accepted { attempt: 2, .. }]));
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

//! The job runner: pulls jobs for one model from its durable consumer, hands them
//! to the engine thread, streams the engine's events to `natter.events.<id>`, and
//! acks only once the outcome is published.
//!
//! Delivery guarantees come from JetStream: a job is acked after its terminal
//! event, kept alive with in-progress acks while it runs, and redelivered after
//! AckWait if this worker dies. The runner fetches a job only when an engine slot
//! is free, so a busy worker never sits on jobs another worker could run.

use crate::engine::{CancelFlag, CancelReason, EngineError, EngineHandle, JobContext};
use crate::metrics::{Outcome, WorkerMetrics};
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use natter_shared::blob::BlobError;
use natter_shared::jetstream::JetStreamSettings;
use natter_shared::proto::{Blob, ErrorCode, Event, EventBody, Job, JobInput, JobKind, JobResult, V1};
use natter_shared::subjects;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// State shared by every model this worker serves.
pub struct Shared {
    pub js: jetstream::Context,
    /// Where earlier attempts' events are read back from, to resume them.
    pub events: jetstream::stream::Stream,
    pub cancels: jetstream::stream::Stream,
    /// Where inputs above the inline limit wait.
    pub blobs: ObjectStore,
    pub max_input_bytes: u64,
    pub settings: JetStreamSettings,
    pub worker: String,
    pub drain: Duration,
    pub metrics: Arc<WorkerMetrics>,
    running: Mutex<HashMap<Uuid, Arc<CancelFlag>>>,
    busy: AtomicUsize,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        js: jetstream::Context,
        events: jetstream::stream::Stream,
        cancels: jetstream::stream::Stream,
        blobs: ObjectStore,
        max_input_bytes: u64,
        settings: JetStreamSettings,
        worker: String,
        drain: Duration,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Shared {
            js,
            events,
            cancels,
            blobs,
            max_input_bytes,
            settings,
            worker,
            drain,
            metrics,
            running: Mutex::default(),
            busy: AtomicUsize::new(0),
        }
    }

    /// Jobs running on this worker right now (reported as load).
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// Flags a running job for cancellation; false when it does not run here.
    pub fn cancel_running(&self, id: Uuid, reason: CancelReason) -> bool {
        match self.running.lock().unwrap().get(&id) {
            Some(flag) => {
                flag.cancel(reason);
                true
            }
            None => false,
        }
    }

    fn cancel_all_running(&self, reason: CancelReason) {
        for flag in self.running.lock().unwrap().values() {
            flag.cancel(reason);
        }
    }

    /// Whether a cancel for `id` was published while the job sat in the queue.
    async fn cancelled_while_queued(&self, id: Uuid) -> bool {
        self.cancels.get_last_raw_message_by_subject(&subjects::cancel(id)).await.is_ok()
    }
}

/// Listens on `natter.cancel.>` and stops the matching running job.
pub async fn listen_for_cancels(client: async_nats::Client, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut sub = match client.subscribe(subjects::CANCEL_ALL).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!("cannot subscribe to cancellations: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let id = msg.subject.rsplit('.').next().and_then(|s| s.parse::<Uuid>().ok());
                if let Some(id) = id {
                    if shared.cancel_running(id, CancelReason::User) {
                        tracing::info!(job = %id, "cancel requested");
                    }
                }
            }
        }
    }
}

/// Serves one model until `shutdown`, then drains: running jobs get
/// `drain` from the moment of shutdown to finish, after which they are handed
/// back to the queue.
pub async fn serve_model(
    shared: Arc<Shared>,
    consumer: PullConsumer,
    kind: JobKind,
    model: String,
    engine: EngineHandle,
    slots: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(slots.max(1)));
    let mut jobs = JoinSet::new();
    let mut open_pull = None;
    'serve: loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = shutdown.cancelled() => break,
        };
        // A short expiry bounds how long an open pull request outlives shutdown.
        let batch = tokio::select! {
            batch = consumer.batch().max_messages(1).expires(Duration::from_secs(2)).messages() => batch,
            _ = shutdown.cancelled() => break,
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(%model, "cannot pull jobs: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                msg = batch.next() => msg,
                _ = shutdown.cancelled() => {
                    open_pull = Some(batch);
                    break 'serve;
                }
            };
            match msg {
                Some(Ok(msg)) => {
                    let shared = shared.clone();
                    let engine = engine.clone();
                    let model = model.clone();
                    jobs.spawn(async move {
                        handle(&shared, &engine, kind, &model, msg).await;
                        drop(permit);
                    });
                    break;
                }
                Some(Err(e)) => tracing::warn!(%model, "pull error: {e}"),
                None => break,
            }
        }
        while jobs.try_join_next().is_some() {}
    }
    // The server may still deliver a job to the pull request open at shutdown:
    // hand it straight back so another worker takes it without waiting AckWait.
    let hand_back = async {
        if let Some(mut batch) = open_pull {
            while let Some(msg) = batch.next().await {
                if let Ok(msg) = msg {
                    tracing::info!(%model, "handing back a job that arrived during shutdown");
                    ack(&msg, AckKind::Nak(None)).await;
                }
            }
        }
    };
    let drain = async {
        if jobs.is_empty() {
            return;
        }
        tracing::info!(%model, running = jobs.len(), "draining: waiting for running jobs");
        if tokio::time::timeout(shared.drain, async { while jobs.join_next().await.is_some() {} }).await.is_err() {
            tracing::info!(%model, "drain timeout: handing running jobs back to the queue");
            shared.cancel_all_running(CancelReason::Shutdown);
            while jobs.join_next().await.is_some() {}
        }
    };
    tokio::join!(hand_back, drain);
}

/// Publishes one attempt's events in order, numbering them.
struct EventPublisher<'a> {
    js: &'a jetstream::Context,
    job_id: Uuid,
    attempt: u32,
    seq: u64,
}

impl EventPublisher<'_> {
    async fn publish(&mut self, body: EventBody) {
        let event = Event { v: V1, job_id: self.job_id, attempt: self.attempt, seq: self.seq, body };
        self.seq += 1;
        let payload: bytes::Bytes = serde_json::to_vec(&event).expect("events serialize").into();
        let subject = subjects::events(self.job_id);
        // Followers reading the stream after a reconnect depend on every event
        // being stored: a stream between leaders is tried again, and the
        // message id keeps a retried event from being stored twice.
        let id = format!("{}.{}.{}", event.job_id, event.attempt, event.seq);
        let store = || async {
            let publish = jetstream::message::PublishMessage::build().message_id(id.as_str()).payload(payload.clone());
            self.js.send_publish(subject.clone(), publish).await?.await.map(|_| ())
        };
        if let Err(e) = natter_shared::jetstream::retry_while_electing("store an event", store, |_| false).await {
            tracing::warn!(job = %self.job_id, "event not stored: {e}");
        }
    }

    async fn fail(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.publish(EventBody::Failed { code, message: message.into() }).await;
    }
}

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    let result = match kind {
        AckKind::Ack => msg.double_ack().await,
        other => msg.ack_with(other).await,
    };
    if let Err(e) = result {
        tracing::warn!("ack failed: {e}");
    }
}

/// Replaces a stored input with its bytes (checked against the size limit and
/// the sender's hash), so engines only ever see inline data.
async fn resolve_blobs(shared: &Shared, mut job: Job) -> Result<Job, (ErrorCode, String)> {
    let blob = match &mut job.input {
        JobInput::Ocr(input) => &mut input.image,
        JobInput::Asr(input) => &mut input.audio,
        JobInput::Chat(_) | JobInput::Ner(_) => return Ok(job),
    };
    let taken = std::mem::replace(blob, Blob::Inline { content_type: String::new(), data: Vec::new() });
    match natter_shared::blob::get(&shared.blobs, taken, shared.max_input_bytes).await {
        Ok((data, content_type)) => {
            *blob = Blob::Inline { content_type, data };
            Ok(job)
        }
        Err(e @ BlobError::TooLarge { .. }) => Err((ErrorCode::TooLarge, e.to_string())),
        Err(e) => Err((ErrorCode::BadInput, e.to_string())),
    }
}

/// The longest answer an earlier attempt of the job streamed, as token ids:
/// each attempt's token events in order from its first, up to any gap or an
/// event without ids. Empty when nothing is stored (or it expired), and the
/// job then starts over.
async fn earlier_answer(shared: &Shared, job_id: Uuid, attempt: u32) -> Vec<u32> {
    let events = match natter_shared::jetstream::stored_events(&shared.events, job_id, 1).await {
        Ok((events, _)) => events,
        Err(e) => {
            tracing::warn!(job = %job_id, "cannot read the earlier attempts' events, starting over: {e}");
            return Vec::new();
        }
    };
    longest_answer(events, attempt)
}

fn longest_answer(events: Vec<Event>, before_attempt: u32) -> Vec<u32> {
    let mut attempts: BTreeMap<u32, BTreeMap<u64, EventBody>> = BTreeMap::new();
    for event in events.into_iter().filter(|e| e.attempt < before_attempt) {
        attempts.entry(event.attempt).or_default().insert(event.seq, event.body);
    }
    let mut best = Vec::new();
    for bodies in attempts.into_values() {
        let mut answer = Vec::new();
        for (expected, (seq, body)) in bodies.into_iter().enumerate() {
            if seq != expected as u64 {
                break;
            }
            match body {
                EventBody::Token { text, tokens } if tokens.is_empty() && !text.is_empty() => break,
                EventBody::Token { tokens, .. } => answer.extend(tokens),
                _ => {}
            }
        }
        if answer.len() > best.len() {
            best = answer;
        }
    }
    best
}

async fn handle(shared: &Shared, engine: &EngineHandle, kind: JobKind, model: &str, msg: jetstream::Message) {
    let attempt = msg.info().map(|i| i.delivered as u32).unwrap_or(1);
    let end = |outcome| shared.metrics.ended(kind.as_str(), model, outcome);
    let job: Job = match serde_json::from_slice(&msg.payload) {
        Ok(job) => job,
        Err(e) => {
            // Answer the sender if the payload at least names the job.
            let id = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("id")?.as_str()?.parse::<Uuid>().ok());
            tracing::warn!(job = ?id, subject = %msg.subject, "malformed job: {e}");
            if let Some(job_id) = id {
                let mut events = EventPublisher { js: &shared.js, job_id, attempt, seq: 0 };
                events.fail(ErrorCode::MalformedJob, format!("the job could not be read: {e}")).await;
            }
            end(Outcome::Failed(ErrorCode::MalformedJob));
            ack(&msg, AckKind::Term).await;
            return;
        }
    };
    let mut events = EventPublisher { js: &shared.js, job_id: job.id, attempt, seq: 0 };

    if job.model != model {
        events.fail(ErrorCode::UnknownModel, format!("this queue serves `{model}`, not `{}`", job.model)).await;
        end(Outcome::Failed(ErrorCode::UnknownModel));
        return ack(&msg, AckKind::Ack).await;
    }
    if i64::from(attempt) > shared.settings.max_attempts {
        tracing::warn!(job = %job.id, attempt, "giving up: every earlier attempt died");
        events
            .fail(
                ErrorCode::RetriesExhausted,
                format!(
                    "the job was tried {} times and the worker running it stopped each time",
                    shared.settings.max_attempts
                ),
            )
            .await;
        end(Outcome::Failed(ErrorCode::RetriesExhausted));
        return ack(&msg, AckKind::Ack).await;
    }
    if job.deadline.is_some_and(|d| d < OffsetDateTime::now_utc()) {
        events.fail(ErrorCode::DeadlineExceeded, "the job's deadline passed before a worker was free").await;
        end(Outcome::Failed(ErrorCode::DeadlineExceeded));
        return ack(&msg, AckKind::Ack).await;
    }
    if shared.cancelled_while_queued(job.id).await {
        tracing::info!(job = %job.id, "dropping a job cancelled while queued");
        events.publish(EventBody::Cancelled).await;
        end(Outcome::Cancelled);
        return ack(&msg, AckKind::Ack).await;
    }

    let job = match resolve_blobs(shared, job).await {
        Ok(job) => job,
        Err((code, message)) => {
            events.fail(code, message).await;
            end(Outcome::Failed(code));
            return ack(&msg, AckKind::Ack).await;
        }
    };

    tracing::info!(job = %job.id, attempt, "running");
    events.publish(EventBody::Accepted { worker: shared.worker.clone(), model: model.to_string() }).await;
    let flag = Arc::new(CancelFlag::default());
    shared.running.lock().unwrap().insert(job.id, flag.clone());
    shared.busy.fetch_add(1, Ordering::Relaxed);
    shared.metrics.started(model, attempt);
    // A cancel that raced the registration above is caught here.
    if shared.cancelled_while_queued(job.id).await {
        flag.cancel(CancelReason::User);
    }

    let job_id = job.id;
    let resume = if attempt > 1 && matches!(job.input, JobInput::Chat(_)) {
        earlier_answer(shared, job_id, attempt).await
    } else {
        Vec::new()
    };
    if !resume.is_empty() {
        tracing::info!(job = %job_id, attempt, tokens = resume.len(), "resuming the answer an earlier attempt streamed");
    }
    let (tx, mut rx) = mpsc::channel(256);
    let run = engine.run(job, JobContext::new(tx, flag.clone()).resuming(resume));
    tokio::pin!(run);
    let mut heartbeat = tokio::time::interval(shared.settings.ack_wait / 3);
    heartbeat.tick().await;
    let outcome = loop {
        tokio::select! {
            biased;
            Some(body) = rx.recv() => events.publish(body).await,
            _ = heartbeat.tick() => ack(&msg, AckKind::Progress).await,
            outcome = &mut run => break outcome,
        }
    };
    while let Ok(body) = rx.try_recv() {
        events.publish(body).await;
    }
    shared.running.lock().unwrap().remove(&job_id);
    shared.busy.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.stopped(model);

    match outcome {
        Ok(done) => {
            if let JobResult::Chat { .. } = done.result {
                shared.metrics.chat_done(model, &done.metrics);
            }
            events.publish(EventBody::Done { result: done.result, metrics: done.metrics }).await;
            end(Outcome::Done);
            ack(&msg, AckKind::Ack).await;
        }
        Err(EngineError::Cancelled) if flag.reason() == Some(CancelReason::Shutdown) => {
            tracing::info!(job = %job_id, "handing the job back for another worker");
            end(Outcome::HandedBack);
            ack(&msg, AckKind::Nak(None)).await;
        }
        Err(EngineError::Cancelled) => {
            events.publish(EventBody::Cancelled).await;
            end(Outcome::Cancelled);
            ack(&msg, AckKind::Ack).await;
        }
        Err(EngineError::Failed { code, message }) => {
            tracing::info!(job = %job_id, ?code, "failed: {message}");
            events.fail(code, message).await;
            end(Outcome::Failed(code));
            ack(&msg, AckKind::Ack).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(attempt: u32, seq: u64, body: EventBody) -> Event {
        Event { v: V1, job_id: Uuid::nil(), attempt, seq, body }
    }

    fn token(attempt: u32, seq: u64, tokens: &[u32]) -> Event {
        event(attempt, seq, EventBody::Token { text: "x".into(), tokens: tokens.to_vec() })
    }

    #[test]
    fn the_longest_unbroken_earlier_answer_is_resumed() {
        let accepted = |attempt| event(attempt, 0, EventBody::Accepted { worker: "w".into(), model: "m".into() });
        let events = vec![
            accepted(1),
            token(1, 1, &[1, 2]),
            token(1, 2, &[3]),
            // Attempt 2 took over attempt 1's answer and went further, but
            // one of its events is missing: only what comes before the gap counts.
            accepted(2),
            token(2, 1, &[1, 2, 3, 4]),
            token(2, 3, &[6]),
            // The current attempt's own events are not earlier ones.
            accepted(3),
            token(3, 1, &[9, 9, 9, 9, 9, 9]),
        ];
        assert_eq!(longest_answer(events.clone(), 3), [1, 2, 3, 4]);
        assert_eq!(longest_answer(events, 2), [1, 2, 3]);
        // Text without ids (a worker that did not send them) ends the answer.
        let old =
            vec![accepted(1), token(1, 1, &[5]), event(1, 2, EventBody::Token { text: "y".into(), tokens: vec![] })];
        assert_eq!(longest_answer(old, 2), [5]);
    }
}

//! The job runner: pulls jobs for one model from its durable consumer, hands them
//! to the engine thread, streams the engine's events to `natter.events.<id>`, and
//! acks only once the outcome is published.
//!
//! Delivery guarantees come from JetStream: a job is acked after its terminal
//! event, kept alive with in-progress acks while it runs, and redelivered after
//! AckWait if this worker dies. The runner fetches a job only when an engine slot
//! is free, so a busy worker never sits on jobs another worker could run.

use crate::engine::{CancelFlag, CancelReason, EngineError, EngineHandle, JobContext};
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use natter_shared::blob::BlobError;
use natter_shared::jetstream::JetStreamSettings;
use natter_shared::proto::{Blob, ErrorCode, Event, EventBody, Job, JobInput, V1};
use natter_shared::subjects;
use std::collections::HashMap;
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
    pub cancels: jetstream::stream::Stream,
    /// Where inputs above the inline limit wait.
    pub blobs: ObjectStore,
    pub max_input_bytes: u64,
    pub settings: JetStreamSettings,
    pub worker: String,
    pub drain: Duration,
    running: Mutex<HashMap<Uuid, Arc<CancelFlag>>>,
    busy: AtomicUsize,
}

impl Shared {
    pub fn new(
        js: jetstream::Context,
        cancels: jetstream::stream::Stream,
        blobs: ObjectStore,
        max_input_bytes: u64,
        settings: JetStreamSettings,
        worker: String,
        drain: Duration,
    ) -> Self {
        Shared {
            js,
            cancels,
            blobs,
            max_input_bytes,
            settings,
            worker,
            drain,
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
                        handle(&shared, &engine, &model, msg).await;
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
        let payload = serde_json::to_vec(&event).expect("events serialize");
        let subject = subjects::events(self.job_id);
        match self.js.publish(subject, payload.into()).await {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::warn!(job = %self.job_id, "event not stored: {e}");
                }
            }
            Err(e) => tracing::warn!(job = %self.job_id, "cannot publish event: {e}"),
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

async fn handle(shared: &Shared, engine: &EngineHandle, model: &str, msg: jetstream::Message) {
    let attempt = msg.info().map(|i| i.delivered as u32).unwrap_or(1);
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
            ack(&msg, AckKind::Term).await;
            return;
        }
    };
    let mut events = EventPublisher { js: &shared.js, job_id: job.id, attempt, seq: 0 };

    if job.model != model {
        events.fail(ErrorCode::UnknownModel, format!("this queue serves `{model}`, not `{}`", job.model)).await;
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
        return ack(&msg, AckKind::Ack).await;
    }
    if job.deadline.is_some_and(|d| d < OffsetDateTime::now_utc()) {
        events.fail(ErrorCode::DeadlineExceeded, "the job's deadline passed before a worker was free").await;
        return ack(&msg, AckKind::Ack).await;
    }
    if shared.cancelled_while_queued(job.id).await {
        tracing::info!(job = %job.id, "dropping a job cancelled while queued");
        events.publish(EventBody::Cancelled).await;
        return ack(&msg, AckKind::Ack).await;
    }

    let job = match resolve_blobs(shared, job).await {
        Ok(job) => job,
        Err((code, message)) => {
            events.fail(code, message).await;
            return ack(&msg, AckKind::Ack).await;
        }
    };

    tracing::info!(job = %job.id, attempt, "running");
    events.publish(EventBody::Accepted { worker: shared.worker.clone(), model: model.to_string() }).await;
    let flag = Arc::new(CancelFlag::default());
    shared.running.lock().unwrap().insert(job.id, flag.clone());
    shared.busy.fetch_add(1, Ordering::Relaxed);
    // A cancel that raced the registration above is caught here.
    if shared.cancelled_while_queued(job.id).await {
        flag.cancel(CancelReason::User);
    }

    let job_id = job.id;
    let (tx, mut rx) = mpsc::channel(256);
    let run = engine.run(job, JobContext::new(tx, flag.clone()));
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

    match outcome {
        Ok(done) => {
            events.publish(EventBody::Done { result: done.result, metrics: done.metrics }).await;
            ack(&msg, AckKind::Ack).await;
        }
        Err(EngineError::Cancelled) if flag.reason() == Some(CancelReason::Shutdown) => {
            tracing::info!(job = %job_id, "handing the job back for another worker");
            ack(&msg, AckKind::Nak(None)).await;
        }
        Err(EngineError::Cancelled) => {
            events.publish(EventBody::Cancelled).await;
            ack(&msg, AckKind::Ack).await;
        }
        Err(EngineError::Failed { code, message }) => {
            tracing::info!(job = %job_id, ?code, "failed: {message}");
            events.fail(code, message).await;
            ack(&msg, AckKind::Ack).await;
        }
    }
}

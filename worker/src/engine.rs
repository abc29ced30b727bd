//! The engine abstraction: one trait every job kind implements, and the handle
//! that runs an engine on its own thread behind a bounded channel.
//!
//! Inference is CPU-bound and would stall the async runtime (acks, heartbeats,
//! cancellations) if it ran on it, so each engine lives on a dedicated OS thread.
//! The runner talks to it only through [`EngineHandle`].

use natter_shared::proto::{ErrorCode, EventBody, Job, JobResult, Metrics};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What a job finished with.
#[derive(Debug)]
pub struct Completed {
    pub result: JobResult,
    pub metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The job was stopped through its [`CancelFlag`].
    #[error("cancelled")]
    Cancelled,
    /// The job cannot be done; the message is shown to the user.
    #[error("{message}")]
    Failed { code: ErrorCode, message: String },
}

impl EngineError {
    pub fn bad_input(message: impl Into<String>) -> Self {
        EngineError::Failed { code: ErrorCode::BadInput, message: message.into() }
    }

    /// An engine fault; the detail goes to the log, the user gets a generic line.
    pub fn internal(job: &Job, err: impl std::fmt::Display) -> Self {
        tracing::error!(job = %job.id, "engine error: {err}");
        EngineError::Failed { code: ErrorCode::Internal, message: "the model failed while running this job".into() }
    }
}

/// Why a running job should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// The user asked: the job ends with a `cancelled` event.
    User,
    /// The worker is shutting down: the job is handed back to the queue.
    Shutdown,
}

/// Set from the async side, polled by the engine once per decode step.
#[derive(Debug, Default)]
pub struct CancelFlag(AtomicU8);

impl CancelFlag {
    pub fn cancel(&self, reason: CancelReason) {
        // fetch_max: a user cancel wins over a shutdown, since the user asked for
        // the job to end rather than to run elsewhere.
        let code = match reason {
            CancelReason::Shutdown => 1,
            CancelReason::User => 2,
        };
        self.0.fetch_max(code, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<CancelReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(CancelReason::Shutdown),
            _ => Some(CancelReason::User),
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }
}

/// What an engine sees of the job's surroundings while it runs.
pub struct JobContext {
    events: mpsc::Sender<EventBody>,
    cancel: Arc<CancelFlag>,
    resume_from: Vec<u32>,
}

impl JobContext {
    pub fn new(events: mpsc::Sender<EventBody>, cancel: Arc<CancelFlag>) -> Self {
        JobContext { events, cancel, resume_from: Vec::new() }
    }

    /// The answer tokens an earlier attempt of this job had streamed before
    /// its worker died; engines that can continue from them do.
    pub fn resuming(mut self, tokens: Vec<u32>) -> Self {
        self.resume_from = tokens;
        self
    }

    pub fn resume_from(&self) -> &[u32] {
        &self.resume_from
    }

    /// Streams an event to the user. Blocks when the publisher falls behind, which
    /// slows the engine rather than buffering without bound.
    pub fn emit(&self, body: EventBody) {
        let _ = self.events.blocking_send(body);
    }

    /// Streams an event if the channel has room, else hands it back. Engines
    /// serving many jobs at once use this, so one slow reader stalls no one else.
    #[allow(clippy::result_large_err)] // the event itself comes back, to be sent later
    pub fn try_emit(&self, body: EventBody) -> Result<(), EventBody> {
        match self.events.try_send(body) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(body)) => Err(body),
            // Nobody listens any more: the job is over for the runner.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Returns `Err(Cancelled)` once the job should stop.
    pub fn check_cancelled(&self) -> Result<(), EngineError> {
        if self.cancel.is_set() {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A model that turns jobs of one kind into results.
pub trait Engine: Send + 'static {
    fn run(&mut self, job: &Job, ctx: &JobContext) -> Result<Completed, EngineError>;
}

/// An engine that runs many jobs at once, advancing all of them a step at a
/// time (continuous batching): jobs join and leave between steps.
pub trait BatchEngine: Send + 'static {
    /// Jobs it can hold at once.
    fn capacity(&self) -> usize;
    /// Jobs admitted and not yet replied to.
    fn active(&self) -> usize;
    /// Takes a job on; a job it cannot start is replied to at once.
    fn admit(&mut self, job: Job, ctx: JobContext, reply: Reply);
    /// Advances every admitted job, replying to those that finish.
    fn step(&mut self);
    /// KV cache positions holding conversations now, and all there are.
    fn kv_cache(&self) -> (usize, usize);
}

/// What an engine thread tells the metrics: atomics it alone writes.
#[derive(Debug, Default)]
pub struct EngineStats {
    busy_ns: AtomicU64,
    kv_used: AtomicU64,
    kv_capacity: AtomicU64,
}

impl EngineStats {
    pub fn add_busy(&self, time: Duration) {
        self.busy_ns.fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Time spent running jobs or batch steps since the engine loaded.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    pub fn set_kv_cache(&self, used: usize, capacity: usize) {
        self.kv_used.store(used as u64, Ordering::Relaxed);
        self.kv_capacity.store(capacity as u64, Ordering::Relaxed);
    }

    /// The share of the KV cache in use; `None` for engines without one.
    pub fn kv_cache_used(&self) -> Option<f64> {
        let capacity = self.kv_capacity.load(Ordering::Relaxed);
        (capacity > 0).then(|| self.kv_used.load(Ordering::Relaxed) as f64 / capacity as f64)
    }
}

/// Where a job's outcome goes.
pub type Reply = oneshot::Sender<Result<Completed, EngineError>>;

struct Request {
    job: Job,
    ctx: JobContext,
    reply: Reply,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Failed(String),
    #[error("the engine thread died while loading")]
    ThreadDied,
}

/// The async side's handle to an engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    requests: mpsc::Sender<Request>,
    slots: usize,
    stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Starts a thread, loads the engine on it, and reports the load's outcome.
    /// The channel holds one waiting job: the runner fetches a job only when a
    /// slot is free, so this never grows.
    pub async fn spawn<E, F>(name: &str, load: F) -> Result<EngineHandle, LoadError>
    where
        E: Engine,
        F: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let (requests, mut inbox) = mpsc::channel::<Request>(1);
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let mut engine = match load() {
                    Ok(engine) => {
                        let _ = loaded_tx.send(Ok(()));
                        engine
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(Request { job, ctx, reply }) = inbox.blocking_recv() {
                    let started = Instant::now();
                    let outcome = engine.run(&job, &ctx);
                    thread_stats.add_busy(started.elapsed());
                    let _ = reply.send(outcome);
                }
            })
            .map_err(|e| LoadError::Failed(format!("cannot start engine thread: {e}")))?;
        match loaded_rx.await {
            Ok(Ok(())) => Ok(EngineHandle { requests, slots: 1, stats }),
            Ok(Err(e)) => Err(LoadError::Failed(e)),
            Err(_) => Err(LoadError::ThreadDied),
        }
    }

    /// Like [`EngineHandle::spawn`] for an engine that batches: the thread
    /// admits waiting jobs between steps, up to the engine's capacity, and
    /// sleeps only when no job is running. The channel holds as many waiting
    /// jobs as the engine has slots, and the runner fetches no more than that.
    pub async fn spawn_batched<E, F>(name: &str, load: F) -> Result<EngineHandle, LoadError>
    where
        E: BatchEngine,
        F: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (inbox_tx, inbox_rx) = oneshot::channel::<mpsc::Receiver<Request>>();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let mut engine = match load() {
                    Ok(engine) => {
                        let _ = loaded_tx.send(Ok(engine.capacity()));
                        engine
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                let Ok(mut inbox) = inbox_rx.blocking_recv() else { return };
                loop {
                    if engine.active() == 0 {
                        match inbox.blocking_recv() {
                            Some(Request { job, ctx, reply }) => engine.admit(job, ctx, reply),
                            None => return,
                        }
                    }
                    while engine.active() < engine.capacity() {
                        match inbox.try_recv() {
                            Ok(Request { job, ctx, reply }) => engine.admit(job, ctx, reply),
                            Err(_) => break,
                        }
                    }
                    if engine.active() > 0 {
                        let started = Instant::now();
                        engine.step();
                        thread_stats.add_busy(started.elapsed());
                    }
                    let (used, capacity) = engine.kv_cache();
                    thread_stats.set_kv_cache(used, capacity);
                }
            })
            .map_err(|e| LoadError::Failed(format!("cannot start engine thread: {e}")))?;
        let slots = match loaded_rx.await {
            Ok(Ok(slots)) => slots.max(1),
            Ok(Err(e)) => return Err(LoadError::Failed(e)),
            Err(_) => return Err(LoadError::ThreadDied),
        };
        let (requests, inbox) = mpsc::channel::<Request>(slots);
        inbox_tx.send(inbox).map_err(|_| LoadError::ThreadDied)?;
        Ok(EngineHandle { requests, slots, stats })
    }

    /// Jobs the engine runs at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The engine thread's figures, for the metrics.
    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    /// Runs one job; events stream through `ctx` while this awaits the outcome.
    pub async fn run(&self, job: Job, ctx: JobContext) -> Result<Completed, EngineError> {
        let (reply, outcome) = oneshot::channel();
        let died = || EngineError::Failed { code: ErrorCode::Internal, message: "the engine stopped".into() };
        self.requests.send(Request { job, ctx, reply }).await.map_err(|_| died())?;
        outcome.await.map_err(|_| died())?
    }
}

//! The JetStream streams and consumers every natter process shares.
//!
//! Whoever starts first creates them; later processes find them in place. The
//! settings that matter for correctness (work-queue retention, explicit acks,
//! bounded redelivery) are fixed here rather than left to each caller.

use crate::proto::{Event, JobKind};
use crate::subjects;
use async_nats::jetstream::{self, consumer, stream};
use serde::Deserialize;
use std::time::Duration;

pub const JOBS_STREAM: &str = "NATTER_JOBS";
pub const EVENTS_STREAM: &str = "NATTER_EVENTS";
pub const CANCEL_STREAM: &str = "NATTER_CANCEL";
pub const BLOB_BUCKET: &str = "NATTER_BLOBS";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot create stream {name}: {source}")]
    Stream { name: String, source: jetstream::context::CreateStreamError },
    #[error("cannot create consumer {name}: {source}")]
    Consumer { name: String, source: jetstream::stream::ConsumerError },
    #[error("cannot create object store {BLOB_BUCKET}: {0}")]
    Bucket(jetstream::context::CreateObjectStoreError),
    #[error("cannot update stream {name} to the configured replicas and limits: {source}")]
    Update { name: String, source: jetstream::context::UpdateStreamError },
}

/// Delivery and retention settings, from `[jetstream]` in natter.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamSettings {
    /// How long a worker may go silent on a job before it is redelivered. Workers
    /// send in-progress acks well inside this, so only a dead worker hits it.
    #[serde(with = "secs")]
    pub ack_wait: Duration,
    /// Deliveries a job gets before it is reported as failed to its user.
    pub max_attempts: i64,
    /// How long a job's events stay replayable (a restarted front-end resumes from them).
    #[serde(with = "secs")]
    pub events_max_age: Duration,
    /// Jobs nobody picked up within this are dropped from the queue.
    #[serde(with = "secs")]
    pub jobs_max_age: Duration,
    /// Copies JetStream keeps of each natter stream and of the blob bucket: 1
    /// on a single server; 3 in a cluster, so losing a node loses no job.
    pub replicas: usize,
    /// Jobs one model's queue holds, waiting or running; past it JetStream
    /// refuses new ones, and users are told the fleet is busy instead of
    /// waiting for jobs that would time out.
    pub max_pending: i64,
}

impl Default for JetStreamSettings {
    fn default() -> Self {
        JetStreamSettings {
            ack_wait: Duration::from_secs(30),
            max_attempts: 3,
            events_max_age: Duration::from_secs(3600),
            jobs_max_age: Duration::from_secs(24 * 3600),
            replicas: 1,
            max_pending: 1000,
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = f64::deserialize(d)?;
        if !s.is_finite() || s <= 0.0 {
            return Err(serde::de::Error::custom("durations are positive seconds"));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

/// Creates (or finds) the streams and the blob bucket natter uses.
pub async fn ensure_streams(js: &jetstream::Context, settings: &JetStreamSettings) -> Result<Streams, SetupError> {
    let jobs = stream_named(
        js,
        stream::Config {
            name: JOBS_STREAM.into(),
            subjects: vec![subjects::JOBS_ALL.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: settings.jobs_max_age,
            // One subject per (kind, model): a bounded queue per model, enforced
            // by JetStream itself across every front-end.
            max_messages_per_subject: settings.max_pending.max(1),
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    let events = stream_named(
        js,
        stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![subjects::EVENTS_ALL.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.events_max_age,
            // Followers read stored events from any replica (see `stored_events`).
            allow_direct: true,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    // Cancellations are kept too: a job cancelled while still queued is dropped by
    // whichever worker fetches it later, even one that started after the cancel.
    let cancels = stream_named(
        js,
        stream::Config {
            name: CANCEL_STREAM.into(),
            subjects: vec![subjects::CANCEL_ALL.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.jobs_max_age,
            max_messages_per_subject: 1,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    )
    .await?;
    let blobs = blob_store(js, settings).await?;
    Ok(Streams { jobs, events, cancels, blobs })
}

/// Gets or creates a stream, bringing an existing one to the configured
/// replicas and limits.
///
/// Processes starting together on a fresh server race to create it, and the
/// loser is refused ("subjects overlap"), so a failed create looks the stream
/// up again before giving up.
async fn stream_named(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, SetupError> {
    let name = config.name.clone();
    let wanted = config.clone();
    let mut stream = match js.get_or_create_stream(config).await {
        Ok(stream) => stream,
        Err(source) => {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            js.get_stream(&name).await.map_err(|_| SetupError::Stream { name: name.clone(), source })?
        }
    };
    reconcile(js, &mut stream, &wanted).await?;
    Ok(stream)
}

/// Updates a stream made by an earlier setup: a stream with fewer replicas
/// than asked for (say, from a single-node start) is raised, one with more is
/// kept, since another process asked for them; the per-subject limit (the
/// queue bound) follows the configuration.
async fn reconcile(
    js: &jetstream::Context,
    stream: &mut stream::Stream,
    wanted: &stream::Config,
) -> Result<(), SetupError> {
    let current = stream.cached_info().config.clone();
    // The server shows "no limit" as -1 where a request may say 0.
    let per_subject = |c: &stream::Config| c.max_messages_per_subject.max(0);
    let updated = stream::Config {
        num_replicas: current.num_replicas.max(wanted.num_replicas).max(1),
        max_messages_per_subject: wanted.max_messages_per_subject,
        discard: wanted.discard,
        discard_new_per_subject: wanted.discard_new_per_subject,
        allow_direct: current.allow_direct || wanted.allow_direct,
        ..current.clone()
    };
    let unchanged = updated.num_replicas == current.num_replicas.max(1)
        && per_subject(&updated) == per_subject(&current)
        && updated.discard == current.discard
        && updated.discard_new_per_subject == current.discard_new_per_subject
        && updated.allow_direct == current.allow_direct;
    if unchanged {
        return Ok(());
    }
    tracing::info!(
        stream = %current.name,
        replicas = updated.num_replicas,
        max_per_subject = updated.max_messages_per_subject,
        "updating stream to the configured replicas and limits"
    );
    let name = current.name.clone();
    js.update_stream(updated).await.map_err(|source| SetupError::Update { name, source })?;
    // Refreshes the cached info; the update itself has already been applied.
    let _ = stream.info().await;
    Ok(())
}

/// How long a process keeps trying to store a message or read a stream while
/// the cluster elects a new leader for it (its node went away).
pub const ELECTION_RETRY: Duration = Duration::from_secs(20);

/// Tries `attempt` again while it fails, pausing 0.1 s and doubling up to 2 s,
/// for up to [`ELECTION_RETRY`]: long enough for a cluster to elect a new stream
/// leader after a node went away. Errors `is_final` says are answers, not
/// outages, come back at once.
pub async fn retry_while_electing<T, E, F>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    is_final: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + ELECTION_RETRY;
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if is_final(&e) || tokio::time::Instant::now() + pause > deadline => return Err(e),
            Err(e) => {
                tracing::warn!("cannot {what} yet ({e}); trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// A job's events stored at stream sequence `from` or later, in order, and
/// the sequence to read from next time.
///
/// These are direct gets, which any replica of NATTER_EVENTS answers: reads
/// go on while the stream elects a new leader, and no consumer is created
/// (creating one needs the cluster's meta leader, which may be the node that
/// went away). A replica may lag a little behind the leader; callers that
/// follow a job read again later rather than take a short answer as the end.
pub async fn stored_events(
    events: &stream::Stream,
    job_id: uuid::Uuid,
    mut from: u64,
) -> Result<(Vec<Event>, u64), stream::DirectGetError> {
    let subject = subjects::events(job_id);
    let mut found = Vec::new();
    loop {
        match events.direct_get_next_for_subject(subject.as_str(), Some(from.max(1))).await {
            Ok(message) => {
                from = message.sequence + 1;
                match serde_json::from_slice::<Event>(&message.payload) {
                    Ok(event) => found.push(event),
                    Err(e) => tracing::warn!(job = %job_id, "skipping an unreadable stored event: {e}"),
                }
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok((found, from)),
            Err(e) => return Err(e),
        }
    }
}

pub struct Streams {
    pub jobs: stream::Stream,
    pub events: stream::Stream,
    pub cancels: stream::Stream,
    /// Where front-ends put blobs above [`crate::proto::INLINE_BLOB_LIMIT`].
    pub blobs: jetstream::object_store::ObjectStore,
}

/// Durable consumer name for the workers serving `(kind, model)`; every worker
/// serving the pair binds the same one, so JetStream spreads jobs among them.
pub fn consumer_name(kind: JobKind, model: &str) -> String {
    format!("{kind}_{model}")
}

/// Binds the shared durable pull consumer for `(kind, model)`.
///
/// `MaxDeliver` is one more than `max_attempts`: the extra delivery is the one on
/// which a worker reports the job as failed instead of running it again, so a
/// job that keeps killing workers still reaches its user as a `failed` event.
pub async fn job_consumer(
    jobs: &stream::Stream,
    kind: JobKind,
    model: &str,
    settings: &JetStreamSettings,
) -> Result<consumer::PullConsumer, SetupError> {
    let name = consumer_name(kind, model);
    let bound = jobs.get_or_create_consumer(
        &name,
        consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subjects::job(kind, model),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_attempts + 1,
            // Workers bound their own intake by fetching only when an engine slot is
            // free; this is the fleet-wide ceiling.
            max_ack_pending: 1024,
            ..Default::default()
        },
    );
    match bound.await {
        Ok(consumer) => Ok(consumer),
        // Workers starting together race to create it, as with the streams.
        Err(source) => {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            jobs.get_consumer(&name).await.map_err(|_| SetupError::Consumer { name, source })
        }
    }
}

/// The object store bucket for blobs above [`crate::proto::INLINE_BLOB_LIMIT`].
async fn blob_store(
    js: &jetstream::Context,
    settings: &JetStreamSettings,
) -> Result<jetstream::object_store::ObjectStore, SetupError> {
    let store = match js.get_object_store(BLOB_BUCKET).await {
        Ok(store) => store,
        Err(_) => {
            let created = js
                .create_object_store(jetstream::object_store::Config {
                    bucket: BLOB_BUCKET.into(),
                    max_age: settings.jobs_max_age,
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(store) => store,
                // Another process created it in the meantime.
                Err(e) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    js.get_object_store(BLOB_BUCKET).await.map_err(|_| SetupError::Bucket(e))?
                }
            }
        }
    };
    // The bucket is a stream underneath, and is raised like the others.
    if let Ok(mut stream) = js.get_stream(format!("OBJ_{BLOB_BUCKET}")).await {
        let wanted = stream::Config { num_replicas: settings.replicas, ..stream.cached_info().config.clone() };
        reconcile(js, &mut stream, &wanted).await?;
    }
    Ok(store)
}

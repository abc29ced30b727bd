//! natter-worker: pulls jobs from NATS JetStream and runs them on local models.
//!
//! [`run`] connects, ensures the shared streams, loads one engine per served model
//! (each on its own thread), binds the model's durable consumer, registers the
//! worker with the NATS service API, and serves until `shutdown` resolves, then
//! drains.

pub mod asr;
pub mod bench;
pub mod chat;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod metrics;
pub mod ner;
pub mod ocr;
mod runner;
mod service;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

use crate::asr::AsrEngine;
use crate::chat::{ChatEngine, ChatOptions};
use crate::engine::EngineHandle;
use crate::ner::NerEngine;
use crate::ocr::{OcrEngine, Variant};
use natter_shared::catalog::Catalog;
use natter_shared::jetstream::{self as js_setup, JetStreamSettings};
use natter_shared::proto::JobKind;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] natter_shared::nats::NatsError),
    #[error(transparent)]
    Setup(#[from] js_setup::SetupError),
    #[error("model `{0}` is not in the catalog")]
    UnknownModel(String),
    #[error("model `{id}` is a {kind} model; this worker has no {kind} engine yet")]
    NoEngine { id: String, kind: JobKind },
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error("cannot load model `{id}`: {source}")]
    Load { id: String, source: engine::LoadError },
    #[error("cannot register with the NATS service API: {0}")]
    Service(String),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
}

/// The job kinds this worker has engines for.
pub const SERVED_KINDS: [JobKind; 4] = [JobKind::Chat, JobKind::Ner, JobKind::Ocr, JobKind::Asr];

/// Everything [`run`] needs, already resolved from flags, env and natter.toml.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub nats: natter_shared::nats::NatsSettings,
    pub jetstream: JetStreamSettings,
    pub catalog: Catalog,
    pub models_dir: PathBuf,
    /// Catalog ids to serve.
    pub serve: Vec<String>,
    /// Longest prompt + answer for chat jobs.
    pub max_context: usize,
    /// Chat conversations one model serves at once (continuous batching).
    pub chat_batch: usize,
    /// How the chat KV cache stores keys and values.
    pub kv_cache: natter_shared::config::KvCacheType,
    /// Largest input file a job may carry.
    pub max_input_bytes: u64,
    /// Longest audio a speech-to-text job may carry.
    pub max_audio_seconds: f64,
    /// Largest image an OCR job may carry, in pixels (checked before decoding).
    pub max_image_pixels: u64,
    /// How long SIGTERM waits for running jobs before handing them back.
    pub drain: Duration,
    /// Shown in `accepted` events and the service API.
    pub name: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
}

pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let client = config.nats.connect(&format!("natter-worker {}", config.name)).await?;
    let js = async_nats::jetstream::new(client.clone());
    let streams = js_setup::ensure_streams(&js, &config.jetstream).await?;
    let stop = CancellationToken::new();
    let metrics = Arc::new(metrics::WorkerMetrics::default());
    let health = Arc::new(metrics::Health {
        nats: client.clone(),
        js: js.clone(),
        metrics: metrics.clone(),
        loaded: Default::default(),
    });
    // Listening before the models load lets an orchestrator tell "loading"
    // (alive, not ready) from "dead".
    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| WorkerError::Metrics { addr, source })?;
            tracing::info!("metrics on http://{}/metrics", listener.local_addr().unwrap_or(addr));
            let app = metrics::app(health.clone());
            let stopped = stop.clone().cancelled_owned();
            Some(tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await }))
        }
        None => None,
    };

    let mut served = Vec::new();
    for id in &config.serve {
        let entry = config.catalog.get(id).ok_or_else(|| WorkerError::UnknownModel(id.clone()))?;
        let path = fetch::resolve(entry, &config.models_dir)?;
        tracing::info!(model = %id, path = %path.display(), "loading");
        let max_context = config.max_context;
        let engine = match entry.kind {
            JobKind::Chat => {
                let options = ChatOptions {
                    kv_cache: config.kv_cache,
                    ..ChatOptions::new(max_context, config.chat_batch, chat::default_threads())
                };
                EngineHandle::spawn_batched(id, move || ChatEngine::load(&path, options)).await
            }
            JobKind::Ner => EngineHandle::spawn(id, move || NerEngine::load(&path)).await,
            JobKind::Asr => {
                let max_seconds = config.max_audio_seconds;
                EngineHandle::spawn(id, move || AsrEngine::load(&path, max_seconds)).await
            }
            JobKind::Ocr => {
                let max_pixels = config.max_image_pixels;
                let variant = Variant::from_arch(&entry.arch)
                    .map_err(|e| WorkerError::Load { id: id.clone(), source: engine::LoadError::Failed(e) })?;
                EngineHandle::spawn(id, move || OcrEngine::load(&path, variant, max_pixels)).await
            }
        }
        .map_err(|source| WorkerError::Load { id: id.clone(), source })?;
        let consumer = js_setup::job_consumer(&streams.jobs, entry.kind, id, &config.jetstream).await?;
        served.push((entry.clone(), engine, consumer));
    }

    let shared = Arc::new(runner::Shared::new(
        js.clone(),
        streams.events.clone(),
        streams.cancels.clone(),
        streams.blobs.clone(),
        config.max_input_bytes,
        config.jetstream.clone(),
        config.name.clone(),
        config.drain,
        metrics.clone(),
    ));
    let models: Vec<_> = served.iter().map(|(e, _, _)| e.clone()).collect();
    let service =
        service::register(&client, &config.name, &models, shared.clone()).await.map_err(WorkerError::Service)?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(runner::listen_for_cancels(client.clone(), shared.clone(), stop.clone()));
    for (entry, engine, consumer) in served {
        tracing::info!(model = %entry.id, kind = %entry.kind, "serving");
        let slots = engine.slots();
        metrics.serve(&entry.id, slots, engine.stats());
        tasks.spawn(runner::serve_model(shared.clone(), consumer, entry.kind, entry.id, engine, slots, stop.clone()));
    }
    health.set_loaded();
    tracing::info!(worker = %config.name, "ready");
    shutdown.await;
    tracing::info!("stopping: no new jobs; draining running ones");
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    service.stop().await;
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    let _ = client.flush().await;
    tracing::info!("stopped");
    Ok(())
}

//! The worker's Prometheus metrics and its health endpoints.
//!
//! The runner counts jobs as they end; what only the engine threads know (time
//! spent computing, KV cache held) lives in each engine's [`EngineStats`] and is
//! read at scrape time, so inference never touches the registry.

use crate::engine::EngineStats;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use natter_shared::jetstream::JOBS_STREAM;
use natter_shared::proto::ErrorCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    pub model: String,
    /// done, failed, cancelled or handed_back (to the queue, at shutdown).
    pub outcome: String,
    /// The failure's error code; empty unless the job failed.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    /// prompt or completion.
    phase: String,
}

/// How a job left this worker, as the `outcome` and `code` labels say it.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Done,
    Failed(ErrorCode),
    Cancelled,
    HandedBack,
}

/// Every figure a worker exports, behind one registry.
pub struct WorkerMetrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    redeliveries: Family<ModelLabels, Counter>,
    running: Family<ModelLabels, Gauge>,
    slots: Family<ModelLabels, Gauge>,
    tokens: Family<TokenLabels, Counter>,
    decode_rate: Family<ModelLabels, Histogram>,
    engines: Arc<EngineCollector>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("natter_worker");
        let jobs = Family::default();
        registry.register("jobs", "Jobs this worker finished, by kind, model and outcome", jobs.clone());
        let redeliveries = Family::default();
        registry.register(
            "redeliveries",
            "Jobs taken on a later attempt, after the worker running them died",
            redeliveries.clone(),
        );
        let running = Family::default();
        registry.register("running_jobs", "Jobs running now", running.clone());
        let slots = Family::default();
        registry.register(
            "slots",
            "Jobs each model can run at once (batch occupancy is running_jobs over this)",
            slots.clone(),
        );
        let tokens = Family::default();
        registry.register("tokens", "Chat tokens processed, prompt and completion", tokens.clone());
        let decode_rate = Family::<ModelLabels, Histogram>::new_with_constructor(decode_buckets as fn() -> Histogram);
        registry.register("decode_tokens_per_second", "Each chat job's decode speed", decode_rate.clone());
        let engines = Arc::new(EngineCollector::default());
        registry.register_collector(Box::new(engines.clone()));
        WorkerMetrics { registry, jobs, redeliveries, running, slots, tokens, decode_rate, engines }
    }
}

fn decode_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

fn model(model: &str) -> ModelLabels {
    ModelLabels { model: model.to_string() }
}

impl WorkerMetrics {
    /// Starts reporting a model: its slots, and its engine's own figures.
    pub fn serve(&self, model_id: &str, slots: usize, stats: Arc<EngineStats>) {
        self.slots.get_or_create(&model(model_id)).set(slots as i64);
        self.running.get_or_create(&model(model_id)).set(0);
        self.engines.models.lock().unwrap().push((model_id.to_string(), stats));
    }

    pub fn started(&self, model_id: &str, attempt: u32) {
        if attempt > 1 {
            self.redeliveries.get_or_create(&model(model_id)).inc();
        }
        self.running.get_or_create(&model(model_id)).inc();
    }

    pub fn stopped(&self, model_id: &str) {
        self.running.get_or_create(&model(model_id)).dec();
    }

    pub fn ended(&self, kind: &str, model: &str, outcome: Outcome) {
        let (outcome, code) = match outcome {
            Outcome::Done => ("done", String::new()),
            Outcome::Failed(code) => ("failed", code_name(code)),
            Outcome::Cancelled => ("cancelled", String::new()),
            Outcome::HandedBack => ("handed_back", String::new()),
        };
        let labels = JobLabels { kind: kind.into(), model: model.into(), outcome: outcome.into(), code };
        self.jobs.get_or_create(&labels).inc();
    }

    /// A finished chat job's token counts and decode speed.
    pub fn chat_done(&self, model_id: &str, metrics: &natter_shared::proto::Metrics) {
        let phase = |phase: &str| TokenLabels { model: model_id.into(), phase: phase.into() };
        self.tokens.get_or_create(&phase("prompt")).inc_by(metrics.prompt_tokens.into());
        self.tokens.get_or_create(&phase("completion")).inc_by(metrics.completion_tokens.into());
        if let Some(rate) = metrics.decode_tokens_per_s {
            self.decode_rate.get_or_create(&model(model_id)).observe(rate);
        }
    }

    /// The registry in the OpenMetrics text format Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}

/// The error code as it appears on the wire (`bad_input`, `internal`, ...).
fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// The engines' own figures, read from their threads' atomics at each scrape.
#[derive(Debug, Default)]
struct EngineCollector {
    models: Mutex<Vec<(String, Arc<EngineStats>)>>,
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let models = self.models.lock().unwrap();
        let busy = ConstCounter::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "engine_busy_seconds",
            "Time each model's engine thread spent computing",
            None,
            busy.metric_type(),
        )?;
        for (id, stats) in models.iter() {
            let labels = model(id);
            ConstCounter::new(stats.busy().as_secs_f64()).encode(family.encode_family(&labels)?)?;
        }
        let used = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "kv_cache_used_ratio",
            "Share of each chat model's KV cache positions holding a conversation",
            None,
            used.metric_type(),
        )?;
        for (id, stats) in models.iter() {
            if let Some(ratio) = stats.kv_cache_used() {
                ConstGauge::new(ratio).encode(family.encode_family(&model(id))?)?;
            }
        }
        Ok(())
    }
}

/// What `/readyz` checks besides the models being loaded.
pub struct Health {
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub metrics: Arc<WorkerMetrics>,
    /// Set once every served model is loaded and bound to its queue.
    pub loaded: AtomicBool,
}

impl Health {
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Why the worker cannot take jobs now, if it cannot.
    async fn not_ready(&self) -> Option<String> {
        if !self.loaded.load(Ordering::Acquire) {
            return Some("models are still loading".into());
        }
        if self.nats.connection_state() != async_nats::connection::State::Connected {
            return Some("not connected to NATS".into());
        }
        match tokio::time::timeout(Duration::from_secs(2), self.js.get_stream(JOBS_STREAM)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("stream {JOBS_STREAM} unreachable: {e}")),
            Err(_) => Some(format!("stream {JOBS_STREAM} did not answer within 2 s")),
        }
    }
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (it can take jobs).
pub fn app(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(health)
}

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], health.metrics.encode())
}

async fn ready(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.not_ready().await {
        None => (StatusCode::OK, "ready".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_engine_figures_are_exported_with_their_labels() {
        let metrics = WorkerMetrics::default();
        let stats = Arc::new(EngineStats::default());
        stats.add_busy(Duration::from_millis(1500));
        stats.set_kv_cache(50, 200);
        metrics.serve("tiny", 4, stats);
        metrics.started("tiny", 2);
        metrics.ended("chat", "tiny", Outcome::Failed(ErrorCode::BadInput));
        let text = metrics.encode();
        for line in [
            r#"natter_worker_jobs_total{kind="chat",model="tiny",outcome="failed",code="bad_input"} 1"#,
            r#"natter_worker_redeliveries_total{model="tiny"} 1"#,
            r#"natter_worker_running_jobs{model="tiny"} 1"#,
            r#"natter_worker_slots{model="tiny"} 4"#,
            r#"natter_worker_engine_busy_seconds_total{model="tiny"} 1.5"#,
            r#"natter_worker_kv_cache_used_ratio{model="tiny"} 0.25"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }
}

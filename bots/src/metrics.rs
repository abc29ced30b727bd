//! The front-end's Prometheus metrics: HTTP requests, what users wait for (time
//! to first token), tokens, jobs by outcome, and the queue depth per model.
//!
//! Jobs are counted in the [`crate::client::JobClient`], which every front-end
//! uses, so the bots' jobs count as the API's do.

use natter_shared::proto::{Event, EventBody, JobKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route's pattern (`/v1/chat/completions`), never the raw path, so
    /// ids in paths do not make a series each.
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    /// prompt or completion.
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    /// done, failed, cancelled, lost (its events stopped) or busy (refused
    /// because the model's queue was full).
    outcome: String,
}

/// Every figure the front-end exports, behind one registry.
#[derive(Debug)]
pub struct FrontMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram>,
    first_token: Family<ModelLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    jobs: Family<JobLabels, Counter>,
    queue_depth: Family<ModelLabels, Gauge>,
}

fn latency_buckets() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Default for FrontMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("natter");
        let requests = Family::default();
        registry.register("http_requests", "HTTP requests answered, by route and status", requests.clone());
        let request_seconds =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer (or start streaming)",
            request_seconds.clone(),
        );
        let first_token = Family::<ModelLabels, Histogram>::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register(
            "time_to_first_token_seconds",
            "From following a job to its first streamed output, queueing included",
            first_token.clone(),
        );
        let tokens = Family::default();
        registry.register("tokens", "Chat tokens of finished jobs, prompt and completion", tokens.clone());
        let jobs = Family::default();
        registry.register("jobs", "Jobs followed to their end, by kind and outcome", jobs.clone());
        let queue_depth = Family::default();
        registry.register("queue_depth", "Jobs waiting for a worker, per model", queue_depth.clone());
        FrontMetrics { registry, requests, request_seconds, first_token, tokens, jobs, queue_depth }
    }
}

impl FrontMetrics {
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { route: route.into(), status }).inc();
        self.request_seconds.get_or_create(&RouteLabels { route: route.into() }).observe(took.as_secs_f64());
    }

    pub fn job_ended(&self, kind: JobKind, outcome: &str) {
        self.jobs.get_or_create(&JobLabels { kind: kind.as_str().into(), outcome: outcome.into() }).inc();
    }

    pub fn set_queue_depth(&self, model: &str, waiting: u64) {
        self.queue_depth.get_or_create(&ModelLabels { model: model.into() }).set(waiting as i64);
    }

    /// The registry in the OpenMetrics text format Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}

/// One followed job, seen event by event: records its first output and its
/// end once each, whichever attempt they come from.
pub struct JobWatch {
    kind: JobKind,
    started: Instant,
    model: Option<String>,
    first_output: bool,
    ended: bool,
}

impl JobWatch {
    pub fn new(kind: JobKind) -> Self {
        JobWatch { kind, started: Instant::now(), model: None, first_output: false, ended: false }
    }

    pub fn see(&mut self, metrics: &FrontMetrics, event: &Event) {
        match &event.body {
            EventBody::Accepted { model, .. } => self.model = Some(model.clone()),
            EventBody::Token { .. } | EventBody::Segment { .. } | EventBody::Line { .. } if !self.first_output => {
                self.first_output = true;
                let model = ModelLabels { model: self.model.clone().unwrap_or_default() };
                metrics.first_token.get_or_create(&model).observe(self.started.elapsed().as_secs_f64());
            }
            EventBody::Done { metrics: figures, .. } => {
                if self.kind == JobKind::Chat && !self.ended {
                    let model = self.model.clone().unwrap_or_default();
                    let phase = |phase: &str| TokenLabels { model: model.clone(), phase: phase.into() };
                    metrics.tokens.get_or_create(&phase("prompt")).inc_by(figures.prompt_tokens.into());
                    metrics.tokens.get_or_create(&phase("completion")).inc_by(figures.completion_tokens.into());
                }
                self.end(metrics, "done");
            }
            EventBody::Failed { .. } => self.end(metrics, "failed"),
            EventBody::Cancelled => self.end(metrics, "cancelled"),
            _ => {}
        }
    }

    /// The job's events stopped before its end.
    pub fn lost(&mut self, metrics: &FrontMetrics) {
        self.end(metrics, "lost");
    }

    fn end(&mut self, metrics: &FrontMetrics, outcome: &str) {
        if !self.ended {
            self.ended = true;
            metrics.job_ended(self.kind, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_shared::proto::{FinishReason, JobResult, Metrics, V1};
    use uuid::Uuid;

    fn event(body: EventBody) -> Event {
        Event { v: V1, job_id: Uuid::nil(), attempt: 1, seq: 0, body }
    }

    #[test]
    fn a_watched_chat_counts_its_first_token_tokens_and_end_once() {
        let metrics = FrontMetrics::default();
        let mut watch = JobWatch::new(JobKind::Chat);
        watch.see(&metrics, &event(EventBody::Accepted { worker: "w".into(), model: "tiny".into() }));
        watch.see(&metrics, &event(EventBody::Token { text: "a".into(), tokens: vec![1] }));
        watch.see(&metrics, &event(EventBody::Token { text: "b".into(), tokens: vec![2] }));
        let figures = Metrics { prompt_tokens: 7, completion_tokens: 2, ..Default::default() };
        let done = EventBody::Done {
            result: JobResult::Chat { text: "ab".into(), finish_reason: FinishReason::Stop },
            metrics: figures,
        };
        watch.see(&metrics, &event(done));
        watch.lost(&metrics);
        metrics.request("/v1/chat/completions", 200, Duration::from_millis(3));
        let text = metrics.encode();
        for line in [
            r#"natter_time_to_first_token_seconds_count{model="tiny"} 1"#,
            r#"natter_tokens_total{model="tiny",phase="prompt"} 7"#,
            r#"natter_tokens_total{model="tiny",phase="completion"} 2"#,
            r#"natter_jobs_total{kind="chat",outcome="done"} 1"#,
            r#"natter_http_requests_total{route="/v1/chat/completions",status="200"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"outcome="lost""#));
    }
}

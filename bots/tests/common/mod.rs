//! What the front-end's HTTP tests share: the real router over a real
//! nats-server, multipart forms, reading answers and Server-Sent Events, and
//! the pieces of a scripted stand-in worker (discovery, publishing events).

#![allow(dead_code)]

use async_nats::jetstream;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use natter_bots::client::JobClient;
use natter_bots::fleet::Fleet;
use natter_bots::http::{app, AppState};
use natter_shared::catalog::Catalog;
use natter_shared::jetstream::JetStreamSettings;
use natter_shared::proto::{Event, EventBody, V1};
use natter_shared::subjects;
use natter_shared::testkit::NatsServer;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;
use uuid::Uuid;

/// Writes `toml` as a catalog file under the test's temporary directory and loads it.
pub fn catalog(name: &str, toml: &str) -> Catalog {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-models.toml"));
    std::fs::write(&path, toml).unwrap();
    Catalog::load(&path).unwrap()
}

/// The front-end's router on `nats`, as `natter_bots::serve` builds it.
pub async fn router(nats: &NatsServer, catalog: Catalog, max_upload: usize, job_timeout: Duration) -> axum::Router {
    let jobs = JobClient::connect(&nats.settings(), &JetStreamSettings::default()).await.unwrap();
    let state = AppState {
        fleet: Fleet::new(jobs.nats().clone()),
        jobs,
        catalog: Arc::new(catalog),
        job_timeout,
        max_upload,
        api_keys: Default::default(),
    };
    app(state)
}

/// Answers `$SRV.INFO` as one worker serving `models` (comma-separated) of one `kind`.
pub async fn announce(client: &async_nats::Client, kind: &str, models: &str) {
    let mut info = client.subscribe(format!("$SRV.INFO.{}", subjects::WORKER_SERVICE)).await.unwrap();
    client.flush().await.unwrap();
    let served: Vec<String> = models.split(',').map(|m| format!("{kind}:{m}")).collect();
    let (client, kind, models, served) = (client.clone(), kind.to_string(), models.to_string(), served.join(","));
    tokio::spawn(async move {
        while let Some(msg) = info.next().await {
            let reply = serde_json::json!({
                "id": "stand-in", "version": "0.0.0",
                "metadata": { "worker": "stand-in", "kinds": kind, "models": models, "served": served },
            });
            let _ = client.publish(msg.reply.unwrap(), reply.to_string().into()).await;
        }
    });
}

/// Publishes one of a job's events as a worker does, waiting until it is stored.
pub async fn publish_event(js: &jetstream::Context, job_id: Uuid, attempt: u32, seq: u64, body: EventBody) {
    let event = Event { v: V1, job_id, attempt, seq, body };
    js.publish(subjects::events(job_id), serde_json::to_vec(&event).unwrap().into()).await.unwrap().await.unwrap();
}

/// A multipart/form-data body.
pub struct Form {
    body: Vec<u8>,
}

const BOUNDARY: &str = "natter-test-boundary";

impl Form {
    pub fn new() -> Self {
        Form { body: Vec::new() }
    }

    pub fn text(mut self, name: &str, value: &str) -> Self {
        let head = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n");
        self.body.extend_from_slice(head.as_bytes());
        self
    }

    /// A file in the field `file`, as OpenAI's audio endpoints name it.
    pub fn file(self, file_name: &str, content_type: &str, data: &[u8]) -> Self {
        self.file_in("file", file_name, content_type, data)
    }

    pub fn file_in(mut self, field: &str, file_name: &str, content_type: &str, data: &[u8]) -> Self {
        let head = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file_name}\"\r\n\
             Content-Type: {content_type}\r\n\r\n"
        );
        self.body.extend_from_slice(head.as_bytes());
        self.body.extend_from_slice(data);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    pub fn request(mut self, path: &str) -> Request<Body> {
        self.body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        Request::post(path)
            .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
            .body(Body::from(self.body))
            .unwrap()
    }
}

/// The status, content type and body of the router's answer.
pub async fn send(router: &axum::Router, request: Request<Body>) -> (StatusCode, String, String) {
    let response =
        tokio::time::timeout(Duration::from_secs(30), router.clone().oneshot(request)).await.unwrap().unwrap();
    let status = response.status();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, content_type, String::from_utf8(body.to_vec()).unwrap())
}

pub async fn send_json(router: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, _, body) = send(router, request).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

/// `(event, data)` pairs of a Server-Sent Events body.
pub fn sse(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|frame| {
            let field =
                |name: &str| frame.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_string());
            Some((field("event:")?, serde_json::from_str(&field("data:")?).unwrap()))
        })
        .collect()
}

/// The names of the events in an SSE body, in order.
pub fn event_names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(e, _)| e.as_str()).collect()
}

//! The OCR endpoints through the real router, a real nats-server and a scripted
//! stand-in for the worker that answers discovery and plays back the events an
//! OCR worker sends, so what is tested here is the front-end's side (forms,
//! blobs, status codes, the line stream, attempts, cancels). tests/ocr_frontends.rs
//! runs the same endpoints against the real engine.

mod common;

use async_nats::jetstream;
use axum::http::StatusCode;
use common::*;
use futures::StreamExt;
use natter_shared::jetstream::BLOB_BUCKET;
use natter_shared::proto::{
    Blob, ErrorCode, EventBody, Job, JobInput, JobResult, Metrics, OcrLine, OcrTimings, INLINE_BLOB_LIMIT,
};
use natter_shared::subjects;
use natter_shared::testkit::NatsServer;
use serde_json::json;
use std::time::Duration;
use tokio::sync::mpsc;
use tower::ServiceExt;

const OCR_MODEL: &str = "ppocr-test";

struct Setup {
    _nats: NatsServer,
    router: axum::Router,
    /// Job ids the stand-in worker saw cancelled.
    cancelled: mpsc::UnboundedReceiver<uuid::Uuid>,
}

async fn setup(worker: bool, max_upload: usize, job_timeout: Duration) -> Setup {
    let nats = NatsServer::start();
    let (cancel_tx, cancelled) = mpsc::unbounded_channel();
    if worker {
        stand_in_worker(nats.connect().await, cancel_tx).await;
    }
    let toml = format!(
        r#"
[[model]]
id = "chat-test"
kind = "chat"
arch = "llama"
file = "chat.gguf"

[[model]]
id = "{OCR_MODEL}"
kind = "ocr"
arch = "ppocr"
file = "ppocr-test"
default = true

[[model]]
id = "ppocr-other"
kind = "ocr"
arch = "ppocr"
file = "ppocr-other"
"#
    );
    let router = router(&nats, catalog("ocr-http", &toml), max_upload, job_timeout).await;
    Setup { _nats: nats, router, cancelled }
}

async fn with_worker() -> Setup {
    setup(true, 1 << 20, Duration::from_secs(30)).await
}

/// Serves [`OCR_MODEL`] on discovery and plays back events for each job,
/// chosen by the image's first bytes.
async fn stand_in_worker(client: async_nats::Client, cancelled: mpsc::UnboundedSender<uuid::Uuid>) {
    announce(&client, "ocr", OCR_MODEL).await;
    let mut jobs = client.subscribe("natter.job.ocr.>").await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    tokio::spawn(async move {
        while let Some(msg) = jobs.next().await {
            let job: Job = serde_json::from_slice(&msg.payload).unwrap();
            tokio::spawn(play(client.clone(), js.clone(), job, cancelled.clone()));
        }
    });
}

fn line(text: &str, top: f32) -> OcrLine {
    OcrLine {
        text: text.into(),
        confidence: 0.93,
        bbox: [[12.0, top], [300.0, top], [300.0, top + 24.0], [12.0, top + 24.0]],
    }
}

async fn play(
    client: async_nats::Client,
    js: jetstream::Context,
    job: Job,
    cancelled: mpsc::UnboundedSender<uuid::Uuid>,
) {
    let JobInput::Ocr(input) = &job.input else { panic!("not an ocr job") };
    let store = js.get_object_store(BLOB_BUCKET).await.unwrap();
    let (image, content_type) = natter_shared::blob::get(&store, input.image.clone(), u64::MAX).await.unwrap();
    let stored = matches!(input.image, Blob::Stored(_));
    let mut cancels = client.subscribe(subjects::cancel(job.id)).await.unwrap();
    let send = |attempt: u32, seq: u64, body: EventBody| publish_event(&js, job.id, attempt, seq, body);
    send(1, 0, EventBody::Accepted { worker: "stand-in".into(), model: job.model.clone() }).await;
    if image.starts_with(b"corrupt") {
        let message = "cannot decode the image: not a PNG, JPEG, WebP, GIF, BMP or TIFF file".into();
        return send(1, 1, EventBody::Failed { code: ErrorCode::BadInput, message }).await;
    }
    if image.starts_with(b"huge") {
        let message = "the image is 40000 × 40000 pixels; the limit is 100 megapixels".into();
        return send(1, 1, EventBody::Failed { code: ErrorCode::TooLarge, message }).await;
    }
    if image.starts_with(b"slow") {
        send(1, 1, EventBody::Line { line: line("first line", 10.0) }).await;
        cancels.next().await;
        cancelled.send(job.id).unwrap();
        return send(1, 2, EventBody::Cancelled).await;
    }
    let mut attempt = 1;
    if image.starts_with(b"retry") {
        send(1, 1, EventBody::Line { line: line("from the dead attempt", 10.0) }).await;
        attempt = 2;
        send(2, 0, EventBody::Accepted { worker: "stand-in-2".into(), model: job.model.clone() }).await;
    }
    // The second line tells the test what reached the worker.
    let heard = format!("{} {content_type} {} bytes{}", job.model, image.len(), if stored { " stored" } else { "" });
    let lines = vec![line("Invoice 42", 10.0), line(&heard, 50.0)];
    for (i, l) in lines.iter().enumerate() {
        send(attempt, 1 + i as u64, EventBody::Line { line: l.clone() }).await;
    }
    let result = JobResult::Ocr {
        text: format!("Invoice 42\n{heard}"),
        lines,
        width: 640,
        height: 480,
        timings: OcrTimings { decode_ms: 1.5, detect_ms: 20.0, classify_ms: 2.0, recognize_ms: 30.0 },
    };
    send(attempt, 3, EventBody::Done { result, metrics: Metrics { wall_ms: 60.0, ..Metrics::default() } }).await;
}

fn image_form(data: &[u8]) -> Form {
    Form::new().file_in("image", "scan.png", "image/png", data)
}

#[tokio::test]
async fn an_image_comes_back_as_text_lines_boxes_and_timings() {
    let s = with_worker().await;
    let (status, v) = send_json(&s.router, image_form(b"\x89PNG").request("/api/ocr")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["model"], OCR_MODEL);
    assert_eq!(v["text"], format!("Invoice 42\n{OCR_MODEL} image/png 4 bytes"));
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(640), Some(480)));
    assert_eq!(
        v["lines"][0],
        json!({ "id": 0, "text": "Invoice 42", "confidence": 0.93,
                "bbox": [[12.0, 10.0], [300.0, 10.0], [300.0, 34.0], [12.0, 34.0]] })
    );
    assert_eq!(v["lines"][1]["id"], 1);
    assert_eq!(v["timings"], json!({ "decode_ms": 1.5, "detect_ms": 20.0, "classify_ms": 2.0, "recognize_ms": 30.0 }));
    assert_eq!(v["metrics"]["wall_ms"], 60.0);
    assert!(v["id"].as_str().is_some_and(|id| id.len() == 36), "{v}");

    // `file` works as the field too, `default` names the default model, and a
    // generic content type is replaced by the one the file name implies.
    let form = Form::new().text("model", "default").file("photo.JPG", "application/octet-stream", b"\xff\xd8\xff");
    let (status, v) = send_json(&s.router, form.request("/api/ocr")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["lines"][1]["text"], format!("{OCR_MODEL} image/jpeg 3 bytes"));
}

#[tokio::test]
async fn large_images_travel_through_the_object_store() {
    let s = with_worker().await;
    let image = vec![7u8; INLINE_BLOB_LIMIT + 1000];
    let (status, v) = send_json(&s.router, image_form(&image).request("/api/ocr")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let expected = format!("image/png {} bytes stored", image.len());
    assert!(v["text"].as_str().unwrap().ends_with(&expected), "{v}");
}

#[tokio::test]
async fn bad_forms_are_refused_before_any_job() {
    let s = setup(false, 1000, Duration::from_secs(30)).await;
    for path in ["/api/ocr", "/api/ocr/stream"] {
        let (status, v) = send_json(&s.router, Form::new().text("model", OCR_MODEL).request(path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(v["error"]["message"].as_str().unwrap().contains("`image`"), "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let (status, v) = send_json(&s.router, image_form(b"").request(path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(v["error"]["message"].as_str().unwrap().contains("empty"), "{v}");

        let json = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let (status, v) = send_json(&s.router, json).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(v["error"]["message"].as_str().unwrap().contains("multipart/form-data"), "{v}");
    }
}

#[tokio::test]
async fn uploads_over_the_limit_are_413() {
    let s = setup(false, 1000, Duration::from_secs(30)).await;
    // Over the file limit but inside the body limit: caught while reading the file.
    let (status, v) = send_json(&s.router, image_form(&[0; 1001]).request("/api/ocr")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "too_large");
    assert!(v["error"]["message"].as_str().unwrap().contains("1000 bytes"), "{v}");
    // Far over: the body limit stops reading.
    let (status, v) = send_json(&s.router, image_form(&vec![0; 200_000]).request("/api/ocr/stream")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "too_large");
    // Exactly at the limit is fine (and gets as far as finding no worker).
    assert_eq!(
        send_json(&s.router, image_form(&[1; 1000]).request("/api/ocr")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn models_resolve_like_the_other_kinds() {
    let s = setup(false, 1 << 20, Duration::from_secs(30)).await;
    let form = image_form(b"png").text("model", "no-such-model");
    let (status, v) = send_json(&s.router, form.request("/api/ocr")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "model_not_found");
    // A model of another kind is no OCR model.
    let form = image_form(b"png").text("model", "chat-test");
    assert_eq!(send_json(&s.router, form.request("/api/ocr")).await.0, StatusCode::NOT_FOUND);
    let form = image_form(b"png").text("model", "ppocr-other");
    let (status, v) = send_json(&s.router, form.request("/api/ocr/stream")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "no_worker");
    assert!(v["error"]["message"].as_str().unwrap().contains("ppocr-other"), "{v}");
    let (status, v) = send_json(&s.router, image_form(b"png").request("/api/ocr")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"]["message"].as_str().unwrap().contains(OCR_MODEL), "no model means the default: {v}");
}

#[tokio::test]
async fn worker_failures_become_http_statuses() {
    let s = with_worker().await;
    for path in ["/api/ocr", "/api/ocr/stream"] {
        // The stream waits for the first line, so an immediate failure is a status too.
        let (status, v) = send_json(&s.router, image_form(b"corrupt bytes").request(path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(v["error"]["code"], "bad_input");
        assert_eq!(v["error"]["message"], "cannot decode the image: not a PNG, JPEG, WebP, GIF, BMP or TIFF file");
        let (status, v) = send_json(&s.router, image_form(b"huge").request(path)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        assert_eq!(v["error"]["code"], "too_large");
    }
}

#[tokio::test]
async fn the_stream_sends_lines_then_done() {
    let s = with_worker().await;
    let (status, content_type, body) = send(&s.router, image_form(b"GIF89a").request("/api/ocr/stream")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let events = sse(&body);
    assert_eq!(event_names(&events), ["line", "line", "done"], "{body}");
    assert_eq!(events[0].1["id"], 0);
    assert_eq!(events[0].1["text"], "Invoice 42");
    assert_eq!(events[0].1["confidence"], 0.93);
    assert_eq!(events[0].1["bbox"][2], json!([300.0, 34.0]));
    assert_eq!(events[1].1["id"], 1);
    let done = &events[2].1;
    assert_eq!(done["model"], OCR_MODEL);
    assert_eq!(done["lines"].as_array().unwrap().len(), 2);
    assert_eq!(done["lines"][0], events[0].1, "a streamed line is the line of the result");
    assert_eq!((done["width"].as_u64(), done["height"].as_u64()), (Some(640), Some(480)));
    assert_eq!(done["timings"]["recognize_ms"], 30.0);
    assert_eq!(done["metrics"]["wall_ms"], 60.0);
}

#[tokio::test]
async fn a_retried_attempt_restarts_the_stream() {
    let s = with_worker().await;
    let (status, _, body) = send(&s.router, image_form(b"retry").request("/api/ocr/stream")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = sse(&body);
    assert_eq!(event_names(&events), ["line", "restart", "line", "line", "done"], "{body}");
    assert_eq!(events[1].1, json!({ "attempt": 2 }));
    assert_eq!(events[2].1["id"], 0, "numbering starts again");
    // The non-streaming answer holds only the new attempt's lines.
    let (_, v) = send_json(&s.router, image_form(b"retry").request("/api/ocr")).await;
    assert_eq!(v["lines"].as_array().unwrap().len(), 2, "{v}");
    assert!(!v["text"].as_str().unwrap().contains("dead attempt"), "{v}");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_job() {
    let mut s = with_worker().await;
    let response = s.router.clone().oneshot(image_form(b"slow").request("/api/ocr/stream")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let first = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(first.contains("first line"), "{first}");
    drop(body);
    let cancelled = tokio::time::timeout(Duration::from_secs(10), s.cancelled.recv()).await;
    assert!(cancelled.unwrap().is_some(), "the worker was told to stop");
}

#[tokio::test]
async fn a_job_past_its_time_is_504_and_cancelled() {
    let mut s = setup(true, 1 << 20, Duration::from_secs(1)).await;
    let (status, v) = send_json(&s.router, image_form(b"slow").request("/api/ocr")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(v["error"]["code"], "timeout");
    let cancelled = tokio::time::timeout(Duration::from_secs(10), s.cancelled.recv()).await;
    assert!(cancelled.unwrap().is_some(), "the worker was told to stop");
    // The stream reports it as an error event once it has started.
    let (status, _, body) = send(&s.router, image_form(b"slow").request("/api/ocr/stream")).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse(&body);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error", "{body}");
    assert_eq!(data["code"], "timeout");
    assert_eq!(data["status"], 504);
}

//! The speech-to-text endpoints through the real router, a real nats-server and
//! a scripted stand-in for the worker: it answers discovery and plays back the
//! events a worker would send, so what is tested here is the front-end's side
//! (forms, blobs, response formats, status codes, the event stream, cancels).

mod common;

use async_nats::jetstream;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use futures::StreamExt;
use natter_shared::catalog::Catalog;
use natter_shared::jetstream::BLOB_BUCKET;
use natter_shared::proto::{
    AsrTask, Blob, ErrorCode, EventBody, Job, JobInput, JobResult, Metrics, Segment, INLINE_BLOB_LIMIT,
};
use natter_shared::subjects;
use natter_shared::testkit::NatsServer;
use std::time::Duration;
use tokio::sync::mpsc;
use tower::ServiceExt;

const ASR_MODEL: &str = "whisper-test";

struct Setup {
    _nats: NatsServer,
    router: axum::Router,
    /// Job ids the stand-in worker saw cancelled.
    cancelled: mpsc::UnboundedReceiver<uuid::Uuid>,
}

fn audio_catalog() -> Catalog {
    catalog(
        "audio-http",
        &format!(
            r#"
[[model]]
id = "chat-test"
kind = "chat"
arch = "llama"
file = "chat.gguf"
default = true

[[model]]
id = "{ASR_MODEL}"
kind = "asr"
arch = "whisper"
file = "whisper"
default = true

[[model]]
id = "whisper-other"
kind = "asr"
arch = "whisper"
file = "whisper-other"
"#
        ),
    )
}

async fn setup(worker: bool, max_upload: usize, job_timeout: Duration) -> Setup {
    let nats = NatsServer::start();
    let (cancel_tx, cancelled) = mpsc::unbounded_channel();
    if worker {
        stand_in_worker(nats.connect().await, cancel_tx).await;
    }
    let router = router(&nats, audio_catalog(), max_upload, job_timeout).await;
    Setup { _nats: nats, router, cancelled }
}

async fn with_worker() -> Setup {
    setup(true, 1 << 20, Duration::from_secs(30)).await
}

/// Answers `$SRV.INFO` as a worker serving [`ASR_MODEL`] and plays back events
/// for each job, chosen by the audio's first bytes.
async fn stand_in_worker(client: async_nats::Client, cancelled: mpsc::UnboundedSender<uuid::Uuid>) {
    announce(&client, "asr", ASR_MODEL).await;
    let mut jobs = client.subscribe("natter.job.asr.>").await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    tokio::spawn(async move {
        while let Some(msg) = jobs.next().await {
            let job: Job = serde_json::from_slice(&msg.payload).unwrap();
            tokio::spawn(play(client.clone(), js.clone(), job, cancelled.clone()));
        }
    });
}

async fn play(
    client: async_nats::Client,
    js: jetstream::Context,
    job: Job,
    cancelled: mpsc::UnboundedSender<uuid::Uuid>,
) {
    let JobInput::Asr(input) = &job.input else { panic!("not an asr job") };
    let store = js.get_object_store(BLOB_BUCKET).await.unwrap();
    let (audio, content_type) = natter_shared::blob::get(&store, input.audio.clone(), u64::MAX).await.unwrap();
    let stored = matches!(input.audio, Blob::Stored(_));
    let mut cancels = client.subscribe(subjects::cancel(job.id)).await.unwrap();
    let send = |attempt: u32, seq: u64, body: EventBody| publish_event(&js, job.id, attempt, seq, body);
    let seg =
        |start: f64, end: f64, text: &str| EventBody::Segment { segment: Segment { start, end, text: text.into() } };
    send(1, 0, EventBody::Accepted { worker: "stand-in".into(), model: job.model.clone() }).await;
    if audio.starts_with(b"corrupt") {
        let body = EventBody::Failed { code: ErrorCode::BadInput, message: "cannot decode the audio".into() };
        return send(1, 1, body).await;
    }
    if audio.starts_with(b"long") {
        let body = EventBody::Failed { code: ErrorCode::TooLarge, message: "the audio is 3 hours long".into() };
        return send(1, 1, body).await;
    }
    if audio.starts_with(b"slow") {
        send(1, 1, seg(0.0, 1.0, "first words")).await;
        cancels.next().await;
        cancelled.send(job.id).unwrap();
        return send(1, 2, EventBody::Cancelled).await;
    }
    let mut attempt = 1;
    if audio.starts_with(b"retry") {
        send(1, 1, seg(0.0, 1.0, "from the dead attempt")).await;
        attempt = 2;
        send(2, 0, EventBody::Accepted { worker: "stand-in-2".into(), model: job.model.clone() }).await;
    }
    // The transcript tells the test what reached the worker.
    let task = match input.task {
        AsrTask::Transcribe => "transcribe",
        AsrTask::Translate => "translate",
    };
    let heard = format!("{task} {content_type} {} bytes{}", audio.len(), if stored { " stored" } else { "" });
    let segments = vec![
        Segment { start: 0.0, end: 1.5, text: " Hello there.".into() },
        Segment { start: 1.5, end: 3.0, text: format!(" {heard}") },
    ];
    for (i, s) in segments.iter().enumerate() {
        send(attempt, 1 + i as u64, EventBody::Segment { segment: s.clone() }).await;
    }
    let result = JobResult::Asr {
        text: segments.iter().map(|s| s.text.as_str()).collect(),
        language: Some(input.language.clone().unwrap_or_else(|| "en".into())),
        segments,
    };
    let metrics = Metrics { audio_seconds: Some(3.2), wall_ms: 800.0, ..Metrics::default() };
    send(attempt, 3, EventBody::Done { result, metrics }).await;
}

fn audio_form() -> Form {
    Form::new().file("talk.wav", "audio/wav", b"RIFF....WAVEfmt ")
}

#[tokio::test]
async fn transcriptions_answer_in_every_response_format() {
    let s = with_worker().await;
    let (status, v) = send_json(&s.router, audio_form().request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, serde_json::json!({ "text": " Hello there. transcribe audio/wav 16 bytes" }));

    let form = audio_form().text("model", "whisper-1").text("response_format", "text").text("prompt", "ignored");
    let (status, content_type, body) = send(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(body, "Hello there. transcribe audio/wav 16 bytes\n");

    let form = audio_form().text("response_format", "verbose_json").text("language", "de").text("temperature", "0");
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["task"], "transcribe");
    assert_eq!(v["language"], "de", "the hint reaches the worker");
    assert_eq!(v["duration"], 3.2);
    assert_eq!(v["segments"][0], serde_json::json!({ "id": 0, "start": 0.0, "end": 1.5, "text": " Hello there." }));
    assert_eq!(v["segments"][1]["id"], 1);

    let form = audio_form().text("model", ASR_MODEL).text("response_format", "srt");
    let (status, _, body) = send(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 00:00:03,000\n"));

    let form = audio_form().text("response_format", "vtt");
    let (status, content_type, body) = send(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/vtt"), "{content_type}");
    assert!(body.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n"), "{body}");
}

#[tokio::test]
async fn translations_translate_and_ignore_the_language_hint() {
    let s = with_worker().await;
    let form = audio_form().text("language", "de").text("response_format", "verbose_json");
    let (status, v) = send_json(&s.router, form.request("/v1/audio/translations")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["task"], "translate");
    assert_eq!(v["language"], "en");
    assert!(v["text"].as_str().unwrap().contains("translate"));
}

#[tokio::test]
async fn large_uploads_travel_through_the_object_store() {
    let s = with_worker().await;
    let audio = vec![7u8; INLINE_BLOB_LIMIT + 1000];
    let form = Form::new().file("voice.ogg", "application/octet-stream", &audio);
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let expected = format!("transcribe audio/ogg {} bytes stored", audio.len());
    assert!(v["text"].as_str().unwrap().ends_with(&expected), "{v}");
}

#[tokio::test]
async fn bad_forms_are_refused_before_any_job() {
    let s = setup(false, 1000, Duration::from_secs(30)).await;
    let (status, v) =
        send_json(&s.router, Form::new().text("model", "whisper-1").request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("`file`"), "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let (status, _) =
        send_json(&s.router, Form::new().file("a.wav", "audio/wav", b"").request("/api/transcribe")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let json = Request::post("/v1/audio/transcriptions")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let (status, v) = send_json(&s.router, json).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("multipart/form-data"), "{v}");

    let form = audio_form().text("response_format", "xml");
    assert_eq!(send_json(&s.router, form.request("/v1/audio/transcriptions")).await.0, StatusCode::BAD_REQUEST);
    let form = audio_form().text("language", "english");
    assert_eq!(send_json(&s.router, form.request("/v1/audio/transcriptions")).await.0, StatusCode::BAD_REQUEST);
    let form = audio_form().text("task", "summarize");
    assert_eq!(send_json(&s.router, form.request("/api/transcribe")).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn uploads_over_the_limit_are_413() {
    let s = setup(false, 1000, Duration::from_secs(30)).await;
    // Over the file limit but inside the body limit: caught while reading the file.
    let form = Form::new().file("a.wav", "audio/wav", &[0; 1001]);
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "too_large");
    assert!(v["error"]["message"].as_str().unwrap().contains("1000 bytes"), "{v}");
    // Far over: the body limit stops reading.
    let form = Form::new().file("a.wav", "audio/wav", &vec![0; 200_000]);
    let (status, v) = send_json(&s.router, form.request("/api/transcribe")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "too_large");
    // Exactly at the limit is fine (and gets as far as finding no worker).
    let form = Form::new().file("a.wav", "audio/wav", &[1; 1000]);
    assert_eq!(send_json(&s.router, form.request("/v1/audio/translations")).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn models_resolve_like_chat_models() {
    let s = setup(false, 1 << 20, Duration::from_secs(30)).await;
    let form = audio_form().text("model", "no-such-model");
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "model_not_found");
    let form = audio_form().text("model", "whisper-other");
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"]["message"].as_str().unwrap().contains("whisper-other"), "{v}");
    let form = audio_form().text("model", "whisper-1");
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"]["message"].as_str().unwrap().contains(ASR_MODEL), "whisper-1 means the default: {v}");
}

#[tokio::test]
async fn models_list_their_kind_and_default() {
    let s = with_worker().await;
    let (status, v) = send_json(&s.router, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let m = &v["data"][0];
    assert_eq!(
        (m["id"].as_str(), m["kind"].as_str(), m["default"].as_bool()),
        (Some(ASR_MODEL), Some("asr"), Some(true))
    );
}

#[tokio::test]
async fn worker_failures_become_http_statuses() {
    let s = with_worker().await;
    let corrupt = Form::new().file("a.mp3", "audio/mpeg", b"corrupt bytes");
    let (status, v) = send_json(&s.router, corrupt.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["message"], "cannot decode the audio");
    let long = Form::new().file("a.mp3", "audio/mpeg", b"long audio");
    assert_eq!(send_json(&s.router, long.request("/v1/audio/transcriptions")).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    // The stream waits for the first segment, so an immediate failure is a status too.
    let corrupt = Form::new().file("a.mp3", "audio/mpeg", b"corrupt bytes");
    let (status, v) = send_json(&s.router, corrupt.request("/api/transcribe")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "bad_input");
}

#[tokio::test]
async fn the_stream_sends_segments_then_done() {
    let s = with_worker().await;
    let form = Form::new()
        .file("rec.webm", "audio/webm;codecs=opus", b"webm")
        .text("task", "translate")
        .text("language", "fr");
    let (status, content_type, body) = send(&s.router, form.request("/api/transcribe")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let events = sse(&body);
    let names = event_names(&events);
    assert_eq!(names, ["segment", "segment", "done"], "{body}");
    assert_eq!(events[0].1, serde_json::json!({ "id": 0, "start": 0.0, "end": 1.5, "text": " Hello there." }));
    assert_eq!(events[1].1["text"], " translate audio/webm 4 bytes");
    let done = &events[2].1;
    assert_eq!(done["task"], "translate");
    assert_eq!(done["language"], "fr", "the hint names the spoken language, so translations keep it");
    assert_eq!(done["model"], ASR_MODEL);
    assert_eq!(done["segments"].as_array().unwrap().len(), 2);
    assert_eq!(done["metrics"]["audio_seconds"], 3.2);
    assert_eq!(done["metrics"]["wall_ms"], 800.0);
    assert!((done["metrics"]["real_time_factor"].as_f64().unwrap() - 0.25).abs() < 1e-9);
}

#[tokio::test]
async fn a_retried_attempt_restarts_the_stream() {
    let s = with_worker().await;
    let form = Form::new().file("rec.ogg", "audio/ogg", b"retry");
    let (status, _, body) = send(&s.router, form.request("/api/transcribe")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = sse(&body);
    let names = event_names(&events);
    assert_eq!(names, ["segment", "restart", "segment", "segment", "done"], "{body}");
    assert_eq!(events[1].1, serde_json::json!({ "attempt": 2 }));
    assert_eq!(events[2].1["id"], 0, "numbering starts again");
    // The non-streaming answer holds only the new attempt's text.
    let form = Form::new().file("rec.ogg", "audio/ogg", b"retry");
    let (_, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert!(!v["text"].as_str().unwrap().contains("dead attempt"), "{v}");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_job() {
    let mut s = with_worker().await;
    let form = Form::new().file("rec.ogg", "audio/ogg", b"slow");
    let response = s.router.clone().oneshot(form.request("/api/transcribe")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let first = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(first.contains("first words"), "{first}");
    drop(body);
    let cancelled = tokio::time::timeout(Duration::from_secs(10), s.cancelled.recv()).await;
    assert!(cancelled.unwrap().is_some(), "the worker was told to stop");
}

#[tokio::test]
async fn a_job_past_its_time_is_504_and_cancelled() {
    let mut s = setup(true, 1 << 20, Duration::from_secs(1)).await;
    let form = Form::new().file("rec.ogg", "audio/ogg", b"slow");
    let (status, v) = send_json(&s.router, form.request("/v1/audio/transcriptions")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(v["error"]["code"], "timeout");
    let cancelled = tokio::time::timeout(Duration::from_secs(10), s.cancelled.recv()).await;
    assert!(cancelled.unwrap().is_some(), "the worker was told to stop");
    // The stream reports it as an error event once it has started.
    let form = Form::new().file("rec.ogg", "audio/ogg", b"slow");
    let (status, _, body) = send(&s.router, form.request("/api/transcribe")).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse(&body);
    assert_eq!(events.last().unwrap().0, "error", "{body}");
    assert_eq!(events.last().unwrap().1["code"], "timeout");
    assert!(events.last().unwrap().1["message"].as_str().unwrap().contains("did not finish in time"));
}

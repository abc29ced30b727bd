//! OCR: `POST /api/ocr` answers with the whole reading as JSON, and
//! `POST /api/ocr/stream` streams each recognised line as a Server-Sent Event
//! while the worker reads the rest, so the dashboard draws boxes as they come.
//!
//! Both take multipart/form-data with the image in `image` (or `file`, as the
//! speech endpoints name it) and an optional `model` (omitted or `default`: the
//! fleet's default OCR model). The upload is read whole, up to the configured
//! limit, and handed to the worker as a blob; the worker decodes the image, so
//! a corrupt, empty or non-image file comes back as its `bad_input` failure
//! (400, with the worker's message), as with audio.
//!
//! Boxes are four corners, clockwise from the top left, in pixels of the image
//! as the worker saw it after applying its EXIF orientation; `width` and
//! `height` give that space, so a viewer scales boxes from it to what it shows.

use super::auth::Caller;
use super::error::ApiError;
use super::followed::{self, Running};
use super::openai::{resolve_model, CancelOnDrop};
use super::sse::{error_event, json_event};
use super::upload::{declared_type, extension, form_error, read_file};
use super::AppState;
use crate::client::OcrUpdate;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures::{Stream, StreamExt};
use natter_shared::proto::{Job, JobInput, JobKind, Metrics, OcrInput, OcrLine, OcrTimings, Origin};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;
use uuid::Uuid;

/// `POST /api/ocr`: the image's text, lines, boxes and timings in one answer.
pub async fn ocr(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let form = read_form(form, state.max_upload).await?;
    let mut job = submit(&state, &caller, form).await?;
    let outcome = tokio::time::timeout_at(job.deadline, async {
        while let Some(update) = job.updates.next().await {
            match update {
                OcrUpdate::Done { text, lines, width, height, timings, metrics } => {
                    return Ok(Reading { text, lines, width, height, timings, metrics })
                }
                OcrUpdate::Failed { code, message } => return Err(ApiError::from_job(code, message)),
                OcrUpdate::Cancelled => return Err(ApiError::cancelled()),
                OcrUpdate::Accepted { .. } | OcrUpdate::Line(_) | OcrUpdate::Restart { .. } => {}
            }
        }
        Err(ApiError::unavailable("lost the job's event stream"))
    })
    .await
    .map_err(|_| ApiError::timeout())?;
    // A job that ended needs no cancel; one whose events were lost may still run.
    job.guard.armed = matches!(outcome, Err(ApiError { code: "unavailable", .. }));
    Ok(Json(outcome?.json(job.id, &job.model)))
}

/// `POST /api/ocr/stream`: `line` events as the worker reads them, a `restart`
/// when a retried attempt replaces the lines so far, then one `done` (the
/// whole reading, as `/api/ocr` answers it) or `error`. The stream starts once
/// the worker produced a line or ended, so a job that fails at once (a corrupt
/// image) gets a real HTTP error, like `/api/transcribe`.
pub async fn ocr_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = read_form(form, state.max_upload).await?;
    let mut job = submit(&state, &caller, form).await?;
    let first = followed::first_shown(&mut job, |update| match update {
        OcrUpdate::Failed { code, message } => Err(ApiError::from_job(code, message)),
        OcrUpdate::Cancelled => Err(ApiError::cancelled()),
        update => Ok(update),
    })
    .await?;
    let events = sse_events(first, job);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// The form fields natter uses; the rest are read past.
struct ImageForm {
    image: Vec<u8>,
    content_type: String,
    model: Option<String>,
}

const FORM_HINT: &str = "send the image as multipart/form-data with the file in `image`";

async fn read_form(form: Result<Multipart, MultipartRejection>, max_upload: usize) -> Result<ImageForm, ApiError> {
    let mut form = form.map_err(|e| ApiError::bad_request(format!("{}; {FORM_HINT}", e.body_text())))?;
    let (mut file, mut model) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(|e| form_error(e, max_upload))? {
        match field.name().unwrap_or_default() {
            "image" | "file" => {
                let content_type = image_content_type(field.content_type(), field.file_name());
                file = Some((read_file(&mut field, max_upload).await?, content_type));
            }
            "model" => model = Some(field.text().await.map_err(|e| form_error(e, max_upload))?),
            _ => {}
        }
    }
    let Some((image, content_type)) = file else {
        return Err(ApiError::bad_request(format!("the form has no `image` field; {FORM_HINT}")));
    };
    if image.is_empty() {
        return Err(ApiError::bad_request("the uploaded image is empty"));
    }
    Ok(ImageForm { image, content_type, model })
}

/// The content type the worker is told: the part's own when it names an image
/// type, else one guessed from the file name. The worker sniffs the format
/// anyway; this only makes the blob self-describing.
fn image_content_type(declared: Option<&str>, file_name: Option<&str>) -> String {
    if let Some(c) = declared_type(declared).filter(|c| c.starts_with("image/")) {
        return c;
    }
    match extension(file_name).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg" | "jfif") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        _ => "application/octet-stream",
    }
    .into()
}

async fn submit(state: &AppState, caller: &Caller, form: ImageForm) -> Result<Running<OcrUpdate>, ApiError> {
    let model = resolve_model(state, form.model.as_deref(), JobKind::Ocr).await?;
    let image = state.jobs.put_blob(form.image, &form.content_type).await?;
    let origin = Origin { frontend: "http".into(), user: caller.user(None), conversation: None };
    let mut job = Job::new(model.clone(), origin, JobInput::Ocr(OcrInput { image }));
    job.deadline = Some(job.created_at + state.job_timeout);
    let updates = Box::pin(state.jobs.ocr_updates(job.id).await?);
    state.jobs.submit(&job).await?;
    Ok(Running {
        id: job.id,
        model,
        updates,
        guard: CancelOnDrop { jobs: state.jobs.clone(), id: job.id, armed: true },
        deadline: tokio::time::Instant::now() + state.job_timeout,
    })
}

/// A finished job's reading of the image.
struct Reading {
    text: String,
    lines: Vec<OcrLine>,
    width: u32,
    height: u32,
    timings: OcrTimings,
    metrics: Metrics,
}

impl Reading {
    /// The answer of `/api/ocr` and the `done` event of `/api/ocr/stream`.
    fn json(&self, id: Uuid, model: &str) -> Value {
        json!({
            "id": id,
            "model": model,
            "text": self.text,
            "lines": self.lines.iter().enumerate().map(|(i, l)| line_json(i, l)).collect::<Vec<_>>(),
            "width": self.width,
            "height": self.height,
            "timings": self.timings,
            "metrics": self.metrics,
        })
    }
}

/// One line, numbered in reading order. The worker's `f32`s widen to JSON's
/// doubles with float noise (0.97 becomes 0.9700000286102295), so they are
/// rounded to what they mean: confidence to 1e-4, corners to 1/100 pixel.
fn line_json(id: usize, line: &OcrLine) -> Value {
    let round = |v: f32, scale: f64| (f64::from(v) * scale).round() / scale;
    let bbox: Vec<[f64; 2]> = line.bbox.iter().map(|[x, y]| [round(*x, 100.0), round(*y, 100.0)]).collect();
    json!({ "id": id, "text": line.text, "confidence": round(line.confidence, 10_000.0), "bbox": bbox })
}

/// The stream after its first update: `line` events, a `restart` when a
/// retried attempt replaces the lines so far, then one `done` or `error`.
fn sse_events(first: OcrUpdate, job: Running<OcrUpdate>) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    // Lines sent in this attempt, numbering the next one.
    let mut sent = 0;
    followed::sse_events(first, job, move |update, id, model| match update {
        OcrUpdate::Line(line) => {
            sent += 1;
            Some(json_event("line", line_json(sent - 1, &line)))
        }
        OcrUpdate::Restart { attempt } => {
            sent = 0;
            Some(json_event("restart", json!({ "attempt": attempt })))
        }
        OcrUpdate::Done { text, lines, width, height, timings, metrics } => {
            let reading = Reading { text, lines, width, height, timings, metrics };
            Some(json_event("done", reading.json(id, model)))
        }
        OcrUpdate::Failed { code, message } => Some(error_event(&ApiError::from_job(code, message))),
        OcrUpdate::Cancelled => Some(error_event(&ApiError::cancelled())),
        OcrUpdate::Accepted { .. } => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_comes_from_the_part_or_the_file_name() {
        assert_eq!(image_content_type(Some("image/png"), Some("x.bin")), "image/png");
        assert_eq!(image_content_type(Some("IMAGE/JPEG; q=1"), None), "image/jpeg");
        assert_eq!(image_content_type(Some("application/octet-stream"), Some("scan.JPG")), "image/jpeg");
        assert_eq!(image_content_type(None, Some("page.tiff")), "image/tiff");
        assert_eq!(image_content_type(None, Some("notes.txt")), "application/octet-stream");
        assert_eq!(image_content_type(None, None), "application/octet-stream");
    }

    #[test]
    fn a_reading_has_numbered_lines_rounded_boxes_and_its_timings() {
        let line = |text: &str, y: f32| OcrLine {
            text: text.into(),
            confidence: 0.97,
            bbox: [[10.0, y], [120.333_336, y], [120.333_336, y + 20.0], [10.0, y + 20.0]],
        };
        let reading = Reading {
            text: "Invoice 42\nTotal 9.50".into(),
            lines: vec![line("Invoice 42", 5.0), line("Total 9.50", 40.0)],
            width: 640,
            height: 480,
            timings: OcrTimings { decode_ms: 1.5, detect_ms: 20.0, classify_ms: 2.0, recognize_ms: 30.0 },
            metrics: Metrics { wall_ms: 55.0, ..Metrics::default() },
        };
        let v = reading.json(Uuid::nil(), "ppocr-v5");
        assert_eq!(v["model"], "ppocr-v5");
        assert_eq!(v["text"], "Invoice 42\nTotal 9.50");
        assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(640), Some(480)));
        assert_eq!(v["lines"].as_array().unwrap().len(), 2);
        assert_eq!(
            v["lines"][1],
            json!({ "id": 1, "text": "Total 9.50", "confidence": 0.97,
                    "bbox": [[10.0, 40.0], [120.33, 40.0], [120.33, 60.0], [10.0, 60.0]] })
        );
        assert_eq!(
            v["timings"],
            json!({ "decode_ms": 1.5, "detect_ms": 20.0, "classify_ms": 2.0, "recognize_ms": 30.0 })
        );
        assert_eq!(v["metrics"]["wall_ms"], 55.0);
    }
}

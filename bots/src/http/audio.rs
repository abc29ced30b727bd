//! Speech to text: OpenAI's `POST /v1/audio/transcriptions` and
//! `POST /v1/audio/translations`, and `POST /api/transcribe`, which streams the
//! segments to the dashboard as Server-Sent Events while the worker decodes them.
//!
//! All three take the same multipart form as OpenAI's API (`file`, `model`,
//! `language`, `response_format`; `prompt`, `temperature` and any other field
//! are accepted and ignored); `/api/transcribe` adds `task`, and keeps the
//! language hint for translations too, as it names the spoken language. The upload is read whole, up to the configured
//! limit, and handed to the worker as a blob; the worker decodes the audio, so
//! a corrupt file comes back as its `bad_input` failure (400).

use super::auth::Caller;
use super::error::ApiError;
use super::followed::{self, Running};
use super::openai::{resolve_model, CancelOnDrop};
use super::sse::{error_event, json_event};
use super::upload::{declared_type, extension, form_error, read_file};
use super::AppState;
use crate::client::AsrUpdate;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures::{Stream, StreamExt};
use natter_shared::proto::{AsrInput, AsrTask, Job, JobInput, JobKind, Metrics, Origin, Segment};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;
use uuid::Uuid;

/// The model name OpenAI's clients send; it means the fleet's default speech model.
pub const OPENAI_MODEL_ALIAS: &str = "whisper-1";

/// `POST /v1/audio/transcriptions`.
pub async fn transcriptions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    openai_audio(state, caller, form, AsrTask::Transcribe).await
}

/// `POST /v1/audio/translations`: speech in any language to English text.
pub async fn translations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    openai_audio(state, caller, form, AsrTask::Translate).await
}

async fn openai_audio(
    state: AppState,
    caller: Caller,
    form: Result<Multipart, MultipartRejection>,
    task: AsrTask,
) -> Result<Response, ApiError> {
    let mut form = read_form(form, state.max_upload).await?;
    let format = ResponseFormat::parse(form.response_format.as_deref())?;
    // OpenAI's translations take no language; a stray one is ignored as there.
    if task == AsrTask::Translate {
        form.language = None;
    }
    let mut job = submit(&state, &caller, form, task).await?;
    let outcome = tokio::time::timeout_at(job.deadline, async {
        while let Some(update) = job.updates.next().await {
            match update {
                AsrUpdate::Done { text, language, segments, metrics } => {
                    return Ok(Transcript { task, text, language, segments, metrics })
                }
                AsrUpdate::Failed { code, message } => return Err(ApiError::from_job(code, message)),
                AsrUpdate::Cancelled => return Err(ApiError::cancelled()),
                AsrUpdate::Accepted { .. } | AsrUpdate::Segment(_) | AsrUpdate::Restart { .. } => {}
            }
        }
        Err(ApiError::unavailable("lost the job's event stream"))
    })
    .await
    .map_err(|_| ApiError::timeout())?;
    // A job that ended needs no cancel; one whose events were lost may still run.
    job.guard.armed = matches!(outcome, Err(ApiError { code: "unavailable", .. }));
    Ok(format.render(&outcome?))
}

/// `POST /api/transcribe`: the dashboard's streaming transcription. The stream
/// starts once the worker produced a segment or ended, so a job that fails at
/// once (corrupt audio) gets a real HTTP error, like `/v1/chat/completions`.
pub async fn transcribe_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = read_form(form, state.max_upload).await?;
    let task = match form.task.as_deref().map(str::trim) {
        None | Some("" | "transcribe") => AsrTask::Transcribe,
        Some("translate") => AsrTask::Translate,
        Some(other) => {
            return Err(ApiError::bad_request(format!("task `{other}` is unknown; use `transcribe` or `translate`")))
        }
    };
    let mut job = submit(&state, &caller, form, task).await?;
    let first = followed::first_shown(&mut job, |update| match update {
        AsrUpdate::Failed { code, message } => Err(ApiError::from_job(code, message)),
        AsrUpdate::Cancelled => Err(ApiError::cancelled()),
        update => Ok(update),
    })
    .await?;
    let events = sse_events(first, job, task);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// The form fields natter uses; the rest are read past.
struct AudioForm {
    audio: Vec<u8>,
    content_type: String,
    model: Option<String>,
    language: Option<String>,
    response_format: Option<String>,
    task: Option<String>,
}

async fn read_form(form: Result<Multipart, MultipartRejection>, max_upload: usize) -> Result<AudioForm, ApiError> {
    let mut form = form.map_err(|e| {
        ApiError::bad_request(format!(
            "{}; send the audio as multipart/form-data with the file in `file`",
            e.body_text()
        ))
    })?;
    let bad_form = |e| form_error(e, max_upload);
    let mut file = None;
    let (mut model, mut language, mut response_format, mut task) = (None, None, None, None);
    while let Some(mut field) = form.next_field().await.map_err(bad_form)? {
        let slot = match field.name().unwrap_or_default() {
            "file" => {
                let content_type = audio_content_type(field.content_type(), field.file_name());
                file = Some((read_file(&mut field, max_upload).await?, content_type));
                continue;
            }
            "model" => &mut model,
            "language" => &mut language,
            "response_format" => &mut response_format,
            "task" => &mut task,
            _ => continue,
        };
        *slot = Some(field.text().await.map_err(bad_form)?);
    }
    let Some((audio, content_type)) = file else {
        return Err(ApiError::bad_request(
            "the form has no `file` field; send the audio as multipart/form-data with the file in `file`",
        ));
    };
    if audio.is_empty() {
        return Err(ApiError::bad_request("the uploaded file is empty"));
    }
    Ok(AudioForm { audio, content_type, model, language, response_format, task })
}

/// The content type the worker is told: the part's own when it names an audio
/// or video type, else one guessed from the file name, since many clients send
/// every file as `application/octet-stream`.
fn audio_content_type(declared: Option<&str>, file_name: Option<&str>) -> String {
    if let Some(c) = declared_type(declared).filter(|c| c.starts_with("audio/") || c.starts_with("video/")) {
        return c;
    }
    match extension(file_name).as_deref() {
        Some("mp3" | "mpga" | "mpeg") => "audio/mpeg",
        Some("wav") => "audio/wav",
        Some("ogg" | "oga" | "opus") => "audio/ogg",
        Some("webm") => "audio/webm",
        Some("m4a" | "mp4") => "audio/mp4",
        Some("flac") => "audio/flac",
        Some("aac") => "audio/aac",
        _ => "application/octet-stream",
    }
    .into()
}

/// The language hint: an ISO-639 code (`en`, `haw`), or none for detection.
fn language_hint(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(code) = raw.map(|l| l.trim().to_ascii_lowercase()).filter(|l| !l.is_empty() && l != "auto") else {
        return Ok(None);
    };
    if (2..=3).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(Some(code))
    } else {
        Err(ApiError::bad_request(format!(
            "language `{code}` is not an ISO-639-1 code such as `en`; leave it out to detect"
        )))
    }
}

async fn submit(
    state: &AppState,
    caller: &Caller,
    form: AudioForm,
    task: AsrTask,
) -> Result<Running<AsrUpdate>, ApiError> {
    // The hint names the spoken language, so it helps translation as well.
    let language = language_hint(form.language.as_deref())?;
    let requested = form.model.as_deref().map(str::trim).filter(|m| *m != OPENAI_MODEL_ALIAS);
    let model = resolve_model(state, requested, JobKind::Asr).await?;
    let audio = state.jobs.put_blob(form.audio, &form.content_type).await?;
    let origin = Origin { frontend: "http".into(), user: caller.user(None), conversation: None };
    let mut job = Job::new(model.clone(), origin, JobInput::Asr(AsrInput { audio, language, task }));
    job.deadline = Some(job.created_at + state.job_timeout);
    let updates = Box::pin(state.jobs.asr_updates(job.id).await?);
    state.jobs.submit(&job).await?;
    Ok(Running {
        id: job.id,
        model,
        updates,
        guard: CancelOnDrop { jobs: state.jobs.clone(), id: job.id, armed: true },
        deadline: tokio::time::Instant::now() + state.job_timeout,
    })
}

/// A finished job's transcript.
struct Transcript {
    task: AsrTask,
    text: String,
    language: Option<String>,
    segments: Vec<Segment>,
    metrics: Metrics,
}

impl Transcript {
    /// Seconds of audio: as the worker measured it, else where speech ended.
    fn duration(&self) -> f64 {
        self.metrics.audio_seconds.or_else(|| self.segments.last().map(|s| s.end)).unwrap_or(0.0)
    }

    fn verbose_json(&self) -> Value {
        json!({
            "task": task_name(self.task),
            "language": self.language,
            "duration": self.duration(),
            "text": self.text,
            "segments": segments_json(&self.segments),
        })
    }
}

fn task_name(task: AsrTask) -> &'static str {
    match task {
        AsrTask::Transcribe => "transcribe",
        AsrTask::Translate => "translate",
    }
}

fn segment_json(id: usize, s: &Segment) -> Value {
    json!({ "id": id, "start": s.start, "end": s.end, "text": s.text })
}

fn segments_json(segments: &[Segment]) -> Vec<Value> {
    segments.iter().enumerate().map(|(i, s)| segment_json(i, s)).collect()
}

/// OpenAI's `response_format`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ResponseFormat {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl ResponseFormat {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        Ok(match raw.map(str::trim).unwrap_or("") {
            "" | "json" => ResponseFormat::Json,
            "text" => ResponseFormat::Text,
            "verbose_json" => ResponseFormat::VerboseJson,
            "srt" => ResponseFormat::Srt,
            "vtt" => ResponseFormat::Vtt,
            other => {
                return Err(ApiError::bad_request(format!(
                    "response_format `{other}` is unknown; use json, text, srt, verbose_json or vtt"
                )))
            }
        })
    }

    fn render(self, t: &Transcript) -> Response {
        let plain = |content_type: &'static str, body: String| ([(header::CONTENT_TYPE, content_type)], body);
        match self {
            ResponseFormat::Json => Json(json!({ "text": t.text })).into_response(),
            ResponseFormat::VerboseJson => Json(t.verbose_json()).into_response(),
            ResponseFormat::Text => plain("text/plain; charset=utf-8", format!("{}\n", t.text.trim())).into_response(),
            ResponseFormat::Srt => plain("text/plain; charset=utf-8", srt(&t.segments)).into_response(),
            ResponseFormat::Vtt => plain("text/vtt; charset=utf-8", vtt(&t.segments)).into_response(),
        }
    }
}

/// `hh:mm:ss` then `separator` and milliseconds; SRT uses `,`, WebVTT `.`.
fn timestamp(seconds: f64, separator: char) -> String {
    let ms = if seconds.is_finite() && seconds > 0.0 { (seconds * 1000.0).round() as u64 } else { 0 };
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{separator}{ms:03}")
}

/// A cue's text: a blank line would end the cue early, so blank lines go.
fn cue_text(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
}

fn srt(segments: &[Segment]) -> String {
    let mut out = String::new();
    for (i, s) in segments.iter().enumerate() {
        let (start, end) = (timestamp(s.start, ','), timestamp(s.end, ','));
        out.push_str(&format!("{}\n{start} --> {end}\n{}\n\n", i + 1, cue_text(&s.text)));
    }
    out
}

fn vtt(segments: &[Segment]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for s in segments {
        let (start, end) = (timestamp(s.start, '.'), timestamp(s.end, '.'));
        // `-->` inside a cue's text would be read as timing.
        out.push_str(&format!("{start} --> {end}\n{}\n\n", cue_text(&s.text).replace("-->", "->")));
    }
    out
}

/// The stream after its first update: `segment` events, a `restart` when a
/// retried attempt replaces the segments so far, then one `done` or `error`.
fn sse_events(
    first: AsrUpdate,
    job: Running<AsrUpdate>,
    task: AsrTask,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    // Segments sent in this attempt, numbering the next one.
    let mut sent = 0;
    followed::sse_events(first, job, move |update, id, model| match update {
        AsrUpdate::Segment(segment) => {
            sent += 1;
            Some(json_event("segment", segment_json(sent - 1, &segment)))
        }
        AsrUpdate::Restart { attempt } => {
            sent = 0;
            Some(json_event("restart", json!({ "attempt": attempt })))
        }
        AsrUpdate::Done { text, language, segments, metrics } => {
            let t = Transcript { task, text, language, segments, metrics };
            Some(json_event("done", done_json(&t, id, model)))
        }
        AsrUpdate::Failed { code, message } => Some(error_event(&ApiError::from_job(code, message))),
        AsrUpdate::Cancelled => Some(error_event(&ApiError::cancelled())),
        AsrUpdate::Accepted { .. } => None,
    })
}

/// The `done` event: the transcript and what it cost, with the real-time factor
/// (worker wall time over audio length; below 1 is faster than real time).
fn done_json(t: &Transcript, id: Uuid, model: &str) -> Value {
    let real_time_factor = t.metrics.audio_seconds.filter(|s| *s > 0.0).map(|audio| t.metrics.wall_ms / 1000.0 / audio);
    json!({
        "id": id,
        "model": model,
        "task": task_name(t.task),
        "text": t.text,
        "language": t.language,
        "duration": t.duration(),
        "segments": segments_json(&t.segments),
        "metrics": {
            "audio_seconds": t.metrics.audio_seconds,
            "wall_ms": t.metrics.wall_ms,
            "real_time_factor": real_time_factor,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn seg(start: f64, end: f64, text: &str) -> Segment {
        Segment { start, end, text: text.into() }
    }

    fn transcript() -> Transcript {
        Transcript {
            task: AsrTask::Transcribe,
            text: " Hello there. General Kenobi!".into(),
            language: Some("en".into()),
            segments: vec![seg(0.0, 1.5, " Hello there."), seg(1.5, 3.0, " General Kenobi!")],
            metrics: Metrics { audio_seconds: Some(3.2), wall_ms: 800.0, ..Metrics::default() },
        }
    }

    #[test]
    fn timestamps_round_to_milliseconds_and_carry_into_hours() {
        assert_eq!(timestamp(1.5, ','), "00:00:01,500");
        assert_eq!(timestamp(1.5, '.'), "00:00:01.500");
        assert_eq!(timestamp(3661.0004, ','), "01:01:01,000");
        assert_eq!(timestamp(59.9996, '.'), "00:01:00.000");
        assert_eq!(timestamp(-1.0, ','), "00:00:00,000");
        assert_eq!(timestamp(f64::NAN, ','), "00:00:00,000");
    }

    #[test]
    fn srt_numbers_cues_from_one() {
        assert_eq!(
            srt(&transcript().segments),
            "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 00:00:03,000\nGeneral Kenobi!\n\n"
        );
        assert_eq!(srt(&[]), "");
    }

    #[test]
    fn vtt_has_its_header_and_dotted_milliseconds() {
        assert_eq!(
            vtt(&transcript().segments),
            "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n00:00:01.500 --> 00:00:03.000\nGeneral Kenobi!\n\n"
        );
        assert_eq!(vtt(&[]), "WEBVTT\n\n");
    }

    #[test]
    fn cue_text_cannot_end_a_cue_or_fake_a_timing_line() {
        let odd = [seg(0.0, 1.0, "one\n\n two \n"), seg(1.0, 2.0, "a --> b")];
        assert_eq!(srt(&odd[..1]), "1\n00:00:00,000 --> 00:00:01,000\none\ntwo\n\n");
        assert!(vtt(&odd).ends_with("00:00:01.000 --> 00:00:02.000\na -> b\n\n"));
    }

    #[test]
    fn verbose_json_has_openais_shape() {
        let v = transcript().verbose_json();
        assert_eq!(v["task"], "transcribe");
        assert_eq!(v["language"], "en");
        assert_eq!(v["duration"], 3.2);
        assert_eq!(v["text"], " Hello there. General Kenobi!");
        assert_eq!(v["segments"][1], json!({ "id": 1, "start": 1.5, "end": 3.0, "text": " General Kenobi!" }));
    }

    #[test]
    fn duration_falls_back_to_the_last_segment() {
        let mut t = transcript();
        t.metrics.audio_seconds = None;
        assert_eq!(t.duration(), 3.0);
    }

    #[test]
    fn done_event_reports_the_real_time_factor() {
        let v = done_json(&transcript(), Uuid::nil(), "whisper-tiny");
        assert_eq!(v["metrics"]["audio_seconds"], 3.2);
        assert_eq!(v["metrics"]["wall_ms"], 800.0);
        assert!((v["metrics"]["real_time_factor"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        assert_eq!(v["segments"].as_array().unwrap().len(), 2);
        let mut no_audio = transcript();
        no_audio.metrics.audio_seconds = None;
        assert!(done_json(&no_audio, Uuid::nil(), "m")["metrics"]["real_time_factor"].is_null());
    }

    #[test]
    fn response_formats_parse_and_unknown_ones_are_refused() {
        assert_eq!(ResponseFormat::parse(None).unwrap(), ResponseFormat::Json);
        assert_eq!(ResponseFormat::parse(Some("verbose_json")).unwrap(), ResponseFormat::VerboseJson);
        assert_eq!(ResponseFormat::parse(Some(" vtt ")).unwrap(), ResponseFormat::Vtt);
        assert_eq!(ResponseFormat::parse(Some("xml")).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn language_hints_are_iso_codes_or_auto() {
        assert_eq!(language_hint(Some(" EN ")).unwrap().as_deref(), Some("en"));
        assert_eq!(language_hint(Some("haw")).unwrap().as_deref(), Some("haw"));
        assert_eq!(language_hint(Some("auto")).unwrap(), None);
        assert_eq!(language_hint(Some("")).unwrap(), None);
        assert!(language_hint(Some("english")).is_err());
        assert!(language_hint(Some("e1")).is_err());
    }

    #[test]
    fn content_type_comes_from_the_part_or_the_file_name() {
        assert_eq!(audio_content_type(Some("audio/webm;codecs=opus"), Some("x.bin")), "audio/webm");
        assert_eq!(audio_content_type(Some("application/octet-stream"), Some("voice.OGG")), "audio/ogg");
        assert_eq!(audio_content_type(None, Some("talk.m4a")), "audio/mp4");
        assert_eq!(audio_content_type(None, None), "application/octet-stream");
    }
}

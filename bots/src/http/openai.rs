//! The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`
//! (streaming and not), backed by chat jobs.

use super::auth::Caller;
use super::error::ApiError;
use super::AppState;
use crate::client::{AppendOnly, ChatUpdate, JobClient};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures::{Stream, StreamExt};
use natter_shared::proto::{
    ChatInput, ChatMessage, FinishReason, Job, JobInput, JobKind, Metrics, Origin, Role, SamplingParams,
};
use serde::Deserialize;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;
use uuid::Uuid;

pub async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let workers = state.fleet.workers().await;
    let mut data = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for w in &workers {
        for m in &w.models {
            if seen.insert(m.clone()) {
                let entry = state.catalog.get(m);
                let kind = entry.map(|e| e.kind.as_str()).unwrap_or("chat");
                data.push(serde_json::json!({
                    "id": m, "object": "model", "created": 0, "owned_by": "natter",
                    "kind": kind,
                    // What a request naming no model gets (per kind), so pickers can preselect it.
                    "default": entry.and_then(|e| state.catalog.default_for(e.kind)).is_some_and(|d| d.id == *m),
                    "workers": workers.iter().filter(|x| x.models.contains(m)).count(),
                }));
            }
        }
    }
    Json(serde_json::json!({ "object": "list", "data": data }))
}

/// The request body; fields natter does not use (n, logprobs, tools) are refused
/// or ignored as OpenAI's own server would treat unknown settings.
#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<RequestMessage>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
    n: Option<u32>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct RequestMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

impl ChatRequest {
    fn into_input(self) -> Result<(Option<String>, ChatInput, bool, Option<String>), ApiError> {
        if self.n.unwrap_or(1) != 1 {
            return Err(ApiError::bad_request("only n = 1 is supported"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => return Err(ApiError::bad_request(format!("messages with role `{other}` are not supported"))),
            };
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::bad_request(format!(
                            "content parts of type `{}` are not supported",
                            p.kind
                        )));
                    }
                    parts.into_iter().map(|p| p.text).collect::<Vec<_>>().join("\n")
                }
            };
            messages.push(ChatMessage { role, content });
        }
        match messages.last() {
            None => return Err(ApiError::bad_request("messages must not be empty")),
            Some(m) if m.role != Role::User => {
                return Err(ApiError::bad_request("the last message must have role `user`"))
            }
            Some(m) if m.content.trim().is_empty() => return Err(ApiError::bad_request("the last message is empty")),
            _ => {}
        }
        let defaults = SamplingParams::default();
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.or(defaults.top_p),
            top_k: self.top_k,
            max_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(defaults.max_tokens),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: defaults.repeat_last_n,
            // Always seeded, so a retried attempt regenerates the text already sent.
            seed: self.seed.unwrap_or_else(rand::random),
            stop: match self.stop {
                None => Vec::new(),
                Some(StopField::One(s)) => vec![s],
                Some(StopField::Many(v)) => v,
            },
        };
        params.validate().map_err(ApiError::bad_request)?;
        Ok((self.model, ChatInput { messages, params }, self.stream, self.user))
    }
}

/// Resolves the requested model against the catalog and the live fleet:
/// 404 when nobody knows it, 503 when it exists but no worker serves it.
pub async fn resolve_model(state: &AppState, requested: Option<&str>, kind: JobKind) -> Result<String, ApiError> {
    let served = state.fleet.models(kind).await;
    let wanted = requested.map(str::trim).filter(|m| !m.is_empty() && *m != "default");
    match wanted {
        None => {
            let default = state.catalog.default_for(kind).map(|m| m.id.clone());
            match default {
                Some(d) if served.contains(&d) => Ok(d),
                _ => served
                    .into_iter()
                    .next()
                    .ok_or_else(|| ApiError::no_worker(default.as_deref().unwrap_or("default"))),
            }
        }
        Some(m) if served.iter().any(|s| s == m) => Ok(m.to_string()),
        Some(m) if state.catalog.get(m).is_some_and(|e| e.kind == kind) => Err(ApiError::no_worker(m)),
        Some(m) => Err(ApiError::unknown_model(m)),
    }
}

/// Cancels the job if dropped before it finished: a client that goes away
/// stops its job on the worker.
pub(super) struct CancelOnDrop {
    pub(super) jobs: JobClient,
    pub(super) id: Uuid,
    pub(super) armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let jobs = self.jobs.clone();
            let id = self.id;
            tracing::info!(job = %id, "client went away: cancelling");
            tokio::spawn(async move {
                let _ = jobs.cancel(id).await;
            });
        }
    }
}

type Updates = Pin<Box<dyn Stream<Item = ChatUpdate> + Send>>;

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (model, input, stream, user) = request.into_input()?;
    let model = resolve_model(&state, model.as_deref(), JobKind::Chat).await?;
    let origin = Origin { frontend: "http".into(), user: caller.user(user), conversation: None };
    let mut job = Job::new(model.clone(), origin, JobInput::Chat(input));
    job.deadline = Some(job.created_at + state.job_timeout);
    let updates: Updates = Box::pin(state.jobs.chat_updates(job.id).await?);
    state.jobs.submit(&job).await?;
    let guard = CancelOnDrop { jobs: state.jobs.clone(), id: job.id, armed: true };
    let timeout = state.job_timeout;
    let completion_id = format!("chatcmpl-{}", job.id);
    let created = job.created_at.unix_timestamp();
    if stream {
        stream_response(updates, guard, completion_id, created, model, timeout).await
    } else {
        collect_response(updates, guard, completion_id, created, model, timeout).await
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(m: &Metrics) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "total_tokens": m.prompt_tokens + m.completion_tokens,
    })
}

async fn collect_response(
    mut updates: Updates,
    mut guard: CancelOnDrop,
    id: String,
    created: i64,
    model: String,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let outcome = tokio::time::timeout(timeout, async {
        while let Some(update) = updates.next().await {
            match update {
                ChatUpdate::Done { text, finish_reason, metrics } => return Ok((text, finish_reason, metrics)),
                ChatUpdate::Failed { code, message } => return Err(ApiError::from_job(code, message)),
                ChatUpdate::Cancelled => return Err(ApiError::cancelled()),
                _ => {}
            }
        }
        Err(ApiError::unavailable("lost the job's event stream"))
    })
    .await
    .map_err(|_| ApiError::timeout())?;
    guard.armed = matches!(outcome, Err(ApiError { code: "unavailable", .. }));
    let (text, finish, metrics) = outcome?;
    Ok(Json(serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "finish_reason": finish_str(finish),
        }],
        "usage": usage(&metrics),
        "natter_metrics": metrics,
    }))
    .into_response())
}

/// Streams SSE chunks. The response starts only once the job produced text or
/// ended, so a job that fails at once (prompt too long) gets a real HTTP error.
async fn stream_response(
    mut updates: Updates,
    guard: CancelOnDrop,
    id: String,
    created: i64,
    model: String,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = Vec::new();
    loop {
        let update = tokio::time::timeout_at(deadline, updates.next()).await.map_err(|_| ApiError::timeout())?;
        match update {
            None => return Err(ApiError::unavailable("lost the job's event stream")),
            Some(ChatUpdate::Failed { code, message }) => {
                let mut guard = guard;
                guard.armed = false;
                return Err(ApiError::from_job(code, message));
            }
            Some(ChatUpdate::Cancelled) => {
                let mut guard = guard;
                guard.armed = false;
                return Err(ApiError::cancelled());
            }
            Some(u @ (ChatUpdate::Delta(_) | ChatUpdate::Done { .. })) => {
                first.push(u);
                break;
            }
            Some(_) => {}
        }
    }
    let chunk = move |delta: serde_json::Value, finish: Option<&str>, extra: Option<&Metrics>| {
        let mut c = serde_json::json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        });
        if let Some(m) = extra {
            c["usage"] = usage(m);
            c["natter_metrics"] = serde_json::to_value(m).unwrap_or_default();
        }
        SseEvent::default().data(c.to_string())
    };
    let events = sse_events(futures::stream::iter(first).chain(updates), guard, chunk, deadline);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

type ChunkFn = dyn Fn(serde_json::Value, Option<&str>, Option<&Metrics>) -> SseEvent + Send + Sync;

fn sse_events(
    updates: impl Stream<Item = ChatUpdate> + Send + 'static,
    guard: CancelOnDrop,
    chunk: impl Fn(serde_json::Value, Option<&str>, Option<&Metrics>) -> SseEvent + Send + Sync + 'static,
    deadline: tokio::time::Instant,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct S {
        updates: Pin<Box<dyn Stream<Item = ChatUpdate> + Send>>,
        guard: CancelOnDrop,
        text: AppendOnly,
        chunk: Box<ChunkFn>,
        role_sent: bool,
        ended: bool,
        deadline: tokio::time::Instant,
    }
    let state = S {
        updates: Box::pin(updates),
        guard,
        text: AppendOnly::default(),
        chunk: Box::new(chunk),
        role_sent: false,
        ended: false,
        deadline,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        loop {
            let next = match tokio::time::timeout_at(s.deadline, s.updates.next()).await {
                Ok(next) => next,
                Err(_) => {
                    s.ended = true;
                    let err = ApiError::timeout();
                    return Some((vec![SseEvent::default().data(err.body().to_string())], s));
                }
            };
            let Some(update) = next else {
                s.ended = true;
                let err = ApiError::unavailable("lost the job's event stream");
                return Some((vec![SseEvent::default().data(err.body().to_string())], s));
            };
            match update {
                ChatUpdate::Delta(d) => {
                    let new = s.text.push(&d);
                    if new.is_empty() {
                        continue;
                    }
                    let delta = if s.role_sent {
                        serde_json::json!({ "content": new })
                    } else {
                        s.role_sent = true;
                        serde_json::json!({ "role": "assistant", "content": new })
                    };
                    return Some((vec![(s.chunk)(delta, None, None)], s));
                }
                ChatUpdate::Restart { .. } => s.text.restart(),
                ChatUpdate::Done { text, finish_reason, metrics } => {
                    s.guard.armed = false;
                    s.ended = true;
                    // Anything of the final text not yet streamed (never normally).
                    let rest = text.strip_prefix(s.text.sent()).unwrap_or("").to_string();
                    let mut out = Vec::new();
                    if !rest.is_empty() {
                        out.push((s.chunk)(serde_json::json!({ "content": rest }), None, None));
                    }
                    out.push((s.chunk)(serde_json::json!({}), Some(finish_str(finish_reason)), Some(&metrics)));
                    out.push(SseEvent::default().data("[DONE]"));
                    return Some((out, s));
                }
                ChatUpdate::Failed { code, message } => {
                    s.guard.armed = false;
                    s.ended = true;
                    let err = ApiError::from_job(code, message);
                    return Some((vec![SseEvent::default().data(err.body().to_string())], s));
                }
                ChatUpdate::Cancelled => {
                    s.guard.armed = false;
                    s.ended = true;
                    return Some((vec![SseEvent::default().data(ApiError::cancelled().body().to_string())], s));
                }
                ChatUpdate::Accepted { .. } => {}
            }
        }
    })
    .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok)))
}

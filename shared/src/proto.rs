//! The wire protocol: jobs submitted by front-ends and the events workers stream back.
//!
//! Every message is JSON carrying `"v": 1`. A message with another version is
//! rejected at parse time rather than half-understood, so a mixed fleet during an
//! upgrade fails loudly instead of silently mangling jobs.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use uuid::Uuid;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Blobs up to this size travel inside the job message; larger ones go through
/// the JetStream object store so NATS' max payload never rejects a user's file.
pub const INLINE_BLOB_LIMIT: usize = 256 * 1024;

/// The `"v"` field: serializes as [`PROTOCOL_VERSION`] and refuses any other value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(PROTOCOL_VERSION)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v == PROTOCOL_VERSION {
            Ok(V1)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported protocol version {v} (this build speaks {PROTOCOL_VERSION})"
            )))
        }
    }
}

/// What a job asks for; each kind has its own subject family and engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Chat,
    Ner,
    Ocr,
    Asr,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [JobKind::Chat, JobKind::Ner, JobKind::Ocr, JobKind::Asr];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Chat => "chat",
            JobKind::Ner => "ner",
            JobKind::Ocr => "ocr",
            JobKind::Asr => "asr",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown job kind `{s}` (expected chat, ner, ocr or asr)"))
    }
}

/// Who submitted a job, so replies and stored history find their way back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `telegram`, `discord`, `http`, `dashboard`, ...
    pub frontend: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
}

/// A unit of work, published once to `natter.job.<kind>.<model>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub v: V1,
    /// UUIDv7, so ids sort by submission time.
    pub id: Uuid,
    /// A catalog id, resolved by the front-end (never `default` on the wire).
    pub model: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// After this instant the answer is useless to the user; workers drop the job.
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub deadline: Option<OffsetDateTime>,
    pub origin: Origin,
    #[serde(flatten)]
    pub input: JobInput,
}

impl Job {
    pub fn new(model: impl Into<String>, origin: Origin, input: JobInput) -> Self {
        Job {
            v: V1,
            id: Uuid::now_v7(),
            model: model.into(),
            created_at: OffsetDateTime::now_utc(),
            deadline: None,
            origin,
            input,
        }
    }

    pub fn kind(&self) -> JobKind {
        self.input.kind()
    }
}

/// The kind-specific payload; `kind` and `input` sit side by side in the JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "input", rename_all = "lowercase")]
pub enum JobInput {
    Chat(ChatInput),
    Ner(NerInput),
    Ocr(OcrInput),
    Asr(AsrInput),
}

impl JobInput {
    pub fn kind(&self) -> JobKind {
        match self {
            JobInput::Chat(_) => JobKind::Chat,
            JobInput::Ner(_) => JobKind::Ner,
            JobInput::Ocr(_) => JobKind::Ocr,
            JobInput::Asr(_) => JobKind::Asr,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatInput {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub params: SamplingParams,
}

/// Sampling parameters. `seed` is always set by the front-end: a redelivered job
/// then regenerates the same prefix, which a client that cannot retract text
/// (an SSE stream already read) skips.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    pub max_tokens: u32,
    /// 1.0 disables the penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_p: Some(0.9),
            top_k: None,
            max_tokens: 512,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Upper bound on `max_tokens` a job may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 32_768;

impl SamplingParams {
    /// Rejects values no sampler can honour, with a message fit for the user.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || !(0.0..=5.0).contains(&self.temperature) {
            return Err(format!("temperature must be between 0 and 5, got {}", self.temperature));
        }
        if let Some(p) = self.top_p {
            if !p.is_finite() || p <= 0.0 || p > 1.0 {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".into());
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_LIMIT {
            return Err(format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {}", self.max_tokens));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 || self.repeat_penalty > 10.0 {
            return Err(format!("repeat_penalty must be in (0, 10], got {}", self.repeat_penalty));
        }
        if self.stop.len() > 16 || self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err("stop takes at most 16 non-empty strings of at most 256 bytes".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NerInput {
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OcrInput {
    pub image: Blob,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AsrTask {
    #[default]
    Transcribe,
    Translate,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsrInput {
    pub audio: Blob,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default)]
    pub task: AsrTask,
}

/// Binary input (an image, a voice note): small ones inline, large ones by
/// reference into the JetStream object store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Blob {
    Inline {
        content_type: String,
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    Stored(BlobRef),
}

/// Where a large blob lives in the object store, and how to check it arrived whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub bucket: String,
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    pub content_type: String,
}

mod base64_bytes {
    use super::*;
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// One message on `natter.events.<job_id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub v: V1,
    pub job_id: Uuid,
    /// JetStream delivery count of the job. A consumer that sees a higher attempt
    /// discards the partial output of the lower one.
    pub attempt: u32,
    /// Per-attempt sequence number, starting at 0.
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Accepted {
        worker: String,
        model: String,
    },
    Token {
        text: String,
        /// The token ids behind `text` (chat jobs): a later attempt, after
        /// this worker died, feeds them back and generates only the rest.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tokens: Vec<u32>,
    },
    Segment {
        segment: Segment,
    },
    /// One recognised OCR line, sent in reading order as soon as it is read.
    /// Lines carry a box and a confidence rather than times, so they are not
    /// `segment`s.
    Line {
        line: OcrLine,
    },
    Progress {
        stage: String,
        done: u64,
        total: Option<u64>,
    },
    Done {
        result: JobResult,
        metrics: Metrics,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
    Cancelled,
}

impl EventBody {
    /// Whether no event can follow this one within the same attempt.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventBody::Done { .. } | EventBody::Failed { .. } | EventBody::Cancelled)
    }
}

/// A timed piece of a transcript, or a recognised text line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context window ran out.
    Length,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobResult {
    Chat {
        text: String,
        finish_reason: FinishReason,
    },
    Ner {
        entities: Vec<Entity>,
    },
    Ocr {
        /// All lines in reading order: lines of one row joined by spaces, a
        /// blank line between paragraphs and between columns.
        text: String,
        lines: Vec<OcrLine>,
        /// Size of the image after its EXIF orientation was applied; the
        /// space the boxes are in.
        width: u32,
        height: u32,
        timings: OcrTimings,
    },
    Asr {
        text: String,
        language: Option<String>,
        segments: Vec<Segment>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub label: String,
    pub score: f32,
    /// Character (not byte) offsets into the submitted text.
    pub start: usize,
    pub end: usize,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OcrLine {
    pub text: String,
    pub confidence: f32,
    /// Four corners in original-image pixels, clockwise from top-left.
    pub bbox: [[f32; 2]; 4],
}

/// Where an OCR job spent its time, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OcrTimings {
    pub decode_ms: f64,
    pub detect_ms: f64,
    pub classify_ms: f64,
    pub recognize_ms: f64,
}

/// What a finished job cost; every field a front-end shows under an answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_s: Option<f64>,
    /// Length of the input audio (speech-to-text); wall time over this is the
    /// real-time factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_seconds: Option<f64>,
    pub wall_ms: f64,
}

/// Why a job failed, in a form front-ends can branch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The job could not be parsed.
    MalformedJob,
    /// The job names a model this worker does not serve.
    UnknownModel,
    /// The input is empty, corrupt or of the wrong shape.
    BadInput,
    /// Sampling parameters out of range.
    InvalidParams,
    /// The prompt does not fit the model's context window.
    PromptTooLong,
    /// The input exceeds a configured size limit.
    TooLarge,
    /// The job's deadline passed before it could run.
    DeadlineExceeded,
    /// Every delivery attempt died (worker crashes); the job was given up.
    RetriesExhausted,
    /// A fault in the engine; details are in the worker's log.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(
        value: &T,
    ) -> serde_json::Value {
        let json = serde_json::to_value(value).unwrap();
        let back: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&back, value);
        json
    }

    fn origin() -> Origin {
        Origin { frontend: "http".into(), user: "u1".into(), conversation: Some("c1".into()) }
    }

    fn blob_inline() -> Blob {
        Blob::Inline { content_type: "image/png".into(), data: vec![0, 1, 2, 255] }
    }

    fn blob_stored() -> Blob {
        Blob::Stored(BlobRef {
            bucket: "NATTER_BLOBS".into(),
            name: "abc".into(),
            size: 5_000_000,
            sha256: "00".repeat(32),
            content_type: "audio/ogg".into(),
        })
    }

    #[test]
    fn every_job_kind_round_trips() {
        let inputs = [
            JobInput::Chat(ChatInput {
                messages: vec![
                    ChatMessage { role: Role::System, content: "be brief".into() },
                    ChatMessage { role: Role::User, content: "hi ✓".into() },
                    ChatMessage { role: Role::Assistant, content: "hello".into() },
                ],
                params: SamplingParams { seed: 42, stop: vec!["\n\n".into()], top_k: Some(40), ..Default::default() },
            }),
            JobInput::Ner(NerInput { text: "Anna lives in Paris".into() }),
            JobInput::Ocr(OcrInput { image: blob_inline() }),
            JobInput::Asr(AsrInput { audio: blob_stored(), language: Some("en".into()), task: AsrTask::Translate }),
        ];
        for input in inputs {
            let kind = input.kind();
            let mut job = Job::new("m1", origin(), input);
            job.deadline = Some(job.created_at + time::Duration::minutes(5));
            let json = roundtrip(&job);
            assert_eq!(json["v"], 1);
            assert_eq!(json["kind"], kind.as_str());
            assert!(json["input"].is_object());
            assert_eq!(job.kind(), kind);
        }
    }

    #[test]
    fn every_event_round_trips() {
        let bodies = vec![
            EventBody::Accepted { worker: "w1".into(), model: "m1".into() },
            EventBody::Token { text: "Hel".into(), tokens: vec![72, 101] },
            EventBody::Segment { segment: Segment { start: 0.0, end: 2.5, text: "hello".into() } },
            EventBody::Line {
                line: OcrLine {
                    text: "Total".into(),
                    confidence: 0.9,
                    bbox: [[1.0, 2.0], [9.0, 2.0], [9.0, 6.0], [1.0, 6.0]],
                },
            },
            EventBody::Progress { stage: "decode".into(), done: 3, total: Some(10) },
            EventBody::Done {
                result: JobResult::Chat { text: "Hello".into(), finish_reason: FinishReason::Stop },
                metrics: Metrics {
                    prompt_tokens: 10,
                    completion_tokens: 2,
                    time_to_first_token_ms: Some(12.5),
                    prompt_tokens_per_s: Some(800.0),
                    decode_tokens_per_s: Some(50.0),
                    audio_seconds: None,
                    wall_ms: 60.0,
                },
            },
            EventBody::Done {
                result: JobResult::Ner {
                    entities: vec![Entity {
                        label: "CITY".into(),
                        score: 0.99,
                        start: 14,
                        end: 19,
                        text: "Paris".into(),
                    }],
                },
                metrics: Metrics::default(),
            },
            EventBody::Done {
                result: JobResult::Ocr {
                    text: "Total".into(),
                    lines: vec![OcrLine {
                        text: "Total".into(),
                        confidence: 0.98,
                        bbox: [[0.0, 0.0], [10.0, 0.0], [10.0, 5.0], [0.0, 5.0]],
                    }],
                    width: 20,
                    height: 10,
                    timings: OcrTimings { decode_ms: 1.0, detect_ms: 20.0, classify_ms: 2.0, recognize_ms: 30.0 },
                },
                metrics: Metrics::default(),
            },
            EventBody::Done {
                result: JobResult::Asr {
                    text: "hi".into(),
                    language: Some("en".into()),
                    segments: vec![Segment { start: 0.0, end: 1.0, text: "hi".into() }],
                },
                metrics: Metrics::default(),
            },
            EventBody::Failed { code: ErrorCode::PromptTooLong, message: "too long".into() },
            EventBody::Cancelled,
        ];
        for (seq, body) in bodies.into_iter().enumerate() {
            let event = Event { v: V1, job_id: Uuid::now_v7(), attempt: 2, seq: seq as u64, body };
            let json = roundtrip(&event);
            assert_eq!(json["v"], 1);
            assert!(json["type"].is_string());
        }
    }

    #[test]
    fn blobs_round_trip_as_base64_or_reference() {
        let json = roundtrip(&blob_inline());
        assert_eq!(json["data"], "AAEC/w==");
        let json = roundtrip(&blob_stored());
        assert_eq!(json["type"], "stored");
        assert_eq!(json["size"], 5_000_000);
    }

    #[test]
    fn other_protocol_versions_are_refused() {
        let job = Job::new("m", origin(), JobInput::Ner(NerInput { text: "x".into() }));
        let mut json = serde_json::to_value(&job).unwrap();
        json["v"] = 2.into();
        let err = serde_json::from_value::<Job>(json).unwrap_err().to_string();
        assert!(err.contains("unsupported protocol version 2"), "{err}");
    }

    #[test]
    fn sampling_params_are_validated() {
        assert!(SamplingParams::default().validate().is_ok());
        let bad = [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f64::NAN, ..Default::default() },
            SamplingParams { top_p: Some(0.0), ..Default::default() },
            SamplingParams { top_k: Some(0), ..Default::default() },
            SamplingParams { max_tokens: 0, ..Default::default() },
            SamplingParams { repeat_penalty: 0.0, ..Default::default() },
            SamplingParams { stop: vec![String::new()], ..Default::default() },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?} should be rejected");
        }
    }

    #[test]
    fn missing_params_take_defaults() {
        let json = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        let input: ChatInput = serde_json::from_value(json).unwrap();
        assert_eq!(input.params, SamplingParams::default());
    }
}

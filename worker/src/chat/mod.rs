//! The chat engine: a GGUF model on candle, its tokenizer and chat template from
//! the GGUF metadata, sampling, stop handling and streaming.

pub mod model;
mod template;
mod text;
pub mod tokenizer;

use crate::engine::{Completed, Engine, EngineError, JobContext};
use candle_core::Device;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use model::Model;
use natter_shared::proto::{
    ChatInput, ChatMessage, ErrorCode, EventBody, FinishReason, Job, JobInput, JobResult, Metrics, Role, SamplingParams,
};
use std::path::Path;
use std::time::Instant;
use template::ChatTemplate;
use text::{Detokenizer, StopMatcher, StopScan};
use tokenizer::GgufTokenizer;

/// Prompts are fed in chunks of this many tokens, so a long prompt can be
/// cancelled between chunks and never builds one huge attention mask.
const PROMPT_CHUNK: usize = 512;

pub struct ChatEngine {
    model: Model,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    /// Prompt + answer tokens a job may use.
    window: usize,
    device: Device,
    /// Benchmarks generate a fixed number of tokens whatever the model says.
    ignore_eos: bool,
}

/// The prompt after fitting it into the window.
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Oldest turns left out to make it fit.
    pub dropped_messages: usize,
}

impl ChatEngine {
    /// Loads `path` (converting slow quant types once, cached beside it).
    /// `max_context` caps the window below the model's trained length.
    pub fn load(path: &Path, max_context: usize) -> Result<Self, String> {
        let fast = model::fast_gguf(path).map_err(|e| e.to_string())?;
        let device = Device::Cpu;
        let (model, content) = model::load(&fast, &device).map_err(|e| e.to_string())?;
        let tokenizer = GgufTokenizer::from_gguf(&content)?;
        let source = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        let special = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
        };
        let template =
            ChatTemplate::new(source, special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id"))?;
        let trained = model::context_length(&content).unwrap_or(2048);
        Ok(ChatEngine {
            model,
            tokenizer,
            template,
            window: trained.min(max_context).max(16),
            device,
            ignore_eos: false,
        })
    }

    pub fn set_ignore_eos(&mut self, ignore: bool) {
        self.ignore_eos = ignore;
    }

    /// Renders and tokenizes the conversation, dropping the oldest turns (never the
    /// system prompt, never the last message) until prompt plus a reserve for the
    /// answer fits the window.
    pub fn build_prompt(&self, messages: &[ChatMessage], max_tokens: u32) -> Result<Prompt, EngineError> {
        let reserve = (max_tokens as usize).min(self.window / 4).max(1);
        let (system, mut turns): (Vec<&ChatMessage>, Vec<&ChatMessage>) =
            messages.iter().partition(|m| m.role == Role::System);
        let mut dropped = 0;
        loop {
            let convo: Vec<ChatMessage> = system.iter().chain(turns.iter()).map(|m| (*m).clone()).collect();
            let text = self.template.render(&convo).map_err(EngineError::bad_input)?;
            let tokens = self.tokenizer.encode_prompt(&text).map_err(EngineError::bad_input)?;
            if tokens.len() + reserve <= self.window {
                return Ok(Prompt { tokens, dropped_messages: dropped });
            }
            if turns.len() <= 1 {
                return Err(EngineError::Failed {
                    code: ErrorCode::PromptTooLong,
                    message: format!(
                        "the prompt is {} tokens but this model's context window is {} tokens, {} of them kept for the answer; shorten the message or the system prompt",
                        tokens.len(),
                        self.window,
                        reserve
                    ),
                });
            }
            // Drop the oldest turn, and an assistant reply left leading after it,
            // so the conversation still opens with the user.
            turns.remove(0);
            dropped += 1;
            while turns.len() > 1 && turns[0].role == Role::Assistant {
                turns.remove(0);
                dropped += 1;
            }
        }
    }

    /// Generates an answer for `input`, streaming deltas through `on_text`.
    /// Shared by the job engine and the benchmark.
    pub fn generate(
        &mut self,
        input: &ChatInput,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completed, EngineError> {
        let params = &input.params;
        params.validate().map_err(|message| EngineError::Failed { code: ErrorCode::InvalidParams, message })?;
        validate_messages(&input.messages)?;
        let started = Instant::now();
        let prompt = self.build_prompt(&input.messages, params.max_tokens)?;
        if prompt.dropped_messages > 0 {
            tracing::debug!(dropped = prompt.dropped_messages, "trimmed the oldest turns to fit the context window");
        }
        let prompt_len = prompt.tokens.len();
        let budget = (params.max_tokens as usize).min(self.window - prompt_len);
        let internal = |e: candle_core::Error| {
            tracing::error!("chat model error: {e}");
            EngineError::Failed { code: ErrorCode::Internal, message: "the model failed while running this job".into() }
        };

        let mut logits = None;
        for (i, chunk) in prompt.tokens.chunks(PROMPT_CHUNK).enumerate() {
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            logits = Some(self.model.forward(chunk, i * PROMPT_CHUNK, &self.device).map_err(internal)?);
        }
        let mut logits = logits.expect("prompt is never empty");
        let prompt_done = Instant::now();

        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling(params));
        let mut detok = Detokenizer::new();
        let mut stops = StopMatcher::new(params.stop.clone());
        let mut history = prompt.tokens.clone();
        let mut text = String::new();
        let mut first_token_at = None;
        let mut completion = 0usize;
        let mut finish = FinishReason::Length;
        let mut emit = |delta: &str, text: &mut String, first: &mut Option<Instant>| {
            if !delta.is_empty() {
                first.get_or_insert_with(Instant::now);
                text.push_str(delta);
                on_text(delta);
            }
        };
        while completion < budget {
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            let penalised = if params.repeat_penalty == 1.0 {
                logits
            } else {
                let start = history.len().saturating_sub(params.repeat_last_n);
                candle_transformers::utils::apply_repeat_penalty(&logits, params.repeat_penalty, &history[start..])
                    .map_err(internal)?
            };
            let next = sampler.sample(&penalised).map_err(internal)?;
            completion += 1;
            if !self.ignore_eos && self.tokenizer.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            history.push(next);
            let delta = detok.push(&self.tokenizer, next).map_err(EngineError::bad_input)?;
            match stops.push(&delta) {
                StopScan::Continue(out) => emit(&out, &mut text, &mut first_token_at),
                StopScan::Stop(out) => {
                    emit(&out, &mut text, &mut first_token_at);
                    finish = FinishReason::Stop;
                    break;
                }
            }
            if completion == budget {
                break;
            }
            logits = self.model.forward(&[next], history.len() - 1, &self.device).map_err(internal)?;
        }
        let tail = stops.finish();
        emit(&tail, &mut text, &mut first_token_at);

        let done = Instant::now();
        let prompt_secs = (prompt_done - started).as_secs_f64();
        let decode_secs = (done - prompt_done).as_secs_f64();
        let metrics = Metrics {
            prompt_tokens: prompt_len as u32,
            completion_tokens: completion as u32,
            time_to_first_token_ms: first_token_at.map(|t| (t - started).as_secs_f64() * 1e3),
            prompt_tokens_per_s: (prompt_secs > 0.0).then(|| prompt_len as f64 / prompt_secs),
            decode_tokens_per_s: (decode_secs > 0.0 && completion > 0).then(|| completion as f64 / decode_secs),
            audio_seconds: None,
            wall_ms: (done - started).as_secs_f64() * 1e3,
        };
        Ok(Completed { result: JobResult::Chat { text, finish_reason: finish }, metrics })
    }
}

fn sampling(p: &SamplingParams) -> Sampling {
    if p.temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    let temperature = p.temperature;
    match (p.top_k, p.top_p) {
        (None, None) => Sampling::All { temperature },
        (Some(k), None) => Sampling::TopK { k, temperature },
        (None, Some(p)) => Sampling::TopP { p, temperature },
        (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
    }
}

fn validate_messages(messages: &[ChatMessage]) -> Result<(), EngineError> {
    match messages.last() {
        None => Err(EngineError::bad_input("the conversation has no messages")),
        Some(last) if last.role != Role::User => Err(EngineError::bad_input("the last message must be the user's")),
        Some(last) if last.content.trim().is_empty() => Err(EngineError::bad_input("the message is empty")),
        _ => Ok(()),
    }
}

impl Engine for ChatEngine {
    fn run(&mut self, job: &Job, ctx: &JobContext) -> Result<Completed, EngineError> {
        let JobInput::Chat(input) = &job.input else {
            return Err(EngineError::bad_input(format!("a chat worker cannot run {} jobs", job.kind())));
        };
        let cancelled = || ctx.check_cancelled().is_err();
        self.generate(input, &cancelled, &mut |delta| ctx.emit(EventBody::Token { text: delta.to_string() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{write_tiny_llama, TINY_CONTEXT};
    use candle_core::quantized::GgmlDType;

    fn tiny(dtype: GgmlDType) -> (tempfile::TempDir, ChatEngine) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, dtype);
        let engine = ChatEngine::load(&path, 4096).unwrap();
        (dir, engine)
    }

    fn input(text: &str, params: SamplingParams) -> ChatInput {
        ChatInput { messages: vec![ChatMessage { role: Role::User, content: text.into() }], params }
    }

    fn greedy(max_tokens: u32) -> SamplingParams {
        SamplingParams { temperature: 0.0, max_tokens, repeat_penalty: 1.0, ..Default::default() }
    }

    fn generate(engine: &mut ChatEngine, input: &ChatInput) -> (Completed, String) {
        let mut streamed = String::new();
        let done = engine.generate(input, &|| false, &mut |d| streamed.push_str(d)).unwrap();
        (done, streamed)
    }

    fn text_of(c: &Completed) -> &str {
        match &c.result {
            JobResult::Chat { text, .. } => text,
            other => panic!("not a chat result: {other:?}"),
        }
    }

    #[test]
    fn q4_1_models_are_converted_once_to_q8_0_and_cached() {
        let (dir, mut engine) = tiny(GgmlDType::Q4_1);
        let cached = dir.path().join("tiny.natter-q8_0.gguf");
        assert!(cached.is_file());
        let (content, _) = model::read_content(&cached).unwrap();
        assert!(content.tensor_infos.values().all(|t| t.ggml_dtype != GgmlDType::Q4_1));
        assert!(content.tensor_infos.values().any(|t| t.ggml_dtype == GgmlDType::Q8_0));
        assert_eq!(model::fast_gguf(&dir.path().join("tiny.gguf")).unwrap(), cached);
        let (done, _) = generate(&mut engine, &input("hello", greedy(8)));
        assert_eq!(done.metrics.completion_tokens, 8);
    }

    #[test]
    fn greedy_is_deterministic_and_streams_the_whole_text() {
        let (_dir, mut engine) = tiny(GgmlDType::Q8_0);
        let (a, streamed) = generate(&mut engine, &input("hello there", greedy(24)));
        let (b, _) = generate(&mut engine, &input("hello there", greedy(24)));
        assert_eq!(text_of(&a), text_of(&b));
        assert_eq!(text_of(&a), streamed);
        assert_eq!(a.metrics.completion_tokens, 24);
        assert!(matches!(a.result, JobResult::Chat { finish_reason: FinishReason::Length, .. }));
        assert!(a.metrics.prompt_tokens > 5);
        assert!(a.metrics.decode_tokens_per_s.unwrap() > 0.0);
    }

    #[test]
    fn multibyte_characters_split_over_byte_tokens_stream_whole() {
        let (_dir, engine) = tiny(GgmlDType::Q8_0);
        let ids: Vec<u32> = "é€".bytes().map(|b| byte_token(&engine, b)).collect();
        let mut detok = Detokenizer::new();
        let deltas: Vec<String> = ids.iter().map(|&id| detok.push(&engine.tokenizer, id).unwrap()).collect();
        assert_eq!(deltas, ["", "é", "", "", "€"]);
    }

    /// The vocab id of a single raw byte (GPT-2 byte-level mapping).
    fn byte_token(engine: &ChatEngine, byte: u8) -> u32 {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable(byte as u32) {
            char::from_u32(byte as u32).unwrap()
        } else {
            char::from_u32(256 + (0..byte as u32).filter(|b| !printable(*b)).count() as u32).unwrap()
        };
        engine.tokenizer.inner.token_to_id(&c.to_string()).unwrap()
    }

    #[test]
    fn same_seed_same_sample_different_seed_differs() {
        let (_dir, mut engine) = tiny(GgmlDType::Q8_0);
        let sampled = |seed| SamplingParams {
            temperature: 1.5,
            top_k: Some(50),
            top_p: Some(0.95),
            max_tokens: 32,
            seed,
            ..Default::default()
        };
        let (a, _) = generate(&mut engine, &input("hi", sampled(1)));
        let (b, _) = generate(&mut engine, &input("hi", sampled(1)));
        let (c, _) = generate(&mut engine, &input("hi", sampled(2)));
        assert_eq!(text_of(&a), text_of(&b));
        assert_ne!(text_of(&a), text_of(&c));
    }

    #[test]
    fn stop_strings_end_generation_and_are_not_emitted() {
        let (_dir, mut engine) = tiny(GgmlDType::Q8_0);
        let (full, _) = generate(&mut engine, &input("hello", greedy(40)));
        let text = text_of(&full).to_string();
        // Stop on a piece of what greedy decoding is known to produce.
        let chars: Vec<char> = text.chars().collect();
        assert!(chars.len() > 6, "{text:?}");
        let stop: String = chars[4..6].iter().collect();
        let prefix = &text[..text.find(&stop).unwrap()];
        let (cut, streamed) =
            generate(&mut engine, &input("hello", SamplingParams { stop: vec![stop.clone()], ..greedy(40) }));
        assert_eq!(text_of(&cut), prefix);
        assert_eq!(streamed, prefix);
        assert!(matches!(cut.result, JobResult::Chat { finish_reason: FinishReason::Stop, .. }));
    }

    #[test]
    fn old_turns_are_dropped_to_fit_and_the_system_prompt_kept() {
        let (_dir, engine) = tiny(GgmlDType::Q8_0);
        let long = "word ".repeat(40);
        let mut messages = vec![ChatMessage { role: Role::System, content: "sys".into() }];
        for _ in 0..6 {
            messages.push(ChatMessage { role: Role::User, content: long.clone() });
            messages.push(ChatMessage { role: Role::Assistant, content: long.clone() });
        }
        messages.push(ChatMessage { role: Role::User, content: "last".into() });
        let prompt = engine.build_prompt(&messages, 32).unwrap();
        assert!(prompt.dropped_messages > 0);
        assert!(prompt.tokens.len() + 32 <= TINY_CONTEXT as usize);
        let text = engine.tokenizer.decode(&prompt.tokens).unwrap();
        assert!(text.starts_with("system\nsys"), "{text:?}");
        assert!(text.contains("user\nlast"));
    }

    #[test]
    fn bad_input_is_refused_with_clear_errors() {
        let (_dir, mut engine) = tiny(GgmlDType::Q8_0);
        let err = |engine: &mut ChatEngine, input: ChatInput| match engine.generate(&input, &|| false, &mut |_| {}) {
            Err(EngineError::Failed { code, message }) => (code, message),
            other => panic!("expected a failure, got {other:?}"),
        };
        let (code, msg) = err(&mut engine, input(&"word ".repeat(400), greedy(8)));
        assert_eq!(code, ErrorCode::PromptTooLong);
        assert!(msg.contains("context window"), "{msg}");
        assert_eq!(err(&mut engine, input("  ", greedy(8))).0, ErrorCode::BadInput);
        assert_eq!(err(&mut engine, ChatInput { messages: vec![], params: greedy(8) }).0, ErrorCode::BadInput);
        assert_eq!(
            err(&mut engine, input("hi", SamplingParams { temperature: -2.0, ..greedy(8) })).0,
            ErrorCode::InvalidParams
        );
    }

    #[test]
    fn cancellation_stops_within_a_step() {
        let (_dir, mut engine) = tiny(GgmlDType::Q8_0);
        let steps = std::cell::Cell::new(0);
        let result = engine.generate(
            &input("hello", greedy(200)),
            &|| {
                steps.set(steps.get() + 1);
                steps.get() > 5
            },
            &mut |_| {},
        );
        assert!(matches!(result, Err(EngineError::Cancelled)));
        assert_eq!(steps.get(), 6);
    }
}

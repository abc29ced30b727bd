//! The chat engine: a GGUF model, its tokenizer and chat template from the GGUF
//! metadata, and a scheduler that runs many conversations through shared
//! forward passes (continuous batching), with sampling, stop handling and
//! streaming per conversation.
//!
//! Each step advances every running sequence: one decode row for each sequence
//! that is answering, plus prompt rows of newcomers up to a per-step budget, so a
//! new prompt never stalls the answers in flight for more than one step.

pub mod model;
pub mod native;
mod sample;
mod template;
mod text;
pub mod tokenizer;

use crate::engine::{BatchEngine, Completed, EngineError, JobContext, Reply};
use candle_core::Device;
use model::Model;
use native::{KvCache, NativeModel, Row};
use natter_shared::config::KvCacheType;
use natter_shared::proto::{
    ChatInput, ChatMessage, ErrorCode, EventBody, FinishReason, Job, JobInput, JobResult, Metrics, Role,
};
use sample::Sampler;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;
use template::ChatTemplate;
use text::{Detokenizer, StopMatcher, StopScan};
use tokenizer::GgufTokenizer;

/// How a chat engine is sized.
#[derive(Clone, Copy, Debug)]
pub struct ChatOptions {
    /// Longest prompt + answer, capped by the model's trained context.
    pub max_context: usize,
    /// Conversations served at once; KV memory is `batch × window` positions.
    pub batch: usize,
    /// Rows (tokens) one forward pass may carry; bounds how long a newcomer's
    /// prompt can hold up the answers in flight.
    pub step_tokens: usize,
    /// Inference threads.
    pub threads: usize,
    /// How the KV cache stores keys and values.
    pub kv_cache: KvCacheType,
}

impl ChatOptions {
    pub fn new(max_context: usize, batch: usize, threads: usize) -> Self {
        ChatOptions {
            max_context,
            batch: batch.max(1),
            step_tokens: 256,
            threads: threads.max(1),
            kv_cache: KvCacheType::Mixed,
        }
    }
}

/// The inference threads to use when none are configured: `RAYON_NUM_THREADS`
/// (set from `--threads`) or one per core.
pub fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

enum Backend {
    /// natter's forward pass: batched, GGUF blocks as they are.
    Native { model: Box<NativeModel>, cache: KvCache },
    /// candle's stock model, one sequence at a time, for architectures the
    /// native pass does not cover.
    Candle { model: Model, device: Device },
}

/// A run of a sequence's tokens fed in one step.
struct Chunk {
    sequence: usize,
    start: usize,
    end: usize,
}

pub type SequenceId = u64;

/// What a step reports about one sequence.
#[derive(Debug)]
pub enum SequenceEvent {
    /// New answer text, and the token ids sampled since the last text (some
    /// tokens add no text until a later one completes a character or rules
    /// out a stop string).
    Text {
        text: String,
        tokens: Vec<u32>,
    },
    Finished(Result<Completed, EngineError>),
}

struct Sequence {
    id: SequenceId,
    slot: usize,
    /// Prompt and answer so far.
    tokens: Vec<u32>,
    /// Tokens already in the KV cache.
    fed: usize,
    /// Tokens fed before the first sample: the prompt, and the answer an
    /// earlier attempt had already generated when this one resumes it.
    prompt_len: usize,
    /// Answer tokens taken over from an earlier attempt.
    resumed: usize,
    /// Sampled tokens not yet reported in a `Text` event.
    unsent_tokens: Vec<u32>,
    budget: usize,
    completion: usize,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    text: String,
    started: Instant,
    prompt_done: Option<Instant>,
    first_token_at: Option<Instant>,
}

/// A job's side of a running sequence: where its text goes.
struct Running {
    ctx: JobContext,
    reply: Reply,
    /// Text the event channel had no room for yet; sent with the next delta.
    unsent: String,
    /// The token ids behind `unsent`.
    unsent_tokens: Vec<u32>,
}

pub struct ChatEngine {
    backend: Backend,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    /// Prompt + answer tokens a job may use.
    window: usize,
    step_tokens: usize,
    /// Benchmarks generate a fixed number of tokens whatever the model says.
    ignore_eos: bool,
    sequences: Vec<Sequence>,
    free_slots: Vec<usize>,
    next_id: SequenceId,
    jobs: HashMap<SequenceId, Running>,
    /// The last step's logits, one row per sequence brought up to date, kept
    /// between steps and sampled in place: a fresh buffer of eight 49k-token
    /// rows, and a copy of each row, cost page faults on every step.
    logits: Vec<f32>,
}

/// The prompt after fitting it into the window.
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Oldest turns left out to make it fit.
    pub dropped_messages: usize,
}

impl ChatEngine {
    /// Loads `path`: llama and qwen2 models run on the native forward pass as
    /// they are; other architectures (and unusual tensor types) run on candle's
    /// stock model, after converting quant types it has no SIMD kernel for.
    pub fn load(path: &Path, options: ChatOptions) -> Result<Self, String> {
        let (content, _) = model::read_content(path).map_err(|e| e.to_string())?;
        let trained = model::context_length(&content).unwrap_or(2048);
        let window = trained.min(options.max_context).max(16);
        let backend = match NativeModel::load(path, &content, options.threads) {
            Ok(native) => {
                let cache = KvCache::new(&native.config, options.batch, window, options.step_tokens, options.kv_cache);
                tracing::info!(
                    weights_mb = native.weight_bytes() / 1_000_000,
                    kv_cache_mb = cache.capacity_bytes() / 1_000_000,
                    kv_cache = ?options.kv_cache,
                    batch = options.batch,
                    window,
                    threads = native.threads(),
                    "native chat engine"
                );
                Backend::Native { model: Box::new(native), cache }
            }
            Err(native::NativeError::Unsupported(why)) => {
                tracing::info!("running {} on candle's stock model ({why})", path.display());
                let fast = model::fast_gguf(path).map_err(|e| e.to_string())?;
                let device = Device::Cpu;
                let (model, _) = model::load(&fast, &device).map_err(|e| e.to_string())?;
                Backend::Candle { model, device }
            }
            Err(e) => return Err(e.to_string()),
        };
        Self::with_backend(backend, &content, window, options.step_tokens)
    }

    /// Loads `path` on candle's stock model whatever its architecture: the
    /// reference the native pass is tested against.
    pub fn load_stock(path: &Path, max_context: usize) -> Result<Self, String> {
        let (content, _) = model::read_content(path).map_err(|e| e.to_string())?;
        let window = model::context_length(&content).unwrap_or(2048).min(max_context).max(16);
        let device = Device::Cpu;
        let (model, _) = model::load(path, &device).map_err(|e| e.to_string())?;
        Self::with_backend(Backend::Candle { model, device }, &content, window, 512)
    }

    fn with_backend(
        backend: Backend,
        content: &candle_core::quantized::gguf_file::Content,
        window: usize,
        step_tokens: usize,
    ) -> Result<Self, String> {
        let tokenizer = GgufTokenizer::from_gguf(content)?;
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
        let slots = match &backend {
            Backend::Native { cache, .. } => cache.slots(),
            Backend::Candle { .. } => 1,
        };
        Ok(ChatEngine {
            backend,
            tokenizer,
            template,
            window,
            step_tokens: step_tokens.max(1),
            ignore_eos: false,
            sequences: Vec::new(),
            free_slots: (0..slots).rev().collect(),
            next_id: 0,
            jobs: HashMap::new(),
            logits: Vec::new(),
        })
    }

    pub fn set_ignore_eos(&mut self, ignore: bool) {
        self.ignore_eos = ignore;
    }

    /// Whether this engine runs natter's own forward pass.
    pub fn is_native(&self) -> bool {
        matches!(self.backend, Backend::Native { .. })
    }

    /// Conversations this engine can run at once.
    pub fn slots(&self) -> usize {
        self.free_slots.len() + self.sequences.len()
    }

    /// Sequences admitted and not yet finished.
    pub fn running(&self) -> usize {
        self.sequences.len()
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

    /// Starts a sequence for `input`; it advances with each [`ChatEngine::step`].
    pub fn admit(&mut self, input: &ChatInput) -> Result<SequenceId, EngineError> {
        self.admit_resuming(input, &[]).map(|(id, _)| id)
    }

    /// Like [`ChatEngine::admit`], continuing the answer an earlier attempt
    /// had generated as `answer` (token ids) when its worker died: the prompt
    /// and those tokens are fed in one prefill, the sampler is brought to the
    /// state it had after them, and only the rest is generated, as it would
    /// have been. Returns the answer's text so far, to be shown again.
    pub fn admit_resuming(&mut self, input: &ChatInput, answer: &[u32]) -> Result<(SequenceId, String), EngineError> {
        let params = &input.params;
        params.validate().map_err(|message| EngineError::Failed { code: ErrorCode::InvalidParams, message })?;
        validate_messages(&input.messages)?;
        let started = Instant::now();
        let prompt = self.build_prompt(&input.messages, params.max_tokens)?;
        if prompt.dropped_messages > 0 {
            tracing::debug!(dropped = prompt.dropped_messages, "trimmed the oldest turns to fit the context window");
        }
        let budget = (params.max_tokens as usize).min(self.window - prompt.tokens.len());
        // An answer longer than this job may give (another worker's longer
        // window) is cut to what fits; the rest is generated again.
        let answer = &answer[..answer.len().min(budget.saturating_sub(1))];
        let mut sampler = Sampler::new(params);
        sampler.skip(answer.len());
        let mut detok = Detokenizer::new();
        let mut stops = StopMatcher::new(params.stop.clone());
        let mut text = String::new();
        let vocab = self.tokenizer.inner.get_vocab_size(true) as u32;
        if answer.iter().any(|t| *t >= vocab) {
            return Err(EngineError::bad_input("the resumed answer does not fit this model"));
        }
        for &token in answer {
            let delta = detok.push(&self.tokenizer, token).map_err(EngineError::bad_input)?;
            match stops.push(&delta) {
                StopScan::Continue(shown) => text.push_str(&shown),
                // The earlier attempt would have stopped here; it did not, so
                // its tokens are not this model's.
                StopScan::Stop(_) => return Err(EngineError::bad_input("the resumed answer does not fit this model")),
            }
        }
        let slot = self.free_slots.pop().ok_or_else(|| EngineError::Failed {
            code: ErrorCode::Internal,
            message: "the chat engine has no free slot".into(),
        })?;
        let id = self.next_id;
        self.next_id += 1;
        let mut tokens = prompt.tokens;
        tokens.extend_from_slice(answer);
        let prompt_len = tokens.len();
        self.sequences.push(Sequence {
            id,
            slot,
            tokens,
            fed: 0,
            prompt_len,
            resumed: answer.len(),
            unsent_tokens: Vec::new(),
            budget,
            completion: answer.len(),
            sampler,
            detok,
            stops,
            text: text.clone(),
            started,
            prompt_done: None,
            first_token_at: None,
        });
        Ok((id, text))
    }

    /// Advances every sequence by one forward pass and reports their new text
    /// and the ones that finished. `cancelled` is asked once per sequence.
    pub fn step(&mut self, cancelled: &dyn Fn(SequenceId) -> bool) -> Vec<(SequenceId, SequenceEvent)> {
        let mut events = Vec::new();
        let mut i = 0;
        while i < self.sequences.len() {
            if cancelled(self.sequences[i].id) {
                let seq = self.sequences.remove(i);
                self.free_slots.push(seq.slot);
                events.push((seq.id, SequenceEvent::Finished(Err(EngineError::Cancelled))));
            } else {
                i += 1;
            }
        }
        if self.sequences.is_empty() {
            return events;
        }

        // Answers in flight first, one row each; then prompt rows, oldest first.
        let mut chunks: Vec<Chunk> = Vec::new();
        for (i, seq) in self.sequences.iter().enumerate() {
            if seq.fed >= seq.prompt_len {
                chunks.push(Chunk { sequence: i, start: seq.fed, end: seq.fed + 1 });
            }
        }
        let mut room = self.step_tokens.saturating_sub(chunks.len()).max(1);
        for (i, seq) in self.sequences.iter().enumerate() {
            if seq.fed < seq.prompt_len && room > 0 {
                let n = (seq.prompt_len - seq.fed).min(room);
                chunks.push(Chunk { sequence: i, start: seq.fed, end: seq.fed + n });
                room -= n;
            }
        }
        if matches!(self.backend, Backend::Candle { .. }) {
            chunks.truncate(1);
        }

        let rows = match self.forward(&chunks) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("chat model error: {e}");
                for seq in self.sequences.drain(..) {
                    self.free_slots.push(seq.slot);
                    let failed = EngineError::Failed {
                        code: ErrorCode::Internal,
                        message: "the model failed while running this job".into(),
                    };
                    events.push((seq.id, SequenceEvent::Finished(Err(failed))));
                }
                return events;
            }
        };

        let mut finished = Vec::new();
        for (chunk, row) in chunks.iter().zip(rows) {
            let seq = &mut self.sequences[chunk.sequence];
            seq.fed = chunk.end;
            let Some(row) = row else { continue };
            seq.prompt_done.get_or_insert_with(Instant::now);
            let logits = &mut self.logits[row];
            if let Some(outcome) = advance(seq, logits, &self.tokenizer, self.ignore_eos, &mut events) {
                finished.push((chunk.sequence, outcome));
            }
        }
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, outcome) in finished {
            let seq = self.sequences.remove(i);
            self.free_slots.push(seq.slot);
            events.push((seq.id, SequenceEvent::Finished(outcome)));
        }
        events
    }

    /// Runs the chunks through the model; where in `self.logits` the logits
    /// after each chunk that brings its sequence up to date are.
    fn forward(&mut self, chunks: &[Chunk]) -> candle_core::Result<Vec<Option<Range<usize>>>> {
        let wants: Vec<bool> = chunks.iter().map(|c| c.end == self.sequences[c.sequence].tokens.len()).collect();
        match &mut self.backend {
            Backend::Native { model, cache } => {
                let mut rows = Vec::new();
                for (c, &want) in chunks.iter().zip(&wants) {
                    let seq = &self.sequences[c.sequence];
                    for pos in c.start..c.end {
                        let logits = want && pos + 1 == c.end;
                        rows.push(Row { slot: seq.slot, pos, token: seq.tokens[pos], logits });
                    }
                }
                model.forward(&rows, cache, &mut self.logits);
                let vocab = model.config.vocab;
                let mut next = (0..).map(|i| i * vocab..(i + 1) * vocab);
                Ok(wants.iter().map(|&w| if w { next.next() } else { None }).collect())
            }
            Backend::Candle { model, device } => {
                self.logits.clear();
                let mut out = Vec::new();
                for (c, &want) in chunks.iter().zip(&wants) {
                    let seq = &self.sequences[c.sequence];
                    let logits = model.forward(&seq.tokens[c.start..c.end], c.start, device)?;
                    out.push(if want {
                        let start = self.logits.len();
                        self.logits.extend(logits.to_vec1::<f32>()?);
                        Some(start..self.logits.len())
                    } else {
                        None
                    });
                }
                Ok(out)
            }
        }
    }

    /// Generates an answer for `input` alone, streaming deltas through `on_text`.
    /// Used by the benchmark and the tests; jobs go through [`BatchEngine`].
    pub fn generate(
        &mut self,
        input: &ChatInput,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completed, EngineError> {
        let id = self.admit(input)?;
        loop {
            for (seq, event) in self.step(&|s| s == id && cancelled()) {
                match event {
                    SequenceEvent::Text { text, .. } if seq == id => on_text(&text),
                    SequenceEvent::Finished(outcome) if seq == id => return outcome,
                    _ => {}
                }
            }
        }
    }
}

/// Samples a sequence's next token from `logits` and streams its text; returns
/// the outcome once the sequence is done.
fn advance(
    seq: &mut Sequence,
    logits: &mut [f32],
    tokenizer: &GgufTokenizer,
    ignore_eos: bool,
    events: &mut Vec<(SequenceId, SequenceEvent)>,
) -> Option<Result<Completed, EngineError>> {
    let next = seq.sampler.sample(logits, &seq.tokens);
    seq.completion += 1;
    let mut finish = None;
    let mut out = String::new();
    if !ignore_eos && tokenizer.stop_ids.contains(&next) {
        finish = Some(FinishReason::Stop);
    } else {
        seq.tokens.push(next);
        seq.unsent_tokens.push(next);
        let delta = match seq.detok.push(tokenizer, next) {
            Ok(delta) => delta,
            Err(e) => return Some(Err(EngineError::bad_input(e))),
        };
        match seq.stops.push(&delta) {
            StopScan::Continue(text) => out = text,
            StopScan::Stop(text) => {
                out = text;
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && seq.completion >= seq.budget {
            finish = Some(FinishReason::Length);
        }
    }
    if finish.is_some() {
        out.push_str(&seq.stops.finish());
    }
    if !out.is_empty() {
        seq.first_token_at.get_or_insert_with(Instant::now);
        seq.text.push_str(&out);
        events.push((seq.id, SequenceEvent::Text { text: out, tokens: std::mem::take(&mut seq.unsent_tokens) }));
    }
    let finish = finish?;
    let done = Instant::now();
    let prompt_done = seq.prompt_done.unwrap_or(done);
    let prompt_secs = (prompt_done - seq.started).as_secs_f64();
    let decode_secs = (done - prompt_done).as_secs_f64();
    // The first token comes with the prompt's forward pass; the decode rate
    // counts the tokens after it.
    let decoded = seq.completion.saturating_sub(1);
    let metrics = Metrics {
        prompt_tokens: (seq.prompt_len - seq.resumed) as u32,
        completion_tokens: seq.completion as u32,
        time_to_first_token_ms: seq.first_token_at.map(|t| (t - seq.started).as_secs_f64() * 1e3),
        prompt_tokens_per_s: (prompt_secs > 0.0).then(|| seq.prompt_len as f64 / prompt_secs),
        decode_tokens_per_s: (decode_secs > 0.0 && decoded > 0).then(|| decoded as f64 / decode_secs),
        audio_seconds: None,
        wall_ms: (done - seq.started).as_secs_f64() * 1e3,
    };
    let text = std::mem::take(&mut seq.text);
    Some(Ok(Completed { result: JobResult::Chat { text, finish_reason: finish }, metrics }))
}

fn validate_messages(messages: &[ChatMessage]) -> Result<(), EngineError> {
    match messages.last() {
        None => Err(EngineError::bad_input("the conversation has no messages")),
        Some(last) if last.role != Role::User => Err(EngineError::bad_input("the last message must be the user's")),
        Some(last) if last.content.trim().is_empty() => Err(EngineError::bad_input("the message is empty")),
        _ => Ok(()),
    }
}

impl BatchEngine for ChatEngine {
    fn capacity(&self) -> usize {
        self.slots()
    }

    fn active(&self) -> usize {
        self.jobs.len()
    }

    fn kv_cache(&self) -> (usize, usize) {
        (self.sequences.iter().map(|s| s.fed).sum(), self.slots() * self.window)
    }

    fn admit(&mut self, job: Job, ctx: JobContext, reply: Reply) {
        let JobInput::Chat(input) = &job.input else {
            let _ = reply.send(Err(EngineError::bad_input(format!("a chat worker cannot run {} jobs", job.kind()))));
            return;
        };
        match ChatEngine::admit_resuming(self, input, ctx.resume_from()) {
            Ok((id, text)) => {
                // The answer so far is shown again first; the tokens go with
                // it, so a further attempt can resume from this one.
                let unsent_tokens = ctx.resume_from().to_vec();
                self.jobs.insert(id, Running { ctx, reply, unsent: text, unsent_tokens });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn step(&mut self) {
        let jobs = std::mem::take(&mut self.jobs);
        let events = ChatEngine::step(self, &|id| jobs.get(&id).is_none_or(|j| j.ctx.check_cancelled().is_err()));
        self.jobs = jobs;
        for (id, event) in events {
            match event {
                SequenceEvent::Text { text, tokens } => {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.unsent.push_str(&text);
                        job.unsent_tokens.extend(tokens);
                    }
                }
                SequenceEvent::Finished(outcome) => {
                    if let Some(job) = self.jobs.remove(&id) {
                        if !job.unsent.is_empty() {
                            job.ctx.emit(EventBody::Token { text: job.unsent, tokens: job.unsent_tokens });
                        }
                        let _ = job.reply.send(outcome);
                    }
                }
            }
        }
        // One slow reader must not hold up every other stream: text that does
        // not fit its channel now goes out with the next step's.
        for job in self.jobs.values_mut() {
            if !job.unsent.is_empty() {
                let (text, tokens) = (std::mem::take(&mut job.unsent), std::mem::take(&mut job.unsent_tokens));
                if let Err(EventBody::Token { text, tokens }) = job.ctx.try_emit(EventBody::Token { text, tokens }) {
                    job.unsent = text;
                    job.unsent_tokens = tokens;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{write_tiny_llama, write_tiny_qwen2, TINY_CONTEXT};
    use candle_core::quantized::GgmlDType;
    use natter_shared::proto::SamplingParams;

    fn tiny(dtype: GgmlDType) -> (tempfile::TempDir, ChatEngine) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, dtype);
        let engine = ChatEngine::load(&path, ChatOptions::new(4096, 4, 2)).unwrap();
        assert!(engine.is_native());
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
    fn the_native_pass_keeps_q4_1_and_the_stock_path_converts_it_once() {
        let (dir, mut engine) = tiny(GgmlDType::Q4_1);
        let cached = dir.path().join("tiny.natter-q8_0.gguf");
        assert!(!cached.is_file(), "the native pass reads Q4_1 as it is");
        let (done, _) = generate(&mut engine, &input("hello", greedy(8)));
        assert_eq!(done.metrics.completion_tokens, 8);
        // candle's stock path (architectures without a native pass) converts.
        assert_eq!(model::fast_gguf(&dir.path().join("tiny.gguf")).unwrap(), cached);
        let (content, _) = model::read_content(&cached).unwrap();
        assert!(content.tensor_infos.values().all(|t| t.ggml_dtype != GgmlDType::Q4_1));
    }

    fn tokens_of(engine: &mut ChatEngine, input: &ChatInput) -> (String, u32) {
        let (done, _) = generate(engine, input);
        (text_of(&done).to_string(), done.metrics.completion_tokens)
    }

    /// The native pass reads every tiny layout (Q8_0, Q4_1, and qwen2's mix of
    /// Q5_0, Q8_0, Q4_K, Q6_K with biases and an untied output) as candle's stock
    /// models do: logits agree at each of 40 positions within the noise that
    /// 8-bit activation quantization leaves, and so do the clear favourites.
    /// (`tests/chat_engine.rs` holds the real models to token equality.)
    #[test]
    fn native_logits_follow_candles_stock_models() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let path = dir.path().join(format!("llama-{dtype:?}.gguf"));
            write_tiny_llama(&path, dtype);
            paths.push(path);
        }
        let path = dir.path().join("qwen2.gguf");
        write_tiny_qwen2(&path);
        paths.push(path);
        for path in paths {
            // candle picks its k-quant kernels by CPU at run time, and its
            // AVX-512 VNNI ones quantize activations otherwise than its AVX2
            // ones: on such CPUs its qwen2 logits move by up to 3% of their
            // scale, so that layout gets the wider bound.
            let bound = if path.ends_with("qwen2.gguf") { 0.1 } else { 0.06 };
            let mut native = tiny_native(&path);
            // Past the first KV page (256 positions), in the second slot.
            let mut cache = KvCache::new(&native.config, 2, 300, 1, KvCacheType::F16);
            let (mut stock, _) = model::load(&path, &Device::Cpu).unwrap();
            for pos in 0..300 {
                let token = (pos as u32 * 7 + 3) % 250;
                let mut ours = Vec::new();
                native.forward(&[Row { slot: 1, pos, token, logits: true }], &mut cache, &mut ours);
                let theirs = stock.forward(&[token], pos, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
                let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < bound * scale, "{} at {pos}: {diff} of {scale}", path.display());
                let (pick, expected) = (sample::argmax(&ours) as usize, sample::argmax(&theirs) as usize);
                assert!(
                    pick == expected || theirs[expected] - theirs[pick] < 2.0 * diff,
                    "{} at {pos}",
                    path.display()
                );
            }
        }
    }

    fn tiny_native(path: &std::path::Path) -> NativeModel {
        let (content, _) = model::read_content(path).unwrap();
        NativeModel::load(path, &content, 2).unwrap()
    }

    /// The mixed KV cache reads a query's latest pages in f16 and older ones
    /// in 8 bits: identical to the f16 cache for the first two pages, then
    /// different but still with candle's stock model.
    #[test]
    fn the_mixed_kv_cache_equals_f16_on_recent_pages_and_follows_candle_beyond() {
        let dir = tempfile::tempdir().unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let path = dir.path().join(format!("llama-{dtype:?}.gguf"));
            write_tiny_llama(&path, dtype);
            let mut native = tiny_native(&path);
            let mut f16 = KvCache::new(&native.config, 1, 700, 1, KvCacheType::F16);
            let mut mixed = KvCache::new(&native.config, 1, 700, 1, KvCacheType::Mixed);
            let (mut stock, _) = model::load(&path, &Device::Cpu).unwrap();
            let mut differed = 0;
            for pos in 0..700 {
                let row = [Row { slot: 0, pos, token: (pos as u32 * 11 + 5) % 250, logits: true }];
                let (mut exact, mut ours) = (Vec::new(), Vec::new());
                native.forward(&row, &mut f16, &mut exact);
                native.forward(&row, &mut mixed, &mut ours);
                if pos < 512 {
                    assert_eq!(ours, exact, "at {pos}");
                } else if ours != exact {
                    differed += 1;
                }
                let theirs = stock.forward(&[row[0].token], pos, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
                let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 0.06 * scale, "{dtype:?} at {pos}: {diff} of {scale}");
            }
            assert!(differed > 100, "past two pages the 8-bit keys are read ({differed} of 188 differ)");
        }
    }

    /// The mixed cache keeps each slot's latest pages in a ring: prompts fed
    /// in big chunks beside another slot's give exactly the logits of feeding
    /// one position at a time.
    #[test]
    fn the_mixed_kv_cache_gives_the_same_logits_however_the_steps_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen2.gguf");
        write_tiny_qwen2(&path);
        let mut native = tiny_native(&path);
        let token = |slot: usize, pos: usize| ((pos * 7 + slot * 13) % 250) as u32;
        let len = 1100;
        let mut alone = KvCache::new(&native.config, 1, len, 1, KvCacheType::Mixed);
        let mut expected = Vec::new();
        for pos in 0..len {
            let mut logits = Vec::new();
            native.forward(&[Row { slot: 0, pos, token: token(1, pos), logits: true }], &mut alone, &mut logits);
            expected.push(logits);
        }
        let step_tokens = 300;
        let mut shared = KvCache::new(&native.config, 2, len, step_tokens, KvCacheType::Mixed);
        let (mut fed, mut other) = (0, 0);
        while fed < len {
            let mut rows: Vec<Row> = (other..(other + 173).min(len))
                .map(|pos| Row { slot: 0, pos, token: token(0, pos), logits: false })
                .collect();
            let end = (fed + step_tokens).min(len);
            rows.extend((fed..end).map(|pos| Row { slot: 1, pos, token: token(1, pos), logits: true }));
            let mut logits = Vec::new();
            native.forward(&rows, &mut shared, &mut logits);
            for (pos, got) in (fed..end).zip(logits.chunks_exact(native.config.vocab)) {
                assert_eq!(got, &expected[pos][..], "at {pos}");
            }
            other = (other + 173).min(len);
            fed = end;
        }
    }

    /// Runs one sequence to its end: its streamed text, token ids and outcome.
    fn run_alone(engine: &mut ChatEngine, id: SequenceId) -> (String, Vec<u32>, Completed) {
        let (mut text, mut ids) = (String::new(), Vec::new());
        loop {
            for (seq, event) in engine.step(&|_| false) {
                assert_eq!(seq, id);
                match event {
                    SequenceEvent::Text { text: t, tokens } => {
                        text.push_str(&t);
                        ids.extend(tokens);
                    }
                    SequenceEvent::Finished(outcome) => return (text, ids, outcome.unwrap()),
                }
            }
        }
    }

    /// An answer taken over from a dead attempt (prompt and answer so far in
    /// one prefill, the sampler brought forward) goes on exactly as the
    /// uninterrupted one did, greedy or sampled from a seed.
    #[test]
    fn a_resumed_answer_goes_on_as_the_uninterrupted_one_did() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen2.gguf");
        write_tiny_qwen2(&path);
        let mut engine = ChatEngine::load(&path, ChatOptions::new(4096, 2, 2)).unwrap();
        engine.set_ignore_eos(true);
        let sampled = SamplingParams { temperature: 0.9, top_p: Some(0.9), seed: 5, ..greedy(40) };
        for params in [greedy(40), sampled] {
            let input = input("tell the hell", params);
            let id = engine.admit(&input).unwrap();
            let (text, ids, whole) = run_alone(&mut engine, id);
            assert!(ids.len() > 30, "{} tokens", ids.len());
            for taken in [1, 17, ids.len() - 1] {
                let (id, shown) = engine.admit_resuming(&input, &ids[..taken]).unwrap();
                let (rest, rest_ids, resumed) = run_alone(&mut engine, id);
                assert_eq!(format!("{shown}{rest}"), text, "after {taken} tokens");
                assert_eq!(rest_ids, ids[taken..], "only the rest is generated");
                assert_eq!(text_of(&resumed), text_of(&whole));
                assert_eq!(resumed.metrics.completion_tokens, whole.metrics.completion_tokens);
                assert_eq!(resumed.metrics.prompt_tokens, whole.metrics.prompt_tokens);
            }
        }
        assert!(engine.admit_resuming(&input("hi", greedy(4)), &[u32::MAX]).is_err());
    }

    #[test]
    fn batched_sequences_equal_their_solo_runs_whenever_they_join() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen2.gguf");
        write_tiny_qwen2(&path);
        let sampled = SamplingParams { temperature: 0.9, top_p: Some(0.9), max_tokens: 40, seed: 5, ..greedy(40) };
        let inputs = [
            input("hello", greedy(40)),
            input(&"tell the hell ".repeat(6), greedy(30)),
            input("the", sampled.clone()),
            input("hello hello", SamplingParams { max_tokens: 25, ..sampled }),
        ];
        let mut solo = ChatEngine::load(&path, ChatOptions::new(4096, 1, 1)).unwrap();
        solo.set_ignore_eos(true);
        let alone: Vec<String> = inputs.iter().map(|i| tokens_of(&mut solo, i).0).collect();

        // Four sequences on two threads, arriving at different steps, prompts
        // fed in chunks of 7 rows beside the others' decode rows.
        let options = ChatOptions { step_tokens: 7, ..ChatOptions::new(4096, 4, 2) };
        let mut batched = ChatEngine::load(&path, options).unwrap();
        batched.set_ignore_eos(true);
        let mut ids = Vec::new();
        let mut texts: HashMap<SequenceId, String> = HashMap::new();
        let mut done = HashMap::new();
        for step in 0.. {
            if step % 3 == 0 && ids.len() < inputs.len() {
                ids.push(batched.admit(&inputs[ids.len()]).unwrap());
            }
            for (id, event) in batched.step(&|_| false) {
                match event {
                    SequenceEvent::Text { text, .. } => texts.entry(id).or_default().push_str(&text),
                    SequenceEvent::Finished(outcome) => {
                        done.insert(id, text_of(&outcome.unwrap()).to_string());
                    }
                }
            }
            if done.len() == inputs.len() {
                break;
            }
        }
        assert_eq!(batched.running(), 0);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(done[id], alone[i], "sequence {i}");
            assert_eq!(texts[id], alone[i], "streamed text of sequence {i}");
        }
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

//! `natter-worker bench`: single-stream chat speed on the real engine, printed as
//! a table. A benchmark, not a test: figures depend on the machine.

use crate::chat::{ChatEngine, ChatOptions};
use crate::config::{ConfigLoadError, Loaded};
use crate::fetch;
use clap::Args;
use natter_shared::config::KvCacheType;
use natter_shared::proto::{ChatInput, ChatMessage, JobKind, Role, SamplingParams};

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Catalog id (default: the default chat model).
    #[arg(long)]
    pub model: Option<String>,
    /// Inference threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Prompt length in tokens (after the chat template).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Measured repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Concurrent streams for the batched figures (0 skips them).
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Prompt length of each concurrent stream.
    #[arg(long, default_value_t = 64)]
    pub stream_prompt_tokens: usize,
    /// Context depths at which decode speed is measured (0 skips them).
    #[arg(long, value_delimiter = ',', default_value = "100,2000")]
    pub depths: Vec<usize>,
}

#[derive(Args, Clone, Debug)]
pub struct BenchAsrArgs {
    /// Audio files (any format the worker decodes).
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Catalog id (default: the default speech-to-text model).
    #[arg(long)]
    pub model: Option<String>,
    /// Inference threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Language hint (ISO code); detected when absent.
    #[arg(long)]
    pub language: Option<String>,
    /// Translate to English instead of transcribing.
    #[arg(long)]
    pub translate: bool,
    /// Measured repetitions per file (after one warm-up run of the first file).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Print each segment as it is decoded.
    #[arg(long)]
    pub segments: bool,
}

#[derive(Args, Clone, Debug)]
pub struct BenchOcrArgs {
    /// Images, or directories of them; `NAME.txt` beside `NAME.png` holds the
    /// expected text, for the character error rate.
    #[arg(required = true)]
    pub paths: Vec<std::path::PathBuf>,
    /// Catalog id (default: the default OCR model).
    #[arg(long)]
    pub model: Option<String>,
    /// Inference threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Measured repetitions per image (after one warm-up run of each).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print one JSON object per image instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone, Debug)]
pub struct BenchNerArgs {
    /// Catalog id (default: the default NER model).
    #[arg(long)]
    pub model: Option<String>,
    /// Inference threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Input lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub tokens: Vec<usize>,
    /// Measured repetitions per length (after one warm-up).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
}

/// The sentence NER benchmarks repeat; `scripts/bench_ner_onnxruntime.py` uses the same.
pub const NER_SENTENCE: &str = "Maria Gonzalez moved from 42 Oak Street in Springfield to Boston; write to maria.gonzalez@example.com or call 555-0134. ";

pub fn run_ner(args: &BenchNerArgs, loaded: &Loaded) -> Result<(), BenchError> {
    let (entry, path) = fetched_model(loaded, args.model.as_deref(), JobKind::Ner)?;
    let engine = crate::ner::NerEngine::load(&path).map_err(BenchError::Engine)?;
    println!("model {} ({}), {} threads, {} runs after one warm-up", entry.id, path.display(), args.threads, args.runs);
    println!("| tokens | mean latency ms | texts/s | entities |");
    println!("|---:|---:|---:|---:|");
    for &target in &args.tokens {
        // The shortest repetition of the sentence reaching `target` tokens, cut to it.
        let mut text = String::new();
        while engine.token_count(&text) < target {
            text.push_str(NER_SENTENCE);
        }
        let words: Vec<&str> = text.split(' ').collect();
        let (mut lo, mut hi) = (1, words.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if engine.token_count(&words[..mid].join(" ")) < target {
                lo = mid + 1
            } else {
                hi = mid
            }
        }
        let text = words[..lo].join(" ");
        let tokens = engine.token_count(&text);
        let (entities, _) = engine.entities(&text).map_err(|e| BenchError::Engine(e.to_string()))?;
        let started = std::time::Instant::now();
        for _ in 0..args.runs {
            engine.entities(&text).map_err(|e| BenchError::Engine(e.to_string()))?;
        }
        let mean = started.elapsed().as_secs_f64() / args.runs as f64;
        println!("| {tokens} | {:.1} | {:.1} | {} |", mean * 1e3, 1.0 / mean, entities.len());
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Boxed: the loading error is large beside the others.
    #[error(transparent)]
    Config(Box<ConfigLoadError>),
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error("{0}")]
    Engine(String),
}

impl From<ConfigLoadError> for BenchError {
    fn from(e: ConfigLoadError) -> Self {
        BenchError::Config(Box::new(e))
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(args: &BenchArgs, loaded: &Loaded) -> Result<(), BenchError> {
    let (entry, path) = fetched_model(loaded, args.model.as_deref(), JobKind::Chat)?;
    let window =
        (args.prompt_tokens.max(args.depths.iter().copied().max().unwrap_or(0)) + 2 * args.gen_tokens as usize + 64)
            .max(4096);
    let load_with = |batch: usize, kv_cache: KvCacheType| -> Result<ChatEngine, BenchError> {
        let options = ChatOptions { kv_cache, ..ChatOptions::new(window, batch, args.threads) };
        let mut engine = ChatEngine::load(&path, options).map_err(BenchError::Engine)?;
        engine.set_ignore_eos(true);
        Ok(engine)
    };
    let load = |batch: usize| load_with(batch, KvCacheType::default());
    let mut engine = load(1)?;
    let engine_name = if engine.is_native() { "native" } else { "candle stock" };
    let request = |engine: &ChatEngine, prompt_tokens: usize, gen: u32| -> Result<ChatInput, BenchError> {
        Ok(ChatInput {
            messages: vec![ChatMessage { role: Role::User, content: prompt_of_length(engine, prompt_tokens)? }],
            params: SamplingParams { temperature: 0.0, max_tokens: gen, repeat_penalty: 1.0, ..Default::default() },
        })
    };
    let input = request(&engine, args.prompt_tokens, args.gen_tokens)?;
    let mut rows = Vec::new();
    for i in 0..=args.runs {
        let done = engine.generate(&input, &|| false, &mut |_| {}).map_err(|e| BenchError::Engine(e.to_string()))?;
        if i > 0 {
            rows.push(done.metrics);
        }
    }
    let mean = |f: &dyn Fn(&natter_shared::proto::Metrics) -> f64| rows.iter().map(f).sum::<f64>() / rows.len() as f64;
    println!(
        "model {} ({}), {engine_name} engine, {} threads, {} runs after one warm-up",
        entry.id,
        path.display(),
        args.threads,
        args.runs
    );
    println!("| prompt tokens | generated | TTFT ms | prompt tok/s | decode tok/s | peak RSS MB |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} |",
        rows[0].prompt_tokens,
        rows[0].completion_tokens,
        mean(&|m| m.time_to_first_token_ms.unwrap_or(0.0)),
        mean(&|m| m.prompt_tokens_per_s.unwrap_or(0.0)),
        mean(&|m| m.decode_tokens_per_s.unwrap_or(0.0)),
        peak_rss_mb()
    );

    let depths: Vec<usize> = args.depths.iter().copied().filter(|&d| d > 0).collect();
    if !depths.is_empty() {
        println!();
        // Every KV cache type, on the same prompts: at long contexts decoding
        // reads the cache as well as the weights. One engine at a time, so
        // the peak memory figures stay those of one engine.
        let decode = |engine: &mut ChatEngine, depth: usize| -> Result<(u32, f64), BenchError> {
            let input = request(engine, depth, 32)?;
            let done =
                engine.generate(&input, &|| false, &mut |_| {}).map_err(|e| BenchError::Engine(e.to_string()))?;
            Ok((done.metrics.prompt_tokens, done.metrics.decode_tokens_per_s.unwrap_or(0.0)))
        };
        // The depths take turns, `runs` rounds, and each reports its median:
        // on a shared machine the speed drifts over seconds, and a ratio of
        // two depths measured minutes apart would mostly measure the drift.
        let rounds = |engine: &mut ChatEngine| -> Result<Vec<(u32, f64)>, BenchError> {
            let mut rates = vec![Vec::new(); depths.len()];
            let mut tokens = vec![0; depths.len()];
            for _ in 0..args.runs.max(1) {
                for (i, &d) in depths.iter().enumerate() {
                    let (prompt, rate) = decode(engine, d)?;
                    tokens[i] = prompt;
                    rates[i].push(rate);
                }
            }
            Ok(tokens.into_iter().zip(rates.into_iter().map(median)).collect())
        };
        let default = rounds(&mut engine)?;
        let native = engine.is_native();
        drop(engine);
        // The other two types, on the native pass (the stock path has no choice).
        let mut others = Vec::new();
        if native {
            for kind in [KvCacheType::F16, KvCacheType::Q8] {
                let mut engine = load_with(1, kind)?;
                others.push(rounds(&mut engine)?.into_iter().map(|(_, rate)| rate).collect::<Vec<f64>>());
            }
        }
        println!("| context depth | decode tok/s (32 tokens), mixed KV cache (default) | f16 KV cache | q8 KV cache |");
        println!("|---:|---:|---:|---:|");
        for (i, (tokens, rate)) in default.iter().enumerate() {
            let other = |k: usize| others.get(k).map_or_else(|| "-".to_string(), |rates| format!("{:.1}", rates[i]));
            println!("| {tokens} | {rate:.1} | {} | {} |", other(0), other(1));
        }
    } else {
        drop(engine);
    }

    if args.streams > 1 {
        let mut engine = load(args.streams)?;
        if engine.slots() < args.streams {
            println!("\n(this model runs on candle's stock path, one stream at a time; no batched figures)");
            return Ok(());
        }
        let input = request(&engine, args.stream_prompt_tokens, args.gen_tokens)?;
        // One stream alone, then all at once, taking turns for `runs` rounds:
        // the ratio of the two is then not the drift of a shared machine
        // between a single-stream run and a batched run minutes later.
        let (mut single, mut idle_ttft) = (Vec::new(), Vec::new());
        let (mut whole, mut decode, mut generated, mut input_tokens) = (Vec::new(), Vec::new(), 0, 0);
        for _ in 0..args.runs.max(1) {
            let alone =
                engine.generate(&input, &|| false, &mut |_| {}).map_err(|e| BenchError::Engine(e.to_string()))?;
            input_tokens = alone.metrics.prompt_tokens;
            single.push(alone.metrics.decode_tokens_per_s.unwrap_or(0.0));
            idle_ttft.push(alone.metrics.time_to_first_token_ms.unwrap_or(0.0));
            let batch = all_at_once(&mut engine, &input, args.streams)?;
            generated = batch.generated;
            whole.push(batch.generated as f64 / batch.wall_s);
            decode.push((batch.generated - args.streams) as f64 / batch.decode_s);
        }
        let (single, decode) = (median(single), median(decode));

        // One request arriving while the others stream.
        let long = request(&engine, args.stream_prompt_tokens, args.gen_tokens * 2)?;
        for _ in 1..args.streams {
            engine.admit(&long).map_err(|e| BenchError::Engine(e.to_string()))?;
        }
        for _ in 0..8 {
            engine.step(&|_| false);
        }
        let arrived = std::time::Instant::now();
        let late = engine.admit(&input).map_err(|e| BenchError::Engine(e.to_string()))?;
        let mut loaded_ttft = None;
        while loaded_ttft.is_none() {
            for (id, event) in engine.step(&|_| false) {
                if id == late && matches!(event, crate::chat::SequenceEvent::Text { .. }) {
                    loaded_ttft = Some(arrived.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        println!();
        println!(
            "| streams | prompt tokens each | generated | aggregate tok/s (whole run) | aggregate decode tok/s | one stream decode tok/s | × one stream | TTFT idle ms | TTFT with {} streaming ms | peak RSS MB |",
            args.streams - 1
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.0} |",
            args.streams,
            input_tokens,
            generated,
            median(whole),
            decode,
            single,
            decode / single,
            median(idle_ttft),
            loaded_ttft.unwrap_or(0.0),
            peak_rss_mb()
        );
    }
    Ok(())
}

/// What one run of `streams` copies of a request, admitted at once, did.
struct BatchRun {
    generated: usize,
    wall_s: f64,
    /// From the moment every stream has its first token to the end.
    decode_s: f64,
}

fn all_at_once(engine: &mut ChatEngine, input: &ChatInput, streams: usize) -> Result<BatchRun, BenchError> {
    let started = std::time::Instant::now();
    for _ in 0..streams {
        engine.admit(input).map_err(|e| BenchError::Engine(e.to_string()))?;
    }
    let mut generated = 0usize;
    let mut answering = std::collections::HashSet::new();
    let mut first_all = None;
    while engine.running() > 0 {
        for (id, event) in engine.step(&|_| false) {
            match event {
                crate::chat::SequenceEvent::Finished(Ok(done)) => generated += done.metrics.completion_tokens as usize,
                _ => {
                    answering.insert(id);
                }
            }
        }
        if answering.len() == streams {
            first_all.get_or_insert_with(std::time::Instant::now);
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let decode_s = first_all.map_or(wall_s, |t| t.elapsed().as_secs_f64());
    Ok(BatchRun { generated, wall_s, decode_s })
}

/// The named catalog model (or the default of `kind`) and its fetched path.
fn fetched_model<'a>(
    loaded: &'a Loaded,
    model: Option<&str>,
    kind: JobKind,
) -> Result<(&'a natter_shared::catalog::ModelEntry, std::path::PathBuf), BenchError> {
    let entry = match model {
        Some(id) => {
            loaded.catalog.get(id).ok_or_else(|| BenchError::Engine(format!("model `{id}` is not in the catalog")))?
        }
        None => loaded.catalog.default_for(kind).ok_or(ConfigLoadError::NoDefault)?,
    };
    Ok((entry, fetch::resolve(entry, &loaded.models_dir)?))
}

/// A user message whose templated prompt is about `target` tokens long.
fn prompt_of_length(engine: &ChatEngine, target: usize) -> Result<String, BenchError> {
    const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank. ";
    let len = |n: usize| {
        let msg = ChatMessage { role: Role::User, content: SENTENCE.repeat(n) };
        engine.build_prompt(&[msg], 1).map(|p| p.tokens.len()).map_err(|e| BenchError::Engine(e.to_string()))
    };
    let (mut lo, mut hi) = (1usize, 1usize);
    while len(hi)? < target {
        hi *= 2;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if len(mid)? < target {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(SENTENCE.repeat(lo))
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Transcribes files and prints the real-time factor (processing time over audio
/// duration) of each, with its transcript.
/// Character error rate: edit distance over the expected length, with runs of
/// whitespace counted as one space (layouts differ in how they space words;
/// the text is what is judged).
pub fn character_error_rate(expected: &str, got: &str) -> f64 {
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").chars().collect::<Vec<char>>();
    let (a, b) = (norm(expected), norm(got));
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut diagonal = row[0];
        row[0] = i;
        for j in 1..=b.len() {
            let substitution = diagonal + usize::from(a[i - 1] != b[j - 1]);
            diagonal = row[j];
            row[j] = substitution.min(row[j] + 1).min(row[j - 1] + 1);
        }
    }
    row[b.len()] as f64 / a.len().max(1) as f64
}

fn image_files(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>, BenchError> {
    let is_image = |p: &std::path::Path| {
        let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        ["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"].contains(&ext.as_str())
    };
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(|e| BenchError::Engine(format!("{}: {e}", path.display())))?;
            let mut found: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_image(p)).collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

pub fn run_ocr(args: &BenchOcrArgs, loaded: &Loaded) -> Result<(), BenchError> {
    use crate::ocr::{image::DEFAULT_MAX_PIXELS, OcrEngine, Variant};
    let (entry, path) = fetched_model(loaded, args.model.as_deref(), JobKind::Ocr)?;
    let variant = Variant::from_arch(&entry.arch).map_err(BenchError::Engine)?;
    let engine = OcrEngine::load(&path, variant, DEFAULT_MAX_PIXELS).map_err(BenchError::Engine)?;
    let files = image_files(&args.paths)?;
    if !args.json {
        println!(
            "model {} ({}), {} threads, mean of {} runs after one warm-up",
            entry.id,
            path.display(),
            args.threads,
            args.runs
        );
        println!("| image | pixels | lines | ms | decode / detect / classify / recognize ms | CER | text |");
        println!("|---|---:|---:|---:|---|---:|---|");
    }
    for file in files {
        let data = std::fs::read(&file).map_err(|e| BenchError::Engine(format!("{}: {e}", file.display())))?;
        let expected = std::fs::read_to_string(file.with_extension("txt")).ok();
        let read =
            || engine.read(&data, |_| {}, || false).map_err(|e| BenchError::Engine(format!("{}: {e}", file.display())));
        // The warm-up run also optimizes the networks for this image's sizes.
        let mut reading = read()?;
        let started = std::time::Instant::now();
        for _ in 0..args.runs.max(1) {
            reading = read()?;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / args.runs.max(1) as f64;
        let cer = expected.as_deref().map(|e| character_error_rate(e, &reading.text));
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if args.json {
            let line = serde_json::json!({"image": name, "ms": ms, "cer": cer, "text": reading.text, "lines": reading.lines.len()});
            println!("{line}");
            continue;
        }
        let t = &reading.timings;
        let mut text = reading.text.replace('|', "/").replace('\n', " / ");
        if text.chars().count() > 60 {
            text = text.chars().take(57).collect::<String>() + "...";
        }
        println!(
            "| {name} | {}x{} | {} | {ms:.1} | {:.1} / {:.1} / {:.1} / {:.1} | {} | {text} |",
            reading.width,
            reading.height,
            reading.lines.len(),
            t.decode_ms,
            t.detect_ms,
            t.classify_ms,
            t.recognize_ms,
            cer.map(|c| format!("{:.2}%", c * 100.0)).unwrap_or_else(|| "-".into()),
        );
    }
    if !args.json {
        println!("peak RSS {:.0} MB", peak_rss_mb());
    }
    Ok(())
}

pub fn run_asr(args: &BenchAsrArgs, loaded: &Loaded) -> Result<(), BenchError> {
    use crate::asr::{transcribe::Request, AsrEngine, CLI_MAX_SECONDS};
    let (entry, path) = fetched_model(loaded, args.model.as_deref(), JobKind::Asr)?;
    let engine = AsrEngine::load(&path, CLI_MAX_SECONDS).map_err(BenchError::Engine)?;
    let task = if args.translate { natter_shared::proto::AsrTask::Translate } else { Default::default() };
    let request = Request { task, language: args.language.as_deref() };
    let transcribe = |file: &std::path::Path, show: bool| -> Result<_, BenchError> {
        let data = std::fs::read(file).map_err(|e| BenchError::Engine(format!("{}: {e}", file.display())))?;
        let started = std::time::Instant::now();
        let print = |s: &natter_shared::proto::Segment| {
            if show {
                eprintln!("[{:>7.2} -> {:>7.2}] {}", s.start, s.end, s.text.trim());
            }
        };
        let (transcript, seconds) = engine
            .transcribe(&data, None, &request, print, || false)
            .map_err(|e| BenchError::Engine(format!("{}: {e}", file.display())))?;
        Ok((transcript, seconds, started.elapsed().as_secs_f64()))
    };
    transcribe(&args.files[0], false)?;
    println!(
        "model {} ({}), {} threads, best of {} runs after one warm-up",
        entry.id,
        path.display(),
        args.threads,
        args.runs
    );
    println!("| file | audio s | wall s | real-time factor | language | transcript |");
    println!("|---|---:|---:|---:|---|---|");
    for file in &args.files {
        let mut best: Option<(crate::asr::transcribe::Transcript, f64, f64)> = None;
        for run in 0..args.runs.max(1) {
            let outcome = transcribe(file, args.segments && run == 0)?;
            if best.as_ref().is_none_or(|b| outcome.2 < b.2) {
                best = Some(outcome);
            }
        }
        let (transcript, seconds, wall) = best.expect("at least one run");
        let mut text = transcript.text.replace('|', "/");
        if text.chars().count() > 80 {
            text = text.chars().take(77).collect::<String>() + "...";
        }
        println!(
            "| {} | {:.1} | {:.2} | {:.3} | {} | {} |",
            file.file_name().unwrap_or_default().to_string_lossy(),
            seconds,
            wall,
            wall / seconds,
            transcript.language.as_deref().unwrap_or("-"),
            text
        );
    }
    println!("peak RSS {:.0} MB", peak_rss_mb());
    Ok(())
}

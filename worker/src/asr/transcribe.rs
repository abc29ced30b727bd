//! Whisper's long-form transcription loop: 30-second windows, timestamp tokens
//! that cut each window into segments and say where the next window starts, and
//! the usual safeguards against hallucination (no-speech probability, average
//! log-probability and compression-ratio checks with temperature fallback).

use super::mel::{HOP, SAMPLE_RATE, WINDOW_FRAMES};
use super::model::{AudioContext, DecoderState, Whisper};
use candle_core::{Device, IndexOp, Tensor};
use natter_shared::proto::{AsrTask, Segment};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::{rngs::StdRng, SeedableRng};
use std::io::Write;
use tokenizers::Tokenizer;

const TEMPERATURES: [f32; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
const NO_SPEECH_THRESHOLD: f32 = 0.6;
const LOGPROB_THRESHOLD: f32 = -1.0;
const COMPRESSION_RATIO_THRESHOLD: f32 = 2.4;
/// Seconds per timestamp token, and mel frames per timestamp token.
const TIME_PRECISION: f64 = 0.02;
const FRAMES_PER_TIMESTAMP: usize = 2;
/// The first timestamp of a window may be at most 1 s in.
const MAX_INITIAL_TIMESTAMP: u32 = 50;
/// Samples whose peak stays below this are digital silence and are not decoded.
const SILENCE_PEAK: f32 = 1e-3;

#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("the tokenizer lacks the special token {0}")]
    MissingToken(&'static str),
    #[error("unknown language `{0}`")]
    UnknownLanguage(String),
    #[error("this model understands English only")]
    EnglishOnly,
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Token ids that steer Whisper's decoder.
pub struct Specials {
    eot: u32,
    sot: u32,
    translate: u32,
    transcribe: u32,
    start_of_prev: u32,
    no_speech: u32,
    timestamp_begin: u32,
    /// (code, token id) of every language the model knows; empty for `.en` models.
    languages: Vec<(String, u32)>,
    suppress: Vec<u32>,
    suppress_at_begin: Vec<u32>,
}

impl Specials {
    pub fn new(tokenizer: &Tokenizer, model: &Whisper) -> Result<Self, TranscribeError> {
        let id = |name: &'static str| tokenizer.token_to_id(name).ok_or(TranscribeError::MissingToken(name));
        let eot = id("<|endoftext|>")?;
        let sot = id("<|startoftranscript|>")?;
        let translate = id("<|translate|>")?;
        let transcribe = id("<|transcribe|>")?;
        let start_of_lm = id("<|startoflm|>")?;
        let start_of_prev = id("<|startofprev|>")?;
        let no_speech = id("<|nospeech|>").or_else(|_| id("<|nocaptions|>"))?;
        let no_timestamps = id("<|notimestamps|>")?;
        // English-only checkpoints (exactly 51,864 tokens) were trained without
        // language and task tokens, though their vocabulary lists them.
        let multilingual = model.config.vocab_size != 51_864;
        let languages = if multilingual {
            (sot + 1..translate)
                .filter_map(|token| {
                    let text = tokenizer.id_to_token(token)?;
                    let code = text.strip_prefix("<|")?.strip_suffix("|>")?;
                    Some((code.to_string(), token))
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut suppress = model.config.suppress_tokens.clone();
        suppress.extend([translate, transcribe, sot, start_of_prev, start_of_lm, no_speech, no_timestamps]);
        suppress.retain(|&t| (t as usize) < model.config.vocab_size);
        let mut suppress_at_begin = model.config.begin_suppress_tokens.clone();
        if suppress_at_begin.is_empty() {
            suppress_at_begin = tokenizer.encode(" ", false).map(|e| e.get_ids().to_vec()).unwrap_or_default();
            suppress_at_begin.push(eot);
        }
        Ok(Specials {
            eot,
            sot,
            translate,
            transcribe,
            start_of_prev,
            no_speech,
            timestamp_begin: no_timestamps + 1,
            languages,
            suppress,
            suppress_at_begin,
        })
    }

    pub fn multilingual(&self) -> bool {
        !self.languages.is_empty()
    }
}

pub struct Request<'a> {
    pub task: AsrTask,
    pub language: Option<&'a str>,
}

#[derive(Debug)]
pub struct Transcript {
    pub text: String,
    pub language: Option<String>,
    pub segments: Vec<Segment>,
    pub tokens: usize,
}

/// One window's decoding outcome.
struct Decoded {
    tokens: Vec<u32>,
    avg_logprob: f32,
    no_speech_prob: f32,
    compression_ratio: f32,
    temperature: f32,
}

pub struct Transcriber<'a> {
    pub model: &'a Whisper,
    pub tokenizer: &'a Tokenizer,
    pub specials: &'a Specials,
}

impl Transcriber<'_> {
    /// Transcribes `samples` (16 kHz mono) given their log-mel frames, calling
    /// `on_segment` as each segment is finished and `cancelled` between steps.
    pub fn run(
        &self,
        samples: &[f32],
        mel: &[f32],
        mel_frames: usize,
        request: &Request,
        mut on_segment: impl FnMut(&Segment),
        cancelled: impl Fn() -> bool,
    ) -> Result<Transcript, TranscribeError> {
        let specials = self.specials;
        let n_mels = self.model.config.num_mel_bins;
        let mut language = match request.language {
            Some(code) if specials.multilingual() => Some(
                specials
                    .languages
                    .iter()
                    .find(|(c, _)| c.eq_ignore_ascii_case(code))
                    .ok_or_else(|| TranscribeError::UnknownLanguage(code.into()))?
                    .clone(),
            ),
            Some(code) if !code.eq_ignore_ascii_case("en") => return Err(TranscribeError::EnglishOnly),
            _ => None,
        };
        let content_frames = samples.len() / HOP;
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut seek = 0usize;
        let mut context: Vec<u32> = Vec::new();
        let mut segments = Vec::new();
        let mut total_tokens = 0;
        while seek < content_frames {
            if cancelled() {
                return Err(TranscribeError::Cancelled);
            }
            let window_frames = WINDOW_FRAMES.min(content_frames - seek);
            let time_offset = (seek * HOP) as f64 / SAMPLE_RATE as f64;
            let window_samples = &samples[seek * HOP..((seek + window_frames) * HOP).min(samples.len())];
            if window_samples.iter().all(|s| s.abs() < SILENCE_PEAK) {
                seek += window_frames;
                continue;
            }
            let window = window_of(mel, mel_frames, n_mels, seek)?;
            let features = self.model.encoder.forward(&window)?;
            let audio = self.model.decoder.audio_context(&features)?;
            if language.is_none() && specials.multilingual() {
                language = Some(self.detect_language(&audio)?);
            }
            let lang_token = language.as_ref().map(|(_, t)| *t);
            let mut accepted = None;
            let mut attempts = Vec::new();
            for &temperature in &TEMPERATURES {
                let result =
                    self.decode(&audio, &context, lang_token, request.task, temperature, &mut rng, &cancelled)?;
                total_tokens += result.tokens.len();
                let looped = result.compression_ratio > COMPRESSION_RATIO_THRESHOLD;
                let unsure = result.avg_logprob < LOGPROB_THRESHOLD;
                // Low confidence is fine where the model says nobody speaks (the
                // window is skipped below), but a repetition loop never is.
                if !looped && (!unsure || result.no_speech_prob > NO_SPEECH_THRESHOLD) {
                    accepted = Some(result);
                    break;
                }
                tracing::debug!(
                    temperature,
                    compression_ratio = result.compression_ratio,
                    avg_logprob = result.avg_logprob,
                    no_speech = result.no_speech_prob,
                    "window needs another attempt"
                );
                attempts.push(result);
            }
            // Every temperature failed its checks: keep the most confident attempt
            // that is not a repetition loop; a window of nothing but loops is
            // noise the model hallucinated over, and is dropped.
            let decoded = match accepted {
                Some(decoded) => decoded,
                None => match attempts
                    .into_iter()
                    .filter(|a| a.compression_ratio <= COMPRESSION_RATIO_THRESHOLD)
                    .max_by(|a, b| a.avg_logprob.total_cmp(&b.avg_logprob))
                {
                    Some(best) => best,
                    None => {
                        seek += window_frames;
                        context.clear();
                        continue;
                    }
                },
            };
            if decoded.no_speech_prob > NO_SPEECH_THRESHOLD && decoded.avg_logprob < LOGPROB_THRESHOLD {
                seek += window_frames;
                continue;
            }
            tracing::debug!(seek, tokens = decoded.tokens.len(), "window decoded");
            let window_end = time_offset + window_frames as f64 * HOP as f64 / SAMPLE_RATE as f64;
            let (pieces, advance) = self.split(&decoded.tokens, window_frames);
            for (start, end, tokens) in pieces {
                let text = self.text(&tokens)?;
                if text.trim().is_empty() {
                    continue;
                }
                let start = (time_offset + start).min(window_end);
                let end = (time_offset + end).clamp(start, window_end);
                let segment = Segment { start: round_ms(start), end: round_ms(end), text };
                on_segment(&segment);
                segments.push(segment);
            }
            seek += advance.max(1);
            // Conditioning on earlier text keeps names and style consistent, but a
            // window that needed a high temperature would pass its errors on.
            if decoded.temperature < 0.5 {
                context.extend(decoded.tokens.iter().copied());
            } else {
                context.clear();
            }
        }
        let text = segments.iter().map(|s| s.text.trim()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" ");
        // A language "detected" in silence or noise means nothing.
        let detected_nothing = segments.is_empty() && request.language.is_none();
        let language = if detected_nothing { None } else { language.map(|(code, _)| code) };
        Ok(Transcript { text, language, segments, tokens: total_tokens })
    }

    fn detect_language(&self, audio: &AudioContext) -> Result<(String, u32), TranscribeError> {
        let mut state = self.model.decoder.start(audio);
        let hidden = self.model.decoder.forward(&[self.specials.sot], &mut state)?;
        let logits = self.model.decoder.logits(&hidden.i(0)?)?;
        let best = self
            .specials
            .languages
            .iter()
            .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
            .expect("multilingual models have languages");
        Ok(best.clone())
    }

    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        audio: &AudioContext,
        context: &[u32],
        language: Option<u32>,
        task: AsrTask,
        temperature: f32,
        rng: &mut StdRng,
        cancelled: &impl Fn() -> bool,
    ) -> Result<Decoded, TranscribeError> {
        let s = self.specials;
        let decoder = &self.model.decoder;
        let max_positions = decoder.max_positions();
        let mut prompt = Vec::new();
        if !context.is_empty() {
            prompt.push(s.start_of_prev);
            let keep = max_positions / 2 - 1;
            prompt.extend_from_slice(&context[context.len().saturating_sub(keep)..]);
        }
        let sot_index = prompt.len();
        prompt.push(s.sot);
        if let Some(language) = language {
            prompt.push(language);
            prompt.push(if task == AsrTask::Translate { s.translate } else { s.transcribe });
        }
        let mut state: DecoderState = decoder.start(audio);
        let hidden = decoder.forward(&prompt, &mut state)?;
        let sot_logits = decoder.logits(&hidden.i(sot_index)?)?;
        let no_speech_prob = softmax_at(&sot_logits, s.no_speech as usize);
        let mut logits = decoder.logits(&hidden.i(prompt.len() - 1)?)?;

        let budget = (max_positions / 2).min(max_positions - prompt.len());
        let mut tokens: Vec<u32> = Vec::new();
        let mut sum_logprob = 0f32;
        for _ in 0..budget {
            if cancelled() {
                return Err(TranscribeError::Cancelled);
            }
            self.filter(&mut logits, &tokens);
            let logprobs = log_softmax(&logits);
            let next = if temperature == 0.0 {
                argmax(&logits)
            } else {
                let weights: Vec<f32> = logprobs.iter().map(|lp| (lp / temperature).exp()).collect();
                match WeightedIndex::new(&weights) {
                    Ok(dist) => dist.sample(rng) as u32,
                    Err(_) => argmax(&logits),
                }
            };
            sum_logprob += logprobs[next as usize];
            if next == s.eot {
                break;
            }
            tokens.push(next);
            if state.len >= max_positions {
                break;
            }
            let hidden = decoder.forward(&[next], &mut state)?;
            logits = decoder.logits(&hidden.i(0)?)?;
        }
        let text = self.text(&tokens)?;
        Ok(Decoded {
            avg_logprob: sum_logprob / (tokens.len() + 1) as f32,
            no_speech_prob,
            compression_ratio: compression_ratio(&text),
            temperature,
            tokens,
        })
    }

    /// Whisper's decoding rules: suppressed tokens, no blank start, and timestamp
    /// tokens that come in pairs, never go backwards, and start within 1 s.
    fn filter(&self, logits: &mut [f32], tokens: &[u32]) {
        let s = self.specials;
        let ts = s.timestamp_begin as usize;
        let eot = s.eot as usize;
        let mask = |logits: &mut [f32], range: std::ops::Range<usize>| {
            let end = range.end.min(logits.len());
            logits[range.start.min(end)..end].fill(f32::NEG_INFINITY);
        };
        for &t in &s.suppress {
            logits[t as usize] = f32::NEG_INFINITY;
        }
        if tokens.is_empty() {
            for &t in &s.suppress_at_begin {
                if (t as usize) < logits.len() {
                    logits[t as usize] = f32::NEG_INFINITY;
                }
            }
        }
        let is_ts = |t: u32| t >= s.timestamp_begin;
        let last_was_ts = tokens.last().is_some_and(|&t| is_ts(t));
        let penultimate_was_ts = tokens.len() < 2 || is_ts(tokens[tokens.len() - 2]);
        if last_was_ts {
            if penultimate_was_ts {
                mask(logits, ts..logits.len());
            } else {
                mask(logits, 0..eot);
            }
        }
        if let Some(&last_ts) = tokens.iter().rev().find(|&&t| is_ts(t)) {
            let floor = if last_was_ts && !penultimate_was_ts { last_ts } else { last_ts + 1 };
            mask(logits, ts..floor as usize);
        }
        if tokens.is_empty() {
            mask(logits, 0..ts);
            mask(logits, ts + MAX_INITIAL_TIMESTAMP as usize + 1..logits.len());
        }
        // When time is more likely than any single word, emit a timestamp (the
        // softmax normaliser is common to both sides, so raw logits compare).
        let ts_mass = log_sum_exp(&logits[ts..]);
        let best_text = logits[..ts].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if ts_mass > best_text {
            mask(logits, 0..ts);
        }
    }

    /// Cuts a window's tokens into (start, end, tokens) segments at timestamp
    /// pairs; returns them and how many mel frames the window consumed.
    fn split(&self, tokens: &[u32], window_frames: usize) -> (Vec<(f64, f64, Vec<u32>)>, usize) {
        let begin = self.specials.timestamp_begin;
        let is_ts = |t: u32| t >= begin;
        let time = |t: u32| (t - begin) as f64 * TIME_PRECISION;
        let single_ending = tokens.len() >= 2 && !is_ts(tokens[tokens.len() - 2]) && is_ts(tokens[tokens.len() - 1]);
        let mut cuts: Vec<usize> = (1..tokens.len()).filter(|&i| is_ts(tokens[i - 1]) && is_ts(tokens[i])).collect();
        let window_seconds = window_frames as f64 * HOP as f64 / SAMPLE_RATE as f64;
        if cuts.is_empty() {
            let end = match tokens.iter().rev().find(|&&t| is_ts(t)) {
                Some(&t) if t != begin => time(t),
                _ => window_seconds,
            };
            let text = tokens.iter().copied().filter(|&t| !is_ts(t)).collect();
            return (vec![(0.0, end, text)], window_frames);
        }
        if single_ending {
            cuts.push(tokens.len());
        }
        let mut pieces = Vec::new();
        let mut from = 0;
        for &cut in &cuts {
            let slice = &tokens[from..cut];
            if let (Some(&first), Some(&last)) = (slice.first(), slice.last()) {
                let start = if is_ts(first) { time(first) } else { 0.0 };
                let end = if is_ts(last) { time(last) } else { start };
                pieces.push((start, end, slice.iter().copied().filter(|&t| !is_ts(t)).collect()));
            }
            from = cut;
        }
        let advance = if single_ending {
            window_frames
        } else {
            // Resume at the last timestamp: the words after it were cut off.
            (tokens[from - 1] - begin) as usize * FRAMES_PER_TIMESTAMP
        };
        (pieces, advance.min(window_frames))
    }

    fn text(&self, tokens: &[u32]) -> Result<String, TranscribeError> {
        let text: Vec<u32> = tokens.iter().copied().filter(|&t| t < self.specials.eot).collect();
        self.tokenizer.decode(&text, true).map_err(|e| TranscribeError::Tokenizer(e.to_string()))
    }
}

/// `[1, n_mels, 3000]` frames starting at `seek` (the spectrogram carries a
/// window of padding, so the slice is always full).
fn window_of(mel: &[f32], frames: usize, n_mels: usize, seek: usize) -> candle_core::Result<Tensor> {
    let mut window = Vec::with_capacity(n_mels * WINDOW_FRAMES);
    for m in 0..n_mels {
        let row = &mel[m * frames..(m + 1) * frames];
        let end = (seek + WINDOW_FRAMES).min(frames);
        window.extend_from_slice(&row[seek..end]);
        window.resize((m + 1) * WINDOW_FRAMES, row.last().copied().unwrap_or(0.0));
    }
    Tensor::from_vec(window, (1, n_mels, WINDOW_FRAMES), &Device::Cpu)
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn argmax(values: &[f32]) -> u32 {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0)
}

fn log_sum_exp(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let norm = log_sum_exp(logits);
    logits.iter().map(|v| v - norm).collect()
}

fn softmax_at(logits: &[f32], index: usize) -> f32 {
    (logits[index] - log_sum_exp(logits)).exp()
}

/// Text bytes over zlib-compressed bytes: repetitive loops compress very well.
fn compression_ratio(text: &str) -> f32 {
    if text.is_empty() {
        return 0.0;
    }
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).expect("writing to memory");
    let compressed = encoder.finish().expect("writing to memory");
    text.len() as f32 / compressed.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_compress_far_better_than_speech() {
        let speech = "The quick brown fox jumps over the lazy dog while the band plays on.";
        let looped = "Thank you. ".repeat(30);
        assert!(compression_ratio(speech) < COMPRESSION_RATIO_THRESHOLD);
        assert!(compression_ratio(&looped) > COMPRESSION_RATIO_THRESHOLD);
    }

    #[test]
    fn window_slices_are_padded_to_thirty_seconds() {
        let (n_mels, frames) = (2, 3100);
        let mel: Vec<f32> = (0..n_mels * frames).map(|i| i as f32).collect();
        let w = window_of(&mel, frames, n_mels, 3000).unwrap();
        assert_eq!(w.dims(), &[1, 2, 3000]);
        let row1: Vec<f32> = w.i((0, 1)).unwrap().to_vec1().unwrap();
        assert_eq!(row1[0], (frames + 3000) as f32);
        assert_eq!(row1[99], (2 * frames - 1) as f32);
        assert_eq!(row1[2999], (2 * frames - 1) as f32);
    }
}

//! The speech-to-text engine: Whisper on candle, fed by a Rust audio decoder.
//!
//! A job's audio is decoded and resampled to 16 kHz mono ([`audio`]), turned into
//! log-mel frames ([`mel`]) and transcribed window by window ([`transcribe`]);
//! each finished segment is streamed as a `segment` event while later windows
//! are still being decoded.

pub mod audio;
pub mod ct2;
pub(crate) mod kernels;
pub mod mel;
pub mod model;
pub mod transcribe;

use crate::engine::{Completed, Engine, EngineError, JobContext};
use audio::AudioError;
use candle_core::Device;
use candle_nn::VarBuilder;
use mel::MelSpectrogram;
use model::{Config, Whisper};
use natter_shared::proto::{Blob, ErrorCode, EventBody, Job, JobInput, JobResult, Metrics, Segment};
use std::path::Path;
use std::time::Instant;
use tokenizers::Tokenizer;
use transcribe::{Request, Specials, TranscribeError, Transcriber, Transcript};

pub struct AsrEngine {
    model: Whisper,
    tokenizer: Tokenizer,
    specials: Specials,
    mel: MelSpectrogram,
    max_seconds: f64,
}

/// Longest audio `natter-worker transcribe` and the benchmark accept.
pub const CLI_MAX_SECONDS: f64 = 4.0 * 3600.0;

impl AsrEngine {
    /// Loads a Whisper directory in Hugging Face layout: config.json,
    /// model.safetensors and tokenizer.json.
    pub fn load(dir: &Path, max_seconds: f64) -> Result<Self, String> {
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()));
        let config: Config = serde_json::from_slice(&read("config.json")?).map_err(|e| format!("config.json: {e}"))?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| format!("tokenizer.json: {e}"))?;
        let weights = dir.join("model.safetensors");
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], model::DTYPE, &Device::Cpu) }
            .map_err(|e| format!("model.safetensors: {e}"))?;
        let mel = MelSpectrogram::new(config.num_mel_bins);
        let model = Whisper::load(vb, config).map_err(|e| format!("cannot load the Whisper weights: {e}"))?;
        let specials = Specials::new(&tokenizer, &model).map_err(|e| e.to_string())?;
        Ok(AsrEngine { model, tokenizer, specials, mel, max_seconds })
    }

    /// Decodes an audio file and transcribes it; returns the transcript and the
    /// audio's length in seconds.
    pub fn transcribe(
        &self,
        data: &[u8],
        content_type: Option<&str>,
        request: &Request,
        on_segment: impl FnMut(&Segment),
        cancelled: impl Fn() -> bool,
    ) -> Result<(Transcript, f64), AsrError> {
        let audio = audio::decode(data, content_type, self.max_seconds)?;
        tracing::info!(source = %audio.source, seconds = audio.seconds(), "decoded audio");
        if cancelled() {
            return Err(TranscribeError::Cancelled.into());
        }
        let (mel, frames) = self.mel.compute(&audio.samples);
        let transcriber = Transcriber { model: &self.model, tokenizer: &self.tokenizer, specials: &self.specials };
        let transcript = transcriber.run(&audio.samples, &mel, frames, request, on_segment, cancelled)?;
        Ok((transcript, audio.seconds()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AsrError {
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error(transparent)]
    Transcribe(#[from] TranscribeError),
}

impl Engine for AsrEngine {
    fn run(&mut self, job: &Job, ctx: &JobContext) -> Result<Completed, EngineError> {
        let JobInput::Asr(input) = &job.input else {
            return Err(EngineError::bad_input(format!("a speech-to-text worker cannot run {} jobs", job.kind())));
        };
        // The runner has already fetched stored blobs.
        let Blob::Inline { content_type, data } = &input.audio else {
            return Err(EngineError::internal(job, "a stored blob reached the engine"));
        };
        let started = Instant::now();
        let request = Request { task: input.task, language: input.language.as_deref() };
        let (transcript, audio_seconds) = self
            .transcribe(
                data,
                Some(content_type),
                &request,
                |segment| ctx.emit(EventBody::Segment { segment: segment.clone() }),
                || ctx.check_cancelled().is_err(),
            )
            .map_err(|e| match e {
                AsrError::Audio(e @ AudioError::TooLong { .. }) => {
                    EngineError::Failed { code: ErrorCode::TooLarge, message: e.to_string() }
                }
                AsrError::Audio(e) => EngineError::bad_input(e.to_string()),
                AsrError::Transcribe(TranscribeError::Cancelled) => EngineError::Cancelled,
                AsrError::Transcribe(e @ (TranscribeError::UnknownLanguage(_) | TranscribeError::EnglishOnly)) => {
                    EngineError::bad_input(e.to_string())
                }
                AsrError::Transcribe(e) => EngineError::internal(job, e),
            })?;
        let secs = started.elapsed().as_secs_f64();
        let metrics = Metrics {
            prompt_tokens: 0,
            completion_tokens: transcript.tokens as u32,
            time_to_first_token_ms: None,
            prompt_tokens_per_s: None,
            decode_tokens_per_s: (secs > 0.0).then(|| transcript.tokens as f64 / secs),
            audio_seconds: Some(audio_seconds),
            wall_ms: secs * 1e3,
        };
        let result =
            JobResult::Asr { text: transcript.text, language: transcript.language, segments: transcript.segments };
        Ok(Completed { result, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::write_tiny_whisper_ct2;
    use natter_shared::proto::AsrTask;

    fn tiny_engine() -> (tempfile::TempDir, AsrEngine) {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_whisper_ct2(dir.path());
        ct2::convert_dir(dir.path()).unwrap();
        let engine = AsrEngine::load(dir.path(), 600.0).unwrap();
        (dir, engine)
    }

    /// 16-bit mono WAV of a chirp with pauses, `seconds` long.
    fn wav(seconds: f32) -> Vec<u8> {
        let rate = 22_050u32;
        let samples: Vec<i16> = (0..(seconds * rate as f32) as usize)
            .map(|i| {
                let t = i as f32 / rate as f32;
                let on = (t % 3.0) < 2.0;
                if on {
                    ((2.0 * std::f32::consts::PI * (200.0 + 100.0 * t) * t).sin() * 12_000.0) as i16
                } else {
                    0
                }
            })
            .collect();
        audio::wav(&samples, rate, 1)
    }

    #[test]
    fn tiny_model_transcribes_long_audio_window_by_window() {
        let (_dir, engine) = tiny_engine();
        let mut streamed = Vec::new();
        let request = Request { task: AsrTask::Transcribe, language: None };
        let (transcript, seconds) =
            engine.transcribe(&wav(40.0), Some("audio/wav"), &request, |s| streamed.push(s.clone()), || false).unwrap();
        assert!((seconds - 40.0).abs() < 0.01);
        let language = transcript.language.as_deref().unwrap_or("en");
        assert!(language == "en" || language == "de", "{language}");
        assert_eq!(streamed, transcript.segments);
        for pair in transcript.segments.windows(2) {
            assert!(pair[0].start <= pair[1].start, "segments out of order: {pair:?}");
        }
        for s in &transcript.segments {
            assert!(0.0 <= s.start && s.start <= s.end && s.end <= 40.0, "{s:?}");
        }
        assert!(transcript.tokens > 0);
    }

    #[test]
    fn hints_are_checked_and_cancellation_stops_the_job() {
        let (_dir, engine) = tiny_engine();
        let audio = wav(5.0);
        let request = Request { task: AsrTask::Translate, language: Some("xx") };
        let err = engine.transcribe(&audio, None, &request, |_| {}, || false).unwrap_err();
        assert!(matches!(err, AsrError::Transcribe(TranscribeError::UnknownLanguage(_))), "{err}");
        let request = Request { task: AsrTask::Transcribe, language: Some("de") };
        let (transcript, _) = engine.transcribe(&audio, None, &request, |_| {}, || false).unwrap();
        assert_eq!(transcript.language.as_deref(), Some("de"));
        let err = engine.transcribe(&audio, None, &request, |_| {}, || true).unwrap_err();
        assert!(matches!(err, AsrError::Transcribe(TranscribeError::Cancelled)));
    }

    #[test]
    fn digital_silence_gives_an_empty_transcript() {
        let (_dir, engine) = tiny_engine();
        let silence = audio::wav(&vec![0; 22_050 * 20], 22_050, 1);
        let request = Request { task: AsrTask::Transcribe, language: None };
        let (transcript, seconds) = engine.transcribe(&silence, None, &request, |_| {}, || false).unwrap();
        assert!(seconds > 19.0);
        assert_eq!(transcript.text, "");
        assert!(transcript.segments.is_empty());
    }
}

//! The OCR engine: PaddleOCR's PP-OCR networks on tract (pure Rust ONNX).
//!
//! A job's image is decoded upright ([`image`]); DBNet finds the text lines on
//! a downscaled copy ([`detect`]); the lines are put in reading order
//! ([`layout`]), cut out of the full-resolution image, turned right way up
//! when the direction classifier says so, and read by the CTC recognizer
//! ([`recognize`]). Each line is streamed as a `line` event as soon as it is
//! read, in reading order.
//!
//! A model directory holds `det.onnx`, `cls.onnx`, `rec.onnx` and, for
//! PP-OCRv5, `keys.txt` (the recognizer's classes, one per line, blank first);
//! PP-OCRv4 keeps its characters in the recognizer's ONNX metadata.

pub mod detect;
pub mod geometry;
pub mod image;
pub mod layout;
pub mod net;
pub mod recognize;

use crate::engine::{Completed, Engine, EngineError, JobContext};
use ::image::RgbImage;
use detect::DetectParams;
use geometry::Quad;
use layout::Join;
use natter_shared::proto::{Blob, ErrorCode, EventBody, Job, JobInput, JobResult, Metrics, OcrLine, OcrTimings};
use net::Net;
use recognize::{Classifier, ClassifierInput, Recognizer, REC_HEIGHT};
use std::path::Path;
use std::time::Instant;

/// Lines cut, classified and recognised between cancellation checks.
const REC_BATCH: usize = 8;
/// Lines the recognizer is less sure of than this are dropped as noise.
const MIN_CONFIDENCE: f32 = 0.5;

/// The PP-OCR generation, which fixes the classifier's input and where the
/// charset lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    V4,
    V5,
}

impl Variant {
    pub fn from_arch(arch: &str) -> Result<Variant, String> {
        match arch {
            "ppocr-v5" => Ok(Variant::V5),
            "ppocr-v4" => Ok(Variant::V4),
            other => Err(format!("unknown OCR architecture `{other}` (expected ppocr-v5 or ppocr-v4)")),
        }
    }
}

pub struct OcrEngine {
    detector: Net,
    detect_params: DetectParams,
    classifier: Classifier,
    recognizer: Recognizer,
    max_pixels: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OcrError {
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Model(String),
}

/// What an image read as.
#[derive(Clone, Debug)]
pub struct Reading {
    pub text: String,
    pub lines: Vec<OcrLine>,
    pub width: u32,
    pub height: u32,
    pub timings: OcrTimings,
}

impl OcrEngine {
    pub fn load(dir: &Path, variant: Variant, max_pixels: u64) -> Result<OcrEngine, String> {
        // tract multiplies matrices on rayon's global pool, which
        // RAYON_NUM_THREADS (NATTER_THREADS) sizes.
        tract_linalg::multithread::set_default_executor(tract_linalg::multithread::Executor::RayonGlobal);
        let detector = Net::load(&dir.join("det.onnx"), None)?;
        let cls_input = match variant {
            Variant::V5 => ClassifierInput::Stretch { width: 160, height: 80 },
            Variant::V4 => ClassifierInput::Pad { width: 192, height: 48 },
        };
        let (w, h) = cls_input.size();
        let cls = Net::load(&dir.join("cls.onnx"), Some([1, 3, h as usize, w as usize]))?;
        let classifier = Classifier { net: cls, input: cls_input, threshold: 0.9 };
        let rec = Net::load(&dir.join("rec.onnx"), None)?;
        let charset = match variant {
            Variant::V5 => {
                let keys = std::fs::read_to_string(dir.join("keys.txt")).map_err(|e| format!("keys.txt: {e}"))?;
                keys.lines().map(str::to_string).collect()
            }
            Variant::V4 => {
                let chars = rec.metadata.get("character").ok_or("rec.onnx has no `character` metadata")?;
                std::iter::once("blank".to_string())
                    .chain(chars.lines().map(str::to_string))
                    .chain(std::iter::once(" ".to_string()))
                    .collect()
            }
        };
        let recognizer = Recognizer { net: rec, charset };
        // One blank line through the recognizer proves the charset matches
        // its classes, here rather than on a user's first photo.
        recognizer.read(&[RgbImage::from_pixel(REC_HEIGHT * 2, REC_HEIGHT, ::image::Rgb([255, 255, 255]))])?;
        Ok(OcrEngine { detector, detect_params: DetectParams::default(), classifier, recognizer, max_pixels })
    }

    /// Reads the text in an image file, calling `on_line` for every line in
    /// reading order as soon as it is recognised.
    pub fn read(
        &self,
        data: &[u8],
        mut on_line: impl FnMut(&OcrLine),
        cancelled: impl Fn() -> bool,
    ) -> Result<Reading, OcrError> {
        let mut timings = OcrTimings::default();
        let clock = Instant::now();
        let decoded = image::decode(data, self.max_pixels)?;
        let image = decoded.image;
        timings.decode_ms = ms(clock);
        tracing::debug!(format = decoded.format, width = image.width(), height = image.height(), "decoded image");
        if cancelled() {
            return Err(OcrError::Cancelled);
        }

        let clock = Instant::now();
        let quads = detect::detect(&self.detector, &image, &self.detect_params).map_err(OcrError::Model)?;
        let order = layout::reading_order(&quads);
        timings.detect_ms = ms(clock);

        let mut lines = Vec::new();
        let mut text = String::new();
        let mut pending_join = Join::Space;
        for batch in order.chunks(REC_BATCH) {
            if cancelled() {
                return Err(OcrError::Cancelled);
            }
            let clock = Instant::now();
            let mut crops: Vec<RgbImage> =
                batch.iter().map(|&(i, _)| recognize::crop_line(&image, &quads[i])).collect();
            let flips = self.classifier.upside_down(&crops).map_err(OcrError::Model)?;
            for (crop, flip) in crops.iter_mut().zip(flips) {
                if flip {
                    ::image::imageops::rotate180_in_place(crop);
                }
            }
            timings.classify_ms += ms(clock);
            let clock = Instant::now();
            let readings = self.recognizer.read(&crops).map_err(OcrError::Model)?;
            timings.recognize_ms += ms(clock);
            for (&(i, join), reading) in batch.iter().zip(readings) {
                pending_join = pending_join.max(join);
                if reading.confidence < MIN_CONFIDENCE {
                    continue;
                }
                if !text.is_empty() {
                    text.push_str(pending_join.as_str());
                }
                text.push_str(&reading.text);
                pending_join = Join::Space;
                let line = OcrLine { text: reading.text, confidence: reading.confidence, bbox: round_quad(&quads[i]) };
                on_line(&line);
                lines.push(line);
            }
        }
        Ok(Reading { text, lines, width: image.width(), height: image.height(), timings })
    }
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

fn round_quad(q: &Quad) -> [[f32; 2]; 4] {
    q.map(|p| p.map(|v| (v * 10.0).round() / 10.0))
}

impl Engine for OcrEngine {
    fn run(&mut self, job: &Job, ctx: &JobContext) -> Result<Completed, EngineError> {
        let JobInput::Ocr(input) = &job.input else {
            return Err(EngineError::bad_input(format!("an OCR worker cannot run {} jobs", job.kind())));
        };
        // The runner has already fetched stored blobs.
        let Blob::Inline { data, .. } = &input.image else {
            return Err(EngineError::internal(job, "a stored blob reached the engine"));
        };
        let started = Instant::now();
        let reading = self
            .read(data, |line| ctx.emit(EventBody::Line { line: line.clone() }), || ctx.check_cancelled().is_err())
            .map_err(|e| match e {
                OcrError::Image(e @ image::ImageError::TooManyPixels { .. }) => {
                    EngineError::Failed { code: ErrorCode::TooLarge, message: e.to_string() }
                }
                OcrError::Image(e) => EngineError::bad_input(e.to_string()),
                OcrError::Cancelled => EngineError::Cancelled,
                OcrError::Model(e) => EngineError::internal(job, e),
            })?;
        let metrics = Metrics { wall_ms: started.elapsed().as_secs_f64() * 1e3, ..Metrics::default() };
        let result = JobResult::Ocr {
            text: reading.text,
            lines: reading.lines,
            width: reading.width,
            height: reading.height,
            timings: reading.timings,
        };
        Ok(Completed { result, metrics })
    }
}

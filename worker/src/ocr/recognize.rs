//! From a detected box to text: the line is cut out and straightened, turned
//! upright when the direction classifier says it is upside down, and read by
//! the CTC recognizer.

use super::geometry::{distance, warp_quad, Quad};
use super::net::Net;
use image::imageops::FilterType;
use image::RgbImage;

/// Height every line is scaled to for recognition.
pub const REC_HEIGHT: u32 = 48;
/// Longest line fed to the recognizer at once, in pixels after scaling.
const REC_MAX_WIDTH: u32 = 3200;

/// Cuts a text line out of the image as an upright rectangle. Lines much
/// taller than wide are vertical text and are turned a quarter left, as
/// PP-OCR's recognizers expect.
pub fn crop_line(image: &RgbImage, quad: &Quad) -> RgbImage {
    let width = distance(quad[0], quad[1]).max(distance(quad[3], quad[2])).round().max(1.0) as u32;
    let height = distance(quad[0], quad[3]).max(distance(quad[1], quad[2])).round().max(1.0) as u32;
    let crop = warp_quad(image, quad, width, height);
    if height as f32 >= 1.5 * width as f32 {
        image::imageops::rotate270(&crop)
    } else {
        crop
    }
}

/// How the direction classifier wants its input.
#[derive(Clone, Copy, Debug)]
pub enum ClassifierInput {
    /// PP-LCNet (PP-OCRv5): stretched to a fixed size, ImageNet statistics.
    Stretch { width: u32, height: u32 },
    /// PP-OCR mobile v2 (PP-OCRv4): height fixed, width kept up to a maximum
    /// and padded, normalized to [-1, 1].
    Pad { width: u32, height: u32 },
}

pub struct Classifier {
    pub net: Net,
    pub input: ClassifierInput,
    /// Probability of "upside down" needed to flip a line.
    pub threshold: f32,
}

impl ClassifierInput {
    pub fn size(self) -> (u32, u32) {
        match self {
            ClassifierInput::Stretch { width, height } | ClassifierInput::Pad { width, height } => (width, height),
        }
    }
}

impl Classifier {
    /// Whether each line is upside down; one line per call, since the plan
    /// is optimized for exactly one image.
    pub fn upside_down(&self, lines: &[RgbImage]) -> Result<Vec<bool>, String> {
        lines.iter().map(|line| self.is_upside_down(line)).collect()
    }

    fn is_upside_down(&self, line: &RgbImage) -> Result<bool, String> {
        let (shape, data) = match self.input {
            ClassifierInput::Stretch { width, height } => {
                let resized = image::imageops::resize(line, width, height, FilterType::Triangle);
                batch_tensor(std::slice::from_ref(&resized), width, height, Norm::ImageNet)
            }
            ClassifierInput::Pad { width, height } => {
                let resized = resize_to_height(line, height, width);
                batch_tensor(std::slice::from_ref(&resized), width, height, Norm::Symmetric)
            }
        };
        let (_, probs) = self.net.run(shape, data)?;
        Ok(probs.len() == 2 && probs[1] > probs[0] && probs[1] >= self.threshold)
    }
}

pub struct Recognizer {
    pub net: Net,
    /// Class index to text; index 0 is the CTC blank.
    pub charset: Vec<String>,
}

/// One recognised line.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub text: String,
    pub confidence: f32,
}

/// Widths lines are padded up to, so that a few optimized plans serve every
/// line: steps of at most a quarter, so padding costs at most that much.
const REC_WIDTHS: [u32; 21] =
    [64, 96, 128, 160, 192, 240, 288, 352, 416, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2304, 2688, 3200];

impl Recognizer {
    /// Reads upright lines, one network call each.
    pub fn read(&self, lines: &[RgbImage]) -> Result<Vec<Reading>, String> {
        lines.iter().map(|line| self.read_one(line)).collect()
    }

    fn read_one(&self, line: &RgbImage) -> Result<Reading, String> {
        let resized = resize_to_height(line, REC_HEIGHT, REC_MAX_WIDTH);
        let width = REC_WIDTHS.iter().copied().find(|&w| w >= resized.width()).unwrap_or(REC_MAX_WIDTH);
        let (shape, data) = batch_tensor(std::slice::from_ref(&resized), width, REC_HEIGHT, Norm::Symmetric);
        let (shape, probs) = self.net.run(shape, data)?;
        let [1, steps, classes] = shape[..] else {
            return Err(format!("the recognizer gave an output of shape {shape:?}"));
        };
        if classes != self.charset.len() {
            return Err(format!("the recognizer has {classes} classes but the charset {}", self.charset.len()));
        }
        // Steps past the line's own width saw only padding.
        let used = (steps * resized.width() as usize).div_ceil(width as usize).clamp(1, steps);
        Ok(ctc_greedy(&probs[..used * classes], classes, &self.charset))
    }
}

/// Best path decoding: the most likely class per step, repeats merged,
/// blanks dropped. The confidence is the mean probability of the kept
/// characters. Inputs are probabilities; raw scores are softmaxed first.
pub fn ctc_greedy(seq: &[f32], classes: usize, charset: &[String]) -> Reading {
    let mut text = String::new();
    let (mut sum, mut kept) = (0.0f32, 0usize);
    let mut previous = 0usize;
    for step in seq.chunks(classes) {
        let (best, &score) = step.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap_or((0, &0.0));
        let prob = if (0.0..=1.0).contains(&score) {
            score
        } else {
            1.0 / step.iter().map(|&s| (s - score).exp()).sum::<f32>()
        };
        if best != 0 && best != previous {
            text.push_str(&charset[best]);
            sum += prob;
            kept += 1;
        }
        previous = best;
    }
    let text = text.trim().to_string();
    let confidence = if kept == 0 || text.is_empty() { 0.0 } else { sum / kept as f32 };
    Reading { text, confidence }
}

/// Scales a line to `height` keeping its aspect ratio, at most `max_width` wide.
fn resize_to_height(line: &RgbImage, height: u32, max_width: u32) -> RgbImage {
    let ratio = line.width() as f32 / line.height().max(1) as f32;
    let width = ((height as f32 * ratio).ceil() as u32).clamp(1, max_width);
    image::imageops::resize(line, width, height, FilterType::Triangle)
}

#[derive(Clone, Copy)]
enum Norm {
    ImageNet,
    /// (x/255 - 0.5) / 0.5
    Symmetric,
}

/// NCHW, BGR channel order; images narrower than `width` are padded with
/// zeros (mid-grey after normalization), as in training.
fn batch_tensor(images: &[RgbImage], width: u32, height: u32, norm: Norm) -> ([usize; 4], Vec<f32>) {
    let (w, h) = (width as usize, height as usize);
    let mut data = vec![0f32; images.len() * 3 * h * w];
    let (mean, std) = match norm {
        Norm::ImageNet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        Norm::Symmetric => ([0.5; 3], [0.5; 3]),
    };
    for (n, img) in images.iter().enumerate() {
        let base = n * 3 * h * w;
        for (x, y, px) in img.enumerate_pixels() {
            let (x, y) = (x as usize, y as usize);
            if x >= w || y >= h {
                continue;
            }
            for c in 0..3 {
                let value = f32::from(px[2 - c]) / 255.0;
                data[base + c * h * w + y * w + x] = (value - mean[c]) / std[c];
            }
        }
    }
    ([images.len(), 3, h, w], data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctc_merges_repeats_and_drops_blanks() {
        let charset: Vec<String> = ["<blank>", "a", "b", " "].iter().map(|s| s.to_string()).collect();
        // Steps: a a blank a b b space -> "aab" after trimming the space.
        let best = [1, 1, 0, 1, 2, 2, 3];
        let seq: Vec<f32> =
            best.iter().flat_map(|&k| (0..4).map(move |c| if c == k { 0.9 } else { 0.1 / 3.0 })).collect();
        let reading = ctc_greedy(&seq, 4, &charset);
        assert_eq!(reading.text, "aab");
        assert!((reading.confidence - 0.9).abs() < 1e-6);
        let blank = ctc_greedy(&[0.9, 0.05, 0.03, 0.02], 4, &charset);
        assert_eq!((blank.text.as_str(), blank.confidence), ("", 0.0));
    }

    #[test]
    fn raw_scores_are_softmaxed() {
        let charset: Vec<String> = ["<blank>", "x"].iter().map(|s| s.to_string()).collect();
        let reading = ctc_greedy(&[0.0, 3.0], 2, &charset);
        assert_eq!(reading.text, "x");
        assert!((reading.confidence - 1.0 / (1.0 + (-3.0f32).exp())).abs() < 1e-5);
    }

    #[test]
    fn tall_crops_are_turned_to_lie_flat() {
        let image = RgbImage::new(100, 100);
        let crop = crop_line(&image, &[[10.0, 10.0], [20.0, 10.0], [20.0, 60.0], [10.0, 60.0]]);
        assert_eq!(crop.dimensions(), (50, 10));
    }
}

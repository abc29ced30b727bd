//! Text detection: DBNet's probability map turned into one rotated box per
//! text line.
//!
//! The network marks the shrunken core of every text line. Post-processing
//! binarizes the map, takes each connected region, boxes it with the
//! minimum-area rotated rectangle, scores the box by the mean probability
//! inside it, and grows it back by the offset DBNet was trained to shrink by
//! (area x ratio / perimeter). Boxes are then scaled from the detection
//! resolution back to the original image.

use super::geometry::{convex_hull, in_convex_quad, min_area_rect, order_corners, Point, Quad};
use super::net::Net;
use image::imageops::FilterType;
use image::RgbImage;

#[derive(Clone, Debug)]
pub struct DetectParams {
    /// The longer side of the image is brought down to this for detection;
    /// text lines are cut from the full-resolution image afterwards.
    pub max_side: u32,
    /// Probability above which a pixel is text.
    pub threshold: f32,
    /// Mean probability a box needs to be kept.
    pub box_threshold: f32,
    pub unclip_ratio: f32,
    pub max_candidates: usize,
}

impl Default for DetectParams {
    fn default() -> Self {
        DetectParams { max_side: 960, threshold: 0.3, box_threshold: 0.6, unclip_ratio: 1.5, max_candidates: 1000 }
    }
}

/// Normalization the PP-OCR detectors were trained with (ImageNet statistics
/// applied to BGR channels in that order).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Finds text lines; boxes are in `image` pixels.
pub fn detect(net: &Net, image: &RgbImage, params: &DetectParams) -> Result<Vec<Quad>, String> {
    let (w, h) = image.dimensions();
    let scale = (params.max_side as f32 / w.max(h) as f32).min(1.0);
    // The network downsamples by 32.
    let round32 = |v: u32| ((v as f32 * scale / 32.0).round() as u32 * 32).max(32);
    let (dw, dh) = (round32(w), round32(h));
    let resized = image::imageops::resize(image, dw, dh, FilterType::Triangle);
    let plane = (dw * dh) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            // Channel c of the network is BGR order: blue first.
            let value = f32::from(px[2 - c]) / 255.0;
            data[c * plane + i] = (value - MEAN[c]) / STD[c];
        }
    }
    let (shape, probs) = net.run([1, 3, dh as usize, dw as usize], data)?;
    if shape.iter().product::<usize>() != plane {
        return Err(format!("the detector gave a map of shape {shape:?} for a {dw}x{dh} input"));
    }
    let map = ProbMap { probs: &probs, width: dw as usize, height: dh as usize };
    let (sx, sy) = (w as f32 / dw as f32, h as f32 / dh as f32);
    Ok(boxes_from_map(&map, params)
        .into_iter()
        .filter_map(|q| {
            let q = order_corners(q.map(|[x, y]| [(x * sx).clamp(0.0, w as f32), (y * sy).clamp(0.0, h as f32)]));
            let width = super::geometry::distance(q[0], q[1]);
            let height = super::geometry::distance(q[0], q[3]);
            (width > 3.0 && height > 3.0).then_some(q)
        })
        .collect())
}

pub struct ProbMap<'a> {
    pub probs: &'a [f32],
    pub width: usize,
    pub height: usize,
}

/// Boxes in probability-map pixels.
pub fn boxes_from_map(map: &ProbMap, params: &DetectParams) -> Vec<Quad> {
    const MIN_SIZE: f32 = 3.0;
    let (w, h) = (map.width, map.height);
    let mut seen: Vec<bool> = map.probs.iter().map(|&p| p <= params.threshold).collect();
    let mut boxes = Vec::new();
    let mut stack = Vec::new();
    let mut candidates = 0;
    for start in 0..w * h {
        if seen[start] {
            continue;
        }
        candidates += 1;
        if candidates > params.max_candidates {
            break;
        }
        // One 8-connected region; keep each row's leftmost and rightmost
        // pixel, which is all the convex hull needs. The scan meets a region
        // at its top row first, so rows are indexed from there.
        let top = start / w;
        let mut rows: Vec<(usize, usize)> = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            if rows.len() <= y - top {
                rows.resize(y - top + 1, (usize::MAX, 0));
            }
            let row = &mut rows[y - top];
            row.0 = row.0.min(x);
            row.1 = row.1.max(x);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = ny * w + nx;
                    if !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let mut points: Vec<Point> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.0 != usize::MAX)
            .flat_map(|(dy, &(x0, x1))| [[x0 as f32, (top + dy) as f32], [x1 as f32, (top + dy) as f32]])
            .collect();
        let Some(rect) = min_area_rect(&convex_hull(&mut points)) else { continue };
        if rect.short_side() < MIN_SIZE {
            continue;
        }
        let quad = rect.quad();
        if mean_inside(map, &quad) < params.box_threshold {
            continue;
        }
        let [a, b] = rect.size;
        let grown = rect.grown(a * b * params.unclip_ratio / (2.0 * (a + b)));
        if grown.short_side() < MIN_SIZE + 2.0 {
            continue;
        }
        boxes.push(grown.quad());
    }
    boxes
}

/// Mean probability over the pixels inside the quad.
fn mean_inside(map: &ProbMap, quad: &Quad) -> f32 {
    let clamp = |v: f32, hi: usize| (v.max(0.0) as usize).min(hi - 1);
    let x0 = clamp(quad.iter().map(|p| p[0]).fold(f32::MAX, f32::min).floor(), map.width);
    let x1 = clamp(quad.iter().map(|p| p[0]).fold(f32::MIN, f32::max).ceil(), map.width);
    let y0 = clamp(quad.iter().map(|p| p[1]).fold(f32::MAX, f32::min).floor(), map.height);
    let y1 = clamp(quad.iter().map(|p| p[1]).fold(f32::MIN, f32::max).ceil(), map.height);
    let (mut sum, mut n) = (0.0f32, 0usize);
    for y in y0..=y1 {
        for x in x0..=x1 {
            if in_convex_quad(quad, [x as f32, y as f32]) {
                sum += map.probs[y * map.width + x];
                n += 1;
            }
        }
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_region_becomes_one_grown_box() {
        // Two solid bars on a 64x32 map: 30x4 at (5,5) and 20x6 at (30,20).
        let (w, h) = (64, 32);
        let mut probs = vec![0.0f32; w * h];
        for (x0, y0, bw, bh) in [(5, 5, 30, 4), (30, 20, 20, 6)] {
            for y in y0..y0 + bh {
                for x in x0..x0 + bw {
                    probs[y * w + x] = 0.9;
                }
            }
        }
        let map = ProbMap { probs: &probs, width: w, height: h };
        let boxes = boxes_from_map(&map, &DetectParams::default());
        assert_eq!(boxes.len(), 2);
        let first = boxes.iter().find(|q| q[0][1] < 10.0).unwrap();
        // Pixel centers span 29x3; unclip grows each side by 29*3*1.5/64 = 2.04.
        let width = first[1][0] - first[0][0];
        let height = first[3][1] - first[0][1];
        assert!((width - 33.08).abs() < 0.05 && (height - 7.08).abs() < 0.05, "{first:?}");
    }

    #[test]
    fn weak_and_tiny_regions_are_dropped() {
        let (w, h) = (32, 32);
        let mut probs = vec![0.0f32; w * h];
        // A faint bar (mean under the box threshold) and a 2-pixel speck.
        for x in 2..20 {
            for y in 2..8 {
                probs[y * w + x] = 0.4;
            }
        }
        probs[20 * w + 20] = 0.9;
        probs[20 * w + 21] = 0.9;
        let map = ProbMap { probs: &probs, width: w, height: h };
        assert!(boxes_from_map(&map, &DetectParams::default()).is_empty());
    }
}

//! CPU kernels the Whisper forward pass needs faster than candle provides them.
//!
//! The encoder's attention softmax runs over 8 x 1500 x 1500 scores per layer;
//! candle's version calls the scalar `expf` per element. This one uses a
//! branch-free polynomial `exp` and eight-lane accumulators, which the compiler
//! turns into AVX2 code, over row blocks split across candle's threads.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

const LANES: usize = 8;

/// e^x for x <= 0 (softmax inputs after subtracting the row maximum), within a
/// relative error of 1e-6: 2^n * p(r) with x = n ln 2 + r, |r| <= ln2 / 2, and p a degree-6
/// Taylor polynomial.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let underflows = x < -87.0;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts (Cody-Waite), so the reduction stays exact for large |x|.
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    // A select, not a branch: masked (-inf) scores get exactly zero weight.
    if underflows {
        0.0
    } else {
        y
    }
}

/// Max and sum over independent lanes: floating-point reductions only
/// vectorize when the order of operations is spelled out like this.
fn lane_max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a = a.max(*v);
        }
    }
    tail.iter().chain(&acc).copied().fold(f32::NEG_INFINITY, f32::max)
}

fn lane_sum(values: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += *v;
        }
    }
    tail.iter().chain(&acc).sum()
}

fn softmax_rows(src: &[f32], dst: &mut [f32], row: usize) {
    for (s, d) in src.chunks_exact(row).zip(dst.chunks_exact_mut(row)) {
        let max = lane_max(s);
        if max == f32::NEG_INFINITY {
            d.fill(0.0);
            continue;
        }
        for (v, out) in s.iter().zip(d.iter_mut()) {
            *out = exp_nonpositive(v - max);
        }
        let inv = 1.0 / lane_sum(d);
        d.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Softmax over the last dimension of a contiguous f32 tensor.
pub struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "natter-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("natter softmax takes f32") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax input not contiguous")
        };
        let src = &data[start..end];
        let row = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = src.len() / row;
        let mut dst = vec![0f32; src.len()];
        let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
        // Small tensors (decoder steps) are not worth a thread hand-off.
        if threads == 1 || src.len() < 1 << 16 {
            softmax_rows(src, &mut dst, row);
        } else {
            let per = rows.div_ceil(threads) * row;
            std::thread::scope(|scope| {
                for (s, d) in src.chunks(per).zip(dst.chunks_mut(per)) {
                    scope.spawn(move || softmax_rows(s, d, row));
                }
            });
        }
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// One hidden state ([d]) times the transpose of `weight` ([rows, d], f16), as
/// [rows] f32. Whisper's output projection reads its 51,865 x d embedding once
/// per token and is bound by memory, so keeping it in f16 (as the checkpoints
/// store it) halves its cost. Rows are split across candle's threads.
pub fn project_f16(weight: &[half::f16], d: usize, hidden: &[f32]) -> Vec<f32> {
    let rows = weight.len() / d;
    let mut out = vec![0f32; rows];
    let block = |weights: &[half::f16], out: &mut [f32]| {
        let mut row_f32 = vec![0f32; d];
        for (w, o) in weights.chunks_exact(d).zip(out.iter_mut()) {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(w, &mut row_f32);
            *o = dot(&row_f32, hidden);
        }
    };
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (w, o) in weight.chunks(per * d).zip(out.chunks_mut(per)) {
            scope.spawn(move || block(w, o));
        }
    });
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    tail + acc.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn exp_matches_the_standard_library() {
        // Below -87 the result is flushed to zero (e^-87 is near the smallest normal f32).
        for i in 0..=8_700 {
            let x = -(i as f32) * 0.01;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            assert!((fast - exact).abs() <= exact * 1e-6, "exp({x}) = {fast}, expected {exact}");
        }
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softmax_matches_candles_including_masked_entries() {
        let mut values: Vec<f32> = (0..4 * 3001).map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0).collect();
        values[5] = f32::NEG_INFINITY;
        let x = Tensor::from_vec(values, (2, 2, 3001), &Device::Cpu).unwrap();
        let ours: Vec<f32> = x.apply_op1_no_bwd(&SoftmaxLastDim).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let theirs: Vec<f32> = candle_nn::ops::softmax_last_dim(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-9 + b * 1e-5, "{a} vs {b}");
        }
        assert_eq!(ours[5], 0.0);
    }

    #[test]
    fn f16_projection_matches_a_matmul() {
        let (rows, d, n) = (1003, 40, 1);
        let weight: Vec<f32> = (0..rows * d).map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5).collect();
        let hidden: Vec<f32> = (0..n * d).map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5).collect();
        let w = Tensor::from_vec(weight, (rows, d), &Device::Cpu).unwrap().to_dtype(candle_core::DType::F16).unwrap();
        let h = Tensor::from_vec(hidden.clone(), (n, d), &Device::Cpu).unwrap();
        let expected: Vec<f32> = h
            .matmul(&w.to_dtype(candle_core::DType::F32).unwrap().t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours = project_f16(&w.flatten_all().unwrap().to_vec1::<half::f16>().unwrap(), d, &hidden);
        assert_eq!(ours.len(), expected.len());
        for (a, b) in ours.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

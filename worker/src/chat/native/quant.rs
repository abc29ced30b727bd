//! The weight types, the activation quantizers, and f32 weight rows.
//!
//! Weights keep the file's own types: converting 4-bit blocks to Q8_0 would
//! make every decoded token read half as many bytes again, and decoding is bound
//! by memory bandwidth. Quantized matrices live in groups of rows
//! ([`super::grouped`]); f32 matrices (rare in a GGUF) stay row by row.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K, GgmlType};
use candle_core::quantized::GgmlDType;
use half::f16;

/// The weight types the native forward pass reads directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    F32,
    Q8_0,
    Q4_1,
    Q5_0,
    Q4K,
    Q6K,
}

/// How a stage's input is quantized before it meets a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActType {
    F32,
    /// 32-wide blocks of i8, then their absolute values, then an f32 scale
    /// and 16 × the values' sum (i32) per block: Q8_0 weights multiply the
    /// absolute values by sign-adjusted weights, Q5_0's stored `q + 16` take
    /// the sum back off.
    Q8_0,
    /// 32-wide blocks of i8, then an f32 scale and the block's sum times its
    /// scale per block (for Q4_1's minimums).
    Q8_1,
    /// candle's 256-wide blocks for the k-quants (f32 scale, i8 values, i16
    /// sums of each 16 values).
    Q8K,
}

impl WeightType {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::F32 => WeightType::F32,
            GgmlDType::Q8_0 => WeightType::Q8_0,
            GgmlDType::Q4_1 => WeightType::Q4_1,
            GgmlDType::Q5_0 => WeightType::Q5_0,
            GgmlDType::Q4K => WeightType::Q4K,
            GgmlDType::Q6K => WeightType::Q6K,
            _ => return None,
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            WeightType::F32 => 1,
            WeightType::Q8_0 | WeightType::Q4_1 | WeightType::Q5_0 => 32,
            WeightType::Q4K | WeightType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::Q8_0 => 34,
            WeightType::Q4_1 => 20,
            WeightType::Q5_0 => 22,
            WeightType::Q4K => std::mem::size_of::<BlockQ4K>(),
            WeightType::Q6K => std::mem::size_of::<BlockQ6K>(),
        }
    }

    /// Bytes of a row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    pub fn activation(self) -> ActType {
        match self {
            WeightType::F32 => ActType::F32,
            WeightType::Q8_0 | WeightType::Q5_0 => ActType::Q8_0,
            WeightType::Q4_1 => ActType::Q8_1,
            WeightType::Q4K | WeightType::Q6K => ActType::Q8K,
        }
    }
}

impl ActType {
    pub fn block_elems(self) -> usize {
        match self {
            ActType::F32 => 1,
            ActType::Q8_0 | ActType::Q8_1 => 32,
            ActType::Q8K => 256,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            ActType::F32 => 4,
            ActType::Q8_0 => 72,
            ActType::Q8_1 => 40,
            ActType::Q8K => std::mem::size_of::<BlockQ8K>(),
        }
    }

    /// Bytes of a quantized row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Where a Q8_0 or Q8_1 row's per-block scales start.
    pub fn scales_at(self, cols: usize) -> usize {
        match self {
            ActType::Q8_0 => 2 * cols,
            _ => cols,
        }
    }
}

fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Quantizes one row of `x` into `out` (`act.row_bytes(x.len())` bytes). Scales
/// are rounded to f16 and sums computed as ggml's reference quantizers do, so
/// the values equal candle's Q8_0/Q8_1 blocks; only the layout differs.
pub fn quantize_row(act: ActType, x: &[f32], out: &mut [u8]) {
    match act {
        ActType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        ActType::Q8_0 | ActType::Q8_1 => {
            let cols = x.len();
            let blocks = cols / 32;
            let scales_at = act.scales_at(cols);
            for (b, xs) in x.chunks_exact(32).enumerate() {
                let (values, rest) = out.split_at_mut(cols);
                let abs = (act == ActType::Q8_0).then(|| &mut rest[b * 32..b * 32 + 32]);
                let (d, sum) = quantize_block(xs, &mut values[b * 32..b * 32 + 32], abs);
                let dh = f16::from_f32(d);
                let at = scales_at + b * 4;
                out[at..at + 4].copy_from_slice(&dh.to_f32().to_le_bytes());
                let offset = if act == ActType::Q8_1 {
                    (f16::from_f32(sum as f32) * dh).to_f32().to_le_bytes()
                } else {
                    (16 * sum).to_le_bytes()
                };
                let at = scales_at + (blocks + b) * 4;
                out[at..at + 4].copy_from_slice(&offset);
            }
        }
        ActType::Q8K => BlockQ8K::from_float(x, q8k_blocks_mut(out)),
    }
}

/// Quantizes 32 values to i8 with the scale `max |x| / 127` (rounding half
/// away from zero, as ggml's reference quantizer), optionally also writing
/// their absolute values; returns the scale and the values' sum.
#[inline]
fn quantize_block(xs: &[f32], q: &mut [u8], abs: Option<&mut [u8]>) -> (f32, i32) {
    assert!(xs.len() == 32 && q.len() == 32 && abs.as_ref().is_none_or(|a| a.len() == 32));
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    // SAFETY: the build enables AVX2; the lengths were checked above.
    unsafe {
        return avx2::quantize_block(xs.as_ptr(), q.as_mut_ptr(), abs.map(|a| a.as_mut_ptr()));
    }
    #[allow(unreachable_code)]
    quantize_block_portable(xs, q, abs)
}

fn quantize_block_portable(xs: &[f32], q: &mut [u8], mut abs: Option<&mut [u8]>) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (j, v) in xs.iter().enumerate() {
        let value = (v * id).round() as i8;
        q[j] = value as u8;
        if let Some(abs) = abs.as_mut() {
            abs[j] = value.unsigned_abs();
        }
        sum += value as i32;
    }
    (d, sum)
}

fn q8k_blocks_mut(bytes: &mut [u8]) -> &mut [BlockQ8K] {
    let n = bytes.len() / std::mem::size_of::<BlockQ8K>();
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<BlockQ8K>(), 0, "unaligned Q8K buffer");
    // SAFETY: BlockQ8K is plain old data (f32, i8 and i16 arrays); any bytes are
    // a valid value, the length and alignment were checked above.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut BlockQ8K, n) }
}

/// Dequantizes one f32 row.
pub fn dequantize_row(row: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f32_at(row, i * 4);
    }
}

/// Dot products of an f32 weight row with `M` f32 activation rows.
pub fn dot_f32<const M: usize>(w: &[u8], a: [&[u8]; M]) -> [f32; M] {
    a.map(|a| (0..w.len() / 4).map(|i| f32_at(w, i * 4) * f32_at(a, i * 4)).sum())
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of a vector's eight lanes.
    #[inline(always)]
    pub(in crate::chat::native) unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// See [`super::quantize_block`]: the same values as its portable path.
    #[inline(always)]
    pub unsafe fn quantize_block(xs: *const f32, q: *mut u8, abs: Option<*mut u8>) -> (f32, i32) {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.add(8 * i)));
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let ints = v.map(|x| {
            let scaled = _mm256_mul_ps(x, id);
            // Round half away from zero: truncate, then step away from zero
            // where the dropped fraction is at least a half.
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(scaled);
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(scaled, t)), half);
            let step = _mm256_or_ps(_mm256_and_ps(scaled, sign), one);
            _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)))
        });
        let sums = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
        let sums = _mm_add_epi32(_mm256_extracti128_si256(sums, 1), _mm256_castsi256_si128(sums));
        let sums = _mm_hadd_epi32(sums, sums);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(sums, sums));
        // Packing works within 128-bit lanes; the permutation restores the order.
        let words = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
        let bytes = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q as *mut __m256i, bytes);
        if let Some(abs) = abs {
            _mm256_storeu_si256(abs as *mut __m256i, _mm256_abs_epi8(bytes));
        }
        (d, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn block_quantizers_agree_on_every_value_and_tie() {
        // 127 makes the scale 1, so the halves below are exact ties.
        let mut cases = vec![random(32, 7), random(32, 8), vec![0.0; 32]];
        let mut ties: Vec<f32> = (0..31).map(|i| i as f32 * 0.5 - 7.5).collect();
        ties.push(-127.0);
        cases.push(ties);
        cases.push((0..32).map(|i| (i as f32 - 16.0) * 1e-3 + 0.5e-3).collect());
        for xs in cases {
            let (mut q1, mut q2, mut a1, mut a2) = ([0u8; 32], [0u8; 32], [0u8; 32], [0u8; 32]);
            let simd = quantize_block(&xs, &mut q1, Some(&mut a1));
            let portable = quantize_block_portable(&xs, &mut q2, Some(&mut a2));
            assert_eq!((simd.0.to_bits(), simd.1, q1, a1), (portable.0.to_bits(), portable.1, q2, a2), "{xs:?}");
        }
    }
}

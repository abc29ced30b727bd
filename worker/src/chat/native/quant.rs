//! Weight rows of the k-quants, the activation quantizers, and the dot
//! products between k-quant rows and activations.
//!
//! Weights keep the file's own types: converting 4-bit blocks to Q8_0 would
//! make every decoded token read half as many bytes again, and decoding is bound
//! by memory bandwidth. The 32-wide types live in groups of rows
//! ([`super::grouped`]); the k-quants stay in candle's blocks, row by row.
//!
//! Each kernel takes `R` weight rows and `M` activation rows; every pair
//! follows the same operation sequence whatever `R` and `M` are, so a batched
//! forward pass gives bit-identical results to an unbatched one.

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
    /// candle's 256-wide blocks for the k-quants, then each block's values
    /// summed in pairs and times 32 (i16): Q6_K's offset, shared by all weight
    /// rows instead of recomputed per pair.
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
            ActType::Q8K => std::mem::size_of::<BlockQ8K>() + Q8K_PAIR_SUMS_BYTES,
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
        ActType::Q8K => {
            let size = std::mem::size_of::<BlockQ8K>();
            let (q8k, pair_sums) = out.split_at_mut(x.len() / 256 * size);
            BlockQ8K::from_float(x, q8k_blocks_mut(q8k));
            for (block, sums) in q8k.chunks_exact(size).zip(pair_sums.chunks_exact_mut(Q8K_PAIR_SUMS_BYTES)) {
                // The block's quantized values follow its f32 scale.
                for (pair, sum) in block[4..260].chunks_exact(2).zip(sums.chunks_exact_mut(2)) {
                    let pair_sum = 32 * (pair[0] as i8 as i16 + pair[1] as i8 as i16);
                    sum.copy_from_slice(&pair_sum.to_le_bytes());
                }
            }
        }
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

/// Bytes per Q8K block of the pair sums that follow the blocks in a row.
const Q8K_PAIR_SUMS_BYTES: usize = 256;

/// The candle blocks at the start of a Q8K activation row.
fn q8k_blocks(a: &[u8], cols: usize) -> &[BlockQ8K] {
    blocks::<BlockQ8K>(&a[..cols / 256 * std::mem::size_of::<BlockQ8K>()])
}

fn q8k_blocks_mut(bytes: &mut [u8]) -> &mut [BlockQ8K] {
    let n = bytes.len() / std::mem::size_of::<BlockQ8K>();
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<BlockQ8K>(), 0, "unaligned Q8K buffer");
    // SAFETY: BlockQ8K is plain old data (f32, i8 and i16 arrays); any bytes are
    // a valid value, the length and alignment were checked above.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut BlockQ8K, n) }
}

fn blocks<T>(bytes: &[u8]) -> &[T] {
    let n = bytes.len() / std::mem::size_of::<T>();
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0, "unaligned block buffer");
    // SAFETY: only used with candle's `#[repr(C)]` block types, which are plain
    // old data; length and alignment were checked above.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) }
}

/// Dequantizes one row of a per-row type (f32 or a k-quant).
pub fn dequantize_row(wt: WeightType, row: &[u8], out: &mut [f32]) {
    match wt {
        WeightType::Q4K => BlockQ4K::to_float(blocks::<BlockQ4K>(row), out),
        WeightType::Q6K => BlockQ6K::to_float(blocks::<BlockQ6K>(row), out),
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f32_at(row, i * 4);
            }
        }
    }
}

/// Dot products of `R` weight rows of a per-row type (f32 or a k-quant) with
/// `M` activation rows, each quantized as `wt.activation()`; `out[r][m]` is
/// row r with activation m. Uses AVX2 where the build has it; every pair
/// follows the same operation sequence whatever `R` and `M` are.
#[inline]
pub fn dot<const R: usize, const M: usize>(wt: WeightType, w: [&[u8]; R], a: [&[u8]; M], cols: usize) -> [[f32; M]; R] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        if matches!(wt, WeightType::Q4K | WeightType::Q6K) {
            for row in w.iter() {
                assert_eq!(row.len(), wt.row_bytes(cols), "weight row length");
            }
            for row in a.iter() {
                assert_eq!(row.len(), ActType::Q8K.row_bytes(cols), "activation row length");
            }
            // SAFETY: the build enables AVX2, FMA and F16C; the row lengths
            // were checked above.
            unsafe {
                return match wt {
                    WeightType::Q4K => avx2::dot_q4k::<R, M>(w, a, cols / 256),
                    _ => avx2::dot_q6k::<R, M>(w, a, cols / 256),
                };
            }
        }
    }
    w.map(|w| dot_reference(wt, w, a, cols))
}

/// Portable dot products of a per-row type; also the reference the SIMD
/// kernels are tested against.
pub fn dot_reference<const M: usize>(wt: WeightType, w: &[u8], a: [&[u8]; M], cols: usize) -> [f32; M] {
    let mut out = [0f32; M];
    for (o, a) in out.iter_mut().zip(a) {
        *o = match wt {
            // candle's kernels (AVX2 where available): the SIMD kernels below
            // give their results bit for bit.
            WeightType::Q4K => BlockQ4K::vec_dot(cols, blocks::<BlockQ4K>(w), q8k_blocks(a, cols)),
            WeightType::Q6K => BlockQ6K::vec_dot(cols, blocks::<BlockQ6K>(w), q8k_blocks(a, cols)),
            _ => (0..cols).map(|i| f32_at(w, i * 4) * f32_at(a, i * 4)).sum(),
        };
    }
    out
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

    #[inline(always)]
    unsafe fn half(p: *const u8) -> f32 {
        half::f16::from_bits((p as *const u16).read_unaligned()).to_f32()
    }

    #[inline(always)]
    unsafe fn float(p: *const u8) -> f32 {
        (p as *const f32).read_unaligned()
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

    /// Offsets within candle's blocks (`#[repr(C)]`): BlockQ4K is d, dmin,
    /// scales[12], qs[128]; BlockQ6K is ql[128], qh[64], scales[16], d; BlockQ8K
    /// is d (f32), qs[256], bsums[16].
    const Q4K_BYTES: usize = 144;
    const Q6K_BYTES: usize = 210;
    const Q8K_BYTES: usize = 292;

    /// Q4_K rows × Q8K activations. Each weight block's nibbles and scales are
    /// unpacked once for all `M` activation rows; the per-pair arithmetic is
    /// candle's AVX2 `vec_dot_q4k_q8k`, operation for operation, so the results
    /// are the same bits.
    #[inline(always)]
    pub unsafe fn dot_q4k<const R: usize, const M: usize>(w: [&[u8]; R], a: [&[u8]; M], nsb: usize) -> [[f32; M]; R] {
        let (w, a) = (w.map(|r| r.as_ptr()), a.map(|r| r.as_ptr()));
        let m4 = _mm256_set1_epi8(0xF);
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let mut acc_m = [[_mm_setzero_ps(); M]; R];
        for sb in 0..nsb {
            for r in 0..R {
                let x = w[r].add(sb * Q4K_BYTES);
                let (dx, dminx) = (half(x), half(x.add(2)));
                let word = |i: usize| (x.add(4 + 4 * i) as *const u32).read_unaligned();
                let (u0, u1, u2) = (word(0), word(1), word(2));
                // The 6-bit scales and mins, unpacked as ggml packs them.
                let u3 = ((u2 >> 4) & 0x0f0f0f0f) | (((u1 >> 6) & 0x03030303) << 4);
                let scales_lo = u0 & 0x3f3f3f3f;
                let scales_hi = (u2 & 0x0f0f0f0f) | (((u0 >> 6) & 0x03030303) << 4);
                let mins_lo = u1 & 0x3f3f3f3f;
                let mins_and_scales =
                    _mm256_cvtepu8_epi16(_mm_set_epi32(u3 as i32, mins_lo as i32, scales_hi as i32, scales_lo as i32));
                let mins = _mm256_extracti128_si256(mins_and_scales, 1);
                let sc128 = _mm256_extracti128_si256(mins_and_scales, 0);
                let scales = _mm256_set_m128i(sc128, sc128);
                let mut values = [_mm256_setzero_si256(); 8];
                let mut sub_scales = [_mm256_setzero_si256(); 8];
                for j in 0..4 {
                    let bits = _mm256_loadu_si256(x.add(16 + 32 * j) as *const __m256i);
                    values[2 * j] = _mm256_and_si256(bits, m4);
                    values[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    sub_scales[2 * j] = _mm256_shuffle_epi8(scales, scale_pair_shuffle(2 * j));
                    sub_scales[2 * j + 1] = _mm256_shuffle_epi8(scales, scale_pair_shuffle(2 * j + 1));
                }
                for m in 0..M {
                    let y = a[m].add(sb * Q8K_BYTES);
                    let dy = float(y);
                    let d = dy * dx;
                    let dmin = -dy * dminx;
                    let bsums = _mm256_loadu_si256(y.add(260) as *const __m256i);
                    let q8s = _mm_hadd_epi16(_mm256_extracti128_si256(bsums, 0), _mm256_extracti128_si256(bsums, 1));
                    let prod = _mm_madd_epi16(mins, q8s);
                    acc_m[r][m] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r][m]);
                    let mut sumi = _mm256_setzero_si256();
                    for k in 0..8 {
                        let q8 = _mm256_loadu_si256(y.add(4 + 32 * k) as *const __m256i);
                        let p = _mm256_madd_epi16(sub_scales[k], _mm256_maddubs_epi16(values[k], q8));
                        sumi = _mm256_add_epi32(sumi, p);
                    }
                    acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[r][m]);
                }
            }
        }
        std::array::from_fn(|r| {
            std::array::from_fn(|m| {
                let am = acc_m[r][m];
                let am = _mm_add_ps(am, _mm_movehl_ps(am, am));
                let am = _mm_add_ss(am, _mm_movehdup_ps(am));
                hsum(acc[r][m]) + _mm_cvtss_f32(am)
            })
        })
    }

    /// Q6_K rows × Q8K activations, as [`dot_q4k`]: candle's AVX2
    /// `vec_dot_q6k_q8k` per pair, with the activations' `32 × q` pair sums
    /// read from the row instead of recomputed.
    #[inline(always)]
    pub unsafe fn dot_q6k<const R: usize, const M: usize>(w: [&[u8]; R], a: [&[u8]; M], nsb: usize) -> [[f32; M]; R] {
        let (w, a) = (w.map(|r| r.as_ptr()), a.map(|r| r.as_ptr()));
        let (m4, m2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
        let pair_sums_at = nsb * Q8K_BYTES;
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        for sb in 0..nsb {
            for r in 0..R {
                let x = w[r].add(sb * Q6K_BYTES);
                let dx = half(x.add(208));
                let scales = _mm_loadu_si128(x.add(192) as *const __m128i);
                let mut values = [_mm256_setzero_si256(); 8];
                let mut sub_scales = [_mm256_setzero_si256(); 8];
                for j in 0..2 {
                    let low1 = _mm256_loadu_si256(x.add(64 * j) as *const __m256i);
                    let low2 = _mm256_loadu_si256(x.add(64 * j + 32) as *const __m256i);
                    let high = _mm256_loadu_si256(x.add(128 + 32 * j) as *const __m256i);
                    let top = |shift: i32| {
                        let bits = match shift {
                            0 => high,
                            2 => _mm256_srli_epi16(high, 2),
                            4 => _mm256_srli_epi16(high, 4),
                            _ => _mm256_srli_epi16(high, 6),
                        };
                        _mm256_slli_epi16(_mm256_and_si256(bits, m2), 4)
                    };
                    values[4 * j] = _mm256_or_si256(_mm256_and_si256(low1, m4), top(0));
                    values[4 * j + 1] = _mm256_or_si256(_mm256_and_si256(low2, m4), top(2));
                    values[4 * j + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low1, 4), m4), top(4));
                    values[4 * j + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low2, 4), m4), top(6));
                    for k in 0..4 {
                        let pair = _mm_shuffle_epi8(scales, scale_shuffle(4 * j + k));
                        sub_scales[4 * j + k] = _mm256_cvtepi8_epi16(pair);
                    }
                }
                for m in 0..M {
                    let y = a[m].add(sb * Q8K_BYTES);
                    let sums = a[m].add(pair_sums_at + sb * super::Q8K_PAIR_SUMS_BYTES);
                    let d = float(y) * dx;
                    let mut sumi = _mm256_setzero_si256();
                    for k in 0..8 {
                        let q8 = _mm256_loadu_si256(y.add(4 + 32 * k) as *const __m256i);
                        let offset = _mm256_loadu_si256(sums.add(32 * k) as *const __m256i);
                        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(values[k], q8), offset);
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sub_scales[k], p));
                    }
                    acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[r][m]);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|m| hsum(acc[r][m])))
    }

    /// Eight shuffle masks of `N` bytes: byte b of mask i picks scale byte
    /// `2i` or `2i + 1`, switching every `run` bytes.
    const fn scale_masks<const N: usize>(run: usize) -> [[u8; N]; 8] {
        let mut t = [[0u8; N]; 8];
        let mut i = 0;
        while i < 8 {
            let mut b = 0;
            while b < N {
                t[i][b] = (2 * i + (b / run) % 2) as u8;
                b += 1;
            }
            i += 1;
        }
        t
    }

    /// Q4_K: the i16 scale of sub-block `i` (of 8) in every lane pair.
    #[inline(always)]
    unsafe fn scale_pair_shuffle(i: usize) -> __m256i {
        const MASKS: [[u8; 32]; 8] = scale_masks(1);
        _mm256_loadu_si256(MASKS[i].as_ptr() as *const __m256i)
    }

    /// Q6_K: scale bytes `2i` (eight times) then `2i + 1` (eight times).
    #[inline(always)]
    unsafe fn scale_shuffle(i: usize) -> __m128i {
        const MASKS: [[u8; 16]; 8] = scale_masks(8);
        _mm_loadu_si128(MASKS[i].as_ptr() as *const __m128i)
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

    fn as_bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: reading plain-old-data blocks as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }

    /// An 8-aligned byte buffer (what the model's arenas provide).
    fn aligned(len: usize) -> Vec<u64> {
        vec![0u64; len.div_ceil(8)]
    }

    fn bytes_mut(v: &mut [u64], len: usize) -> &mut [u8] {
        // SAFETY: viewing the u64 buffer as bytes.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, len) }
    }

    /// Our reading of each k-quant agrees with candle's dequantizer, and the
    /// SIMD kernels give candle's results bit for bit at every tile shape.
    fn check<W: GgmlType>(wt: WeightType, cols: usize)
    where
        W::VecDotType: GgmlType,
    {
        let xs = random(cols, 1);
        let mut wq = vec![W::zeros(); cols / W::BLCK_SIZE];
        W::from_float(&xs, &mut wq);
        let mut back = vec![0f32; cols];
        W::to_float(&wq, &mut back);
        let mut row_buf = aligned(wt.row_bytes(cols));
        let row = bytes_mut(&mut row_buf, wt.row_bytes(cols));
        row.copy_from_slice(as_bytes(&wq));
        let row: &[u8] = row;
        let mut ours = vec![0f32; cols];
        dequantize_row(wt, row, &mut ours);
        assert_eq!(ours, back, "{wt:?} dequantization");

        let act = wt.activation();
        let rows: Vec<Vec<f32>> = (0..4).map(|s| random(cols, 10 + s)).collect();
        let mut bufs: Vec<Vec<u64>> = Vec::new();
        let mut candle_acts = Vec::new();
        for r in &rows {
            let mut candle_q = vec![W::VecDotType::zeros(); cols / W::VecDotType::BLCK_SIZE];
            W::VecDotType::from_float(r, &mut candle_q);
            let mut buf = aligned(act.row_bytes(cols));
            quantize_row(act, r, bytes_mut(&mut buf, act.row_bytes(cols)));
            bufs.push(buf);
            candle_acts.push(candle_q);
        }
        let views: Vec<&[u8]> = bufs
            .iter()
            .map(|b| {
                // SAFETY: viewing the u64 buffer as bytes.
                unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, act.row_bytes(cols)) }
            })
            .collect();
        let a: [&[u8]; 4] = std::array::from_fn(|i| views[i]);
        let four = dot::<1, 4>(wt, [row], a, cols)[0];
        let tile = dot::<2, 4>(wt, [row, row], a, cols);
        let pairs = dot::<4, 2>(wt, [row, row, row, row], [a[2], a[3]], cols);
        let rows4 = dot::<4, 1>(wt, [row, row, row, row], [a[1]], cols);
        let eight = dot::<1, 8>(wt, [row], [a[0], a[1], a[2], a[3], a[0], a[1], a[2], a[3]], cols)[0];
        let twos = dot::<2, 4>(wt, [row, row], a, cols);
        let reference = dot_reference::<4>(wt, row, a, cols);
        for i in 0..4 {
            let one = dot::<1, 1>(wt, [row], [a[i]], cols)[0][0];
            for other in [four[i], tile[0][i], tile[1][i], eight[i], eight[i + 4], twos[0][i], twos[1][i]] {
                assert_eq!(one.to_bits(), other.to_bits(), "{wt:?}: batched and single kernels differ");
            }
            if i == 1 {
                assert!(rows4.iter().all(|r| r[0].to_bits() == one.to_bits()));
            }
            if i >= 2 {
                assert!(pairs.iter().all(|r| r[i - 2].to_bits() == one.to_bits()));
            }
            let candle_dot = W::vec_dot_unopt(cols, &wq, &candle_acts[i]);
            let candle_simd = W::vec_dot(cols, &wq, &candle_acts[i]);
            assert_eq!(one.to_bits(), candle_simd.to_bits(), "{wt:?}: {one} vs candle's {candle_simd}");
            for expected in [reference[i], candle_dot] {
                assert!((one - expected).abs() <= 1e-4 * expected.abs().max(1.0), "{wt:?}: {one} vs {expected}");
            }
        }
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

    #[test]
    fn kernels_agree_with_candle_and_the_reference() {
        check::<BlockQ4K>(WeightType::Q4K, 512);
        check::<BlockQ6K>(WeightType::Q6K, 512);
    }
}

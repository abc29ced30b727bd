//! Quantized blocks as GGUF stores them, the activation quantizers, and the dot
//! products between them.
//!
//! Weights stay in the file's own types: converting 4-bit blocks to Q8_0 would
//! make every decoded token read half as many bytes again, and decoding is bound
//! by memory bandwidth. Each kernel takes one weight row and up to four
//! activation rows; every accumulator follows the same operation sequence
//! whatever the number of activation rows, so a batched forward pass gives
//! bit-identical results to an unbatched one.

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
    Q8_0,
    Q8_1,
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
            ActType::Q8_0 => 34,
            ActType::Q8_1 => 36,
            ActType::Q8K => std::mem::size_of::<BlockQ8K>(),
        }
    }

    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }
}

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

fn put_half(bytes: &mut [u8], at: usize, value: f16) {
    bytes[at..at + 2].copy_from_slice(&value.to_bits().to_le_bytes());
}

/// Quantizes one row of `x` into `out` (`act.row_bytes(x.len())` bytes), with
/// the same rounding as ggml's reference quantizers.
pub fn quantize_row(act: ActType, x: &[f32], out: &mut [u8]) {
    match act {
        ActType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        ActType::Q8_0 | ActType::Q8_1 => {
            let bytes = act.block_bytes();
            for (xs, block) in x.chunks_exact(32).zip(out.chunks_exact_mut(bytes)) {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let dh = f16::from_f32(d);
                put_half(block, 0, dh);
                let qs_at = bytes - 32;
                let mut sum = 0i32;
                for (j, v) in xs.iter().enumerate() {
                    let q = (v * id).round() as i8;
                    block[qs_at + j] = q as u8;
                    sum += q as i32;
                }
                if act == ActType::Q8_1 {
                    put_half(block, 2, f16::from_f32(sum as f32) * dh);
                }
            }
        }
        ActType::Q8K => {
            let blocks = q8k_blocks_mut(out);
            BlockQ8K::from_float(x, blocks);
        }
    }
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

/// Dequantizes one weight row.
pub fn dequantize_row(wt: WeightType, row: &[u8], out: &mut [f32]) {
    match wt {
        WeightType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        WeightType::Q8_0 => {
            for (block, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = half(block, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = block[2 + j] as i8 as f32 * d;
                }
            }
        }
        WeightType::Q4_1 => {
            for (block, o) in row.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (half(block, 0), half(block, 2));
                for j in 0..16 {
                    o[j] = (block[4 + j] & 0x0F) as f32 * d + m;
                    o[j + 16] = (block[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        WeightType::Q5_0 => {
            for (block, o) in row.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
                let d = half(block, 0);
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                for j in 0..16 {
                    let lo = (block[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                    let hi = (block[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
                    o[j] = (lo - 16) as f32 * d;
                    o[j + 16] = (hi - 16) as f32 * d;
                }
            }
        }
        WeightType::Q4K => BlockQ4K::to_float(blocks::<BlockQ4K>(row), out),
        WeightType::Q6K => BlockQ6K::to_float(blocks::<BlockQ6K>(row), out),
    }
}

/// Dot products of `R` weight rows with `M` activation rows, each quantized as
/// `wt.activation()`; `out[r][m]` is row r with activation m. Uses AVX2 where
/// the build has it; every pair follows the same operation sequence whatever
/// `R` and `M` are.
#[inline]
pub fn dot<const R: usize, const M: usize>(wt: WeightType, w: [&[u8]; R], a: [&[u8]; M], cols: usize) -> [[f32; M]; R] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        match wt {
            // SAFETY: the build enables AVX2 and FMA; the row lengths match
            // `cols` (checked when the weights and activations were laid out).
            WeightType::Q4_1 => return unsafe { avx2::q4_1(w, a, cols / 32) },
            WeightType::Q8_0 => return unsafe { avx2::q8_0(w, a, cols / 32) },
            WeightType::Q5_0 => return unsafe { avx2::q5_0(w, a, cols / 32) },
            _ => {}
        }
    }
    w.map(|w| dot_reference(wt, w, a, cols))
}

/// Portable dot products; also the reference the SIMD kernels are tested against.
pub fn dot_reference<const M: usize>(wt: WeightType, w: &[u8], a: [&[u8]; M], cols: usize) -> [f32; M] {
    let mut out = [0f32; M];
    for (o, a) in out.iter_mut().zip(a) {
        *o = match wt {
            WeightType::F32 => {
                let f = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                w.chunks_exact(4).zip(a.chunks_exact(4)).map(|(x, y)| f(x) * f(y)).sum()
            }
            WeightType::Q8_0 => w
                .chunks_exact(34)
                .zip(a.chunks_exact(34))
                .map(|(x, y)| {
                    let s: i32 = (0..32).map(|j| x[2 + j] as i8 as i32 * y[2 + j] as i8 as i32).sum();
                    s as f32 * (half(x, 0) * half(y, 0))
                })
                .sum(),
            WeightType::Q4_1 => w
                .chunks_exact(20)
                .zip(a.chunks_exact(36))
                .map(|(x, y)| {
                    let mut s = 0i32;
                    for j in 0..16 {
                        s += (x[4 + j] & 0x0F) as i32 * y[4 + j] as i8 as i32;
                        s += (x[4 + j] >> 4) as i32 * y[20 + j] as i8 as i32;
                    }
                    s as f32 * (half(x, 0) * half(y, 0)) + half(x, 2) * half(y, 2)
                })
                .sum(),
            WeightType::Q5_0 => w
                .chunks_exact(22)
                .zip(a.chunks_exact(34))
                .map(|(x, y)| {
                    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
                    let mut s = 0i32;
                    for j in 0..16 {
                        let lo = ((x[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32) - 16;
                        let hi = ((x[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32) - 16;
                        s += lo * y[2 + j] as i8 as i32 + hi * y[18 + j] as i8 as i32;
                    }
                    s as f32 * (half(x, 0) * half(y, 0))
                })
                .sum(),
            // candle's kernels (AVX2 where available) for the k-quants.
            WeightType::Q4K => BlockQ4K::vec_dot(cols, blocks::<BlockQ4K>(w), blocks::<BlockQ8K>(a)),
            WeightType::Q6K => BlockQ6K::vec_dot(cols, blocks::<BlockQ6K>(w), blocks::<BlockQ8K>(a)),
        };
    }
    out
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2 {
    use super::half;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// 0xFF in byte i where bit i of the little-endian u32 at `p` is set.
    #[inline(always)]
    unsafe fn bits(p: *const u8) -> __m256i {
        let word = (p as *const u32).read_unaligned();
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(word as i32),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
        );
        let marked = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(marked, _mm256_set1_epi64x(-1))
    }

    #[inline(always)]
    unsafe fn unsigned_dot(ux: __m256i, sy: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(ux, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn signed_dot(x: __m256i, y: __m256i) -> __m256 {
        unsigned_dot(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline(always)]
    unsafe fn h(p: *const u8) -> f32 {
        half(std::slice::from_raw_parts(p, 2), 0)
    }

    /// The activation side of one block: quantized values and scale.
    #[inline(always)]
    unsafe fn act_block<const M: usize>(a: &[*const u8; M], at: usize, qs: usize) -> ([__m256i; M], [f32; M]) {
        let q = std::array::from_fn(|m| _mm256_loadu_si256(a[m].add(at + qs) as *const __m256i));
        let d = std::array::from_fn(|m| h(a[m].add(at)));
        (q, d)
    }

    pub unsafe fn q4_1<const R: usize, const M: usize>(w: [&[u8]; R], a: [&[u8]; M], blocks: usize) -> [[f32; M]; R] {
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let mut mins = [[0f32; M]; R];
        let (w, a) = (w.map(|r| r.as_ptr()), a.map(|r| r.as_ptr()));
        for b in 0..blocks {
            let (qy, dy) = act_block(&a, b * 36, 4);
            let sy: [f32; M] = std::array::from_fn(|m| h(a[m].add(b * 36 + 2)));
            for r in 0..R {
                let x = w[r].add(b * 20);
                let (d, min) = (h(x), h(x.add(2)));
                let qx = nibbles(x.add(4));
                for m in 0..M {
                    mins[r][m] += min * sy[m];
                    acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[m]), unsigned_dot(qx, qy[m]), acc[r][m]);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|m| hsum(acc[r][m]) + mins[r][m]))
    }

    pub unsafe fn q8_0<const R: usize, const M: usize>(w: [&[u8]; R], a: [&[u8]; M], blocks: usize) -> [[f32; M]; R] {
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let (w, a) = (w.map(|r| r.as_ptr()), a.map(|r| r.as_ptr()));
        for b in 0..blocks {
            let (qy, dy) = act_block(&a, b * 34, 2);
            for r in 0..R {
                let x = w[r].add(b * 34);
                let d = h(x);
                let qx = _mm256_loadu_si256(x.add(2) as *const __m256i);
                for m in 0..M {
                    acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[m]), signed_dot(qx, qy[m]), acc[r][m]);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|m| hsum(acc[r][m])))
    }

    pub unsafe fn q5_0<const R: usize, const M: usize>(w: [&[u8]; R], a: [&[u8]; M], blocks: usize) -> [[f32; M]; R] {
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let (w, a) = (w.map(|r| r.as_ptr()), a.map(|r| r.as_ptr()));
        for b in 0..blocks {
            let (qy, dy) = act_block(&a, b * 34, 2);
            for r in 0..R {
                let x = w[r].add(b * 22);
                let d = h(x);
                // (nibble | high bit << 4) - 16: the nibble itself where the bit is
                // set, the nibble with its top four bits set (minus 16) where not.
                let high = _mm256_andnot_si256(bits(x.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
                let qx = _mm256_or_si256(nibbles(x.add(6)), high);
                for m in 0..M {
                    acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[m]), signed_dot(qx, qy[m]), acc[r][m]);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|m| hsum(acc[r][m])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ8_0};
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn as_bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: reading plain-old-data blocks as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }

    /// Our layout reading of each type agrees with candle's own quantizer and
    /// dequantizer, and the SIMD kernels with the portable ones and candle's.
    fn check<W: GgmlType>(wt: WeightType, cols: usize)
    where
        W::VecDotType: GgmlType,
    {
        let xs = random(cols, 1);
        let mut wq = vec![W::zeros(); cols / W::BLCK_SIZE];
        W::from_float(&xs, &mut wq);
        let mut back = vec![0f32; cols];
        W::to_float(&wq, &mut back);
        let mut ours = vec![0f32; cols];
        dequantize_row(wt, as_bytes(&wq), &mut ours);
        assert_eq!(ours, back, "{wt:?} dequantization");

        let act = wt.activation();
        let rows: Vec<Vec<f32>> = (0..4).map(|s| random(cols, 10 + s)).collect();
        let quantized: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| {
                let mut candle_q = vec![W::VecDotType::zeros(); cols / W::VecDotType::BLCK_SIZE];
                W::VecDotType::from_float(r, &mut candle_q);
                let mut q = vec![0u64; act.row_bytes(cols).div_ceil(8)];
                // SAFETY: viewing the u64 buffer as bytes.
                let bytes = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr() as *mut u8, act.row_bytes(cols)) };
                quantize_row(act, r, bytes);
                assert_eq!(bytes, as_bytes(&candle_q), "{act:?} quantization");
                bytes.to_vec()
            })
            .collect();
        let a: [&[u8]; 4] = std::array::from_fn(|i| quantized[i].as_slice());
        let w = as_bytes(&wq);
        let four = dot::<1, 4>(wt, [w], a, cols)[0];
        let tile = dot::<2, 4>(wt, [w, w], a, cols);
        let rows = dot::<4, 1>(wt, [w, w, w, w], [a[1]], cols);
        let reference = dot_reference::<4>(wt, w, a, cols);
        for i in 0..4 {
            let one = dot::<1, 1>(wt, [w], [a[i]], cols)[0][0];
            for other in [four[i], tile[0][i], tile[1][i]] {
                assert_eq!(one.to_bits(), other.to_bits(), "{wt:?}: batched and single kernels differ");
            }
            if i == 1 {
                assert!(rows.iter().all(|r| r[0].to_bits() == one.to_bits()));
            }
            let candle_dot = W::vec_dot_unopt(cols, &wq, blocks::<W::VecDotType>(a[i]));
            for expected in [reference[i], candle_dot] {
                assert!((one - expected).abs() <= 1e-4 * expected.abs().max(1.0), "{wt:?}: {one} vs {expected}");
            }
        }
    }

    #[test]
    fn kernels_agree_with_candle_and_the_reference() {
        check::<BlockQ8_0>(WeightType::Q8_0, 576);
        check::<BlockQ4_1>(WeightType::Q4_1, 576);
        check::<BlockQ5_0>(WeightType::Q5_0, 896);
        check::<BlockQ4K>(WeightType::Q4K, 512);
        check::<BlockQ6K>(WeightType::Q6K, 512);
    }
}

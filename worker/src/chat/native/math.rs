//! The small vector operations of a transformer layer: RMS norm, exp, SiLU, and
//! attention's products with the f16 key/value cache. One implementation each, used by every
//! path, so batched and unbatched results stay identical.

use half::f16;

pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f32 = x.iter().map(|v| v * v).sum();
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `x[i] = exp(x[i])`, to about 1e-7 relative error.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        let mut chunks = x.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the build enables AVX2/FMA; the chunk holds 8 floats.
            unsafe {
                use std::arch::x86_64::*;
                let v = _mm256_loadu_ps(chunk.as_ptr());
                _mm256_storeu_ps(chunk.as_mut_ptr(), avx2_exp(v));
            }
        }
        for v in chunks.into_remainder() {
            *v = exp_scalar(*v);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    for v in x.iter_mut() {
        *v = exp_scalar(*v);
    }
}

const EXP_HI: f32 = 88.376_26;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// The same polynomial as the SIMD version, lane for lane.
fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(-EXP_HI, EXP_HI);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(r, *p);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
#[inline(always)]
unsafe fn avx2_exp(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-EXP_HI)), _mm256_set1_ps(EXP_HI));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let neg = _mm256_sub_ps(_mm256_setzero_ps(), n);
    let r = _mm256_fmadd_ps(neg, _mm256_set1_ps(LN2_LO), _mm256_fmadd_ps(neg, _mm256_set1_ps(LN2_HI), x));
    let mut y = _mm256_set1_ps(P[0]);
    for p in &P[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*p));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// Turns scores into unnormalized softmax weights in place and returns the
/// maximum and their sum: `x[i] = exp(x[i] - max)`. Eight lanes of maximum and
/// sum, so long contexts are not held up by a chain of scalar dependencies.
pub fn softmax_weights(x: &mut [f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l = l.max(*v);
        }
    }
    let max = chunks.remainder().iter().fold(lanes.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)), |m, v| m.max(*v));
    // One pass for the shift, the exp and the sums, while each chunk is in registers.
    let mut sums = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for chunk in &mut chunks {
        exp_shifted(chunk, max);
        for (s, v) in sums.iter_mut().zip(chunk.iter()) {
            *s += v;
        }
    }
    let rest = chunks.into_remainder();
    for v in rest.iter_mut() {
        *v = exp_scalar(*v - max);
    }
    (max, sums.iter().sum::<f32>() + rest.iter().sum::<f32>())
}

/// `x[i] = exp(x[i] - max)` for a chunk of eight.
#[inline(always)]
fn exp_shifted(chunk: &mut [f32], max: f32) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: the build enables AVX2/FMA; the chunk holds 8 floats.
    unsafe {
        use std::arch::x86_64::*;
        let v = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), _mm256_set1_ps(max));
        _mm256_storeu_ps(chunk.as_mut_ptr(), avx2_exp(v));
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    for v in chunk.iter_mut() {
        *v = exp_scalar(*v - max);
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32], scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.extend(gate.iter().map(|g| -g));
    exp_in_place(scratch);
    for ((g, u), e) in gate.iter_mut().zip(up).zip(scratch.iter()) {
        *g = *g / (1.0 + e) * u;
    }
}

/// How a KV cache stores one value: f16 bits, or an i8 that a per-position
/// scale multiplies.
pub trait KvValue: Copy {
    fn to_f32(self) -> f32;
    /// Eight values from `p`, widened.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvValue for u16 {
    fn to_f32(self) -> f32 {
        f16::from_bits(self).to_f32()
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl KvValue for i8 {
    fn to_f32(self) -> f32 {
        self as f32
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
}

/// Attention scores of `heads` query heads that share one KV head (grouped-
/// query attention): `scores[s * n + j] = (q_s · k_j) * scale * key_scales[j]`
/// for the `n` keys stored one after another (`key_scales` is `None` for f16
/// keys, which need none). `q` holds the heads one after another, `head_dim`
/// values each (16, 32, 64 or 128). Each key is widened once for all the heads.
pub fn grouped_scores<T: KvValue>(
    q: &[f32],
    heads: usize,
    keys: &[T],
    key_scales: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
) {
    let hd = q.len() / heads;
    let n = scores.len() / heads;
    assert!(keys.len() >= n * hd && scores.len() == n * heads);
    assert!(key_scales.is_none_or(|k| k.len() >= n));
    scores_unscaled(q, heads, keys, scale, scores);
    if let Some(key_scales) = key_scales {
        for row in scores.chunks_exact_mut(n) {
            for (s, k) in row.iter_mut().zip(key_scales) {
                *s *= k;
            }
        }
    }
}

fn scores_unscaled<T: KvValue>(q: &[f32], heads: usize, keys: &[T], scale: f32, scores: &mut [f32]) {
    let hd = q.len() / heads;
    let n = scores.len() / heads;
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: the build enables AVX2/F16C/FMA; lengths were checked by the caller.
    unsafe {
        match (hd, heads) {
            (16, 1) => return simd::scores::<T, 2, 1>(q, keys, scale, scores),
            (16, 2) => return simd::scores::<T, 2, 2>(q, keys, scale, scores),
            (16, 3) => return simd::scores::<T, 2, 3>(q, keys, scale, scores),
            (32, 1) => return simd::scores::<T, 4, 1>(q, keys, scale, scores),
            (32, 2) => return simd::scores::<T, 4, 2>(q, keys, scale, scores),
            (32, 3) => return simd::scores::<T, 4, 3>(q, keys, scale, scores),
            (64, 1) => return simd::scores::<T, 8, 1>(q, keys, scale, scores),
            (64, 2) => return simd::scores::<T, 8, 2>(q, keys, scale, scores),
            (64, 3) => return simd::scores::<T, 8, 3>(q, keys, scale, scores),
            (128, 1) => return simd::scores::<T, 16, 1>(q, keys, scale, scores),
            _ => {}
        }
    }
    for s in 0..heads {
        let qs = &q[s * hd..(s + 1) * hd];
        for j in 0..n {
            let k = &keys[j * hd..(j + 1) * hd];
            scores[s * n + j] = qs.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
        }
    }
}

/// Query rows quantized for [`grouped_scores_i8`]: i8 in blocks of 32 with one
/// scale per block, as llama.cpp's Q8_0. Quantized once per layer, not once
/// for each chunk of keys the heads meet.
pub struct QueryI8 {
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl QueryI8 {
    /// `None` for head sizes that are not a multiple of 32, whose scores take
    /// the f32 path.
    pub fn new(q: &[f32], head_dim: usize) -> Option<QueryI8> {
        if !head_dim.is_multiple_of(32) {
            return None;
        }
        let mut values = vec![0i8; q.len()];
        let scales = q.chunks_exact(32).zip(values.chunks_exact_mut(32)).map(|(x, o)| to_i8(x, o)).collect();
        Some(QueryI8 { values, scales })
    }

    /// The values `range` of the query (on block boundaries) and their scales.
    pub fn get(&self, range: std::ops::Range<usize>) -> (&[i8], &[f32]) {
        (&self.values[range.clone()], &self.scales[range.start / 32..range.end / 32])
    }
}

/// [`grouped_scores`] for i8 keys, in integers: the query heads, quantized
/// (see [`QueryI8`]), meet the keys in 8-bit multiply-adds, half the
/// multiplies of widening every key to f32, so a long context costs little
/// more than reading its half-size cache. Without a quantized query (head sizes
/// that are not a multiple of 32) the scores take the f32 path on `q`.
pub fn grouped_scores_i8(
    q: &[f32],
    quantized: Option<(&[i8], &[f32])>,
    heads: usize,
    keys: &[i8],
    key_scales: &[f32],
    scale: f32,
    scores: &mut [f32],
) {
    let Some((qi, qs)) = quantized else {
        return grouped_scores(q, heads, keys, Some(key_scales), scale, scores);
    };
    let hd = qi.len() / heads;
    let n = scores.len() / heads;
    assert!(keys.len() >= n * hd && key_scales.len() >= n && scores.len() == n * heads && qs.len() * 32 == qi.len());
    let blocks = hd / 32;
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: the build enables AVX2/FMA; lengths were checked above.
    unsafe {
        return match blocks {
            1 => simd::scores_i8::<1>(qi, qs, heads, keys, key_scales, scale, scores),
            2 => simd::scores_i8::<2>(qi, qs, heads, keys, key_scales, scale, scores),
            4 => simd::scores_i8::<4>(qi, qs, heads, keys, key_scales, scale, scores),
            _ => scores_i8_portable(qi, qs, heads, blocks, keys, key_scales, scale, scores, 0),
        };
    }
    #[allow(unreachable_code)]
    scores_i8_portable(qi, qs, heads, blocks, keys, key_scales, scale, scores, 0)
}

/// [`grouped_scores_i8`] for keys `from..n`, one at a time, with the same
/// operations in the same order as the SIMD kernel.
#[allow(clippy::too_many_arguments)]
fn scores_i8_portable(
    qi: &[i8],
    qs: &[f32],
    heads: usize,
    blocks: usize,
    keys: &[i8],
    key_scales: &[f32],
    scale: f32,
    scores: &mut [f32],
    from: usize,
) {
    let hd = blocks * 32;
    let n = scores.len() / heads;
    for s in 0..heads {
        for j in from..n {
            let mut acc = 0f32;
            for b in 0..blocks {
                let (x, k) = (&qi[s * hd + b * 32..][..32], &keys[j * hd + b * 32..][..32]);
                let dot: i32 = x.iter().zip(k).map(|(&a, &b)| a as i32 * b as i32).sum();
                acc = (dot as f32).mul_add(qs[s * blocks + b], acc);
            }
            scores[s * n + j] = acc * (key_scales[j] * scale);
        }
    }
}

/// `out[s] = Σ_j weights[s * n + j] * v_j` for `heads` heads sharing the `n`
/// values stored one after another; `out` holds the heads one after another.
/// (An i8 cache's value scales are folded into the weights beforehand.)
pub fn grouped_values<T: KvValue>(weights: &[f32], heads: usize, values: &[T], out: &mut [f32]) {
    let hd = out.len() / heads;
    let n = weights.len() / heads;
    assert!(values.len() >= n * hd && weights.len() == n * heads);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: as above.
    unsafe {
        use simd::values_pass as pass;
        let (w, v, o) = (weights, values, &mut *out);
        match (hd, heads) {
            (16, 1) => return pass::<T, 2, 1>(w, v, o, 16, 0),
            (16, 2) => return pass::<T, 2, 2>(w, v, o, 16, 0),
            (16, 3) => return pass::<T, 2, 3>(w, v, o, 16, 0),
            (32, 1) => return pass::<T, 4, 1>(w, v, o, 32, 0),
            (32, 2) => return pass::<T, 4, 2>(w, v, o, 32, 0),
            (32, 3) => {
                pass::<T, 2, 3>(w, v, o, 32, 0);
                return pass::<T, 2, 3>(w, v, o, 32, 2);
            }
            (64, 1) => return pass::<T, 8, 1>(w, v, o, 64, 0),
            (64, 2) => {
                pass::<T, 4, 2>(w, v, o, 64, 0);
                return pass::<T, 4, 2>(w, v, o, 64, 4);
            }
            (64, 3) => {
                pass::<T, 3, 3>(w, v, o, 64, 0);
                pass::<T, 3, 3>(w, v, o, 64, 3);
                return pass::<T, 2, 3>(w, v, o, 64, 6);
            }
            (128, 1) => {
                pass::<T, 8, 1>(w, v, o, 128, 0);
                return pass::<T, 8, 1>(w, v, o, 128, 8);
            }
            _ => {}
        }
    }
    out.fill(0.0);
    for s in 0..heads {
        for j in 0..n {
            let w = weights[s * n + j];
            for (o, v) in out[s * hd..(s + 1) * hd].iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                *o = w.mul_add(v.to_f32(), *o);
            }
        }
    }
}

/// Query heads [`grouped_scores`] and [`grouped_values`] take at once for a
/// head size: as many as keep their sums in registers.
pub fn heads_at_once(head_dim: usize) -> usize {
    if head_dim <= 64 {
        3
    } else {
        1
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
mod simd {
    use super::super::quant::avx2::hsum;
    use super::KvValue;
    use std::arch::x86_64::*;

    /// The sums of four vectors, as four floats.
    #[inline(always)]
    unsafe fn sums4(a: &[__m256; 4]) -> __m128 {
        let u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u))
    }

    /// Four keys at a time, each widened once and multiplied into the sums of
    /// all `S` heads (4·S sums in flight).
    #[allow(clippy::needless_range_loop)] // the indices name registers of the tile
    pub unsafe fn scores<T: KvValue, const CH: usize, const S: usize>(
        q: &[f32],
        keys: &[T],
        scale: f32,
        scores: &mut [f32],
    ) {
        let hd = CH * 8;
        let (q, k) = (q.as_ptr(), keys.as_ptr());
        let n = scores.len() / S;
        let out = scores.as_mut_ptr();
        let scale4 = _mm_set1_ps(scale);
        let mut j = 0;
        while j + 4 <= n {
            prefetch(k.add(j * hd) as *const u8, 4 * hd * std::mem::size_of::<T>());
            let mut acc = [[_mm256_setzero_ps(); 4]; S];
            for c in 0..CH {
                for i in 0..4 {
                    let kv = T::load8(k.add((j + i) * hd + c * 8));
                    for s in 0..S {
                        acc[s][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(s * hd + c * 8)), kv, acc[s][i]);
                    }
                }
            }
            for (s, a) in acc.iter().enumerate() {
                _mm_storeu_ps(out.add(s * n + j), _mm_mul_ps(sums4(a), scale4));
            }
            j += 4;
        }
        while j < n {
            for s in 0..S {
                let mut acc = _mm256_setzero_ps();
                for c in 0..CH {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(s * hd + c * 8)), T::load8(k.add(j * hd + c * 8)), acc);
                }
                *out.add(s * n + j) = hsum(acc) * scale;
            }
            j += 1;
        }
    }

    /// Eight keys at a time: per key and block, |k| times q with k's signs in
    /// 8-bit multiply-adds, widened to 32 bits, then the eight keys' lanes
    /// summed into one vector of eight dot products.
    pub unsafe fn scores_i8<const B: usize>(
        qi: &[i8],
        qs: &[f32],
        heads: usize,
        keys: &[i8],
        key_scales: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let hd = B * 32;
        let n = scores.len() / heads;
        let (k, out) = (keys.as_ptr(), scores.as_mut_ptr());
        let ones = _mm256_set1_epi16(1);
        let scale8 = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 <= n {
            prefetch(k.add(j * hd) as *const u8, 8 * hd);
            for s in 0..heads {
                let mut acc = _mm256_setzero_ps();
                for b in 0..B {
                    let x = _mm256_loadu_si256(qi.as_ptr().add(s * hd + b * 32) as *const __m256i);
                    let dots: [__m256i; 8] = std::array::from_fn(|i| {
                        let kv = _mm256_loadu_si256(k.add((j + i) * hd + b * 32) as *const __m256i);
                        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(kv), _mm256_sign_epi8(x, kv));
                        _mm256_madd_epi16(p, ones)
                    });
                    let sums = sum_lanes8(dots);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(qs[s * B + b]), acc);
                }
                let ks = _mm256_mul_ps(_mm256_loadu_ps(key_scales.as_ptr().add(j)), scale8);
                _mm256_storeu_ps(out.add(s * n + j), _mm256_mul_ps(acc, ks));
            }
            j += 8;
        }
        super::scores_i8_portable(qi, qs, heads, B, keys, key_scales, scale, scores, j);
    }

    /// Asks for the cache lines `PREFETCH_AHEAD` bytes past `bytes` bytes at
    /// `at`. Attention reads megabytes of keys and values per token and does
    /// enough arithmetic on each line that the hardware prefetchers alone keep
    /// too few lines in flight: measured at depth 2000, the attention step takes
    /// a quarter less time with the hint.
    #[inline(always)]
    unsafe fn prefetch(at: *const u8, bytes: usize) {
        super::fetch_lines(at.wrapping_add(PREFETCH_AHEAD), bytes);
    }

    /// Far enough ahead to cover the memory latency at the kernels' pace, near
    /// enough that the lines are still in L1 when they are used.
    const PREFETCH_AHEAD: usize = 1024;

    /// Lane `i` of the result is the sum of the eight lanes of `v[i]`.
    #[inline(always)]
    unsafe fn sum_lanes8(v: [__m256i; 8]) -> __m256i {
        let ab = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let cd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(ab, cd), _mm256_permute2x128_si256::<0x31>(ab, cd))
    }

    /// Vectors `first..first + W` of every head's output (8 values each): the
    /// `W·S` sums stay in registers (at most 9 of the 16, so none spill to
    /// the stack, where each step would wait on a store and a reload), and
    /// each value vector is widened once for all heads.
    #[allow(clippy::needless_range_loop)] // the indices name registers of the tile
    pub unsafe fn values_pass<T: KvValue, const W: usize, const S: usize>(
        weights: &[f32],
        values: &[T],
        out: &mut [f32],
        hd: usize,
        first: usize,
    ) {
        let n = weights.len() / S;
        let (w, v) = (weights.as_ptr(), values.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); W]; S];
        for j in 0..n {
            if first == 0 {
                prefetch(v.add(j * hd) as *const u8, hd * std::mem::size_of::<T>());
            }
            let ws: [__m256; S] = std::array::from_fn(|s| _mm256_broadcast_ss(&*w.add(s * n + j)));
            for c in 0..W {
                let vv = T::load8(v.add(j * hd + (first + c) * 8));
                for s in 0..S {
                    acc[s][c] = _mm256_fmadd_ps(ws[s], vv, acc[s][c]);
                }
            }
        }
        for (s, a) in acc.iter().enumerate() {
            for (c, x) in a.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(s * hd + (first + c) * 8), *x);
            }
        }
    }
}

/// One head's keys or values as i8 with a scale (absolute maximum / 127),
/// as llama.cpp's Q8_0 blocks but one block per head and position.
pub fn to_i8(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v * inv).round() as i8;
    }
    scale
}

/// Asks for the first [`FETCH_START_BYTES`] of `data`: a kernel's own prefetch
/// runs only a short way ahead of it, so without this its first lines are
/// waited for one by one.
pub fn start_fetching<T>(data: &[T]) {
    fetch_lines(data.as_ptr().cast(), std::mem::size_of_val(data).min(FETCH_START_BYTES));
}

/// Asks for the cache lines of the `bytes` bytes at `at` (into L1). A prefetch
/// never faults, so `at` may run past the caller's data.
#[inline(always)]
fn fetch_lines(at: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch changes nothing but the caches, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, bytes);
}

/// The kernels' own prefetch distance, twice: measured at depth 2000, 1 to 4 KiB
/// ahead all did the same, about 1% faster decoding than none.
const FETCH_START_BYTES: usize = 2048;

pub fn to_f16_bits(x: &[f32], out: &mut [u16]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = f16::from_f32(*v).to_bits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_kernels_match_plain_sums() {
        for (hd, heads) in [(16, 1), (16, 3), (32, 2), (32, 3), (64, 1), (64, 2), (64, 3), (128, 1), (48, 2)] {
            let n = 21;
            let q: Vec<f32> = (0..hd * heads).map(|i| (i as f32 * 0.37).sin()).collect();
            let bits: Vec<u16> = (0..n * hd).map(|i| f16::from_f32((i as f32 * 0.11).cos()).to_bits()).collect();
            let k = |j: usize, i: usize| f16::from_bits(bits[j * hd + i]).to_f32();
            let mut scores = vec![0f32; n * heads];
            grouped_scores(&q, heads, &bits, None, 0.5, &mut scores);
            let weights: Vec<f32> = (0..n * heads).map(|j| 1.0 / (j as f32 + 1.0)).collect();
            let mut out = vec![0f32; hd * heads];
            grouped_values(&weights, heads, &bits, &mut out);
            for s in 0..heads {
                for j in 0..n {
                    let expected: f32 = (0..hd).map(|i| q[s * hd + i] * k(j, i)).sum::<f32>() * 0.5;
                    assert!((scores[s * n + j] - expected).abs() < 1e-4, "hd {hd} head {s} key {j}");
                }
                for i in 0..hd {
                    let expected: f32 = (0..n).map(|j| weights[s * n + j] * k(j, i)).sum();
                    assert!((out[s * hd + i] - expected).abs() < 1e-4, "hd {hd} head {s} value {i}");
                }
            }
        }
    }

    #[test]
    fn i8_attention_follows_the_f16_kernels() {
        for (hd, heads) in [(64, 3), (64, 1), (128, 1), (48, 2)] {
            let n = 23;
            let q: Vec<f32> = (0..hd * heads).map(|i| (i as f32 * 0.37).sin()).collect();
            let keys: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.11).cos() * (1.0 + (i / hd) as f32)).collect();
            let mut bits = vec![0u16; n * hd];
            to_f16_bits(&keys, &mut bits);
            let mut ints = vec![0i8; n * hd];
            let scales: Vec<f32> =
                keys.chunks_exact(hd).zip(ints.chunks_exact_mut(hd)).map(|(k, o)| to_i8(k, o)).collect();
            let (mut exact, mut small) = (vec![0f32; n * heads], vec![0f32; n * heads]);
            grouped_scores(&q, heads, &bits, None, 0.5, &mut exact);
            grouped_scores(&q, heads, &ints, Some(&scales), 0.5, &mut small);
            let mut integer = vec![0f32; n * heads];
            let quantized = QueryI8::new(&q, hd);
            let query = quantized.as_ref().map(|x| x.get(0..q.len()));
            grouped_scores_i8(&q, query, heads, &ints, &scales, 0.5, &mut integer);
            let portable = query.map(|(qi, qs)| {
                let mut one = vec![0f32; n * heads];
                scores_i8_portable(qi, qs, heads, hd / 32, &ints, &scales, 0.5, &mut one, 0);
                one
            });
            for (i, (a, b)) in exact.iter().zip(&small).enumerate() {
                // Each key value is off by at most half its step (scale), so the
                // score by at most half a step per |q| (times the 0.5 scale).
                let (s, j) = (i / n, i % n);
                let qh = &q[s * hd..(s + 1) * hd];
                let q_abs: f32 = qh.iter().map(|v| v.abs()).sum();
                let bound = 0.5 * q_abs * scales[j] / 2.0 + 1e-4;
                assert!((a - b).abs() <= bound, "hd {hd}: {a} vs {b}, bound {bound}");
                // The integer path also rounds q, each value by at most half its
                // block's step, which meets at most |k| per value.
                let k_abs: f32 = keys[j * hd..(j + 1) * hd].iter().map(|v| v.abs()).sum();
                let q_step =
                    qh.chunks(32).map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).fold(0f32, f32::max);
                let bound = bound + 0.5 * k_abs * q_step / 2.0 * 1.01;
                let c = integer[i];
                assert!((a - c).abs() <= bound, "hd {hd}, integer path: {a} vs {c}, bound {bound}");
                if let Some(portable) = &portable {
                    assert_eq!(portable[i].to_bits(), c.to_bits(), "hd {hd}: SIMD and portable integer scores differ");
                }
            }
            let weights: Vec<f32> = (0..n * heads).map(|j| 1.0 / (j as f32 + 1.0)).collect();
            let scaled: Vec<f32> =
                weights.chunks_exact(n).flat_map(|w| w.iter().zip(&scales).map(|(w, s)| w * s)).collect();
            let (mut exact, mut small) = (vec![0f32; hd * heads], vec![0f32; hd * heads]);
            grouped_values(&weights, heads, &bits, &mut exact);
            grouped_values(&scaled, heads, &ints, &mut small);
            for (i, (a, b)) in exact.iter().zip(&small).enumerate() {
                let s = i / hd;
                let bound: f32 = (0..n).map(|j| weights[s * n + j] * scales[j] / 2.0).sum::<f32>() + 1e-4;
                assert!((a - b).abs() <= bound, "hd {hd}: {a} vs {b}, bound {bound}");
            }
        }
    }

    #[test]
    fn exp_is_accurate_and_the_same_in_every_lane_position() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.1).collect();
        let mut fast = xs.clone();
        exp_in_place(&mut fast);
        for (x, e) in xs.iter().zip(&fast) {
            let exact = x.exp();
            assert!((e - exact).abs() <= 2e-7 * exact, "exp({x}) = {e}, not {exact}");
        }
        let mut odd = xs[3..14].to_vec();
        exp_in_place(&mut odd);
        assert_eq!(odd, fast[3..14]);
    }
}

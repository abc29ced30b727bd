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

/// Turns scores into unnormalized softmax weights in place and returns their
/// sum: `x[i] = exp(x[i] - max)`. Eight lanes of maximum and sum, so long
/// contexts are not held up by a chain of scalar dependencies.
pub fn softmax_weights(x: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l = l.max(*v);
        }
    }
    let max = chunks.remainder().iter().fold(lanes.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)), |m, v| m.max(*v));
    for v in x.iter_mut() {
        *v -= max;
    }
    exp_in_place(x);
    let mut sums = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk) {
            *s += v;
        }
    }
    sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
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

/// `scores[j] = (q · k_j) * scale` for the keys stored one after another as f16
/// bits, `q.len()` values each (16, 32, 64 or 128).
pub fn attention_scores(q: &[f32], keys: &[u16], scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    assert!(keys.len() >= scores.len() * hd);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: the build enables AVX2/F16C/FMA; lengths were checked above.
    unsafe {
        match hd {
            16 => return simd::scores::<2>(q, keys, scale, scores),
            32 => return simd::scores::<4>(q, keys, scale, scores),
            64 => return simd::scores::<8>(q, keys, scale, scores),
            128 => return simd::scores::<16>(q, keys, scale, scores),
            _ => {}
        }
    }
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * hd..(j + 1) * hd];
        *s = q.iter().zip(k).map(|(a, b)| a * f16::from_bits(*b).to_f32()).sum::<f32>() * scale;
    }
}

/// `out = Σ_j weights[j] * v_j` for the values stored one after another as f16
/// bits, `out.len()` values each.
pub fn weighted_values(weights: &[f32], values: &[u16], out: &mut [f32]) {
    let hd = out.len();
    assert!(values.len() >= weights.len() * hd);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: as above.
    unsafe {
        match hd {
            16 => return simd::values::<2>(weights, values, out),
            32 => return simd::values::<4>(weights, values, out),
            64 => return simd::values::<8>(weights, values, out),
            128 => return simd::values::<16>(weights, values, out),
            _ => {}
        }
    }
    out.fill(0.0);
    for (j, w) in weights.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
            *o = w.mul_add(f16::from_bits(*v).to_f32(), *o);
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Sums of each of eight vectors, as one vector (a transposed reduction:
    /// seven instructions instead of eight horizontal sums).
    #[inline(always)]
    unsafe fn sums8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
    }

    /// Eight keys at a time: eight independent sums in flight, reduced together.
    pub unsafe fn scores<const CH: usize>(q: &[f32], keys: &[u16], scale: f32, scores: &mut [f32]) {
        let hd = CH * 8;
        let (q, k) = (q.as_ptr(), keys.as_ptr());
        let n = scores.len();
        let scale_v = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..CH {
                let qc = _mm256_loadu_ps(q.add(c * 8));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qc, load_f16(k.add((j + i) * hd + c * 8)), *a);
                }
            }
            _mm256_storeu_ps(scores.as_mut_ptr().add(j), _mm256_mul_ps(sums8(&acc), scale_v));
            j += 8;
        }
        while j < n {
            let mut acc = _mm256_setzero_ps();
            for c in 0..CH {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c * 8)), load_f16(k.add(j * hd + c * 8)), acc);
            }
            scores[j] = hsum(acc) * scale;
            j += 1;
        }
    }

    /// The output stays in registers across all keys.
    pub unsafe fn values<const CH: usize>(weights: &[f32], values: &[u16], out: &mut [f32]) {
        let hd = CH * 8;
        let v = values.as_ptr();
        let mut acc = [_mm256_setzero_ps(); CH];
        for (j, w) in weights.iter().enumerate() {
            let wv = _mm256_set1_ps(*w);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, load_f16(v.add(j * hd + c * 8)), *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(c * 8), *a);
        }
    }
}

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
        for hd in [16, 64, 128] {
            let n = 21;
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let keys: Vec<u16> = (0..n * hd).map(|i| f16::from_f32((i as f32 * 0.11).cos()).to_bits()).collect();
            let mut scores = vec![0f32; n];
            attention_scores(&q, &keys, 0.5, &mut scores);
            let weights: Vec<f32> = (0..n).map(|j| 1.0 / (j as f32 + 1.0)).collect();
            let mut out = vec![0f32; hd];
            weighted_values(&weights, &keys, &mut out);
            for j in 0..n {
                let k = |i: usize| f16::from_bits(keys[j * hd + i]).to_f32();
                let expected: f32 = (0..hd).map(|i| q[i] * k(i)).sum::<f32>() * 0.5;
                assert!((scores[j] - expected).abs() < 1e-4, "hd {hd} key {j}");
            }
            for i in 0..hd {
                let expected: f32 = (0..n).map(|j| weights[j] * f16::from_bits(keys[j * hd + i]).to_f32()).sum();
                assert!((out[i] - expected).abs() < 1e-4, "hd {hd} value {i}");
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

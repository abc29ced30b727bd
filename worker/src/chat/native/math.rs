//! The small vector operations of a transformer layer: RMS norm, exp, SiLU, and
//! the f16 dot products of attention. One implementation each, used by every
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

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32], scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.extend(gate.iter().map(|g| -g));
    exp_in_place(scratch);
    for ((g, u), e) in gate.iter_mut().zip(up).zip(scratch.iter()) {
        *g = *g / (1.0 + e) * u;
    }
}

/// `q · k` with `k` stored as f16 bits; `q.len()` is a multiple of 8.
#[inline]
pub fn dot_f16(q: &[f32], k: &[u16]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: the build enables AVX2/F16C/FMA; both slices hold q.len() values.
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = _mm256_setzero_ps();
        for i in (0..q.len()).step_by(8) {
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc);
        }
        let r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma")))]
    q.iter().zip(k).map(|(a, b)| a * f16::from_bits(*b).to_f32()).sum()
}

/// `out += p * v` with `v` stored as f16 bits; `out.len()` is a multiple of 8.
#[inline]
pub fn axpy_f16(p: f32, v: &[u16], out: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma"))]
    // SAFETY: as in `dot_f16`.
    unsafe {
        use std::arch::x86_64::*;
        let pv = _mm256_set1_ps(p);
        for i in (0..out.len()).step_by(8) {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(pv, vv, _mm256_loadu_ps(o)));
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "f16c", target_feature = "fma")))]
    for (o, b) in out.iter_mut().zip(v) {
        *o = p.mul_add(f16::from_bits(*b).to_f32(), *o);
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

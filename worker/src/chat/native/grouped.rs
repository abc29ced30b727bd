//! The 32-wide weight types (Q4_1, Q5_0, Q8_0) stored in groups of eight rows,
//! four values of each row after four of the next.
//!
//! Why: a batched step is bound by instructions, not memory. A row-by-row
//! kernel turns every block pair's products into a float on its own (pairwise
//! sum, int→float, scale, accumulate) and sums each pair's lanes at the end.
//! Here one 32-byte vector holds four consecutive values of each of eight rows
//! and meets the activation's four values broadcast to every lane, so lane `j`
//! accumulates row `j`'s dot product: the products of a whole block add up in
//! 16-bit lanes, and one conversion, one multiply and one multiply-add then
//! serve eight rows. Nothing is summed across lanes. The group's bytes are the
//! GGUF rows' bytes in another order, so decoding still reads 4.5–8.5 bits per
//! weight, now as one sequential stream per group.
//!
//! One block of a group (eight rows × 32 values):
//! - Q4_1: 4 vectors of nibbles (`[c][row][i]` = GGUF `qs[4c + i]`: values
//!   `4c + i` low, `16 + 4c + i` high), then 8 f16 scales, then 8 f16 minimums;
//! - Q5_0: the same nibbles, then 32 bytes of fifth bits (byte `4·row + i`,
//!   bit `c` for value `4c + i`, bit `4 + c` for value `16 + 4c + i`), then 8
//!   f16 scales;
//! - Q8_0: 8 vectors of values (`[c][row][i]` = value `4c + i`), then 8 f16
//!   scales.
//!
//! Each output is computed by the same operations whatever else shares the
//! step (integer sums are exact, and each lane's float accumulation runs block
//! by block), so a batched product equals an unbatched one bit for bit.

use super::quant::{ActType, WeightType};
use half::f16;

/// Rows per group.
pub const GROUP: usize = 8;

/// Whether `wt` is stored in groups.
pub fn is_grouped(wt: WeightType) -> bool {
    matches!(wt, WeightType::Q4_1 | WeightType::Q5_0 | WeightType::Q8_0)
}

/// Bytes of one block (32 values) of a group's eight rows.
pub fn block_bytes(wt: WeightType) -> usize {
    wt.block_bytes() * GROUP
}

/// Bytes of a group of rows `cols` wide.
pub fn group_bytes(wt: WeightType, cols: usize) -> usize {
    cols / 32 * block_bytes(wt)
}

/// Where a group block's f16 scales start.
fn scales_at(wt: WeightType) -> usize {
    match wt {
        WeightType::Q4_1 => 128,
        WeightType::Q5_0 => 160,
        _ => 256,
    }
}

/// Packs up to eight GGUF rows into one group (`out` zeroed, rows beyond
/// `rows.len()` stay zero).
pub fn pack(wt: WeightType, rows: &[&[u8]], out: &mut [u8]) {
    let (size, bb) = (wt.block_bytes(), block_bytes(wt));
    let dx = scales_at(wt);
    for (b, o) in out.chunks_exact_mut(bb).enumerate() {
        for (j, row) in rows.iter().enumerate() {
            let blk = &row[b * size..(b + 1) * size];
            let (qs, chunks) = match wt {
                WeightType::Q4_1 => (&blk[4..20], 4),
                WeightType::Q5_0 => (&blk[6..22], 4),
                _ => (&blk[2..34], 8),
            };
            for c in 0..chunks {
                o[c * 32 + 4 * j..c * 32 + 4 * j + 4].copy_from_slice(&qs[4 * c..4 * c + 4]);
            }
            o[dx + 2 * j..dx + 2 * j + 2].copy_from_slice(&blk[0..2]);
            match wt {
                WeightType::Q4_1 => o[144 + 2 * j..146 + 2 * j].copy_from_slice(&blk[2..4]),
                WeightType::Q5_0 => {
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    for c in 0..4 {
                        for i in 0..4 {
                            let low = (qh >> (4 * c + i)) & 1;
                            let high = (qh >> (16 + 4 * c + i)) & 1;
                            o[128 + 4 * j + i] |= ((low << c) | (high << (4 + c))) as u8;
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Row `j`'s quantized values in block `b` of a group, as GGUF orders them
/// (Q4_1 unsigned 0..15, Q5_0 signed -16..15, Q8_0 signed).
fn values(wt: WeightType, group: &[u8], b: usize, j: usize) -> [i32; 32] {
    let blk = &group[b * block_bytes(wt)..(b + 1) * block_bytes(wt)];
    let mut v = [0i32; 32];
    match wt {
        WeightType::Q8_0 => {
            for c in 0..8 {
                for i in 0..4 {
                    v[4 * c + i] = blk[c * 32 + 4 * j + i] as i8 as i32;
                }
            }
        }
        _ => {
            for c in 0..4 {
                for i in 0..4 {
                    let q = blk[c * 32 + 4 * j + i] as i32;
                    let (mut low, mut high) = (q & 0x0F, q >> 4);
                    if wt == WeightType::Q5_0 {
                        let h = blk[128 + 4 * j + i] as i32;
                        low = (low | ((h >> c) & 1) << 4) - 16;
                        high = (high | ((h >> (4 + c)) & 1) << 4) - 16;
                    }
                    v[4 * c + i] = low;
                    v[16 + 4 * c + i] = high;
                }
            }
        }
    }
    v
}

/// Dequantizes row `j` of a group (as ggml does: `q·d + m`, `(q - 16)·d`, `q·d`).
pub fn dequantize_row(wt: WeightType, group: &[u8], j: usize, out: &mut [f32]) {
    let bb = block_bytes(wt);
    for (b, o) in out.chunks_exact_mut(32).enumerate() {
        let d = half_at(group, b * bb + scales_at(wt) + 2 * j);
        let v = values(wt, group, b, j);
        for (o, q) in o.iter_mut().zip(v) {
            *o = match wt {
                WeightType::Q4_1 => q as f32 * d + half_at(group, b * bb + 144 + 2 * j),
                _ => q as f32 * d,
            };
        }
    }
}

/// Dot products of a group's eight rows with `M` activation rows quantized as
/// `wt.activation()`: `out[m][j]` is row `j` with activation `m`.
#[inline]
pub fn dot<const M: usize>(wt: WeightType, group: &[u8], a: [&[u8]; M], cols: usize) -> [[f32; GROUP]; M] {
    assert_eq!(group.len(), group_bytes(wt, cols), "group length");
    for row in a.iter() {
        assert_eq!(row.len(), wt.activation().row_bytes(cols), "activation row length");
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        let (g, a) = (group.as_ptr(), a.map(|r| r.as_ptr()));
        // SAFETY: the build enables AVX2, FMA and F16C; the lengths were checked above.
        unsafe {
            return match wt {
                WeightType::Q4_1 => avx2::dot::<{ avx2::Q4_1 }, M>(g, a, cols / 32),
                WeightType::Q5_0 => avx2::dot::<{ avx2::Q5_0 }, M>(g, a, cols / 32),
                _ => avx2::dot::<{ avx2::Q8_0 }, M>(g, a, cols / 32),
            };
        }
    }
    #[allow(unreachable_code)]
    a.map(|a| dot_portable(wt, group, a, cols))
}

/// The portable kernel: each block's integer sum, then the same float steps
/// per row as the SIMD kernel (so both give the same bits).
pub fn dot_portable(wt: WeightType, group: &[u8], a: &[u8], cols: usize) -> [f32; GROUP] {
    let nb = cols / 32;
    let bb = block_bytes(wt);
    let act = ActScalars::new(wt.activation(), cols);
    std::array::from_fn(|j| {
        let mut acc = 0f32;
        for b in 0..nb {
            let v = values(wt, group, b, j);
            let sum: i32 = v.iter().zip(&a[b * 32..b * 32 + 32]).map(|(&q, &y)| q * y as i8 as i32).sum();
            let scale = half_at(group, b * bb + scales_at(wt) + 2 * j) * act.scale(a, b);
            acc = (sum as f32).mul_add(scale, acc);
            if wt == WeightType::Q4_1 {
                acc = half_at(group, b * bb + 144 + 2 * j).mul_add(act.offset(a, b), acc);
            }
        }
        acc
    })
}

/// Where an activation row keeps its per-block scales and offsets.
struct ActScalars {
    scales: usize,
    offsets: usize,
}

impl ActScalars {
    fn new(act: ActType, cols: usize) -> ActScalars {
        let scales = act.scales_at(cols);
        ActScalars { scales, offsets: scales + cols / 32 * 4 }
    }

    fn scale(&self, a: &[u8], b: usize) -> f32 {
        f32::from_le_bytes(a[self.scales + 4 * b..self.scales + 4 * b + 4].try_into().expect("4 bytes"))
    }

    fn offset(&self, a: &[u8], b: usize) -> f32 {
        f32::from_le_bytes(a[self.offsets + 4 * b..self.offsets + 4 * b + 4].try_into().expect("4 bytes"))
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
mod avx2 {
    use std::arch::x86_64::*;

    // The weight type, as a const parameter so each kernel compiles straight.
    pub const Q4_1: u8 = 0;
    pub const Q5_0: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// Four activation bytes at `p` in every lane.
    #[inline(always)]
    unsafe fn broadcast4(p: *const u8) -> __m256i {
        _mm256_set1_epi32((p as *const i32).read_unaligned())
    }

    /// Q5_0's fifth bits of value vector `v` (0..8) moved to bit 4 of each byte.
    #[inline(always)]
    unsafe fn fifth_bits(high: __m256i, v: i32) -> __m256i {
        let moved = match v {
            0 => _mm256_slli_epi16(high, 4),
            1 => _mm256_slli_epi16(high, 3),
            2 => _mm256_slli_epi16(high, 2),
            3 => _mm256_slli_epi16(high, 1),
            4 => high,
            5 => _mm256_srli_epi16(high, 1),
            6 => _mm256_srli_epi16(high, 2),
            _ => _mm256_srli_epi16(high, 3),
        };
        _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
    }

    /// See [`super::dot`]. Per block and activation row: the 4-bit types add
    /// their eight (Q5_0: twice four) 16-bit partial products before one
    /// widening; Q8_0 multiplies |activation| by the sign-adjusted weights and
    /// widens every product, as 8-bit products can fill 16 bits.
    #[inline(always)]
    pub unsafe fn dot<const K: u8, const M: usize>(g: *const u8, a: [*const u8; M], nb: usize) -> [[f32; 8]; M] {
        let cols = nb * 32;
        let (bb, dx_at) = match K {
            Q4_1 => (160, 128),
            Q5_0 => (176, 160),
            _ => (272, 256),
        };
        // Activation layout (see `ActType`): values, [|values|,] scales, offsets.
        let scales_at = if K == Q4_1 { cols } else { 2 * cols };
        let offsets_at = scales_at + nb * 4;
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); M];
        for b in 0..nb {
            let x = g.add(b * bb);
            let mut isum = [_mm256_setzero_si256(); M];
            if K == Q8_0 {
                for c in 0..8 {
                    let w = _mm256_loadu_si256(x.add(32 * c) as *const __m256i);
                    for m in 0..M {
                        let y = broadcast4(a[m].add(b * 32 + 4 * c));
                        let abs_y = broadcast4(a[m].add(cols + b * 32 + 4 * c));
                        let p = _mm256_maddubs_epi16(abs_y, _mm256_sign_epi8(w, y));
                        isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(p, ones));
                    }
                }
            } else {
                let mut low = [_mm256_setzero_si256(); M];
                let mut high = [_mm256_setzero_si256(); M];
                let fifth = if K == Q5_0 { _mm256_loadu_si256(x.add(128) as *const __m256i) } else { ones };
                for c in 0..4 {
                    let bits = _mm256_loadu_si256(x.add(32 * c) as *const __m256i);
                    let mut lo = _mm256_and_si256(bits, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    if K == Q5_0 {
                        lo = _mm256_or_si256(lo, fifth_bits(fifth, c as i32));
                        hi = _mm256_or_si256(hi, fifth_bits(fifth, 4 + c as i32));
                    }
                    for m in 0..M {
                        let ylo = broadcast4(a[m].add(b * 32 + 4 * c));
                        let yhi = broadcast4(a[m].add(b * 32 + 16 + 4 * c));
                        low[m] = _mm256_add_epi16(low[m], _mm256_maddubs_epi16(lo, ylo));
                        // Q4_1's products fit 16 bits eight times over
                        // (8 · 2 · 15 · 127); Q5_0's only four.
                        if K == Q4_1 {
                            low[m] = _mm256_add_epi16(low[m], _mm256_maddubs_epi16(hi, yhi));
                        } else {
                            high[m] = _mm256_add_epi16(high[m], _mm256_maddubs_epi16(hi, yhi));
                        }
                    }
                }
                for m in 0..M {
                    isum[m] = _mm256_madd_epi16(low[m], ones);
                    if K == Q5_0 {
                        isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(high[m], ones));
                        // Values are stored as q + 16: take 16 × the block's sum back off.
                        let offset = _mm256_set1_epi32((a[m].add(offsets_at + 4 * b) as *const i32).read_unaligned());
                        isum[m] = _mm256_sub_epi32(isum[m], offset);
                    }
                }
            }
            let dx = _mm256_cvtph_ps(_mm_loadu_si128(x.add(dx_at) as *const __m128i));
            let mx = if K == Q4_1 { _mm256_cvtph_ps(_mm_loadu_si128(x.add(144) as *const __m128i)) } else { dx };
            for m in 0..M {
                let dy = _mm256_set1_ps((a[m].add(scales_at + 4 * b) as *const f32).read_unaligned());
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(dx, dy), acc[m]);
                if K == Q4_1 {
                    let sy = _mm256_set1_ps((a[m].add(offsets_at + 4 * b) as *const f32).read_unaligned());
                    acc[m] = _mm256_fmadd_ps(mx, sy, acc[m]);
                }
            }
        }
        acc.map(|v| {
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), v);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::native::quant::quantize_row;
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ8_0, GgmlType};
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn as_bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: reading plain-old-data blocks as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }

    /// A group of `rows` rows (the rest zero) dequantizes as candle's blocks do,
    /// and the SIMD kernel gives the portable kernel's bits at every batch
    /// size, close to candle's own dot products.
    fn check<W: GgmlType>(wt: WeightType, cols: usize, rows: usize)
    where
        W::VecDotType: GgmlType,
    {
        let blocks: Vec<Vec<W>> = (0..rows)
            .map(|j| {
                let mut q = vec![W::zeros(); cols / 32];
                W::from_float(&random(cols, j as u64), &mut q);
                q
            })
            .collect();
        let gguf: Vec<&[u8]> = blocks.iter().map(|q| as_bytes(q)).collect();
        let mut group = vec![0u8; group_bytes(wt, cols)];
        pack(wt, &gguf, &mut group);
        for (j, q) in blocks.iter().enumerate() {
            let (mut ours, mut theirs) = (vec![0f32; cols], vec![0f32; cols]);
            dequantize_row(wt, &group, j, &mut ours);
            W::to_float(q, &mut theirs);
            assert_eq!(ours, theirs, "{wt:?} row {j} dequantization");
        }

        let act = wt.activation();
        let inputs: Vec<Vec<f32>> = (0..4).map(|s| random(cols, 100 + s)).collect();
        let acts: Vec<Vec<u8>> = inputs
            .iter()
            .map(|x| {
                let mut a = vec![0u8; act.row_bytes(cols)];
                quantize_row(act, x, &mut a);
                a
            })
            .collect();
        let a: [&[u8]; 4] = std::array::from_fn(|i| acts[i].as_slice());
        let four = dot::<4>(wt, &group, a, cols);
        let three = dot::<3>(wt, &group, [a[1], a[2], a[3]], cols);
        for (m, x) in inputs.iter().enumerate() {
            let one = dot::<1>(wt, &group, [a[m]], cols)[0];
            let portable = dot_portable(wt, &group, a[m], cols);
            let mut candle_act = vec![W::VecDotType::zeros(); cols / 32];
            W::VecDotType::from_float(x, &mut candle_act);
            for j in 0..GROUP {
                assert_eq!(one[j].to_bits(), four[m][j].to_bits(), "{wt:?}: batched and single kernels differ");
                if m > 0 {
                    assert_eq!(one[j].to_bits(), three[m - 1][j].to_bits(), "{wt:?}: batch of 3 differs");
                }
                assert_eq!(one[j].to_bits(), portable[j].to_bits(), "{wt:?}: SIMD and portable kernels differ");
                let expected = if j < rows { W::vec_dot_unopt(cols, &blocks[j], &candle_act) } else { 0.0 };
                assert!(
                    (one[j] - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                    "{wt:?} row {j}: {} vs candle's {expected}",
                    one[j]
                );
            }
        }
    }

    #[test]
    fn grouped_kernels_agree_with_candle() {
        check::<BlockQ4_1>(WeightType::Q4_1, 576, 8);
        check::<BlockQ5_0>(WeightType::Q5_0, 896, 8);
        check::<BlockQ8_0>(WeightType::Q8_0, 576, 8);
        check::<BlockQ8_0>(WeightType::Q8_0, 64, 5);
        check::<BlockQ4_1>(WeightType::Q4_1, 64, 3);
    }
}

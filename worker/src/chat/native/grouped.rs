//! Weight matrices stored in groups of eight rows, four values of each row
//! after four of the next.
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
//! One 256-value super-block of the k-quants:
//! - Q4_K: 32 vectors of nibbles (`[8j + c][row][i]` = GGUF `qs[32j + 4c + i]`:
//!   values `64j + 4c + i` low, `64j + 32 + 4c + i` high), then the 6-bit
//!   scales and minimums unpacked to bytes (`[sub-block][row]`), then 8 f16
//!   scales and 8 f16 minimum scales;
//! - Q6_K: the 6-bit values `q + 32` as 32 vectors of low nibbles (`[t][row][i]`:
//!   values `8t + i` low, `8t + 4 + i` high), 16 vectors of their top two bits
//!   (`[h][row][i]`, bits `2k..2k+2` for value `16h + 4k + i`), the i8 scales in
//!   pairs (`[t][row]` = sub-blocks `2t`, `2t + 1`), then 8 f16 scales.
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
    wt != WeightType::F32
}

/// Bytes of one block (32 or 256 values) of a group's eight rows.
pub fn block_bytes(wt: WeightType) -> usize {
    match wt {
        // The unpacked scales and minimums take 128 bytes where GGUF packs
        // 96 in twelve bytes per row.
        WeightType::Q4K => 1184,
        _ => wt.block_bytes() * GROUP,
    }
}

/// Bytes of a group of rows `cols` wide.
pub fn group_bytes(wt: WeightType, cols: usize) -> usize {
    cols / wt.block_elems() * block_bytes(wt)
}

/// Offsets within candle's k-quant blocks (`#[repr(C)]`): BlockQ4K is d,
/// dmin, scales[12], qs[128]; BlockQ6K is ql[128], qh[64], scales[16], d;
/// BlockQ8K is d (f32), qs[256], bsums[16].
const Q4K_SCALES: usize = 4;
const Q4K_QS: usize = 16;
const Q6K_QH: usize = 128;
const Q6K_SCALES: usize = 192;
const Q6K_D: usize = 208;
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 260;
const Q8K_BYTES: usize = 292;

/// Offsets within a group's k-quant super-block (see the module docs).
const Q4K_GROUP_SCALES: usize = 1024;
const Q4K_GROUP_MINS: usize = 1088;
const Q4K_GROUP_D: usize = 1152;
const Q4K_GROUP_DMIN: usize = 1168;
const Q6K_GROUP_HIGH: usize = 1024;
const Q6K_GROUP_SCALES: usize = 1536;
const Q6K_GROUP_D: usize = 1664;

/// Sub-block `j`'s 6-bit scale and minimum of a Q4_K block's packed twelve bytes.
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// A Q6_K block's 256 values as `q + 32` (0..63), in order.
fn q6k_values(blk: &[u8]) -> [u8; 256] {
    let mut u = [0u8; 256];
    for n in 0..2 {
        let (ql, qh) = (&blk[64 * n..], &blk[Q6K_QH + 32 * n..]);
        for l in 0..32 {
            let o = 128 * n + l;
            u[o] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            u[o + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            u[o + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            u[o + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    u
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
    if matches!(wt, WeightType::Q4K | WeightType::Q6K) {
        return pack_k(wt, rows, out);
    }
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

fn pack_k(wt: WeightType, rows: &[&[u8]], out: &mut [u8]) {
    let (size, bb) = (wt.block_bytes(), block_bytes(wt));
    for (b, o) in out.chunks_exact_mut(bb).enumerate() {
        for (j, row) in rows.iter().enumerate() {
            let blk = &row[b * size..(b + 1) * size];
            if wt == WeightType::Q4K {
                for v in 0..32 {
                    let at = v * 32 + 4 * j;
                    o[at..at + 4].copy_from_slice(&blk[Q4K_QS + 4 * v..Q4K_QS + 4 * v + 4]);
                }
                for s in 0..8 {
                    let (sc, m) = q4k_scale_min(s, &blk[Q4K_SCALES..Q4K_SCALES + 12]);
                    o[Q4K_GROUP_SCALES + 8 * s + j] = sc;
                    o[Q4K_GROUP_MINS + 8 * s + j] = m;
                }
                o[Q4K_GROUP_D + 2 * j..Q4K_GROUP_D + 2 * j + 2].copy_from_slice(&blk[0..2]);
                o[Q4K_GROUP_DMIN + 2 * j..Q4K_GROUP_DMIN + 2 * j + 2].copy_from_slice(&blk[2..4]);
            } else {
                let u = q6k_values(blk);
                for t in 0..32 {
                    for i in 0..4 {
                        o[t * 32 + 4 * j + i] = (u[8 * t + i] & 0x0F) | ((u[8 * t + 4 + i] & 0x0F) << 4);
                    }
                }
                for h in 0..16 {
                    for i in 0..4 {
                        let top = |k: usize| (u[16 * h + 4 * k + i] >> 4) << (2 * k);
                        o[Q6K_GROUP_HIGH + h * 32 + 4 * j + i] = top(0) | top(1) | top(2) | top(3);
                    }
                }
                for t in 0..8 {
                    o[Q6K_GROUP_SCALES + 16 * t + 2 * j] = blk[Q6K_SCALES + 2 * t];
                    o[Q6K_GROUP_SCALES + 16 * t + 2 * j + 1] = blk[Q6K_SCALES + 2 * t + 1];
                }
                o[Q6K_GROUP_D + 2 * j..Q6K_GROUP_D + 2 * j + 2].copy_from_slice(&blk[Q6K_D..Q6K_D + 2]);
            }
        }
    }
}

/// Row `j`'s values in super-block `b` of a k-quant group: Q4_K's 0..15,
/// Q6_K's `q + 32`.
fn k_values(wt: WeightType, group: &[u8], b: usize, j: usize) -> [i32; 256] {
    let blk = &group[b * block_bytes(wt)..(b + 1) * block_bytes(wt)];
    let mut v = [0i32; 256];
    for (n, v) in v.iter_mut().enumerate() {
        *v = if wt == WeightType::Q4K {
            let (chunk, l) = (n / 64, n % 64);
            let q = blk[(8 * chunk + (l % 32) / 4) * 32 + 4 * j + l % 4];
            (if l < 32 { q & 0x0F } else { q >> 4 }) as i32
        } else {
            let (t, i) = (n / 8, n % 4);
            let q = blk[t * 32 + 4 * j + i];
            let low = if n % 8 < 4 { q & 0x0F } else { q >> 4 };
            let (h, k) = (n / 16, (n % 16) / 4);
            let top = (blk[Q6K_GROUP_HIGH + h * 32 + 4 * j + i] >> (2 * k)) & 3;
            (low | top << 4) as i32
        };
    }
    v
}

/// Row `j`'s Q6_K scale of sub-block `s` (of 16).
fn q6k_scale(blk: &[u8], j: usize, s: usize) -> i32 {
    blk[Q6K_GROUP_SCALES + 16 * (s / 2) + 2 * j + s % 2] as i8 as i32
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
    if matches!(wt, WeightType::Q4K | WeightType::Q6K) {
        // As candle's dequantizers: Q4_K `(d·sc)·q - dmin·m`, Q6_K `d·sc·(q - 32)`.
        for (b, o) in out.chunks_exact_mut(256).enumerate() {
            let blk = &group[b * bb..(b + 1) * bb];
            let v = k_values(wt, group, b, j);
            for (n, (o, q)) in o.iter_mut().zip(v).enumerate() {
                let s = n / 32;
                *o = if wt == WeightType::Q4K {
                    let d = half_at(blk, Q4K_GROUP_D + 2 * j) * blk[Q4K_GROUP_SCALES + 8 * s + j] as f32;
                    let m = half_at(blk, Q4K_GROUP_DMIN + 2 * j) * blk[Q4K_GROUP_MINS + 8 * s + j] as f32;
                    d * q as f32 - m
                } else {
                    half_at(blk, Q6K_GROUP_D + 2 * j) * q6k_scale(blk, j, n / 16) as f32 * (q - 32) as f32
                };
            }
        }
        return;
    }
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

/// The most activation rows one [`dot_groups`] call takes.
pub const MAX_ACTIVATION_ROWS: usize = 8;

/// Dot products of each group in `groups` (whole groups back to back) with
/// activation rows `a` (at most [`MAX_ACTIVATION_ROWS`]) quantized as
/// `wt.activation()`: `each(g, m, out)` gets group `g`'s eight outputs for
/// activation row `m`.
///
/// Every group meets all of `a` while it is in L1, four rows at a time (the
/// broadcast activations and the 16-bit sums of four rows stay in
/// registers), then two, then one. The lengths are checked once per call, so
/// each group costs its arithmetic and nothing else (per-group checks and
/// lookups took about a fifth of an eight-row step's matrix time).
pub fn dot_groups(
    wt: WeightType,
    groups: &[u8],
    a: &[&[u8]],
    cols: usize,
    mut each: impl FnMut(usize, usize, &[f32; GROUP]),
) {
    let gb = group_bytes(wt, cols);
    assert!(gb > 0 && groups.len().is_multiple_of(gb), "groups length");
    assert!(a.len() <= MAX_ACTIVATION_ROWS, "too many activation rows");
    let row_bytes = wt.activation().row_bytes(cols);
    assert!(a.iter().all(|row| row.len() == row_bytes), "activation row length");
    let mut put = |g: usize, first: usize, outs: &[[f32; GROUP]]| {
        for (m, out) in outs.iter().enumerate() {
            each(g, first + m, out);
        }
    };
    for (g, group) in groups.chunks_exact(gb).enumerate() {
        let mut r = 0;
        while r + 4 <= a.len() {
            put(g, r, &dot::<4>(wt, group, [a[r], a[r + 1], a[r + 2], a[r + 3]], cols));
            r += 4;
        }
        if r + 2 <= a.len() {
            put(g, r, &dot::<2>(wt, group, [a[r], a[r + 1]], cols));
            r += 2;
        }
        if r < a.len() {
            put(g, r, &dot::<1>(wt, group, [a[r]], cols));
        }
    }
}

/// A group's eight rows times `M` activation rows whose lengths the caller
/// checked: `out[m][j]` is row `j` with activation `m`.
#[inline(always)]
fn dot<const M: usize>(wt: WeightType, group: &[u8], a: [&[u8]; M], cols: usize) -> [[f32; GROUP]; M] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        let (g, a) = (group.as_ptr(), a.map(|r| r.as_ptr()));
        // SAFETY: the build enables AVX2, FMA and F16C; `dot_groups` checked
        // the group's and the activation rows' lengths.
        unsafe {
            return match wt {
                WeightType::Q4_1 => avx2::dot::<{ avx2::Q4_1 }, M>(g, a, cols / 32),
                WeightType::Q5_0 => avx2::dot::<{ avx2::Q5_0 }, M>(g, a, cols / 32),
                WeightType::Q8_0 => avx2::dot::<{ avx2::Q8_0 }, M>(g, a, cols / 32),
                WeightType::Q4K => avx2::dot_q4k::<M>(g, a, cols / 256),
                WeightType::Q6K => avx2::dot_q6k::<M>(g, a, cols / 256),
                WeightType::F32 => unreachable!("f32 matrices are not grouped"),
            };
        }
    }
    #[allow(unreachable_code)]
    a.map(|a| dot_portable(wt, group, a, cols))
}

/// The portable kernel: each block's integer sum, then the same float steps
/// per row as the SIMD kernel (so both give the same bits).
pub fn dot_portable(wt: WeightType, group: &[u8], a: &[u8], cols: usize) -> [f32; GROUP] {
    if matches!(wt, WeightType::Q4K | WeightType::Q6K) {
        return dot_portable_k(wt, group, a, cols);
    }
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

/// The k-quants: per super-block and row, the exact integer sums of candle's
/// kernels, then `acc += isum·(d·dy)` (Q4_K also `acc -= msum·(dmin·dy)`).
fn dot_portable_k(wt: WeightType, group: &[u8], a: &[u8], cols: usize) -> [f32; GROUP] {
    let bb = block_bytes(wt);
    let ab = ActType::Q8K.block_bytes();
    debug_assert_eq!(ab, Q8K_BYTES);
    std::array::from_fn(|j| {
        let mut acc = 0f32;
        for b in 0..cols / 256 {
            let blk = &group[b * bb..(b + 1) * bb];
            let y = &a[b * ab..];
            let dy = f32::from_le_bytes(y[0..4].try_into().expect("4 bytes"));
            let qy = |n: usize| y[Q8K_QS + n] as i8 as i32;
            let bsum = |s: usize| i16::from_le_bytes([y[Q8K_BSUMS + 2 * s], y[Q8K_BSUMS + 2 * s + 1]]) as i32;
            let v = k_values(wt, group, b, j);
            let mut isum = 0i32;
            if wt == WeightType::Q4K {
                let mut msum = 0i32;
                for s in 0..8 {
                    let dot: i32 = (32 * s..32 * s + 32).map(|n| v[n] * qy(n)).sum();
                    isum += blk[Q4K_GROUP_SCALES + 8 * s + j] as i32 * dot;
                    msum += blk[Q4K_GROUP_MINS + 8 * s + j] as i32 * (bsum(2 * s) + bsum(2 * s + 1));
                }
                acc = (isum as f32).mul_add(half_at(blk, Q4K_GROUP_D + 2 * j) * dy, acc);
                acc = (-(msum as f32)).mul_add(half_at(blk, Q4K_GROUP_DMIN + 2 * j) * dy, acc);
            } else {
                let mut offset = 0i32;
                for s in 0..16 {
                    let dot: i32 = (16 * s..16 * s + 16).map(|n| v[n] * qy(n)).sum();
                    isum += q6k_scale(blk, j, s) * dot;
                    offset += q6k_scale(blk, j, s) * bsum(s);
                }
                isum -= 32 * offset;
                acc = (isum as f32).mul_add(half_at(blk, Q6K_GROUP_D + 2 * j) * dy, acc);
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

    /// How far ahead of the block in hand the kernels ask for weight bytes.
    /// The hardware prefetchers alone fall behind once a batch makes each
    /// block's arithmetic long (measured on Zen 3: an eight-row product
    /// streaming from memory ran about 1.3× faster for Q4_1 and 1.9× for
    /// Q8_0 with 4 KiB ahead; 1 and 16 KiB were slower than 2-8 KiB).
    const PREFETCH_AHEAD: usize = 4096;

    /// Asks for the cache lines `PREFETCH_AHEAD` bytes past the `len` bytes
    /// at `x`. Prefetches never fault, so running past the matrix's end is
    /// harmless (hence `wrapping_add`: no pointer is formed into memory that
    /// is read).
    #[inline(always)]
    unsafe fn prefetch(x: *const u8, len: usize) {
        let ahead = x.wrapping_add(PREFETCH_AHEAD);
        let mut at = 0;
        while at < len {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(at) as *const i8);
            at += 64;
        }
    }

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
            prefetch(x, bb);
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
        acc.map(|v| store(v))
    }

    #[inline(always)]
    unsafe fn store(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    }

    /// Eight bytes at `p` as i16 pairs holding the byte twice (lane `j`: byte `j`).
    #[inline(always)]
    unsafe fn doubled(p: *const u8) -> __m256i {
        let x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        _mm256_or_si256(x, _mm256_slli_epi32(x, 16))
    }

    /// Q4_K groups × Q8K activations: per sub-block of 32, the eight partial
    /// products add up in 16 bits and one `madd` applies each row's scale;
    /// the minimums meet the activations' 16-value sums.
    #[inline(always)]
    pub unsafe fn dot_q4k<const M: usize>(g: *const u8, a: [*const u8; M], nsb: usize) -> [[f32; 8]; M] {
        use super::{Q4K_GROUP_D, Q4K_GROUP_DMIN, Q4K_GROUP_MINS, Q4K_GROUP_SCALES, Q8K_BSUMS, Q8K_BYTES, Q8K_QS};
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); M];
        for sb in 0..nsb {
            let x = g.add(sb * 1184);
            prefetch(x, 1184);
            let y = a.map(|a| a.add(sb * Q8K_BYTES));
            let mut isum = [_mm256_setzero_si256(); M];
            for chunk in 0..4 {
                let mut low = [_mm256_setzero_si256(); M];
                let mut high = [_mm256_setzero_si256(); M];
                for c in 0..8 {
                    let bits = _mm256_loadu_si256(x.add(32 * (8 * chunk + c)) as *const __m256i);
                    let lo = _mm256_and_si256(bits, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    for m in 0..M {
                        let ylo = broadcast4(y[m].add(Q8K_QS + 64 * chunk + 4 * c));
                        let yhi = broadcast4(y[m].add(Q8K_QS + 64 * chunk + 32 + 4 * c));
                        low[m] = _mm256_add_epi16(low[m], _mm256_maddubs_epi16(lo, ylo));
                        high[m] = _mm256_add_epi16(high[m], _mm256_maddubs_epi16(hi, yhi));
                    }
                }
                let sc_lo = doubled(x.add(Q4K_GROUP_SCALES + 8 * (2 * chunk)));
                let sc_hi = doubled(x.add(Q4K_GROUP_SCALES + 8 * (2 * chunk + 1)));
                for m in 0..M {
                    let p = _mm256_add_epi32(_mm256_madd_epi16(low[m], sc_lo), _mm256_madd_epi16(high[m], sc_hi));
                    isum[m] = _mm256_add_epi32(isum[m], p);
                }
            }
            let mut msum = [_mm256_setzero_si256(); M];
            for s in 0..8 {
                let mins = doubled(x.add(Q4K_GROUP_MINS + 8 * s));
                for m in 0..M {
                    // The sums of values 32s..32s+16 and 32s+16..32s+32.
                    let sums = broadcast4(y[m].add(Q8K_BSUMS + 4 * s));
                    msum[m] = _mm256_add_epi32(msum[m], _mm256_madd_epi16(mins, sums));
                }
            }
            let dx = _mm256_cvtph_ps(_mm_loadu_si128(x.add(Q4K_GROUP_D) as *const __m128i));
            let dminx = _mm256_cvtph_ps(_mm_loadu_si128(x.add(Q4K_GROUP_DMIN) as *const __m128i));
            for m in 0..M {
                let dy = _mm256_set1_ps((y[m] as *const f32).read_unaligned());
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(dx, dy), acc[m]);
                acc[m] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[m]), _mm256_mul_ps(dminx, dy), acc[m]);
            }
        }
        acc.map(|v| store(v))
    }

    /// Q6_K groups × Q8K activations: values stored as `q + 32`; per sub-block
    /// of 16 two pairs of partial products add up in 16 bits, and 32 × the
    /// scaled 16-value sums of the activations are taken off at the end.
    #[inline(always)]
    pub unsafe fn dot_q6k<const M: usize>(g: *const u8, a: [*const u8; M], nsb: usize) -> [[f32; 8]; M] {
        use super::{Q6K_GROUP_D, Q6K_GROUP_HIGH, Q6K_GROUP_SCALES, Q8K_BSUMS, Q8K_BYTES, Q8K_QS};
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let low_halves = _mm256_set1_epi32(0xFFFF);
        let mut acc = [_mm256_setzero_ps(); M];
        for sb in 0..nsb {
            let x = g.add(sb * 1680);
            prefetch(x, 1680);
            let y = a.map(|a| a.add(sb * Q8K_BYTES));
            let mut isum = [_mm256_setzero_si256(); M];
            let mut offset = [_mm256_setzero_si256(); M];
            for t in 0..8 {
                // Lane j: row j's scales of sub-blocks 2t and 2t + 1 as i16.
                let pair = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(Q6K_GROUP_SCALES + 16 * t) as *const __m128i));
                for m in 0..M {
                    let sums = broadcast4(y[m].add(Q8K_BSUMS + 4 * t));
                    offset[m] = _mm256_add_epi32(offset[m], _mm256_madd_epi16(pair, sums));
                }
                for half in 0..2 {
                    let h = 2 * t + half;
                    let scale = if half == 0 {
                        _mm256_or_si256(_mm256_and_si256(pair, low_halves), _mm256_slli_epi32(pair, 16))
                    } else {
                        _mm256_or_si256(_mm256_srli_epi32(pair, 16), _mm256_andnot_si256(low_halves, pair))
                    };
                    let n0 = _mm256_loadu_si256(x.add(32 * (2 * h)) as *const __m256i);
                    let n1 = _mm256_loadu_si256(x.add(32 * (2 * h + 1)) as *const __m256i);
                    let top = _mm256_loadu_si256(x.add(Q6K_GROUP_HIGH + 32 * h) as *const __m256i);
                    let v0 = _mm256_or_si256(_mm256_and_si256(n0, m4), _mm256_and_si256(_mm256_slli_epi16(top, 4), m2));
                    let v1 = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(n0, 4), m4),
                        _mm256_and_si256(_mm256_slli_epi16(top, 2), m2),
                    );
                    let v2 = _mm256_or_si256(_mm256_and_si256(n1, m4), _mm256_and_si256(top, m2));
                    let v3 = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(n1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(top, 2), m2),
                    );
                    for m in 0..M {
                        let q = y[m].add(Q8K_QS + 16 * h);
                        let p01 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(v0, broadcast4(q)),
                            _mm256_maddubs_epi16(v1, broadcast4(q.add(4))),
                        );
                        let p23 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(v2, broadcast4(q.add(8))),
                            _mm256_maddubs_epi16(v3, broadcast4(q.add(12))),
                        );
                        let p = _mm256_add_epi32(_mm256_madd_epi16(p01, scale), _mm256_madd_epi16(p23, scale));
                        isum[m] = _mm256_add_epi32(isum[m], p);
                    }
                }
            }
            let dx = _mm256_cvtph_ps(_mm_loadu_si128(x.add(Q6K_GROUP_D) as *const __m128i));
            for m in 0..M {
                let dy = _mm256_set1_ps((y[m] as *const f32).read_unaligned());
                let sum = _mm256_sub_epi32(isum[m], _mm256_slli_epi32(offset[m], 5));
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dx, dy), acc[m]);
            }
        }
        acc.map(|v| store(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::native::quant::quantize_row;
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType};
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
                let mut q = vec![W::zeros(); cols / W::BLCK_SIZE];
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
        let a: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
        // Every tile size (four rows, then two and one) in one call and
        // alone, over two copies of the group.
        let twice = group.repeat(2);
        let collect = |rows: &[&[u8]]| {
            let mut out = vec![[[0f32; GROUP]; 2]; rows.len()];
            dot_groups(wt, &twice, rows, cols, |g, m, values| out[m][g] = *values);
            assert!(out.iter().all(|o| o[0].map(f32::to_bits) == o[1].map(f32::to_bits)), "{wt:?}: groups differ");
            out.into_iter().map(|o| o[0]).collect::<Vec<_>>()
        };
        let seven = collect(&[a[0], a[1], a[2], a[3], a[0], a[1], a[2]]);
        let three = collect(&a[1..]);
        for (m, x) in inputs.iter().enumerate() {
            let one = collect(&a[m..m + 1])[0];
            let portable = dot_portable(wt, &group, a[m], cols);
            let mut candle_act = vec![W::VecDotType::zeros(); cols / W::VecDotType::BLCK_SIZE];
            W::VecDotType::from_float(x, &mut candle_act);
            for j in 0..GROUP {
                assert_eq!(one[j].to_bits(), seven[m][j].to_bits(), "{wt:?}: batched and single kernels differ");
                if m < 3 {
                    assert_eq!(one[j].to_bits(), seven[4 + m][j].to_bits(), "{wt:?}: tiles of 2 and 1 differ");
                }
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
        check::<BlockQ4K>(WeightType::Q4K, 512, 8);
        check::<BlockQ6K>(WeightType::Q6K, 768, 8);
        check::<BlockQ6K>(WeightType::Q6K, 256, 2);
    }
}

//! natter's own forward pass for llama- and qwen2-architecture GGUF models.
//!
//! candle's stock quantized models allocate every intermediate, concatenate the
//! KV cache on each step, convert 4-bit weights to slower paths, and run one
//! sequence at a time. This module keeps the GGUF blocks as they are, runs each
//! step over a ragged batch of rows (decode steps of many sequences and prompt
//! chunks together), writes keys and values into a preallocated cache, and
//! splits every matrix product over a persistent [`team::Team`].
//!
//! One row's result never depends on which other rows share its step, how
//! many threads run it, or how its prompt was chunked: each output value is
//! computed by the same sequence of operations in every case.

mod cache;
pub mod grouped;
mod math;
pub use math::exp_in_place;
pub mod quant;
pub mod team;

pub use cache::KvCache;
use cache::KvChunk;
use candle_core::quantized::gguf_file;
use quant::{ActType, WeightType};
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use team::{share, Cursor, Shards, Team};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The model uses something this forward pass does not implement; the
    /// caller falls back to candle's stock model.
    #[error("not supported by the native forward pass: {0}")]
    Unsupported(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// A weight matrix as its GGUF blocks: `rows` rows of `cols` values each,
/// stored in units of one row (f32) or of a group of rows (the quantized
/// types, see [`grouped`]; the last group padded with zero rows). The bytes
/// sit at `offset` in an allocation that the model's matrices share.
pub struct Weight {
    wt: WeightType,
    rows: usize,
    cols: usize,
    unit_rows: usize,
    unit_bytes: usize,
    data: Arc<Aligned>,
    offset: usize,
}

/// Matrices' bytes, 64-byte aligned so block types with f16/f32 fields can be
/// viewed in place. Allocations of 2 MiB and more sit on 2 MiB boundaries and
/// ask for transparent huge pages: decoding streams every weight once per
/// token, and with 4 KiB pages the CPU's prefetchers stop at every page
/// boundary and every page costs a TLB miss (measured: a Q5_0 row kernel reads
/// memory about 1.5× faster on huge pages). A layer's matrices are each far
/// smaller than a huge page, so all the model's matrices share one allocation.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Aligned` owns its allocation like a `Box<[u8]>`.
unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

const HUGE_PAGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: std::ffi::c_int) -> std::ffi::c_int;
}

/// Asks for transparent huge pages on the whole 2 MiB pages of the `len` bytes
/// at `addr`, which starts on a 2 MiB boundary. Called before the memory is
/// first touched, so its pages fault in huge. The advice may be refused (THP
/// disabled); the memory then sits on small pages and works the same.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn advise_huge_pages(addr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= HUGE_PAGE {
        const MADV_HUGEPAGE: std::ffi::c_int = 14;
        // SAFETY: advice changes no contents; the range is the caller's own
        // allocation and page-aligned.
        unsafe { madvise(addr as *mut _, len / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE) };
    }
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(len.max(1), align).expect("weight size fits a layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        if align == HUGE_PAGE {
            advise_huge_pages(raw, len);
        }
        // SAFETY: `layout.size()` bytes are allocated at `raw`.
        unsafe { std::ptr::write_bytes(raw, 0, layout.size()) };
        Aligned { ptr, len, layout }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl Weight {
    /// The same matrix, sharing its data (tied embeddings).
    fn shape(&self) -> Weight {
        Weight { data: self.data.clone(), ..*self }
    }

    /// Units `units`: rows, or groups of rows `u·GROUP..`.
    fn units(&self, units: Range<usize>) -> &[u8] {
        &self.data.bytes()[self.offset + units.start * self.unit_bytes..self.offset + units.end * self.unit_bytes]
    }

    /// Unit `u`: row `u`, or the group of rows `u·GROUP..`.
    fn unit(&self, u: usize) -> &[u8] {
        self.units(u..u + 1)
    }

    /// The row count rounded up to whole units.
    fn padded_rows(&self) -> usize {
        self.rows.next_multiple_of(self.unit_rows)
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.unit_rows == 1 {
            quant::dequantize_row(self.unit(r), out);
        } else {
            grouped::dequantize_row(self.wt, self.unit(r / self.unit_rows), r % self.unit_rows, out);
        }
    }
}

/// A matrix of the GGUF file as it will be stored.
struct MatrixLayout {
    name: String,
    wt: WeightType,
    rows: usize,
    cols: usize,
    unit_rows: usize,
    unit_bytes: usize,
}

impl MatrixLayout {
    fn bytes(&self) -> usize {
        self.rows.div_ceil(self.unit_rows) * self.unit_bytes
    }

    fn weight(self, data: Arc<Aligned>, offset: usize) -> Weight {
        let MatrixLayout { wt, rows, cols, unit_rows, unit_bytes, .. } = self;
        Weight { wt, rows, cols, unit_rows, unit_bytes, data, offset }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rope {
    /// Pairs (2i, 2i+1): llama as GGUF stores it.
    Interleaved,
    /// Pairs (i, i + d/2): qwen2.
    Halves,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub ff: usize,
    pub vocab: usize,
    eps: f32,
    rope: Rope,
    /// theta_i for each rotated pair.
    inv_freq: Vec<f32>,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Weight,
    wk: Weight,
    wv: Weight,
    bias: Option<[Vec<f32>; 3]>,
    wo: Weight,
    ffn_norm: Vec<f32>,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// One token of one sequence in a forward step.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// The sequence's KV-cache slot.
    pub slot: usize,
    /// The token's position in its sequence.
    pub pos: usize,
    pub token: u32,
    /// Whether the step returns this row's logits.
    pub logits: bool,
}

pub struct NativeModel {
    pub config: Config,
    embed: Weight,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: Weight,
    team: Team,
    scratch: Scratch,
}

/// Buffers reused from step to step; they grow to the largest step seen.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    partials: Vec<f32>,
    acts: [Vec<u64>; 4],
}

fn act_index(act: ActType) -> usize {
    match act {
        ActType::F32 => 0,
        ActType::Q8_0 => 1,
        ActType::Q8_1 => 2,
        ActType::Q8K => 3,
    }
}

/// Quantized activation rows, one buffer per activation type.
struct Acts<'a> {
    cols: usize,
    bufs: [&'a [u8]; 4],
}

impl<'a> Acts<'a> {
    fn row(&self, act: ActType, r: usize) -> &'a [u8] {
        let bytes = act.row_bytes(self.cols);
        &self.bufs[act_index(act)][r * bytes..(r + 1) * bytes]
    }
}

impl NativeModel {
    /// Loads `path` if its architecture and tensor types are supported.
    pub fn load(path: &Path, content: &gguf_file::Content, threads: usize) -> Result<NativeModel, NativeError> {
        let arch = super::model::architecture(content);
        let rope = match arch.as_str() {
            "llama" => Rope::Interleaved,
            "qwen2" => Rope::Halves,
            other => return Err(NativeError::Unsupported(format!("architecture {other}"))),
        };
        let md = |key: &str| -> Result<&gguf_file::Value, NativeError> {
            content
                .metadata
                .get(&format!("{arch}.{key}"))
                .ok_or_else(|| NativeError::Invalid(format!("the GGUF has no {arch}.{key}")))
        };
        let int = |key: &str| -> Result<usize, NativeError> {
            let v = md(key)?;
            v.to_u32()
                .map(|n| n as usize)
                .or_else(|_| v.to_u64().map(|n| n as usize))
                .map_err(|e| NativeError::Invalid(format!("{arch}.{key}: {e}")))
        };
        let float = |key: &str, default: f32| md(key).ok().and_then(|v| v.to_f32().ok()).unwrap_or(default);
        if content.metadata.contains_key(&format!("{arch}.expert_count")) {
            return Err(NativeError::Unsupported("mixture of experts".into()));
        }
        let dim = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv")?;
        let layers = int("block_count")?;
        let head_dim = dim / heads.max(1);
        let rope_dim = int("rope.dimension_count").unwrap_or(head_dim);
        if heads == 0
            || kv_heads == 0
            || heads % kv_heads != 0
            || ![16, 32, 64, 128].contains(&head_dim)
            || rope_dim != head_dim
        {
            return Err(NativeError::Unsupported(format!(
                "{heads} heads, {kv_heads} KV heads, head size {head_dim}, rotary size {rope_dim}"
            )));
        }
        let base = float("rope.freq_base", 10000.0);
        let inv_freq = (0..head_dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / head_dim as f32)).collect();

        let file = std::fs::File::open(path).map_err(|source| NativeError::Read { path: path.into(), source })?;
        let file = std::cell::RefCell::new(file);
        // Where each matrix's bytes go: its type and shape, checked.
        let layout = |name: &str| -> Result<MatrixLayout, NativeError> {
            let info = content
                .tensor_infos
                .get(name)
                .ok_or_else(|| NativeError::Invalid(format!("the GGUF has no tensor {name}")))?;
            let wt = WeightType::from_ggml(info.ggml_dtype)
                .ok_or_else(|| NativeError::Unsupported(format!("{name} is {:?}", info.ggml_dtype)))?;
            let dims = info.shape.dims();
            let cols = *dims.last().unwrap_or(&1);
            let rows = dims.iter().rev().skip(1).product::<usize>();
            if cols % wt.block_elems() != 0 || cols % 32 != 0 {
                return Err(NativeError::Unsupported(format!("{name} has {cols} columns")));
            }
            let (unit_rows, unit_bytes) = if grouped::is_grouped(wt) {
                (grouped::GROUP, grouped::group_bytes(wt, cols))
            } else {
                (1, wt.row_bytes(cols))
            };
            Ok(MatrixLayout { name: name.to_string(), wt, rows, cols, unit_rows, unit_bytes })
        };
        // Reads a matrix's GGUF rows into `out`, grouped where its type is.
        let read_into = |m: &MatrixLayout, out: &mut [u8]| -> Result<(), NativeError> {
            let gguf_row_bytes = m.wt.row_bytes(m.cols);
            let mut raw = vec![0u8; m.rows * gguf_row_bytes];
            let read = |source| NativeError::Read { path: path.into(), source };
            let mut file = file.borrow_mut();
            file.seek(SeekFrom::Start(content.tensor_data_offset + content.tensor_infos[&m.name].offset))
                .map_err(read)?;
            file.read_exact(&mut raw).map_err(read)?;
            for (src, unit) in raw.chunks(m.unit_rows * gguf_row_bytes).zip(out.chunks_exact_mut(m.unit_bytes)) {
                if m.unit_rows == 1 {
                    unit.copy_from_slice(src);
                } else {
                    let rows: Vec<&[u8]> = src.chunks_exact(gguf_row_bytes).collect();
                    grouped::pack(m.wt, &rows, unit);
                }
            }
            Ok(())
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, NativeError> {
            let m = layout(name)?;
            let mut data = Aligned::zeroed(m.bytes());
            read_into(&m, data.bytes_mut())?;
            let w = m.weight(Arc::new(data), 0);
            let mut out = vec![0f32; w.rows * w.cols];
            for r in 0..w.rows {
                w.dequantize_row(r, &mut out[r * w.cols..(r + 1) * w.cols]);
            }
            if out.len() != len {
                return Err(NativeError::Invalid(format!("{name} has {} values, not {len}", out.len())));
            }
            Ok(out)
        };
        let out_norm = vector("output_norm.weight", dim)?;
        // Every matrix in the order a step reads them, each on a 64-byte
        // boundary of one allocation.
        const MATRICES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
        let mut names: Vec<String> =
            (0..layers).flat_map(|l| MATRICES.map(|m| format!("blk.{l}.{m}.weight"))).collect();
        names.push("token_embd.weight".into());
        let tied = !content.tensor_infos.contains_key("output.weight");
        if !tied {
            names.push("output.weight".into());
        }
        let mut layouts = Vec::with_capacity(names.len());
        let mut end = 0usize;
        for name in &names {
            let m = layout(name)?;
            let offset = end.next_multiple_of(64);
            end = offset + m.bytes();
            layouts.push((m, offset));
        }
        let mut arena = Aligned::zeroed(end);
        for (m, offset) in &layouts {
            read_into(m, &mut arena.bytes_mut()[*offset..*offset + m.bytes()])?;
        }
        let arena = Arc::new(arena);
        let mut weights = layouts.into_iter().map(|(m, offset)| m.weight(arena.clone(), offset));
        let mut next = || weights.next().expect("a weight per name");
        let mut layer_list = Vec::with_capacity(layers);
        let kv_dim = kv_heads * head_dim;
        for l in 0..layers {
            let p = |n: &str| format!("blk.{l}.{n}");
            let bias = if arch == "qwen2" {
                Some([
                    vector(&p("attn_q.bias"), dim)?,
                    vector(&p("attn_k.bias"), kv_dim)?,
                    vector(&p("attn_v.bias"), kv_dim)?,
                ])
            } else {
                None
            };
            layer_list.push(Layer {
                attn_norm: vector(&p("attn_norm.weight"), dim)?,
                bias,
                ffn_norm: vector(&p("ffn_norm.weight"), dim)?,
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                gate: next(),
                up: next(),
                down: next(),
            });
        }
        let embed = next();
        let output = if tied { embed.shape() } else { next() };
        let ff = layer_list.first().map(|l| l.gate.rows).unwrap_or(0);
        let config = Config {
            dim,
            heads,
            kv_heads,
            head_dim,
            layers,
            ff,
            vocab: output.rows,
            eps: float("attention.layer_norm_rms_epsilon", 1e-6),
            rope,
            inv_freq,
        };
        let model = NativeModel {
            config,
            embed,
            layers: layer_list,
            out_norm,
            output,
            team: Team::new(threads),
            scratch: Scratch::default(),
        };
        model.check_shapes()?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<(), NativeError> {
        let c = &self.config;
        let kv_dim = c.kv_heads * c.head_dim;
        let expect = |w: &Weight, rows: usize, cols: usize, what: &str| {
            if w.rows == rows && w.cols == cols {
                Ok(())
            } else {
                Err(NativeError::Invalid(format!("{what} is {}x{}, not {rows}x{cols}", w.rows, w.cols)))
            }
        };
        expect(&self.embed, self.embed.rows, c.dim, "token_embd")?;
        expect(&self.output, c.vocab, c.dim, "output")?;
        for l in &self.layers {
            expect(&l.wq, c.dim, c.dim, "attn_q")?;
            expect(&l.wk, kv_dim, c.dim, "attn_k")?;
            expect(&l.wv, kv_dim, c.dim, "attn_v")?;
            expect(&l.wo, c.dim, c.dim, "attn_output")?;
            expect(&l.gate, c.ff, c.dim, "ffn_gate")?;
            expect(&l.up, c.ff, c.dim, "ffn_up")?;
            expect(&l.down, c.dim, c.ff, "ffn_down")?;
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.team.size()
    }

    /// Bytes of weights held: the matrices' shared allocation and the final norm.
    pub fn weight_bytes(&self) -> usize {
        self.embed.data.len + self.out_norm.len() * 4
    }

    /// Runs one step over `rows`, writing their keys and values into `cache`,
    /// and returns the logits of the rows that asked for them, in order.
    pub fn forward(&mut self, rows: &[Row], cache: &mut KvCache, logits: &mut Vec<f32>) {
        let c = &self.config;
        let n = rows.len();
        cache.check(rows);
        let s = &mut self.scratch;
        let kv_dim = c.kv_heads * c.head_dim;
        let half = c.head_dim / 2;
        grow(&mut s.x, n * c.dim);
        grow(&mut s.xn, n * c.dim);
        grow(&mut s.q, n * c.dim);
        grow(&mut s.k, n * kv_dim);
        grow(&mut s.v, n * kv_dim);
        grow(&mut s.attn, n * c.dim);
        grow(&mut s.tmp, n * c.dim);
        grow(&mut s.gate, n * c.ff);
        grow(&mut s.up, n * c.ff);
        grow(&mut s.cos, n * half);
        grow(&mut s.sin, n * half);
        for (i, r) in rows.iter().enumerate() {
            let token = (r.token as usize).min(self.embed.rows - 1);
            self.embed.dequantize_row(token, &mut s.x[i * c.dim..(i + 1) * c.dim]);
            for (j, f) in c.inv_freq.iter().enumerate() {
                let angle = r.pos as f32 * f;
                s.cos[i * half + j] = angle.cos();
                s.sin[i * half + j] = angle.sin();
            }
        }
        let team = &self.team;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention (the previous layer's feed-forward output joins the
            // residual stream here).
            let down = (l > 0).then_some(&s.tmp[..n * c.dim]);
            add_and_norm(team, &mut s.x[..n * c.dim], down, &layer.attn_norm, c.eps, &mut s.xn[..n * c.dim], c.dim);
            let acts = quantize(team, &mut s.acts, &s.xn[..n * c.dim], c.dim, &[&layer.wq, &layer.wk, &layer.wv]);
            matmul(
                team,
                &acts,
                n,
                &mut [
                    (&layer.wq, &mut s.q[..n * c.dim]),
                    (&layer.wk, &mut s.k[..n * kv_dim]),
                    (&layer.wv, &mut s.v[..n * kv_dim]),
                ],
            );
            {
                let (q, k, v) = (
                    Shards::new(&mut s.q[..n * c.dim]),
                    Shards::new(&mut s.k[..n * kv_dim]),
                    Shards::new(&mut s.v[..n * kv_dim]),
                );
                let (cos, sin) = (&s.cos, &s.sin);
                per_row(team, n, &|range| {
                    for i in range {
                        // SAFETY: each row is handled by one thread.
                        let (q, k, v) = unsafe {
                            (
                                q.part(i * c.dim..(i + 1) * c.dim),
                                k.part(i * kv_dim..(i + 1) * kv_dim),
                                v.part(i * kv_dim..(i + 1) * kv_dim),
                            )
                        };
                        if let Some([bq, bk, bv]) = &layer.bias {
                            add(q, bq);
                            add(k, bk);
                            add(v, bv);
                        }
                        let (cos, sin) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
                        for head in q.chunks_exact_mut(c.head_dim).chain(k.chunks_exact_mut(c.head_dim)) {
                            rotate(head, cos, sin, c.rope);
                        }
                    }
                });
            }
            for (i, r) in rows.iter().enumerate() {
                for h in 0..c.kv_heads {
                    let head = i * kv_dim + h * c.head_dim..i * kv_dim + (h + 1) * c.head_dim;
                    cache.write(r.slot, l, h, r.pos, &s.k[head.clone()], &s.v[head]);
                }
            }
            attention(team, c, l, rows, cache, &s.q[..n * c.dim], &mut s.partials, &mut s.attn[..n * c.dim]);
            let acts = quantize(team, &mut s.acts, &s.attn[..n * c.dim], c.dim, &[&layer.wo]);
            matmul(team, &acts, n, &mut [(&layer.wo, &mut s.tmp[..n * c.dim])]);

            // Feed-forward.
            let attended = Some(&s.tmp[..n * c.dim]);
            add_and_norm(team, &mut s.x[..n * c.dim], attended, &layer.ffn_norm, c.eps, &mut s.xn[..n * c.dim], c.dim);
            let acts = quantize(team, &mut s.acts, &s.xn[..n * c.dim], c.dim, &[&layer.gate, &layer.up]);
            matmul(team, &acts, n, &mut [(&layer.gate, &mut s.gate[..n * c.ff]), (&layer.up, &mut s.up[..n * c.ff])]);
            {
                let (gate, up) = (Shards::new(&mut s.gate[..n * c.ff]), &s.up);
                per_row(team, n, &|range| {
                    let mut scratch = Vec::new();
                    for i in range {
                        // SAFETY: each row is handled by one thread.
                        let gate = unsafe { gate.part(i * c.ff..(i + 1) * c.ff) };
                        math::swiglu(gate, &up[i * c.ff..(i + 1) * c.ff], &mut scratch);
                    }
                });
            }
            let acts = quantize(team, &mut s.acts, &s.gate[..n * c.ff], c.ff, &[&layer.down]);
            matmul(team, &acts, n, &mut [(&layer.down, &mut s.tmp[..n * c.dim])]);
        }
        add(&mut s.x[..n * c.dim], &s.tmp[..n * c.dim]);

        let wanted: Vec<usize> = (0..n).filter(|&i| rows[i].logits).collect();
        for (j, &i) in wanted.iter().enumerate() {
            let (src, dst) = (i * c.dim, j * c.dim);
            let row = s.x[src..src + c.dim].to_vec();
            math::rms_norm(&row, &self.out_norm, c.eps, &mut s.xn[dst..dst + c.dim]);
        }
        let m = wanted.len();
        // Every value is written by the product, so what the buffer held is
        // not cleared first.
        logits.resize(m * c.vocab, 0.0);
        if m > 0 {
            let acts = quantize(team, &mut s.acts, &s.xn[..m * c.dim], c.dim, &[&self.output]);
            matmul(team, &acts, m, &mut [(&self.output, &mut logits[..])]);
        }
    }
}

fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Runs `f` over rows `0..n`, the rows shared among the team's threads when
/// there are several. Work per row that is left to one thread would keep the
/// other threads waiting between the matrix products of a batched step.
fn per_row(team: &Team, n: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    if n >= 2 && team.size() > 1 {
        team.run(&|id| f(share(n, id, team.size(), 1)));
    } else {
        f(0..n);
    }
}

/// `x += residual` (when given), then `out = rms_norm(x)`, row by row.
fn add_and_norm(
    team: &Team,
    x: &mut [f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    dim: usize,
) {
    let rows = x.len() / dim;
    let (x, out) = (Shards::new(x), Shards::new(out));
    per_row(team, rows, &|range| {
        for i in range {
            let row = i * dim..(i + 1) * dim;
            // SAFETY: each row is handled by one thread.
            let (x, out) = unsafe { (x.part(row.clone()), out.part(row.clone())) };
            if let Some(residual) = residual {
                add(x, &residual[row]);
            }
            math::rms_norm(x, weight, eps, out);
        }
    });
}

fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], rope: Rope) {
    let half = head.len() / 2;
    for j in 0..half {
        let (a, b) = match rope {
            Rope::Interleaved => (2 * j, 2 * j + 1),
            Rope::Halves => (j, j + half),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos[j] - x1 * sin[j];
        head[b] = x0 * sin[j] + x1 * cos[j];
    }
}

/// Quantizes the rows of `x` (`cols` wide) into every activation type the
/// `weights` need.
fn quantize<'a>(team: &Team, bufs: &'a mut [Vec<u64>; 4], x: &[f32], cols: usize, weights: &[&Weight]) -> Acts<'a> {
    let rows = x.len() / cols;
    let mut needed = [false; 4];
    for w in weights {
        needed[act_index(w.wt.activation())] = true;
    }
    let mut views: [&'a [u8]; 4] = [&[]; 4];
    for (i, buf) in bufs.iter_mut().enumerate() {
        if !needed[i] {
            continue;
        }
        let act = [ActType::F32, ActType::Q8_0, ActType::Q8_1, ActType::Q8K][i];
        let row_bytes = act.row_bytes(cols);
        let total = rows * row_bytes;
        if buf.len() * 8 < total {
            buf.resize(total.div_ceil(8), 0);
        }
        // SAFETY: viewing the u64 buffer as bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, total) };
        if rows >= 4 && team.size() > 1 {
            let shards = Shards::new(bytes);
            team.run(&|id| {
                for r in share(rows, id, team.size(), 1) {
                    // SAFETY: each row is written by exactly one thread.
                    let out = unsafe { shards.part(r * row_bytes..(r + 1) * row_bytes) };
                    quant::quantize_row(act, &x[r * cols..(r + 1) * cols], out);
                }
            });
        } else {
            for r in 0..rows {
                quant::quantize_row(act, &x[r * cols..(r + 1) * cols], &mut bytes[r * row_bytes..(r + 1) * row_bytes]);
            }
        }
        views[i] = bytes;
    }
    Acts { cols, bufs: views }
}

/// Weight rows a thread works through before moving to the next group of
/// activation rows, sized so they stay in L2 while every activation row meets them.
const WEIGHT_PANEL_BYTES: usize = 96 * 1024;

/// `out[r][o] = w.row(o) · x[r]` for each (weight, output) pair, all pairs as
/// one job that the team takes in chunks of rows from a [`Cursor`]. Chunks are
/// whole groups, so each output is computed by the same operations wherever it
/// runs.
fn matmul(team: &Team, acts: &Acts, rows: usize, jobs: &mut [(&Weight, &mut [f32])]) {
    // Every matrix counts with its rows rounded up to a whole group, so each
    // chunk starts on a group boundary in every matrix.
    let padded = |w: &Weight| w.rows.next_multiple_of(grouped::GROUP);
    let total: usize = jobs.iter().map(|(w, _)| padded(w)).sum();
    let row_bytes = jobs.iter().map(|(w, _)| w.unit_bytes / w.unit_rows).max().unwrap_or(1);
    let chunk = (MATMUL_CHUNK_BYTES / row_bytes).next_multiple_of(grouped::GROUP).max(grouped::GROUP);
    let outs: Vec<(&Weight, Shards<f32>)> = jobs.iter_mut().map(|(w, out)| (*w, Shards::new(&mut out[..]))).collect();
    let cursor = Cursor::new(total, chunk);
    team.run(&|_| {
        while let Some(Range { start, end }) = cursor.take() {
            let mut base = 0;
            for (w, out) in &outs {
                let (from, to) = (start.max(base), end.min(base + padded(w)));
                if from < to {
                    let units = (from - base) / w.unit_rows..((to - base).min(w.padded_rows())).div_ceil(w.unit_rows);
                    matmul_part(w, acts, rows, units, out);
                }
                base += padded(w);
            }
        }
    });
}

/// Weight bytes a thread takes from the shared cursor at a time: enough that
/// taking a chunk costs nothing beside working through it, few enough that the
/// threads finish a product together.
const MATMUL_CHUNK_BYTES: usize = 32 * 1024;

/// One thread's units (rows or groups) `range` of `w` against all `rows`
/// activation rows, a panel of units at a time.
fn matmul_part(w: &Weight, acts: &Acts, rows: usize, range: Range<usize>, out: &Shards<f32>) {
    let panel = (WEIGHT_PANEL_BYTES / w.unit_bytes).max(8);
    let mut start = range.start;
    while start < range.end {
        let end = (start + panel).min(range.end);
        let part = Part { w, acts, out, panel: start..end };
        if w.unit_rows > 1 {
            // Up to eight activation rows meet each group while it is in L1
            // (a decode step of eight streams reads its weights once, at half
            // the bandwidth two passes would need); the panel stays in L2 for
            // the next eight.
            for first in (0..rows).step_by(grouped::MAX_ACTIVATION_ROWS) {
                part.sweep_groups(first..(first + grouped::MAX_ACTIVATION_ROWS).min(rows));
            }
        } else {
            part.sweep_rows(rows);
        }
        start = end;
    }
}

/// One thread's panel of weight units in a matrix product.
struct Part<'a> {
    w: &'a Weight,
    acts: &'a Acts<'a>,
    out: &'a Shards<'a, f32>,
    panel: Range<usize>,
}

impl Part<'_> {
    /// Output (r, o), which belongs to the thread owning weight row o.
    fn put(&self, r: usize, o: usize, v: f32) {
        let w = self.w;
        // SAFETY: each output is written by the one thread that owns its row.
        unsafe { self.out.part(r * w.rows + o..r * w.rows + o + 1)[0] = v }
    }

    /// Multiplies the panel of f32 rows with every activation row.
    fn sweep_rows(&self, rows: usize) {
        let w = self.w;
        for r in 0..rows {
            let a = self.acts.row(ActType::F32, r);
            for o in self.panel.clone() {
                self.put(r, o, quant::dot_f32(w.unit(o), [a])[0]);
            }
        }
    }

    /// Multiplies each group of the panel with activation rows `acts`.
    fn sweep_groups(&self, acts: Range<usize>) {
        let w = self.w;
        let act = w.wt.activation();
        let mut rows = [&[][..]; grouped::MAX_ACTIVATION_ROWS];
        for (slot, r) in rows.iter_mut().zip(acts.clone()) {
            *slot = self.acts.row(act, r);
        }
        let groups = w.units(self.panel.clone());
        grouped::dot_groups(w.wt, groups, &rows[..acts.len()], w.cols, |g, m, values| {
            // The last group may hold fewer than eight rows.
            let first = (self.panel.start + g) * grouped::GROUP;
            let n = grouped::GROUP.min(w.rows - first);
            let at = (acts.start + m) * w.rows + first;
            // SAFETY: each output is written by the one thread that owns its row.
            let out = unsafe { self.out.part(at..at + n) };
            // A whole group is copied with a known length, so without a call.
            match <&mut [f32; grouped::GROUP]>::try_from(&mut *out) {
                Ok(whole) => *whole = *values,
                Err(_) => out.copy_from_slice(&values[..n]),
            }
        });
    }
}

/// Keys per attention work item: a row's keys are split into chunks at fixed
/// positions, so the work spreads over the threads at any context length, and
/// the result of a row never depends on what else is in the step.
const ATTENTION_CHUNK: usize = 256;

/// Causal attention of each row over its own sequence's cached positions.
///
/// Work items are (row, KV head, chunk of keys): each reads its chunk of f16
/// keys and values once for up to three of the query heads sharing that KV head
/// (grouped-query attention), and leaves per-head partial softmax sums that are
/// merged in chunk order afterwards.
#[allow(clippy::too_many_arguments)]
fn attention(
    team: &Team,
    c: &Config,
    layer: usize,
    rows: &[Row],
    cache: &KvCache,
    q: &[f32],
    partials: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = c.head_dim;
    let group = c.heads / c.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let chunks = rows.iter().map(|r| r.pos / ATTENTION_CHUNK + 1).max().unwrap_or(1);
    // Per (row, head, chunk): max, sum, then the weighted values.
    let stride = hd + 2;
    let len = rows.len() * c.heads * chunks * stride;
    if partials.len() < len {
        partials.resize(len, 0.0);
    }
    let items: Vec<(usize, usize, usize)> = rows
        .iter()
        .enumerate()
        .flat_map(|(i, r)| (0..c.kv_heads).flat_map(move |g| (0..=r.pos / ATTENTION_CHUNK).map(move |ch| (i, g, ch))))
        .collect();
    let at_once = math::heads_at_once(hd);
    let shards = Shards::new(&mut partials[..len]);
    let query_i8 = if cache.reads_q8(rows) { math::QueryI8::new(q, hd) } else { None };
    let cursor = Cursor::new(items.len(), 1);
    team.run(&|_| {
        let mut scores = Vec::with_capacity(at_once * ATTENTION_CHUNK);
        let mut sums = vec![0f32; at_once * hd];
        while let Some(taken) = cursor.take() {
            let (i, g, ch) = items[taken.start];
            let r = rows[i];
            let first = ch * ATTENTION_CHUNK;
            let n = (r.pos + 1 - first).min(ATTENTION_CHUNK);
            let chunk = cache.chunk(r.slot, layer, g, first, n, r.pos);
            // Each item starts two new streams in memory, keys and values:
            // their first lines are asked for together, so neither waits for
            // its first misses one by one (measured at depth 2000: the
            // attention's share of a step about a seventh shorter).
            match chunk {
                KvChunk::F16 { keys, values } => {
                    math::start_fetching(keys);
                    math::start_fetching(values);
                }
                KvChunk::Q8 { keys, values, .. } => {
                    math::start_fetching(keys);
                    math::start_fetching(values);
                }
            }
            let mut h = g * group;
            while h < (g + 1) * group {
                let heads = at_once.min((g + 1) * group - h);
                scores.resize(heads * n, 0.0);
                let run = i * c.dim + h * hd..i * c.dim + (h + heads) * hd;
                let q_i8 = query_i8.as_ref().map(|x| x.get(run.clone()));
                let q = &q[run];
                let value_scales = match chunk {
                    KvChunk::F16 { keys, .. } => {
                        math::grouped_scores(q, heads, keys, None, scale, &mut scores);
                        None
                    }
                    KvChunk::Q8 { keys, key_scales, value_scales, .. } => {
                        math::grouped_scores_i8(q, q_i8, heads, keys, key_scales, scale, &mut scores);
                        Some(value_scales)
                    }
                };
                let mut stats = [(0f32, 0f32); 3];
                for (s, st) in stats.iter_mut().enumerate().take(heads) {
                    *st = math::softmax_weights(&mut scores[s * n..(s + 1) * n]);
                }
                if let Some(value_scales) = value_scales {
                    for weights in scores.chunks_exact_mut(n) {
                        for (w, s) in weights.iter_mut().zip(value_scales) {
                            *w *= s;
                        }
                    }
                }
                match chunk {
                    KvChunk::F16 { values, .. } => {
                        math::grouped_values(&scores, heads, values, &mut sums[..heads * hd])
                    }
                    KvChunk::Q8 { values, .. } => math::grouped_values(&scores, heads, values, &mut sums[..heads * hd]),
                }
                for s in 0..heads {
                    let at = ((i * c.heads + h + s) * chunks + ch) * stride;
                    // SAFETY: each (row, head, chunk) partial is written by one thread.
                    let part = unsafe { shards.part(at..at + stride) };
                    part[0] = stats[s].0;
                    part[1] = stats[s].1;
                    part[2..].copy_from_slice(&sums[s * hd..(s + 1) * hd]);
                }
                h += heads;
            }
        }
    });
    for (i, r) in rows.iter().enumerate() {
        let used = r.pos / ATTENTION_CHUNK + 1;
        for h in 0..c.heads {
            let part = |ch: usize| &partials[((i * c.heads + h) * chunks + ch) * stride..][..stride];
            let max = (0..used).fold(f32::NEG_INFINITY, |m, ch| m.max(part(ch)[0]));
            let o = &mut out[i * c.dim + h * hd..i * c.dim + (h + 1) * hd];
            o.fill(0.0);
            let mut total = 0.0;
            for ch in 0..used {
                let p = part(ch);
                let weight = (p[0] - max).exp();
                total += p[1] * weight;
                for (v, a) in o.iter_mut().zip(&p[2..]) {
                    *v += a * weight;
                }
            }
            let inv = 1.0 / total;
            for v in o.iter_mut() {
                *v *= inv;
            }
        }
    }
}

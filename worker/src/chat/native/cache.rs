//! The KV cache: the keys and values of every sequence served at once, written
//! in place as positions are computed and read by attention a page at a time.
//!
//! At long contexts decoding reads the cache as well as the weights (SmolLM2
//! at 2,000 positions: 46 MB of f16 beside 96 MB of weights), so its bytes set
//! the speed. The mixed store keeps each sequence's latest positions in f16,
//! where attention looks hardest, and reads older ones as 8-bit, about half the
//! bytes. Which form a query reads depends only on its own position, so a row's
//! result never depends on what else shares its step or how its prompt was
//! chunked.

use super::math;
use super::{advise_huge_pages, Config, Row, ATTENTION_CHUNK, HUGE_PAGE};
use natter_shared::config::KvCacheType;

/// Positions per KV page. A slot's positions are stored a page at a time, each
/// page holding every layer and head: a sequence's memory then grows a page at
/// a time on huge pages (a layer-major layout would commit the whole slot at
/// its first token, since one huge page would span the start of many heads).
/// Equal to [`ATTENTION_CHUNK`], so each attention item reads one contiguous
/// run of keys and one of values.
pub(super) const KV_PAGE: usize = ATTENTION_CHUNK;

/// Pages a query reads in f16 from the mixed store: its own and the one
/// before, so its latest 256 to 511 positions are exact to f16.
const RECENT_PAGES: usize = 2;

/// Keys and values for `slots` sequences of up to `window` positions each,
/// allocated once and written in place. Memory is committed only where
/// positions are written, so it grows with the positions actually used.
pub struct KvCache {
    slots: usize,
    window: usize,
    /// Pages of [`KV_PAGE`] positions per slot.
    pages: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    store: KvStore,
}

/// Pages are laid out as `[slot][page][layer][kv head][position in page][head_dim]`.
enum KvStore {
    F16(F16Pages),
    Q8(Q8Pages),
    /// Every position in 8 bits, and each slot's latest pages again in f16 in
    /// a ring of `ring` pages, page `p` at `p % ring`. The ring holds the
    /// pages one step reads in f16 and writes (see [`ring_pages`]).
    Mixed {
        old: Q8Pages,
        recent: F16Pages,
        ring: usize,
    },
}

struct F16Pages {
    k: KvArray<u16>,
    v: KvArray<u16>,
}

/// i8 values with one scale per (page, layer, kv head, position).
struct Q8Pages {
    k: KvArray<i8>,
    v: KvArray<i8>,
    k_scales: Vec<f32>,
    v_scales: Vec<f32>,
}

/// One page's run of a KV head's positions, as attention reads it.
#[derive(Clone, Copy)]
pub(super) enum KvChunk<'a> {
    F16 { keys: &'a [u16], values: &'a [u16] },
    Q8 { keys: &'a [i8], values: &'a [i8], key_scales: &'a [f32], value_scales: &'a [f32] },
}

impl F16Pages {
    fn new(values: usize) -> F16Pages {
        F16Pages { k: KvArray::zeroed(values), v: KvArray::zeroed(values) }
    }

    fn bytes(&self) -> usize {
        (self.k.len + self.v.len) * 2
    }

    fn write(&mut self, at: usize, key: &[f32], value: &[f32]) {
        let range = at * key.len()..(at + 1) * key.len();
        math::to_f16_bits(key, &mut self.k.get_mut()[range.clone()]);
        math::to_f16_bits(value, &mut self.v.get_mut()[range]);
    }

    fn chunk(&self, at: usize, n: usize, head_dim: usize) -> KvChunk<'_> {
        let range = at * head_dim..(at + n) * head_dim;
        KvChunk::F16 { keys: &self.k.get()[range.clone()], values: &self.v.get()[range] }
    }
}

impl Q8Pages {
    fn new(values: usize, head_dim: usize) -> Q8Pages {
        let positions = values / head_dim;
        Q8Pages {
            k: KvArray::zeroed(values),
            v: KvArray::zeroed(values),
            k_scales: vec![0.0; positions],
            v_scales: vec![0.0; positions],
        }
    }

    fn bytes(&self) -> usize {
        self.k.len + self.v.len + (self.k_scales.len() + self.v_scales.len()) * 4
    }

    fn write(&mut self, at: usize, key: &[f32], value: &[f32]) {
        let range = at * key.len()..(at + 1) * key.len();
        self.k_scales[at] = math::to_i8(key, &mut self.k.get_mut()[range.clone()]);
        self.v_scales[at] = math::to_i8(value, &mut self.v.get_mut()[range]);
    }

    fn chunk(&self, at: usize, n: usize, head_dim: usize) -> KvChunk<'_> {
        let range = at * head_dim..(at + n) * head_dim;
        KvChunk::Q8 {
            keys: &self.k.get()[range.clone()],
            values: &self.v.get()[range],
            key_scales: &self.k_scales[at..at + n],
            value_scales: &self.v_scales[at..at + n],
        }
    }
}

/// Ring pages per slot of the mixed store. In one step a slot writes its rows'
/// pages (up to `step_tokens` consecutive positions: their first page plus
/// `(step_tokens - 1) / KV_PAGE` rounded up) while its earliest row still
/// reads the page before its own in f16, so all of those must be in the ring
/// at once.
fn ring_pages(step_tokens: usize, pages: usize) -> usize {
    (RECENT_PAGES + (step_tokens.max(1) - 1).div_ceil(KV_PAGE)).min(pages)
}

impl KvCache {
    /// A cache for `slots` sequences of `window` positions, each step of the
    /// forward pass carrying at most `step_tokens` rows of one sequence.
    pub fn new(config: &Config, slots: usize, window: usize, step_tokens: usize, kind: KvCacheType) -> KvCache {
        let pages = window.div_ceil(KV_PAGE);
        let page_values = KV_PAGE * config.layers * config.kv_heads * config.head_dim;
        let values = slots * pages * page_values;
        let store = match kind {
            KvCacheType::F16 => KvStore::F16(F16Pages::new(values)),
            KvCacheType::Q8 => KvStore::Q8(Q8Pages::new(values, config.head_dim)),
            KvCacheType::Mixed => {
                let ring = ring_pages(step_tokens, pages);
                KvStore::Mixed {
                    old: Q8Pages::new(values, config.head_dim),
                    recent: F16Pages::new(slots * ring * page_values),
                    ring,
                }
            }
        };
        KvCache {
            slots,
            window,
            pages,
            layers: config.layers,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            store,
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Bytes the cache may grow to.
    pub fn capacity_bytes(&self) -> usize {
        match &self.store {
            KvStore::F16(pages) => pages.bytes(),
            KvStore::Q8(pages) => pages.bytes(),
            KvStore::Mixed { old, recent, .. } => old.bytes() + recent.bytes(),
        }
    }

    /// Whether attention for any of `rows` reads 8-bit keys, and so wants
    /// 8-bit queries.
    pub(super) fn reads_q8(&self, rows: &[Row]) -> bool {
        match self.store {
            KvStore::F16(_) => false,
            KvStore::Q8(_) => true,
            KvStore::Mixed { .. } => rows.iter().any(|r| r.pos / KV_PAGE >= RECENT_PAGES),
        }
    }

    /// Checks that a step's rows fit the cache: each inside its slot's window,
    /// and each slot's rows within the pages the mixed store's ring holds.
    pub(super) fn check(&self, rows: &[Row]) {
        for r in rows {
            assert!(r.slot < self.slots && r.pos < self.window, "row outside the KV cache: {r:?}");
        }
        let KvStore::Mixed { ring, .. } = self.store else { return };
        if ring == self.pages {
            return;
        }
        let mut pages = vec![(usize::MAX, 0); self.slots];
        for r in rows {
            let (first, last) = &mut pages[r.slot];
            *first = (*first).min(r.pos / KV_PAGE);
            *last = (*last).max(r.pos / KV_PAGE);
        }
        for (slot, &(first, last)) in pages.iter().enumerate() {
            assert!(
                first == usize::MAX || last - first + RECENT_PAGES <= ring,
                "slot {slot}'s rows span more pages than the KV ring holds"
            );
        }
    }

    /// Where position `in_page` of a head is stored in `page`, counted in
    /// positions; the positions of one page follow each other.
    fn index(&self, page: usize, layer: usize, head: usize, in_page: usize) -> usize {
        page * self.page_positions() + (layer * self.kv_heads + head) * KV_PAGE + in_page
    }

    /// Positions of every layer and head in one page.
    fn page_positions(&self) -> usize {
        self.layers * self.kv_heads * KV_PAGE
    }

    /// Stores a head's key and value for position `pos` of `slot`.
    pub(super) fn write(&mut self, slot: usize, layer: usize, head: usize, pos: usize, key: &[f32], value: &[f32]) {
        let page = pos / KV_PAGE;
        let in_page = self.index(0, layer, head, pos % KV_PAGE);
        let page_positions = self.page_positions();
        let at = (slot * self.pages + page) * page_positions + in_page;
        match &mut self.store {
            KvStore::F16(pages) => pages.write(at, key, value),
            KvStore::Q8(pages) => pages.write(at, key, value),
            KvStore::Mixed { old, recent, ring } => {
                old.write(at, key, value);
                recent.write((slot * *ring + page % *ring) * page_positions + in_page, key, value);
            }
        }
    }

    /// Positions `first..first + n` (within one page) of a head, as the query
    /// at `query_pos` of the same slot reads them.
    pub(super) fn chunk(
        &self,
        slot: usize,
        layer: usize,
        head: usize,
        first: usize,
        n: usize,
        query_pos: usize,
    ) -> KvChunk<'_> {
        let (page, in_page) = (first / KV_PAGE, first % KV_PAGE);
        debug_assert!(in_page + n <= KV_PAGE && first + n <= query_pos + 1);
        let at = self.index(slot * self.pages + page, layer, head, in_page);
        let hd = self.head_dim;
        match &self.store {
            KvStore::F16(pages) => pages.chunk(at, n, hd),
            KvStore::Q8(pages) => pages.chunk(at, n, hd),
            KvStore::Mixed { recent, ring, .. } if page + RECENT_PAGES > query_pos / KV_PAGE => {
                recent.chunk(self.index(slot * ring + page % ring, layer, head, in_page), n, hd)
            }
            KvStore::Mixed { old, .. } => old.chunk(at, n, hd),
        }
    }
}

/// A zeroed array that starts on a 2 MiB boundary and asks for transparent
/// huge pages. Attention streams megabytes of keys and values per token, and on
/// 4 KiB pages the prefetchers stop and the TLB misses every 4 KiB. The array
/// comes zeroed from the system allocator (calloc of a fresh mapping), so
/// nothing is touched, and nothing committed, before a position is written.
struct KvArray<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> KvArray<T> {
    fn zeroed(len: usize) -> KvArray<T> {
        let size = std::mem::size_of::<T>();
        let buf = vec![T::default(); len + HUGE_PAGE / size];
        let addr = buf.as_ptr() as usize;
        let start = (addr.next_multiple_of(HUGE_PAGE) - addr) / size;
        advise_huge_pages(buf[start..].as_ptr().cast(), len * size);
        KvArray { buf, start, len }
    }

    fn get(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

//! Paged KV-cache accounting: fixed-size blocks in two pools, per-sequence block tables.
//!
//! GPT-OSS alternates full-attention and sliding-window layers, and the two kinds of layer need
//! very different amounts of cache:
//!
//! - a **full** layer keeps every position, so a sequence of `len` tokens holds
//!   `ceil(len / block_size)` blocks, growing with the context;
//! - a **sliding** layer only ever looks at the last `sliding_window` keys (a query at index `t`
//!   sees `t - window + 1 ..= t`), so once decoding a sequence holds at most
//!   `ceil(window / block_size) + 1` blocks, whatever its length: the block whose keys all fell
//!   out of the window is returned to the pool and reused.
//!
//! Mixing both in one pool would either waste most of the sliding layers' memory or make the
//! accounting wrong, so there are two [`Pool`]s with their own block counts. A block id names
//! the same slot in *every* layer of its kind (as in vLLM: one block of the full pool is
//! `block_size` positions of K and V in each full layer), which is why a block's size in bytes
//! depends on the number of layers of that kind ([`KvLayout::block_bytes`]).
//!
//! **Source of truth.** The [`KvBlockManager`] decides admission and preemption for every
//! backend. Both backends still store each sequence's K/V in their own per-sequence buffers, so
//! the block tables are accounting (the numbers are exact: they are what a paged store would
//! hold). The CUDA backend allocates each sequence's full-attention cache in steps of 256
//! positions, so a sequence holds at most one step more than its blocks count, and `serve`
//! reserves that slack when it sizes the pools from `--gpu-memory-utilization`. A paged store
//! (`num_blocks` slots per pool allocated up front, attention reading each sequence's block
//! table, [`KvBlockManager::block_table`]; sliding layers indexing theirs as a window of logical
//! blocks, `logical = position / block_size`, see [`BlockTable`]) belongs with the paged-KV
//! attention of the tensor-core prefill work.
//!
//! **Chunked prefill and the window.** While a prefill chunk `[start, end)` runs, the sliding
//! layers must hold the keys of the whole chunk plus the `window - 1` keys before its first
//! query, i.e. up to `ceil((window - 1 + chunk) / block_size) + 1` blocks for the duration of the
//! step. [`KvBlockManager::allocate_step`] takes them before the step and
//! [`KvBlockManager::finish_step`] gives back the ones that fell out of the window afterwards, so
//! between steps every sequence is back to at most `ceil(window / block_size) + 1` sliding blocks.

use std::collections::{HashMap, VecDeque};

use gptoss_formats::GptOssConfig;

use crate::backend::SeqId;

/// Default number of token positions per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Identifies a block within its pool.
pub type BlockId = u32;

/// The two block pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pool {
    /// Blocks of the full-attention layers.
    Full,
    /// Blocks of the sliding-window layers.
    Sliding,
}

impl Pool {
    /// Both pools, full first.
    pub const ALL: [Pool; 2] = [Pool::Full, Pool::Sliding];

    /// `"full"` or `"sliding"` (metric labels, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Full => "full",
            Pool::Sliding => "sliding",
        }
    }
}

/// The shape of a model's KV cache, from which block counts and sizes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Token positions per block.
    pub block_size: usize,
    /// Number of full-attention layers.
    pub full_layers: usize,
    /// Number of sliding-window layers.
    pub sliding_layers: usize,
    /// Width of K (and of V) per position and layer, in elements.
    pub kv_dim: usize,
    /// The sliding window in tokens (meaningless when `sliding_layers == 0`).
    pub sliding_window: usize,
    /// Bytes per stored element: 2 for a bf16 cache (CUDA), 4 for the f32 CPU reference.
    pub dtype_bytes: usize,
}

impl KvLayout {
    /// The layout of `cfg` with `block_size` positions per block and `dtype_bytes` per element.
    pub fn from_config(cfg: &GptOssConfig, block_size: usize, dtype_bytes: usize) -> Self {
        let full_layers = cfg.num_full_layers();
        KvLayout {
            block_size: block_size.max(1),
            full_layers,
            sliding_layers: cfg.num_hidden_layers - full_layers,
            kv_dim: cfg.kv_dim(),
            sliding_window: cfg.sliding_window.max(1),
            dtype_bytes,
        }
    }

    /// Bytes of one block of `pool` (K and V of `block_size` positions in every layer of that
    /// kind).
    pub fn block_bytes(&self, pool: Pool) -> u64 {
        let layers = match pool {
            Pool::Full => self.full_layers,
            Pool::Sliding => self.sliding_layers,
        };
        (layers * 2 * self.kv_dim * self.dtype_bytes * self.block_size) as u64
    }

    /// Whether the model has layers of this kind (a pool without layers needs no blocks).
    pub fn has(&self, pool: Pool) -> bool {
        match pool {
            Pool::Full => self.full_layers > 0,
            Pool::Sliding => self.sliding_layers > 0,
        }
    }

    /// Sliding blocks one sequence holds between steps, at most: `ceil(window / block) + 1`.
    pub fn sliding_blocks_per_seq(&self) -> usize {
        if self.sliding_layers == 0 {
            0
        } else {
            self.sliding_window.div_ceil(self.block_size) + 1
        }
    }

    /// Full blocks for a sequence of `len` tokens: `ceil(len / block)`.
    pub fn full_blocks_for(&self, len: usize) -> usize {
        if self.full_layers == 0 {
            0
        } else {
            len.div_ceil(self.block_size)
        }
    }

    /// Sliding blocks held while a step feeds positions `start..end` (keys from
    /// `start - window + 1` to `end - 1`).
    pub fn sliding_blocks_for_step(&self, start: usize, end: usize) -> usize {
        if self.sliding_layers == 0 || end <= start {
            return 0;
        }
        let first = (start + 1).saturating_sub(self.sliding_window) / self.block_size;
        let last = (end - 1) / self.block_size;
        last - first + 1
    }

    /// The most sliding blocks one sequence holds during a step of at most `chunk` tokens.
    pub fn max_sliding_blocks_per_step(&self, chunk: usize) -> usize {
        if self.sliding_layers == 0 {
            return 0;
        }
        let chunk = chunk.max(1);
        let w = self.sliding_window;
        (w..w + self.block_size)
            .map(|s| self.sliding_blocks_for_step(s, s + chunk))
            .max()
            .unwrap_or(0)
            .max(self.sliding_blocks_per_seq())
    }

    /// Block counts for a memory budget: the sliding pool gets what `max_num_seqs` decoding
    /// sequences plus one prefill chunk of `max_chunk` tokens need, the full pool the rest.
    ///
    /// Fails when the budget cannot hold one sequence of `max_model_len` tokens.
    pub fn plan(
        &self,
        budget_bytes: u64,
        max_num_seqs: usize,
        max_model_len: usize,
        max_chunk: usize,
    ) -> Result<KvCacheConfig, String> {
        let sliding_blocks = if self.has(Pool::Sliding) {
            max_num_seqs * self.sliding_blocks_per_seq() + max_chunk.div_ceil(self.block_size) + 1
        } else {
            0
        };
        let sliding_bytes = sliding_blocks as u64 * self.block_bytes(Pool::Sliding);
        let full_block = self.block_bytes(Pool::Full);
        let full_blocks = if self.has(Pool::Full) {
            (budget_bytes.saturating_sub(sliding_bytes) / full_block) as usize
        } else {
            0
        };
        let cfg = KvCacheConfig {
            layout: *self,
            num_full_blocks: full_blocks,
            num_sliding_blocks: sliding_blocks,
        };
        cfg.check_fits(max_model_len, max_chunk).map_err(|e| {
            format!(
                "{e}: a KV-cache budget of {:.1} MiB is too small ({} B per token in full layers, \
                 {:.1} MiB reserved for the sliding layers of {max_num_seqs} sequences); \
                 give the cache more memory or lower --max-model-len / --max-num-seqs",
                budget_bytes as f64 / (1 << 20) as f64,
                full_block / self.block_size as u64,
                sliding_bytes as f64 / (1 << 20) as f64,
            )
        })?;
        Ok(cfg)
    }
}

/// The capacity of both pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Block and model shape.
    pub layout: KvLayout,
    /// Blocks in the full-attention pool.
    pub num_full_blocks: usize,
    /// Blocks in the sliding-window pool.
    pub num_sliding_blocks: usize,
}

impl KvCacheConfig {
    /// Explicit block counts.
    pub fn with_blocks(
        layout: KvLayout,
        num_full_blocks: usize,
        num_sliding_blocks: usize,
    ) -> Self {
        KvCacheConfig {
            layout,
            num_full_blocks,
            num_sliding_blocks,
        }
    }

    /// Blocks in `pool`.
    pub fn num_blocks(&self, pool: Pool) -> usize {
        match pool {
            Pool::Full => self.num_full_blocks,
            Pool::Sliding => self.num_sliding_blocks,
        }
    }

    /// Total bytes of both pools.
    pub fn total_bytes(&self) -> u64 {
        Pool::ALL
            .iter()
            .map(|&p| self.num_blocks(p) as u64 * self.layout.block_bytes(p))
            .sum()
    }

    /// Tokens one sequence could hold if it had the full pool to itself.
    pub fn max_tokens_per_seq(&self) -> usize {
        if self.layout.has(Pool::Full) {
            self.num_full_blocks * self.layout.block_size
        } else {
            usize::MAX
        }
    }

    /// Checks that a single sequence of `max_model_len` tokens, prefilled in chunks of at most
    /// `max_chunk` tokens, always fits when it is alone: then the scheduler can always make
    /// progress by preempting others.
    pub fn check_fits(&self, max_model_len: usize, max_chunk: usize) -> Result<(), String> {
        let l = &self.layout;
        let full = l.full_blocks_for(max_model_len);
        if full > self.num_full_blocks {
            return Err(format!(
                "one sequence of {max_model_len} tokens needs {full} full-attention blocks but the pool has {}",
                self.num_full_blocks
            ));
        }
        let sliding = l.max_sliding_blocks_per_step(max_chunk);
        if l.has(Pool::Sliding) && sliding > self.num_sliding_blocks {
            return Err(format!(
                "one sequence needs up to {sliding} sliding-window blocks but the pool has {}",
                self.num_sliding_blocks
            ));
        }
        Ok(())
    }
}

/// Used and total blocks of both pools.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    /// Full-attention blocks in use.
    pub full_used: usize,
    /// Full-attention blocks in the pool.
    pub full_total: usize,
    /// Sliding-window blocks in use.
    pub sliding_used: usize,
    /// Sliding-window blocks in the pool.
    pub sliding_total: usize,
}

impl KvUsage {
    /// Blocks in use in `pool`.
    pub fn used(&self, pool: Pool) -> usize {
        match pool {
            Pool::Full => self.full_used,
            Pool::Sliding => self.sliding_used,
        }
    }

    /// Blocks in `pool`.
    pub fn total(&self, pool: Pool) -> usize {
        match pool {
            Pool::Full => self.full_total,
            Pool::Sliding => self.sliding_total,
        }
    }

    /// Free blocks in `pool`.
    pub fn free(&self, pool: Pool) -> usize {
        self.total(pool) - self.used(pool)
    }

    /// Blocks in use in both pools.
    pub fn total_used(&self) -> usize {
        self.full_used + self.sliding_used
    }
}

/// Extra blocks a step needs, per pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockDemand {
    /// New full-attention blocks.
    pub full: usize,
    /// New sliding-window blocks.
    pub sliding: usize,
}

/// Not enough free blocks for a step (nothing was allocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: need {} full + {} sliding, {free_full} full + {free_sliding} free", need.full, need.sliding)]
pub struct OutOfBlocks {
    /// What the step needed.
    pub need: BlockDemand,
    /// Free full blocks.
    pub free_full: usize,
    /// Free sliding blocks.
    pub free_sliding: usize,
}

/// One sequence's blocks.
///
/// `full[i]` holds positions `i * block_size ..`; `sliding` holds the logical blocks
/// `sliding_first ..` (logical block `b` = positions `b * block_size ..`), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    /// Full-attention blocks, by logical index.
    pub full: Vec<BlockId>,
    /// Logical index of `sliding[0]`.
    pub sliding_first: usize,
    /// Sliding-window blocks for logical blocks `sliding_first ..`.
    pub sliding: VecDeque<BlockId>,
}

impl BlockTable {
    /// Number of blocks held in both pools.
    pub fn num_blocks(&self) -> usize {
        self.full.len() + self.sliding.len()
    }
}

#[derive(Debug)]
struct BlockPool {
    total: usize,
    /// Free ids; allocation pops from the end (lowest ids first).
    free: Vec<BlockId>,
}

impl BlockPool {
    fn new(total: usize) -> Self {
        BlockPool {
            total,
            free: (0..total as BlockId).rev().collect(),
        }
    }

    fn used(&self) -> usize {
        self.total - self.free.len()
    }
}

/// Allocates KV blocks to sequences: two pools, one [`BlockTable`] per sequence, all-or-nothing
/// allocation per step.
#[derive(Debug)]
pub struct KvBlockManager {
    cfg: KvCacheConfig,
    full: BlockPool,
    sliding: BlockPool,
    tables: HashMap<SeqId, BlockTable>,
}

impl KvBlockManager {
    /// Empty pools of the configured sizes.
    pub fn new(cfg: KvCacheConfig) -> Self {
        KvBlockManager {
            full: BlockPool::new(cfg.num_full_blocks),
            sliding: BlockPool::new(cfg.num_sliding_blocks),
            tables: HashMap::new(),
            cfg,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// The layout.
    pub fn layout(&self) -> &KvLayout {
        &self.cfg.layout
    }

    /// Used and total blocks.
    pub fn usage(&self) -> KvUsage {
        KvUsage {
            full_used: self.full.used(),
            full_total: self.full.total,
            sliding_used: self.sliding.used(),
            sliding_total: self.sliding.total,
        }
    }

    /// The blocks of `seq`, if it holds any table.
    pub fn block_table(&self, seq: SeqId) -> Option<&BlockTable> {
        self.tables.get(&seq)
    }

    /// Number of sequences holding a table.
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }

    /// The logical sliding blocks a step over `start..end` needs: `first..=last`.
    fn sliding_range(&self, start: usize, end: usize) -> (usize, usize) {
        let l = &self.cfg.layout;
        let first = (start + 1).saturating_sub(l.sliding_window) / l.block_size;
        let last = (end - 1) / l.block_size;
        (first, last)
    }

    /// New blocks `seq` needs to run a step that feeds positions `start..end`.
    pub fn demand(&self, seq: SeqId, start: usize, end: usize) -> BlockDemand {
        if end <= start {
            return BlockDemand::default();
        }
        let l = &self.cfg.layout;
        let table = self.tables.get(&seq);
        let full = if l.has(Pool::Full) {
            let have = table.map_or(0, |t| t.full.len());
            l.full_blocks_for(end).saturating_sub(have)
        } else {
            0
        };
        let sliding = if l.has(Pool::Sliding) {
            let (first, last) = self.sliding_range(start, end);
            // Held logical blocks are `sf .. sf + len`; needed are `first..=last`.
            let (sf, len) = table.map_or((first, 0), |t| (t.sliding_first, t.sliding.len()));
            let held_end = sf + len; // exclusive
            if len == 0 {
                last - first + 1
            } else {
                (last + 1).saturating_sub(held_end.max(first))
            }
        } else {
            0
        };
        BlockDemand { full, sliding }
    }

    /// Whether `demand` fits in the free blocks.
    pub fn can_allocate(&self, demand: BlockDemand) -> bool {
        demand.full <= self.full.free.len() && demand.sliding <= self.sliding.free.len()
    }

    /// Free blocks of both pools.
    pub fn free_blocks(&self) -> BlockDemand {
        BlockDemand {
            full: self.full.free.len(),
            sliding: self.sliding.free.len(),
        }
    }

    /// Makes sure `seq` holds every block a step feeding positions `start..end` writes or reads.
    /// All-or-nothing: on error nothing changed.
    pub fn allocate_step(
        &mut self,
        seq: SeqId,
        start: usize,
        end: usize,
    ) -> Result<(), OutOfBlocks> {
        let need = self.demand(seq, start, end);
        if !self.can_allocate(need) {
            return Err(OutOfBlocks {
                need,
                free_full: self.full.free.len(),
                free_sliding: self.sliding.free.len(),
            });
        }
        if end <= start {
            return Ok(());
        }
        let has_sliding = self.cfg.layout.has(Pool::Sliding);
        let (first, last) = if has_sliding {
            self.sliding_range(start, end)
        } else {
            (0, 0)
        };
        let table = self.tables.entry(seq).or_default();
        for _ in 0..need.full {
            table.full.push(self.full.free.pop().expect("checked"));
        }
        if has_sliding && need.sliding > 0 {
            if table.sliding.is_empty() {
                table.sliding_first = first;
            }
            // Blocks are only ever appended at the end (positions grow).
            while table.sliding_first + table.sliding.len() <= last {
                table
                    .sliding
                    .push_back(self.sliding.free.pop().expect("checked"));
            }
        }
        Ok(())
    }

    /// After a step, `seq` holds `len` positions: returns the sliding blocks whose keys no later
    /// query can see (the next query, at index `len`, sees `len - window + 1 ..= len`).
    pub fn finish_step(&mut self, seq: SeqId, len: usize) {
        let l = self.cfg.layout;
        if !l.has(Pool::Sliding) {
            return;
        }
        let Some(table) = self.tables.get_mut(&seq) else {
            return;
        };
        let keep_from = (len + 1).saturating_sub(l.sliding_window) / l.block_size;
        while table.sliding_first < keep_from {
            match table.sliding.pop_front() {
                Some(b) => self.sliding.free.push(b),
                None => {
                    table.sliding_first = keep_from;
                    break;
                }
            }
            table.sliding_first += 1;
        }
    }

    /// Frees every block of `seq` at once; returns how many.
    pub fn free(&mut self, seq: SeqId) -> usize {
        let Some(table) = self.tables.remove(&seq) else {
            return 0;
        };
        let n = table.num_blocks();
        self.full.free.extend(table.full.iter().rev());
        self.sliding.free.extend(table.sliding.iter().rev());
        n
    }

    /// Checks the invariants: no block is both free and held, no block is held twice, and
    /// used + free = total in each pool.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (pool, p) in [(Pool::Full, &self.full), (Pool::Sliding, &self.sliding)] {
            let mut owner = vec![None; p.total];
            for &b in &p.free {
                let slot = owner
                    .get_mut(b as usize)
                    .ok_or_else(|| format!("{} block {b} out of range", pool.as_str()))?;
                if slot.is_some() {
                    return Err(format!("{} block {b} is free twice", pool.as_str()));
                }
                *slot = Some(None);
            }
            for (&seq, t) in &self.tables {
                let blocks: Vec<BlockId> = match pool {
                    Pool::Full => t.full.clone(),
                    Pool::Sliding => t.sliding.iter().copied().collect(),
                };
                for b in blocks {
                    let slot = owner
                        .get_mut(b as usize)
                        .ok_or_else(|| format!("{} block {b} out of range", pool.as_str()))?;
                    match slot {
                        Some(None) => {
                            return Err(format!(
                                "{} block {b} is both free and held by sequence {seq}",
                                pool.as_str()
                            ));
                        }
                        Some(Some(other)) => {
                            return Err(format!(
                                "{} block {b} is held by sequences {other} and {seq}",
                                pool.as_str()
                            ));
                        }
                        None => *slot = Some(Some(seq)),
                    }
                }
            }
            if let Some(b) = owner.iter().position(Option::is_none) {
                return Err(format!(
                    "{} block {b} is neither free nor held",
                    pool.as_str()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small layout (blocks of 4, window 8) for unit tests, here and in the scheduler's.
    pub(crate) fn layout() -> KvLayout {
        KvLayout {
            block_size: 4,
            full_layers: 1,
            sliding_layers: 1,
            kv_dim: 8,
            sliding_window: 8,
            dtype_bytes: 2,
        }
    }

    #[test]
    fn block_counts() {
        let l = layout();
        assert_eq!(l.sliding_blocks_per_seq(), 3);
        assert_eq!(l.full_blocks_for(0), 0);
        assert_eq!(l.full_blocks_for(1), 1);
        assert_eq!(l.full_blocks_for(8), 2);
        assert_eq!(l.full_blocks_for(9), 3);
        // Decode at index 20 sees 13..=20: blocks 3, 4, 5.
        assert_eq!(l.sliding_blocks_for_step(20, 21), 3);
        // Prefill 0..10: blocks 0, 1, 2.
        assert_eq!(l.sliding_blocks_for_step(0, 10), 3);
        // A chunk 16..32 reads keys from 9: blocks 2..=7.
        assert_eq!(l.sliding_blocks_for_step(16, 32), 6);
        assert_eq!(l.block_bytes(Pool::Full), 2 * 8 * 2 * 4);
    }

    #[test]
    fn sliding_blocks_are_recycled() {
        let mut m = KvBlockManager::new(KvCacheConfig::with_blocks(layout(), 100, 10));
        m.allocate_step(1, 0, 10).unwrap();
        m.finish_step(1, 10);
        // Next query (index 10) sees 3..=10: logical blocks 0..=2 are all still needed.
        assert_eq!(m.usage().sliding_used, 3);
        for pos in 10..40 {
            m.allocate_step(1, pos, pos + 1).unwrap();
            m.finish_step(1, pos + 1);
            assert!(m.usage().sliding_used <= 3, "at {pos}: {:?}", m.usage());
            m.check_invariants().unwrap();
        }
        assert_eq!(m.usage().full_used, 10);
        let held = m.usage().total_used();
        assert_eq!(m.free(1), held);
        assert_eq!(m.usage().total_used(), 0);
        m.check_invariants().unwrap();
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut m = KvBlockManager::new(KvCacheConfig::with_blocks(layout(), 3, 10));
        m.allocate_step(1, 0, 8).unwrap();
        let err = m.allocate_step(2, 0, 8).unwrap_err();
        assert_eq!(err.need.full, 2);
        assert_eq!(m.usage().full_used, 2);
        assert!(m.block_table(2).is_none());
        m.check_invariants().unwrap();
        m.free(1);
        m.allocate_step(2, 0, 8).unwrap();
        m.check_invariants().unwrap();
    }

    #[test]
    fn plan_from_budget() {
        let l = layout();
        let cfg = l.plan(1 << 20, 4, 64, 16).unwrap();
        assert_eq!(cfg.num_sliding_blocks, 4 * 3 + 4 + 1);
        assert!(cfg.num_full_blocks > 16);
        assert!(cfg.total_bytes() <= 1 << 20);
        assert!(l.plan(1000, 4, 64, 16).is_err());
    }
}

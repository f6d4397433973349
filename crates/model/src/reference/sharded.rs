//! # Tensor and expert parallelism: the sharding plan, collectives, and a sharded reference forward
//!
//! One model split over `world` ranks (GPUs, or threads in tests). Every rank holds the residual
//! stream `x` (`[T, hidden]`) in full and bitwise identical to its peers; the work inside each
//! block is split, and two `all_reduce_sum`s per layer plus one `all_gather` at the end put the
//! pieces back together:
//!
//! ```text
//! x = embed[ids]                                           replicated
//! per layer:
//!   h = rmsnorm(x)                                         replicated
//!   q, k, v = h @ Wq/Wk/Wv[rows of MY heads].T + b[...]    tensor parallel: whole GQA groups
//!   rope; attention with MY sinks over MY kv cache         (kv heads never cross ranks)
//!   p = o_heads @ Wo[:, MY columns].T  (+ bo on rank 0)    partial o_proj
//!   x += all_reduce_sum(p)
//!   h = rmsnorm(x); r = router(h); top-k                   replicated: identical top-k everywhere
//!   p = Σ_{routed e in MY experts} w_e · expert_e(h)       expert parallel
//!   x += all_reduce_sum(p)
//! logits = all_gather(rmsnorm(x) @ lm_head[MY vocab rows].T)   vocab parallel
//! ```
//!
//! ## Why these splits
//!
//! - **Attention by GQA group** (Megatron-style column/row parallel): kv head `g` and its query
//!   heads `group·g .. group·(g+1)` (8g..8g+7 for the real models) live on one rank, so attention
//!   needs no communication at all and each rank's KV cache holds only its kv heads (the KV
//!   cache, the largest activation memory, is split `world` ways without duplication). Hence
//!   `world` must divide `num_key_value_heads` (8): 1, 2, 4 or 8 ranks ([`ShardError`]).
//!   Splitting a group (world 16) would replicate kv heads; not supported.
//! - **o_proj by input columns**: the rank's heads are a contiguous column range of `Wo`, so it
//!   computes a partial `[T, hidden]` sum; one all-reduce adds the partials. The bias is added by
//!   rank 0 only, so it is counted once.
//! - **Experts by contiguous blocks** (expert parallelism): rank `r` owns experts
//!   `[r·E/world, (r+1)·E/world)`; when `E` is not divisible the first `E mod world` ranks own one
//!   more ([`ShardPlan::experts`]). The router is tiny and replicated: since `x` is bitwise
//!   identical on all ranks and the router matmul is deterministic, every rank selects the same
//!   top-k and the same weights, with no broadcast. Each rank runs only the (token, expert) pairs
//!   it owns, weights them (down bias inside the weighting) and one all-reduce sums them. This
//!   keeps the layer's communication at one `[T, hidden]` all-reduce, the right trade for decode
//!   and small prefill batches (an all-to-all token dispatch pays off only for large batches).
//! - **lm_head by vocabulary rows** (contiguous slices of `⌈V/world⌉` rows, the last one may be
//!   shorter): each rank computes its slice of the logits, an all-gather concatenates them.
//!   Every collective buffer has the same length on every rank (the last slice is padded with
//!   zeros to `⌈V/world⌉` and trimmed after), as `ncclAllGather` requires.
//! - **Replicated**: the embeddings (a row lookup; a vocab-parallel embedding would save
//!   `V·H·2` bytes per rank at the cost of one more all-reduce), the norms, the router and the
//!   final norm. Of the sinks, a rank needs only its query heads'.
//!
//! ## What one rank loads ("each GPU loads only its shard straight from the safetensors")
//!
//! With `G = kv_heads / world` kv heads per rank, `hd = head_dim`, `group = heads / kv_heads`,
//! `rank = r` (real models: `hd = 64`, `group = 8`, `H = 2880`, so q rows per rank = `512·G`):
//!
//! | tensor (transformers name, per layer `L`) | logical shape | rank `r` needs |
//! |---|---|---|
//! | `model.embed_tokens.weight` | `[V, H]` | all rows |
//! | `layers.L.input_layernorm.weight`, `post_attention_layernorm.weight` | `[H]` | all |
//! | `layers.L.self_attn.q_proj.weight` / `.bias` | `[heads·hd, H]` / `[heads·hd]` | rows [`q_rows`](ShardPlan::q_rows) `= [r·G·group·hd, (r+1)·G·group·hd)` |
//! | `layers.L.self_attn.k_proj`, `v_proj` weight / bias | `[kv·hd, H]` | rows [`kv_rows`](ShardPlan::kv_rows) `= [r·G·hd, (r+1)·G·hd)` |
//! | `layers.L.self_attn.o_proj.weight` | `[H, heads·hd]` | columns [`o_cols`](ShardPlan::o_cols) (= `q_rows`) of every row |
//! | `layers.L.self_attn.o_proj.bias` | `[H]` | rank 0 only |
//! | `layers.L.self_attn.sinks` | `[heads]` | [`q_heads`](ShardPlan::q_heads) |
//! | `layers.L.mlp.router(.linear).weight` / `.bias` | `[E, H]` / `[E]` | all |
//! | experts: Unsloth `mlp.experts.gate_up_projs.{e}.*`, `down_projs.{e}.*` | per expert | `e` in [`experts`](ShardPlan::experts) (whole tensors with their quant state) |
//! | experts: fused `gate_up_proj` `[E, H, 2I]`, `down_proj` `[E, I, H]`, `*_bias` `[E, ·]` | stacks | index range `experts` along dim 0 (contiguous bytes) |
//! | experts: MXFP4 `*_blocks` `[E, rows, cols/32, 16]`, `*_scales` `[E, rows, cols/32]`, biases | stacks | index range `experts` along dim 0 |
//! | `model.norm.weight` | `[H]` | all |
//! | `lm_head.weight` | `[V, H]` | rows [`vocab`](ShardPlan::vocab) |
//!
//! (OpenAI's `original/` files, not read by this loader, fuse q/k/v into `attn.qkv` `[5120, 2880]`:
//! there a rank needs rows `q_rows`, `4096 + kv_rows` and `4608 + kv_rows`.)
//!
//! For gpt-oss-120b at world 8: 8 query heads (512 q rows), 1 kv head (64 k/v rows), 512 o_proj
//! columns, 16 of 128 experts, 25,136 of 201,088 vocab rows; 20b: 4 of 32 experts.
//!
//! ### Sliced 4-bit tensors (Unsloth NF4, fused bnb stacks)
//!
//! bitsandbytes quantizes the *flattened* row-major `[out, in]` tensor in blocks of 64 consecutive
//! elements (one absmax per block; with double quantization a u8 code per block and one f32
//! `nested_absmax` per 256 blocks, plus the shared `quant_map`, `nested_quant_map` and offset).
//! A slice can be loaded as raw NF4 bytes (two elements per byte) only if it consists of whole
//! blocks:
//! - **row ranges** (q/k/v, lm_head) are elements `[r0·in, r1·in)`: whole blocks when
//!   `r0·in` and `r1·in` are multiples of 64. For the real models `in = H = 2880 = 45·64`, so
//!   every row range is: packed bytes `[r0·in/2, r1·in/2)`, absmax codes `[r0·in/64, r1·in/64)`,
//!   and the `nested_absmax` entries `⌊r0·in/64/256⌋ ..= ⌊(r1·in/64 − 1)/256⌋` (a nested block
//!   straddling two ranks is loaded by both: one f32).
//! - **column ranges** (o_proj) are, per row `i`, elements `[i·in + c0, i·in + c1)`: whole blocks
//!   when `in`, `c0` and `c1` are multiples of 64. o_proj has `in = heads·hd = 4096 = 64·64` and
//!   the rank's columns start and end at head boundaries, `c = heads·hd`, multiples of
//!   `hd = 64` = the block size; at world 8 that is 512 columns = 8 blocks per row. So the rank
//!   loads, for each of the `H = 2880` rows, 256 packed bytes and 8 absmax codes (strided runs),
//!   and all of the small `nested_absmax` (`2880·64/256 = 720` f32; each row's 64 blocks sit in a
//!   nested block of 256 = 4 rows, shared by all ranks). [`ShardPlan::block_aligned`] checks
//!   this for any block size; the tests check it for 20b/120b at world 1, 2, 4, 8.
//! - **experts** are never sliced inside a matrix: whole per-expert tensors (Unsloth), or
//!   `elem_offset = e·rows·cols` ranges of a flat fused stack, which are whole blocks when
//!   `rows·cols` is a multiple of 64 (`2880·5760` is). MXFP4 blocks (32 along `in`) are never
//!   split either.
//!
//! This CPU implementation decodes straight from the mapped checkpoint through
//! [`MatrixSlice`] views (no copies), which works for any slice; a GPU loader copies exactly
//! the ranges above.
//!
//! ## Collectives
//!
//! [`Communicator`] is the seam: [`LocalCommunicator`] for threads in one process (tests and
//! the engine's tensor-parallel CPU backend), [`SingleRank`] for a group of one, an NCCL
//! communicator for GPUs. Contract: every rank calls
//! the same collectives in the same order with buffers of the same length; all ranks receive
//! bitwise identical results (an NCCL ring all-reduce does: each chunk is reduced once and then
//! broadcast). That equality is what keeps the replicated residual stream, and therefore the
//! replicated router's top-k, identical across ranks.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use gptoss_formats::weights::LayerWeights;
use gptoss_formats::{GptOssConfig, ModelWeights};

use super::attention::{Segment, attend_segments};
use super::kv_cache::KvCache;
use super::model::{ReferenceModel, SeqInput, add_assign};
use super::{ReferenceError, Result};

/// The slices a rank multiplies by (its rows of q/k/v and lm_head, its columns of o_proj).
pub use super::linear::MatrixSlice;

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

/// Why a model cannot be split as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// `world` is zero.
    #[error("tensor parallelism needs at least one rank (world = 0)")]
    EmptyWorld,
    /// `rank >= world`.
    #[error("rank {rank} is out of range for a world of {world} ranks")]
    RankOutOfRange { rank: usize, world: usize },
    /// `world` does not divide the kv heads: a GQA group would have to be split.
    #[error(
        "cannot split the model over {world} ranks: tensor parallelism keeps each GQA group (kv head g and its {group} query heads) on one rank, so the number of ranks must divide num_key_value_heads = {kv_heads}; valid: {valid:?}"
    )]
    KvHeadsNotDivisible {
        world: usize,
        kv_heads: usize,
        group: usize,
        valid: Vec<usize>,
    },
    /// The config's heads do not form whole GQA groups.
    #[error("num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}")]
    Heads { heads: usize, kv_heads: usize },
    /// The communicator's rank/world disagree with the plan.
    #[error("communicator is rank {comm_rank} of {comm_world}, the plan rank {rank} of {world}")]
    CommunicatorMismatch {
        rank: usize,
        world: usize,
        comm_rank: usize,
        comm_world: usize,
    },
}

/// What rank `rank` of `world` owns: query/kv heads (whole GQA groups), experts (a contiguous
/// block) and lm_head vocabulary rows (a contiguous slice). See the [module docs](self) for the
/// reasoning and the exact tensors/rows a rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    rank: usize,
    world: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    experts: usize,
    vocab: usize,
}

/// `[start, end)` of part `i` of `n` items split over `k` parts, the first `n mod k` parts one
/// larger (balanced, contiguous, in order).
fn balanced(n: usize, k: usize, i: usize) -> Range<usize> {
    let (base, rem) = (n / k, n % k);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

impl ShardPlan {
    /// The plan of `rank` in a group of `world` ranks for `config`; refuses a `world` that does
    /// not divide `num_key_value_heads` (for the real models: 1, 2, 4, 8 are valid).
    pub fn new(config: &GptOssConfig, rank: usize, world: usize) -> Result<Self, ShardError> {
        Self::validate(config, world)?;
        if rank >= world {
            return Err(ShardError::RankOutOfRange { rank, world });
        }
        Ok(ShardPlan {
            rank,
            world,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            experts: config.num_local_experts,
            vocab: config.vocab_size,
        })
    }

    /// The plans of every rank of `world`, in rank order.
    pub fn all(config: &GptOssConfig, world: usize) -> Result<Vec<Self>, ShardError> {
        Self::validate(config, world)?;
        (0..world).map(|r| Self::new(config, r, world)).collect()
    }

    /// Checks that `config` can be split over `world` ranks.
    pub fn validate(config: &GptOssConfig, world: usize) -> Result<(), ShardError> {
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        if world == 0 {
            return Err(ShardError::EmptyWorld);
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ShardError::Heads { heads, kv_heads });
        }
        if !kv_heads.is_multiple_of(world) {
            return Err(ShardError::KvHeadsNotDivisible {
                world,
                kv_heads,
                group: heads / kv_heads,
                valid: Self::valid_worlds(config),
            });
        }
        Ok(())
    }

    /// Every valid world size for `config` (the divisors of `num_key_value_heads`).
    pub fn valid_worlds(config: &GptOssConfig) -> Vec<usize> {
        let kv = config.num_key_value_heads;
        (1..=kv).filter(|w| kv.is_multiple_of(*w)).collect()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The plan of another rank of the same group.
    pub fn for_rank(&self, rank: usize) -> Self {
        assert!(rank < self.world, "rank {rank} of {}", self.world);
        ShardPlan {
            rank,
            ..self.clone()
        }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The kv heads of this rank (`kv_heads / world` of them).
    pub fn kv_heads(&self) -> Range<usize> {
        let n = self.kv_heads / self.world;
        self.rank * n..(self.rank + 1) * n
    }

    /// The query heads of this rank: those of its kv heads (`group·g .. group·(g+1)`).
    pub fn q_heads(&self) -> Range<usize> {
        let kv = self.kv_heads();
        kv.start * self.group()..kv.end * self.group()
    }

    /// Rows of `q_proj` (and its bias) this rank computes.
    pub fn q_rows(&self) -> Range<usize> {
        let h = self.q_heads();
        h.start * self.head_dim..h.end * self.head_dim
    }

    /// Rows of `k_proj` / `v_proj` (and biases) this rank computes.
    pub fn kv_rows(&self) -> Range<usize> {
        let h = self.kv_heads();
        h.start * self.head_dim..h.end * self.head_dim
    }

    /// Columns of `o_proj` this rank multiplies (its heads' outputs): equal to [`Self::q_rows`].
    pub fn o_cols(&self) -> Range<usize> {
        self.q_rows()
    }

    /// The experts this rank owns: a contiguous block, the first `E mod world` ranks one more.
    pub fn experts(&self) -> Range<usize> {
        balanced(self.experts, self.world, self.rank)
    }

    /// The rank that owns expert `e`.
    pub fn expert_owner(&self, e: usize) -> usize {
        assert!(e < self.experts, "expert {e} of {}", self.experts);
        (0..self.world)
            .find(|&r| balanced(self.experts, self.world, r).contains(&e))
            .expect("the blocks cover every expert")
    }

    /// Rows of each rank's lm_head slice but the last: `⌈V / world⌉` (also the padded width of
    /// every rank's logits slice in the all-gather).
    pub fn vocab_chunk(&self) -> usize {
        self.vocab.div_ceil(self.world)
    }

    /// The lm_head rows (vocabulary ids) of this rank: `[rank·chunk, min(V, (rank+1)·chunk))`;
    /// the last slice may be shorter (or empty when `V < world`).
    pub fn vocab(&self) -> Range<usize> {
        let c = self.vocab_chunk();
        (self.rank * c).min(self.vocab)..((self.rank + 1) * c).min(self.vocab)
    }

    /// Whether this rank's slices of the row-sliced (q/k/v over `in_features`, lm_head) and
    /// column-sliced (o_proj) weights consist of whole quantization blocks of `block` consecutive
    /// row-major elements (64 for bitsandbytes NF4), so they can be loaded as raw 4-bit bytes.
    /// `hidden` is the `in_features` of q/k/v and lm_head.
    pub fn block_aligned(&self, hidden: usize, block: usize) -> bool {
        let rows_ok = |r: Range<usize>| {
            (r.start * hidden).is_multiple_of(block) && (r.end * hidden).is_multiple_of(block)
        };
        let o = self.o_cols();
        let o_in = self.heads * self.head_dim;
        rows_ok(self.q_rows())
            && rows_ok(self.kv_rows())
            && rows_ok(self.vocab())
            && o_in.is_multiple_of(block)
            && o.start.is_multiple_of(block)
            && o.end.is_multiple_of(block)
    }

    /// The attention shape of this shard as a config: its query and kv heads only (used to shape
    /// the shard's [`KvCache`]).
    pub fn local_config(&self, config: &GptOssConfig) -> GptOssConfig {
        let mut c = config.clone();
        c.num_attention_heads = self.q_heads().len();
        c.num_key_value_heads = self.kv_heads().len();
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Collectives
// ---------------------------------------------------------------------------------------------

/// The collectives a sharded forward needs. Every rank of a group must call the same operations
/// in the same order with buffers of equal length; results must be bitwise identical on all
/// ranks. Implemented in-process by [`LocalCommunicator`]; a GPU backend implements it over NCCL
/// (`ncclAllReduce(sum)`, `ncclAllGather`).
pub trait Communicator: Send {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// `buf ← Σ_ranks buf` on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Every rank's `local` (all of the same length), concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Vec<f32>;
}

/// A group of one: collectives are the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        local.to_vec()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    AllGather,
}

#[derive(Debug)]
struct GroupState {
    /// Each rank's contribution to the collective in progress.
    slots: Vec<Option<(Op, Vec<f32>)>>,
    arrived: usize,
    /// Incremented when a collective completes; waiters watch it.
    generation: u64,
    /// The result of the last completed collective (or why it failed).
    result: std::result::Result<Arc<Vec<f32>>, String>,
    /// Set when a rank's communicator is dropped (its thread ended or panicked): peers waiting
    /// in (or later entering) a collective panic instead of waiting forever.
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Group {
    world: usize,
    state: Mutex<GroupState>,
    cv: Condvar,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A peer panicking while holding the lock is reported through `poisoned` anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// In-process [`Communicator`] for one thread per rank. Collectives meet at a barrier (mutex +
/// condvar); the last rank to arrive reduces or concatenates the contributions **in rank order**,
/// once, and every rank copies that one result, so results are bitwise identical on all ranks and
/// independent of thread timing.
///
/// If a rank's communicator is dropped (its thread returned or panicked), the group is poisoned:
/// peers blocked in a collective panic with a message instead of deadlocking.
#[derive(Debug)]
pub struct LocalCommunicator {
    rank: usize,
    group: Arc<Group>,
}

impl LocalCommunicator {
    /// A connected group of `world` communicators, index = rank. Move one to each thread.
    pub fn group(world: usize) -> Vec<LocalCommunicator> {
        assert!(world > 0, "a communicator group needs at least one rank");
        let group = Arc::new(Group {
            world,
            state: Mutex::new(GroupState {
                slots: vec![None; world],
                arrived: 0,
                generation: 0,
                result: Ok(Arc::new(Vec::new())),
                poisoned: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalCommunicator {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }

    /// Contributes `data` to a collective of kind `op` and returns its result once every rank
    /// has contributed.
    fn collective(&self, op: Op, data: &[f32]) -> Arc<Vec<f32>> {
        let g = &*self.group;
        let mut st = g.lock();
        if let Some(why) = &st.poisoned {
            panic!("rank {}: communicator group is broken: {why}", self.rank);
        }
        st.slots[self.rank] = Some((op, data.to_vec()));
        st.arrived += 1;
        if st.arrived == g.world {
            let slots: Vec<(Op, Vec<f32>)> =
                st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.result = combine(&slots).map(Arc::new);
            st.arrived = 0;
            st.generation += 1;
            g.cv.notify_all();
        } else {
            let generation = st.generation;
            while st.generation == generation && st.poisoned.is_none() {
                st = g.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.generation == generation {
                let why = st.poisoned.clone().unwrap_or_default();
                panic!(
                    "rank {}: a peer left while this rank waited in {op:?}: {why}",
                    self.rank
                );
            }
        }
        match &st.result {
            Ok(r) => Arc::clone(r),
            Err(e) => {
                let e = e.clone();
                st.poisoned.get_or_insert_with(|| e.clone());
                panic!("rank {}: {e}", self.rank)
            }
        }
    }
}

/// The result of a collective from every rank's `(op, data)`, in rank order.
fn combine(slots: &[(Op, Vec<f32>)]) -> std::result::Result<Vec<f32>, String> {
    let (op, first) = (&slots[0].0, &slots[0].1);
    if let Some((r, (o, d))) = slots
        .iter()
        .enumerate()
        .find(|(_, (o, d))| o != op || d.len() != first.len())
    {
        return Err(format!(
            "collective mismatch: rank 0 called {op:?} with {} values, rank {r} {o:?} with {}",
            first.len(),
            d.len()
        ));
    }
    Ok(match op {
        Op::AllReduceSum => {
            let mut acc = first.clone();
            for (_, d) in &slots[1..] {
                for (a, v) in acc.iter_mut().zip(d) {
                    *a += v;
                }
            }
            acc
        }
        Op::AllGather => slots.iter().flat_map(|(_, d)| d.iter().copied()).collect(),
    })
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        if self.group.world == 1 {
            return;
        }
        let r = self.collective(Op::AllReduceSum, buf);
        buf.copy_from_slice(&r);
    }

    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        if self.group.world == 1 {
            return local.to_vec();
        }
        self.collective(Op::AllGather, local).to_vec()
    }
}

impl Drop for LocalCommunicator {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            format!("rank {} panicked", self.rank)
        } else {
            format!("rank {}'s communicator was dropped", self.rank)
        };
        let mut st = self.group.lock();
        st.poisoned.get_or_insert(why);
        self.group.cv.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// The sharded forward
// ---------------------------------------------------------------------------------------------

/// One rank's part of the f32 reference forward (see the [module docs](self)): it computes only
/// its heads, experts and vocabulary rows and meets its peers through `comm`. Every rank of the
/// group must make the same calls with the same inputs (collectives inside); the hidden states
/// and logits returned are the full ones, identical on every rank.
///
/// KV caches come from [`ShardedReference::new_cache`]: per layer, only this rank's kv heads.
pub struct ShardedReference<'a, 'c> {
    model: ReferenceModel<'a>,
    plan: ShardPlan,
    local: GptOssConfig,
    comm: &'c dyn Communicator,
}

impl std::fmt::Debug for ShardedReference<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedReference")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl<'a, 'c> ShardedReference<'a, 'c> {
    /// The shard of rank `comm.rank()` of `comm.world()` over `weights` (views of the full
    /// checkpoint; only this rank's slices are ever decoded).
    pub fn new(weights: ModelWeights<'a>, comm: &'c dyn Communicator) -> Result<Self, ShardError> {
        let plan = ShardPlan::new(weights.config, comm.rank(), comm.world())?;
        Self::with_plan(weights, plan, comm)
    }

    /// Like [`Self::new`] with an explicit plan, which must match `comm`.
    pub fn with_plan(
        weights: ModelWeights<'a>,
        plan: ShardPlan,
        comm: &'c dyn Communicator,
    ) -> Result<Self, ShardError> {
        if (plan.rank(), plan.world()) != (comm.rank(), comm.world()) {
            return Err(ShardError::CommunicatorMismatch {
                rank: plan.rank(),
                world: plan.world(),
                comm_rank: comm.rank(),
                comm_world: comm.world(),
            });
        }
        let local = plan.local_config(weights.config);
        Ok(ShardedReference {
            model: ReferenceModel::new(weights),
            plan,
            local,
            comm,
        })
    }

    /// The full model configuration.
    pub fn config(&self) -> &'a GptOssConfig {
        self.model.config()
    }

    /// What this rank owns.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The unsharded model over the same weights (replicated pieces are computed with it).
    pub fn full(&self) -> &ReferenceModel<'a> {
        &self.model
    }

    /// A new empty KV cache holding this rank's kv heads only.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.local)
    }

    /// Full logits `[T, vocab]` of `tokens` at `positions` (collective).
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let hidden = self.forward_batch(&mut [SeqInput {
            tokens,
            positions,
            cache,
        }])?;
        Ok(self.logits_for(&hidden))
    }

    /// The final hidden states (before the final norm), `[ΣT, hidden]`, of several sequences,
    /// as [`ReferenceModel::forward_batch`] (collective). Everything is validated before any
    /// cache changes and before any collective, identically on every rank, so a refused call
    /// is refused by all ranks and leaves the group in step.
    pub fn forward_batch(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<f32>> {
        let cfg = self.config();
        let mut batch = self.model.stack(seqs, |c| {
            c.check(&self.local).map_err(|e| {
                ReferenceError::Cache(format!(
                    "{e} (rank {} of {} expects its own shard's cache)",
                    self.plan.rank(),
                    self.plan.world()
                ))
            })
        })?;
        let mut x = self.model.embed(&batch.tokens)?;
        if batch.tokens.is_empty() {
            return Ok(x);
        }
        for l in 0..cfg.num_hidden_layers {
            x = self.layer(l, x, &batch.positions, &mut batch.segs);
        }
        Ok(x)
    }

    /// Final norm and this rank's lm_head rows, all-gathered: full logits `[n, vocab]` for
    /// hidden states `[n, hidden]` (collective).
    pub fn logits_for(&self, hidden: &[f32]) -> Vec<f32> {
        let cfg = self.config();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let w = self.model.weights();
        let x = self.model.norm(hidden, &w.norm);
        let n = hidden.len() / h;
        let rows = self.plan.vocab();
        let local = MatrixSlice::rows(&w.lm_head, rows.clone()).matmul(&x, n, None);
        // Equal-length buffers on every rank: pad this slice to the chunk width.
        let chunk = self.plan.vocab_chunk();
        let mut padded = vec![0f32; n * chunk];
        for (dst, src) in padded
            .chunks_exact_mut(chunk)
            .zip(local.chunks_exact(rows.len().max(1)))
        {
            dst[..rows.len()].copy_from_slice(src);
        }
        let all = self.comm.all_gather(&padded);
        let mut out = vec![0f32; n * v];
        for r in 0..self.plan.world() {
            let vr = self.plan.for_rank(r).vocab();
            let block = &all[r * n * chunk..(r + 1) * n * chunk];
            for ti in 0..n {
                out[ti * v + vr.start..ti * v + vr.end]
                    .copy_from_slice(&block[ti * chunk..ti * chunk + vr.len()]);
            }
        }
        out
    }

    /// One decoder layer: partial attention and MoE outputs, each all-reduced into the residual.
    fn layer(
        &self,
        l: usize,
        mut x: Vec<f32>,
        positions: &[usize],
        segs: &mut [Segment<'_>],
    ) -> Vec<f32> {
        let w = &self.model.weights().layers[l];
        let h = self.model.norm(&x, &w.input_norm);
        let mut attn = self.attention(l, w, &h, positions, segs);
        self.comm.all_reduce_sum(&mut attn);
        add_assign(&mut x, &attn);
        let h = self.model.norm(&x, &w.post_norm);
        let mut moe = self.model.moe_part(w, &h, self.plan.experts());
        self.comm.all_reduce_sum(&mut moe);
        add_assign(&mut x, &moe);
        x
    }

    /// This rank's share of the attention block: q/k/v of its heads, RoPE, attention over its
    /// cache, and the partial o_proj over its heads' columns (`[T, hidden]`, o bias on rank 0).
    fn attention(
        &self,
        l: usize,
        w: &LayerWeights<'_>,
        h: &[f32],
        positions: &[usize],
        segs: &mut [Segment<'_>],
    ) -> Vec<f32> {
        let p = &self.plan;
        let t = positions.len();
        let proj = |lin: &gptoss_formats::Linear<'_>, rows: Range<usize>| {
            let bias = lin.bias.as_ref().map(|b| b.to_f32()[rows.clone()].to_vec());
            MatrixSlice::rows(&lin.weight, rows).matmul(h, t, bias.as_deref())
        };
        let mut q = proj(&w.q, p.q_rows());
        let mut k = proj(&w.k, p.kv_rows());
        let v = proj(&w.v, p.kv_rows());
        let rope = self.model.rope();
        rope.apply_rows(&mut q, positions);
        rope.apply_rows(&mut k, positions);
        // Attention needs no communication: the rank's query heads are whole GQA groups.
        let sinks = &w.sinks.to_f32()[p.q_heads()];
        let hd = self.config().head_dim;
        let o = attend_segments(l, &q, &k, &v, sinks, hd, p.group(), segs);
        let bias = match (p.rank(), &w.o.bias) {
            (0, Some(b)) => Some(b.to_f32()),
            _ => None,
        };
        MatrixSlice::cols(&w.o.weight, p.o_cols()).matmul(&o, t, bias.as_deref())
    }
}

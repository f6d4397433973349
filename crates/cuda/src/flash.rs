//! Tensor-core flash attention for wide launches (`kernels/flash_attn.cu`, `k_flash_attn`):
//! long prefill chunks and the decode tokens of many sequences, with GQA, learned sinks and the
//! sliding window (spec model.md §2.2).
//!
//! One launch covers `nseg` segments ([`SegDev`](crate::kernels::SegDev), in device memory):
//! segment `z` has `nq` query rows `q0..q0 + nq` of the launch at positions `pos0..pos0 + nq`;
//! keys below `pos0` come from its cache (`kc`/`vc[layer]`, slot `j` or `j % ring`), keys from
//! `pos0` on from the launch's own fresh K/V rows (`kn`/`vn`, row `q0 + j - pos0`), which are
//! not in the cache yet.
//!
//! Geometry: grid `(ceil(max_nq * G / 64), nkv, nseg)` with `G = nh / nkv`, blocks of 128
//! threads (4 warps of 16 rows), 36 KB of static shared memory (double-buffered 64-key K/V
//! tiles). Block rows are (token, head) pairs, the `G` heads of one KV head packed together.
//! Deterministic (no atomics, no split over keys).

use std::ffi::c_void;

use crate::driver::{Func, Gpu, Module, Stream, launch_threads};
use crate::kernels::FLASH_ATTN_FATBIN;

/// Builds the argument pointer array of a launch from local variables.
macro_rules! args {
    ($($a:ident),* $(,)?) => {
        [$( &$a as *const _ as *mut c_void ),*]
    };
}

/// Rows (query token × query head of one KV head) per block.
pub const ROWS_PER_BLOCK: usize = 64;
/// Threads per block.
pub const THREADS: u32 = 128;

/// The loaded `k_flash_attn` kernel.
pub struct FlashAttn {
    _module: Module,
    f: Func,
}

impl FlashAttn {
    /// Loads the kernel from the embedded fatbin (static shared memory only: no opt-in needed).
    pub fn load(gpu: &Gpu) -> Result<FlashAttn, String> {
        let module = gpu.load_module(FLASH_ATTN_FATBIN)?;
        let f = module.function("k_flash_attn")?;
        Ok(FlashAttn { _module: module, f })
    }

    /// Attention of layer `layer` for every segment of a wide launch.
    ///
    /// - `segs`: device address of `nseg` [`SegDev`](crate::kernels::SegDev)s; `max_nq`: the
    ///   largest `nq` among them (sets the grid; blocks past a segment's rows exit at once).
    /// - `q`: `[T][nh*64]` f32, RoPE applied, unscaled; `kn`/`vn`: the launch's fresh K (rotated)
    ///   and V, `[T][nkv*64]` in the KV element type; `sinks`: `[nh]` f32 raw logits.
    /// - `window`: 0 = full attention, else a query at `p` sees keys `p - window + 1 ..= p`;
    ///   `ring`: 0 = cache slot is the position, else `position % ring`.
    /// - `out`: `[T][nh*64]` bf16 (round to nearest even); `out_lo`: 0, or `[T][nh*64]` bf16
    ///   rounding remainders (`bf16(o - out)`).
    /// - `kvmode`: the KV element type, `KV_BF16` 0 / `KV_F32` 1 / `KV_F16` 2 (common.cuh; what
    ///   [`KvDtype::mode`](crate::KvDtype) returns).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        s: &Stream,
        segs: u64,
        nseg: usize,
        max_nq: usize,
        layer: usize,
        q: u64,
        kn: u64,
        vn: u64,
        sinks: u64,
        window: usize,
        ring: usize,
        out: u64,
        out_lo: u64,
        nh: usize,
        nkv: usize,
        kvmode: i32,
    ) -> Result<(), String> {
        if nkv == 0 || !nh.is_multiple_of(nkv) || nh / nkv > 8 {
            return Err(format!(
                "flash attention: {nh} query heads over {nkv} KV heads is not supported (group 1..8)"
            ));
        }
        if nseg == 0 || max_nq == 0 {
            return Ok(());
        }
        if nseg > 65535 {
            return Err(format!("flash attention: {nseg} segments in one launch"));
        }
        let row_blocks = (max_nq * (nh / nkv)).div_ceil(ROWS_PER_BLOCK);
        let (layer, window, ring, nh, nkv) = (
            layer as i32,
            window as i32,
            ring as i32,
            nh as i32,
            nkv as i32,
        );
        let mut a = args!(
            segs, layer, q, kn, vn, sinks, window, ring, out, out_lo, nh, nkv, kvmode
        );
        launch_threads(
            self.f,
            (row_blocks as u32, nkv as u32, nseg as u32),
            THREADS,
            0,
            s,
            &mut a,
        )
    }
}

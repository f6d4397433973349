//! Grouped expert GEMM on packed weights (kernels/moe_gemm.cu): the tensor-core path for
//! prefill chunks and batched decode.
//!
//! Per MoE layer and step of `T` tokens with `K` experts each:
//! 1. [`MoeGemm::route`]: the `T*K` (token, expert) pairs sorted by expert (stable, deterministic)
//!    into `pair_tok` (token of sorted row `r`), `pair_of` (sorted row of pair `t*K + k`) and a
//!    list of tiles `(expert, r0, nr, 0)` of at most `BN` sorted rows of one expert.
//! 2. [`MoeGemm::gemm`] with the layer's gate_up table, `x` = the normed hidden rows (bf16
//!    `[T][H]`), `gather` = `pair_tok`, [`GEMM_SWIGLU`]: `act` (bf16 `[T*K][I]`, sorted rows).
//! 3. [`MoeGemm::gemm`] with the down table, `x` = `act`, no gather, [`GEMM_F32`]: `y` (f32
//!    `[T*K][H]`, sorted rows).
//! 4. [`MoeGemm::combine`]: `x[t] += sum_k wsel[t*K+k] * y[pair_of[t*K+k]]` (k ascending).
//!
//! The same GEMM runs one dense matrix over `T` rows ([`Tiles::Dense`]).
//!
//! [`TileN::N128`] and [`TileN::N64`] (128 / 64 tokens per tile) are for prefill (compute-bound;
//! the wider tile halves the dequantization per mma), [`TileN::N16`] (16 tokens) for batched
//! decode, where an expert gets a few tokens and every weight byte should be read once. Both tile 128 weight rows per block; the route must be run with the same `BN` as the
//! GEMM that uses its tiles.
//!
//! [`MoeGemm::qgemm`] runs the same contract through kernels/qgemm.cu's pipelined kernels, which
//! keep the weights packed in shared memory and dequantize in registers: for launches whose
//! matrices are all 4-bit of one family ([`QElem`]: NF4 with f16 activations, MXFP4 with bf16).
//!
//! Every buffer argument is a device address (`u64`); the launchers only queue work on the
//! stream.

use std::ffi::c_void;

use crate::driver::{Func, Gpu, Module, Stream, launch_threads};
use crate::kernels::{K_MXFP4, K_NF4F, K_NF4N, MOE_GEMM_FATBIN, QGEMM_FATBIN};

/// `out[r*ldo + row] = acc + bias[row]` (f32).
pub const GEMM_F32: i32 = 0;
/// `out[r*ldo + row] += acc + bias[row]` (f32, residual add).
pub const GEMM_F32_ADD: i32 = 1;
/// Weight rows `2i` / `2i+1` are gate / up of output `i`:
/// `out[r*ldo + i] = bf16(clamped_swiglu(gate + bias[2i], up + bias[2i+1], alpha, limit))`.
pub const GEMM_SWIGLU: i32 = 2;

/// Weight rows per block of the GEMM kernels.
pub const BM: usize = 128;
/// Most pairs (`T*K`) one [`MoeGemm::route`] sorts.
pub const ROUTE_MAX_PAIRS: usize = 16384;
/// Most experts [`MoeGemm::route`] handles.
pub const ROUTE_MAX_EXPERTS: usize = 128;
/// Threads of the route kernel (one block).
const ROUTE_THREADS: u32 = 1024;

/// Token-tile width of a GEMM launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileN {
    /// 128 tokens per tile (`k_gemm_q_n128`): prefill with many tokens per expert.
    N128,
    /// 64 tokens per tile (`k_gemm_q_n64`): prefill with fewer tokens per expert.
    N64,
    /// 16 tokens per tile (`k_gemm_q_n16`): batched decode.
    N16,
}

impl TileN {
    /// Every variant, for benchmarks.
    pub const ALL: [TileN; 3] = [TileN::N128, TileN::N64, TileN::N16];

    /// Tokens per tile (`BN`).
    pub fn bn(self) -> usize {
        match self {
            TileN::N128 => 128,
            TileN::N64 => 64,
            TileN::N16 => 16,
        }
    }

    /// The variant named `name` (`n128`, `n64`, `n16`).
    pub fn parse(name: &str) -> Option<TileN> {
        TileN::ALL
            .into_iter()
            .find(|t| format!("{t:?}").eq_ignore_ascii_case(name))
    }

    /// Dynamic shared memory of the kernel: double-buffered bf16 tiles of `BM` weight rows and
    /// `BN` tokens, rows of 72 elements.
    pub fn smem_bytes(self) -> usize {
        2 * (BM + self.bn()) * 72 * 2
    }
}

impl TileN {
    /// Shared-memory stages of the qgemm.cu kernel of this width (its `S`).
    fn qgemm_stages(self) -> usize {
        match self {
            TileN::N128 | TileN::N64 => 4,
            TileN::N16 => 6,
        }
    }

    /// Threads per block of the qgemm.cu kernel of this width.
    fn qgemm_threads(self) -> u32 {
        match self {
            TileN::N128 | TileN::N64 => 128,
            TileN::N16 => 256,
        }
    }

    /// Dynamic shared memory of the qgemm.cu kernel: `S` stages of packed rows (32 bytes each),
    /// their scale words and nested absmax (4 + 4 bytes each) and `BN` tokens of 64 activations.
    pub fn qgemm_smem_bytes(self) -> usize {
        self.qgemm_stages() * (BM * (32 + 4 + 4) + self.bn() * 64 * 2)
    }
}

/// Element type of a qgemm.cu launch: that of its activations `x`, of its SwiGLU output and of
/// the dequantized weights it multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QElem {
    /// NF4 weights (`K_NF4N`, `K_NF4F`), f16 activations.
    F16,
    /// MXFP4 weights (`K_MXFP4`), bf16 activations.
    Bf16,
}

impl QElem {
    /// The element type of matrices of `kind`, if qgemm.cu has kernels for it.
    pub fn for_kind(kind: i32) -> Option<QElem> {
        match kind {
            K_NF4N | K_NF4F => Some(QElem::F16),
            K_MXFP4 => Some(QElem::Bf16),
            _ => None,
        }
    }

    /// The element type shared by all of `kinds` (None when they differ or one has none).
    pub fn common(kinds: impl IntoIterator<Item = i32>) -> Option<QElem> {
        let mut it = kinds.into_iter();
        let first = QElem::for_kind(it.next()?)?;
        it.all(|k| QElem::for_kind(k) == Some(first))
            .then_some(first)
    }

    fn name(self) -> &'static str {
        match self {
            QElem::F16 => "f16",
            QElem::Bf16 => "bf16",
        }
    }
}

/// Size of the `tiles` buffer for `pairs` sorted pairs over `experts` experts (an upper bound
/// on the tiles [`MoeGemm::route`] writes; also the GEMM grid's y extent).
pub fn moe_tile_bound(pairs: usize, experts: usize, bn: usize) -> usize {
    pairs / bn + experts
}

/// Which rows a GEMM launch multiplies.
#[derive(Debug, Clone, Copy)]
pub enum Tiles {
    /// Tile list from [`MoeGemm::route`]: `tiles` (int4 `[max_tiles]`), `ntiles` (int `[1]`),
    /// `max_tiles` = [`moe_tile_bound`] of the route (blocks past `*ntiles` exit at once).
    Moe {
        tiles: u64,
        ntiles: u64,
        max_tiles: usize,
    },
    /// One matrix (`mats[0]`) over rows `0..t`: tile `y` = rows `y*BN .. min((y+1)*BN, t)`.
    /// The bias is added to rows `< bias_rows` only (rows past it hold the lo parts of split
    /// activations; `bias_rows = t` for a plain product).
    Dense { t: usize, bias_rows: usize },
}

/// Arguments of one GEMM launch (see moe_gemm.cu).
#[derive(Debug, Clone, Copy)]
pub struct GemmArgs {
    /// Device array of `QMat` indexed by the tile's expert (dense: one `QMat`). Every matrix has
    /// `rows` x `cols`; the kinds may differ (read per tile on the device).
    pub mats: u64,
    pub rows: usize,
    pub cols: usize,
    pub tiles: Tiles,
    /// Input rows (16-byte aligned), `ldx` elements apart (a multiple of 8): bf16, or the
    /// [`QElem`] of a [`MoeGemm::qgemm`] launch.
    pub x: u64,
    pub ldx: usize,
    /// 0: sorted row `r` reads input row `r`; else an int array: input row `gather[r]`.
    pub gather: u64,
    /// [`GEMM_F32`], [`GEMM_F32_ADD`] or [`GEMM_SWIGLU`].
    pub mode: i32,
    /// Output (f32, or for [`GEMM_SWIGLU`] bf16 / the [`QElem`] of a [`MoeGemm::qgemm`]
    /// launch), row `r` at `out + r*ldo` elements.
    pub out: u64,
    pub ldo: usize,
    /// SwiGLU parameters (unused by the other modes).
    pub alpha: f32,
    pub limit: f32,
}

fn tile_index(tn: TileN) -> usize {
    TileN::ALL.iter().position(|&v| v == tn).expect("listed")
}

fn three(v: Vec<Func>) -> Result<[Func; 3], String> {
    v.try_into()
        .map_err(|_| "moe_gemm: one kernel per tile variant".to_string())
}

/// Builds the argument pointer array of a launch from local variables.
macro_rules! args {
    ($($a:ident),* $(,)?) => {
        [$( &$a as *const _ as *mut c_void ),*]
    };
}

/// The loaded moe_gemm.cu kernels.
pub struct MoeGemm {
    _module: Module,
    route: Func,
    /// The GEMM kernel of each [`TileN`], in the order of [`TileN::ALL`].
    gemms: [Func; 3],
    combine: Func,
    _qmodule: Module,
    /// qgemm.cu: `[f16 kernels, bf16 kernels]`, each in the order of [`TileN::ALL`].
    qgemms: [[Func; 3]; 2],
}

impl MoeGemm {
    /// Loads the image and raises the dynamic shared-memory limit of the GEMM kernels.
    pub fn load(gpu: &Gpu) -> Result<MoeGemm, String> {
        let module = gpu.load_module(MOE_GEMM_FATBIN)?;
        let mut gemms = Vec::new();
        for tn in TileN::ALL {
            let f = module.function(&format!("k_gemm_q_{}", format!("{tn:?}").to_lowercase()))?;
            f.set_max_dynamic_smem(tn.smem_bytes())?;
            gemms.push(f);
        }
        let qmodule = gpu.load_module(QGEMM_FATBIN)?;
        let mut qgemms = Vec::new();
        for elem in [QElem::F16, QElem::Bf16] {
            let mut fs = Vec::new();
            for tn in TileN::ALL {
                let name = format!(
                    "k_qgemm_{}_{}",
                    format!("{tn:?}").to_lowercase(),
                    elem.name()
                );
                let f = qmodule.function(&name)?;
                f.set_max_dynamic_smem(tn.qgemm_smem_bytes())?;
                fs.push(f);
            }
            qgemms.push(three(fs)?);
        }
        Ok(MoeGemm {
            route: module.function("k_moe_route")?,
            gemms: three(gemms)?,
            combine: module.function("k_moe_combine")?,
            _module: module,
            qgemms: qgemms
                .try_into()
                .map_err(|_| "qgemm: two element types".to_string())?,
            _qmodule: qmodule,
        })
    }

    /// Sorts the `t*k` pairs of `sel` (int `[t*k]`, expert of pair `(t, k)` at `t*k + k`, each
    /// `< e`) by expert, stably (within an expert by token, then k). Writes `pair_tok` (int
    /// `[t*k]`), `pair_of` (int `[t*k]`), `tiles` (int4, room for [`moe_tile_bound`]`(t*k, e,
    /// bn)`) and `ntiles` (int `[1]`). One block; `t*k <= ROUTE_MAX_PAIRS`, `e <=
    /// ROUTE_MAX_EXPERTS`.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        s: &Stream,
        sel: u64,
        t: usize,
        k: usize,
        e: usize,
        bn: usize,
        pair_tok: u64,
        pair_of: u64,
        tiles: u64,
        ntiles: u64,
    ) -> Result<(), String> {
        if t * k > ROUTE_MAX_PAIRS || e > ROUTE_MAX_EXPERTS || bn == 0 {
            return Err(format!(
                "k_moe_route: {t}x{k} pairs over {e} experts (at most {ROUTE_MAX_PAIRS} pairs, {ROUTE_MAX_EXPERTS} experts)"
            ));
        }
        let (t, k, e, bn) = (t as i32, k as i32, e as i32, bn as i32);
        let mut a = args!(sel, t, k, e, bn, pair_tok, pair_of, tiles, ntiles);
        launch_threads(self.route, (1, 1, 1), ROUTE_THREADS, 0, s, &mut a)
    }

    /// `C = W_e · X^T` per tile with the epilogue of `g.mode` (see [`GemmArgs`]). Checks
    /// `cols % 64 == 0`, `rows % 16 == 0` and the alignment of `x` / `ldx`.
    pub fn gemm(&self, s: &Stream, tn: TileN, g: &GemmArgs) -> Result<(), String> {
        let f = self.gemms[tile_index(tn)];
        self.launch(f, 256, tn.smem_bytes(), s, tn, g)
    }

    /// [`MoeGemm::gemm`] through qgemm.cu's pipelined kernel for `elem`: every matrix of
    /// `g.mats` must be of `elem`'s family ([`QElem::for_kind`]; a block meeting another kind
    /// leaves its outputs unwritten), `g.x` holds `elem` values and a SwiGLU output is written
    /// as `elem`.
    pub fn qgemm(&self, s: &Stream, tn: TileN, elem: QElem, g: &GemmArgs) -> Result<(), String> {
        let f = self.qgemms[elem as usize][tile_index(tn)];
        self.launch(f, tn.qgemm_threads(), tn.qgemm_smem_bytes(), s, tn, g)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        f: Func,
        threads: u32,
        smem: usize,
        s: &Stream,
        tn: TileN,
        g: &GemmArgs,
    ) -> Result<(), String> {
        if g.cols == 0 || !g.cols.is_multiple_of(64) || !g.rows.is_multiple_of(16) {
            return Err(format!(
                "moe_gemm: {}x{} matrices (rows must be a multiple of 16, cols of 64)",
                g.rows, g.cols
            ));
        }
        if !g.ldx.is_multiple_of(8) || !g.x.is_multiple_of(16) || g.ldx < g.cols {
            return Err(format!(
                "moe_gemm: input rows must be 16-byte aligned with ldx >= cols (ldx {})",
                g.ldx
            ));
        }
        if ![GEMM_F32, GEMM_F32_ADD, GEMM_SWIGLU].contains(&g.mode) {
            return Err(format!("moe_gemm: unknown mode {}", g.mode));
        }
        let bn = tn.bn();
        let (tiles, ntiles, t, ny, bias_rows) = match g.tiles {
            Tiles::Moe {
                tiles,
                ntiles,
                max_tiles,
            } => (tiles, ntiles, 0usize, max_tiles, 0usize),
            Tiles::Dense { t, bias_rows } => (0u64, 0u64, t, t.div_ceil(bn), bias_rows),
        };
        if ny == 0 || g.rows == 0 {
            return Ok(());
        }
        let grid = (g.rows.div_ceil(BM) as u32, ny as u32, 1);
        let (mats, x, gather, mode, out, alpha, limit) =
            (g.mats, g.x, g.gather, g.mode, g.out, g.alpha, g.limit);
        let (t, ldx, ldo) = (t as i32, g.ldx as i32, g.ldo as i32);
        let bias_rows = bias_rows.min(i32::MAX as usize) as i32;
        let mut a = args!(
            mats, tiles, ntiles, t, x, ldx, gather, mode, out, ldo, alpha, limit, bias_rows
        );
        launch_threads(f, grid, threads, smem, s, &mut a)
    }

    /// `x[t][c] += sum_k wsel[t*k+k] * y[pair_of[t*k+k]][c]` for `t < tokens` (`x` f32
    /// `[tokens][h]`, `y` f32 `[tokens*k][h]` in sorted order, `wsel` f32 `[tokens*k]`).
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &self,
        s: &Stream,
        x: u64,
        y: u64,
        pair_of: u64,
        wsel: u64,
        tokens: usize,
        k: usize,
        h: usize,
    ) -> Result<(), String> {
        if tokens == 0 {
            return Ok(());
        }
        let (t, k, h) = (tokens as i32, k as i32, h as i32);
        let mut a = args!(x, y, pair_of, wsel, t, k, h);
        launch_threads(self.combine, (tokens as u32, 1, 1), 256, 0, s, &mut a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{K_BF16, K_F32};
    use crate::upload::f16_inputs_fit;

    #[test]
    fn qelem_needs_one_4bit_family() {
        assert_eq!(QElem::common([K_NF4N, K_NF4F, K_NF4N]), Some(QElem::F16));
        assert_eq!(QElem::common([K_MXFP4, K_MXFP4]), Some(QElem::Bf16));
        assert_eq!(QElem::common([K_NF4N, K_MXFP4]), None);
        assert_eq!(QElem::common([K_NF4N, K_BF16]), None);
        assert_eq!(QElem::common([K_F32]), None);
        assert_eq!(QElem::common([]), None);
    }

    #[test]
    fn f16_range_check_bounds_both_expert_inputs() {
        // sqrt(2880) ≈ 53.7: norm weights up to ~600 keep the gate_up input below 32752.
        assert!(f16_inputs_fit(&[1.0, -2.5, 0.3], 2880, 7.0));
        assert!(!f16_inputs_fit(&[1.0, -700.0], 2880, 7.0));
        assert!(!f16_inputs_fit(&[1.0], 2880, f64::INFINITY));
        assert!(!f16_inputs_fit(&[1.0], 2880, 200.0));
    }

    #[test]
    fn qgemm_tiles_fit_consumer_gpus() {
        // 99 KB of dynamic + static shared memory per block is the opt-in limit of sm_86/sm_89;
        // the kernels' static part is at most 1.5 KB (the nested code table and token offsets).
        for tn in TileN::ALL {
            assert!(
                tn.qgemm_smem_bytes() + 1536 <= 99 * 1024,
                "{tn:?}: {} bytes",
                tn.qgemm_smem_bytes()
            );
        }
    }
}

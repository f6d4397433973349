// Grouped expert GEMM on packed weights, for prefill and batched decode (issue 5): the T*K
// (token, expert) pairs of a step are sorted by expert (k_moe_route), every expert's rows form
// tiles of at most BN sorted rows, and one GEMM launch multiplies each tile with its expert's
// weights (k_gemm_q_n128 / k_gemm_q_n64: BN = 128 / 64 tokens for prefill; k_gemm_q_n16: BN = 16
// for batched decode, where experts get few tokens). k_moe_combine sums the K expert outputs of each token in a fixed
// order (deterministic, no atomics). The same GEMM kernels run a dense matrix (a quantized
// attention projection) over T token rows when no tile list is given.
//
// Only sm_80 features: mma.sync m16n8k16 (bf16 in, f32 accumulate), ldmatrix.
//
// ## The math
// C[row][r] = sum_c W_e[row][c] * X[xrow(r)][c] for the weight rows of a block and the sorted rows
// r of a tile (expert e). Each weight tile is dequantized to bf16 in shared memory exactly the way
// bitsandbytes dequantizes: value = bf16_rn(code[nibble] * scale), the product in f32 (MXFP4:
// FP4 value * 2^(e-127), exact in bf16). Dense bf16 weights are used as stored; f16 and f32
// weights are rounded to bf16 (RN) — those kinds are only required to be correct, not exact.
// Activations are bf16 as given. Accumulation in f32 by the tensor cores; `bias` (f32) in the
// epilogue.
//
// ## Block tile (both kernels): BM = 128 weight rows x BN tokens, BK = 64 (one NF4 block: one
// scale per row per k-step), 256 threads = 8 warps.
//   n128: warps 4 (M) x 2 (N), each 32 rows x 64 tokens (2 x 8 mma tiles, 64 accumulators).
//   n64: warps 4 (M) x 2 (N), each 32 rows x 32 tokens (2 x 4 mma tiles, 32 f32 accumulators).
//   n16: warps 8 (M) x 1 (N), each 16 rows x 16 tokens (1 x 2 mma tiles).
// Shared memory (dynamic): A = dequantized weights [2][128][72] bf16, B = activations
// [2][BN][72] bf16 (token-major rows: the mma "col" operand, loaded with ldmatrix non-trans); the
// row stride of 72 bf16 (144 bytes) makes every ldmatrix phase and every 16-byte store hit 32
// distinct banks. Static: the 16-entry 4-bit code table (16 words in 16 banks: lookups never
// conflict) and the 256-entry nested code of an NF4 double-quantized matrix.
//
// Loader: thread t owns A row t/2, half t&1 of the k-step (32 elements = 16 packed bytes = one
// 16-byte load; for MXFP4 exactly one 32-block, for NF4 half of one 64-block), plus its scale
// data, and B chunks (16 bytes = 8 bf16) t, t+256, ... (token = chunk/8, part = chunk%8).
//
// Software pipeline (4-bit kinds): the raw packed weights, scale data and activations of k-step
// kt+PD are loaded into registers right after k-step kt's are dequantized into shared buffer
// kt&1, so they have PD k-steps of mma to arrive (n64: PD = 1; n16, memory-bound: PD = 2). One
// __syncthreads per k-step: buffer kt&1 is written after the barrier of step kt-1, which every
// warp passes only after its mma of step kt-2 (the last reader of that buffer). Dense kinds take a
// plain loop (load, convert, store, barrier, mma per k-step) with the same double buffer.
//
// SWIGLU mode: weight rows come in (gate, up) pairs (2i, 2i+1). Within every 16-row group of the
// A tile, A row s < 8 holds weight row 2s and s >= 8 holds 2(s-8)+1 (of the group), so the mma
// accumulators c0/c1 (row g) and c2/c3 (row g+8) of a thread are gate_i and up_i of the same
// tokens, and the activation is computed in registers.
//
// Resources (nvcc 13.0, sm_90): k_gemm_q_n128 128 registers (120 B of spills), 73728 B dynamic
// + 1088 B static shared memory (2 blocks of 256 threads per SM; halving the dequantization per
// mma of n64 gave 212 vs 172 TFLOP/s at 4096 tokens on the H100, 158 vs 148 at 1024);
// k_gemm_q_n64 114 registers, 55296 + 1088 B (2 blocks per SM); k_gemm_q_n16 78 registers,
// 41472 + 1088 B (3 blocks per SM); k_moe_route 32 registers, 33936 B static. Loading two k-steps
// ahead in n64 or four in n16 measured no faster (175 vs 173 TFLOP/s; 1.0 vs 1.1 TB/s).
//
// Requirements (checked by the launchers in src/moe_gemm.rs): cols % 64 == 0, rows % 16 == 0,
// every matrix of a launch has the same rows and cols; X, ldx 16-byte aligned (ldx % 8 == 0).
// Dense mode (no tile list) adds the bias to output rows r < bias_rows only.

#include "common.cuh"

#define GEMM_F32 0
#define GEMM_F32_ADD 1
#define GEMM_SWIGLU 2

#define BM 128
#define BK 64
#define SROW 72  // shared row stride in bf16 elements

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// bf16x2 of (lo, hi), both rounded to nearest even; `lo` lands in the low half.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ bool is_q4(int kind) { return kind == K_NF4N || kind == K_NF4F || kind == K_MXFP4; }

// Raw data of one thread's 32 weights of one k-step (4-bit kinds).
struct RawQ {
    uint4 w;
    unsigned sc;  // NF4N: absmax code byte; NF4F: f32 bits; MXFP4: E8M0 byte
    float na;     // NF4N: nested absmax
};

// Per-thread, per-block constants of the loader.
struct Loader {
    const unsigned char* wp;  // 4-bit: packed bytes of the thread's row and half at k-step 0
    const unsigned char* sp;  // scale data of the row at k-step 0 (see RawQ)
    unsigned k0;              // NF4N: 64-block index of the row's k-step 0
    bool valid;               // the thread's weight row exists
};

template <int CB>
struct RawB {
    uint4 v[CB];
};

struct Shared {
    float lut[16];
    float ncode[256];
};

__device__ __forceinline__ void load_q4(const QMat& m, int kind, const Loader& L, int kt, RawQ& r) {
    r.w = make_uint4(0, 0, 0, 0);
    r.sc = 0;
    r.na = 0.f;
    if (L.valid) {
        r.w = ldg16(L.wp + (size_t)kt * 32);
        if (kind == K_NF4N) {
            r.sc = __ldg(L.sp + kt);
            r.na = __ldg(m.nabs + ((L.k0 + kt) >> m.nbs_shift));
        } else if (kind == K_NF4F) {
            r.sc = __ldg(reinterpret_cast<const unsigned*>(L.sp) + kt);
        } else {
            r.sc = __ldg(L.sp + 2 * kt);
        }
    }
}

// Dequantizes one thread's 32 weights into A row `arow`, columns [32h, 32h + 32).
__device__ __forceinline__ void store_q4(const QMat& m, int kind, const RawQ& r, const Shared& sh,
                                         unsigned short* arow) {
    float scale;
    if (kind == K_NF4N) scale = __fadd_rn(__fmul_rn(sh.ncode[r.sc & 255u], r.na), m.offset);
    else if (kind == K_NF4F) scale = __uint_as_float(r.sc);
    else scale = e8m0(r.sc & 255u);
    const bool mx = kind == K_MXFP4;
    const char* lb = reinterpret_cast<const char*>(sh.lut);
    const unsigned words[4] = {r.w.x, r.w.y, r.w.z, r.w.w};
#pragma unroll
    for (int wi = 0; wi < 4; wi++) {
        const unsigned w = words[wi];
        // Byte offsets (4 * nibble) of the high and low nibble of each byte; element 2j is the
        // high nibble (NF4) or the low one (MXFP4).
        const unsigned hi = (w >> 2) & 0x3c3c3c3cu, lo = (w << 2) & 0x3c3c3c3cu;
        const unsigned f = mx ? lo : hi, s2 = mx ? hi : lo;
        unsigned o[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const unsigned sel = 0x4440u | (unsigned)j;
            const float e0 = *reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, sel));
            const float e1 = *reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, sel));
            o[j] = pack_bf16(__fmul_rn(e0, scale), __fmul_rn(e1, scale));
        }
        *reinterpret_cast<uint4*>(arow + wi * 8) = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

// Dense kinds: loads, converts and stores one thread's 32 weights of k-step kt (row `wr`).
__device__ __forceinline__ void dense_a(const QMat& m, int kind, bool valid, int wr, int h, int kt,
                                        unsigned short* arow) {
    uint4 o[4];
    if (!valid) {
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = make_uint4(0, 0, 0, 0);
    } else if (kind == K_F32) {
        const uint4* p = reinterpret_cast<const uint4*>(m.w + ((size_t)wr * m.cols + kt * BK + h * 32) * 4);
        uint4 v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = __ldg(p + i);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint4 a = v[2 * i], b = v[2 * i + 1];
            o[i] = make_uint4(pack_bf16(__uint_as_float(a.x), __uint_as_float(a.y)),
                              pack_bf16(__uint_as_float(a.z), __uint_as_float(a.w)),
                              pack_bf16(__uint_as_float(b.x), __uint_as_float(b.y)),
                              pack_bf16(__uint_as_float(b.z), __uint_as_float(b.w)));
        }
    } else {
        const uint4* p = reinterpret_cast<const uint4*>(m.w + ((size_t)wr * m.cols + kt * BK + h * 32) * 2);
#pragma unroll
        for (int i = 0; i < 4; i++) o[i] = __ldg(p + i);
        if (kind == K_F16) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                o[i] = make_uint4(pack_bf16(h_lo(o[i].x), h_hi(o[i].x)), pack_bf16(h_lo(o[i].y), h_hi(o[i].y)),
                                  pack_bf16(h_lo(o[i].z), h_hi(o[i].z)), pack_bf16(h_lo(o[i].w), h_hi(o[i].w)));
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) *reinterpret_cast<uint4*>(arow + i * 8) = o[i];
}

template <int CB>
__device__ __forceinline__ void load_b(const unsigned short* const (&xp)[CB], int kt, RawB<CB>& b) {
#pragma unroll
    for (int i = 0; i < CB; i++)
        b.v[i] = xp[i] ? __ldg(reinterpret_cast<const uint4*>(xp[i] + kt * BK)) : make_uint4(0, 0, 0, 0);
}

template <int CB, int BN>
__device__ __forceinline__ void store_b(const RawB<CB>& b, unsigned short* sb) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < CB; i++) {
        const int c = tid + i * 256;
        if (c < BN * 8) *reinterpret_cast<uint4*>(sb + (c >> 3) * SROW + (c & 7) * 8) = b.v[i];
    }
}

// The mma of one k-step: a_addr / b_addr = shared addresses of this lane's ldmatrix rows at k = 0.
template <int MI, int NI>
__device__ __forceinline__ void compute_step(unsigned a_addr, unsigned b_addr, float (&acc)[MI][NI][4]) {
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
            ldsm_x4(a_addr + (mi * 16 * SROW + kk * 16) * 2, a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
#pragma unroll
        for (int nj = 0; nj < NI / 2; nj++)
            ldsm_x4(b_addr + (nj * 16 * SROW + kk * 16) * 2, b[2 * nj][0], b[2 * nj][1], b[2 * nj + 1][0],
                    b[2 * nj + 1][1]);
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int ni = 0; ni < NI; ni++) mma16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
}

// One block: weight rows [blockIdx.x * BM, +BM) x the tokens of tile blockIdx.y.
// BN tokens per tile, WN warps along the tokens, PD = k-steps loaded ahead (4-bit kinds).
template <int BN, int WN, int PD>
__device__ __forceinline__ void gemm_q(const QMat* mats, const int4* tiles, const int* ntiles, int T,
                                       const unsigned short* X, int ldx, const int* gather, int mode, void* out,
                                       int ldo, float alpha, float limit, int bias_rows) {
    constexpr int WM = 8 / WN;
    constexpr int MI = BM / WM / 16;
    constexpr int NI = BN / WN / 8;
    constexpr int CB = (BN * 8 + 255) / 256;  // 16-byte B chunks per thread
    static_assert(NI % 2 == 0, "B is loaded two n8 tiles at a time");
    extern __shared__ __align__(16) unsigned short gsm[];
    __shared__ Shared sh;
    unsigned short* sA = gsm;                   // [2][BM][SROW]
    unsigned short* sB = gsm + 2 * BM * SROW;   // [2][BN][SROW]

    // The tile.
    int expert, r0, nr;
    if (ntiles == nullptr) {
        if ((int)blockIdx.y * BN >= T) return;
        expert = 0, r0 = blockIdx.y * BN, nr = min(BN, T - r0);
    } else {
        if ((int)blockIdx.y >= __ldg(ntiles)) return;
        const int4 tl = __ldg(tiles + blockIdx.y);
        expert = tl.x, r0 = tl.y, nr = tl.z;
    }
    const QMat m = mats[expert];
    const int kind = m.kind;
    const int rows = m.rows, cols = m.cols, nk = cols / BK;
    const int row0 = blockIdx.x * BM;
    if (row0 >= rows) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool swiglu = mode == GEMM_SWIGLU;

    // Code tables.
    if (tid < 16) sh.lut[tid] = (kind == K_MXFP4) ? FP4_VALUES[tid] : (is_q4(kind) ? __ldg(m.code + tid) : 0.f);
    if (kind == K_NF4N) sh.ncode[tid] = __ldg(m.ncode + tid);

    // Loader: A row s = tid / 2 (weight row wr), half h.
    const int s = tid >> 1, h = tid & 1;
    const int sg = s & 15;
    const int wr = row0 + (s & ~15) + (swiglu ? (sg < 8 ? 2 * sg : 2 * (sg - 8) + 1) : sg);
    Loader L;
    L.valid = wr < rows;
    {
        const int nb = cols >> 6;
        L.wp = m.w + (size_t)wr * (cols >> 1) + h * 16;
        L.k0 = (unsigned)(wr * nb);
        if (kind == K_NF4N) L.sp = m.s + (size_t)wr * nb;
        else if (kind == K_NF4F) L.sp = m.s + (size_t)wr * nb * 4;
        else L.sp = m.s + (size_t)wr * (cols >> 5) + h;
    }
    unsigned short* arow = sA + s * SROW + h * 32;
    // B chunks of this thread: row pointers (null: no token / no chunk).
    const unsigned short* xp[CB];
#pragma unroll
    for (int i = 0; i < CB; i++) {
        const int c = tid + i * 256;
        const int n = c >> 3;
        xp[i] = nullptr;
        if (c < BN * 8 && n < nr) {
            const int r = r0 + n;
            const int xr = gather ? __ldg(gather + r) : r;
            xp[i] = X + (size_t)xr * ldx + (c & 7) * 8;
        }
    }

    // ldmatrix lane addresses at k = 0 of buffer 0.
    const int wm = warp % WM, wn = warp / WM;
    const unsigned a_addr = smem_u32(sA + (wm * MI * 16 + (lane & 15)) * SROW + (lane >> 4) * 8);
    const unsigned b_addr =
        smem_u32(sB + (wn * NI * 8 + (lane & 7) + ((lane >> 4) << 3)) * SROW + ((lane >> 3) & 1) * 8);
    constexpr unsigned A_BUF = BM * SROW * 2, B_BUF = BN * SROW * 2;  // bytes per buffer

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[mi][ni][j] = 0.f;

    if (is_q4(kind)) {
        RawQ rq[PD];
        RawB<CB> rb[PD];
#pragma unroll
        for (int u = 0; u < PD; u++) {
            if (u < nk) {
                load_q4(m, kind, L, u, rq[u]);
                load_b<CB>(xp, u, rb[u]);
            }
        }
        __syncthreads();  // code tables
        for (int kt0 = 0; kt0 < nk; kt0 += PD) {
#pragma unroll
            for (int u = 0; u < PD; u++) {
                const int kt = kt0 + u;
                if (kt < nk) {
                    const int buf = kt & 1;
                    store_q4(m, kind, rq[u], sh, arow + buf * BM * SROW);
                    store_b<CB, BN>(rb[u], sB + buf * BN * SROW);
                    if (kt + PD < nk) {
                        load_q4(m, kind, L, kt + PD, rq[u]);
                        load_b<CB>(xp, kt + PD, rb[u]);
                    }
                    __syncthreads();
                    compute_step<MI, NI>(a_addr + buf * A_BUF, b_addr + buf * B_BUF, acc);
                }
            }
        }
    } else {
        for (int kt = 0; kt < nk; kt++) {
            const int buf = kt & 1;
            RawB<CB> rb;
            load_b<CB>(xp, kt, rb);
            dense_a(m, kind, L.valid, wr, h, kt, arow + buf * BM * SROW);
            store_b<CB, BN>(rb, sB + buf * BN * SROW);
            __syncthreads();
            compute_step<MI, NI>(a_addr + buf * A_BUF, b_addr + buf * B_BUF, acc);
        }
    }

    // Epilogue. Accumulator (mi, ni, j): A row wm*MI*16 + mi*16 + g + 8*(j >= 2), token
    // wn*NI*8 + ni*8 + 2q + (j & 1).
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
        const int arow0 = wm * MI * 16 + mi * 16;  // first A row of the mma tile (a 16-row group)
#pragma unroll
        for (int ni = 0; ni < NI; ni++) {
#pragma unroll
            for (int jt = 0; jt < 2; jt++) {
                const int n = wn * NI * 8 + ni * 8 + 2 * q + jt;
                if (n >= nr) continue;
                const size_t r = (size_t)(r0 + n);
                // Dense mode: only rows below bias_rows get the bias (the rows past it are the
                // lo parts of split activations, see wide.cu).
                const float* bias = (m.bias && (ntiles || (int)r < bias_rows)) ? m.bias : nullptr;
                if (swiglu) {
                    const int i = (row0 + arow0) / 2 + g;  // pair index: weight rows 2i, 2i+1
                    if (2 * i >= rows) continue;
                    float gv = acc[mi][ni][jt], uv = acc[mi][ni][2 + jt];
                    if (bias) gv += __ldg(bias + 2 * i), uv += __ldg(bias + 2 * i + 1);
                    reinterpret_cast<unsigned short*>(out)[r * ldo + i] = f2bf(clamped_swiglu(gv, uv, alpha, limit));
                } else {
#pragma unroll
                    for (int hh = 0; hh < 2; hh++) {
                        const int row = row0 + arow0 + g + 8 * hh;
                        if (row >= rows) continue;
                        float v = acc[mi][ni][2 * hh + jt];
                        if (bias) v += __ldg(bias + row);
                        float* o = reinterpret_cast<float*>(out) + r * ldo + row;
                        if (mode == GEMM_F32_ADD) *o += v;
                        else *o = v;
                    }
                }
            }
        }
    }
}

#define GEMM_ARGS                                                                                               \
    const QMat *mats, const int4 *tiles, const int *ntiles, int T, const unsigned short *X, int ldx,            \
        const int *gather, int mode, void *out, int ldo, float alpha, float limit, int bias_rows

// Prefill: 128 weight rows x 64 tokens per block; 2 blocks of 256 threads per SM.
extern "C" __global__ void __launch_bounds__(256, 2) k_gemm_q_n64(GEMM_ARGS) {
    gemm_q<64, 2, 1>(mats, tiles, ntiles, T, X, ldx, gather, mode, out, ldo, alpha, limit, bias_rows);
}

// Prefill with >= 128 tokens per expert: 128 weight rows x 128 tokens per block (half the
// dequantization per mma of n64).
extern "C" __global__ void __launch_bounds__(256, 2) k_gemm_q_n128(GEMM_ARGS) {
    gemm_q<128, 2, 1>(mats, tiles, ntiles, T, X, ldx, gather, mode, out, ldo, alpha, limit, bias_rows);
}

// Batched decode: 128 weight rows x 16 tokens per block, two k-steps of weights in flight.
extern "C" __global__ void __launch_bounds__(256, 2) k_gemm_q_n16(GEMM_ARGS) {
    gemm_q<16, 1, 2>(mats, tiles, ntiles, T, X, ldx, gather, mode, out, ldo, alpha, limit, bias_rows);
}

// ---------------------------------------------------------------------------------------------
// Routing: a stable counting sort of the P = T*K pairs by expert, in one block of 1024 threads
// (P <= 16384, E <= 128). Warp w owns the contiguous pair chunk [w*C, (w+1)*C): pass 1 counts each
// expert in its chunk (__match_any_sync: the lowest lane of each group of equal experts adds the
// group's size to hist[e][w], no atomics); an exclusive scan of hist in (expert, warp) order gives
// every (expert, warp) its first sorted slot; pass 2 repeats the walk and places each pair at its
// slot + its rank among the equal lanes before it. Within an expert the order is therefore
// ascending pair index p = t*K + k (by t, then k), and the result does not depend on timing.
// Tiles: expert e's sorted rows [off_e, off_e + cnt_e) cut into ceil(cnt_e / BN) tiles, experts in
// ascending order.
// ---------------------------------------------------------------------------------------------

#define ROUTE_THREADS 1024
#define ROUTE_MAXP 16384
#define ROUTE_MAXE 128

extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) k_moe_route(const int* sel, int T, int K, int E, int BN,
                                                                         int* pair_tok, int* pair_of, int4* tiles,
                                                                         int* ntiles) {
    __shared__ unsigned char s_sel[ROUTE_MAXP];
    __shared__ int hist[ROUTE_MAXE * 32];  // [e][w]
    __shared__ int wsum[32];
    __shared__ int s_off[ROUTE_MAXE + 1], s_tb[ROUTE_MAXE];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int P = T * K;
    for (int i = tid; i < P; i += ROUTE_THREADS) s_sel[i] = (unsigned char)__ldg(sel + i);
    for (int i = tid; i < ROUTE_MAXE * 32; i += ROUTE_THREADS) hist[i] = 0;
    __syncthreads();
    const int C = ((P + 32 * 32 - 1) / (32 * 32)) * 32;  // chunk per warp, a multiple of 32
    const int pbeg = warp * C, pend = min(P, pbeg + C);
    const unsigned lt = (1u << lane) - 1u;
    // Pass 1: counts.
    for (int p0 = pbeg; p0 < pend; p0 += 32) {
        const int p = p0 + lane;
        const bool v = p < pend;
        const int e = v ? (int)s_sel[p] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (v && (peers & lt) == 0) hist[e * 32 + warp] += __popc(peers);
        __syncwarp();
    }
    __syncthreads();
    // Exclusive scan of hist (4 entries per thread).
    {
        int v[4], sum = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = hist[tid * 4 + j], sum += v[j];
        int inc = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += y;
        }
        if (lane == 31) wsum[warp] = inc;
        __syncthreads();
        if (warp == 0) {
            int w = wsum[lane], wi = w;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, wi, o);
                if (lane >= o) wi += y;
            }
            wsum[lane] = wi - w;
        }
        __syncthreads();
        int run = wsum[warp] + inc - sum;
#pragma unroll
        for (int j = 0; j < 4; j++) hist[tid * 4 + j] = run, run += v[j];
    }
    __syncthreads();
    if (tid < E) s_off[tid] = hist[tid * 32];
    if (tid == 0) s_off[E] = P;
    __syncthreads();
    // Tile bases: scan of ceil(cnt_e / BN) over the experts (warp 0, 4 experts per lane).
    if (warp == 0) {
        int nt[4], sum = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int e = lane * 4 + j;
            nt[j] = e < E ? (s_off[e + 1] - s_off[e] + BN - 1) / BN : 0;
            sum += nt[j];
        }
        int inc = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += y;
        }
        int run = inc - sum;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int e = lane * 4 + j;
            if (e < E) s_tb[e] = run;
            run += nt[j];
        }
        if (lane == 31) *ntiles = inc;
    }
    // Pass 2: placement (hist now holds the first free slot of each (expert, warp)).
    for (int p0 = pbeg; p0 < pend; p0 += 32) {
        const int p = p0 + lane;
        const bool v = p < pend;
        const int e = v ? (int)s_sel[p] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        int pos = 0;
        if (v) pos = hist[e * 32 + warp] + __popc(peers & lt);
        __syncwarp();
        if (v) {
            pair_tok[pos] = p / K;
            pair_of[p] = pos;
            if ((peers & lt) == 0) hist[e * 32 + warp] += __popc(peers);
        }
        __syncwarp();
    }
    __syncthreads();  // s_tb
    for (int e = warp; e < E; e += 32) {
        const int off = s_off[e], cnt = s_off[e + 1] - off, nt = (cnt + BN - 1) / BN, tb = s_tb[e];
        for (int j = lane; j < nt; j += 32) tiles[tb + j] = make_int4(e, off + j * BN, min(BN, cnt - j * BN), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Combine: x[t][c] += sum over k ascending of wsel[t*K+k] * y[pair_of[t*K+k]][c]. Grid (T), any
// block size; the K terms are summed in f32 in k order, then added to x (deterministic).
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void k_moe_combine(float* x, const float* y, const int* pair_of, const float* wsel, int T, int K,
                                         int H) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int* po = pair_of + (size_t)t * K;
    const float* ws = wsel + (size_t)t * K;
    float* xr = x + (size_t)t * H;
    if ((H & 3) == 0) {
        for (int c = threadIdx.x; c < (H >> 2); c += blockDim.x) {
            float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int k = 0; k < K; k++) {
                const float w = __ldg(ws + k);
                const float4 v = __ldg(reinterpret_cast<const float4*>(y + (size_t)__ldg(po + k) * H) + c);
                s.x += w * v.x, s.y += w * v.y, s.z += w * v.z, s.w += w * v.w;
            }
            float4* p = reinterpret_cast<float4*>(xr) + c;
            float4 o = *p;
            o.x += s.x, o.y += s.y, o.z += s.z, o.w += s.w;
            *p = o;
        }
    } else {
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float s = 0.f;
            for (int k = 0; k < K; k++) s += __ldg(ws + k) * __ldg(y + (size_t)__ldg(po + k) * H + c);
            xr[c] += s;
        }
    }
}

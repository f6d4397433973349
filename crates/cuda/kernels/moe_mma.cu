// Decode (T = 1) MoE kernels on the tensor cores: bitsandbytes 4-bit expert weights (NF4 or FP4,
// with or without double quantization) multiplied as stored, with mma.sync m16n8k16 (bf16 in,
// f32 accumulate; sm_80). Why tensor cores for a matrix-vector product: the GEMV kernels of
// gemv.cu spend ~3.3 instructions per 4-bit weight (byte extraction, table lookup, FMA) and stall
// on instruction issue at ~1 TB/s; here one PRMT + one LDS.64 decode two weights (both their
// bf16 halves) and one HMMA does 128 multiply-adds of them, 42 % fewer instructions in all.
//
// Status (bench/CUDA.md, v7): correct (≤ 6e-6 relative vs the f32 reference) but, at batch 1,
// no faster than the GEMV kernels (H100: gate_up 0.795 vs 0.850 ms, down 0.65 vs 0.60 ms per
// token), so opt-in (GPTOSS_CUDA_MOE_MMA=1). ncu: warps wait on the table LDS (short scoreboard,
// ~31 %), on global loads (~19 %) and on fixed-latency dependencies (~16 %), with 5.4 warps per
// scheduler (gate_up) and 2.7 (down: 180 blocks for 132 SMs): latency-bound, not bandwidth-bound.
// The layout (tokens as B columns) is the one a multi-token expert GEMM needs (issue 5).
//
// ## Exactness: hi/lo bf16 splits
// bf16 keeps 8 significant bits, not enough for the NF4 code values (e.g. 0.7229568362236023) or
// the f32 activations. Each is split into hi = bf16(v) and lo = bf16(v - hi) (|v - hi - lo| <=
// 2^-17 |v|): A (weights) runs as two mmas (code_hi, code_lo), and B carries x_hi in column 2t
// and x_lo in column 2t+1, so c[2t] + c[2t+1] = (code_hi + code_lo) . (x_hi + x_lo) for all four
// products. The per-64-block scale is applied in f32 after the block's 4 k-steps
// (acc += scale * block_sum), the way bitsandbytes' dequantization would give w = code * scale.
//
// ## Data layout of one warp's work: a tile of 16 rows [r0, r0+16) of one expert matrix
// Lane = 4 g + q (g = lane >> 2 in 0..7, q = lane & 3). For each 64-element block b of a row
// (32 packed bytes; element 2i is the HIGH nibble of byte i), lane q loads the 8 bytes
// [8q, 8q+8) of rows r0+g and r0+g+8 (two LDG.64; a warp's load covers 8 full 32-byte sectors).
// Those 8 bytes are 16 consecutive columns 64b + 16q + [0, 16). The k-step j in 0..3 uses bytes
// 2j (mma k-slots 2q, 2q+1) and 2j+1 (k-slots 2q+8, 2q+9), i.e. columns 64b + 16q + 4j + [0, 4):
// a permutation of the 16 columns of the step that B follows (lane (g, q) loads x[64b + 16q ..
// +16) of column g as 2 x 16 bytes, register 2j and 2j+1 feeding k-step j). Column g of B is x_hi
// (g = 0) or x_lo (g = 1); lanes g >= 2 hold zeros. After the mma, lane (g, q = 0) holds
// c0 + c1 = row r0+g, c2 + c3 = row r0+g+8.
//
// ## Shared memory: the 4-bit -> bf16 table (64 KB) and what lives in its holes
// Row v (256 bytes) of the table serves byte value v: its first 128 bytes hold 16 copies of the
// entry {hi pair, lo pair} of the two elements of v (low half = element 2i = code[v >> 4], high
// half = code[v & 15]); lane l reads copy l & 15 at v*256 + (l & 15)*8, so the 16 lanes of a
// half-warp (one LDS.64 phase) always hit 16 distinct bank pairs whatever their v, and the offset
// is one PRMT: (byte of w) << 8 | (lane & 15) * 8. The second 128 bytes of each row ("hole" v)
// hold the block's other data, so the whole kernel needs 64 KB and three blocks fit on an SM:
// holes 0-7 the nested code (256 f32), holes 8-15 the partial sums ([16 warps][16 rows] f32),
// and for k_moe_gu_mma holes 16 + p*(H/64) + b the 64 bf16 of block b of x_hi (p = 0) / x_lo
// (p = 1), x_lo rotated by 16 bytes within its hole so the two columns' LDS.128 never share banks.
//
// Kernels (grid = min(units, resident blocks), a grid-stride loop over units; the table, the
// nested code and the activations are staged once per block):
// k_moe_gu_mma  block 256 = TB tiles x KS column splits (TB = 8 / KS). Unit = (expert k, TB
//               consecutive tiles of gate_up[sel[k]] ([2I, H], gate/up rows interleaved)).
//               x = h (f32 [H]) split to bf16 hi/lo in shared memory. Output act_hl[k][0][i]
//               (hi) / act_hl[k][1][i] (lo) = split(clamped SwiGLU(gate 2i, up 2i+1)), u16 [K][2][I].
// k_moe_dn_mma  block K*KS <= 8 warps (warp = (expert k, split)). Unit = one tile of 16 rows of the
//               K experts' down ([H, I]); B straight from act_hl (L1-cached global loads).
//               x[r] += sum_k wsel[k] * (down_k[r,:] . act_k + b_k[r]), summed in k order
//               (deterministic, no atomics).
// Both need every expert matrix in the K_NF4N / K_NF4F encodings with rows of whole 64-blocks
// and one shared 16-entry code (checked on the host).

#include "common.cuh"

extern __shared__ __align__(16) unsigned char smem_raw[];

#define MMA_SMEM 65536  // the table and its holes
#define MMA_U 2         // 64-blocks per pipeline stage
#define HOLE(i) ((i) * 256 + 128)  // byte offset of hole i

// The nested code and the partial sums in holes 0-7 and 8-15 (index i < 256 each).
__device__ __forceinline__ float& ncode_at(int i) {
    return *reinterpret_cast<float*>(smem_raw + HOLE(i >> 5) + (i & 31) * 4);
}
__device__ __forceinline__ float& red_at(int i) {
    return *reinterpret_cast<float*>(smem_raw + HOLE(8 + (i >> 5)) + (i & 31) * 4);
}

// v = hi + lo, both bf16 (round to nearest even); returns hi, lo through `lo`.
__device__ __forceinline__ unsigned short bf16_split(float v, unsigned short& lo) {
    unsigned short hi = f2bf(v);
    lo = f2bf(v - __uint_as_float((unsigned)hi << 16));
    return hi;
}

// The 4-bit pair table (see the header). Thread v < 256 computes entry v and writes its 16 copies,
// rotating the copy index with the thread so each store instruction hits distinct banks.
__device__ void build_pair_lut(const float* code) {
    for (int v = threadIdx.x; v < 256; v += blockDim.x) {
        unsigned short l0, l1;
        unsigned short h0 = bf16_split(__ldg(code + (v >> 4)), l0);
        unsigned short h1 = bf16_split(__ldg(code + (v & 15)), l1);
        uint2 e = make_uint2(h0 | ((unsigned)h1 << 16), l0 | ((unsigned)l1 << 16));
        for (int c = 0; c < 16; c++) {
            int l = (c + v) & 15;
            *reinterpret_cast<uint2*>(smem_raw + v * 256 + l * 8) = e;
        }
    }
}

__device__ __forceinline__ uint2 lut_lookup(unsigned w, unsigned lane8, int byte) {
    // offset byte 0 = lane8 ((lane & 15) * 8 < 128), byte 1 = byte `byte` of w, bytes 2, 3 = 0.
    const unsigned off = __byte_perm(w, lane8, 0x5504u | ((unsigned)byte << 4));
    uint2 e;
    asm("{\n\t.reg .u32 a;\n\tmov.u32 a, smem_raw;\n\tadd.u32 a, a, %2;\n\tld.shared.v2.u32 {%0, %1}, [a];\n\t}"
        : "=r"(e.x), "=r"(e.y)
        : "r"(off));
    return e;
}

__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint2 ldg8(const void* p) {
    uint2 r;
    // .L2::128B: a warp's load takes one 32-byte sector of 8 lines and the next three sectors
    // follow from the same stage; fetching whole lines keeps HBM from serving 32-byte pieces.
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

// B fragments of one 64-block: 16 bf16 of column g (x_hi or x_lo), from global memory at xp, or
// from shared memory (BGLOBAL = false) as two 16-byte pieces at byte offsets off0 / off1.
template <bool BGLOBAL>
__device__ __forceinline__ void load_b(const unsigned short* xp, unsigned off0, unsigned off1, bool active,
                                       unsigned* bq) {
    uint4 u0 = make_uint4(0, 0, 0, 0), u1 = u0;
    if (active) {
        if (BGLOBAL) {
            u0 = __ldg(reinterpret_cast<const uint4*>(xp));
            u1 = __ldg(reinterpret_cast<const uint4*>(xp) + 1);
        } else {
            u0 = *reinterpret_cast<const uint4*>(smem_raw + off0);
            u1 = *reinterpret_cast<const uint4*>(smem_raw + off1);
        }
    }
    bq[0] = u0.x, bq[1] = u0.y, bq[2] = u0.z, bq[3] = u0.w;
    bq[4] = u1.x, bq[5] = u1.y, bq[6] = u1.z, bq[7] = u1.w;
}

// One stage of MMA_U 64-blocks of a 16-row tile, in registers: packed weights of rows r0+g and
// r0+g+8, their scale bytes (nested) or f32 scale bits, and nested absmax values.
struct Stage {
    uint2 wa[MMA_U], wb[MMA_U];
    unsigned sa[MMA_U], sb[MMA_U];
    float na[MMA_U], nbv[MMA_U];
};

// Cursors of one warp over its tile (see tile_dot): advanced by MMA_U blocks per stage, so
// every load of a stage uses an immediate offset.
struct Cursor {
    const unsigned char *wa, *wb, *sa, *sb;
    unsigned ka, kb;  // block indices of the two rows (< 2^31), for the nested absmax
};

template <bool FULL>
__device__ __forceinline__ void load_stage(const QMat& m, bool nested, int n, Cursor& c, Stage& st) {
#pragma unroll
    for (int u = 0; u < MMA_U; u++) {
        if (FULL || u < n) {
            st.wa[u] = ldg8(c.wa + u * 32);
            st.wb[u] = ldg8(c.wb + u * 32);
            if (nested) {
                st.sa[u] = __ldg(c.sa + u);
                st.sb[u] = __ldg(c.sb + u);
                st.na[u] = __ldg(m.nabs + ((c.ka + u) >> m.nbs_shift));
                st.nbv[u] = __ldg(m.nabs + ((c.kb + u) >> m.nbs_shift));
            } else {
                st.sa[u] = __ldg(reinterpret_cast<const unsigned*>(c.sa) + u);
                st.sb[u] = __ldg(reinterpret_cast<const unsigned*>(c.sb) + u);
            }
        }
    }
    const int sz = nested ? 1 : 4;
    c.wa += MMA_U * 32, c.wb += MMA_U * 32, c.sa += MMA_U * sz, c.sb += MMA_U * sz;
    c.ka += MMA_U, c.kb += MMA_U;
}

// The n (<= MMA_U; all when FULL) blocks of a stage: 8 mmas per block into fresh accumulators,
// then acc += scale * block sum. Rows g / g+8 of each mma are the hi / lo halves of weight row
// r0+g (ca) or r0+8+g (cb); columns 0 / 1 are x_hi / x_lo.
template <bool FULL, bool BGLOBAL>
__device__ __forceinline__ void compute_stage(const QMat& m, bool nested, int n, const Stage& st,
                                              const unsigned short* xp, unsigned off0, unsigned off1,
                                              bool bact, unsigned lane8, float& acc_a, float& acc_b) {
#pragma unroll
    for (int u = 0; u < MMA_U; u++) {
        if (FULL || u < n) {
            unsigned bq[8];
            load_b<BGLOBAL>(xp + u * 64, off0 + u * 256, off1 + u * 256, bact, bq);
            float ca[4] = {0.f, 0.f, 0.f, 0.f}, cb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const unsigned wA = (j < 2) ? st.wa[u].x : st.wa[u].y;
                const unsigned wB = (j < 2) ? st.wb[u].x : st.wb[u].y;
                const int s0 = (j & 1) * 2;
                const uint2 ea0 = lut_lookup(wA, lane8, s0), ea1 = lut_lookup(wA, lane8, s0 + 1);
                const uint2 eb0 = lut_lookup(wB, lane8, s0), eb1 = lut_lookup(wB, lane8, s0 + 1);
                mma_bf16(ca, ea0.x, ea0.y, ea1.x, ea1.y, bq[2 * j], bq[2 * j + 1]);
                mma_bf16(cb, eb0.x, eb0.y, eb1.x, eb1.y, bq[2 * j], bq[2 * j + 1]);
            }
            float scale_a, scale_b;
            if (nested) {
                scale_a = __fadd_rn(__fmul_rn(ncode_at(st.sa[u]), st.na[u]), m.offset);
                scale_b = __fadd_rn(__fmul_rn(ncode_at(st.sb[u]), st.nbv[u]), m.offset);
            } else {
                scale_a = __uint_as_float(st.sa[u]);
                scale_b = __uint_as_float(st.sb[u]);
            }
            acc_a = fmaf(scale_a, (ca[0] + ca[1]) + (ca[2] + ca[3]), acc_a);
            acc_b = fmaf(scale_b, (cb[0] + cb[1]) + (cb[2] + cb[3]), acc_b);
        }
    }
}

// One warp: rows r0+g (acc_a) and r0+g+8 (acc_b) of m dotted with x over the 64-blocks
// [b_begin, b_end), for lanes q == 0 (other lanes end with zeros). x: BGLOBAL: column 0 (hi) at
// xb, column 1 (lo) at xb + xstride (u16 elements); else in the holes of k_moe_gu_mma (header;
// xstride = H / 64 holes per column). `m` is taken by value: its fields live in
// registers for the whole loop. Software pipeline: the loads of stage s+1 are in flight while
// stage s is computed; full stages run without per-block guards so their mma chains overlap.
template <bool BGLOBAL>
__device__ __forceinline__ void tile_dot(const QMat m, int r0, int b_begin, int b_end, const unsigned short* xb,
                                         int xstride, float& acc_a, float& acc_b) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const unsigned lane8 = (unsigned)(lane & 15) * 8u;
    const int nb = m.cols >> 6;
    const size_t rowbytes = (size_t)(m.cols >> 1);
    const int ra = r0 + g;
    const bool nested = m.kind == K_NF4N;
    const int sz = nested ? 1 : 4;  // bytes per scale
    Cursor c;
    c.wa = m.w + (size_t)ra * rowbytes + q * 8 + (size_t)b_begin * 32;
    c.wb = c.wa + 8 * rowbytes;
    c.sa = m.s + ((size_t)ra * nb + b_begin) * sz;
    c.sb = c.sa + (size_t)8 * nb * sz;
    c.ka = (unsigned)(ra * nb + b_begin), c.kb = c.ka + 8u * nb;
    const bool bact = g < 2;
    const unsigned short* xp = xb + (g & 1) * xstride + 16 * q + b_begin * 64;
    const unsigned hole = HOLE(16 + (g & 1) * xstride + b_begin) - 128;  // row of x's first block
    unsigned off0 = hole + 128 + ((32 * q + 16 * (g & 1)) & 127);
    unsigned off1 = hole + 128 + ((32 * q + 16 + 16 * (g & 1)) & 127);
    Stage cur, nxt;
    if (b_begin + MMA_U <= b_end) load_stage<true>(m, nested, MMA_U, c, cur);
    else load_stage<false>(m, nested, b_end - b_begin, c, cur);
    for (int b0 = b_begin; b0 < b_end; b0 += MMA_U) {
        const int n = min(MMA_U, b_end - b0);
        const int n_next = min(MMA_U, b_end - b0 - MMA_U);
        if (n_next == MMA_U) load_stage<true>(m, nested, MMA_U, c, nxt);
        else if (n_next > 0) load_stage<false>(m, nested, n_next, c, nxt);
        if (n == MMA_U) compute_stage<true, BGLOBAL>(m, nested, n, cur, xp, off0, off1, bact, lane8, acc_a, acc_b);
        else compute_stage<false, BGLOBAL>(m, nested, n, cur, xp, off0, off1, bact, lane8, acc_a, acc_b);
        xp += MMA_U * 64, off0 += MMA_U * 256, off1 += MMA_U * 256;
        cur = nxt;
    }
}

// Table, nested code (when double-quantized) of matrix m0, staged for the whole block.
__device__ __forceinline__ void stage_tables(const QMat& m0) {
    build_pair_lut(m0.code);
    if (m0.kind == K_NF4N) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) ncode_at(i) = __ldg(m0.ncode + i);
    }
}

__device__ __forceinline__ void moe_gu_mma(const LayerDev* L, const float* h, int H, int I, int K, int KS, const int* sel,
                 unsigned short* act_hl, float alpha, float limit) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int TB = 8 / KS;
    const int tiles = (2 * I) >> 4;
    const int gpe = (tiles + TB - 1) / TB;
    const int units = K * gpe;
    const int nbx = H >> 6;  // holes per x column
    const int tl = warp / KS, ks = warp % KS;
    const int nb = H >> 6;
    const int b_begin = (nb * ks) / KS, b_end = (nb * (ks + 1)) / KS;
    stage_tables(L->gu[sel[0]]);
    // All of this thread's loads of h first, then the conversions (one L2 round trip, not one
    // per element); H <= 16 * 256 is checked by the host.
    {
        float hv[16];
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int i = threadIdx.x + r * 256;
            hv[r] = i < H ? __ldcg(h + i) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int i = threadIdx.x + r * 256;
            if (i < H) {
                unsigned short lo;
                const unsigned short hi = bf16_split(hv[r], lo);
                const int b = i >> 6, j2 = (i & 63) * 2;
                *reinterpret_cast<unsigned short*>(smem_raw + HOLE(16 + b) + j2) = hi;
                *reinterpret_cast<unsigned short*>(smem_raw + HOLE(16 + nbx + b) + ((j2 + 16) & 127)) = lo;
            }
        }
    }
    __syncthreads();
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int k = u / gpe;
        const int tile = (u % gpe) * TB + tl;
        const QMat m = L->gu[sel[k]];
        float acc_a = 0.f, acc_b = 0.f;
        if (tile < tiles) tile_dot<false>(m, tile * 16, b_begin, b_end, nullptr, nbx, acc_a, acc_b);
        if ((lane & 3) == 0) {
            red_at(warp * 16 + (lane >> 2)) = acc_a;
            red_at(warp * 16 + (lane >> 2) + 8) = acc_b;
        }
        __syncthreads();
        if (ks == 0 && tile < tiles && lane < 16) {
            float v = 0.f;
            for (int s = 0; s < KS; s++) v += red_at((warp + s) * 16 + lane);
            const int r = tile * 16 + lane;
            if (m.bias) v += m.bias[r];
            const float up = __shfl_down_sync(0xffffu, v, 1);
            if ((lane & 1) == 0) {
                unsigned short lo;
                const unsigned short hi = bf16_split(clamped_swiglu(v, up, alpha, limit), lo);
                act_hl[(size_t)k * 2 * I + (r >> 1)] = hi;
                act_hl[(size_t)k * 2 * I + I + (r >> 1)] = lo;
            }
        }
        __syncthreads();
    }
}

__device__ __forceinline__ void moe_dn_mma(const LayerDev* L, const unsigned short* act_hl, int H, int I, int K, int KS, const int* sel,
                 const float* wsel, float* x) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tiles = H >> 4;
    const int k = warp / KS, ks = warp % KS;
    const int nb = I >> 6;
    const int b_begin = (nb * ks) / KS, b_end = (nb * (ks + 1)) / KS;
    const QMat m = L->dn[sel[k]];
    stage_tables(L->dn[sel[0]]);
    __syncthreads();
    const unsigned short* xb = act_hl + (size_t)k * 2 * I;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        float acc_a = 0.f, acc_b = 0.f;
        tile_dot<true>(m, tile * 16, b_begin, b_end, xb, I, acc_a, acc_b);
        if ((lane & 3) == 0) {
            red_at(warp * 16 + (lane >> 2)) = acc_a;
            red_at(warp * 16 + (lane >> 2) + 8) = acc_b;
        }
        __syncthreads();
        if (warp == 0 && lane < 16) {
            const int r = tile * 16 + lane;
            float total = 0.f;
            for (int kk = 0; kk < K; kk++) {
                const QMat& mk = L->dn[sel[kk]];
                float v = 0.f;
                for (int s = 0; s < KS; s++) v += red_at((kk * KS + s) * 16 + lane);
                if (mk.bias) v += mk.bias[r];
                total += wsel[kk] * v;
            }
            x[r] += total;
        }
        __syncthreads();
    }
}

// Entry points: three blocks of 256 threads per SM (64 KB of shared memory and <= 85 registers
// each).
#define GU_ARGS const LayerDev *L, const float *h, int H, int I, int K, int KS, const int *sel, \
                unsigned short *act_hl, float alpha, float limit
#define DN_ARGS const LayerDev *L, const unsigned short *act_hl, int H, int I, int K, int KS, const int *sel, \
                const float *wsel, float *x
extern "C" __global__ void __launch_bounds__(256, 3) k_moe_gu_mma(GU_ARGS) {
    moe_gu_mma(L, h, H, I, K, KS, sel, act_hl, alpha, limit);
}
extern "C" __global__ void __launch_bounds__(256, 3) k_moe_dn_mma(DN_ARGS) {
    moe_dn_mma(L, act_hl, H, I, K, KS, sel, wsel, x);
}

// Pipelined grouped GEMM on 4-bit weights with the dequantization in registers (issue 5): the
// expert GEMMs of prefill and batched decode. Same contract as moe_gemm.cu's k_gemm_q_* (tiles
// from k_moe_route, the SWIGLU / F32 / F32_ADD epilogues, dense mode without a tile list), but
// only for 4-bit weights of one family per launch:
//   k_qgemm_*_f16:  NF4 (double-quantized or f32 absmax) weights, f16 activations;
//   k_qgemm_*_bf16: MXFP4 weights, bf16 activations.
// A block skips a matrix of another kind (the launchers in src/moe_gemm.rs never pass one).
//
// Only sm_80 features: mma.sync m16n8k16 (f32 accumulate), cp.async, prmt.
//
// ## Why this kernel, and where it is used
// k_gemm_q_n128 dequantizes each weight tile once into shared memory and reads it back with
// ldmatrix: Nsight Compute on the H100 shows its L1/shared pipe at 81 % (dequantized stores, the
// 16-entry table lookups, ldmatrix of A and B, register spills) and the tensor pipe at 35 %.
// Here the packed bytes go to shared memory as they are (cp.async, 4x fewer bytes than bf16),
// each warp turns them into mma fragments in registers with a table held in registers (prmt, no
// shared-memory lookups), and every load runs S-1 k-steps ahead of the math through a ring of S
// shared-memory stages, with no registers spent on data in flight.
// Measured (H100, 32 NF4 experts of the 20b, src/wide.rs's QgemmUse): batched decode (n16) reads
// the weights at 1267 / 1111 GB/s (gate_up / down, 32 tokens) vs 1124 / 1015 for k_gemm_q_n16,
// so the wide path uses it there. Prefill tiles are slower than k_gemm_q_n128 (175 vs 210
// TFLOP/s at 4096 tokens): ncu shows 2 warps per scheduler stalled on the dequantization's
// dependent ALU chains ("wait" 1.8 cycles per issue) and ~8.6 instructions per mma, about half of
// them the per-stage address arithmetic of the loader, recomputed every k-step at 255 registers.
// Fewer loader instructions (offsets kept in shared memory) and more warps per scheduler are the
// next steps before it can replace k_gemm_q_n128.
//
// ## Precision
// NF4: the 16 codes as f16, times the block's absmax (f32 → f16), f16 products (HMUL2): weights
// within ~2^-11 relative of code × absmax, and f16 activations (2^-11) — 4-8x closer to the f32
// reference than bf16 (2^-9). f16's range is safe here: NF4 weights are at most |absmax|, the
// gate_up input is an RMSNorm output (|x| <= sqrt(H) * max|norm weight|, checked when the model
// loads) and the down input a clamped SwiGLU output (|x| <= limit * (limit + 1)); accumulation is
// f32. MXFP4: FP4 value × 2^(e-127) is exact in bf16, as in moe_gemm.cu.
//
// ## The k-permutation (what makes register dequantization cheap)
// A dot product does not depend on the order of its k terms, so each k-step of 64 (one NF4
// block) assigns the mma's k slots to physical columns so that a thread's A fragments come from
// contiguous packed bytes. Thread (g = lane/4, q = lane%4) of an m16n8k16 at sub-step kk (0..3)
// holds logical k {2q, 2q+1, 2q+8, 2q+9}; here they are physical columns 16q + 4kk + {0,1,2,3}.
// So the thread's A data for the whole k-step is bytes [8q, 8q+8) of its rows' 32 packed bytes
// (one 8-byte shared load per row), and its B data is elements [16q, 16q+16) of each token's 64
// (two 16-byte shared loads per token, each serving two sub-steps). A register pair (logical
// 2q, 2q+1) = physical (16q+4kk, 16q+4kk+1) = the two nibbles of one packed byte.
//
// ## Dequantization in registers
// A 32-bit word of packed bytes holds 8 nibbles N0..N7. The 16 table values (f16 or bf16) are
// held as 8 registers: low bytes TL0..TL3 and high bytes TH0..TH3 (entries 4i..4i+3 in
// register i). prmt(TL0, TL1, sel) picks the low bytes of entries 0..7 for four 3-bit selectors
// at once, prmt(TL2, TL3, sel) those of entries 8..15, and a per-byte mask of each nibble's bit 3
// (prmt's sign-replicate mode on the word and the word << 4) chooses between them; the same for
// the high bytes, and two prmt interleave low and high bytes into the element pairs. 21
// instructions per 8 weights plus one HMUL2 per pair for the scale.
//
// ## Block tile: BM = 128 weight rows x BN tokens, BK = 64, WM x WN warps
//   n128: 4 x 1 warps of 32 rows x 128 tokens (MI = 2, NI = 16: 128 f32 accumulators), S = 4,
//         128 threads, 2 blocks per SM;
//   n64:  4 x 1 warps of 32 rows x 64 tokens (MI = 2, NI = 8), S = 4, 128 threads;
//   n16:  8 x 1 warps of 16 rows x 16 tokens (MI = 1, NI = 2), S = 6, 256 threads (batched
//         decode: memory-bound, more stages in flight).
// (8 warps of 32 x 64 for n128 measured 172 vs 167 TFLOP/s: within noise of the 4-warp tile.)
// Stage (dynamic shared memory, S of them):
//   A  [128][32 B]: packed rows as stored. SWIGLU mode stores weight row 2i (gate) of a 16-row
//      group at row i and 2i+1 (up) at row 8+i, so a thread's rows g and g+8 are gate_i and up_i.
//      A thread's 8-byte reads of rows g = 0..7 cover 256 contiguous bytes: conflict-free.
//   SC [128] u32: the aligned 4-byte word holding the row's scale data of the k-step (NF4N:
//      absmax code byte; NF4F: the f32 absmax; MXFP4: the two E8M0 bytes of the k-step);
//   NA [128] f32: NF4N's nested absmax of the row's block;
//   B  [BN][64] activations, 16-byte chunk c of token n stored at chunk c ^ (n & 7), so the eight
//      16-byte reads of a quarter warp (tokens g, g+1; chunks 2q + j) hit 32 distinct banks.
// Loader (every stage): A chunks c = t, t+NT, ... (row c/2, half c&1: 16 B each), the SC word and
// NA of rows t, t+NT, ..., and B chunks t, t+NT, ... (token chunk/8, chunk%8; the tokens' row
// offsets in X come from the shared `xrow`, gathered once per block); rows past the matrix and
// tokens past the tile are zero-filled (cp.async src-size 0).
//
// Pipeline: at k-step kt the stage of kt+1 has landed (wait_group S-3) and a barrier makes it
// visible; the thread copies stage kt+S-1 into the slot freed by kt-1, reads the packed bytes and
// scales of kt+1 into registers, then dequantizes and multiplies kt (read one step earlier).
//
// Requirements (checked by the launchers in src/moe_gemm.rs): cols % 64 == 0, rows % 16 == 0,
// every matrix of a launch has the same rows and cols, X and ldx 16-byte aligned, scale arrays
// 4-byte aligned (the weight arena aligns every piece to 256 bytes).

#include "common.cuh"

#define GEMM_F32 0
#define GEMM_F32_ADD 1
#define GEMM_SWIGLU 2

#define QBM 128
#define QBK 64

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16 (or 4) bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp4(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// (m & b) | (~m & a): per-bit select.
__device__ __forceinline__ unsigned bitsel(unsigned a, unsigned b, unsigned m) { return (b & m) | (a & ~m); }

template <bool F16>
__device__ __forceinline__ void mma(float* c, const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// f32 pair -> (f16|bf16)x2, round to nearest even; `lo` in the low half.
template <bool F16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (F16) asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Element-wise product of two (f16|bf16)x2 (bf16: fma with -0, sm_80 has no bf16x2 mul).
template <bool F16>
__device__ __forceinline__ unsigned mul2(unsigned a, unsigned b) {
    unsigned r;
    if (F16) asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    else asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
    return r;
}

// The 16-entry value table as low / high byte planes (see the header).
struct Table {
    unsigned lo[4], hi[4];
};

template <bool F16>
__device__ __forceinline__ Table make_table(const QMat& m) {
    Table t;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        unsigned p0, p1;
        if (F16) {
            p0 = pack2<true>(__ldg(m.code + 4 * i), __ldg(m.code + 4 * i + 1));
            p1 = pack2<true>(__ldg(m.code + 4 * i + 2), __ldg(m.code + 4 * i + 3));
        } else {
            p0 = pack2<false>(FP4_VALUES[4 * i], FP4_VALUES[4 * i + 1]);
            p1 = pack2<false>(FP4_VALUES[4 * i + 2], FP4_VALUES[4 * i + 3]);
        }
        t.lo[i] = prmt(p0, p1, 0x6420);  // low bytes of entries 4i..4i+3
        t.hi[i] = prmt(p0, p1, 0x7531);
    }
    return t;
}

// Dequantizes the 8 weights of packed word w (bytes b0..b3, element 2j/2j+1 of byte j) into 4
// element pairs o[j] = (elem 2j, elem 2j+1), each times the scale pair s2. NF4 stores element 2j
// in the high nibble, MXFP4 in the low one (`F16` is NF4, `!F16` MXFP4).
template <bool F16>
__device__ __forceinline__ void dequant8(unsigned w, const Table& t, unsigned s2, unsigned (&o)[4]) {
    const unsigned sh = w << 4;
    const unsigned sel = w & 0x77777777u;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        // Nibbles N(4h)..N(4h+3): selectors, and bit-3 masks (byte i: msb of byte i/2 of
        // `sh` for even nibbles, of `w` for odd ones).
        const unsigned s = h ? (sel >> 16) : sel;
        const unsigned msk = prmt(w, sh, h ? 0xBFAEu : 0x9D8Cu);
        const unsigned lo = bitsel(prmt(t.lo[0], t.lo[1], s), prmt(t.lo[2], t.lo[3], s), msk);
        const unsigned hi = bitsel(prmt(t.hi[0], t.hi[1], s), prmt(t.hi[2], t.hi[3], s), msk);
        // Value of nibble i: (lo byte i, hi byte i). Byte j of w = (N(2j) low, N(2j+1) high).
        if (F16) {  // NF4: element 2j = N(2j+1)
            o[2 * h] = mul2<true>(prmt(lo, hi, 0x4051u), s2);
            o[2 * h + 1] = mul2<true>(prmt(lo, hi, 0x6273u), s2);
        } else {  // MXFP4: element 2j = N(2j)
            o[2 * h] = mul2<false>(prmt(lo, hi, 0x5140u), s2);
            o[2 * h + 1] = mul2<false>(prmt(lo, hi, 0x7362u), s2);
        }
    }
}

template <int BN>
struct QSmem {
    static constexpr int A = QBM * 32;    // bytes of packed rows
    static constexpr int SC = QBM * 4;
    static constexpr int NA = QBM * 4;
    static constexpr int B = BN * QBK * 2;
    static constexpr int STAGE = A + SC + NA + B;
};

// One block: weight rows [blockIdx.x * 128, +128) x the tokens of tile blockIdx.y; WM x WN
// warps, S stages.
template <bool F16, int BN, int WM, int WN, int S>
__device__ __forceinline__ void qgemm(const QMat* mats, const int4* tiles, const int* ntiles, int T,
                                      const unsigned short* X, int ldx, const int* gather, int mode, void* out,
                                      int ldo, float alpha, float limit, int bias_rows) {
    constexpr int NT = 32 * WM * WN;
    constexpr int MI = QBM / WM / 16;
    constexpr int NI = BN / WN / 8;
    static_assert(MI >= 1 && NI >= 1 && QBM % (WM * 16) == 0 && BN % (WN * 8) == 0, "warp tiling");
    using L = QSmem<BN>;
    extern __shared__ __align__(16) unsigned char qsm[];
    __shared__ float ncode[256];
    __shared__ int xrow[BN];  // element offset of each tile token's row in X (-1: none)

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
    if (F16 ? (kind != K_NF4N && kind != K_NF4F) : kind != K_MXFP4) return;
    const int rows = m.rows, cols = m.cols, nk = cols / QBK, nb32 = cols >> 5, nb = cols >> 6;
    const int row0 = blockIdx.x * QBM;
    if (row0 >= rows) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, q = lane & 3;
    const bool swiglu = mode == GEMM_SWIGLU;
    if (kind == K_NF4N)
        for (int i = tid; i < 256; i += NT) ncode[i] = __ldg(m.ncode + i);
    for (int n = tid; n < BN; n += NT) {
        const int r = r0 + n;
        xrow[n] = n < nr ? (gather ? __ldg(gather + r) : r) * ldx : -1;
    }
    __syncthreads();  // xrow (read by the loader below)
    // B chunks per thread and stage; with at most 2 (batched decode) their offsets stay in
    // registers (a shared-memory read before each copy measured slower there).
    constexpr int CB = (BN * 8 + NT - 1) / NT;
    int xo_reg[CB <= 2 ? CB : 1];
#pragma unroll
    for (int i = 0; i < (CB <= 2 ? CB : 0); i++) {
        const int c = tid + i * NT;
        xo_reg[i] = c < BN * 8 ? xrow[c >> 3] : -1;
    }

    // Weight row held at tile row s (SWIGLU: gate / up of a pair at rows i / 8 + i of a group).
    auto wrow = [&](int s) {
        const int sg = s & 15;
        return row0 + (s & ~15) + (swiglu ? (sg < 8 ? 2 * sg : 2 * (sg - 8) + 1) : sg);
    };
    const unsigned sbase = smem_addr(qsm);
    const unsigned rb = (unsigned)(kind == K_MXFP4 ? nb32 : nb);  // scale bytes / words per row

    // One stage: A chunks (row c/2, half c%2), the scale word and nested absmax of every row,
    // and the B chunks (token c/8, chunk c%8), each thread taking every NT-th item.
    auto load_stage = [&](int slot, int kt) {
        const unsigned st = sbase + slot * L::STAGE;
#pragma unroll
        for (int i = 0; i < QBM * 2 / NT; i++) {
            const int c = tid + i * NT;
            const int wr = wrow(c >> 1);
            const bool ok = wr < rows;
            cp16(st + c * 16, ok ? m.w + (size_t)wr * (cols >> 1) + kt * 32 + (c & 1) * 16 : m.w, ok);
        }
#pragma unroll
        for (int i = 0; i < (QBM + NT - 1) / NT; i++) {
            const int sr = tid + i * NT;
            if (sr < QBM) {
                const int wr = wrow(sr);
                const bool ok = wr < rows;
                const unsigned ix = (unsigned)(ok ? wr : 0) * rb + (kind == K_MXFP4 ? 2 * kt : kt);
                const unsigned char* p = kind == K_NF4F ? m.s + (size_t)ix * 4 : m.s + (ix & ~3u);
                cp4(st + L::A + sr * 4, ok ? p : m.s, ok);
                if (kind == K_NF4N)
                    cp4(st + L::A + L::SC + sr * 4, ok ? m.nabs + (ix >> m.nbs_shift) : m.nabs, ok);
            }
        }
#pragma unroll
        for (int i = 0; i < CB; i++) {
            const int c = tid + i * NT;
            if (c < BN * 8) {
                const int n = c >> 3;
                const int xo = CB <= 2 ? xo_reg[i] : xrow[n];
                cp16(st + L::A + L::SC + L::NA + n * 128 + (((c & 7) ^ (n & 7)) << 4),
                     xo >= 0 ? X + xo + (c & 7) * 8 + kt * QBK : X, xo >= 0);
            }
        }
    };

    // The rows this thread multiplies: tile rows wm*MI*16 + mi*16 + g + 8hh.
    const int wm = warp % WM, wn = warp / WM;
    int srow[MI][2];
    unsigned sbase_r[MI][2];  // scale index base (NF4: row * nb; MXFP4: row * nb32 + q/2)
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int s = wm * MI * 16 + mi * 16 + g + 8 * hh;
            const int wr = min(wrow(s), rows - 1);
            srow[mi][hh] = s;
            sbase_r[mi][hh] = kind == K_MXFP4 ? (unsigned)wr * nb32 + (q >> 1) : (unsigned)wr * nb;
        }
    const Table tab = make_table<F16>(m);

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < NI; ni++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[mi][ni][j] = 0.f;

    // Packed bytes and scales of this thread's rows for k-step kt (stage `slot`): read one
    // k-step ahead, so the shared-memory latency and the scale arithmetic of step kt+1 overlap
    // the mma of step kt instead of stalling every warp after the barrier.
    auto read_rows = [&](int slot, int kt, uint2 (&pk)[MI][2], unsigned (&s2)[MI][2]) {
        const unsigned char* sp = qsm + slot * L::STAGE;
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int s = srow[mi][hh];
                pk[mi][hh] = *reinterpret_cast<const uint2*>(sp + s * 32 + q * 8);
                const unsigned word = *reinterpret_cast<const unsigned*>(sp + L::A + s * 4);
                float scale;
                if (kind == K_NF4N) {
                    const unsigned b = (word >> (8 * ((sbase_r[mi][hh] + kt) & 3u))) & 255u;
                    const float na = *reinterpret_cast<const float*>(sp + L::A + L::SC + s * 4);
                    scale = __fadd_rn(__fmul_rn(ncode[b], na), m.offset);
                } else if (kind == K_NF4F) {
                    scale = __uint_as_float(word);
                } else {
                    scale = e8m0((word >> (8 * ((sbase_r[mi][hh] + 2 * kt) & 3u))) & 255u);
                }
                s2[mi][hh] = pack2<F16>(scale, scale);
            }
    };

    // Pipeline: stages 0..S-2 in flight; at step kt, stage kt+1 has landed (wait_group S-3),
    // the barrier makes it visible and frees slot (kt-1)%S for stage kt+S-1.
#pragma unroll
    for (int st = 0; st < S - 1; st++) {
        if (st < nk) load_stage(st, st);
        cp_commit();
    }
    uint2 pk[MI][2];
    unsigned s2[MI][2];
    cp_wait<S - 2>();
    __syncthreads();
    read_rows(0, 0, pk, s2);
    for (int kt = 0; kt < nk; kt++) {
        cp_wait<S - 3>();
        __syncthreads();
        if (kt + S - 1 < nk) load_stage((kt + S - 1) % S, kt + S - 1);
        cp_commit();
        uint2 pk_n[MI][2];
        unsigned s2_n[MI][2];
        if (kt + 1 < nk) read_rows((kt + 1) % S, kt + 1, pk_n, s2_n);

        const unsigned char* sb = qsm + (kt % S) * L::STAGE + L::A + L::SC + L::NA;
#pragma unroll
        for (int j = 0; j < 2; j++) {  // sub-steps 2j, 2j+1
            unsigned a[MI][2][4];     // [mi][sub-step][fragment register]
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                unsigned d0[4], d1[4];
                dequant8<F16>(j ? pk[mi][0].y : pk[mi][0].x, tab, s2[mi][0], d0);
                dequant8<F16>(j ? pk[mi][1].y : pk[mi][1].x, tab, s2[mi][1], d1);
                // Byte 0/1 of the word: sub-step 2j (k slots 2q.. / 2q+8..), bytes 2/3: 2j+1.
                a[mi][0][0] = d0[0], a[mi][0][1] = d1[0], a[mi][0][2] = d0[1], a[mi][0][3] = d1[1];
                a[mi][1][0] = d0[2], a[mi][1][1] = d1[2], a[mi][1][2] = d0[3], a[mi][1][3] = d1[3];
            }
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                const int n = wn * NI * 8 + ni * 8 + g;
                const uint4 b = *reinterpret_cast<const uint4*>(sb + n * 128 + (((2 * q + j) ^ (n & 7)) << 4));
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    mma<F16>(acc[mi][ni], a[mi][0], b.x, b.y);
                    mma<F16>(acc[mi][ni], a[mi][1], b.z, b.w);
                }
            }
        }
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) pk[mi][hh] = pk_n[mi][hh], s2[mi][hh] = s2_n[mi][hh];
    }

    // Epilogue. Accumulator (mi, ni, j): tile row wm*MI*16 + mi*16 + g + 8*(j >= 2), token
    // wn*NI*8 + ni*8 + 2q + (j & 1).
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
        const int arow0 = wm * MI * 16 + mi * 16;
#pragma unroll
        for (int ni = 0; ni < NI; ni++) {
#pragma unroll
            for (int jt = 0; jt < 2; jt++) {
                const int n = wn * NI * 8 + ni * 8 + 2 * q + jt;
                if (n >= nr) continue;
                const size_t r = (size_t)(r0 + n);
                const float* bias = (m.bias && (ntiles || (int)r < bias_rows)) ? m.bias : nullptr;
                if (swiglu) {
                    const int i = (row0 + arow0) / 2 + g;
                    if (2 * i >= rows) continue;
                    float gv = acc[mi][ni][jt], uv = acc[mi][ni][2 + jt];
                    if (bias) gv += __ldg(bias + 2 * i), uv += __ldg(bias + 2 * i + 1);
                    const float v = clamped_swiglu(gv, uv, alpha, limit);
                    reinterpret_cast<unsigned short*>(out)[r * ldo + i] = F16 ? f2h(v) : f2bf(v);
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

#define QGEMM_ARGS                                                                                              \
    const QMat *mats, const int4 *tiles, const int *ntiles, int T, const unsigned short *X, int ldx,            \
        const int *gather, int mode, void *out, int ldo, float alpha, float limit, int bias_rows
#define QGEMM_PASS mats, tiles, ntiles, T, X, ldx, gather, mode, out, ldo, alpha, limit, bias_rows

// n128: 4 warps of 32 rows x 128 tokens (MI = 2, NI = 16), 2 blocks per SM; n64: 4 warps of
// 32 x 64; n16: 8 warps of 16 x 16 (batched decode: memory-bound, more stages in flight).
extern "C" __global__ void __launch_bounds__(128, 2) k_qgemm_n128_f16(QGEMM_ARGS) {
    qgemm<true, 128, 4, 1, 4>(QGEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 3) k_qgemm_n64_f16(QGEMM_ARGS) {
    qgemm<true, 64, 4, 1, 4>(QGEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 3) k_qgemm_n16_f16(QGEMM_ARGS) {
    qgemm<true, 16, 8, 1, 6>(QGEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 2) k_qgemm_n128_bf16(QGEMM_ARGS) {
    qgemm<false, 128, 4, 1, 4>(QGEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 3) k_qgemm_n64_bf16(QGEMM_ARGS) {
    qgemm<false, 64, 4, 1, 4>(QGEMM_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 3) k_qgemm_n16_bf16(QGEMM_ARGS) {
    qgemm<false, 16, 8, 1, 6>(QGEMM_PASS);
}

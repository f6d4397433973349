// Tensor-core flash attention (FlashAttention-2 style, mma.sync m16n8k16 + ldmatrix + cp.async;
// sm_80 features only) for wide launches: long prefill chunks and the decode tokens of many
// sequences (spec model.md §2.2: GQA, learned sinks, causal + sliding window).
//
// k_flash_attn  grid (row_blocks, nkv, nseg), block 128 threads (4 warps), static smem 36 KB.
//   Data: segs: SegDev[nseg] (common.cuh): segment z's queries are launch rows q0 .. q0+nq-1 at
//         positions pos0 .. pos0+nq-1; its cache kc/vc[layer] ([slot][nkv*64], slot = j, or
//         j % ring when ring > 0) holds keys j < pos0. Keys j >= pos0 are the launch's own
//         ("fresh") rows kn/vn[q0 + j - pos0] ([T][nkv*64]). K/V elements: kvmode (KV_BF16 /
//         KV_F32 / KV_F16). q [T][nh*64] f32 (rotated, unscaled); sinks [nh] f32 (raw logits);
//         out [T][nh*64] bf16 (round to nearest even); out_lo (if not null) [T][nh*64] bf16 the
//         rounding remainder bf16(o - out), so out + out_lo carries o to ~2^-16 relative (the
//         o_proj GEMM multiplies both).
//   Rows: block (x, g, z) handles KV head g of segment z and 64 "rows" r (G = nh/nkv heads
//         share KV head g): row r <-> query token i = r / G, query head g*G + r % G, so each
//         K/V tile is staged once for all G heads. Row blocks are taken in reverse order
//         (x -> gridDim.x-1-x: the longest causal rows start first); blocks past their
//         segment's nq*G rows exit. Warp w owns rows 16w .. 16w+15 (one m16 MMA tile).
//   Keys: query at position p sees j in [lo(p), p], lo(p) = max(0, p - window + 1) when
//         window > 0, else 0. The block visits key tiles of 64 keys from lo(first row's
//         position) to its last row's position (sliding layers: ~3 tiles), masks per element
//         (only in tiles not fully visible to all of a warp's rows), and a warp skips tiles
//         that none of its rows sees.
//   Per tile: K/V staged in shared memory as [64 keys][72 halves] (64 + 8 padding: the 8 rows
//         of an ldmatrix hit distinct banks), double buffered: 16-bit caches by cp.async
//         (zero-fill past the last key), an f32 cache through registers, converted to f16.
//         S = Q K^T (Q fragments in registers, pre-scaled by 0.125 = 1/sqrt(64), exact; for
//         bf16 MMAs Q is split into hi + lo bf16 parts, two MMAs each, so S is as exact as
//         with f32 Q; K fragments by ldmatrix), online softmax in f32 (running max initialised with the
//         head's sink logit and running sum with 1 = the sink's own term, so the sink joins the
//         max and the denominator but has no value), P rounded to the MMA type and multiplied
//         by V (ldmatrix.trans), out = o / l. MMA type: bf16 for a bf16 cache, f16 for f16 and
//         f32 caches (f16 keeps 3 more mantissa bits). f32 accumulation throughout.
//   Deterministic: no atomics, no split over keys (one block walks all its keys in order).

#include "common.cuh"

#define FA_ROWS 64     // rows per block
#define FA_KT 64       // keys per tile
#define FA_LD 72       // halves per shared row (64 + 8 padding)
#define FA_THREADS 128
#define FA_TILE (FA_KT * FA_LD)  // halves per K or V tile

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Two f32 -> one register of two 16-bit values (lo in the low half), round to nearest even.
template <bool BF>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (BF) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// D += A(16x16, row) * B(16x8, col), f32 accumulators.
template <bool BF>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if (BF)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm4t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// 16 bytes global -> shared, asynchronously; zero-filled (nothing read) when !valid.
__device__ __forceinline__ void cp16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned f2h_pair(float a, float b) {
    // f32 cache -> f16, saturating to +-65504 like common.cuh f2h.
    a = fminf(fmaxf(a, -65504.f), 65504.f);
    b = fminf(fmaxf(b, -65504.f), 65504.f);
    return pack2<false>(a, b);
}

// One output row's 16 values of this thread (o[n][j0], o[n][j0 + 1] for n < 8, at columns
// 8n + 2cq, +1) times inv: bf16 to `hi` and, if `lo`, the remainder bf16(v - hi) to `lo`.
__device__ __forceinline__ void store_row(const float (&o)[8][4], int j0, float inv, unsigned short* hi,
                                          unsigned short* lo) {
    unsigned* h = reinterpret_cast<unsigned*>(hi);
    unsigned* l = reinterpret_cast<unsigned*>(lo);
#pragma unroll
    for (int n = 0; n < 8; n++) {
        const float a = o[n][j0] * inv, b = o[n][j0 + 1] * inv;
        const unsigned p = pack2<true>(a, b);
        h[n * 4] = p;
        if (l) l[n * 4] = pack2<true>(a - __uint_as_float(p << 16), b - __uint_as_float(p & 0xffff0000u));
    }
}

template <int MODE>
__device__ __forceinline__ void flash_body(const SegDev* __restrict__ sgp, int layer, const float* __restrict__ q,
                                           const void* kn, const void* vn, const float* __restrict__ sinks,
                                           int window, int ring, unsigned short* __restrict__ out,
                                           unsigned short* __restrict__ out_lo, int nh, int nkv,
                                           unsigned short* smem) {
    constexpr bool BF = MODE == KV_BF16;
    constexpr int ESZ = MODE == KV_F32 ? 4 : 2;  // bytes per cache element
    const float L2E = 1.4426950408889634f;

    const int q0 = sgp->q0, nq = sgp->nq, pos0 = sgp->pos0;
    const int G = nh / nkv;
    const int nrows = nq * G;
    const int r0 = (gridDim.x - 1 - blockIdx.x) * FA_ROWS;
    if (r0 >= nrows) return;
    const int g = blockIdx.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, cq = lane & 3;
    const int kvd = nkv * HEAD_DIM;
    const int qd = nh * HEAD_DIM;

    // Key range of the block: [lo(first row's position), last row's position].
    const int rlast = min(r0 + FA_ROWS - 1, nrows - 1);
    const int pmin = pos0 + r0 / G, pmax = pos0 + rlast / G;
    const int klo = window > 0 ? max(0, pmin - window + 1) : 0;
    const int khi = pmax;
    const int ntiles = (khi - klo) / FA_KT + 1;

    // This thread's two rows (A: gq, B: gq + 8 of the warp's 16); rows past the segment are
    // clamped to its last row (computed, never written).
    const int rA = r0 + warp * 16 + gq, rB = rA + 8;
    const int rAc = min(rA, nrows - 1), rBc = min(rB, nrows - 1);
    const int iA = rAc / G, iB = rBc / G;
    const int hA = g * G + rAc % G, hB = g * G + rBc % G;
    const int pA = pos0 + iA, pB = pos0 + iB;
    const int loA = window > 0 ? pA - window + 1 : 0, loB = window > 0 ? pB - window + 1 : 0;
    // The warp's rows: positions pw0 .. pw1.
    const bool wactive = r0 + warp * 16 < nrows;
    const int pw0 = pos0 + min(r0 + warp * 16, nrows - 1) / G;
    const int pw1 = pos0 + min(r0 + warp * 16 + 15, nrows - 1) / G;
    const int wlo = window > 0 ? pw0 - window + 1 : 0;       // first key any warp row sees
    const int wlo_all = window > 0 ? pw1 - window + 1 : 0;   // first key all warp rows see

    // Q fragments (A operand, row-major 16x16 per k-step of 16 dims), scaled by 0.125 (exact).
    // bf16 MMAs: Q = hi + lo (two bf16 parts, 16 significant bits; a lone bf16 Q costs ~1e-2
    // relative in the output at peaky attention); f16 MMAs: one f16 part (11 bits) suffices.
    unsigned qf[4][4], ql[4][4];
    {
        const float* qa = q + (size_t)(q0 + iA) * qd + hA * HEAD_DIM + 2 * cq;
        const float* qb = q + (size_t)(q0 + iB) * qd + hB * HEAD_DIM + 2 * cq;
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            float2 x[4];
            x[0] = *reinterpret_cast<const float2*>(qa + ks * 16);
            x[1] = *reinterpret_cast<const float2*>(qb + ks * 16);
            x[2] = *reinterpret_cast<const float2*>(qa + ks * 16 + 8);
            x[3] = *reinterpret_cast<const float2*>(qb + ks * 16 + 8);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float a = x[e].x * 0.125f, b = x[e].y * 0.125f;
                const unsigned h = pack2<BF>(a, b);
                qf[ks][e] = h;
                ql[ks][e] = BF ? pack2<true>(a - bf_lo(h), b - bf_hi(h)) : 0u;
            }
        }
    }

    float o[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // Running max (raw score units) starts at the sink logit; the running sum (thread-partial,
    // summed over the quad at the end) starts at exp(S - S) = 1, held by one thread per quad.
    float mA = sinks[hA], mB = sinks[hB];
    float lA = cq == 0 ? 1.f : 0.f, lB = lA;

    const char* kcache = reinterpret_cast<const char*>(sgp->kc[layer]);
    const char* vcache = reinterpret_cast<const char*>(sgp->vc[layer]);
    const char* knb = reinterpret_cast<const char*>(kn);
    const char* vnb = reinterpret_cast<const char*>(vn);

    // Stages tile t (keys klo + 64t ..) into buffer buf: 512 chunks of 8 elements per K / V;
    // thread tid copies chunk tid % 8 of keys tid / 8 + 16 * it.
    const int sch = tid & 7, skey = tid >> 3;
    const size_t hoff = (size_t)(g * HEAD_DIM + sch * 8) * ESZ;
    auto stage = [&](int t, int buf) {
        const int kt = klo + t * FA_KT;
        const unsigned sbase = smem_u32(smem + buf * 2 * FA_TILE + skey * FA_LD + sch * 8);
#pragma unroll
        for (int it = 0; it < 4; it++) {
            const int key = skey + 16 * it;
            int j = kt + key;
            const bool valid = j <= khi;
            if (!valid) j = khi;  // a readable address (nothing is read for 16-bit caches)
            const char *kp, *vp;
            if (j >= pos0) {
                const size_t off = (size_t)(q0 + j - pos0) * kvd * ESZ + hoff;
                kp = knb + off;
                vp = vnb + off;
            } else {
                const size_t off = (size_t)(ring ? j % ring : j) * kvd * ESZ + hoff;
                kp = kcache + off;
                vp = vcache + off;
            }
            const unsigned sk = sbase + it * 16 * FA_LD * 2, sv = sk + FA_TILE * 2;
            if (MODE == KV_F32) {
                uint4 kw = make_uint4(0, 0, 0, 0), vw = kw;
                if (valid) {
                    float4 k0 = __ldg(reinterpret_cast<const float4*>(kp));
                    float4 k1 = __ldg(reinterpret_cast<const float4*>(kp + 16));
                    float4 v0 = __ldg(reinterpret_cast<const float4*>(vp));
                    float4 v1 = __ldg(reinterpret_cast<const float4*>(vp + 16));
                    kw = make_uint4(f2h_pair(k0.x, k0.y), f2h_pair(k0.z, k0.w), f2h_pair(k1.x, k1.y),
                                    f2h_pair(k1.z, k1.w));
                    vw = make_uint4(f2h_pair(v0.x, v0.y), f2h_pair(v0.z, v0.w), f2h_pair(v1.x, v1.y),
                                    f2h_pair(v1.z, v1.w));
                }
                asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(sk), "r"(kw.x), "r"(kw.y), "r"(kw.z),
                             "r"(kw.w)
                             : "memory");
                asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(sv), "r"(vw.x), "r"(vw.y), "r"(vw.z),
                             "r"(vw.w)
                             : "memory");
            } else {
                cp16(sk, kp, valid);
                cp16(sv, vp, valid);
            }
        }
    };

    // Per-lane ldmatrix offsets (halves): matrix mi = lane / 8, row lane % 8.
    const int mi = lane >> 3, mr = lane & 7;
    // K (non-trans): matrices (keys +0, dims +0), (keys +0, dims +8), (keys +8, dims +0), (keys +8, dims +8).
    const int koff = ((mi >> 1) * 8 + mr) * FA_LD + (mi & 1) * 8;
    // V (trans): matrices (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims +8), (keys +8, dims +8).
    const int voff = ((mi & 1) * 8 + mr) * FA_LD + (mi >> 1) * 8;

    stage(0, 0);
    cp_commit();
    for (int t = 0; t < ntiles; t++) {
        const int buf = t & 1;
        if (t + 1 < ntiles) stage(t + 1, buf ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        const int kt = klo + t * FA_KT;
        if (wactive && kt <= pw1 && kt + FA_KT - 1 >= wlo) {
            const unsigned kbase = smem_u32(smem + buf * 2 * FA_TILE) + koff * 2;
            const unsigned vbase = smem_u32(smem + buf * 2 * FA_TILE + FA_TILE) + voff * 2;
            float s[8][4];
#pragma unroll
            for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < 4; ks++) {
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    unsigned b0, b1, b2, b3;
                    ldsm4(kbase + (np * 16 * FA_LD + ks * 16) * 2, b0, b1, b2, b3);
                    if (BF) {
                        mma16816<BF>(s[2 * np], ql[ks], b0, b1);
                        mma16816<BF>(s[2 * np + 1], ql[ks], b2, b3);
                    }
                    mma16816<BF>(s[2 * np], qf[ks], b0, b1);
                    mma16816<BF>(s[2 * np + 1], qf[ks], b2, b3);
                }
            }
            // Causal / window mask where the tile is not fully visible to every row of the warp.
            if (!(kt + FA_KT - 1 <= pw0 && kt >= wlo_all)) {
#pragma unroll
                for (int n = 0; n < 8; n++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int j = kt + n * 8 + 2 * cq + (e & 1);
                        const int p = e < 2 ? pA : pB, lo = e < 2 ? loA : loB;
                        if (j > p || j < lo) s[n][e] = -INFINITY;
                    }
                }
            }
            // Online softmax (f32, base-2 exponentials).
            float xA = mA, xB = mB;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                xA = fmaxf(xA, fmaxf(s[n][0], s[n][1]));
                xB = fmaxf(xB, fmaxf(s[n][2], s[n][3]));
            }
            xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
            xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
            xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
            xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
            // (A max of -inf only happens with a -inf sink and no visible key yet.)
            const float sA = xA == -INFINITY ? 0.f : xA * L2E;
            const float sB = xB == -INFINITY ? 0.f : xB * L2E;
            const float cA = ex2(fmaf(mA, L2E, -sA)), cB = ex2(fmaf(mB, L2E, -sB));
            mA = xA;
            mB = xB;
            float tA = 0.f, tB = 0.f;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                s[n][0] = ex2(fmaf(s[n][0], L2E, -sA));
                s[n][1] = ex2(fmaf(s[n][1], L2E, -sA));
                s[n][2] = ex2(fmaf(s[n][2], L2E, -sB));
                s[n][3] = ex2(fmaf(s[n][3], L2E, -sB));
                tA += s[n][0] + s[n][1];
                tB += s[n][2] + s[n][3];
                o[n][0] *= cA;
                o[n][1] *= cA;
                o[n][2] *= cB;
                o[n][3] *= cB;
            }
            lA = fmaf(lA, cA, tA);
            lB = fmaf(lB, cB, tB);
            // O += P V: the S accumulators of key n-tiles 2kk, 2kk+1 are the A fragment of
            // k-step kk.
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                unsigned a[4];
                a[0] = pack2<BF>(s[2 * kk][0], s[2 * kk][1]);
                a[1] = pack2<BF>(s[2 * kk][2], s[2 * kk][3]);
                a[2] = pack2<BF>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                a[3] = pack2<BF>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dp = 0; dp < 4; dp++) {
                    unsigned b0, b1, b2, b3;
                    ldsm4t(vbase + (kk * 16 * FA_LD + dp * 16) * 2, b0, b1, b2, b3);
                    mma16816<BF>(o[2 * dp], a, b0, b1);
                    mma16816<BF>(o[2 * dp + 1], a, b2, b3);
                }
            }
        }
        __syncthreads();
    }

    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    const float invA = 1.0f / lA, invB = 1.0f / lB;
    const size_t offA = (size_t)(q0 + iA) * qd + hA * HEAD_DIM + 2 * cq;
    const size_t offB = (size_t)(q0 + iB) * qd + hB * HEAD_DIM + 2 * cq;
    if (rA < nrows) store_row(o, 0, invA, out + offA, out_lo ? out_lo + offA : nullptr);
    if (rB < nrows) store_row(o, 2, invB, out + offB, out_lo ? out_lo + offB : nullptr);
}

extern "C" __global__ void __launch_bounds__(FA_THREADS) k_flash_attn(const SegDev* segs, int layer, const float* q,
                                                                     const void* kn, const void* vn,
                                                                     const float* sinks, int window, int ring,
                                                                     unsigned short* out, unsigned short* out_lo,
                                                                     int nh, int nkv, int kvmode) {
    __shared__ __align__(128) unsigned short smem[2 * 2 * FA_TILE];  // [buffer][K, V][64][72]
    const SegDev* sg = segs + blockIdx.z;
    if (kvmode == KV_BF16)
        flash_body<KV_BF16>(sg, layer, q, kn, vn, sinks, window, ring, out, out_lo, nh, nkv, smem);
    else if (kvmode == KV_F16)
        flash_body<KV_F16>(sg, layer, q, kn, vn, sinks, window, ring, out, out_lo, nh, nkv, smem);
    else
        flash_body<KV_F32>(sg, layer, q, kn, vn, sinks, window, ring, out, out_lo, nh, nkv, smem);
}

// Attention over the bf16 KV cache with GQA, learned sinks and the sliding window
// (spec model.md §2.2), for T <= MAXT queries per launch: decode (T = 1), a prefill chunk of one
// sequence, or the decode tokens of up to MAXT sequences (each query reads its own sequence's
// cache, StepParams kc/vc[t], up to its own position pos[t]; its key was written by k_qkv).
//
// k_attn  grid (nkv, smax, T), block 256 (8 warps; warp w = query head g*G + w of KV head g,
//         G = nh/nkv <= 8), static smem ~35 KB.
//   Data: q [T, nh*64] f32 (already rotated); cache K/V in kvmode's type (KV_BF16 / KV_F16 / KV_F32,
//         common.cuh) [slot][nkv*64], slot = j
//         (full layers) or j % ring (sliding layers); sinks f32 [nh]; out [T, nh*64] f32.
//   Query t at position p sees keys j in [lo, p], lo = max(0, p - window + 1) on sliding layers
//   (128 keys including itself), 0 otherwise. The keys are split into `active` chunks of
//   `chunk` keys (chunk = max(64, ceil(n/smax) rounded up to 64), or one chunk when n <= 128:
//   then the block finishes alone, without partials); block (g, s, t) runs an online
//   softmax over chunk s in tiles of 64 keys (K/V tiles staged in shared memory; lane l scores
//   keys l and l+32 of a tile, then accumulates dims 2l, 2l+1 of the output) and writes the
//   partial (max, sum, unnormalised o[64]) of each of its heads. The last block of (t, g) to
//   finish (atomic counter, reset afterwards) combines the partials in split order with the sink
//   logit (in the max and the denominator only, not scaled): deterministic, one pass over K/V.

#include "common.cuh"

#define TILE 64
#define PART 66  // floats per partial: m, l, o[64]

// Element 0 / 1 of a pair of 16-bit cache values (f16 when F16, else bf16) as f32.
template <bool F16>
__device__ __forceinline__ float kv_lo(unsigned w) { return F16 ? h_lo(w) : bf_lo(w); }
template <bool F16>
__device__ __forceinline__ float kv_hi(unsigned w) { return F16 ? h_hi(w) : bf_hi(w); }

// Scores of keys lane and lane+32 of a 16-bit K tile (pairs, [64][33 words]) against q (64 f32).
template <bool F16>
__device__ __forceinline__ void score16(const unsigned* Ks, const float* qw, int lane, float& s0, float& s1) {
    const unsigned* k0 = Ks + lane * 33;
    const unsigned* k1 = Ks + (lane + 32) * 33;
#pragma unroll
    for (int d2 = 0; d2 < 32; d2++) {
        float qa = qw[2 * d2], qb = qw[2 * d2 + 1];
        unsigned w0 = k0[d2], w1 = k1[d2];
        s0 = fmaf(qa, kv_lo<F16>(w0), s0); s0 = fmaf(qb, kv_hi<F16>(w0), s0);
        s1 = fmaf(qa, kv_lo<F16>(w1), s1); s1 = fmaf(qb, kv_hi<F16>(w1), s1);
    }
}

// o (dims 2*lane, 2*lane+1) += p . V over a 16-bit V tile ([64][32 words]); p0/p1 are the
// probabilities of keys lane / lane+32, broadcast by shuffles.
template <bool F16>
__device__ __forceinline__ void accum16(const unsigned* Vs, float p0, float p1, int lane, float& o0, float& o1) {
#pragma unroll 8
    for (int jj = 0; jj < 32; jj++) {
        float pa = __shfl_sync(0xffffffffu, p0, jj);
        float pb = __shfl_sync(0xffffffffu, p1, jj);
        unsigned va = Vs[jj * 32 + lane], vb = Vs[(jj + 32) * 32 + lane];
        o0 = fmaf(pa, kv_lo<F16>(va), o0); o0 = fmaf(pb, kv_lo<F16>(vb), o0);
        o1 = fmaf(pa, kv_hi<F16>(va), o1); o1 = fmaf(pb, kv_hi<F16>(vb), o1);
    }
}

extern "C" __global__ void __launch_bounds__(256) k_attn(const LayerDev* L, const StepParams* sp, int layer, const float* q,
                                       float* out, float* part, unsigned* counters, int nh, int nkv, int smax,
                                       int kvmode) {
    // K/V tiles. 16-bit cache (bf16 / f16): K as pairs [64][33 words], V [64][64] (uint4 [64][8]).
    // f32 cache: K f32 [64][65], V f32 [64][64].
    const bool kvf32 = kvmode == KV_F32, f16 = kvmode == KV_F16;
    __shared__ __align__(16) float kv_smem[TILE * 65 + TILE * 64];
    __shared__ float qs[WARPS][HEAD_DIM];
    __shared__ int last_s;
    unsigned* Ks = reinterpret_cast<unsigned*>(kv_smem);
    uint4* Vs4 = reinterpret_cast<uint4*>(kv_smem + TILE * 33);
    const unsigned* Vs = reinterpret_cast<const unsigned*>(Vs4);
    float* Kf = kv_smem;
    float* Vf = kv_smem + TILE * 65;

    const int g = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
    if (t >= sp->T) return;
    const int G = nh / nkv;
    const int p = sp->pos[t];
    const int window = L->window, ring = L->ring;
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int nkeys = p - lo + 1;
    int chunk = (nkeys + smax - 1) / smax;
    chunk = max(TILE, (chunk + TILE - 1) / TILE * TILE);
    if (nkeys <= 2 * TILE) chunk = 2 * TILE;  // one block per KV head: no combine step
    const int active = (nkeys + chunk - 1) / chunk;
    if (s >= active) return;
    const int kb = lo + s * chunk;
    const int ke = min(kb + chunk, p + 1);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvd = nkv * HEAD_DIM;
    const unsigned short* kc = reinterpret_cast<const unsigned short*>(sp->kc[t][layer]);
    const unsigned short* vc = reinterpret_cast<const unsigned short*>(sp->vc[t][layer]);
    const bool hw = warp < G;
    const int hq = g * G + warp;
    if (hw) {
        // 1/sqrt(64) = 0.125 folded into q (a power of two: exact).
        qs[warp][lane] = q[(size_t)t * nh * HEAD_DIM + hq * HEAD_DIM + lane] * 0.125f;
        qs[warp][lane + 32] = q[(size_t)t * nh * HEAD_DIM + hq * HEAD_DIM + lane + 32] * 0.125f;
    }
    float m_run = -INFINITY, l_run = 0.f, o0 = 0.f, o1 = 0.f;
    for (int ts = kb; ts < ke; ts += TILE) {
        __syncthreads();
        if (kvf32) {
            const float* kcf = reinterpret_cast<const float*>(sp->kc[t][layer]);
            const float* vcf = reinterpret_cast<const float*>(sp->vc[t][layer]);
            for (int idx = threadIdx.x; idx < TILE * 16; idx += blockDim.x) {
                int jj = idx >> 4, p16 = idx & 15;
                int j = ts + jj;
                float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
                if (j < ke) {
                    size_t slot = ring ? (size_t)(j % ring) : (size_t)j;
                    size_t off = slot * kvd + g * HEAD_DIM + p16 * 4;
                    kv = *reinterpret_cast<const float4*>(kcf + off);
                    vv = *reinterpret_cast<const float4*>(vcf + off);
                }
                float* kr = Kf + jj * 65 + p16 * 4;
                kr[0] = kv.x; kr[1] = kv.y; kr[2] = kv.z; kr[3] = kv.w;
                *reinterpret_cast<float4*>(Vf + jj * 64 + p16 * 4) = vv;
            }
        } else {
            for (int idx = threadIdx.x; idx < TILE * 8; idx += blockDim.x) {
                int jj = idx >> 3, part8 = idx & 7;
                int j = ts + jj;
                uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
                if (j < ke) {
                    size_t slot = ring ? (size_t)(j % ring) : (size_t)j;
                    size_t off = slot * kvd + g * HEAD_DIM + part8 * 8;
                    kv = *reinterpret_cast<const uint4*>(kc + off);
                    vv = *reinterpret_cast<const uint4*>(vc + off);
                }
                unsigned* kr = Ks + jj * 33 + part8 * 4;
                kr[0] = kv.x; kr[1] = kv.y; kr[2] = kv.z; kr[3] = kv.w;
                Vs4[jj * 8 + part8] = vv;
            }
        }
        __syncthreads();
        if (hw) {
            float s0 = 0.f, s1 = 0.f;
            if (kvf32) {
                const float* k0 = Kf + lane * 65;
                const float* k1 = Kf + (lane + 32) * 65;
#pragma unroll 16
                for (int d = 0; d < HEAD_DIM; d++) {
                    float qd = qs[warp][d];
                    s0 = fmaf(qd, k0[d], s0);
                    s1 = fmaf(qd, k1[d], s1);
                }
            } else if (f16) {
                score16<true>(Ks, qs[warp], lane, s0, s1);
            } else {
                score16<false>(Ks, qs[warp], lane, s0, s1);
            }
            if (ts + lane >= ke) s0 = -INFINITY;
            if (ts + lane + 32 >= ke) s1 = -INFINITY;
            float m_new = fmaxf(m_run, warp_max(fmaxf(s0, s1)));
            float corr = __expf(m_run - m_new);
            float p0 = __expf(s0 - m_new), p1 = __expf(s1 - m_new);
            l_run = l_run * corr + warp_sum(p0 + p1);
            o0 *= corr;
            o1 *= corr;
            if (kvf32) {
#pragma unroll 8
                for (int jj = 0; jj < 32; jj++) {
                    float pa = __shfl_sync(0xffffffffu, p0, jj);
                    float pb = __shfl_sync(0xffffffffu, p1, jj);
                    float2 va = *reinterpret_cast<const float2*>(Vf + jj * 64 + 2 * lane);
                    float2 vb = *reinterpret_cast<const float2*>(Vf + (jj + 32) * 64 + 2 * lane);
                    o0 = fmaf(pa, va.x, o0); o0 = fmaf(pb, vb.x, o0);
                    o1 = fmaf(pa, va.y, o1); o1 = fmaf(pb, vb.y, o1);
                }
            } else if (f16) {
                accum16<true>(Vs, p0, p1, lane, o0, o1);
            } else {
                accum16<false>(Vs, p0, p1, lane, o0, o1);
            }
            m_run = m_new;
        }
    }
    if (active == 1) {
        if (hw) {
            const float sink = L->sinks[hq];
            float M = fmaxf(m_run, sink);
            float f = __expf(m_run - M);
            float inv = f / fmaf(l_run, f, __expf(sink - M));
            out[(size_t)t * nh * HEAD_DIM + hq * HEAD_DIM + 2 * lane] = o0 * inv;
            out[(size_t)t * nh * HEAD_DIM + hq * HEAD_DIM + 2 * lane + 1] = o1 * inv;
        }
        return;
    }
    if (hw) {
        float* pp = part + ((size_t)(t * nh + hq) * smax + s) * PART;
        if (lane == 0) { pp[0] = m_run; pp[1] = l_run; }
        pp[2 + 2 * lane] = o0;
        pp[3 + 2 * lane] = o1;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_s = atomicAdd(counters + t * nkv + g, 1u) == (unsigned)(active - 1);
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    if (hw) {
        const float sink = L->sinks[hq];
        const float* pb = part + (size_t)(t * nh + hq) * smax * PART;
        float M = sink;
        for (int i = 0; i < active; i++) M = fmaxf(M, __ldcg(pb + i * PART));
        float den = __expf(sink - M), a0 = 0.f, a1 = 0.f;
        for (int i = 0; i < active; i++) {
            float f = __expf(__ldcg(pb + i * PART) - M);
            den = fmaf(f, __ldcg(pb + i * PART + 1), den);
            a0 = fmaf(f, __ldcg(pb + i * PART + 2 + 2 * lane), a0);
            a1 = fmaf(f, __ldcg(pb + i * PART + 3 + 2 * lane), a1);
        }
        float inv = 1.0f / den;
        out[(size_t)t * nh * HEAD_DIM + hq * HEAD_DIM + 2 * lane] = a0 * inv;
        out[(size_t)t * nh * HEAD_DIM + hq * HEAD_DIM + 2 * lane + 1] = a1 * inv;
    }
    if (threadIdx.x == 0) counters[t * nkv + g] = 0;
}

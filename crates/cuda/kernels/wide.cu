// The small kernels of a wide launch (T > MAXT tokens: a prefill chunk, or the decode tokens of
// many sequences). The big work of a wide launch goes elsewhere: dense bf16 projections to
// cuBLAS, 4-bit ones and the experts to moe_gemm.cu, attention to flash_attn.cu. These kernels
// are the glue between them, each one row (token) per block, memory-bound and cheap.
//
// Per layer (backend.rs `record_wide`):
//   k_rmsnorm_w (input norm, bf16 hi + lo rows) → q/k/v GEMMs over the 2T rows (f32
//   [2T][qd + 2 kvd]) → k_rope_w (hi + lo products, bias, RoPE; q f32, fresh K/V in the cache's
//   type) → k_flash_attn (bf16 hi + lo out) → k_kv_store (fresh K/V into the cache) → o_proj
//   GEMM over 2T rows → k_rmsnorm_w (x += o_hi + o_lo + o bias, post norm: bf16 + f32 out) →
//   k_router_w (router logits + top-k + softmax) → experts (moe_gemm.cu, bf16 hi part only).
//
// Why hi + lo: a bf16 activation carries 8 significant bits; splitting it into bf16(v) and
// bf16(v - bf16(v)) and multiplying both keeps ~16, at twice the tensor-core work of the
// (cheap) attention projections. Measured on the fixtures (CPU emulation of each rounding):
// bf16 inputs to q/k/v alone move the logits by a median 1.2e-2 per row, to o_proj 5e-3.
//
// Layouts: x f32 [T][H] (the residual stream), tok/pos i32 [T], cos/sin f32 [pos][32] (YaRN
// tables), KV elements per kvmode (KV_BF16 / KV_F32 / KV_F16, common.cuh).

#include "common.cuh"

__device__ __forceinline__ float block_sum(float v, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < nw; w++) s += red[w];
    return s;
}

__device__ __forceinline__ void store_kv(void* base, size_t i, float v, int kvmode) {
    if (kvmode == KV_F32) reinterpret_cast<float*>(base)[i] = v;
    else if (kvmode == KV_F16) reinterpret_cast<unsigned short*>(base)[i] = f2h(v);
    else reinterpret_cast<unsigned short*>(base)[i] = f2bf(v);
}

// x[t][c] = embedding row tok[t] (any QMat kind, exactly decoded). Grid T, block 256.
extern "C" __global__ void k_embed_w(QMat m, const int* tok, float* x, int H) {
    const int t = blockIdx.x;
    const long long r = tok[t];
    for (int c = threadIdx.x; c < H; c += blockDim.x) x[(size_t)t * H + c] = qmat_elem(m, r, c);
}

// Optionally x[t] += (add[t] + add[T + t]) and/or bias (written back; `add` is a GEMM output
// of 2T rows: the hi and lo parts of a split product, T = gridDim.x), then y = w * (x *
// rsqrt(mean(x^2) + eps)) (the decode kernels' order of operations), stored in ob (row stride
// H) as bf16 (omode 0), bf16 plus the rounding remainder bf16(y - bf16(y)) in row T + t (omode
// 1: a GEMM over the 2T rows of ob sees y to ~2^-16 relative), or f16 (omode 2: the input of
// qgemm.cu's NF4 experts), and, if of != null, as f32.
// Rows t come from rows[t] when rows != null (the lm_head rows of a launch), else t.
// Grid T, block 256.
extern "C" __global__ void k_rmsnorm_w(float* x, const float* add, const float* bias, const float* w, float eps,
                                       int H, const int* rows, unsigned short* ob, float* of, int omode) {
    __shared__ float red[32];
    const int t = blockIdx.x, T = gridDim.x;
    const int src = rows ? rows[t] : t;
    float* xr = x + (size_t)src * H;
    float ss = 0.f;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float v = xr[c];
        if (add) v += add[(size_t)t * H + c] + add[(size_t)(T + t) * H + c];
        if (bias) v += bias[c];
        if (add || bias) xr[c] = v;
        ss = fmaf(v, v, ss);
    }
    const float inv = 1.0f / sqrtf(block_sum(ss, red) / (float)H + eps);
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float v = w[c] * (xr[c] * inv);
        if (omode == 2) {
            ob[(size_t)t * H + c] = f2h(v);
        } else {
            const unsigned short hb = f2bf(v);
            ob[(size_t)t * H + c] = hb;
            if (omode == 1) ob[(size_t)(T + t) * H + c] = f2bf(v - bf_lo(hb));
        }
        if (of) of[(size_t)t * H + c] = v;
    }
}

// Adds the q/k/v biases (null when the GEMM already did), applies RoPE (rotate-half on
// (d, d+32), f32 tables) to q and k, and writes q (f32 [T][nh*64]) and the fresh K/V
// ([T][nkv*64], kvmode's type). qkv is the GEMM output f32 [T][nh*64 + 2*nkv*64]; with
// `split` it has 2T rows (products of the hi and lo parts of the input) and row t is
// qkv[t] + qkv[T + t]. Grid T, block 256.
extern "C" __global__ void k_rope_w(const float* qkv, const float* bq, const float* bk, const float* bv,
                                    const int* pos, const float* cos_tab, const float* sin_tab, float* q,
                                    void* kn, void* vn, int nh, int nkv, int kvmode, int split) {
    const int t = blockIdx.x, T = gridDim.x;
    const int qd = nh * HEAD_DIM, kvd = nkv * HEAD_DIM, ld = qd + 2 * kvd;
    const float* row = qkv + (size_t)t * ld;
    const float* rlo = split ? qkv + (size_t)(T + t) * ld : nullptr;
    const size_t p = (size_t)pos[t];
    // Rotation pairs: q heads (nh * 32), then k heads (nkv * 32); then v elements (kvd).
    for (int u = threadIdx.x; u < (nh + nkv) * 32; u += blockDim.x) {
        const bool isq = u < nh * 32;
        const int uu = isq ? u : u - nh * 32;
        const int d = uu & 31, c0 = (uu >> 5) * HEAD_DIM + d;
        const int o = isq ? 0 : qd;
        const float* b = isq ? bq : bk;
        float a = row[o + c0], c = row[o + c0 + 32];
        if (rlo) a += rlo[o + c0], c += rlo[o + c0 + 32];
        if (b) a += b[c0], c += b[c0 + 32];
        const float cs = cos_tab[p * 32 + d], sn = sin_tab[p * 32 + d];
        const float a2 = a * cs - c * sn;
        const float c2 = c * cs + a * sn;
        if (isq) {
            q[(size_t)t * qd + c0] = a2;
            q[(size_t)t * qd + c0 + 32] = c2;
        } else {
            store_kv(kn, (size_t)t * kvd + c0, a2, kvmode);
            store_kv(kn, (size_t)t * kvd + c0 + 32, c2, kvmode);
        }
    }
    for (int c = threadIdx.x; c < kvd; c += blockDim.x) {
        float v = row[qd + kvd + c];
        if (rlo) v += rlo[qd + kvd + c];
        if (bv) v += bv[c];
        store_kv(vn, (size_t)t * kvd + c, v, kvmode);
    }
}

// Copies the fresh K/V of the launch into each segment's cache (after attention has read them).
// On a ring (sliding layer) only the last `ring` positions of a segment are written: earlier
// ones would land on slots that later tokens of the same launch overwrite (and no later query
// can see them). Grid (max nq, nseg), block 128; elem = bytes per element (2 or 4).
extern "C" __global__ void k_kv_store(const SegDev* segs, int layer, const unsigned char* kn,
                                      const unsigned char* vn, int kvd, int ring, int elem) {
    const SegDev& s = segs[blockIdx.y];
    const int i = blockIdx.x;
    if (i >= s.nq) return;
    const int p = s.pos0 + i;
    if (ring && p < s.pos0 + s.nq - ring) return;
    const size_t slot = ring ? (size_t)(p % ring) : (size_t)p;
    const size_t bytes = (size_t)kvd * elem;
    const uint4* ks = reinterpret_cast<const uint4*>(kn + (size_t)(s.q0 + i) * bytes);
    const uint4* vs = reinterpret_cast<const uint4*>(vn + (size_t)(s.q0 + i) * bytes);
    uint4* kd = reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(s.kc[layer]) + slot * bytes);
    uint4* vd = reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(s.vc[layer]) + slot * bytes);
    for (int c = threadIdx.x; c < (int)(bytes / 16); c += blockDim.x) {
        kd[c] = ks[c];
        vd[c] = vs[c];
    }
}

// Router of one token per block: logits[e] = W[e] · h[t] + b[e] (h f32, the normed hidden
// state; W any kind, bf16 fast path), then top-k (descending logit, ties to the lower index —
// the reference's order) and a softmax over the k selected logits: sel/wsel [T][K].
// Grid T, block 256; E <= 128.
extern "C" __global__ void k_router_w(QMat m, const float* h, int H, int E, int K, int* sel, float* wsel) {
    __shared__ float logit[128];
    const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* x = h + (size_t)t * H;
    for (int e = warp; e < E; e += blockDim.x >> 5) {
        float acc = 0.f;
        if (m.kind == K_BF16 && (H & 1) == 0) {
            const unsigned* w2 = reinterpret_cast<const unsigned*>(m.w + (size_t)e * H * 2);
            for (int c = lane; c < H / 2; c += 32) {
                unsigned w = w2[c];
                acc = fmaf(bf_lo(w), x[2 * c], acc);
                acc = fmaf(bf_hi(w), x[2 * c + 1], acc);
            }
        } else {
            for (int c = lane; c < H; c += 32) acc = fmaf(qmat_elem(m, e, c), x[c], acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) logit[e] = acc + (m.bias ? m.bias[e] : 0.f);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int idx[MAXK];
        float val[MAXK];
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int j = 0; j < k; j++) taken |= idx[j] == e;
                if (!taken && (best < 0 || logit[e] > logit[best])) best = e;
            }
            idx[k] = best;
            val[k] = logit[best];
        }
        float mx = val[0], sum = 0.f;
        for (int k = 1; k < K; k++) mx = fmaxf(mx, val[k]);
        for (int k = 0; k < K; k++) {
            val[k] = expf(val[k] - mx);
            sum += val[k];
        }
        for (int k = 0; k < K; k++) {
            sel[t * K + k] = idx[k];
            wsel[t * K + k] = val[k] / sum;
        }
    }
}

// Greedy token of each logits row ([rows][vocab] f32, row = blockIdx.x): the lowest index
// holding the largest value; NaN is never chosen and +inf beats every finite value (the
// engine's `greedy_token` rule); -1 when no value is above -inf. Grid rows, block 1024.
__device__ __forceinline__ void better(float& bv, int& bi, float v, int i) {
    if (i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi))) bv = v, bi = i;
}

extern "C" __global__ void k_argmax_rows(const float* logits, int vocab, int* idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float bv = -INFINITY;
    int bi = -1;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = row[c];
        if (v > bv) bv = v, bi = c;  // ascending c: the first of equal values stays
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) better(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        bv = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
        bi = lane < (int)(blockDim.x >> 5) ? si[lane] : -1;
#pragma unroll
        for (int o = 16; o; o >>= 1)
            better(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
        if (lane == 0) idx[blockIdx.x] = bi;
    }
}

// GEMV-style kernels of the GPT-OSS forward pass, reading weights in their stored encodings
// (bf16 / f16 / f32, bitsandbytes NF4 with or without double quantization, MXFP4); see
// common.cuh for the QMat layouts and the padded shared-memory activation layout.
//
// All kernels: block = 256 threads (8 warps); one warp computes one output "unit" (one row, or a
// pair of rows) for all T tokens of the launch, looping over units with a grid stride
// (unit = blockIdx.x*8 + warp, stride gridDim.x*8), so the grid can be sized to the GPU
// (SMs x resident blocks). Accumulation is f32 (fmaf); activations are f32.
//
// k_embed        grid (T), block 256. x[t, :] = embed[tok[t], :] (f32).
// k_linear_{1,4} grid (gx), block 256, dyn smem = NT*padded(cols)*4 + 512.
//                out[t, r] (=|+=) W[r, :] . x'[t, :] + b[r] for t < T, r < rows, where x' is x
//                or rmsnorm(x, norm_w). Flags: F_RESID (add into out), F_ARGMAX (greedy token per
//                t into idx_out, ties -> lowest index, NaN never, -1 if nothing > -inf), F_TOPK (router: top-k logits of each t ->
//                sel/wsel with softmax over the k), F_WRITE_NORMED (block 0 writes x' to aux).
//                The argmax/top-k run in the last block to finish (atomic counter, reset after),
//                in a fixed order: deterministic.
// k_qkv_{1,4}    grid (gx), block 256, dyn smem = NT*padded(H)*4 + 3*64.
//                h = rmsnorm(x, in_norm); units = q (nh*32), k (nkv*32), v (nkv*32) row pairs
//                (r, r+32) of one head: q/k rotated with YaRN RoPE (rotate-half, the f32 cos/sin
//                tables [pos][32] of the CPU reference), q -> qout [T, nh*64] f32, k/v -> the
//                layer's KV cache (kvmode: bf16, f16 or f32) at slot pos (pos % ring on sliding
//                layers).
// k_moe_gu       grid (gx, T*K), block 256, dyn smem = padded(H)*4 + 64.
//                job j = (t, k) = (j / K, j % K), expert e = sel[j]; unit i < I = rows (2i, 2i+1)
//                of gate_up[e] (gate, up interleaved) -> act[j, i] = clamped SwiGLU.
// k_moe_dn       grid (gx, T), block 256, dyn smem = K*padded(I)*4 + K*64.
//                rows r = 2p, 2p+1 (warp = (row pair, expert k)): x[t, r] += sum_k wsel[t,k] *
//                (down[sel[t,k]][r, :] . act[t*K+k, :] + bias[r]), summed in k order through
//                shared memory (deterministic, no float atomics).
// Every GEMV kernel prefetches (into L2) the rows of its first PF units before its prologue and
// of unit n+PF while computing unit n (k_linear only for matrices of <= 8 rows per warp), and
// loads its activations with all loads in flight at once.

#include "common.cuh"

extern __shared__ float4 smem4[];  // dynamic shared memory of every kernel below

#define F_RESID 1
#define F_ARGMAX 2
#define F_TOPK 4
#define F_WRITE_NORMED 8
#define F_NORM 16

extern "C" __global__ void k_embed(QMat m, const StepParams* sp, float* x, int H) {
    int t = blockIdx.x;
    if (t >= sp->T) return;
    long long tok = sp->tok[t];
    for (int i = threadIdx.x; i < H; i += blockDim.x) x[(size_t)t * H + i] = qmat_elem(m, tok, i);
}

// Top-k of one row of logits by one warp: k rounds of a warp argmax (ties -> lower index),
// then softmax over the selected values.
__device__ void warp_topk(const float* logits, int n, int k, int* sel, float* wsel) {
    int lane = threadIdx.x & 31;
    float vals[MAXK];
    int idxs[MAXK];
    for (int kk = 0; kk < k; kk++) {
        float best = -INFINITY;
        int bi = 0x7fffffff;
        for (int e = lane; e < n; e += 32) {
            bool taken = false;
            for (int p = 0; p < kk; p++) taken |= (idxs[p] == e);
            float v = __ldcg(logits + e);
            if (!taken && (v > best || (v == best && e < bi))) { best = v; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        vals[kk] = best;
        idxs[kk] = bi;
    }
    if (lane == 0) {
        float m = -INFINITY;
        for (int kk = 0; kk < k; kk++) m = fmaxf(m, vals[kk]);
        float ex[MAXK];
        float sum = 0.f;
        for (int kk = 0; kk < k; kk++) { ex[kk] = expf(vals[kk] - m); sum += ex[kk]; }
        for (int kk = 0; kk < k; kk++) { sel[kk] = idxs[kk]; wsel[kk] = ex[kk] / sum; }
    }
}

// warp_topk over logits in shared memory (or any memory this block wrote before a barrier).
__device__ void warp_topk_local(const float* logits, int n, int k, int* sel, float* wsel) {
    int lane = threadIdx.x & 31;
    float vals[MAXK];
    int idxs[MAXK];
    for (int kk = 0; kk < k; kk++) {
        float best = -INFINITY;
        int bi = 0x7fffffff;
        for (int e = lane; e < n; e += 32) {
            bool taken = false;
            for (int p = 0; p < kk; p++) taken |= (idxs[p] == e);
            float v = logits[e];
            if (!taken && (v > best || (v == best && e < bi))) { best = v; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        vals[kk] = best;
        idxs[kk] = bi;
    }
    if (lane == 0) {
        float m = -INFINITY;
        for (int kk = 0; kk < k; kk++) m = fmaxf(m, vals[kk]);
        float ex[MAXK];
        float sum = 0.f;
        for (int kk = 0; kk < k; kk++) { ex[kk] = expf(vals[kk] - m); sum += ex[kk]; }
        for (int kk = 0; kk < k; kk++) { sel[kk] = idxs[kk]; wsel[kk] = ex[kk] / sum; }
    }
}

template <int NT, int UD>
__device__ void linear_body(QMat m, const float* x, int ld_in, int T, const float* norm_w, float eps,
                            float* out, int ld_out, int flags, float* aux, int* idx_out, float* red_val,
                            int* red_idx, unsigned* counter, int topk, int* sel, float* wsel) {
    float* smem = reinterpret_cast<float*>(smem4);
    const int xstride = padded_len(m.cols);
    float* xs = smem;
    float* red = smem + NT * xstride;  // 64 floats
    __shared__ float lut[16];
    __shared__ float bv_s[WARPS][NT];
    __shared__ int bi_s[WARPS][NT];
    __shared__ int last_s;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = blockIdx.x * WARPS + warp, stride = gridDim.x * WARPS;
    const bool pf = m.rows <= 8 * stride;  // big matrices (lm_head) stream well without
    for (int k = 0; k < PF; k++)
        if (pf && r0 + k * stride < m.rows) prefetch_rows(m, r0 + k * stride, 1, lane);
    build_lut(lut, m);
    load_x<NT>(xs, xstride, x, m.cols, T, (flags & F_NORM) ? norm_w : nullptr, eps, red,
               ((flags & F_WRITE_NORMED) && blockIdx.x == 0) ? aux : nullptr);
    float best[NT];
    int bidx[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) { best[t] = -INFINITY; bidx[t] = 0x7fffffff; }
    for (int r = r0; r < m.rows; r += stride) {
        if (pf && r + PF * stride < m.rows) prefetch_rows(m, r + PF * stride, 1, lane);
        int rows[1] = {r};
        float acc[1][NT];
        warp_dot<1, NT, UD, 3>(m, rows, xs, xstride, lut, acc, lane);
        if (lane == 0) {
            float b = m.bias ? m.bias[r] : 0.f;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < T) {
                    float v = acc[0][t] + b;
                    float* o = out + (size_t)t * ld_out + r;
                    if (flags & F_RESID) *o += v; else *o = v;
                    if (v > best[t]) { best[t] = v; bidx[t] = r; }
                }
            }
        }
    }
    if (!(flags & (F_ARGMAX | F_TOPK))) return;
    if (flags & F_ARGMAX) {
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < NT; t++) { bv_s[warp][t] = best[t]; bi_s[warp][t] = bidx[t]; }
        }
        __syncthreads();
        if (threadIdx.x < NT) {
            int t = threadIdx.x;
            float bv = -INFINITY;
            int bi = 0x7fffffff;
            for (int w = 0; w < WARPS; w++) {
                float v = bv_s[w][t];
                int i = bi_s[w][t];
                if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
            }
            red_val[blockIdx.x * NT + t] = bv;
            red_idx[blockIdx.x * NT + t] = bi;
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_s = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    if (flags & F_ARGMAX) {
        if (threadIdx.x < T) {
            int t = threadIdx.x;
            float bv = -INFINITY;
            int bi = 0x7fffffff;
            for (int b = 0; b < (int)gridDim.x; b++) {
                float v = __ldcg(red_val + b * NT + t);
                int i = __ldcg(red_idx + b * NT + t);
                if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
            }
            idx_out[t] = bi == 0x7fffffff ? -1 : bi;  // -1: no logit above -inf
        }
    }
    if (flags & F_TOPK) {
        if (warp < T) warp_topk(out + (size_t)warp * ld_out, m.rows, topk, sel + warp * topk, wsel + warp * topk);
    }
    if (threadIdx.x == 0) *counter = 0;
}

extern "C" __global__ void __launch_bounds__(256) k_linear_1(QMat m, const float* x, int ld_in, int T, const float* norm_w,
                                           float eps, float* out, int ld_out, int flags, float* aux,
                                           int* idx_out, float* red_val, int* red_idx, unsigned* counter,
                                           int topk, int* sel, float* wsel) {
    linear_body<1, 8>(m, x, ld_in, T, norm_w, eps, out, ld_out, flags, aux, idx_out, red_val, red_idx, counter,
                      topk, sel, wsel);
}

extern "C" __global__ void __launch_bounds__(256) k_linear_4(QMat m, const float* x, int ld_in, int T, const float* norm_w,
                                           float eps, float* out, int ld_out, int flags, float* aux,
                                           int* idx_out, float* red_val, int* red_idx, unsigned* counter,
                                           int topk, int* sel, float* wsel) {
    linear_body<4, 8>(m, x, ld_in, T, norm_w, eps, out, ld_out, flags, aux, idx_out, red_val, red_idx, counter,
                      topk, sel, wsel);
}

// Unit u of k_qkv: which matrix (0 q, 1 k, 2 v), the head-local dim d < 32 and the first row.
__device__ __forceinline__ void qkv_unit(int u, int nq, int nk, int& which, int& d, int& r0) {
    which = u < nq ? 0 : (u < nq + nk ? 1 : 2);
    int uu = u - (which == 0 ? 0 : (which == 1 ? nq : nq + nk));
    d = uu & 31;
    r0 = (uu >> 5) * HEAD_DIM + d;
}

template <int NT>
__device__ void qkv_body(const LayerDev* L, const StepParams* sp, int layer, const float* x, int H, int nh,
                         int nkv, float eps, float* qout, const float* cos_tab, const float* sin_tab, int kvmode) {
    float* smem = reinterpret_cast<float*>(smem4);
    const int xstride = padded_len(H);
    float* xs = smem;
    __shared__ float luts[3 * 16];
    __shared__ QMat mats[3];
    __shared__ float red[64];
    if (threadIdx.x == 0) { mats[0] = L->q; mats[1] = L->k; mats[2] = L->v; }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nq = nh * 32, nk = nkv * 32;
    const int units = nq + 2 * nk;
    const int u0 = blockIdx.x * WARPS + warp, stride = gridDim.x * WARPS;
    for (int k = 0; k < PF; k++) {
        int u = u0 + k * stride, which, d, r;
        if (u < units) {
            qkv_unit(u, nq, nk, which, d, r);
            prefetch_rows(mats[which], r, 1, lane);
            prefetch_rows(mats[which], r + 32, 1, lane);
        }
    }
    for (int j = 0; j < 3; j++) build_lut(luts + 16 * j, mats[j]);
    const int T = sp->T;
    load_x<NT>(xs, xstride, x, H, T, L->in_norm, eps, red, nullptr);
    const int kvd = nkv * HEAD_DIM;
    for (int u = u0; u < units; u += stride) {
        int which, d, r0;
        if (u + PF * stride < units) {
            qkv_unit(u + PF * stride, nq, nk, which, d, r0);
            prefetch_rows(mats[which], r0, 1, lane);
            prefetch_rows(mats[which], r0 + 32, 1, lane);
        }
        qkv_unit(u, nq, nk, which, d, r0);
        int rows[2] = {r0, r0 + 32};
        const QMat& m = mats[which];
        float acc[2][NT];
        warp_dot<2, NT, 6, 3>(m, rows, xs, xstride, luts + 16 * which, acc, lane);
        if (lane == 0) {
            float b0 = m.bias ? m.bias[rows[0]] : 0.f;
            float b1 = m.bias ? m.bias[rows[1]] : 0.f;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < T) {
                    int pos = sp->pos[t];
                    float a = acc[0][t] + b0, c = acc[1][t] + b1;
                    if (which < 2) {
                        float cs = cos_tab[(size_t)pos * 32 + d], sn = sin_tab[(size_t)pos * 32 + d];
                        float a2 = a * cs - c * sn;
                        float c2 = c * cs + a * sn;
                        a = a2;
                        c = c2;
                    }
                    if (which == 0) {
                        qout[(size_t)t * nh * HEAD_DIM + rows[0]] = a;
                        qout[(size_t)t * nh * HEAD_DIM + rows[1]] = c;
                    } else {
                        int slot = L->ring ? pos % L->ring : pos;
                        unsigned long long base = which == 1 ? sp->kc[t][layer] : sp->vc[t][layer];
                        if (kvmode == KV_F32) {
                            float* cache = reinterpret_cast<float*>(base);
                            cache[(size_t)slot * kvd + rows[0]] = a;
                            cache[(size_t)slot * kvd + rows[1]] = c;
                        } else if (kvmode == KV_F16) {
                            unsigned short* cache = reinterpret_cast<unsigned short*>(base);
                            cache[(size_t)slot * kvd + rows[0]] = f2h(a);
                            cache[(size_t)slot * kvd + rows[1]] = f2h(c);
                        } else {
                            unsigned short* cache = reinterpret_cast<unsigned short*>(base);
                            cache[(size_t)slot * kvd + rows[0]] = f2bf(a);
                            cache[(size_t)slot * kvd + rows[1]] = f2bf(c);
                        }
                    }
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 3) k_qkv_1(const LayerDev* L, const StepParams* sp, int layer, const float* x,
                                        int H, int nh, int nkv, float eps, float* qout, const float* cos_tab,
                                        const float* sin_tab, int kvmode) {
    qkv_body<1>(L, sp, layer, x, H, nh, nkv, eps, qout, cos_tab, sin_tab, kvmode);
}

extern "C" __global__ void __launch_bounds__(256) k_qkv_4(const LayerDev* L, const StepParams* sp, int layer, const float* x,
                                        int H, int nh, int nkv, float eps, float* qout, const float* cos_tab,
                                        const float* sin_tab, int kvmode) {
    qkv_body<4>(L, sp, layer, x, H, nh, nkv, eps, qout, cos_tab, sin_tab, kvmode);
}

// Units of k_moe_gu: rows (2i, 2i+1) = (gate_i, up_i) -> act[j, i].
extern "C" __global__ void __launch_bounds__(256, 3) k_moe_gu(const LayerDev* L, const StepParams* sp, const float* h, int H,
                                         int I, int K, const int* sel, float* act, float alpha, float limit) {
    float* smem = reinterpret_cast<float*>(smem4);
    const int j = blockIdx.y;
    const int t = j / K;
    if (t >= sp->T) return;
    const int xstride = padded_len(H);
    float* xs = smem;
    __shared__ float lut[16];
    __shared__ QMat m_s;
    __shared__ float red[64];
    if (threadIdx.x == 0) m_s = L->gu[sel[j]];
    __syncthreads();
    const QMat& m = m_s;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int u0 = blockIdx.x * WARPS + warp, stride = gridDim.x * WARPS;
    for (int k = 0; k < PF; k++)
        if (u0 + k * stride < I) prefetch_rows(m, 2 * (u0 + k * stride), 2, lane);
    build_lut(lut, m);
    load_x<1>(xs, xstride, h + (size_t)t * H, H, 1, nullptr, 0.f, red, nullptr);
    for (int i = u0; i < I; i += stride) {
        if (i + PF * stride < I) prefetch_rows(m, 2 * (i + PF * stride), 2, lane);
        int rows[2] = {2 * i, 2 * i + 1};
        float acc[2][1];
        warp_dot<2, 1, 4, 3>(m, rows, xs, xstride, lut, acc, lane);
        if (lane == 0) {
            float gate = acc[0][0] + (m.bias ? m.bias[2 * i] : 0.f);
            float up = acc[1][0] + (m.bias ? m.bias[2 * i + 1] : 0.f);
            act[(size_t)j * I + i] = clamped_swiglu(gate, up, alpha, limit);
        }
    }
}

// k_moe_dn: warp w of a block computes rows (2p, 2p+1), p = base + w / K, of expert k = w % K
// (8 / K row pairs per block iteration, all K experts' loads in flight at once); the K weighted
// partial sums meet in shared memory and are added to x in expert order.
extern "C" __global__ void __launch_bounds__(256, 3) k_moe_dn(const LayerDev* L, const StepParams* sp, const float* act, int H,
                                         int I, int K, const int* sel, const float* wsel, float* x) {
    float* smem = reinterpret_cast<float*>(smem4);
    const int t = blockIdx.y;
    if (t >= sp->T) return;
    const int xstride = padded_len(I);
    float* xs = smem;  // K vectors
    __shared__ float luts[MAXK * 16];
    __shared__ QMat mats[MAXK];
    __shared__ float wk[MAXK];
    __shared__ float partial[WARPS][2];
    if (threadIdx.x < K) {
        mats[threadIdx.x] = L->dn[sel[t * K + threadIdx.x]];
        wk[threadIdx.x] = wsel[t * K + threadIdx.x];
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = WARPS / K;           // row pairs per block iteration
    const bool active = warp < groups * K;  // warps beyond groups*K idle (K = 3)
    const int k = warp % K, lp = warp / K;
    const int pairs = H >> 1;
    const int stride = gridDim.x * groups;
    const QMat& m = mats[k];
    if (active)
        for (int q = 0; q < PF; q++) {
            int p = blockIdx.x * groups + lp + q * stride;
            if (p < pairs) prefetch_rows(m, 2 * p, 2, lane);
        }
    for (int kk = 0; kk < K; kk++) build_lut(luts + 16 * kk, mats[kk]);
    load_rows<12>(xs, xstride, act + (size_t)t * K * I, K, K, I);  // the K rows are contiguous
    __syncthreads();
    for (int base = blockIdx.x * groups; base < pairs; base += stride) {
        const int p = base + lp;
        if (active && p < pairs) {
            if (p + PF * stride < pairs) prefetch_rows(m, 2 * (p + PF * stride), 2, lane);
            int rows[2] = {2 * p, 2 * p + 1};
            float acc[2][1];
            warp_dot<2, 1, 4, 3>(m, rows, xs + k * xstride, xstride, luts + 16 * k, acc, lane);
            if (lane == 0) {
                const float* b = m.bias;
                partial[warp][0] = wk[k] * (acc[0][0] + (b ? b[rows[0]] : 0.f));
                partial[warp][1] = wk[k] * (acc[1][0] + (b ? b[rows[1]] : 0.f));
            }
        }
        __syncthreads();
        if (threadIdx.x < 2 * groups) {
            const int g = threadIdx.x >> 1, r = threadIdx.x & 1;
            const int pp = base + g;
            if (pp < pairs) {
                float total = 0.f;
                for (int kk = 0; kk < K; kk++) total += partial[g * K + kk][r];
                x[(size_t)t * H + 2 * pp + r] += total;
            }
        }
        __syncthreads();
    }
}

// =============================================================================================
// Decode-only (T = 1) kernels, v6: activations in registers, rows in tiles.
//
// A GEMV lane of the kernels above re-reads its 32 activations from shared memory for every row
// (one LDS.128 wavefront per 32 weights, as many as the 4-bit table lookups), and a warp does
// one row (pair) per unit. Here every warp owns one column segment of <= 32 16-byte chunks
// (segment s of S = ceil(chunks/32); lane l owns chunk s*seg + l), keeps that chunk's 32
// activations in registers for the whole kernel, and runs over tiles of RT rows: per tile each
// lane issues RT 16-byte loads (plus scales) before any is used, computes RT chunk dot products
// with the 4-bit table in shared memory (one PRMT, one LDS, one FMA per weight), and the warp
// reduces the RT row sums with one transposing butterfly (log2(RT) + 5 - log2(RT) shuffle steps
// for all RT rows). The S segment sums of a row meet in shared memory and are added in segment
// order: deterministic.
//
// Measured (bench/CUDA.md, v6): k_oproj_router is used for every single-token step; k_moe_gu1 /
// k_moe_dn1 are correct but slower than k_moe_gu / k_moe_dn and only run with GPTOSS_CUDA_MOE1=1.
//
// k_moe_gu1  grid (gx), block S*G warps (G row groups, S <= 6). Tiles of RT rows (8, or 4 in
//            k_moe_gu1_rt4, the default of the launcher) of the K
//            selected experts' gate_up (tile = (k, rows)); act[k, i] = SwiGLU(gate 2i, up 2i+1).
// k_moe_dn1  grid (gx), block K*S warps (warp = (expert k, segment s)). Tiles of 4 rows (2 in
//            k_moe_dn1_rt2) of
//            the K experts' down: x[r] += sum_k wsel[k] * (down_k[r,:] . act[k,:] + b_k[r]),
//            summed in k order.
// k_oproj_router  grid (gx <= RP_MAXB), block 256 (<= 80 registers: 3 blocks per SM, so the
//            grid covers the 2880 rows in one round), dyn smem = padded(QD)*4 + 512.
//            x[r] += o[r,:] . attn + b_o[r] (one row per warp unit, as k_linear), and, as each
//            x[r] is produced, lane e of its warp adds router[e, r] * (post_norm[r] * x[r]) to
//            its partial logit of expert e (+32, +64, +96) and x[r]^2 to the sum of squares.
//            Blocks write their partials ([E+1][RP_MAXB], transposed); the last block to finish
//            sums them in a fixed order, logits = inv_rms * partial + b_r, writes
//            h = post_norm * (x * inv_rms) and runs the top-k (bf16 router only).
// =============================================================================================

#define RT_GU 8
#define RT_DN 4
#define RP_MAXB 384  // most blocks of k_oproj_router
#define RP_MAXE 128  // most experts of k_oproj_router

// Address of the scale data of chunk c (32 elements) of row r of a 4-bit matrix.
__device__ __forceinline__ const unsigned char* q4_scale_ptr(const QMat& m, int r, int c, int nch) {
    if (m.kind == K_MXFP4) return m.s + (size_t)r * nch + c;
    const size_t k = (size_t)r * (nch >> 1) + (c >> 1);
    return m.kind == K_NF4N ? m.s + k : m.s + 4 * k;
}

// Raw scale data of one chunk (loads issued early, decoded after the weights arrive).
struct SRaw {
    unsigned a;
    float b;
};

__device__ __forceinline__ SRaw q4_scale_load(const QMat& m, int r, int c, int nch) {
    SRaw s;
    const unsigned char* p = q4_scale_ptr(m, r, c, nch);
    if (m.kind == K_MXFP4) {
        s.a = __ldg(p);
        s.b = 0.f;
    } else if (m.kind == K_NF4N) {
        s.a = __ldg(p);
        s.b = __ldg(m.nabs + (((size_t)r * (nch >> 1) + (c >> 1)) >> m.nbs_shift));
    } else {
        s.a = 0;
        s.b = __ldg(reinterpret_cast<const float*>(p));
    }
    return s;
}

// ncode_s: the matrix's nested code (256 f32) in shared memory.
__device__ __forceinline__ float q4_scale_fin(const QMat& m, const float* ncode_s, SRaw s) {
    if (m.kind == K_MXFP4) return e8m0(s.a);
    if (m.kind == K_NF4N) return __fadd_rn(__fmul_rn(ncode_s[s.a], s.b), m.offset);
    return s.b;
}

// Dot of one 16-byte chunk of 4-bit codes (32 elements) with 32 activations in registers.
// luts: the value tables of up to 4 matrices (static shared memory, 16 f32 each); bx = the byte
// offset of this matrix's table (64 k) replicated in all 4 bytes, OR-ed into the 4 packed byte
// offsets (4 * nibble < 64) so that every lookup is one PRMT + one LDS [reg + static offset].
// MX: element 2j in the low nibble.
template <bool MX>
__device__ __forceinline__ float chunk_dot(const uint4 v, const float (&x)[32], const float* luts, unsigned bx) {
    const char* lb = reinterpret_cast<const char*>(luts);
    float a = 0.f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const unsigned w = q == 0 ? v.x : (q == 1 ? v.y : (q == 2 ? v.z : v.w));
        const unsigned hi = ((w >> 2) & 0x3c3c3c3cu) | bx, lo = ((w << 2) & 0x3c3c3c3cu) | bx;
        const unsigned f = MX ? lo : hi, s2 = MX ? hi : lo;
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4440)), x[8 * q + 0], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4440)), x[8 * q + 1], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4441)), x[8 * q + 2], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4441)), x[8 * q + 3], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4442)), x[8 * q + 4], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4442)), x[8 * q + 5], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4443)), x[8 * q + 6], a);
        a = fmaf(*reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4443)), x[8 * q + 7], a);
    }
    return a;
}

// Sums R per-lane values (one per row) over the 32 lanes of a warp for all R rows at once.
// Returns, in every lane, the total of row lane / (32 / R) (so lanes with lane % (32/R) == 0
// hold row 0, 1, ... R-1 in order). Fixed order: deterministic.
template <int R>
__device__ __forceinline__ float xreduce(float (&v)[R], int lane) {
#pragma unroll
    for (int n = R, off = 16; n > 1; n >>= 1, off >>= 1) {
        const bool up = (lane & off) != 0;
#pragma unroll
        for (int i = 0; i < n / 2; i++) {
            const float send = up ? v[i] : v[i + n / 2];
            const float keep = up ? v[i + n / 2] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
    }
    float r = v[0];
#pragma unroll
    for (int off = 16 / R; off > 0; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
    return r;
}

// One tile: rows r0..r0+R-1 of m (matrix k of the block's tables), this lane's chunk c (act_l:
// the lane owns a chunk). Returns the warp-reduced sum of row lane / (32 / R).
template <int R>
__device__ __forceinline__ float q4_tile(const QMat& m, const float* ncode_s, const float* luts, int k, int r0,
                                         int c, int nch, bool act_l, const float (&xr)[32], int lane) {
    const size_t rb = (size_t)(nch << 4);
    uint4 w[R];
    SRaw sr[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
        if (act_l) {
            w[i] = ldg16(m.w + (size_t)(r0 + i) * rb + ((size_t)c << 4));
            sr[i] = q4_scale_load(m, r0 + i, c, nch);
        } else {
            w[i] = make_uint4(0, 0, 0, 0);
            sr[i].a = 0;
            sr[i].b = 0.f;
        }
    }
    const unsigned bx = 0x40404040u * (unsigned)k;
    float rp[R];
    if (m.kind == K_MXFP4) {
#pragma unroll
        for (int i = 0; i < R; i++) rp[i] = chunk_dot<true>(w[i], xr, luts, bx) * q4_scale_fin(m, ncode_s, sr[i]);
    } else {
#pragma unroll
        for (int i = 0; i < R; i++) rp[i] = chunk_dot<false>(w[i], xr, luts, bx) * q4_scale_fin(m, ncode_s, sr[i]);
    }
    if (!act_l) {
#pragma unroll
        for (int i = 0; i < R; i++) rp[i] = 0.f;
    }
    return xreduce<R>(rp, lane);
}

// L2 prefetch of this lane's chunk (and its scale) of rows r0..r0+R-1.
__device__ __forceinline__ void q4_prefetch_tile(const QMat& m, int r0, int R, int c, int nch) {
    const size_t rb = (size_t)(nch << 4);
    for (int i = 0; i < R; i++) {
        pf_l2(m.w + (size_t)(r0 + i) * rb + ((size_t)c << 4));
        if ((c & 1) == 0 || m.kind == K_MXFP4) pf_l2(q4_scale_ptr(m, r0 + i, c, nch));
    }
}

// The K matrices' value tables and nested codes into shared memory (no barrier).
__device__ __forceinline__ void q4_tables(const QMat* mats, int K, float* luts, float* ncs) {
    for (int i = threadIdx.x; i < K * 16; i += blockDim.x) {
        const QMat& m = mats[i >> 4];
        luts[i] = m.kind == K_MXFP4 ? FP4_VALUES[i & 15] : __ldg(m.code + (i & 15));
    }
    for (int i = threadIdx.x; i < K * 256; i += blockDim.x) {
        const QMat& m = mats[i >> 8];
        if (m.kind == K_NF4N) ncs[i] = __ldg(m.ncode + (i & 255));
    }
}

// The 32 activations of chunk c of vector v into registers (zeros for lanes without a chunk).
__device__ __forceinline__ void load_chunk_x(float (&xr)[32], const float* v, int c, bool act_l) {
    const float4* p = reinterpret_cast<const float4*>(v + (size_t)c * 32);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float4 f = act_l ? p[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        xr[4 * i] = f.x;
        xr[4 * i + 1] = f.y;
        xr[4 * i + 2] = f.z;
        xr[4 * i + 3] = f.w;
    }
}

// The per-tile segment sums go through a double-buffered shared array, so one barrier per tile
// suffices (a buffer is rewritten only after the next barrier, which its readers pass after
// reading); the finishing threads load their biases (and x) before the tile's dot products.
template <int RT>
__device__ __forceinline__ void moe_gu1_body(const LayerDev* L, const float* h, int H, int I, int K, int S,
                                             const int* sel, float* act, float alpha, float limit) {
    __shared__ QMat mats[MAXK];
    __shared__ float luts[MAXK * 16];
    __shared__ float ncs[MAXK * 256];
    __shared__ float part[2][32 * RT];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int G = (blockDim.x >> 5) / S;
    const int g = warp / S, s = warp - g * S;
    if (tid < K) mats[tid] = L->gu[sel[tid]];
    __syncthreads();
    const int nch = H >> 5, seg = (nch + S - 1) / S, c = s * seg + lane;
    const bool act_l = lane < seg && c < nch && g < G;
    const int tpe = (2 * I) / RT, ntiles = K * tpe;
    const int stride = gridDim.x * G;
    if (act_l) {
        for (int q = 0; q < 2; q++) {
            const int tile = blockIdx.x * G + g + q * stride;
            if (tile < ntiles) {
                const int k = tile / tpe;
                q4_prefetch_tile(mats[k], (tile - k * tpe) * RT, RT, c, nch);
            }
        }
    }
    q4_tables(mats, K, luts, ncs);
    float xr[32];
    load_chunk_x(xr, h, c, act_l);
    __syncthreads();
    int par = 0;
    for (int base = blockIdx.x * G; base < ntiles; base += stride, par ^= 1) {
        // Finishing thread tid < G*RT/2: pair p of the tile of group gg.
        const bool fin = tid < G * (RT / 2);
        const int gg = tid / (RT / 2), p = tid - gg * (RT / 2), tf = base + gg;
        float bg = 0.f, bu = 0.f;
        int fk = 0, fr = 0;
        if (fin && tf < ntiles) {
            fk = tf / tpe;
            fr = (tf - fk * tpe) * RT + 2 * p;
            const float* b = mats[fk].bias;
            if (b) {
                bg = b[fr];
                bu = b[fr + 1];
            }
        }
        const int tile = base + g;
        if (g < G && tile < ntiles) {
            const int k = tile / tpe, r0 = (tile - k * tpe) * RT;
            const QMat& m = mats[k];
            if (act_l && tile + 2 * stride < ntiles) {
                const int t2 = tile + 2 * stride, k2 = t2 / tpe;
                q4_prefetch_tile(mats[k2], (t2 - k2 * tpe) * RT, RT, c, nch);
            }
            const float v = q4_tile<RT>(m, ncs + 256 * k, luts, k, r0, c, nch, act_l, xr, lane);
            if ((lane & (32 / RT - 1)) == 0) part[par][warp * RT + lane / (32 / RT)] = v;
        }
        __syncthreads();
        if (fin && tf < ntiles) {
            float gate = bg, up = bu;
            float sg = 0.f, su = 0.f;
            for (int s2 = 0; s2 < S; s2++) {
                sg += part[par][(gg * S + s2) * RT + 2 * p];
                su += part[par][(gg * S + s2) * RT + 2 * p + 1];
            }
            gate = sg + gate;
            up = su + up;
            act[(size_t)fk * I + (fr >> 1)] = clamped_swiglu(gate, up, alpha, limit);
        }
    }
}

// Two tile heights: 8 rows (<= 112 registers, 3 blocks of 6 warps per SM) and 4 rows.
extern "C" __global__ void __launch_bounds__(192, 3) k_moe_gu1(const LayerDev* L, const float* h, int H, int I, int K,
                                                               int S, const int* sel, float* act, float alpha,
                                                               float limit) {
    moe_gu1_body<8>(L, h, H, I, K, S, sel, act, alpha, limit);
}
extern "C" __global__ void __launch_bounds__(192, 4) k_moe_gu1_rt4(const LayerDev* L, const float* h, int H, int I,
                                                                   int K, int S, const int* sel, float* act,
                                                                   float alpha, float limit) {
    moe_gu1_body<4>(L, h, H, I, K, S, sel, act, alpha, limit);
}

template <int RT>
__device__ __forceinline__ void moe_dn1_body(const LayerDev* L, const float* act, int H, int I, int K, int S,
                                             const int* sel, const float* wsel, float* x) {
    __shared__ QMat mats[MAXK];
    __shared__ float luts[MAXK * 16];
    __shared__ float ncs[MAXK * 256];
    __shared__ float wk[MAXK];
    __shared__ float part[2][32 * RT];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int k = warp / S, s = warp - k * S;
    if (tid < K) {
        mats[tid] = L->dn[sel[tid]];
        wk[tid] = wsel[tid];
    }
    __syncthreads();
    const int nch = I >> 5, seg = (nch + S - 1) / S, c = s * seg + lane;
    const bool act_l = lane < seg && c < nch && k < K;
    const int ntiles = H / RT, stride = gridDim.x;
    if (act_l) {
        for (int q = 0; q < 2; q++) {
            const int tile = blockIdx.x + q * stride;
            if (tile < ntiles) q4_prefetch_tile(mats[k], tile * RT, RT, c, nch);
        }
    }
    q4_tables(mats, K, luts, ncs);
    float xr[32];
    load_chunk_x(xr, act + (size_t)(k < K ? k : 0) * I, c, act_l);
    __syncthreads();
    int par = 0;
    for (int tile = blockIdx.x; tile < ntiles; tile += stride, par ^= 1) {
        // Finishing thread tid < RT: row tile*RT + tid; its biases and x loaded first.
        float bk[MAXK], xo = 0.f;
        const int r = tile * RT + tid;
        if (tid < RT) {
#pragma unroll
            for (int kk = 0; kk < MAXK; kk++) {
                const float* b = kk < K ? mats[kk].bias : nullptr;
                bk[kk] = b ? b[r] : 0.f;
            }
            xo = x[r];
        }
        if (k < K) {
            const QMat& m = mats[k];
            if (act_l && tile + 2 * stride < ntiles) q4_prefetch_tile(m, (tile + 2 * stride) * RT, RT, c, nch);
            const float v = q4_tile<RT>(m, ncs + 256 * k, luts, k, tile * RT, c, nch, act_l, xr, lane);
            if ((lane & (32 / RT - 1)) == 0) part[par][warp * RT + lane / (32 / RT)] = v;
        }
        __syncthreads();
        if (tid < RT) {
            float total = 0.f;
#pragma unroll
            for (int kk = 0; kk < MAXK; kk++) {
                if (kk < K) {
                    float y = 0.f;
                    for (int s2 = 0; s2 < S; s2++) y += part[par][(kk * S + s2) * RT + tid];
                    total += wk[kk] * (y + bk[kk]);
                }
            }
            x[r] = xo + total;
        }
    }
}

extern "C" __global__ void __launch_bounds__(384, 2) k_moe_dn1(const LayerDev* L, const float* act, int H, int I, int K,
                                                               int S, const int* sel, const float* wsel, float* x) {
    moe_dn1_body<4>(L, act, H, I, K, S, sel, wsel, x);
}
extern "C" __global__ void __launch_bounds__(384, 2) k_moe_dn1_rt2(const LayerDev* L, const float* act, int H, int I,
                                                                   int K, int S, const int* sel, const float* wsel,
                                                                   float* x) {
    moe_dn1_body<2>(L, act, H, I, K, S, sel, wsel, x);
}

extern "C" __global__ void __launch_bounds__(256, 3) k_oproj_router(const LayerDev* L, const float* a, float* x, int H,
                                                                 int QD, float eps, float* h, float* logits,
                                                                 float* rpart, unsigned* counter, int E, int topk,
                                                                 int* sel, float* wsel) {
    float* smem = reinterpret_cast<float*>(smem4);
    const int xstride = padded_len(QD);
    float* xs = smem;
    __shared__ float lut[16];
    __shared__ QMat mo, mr;
    __shared__ float red[64];
    __shared__ float lg[RP_MAXE + 1];
    __shared__ int last_s;
    if (threadIdx.x == 0) {
        mo = L->o;
        mr = L->router;
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = blockIdx.x * WARPS + warp, stride = gridDim.x * WARPS;
    const bool pf = H <= 8 * stride;
    for (int k = 0; k < PF; k++)
        if (pf && r0 + k * stride < H) prefetch_rows(mo, r0 + k * stride, 1, lane);
    build_lut(lut, mo);
    load_x<1>(xs, xstride, a, QD, 1, nullptr, 0.f, red, nullptr);
    const int EL = (E + 31) >> 5;
    const unsigned short* wr = reinterpret_cast<const unsigned short*>(mr.w);
    const float* g = L->post_norm;
    float pr[RP_MAXE / 32];
#pragma unroll
    for (int j = 0; j < RP_MAXE / 32; j++) pr[j] = 0.f;
    float ss = 0.f;
    for (int r = r0; r < H; r += stride) {
        if (pf && r + PF * stride < H) prefetch_rows(mo, r + PF * stride, 1, lane);
        float wv[RP_MAXE / 32];
#pragma unroll
        for (int j = 0; j < RP_MAXE / 32; j++) {
            const int e = lane + 32 * j;
            wv[j] = (j < EL && e < E) ? __uint_as_float(((unsigned)__ldg(wr + (size_t)e * H + r)) << 16) : 0.f;
        }
        const float gr = __ldg(g + r), xo = x[r];
        int rows[1] = {r};
        float acc[1][1];
        warp_dot<1, 1, 8, 3>(mo, rows, xs, xstride, lut, acc, lane);
        const float xn = xo + (acc[0][0] + (mo.bias ? mo.bias[r] : 0.f));
        if (lane == 0) x[r] = xn;
        const float gx = gr * xn;
#pragma unroll
        for (int j = 0; j < RP_MAXE / 32; j++) pr[j] = fmaf(wv[j], gx, pr[j]);
        ss = fmaf(xn, xn, ss);
    }
    __syncthreads();  // every warp is done with xs: reuse it for the block's partials
    const int E1 = E + 1;
    float* rs = xs;  // [WARPS][E + 1]
#pragma unroll
    for (int j = 0; j < RP_MAXE / 32; j++) {
        const int e = lane + 32 * j;
        if (j < EL && e < E) rs[warp * E1 + e] = pr[j];
    }
    if (lane == 0) rs[warp * E1 + E] = ss;
    __syncthreads();
    for (int i = threadIdx.x; i < E1; i += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < WARPS; w++) v += rs[w * E1 + i];
        rpart[(size_t)i * RP_MAXB + blockIdx.x] = v;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_s = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    const float rbias = (threadIdx.x < E && mr.bias) ? mr.bias[threadIdx.x] : 0.f;  // E <= blockDim
    // Sum the blocks' partials: warp w takes values i = w, w+8, ... (5 at a time, every load in
    // flight), lane l blocks l, l+32, ..., then a butterfly: a fixed order.
    const int nb = gridDim.x;
    for (int i0 = warp; i0 < E1; i0 += WARPS * 5) {
        float v[5][RP_MAXB / 32];
#pragma unroll
        for (int ii = 0; ii < 5; ii++) {
            const int i = i0 + WARPS * ii;
#pragma unroll
            for (int u = 0; u < RP_MAXB / 32; u++) {
                const int b = lane + 32 * u;
                v[ii][u] = (i < E1 && b < nb) ? __ldcg(rpart + (size_t)i * RP_MAXB + b) : 0.f;
            }
        }
#pragma unroll
        for (int ii = 0; ii < 5; ii++) {
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < RP_MAXB / 32; u++) sum += v[ii][u];
            sum = warp_sum(sum);
            const int i = i0 + WARPS * ii;
            if (lane == 0 && i < E1) lg[i] = sum;
        }
    }
    __syncthreads();
    const float inv = 1.0f / sqrtf(lg[E] / (float)H + eps);
    __syncthreads();  // every thread has read lg[E]
    if (threadIdx.x < E) {
        const float v = lg[threadIdx.x] * inv + rbias;
        lg[threadIdx.x] = v;
        logits[threadIdx.x] = v;
    }
    __syncthreads();
    if (warp == 0) {
        warp_topk_local(lg, E, topk, sel, wsel);
    } else {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const float4* g4 = reinterpret_cast<const float4*>(g);
        float4* h4 = reinterpret_cast<float4*>(h);
        for (int i = threadIdx.x - 32; i < (H >> 2); i += blockDim.x - 32) {
            const float4 v = __ldcg(x4 + i), gv = g4[i];
            h4[i] = make_float4(gv.x * (v.x * inv), gv.y * (v.y * inv), gv.z * (v.z * inv), gv.w * (v.w * inv));
        }
    }
    if (threadIdx.x == 0) *counter = 0;
}

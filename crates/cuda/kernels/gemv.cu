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
//                t into idx_out, ties -> lowest index), F_TOPK (router: top-k logits of each t ->
//                sel/wsel with softmax over the k), F_WRITE_NORMED (block 0 writes x' to aux).
//                The argmax/top-k run in the last block to finish (atomic counter, reset after),
//                in a fixed order: deterministic.
// k_qkv_{1,4}    grid (gx), block 256, dyn smem = NT*padded(H)*4 + 3*64.
//                h = rmsnorm(x, in_norm); units = q (nh*32), k (nkv*32), v (nkv*32) row pairs
//                (r, r+32) of one head: q/k rotated with YaRN RoPE (rotate-half, the f32 cos/sin
//                tables [pos][32] of the CPU reference), q -> qout [T, nh*64] f32, k/v -> the
//                layer's KV cache (bf16, or f32 when kvf32) at slot pos (pos % ring on sliding
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
            idx_out[t] = bi == 0x7fffffff ? 0 : bi;
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
                         int nkv, float eps, float* qout, const float* cos_tab, const float* sin_tab, int kvf32) {
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
                    int pos = sp->pos0 + t;
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
                        unsigned long long base = which == 1 ? sp->kc[layer] : sp->vc[layer];
                        if (kvf32) {
                            float* cache = reinterpret_cast<float*>(base);
                            cache[(size_t)slot * kvd + rows[0]] = a;
                            cache[(size_t)slot * kvd + rows[1]] = c;
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
                                        const float* sin_tab, int kvf32) {
    qkv_body<1>(L, sp, layer, x, H, nh, nkv, eps, qout, cos_tab, sin_tab, kvf32);
}

extern "C" __global__ void __launch_bounds__(256) k_qkv_4(const LayerDev* L, const StepParams* sp, int layer, const float* x,
                                        int H, int nh, int nkv, float eps, float* qout, const float* cos_tab,
                                        const float* sin_tab, int kvf32) {
    qkv_body<4>(L, sp, layer, x, H, nh, nkv, eps, qout, cos_tab, sin_tab, kvf32);
}

__device__ __forceinline__ float clamped_swiglu(float g, float u, float alpha, float limit) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    float glu = g / (1.0f + expf(-alpha * g));
    return (u + 1.0f) * glu;
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

// Shared definitions of the gptoss CUDA kernels (included by every .cu file).
//
// Only sm_80 features are used (no Hopper-only instructions). bf16 and f16 values are handled as
// raw u16 bit patterns, so no CUDA header is needed.
//
// ## Device-side descriptors (mirrored by `#[repr(C)]` structs in crates/cuda/src/kernels.rs)
//
// QMat (72 bytes): one logical weight matrix [rows = out, cols = in] as stored in the checkpoint.
//   kind   K_BF16 / K_F16 / K_F32: dense row-major [rows, cols], `w` = element bytes.
//          K_NF4N: bitsandbytes 4-bit with double quantization. `w` = packed bytes, row-major,
//                  element 2b in the HIGH nibble of byte b; block k = 64 elements
//                  (k = r*cols/64 + c/64); scale(k) = fadd_rn(fmul_rn(ncode[s[k]],
//                  nabs[k >> nbs_shift]), offset); w = code[nibble] * scale.
//          K_NF4F: the same without double quantization: `s` = f32 scale per 64-block.
//          K_MXFP4: OpenAI MXFP4. `w` = blocks [rows, cols/32, 16], element 2j in the LOW nibble;
//                  `s` = E8M0 byte per 32 elements (k = r*cols/32 + c/32): 2^(s-127).
//   code   16 f32 (NF4/FP4 code of the tensor), ncode 256 f32 (nested code), nabs f32 per 256
//          blocks; bias f32 [rows] or null.
// LayerDev: one decoder layer: q, k, v, o, router QMats, device arrays gu[E] / dn[E] of expert
//   QMats, f32 norms and sinks, window (0 = full attention), ring (KV ring size, 0 = linear).
// StepParams: per forward call: T tokens (<= MAXT) at positions pos0.., their ids, and the K/V
//   cache base pointer of every layer for the sequence being run (bf16, [slot][kv_heads*64]).
//   Kernels read it from device memory, so a captured CUDA graph works for any position and any
//   sequence.
//
// ## Padded activation layout in shared memory
// An activation vector of n (multiple of 32) f32 is stored with 4 floats of padding after every
// 32: element i lives at (i/32)*36 + i%32. A lane that owns one 16-byte chunk of a weight row then
// reads its 8 (bf16) or 32 (4-bit) activations as float4s without bank conflicts.

#pragma once

#define MAXT 4          // tokens per launch (prefill runs in chunks of MAXT)
#define MAXK 4          // experts per token
#define MAX_LAYERS 64
#define WARPS 8         // warps per block of the GEMV kernels
#define HEAD_DIM 64

#define K_BF16 0
#define K_F16 1
#define K_F32 2
#define K_NF4N 3
#define K_NF4F 4
#define K_MXFP4 5

struct QMat {
    const unsigned char* w;
    const unsigned char* s;
    const float* nabs;
    const float* code;
    const float* ncode;
    const float* bias;
    int kind;
    int rows;
    int cols;
    float offset;
    int nbs_shift;
    int pad;
};

struct LayerDev {
    QMat q, k, v, o, router;
    const QMat* gu;
    const QMat* dn;
    const float* in_norm;
    const float* post_norm;
    const float* sinks;
    int window;
    int ring;
};

struct StepParams {
    int T;
    int pos0;
    int tok[MAXT];
    unsigned long long kc[MAX_LAYERS];
    unsigned long long vc[MAX_LAYERS];
};

static_assert(sizeof(QMat) == 72, "QMat layout");
static_assert(sizeof(LayerDev) == 408, "LayerDev layout");
static_assert(sizeof(StepParams) == 1048, "StepParams layout");

__device__ __forceinline__ int padx(int i) { return (i >> 5) * 36 + (i & 31); }
__host__ __device__ __forceinline__ int padded_len(int n) { return (n >> 5) * 36; }

__device__ __forceinline__ float bf_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float h_lo(unsigned w) { return h2f((unsigned short)(w & 0xffffu)); }
__device__ __forceinline__ float h_hi(unsigned w) { return h2f((unsigned short)(w >> 16)); }

// f32 -> bf16 bits, round to nearest even (NaN kept quiet).
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float e8m0(unsigned s) {
    return s == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(s << 23);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__constant__ float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// The 256-entry pair table of a 4-bit matrix: lut[byte] = (first element, second element).
__device__ __forceinline__ void build_lut(float2* lut, const QMat& m) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        if (m.kind == K_NF4N || m.kind == K_NF4F) {
            lut[b] = make_float2(__ldg(m.code + (b >> 4)), __ldg(m.code + (b & 15)));
        } else if (m.kind == K_MXFP4) {
            lut[b] = make_float2(FP4_VALUES[b & 15], FP4_VALUES[b >> 4]);
        }
    }
}

// Scale of 64-block k of a bnb 4-bit matrix (exact bitsandbytes rounding: no FMA).
__device__ __forceinline__ float nf4_scale(const QMat& m, int k) {
    if (m.kind == K_NF4N) {
        unsigned qa = __ldg(m.s + k);
        return __fadd_rn(__fmul_rn(__ldg(m.ncode + qa), __ldg(m.nabs + (k >> m.nbs_shift))), m.offset);
    }
    return __ldg(reinterpret_cast<const float*>(m.s) + k);
}

// Element (r, c) of a matrix, exactly decoded (slow path: embedding rows).
__device__ __forceinline__ float qmat_elem(const QMat& m, long long r, int c) {
    long long i = r * (long long)m.cols + c;
    switch (m.kind) {
        case K_BF16: return __uint_as_float(((unsigned)reinterpret_cast<const unsigned short*>(m.w)[i]) << 16);
        case K_F16: return h2f(reinterpret_cast<const unsigned short*>(m.w)[i]);
        case K_F32: return reinterpret_cast<const float*>(m.w)[i];
        case K_NF4N:
        case K_NF4F: {
            unsigned b = m.w[i >> 1];
            unsigned nib = (i & 1) ? (b & 15u) : (b >> 4);
            return __fmul_rn(m.code[nib], nf4_scale(m, (int)(i >> 6)));
        }
        default: {
            unsigned b = m.w[i >> 1];
            unsigned nib = (i & 1) ? (b >> 4) : (b & 15u);
            return FP4_VALUES[nib] * e8m0(m.s[i >> 5]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Warp dot products: NR rows of one matrix against NT activation vectors held in shared memory
// in the padded layout (vector t at xs + t*xstride). Every lane of the warp gets the totals.
// Each lane owns 16-byte chunks c = lane, lane+32, ... of each row; U chunks per row are loaded
// before any is used.
// ---------------------------------------------------------------------------------------------

#define UNROLL (NR == 2 ? 3 : 4)

template <int NR, int NT>
__device__ __forceinline__ void dot_dense16(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                            float (&acc)[NR][NT], int lane, bool f16) {
    const int nch = m.cols >> 3;  // 8 elements per chunk
    const uint4* base[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) base[i] = reinterpret_cast<const uint4*>(m.w + (size_t)rows[i] * m.cols * 2);
    for (int c0 = lane; c0 < nch; c0 += 32 * UNROLL) {
        uint4 v[NR][UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int i = 0; i < NR; i++) v[i][u] = c < nch ? ldg16(base[i] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + 32 * u;
            if (c < nch) {
                const float* xp = xs + (c >> 2) * 36 + (c & 3) * 8;
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float4 xa = *reinterpret_cast<const float4*>(xp + t * xstride);
                    float4 xb = *reinterpret_cast<const float4*>(xp + t * xstride + 4);
#pragma unroll
                    for (int i = 0; i < NR; i++) {
                        uint4 q = v[i][u];
                        float a = acc[i][t];
                        if (f16) {
                            a = fmaf(h_lo(q.x), xa.x, a); a = fmaf(h_hi(q.x), xa.y, a);
                            a = fmaf(h_lo(q.y), xa.z, a); a = fmaf(h_hi(q.y), xa.w, a);
                            a = fmaf(h_lo(q.z), xb.x, a); a = fmaf(h_hi(q.z), xb.y, a);
                            a = fmaf(h_lo(q.w), xb.z, a); a = fmaf(h_hi(q.w), xb.w, a);
                        } else {
                            a = fmaf(bf_lo(q.x), xa.x, a); a = fmaf(bf_hi(q.x), xa.y, a);
                            a = fmaf(bf_lo(q.y), xa.z, a); a = fmaf(bf_hi(q.y), xa.w, a);
                            a = fmaf(bf_lo(q.z), xb.x, a); a = fmaf(bf_hi(q.z), xb.y, a);
                            a = fmaf(bf_lo(q.w), xb.z, a); a = fmaf(bf_hi(q.w), xb.w, a);
                        }
                        acc[i][t] = a;
                    }
                }
            }
        }
    }
}

template <int NR, int NT>
__device__ __forceinline__ void dot_f32(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                        float (&acc)[NR][NT], int lane) {
    const int nch = m.cols >> 2;  // 4 elements per chunk
    const uint4* base[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) base[i] = reinterpret_cast<const uint4*>(m.w + (size_t)rows[i] * m.cols * 4);
    for (int c0 = lane; c0 < nch; c0 += 32 * UNROLL) {
        uint4 v[NR][UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int i = 0; i < NR; i++) v[i][u] = c < nch ? ldg16(base[i] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + 32 * u;
            if (c < nch) {
                const float* xp = xs + (c >> 3) * 36 + (c & 7) * 4;
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float4 xa = *reinterpret_cast<const float4*>(xp + t * xstride);
#pragma unroll
                    for (int i = 0; i < NR; i++) {
                        uint4 q = v[i][u];
                        float a = acc[i][t];
                        a = fmaf(__uint_as_float(q.x), xa.x, a);
                        a = fmaf(__uint_as_float(q.y), xa.y, a);
                        a = fmaf(__uint_as_float(q.z), xa.z, a);
                        a = fmaf(__uint_as_float(q.w), xa.w, a);
                        acc[i][t] = a;
                    }
                }
            }
        }
    }
}

// 4-bit kinds (NF4 with or without nesting, MXFP4): 16-byte chunk = 32 elements, one scale per
// chunk (NF4: the scale of 64-block c/2; MXFP4: the scale of 32-block c).
template <int NR, int NT>
__device__ __forceinline__ void dot_q4(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                       const float2* lut, float (&acc)[NR][NT], int lane) {
    const int nch = m.cols >> 5;
    const bool mx = m.kind == K_MXFP4;
    const uint4* base[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) base[i] = reinterpret_cast<const uint4*>(m.w + (size_t)rows[i] * (m.cols >> 1));
    for (int c0 = lane; c0 < nch; c0 += 32 * UNROLL) {
        uint4 v[NR][UNROLL];
        float sc[NR][UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int i = 0; i < NR; i++) {
                v[i][u] = c < nch ? ldg16(base[i] + c) : make_uint4(0, 0, 0, 0);
                sc[i][u] = 0.f;
                if (c < nch) {
                    if (mx) sc[i][u] = e8m0(__ldg(m.s + (size_t)rows[i] * nch + c));
                    else sc[i][u] = nf4_scale(m, rows[i] * (m.cols >> 6) + (c >> 1));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + 32 * u;
            if (c < nch) {
                const float* xp0 = xs + c * 36;
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    float part[NT];
#pragma unroll
                    for (int t = 0; t < NT; t++) part[t] = 0.f;
                    const unsigned words[4] = {v[i][u].x, v[i][u].y, v[i][u].z, v[i][u].w};
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        unsigned w = words[q];
                        float2 p0 = lut[w & 0xffu];
                        float2 p1 = lut[(w >> 8) & 0xffu];
                        float2 p2 = lut[(w >> 16) & 0xffu];
                        float2 p3 = lut[w >> 24];
#pragma unroll
                        for (int t = 0; t < NT; t++) {
                            const float* xp = xp0 + t * xstride + q * 8;
                            float4 xa = *reinterpret_cast<const float4*>(xp);
                            float4 xb = *reinterpret_cast<const float4*>(xp + 4);
                            float a = part[t];
                            a = fmaf(p0.x, xa.x, a); a = fmaf(p0.y, xa.y, a);
                            a = fmaf(p1.x, xa.z, a); a = fmaf(p1.y, xa.w, a);
                            a = fmaf(p2.x, xb.x, a); a = fmaf(p2.y, xb.y, a);
                            a = fmaf(p3.x, xb.z, a); a = fmaf(p3.y, xb.w, a);
                            part[t] = a;
                        }
                    }
#pragma unroll
                    for (int t = 0; t < NT; t++) acc[i][t] = fmaf(part[t], sc[i][u], acc[i][t]);
                }
            }
        }
    }
}

template <int NR, int NT>
__device__ __forceinline__ void warp_dot(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                         const float2* lut, float (&acc)[NR][NT], int lane) {
#pragma unroll
    for (int i = 0; i < NR; i++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[i][t] = 0.f;
    switch (m.kind) {
        case K_BF16: dot_dense16<NR, NT>(m, rows, xs, xstride, acc, lane, false); break;
        case K_F16: dot_dense16<NR, NT>(m, rows, xs, xstride, acc, lane, true); break;
        case K_F32: dot_f32<NR, NT>(m, rows, xs, xstride, acc, lane); break;
        default: dot_q4<NR, NT>(m, rows, xs, xstride, lut, acc, lane); break;
    }
#pragma unroll
    for (int i = 0; i < NR; i++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[i][t] = warp_sum(acc[i][t]);
}

// Loads rows t < T of x ([T, n] f32, row stride ld) into the padded layout (rows T..NT-1 zeroed),
// optionally RMS-normalised with weight w: x / sqrt(mean(x^2) + eps) * w. `red` is a scratch of
// at least 32 floats. When `normed_out` is non-null, the normalised rows are also written there
// unpadded ([T, n]). Ends with __syncthreads().
template <int NT>
__device__ __forceinline__ void load_x(float* xs, int xstride, const float* x, int ld, int n, int T,
                                       const float* w, float eps, float* red, float* normed_out) {
    for (int t = 0; t < NT; t++) {
        float inv = 1.f;
        if (t < T && w != nullptr) {
            float ss = 0.f;
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                float v = x[(size_t)t * ld + i];
                ss = fmaf(v, v, ss);
            }
            ss = warp_sum(ss);
            if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
            __syncthreads();
            if (threadIdx.x < 32) {
                float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
                v = warp_sum(v);
                if (threadIdx.x == 0) red[32] = v;
            }
            __syncthreads();
            inv = 1.0f / sqrtf(red[32] / (float)n + eps);
            __syncthreads();
        }
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float v = 0.f;
            if (t < T) {
                v = x[(size_t)t * ld + i];
                if (w != nullptr) v = w[i] * (v * inv);
                if (normed_out != nullptr) normed_out[(size_t)t * n + i] = v;
            }
            xs[t * xstride + padx(i)] = v;
        }
    }
    __syncthreads();
}

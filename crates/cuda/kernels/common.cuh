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
// StepParams: per launch sequence: T tokens (<= MAXT), per token its id, its position and the K/V
//   cache base pointer of every layer of its sequence (bf16, [slot][kv_heads*64]): the tokens of
//   a prefill chunk of one sequence, or the decode tokens of up to MAXT sequences. Kernels read it
//   from device memory, so a captured CUDA graph works for any positions and any sequences.
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
#define PF 2          // units prefetched ahead by the GEMV kernels

// KV cache element types (the `kvmode` argument of k_qkv / k_attn).
#define KV_BF16 0
#define KV_F32 1
#define KV_F16 2

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
    int pad;
    int tok[MAXT];
    int pos[MAXT];
    unsigned long long kc[MAXT][MAX_LAYERS];
    unsigned long long vc[MAXT][MAX_LAYERS];
};

// SegDev: one sequence's part of a wide launch (T > MAXT tokens: a long prefill chunk, or the
//   decode tokens of many sequences). Its nq tokens are launch rows q0 .. q0+nq-1 at consecutive
//   positions pos0 .. pos0+nq-1; its cache (kc/vc per layer, [slot][nkv*64] in the KV element
//   type, slot = pos or pos % ring) holds the positions before pos0. The launch's own K/V are
//   kept apart ("fresh", [T][nkv*64]) until attention has read them (wide.cu k_kv_store).
#define MAX_SEGS 64
struct SegDev {
    int q0;
    int nq;
    int pos0;
    int pad;
    unsigned long long kc[MAX_LAYERS];
    unsigned long long vc[MAX_LAYERS];
};
static_assert(sizeof(SegDev) == 1040, "SegDev layout");

static_assert(sizeof(QMat) == 72, "QMat layout");
static_assert(sizeof(LayerDev) == 408, "LayerDev layout");
static_assert(sizeof(StepParams) == 4136, "StepParams layout");

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

// f32 -> f16 bits, round to nearest even; finite values beyond f16's range saturate to
// +-65504 instead of becoming infinities (NaN stays NaN).
__device__ __forceinline__ unsigned short f2h(float f) {
    if (fabsf(f) > 65504.f) f = copysignf(65504.f, f);
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
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

// GPT-OSS's clamped SwiGLU: gate clamped above at limit, up to [-limit, limit], (up + 1) * glu.
__device__ __forceinline__ float clamped_swiglu(float g, float u, float alpha, float limit) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    float glu = g / (1.0f + expf(-alpha * g));
    return (u + 1.0f) * glu;
}

__constant__ float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// The 16-entry value table of a 4-bit matrix in shared memory (NF4/FP4: the tensor's code;
// MXFP4: E2M1). 16 words in 16 banks: a warp's lookups never conflict.
__device__ __forceinline__ void build_lut(float* lut, const QMat& m) {
    if (threadIdx.x < 16) {
        if (m.kind == K_NF4N || m.kind == K_NF4F) lut[threadIdx.x] = __ldg(m.code + threadIdx.x);
        else if (m.kind == K_MXFP4) lut[threadIdx.x] = FP4_VALUES[threadIdx.x];
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
// L2 prefetch (fire and forget: no registers held). The GEMV kernels prefetch the rows of their
// next units before computing the current one, so HBM keeps streaming through the prologue and
// the per-unit load latency becomes L2 latency.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void pf_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

__device__ __forceinline__ size_t row_bytes(const QMat& m) {
    return (m.kind == K_BF16 || m.kind == K_F16) ? (size_t)m.cols * 2
                                                  : (m.kind == K_F32 ? (size_t)m.cols * 4 : (size_t)(m.cols >> 1));
}
__device__ __forceinline__ size_t scale_row_bytes(const QMat& m) {
    return m.kind == K_NF4N ? (size_t)(m.cols >> 6)
                            : (m.kind == K_NF4F ? (size_t)(m.cols >> 6) * 4 : (m.kind == K_MXFP4 ? (size_t)(m.cols >> 5) : 0));
}
// Rows [r, r + n) of m (weights and scales), spread over the 32 lanes of a warp.
__device__ __forceinline__ void prefetch_rows(const QMat& m, int r, int n, int lane) {
    size_t rb = row_bytes(m);
    const unsigned char* p = m.w + (size_t)r * rb;
    for (size_t off = (size_t)lane * 128; off < rb * n; off += 32 * 128) pf_l2(p + off);
    size_t sb = scale_row_bytes(m);
    if (sb) {
        const unsigned char* q = m.s + (size_t)r * sb;
        for (size_t off = (size_t)lane * 128; off < sb * n; off += 32 * 128) pf_l2(q + off);
    }
}
// The whole matrix, spread over nthreads threads.
__device__ __forceinline__ void prefetch_matrix(const QMat& m, size_t tid, size_t nthreads) {
    size_t total = row_bytes(m) * m.rows;
    for (size_t off = tid * 128; off < total; off += nthreads * 128) pf_l2(m.w + off);
    size_t st = scale_row_bytes(m) * m.rows;
    for (size_t off = tid * 128; off < st; off += nthreads * 128) pf_l2(m.s + off);
}

// ---------------------------------------------------------------------------------------------
// Warp dot products: NR rows of one matrix against NT activation vectors held in shared memory
// in the padded layout (vector t at xs + t*xstride). Every lane of the warp gets the totals.
// Each lane owns 16-byte chunks c = lane, lane+32, ... of each row; U chunks per row are loaded
// before any is used; activations are read once per chunk and used for all NR rows.
// ---------------------------------------------------------------------------------------------

template <int NR, int NT, int U>
__device__ __forceinline__ void dot_dense16(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                            float (&acc)[NR][NT], int lane, bool f16) {
    const int nch = m.cols >> 3;  // 8 elements per chunk
    const uint4* base[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) base[i] = reinterpret_cast<const uint4*>(m.w + (size_t)rows[i] * m.cols * 2);
    for (int c0 = lane; c0 < nch; c0 += 32 * U) {
        uint4 v[NR][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int i = 0; i < NR; i++) v[i][u] = c < nch ? ldg16(base[i] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
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

template <int NR, int NT, int U>
__device__ __forceinline__ void dot_f32(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                        float (&acc)[NR][NT], int lane) {
    const int nch = m.cols >> 2;  // 4 elements per chunk
    const uint4* base[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) base[i] = reinterpret_cast<const uint4*>(m.w + (size_t)rows[i] * m.cols * 4);
    for (int c0 = lane; c0 < nch; c0 += 32 * U) {
        uint4 v[NR][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
#pragma unroll
            for (int i = 0; i < NR; i++) v[i][u] = c < nch ? ldg16(base[i] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
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
// chunk (NF4: the scale of 64-block c/2; MXFP4: the scale of 32-block c). Values come from the
// 16-entry table `lut` (static shared memory): per element one byte extraction (PRMT), one LDS
// and one FMA.
template <int NR, int NT, int U>
__device__ __forceinline__ void dot_q4(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                       const float* lut, float (&acc)[NR][NT], int lane) {
    const int nch = m.cols >> 5;
    const bool mx = m.kind == K_MXFP4;
    const char* lb = reinterpret_cast<const char*>(lut);
    const uint4* base[NR];
#pragma unroll
    for (int i = 0; i < NR; i++) base[i] = reinterpret_cast<const uint4*>(m.w + (size_t)rows[i] * (m.cols >> 1));
    for (int c0 = lane; c0 < nch; c0 += 32 * U) {
        uint4 v[NR][U];
        float sc[NR][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
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
        for (int u = 0; u < U; u++) {
            int c = c0 + 32 * u;
            if (c < nch) {
                const float* xp0 = xs + c * 36;
                float part[NR][NT];
#pragma unroll
                for (int i = 0; i < NR; i++)
#pragma unroll
                    for (int t = 0; t < NT; t++) part[i][t] = 0.f;
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    float4 xa[NT], xb[NT];
#pragma unroll
                    for (int t = 0; t < NT; t++) {
                        xa[t] = *reinterpret_cast<const float4*>(xp0 + t * xstride + q * 8);
                        xb[t] = *reinterpret_cast<const float4*>(xp0 + t * xstride + q * 8 + 4);
                    }
#pragma unroll
                    for (int i = 0; i < NR; i++) {
                        unsigned w = q == 0 ? v[i][u].x : (q == 1 ? v[i][u].y : (q == 2 ? v[i][u].z : v[i][u].w));
                        // Byte offsets into the table (4 * nibble) of the high and low nibble of
                        // each byte; element 2j is the high nibble (NF4) or the low one (MXFP4).
                        unsigned hi = (w >> 2) & 0x3c3c3c3cu, lo = (w << 2) & 0x3c3c3c3cu;
                        unsigned f = mx ? lo : hi, s2 = mx ? hi : lo;
                        float e0 = *reinterpret_cast<const float*>(lb + (f & 0xffu));
                        float e1 = *reinterpret_cast<const float*>(lb + (s2 & 0xffu));
                        float e2 = *reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4441));
                        float e3 = *reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4441));
                        float e4 = *reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4442));
                        float e5 = *reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4442));
                        float e6 = *reinterpret_cast<const float*>(lb + __byte_perm(f, 0u, 0x4443));
                        float e7 = *reinterpret_cast<const float*>(lb + __byte_perm(s2, 0u, 0x4443));
#pragma unroll
                        for (int t = 0; t < NT; t++) {
                            float a = part[i][t];
                            a = fmaf(e0, xa[t].x, a); a = fmaf(e1, xa[t].y, a);
                            a = fmaf(e2, xa[t].z, a); a = fmaf(e3, xa[t].w, a);
                            a = fmaf(e4, xb[t].x, a); a = fmaf(e5, xb[t].y, a);
                            a = fmaf(e6, xb[t].z, a); a = fmaf(e7, xb[t].w, a);
                            part[i][t] = a;
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < NR; i++)
#pragma unroll
                    for (int t = 0; t < NT; t++) acc[i][t] = fmaf(part[i][t], sc[i][u], acc[i][t]);
            }
        }
    }
}

// UD / UQ: chunks per row loaded ahead for dense / 4-bit rows.
template <int NR, int NT, int UD, int UQ>
__device__ __forceinline__ void warp_dot(const QMat& m, const int (&rows)[NR], const float* xs, int xstride,
                                         const float* lut, float (&acc)[NR][NT], int lane) {
#pragma unroll
    for (int i = 0; i < NR; i++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[i][t] = 0.f;
    switch (m.kind) {
        case K_BF16: dot_dense16<NR, NT, UD>(m, rows, xs, xstride, acc, lane, false); break;
        case K_F16: dot_dense16<NR, NT, UD>(m, rows, xs, xstride, acc, lane, true); break;
        case K_F32: dot_f32<NR, NT, UD>(m, rows, xs, xstride, acc, lane); break;
        default: dot_q4<NR, NT, UQ>(m, rows, xs, xstride, lut, acc, lane); break;
    }
#pragma unroll
    for (int i = 0; i < NR; i++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[i][t] = warp_sum(acc[i][t]);
}

// Loads nrows contiguous rows of n floats (row r at src + r*n; n % 4 == 0, 16-byte aligned) into
// the padded layout (row r at xs + r*xstride) and zeroes rows nrows..nzero-1. B float4 per
// thread are loaded before any is stored, so the prologue costs one memory latency, not one per
// element. Does not synchronise. B = float4 loads per thread per batch.
template <int B>
__device__ __forceinline__ void load_rows(float* xs, int xstride, const float* src, int nrows, int nzero, int n) {
    const int n4 = n >> 2, tot = nrows * n4;
    const float4* s4 = reinterpret_cast<const float4*>(src);
    for (int base = 0; base < tot; base += B * blockDim.x) {
        float4 v[B];
#pragma unroll
        for (int k = 0; k < B; k++) {
            int e = base + threadIdx.x + k * blockDim.x;
            if (e < tot) v[k] = s4[e];
        }
#pragma unroll
        for (int k = 0; k < B; k++) {
            int e = base + threadIdx.x + k * blockDim.x;
            if (e < tot) {
                int r = e / n4, i4 = e - r * n4;
                *reinterpret_cast<float4*>(xs + r * xstride + padx(4 * i4)) = v[k];
            }
        }
    }
    for (int e = threadIdx.x; e < (nzero - nrows) * n4; e += blockDim.x) {
        int r = nrows + e / n4, i4 = e % n4;
        *reinterpret_cast<float4*>(xs + r * xstride + padx(4 * i4)) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// Loads rows t < T of x ([T, n] f32, contiguous rows) into the padded layout (rows T..NT-1
// zeroed), optionally RMS-normalised with weight w: x / sqrt(mean(x^2) + eps) * w. `red` is a
// scratch of at least 64 floats. When `normed_out` is non-null, the normalised rows are also
// written there unpadded ([T, n]). Ends with __syncthreads().
template <int NT>
__device__ __forceinline__ void load_x(float* xs, int xstride, const float* x, int n, int T, const float* w,
                                       float eps, float* red, float* normed_out) {
    const int n4 = n >> 2;
    // Issue the norm weights' loads first (n <= 4096: at most 4 float4 per thread).
    float4 wv[4];
    const bool fast = w != nullptr && n4 <= 4 * (int)blockDim.x;
    if (fast) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int i = threadIdx.x + k * blockDim.x;
            wv[k] = i < n4 ? reinterpret_cast<const float4*>(w)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    load_rows<4>(xs, xstride, x, T, NT, n);
    __syncthreads();
    if (w == nullptr) return;
    // Sum of squares of every row (from shared memory), one block reduction for all rows.
    float ss[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) ss[t] = 0.f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float4 v = *reinterpret_cast<const float4*>(xs + t * xstride + padx(4 * i));
            ss[t] = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss[t]))));
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = warp_sum(ss[t]);
        if (lane == 0) red[warp * NT + t] = v;
    }
    __syncthreads();
    if (threadIdx.x < NT) {
        float v = 0.f;
        for (int w2 = 0; w2 < (int)(blockDim.x >> 5); w2++) v += red[w2 * NT + threadIdx.x];
        red[48 + threadIdx.x] = 1.0f / sqrtf(v / (float)n + eps);
    }
    __syncthreads();
    for (int t = 0; t < T; t++) {
        const float inv = red[48 + t];
        auto scale = [&](int i, float4 g) {
            float4* p = reinterpret_cast<float4*>(xs + t * xstride + padx(4 * i));
            float4 v = *p;
            v = make_float4(g.x * (v.x * inv), g.y * (v.y * inv), g.z * (v.z * inv), g.w * (v.w * inv));
            *p = v;
            if (normed_out != nullptr) reinterpret_cast<float4*>(normed_out + (size_t)t * n)[i] = v;
        };
        if (fast) {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                int i = threadIdx.x + k * blockDim.x;
                if (i < n4) scale(i, wv[k]);
            }
        } else {
            for (int i = threadIdx.x; i < n4; i += blockDim.x) scale(i, reinterpret_cast<const float4*>(w)[i]);
        }
    }
    __syncthreads();
}

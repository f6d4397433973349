// Memory read-bandwidth probe (the roofline of batch-1 decode, which is bound by weight reads).
//
// k_read_bw  grid (gx), block 256. Reads n16 16-byte words of `src` once (grid-stride loop, 4
//            independent 16-byte loads in flight per thread, streaming loads) and writes one XOR
//            per block to out[blockIdx.x] so the loads cannot be optimised away.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) k_read_bw(const uint4* src, unsigned long long n16, unsigned* out) {
    __shared__ unsigned red[WARPS];
    unsigned acc = 0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = ldg16(src + i), b = ldg16(src + i + stride), c = ldg16(src + i + 2 * stride),
              d = ldg16(src + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        uint4 a = ldg16(src + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned r = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) r ^= red[w];
        out[blockIdx.x] = r;
    }
}

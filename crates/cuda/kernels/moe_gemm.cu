// placeholder: moe_gemm kernels (being written)
#include "common.cuh"

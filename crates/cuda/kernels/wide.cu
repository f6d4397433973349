// placeholder: wide kernels (being written)
#include "common.cuh"

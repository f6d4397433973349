// placeholder: flash_attn kernels (being written)
#include "common.cuh"

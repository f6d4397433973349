#!/usr/bin/env bash
# Builds the CUDA kernels of crates/cuda ahead of time into fatbins that the crate embeds with
# include_bytes!, and records the SHA-256 of every kernel source (checked by a unit test, so a
# source edit without a rebuild fails CI).
#
# Targets: SASS for sm_80, sm_86, sm_89, sm_90 + PTX (compute_80) for newer GPUs. Uses $NVCC if
# set, else installs the pinned PyPI nvcc 13.0.88 (and companions; PTX 9.0, loadable by a CUDA 13.0
# driver) into a venv under ${NVCC_VENV:-/tmp/gptoss-nvcc}. Works on a machine without a GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
kdir="$root/crates/cuda/kernels"
out="$kdir/bin"
mkdir -p "$out"
if [[ -z "${NVCC:-}" ]]; then
  venv="${NVCC_VENV:-/tmp/gptoss-nvcc}"
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  fi
  NVCC="$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -1)"
fi
"$NVCC" --version | tail -1
gencode=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86
         -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90
         -gencode arch=compute_80,code=compute_80)
all=(gemv attention bandwidth moe_mma flash_attn moe_gemm wide qgemm)
# `build_kernels.sh NAME...` rebuilds only those fatbins (the hashes are always recorded for all).
only=("$@")
for src in "${only[@]:-${all[@]}}"; do
  "$NVCC" -fatbin -O3 -std=c++17 "${gencode[@]}" ${NVCC_EXTRA:-} -o "$out/$src.fatbin" "$kdir/$src.cu"
done
# Resource report (registers, spills) for sm_90, for the record.
if [[ -n "${REPORT:-}" ]]; then
  for src in "${only[@]:-${all[@]}}"; do
    "$NVCC" -cubin -O3 -std=c++17 -arch=sm_90 -Xptxas -v -o /dev/null "$kdir/$src.cu" 2>&1 | grep -E "Function properties|registers|spill|Compiling entry" || true
  done
fi
(cd "$kdir" && sha256sum common.cuh gemv.cu attention.cu bandwidth.cu moe_mma.cu flash_attn.cu moe_gemm.cu wide.cu qgemm.cu > SOURCES.sha256)
ls -la "$out"

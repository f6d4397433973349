//! cuBLAS for the dense bf16 projections of wide launches (many tokens at once: prefill chunks
//! and batched decode): q/k/v, o_proj and lm_head as `bf16 × bf16 → f32` GEMMs with f32
//! accumulation (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`).
//!
//! cuBLAS is loaded at run time like the driver (cudarc's dynamic loading); where `libcublas`
//! cannot be found (or `GPTOSS_CUDA_NO_CUBLAS=1`), [`Blas::open`] returns `None` and the wide
//! path runs those projections through its own tensor-core kernel (`moe_gemm.cu`, dense mode)
//! instead — slower for large bf16 matrices, same results to bf16 rounding.

use std::ffi::c_void;

use cudarc::cublas::{result, sys};

use crate::driver::Stream;

/// A cuBLAS handle bound to the backend's stream.
pub struct Blas {
    handle: sys::cublasHandle_t,
}

// SAFETY: the handle is only used from the thread holding `&mut CudaBackend`, with the context
// bound (like the stream it is tied to).
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by `open`, destroyed once.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

impl Blas {
    /// A handle on `stream`, or `None` when cuBLAS is unavailable or turned off.
    pub fn open(stream: &Stream) -> Result<Option<Blas>, String> {
        let off = std::env::var("GPTOSS_CUDA_NO_CUBLAS").is_ok_and(|v| !v.is_empty() && v != "0");
        // SAFETY: only tries to dlopen the library.
        if off || !unsafe { sys::is_culib_present() } {
            return Ok(None);
        }
        let handle =
            result::create_handle().map_err(|e| format!("cuBLAS: creating a handle: {e:?}"))?;
        let blas = Blas { handle };
        // SAFETY: both handles are valid; the stream outlives the Blas (dropped first by the backend).
        unsafe { result::set_stream(blas.handle, stream.0 as sys::cudaStream_t) }
            .map_err(|e| format!("cuBLAS: setting the stream: {e:?}"))?;
        Ok(Some(blas))
    }

    /// `out[t][0..rows] = beta · out[t][0..rows] + W · x[t]` for `t < n`, where `W` is a
    /// row-major bf16 `[rows, cols]` matrix at `w`, `x` holds `n` bf16 rows of stride `ldx`
    /// elements and `out` f32 rows of stride `ldo`.
    ///
    /// In cuBLAS's column-major terms: `C[rows × n] = Wᵀ[cols × rows]ᵀ · X[cols × n]`, i.e.
    /// `op(A) = T` on the row-major weight read as a `cols × rows` column-major matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        ldx: usize,
        n: usize,
        out: u64,
        ldo: usize,
        beta: f32,
    ) -> Result<(), String> {
        let alpha = 1.0f32;
        // SAFETY: the pointers are device buffers of the sizes described above (the caller's
        // contract); alpha/beta are host scalars (the default pointer mode).
        unsafe {
            result::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                n as i32,
                cols as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                cols as i32,
                x as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                ldx as i32,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                ldo as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cuBLAS GEMM ({rows}x{cols} · {n} tokens): {e:?}"))
    }
}

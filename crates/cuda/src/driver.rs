//! A thin layer over the CUDA driver API (through cudarc's dynamically loaded `result`/`sys`
//! functions): device discovery that fails with an error instead of a panic, RAII device
//! buffers, kernel launches and CUDA graphs on one stream.

use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdevice_attribute_enum as Attr};
use cudarc::driver::{CudaContext, DriverError, result};

/// What the backend found out about the GPU it runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    pub sm_count: usize,
    pub total_memory: usize,
    /// Largest dynamic shared memory a block may opt into.
    pub max_smem_optin: usize,
}

/// An error from the driver with what was being done.
pub fn cu_err(what: &str, e: DriverError) -> String {
    format!("CUDA error while {what}: {e:?}")
}

/// Checks whether this machine can run the backend at all, without ever panicking: a missing
/// `libcuda`, a driver without devices or an ordinal out of range are errors.
pub fn probe(ordinal: usize) -> Result<(), String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver found (libcuda.so could not be loaded): the CUDA backend needs an NVIDIA GPU with its driver; use the CPU backend instead".into());
    }
    result::init().map_err(|e| cu_err("initialising the driver (cuInit)", e))?;
    let n = result::device::get_count().map_err(|e| cu_err("counting devices", e))?;
    if n <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    if ordinal >= n as usize {
        return Err(format!(
            "GPU {ordinal} requested but only {n} device(s) are visible"
        ));
    }
    Ok(())
}

/// The context, the one stream all work goes to, and the device's properties.
pub struct Gpu {
    // Declared (so dropped) before `ctx`: the stream must be destroyed while the context lives.
    pub stream: Stream,
    pub ctx: Arc<CudaContext>,
    pub info: DeviceInfo,
}

/// A raw stream handle; the backend only ever uses it from the thread that holds `&mut self`.
pub struct Stream(pub sys::CUstream);
// SAFETY: CUDA streams may be used from any thread once the context is current there; every
// entry point of the backend binds the context first.
unsafe impl Send for Stream {}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by `Gpu::open`; the owner binds the context before dropping.
        unsafe {
            let _ = result::stream::destroy(self.0);
        }
    }
}

impl Gpu {
    /// Opens device `ordinal` and refuses GPUs older than sm_80.
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cu_err("creating the context", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| cu_err("reading the compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        if cc.0 < 8 {
            return Err(format!(
                "{name} has compute capability {}.{}: the CUDA backend needs sm_80 or newer (Ampere: RTX 30xx, A100, or later)",
                cc.0, cc.1
            ));
        }
        let attr = |a: Attr| {
            ctx.attribute(a)
                .map_err(|e| cu_err("reading a device attribute", e))
        };
        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability: cc,
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
            total_memory: ctx
                .total_mem()
                .map_err(|e| cu_err("reading the memory size", e))?,
            max_smem_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize,
        };
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| cu_err("creating a stream", e))?;
        Ok(Gpu {
            stream: Stream(stream),
            ctx,
            info,
        })
    }

    /// Makes the context current on the calling thread.
    pub fn bind(&self) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cu_err("binding the context", e))
    }

    pub fn sync(&self) -> Result<(), String> {
        // SAFETY: the stream is valid for the life of `self`.
        unsafe { result::stream::synchronize(self.stream.0) }
            .map_err(|e| cu_err("running kernels", e))
    }

    /// (free, total) device memory.
    pub fn mem_info(&self) -> Result<(usize, usize), String> {
        result::mem_get_info().map_err(|e| cu_err("reading free memory", e))
    }

    /// Allocates `bytes` (at least 1) of device memory.
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf, String> {
        // SAFETY: plain allocation.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|e| cu_err(&format!("allocating {:.1} MB", bytes as f64 / 1e6), e))?;
        Ok(DevBuf { ptr, bytes })
    }

    /// Allocates and fills with zero bytes.
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf, String> {
        let b = self.alloc(bytes)?;
        // SAFETY: `b` holds `bytes` bytes.
        unsafe { result::memset_d8_sync(b.ptr, 0, bytes.max(1)) }
            .map_err(|e| cu_err("clearing memory", e))?;
        Ok(b)
    }

    /// Synchronous host-to-device copy into `dst + offset` (the stream is synchronised first so
    /// no queued kernel still uses the destination).
    pub fn upload<T: Copy>(&self, dst: u64, src: &[T]) -> Result<(), String> {
        if src.is_empty() {
            return Ok(());
        }
        self.sync()?;
        // SAFETY: callers pass a destination with room for `src`.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| cu_err("copying to the GPU", e))
    }

    /// Stream-ordered host-to-device copy (pageable source: staged before the call returns).
    pub fn upload_async<T: Copy>(&self, dst: u64, src: &[T]) -> Result<(), String> {
        // SAFETY: callers pass a destination with room for `src`.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.0) }
            .map_err(|e| cu_err("copying to the GPU", e))
    }

    /// Device-to-host copy after the stream's queued work.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<(), String> {
        if dst.is_empty() {
            return Ok(());
        }
        self.sync()?;
        // SAFETY: callers pass a source holding `dst.len()` values.
        unsafe { result::memcpy_dtoh_sync(dst, src) }
            .map_err(|e| cu_err("copying from the GPU", e))?;
        Ok(())
    }

    /// Stream-ordered device-to-device copy.
    pub fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        // SAFETY: callers pass valid ranges.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.0) }
            .map_err(|e| cu_err("copying on the GPU", e))
    }

    /// Loads a fatbin/cubin/PTX image.
    pub fn load_module(&self, image: &[u8]) -> Result<Module, String> {
        // The driver reads the image through a pointer: give it an 8-byte aligned copy.
        let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
        // SAFETY: `aligned` has room for `image` (plus a trailing zero for PTX text).
        unsafe {
            std::ptr::copy_nonoverlapping(
                image.as_ptr(),
                aligned.as_mut_ptr() as *mut u8,
                image.len(),
            )
        };
        // SAFETY: a valid, aligned image.
        let m = unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) }.map_err(
            |e| {
                cu_err(
                    "loading the kernel image (is the driver older than CUDA 13.0?)",
                    e,
                )
            },
        )?;
        Ok(Module(m))
    }
}

/// A loaded module (kept alive as long as its functions are used).
pub struct Module(pub sys::CUmodule);
// SAFETY: module handles are context-wide.
unsafe impl Send for Module {}

impl Module {
    pub fn function(&self, name: &str) -> Result<Func, String> {
        let c = CString::new(name).expect("kernel names have no NUL");
        // SAFETY: the module is loaded.
        let f = unsafe { result::module::get_function(self.0, c) }
            .map_err(|e| cu_err(&format!("finding kernel {name}"), e))?;
        Ok(Func(f))
    }
}

/// A kernel handle.
#[derive(Clone, Copy)]
pub struct Func(pub sys::CUfunction);
// SAFETY: function handles are context-wide.
unsafe impl Send for Func {}

impl Func {
    /// Allows up to `bytes` of dynamic shared memory per block.
    pub fn set_max_dynamic_smem(&self, bytes: usize) -> Result<(), String> {
        // SAFETY: valid function.
        unsafe {
            result::function::set_function_attribute(
                self.0,
                sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| cu_err("raising the shared-memory limit", e))
    }

    /// Resident blocks of 256 threads per SM with `smem` bytes of dynamic shared memory.
    pub fn occupancy(&self, smem: usize) -> Result<usize, String> {
        self.occupancy_of(256, smem)
    }

    /// Resident blocks of `threads` threads per SM with `smem` bytes of dynamic shared memory.
    pub fn occupancy_of(&self, threads: u32, smem: usize) -> Result<usize, String> {
        // SAFETY: valid function.
        let n = unsafe {
            result::occupancy::max_active_block_per_multiprocessor(self.0, threads as i32, smem)
        }
        .map_err(|e| cu_err("querying occupancy", e))?;
        Ok(n.max(1) as usize)
    }
}

/// Launches `f` on `stream`. `args` are pointers to each kernel argument, which must have the
/// exact C type of the kernel's parameter.
pub fn launch(
    f: Func,
    grid: (u32, u32, u32),
    smem: usize,
    stream: &Stream,
    args: &mut [*mut c_void],
) -> Result<(), String> {
    launch_threads(f, grid, 256, smem, stream, args)
}

/// [`launch`] with blocks of `threads` threads.
pub fn launch_threads(
    f: Func,
    grid: (u32, u32, u32),
    threads: u32,
    smem: usize,
    stream: &Stream,
    args: &mut [*mut c_void],
) -> Result<(), String> {
    // SAFETY: the callers (kernels.rs) pass arguments matching the kernel signatures.
    unsafe { result::launch_kernel(f.0, grid, (threads, 1, 1), smem as u32, stream.0, args) }
        .map_err(|e| cu_err("launching a kernel", e))
}

/// Device memory, freed on drop.
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// The address `off` bytes in.
    pub fn at(&self, off: usize) -> u64 {
        self.ptr + off as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync; the owner binds the context before dropping.
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// An instantiated CUDA graph.
pub struct Graph(pub sys::CUgraphExec);
// SAFETY: graph executables are context-wide.
unsafe impl Send for Graph {}

impl Graph {
    /// Captures everything `record` queues on `stream` into a graph.
    pub fn capture(
        stream: &Stream,
        record: impl FnOnce() -> Result<(), String>,
    ) -> Result<Graph, String> {
        // SAFETY: valid stream; capture is ended on every path.
        unsafe {
            result::stream::begin_capture(
                stream.0,
                sys::CUstreamCaptureMode_enum::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| cu_err("starting graph capture", e))?;
            let recorded = record();
            let graph = result::stream::end_capture(stream.0)
                .map_err(|e| cu_err("ending graph capture", e));
            recorded?;
            let graph = graph?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0))
                .map_err(|e| cu_err("instantiating the graph", e));
            let _ = result::graph::destroy(graph);
            Ok(Graph(exec?))
        }
    }

    pub fn launch(&self, stream: &Stream) -> Result<(), String> {
        // SAFETY: valid graph and stream.
        unsafe { result::graph::launch(self.0, stream.0) }
            .map_err(|e| cu_err("launching the decode graph", e))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: instantiated by `capture`.
        unsafe {
            let _ = result::graph::exec_destroy(self.0);
        }
    }
}

/// A device event (for per-kernel timing).
pub struct Event(pub sys::CUevent);

impl Event {
    pub fn new() -> Result<Event, String> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(|e| cu_err("creating an event", e))
    }
    pub fn record(&self, s: &Stream) -> Result<(), String> {
        // SAFETY: valid event and stream.
        unsafe { result::event::record(self.0, s.0) }.map_err(|e| cu_err("recording an event", e))
    }
    /// Milliseconds from `self` to `later` (both recorded and complete).
    pub fn ms_to(&self, later: &Event) -> Result<f32, String> {
        // SAFETY: valid events.
        unsafe { result::event::elapsed(self.0, later.0) }
            .map_err(|e| cu_err("reading an event", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by `new`.
        unsafe {
            let _ = result::event::destroy(self.0);
        }
    }
}

/// Device-side timing with events.
pub struct Timer {
    start: sys::CUevent,
    end: sys::CUevent,
}

impl Timer {
    pub fn new() -> Result<Timer, String> {
        let f = sys::CUevent_flags::CU_EVENT_DEFAULT;
        Ok(Timer {
            start: result::event::create(f).map_err(|e| cu_err("creating an event", e))?,
            end: result::event::create(f).map_err(|e| cu_err("creating an event", e))?,
        })
    }
    pub fn start(&self, s: &Stream) -> Result<(), String> {
        // SAFETY: valid event and stream.
        unsafe { result::event::record(self.start, s.0) }
            .map_err(|e| cu_err("recording an event", e))
    }
    /// Records the end and returns the elapsed milliseconds (synchronises).
    pub fn stop_ms(&self, s: &Stream) -> Result<f32, String> {
        // SAFETY: valid events and stream.
        unsafe {
            result::event::record(self.end, s.0).map_err(|e| cu_err("recording an event", e))?;
            result::event::synchronize(self.end).map_err(|e| cu_err("running kernels", e))?;
            result::event::elapsed(self.start, self.end).map_err(|e| cu_err("reading an event", e))
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: created by `new`.
        unsafe {
            let _ = result::event::destroy(self.start);
            let _ = result::event::destroy(self.end);
        }
    }
}

/// Page-locked host memory for device-to-host copies: the driver copies pageable memory through
/// a bounce buffer (about 1 GB/s measured on the H100 machine for the 26 MB of logits of a
/// 32-sequence decode step), pinned memory at PCIe speed.
pub struct PinnedBuf {
    ptr: *mut c_void,
    pub bytes: usize,
}

// SAFETY: plain host memory, owned; used from the thread holding the backend.
unsafe impl Send for PinnedBuf {}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `Gpu::alloc_pinned`, freed once (the context is still alive:
        // owners drop it before the `Gpu`).
        unsafe {
            let _ = result::free_host(self.ptr);
        }
    }
}

impl Gpu {
    /// `bytes` of page-locked host memory.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuf, String> {
        // SAFETY: a plain allocation; flags 0 = page-locked, this context.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }.map_err(|e| {
            cu_err(
                &format!("allocating {bytes} bytes of pinned host memory"),
                e,
            )
        })?;
        Ok(PinnedBuf { ptr, bytes })
    }

    /// Copies `n` values from the device at `src` into the pinned buffer `pin` after the
    /// stream's queued work and returns them (valid until `pin` is used again).
    pub fn download_pinned<'p, T: Copy>(
        &self,
        src: u64,
        n: usize,
        pin: &'p PinnedBuf,
    ) -> Result<&'p [T], String> {
        let bytes = n * std::mem::size_of::<T>();
        if bytes > pin.bytes {
            return Err(format!(
                "download of {bytes} bytes through a {}-byte pinned buffer",
                pin.bytes
            ));
        }
        if n == 0 {
            return Ok(&[]);
        }
        // SAFETY: `pin` holds `bytes` (page-locked, aligned for any T); the copy is complete
        // after the stream synchronises; the source holds `n` values (the caller's contract);
        // the borrow of `pin` keeps the memory alive while the slice is used.
        unsafe {
            let staged = std::slice::from_raw_parts_mut(pin.ptr as *mut T, n);
            result::memcpy_dtoh_async(staged, src, self.stream.0)
                .map_err(|e| cu_err("copying from the GPU", e))?;
            self.sync()?;
            Ok(staged)
        }
    }

    /// Copies `dst.len()` values from the device at `src` into `dst` through `pin`.
    pub fn download_via<T: Copy>(
        &self,
        dst: &mut [T],
        src: u64,
        pin: &PinnedBuf,
    ) -> Result<(), String> {
        let staged = self.download_pinned::<T>(src, dst.len(), pin)?;
        dst.copy_from_slice(staged);
        Ok(())
    }
}

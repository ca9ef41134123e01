//! A training step captured once as a CUDA graph and replayed (fast/csrc/cuda_graph.cpp), and the
//! CUDA caching allocator's peak-memory counters.
//! Replay removes per-kernel launch cost, which dominates a 26M model's step; the step must be
//! shape-static and sync-free (inputs copied into fixed tensors, lr a device tensor).
use anyhow::{anyhow, Result};
use std::ffi::{c_char, c_void};

use super::ops::check;

extern "C" {
    fn mm_graph_capture(
        device: i32,
        warmup: i32,
        step: extern "C" fn(*mut c_void) -> i32,
        ctx: *mut c_void,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn mm_graph_replay(g: *mut c_void) -> *mut c_char;
    fn mm_graph_free(g: *mut c_void);
    fn mm_cuda_peak_memory(device: i32, allocated: *mut i64, reserved: *mut i64);
    fn mm_cuda_reset_peak_memory(device: i32);
}

/// Peak bytes (allocated by tensors, reserved by the caching allocator) on CUDA device `device`
/// since the last [`reset_peak_memory`]: `torch.cuda.max_memory_allocated` / `_reserved`; (0, 0)
/// where there is no such device.
pub fn peak_memory(device: usize) -> (u64, u64) {
    let (mut a, mut r) = (0i64, 0i64);
    unsafe { mm_cuda_peak_memory(device as i32, &mut a, &mut r) };
    (a.max(0) as u64, r.max(0) as u64)
}

pub fn reset_peak_memory(device: usize) {
    unsafe { mm_cuda_reset_peak_memory(device as i32) };
}

pub struct CudaGraph {
    raw: *mut c_void,
}

// The graph is only replayed from the thread that owns the trainer.
unsafe impl Send for CudaGraph {}

struct Ctx<'a> {
    step: &'a mut dyn FnMut() -> Result<()>,
    error: Option<anyhow::Error>,
}

extern "C" fn trampoline(ctx: *mut c_void) -> i32 {
    let ctx = unsafe { &mut *(ctx as *mut Ctx) };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.step)())) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            ctx.error = Some(e);
            1
        }
        Err(_) => {
            ctx.error = Some(anyhow!("the step panicked during graph capture"));
            1
        }
    }
}

impl CudaGraph {
    /// Runs `step` `warmup` times on a side stream, then captures one more call.
    pub fn capture(
        device: usize,
        warmup: usize,
        mut step: impl FnMut() -> Result<()>,
    ) -> Result<Self> {
        let mut ctx = Ctx {
            step: &mut step,
            error: None,
        };
        let mut raw = std::ptr::null_mut();
        let err = unsafe {
            mm_graph_capture(
                device as i32,
                warmup as i32,
                trampoline,
                &mut ctx as *mut Ctx as *mut c_void,
                &mut raw,
            )
        };
        if let Some(e) = ctx.error.take() {
            check("CUDA graph capture", err).ok();
            return Err(e.context("CUDA graph capture"));
        }
        check("CUDA graph capture", err)?;
        Ok(Self { raw })
    }

    /// Launches the captured step on the current stream.
    pub fn replay(&self) -> Result<()> {
        check("CUDA graph replay", unsafe { mm_graph_replay(self.raw) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        unsafe { mm_graph_free(self.raw) };
    }
}

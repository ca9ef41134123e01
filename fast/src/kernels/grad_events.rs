//! CUDA events recorded by gradient hooks (csrc/grad_events.cpp): the data-parallel overlap
//! (parallel/overlap.rs) queues each bucket's all-reduce behind the event of its lowest layer.
use anyhow::Result;
use std::ffi::{c_char, c_int, c_void};

use super::ops::check;
use tch::Tensor;

#[repr(C)]
struct MmGradEvents {
    _private: [u8; 0],
}

extern "C" {
    fn mm_grad_events_new(device: c_int, n: c_int, out: *mut *mut MmGradEvents) -> *mut c_char;
    fn mm_grad_events_free(g: *mut MmGradEvents);
    fn mm_grad_events_hook(g: *mut MmGradEvents, i: c_int, t: *mut c_void) -> *mut c_char;
    fn mm_grad_events_enter(g: *mut MmGradEvents, i: c_int) -> *mut c_char;
    fn mm_grad_events_leave(g: *mut MmGradEvents) -> *mut c_char;
}

/// CUDA events recorded by gradient hooks (csrc/grad_events.cpp) and a side stream that
/// waits for them.
pub struct GradEvents(*mut MmGradEvents);

impl GradEvents {
    pub fn new(device: usize, n: usize) -> Result<Self> {
        let mut p = std::ptr::null_mut();
        // SAFETY: out-pointer call; p is set on success.
        check("grad events", unsafe {
            mm_grad_events_new(device as c_int, n as c_int, &mut p)
        })?;
        Ok(GradEvents(p))
    }
    /// When `t`'s gradient is computed, record event `i` on the backward's stream.
    pub fn hook(&self, i: usize, t: &Tensor) -> Result<()> {
        // SAFETY: live handle; the hook keeps its own reference to the events.
        check("grad events hook", unsafe {
            mm_grad_events_hook(self.0, i as c_int, t.as_ptr() as *mut c_void)
        })
    }
    /// The side stream waits for event `i` and becomes current.
    pub fn enter(&self, i: usize) -> Result<()> {
        // SAFETY: live handle.
        check("grad events enter", unsafe {
            mm_grad_events_enter(self.0, i as c_int)
        })
    }
    /// The stream current before `enter` is current again.
    pub fn leave(&self) -> Result<()> {
        // SAFETY: live handle.
        check("grad events leave", unsafe { mm_grad_events_leave(self.0) })
    }
}

impl Drop for GradEvents {
    fn drop(&mut self) {
        // SAFETY: created by mm_grad_events_new, freed once.
        unsafe { mm_grad_events_free(self.0) }
    }
}

//! PyTorch's own c10d ProcessGroupNCCL (csrc/c10d_shim.cpp), one process per GPU.
//!
//! Failure handling: every collective has the DistEnv timeout (default 10 min, FAST_DIST_TIMEOUT_SEC).
//! ProcessGroupNCCL's watchdog aborts the communicators of a collective that exceeds it and ends
//! the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, default on), so ranks never hang on a dead peer;
//! torchrun then stops the remaining ranks. A rank that fails in Rust calls `abort` (also done on
//! drop unless `finish` ran), which aborts its communicators at once. Before any of that, the
//! monitor (parallel/monitor.rs) ends the peers of a failed rank with its message within a second.

use super::{for_each_bucket, Communicator, DistEnv, DEFAULT_BUCKET_BYTES};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use tch::{Device, Kind, Tensor};

#[repr(C)]
struct FastC10dGroup {
    _private: [u8; 0],
}

extern "C" {
    fn c10d_shim_init(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        rank: c_int,
        world: c_int,
        local_rank: c_int,
        timeout_ms: i64,
        store_prefix: *const c_char,
        out: *mut *mut FastC10dGroup,
    ) -> *mut c_char;
    fn c10d_shim_all_reduce_sum(
        group: *mut FastC10dGroup,
        tensors: *const *mut c_void,
        n: usize,
    ) -> *mut c_char;
    fn c10d_shim_all_reduce_sum_async(
        group: *mut FastC10dGroup,
        tensors: *const *mut c_void,
        n: usize,
    ) -> *mut c_char;
    fn c10d_shim_wait_pending(group: *mut FastC10dGroup) -> *mut c_char;
    fn c10d_shim_broadcast(
        group: *mut FastC10dGroup,
        tensors: *const *mut c_void,
        n: usize,
        root: c_int,
    ) -> *mut c_char;
    fn c10d_shim_barrier(group: *mut FastC10dGroup) -> *mut c_char;
    fn c10d_shim_shutdown(group: *mut FastC10dGroup) -> *mut c_char;
    fn c10d_shim_abort(group: *mut FastC10dGroup);
    fn c10d_shim_free_string(s: *mut c_char);
    fn c10d_shim_store_handle(group: *mut FastC10dGroup) -> *mut super::monitor::FastC10dStore;
}

/// Turns the shim's error string (NULL = success) into a Result, freeing it.
fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated malloc'ed string that we own.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { c10d_shim_free_string(err) };
    Err(anyhow!("c10d: {msg}"))
}

/// This rank's NCCL communicator for a torchrun job.
pub fn connect(env: &DistEnv) -> Result<Box<dyn super::Communicator>> {
    Ok(Box::new(Nccl::new(env)?))
}

/// One rank of a ProcessGroupNCCL. Not Sync: use it from the training thread.
pub struct Nccl {
    group: Cell<*mut FastC10dGroup>,
    rank: usize,
    world: usize,
    device: Device,
    bucket_bytes: usize,
    /// Failure notices and heartbeats through the store (parallel/monitor.rs).
    monitor: Option<super::monitor::Monitor>,
}

impl Nccl {
    /// Selects `cuda:LOCAL_RANK`, joins the store and creates the process group, then runs one
    /// barrier so a broken set-up fails here rather than in the first step.
    pub fn new(env: &DistEnv) -> Result<Self> {
        ensure!(
            env.is_distributed(),
            "Nccl needs WORLD_SIZE > 1 (use SingleProcess)"
        );
        ensure!(
            tch::Cuda::is_available(),
            "rank {}: CUDA is not available; NCCL needs one GPU per rank",
            env.rank
        );
        let n_dev = tch::Cuda::device_count() as usize;
        ensure!(
            env.local_rank < n_dev,
            "rank {}: LOCAL_RANK={} but this process sees {n_dev} GPU(s) (CUDA_VISIBLE_DEVICES?)",
            env.rank,
            env.local_rank
        );
        let host = CString::new(env.master_addr.clone()).context("MASTER_ADDR contains NUL")?;
        let prefix = CString::new(env.store_prefix()).context("store prefix contains NUL")?;
        let timeout_ms = env.timeout.as_millis().min(i64::MAX as u128) as i64;
        let mut group: *mut FastC10dGroup = std::ptr::null_mut();
        // SAFETY: pointers valid for the call; the shim catches every C++ exception.
        check(unsafe {
            c10d_shim_init(
                host.as_ptr(),
                env.master_port,
                env.is_store_server() as c_int,
                env.rank as c_int,
                env.world_size as c_int,
                env.local_rank as c_int,
                timeout_ms,
                prefix.as_ptr(),
                &mut group,
            )
        })
        .with_context(|| format!("creating the NCCL process group ({})", env.describe()))?;
        ensure!(!group.is_null(), "c10d init returned no group");
        let mut comm = Nccl {
            group: Cell::new(group),
            rank: env.rank,
            world: env.world_size,
            device: Device::Cuda(env.local_rank),
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            monitor: None,
        };
        comm.barrier()
            .context("first barrier after creating the NCCL process group")?;
        // A silent peer is waited for as long as a collective would be, at most a minute.
        let dead_after = env.timeout.clamp(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(60),
        );
        // SAFETY: live group; the handle owns its own reference to the store.
        let store = super::monitor::Store::new(unsafe { c10d_shim_store_handle(group) })
            .context("no store handle")?;
        comm.monitor = Some(super::monitor::Monitor::start(
            store,
            env.rank,
            env.world_size,
            dead_after,
        ));
        Ok(comm)
    }

    fn live(&self) -> Result<*mut FastC10dGroup> {
        let g = self.group.get();
        if g.is_null() {
            bail!(
                "rank {}: the NCCL process group was aborted or finished",
                self.rank
            );
        }
        Ok(g)
    }

    fn check_devices(&self, tensors: &[Tensor], what: &str) -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            ensure!(
                t.device() == self.device,
                "{what}: tensor {i} is on {:?} but rank {} works on {:?}",
                t.device(),
                self.rank,
                self.device
            );
        }
        Ok(())
    }

    /// On error, abort so the peers fail instead of waiting for us.
    fn or_abort<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.abort();
        }
        r
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        let r = (|| {
            let g = self.live()?;
            self.check_devices(tensors, "all_reduce_sum")?;
            for_each_bucket(tensors, self.bucket_bytes, |flat| {
                let p = [flat.as_mut_ptr() as *mut c_void];
                // SAFETY: `flat` outlives the call; the shim holds its own reference.
                check(unsafe { c10d_shim_all_reduce_sum(g, p.as_ptr(), 1) })
            })
        })();
        self.or_abort(r)
    }
    fn all_reduce_sum_async(&self, t: &mut Tensor) -> Result<()> {
        let r = (|| {
            let g = self.live()?;
            self.check_devices(std::slice::from_ref(t), "all_reduce_sum_async")?;
            // The shim checks that it is dense and contiguous.
            let p = [t.as_mut_ptr() as *mut c_void];
            // SAFETY: `t` outlives the call; the shim's Work holds its own reference to it.
            check(unsafe { c10d_shim_all_reduce_sum_async(g, p.as_ptr(), 1) })
        })();
        self.or_abort(r)
    }
    fn wait_pending(&self) -> Result<()> {
        let r = (|| {
            let g = self.live()?;
            // SAFETY: live group.
            check(unsafe { c10d_shim_wait_pending(g) })
        })();
        self.or_abort(r)
    }
    fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        let r = (|| {
            ensure!(
                root < self.world,
                "broadcast root {root} outside world {}",
                self.world
            );
            let g = self.live()?;
            self.check_devices(tensors, "broadcast")?;
            for_each_bucket(tensors, self.bucket_bytes, |flat| {
                let p = [flat.as_mut_ptr() as *mut c_void];
                // SAFETY: as in all_reduce_sum.
                check(unsafe { c10d_shim_broadcast(g, p.as_ptr(), 1, root as c_int) })
            })
        })();
        self.or_abort(r)
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let r = (|| {
            let g = self.live()?;
            let mut t = Tensor::f_from_slice(values)?.f_to_device(self.device)?;
            let p = [t.as_mut_ptr() as *mut c_void];
            // SAFETY: as in all_reduce_sum.
            check(unsafe { c10d_shim_all_reduce_sum(g, p.as_ptr(), 1) })?;
            let out = Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?)?;
            values.copy_from_slice(&out);
            Ok(())
        })();
        self.or_abort(r)
    }
    fn barrier(&self) -> Result<()> {
        let r = (|| {
            let g = self.live()?;
            // SAFETY: live group.
            check(unsafe { c10d_shim_barrier(g) })
        })();
        self.or_abort(r)
    }
    fn abort(&self) {
        let g = self.group.replace(std::ptr::null_mut());
        if !g.is_null() {
            eprintln!("rank {}: aborting the NCCL process group", self.rank);
            // SAFETY: g came from c10d_shim_init and is released exactly once.
            unsafe { c10d_shim_abort(g) };
        }
    }
    fn finish(&self) -> Result<()> {
        self.barrier().context("final barrier")?;
        // Every rank got here: peers may now exit (and rank 0 take the store down) freely.
        if let Some(m) = &self.monitor {
            m.stop();
        }
        let g = self.group.replace(std::ptr::null_mut());
        if g.is_null() {
            return Ok(());
        }
        // SAFETY: g came from c10d_shim_init and is released exactly once.
        check(unsafe { c10d_shim_shutdown(g) }).context("shutting down the NCCL process group")
    }
}

impl Drop for Nccl {
    /// Without `finish` (an error or a panic unwound past us), abort: never hang on the way out.
    fn drop(&mut self) {
        self.abort();
    }
}

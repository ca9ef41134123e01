//! Ranks never wait on a dead peer: a failure notice and heartbeats through the rendezvous store.
//!
//! - A rank that fails writes its error message under one store key ([`report_failure`], called
//!   by `main` before it exits) and waits briefly for the peers to read it.
//! - Every rank runs a monitor thread that polls the key twice a second. When it appears, the
//!   rank prints the failed rank's message and exits 1 at once, even from inside a blocked
//!   collective (`_exit`: no destructor can hang on a dead communicator).
//! - The same thread bumps this rank's heartbeat counter and watches the others': a peer that
//!   died without a word (SIGKILL, a crash) stops counting, and after `dead_after` its peers stop
//!   with that sentence. Losing the store itself (rank 0, or torchrun's agent, ended) does too.
//!
//! NCCL's own timeout and watchdog remain the last resort behind this.

use std::ffi::{c_char, CStr, CString};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

#[repr(C)]
pub(super) struct FastC10dStore {
    _private: [u8; 0],
}

extern "C" {
    fn c10d_shim_store_free(store: *mut FastC10dStore);
    fn c10d_shim_store_set(
        store: *mut FastC10dStore,
        key: *const c_char,
        value: *const c_char,
    ) -> *mut c_char;
    fn c10d_shim_store_try_get(
        store: *mut FastC10dStore,
        key: *const c_char,
        value: *mut *mut c_char,
    ) -> *mut c_char;
    fn c10d_shim_store_add(
        store: *mut FastC10dStore,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
    ) -> *mut c_char;
    fn c10d_shim_free_string(s: *mut c_char);
}

const FAILED: &str = "mm_failed";
const ACK: &str = "mm_failed_ack";
const POLL: Duration = Duration::from_millis(500);

fn take(s: *mut c_char) -> String {
    // SAFETY: the shim returns NUL-terminated malloc'ed strings that we own.
    let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { c10d_shim_free_string(s) };
    out
}

fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        Ok(())
    } else {
        Err(anyhow!("{}", take(err)))
    }
}

/// This process's own handle on the store (the shim's store is thread-safe).
pub(super) struct Store(*mut FastC10dStore);

// SAFETY: c10d's TCPStore serialises its operations with a lock; the handle is freed once.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { c10d_shim_store_free(self.0) };
    }
}

impl Store {
    /// Takes ownership of a handle from `c10d_shim_store_handle`.
    pub(super) fn new(raw: *mut FastC10dStore) -> Option<Self> {
        (!raw.is_null()).then_some(Store(raw))
    }

    fn set(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (CString::new(key)?, CString::new(value.replace('\0', " "))?);
        check(unsafe { c10d_shim_store_set(self.0, k.as_ptr(), v.as_ptr()) })
    }

    fn try_get(&self, key: &str) -> Result<Option<String>> {
        let k = CString::new(key)?;
        let mut v: *mut c_char = std::ptr::null_mut();
        check(unsafe { c10d_shim_store_try_get(self.0, k.as_ptr(), &mut v) })?;
        Ok((!v.is_null()).then(|| take(v)))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = CString::new(key)?;
        let mut out = 0i64;
        check(unsafe { c10d_shim_store_add(self.0, k.as_ptr(), delta, &mut out) })?;
        Ok(out)
    }
}

/// The process-wide reporter `main` calls on an error (set while a process group lives).
static REPORTER: Mutex<Option<(Arc<Store>, usize, usize)>> = Mutex::new(None);

/// Ends the process now with `msg` on stderr (exit status 1).
fn stop_now(msg: &str) -> ! {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{msg}");
    let _ = err.flush();
    // SAFETY: _exit never returns; skipping destructors is the point (a blocked NCCL
    // communicator must not hold the process).
    unsafe { libc::_exit(1) }
}

/// Tells the other ranks that this one failed with `msg`, and gives them up to 3 s to read it
/// before this process exits (rank 0 may host the store). No-op without a process group.
pub fn report_failure(msg: &str) {
    let Some((store, rank, world)) = REPORTER.lock().ok().and_then(|g| g.clone()) else {
        return;
    };
    if store
        .set(FAILED, &format!("rank {rank} failed: {msg}"))
        .is_err()
    {
        return;
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match store.add(ACK, 0) {
            Ok(n) if n as usize + 1 >= world => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return,
        }
    }
}

/// The monitor thread of one rank; stopped by [`Monitor::stop`] (normal end) or with the process.
pub(super) struct Monitor {
    stop: Arc<AtomicBool>,
}

impl Monitor {
    /// Starts watching: `dead_after` is how long a silent peer is waited for.
    pub(super) fn start(store: Store, rank: usize, world: usize, dead_after: Duration) -> Self {
        let store = Arc::new(store);
        if let Ok(mut g) = REPORTER.lock() {
            *g = Some((store.clone(), rank, world));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name(format!("rank{rank}-monitor"))
            .spawn(move || watch(&store, rank, world, dead_after, &flag))
            .expect("spawning the rank monitor thread");
        Monitor { stop }
    }

    /// Normal end of the run: the thread returns at its next poll.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut g) = REPORTER.lock() {
            *g = None;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn watch(store: &Store, rank: usize, world: usize, dead_after: Duration, stop: &AtomicBool) {
    let mut seen: Vec<(i64, Instant)> = vec![(-1, Instant::now()); world];
    let mut store_errors = 0;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let polled = (|| -> Result<()> {
            if let Some(msg) = store.try_get(FAILED)? {
                if !msg.starts_with(&format!("rank {rank} ")) {
                    let _ = store.add(ACK, 1);
                    stop_now(&format!(
                        "error: {msg}\nrank {rank} stops too (exit 1): a data-parallel run cannot go on without every rank"
                    ));
                }
            }
            store.add(&format!("mm_hb_{rank}"), 1)?;
            for (r, (count, since)) in seen.iter_mut().enumerate() {
                if r == rank {
                    continue;
                }
                let now = store.add(&format!("mm_hb_{r}"), 0)?;
                if now != *count {
                    *count = now;
                    *since = Instant::now();
                } else if since.elapsed() > dead_after {
                    stop_now(&format!(
                        "error: rank {r} has sent no heartbeat for {} s: it died or froze without reporting an error (see its log)\nrank {rank} stops (exit 1)",
                        dead_after.as_secs()
                    ));
                }
            }
            Ok(())
        })();
        match polled {
            Ok(()) => store_errors = 0,
            Err(e) => {
                store_errors += 1;
                if store_errors >= 3 {
                    stop_now(&format!(
                        "error: rank {rank} lost the rendezvous store ({e}); rank 0 or torchrun's agent, which hosts it, has ended\nrank {rank} stops (exit 1)"
                    ));
                }
            }
        }
    }
}

//! libtorch's Kineto profiler (fast/csrc/profiler.cpp) around a few training steps, for
//! `fast bench --profile DIR`: the Chrome trace goes to `DIR/trace.json` and the device time,
//! summed per (aten op, kernel), to `DIR/kernels.tsv` and to a table on stderr.

use std::ffi::{c_char, CStr, CString};
use std::path::Path;

use anyhow::{anyhow, Context, Result};

extern "C" {
    fn mm_prof_free(s: *mut c_char);
    fn mm_prof_start(cuda: i32) -> *mut c_char;
    fn mm_prof_stop(trace_path: *const c_char, summary: *mut *mut c_char) -> *mut c_char;
}

fn take(s: *mut c_char) -> String {
    let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { mm_prof_free(s) };
    out
}

/// Device time of one (op, kernel) pair over the profiled steps.
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub ns: u64,
    pub count: u64,
    pub op: String,
    pub kernel: String,
}

/// Runs `f` under the profiler (CPU ops, and CUDA kernels when `cuda`), saves the trace and
/// returns the per-kernel device times, largest first.
pub fn profile(
    cuda: bool,
    trace: &Path,
    f: impl FnOnce() -> Result<()>,
) -> Result<Vec<KernelTime>> {
    let session = Session::start(cuda)?;
    let ran = f();
    let rows = session.stop(trace);
    ran?;
    rows
}

/// The profiler between [`Session::start`] and [`Session::stop`] (one at a time per process),
/// for spans that are no single closure, such as micro-steps of the training loop.
pub struct Session {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Session {
    pub fn start(cuda: bool) -> Result<Session> {
        let err = unsafe { mm_prof_start(cuda as i32) };
        if !err.is_null() {
            return Err(anyhow!("starting the profiler: {}", take(err)));
        }
        Ok(Session {
            _not_send: std::marker::PhantomData,
        })
    }

    /// Stops, saves the Chrome trace at `trace` and returns the per-kernel device times.
    pub fn stop(self, trace: &Path) -> Result<Vec<KernelTime>> {
        let path = CString::new(trace.to_string_lossy().as_bytes())
            .context("the trace path contains a NUL byte")?;
        let mut summary: *mut c_char = std::ptr::null_mut();
        let err = unsafe { mm_prof_stop(path.as_ptr(), &mut summary) };
        if !err.is_null() {
            return Err(anyhow!(
                "stopping the profiler (trace {}): {}",
                trace.display(),
                take(err)
            ));
        }
        Ok(parse(&take(summary)))
    }
}

fn parse(tsv: &str) -> Vec<KernelTime> {
    tsv.lines()
        .filter_map(|l| {
            let mut it = l.splitn(4, '\t');
            Some(KernelTime {
                ns: it.next()?.parse().ok()?,
                count: it.next()?.parse().ok()?,
                op: it.next()?.to_string(),
                kernel: it.next()?.to_string(),
            })
        })
        .collect()
}

/// The table `fast bench --profile` prints: per op (kernels summed), then the top kernels,
/// each as ms per step and share of the profiled device time.
pub fn report(rows: &[KernelTime], steps: usize) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let total: u64 = rows.iter().map(|r| r.ns).sum();
    let per_step = |ns: u64| ns as f64 / 1e6 / steps.max(1) as f64;
    let share = |ns: u64| 100.0 * ns as f64 / total.max(1) as f64;
    let mut by_op: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for r in rows {
        let e = by_op.entry(&r.op).or_default();
        e.0 += r.ns;
        e.1 += r.count;
    }
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.cmp(&a.1 .0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "device time: {:.3} ms per step over {steps} profiled step(s)",
        per_step(total)
    );
    let _ = writeln!(s, "{:>9} {:>6} {:>8}  op", "ms/step", "%", "kernels");
    for (op, (ns, n)) in ops.iter().take(40) {
        let _ = writeln!(
            s,
            "{:>9.3} {:>5.1}% {:>8}  {op}",
            per_step(*ns),
            share(*ns),
            n / steps.max(1) as u64
        );
    }
    let _ = writeln!(s, "{:>9} {:>6} {:>8}  op / kernel", "ms/step", "%", "calls");
    for r in rows.iter().take(40) {
        let k: String = r.kernel.chars().take(120).collect();
        let _ = writeln!(
            s,
            "{:>9.3} {:>5.1}% {:>8}  {} / {k}",
            per_step(r.ns),
            share(r.ns),
            r.count / steps.max(1) as u64,
            r.op
        );
    }
    s
}

/// Writes the per-kernel TSV (ns, count, op, kernel) beside the trace.
pub fn write_tsv(rows: &[KernelTime], path: &Path) -> Result<()> {
    let mut s = String::from("ns\tcount\top\tkernel\n");
    for r in rows {
        s.push_str(&format!("{}\t{}\t{}\t{}\n", r.ns, r.count, r.op, r.kernel));
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// On the CPU the profiler starts, records ops, saves a trace and finds no device kernels.
    #[test]
    fn profiles_cpu_ops_and_saves_a_trace() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let rows = profile(false, &trace, || {
            let a = Tensor::ones([64, 64], (Kind::Float, Device::Cpu));
            let _ = a.matmul(&a).sum(Kind::Float);
            Ok(())
        })
        .unwrap();
        assert!(rows.is_empty(), "no CUDA kernels on the CPU: {rows:?}");
        let text = std::fs::read_to_string(&trace).unwrap();
        assert!(text.contains("aten::matmul"), "trace lacks the matmul op");
    }

    #[test]
    fn report_sums_kernels_per_op() {
        let rows = parse("3000000\t2\taten::mm\tgemm_a\n1000000\t4\taten::add\tadd_k\n1000000\t2\taten::mm\tgemm_b\n");
        let r = report(&rows, 2);
        assert!(r.contains("device time: 2.500 ms per step"), "{r}");
        assert!(r.contains("    2.000  80.0%        2  aten::mm"), "{r}");
    }
}

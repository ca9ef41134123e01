//! `fast kernels`: checks our fused CUDA kernels (`kernels::fused`) against the unfused libtorch
//! ops they replace and times both.
//! `--only moe`: the MoE layer's grouped experts against the per-expert loop (`moe.rs`), which
//! runs on the CPU too (`--device cpu`, small `--moe-*` shapes).
//!
//! For each op, random inputs at the b128 training shape (26M model: `--rows` = 128 x 340
//! positions, d 512, 8 heads / 2 kv heads of 64, FFN 1408): the forward outputs and the
//! gradients of every input (under a random upstream gradient) of the fused op are compared with
//! the same math done by libtorch ops under autograd (the model's own unfused functions), then
//! forward + backward of each is timed (device-synchronised, `--iters` after `--warmup`). The
//! MoE layer's entry (`moe_norm_router`: add, norm, router logits) is checked at MiniMind2-MoE's
//! and MiniMind-3's widths against the unfused add, norm, casts and fp32 router matmul, and its
//! weighted combine (`moe_combine`) against a gather, an fp32 multiply and sum. The
//! fused cross-entropy (forward and backward in one kernel, in place over bf16 logits `[4096,
//! 6400]`, one lm_head chunk) is compared with libtorch's fp32 cross-entropy under autograd. Our
//! attention (`qkv_attention`, fast/csrc/attention.cu) is compared with libtorch's qk-norm,
//! RoPE, repeat_kv and SDPA (causal, causal within packed segments, bidirectional) for head dims
//! 64, 80, 96 and 128 at T 340 and at two small shapes for its edges, and timed against the
//! reference and against the path it replaced (`qkv_heads` then cuDNN's SDPA).
//! Then the whole model (forward, lm_head, cross-entropy, backward) runs with the fused path off
//! and on in one process: loss, final hidden state and every parameter gradient are compared and
//! both steps timed. Last, the training step itself (`Trainer::micro_step`, bf16, chunked
//! lm_head) runs unfused, with the fused kernels but autograd's cross-entropy, and fully fused
//! (the fused cross-entropy included): losses and every parameter gradient compared, each timed,
//! with its peak memory.
//!
//! Tolerances are norm-wise, `||fused - ref|| / ||ref||`: bf16 results may differ by one bf16
//! ulp in some elements (the fused kernels round once where the unfused ops round after each op,
//! and fp32 sums run in another order), so 1e-2 for bf16 and 1e-4 for fp32 results; the
//! fraction of elements that differ at all is printed beside (the attention's fp32 norm-weight
//! gradients, computed from bf16 gradients, are held to 1e-2 too). Exit code 1 when a check fails,
//! 2 without CUDA or without `--features cuda`.
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

mod attention;
mod moe;
mod ops;
mod step;

use attention::check_attention;
use ops::{
    check_add_bf16, check_add_rms_norm, check_cross_entropy, check_moe_combine,
    check_moe_norm_router, check_rms_norm, check_rope, check_swiglu,
};
use step::{check_model, check_step};

#[derive(clap::Args, Debug, Clone)]
pub struct KernelsArgs {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Positions (B*T) of the RMSNorm and SwiGLU inputs; RoPE and the model take B = rows / 340.
    #[arg(long, default_value_t = 128 * 340)]
    pub rows: i64,
    /// Timed iterations per op.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Skip the whole-model and training-step comparisons.
    #[arg(long)]
    pub skip_model: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// The fused side of the model and step comparisons (the other side: `--kernels libtorch`).
    #[command(flatten)]
    pub kernels: crate::kernels::KernelConfig,
    /// Only this group of checks: ops (each fused op), model (the whole model and training
    /// step), moe (grouped MoE experts against the loop; the one group that runs on the CPU).
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// MoE check: batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [32i64, 128])]
    pub moe_batches: Vec<i64>,
    /// MoE check: sequence length.
    #[arg(long, default_value_t = SEQ)]
    pub moe_seq: i64,
    /// MoE check: model width (the expert width follows each variant's FFN rule).
    #[arg(long, default_value_t = 512)]
    pub moe_hidden: usize,
}

/// A group of checks (`--only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    Ops,
    Model,
    Moe,
}

const SEQ: i64 = 340;
const EPS: f64 = 1e-5;

/// Differences of `a` (fused) from `b` (reference), computed in f64.
struct Diff {
    max_abs: f64,
    /// max |a - b| / max |b|.
    max_rel: f64,
    /// ||a - b|| / ||b||.
    norm_rel: f64,
    /// Fraction of elements that differ at all.
    differ: f64,
}

fn scalar(t: Tensor) -> f64 {
    f64::try_from(t).expect("a scalar tensor")
}

fn diff(a: &Tensor, b: &Tensor) -> Diff {
    let _g = tch::no_grad_guard();
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let d = &a - &b;
    let max_abs = scalar(d.abs().max());
    let max_ref = scalar(b.abs().max());
    let norm_ref = scalar(b.norm());
    Diff {
        max_abs,
        max_rel: max_abs / max_ref.max(f64::MIN_POSITIVE),
        norm_rel: scalar(d.norm()) / norm_ref.max(f64::MIN_POSITIVE),
        differ: scalar(a.ne_tensor(&b).to_kind(Kind::Double).mean(Kind::Double)),
    }
}

fn tolerance(k: Kind) -> f64 {
    match k {
        Kind::BFloat16 | Kind::Half => 1e-2,
        _ => 1e-4,
    }
}

/// Prints one comparison line; true when within `tol`.
fn report(case: &str, what: &str, d: &Diff, tol: f64) -> bool {
    let ok = d.norm_rel <= tol && d.norm_rel.is_finite();
    println!(
        "{case:<10} {what:<8} max_abs {:.3e}  max_rel {:.3e}  norm_rel {:.3e}  differ {:>8.4}%  tol {tol:.0e}  {}",
        d.max_abs,
        d.max_rel,
        d.norm_rel,
        100.0 * d.differ,
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

/// Gradients of `sum_i sum(ys[i] * gs[i])` w.r.t. `leaves`: the upstream gradient of ys[i] is
/// exactly gs[i] (same kind as ys[i]).
fn grads(ys: &[Tensor], gs: &[Tensor], leaves: &[Tensor]) -> Vec<Tensor> {
    let s = ys
        .iter()
        .zip(gs)
        .map(|(y, g)| (y * g).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .expect("at least one output");
    Tensor::run_backward(&[s], leaves, false, false)
}

/// Mean milliseconds of `f` over `iters` calls after `warmup`, the device synchronised around.
fn time_ms(
    device: Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..warmup {
        f()?;
    }
    sync();
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync();
    Ok(t0.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
}

type Outputs = Vec<Tensor>;

/// Compares and times one fused op against its reference. `leaves` require grad.
#[allow(clippy::too_many_arguments)]
fn check_op(
    args: &KernelsArgs,
    device: Device,
    case: &str,
    out_names: &[&str],
    leaf_names: &[&str],
    leaves: &[Tensor],
    fused_fn: &dyn Fn(&[Tensor]) -> Result<Outputs>,
    reference: &dyn Fn(&[Tensor]) -> Outputs,
) -> Result<bool> {
    let (ok, gs) = compare_op(
        case, out_names, leaf_names, leaves, fused_fn, reference, None,
    )?;
    let tf = time_ms(device, args.warmup, args.iters, || {
        let y = fused_fn(leaves)?;
        grads(&y, &gs, leaves);
        Ok(())
    })?;
    let tr = time_ms(device, args.warmup, args.iters, || {
        let y = reference(leaves);
        grads(&y, &gs, leaves);
        Ok(())
    })?;
    println!(
        "{case:<10} fwd+bwd  fused {tf:.3} ms  unfused {tr:.3} ms  speedup {:.2}x",
        tr / tf
    );
    Ok(ok)
}

/// The comparison of [`check_op`] without the timing: outputs, then the gradients of `leaves`
/// under one random upstream gradient (returned, for timing), each against `tol` (by default the
/// tolerance of its kind). True when all are within.
#[allow(clippy::too_many_arguments)]
fn compare_op(
    case: &str,
    out_names: &[&str],
    leaf_names: &[&str],
    leaves: &[Tensor],
    fused_fn: &dyn Fn(&[Tensor]) -> Result<Outputs>,
    reference: &dyn Fn(&[Tensor]) -> Outputs,
    tol: Option<f64>,
) -> Result<(bool, Vec<Tensor>)> {
    let yf = fused_fn(leaves)?;
    let yr = reference(leaves);
    let gs: Vec<Tensor> = yr.iter().map(|y| y.randn_like()).collect();
    let gf = grads(&yf, &gs, leaves);
    let gr = grads(&yr, &gs, leaves);
    let mut ok = true;
    for ((name, a), b) in out_names.iter().zip(&yf).zip(&yr) {
        if a.size() != b.size() || a.kind() != b.kind() {
            println!(
                "{case:<10} {name:<8} FAIL: fused {:?} {:?}, reference {:?} {:?}",
                a.size(),
                a.kind(),
                b.size(),
                b.kind()
            );
            ok = false;
            continue;
        }
        ok &= report(case, name, &diff(a, b), tol.unwrap_or(tolerance(b.kind())));
    }
    for ((name, a), b) in leaf_names.iter().zip(&gf).zip(&gr) {
        let what = format!("d{name}");
        ok &= report(case, &what, &diff(a, b), tol.unwrap_or(tolerance(b.kind())));
    }
    Ok((ok, gs))
}

/// Index of a CUDA device (0 otherwise).
fn cuda_index(device: Device) -> usize {
    match device {
        Device::Cuda(i) => i,
        _ => 0,
    }
}

fn reset_peak(device: Device) {
    if device.is_cuda() {
        crate::kernels::graph::reset_peak_memory(cuda_index(device));
    }
}

/// Peak allocated GiB since the last [`reset_peak`].
fn peak_gib(device: Device) -> f64 {
    crate::kernels::graph::peak_memory(cuda_index(device)).0 as f64 / (1u64 << 30) as f64
}

/// Prints a loss comparison line; true when the relative difference is within `tol`.
fn report_loss(case: &str, what: &str, fused: f64, reference: f64, tol: f64) -> bool {
    let rel = (fused - reference).abs() / reference.abs().max(f64::MIN_POSITIVE);
    let ok = rel <= tol;
    println!(
        "{case:<10} {what:<8} fused {fused:.6}  unfused {reference:.6}  rel {rel:.3e}  tol {tol:.0e}  {}",
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

/// Worst norm-wise relative difference over the parameters' gradients: (name, norm_rel).
/// Prints the worst parameter gradient's norm-wise error against `tol`; true when within.
fn report_grads(case: &str, prefix: &str, worst: &(String, f64), tol: f64) -> bool {
    let ok = worst.1 <= tol;
    println!(
        "{case:<10} grads    {prefix}worst norm_rel {:.3e} ({})  tol {tol:.0e}  {}",
        worst.1,
        worst.0,
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

fn worst_grad(names: &[String], a: &[Tensor], b: &[Tensor]) -> (String, f64) {
    let mut worst = (String::new(), 0.0f64);
    for ((name, x), y) in names.iter().zip(a).zip(b) {
        let d = diff(x, y);
        if !(d.norm_rel <= worst.1) {
            worst = (name.clone(), d.norm_rel);
        }
    }
    worst
}

pub fn run(args: &KernelsArgs) -> Result<()> {
    let moe_only = args.only == Some(Only::Moe);
    if !crate::kernels::BUILT_WITH_CUDA && !moe_only {
        eprintln!(
            "fast kernels: this binary was built without --features cuda (no fused kernels; \
             --only moe runs without them)"
        );
        std::process::exit(2);
    }
    let device = crate::model::precision::parse_device(&args.device)?;
    let available = match device {
        Device::Cuda(i) => tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count(),
        Device::Cpu => moe_only,
        _ => false,
    };
    if !available {
        eprintln!(
            "fast kernels: needs a CUDA device (--device cuda or cuda:N; on the CPU only \
             --only moe runs); {} is not available",
            args.device
        );
        std::process::exit(2);
    }
    anyhow::ensure!(args.rows > 0, "--rows must be positive");
    anyhow::ensure!(
        args.moe_seq > 0 && args.moe_hidden > 0 && args.moe_batches.iter().all(|&b| b > 0),
        "--moe-batches, --moe-seq and --moe-hidden must be positive"
    );
    anyhow::ensure!(
        args.only.is_some_and(|o| o != Only::Moe) || args.moe_hidden % 8 == 0,
        "--moe-hidden must be a multiple of 8 (got {}): the grouped experts checked against the loop need rows of whole 16 bytes",
        args.moe_hidden
    );
    tch::manual_seed(args.seed);
    println!(
        "fast kernels: rows {}, iters {} (+{} warm-up), device {}",
        args.rows,
        args.iters,
        args.warmup,
        crate::model::precision::device_name(device)
    );
    let mut ok = true;
    let runs = |g: Only| args.only.is_none_or(|o| o == g);
    if runs(Only::Ops) {
        ok &= check_rms_norm(args, device)?;
        ok &= check_add_rms_norm(args, device)?;
        ok &= check_moe_norm_router(args, device)?;
        ok &= check_moe_combine(args, device)?;
        ok &= check_rope(args, device)?;
        ok &= check_attention(args, device)?;
        ok &= check_add_bf16(args, device)?;
        ok &= check_swiglu(args, device)?;
        ok &= check_cross_entropy(args, device)?;
    }
    if runs(Only::Model) && !args.skip_model {
        ok &= check_model(args, device)?;
        ok &= check_step(args, device)?;
    }
    if runs(Only::Moe) {
        ok &= moe::check_moe(args, device)?;
    }
    if !ok {
        println!("fast kernels: FAILED");
        std::process::exit(1);
    }
    println!("fast kernels: all checks passed");
    Ok(())
}

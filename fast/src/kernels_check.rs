//! `fast kernels`: checks our fused CUDA kernels (`model::fused`) against the unfused libtorch
//! ops they replace and times both.
//!
//! For each op, random inputs at the b128 training shape (26M model: `--rows` = 128 x 340
//! positions, d 512, 8 heads / 2 kv heads of 64, FFN 1408): the forward outputs and the
//! gradients of every input (under a random upstream gradient) of the fused op are compared with
//! the same math done by libtorch ops under autograd (the model's own unfused functions), then
//! forward + backward of each is timed (device-synchronised, `--iters` after `--warmup`). The
//! fused cross-entropy (forward and backward in one kernel, in place over bf16 logits `[4096,
//! 6400]`, one lm_head chunk) is compared with libtorch's fp32 cross-entropy under autograd. Our
//! attention (`qkv_attention`, fast/csrc/attention.cu) is compared with libtorch's RoPE,
//! repeat_kv and causal SDPA at T 340 and at two small shapes for its edges, and timed against
//! the path it replaced (`qkv_heads` then cuDNN's SDPA).
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
//! fraction of elements that differ at all is printed beside. Exit code 1 when a check fails,
//! 2 without CUDA or without `--features cuda`.
use std::time::Instant;

use anyhow::Result;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::model::{fused, named_parameters, MiniMindForCausalLM};
use crate::precision::Precision;
use crate::step::{Trainer, TrainerConfig};

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
    let idx = match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    };
    for _ in 0..warmup {
        f()?;
    }
    tch::Cuda::synchronize(idx);
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    tch::Cuda::synchronize(idx);
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
        ok &= report(case, name, &diff(a, b), tolerance(b.kind()));
    }
    for ((name, a), b) in leaf_names.iter().zip(&gf).zip(&gr) {
        let what = format!("d{name}");
        ok &= report(case, &what, &diff(a, b), tolerance(b.kind()));
    }
    drop((yf, yr, gf, gr));
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

fn check_rms_norm(args: &KernelsArgs, device: Device) -> Result<bool> {
    let d = 512;
    let x = Tensor::randn([args.rows, d], (Kind::Float, device)).set_requires_grad(true);
    let w = (Tensor::randn([d], (Kind::Float, device)) * 0.1 + 1.0).set_requires_grad(true);
    check_op(
        args,
        device,
        "rms_norm",
        &["y"],
        &["x", "w"],
        &[x, w],
        &|l| Ok(vec![fused::rms_norm_bf16(&l[0], &l[1], EPS)?]),
        &|l| vec![crate::model::rms_norm(&l[0], &l[1], EPS).to_kind(Kind::BFloat16)],
    )
}

/// The residual add fused into the norm: outputs h (fp32) and y (bf16), gradients for x (fp32),
/// the branch output a (bf16) and w; the reference is `h = x + a` then the unfused norm.
fn check_add_rms_norm(args: &KernelsArgs, device: Device) -> Result<bool> {
    let d = 512;
    let x = Tensor::randn([args.rows, d], (Kind::Float, device)).set_requires_grad(true);
    let a = Tensor::randn([args.rows, d], (Kind::BFloat16, device)).set_requires_grad(true);
    let w = (Tensor::randn([d], (Kind::Float, device)) * 0.1 + 1.0).set_requires_grad(true);
    check_op(
        args,
        device,
        "add_norm",
        &["h", "y"],
        &["x", "a", "w"],
        &[x, a, w],
        &|l| {
            let (h, y) = fused::add_rms_norm_bf16(&l[0], &l[1], &l[2], EPS)?;
            Ok(vec![h, y])
        },
        &|l| {
            let h = &l[0] + &l[1];
            let y = crate::model::rms_norm(&h, &l[2], EPS).to_kind(Kind::BFloat16);
            vec![h, y]
        },
    )
}

fn check_rope(args: &KernelsArgs, device: Device) -> Result<bool> {
    let (b, t, h, kv, hd) = ((args.rows / SEQ).max(1), SEQ, 8i64, 2i64, 64i64);
    let n_rep = h / kv;
    let (cos, sin) = crate::model::rope_table(1e6, hd, t);
    let (cos, sin) = (cos.to_device(device), sin.to_device(device));
    // q, k, v as the model makes them: views of one merged projection output.
    let qkv =
        Tensor::randn([b, t, (h + 2 * kv) * hd], (Kind::BFloat16, device)).set_requires_grad(true);
    let split = |l: &[Tensor]| {
        let p = l[0].split_with_sizes([h * hd, kv * hd, kv * hd], -1);
        (
            p[0].view([b, t, h, hd]),
            p[1].view([b, t, kv, hd]),
            p[2].view([b, t, kv, hd]),
        )
    };
    check_op(
        args,
        device,
        "rope_heads",
        &["q", "k", "v"],
        &["qkv"],
        &[qkv],
        &|l| {
            // The model's op: one node over the merged projection. It writes [B, T, heads, hd];
            // attention reads the [B, heads, T, hd] view.
            let (q, k, v) = fused::qkv_heads(&l[0], &cos, &sin, h, kv)?;
            Ok(vec![
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
            ])
        },
        &|l| {
            let (q, k, v) = split(l);
            let bf = Kind::BFloat16;
            vec![
                crate::model::rope(&q, &cos, &sin, bf).transpose(1, 2),
                crate::model::repeat_kv(
                    crate::model::rope(&k, &cos, &sin, bf).transpose(1, 2),
                    n_rep,
                ),
                crate::model::repeat_kv(v.transpose(1, 2), n_rep),
            ]
        },
    )
}

/// Our attention over the merged projection (`qkv_attention`) against libtorch's ops: the split
/// views, RoPE, repeat_kv and causal SDPA under autograd. At the b128 shape (T 340: five full
/// tiles and one of 20 rows), then two small shapes for the edges (T 129 with 3 query heads per
/// kv head, T 64 exactly one tile). The b128 case also times the path it replaces in the model,
/// `qkv_heads` then cuDNN's SDPA.
fn check_attention(args: &KernelsArgs, device: Device) -> Result<bool> {
    let hd = 64i64;
    let b128 = ((args.rows / SEQ).max(1), SEQ, 8i64, 2i64);
    let mut ok = true;
    for (case, (b, t, h, kv)) in [
        ("attention", b128),
        ("attn_t129", (3, 129, 6, 2)),
        ("attn_t64", (2, 64, 4, 4)),
    ] {
        let (cos, sin) = crate::model::rope_table(1e6, hd, t);
        let (cos, sin) = (cos.to_device(device), sin.to_device(device));
        let qkv = Tensor::randn([b, t, (h + 2 * kv) * hd], (Kind::BFloat16, device))
            .set_requires_grad(true);
        let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, false)
                .transpose(1, 2)
                .reshape([b, t, h * hd])
        };
        ok &= check_op(
            args,
            device,
            case,
            &["o"],
            &["qkv"],
            std::slice::from_ref(&qkv),
            &|l| Ok(vec![fused::qkv_attention(&l[0], &cos, &sin, h, kv)?]),
            &|l| {
                let bf = Kind::BFloat16;
                let p = l[0].split_with_sizes([h * hd, kv * hd, kv * hd], -1);
                let (q, k, v) = (
                    p[0].view([b, t, h, hd]),
                    p[1].view([b, t, kv, hd]),
                    p[2].view([b, t, kv, hd]),
                );
                let q = crate::model::rope(&q, &cos, &sin, bf).transpose(1, 2);
                let k = crate::model::rope(&k, &cos, &sin, bf).transpose(1, 2);
                let v = v.transpose(1, 2);
                let n_rep = h / kv;
                let (k, v) = (
                    crate::model::repeat_kv(k, n_rep),
                    crate::model::repeat_kv(v, n_rep),
                );
                vec![sdpa(&q, &k, &v)]
            },
        )?;
        if case == "attention" {
            let g = Tensor::randn([b, t, h * hd], (Kind::BFloat16, device));
            let leaves = std::slice::from_ref(&qkv);
            let ours = time_ms(device, args.warmup, args.iters, || {
                let o = fused::qkv_attention(&qkv, &cos, &sin, h, kv)?;
                grads(&[o], std::slice::from_ref(&g), leaves);
                Ok(())
            })?;
            let before = time_ms(device, args.warmup, args.iters, || {
                let (q, k, v) = fused::qkv_heads(&qkv, &cos, &sin, h, kv)?;
                let o = sdpa(&q.transpose(1, 2), &k.transpose(1, 2), &v.transpose(1, 2));
                grads(&[o], std::slice::from_ref(&g), leaves);
                Ok(())
            })?;
            println!(
                "{case:<10} fwd+bwd  ours {ours:.3} ms  qkv_heads + cuDNN SDPA {before:.3} ms  speedup {:.2}x",
                before / ours
            );
        }
    }
    Ok(ok)
}

/// `add_bf16_` (an fp32 `.grad` += a bf16 gradient, the lm_head's and, through `weights_bf16`,
/// every projection's) against libtorch's mixed-dtype `add_`: the same arithmetic (g widened to
/// fp32, one fp32 add), so the results must be equal bit for bit (tolerance 0). At the lm_head's
/// `[6400, 512]`.
fn check_add_bf16(args: &KernelsArgs, device: Device) -> Result<bool> {
    let _g = tch::no_grad_guard();
    let acc = Tensor::randn([6400, 512], (Kind::Float, device));
    let g = Tensor::randn([6400, 512], (Kind::BFloat16, device));
    let ours = acc.copy();
    fused::add_bf16_(&ours, &g)?;
    let mut theirs = acc.copy();
    let _ = theirs.f_add_(&g)?;
    let ok = report("add_bf16", "acc", &diff(&ours, &theirs), 0.0);
    let tf = time_ms(device, args.warmup, args.iters, || {
        fused::add_bf16_(&ours, &g)
    })?;
    let tr = time_ms(device, args.warmup, args.iters, || {
        let _ = theirs.f_add_(&g)?;
        Ok(())
    })?;
    println!(
        "{:<10} add_     ours {tf:.3} ms  libtorch {tr:.3} ms  speedup {:.2}x",
        "add_bf16",
        tr / tf
    );
    Ok(ok)
}

fn check_swiglu(args: &KernelsArgs, device: Device) -> Result<bool> {
    let f = 1408;
    let gu = Tensor::randn([args.rows, 2 * f], (Kind::BFloat16, device)).set_requires_grad(true);
    check_op(
        args,
        device,
        "swiglu",
        &["h"],
        &["gu"],
        &[gu],
        &|l| Ok(vec![fused::swiglu(&l[0], f)?]),
        &|l| {
            let p = l[0].split_with_sizes([f, f], -1);
            vec![p[0].silu() * &p[1]]
        },
    )
}

/// The 26M model's forward + backward with the fused path off, then on: same weights, same
/// tokens.
fn check_model(args: &KernelsArgs, device: Device) -> Result<bool> {
    let cfg = ModelConfig::minimind_26m();
    let (b, t) = ((args.rows / SEQ).max(1), SEQ);
    tch::manual_seed(args.seed + 1);
    let vs = VarStore::new(device);
    let mut model = MiniMindForCausalLM::new(&vs.root(), &cfg)?;
    model.set_compute_kind(Kind::BFloat16);
    let v = cfg.vocab_size as i64;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, device));
    let labels = Tensor::randint(v, [b * t], (Kind::Int64, device));
    let (names, params): (Vec<String>, Vec<Tensor>) = named_parameters(&vs).into_iter().unzip();
    let step = |on: bool| -> (Tensor, Tensor, Vec<Tensor>) {
        fused::set_enabled(on);
        let (h, _aux) = model.forward_hidden(&ids);
        let logits = model.lm_head(&h).view([-1, v]).to_kind(Kind::Float);
        let loss =
            logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0);
        let g = Tensor::run_backward(&[&loss], &params, false, false);
        (loss.detach(), h.detach(), g)
    };
    let (loss_r, h_r, g_r) = step(false);
    let (loss_f, h_f, g_f) = step(true);
    let mut ok = report_loss("model", "loss", scalar(loss_f), scalar(loss_r), 1e-3);
    println!(
        "model      hidden   kinds: fused {:?}, unfused {:?}",
        h_f.kind(),
        h_r.kind()
    );
    // The unfused hidden state is fp32 (the lm_head casts it), the fused one already bf16.
    ok &= report("model", "hidden", &diff(&h_f, &h_r), 1e-2);
    // Two bf16 runs that round in different places drift apart through 8 layers: gradients are
    // held to 5e-2 norm-wise, the worst parameter printed.
    ok &= report_grads("model", "", &worst_grad(&names, &g_f, &g_r), 5e-2);
    drop((g_f, g_r));
    let timed = |on: bool| {
        time_ms(device, args.warmup, args.iters, || {
            let _ = step(on);
            Ok(())
        })
    };
    let tr = timed(false)?;
    let tf = timed(true)?;
    println!(
        "model      fwd+bwd  fused {tf:.3} ms  unfused {tr:.3} ms  speedup {:.2}x  (B {b}, T {t})",
        tr / tf
    );
    Ok(ok)
}

/// Index of a CUDA device (0 otherwise).
fn cuda_index(device: Device) -> usize {
    match device {
        Device::Cuda(i) => i,
        _ => 0,
    }
}

#[cfg(feature = "cuda")]
fn reset_peak(device: Device) {
    crate::cuda_graph::reset_peak_memory(cuda_index(device));
}

/// Peak allocated GiB since the last [`reset_peak`].
#[cfg(feature = "cuda")]
fn peak_gib(device: Device) -> f64 {
    crate::cuda_graph::peak_memory(cuda_index(device)).0 as f64 / (1u64 << 30) as f64
}

#[cfg(not(feature = "cuda"))]
fn reset_peak(_device: Device) {}

#[cfg(not(feature = "cuda"))]
fn peak_gib(_device: Device) -> f64 {
    f64::NAN
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

/// The fused cross-entropy over one lm_head chunk (bf16 logits `[4096, 6400]`, about 10% of the
/// labels ignored, labels 0 and V-1 present) against libtorch: `cross_entropy(logits.float(),
/// Sum, ignore -100) * seed` under autograd, the gradient cast back to bf16 as the lm_head's
/// cast-backward does.
fn check_cross_entropy(args: &KernelsArgs, device: Device) -> Result<bool> {
    let (n, v) = (4096i64, 6400i64);
    let logits = (Tensor::randn([n, v], (Kind::Float, device)) * 3.0).to_kind(Kind::BFloat16);
    let ignored = Tensor::rand([n], (Kind::Float, device)).lt(0.1);
    let labels = Tensor::randint(v, [n], (Kind::Int64, device)).masked_fill(&ignored, -100);
    let _ = labels.get(0).fill_(0);
    let _ = labels.get(1).fill_(v - 1);
    // A positive scale of the order the step uses (1 / counted labels, times the weight).
    let seed = (Tensor::rand([], (Kind::Float, device)) + 0.5) * 1e-3;
    let reference = |x: &Tensor| -> (Tensor, Tensor) {
        let leaf = x.detach().set_requires_grad(true);
        let loss = leaf.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &labels,
            None,
            tch::Reduction::Sum,
            crate::loss::IGNORE_INDEX,
            0.0,
        );
        let g = Tensor::run_backward(&[&loss * &seed], &[&leaf], false, false);
        (loss.detach(), g[0].shallow_clone())
    };
    let (loss_r, grad_r) = reference(&logits);
    let grad_f = logits.copy();
    let loss_f = fused::cross_entropy_bf16(&grad_f, &labels, &seed)?;
    let mut ok = true;
    ok &= report_loss(
        "cross_ent",
        "loss",
        scalar(loss_f.shallow_clone()),
        scalar(loss_r),
        1e-5,
    );
    if grad_f.kind() != grad_r.kind() || loss_f.kind() != Kind::Float || loss_f.dim() != 0 {
        println!(
            "cross_ent  kinds    FAIL: gradient {:?} (reference {:?}), loss {:?} of {} dims",
            grad_f.kind(),
            grad_r.kind(),
            loss_f.kind(),
            loss_f.dim()
        );
        ok = false;
    }
    ok &= report("cross_ent", "dlogits", &diff(&grad_f, &grad_r), 1e-2);
    // Labels outside [0, V) other than -100 count as ignored: loss 0, gradient 0.
    let bad = logits.narrow(0, 0, 3).copy();
    let bad_labels = Tensor::from_slice(&[v, -7, 5]).to_device(device);
    let bad_loss = scalar(fused::cross_entropy_bf16(&bad, &bad_labels, &seed)?);
    // Only the third row (label 5) counts.
    let ref_loss = scalar(
        logits
            .narrow(0, 2, 1)
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &bad_labels.narrow(0, 2, 1),
                None,
                tch::Reduction::Sum,
                crate::loss::IGNORE_INDEX,
                0.0,
            ),
    );
    let bad_zero = scalar(bad.narrow(0, 0, 2).abs().sum(Kind::Float)) == 0.0;
    let bad_ok = bad_zero && (bad_loss - ref_loss).abs() <= 1e-5 * ref_loss.abs();
    println!(
        "cross_ent  range    labels V and -7 ignored (zero gradient {bad_zero}, loss {bad_loss:.6} vs {ref_loss:.6})  {}",
        if bad_ok { "ok" } else { "FAIL" }
    );
    ok &= bad_ok;
    drop((grad_f, grad_r, bad));
    // In place: later iterations run on the previous one's gradient, the same work.
    let buf = logits.copy();
    let tf = time_ms(device, args.warmup, args.iters, || {
        let _ = fused::cross_entropy_bf16(&buf, &labels, &seed)?;
        Ok(())
    })?;
    let tr = time_ms(device, args.warmup, args.iters, || {
        let _ = reference(&logits);
        Ok(())
    })?;
    println!(
        "cross_ent  fwd+bwd  fused {tf:.3} ms  unfused {tr:.3} ms  speedup {:.2}x  (N {n}, V {v})",
        tr / tf
    );
    Ok(ok)
}

/// One micro-step from zeroed gradients, the fused kernels and the fused cross-entropy each on
/// or off: (loss, copies of every parameter gradient).
fn micro_step_with(
    tr: &mut Trainer,
    ids: &Tensor,
    labels: &Tensor,
    kernels: bool,
    ce: bool,
) -> Result<(f64, Vec<Tensor>)> {
    fused::set_enabled(kernels);
    tr.fused_ce = ce;
    let _ = tr.flat_grads.f_zero_()?;
    let out = tr.micro_step(ids, labels, 1.0)?;
    let grads = tr.grads().iter().map(|g| g.copy()).collect();
    Ok((scalar(out.loss), grads))
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

/// The training step, `Trainer::micro_step` at bf16 (26M model, chunked lm_head, ~10% of the
/// labels ignored), on one set of weights and one batch: unfused; fused kernels with autograd's
/// cross-entropy; fully fused. The fused cross-entropy is held to the model tolerances against
/// both; the run-to-run noise of the unfused cross-entropy (attention's backward is not
/// bitwise deterministic) is printed beside.
fn check_step(args: &KernelsArgs, device: Device) -> Result<bool> {
    let cfg = ModelConfig::minimind_26m();
    let (b, t) = ((args.rows / SEQ).max(1), SEQ);
    let tc = TrainerConfig {
        precision: Precision::Bf16,
        device,
        seed: args.seed + 2,
        ..Default::default()
    };
    let mut tr = Trainer::new(&cfg, tc)?;
    let names: Vec<String> = tr.params.iter().map(|(n, _)| n.clone()).collect();
    let v = cfg.vocab_size as i64;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, device));
    let ignored = Tensor::rand([b, t], (Kind::Float, device)).lt(0.1);
    let labels = ids.masked_fill(&ignored, crate::loss::IGNORE_INDEX);
    let (loss_u, g_u) = micro_step_with(&mut tr, &ids, &labels, false, false)?;
    let (loss_k, g_k) = micro_step_with(&mut tr, &ids, &labels, true, false)?;
    let (loss_k2, g_k2) = micro_step_with(&mut tr, &ids, &labels, true, false)?;
    let (loss_f, g_f) = micro_step_with(&mut tr, &ids, &labels, true, true)?;
    let mut ok = true;
    let noise = worst_grad(&names, &g_k2, &g_k);
    println!(
        "step       noise    kernels on, autograd CE twice: loss rel {:.3e}, worst grad norm_rel {:.3e} ({})",
        (loss_k2 - loss_k).abs() / loss_k.abs().max(f64::MIN_POSITIVE),
        noise.1,
        noise.0
    );
    let mut compare = |what: &str, loss_a: f64, loss_b: f64, a: &[Tensor], b: &[Tensor]| {
        ok &= report_loss("step", "loss", loss_a, loss_b, 1e-3);
        ok &= report_grads(
            "step",
            &format!("{what}: "),
            &worst_grad(&names, a, b),
            5e-2,
        );
    };
    println!("step       fused CE vs autograd CE (fused kernels on in both):");
    compare("fused CE vs autograd CE", loss_f, loss_k, &g_f, &g_k);
    println!("step       all fused vs all unfused:");
    compare("all fused vs unfused", loss_f, loss_u, &g_f, &g_u);
    drop((g_u, g_k, g_k2, g_f));
    for (label, kernels, ce) in [
        ("unfused", false, false),
        ("kernels", true, false),
        ("kernels+ce", true, true),
    ] {
        fused::set_enabled(kernels);
        tr.fused_ce = ce;
        let ms = time_ms(device, args.warmup, args.iters, || {
            tr.micro_step(&ids, &labels, 1.0)?;
            Ok(())
        })?;
        tch::Cuda::synchronize(cuda_index(device) as i64);
        reset_peak(device);
        tr.micro_step(&ids, &labels, 1.0)?;
        tch::Cuda::synchronize(cuda_index(device) as i64);
        println!(
            "step       {label:<10} micro_step {ms:.3} ms  peak {:.3} GiB  (B {b}, T {t})",
            peak_gib(device)
        );
    }
    let _ = tr.flat_grads.f_zero_()?;
    Ok(ok)
}

pub fn run(args: &KernelsArgs) -> Result<()> {
    if !cfg!(feature = "cuda") {
        eprintln!("fast kernels: this binary was built without --features cuda (no fused kernels)");
        std::process::exit(2);
    }
    let device = crate::precision::parse_device(&args.device)?;
    let available = match device {
        Device::Cuda(i) => tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count(),
        _ => false,
    };
    if !available {
        eprintln!(
            "fast kernels: needs a CUDA device (--device cuda or cuda:N); {} is not available",
            args.device
        );
        std::process::exit(2);
    }
    anyhow::ensure!(args.rows > 0, "--rows must be positive");
    tch::manual_seed(args.seed);
    println!(
        "fast kernels: rows {}, iters {} (+{} warm-up), device {}",
        args.rows,
        args.iters,
        args.warmup,
        crate::cli::device_name(device)
    );
    let mut ok = true;
    ok &= check_rms_norm(args, device)?;
    ok &= check_add_rms_norm(args, device)?;
    ok &= check_rope(args, device)?;
    ok &= check_attention(args, device)?;
    ok &= check_add_bf16(args, device)?;
    ok &= check_swiglu(args, device)?;
    ok &= check_cross_entropy(args, device)?;
    if !args.skip_model {
        ok &= check_model(args, device)?;
        ok &= check_step(args, device)?;
    }
    if !ok {
        println!("fast kernels: FAILED");
        std::process::exit(1);
    }
    println!("fast kernels: all checks passed");
    Ok(())
}

//! The MoE layer's grouped experts against the per-expert loop (`--only moe`; CUDA or the CPU).
//!
//! For MiniMind2's MoE (4 routed experts top-2 renormalised, 1 shared, seq aux) and MiniMind-3's
//! (4 routed top-1, none shared, its aux) at `--moe-hidden` (512: the 26M config, FFN width by
//! each variant's rule), T = `--moe-seq` and each B of `--moe-batches`, in bf16 and fp32
//! compute, plus a small case where the router never picks the last expert: the layer runs
//! with `--moe-experts grouped` and `loop` on the same weights and input (fp32 master weights,
//! an fp32 input like the norm's output). Compared: the output, the aux loss, the gradients of
//! the input, the router and every expert weight (under a random upstream gradient of the
//! output plus the aux loss itself); the starved expert's gradients must be exactly zero.
//! The grouped layer runs with each `--moe-recompute` (`off`, `swiglu`, `gate-up`), each
//! compared so. Then forward + backward of each is timed: the loop, the grouped layer stacking
//! the expert weights per call (what the model runs, with each `--moe-recompute`), and the
//! grouped layer on weights stacked once (what a persistently stacked parameter layout would
//! run; the difference is the cost of stacking).
//!
//! Tolerances, norm-wise: fp32 1e-5 (the same per-expert products in fp32; only the GEMM's
//! blocking may reorder a sum, a few ulps, and merged gate/up is one matmul where the loop does
//! two); bf16 1e-2, the command's bf16 tolerance (on the fused path gate and up are one matmul
//! and SwiGLU one kernel, rounding once where the loop's ops round after each step, and with
//! `--moe-recompute swiglu` or `gate-up` the router's weight gradient comes from the bf16 input
//! rows, where the loop's comes from the fp32 ones: a bf16 rounding of each row, 2e-3 relative
//! at most, norm-wise far less). The aux loss comes from the one router both paths share: 1e-6.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::{diff, peak_gib, report, report_grads, report_loss, reset_peak, scalar, time_ms};
use super::{worst_grad, KernelsArgs};
use crate::kernels::{KernelConfig, Kernels, MoeExperts, MoeRecompute};
use crate::model::{Mlp, ModelConfig, MoeFeedForward, MoeRouting};

/// The layer of `cfg` with fresh N(0, 0.02) fp32 weights requiring grad, and their names.
fn layer(cfg: &ModelConfig, device: Device) -> (MoeFeedForward, Vec<String>) {
    let (d, f) = (cfg.hidden_size as i64, cfg.expert_width() as i64);
    let w = |o: i64, i: i64| {
        (Tensor::randn([o, i], (Kind::Float, device)) * 0.02).set_requires_grad(true)
    };
    let mlp = || Mlp {
        gate_proj: w(f, d),
        up_proj: w(f, d),
        down_proj: w(d, f),
    };
    let m = MoeFeedForward {
        gate: w(cfg.routed_experts() as i64, d),
        experts: (0..cfg.routed_experts()).map(|_| mlp()).collect(),
        shared_experts: (0..cfg.shared_experts()).map(|_| mlp()).collect(),
        top_k: cfg.num_experts_per_tok as i64,
        routing: MoeRouting::of(cfg),
    };
    let mut names = vec!["gate".to_string()];
    for (what, n) in [
        ("experts", m.experts.len()),
        ("shared", m.shared_experts.len()),
    ] {
        for j in 0..n {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                names.push(format!("{what}.{j}.{p}"));
            }
        }
    }
    (m, names)
}

fn params(m: &MoeFeedForward) -> Vec<Tensor> {
    let mut v = vec![m.gate.shallow_clone()];
    for e in m.experts.iter().chain(&m.shared_experts) {
        v.extend(e.parameters().iter().map(|p| p.shallow_clone()));
    }
    v
}

/// MiniMind2's and MiniMind-3's MoE at width d.
fn variants(d: usize) -> [(&'static str, ModelConfig); 2] {
    [
        (
            "moe2",
            ModelConfig {
                hidden_size: d,
                use_moe: true,
                ..ModelConfig::default()
            },
        ),
        (
            "moe3",
            ModelConfig {
                hidden_size: d,
                use_moe: true,
                ..ModelConfig::minimind3()
            },
        ),
    ]
}

/// `base` with `--moe-experts e --moe-recompute r`.
fn with_experts(base: KernelConfig, e: MoeExperts, r: MoeRecompute) -> Kernels {
    Kernels::new(KernelConfig {
        moe_experts: e,
        moe_recompute: r,
        ..base
    })
}

/// One layer's forward + backward of `y . gy + aux`: (y, aux, gradients of x and of `leaves`,
/// undefined ones as zeros).
fn fwd_bwd(
    m: &MoeFeedForward,
    x: &Tensor,
    gy: &Tensor,
    compute: Kind,
    k: &Kernels,
    leaves: &[Tensor],
) -> (Tensor, Tensor, Vec<Tensor>) {
    let (y, aux) = m.forward(x, compute, k);
    let s = (&y * gy).sum(Kind::Float) + aux.to_kind(Kind::Float);
    let mut all = vec![x.shallow_clone()];
    all.extend(leaves.iter().map(Tensor::shallow_clone));
    let g = Tensor::run_backward(&[s], &all, false, false)
        .into_iter()
        .zip(&all)
        .map(|(g, p)| if g.defined() { g } else { p.zeros_like() })
        .collect();
    (y.detach(), aux.detach(), g)
}

fn tolerance(compute: Kind) -> f64 {
    if compute == Kind::Float {
        1e-5
    } else {
        1e-2
    }
}

/// Every variant, kind and shape: grouped against the loop, then both timed.
pub(super) fn check_moe(args: &KernelsArgs, device: Device) -> Result<bool> {
    let mut ok = true;
    let t = args.moe_seq;
    for (name, cfg) in variants(args.moe_hidden) {
        for compute in [Kind::BFloat16, Kind::Float] {
            let kn = if compute == Kind::Float {
                "fp32"
            } else {
                "bf16"
            };
            let mut shapes: Vec<(String, i64, bool)> = args
                .moe_batches
                .iter()
                .map(|&b| (format!("{name}_b{b}_{kn}"), b, false))
                .collect();
            shapes.push((format!("{name}_starved_{kn}"), 2, true));
            for (case, b, starve) in shapes {
                ok &= check_case(args, device, &case, &cfg, compute, b, t, starve)?;
            }
        }
    }
    Ok(ok)
}

#[allow(clippy::too_many_arguments)]
fn check_case(
    args: &KernelsArgs,
    device: Device,
    case: &str,
    cfg: &ModelConfig,
    compute: Kind,
    b: i64,
    t: i64,
    starve: bool,
) -> Result<bool> {
    let d = cfg.hidden_size as i64;
    let (m, names) = layer(cfg, device);
    let x = Tensor::randn([b, t, d], (Kind::Float, device));
    let last = m.experts.len() as i64 - 1;
    if starve {
        // Every token leans on feature 0 and the last expert's router row is -e_0: its logit,
        // -4, sits far below the others' (~N(0, 0.5)), so no token is routed to it.
        let _ = x.narrow(2, 0, 1).fill_(4.0);
        tch::no_grad(|| {
            let row = m.gate.get(last);
            let _ = row.shallow_clone().zero_();
            let _ = row.get(0).fill_(-1.0);
        });
    }
    let x = x.set_requires_grad(true);
    let gy = Tensor::randn([b, t, d], (Kind::Float, device));
    let leaves = params(&m);
    let grouped = with_experts(args.kernels, MoeExperts::Grouped, MoeRecompute::Off);
    let grouped_sw = with_experts(args.kernels, MoeExperts::Grouped, MoeRecompute::Swiglu);
    let grouped_gu = with_experts(args.kernels, MoeExperts::Grouped, MoeRecompute::GateUp);
    let looped = with_experts(args.kernels, MoeExperts::Loop, MoeRecompute::Off);
    let probe = x.detach().to_kind(compute);
    if !grouped.moe_grouped_applies(&probe, compute, d, m.width()) {
        println!("{case:<10} skipped: the grouped path does not apply here");
        return Ok(true);
    }
    // The grouped layer with each --moe-recompute (the experts as one node for swiglu and
    // gate-up, where the grouped path applies).
    let node = grouped_sw.moe_node_applies(&probe, compute, d, m.width());
    let (yl, auxl, gl) = fwd_bwd(&m, &x, &gy, compute, &looped, &leaves);
    let auxl = scalar(auxl);
    let tol = tolerance(compute);
    let mut ok = true;
    let runs: &[(&str, &Kernels)] = if node {
        &[
            ("", &grouped),
            ("swiglu ", &grouped_sw),
            ("gate-up ", &grouped_gu),
        ]
    } else {
        &[("", &grouped)]
    };
    for &(tag, kg) in runs {
        let (yg, auxg, gg) = fwd_bwd(&m, &x, &gy, compute, kg, &leaves);
        ok &= report(case, &format!("{tag}y"), &diff(&yg, &yl), tol);
        ok &= report_loss(case, &format!("{tag}aux"), scalar(auxg), auxl, 1e-6);
        ok &= report(case, &format!("{tag}dx"), &diff(&gg[0], &gl[0]), tol);
        ok &= report(case, &format!("{tag}dgate"), &diff(&gg[1], &gl[1]), tol);
        ok &= report_grads(
            case,
            &format!("{tag}experts: "),
            &worst_grad(&names[1..], &gg[2..], &gl[2..]),
            tol,
        );
        if starve {
            let e = last as usize;
            let zero = gg[2 + 3 * e..5 + 3 * e]
                .iter()
                .all(|g| scalar(g.abs().max().to_kind(Kind::Double)) == 0.0);
            println!(
                "{case:<10} {tag}expert {last} got no token: its gradients {}",
                if zero {
                    "are zero  ok"
                } else {
                    "are NOT zero  FAIL"
                }
            );
            ok &= zero;
        }
    }
    drop(gl);

    // Timing: the loop, grouped stacking per call, grouped on pre-stacked leaves.
    let xs_like = probe.reshape([-1, d]);
    let pre = m.stacked(compute, &xs_like, &grouped).as_leaves();
    let mut pre_leaves = vec![x.shallow_clone(), m.gate.shallow_clone()];
    pre_leaves.extend(pre.tensors());
    for s in &m.shared_experts {
        pre_leaves.extend(s.parameters().iter().map(|p| p.shallow_clone()));
    }
    let timed = |what: &str, f: &mut dyn FnMut()| -> Result<f64> {
        reset_peak(device);
        let ms = time_ms(device, args.warmup, args.iters, || {
            f();
            Ok(())
        })?;
        let peak = if device.is_cuda() {
            format!("  peak {:.2} GiB", peak_gib(device))
        } else {
            String::new()
        };
        println!("{case:<10} {what:<22} {ms:.3} ms{peak}");
        Ok(ms)
    };
    let tl = timed("fwd+bwd loop", &mut || {
        let _ = fwd_bwd(&m, &x, &gy, compute, &looped, &leaves);
    })?;
    let mut tg = f64::NAN;
    for &(tag, kg) in runs {
        let what = match tag.trim() {
            "" => "fwd+bwd grouped".to_string(),
            mode => format!("fwd+bwd grouped, recompute {mode}"),
        };
        let ms = timed(&what, &mut || {
            let _ = fwd_bwd(&m, &x, &gy, compute, kg, &leaves);
        })?;
        if tag.is_empty() {
            tg = ms;
        }
    }
    let tp = timed("fwd+bwd grouped, pre-stacked", &mut || {
        let (y, aux) = m.forward_with(&x, compute, &grouped, Some(&pre));
        let s = (&y * &gy).sum(Kind::Float) + aux.to_kind(Kind::Float);
        let _ = Tensor::run_backward(&[s], &pre_leaves, false, false);
    })?;
    println!(
        "{case:<10} grouped {tg:.3} ms  loop {tl:.3} ms  speedup {:.2}x  (stacking per call costs {:.3} ms; B {b}, T {t}, d {d}, F {})",
        tl / tg,
        tg - tp,
        m.width()
    );
    Ok(ok)
}

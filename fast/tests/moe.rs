//! MoE's grouped experts (`--moe-experts grouped`: `torch._grouped_mm` over the tokens sorted by
//! expert), with each `--moe-recompute` (`off`: autograd; `swiglu`, `gate-up`: the experts as one
//! node), compute what the per-expert loop computes, on the CPU, for MiniMind2's MoE (top-2
//! renormalised, a shared expert, seq aux) and MiniMind-3's (top-1, its aux), including an
//! expert that gets no token, in fp32 and bf16 compute; and the training step with any path
//! gives the same loss and gradients. The autograd nodes of our own (the router's, the experts',
//! and the dispatch's and combine's gathers) are checked against the ops they stand for, exactly.
//! The grouped path and the loop share the dispatch and the combine; the golden fixtures
//! (`verify`, `tests/fast_golden.rs`) check those against MiniMind's own numbers.
//!
//! Tolerances (every path shares the router, so they route every token alike):
//! - fp32: max |grouped - loop| <= 1e-6 * max |loop| per tensor. The same per-expert products of
//!   the same fp32 operands; libtorch may block a GEMM differently for another row count or for
//!   gate and up merged into one matmul (the node's layout), which reorders a sum of d..F
//!   products: a few fp32 ulps (6e-8) of the largest term. (Measured: 0 with `off`, at most
//!   3.0e-7 with the node, in the input's gradient.)
//! - bf16: ||grouped - loop|| / ||loop|| <= 1e-2, the bf16 tolerance of `fast kernels`: an
//!   element rounded differently once is off by a bf16 ulp (3.9e-3 relative), norm-wise far less;
//!   with the node the router's weight gradient also comes from the bf16 rows. (Measured: at
//!   most 1.1e-3 with `off`, 2.9e-3 with the node.)
//! - The aux loss: the same router ops on the same input in every path: exactly equal.
mod common;

use fast::kernels::{KernelConfig, Kernels, MoeExperts, MoeRecompute};
use fast::model::precision::Precision;
use fast::model::{Mlp, ModelConfig, MoeFeedForward, MoeRouting};
use fast::train::trainer::{Trainer, TrainerConfig};
use tch::{Device, Kind, Tensor};

fn minimind2_moe(d: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: d,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 64,
        intermediate_size: Some(48),
        use_moe: true,
        ..ModelConfig::default()
    }
}

fn minimind3_moe(d: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: d,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 64,
        moe_intermediate_size: Some(40),
        use_moe: true,
        ..ModelConfig::minimind3()
    }
}

fn kernels(e: MoeExperts) -> Kernels {
    kernels_with(e, MoeRecompute::Off)
}

fn kernels_with(e: MoeExperts, r: MoeRecompute) -> Kernels {
    Kernels::new(KernelConfig {
        moe_experts: e,
        moe_recompute: r,
        ..KernelConfig::default()
    })
}

/// The grouped path in each `--moe-recompute` mode, and the loop.
const PATHS: [(MoeExperts, MoeRecompute); 4] = [
    (MoeExperts::Grouped, MoeRecompute::Off),
    (MoeExperts::Grouped, MoeRecompute::Swiglu),
    (MoeExperts::Grouped, MoeRecompute::GateUp),
    (MoeExperts::Loop, MoeRecompute::Off),
];

/// A layer of `cfg` with N(0, 0.1) fp32 weights requiring grad; with `starve`, the last expert's
/// router row is -e_0 (paired with inputs whose feature 0 is 4, it never makes the top k).
fn layer(cfg: &ModelConfig, starve: bool) -> MoeFeedForward {
    let (d, f) = (cfg.hidden_size as i64, cfg.expert_width() as i64);
    let w = |o: i64, i: i64| Tensor::randn([o, i], (Kind::Float, Device::Cpu)) * 0.1;
    let mlp = || Mlp {
        gate_proj: w(f, d).set_requires_grad(true),
        up_proj: w(f, d).set_requires_grad(true),
        down_proj: w(d, f).set_requires_grad(true),
    };
    let e = cfg.routed_experts() as i64;
    let gate = w(e, d);
    if starve {
        let row = gate.get(e - 1);
        let _ = row.shallow_clone().zero_();
        let _ = row.get(0).fill_(-1.0);
    }
    MoeFeedForward {
        gate: gate.set_requires_grad(true),
        experts: (0..e).map(|_| mlp()).collect(),
        shared_experts: (0..cfg.shared_experts()).map(|_| mlp()).collect(),
        top_k: cfg.num_experts_per_tok as i64,
        routing: MoeRouting::of(cfg),
    }
}

fn leaves(m: &MoeFeedForward) -> Vec<Tensor> {
    let mut v = vec![m.gate.shallow_clone()];
    for e in m.experts.iter().chain(&m.shared_experts) {
        v.extend(e.parameters().iter().map(|p| p.shallow_clone()));
    }
    v
}

/// y, aux and the gradients of [x, router, experts..., shared...] (undefined as zeros) of
/// `sum(y * gy) + aux`.
fn run(
    m: &MoeFeedForward,
    x: &Tensor,
    gy: &Tensor,
    compute: Kind,
    k: &Kernels,
) -> (Tensor, f64, Vec<Tensor>) {
    let (y, aux) = m.forward(x, compute, k);
    let s = (&y * gy).sum(Kind::Float) + &aux;
    let mut all = vec![x.shallow_clone()];
    all.extend(leaves(m));
    let g = Tensor::run_backward(&[s], &all, false, false)
        .into_iter()
        .zip(&all)
        .map(|(g, p)| if g.defined() { g } else { p.zeros_like() })
        .collect();
    (y.detach(), f64::try_from(&aux).unwrap(), g)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let scale = f64::try_from(b.abs().max()).unwrap().max(f64::MIN_POSITIVE);
    f64::try_from((a - &b).abs().max()).unwrap() / scale
}

fn norm_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let scale = f64::try_from(b.norm()).unwrap().max(f64::MIN_POSITIVE);
    f64::try_from((a - &b).norm()).unwrap() / scale
}

#[test]
fn grouped_experts_equal_the_loop_on_the_cpu() {
    tch::manual_seed(7);
    for (name, cfg) in [
        ("minimind2", minimind2_moe(32)),
        ("minimind3", minimind3_moe(24)),
    ] {
        for (compute, tol) in [(Kind::Float, 1e-6), (Kind::BFloat16, 1e-2)] {
            for starve in [false, true] {
                let m = layer(&cfg, starve);
                let d = cfg.hidden_size as i64;
                let x = Tensor::randn([3, 7, d], (Kind::Float, Device::Cpu));
                if starve {
                    let _ = x.narrow(2, 0, 1).fill_(4.0);
                }
                let x = x.set_requires_grad(true);
                let gy = Tensor::randn([3, 7, d], (Kind::Float, Device::Cpu));
                assert!(kernels(MoeExperts::Grouped).moe_grouped_applies(
                    &x,
                    compute,
                    d,
                    m.width()
                ));
                let looped = kernels(MoeExperts::Loop);
                let (yl, auxl, gl) = run(&m, &x, &gy, compute, &looped);
                for (e, r) in &PATHS[..3] {
                    let (yg, auxg, gg) = run(&m, &x, &gy, compute, &kernels_with(*e, *r));
                    let what = format!("{name} {compute:?} starve {starve} --moe-recompute {r:?}");
                    assert_eq!(auxg, auxl, "{what}: aux");
                    let err = |a: &Tensor, b: &Tensor| {
                        if compute == Kind::Float {
                            max_rel(a, b)
                        } else {
                            norm_rel(a, b)
                        }
                    };
                    let mut worst = ("y".to_string(), err(&yg, &yl));
                    for (i, (a, b)) in gg.iter().zip(&gl).enumerate() {
                        let e = err(a, b);
                        if e > worst.1 || e.is_nan() {
                            worst = (format!("gradient {i}"), e);
                        }
                    }
                    println!("{what}: worst {} {:.3e} (tol {tol:e})", worst.0, worst.1);
                    assert!(
                        worst.1 <= tol,
                        "{what}: {} differs by {:e}",
                        worst.0,
                        worst.1
                    );
                    if starve {
                        // [x, router, then 3 per expert]: the last expert's gradients are exactly 0.
                        let e = m.experts.len() - 1;
                        for g in &gg[2 + 3 * e..5 + 3 * e] {
                            assert_eq!(f64::try_from(g.abs().max()).unwrap(), 0.0, "{what}");
                        }
                    }
                }
            }
        }
    }
}

/// The training step (`Trainer::micro_step`, the model's own MoE layers, chunked lm_head) with
/// the experts grouped (each `--moe-recompute`) and looped: same loss, same gradient for every
/// parameter. fp32: loss 1e-6 relative; gradients max-relative 1e-5, ten times the layer bound,
/// since one layer's round-off reaches every layer below (measured at most 3.5e-7; verify holds
/// fp32 gradients to 1e-4). bf16 mixed precision: the loss 1e-2 and gradients 5e-2 norm-wise,
/// verify's bf16 bounds (two bf16 runs that round in different places drift apart through the
/// layers; measured at most 6.7e-3, the node's router gradient from bf16 rows included).
#[test]
fn a_training_step_is_the_same_with_grouped_and_looped_experts() {
    for cfg in [minimind2_moe(32), minimind3_moe(24)] {
        for (precision, loss_tol, grad_tol) in
            [(Precision::Fp32, 1e-6, 1e-5), (Precision::Bf16, 1e-2, 5e-2)]
        {
            let tc = TrainerConfig {
                precision,
                seed: 3,
                ..Default::default()
            };
            let mut tr = Trainer::new(&cfg, tc).unwrap();
            let ids = Tensor::randint(64, [4, 9], (Kind::Int64, Device::Cpu));
            let mut step = |(e, r): (MoeExperts, MoeRecompute)| {
                tr.set_kernels(KernelConfig {
                    moe_experts: e,
                    moe_recompute: r,
                    ..KernelConfig::default()
                });
                tr.zero_grad().unwrap();
                let out = tr.micro_step(&ids, &ids, 1.0).unwrap();
                let grads: Vec<Tensor> = tr.grads().iter().map(|g| g.copy()).collect();
                (f64::try_from(&out.loss).unwrap(), grads)
            };
            let (ll, gl) = step(PATHS[3]);
            for path in &PATHS[..3] {
                let (lg, gg) = step(*path);
                let rel = (lg - ll).abs() / ll.abs();
                let worst = gg
                    .iter()
                    .zip(&gl)
                    .map(|(a, b)| {
                        if precision == Precision::Fp32 {
                            max_rel(a, b)
                        } else {
                            norm_rel(a, b)
                        }
                    })
                    .fold(0.0f64, f64::max);
                println!(
                    "{:?} {precision:?} {path:?}: loss rel {rel:.3e}, worst grad {worst:.3e}",
                    cfg.architecture
                );
                assert!(rel <= loss_tol, "{path:?}: loss {lg} vs {ll}");
                assert!(worst <= grad_tol, "{path:?}: gradients differ by {worst:e}");
            }
        }
    }
}

/// `fast kernels --only moe` runs on the CPU: both variants, both kinds, every `--moe-recompute`
/// mode, the starved expert, every comparison within its tolerance, and the timings printed.
#[test]
fn fast_kernels_checks_the_grouped_experts_on_the_cpu() {
    let out = common::fast()
        .args([
            "kernels",
            "--device",
            "cpu",
            "--only",
            "moe",
            "--moe-batches",
            "2",
            "--moe-seq",
            "8",
            "--moe-hidden",
            "32",
            "--iters",
            "1",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in ["moe2", "moe3"] {
        for k in ["bf16", "fp32"] {
            for mode in ["", "swiglu ", "gate-up "] {
                for what in ["y", "aux", "dx", "dgate"] {
                    let line = format!("{v}_b2_{k} {mode}{what}");
                    assert!(stdout.contains(&line), "no `{line}` in:\n{stdout}");
                }
                let line = format!("{v}_b2_{k} grads    {mode}experts: ");
                assert!(stdout.contains(&line), "no `{line}` in:\n{stdout}");
                assert!(stdout.contains(&format!(
                    "{v}_starved_{k} {mode}expert 3 got no token: its gradients are zero  ok"
                )));
            }
            assert!(stdout.contains(&format!("{v}_b2_{k} fwd+bwd grouped, recompute gate-up")));
            assert!(stdout.contains(&format!("{v}_b2_{k} grouped ")), "{stdout}");
        }
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(
        stdout.contains("fast kernels: all checks passed"),
        "{stdout}"
    );
}

/// The router's node on the fused path (`ops::linear_saving_rounded`), on the CPU where it runs
/// the same libtorch ops: its output and input gradient are those of the plain fp32 linear bit
/// for bit, its weight gradient that of the fp32 linear applied to the bf16-rounded rows, and the
/// rounded rows get no gradient from it. Exact equality: the node calls the same matmuls autograd
/// calls for `linear`, on the same operands.
#[test]
fn the_router_node_keeps_bf16_rows_and_computes_autograds_numbers() {
    use fast::kernels::ops::linear_saving_rounded;
    tch::manual_seed(5);
    let (n, d, e) = (37, 24, 4);
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w = (Tensor::randn([e, d], (Kind::Float, Device::Cpu)) * 0.1).set_requires_grad(true);
    let rounded = x.to_kind(Kind::BFloat16);
    let gy = Tensor::randn([n, e], (Kind::Float, Device::Cpu));
    let grads = |y: &Tensor, wrt: &[&Tensor]| {
        let wrt: Vec<Tensor> = wrt.iter().map(|t| t.shallow_clone()).collect();
        Tensor::run_backward(&[(y * &gy).sum(Kind::Float)], &wrt, true, false)
    };

    let y = linear_saving_rounded(&x, &rounded, &w).unwrap();
    let g = grads(&y, &[&x, &w, &rounded]);
    let plain = x.linear::<Tensor>(&w, None);
    let gp = grads(&plain, &[&x]);
    let from_rounded = rounded.to_kind(Kind::Float).linear::<Tensor>(&w, None);
    let gr = grads(&from_rounded, &[&w]);

    assert!(y.equal(&plain), "forward differs from x w^T");
    assert!(g[0].equal(&gp[0]), "dx differs from the plain linear's");
    assert!(
        g[1].equal(&gr[0]),
        "dw differs from the linear's on the bf16 rows"
    );
    assert!(
        !g[1].equal(&grads(&plain, &[&w])[0]),
        "the test cannot tell the two dw apart"
    );
    assert!(!g[2].defined(), "the rounded rows got a gradient");

    let err = linear_saving_rounded(&x, &rounded.narrow(0, 0, 5), &w).unwrap_err();
    assert!(format!("{err:#}").contains("rounded [5, 24]"), "{err:#}");
}

/// The experts node (fast/csrc/grouped_experts.h, here with SwiGLU as libtorch's ops: the same
/// template our CUDA kernels instantiate) against the same ops under autograd: gather,
/// `_grouped_mm` against `[gate_e; up_e]`, `silu(g) * u`, `_grouped_mm` against `down_e`. Both
/// `--moe-recompute` modes, fp32 and bf16, top-2 (a token's two slots add into one row of dx)
/// and an expert without rows. Exact equality: the node's backward calls the functions
/// autograd calls for these ops (`silu_backward`, `_grouped_mm` on the transposed operands), in
/// the same kinds; libtorch's CPU grouped matmul runs one matmul per group, and a transposed
/// product sums over the same rows in the same order. dx sums a token's two slot rows in one
/// reduction where `index_select`'s backward adds them one after the other into zeros: one
/// rounding of the same sum either way.
#[test]
fn the_experts_node_computes_autograds_numbers_in_both_recompute_modes() {
    use fast::kernels::ops::grouped_experts;
    tch::manual_seed(11);
    let (n, k, d, f) = (13_i64, 2_i64, 16_i64, 24_i64);
    let cpu = Device::Cpu;
    // Slots sorted by expert; expert 1 gets none.
    let counts = [9_i64, 0, 11, 6];
    let offs = Tensor::from_slice(&counts).cumsum(0, Kind::Int);
    // A dispatch: sorted row p holds pair order[p] = t k + s; slot is its inverse.
    let (token, slot) = random_dispatch(n, k);
    for kind in [Kind::Float, Kind::BFloat16] {
        let leaf = |shape: &[i64], scale: f64| {
            (Tensor::randn(shape, (Kind::Float, cpu)) * scale)
                .to_kind(kind)
                .set_requires_grad(true)
        };
        let x = leaf(&[n, d], 1.0);
        let gate_up = leaf(&[4, 2 * f, d], 0.2);
        let down = leaf(&[4, d, f], 0.2);
        let gy = Tensor::randn([n * k, d], (Kind::Float, cpu)).to_kind(kind);
        let grads = |y: &Tensor| {
            Tensor::run_backward(
                &[(y.to_kind(Kind::Float) * gy.to_kind(Kind::Float)).sum(Kind::Float)],
                &[&x, &gate_up, &down],
                false,
                false,
            )
        };
        let xs = x.index_select(0, &token);
        let gu =
            xs.internal_grouped_mm(&gate_up.transpose(1, 2), Some(&offs), None::<&Tensor>, None);
        let h = gu.narrow(-1, 0, f).silu() * gu.narrow(-1, f, f);
        let y_ref =
            h.internal_grouped_mm(&down.transpose(1, 2), Some(&offs), None::<&Tensor>, None);
        let g_ref = grads(&y_ref);
        for recompute_gate_up in [false, true] {
            let y = grouped_experts(&x, &token, &slot, &gate_up, &down, &offs, recompute_gate_up)
                .unwrap();
            let g = grads(&y);
            let what = format!("{kind:?} recompute_gate_up {recompute_gate_up}");
            assert!(y.equal(&y_ref), "{what}: y");
            for (i, name) in ["dx", "dgate_up", "ddown"].iter().enumerate() {
                assert!(
                    g[i].equal(&g_ref[i]),
                    "{what}: {name} differs by {:e}",
                    max_rel(&g[i], &g_ref[i])
                );
            }
            let empty = g[1].get(1).abs().max().to_kind(Kind::Double);
            assert_eq!(
                f64::try_from(empty).unwrap(),
                0.0,
                "{what}: expert 1 had no rows"
            );
        }
    }
    // Inputs that do not fit are refused with their shapes, not a crash.
    let x = Tensor::zeros([n, d], (Kind::Float, cpu));
    let gu = Tensor::zeros([4, 2 * f, d + 1], (Kind::Float, cpu));
    let down = Tensor::zeros([4, d, f], (Kind::Float, cpu));
    let err = grouped_experts(&x, &token, &slot, &gu, &down, &offs, false).unwrap_err();
    assert!(format!("{err:#}").contains("shapes disagree"), "{err:#}");
    let err = grouped_experts(
        &x,
        &token,
        &slot.narrow(0, 0, 3),
        &gate_up_like(&down, f),
        &down,
        &offs,
        false,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("token and slot"), "{err:#}");
}

fn gate_up_like(down: &Tensor, f: i64) -> Tensor {
    let (e, d) = (down.size()[0], down.size()[1]);
    Tensor::zeros([e, 2 * f, d], (down.kind(), down.device()))
}

/// token `[n k]` and slot `[n k]` of a random dispatch of n tokens' k slots: sorted row p holds
/// pair `order[p] = t k + s` (token `order[p] / k`), and `slot[order[p]] = p`.
fn random_dispatch(n: i64, k: i64) -> (Tensor, Tensor) {
    let order = Tensor::randperm(n * k, (Kind::Int64, Device::Cpu));
    let slot = order.zeros_like().scatter(
        0,
        &order,
        &Tensor::arange(n * k, (Kind::Int64, Device::Cpu)),
    );
    (order.divide_scalar_mode(k, "floor"), slot)
}

/// MoE's dispatch and combine nodes (`ops::slot_rows`, `ops::permute_rows`) against
/// `index_select` under autograd: the same rows forward; backward, exactly the same gradients
/// for one and two slots a token (one rounding of the same sum), fp32 and bf16. Wrong shapes
/// are refused with a message.
#[test]
fn the_dispatch_and_combine_nodes_compute_index_selects_numbers() {
    use fast::kernels::ops::{permute_rows, slot_rows};
    tch::manual_seed(5);
    let (n, d) = (11_i64, 8_i64);
    for k in [1_i64, 2] {
        let (token, slot) = random_dispatch(n, k);
        let order = Tensor::argsort(&slot, 0, false);
        for kind in [Kind::Float, Kind::BFloat16] {
            let what = format!("k {k} {kind:?}");
            let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu))
                .to_kind(kind)
                .set_requires_grad(true);
            let gy = Tensor::randn([n * k, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            // The gradient of sum(y * gy) with respect to `leaf`.
            let grad = |y: &Tensor, leaf: &Tensor| {
                Tensor::run_backward(&[(y * &gy).sum(kind)], &[leaf], false, false).remove(0)
            };
            let y = slot_rows(&x, &token, &slot).unwrap();
            let y_ref = x.index_select(0, &token);
            assert!(y.equal(&y_ref), "{what}: slot_rows forward");
            assert!(
                grad(&y, &x).equal(&grad(&y_ref, &x)),
                "{what}: slot_rows backward"
            );

            let xs = Tensor::randn([n * k, d], (Kind::Float, Device::Cpu))
                .to_kind(kind)
                .set_requires_grad(true);
            let p = permute_rows(&xs, &slot, &order).unwrap();
            let p_ref = xs.index_select(0, &slot);
            assert!(p.equal(&p_ref), "{what}: permute_rows forward");
            assert!(
                grad(&p, &xs).equal(&grad(&p_ref, &xs)),
                "{what}: permute_rows backward"
            );
        }
    }
    let x = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
    let idx = Tensor::zeros([6], (Kind::Int64, Device::Cpu));
    let err = slot_rows(&x, &idx, &idx.narrow(0, 0, 5)).unwrap_err();
    assert!(format!("{err:#}").contains("slot_rows"), "{err:#}");
    let err = permute_rows(&x, &idx, &idx).unwrap_err();
    assert!(format!("{err:#}").contains("permute_rows"), "{err:#}");
}

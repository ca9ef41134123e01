//! The whole model and the training step with the fused path off and on, in one process.

use anyhow::Result;
use tch::{nn::VarStore, Device, Kind, Tensor};

use super::{
    cuda_index, diff, peak_gib, report, report_grads, report_loss, reset_peak, scalar, time_ms,
    worst_grad, KernelsArgs, SEQ,
};
use crate::kernels::{CrossEntropyChoice, KernelChoice, KernelConfig, Kernels};
use crate::model::precision::Precision;
use crate::model::{named_parameters, MiniMindForCausalLM, ModelConfig};
use crate::train::trainer::{Trainer, TrainerConfig};

/// The command's kernel choice with our kernels on or off and, with them, the fused
/// cross-entropy or libtorch's.
fn choice(base: KernelConfig, kernels: bool, ce: bool) -> KernelConfig {
    KernelConfig {
        kernels: if kernels {
            KernelChoice::Fused
        } else {
            KernelChoice::Libtorch
        },
        cross_entropy: if ce {
            CrossEntropyChoice::Fused
        } else {
            CrossEntropyChoice::Autograd
        },
        ..base
    }
}

/// The 26M model's forward + backward with the fused path off, then on: same weights, same
/// tokens.
pub(super) fn check_model(args: &KernelsArgs, device: Device) -> Result<bool> {
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
    let mut step = |on: bool| -> (Tensor, Tensor, Vec<Tensor>) {
        model.kernels = Kernels::new(choice(args.kernels, on, true));
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
    let mut timed = |on: bool| {
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

/// One micro-step from zeroed gradients, the fused kernels and the fused cross-entropy each on
/// or off: (loss, copies of every parameter gradient).
fn micro_step_with(
    base: KernelConfig,
    tr: &mut Trainer,
    ids: &Tensor,
    labels: &Tensor,
    kernels: bool,
    ce: bool,
) -> Result<(f64, Vec<Tensor>)> {
    tr.set_kernels(choice(base, kernels, ce));
    tr.zero_grad()?;
    let out = tr.micro_step(ids, labels, 1.0)?;
    let grads = tr.grads().iter().map(|g| g.copy()).collect();
    Ok((scalar(out.loss), grads))
}

/// The training step, `Trainer::micro_step` at bf16 (26M model, chunked lm_head, ~10% of the
/// labels ignored), on one set of weights and one batch: unfused; fused kernels with autograd's
/// cross-entropy; fully fused. The fused cross-entropy is held to the model tolerances against
/// both; the run-to-run noise of the unfused cross-entropy (attention's backward is not
/// bitwise deterministic) is printed beside.
pub(super) fn check_step(args: &KernelsArgs, device: Device) -> Result<bool> {
    let cfg = ModelConfig::minimind_26m();
    let (b, t) = ((args.rows / SEQ).max(1), SEQ);
    let tc = TrainerConfig {
        precision: Precision::Bf16,
        device,
        seed: args.seed + 2,
        ..Default::default()
    };
    let mut tr = Trainer::new(&cfg, tc)?;
    let names: Vec<String> = tr
        .named_parameters()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let v = cfg.vocab_size as i64;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, device));
    let ignored = Tensor::rand([b, t], (Kind::Float, device)).lt(0.1);
    let labels = ids.masked_fill(&ignored, crate::model::loss::IGNORE_INDEX);
    let (loss_u, g_u) = micro_step_with(args.kernels, &mut tr, &ids, &labels, false, false)?;
    let (loss_k, g_k) = micro_step_with(args.kernels, &mut tr, &ids, &labels, true, false)?;
    let (loss_k2, g_k2) = micro_step_with(args.kernels, &mut tr, &ids, &labels, true, false)?;
    let (loss_f, g_f) = micro_step_with(args.kernels, &mut tr, &ids, &labels, true, true)?;
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
        tr.set_kernels(choice(args.kernels, kernels, ce));
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
    tr.zero_grad()?;
    Ok(ok)
}

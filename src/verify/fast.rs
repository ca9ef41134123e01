//! Every golden check on the fast (libtorch) path, as report rows.
//!
//! The fixture's float64 weights are loaded into a fast `Trainer` of the requested precision and
//! device; its outputs are converted back to f64 and compared with MiniMind's float64 numbers.
//!
//! Tolerances (per precision; the error measure is named in each row's tolerance set):
//! - fp32 (eps 6e-8): max error relative to the expected tensor's largest magnitude. Inputs are
//!   rounded to fp32 (3e-8 relative), a forward is a few hundred dependent roundings, so logits,
//!   losses sit near 1e-7..1e-6; we allow 1e-5. Gradients go through twice the chain and sum over
//!   B*T rows: 1e-4. One AdamW step at t = 1 moves a weight by lr * g / (|g| + eps), whose
//!   sensitivity to g is up to lr / eps = 5e4: an element whose gradient is ~1e-8 and off by
//!   fp32's ~1e-10 moves up to 5e-6 differently, 5e-5 of max |w| ~ 0.1. So after-step and
//!   trajectory weights get 1e-3. (fp64 runs pin the update formula itself to 2e-10.)
//! - bf16 (8-bit mantissa, eps 3.9e-3): norm-wise relative error ||a - e|| / ||e||, since single
//!   elements of a bf16 matmul can be off by a few eps while the tensor as a whole is off by
//!   about one. Logits 2e-2 (a handful of bf16 roundings on the way), losses 1e-2 (fp32 loss of
//!   bf16 logits averages errors out), gradients 5e-2 (backward matmuls in bf16 too), after-step
//!   weights 5e-3 (the t = 1 Adam update is about lr * sign(g) = 5e-4 on weights of norm-wise
//!   scale 0.02..1; gradients that bf16 gets wrong by more than their size flip sign and move
//!   their element by 2 lr), trajectory weights 1e-2 (four such steps).
//! - fp64: float64 round-off (1e-10 forward, 1e-9 gradients and steps). libtorch's CPU kernels
//!   reproduce the PyTorch fixtures bit for bit here (RMSNorm's fp32 cast and fp32 RoPE tables
//!   included), so forward and gradients show 0 error; fused AdamW's order of operations differs
//!   from torch's for-each AdamW by ~1e-10.
//! Schedule, samplers, rescale, scaler scale and flags are exact.

use std::path::Path;

use anyhow::{bail, Result};
use fast::model::loss::Objective;
use fast::model::precision::{parse_device, Precision};
use fast::train::trainer::{Trainer, TrainerConfig};
use tch::{Device, Kind, Tensor};

use crate::convert::{fast_config, from_named, scalar, to_array, to_named, to_tensor_i64};
use crate::fixtures::{self, Components, ModelFixture, RecipeComponents, TrainFixture};
use crate::report::{compare, named_rows, worst_per_group, Row};

/// Tolerances of one precision; `normwise` selects ||a-e||/||e|| instead of max-relative.
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    pub normwise: bool,
    pub logits: f64,
    pub loss: f64,
    pub grad: f64,
    pub step: f64,
    pub trajectory_loss: f64,
    pub trajectory_weights: f64,
}

/// The tolerances of `p` on `device`. fp64 on CUDA gets fp32's: its RMSNorm runs in fp32 (as
/// MiniMind's does), and CUDA's fp32 rsqrt/mean round differently from the CPU kernels the
/// fixtures were made with (~2e-7 relative on logits).
pub fn tolerances_on(p: Precision, device: Device) -> Tolerances {
    match (p, device) {
        (Precision::Fp64, Device::Cuda(_)) => tolerances(Precision::Fp32),
        _ => tolerances(p),
    }
}

pub fn tolerances(p: Precision) -> Tolerances {
    match p {
        Precision::Fp64 => Tolerances {
            normwise: false,
            logits: 1e-10,
            loss: 1e-10,
            grad: 1e-9,
            step: 1e-9,
            trajectory_loss: 1e-10,
            trajectory_weights: 1e-8,
        },
        Precision::Fp32 => Tolerances {
            normwise: false,
            logits: 1e-5,
            loss: 1e-5,
            grad: 1e-4,
            step: 1e-3,
            trajectory_loss: 1e-5,
            trajectory_weights: 1e-3,
        },
        Precision::Bf16 | Precision::Fp16 => Tolerances {
            normwise: true,
            logits: 2e-2,
            loss: 1e-2,
            grad: 5e-2,
            step: 5e-3,
            trajectory_loss: 1e-2,
            trajectory_weights: 1e-2,
        },
    }
}

/// A trainer of `precision` on `device` holding `params`.
pub fn trainer(
    cfg: &reference::ModelConfig,
    params: &reference::Params,
    adamw: fast::optim::adamw::AdamWConfig,
    precision: Precision,
    device: Device,
) -> Result<Trainer> {
    let tc = TrainerConfig {
        precision,
        device,
        adamw,
        ..Default::default()
    };
    Trainer::from_named(&fast_config(cfg), tc, to_named(params), "fixture params")
}

pub fn adamw_config(a: &fixtures::AdamWJson) -> fast::optim::adamw::AdamWConfig {
    fast::optim::adamw::AdamWConfig {
        betas: a.betas,
        eps: a.eps,
        weight_decay: a.weight_decay,
    }
}

/// Forward, losses, every gradient, grad norm, weights after clip + one AdamW step.
pub fn check_model(fx: &ModelFixture, precision: Precision, device: Device) -> Result<Vec<Row>> {
    check_model_with(fx, precision, device, tolerances_on(precision, device))
}

/// [`check_model`] under given tolerances.
pub fn check_model_with(
    fx: &ModelFixture,
    precision: Precision,
    device: Device,
    tol: Tolerances,
) -> Result<Vec<Row>> {
    let name = fx.name.as_str();
    let nw = tol.normwise;
    let objective = if fx.run.masked_lm {
        Objective::MaskedLm
    } else {
        Objective::CausalLm
    };
    let tc = TrainerConfig {
        precision,
        device,
        adamw: adamw_config(&fx.adamw),
        objective,
        ..Default::default()
    };
    let mut tr = Trainer::from_named(
        &fast_config(&fx.config),
        tc,
        to_named(&fx.params),
        "fixture params",
    )?;
    let ids = to_tensor_i64(&fx.input_ids).to_device(device);
    let labels = to_tensor_i64(&fx.labels).to_device(device);
    let (b, t) = fx.input_ids.dim();
    let seg = fx.run.seg_start(t).map(|v| {
        Tensor::from_slice(&v)
            .reshape([b as i64, t as i64])
            .to_device(device)
    });
    let logits = tch::no_grad(|| -> Result<Tensor> {
        let m = tr.model();
        let (h, _) = m.forward_hidden_with(&ids, seg.as_ref(), &|_, _| Ok(()))?;
        Ok(m.lm_head(&h))
    })?;
    let one = Tensor::ones(
        [],
        (fast::model::upcast_kind(precision.param_kind()), device),
    );
    let out = tr.micro_step_on(&ids, &labels, seg.as_ref(), &one)?;
    let mut rows = vec![
        compare(
            name,
            "logits",
            &to_array(&logits),
            &fx.logits,
            tol.logits,
            nw,
        ),
        Row::scalar(name, "loss.ce", scalar(&out.ce), fx.ce_loss, tol.loss),
        // aux ~ alpha = 0.01 scale: compare relative to itself, absolute when it is 0 (dense).
        Row::scalar(name, "loss.aux", scalar(&out.aux), fx.aux_loss, tol.loss),
        Row::scalar(
            name,
            "loss.total",
            scalar(&out.loss),
            fx.total_loss,
            tol.loss,
        ),
    ];
    let mut grads = from_named(&tr.named_grads_f64());
    if let Some(s) = tr.scaler() {
        // fp16: .grad holds d(scale * loss); compare the unscaled gradient.
        let inv = 1.0 / s.scale_value();
        grads.values_mut().for_each(|g| *g *= inv);
    }
    rows.extend(named_rows(name, "grad.", &grads, &fx.grads, tol.grad, nw));
    let norm = tr.optimizer_step(fx.adamw.lr, fx.clip)?;
    rows.push(Row::scalar(
        name,
        "grad_norm_before_clip",
        scalar(&norm),
        fx.grad_total_norm_before_clip,
        tol.grad,
    ));
    let after = from_named(&tr.named_f64());
    rows.extend(named_rows(
        name,
        "after_step.",
        &after,
        &fx.after_step,
        tol.step,
        nw,
    ));
    Ok(rows)
}

/// One micro-step of a trajectory run on the fast path.
#[derive(Debug, Clone)]
pub struct FastRow {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: Option<f64>,
}

/// MiniMind's loop: lr = cosine(step, total, base) before each 1-based micro-step; backward of
/// (ce + aux) * weight; optimizer step (clip, AdamW) on `step % accum == 0` or the last step.
/// `counts`-based token weighting when `norm` is TokenWeighted.
pub fn run_trajectory(
    tr: &mut Trainer,
    batches: &[(Tensor, Tensor)],
    accum: u64,
    base_lr: f64,
    clip: f64,
    norm: fast::optim::accumulation::Normalisation,
) -> Result<Vec<FastRow>> {
    use fast::optim::accumulation::{is_optimizer_step, loss_weight, window};
    let total = batches.len() as u64;
    let counts: Vec<usize> = batches
        .iter()
        .map(|(_, l)| {
            let lb = l.narrow(1, 1, l.size()[1] - 1);
            i64::try_from(lb.ne(-100).sum(Kind::Int64)).expect("count") as usize
        })
        .collect();
    let mut rows = Vec::with_capacity(batches.len());
    for (i, (ids, labels)) in batches.iter().enumerate() {
        let step = i as u64 + 1;
        let lr = fast::optim::schedule::cosine_lr(step, total, base_lr);
        let (first, last) = window(step, accum, total);
        let wc: usize = counts[(first - 1) as usize..last as usize].iter().sum();
        let w = loss_weight(norm, accum, counts[i], wc);
        let out = tr.micro_step(ids, labels, w)?;
        let grad_norm = if is_optimizer_step(step, accum, total) {
            Some(scalar(&tr.optimizer_step(lr, clip)?))
        } else {
            None
        };
        rows.push(FastRow {
            step,
            lr,
            loss: scalar(&out.loss),
            grad_norm,
        });
    }
    Ok(rows)
}

pub fn check_trajectory(
    fx: &TrainFixture,
    precision: Precision,
    device: Device,
) -> Result<Vec<Row>> {
    let name = fx.name.as_str();
    let tol = tolerances_on(precision, device);
    let mut tr = trainer(
        &fx.config,
        &fx.params,
        adamw_config(&fx.adamw),
        precision,
        device,
    )?;
    let batches: Vec<(Tensor, Tensor)> = fx
        .batches
        .iter()
        .map(|(i, l)| {
            (
                to_tensor_i64(i).to_device(device),
                to_tensor_i64(l).to_device(device),
            )
        })
        .collect();
    let got = run_trajectory(
        &mut tr,
        &batches,
        fx.accumulation_steps,
        fx.lr,
        fx.clip,
        fast::optim::accumulation::Normalisation::MiniMindMean,
    )?;
    let mut rows = vec![Row::exact(name, "rows.count", got.len() == fx.rows.len())];
    let (mut lr, mut loss, mut flags, mut gn) = (Vec::new(), Vec::new(), true, Vec::new());
    for (g, e) in got.iter().zip(&fx.rows) {
        lr.push(Row::scalar(name, "lr (per step)", g.lr, e.lr, 1e-13));
        loss.push(Row::scalar(
            name,
            "loss (per step)",
            g.loss,
            e.loss,
            tol.trajectory_loss,
        ));
        flags &= g.grad_norm.is_some() == e.optimizer_step;
        if let (Some(a), Some(b)) = (g.grad_norm, e.grad_norm) {
            gn.push(Row::scalar(name, "grad_norm (per step)", a, b, tol.grad));
        }
    }
    rows.extend(worst_per_group(lr));
    rows.extend(worst_per_group(loss));
    rows.push(Row::exact(name, "optimizer_step flags", flags));
    rows.extend(worst_per_group(gn));
    let fin = from_named(&tr.named_f64());
    rows.extend(named_rows(
        name,
        "final.",
        &fin,
        &fx.final_params,
        tol.trajectory_weights,
        tol.normwise,
    ));
    Ok(rows)
}

/// lr schedule, samplers, rescale (exact) and the GradScaler trajectory on `device`.
pub fn check_components(c: &Components, device: Device) -> Result<Vec<Row>> {
    use fast::data::order::{distributed_indices, rescale_step, SkipBatchSampler};
    let f = "components";
    let mut rows = Vec::new();
    let lr: Vec<Row> = c
        .lr_schedule
        .iter()
        .map(|k| {
            Row::scalar(
                f,
                "lr_schedule",
                fast::optim::schedule::cosine_lr(k.step, k.total, k.lr),
                k.value,
                1e-13,
            )
        })
        .collect();
    rows.extend(worst_per_group(lr));
    let skip = c.skip_batch_sampler.iter().all(|k| {
        let s = SkipBatchSampler::new(&k.indices, k.batch_size, k.skip_batches);
        s.iter().map(|b| b.to_vec()).collect::<Vec<_>>() == k.batches && s.len() == k.batches.len()
    });
    rows.push(Row::exact(
        f,
        &format!("skip_batch_sampler ({} cases)", c.skip_batch_sampler.len()),
        skip,
    ));
    let dist = c.distributed_sampler_no_shuffle.iter().all(|k| {
        let idx: Vec<usize> = (0..k.n).collect();
        distributed_indices(&idx, k.world_size, k.rank, k.drop_last) == k.indices
    });
    let n = c.distributed_sampler_no_shuffle.len();
    rows.push(Row::exact(
        f,
        &format!("distributed_sampler_no_shuffle ({n} cases)"),
        dist,
    ));
    let resc = c.world_size_step_rescale.iter().all(|k| {
        rescale_step(k.step as usize, k.saved_ws as usize, k.current_ws as usize)
            == k.value as usize
    });
    let n = c.world_size_step_rescale.len();
    rows.push(Row::exact(
        f,
        &format!("world_size_step_rescale ({n} cases)"),
        resc,
    ));
    rows.extend(check_scaler(c, device)?);
    Ok(rows)
}

/// The GradScaler fixture on the device: loss = sum(p * [1,2,3,4]), p0 = ones (fp32), SGD lr 0.1,
/// scaled gradient `scale * [1,2,3,4]` with the injected value in element 0 on some steps.
pub fn check_scaler(c: &Components, device: Device) -> Result<Vec<Row>> {
    let f = "components";
    let k = &c.grad_scaler;
    let mut sc = fast::optim::scaler::GradScaler::new(
        k.init_scale,
        k.growth_factor,
        k.backoff_factor,
        k.growth_interval as i64,
        device,
    );
    let coef = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).to_device(device);
    let mut p = Tensor::ones([4], (Kind::Float, device));
    let (mut scales, mut flags) = (true, true);
    let mut param_rows = Vec::new();
    for s in &k.trajectory {
        let g = &coef * sc.scale.reshape([]);
        let inj = match s.injected.as_str() {
            "inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            "nan" => Some(f64::NAN),
            "None" => None,
            other => bail!("grad_scaler: unknown injection {other:?}"),
        };
        if let Some(v) = inj {
            let _ = g.get(0).fill_(v);
        }
        sc.unscale(std::slice::from_ref(&g))?;
        // Skip on the device: p stays where found_inf is set.
        let stepped = &p - &g * 0.1;
        p = p.where_self(&sc.found_inf.gt(0.0), &stepped);
        let found = sc.found_inf_value();
        sc.update();
        scales &= sc.scale_value() == s.scale_after_update;
        flags &= !found == s.param_changed;
        let expected = ndarray::arr1(&s.param).into_dyn();
        param_rows.push(Row::compare(
            f,
            "grad_scaler.param (fp32)",
            to_array(&p).view(),
            expected.view(),
            1e-6,
        ));
    }
    let mut rows = vec![
        Row::exact(f, "grad_scaler.scale", scales),
        Row::exact(f, "grad_scaler.param_changed", flags),
    ];
    rows.extend(worst_per_group(param_rows));
    Ok(rows)
}

/// Tokenises every case (no special tokens added) and encodes it with `fast::data::rows::padded_row`.
pub fn check_dataset(cases_path: &Path, tokenizer_path: &Path) -> Result<Vec<Row>> {
    let cases = fixtures::load_dataset_cases(cases_path)?;
    let tok = tokenizers::Tokenizer::from_file(tokenizer_path)
        .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tokenizer_path.display()))?;
    let mut ok = true;
    for c in &cases {
        let enc = tok
            .encode(c.text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenising {:?}: {e}", c.text))?;
        let row = fast::data::rows::padded_row(
            enc.get_ids(),
            c.max_length,
            fast::data::rows::SpecialTokens::default(),
        );
        ok &= row.input_ids == c.input_ids && row.labels == c.labels;
    }
    Ok(vec![Row::exact(
        "dataset_cases",
        &format!("padded encoding ({} cases)", cases.len()),
        ok,
    )])
}

/// The fast path's checks on one device in one precision.
pub struct FastChecks {
    pub device: Device,
    pub precision: Precision,
}

impl FastChecks {
    /// `device` "cpu", "cuda", "cuda:N"; `precision` "fp32", "bf16", "fp16", "fp64".
    pub fn new(device: &str, precision: &str) -> Result<Self> {
        Ok(FastChecks {
            device: parse_device(device)?,
            precision: precision.parse()?,
        })
    }
}

impl super::Checks for FastChecks {
    fn model(&self, fx: &ModelFixture) -> Result<Vec<Row>> {
        check_model(fx, self.precision, self.device)
    }

    /// Cases made by the reference (head dim 64: our attention kernels on the bf16 CUDA path).
    /// In fp64 the fast path keeps MiniMind's fp32 RMSNorm and RoPE tables, which a pure float64
    /// oracle does not (2e-7 apart on the fixtures, see verify/reference.rs), so fp64 takes
    /// fp32's tolerances here.
    fn reference_case(&self, fx: &ModelFixture) -> Result<Vec<Row>> {
        let tol = match self.precision {
            Precision::Fp64 => tolerances(Precision::Fp32),
            p => tolerances_on(p, self.device),
        };
        check_model_with(fx, self.precision, self.device, tol)
    }

    fn trajectory(&self, fx: &TrainFixture) -> Result<Vec<Row>> {
        check_trajectory(fx, self.precision, self.device)
    }

    fn components(&self, c: &Components) -> Result<Vec<Row>> {
        check_components(c, self.device)
    }

    fn dataset(&self, cases: &Path, tokenizer: &Path) -> Result<Vec<Row>> {
        check_dataset(cases, tokenizer)
    }

    fn pth(&self, dir: &Path) -> Result<Vec<Row>> {
        super::pth::check_fast(dir, self.device, self.precision)
    }

    fn muon(&self, cases: &[fixtures::MuonCase]) -> Result<Vec<Row>> {
        check_muon(cases, self.precision, self.device)
    }

    fn recipe(&self, c: &RecipeComponents) -> Result<Vec<Row>> {
        Ok(crate::report::linear_schedule_rows(
            &c.linear_schedule_with_warmup,
            |k, warmup, total, base| fast::optim::schedule::linear_lr(k, total, base, warmup),
        ))
    }
}

/// torch.optim.Muon's steps (golden/muon) through the fast Muon on `device`: float64 weights,
/// Newton-Schulz in `precision`'s compute kind. Tolerances, relative to torch's step: float64
/// NS against torch's float64 NS, 1e-12 (the reference's bound: same operations, NS's quintic
/// grows round-off ~450x); float32 NS, 1e-5 (2^-24 = 6e-8 per rounding, grown as above and by
/// the step's cancellation: seen 1.1e-6 on the CPU); bfloat16 NS against torch's stock
/// bfloat16 NS on the CPU, 1e-12 (the same products in the same kind on the same kernels:
/// seen 2.9e-14); any other pairing with bfloat16 / float16 on either side, 0.1 (8 or 11
/// significant bits over ~15 products, summed in another order on CUDA: a few %, as the
/// reference sees between exact and torch's bfloat16).
pub fn check_muon(
    cases: &[fixtures::MuonCase],
    precision: Precision,
    device: Device,
) -> Result<Vec<Row>> {
    use fast::optim::muon::{AdjustLr, Muon, MuonConfig};
    let ns_kind = precision.compute_kind();
    crate::report::muon_rows(
        cases,
        |c| match (ns_kind, c.newton_schulz.as_str()) {
            (Kind::Double, "float64") => 1e-12,
            (Kind::Float, "float64") => 1e-5,
            (Kind::BFloat16, "bfloat16") if device == Device::Cpu => 1e-12,
            _ => 0.1,
        },
        |c| {
            let o = &c.options;
            let cfg = MuonConfig {
                weight_decay: o.weight_decay,
                momentum: o.momentum,
                nesterov: o.nesterov,
                ns_coefficients: o.ns_coefficients,
                eps: o.eps,
                ns_steps: o.ns_steps,
                adjust_lr: if o.match_rms_adamw()? {
                    AdjustLr::MatchRmsAdamw
                } else {
                    AdjustLr::Original
                },
            };
            let names: Vec<String> = c.initial.keys().cloned().collect();
            let to_device = |m: &ndarray::Array2<f64>| {
                crate::convert::to_tensor(&m.clone().into_dyn()).to_device(device)
            };
            let params: Vec<Tensor> = names.iter().map(|k| to_device(&c.initial[k])).collect();
            let all: Vec<usize> = (0..names.len()).collect();
            let mut opt = Muon::new(&params, &all, cfg, ns_kind)?;
            opt.set_lr(o.lr);
            Ok(
                move |before: &crate::report::Matrices, grads: &crate::report::Matrices| {
                    let _guard = tch::no_grad_guard();
                    let mut g = Vec::with_capacity(names.len());
                    for (k, p) in names.iter().zip(&params) {
                        p.shallow_clone().f_copy_(&to_device(&before[k]))?;
                        g.push(to_device(&grads[k]));
                    }
                    opt.step(&params, &g, None)?;
                    names
                        .iter()
                        .zip(&params)
                        .map(|(k, p)| Ok((k.clone(), to_array(p).into_dimensionality()?)))
                        .collect::<Result<crate::report::Matrices>>()
                },
            )
        },
    )
}

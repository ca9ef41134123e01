//! `--optimizer muon`: the fast Muon equals torch's (golden/muon) and the float64 reference, in
//! a whole training step (Muon on the block matrices, AdamW on the rest), and its state makes a
//! resume continue bit for bit.
use std::path::Path;

use harness::convert::{from_named, to_named, to_tensor_i64};
use harness::report::Row;
use harness::verify::{self, FastChecks, Target};
use ndarray::Array2;
use tch::{Device, Kind, Tensor};

use fast::model::precision::Precision;
use fast::optim::muon::MuonConfig;
use fast::train::trainer::{MuonSettings, Trainer, TrainerConfig};

fn golden_muon() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/golden/muon"))
}

fn muon_rows(target: &Target) -> Vec<Row> {
    verify::run(golden_muon(), target)
        .unwrap()
        .into_iter()
        .filter(|r| r.fixture == "muon")
        .collect()
}

fn assert_all_ok(rows: &[Row], what: &str) {
    assert_eq!(rows.len(), 4, "{what}: one row per case of muon_cases.json");
    for r in rows {
        assert!(r.ok, "{what}: {r:?}");
    }
}

/// golden/muon through the reference and the fast path on the CPU in every kind Newton-Schulz
/// runs in; the tolerances are stated where they are set (verify/reference.rs, verify/fast.rs).
#[test]
fn golden_muon_cases_pass_on_both_paths() {
    assert_all_ok(&muon_rows(&Target::Reference), "reference");
    for p in ["fp64", "fp32", "bf16"] {
        let rows = muon_rows(&Target::Fast(FastChecks::new("cpu", p).unwrap()));
        assert_all_ok(&rows, p);
        if p == "bf16" {
            // Stock torch runs Newton-Schulz in bfloat16 as our bf16 path does: round-off apart.
            let stock = rows.iter().find(|r| r.group.starts_with("stock")).unwrap();
            assert!(stock.max_rel < 1e-12, "{stock:?}");
        }
    }
}

fn small(moe: bool, minimind3: bool) -> reference::ModelConfig {
    let base = if minimind3 {
        reference::ModelConfig::minimind3()
    } else {
        reference::ModelConfig::default()
    };
    reference::ModelConfig {
        hidden_size: 32,
        intermediate_size: Some(48),
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 40,
        use_moe: moe,
        ..base
    }
}

fn batch(cfg: &reference::ModelConfig, step: u64) -> Array2<i64> {
    Array2::from_shape_fn((3, 11), |(b, t)| {
        ((b as u64 * 7919 + t as u64 * 104_729 + step * 31) % cfg.vocab_size as u64) as i64
    })
}

/// Three steps of forward, backward, joint clip, then Muon (block matrices) + AdamW (embedding,
/// norms, router) on the fast path in float64 on the CPU, against the reference's clip and
/// MuonWithAdamW applied to the same gradients from the same weights, each side carrying its own
/// weights and optimizer state. The reference gets the fast path's gradients: the fast fp64
/// path keeps MiniMind's fp32 RMSNorm and RoPE tables (its gradients are 1e-7 off the pure
/// float64 oracle's, which fast_vs_reference bounds), and AdamW turns that into up to lr / eps
/// on near-zero gradients; here only the optimizers' arithmetic differs. Tolerance 1e-12
/// relative to each tensor's largest weight: float64 round-off (1e-16) grown by Newton-Schulz
/// (up to ~450x) over three steps (seen 2e-14); a wrong formula is off by a step (1e-2 here).
#[test]
fn fast_muon_training_steps_equal_the_reference_in_f64() {
    for (moe, mm3) in [(false, false), (true, false), (true, true)] {
        let cfg = small(moe, mm3);
        let params = reference::params::init_params(&cfg, 5);
        let muon = MuonConfig::default();
        let (muon_lr, adamw_lr, clip) = (0.02, 1e-3, 1.0);
        let tc = TrainerConfig {
            precision: Precision::Fp64,
            muon: Some(MuonSettings {
                cfg: muon,
                lr_ratio: muon_lr / adamw_lr,
            }),
            ..Default::default()
        };
        let fcfg = harness::convert::fast_config(&cfg);
        let mut tr = Trainer::from_named(&fcfg, tc, to_named(&params), "reference init").unwrap();
        let ref_muon = reference::muon::MuonConfig {
            weight_decay: muon.weight_decay,
            momentum: muon.momentum,
            nesterov: muon.nesterov,
            ns_coefficients: muon.ns_coefficients,
            eps: muon.eps,
            ns_steps: muon.ns_steps,
            adjust_lr: reference::muon::AdjustLr::Original,
        };
        let mut p = params.clone();
        let mut opt = reference::muon::MuonWithAdamW::new(
            &p,
            ref_muon,
            reference::adamw::AdamWConfig::default(),
        );
        for step in 0..3 {
            let t = to_tensor_i64(&batch(&cfg, step));
            tr.micro_step(&t, &t, 1.0).unwrap();
            let mut g = from_named(&tr.named_grads_f64());
            reference::clip::clip_grad_norm(&mut g, clip);
            opt.step(&mut p, &g, muon_lr, adamw_lr);
            let _ = tr.optimizer_step(adamw_lr, clip).unwrap();
        }
        let ours = from_named(&tr.named_f64());
        let what = format!("moe {moe} minimind3 {mm3}");
        assert_eq!(ours.len(), p.len(), "{what}");
        let mut worst = 0.0f64;
        for (name, want) in &p {
            let (_, rel) = harness::report::errors(ours[name].view(), want.view());
            assert!(rel < 1e-12, "{what}: {name} off by {rel:e}");
            worst = worst.max(rel);
        }
        // The run moved every matrix Muon owns: the comparison is not of untouched weights.
        for (name, w) in &p {
            if reference::muon::is_muon_param(name, w.shape()) {
                let moved = (w - &params[name])
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(moved > 1e-4, "{what}: {name} moved only {moved:e}");
            }
        }
        eprintln!("{what}: worst relative difference {worst:e}");
    }
}

fn muon_trainer(seed: i64) -> Trainer {
    let cfg = harness::convert::fast_config(&small(true, true));
    let tc = TrainerConfig {
        seed,
        muon: Some(MuonSettings {
            cfg: MuonConfig::default(),
            lr_ratio: 20.0,
        }),
        ..Default::default()
    };
    Trainer::new(&cfg, tc).unwrap()
}

fn steps(tr: &mut Trainer, from: u64, n: u64) {
    let cfg = small(true, true);
    for s in from..from + n {
        let t = to_tensor_i64(&batch(&cfg, s));
        tr.micro_step(&t, &t, 1.0).unwrap();
        let _ = tr.optimizer_step(1e-3, 1.0).unwrap();
    }
}

/// The resume checkpoint's tensors carry Muon's momentum (`muon.momentum.{name}`): a trainer
/// restored from them after two steps continues exactly as the one that kept running.
#[test]
fn muon_state_resumes_bit_for_bit() {
    let mut a = muon_trainer(3);
    steps(&mut a, 0, 2);
    let (tensors, host) = a.state_dict();
    let saved: std::collections::HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
    let momentum: Vec<&String> = saved
        .keys()
        .filter(|k| k.starts_with("muon.momentum."))
        .collect();
    assert!(!momentum.is_empty());
    assert!(saved.contains_key("muon.momentum.model.layers.0.mlp.experts.0.gate_proj.weight"));
    assert!(!saved
        .keys()
        .any(|k| k == "adam.exp_avg.model.layers.0.self_attn.q_proj.weight"));
    assert!(saved.contains_key("adam.exp_avg.model.layers.0.mlp.gate.weight"));
    let mut b = muon_trainer(99);
    b.load_state_dict(&saved, &host, Path::new("in-memory"))
        .unwrap();
    steps(&mut a, 2, 2);
    steps(&mut b, 2, 2);
    for ((n, x), (_, y)) in a.named_parameters().iter().zip(b.named_parameters()) {
        assert!(x.equal(y), "{n} differs after the resumed steps");
    }
    let (ta, _) = a.state_dict();
    let (tb, _) = b.state_dict();
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        assert!(x.equal(y), "state {n} differs after the resumed steps");
    }
}

/// A non-finite gradient skips the step on the device: Muon's matrices and momentum stay.
#[test]
fn a_non_finite_gradient_leaves_muon_state_untouched() {
    let mut tr = muon_trainer(4);
    steps(&mut tr, 0, 1);
    let before: Vec<Tensor> = tr.state_dict().0.iter().map(|(_, t)| t.copy()).collect();
    let cfg = small(true, true);
    let t = to_tensor_i64(&batch(&cfg, 7));
    tr.micro_step(&t, &t, 1.0).unwrap();
    let _ = tr.grads()[0].shallow_clone().fill_(f64::NAN);
    let norm = tr.optimizer_step(1e-3, 1.0).unwrap();
    assert!(f64::try_from(&norm).unwrap().is_nan());
    assert_eq!(
        f64::try_from(tr.nonfinite().unwrap().sum(Kind::Double)).unwrap(),
        1.0
    );
    let (after, _) = tr.state_dict();
    for ((n, a), b) in after.iter().zip(&before) {
        if n.starts_with("grad.") {
            continue; // zeroed by the step, skipped or not
        }
        assert!(a.equal(b), "{n} changed in a skipped step");
    }
}

/// Muon in bf16 compute orthogonalises in bfloat16 and still trains: five steps on one batch
/// lower its loss (the check that the reduced-precision path is wired, not a bound).
#[test]
fn bf16_muon_lowers_the_loss_on_a_repeated_batch() {
    let cfg = harness::convert::fast_config(&small(false, false));
    let tc = TrainerConfig {
        precision: Precision::Bf16,
        muon: Some(MuonSettings {
            cfg: MuonConfig::default(),
            lr_ratio: 20.0,
        }),
        device: Device::Cpu,
        ..Default::default()
    };
    let mut tr = Trainer::new(&cfg, tc).unwrap();
    let t = to_tensor_i64(&batch(&small(false, false), 0));
    let first = f64::try_from(&tr.micro_step(&t, &t, 1.0).unwrap().loss).unwrap();
    let _ = tr.optimizer_step(1e-3, 1.0).unwrap();
    let mut last = first;
    for _ in 0..5 {
        last = f64::try_from(&tr.micro_step(&t, &t, 1.0).unwrap().loss).unwrap();
        let _ = tr.optimizer_step(1e-3, 1.0).unwrap();
    }
    assert!(last < first - 0.1, "loss {first} -> {last}");
}

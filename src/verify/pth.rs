//! `verify --fixtures DIR`: MiniMind weight-file fixtures (`<name>.pth` + `<name>.expected.safetensors`
//! + `<name>.json`). Imports the `.pth` with fast's restricted unpickler (no code from the file
//! runs) and checks the logits its weights give against the float64 logits MiniMind computed.
//! - fast path (the model's forward): float64 1e-9 (it reproduces MiniMind's float32 RMSNorm and
//!   RoPE tables, so only summation order differs) and float32 1e-4, absolute; bf16 norm-wise,
//!   ||a - e|| / ||e|| <= 2e-2, the bf16 logits tolerance of `verify/fast.rs`, with bf16 as
//!   MiniMind trains in it (fp32 weights and residual stream, bf16 matmuls): single logits can
//!   be off by several bf16 ulps while the tensor as a whole is off by about one. (With bf16
//!   weights and hidden states, the tiny random MoE's top-1 router picks another expert for
//!   tokens whose best scores are within round-off: 4e-2 norm-wise, a property of bf16
//!   inference, not of the import, which fp32 and fp64 pin.)
//! - reference path (reference::model::forward on the same weights, float64): 1e-6 relative to the
//!   largest logit, the reference's FORWARD_TOL: MiniMind computes RMSNorm in float32 even in
//!   float64, the reference in float64 (about 1e-7 apart).

use std::path::Path;

use anyhow::{Context, Result};
use fast::model::precision::Precision;
use tch::{Device, Kind, Tensor};

use crate::report::Row;

/// The fast path: the weights imported in `precision`'s kind (fp16 is checked as bf16) on
/// `device`, the model's forward.
pub fn check_fast(dir: &Path, device: Device, precision: Precision) -> Result<Vec<Row>> {
    check_fast_with(
        dir,
        device,
        precision,
        fast::kernels::KernelConfig::default(),
    )
}

/// [`check_fast`] with the kernel choices `kernels`.
pub fn check_fast_with(
    dir: &Path,
    device: Device,
    precision: Precision,
    kernels: fast::kernels::KernelConfig,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let (kind, tol) = match precision {
        Precision::Fp64 => (Kind::Double, 1e-9),
        Precision::Fp32 => (Kind::Float, 1e-4),
        Precision::Bf16 | Precision::Fp16 => (Kind::BFloat16, 2e-2),
    };
    for (pth, stem, ids, logits) in fixtures(dir)? {
        // bf16 as MiniMind runs it under autocast: fp32 weights, bf16 matmuls.
        let weights_kind = if kind == Kind::BFloat16 {
            Kind::Float
        } else {
            kind
        };
        let (mut m, _) = fast::io::weights::load_model(&pth, None, weights_kind, device)?;
        m.set_compute_kind(kind);
        m.kernels = fast::kernels::Kernels::new(kernels);
        let _g = tch::no_grad_guard();
        let got = m
            .forward(&ids.to_device(device), None)
            .logits
            .to_device(Device::Cpu)
            .to_kind(Kind::Double);
        if kind == Kind::BFloat16 {
            let (a, e) = (
                crate::convert::to_array(&got),
                crate::convert::to_array(&logits),
            );
            rows.push(crate::report::compare(
                &stem,
                "pth_import.logits",
                &a,
                &e,
                tol,
                true,
            ));
            continue;
        }
        let max_abs = (&got - &logits).abs().max().double_value(&[]);
        let scale = logits.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
        rows.push(Row {
            fixture: stem,
            group: "pth_import.logits".into(),
            max_abs,
            max_rel: max_abs / scale,
            tol,
            ok: max_abs <= tol,
        });
    }
    Ok(rows)
}

/// Every `<name>.pth` with its `<name>.expected.safetensors`: (path, name, input_ids, logits).
fn fixtures(dir: &Path) -> Result<Vec<(std::path::PathBuf, String, Tensor, Tensor)>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pth"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for pth in names {
        let stem = pth.file_stem().unwrap().to_string_lossy().to_string();
        let exp = pth.with_file_name(format!("{stem}.expected.safetensors"));
        if !exp.is_file() {
            continue;
        }
        let want =
            Tensor::read_safetensors(&exp).with_context(|| format!("reading {}", exp.display()))?;
        let get = |n: &str| {
            want.iter()
                .find(|(k, _)| k == n)
                .map(|(_, t)| t.shallow_clone())
                .with_context(|| format!("{}: no {n}", exp.display()))
        };
        let (ids, logits) = (get("input_ids")?, get("logits")?);
        out.push((pth, stem, ids, logits));
    }
    Ok(out)
}

/// The reference on the imported weights: config from `<name>.json`, float16 weights widened to
/// float64 exactly, `reference::model::forward`.
pub fn check_reference(dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (pth, stem, ids, logits) in fixtures(dir)? {
        let cfg_path = pth.with_file_name(format!("{stem}.json"));
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let params: reference::Params = fast::io::weights::load_weights(&pth)?
            .into_iter()
            .filter(|(n, _)| n != "lm_head.weight")
            .map(|(n, t)| (n, crate::convert::to_array(&t.to_kind(Kind::Double))))
            .collect();
        // MiniMind-3 saves its config without naming the architecture; its weight files are
        // recognisable by the q/k norms MiniMind2 never had.
        let mut config = json["config"].clone();
        if let Some(o) = config.as_object_mut() {
            if !o.contains_key("architecture") && params.keys().any(|n| n.contains(".q_norm.")) {
                o.insert("architecture".into(), "minimind-3".into());
            }
        }
        let cfg: reference::ModelConfig = serde_json::from_value(config)
            .with_context(|| format!("{}: config", cfg_path.display()))?;
        crate::fixtures::check_params(&cfg_path, &cfg, &params)?;
        let ids_arr = crate::convert::to_array(&ids.to_kind(Kind::Double))
            .mapv(|v| v as i64)
            .into_dimensionality::<ndarray::Ix2>()
            .context("input_ids must be [B, T]")?;
        let out = reference::model::forward(&cfg, &params, ids_arr.view(), ids_arr.view());
        let want = crate::convert::to_array(&logits.to_kind(Kind::Double));
        let got = out.logits.into_dyn();
        anyhow::ensure!(
            got.shape() == want.shape(),
            "{stem}: logits shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        );
        let max_abs = (&got - &want).mapv(f64::abs).fold(0.0f64, |a, &b| a.max(b));
        let scale = want
            .mapv(f64::abs)
            .fold(0.0f64, |a, &b| a.max(b))
            .max(f64::MIN_POSITIVE);
        let tol = super::reference::FORWARD_TOL;
        rows.push(Row {
            fixture: stem,
            group: "pth_import.logits (reference, f64)".into(),
            max_abs,
            max_rel: max_abs / scale,
            tol,
            ok: max_abs / scale <= tol,
        });
    }
    Ok(rows)
}

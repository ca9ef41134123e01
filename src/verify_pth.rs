//! `verify --fixtures DIR`: MiniMind weight-file fixtures (`<name>.pth` + `<name>.expected.safetensors`
//! + `<name>.json`). Imports the `.pth` with fast's restricted unpickler (no code from the file
//! runs) and checks the logits its weights give against the float64 logits MiniMind computed.
//! - fast path (kv_cache.rs forward): float64 1e-9 (it reproduces MiniMind's float32 RMSNorm and
//!   RoPE tables, so only summation order differs), float32 1e-4, bf16 5e-2 (logits of O(1-10)
//!   with 8-bit mantissas); absolute.
//! - reference path (reference::model::forward on the same weights, float64): 1e-6 relative to the
//!   largest logit, the reference's FORWARD_TOL: MiniMind computes RMSNorm in float32 even in
//!   float64, the reference in float64 (about 1e-7 apart).

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::report::Row;

/// `path`: "fast" (checked here) or "reference" (no rows yet). `precision`: fp64, fp32, bf16.
pub fn run(dir: &Path, path: &str, device: &str, precision: &str) -> Result<Vec<Row>> {
    if path == "reference" {
        return run_reference(dir);
    }
    let mut rows = Vec::new();
    let device = fast::precision::parse_device(device)?;
    let (kind, tol) = match precision {
        "fp64" | "f64" => (Kind::Double, 1e-9),
        "fp32" | "f32" => (Kind::Float, 1e-4),
        "bf16" => (Kind::BFloat16, 5e-2),
        o => anyhow::bail!("unknown precision {o:?}"),
    };
    for (pth, stem, ids, logits) in fixtures(dir)? {
        let (arch, w, _) = fast::weights::load_for_inference(&pth, None, kind)?;
        let m = fast::kv_cache::InferenceModel::new(arch, w, kind, device)?;
        let _g = tch::no_grad_guard();
        let got = m
            .forward(&ids, &mut fast::kv_cache::KvCache::new())?
            .to_device(Device::Cpu)
            .to_kind(Kind::Double);
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
fn run_reference(dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (pth, stem, ids, logits) in fixtures(dir)? {
        let cfg_path = pth.with_file_name(format!("{stem}.json"));
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let cfg: reference::ModelConfig = serde_json::from_value(json["config"].clone())
            .with_context(|| format!("{}: config", cfg_path.display()))?;
        let params: reference::Params = fast::weights::load_weights(&pth)?
            .into_iter()
            .filter(|(n, _)| n != "lm_head.weight")
            .map(|(n, t)| (n, crate::verify_fast::to_array(&t.to_kind(Kind::Double))))
            .collect();
        let ids_arr = crate::verify_fast::to_array(&ids.to_kind(Kind::Double))
            .mapv(|v| v as i64)
            .into_dimensionality::<ndarray::Ix2>()
            .context("input_ids must be [B, T]")?;
        let out = reference::model::forward(&cfg, &params, ids_arr.view(), ids_arr.view());
        let want = crate::verify_fast::to_array(&logits.to_kind(Kind::Double));
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
        let tol = crate::verify_reference::FORWARD_TOL;
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

//! `verify --fixtures DIR`: MiniMind weight-file fixtures (`<name>.pth` + `<name>.expected.safetensors`
//! + `<name>.json`). Imports the `.pth` with fast's restricted unpickler and checks the logits its
//! weights give against the float64 logits MiniMind computed, on the fast path (kv_cache.rs forward).
//! Tolerances: float64 1e-9 (the forward reproduces MiniMind's float32 RMSNorm and RoPE tables,
//! so only summation order differs), float32 1e-4, bf16 5e-2 (logits of O(1-10) with 8-bit mantissas).
//! The reference path for these fixtures is not implemented yet.

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::report::Row;

fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        "auto" => Device::cuda_if_available(),
        o => match o.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => anyhow::bail!("unknown device {o:?}"),
        },
    })
}

/// `path`: "fast" (checked here) or "reference" (no rows yet). `precision`: fp64, fp32, bf16.
pub fn run(dir: &Path, path: &str, device: &str, precision: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    if path != "fast" {
        return Ok(rows);
    }
    let device = parse_device(device)?;
    let (kind, tol) = match precision {
        "fp64" | "f64" => (Kind::Double, 1e-9),
        "fp32" | "f32" => (Kind::Float, 1e-4),
        "bf16" => (Kind::BFloat16, 5e-2),
        o => anyhow::bail!("unknown precision {o:?}"),
    };
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pth"))
        .collect();
    names.sort();
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

//! Named access to a model's parameters: list, load (any float kind, converted to the
//! VarStore's kind and device) and save (safetensors), by MiniMind's state_dict names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::Tensor;

/// Every parameter of `vs`, sorted by name (shallow handles: they share storage with the store).
pub fn named_parameters(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Copies `tensors` into the store's variables by name. Every variable must be given exactly once
/// with its shape; a tied `lm_head.weight` equal to the embedding is accepted and dropped. Values
/// are converted to each variable's kind and device (f64/f32/f16/bf16 sources). `source` names
/// where they came from in errors.
pub fn load_named(vs: &mut VarStore, tensors: HashMap<String, Tensor>, source: &str) -> Result<()> {
    let vars = named_parameters(vs);
    let expected: Vec<(String, Vec<i64>)> =
        vars.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let kind = vars
        .first()
        .map(|(_, t)| t.kind())
        .context("the VarStore has no variables")?;
    let loaded = crate::io::weights::match_weights(
        tensors.into_iter().collect(),
        &expected,
        kind,
        Path::new(source),
    )?;
    let _guard = tch::no_grad_guard();
    for ((name, mut var), (lname, t)) in vars.into_iter().zip(loaded) {
        debug_assert_eq!(name, lname);
        var.f_copy_(&t.to_kind(var.kind()).to_device(var.device()))
            .with_context(|| format!("{source}: copying {name}"))?;
    }
    Ok(())
}

/// Writes every parameter (as stored, moved to the CPU) to a safetensors file.
pub fn save_named(vs: &VarStore, path: &Path) -> Result<()> {
    let named: Vec<(String, Tensor)> = named_parameters(vs)
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&named, path).with_context(|| format!("writing {}", path.display()))
}

//! Load model weights from MiniMind's `.pth` files or our `.safetensors`, by name.
//!
//! `load_weights` reads every tensor of a file (CPU, the file's dtype); `match_weights` checks them
//! against the names and shapes a model expects, converts them to the model's dtype and says by
//! name what is missing, extra or mis-shaped. MiniMind ties `lm_head.weight` to
//! `model.embed_tokens.weight`; files may carry both (MiniMind's own do): the copy is checked equal
//! and dropped.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// The tied output projection that files may carry as a copy of the embedding.
pub const TIED_LM_HEAD: &str = "lm_head.weight";
pub const EMBED: &str = "model.embed_tokens.weight";

/// Every tensor of a weights file, in file order, on the CPU in the file's dtype.
/// `.pth` goes through the restricted unpickler (`pth.rs`), `.safetensors` through safetensors.
pub fn load_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth") | Some("pt") | Some("bin") => super::pth::read_pth(path)?
            .into_iter()
            .map(|(n, raw)| {
                let t = raw
                    .to_tensor()
                    .with_context(|| format!("{}: tensor {n}", path.display()))?;
                Ok((n, t))
            })
            .collect(),
        Some("safetensors") => read_safetensors(path),
        _ => bail!(
            "{}: unknown weights format (expected a .pth written by MiniMind or a .safetensors)",
            path.display()
        ),
    }
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    // safetensors orders tensors by name; keep the file's offset order instead for readability.
    let mut names: Vec<(usize, String)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (v.data().as_ptr() as usize, n))
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for (_, name) in names {
        let v = st.tensor(&name)?;
        let kind = match v.dtype() {
            safetensors::Dtype::F16 => Kind::Half,
            safetensors::Dtype::BF16 => Kind::BFloat16,
            safetensors::Dtype::F32 => Kind::Float,
            safetensors::Dtype::F64 => Kind::Double,
            safetensors::Dtype::I64 => Kind::Int64,
            safetensors::Dtype::I32 => Kind::Int,
            safetensors::Dtype::U8 => Kind::Uint8,
            safetensors::Dtype::BOOL => Kind::Bool,
            other => bail!(
                "{}: tensor {name} has unsupported dtype {other:?}",
                path.display()
            ),
        };
        let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(v.data(), &shape, kind)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        out.push((name, t));
    }
    Ok(out)
}

/// Check `loaded` against the `expected` (name, shape) list of a model and convert every tensor to
/// `kind`, in the order of `expected`. Errors name every missing, unexpected and mis-shaped tensor.
pub fn match_weights(
    loaded: Vec<(String, Tensor)>,
    expected: &[(String, Vec<i64>)],
    kind: Kind,
    source: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let mut by_name: HashMap<String, Tensor> = HashMap::with_capacity(loaded.len());
    for (n, t) in loaded {
        if by_name.insert(n.clone(), t).is_some() {
            bail!("{}: tensor {n} appears twice", source.display());
        }
    }
    let wanted: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    if !wanted.contains(TIED_LM_HEAD) {
        if let Some(head) = by_name.remove(TIED_LM_HEAD) {
            if let Some(embed) = by_name.get(EMBED) {
                let same = head.size() == embed.size()
                    && head
                        .to_kind(Kind::Double)
                        .equal(&embed.to_kind(Kind::Double));
                if !same {
                    bail!(
                        "{}: {TIED_LM_HEAD} differs from {EMBED}; MiniMind ties them and this model \
                         has no separate output projection",
                        source.display()
                    );
                }
            }
        }
    }

    let missing: Vec<&str> = expected
        .iter()
        .filter(|(n, _)| !by_name.contains_key(n))
        .map(|(n, _)| n.as_str())
        .collect();
    let mut extra: Vec<&str> = by_name
        .keys()
        .filter(|n| !wanted.contains(n.as_str()))
        .map(String::as_str)
        .collect();
    extra.sort();
    let misshaped: Vec<String> = expected
        .iter()
        .filter_map(|(n, shape)| {
            let t = by_name.get(n)?;
            (t.size() != *shape).then(|| format!("{n}: file {:?}, model {:?}", t.size(), shape))
        })
        .collect();
    if !missing.is_empty() || !extra.is_empty() || !misshaped.is_empty() {
        let mut msg = format!("{} does not fit the model:", source.display());
        if !missing.is_empty() {
            msg += &format!("\n  missing ({}): {}", missing.len(), missing.join(", "));
        }
        if !extra.is_empty() {
            msg += &format!("\n  unexpected ({}): {}", extra.len(), extra.join(", "));
        }
        if !misshaped.is_empty() {
            msg += &format!(
                "\n  mis-shaped ({}):\n    {}",
                misshaped.len(),
                misshaped.join("\n    ")
            );
        }
        bail!(msg);
    }
    expected
        .iter()
        .map(|(n, _)| {
            let t = by_name.remove(n).unwrap();
            if !t.is_floating_point() {
                bail!(
                    "{}: tensor {n} is {:?}, expected floating point",
                    source.display(),
                    t.kind()
                );
            }
            Ok((n.clone(), t.to_kind(kind)))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Which model a weights file holds.

use crate::model::config::Architecture;
use crate::model::{MiniMindForCausalLM, ModelConfig};

/// MiniMind's defaults for what tensor shapes cannot tell (MiniMindConfig).
const DEFAULT_HEADS: usize = 8;

/// The config JSON that describes `weights`: `explicit` if given, else `<stem>.json` beside it
/// (MiniMind fixtures, our checkpoints), else `config.json` in its folder (a Hugging Face export).
pub fn find_config(weights: &Path, explicit: Option<&Path>) -> Option<std::path::PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let beside = weights.with_extension("json");
    if beside.is_file() {
        return Some(beside);
    }
    let hf = weights.parent().map(|d| d.join("config.json"))?;
    hf.is_file().then_some(hf)
}

/// The object holding the model fields: the JSON itself or its `config` / `model_config` /
/// `model` entry, whichever has `hidden_size`.
fn config_object(v: &serde_json::Value) -> Option<&serde_json::Map<String, serde_json::Value>> {
    let o = v.as_object()?;
    if o.contains_key("hidden_size") {
        return Some(o);
    }
    ["config", "model_config", "model"]
        .iter()
        .find_map(|k| config_object(o.get(*k)?))
}

/// How many numbered children `prefix` has (`model.layers.` + `0`, `1`, ...: the layers, or a
/// layer's experts): the distinct numbers after it, which must run 0 .. N-1 without a gap, so
/// that one stray name cannot size the model from its number.
fn numbered(weights: &[(String, Tensor)], prefix: &str, src: &str) -> Result<usize> {
    let ids: std::collections::BTreeSet<usize> = weights
        .iter()
        .filter_map(|(n, _)| n.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    if let Some(missing) = (0..ids.len()).find(|i| !ids.contains(i)) {
        bail!(
            "{src}: has tensors of {prefix}{} but none of {prefix}{missing} (they must be numbered 0 .. N-1)",
            ids.iter().next_back().expect("a gap means one id at least")
        );
    }
    Ok(ids.len())
}

/// Work out the model config of `weights` (as loaded by `load_weights`): every size the tensor
/// shapes fix is taken from them; heads, eps, theta, max positions and MoE routing come from the
/// config JSON (see `find_config`) or MiniMind's defaults. A JSON value that contradicts the
/// shapes is an error naming both. Returns the config and a line saying where it came from.
pub fn resolve_config(
    weights: &[(String, Tensor)],
    weights_path: &Path,
    config: Option<&Path>,
) -> Result<(ModelConfig, String)> {
    let src = weights_path.display();
    // The tensors whose shapes fix the config, with the number of dimensions each must have.
    for (n, t) in weights {
        let rank = if n.ends_with("norm.weight") {
            1
        } else if n == EMBED || n.ends_with("_proj.weight") || n.ends_with("mlp.gate.weight") {
            2
        } else {
            continue;
        };
        if t.dim() != rank {
            bail!(
                "{src}: {n} has shape {:?}, where a {rank}-dimensional tensor belongs",
                t.size()
            );
        }
    }
    let shape = |n: &str| weights.iter().find(|(k, _)| k == n).map(|(_, t)| t.size());
    let embed = shape(EMBED).with_context(|| format!("{src}: no {EMBED}"))?;
    let (vocab, d) = (embed[0] as usize, embed[1] as usize);
    let layers = numbered(weights, "model.layers.", &src.to_string())?;
    if layers == 0 {
        bail!("{src}: no model.layers.* tensors");
    }
    let q = shape("model.layers.0.self_attn.q_proj.weight")
        .with_context(|| format!("{src}: no model.layers.0.self_attn.q_proj.weight"))?;
    let k = shape("model.layers.0.self_attn.k_proj.weight")
        .with_context(|| format!("{src}: no model.layers.0.self_attn.k_proj.weight"))?;
    let qk_norm = shape("model.layers.0.self_attn.q_norm.weight");
    let is_moe = shape("model.layers.0.mlp.gate.weight");
    let ffn_name = if is_moe.is_some() {
        "model.layers.0.mlp.experts.0.gate_proj.weight"
    } else {
        "model.layers.0.mlp.gate_proj.weight"
    };
    let ffn = shape(ffn_name).with_context(|| format!("{src}: no {ffn_name}"))?[0] as usize;

    let cfg_path = find_config(weights_path, config);
    let json: Option<serde_json::Value> = match &cfg_path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", p.display()))?,
            )
        }
        None => None,
    };
    let obj = json.as_ref().and_then(config_object);
    let cfg_name = cfg_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // A field of the wrong type is an error, not a silent default.
    if let Some(o) = obj {
        for (key, v) in o.iter().filter(|(_, v)| !v.is_null()) {
            let want = match key.as_str() {
                "hidden_size"
                | "vocab_size"
                | "num_hidden_layers"
                | "num_attention_heads"
                | "num_key_value_heads"
                | "head_dim"
                | "max_position_embeddings"
                | "num_experts_per_tok"
                | "n_routed_experts"
                | "num_experts"
                | "n_shared_experts"
                | "intermediate_size"
                | "moe_intermediate_size" => (v.as_u64().is_some(), "a whole number"),
                "rms_norm_eps" | "rope_theta" | "aux_loss_alpha" | "router_aux_loss_coef" => {
                    (v.as_f64().is_some(), "a number")
                }
                "norm_topk_prob" | "seq_aux" => (v.as_bool().is_some(), "true or false"),
                _ => continue,
            };
            if !want.0 {
                bail!("{cfg_name}: {key} is {v}, where {} belongs", want.1);
            }
        }
    }
    let get_u = |key: &str| obj.and_then(|o| o.get(key)?.as_u64()).map(|v| v as usize);
    let get_f = |key: &str| obj.and_then(|o| o.get(key)?.as_f64());
    let get_b = |key: &str| obj.and_then(|o| o.get(key)?.as_bool());
    let check = |key: &str, from_shapes: usize| -> Result<()> {
        match get_u(key) {
            Some(v) if v != from_shapes => bail!(
                "{cfg_name} says {key} = {v} but {src} has {from_shapes} (from its tensor shapes)"
            ),
            _ => Ok(()),
        }
    };
    check("hidden_size", d)?;
    check("vocab_size", vocab)?;
    check("num_hidden_layers", layers)?;

    let heads = get_u("num_attention_heads").unwrap_or(DEFAULT_HEADS);
    let head_dim = match (qk_norm.as_ref(), get_u("head_dim")) {
        (Some(s), _) => s[0] as usize,
        (None, Some(hd)) => hd,
        (None, None) => d / heads.max(1),
    };
    if heads == 0 || head_dim == 0 || q[0] as usize != heads * head_dim {
        bail!(
            "{src}: q_proj has {} rows, which is not num_attention_heads {heads} x head_dim {head_dim}{}",
            q[0],
            if obj.is_some() { format!(" ({cfg_name})") } else { " (MiniMind default heads; give --config)".into() }
        );
    }
    if k[0] as usize % head_dim != 0 {
        bail!(
            "{src}: k_proj rows {} are not a multiple of head_dim {head_dim}",
            k[0]
        );
    }
    let kv = k[0] as usize / head_dim;
    check("num_key_value_heads", kv)?;
    // MiniMind-3 when the JSON says so (its own key, or a Qwen3 export's model_type), or, for
    // MiniMind-3's own weight files whose JSON names no architecture, by its q/k norm tensors.
    let named = obj.and_then(|o| o.get("architecture")).map(|v| {
        serde_json::from_value::<Architecture>(v.clone())
            .with_context(|| format!("{cfg_name}: architecture {v} is not minimind2 or minimind-3"))
    });
    let architecture = match named.transpose()? {
        Some(a) => a,
        None => match obj.and_then(|o| o.get("model_type")?.as_str()) {
            Some("qwen3" | "qwen3_moe") => Architecture::MiniMind3,
            Some(_) => Architecture::MiniMind2,
            None if qk_norm.is_some() => Architecture::MiniMind3,
            None => Architecture::MiniMind2,
        },
    };
    let defaults = match architecture {
        Architecture::MiniMind2 => ModelConfig::default(),
        Architecture::MiniMind3 => ModelConfig::minimind3(),
    };
    let mut cfg = ModelConfig {
        hidden_size: d,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: (head_dim * heads != d).then_some(head_dim),
        vocab_size: vocab,
        intermediate_size: Some(ffn),
        rms_norm_eps: get_f("rms_norm_eps").unwrap_or(defaults.rms_norm_eps),
        rope_theta: get_f("rope_theta").unwrap_or(defaults.rope_theta),
        max_position_embeddings: get_u("max_position_embeddings")
            .unwrap_or(defaults.max_position_embeddings),
        qk_norm: qk_norm.is_some(),
        use_moe: is_moe.is_some(),
        ..defaults.clone()
    };
    if let Some(g) = is_moe {
        let n_routed = g[0] as usize;
        cfg.num_experts_per_tok =
            get_u("num_experts_per_tok").unwrap_or(defaults.num_experts_per_tok);
        cfg.norm_topk_prob = get_b("norm_topk_prob").unwrap_or(defaults.norm_topk_prob);
        let shared = numbered(
            weights,
            "model.layers.0.mlp.shared_experts.",
            &src.to_string(),
        )?;
        match architecture {
            Architecture::MiniMind2 => {
                check("n_routed_experts", n_routed)?;
                cfg.n_routed_experts = n_routed;
                cfg.n_shared_experts = shared;
                cfg.aux_loss_alpha = get_f("aux_loss_alpha").unwrap_or(defaults.aux_loss_alpha);
                cfg.seq_aux = get_b("seq_aux").unwrap_or(defaults.seq_aux);
            }
            Architecture::MiniMind3 => {
                check("num_experts", n_routed)?;
                if shared > 0 {
                    bail!("{src}: has shared experts, which MiniMind-3's MoE does not (its JSON {cfg_name} says minimind-3)");
                }
                cfg.num_experts = n_routed;
                cfg.moe_intermediate_size = Some(ffn);
                cfg.intermediate_size = get_u("intermediate_size").or(Some(ffn));
                cfg.router_aux_loss_coef =
                    get_f("router_aux_loss_coef").unwrap_or(defaults.router_aux_loss_coef);
            }
        }
    }
    cfg.validate()
        .with_context(|| format!("{src}: the model its shapes and {cfg_name} describe"))?;
    let from = match &cfg_path {
        Some(p) if obj.is_some() => format!("shapes of {src} + {}", p.display()),
        Some(p) => format!(
            "shapes of {src} ({} has no model fields; MiniMind defaults)",
            p.display()
        ),
        None => format!("shapes of {src} + MiniMind defaults (no config JSON found)"),
    };
    Ok((cfg, from))
}

/// Load `path` for inference: resolve its config, check names and shapes, convert to `kind`.
pub fn load_for_inference(
    path: &Path,
    config: Option<&Path>,
    kind: Kind,
) -> Result<(ModelConfig, Vec<(String, Tensor)>, String)> {
    let loaded = load_weights(path)?;
    let (cfg, from) = resolve_config(&loaded, path, config)?;
    let w = match_weights(loaded, &cfg.param_shapes(), kind, path)?;
    Ok((cfg, w, from))
}

/// The model in `path` (config resolved as [`resolve_config`] does) in `kind` on `device`, and
/// where its config came from.
pub fn load_model(
    path: &Path,
    config: Option<&Path>,
    kind: Kind,
    device: tch::Device,
) -> Result<(MiniMindForCausalLM, String)> {
    let (cfg, w, from) = load_for_inference(path, config, kind)?;
    let model =
        MiniMindForCausalLM::from_weights(&cfg, w, kind, device, &path.display().to_string())?;
    Ok((model, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The named tensors of a dense model at `cfg`, zeros.
    fn dense(cfg: &ModelConfig) -> Vec<(String, Tensor)> {
        cfg.param_shapes()
            .into_iter()
            .map(|(n, s)| (n, Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu))))
            .collect()
    }

    fn tiny() -> ModelConfig {
        ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 32,
            intermediate_size: Some(32),
            ..ModelConfig::default()
        }
    }

    fn refused(w: &[(String, Tensor)]) -> String {
        resolve_config(w, Path::new("w.safetensors"), None)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    /// Tensors of the wrong rank, and layers or shared experts numbered with gaps (one huge
    /// number), are refused naming the tensor, before anything is sized from them.
    #[test]
    fn tensors_that_cannot_size_a_model_are_refused_by_name() {
        let cfg = tiny();
        assert!(resolve_config(&dense(&cfg), Path::new("w.safetensors"), None).is_ok());
        for (name, shape) in [
            (EMBED, vec![32 * 16]),
            ("model.layers.0.self_attn.q_proj.weight", vec![]),
            ("model.layers.0.input_layernorm.weight", vec![16, 1]),
        ] {
            let mut w = dense(&cfg);
            for (n, t) in w.iter_mut() {
                if n == name {
                    *t = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
                }
            }
            let e = refused(&w);
            assert!(
                e.contains(name) && e.contains("-dimensional tensor belongs"),
                "{e}"
            );
        }
        let mut w = dense(&cfg);
        w.push((
            "model.layers.18446744073709551614.foo".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ));
        let e = refused(&w);
        assert!(
            e.contains("model.layers.18446744073709551614") && e.contains("none of model.layers.2"),
            "{e}"
        );
    }

    /// A config JSON field of the wrong type, or a value no model can have, is refused naming
    /// the file and the field, where it fell back to MiniMind's default or reached RoPE.
    #[test]
    fn config_json_fields_of_the_wrong_type_or_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny();
        let w = dense(&cfg);
        for (field, value, want) in [
            (
                "num_attention_heads",
                serde_json::json!("2"),
                "num_attention_heads is \"2\", where a whole number belongs",
            ),
            (
                "rope_theta",
                serde_json::json!(-1.0),
                "rope_theta is -1, where a number above 1 belongs",
            ),
            (
                "rms_norm_eps",
                serde_json::json!(0.0),
                "rms_norm_eps is 0, where a positive number belongs",
            ),
            (
                "max_position_embeddings",
                serde_json::json!(0),
                "max_position_embeddings is 0",
            ),
        ] {
            let mut j = serde_json::json!({"hidden_size": 16, "num_attention_heads": 2});
            j[field] = value;
            let p = dir.path().join(format!("{field}.json"));
            std::fs::write(&p, j.to_string()).unwrap();
            let e = resolve_config(&w, Path::new("w.safetensors"), Some(&p))
                .map(|_| ())
                .unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.contains(&format!("{field}.json")) && e.contains(want),
                "{e}"
            );
        }
    }
}

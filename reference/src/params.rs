//! Parameters keyed by MiniMind's state_dict names; `lm_head.weight` is tied and not stored.

use std::collections::BTreeMap;

use ndarray::{ArrayD, ArrayView1, ArrayView2, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use ndarray_rand::rand_distr::Normal;
use ndarray_rand::RandomExt;

use crate::ModelConfig;

/// Named float64 tensors (weights, gradients, optimizer moments).
pub type Params = BTreeMap<String, ArrayD<f64>>;

/// Every parameter name and shape, in MiniMind's state_dict naming (sorted by name).
///
/// Attention uses `head_dim()` (which MiniMind-3 may set apart from d / H): q [H*hd, d],
/// k/v [KV*hd, d], o [d, H*hd], q/k norm [hd]. MoE layers: router `mlp.gate.weight` [E, d] and
/// experts of `expert_width()`; MiniMind-3 has no shared experts.
pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim(), cfg.ffn_width());
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    let mlp = |out: &mut Vec<(String, Vec<usize>)>, p: &str, f: usize| {
        out.push((format!("{p}.gate_proj.weight"), vec![f, d]));
        out.push((format!("{p}.up_proj.weight"), vec![f, d]));
        out.push((format!("{p}.down_proj.weight"), vec![d, f]));
    };
    for i in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{i}");
        out.push((format!("{l}.input_layernorm.weight"), vec![d]));
        out.push((format!("{l}.post_attention_layernorm.weight"), vec![d]));
        out.push((format!("{l}.self_attn.q_proj.weight"), vec![h * hd, d]));
        out.push((format!("{l}.self_attn.k_proj.weight"), vec![kv * hd, d]));
        out.push((format!("{l}.self_attn.v_proj.weight"), vec![kv * hd, d]));
        out.push((format!("{l}.self_attn.o_proj.weight"), vec![d, h * hd]));
        if cfg.qk_norm {
            out.push((format!("{l}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{l}.self_attn.k_norm.weight"), vec![hd]));
        }
        if cfg.use_moe {
            let fe = cfg.expert_width();
            out.push((
                format!("{l}.mlp.gate.weight"),
                vec![cfg.routed_experts(), d],
            ));
            for e in 0..cfg.routed_experts() {
                mlp(&mut out, &format!("{l}.mlp.experts.{e}"), fe);
            }
            for e in 0..cfg.shared_experts() {
                mlp(&mut out, &format!("{l}.mlp.shared_experts.{e}"), fe);
            }
        } else {
            mlp(&mut out, &format!("{l}.mlp"), f);
        }
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    out.sort();
    out
}

/// Every parameter name, sorted.
pub fn param_names(cfg: &ModelConfig) -> Vec<String> {
    param_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// Matrices ~ Normal(0, 0.02) from a seeded `StdRng`, norm weights ones.
pub fn init_params(cfg: &ModelConfig, seed: u64) -> Params {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0, 0.02).expect("valid std");
    param_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = if shape.len() == 1 {
                ArrayD::ones(IxDyn(&shape))
            } else {
                ArrayD::random_using(IxDyn(&shape), normal, &mut rng)
            };
            (name, t)
        })
        .collect()
}

/// Zeros shaped like `p` (gradient / moment buffers).
pub fn zeros_like(p: &Params) -> Params {
    p.iter()
        .map(|(k, v)| (k.clone(), ArrayD::zeros(v.raw_dim())))
        .collect()
}

/// The named tensor as a matrix. Panics with the name if absent or not 2-D.
pub fn mat<'a>(p: &'a Params, name: &str) -> ArrayView2<'a, f64> {
    p.get(name)
        .unwrap_or_else(|| panic!("missing parameter {name}"))
        .view()
        .into_dimensionality()
        .unwrap_or_else(|_| panic!("parameter {name} is not 2-D"))
}

/// The named tensor as a vector. Panics with the name if absent or not 1-D.
pub fn vec1<'a>(p: &'a Params, name: &str) -> ArrayView1<'a, f64> {
    p.get(name)
        .unwrap_or_else(|| panic!("missing parameter {name}"))
        .view()
        .into_dimensionality()
        .unwrap_or_else(|_| panic!("parameter {name} is not 1-D"))
}

/// `acc[name] += g` (inserting if absent).
pub fn accumulate(acc: &mut Params, name: &str, g: ArrayD<f64>) {
    match acc.get_mut(name) {
        Some(a) => *a += &g,
        None => {
            acc.insert(name.to_string(), g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{golden_minimind, golden_minimind3, golden_seed004, read_json, Tensors};

    /// The `param.*` names and shapes PyTorch saved next to a fixture's config.
    fn fixture_shapes(
        dir: &std::path::Path,
        name: &str,
    ) -> (ModelConfig, Vec<(String, Vec<usize>)>) {
        let j = read_json(&dir.join(format!("{name}.json")));
        let cfg: ModelConfig = serde_json::from_value(j["config"].clone()).unwrap();
        let t = Tensors::load(&dir.join(format!("{name}.safetensors")));
        let shapes = t
            .group("param.")
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect();
        (cfg, shapes)
    }

    #[test]
    fn names_and_shapes_equal_the_tensors_pytorch_saved_for_every_model_fixture() {
        for (dir, name) in [
            (golden_minimind(), "dense_tiny"),
            (golden_minimind(), "moe_tiny"),
            (golden_minimind3(), "dense3_tiny"),
            (golden_minimind3(), "moe3_tiny"),
            (golden_minimind3(), "dense3_head96"),
            (golden_seed004(), "mlm3_tiny"),
        ] {
            let (cfg, expected) = fixture_shapes(&dir, name);
            assert_eq!(param_shapes(&cfg), expected, "{name}");
        }
    }

    #[test]
    fn head_dim_96_on_hidden_32_widens_q_k_v_o_and_the_qk_norms() {
        let (cfg, shapes) = fixture_shapes(&golden_minimind3(), "dense3_head96");
        assert_eq!(cfg.head_dim(), 96);
        let get = |n: &str| shapes.iter().find(|(k, _)| k == n).unwrap().1.clone();
        let a = "model.layers.0.self_attn";
        assert_eq!(get(&format!("{a}.q_proj.weight")), vec![2 * 96, 32]);
        assert_eq!(get(&format!("{a}.k_proj.weight")), vec![96, 32]);
        assert_eq!(get(&format!("{a}.o_proj.weight")), vec![32, 2 * 96]);
        assert_eq!(get(&format!("{a}.q_norm.weight")), vec![96]);
    }

    #[test]
    fn minimind_26m_has_the_expected_parameter_count() {
        let cfg = ModelConfig::minimind_26m();
        let (d, f, v, kv_dim) = (512, 1408, 6400, 2 * 64);
        let per_layer = 2 * d * d + 2 * kv_dim * d + 3 * f * d + 2 * d;
        let expected = v * d + 8 * per_layer + d;
        let total: usize = param_shapes(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(total, expected);
        assert!((25_000_000..27_000_000).contains(&total));
    }

    #[test]
    fn init_is_seeded_and_norms_start_at_one() {
        let cfg = ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 8,
            ..ModelConfig::default()
        };
        let (a, b) = (init_params(&cfg, 1), init_params(&cfg, 1));
        assert_eq!(a, b);
        assert!(a["model.norm.weight"].iter().all(|&x| x == 1.0));
        assert_ne!(a, init_params(&cfg, 2));
    }
}

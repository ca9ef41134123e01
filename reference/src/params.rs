//! Parameters keyed by MiniMind's state_dict names; `lm_head.weight` is tied and not stored.

use std::collections::BTreeMap;

use ndarray::{ArrayD, ArrayView1, ArrayView2, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use ndarray_rand::rand_distr::Normal;
use ndarray_rand::RandomExt;

use crate::ModelConfig;

/// Named float64 tensors (weights, gradients, optimizer moments).
pub type Params = BTreeMap<String, ArrayD<f64>>;

/// Every parameter name and shape, in MiniMind's state_dict naming.
pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim(), cfg.ffn_width());
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    let mlp = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
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
            out.push((
                format!("{l}.mlp.gate.weight"),
                vec![cfg.n_routed_experts, d],
            ));
            for e in 0..cfg.n_routed_experts {
                mlp(&mut out, &format!("{l}.mlp.experts.{e}"));
            }
            for e in 0..cfg.n_shared_experts {
                mlp(&mut out, &format!("{l}.mlp.shared_experts.{e}"));
            }
        } else {
            mlp(&mut out, &format!("{l}.mlp"));
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

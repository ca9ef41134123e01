//! Model configuration: MiniMind's `MiniMindConfig` fields, deserialised from a fixture's or a
//! checkpoint's JSON `config` object, or from a MiniMind-3 / Qwen3 `config.json`.
//!
//! Two architectures share the struct. MiniMind2 (the 26M "MiniMind2-small" family) is the
//! default; MiniMind-3 (`"architecture": "minimind-3"`) has an explicit `head_dim`, q/k RMSNorm,
//! the FFN width `ceil(d * pi / 64) * 64` and a MoE of `num_experts` routed experts without shared
//! ones, with its own aux loss (`router_aux_loss_coef`). A JSON that leaves a field out gets the
//! default of the architecture it names (MiniMind-3: eps 1e-6, 4 kv heads, top-1). Unknown fields
//! (`scoring_func`, `bos_token_id`, ...) are ignored.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

/// Which MiniMind generation a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Architecture {
    #[default]
    #[serde(rename = "minimind2", alias = "MiniMind2")]
    MiniMind2,
    #[serde(rename = "minimind-3", alias = "minimind3", alias = "MiniMind-3")]
    MiniMind3,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "JsonConfig")]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Size of each attention head; `None` means hidden / heads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    /// FFN width; `None` means derived, see [`ModelConfig::ffn_width`].
    pub intermediate_size: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub use_moe: bool,
    pub num_experts_per_tok: usize,
    /// MiniMind2 MoE: routed experts.
    pub n_routed_experts: usize,
    /// MiniMind2 MoE: experts every token goes through.
    pub n_shared_experts: usize,
    /// MiniMind2 MoE: aux-loss weight.
    pub aux_loss_alpha: f64,
    /// MiniMind2 MoE: per-sequence aux loss.
    pub seq_aux: bool,
    pub norm_topk_prob: bool,
    pub qk_norm: bool,
    pub architecture: Architecture,
    /// MiniMind-3 MoE: routed experts.
    pub num_experts: usize,
    /// Each expert's FFN width; `None` means the dense FFN width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    /// MiniMind-3 MoE: aux-loss weight.
    pub router_aux_loss_coef: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            hidden_size: 512,
            num_hidden_layers: 8,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: None,
            vocab_size: 6400,
            intermediate_size: None,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            max_position_embeddings: 32768,
            use_moe: false,
            num_experts_per_tok: 2,
            n_routed_experts: 4,
            n_shared_experts: 1,
            aux_loss_alpha: 0.01,
            seq_aux: true,
            norm_topk_prob: true,
            qk_norm: false,
            architecture: Architecture::MiniMind2,
            num_experts: 4,
            moe_intermediate_size: None,
            router_aux_loss_coef: 5e-4,
        }
    }
}

/// A JSON config with every field optional, so that the architecture it names picks the defaults.
#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonConfig {
    architecture: Option<Architecture>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    intermediate_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    use_moe: Option<bool>,
    num_experts_per_tok: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    aux_loss_alpha: Option<f64>,
    seq_aux: Option<bool>,
    norm_topk_prob: Option<bool>,
    qk_norm: Option<bool>,
    num_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    router_aux_loss_coef: Option<f64>,
}

impl From<JsonConfig> for ModelConfig {
    fn from(j: JsonConfig) -> Self {
        let mut c = match j.architecture.unwrap_or_default() {
            Architecture::MiniMind2 => ModelConfig::default(),
            Architecture::MiniMind3 => ModelConfig::minimind3(),
        };
        macro_rules! given {
            ($($f:ident),*) => { $( if let Some(v) = j.$f { c.$f = v; } )* };
        }
        given!(
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            use_moe,
            num_experts_per_tok,
            n_routed_experts,
            n_shared_experts,
            aux_loss_alpha,
            seq_aux,
            norm_topk_prob,
            qk_norm,
            num_experts,
            router_aux_loss_coef
        );
        c.head_dim = j.head_dim;
        c.intermediate_size = j.intermediate_size;
        c.moe_intermediate_size = j.moe_intermediate_size;
        c
    }
}

impl ModelConfig {
    /// MiniMind2-small, 26M: d 512, 8 layers, 8 heads, 2 kv heads, vocab 6400, FFN 1408.
    pub fn minimind_26m() -> Self {
        ModelConfig::default()
    }

    /// MiniMind-3's `MiniMindConfig()`: d 768, 8 layers, 8 heads, 4 kv heads, head dim 96, q/k
    /// norm, eps 1e-6, FFN 2432; MoE (when on) 4 routed experts, top-1, aux coefficient 5e-4.
    pub fn minimind3() -> Self {
        ModelConfig {
            hidden_size: 768,
            num_key_value_heads: 4,
            rms_norm_eps: 1e-6,
            num_experts_per_tok: 1,
            qk_norm: true,
            architecture: Architecture::MiniMind3,
            ..ModelConfig::default()
        }
    }

    pub fn is_minimind3(&self) -> bool {
        self.architecture == Architecture::MiniMind3
    }

    /// FFN width actually built: `intermediate_size`, or per architecture MiniMind2's
    /// `64 * ((int(8d/3) + 63) // 64)` or MiniMind-3's `ceil(d * pi / 64) * 64`.
    pub fn ffn_width(&self) -> usize {
        let d = self.hidden_size;
        self.intermediate_size.unwrap_or(match self.architecture {
            Architecture::MiniMind2 => 64 * ((8 * d / 3 + 63) / 64),
            // Python's math.ceil(d * math.pi / 64): the same two f64 operations.
            Architecture::MiniMind3 => 64 * (d as f64 * PI / 64.0).ceil() as usize,
        })
    }

    /// Each MoE expert's FFN width: `moe_intermediate_size`, else the dense width.
    pub fn expert_width(&self) -> usize {
        self.moe_intermediate_size
            .unwrap_or_else(|| self.ffn_width())
    }

    /// Routed experts of a MoE layer.
    pub fn routed_experts(&self) -> usize {
        match self.architecture {
            Architecture::MiniMind2 => self.n_routed_experts,
            Architecture::MiniMind3 => self.num_experts,
        }
    }

    /// Experts every token goes through (MiniMind-3 has none).
    pub fn shared_experts(&self) -> usize {
        match self.architecture {
            Architecture::MiniMind2 => self.n_shared_experts,
            Architecture::MiniMind3 => 0,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Query heads served by each key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Errors that would otherwise surface as shape panics deep inside the forward.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            self.hidden_size > 0 && self.num_attention_heads > 0,
            "empty model: {self:?}"
        );
        ensure!(
            self.head_dim.is_some() || self.hidden_size % self.num_attention_heads == 0,
            "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim is given)",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(self.head_dim() > 0, "head_dim must be positive");
        ensure!(
            self.head_dim() % 2 == 0,
            "head_dim {} must be even for RoPE",
            self.head_dim()
        );
        ensure!(
            self.num_key_value_heads > 0
                && self.num_attention_heads % self.num_key_value_heads == 0,
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            self.num_attention_heads,
            self.num_key_value_heads
        );
        ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0,
            "rms_norm_eps is {}, where a positive number belongs",
            self.rms_norm_eps
        );
        ensure!(
            self.rope_theta.is_finite() && self.rope_theta > 1.0,
            "rope_theta is {}, where a number above 1 belongs",
            self.rope_theta
        );
        ensure!(
            self.max_position_embeddings >= 2,
            "max_position_embeddings is {}; it must be at least 2",
            self.max_position_embeddings
        );
        for coef in [self.aux_loss_alpha, self.router_aux_loss_coef] {
            ensure!(
                coef.is_finite() && coef >= 0.0,
                "the aux-loss coefficient is {coef}, where zero or a positive number belongs"
            );
        }
        let n = self.param_count();
        ensure!(
            n <= MAX_PARAMS,
            "the model would have {n} parameters ({:.0} GiB in fp32), more than the {MAX_PARAMS} this trainer takes: check hidden_size, num_hidden_layers, intermediate_size, vocab_size and the experts",
            n as f64 * 4.0 / (1u64 << 30) as f64
        );
        if self.use_moe {
            ensure!(
                self.num_experts_per_tok >= 1 && self.num_experts_per_tok <= self.routed_experts(),
                "num_experts_per_tok {} must be in 1..={} (the routed experts)",
                self.num_experts_per_tok,
                self.routed_experts()
            );
        }
        Ok(())
    }

    /// Every parameter name and shape in MiniMind's state_dict naming (tied `lm_head.weight`
    /// omitted), sorted by name.
    pub fn param_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (d, hd) = (self.hidden_size as i64, self.head_dim() as i64);
        let (h, kv) = (
            self.num_attention_heads as i64,
            self.num_key_value_heads as i64,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size as i64, d],
        )];
        let mlp = |out: &mut Vec<(String, Vec<i64>)>, p: &str, f: usize| {
            let f = f as i64;
            out.push((format!("{p}.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.down_proj.weight"), vec![d, f]));
        };
        for i in 0..self.num_hidden_layers {
            let l = format!("model.layers.{i}");
            out.push((format!("{l}.input_layernorm.weight"), vec![d]));
            out.push((format!("{l}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{l}.self_attn.q_proj.weight"), vec![h * hd, d]));
            out.push((format!("{l}.self_attn.k_proj.weight"), vec![kv * hd, d]));
            out.push((format!("{l}.self_attn.v_proj.weight"), vec![kv * hd, d]));
            out.push((format!("{l}.self_attn.o_proj.weight"), vec![d, h * hd]));
            if self.qk_norm {
                out.push((format!("{l}.self_attn.q_norm.weight"), vec![hd]));
                out.push((format!("{l}.self_attn.k_norm.weight"), vec![hd]));
            }
            if self.use_moe {
                out.push((
                    format!("{l}.mlp.gate.weight"),
                    vec![self.routed_experts() as i64, d],
                ));
                for e in 0..self.routed_experts() {
                    mlp(
                        &mut out,
                        &format!("{l}.mlp.experts.{e}"),
                        self.expert_width(),
                    );
                }
                for e in 0..self.shared_experts() {
                    mlp(
                        &mut out,
                        &format!("{l}.mlp.shared_experts.{e}"),
                        self.expert_width(),
                    );
                }
            } else {
                mlp(&mut out, &format!("{l}.mlp"), self.ffn_width());
            }
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        out.sort();
        out
    }

    /// Number of parameters (the tied embedding counted once) from the sizes alone, without
    /// listing them, so that any option values give an answer at once.
    /// Saturates at `u128::MAX` (sizes no machine could hold either way).
    pub fn param_count(&self) -> u128 {
        let u = |v: usize| v as u128;
        let (d, hd) = (u(self.hidden_size), u(self.head_dim()));
        let (h, kv) = (u(self.num_attention_heads), u(self.num_key_value_heads));
        let mul = |a: u128, b: u128| a.saturating_mul(b);
        let attn =
            mul(mul(2 * (h + kv), hd), d).saturating_add(if self.qk_norm { 2 * hd } else { 0 });
        let mlp = |f: usize| mul(3 * d, u(f));
        let ffn = if self.use_moe {
            mul(u(self.routed_experts()), d).saturating_add(mul(
                u(self.routed_experts()) + u(self.shared_experts()),
                mlp(self.expert_width()),
            ))
        } else {
            mlp(self.ffn_width())
        };
        mul(u(self.vocab_size), d)
            .saturating_add(mul(
                u(self.num_hidden_layers),
                (2 * d).saturating_add(attn).saturating_add(ffn),
            ))
            .saturating_add(d)
    }

    /// Number of parameters (the tied embedding counted once).
    pub fn num_params(&self) -> i64 {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum()
    }
}

/// The most parameters a model may have: 2^36 (275 GB of fp32 weights, beyond any one machine
/// this trainer runs on), so that a mistyped size is refused before anything is allocated.
pub const MAX_PARAMS: u128 = 1 << 36;

#[cfg(test)]
mod tests {
    use super::*;

    /// The count from the sizes equals the sum over the listed shapes.
    #[test]
    fn param_count_is_the_sum_of_the_listed_shapes() {
        let moe = ModelConfig {
            use_moe: true,
            ..ModelConfig::minimind_26m()
        };
        let m3_moe = ModelConfig {
            use_moe: true,
            ..ModelConfig::minimind3()
        };
        for c in [
            ModelConfig::minimind_26m(),
            ModelConfig::minimind3(),
            moe,
            m3_moe,
        ] {
            assert_eq!(c.param_count(), c.num_params() as u128, "{c:?}");
        }
        let huge = ModelConfig {
            num_hidden_layers: 100_000_000,
            ..ModelConfig::minimind_26m()
        };
        let e = huge.validate().unwrap_err().to_string();
        assert!(
            e.contains("more than the 68719476736 this trainer takes"),
            "{e}"
        );
    }

    #[test]
    fn derived_ffn_width_is_1408_for_d512() {
        assert_eq!(ModelConfig::minimind_26m().ffn_width(), 1408);
    }

    #[test]
    fn null_intermediate_size_and_missing_fields_take_defaults() {
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"hidden_size": 64, "intermediate_size": null, "scoring_func": "softmax"}"#,
        )
        .unwrap();
        assert_eq!(cfg.ffn_width(), 192);
        assert_eq!(cfg.rope_theta, 1e6);
        assert!(!cfg.qk_norm);
    }

    #[test]
    fn the_26m_model_has_about_26m_parameters() {
        let n = ModelConfig::minimind_26m().num_params();
        assert!((25_000_000..27_000_000).contains(&n), "{n}");
    }
}

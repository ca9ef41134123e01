//! Model configuration: MiniMind's `MiniMindConfig` fields, deserialised from a fixture's or a
//! checkpoint's JSON `config` object. Missing fields take MiniMind's defaults; unknown fields
//! (`scoring_func`, `bos_token_id`, ...) are ignored. `qk_norm` is MiniMind-3's q/k RMSNorm and
//! `head_dim` its explicit head size (absent: `hidden_size / num_attention_heads`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Size of each attention head; `None` (JSON null or absent) means hidden / heads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    /// FFN width; `None` (JSON null or absent) means derived, see [`ModelConfig::ffn_width`].
    pub intermediate_size: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub use_moe: bool,
    pub num_experts_per_tok: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub aux_loss_alpha: f64,
    pub seq_aux: bool,
    pub norm_topk_prob: bool,
    pub qk_norm: bool,
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
        }
    }
}

impl ModelConfig {
    /// MiniMind2-small, 26M: d 512, 8 layers, 8 heads, 2 kv heads, vocab 6400, FFN 1408.
    pub fn minimind_26m() -> Self {
        ModelConfig::default()
    }

    /// FFN width actually built: `intermediate_size`, or `64 * ((int(8d/3) + 63) // 64)`.
    pub fn ffn_width(&self) -> usize {
        self.intermediate_size
            .unwrap_or(64 * ((8 * self.hidden_size / 3 + 63) / 64))
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
        if self.use_moe {
            ensure!(
                self.num_experts_per_tok >= 1 && self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok {} must be in 1..={} (n_routed_experts)",
                self.num_experts_per_tok,
                self.n_routed_experts
            );
        }
        Ok(())
    }

    /// Every parameter name and shape in MiniMind's state_dict naming (tied `lm_head.weight`
    /// omitted), sorted by name.
    pub fn param_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (d, hd, f) = (
            self.hidden_size as i64,
            self.head_dim() as i64,
            self.ffn_width() as i64,
        );
        let (h, kv) = (
            self.num_attention_heads as i64,
            self.num_key_value_heads as i64,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size as i64, d],
        )];
        let mlp = |out: &mut Vec<(String, Vec<i64>)>, p: &str| {
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
                    vec![self.n_routed_experts as i64, d],
                ));
                for e in 0..self.n_routed_experts {
                    mlp(&mut out, &format!("{l}.mlp.experts.{e}"));
                }
                for e in 0..self.n_shared_experts {
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

    /// Number of parameters (the tied embedding counted once).
    pub fn num_params(&self) -> i64 {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Model configuration: MiniMind's `MiniMindConfig` fields, deserialised from fixture JSON.

use serde::{Deserialize, Serialize};

/// MiniMind model configuration. Missing fields take MiniMind's defaults; `qk_norm` is ours
/// (MiniMind-3's q/k RMSNorm), off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    /// FFN width; `None` (JSON null or absent) means derived, see [`ModelConfig::ffn_width`].
    pub intermediate_size: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
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
            vocab_size: 6400,
            intermediate_size: None,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
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
    /// The 26M MiniMind2-small config: d 512, 8 layers, 8 heads, 2 kv heads, vocab 6400.
    pub fn minimind_26m() -> Self {
        ModelConfig::default()
    }

    /// FFN width actually built: `intermediate_size`, or `64 * ((int(8d/3) + 63) // 64)`.
    pub fn ffn_width(&self) -> usize {
        self.intermediate_size
            .unwrap_or(64 * (8 * self.hidden_size / 3).div_ceil(64))
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads served by each key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
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
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"hidden_size": 64, "intermediate_size": null}"#).unwrap();
        assert_eq!(cfg.ffn_width(), 192);
        assert_eq!(cfg.rope_theta, 1e6);
        assert!(!cfg.qk_norm);
    }
}

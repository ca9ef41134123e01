//! Model configuration: MiniMind's `MiniMindConfig` fields, deserialised from fixture JSON.
//!
//! Two architectures share one struct. MiniMind2 (the version the pretraining write-ups
//! describe) is the default; MiniMind-3 (`"architecture": "minimind-3"`, upstream d65ef2c) adds
//! an explicit `head_dim`, always-on q/k RMSNorm, a pi-based FFN width and a simpler MoE
//! (`num_experts`, `moe_intermediate_size`, `router_aux_loss_coef`, no shared experts). Missing
//! JSON fields take the defaults of the architecture the JSON names, so a MiniMind-3 config that
//! leaves out `rms_norm_eps` gets upstream's 1e-6, not MiniMind2's 1e-5. Unknown keys are ignored.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

/// Which MiniMind generation a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Architecture {
    /// MiniMind2: FFN `64*((int(8d/3)+63)//64)`, MoE with shared experts and seq aux loss.
    #[default]
    #[serde(rename = "minimind2", alias = "MiniMind2")]
    MiniMind2,
    /// MiniMind-3: FFN `ceil(d*pi/64)*64`, q/k norm, MoE without shared experts.
    #[serde(rename = "minimind-3", alias = "minimind3", alias = "MiniMind-3")]
    MiniMind3,
}

/// MiniMind model configuration. `qk_norm` is ours for MiniMind2 (off by default) and on by
/// default for MiniMind-3, where upstream always applies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawConfig")]
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
    /// MiniMind2 MoE: routed experts.
    pub n_routed_experts: usize,
    /// MiniMind2 MoE: experts applied to every token.
    pub n_shared_experts: usize,
    /// MiniMind2 MoE aux-loss weight.
    pub aux_loss_alpha: f64,
    /// MiniMind2 MoE: per-sequence aux loss.
    pub seq_aux: bool,
    pub norm_topk_prob: bool,
    pub qk_norm: bool,
    /// Per-head width; `None` means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub architecture: Architecture,
    /// MiniMind-3 MoE: routed experts.
    pub num_experts: usize,
    /// Expert FFN width; `None` means the dense FFN width.
    pub moe_intermediate_size: Option<usize>,
    /// MiniMind-3 MoE aux-loss weight.
    pub router_aux_loss_coef: f64,
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
            head_dim: None,
            architecture: Architecture::MiniMind2,
            num_experts: 4,
            moe_intermediate_size: None,
            router_aux_loss_coef: 5e-4,
        }
    }
}

impl ModelConfig {
    /// The 26M MiniMind2-small config: d 512, 8 layers, 8 heads, 2 kv heads, vocab 6400.
    pub fn minimind_26m() -> Self {
        ModelConfig::default()
    }

    /// MiniMind-3's `MiniMindConfig()` defaults: d 768, 8 layers, 8 heads, 4 kv heads, vocab 6400,
    /// eps 1e-6, q/k norm, MoE (when enabled) 4 experts, top-1, aux coefficient 5e-4.
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

    /// FFN width actually built: `intermediate_size`, or derived per architecture:
    /// MiniMind2 `64 * ((int(8d/3) + 63) // 64)`, MiniMind-3 `ceil(d * pi / 64) * 64`.
    pub fn ffn_width(&self) -> usize {
        let d = self.hidden_size;
        self.intermediate_size.unwrap_or(match self.architecture {
            Architecture::MiniMind2 => 64 * (8 * d / 3).div_ceil(64),
            // Python's `math.ceil(hidden_size * math.pi / 64)`: the same two f64 operations.
            Architecture::MiniMind3 => 64 * (d as f64 * PI / 64.0).ceil() as usize,
        })
    }

    /// Width of each MoE expert's FFN: `moe_intermediate_size`, else the dense FFN width.
    pub fn expert_width(&self) -> usize {
        self.moe_intermediate_size
            .unwrap_or_else(|| self.ffn_width())
    }

    /// Routed experts of a MoE layer (`num_experts` for MiniMind-3, `n_routed_experts` before).
    pub fn routed_experts(&self) -> usize {
        match self.architecture {
            Architecture::MiniMind2 => self.n_routed_experts,
            Architecture::MiniMind3 => self.num_experts,
        }
    }

    /// Shared (always applied) experts of a MoE layer; MiniMind-3 has none.
    pub fn shared_experts(&self) -> usize {
        match self.architecture {
            Architecture::MiniMind2 => self.n_shared_experts,
            Architecture::MiniMind3 => 0,
        }
    }

    /// `head_dim` when set, else `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Query heads served by each key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// What a JSON config may say; every field optional so the architecture picks the defaults.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    architecture: Option<Architecture>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    vocab_size: Option<usize>,
    intermediate_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    use_moe: Option<bool>,
    num_experts_per_tok: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    aux_loss_alpha: Option<f64>,
    seq_aux: Option<bool>,
    norm_topk_prob: Option<bool>,
    qk_norm: Option<bool>,
    head_dim: Option<usize>,
    num_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    router_aux_loss_coef: Option<f64>,
}

impl From<RawConfig> for ModelConfig {
    fn from(r: RawConfig) -> Self {
        let mut c = match r.architecture.unwrap_or_default() {
            Architecture::MiniMind2 => ModelConfig::default(),
            Architecture::MiniMind3 => ModelConfig::minimind3(),
        };
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = r.$f { c.$f = v; } )* };
        }
        take!(
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            vocab_size,
            rms_norm_eps,
            rope_theta,
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
        c.intermediate_size = r.intermediate_size;
        c.head_dim = r.head_dim;
        c.moe_intermediate_size = r.moe_intermediate_size;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{golden_minimind, golden_minimind3, golden_seed004, read_json};

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
        assert_eq!(cfg.architecture, Architecture::MiniMind2);
    }

    #[test]
    fn minimind3_ffn_width_is_ceil_d_pi_over_64_times_64() {
        let w = |d| {
            ModelConfig {
                hidden_size: d,
                ..ModelConfig::minimind3()
            }
            .ffn_width()
        };
        // 768 -> 2432 is upstream's default model; d 32 -> 128 is the width upstream derived for
        // dense3_tiny and mlm3_tiny (their intermediate_size_used)
        assert_eq!(
            (w(768), w(512), w(64), w(48), w(32)),
            (2432, 1664, 256, 192, 128)
        );
    }

    #[test]
    fn minimind3_defaults_follow_upstream_when_the_json_omits_them() {
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"architecture": "minimind-3", "hidden_size": 32}"#).unwrap();
        assert!(cfg.is_minimind3() && cfg.qk_norm);
        assert_eq!((cfg.rms_norm_eps, cfg.num_key_value_heads), (1e-6, 4));
        assert_eq!((cfg.num_experts_per_tok, cfg.routed_experts()), (1, 4));
        assert_eq!(cfg.shared_experts(), 0);
        assert_eq!(cfg.expert_width(), cfg.ffn_width());
    }

    #[test]
    fn explicit_head_dim_wins_over_hidden_over_heads() {
        let cfg = ModelConfig {
            hidden_size: 32,
            num_attention_heads: 2,
            head_dim: Some(96),
            ..ModelConfig::minimind3()
        };
        assert_eq!(cfg.head_dim(), 96);
        assert_eq!(ModelConfig::default().head_dim(), 64);
    }

    #[test]
    fn every_fixture_config_parses_and_builds_the_ffn_width_pytorch_built() {
        let mut seen = 0;
        for dir in [golden_minimind(), golden_minimind3(), golden_seed004()] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let j = read_json(&path);
                let Some(c) = j.get("config") else { continue };
                let cfg: ModelConfig = serde_json::from_value(c.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if let Some(used) = j.get("intermediate_size_used") {
                    let width = if cfg.use_moe {
                        cfg.expert_width()
                    } else {
                        cfg.ffn_width()
                    };
                    assert_eq!(width as u64, used.as_u64().unwrap(), "{}", path.display());
                }
                if let Some(hd) = c.get("head_dim") {
                    assert_eq!(cfg.head_dim() as u64, hd.as_u64().unwrap());
                }
                if c.get("architecture").is_some() {
                    assert!(cfg.is_minimind3(), "{}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} fixture configs found");
    }

    #[test]
    fn a_serialised_config_reads_back_identically() {
        for cfg in [
            ModelConfig::default(),
            ModelConfig {
                head_dim: Some(96),
                moe_intermediate_size: Some(64),
                use_moe: true,
                ..ModelConfig::minimind3()
            },
        ] {
            let back: ModelConfig =
                serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg);
        }
    }
}

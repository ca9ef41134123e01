//! Model presets and the model's command-line options (`pretrain`, `bench`): `--model` sets every
//! field of a published MiniMind model, and each single flag overrides its field.

use anyhow::{bail, Result};

use super::config::{Architecture, ModelConfig};

/// The published MiniMind models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelPreset {
    /// MiniMind2-Small, 26M: d 512, 8 layers, 8 heads / 2 kv heads, FFN 1408.
    #[value(name = "minimind2-small")]
    Minimind2Small,
    /// MiniMind2, 104M: d 768, 16 layers, 8 / 2 heads.
    #[value(name = "minimind2")]
    Minimind2,
    /// MiniMind2-MoE, 145M: d 640, 8 layers, 8 / 2 heads, 4 routed + 1 shared experts, top-2.
    #[value(name = "minimind2-moe")]
    Minimind2Moe,
    /// MiniMind-3, 64M: d 768, 8 layers, 8 / 4 heads of 96, q/k norm, FFN 2432.
    #[value(name = "minimind3")]
    Minimind3,
    /// MiniMind-3 MoE: MiniMind-3 with 4 routed experts (top-1) of width 2432.
    #[value(name = "minimind3-moe")]
    Minimind3Moe,
}

impl ModelPreset {
    pub fn name(self) -> &'static str {
        match self {
            ModelPreset::Minimind2Small => "minimind2-small",
            ModelPreset::Minimind2 => "minimind2",
            ModelPreset::Minimind2Moe => "minimind2-moe",
            ModelPreset::Minimind3 => "minimind3",
            ModelPreset::Minimind3Moe => "minimind3-moe",
        }
    }

    /// Every field of the model (the vocabulary comes from the tokenizer).
    pub fn config(self) -> ModelConfig {
        match self {
            ModelPreset::Minimind2Small => ModelConfig::minimind_26m(),
            ModelPreset::Minimind2 => ModelConfig {
                hidden_size: 768,
                num_hidden_layers: 16,
                ..ModelConfig::default()
            },
            ModelPreset::Minimind2Moe => ModelConfig {
                hidden_size: 640,
                use_moe: true,
                ..ModelConfig::default()
            },
            ModelPreset::Minimind3 => ModelConfig {
                head_dim: Some(96),
                ..ModelConfig::minimind3()
            },
            ModelPreset::Minimind3Moe => ModelConfig {
                head_dim: Some(96),
                use_moe: true,
                ..ModelConfig::minimind3()
            },
        }
    }

    /// The built-in tokenizer the model was published with (`data::defaults`).
    pub fn tokenizer(self) -> &'static str {
        match self {
            ModelPreset::Minimind2Small | ModelPreset::Minimind2 | ModelPreset::Minimind2Moe => {
                "minimind2"
            }
            ModelPreset::Minimind3 | ModelPreset::Minimind3Moe => "minimind3",
        }
    }
}

/// The model options of `pretrain` and `bench`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// A published model: every field below set to its values (single flags still override).
    /// Without it: the 26M MiniMind2-small shape on CUDA, a small one on the CPU.
    #[arg(long, value_enum)]
    pub model: Option<ModelPreset>,
    /// minimind2 or minimind-3: picks the FFN-width rule, the MoE kind and the defaults.
    #[arg(long, value_parser = parse_architecture)]
    pub architecture: Option<Architecture>,
    /// Model width.
    #[arg(long, alias = "hidden_size")]
    pub hidden_size: Option<usize>,
    /// Decoder layers.
    #[arg(long, alias = "num_hidden_layers")]
    pub num_hidden_layers: Option<usize>,
    /// Attention query heads.
    #[arg(long, alias = "num_attention_heads")]
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (GQA).
    #[arg(long, alias = "num_key_value_heads")]
    pub num_key_value_heads: Option<usize>,
    /// Size of each attention head [default: hidden-size / num-attention-heads].
    #[arg(long, alias = "head_dim")]
    pub head_dim: Option<usize>,
    /// FFN width [default: the architecture's rule: MiniMind2 64*ceil(8d/3/64), MiniMind-3
    /// 64*ceil(d*pi/64)].
    #[arg(long, alias = "intermediate_size")]
    pub intermediate_size: Option<usize>,
    /// 1 = RMSNorm over each head of q and k before RoPE (on for MiniMind-3).
    #[arg(long, alias = "qk_norm", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qk_norm: Option<u8>,
    /// 1 = mixture-of-experts MLP (the architecture's MoE).
    #[arg(long, alias = "use_moe", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub use_moe: Option<u8>,
    /// MoE: routed experts.
    #[arg(long, alias = "num_experts")]
    pub num_experts: Option<usize>,
    /// MoE: experts per token (top-k).
    #[arg(long, alias = "num_experts_per_tok")]
    pub num_experts_per_tok: Option<usize>,
    /// MoE: each expert's FFN width [default: the FFN width].
    #[arg(long, alias = "moe_intermediate_size")]
    pub moe_intermediate_size: Option<usize>,
    /// MiniMind2 MoE: shared experts (MiniMind-3 has none).
    #[arg(long, alias = "n_shared_experts")]
    pub n_shared_experts: Option<usize>,
    /// MoE aux-loss weight (MiniMind2's aux_loss_alpha, MiniMind-3's router_aux_loss_coef).
    #[arg(long, alias = "router_aux_loss_coef")]
    pub aux_loss_coef: Option<f64>,
    /// RMSNorm epsilon [default: MiniMind2 1e-5, MiniMind-3 1e-6].
    #[arg(long, alias = "rms_norm_eps")]
    pub rms_norm_eps: Option<f64>,
    /// RoPE base.
    #[arg(long, alias = "rope_theta")]
    pub rope_theta: Option<f64>,
}

fn parse_architecture(s: &str) -> Result<Architecture, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not minimind2 or minimind-3"))
}

impl ModelArgs {
    /// The model: the preset (or `base` without one), the architecture's defaults where only
    /// `--architecture` is given, then every flag given. Names the flag of an impossible value.
    pub fn resolve(&self, base: ModelConfig) -> Result<ModelConfig> {
        let mut c = match (self.model, self.architecture) {
            (Some(p), _) => p.config(),
            (None, Some(Architecture::MiniMind3)) => ModelConfig {
                hidden_size: base.hidden_size,
                num_hidden_layers: base.num_hidden_layers,
                num_attention_heads: base.num_attention_heads,
                ..ModelConfig::minimind3()
            },
            (None, _) => base,
        };
        if let Some(a) = self.architecture {
            c.architecture = a;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            num_experts_per_tok,
            n_shared_experts,
            rms_norm_eps,
            rope_theta
        );
        if self.head_dim.is_some() {
            c.head_dim = self.head_dim;
        }
        if self.intermediate_size.is_some() {
            c.intermediate_size = self.intermediate_size;
        }
        if self.moe_intermediate_size.is_some() {
            c.moe_intermediate_size = self.moe_intermediate_size;
        }
        if let Some(v) = self.qk_norm {
            c.qk_norm = v == 1;
        }
        if let Some(v) = self.use_moe {
            c.use_moe = v == 1;
        }
        if let Some(n) = self.num_experts {
            c.num_experts = n;
            c.n_routed_experts = n;
        }
        if let Some(a) = self.aux_loss_coef {
            c.aux_loss_alpha = a;
            c.router_aux_loss_coef = a;
        }
        if self.n_shared_experts.is_some_and(|n| n > 0) && c.is_minimind3() {
            bail!(
                "--n-shared-experts: MiniMind-3's MoE has no shared experts (give --architecture minimind2 for MiniMind2's)"
            );
        }
        check(&c)?;
        Ok(c)
    }
}

/// The checks that would otherwise surface as shape errors, in the options' names.
pub fn check(c: &ModelConfig) -> Result<()> {
    for (name, v) in [
        ("hidden-size", c.hidden_size),
        ("num-hidden-layers", c.num_hidden_layers),
        ("num-attention-heads", c.num_attention_heads),
        ("num-key-value-heads", c.num_key_value_heads),
    ] {
        if v < 1 {
            bail!("--{name} must be at least 1 (got {v})");
        }
    }
    if c.head_dim.is_none() && c.hidden_size % c.num_attention_heads != 0 {
        bail!(
            "--hidden-size {} is not divisible by --num-attention-heads {} (or give --head-dim)",
            c.hidden_size,
            c.num_attention_heads
        );
    }
    if c.head_dim() % 2 != 0 {
        bail!(
            "head size {} must be even (RoPE rotates pairs): --head-dim, or --hidden-size/--num-attention-heads",
            c.head_dim()
        );
    }
    if c.num_attention_heads % c.num_key_value_heads != 0 {
        bail!(
            "--num-attention-heads {} is not a multiple of --num-key-value-heads {}",
            c.num_attention_heads,
            c.num_key_value_heads
        );
    }
    if c.ffn_width() == 0 || (c.use_moe && c.expert_width() == 0) {
        bail!("--intermediate-size and --moe-intermediate-size must be at least 1");
    }
    if c.use_moe && !(1..=c.routed_experts()).contains(&c.num_experts_per_tok) {
        bail!(
            "--num-experts-per-tok {} must be between 1 and --num-experts {}",
            c.num_experts_per_tok,
            c.routed_experts()
        );
    }
    let n = c.param_count();
    if n > crate::model::config::MAX_PARAMS {
        bail!(
            "the model would have {n} parameters, more than the {} this trainer takes: check --hidden-size, --num-hidden-layers, --intermediate-size, --vocab-size and the experts",
            crate::model::config::MAX_PARAMS
        );
    }
    for coef in [c.aux_loss_alpha, c.router_aux_loss_coef] {
        if !(coef.is_finite() && coef >= 0.0) {
            bail!("--aux-loss-coef (aux_loss_alpha / router_aux_loss_coef) must be zero or a positive number (got {coef})");
        }
    }
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0) {
        bail!(
            "--rms-norm-eps must be a positive number (got {})",
            c.rms_norm_eps
        );
    }
    if !(c.rope_theta.is_finite() && c.rope_theta > 1.0) {
        bail!(
            "--rope-theta must be a number above 1 (got {})",
            c.rope_theta
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MiniMind-3's published default: head dim 96, FFN 2432, 63.9M parameters at vocab 6400.
    #[test]
    fn the_minimind3_preset_is_upstreams_default_model() {
        let c = ModelPreset::Minimind3.config();
        assert_eq!(
            (c.head_dim(), c.ffn_width(), c.num_key_value_heads),
            (96, 2432, 4)
        );
        assert!(c.qk_norm && c.is_minimind3());
        let m = c.num_params() as f64 / 1e6;
        assert!((63.0..65.0).contains(&m), "{m}M");
        let moe = ModelPreset::Minimind3Moe.config();
        assert_eq!(
            (
                moe.routed_experts(),
                moe.shared_experts(),
                moe.expert_width()
            ),
            (4, 0, 2432)
        );
    }

    #[test]
    fn single_flags_override_the_preset() {
        let args = ModelArgs {
            model: Some(ModelPreset::Minimind3),
            num_hidden_layers: Some(2),
            qk_norm: Some(0),
            ..Default::default()
        };
        let c = args.resolve(ModelConfig::default()).unwrap();
        assert_eq!(
            (c.num_hidden_layers, c.qk_norm, c.head_dim()),
            (2, false, 96)
        );
    }

    #[test]
    fn an_impossible_shape_names_the_flag() {
        let args = ModelArgs {
            hidden_size: Some(100),
            num_attention_heads: Some(3),
            ..Default::default()
        };
        let e = args
            .resolve(ModelConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--hidden-size") && e.contains("--head-dim"),
            "{e}"
        );
    }
}

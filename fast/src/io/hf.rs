//! The Hugging Face side of `fast export`: which architecture a MiniMind model is, its
//! `config.json`, and its `model.safetensors` bytes.
//!
//! MiniMind2's dense decoder is exactly Hugging Face's Llama (RMSNorm, rotate-half RoPE with
//! `inv_freq = theta^(-2i/hd)`, GQA, SwiGLU, tied embeddings, no biases), and its state_dict names
//! are Llama's, so the tensors are written unchanged: no q/k permutation is needed (the rotate-half
//! convention is the one HF Llama uses; `tests/export_hf.rs` checks the logits numerically).
//! With qk-norm the layout is Qwen3's (`self_attn.q_norm` / `k_norm` over head_dim before RoPE),
//! which is MiniMind-3's (as upstream's own converter writes it); MiniMind-3's MoE (softmax router,
//! top-k renormalised, no shared experts, the same tensor names) is Qwen3-MoE's. MiniMind2's MoE
//! (shared experts, no renormalisation at top-1) has no standard counterpart: the folder then
//! keeps MiniMind's own layout (`model_type: "minimind"`).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::model::ModelConfig;

/// Which Hugging Face architecture a MiniMind model maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfArch {
    Llama,
    Qwen3,
    Qwen3Moe,
    /// No standard architecture: MiniMind's own layout.
    MiniMindMoe,
}

pub fn hf_arch(cfg: &ModelConfig) -> HfArch {
    match (cfg.use_moe, cfg.is_minimind3(), cfg.qk_norm) {
        (true, true, _) => HfArch::Qwen3Moe,
        (true, false, _) => HfArch::MiniMindMoe,
        (false, _, true) => HfArch::Qwen3,
        (false, _, false) => HfArch::Llama,
    }
}

pub fn dtype_name(k: Kind) -> Result<&'static str> {
    Ok(match k {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        other => bail!("cannot export {other:?} weights"),
    })
}

/// Special token ids: pad, bos, eos.
#[derive(Clone, Copy, Debug)]
pub struct SpecialIds {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
}

impl Default for SpecialIds {
    /// MiniMind's tokenizer: pad `<|endoftext|>` 0, bos `<|im_start|>` 1, eos `<|im_end|>` 2.
    fn default() -> Self {
        SpecialIds {
            pad: 0,
            bos: 1,
            eos: 2,
        }
    }
}

/// The `config.json` for `arch`.
pub fn hf_config(cfg: &ModelConfig, ids: SpecialIds, dtype: Kind) -> Result<serde_json::Value> {
    let dt = dtype_name(dtype)?;
    let mut c = json!({
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_width(),
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim(),
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        // transformers < 4.56 reads torch_dtype, later versions dtype.
        "torch_dtype": dt,
        "dtype": dt,
    });
    let o = c.as_object_mut().unwrap();
    match hf_arch(cfg) {
        HfArch::Llama => {
            o.insert("architectures".into(), json!(["LlamaForCausalLM"]));
            o.insert("model_type".into(), json!("llama"));
            o.insert("mlp_bias".into(), json!(false));
            o.insert("pretraining_tp".into(), json!(1));
        }
        HfArch::Qwen3 => {
            o.insert("architectures".into(), json!(["Qwen3ForCausalLM"]));
            o.insert("model_type".into(), json!("qwen3"));
            o.insert("use_sliding_window".into(), json!(false));
            o.insert("sliding_window".into(), json!(null));
            o.insert("max_window_layers".into(), json!(cfg.num_hidden_layers));
        }
        HfArch::Qwen3Moe => {
            o.insert("architectures".into(), json!(["Qwen3MoeForCausalLM"]));
            o.insert("model_type".into(), json!("qwen3_moe"));
            o.insert("use_sliding_window".into(), json!(false));
            o.insert("sliding_window".into(), json!(null));
            o.insert("max_window_layers".into(), json!(cfg.num_hidden_layers));
            o.insert("num_experts".into(), json!(cfg.routed_experts()));
            o.insert("num_experts_per_tok".into(), json!(cfg.num_experts_per_tok));
            o.insert("moe_intermediate_size".into(), json!(cfg.expert_width()));
            o.insert("norm_topk_prob".into(), json!(cfg.norm_topk_prob));
            o.insert("decoder_sparse_step".into(), json!(1));
            o.insert("mlp_only_layers".into(), json!([]));
            o.insert(
                "router_aux_loss_coef".into(),
                json!(cfg.router_aux_loss_coef),
            );
            o.insert("output_router_logits".into(), json!(false));
        }
        HfArch::MiniMindMoe => {
            o.insert("architectures".into(), json!(["MiniMindForCausalLM"]));
            o.insert("model_type".into(), json!("minimind"));
            o.insert("use_moe".into(), json!(true));
            o.insert("n_routed_experts".into(), json!(cfg.n_routed_experts));
            o.insert("n_shared_experts".into(), json!(cfg.n_shared_experts));
            o.insert("num_experts_per_tok".into(), json!(cfg.num_experts_per_tok));
            o.insert("norm_topk_prob".into(), json!(cfg.norm_topk_prob));
            o.insert("scoring_func".into(), json!("softmax"));
            o.insert("qk_norm".into(), json!(cfg.qk_norm));
        }
    }
    Ok(c)
}

/// Serialise named tensors (any float kind, converted to `kind`) as safetensors bytes with
/// `{"format": "pt"}` metadata, which transformers expects.
pub fn safetensors_bytes(named: &[(String, Tensor)], kind: Kind) -> Result<Vec<u8>> {
    dtype_name(kind)?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    super::safetensors::to_bytes(named, kind, &meta)
}

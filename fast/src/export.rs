//! `fast export`: write a Hugging Face model folder from MiniMind weights (`.pth` or ours).
//!
//! MiniMind2's dense decoder is exactly Hugging Face's Llama (RMSNorm, rotate-half RoPE with
//! `inv_freq = theta^(-2i/hd)`, GQA, SwiGLU, tied embeddings, no biases), and its state_dict names
//! are Llama's, so the tensors are written unchanged: no q/k permutation is needed (the rotate-half
//! convention is the one HF Llama uses; `tests/export_hf.rs` checks the logits numerically).
//! With qk-norm the layout is Qwen3's (`self_attn.q_norm` / `k_norm` over head_dim before RoPE).
//! MoE has no standard counterpart: the folder then keeps MiniMind's own layout
//! (`model_type: "minimind"`) and says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::data::tokenize::{SpecialTokens, TextTokenizer};
use crate::kv_cache::Arch;

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Weights: a MiniMind `.pth` or our `.safetensors` (config JSON beside it or --config).
    #[arg(long)]
    pub weights: PathBuf,
    /// Output folder (created; existing files of the same names are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizer folder to copy (tokenizer.json, tokenizer_config.json); gives bos/eos ids.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model config JSON (default: `<weights stem>.json`, or `config.json` beside the weights).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dtype of model.safetensors: source (the file's own, lossless), f32, bf16 or f16.
    #[arg(long, default_value = "source")]
    pub dtype: String,
}

/// Which Hugging Face architecture a MiniMind model maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfArch {
    Llama,
    Qwen3,
    /// No standard architecture: MiniMind's own layout.
    MiniMindMoe,
}

pub fn hf_arch(arch: &Arch) -> HfArch {
    match (arch.moe.is_some(), arch.qk_norm) {
        (true, _) => HfArch::MiniMindMoe,
        (false, true) => HfArch::Qwen3,
        (false, false) => HfArch::Llama,
    }
}

fn dtype_name(k: Kind) -> Result<&'static str> {
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
pub fn hf_config(arch: &Arch, ids: SpecialIds, dtype: Kind) -> Result<serde_json::Value> {
    let dt = dtype_name(dtype)?;
    let mut c = json!({
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "num_hidden_layers": arch.num_hidden_layers,
        "head_dim": arch.head_dim,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": null,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
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
    match hf_arch(arch) {
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
            o.insert("max_window_layers".into(), json!(arch.num_hidden_layers));
        }
        HfArch::MiniMindMoe => {
            let m = arch.moe.as_ref().unwrap();
            o.insert("architectures".into(), json!(["MiniMindForCausalLM"]));
            o.insert("model_type".into(), json!("minimind"));
            o.insert("use_moe".into(), json!(true));
            o.insert("n_routed_experts".into(), json!(m.n_routed_experts));
            o.insert("n_shared_experts".into(), json!(m.n_shared_experts));
            o.insert("num_experts_per_tok".into(), json!(m.num_experts_per_tok));
            o.insert("norm_topk_prob".into(), json!(m.norm_topk_prob));
            o.insert("scoring_func".into(), json!("softmax"));
            o.insert("qk_norm".into(), json!(arch.qk_norm));
        }
    }
    Ok(c)
}

/// Serialise named tensors (any float kind, converted to `kind`) as safetensors bytes with
/// `{"format": "pt"}` metadata, which transformers expects.
pub fn safetensors_bytes(named: &[(String, Tensor)], kind: Kind) -> Result<Vec<u8>> {
    let st_dtype = match kind {
        Kind::Half => safetensors::Dtype::F16,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Float => safetensors::Dtype::F32,
        Kind::Double => safetensors::Dtype::F64,
        other => bail!("cannot store {other:?}"),
    };
    let mut raws = Vec::with_capacity(named.len());
    for (n, t) in named {
        let t = t.to_device(tch::Device::Cpu).to_kind(kind).contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .with_context(|| format!("copying {n}"))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        raws.push((n.clone(), shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = raws
        .iter()
        .map(|(n, s, d)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(st_dtype, s.clone(), d)?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: &ExportArgs) -> Result<()> {
    // Keep the file's dtype unless asked otherwise: match_weights converts, so read the raw kind.
    let raw = crate::weights::load_weights(&args.weights)?;
    let source_kind = raw
        .iter()
        .find(|(n, _)| n == crate::weights::EMBED)
        .map(|(_, t)| t.kind())
        .context("no embedding in the weights")?;
    let kind = match args.dtype.as_str() {
        "source" => source_kind,
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        o => bail!("unknown --dtype {o:?} (source, f32, bf16, f16)"),
    };
    drop(raw);
    let (arch, weights, from) =
        crate::weights::load_for_inference(&args.weights, args.config.as_deref(), kind)?;
    eprintln!("model: {from}");

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut ids = SpecialIds::default();
    if let Some(tdir) = &args.tokenizer {
        let tok = TextTokenizer::load(tdir, &SpecialTokens::default())?;
        ids = SpecialIds {
            pad: tok.pad,
            bos: tok.bos,
            eos: tok.eos,
        };
        let dir = if tdir.is_dir() {
            tdir.clone()
        } else {
            tdir.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let src = dir.join(name);
            if src.is_file() {
                std::fs::copy(&src, args.out.join(name)).with_context(|| {
                    format!("copying {} to {}", src.display(), args.out.display())
                })?;
            }
        }
    } else {
        eprintln!("note: no --tokenizer given; the folder has no tokenizer files (bos/eos ids are MiniMind's 1/2)");
    }

    let which = hf_arch(&arch);
    match which {
        HfArch::Llama => eprintln!("architecture: LlamaForCausalLM (dense MiniMind2 = Llama; tensors unchanged)"),
        HfArch::Qwen3 => eprintln!("architecture: Qwen3ForCausalLM (qk-norm; tensors unchanged)"),
        HfArch::MiniMindMoe => eprintln!(
            "architecture: MoE MiniMind has no standard Hugging Face counterpart (MiniMind's router \
             and shared experts match neither Mixtral nor Qwen-MoE); writing MiniMind's own layout \
             with model_type \"minimind\", which needs MiniMind's modeling code to load"
        ),
    }
    let config = hf_config(&arch, ids, kind)?;
    write(
        &args.out.join("config.json"),
        (serde_json::to_string_pretty(&config)? + "\n").as_bytes(),
    )?;
    let gen = json!({
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "do_sample": true,
        "temperature": 0.85,
        "top_p": 0.85,
    });
    write(
        &args.out.join("generation_config.json"),
        (serde_json::to_string_pretty(&gen)? + "\n").as_bytes(),
    )?;
    let bytes = safetensors_bytes(&weights, kind)?;
    write(&args.out.join("model.safetensors"), &bytes)?;
    println!(
        "wrote {} ({} tensors, {}, {:.1} MB) with config.json, generation_config.json{}",
        args.out.display(),
        weights.len(),
        dtype_name(kind)?,
        bytes.len() as f64 / 1e6,
        if args.tokenizer.is_some() {
            ", tokenizer files"
        } else {
            ""
        }
    );
    Ok(())
}

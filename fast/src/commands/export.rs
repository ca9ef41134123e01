//! `fast export`: write a Hugging Face model folder from MiniMind weights (`.pth` or ours); the
//! format itself is `io/hf.rs`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Kind;

use crate::data::tokenizer::{SpecialTokenStrings, TextTokenizer};
use crate::io::hf::{dtype_name, hf_arch, hf_config, safetensors_bytes, HfArch, SpecialIds};

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

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: &ExportArgs) -> Result<()> {
    // Keep the file's dtype unless asked otherwise: match_weights converts, so read the raw kind.
    let raw = crate::io::weights::load_weights(&args.weights)?;
    let source_kind = raw
        .iter()
        .find(|(n, _)| n == crate::io::weights::EMBED)
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
    let (cfg, weights, from) =
        crate::io::weights::load_for_inference(&args.weights, args.config.as_deref(), kind)?;
    eprintln!("model: {from}");

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut ids = SpecialIds::default();
    if let Some(tdir) = &args.tokenizer {
        let tok = TextTokenizer::load(tdir, &SpecialTokenStrings::default())?;
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

    let which = hf_arch(&cfg);
    match which {
        HfArch::Llama => {
            eprintln!("architecture: LlamaForCausalLM (dense MiniMind2 = Llama; tensors unchanged)")
        }
        HfArch::Qwen3 => eprintln!("architecture: Qwen3ForCausalLM (qk-norm; tensors unchanged)"),
        HfArch::Qwen3Moe => {
            eprintln!("architecture: Qwen3MoeForCausalLM (MiniMind-3 MoE; tensors unchanged)")
        }
        HfArch::MiniMindMoe => eprintln!(
            "architecture: MiniMind2's MoE has no standard Hugging Face counterpart (its router \
             and shared experts match neither Mixtral nor Qwen-MoE); writing MiniMind's own layout \
             with model_type \"minimind\", which needs MiniMind's modeling code to load"
        ),
    }
    let config = hf_config(&cfg, ids, kind)?;
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

//! `fast export`: MiniMind weights (`.pth` or ours) as a Hugging Face model folder (the default)
//! or as one GGUF file for llama.cpp (`--format gguf`). The formats themselves are `io/hf.rs`
//! and `io/gguf.rs`.
//!
//! The tokenizer: `--tokenizer`, else the one a run recorded beside its weights
//! (`io::checkpoint::recorded_tokenizer`); with neither the export is refused, since a folder
//! without a tokenizer does not load in transformers and a GGUF needs its vocabulary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Kind;

use crate::data::tokenizer::{SpecialTokenStrings, TextTokenizer};
use crate::io::gguf::GgufDtype;
use crate::io::hf::{dtype_name, hf_arch, hf_config, safetensors_bytes, HfArch, SpecialIds};

/// What `fast export` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face folder: config.json, model.safetensors, tokenizer files.
    #[default]
    Hf,
    /// One .gguf file for llama.cpp, tokenizer inside.
    Gguf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Weights: a MiniMind `.pth` or our `.safetensors` (config JSON beside it or --config).
    #[arg(long)]
    pub weights: PathBuf,
    /// Output: the folder for `--format hf` (created; files of the same names are replaced);
    /// for `--format gguf` the `.gguf` file, or a folder to write `<weights stem>.gguf` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizer folder (tokenizer.json, tokenizer_config.json) or a built-in one (poems,
    /// minimind2, minimind3) [default: the one the run recorded beside the weights].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model config JSON (default: `<weights stem>.json`, or `config.json` beside the weights).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dtype of the weights: source (the file's own, lossless), f32, bf16, f16; with
    /// `--format gguf` also q8_0 (ggml's 8-bit blocks).
    #[arg(long, default_value = "source")]
    pub dtype: String,
    /// hf: a Hugging Face folder; gguf: one .gguf file for llama.cpp.
    #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
    pub format: ExportFormat,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The weights file's own float kind (load_for_inference converts, so read the raw kind).
fn source_kind(weights: &Path) -> Result<Kind> {
    let raw = crate::io::weights::load_weights(weights)?;
    raw.iter()
        .find(|(n, _)| n == crate::io::weights::EMBED)
        .map(|(_, t)| t.kind())
        .with_context(|| format!("{}: no embedding in the weights", weights.display()))
}

/// `--tokenizer` (a path or a built-in name), else the tokenizer recorded with the weights.
fn tokenizer_dir(args: &ExportArgs) -> Result<PathBuf> {
    crate::io::checkpoint::tokenizer_for(
        args.tokenizer.as_deref(),
        &args.weights,
        args.config.as_deref(),
    )
}

pub fn run(args: &ExportArgs) -> Result<()> {
    match args.format {
        ExportFormat::Hf => run_hf(args),
        ExportFormat::Gguf => run_gguf(args),
    }
}

fn run_hf(args: &ExportArgs) -> Result<()> {
    let kind = match args.dtype.as_str() {
        "source" => source_kind(&args.weights)?,
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        "q8_0" => bail!("--dtype q8_0 is for --format gguf; the Hugging Face folder takes source, f32, bf16 or f16"),
        o => bail!("unknown --dtype {o:?} (source, f32, bf16, f16)"),
    };
    let tdir = tokenizer_dir(args)?;
    let (cfg, weights, from) =
        crate::io::weights::load_for_inference(&args.weights, args.config.as_deref(), kind)?;
    eprintln!("model: {from}");

    let tok = TextTokenizer::load(&tdir, &SpecialTokenStrings::default())?;
    if let Some(w) = tok.vocab_warning(cfg.vocab_size) {
        eprintln!("{w}");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: creating the folder", args.out.display()))?;
    let ids = SpecialIds {
        pad: tok.pad,
        bos: tok.bos,
        eos: tok.eos,
    };
    let dir = if tdir.is_dir() {
        tdir.clone()
    } else {
        tdir.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    for name in crate::io::checkpoint::TOKENIZER_FILES {
        let src = dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, args.out.join(name))
                .with_context(|| format!("copying {} to {}", src.display(), args.out.display()))?;
        }
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
        "wrote {} ({} tensors, {}, {:.1} MB) with config.json, generation_config.json, tokenizer files",
        args.out.display(),
        weights.len(),
        dtype_name(kind)?,
        bytes.len() as f64 / 1e6,
    );
    Ok(())
}

fn run_gguf(args: &ExportArgs) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "source" => match source_kind(&args.weights)? {
            Kind::Half => GgufDtype::F16,
            Kind::BFloat16 => GgufDtype::Bf16,
            _ => GgufDtype::F32,
        },
        o => GgufDtype::parse(o)
            .with_context(|| format!("unknown --dtype {o:?} (source, f32, f16, bf16, q8_0)"))?,
    };
    let tdir = tokenizer_dir(args)?;
    // f32 in memory: every target dtype is made from the exact values.
    let (cfg, weights, from) =
        crate::io::weights::load_for_inference(&args.weights, args.config.as_deref(), Kind::Float)?;
    eprintln!("model: {from}");
    let arch = crate::io::gguf::gguf_arch(&cfg)?;
    let tok = crate::io::gguf::tokenizer_from_dir(&tdir, cfg.vocab_size)?;
    let stem = args
        .weights
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "minimind".into());
    let out = if args.out.extension().is_some_and(|e| e == "gguf") {
        args.out.clone()
    } else {
        args.out.join(format!("{stem}.gguf"))
    };
    let w = crate::io::gguf::write_gguf(&out, &cfg, &weights, &tok, dtype, &stem)?;
    eprintln!(
        "architecture: {} ({}), tokenizer gpt2 / gpt-2 with {} tokens and {} merges",
        arch.name(),
        match arch {
            crate::io::gguf::GgufArch::Llama =>
                "q/k rows permuted for llama.cpp's interleaved RoPE",
            _ => "rotate-half RoPE as ours: tensors unchanged",
        },
        tok.tokens.len(),
        tok.merges.len()
    );
    if !w.f16_fallbacks.is_empty() {
        eprintln!(
            "note: {} matrices have rows that are not a multiple of 32 and are f16, not q8_0: {}",
            w.f16_fallbacks.len(),
            w.f16_fallbacks.join(", ")
        );
    }
    println!(
        "wrote {} ({} tensors, {}, {:.1} MB)",
        out.display(),
        w.tensors,
        dtype.name(),
        w.bytes as f64 / 1e6
    );
    Ok(())
}

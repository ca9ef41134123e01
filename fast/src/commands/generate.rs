//! `fast generate`: continue a prompt with a trained (or imported MiniMind) model, streaming text.
//!
//! The prompt is `[bos] + encode(prompt)` as in pretraining; it runs once through the model and
//! every new token then costs one cached position (the model's forward with a `KvCache`). Stops at eos, after
//! `--max-new-tokens`, or at `max_position_embeddings`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::data::tokenizer::{SpecialTokenStrings, TextTokenizer};
use crate::model::sampling::{Sampler, SamplingConfig, TextStream};
use crate::model::{KvCache, MiniMindForCausalLM};

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Weights: a MiniMind `.pth` or our `.safetensors` (config JSON beside it or --config).
    #[arg(long)]
    pub weights: PathBuf,
    /// Tokenizer directory (tokenizer.json + tokenizer_config.json), tokenizer.json, or poems /
    /// minimind2 / minimind3 [default: the tokenizer the run recorded beside the weights].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Model config JSON (default: `<weights stem>.json`, or `config.json` beside the weights).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.85)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.85)]
    pub top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto (cuda when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f64, bf16 or f16 (default: bf16 on cuda, f32 on cpu).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Do not prepend bos to the prompt.
    #[arg(long)]
    pub no_bos: bool,
}

pub fn parse_dtype(s: Option<&str>, device: Device) -> Result<Kind> {
    Ok(match s {
        None => {
            if device.is_cuda() {
                Kind::BFloat16
            } else {
                Kind::Float
            }
        }
        Some("f32") | Some("fp32") | Some("float32") => Kind::Float,
        Some("f64") | Some("fp64") | Some("float64") => Kind::Double,
        Some("bf16") | Some("bfloat16") => Kind::BFloat16,
        Some("f16") | Some("fp16") | Some("float16") => Kind::Half,
        Some(o) => bail!("unknown dtype {o:?} (f32, f64, bf16, f16)"),
    })
}

/// Logits of the last position as f64 on the CPU.
fn last_row(logits: &Tensor) -> Result<Vec<f64>> {
    let t = logits.size()[1];
    let row = logits
        .select(1, t - 1)
        .select(0, 0)
        .to_kind(Kind::Double)
        .to_device(Device::Cpu);
    Ok(Vec::<f64>::try_from(&row)?)
}

/// Generate up to `max_new` tokens after `prompt_ids`, calling `emit` with each new token id.
/// Returns the new ids. Deterministic for a fixed sampling seed.
pub fn generate_ids(
    model: &MiniMindForCausalLM,
    prompt_ids: &[i64],
    max_new: usize,
    sampling: &SamplingConfig,
    eos: Option<i64>,
    mut emit: impl FnMut(i64) -> Result<()>,
) -> Result<Vec<i64>> {
    if prompt_ids.is_empty() {
        bail!("empty prompt (and no bos)");
    }
    let max_pos = model.cfg.max_position_embeddings;
    if prompt_ids.len() >= max_pos {
        bail!(
            "the prompt is {} tokens, which leaves no room under the model's max_position_embeddings {max_pos}",
            prompt_ids.len()
        );
    }
    let _guard = tch::no_grad_guard();
    let mut sampler = Sampler::new(sampling.clone());
    let mut cache = KvCache::new();
    let mut context: Vec<i64> = prompt_ids.to_vec();
    let room = model
        .cfg
        .max_position_embeddings
        .saturating_sub(prompt_ids.len());
    let device = model.embed_tokens.device();
    let step = |ids: &[i64], cache: &mut KvCache| {
        let ids = Tensor::from_slice(ids).view([1, -1]).to_device(device);
        model.forward(&ids, Some(cache)).logits
    };
    let mut logits = step(prompt_ids, &mut cache);
    let mut out = Vec::new();
    for _ in 0..max_new.min(room) {
        let next = sampler.next(&last_row(&logits)?, &context);
        out.push(next);
        context.push(next);
        emit(next)?;
        if Some(next) == eos {
            break;
        }
        logits = step(&[next], &mut cache);
    }
    Ok(out)
}

impl GenerateArgs {
    /// Refuse sampling values that have no meaning, with the option's name.
    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature must be zero (greedy) or positive (got {})",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1] (got {})", self.top_p);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "--repetition-penalty must be a positive number (1 = off; got {})",
                self.repetition_penalty
            );
        }
        Ok(())
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    args.validate()?;
    let device = crate::model::precision::parse_device(&args.device)?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    let tdir = crate::io::checkpoint::tokenizer_for(
        args.tokenizer.as_deref(),
        &args.weights,
        args.config.as_deref(),
    )?;
    let tok = TextTokenizer::load(&tdir, &SpecialTokenStrings::default())?;
    let (model, from) =
        crate::io::weights::load_model(&args.weights, args.config.as_deref(), kind, device)?;
    let cfg = &model.cfg;
    if let Some(w) = tok.vocab_warning(cfg.vocab_size) {
        eprintln!("{w}");
    }
    eprintln!(
        "model: d {} layers {} heads {}/{} ffn {}{} vocab {} ({from}); {kind:?} on {device:?}",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.ffn_width(),
        if cfg.use_moe { " moe" } else { "" },
        cfg.vocab_size
    );
    let arch_vocab = cfg.vocab_size;
    let mut ids: Vec<i64> = Vec::new();
    if !args.no_bos {
        ids.push(tok.bos as i64);
    }
    ids.extend(tok.encode(&args.prompt)?.into_iter().map(i64::from));
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= arch_vocab) {
        bail!("prompt token id {bad} is outside the model's vocab of {arch_vocab}");
    }
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    stdout.flush()?;
    let mut stream = TextStream::new(|ids: &[u32]| tok.decode(ids));
    let start = Instant::now();
    let out = generate_ids(
        &model,
        &ids,
        args.max_new_tokens,
        &sampling,
        Some(tok.eos as i64),
        |id| {
            let piece = stream.push(id as u32)?;
            if !piece.is_empty() {
                write!(stdout, "{piece}").context("writing to stdout")?;
                stdout.flush()?;
            }
            Ok(())
        },
    )?;
    let rest = stream.finish()?;
    writeln!(stdout, "{rest}")?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} new tokens in {:.2} s, {:.1} tok/s]",
        ids.len(),
        out.len(),
        secs,
        out.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

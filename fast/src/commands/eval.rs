//! `fast eval`: held-out loss and perplexity of a model over a JSONL corpus.
//!
//! Rows are built exactly as in pretraining (`train::setup`: the token cache, then
//! `data::dataset`'s layout) and scored with
//! the training loss (`loss::shifted_cross_entropy_sum`); the reported loss is the token-weighted
//! mean over every counted label of the file (sum of losses / number of counted labels), and
//! perplexity is its exp.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::Tensor;

use crate::data::dataset::{DataMode, TokenDataset};
use crate::kernels::{KernelConfig, Kernels};
use crate::model::MiniMindForCausalLM;
use crate::train::setup::{Data, DataSpec};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Weights: a MiniMind `.pth` or our `.safetensors` (config JSON beside it or --config).
    #[arg(long)]
    pub weights: PathBuf,
    /// Held-out JSONL of {"text": ...}: files, quoted globs or directories, as in pretrain.
    #[arg(long, num_args = 1.., required = true)]
    pub data_path: Vec<PathBuf>,
    /// Tokenizer directory or tokenizer.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long, value_enum, default_value = "padded")]
    pub data_mode: DataMode,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 340)]
    pub max_seq_len: usize,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f64, bf16 or f16 (default: bf16 on cuda, f32 on cpu).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Token cache directory [default: <data-path>.tokens/tok-<key>], as in pretrain.
    #[arg(long)]
    pub token_cache: Option<PathBuf>,
    /// Rebuild a --token-cache that does not fit instead of refusing it.
    #[arg(long)]
    pub rebuild_cache: bool,
    /// Threads of the tokenizing pass [default: cores].
    #[arg(long)]
    pub num_workers: Option<usize>,
    #[command(flatten)]
    pub kernels: KernelConfig,
}

/// Result of an evaluation: summed loss, counted labels, mean loss, perplexity.
#[derive(Clone, Copy, Debug)]
pub struct EvalResult {
    pub loss_sum: f64,
    pub tokens: i64,
    pub rows: usize,
}

impl EvalResult {
    pub fn loss(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.loss_sum / self.tokens as f64
        }
    }
    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }
}

/// Summed shifted cross-entropy and counted labels of one batch, left on the device.
fn batch_loss_on_device(
    model: &MiniMindForCausalLM,
    input_ids: &Tensor,
    labels: &Tensor,
) -> (Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    let ids = input_ids.to_device(model.embed_tokens.device());
    let logits = model.forward(&ids, None).logits;
    let (sum, count) =
        crate::model::loss::shifted_cross_entropy_sum(&logits, &labels.to_device(logits.device()));
    (sum.to_kind(tch::Kind::Double), count)
}

/// Summed shifted cross-entropy and counted labels of one batch.
pub fn batch_loss(
    model: &MiniMindForCausalLM,
    input_ids: &Tensor,
    labels: &Tensor,
) -> Result<(f64, i64)> {
    let (sum, count) = batch_loss_on_device(model, input_ids, labels);
    Ok((sum.double_value(&[]), count.int64_value(&[])))
}

pub fn evaluate(
    model: &MiniMindForCausalLM,
    ds: &TokenDataset,
    batch_size: usize,
) -> Result<EvalResult> {
    if batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let mut r = EvalResult {
        loss_sum: 0.0,
        tokens: 0,
        rows: 0,
    };
    let n = ds.len();
    let mut i = 0;
    // Sums stay on the device until the end: one host read for the whole pass, so on a GPU the
    // evaluation queues behind the training step like any other kernel instead of waiting per batch.
    let mut sums: Option<(Tensor, Tensor)> = None;
    while i < n {
        let end = (i + batch_size).min(n);
        let hb = ds.batch(&(i..end).collect::<Vec<_>>(), 0)?;
        let t = ds.max_len as i64;
        let (ids, lab) = (hb.input_ids, hb.labels);
        if let Some(&bad) = ids
            .iter()
            .find(|&&x| x < 0 || x as usize >= model.cfg.vocab_size)
        {
            bail!(
                "rows {i}..{end}: token id {bad} is outside the model's vocab of {} (wrong tokenizer?)",
                model.cfg.vocab_size
            );
        }
        let b = hb.rows as i64;
        let (s, c) = batch_loss_on_device(
            model,
            &Tensor::from_slice(&ids).view([b, t]),
            &Tensor::from_slice(&lab).view([b, t]),
        );
        sums = Some(match sums.take() {
            Some((ls, lc)) => (ls + s, lc + c),
            None => (s, c),
        });
        r.rows += hb.rows;
        i = end;
    }
    if let Some((s, c)) = sums {
        r.loss_sum = s.double_value(&[]);
        r.tokens = c.int64_value(&[]);
    }
    Ok(r)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let device = crate::model::precision::parse_device(&args.device)?;
    let kind = crate::commands::generate::parse_dtype(args.dtype.as_deref(), device)?;
    let (mut model, from) =
        crate::io::weights::load_model(&args.weights, args.config.as_deref(), kind, device)?;
    model.kernels = Kernels::new(args.kernels);
    eprintln!("model: {from}; {kind:?} on {device:?}");
    let mut spec = DataSpec::new(
        args.data_path.clone(),
        args.tokenizer.clone(),
        args.max_seq_len,
        args.data_mode,
    );
    if let Some(n) = args.num_workers {
        spec.threads = n.max(1);
    }
    spec.token_cache = args.token_cache.clone();
    spec.rebuild_cache = args.rebuild_cache;
    let data = Data::load(&spec, &|l| eprintln!("{l}"))?;
    let r = evaluate(&model, &data.dataset, args.batch_size)?;
    println!(
        "eval {}: rows {} counted tokens {} loss {:.6} perplexity {:.4}",
        args.data_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        r.rows,
        r.tokens,
        r.loss(),
        r.perplexity()
    );
    Ok(())
}

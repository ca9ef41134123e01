//! `fast eval`: held-out loss and perplexity of a model over a JSONL corpus.
//!
//! Rows are built exactly as in pretraining (`train::setup`: the token cache, then
//! `data::dataset`'s layout) and scored with
//! the training loss (`loss::shifted_cross_entropy_sum`); the reported loss is the token-weighted
//! mean over every counted label of the file (sum of losses / number of counted labels), and
//! perplexity is its exp.
//!
//! A masked-LM checkpoint (`--objective mlm`, or `objective` "mlm" in the run_config.json beside
//! the weights) is scored on masked rows: each row masked by `data::mlm` with the fixed seed
//! `--mask-seed` (so two evaluations score the same positions), attention bidirectional, and the
//! reported loss the unshifted cross-entropy over the masked positions alone.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::Tensor;

use crate::data::dataset::{DataMode, TokenDataset};
use crate::data::mlm::{MlmSpec, EVAL_MASK_SEED};
use crate::kernels::{KernelConfig, Kernels};
use crate::model::loss::{Objective, IGNORE_INDEX};
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
    /// Tokenizer directory, tokenizer.json, or poems / minimind2 / minimind3 [default: the
    /// tokenizer the run recorded beside the weights].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
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
    /// clm or mlm [default: `objective` of the run_config.json beside the weights, else clm].
    #[arg(long, value_enum)]
    pub objective: Option<Objective>,
    /// Masked LM: selection probability [default: the run_config.json's, else 0.15].
    #[arg(long)]
    pub mlm_probability: Option<f64>,
    /// Masked LM: the mask token [default: the run_config.json's, else tokenizer_config.json's].
    #[arg(long)]
    pub mask_token: Option<String>,
    /// Masked LM: the masking seed (fixed, so evaluations of two checkpoints score the same
    /// positions).
    #[arg(long, default_value_t = EVAL_MASK_SEED)]
    pub mask_seed: u64,
    #[command(flatten)]
    pub kernels: KernelConfig,
}

/// The objective and masked-LM options of `args`, each not given read from the run_config.json
/// beside the weights (a run's save directory) when there is one.
fn objective_of(args: &EvalArgs) -> Result<(Objective, Option<MlmSpec>)> {
    let saved: Option<serde_json::Value> = match args.weights.parent() {
        Some(dir) if dir.join("run_config.json").is_file() => {
            let path = dir.join("run_config.json");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?,
            )
        }
        _ => None,
    };
    let field = |k: &str| saved.as_ref().and_then(|v| v.get(k)).cloned();
    let objective = match args.objective {
        Some(o) => o,
        None => match field("objective").and_then(|v| v.as_str().map(str::to_owned)) {
            Some(o) if o == "mlm" => Objective::MaskedLm,
            _ => Objective::CausalLm,
        },
    };
    if objective == Objective::CausalLm {
        return Ok((objective, None));
    }
    let probability = args
        .mlm_probability
        .or_else(|| field("mlm_probability").and_then(|v| v.as_f64()))
        .unwrap_or(0.15);
    let mask_token = args
        .mask_token
        .clone()
        .or_else(|| field("mask_token").and_then(|v| v.as_str().map(str::to_owned)));
    Ok((
        objective,
        Some(MlmSpec {
            probability,
            mask_token,
            seed: args.mask_seed,
        }),
    ))
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

/// Summed cross-entropy and counted labels of one batch `[B, T]`, left on the device: shifted
/// for a causal LM, each position against its own label for a masked LM (`masked`; the model's
/// attention is whatever `model.causal` says).
fn batch_loss_on_device(
    model: &MiniMindForCausalLM,
    input_ids: &Tensor,
    labels: &Tensor,
    masked: bool,
) -> (Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    let ids = input_ids.to_device(model.embed_tokens.device());
    let logits = model.forward(&ids, None).logits;
    let labels = labels.to_device(logits.device());
    let (sum, count) = if masked {
        let (b, t, v) = logits.size3().expect("logits are [B, T, V]");
        let k = crate::model::upcast_kind(logits.kind());
        let lg = logits.reshape([b * t, v]).to_kind(k);
        let lb = Objective::MaskedLm.position_labels(&labels);
        let sum =
            lg.cross_entropy_loss::<Tensor>(&lb, None, tch::Reduction::Sum, IGNORE_INDEX, 0.0);
        (sum, lb.ne(IGNORE_INDEX).sum(tch::Kind::Int64))
    } else {
        crate::model::loss::shifted_cross_entropy_sum(&logits, &labels)
    };
    (sum.to_kind(tch::Kind::Double), count)
}

/// Summed shifted cross-entropy and counted labels of one batch (causal LM).
pub fn batch_loss(
    model: &MiniMindForCausalLM,
    input_ids: &Tensor,
    labels: &Tensor,
) -> Result<(f64, i64)> {
    let (sum, count) = batch_loss_on_device(model, input_ids, labels, false);
    Ok((sum.double_value(&[]), count.int64_value(&[])))
}

/// The loss of `model` over every row of `ds`: masked LM's when `ds` is masked
/// (`TokenDataset::mlm`), else the shifted causal-LM loss.
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
    let masked = ds.mlm().is_some();
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
            masked,
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
    if let Some(n) = args.num_workers {
        crate::train::options::check_num_workers(n)?;
    }
    let device = crate::model::precision::parse_device(&args.device)?;
    let kind = crate::commands::generate::parse_dtype(args.dtype.as_deref(), device)?;
    let (mut model, from) =
        crate::io::weights::load_model(&args.weights, args.config.as_deref(), kind, device)?;
    model.kernels = Kernels::new(args.kernels);
    let max_pos = model.cfg.max_position_embeddings;
    if args.max_seq_len < 2 || args.max_seq_len > max_pos {
        bail!(
            "--max-seq-len must be between 2 and the model's max_position_embeddings {max_pos} (got {})",
            args.max_seq_len
        );
    }
    let (objective, mlm) = objective_of(args)?;
    model.causal = objective == Objective::CausalLm;
    eprintln!("model: {from}; {kind:?} on {device:?}");
    let tokenizer = crate::io::checkpoint::tokenizer_for(
        args.tokenizer.as_deref(),
        &args.weights,
        args.config.as_deref(),
    )?;
    let mut spec = DataSpec::new(
        args.data_path.clone(),
        tokenizer,
        args.max_seq_len,
        args.data_mode,
    );
    if let Some(n) = args.num_workers {
        spec.threads = n;
    }
    spec.token_cache = args.token_cache.clone();
    spec.rebuild_cache = args.rebuild_cache;
    spec.mlm = mlm;
    let data = Data::load(&spec, &|l| eprintln!("{l}"))?;
    let r = evaluate(&model, &data.dataset, args.batch_size)?;
    let sources = args
        .data_path
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    if r.tokens == 0 {
        bail!(
            "{sources}: no label was counted in its {} rows (empty documents{}), so there is no loss to report",
            r.rows,
            if spec.mlm.is_some() { ", or --mlm-probability masking none" } else { "" }
        );
    }
    let what = match &spec.mlm {
        Some(m) => format!(
            " (masked LM: {} of non-special tokens masked, seed {})",
            m.probability, m.seed
        ),
        None => String::new(),
    };
    println!(
        "eval {sources}: rows {} counted tokens {} loss {:.6} perplexity {:.4}{what}",
        r.rows,
        r.tokens,
        r.loss(),
        r.perplexity()
    );
    Ok(())
}

//! `fast bench`: the real training step (forward, backward, clip, fused AdamW) timed on real data
//! or synthetic tokens, printed as one JSON line.
//!
//! Warm-up steps first (allocator, kernels, RoPE tables, graph capture), then `--steps` timed
//! steps between two device synchronisations. The step is the one `pretrain` runs: the same data
//! set-up (`train::setup`), `Trainer`, batch transfer and loader, and with `--cuda-graph` the same
//! `GraphedStep` captured after the first eager steps, so its tokens/s agree with the log lines
//! of a `pretrain` with the same options.
//!
//! FLOPs per trained token: `6 N + 6 L T d` (N = matmul parameters, lm_head counted once as the
//! tied embedding; causal attention's two `[T, T]` products at half cost, forward + backward).
//! The ceiling is a bf16 `[8192, 8192]` matmul measured in the same process.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::data::batch::{Batch, HostBatch};
use crate::data::dataset::DataMode;
use crate::data::loader::Prefetcher;
use crate::kernels::KernelConfig;
use crate::model::precision::Precision;
use crate::model::presets::ModelArgs;
use crate::model::ModelConfig;
use crate::optim::adamw::{AdamWConfig, AdamWImpl};
use crate::train::graph::{self, GraphedStep};
use crate::train::options::DType;
use crate::train::setup::{Data, DataSpec};
use crate::train::trainer::{Trainer, TrainerConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// JSONL corpus ({"text": ...} per line; files, quoted globs or directories, as in
    /// pretrain); without it, synthetic full rows of random tokens.
    #[arg(long, alias = "data_path", num_args = 1..)]
    pub data_path: Vec<std::path::PathBuf>,
    /// Token cache directory [default: <data-path>.tokens/tok-<key>], as in pretrain.
    #[arg(long, alias = "token_cache")]
    pub token_cache: Option<std::path::PathBuf>,
    /// Rebuild a --token-cache that does not fit instead of refusing it.
    #[arg(long, alias = "rebuild_cache")]
    pub rebuild_cache: bool,
    /// Tokenizer directory, tokenizer.json, or poems / minimind2 / minimind3 [default: the
    /// --model's own, else the embedded poems tokenizer].
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// [default: bfloat16 on CUDA, float32 on CPU]
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
    #[arg(long, alias = "batch_size", default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, alias = "max_seq_len", default_value_t = 340)]
    pub max_seq_len: usize,
    #[arg(long, alias = "data_mode", value_enum, default_value_t = DataMode::Padded)]
    pub data_mode: DataMode,
    /// Vocabulary of synthetic tokens (with --data-path: the tokenizer's).
    #[arg(long, alias = "vocab_size", default_value_t = 6400)]
    pub vocab_size: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Capture the whole step as one CUDA graph and replay it.
    #[arg(long, alias = "cuda_graph")]
    pub cuda_graph: bool,
    /// Tokenizing worker threads.
    #[arg(long, alias = "num_workers", default_value_t = 8)]
    pub num_workers: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, alias = "learning_rate", default_value_t = 5e-4)]
    pub learning_rate: f64,
    #[arg(long, alias = "grad_clip", default_value_t = 1.0)]
    pub grad_clip: f64,
    /// After timing, profile a few eager steps on the last batch with libtorch's profiler:
    /// writes DIR/trace.json (chrome://tracing, Perfetto) and DIR/kernels.tsv, and prints the
    /// device time per op and per kernel to stderr.
    #[arg(long, value_name = "DIR")]
    pub profile: Option<std::path::PathBuf>,
    /// Steps profiled by --profile.
    #[arg(long, default_value_t = 3)]
    pub profile_steps: usize,
    #[command(flatten)]
    pub kernels: KernelConfig,
    #[command(flatten)]
    pub optimizer: crate::optim::OptimizerConfig,
}

/// Batches for the bench: the loader over an epoch permutation of a corpus, or synthetic rows.
enum Source {
    Loader(Prefetcher),
    Synthetic { vocab: i64, b: usize, t: usize },
}

impl Source {
    fn next(&mut self) -> Result<HostBatch> {
        match self {
            Source::Loader(p) => p
                .next()
                .context("the corpus ran out of batches; use fewer --steps or a larger corpus")?,
            Source::Synthetic { vocab, b, t } => {
                let ids: Vec<i64> = Vec::<i64>::try_from(Tensor::randint_low(
                    3,
                    *vocab,
                    [(*b * *t) as i64],
                    (Kind::Int64, Device::Cpu),
                ))?;
                Ok(HostBatch {
                    labels: ids.clone(),
                    input_ids: ids,
                    rows: *b,
                    cols: *t,
                    seg_start: None,
                    counted_labels: *b * (*t - 1),
                })
            }
        }
    }

    fn waited(&self) -> f64 {
        match self {
            Source::Loader(p) => p.waited.as_secs_f64(),
            Source::Synthetic { .. } => 0.0,
        }
    }
}

/// FLOPs per trained token: `6 N_matmul + 6 L T d` (see the module doc).
pub fn flops_per_token(cfg: &ModelConfig, t: usize) -> f64 {
    let matmul_params: i64 = cfg
        .param_shapes()
        .iter()
        .filter(|(_, s)| s.len() == 2)
        .map(|(_, s)| s.iter().product::<i64>())
        .sum();
    let active = if cfg.use_moe {
        // Only k of the routed experts run per token (plus the shared ones and the router).
        let per_expert = 3 * cfg.hidden_size * cfg.expert_width();
        let idle = cfg.routed_experts().saturating_sub(cfg.num_experts_per_tok);
        matmul_params - (cfg.num_hidden_layers * idle * per_expert) as i64
    } else {
        matmul_params
    };
    // Causal attention's QK^T and PV: 2 T hd per head per token each, halved by the mask, x3.
    let attn = cfg.num_hidden_layers * t * cfg.num_attention_heads * cfg.head_dim();
    6.0 * active as f64 + 6.0 * attn as f64
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let device = crate::model::precision::parse_device(&args.device)?;
    crate::model::precision::host_threads_for(device);
    if args.batch_size == 0 || args.max_seq_len < 2 || args.steps == 0 {
        bail!("--batch-size and --steps must be at least 1 and --max-seq-len at least 2");
    }
    // Synthetic rows draw ids above the special tokens (ids 0-2).
    if args.data_path.is_empty() && args.vocab_size < 4 {
        bail!("--vocab-size must be at least 4 (got {})", args.vocab_size);
    }
    crate::train::options::check_positive("learning-rate", args.learning_rate)?;
    crate::train::options::check_positive("grad-clip", args.grad_clip)?;
    crate::train::options::check_num_workers(args.num_workers)?;
    args.optimizer.validate()?;
    let dtype = args.dtype.unwrap_or(match device {
        Device::Cuda(_) => DType::Bfloat16,
        _ => DType::Float32,
    });
    let precision = Precision::from(dtype);
    let (b, t) = (args.batch_size, args.max_seq_len);

    // ---- data: pretrain's set-up, the first batches of an epoch permutation ----
    let (mut source, vocab) = match args.data_path.first() {
        Some(path) => {
            let tokenizer = match (&args.tokenizer, args.model.model) {
                (Some(p), _) => crate::train::options::resolve_tokenizer(p)?,
                (None, Some(preset)) => {
                    crate::train::options::resolve_tokenizer(preset.tokenizer().as_ref())?
                }
                (None, None) => crate::data::defaults::materialize()?.tokenizer_dir,
            };
            let mut spec = DataSpec::new(args.data_path.clone(), tokenizer, t, args.data_mode);
            spec.threads = args.num_workers;
            spec.token_cache = args.token_cache.clone();
            spec.rebuild_cache = args.rebuild_cache;
            let data = Data::load(&spec, &|l| eprintln!("{l}"))?;
            let need = (args.warmup + args.steps) * b;
            if data.dataset.len() < need {
                bail!(
                    "{} gives {} rows; {} warm-up + {} timed steps of batch {b} need {need}",
                    path.display(),
                    data.dataset.len(),
                    args.warmup,
                    args.steps
                );
            }
            let perm = crate::data::order::epoch_permutation(data.dataset.len(), args.seed, 0);
            let batches: Vec<Vec<usize>> = perm[..need].chunks(b).map(<[usize]>::to_vec).collect();
            let workers = args.num_workers;
            let loader =
                Prefetcher::new(data.dataset.clone(), batches, 0, workers, 2 * workers + 2);
            (Source::Loader(loader), data.tokenizer.vocab_size())
        }
        None => (
            Source::Synthetic {
                vocab: args.vocab_size as i64,
                b,
                t,
            },
            args.vocab_size,
        ),
    };

    // ---- model: pretrain's trainer and, with --cuda-graph, its graphed step ----
    let cfg = ModelConfig {
        vocab_size: vocab,
        ..args.model.resolve(ModelConfig::default())?
    };
    let tc = TrainerConfig {
        precision,
        device,
        seed: args.seed as i64,
        adamw: AdamWConfig::default(),
        adamw_impl: AdamWImpl::Fused,
        muon: args.optimizer.muon_settings(args.learning_rate),
        kernels: args.kernels,
        objective: Default::default(),
    };
    let mut tr = Trainer::new(&cfg, tc)?;
    eprintln!(
        "{}",
        tr.kernels()
            .describe(device.is_cuda(), precision.compute_kind())
    );
    if args.cuda_graph {
        if let Some(why) = graph::unsupported(&tr) {
            bail!("--cuda-graph: {why}");
        }
    }
    let total = (args.warmup + args.steps) as u64;
    let lr_at = |s: u64| crate::optim::schedule::lr_at(s, total, args.learning_rate, 0);
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    if let Device::Cuda(i) = device {
        crate::kernels::graph::reset_peak_memory(i);
    }
    let weight = graph::weight_tensor(&tr, 1.0);
    let mut graphed: Option<GraphedStep> = None;
    let mut step_no = 0u64;
    let mut last_loss: Option<Tensor> = None;
    let mut last_hb: Option<HostBatch> = None;
    // One training step of batch `hb`: replayed once captured, else eager.
    let step = |tr: &mut Trainer,
                graphed: &Option<GraphedStep>,
                hb: &HostBatch,
                step_no: u64|
     -> Result<Tensor> {
        let batch = Batch::from_host(&hb, device);
        let lr = lr_at(step_no);
        match graphed.as_ref().filter(|g| g.fits(&batch)) {
            Some(g) => {
                let out = g.micro_step(&batch, &weight)?;
                let _ = g.optimizer_step(tr, lr)?;
                Ok(out.loss)
            }
            None => {
                let out = tr.micro_step_on(
                    &batch.input_ids,
                    &batch.labels,
                    batch.seg_start.as_ref(),
                    &weight,
                )?;
                let _ = tr.optimizer_step(lr, args.grad_clip)?;
                Ok(out.loss)
            }
        }
    };

    // ---- warm-up (and capture after the first eager steps, as pretrain does) ----
    let eager_warmup = if args.cuda_graph {
        args.warmup.clamp(1, 3)
    } else {
        args.warmup
    };
    for _ in 0..args.warmup.max(eager_warmup) {
        let hb = source.next()?;
        step_no += 1;
        last_loss = Some(step(&mut tr, &graphed, &hb, step_no)?);
        if args.cuda_graph && graphed.is_none() && step_no as usize >= eager_warmup {
            let batch = Batch::from_host(&hb, device);
            graphed = Some(GraphedStep::capture(&mut tr, &batch, args.grad_clip)?);
        }
    }
    sync();

    // ---- timed steps ----
    let waited0 = source.waited();
    let (mut padded, mut useful) = (0usize, 0usize);
    let started = Instant::now();
    for _ in 0..args.steps {
        let hb = source.next()?;
        step_no += 1;
        padded += hb.rows * hb.cols;
        useful += hb.counted_labels;
        last_loss = Some(step(&mut tr, &graphed, &hb, step_no)?);
        if args.profile.is_some() {
            last_hb = Some(hb);
        }
    }
    sync();
    let secs = started.elapsed().as_secs_f64();
    let waited = source.waited() - waited0;
    let loss = match &last_loss {
        Some(l) => f64::try_from(l.to_kind(Kind::Double))?,
        None => f64::NAN,
    };
    if !loss.is_finite() {
        bail!("the loss after the timed steps is {loss}: the step is broken");
    }

    let peak = match device {
        Device::Cuda(i) if crate::kernels::BUILT_WITH_CUDA => {
            let (a, r) = crate::kernels::graph::peak_memory(i);
            json!({"allocated_gib": a as f64 / (1u64 << 30) as f64,
                   "reserved_gib": r as f64 / (1u64 << 30) as f64})
        }
        _ => serde_json::Value::Null,
    };
    let (ceiling_kind, n) = match device {
        Device::Cuda(_) => (Kind::BFloat16, 8192),
        _ => (Kind::Float, 1024),
    };
    let (_, ceiling) = crate::commands::doctor::matmul_rate(device, ceiling_kind, n);
    let step_ms = secs * 1e3 / args.steps as f64;
    let padded_tps = padded as f64 / secs;
    let model_flops = flops_per_token(&cfg, t) * padded_tps;
    let line = json!({
        "config": {
            "device": crate::model::precision::device_name(device),
            "dtype": format!("{precision}"),
            "batch_size": b, "max_seq_len": t,
            "data": if args.data_path.is_empty() { "synthetic".to_string() } else { args.data_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ") },
            "data_mode": args.data_mode.name(),
            "model": &cfg, "preset": args.model.model.map(|p| p.name()), "params": cfg.num_params(),
            "cuda_graph": args.cuda_graph, "warmup": args.warmup, "steps": args.steps,
            "kernels": args.kernels,
        },
        "step_ms": step_ms,
        "padded_tokens_per_s": padded_tps,
        "useful_tokens_per_s": useful as f64 / secs,
        "useful_share": useful as f64 / padded.max(1) as f64,
        "model_tflops": model_flops / 1e12,
        "flops_per_token": flops_per_token(&cfg, t),
        "matmul_ceiling_tflops": ceiling / 1e12,
        "matmul_ceiling_kind": format!("{ceiling_kind:?}"),
        "ceiling_fraction": model_flops / ceiling,
        "peak_memory": peak,
        "data_wait_share": (waited / secs).min(1.0),
        "final_loss": loss,
    });
    println!("{line}");

    if let (Some(dir), Some(hb)) = (&args.profile, &last_hb) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let batch = Batch::from_host(&hb, device);
        let n = args.profile_steps.max(1);
        sync();
        let rows =
            crate::kernels::profiler::profile(device.is_cuda(), &dir.join("trace.json"), || {
                for _ in 0..n {
                    let _ = tr.micro_step_on(
                        &batch.input_ids,
                        &batch.labels,
                        batch.seg_start.as_ref(),
                        &weight,
                    )?;
                    let _ = tr.optimizer_step(args.learning_rate, args.grad_clip)?;
                }
                sync();
                Ok(())
            })?;
        crate::kernels::profiler::write_tsv(&rows, &dir.join("kernels.tsv"))?;
        eprint!("{}", crate::kernels::profiler::report(&rows, n));
        eprintln!("profile: {} (trace.json, kernels.tsv)", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN.md: the 26M model costs about 163 MFLOP per trained token at T = 340.
    #[test]
    fn the_26m_model_costs_about_163_mflop_per_token() {
        let f = flops_per_token(&ModelConfig::minimind_26m(), 340);
        assert!((f / 1e6 - 163.2).abs() < 0.5, "{f}");
    }
}

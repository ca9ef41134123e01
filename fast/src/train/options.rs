//! `fast pretrain` options: every option of MiniMind's trainer/train_pretrain.py (kebab-case, with
//! MiniMind's snake_case spellings as aliases) plus ours, and their resolution into one
//! [`RunConfig`] that is printed at start and saved with every checkpoint.
//!
//! Defaults follow MiniMind where they make sense. With no options a run uses the embedded poems
//! corpus and a model sized to the device: the 26M config on CUDA; on a CPU a small config
//! and [`FirstRunRecipe`], which end in a few minutes on two cores with verse.
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::data::dataset::DataMode;
use crate::data::tokenizer::SpecialTokenStrings;
use crate::kernels::KernelConfig;
use crate::model::loss::Objective;
use crate::model::precision::device_name;
use crate::model::presets::ModelArgs;
use crate::model::ModelConfig;
use crate::optim::schedule::Schedule;
use crate::optim::OptimizerConfig;

use super::run_config::RunConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[value(name = "bfloat16", alias = "bf16")]
    Bfloat16,
    #[value(name = "float16", alias = "fp16")]
    Float16,
    #[value(name = "float32", alias = "fp32")]
    Float32,
}

impl From<DType> for crate::model::precision::Precision {
    fn from(d: DType) -> Self {
        match d {
            DType::Bfloat16 => Self::Bf16,
            DType::Float16 => Self::Fp16,
            DType::Float32 => Self::Fp32,
        }
    }
}

/// `--lr-schedule` (the schedule's own parameters are separate options).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Wsd,
}

/// How the loss of an accumulation window is normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossNormalization {
    /// MiniMind: mean over each micro-batch's counted labels, divided by accumulation steps.
    Mean,
    /// Sum over the whole window's counted labels divided by their total count.
    Token,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PretrainArgs {
    // ---- MiniMind's options ----
    /// JSONL corpus, one {"text": ...} per line: files, quoted glob patterns or directories of
    /// .jsonl/.jsonl.gz/.jsonl.zst files, read as one corpus in sorted path order
    /// [default: the embedded poems corpus].
    #[arg(long, alias = "data_path", num_args = 1..)]
    pub data_path: Vec<PathBuf>,
    /// Tokenizer directory (tokenizer.json + tokenizer_config.json), tokenizer.json file, or a
    /// built-in one: poems, minimind2, minimind3 [default: the --model's own, else poems].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Directory for the float16 weights ({save_weight}_{hidden}[_moe].safetensors).
    #[arg(long, alias = "save_dir", default_value = "out")]
    pub save_dir: PathBuf,
    /// Prefix of the saved weights file.
    #[arg(long, alias = "save_weight", default_value = "pretrain")]
    pub save_weight: String,
    /// Training epochs [default: 1; 3 for the embedded poems on a CPU].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Rows per micro-batch [default: 32 on CUDA, 16 on CPU].
    #[arg(long, alias = "batch_size")]
    pub batch_size: Option<usize>,
    /// Peak learning rate of the cosine schedule [default: 5e-4 on CUDA, 2e-3 on CPU; 5e-3 for
    /// the embedded poems on a CPU].
    #[arg(long, alias = "learning_rate")]
    pub learning_rate: Option<f64>,
    /// auto (CUDA if available, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Mixed precision: bfloat16 | float16 (with a GradScaler) | float32
    /// [default: bfloat16 on CUDA, float32 on CPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
    /// Worker threads of the data loader and of the tokenizing pass [default: min(8, cores)].
    #[arg(long, alias = "num_workers")]
    pub num_workers: Option<usize>,
    /// Micro-batches per optimizer step [default: 8 on CUDA, 1 on CPU].
    #[arg(long, alias = "accumulation_steps")]
    pub accumulation_steps: Option<usize>,
    /// Clip the global gradient L2 norm to this value.
    #[arg(long, alias = "grad_clip", default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Log every N micro-steps [default: 100 on CUDA, 10 on CPU].
    #[arg(long, alias = "log_interval")]
    pub log_interval: Option<usize>,
    /// Save weights and the resume checkpoint every N micro-steps [default: 1000 on CUDA, 100 on CPU].
    #[arg(long, alias = "save_interval")]
    pub save_interval: Option<usize>,
    /// Row length in tokens [default: 340 on CUDA, 128 on CPU].
    #[arg(long, alias = "max_seq_len")]
    pub max_seq_len: Option<usize>,
    /// Start from these weights: `none`, a weight prefix in --save-dir (MiniMind style, e.g.
    /// `pretrain`), or a path to a .safetensors / MiniMind .pth file.
    #[arg(long, alias = "from_weight", default_value = "none")]
    pub from_weight: String,
    /// 1 = continue from the resume checkpoint in --checkpoint-dir (start fresh if there is none).
    #[arg(long, alias = "from_resume", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub from_resume: u8,
    /// MiniMind's wandb switch. There is no wandb here: every run writes TensorBoard event files
    /// (--tensorboard) and metrics.jsonl, so giving it is refused with that sentence.
    #[arg(long, alias = "use_wandb")]
    pub use_wandb: bool,
    /// MiniMind's wandb project name: accepted and unused (see --use-wandb).
    #[arg(long, alias = "wandb_project")]
    pub wandb_project: Option<String>,
    /// MiniMind's torch.compile switch: 0 (its default) is accepted; 1 is refused, naming
    /// --cuda-graph, which is how this trainer takes the host out of the step.
    #[arg(long, alias = "use_compile", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub use_compile: u8,

    // ---- ours ----
    /// Seed of the weight init and of every epoch's data permutation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Warmup: linear from 0 over this many micro-steps before the cosine (0 = MiniMind's
    /// schedule), or optimizer steps with --lr-schedule linear / wsd (transformers' convention)
    /// [default: 0; 50 for the embedded poems on a CPU].
    #[arg(long, alias = "warmup_steps")]
    pub warmup_steps: Option<usize>,
    /// cosine: MiniMind's, to a tenth of the rate, per micro-step; linear: transformers'
    /// get_linear_schedule_with_warmup, to 0, per optimizer step; wsd: warmup, stable, then a
    /// linear decay over the last --decay-fraction of the optimizer steps to --min-lr-ratio.
    #[arg(long, alias = "lr_schedule", value_enum, default_value_t = ScheduleKind::Cosine)]
    pub lr_schedule: ScheduleKind,
    /// wsd: the fraction of the optimizer steps spent decaying.
    #[arg(long, alias = "decay_fraction", default_value_t = 0.2)]
    pub decay_fraction: f64,
    /// wsd: the rate at the end, as a fraction of --learning-rate.
    #[arg(long, alias = "min_lr_ratio", default_value_t = 0.0)]
    pub min_lr_ratio: f64,
    /// clm: causal LM (MiniMind); mlm: masked LM (bidirectional attention, the loss over masked
    /// positions only, unshifted).
    #[arg(long, value_enum, default_value_t = Objective::CausalLm)]
    pub objective: Objective,
    /// AdamW decoupled weight decay (torch's default).
    #[arg(long, alias = "weight_decay", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// padded: one document per row (MiniMind); packed: documents concatenated into full rows;
    /// packed-docs: [bos] + doc + [eos] concatenated into full rows, each token carrying its
    /// document's start (seg_start) so attention can stay within documents; chunked: Hugging
    /// Face's group_texts (ids concatenated without separators, cut into rows, the remainder
    /// dropped, labels = input_ids), the textbook recipe [default: padded; packed for the
    /// embedded poems on a CPU].
    #[arg(long, alias = "data_mode", value_enum)]
    pub data_mode: Option<DataMode>,
    /// mean: MiniMind's per-micro-batch mean; token: every counted token of a window weighs the same.
    #[arg(long, alias = "loss_normalization", value_enum, default_value_t = LossNormalization::Mean)]
    pub loss_normalization: LossNormalization,
    /// Stop after this many micro-steps of the run (as if interrupted: the schedule still spans the
    /// full run; a resume checkpoint is written so --from-resume 1 continues).
    #[arg(long, alias = "max_steps")]
    pub max_steps: Option<usize>,
    /// Directory of the resume checkpoint.
    #[arg(long, alias = "checkpoint_dir", default_value = "checkpoints")]
    pub checkpoint_dir: PathBuf,
    /// Leave out corpus lines that are not {"text": "..."} objects (counted and reported).
    #[arg(long, alias = "skip_bad_lines")]
    pub skip_bad_lines: bool,
    /// Token cache directory (the corpus tokenized once, read memory-mapped; built when missing)
    /// [default: <data-path>.tokens/tok-<key of the tokenizer and line policy>].
    #[arg(long, alias = "token_cache")]
    pub token_cache: Option<PathBuf>,
    /// Masked LM: probability that a non-special token is selected (80% of those become the mask
    /// token, 10% a random id, 10% stay), as transformers' DataCollatorForLanguageModeling.
    #[arg(long, alias = "mlm_probability", default_value_t = 0.15)]
    pub mlm_probability: f64,
    /// Masked LM: the mask token string [default: tokenizer_config.json's mask_token].
    #[arg(long, alias = "mask_token")]
    pub mask_token: Option<String>,
    /// Rebuild a --token-cache that does not fit this run (other sources, tokenizer or line
    /// policy, damaged shards) instead of refusing it. The default location is always rebuilt.
    #[arg(long, alias = "rebuild_cache")]
    pub rebuild_cache: bool,
    /// Skip optimizer steps whose loss or gradients are not finite (counted and reported) instead
    /// of stopping at the first one (bf16/fp32; fp16's GradScaler always skips and backs off).
    #[arg(long, alias = "skip_nonfinite")]
    pub skip_nonfinite: bool,
    /// Capture the micro-step and the optimizer step as CUDA graphs after the first optimizer
    /// step and replay them (same arithmetic, far less host time per step). CUDA, bfloat16 or
    /// float32; dense models, and MoE with `--moe-experts grouped` in bfloat16 on sm90/sm100;
    /// needs a binary built with `--features cuda` (make release-cuda).
    #[arg(long, alias = "cuda_graph")]
    pub cuda_graph: bool,
    /// Use only the first N documents of the corpus [default: all]. Giving it on a CPU with the
    /// embedded poems also turns off the first-run recipe (packed rows, 3 epochs, warmup 50,
    /// learning rate 5e-3): the CPU's small defaults and MiniMind's schedule apply.
    #[arg(long, alias = "max_docs")]
    pub max_docs: Option<usize>,
    /// bos token string (overrides tokenizer_config.json).
    #[arg(long, alias = "bos_token")]
    pub bos_token: Option<String>,
    /// eos token string (overrides tokenizer_config.json).
    #[arg(long, alias = "eos_token")]
    pub eos_token: Option<String>,
    /// pad token string (overrides tokenizer_config.json; falls back to eos).
    #[arg(long, alias = "pad_token")]
    pub pad_token: Option<String>,
    /// Prompt of the samples printed at the end.
    #[arg(long, alias = "sample_prompt", default_value = "春")]
    pub sample_prompt: String,
    /// Tokens generated for each sample (0 = no sample).
    #[arg(long, alias = "sample_tokens", default_value_t = 48)]
    pub sample_tokens: usize,
    /// Besides the greedy sample, one drawn at this temperature with --sample-top-p and the run's
    /// --seed (the same text every time); 0 = the greedy sample only. A small model's greedy
    /// continuation repeats its likeliest characters; a draw shows what it has learnt.
    #[arg(long, alias = "sample_temperature", default_value_t = 0.85)]
    pub sample_temperature: f64,
    /// Nucleus (top-p) of the drawn sample.
    #[arg(long, alias = "sample_top_p", default_value_t = 0.85)]
    pub sample_top_p: f64,
    /// No progress bar (log lines only).
    #[arg(long, alias = "no_progress")]
    pub no_progress: bool,
    /// TensorBoard event files (loss, lr, grad norm, throughput, the run configuration) go to
    /// this directory, rank 0 only; `none` writes none [default: <save-dir>/tensorboard].
    #[arg(long)]
    pub tensorboard: Option<PathBuf>,
    /// Profile micro-steps --profile-at .. --profile-at + --profile-steps - 1 with libtorch's
    /// profiler (graph replays and collectives included): every rank writes
    /// DIR/rank<R>/trace.json and kernels.tsv; rank 0 prints the device time per op.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// First micro-step profiled by --profile (past warm-up and graph capture).
    #[arg(long, default_value_t = 50)]
    pub profile_at: usize,
    /// Micro-steps profiled by --profile.
    #[arg(long, default_value_t = 5)]
    pub profile_steps: usize,

    /// Held-out JSONL scored during training as `fast eval` scores it (one document per row from
    /// bos, token-weighted): the loss goes into the log line, metrics.jsonl and the curve.
    #[arg(long, alias = "eval_data")]
    pub eval_data: Option<PathBuf>,
    /// Score --eval-data every this many micro-steps (and at the end) [default: the save interval].
    #[arg(long, alias = "eval_interval")]
    pub eval_interval: Option<usize>,
    /// Score only the first N documents of --eval-data [default: all].
    #[arg(long, alias = "eval_docs")]
    pub eval_docs: Option<usize>,
    /// Rows per held-out batch.
    #[arg(long, alias = "eval_batch_size", default_value_t = 64)]
    pub eval_batch_size: usize,

    // ---- optimizer ----
    #[command(flatten)]
    pub optimizer: OptimizerConfig,

    // ---- model ----
    #[command(flatten)]
    pub model: ModelArgs,

    // ---- kernels ----
    #[command(flatten)]
    pub kernels: KernelConfig,
}

/// `--tokenizer`: a path, or the name of a built-in tokenizer when no such path exists.
pub fn resolve_tokenizer(given: &std::path::Path) -> Result<PathBuf> {
    if given.exists() {
        return Ok(given.to_path_buf());
    }
    let name = given.to_string_lossy();
    match crate::data::defaults::builtin_tokenizer(&name)? {
        Some(dir) => Ok(dir),
        None => bail!(
            "--tokenizer {name}: no such file or directory, and not a built-in tokenizer ({})",
            crate::data::defaults::builtin_tokenizer_names().join(", ")
        ),
    }
}

/// The first run on a CPU (`make pretrain`: the embedded poems, no --data-path or --max-docs):
/// the small CPU model on all 5,000 poems packed into full rows (no step spent on padding),
/// 3 epochs with a short warmup and a higher peak rate, so that a few minutes on two cores end
/// with verse; each can still be given.
pub struct FirstRunRecipe;

impl FirstRunRecipe {
    pub const EPOCHS: usize = 3;
    pub const WARMUP_STEPS: usize = 50;
    pub const LEARNING_RATE: f64 = 5e-3;
    pub const DATA_MODE: DataMode = DataMode::Packed;
}

impl PretrainArgs {
    /// Resolve defaults for `device` and validate. `data_path`/`tokenizer` are the embedded
    /// defaults' paths when the options were not given.
    pub fn resolve(
        &self,
        device: tch::Device,
        default_data: impl FnOnce() -> Result<(PathBuf, PathBuf)>,
    ) -> Result<RunConfig> {
        if self.use_wandb {
            bail!(
                "--use-wandb: there is no wandb here; every run writes TensorBoard event files (--tensorboard DIR, default <save-dir>/tensorboard) and <save-dir>/metrics.jsonl"
            );
        }
        if self.use_compile == 1 {
            bail!(
                "--use-compile 1: there is no torch.compile here; --cuda-graph captures the micro-step and the optimizer step as CUDA graphs instead (CUDA, a binary built with make release-cuda)"
            );
        }
        if self.eval_data.is_none() {
            for (name, given) in [
                ("eval-interval", self.eval_interval.is_some()),
                ("eval-docs", self.eval_docs.is_some()),
            ] {
                if given {
                    bail!("--{name} applies to the held-out scoring of --eval-data, which is not given");
                }
            }
        }
        if self.mask_token.is_some() && self.objective != Objective::MaskedLm {
            bail!("--mask-token applies to --objective mlm only (this run is a causal LM)");
        }
        let cuda = device.is_cuda();
        let mut notes = Vec::new();
        let mut embedded = None;
        let mut default_data = Some(default_data);
        let mut embedded_data = || -> Result<(PathBuf, PathBuf)> {
            if let Some(f) = default_data.take() {
                embedded = Some(f()?);
            }
            Ok(embedded.clone().expect("set above"))
        };
        let data_path = if self.data_path.is_empty() {
            notes.push("data: the embedded corpus (5,000 Tang poems, chinese-poetry, MIT)".into());
            vec![embedded_data()?.0]
        } else {
            self.data_path.clone()
        };
        let preset_tokenizer = self.model.model.map(|p| p.tokenizer());
        let tokenizer = match (&self.tokenizer, preset_tokenizer) {
            (Some(t), _) => resolve_tokenizer(t)?,
            (None, Some(name)) => {
                notes.push(format!("tokenizer: {name}, the --model's own (vocab 6400)"));
                resolve_tokenizer(std::path::Path::new(name))?
            }
            (None, None) => {
                notes.push(
                    "tokenizer: the embedded byte-level BPE (vocab 6400) trained on the poems"
                        .into(),
                );
                embedded_data()?.1
            }
        };
        let pick = |given: Option<usize>, gpu: usize, cpu: usize| {
            given.unwrap_or(if cuda { gpu } else { cpu })
        };
        let m = &self.model;
        let small = ModelConfig {
            hidden_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            ..ModelConfig::default()
        };
        let mut model = m.resolve(if cuda { ModelConfig::default() } else { small })?;
        model.vocab_size = crate::data::tokenizer::TextTokenizer::load(
            &tokenizer,
            &SpecialTokenStrings {
                bos: self.bos_token.clone(),
                eos: self.eos_token.clone(),
                pad: self.pad_token.clone(),
            },
        )?
        .vocab_size();
        let first_run = !cuda && self.data_path.is_empty() && self.max_docs.is_none();
        if !cuda {
            let unsized_model = m.model.is_none();
            let sized: Vec<&str> = [
                ("hidden-size", unsized_model && m.hidden_size.is_none()),
                (
                    "num-hidden-layers",
                    unsized_model && m.num_hidden_layers.is_none(),
                ),
                ("max-seq-len", self.max_seq_len.is_none()),
                ("batch-size", self.batch_size.is_none()),
                ("accumulation-steps", self.accumulation_steps.is_none()),
                ("learning-rate", self.learning_rate.is_none() && !first_run),
            ]
            .iter()
            .filter(|(_, default)| *default)
            .map(|(n, _)| *n)
            .collect();
            if !sized.is_empty() {
                notes.push(format!(
                    "CPU: small defaults for {} (MiniMind's 26M config is the CUDA default)",
                    sized.join(", ")
                ));
            }
        }
        // The first run's recipe, for every option of it not given.
        let mut recipe = |name: &str, value: &dyn std::fmt::Display| {
            if first_run {
                notes.push(format!(
                    "CPU first run: --{name} {value}, the embedded poems' recipe (give it to change)"
                ));
            }
            first_run
        };
        let epochs = self.epochs.unwrap_or_else(|| {
            if recipe("epochs", &FirstRunRecipe::EPOCHS) {
                FirstRunRecipe::EPOCHS
            } else {
                1
            }
        });
        let data_mode = self.data_mode.unwrap_or_else(|| {
            if recipe("data-mode", &"packed") {
                FirstRunRecipe::DATA_MODE
            } else {
                DataMode::Padded
            }
        });
        let warmup_steps = self.warmup_steps.unwrap_or_else(|| {
            if recipe("warmup-steps", &FirstRunRecipe::WARMUP_STEPS) {
                FirstRunRecipe::WARMUP_STEPS
            } else {
                0
            }
        });
        let learning_rate = self.learning_rate.unwrap_or_else(|| {
            if recipe("learning-rate", &FirstRunRecipe::LEARNING_RATE) {
                FirstRunRecipe::LEARNING_RATE
            } else if cuda {
                5e-4
            } else {
                2e-3
            }
        });
        let dtype = match self.dtype {
            Some(d) => d,
            None if cuda => DType::Bfloat16,
            None => DType::Float32,
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cfg = RunConfig {
            data_path,
            tokenizer,
            save_dir: self.save_dir.clone(),
            save_weight: self.save_weight.clone(),
            checkpoint_dir: self.checkpoint_dir.clone(),
            epochs,
            batch_size: pick(self.batch_size, 32, 16),
            learning_rate,
            device: device_name(device),
            dtype,
            num_workers: self.num_workers.unwrap_or(cores.min(8)),
            accumulation_steps: pick(self.accumulation_steps, 8, 1),
            grad_clip: self.grad_clip,
            log_interval: pick(self.log_interval, 100, 10),
            save_interval: pick(self.save_interval, 1000, 100),
            model_preset: m.model.map(|p| p.name().to_string()),
            model,
            max_seq_len: pick(self.max_seq_len, 340, 128),
            from_weight: self.from_weight.clone(),
            from_resume: self.from_resume == 1,
            seed: self.seed,
            warmup_steps,
            lr_schedule: match self.lr_schedule {
                ScheduleKind::Cosine => Schedule::Cosine,
                ScheduleKind::Linear => Schedule::Linear,
                ScheduleKind::Wsd => Schedule::Wsd {
                    decay_fraction: self.decay_fraction,
                    min_ratio: self.min_lr_ratio,
                },
            },
            objective: self.objective,
            weight_decay: self.weight_decay,
            optimizer: self.optimizer,
            data_mode,
            loss_normalization: self.loss_normalization,
            max_steps: self.max_steps,
            skip_bad_lines: self.skip_bad_lines,
            token_cache: self.token_cache.clone(),
            rebuild_cache: self.rebuild_cache,
            mlm_probability: self.mlm_probability,
            mask_token: self.mask_token.clone(),
            skip_nonfinite: self.skip_nonfinite,
            cuda_graph: self.cuda_graph,
            max_docs: self.max_docs,
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
            pad_token: self.pad_token.clone(),
            sample_prompt: self.sample_prompt.clone(),
            sample_tokens: self.sample_tokens,
            sample_temperature: self.sample_temperature,
            sample_top_p: self.sample_top_p,
            no_progress: self.no_progress,
            tensorboard: match &self.tensorboard {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(p.clone()),
                None => Some(self.save_dir.join("tensorboard")),
            },
            profile: self
                .profile
                .clone()
                .map(|d| (d, self.profile_at, self.profile_steps)),
            kernels: self.kernels,
            eval_data: self.eval_data.clone(),
            eval_interval: self
                .eval_interval
                .unwrap_or_else(|| pick(self.save_interval, 1000, 100)),
            eval_docs: self.eval_docs,
            eval_batch_size: self.eval_batch_size,
            notes,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The most data-loader threads a run may ask for (more than any machine's cores, fewer than
/// an operating system refuses to start).
pub const MAX_WORKERS: usize = 1024;

/// `--num-workers` of every command that reads a corpus: 1 ..= [`MAX_WORKERS`] threads.
pub fn check_num_workers(n: usize) -> Result<()> {
    if n == 0 || n > MAX_WORKERS {
        bail!(
            "--num-workers must be between 1 and {MAX_WORKERS} (got {n}): each is a thread of the data loader and of the tokenizing pass"
        );
    }
    Ok(())
}

/// An option that must be a finite number above 0 (`--learning-rate`, `--grad-clip`, in pretrain
/// and bench alike).
pub fn check_positive(name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!("--{name} must be a positive number (got {v})");
    }
    Ok(())
}

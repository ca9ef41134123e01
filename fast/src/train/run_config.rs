//! [`RunConfig`], what `fast pretrain`'s options (`options.rs`) resolve to, and its checks.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::options::{check_num_workers, check_positive, DType, LossNormalization};
use crate::data::dataset::DataMode;
use crate::data::tokenizer::SpecialTokenStrings;
use crate::kernels::KernelConfig;
use crate::model::loss::Objective;
use crate::model::ModelConfig;
use crate::optim::accumulation::Normalisation;
use crate::optim::schedule::Schedule;
use crate::optim::OptimizerConfig;
use crate::train::setup::DataSpec;

/// Everything a run was started with, defaults resolved. Printed at start and saved (as JSON)
/// with every checkpoint; a resume checks that the fields that shape the run still agree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `--data-path` values as given (a run saved before several were allowed has one).
    #[serde(deserialize_with = "one_or_many")]
    pub data_path: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub save_dir: PathBuf,
    pub save_weight: String,
    pub checkpoint_dir: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub device: String,
    pub dtype: DType,
    pub num_workers: usize,
    pub accumulation_steps: usize,
    pub grad_clip: f64,
    pub log_interval: usize,
    pub save_interval: usize,
    /// `--model`: the preset the model started from, if any.
    #[serde(default)]
    pub model_preset: Option<String>,
    /// Every field of the model (MiniMind's config names; the vocabulary is the tokenizer's).
    #[serde(flatten)]
    pub model: ModelConfig,
    pub max_seq_len: usize,
    pub from_weight: String,
    pub from_resume: bool,
    pub seed: u64,
    pub warmup_steps: usize,
    #[serde(default)]
    pub lr_schedule: Schedule,
    #[serde(default)]
    pub objective: Objective,
    pub weight_decay: f64,
    /// `--optimizer` and Muon's hyper-parameters.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    pub data_mode: DataMode,
    pub loss_normalization: LossNormalization,
    pub max_steps: Option<usize>,
    pub skip_bad_lines: bool,
    /// `--token-cache` (None: the default beside the data; the data line names the directory).
    #[serde(default)]
    pub token_cache: Option<PathBuf>,
    #[serde(default)]
    pub rebuild_cache: bool,
    /// Masked LM's selection probability and mask token (used when the objective is masked LM).
    #[serde(default = "default_mlm_probability")]
    pub mlm_probability: f64,
    #[serde(default)]
    pub mask_token: Option<String>,
    #[serde(default)]
    pub skip_nonfinite: bool,
    #[serde(default)]
    pub cuda_graph: bool,
    pub max_docs: Option<usize>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub sample_prompt: String,
    pub sample_tokens: usize,
    /// The drawn sample's temperature (0: greedy only) and top-p; its seed is `seed`.
    #[serde(default)]
    pub sample_temperature: f64,
    #[serde(default = "one_f64")]
    pub sample_top_p: f64,
    pub no_progress: bool,
    /// `--tensorboard`: the event files' directory (None: `--tensorboard none`).
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// `--profile`: (directory, first micro-step, micro-steps).
    #[serde(default)]
    pub profile: Option<(PathBuf, usize, usize)>,
    /// Which kernels run (`--kernels`, `--attention`, ...).
    #[serde(default)]
    pub kernels: KernelConfig,
    /// `--eval-data` and how it is scored.
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    #[serde(default = "one")]
    pub eval_interval: usize,
    #[serde(default)]
    pub eval_docs: Option<usize>,
    #[serde(default = "one")]
    pub eval_batch_size: usize,
    /// Why defaults differ from MiniMind's (device-sized model, CPU subset, ...).
    pub notes: Vec<String>,
}

fn default_mlm_probability() -> f64 {
    0.15
}

/// `data_path` as a list, or the single path of a configuration saved before lists.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

fn one() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

impl RunConfig {
    /// Refuse impossible values with the option's name, before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        let at_least = |name: &str, v: usize, min: usize| -> Result<()> {
            if v < min {
                bail!("--{name} must be at least {min} (got {v})");
            }
            Ok(())
        };
        at_least("epochs", self.epochs, 1)?;
        at_least("batch-size", self.batch_size, 1)?;
        at_least("accumulation-steps", self.accumulation_steps, 1)?;
        at_least("log-interval", self.log_interval, 1)?;
        at_least("save-interval", self.save_interval, 1)?;
        check_num_workers(self.num_workers)?;
        at_least("max-seq-len", self.max_seq_len, 2)?;
        at_least("eval-interval", self.eval_interval, 1)?;
        at_least("eval-batch-size", self.eval_batch_size, 1)?;
        if let Some(n) = self.eval_docs {
            at_least("eval-docs", n, 1)?;
        }
        if let Some(m) = self.max_steps {
            at_least("max-steps", m, 1)?;
        }
        if let Some(m) = self.max_docs {
            at_least("max-docs", m, 1)?;
        }
        if let Some((_, at, n)) = &self.profile {
            at_least("profile-at", *at, 1)?;
            at_least("profile-steps", *n, 1)?;
        }
        check_positive("learning-rate", self.learning_rate)?;
        if !(0.0..=1.0).contains(&self.mlm_probability) {
            bail!(
                "--mlm-probability must be between 0 and 1 (got {})",
                self.mlm_probability
            );
        }
        check_positive("grad-clip", self.grad_clip)?;
        if !(self.sample_temperature.is_finite() && self.sample_temperature >= 0.0) {
            bail!(
                "--sample-temperature must be zero (greedy only) or positive (got {})",
                self.sample_temperature
            );
        }
        if !(self.sample_top_p > 0.0 && self.sample_top_p <= 1.0) {
            bail!(
                "--sample-top-p must be in (0, 1] (got {})",
                self.sample_top_p
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be zero or positive (got {})",
                self.weight_decay
            );
        }
        crate::model::presets::check(&self.model)?;
        self.optimizer.validate()?;
        if let Schedule::Wsd {
            decay_fraction,
            min_ratio,
        } = self.lr_schedule
        {
            if !(0.0..=1.0).contains(&decay_fraction) {
                bail!("--decay-fraction must be between 0 and 1 (got {decay_fraction})");
            }
            if !(0.0..=1.0).contains(&min_ratio) {
                bail!("--min-lr-ratio must be between 0 and 1 (got {min_ratio})");
            }
        }
        if self.save_weight.is_empty() || self.save_weight.contains(['/', '\\']) {
            bail!(
                "--save-weight must be a plain file-name prefix (got {:?})",
                self.save_weight
            );
        }
        Ok(())
    }

    pub fn moe_suffix(&self) -> &'static str {
        if self.model.use_moe {
            "_moe"
        } else {
            ""
        }
    }

    /// The float16 weights file: `{save_dir}/{save_weight}_{hidden}[_moe].safetensors`.
    pub fn weights_path(&self) -> PathBuf {
        self.save_dir.join(format!(
            "{}_{}{}.safetensors",
            self.save_weight,
            self.model.hidden_size,
            self.moe_suffix()
        ))
    }

    /// The resume checkpoint: `{checkpoint_dir}/{save_weight}_{hidden}[_moe]_resume.safetensors`.
    pub fn resume_path(&self) -> PathBuf {
        self.checkpoint_dir.join(format!(
            "{}_{}{}_resume.safetensors",
            self.save_weight,
            self.model.hidden_size,
            self.moe_suffix()
        ))
    }

    /// What [`crate::train::setup::Data::load`] reads for this run: for `--objective mlm` the
    /// rows are masked with --mlm-probability, --mask-token and --seed.
    pub fn data_spec(&self) -> DataSpec {
        self.data_spec_for(self.objective == Objective::MaskedLm)
    }

    /// [`Self::data_spec`] with masking chosen by `masked_lm` rather than by the objective.
    pub fn data_spec_for(&self, masked_lm: bool) -> DataSpec {
        DataSpec {
            data_path: self.data_path.clone(),
            tokenizer: self.tokenizer.clone(),
            specials: SpecialTokenStrings {
                bos: self.bos_token.clone(),
                eos: self.eos_token.clone(),
                pad: self.pad_token.clone(),
            },
            max_seq_len: self.max_seq_len,
            data_mode: self.data_mode,
            threads: self.num_workers,
            skip_bad_lines: self.skip_bad_lines,
            max_docs: self.max_docs,
            token_cache: self.token_cache.clone(),
            rebuild_cache: self.rebuild_cache,
            progress: !self.no_progress,
            mlm: masked_lm.then(|| crate::data::mlm::MlmSpec {
                probability: self.mlm_probability,
                mask_token: self.mask_token.clone(),
                seed: self.seed,
            }),
        }
    }

    /// The data options that change what a resumed run would train on, saved against now:
    /// the resume check's data half (the corpus itself is checked through the token cache's
    /// manifest). Each entry names the option.
    pub fn data_differences(&self, saved: &RunConfig) -> Vec<String> {
        let mut diffs = Vec::new();
        let mut same = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("--{name}: saved {a}, now {b}"));
            }
        };
        same(
            "skip-bad-lines",
            saved.skip_bad_lines.to_string(),
            self.skip_bad_lines.to_string(),
        );
        same(
            "mlm-probability",
            saved.mlm_probability.to_string(),
            self.mlm_probability.to_string(),
        );
        for (name, a, b) in [
            ("mask-token", &saved.mask_token, &self.mask_token),
            ("bos-token", &saved.bos_token, &self.bos_token),
            ("eos-token", &saved.eos_token, &self.eos_token),
            ("pad-token", &saved.pad_token, &self.pad_token),
        ] {
            same(name, format!("{a:?}"), format!("{b:?}"));
        }
        diffs
    }

    pub fn normalisation(&self) -> Normalisation {
        match self.loss_normalization {
            LossNormalization::Mean => Normalisation::MiniMindMean,
            LossNormalization::Token => Normalisation::TokenWeighted,
        }
    }

    /// The learning rate of micro-step `global` (1-based) of a run of `iters` micro-steps an epoch.
    pub fn lr_at(&self, global: usize, iters: usize) -> f64 {
        self.lr_schedule.lr(
            global as u64,
            iters as u64,
            self.epochs as u64,
            self.accumulation_steps as u64,
            self.learning_rate,
            self.warmup_steps as u64,
        )
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::Bfloat16 => "bfloat16",
            DType::Float16 => "float16",
            DType::Float32 => "float32",
        }
    }

    /// Print the configuration, one option per line, as a run's first output.
    pub fn print(&self) {
        let value = serde_json::to_value(self).expect("RunConfig serialises");
        println!("run configuration:");
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                if k == "notes" {
                    continue;
                }
                let shown = |v: &serde_json::Value| match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".to_string(),
                    other => other.to_string(),
                };
                match &v {
                    // The kernel choices, one per line.
                    serde_json::Value::Object(inner) => {
                        for (sub, v) in inner {
                            println!("  {:<28} {}", format!("{k}.{sub}"), shown(v));
                        }
                    }
                    _ => println!("  {k:<28} {}", shown(&v)),
                }
            }
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }
}

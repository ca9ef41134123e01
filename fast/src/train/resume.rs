//! Where a run starts (fresh, `--from-weight`, or `--from-resume 1`) and what it saves at every
//! save interval: the float16 weights (with the run's tokenizer beside them), the resume
//! checkpoint and `run_config.json`.
//!
//! Exact resume: the only randomness is the seeded init and the seeded epoch permutation; the
//! resume checkpoint holds the fp32 weights, AdamW's moments and step counts, the scaler, the
//! gradients and token count of a half-finished accumulation window, and the data position, so
//! a run stopped (`--max-steps`, or killed after a save) and resumed ends where an uninterrupted
//! one does — bit for bit on the CPU.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;

use super::console::Console;
use super::metrics::MetricRow;
use super::ranks::Ranks;
use super::run_config::RunConfig;
use super::trainer::Trainer;
use crate::data::order::{rescale_step, resume_point};
use crate::data::tokenizer::TextTokenizer;
use crate::io::checkpoint::{self, ResumeState, RESUME_FORMAT};
use crate::model::ModelConfig;

/// Micro-steps per epoch and in the whole run: a step consumes one global batch (world x
/// batch-size rows).
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Training rows in an epoch.
    pub rows: usize,
    pub iters: usize,
    pub total: usize,
}

impl Plan {
    pub fn new(cfg: &RunConfig, rows: usize, world: usize) -> Plan {
        let iters = Plan::iters_on(cfg, rows, world);
        Plan {
            rows,
            iters,
            total: cfg.epochs * iters,
        }
    }

    fn iters_on(cfg: &RunConfig, rows: usize, world: usize) -> usize {
        rows.div_ceil(cfg.batch_size * world)
    }
}

/// Where the run stands, and what it has done so far.
pub struct Progress {
    /// 0-based epoch, and micro-steps done in it.
    pub epoch: usize,
    pub step: usize,
    /// Micro-steps done in the whole run.
    pub global: usize,
    /// Counted labels of a half-finished accumulation window (resumed in the middle of one).
    pub window_count: usize,
    pub metrics: Vec<MetricRow>,
    pub useful_seen: u64,
    /// Wall time of the runs this one continues.
    pub elapsed_before: f64,
    /// The micro-step of the last checkpoint written.
    pub last_saved: Option<usize>,
}

impl Progress {
    fn fresh() -> Progress {
        Progress {
            epoch: 0,
            step: 0,
            global: 0,
            window_count: 0,
            metrics: Vec::new(),
            useful_seen: 0,
            elapsed_before: 0.0,
            last_saved: None,
        }
    }
}

/// `--from-weight`: a file path, or MiniMind's `{save_dir}/{prefix}_{hidden}[_moe]` with
/// `.safetensors` (ours) or `.pth` (MiniMind's).
pub fn from_weight_path(cfg: &RunConfig) -> Result<PathBuf> {
    let direct = PathBuf::from(&cfg.from_weight);
    if direct.is_file() {
        return Ok(direct);
    }
    let stem = format!(
        "{}_{}{}",
        cfg.from_weight,
        cfg.model.hidden_size,
        cfg.moe_suffix()
    );
    for ext in ["safetensors", "pth"] {
        let p = cfg.save_dir.join(format!("{stem}.{ext}"));
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "--from-weight {}: no such file, and neither {}/{stem}.safetensors nor {}/{stem}.pth exists",
        cfg.from_weight,
        cfg.save_dir.display(),
        cfg.save_dir.display()
    )
}

/// The weights of `--from-weight` into the trainer; returns the line saying so.
pub fn load_from_weight(cfg: &RunConfig, tr: &mut Trainer) -> Result<String> {
    let path = from_weight_path(cfg)?;
    let loaded = crate::io::weights::load_weights(&path)?;
    tr.load_weights(
        loaded.into_iter().collect::<HashMap<_, _>>(),
        &path.display().to_string(),
    )?;
    Ok(format!("weights: started from {}", path.display()))
}

/// The position to start from: `--from-resume 1` with a checkpoint restores the trainer and the
/// data position (rescaled to this world size), otherwise the start.
pub fn restore_or_start(
    cfg: &RunConfig,
    plan: &Plan,
    ranks: &Ranks,
    tr: &mut Trainer,
    con: &Console,
) -> Result<Progress> {
    let path = cfg.resume_path();
    let mut p = Progress::fresh();
    if cfg.from_resume {
        match checkpoint::load_resume(&path)? {
            None => con.println(format!(
                "resume: no checkpoint at {} yet; starting from scratch",
                path.display()
            )),
            Some(r) => {
                checkpoint::check_compatible(&path, &r.state.config, cfg)?;
                let saved_ws = r.state.world_size.max(1);
                let world = ranks.world;
                tr.load_state_dict(&r.tensors, &r.state.trainer, &path)?;
                if ranks.rank != 0 {
                    // Rank 0 holds a half-finished window's gradients
                    // (parallel::consolidate_partial_gradients).
                    tr.zero_grad()?;
                }
                if r.state.iters != Plan::iters_on(cfg, plan.rows, saved_ws) {
                    bail!(
                        "{}: saved with {} steps per epoch, this run has {} (the data changed?)",
                        path.display(),
                        r.state.iters,
                        plan.iters
                    );
                }
                p.epoch = r.state.epoch;
                p.step = rescale_step(r.state.step, saved_ws, world);
                p.global = p.epoch * plan.iters + p.step;
                p.window_count = r.state.trainer["window_count"].as_u64().unwrap_or(0) as usize;
                p.useful_seen = r.state.useful_tokens_seen;
                p.elapsed_before = r.state.elapsed_s;
                p.metrics = r.state.metrics;
                let rescaled = if saved_ws != world {
                    let rp = resume_point(r.state.step, saved_ws, world, cfg.batch_size);
                    format!(
                        ", step {} rescaled from world size {saved_ws}, {} sample(s) repeated",
                        r.state.step,
                        rp.repeated()
                    )
                } else {
                    String::new()
                };
                con.println(format!(
                    "resume: {} at epoch {} step {}/{} (global {}/{}){rescaled}",
                    path.display(),
                    p.epoch + 1,
                    p.step,
                    plan.iters,
                    p.global,
                    plan.total
                ));
            }
        }
    }
    // Saved at the end of an epoch: continue with the next one.
    if p.step >= plan.iters && p.epoch < cfg.epochs {
        p.epoch += 1;
        p.step = 0;
        p.window_count = 0;
    }
    p.global = p.epoch * plan.iters + p.step;
    Ok(p)
}

/// The model config saved beside the weights: ours plus the tokenizer's special ids.
pub fn model_config_json(model_cfg: &ModelConfig, tok: &TextTokenizer) -> serde_json::Value {
    let mut v = serde_json::to_value(model_cfg).expect("ModelConfig serialises");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("bos_token_id".into(), json!(tok.bos));
        m.insert("eos_token_id".into(), json!(tok.eos));
        m.insert("pad_token_id".into(), json!(tok.pad));
    }
    v
}

/// Everything a save writes (rank 0 only): the float16 weights, the resume checkpoint (with the
/// run's position), `run_config.json`.
#[allow(clippy::too_many_arguments)]
pub fn save(
    cfg: &RunConfig,
    tr: &Trainer,
    tok: &TextTokenizer,
    plan: &Plan,
    p: &Progress,
    world: usize,
    window_count: usize,
    elapsed: f64,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut model_config = model_config_json(tr.config(), tok);
    // The tokenizer the run used, copied beside the weights: `fast export` finds it there.
    model_config["tokenizer"] =
        checkpoint::save_tokenizer_beside(&cfg.weights_path(), &cfg.tokenizer)?;
    let (tensors, mut host) = tr.state_dict();
    host["window_count"] = json!(window_count);
    let state = ResumeState {
        format: RESUME_FORMAT.into(),
        config: cfg.clone(),
        model_config: model_config.clone(),
        epoch: p.epoch,
        step: p.step,
        iters: plan.iters,
        global_step: p.global,
        world_size: world,
        trainer: host,
        seed: cfg.seed,
        useful_tokens_seen: p.useful_seen,
        elapsed_s: elapsed,
        metrics: p.metrics.clone(),
        completed: p.global == plan.total,
    };
    checkpoint::save_weights_f16(&cfg.weights_path(), tr.named_parameters(), &model_config)?;
    checkpoint::save_resume(&cfg.resume_path(), &state, &tensors)?;
    let run_json = serde_json::to_string_pretty(cfg)? + "\n";
    checkpoint::write_atomic(&cfg.save_dir.join("run_config.json"), run_json.as_bytes())?;
    Ok(())
}

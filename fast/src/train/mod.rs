//! `fast pretrain`: MiniMind's trainer/train_pretrain.py, top to bottom in [`train`].
//!
//! data -> model -> (weights | resume) -> for each epoch: permutation, SkipBatchSampler, batches
//! prefetched on worker threads -> per micro-step: lr from `--lr-schedule`, forward/backward of
//! `(ce + aux) * weight`; at the end of each accumulation window (and the trailing partial one):
//! unscale (fp16), clip, the optimizer step (AdamW or Muon), zero grads -> log, metrics.jsonl,
//! weights and resume checkpoint every save interval -> loss/lr curve and samples (greedy, and
//! drawn with the run's seed) at the end.
//!
//! | file | part of the run |
//! |---|---|
//! | `options.rs`, `run_config.rs` | the CLI options and what they resolve to, [`run_config::RunConfig`] |
//! | `setup.rs` | the corpus, tokenizer and rows (shared with `bench` and `eval`) |
//! | `ranks.rs` | this process's rank, device and communicator |
//! | `trainer.rs`, `head.rs` | the model with its optimizer: micro-step, optimizer step, state dict |
//! | `step.rs`, `graph.rs` | the loop's steps, eager or replayed from CUDA graphs |
//! | `epoch.rs` | one epoch's batches, a window at a time |
//! | `resume.rs` | start (fresh, `--from-weight`, `--from-resume`) and every save |
//! | `console.rs`, `metrics.rs` | log lines, progress bar, metrics.jsonl and the loss curve |
//! | `tensorboard.rs` | `--tensorboard`: the same rows as TensorBoard event files |
//! | `held_out.rs` | `--eval-data`: the held-out loss during the run |
//! | `guard.rs`, `signals.rs`, `profile.rs` | non-finite steps, SIGINT/SIGTERM, `--profile` |

mod console;
mod epoch;
pub mod graph;
mod guard;
mod head;
mod held_out;
pub mod metrics;
pub mod options;
mod profile;
mod ranks;
pub mod resume;
pub mod run_config;
pub mod setup;
mod signals;
mod step;
pub mod tensorboard;
pub mod trainer;

pub use signals::Interrupted;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Device, Tensor};

use crate::data::batch::Batch;
use crate::data::tokenizer::TextTokenizer;
use crate::model::precision::Precision;
use crate::model::sampling::{Sampler, SamplingConfig};
use crate::model::ModelConfig;
use crate::optim::adamw::{AdamWConfig, AdamWImpl};
use console::{log_line, Console, Interval, IntervalEnd};
use epoch::EpochBatches;
use held_out::HeldOut;
use metrics::MetricRow;
use options::PretrainArgs;
use profile::ProfileWindow;
use ranks::Ranks;
use resume::{Plan, Progress};
use run_config::RunConfig;
use setup::Data;
use signals::Signals;
use step::{Stepper, WindowCount};
use trainer::{Trainer, TrainerConfig};

/// What a finished (or `--max-steps`-stopped) run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub config: RunConfig,
    pub model_config: ModelConfig,
    /// Micro-steps done in the whole run / planned.
    pub global_step: usize,
    pub total_steps: usize,
    pub completed: bool,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub metrics: Vec<MetricRow>,
    pub weights_path: PathBuf,
    pub resume_path: PathBuf,
    pub metrics_path: PathBuf,
    pub curve_path: Option<PathBuf>,
    pub sample: Option<String>,
    pub elapsed_s: f64,
    pub data_wait_share: f64,
}

/// The `pretrain` subcommand: resolve options, print them, train.
pub fn run(args: &PretrainArgs) -> Result<RunSummary> {
    let device = crate::model::precision::parse_device(&args.device)?;
    let cfg = args.resolve(device, || {
        let d = crate::data::defaults::materialize()?;
        Ok((d.corpus, d.tokenizer_dir))
    })?;
    // Under torchrun only rank 0 prints (every rank resolves the same configuration).
    if crate::parallel::DistEnv::from_env()
        .map(|e| e.rank == 0)
        .unwrap_or(true)
    {
        cfg.print();
    }
    train(&cfg)
}

/// The model a run trains: the configuration's model with the tokenizer's vocabulary.
pub fn model_config_of(cfg: &RunConfig, vocab_size: usize) -> ModelConfig {
    ModelConfig {
        vocab_size,
        ..cfg.model.clone()
    }
}

fn trainer_config(cfg: &RunConfig, device: Device) -> TrainerConfig {
    TrainerConfig {
        precision: Precision::from(cfg.dtype),
        device,
        seed: cfg.seed as i64,
        adamw: AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
        adamw_impl: AdamWImpl::Fused,
        muon: cfg.optimizer.muon_settings(cfg.learning_rate),
        kernels: cfg.kernels,
        objective: cfg.objective,
    }
}

pub fn train(cfg: &RunConfig) -> Result<RunSummary> {
    let started = Instant::now();
    // ---- set-up: ranks, data, model, where to start ----
    let ranks = Ranks::join(cfg)?;
    let mut con = Console::new(ranks.main);
    if ranks.env.is_distributed() {
        con.println(format!(
            "data parallel: {} ranks over NCCL ({})",
            ranks.world,
            ranks.env.describe()
        ));
    }
    let data = Data::load(&cfg.data_spec(), &|l| con.println(l))?;
    let held_out = HeldOut::load(cfg, &|l| con.println(l))?;
    let mut tr = build_trainer(cfg, &data, &ranks, &con)?;
    let plan = Plan::new(cfg, data.dataset.len(), ranks.world);
    let mut p = resume::restore_or_start(cfg, &plan, &ranks, &mut tr, &con)?;
    if let Some(line) = ranks.start(&mut tr, cfg)? {
        con.println(line);
    }
    let metrics_path = prepare_outputs(cfg, ranks.main, &p.metrics)?;
    let mut events = match (&cfg.tensorboard, ranks.main) {
        (Some(dir), true) => Some(tensorboard::EventWriter::start(
            dir,
            cfg,
            &p.metrics,
            p.global,
            p.elapsed_before,
        )?),
        _ => None,
    };
    con.println(describe_plan(cfg, &plan));
    con.start_progress(cfg, plan.total as u64, p.global as u64);

    // ---- the loop ----
    let stop_at = cfg.max_steps.unwrap_or(usize::MAX);
    let mut stepper = Stepper::new(cfg, &tr)?;
    let signals = Signals::install()?;
    let mut profile = ProfileWindow::new(cfg.profile.clone());
    let mut interval = Interval::new();
    let (mut waited_total, mut run_wall, mut stopped) = (0.0f64, 0.0f64, false);
    let (first_epoch, resumed_step, resumed_count) = (p.epoch, p.step, p.window_count);
    'epochs: for epoch in first_epoch..cfg.epochs {
        let resumed = epoch == first_epoch;
        let skip = if resumed { resumed_step } else { 0 };
        let mut batches = EpochBatches::new(&data, cfg, epoch, skip, plan.iters, &ranks, &con);
        let mut count = WindowCount::resumed(if resumed { resumed_count } else { 0 });
        while let Some(window) = batches.next_window()? {
            if window.starts {
                count.start(&window.batches, cfg.normalisation(), &ranks)?;
            }
            for hb in window.batches {
                let t_step = Instant::now();
                batches.step += 1;
                p.global += 1;
                let last = batches.step == plan.iters || p.global >= stop_at;
                profile.before_step(p.global, ranks.device)?;
                // forward and backward, then at the end of the window the optimizer step
                let lr = cfg.lr_at(p.global, plan.iters);
                let batch = Batch::from_host(&hb, ranks.device);
                let out = stepper.micro(&mut tr, cfg, &hb, &batch, &count)?;
                if batches.is_optimizer_step() {
                    stepper.optimize(&mut tr, cfg, &ranks, lr, p.global, &con, p.last_saved)?;
                    count.clear();
                    stepper.capture_if_due(&mut tr, cfg, &batch, p.global, &con)?;
                }
                let run_end = p.global == plan.total || p.global >= stop_at;
                profile.after_step(p.global, run_end, ranks.rank, ranks.main, ranks.device)?;
                p.useful_seen += hb.counted_labels as u64;
                interval.add(&out.loss, hb.rows * hb.cols, hb.counted_labels);

                // log line (with the held-out loss where due) and metrics.jsonl
                let score = held_out.as_ref().filter(|h| h.due(p.global, run_end));
                let logged = batches.step % cfg.log_interval == 0 || last || score.is_some();
                if logged {
                    let end = IntervalEnd {
                        global: p.global,
                        epoch,
                        step: batches.step,
                        out: &out,
                        lr,
                        grad_norm: stepper.last_grad_norm.as_ref(),
                        useful_seen: p.useful_seen,
                        waited: batches.take_waited(),
                        elapsed: p.elapsed_before + started.elapsed().as_secs_f64(),
                    };
                    let row = log_interval(
                        &mut interval,
                        end,
                        score.map(|h| (h, &tr)),
                        hb.counted_labels,
                        &ranks,
                        &con,
                        &metrics_path,
                        events.as_mut(),
                        cfg,
                        &plan,
                        &batches,
                    )?;
                    p.metrics.push(row);
                }
                con.progress(p.global, p.metrics.last().filter(|_| logged));
                run_wall += t_step.elapsed().as_secs_f64();

                // signals, checkpoints, stopping. A signal is acted on at a micro-step boundary
                // (under torchrun every rank must agree on which: they compare at log lines,
                // where they already exchange metrics).
                let interrupted = if ranks.world == 1 || batches.step % cfg.log_interval == 0 {
                    signals.agreed(&*ranks.comm)?
                } else {
                    None
                };
                let stopping =
                    (p.global >= stop_at && p.global < plan.total) || interrupted.is_some();
                if batches.step % cfg.save_interval == 0 || batches.step == plan.iters || stopping {
                    stepper.guard.check_pending(
                        &|l| con.println(l),
                        p.last_saved,
                        &cfg.resume_path(),
                    )?;
                    (p.epoch, p.step) = (epoch, batches.step);
                    let done = batches.is_optimizer_step();
                    save_checkpoint(
                        cfg, &tr, &data, &plan, &mut p, &ranks, &mut count, done, started,
                    )?;
                }
                if let Some(signal) = interrupted {
                    con.finish_progress();
                    ranks.comm.finish()?;
                    let checkpoint = cfg.resume_path();
                    return Err(Interrupted {
                        signal,
                        global_step: p.global,
                        total_steps: plan.total,
                        checkpoint,
                    }
                    .into());
                }
                if stopping {
                    con.println(format!("stopped at micro-step {} of {} (--max-steps); continue with --from-resume 1", p.global, plan.total));
                    stopped = true;
                    waited_total += batches.waited_total();
                    break 'epochs;
                }
            }
        }
        waited_total += batches.waited_total();
    }
    con.finish_progress();

    // ---- the end: what the last step left to report, curve, sample, summary ----
    if let Some(line) = profile.missed() {
        con.println(line);
    }
    stepper
        .guard
        .check_pending(&|l| con.println(l), p.last_saved, &cfg.resume_path())?;
    if stepper.guard.skipped > 0 {
        con.println(format!(
            "skipped {} optimizer step(s) with a non-finite loss or gradient (--skip-nonfinite)",
            stepper.guard.skipped
        ));
    }
    let data_wait_share = if run_wall > 0.0 {
        waited_total / run_wall
    } else {
        0.0
    };
    let f = Finish {
        started,
        stopped,
        data_wait_share,
        metrics_path,
        con,
    };
    finish(cfg, &tr, &data.tokenizer, &ranks, &plan, p, f)
}

/// The model of the run, initialised (seeded) or from `--from-weight`, with its optimizer.
fn build_trainer(cfg: &RunConfig, data: &Data, ranks: &Ranks, con: &Console) -> Result<Trainer> {
    let model_cfg = model_config_of(cfg, data.tokenizer.vocab_size());
    if cfg.max_seq_len > model_cfg.max_position_embeddings {
        bail!(
            "--max-seq-len {} exceeds the model's max_position_embeddings {}",
            cfg.max_seq_len,
            model_cfg.max_position_embeddings
        );
    }
    let mut tr = Trainer::new(&model_cfg, trainer_config(cfg, ranks.device))?;
    let compute = tr.precision().compute_kind();
    con.println(describe_model(&model_cfg, cfg, tr.precision()));
    con.println(tr.kernels().describe(ranks.device.is_cuda(), compute));
    con.println(tr.describe_optimizer());
    if cfg.from_weight != "none" {
        con.println(resume::load_from_weight(cfg, &mut tr)?);
    }
    Ok(tr)
}

/// The end of a log interval: its metric row (described over the global batch), the held-out
/// loss where due, the log line, the row appended to metrics.jsonl.
#[allow(clippy::too_many_arguments)]
fn log_interval(
    interval: &mut Interval,
    end: IntervalEnd,
    score: Option<(&HeldOut, &Trainer)>,
    counted: usize,
    ranks: &Ranks,
    con: &Console,
    metrics_path: &std::path::Path,
    events: Option<&mut tensorboard::EventWriter>,
    cfg: &RunConfig,
    plan: &Plan,
    batches: &EpochBatches,
) -> Result<MetricRow> {
    let epoch = end.epoch;
    let mut row = interval.finish(end)?;
    crate::parallel::globalize_metric_row(&*ranks.comm, &mut row, counted)?;
    // Scored after the interval's throughput is taken, and the next interval starts after it.
    let scored = score.map(|(h, tr)| h.score(tr)).transpose()?;
    if scored.is_some() {
        interval.restart();
    }
    row.eval_loss = scored.as_ref().map(|s| s.loss);
    let eta = batches.eta_min();
    let mut line = log_line(cfg.epochs, plan.iters, epoch, batches.step, eta, &row);
    if let Some(s) = &scored {
        line += &format!(
            " | held-out {:.4} ({} tokens, {:.1}s, at {:.1}s)",
            s.loss, s.tokens, s.secs, row.elapsed_s
        );
    }
    con.println(line);
    if ranks.main {
        metrics::append(metrics_path, &row)?;
    }
    if let Some(events) = events {
        events.log(&row)?;
    }
    Ok(row)
}

/// A save at micro-step `p.global`: a half-finished window's gradients gathered on rank 0, then
/// rank 0 writes the weights, the resume checkpoint and run_config.json.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    cfg: &RunConfig,
    tr: &Trainer,
    data: &Data,
    plan: &Plan,
    p: &mut Progress,
    ranks: &Ranks,
    count: &mut WindowCount,
    window_done: bool,
    started: Instant,
) -> Result<()> {
    let window_count = count.for_checkpoint()?;
    if !window_done {
        let mut flat = [tr.flat_grads().shallow_clone()];
        crate::parallel::consolidate_partial_gradients(&*ranks.comm, &mut flat)?;
    }
    if ranks.main {
        let elapsed = p.elapsed_before + started.elapsed().as_secs_f64();
        resume::save(
            cfg,
            tr,
            &data.tokenizer,
            plan,
            p,
            ranks.world,
            window_count,
            elapsed,
        )?;
    }
    p.last_saved = Some(p.global);
    Ok(())
}

/// The run's output files before its first step: the save and checkpoint directories,
/// leftovers of a killed run's atomic writes removed, and metrics.jsonl holding the resumed
/// history.
fn prepare_outputs(cfg: &RunConfig, main: bool, history: &[MetricRow]) -> Result<PathBuf> {
    std::fs::create_dir_all(&cfg.save_dir)
        .map_err(|e| anyhow::anyhow!("--save-dir {}: {e}", cfg.save_dir.display()))?;
    let metrics_path = cfg.save_dir.join("metrics.jsonl");
    if main {
        // Created here, before the first step, so that one that cannot be created is refused
        // now, not at the first save.
        std::fs::create_dir_all(&cfg.checkpoint_dir).map_err(|e| {
            anyhow::anyhow!("--checkpoint-dir {}: {e}", cfg.checkpoint_dir.display())
        })?;
        for p in [
            cfg.weights_path(),
            cfg.resume_path(),
            metrics_path.clone(),
            cfg.save_dir.join("run_config.json"),
        ] {
            crate::io::checkpoint::remove_stale_temp_files(&p);
        }
        metrics::write_all(&metrics_path, history)?;
    }
    Ok(metrics_path)
}

fn describe_model(m: &ModelConfig, cfg: &RunConfig, precision: Precision) -> String {
    format!(
        "model: {:.2}M parameters (d {}, {} layers, {} heads, {} kv heads, ffn {}{}), {} on {}",
        m.num_params() as f64 / 1e6,
        m.hidden_size,
        m.num_hidden_layers,
        m.num_attention_heads,
        m.num_key_value_heads,
        m.ffn_width(),
        if m.use_moe { ", MoE" } else { "" },
        precision,
        cfg.device
    )
}

fn describe_plan(cfg: &RunConfig, plan: &Plan) -> String {
    let stop = match cfg.max_steps {
        Some(s) if s < plan.total => format!(", stopping at {s} (--max-steps)"),
        _ => String::new(),
    };
    format!(
        "training: {} epoch(s) x {} steps (batch {}, accumulation {}, {} rows/optimizer step), {} micro-steps{stop}",
        cfg.epochs,
        plan.iters,
        cfg.batch_size,
        cfg.accumulation_steps,
        cfg.batch_size * cfg.accumulation_steps,
        plan.total
    )
}

/// What the end of a run needs besides the trainer and its position.
struct Finish {
    started: Instant,
    stopped: bool,
    data_wait_share: f64,
    metrics_path: PathBuf,
    con: Console,
}

fn finish(
    cfg: &RunConfig,
    tr: &Trainer,
    tok: &TextTokenizer,
    ranks: &Ranks,
    plan: &Plan,
    p: Progress,
    f: Finish,
) -> Result<RunSummary> {
    let elapsed = f.started.elapsed().as_secs_f64();
    let curve_path = cfg.save_dir.join("loss_curve.svg");
    let curve_path = if p.metrics.is_empty() || !ranks.main {
        None
    } else {
        let title = format!(
            "MiniMind pretrain: d {} x {} layers, {} {}, batch {}x{}",
            cfg.model.hidden_size,
            cfg.model.num_hidden_layers,
            cfg.dtype_name(),
            format!("{:?}", cfg.data_mode).to_lowercase(),
            cfg.batch_size,
            cfg.accumulation_steps
        );
        metrics::plot_curves(&curve_path, &p.metrics, &title)?;
        Some(curve_path)
    };
    let sample = if cfg.sample_tokens > 0 && !f.stopped && ranks.main {
        let text = greedy_sample(tr, tok, &cfg.sample_prompt, cfg.sample_tokens)?;
        f.con.println(format!(
            "sample (greedy, {} tokens max): {}{}",
            cfg.sample_tokens, cfg.sample_prompt, text
        ));
        if cfg.sample_temperature > 0.0 {
            let mut sampler = Sampler::new(SamplingConfig {
                temperature: cfg.sample_temperature,
                top_p: cfg.sample_top_p,
                top_k: 0,
                repetition_penalty: 1.0,
                seed: cfg.seed,
            });
            let drawn = continuation(tr, tok, &cfg.sample_prompt, cfg.sample_tokens, |l, c| {
                sampler.next(l, c)
            })?;
            f.con.println(format!(
                "sample (temperature {}, top-p {}, seed {}): {}{}",
                cfg.sample_temperature, cfg.sample_top_p, cfg.seed, cfg.sample_prompt, drawn
            ));
        }
        Some(text)
    } else {
        None
    };
    let first_loss = p.metrics.first().map(|r| r.loss_avg);
    let last_loss = p.metrics.last().map(|r| r.loss_avg);
    let fmt = |l: Option<f64>| l.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
    f.con.println(format!(
        "{} {}/{} micro-steps in {elapsed:.1}s (this process); loss {} -> {}; data wait {:.1}% of step time",
        if f.stopped { "stopped after" } else { "done:" },
        p.global,
        plan.total,
        fmt(first_loss),
        fmt(last_loss),
        100.0 * f.data_wait_share
    ));
    f.con.println(format!(
        "outputs: weights {}, resume {}, metrics {}",
        cfg.weights_path().display(),
        cfg.resume_path().display(),
        f.metrics_path.display(),
    ));
    // The curve on a line of its own, last: the first thing a newcomer wants to open.
    if let Some(p) = &curve_path {
        let tb = match (&cfg.tensorboard, ranks.main) {
            (Some(dir), true) => format!("; live: tensorboard --logdir {}", dir.display()),
            _ => String::new(),
        };
        f.con.println(format!(
            "loss curve: {} (open in a browser){tb}",
            p.display()
        ));
    }
    if ranks.world > 1 {
        // Every rank: identical weights are the check that gradients were averaged (ddp_check.sh).
        println!(
            "dist: rank {} weight checksum {:.17e}",
            ranks.rank,
            crate::parallel::weight_checksum(&tr.param_tensors())?
        );
    }
    ranks.comm.finish()?;
    Ok(RunSummary {
        config: cfg.clone(),
        model_config: tr.config().clone(),
        global_step: p.global,
        total_steps: plan.total,
        completed: !f.stopped && p.global == plan.total,
        first_loss,
        last_loss,
        metrics: p.metrics,
        weights_path: cfg.weights_path(),
        resume_path: cfg.resume_path(),
        metrics_path: f.metrics_path,
        curve_path,
        sample,
        elapsed_s: elapsed,
        data_wait_share: f.data_wait_share,
    })
}

/// Greedy continuation of `[bos] + encode(prompt)` (no KV cache: the whole prefix each token).
pub fn greedy_sample(
    tr: &Trainer,
    tok: &TextTokenizer,
    prompt: &str,
    max_new: usize,
) -> Result<String> {
    continuation(tr, tok, prompt, max_new, |logits, _| {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as i64
    })
}

/// The continuation of `[bos] + encode(prompt)` whose tokens `choose(logits, context)` picks,
/// up to `max_new` of them or eos.
fn continuation(
    tr: &Trainer,
    tok: &TextTokenizer,
    prompt: &str,
    max_new: usize,
    mut choose: impl FnMut(&[f64], &[i64]) -> i64,
) -> Result<String> {
    let _guard = tch::no_grad_guard();
    let mut ids: Vec<i64> = std::iter::once(tok.bos as i64)
        .chain(tok.encode(prompt)?.into_iter().map(|t| t as i64))
        .collect();
    let start = ids.len();
    let device = tr.device();
    for _ in 0..max_new {
        let input = Tensor::from_slice(&ids)
            .reshape([1, ids.len() as i64])
            .to_device(device);
        let logits = tr.model().forward(&input, None).logits;
        let last = logits
            .get(0)
            .get(ids.len() as i64 - 1)
            .to_kind(tch::Kind::Double)
            .to_device(Device::Cpu);
        let next = choose(&Vec::<f64>::try_from(&last)?, &ids);
        if next == tok.eos as i64 {
            break;
        }
        ids.push(next);
    }
    let new: Vec<u32> = ids[start..].iter().map(|&t| t as u32).collect();
    tok.decode(&new)
}

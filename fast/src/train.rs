//! `fast pretrain`: MiniMind's trainer/train_pretrain.py, top to bottom.
//!
//! data -> model -> (weights | resume) -> for each epoch: permutation, SkipBatchSampler, batches
//! prefetched on worker threads -> per micro-step: cosine lr, forward/backward of
//! `(ce + aux) * weight`; at the end of each accumulation window (and the trailing partial one):
//! unscale (fp16), clip, AdamW, zero grads -> log, metrics.jsonl, weights and resume checkpoint
//! every save interval -> loss/lr curve and a greedy sample at the end.
//!
//! Exact resume: the only randomness is the seeded init and the seeded epoch permutation; the
//! resume checkpoint holds the fp32 weights, AdamW's moments and step counts, the scaler, the
//! gradients and token count of a half-finished accumulation window, and the data position, so
//! a run stopped (`--max-steps`, or killed after a save) and resumed ends where an uninterrupted
//! one does — bit for bit on the CPU.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::accumulation::{self, Normalisation};
use crate::adamw::{AdamWConfig, AdamWImpl};
use crate::batch::Batch;
use crate::checkpoint::{self, ResumeState, RESUME_FORMAT};
use crate::cli::{resolve_device, DType, LossNormalization, PretrainArgs, RunConfig};
use crate::config::ModelConfig;
use crate::data::dataset::{DataMode, TokenDataset};
use crate::data::jsonl::{JsonlCorpus, LinePolicy};
use crate::data::loader::{HostBatch, Prefetcher};
use crate::data::tokenize::{SpecialTokens, TextTokenizer};
use crate::graph_step::GraphedStep;
use crate::metrics::{self, MetricRow};
use crate::precision::Precision;
use crate::sampler::{epoch_permutation, rescale_step, SkipBatchSampler};
use crate::schedule;
use crate::step::{Trainer, TrainerConfig};

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
    let device = resolve_device(&args.device)?;
    let cfg = args.resolve(device, || {
        let d = crate::data::defaults::materialize()?;
        Ok((d.corpus, d.tokenizer_dir))
    })?;
    // Under torchrun only rank 0 prints (every rank resolves the same configuration).
    if crate::dist::DistEnv::from_env()
        .map(|e| e.rank == 0)
        .unwrap_or(true)
    {
        cfg.print();
    }
    train(&cfg)
}

pub fn model_config_of(cfg: &RunConfig, vocab_size: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: cfg.hidden_size as usize,
        num_hidden_layers: cfg.num_hidden_layers as usize,
        num_attention_heads: cfg.num_attention_heads as usize,
        num_key_value_heads: cfg.num_key_value_heads as usize,
        vocab_size,
        use_moe: cfg.use_moe,
        ..ModelConfig::default()
    }
}

pub fn train(cfg: &RunConfig) -> Result<RunSummary> {
    let started = Instant::now();
    // Data parallelism (torchrun sets the environment; world 1 without it): one process per GPU
    // on cuda:LOCAL_RANK, gradients summed over ranks before clipping, rank 0 logs and saves.
    let denv = crate::dist::DistEnv::from_env()?;
    let requested = crate::precision::parse_device(&cfg.device)?;
    if denv.is_distributed() && requested == Device::Cpu {
        bail!(
            "WORLD_SIZE={}: data parallelism runs on GPUs over NCCL, not with --device cpu",
            denv.world_size
        );
    }
    let device = denv.device(requested);
    crate::cli::host_threads_for(device);
    let comm = crate::dist::communicator_from_env(&denv)?;
    let (rank, world_size, main) = (comm.rank(), comm.world_size(), comm.is_main());
    // Only rank 0 prints; its log lines describe the global batch.
    macro_rules! println {
        ($($arg:tt)*) => { if main { std::println!($($arg)*) } };
    }
    if denv.is_distributed() {
        println!(
            "data parallel: {world_size} ranks over NCCL ({})",
            denv.describe()
        );
    }

    // ---- 1. data ----
    let policy = if cfg.skip_bad_lines {
        LinePolicy::Skip
    } else {
        LinePolicy::Fail
    };
    let mut corpus = JsonlCorpus::open(&cfg.data_path, policy)?;
    if corpus.skipped > 0 {
        println!(
            "skipped {} bad line(s) of {}: {}",
            corpus.skipped,
            cfg.data_path.display(),
            corpus.skipped_examples.join("; ")
        );
    }
    if let Some(n) = cfg.max_docs {
        corpus.truncate(n);
    }
    let specials = SpecialTokens {
        bos: cfg.bos_token.clone(),
        eos: cfg.eos_token.clone(),
        pad: cfg.pad_token.clone(),
    };
    let tokenizer = Arc::new(TextTokenizer::load(&cfg.tokenizer, &specials)?);
    let corpus = Arc::new(corpus);
    let t0 = Instant::now();
    let dataset = Arc::new(match cfg.data_mode {
        DataMode::Padded => {
            TokenDataset::padded(corpus.clone(), tokenizer.clone(), cfg.max_seq_len)
        }
        DataMode::Packed => TokenDataset::packed(
            corpus.clone(),
            tokenizer.clone(),
            cfg.max_seq_len,
            cfg.num_workers,
        )?,
    });
    println!(
        "data: {} documents from {} ({:.1} MB) -> {} {:?} rows of {} tokens{}; tokenizer {} (vocab {}, bos {}, eos {}, pad {})",
        corpus.len(),
        cfg.data_path.display(),
        corpus.file_bytes as f64 / 1e6,
        dataset.len(),
        cfg.data_mode,
        cfg.max_seq_len,
        if cfg.data_mode == DataMode::Packed { format!(" (laid out in {:.1}s)", t0.elapsed().as_secs_f64()) } else { String::new() },
        tokenizer.path.display(),
        tokenizer.vocab_size(),
        tokenizer.bos,
        tokenizer.eos,
        tokenizer.pad
    );
    if dataset.is_empty() {
        bail!("{} gives no training rows", cfg.data_path.display());
    }

    // ---- 2. model and optimizer ----
    let model_cfg = model_config_of(cfg, tokenizer.vocab_size());
    if cfg.max_seq_len > model_cfg.max_position_embeddings {
        bail!(
            "--max-seq-len {} exceeds the model's max_position_embeddings {}",
            cfg.max_seq_len,
            model_cfg.max_position_embeddings
        );
    }
    let precision = Precision::from(cfg.dtype);
    let tc = TrainerConfig {
        precision,
        device,
        seed: cfg.seed as i64,
        adamw: AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
        adamw_impl: AdamWImpl::Fused,
    };
    let mut tr = Trainer::new(&model_cfg, tc)?;
    println!(
        "model: {:.2}M parameters (d {}, {} layers, {} heads, {} kv heads, ffn {}{}), {} on {}",
        model_cfg.num_params() as f64 / 1e6,
        model_cfg.hidden_size,
        model_cfg.num_hidden_layers,
        model_cfg.num_attention_heads,
        model_cfg.num_key_value_heads,
        model_cfg.ffn_width(),
        if model_cfg.use_moe { ", MoE" } else { "" },
        precision,
        cfg.device
    );
    if cfg.from_weight != "none" {
        let path = resolve_from_weight(cfg)?;
        let loaded = crate::weights::load_weights(&path)?;
        crate::model::load_named(
            &mut tr.vs,
            loaded.into_iter().collect(),
            &path.display().to_string(),
        )?;
        println!("weights: started from {}", path.display());
    }

    // ---- 3. schedule size and resume ----
    let bs = cfg.batch_size;
    // A step consumes one global batch: world_size x bs rows.
    let iters = dataset.len().div_ceil(bs * world_size);
    let total = cfg.epochs * iters;
    let resume_path = checkpoint::resume_path(cfg);
    let mut pos = Position {
        epoch: 0,
        step: 0,
        window_count: 0,
    };
    let mut metric_rows: Vec<MetricRow> = Vec::new();
    let mut useful_seen = 0u64;
    let mut elapsed_before = 0.0f64;
    if cfg.from_resume {
        match checkpoint::load_resume(&resume_path)? {
            None => println!(
                "resume: no checkpoint at {} yet; starting from scratch",
                resume_path.display()
            ),
            Some(r) => {
                checkpoint::check_compatible(&resume_path, &r.state.config, cfg)?;
                let saved_ws = r.state.world_size.max(1);
                let step =
                    rescale_step(r.state.step as u64, saved_ws as u64, world_size as u64) as usize;
                restore_trainer(&mut tr, &r.tensors, &r.state.trainer, &resume_path)?;
                if rank != 0 {
                    // Rank 0 holds a half-finished window's gradients (dist::consolidate_partial_gradients).
                    let _ = tr.flat_grads.f_zero_()?;
                }
                pos = Position {
                    epoch: r.state.epoch,
                    step,
                    window_count: r.state.trainer["window_count"].as_u64().unwrap_or(0) as usize,
                };
                if r.state.iters != dataset.len().div_ceil(bs * saved_ws) {
                    bail!(
                        "{}: saved with {} steps per epoch, this run has {iters} (the data changed?)",
                        resume_path.display(),
                        r.state.iters
                    );
                }
                metric_rows = r.state.metrics;
                useful_seen = r.state.useful_tokens_seen;
                elapsed_before = r.state.elapsed_s;
                println!(
                    "resume: {} at epoch {} step {}/{} (global {}/{total}){}",
                    resume_path.display(),
                    pos.epoch + 1,
                    pos.step,
                    iters,
                    pos.epoch * iters + pos.step,
                    if saved_ws != world_size {
                        let rp = crate::dist::order::resume_point(
                            r.state.step,
                            saved_ws,
                            world_size,
                            bs,
                        );
                        format!(
                            ", step {} rescaled from world size {saved_ws}, {} sample(s) repeated",
                            r.state.step,
                            rp.repeated()
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    // Every rank starts from rank 0's weights (fresh init, --from-weight or resume alike).
    crate::dist::broadcast_parameters(&*comm, &mut tr.param_tensors())?;
    // Data parallel on GPUs: each bucket's all-reduce starts while backward computes the layers
    // below it (dist/overlap.rs). MM_DP_OVERLAP=0 reduces everything after backward instead.
    if world_size > 1
        && device.is_cuda()
        && cfg!(feature = "cuda")
        && std::env::var("MM_DP_OVERLAP").map_or(true, |v| v != "0")
        && tr.enable_overlap(crate::dist::overlap::layers_per_bucket()?)?
    {
        let plan = tr.overlap.as_ref().expect("enabled above").plan();
        let marks: Vec<String> = plan.marks().iter().map(|l| l.to_string()).collect();
        if main {
            println!(
                "gradient all-reduce overlapped with backward: {} buckets, started as backward finishes layers {}; the embedding's after backward",
                plan.buckets().len(),
                marks.join(", ")
            );
        }
    }
    // Saved at the end of an epoch: continue with the next one.
    if pos.step >= iters && pos.epoch + 1 <= cfg.epochs {
        pos = Position {
            epoch: pos.epoch + 1,
            step: 0,
            window_count: 0,
        };
    }
    std::fs::create_dir_all(&cfg.save_dir)
        .with_context(|| format!("creating {}", cfg.save_dir.display()))?;
    let metrics_path = cfg.save_dir.join("metrics.jsonl");
    if main {
        for p in [&cfg.weights_path(), &resume_path, &metrics_path] {
            checkpoint::remove_stale_temp_files(p);
        }
        checkpoint::remove_stale_temp_files(&cfg.save_dir.join("run_config.json"));
        metrics::write_all(&metrics_path, &metric_rows)?;
    }

    let norm = match cfg.loss_normalization {
        LossNormalization::Mean => Normalisation::MiniMindMean,
        LossNormalization::Token => Normalisation::TokenWeighted,
    };
    let stop_at = cfg.max_steps.unwrap_or(usize::MAX);
    let mut global = pos.epoch * iters + pos.step;
    println!(
        "training: {} epoch(s) x {iters} steps (batch {bs}, accumulation {}, {} rows/optimizer step), {total} micro-steps{}",
        cfg.epochs,
        cfg.accumulation_steps,
        bs * cfg.accumulation_steps,
        if stop_at < total { format!(", stopping at {stop_at} (--max-steps)") } else { String::new() }
    );

    let pb = if main {
        progress_bar(cfg, total as u64, global as u64)
    } else {
        None
    };
    let log = |line: String| match &pb {
        Some(p) => p.println(line),
        None => println!("{line}"),
    };
    let workers = cfg.num_workers;
    let depth = (2 * workers).max(cfg.accumulation_steps) + 2;
    let mut waited_total = 0.0f64;
    let mut run_wall = 0.0f64;
    let mut last_grad_norm: Option<Tensor> = None;
    let mut interval = Interval::new();
    let mut stopped = false;
    let mut last_saved_global: Option<usize> = None;
    // Non-finite steps are skipped on the device; their flags are read one step later.
    let mut nonfinite = NonFinite {
        skip: cfg.skip_nonfinite,
        skipped: 0,
        pending: None,
    };
    // SIGINT / SIGTERM: finish the micro-step, save a resume checkpoint, exit 130 / 143.
    let signals = Signals::install()?;
    let mut interrupted: Option<i32> = None;
    // --cuda-graph: captured after the first optimizer step (see graph_step.rs).
    if cfg.cuda_graph {
        if let Some(why) = crate::graph_step::unsupported(&tr) {
            bail!("--cuda-graph: {why}");
        }
    }
    let mut graphed: Option<GraphedStep> = None;
    // --profile: the profiler while it runs, and whether it ran.
    let mut profiling: Option<crate::profile::Session> = None;
    let mut profiled = false;

    // ---- 4. the loop ----
    'epochs: for epoch in pos.epoch..cfg.epochs {
        let perm = epoch_permutation(dataset.len(), cfg.seed, epoch as u64);
        let skip = if epoch == pos.epoch { pos.step } else { 0 };
        if skip > 0 {
            log(format!(
                "Epoch [{}/{}]: skipping the first {skip} steps, continuing at step {}",
                epoch + 1,
                cfg.epochs,
                skip + 1
            ));
        }
        // Global batch g is perm[g*W*bs .. (g+1)*W*bs]; this rank takes its bs rows (dist::order).
        let batches: Vec<Vec<usize>> = if world_size > 1 {
            crate::dist::order::rank_batches(&perm, bs, world_size, rank, skip).collect()
        } else {
            SkipBatchSampler::new(&perm, bs, skip)
                .iter()
                .map(<[usize]>::to_vec)
                .collect()
        };
        let mut loader = Prefetcher::new(dataset.clone(), batches, workers, depth);
        let epoch_start = Instant::now();
        let mut step = skip;
        let mut waited_seen = loader.waited;
        // A window resumed half-way keeps the token count it started with.
        let mut window_count = if epoch == pos.epoch {
            pos.window_count
        } else {
            0
        };
        // Data parallel, token-weighted: the window's global token count, on the device.
        let mut window_count_dev: Option<Tensor> = None;
        while step < iters {
            // Fetch the rest of the accumulation window first: token-weighted loss needs its
            // counted labels before the first backward.
            let (first, last) =
                accumulation::window(step as u64 + 1, cfg.accumulation_steps as u64, iters as u64);
            let mut window: Vec<HostBatch> = Vec::with_capacity((last - step as u64) as usize);
            for _ in step as u64 + 1..=last {
                window.push(loader.next().context("the data loader ended early")??);
            }
            if first == step as u64 + 1 {
                window_count = window.iter().map(|b| b.counted_labels).sum();
                window_count_dev = None;
                if norm == Normalisation::TokenWeighted && world_size > 1 {
                    // Queued on the device: the weights below divide by it without a host wait.
                    window_count_dev = Some(crate::dist::global_token_count_device(
                        &*comm,
                        window_count,
                        device,
                    )?);
                }
            }
            for hb in window {
                let t_step = Instant::now();
                step += 1;
                global += 1;
                if let Some((_, at, _)) = &cfg.profile {
                    if global == *at && profiling.is_none() {
                        profiling = Some(crate::profile::Session::start(device.is_cuda())?);
                    }
                }
                let lr = schedule::lr_at(
                    global as u64,
                    total as u64,
                    cfg.learning_rate,
                    cfg.warmup_steps as u64,
                );
                let weight = accumulation::loss_weight(
                    norm,
                    cfg.accumulation_steps as u64,
                    hb.counted_labels,
                    window_count,
                );
                let batch = Batch::from_vecs(&hb.input_ids, &hb.labels, hb.rows, hb.cols, device);
                // Data parallel, token-weighted: the weight divides by the device-side count.
                let weight_dev = window_count_dev.as_ref().map(|global| {
                    (global.reciprocal() * hb.counted_labels as f64).to_kind(Kind::Float)
                });
                let out = match (graphed.as_ref().filter(|g| g.fits(&batch)), &weight_dev) {
                    (Some(g), Some(w)) => g.micro_step(&batch, w)?,
                    (Some(g), None) => {
                        g.micro_step(&batch, &crate::graph_step::weight_tensor(&tr, weight))?
                    }
                    (None, Some(w)) => {
                        tr.micro_step_weighted(&batch.input_ids, &batch.labels, w)?
                    }
                    (None, None) => tr.micro_step(&batch.input_ids, &batch.labels, weight)?,
                };
                if accumulation::is_optimizer_step(
                    step as u64,
                    cfg.accumulation_steps as u64,
                    iters as u64,
                ) {
                    // The flat gradient buffer summed over ranks: in buckets started during
                    // backward with the overlap, else one collective (no-op on one rank).
                    tr.average_gradients(&*comm, norm.into())?;
                    last_grad_norm = Some(match &graphed {
                        Some(g) => g.optimizer_step(&mut tr, lr)?,
                        None => tr.optimizer_step(lr, cfg.grad_clip)?,
                    });
                    nonfinite.check_pending(&log, last_saved_global, &resume_path)?;
                    // Read a step later, without waiting for the step queued in between.
                    nonfinite.pending = match &tr.nonfinite {
                        Some(f) => Some((global, crate::fused::HostRead::start(f)?)),
                        None => None,
                    };
                    window_count = 0;
                    window_count_dev = None;
                    // After one eager optimizer step every library is initialised: capture.
                    if cfg.cuda_graph && graphed.is_none() && hb.rows == bs {
                        graphed = Some(GraphedStep::capture(&mut tr, &batch, cfg.grad_clip)?);
                        log(format!(
                            "captured the micro-step and the optimizer step as CUDA graphs (batch {}x{}); replaying them from micro-step {}",
                            hb.rows,
                            hb.cols,
                            global + 1
                        ));
                    }
                }
                if let (Some((dir, at, n)), true) = (&cfg.profile, profiling.is_some()) {
                    if global + 1 == at + n || global == total || global >= stop_at {
                        let session = profiling.take().expect("checked above");
                        finish_profile(session, dir, rank, main, global + 1 - at, device)?;
                        profiled = true;
                    }
                }
                useful_seen += hb.counted_labels as u64;
                interval.add(&out.loss, hb.rows * hb.cols, hb.counted_labels);

                let last_of_run = step == iters || global >= stop_at;
                if step % cfg.log_interval == 0 || last_of_run {
                    let now_waited = loader.waited;
                    let waited = (now_waited - waited_seen).as_secs_f64();
                    waited_seen = now_waited;
                    let mut row = interval.finish(IntervalEnd {
                        global,
                        epoch,
                        step,
                        out: &out,
                        lr,
                        grad_norm: last_grad_norm.as_ref(),
                        useful_seen,
                        waited,
                        elapsed: elapsed_before + started.elapsed().as_secs_f64(),
                    })?;
                    crate::dist::globalize_metric_row(&*comm, &mut row, hb.counted_labels)?;
                    let eta_min = epoch_start.elapsed().as_secs_f64() / (step - skip).max(1) as f64
                        * (iters - step) as f64
                        / 60.0;
                    log(format!(
                        "Epoch:[{}/{}]({}/{}), loss: {:.4}, logits_loss: {:.4}, aux_loss: {:.4}, lr: {:.8}, epoch_time: {:.1}min | grad_norm {} | {:.0} tok/s ({:.0} useful) | data wait {:.1}%",
                        epoch + 1,
                        cfg.epochs,
                        step,
                        iters,
                        row.loss,
                        row.ce,
                        row.aux,
                        row.lr,
                        eta_min,
                        row.grad_norm.map(|g| format!("{g:.3}")).unwrap_or_else(|| "-".into()),
                        row.tokens_per_s,
                        row.useful_tokens_per_s,
                        100.0 * row.data_wait_share
                    ));
                    if let Some(p) = &pb {
                        p.set_message(format!(
                            "loss {:.3} lr {:.2e} {:.0} tok/s",
                            row.loss_avg, row.lr, row.tokens_per_s
                        ));
                    }
                    if main {
                        metrics::append(&metrics_path, &row)?;
                    }
                    metric_rows.push(row);
                }
                if let Some(p) = &pb {
                    p.set_position(global as u64);
                }
                run_wall += t_step.elapsed().as_secs_f64();

                // A signal is acted on at a micro-step boundary (under torchrun every rank must
                // agree on which: they compare at log lines, where they already exchange metrics).
                if interrupted.is_none() && (world_size == 1 || step % cfg.log_interval == 0) {
                    interrupted = signals.agreed(&*comm)?;
                }
                let stopping = (global >= stop_at && global < total) || interrupted.is_some();
                if step % cfg.save_interval == 0 || step == iters || stopping {
                    nonfinite.check_pending(&log, last_saved_global, &resume_path)?;
                    if let Some(global) = &window_count_dev {
                        // A half-finished window resumes with its global count (one host read).
                        window_count = f64::try_from(global.reshape([-1]).get(0))? as usize;
                    }
                    if !accumulation::is_optimizer_step(
                        step as u64,
                        cfg.accumulation_steps as u64,
                        iters as u64,
                    ) {
                        let mut flat = [tr.flat_grads.shallow_clone()];
                        crate::dist::consolidate_partial_gradients(&*comm, &mut flat)?;
                    }
                    let state = ResumeState {
                        format: RESUME_FORMAT.into(),
                        config: cfg.clone(),
                        model_config: model_config_json(&model_cfg, &tokenizer),
                        epoch,
                        step,
                        iters,
                        global_step: global,
                        world_size,
                        trainer: trainer_state(&tr, window_count),
                        seed: cfg.seed,
                        useful_tokens_seen: useful_seen,
                        elapsed_s: elapsed_before + started.elapsed().as_secs_f64(),
                        metrics: metric_rows.clone(),
                        completed: global == total,
                    };
                    if main {
                        save_all(cfg, &tr, &model_cfg, &tokenizer, &state, &resume_path)?;
                    }
                    last_saved_global = Some(global);
                }
                if let Some(sig) = interrupted {
                    if let Some(p) = &pb {
                        p.finish_and_clear();
                    }
                    comm.finish()?;
                    return Err(Interrupted {
                        signal: sig,
                        global_step: global,
                        total_steps: total,
                        checkpoint: resume_path.clone(),
                    }
                    .into());
                }
                if stopping {
                    log(format!("stopped at micro-step {global} of {total} (--max-steps); continue with --from-resume 1"));
                    stopped = true;
                    waited_total += (loader.waited).as_secs_f64();
                    break 'epochs;
                }
            }
        }
        waited_total += loader.waited.as_secs_f64();
    }
    if let Some(p) = &pb {
        p.finish_and_clear();
    }
    if let (Some((_, at, _)), false) = (&cfg.profile, profiled) {
        log(format!(
            "--profile-at {at}: this run did not reach micro-step {at}, so nothing was profiled"
        ));
    }
    nonfinite.check_pending(&log, last_saved_global, &resume_path)?;
    if nonfinite.skipped > 0 {
        println!(
            "skipped {} optimizer step(s) with a non-finite loss or gradient (--skip-nonfinite)",
            nonfinite.skipped
        );
    }

    // ---- 5. the end: curve, sample, summary ----
    let elapsed = started.elapsed().as_secs_f64();
    let curve_path = cfg.save_dir.join("loss_curve.svg");
    let curve_path = if metric_rows.is_empty() || !main {
        None
    } else {
        let title = format!(
            "MiniMind pretrain: d {} x {} layers, {} {}, batch {}x{}",
            model_cfg.hidden_size,
            model_cfg.num_hidden_layers,
            cfg.dtype_name(),
            if cfg.data_mode == DataMode::Packed {
                "packed"
            } else {
                "padded"
            },
            bs,
            cfg.accumulation_steps
        );
        metrics::plot_curves(&curve_path, &metric_rows, &title)?;
        Some(curve_path)
    };
    let sample = if cfg.sample_tokens > 0 && !stopped && main {
        let text = greedy_sample(&tr, &tokenizer, &cfg.sample_prompt, cfg.sample_tokens)?;
        println!(
            "sample (greedy, {} tokens max): {}{}",
            cfg.sample_tokens, cfg.sample_prompt, text
        );
        Some(text)
    } else {
        None
    };
    let data_wait_share = if run_wall > 0.0 {
        waited_total / run_wall
    } else {
        0.0
    };
    let first_loss = metric_rows.first().map(|r| r.loss_avg);
    let last_loss = metric_rows.last().map(|r| r.loss_avg);
    println!(
        "{} {global}/{total} micro-steps in {:.1}s (this process); loss {} -> {}; data wait {:.1}% of step time",
        if stopped { "stopped after" } else { "done:" },
        elapsed,
        first_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
        last_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
        100.0 * data_wait_share
    );
    println!(
        "outputs: weights {}, resume {}, metrics {}{}",
        cfg.weights_path().display(),
        resume_path.display(),
        metrics_path.display(),
        curve_path
            .as_ref()
            .map(|p| format!(", curve {}", p.display()))
            .unwrap_or_default()
    );
    if world_size > 1 {
        // Every rank: identical weights are the check that gradients were averaged (ddp_check.sh).
        std::println!(
            "dist: rank {rank} weight checksum {:.17e}",
            crate::dist::weight_checksum(&tr.param_tensors())?
        );
    }
    comm.finish()?;
    Ok(RunSummary {
        config: cfg.clone(),
        model_config: model_cfg,
        global_step: global,
        total_steps: total,
        completed: !stopped && global == total,
        first_loss,
        last_loss,
        metrics: metric_rows,
        weights_path: cfg.weights_path(),
        resume_path,
        metrics_path,
        curve_path,
        sample,
        elapsed_s: elapsed,
        data_wait_share,
    })
}

/// A run stopped by SIGINT or SIGTERM after saving its resume checkpoint. `main` exits with
/// 128 + signal (130, 143), as a shell reports a process killed by it.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub global_step: usize,
    pub total_steps: usize,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            signal_hook::consts::SIGINT => "SIGINT",
            signal_hook::consts::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(
            f,
            "interrupted by {name} at micro-step {} of {}: resume checkpoint saved to {}; continue with --from-resume 1",
            self.global_step,
            self.total_steps,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// Ends `--profile` after `steps` micro-steps: waits for the device, then this rank writes
/// `dir/rank<R>/trace.json` and `kernels.tsv`, and rank 0 prints the device time per op.
fn finish_profile(
    session: crate::profile::Session,
    dir: &std::path::Path,
    rank: usize,
    main: bool,
    steps: usize,
    device: Device,
) -> Result<()> {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let out = dir.join(format!("rank{rank}"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let rows = session.stop(&out.join("trace.json"))?;
    crate::profile::write_tsv(&rows, &out.join("kernels.tsv"))?;
    if main {
        eprint!("{}", crate::profile::report(&rows, steps));
        eprintln!(
            "profile: {} (rank<R>/trace.json, kernels.tsv)",
            dir.display()
        );
    }
    Ok(())
}

/// SIGINT / SIGTERM flags. A second signal of the same kind while the first is being handled
/// exits at once (the checkpoint being written then is abandoned; the previous one stays).
struct Signals {
    got: Arc<std::sync::atomic::AtomicUsize>,
}

impl Signals {
    fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())
                .context("installing a signal handler")?;
            signal_hook::flag::register(sig, armed.clone())
                .context("installing a signal handler")?;
            signal_hook::flag::register_usize(sig, got.clone(), sig as usize)
                .context("installing a signal handler")?;
        }
        Ok(Signals { got })
    }

    /// The signal this process (or, data parallel, any rank) received, if any.
    fn agreed(&self, comm: &dyn crate::dist::Communicator) -> Result<Option<i32>> {
        let local = self.got.load(std::sync::atomic::Ordering::Relaxed) as i32;
        let ranks_hit = if comm.world_size() > 1 {
            comm.all_reduce_scalar(f64::from(u8::from(local != 0)))?
        } else {
            f64::from(u8::from(local != 0))
        };
        Ok(match (ranks_hit > 0.0, local) {
            (false, _) => None,
            (true, 0) => Some(signal_hook::consts::SIGTERM),
            (true, sig) => Some(sig),
        })
    }
}

/// Optimizer steps met with a non-finite loss or gradient (bf16/fp32): skipped on the device;
/// `check_pending` reads the last step's flag and stops the run or counts the step.
struct NonFinite {
    skip: bool,
    skipped: usize,
    pending: Option<(usize, crate::fused::HostRead)>,
}

impl NonFinite {
    fn check_pending(
        &mut self,
        log: &dyn Fn(String),
        last_saved: Option<usize>,
        checkpoint: &std::path::Path,
    ) -> Result<()> {
        let Some((at, flag)) = self.pending.take() else {
            return Ok(());
        };
        if f64::try_from(flag.wait()?.sum(Kind::Double))? == 0.0 {
            return Ok(());
        }
        if self.skip {
            self.skipped += 1;
            log(format!(
                "micro-step {at}: non-finite loss or gradient, optimizer step skipped (--skip-nonfinite)"
            ));
            return Ok(());
        }
        let kept = match last_saved {
            Some(g) => format!(
                "the last checkpoint, {} (micro-step {g}), is kept",
                checkpoint.display()
            ),
            None => "no checkpoint had been written yet".to_string(),
        };
        bail!(
            "micro-step {at}: the loss or a gradient is not finite (NaN or inf). The optimizer step \
             was skipped and the run stops without saving: {kept}. Lower --learning-rate, check \
             the data, or pass --skip-nonfinite to skip such steps and count them"
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Position {
    epoch: usize,
    step: usize,
    window_count: usize,
}

/// Running sums of one log interval; losses stay on the device until the log line.
struct Interval {
    start: Instant,
    loss_sum: Option<Tensor>,
    n: usize,
    tokens: usize,
    useful: usize,
}

struct IntervalEnd<'a> {
    global: usize,
    epoch: usize,
    step: usize,
    out: &'a crate::step::MicroStep,
    lr: f64,
    grad_norm: Option<&'a Tensor>,
    useful_seen: u64,
    waited: f64,
    elapsed: f64,
}

impl Interval {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            loss_sum: None,
            n: 0,
            tokens: 0,
            useful: 0,
        }
    }

    fn add(&mut self, loss: &Tensor, tokens: usize, useful: usize) {
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(s) => s + loss,
            None => loss.shallow_clone(),
        });
        self.n += 1;
        self.tokens += tokens;
        self.useful += useful;
    }

    fn finish(&mut self, e: IntervalEnd<'_>) -> Result<MetricRow> {
        let scalar = |t: &Tensor| -> Result<f64> { Ok(f64::try_from(t.to_kind(Kind::Double))?) };
        let loss_avg = match &self.loss_sum {
            Some(s) => scalar(s)? / self.n.max(1) as f64,
            None => f64::NAN,
        };
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let row = MetricRow {
            step: e.global,
            epoch: e.epoch + 1,
            epoch_step: e.step,
            loss: scalar(&e.out.loss)?,
            ce: scalar(&e.out.ce)?,
            aux: scalar(&e.out.aux)?,
            loss_avg,
            lr: e.lr,
            grad_norm: e.grad_norm.map(scalar).transpose()?,
            tokens_per_s: self.tokens as f64 / secs,
            useful_tokens_per_s: self.useful as f64 / secs,
            useful_tokens_seen: e.useful_seen,
            data_wait_share: (e.waited / secs).min(1.0),
            elapsed_s: e.elapsed,
        };
        *self = Interval::new();
        Ok(row)
    }
}

impl RunConfig {
    fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::Bfloat16 => "bfloat16",
            DType::Float16 => "float16",
            DType::Float32 => "float32",
        }
    }
}

fn progress_bar(cfg: &RunConfig, total: u64, at: u64) -> Option<ProgressBar> {
    // indicatif draws nothing (and drops println lines) when stderr is not a terminal: then log
    // lines go to stdout.
    if cfg.no_progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(at);
    pb.reset_eta();
    Some(pb)
}

/// `--from-weight`: a file path, or MiniMind's `{save_dir}/{prefix}_{hidden}[_moe]` with
/// `.safetensors` (ours) or `.pth` (MiniMind's).
fn resolve_from_weight(cfg: &RunConfig) -> Result<PathBuf> {
    let direct = PathBuf::from(&cfg.from_weight);
    if direct.is_file() {
        return Ok(direct);
    }
    let stem = format!(
        "{}_{}{}",
        cfg.from_weight,
        cfg.hidden_size,
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

fn model_config_json(model_cfg: &ModelConfig, tok: &TextTokenizer) -> serde_json::Value {
    let mut v = serde_json::to_value(model_cfg).expect("ModelConfig serialises");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("bos_token_id".into(), json!(tok.bos));
        m.insert("eos_token_id".into(), json!(tok.eos));
        m.insert("pad_token_id".into(), json!(tok.pad));
    }
    v
}

/// Host-side optimizer/scaler/window state for the resume checkpoint (tensors go separately).
fn trainer_state(tr: &Trainer, window_count: usize) -> serde_json::Value {
    json!({
        "adam_t": tr.opt.t,
        "scaler": tr.scaler.as_ref().map(|s| { let (scale, tracker) = s.state(); json!({"scale": scale, "growth_tracker": tracker}) }),
        "window_count": window_count,
    })
}

/// Everything a resume needs as tensors: fp32 weights, AdamW moments and step counts, and the
/// gradients accumulated so far in the current window (zero right after an optimizer step).
fn resume_tensors(tr: &Trainer) -> Vec<(String, Tensor)> {
    let mut out = Vec::with_capacity(tr.params.len() * 5);
    for (i, (name, p)) in tr.params.iter().enumerate() {
        out.push((format!("param.{name}"), p.detach()));
        out.push((format!("grad.{name}"), p.grad()));
        out.push((
            format!("adam.exp_avg.{name}"),
            tr.opt.exp_avg[i].shallow_clone(),
        ));
        out.push((
            format!("adam.exp_avg_sq.{name}"),
            tr.opt.exp_avg_sq[i].shallow_clone(),
        ));
        out.push((format!("adam.step.{name}"), tr.opt.steps[i].shallow_clone()));
    }
    out
}

fn restore_trainer(
    tr: &mut Trainer,
    tensors: &HashMap<String, Tensor>,
    state: &serde_json::Value,
    path: &std::path::Path,
) -> Result<()> {
    let get = |key: String| -> Result<&Tensor> {
        tensors
            .get(&key)
            .with_context(|| format!("{}: resume checkpoint lacks tensor {key}", path.display()))
    };
    let params: HashMap<String, Tensor> = tr
        .params
        .iter()
        .map(|(n, _)| Ok((n.clone(), get(format!("param.{n}"))?.shallow_clone())))
        .collect::<Result<_>>()?;
    crate::model::load_named(&mut tr.vs, params, &path.display().to_string())?;
    let _guard = tch::no_grad_guard();
    let copy = |dst: &Tensor, src: &Tensor, what: &str| -> Result<()> {
        if dst.size() != src.size() {
            bail!(
                "{}: {what} has shape {:?}, the model needs {:?}",
                path.display(),
                src.size(),
                dst.size()
            );
        }
        let mut d = dst.shallow_clone();
        d.f_copy_(&src.to_kind(dst.kind()).to_device(dst.device()))?;
        Ok(())
    };
    for (i, (name, p)) in tr.params.iter().enumerate() {
        copy(
            &p.grad(),
            get(format!("grad.{name}"))?,
            &format!("grad.{name}"),
        )?;
        copy(
            &tr.opt.exp_avg[i],
            get(format!("adam.exp_avg.{name}"))?,
            &format!("adam.exp_avg.{name}"),
        )?;
        copy(
            &tr.opt.exp_avg_sq[i],
            get(format!("adam.exp_avg_sq.{name}"))?,
            &format!("adam.exp_avg_sq.{name}"),
        )?;
        copy(
            &tr.opt.steps[i],
            get(format!("adam.step.{name}"))?,
            &format!("adam.step.{name}"),
        )?;
    }
    tr.opt.t = state["adam_t"].as_u64().unwrap_or(0);
    match (tr.scaler.as_mut(), state.get("scaler")) {
        (Some(s), Some(v)) if !v.is_null() => {
            s.set_state(
                v["scale"].as_f64().unwrap_or(65536.0),
                v["growth_tracker"].as_i64().unwrap_or(0),
            );
        }
        _ => {}
    }
    Ok(())
}

fn save_all(
    cfg: &RunConfig,
    tr: &Trainer,
    model_cfg: &ModelConfig,
    tok: &TextTokenizer,
    state: &ResumeState,
    resume_path: &std::path::Path,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    checkpoint::save_weights_f16(
        &cfg.weights_path(),
        &tr.params,
        &model_config_json(model_cfg, tok),
    )?;
    checkpoint::save_resume(resume_path, state, &resume_tensors(tr))?;
    let run_json = serde_json::to_string_pretty(cfg)? + "\n";
    checkpoint::write_atomic(&cfg.save_dir.join("run_config.json"), run_json.as_bytes())?;
    Ok(())
}

/// Greedy continuation of `[bos] + encode(prompt)` (no KV cache: the whole prefix each token).
pub fn greedy_sample(
    tr: &Trainer,
    tok: &TextTokenizer,
    prompt: &str,
    max_new: usize,
) -> Result<String> {
    let _guard = tch::no_grad_guard();
    let mut ids: Vec<i64> = std::iter::once(tok.bos as i64)
        .chain(tok.encode(prompt)?.into_iter().map(|t| t as i64))
        .collect();
    let start = ids.len();
    let device: Device = tr.device();
    for _ in 0..max_new {
        let input = Tensor::from_slice(&ids)
            .reshape([1, ids.len() as i64])
            .to_device(device);
        let logits = tr.model.forward(&input).logits;
        let next = i64::try_from(logits.get(0).get(ids.len() as i64 - 1).argmax(0, false))?;
        if next == tok.eos as i64 {
            break;
        }
        ids.push(next);
    }
    let new: Vec<u32> = ids[start..].iter().map(|&t| t as u32).collect();
    tok.decode(&new)
}

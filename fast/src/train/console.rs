//! What a run shows while it trains: rank 0's lines (through the progress bar once there is
//! one) and MiniMind's log line over each log interval.

use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tch::{Kind, Tensor};

use super::metrics::MetricRow;
use super::run_config::RunConfig;
use super::trainer::MicroStep;

/// Rank 0's output. Under torchrun every other rank prints nothing (its lines would repeat rank
/// 0's), except what it prints with `std::println!` on purpose (its weight checksum).
pub struct Console {
    main: bool,
    bar: Option<ProgressBar>,
}

impl Console {
    pub fn new(main: bool) -> Self {
        Console { main, bar: None }
    }

    /// One line of rank 0's output.
    pub fn println(&self, line: impl AsRef<str>) {
        if !self.main {
            return;
        }
        match &self.bar {
            Some(p) => p.println(line.as_ref()),
            None => println!("{}", line.as_ref()),
        }
    }

    /// The progress bar over `total` micro-steps, `at` of them done. indicatif draws nothing (and
    /// drops println lines) when stderr is not a terminal: then lines go to stdout.
    pub fn start_progress(&mut self, cfg: &RunConfig, total: u64, at: u64) {
        if !self.main || cfg.no_progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return;
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
        self.bar = Some(pb);
    }

    pub fn progress(&self, global: usize, row: Option<&MetricRow>) {
        if let Some(p) = &self.bar {
            if let Some(r) = row {
                p.set_message(format!(
                    "loss {:.3} lr {:.2e} {:.0} tok/s",
                    r.loss_avg, r.lr, r.tokens_per_s
                ));
            }
            p.set_position(global as u64);
        }
    }

    pub fn finish_progress(&mut self) {
        if let Some(p) = self.bar.take() {
            p.finish_and_clear();
        }
    }
}

/// MiniMind's log line (train_pretrain.py's `Logger`), with our grad norm, throughput and data wait.
pub fn log_line(
    epochs: usize,
    iters: usize,
    epoch: usize,
    step: usize,
    eta_min: f64,
    row: &MetricRow,
) -> String {
    format!(
        "Epoch:[{}/{}]({}/{}), loss: {:.4}, logits_loss: {:.4}, aux_loss: {:.4}, lr: {:.8}, epoch_time: {:.1}min | grad_norm {} | {:.0} tok/s ({:.0} useful) | data wait {:.1}%",
        epoch + 1,
        epochs,
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
    )
}

/// Running sums of one log interval; losses stay on the device until the log line.
pub struct Interval {
    start: Instant,
    loss_sum: Option<Tensor>,
    n: usize,
    tokens: usize,
    useful: usize,
}

/// Where an interval ends: what its metric row reports besides the sums.
pub struct IntervalEnd<'a> {
    pub global: usize,
    pub epoch: usize,
    pub step: usize,
    pub out: &'a MicroStep,
    pub lr: f64,
    pub grad_norm: Option<&'a Tensor>,
    pub useful_seen: u64,
    /// Seconds the loop waited for data in this interval.
    pub waited: f64,
    pub elapsed: f64,
}

impl Interval {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            loss_sum: None,
            n: 0,
            tokens: 0,
            useful: 0,
        }
    }

    pub fn add(&mut self, loss: &Tensor, tokens: usize, useful: usize) {
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(s) => s + loss,
            None => loss.shallow_clone(),
        });
        self.n += 1;
        self.tokens += tokens;
        self.useful += useful;
    }

    /// The next interval starts now (its clock; the sums are already empty after `finish`).
    pub fn restart(&mut self) {
        self.start = Instant::now();
    }

    /// The interval's metric row (the one host read of its losses); starts the next interval.
    pub fn finish(&mut self, e: IntervalEnd<'_>) -> Result<MetricRow> {
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
            eval_loss: None,
        };
        *self = Interval::new();
        Ok(row)
    }
}

impl Default for Interval {
    fn default() -> Self {
        Self::new()
    }
}

//! What a run records: one [`MetricRow`] per log interval, appended to `metrics.jsonl`, kept in
//! the resume checkpoint (so a resumed run's file and curve cover the whole run), and drawn at
//! the end as an SVG of loss and learning rate against the step.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// Micro-steps done in the run (1-based, `epoch * iters + step`).
    pub step: usize,
    /// 1-based epoch and micro-step within it.
    pub epoch: usize,
    pub epoch_step: usize,
    /// Total loss of the logged micro-batch (ce + aux), as MiniMind logs it.
    pub loss: f64,
    pub ce: f64,
    pub aux: f64,
    /// Mean total loss over the micro-steps since the previous row.
    pub loss_avg: f64,
    pub lr: f64,
    /// Global gradient norm before clipping, at the last optimizer step (None before the first).
    pub grad_norm: Option<f64>,
    /// Padded (all positions) and useful (counted labels) tokens per second since the previous row.
    pub tokens_per_s: f64,
    pub useful_tokens_per_s: f64,
    pub useful_tokens_seen: u64,
    /// Share of the interval's wall time spent waiting for the data loader.
    pub data_wait_share: f64,
    pub elapsed_s: f64,
    /// `--eval-data`'s held-out loss at this step, where it was scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// Rewrite `metrics.jsonl` from `rows` (used at start and after a resume).
pub fn write_all(path: &Path, rows: &[MetricRow]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for r in rows {
        writeln!(f, "{}", serde_json::to_string(r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub fn append(path: &Path, row: &MetricRow) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(row)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn read_all(path: &Path) -> Result<Vec<MetricRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics row", path.display(), i + 1))
        })
        .collect()
}

/// Loss (top) and learning rate (bottom) against the micro-step, as an SVG.
pub fn plot_curves(path: &Path, rows: &[MetricRow], title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(400);
    let x_max = rows.last().map(|r| r.step).unwrap_or(1).max(1) as f64;

    let losses: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.loss_avg.is_finite())
        .map(|r| (r.step as f64, r.loss_avg))
        .collect();
    let held_out: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.step as f64, r.eval_loss?)))
        .filter(|(_, y)| y.is_finite())
        .collect();
    let (lo, hi) = losses
        .iter()
        .chain(&held_out)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| {
            (lo.min(y), hi.max(y))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(hi - 1e-3) * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (mean over log interval)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(losses, &RED))
        .map_err(|e| err(&e))?
        .label("training loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    if !held_out.is_empty() {
        chart
            .draw_series(LineSeries::new(held_out.clone(), &GREEN))
            .map_err(|e| err(&e))?
            .label("held-out loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
        chart
            .draw_series(
                held_out
                    .into_iter()
                    .map(|p| Circle::new(p, 3, GREEN.filled())),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }

    let lrs: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.lr)).collect();
    let lr_max = lrs.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-12) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..lr_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("learning rate")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(lrs, &BLUE))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

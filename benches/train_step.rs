//! The whole training step of the 26M model (MiniMind2-small) on the fast path, timed without
//! criterion so it can run on a GPU machine: `cargo bench --bench train_step -- [cpu|cuda]
//! [fp32|bf16|fp16] [batch] [seq]`. Defaults: cuda if available, bf16, batch 32, seq 340 (the
//! DESIGN.md anchor: MiniMind eager bf16 batch 32 is 37.9 ms/step on an H100). Tokens are random
//! and unpadded; one step = forward, backward, clip, fused AdamW. Prints ms/step and tokens/s.

use std::time::Instant;

use fast::config::ModelConfig;
use fast::precision::{parse_device, Precision};
use fast::step::{Trainer, TrainerConfig};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let device = match args.first() {
        Some(d) => parse_device(d)?,
        None => Device::cuda_if_available(),
    };
    let precision: Precision = args.get(1).map(|s| s.as_str()).unwrap_or("bf16").parse()?;
    let batch: i64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let seq: i64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(340);
    let (batch, seq) = if device == Device::Cpu && args.len() < 3 {
        (2, 64)
    } else {
        (batch, seq)
    };
    let cfg = ModelConfig::minimind_26m();
    let tc = TrainerConfig {
        precision,
        device,
        ..Default::default()
    };
    let mut tr = Trainer::new(&cfg, tc)?;
    let ids = Tensor::randint_low(
        1,
        cfg.vocab_size as i64,
        [batch, seq],
        (Kind::Int64, device),
    );
    let sync = |t: &Tensor| f64::try_from(t.to_device(Device::Cpu)).unwrap();
    let step = |tr: &mut Trainer| -> anyhow::Result<Tensor> {
        tr.micro_step(&ids, &ids, 1.0)?;
        tr.optimizer_step(1e-4, 1.0)
    };
    for _ in 0..3 {
        sync(&step(&mut tr)?);
    }
    let n = if device == Device::Cpu { 3 } else { 20 };
    let t0 = Instant::now();
    let mut last = Tensor::zeros([], (Kind::Float, device));
    for _ in 0..n {
        last = step(&mut tr)?;
    }
    sync(&last);
    let ms = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
    let tok = (batch * seq) as f64 / (ms / 1e3);
    println!(
        "train_step/26m/fast {device:?} {precision} batch {batch} seq {seq}: {ms:.2} ms/step, {:.0}k tok/s",
        tok / 1e3
    );
    Ok(())
}

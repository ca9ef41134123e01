//! The optimizer step's parts: AdamW, joint gradient clipping, fp16's GradScaler, MiniMind's
//! learning-rate schedule and gradient accumulation.
pub mod accumulation;
pub mod adamw;
pub mod clip;
pub mod scaler;
pub mod schedule;

//! The oracle: every MiniMind pretraining component in plain float64 ndarray.
//!
//! One file per component; each layer is a `forward` / `backward` pair whose doc comment gives the
//! shapes and what is cached for backward. Activations are 2-D `[N, C]` with `N = B*T` (row
//! `b*T + t`), matching PyTorch's contiguous `[B, T, C]` layout. Semantics: `shared/DESIGN.md`.
//!
//! Both MiniMind generations ([`Architecture`]): MiniMind2 and MiniMind-3 (explicit head_dim,
//! q/k norm, its MoE). Beyond MiniMind's recipe: packed rows with document boundaries
//! ([`dataset::pack_docs`], [`attention::AttnMask`]), masked LM ([`mlm`], [`model::RunOptions`]),
//! transformers' linear and warmup-stable-decay schedules, `group_texts`, and Muon ([`muon`]).

pub mod accumulation;
pub mod adamw;
pub mod attention;
pub mod clip;
pub mod config;
pub mod dataset;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod mlm;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod muon;
pub mod params;
pub mod rmsnorm;
pub mod rope;
pub mod sampler;
pub mod scaler;
pub mod schedule;
#[cfg(test)]
mod testutil;
pub mod train;

pub use config::{Architecture, ModelConfig};
pub use params::Params;

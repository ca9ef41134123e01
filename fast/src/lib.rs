//! MiniMind pretraining on libtorch through `tch`: the program people train with.
//! It never calls the `reference` crate; tests compare the two.

pub mod accumulation;
pub mod adamw;
pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod clip;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod fused;
pub mod generate;
pub mod kernels_check;
pub mod kv_cache;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod precision;
pub mod profile;
pub mod pth;
pub mod sampler;
pub mod sampling;
pub mod scaler;
pub mod schedule;
pub mod step;
pub mod tokenizer_train;
pub mod train;
pub mod weights;

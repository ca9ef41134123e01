//! MiniMind pretraining on libtorch through `tch`: the program people train with.
//! It never calls the `reference` crate; tests compare the two.
//!
//! | folder | what it holds |
//! |---|---|
//! | `train/` | `fast pretrain`: options, the loop, the step, CUDA graphs, logging, signals, resume |
//! | `model/` | the decoder (one model for training and generation), its config, loss, sampling |
//! | `optim/` | AdamW, clipping, the fp16 scaler, the LR schedule, gradient accumulation |
//! | `data/` | JSONL corpus, tokenizer, rows, dataset, data order, loader, device batches |
//! | `io/` | weights, checkpoints, `.pth` import, Hugging Face export, safetensors writing |
//! | `parallel/` | data parallelism: torchrun's environment, communicators, the overlapped all-reduce |
//! | `kernels/` | safe wrappers over `csrc/` (our C++/CUDA) and the one place that picks kernels |
//! | `commands/` | bench, eval, generate, export, doctor, kernels, train-tokenizer, dist-check |

pub mod commands;
pub mod data;
pub mod io;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod train;

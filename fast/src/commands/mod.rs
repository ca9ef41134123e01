//! The subcommands besides `pretrain` (which is `train::run`): each file is one command's options
//! and its `run`.
pub mod bench;
pub mod dist_check;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod generate;
pub mod kernels;
pub mod tokenize;
pub mod train_tokenizer;

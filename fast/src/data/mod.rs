//! Pretraining data: a JSONL corpus read lazily, a Hugging Face tokenizer, padded or packed rows,
//! and a loader that builds batches on worker threads ahead of the training loop.
pub mod dataset;
pub mod defaults;
pub mod jsonl;
pub mod loader;
pub mod tokenize;

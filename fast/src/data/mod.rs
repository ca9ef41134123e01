//! Pretraining data, from JSONL text to device batches.
//!
//! corpus (a JSONL file read lazily) -> tokenizer (a Hugging Face tokenizer.json and its special
//! tokens) -> rows (MiniMind's padded encoding, or packed) -> dataset (rows by index) -> order
//! (the seeded epoch permutation, split over ranks) -> loader (batches built on worker threads)
//! -> batch (`[B, T]` tensors on the device). `defaults` is the embedded poems corpus.
pub mod batch;
pub mod corpus;
pub mod dataset;
pub mod defaults;
pub mod loader;
pub mod order;
pub mod rows;
pub mod tokenizer;

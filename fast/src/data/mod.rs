//! Pretraining data, from JSONL text to device batches.
//!
//! sources (the corpus's files, sorted, plain or compressed, read as one stream of lines) ->
//! tokenizer (a Hugging Face tokenizer.json and its special tokens; `bpe` encodes MiniMind's
//! byte-level BPE shape to ids without the tokenizers crate's per-call work) -> pass (the tokenizing pass,
//! on every core) -> token_cache (token shards and per-document offsets, memory-mapped; reused by every
//! run until the sources or the tokenizer change) -> rows (MiniMind's padded encoding, or packed)
//! -> dataset (rows by index, from the cache; masked for masked LM by `mlm`) -> order (the seeded epoch permutation, split over
//! ranks) -> loader (batches built on worker threads) -> batch (`[B, T]` tensors on the device).
//! `corpus` reads one JSONL file in memory-light random access (train-tokenizer); `defaults` is
//! the embedded poems corpus.
pub mod batch;
pub mod bpe;
pub mod corpus;
pub mod dataset;
pub mod defaults;
pub mod loader;
pub mod mlm;
pub mod order;
pub mod pass;
pub mod rows;
pub mod sources;
pub mod token_cache;
pub mod tokenizer;

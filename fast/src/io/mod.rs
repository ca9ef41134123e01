//! Files: weights (ours and MiniMind's `.pth`), resume checkpoints, Hugging Face and GGUF
//! exports, and the byte-deterministic safetensors writer under all of them.
//!
//! - `safetensors`: writing safetensors files whose bytes depend only on their contents;
//! - `checkpoint`: the float16 weights of a run and its resume checkpoint, written atomically;
//! - `weights`: loading weights by name from either format and working out their model config;
//! - `pth`: MiniMind's `torch.save` files read without executing anything;
//! - `hf`: Hugging Face `config.json` and `model.safetensors` for `fast export`;
//! - `gguf`: one `.gguf` file (tokenizer inside) for llama.cpp, `fast export --format gguf`.
pub mod checkpoint;
pub mod gguf;
pub mod hf;
pub mod pth;
pub mod safetensors;
pub mod weights;

//! The GGUF side of `fast export --format gguf`: one `.gguf` file that llama.cpp loads, with the
//! tokenizer inside it.
//!
//! What goes where follows llama.cpp's own converter (`convert_hf_to_gguf.py` and `gguf-py`):
//!
//! - Architecture: dense MiniMind2 is `llama`; with q/k norm (MiniMind-3) it is `qwen3`;
//!   MiniMind-3's MoE is `qwen3moe` (softmax router, top-k renormalised: llama.cpp's qwen3moe
//!   always renormalises, so a model that does not is refused). MiniMind2's MoE (shared experts)
//!   has no llama.cpp counterpart and is refused.
//! - RoPE: MiniMind rotates halves (`rotate_half`, NEOX in ggml's terms). llama.cpp's `qwen3`
//!   uses NEOX too, so its q/k go in unchanged; its `llama` uses the interleaved (NORM) rotation,
//!   so q and k rows are permuted within each head (pairs `(i, i + hd/2)` become neighbours), as
//!   the converter does for every Hugging Face Llama.
//! - Tied embeddings: no `output.weight`; llama.cpp then uses `token_embd.weight` as the output
//!   projection.
//! - Dtypes: `f32`, `f16`, `bf16` and `q8_0` for matrices; 1-D tensors, norms and the MoE router
//!   stay f32 (llama.cpp's kernels expect it); a `q8_0` matrix whose rows are not a multiple of
//!   32 is written f16, as the converter does.
//! - Tokenizer: byte-level BPE as `tokenizer.ggml.model = "gpt2"` with the GPT-2 pre-tokenizer
//!   (`"gpt-2"`: the same regex as the tokenizers library's `ByteLevel(use_regex = true)`, which
//!   MiniMind's tokenizers use), tokens and merges from tokenizer.json, token types (added
//!   tokens marked special, or looking like `<|...|>`, are control tokens), bos/eos/pad ids, and
//!   `add_bos_token = true`: MiniMind's rows start with bos, so prompts should too.
//!
//! The file: `GGUF`, version 3, tensor and key counts, the metadata keys, the tensor infos
//! (name, dims innermost first, ggml type, offset), then the data, each tensor aligned to 32.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::model::ModelConfig;

const ALIGNMENT: usize = 32;
/// Q8_0: blocks of 32 values, an f16 scale and 32 int8s.
const Q8_BLOCK: usize = 32;

/// How the matrices of the file are stored (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufDtype {
    pub fn parse(s: &str) -> Option<GgufDtype> {
        Some(match s {
            "f32" | "float32" => GgufDtype::F32,
            "f16" | "float16" => GgufDtype::F16,
            "bf16" | "bfloat16" => GgufDtype::Bf16,
            "q8_0" | "q8" => GgufDtype::Q8_0,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufDtype::F32 => "f32",
            GgufDtype::F16 => "f16",
            GgufDtype::Bf16 => "bf16",
            GgufDtype::Q8_0 => "q8_0",
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }
}

/// ggml tensor types written here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

/// llama.cpp's architecture for a MiniMind model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Qwen3,
    Qwen3Moe,
}

impl GgufArch {
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Qwen3Moe => "qwen3moe",
        }
    }
}

pub fn gguf_arch(cfg: &ModelConfig) -> Result<GgufArch> {
    match super::hf::hf_arch(cfg) {
        super::hf::HfArch::Llama => Ok(GgufArch::Llama),
        super::hf::HfArch::Qwen3 => Ok(GgufArch::Qwen3),
        super::hf::HfArch::Qwen3Moe if cfg.norm_topk_prob => Ok(GgufArch::Qwen3Moe),
        super::hf::HfArch::Qwen3Moe => bail!(
            "this MiniMind-3 MoE does not renormalise its top-k router weights (norm_topk_prob \
             false), and llama.cpp's qwen3moe always does: a GGUF of it would compute another \
             model; export it in the Hugging Face format instead"
        ),
        super::hf::HfArch::MiniMindMoe => bail!(
            "MiniMind2's MoE (shared experts, its own router) has no llama.cpp architecture; \
             export it in the Hugging Face format (MiniMind's own layout) instead"
        ),
    }
}

/// The tokenizer as llama.cpp reads it from `tokenizer.ggml.*`.
#[derive(Clone, Debug)]
pub struct GgufTokenizer {
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub chat_template: Option<String>,
}

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The tokenizer folder `dir` (tokenizer.json, tokenizer_config.json) for a model of
/// `vocab_size` embeddings: ids the tokenizer does not use become unused `[PAD<id>]` tokens.
pub fn tokenizer_from_dir(dir: &Path, vocab_size: usize) -> Result<GgufTokenizer> {
    let json_path = if dir.is_dir() {
        dir.join("tokenizer.json")
    } else {
        dir.to_path_buf()
    };
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", json_path.display()))?;
    let src = json_path.display();
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "{src}: a {} tokenizer; the GGUF export writes byte-level BPE (MiniMind's) only",
            model["type"]
        );
    }
    let byte_level = |p: &serde_json::Value| {
        p["type"] == "ByteLevel"
            || p["pretokenizers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["type"] == "ByteLevel"))
    };
    if !byte_level(&v["pre_tokenizer"]) {
        bail!("{src}: its pre-tokenizer is not ByteLevel, which llama.cpp's \"gpt2\" tokenizer model assumes");
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_UNUSED; vocab_size];
    let mut put = |id: u64, tok: &str, ty: i32| -> Result<()> {
        let i = id as usize;
        if i >= vocab_size {
            bail!(
                "{src}: token {tok:?} has id {id}, beyond the model's vocabulary of {vocab_size}"
            );
        }
        tokens[i] = Some(tok.to_string());
        types[i] = ty;
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("{src}: no model.vocab"))?;
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| format!("{src}: vocab id of {tok:?}"))?;
        put(id, tok, TOKEN_NORMAL)?;
    }
    for a in v["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            bail!("{src}: an added token without id or content: {a}");
        };
        let special = a["special"].as_bool().unwrap_or(false)
            || (content.starts_with("<|") && content.ends_with("|>"));
        put(
            id,
            content,
            if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            },
        )?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges = model["merges"]
        .as_array()
        .with_context(|| format!("{src}: no model.merges"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => bail!("{src}: merge {other} is neither \"a b\" nor [a, b]"),
        })
        .collect::<Result<Vec<_>>>()?;
    let tok = crate::data::tokenizer::TextTokenizer::load(
        &json_path,
        &crate::data::tokenizer::SpecialTokenStrings::default(),
    )?;
    let config_path = json_path.with_file_name("tokenizer_config.json");
    let chat_template = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["chat_template"].as_str().map(str::to_string));
    Ok(GgufTokenizer {
        tokens,
        token_types: types,
        merges,
        bos: tok.bos,
        eos: tok.eos,
        pad: tok.pad,
        chat_template,
    })
}

// ---- tensors ----

/// One tensor of the file: its GGUF name, shape (PyTorch order, outermost first) and f32 data.
pub struct GgufTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Tensor,
}

/// llama.cpp's interleaved-RoPE layout of a q or k projection `[heads * hd, d]`: within each
/// head, rows `(i, i + hd/2)` become rows `(2i, 2i + 1)` (convert_hf_to_gguf.py's `permute`).
pub fn permute_for_norm_rope(w: &Tensor, heads: i64) -> Tensor {
    let s = w.size();
    w.reshape([heads, 2, s[0] / heads / 2, s[1]])
        .swapaxes(1, 2)
        .reshape(s.as_slice())
}

/// The model's tensors under llama.cpp's names, in the file's order (embedding, layers, norm),
/// permuted and stacked as the architecture needs. `weights` are MiniMind's named tensors.
pub fn gguf_tensors(cfg: &ModelConfig, weights: &[(String, Tensor)]) -> Result<Vec<GgufTensor>> {
    let arch = gguf_arch(cfg)?;
    let get = |n: &str| -> Result<Tensor> {
        weights
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.to_kind(Kind::Float).contiguous())
            .with_context(|| format!("the weights have no {n}"))
    };
    let mut out = Vec::new();
    let mut push = |name: String, t: Tensor| {
        let shape = t.size().iter().map(|&d| d as usize).collect();
        out.push(GgufTensor {
            name,
            shape,
            values: t,
        });
    };
    push("token_embd.weight".into(), get(super::weights::EMBED)?);
    let (heads, kv) = (
        cfg.num_attention_heads as i64,
        cfg.num_key_value_heads as i64,
    );
    for i in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let b = format!("blk.{i}");
        push(
            format!("{b}.attn_norm.weight"),
            get(&format!("{l}.input_layernorm.weight"))?,
        );
        let (mut q, mut k) = (
            get(&format!("{l}.self_attn.q_proj.weight"))?,
            get(&format!("{l}.self_attn.k_proj.weight"))?,
        );
        if arch == GgufArch::Llama {
            q = permute_for_norm_rope(&q, heads);
            k = permute_for_norm_rope(&k, kv);
        }
        push(format!("{b}.attn_q.weight"), q);
        push(format!("{b}.attn_k.weight"), k);
        push(
            format!("{b}.attn_v.weight"),
            get(&format!("{l}.self_attn.v_proj.weight"))?,
        );
        push(
            format!("{b}.attn_output.weight"),
            get(&format!("{l}.self_attn.o_proj.weight"))?,
        );
        if cfg.qk_norm {
            push(
                format!("{b}.attn_q_norm.weight"),
                get(&format!("{l}.self_attn.q_norm.weight"))?,
            );
            push(
                format!("{b}.attn_k_norm.weight"),
                get(&format!("{l}.self_attn.k_norm.weight"))?,
            );
        }
        push(
            format!("{b}.ffn_norm.weight"),
            get(&format!("{l}.post_attention_layernorm.weight"))?,
        );
        if cfg.use_moe {
            push(
                format!("{b}.ffn_gate_inp.weight"),
                get(&format!("{l}.mlp.gate.weight"))?,
            );
            for (ours, theirs) in [
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ] {
                let experts = (0..cfg.routed_experts())
                    .map(|e| get(&format!("{l}.mlp.experts.{e}.{ours}.weight")))
                    .collect::<Result<Vec<_>>>()?;
                push(format!("{b}.{theirs}.weight"), Tensor::stack(&experts, 0));
            }
        } else {
            for (ours, theirs) in [
                ("gate_proj", "ffn_gate"),
                ("up_proj", "ffn_up"),
                ("down_proj", "ffn_down"),
            ] {
                push(
                    format!("{b}.{theirs}.weight"),
                    get(&format!("{l}.mlp.{ours}.weight"))?,
                );
            }
        }
    }
    push("output_norm.weight".into(), get("model.norm.weight")?);
    Ok(out)
}

/// The ggml type of tensor `name` of `shape` in a file of `dtype` (the converter's rules).
fn tensor_type(name: &str, shape: &[usize], dtype: GgufDtype) -> GgmlType {
    if shape.len() <= 1 || name.ends_with("_norm.weight") || name.contains(".ffn_gate_inp.") {
        return GgmlType::F32;
    }
    match dtype {
        GgufDtype::F32 => GgmlType::F32,
        GgufDtype::F16 => GgmlType::F16,
        GgufDtype::Bf16 => GgmlType::Bf16,
        GgufDtype::Q8_0 if shape.last().is_some_and(|&n| n % Q8_BLOCK == 0) => GgmlType::Q8_0,
        GgufDtype::Q8_0 => GgmlType::F16,
    }
}

/// ggml's Q8_0 (ggml-quants.c `quantize_row_q8_0_ref`): per 32 values, `d = max|x| / 127` stored
/// as f16 and `round(x / d)` as int8, rounding half away from zero. `values` is row-major with
/// rows a multiple of 32 long, so blocks never straddle rows.
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<u8>> {
    if values.len() % Q8_BLOCK != 0 {
        bail!(
            "q8_0: {} values are not whole blocks of {Q8_BLOCK}",
            values.len()
        );
    }
    let blocks = values.len() / Q8_BLOCK;
    let mut scales = Vec::with_capacity(blocks);
    let mut qs = Vec::with_capacity(values.len());
    for block in values.chunks_exact(Q8_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        scales.push(d);
        qs.extend(block.iter().map(|&x| (x * id).round() as i8 as u8));
    }
    // f16 scales through libtorch (round to nearest even, as ggml's FP32_TO_FP16).
    let d16 = super::safetensors::raw(&Tensor::from_slice(&scales), Kind::Half)?.data;
    let mut out = Vec::with_capacity(blocks * (2 + Q8_BLOCK));
    for (b, q) in qs.chunks_exact(Q8_BLOCK).enumerate() {
        out.extend_from_slice(&d16[2 * b..2 * b + 2]);
        out.extend_from_slice(q);
    }
    Ok(out)
}

fn tensor_bytes(t: &GgufTensor, ty: GgmlType) -> Result<Vec<u8>> {
    let raw = |k| super::safetensors::raw(&t.values, k).map(|r| r.data);
    match ty {
        GgmlType::F32 => raw(Kind::Float),
        GgmlType::F16 => raw(Kind::Half),
        GgmlType::Bf16 => raw(Kind::BFloat16),
        GgmlType::Q8_0 => {
            let v = Vec::<f32>::try_from(t.values.flatten(0, -1))?;
            quantize_q8_0(&v)
        }
    }
}

// ---- metadata ----

/// A metadata value, typed as llama.cpp's loader checks it.
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Value {
    /// GGUF value type ids: u32 4, i32 5, f32 6, bool 7, string 8, array 9.
    fn write(&self, out: &mut Vec<u8>) {
        let ty = |out: &mut Vec<u8>, t: u32| out.extend_from_slice(&t.to_le_bytes());
        match self {
            Value::U32(v) => {
                ty(out, 4);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::F32(v) => {
                ty(out, 6);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::Bool(v) => {
                ty(out, 7);
                out.push(*v as u8);
            }
            Value::Str(s) => {
                ty(out, 8);
                put_str(out, s);
            }
            Value::StrArray(v) => {
                ty(out, 9);
                ty(out, 8);
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for s in v {
                    put_str(out, s);
                }
            }
            Value::I32Array(v) => {
                ty(out, 9);
                ty(out, 5);
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
}

/// Every metadata key of the file, in the order written.
pub fn metadata(
    cfg: &ModelConfig,
    tok: &GgufTokenizer,
    dtype: GgufDtype,
    name: &str,
) -> Result<Vec<(String, Value)>> {
    let arch = gguf_arch(cfg)?;
    let a = arch.name();
    let u = |v: usize| Value::U32(v as u32);
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(a.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        // ggml's quantisation format version (GGML_QNT_VERSION), written by every converter.
        ("general.quantization_version".into(), Value::U32(2)),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.block_count"), u(cfg.num_hidden_layers)),
        (format!("{a}.feed_forward_length"), u(cfg.ffn_width())),
        (
            format!("{a}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            u(cfg.num_key_value_heads),
        ),
        // head_dim may differ from d / heads (MiniMind-3): say it rather than let it be derived.
        (format!("{a}.attention.key_length"), u(cfg.head_dim())),
        (format!("{a}.attention.value_length"), u(cfg.head_dim())),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim())),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    if arch == GgufArch::Qwen3Moe {
        m.push((format!("{a}.expert_count"), u(cfg.routed_experts())));
        m.push((format!("{a}.expert_used_count"), u(cfg.num_experts_per_tok)));
        m.push((
            format!("{a}.expert_feed_forward_length"),
            u(cfg.expert_width()),
        ));
    }
    m.extend([
        ("tokenizer.ggml.model".into(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::Str("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::StrArray(tok.tokens.clone()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::I32Array(tok.token_types.clone()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::StrArray(tok.merges.clone()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(tok.bos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(tok.eos)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(tok.pad),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ]);
    if let Some(t) = &tok.chat_template {
        m.push(("tokenizer.chat_template".into(), Value::Str(t.clone())));
    }
    Ok(m)
}

/// What [`write_gguf`] wrote.
pub struct Written {
    pub arch: GgufArch,
    pub tensors: usize,
    pub bytes: u64,
    /// Matrices that `q8_0` left in f16 (rows not a multiple of 32).
    pub f16_fallbacks: Vec<String>,
}

/// Write `path` (atomically: a temp file beside it, then a rename) for the model `cfg` with
/// MiniMind's named `weights`.
pub fn write_gguf(
    path: &Path,
    cfg: &ModelConfig,
    weights: &[(String, Tensor)],
    tok: &GgufTokenizer,
    dtype: GgufDtype,
    name: &str,
) -> Result<Written> {
    if tok.tokens.len() != cfg.vocab_size {
        bail!(
            "the tokenizer has {} tokens for a model of {} embeddings",
            tok.tokens.len(),
            cfg.vocab_size
        );
    }
    let meta = metadata(cfg, tok, dtype, name)?;
    let tensors = gguf_tensors(cfg, weights)?;
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut header, k);
        v.write(&mut header);
    }
    let mut datas = Vec::with_capacity(tensors.len());
    let mut f16_fallbacks = Vec::new();
    let mut offset = 0usize;
    for t in &tensors {
        let ty = tensor_type(&t.name, &t.shape, dtype);
        if dtype == GgufDtype::Q8_0 && ty == GgmlType::F16 {
            f16_fallbacks.push(t.name.clone());
        }
        let data = tensor_bytes(t, ty).with_context(|| format!("tensor {}", t.name))?;
        put_str(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&(ty as u32).to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += data.len().next_multiple_of(ALIGNMENT);
        datas.push(data);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| -> Result<u64> {
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&header)?;
        let mut total = header.len() as u64;
        for d in &datas {
            w.write_all(d)?;
            let pad = d.len().next_multiple_of(ALIGNMENT) - d.len();
            w.write_all(&[0u8; ALIGNMENT][..pad])?;
            total += (d.len() + pad) as u64;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(total)
    })()
    .with_context(|| format!("writing {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(Written {
        arch: gguf_arch(cfg)?,
        tensors: tensors.len(),
        bytes: result?,
        f16_fallbacks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row pairs (i, i + hd/2) of each head become neighbours, heads stay in place.
    #[test]
    fn the_norm_rope_permutation_interleaves_each_heads_halves() {
        // 2 heads of head_dim 4, one column holding the row number.
        let w = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).reshape([8, 1]);
        let p = permute_for_norm_rope(&w, 2);
        let rows = Vec::<f32>::try_from(p.flatten(0, -1)).unwrap();
        assert_eq!(rows, [0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    /// ggml's reference on a hand-worked block: max |x| = 127 gives d = 1 (f16 0x3C00), and
    /// q = round(x / d) with halves away from zero.
    #[test]
    fn q8_0_blocks_hold_an_f16_scale_and_rounded_int8s() {
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = -63.5;
        x[2] = 0.4;
        x[3] = 2.5;
        let b = quantize_q8_0(&x).unwrap();
        assert_eq!(b.len(), 34);
        assert_eq!(&b[..2], &0x3C00u16.to_le_bytes());
        assert_eq!(
            [b[2] as i8, b[3] as i8, b[4] as i8, b[5] as i8],
            [127, -64, 0, 3]
        );
        assert!(quantize_q8_0(&x[..31]).is_err());
        assert_eq!(quantize_q8_0(&[0f32; 32]).unwrap()[2..], [0u8; 32]);
    }

    /// Norms, 1-D tensors and the router stay f32; q8_0 needs rows of whole blocks.
    #[test]
    fn tensor_types_follow_the_converters_rules() {
        let q = GgufDtype::Q8_0;
        assert_eq!(
            tensor_type("blk.0.attn_norm.weight", &[64], q),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type("blk.0.attn_q_norm.weight", &[16], q),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type("blk.0.ffn_gate_inp.weight", &[4, 64], q),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", &[64, 64], q),
            GgmlType::Q8_0
        );
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[64, 48], q),
            GgmlType::F16
        );
        assert_eq!(
            tensor_type("token_embd.weight", &[10, 64], GgufDtype::Bf16),
            GgmlType::Bf16
        );
    }
}

//! MiniMind's decoder (MiniMind2 family, Llama-style) on libtorch's own kernels.
//!
//! Built from an `nn::Path` of a `VarStore`, so variable names are exactly MiniMind's state_dict
//! names (`model.layers.3.self_attn.q_proj.weight`, ...); `lm_head` is tied to
//! `model.embed_tokens.weight` (one parameter, used twice). Training-mode semantics: the MoE aux
//! loss is computed (alpha > 0). Inference with a KV cache lives in `kv_cache.rs`.
//!
//! Mixed precision is explicit rather than through autocast: parameters and the residual stream
//! stay in the VarStore's kind (fp32 master weights), every matmul (projections, lm_head, SDPA)
//! runs in `compute` kind (bf16/fp16), and RMSNorm, RoPE, the router softmax and the loss run in
//! fp32. This is what `torch.autocast(dtype=bfloat16)` does to MiniMind's model; tch's `autocast`
//! only toggles CUDA autocast at its default fp16 dtype and cannot pick bf16, and explicit casts
//! also let the bf16 path run (and be verified) on the CPU.

mod attention;
pub mod fused;
mod mlp;
mod moe;
mod norm;
mod weights;

pub use attention::Attention;
pub(crate) use attention::{repeat_kv, rope};
pub use mlp::Mlp;
pub use moe::MoeFeedForward;
pub use norm::{rms_norm, RmsNorm};
pub use weights::{load_named, named_parameters, save_named, EMBED};

use std::sync::Mutex;

use anyhow::Result;
use tch::{nn, Device, Kind, Tensor};

use crate::config::ModelConfig;

/// Forward results: logits `[B, T, V]` in the compute kind, and the summed MoE aux loss (a scalar
/// fp32 tensor, fp64 for fp64 parameters; zero for dense models).
pub struct ModelOutput {
    pub logits: Tensor,
    pub aux_loss: Tensor,
}

/// `x` in kind `k` (a handle to `x` itself when it already is).
pub(crate) fn to_kind(x: &Tensor, k: Kind) -> Tensor {
    if x.kind() == k {
        x.shallow_clone()
    } else {
        x.to_kind(k)
    }
}

/// `x W^T` in `compute` kind (the explicit form of autocast's linear).
pub(crate) fn linear(x: &Tensor, w: &Tensor, compute: Kind) -> Tensor {
    to_kind(x, compute).linear::<Tensor>(&to_kind(w, compute), None)
}

/// The kind precision-sensitive elementwise work (norms, RoPE, softmax, loss) runs in: fp32, or
/// fp64 when the input is fp64.
pub fn upcast_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// RoPE tables cos/sin `[T, hd]` as MiniMind's precompute_freqs_cis: `inv_freq_i =
/// theta^(-2i/hd)`, rows `[cos(t f), cos(t f)]`, in float32 on the CPU (libtorch's own kernels,
/// so the tables are bitwise MiniMind's; an fp64 model then holds f32-rounded values too).
pub(crate) fn rope_table(theta: f64, hd: i64, t: i64) -> (Tensor, Tensor) {
    let f32cpu = (Kind::Float, Device::Cpu);
    let expo = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu))
        .narrow(0, 0, hd / 2)
        .to_kind(Kind::Float)
        / hd as f64;
    let inv = Tensor::pow_scalar(theta, &expo).reciprocal();
    let pos = Tensor::arange(t, f32cpu);
    let freqs = pos.outer(&inv);
    (
        Tensor::cat(&[freqs.cos(), freqs.cos()], -1),
        Tensor::cat(&[freqs.sin(), freqs.sin()], -1),
    )
}

/// One decoder layer: `h = x + attn(rms1(x)); out = h + ffn(rms2(h))`.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

/// Dense SwiGLU MLP or MoE.
pub enum FeedForward {
    Dense(Mlp),
    Moe(MoeFeedForward),
}

/// RoPE tables for one length, device and kind: cos/sin `[T, hd]`.
struct RopeCache {
    t: i64,
    device: Device,
    kind: Kind,
    cos: Tensor,
    sin: Tensor,
}

pub struct MiniMindForCausalLM {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// Kind of matmuls: the parameters' kind (fp32/fp64) or bf16/fp16 for mixed precision.
    pub compute: Kind,
    rope: Mutex<Option<RopeCache>>,
}

impl MiniMindForCausalLM {
    /// Creates every parameter under `root` (pass `vs.root()`): matrices ~ N(0, 0.02), norm
    /// weights ones. Seed with `tch::manual_seed` first for a reproducible init. Matmuls run in
    /// the parameters' kind until [`Self::set_compute_kind`].
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let m = root / "model";
        let (d, hd, f) = (
            cfg.hidden_size as i64,
            cfg.head_dim() as i64,
            cfg.ffn_width() as i64,
        );
        let mat = |p: &nn::Path, o: i64, i: i64| {
            p.var(
                "weight",
                &[o, i],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        };
        let embed_tokens = mat(&(&m / "embed_tokens"), cfg.vocab_size as i64, d);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = &m / "layers" / i;
            let a = &l / "self_attn";
            let (h, kv) = (
                cfg.num_attention_heads as i64,
                cfg.num_key_value_heads as i64,
            );
            let self_attn = Attention {
                q_proj: mat(&(&a / "q_proj"), h * hd, d),
                k_proj: mat(&(&a / "k_proj"), kv * hd, d),
                v_proj: mat(&(&a / "v_proj"), kv * hd, d),
                o_proj: mat(&(&a / "o_proj"), d, h * hd),
                q_norm: cfg
                    .qk_norm
                    .then(|| RmsNorm::new(&(&a / "q_norm"), hd, cfg.rms_norm_eps)),
                k_norm: cfg
                    .qk_norm
                    .then(|| RmsNorm::new(&(&a / "k_norm"), hd, cfg.rms_norm_eps)),
                heads: h,
                kv_heads: kv,
                head_dim: hd,
            };
            let mlp_at = |p: nn::Path| Mlp {
                gate_proj: mat(&(&p / "gate_proj"), f, d),
                up_proj: mat(&(&p / "up_proj"), f, d),
                down_proj: mat(&(&p / "down_proj"), d, f),
            };
            let mp = &l / "mlp";
            let mlp = if cfg.use_moe {
                FeedForward::Moe(MoeFeedForward {
                    gate: mat(&(&mp / "gate"), cfg.n_routed_experts as i64, d),
                    experts: (0..cfg.n_routed_experts)
                        .map(|e| mlp_at(&mp / "experts" / e))
                        .collect(),
                    shared_experts: (0..cfg.n_shared_experts)
                        .map(|e| mlp_at(&mp / "shared_experts" / e))
                        .collect(),
                    top_k: cfg.num_experts_per_tok as i64,
                    norm_topk_prob: cfg.norm_topk_prob,
                    alpha: cfg.aux_loss_alpha,
                    seq_aux: cfg.seq_aux,
                })
            } else {
                FeedForward::Dense(mlp_at(mp))
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::new(&(&l / "input_layernorm"), d, cfg.rms_norm_eps),
                self_attn,
                post_attention_layernorm: RmsNorm::new(
                    &(&l / "post_attention_layernorm"),
                    d,
                    cfg.rms_norm_eps,
                ),
                mlp,
            });
        }
        let norm = RmsNorm::new(&(&m / "norm"), d, cfg.rms_norm_eps);
        let compute = embed_tokens.kind();
        Ok(MiniMindForCausalLM {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            compute,
            rope: Mutex::new(None),
        })
    }

    /// Matmul kind: `Kind::BFloat16` / `Kind::Half` for mixed precision, or the parameters' kind.
    pub fn set_compute_kind(&mut self, k: Kind) {
        self.compute = k;
    }

    /// cos/sin `[T, hd]`: `inv_freq_i = theta^(-2i/hd)` computed in f64, rows
    /// `[cos(t f), cos(t f)]`, stored in the parameters' upcast kind. Cached per (T, device).
    fn rope_tables(&self, t: i64, device: Device) -> (Tensor, Tensor) {
        let kind = upcast_kind(self.embed_tokens.kind());
        let mut cache = self.rope.lock().expect("rope cache lock");
        if let Some(c) = cache.as_ref() {
            if c.t >= t && c.device == device && c.kind == kind {
                return (c.cos.narrow(0, 0, t), c.sin.narrow(0, 0, t));
            }
        }
        let (c, s) = rope_table(self.cfg.rope_theta, self.cfg.head_dim() as i64, t);
        let c = c.to_kind(kind).to_device(device);
        let s = s.to_kind(kind).to_device(device);
        *cache = Some(RopeCache {
            t,
            device,
            kind,
            cos: c.shallow_clone(),
            sin: s.shallow_clone(),
        });
        (c, s)
    }

    /// input_ids `[B, T]` int64 -> logits `[B, T, V]` (compute kind) and the summed aux loss.
    /// No attention mask: causal attention over the whole row, pads included (as MiniMind).
    pub fn forward(&self, input_ids: &Tensor) -> ModelOutput {
        let (h, aux_loss) = self.forward_hidden(input_ids);
        ModelOutput {
            logits: self.lm_head(&h),
            aux_loss,
        }
    }

    /// The tied lm_head: `h E^T` in compute kind. h `[..., d]` -> `[..., V]`.
    pub fn lm_head(&self, h: &Tensor) -> Tensor {
        linear(h, &self.embed_tokens, self.compute)
    }

    /// Everything before the lm_head: the final RMSNorm's output `[B, T, d]` (parameters' kind,
    /// or bf16 where the fused kernels write it in the lm_head's compute kind) and the summed aux
    /// loss. The training step applies the head chunk by chunk (step.rs).
    pub fn forward_hidden(&self, input_ids: &Tensor) -> (Tensor, Tensor) {
        self.forward_hidden_marked(input_ids, &|_, _| Ok(()))
            .expect("a mark that does nothing cannot fail")
    }

    /// [`Self::forward_hidden`], calling `mark(i, f)` for every layer `i` with a tensor `f` whose
    /// gradient exists exactly when layers `i..` have backpropagated: the embedding's output for
    /// layer 0, and for `i >= 1` the output of layer `i - 1`'s feed-forward, which only layer
    /// `i`'s input norm reads (data parallel hooks them to start reducing those layers'
    /// gradients, dist/overlap.rs).
    pub fn forward_hidden_marked(
        &self,
        input_ids: &Tensor,
        mark: &dyn Fn(usize, &Tensor) -> anyhow::Result<()>,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let (_, t) = input_ids.size2().expect("input_ids must be [B, T]");
        let device = self.embed_tokens.device();
        let (cos, sin) = self.rope_tables(t, device);
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        mark(0, &x)?;
        let mut aux = Tensor::zeros([], (upcast_kind(self.embed_tokens.kind()), device));
        // Each residual add happens in the norm that reads its sum (`add_forward_for_matmul`:
        // one kernel with the fused path), so a branch's output waits in `pending` until then.
        // Norms feeding projections may come out in bf16 straight from the fused kernel; the
        // MoE router reads its input's kind, so it keeps the fp32 norm and a separate add.
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(f) = &pending {
                mark(i, f)?;
            }
            let (x1, n1) =
                layer
                    .input_layernorm
                    .add_forward_for_matmul(&x, pending.take(), self.compute);
            let a = layer.self_attn.forward(&n1, &cos, &sin, self.compute);
            let norm2 = &layer.post_attention_layernorm;
            let f = match &layer.mlp {
                FeedForward::Dense(m) => {
                    let (h, n2) = norm2.add_forward_for_matmul(&x1, Some(a), self.compute);
                    x = h;
                    m.forward_fused(&n2, self.compute)
                }
                FeedForward::Moe(m) => {
                    x = &x1 + a;
                    let (f, layer_aux) = m.forward(&norm2.forward(&x), self.compute);
                    aux = aux + layer_aux;
                    f
                }
            };
            pending = Some(f);
        }
        let (_, y) = self
            .norm
            .add_forward_for_matmul(&x, pending.take(), self.compute);
        Ok((y, aux))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    fn tiny(moe: bool, qk: bool) -> ModelConfig {
        ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 40,
            use_moe: moe,
            qk_norm: qk,
            ..Default::default()
        }
    }

    /// The VarStore holds exactly MiniMind's state_dict names and shapes (lm_head tied: absent).
    #[test]
    fn variable_names_are_minimind_state_dict_names() {
        for (moe, qk) in [(false, false), (true, true)] {
            let cfg = tiny(moe, qk);
            let vs = VarStore::new(Device::Cpu);
            MiniMindForCausalLM::new(&vs.root(), &cfg).unwrap();
            let got: Vec<(String, Vec<i64>)> = named_parameters(&vs)
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            assert_eq!(got, cfg.param_shapes());
        }
    }

    #[test]
    fn forward_gives_logits_and_a_scalar_aux_loss() {
        let cfg = tiny(true, false);
        let vs = VarStore::new(Device::Cpu);
        let m = MiniMindForCausalLM::new(&vs.root(), &cfg).unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 7, 0, 2, 3]).reshape([2, 3]);
        let out = m.forward(&ids);
        assert_eq!(out.logits.size(), vec![2, 3, 40]);
        assert_eq!(out.aux_loss.size(), Vec::<i64>::new());
        assert!(f64::try_from(&out.aux_loss).unwrap() > 0.0);
    }

    /// Saved weights load back into a fresh model and give the same logits.
    #[test]
    fn save_and_load_round_trip() {
        let cfg = tiny(false, true);
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let m = MiniMindForCausalLM::new(&vs.root(), &cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_named(&vs, &path).unwrap();
        tch::manual_seed(4);
        let mut vs2 = VarStore::new(Device::Cpu);
        let m2 = MiniMindForCausalLM::new(&vs2.root(), &cfg).unwrap();
        let loaded: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        load_named(&mut vs2, loaded, "w.safetensors").unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 7, 9]).reshape([1, 4]);
        let (a, b) = (m.forward(&ids).logits, m2.forward(&ids).logits);
        assert_eq!(f64::try_from((a - b).abs().max()).unwrap(), 0.0);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A weights file missing a tensor is refused with its name.
    #[test]
    fn loading_names_what_is_missing() {
        let cfg = tiny(false, false);
        let mut vs = VarStore::new(Device::Cpu);
        MiniMindForCausalLM::new(&vs.root(), &cfg).unwrap();
        let mut named: std::collections::HashMap<String, Tensor> = named_parameters(&vs)
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        named.remove("model.norm.weight");
        let err = load_named(&mut vs, named, "x").unwrap_err().to_string();
        assert!(err.contains("model.norm.weight"), "{err}");
    }
}

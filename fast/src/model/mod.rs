//! MiniMind's decoder (MiniMind2 family, Llama-style; MiniMind-3's q/k norm) on libtorch: one
//! model for training, evaluation and KV-cached generation.
//!
//! Built from an `nn::Path` of a `VarStore`, so variable names are exactly MiniMind's state_dict
//! names (`model.layers.3.self_attn.q_proj.weight`, ...); `lm_head` is tied to
//! `model.embed_tokens.weight` (one parameter, used twice). The MoE aux loss is always computed
//! (training semantics); evaluation and generation ignore it.
//!
//! Mixed precision is explicit rather than through autocast: parameters and the residual stream
//! stay in the VarStore's kind (fp32 master weights), every matmul (projections, lm_head, SDPA)
//! runs in `compute` kind (bf16/fp16), and RMSNorm, RoPE, the router softmax and the loss run in
//! fp32. This is what `torch.autocast(dtype=bfloat16)` does to MiniMind's model; tch's `autocast`
//! only toggles CUDA autocast at its default fp16 dtype and cannot pick bf16, and explicit casts
//! also let the bf16 path run (and be verified) on the CPU. Which of our fused CUDA kernels run is
//! the model's [`Kernels`].

mod attention;
pub mod config;
mod kv_cache;
pub mod loss;
mod mlp;
mod moe;
mod norm;
mod params;
pub mod precision;
pub mod presets;
pub mod rope;
pub mod sampling;

pub use attention::{repeat_kv, Attention, Mask, Positions};
pub use config::ModelConfig;
pub use kv_cache::KvCache;
pub use mlp::Mlp;
pub use moe::{MoeFeedForward, MoeRouting};
pub use norm::{rms_norm, RmsNorm};
pub use params::{load_named, named_parameters, save_named};

use std::collections::HashMap;

use anyhow::Result;
use tch::{nn, Device, Kind, Tensor};

use crate::kernels::{fused, Kernels};

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

/// The bf16 operand of a projection over the weights `ws` (merged by rows) on the fused path: our
/// weight-cast node for fp32 master weights where [`Kernels::weight_cast_applies`], else their cat
/// cast to bf16 under autograd.
pub(crate) fn bf16_operand(ws: &[&Tensor], k: &Kernels) -> Tensor {
    if k.weight_cast_applies(ws) {
        return expect("weights_bf16", fused::weights_bf16(ws));
    }
    let w = if ws.len() == 1 {
        ws[0].shallow_clone()
    } else {
        Tensor::cat(ws, 0)
    };
    w.to_kind(Kind::BFloat16)
}

/// Unwrap a fused op's result inside a forward that cannot return errors: its inputs were
/// checked by [`Kernels`] (kinds, device, shapes), so a failure here is a kernel or CUDA error.
pub(crate) fn expect<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("fused kernel {what}: {e:#}"))
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

pub struct MiniMindForCausalLM {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// Kind of matmuls: the parameters' kind (fp32/fp64) or bf16/fp16 for mixed precision.
    pub compute: Kind,
    /// Which of our fused kernels the forward (and its backward) may use.
    pub kernels: Kernels,
    /// Causal attention (a causal LM); false: every token sees the whole row (a masked LM).
    pub causal: bool,
    rope: rope::RopeTables,
}

/// A tensor whose gradient exists exactly when layers `i..` have backpropagated (see
/// [`MiniMindForCausalLM::forward_hidden_with`]).
pub type Mark<'a> = &'a dyn Fn(usize, &Tensor) -> Result<()>;

impl MiniMindForCausalLM {
    /// Creates every parameter under `root` (pass `vs.root()`): matrices ~ N(0, 0.02), norm
    /// weights ones. Seed with `tch::manual_seed` first for a reproducible init. Matmuls run in
    /// the parameters' kind until [`Self::set_compute_kind`].
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        // Weights the device cannot hold are an error naming the sizes, not a panic inside
        // libtorch's allocator halfway through the layers (empty: nothing is written).
        let n = cfg.param_count();
        if let Err(e) = Tensor::f_empty([n as i64], (Kind::Float, root.device())) {
            anyhow::bail!(
                "the model's {n} parameters ({:.1} GiB in fp32) do not fit on {:?}: {}",
                n as f64 * 4.0 / (1u64 << 30) as f64,
                root.device(),
                e.to_string().lines().next().unwrap_or("")
            );
        }
        let m = root / "model";
        let (d, hd) = (cfg.hidden_size as i64, cfg.head_dim() as i64);
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
            let mlp_at = |p: nn::Path, f: usize| {
                let f = f as i64;
                Mlp {
                    gate_proj: mat(&(&p / "gate_proj"), f, d),
                    up_proj: mat(&(&p / "up_proj"), f, d),
                    down_proj: mat(&(&p / "down_proj"), d, f),
                }
            };
            let mp = &l / "mlp";
            let mlp = if cfg.use_moe {
                let ew = cfg.expert_width();
                FeedForward::Moe(MoeFeedForward {
                    gate: mat(&(&mp / "gate"), cfg.routed_experts() as i64, d),
                    experts: (0..cfg.routed_experts())
                        .map(|e| mlp_at(&mp / "experts" / e, ew))
                        .collect(),
                    shared_experts: (0..cfg.shared_experts())
                        .map(|e| mlp_at(&mp / "shared_experts" / e, ew))
                        .collect(),
                    top_k: cfg.num_experts_per_tok as i64,
                    routing: MoeRouting::of(cfg),
                })
            } else {
                FeedForward::Dense(mlp_at(mp, cfg.ffn_width()))
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
            kernels: Kernels::default(),
            causal: true,
            rope: rope::RopeTables::new(cfg.rope_theta, hd),
        })
    }

    /// A model for evaluation and generation holding `named` weights (MiniMind names, checked
    /// against `cfg`, any float kind) in `kind` on `device`; matmuls run in `kind`.
    pub fn from_weights(
        cfg: &ModelConfig,
        named: Vec<(String, Tensor)>,
        kind: Kind,
        device: Device,
        source: &str,
    ) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let mut model = MiniMindForCausalLM::new(&vs.root(), cfg)?;
        vs.set_kind(kind);
        model.compute = kind;
        let named: HashMap<String, Tensor> = named.into_iter().collect();
        load_named(&mut vs, named, source)?;
        // The model's tensors are handles into the store's variables: they outlive the store.
        Ok(model)
    }

    /// Matmul kind: `Kind::BFloat16` / `Kind::Half` for mixed precision, or the parameters' kind.
    pub fn set_compute_kind(&mut self, k: Kind) {
        self.compute = k;
    }

    /// cos/sin `[t, hd]` of positions `start ..`, in the parameters' upcast kind on their device.
    fn rope_tables(&self, start: i64, t: i64) -> (Tensor, Tensor) {
        let kind = upcast_kind(self.embed_tokens.kind());
        self.rope.get(start, t, self.embed_tokens.device(), kind)
    }

    /// input_ids `[B, T]` int64 -> logits `[B, T, V]` (compute kind) and the summed aux loss.
    /// No attention mask: causal attention over the whole row, pads included (as MiniMind).
    /// With `cache`, the ids continue the cached positions (KV-cached decoding): their keys and
    /// values are appended and they attend to every cached position.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> ModelOutput {
        let (h, aux_loss) = self
            .run(input_ids, None, cache, &|_, _| Ok(()))
            .expect("a mark that does nothing cannot fail");
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
    /// loss. The training step applies the head chunk by chunk (train/trainer.rs).
    pub fn forward_hidden(&self, input_ids: &Tensor) -> (Tensor, Tensor) {
        self.forward_hidden_with(input_ids, None, &|_, _| Ok(()))
            .expect("a mark that does nothing cannot fail")
    }

    /// [`Self::forward_hidden`] over packed rows whose documents `seg_start` (int32 `[B, T]`, for
    /// every token the row index of its document's first token) keeps apart, calling `mark(i, f)`
    /// for every layer `i` with a tensor `f` whose gradient exists exactly when layers `i..` have
    /// backpropagated: the embedding's output for layer 0, and for `i >= 1` the output of layer
    /// `i - 1`'s feed-forward, which only layer `i`'s input norm reads (data parallel hooks them
    /// to start reducing those layers' gradients, parallel/overlap.rs).
    pub fn forward_hidden_with(
        &self,
        input_ids: &Tensor,
        seg_start: Option<&Tensor>,
        mark: Mark,
    ) -> Result<(Tensor, Tensor)> {
        self.run(input_ids, seg_start, None, mark)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        seg_start: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        mark: Mark,
    ) -> Result<(Tensor, Tensor)> {
        let mask = match (seg_start, self.causal) {
            (Some(s), true) => Mask::Segments(s),
            (None, true) => Mask::Causal,
            (_, false) => Mask::Bidirectional,
        };
        let (_, t) = input_ids.size2().expect("input_ids must be [B, T]");
        let device = self.embed_tokens.device();
        let start = cache.as_ref().map_or(0, |c| c.len() as i64);
        let (cos, sin) = self.rope_tables(start, t);
        let k = &self.kernels;
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        mark(0, &x)?;
        let mut aux = Tensor::zeros([], (upcast_kind(self.embed_tokens.kind()), device));
        // Each residual add happens in the norm that reads its sum (`add_forward_for_matmul`:
        // one kernel with the fused path), so a branch's output waits in `pending` until then.
        // Norms feeding projections may come out in bf16 straight from the fused kernel; a MoE
        // layer's norm also feeds its fp32 router (`MoeFeedForward::forward_after`).
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(f) = &pending {
                mark(i, f)?;
            }
            let (x1, n1) =
                layer
                    .input_layernorm
                    .add_forward_for_matmul(&x, pending.take(), self.compute, k);
            let pos = Positions {
                cos: &cos,
                sin: &sin,
                start,
                mask,
                cache: cache.as_deref_mut().map(|c| (c, i)),
            };
            let a = layer.self_attn.forward(&n1, pos, self.compute, k);
            let norm2 = &layer.post_attention_layernorm;
            let f = match &layer.mlp {
                FeedForward::Dense(m) => {
                    let (h, n2) = norm2.add_forward_for_matmul(&x1, Some(a), self.compute, k);
                    x = h;
                    m.forward_fused(&n2, self.compute, k)
                }
                FeedForward::Moe(m) => {
                    let (h, f, layer_aux) = m.forward_after(&x1, a, norm2, self.compute, k);
                    x = h;
                    aux = aux + layer_aux;
                    f
                }
            };
            pending = Some(f);
        }
        let (_, y) = self
            .norm
            .add_forward_for_matmul(&x, pending.take(), self.compute, k);
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
        let out = m.forward(&ids, None);
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
        let (a, b) = (m.forward(&ids, None).logits, m2.forward(&ids, None).logits);
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

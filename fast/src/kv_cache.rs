//! Inference forward with a key/value cache, for `fast generate` (and `export`'s checks).
//!
//! Runs MiniMind's decoder (dense or MoE, optional qk-norm) on named weights, without autograd:
//! `forward(ids [B,T], cache)` appends the new keys/values to `cache` and applies RoPE at positions
//! `cache.len() .. cache.len() + T`, so a prompt is run once and every new token costs one position.
//! With an empty cache and the whole sequence this is the plain full-recompute forward.
//! Eval-mode semantics: MoE routing is top-k with no aux loss.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// The architecture facts the forward needs (from the model config).
#[derive(Clone, Debug, PartialEq)]
pub struct Arch {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// FFN width actually built (each expert's, for MoE).
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub qk_norm: bool,
    /// `Some` for MoE models.
    pub moe: Option<MoeArch>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeArch {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
}

/// Keys and values of every layer for the positions seen so far: `[B, KV, S, hd]` each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        KvCache::default()
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map(|(k, _)| k.size()[2] as usize)
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A decoder ready for inference: weights on one device in one dtype, RoPE tables precomputed.
pub struct InferenceModel {
    pub arch: Arch,
    pub kind: Kind,
    pub device: Device,
    w: HashMap<String, Tensor>,
    cos: Tensor,
    sin: Tensor,
}

/// MiniMind's RoPE tables `[max_pos, hd]`: `[cos(t f), cos(t f)]`, computed in float32 as
/// MiniMind's `precompute_freqs_cis` does, then cast to `kind`.
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    max_pos: usize,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let exps = Tensor::arange_start_step(0, head_dim as i64, 2, opts) / head_dim as f64;
    let inv_freq = Tensor::pow_scalar(theta, &exps).reciprocal();
    let t = Tensor::arange(max_pos as i64, opts);
    let freqs = t.outer(&inv_freq);
    let cos = Tensor::cat(&[freqs.cos(), freqs.cos()], -1);
    let sin = Tensor::cat(&[freqs.sin(), freqs.sin()], -1);
    (
        cos.to_kind(kind).to_device(device),
        sin.to_kind(kind).to_device(device),
    )
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap() / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

impl InferenceModel {
    /// Every name the weights must provide for `arch`, with shapes (MiniMind state_dict names).
    pub fn expected_names(arch: &Arch) -> Vec<(String, Vec<i64>)> {
        let (d, v, hd) = (
            arch.hidden_size as i64,
            arch.vocab_size as i64,
            arch.head_dim as i64,
        );
        let (h, kv) = (
            arch.num_attention_heads as i64,
            arch.num_key_value_heads as i64,
        );
        let f = arch.intermediate_size as i64;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        let mlp = |out: &mut Vec<(String, Vec<i64>)>, p: String| {
            out.push((format!("{p}.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.down_proj.weight"), vec![d, f]));
            out.push((format!("{p}.up_proj.weight"), vec![f, d]));
        };
        for i in 0..arch.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![h * hd, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd]));
            if arch.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            match &arch.moe {
                None => mlp(&mut out, format!("{p}.mlp")),
                Some(m) => {
                    out.push((
                        format!("{p}.mlp.gate.weight"),
                        vec![m.n_routed_experts as i64, d],
                    ));
                    for e in 0..m.n_routed_experts {
                        mlp(&mut out, format!("{p}.mlp.experts.{e}"));
                    }
                    for e in 0..m.n_shared_experts {
                        mlp(&mut out, format!("{p}.mlp.shared_experts.{e}"));
                    }
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        out
    }

    /// Build from named weights (already checked by `weights::match_weights`), cast to `kind` on
    /// `device`.
    pub fn new(
        arch: Arch,
        weights: Vec<(String, Tensor)>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if arch.num_attention_heads % arch.num_key_value_heads != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                arch.num_attention_heads,
                arch.num_key_value_heads
            );
        }
        let w = weights
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(kind).to_device(device)))
            .collect();
        let (cos, sin) = rope_tables(
            arch.head_dim,
            arch.rope_theta,
            arch.max_position_embeddings,
            kind,
            device,
        );
        Ok(InferenceModel {
            arch,
            kind,
            device,
            w,
            cos,
            sin,
        })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.w
            .get(name)
            .with_context(|| format!("weight {name} is missing"))
    }

    /// Accumulation dtype: float32, or float64 when running in float64.
    fn acc_kind(&self) -> Kind {
        if self.kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        }
    }

    /// RMSNorm over the last dim, computed in float32 whatever the model dtype, exactly as
    /// MiniMind's `weight * self._norm(x.float()).type_as(x)` (even a float64 model normalises in
    /// float32; the golden float64 logits pin this).
    fn rms(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let r = (xf.square().mean_dim(-1, true, Kind::Float) + self.arch.rms_norm_eps).rsqrt();
        w * (xf * r).to_kind(self.kind)
    }

    fn mlp(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        let g = x.linear::<Tensor>(self.get(&format!("{p}.gate_proj.weight"))?, None);
        let u = x.linear::<Tensor>(self.get(&format!("{p}.up_proj.weight"))?, None);
        Ok((g.silu() * u).linear::<Tensor>(self.get(&format!("{p}.down_proj.weight"))?, None))
    }

    fn moe(&self, x: &Tensor, p: &str, m: &MoeArch) -> Result<Tensor> {
        let acc = self.acc_kind();
        let scores = x
            .linear::<Tensor>(self.get(&format!("{p}.gate.weight"))?, None)
            .softmax(-1, acc);
        let (mut top_w, top_i) = scores.topk(m.num_experts_per_tok as i64, -1, true, false);
        if m.num_experts_per_tok > 1 && m.norm_topk_prob {
            top_w = &top_w / (top_w.sum_dim_intlist(-1, true, acc) + 1e-20);
        }
        // Dense combine weights [.., n_routed]: zero except the chosen experts.
        let mut shape = scores.size();
        *shape.last_mut().unwrap() = m.n_routed_experts as i64;
        let combine = Tensor::zeros(&shape, (acc, x.device())).scatter(-1, &top_i, &top_w);
        let combine = combine.to_kind(self.kind);
        let mut y = x.zeros_like();
        for e in 0..m.n_routed_experts {
            let we = combine.narrow(-1, e as i64, 1);
            y += self.mlp(x, &format!("{p}.experts.{e}"))? * we;
        }
        for e in 0..m.n_shared_experts {
            y += self.mlp(x, &format!("{p}.shared_experts.{e}"))?;
        }
        Ok(y)
    }

    /// Logits `[B, T, V]` for `ids [B, T]` following the `cache.len()` cached positions; the new
    /// keys/values are appended to `cache`.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let a = &self.arch;
        let (b, t) = ids.size2().context("input ids must be [batch, time]")?;
        let start = cache.len() as i64;
        if (start + t) as usize > a.max_position_embeddings {
            bail!(
                "sequence of {} positions exceeds max_position_embeddings {}",
                start + t,
                a.max_position_embeddings
            );
        }
        let (h_, kv, hd) = (
            a.num_attention_heads as i64,
            a.num_key_value_heads as i64,
            a.head_dim as i64,
        );
        let n_rep = h_ / kv;
        let ids = ids.to_device(self.device);
        let mut h = Tensor::embedding(
            self.get("model.embed_tokens.weight")?,
            &ids,
            -1,
            false,
            false,
        );
        let cos = self.cos.narrow(0, start, t).view([1, 1, t, hd]);
        let sin = self.sin.narrow(0, start, t).view([1, 1, t, hd]);
        // Query i (absolute start + i) sees keys 0 ..= start + i.
        let total = start + t;
        let qpos = Tensor::arange_start(start, total, (Kind::Int64, self.device)).view([t, 1]);
        let kpos = Tensor::arange(total, (Kind::Int64, self.device)).view([1, total]);
        let masked = kpos.gt_tensor(&qpos);
        let scale = 1.0 / (hd as f64).sqrt();
        let fresh = cache.layers.is_empty();
        for i in 0..a.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let x = self.rms(&h, self.get(&format!("{p}.input_layernorm.weight"))?);
            let q = x
                .linear::<Tensor>(self.get(&format!("{p}.self_attn.q_proj.weight"))?, None)
                .view([b, t, h_, hd]);
            let k = x
                .linear::<Tensor>(self.get(&format!("{p}.self_attn.k_proj.weight"))?, None)
                .view([b, t, kv, hd]);
            let v = x
                .linear::<Tensor>(self.get(&format!("{p}.self_attn.v_proj.weight"))?, None)
                .view([b, t, kv, hd]);
            let (q, k) = if a.qk_norm {
                (
                    self.rms(&q, self.get(&format!("{p}.self_attn.q_norm.weight"))?),
                    self.rms(&k, self.get(&format!("{p}.self_attn.k_norm.weight"))?),
                )
            } else {
                (q, k)
            };
            let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
            let q = &q * &cos + rotate_half(&q) * &sin;
            let k = &k * &cos + rotate_half(&k) * &sin;
            let (k, v) = if fresh {
                cache.layers.push((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            } else {
                let (ck, cv) = &cache.layers[i];
                let k = Tensor::cat(&[ck, &k], 2);
                let v = Tensor::cat(&[cv, &v], 2);
                cache.layers[i] = (k.shallow_clone(), v.shallow_clone());
                (k, v)
            };
            // GQA: kv head j serves query heads j*n_rep .. (j+1)*n_rep - 1.
            let k = k.repeat_interleave_self_int(n_rep, 1, None);
            let v = v.repeat_interleave_self_int(n_rep, 1, None);
            let scores = q.matmul(&k.transpose(-2, -1)) * scale;
            let scores = scores.masked_fill(&masked, f64::NEG_INFINITY);
            let probs = scores.softmax(-1, self.acc_kind()).to_kind(self.kind);
            let o = probs
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, h_ * hd]);
            h = h + o.linear::<Tensor>(self.get(&format!("{p}.self_attn.o_proj.weight"))?, None);
            let x = self.rms(
                &h,
                self.get(&format!("{p}.post_attention_layernorm.weight"))?,
            );
            let y = match &a.moe {
                None => self.mlp(&x, &format!("{p}.mlp"))?,
                Some(m) => self.moe(&x, &format!("{p}.mlp"), m)?,
            };
            h = h + y;
        }
        let h = self.rms(&h, self.get("model.norm.weight")?);
        Ok(h.linear::<Tensor>(self.get("model.embed_tokens.weight")?, None))
    }
}

//! Grouped-query self-attention with RoPE (rotate-half) and optional qk-norm, causal, causal
//! within packed documents, or bidirectional, through libtorch's `scaled_dot_product_attention`
//! (flash / memory-efficient kernels on CUDA), or, on the fused bf16 CUDA path, our own kernels
//! (fast/csrc/attention.cu: head dims 64, 80, 96 and 128, every mask, the qk-norm fused).

use tch::{Kind, Tensor};

use super::{bf16_operand, expect, linear, rope, KvCache, RmsNorm};
use crate::kernels::{fused, AttentionPath, Kernels, MaskKind};

pub struct Attention {
    /// [H*hd, d]
    pub q_proj: Tensor,
    /// [KV*hd, d]
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    /// [d, H*hd]
    pub o_proj: Tensor,
    /// qk-norm over head_dim (MiniMind-3), before RoPE.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
}

/// repeat_kv (MiniMind): z `[B, kv, T, hd]` -> `[B, kv*n_rep, T, hd]`, kv head j serving query
/// heads j*n_rep .. (j+1)*n_rep - 1.
pub fn repeat_kv(z: Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return z;
    }
    let (b, kv, t, hd) = z.size4().expect("repeat_kv input must be [B, kv, T, hd]");
    z.unsqueeze(2)
        .expand([b, kv, n_rep, t, hd], false)
        .reshape([b, kv * n_rep, t, hd])
}

/// Which keys each query sees.
#[derive(Clone, Copy)]
pub enum Mask<'a> {
    /// Keys up to the query's own position (a causal LM).
    Causal,
    /// Causal within the query's document: int32 `[B, T]` gives every token the row index of its
    /// document's first token; RoPE positions restart there.
    Segments(&'a Tensor),
    /// Every key of the row (a masked LM).
    Bidirectional,
}

/// Where a forward's positions sit: the RoPE rows of positions `start ..`, the mask, and the
/// cache of the positions before `start` (decoding) if any.
pub struct Positions<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub start: i64,
    pub mask: Mask<'a>,
    pub cache: Option<(&'a mut KvCache, usize)>,
}

/// Segments: the RoPE rows of every token's position in its document, `[B, T, hd]`, and the
/// boolean mask `[B, 1, T, T]` of the keys each query sees (its document's, up to itself).
fn segment_tables(seg_start: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (b, t) = seg_start.size2().expect("seg_start must be [B, T]");
    let dev = seg_start.device();
    let start = seg_start.to_kind(Kind::Int64);
    let pos = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0) - &start; // [B, T]
    let gather = |tab: &Tensor| {
        let hd = tab.size()[1];
        tab.index_select(0, &pos.reshape([-1])).reshape([b, t, hd])
    };
    let keys = Tensor::arange(t, (Kind::Int64, dev)).view([1, 1, t]);
    let queries = Tensor::arange(t, (Kind::Int64, dev)).view([1, t, 1]);
    let seen = keys
        .le_tensor(&queries)
        .logical_and(&keys.ge_tensor(&start.unsqueeze(-1)));
    (gather(cos), gather(sin), seen.unsqueeze(1))
}

impl Attention {
    /// x `[B, T, d]` -> `[B, T, d]` in `compute` kind. Query head h reads kv head h / n_rep.
    /// With a cache in `pos`, this layer's new keys and values are appended to it and the queries
    /// attend to every cached position as well.
    pub fn forward(&self, x: &Tensor, pos: Positions, compute: Kind, k: &Kernels) -> Tensor {
        let (b, t, _) = x.size3().expect("attention input must be [B, T, d]");
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (cos, sin) = (pos.cos, pos.sin);
        if pos.cache.is_none() {
            let kind = match pos.mask {
                Mask::Causal => MaskKind::Causal,
                Mask::Segments(_) => MaskKind::Segments,
                Mask::Bidirectional => MaskKind::Bidirectional,
            };
            match k.attention_path(x, cos, hd, self.q_norm.is_some(), kind, compute) {
                AttentionPath::Libtorch => {}
                path => return self.forward_merged(x, cos, sin, pos.mask, path, k),
            }
        }
        // Segments: RoPE rows per token and the block-diagonal causal mask.
        let seg = match pos.mask {
            Mask::Segments(s) => Some(segment_tables(s, cos, sin)),
            _ => None,
        };
        let (cos, sin) = match &seg {
            Some((c, s, _)) => (c, s),
            None => (cos, sin),
        };
        // One cast of x for the three projections (autocast casts it per call; same values).
        let x = super::to_kind(x, compute);
        let mut q = linear(&x, &self.q_proj, compute).view([b, t, h, hd]);
        let mut kk = linear(&x, &self.k_proj, compute).view([b, t, kv, hd]);
        let v = linear(&x, &self.v_proj, compute).view([b, t, kv, hd]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q, k);
            kk = kn.forward(&kk, k);
        }
        let q = rope::apply(&q, cos, sin, compute).transpose(1, 2);
        let mut kk = rope::apply(&kk, cos, sin, compute).transpose(1, 2);
        let mut v = v.transpose(1, 2);
        if let Some((cache, layer)) = pos.cache {
            (kk, v) = cache.extend(layer, kk, v);
        }
        let n_rep = h / kv;
        let (kk, v) = (repeat_kv(kk, n_rep), repeat_kv(v, n_rep));
        match (&seg, pos.mask) {
            (Some((_, _, seen)), _) => self.attend_masked(&q, &kk, &v, Some(seen), b, t, compute),
            (None, Mask::Bidirectional) => self.attend_masked(&q, &kk, &v, None, b, t, compute),
            _ => self.attend(&q, &kk, &v, pos.start, b, t, compute),
        }
    }

    /// SDPA of q, k, v `[B, H, T, hd]` under an explicit boolean mask (`None`: every key), then
    /// o_proj: `[B, T, d]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_masked(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seen: Option<&Tensor>,
        b: i64,
        t: i64,
        compute: Kind,
    ) -> Tensor {
        let o = Tensor::scaled_dot_product_attention(q, k, v, seen, 0.0, false, None, false);
        let o = o
            .transpose(1, 2)
            .reshape([b, t, self.heads * self.head_dim]);
        linear(&o, &self.o_proj, compute)
    }

    /// The bf16 CUDA path with the fused kernels: q, k and v from one matmul against
    /// `cat([q_proj, k_proj, v_proj])`, then either our attention over that projection
    /// (`qkv_attention`: qk-norm, RoPE, GQA and the masked softmax in one node) or (causal, no
    /// qk-norm) one autograd node (`qkv_heads`) for RoPE (q, k) and repeat_kv (k, v), whose
    /// backward writes the merged projection's gradient directly, and cuDNN's SDPA.
    fn forward_merged(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Mask,
        path: AttentionPath,
        k: &Kernels,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("attention input must be [B, T, d]");
        let (h, kv) = (self.heads, self.kv_heads);
        let x = super::to_kind(x, Kind::BFloat16);
        let w_qkv = bf16_operand(&[&self.q_proj, &self.k_proj, &self.v_proj], k);
        let qkv = x.linear::<Tensor>(&w_qkv, None);
        if path == AttentionPath::Own {
            // The kernel reads fp32 norm weights: training keeps them fp32; weights loaded for
            // inference in bf16 are widened here ([head_dim] each).
            let norm_w = match (&self.q_norm, &self.k_norm) {
                (Some(q), Some(kn)) => Some((
                    super::to_kind(&q.weight, Kind::Float),
                    super::to_kind(&kn.weight, Kind::Float),
                    q.eps,
                )),
                _ => None,
            };
            let qk_norm = norm_w.as_ref().map(|(q, kn, eps)| fused::QkNorm {
                q,
                k: kn,
                eps: *eps,
            });
            let mask = match mask {
                Mask::Causal => fused::AttnMask::Causal,
                Mask::Segments(s) => fused::AttnMask::Segments(s),
                Mask::Bidirectional => fused::AttnMask::Bidirectional,
            };
            let o = expect(
                "qkv_attention",
                fused::qkv_attention(&qkv, cos, sin, h, kv, qk_norm, mask),
            );
            return o.linear::<Tensor>(&bf16_operand(&[&self.o_proj], k), None);
        }
        // [B, T, heads, hd] each from the kernel, read as [B, heads, T, hd] views: SDPA (cuDNN)
        // then lays out its output and gradients the same way, so the output's transpose back
        // to [B, T, d] below is a view, not a copy.
        let (q, kk, v) = expect("qkv_heads", fused::qkv_heads(&qkv, cos, sin, h, kv));
        let (q, kk, v) = (q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2));
        self.attend(&q, &kk, &v, 0, b, t, Kind::BFloat16)
    }

    /// SDPA of q `[B, H, T, hd]` (positions `start ..`) over k, v `[B, H, S, hd]` (positions
    /// `0 .. S`), causal, then o_proj: `[B, T, d]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: i64,
        b: i64,
        t: i64,
        compute: Kind,
    ) -> Tensor {
        let (h, hd) = (self.heads, self.head_dim);
        let s = k.size()[2];
        let o = if start == 0 && s == t {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, false)
        } else {
            // Query i (position start + i) sees keys 0 ..= start + i; one new position sees all.
            let mask = (t > 1).then(|| {
                let qpos = Tensor::arange_start(start, start + t, (Kind::Int64, q.device()));
                let kpos = Tensor::arange(s, (Kind::Int64, q.device()));
                kpos.unsqueeze(0).le_tensor(&qpos.unsqueeze(1))
            });
            Tensor::scaled_dot_product_attention(q, k, v, mask.as_ref(), 0.0, false, None, false)
        };
        let o = o.transpose(1, 2).reshape([b, t, h * hd]);
        linear(&o, &self.o_proj, compute)
    }
}

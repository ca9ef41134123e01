//! Causal grouped-query self-attention with RoPE (rotate-half) and optional qk-norm, through
//! libtorch's `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA), or, on
//! the fused bf16 CUDA path with head dim 64, our own kernels (fast/csrc/attention.cu).

use tch::{Kind, Tensor};

use super::{linear, RmsNorm};

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

/// `[-x2, x1]` over the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("non-empty shape") / 2;
    Tensor::cat(&[x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)], -1)
}

/// `x * cos + rotate_half(x) * sin` in the tables' kind, cast back to `out` kind.
/// x `[B, T, nh, hd]`, tables `[T, hd]`. A bf16 x times fp32 tables computes in fp32 by type
/// promotion (as MiniMind's RoPE under autocast does), and autograd keeps x and rotate_half(x)
/// in bf16: half the memory of upcasting x first, same values.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, out: Kind) -> Tensor {
    let (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1));
    let y = x * c + rotate_half(x) * s;
    if y.kind() == out {
        y
    } else {
        y.to_kind(out)
    }
}

/// repeat_kv (MiniMind): z `[B, kv, T, hd]` -> `[B, kv*n_rep, T, hd]`, kv head j serving query
/// heads j*n_rep .. (j+1)*n_rep - 1.
pub(crate) fn repeat_kv(z: Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return z;
    }
    let (b, kv, t, hd) = z.size4().expect("repeat_kv input must be [B, kv, T, hd]");
    z.unsqueeze(2)
        .expand([b, kv, n_rep, t, hd], false)
        .reshape([b, kv * n_rep, t, hd])
}

impl Attention {
    /// x `[B, T, d]` -> `[B, T, d]` in `compute` kind. Query head h reads kv head h / n_rep.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, compute: Kind) -> Tensor {
        let (b, t, _) = x.size3().expect("attention input must be [B, T, d]");
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        if self.q_norm.is_none()
            && compute == Kind::BFloat16
            && x.device().is_cuda()
            && cos.kind() == Kind::Float
            && hd % 16 == 0
            && super::fused::enabled()
        {
            return self.forward_fused(x, cos, sin, compute);
        }
        // One cast of x for the three projections (autocast casts it per call; same values).
        let x = super::to_kind(x, compute);
        let mut q = linear(&x, &self.q_proj, compute).view([b, t, h, hd]);
        let mut k = linear(&x, &self.k_proj, compute).view([b, t, kv, hd]);
        let v = linear(&x, &self.v_proj, compute).view([b, t, kv, hd]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let q = rope(&q, cos, sin, compute).transpose(1, 2);
        let k = rope(&k, cos, sin, compute).transpose(1, 2);
        let v = v.transpose(1, 2);
        let n_rep = h / kv;
        let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
        self.attend(&q, &k, &v, b, t, compute)
    }

    /// The bf16 CUDA path with the fused kernels (no qk-norm): q, k and v from one matmul
    /// against `cat([q_proj, k_proj, v_proj])`, then, for head dim 64, our attention over that
    /// projection (`qkv_attention`: RoPE, GQA and the causal softmax in one node); otherwise one
    /// autograd node (`qkv_heads`) for RoPE (q, k) and repeat_kv (k, v), whose backward writes
    /// the merged projection's gradient directly, and cuDNN's SDPA.
    fn forward_fused(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, compute: Kind) -> Tensor {
        let (b, t, _) = x.size3().expect("attention input must be [B, T, d]");
        let (h, kv) = (self.heads, self.kv_heads);
        let x = super::to_kind(x, compute);
        let w_qkv = super::fused::bf16_weight(&[&self.q_proj, &self.k_proj, &self.v_proj]);
        let qkv = x.linear::<Tensor>(&w_qkv, None);
        if self.head_dim == 64 && b <= 65_535 && super::fused::attention_enabled() {
            let o = super::fused::expect(
                "qkv_attention",
                super::fused::qkv_attention(&qkv, cos, sin, h, kv),
            );
            return o.linear::<Tensor>(&super::fused::bf16_weight(&[&self.o_proj]), None);
        }
        // [B, T, heads, hd] each from the kernel, read as [B, heads, T, hd] views: SDPA (cuDNN)
        // then lays out its output and gradients the same way, so the output's transpose back
        // to [B, T, d] below is a view, not a copy.
        let (q, k, v) =
            super::fused::expect("qkv_heads", super::fused::qkv_heads(&qkv, cos, sin, h, kv));
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        self.attend(&q, &k, &v, b, t, compute)
    }

    /// Causal SDPA over q, k, v `[B, H, T, hd]`, then o_proj: `[B, T, d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, b: i64, t: i64, compute: Kind) -> Tensor {
        let (h, hd) = (self.heads, self.head_dim);
        let o =
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, false);
        let o = o.transpose(1, 2).reshape([b, t, h * hd]);
        linear(&o, &self.o_proj, compute)
    }
}

//! `fused.rs` in a binary built without `--features cuda`: the same functions, each an error
//! saying so. [`super::Kernels`] never asks for them in such a build; the error is for a caller
//! that does anyway.
use anyhow::Result;
use tch::Tensor;

fn unavailable(op: &str) -> anyhow::Error {
    anyhow::anyhow!("{op}: the fused kernels need a build with --features cuda")
}

pub fn rms_norm_bf16(_x: &Tensor, _w: &Tensor, _eps: f64) -> Result<Tensor> {
    Err(unavailable("rms_norm_bf16"))
}

pub fn add_rms_norm_bf16(
    _x: &Tensor,
    _a: &Tensor,
    _w: &Tensor,
    _eps: f64,
) -> Result<(Tensor, Tensor)> {
    Err(unavailable("add_rms_norm_bf16"))
}

pub use super::MoeNormRouter;

pub fn moe_norm_router(
    _x: &Tensor,
    _a: &Tensor,
    _w: &Tensor,
    _wg: &Tensor,
    _eps: f64,
    _copies: i64,
) -> Result<MoeNormRouter> {
    Err(unavailable("moe_norm_router"))
}

pub fn moe_combine(_ys: &Tensor, _slot: &Tensor, _w: &Tensor) -> Result<Tensor> {
    Err(unavailable("moe_combine"))
}

pub fn qkv_heads(
    _qkv: &Tensor,
    _cos: &Tensor,
    _sin: &Tensor,
    _heads: i64,
    _kv_heads: i64,
) -> Result<(Tensor, Tensor, Tensor)> {
    Err(unavailable("qkv_heads"))
}

pub fn weights_bf16(_ws: &[&Tensor]) -> Result<Tensor> {
    Err(unavailable("weights_bf16"))
}

pub fn add_bf16_(_acc: &Tensor, _g: &Tensor) -> Result<()> {
    Err(unavailable("add_bf16_"))
}

/// Which keys each query of [`qkv_attention`] sees (as in `fused.rs`).
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    Causal,
    Segments(&'a Tensor),
    Bidirectional,
}

/// MiniMind-3's q/k RMSNorm before RoPE (as in `fused.rs`).
#[derive(Clone, Copy, Debug)]
pub struct QkNorm<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub eps: f64,
}

pub fn qkv_attention(
    _qkv: &Tensor,
    _cos: &Tensor,
    _sin: &Tensor,
    _heads: i64,
    _kv_heads: i64,
    _qk_norm: Option<QkNorm>,
    _mask: AttnMask,
) -> Result<Tensor> {
    Err(unavailable("qkv_attention"))
}

pub fn swiglu(_gu: &Tensor, _f: i64) -> Result<Tensor> {
    Err(unavailable("swiglu"))
}

pub fn grouped_experts(
    _x: &Tensor,
    _token: &Tensor,
    _slot: &Tensor,
    _gate_up: &Tensor,
    _down: &Tensor,
    _offs: &Tensor,
    _recompute_gate_up: bool,
) -> Result<Tensor> {
    Err(unavailable("grouped_experts"))
}

pub fn cross_entropy_bf16(_logits: &Tensor, _labels: &Tensor, _seed: &Tensor) -> Result<Tensor> {
    Err(unavailable("cross_entropy_bf16"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `--features cuda` the ops say why they cannot run.
    #[test]
    fn cpu_build_ops_name_the_missing_feature() {
        let x = Tensor::zeros([2, 8], (tch::Kind::Float, tch::Device::Cpu));
        let err = rms_norm_bf16(&x, &x.get(0), 1e-5).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        let qkv = Tensor::zeros([1, 4, 12 * 64], (tch::Kind::BFloat16, tch::Device::Cpu));
        let cs = Tensor::zeros([4, 64], (tch::Kind::Float, tch::Device::Cpu));
        let err = qkv_attention(&qkv, &cs, &cs, 8, 2, None, AttnMask::Causal)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("qkv_attention") && err.contains("--features cuda"),
            "{err}"
        );
    }
}

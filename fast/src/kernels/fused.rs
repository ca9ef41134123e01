//! Our own fused CUDA kernels (fast/csrc/kernels.cu, as autograd functions in
//! fast/csrc/fused_ops.cpp) for the bf16 training step: the unfused step spends most of its time
//! in element-wise passes over `[B*T, d]` and `[B*T, F]` tensors, and each of these ops replaces
//! several of them (forward and backward).
//!
//! - [`rms_norm_bf16`]: RMSNorm of the fp32 residual stream written straight to bf16 (norm + the
//!   projection's cast), fp32 gradients back.
//! - [`add_rms_norm_bf16`]: the residual add before a norm fused into it (h = x + a and the
//!   norm of h in one pass; backward adds the residual stream's gradient in the same pass).
//! - [`moe_norm_router`]: a MoE layer's entry: that add and norm, whose fp32 output also gives
//!   the router's logits and (for shared experts) a second bf16 copy, in the same pass.
//! - [`qkv_heads`]: over the merged q/k/v projection, one pass per block for RoPE, repeat_kv and
//!   the `[B, T, nh, hd] -> [B, T, nh*n_rep, hd]` layout (v: layout and repeat only); backward
//!   writes the merged projection's gradient.
//! - [`weights_bf16`]: the merged bf16 operand of a projection from its fp32 weights; backward
//!   adds the gradient into each weight's `.grad` in place ([`add_bf16_`]).
//! - [`qkv_attention`]: attention of our own over the merged q/k/v projection (head dim 64, 80,
//!   96 or 128; causal, causal within packed segments, or bidirectional; optional q/k RMSNorm; RoPE
//!   on load, kv heads read once per group, the merged projection's gradient written directly);
//!   replaces `qkv_heads` + cuDNN's SDPA.
//! - [`swiglu`]: `silu(g) * u` over a merged `[g | u]` projection, rounding as autocast's
//!   unfused ops do.
//! - [`grouped_experts`]: a MoE layer's routed experts (gather, grouped gate/up matmul, SwiGLU,
//!   grouped down matmul) as one node whose backward recomputes the gathered rows and the SwiGLU
//!   output (optionally the gate/up projection too) rather than keeping them.
//! - [`moe_combine`]: a MoE layer's experts' outputs weighted and summed back per token in one
//!   pass (and one backward pass), where a gather, a multiply and a sum are three.
//! - [`cross_entropy_bf16`]: the chunked lm_head's cross-entropy forward and backward in one
//!   kernel (fast/csrc/cross_entropy.cu) over bf16 logits, the bf16 gradient written over them;
//!   not an autograd function: the training step calls it under no_grad (step.rs).
//!
//! Which of them run is decided by [`super::Kernels`]; the libtorch path stays the CPU path and
//! the fallback. Without `--features cuda` this module is `fused_stub.rs`, whose functions
//! return an error.

use anyhow::Result;
use tch::Tensor;

use super::ops::{call_node3, check};
pub use super::MoeNormRouter;

mod ffi {
    use std::ffi::c_char;
    use torch_sys::C_tensor;

    extern "C" {
        pub fn mm_rms_norm_bf16(
            x: *mut C_tensor,
            w: *mut C_tensor,
            eps: f64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn mm_add_rms_norm_bf16(
            x: *mut C_tensor,
            a: *mut C_tensor,
            w: *mut C_tensor,
            eps: f64,
            h: *mut *mut C_tensor,
            y: *mut *mut C_tensor,
        ) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn mm_moe_norm_router(
            x: *mut C_tensor,
            a: *mut C_tensor,
            w: *mut C_tensor,
            wg: *mut C_tensor,
            eps: f64,
            copies: i64,
            h: *mut *mut C_tensor,
            y: *mut *mut C_tensor,
            y2: *mut *mut C_tensor,
            logits: *mut *mut C_tensor,
        ) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn mm_qkv_heads(
            qkv: *mut C_tensor,
            cos: *mut C_tensor,
            sin: *mut C_tensor,
            heads: i64,
            kv_heads: i64,
            q: *mut *mut C_tensor,
            k: *mut *mut C_tensor,
            v: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn mm_weights_bf16(
            ws: *const *mut C_tensor,
            n: i64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn mm_add_bf16_(acc: *mut C_tensor, g: *mut C_tensor) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn mm_qkv_attention(
            qkv: *mut C_tensor,
            cos: *mut C_tensor,
            sin: *mut C_tensor,
            heads: i64,
            kv_heads: i64,
            q_norm: *mut C_tensor,
            k_norm: *mut C_tensor,
            eps: f64,
            mask: i64,
            seg_start: *mut C_tensor,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn mm_swiglu(gu: *mut C_tensor, f: i64, out: *mut *mut C_tensor) -> *mut c_char;
        pub fn mm_grouped_experts(
            x: *mut C_tensor,
            token: *mut C_tensor,
            slot: *mut C_tensor,
            gate_up: *mut C_tensor,
            down: *mut C_tensor,
            offs: *mut C_tensor,
            recompute_gate_up: i64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn mm_moe_combine(
            ys: *mut C_tensor,
            slot: *mut C_tensor,
            w: *mut C_tensor,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn mm_ce_fwd_bwd(
            logits: *mut C_tensor,
            labels: *mut C_tensor,
            seed: *mut C_tensor,
            loss_sum: *mut *mut C_tensor,
        ) -> *mut c_char;
    }
}

fn ptr(t: &Tensor) -> *mut torch_sys::C_tensor {
    t.as_ptr() as *mut torch_sys::C_tensor
}

/// `bf16(w * (x * rsqrt(mean(x^2) + eps)))` over the last dimension, in fp32 with one rounding;
/// x fp32 `[..., d]` on CUDA (d a multiple of 8, at most 1024), w fp32 `[d]`. Differentiable in
/// x and w (fp32 gradients).
pub fn rms_norm_bf16(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    check("rms_norm_bf16", unsafe {
        ffi::mm_rms_norm_bf16(ptr(x), ptr(w), eps, &mut out)
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// The residual add and the next norm in one kernel: x fp32, a bf16 (an attention or MLP output)
/// `[..., d]` -> (h = x + a in fp32, [`rms_norm_bf16`] of h). Differentiable in x, a and w;
/// backward sums h's two gradients (residual stream and norm) in the same pass.
pub fn add_rms_norm_bf16(x: &Tensor, a: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (mut h, mut y) = (std::ptr::null_mut(), std::ptr::null_mut());
    check("add_rms_norm_bf16", unsafe {
        ffi::mm_add_rms_norm_bf16(ptr(x), ptr(a), ptr(w), eps, &mut h, &mut y)
    })?;
    Ok(unsafe { (Tensor::from_ptr(h), Tensor::from_ptr(y)) })
}

/// A MoE layer's entry in one kernel: [`add_rms_norm_bf16`] (x fp32, a bf16 `[..., d]`, norm
/// weight w fp32 `[d]`) whose fp32 norm n also gives the router's logits `n wg^T` (wg fp32
/// `[E, d]`, E <= 16) and, with `copies` 2, a second bf16 copy for the shared experts (their
/// gradient and the routed experts' then meet in fp32 in the backward kernel). Differentiable in
/// x, a, w and wg.
pub fn moe_norm_router(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    wg: &Tensor,
    eps: f64,
    copies: i64,
) -> Result<MoeNormRouter> {
    let mut o = [std::ptr::null_mut(); 4];
    let [h, y, y2, logits] = &mut o;
    check("moe_norm_router", unsafe {
        ffi::mm_moe_norm_router(
            ptr(x),
            ptr(a),
            ptr(w),
            ptr(wg),
            eps,
            copies,
            h,
            y,
            y2,
            logits,
        )
    })?;
    let [h, y, y2, logits] = o.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok(MoeNormRouter {
        h,
        y,
        y2: (copies == 2).then_some(y2),
        logits,
    })
}

/// A MoE layer's weighted combine in one kernel: the experts' outputs ys bf16 `[N k, d]` (sorted
/// by expert; d a multiple of 8), slot int64 `[N k]` (the sorted row of pair `t k + s`, a
/// permutation as the dispatch makes it), the routing weights w fp32 `[N, k]` -> `[N, d]` bf16,
/// `sum_s w[t, s] ys[slot[t k + s]]` in fp32 with one rounding. Differentiable in ys and w.
pub fn moe_combine(ys: &Tensor, slot: &Tensor, w: &Tensor) -> Result<Tensor> {
    call_node3("moe_combine", ffi::mm_moe_combine, ys, slot, w)
}

/// The merged projection qkv bf16 `[B, T, (heads + 2 kv_heads) hd]` -> (q, k, v), each bf16
/// `[B, T, heads, hd]` contiguous: its three column blocks with RoPE (q, k; computed in fp32 with
/// fp32 tables cos/sin `[T, hd]`, one rounding) and repeated for their query heads (k, v; query
/// head `h*n_rep + r` reads kv head h) as one autograd node, whose backward writes one
/// `[B, T, (heads + 2 kv_heads) hd]` gradient (no cat of three). Differentiable in qkv.
pub fn qkv_heads(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: i64,
    kv_heads: i64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut q, mut k, mut v) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    check("qkv_heads", unsafe {
        ffi::mm_qkv_heads(
            ptr(qkv),
            ptr(cos),
            ptr(sin),
            heads,
            kv_heads,
            &mut q,
            &mut k,
            &mut v,
        )
    })?;
    Ok(unsafe {
        (
            Tensor::from_ptr(q),
            Tensor::from_ptr(k),
            Tensor::from_ptr(v),
        )
    })
}

/// fp32 weights `[rows_i, d]` -> one bf16 `[sum rows_i, d]` (their cat, cast): a projection's
/// matmul operand. Differentiable; in the training backward its node adds the bf16 gradient into
/// each weight's fp32 `.grad` in place ([`add_bf16_`]'s kernel, instead of the cast's backward,
/// a temporary and AccumulateGrad's add), and returns fp32 gradients otherwise.
pub fn weights_bf16(ws: &[&Tensor]) -> Result<Tensor> {
    let ptrs: Vec<*mut torch_sys::C_tensor> = ws.iter().map(|w| ptr(w)).collect();
    let mut out = std::ptr::null_mut();
    check("weights_bf16", unsafe {
        ffi::mm_weights_bf16(ptrs.as_ptr(), ptrs.len() as i64, &mut out)
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `acc += g` in place, acc fp32 and g bf16 of one shape (a bf16 gradient into an fp32 `.grad`):
/// one vectorized kernel on CUDA where both are contiguous, libtorch's `add_` otherwise; the same
/// values either way (g widened to fp32, one fp32 add). Outside autograd.
pub fn add_bf16_(acc: &Tensor, g: &Tensor) -> Result<()> {
    check("add_bf16_", unsafe { ffi::mm_add_bf16_(ptr(acc), ptr(g)) })
}

/// Which keys each query of [`qkv_attention`] sees.
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    /// Key j visible to query i iff `j <= i`; RoPE positions t.
    Causal,
    /// Packed rows: int32 `seg_start [B, T]` gives, for every token, the row index of the first
    /// token of its segment (non-decreasing within a row, `seg_start[t] <= t`, equal within a
    /// segment). Key j visible to query i iff `seg_start[i] <= j <= i`; RoPE position
    /// `t - seg_start[t]`. Not validated on the device (a host synchronisation): out-of-contract
    /// values give wrong numbers, never an out-of-bounds read.
    Segments(&'a Tensor),
    /// Every key of the row visible to every query (masked LM); RoPE positions t.
    Bidirectional,
}

/// MiniMind-3's q/k RMSNorm before RoPE: fp32 weights `[head_dim]` (differentiable), eps.
#[derive(Clone, Copy, Debug)]
pub struct QkNorm<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub eps: f64,
}

/// Attention straight from the merged projection qkv bf16 `[B, T, (heads + 2 kv_heads) hd]`
/// (hd 64, 80, 96 or 128) -> o bf16 `[B, T, heads * hd]` (fast/csrc/attention.cu): with `qk_norm`,
/// each head vector of q and k first becomes `w * x * rsqrt(mean(x^2) + eps)` (fp32); q and k
/// RoPE'd as [`qkv_heads`] does it (fp32 tables cos/sin `[T, hd]` indexed by position, one
/// rounding to bf16), query head h reading kv head `h / (heads / kv_heads)`, softmax scale
/// `1 / sqrt(hd)`, keys as `mask` says; flash attention's algorithm with fp32 accumulators and
/// bf16 P and dS. What the split views, the norm, RoPE, repeat_kv and SDPA compute, up to bf16
/// rounding, with no q/k/v copies and one node. Differentiable in qkv and the norm weights
/// (their gradients summed in a fixed order: the same bits run to run).
pub fn qkv_attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: i64,
    kv_heads: i64,
    qk_norm: Option<QkNorm>,
    mask: AttnMask,
) -> Result<Tensor> {
    let null = std::ptr::null_mut();
    let (q_norm, k_norm, eps) = match qk_norm {
        Some(n) => (ptr(n.q), ptr(n.k), n.eps),
        None => (null, null, 0.0),
    };
    // mm::AttnMask (fast/csrc/kernels.h).
    let (code, seg_start) = match mask {
        AttnMask::Causal => (0, null),
        AttnMask::Segments(s) => (1, ptr(s)),
        AttnMask::Bidirectional => (2, null),
    };
    let mut out = std::ptr::null_mut();
    check("qkv_attention", unsafe {
        ffi::mm_qkv_attention(
            ptr(qkv),
            ptr(cos),
            ptr(sin),
            heads,
            kv_heads,
            q_norm,
            k_norm,
            eps,
            code,
            seg_start,
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// gu bf16 `[..., 2F]` = `[g | u]` -> bf16 `[..., F]` = `bf16(bf16(silu(g)) * u)`. F a multiple
/// of 8. Differentiable in gu.
pub fn swiglu(gu: &Tensor, f: i64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    check("swiglu", unsafe { ffi::mm_swiglu(ptr(gu), f, &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// [`super::ops::grouped_experts`] with our SwiGLU kernels: the same node (gather, grouped
/// gate/up, SwiGLU, grouped down; backward recomputing the gathered rows and the SwiGLU output,
/// with `recompute_gate_up` the gate/up projection too), all bf16 on CUDA.
pub fn grouped_experts(
    x: &Tensor,
    token: &Tensor,
    slot: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offs: &Tensor,
    recompute_gate_up: bool,
) -> Result<Tensor> {
    super::ops::call_grouped_experts(
        ffi::mm_grouped_experts,
        x,
        token,
        slot,
        gate_up,
        down,
        offs,
        recompute_gate_up,
    )
}

/// Cross-entropy forward and backward in one pass over `logits` bf16 `[N, V]` (contiguous, not
/// requiring grad), labels int64 `[N]` (-100 ignored), `seed` an fp32 scalar on the device.
/// Returns the sum of the rows' losses (fp32 0-dim, unscaled) and overwrites `logits` **in place**
/// with the bf16 gradient of `seed * that sum`: `bf16((softmax(x) - onehot(label)) * seed)` per
/// counted row, zeros for ignored rows. What autograd gives for `cross_entropy(logits.float(),
/// labels, Sum, -100) * seed` and the cast back to bf16, up to the order of fp32 sums. A label
/// outside `[0, V)` other than -100 counts as ignored (libtorch raises a device-side assert
/// there; the kernel cannot report it without a host synchronisation). No host synchronisation,
/// so it can be captured in a CUDA graph.
pub fn cross_entropy_bf16(logits: &Tensor, labels: &Tensor, seed: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    check("cross_entropy_bf16", unsafe {
        ffi::mm_ce_fwd_bwd(ptr(logits), ptr(labels), ptr(seed), &mut out)
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

//! Safe wrappers over fast/csrc/ops.cpp: libtorch's multi-tensor kernels (fused AdamW, foreach
//! norm/mul, AMP unscale), `.grad` as a given view, and a backward seeded with given gradients,
//! none of which tch's generated API exposes. One launch (or a few) per step instead of several
//! per parameter, and no host synchronisation.
use anyhow::{anyhow, Result};
use std::ffi::{c_char, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn mm_free_error(e: *mut c_char);
    fn mm_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: i64,
        lr: *mut C_tensor,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *mut C_tensor,
        found_inf: *mut C_tensor,
    ) -> *mut c_char;
    fn mm_clip_grad_norm(
        grads: *const *mut C_tensor,
        n: i64,
        max_norm: f64,
        total_out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mm_foreach_scale_sub(
        params: *const *mut C_tensor,
        updates: *const *mut C_tensor,
        n: i64,
        factor: *mut C_tensor,
    ) -> *mut c_char;
    fn mm_unscale(
        grads: *const *mut C_tensor,
        n: i64,
        found_inf: *mut C_tensor,
        inv_scale: *mut C_tensor,
    ) -> *mut c_char;
    fn mm_pin_memory(t: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn mm_host_read_start(
        src: *mut C_tensor,
        dst: *mut C_tensor,
        event_out: *mut *mut std::ffi::c_void,
    ) -> *mut c_char;
    fn mm_host_read_wait(event: *mut std::ffi::c_void) -> *mut c_char;
    fn mm_host_read_free(event: *mut std::ffi::c_void);
    fn mm_set_grad(p: *mut C_tensor, g: *mut C_tensor) -> *mut c_char;
    fn mm_backward(ts: *const *mut C_tensor, gs: *const *mut C_tensor, n: i64) -> *mut c_char;
    fn mm_grouped_experts_ops(
        x: *mut C_tensor,
        token: *mut C_tensor,
        slot: *mut C_tensor,
        gate_up: *mut C_tensor,
        down: *mut C_tensor,
        offs: *mut C_tensor,
        recompute_gate_up: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mm_linear_saving_rounded(
        x: *mut C_tensor,
        rounded: *mut C_tensor,
        w: *mut C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mm_slot_rows(
        x: *mut C_tensor,
        token: *mut C_tensor,
        slot: *mut C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mm_permute_rows(
        x: *mut C_tensor,
        idx: *mut C_tensor,
        inv: *mut C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// MoE's dispatch under autograd: `x[token]` (x `[N, d]`, token int64 `[N k]`, the (token,
/// slot) pairs sorted by expert; slot `[N k]` its inverse, pair `t k + s` at row `slot[t k +
/// s]`). Backward sums each token's k slot gradients in one reduction (a gather by `slot`, no
/// atomics: the same numbers on every run) where `index_select`'s backward adds them with atomics.
pub fn slot_rows(x: &Tensor, token: &Tensor, slot: &Tensor) -> Result<Tensor> {
    call_node3("slot_rows", mm_slot_rows, x, token, slot)
}

/// `x[idx]` under autograd for a permutation idx of x's rows (`[M, d]`, idx and its inverse inv
/// int64 `[M]`): backward is the gather `dy[inv]`, where `index_select`'s backward adds with
/// atomics. MoE's combine: the experts' rows back in (token, slot) order.
pub fn permute_rows(x: &Tensor, idx: &Tensor, inv: &Tensor) -> Result<Tensor> {
    call_node3("permute_rows", mm_permute_rows, x, idx, inv)
}

/// A C entry point of a node of three tensors and one output (ops.cpp, fused_ops.cpp).
pub(crate) type Node3Entry = unsafe extern "C" fn(
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    *mut *mut C_tensor,
) -> *mut c_char;

/// Calls `entry` on (a, b, c) and returns its output; errors name `what`.
pub(crate) fn call_node3(
    what: &str,
    entry: Node3Entry,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> Result<Tensor> {
    let p = |t: &Tensor| t.as_ptr() as *mut C_tensor;
    let mut out = std::ptr::null_mut();
    check(what, unsafe { entry(p(a), p(b), p(c), &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `torch.autograd.backward(tensors, grads)`: one backward pass seeded with the given gradients.
pub fn backward(tensors: &[Tensor], grads: &[Tensor]) -> Result<()> {
    anyhow::ensure!(
        tensors.len() == grads.len(),
        "backward: {} tensors, {} gradients",
        tensors.len(),
        grads.len()
    );
    let (t, g) = (ptrs(tensors), ptrs(grads));
    check("backward", unsafe {
        mm_backward(t.as_ptr(), g.as_ptr(), tensors.len() as i64)
    })
}

/// `x w^T` (x `[N, d]`, w `[E, d]`, one kind) under autograd, keeping for backward `rounded`
/// (x's values in a narrower kind, `[N, d]`, held by the caller anyway) instead of x: the input
/// gradient is exact, the weight gradient is `dy^T rounded` (upcast), as a projection's under
/// mixed precision; `rounded` gets no gradient from it. MoE's fp32 router on the bf16 rows its
/// experts read.
pub fn linear_saving_rounded(x: &Tensor, rounded: &Tensor, w: &Tensor) -> Result<Tensor> {
    call_node3(
        "linear_saving_rounded",
        mm_linear_saving_rounded,
        x,
        rounded,
        w,
    )
}

/// A MoE layer's routed SwiGLU experts as one autograd node (fast/csrc/grouped_experts.h), the
/// SwiGLU as libtorch's ops (any kind, any device): `xs = x[token]`, `h = silu(g) * u` of
/// `[g | u] = xs gate_up[e]^T`, `y = h down[e]^T` `[M, d]`, expert e on rows `offs[e-1] ..
/// offs[e]` (int32 cumulative ends), each projection one `torch._grouped_mm`. x `[N, d]`, token
/// and slot int64 `[M]` (M = N k; slot as in [`slot_rows`]), gate_up `[E, 2F, d]`, down `[E, d,
/// F]`, one kind. Differentiable in x and both weights; backward recomputes the gathered rows
/// and h (with `recompute_gate_up` the gate/up projection too) instead of keeping them, and sums
/// dx per token as [`slot_rows`] does. `fused::grouped_experts` is the same node with our SwiGLU
/// kernels.
pub fn grouped_experts(
    x: &Tensor,
    token: &Tensor,
    slot: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offs: &Tensor,
    recompute_gate_up: bool,
) -> Result<Tensor> {
    call_grouped_experts(
        mm_grouped_experts_ops,
        x,
        token,
        slot,
        gate_up,
        down,
        offs,
        recompute_gate_up,
    )
}

/// A C entry point of the experts node: `mm_grouped_experts_ops` (ops.cpp) or, in `fused`,
/// `mm_grouped_experts` (fused_ops.cpp, our SwiGLU kernels).
pub(crate) type GroupedExpertsEntry = unsafe extern "C" fn(
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    *mut C_tensor,
    i64,
    *mut *mut C_tensor,
) -> *mut c_char;

/// Calls `entry` on (x, token, slot, gate_up, down, offs, recompute_gate_up) and returns its
/// output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn call_grouped_experts(
    entry: GroupedExpertsEntry,
    x: &Tensor,
    token: &Tensor,
    slot: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offs: &Tensor,
    recompute_gate_up: bool,
) -> Result<Tensor> {
    let p = |t: &Tensor| t.as_ptr() as *mut C_tensor;
    let mut out = std::ptr::null_mut();
    check("grouped_experts", unsafe {
        entry(
            p(x),
            p(token),
            p(slot),
            p(gate_up),
            p(down),
            p(offs),
            recompute_gate_up as i64,
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `p.grad = g`: the parameter's gradient becomes `g` (same shape, kind and device), e.g. a view
/// into one flat buffer; backward then accumulates into it in place.
pub fn set_grad(p: &Tensor, g: &Tensor) -> Result<()> {
    check("set_grad", unsafe {
        mm_set_grad(p.as_ptr() as *mut C_tensor, g.as_ptr() as *mut C_tensor)
    })
}

/// A copy of CPU tensor `t` in page-locked memory (needs a CUDA-capable libtorch and device).
pub fn pin_memory(t: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    check("pin_memory", unsafe {
        mm_pin_memory(t.as_ptr() as *mut C_tensor, &mut out)
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// A small device tensor on its way to the host: [`HostRead::start`] queues a non-blocking copy
/// into pinned memory behind the work queued so far, [`HostRead::wait`] waits for that copy only,
/// not for work queued after it. So a training loop can read step n's flag while step n + 1 runs
/// (`f64::try_from(t.sum())` would queue the sum behind step n + 1 and wait for all of it).
pub struct HostRead {
    host: Tensor,
    event: *mut std::ffi::c_void,
}

impl HostRead {
    pub fn start(src: &Tensor) -> Result<HostRead> {
        let empty = Tensor::f_empty(src.size(), (src.kind(), tch::Device::Cpu))?;
        let host = if src.device().is_cuda() {
            pin_memory(&empty)?
        } else {
            empty
        };
        let mut event = std::ptr::null_mut();
        check("host read", unsafe {
            mm_host_read_start(
                src.as_ptr() as *mut C_tensor,
                host.as_ptr() as *mut C_tensor,
                &mut event,
            )
        })?;
        Ok(HostRead { host, event })
    }

    /// The values, once the copy has landed (a CPU tensor).
    pub fn wait(mut self) -> Result<Tensor> {
        let event = std::mem::replace(&mut self.event, std::ptr::null_mut());
        check("host read", unsafe { mm_host_read_wait(event) })?;
        Ok(self.host.shallow_clone())
    }
}

impl Drop for HostRead {
    fn drop(&mut self) {
        // SAFETY: null, or the event mm_host_read_start made and nothing has freed.
        unsafe { mm_host_read_free(self.event) }
    }
}

fn ptrs(ts: &[Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

fn opt_ptr(t: Option<&Tensor>) -> *mut C_tensor {
    t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut C_tensor)
}

pub(crate) fn check(what: &str, err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { mm_free_error(err) };
    Err(anyhow!("{what}: {msg}"))
}

fn same_len(what: &str, lens: &[usize]) -> Result<()> {
    if lens.windows(2).any(|w| w[0] != w[1]) {
        return Err(anyhow!("{what}: tensor lists differ in length: {lens:?}"));
    }
    Ok(())
}

/// Hyper-parameters of torch.optim.AdamW.
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One fused AdamW step (torch's `_fused_adamw_`, the kernel behind `AdamW(fused=True)`).
/// `steps` are float32 scalars on the params' device, incremented in place; `lr` a one-element
/// float32 tensor on that device. With `grad_scale`/`found_inf` (fp16), grads are unscaled inside
/// and the whole step is skipped when `found_inf` is non-zero.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    lr: &Tensor,
    h: AdamWHyper,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    same_len(
        "fused AdamW",
        &[
            params.len(),
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            steps.len(),
        ],
    )?;
    let (p, g, m, v, s) = (
        ptrs(params),
        ptrs(grads),
        ptrs(exp_avgs),
        ptrs(exp_avg_sqs),
        ptrs(steps),
    );
    let err = unsafe {
        mm_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            params.len() as i64,
            lr.as_ptr() as *mut C_tensor,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            opt_ptr(grad_scale),
            opt_ptr(found_inf),
        )
    };
    check("fused AdamW", err)
}

/// `clip_grad_norm_`: returns the joint L2 norm before clipping (a device scalar) and scales the
/// grads in place by `min(1, max_norm / (total + 1e-6))`.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    let g = ptrs(grads);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let err = unsafe { mm_clip_grad_norm(g.as_ptr(), grads.len() as i64, max_norm, &mut out) };
    check("clip_grad_norm", err)?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `p *= factor; p -= u` for every pair (Muon's update): `factor` a one-element tensor; each
/// update of its parameter's shape, kind and device.
pub fn foreach_scale_sub(params: &[Tensor], updates: &[Tensor], factor: &Tensor) -> Result<()> {
    anyhow::ensure!(
        params.len() == updates.len(),
        "foreach_scale_sub: one update per tensor"
    );
    let (p, u) = (ptrs(params), ptrs(updates));
    let err = unsafe {
        mm_foreach_scale_sub(
            p.as_ptr(),
            u.as_ptr(),
            params.len() as i64,
            factor.as_ptr() as *mut C_tensor,
        )
    };
    check("foreach_scale_sub", err)
}

/// GradScaler.unscale_: grads *= inv_scale, found_inf set to 1 if any element is not finite.
pub fn unscale(grads: &[Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let g = ptrs(grads);
    let err = unsafe {
        mm_unscale(
            g.as_ptr(),
            grads.len() as i64,
            found_inf.as_ptr() as *mut C_tensor,
            inv_scale.as_ptr() as *mut C_tensor,
        )
    };
    check("unscale", err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Fused AdamW equals torch's AdamW update written out (DESIGN.md), one step, fp32 on the CPU.
    #[test]
    fn fused_adamw_matches_the_written_out_update() {
        tch::manual_seed(0);
        let p0 = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let p = p0.copy();
        let m = p0.zeros_like();
        let v = p0.zeros_like();
        let step = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let lr = Tensor::from(1e-2f32);
        let h = AdamWHyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        adamw_step(
            &[p.shallow_clone()],
            &[g.shallow_clone()],
            &[m],
            &[v],
            &[step.shallow_clone()],
            &lr,
            h,
            None,
            None,
        )
        .unwrap();
        let (lr, b1, b2) = (1e-2, 0.9, 0.999);
        let expect_m = &g * (1.0 - b1);
        let expect_v = &g * &g * (1.0 - b2);
        let mhat = expect_m / (1.0 - b1);
        let vhat = expect_v / (1.0 - b2);
        let expect = &p0 * (1.0 - lr * 0.1) - mhat / (vhat.sqrt() + 1e-8) * lr;
        let err = f64::try_from((&p - &expect).abs().max()).unwrap();
        // fp32: a handful of roundings of O(1) values, so ~1e-7 each; 1e-6 is 10 ulps of slack.
        assert!(err < 1e-6, "max abs error {err}");
        assert_eq!(f64::try_from(step).unwrap(), 1.0);
    }

    /// clip_grad_norm scales by max/(total+1e-6) only when that is below 1, and reports the total.
    #[test]
    fn clip_scales_only_above_the_threshold() {
        let a = Tensor::from_slice(&[3.0f32, 0.0]);
        let b = Tensor::from_slice(&[4.0f32]);
        let total = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0).unwrap();
        assert!((f64::try_from(&total).unwrap() - 5.0).abs() < 1e-6);
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((f64::try_from(a.get(0)).unwrap() - 3.0 * coef).abs() < 1e-6);
        let total = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 10.0).unwrap();
        assert!((f64::try_from(&total).unwrap() - 1.0).abs() < 1e-5);
        assert!(
            (f64::try_from(a.get(0)).unwrap() - 3.0 * coef).abs() < 1e-6,
            "no clip below max"
        );
    }

    /// With fp16's found_inf set, the fused step changes nothing and the step count stays.
    #[test]
    fn fused_adamw_skips_when_found_inf() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]);
        let q = Tensor::from_slice(&[3.0f32]);
        let g = [
            Tensor::from_slice(&[0.5f32, 0.5]),
            Tensor::from_slice(&[0.5f32]),
        ];
        let zeros = |t: &Tensor| t.zeros_like();
        let steps = [
            Tensor::zeros([], (Kind::Float, Device::Cpu)),
            Tensor::zeros([], (Kind::Float, Device::Cpu)),
        ];
        let found = Tensor::ones([1], (Kind::Float, Device::Cpu));
        let scale = Tensor::ones([1], (Kind::Float, Device::Cpu));
        let h = AdamWHyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let params = [p.shallow_clone(), q.shallow_clone()];
        adamw_step(
            &params,
            &g,
            &[zeros(&p), zeros(&q)],
            &[zeros(&p), zeros(&q)],
            &steps,
            &Tensor::from(0.1f32),
            h,
            Some(&scale),
            Some(&found),
        )
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), vec![1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&q).unwrap(), vec![3.0]);
        assert_eq!(f64::try_from(&steps[1]).unwrap(), 0.0);
    }

    /// On the CPU the read is done at start; wait hands back the values (a copy, not a view).
    #[test]
    fn host_read_returns_the_values_at_start() {
        let mut t = Tensor::from_slice(&[1.5f32, -2.0, 0.0]);
        let read = HostRead::start(&t).unwrap();
        let _ = t.fill_(9.0);
        let got = Vec::<f32>::try_from(read.wait().unwrap()).unwrap();
        assert_eq!(got, vec![1.5, -2.0, 0.0]);
    }

    #[test]
    fn unscale_flags_non_finite() {
        let g = Tensor::from_slice(&[2.0f32, f32::INFINITY]);
        let found = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let inv = Tensor::from_slice(&[0.5f32]);
        unscale(&[g.shallow_clone()], &found, &inv).unwrap();
        assert_eq!(f64::try_from(found.get(0)).unwrap(), 1.0);
        assert_eq!(f64::try_from(g.get(0)).unwrap(), 1.0);
    }

    /// A gradient set to a view of a flat buffer is accumulated into in place, and zeroing the
    /// buffer clears it (what the trainer's flat_grads rely on).
    #[test]
    fn set_grad_views_accumulate_in_place_and_zero_with_the_buffer() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut flat = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        set_grad(&p, &flat.narrow(0, 1, 2)).unwrap();
        (&p * 3.0).sum(Kind::Float).backward();
        (&p * 3.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(&flat).unwrap(), vec![0.0, 6.0, 6.0]);
        let _ = flat.zero_();
        assert_eq!(f64::try_from(p.grad().abs().sum(Kind::Float)).unwrap(), 0.0);
    }
}

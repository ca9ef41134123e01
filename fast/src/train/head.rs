//! The end of a micro-step: the tied lm_head and the shifted cross-entropy over chunks of
//! positions, then one backward through the model.
//!
//! The lm_head and the loss run over chunks of `--loss-chunk-rows` positions, each chunk's
//! backward right after its forward, so the `[B*T, V]` logits (and their fp32 copies, the
//! log-softmax and its gradient) never exist whole: at batch 128 x 340 that is about 3 GB less.
//! The chunks' gradients meet in a detached copy of the final hidden state, which then
//! backpropagates through the model together with the aux loss. Same loss and gradients as one
//! pass, up to the order of the sums. Where [`crate::kernels::Kernels::cross_entropy_applies`],
//! each chunk's head and loss run without autograd: bf16 logits, one kernel for loss and gradient.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::trainer::{MicroStep, Trainer};
use crate::kernels::{fused, ops};
use crate::model::loss::IGNORE_INDEX;
use crate::model::{to_kind, upcast_kind};

/// Loss and gradients of `(ce + aux) * weight` given the final hidden state `h` `[B, T, d]` and
/// the aux loss (both still attached to the model's graph); gradients accumulate into `.grad`.
pub(super) fn backward(
    tr: &Trainer,
    h: &Tensor,
    aux: Tensor,
    labels: &Tensor,
    weight: &Tensor,
) -> Result<MicroStep> {
    let (model, scaler) = tr.head_parts();
    let k = upcast_kind(h.kind());
    let (b, t, d) = h.size3().context("hidden state must be [B, T, d]")?;
    // A causal LM's position t predicts label t+1: shift the labels, not the hidden state (no
    // copy of it); a masked LM's position t predicts label t.
    let hs = h.reshape([b * t, d]);
    let lb = tr.objective().position_labels(labels);
    let count = lb.ne(IGNORE_INDEX).sum(Kind::Int64);
    let denom = count.clamp_min(1).to_kind(k);
    // d(total * weight [* loss scale]) / d(sum of chunk losses): one device scalar.
    let weight = to_kind(weight, k).reshape([]);
    let seed = {
        let _guard = tch::no_grad_guard();
        let s = denom.reciprocal() * &weight;
        match scaler {
            Some(sc) => sc.scale_loss(&s),
            None => s,
        }
    };
    let rows = b * t;
    let chunk = model.kernels.loss_chunk_rows().unwrap_or(rows).max(1);
    let fused_ce = model.kernels.cross_entropy_applies(h, model.compute, k);
    // The gradient of the hidden state: every chunk writes its rows (fused) or accumulates
    // into them (autograd, hence zeros).
    let g = if fused_ce {
        hs.empty_like()
    } else {
        hs.zeros_like()
    };
    let h_det = hs.detach();
    let mut ce_sum = Tensor::zeros([], (k, h.device()));
    let mut start = 0;
    if fused_ce {
        // The head's forward and backward by hand, chunk by chunk: logits = h_c W^T (bf16, as
        // lm_head's linear), one kernel for the loss and the bf16 gradient of the logits
        // (written over them), then the two matmuls of the linear's backward, as autograd
        // runs them: dh_c = dlogits W into g, dW = dlogits^T h_c accumulated in place into
        // the tied embedding's fp32 .grad (a view into flat_grads). No fp32 logits, no
        // log-softmax kept, no autograd graph.
        let _guard = tch::no_grad_guard();
        let w = model.embed_tokens.to_kind(Kind::BFloat16);
        let wt = w.tr();
        let gw = model.embed_tokens.grad();
        while start < rows {
            let n = chunk.min(rows - start);
            let hc = h_det.narrow(0, start, n);
            let logits = hc.matmul(&wt);
            let part = fused::cross_entropy_bf16(&logits, &lb.narrow(0, start, n), &seed)
                .context("fused cross-entropy")?;
            let _ = g.narrow(0, start, n).f_copy_(&logits.matmul(&w))?;
            // bf16 [V, d] added into fp32 in one vectorized kernel: the values autograd's
            // cast-backward and accumulation give.
            fused::add_bf16_(&gw, &logits.tr().matmul(&hc))?;
            ce_sum = ce_sum + part;
            start += n;
        }
    } else {
        // Each chunk is a leaf whose .grad is a view into g: the chunks' backward writes the
        // gradient of the hidden state in place, with no full-size temporary per chunk.
        while start < rows {
            let n = chunk.min(rows - start);
            let leaf = h_det.narrow(0, start, n).detach().set_requires_grad(true);
            ops::set_grad(&leaf, &g.narrow(0, start, n))?;
            let logits = model.lm_head(&leaf);
            let lg = to_kind(&logits, k);
            let part = lg.cross_entropy_loss::<Tensor>(
                &lb.narrow(0, start, n),
                None,
                tch::Reduction::Sum,
                IGNORE_INDEX,
                0.0,
            );
            (&part * &seed)
                .f_backward()
                .context("backward of the loss")?;
            ce_sum = ce_sum + part.detach();
            start += n;
        }
    }
    // Through the model, in one pass: the chunks' gradient into h, plus the aux loss.
    let aux_seed = match scaler {
        Some(sc) => sc.scale_loss(&weight),
        None => weight,
    };
    let (mut roots, mut seeds) = (vec![hs], vec![g]);
    if aux.requires_grad() {
        roots.push(aux.shallow_clone());
        seeds.push(aux_seed.to_kind(aux.kind()).reshape(aux.size().as_slice()));
    }
    ops::backward(&roots, &seeds).context("backward")?;
    let ce = ce_sum / &denom;
    Ok(MicroStep {
        loss: (&ce + &aux).detach(),
        ce,
        aux: aux.detach(),
        count,
    })
}

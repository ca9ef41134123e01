//! One training step, as the training loop calls it.
//!
//! ```text
//! let mut tr = Trainer::new(&model_cfg, TrainerConfig { precision, device, seed, ..Default::default() })?;
//! // or Trainer::from_named(&model_cfg, tc, weights) to start from given weights
//! for step in 1..=total {                                   // 1-based micro-steps
//!     let lr = schedule::lr_at(step, total, base_lr, warmup);
//!     let w = accumulation::loss_weight(norm, accum, batch.count, window_count);
//!     let out = tr.micro_step(&batch.input_ids, &batch.labels, w)?;   // forward + backward
//!     if accumulation::is_optimizer_step(step, accum, total) {
//!         // data parallel: dist::average_gradients(comm, &mut tr.grads(), mode)?
//!         let grad_norm = tr.optimizer_step(lr, clip)?;  // unscale, clip, AdamW, zero grads
//!     }
//!     // log: out.loss / out.ce / out.aux / grad_norm are device tensors; read them
//!     // (f64::try_from) only when logging, to keep host syncs out of the hot path.
//! }
//! ```
//!
//! `micro_step` backpropagates `(ce + aux) * weight` (times the loss scale in fp16) into the
//! parameters' `.grad`, which accumulate until `optimizer_step` clips them jointly, runs AdamW
//! and zeroes them. Gradients are defined (zero) from construction on, so parameters a
//! micro-batch never reaches (an MoE expert that got no token) still have a gradient tensor for
//! the multi-tensor kernels and collectives. Only MoE dispatch reads the host (expert sizes).

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::adamw::{AdamW, AdamWConfig, AdamWImpl};
use crate::config::ModelConfig;
use crate::model::{load_named, named_parameters, MiniMindForCausalLM};
use crate::precision::Precision;
use crate::scaler::GradScaler;

/// Default positions per lm_head + loss chunk in [`Trainer::micro_step`]: `MM_LOSS_CHUNK_ROWS` (0 = one
/// chunk of the whole batch), 8192 by default: a chunk's logits are 105 MB in bf16 on the fused
/// path (8192 x 6400 x 2 B; 210 MB in fp32 on the unfused one). On an H100 8192 was faster than
/// 4096 at every batch measured (`--cuda-graph`: padded b32 7.54 -> 7.52 ms, b128 23.07 -> 22.90;
/// packed b128 23.73 -> 23.52, b1024 174.5 -> 172.8), for 0.05 GiB more peak memory at b32
/// (2.18 -> 2.23 GiB) and none at b128 (6.97 GiB).
pub fn loss_chunk_rows() -> Option<i64> {
    static ROWS: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        match std::env::var("MM_LOSS_CHUNK_ROWS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        {
            Some(0) => None,
            Some(n) if n > 0 => Some(n),
            _ => Some(8192),
        }
    })
}

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub precision: Precision,
    pub device: Device,
    /// tch::manual_seed before the init.
    pub seed: i64,
    pub adamw: AdamWConfig,
    pub adamw_impl: AdamWImpl,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            precision: Precision::Fp32,
            device: Device::Cpu,
            seed: 42,
            adamw: AdamWConfig::default(),
            adamw_impl: AdamWImpl::Fused,
        }
    }
}

/// Outputs of one micro-step, detached device scalars: `loss = ce + aux` (before weighting),
/// `ce` the mean over counted labels, `aux` the summed MoE aux loss, `count` counted labels.
pub struct MicroStep {
    pub loss: Tensor,
    pub ce: Tensor,
    pub aux: Tensor,
    pub count: Tensor,
}

pub struct Trainer {
    pub cfg: ModelConfig,
    pub precision: Precision,
    pub vs: VarStore,
    pub model: MiniMindForCausalLM,
    /// Parameters sorted by name (shallow handles into `vs`).
    pub params: Vec<(String, Tensor)>,
    pub opt: AdamW,
    /// fp16 only.
    pub scaler: Option<GradScaler>,
    /// Positions per lm_head + loss chunk (None: the whole batch at once); see `micro_step`.
    pub loss_chunk_rows: Option<i64>,
    /// Without a scaler: after each optimizer step, a one-element device tensor, 1 if that step
    /// met a non-finite gradient norm and was skipped (weights and moments untouched), else 0.
    pub nonfinite: Option<Tensor>,
    /// Every parameter's `.grad` is a view into this one contiguous buffer (name order), so a
    /// data-parallel all-reduce works on it, or on ranges of it, with no copies.
    pub flat_grads: Tensor,
    /// Whether `micro_step` may take the fused cross-entropy path (explicit lm_head matmuls around
    /// one CUDA kernel, `fused::cross_entropy_bf16`, instead of autograd over fp32 logits). It is
    /// taken only where it applies: bf16 compute and a bf16 hidden state on CUDA (the fused final
    /// RMSNorm writes it). Defaults to `fused::enabled()` (`--features cuda`, `MM_FUSED_KERNELS`
    /// not `0`); `fast kernels` flips it to compare both paths in one process.
    pub fused_ce: bool,
    /// Data parallel: the all-reduce overlapped with backward ([`Trainer::enable_overlap`]).
    pub overlap: Option<crate::dist::overlap::Overlap>,
}

impl Trainer {
    /// A freshly initialised model (seeded) with zeroed gradients and optimizer state.
    pub fn new(cfg: &ModelConfig, tc: TrainerConfig) -> Result<Self> {
        tch::manual_seed(tc.seed);
        let mut vs = VarStore::new(tc.device);
        let mut model = MiniMindForCausalLM::new(&vs.root(), cfg)?;
        if tc.precision.param_kind() != tch::Kind::Float {
            vs.set_kind(tc.precision.param_kind());
        }
        model.set_compute_kind(tc.precision.compute_kind());
        let params = named_parameters(&vs);
        // Every .grad a zeroed view into one flat buffer (all parameters share one kind).
        let total: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let kind = tc.precision.param_kind();
        let flat_grads = Tensor::zeros([total], (kind, tc.device));
        let mut offset = 0;
        for (name, p) in &params {
            let n = p.numel() as i64;
            let view = flat_grads.narrow(0, offset, n).view(p.size().as_slice());
            crate::fused::set_grad(p, &view).with_context(|| format!("gradient of {name}"))?;
            offset += n;
        }
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let opt = AdamW::new(&tensors, tc.adamw, tc.adamw_impl);
        let scaler = tc
            .precision
            .needs_scaler()
            .then(|| GradScaler::new_default(tc.device));
        Ok(Trainer {
            cfg: cfg.clone(),
            precision: tc.precision,
            vs,
            model,
            params,
            opt,
            scaler,
            nonfinite: None,
            loss_chunk_rows: loss_chunk_rows(),
            flat_grads,
            fused_ce: crate::model::fused::enabled(),
            overlap: None,
        })
    }

    /// Data parallel: from now on each micro-step's forward marks where backward finishes each
    /// bucket of gradients, and [`Trainer::average_gradients`] starts a bucket's all-reduce there
    /// instead of after backward (dist/overlap.rs). Returns false, changing nothing, when the
    /// parameters are not laid out as embedding, layers, final norm.
    pub fn enable_overlap(&mut self, layers_per_bucket: usize) -> Result<bool> {
        let sizes: Vec<(String, i64)> = self
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.numel() as i64))
            .collect();
        let Some(plan) =
            crate::dist::overlap::Plan::new(&sizes, self.cfg.num_hidden_layers, layers_per_bucket)
        else {
            return Ok(false);
        };
        self.overlap = Some(crate::dist::overlap::Overlap::new(plan, self.device())?);
        Ok(true)
    }

    /// Averages the gradients over ranks before an optimizer step (no-op on one rank): the
    /// overlapped buckets if [`Trainer::enable_overlap`] ran, else one all-reduce of the flat
    /// buffer.
    pub fn average_gradients(
        &self,
        comm: &dyn crate::dist::Communicator,
        mode: crate::dist::GradAverage,
    ) -> Result<()> {
        match &self.overlap {
            Some(o) => o.average(comm, &self.flat_grads, mode),
            None => {
                crate::dist::average_gradients(comm, &mut [self.flat_grads.shallow_clone()], mode)
            }
        }
    }

    /// As [`Trainer::new`], then the weights `named` (MiniMind names, any float kind).
    pub fn from_named(
        cfg: &ModelConfig,
        tc: TrainerConfig,
        named: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        let mut tr = Trainer::new(cfg, tc)?;
        load_named(&mut tr.vs, named, source)?;
        Ok(tr)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Parameter handles in name order.
    pub fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// Gradient handles in name order (in place edits reach the parameters' .grad).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.grad()).collect()
    }

    /// Forward and backward of `(ce + aux) * weight`; gradients accumulate.
    ///
    /// The lm_head and the loss run over chunks of [`loss_chunk_rows`] positions, each chunk's
    /// backward right after its forward, so the `[B*T, V]` logits (and their fp32 copies, the
    /// log-softmax and its gradient) never exist whole: at batch 128 x 340 that is about 3 GB
    /// less. The chunks' gradients meet in a detached copy of the final hidden state, which then
    /// backpropagates through the model together with the aux loss. Same loss and gradients as
    /// one pass, up to the order of the sums. On the fused path ([`Trainer::fused_ce`]) each
    /// chunk's head and loss run without autograd: bf16 logits, one kernel for loss and gradient.
    pub fn micro_step(
        &mut self,
        input_ids: &Tensor,
        labels: &Tensor,
        weight: f64,
    ) -> Result<MicroStep> {
        let k = crate::model::upcast_kind(self.precision.param_kind());
        let w = Tensor::full([], weight, (k, self.device()));
        self.micro_step_weighted(input_ids, labels, &w)
    }

    /// [`Trainer::micro_step`] with the weight a device scalar: data-parallel token-weighted
    /// normalisation divides by a global token count that an all-reduce leaves on the device, so
    /// no rank waits on the host for it.
    pub fn micro_step_weighted(
        &mut self,
        input_ids: &Tensor,
        labels: &Tensor,
        weight: &Tensor,
    ) -> Result<MicroStep> {
        let (h, aux) = match &self.overlap {
            Some(o) => self
                .model
                .forward_hidden_marked(input_ids, &|i, f| o.mark(i, f))?,
            None => self.model.forward_hidden(input_ids),
        };
        let k = crate::model::upcast_kind(h.kind());
        let (b, t, d) = h.size3().context("hidden state must be [B, T, d]")?;
        // Position t predicts label t+1: shift the labels, not the hidden state (no copy of it).
        let hs = h.reshape([b * t, d]);
        let lb = crate::loss::shifted_labels(labels);
        let count = lb.ne(crate::loss::IGNORE_INDEX).sum(tch::Kind::Int64);
        let denom = count.clamp_min(1).to_kind(k);
        // d(total * weight [* loss scale]) / d(sum of chunk losses): one device scalar.
        let weight = crate::model::to_kind(weight, k).reshape([]);
        let seed = {
            let _guard = tch::no_grad_guard();
            let s = denom.reciprocal() * &weight;
            match &self.scaler {
                Some(sc) => sc.scale_loss(&s),
                None => s,
            }
        };
        let rows = b * t;
        let chunk = self.loss_chunk_rows.unwrap_or(rows).max(1);
        let fused_ce = self.fused_ce
            && h.device().is_cuda()
            && h.kind() == tch::Kind::BFloat16
            && self.model.compute == tch::Kind::BFloat16
            && k == tch::Kind::Float;
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
            let w = self.model.embed_tokens.to_kind(tch::Kind::BFloat16);
            let wt = w.tr();
            let gw = self.model.embed_tokens.grad();
            while start < rows {
                let n = chunk.min(rows - start);
                let hc = h_det.narrow(0, start, n);
                let logits = hc.matmul(&wt);
                let part = crate::model::fused::cross_entropy_bf16(
                    &logits,
                    &lb.narrow(0, start, n),
                    &seed,
                )
                .context("fused cross-entropy")?;
                let _ = g.narrow(0, start, n).f_copy_(&logits.matmul(&w))?;
                // bf16 [V, d] added into fp32 in one vectorized kernel: the values autograd's
                // cast-backward and accumulation give.
                crate::model::fused::add_bf16_(&gw, &logits.tr().matmul(&hc))?;
                ce_sum = ce_sum + part;
                start += n;
            }
        } else {
            // Each chunk is a leaf whose .grad is a view into g: the chunks' backward writes the
            // gradient of the hidden state in place, with no full-size temporary per chunk.
            while start < rows {
                let n = chunk.min(rows - start);
                let leaf = h_det.narrow(0, start, n).detach().set_requires_grad(true);
                crate::fused::set_grad(&leaf, &g.narrow(0, start, n))?;
                let logits = self.model.lm_head(&leaf);
                let lg = crate::model::to_kind(&logits, k);
                let part = lg.cross_entropy_loss::<Tensor>(
                    &lb.narrow(0, start, n),
                    None,
                    tch::Reduction::Sum,
                    crate::loss::IGNORE_INDEX,
                    0.0,
                );
                (&part * &seed)
                    .f_backward()
                    .context("backward of the loss")?;
                ce_sum = ce_sum + part.detach();
                start += n;
            }
        }
        let aux = aux.to_kind(k);
        // Through the model, in one pass: the chunks' gradient into h, plus the aux loss.
        let aux_seed = match &self.scaler {
            Some(sc) => sc.scale_loss(&weight),
            None => weight,
        };
        let (mut roots, mut seeds) = (vec![hs], vec![g]);
        if aux.requires_grad() {
            roots.push(aux.shallow_clone());
            seeds.push(aux_seed.to_kind(aux.kind()).reshape(aux.size().as_slice()));
        }
        crate::fused::backward(&roots, &seeds).context("backward")?;
        let ce = ce_sum / &denom;
        Ok(MicroStep {
            loss: (&ce + &aux).detach(),
            ce,
            aux: aux.detach(),
            count,
        })
    }

    /// Unscale (fp16), clip to `clip` (joint L2; `f64::INFINITY` = no clip), AdamW at `lr`,
    /// scaler update, zero gradients. Returns the total gradient norm before clipping (device
    /// scalar; inf/NaN on a non-finite step, which is then skipped: see [`Trainer::nonfinite`]).
    pub fn optimizer_step(&mut self, lr: f64, clip: f64) -> Result<Tensor> {
        self.opt.set_lr(lr);
        self.optimizer_step_at_set_lr(clip)
    }

    /// [`Trainer::optimizer_step`] at the rate last given to `opt.set_lr`: every value it reads
    /// lives on the device, so (bf16/fp32, no scaler) it can be captured in a CUDA graph.
    pub fn optimizer_step_at_set_lr(&mut self, clip: f64) -> Result<Tensor> {
        let grads = self.grads();
        let params = self.param_tensors();
        if let Some(s) = self.scaler.as_mut() {
            s.unscale(&grads)?;
        }
        let norm = crate::clip::clip_grad_norm(&grads, clip)?;
        // A non-finite gradient skips the step on the device, like fp16's scaler does: with a
        // scaler that is its found_inf (then it backs off), otherwise a non-finite total norm,
        // which the loop reads a step later (no host sync here) to stop or count.
        let found = match &self.scaler {
            Some(s) => s.found_inf.shallow_clone(),
            None => {
                let _guard = tch::no_grad_guard();
                norm.isfinite()
                    .logical_not()
                    .to_kind(tch::Kind::Float)
                    .reshape([1])
            }
        };
        self.opt.step_at_set_lr(&params, &grads, Some(&found))?;
        self.nonfinite = self.scaler.is_none().then_some(found);
        if let Some(s) = self.scaler.as_mut() {
            s.update();
        }
        // One kernel: every .grad is a view into flat_grads.
        let _ = self.flat_grads.f_zero_()?;
        Ok(norm)
    }

    /// Current weights by name, detached copies on the CPU in fp64 (for checks and exports).
    pub fn named_f64(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    p.detach().to_device(Device::Cpu).to_kind(tch::Kind::Double),
                )
            })
            .collect()
    }

    /// Current gradients by name, copies on the CPU in fp64.
    pub fn named_grads_f64(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    p.grad().to_device(Device::Cpu).to_kind(tch::Kind::Double),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn cfg() -> ModelConfig {
        ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 32,
            use_moe: true,
            n_routed_experts: 4,
            num_experts_per_tok: 1,
            ..Default::default()
        }
    }

    /// Every parameter has a gradient tensor, even experts no token reached, and the step moves
    /// the weights and zeroes the gradients.
    #[test]
    fn a_step_moves_weights_and_zeroes_grads() {
        let mut tr = Trainer::new(&cfg(), TrainerConfig::default()).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
        let before: Vec<Tensor> = tr
            .param_tensors()
            .iter()
            .map(|p| p.detach().copy())
            .collect();
        let out = tr.micro_step(&ids, &ids, 1.0).unwrap();
        assert!(f64::try_from(&out.loss).unwrap() > 0.0);
        assert!(tr.grads().iter().all(|g| g.defined()));
        let norm = tr.optimizer_step(1e-2, 1.0).unwrap();
        assert!(f64::try_from(&norm).unwrap() > 0.0);
        let moved = tr
            .param_tensors()
            .iter()
            .zip(&before)
            .any(|(p, b)| !p.equal(b));
        assert!(moved);
        let total: f64 = tr
            .grads()
            .iter()
            .map(|g| f64::try_from(g.abs().sum(Kind::Double)).unwrap())
            .sum();
        assert_eq!(total, 0.0);
    }

    /// fp16 with a scaler: an overflowing step is skipped on the device and the scale halves.
    #[test]
    fn fp16_skips_a_non_finite_step() {
        let tc = TrainerConfig {
            precision: Precision::Fp16,
            ..Default::default()
        };
        let mut tr = Trainer::new(&cfg(), tc).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
        tr.micro_step(&ids, &ids, 1.0).unwrap();
        let _ = tr.grads()[0].get(0).get(0).fill_(f64::INFINITY);
        let before: Vec<Tensor> = tr
            .param_tensors()
            .iter()
            .map(|p| p.detach().copy())
            .collect();
        let norm = tr.optimizer_step(1e-2, 1.0).unwrap();
        assert!(!f64::try_from(&norm).unwrap().is_finite());
        assert!(tr
            .param_tensors()
            .iter()
            .zip(&before)
            .all(|(p, b)| p.equal(b)));
        assert_eq!(tr.scaler.as_ref().unwrap().scale_value(), 32768.0);
    }

    /// fp32 without a scaler: a non-finite gradient skips the whole step on the device (weights,
    /// moments and step counters untouched) and raises the `nonfinite` flag; a clean step clears it.
    #[test]
    fn fp32_skips_a_non_finite_step_and_flags_it() {
        let mut tr = Trainer::new(&cfg(), TrainerConfig::default()).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
        tr.micro_step(&ids, &ids, 1.0).unwrap();
        let _ = tr.grads()[0].get(0).get(0).fill_(f64::NAN);
        let before: Vec<Tensor> = tr
            .param_tensors()
            .iter()
            .map(|p| p.detach().copy())
            .collect();
        let _ = tr.optimizer_step(1e-2, 1.0).unwrap();
        assert!(tr
            .param_tensors()
            .iter()
            .zip(&before)
            .all(|(p, b)| p.equal(b)));
        assert_eq!(
            f64::try_from(tr.nonfinite.as_ref().unwrap().sum(Kind::Double)).unwrap(),
            1.0
        );
        assert_eq!(f64::try_from(&tr.opt.steps[0]).unwrap(), 0.0);
        assert_eq!(
            f64::try_from(tr.opt.exp_avg[0].abs().sum(Kind::Double)).unwrap(),
            0.0
        );
        tr.micro_step(&ids, &ids, 1.0).unwrap();
        let _ = tr.optimizer_step(1e-2, 1.0).unwrap();
        assert_eq!(
            f64::try_from(tr.nonfinite.as_ref().unwrap().sum(Kind::Double)).unwrap(),
            0.0
        );
        assert_eq!(f64::try_from(&tr.opt.steps[0]).unwrap(), 1.0);
    }

    /// The chunked lm_head + loss gives the loss and gradients of one pass over the whole batch
    /// (fp64: equal to round-off), pads and the unpredicted last position included.
    #[test]
    fn chunked_loss_equals_one_pass() {
        let tc = TrainerConfig {
            precision: Precision::Fp64,
            ..Default::default()
        };
        let ids = Tensor::from_slice(&[1i64, 5, 7, 9, 2, 0, 3, 4, 6, 8, 10, 2]).reshape([2, 6]);
        let labels =
            Tensor::from_slice(&[1i64, 5, 7, 9, 2, -100, 3, 4, 6, 8, 10, 2]).reshape([2, 6]);
        // One set of weights for every run (the seeded init shares libtorch's global generator
        // with tests running in parallel).
        let weights: HashMap<String, Tensor> = Trainer::new(&cfg(), tc.clone())
            .unwrap()
            .named_f64()
            .into_iter()
            .collect();
        let run = |chunk: Option<i64>| {
            let named = weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
            let mut tr = Trainer::from_named(&cfg(), tc.clone(), named, "test").unwrap();
            tr.loss_chunk_rows = chunk;
            let out = tr.micro_step(&ids, &labels, 0.5).unwrap();
            (f64::try_from(&out.loss).unwrap(), tr.named_grads_f64())
        };
        let (l1, g1) = run(None);
        for chunk in [1, 3, 4, 100] {
            let (l2, g2) = run(Some(chunk));
            assert!((l1 - l2).abs() < 1e-12, "chunk {chunk}: loss {l1} vs {l2}");
            for ((n, a), (_, b)) in g1.iter().zip(&g2) {
                let diff = f64::try_from((a - b).abs().max()).unwrap();
                assert!(diff < 1e-12, "chunk {chunk}: {n} differs by {diff}");
            }
        }
    }
}

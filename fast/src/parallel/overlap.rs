//! Data parallel: the gradient all-reduce overlapped with backward.
//!
//! Every `.grad` is a view into one flat buffer (name order: the embedding, the layers, the
//! final norm), and backward runs from the last layer to the first, so a layer's gradients are
//! final once backward has passed it. A [`Plan`] splits the buffer into buckets of whole layers
//! that sit next to each other in it; a bucket is final once its lowest layer has
//! backpropagated. During the forward, the tensor whose gradient layer `i` computes last (the
//! output of layer `i - 1`'s feed-forward, which only layer `i`'s input norm reads; for layer 0
//! the embedding's output) gets a hook that records a CUDA event when that gradient exists
//! (`csrc/grad_events.cpp`). After backward each bucket's all-reduce is queued behind its
//! lowest layer's event, so on the device it runs beside the backward of the layers below. Only
//! the embedding (its tied lm_head gradient is finished by the embedding's own backward, the
//! last op) is reduced after backward.
//!
//! Under `pretrain --cuda-graph` the hooks run once, at capture: the micro-step's graph records
//! the events at the same points on every replay, and the collectives stay outside the graph.
//! Without CUDA (the in-process stand-in of the tests) there are no events: the buckets are
//! reduced one after another, which is the same arithmetic.

use super::{Communicator, GradAverage};
use anyhow::{ensure, Context, Result};
use tch::{Device, Tensor};

/// One all-reduce: `len` gradients from `start` in the flat buffer, which may start once layer
/// `ready` has backpropagated (every layer in it is `ready` or above); `None` for the
/// embedding, reduced after backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub start: i64,
    pub len: i64,
    pub ready: Option<usize>,
}

/// The buckets in the order every rank reduces them: by `ready`, top layer first, the embedding
/// last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    buckets: Vec<Bucket>,
    /// The distinct `ready` layers, descending: event j marks `marks[j]`.
    marks: Vec<usize>,
    total: i64,
}

/// What a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Embedding,
    Layer(usize),
    FinalNorm,
}

fn unit_of(name: &str, num_layers: usize) -> Option<Unit> {
    if name.starts_with("model.embed_tokens.") {
        return Some(Unit::Embedding);
    }
    if name.starts_with("model.norm.") {
        return Some(Unit::FinalNorm);
    }
    let i: usize = name
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    (i < num_layers).then_some(Unit::Layer(i))
}

impl Plan {
    /// `params`: (name, element count) in flat-buffer order (name order: `model.layers.10.`
    /// sorts before `model.layers.2.`). A bucket is a run of parameters adjacent in the buffer
    /// whose layers share a group: layers 0 and 1 alone (backward reaches them last, so little
    /// of it is left to hide their reduction behind), then `per_bucket` layers at a time; the
    /// final norm joins the bucket before it. None when a parameter is none of embedding, layer
    /// or final norm (then the caller reduces the whole buffer after backward).
    pub fn new(params: &[(String, i64)], num_layers: usize, per_bucket: usize) -> Option<Plan> {
        if num_layers == 0 || per_bucket == 0 {
            return None;
        }
        let group = |i: usize| if i < 2 { i } else { 2 + (i - 2) / per_bucket };
        // (group key, bucket); the embedding's key is None and never merges.
        let mut built: Vec<(Option<usize>, Bucket)> = Vec::new();
        let mut start = 0i64;
        for (name, n) in params {
            let unit = unit_of(name, num_layers)?;
            let (key, ready) = match unit {
                Unit::Embedding => (None, None),
                Unit::Layer(i) => (Some(group(i)), Some(i)),
                // Final before layer L-1's backward: it may join any layer's bucket.
                Unit::FinalNorm => match built.last() {
                    Some((Some(k), _)) => (Some(*k), Some(num_layers - 1)),
                    _ => (Some(usize::MAX), Some(num_layers - 1)),
                },
            };
            match built.last_mut() {
                Some((k, b)) if key.is_some() && *k == key && b.start + b.len == start => {
                    b.len += n;
                    b.ready = b.ready.min(ready);
                }
                _ => built.push((
                    key,
                    Bucket {
                        start,
                        len: *n,
                        ready,
                    },
                )),
            }
            start += n;
        }
        let mut buckets: Vec<Bucket> = built.into_iter().map(|(_, b)| b).collect();
        // Top layer first; None (the embedding) sorts below every Some, so last.
        buckets.sort_by_key(|b| std::cmp::Reverse(b.ready));
        let mut marks: Vec<usize> = buckets.iter().filter_map(|b| b.ready).collect();
        marks.dedup();
        Some(Plan {
            buckets,
            marks,
            total: start,
        })
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// The layers whose backward starts a bucket's reduction, top down.
    pub fn marks(&self) -> &[usize] {
        &self.marks
    }
}

/// A plan and, on CUDA, its events.
pub struct Overlap {
    plan: Plan,
    events: Option<GradEvents>,
}

impl Overlap {
    /// Events on a CUDA device (needs `--features cuda`); none elsewhere.
    pub fn new(plan: Plan, device: Device) -> Result<Overlap> {
        let events = match device {
            Device::Cuda(index) => Some(GradEvents::new(index, plan.marks.len())?),
            _ => None,
        };
        Ok(Overlap { plan, events })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The forward calls this with the tensor whose gradient exists once layers `layer..` have
    /// backpropagated (the output of layer `layer - 1`'s feed-forward, which only layer `layer`'s
    /// input norm reads; the embedding's output for layer 0): if buckets wait for `layer`, that
    /// gradient is their mark.
    pub fn mark(&self, layer: usize, t: &Tensor) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        match self.plan.marks.iter().position(|&m| m == layer) {
            Some(j) => events.hook(j, t),
            None => Ok(()),
        }
    }

    /// After the last micro-step's backward: sums `flat` over ranks, each layer bucket starting
    /// on the device at its mark, the embedding after backward; the current stream's later work
    /// waits for all of it. Then the rank mean, if asked (as [`super::average_gradients`]).
    pub fn average(&self, comm: &dyn Communicator, flat: &Tensor, mode: GradAverage) -> Result<()> {
        let w = comm.world_size();
        if w == 1 {
            return Ok(());
        }
        ensure!(
            flat.numel() as i64 == self.plan.total,
            "overlapped all-reduce: the plan covers {} gradients, the buffer holds {}",
            self.plan.total,
            flat.numel()
        );
        for b in &self.plan.buckets {
            let mut t = flat.narrow(0, b.start, b.len);
            let what = || match b.ready {
                Some(r) => format!("all-reduce of the bucket ready after layer {r}"),
                None => "all-reduce of the embedding".to_string(),
            };
            let event = b
                .ready
                .and_then(|r| self.plan.marks.iter().position(|&m| m == r));
            match (&self.events, event) {
                (Some(ev), Some(j)) => {
                    ev.enter(j)?;
                    let r = comm.all_reduce_sum_async(&mut t);
                    ev.leave()?;
                    r
                }
                _ => comm.all_reduce_sum_async(&mut t),
            }
            .with_context(what)?;
        }
        comm.wait_pending()?;
        super::finish_average(&mut [flat.shallow_clone()], mode, w)
    }
}

use crate::kernels::grad_events::GradEvents;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::parallel::{average_gradients, run_ranks};
    use crate::train::trainer::{Trainer, TrainerConfig};
    use std::time::Duration;

    fn cfg(layers: usize, moe: bool) -> ModelConfig {
        ModelConfig {
            hidden_size: 16,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: Some(32),
            vocab_size: 32,
            use_moe: moe,
            n_routed_experts: 4,
            num_experts_per_tok: 1,
            ..Default::default()
        }
    }

    fn sizes(tr: &Trainer) -> Vec<(String, i64)> {
        tr.named_parameters()
            .iter()
            .map(|(n, p)| (n.clone(), p.numel() as i64))
            .collect()
    }

    /// Every bucket holds only layers at or above its mark (so it is final when the mark fires),
    /// the buckets tile the buffer exactly once (every gradient reduced, none twice), and the
    /// marks are as documented: layers 0 and 1 alone, then `per` layers a bucket, in any
    /// parameter order (12 layers sort as 0, 1, 10, 11, 2, ...).
    #[test]
    fn buckets_tile_the_flat_buffer_and_wait_for_their_lowest_layer() {
        for (layers, per, moe, want) in [
            (8, 2, false, vec![6, 4, 2, 1, 0]),
            (5, 2, false, vec![4, 2, 1, 0]),
            (4, 3, true, vec![2, 1, 0]),
            (2, 2, false, vec![1, 0]),
            (1, 2, false, vec![0]),
            (12, 2, false, vec![10, 8, 6, 4, 2, 1, 0]),
            (12, 1, false, (0..12).rev().collect()),
        ] {
            let tr = Trainer::new(&cfg(layers, moe), TrainerConfig::default()).unwrap();
            let s = sizes(&tr);
            let plan = Plan::new(&s, layers, per).expect("a plan");
            assert_eq!(
                plan.marks(),
                want.as_slice(),
                "{layers} layers, {per} per bucket"
            );
            let total = tr.flat_grads().numel() as i64;
            let mut covered = vec![0u8; total as usize];
            let mut offset = 0i64;
            let at: Vec<(i64, &str)> = s
                .iter()
                .map(|(n, k)| {
                    offset += k;
                    (offset - k, n.as_str())
                })
                .collect();
            for b in plan.buckets() {
                assert!(b.len > 0, "empty bucket at {}", b.start);
                for c in &mut covered[b.start as usize..(b.start + b.len) as usize] {
                    *c += 1;
                }
                for (o, name) in at
                    .iter()
                    .filter(|(o, _)| *o >= b.start && *o < b.start + b.len)
                {
                    match (unit_of(name, layers), b.ready) {
                        (Some(Unit::Layer(i)), Some(r)) => {
                            assert!(i >= r, "{name} in a bucket ready at {r}")
                        }
                        (Some(Unit::FinalNorm), Some(_)) | (Some(Unit::Embedding), None) => {}
                        other => panic!("{name} at {o} in bucket {b:?}: {other:?}"),
                    }
                }
            }
            assert!(
                covered.iter().all(|&c| c == 1),
                "{layers} layers: not a tiling"
            );
            let order: Vec<Option<usize>> = plan.buckets().iter().map(|b| b.ready).collect();
            let mut sorted = order.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            assert_eq!(
                order, sorted,
                "reduction order is top layer first, embedding last"
            );
            assert_eq!(order.last(), Some(&None));
        }
    }

    #[test]
    fn no_plan_for_an_unknown_parameter() {
        let tr = Trainer::new(&cfg(3, false), TrainerConfig::default()).unwrap();
        let mut s = sizes(&tr);
        s.push(("lm_head.extra".into(), 4));
        assert_eq!(Plan::new(&s, 3, 2), None);
        s.pop();
        s.push(("model.layers.3.mlp.x".into(), 4)); // a layer the model does not have
        assert_eq!(Plan::new(&s, 3, 2), None);
    }

    /// On each of 3 simulated ranks, the bucketed average leaves exactly what one all-reduce of
    /// the whole buffer does, in both normalisations (the in-process reducer sums in rank order,
    /// so both are bit-identical).
    #[test]
    fn bucketed_average_equals_one_all_reduce() {
        for mode in [GradAverage::RankMean, GradAverage::TokenWeighted] {
            let outs = run_ranks(3, Duration::from_secs(30), move |c| {
                let mut tr = Trainer::new(&cfg(5, false), TrainerConfig::default())?;
                assert!(tr.enable_overlap(2)?);
                let n = tr.flat_grads().numel() as i64;
                let g = (Tensor::arange(n, (tch::Kind::Float, Device::Cpu)) * 1e-3
                    + c.rank() as f64)
                    .sin();
                tr.flat_grads().shallow_clone().copy_(&g);
                let mut plain = [g.copy()];
                average_gradients(c, &mut plain, mode)?;
                tr.average_gradients(c, mode)?;
                Ok(f64::try_from((tr.flat_grads() - &plain[0]).abs().max())?)
            });
            for out in outs {
                assert_eq!(out.unwrap(), 0.0, "{mode:?}");
            }
        }
    }

    /// The forward marks layer 0 with the embedding's output and layers 1.. with the tensor each
    /// one's input norm adds (the previous layer's feed-forward output), and a marked forward
    /// computes what an unmarked one does.
    #[test]
    fn the_forward_marks_every_layer() {
        let tr = Trainer::new(&cfg(4, false), TrainerConfig::default()).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).reshape([2, 3]);
        let seen = std::cell::RefCell::new(Vec::new());
        let (h, _) = tr
            .model()
            .forward_hidden_with(&ids, None, &|i, f| {
                assert_eq!(f.size(), vec![2, 3, 16]);
                assert!(f.requires_grad());
                seen.borrow_mut().push(i);
                Ok(())
            })
            .unwrap();
        assert_eq!(*seen.borrow(), vec![0, 1, 2, 3]);
        let (h0, _) = tr.model().forward_hidden(&ids);
        assert_eq!(f64::try_from((h - h0).abs().max()).unwrap(), 0.0);
    }
}

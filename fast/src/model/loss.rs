//! Shifted causal-LM cross-entropy: `logits[:, :-1]` against `labels[:, 1:]`, -100 ignored,
//! computed in fp32 (fp64 for fp64 logits) whatever the logits' kind (as autocast does).
//!
//! The sum over counted labels is divided by `max(count, 1)`: a batch with no counted label gives
//! loss 0 and zero gradient (PyTorch's mean would give NaN). No host synchronisation.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// What a model learns to predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Causal LM (MiniMind): position t predicts label t+1, causal attention.
    #[default]
    #[value(name = "clm")]
    #[serde(rename = "clm")]
    CausalLm,
    /// Masked LM (BERT): every masked position predicts its own label, bidirectional attention.
    #[value(name = "mlm")]
    #[serde(rename = "mlm")]
    MaskedLm,
}

impl Objective {
    /// The labels each position is scored against, `[B*T]`: shifted by one for a causal LM (the
    /// last position gets none), as they are for a masked LM.
    pub fn position_labels(self, labels: &Tensor) -> Tensor {
        match self {
            Objective::CausalLm => shifted_labels(labels),
            Objective::MaskedLm => labels.reshape([-1]),
        }
    }
}

/// The shift: x `[B, T, C]` at positions `0..T-1` against labels at `1..T`, flattened to
/// (`[B*(T-1), C]`, `[B*(T-1)]`). x is the logits, or the hidden state before a chunked lm_head.
pub fn shift(x: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let (b, t, c) = x.size3().expect("x must be [B, T, C]");
    let tp = (t - 1).max(0);
    (
        x.narrow(1, 0, tp).reshape([b * tp, c]),
        labels.narrow(1, 1, tp).reshape([b * tp]),
    )
}

/// The shift applied to the labels alone: `[B, T]` -> `[B*T]` where position t of a row holds
/// label t+1 and the last position IGNORE_INDEX. Against the unshifted `[B*T, C]` view of x it
/// gives [`shift`]'s loss with no copy of x (the extra last positions count for nothing).
pub fn shifted_labels(labels: &Tensor) -> Tensor {
    let (b, t) = labels.size2().expect("labels must be [B, T]");
    let tp = (t - 1).max(0);
    let last = Tensor::full([b, t - tp], IGNORE_INDEX, (labels.kind(), labels.device()));
    Tensor::cat(&[labels.narrow(1, 1, tp), last], 1).reshape([b * t])
}

/// logits `[B, T, V]`, labels `[B, T]` -> (summed loss over counted labels, count as an int64
/// scalar tensor).
pub fn shifted_cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let k = crate::model::upcast_kind(logits.kind());
    let (lg, lb) = shift(logits, labels);
    let lg = if lg.kind() == k { lg } else { lg.to_kind(k) };
    let sum = lg.cross_entropy_loss::<Tensor>(&lb, None, Reduction::Sum, IGNORE_INDEX, 0.0);
    let count = lb.ne(IGNORE_INDEX).sum(Kind::Int64);
    (sum, count)
}

/// (mean loss over counted labels, 0 when none; count). MiniMind's loss.
pub fn shifted_cross_entropy(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let (sum, count) = shifted_cross_entropy_sum(logits, labels);
    let denom = count.clamp_min(1).to_kind(sum.kind());
    (sum / denom, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn an_all_ignored_batch_gives_zero_loss_and_zero_gradient() {
        let logits = Tensor::randn([2, 4, 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let labels = Tensor::full([2, 4], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        let (loss, count) = shifted_cross_entropy(&logits, &labels);
        loss.backward();
        assert_eq!(f64::try_from(&loss).unwrap(), 0.0);
        assert_eq!(i64::try_from(&count).unwrap(), 0);
        let g = logits.grad();
        assert_eq!(f64::try_from(g.abs().sum(Kind::Float)).unwrap(), 0.0);
    }

    #[test]
    fn the_mean_counts_only_shifted_unignored_labels() {
        let logits = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
        // Label at t=0 is never predicted; t=2 ignored: one counted label, loss ln 4.
        let labels = Tensor::from_slice(&[3i64, 1, IGNORE_INDEX]).reshape([1, 3]);
        let (loss, count) = shifted_cross_entropy(&logits, &labels);
        assert_eq!(i64::try_from(&count).unwrap(), 1);
        assert!((f64::try_from(&loss).unwrap() - 4f64.ln()).abs() < 1e-6);
    }

    /// Shifting the labels against the whole hidden state (what the training step does) gives
    /// the loss and gradient of shifting the hidden state (`shift`), pads included: fp64, equal
    /// to round-off.
    #[test]
    fn shifted_labels_match_the_shifted_hidden_state() {
        let (b, t, v) = (3, 5, 7);
        let x = Tensor::randn([b, t, v], (Kind::Double, Device::Cpu));
        let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, -100, 2, 3, 4, 4, 4, -100, -100])
            .reshape([b, t]);
        let lb = shifted_labels(&labels);
        assert_eq!(
            Vec::<i64>::try_from(&lb).unwrap(),
            [2, 3, 4, 5, -100, 0, -100, 2, 3, -100, 4, 4, -100, -100, -100]
        );
        let loss_of = |xl: &Tensor, l: &Tensor| {
            xl.cross_entropy_loss::<Tensor>(l, None, Reduction::Sum, IGNORE_INDEX, 0.0)
        };
        let x1 = x.detach().set_requires_grad(true);
        let a = loss_of(&x1.reshape([b * t, v]), &lb);
        a.backward();
        let x2 = x.detach().set_requires_grad(true);
        let (xs, ls) = shift(&x2, &labels);
        let c = loss_of(&xs, &ls);
        c.backward();
        assert!((f64::try_from(&a).unwrap() - f64::try_from(&c).unwrap()).abs() < 1e-12);
        let dg = f64::try_from((x1.grad() - x2.grad()).abs().max()).unwrap();
        assert!(dg < 1e-15, "gradients differ by {dg}");
    }
}

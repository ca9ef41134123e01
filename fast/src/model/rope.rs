//! Rotary position embeddings, rotate-half form (MiniMind's `precompute_freqs_cis` and
//! `apply_rotary_pos_emb`).

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

/// RoPE tables cos/sin `[T, hd]` as MiniMind's precompute_freqs_cis: `inv_freq_i =
/// theta^(-2i/hd)`, rows `[cos(t f), cos(t f)]`, in float32 on the CPU (libtorch's own kernels,
/// so the tables are bitwise MiniMind's; an fp64 model then holds f32-rounded values too).
pub fn table(theta: f64, hd: i64, t: i64) -> (Tensor, Tensor) {
    let f32cpu = (Kind::Float, Device::Cpu);
    let expo = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu))
        .narrow(0, 0, hd / 2)
        .to_kind(Kind::Float)
        / hd as f64;
    let inv = Tensor::pow_scalar(theta, &expo).reciprocal();
    let pos = Tensor::arange(t, f32cpu);
    let freqs = pos.outer(&inv);
    (
        Tensor::cat(&[freqs.cos(), freqs.cos()], -1),
        Tensor::cat(&[freqs.sin(), freqs.sin()], -1),
    )
}

/// `[-x2, x1]` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("non-empty shape") / 2;
    Tensor::cat(&[x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)], -1)
}

/// `x * cos + rotate_half(x) * sin` in the tables' kind, cast back to `out` kind.
/// x `[B, T, nh, hd]`, tables `[T, hd]` (or `[B, T, hd]`: a position per token). A bf16 x times
/// fp32 tables computes in fp32 by type promotion (as MiniMind's RoPE under autocast does), and
/// autograd keeps x and rotate_half(x) in bf16: half the memory of upcasting x first, same values.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, out: Kind) -> Tensor {
    let (c, s) = (cos.unsqueeze(-2), sin.unsqueeze(-2));
    let y = x * c + rotate_half(x) * s;
    if y.kind() == out {
        y
    } else {
        y.to_kind(out)
    }
}

/// The tables of one model, built for the longest length asked so far, per device and kind.
pub struct RopeTables {
    theta: f64,
    head_dim: i64,
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    t: i64,
    device: Device,
    kind: Kind,
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    pub fn new(theta: f64, head_dim: i64) -> Self {
        RopeTables {
            theta,
            head_dim,
            cached: Mutex::new(None),
        }
    }

    /// cos/sin `[t, hd]` of positions `start .. start + t`, in `kind` on `device`.
    pub fn get(&self, start: i64, t: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let end = start + t;
        let mut cache = self.cached.lock().expect("rope table lock");
        let fits = |c: &Cached| c.t >= end && c.device == device && c.kind == kind;
        if !cache.as_ref().is_some_and(fits) {
            let (c, s) = table(self.theta, self.head_dim, end);
            *cache = Some(Cached {
                t: end,
                device,
                kind,
                cos: c.to_kind(kind).to_device(device),
                sin: s.to_kind(kind).to_device(device),
            });
        }
        let c = cache.as_ref().expect("filled above");
        (c.cos.narrow(0, start, t), c.sin.narrow(0, start, t))
    }
}

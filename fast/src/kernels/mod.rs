//! Our C++/CUDA code (`fast/csrc/`) behind safe wrappers, and the one place that decides which
//! kernels a run uses.
//!
//! | module | wraps | without `--features cuda` |
//! |---|---|---|
//! | [`ops`] | `csrc/ops.cpp`: fused AdamW, foreach clip/unscale, `.grad` views, seeded backward, pinned host reads | always built |
//! | [`fused`] | `csrc/fused_ops.cpp` over `kernels.cu`, `attention.cu`, `cross_entropy.cu`: our bf16 training kernels | `fused_stub.rs`: every op an error |
//! | [`graph`] | `csrc/cuda_graph.cpp`: whole-step CUDA graphs, peak memory | `graph_stub.rs` |
//! | [`grad_events`] | `csrc/grad_events.cpp`: CUDA events recorded by gradient hooks | `grad_events_stub.rs` |
//! | [`profiler`] | `csrc/profiler.cpp`: libtorch's Kineto profiler | always built |
//!
//! [`KernelConfig`] is what a user chooses (`--kernels`, `--attention`, `--weight-cast`,
//! `--cross-entropy`, `--rms-norm`, `--loss-chunk-rows`, `--dp-overlap`, `--dp-bucket-layers`,
//! `--moe-experts`, `--moe-recompute`); it is part of every run configuration, printed at start
//! and saved with the checkpoints. [`Kernels`] is that choice applied to this build: each
//! `*_applies` method below is the only test in the crate of whether a fused kernel runs for
//! given tensors.

pub mod ops;
pub mod profiler;

#[cfg_attr(not(feature = "cuda"), path = "fused_stub.rs")]
pub mod fused;
#[cfg_attr(not(feature = "cuda"), path = "grad_events_stub.rs")]
pub mod grad_events;
#[cfg_attr(not(feature = "cuda"), path = "graph_stub.rs")]
pub mod graph;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Whether this binary carries our CUDA kernels (built with `--features cuda`).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    /// Our fused CUDA kernels wherever they apply (bf16 on CUDA), libtorch's ops elsewhere.
    Fused,
    /// libtorch's ops only.
    Libtorch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttentionChoice {
    /// Our attention over the merged q/k/v projection (fast/csrc/attention.cu) where it applies.
    Fused,
    /// Our RoPE/layout kernel, then libtorch's scaled_dot_product_attention (cuDNN).
    Sdpa,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightCast {
    /// One node casts the fp32 weights to bf16 and adds their bf16 gradients into `.grad` in place.
    Fused,
    /// cat + cast under autograd (AccumulateGrad adds the gradients).
    Autograd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CrossEntropyChoice {
    /// The lm_head by hand around our loss kernel (bf16 logits, gradient written over them).
    Fused,
    /// libtorch's fp32 cross-entropy under autograd.
    Autograd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RmsNormChoice {
    /// libtorch's own `rms_norm` op (one kernel each way) for fp32 inputs on CUDA.
    Fused,
    /// MiniMind's formula as separate libtorch ops.
    Composed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

/// What [`fused::moe_norm_router`] returns (one type for `fused.rs` and its stub).
pub struct MoeNormRouter {
    /// The residual sum `x + a`, fp32.
    pub h: Tensor,
    /// The norm of h in bf16, for the routed experts.
    pub y: Tensor,
    /// The same values again for the shared experts (`copies` 2), else `None`.
    pub y2: Option<Tensor>,
    /// The router's logits `[..., E]` from the fp32 norm, fp32.
    pub logits: Tensor,
}

/// How a MoE layer runs its routed experts (see [`Kernels::moe_experts_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MoeExperts {
    /// Every expert at once: grouped matmuls (`torch._grouped_mm`) over the tokens sorted by
    /// expert, no host read, capturable in a CUDA graph (bf16 and fp32).
    Grouped,
    /// One expert after another, each on its slice of the sorted tokens (its size read on the
    /// host once per layer).
    Loop,
}

/// What MoE's grouped experts recompute in backward instead of keeping from forward (the values
/// are the same either way; the router's weight gradient is not, see
/// [`Kernels::moe_node_applies`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MoeRecompute {
    /// Nothing: libtorch's autograd over the grouped matmuls and our SwiGLU kernel keeps the
    /// gathered rows, the gate/up output and the SwiGLU output, and the router its fp32 rows.
    Off,
    /// The experts as one node (fast/csrc/grouped_experts.h) that recomputes the gathered input
    /// rows and the SwiGLU output (a gather and one element-wise pass per layer); the gate/up
    /// projection's output is kept.
    Swiglu,
    /// Also the gate/up projection (one more grouped matmul per layer): only the layer's input
    /// rows are kept.
    GateUp,
}

/// The kernel choices of a run. Every field changes what the GPU executes (never the formula:
/// the results agree within the tolerances `fast kernels` and `verify` check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct KernelConfig {
    /// fused: our CUDA kernels wherever they apply (bf16 on CUDA, a `--features cuda` build);
    /// libtorch: libtorch's ops only.
    #[arg(long, value_enum, default_value_t = KernelChoice::Fused)]
    pub kernels: KernelChoice,
    /// With --kernels fused: fused = our attention kernels (head dims 64, 80, 96, 128; causal,
    /// packed documents or bidirectional; qk-norm fused), sdpa = our RoPE layout kernel then
    /// libtorch's SDPA (causal without qk-norm; libtorch's ops otherwise).
    #[arg(long, value_enum, default_value_t = AttentionChoice::Fused)]
    pub attention: AttentionChoice,
    /// With --kernels fused: how the fp32 weights become the projections' bf16 operands.
    #[arg(long, value_enum, default_value_t = WeightCast::Fused)]
    pub weight_cast: WeightCast,
    /// With --kernels fused: the lm_head's cross-entropy in our kernel or libtorch's under
    /// autograd.
    #[arg(long, value_enum, default_value_t = CrossEntropyChoice::Fused)]
    pub cross_entropy: CrossEntropyChoice,
    /// RMSNorm of fp32 inputs on CUDA (outside our bf16 kernels): libtorch's fused op or the
    /// composed formula.
    #[arg(long, value_enum, default_value_t = RmsNormChoice::Fused)]
    pub rms_norm: RmsNormChoice,
    /// Positions per lm_head + loss chunk of a micro-step (0 = the whole batch at once): the
    /// [positions, vocab] logits never exist whole.
    #[arg(long, alias = "loss_chunk_rows", default_value_t = 8192)]
    pub loss_chunk_rows: usize,
    /// Data parallel on GPUs: start each bucket's all-reduce while backward computes the layers
    /// below it (off: reduce everything after backward).
    #[arg(long, alias = "dp_overlap", value_enum, default_value_t = OnOff::On)]
    pub dp_overlap: OnOff,
    /// Layers per overlapped all-reduce bucket (2 layers of the 26M model: 22.6 MB, about the
    /// 25 MB of torch DDP's default bucket).
    #[arg(long, alias = "dp_bucket_layers", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub dp_bucket_layers: u64,
    /// MoE: the routed experts as grouped matmuls where they apply (bf16, fp32), or one expert
    /// after another (always the case in fp64).
    #[arg(long, alias = "moe_experts", value_enum, default_value_t = MoeExperts::Grouped)]
    pub moe_experts: MoeExperts,
    /// MoE with grouped experts: what backward recomputes instead of keeping from forward;
    /// swiglu = the gathered rows and the SwiGLU output (the experts as one node), gate-up =
    /// also the gate/up projection (one more grouped matmul per layer), off = nothing
    /// (autograd).
    /// With swiglu and gate-up the router's weight gradient comes from the rows the experts read
    /// (bf16 under mixed precision).
    #[arg(long, alias = "moe_recompute", value_enum, default_value_t = MoeRecompute::Swiglu)]
    pub moe_recompute: MoeRecompute,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            kernels: KernelChoice::Fused,
            attention: AttentionChoice::Fused,
            weight_cast: WeightCast::Fused,
            cross_entropy: CrossEntropyChoice::Fused,
            rms_norm: RmsNormChoice::Fused,
            loss_chunk_rows: 8192,
            dp_overlap: OnOff::On,
            dp_bucket_layers: 2,
            moe_experts: MoeExperts::Grouped,
            moe_recompute: MoeRecompute::Swiglu,
        }
    }
}

impl KernelConfig {
    /// libtorch's ops only (the reference point `fast kernels` compares against).
    pub fn libtorch() -> Self {
        KernelConfig {
            kernels: KernelChoice::Libtorch,
            ..KernelConfig::default()
        }
    }
}

/// The kind of attention mask a layer needs (its tensors stay with the model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    Causal,
    Segments,
    Bidirectional,
}

/// Which attention a layer runs (see [`Kernels::attention_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// Our attention kernels over the merged q/k/v projection.
    Own,
    /// The merged projection, our RoPE + layout kernel, then libtorch's SDPA.
    MergedSdpa,
    /// Three projections, RoPE and repeat_kv as libtorch ops, libtorch's SDPA.
    Libtorch,
}

/// A [`KernelConfig`] applied to this binary: what the model and the training step ask before
/// each fused kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    pub config: KernelConfig,
    /// Our kernels may run at all: chosen, and compiled in.
    fused: bool,
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels::new(KernelConfig::default())
    }
}

impl Kernels {
    pub fn new(config: KernelConfig) -> Self {
        Kernels {
            config,
            fused: config.kernels == KernelChoice::Fused && BUILT_WITH_CUDA,
        }
    }

    /// Whether our kernels may run (chosen and compiled in); each op still checks its inputs.
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Our bf16 path applies to this activation: on CUDA, with bf16 compute.
    fn bf16_cuda(&self, x: &Tensor, compute: Kind) -> bool {
        self.fused && compute == Kind::BFloat16 && x.device().is_cuda()
    }

    /// Our RMSNorm kernels (norm written straight to bf16): fp32 x and weight, width a multiple
    /// of 8 up to 1024.
    pub fn rms_norm_applies(&self, x: &Tensor, w: &Tensor, compute: Kind) -> bool {
        let d = w.size().first().copied().unwrap_or(0);
        self.bf16_cuda(x, compute)
            && x.kind() == Kind::Float
            && w.kind() == Kind::Float
            && d % 8 == 0
            && d <= 1024
    }

    /// libtorch's single `rms_norm` op for fp32 x and weight on CUDA.
    pub fn libtorch_rms_norm_applies(&self, x: &Tensor, w: &Tensor) -> bool {
        self.config.rms_norm == RmsNormChoice::Fused
            && x.kind() == Kind::Float
            && w.kind() == Kind::Float
            && x.device().is_cuda()
    }

    /// The attention a layer runs for input x `[B, T, d]` with these RoPE tables.
    pub fn attention_path(
        &self,
        x: &Tensor,
        cos: &Tensor,
        head_dim: i64,
        qk_norm: bool,
        mask: MaskKind,
        compute: Kind,
    ) -> AttentionPath {
        if !self.bf16_cuda(x, compute) || cos.kind() != Kind::Float || head_dim % 16 != 0 {
            return AttentionPath::Libtorch;
        }
        let batch = x.size().first().copied().unwrap_or(0);
        if matches!(head_dim, 64 | 80 | 96 | 128)
            && batch <= 65_535
            && self.config.attention == AttentionChoice::Fused
        {
            // Every mask and the qk-norm run inside our kernels.
            AttentionPath::Own
        } else if qk_norm || mask != MaskKind::Causal {
            AttentionPath::Libtorch
        } else {
            AttentionPath::MergedSdpa
        }
    }

    /// Our SwiGLU kernel over one merged gate/up matmul: FFN width a multiple of 8.
    pub fn swiglu_applies(&self, x: &Tensor, ffn: i64, compute: Kind) -> bool {
        self.bf16_cuda(x, compute) && ffn % 8 == 0
    }

    /// The residual add fused into the next norm: a bf16 branch output of x's shape.
    pub fn add_rms_norm_applies(&self, x: &Tensor, a: &Tensor, w: &Tensor, compute: Kind) -> bool {
        self.rms_norm_applies(x, w, compute) && a.kind() == Kind::BFloat16 && x.size() == a.size()
    }

    /// A MoE layer's residual add, norm and router logits in one kernel
    /// ([`fused::moe_norm_router`]): the add-norm's conditions, an fp32 router of at most 16
    /// experts on x's device, and the routed experts on the grouped path (which takes their rows
    /// in bf16; the loop takes them in fp32).
    pub fn moe_norm_router_applies(
        &self,
        x: &Tensor,
        a: &Tensor,
        norm: &Tensor,
        router: &Tensor,
        compute: Kind,
        width: i64,
    ) -> bool {
        let d = norm.size().first().copied().unwrap_or(0);
        let e = router.size().first().copied().unwrap_or(0);
        self.add_rms_norm_applies(x, a, norm, compute)
            && self.moe_grouped_applies(x, compute, d, width)
            && router.kind() == Kind::Float
            && router.device() == x.device()
            && router.size() == [e, d]
            && (1..=16).contains(&e)
    }

    /// A MoE layer's weighted combine as one kernel ([`fused::moe_combine`]): the experts'
    /// outputs ys in bf16 on CUDA (with our kernels), a width that is a multiple of 8, fp32
    /// routing weights.
    pub fn moe_combine_applies(&self, ys: &Tensor, w: &Tensor) -> bool {
        self.bf16_cuda(ys, ys.kind())
            && ys.kind() == Kind::BFloat16
            && w.kind() == Kind::Float
            && ys.size().last().is_some_and(|d| d % 8 == 0)
    }

    /// The lm_head + cross-entropy by hand with our loss kernel: a bf16 hidden state on CUDA,
    /// bf16 compute, an fp32 loss.
    pub fn cross_entropy_applies(&self, h: &Tensor, compute: Kind, loss_kind: Kind) -> bool {
        self.config.cross_entropy == CrossEntropyChoice::Fused
            && self.bf16_cuda(h, compute)
            && h.kind() == Kind::BFloat16
            && loss_kind == Kind::Float
    }

    /// Our weight-cast node for these fp32 weights (else cat + cast under autograd).
    pub fn weight_cast_applies(&self, ws: &[&Tensor]) -> bool {
        self.fused
            && self.config.weight_cast == WeightCast::Fused
            && ws.iter().all(|w| w.kind() == Kind::Float)
    }

    /// Positions per lm_head + loss chunk (`None`: the whole batch).
    pub fn loss_chunk_rows(&self) -> Option<i64> {
        match self.config.loss_chunk_rows {
            0 => None,
            n => Some(n as i64),
        }
    }

    /// A MoE layer's routed experts as grouped matmuls (`torch._grouped_mm`, libtorch's own op,
    /// whatever `--kernels` says) for activations `x` in `compute`, model width `hidden`, expert
    /// width `width`: chosen (`--moe-experts grouped`), bf16 or fp32 compute (libtorch has no
    /// fp64 grouped matmul), and both widths whole 16-byte rows, as the op requires of its
    /// strides: multiples of 8 on CUDA (its bf16 kernel), of 16 bytes' worth of `compute`
    /// elsewhere (4 in fp32, 8 in bf16). Otherwise the per-expert loop.
    pub fn moe_grouped_applies(&self, x: &Tensor, compute: Kind, hidden: i64, width: i64) -> bool {
        let align = if x.device().is_cuda() || compute == Kind::BFloat16 {
            8
        } else {
            4
        };
        self.config.moe_experts == MoeExperts::Grouped
            && matches!(compute, Kind::BFloat16 | Kind::Float)
            && hidden % align == 0
            && width % align == 0
    }

    /// The routed experts as one autograd node whose backward recomputes per
    /// `--moe-recompute` (fast/csrc/grouped_experts.h), and the router's weight gradient from
    /// the rows in the compute kind ([`ops::linear_saving_rounded`]; the model's fused MoE entry
    /// takes it from the fp32 norm instead): `--moe-recompute swiglu` or `gate-up` on the
    /// grouped path. The node's SwiGLU is our kernel where
    /// [`Self::moe_fused_applies`], libtorch's ops elsewhere ([`ops::grouped_experts`]).
    pub fn moe_node_applies(&self, x: &Tensor, compute: Kind, hidden: i64, width: i64) -> bool {
        self.moe_recomputes() && self.moe_grouped_applies(x, compute, hidden, width)
    }

    /// The node of [`Self::moe_node_applies`] with our SwiGLU kernels ([`fused::grouped_experts`]):
    /// bf16 on CUDA (where the grouped path already needs both widths to be multiples of 8).
    pub fn moe_fused_applies(&self, x: &Tensor, compute: Kind, hidden: i64, width: i64) -> bool {
        self.moe_node_applies(x, compute, hidden, width) && self.swiglu_applies(x, width, compute)
    }

    /// Whether `--moe-recompute` is `swiglu` or `gate-up`.
    pub fn moe_recomputes(&self) -> bool {
        self.config.moe_recompute != MoeRecompute::Off
    }

    /// Whether the MoE experts node recomputes the gate/up projection (`--moe-recompute gate-up`).
    pub fn moe_recomputes_gate_up(&self) -> bool {
        self.config.moe_recompute == MoeRecompute::GateUp
    }

    /// Why a CUDA graph cannot capture a MoE layer of these widths in `compute`, if it cannot.
    /// Only the grouped path in bf16 reads nothing on the host: the loop reads each expert's
    /// token count, and libtorch's grouped matmul on CUDA outside bf16 loops over the groups
    /// with their sizes read on the host. (Its bf16 kernel also needs an sm90/sm100 GPU, which
    /// `train::graph` checks.)
    pub fn moe_graph_refusal(
        &self,
        compute: Kind,
        hidden: i64,
        width: i64,
    ) -> Option<&'static str> {
        if self.config.moe_experts == MoeExperts::Loop {
            return Some(
                "MoE with --moe-experts loop reads each expert's token count on the host, which \
                 a graph cannot capture; use --moe-experts grouped",
            );
        }
        if compute != Kind::BFloat16 {
            return Some(
                "MoE's grouped expert matmuls run without a host read only in bf16 (in fp32 \
                 libtorch reads the group sizes on the host; fp64 runs the per-expert loop); use \
                 --dtype bfloat16",
            );
        }
        if hidden % 8 != 0 || width % 8 != 0 {
            return Some(
                "MoE's grouped expert matmuls need --hidden-size and the expert width to be \
                 multiples of 8 on CUDA (otherwise the experts run as --moe-experts loop, which \
                 reads the host)",
            );
        }
        None
    }

    /// One line for the start of a run: the choices and what this build and device make of them.
    pub fn describe(&self, cuda: bool, compute: Kind) -> String {
        let c = &self.config;
        let ours = if !BUILT_WITH_CUDA && c.kernels == KernelChoice::Fused {
            "libtorch ops (this binary has no --features cuda, so --kernels fused has no kernels to use)".to_string()
        } else if !self.fused {
            "libtorch ops (--kernels libtorch)".to_string()
        } else if !cuda || compute != Kind::BFloat16 {
            "libtorch ops (our fused kernels run for bf16 on CUDA only)".to_string()
        } else {
            format!(
                "fused (ours: RMSNorm, SwiGLU; attention {}; weight cast {}; cross-entropy {})",
                match c.attention {
                    AttentionChoice::Fused =>
                        "ours for head dims 64/80/96/128 (every mask, qk-norm fused), else SDPA",
                    AttentionChoice::Sdpa => "SDPA",
                },
                match c.weight_cast {
                    WeightCast::Fused => "fused",
                    WeightCast::Autograd => "autograd",
                },
                match c.cross_entropy {
                    CrossEntropyChoice::Fused => "fused",
                    CrossEntropyChoice::Autograd => "autograd",
                }
            )
        };
        format!(
            "kernels: {ours}; rms-norm {}; loss chunks of {}; dp overlap {} ({} layers per bucket); \
             MoE experts {} (backward recomputes {})",
            match c.rms_norm {
                RmsNormChoice::Fused => "fused",
                RmsNormChoice::Composed => "composed",
            },
            match c.loss_chunk_rows {
                0 => "the whole batch".to_string(),
                n => format!("{n} positions"),
            },
            match c.dp_overlap {
                OnOff::On => "on",
                OnOff::Off => "off",
            },
            c.dp_bucket_layers,
            match c.moe_experts {
                MoeExperts::Grouped => "grouped (bf16/fp32; fp64 loops)",
                MoeExperts::Loop => "loop",
            },
            match c.moe_recompute {
                MoeRecompute::Off => "nothing",
                MoeRecompute::Swiglu => "rows and SwiGLU",
                MoeRecompute::GateUp => "rows, gate/up and SwiGLU",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Without `--features cuda`, or with `--kernels libtorch`, no fused kernel is ever asked for.
    #[test]
    fn the_fused_path_needs_the_choice_and_the_build() {
        let x = Tensor::zeros([2, 3, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([8], (Kind::Float, Device::Cpu));
        let lib = Kernels::new(KernelConfig::libtorch());
        assert!(!lib.fused());
        assert!(!lib.weight_cast_applies(&[&w]));
        assert_eq!(Kernels::default().fused(), BUILT_WITH_CUDA);
        // On the CPU nothing of ours applies, whatever the choice.
        let k = Kernels::default();
        assert!(!k.rms_norm_applies(&x, &w, Kind::BFloat16));
        assert_eq!(
            k.attention_path(&x, &w, 64, false, MaskKind::Causal, Kind::BFloat16),
            AttentionPath::Libtorch
        );
        assert!(!k.libtorch_rms_norm_applies(&x, &w));
    }

    #[test]
    fn loss_chunks_of_zero_mean_the_whole_batch() {
        let mut c = KernelConfig::default();
        assert_eq!(Kernels::new(c).loss_chunk_rows(), Some(8192));
        c.loss_chunk_rows = 0;
        assert_eq!(Kernels::new(c).loss_chunk_rows(), None);
    }

    /// The grouped experts run for bf16 and fp32 (on the CPU too: libtorch's op, not ours) and
    /// not for fp64 or `--moe-experts loop`; a graph is refused naming the option or the dtype.
    #[test]
    fn moe_experts_are_grouped_for_bf16_and_fp32_only() {
        let x = Tensor::zeros([2, 3, 8], (Kind::Float, Device::Cpu));
        let grouped = Kernels::default();
        let looped = Kernels::new(KernelConfig {
            moe_experts: MoeExperts::Loop,
            ..KernelConfig::default()
        });
        for k in [grouped, Kernels::new(KernelConfig::libtorch())] {
            assert!(k.moe_grouped_applies(&x, Kind::BFloat16, 8, 24));
            assert!(k.moe_grouped_applies(&x, Kind::Float, 8, 24));
            assert!(!k.moe_grouped_applies(&x, Kind::Double, 8, 24));
            // The op's 16-byte strides: 4 fp32 or 8 bf16 elements a row on the CPU.
            assert!(k.moe_grouped_applies(&x, Kind::Float, 12, 20));
            assert!(!k.moe_grouped_applies(&x, Kind::Float, 6, 24));
            assert!(!k.moe_grouped_applies(&x, Kind::Float, 8, 7));
            assert!(!k.moe_grouped_applies(&x, Kind::BFloat16, 12, 24));
        }
        assert!(!looped.moe_grouped_applies(&x, Kind::BFloat16, 8, 24));
        assert_eq!(grouped.moe_graph_refusal(Kind::BFloat16, 512, 1408), None);
        let why = looped.moe_graph_refusal(Kind::BFloat16, 512, 1408).unwrap();
        assert!(why.contains("--moe-experts"), "{why}");
        for compute in [Kind::Float, Kind::Double] {
            let why = grouped.moe_graph_refusal(compute, 512, 1408).unwrap();
            assert!(why.contains("--dtype bfloat16"), "{why}");
        }
        let why = grouped
            .moe_graph_refusal(Kind::BFloat16, 516, 1408)
            .unwrap();
        assert!(why.contains("multiples of 8"), "{why}");
    }

    /// Saved run configurations without the kernel fields read back as the defaults.
    #[test]
    fn a_config_without_kernel_fields_reads_as_the_defaults() {
        let c: KernelConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, KernelConfig::default());
        let c: KernelConfig = serde_json::from_str(r#"{"attention": "sdpa"}"#).unwrap();
        assert_eq!(c.attention, AttentionChoice::Sdpa);
        let c: KernelConfig = serde_json::from_str(r#"{"moe_recompute": "gate-up"}"#).unwrap();
        assert_eq!(c.moe_recompute, MoeRecompute::GateUp);
    }
}

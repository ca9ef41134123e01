//! Numeric precision and device of a run.
//!
//! - `fp32`: fp32 parameters and math (CPU or CUDA). libtorch leaves TF32 off for CUDA matmuls
//!   by default (`allow_tf32 = false` since PyTorch 1.12), so fp32 results are true fp32; we never
//!   turn it on, which verification relies on.
//! - `bf16`: MiniMind's default: fp32 master weights, bf16 matmuls/attention, RMSNorm, RoPE,
//!   router softmax and loss in fp32 (see `model` for why the casts are explicit). No scaler.
//! - `fp16`: as bf16 with fp16 matmuls, plus a `GradScaler`.
//! - `fp64`: fp64 everything (CPU verification of the formulas to round-off).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use tch::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
    Fp64,
}

impl Precision {
    /// Kind of the parameters, gradients and optimizer state.
    pub fn param_kind(self) -> Kind {
        match self {
            Precision::Fp64 => Kind::Double,
            _ => Kind::Float,
        }
    }

    /// Kind of the matmuls.
    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
            Precision::Fp64 => Kind::Double,
        }
    }

    /// fp16 needs dynamic loss scaling; bf16's 8-bit exponent does not.
    pub fn needs_scaler(self) -> bool {
        self == Precision::Fp16
    }

    pub fn is_mixed(self) -> bool {
        matches!(self, Precision::Bf16 | Precision::Fp16)
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "fp32" | "float32" | "f32" => Precision::Fp32,
            "bf16" | "bfloat16" => Precision::Bf16,
            "fp16" | "float16" | "f16" | "half" => Precision::Fp16,
            "fp64" | "float64" | "f64" | "double" => Precision::Fp64,
            other => bail!("unknown precision {other:?}: expected fp32, bf16, fp16 or fp64"),
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp64 => "fp64",
        })
    }
}

/// On a GPU the host thread only copies batches into pinned memory; libtorch's default of one
/// OpenMP thread per core would then compete with the data loader's workers, and a parallel
/// copy waits for its slowest, descheduled thread (with the default threads a graphed 26M run
/// trained at about a third of its speed; torchrun sets OMP_NUM_THREADS=1 for the same reason).
/// So CUDA runs use one intra-op thread unless OMP_NUM_THREADS says otherwise.
pub fn host_threads_for(device: tch::Device) {
    if device.is_cuda() && std::env::var_os("OMP_NUM_THREADS").is_none() {
        tch::set_num_threads(1);
    }
}

/// `auto` (CUDA if available, else the CPU), `cpu`, `cuda` or `cuda:N`, checked against the
/// devices this libtorch sees.
pub fn parse_device(device: &str) -> Result<tch::Device> {
    let cuda = tch::Cuda::is_available();
    let n = tch::Cuda::device_count();
    Ok(match device {
        "auto" => {
            if cuda {
                tch::Device::Cuda(0)
            } else {
                tch::Device::Cpu
            }
        }
        "cpu" => tch::Device::Cpu,
        "cuda" => {
            if !cuda {
                bail!("--device cuda: CUDA is not available to this libtorch (no driver or no GPU); use --device cpu");
            }
            tch::Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) if cuda && (i as i64) < n => tch::Device::Cuda(i),
            Some(Ok(i)) => {
                bail!("--device {other}: CUDA sees {n} device(s), so cuda:{i} is unusable")
            }
            _ => bail!("--device {other:?} is not one of auto, cpu, cuda, cuda:N"),
        },
    })
}

pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

/// torch's name of a floating kind (`bfloat16`, `float32`, ...), for messages.
pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        _ => "a non-float kind",
    }
}

//! Numeric precision of a run.
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

use anyhow::bail;
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

/// `auto` (CUDA if available, else the CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    Ok(match s {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => bail!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N"),
        },
    })
}

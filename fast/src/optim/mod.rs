//! The optimizer step's parts: AdamW, Muon, joint gradient clipping, fp16's GradScaler, the
//! learning-rate schedules and gradient accumulation; [`OptimizerConfig`] is the run's choice.
pub mod accumulation;
pub mod adamw;
pub mod clip;
pub mod muon;
pub mod scaler;
pub mod schedule;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use muon::{AdjustLr, MuonConfig};

/// `--optimizer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW for every parameter (MiniMind).
    #[default]
    Adamw,
    /// Muon for the 2-D weights inside the blocks, AdamW for the rest.
    Muon,
}

/// Newton-Schulz coefficients (a, b, c), given as `a,b,c`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NsCoefficients(pub f64, pub f64, pub f64);

impl std::fmt::Display for NsCoefficients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{}", self.0, self.1, self.2)
    }
}

impl std::str::FromStr for NsCoefficients {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{s:?}: {e} (expected three numbers a,b,c)"))?;
        match v.as_slice() {
            [a, b, c] if v.iter().all(|x| x.is_finite()) => Ok(NsCoefficients(*a, *b, *c)),
            _ => Err(format!("{s:?}: expected three finite numbers a,b,c")),
        }
    }
}

/// Which optimizer a run uses and Muon's hyper-parameters (printed and saved with the run).
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// adamw: AdamW for every parameter (MiniMind); muon: Muon for the 2-D weights inside the
    /// blocks (attention q/k/v/o, MLP and expert gate/up/down), AdamW at --learning-rate for the
    /// embedding (and tied head), the norms and the MoE router.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    pub optimizer: OptimizerKind,
    /// Muon's peak learning rate; it follows --lr-schedule as --learning-rate does.
    #[arg(long, default_value_t = 0.02)]
    pub muon_lr: f64,
    /// Muon's momentum.
    #[arg(long, default_value_t = 0.95)]
    pub muon_momentum: f64,
    /// Nesterov momentum (true | false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub muon_nesterov: bool,
    /// Muon's decoupled weight decay (torch.optim.Muon's default is 0.1; 0 is what the 26M
    /// poems runs in docs/performance.md measured).
    #[arg(long, default_value_t = 0.0)]
    pub muon_weight_decay: f64,
    /// Newton-Schulz iterations.
    #[arg(long, default_value_t = 5)]
    pub muon_ns_steps: usize,
    /// Newton-Schulz coefficients a,b,c of X <- aX + (bA + cA^2)X, A = XX^T.
    #[arg(long, default_value_t = NsCoefficients(3.4445, -4.7750, 2.0315))]
    pub muon_ns_coefficients: NsCoefficients,
    /// Floor of the Frobenius norm Newton-Schulz divides by.
    #[arg(long, default_value_t = 1e-7)]
    pub muon_eps: f64,
    /// Shape scaling of Muon's rate for a matrix [A, B]: original sqrt(max(1, A/B)) or
    /// match-rms-adamw 0.2 sqrt(max(A, B)).
    #[arg(long, value_enum, default_value_t = AdjustLr::Original)]
    pub muon_adjust_lr: AdjustLr,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        let m = MuonConfig::default();
        OptimizerConfig {
            optimizer: OptimizerKind::Adamw,
            muon_lr: 0.02,
            muon_momentum: m.momentum,
            muon_nesterov: m.nesterov,
            muon_weight_decay: 0.0,
            muon_ns_steps: m.ns_steps,
            muon_ns_coefficients: NsCoefficients(
                m.ns_coefficients.0,
                m.ns_coefficients.1,
                m.ns_coefficients.2,
            ),
            muon_eps: m.eps,
            muon_adjust_lr: m.adjust_lr,
        }
    }
}

impl OptimizerConfig {
    /// Refuses impossible values, naming the option.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("--{name} must be a positive number (got {v})");
            }
            Ok(())
        };
        positive("muon-lr", self.muon_lr)?;
        positive("muon-eps", self.muon_eps)?;
        if !(0.0..1.0).contains(&self.muon_momentum) {
            bail!(
                "--muon-momentum must be in [0, 1) (got {})",
                self.muon_momentum
            );
        }
        if !(self.muon_weight_decay.is_finite() && self.muon_weight_decay >= 0.0) {
            bail!(
                "--muon-weight-decay must be zero or positive (got {})",
                self.muon_weight_decay
            );
        }
        if self.muon_ns_steps == 0 {
            bail!("--muon-ns-steps must be at least 1");
        }
        Ok(())
    }

    /// Muon's hyper-parameters.
    pub fn muon(&self) -> MuonConfig {
        let NsCoefficients(a, b, c) = self.muon_ns_coefficients;
        MuonConfig {
            weight_decay: self.muon_weight_decay,
            momentum: self.muon_momentum,
            nesterov: self.muon_nesterov,
            ns_coefficients: (a, b, c),
            eps: self.muon_eps,
            ns_steps: self.muon_ns_steps,
            adjust_lr: self.muon_adjust_lr,
        }
    }

    /// The trainer's Muon settings for a run at peak rate `learning_rate`; `None` for AdamW.
    pub fn muon_settings(&self, learning_rate: f64) -> Option<crate::train::trainer::MuonSettings> {
        (self.optimizer == OptimizerKind::Muon).then(|| crate::train::trainer::MuonSettings {
            cfg: self.muon(),
            lr_ratio: self.muon_lr / learning_rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_coefficients_parse_three_numbers_and_name_what_is_wrong() {
        let c: NsCoefficients = "3.4445, -4.7750,2.0315".parse().unwrap();
        assert_eq!(c, NsCoefficients(3.4445, -4.775, 2.0315));
        assert_eq!(c.to_string().parse::<NsCoefficients>().unwrap(), c);
        let e = "1,2".parse::<NsCoefficients>().unwrap_err();
        assert!(e.contains("three"), "{e}");
        let e = "1,x,2".parse::<NsCoefficients>().unwrap_err();
        assert!(e.contains("\"1,x,2\""), "{e}");
        assert!("1,inf,2".parse::<NsCoefficients>().is_err());
    }

    #[test]
    fn muon_options_are_validated_by_name() {
        let bad = |f: fn(&mut OptimizerConfig)| {
            let mut c = OptimizerConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.muon_lr = 0.0).contains("--muon-lr"));
        assert!(bad(|c| c.muon_momentum = 1.0).contains("--muon-momentum"));
        assert!(bad(|c| c.muon_ns_steps = 0).contains("--muon-ns-steps"));
        assert!(bad(|c| c.muon_weight_decay = -1.0).contains("--muon-weight-decay"));
        assert!(OptimizerConfig::default().validate().is_ok());
    }
}

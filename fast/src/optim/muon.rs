//! Muon (PyTorch 2.11's `torch.optim.Muon`) for the 2-D weights inside the blocks, batched over
//! matrices of one shape so the whole step is a few launches per shape and can be captured in a
//! CUDA graph.
//!
//! One step for a matrix parameter P [A, B] with gradient G, in torch's order:
//! - `buf = lerp(buf, G, 1 - momentum)` (buf starts at 0);
//! - `U = lerp(G, buf, momentum)` with Nesterov, else `U = buf`;
//! - `O = NS(U)`, Newton-Schulz ([`newton_schulz`]) in `ns_kind`;
//! - `P *= 1 - lr * weight_decay`; `P -= lr * ratio * O`, `ratio` = `sqrt(max(1, A / B))`
//!   ("original", torch's default) or `0.2 * sqrt(max(A, B))` ("match_rms_adamw").
//!
//! Matrices are grouped by their shape up to transposition: NS of G^T is NS(G)^T (the iteration
//! is an odd matrix polynomial), so a tall matrix is stored and orthogonalised transposed, and
//! MiniMind's gate/up [I, H] and down [H, I] projections share one batch. Each group keeps one
//! momentum buffer [n, min(A, B), max(A, B)] and runs NS as batched matmuls (`baddbmm`).
//!
//! torch casts U to bfloat16 for NS; here NS runs in the model's compute kind (bfloat16 under
//! `--dtype bfloat16`, as torch; float32 / float64 otherwise, which is what lets the fp64 CPU
//! path equal the reference's float64 Muon to round-off).
//!
//! The learning rate lives in a device tensor refilled before each step, and a step flagged
//! non-finite (`found`) leaves weights and buffers as they were, all without a host read.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How the lr is scaled per matrix shape (torch's `adjust_lr_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AdjustLr {
    /// Keller Jordan's `sqrt(max(1, A / B))` (torch's default, "original").
    #[default]
    Original,
    /// Moonshot's `0.2 * sqrt(max(A, B))`, RMS-matched to AdamW ("match_rms_adamw").
    MatchRmsAdamw,
}

/// Muon's hyper-parameters; defaults are torch's (lr is set per step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MuonConfig {
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
    /// (a, b, c) of the quintic iteration `X <- a X + (b A + c A^2) X`, `A = X X^T`.
    pub ns_coefficients: (f64, f64, f64),
    /// Floor of the Frobenius norm the input is divided by.
    pub eps: f64,
    pub ns_steps: usize,
    pub adjust_lr: AdjustLr,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            weight_decay: 0.1,
            momentum: 0.95,
            nesterov: true,
            ns_coefficients: (3.4445, -4.7750, 2.0315),
            eps: 1e-7,
            ns_steps: 5,
            adjust_lr: AdjustLr::Original,
        }
    }
}

impl MuonConfig {
    /// `lr`'s factor for a parameter of `rows x cols` ([`AdjustLr`]).
    pub fn lr_ratio(&self, rows: i64, cols: i64) -> f64 {
        let (a, b) = (rows as f64, cols as f64);
        match self.adjust_lr {
            AdjustLr::Original => (a / b).max(1.0).sqrt(),
            AdjustLr::MatchRmsAdamw => 0.2 * a.max(b).sqrt(),
        }
    }
}

/// Whether training gives `name` to Muon: a matrix inside a block (attention q/k/v/o, MLP and
/// expert gate/up/down), not the MoE router `mlp.gate.weight`. Embeddings (the tied head), norms
/// and the router go to AdamW.
pub fn is_muon_param(name: &str, shape: &[i64]) -> bool {
    shape.len() == 2 && name.starts_with("model.layers.") && !name.ends_with(".mlp.gate.weight")
}

/// Newton-Schulz on a batch `x` [n, r, c] with r <= c: each matrix divided by
/// `max(||X||_F, eps)`, then `steps` times `A = X X^T; B = b A + c A A; X = a X + B X`.
pub fn newton_schulz(x: &Tensor, (a, b, c): (f64, f64, f64), steps: usize, eps: f64) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2.0, [-2i64, -1].as_slice(), true)
        .clamp_min(eps);
    let mut x = x / norm;
    for _ in 0..steps {
        let gram = x.matmul(&x.transpose(-2, -1));
        let update = gram.baddbmm(&gram, &gram, b, c);
        x = x.baddbmm(&update, &x, a, 1.0);
    }
    x
}

/// Matrices of one shape up to transposition.
struct Group {
    /// Indices into the parameter list the optimizer was built on, and whether each is stored
    /// transposed (its rows > cols).
    members: Vec<(usize, bool)>,
    /// `[n, r, c]`, r <= c, the parameters' kind.
    momentum: Tensor,
    /// Per member: `ratio` of [`MuonConfig::lr_ratio`] for its own shape.
    ratios: Vec<f64>,
}

pub struct Muon {
    pub cfg: MuonConfig,
    groups: Vec<Group>,
    ns_kind: Kind,
    /// `[1]` device learning rate (fp64 for fp64 CPU parameters, else fp32).
    lr: Tensor,
}

impl Muon {
    /// Muon over `params[i]` for each i of `indices` (all matrices), NS in `ns_kind`.
    pub fn new(
        params: &[Tensor],
        indices: &[usize],
        cfg: MuonConfig,
        ns_kind: Kind,
    ) -> Result<Self> {
        let mut groups: Vec<((i64, i64), Group)> = Vec::new();
        let mut device = Device::Cpu;
        let mut kind = Kind::Float;
        for &i in indices {
            let p = &params[i];
            let &[rows, cols] = p.size().as_slice() else {
                bail!(
                    "Muon needs matrices; parameter {i} has shape {:?}",
                    p.size()
                );
            };
            device = p.device();
            kind = p.kind();
            let tall = rows > cols;
            let key = (rows.min(cols), rows.max(cols));
            let ratio = cfg.lr_ratio(rows, cols);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => {
                    g.members.push((i, tall));
                    g.ratios.push(ratio);
                }
                None => groups.push((
                    key,
                    Group {
                        members: vec![(i, tall)],
                        momentum: Tensor::new(),
                        ratios: vec![ratio],
                    },
                )),
            }
        }
        let groups = groups
            .into_iter()
            .map(|((r, c), mut g)| {
                g.momentum = Tensor::zeros([g.members.len() as i64, r, c], (kind, device));
                g
            })
            .collect();
        let lr_kind = if kind == Kind::Double && device == Device::Cpu {
            Kind::Double
        } else {
            Kind::Float
        };
        Ok(Muon {
            cfg,
            groups,
            ns_kind,
            lr: Tensor::zeros([1], (lr_kind, device)),
        })
    }

    /// Writes `lr` into the device tensor the step reads (outside a captured graph).
    pub fn set_lr(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        let _ = self.lr.fill_(lr);
    }

    /// One step at the rate last set; `found` (a one-element device flag, non-zero = skip)
    /// leaves weights and momentum untouched when set.
    pub fn step(&self, params: &[Tensor], grads: &[Tensor], found: Option<&Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let c = self.cfg;
        let skip = found.map(|f| f.reshape([1, 1, 1]).ne(0.0));
        // Skipped: lr 0, so the decay factor is 1 and the update is 0 * 0.
        let lr = match found {
            Some(f) => &self.lr * (1.0 - f.to_kind(self.lr.kind()).reshape([1])),
            None => self.lr.shallow_clone(),
        };
        let decay = 1.0 - &lr * c.weight_decay;
        for g in &self.groups {
            let stacked: Vec<Tensor> = g
                .members
                .iter()
                .map(|&(i, tall)| {
                    if tall {
                        grads[i].tr()
                    } else {
                        grads[i].shallow_clone()
                    }
                })
                .collect();
            let grad = Tensor::f_stack(&stacked, 0)?.to_kind(g.momentum.kind());
            let buf = g.momentum.lerp(&grad, 1.0 - c.momentum);
            let update = if c.nesterov {
                grad.lerp(&buf, c.momentum)
            } else {
                buf.shallow_clone()
            };
            let mut o = newton_schulz(
                &update.to_kind(self.ns_kind),
                c.ns_coefficients,
                c.ns_steps,
                c.eps,
            );
            let mut momentum = g.momentum.shallow_clone();
            match &skip {
                Some(s) => {
                    momentum.f_copy_(&g.momentum.where_self(s, &buf))?;
                    o = o.zeros_like().where_self(s, &o);
                }
                None => {
                    momentum.f_copy_(&buf)?;
                }
            }
            for (j, (&(i, tall), &ratio)) in g.members.iter().zip(&g.ratios).enumerate() {
                let oj = o.select(0, j as i64);
                let oj = if tall { oj.tr() } else { oj };
                let mut p = params[i].detach();
                let _ = p.f_mul_(&decay)?;
                let _ = p.f_sub_(&(oj.to_kind(p.kind()) * (&lr * ratio).to_kind(p.kind())))?;
            }
        }
        Ok(())
    }

    /// The momentum buffer of parameter `index` in that parameter's shape (a view into the
    /// group's buffer: copying into it restores the state).
    pub fn momentum_of(&self, index: usize) -> Option<Tensor> {
        self.groups.iter().find_map(|g| {
            g.members.iter().position(|&(i, _)| i == index).map(|j| {
                let b = g.momentum.select(0, j as i64);
                if g.members[j].1 {
                    b.tr()
                } else {
                    b
                }
            })
        })
    }

    /// Every group's buffer (what a graph's warm-up must leave as it found).
    pub fn buffers(&self) -> Vec<Tensor> {
        self.groups
            .iter()
            .map(|g| g.momentum.shallow_clone())
            .collect()
    }

    /// The kind Newton-Schulz runs in.
    pub fn ns_kind(&self) -> Kind {
        self.ns_kind
    }

    /// (matrices, groups): how the step is batched.
    pub fn layout(&self) -> (usize, usize) {
        (
            self.groups.iter().map(|g| g.members.len()).sum(),
            self.groups.len(),
        )
    }
}

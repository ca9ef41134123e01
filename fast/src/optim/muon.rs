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
    /// Indices into the parameter list the optimizer was built on: the wide ones (rows <=
    /// cols, stored as they are) first in the buffers, then the tall ones (stored transposed).
    wide: Vec<usize>,
    tall: Vec<usize>,
    /// `[n, r, c]`, r <= c, the parameters' kind.
    momentum: Tensor,
    /// `[n, 1, 1]`, the lr's kind: each member's `ratio` ([`MuonConfig::lr_ratio`] for its own
    /// shape).
    ratios: Tensor,
}

impl Group {
    fn members(&self) -> impl Iterator<Item = (usize, bool)> + '_ {
        let wide = self.wide.iter().map(|&i| (i, false));
        wide.chain(self.tall.iter().map(|&i| (i, true)))
    }
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
        let mut keys: Vec<(i64, i64)> = Vec::new();
        let mut members: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
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
            let key = (rows.min(cols), rows.max(cols));
            let g = match keys.iter().position(|k| *k == key) {
                Some(g) => g,
                None => {
                    keys.push(key);
                    members.push((Vec::new(), Vec::new()));
                    keys.len() - 1
                }
            };
            if rows > cols {
                members[g].1.push(i);
            } else {
                members[g].0.push(i);
            }
        }
        let lr_kind = if kind == Kind::Double && device == Device::Cpu {
            Kind::Double
        } else {
            Kind::Float
        };
        let groups = keys
            .into_iter()
            .zip(members)
            .map(|((r, c), (wide, tall))| {
                let n = (wide.len() + tall.len()) as i64;
                let ratios: Vec<f64> = wide
                    .iter()
                    .chain(&tall)
                    .map(|&i| {
                        let s = params[i].size();
                        cfg.lr_ratio(s[0], s[1])
                    })
                    .collect();
                Group {
                    wide,
                    tall,
                    momentum: Tensor::zeros([n, r, c], (kind, device)),
                    ratios: Tensor::from_slice(&ratios)
                        .to_kind(lr_kind)
                        .to_device(device)
                        .view([n, 1, 1]),
                }
            })
            .collect();
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
    /// leaves weights and momentum untouched when set. Per group of matrices: one stack of the
    /// gradients, the momentum and Newton-Schulz as batched ops, then two multi-tensor launches
    /// for every weight of the group (`p *= 1 - lr * wd; p -= lr * ratio * O`).
    pub fn step(&self, params: &[Tensor], grads: &[Tensor], found: Option<&Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let c = self.cfg;
        let skip = found.map(|f| f.reshape([1, 1, 1]).ne(0.0));
        // Skipped: lr 0, so the decay factor is 1 and the update is 0 (NaN replaced below).
        let lr = match found {
            Some(f) => &self.lr * (1.0 - f.to_kind(self.lr.kind()).reshape([1])),
            None => self.lr.shallow_clone(),
        };
        let decay = &lr * (-c.weight_decay) + 1.0;
        for g in &self.groups {
            let stacked: Vec<Tensor> = g
                .members()
                .map(|(i, tall)| {
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
            let o = newton_schulz(
                &update.to_kind(self.ns_kind),
                c.ns_coefficients,
                c.ns_steps,
                c.eps,
            );
            let pk = params[g.members().next().expect("a group has members").0].kind();
            let mut scaled = o.to_kind(pk) * (&g.ratios * &lr).to_kind(pk);
            let mut momentum = g.momentum.shallow_clone();
            match &skip {
                Some(s) => {
                    momentum.f_copy_(&g.momentum.where_self(s, &buf))?;
                    scaled = scaled.zeros_like().where_self(s, &scaled);
                }
                None => {
                    momentum.f_copy_(&buf)?;
                }
            }
            let nw = g.wide.len() as i64;
            let mut targets = Vec::with_capacity(g.wide.len() + g.tall.len());
            let mut updates = Vec::with_capacity(targets.capacity());
            for (j, &i) in g.wide.iter().enumerate() {
                targets.push(params[i].detach());
                updates.push(scaled.select(0, j as i64));
            }
            if !g.tall.is_empty() {
                let back = scaled
                    .narrow(0, nw, g.tall.len() as i64)
                    .transpose(-2, -1)
                    .contiguous();
                for (j, &i) in g.tall.iter().enumerate() {
                    targets.push(params[i].detach());
                    updates.push(back.select(0, j as i64));
                }
            }
            crate::kernels::ops::foreach_scale_sub(&targets, &updates, &decay.to_kind(pk))?;
        }
        Ok(())
    }

    /// The momentum buffer of parameter `index` in that parameter's shape (a view into the
    /// group's buffer: copying into it restores the state).
    pub fn momentum_of(&self, index: usize) -> Option<Tensor> {
        self.groups.iter().find_map(|g| {
            g.members().position(|(i, _)| i == index).map(|j| {
                let b = g.momentum.select(0, j as i64);
                if j >= g.wide.len() {
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

    /// (matrices, groups): how the step is batched.
    pub fn layout(&self) -> (usize, usize) {
        (
            self.groups
                .iter()
                .map(|g| g.wide.len() + g.tall.len())
                .sum(),
            self.groups.len(),
        )
    }

    /// The kind Newton-Schulz runs in.
    pub fn ns_kind(&self) -> Kind {
        self.ns_kind
    }
}

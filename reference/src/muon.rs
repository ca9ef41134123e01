//! Muon (PyTorch 2.11's `torch.optim.Muon`) in float64, and the split used in training: Muon for
//! the 2-D weights inside the blocks, AdamW for everything else.
//!
//! One step for a matrix parameter P [A, B] with gradient G, in torch's order:
//! - `buf = lerp(buf, G, 1 - momentum)` (= momentum * buf + (1 - momentum) * G; buf starts 0);
//! - `U = lerp(G, buf, momentum)` with Nesterov, else `U = buf`;
//! - `O = NS(U)`: Newton-Schulz orthogonalisation ([`zeropower_via_newtonschulz`]);
//! - `P *= 1 - lr * weight_decay` (decoupled decay, with the unadjusted lr);
//! - `P -= adjusted_lr * O`, `adjusted_lr = lr * ratio`: "original" (torch's default)
//!   `sqrt(max(1, A / B))`, "match_rms_adamw" `0.2 * sqrt(max(A, B))`.
//!
//! The one deliberate difference: torch casts U to bfloat16 before Newton-Schulz; here it stays
//! float64, so this is the exact arithmetic that torch's bfloat16 run approximates.
//! `golden/muon` pins both: torch with float64 Newton-Schulz to round-off, and stock torch to a
//! bfloat16-sized tolerance.

use std::collections::BTreeSet;

use ndarray::{Array2, ArrayView2, Zip};

use crate::adamw::{AdamW, AdamWConfig};
use crate::params::zeros_like;
use crate::Params;

/// How the lr is scaled per matrix shape (torch's `adjust_lr_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdjustLr {
    /// Keller Jordan's `sqrt(max(1, A / B))` (torch's `None` / `"original"`).
    #[default]
    Original,
    /// Moonshot's `0.2 * sqrt(max(A, B))`, RMS-matched to AdamW (`"match_rms_adamw"`).
    MatchRmsAdamW,
}

/// Hyper-parameters; defaults are torch's (its default lr, 1e-3, is the caller's `lr`).
#[derive(Debug, Clone, Copy, PartialEq)]
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

/// torch's scalar `lerp(start, end, w)`: `start + w * (end - start)` for |w| < 0.5, else
/// `end - (end - start) * (1 - w)` (its vectorised CPU kernel fuses the same terms with an FMA,
/// which differs by at most an ulp).
fn lerp(start: f64, end: f64, w: f64) -> f64 {
    if w.abs() < 0.5 {
        start + w * (end - start)
    } else {
        end - (end - start) * (1.0 - w)
    }
}

/// Newton-Schulz: G [A, B] -> an approximately orthogonal matrix of the same shape (singular
/// values pushed into roughly [0.5, 1.5]). Works on X = G^T when A > B (so `X X^T` is the small
/// Gram matrix); `X /= max(||X||_F, eps)`; then `ns_steps` times: `A = X X^T`,
/// `B = b A + c A A`, `X = a X + B X`; transposed back.
pub fn zeropower_via_newtonschulz(
    g: ArrayView2<f64>,
    (a, b, c): (f64, f64, f64),
    steps: usize,
    eps: f64,
) -> Array2<f64> {
    let tall = g.nrows() > g.ncols();
    let mut x = if tall { g.t().to_owned() } else { g.to_owned() };
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    x /= norm.max(eps);
    for _ in 0..steps {
        let gram = x.dot(&x.t());
        let update = &gram * b + gram.dot(&gram) * c;
        x = &x * a + update.dot(&x);
    }
    if tall {
        x.reversed_axes().as_standard_layout().to_owned()
    } else {
        x
    }
}

/// `lr` scaled for a parameter of `rows x cols` ([`AdjustLr`]).
pub fn adjusted_lr(lr: f64, adjust: AdjustLr, rows: usize, cols: usize) -> f64 {
    let (a, b) = (rows as f64, cols as f64);
    let ratio = match adjust {
        AdjustLr::Original => (a / b).max(1.0).sqrt(),
        AdjustLr::MatchRmsAdamW => 0.2 * a.max(b).sqrt(),
    };
    lr * ratio
}

/// Muon state: one momentum buffer per (2-D) parameter.
#[derive(Debug, Clone)]
pub struct Muon {
    pub cfg: MuonConfig,
    pub momentum_buffer: Params,
}

impl Muon {
    /// Buffers for every tensor of `params`, which must all be matrices (as torch requires).
    pub fn new(params: &Params, cfg: MuonConfig) -> Self {
        for (name, p) in params {
            assert_eq!(
                p.ndim(),
                2,
                "Muon needs 2-D parameters; {name} is {:?}",
                p.shape()
            );
        }
        Muon {
            cfg,
            momentum_buffer: zeros_like(params),
        }
    }

    /// One step at learning rate `lr` on every tensor of `params` (the module doc's order).
    pub fn step(&mut self, params: &mut Params, grads: &Params, lr: f64) {
        let c = self.cfg;
        for (name, p) in params.iter_mut() {
            let g = grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let buf = self
                .momentum_buffer
                .get_mut(name)
                .unwrap_or_else(|| panic!("no momentum buffer for {name}"));
            Zip::from(&mut *buf)
                .and(g)
                .for_each(|b, &g| *b = lerp(*b, g, 1.0 - c.momentum));
            let update = if c.nesterov {
                Zip::from(g)
                    .and(&*buf)
                    .map_collect(|&g, &b| lerp(g, b, c.momentum))
            } else {
                buf.clone()
            };
            let update: Array2<f64> = update.into_dimensionality().expect("2-D");
            let o = zeropower_via_newtonschulz(update.view(), c.ns_coefficients, c.ns_steps, c.eps);
            let (rows, cols) = o.dim();
            *p *= 1.0 - lr * c.weight_decay;
            p.scaled_add(-adjusted_lr(lr, c.adjust_lr, rows, cols), &o.into_dyn());
        }
    }
}

/// Whether training gives `name` to Muon: a matrix inside a block (attention q/k/v/o, MLP and
/// expert gate/up/down), not the MoE router `mlp.gate.weight`. Embeddings (the tied head), norms
/// and the router go to AdamW.
pub fn is_muon_param(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.starts_with("model.layers.") && !name.ends_with(".mlp.gate.weight")
}

/// Muon on the [`is_muon_param`] tensors, AdamW on the rest, each with its own lr.
#[derive(Debug, Clone)]
pub struct MuonWithAdamW {
    pub muon: Muon,
    pub adamw: AdamW,
    /// Names Muon steps; every other parameter is AdamW's.
    pub muon_names: BTreeSet<String>,
}

impl MuonWithAdamW {
    pub fn new(params: &Params, muon: MuonConfig, adamw: AdamWConfig) -> Self {
        let (m, a) = split(params.clone());
        MuonWithAdamW {
            muon_names: m.keys().cloned().collect(),
            muon: Muon::new(&m, muon),
            adamw: AdamW::new(&a, adamw),
        }
    }

    /// One step of both optimizers (Muon at `muon_lr`, AdamW at `adamw_lr`).
    pub fn step(&mut self, params: &mut Params, grads: &Params, muon_lr: f64, adamw_lr: f64) {
        let (mut m, mut a): (Params, Params) = std::mem::take(params)
            .into_iter()
            .partition(|(n, _)| self.muon_names.contains(n));
        self.muon.step(&mut m, grads, muon_lr);
        self.adamw.step(&mut a, grads, adamw_lr);
        params.extend(m);
        params.extend(a);
    }
}

/// (Muon's tensors, AdamW's tensors).
fn split(params: Params) -> (Params, Params) {
    params
        .into_iter()
        .partition(|(n, t)| is_muon_param(n, t.shape()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{golden_muon, read_json};
    use crate::{params, ModelConfig};
    use ndarray::{ArrayD, IxDyn};
    use serde_json::Value;

    fn config(o: &Value) -> MuonConfig {
        let c = o["ns_coefficients"].as_array().unwrap();
        let f = |v: &Value| v.as_f64().unwrap();
        MuonConfig {
            weight_decay: f(&o["weight_decay"]),
            momentum: f(&o["momentum"]),
            nesterov: o["nesterov"].as_bool().unwrap(),
            ns_coefficients: (f(&c[0]), f(&c[1]), f(&c[2])),
            eps: f(&o["eps"]),
            ns_steps: o["ns_steps"].as_u64().unwrap() as usize,
            adjust_lr: match o["adjust_lr_fn"].as_str() {
                None | Some("original") => AdjustLr::Original,
                Some("match_rms_adamw") => AdjustLr::MatchRmsAdamW,
                Some(other) => panic!("unknown adjust_lr_fn {other}"),
            },
        }
    }

    /// `values[k]` (flat, row-major) shaped as `params[k]["shape"]`, for every k of `values`.
    fn tensors(values: &Value, params: &Value) -> Params {
        values
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shape: Vec<usize> = serde_json::from_value(params[k]["shape"].clone()).unwrap();
                let data: Vec<f64> = serde_json::from_value(v.clone()).unwrap();
                (
                    k.clone(),
                    ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap(),
                )
            })
            .collect()
    }

    /// Runs every case of the fixture; returns per case (name, Newton-Schulz dtype, worst error)
    /// where the error is max |our step - torch's step| / max |torch's step| over tensors and
    /// steps (a step being the change of the weights; the momentum buffers carry on as ours).
    fn replay() -> Vec<(String, String, f64)> {
        let j = read_json(&golden_muon().join("muon_cases.json"));
        let mut out = Vec::new();
        for case in j["cases"].as_array().unwrap() {
            let ps = &case["params"];
            let initial: Value = ps
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v["initial"].clone()))
                .collect::<serde_json::Map<_, _>>()
                .into();
            let mut p = tensors(&initial, ps);
            let mut opt = Muon::new(&p, config(&case["options"]));
            let lr = case["options"]["lr"].as_f64().unwrap();
            let mut worst = 0.0f64;
            for step in case["steps"].as_array().unwrap() {
                let before = p.clone();
                opt.step(&mut p, &tensors(&step["grads"], ps), lr);
                for (k, e) in tensors(&step["after"], ps) {
                    // the step torch took vs ours, relative to torch's step
                    let (theirs, ours) = (&e - &before[&k], &p[&k] - &before[&k]);
                    let scale = theirs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    let err = (&ours - &theirs).iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    worst = worst.max(err / scale);
                }
                // continue from torch's weights so one step's error does not feed the next
                p = tensors(&step["after"], ps);
            }
            out.push((
                case["name"].as_str().unwrap().to_string(),
                case["newton_schulz"].as_str().unwrap().to_string(),
                worst,
            ));
        }
        out
    }

    /// Against torch.optim.Muon with float64 Newton-Schulz: the same operations in the same
    /// order, differing only in matmul summation order and torch's FMA in lerp (~1e-16 each).
    /// Measuring a step as after - before cancels ~1 against ~1 to keep ~0.02, which alone costs
    /// ~1e-16 / 0.02 = 5e-15 of the step; Newton-Schulz's quintic (slope a = 3.4 at 0) can grow
    /// a relative error by up to 3.4^5 = 450 over five iterations on the smallest singular
    /// directions. Seen: 2.4e-14. 1e-12 leaves margin and is ~10^10 below a wrong formula.
    #[test]
    fn muon_reproduces_torch_with_float64_newton_schulz_to_round_off() {
        let cases = replay();
        let f64_cases: Vec<_> = cases.iter().filter(|c| c.1 == "float64").collect();
        assert!(f64_cases.len() >= 3);
        for (name, _, err) in f64_cases {
            assert!(*err < 1e-12, "{name}: steps off by {err:e}");
        }
    }

    /// Stock torch runs Newton-Schulz in bfloat16 (8 significant bits: 2^-8 = 0.4% per
    /// rounding, over ~15 matrix products), so its step differs from exact arithmetic by a few
    /// percent (seen 3.3%): below 10%, and far above float64 round-off, which would mean the
    /// fixture's stock case lost its bfloat16 cast.
    #[test]
    fn stock_torch_bfloat16_newton_schulz_lands_within_bfloat16_error_of_float64() {
        let cases = replay();
        let (name, _, err) = cases
            .iter()
            .find(|c| c.1 == "bfloat16")
            .expect("stock case");
        assert!(*err < 0.1, "{name}: steps off by {err:e}");
        assert!(
            *err > 1e-4,
            "{name}: {err:e} is float64-close; was the cast to bf16 dropped?"
        );
    }

    #[test]
    fn newton_schulz_output_has_singular_values_near_one_for_both_orientations() {
        let g = ndarray::Array2::from_shape_fn((7, 3), |(i, j)| ((i * 3 + j) as f64).sin());
        for m in [g.clone(), g.t().to_owned()] {
            let o = zeropower_via_newtonschulz(
                m.view(),
                MuonConfig::default().ns_coefficients,
                5,
                1e-7,
            );
            assert_eq!(o.dim(), m.dim());
            // eigenvalues of the small Gram matrix O^T O (or O O^T) lie in ~[0.5^2, 1.5^2]
            let gram = if m.nrows() > m.ncols() {
                o.t().dot(&o)
            } else {
                o.dot(&o.t())
            };
            let trace: f64 = gram.diag().sum() / gram.nrows() as f64;
            assert!(
                (0.25..2.25).contains(&trace),
                "mean squared singular value {trace}"
            );
        }
    }

    #[test]
    fn training_split_gives_block_matrices_to_muon_and_the_rest_to_adamw() {
        let cfg = ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 8,
            use_moe: true,
            ..ModelConfig::minimind3()
        };
        let p = params::init_params(&cfg, 0);
        let opt = MuonWithAdamW::new(&p, MuonConfig::default(), AdamWConfig::default());
        let adam: Vec<&String> = opt.adamw.m.keys().collect();
        assert_eq!(
            adam,
            [
                "model.embed_tokens.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.mlp.gate.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.self_attn.k_norm.weight",
                "model.layers.0.self_attn.q_norm.weight",
                "model.norm.weight",
            ]
        );
        assert!(opt
            .muon_names
            .contains("model.layers.0.mlp.experts.3.down_proj.weight"));
        assert!(opt
            .muon_names
            .contains("model.layers.0.self_attn.o_proj.weight"));
        assert_eq!(opt.muon_names.len() + adam.len(), p.len());
    }

    #[test]
    fn split_step_equals_each_optimizer_on_its_own_tensors() {
        let cfg = ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 8,
            ..ModelConfig::default()
        };
        let p0 = params::init_params(&cfg, 1);
        let g = params::init_params(&cfg, 2);
        let mut p = p0.clone();
        let mut both = MuonWithAdamW::new(&p, MuonConfig::default(), AdamWConfig::default());
        both.step(&mut p, &g, 0.02, 1e-3);
        let (mut m, mut a) = split(p0);
        Muon::new(&m, MuonConfig::default()).step(&mut m, &g, 0.02);
        AdamW::new(&a, AdamWConfig::default()).step(&mut a, &g, 1e-3);
        m.extend(a);
        assert_eq!(p, m);
    }
}

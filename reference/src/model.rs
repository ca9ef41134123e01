//! The whole MiniMind decoder (MiniMind2 or MiniMind-3, dense or MoE): forward to logits and
//! losses, backward to named gradients. [`forward`] / [`forward_backward`] are MiniMind's
//! pretraining (causal attention, shifted loss); the `_with` variants take [`RunOptions`]:
//! packed rows with document boundaries, or masked LM (bidirectional, unshifted loss).

use ndarray::{Array2, Array3, ArrayD, ArrayView2};

use crate::attention::{self, AttnCache, AttnMask, AttnShape, AttnWeights};
use crate::mlp::{self, MlpCache, MlpGrads, MlpWeights};
use crate::moe::{self, Moe3Shape, MoeCache, MoeShape, MoeWeights};
use crate::params::{mat, vec1, zeros_like};
use crate::{embedding, linear, loss, rmsnorm, ModelConfig, Params};

/// What the loss predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// Causal LM: logits at t against the label at t + 1 ([`loss::cross_entropy`]).
    #[default]
    CausalLm,
    /// Masked LM: logits at t against the label at t ([`loss::cross_entropy_unshifted`]).
    MaskedLm,
}

/// How a batch is run: the attention mask (and RoPE positions) and the loss.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunOptions {
    pub mask: AttnMask,
    pub objective: Objective,
}

impl RunOptions {
    /// MiniMind pretraining: causal attention over the whole row, shifted loss.
    pub fn causal() -> Self {
        RunOptions::default()
    }

    /// Packed rows: causal attention within each row's segments (`starts` per row, see
    /// [`crate::dataset::pack_docs`]), positions restarting at each segment, shifted loss.
    pub fn packed(starts: Vec<Vec<usize>>) -> Self {
        RunOptions {
            mask: AttnMask::segments(starts),
            objective: Objective::CausalLm,
        }
    }

    /// Masked LM: bidirectional attention, unshifted loss.
    pub fn masked_lm() -> Self {
        RunOptions {
            mask: AttnMask::Bidirectional,
            objective: Objective::MaskedLm,
        }
    }
}

/// Results of one forward pass.
#[derive(Debug, Clone)]
pub struct Output {
    /// [B, T, V], lm_head tied to the embedding.
    pub logits: Array3<f64>,
    pub ce: f64,
    /// Sum of every MoE layer's aux loss (0 for a dense model).
    pub aux: f64,
    /// ce + aux.
    pub total: f64,
    /// Labels counted by the cross-entropy.
    pub count: usize,
}

enum FfnCache {
    Dense(MlpCache),
    Moe(MoeCache),
}

struct LayerCache {
    x: Array2<f64>,
    rstd1: ndarray::Array1<f64>,
    attn: AttnCache,
    h: Array2<f64>,
    rstd2: ndarray::Array1<f64>,
    ffn: FfnCache,
}

struct Cache {
    ids: Vec<i64>,
    layers: Vec<LayerCache>,
    x_final: Array2<f64>,
    rstd_final: ndarray::Array1<f64>,
    h_final: Array2<f64>,
    dlogits: Array3<f64>,
}

fn mlp_weights<'a>(p: &'a Params, prefix: &str) -> MlpWeights<'a> {
    MlpWeights {
        gate: mat(p, &format!("{prefix}.gate_proj.weight")),
        up: mat(p, &format!("{prefix}.up_proj.weight")),
        down: mat(p, &format!("{prefix}.down_proj.weight")),
    }
}

fn attn_weights<'a>(cfg: &ModelConfig, p: &'a Params, l: &str) -> AttnWeights<'a> {
    let a = format!("{l}.self_attn");
    AttnWeights {
        q: mat(p, &format!("{a}.q_proj.weight")),
        k: mat(p, &format!("{a}.k_proj.weight")),
        v: mat(p, &format!("{a}.v_proj.weight")),
        o: mat(p, &format!("{a}.o_proj.weight")),
        q_norm: cfg.qk_norm.then(|| vec1(p, &format!("{a}.q_norm.weight"))),
        k_norm: cfg.qk_norm.then(|| vec1(p, &format!("{a}.k_norm.weight"))),
    }
}

fn moe_weights<'a>(cfg: &ModelConfig, p: &'a Params, l: &str) -> MoeWeights<'a> {
    MoeWeights {
        router: mat(p, &format!("{l}.mlp.gate.weight")),
        experts: (0..cfg.routed_experts())
            .map(|e| mlp_weights(p, &format!("{l}.mlp.experts.{e}")))
            .collect(),
        shared: (0..cfg.shared_experts())
            .map(|e| mlp_weights(p, &format!("{l}.mlp.shared_experts.{e}")))
            .collect(),
    }
}

fn attn_shape(cfg: &ModelConfig, b: usize, t: usize) -> AttnShape {
    AttnShape {
        b,
        t,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim(),
        theta: cfg.rope_theta,
        eps: cfg.rms_norm_eps,
    }
}

fn moe_shape(cfg: &ModelConfig, b: usize, t: usize) -> MoeShape {
    MoeShape {
        b,
        t,
        top_k: cfg.num_experts_per_tok,
        norm_topk_prob: cfg.norm_topk_prob,
        aux_alpha: cfg.aux_loss_alpha,
        seq_aux: cfg.seq_aux,
    }
}

fn moe3_shape(cfg: &ModelConfig) -> Moe3Shape {
    Moe3Shape {
        top_k: cfg.num_experts_per_tok,
        norm_topk_prob: cfg.norm_topk_prob,
        aux_coef: cfg.router_aux_loss_coef,
    }
}

/// One MoE layer in the config's architecture: (y, aux, cache).
fn moe_forward(
    cfg: &ModelConfig,
    x: ArrayView2<f64>,
    w: &MoeWeights,
    b: usize,
    t: usize,
) -> (Array2<f64>, f64, MoeCache) {
    if cfg.is_minimind3() {
        moe::forward3(x, w, moe3_shape(cfg))
    } else {
        moe::forward(x, w, moe_shape(cfg, b, t))
    }
}

fn run_forward(
    cfg: &ModelConfig,
    p: &Params,
    input_ids: ArrayView2<i64>,
    labels: ArrayView2<i64>,
    opts: &RunOptions,
) -> (Output, Cache) {
    let (b, t) = input_ids.dim();
    let v = cfg.vocab_size;
    let ids: Vec<i64> = input_ids.iter().copied().collect();
    let emb = mat(p, "model.embed_tokens.weight");
    let mut x = embedding::forward(&ids, emb);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let mut aux = 0.0;
    for i in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let w1 = vec1(p, &format!("{l}.input_layernorm.weight"));
        let (n1, rstd1) = rmsnorm::forward(x.view(), w1, cfg.rms_norm_eps);
        let (a, attn) = attention::forward_masked(
            n1.view(),
            &attn_weights(cfg, p, &l),
            attn_shape(cfg, b, t),
            &opts.mask,
        );
        let h = &x + &a;
        let w2 = vec1(p, &format!("{l}.post_attention_layernorm.weight"));
        let (n2, rstd2) = rmsnorm::forward(h.view(), w2, cfg.rms_norm_eps);
        let (f, ffn) = if cfg.use_moe {
            let (f, layer_aux, c) = moe_forward(cfg, n2.view(), &moe_weights(cfg, p, &l), b, t);
            aux += layer_aux;
            (f, FfnCache::Moe(c))
        } else {
            let (f, c) = mlp::forward(n2.view(), &mlp_weights(p, &format!("{l}.mlp")));
            (f, FfnCache::Dense(c))
        };
        let out = &h + &f;
        layers.push(LayerCache {
            x,
            rstd1,
            attn,
            h,
            rstd2,
            ffn,
        });
        x = out;
    }
    let (h_final, rstd_final) =
        rmsnorm::forward(x.view(), vec1(p, "model.norm.weight"), cfg.rms_norm_eps);
    let logits = linear::forward(h_final.view(), emb)
        .into_shape_with_order((b, t, v))
        .expect("contiguous");
    let (ce, count, dlogits) = match opts.objective {
        Objective::CausalLm => loss::cross_entropy(logits.view(), labels),
        Objective::MaskedLm => loss::cross_entropy_unshifted(logits.view(), labels),
    };
    let out = Output {
        logits,
        ce,
        aux,
        total: ce + aux,
        count,
    };
    let cache = Cache {
        ids,
        layers,
        x_final: x,
        rstd_final,
        h_final,
        dlogits,
    };
    (out, cache)
}

/// input_ids, labels: [B, T] -> logits [B, T, V], ce, aux, total. No attention mask.
pub fn forward(
    cfg: &ModelConfig,
    p: &Params,
    input_ids: ArrayView2<i64>,
    labels: ArrayView2<i64>,
) -> Output {
    forward_with(cfg, p, input_ids, labels, &RunOptions::causal())
}

/// [`forward`] under `opts` (attention mask / positions, loss objective).
pub fn forward_with(
    cfg: &ModelConfig,
    p: &Params,
    input_ids: ArrayView2<i64>,
    labels: ArrayView2<i64>,
    opts: &RunOptions,
) -> Output {
    run_forward(cfg, p, input_ids, labels, opts).0
}

fn insert_mlp(g: &mut Params, prefix: &str, m: MlpGrads) {
    g.insert(format!("{prefix}.gate_proj.weight"), m.gate.into_dyn());
    g.insert(format!("{prefix}.up_proj.weight"), m.up.into_dyn());
    g.insert(format!("{prefix}.down_proj.weight"), m.down.into_dyn());
}

/// Forward plus backward of `total = ce + aux`: the outputs and d total / d every parameter,
/// named like the parameters. The tied embedding's gradient is the sum of both uses.
pub fn forward_backward(
    cfg: &ModelConfig,
    p: &Params,
    input_ids: ArrayView2<i64>,
    labels: ArrayView2<i64>,
) -> (Output, Params) {
    forward_backward_with(cfg, p, input_ids, labels, &RunOptions::causal())
}

/// [`forward_backward`] under `opts`.
pub fn forward_backward_with(
    cfg: &ModelConfig,
    p: &Params,
    input_ids: ArrayView2<i64>,
    labels: ArrayView2<i64>,
    opts: &RunOptions,
) -> (Output, Params) {
    let (out, c) = run_forward(cfg, p, input_ids, labels, opts);
    let (b, t) = input_ids.dim();
    let v = cfg.vocab_size;
    let mut g = zeros_like(p);
    let emb = mat(p, "model.embed_tokens.weight");
    let dlogits = c.dlogits.to_shape((b * t, v)).expect("contiguous");
    let (dh_final, demb_head) = linear::backward(dlogits.view(), c.h_final.view(), emb);
    let (mut dx, dnorm) = rmsnorm::backward(
        dh_final.view(),
        c.x_final.view(),
        vec1(p, "model.norm.weight"),
        c.rstd_final.view(),
    );
    g.insert("model.norm.weight".into(), dnorm.into_dyn());
    for (i, lc) in c.layers.iter().enumerate().rev() {
        let l = format!("model.layers.{i}");
        // out = h + ffn(rms2(h))
        let dn2 = match &lc.ffn {
            FfnCache::Dense(mc) => {
                let (dn2, mg) = mlp::backward(dx.view(), &mlp_weights(p, &format!("{l}.mlp")), mc);
                insert_mlp(&mut g, &format!("{l}.mlp"), mg);
                dn2
            }
            FfnCache::Moe(mc) => {
                let mw = moe_weights(cfg, p, &l);
                let (dn2, mg) = if cfg.is_minimind3() {
                    moe::backward3(dx.view(), 1.0, &mw, mc, moe3_shape(cfg))
                } else {
                    moe::backward(dx.view(), 1.0, &mw, mc, moe_shape(cfg, b, t))
                };
                g.insert(format!("{l}.mlp.gate.weight"), mg.router.into_dyn());
                for (e, eg) in mg.experts.into_iter().enumerate() {
                    insert_mlp(&mut g, &format!("{l}.mlp.experts.{e}"), eg);
                }
                for (e, eg) in mg.shared.into_iter().enumerate() {
                    insert_mlp(&mut g, &format!("{l}.mlp.shared_experts.{e}"), eg);
                }
                dn2
            }
        };
        let w2 = vec1(p, &format!("{l}.post_attention_layernorm.weight"));
        let (dh_ffn, dw2) = rmsnorm::backward(dn2.view(), lc.h.view(), w2, lc.rstd2.view());
        g.insert(
            format!("{l}.post_attention_layernorm.weight"),
            dw2.into_dyn(),
        );
        let dh = dx + dh_ffn;
        // h = x + attn(rms1(x))
        let aw = attn_weights(cfg, p, &l);
        let (dn1, ag) = attention::backward(dh.view(), &aw, &lc.attn, attn_shape(cfg, b, t));
        let a = format!("{l}.self_attn");
        g.insert(format!("{a}.q_proj.weight"), ag.q.into_dyn());
        g.insert(format!("{a}.k_proj.weight"), ag.k.into_dyn());
        g.insert(format!("{a}.v_proj.weight"), ag.v.into_dyn());
        g.insert(format!("{a}.o_proj.weight"), ag.o.into_dyn());
        if let (Some(qn), Some(kn)) = (ag.q_norm, ag.k_norm) {
            g.insert(format!("{a}.q_norm.weight"), qn.into_dyn());
            g.insert(format!("{a}.k_norm.weight"), kn.into_dyn());
        }
        let w1 = vec1(p, &format!("{l}.input_layernorm.weight"));
        let (dx_attn, dw1) = rmsnorm::backward(dn1.view(), lc.x.view(), w1, lc.rstd1.view());
        g.insert(format!("{l}.input_layernorm.weight"), dw1.into_dyn());
        dx = dh + dx_attn;
    }
    let demb = embedding::backward(dx.view(), &c.ids, v) + demb_head;
    g.insert("model.embed_tokens.weight".into(), demb.into_dyn());
    (out, g)
}

/// Scales every gradient in place (e.g. by 1/accum).
pub fn scale_grads(g: &mut Params, s: f64) {
    g.values_mut().for_each(|t| *t *= s);
}

/// `acc += s * g`, tensor by tensor.
pub fn add_scaled(acc: &mut Params, g: &Params, s: f64) {
    for (k, t) in g {
        let a: &mut ArrayD<f64> = acc
            .get_mut(k)
            .unwrap_or_else(|| panic!("missing gradient {k}"));
        a.scaled_add(s, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{golden_minimind3, golden_seed004, read_json, rel_err, Tensors};

    /// Logits / losses and gradients against MiniMind's float64 runs. MiniMind casts RMSNorm
    /// inputs to float32 and builds its RoPE tables in float32 even in a float64 model, so its
    /// numbers carry float32 round-off (~1e-7 relative) that exact float64 math cannot reproduce;
    /// these are the harness's golden tolerances (relative to the tensor's largest magnitude).
    const FORWARD_TOL: f64 = 1e-6;
    const GRAD_TOL: f64 = 2e-6;

    fn check(dir: &std::path::Path, name: &str, opts: &RunOptions, loss_key: &str) {
        let j = read_json(&dir.join(format!("{name}.json")));
        let cfg: ModelConfig = serde_json::from_value(j["config"].clone()).unwrap();
        let t = Tensors::load(&dir.join(format!("{name}.safetensors")));
        let params = t.group("param.");
        let (ids, labels) = (&t.ints["input_ids"], &t.ints["labels"]);
        let (out, grads) = forward_backward_with(&cfg, &params, ids.view(), labels.view(), opts);
        let e = rel_err(&out.logits.clone().into_dyn(), &t.floats["logits"]);
        assert!(e < FORWARD_TOL, "{name} logits off by {e:e}");
        let expected = j[loss_key].as_f64().unwrap();
        assert!(
            (out.total - expected).abs() < FORWARD_TOL * expected.abs(),
            "{name} loss {} vs {expected}",
            out.total
        );
        if let Some(aux) = j.get("aux_loss").and_then(|v| v.as_f64()) {
            assert!(
                (out.aux - aux).abs() <= FORWARD_TOL * aux.abs(),
                "{name} aux"
            );
        }
        let expected_grads = t.group("grad.");
        assert_eq!(
            grads.keys().collect::<Vec<_>>(),
            expected_grads.keys().collect::<Vec<_>>()
        );
        for (n, g) in &expected_grads {
            let e = rel_err(&grads[n], g);
            assert!(e < GRAD_TOL, "{name} grad {n} off by {e:e}");
        }
    }

    #[test]
    fn minimind3_dense_with_qk_norm_matches_pytorch() {
        check(
            &golden_minimind3(),
            "dense3_tiny",
            &RunOptions::causal(),
            "total_loss",
        );
    }

    #[test]
    fn minimind3_head_dim_96_over_full_and_partial_rows_matches_pytorch() {
        check(
            &golden_minimind3(),
            "dense3_head96",
            &RunOptions::causal(),
            "total_loss",
        );
    }

    #[test]
    fn minimind3_moe_top1_with_aux_loss_and_router_gradients_matches_pytorch() {
        check(
            &golden_minimind3(),
            "moe3_tiny",
            &RunOptions::causal(),
            "total_loss",
        );
    }

    #[test]
    fn masked_lm_step_with_bidirectional_attention_matches_pytorch() {
        check(
            &golden_seed004(),
            "mlm3_tiny",
            &RunOptions::masked_lm(),
            "loss",
        );
    }
}

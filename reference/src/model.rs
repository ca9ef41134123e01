//! The whole MiniMind decoder: forward to logits and losses, backward to named gradients.

use ndarray::{Array2, Array3, ArrayD, ArrayView2};

use crate::attention::{self, AttnCache, AttnShape, AttnWeights};
use crate::mlp::{self, MlpCache, MlpGrads, MlpWeights};
use crate::moe::{self, MoeCache, MoeShape, MoeWeights};
use crate::params::{mat, vec1, zeros_like};
use crate::{embedding, linear, loss, rmsnorm, ModelConfig, Params};

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
        experts: (0..cfg.n_routed_experts)
            .map(|e| mlp_weights(p, &format!("{l}.mlp.experts.{e}")))
            .collect(),
        shared: (0..cfg.n_shared_experts)
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

fn run_forward(
    cfg: &ModelConfig,
    p: &Params,
    input_ids: ArrayView2<i64>,
    labels: ArrayView2<i64>,
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
        let (a, attn) =
            attention::forward(n1.view(), &attn_weights(cfg, p, &l), attn_shape(cfg, b, t));
        let h = &x + &a;
        let w2 = vec1(p, &format!("{l}.post_attention_layernorm.weight"));
        let (n2, rstd2) = rmsnorm::forward(h.view(), w2, cfg.rms_norm_eps);
        let (f, ffn) = if cfg.use_moe {
            let (f, layer_aux, c) =
                moe::forward(n2.view(), &moe_weights(cfg, p, &l), moe_shape(cfg, b, t));
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
    let (ce, count, dlogits) = loss::cross_entropy(logits.view(), labels);
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
    run_forward(cfg, p, input_ids, labels).0
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
    let (out, c) = run_forward(cfg, p, input_ids, labels);
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
                let (dn2, mg) = moe::backward(
                    dx.view(),
                    1.0,
                    &moe_weights(cfg, p, &l),
                    mc,
                    moe_shape(cfg, b, t),
                );
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

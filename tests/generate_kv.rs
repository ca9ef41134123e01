//! `fast generate`: KV-cached decoding equals full recompute; fixed seeds repeat; streamed text
//! equals the decoded whole.

use std::path::{Path, PathBuf};

use fast::commands::generate::generate_ids;
use fast::data::tokenizer::{SpecialTokenStrings, TextTokenizer};
use fast::model::sampling::{SamplingConfig, TextStream};
use fast::model::{KvCache, MiniMindForCausalLM, ModelConfig};
use tch::{Device, Kind, Tensor};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/minimind")
        .join(name)
}

fn golden_model(kind: Kind) -> MiniMindForCausalLM {
    let path = golden("minimind_pretrain_64.pth");
    fast::io::weights::load_model(&path, None, kind, Device::Cpu)
        .unwrap()
        .0
}

/// Logits of `ids` continuing the `cache`d positions.
fn fwd(m: &MiniMindForCausalLM, ids: &Tensor, cache: &mut KvCache) -> Tensor {
    m.forward(ids, Some(cache)).logits
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// A MoE + qk-norm model with random weights, to cover those paths of the cached forward.
fn random_moe_qknorm_model() -> MiniMindForCausalLM {
    let cfg = ModelConfig {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: Some(64),
        vocab_size: 97,
        rms_norm_eps: 1e-5,
        rope_theta: 1e4,
        max_position_embeddings: 128,
        qk_norm: true,
        use_moe: true,
        n_routed_experts: 4,
        n_shared_experts: 1,
        num_experts_per_tok: 2,
        norm_topk_prob: true,
        ..ModelConfig::default()
    };
    tch::manual_seed(11);
    let w = cfg
        .param_shapes()
        .into_iter()
        .map(|(n, s)| {
            let t = if s.len() == 1 {
                Tensor::ones(&s, (Kind::Float, Device::Cpu))
                    + Tensor::randn(&s, (Kind::Float, Device::Cpu)) * 0.1
            } else {
                Tensor::randn(&s, (Kind::Float, Device::Cpu)) * 0.2
            };
            (n, t)
        })
        .collect();
    MiniMindForCausalLM::from_weights(&cfg, w, Kind::Float, Device::Cpu, "random").unwrap()
}

#[test]
fn kv_cached_logits_equal_full_recompute() {
    let _g = tch::no_grad_guard();
    for (label, m) in [
        ("golden dense", golden_model(Kind::Float)),
        ("random moe+qk-norm", random_moe_qknorm_model()),
    ] {
        let v = m.cfg.vocab_size as i64;
        let ids = Tensor::from_slice(&[1i64, 17, 300 % v, 42, 5, 77, 2, 9, 63, 31]).view([1, -1]);
        let full = fwd(&m, &ids, &mut KvCache::new());
        // Prompt of 4, then one token at a time; then the rest of a batch of 2 in one chunk.
        let mut cache = KvCache::new();
        let mut parts = vec![fwd(&m, &ids.narrow(1, 0, 4), &mut cache)];
        for t in 4..10 {
            parts.push(fwd(&m, &ids.narrow(1, t, 1), &mut cache));
            assert_eq!(cache.len(), t as usize + 1);
        }
        let cached = Tensor::cat(&parts, 1);
        let d = max_abs_diff(&cached, &full);
        println!(
            "{label}: max |cached - full| = {d:.3e} over {:?}",
            full.size()
        );
        // fp32: the two paths sum the same products in different groupings (1e-5 on logits of O(1-10)).
        assert!(d < 1e-4, "{label}: {d}");

        let ids2 = Tensor::cat(&[&ids, &ids.flip([1])], 0);
        let full2 = fwd(&m, &ids2, &mut KvCache::new());
        let mut cache = KvCache::new();
        let a = fwd(&m, &ids2.narrow(1, 0, 7), &mut cache);
        let b = fwd(&m, &ids2.narrow(1, 7, 3), &mut cache);
        let d2 = max_abs_diff(&Tensor::cat(&[a, b], 1), &full2);
        assert!(d2 < 1e-4, "{label} batch 2: {d2}");
    }
}

#[test]
fn greedy_generation_follows_full_recompute_argmax() {
    let m = golden_model(Kind::Double);
    let prompt = [1i64, 100, 200, 300];
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    let out = generate_ids(&m, &prompt, 12, &greedy, None, |_| Ok(())).unwrap();
    assert_eq!(out.len(), 12);
    // Recompute every step from scratch, in float64, with no cache.
    let mut seq = prompt.to_vec();
    for &tok in &out {
        let logits = m
            .forward(&Tensor::from_slice(&seq).view([1, -1]), None)
            .logits;
        let next = logits
            .select(1, seq.len() as i64 - 1)
            .argmax(-1, false)
            .int64_value(&[0]);
        assert_eq!(next, tok);
        seq.push(next);
    }
}

#[test]
fn sampling_with_a_fixed_seed_repeats() {
    let m = golden_model(Kind::Float);
    let cfg = |seed| SamplingConfig {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 50,
        repetition_penalty: 1.1,
        seed,
    };
    let run = |seed| generate_ids(&m, &[1, 7, 8], 24, &cfg(seed), None, |_| Ok(())).unwrap();
    let a = run(5);
    assert_eq!(a, run(5));
    assert_ne!(a, run(6));
    // Stops right after eos.
    let eos = a[3];
    let stopped = generate_ids(&m, &[1, 7, 8], 24, &cfg(5), Some(eos), |_| Ok(())).unwrap();
    assert_eq!(
        stopped,
        a[..=a.iter().position(|&t| t == eos).unwrap()].to_vec()
    );
}

#[test]
fn streamed_text_equals_decoding_everything_at_once() {
    let tok =
        TextTokenizer::load(&golden("tokenizer.json"), &SpecialTokenStrings::default()).unwrap();
    let text = "床前明月光，疑是地上霜。🙂 Ünïcödé\ttabs\nand 𝔘𝔫𝔦 mixed 😀😀 end";
    let ids = tok.encode(text).unwrap();
    let mut stream = TextStream::new(|ids: &[u32]| tok.decode(ids));
    let mut out = String::new();
    let mut pieces = 0;
    for &id in &ids {
        let p = stream.push(id).unwrap();
        assert!(!p.contains('\u{FFFD}'), "partial character printed: {p:?}");
        pieces += !p.is_empty() as usize;
        out += &p;
    }
    out += &stream.finish().unwrap();
    assert_eq!(out, tok.decode(&ids).unwrap());
    assert_eq!(out, text);
    println!("{} tokens streamed as {pieces} pieces", ids.len());
}

/// MiniMind-3's own weight files (float16 state_dict via torch.save, config JSON without an
/// architecture key) import as MiniMind-3 models and generate.
#[test]
fn minimind3_pth_files_import_and_generate() {
    for name in ["minimind3_pretrain_64.pth", "minimind3_moe_48.pth"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("golden/minimind3")
            .join(name);
        let (m, from) = fast::io::weights::load_model(&path, None, Kind::Float, Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(m.cfg.is_minimind3() && m.cfg.qk_norm, "{name}: {from}");
        let greedy = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        let out = generate_ids(&m, &[1, 30, 31], 6, &greedy, None, |_| Ok(())).unwrap();
        assert_eq!(out.len(), 6, "{name}");
    }
}

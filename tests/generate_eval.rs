//! `fast eval` scores a batch exactly as the training loss does, and our inference forward
//! (kv_cache.rs, used by generate/eval/export) equals the training model's forward.

use std::collections::HashMap;
use std::path::Path;

use fast::config::ModelConfig;
use fast::kv_cache::InferenceModel;
use fast::model::MiniMindForCausalLM;
use tch::{nn::VarStore, Device, Kind, Tensor};

#[test]
fn eval_of_a_batch_equals_the_training_loss_of_that_batch() {
    let pth =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/minimind/minimind_pretrain_64.pth");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pth.with_extension("json")).unwrap())
            .unwrap();
    let cfg: ModelConfig = serde_json::from_value(json["config"].clone()).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    vs.double();
    let model = MiniMindForCausalLM::new(&vs.root(), &cfg).unwrap();
    vs.double();
    let loaded: HashMap<String, Tensor> = fast::weights::load_weights(&pth)
        .unwrap()
        .into_iter()
        .collect();
    fast::model::load_named(&mut vs, loaded, &pth.display().to_string()).unwrap();

    let (arch, w, _) = fast::weights::load_for_inference(&pth, None, Kind::Double).unwrap();
    let inf = InferenceModel::new(arch, w, Kind::Double, Device::Cpu).unwrap();

    let ids =
        Tensor::from_slice(&[1i64, 40, 41, 300, 7, 2, 0, 0, 1, 3, 3, 9, 500, 8, 2, 0]).view([2, 8]);
    let labels = ids.masked_fill(&ids.eq(0), -100);
    let _g = tch::no_grad_guard();
    let train_logits = model.forward(&ids).logits;
    let ours = inf
        .forward(&ids, &mut fast::kv_cache::KvCache::new())
        .unwrap();
    let d = (&train_logits.to_kind(Kind::Double) - &ours)
        .abs()
        .max()
        .double_value(&[]);
    println!("inference forward vs training forward (float64): max |diff| = {d:.3e}");
    // The training model builds RoPE tables in f64 and normalises in f64; MiniMind (and
    // kv_cache.rs, which reproduces minimind_pretrain_64's float64 logits exactly) uses float32
    // for both, so the two differ at float32 round-off (~1e-6), not more.
    assert!(d < 1e-5, "{d}");

    // eval's number is the loss function's number on the same logits.
    let (loss, count) = fast::loss::shifted_cross_entropy(&ours, &labels);
    let (train_loss, _) = fast::loss::shifted_cross_entropy(&train_logits, &labels);
    assert!((train_loss.double_value(&[]) - loss.double_value(&[])).abs() < 1e-5);
    let (sum, n) = fast::eval::batch_loss(&inf, &ids, &labels).unwrap();
    let r = fast::eval::EvalResult {
        loss_sum: sum,
        tokens: n,
        rows: 2,
    };
    println!(
        "eval loss {:.12} over {n} tokens; training loss {:.12} over {}",
        r.loss(),
        loss.double_value(&[]),
        count.int64_value(&[])
    );
    assert_eq!(n, count.int64_value(&[]));
    assert!((r.loss() - loss.double_value(&[])).abs() < 1e-9);
}

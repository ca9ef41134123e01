//! `fast eval` scores a batch exactly as the training loss does, and the model loaded for
//! inference (generate/eval/export, weights in the kind asked for) equals the training model.

use std::collections::HashMap;
use std::path::Path;

use fast::model::config::ModelConfig;
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
    let mut model = MiniMindForCausalLM::new(&vs.root(), &cfg).unwrap();
    vs.double();
    model.set_compute_kind(Kind::Double);
    let loaded: HashMap<String, Tensor> = fast::io::weights::load_weights(&pth)
        .unwrap()
        .into_iter()
        .collect();
    fast::model::load_named(&mut vs, loaded, &pth.display().to_string()).unwrap();

    let (inf, _) = fast::io::weights::load_model(&pth, None, Kind::Double, Device::Cpu).unwrap();

    let ids =
        Tensor::from_slice(&[1i64, 40, 41, 300, 7, 2, 0, 0, 1, 3, 3, 9, 500, 8, 2, 0]).view([2, 8]);
    let labels = ids.masked_fill(&ids.eq(0), -100);
    let _g = tch::no_grad_guard();
    let train_logits = model.forward(&ids, None).logits;
    let ours = inf.forward(&ids, None).logits;
    let d = (&train_logits.to_kind(Kind::Double) - &ours)
        .abs()
        .max()
        .double_value(&[]);
    println!("inference forward vs training forward (float64): max |diff| = {d:.3e}");
    // One model class, loaded two ways (the training set-up with its float64 VarStore, and the
    // inference loader): the same kernels on the same weights, so float64 round-off at most.
    assert!(d < 1e-12, "{d}");

    // eval's number is the loss function's number on the same logits.
    let (loss, count) = fast::model::loss::shifted_cross_entropy(&ours, &labels);
    let (train_loss, _) = fast::model::loss::shifted_cross_entropy(&train_logits, &labels);
    assert!((train_loss.double_value(&[]) - loss.double_value(&[])).abs() < 1e-5);
    let (sum, n) = fast::commands::eval::batch_loss(&inf, &ids, &labels).unwrap();
    let r = fast::commands::eval::EvalResult {
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

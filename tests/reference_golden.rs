//! The reference reproduces every golden fixture made by MiniMind's own PyTorch code.
//! Tolerances (and why) live next to the checks in `harness::verify::reference`:
//! FORWARD_TOL 1e-6 / GRAD_TOL 2e-6 relative to the tensor's max magnitude, because MiniMind
//! runs RMSNorm and builds RoPE tables in float32 even in its float64 fixtures; the optimizer
//! on PyTorch's own gradients and the LR schedule are held to float64 round-off (1e-12, 1e-13).

use std::path::{Path, PathBuf};

use harness::fixtures::{self, Components, ModelFixture, TrainFixture};
use harness::report::{format_table, Row};
use harness::verify::reference::{self as verify_reference, LR_TOL, SCALER_PARAM_TOL};
use reference::{sampler, schedule};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/minimind")
}

fn assert_all_ok(rows: &[Row]) {
    assert!(!rows.is_empty(), "no checks ran");
    assert!(rows.iter().all(|r| r.ok), "\n{}", format_table(rows));
}

fn components() -> Components {
    Components::load(&dir().join("components.json")).unwrap()
}

#[test]
fn the_folder_holds_two_model_fixtures_and_one_trajectory() {
    let inv = fixtures::discover(&dir()).unwrap();
    assert_eq!(inv.models, vec!["dense_tiny", "moe_tiny"]);
    assert_eq!(inv.trajectories, vec!["train_tiny"]);
    assert!(inv.components.is_some() && inv.dataset_cases.is_some() && inv.tokenizer.is_some());
}

#[test]
fn dense_tiny_logits_losses_gradients_and_adamw_step_match_pytorch() {
    let fx = ModelFixture::load(&dir(), "dense_tiny").unwrap();
    assert!(!fx.config.use_moe);
    let rows = verify_reference::check_model(&fx);
    // logits, 3 losses, 11 gradient groups, grad norm, 11 after-step groups, optimizer-only row
    assert!(rows.len() > 4 + 11 + 1 + 11, "{}", format_table(&rows));
    assert_all_ok(&rows);
}

#[test]
fn moe_tiny_including_aux_loss_and_router_gradients_matches_pytorch() {
    let fx = ModelFixture::load(&dir(), "moe_tiny").unwrap();
    assert!(fx.config.use_moe && fx.aux_loss > 0.0);
    let rows = verify_reference::check_model(&fx);
    assert!(rows.iter().any(|r| r.group.contains("mlp.gate.weight")));
    assert_all_ok(&rows);
}

#[test]
fn train_tiny_trajectory_lrs_losses_grad_norms_and_final_weights_match_pytorch() {
    let fx = TrainFixture::load(&dir(), "train_tiny").unwrap();
    assert_eq!(fx.rows.len(), fx.micro_steps);
    let rows = verify_reference::check_trajectory(&fx);
    assert!(rows.iter().any(|r| r.group.starts_with("final.")));
    assert_all_ok(&rows);
}

#[test]
fn lr_schedule_matches_minimind_get_lr() {
    for c in components().lr_schedule {
        let got = schedule::cosine_lr(c.step, c.total, c.lr);
        // one cos and three flops: float64 round-off
        assert!((got - c.value).abs() <= LR_TOL * c.lr, "{c:?}: got {got}");
    }
}

#[test]
fn skip_batch_sampler_matches_minimind() {
    for c in components().skip_batch_sampler {
        let got = sampler::skip_batches(&c.indices, c.batch_size, c.skip_batches);
        assert_eq!(got, c.batches, "{c:?}");
        assert_eq!(
            sampler::skip_batch_len(c.indices.len(), c.batch_size, c.skip_batches),
            c.batches.len()
        );
    }
}

#[test]
fn distributed_sampler_without_shuffle_matches_torch() {
    for c in components().distributed_sampler_no_shuffle {
        let idx: Vec<usize> = (0..c.n).collect();
        let got = sampler::distributed_indices(&idx, c.world_size, c.rank, c.drop_last);
        assert_eq!(got, c.indices, "{c:?}");
    }
}

#[test]
fn world_size_step_rescale_matches_minimind() {
    for c in components().world_size_step_rescale {
        assert_eq!(
            sampler::rescale_step(c.step, c.saved_ws, c.current_ws),
            c.value,
            "{c:?}"
        );
    }
}

#[test]
fn grad_scaler_trajectory_matches_torch_at_fp32_round_off() {
    let c = components();
    // Scale and skip flags are exact; params are float32 in PyTorch, we run float64, so params
    // agree to float32 round-off (SCALER_PARAM_TOL = 1e-5 of the largest |param|).
    let rows = verify_reference::check_scaler(&c);
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r.tol == 0.0 || r.tol == SCALER_PARAM_TOL));
    assert_all_ok(&rows);
}

#[test]
fn padded_dataset_encoding_matches_minimind_pretrain_dataset() {
    let d = dir();
    let rows =
        verify_reference::check_dataset(&d.join("dataset_cases.json"), &d.join("tokenizer.json"))
            .unwrap();
    assert_all_ok(&rows);
    let cases = fixtures::load_dataset_cases(&d.join("dataset_cases.json")).unwrap();
    assert!(cases.iter().any(|c| c.text.is_empty()));
}

fn minimind3() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/minimind3")
}

/// MiniMind-3's fixtures (q/k norm, head dim 96, its MoE and aux loss, its tokenizer, its own
/// `.pth` files) through the reference: the tolerances of golden/minimind (module doc).
#[test]
fn minimind3_fixtures_pass_on_the_reference() {
    let rows = harness::verify::run(&minimind3(), &harness::verify::Target::Reference).unwrap();
    println!("{}", format_table(&rows));
    assert_all_ok(&rows);
    for name in ["dense3_tiny", "dense3_head96", "moe3_tiny", "train3_tiny"] {
        assert!(rows.iter().any(|r| r.fixture == name), "{name} not checked");
    }
    assert!(rows.iter().any(|r| r.group.starts_with("pth_import")));
}

/// `verify --path reference`'s refusal of `dir`, with its causes.
fn refusal(dir: &Path) -> String {
    let err = harness::verify::run(dir, &harness::verify::Target::Reference)
        .map(|_| ())
        .unwrap_err();
    format!("{err:#}")
}

/// The refusal of a folder holding only the fixture `stem` of `src`, its JSON changed by `edit`.
fn refusal_after_edit(src: &Path, stem: &str, edit: &dyn Fn(&mut serde_json::Value)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    for ext in ["json", "safetensors"] {
        let f = format!("{stem}.{ext}");
        std::fs::copy(src.join(&f), tmp.path().join(&f)).unwrap();
    }
    let jp = tmp.path().join(format!("{stem}.json"));
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
    edit(&mut j);
    std::fs::write(&jp, serde_json::to_string(&j).unwrap()).unwrap();
    refusal(tmp.path())
}

/// A fixture whose config does not describe its tensors is refused with one sentence naming the
/// file and the field, not a shape panic.
#[test]
fn a_fixture_whose_config_does_not_fit_its_tensors_names_the_file_and_the_field() {
    let msg = refusal_after_edit(&minimind3(), "dense3_head96", &|j| {
        j["config"].as_object_mut().unwrap().remove("head_dim");
    });
    assert!(
        msg.contains("dense3_head96.json") && msg.contains("head_dim"),
        "{msg}"
    );
}

/// Fixture configs that cannot size a model, and fixtures missing half of their pair, are
/// refused with one sentence naming the file and the field, not a division by zero inside the
/// reference or a folder that passes by skipping them.
#[test]
fn unusable_fixture_configs_and_lone_halves_are_refused_by_file_and_field() {
    let edit = |stem: &str, f: &dyn Fn(&mut serde_json::Value)| refusal_after_edit(&dir(), stem, f);
    let set = |k: &'static str, v: serde_json::Value| {
        move |j: &mut serde_json::Value| j["config"][k] = v.clone()
    };
    for (case, file, msg) in [
        (
            edit("dense_tiny", &set("num_attention_heads", 0.into())),
            "dense_tiny.json",
            "field config.num_attention_heads is 0",
        ),
        (
            edit("dense_tiny", &set("num_key_value_heads", 3.into())),
            "dense_tiny.json",
            "is not a multiple of num_key_value_heads 3",
        ),
        (
            edit("dense_tiny", &|j| {
                let n = j["config"]["num_hidden_layers"].as_u64().unwrap();
                j["config"]["num_hidden_layers"] = (n + 1).into();
            }),
            "dense_tiny.json",
            "(field num_hidden_layers)",
        ),
        (
            edit("train_tiny", &|j| j["accumulation_steps"] = 0.into()),
            "train_tiny.json",
            "field accumulation_steps is 0",
        ),
    ] {
        assert!(
            case.contains(file) && case.contains(msg),
            "want {file} and {msg:?} in {case}"
        );
    }
    // A model fixture's JSON without its tensors.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir().join("dense_tiny.json"),
        tmp.path().join("dense_tiny.json"),
    )
    .unwrap();
    let msg = refusal(tmp.path());
    assert!(
        msg.contains("dense_tiny.json") && msg.contains("dense_tiny.safetensors are not beside it"),
        "{msg}"
    );
}

/// The textbook recipe's fixtures (golden/seed004: a masked-LM step of MiniMind-3's decoder with
/// bidirectional attention, transformers' linear schedule, group_texts) through the reference.
#[test]
fn seed004_fixtures_pass_on_the_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/seed004");
    let rows = harness::verify::run(&dir, &harness::verify::Target::Reference).unwrap();
    println!("{}", format_table(&rows));
    assert_all_ok(&rows);
    assert!(rows.iter().any(|r| r.fixture == "mlm3_tiny"));
    assert!(rows.iter().any(|r| r.group.starts_with("linear_schedule")));
    assert!(rows.iter().any(|r| r.group.starts_with("group_texts")));
}

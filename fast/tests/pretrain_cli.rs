//! `fast pretrain` end to end on the CPU with tiny models on the embedded poems: it learns, it
//! writes what it promises, a stopped-and-resumed run ends bit-identical to an uninterrupted
//! one, and bad input gives an error that names the problem (never a panic).

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{assert_same_tensors, fast, read_tensors};

/// A tiny model and run: 96 poems, rows of 32 tokens, batch 8 -> 12 steps per epoch.
const TINY: &[&str] = &[
    "pretrain",
    "--device",
    "cpu",
    "--max-docs",
    "96",
    "--hidden-size",
    "32",
    "--num-hidden-layers",
    "1",
    "--num-attention-heads",
    "2",
    "--num-key-value-heads",
    "1",
    "--max-seq-len",
    "32",
    "--batch-size",
    "8",
    "--learning-rate",
    "5e-3",
    "--log-interval",
    "2",
    "--save-interval",
    "5",
    "--num-workers",
    "2",
    "--sample-tokens",
    "8",
    "--no-progress",
];

fn run_in(dir: &Path, extra: &[&str]) -> Output {
    fast()
        .current_dir(dir)
        .args(TINY)
        .args(extra)
        .output()
        .expect("running fast")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "fast failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn fails_with(args: &[&str], dir: &Path, want: &str) {
    let out = fast().current_dir(dir).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(
        stderr.contains(want),
        "{args:?}: stderr should contain {want:?}:\n{stderr}"
    );
}

fn run_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("out/run_config.json")).unwrap())
        .unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_tiny_run_lowers_the_loss_and_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &["--epochs", "2", "--accumulation-steps", "2"],
    ));
    assert!(stdout.contains("run configuration:"), "{stdout}");
    assert!(stdout.contains("Epoch:[2/2](12/12), loss: "), "{stdout}");
    assert!(stdout.contains("sample (greedy"), "{stdout}");

    let rows = metrics(dir.path());
    assert!(rows.len() >= 10, "{} metric rows", rows.len());
    let first = rows[0]["loss_avg"].as_f64().unwrap();
    let last = rows.last().unwrap()["loss_avg"].as_f64().unwrap();
    assert!(last < first - 0.5, "loss {first} -> {last}");
    for key in [
        "step",
        "epoch",
        "loss",
        "ce",
        "aux",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "useful_tokens_seen",
    ] {
        assert!(
            rows.last().unwrap().get(key).is_some(),
            "metrics rows lack {key}"
        );
    }
    assert_eq!(rows.last().unwrap()["step"], 24);

    // Weights: float16 under MiniMind names (tied lm_head stored once), config JSON beside.
    let weights = read_tensors(&dir.path().join("out/pretrain_32.safetensors"));
    let names: Vec<&str> = weights.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(names.contains(&"model.embed_tokens.weight"));
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.weight"));
    assert!(!names.contains(&"lm_head.weight"));
    let embed = weights
        .iter()
        .find(|w| w.0 == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(embed.2, vec![6400, 32]);
    assert_eq!(embed.1.len(), 6400 * 32 * 2, "float16");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/pretrain_32.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["hidden_size"], 32);
    assert_eq!(cfg["vocab_size"], 6400);
    let run = run_config(dir.path());
    assert_eq!(run["batch_size"], 8);

    let svg = std::fs::read_to_string(dir.path().join("out/loss_curve.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "curve svg"
    );

    let resume = fast::io::checkpoint::load_resume(
        &dir.path()
            .join("checkpoints/pretrain_32_resume.safetensors"),
    )
    .unwrap()
    .expect("resume checkpoint");
    assert!(resume.state.completed);
    assert_eq!(
        (
            resume.state.epoch,
            resume.state.step,
            resume.state.global_step
        ),
        (1, 12, 24)
    );
    assert_eq!(resume.state.config.batch_size, 8);
    assert!(resume
        .tensors
        .contains_key("adam.exp_avg.model.embed_tokens.weight"));

    // The saved weights load back for inference.
    let out = fast()
        .current_dir(dir.path())
        .args([
            "generate",
            "--weights",
            "out/pretrain_32.safetensors",
            "--prompt",
            "春",
            "--max-new-tokens",
            "4",
        ])
        .args([
            "--tokenizer",
            &fast::data::defaults::materialize()
                .unwrap()
                .tokenizer_dir
                .display()
                .to_string(),
        ])
        .args(["--device", "cpu", "--temperature", "0"])
        .output()
        .unwrap();
    ok(&out);
    // Without --tokenizer, generate takes the one the run recorded beside its weights: the same
    // greedy text.
    let recorded = fast()
        .current_dir(dir.path())
        .args(["generate", "--weights", "out/pretrain_32.safetensors"])
        .args(["--prompt", "春", "--max-new-tokens", "4"])
        .args(["--device", "cpu", "--temperature", "0"])
        .output()
        .unwrap();
    ok(&recorded);
    assert_eq!(recorded.stdout, out.stdout);
    assert!(String::from_utf8_lossy(&recorded.stderr).contains("recorded with the weights"));
}

/// Stop at `stop` micro-steps (mid-window, mid-epoch), resume, and compare every tensor of the
/// final weights and resume checkpoint with an uninterrupted run's.
fn resumed_equals_uninterrupted(extra: &[&str], stop: &str) {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let common = [
        &[
            "--epochs",
            "2",
            "--accumulation-steps",
            "3",
            "--sample-tokens",
            "0",
        ][..],
        extra,
    ]
    .concat();
    ok(&run_in(a.path(), &common));
    let stopped = ok(&run_in(
        b.path(),
        &[&common[..], &["--max-steps", stop]].concat(),
    ));
    assert!(stopped.contains("(--max-steps)"), "{stopped}");
    let resumed = ok(&run_in(
        b.path(),
        &[&common[..], &["--from-resume", "1"]].concat(),
    ));
    assert!(resumed.contains("resume: "), "{resumed}");
    assert!(
        stop == "12" || resumed.contains("skipping the first"),
        "{resumed}"
    );
    assert_same_tensors(
        a.path(),
        b.path(),
        &[
            "out/pretrain_32.safetensors",
            "checkpoints/pretrain_32_resume.safetensors",
        ],
    );
    // The weights files are byte-identical too: equal tensors give equal files (the header's
    // metadata is written in one order in every process).
    let bytes = |d: &std::path::Path| std::fs::read(d.join("out/pretrain_32.safetensors")).unwrap();
    assert!(
        bytes(a.path()) == bytes(b.path()),
        "the weights files differ in their bytes"
    );
    // The resumed run's metrics continue the stopped run's history (plus the row logged at the stop).
    let (ma, mb) = (metrics(a.path()), metrics(b.path()));
    let stop: u64 = stop.parse().unwrap();
    let steps = |m: &[serde_json::Value]| {
        m.iter()
            .map(|r| r["step"].as_u64().unwrap())
            .filter(|&s| s != stop || s % 2 == 0)
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&ma), steps(&mb));
}

#[test]
fn a_run_stopped_mid_window_and_resumed_is_bit_identical_to_an_uninterrupted_one() {
    resumed_equals_uninterrupted(&[], "7");
}

#[test]
fn a_run_stopped_at_the_end_of_an_epoch_resumes_with_the_next_epoch_bit_identically() {
    resumed_equals_uninterrupted(&[], "12");
}

#[test]
fn packed_token_weighted_run_stopped_mid_window_resumes_bit_identically() {
    resumed_equals_uninterrupted(
        &["--data-mode", "packed", "--loss-normalization", "token"],
        "13",
    );
}

/// A corpus of several files (one gzip'd) tokenized ahead by `fast tokenize` into a cache both
/// runs share; packed rows.
#[test]
fn a_run_on_a_cached_multi_file_corpus_resumes_bit_identically() {
    let data = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(fast::data::defaults::materialize().unwrap().corpus).unwrap();
    let lines: Vec<&str> = text.lines().take(120).collect();
    let corpus = data.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("b.jsonl"), lines[60..].join("\n")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(corpus.join("a.jsonl.gz")).unwrap(),
        flate2::Compression::default(),
    );
    std::io::Write::write_all(&mut gz, (lines[..60].join("\n") + "\n").as_bytes()).unwrap();
    gz.finish().unwrap();
    let cache = data.path().join("cache");
    let tok = fast::data::defaults::materialize()
        .unwrap()
        .tokenizer_dir
        .display()
        .to_string();
    let out = fast()
        .args([
            "tokenize",
            "--data-path",
            corpus.to_str().unwrap(),
            "--tokenizer",
            &tok,
        ])
        .args([
            "--out",
            cache.to_str().unwrap(),
            "--shard-tokens",
            "2000",
            "--no-progress",
        ])
        .output()
        .unwrap();
    assert!(ok(&out).contains("120 documents"));
    resumed_equals_uninterrupted(
        &[
            "--data-path",
            corpus.to_str().unwrap(),
            "--token-cache",
            cache.to_str().unwrap(),
            "--data-mode",
            "packed",
        ],
        "7",
    );
}

/// packed-docs rows reach pretrain's and bench's steps (their batches carry seg_start; the
/// model's use of it is the trainer's business) and are named in the configuration.
#[test]
fn packed_docs_runs_train_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--data-mode",
            "packed-docs",
            "--max-steps",
            "2",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(stdout.contains("packed-docs rows of 32 tokens"), "{stdout}");
    let run = run_config(dir.path());
    assert_eq!(run["data_mode"], "packed-docs");
    let corpus = fast::data::defaults::materialize().unwrap().corpus;
    let out = fast()
        .current_dir(dir.path())
        .args([
            "bench",
            "--device",
            "cpu",
            "--data-path",
            corpus.to_str().unwrap(),
        ])
        .args([
            "--data-mode",
            "packed-docs",
            "--batch-size",
            "2",
            "--max-seq-len",
            "32",
        ])
        .args([
            "--hidden-size",
            "32",
            "--num-hidden-layers",
            "1",
            "--num-attention-heads",
            "2",
        ])
        .args([
            "--num-key-value-heads",
            "1",
            "--warmup",
            "1",
            "--steps",
            "1",
        ])
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(line["config"]["data_mode"], "packed-docs");
    assert!(line["final_loss"].as_f64().unwrap().is_finite());
}

/// Muon's momentum buffers travel in the resume checkpoint with the WSD schedule's position.
#[test]
fn a_muon_wsd_run_stopped_mid_window_resumes_bit_identically() {
    resumed_equals_uninterrupted(
        &[
            "--optimizer",
            "muon",
            "--lr-schedule",
            "wsd",
            "--warmup-steps",
            "1",
        ],
        "8",
    );
}

#[test]
fn moe_runs_and_logs_its_aux_loss() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &["--use_moe", "1", "--max-steps", "4", "--log-interval", "1"],
    ));
    assert!(stdout.contains("MoE"), "{stdout}");
    let rows = metrics(dir.path());
    assert!(rows[0]["aux"].as_f64().unwrap() > 0.0, "{:?}", rows[0]);
    assert!(dir.path().join("out/pretrain_32_moe.safetensors").exists());
}

/// A learning rate of 1e30 makes the weights overflow within a step or two. The non-finite step is
/// skipped on the device and read by the host a step later (without waiting for the step queued
/// in between): the run stops with an error that names the step and the way out, or, with
/// --skip-nonfinite, runs to the end and reports how many steps it skipped.
#[test]
fn a_non_finite_step_stops_the_run_or_is_skipped_and_counted() {
    let blow_up = [
        "--learning-rate",
        "1e30",
        "--max-steps",
        "6",
        "--log-interval",
        "1",
        "--sample-tokens",
        "0",
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &blow_up);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a non-finite run must fail");
    assert!(
        stderr.contains("the loss or a gradient is not finite")
            && stderr.contains("--skip-nonfinite"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &[&blow_up[..], &["--skip-nonfinite"]].concat());
    let stdout = ok(&out) + &String::from_utf8_lossy(&out.stderr);
    let skipped: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("skipped "))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'skipped N optimizer step(s)' line:\n{stdout}"));
    assert!((1..=6).contains(&skipped), "{stdout}");
    assert_eq!(
        stdout
            .matches("non-finite loss or gradient, optimizer step skipped")
            .count(),
        skipped,
        "one log line per skipped step:\n{stdout}"
    );
}

/// --profile traces the asked micro-steps of a real run: rank 0's Chrome trace holds the
/// model's ops, and the per-op table is printed.
#[test]
fn profile_writes_a_trace_of_the_asked_steps() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &[
            "--max-steps",
            "4",
            "--sample-tokens",
            "0",
            "--profile",
            "prof",
            "--profile-at",
            "2",
            "--profile-steps",
            "2",
        ],
    );
    let _ = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over 2 profiled step(s)"), "{stderr}");
    let trace = std::fs::read_to_string(dir.path().join("prof/rank0/trace.json")).unwrap();
    assert!(
        trace.contains("aten::mm") || trace.contains("aten::matmul"),
        "no matmul in the trace"
    );
    assert!(dir.path().join("prof/rank0/kernels.tsv").is_file());

    // A first profiled step the run never reaches is said, not silently ignored.
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &[
            "--max-steps",
            "2",
            "--sample-tokens",
            "0",
            "--profile",
            "prof",
            "--profile-at",
            "5",
        ],
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("--profile-at 5: this run did not reach micro-step 5"),
        "{stdout}"
    );
    assert!(!dir.path().join("prof").exists());
}

#[test]
fn from_resume_without_a_checkpoint_starts_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--from-resume",
            "1",
            "--max-steps",
            "2",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(stdout.contains("no checkpoint at"), "{stdout}");
}

#[test]
fn from_weight_starts_from_saved_weights() {
    let dir = tempfile::tempdir().unwrap();
    ok(&run_in(
        dir.path(),
        &["--max-steps", "3", "--sample-tokens", "0"],
    ));
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--from-weight",
            "pretrain",
            "--max-steps",
            "1",
            "--sample-tokens",
            "0",
            "--save-weight",
            "again",
        ],
    ));
    assert!(
        stdout.contains("weights: started from out/pretrain_32.safetensors"),
        "{stdout}"
    );
    fails_with(
        &[&TINY[..], &["--from-weight", "nothing"]].concat(),
        dir.path(),
        "--from-weight nothing: no such file",
    );
}

#[test]
fn resume_refuses_other_configs_and_damaged_files_by_name() {
    let dir = tempfile::tempdir().unwrap();
    ok(&run_in(
        dir.path(),
        &["--max-steps", "2", "--sample-tokens", "0"],
    ));
    let args = [&TINY[..], &["--from-resume", "1"]].concat();
    fails_with(
        &[&args[..], &["--batch-size", "4"]].concat(),
        dir.path(),
        "--batch-size: saved 8, now 4",
    );
    fails_with(
        &[&args[..], &["--skip-bad-lines"]].concat(),
        dir.path(),
        "--skip-bad-lines: saved false, now true",
    );
    fails_with(
        &[&args[..], &["--mlm-probability", "0.3"]].concat(),
        dir.path(),
        "--mlm-probability: saved 0.15, now 0.3",
    );

    let ckpt = dir
        .path()
        .join("checkpoints/pretrain_32_resume.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 3] ^= 0x40;
    std::fs::write(&ckpt, &flipped).unwrap();
    fails_with(&args, dir.path(), "checksum mismatch");
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&args, dir.path(), "truncated or not a safetensors file");
    std::fs::write(&ckpt, b"not a checkpoint at all").unwrap();
    fails_with(&args, dir.path(), "pretrain_32_resume.safetensors");
}

#[test]
fn bad_options_and_bad_data_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let with = |extra: &[&str]| -> Vec<String> {
        TINY.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let check = |extra: &[&str], want: &str| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, d, want);
    };
    check(
        &["--batch-size", "0"],
        "--batch-size must be at least 1 (got 0)",
    );
    check(
        &["--accumulation-steps", "0"],
        "--accumulation-steps must be at least 1",
    );
    check(&["--epochs", "0"], "--epochs must be at least 1");
    check(
        &["--learning-rate=-1"],
        "--learning-rate must be a positive number",
    );
    check(&["--max-seq-len", "1"], "--max-seq-len must be at least 2");
    check(
        &["--hidden-size", "30", "--num-attention-heads", "4"],
        "not divisible by --num-attention-heads",
    );
    check(
        &[
            "--num-attention-heads",
            "2",
            "--num-key-value-heads",
            "3",
            "--hidden-size",
            "32",
        ],
        "not a multiple of --num-key-value-heads",
    );
    check(&["--dtype", "float64"], "invalid value 'float64'");
    check(&["--use-moe", "2"], "--use-moe");
    check(&["--device", "tpu"], "--device \"tpu\" is not one of");
    check(&["--data-path", "."], "is a directory");
    check(
        &["--data-path", "missing.jsonl"],
        "cannot read data file missing.jsonl",
    );

    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"春眠不覺曉\"}\n{\"text\": 5}\n").unwrap();
    check(
        &["--data-path", bad.to_str().unwrap()],
        "bad.jsonl:2: \"text\" is a number, not a string",
    );
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    check(&["--data-path", empty.to_str().unwrap()], "is empty");
    check(
        &["--tokenizer", d.to_str().unwrap()],
        "tokenizer.json not found",
    );

    // --skip-bad-lines trains on what is left.
    let out = run_in(
        d,
        &[
            "--data-path",
            bad.to_str().unwrap(),
            "--skip-bad-lines",
            "--max-steps",
            "1",
            "--sample-tokens",
            "0",
        ],
    );
    let stdout = ok(&out);
    assert!(stdout.contains("skipped 1 bad line(s)"), "{stdout}");
}

#[test]
fn snake_case_minimind_spellings_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let out = fast()
        .current_dir(dir.path())
        .args([
            "pretrain",
            "--device",
            "cpu",
            "--max_docs",
            "16",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "1",
        ])
        .args([
            "--num_attention_heads",
            "2",
            "--num_key_value_heads",
            "1",
            "--max_seq_len",
            "16",
            "--batch_size",
            "8",
        ])
        .args([
            "--accumulation_steps",
            "1",
            "--learning_rate",
            "1e-3",
            "--log_interval",
            "1",
            "--save_interval",
            "1",
        ])
        .args([
            "--save_dir",
            "w",
            "--save_weight",
            "pt",
            "--grad_clip",
            "0.5",
            "--use_moe",
            "0",
            "--from_weight",
            "none",
        ])
        .args([
            "--from_resume",
            "0",
            "--max_steps",
            "1",
            "--sample_tokens",
            "0",
            "--no_progress",
            "--epochs",
            "1",
        ])
        .output()
        .unwrap();
    ok(&out);
    assert!(dir.path().join("w/pt_32.safetensors").exists());
}

#[test]
fn train_tokenizer_writes_a_loadable_minimind_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let corpus: PathBuf = fast::data::defaults::materialize().unwrap().corpus;
    let out = fast()
        .args([
            "train-tokenizer",
            "--data-path",
            corpus.to_str().unwrap(),
            "--vocab-size",
            "400",
        ])
        .args(["--out", dir.path().join("tok").to_str().unwrap()])
        .output()
        .unwrap();
    ok(&out);
    let tok =
        fast::data::tokenizer::TextTokenizer::load(&dir.path().join("tok"), &Default::default())
            .unwrap();
    assert_eq!(
        (tok.pad, tok.bos, tok.eos, tok.vocab_size()),
        (0, 1, 2, 400)
    );
    let out = fast()
        .args([
            "train-tokenizer",
            "--data-path",
            corpus.to_str().unwrap(),
            "--vocab-size",
            "400",
        ])
        .args(["--special-tokens", "<mask>,<sep>"])
        .args(["--out", dir.path().join("tok2").to_str().unwrap()])
        .output()
        .unwrap();
    ok(&out);
    let tok2 =
        fast::data::tokenizer::TextTokenizer::load(&dir.path().join("tok2"), &Default::default())
            .unwrap();
    assert_eq!(
        (tok2.token_id("<mask>"), tok2.token_id("<sep>")),
        (Some(3), Some(4))
    );
    assert_eq!(tok2.config_token("mask_token").as_deref(), Some("<mask>"));
    assert_eq!(tok2.special_ids(), vec![0, 1, 2, 3, 4]);
    fails_with(
        &["train-tokenizer", "--vocab-size", "100", "--out", "x"],
        dir.path(),
        "--vocab-size 100 is too small",
    );
}

/// `--model minimind3` sets every MiniMind-3 field (q/k norm, head dim 96, its FFN rule and
/// tokenizer) under the tiny run's single-flag overrides, saves them in run_config.json, and
/// exports as Qwen3; `--model minimind3-moe` trains MiniMind-3's MoE with its aux loss.
#[test]
fn minimind3_presets_train_with_their_fields_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--model",
            "minimind3",
            "--max-steps",
            "4",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(stdout.contains("run configuration:"), "{stdout}");
    let run = run_config(dir.path());
    assert_eq!(run["model_preset"], "minimind3");
    assert_eq!(run["architecture"], "minimind-3");
    assert_eq!(run["qk_norm"], true);
    assert_eq!(run["head_dim"], 96);
    assert_eq!(
        run["hidden_size"], 32,
        "the single flag overrides the preset"
    );
    assert!(
        run["tokenizer"].as_str().unwrap().contains("minimind3"),
        "{}",
        run["tokenizer"]
    );
    let names: Vec<String> = read_tensors(&dir.path().join("out/pretrain_32.safetensors"))
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert!(names.contains(&"model.layers.0.self_attn.q_norm.weight".to_string()));
    let tok = run["tokenizer"].as_str().unwrap().to_string();
    let out = fast()
        .current_dir(dir.path())
        .args([
            "export",
            "--weights",
            "out/pretrain_32.safetensors",
            "--out",
            "hf",
        ])
        .args(["--tokenizer", &tok])
        .output()
        .unwrap();
    ok(&out);
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("hf/config.json")).unwrap())
            .unwrap();
    assert_eq!(hf["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(hf["head_dim"], 96);

    let moe = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        moe.path(),
        &[
            "--model",
            "minimind3-moe",
            "--moe-intermediate-size",
            "64",
            "--max-steps",
            "4",
            "--log-interval",
            "1",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(stdout.contains("MoE"), "{stdout}");
    let rows = metrics(moe.path());
    assert!(rows[0]["aux"].as_f64().unwrap() > 0.0, "{:?}", rows[0]);
    assert!(moe.path().join("out/pretrain_32_moe.safetensors").exists());
}

/// `--eval-data` scores the held-out file during the run (at --eval-interval and at the end) as
/// `fast eval` scores it: into the log line, metrics.jsonl and the curve.
#[test]
fn held_out_loss_is_logged_during_training_as_fast_eval_computes_it() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = fast::data::defaults::materialize().unwrap().corpus;
    let text = std::fs::read_to_string(&corpus).unwrap();
    let held: Vec<&str> = text.lines().rev().take(40).collect();
    std::fs::write(dir.path().join("held.jsonl"), held.join("\n") + "\n").unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--eval-data",
            "held.jsonl",
            "--eval-interval",
            "6",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(stdout.contains("| held-out "), "{stdout}");
    let rows = metrics(dir.path());
    let scored: Vec<(u64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(
        scored.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![6, 12],
        "scored at --eval-interval and at the end"
    );
    // fast eval on the saved weights: the same function on the float16 copy of the weights, so
    // the two agree to float16 rounding of the weights (about 1e-3 of the loss).
    let tok = fast::data::defaults::materialize().unwrap().tokenizer_dir;
    let out = fast()
        .current_dir(dir.path())
        .args([
            "eval",
            "--weights",
            "out/pretrain_32.safetensors",
            "--data-path",
            "held.jsonl",
        ])
        .args(["--tokenizer", &tok.display().to_string()])
        .args(["--max-seq-len", "32", "--device", "cpu", "--dtype", "f32"])
        .output()
        .unwrap();
    let line = ok(&out);
    let eval: f64 = line
        .split("loss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let during = scored.last().unwrap().1;
    assert!(
        ((eval - during) / eval).abs() < 1e-2,
        "during training {during}, fast eval {eval}"
    );
}

/// A tokenizer with `<mask>` (train-tokenizer --special-tokens) trained on the poems into `dir`.
fn mask_tokenizer(dir: &Path) -> PathBuf {
    let corpus: PathBuf = fast::data::defaults::materialize().unwrap().corpus;
    let tok = dir.join("tok-mask");
    let out = fast()
        .args([
            "train-tokenizer",
            "--data-path",
            corpus.to_str().unwrap(),
            "--vocab-size",
            "600",
            "--special-tokens",
            "<mask>",
        ])
        .args(["--out", tok.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&out);
    tok
}

/// packed-docs rows (seg_start in every batch) stopped mid-window resume bit-identically.
#[test]
fn packed_docs_run_stopped_mid_window_resumes_bit_identically() {
    resumed_equals_uninterrupted(&["--data-mode", "packed-docs"], "7");
}

/// Masked LM: the masking is drawn per (seed, epoch, row), so a run stopped mid-window and
/// resumed draws the same masks and ends bit-identical; chunked rows, as the textbook recipe.
#[test]
fn a_masked_lm_run_stopped_mid_window_resumes_bit_identically() {
    let t = tempfile::tempdir().unwrap();
    let tok = mask_tokenizer(t.path());
    resumed_equals_uninterrupted(
        &[
            "--objective",
            "mlm",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data-mode",
            "chunked",
        ],
        "7",
    );
}

/// The textbook recipe (chunked rows, linear schedule with warmup) runs end to end, and an MLM
/// run's held-out loss (fixed masking seed) is what `fast eval` reports for its weights (the
/// objective read from run_config.json beside them); a tokenizer without a mask token is refused
/// naming the option.
#[test]
fn the_textbook_recipe_and_masked_lm_eval_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--data-mode",
            "chunked",
            "--lr-schedule",
            "linear",
            "--warmup-steps",
            "100",
            "--max-steps",
            "4",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(stdout.contains("chunked rows of 32 tokens"), "{stdout}");
    let rows = metrics(dir.path());
    // Linear warmup over 100 steps: at step 4 the lr is positive and at most 4/100 of the peak
    // 5e-3 (transformers' step / warmup; 1e-9 relative slack for the float formatting).
    let at4 = rows.iter().find(|r| r["step"] == 4).expect("step 4 logged");
    let lr = at4["lr"].as_f64().unwrap();
    assert!(
        lr > 0.0 && lr <= 5e-3 * 4.0 / 100.0 * (1.0 + 1e-9),
        "lr {lr} is still warming up"
    );
    let run = run_config(dir.path());
    assert_eq!(run["data_mode"], "chunked");
    assert_eq!(run["mlm_probability"], 0.15);

    fails_with(
        &[TINY, &["--objective", "mlm", "--max-steps", "1"]].concat(),
        dir.path(),
        "--mask-token was not given",
    );

    let tok = mask_tokenizer(dir.path());
    let corpus = fast::data::defaults::materialize().unwrap().corpus;
    let text = std::fs::read_to_string(&corpus).unwrap();
    let held: Vec<&str> = text.lines().rev().take(40).collect();
    std::fs::write(dir.path().join("held.jsonl"), held.join("\n") + "\n").unwrap();
    let stdout = ok(&run_in(
        dir.path(),
        &[
            "--objective",
            "mlm",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--eval-data",
            "held.jsonl",
            "--max-steps",
            "6",
            "--sample-tokens",
            "0",
        ],
    ));
    assert!(
        stdout.contains("masked LM: 15% of non-special tokens"),
        "{stdout}"
    );
    let during = metrics(dir.path())
        .iter()
        .filter_map(|r| r["eval_loss"].as_f64())
        .last()
        .expect("an eval_loss row");
    let eval = |extra: &[&str]| {
        let out = fast()
            .current_dir(dir.path())
            .args([
                "eval",
                "--weights",
                "out/pretrain_32.safetensors",
                "--data-path",
                "held.jsonl",
            ])
            .args(["--tokenizer", tok.to_str().unwrap()])
            .args(["--max-seq-len", "32", "--device", "cpu", "--dtype", "f32"])
            .args(extra)
            .output()
            .unwrap();
        let line = ok(&out);
        let num = |key: &str| -> f64 {
            line.split(key)
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{line}"))
        };
        (line.clone(), num("loss "), num("counted tokens "))
    };
    let (line, loss, counted) = eval(&[]);
    assert!(line.contains("(masked LM: 0.15"), "{line}");
    // The same function on the float16 copy of the weights: agreement to float16 rounding of the
    // weights (about 1e-3 of the loss), as for the causal held-out test.
    assert!(
        ((loss - during) / loss).abs() < 1e-2,
        "during training {during}, fast eval {loss}"
    );
    // A fixed masking seed: a second evaluation scores the very same positions.
    assert_eq!(eval(&[]).0, line);
    // Another seed masks other positions (a different count, almost surely: two binomial
    // draws over thousands of tokens agree with probability well under 1%).
    let (_, _, other) = eval(&["--mask-seed", "1"]);
    assert_ne!(counted, other);
    // Read as a causal LM, every non-padding label counts: far more than 15% of them.
    let (line, _, causal) = eval(&["--objective", "clm"]);
    assert!(!line.contains("masked LM"), "{line}");
    assert!(causal > 3.0 * counted, "causal {causal}, masked {counted}");
}

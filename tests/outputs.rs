//! What a run and an export leave for other tools, read back by those tools:
//! TensorBoard event files (TensorBoard's EventAccumulator), the tokenizer a run records beside
//! its weights (`fast export` copies it; transformers loads the folder whole), GGUF files
//! (llama.cpp's `gguf` package, and llama.cpp itself when `MINIMIND_LLAMA_CPP_PYTHON` names a
//! Python with llama-cpp-python: see scripts/gguf_check.sh).
//!
//! The Python checks print SKIP and pass when `.venv` lacks the package (`make setup` installs
//! them); what can be checked without Python always runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use clap::Parser;
use fast::commands::export::{run as export, ExportArgs, ExportFormat};
use fast::model::{MiniMindForCausalLM, ModelConfig};
use tch::{Device, Kind, Tensor};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("outputs_{tag}_"))
        .tempdir()
        .unwrap()
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: fast::train::options::PretrainArgs,
}

/// Training runs in this process one at a time (each uses the libtorch thread pool).
static TRAINING: Mutex<()> = Mutex::new(());

/// A tiny run on the embedded poems (96 poems, d 32, 12 steps of batch 8) in `dir`.
fn tiny_run(dir: &Path, extra: &[&str]) -> fast::train::RunSummary {
    let _one = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (save, ck) = (dir.join("out"), dir.join("ck"));
    let mut argv: Vec<String> = [
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
        "1",
        "--sample-tokens",
        "0",
        "--no-progress",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(["--save-dir".into(), save.display().to_string()]);
    argv.extend(["--checkpoint-dir".into(), ck.display().to_string()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Cli::parse_from(argv).args;
    fast::train::run(&args).unwrap()
}

/// `.venv/bin/python` if it imports `modules`, else None after printing SKIP.
fn python_with(modules: &str, install: &str) -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIP: .venv/bin/python -c 'import {modules}' fails (install: .venv/bin/pip install {install}, or make setup)");
    }
    ok.then_some(py)
}

fn run_json(cmd: &mut Command) -> serde_json::Value {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{cmd:?}: not JSON ({e}):\n{}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

// ---- TensorBoard ----

/// Every record of an event file, its framing and both CRCs checked.
fn records(path: &Path) -> Vec<Vec<u8>> {
    use fast::train::tensorboard::masked_crc32c;
    let b = std::fs::read(path).unwrap();
    let (mut at, mut out) = (0, Vec::new());
    while at < b.len() {
        let len = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
        let crc = |r: std::ops::Range<usize>| u32::from_le_bytes(b[r].try_into().unwrap());
        assert_eq!(
            crc(at + 8..at + 12),
            masked_crc32c(&b[at..at + 8]),
            "length CRC"
        );
        let data = &b[at + 12..at + 12 + len];
        assert_eq!(
            crc(at + 12 + len..at + 16 + len),
            masked_crc32c(data),
            "data CRC"
        );
        out.push(data.to_vec());
        at += 16 + len;
    }
    out
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    v.sort();
    v
}

fn metrics(dir: &Path) -> Vec<fast::train::metrics::MetricRow> {
    fast::train::metrics::read_all(&dir.join("out/metrics.jsonl")).unwrap()
}

/// TensorBoard reads back the logged loss, lr, grad norm, throughputs and held-out loss at the logged steps (as
/// f32, the type of `simple_value`), and the run configuration as text.
#[test]
fn tensorboard_reads_every_logged_value_and_the_run_configuration() {
    let tmp = tmpdir("tb");
    let dir = tmp.path();
    let heldout = dir.join("heldout.jsonl");
    let poems = [
        "床前明月光，疑是地上霜。",
        "白日依山尽，黄河入海流。",
        "春眠不觉晓，处处闻啼鸟。",
    ];
    let lines: Vec<String> = poems
        .iter()
        .map(|p| serde_json::json!({ "text": p }).to_string())
        .collect();
    std::fs::write(&heldout, lines.join("\n") + "\n").unwrap();
    let heldout = heldout.display().to_string();
    tiny_run(dir, &["--eval-data", &heldout, "--eval-interval", "4"]);
    let tb = dir.join("out/tensorboard");
    let files = event_files(&tb);
    assert_eq!(files.len(), 1, "{files:?}");
    let rows = metrics(dir);
    // file version, configuration, one event per log line
    assert_eq!(records(&files[0]).len(), 2 + rows.len());

    let Some(py) = python_with("tensorboard", "tensorboard==2.21.0") else {
        return;
    };
    let got = run_json(
        Command::new(py)
            .arg(root().join("scripts/tb_readback.py"))
            .arg(&tb),
    );
    let series = |tag: &str| -> Vec<(u64, f64)> {
        got["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no scalar {tag} in {}", got["scalars"]))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    type Field = fn(&fast::train::metrics::MetricRow) -> Option<f64>;
    let fields: [(&str, Field); 6] = [
        ("train/loss", |r| Some(r.loss_avg)),
        ("train/lr", |r| Some(r.lr)),
        ("train/grad_norm", |r| r.grad_norm),
        ("perf/tokens_per_s", |r| Some(r.tokens_per_s)),
        ("perf/useful_tokens_per_s", |r| Some(r.useful_tokens_per_s)),
        ("eval/heldout_loss", |r| r.eval_loss),
    ];
    assert!(
        rows.iter().filter(|r| r.eval_loss.is_some()).count() >= 2,
        "--eval-interval 4 over 12 steps scores at least twice"
    );
    for (tag, field) in fields {
        let want: Vec<(u64, f32)> = rows
            .iter()
            .filter_map(|r| Some((r.step as u64, field(r)? as f32)))
            .collect();
        // simple_value is a float: both sides as f32 (JSON's decimal round trip of f64 is not
        // exact in serde_json, the f32 nearest to it is).
        let got: Vec<(u64, f32)> = series(tag)
            .into_iter()
            .map(|(s, v)| (s, v as f32))
            .collect();
        assert_eq!(got, want, "{tag}");
    }
    let text = &got["text"][fast::train::tensorboard::CONFIG_TAG][0][1];
    let text = text.as_str().unwrap();
    assert!(
        text.contains("\"batch_size\": 8") && text.contains("\"hidden_size\": 32"),
        "{text}"
    );
}

/// A run stopped and resumed leaves one event file whose steps are metrics.jsonl's: the resumed
/// run rewrites the history and continues it, without the steps the resume redoes.
#[test]
fn a_resumed_run_continues_its_tensorboard_curve_without_repeated_steps() {
    let tmp = tmpdir("tb_resume");
    let dir = tmp.path();
    tiny_run(dir, &["--max-steps", "7", "--epochs", "2"]);
    tiny_run(dir, &["--from-resume", "1", "--epochs", "2"]);
    let tb = dir.join("out/tensorboard");
    let files = event_files(&tb);
    assert_eq!(files.len(), 1, "{files:?}");
    let rows = metrics(dir);
    assert_eq!(rows.last().unwrap().step, 24);
    assert_eq!(records(&files[0]).len(), 2 + rows.len());

    let Some(py) = python_with("tensorboard", "tensorboard==2.21.0") else {
        return;
    };
    let got = run_json(
        Command::new(py)
            .arg(root().join("scripts/tb_readback.py"))
            .arg(&tb),
    );
    let steps: Vec<u64> = got["scalars"]["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = rows.iter().map(|r| r.step as u64).collect();
    assert_eq!(steps, want);
}

/// `--tensorboard none` writes no event file.
#[test]
fn tensorboard_none_writes_no_events() {
    let tmp = tmpdir("tb_none");
    let s = tiny_run(tmp.path(), &["--tensorboard", "none", "--max-steps", "2"]);
    assert_eq!(s.config.tensorboard, None);
    assert!(!tmp.path().join("out/tensorboard").exists());
}

// ---- the tokenizer beside the weights ----

fn export_args(weights: &Path, out: &Path, format: ExportFormat, dtype: &str) -> ExportArgs {
    ExportArgs {
        weights: weights.to_path_buf(),
        out: out.to_path_buf(),
        tokenizer: None,
        config: None,
        dtype: dtype.into(),
        format,
    }
}

/// A run copies its tokenizer beside its weights and records it; `fast export` without
/// `--tokenizer` writes a folder with it that transformers loads as a whole; a changed copy or a
/// MiniMind .pth (which records none) is refused with a sentence naming --tokenizer.
#[test]
fn export_copies_the_tokenizer_the_run_recorded_or_refuses_naming_tokenizer() {
    let tmp = tmpdir("tok");
    let dir = tmp.path();
    let s = tiny_run(dir, &["--max-steps", "5"]);
    let weights = s.weights_path.clone();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(weights.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(cfg["tokenizer"]["dir"], "pretrain_32.tokenizer", "{cfg}");
    let copy = dir.join("out/pretrain_32.tokenizer");
    let source = fast::data::defaults::materialize().unwrap().tokenizer_dir;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(copy.join(f)).unwrap(),
            std::fs::read(source.join(f)).unwrap(),
            "{f}"
        );
    }

    let hf = dir.join("hf");
    export(&export_args(&weights, &hf, ExportFormat::Hf, "source")).unwrap();
    assert_eq!(
        std::fs::read(hf.join("tokenizer.json")).unwrap(),
        std::fs::read(source.join("tokenizer.json")).unwrap()
    );

    // The JSON beside the weights lost: the record in the file's metadata is used.
    std::fs::remove_file(weights.with_extension("json")).unwrap();
    let hf2 = dir.join("hf2");
    export(&export_args(&weights, &hf2, ExportFormat::Hf, "source")).unwrap();
    assert!(hf2.join("tokenizer.json").is_file());

    let refused = |args: &ExportArgs, why: &str| {
        let e = format!("{:#}", export(args).unwrap_err());
        assert!(e.contains("--tokenizer") && e.contains(why), "{e}");
    };
    let mut changed = std::fs::read_to_string(copy.join("tokenizer_config.json")).unwrap();
    changed.push(' ');
    std::fs::write(copy.join("tokenizer_config.json"), changed).unwrap();
    refused(
        &export_args(&weights, &dir.join("hf3"), ExportFormat::Hf, "source"),
        "not the one the run recorded",
    );
    std::fs::remove_dir_all(&copy).unwrap();
    refused(
        &export_args(&weights, &dir.join("hf4"), ExportFormat::Gguf, "f16"),
        "is missing",
    );
    let pth = root().join("golden/minimind/minimind_pretrain_64.pth");
    refused(
        &export_args(&pth, &dir.join("hf5"), ExportFormat::Hf, "source"),
        "no tokenizer is recorded",
    );

    let Some(py) = python_with("transformers", "transformers==5.23.0") else {
        return;
    };
    let o = Command::new(py)
        .args([
            "-c",
            "import sys; from transformers import AutoTokenizer, AutoModelForCausalLM as M; \
             t = AutoTokenizer.from_pretrained(sys.argv[1]); M.from_pretrained(sys.argv[1]); \
             print(t('春眠不覺曉')['input_ids'])",
        ])
        .arg(&hf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tok = fast::data::tokenizer::TextTokenizer::load(&source, &Default::default()).unwrap();
    let ours: Vec<u32> = tok.encode("春眠不覺曉").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{ours:?}")
    );
}

// ---- GGUF ----

/// Random weights for `cfg` (norms near 1), as our safetensors with its config JSON beside.
fn random_weights_file(cfg: &ModelConfig, dir: &Path, name: &str) -> PathBuf {
    tch::manual_seed(5);
    let w: Vec<(String, Tensor)> = cfg
        .param_shapes()
        .into_iter()
        .map(|(n, s)| {
            let r = Tensor::randn(&s, (Kind::Float, Device::Cpu));
            let t = if s.len() == 1 { r * 0.2 + 1.0 } else { r * 0.3 };
            (n, t)
        })
        .collect();
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(
        &path,
        fast::io::hf::safetensors_bytes(&w, Kind::Float).unwrap(),
    )
    .unwrap();
    let json = serde_json::to_string(cfg).unwrap();
    std::fs::write(path.with_extension("json"), json).unwrap();
    path
}

/// MiniMind2, dense, small, with the full vocabulary the tokenizer needs.
fn minimind2() -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 6400,
        max_position_embeddings: 128,
        ..ModelConfig::default()
    }
}

/// MiniMind-3 (q/k norm, head_dim 24 != d/H: o_proj rows of 48 leave q8_0 for f16) dense and
/// MoE, small.
fn minimind3(moe: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: Some(24),
        vocab_size: 6400,
        max_position_embeddings: 128,
        intermediate_size: Some(96),
        use_moe: moe,
        num_experts: 4,
        num_experts_per_tok: 2,
        moe_intermediate_size: Some(64),
        norm_topk_prob: true,
        ..ModelConfig::minimind3()
    }
}

/// The model's weights in f32 under MiniMind's names, written for the Python side.
fn f32_source(weights: &Path, dir: &Path) -> (ModelConfig, PathBuf) {
    let (cfg, w, _) = fast::io::weights::load_for_inference(weights, None, Kind::Float).unwrap();
    let path = dir.join(format!(
        "{}.f32src.safetensors",
        weights.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &path,
        fast::io::hf::safetensors_bytes(&w, Kind::Float).unwrap(),
    )
    .unwrap();
    (cfg, path)
}

/// gguf-py reads every export back: llama for dense MiniMind2 (q/k permuted), qwen3 for
/// MiniMind-3, qwen3moe for its MoE, in f32, f16, bf16 and q8_0; metadata, tensor names, dims
/// and values equal what llama.cpp's converter would store for the same weights.
#[test]
fn gguf_exports_read_back_in_gguf_py_with_our_values() {
    let tmp = tmpdir("gguf");
    let dir = tmp.path();
    let tokenizer = root().join("golden/minimind");
    let dense2 = random_weights_file(&minimind2(), dir, "dense2");
    let dense3 = random_weights_file(&minimind3(false), dir, "dense3");
    let moe3 = random_weights_file(&minimind3(true), dir, "moe3");
    let cases: Vec<(&Path, &str, &str)> = vec![
        (&dense2, "f32", "llama"),
        (&dense2, "f16", "llama"),
        (&dense2, "bf16", "llama"),
        (&dense2, "q8_0", "llama"),
        (&dense3, "f16", "qwen3"),
        (&dense3, "q8_0", "qwen3"),
        (&moe3, "bf16", "qwen3moe"),
    ];
    let mut files = Vec::new();
    for (weights, dtype, arch) in &cases {
        let out = dir.join(format!("{arch}-{dtype}.gguf"));
        let mut a = export_args(weights, &out, ExportFormat::Gguf, dtype);
        a.tokenizer = Some(tokenizer.clone());
        export(&a).unwrap();
        let b = std::fs::read(&out).unwrap();
        assert_eq!(&b[..4], b"GGUF");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
            3,
            "version"
        );
        let (cfg, src) = f32_source(weights, dir);
        files.push((out, src, cfg));
    }
    let Some(py) = python_with("gguf, safetensors", "gguf==0.19.0") else {
        return;
    };
    let tok = fast::data::tokenizer::TextTokenizer::load(&tokenizer, &Default::default()).unwrap();
    for ((out, src, cfg), (_, dtype, arch)) in files.iter().zip(&cases) {
        let got = run_json(
            Command::new(&py)
                .arg(root().join("scripts/gguf_readback.py"))
                .arg(out)
                .arg(src),
        );
        let case = format!("{arch} {dtype}");
        assert_eq!(got["mismatches"], serde_json::json!([]), "{case}");
        assert_eq!(got["missing"], serde_json::json!([]), "{case}");
        let m = &got["metadata"];
        let a = *arch;
        assert_eq!(m["general.architecture"], a, "{case}");
        assert_eq!(m[format!("{a}.block_count")], cfg.num_hidden_layers);
        assert_eq!(m[format!("{a}.embedding_length")], cfg.hidden_size);
        assert_eq!(
            m[format!("{a}.attention.head_count")],
            cfg.num_attention_heads
        );
        assert_eq!(
            m[format!("{a}.attention.head_count_kv")],
            cfg.num_key_value_heads
        );
        assert_eq!(m[format!("{a}.attention.key_length")], cfg.head_dim());
        assert_eq!(m[format!("{a}.rope.dimension_count")], cfg.head_dim());
        assert_eq!(m[format!("{a}.feed_forward_length")], cfg.ffn_width());
        assert_eq!(
            m[format!("{a}.rope.freq_base")].as_f64().unwrap(),
            cfg.rope_theta as f32 as f64
        );
        if a == "qwen3moe" {
            assert_eq!(m["qwen3moe.expert_count"], 4);
            assert_eq!(m["qwen3moe.expert_used_count"], 2);
            assert_eq!(m["qwen3moe.expert_feed_forward_length"], 64);
        }
        assert_eq!(m["tokenizer.ggml.model"], "gpt2");
        assert_eq!(m["tokenizer.ggml.pre"], "gpt-2");
        assert_eq!(m["tokenizer.ggml.tokens"]["len"], cfg.vocab_size);
        assert_eq!(
            m["tokenizer.ggml.tokens"]["head"],
            serde_json::json!(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "!"])
        );
        assert_eq!(
            m["tokenizer.ggml.token_type"]["head"],
            serde_json::json!([3, 3, 3, 1])
        );
        assert_eq!(m["tokenizer.ggml.bos_token_id"], tok.bos);
        assert_eq!(m["tokenizer.ggml.eos_token_id"], tok.eos);
        assert_eq!(m["tokenizer.ggml.padding_token_id"], tok.pad);
        assert_eq!(m["tokenizer.ggml.add_bos_token"], true);
        assert!(m["tokenizer.ggml.merges"]["len"].as_u64().unwrap() > 6000);
        let names: Vec<&str> = got["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"token_embd.weight") && names.contains(&"blk.1.attn_q.weight"));
        assert!(!names.contains(&"output.weight"), "tied: no output.weight");
        let ty = |n: &str| {
            got["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == n)
                .unwrap()["type"]
                .clone()
        };
        assert_eq!(ty("blk.0.attn_norm.weight"), "F32", "{case}");
        let want = match *dtype {
            "f32" => "F32",
            "f16" => "F16",
            "bf16" => "BF16",
            _ => "Q8_0",
        };
        assert_eq!(ty("blk.0.attn_v.weight"), want, "{case}");
    }
}

/// MiniMind2's MoE has no llama.cpp architecture: refused with a sentence, nothing written.
#[test]
fn gguf_export_refuses_minimind2_moe() {
    let tmp = tmpdir("gguf_moe2");
    let cfg = ModelConfig {
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        vocab_size: 6400,
        use_moe: true,
        n_routed_experts: 2,
        n_shared_experts: 1,
        ..ModelConfig::default()
    };
    let w = random_weights_file(&cfg, tmp.path(), "moe2");
    let out = tmp.path().join("m.gguf");
    let mut a = export_args(&w, &out, ExportFormat::Gguf, "f16");
    a.tokenizer = Some("minimind2".into());
    let e = format!("{:#}", export(&a).unwrap_err());
    assert!(e.contains("no llama.cpp architecture"), "{e}");
    assert!(!out.exists());
}

// ---- llama.cpp itself (scripts/gguf_check.sh) ----

/// With `MINIMIND_LLAMA_CPP_PYTHON` (a Python with llama-cpp-python) and
/// `MINIMIND_GGUF_CHECK_WEIGHTS` (comma-separated weights files, each with its tokenizer
/// recorded), llama.cpp tokenizes a poem line as we do and its next-token logits equal our f32
/// forward's: f32 and f16 exports within 1% of the largest logit (f16 weights carry 2^-11
/// relative rounding, well inside bf16's 2^-8), q8_0 within 5% and the same argmax.
#[test]
fn llama_cpp_tokenizes_and_predicts_as_we_do() {
    let (Ok(py), Ok(list)) = (
        std::env::var("MINIMIND_LLAMA_CPP_PYTHON"),
        std::env::var("MINIMIND_GGUF_CHECK_WEIGHTS"),
    ) else {
        println!("SKIP: set MINIMIND_LLAMA_CPP_PYTHON and MINIMIND_GGUF_CHECK_WEIGHTS (scripts/gguf_check.sh does)");
        return;
    };
    let text = "春眠不覺曉，處處聞啼鳥。";
    let tmp = tmpdir("llama_cpp");
    for weights in list.split(',').map(PathBuf::from) {
        let tdir = fast::io::checkpoint::recorded_tokenizer(&weights, None).unwrap();
        let tok = fast::data::tokenizer::TextTokenizer::load(&tdir, &Default::default()).unwrap();
        let ids: Vec<i64> = std::iter::once(tok.bos as i64)
            .chain(tok.encode(text).unwrap().into_iter().map(i64::from))
            .collect();
        let (cfg, w, _) =
            fast::io::weights::load_for_inference(&weights, None, Kind::Float).unwrap();
        let m =
            MiniMindForCausalLM::from_weights(&cfg, w, Kind::Float, Device::Cpu, "ours").unwrap();
        let ours = {
            let _g = tch::no_grad_guard();
            m.forward(&Tensor::from_slice(&ids).view([1, -1]), None)
                .logits
                .get(0)
        };
        let scale = ours.abs().max().double_value(&[]);
        for (dtype, bound) in [("f32", 0.01), ("f16", 0.01), ("q8_0", 0.05)] {
            let out = tmp.path().join(format!(
                "{}-{dtype}.gguf",
                weights.file_stem().unwrap().to_string_lossy()
            ));
            export(&export_args(&weights, &out, ExportFormat::Gguf, dtype)).unwrap();
            let ids_arg = ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let got = run_json(
                Command::new(&py)
                    .arg(root().join("scripts/llama_cpp_logits.py"))
                    .arg(&out)
                    .arg(text)
                    .arg(&ids_arg),
            );
            let theirs_ids: Vec<i64> = serde_json::from_value(got["tokens"].clone()).unwrap();
            assert_eq!(theirs_ids, ids, "llama.cpp's tokenization of {text:?}");
            let rows: Vec<Vec<f32>> = serde_json::from_value(got["logits"].clone()).unwrap();
            let theirs = Tensor::from_slice(&rows.concat()).view([ids.len() as i64, -1]);
            let diff = (&theirs - &ours).abs().max().double_value(&[]);
            let same_argmax = theirs.argmax(-1, false).equal(&ours.argmax(-1, false));
            println!(
                "llama.cpp vs ours, {} ({}) {dtype}: max |logit diff| {diff:.3e}, max |logit| {scale:.3}, relative {:.2e}, argmax {}",
                weights.display(),
                fast::io::gguf::gguf_arch(&cfg).unwrap().name(),
                diff / scale,
                if same_argmax { "equal at every position" } else { "DIFFERS" }
            );
            assert!(diff / scale < bound, "{dtype}: relative {}", diff / scale);
            assert!(same_argmax || dtype == "q8_0", "{dtype}: argmax differs");
        }
    }
}

//! `fast export`: the Hugging Face folder re-imports losslessly, and transformers' Llama / Qwen3
//! built from it gives our logits (so no q/k permutation is needed for rotate-half RoPE).

use std::path::{Path, PathBuf};
use std::process::Command;

use fast::commands::export::{run, ExportArgs};
use fast::model::{MiniMindForCausalLM, ModelConfig};
use tch::{Device, Kind, Tensor};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn golden(name: &str) -> PathBuf {
    root().join("golden/minimind").join(name)
}

/// A fresh directory under the system temp dir, removed when the returned handle drops (a failed
/// assertion unwinds and drops it too), so test runs leave nothing behind.
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("export_hf_{tag}_"))
        .tempdir()
        .unwrap()
}

fn export(weights: &Path, out: &Path, dtype: &str) {
    run(&ExportArgs {
        weights: weights.to_path_buf(),
        out: out.to_path_buf(),
        tokenizer: Some(golden("")),
        config: None,
        dtype: dtype.into(),
        format: Default::default(),
    })
    .unwrap();
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn export_then_import_is_lossless() {
    let pth = golden("minimind_pretrain_64.pth");
    let (arch0, w0, _) = fast::io::weights::load_for_inference(&pth, None, Kind::Double).unwrap();
    for dtype in ["source", "f32"] {
        let out_tmp = tmpdir(&format!("lossless_{dtype}"));
        let out = out_tmp.path();
        export(&pth, out, dtype);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        let st = out.join("model.safetensors");
        let raw = fast::io::weights::load_weights(&st).unwrap();
        let want_kind = if dtype == "source" {
            Kind::Half
        } else {
            Kind::Float
        };
        assert!(raw.iter().all(|(_, t)| t.kind() == want_kind));
        assert!(
            raw.iter().all(|(n, _)| n != "lm_head.weight"),
            "tied head must not be stored"
        );
        // config.json in the folder describes the model fully.
        let (arch1, w1, from) =
            fast::io::weights::load_for_inference(&st, None, Kind::Double).unwrap();
        assert!(from.contains("config.json"), "{from}");
        assert_eq!(arch1, arch0);
        assert_eq!(w0.len(), w1.len());
        for ((n0, t0), (n1, t1)) in w0.iter().zip(&w1) {
            assert_eq!(n0, n1);
            assert!(t0.equal(t1), "{dtype}: {n0} changed");
        }
    }
}

fn hf_python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import transformers, torch, safetensors"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIP: .venv/bin/python -c 'import transformers' fails (install: .venv/bin/pip install transformers==5.23.0)");
    }
    ok.then_some(py)
}

/// Logits of transformers' model loaded from `dir` for `rows`.
fn hf_logits(py: &Path, dir: &Path, rows: &[Vec<i64>]) -> Tensor {
    let ids = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(";");
    let out = dir.join("hf_logits.safetensors");
    let o = Command::new(py)
        .arg(root().join("scripts/hf_logits.py"))
        .arg(dir)
        .arg(&ids)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    println!("{}", String::from_utf8_lossy(&o.stdout).trim());
    let t = Tensor::read_safetensors(&out).unwrap();
    t.into_iter().find(|(n, _)| n == "logits").unwrap().1
}

fn ours(weights: &Path, rows: &[Vec<i64>]) -> Tensor {
    let (cfg, w, _) = fast::io::weights::load_for_inference(weights, None, Kind::Float).unwrap();
    let m = MiniMindForCausalLM::from_weights(&cfg, w, Kind::Float, Device::Cpu, "test").unwrap();
    let ids = Tensor::from_slice(&rows.concat()).view([rows.len() as i64, -1]);
    let _g = tch::no_grad_guard();
    m.forward(&ids, None).logits
}

#[test]
fn transformers_llama_from_the_export_gives_minimind_logits() {
    let Some(py) = hf_python() else { return };
    let pth = golden("minimind_pretrain_64.pth");
    let out_tmp = tmpdir("hf_llama");
    let out = out_tmp.path();
    export(&pth, out, "source");
    let expected =
        Tensor::read_safetensors(golden("minimind_pretrain_64.expected.safetensors")).unwrap();
    let get = |n: &str| {
        expected
            .iter()
            .find(|(k, _)| k == n)
            .unwrap()
            .1
            .shallow_clone()
    };
    let ids = get("input_ids");
    let rows: Vec<Vec<i64>> = (0..ids.size()[0])
        .map(|b| Vec::<i64>::try_from(&ids.get(b)).unwrap())
        .collect();
    let hf = hf_logits(&py, out, &rows);
    let d_golden = max_abs_diff(&hf, &get("logits"));
    let d_ours = max_abs_diff(&hf, &ours(&pth, &rows));
    println!(
        "HF Llama fp32 vs MiniMind float64 logits: {d_golden:.3e}; vs ours fp32: {d_ours:.3e}"
    );
    // fp32 end to end on O(1) logits through 2 layers: ~1e-6 round-off; 1e-4 leaves room for
    // summation-order differences, while any RoPE/layout mistake shows up at O(0.1).
    assert!(d_golden < 1e-4 && d_ours < 1e-4);
}

/// Random weights for `cfg`, written as a safetensors file with its config JSON beside it.
fn random_weights_file(cfg: &ModelConfig, dir: &Path) -> PathBuf {
    tch::manual_seed(3);
    let w: Vec<(String, Tensor)> = cfg
        .param_shapes()
        .into_iter()
        .map(|(n, s)| {
            let t = if s.len() == 1 {
                Tensor::ones(&s, (Kind::Float, Device::Cpu))
                    + Tensor::randn(&s, (Kind::Float, Device::Cpu)) * 0.2
            } else {
                Tensor::randn(&s, (Kind::Float, Device::Cpu)) * 0.3
            };
            (n, t)
        })
        .collect();
    let path = dir.join("model_32.safetensors");
    std::fs::write(
        &path,
        fast::io::hf::safetensors_bytes(&w, Kind::Float).unwrap(),
    )
    .unwrap();
    let hf = fast::io::hf::hf_config(cfg, Default::default(), Kind::Float).unwrap();
    std::fs::write(
        path.with_extension("json"),
        serde_json::to_string(&serde_json::json!({ "config": hf })).unwrap(),
    )
    .unwrap();
    path
}

fn small_config(qk_norm: bool, moe: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: Some(96),
        vocab_size: 512,
        rms_norm_eps: 1e-6,
        rope_theta: 1e4,
        max_position_embeddings: 64,
        qk_norm,
        use_moe: moe,
        n_routed_experts: 4,
        n_shared_experts: 1,
        num_experts_per_tok: 2,
        norm_topk_prob: true,
        ..ModelConfig::default()
    }
}

#[test]
fn transformers_qwen3_from_a_qk_norm_export_gives_our_logits() {
    let Some(py) = hf_python() else { return };
    let dir_tmp = tmpdir("qwen3_src");
    let dir = dir_tmp.path();
    let src = random_weights_file(&small_config(true, false), dir);
    let out_tmp = tmpdir("hf_qwen3");
    let out = out_tmp.path();
    export(&src, out, "source");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen3ForCausalLM");
    let rows = vec![
        vec![1i64, 40, 41, 300, 7, 9, 2, 11],
        vec![1, 3, 3, 3, 3, 500, 8, 0],
    ];
    let hf = hf_logits(&py, out, &rows);
    let d = max_abs_diff(&hf, &ours(&src, &rows));
    println!("HF Qwen3 fp32 vs ours fp32 (qk-norm): {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn moe_export_keeps_minimind_layout_and_reimports() {
    let cfg0 = small_config(false, true);
    let dir_tmp = tmpdir("moe_src");
    let dir = dir_tmp.path();
    let src = random_weights_file(&cfg0, dir);
    let out_tmp = tmpdir("hf_moe");
    let out = out_tmp.path();
    export(&src, out, "source");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "minimind");
    assert_eq!(cfg["n_routed_experts"], 4);
    let (arch1, w1, _) =
        fast::io::weights::load_for_inference(&out.join("model.safetensors"), None, Kind::Float)
            .unwrap();
    assert_eq!(arch1, cfg0);
    let (_, w0, _) = fast::io::weights::load_for_inference(&src, None, Kind::Float).unwrap();
    assert!(w0
        .iter()
        .zip(&w1)
        .all(|((a, x), (b, y))| a == b && x.equal(y)));
}

/// A small MiniMind-3 MoE (q/k norm, head dim 8 != d/H, 4 experts top-1, no shared experts).
fn small_minimind3_moe() -> ModelConfig {
    ModelConfig {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: Some(24),
        vocab_size: 512,
        max_position_embeddings: 64,
        use_moe: true,
        num_experts: 4,
        num_experts_per_tok: 1,
        moe_intermediate_size: Some(48),
        ..ModelConfig::minimind3()
    }
}

/// MiniMind-3's MoE is Qwen3-MoE's: transformers builds Qwen3MoeForCausalLM from the export and
/// gives our logits, and the folder re-imports as the same model.
#[test]
fn transformers_qwen3_moe_from_a_minimind3_moe_export_gives_our_logits() {
    let cfg0 = small_minimind3_moe();
    let dir_tmp = tmpdir("qwen3moe_src");
    let src = random_weights_file(&cfg0, dir_tmp.path());
    let out_tmp = tmpdir("hf_qwen3moe");
    let out = out_tmp.path();
    export(&src, out, "source");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen3MoeForCausalLM");
    let (back, _, _) =
        fast::io::weights::load_for_inference(&out.join("model.safetensors"), None, Kind::Float)
            .unwrap();
    assert_eq!(back.routed_experts(), 4);
    assert_eq!(back.head_dim(), 24);
    assert!(back.is_minimind3() && back.qk_norm);
    let Some(py) = hf_python() else { return };
    let rows = vec![
        vec![1i64, 40, 41, 300, 7, 9, 2, 11],
        vec![1, 3, 3, 3, 3, 500, 8, 0],
    ];
    let hf = hf_logits(&py, out, &rows);
    let d = max_abs_diff(&hf, &ours(&src, &rows));
    println!("HF Qwen3-MoE fp32 vs ours fp32 (MiniMind-3 MoE): {d:.3e}");
    // fp32 through 2 layers and a top-1 router: as for the dense exports, 1e-4 is round-off
    // plus summation order; a wrong layout or routing shows at O(0.1).
    assert!(d < 1e-4, "{d}");
}

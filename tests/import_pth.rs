//! Importing MiniMind `.pth` weight files: a restricted pickle machine that executes nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use fast::io::pth::{read_pth, PthDtype};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/minimind/minimind_pretrain_64.pth")
}

/// A fresh directory under the system temp dir, removed when the returned handle drops (a failed
/// assertion unwinds and drops it too), so test runs leave nothing behind.
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("import_pth_{tag}_"))
        .tempdir()
        .unwrap()
}

#[test]
fn golden_pth_yields_minimind_state_dict_names_in_fp16() {
    let t = read_pth(&golden()).unwrap();
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 2 * 9 + 3, "{names:?}");
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert_eq!(names[1], "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(*names.last().unwrap(), "lm_head.weight");
    for (n, r) in &t {
        assert_eq!(r.dtype, PthDtype::F16, "{n}");
        assert_eq!(r.data.len(), r.numel() * 2, "{n}");
    }
    let get = |n: &str| &t.iter().find(|(k, _)| k == n).unwrap().1;
    assert_eq!(get("model.embed_tokens.weight").shape, vec![512, 64]);
    assert_eq!(
        get("model.layers.1.self_attn.k_proj.weight").shape,
        vec![32, 64]
    );
    assert_eq!(
        get("model.layers.1.mlp.up_proj.weight").shape,
        vec![192, 64]
    );
    assert_eq!(get("model.norm.weight").shape, vec![64]);
    // MiniMind saves `{k: v.half()}`, which un-shares the tied embedding: two equal copies.
    assert_eq!(
        get("lm_head.weight").data,
        get("model.embed_tokens.weight").data
    );
}

/// Write a zip holding `archive/data.pkl` = `pickle` (as torch.save would lay it out).
fn write_pth(path: &Path, pickle: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    z.finish().unwrap();
}

#[test]
fn malicious_globals_are_refused_by_name_and_never_run() {
    let dir_tmp = tmpdir("evil");
    let dir = dir_tmp.path();
    let marker = dir.join("pwned");
    let cmd = format!("touch {}", marker.display());
    let mut os_system = b"\x80\x02cos\nsystem\nq\x00X".to_vec();
    os_system.extend((cmd.len() as u32).to_le_bytes());
    os_system.extend(cmd.as_bytes());
    os_system.extend(b"\x85R.");
    // Protocol-4 style: STACK_GLOBAL('builtins', 'eval').
    let eval = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x041+1\x85R.".to_vec();
    // A state dict whose tensor is rebuilt by something other than _rebuild_tensor_v2.
    let sneaky = b"\x80\x02}q\x00X\x01\x00\x00\x00wcsubprocess\nPopen\n)Rs.".to_vec();
    for (tag, pickle, global) in [
        ("os_system", os_system, "os.system"),
        ("eval", eval, "builtins.eval"),
        ("popen", sneaky, "subprocess.Popen"),
    ] {
        let p = dir.join(format!("{tag}.pth"));
        write_pth(&p, &pickle);
        let err = format!("{:#}", read_pth(&p).unwrap_err());
        assert!(err.contains(global), "{tag}: {err}");
        assert!(
            err.contains(&p.display().to_string()),
            "{tag}: error must name the file: {err}"
        );
        println!("{tag}: {err}");
    }
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
fn not_a_zip_and_missing_storage_are_clear_errors() {
    let dir_tmp = tmpdir("bad");
    let dir = dir_tmp.path();
    let p = dir.join("legacy.pth");
    std::fs::write(&p, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let err = format!("{:#}", read_pth(&p).unwrap_err());
    assert!(err.contains("not a zip archive"), "{err}");

    // A tensor whose storage entry `data/0` is absent.
    let p = dir.join("nostorage.pth");
    let pickle = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89}tRs.";
    write_pth(&p, pickle);
    let err = format!("{:#}", read_pth(&p).unwrap_err());
    assert!(err.contains("data/0") && err.contains("tensor w"), "{err}");
}

fn venv_python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import torch, safetensors"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(py)
}

#[test]
fn torch_save_cases_match_torch_bit_for_bit() {
    let Some(py) = venv_python() else {
        println!("SKIP: .venv/bin/python cannot import torch and safetensors");
        return;
    };
    let dir_tmp = tmpdir("cases");
    let dir = dir_tmp.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_pth_cases.py");
    let out = Command::new(py).arg(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for case in ["bf16", "f32_proto4", "shared", "resume", "parameter"] {
        let got = read_pth(&dir.join(format!("{case}.pth"))).unwrap();
        let want = tch::Tensor::read_safetensors(dir.join(format!("{case}.expected.safetensors")))
            .unwrap();
        let mut got_names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        let mut want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
        got_names.sort();
        want_names.sort();
        assert_eq!(got_names, want_names, "{case}");
        for (name, raw) in &got {
            let w = &want.iter().find(|(n, _)| n == name).unwrap().1;
            let g = raw.to_tensor().unwrap();
            assert_eq!(g.size(), w.size(), "{case} {name}");
            let g = g.to_kind(w.kind());
            assert!(g.equal(w), "{case} {name}: values differ");
        }
        println!("{case}: {} tensors equal", got.len());
    }
    let bf16 = read_pth(&dir.join("bf16.pth")).unwrap();
    assert!(bf16.iter().all(|(_, r)| r.dtype == PthDtype::BF16));

    let err = format!("{:#}", read_pth(&dir.join("noncontig.pth")).unwrap_err());
    assert!(
        err.contains("tensor w") && err.contains("non-contiguous"),
        "{err}"
    );
}

fn golden_config() -> fast::model::ModelConfig {
    fast::model::ModelConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: Some(192),
        vocab_size: 512,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        max_position_embeddings: 32768,
        qk_norm: false,
        use_moe: false,
        ..Default::default()
    }
}

/// Max |a - b| over two tensors, in f64.
fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn imported_golden_weights_reproduce_minimind_logits() {
    use fast::model::MiniMindForCausalLM;
    let want = tch::Tensor::read_safetensors(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("golden/minimind/minimind_pretrain_64.expected.safetensors"),
    )
    .unwrap();
    let get = |n: &str| want.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let (ids, logits) = (get("input_ids"), get("logits"));
    let cfg = golden_config();
    let expected = cfg.param_shapes();
    for (kind, tol) in [(tch::Kind::Double, 1e-9), (tch::Kind::Float, 1e-4)] {
        let loaded = fast::io::weights::load_weights(&golden()).unwrap();
        let w = fast::io::weights::match_weights(loaded, &expected, kind, &golden()).unwrap();
        let m =
            MiniMindForCausalLM::from_weights(&cfg, w, kind, tch::Device::Cpu, "golden").unwrap();
        let got = tch::no_grad(|| m.forward(&ids, None).logits);
        let d = max_abs_diff(&got, &logits);
        println!("{kind:?}: max |logit - expected| = {d:.3e} (tolerance {tol:.0e})");
        assert!(d < tol, "{kind:?}: {d}");
    }
}

#[test]
fn verify_pth_checks_the_golden_weight_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/minimind");
    for precision in ["fp64", "fp32"] {
        let p: fast::model::precision::Precision = precision.parse().unwrap();
        let rows = harness::verify::pth::check_fast(&dir, tch::Device::Cpu, p).unwrap();
        assert_eq!(rows.len(), 1);
        println!(
            "{precision}: {} max_abs {:.3e} tol {:.0e}",
            rows[0].fixture, rows[0].max_abs, rows[0].tol
        );
        assert!(rows[0].ok);
    }
}

//! `fast generate` / `eval` / `export` from the command line, on MiniMind's golden .pth.

use std::path::{Path, PathBuf};
use std::process::Command;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../golden/minimind")
        .join(name)
}

fn fast(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_fast"))
        .args(args)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "fast {args:?} failed:\n{err}");
    (out, err)
}

#[test]
fn generate_with_a_fixed_seed_prints_the_same_text_twice() {
    let w = golden("minimind_pretrain_64.pth");
    let t = golden("");
    let args = [
        "generate",
        "--weights",
        w.to_str().unwrap(),
        "--tokenizer",
        t.to_str().unwrap(),
        "--prompt",
        "abc",
        "--max-new-tokens",
        "16",
        "--seed",
        "9",
        "--device",
        "cpu",
    ];
    let (a, _) = fast(&args);
    let (b, _) = fast(&args);
    assert!(a.starts_with("abc"));
    assert_eq!(a, b);
}

#[test]
fn eval_and_export_run_from_the_command_line() {
    // Removed when dropped, so test runs leave nothing in the temp dir.
    let tmp = tempfile::Builder::new()
        .prefix("generate_cli_")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let data = dir.join("held.jsonl");
    std::fs::write(&data, "{\"text\": \"abc\"}\n{\"text\": \"ab\"}\n").unwrap();
    let w = golden("minimind_pretrain_64.pth");
    let t = golden("");
    let (out, _) = fast(&[
        "eval",
        "--weights",
        w.to_str().unwrap(),
        "--tokenizer",
        t.to_str().unwrap(),
        "--data-path",
        data.to_str().unwrap(),
        "--max-seq-len",
        "16",
        "--device",
        "cpu",
    ]);
    assert!(out.contains("loss") && out.contains("perplexity"), "{out}");
    let hf = dir.join("hf");
    fast(&[
        "export",
        "--weights",
        w.to_str().unwrap(),
        "--tokenizer",
        t.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(hf.join("config.json").is_file() && hf.join("model.safetensors").is_file());
}

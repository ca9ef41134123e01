//! What real runs meet, each case a sentence that names the file and line (or the option) and a
//! non-zero exit, never a panic; or, where the input is fine (BOM, CRLF, a 50 MB line, text made
//! of special tokens), a run that trains. `cargo test --test bad_input -- --nocapture` prints the
//! table of cases and messages.

use std::path::Path;
use std::process::{Command, Output};

mod common;

const TINY: &[&str] = &[
    "pretrain",
    "--device",
    "cpu",
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
    "4",
    "--num-workers",
    "2",
    "--sample-tokens",
    "0",
    "--no-progress",
];

fn fast(dir: &Path, args: &[&str]) -> Output {
    common::fast()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running fast")
}

fn pretrain(dir: &Path, extra: &[&str]) -> Output {
    fast(dir, &[TINY, extra].concat())
}

/// The last line of stderr that says what went wrong.
fn message(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

struct Table(Vec<(String, String)>);

impl Table {
    /// The run must fail cleanly with `want` in its message.
    fn refused(&mut self, case: &str, out: Output, want: &str) {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{case}: should fail\n{err}");
        assert_eq!(out.status.code(), Some(1), "{case}: exit code\n{err}");
        assert!(!err.contains("panicked"), "{case}: panicked\n{err}");
        assert!(err.contains(want), "{case}: want {want:?} in\n{err}");
        self.0.push((case.to_string(), message(&out)));
    }

    /// The run must succeed; `want` in stdout.
    fn accepted(&mut self, case: &str, out: Output, want: &str) {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{case}: should succeed\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(want), "{case}: want {want:?} in\n{text}");
        let line = text.lines().find(|l| l.contains(want)).unwrap_or("");
        self.0.push((case.to_string(), format!("ok: {line}")));
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        println!("| case | what `fast pretrain` says |\n|---|---|");
        for (c, m) in &self.0 {
            println!("| {c} | {} |", m.replace('|', "\\|"));
        }
    }
}

const POEM: &str = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。";

fn corpus(dir: &Path, name: &str, body: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

fn good_lines(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"text\": \"{POEM}{i}\"}}\n"))
        .collect()
}

#[test]
fn bad_data_files_are_refused_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut t = Table(Vec::new());
    let data = |p: &str| ["--data-path".to_string(), p.to_string()];
    let run = |p: String| {
        let a = data(&p);
        pretrain(d, &[a[0].as_str(), a[1].as_str()])
    };

    t.refused(
        "missing data file",
        pretrain(d, &["--data-path", "nope.jsonl"]),
        "cannot read data file nope.jsonl",
    );
    t.refused(
        "empty data file",
        run(corpus(d, "empty.jsonl", b"")),
        "is empty",
    );
    t.refused(
        "every text empty",
        run(corpus(
            d,
            "blank.jsonl",
            b"{\"text\": \"\"}\n{\"text\": \"\"}\n",
        )),
        "have no text (every \"text\" is empty)",
    );
    std::fs::create_dir(d.join("nodata")).unwrap();
    std::fs::write(d.join("nodata/readme.txt"), "no corpus here").unwrap();
    t.refused(
        "a directory without JSONL files as the data path",
        pretrain(d, &["--data-path", "nodata"]),
        "nodata is a directory with no .jsonl, .jsonl.gz or .jsonl.zst files",
    );
    t.refused(
        "a glob that matches nothing",
        pretrain(d, &["--data-path", "nodata/*.jsonl"]),
        "--data-path nodata/*.jsonl: the pattern matches no file",
    );
    let body = format!("{}{{\"text\": \"a\"\n", good_lines(2));
    t.refused(
        "invalid JSON on line 3",
        run(corpus(d, "badjson.jsonl", body.as_bytes())),
        "badjson.jsonl:3: invalid JSON",
    );
    let body = format!("{}{{\"content\": \"a\"}}\n", good_lines(1));
    t.refused(
        "a line without \"text\"",
        run(corpus(d, "notext.jsonl", body.as_bytes())),
        "notext.jsonl:2: object has no \"text\" field",
    );
    let body = format!("{}{{\"text\": [\"a\"]}}\n", good_lines(3));
    t.refused(
        "\"text\" not a string",
        run(corpus(d, "array.jsonl", body.as_bytes())),
        "array.jsonl:4: \"text\" is an array, not a string",
    );
    let mut body = good_lines(1).into_bytes();
    body.extend_from_slice(b"{\"text\": \"caf\xe9\"}\n");
    t.refused(
        "invalid UTF-8 on line 2",
        run(corpus(d, "latin1.jsonl", &body)),
        "latin1.jsonl:2: invalid UTF-8 at byte 13",
    );
    t.refused(
        "a JSON array instead of an object",
        run(corpus(d, "list.jsonl", b"[1, 2]\n")),
        "list.jsonl:1: expected a JSON object",
    );

    // --skip-bad-lines: the same bad lines are left out, counted and reported.
    let mut body = good_lines(40).into_bytes();
    body.extend_from_slice(b"{\"text\": 5}\n{oops\n{\"t\": 1}\n\xff\n");
    let p = corpus(d, "mixed.jsonl", &body);
    t.accepted(
        "--skip-bad-lines on 4 bad lines",
        pretrain(
            d,
            &["--data-path", &p, "--skip-bad-lines", "--max-steps", "2"],
        ),
        "skipped 4 bad line(s)",
    );
}

#[test]
fn unusual_but_valid_data_trains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut t = Table(Vec::new());

    let body = format!("\u{feff}{}", good_lines(40).replace('\n', "\r\n"));
    let p = corpus(d, "bom_crlf.jsonl", body.as_bytes());
    t.accepted(
        "byte-order mark and CRLF line ends",
        pretrain(d, &["--data-path", &p, "--max-steps", "2"]),
        "data: 40 documents",
    );

    let special = "<|im_start|><|im_end|><|endoftext|>".repeat(4);
    let body = format!("{}{{\"text\": \"{special}\"}}\n", good_lines(7));
    let p = corpus(d, "special.jsonl", body.as_bytes());
    t.accepted(
        "text made of special tokens",
        pretrain(
            d,
            &["--data-path", &p, "--batch-size", "8", "--max-steps", "1"],
        ),
        "data: 8 documents",
    );

    // One 50 MB line (poems with punctuation, so it tokenizes in pieces) among short ones; batch
    // 8 of 8 documents takes it in the first step. Padded rows keep its first 30 tokens.
    let mut big = String::with_capacity(51 << 20);
    big.push_str("{\"text\": \"");
    while big.len() < 50 << 20 {
        big.push_str(POEM);
    }
    big.push_str("\"}\n");
    let body = format!("{}{big}", good_lines(7));
    let p = corpus(d, "big.jsonl", body.as_bytes());
    t.accepted(
        "one 50 MB line",
        pretrain(
            d,
            &["--data-path", &p, "--batch-size", "8", "--max-steps", "1"],
        ),
        "data: 8 documents",
    );
}

#[test]
fn bad_tokenizers_options_and_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut t = Table(Vec::new());
    std::fs::create_dir(d.join("tok_missing")).unwrap();
    t.refused(
        "missing tokenizer",
        pretrain(d, &["--tokenizer", "tok_missing"]),
        "tokenizer tok_missing/tokenizer.json not found",
    );
    std::fs::create_dir(d.join("tok_corrupt")).unwrap();
    std::fs::write(d.join("tok_corrupt/tokenizer.json"), "{\"model\": 17").unwrap();
    t.refused(
        "corrupt tokenizer.json",
        pretrain(d, &["--tokenizer", "tok_corrupt"]),
        "tok_corrupt/tokenizer.json: not a Hugging Face tokenizer.json",
    );
    for (opt, val, want) in [
        (
            "--batch-size",
            "0",
            "--batch-size must be at least 1 (got 0)",
        ),
        (
            "--accumulation-steps",
            "0",
            "--accumulation-steps must be at least 1",
        ),
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--max-seq-len", "1", "--max-seq-len must be at least 2"),
        (
            "--learning-rate",
            "-1",
            "--learning-rate must be a positive number",
        ),
        (
            "--learning-rate",
            "nan",
            "--learning-rate must be a positive number",
        ),
        ("--grad-clip", "-1", "--grad-clip"),
        (
            "--aux-loss-coef",
            "nan",
            "--aux-loss-coef (aux_loss_alpha / router_aux_loss_coef) must be zero or a positive number",
        ),
        ("--num-workers", "100000", "--num-workers must be between 1 and 1024"),
        (
            "--num-hidden-layers",
            "100000000",
            "parameters, more than the 68719476736 this trainer takes",
        ),
        ("--num-workers", "0", "--num-workers"),
        ("--log-interval", "0", "--log-interval"),
        ("--save-interval", "0", "--save-interval"),
        ("--device", "tpu", "--device \"tpu\" is not one of"),
        ("--device", "cuda:7", "cuda:7"),
        ("--max-seq-len", "100000", "max_position_embeddings"),
    ] {
        let arg = format!("{opt}={val}");
        t.refused(&format!("{opt} {val}"), pretrain(d, &[&arg]), want);
    }
    t.refused(
        "train-tokenizer with a special token twice",
        fast(
            d,
            &[
                "train-tokenizer",
                "--data-path",
                "none.jsonl",
                "--out",
                "tok_dup",
                "--special-tokens",
                "<a>,<a>",
            ],
        ),
        "--special-tokens \"<a>\": given twice",
    );
    // bench checks the step's options as pretrain does, through the same functions.
    for (opt, val, want) in [
        (
            "--learning-rate",
            "0",
            "--learning-rate must be a positive number (got 0)",
        ),
        (
            "--grad-clip",
            "inf",
            "--grad-clip must be a positive number (got inf)",
        ),
        (
            "--vocab-size",
            "3",
            "--vocab-size must be at least 4 (got 3)",
        ),
        (
            "--num-workers",
            "0",
            "--num-workers must be between 1 and 1024",
        ),
    ] {
        let arg = format!("{opt}={val}");
        t.refused(
            &format!("bench {opt} {val}"),
            fast(d, &["bench", "--device", "cpu", &arg]),
            want,
        );
    }
    // Options that apply only with another are refused without it, not ignored.
    t.refused(
        "--eval-interval without --eval-data",
        pretrain(d, &["--eval-interval", "5"]),
        "--eval-interval applies to the held-out scoring of --eval-data",
    );
    t.refused(
        "--mask-token with a causal LM",
        pretrain(d, &["--mask-token", "<m>"]),
        "--mask-token applies to --objective mlm only",
    );
    t.refused(
        "--n-shared-experts with MiniMind-3's MoE",
        pretrain(
            d,
            &[
                "--architecture",
                "minimind3",
                "--use-moe",
                "1",
                "--n-shared-experts",
                "1",
            ],
        ),
        "--n-shared-experts: MiniMind-3's MoE has no shared experts",
    );
    // MiniMind's options without a counterpart here name what to use instead.
    t.refused(
        "MiniMind's --use_wandb",
        pretrain(d, &["--use_wandb", "--wandb_project", "p"]),
        "--use-wandb: there is no wandb here; every run writes TensorBoard event files",
    );
    t.refused(
        "MiniMind's --use_compile 1",
        pretrain(d, &["--use_compile", "1"]),
        "--use-compile 1: there is no torch.compile here; --cuda-graph",
    );
    // On this CPU-only build: the flag names what it needs instead of silently running eagerly.
    t.refused(
        "--cuda-graph on the CPU",
        pretrain(d, &["--cuda-graph", "--max-steps", "1"]),
        "--cuda-graph: ",
    );
    t.refused(
        "unwritable --save-dir",
        pretrain(d, &["--save-dir", "/dev/null/out", "--max-steps", "1"]),
        "/dev/null/out",
    );
    t.refused(
        "unwritable --checkpoint-dir",
        pretrain(d, &["--checkpoint-dir", "/dev/null/ck", "--max-steps", "1"]),
        "/dev/null/ck",
    );
    // Output directories that are files are refused by option before the first step.
    std::fs::write(d.join("a_file"), "x").unwrap();
    for opt in ["--save-dir", "--checkpoint-dir", "--tensorboard"] {
        let out = pretrain(d, &[opt, "a_file", "--max-steps", "1"]);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("tok/s"),
            "{opt}: trained before refusing"
        );
        t.refused(&format!("{opt} is a file"), out, &format!("{opt} a_file"));
    }
}

/// A write that fails (here: a file-size limit, as a full disk would) stops the run with the
/// reason and leaves the previous checkpoint whole.
#[test]
fn a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = pretrain(d, &["--max-docs", "96", "--max-steps", "5"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let ck = d.join("checkpoints/pretrain_32_resume.safetensors");
    let before = std::fs::read(&ck).unwrap();
    assert!(
        before.len() > 1 << 20,
        "the checkpoint is larger than the limit below"
    );
    // ulimit -f 1024: no file may grow past 1 MiB; SIGXFSZ ignored, so write() fails with EFBIG.
    let mut args = vec![
        "-c",
        "trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_fast"),
    ];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&[
        "--max-docs",
        "96",
        "--from-resume",
        "1",
        "--save-interval",
        "1",
    ]);
    let out = Command::new("sh")
        .env("OMP_NUM_THREADS", "1")
        .current_dir(d)
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("saving resume checkpoint"), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        before,
        "the previous checkpoint is intact"
    );
    fast::io::checkpoint::load_resume(&ck).unwrap().unwrap();
    println!("failed write: {}", message(&out));
}

/// bf16/fp32: a non-finite loss stops the run naming the micro-step (the step itself was skipped
/// on the device, so the weights stay finite and the last checkpoint is kept); with
/// --skip-nonfinite such steps are skipped and counted.
#[test]
fn a_non_finite_loss_stops_the_run_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let blow_up = [
        "--max-docs",
        "96",
        "--learning-rate",
        "1e30",
        "--save-interval",
        "2",
    ];
    let out = pretrain(d, &blow_up);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("the loss or a gradient is not finite"),
        "{err}"
    );
    assert!(err.contains("micro-step "), "{err}");
    println!("non-finite: {}", message(&out));
    let ck =
        fast::io::checkpoint::load_resume(&d.join("checkpoints/pretrain_32_resume.safetensors"))
            .unwrap();
    if let Some(ck) = ck {
        for (name, t) in &ck.tensors {
            let finite = t.isfinite().all();
            assert!(
                bool::try_from(finite).unwrap(),
                "{name} is not finite in the kept checkpoint"
            );
        }
    }

    let d2 = tempfile::tempdir().unwrap();
    let out = pretrain(d2.path(), &[&blow_up[..], &["--skip-nonfinite"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("optimizer step(s) with a non-finite loss or gradient"),
        "{text}"
    );
}

/// `fast pretrain | head`: once the reader has gone, the run ends by SIGPIPE as Unix tools do,
/// without a panic message.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_run_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::fast()
        .current_dir(dir.path())
        .args(TINY)
        .args(["--max-steps", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running fast");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waiting for fast");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}\n{err}",
        out.status
    );
}

//! Fuzzing with proptest: the JSONL reader and the resume-checkpoint loader take any bytes without
//! panicking. 100,000 inputs each (FUZZ_CASES overrides); a failure is shrunk to a small input.
//!
//! - JSONL: random bytes, and lines assembled from JSON fragments, BOMs, CRLFs, invalid UTF-8 and
//!   special-token strings, read under both line policies; every text the reader accepts is read.
//! - Checkpoint: a valid resume checkpoint (the state of a real run, small tensors) mutated by bit
//!   flips, truncation, overwritten ranges and inserted bytes; every mutated file is refused with
//!   an error or, if the mutation changed nothing, loads.
//! - Token cache: a valid cache (manifest, ids and offsets of three shards) with one of its files
//!   mutated the same way or replaced by random bytes; opening it and reading every document and
//!   every packed and padded row gives ids or an error, never a panic. A case writes and maps
//!   seven files, so this one runs FUZZ_CASES / 20 cases (5,000 by default).

use std::cell::Cell;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use fast::data::corpus::{JsonlCorpus, LinePolicy};
use fast::io::checkpoint::{load_resume, save_resume, ResumeState};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

fn write(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
}

/// A JSONL-ish line: pieces that exercise each branch of the reader.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{\"text\": \"abc\"}".to_vec()),
        Just("{\"text\": \"春眠不覺曉<|im_end|>\"}".as_bytes().to_vec()),
        Just(b"{\"text\": 5}".to_vec()),
        Just(b"{\"txt\": \"a\"}".to_vec()),
        Just(b"[1, 2]".to_vec()),
        Just(b"{\"text\": \"\\ud800\"}".to_vec()),
        Just(b"{\"text\": \"a\\u0000b\\n\"}".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just(b"{".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"   ".to_vec()),
        prop::collection::vec(any::<u8>(), 0..16),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|ps| ps.concat())
}

#[test]
fn the_jsonl_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.jsonl");
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(line(), 0..8).prop_map(|ls| ls.join(&b'\n')),
    ];
    let (accepted, refused) = (Cell::new(0u64), Cell::new(0u64));
    runner()
        .run(&input, |bytes| {
            write(&path, &bytes);
            for policy in [LinePolicy::Fail, LinePolicy::Skip] {
                match JsonlCorpus::open(&path, policy) {
                    Ok(c) => {
                        accepted.set(accepted.get() + 1);
                        for i in 0..c.len() {
                            let _ = c.text(i);
                            let _ = c.line_of(i);
                        }
                    }
                    Err(e) => {
                        refused.set(refused.get() + 1);
                        // Errors name the file.
                        prop_assert!(format!("{e:#}").contains("corpus.jsonl"), "{e:#}");
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    println!(
        "jsonl: {} inputs, {} opens accepted, {} refused",
        cases(),
        accepted.get(),
        refused.get()
    );
}

/// A valid resume checkpoint's bytes: the state of a real (tiny) run, small tensors.
fn checkpoint_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fast"))
            .env("OMP_NUM_THREADS", "1")
            .current_dir(dir.path())
            .args([
                "pretrain",
                "--device",
                "cpu",
                "--max-docs",
                "16",
                "--hidden-size",
                "16",
                "--num-hidden-layers",
                "1",
                "--num-attention-heads",
                "2",
                "--num-key-value-heads",
                "1",
                "--max-seq-len",
                "16",
                "--batch-size",
                "4",
                "--max-steps",
                "2",
                "--sample-tokens",
                "0",
                "--no-progress",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let real = load_resume(
            &dir.path()
                .join("checkpoints/pretrain_16_resume.safetensors"),
        )
        .unwrap()
        .unwrap();
        let state: ResumeState = real.state;
        let tensors = vec![
            (
                "param.model.norm.weight".to_string(),
                tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]),
            ),
            (
                "adam.step.model.norm.weight".to_string(),
                tch::Tensor::from_slice(&[7i64]),
            ),
        ];
        let path = dir.path().join("small.safetensors");
        save_resume(&path, &state, &tensors).unwrap();
        std::fs::read(&path).unwrap()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Overwrite(usize, Vec<u8>),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Overwrite(i, v)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

fn apply(base: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in muts {
        // Positions favour the header (the first 8 + header bytes) half of the time.
        let at = |i: usize, len: usize| {
            if len == 0 {
                0
            } else if i % 2 == 0 {
                (i / 2) % len.min(512)
            } else {
                (i / 2) % len
            }
        };
        match m {
            Mutation::FlipBit(i, bit) if !b.is_empty() => {
                let p = at(*i, b.len());
                b[p] ^= 1 << bit;
            }
            Mutation::Truncate(i) => {
                let p = at(*i, b.len() + 1);
                b.truncate(p);
            }
            Mutation::Overwrite(i, v) if !b.is_empty() => {
                let p = at(*i, b.len());
                for (k, x) in v.iter().enumerate() {
                    if p + k < b.len() {
                        b[p + k] = *x;
                    }
                }
            }
            Mutation::Insert(i, v) => {
                let p = at(*i, b.len() + 1);
                b.splice(p..p, v.iter().copied());
            }
            _ => {}
        }
    }
    b
}

#[test]
fn the_checkpoint_loader_never_panics_and_refuses_every_change() {
    let base = checkpoint_bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resume.safetensors");
    write(&path, base);
    let original = load_resume(&path)
        .unwrap()
        .expect("the base checkpoint loads");
    let original_state = serde_json::to_string(&original.state).unwrap();
    let (refused, unchanged) = (Cell::new(0u64), Cell::new(0u64));
    runner()
        .run(&prop::collection::vec(mutation(), 1..4), |muts| {
            let bytes = apply(base, &muts);
            write(&path, &bytes);
            match load_resume(&path) {
                Ok(Some(loaded)) => {
                    // Only what the original holds may load (a mutation undone by the next, or
                    // a byte the format ignores, such as the header's padding).
                    prop_assert_eq!(
                        serde_json::to_string(&loaded.state).unwrap(),
                        original_state.clone()
                    );
                    prop_assert_eq!(loaded.tensors.len(), original.tensors.len());
                    for (name, t) in &loaded.tensors {
                        prop_assert!(original.tensors[name].equal(t), "tensor {} changed", name);
                    }
                    unchanged.set(unchanged.get() + 1);
                }
                Ok(None) => prop_assert!(false, "the file exists"),
                Err(e) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(format!("{e:#}").contains("resume.safetensors"), "{e:#}");
                }
            }
            Ok(())
        })
        .unwrap();
    println!(
        "checkpoint: {} mutated files, {} refused, {} loaded (mutation undone or in header padding)",
        cases(),
        refused.get(),
        unchanged.get()
    );
}

/// A valid token cache's files, by name: three shards of small documents.
fn cache_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<Vec<u32>> = (0..9u32)
            .map(|k| (0..k % 4 + 1).map(|j| 3 + (k * 7 + j) % 60).collect())
            .collect();
        fast::data::token_cache::write_from_ids(dir.path(), &docs, 64, 3).unwrap();
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != "lock")
            .map(|e| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    })
}

#[test]
fn the_token_cache_reader_never_panics() {
    use fast::data::dataset::{DataMode, TokenDataset};
    let files = cache_files();
    let dir = tempfile::tempdir().unwrap();
    let input = (
        0..files.len(),
        prop_oneof![
            prop::collection::vec(mutation(), 1..4).prop_map(Ok),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Err),
        ],
    );
    let (opened, refused, rows) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
    let n = (cases() / 20).max(1);
    TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    })
    .run(&input, |(target, change)| {
        for (i, (name, bytes)) in files.iter().enumerate() {
            let bytes = match (&change, i == target) {
                (Ok(muts), true) => apply(bytes, muts),
                (Err(random), true) => random.clone(),
                _ => bytes.clone(),
            };
            write(&dir.path().join(name), &bytes);
        }
        match fast::data::token_cache::open_dir(dir.path()) {
            Ok(cache) => {
                opened.set(opened.get() + 1);
                for k in 0..cache.len() as u64 {
                    let _ = cache.doc_ids(k, 64);
                }
                let cache = std::sync::Arc::new(cache);
                for mode in [DataMode::Padded, DataMode::Packed] {
                    let sp = fast::data::rows::SpecialTokens::default();
                    if let Ok(ds) = TokenDataset::new(cache.clone(), mode, 4, sp, 64) {
                        for r in 0..ds.len().min(64) {
                            if ds.item(r, 0).is_ok() {
                                rows.set(rows.get() + 1);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                refused.set(refused.get() + 1);
                let msg = format!("{e:#}");
                prop_assert!(!msg.is_empty());
            }
        }
        Ok(())
    })
    .unwrap();
    println!(
        "token cache: {n} mutated caches, {} refused on open, {} opened ({} rows read)",
        refused.get(),
        opened.get(),
        rows.get()
    );
}

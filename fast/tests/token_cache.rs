//! The token cache end to end: `fast tokenize` builds it once and later runs reuse it; a stale,
//! foreign or damaged cache is refused by a sentence naming the file and the field (or rebuilt
//! where the run may); several files, globs, directories and compressed files are one corpus in
//! sorted path order; an interrupted pass continues to the very same shards; `--max-docs`
//! tokenizes only what it needs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use fast::data::token_cache::{open_or_build, read_manifest, CacheRequest, Manifest};
use fast::data::tokenizer::{SpecialTokenStrings, TextTokenizer};

mod common;
use common::fast;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn poems(n: usize) -> Vec<String> {
    std::fs::read_to_string(root().join("data/poems.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn jsonl(texts: &[String]) -> String {
    texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    fast().current_dir(dir).args(args).output().unwrap()
}

fn ok(out: &Output) -> (String, String) {
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "failed:\n{o}\n{e}");
    (o, e)
}

fn refused(out: &Output, want: &str) -> String {
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "should fail, want {want:?}:\n{e}");
    assert!(!e.contains("panicked"), "panicked:\n{e}");
    assert!(e.contains(want), "want {want:?} in:\n{e}");
    e
}

fn tokenizer_dir() -> String {
    fast::data::defaults::materialize()
        .unwrap()
        .tokenizer_dir
        .display()
        .to_string()
}

fn manifest(dir: &Path) -> Manifest {
    read_manifest(dir).unwrap().expect("a manifest")
}

/// Every shard file's bytes, by name.
fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_pass_reuses_the_cache_and_pretrain_reads_it_without_tokenizing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.jsonl"), jsonl(&poems(200))).unwrap();
    let tok = tokenizer_dir();
    let args = [
        "tokenize",
        "--data-path",
        "c.jsonl",
        "--tokenizer",
        &tok,
        "--out",
        "cache",
        "--no-progress",
    ];
    let (o, _) = ok(&run(d, &args));
    assert!(o.contains("tokenized into cache: 200 documents"), "{o}");
    let m = manifest(&d.join("cache"));
    assert!(m.exhausted && m.docs == 200 && m.format == fast::data::token_cache::FORMAT);
    assert_eq!(
        m.sources[0].size,
        std::fs::metadata(d.join("c.jsonl")).unwrap().len()
    );
    assert_eq!(m.sources[0].xxh3_128.len(), 32);
    let (o, _) = ok(&run(d, &args));
    assert!(o.contains("is up to date: 200 documents"), "{o}");
    let out = run(
        d,
        &[
            "pretrain",
            "--device",
            "cpu",
            "--data-path",
            "c.jsonl",
            "--token-cache",
            "cache",
            "--tokenizer",
            &tok,
            "--hidden-size",
            "16",
            "--num-hidden-layers",
            "1",
            "--num-attention-heads",
            "2",
            "--max-seq-len",
            "32",
            "--max-steps",
            "1",
            "--sample-tokens",
            "0",
            "--no-progress",
        ],
    );
    let (o, _) = ok(&out);
    assert!(o.contains("data: 200 documents from c.jsonl"), "{o}");
    assert!(o.contains("token cache cache)"), "{o}");
    assert!(!o.contains("tokenized into"), "{o}");
    // The run configuration records the cache option.
    let run_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/run_config.json")).unwrap())
            .unwrap();
    assert_eq!(run_cfg["token_cache"], "cache");
    assert_eq!(run_cfg["data_path"], serde_json::json!(["c.jsonl"]));
    // The same file named from another directory (../c.jsonl) is the same source: sources are
    // recorded by their canonical paths.
    std::fs::create_dir(d.join("sub")).unwrap();
    let (o, _) = ok(&run(
        &d.join("sub"),
        &[
            "tokenize",
            "--data-path",
            "../c.jsonl",
            "--tokenizer",
            &tok,
            "--out",
            "../cache",
            "--no-progress",
        ],
    ));
    assert!(o.contains("is up to date: 200 documents"), "{o}");
}

#[test]
fn stale_foreign_and_damaged_caches_are_refused_by_file_and_field_and_rebuilt_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let texts = poems(60);
    std::fs::write(d.join("c.jsonl"), jsonl(&texts)).unwrap();
    let tok = tokenizer_dir();
    let base = [
        "tokenize",
        "--data-path",
        "c.jsonl",
        "--out",
        "cache",
        "--no-progress",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let go = |extra: &[&str]| {
        let a = with(extra);
        run(d, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    ok(&go(&["--tokenizer", &tok]));

    // Another tokenizer.
    let e = refused(
        &go(&["--tokenizer", "minimind2"]),
        "cache/manifest.json: field tokenizer: built with",
    );
    assert!(e.contains("--rebuild-cache"), "{e}");

    // Another line policy.
    refused(
        &go(&["--tokenizer", &tok, "--skip-bad-lines"]),
        "field skip_bad_lines",
    );

    // A source grown by a line.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(d.join("c.jsonl"))
        .unwrap();
    writeln!(f, "{}", serde_json::json!({"text": "新詩"})).unwrap();
    drop(f);
    refused(
        &go(&["--tokenizer", &tok]),
        "/c.jsonl changed since the cache was built: size",
    );
    let (_, e) = ok(&go(&["--tokenizer", &tok, "--rebuild-cache"]));
    assert!(e.contains("rebuilding"), "{e}");
    assert_eq!(manifest(&d.join("cache")).docs, 61);

    // The same size, other bytes, later mtime: caught by the content hash.
    let body = std::fs::read_to_string(d.join("c.jsonl")).unwrap();
    std::fs::write(d.join("c.jsonl"), body.replacen("新詩", "舊詩", 1)).unwrap();
    refused(&go(&["--tokenizer", &tok]), "content xxh3-128");
    ok(&go(&["--tokenizer", &tok, "--rebuild-cache"]));
    // Only touched: the hash agrees and the cache is kept.
    let f = std::fs::File::options()
        .write(true)
        .open(d.join("c.jsonl"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let (o, _) = ok(&go(&["--tokenizer", &tok]));
    assert!(o.contains("is up to date"), "{o}");

    // A truncated shard, a missing one, a manifest that is not one.
    let m = manifest(&d.join("cache"));
    let shard = d.join("cache").join(&m.shards[0].ids_file);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 2]).unwrap();
    let e = refused(&go(&["--tokenizer", &tok]), "shard-00000.u16 is ");
    assert!(e.contains("(truncated or overwritten)"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    refused(&go(&["--tokenizer", &tok]), "shard-00000.u16 is missing");
    std::fs::write(d.join("cache/manifest.json"), "{\"format\": 3}").unwrap();
    refused(
        &go(&["--tokenizer", &tok]),
        "cache/manifest.json is not a token cache manifest",
    );
    ok(&go(&["--tokenizer", &tok, "--rebuild-cache"]));

    // In the default location (no --token-cache) a stale cache is rebuilt, saying why.
    let defaults = ["tokenize", "--data-path", "c.jsonl", "--no-progress"];
    let args: Vec<&str> = defaults
        .iter()
        .copied()
        .chain(["--tokenizer", tok.as_str()])
        .collect();
    ok(&run(d, &args));
    std::fs::write(d.join("c.jsonl"), jsonl(&texts[..10])).unwrap();
    let (o, e) = ok(&run(d, &args));
    assert!(
        e.contains("changed since the cache was built") && e.contains("rebuilding"),
        "{e}"
    );
    assert!(o.contains("10 documents"), "{o}");
    assert!(d.join("c.jsonl.tokens").is_dir());
}

/// The ids of `texts` tokenized one by one with the tokenizer.
fn direct_ids(tok: &TextTokenizer, texts: &[String]) -> Vec<Vec<i64>> {
    texts
        .iter()
        .map(|t| tok.encode(t).unwrap().iter().map(|&i| i as i64).collect())
        .collect()
}

#[test]
fn files_globs_directories_and_compressed_files_are_one_corpus_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let texts = poems(40);
    let corpus = d.join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    // a.jsonl.gz < b.jsonl < c.jsonl.zst: the sorted order, whatever order they are named in.
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(corpus.join("a.jsonl.gz")).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(jsonl(&texts[..10]).as_bytes()).unwrap();
    gz.finish().unwrap();
    std::fs::write(corpus.join("b.jsonl"), jsonl(&texts[10..25])).unwrap();
    std::fs::write(
        corpus.join("c.jsonl.zst"),
        zstd::encode_all(jsonl(&texts[25..]).as_bytes(), 3).unwrap(),
    )
    .unwrap();
    std::fs::write(corpus.join("notes.txt"), "not a corpus file").unwrap();
    let tok =
        TextTokenizer::load(Path::new(&tokenizer_dir()), &SpecialTokenStrings::default()).unwrap();
    let want = direct_ids(&tok, &texts);
    let ways: [Vec<PathBuf>; 3] = [
        vec![corpus.clone()],
        vec![corpus.join("*.jsonl*")],
        vec![
            corpus.join("c.jsonl.zst"),
            corpus.join("b.jsonl"),
            corpus.join("a.jsonl.gz"),
        ],
    ];
    for (i, given) in ways.iter().enumerate() {
        let files = fast::data::sources::resolve(given).unwrap();
        assert_eq!(files.len(), 3, "{given:?}");
        let req = CacheRequest {
            given: given.clone(),
            files,
            dir: Some(d.join(format!("cache{i}"))),
            rebuild: false,
            skip_bad_lines: false,
            max_docs: None,
            threads: 2,
            shard_tokens: 300,
            progress: false,
        };
        let (cache, _) = open_or_build(&req, &tok, &|_| {}).unwrap();
        let got: Vec<Vec<i64>> = (0..cache.len() as u64)
            .map(|k| cache.doc_ids(k, tok.vocab_size()).unwrap())
            .collect();
        assert_eq!(got, want, "corpus given as {given:?}");
    }
    // Errors inside a compressed file still name the file and the line.
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(corpus.join("a.jsonl.gz")).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(format!("{}{{\"text\": 5}}\n", jsonl(&texts[..2])).as_bytes())
        .unwrap();
    gz.finish().unwrap();
    let out = run(
        d,
        &[
            "tokenize",
            "--data-path",
            "corpus",
            "--tokenizer",
            &tokenizer_dir(),
            "--no-progress",
        ],
    );
    refused(&out, "a.jsonl.gz:3: \"text\" is a number, not a string");
}

#[test]
fn an_interrupted_pass_continues_after_its_last_shard_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let texts = poems(usize::MAX);
    let mut body = String::new();
    for round in 0..4 {
        for t in &texts {
            body += &(serde_json::json!({ "text": format!("{round} {t}") }).to_string() + "\n");
        }
    }
    std::fs::write(d.join("c.jsonl"), body).unwrap();
    let tok = tokenizer_dir();
    let args = |out: &str| -> Vec<String> {
        [
            "tokenize",
            "--data-path",
            "c.jsonl",
            "--tokenizer",
            &tok,
            "--out",
            out,
            "--shard-tokens",
            "20000",
            "--num-workers",
            "2",
            "--no-progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    ok(&fast().current_dir(d).args(args("whole")).output().unwrap());

    let mut child = fast().current_dir(d).args(args("cut")).spawn().unwrap();
    let started = std::time::Instant::now();
    loop {
        let shards = read_manifest(&d.join("cut"))
            .ok()
            .flatten()
            .map_or(0, |m| m.shards.len());
        if shards >= 3 || started.elapsed().as_secs() > 120 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let cut = manifest(&d.join("cut"));
    assert!(!cut.exhausted, "the pass finished before it was killed");
    let out = fast().current_dir(d).args(args("cut")).output().unwrap();
    let (_, e) = ok(&out);
    assert!(e.contains("continuing its tokenizing pass"), "{e}");
    assert_eq!(manifest(&d.join("cut")), manifest(&d.join("whole")));
    assert!(
        shard_bytes(&d.join("cut")) == shard_bytes(&d.join("whole")),
        "the shards differ"
    );
}

#[test]
fn max_docs_tokenizes_only_what_it_needs_and_a_larger_limit_continues() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.jsonl"), jsonl(&poems(100))).unwrap();
    let tok = tokenizer_dir();
    let go = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "tokenize",
            "--data-path",
            "c.jsonl",
            "--tokenizer",
            &tok,
            "--out",
            out,
            "--shard-tokens",
            "1000",
            "--no-progress",
        ];
        a.extend_from_slice(extra);
        ok(&run(d, &a))
    };
    go("cache", &["--max-docs", "10"]);
    let m = manifest(&d.join("cache"));
    assert_eq!((m.docs, m.exhausted, m.max_docs), (10, false, Some(10)));
    let (o, _) = go("cache", &["--max-docs", "5"]);
    assert!(o.contains("is up to date"), "{o}");
    go("cache", &["--max-docs", "30"]);
    assert_eq!(manifest(&d.join("cache")).docs, 30);
    go("cache", &[]);
    let m = manifest(&d.join("cache"));
    assert_eq!((m.docs, m.exhausted), (100, true));
    go("whole", &[]);
    // Continued passes write other shard boundaries but the same ids in the same order.
    let concat = |dir: &Path, ext: &str| -> Vec<u8> {
        shard_bytes(dir)
            .into_iter()
            .filter(|(n, _)| n.ends_with(ext))
            .flat_map(|(_, b)| b)
            .collect()
    };
    assert!(concat(&d.join("cache"), ".u16") == concat(&d.join("whole"), ".u16"));
}

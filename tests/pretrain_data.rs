//! `fast pretrain`'s data path against MiniMind's numbers and the reference's encoding:
//! JSONL -> tokenizer -> token cache -> padded / packed rows -> prefetched batches. The rows read
//! from the cache equal the reference's rows of the JSONL's texts tokenized directly (what the
//! data path computed before it had a cache), so batches did not change.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fast::data::batch::HostBatch;
use fast::data::dataset::{counted_labels, padded_row, DataMode, TokenDataset};
use fast::data::loader::Prefetcher;
use fast::data::rows::SpecialTokens;
use fast::data::token_cache::{open_or_build, CacheRequest, TokenCache};
use fast::data::tokenizer::{SpecialTokenStrings, TextTokenizer};
use reference::dataset as refds;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn write_jsonl(dir: &Path, texts: &[String]) -> PathBuf {
    let path = dir.join("corpus.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for t in texts {
        writeln!(f, "{}", serde_json::json!({ "text": t })).unwrap();
    }
    path
}

fn poems(n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("data/poems.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The token cache of `path` (built in a directory beside it) and the tokenizer.
fn open(path: &Path, tokenizer: &Path) -> (Arc<TokenCache>, Arc<TextTokenizer>) {
    let tok = Arc::new(TextTokenizer::load(tokenizer, &SpecialTokenStrings::default()).unwrap());
    let req = CacheRequest {
        given: vec![path.to_path_buf()],
        files: vec![path.to_path_buf()],
        dir: Some(path.with_extension("cache")),
        rebuild: false,
        skip_bad_lines: false,
        max_docs: None,
        threads: 3,
        shard_tokens: 500,
        progress: false,
    };
    let (cache, _) = open_or_build(&req, &tok, &|_| {}).unwrap();
    (Arc::new(cache), tok)
}

fn dataset(
    cache: &Arc<TokenCache>,
    tok: &TextTokenizer,
    mode: DataMode,
    max_len: usize,
) -> TokenDataset {
    let sp = SpecialTokens {
        pad: tok.pad,
        bos: tok.bos,
        eos: tok.eos,
    };
    TokenDataset::new(cache.clone(), mode, max_len, sp, tok.vocab_size()).unwrap()
}

#[test]
fn padded_rows_equal_minimind_pretrain_dataset_golden_cases() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("golden/minimind/dataset_cases.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = cases["cases"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let path = write_jsonl(dir.path(), &texts);
    let (cache, tok) = open(&path, &root().join("golden/minimind"));
    assert_eq!((tok.pad, tok.bos, tok.eos), (0, 1, 2));
    let mut checked = 0;
    for (i, case) in cases.iter().enumerate() {
        let max_len = case["max_length"].as_u64().unwrap() as usize;
        let ds = dataset(&cache, &tok, DataMode::Padded, max_len);
        let row = ds.item(i, 0).unwrap();
        let want = |k: &str| -> Vec<i64> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        };
        assert_eq!(
            row.input_ids,
            want("input_ids"),
            "input_ids of case {i} ({:?})",
            texts[i]
        );
        assert_eq!(
            row.labels,
            want("labels"),
            "labels of case {i} ({:?})",
            texts[i]
        );
        checked += 1;
    }
    assert!(checked >= 8);
}

#[test]
fn rows_from_the_cache_equal_the_reference_encoding_of_the_jsonl_tokenized_directly() {
    let texts = poems(120);
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), &texts);
    let (cache, tok) = open(&path, &root().join("data/tokenizer"));
    assert!(
        cache.manifest.shards.len() > 3,
        "rows cross shard boundaries"
    );
    let sp = refds::SpecialTokens {
        pad: tok.pad,
        bos: tok.bos,
        eos: tok.eos,
    };
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    for max_len in [2, 16, 64] {
        let ds = dataset(&cache, &tok, DataMode::Padded, max_len);
        assert_eq!(ds.len(), texts.len());
        for (i, doc) in ids.iter().enumerate() {
            let want = refds::encode_padded(doc, max_len, sp);
            let got = ds.item(i, 0).unwrap();
            assert_eq!(
                (got.input_ids, got.labels),
                (want.input_ids, want.labels),
                "padded doc {i} max_len {max_len}"
            );
        }
        let ds = dataset(&cache, &tok, DataMode::Packed, max_len);
        assert_eq!(ds.mode(), DataMode::Packed);
        let want = refds::pack(&ids, max_len, sp);
        assert_eq!(ds.len(), want.len(), "packed rows at max_len {max_len}");
        for (r, w) in want.iter().enumerate() {
            let got = ds.item(r, 0).unwrap();
            assert_eq!(
                (&got.input_ids, &got.labels),
                (&w.input_ids, &w.labels),
                "packed row {r} max_len {max_len}"
            );
        }
    }
}

#[test]
fn prefetched_batches_from_the_cache_come_in_order_and_equal_the_jsonl_tokenized_directly() {
    let texts = poems(300);
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), &texts);
    let (cache, tok) = open(&path, &root().join("data/tokenizer"));
    let sp = refds::SpecialTokens {
        pad: tok.pad,
        bos: tok.bos,
        eos: tok.eos,
    };
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    for mode in [DataMode::Padded, DataMode::Packed] {
        let ds = dataset(&cache, &tok, mode, 48);
        // Rows of the JSONL's texts tokenized directly (the reference's layouts).
        let jsonl_rows: Vec<refds::Row> = match mode {
            DataMode::Padded => ids
                .iter()
                .map(|d| refds::encode_padded(d, 48, sp))
                .collect(),
            _ => refds::pack(&ids, 48, sp),
        };
        let ds = Arc::new(ds);
        let order = reference::sampler::epoch_permutation(ds.len(), 7, 1);
        let batches: Vec<Vec<usize>> = order.chunks(13).map(<[usize]>::to_vec).collect();
        let direct: Vec<HostBatch> = batches
            .iter()
            .map(|b| {
                let rows: Vec<_> = b
                    .iter()
                    .map(|&i| {
                        let r = &jsonl_rows[i];
                        fast::data::rows::Row::new(r.input_ids.clone(), r.labels.clone())
                    })
                    .collect();
                HostBatch::from_rows(&rows, 48)
            })
            .collect();
        for (workers, depth) in [(1, 1), (3, 2), (4, 16)] {
            let got: Vec<HostBatch> =
                Prefetcher::new(ds.clone(), batches.clone(), 0, workers, depth)
                    .collect::<anyhow::Result<_>>()
                    .unwrap();
            assert_eq!(got.len(), direct.len());
            for (g, d) in got.iter().zip(&direct) {
                assert_eq!(
                    (&g.input_ids, &g.labels, g.rows, g.counted_labels),
                    (&d.input_ids, &d.labels, d.rows, d.counted_labels)
                );
            }
        }
        // Dropping a loader half-way stops its workers.
        let mut p = Prefetcher::new(ds.clone(), batches.clone(), 0, 2, 4);
        p.next().unwrap().unwrap();
        drop(p);
    }
}

#[test]
fn padded_row_labels_count_what_the_shifted_loss_counts() {
    let r = padded_row(&[5, 6, 7], 8, 1, 2, 0);
    // Targets are labels[1..]: 5, 6, 7, eos.
    assert_eq!(counted_labels(&r), 4);
}

#[test]
fn trained_tokenizer_matches_minimind_layout_and_round_trips() {
    let texts = poems(400);
    let tok =
        fast::commands::train_tokenizer::train_bpe(texts.iter().map(String::as_str), 600).unwrap();
    let dir = tempfile::tempdir().unwrap();
    fast::commands::train_tokenizer::write_tokenizer_dir(&tok, dir.path()).unwrap();
    let loaded = TextTokenizer::load(dir.path(), &SpecialTokenStrings::default()).unwrap();
    assert_eq!((loaded.pad, loaded.bos, loaded.eos), (0, 1, 2));
    assert_eq!(loaded.vocab_size(), 600);
    for t in &texts[..20] {
        let ids = loaded.encode(t).unwrap();
        assert_eq!(&loaded.decode(&ids).unwrap(), t);
    }
    // Special-token strings inside text become their ids.
    assert_eq!(loaded.encode("<|im_end|>").unwrap(), vec![2]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["pre_tokenizer"]["add_prefix_space"], false);
    assert_eq!(json["decoder"]["type"], "ByteLevel");
    // tokenizer_config.json carries MiniMind's special-token fields.
    let ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let minimind: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("golden/minimind/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "added_tokens_decoder",
        "add_bos_token",
        "tokenizer_class",
    ] {
        assert_eq!(ours[key], minimind[key], "{key}");
    }
}

#[test]
fn the_embedded_tokenizer_is_the_one_train_tokenizer_makes_from_the_embedded_poems() {
    let texts = poems(usize::MAX);
    let tok =
        fast::commands::train_tokenizer::train_bpe(texts.iter().map(String::as_str), 6400).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("data/tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours, committed, "data/tokenizer is stale: rerun `fast train-tokenizer --data-path data/poems.jsonl --out data/tokenizer`");
}

#[test]
fn tokenizer_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextTokenizer::load(dir.path(), &SpecialTokenStrings::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not found"), "{err}");
    let given = SpecialTokenStrings {
        bos: Some("<nope>".into()),
        ..Default::default()
    };
    let err = TextTokenizer::load(&root().join("data/tokenizer"), &given)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("\"<nope>\" is not in the vocabulary"), "{err}");
}

/// Masked LM needs a mask token: a tokenizer without one is refused naming the option and the
/// file; `fast train-tokenizer --special-tokens "<mask>"` makes one whose config names it.
#[test]
fn masked_lm_finds_its_mask_token_or_names_the_option_and_the_tokenizer_file() {
    use fast::data::mlm::MlmSpec;
    use fast::train::setup::{Data, DataSpec};
    let texts = poems(200);
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), &texts);
    let mlm = MlmSpec {
        probability: 0.15,
        mask_token: None,
        seed: 7,
    };
    let mut spec = DataSpec::new(
        vec![path.clone()],
        root().join("data/tokenizer"),
        32,
        DataMode::Padded,
    );
    spec.mlm = Some(mlm.clone());
    let err = format!("{:#}", Data::load(&spec, &|_| {}).err().unwrap());
    assert!(
        err.contains("--mask-token was not given") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    spec.mlm = Some(MlmSpec {
        mask_token: Some("<mask>".into()),
        ..mlm.clone()
    });
    let err = format!("{:#}", Data::load(&spec, &|_| {}).err().unwrap());
    assert!(
        err.contains("--mask-token \"<mask>\" is not in the vocabulary of")
            && err.contains("tokenizer.json"),
        "{err}"
    );

    let tok = fast::commands::train_tokenizer::train_bpe_with_specials(
        texts.iter().map(String::as_str),
        500,
        &["<mask>".to_string()],
    )
    .unwrap();
    let tok_dir = dir.path().join("tok");
    fast::commands::train_tokenizer::write_tokenizer_dir_with_specials(
        &tok,
        &tok_dir,
        &["<mask>".to_string()],
    )
    .unwrap();
    let mut spec = DataSpec::new(vec![path], tok_dir, 32, DataMode::Chunked);
    spec.mlm = Some(mlm);
    let data = Data::load(&spec, &|_| {}).unwrap();
    let m = data.dataset.mlm().expect("masked");
    assert_eq!(m.mask_token_id, 3);
    assert_eq!(m.special_ids, vec![0, 1, 2, 3]);
    let items: Vec<usize> = (0..data.dataset.len().min(64)).collect();
    let hb = data.dataset.batch(&items, 0).unwrap();
    let selected = hb.labels.iter().filter(|&&l| l != -100).count();
    assert_eq!(hb.counted_labels, selected);
    let share = selected as f64 / hb.labels.len() as f64;
    // 64 rows of 32 ids: 2048 draws at p = 0.15 (sd 0.008); 0.10..0.20 is over 6 sd either way.
    assert!((0.10..0.20).contains(&share), "{share}");
    assert!(
        hb.input_ids.contains(&3),
        "some positions become the mask id"
    );
}

/// The data a global batch holds does not depend on the number of ranks: for every layout
/// (packed-docs with its seg_start, chunked, padded, and masked LM whose draw is per row), the
/// loaders of W ranks with per-rank batch G/W give, concatenated in rank order, exactly the host
/// batches of one process with batch G (independently: rows straight from the dataset by the
/// reference's permutation cut into batches of G), from any resume skip.
#[test]
fn a_global_batch_holds_the_same_rows_for_any_number_of_ranks() {
    use fast::data::order::{epoch_permutation_u32, EpochOrder};
    let texts = poems(150);
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(dir.path(), &texts);
    let (cache, tok) = open(&path, &root().join("data/tokenizer"));
    let g = 12;
    for (mode, mlm) in [
        (DataMode::PackedDocs, false),
        (DataMode::Chunked, false),
        (DataMode::Padded, false),
        (DataMode::PackedDocs, true),
    ] {
        let mut ds = dataset(&cache, &tok, mode, 40);
        if mlm {
            let m = fast::data::mlm::MlmMasking::new(0.3, 5, tok.vocab_size(), vec![0, 1, 2]);
            ds = ds.with_mlm(m, 99);
        }
        let ds = Arc::new(ds);
        let n = ds.len();
        let perm = reference::sampler::epoch_permutation(n, 7, 2);
        for skip in [0, 3] {
            // Full global batches only: a trailing partial one is split unevenly on purpose
            // (order::rank_positions), so only its union is rank-independent.
            let full = n / g;
            let want: Vec<HostBatch> = (skip..full)
                .map(|b| ds.batch(&perm[b * g..(b + 1) * g], 2).unwrap())
                .collect();
            for world in [1, 2, 3, 4] {
                let shared = Arc::new(epoch_permutation_u32(n, 7, 2));
                let per_rank: Vec<Vec<HostBatch>> = (0..world)
                    .map(|rank| {
                        let order = EpochOrder::new(shared.clone(), g / world, world, rank, skip);
                        let total = order.remaining();
                        Prefetcher::from_iter(ds.clone(), Box::new(order), total, 2, 2, 4)
                            .take(full - skip)
                            .collect::<anyhow::Result<_>>()
                            .unwrap()
                    })
                    .collect();
                for (k, w) in want.iter().enumerate() {
                    let mut ids = Vec::new();
                    let mut labels = Vec::new();
                    let mut seg = Vec::new();
                    let mut counted = 0;
                    for r in &per_rank {
                        ids.extend_from_slice(&r[k].input_ids);
                        labels.extend_from_slice(&r[k].labels);
                        seg.extend_from_slice(r[k].seg_start.as_deref().unwrap_or(&[]));
                        counted += r[k].counted_labels;
                    }
                    let what = format!(
                        "{} mlm {mlm} world {world} skip {skip} batch {k}",
                        mode.name()
                    );
                    assert_eq!(ids, w.input_ids, "{what}");
                    assert_eq!(labels, w.labels, "{what}");
                    assert_eq!(seg, w.seg_start.clone().unwrap_or_default(), "{what}");
                    assert_eq!(counted, w.counted_labels, "{what}");
                }
            }
        }
    }
}

//! `fast tokenize`: the tokenizing pass on its own. Builds (or continues, or checks) the token
//! cache that `pretrain`, `bench` and `eval` read, so a large corpus can be tokenized once ahead
//! of training, on every core, with a progress bar. The pass is the one those commands run when
//! they find no valid cache (`data::pass`, `data::token_cache`); an interrupted pass continues after
//! its last complete shard when started again with the same options.
use std::path::PathBuf;

use anyhow::Result;

use crate::data::pass::DEFAULT_SHARD_TOKENS;
use crate::data::token_cache::{default_dir, open_or_build, CacheRequest};
use crate::data::tokenizer::{SpecialTokenStrings, TextTokenizer};

#[derive(clap::Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// JSONL corpus: files, quoted glob patterns or directories of .jsonl/.jsonl.gz/.jsonl.zst
    /// files, one corpus in sorted path order.
    #[arg(long, alias = "data_path", num_args = 1.., required = true)]
    pub data_path: Vec<PathBuf>,
    /// Tokenizer directory, tokenizer.json, or poems / minimind2 / minimind3.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Cache directory [default: the one pretrain uses, <data-path>.tokens/tok-<key>].
    #[arg(long, alias = "token_cache")]
    pub out: Option<PathBuf>,
    /// Rebuild a cache in --out that does not fit (other sources, tokenizer, line policy,
    /// damaged shards) instead of refusing it.
    #[arg(long, alias = "rebuild_cache")]
    pub rebuild_cache: bool,
    /// Leave out lines that are not {"text": "..."} objects (counted and reported).
    #[arg(long, alias = "skip_bad_lines")]
    pub skip_bad_lines: bool,
    /// Tokenize only the first N documents (a later pass with a larger N continues).
    #[arg(long, alias = "max_docs")]
    pub max_docs: Option<u64>,
    /// Tokenizing threads [default: cores].
    #[arg(long, alias = "num_workers")]
    pub num_workers: Option<usize>,
    /// Ids per shard: the pass's unit of progress that survives an interruption.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,
    /// No progress bar.
    #[arg(long, alias = "no_progress")]
    pub no_progress: bool,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    if args.shard_tokens == 0 {
        anyhow::bail!("--shard-tokens must be at least 1");
    }
    if args.max_docs == Some(0) {
        anyhow::bail!("--max-docs must be at least 1");
    }
    if let Some(n) = args.num_workers {
        crate::train::options::check_num_workers(n)?;
    }
    let tokenizer = crate::train::options::resolve_tokenizer(&args.tokenizer)?;
    let tok = TextTokenizer::load(&tokenizer, &SpecialTokenStrings::default())?;
    let threads = args.num_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let req = CacheRequest {
        given: args.data_path.clone(),
        files: crate::data::sources::resolve(&args.data_path)?,
        dir: args.out.clone(),
        rebuild: args.rebuild_cache,
        skip_bad_lines: args.skip_bad_lines,
        max_docs: args.max_docs,
        threads: threads.max(1),
        shard_tokens: args.shard_tokens,
        progress: !args.no_progress,
    };
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| default_dir(&req, &tok.hash));
    let say = |l: String| eprintln!("{l}");
    eprintln!("encoder: {}", tok.encoder());
    let (cache, stats) = open_or_build(&req, &tok, &say)?;
    let m = &cache.manifest;
    match stats {
        Some(s) => println!(
            "tokenized into {}: {}",
            dir.display(),
            s.describe(threads.max(1))
        ),
        None => println!(
            "token cache {} is up to date: {} documents, {} tokens in {} shard(s)",
            dir.display(),
            m.docs,
            m.tokens,
            m.shards.len()
        ),
    }
    if m.lines_skipped > 0 {
        println!(
            "skipped {} bad line(s): {}",
            m.lines_skipped,
            m.skipped_examples.join("; ")
        );
    }
    Ok(())
}

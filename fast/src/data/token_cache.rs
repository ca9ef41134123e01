//! The token cache: a corpus tokenized once, read memory-mapped by every run.
//!
//! # Layout of a cache directory
//! - `manifest.json` ([`Manifest`]): the format version, the source files (path, size, mtime,
//!   xxh3-128 of their bytes), the tokenizer (path, xxh3-128 of tokenizer.json and
//!   tokenizer_config.json, vocabulary size), the line policy, the id width, the shards, and where
//!   the pass stands (`next`, `exhausted`, the `max_docs` it ran under).
//! - `shard-NNNNN.u16` (or `.u32`): the token ids of consecutive documents, little-endian, 2 bytes
//!   each when the vocabulary fits in 16 bits, else 4.
//! - `shard-NNNNN.idx`: `docs + 1` little-endian u64 offsets into the shard's ids (0 first, the
//!   shard's token count last): document j of the shard is ids `[idx[j], idx[j+1])`.
//! - `lock`: held (flock) while a process validates, builds or maps the cache.
//!
//! The ids are `encode(text, add_special_tokens=false)` of each document (special-token strings
//! inside a text become their ids, as the tokenizer's added tokens decide); bos, eos and padding
//! are added later by the row layouts, so the cache serves every layout, row length and
//! special-token choice. Every file is written to a temporary name, fsynced and renamed, and the
//! manifest is rewritten (the same way) after each shard: a killed pass leaves complete shards
//! and a manifest that names only them.
//!
//! # Validity
//! A cache serves a run when its format, tokenizer hash, line policy and source list equal the
//! run's, every source still has its recorded size and modification time (or, if only the time
//! changed, its recorded content hash), and every shard file has the size the manifest says.
//! Checking reads the manifest and stats files; it reads no ids, so a resume starts at once. The
//! content hash is xxh3-128: it runs at many GB/s, so hashing a source costs no more than reading
//! it, and it is there to catch edits, not forgeries.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::sources::Position;

/// The manifest's `format`: bumped whenever the files change meaning.
pub const FORMAT: &str = "minimind-fast-token-cache/1";
pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRecord {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
    /// xxh3-128 of the file's bytes as stored, 32 hex digits.
    pub xxh3_128: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerRecord {
    /// The tokenizer.json the ids came from.
    pub path: PathBuf,
    /// xxh3-128 of tokenizer.json and tokenizer_config.json (each length-prefixed).
    pub xxh3_128: String,
    pub vocab_size: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    /// File names inside the cache directory.
    pub ids_file: String,
    pub offsets_file: String,
    pub docs: u64,
    pub tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub sources: Vec<SourceRecord>,
    pub tokenizer: TokenizerRecord,
    /// `--skip-bad-lines`: which lines became documents.
    pub skip_bad_lines: bool,
    /// Bytes per id: 2 or 4.
    pub token_width: u8,
    pub shards: Vec<ShardRecord>,
    /// Where the corpus continues after the last shard.
    pub next: Position,
    /// The pass reached the end of the last source: every document is in the shards.
    pub exhausted: bool,
    /// `--max-docs` of the pass that wrote the last shard (it stopped there).
    pub max_docs: Option<u64>,
    pub docs: u64,
    pub tokens: u64,
    /// Lines left out under `--skip-bad-lines` before `next`, with the first few reasons.
    pub lines_skipped: u64,
    pub skipped_examples: Vec<String>,
}

impl Manifest {
    /// An empty cache of this identity (no shard yet).
    pub fn fresh(
        sources: Vec<SourceRecord>,
        tokenizer: TokenizerRecord,
        skip_bad_lines: bool,
    ) -> Manifest {
        let token_width = if tokenizer.vocab_size <= 1 << 16 {
            2
        } else {
            4
        };
        Manifest {
            format: FORMAT.to_string(),
            sources,
            tokenizer,
            skip_bad_lines,
            token_width,
            shards: Vec::new(),
            next: Position::default(),
            exhausted: false,
            max_docs: None,
            docs: 0,
            tokens: 0,
            lines_skipped: 0,
            skipped_examples: Vec::new(),
        }
    }

    /// Whether the shards hold what a run with `max_docs` reads.
    pub fn covers(&self, max_docs: Option<u64>) -> bool {
        self.exhausted || max_docs.is_some_and(|m| m <= self.docs)
    }

    pub fn ids_extension(&self) -> &'static str {
        if self.token_width == 2 {
            "u16"
        } else {
            "u32"
        }
    }
}

/// Reads `dir/manifest.json`: None if there is none; an error sentence if it is not ours.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a token cache manifest of this program ({e})",
            path.display()
        )
    })?;
    if m.format != FORMAT {
        bail!(
            "{}: format {:?}, this program reads {FORMAT:?}",
            path.display(),
            m.format
        );
    }
    if m.token_width != 2 && m.token_width != 4 {
        bail!(
            "{}: token_width {} (must be 2 or 4)",
            path.display(),
            m.token_width
        );
    }
    Ok(Some(m))
}

pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let json = serde_json::to_string_pretty(m)? + "\n";
    crate::io::checkpoint::write_atomic(&dir.join(MANIFEST), json.as_bytes())
}

/// Why `m` does not serve a run that reads `want` (sources, tokenizer, line policy), or None.
/// Stats the sources (hashing one only if its time changed) and the shard files; reads no ids.
pub fn why_invalid(dir: &Path, m: &Manifest, want: &Manifest) -> Result<Option<String>> {
    let at = dir.join(MANIFEST);
    let at = at.display();
    if m.tokenizer.xxh3_128 != want.tokenizer.xxh3_128
        || m.tokenizer.vocab_size != want.tokenizer.vocab_size
    {
        return Ok(Some(format!(
            "{at}: field tokenizer: built with {} (xxh3-128 {}, vocab {}), this run's {} has xxh3-128 {} (vocab {})",
            m.tokenizer.path.display(),
            m.tokenizer.xxh3_128,
            m.tokenizer.vocab_size,
            want.tokenizer.path.display(),
            want.tokenizer.xxh3_128,
            want.tokenizer.vocab_size
        )));
    }
    if m.skip_bad_lines != want.skip_bad_lines {
        return Ok(Some(format!(
            "{at}: field skip_bad_lines: built with {}, this run has {} (--skip-bad-lines decides which lines are documents)",
            m.skip_bad_lines, want.skip_bad_lines
        )));
    }
    let names = |s: &[SourceRecord]| -> Vec<String> {
        s.iter().map(|r| r.path.display().to_string()).collect()
    };
    if names(&m.sources) != names(&want.sources) {
        return Ok(Some(format!(
            "{at}: field sources: built from [{}], this run reads [{}]",
            names(&m.sources).join(", "),
            names(&want.sources).join(", ")
        )));
    }
    for (saved, now) in m.sources.iter().zip(&want.sources) {
        let p = saved.path.display();
        if saved.size != now.size {
            return Ok(Some(format!(
                "source {p} changed since the cache was built: size {} bytes, {at} says {} (field sources)",
                now.size, saved.size
            )));
        }
        if saved.mtime_ns != now.mtime_ns {
            let hash = super::sources::content_hash(&saved.path)?;
            if hash != saved.xxh3_128 {
                return Ok(Some(format!(
                    "source {p} changed since the cache was built: content xxh3-128 {hash}, {at} says {} (field sources)",
                    saved.xxh3_128
                )));
            }
        }
    }
    if let Some(why) = shard_problem(dir, m) {
        return Ok(Some(why));
    }
    Ok(None)
}

/// A shard file missing or of the wrong size, or counts that do not add up.
fn shard_problem(dir: &Path, m: &Manifest) -> Option<String> {
    let (mut docs, mut tokens) = (0u64, 0u64);
    for s in &m.shards {
        for (file, want) in [
            (&s.ids_file, s.tokens.checked_mul(m.token_width as u64)),
            (
                &s.offsets_file,
                s.docs.checked_add(1).and_then(|d| d.checked_mul(8)),
            ),
        ] {
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Some(format!(
                    "{}: shard file name {file:?} is not a plain name",
                    dir.join(MANIFEST).display()
                ));
            }
            let path = dir.join(file);
            let Some(want) = want else {
                return Some(format!(
                    "{}: shard sizes overflow",
                    dir.join(MANIFEST).display()
                ));
            };
            match std::fs::metadata(&path) {
                Err(_) => return Some(format!("shard {} is missing", path.display())),
                Ok(meta) if meta.len() != want => {
                    return Some(format!(
                        "shard {} is {} bytes, the manifest says {want} (truncated or overwritten)",
                        path.display(),
                        meta.len()
                    ))
                }
                Ok(_) => {}
            }
        }
        docs = docs.saturating_add(s.docs);
        tokens = tokens.saturating_add(s.tokens);
    }
    if docs != m.docs || tokens != m.tokens {
        return Some(format!(
            "{}: fields docs/tokens ({}/{}) disagree with the shards' ({docs}/{tokens})",
            dir.join(MANIFEST).display(),
            m.docs,
            m.tokens
        ));
    }
    None
}

/// Holds `dir/lock` exclusively (flock) until dropped: one process builds or maps a cache at a
/// time, and a second one waits for the first's pass instead of repeating it.
pub struct CacheLock {
    _file: File,
}

impl CacheLock {
    pub fn acquire(dir: &Path, say: &dyn Fn(String)) -> Result<CacheLock> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the token cache directory {} (give --token-cache a writable directory)",
                dir.display()
            )
        })?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            say(format!(
                "token cache {}: another process holds it (building?); waiting",
                dir.display()
            ));
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("locking {}", path.display()));
            }
        }
        Ok(CacheLock { _file: file })
    }
}

/// One shard, mapped.
struct MappedShard {
    ids: Option<Mmap>,
    offsets: Option<Mmap>,
    tokens: u64,
    name: String,
}

/// A valid cache, mapped: document `k` (0-based, corpus order) -> its ids.
pub struct TokenCache {
    pub dir: PathBuf,
    pub manifest: Manifest,
    shards: Vec<MappedShard>,
    /// Documents and tokens before shard s (`shards.len() + 1` entries).
    doc_base: Vec<u64>,
    tok_base: Vec<u64>,
    /// Documents this run reads (the first `--max-docs`, or all).
    docs: u64,
    width: usize,
}

fn map(path: &Path, len: u64) -> Result<Option<Mmap>> {
    if len == 0 {
        return Ok(None);
    }
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the mapping is read-only, and cache files are never modified in place: they are
    // written under a temporary name and renamed, and a rebuild replaces them the same way, so
    // the inode a mapping holds keeps its bytes for the mapping's life.
    let m = unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
    if m.len() as u64 != len {
        bail!(
            "shard {} is {} bytes, the manifest says {len} (truncated or overwritten)",
            path.display(),
            m.len()
        );
    }
    // Rows are read in a shuffled order: a fault brings in its own page, not the kernel's
    // read-around window (up to 128 KiB of neighbours no step asks for, which held a 20-step
    // run on a 10 GB corpus at 1 GB resident).
    #[cfg(unix)]
    m.advise(memmap2::Advice::Random)
        .with_context(|| format!("madvise(MADV_RANDOM) on {}", path.display()))?;
    Ok(Some(m))
}

fn read_u64(m: &Option<Mmap>, i: u64) -> Option<u64> {
    let m = m.as_ref()?;
    let at = usize::try_from(i).ok()?.checked_mul(8)?;
    let b = m.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

impl TokenCache {
    /// Maps the shards of a manifest already checked by [`why_invalid`]; `max_docs` keeps the
    /// first documents only. Checks each offsets file's first and last entries.
    pub fn map(dir: &Path, manifest: Manifest, max_docs: Option<u64>) -> Result<TokenCache> {
        let width = manifest.token_width as usize;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let (mut doc_base, mut tok_base) = (vec![0u64], vec![0u64]);
        for s in &manifest.shards {
            let sizes = s
                .tokens
                .checked_mul(width as u64)
                .zip(s.docs.checked_add(1).and_then(|d| d.checked_mul(8)));
            let Some((ids_len, offsets_len)) = sizes else {
                bail!("{}: shard sizes overflow", dir.join(MANIFEST).display());
            };
            let ids = map(&dir.join(&s.ids_file), ids_len)?;
            let offsets = map(&dir.join(&s.offsets_file), offsets_len)?;
            let shard = MappedShard {
                ids,
                offsets,
                tokens: s.tokens,
                name: s.ids_file.clone(),
            };
            if read_u64(&shard.offsets, 0) != Some(0)
                || read_u64(&shard.offsets, s.docs) != Some(s.tokens)
            {
                bail!(
                    "shard {} does not start at 0 and end at its {} tokens (damaged?)",
                    dir.join(&s.offsets_file).display(),
                    s.tokens
                );
            }
            doc_base.push(doc_base.last().unwrap().saturating_add(s.docs));
            tok_base.push(tok_base.last().unwrap().saturating_add(s.tokens));
            shards.push(shard);
        }
        let all = *doc_base.last().unwrap();
        let docs = max_docs.map_or(all, |m| m.min(all));
        Ok(TokenCache {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            doc_base,
            tok_base,
            docs,
            width,
        })
    }

    /// Documents this run reads.
    pub fn len(&self) -> usize {
        self.docs as usize
    }

    pub fn is_empty(&self) -> bool {
        self.docs == 0
    }

    fn damaged(&self, shard: usize, what: String) -> anyhow::Error {
        anyhow::anyhow!(
            "token cache {}: shard {} is damaged: {what} (rebuild with --rebuild-cache)",
            self.dir.display(),
            self.shards
                .get(shard)
                .map(|s| s.name.as_str())
                .unwrap_or("?")
        )
    }

    /// Shard and index within it of document `k < all documents`.
    fn locate(&self, k: u64) -> Result<(usize, u64)> {
        let s = self.doc_base.partition_point(|&b| b <= k).saturating_sub(1);
        if s >= self.shards.len() {
            bail!(
                "document {k} out of range ({} documents)",
                self.doc_base.last().unwrap()
            );
        }
        Ok((s, k - self.doc_base[s]))
    }

    /// Global token offset where document `k` starts; `k == len()` gives the end of the last.
    pub fn token_start(&self, k: u64) -> Result<u64> {
        if k > self.docs {
            bail!("document {k} out of range ({} documents)", self.docs);
        }
        if k == *self.doc_base.last().unwrap() {
            return Ok(*self.tok_base.last().unwrap());
        }
        let (s, j) = self.locate(k)?;
        let off = read_u64(&self.shards[s].offsets, j)
            .ok_or_else(|| self.damaged(s, format!("no offset for document {j}")))?;
        if off > self.shards[s].tokens {
            return Err(self.damaged(
                s,
                format!(
                    "offset {off} of document {j} is past its {} tokens",
                    self.shards[s].tokens
                ),
            ));
        }
        Ok(self.tok_base[s] + off)
    }

    /// Number of ids of document `k`.
    pub fn doc_len(&self, k: u64) -> Result<u64> {
        let (s, j) = self.locate(k)?;
        let (a, b) = self.local_range(s, j)?;
        Ok(b - a)
    }

    fn local_range(&self, s: usize, j: u64) -> Result<(u64, u64)> {
        let sh = &self.shards[s];
        let a = read_u64(&sh.offsets, j);
        let b = read_u64(&sh.offsets, j + 1);
        match (a, b) {
            (Some(a), Some(b)) if a <= b && b <= sh.tokens => Ok((a, b)),
            _ => {
                let shown = |v: Option<u64>| v.map_or("missing".to_string(), |v| v.to_string());
                Err(self.damaged(
                    s,
                    format!(
                        "offsets of document {j} are {}..{} of {} tokens",
                        shown(a),
                        shown(b),
                        sh.tokens
                    ),
                ))
            }
        }
    }

    /// Appends ids `from..to` (within the document) of document `k` to `out`; every id must be
    /// below `vocab`.
    pub fn extend_ids(
        &self,
        k: u64,
        from: u64,
        to: u64,
        vocab: usize,
        out: &mut Vec<i64>,
    ) -> Result<()> {
        let (s, j) = self.locate(k)?;
        let (a, b) = self.local_range(s, j)?;
        if from > to || a + to > b {
            bail!(
                "ids {from}..{to} of document {k} out of range ({} ids)",
                b - a
            );
        }
        let Some(m) = self.shards[s].ids.as_ref() else {
            return Ok(()); // a shard of empty documents
        };
        let w = self.width;
        let bytes = m
            .get(((a + from) as usize * w)..((a + to) as usize * w))
            .ok_or_else(|| self.damaged(s, "ids past the end of the file".into()))?;
        out.reserve(bytes.len() / w);
        for c in bytes.chunks_exact(w) {
            let id = if w == 2 {
                u16::from_le_bytes([c[0], c[1]]) as u64
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64
            };
            if id as usize >= vocab {
                return Err(self.damaged(
                    s,
                    format!("id {id} in document {j} is outside the tokenizer's {vocab} ids"),
                ));
            }
            out.push(id as i64);
        }
        Ok(())
    }

    /// All ids of document `k` (tests and tools; rows read ranges).
    pub fn doc_ids(&self, k: u64, vocab: usize) -> Result<Vec<i64>> {
        let n = self.doc_len(k)?;
        let mut out = Vec::with_capacity(n as usize);
        self.extend_ids(k, 0, n, vocab, &mut out)?;
        Ok(out)
    }

    /// Ids of the documents this run reads.
    pub fn total_tokens(&self) -> Result<u64> {
        self.token_start(self.docs)
    }
}

/// Opens the cache in `dir` by its manifest alone (no source or tokenizer to compare with):
/// what tools and the fuzz test use. Every inconsistency is an error, never a panic.
pub fn open_dir(dir: &Path) -> Result<TokenCache> {
    let m = read_manifest(dir)?.with_context(|| format!("{} has no {MANIFEST}", dir.display()))?;
    if let Some(why) = shard_problem(dir, &m) {
        bail!("token cache {}: {why}", dir.display());
    }
    TokenCache::map(dir, m, None)
}

/// Writes documents' ids into shards of `dir`, one shard file pair at a time.
pub struct ShardWriter {
    dir: PathBuf,
    index: usize,
    width: u8,
    ids: std::io::BufWriter<File>,
    offsets: Vec<u64>,
    tokens: u64,
    ids_tmp: PathBuf,
}

impl ShardWriter {
    pub fn new(dir: &Path, index: usize, width: u8) -> Result<ShardWriter> {
        let ext = if width == 2 { "u16" } else { "u32" };
        let ids_tmp = dir.join(format!("shard-{index:05}.{ext}.partial"));
        let f =
            File::create(&ids_tmp).with_context(|| format!("creating {}", ids_tmp.display()))?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            index,
            width,
            ids: std::io::BufWriter::with_capacity(1 << 20, f),
            offsets: vec![0],
            tokens: 0,
            ids_tmp,
        })
    }

    pub fn docs(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(ids.len() * self.width as usize);
        for &id in ids {
            if self.width == 2 {
                let id = u16::try_from(id)
                    .map_err(|_| anyhow::anyhow!("id {id} does not fit the 16-bit shard"))?;
                buf.extend_from_slice(&id.to_le_bytes());
            } else {
                buf.extend_from_slice(&id.to_le_bytes());
            }
        }
        self.ids
            .write_all(&buf)
            .with_context(|| format!("writing {}", self.ids_tmp.display()))?;
        self.tokens += ids.len() as u64;
        self.offsets.push(self.tokens);
        Ok(())
    }

    /// Removes the partial file of a shard that will not be written.
    pub fn discard(self) {
        let path = self.ids_tmp.clone();
        drop(self);
        let _ = std::fs::remove_file(path);
    }

    /// Flushes, fsyncs and renames both files into place; returns the shard's record.
    pub fn finish(self) -> Result<ShardRecord> {
        let ext = if self.width == 2 { "u16" } else { "u32" };
        let ids_file = format!("shard-{:05}.{ext}", self.index);
        let offsets_file = format!("shard-{:05}.idx", self.index);
        let f = self
            .ids
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing {}: {}", self.ids_tmp.display(), e.error()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", self.ids_tmp.display()))?;
        drop(f);
        std::fs::rename(&self.ids_tmp, self.dir.join(&ids_file))
            .with_context(|| format!("renaming {}", self.ids_tmp.display()))?;
        let bytes: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        crate::io::checkpoint::write_atomic(&self.dir.join(&offsets_file), &bytes)?;
        Ok(ShardRecord {
            ids_file,
            offsets_file,
            docs: self.offsets.len() as u64 - 1,
            tokens: self.tokens,
        })
    }
}

/// The file a temporary file of [`crate::io::checkpoint::write_atomic`] (`.<name>.tmp<pid>`)
/// stands for, if `name` is one.
fn temp_of(name: &str) -> Option<&str> {
    let (base, pid) = name.strip_prefix('.')?.rsplit_once(".tmp")?;
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

/// A shard file (ids, offsets, or a shard being written) or the manifest.
fn is_cache_file(name: &str) -> bool {
    name.starts_with("shard-") || name.starts_with("manifest.")
}

/// Removes the files of `dir` whose names `remove` picks (none if `dir` does not exist).
fn remove_files(dir: &Path, remove: impl Fn(&str) -> bool) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if remove(&e.file_name().to_string_lossy()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Removes what a killed pass can leave beside its complete shards: temporary files of the
/// shards' offsets and of the manifest, and shard files past the manifest's (partial, or
/// complete but not yet recorded). Called under the cache's lock before a pass continues, so no
/// live writer owns them; the pass rewrites every shard from the manifest's position on.
pub fn remove_leftovers(dir: &Path) -> Result<()> {
    let recorded: std::collections::HashSet<String> = match read_manifest(dir) {
        Ok(Some(m)) => m
            .shards
            .iter()
            .flat_map(|s| [s.ids_file.clone(), s.offsets_file.clone()])
            .collect(),
        _ => Default::default(),
    };
    remove_files(dir, |name| {
        temp_of(name).is_some_and(is_cache_file)
            || (name.starts_with("shard-") && !recorded.contains(name))
    })
}

/// Removes a cache's shards and manifest (a rebuild), and their temporary files, leaving the
/// directory and its lock.
pub fn clear(dir: &Path) -> Result<()> {
    remove_files(dir, |name| is_cache_file(temp_of(name).unwrap_or(name)))
}

/// A cache written straight from id lists (no corpus): what tests and tools use to lay out rows
/// from known ids. `shard_docs` documents per shard.
pub fn write_from_ids(
    dir: &Path,
    docs: &[Vec<u32>],
    vocab_size: usize,
    shard_docs: usize,
) -> Result<TokenCache> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clear(dir)?;
    let tokenizer = TokenizerRecord {
        path: PathBuf::from("(ids)"),
        xxh3_128: String::new(),
        vocab_size,
    };
    let mut m = Manifest::fresh(Vec::new(), tokenizer, false);
    for (i, chunk) in docs.chunks(shard_docs.max(1)).enumerate() {
        let mut w = ShardWriter::new(dir, i, m.token_width)?;
        for d in chunk {
            w.push(d)?;
        }
        let rec = w.finish()?;
        m.docs += rec.docs;
        m.tokens += rec.tokens;
        m.shards.push(rec);
    }
    m.exhausted = true;
    write_manifest(dir, &m)?;
    TokenCache::map(dir, m, None)
}

/// Where a run's tokens come from and how the cache may be built.
pub struct CacheRequest {
    /// `--data-path` as given, and the files it resolved to (sorted).
    pub given: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
    /// `--token-cache`: None for the default beside the data.
    pub dir: Option<PathBuf>,
    /// `--rebuild-cache`: rebuild an invalid `--token-cache` instead of refusing it.
    pub rebuild: bool,
    pub skip_bad_lines: bool,
    pub max_docs: Option<u64>,
    pub threads: usize,
    pub shard_tokens: u64,
    pub progress: bool,
}

/// The default cache directory: `<data path>.tokens/tok-<key>` for one `--data-path` value
/// (file or directory), else `<first file>.<8 hex of the file list>.tokens/tok-<key>`; the key
/// (16 hex) hashes the format, the tokenizer and the line policy, so caches of different
/// tokenizers of one corpus live side by side.
pub fn default_dir(req: &CacheRequest, tokenizer_hash: &str) -> PathBuf {
    use xxhash_rust::xxh3::xxh3_64;
    let key = xxh3_64(format!("{FORMAT}\n{tokenizer_hash}\n{}", req.skip_bad_lines).as_bytes());
    let base = match req.given.as_slice() {
        [one] if one.exists() => {
            let s = one.to_string_lossy();
            PathBuf::from(format!("{}.tokens", s.trim_end_matches('/')))
        }
        _ => {
            let list: Vec<String> = req.files.iter().map(|f| f.display().to_string()).collect();
            let first = req.files.first().cloned().unwrap_or_default();
            let h = xxh3_64(list.join("\n").as_bytes()) as u32;
            PathBuf::from(format!("{}.{h:08x}.tokens", first.display()))
        }
    };
    base.join(format!("tok-{key:016x}"))
}

/// What the run reads now, as a manifest without shards (sources stated, not hashed). Sources
/// are named by their canonical paths, so a cache built from `big.jsonl` serves a run in another
/// directory that names the same file `../big.jsonl`.
fn wanted(req: &CacheRequest, tok: &super::tokenizer::TextTokenizer) -> Result<Manifest> {
    let mut sources = Vec::with_capacity(req.files.len());
    for f in &req.files {
        let (size, mtime_ns) = super::sources::stat(f)?;
        sources.push(SourceRecord {
            path: std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()),
            size,
            mtime_ns,
            xxh3_128: String::new(),
        });
    }
    let tokenizer = TokenizerRecord {
        path: tok.path.clone(),
        xxh3_128: tok.hash.clone(),
        vocab_size: tok.vocab_size(),
    };
    Ok(Manifest::fresh(sources, tokenizer, req.skip_bad_lines))
}

/// The run's token cache: reused when valid, continued when a pass stopped before what the run
/// reads, built when missing; an invalid one is rebuilt in the default location or with
/// `--rebuild-cache`, and refused otherwise. Returns the cache and the pass's stats, if one ran.
pub fn open_or_build(
    req: &CacheRequest,
    tok: &super::tokenizer::TextTokenizer,
    say: &dyn Fn(String),
) -> Result<(TokenCache, Option<super::pass::PassStats>)> {
    let dir = req
        .dir
        .clone()
        .unwrap_or_else(|| default_dir(req, &tok.hash));
    let _lock = CacheLock::acquire(&dir, say)?;
    let want = wanted(req, tok)?;
    let found = match read_manifest(&dir) {
        Ok(Some(m)) => match why_invalid(&dir, &m, &want)? {
            None => Ok(Some(m)),
            Some(why) => Err(why),
        },
        Ok(None) => Ok(None),
        Err(e) => Err(format!("{e:#}")),
    };
    let mut manifest = match found {
        Ok(Some(m)) if m.covers(req.max_docs) => {
            let cache = TokenCache::map(&dir, m, req.max_docs)?;
            check_not_empty(&cache, req)?;
            return Ok((cache, None));
        }
        Ok(Some(m)) => {
            say(format!(
                "token cache {}: {} documents so far; continuing its tokenizing pass",
                dir.display(),
                m.docs
            ));
            m
        }
        Ok(None) => fresh(&dir, want, say)?,
        Err(why) => {
            if req.dir.is_some() && !req.rebuild {
                bail!(
                    "token cache {} does not fit this run: {why}. Rebuild it with --rebuild-cache, or give another --token-cache",
                    dir.display()
                );
            }
            say(format!("token cache {}: {why}; rebuilding", dir.display()));
            clear(&dir)?;
            fresh(&dir, want, say)?
        }
    };
    remove_leftovers(&dir)?;
    let opts = super::pass::PassOptions {
        threads: req.threads,
        max_docs: req.max_docs,
        shard_tokens: req.shard_tokens,
        progress: req.progress,
    };
    let stats = super::pass::run(&dir, &req.files, &mut manifest, tok, &opts)?;
    let cache = TokenCache::map(&dir, manifest, req.max_docs)?;
    check_not_empty(&cache, req)?;
    Ok((cache, Some(stats)))
}

/// A new manifest for `dir`: the sources hashed, written before the first shard so that an
/// interrupted first pass can be continued.
fn fresh(dir: &Path, mut want: Manifest, say: &dyn Fn(String)) -> Result<Manifest> {
    let t0 = std::time::Instant::now();
    for s in &mut want.sources {
        s.xxh3_128 = super::sources::content_hash(&s.path)?;
    }
    let bytes: u64 = want.sources.iter().map(|s| s.size).sum();
    if bytes > 1 << 30 {
        say(format!(
            "token cache {}: hashed {:.1} GB of sources in {:.1}s",
            dir.display(),
            bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        ));
    }
    write_manifest(dir, &want)?;
    Ok(want)
}

fn check_not_empty(cache: &TokenCache, req: &CacheRequest) -> Result<()> {
    if !cache.is_empty() {
        return Ok(());
    }
    let m = &cache.manifest;
    if m.sources.iter().all(|s| s.size == 0) {
        bail!(
            "{} is empty; expected one {{\"text\": ...}} object per line",
            req.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    bail!(
        "{} has no usable documents ({} line(s) skipped as invalid)",
        req.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        m.lines_skipped
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_across_shards_and_widths() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![vec![5, 6, 7], vec![], vec![8], vec![9, 10], vec![11]];
        let c = write_from_ids(dir.path(), &docs, 6400, 2).unwrap();
        assert_eq!(c.len(), 5);
        for (k, d) in docs.iter().enumerate() {
            let want: Vec<i64> = d.iter().map(|&i| i as i64).collect();
            assert_eq!(c.doc_ids(k as u64, 6400).unwrap(), want);
        }
        assert_eq!(c.token_start(3).unwrap(), 4);
        assert_eq!(c.total_tokens().unwrap(), 7);
        let big = write_from_ids(dir.path(), &[vec![70_000, 1]], 100_000, 8).unwrap();
        assert_eq!(big.manifest.token_width, 4);
        assert_eq!(big.doc_ids(0, 100_000).unwrap(), vec![70_000, 1]);
        // An id past the vocabulary is refused, not passed on to an embedding lookup.
        let err = big.doc_ids(0, 50_000).unwrap_err().to_string();
        assert!(err.contains("outside the tokenizer's 50000 ids"), "{err}");
    }

    #[test]
    fn a_truncated_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = write_from_ids(dir.path(), &[vec![1, 2, 3], vec![4]], 10, 1).unwrap();
        let m = c.manifest.clone();
        drop(c);
        let f = dir.path().join(&m.shards[1].ids_file);
        std::fs::write(&f, [0u8]).unwrap();
        let why = why_invalid(dir.path(), &m, &m).unwrap().unwrap();
        assert!(
            why.contains("shard-00001.u16 is 1 bytes, the manifest says 2"),
            "{why}"
        );
    }

    #[test]
    fn a_killed_passs_temporary_and_unrecorded_files_are_removed_and_the_shards_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c = write_from_ids(dir.path(), &[vec![1, 2, 3], vec![4]], 10, 1).unwrap();
        let m = c.manifest.clone();
        drop(c);
        let stray = [
            ".shard-00001.idx.tmp4463",
            ".manifest.json.tmp77",
            "shard-00002.u16.partial",
            "shard-00002.u16",
            "shard-00002.idx",
        ];
        for f in stray {
            std::fs::write(dir.path().join(f), [1u8]).unwrap();
        }
        for keep in ["notes.tmp.txt", ".notes.tmp12"] {
            std::fs::write(dir.path().join(keep), [1u8]).unwrap();
        }
        remove_leftovers(dir.path()).unwrap();
        for f in stray {
            assert!(!dir.path().join(f).exists(), "{f} is left");
        }
        assert!(dir.path().join("notes.tmp.txt").exists());
        assert!(dir.path().join(".notes.tmp12").exists());
        assert!(dir.path().join(MANIFEST).exists());
        for s in &m.shards {
            assert!(dir.path().join(&s.ids_file).exists());
            assert!(dir.path().join(&s.offsets_file).exists());
        }
        assert_eq!(why_invalid(dir.path(), &m, &m).unwrap(), None);
    }
}

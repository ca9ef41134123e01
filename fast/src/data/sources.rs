//! The files of a corpus and their lines, as one stream.
//!
//! `--data-path` takes files, glob patterns (`data/*.jsonl`, quoted so the program expands them)
//! and directories (their `.jsonl`, `.jsonl.gz` and `.jsonl.zst` files, not recursing), in any
//! mix. The corpus is every file found, in sorted path order (byte order of the path, duplicates
//! once), whatever order the values were given in: the same files always give the same corpus.
//! `.gz` and `.zst` files are decompressed as they are read.
//!
//! [`Lines`] reads the files one after the other, a line at a time, with the rules of
//! `corpus::JsonlCorpus`: a UTF-8 byte-order mark at a file's start and CRLF line ends are
//! accepted, blank lines are not documents. It can start at a position a previous pass recorded,
//! so an interrupted tokenizing pass continues where its last complete shard ended.
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// File names a directory given as `--data-path` contributes.
pub const EXTENSIONS: [&str; 3] = [".jsonl", ".jsonl.gz", ".jsonl.zst"];

/// `--data-path` values -> the corpus's files, sorted.
pub fn resolve(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if given.is_empty() {
        bail!("no --data-path given");
    }
    let mut files = Vec::new();
    for p in given {
        if p.is_dir() {
            let entries = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?;
            let mut found = 0;
            for e in entries {
                let e = e.with_context(|| format!("reading directory {}", p.display()))?;
                let name = e.file_name().to_string_lossy().to_string();
                let path = e.path();
                if EXTENSIONS.iter().any(|x| name.ends_with(x)) && path.is_file() {
                    files.push(path);
                    found += 1;
                }
            }
            if found == 0 {
                bail!(
                    "{} is a directory with no .jsonl, .jsonl.gz or .jsonl.zst files; the data path must be JSONL files ({{\"text\": ...}} per line), a glob, or a directory of them",
                    p.display()
                );
            }
        } else if p.exists() {
            files.push(p.clone());
        } else if is_pattern(p) {
            let pattern = p.to_string_lossy();
            let matches = glob::glob(&pattern)
                .with_context(|| format!("--data-path {pattern}: not a valid glob pattern"))?;
            let mut found = 0;
            for m in matches {
                let path = m.with_context(|| format!("--data-path {pattern}"))?;
                if path.is_file() {
                    files.push(path);
                    found += 1;
                }
            }
            if found == 0 {
                bail!("--data-path {pattern}: the pattern matches no file");
            }
        } else {
            std::fs::metadata(p)
                .with_context(|| format!("cannot read data file {}", p.display()))?;
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn is_pattern(p: &Path) -> bool {
    p.to_string_lossy().contains(['*', '?', '['])
}

/// How a file's bytes are stored, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Plain,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn of(path: &Path) -> Compression {
        let name = path.to_string_lossy();
        if name.ends_with(".gz") {
            Compression::Gzip
        } else if name.ends_with(".zst") {
            Compression::Zstd
        } else {
            Compression::Plain
        }
    }
}

/// A place in the corpus: before line `line + 1` of file `source`, `offset` bytes into its
/// (decompressed) text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub source: usize,
    pub line: u64,
    pub offset: u64,
}

/// One line of a file, with where the stream stands after it.
pub struct Line {
    pub source: usize,
    /// 1-based line number in its file.
    pub line: u64,
    /// The line without its end (and without a leading byte-order mark on line 1).
    pub bytes: Vec<u8>,
    /// Blank (only ASCII whitespace): not a document.
    pub blank: bool,
    pub after: Position,
}

/// Counts the bytes read from the files as stored (compressed or not), for progress.
struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The lines of every file from a position on.
pub struct Lines {
    files: Vec<PathBuf>,
    at: Position,
    reader: Option<Box<dyn BufRead + Send>>,
    /// Bytes read from the files as stored.
    pub bytes_read: Arc<AtomicU64>,
}

impl Lines {
    pub fn new(files: Vec<PathBuf>, from: Position) -> Lines {
        Lines {
            files,
            at: from,
            reader: None,
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }

    fn open(&self) -> Result<Box<dyn BufRead + Send>> {
        let path = &self.files[self.at.source];
        let mut file = File::open(path)
            .with_context(|| format!("cannot open data file {}", path.display()))?;
        let count = self.bytes_read.clone();
        let compression = Compression::of(path);
        if compression == Compression::Plain && self.at.offset > 0 {
            file.seek(SeekFrom::Start(self.at.offset))
                .with_context(|| format!("seeking in {}", path.display()))?;
        }
        let raw = Counted { inner: file, count };
        let mut reader: Box<dyn BufRead + Send> = match compression {
            Compression::Plain => Box::new(BufReader::with_capacity(1 << 20, raw)),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                1 << 20,
                flate2::read::MultiGzDecoder::new(BufReader::new(raw)),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                1 << 20,
                zstd::stream::read::Decoder::new(raw)
                    .with_context(|| format!("{}: not a zstd stream", path.display()))?,
            )),
        };
        if compression != Compression::Plain && self.at.offset > 0 {
            // A compressed stream cannot seek: decompress up to the position.
            let skipped = std::io::copy(
                &mut (&mut reader).take(self.at.offset),
                &mut std::io::sink(),
            )
            .with_context(|| format!("reading {}", path.display()))?;
            if skipped != self.at.offset {
                bail!(
                    "{}: shorter than when the pass began (was the file changed?)",
                    path.display()
                );
            }
        }
        Ok(reader)
    }

    /// The next line of the corpus, or None at its end.
    pub fn next_line(&mut self) -> Result<Option<Line>> {
        loop {
            if self.at.source >= self.files.len() {
                return Ok(None);
            }
            if self.reader.is_none() {
                self.reader = Some(self.open()?);
            }
            let reader = self.reader.as_mut().expect("opened above");
            let mut buf = Vec::new();
            let path = &self.files[self.at.source];
            let n = reader.read_until(b'\n', &mut buf).with_context(|| {
                format!("reading {} at line {}", path.display(), self.at.line + 1)
            })?;
            if n == 0 {
                self.reader = None;
                self.at = Position {
                    source: self.at.source + 1,
                    line: 0,
                    offset: 0,
                };
                continue;
            }
            let line = self.at.line + 1;
            let first = self.at.offset == 0;
            self.at.line = line;
            self.at.offset += n as u64;
            let mut end = buf.len();
            if end > 0 && buf[end - 1] == b'\n' {
                end -= 1;
            }
            if end > 0 && buf[end - 1] == b'\r' {
                end -= 1;
            }
            buf.truncate(end);
            if first && buf.starts_with(BOM) {
                buf.drain(..BOM.len());
            }
            let blank = buf.iter().all(u8::is_ascii_whitespace);
            return Ok(Some(Line {
                source: self.at.source,
                line,
                bytes: buf,
                blank,
                after: self.at,
            }));
        }
    }
}

/// Size and modification time of a file, as a cache records them.
pub fn stat(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Ok((meta.len(), mtime))
}

/// xxh3-128 of a file's bytes (as stored), streamed, as 32 hex digits.
pub fn content_hash(path: &Path) -> Result<String> {
    let mut f =
        File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:032x}", h.digest128()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn all_lines(files: Vec<PathBuf>, from: Position) -> Vec<(usize, u64, String)> {
        let mut l = Lines::new(files, from);
        let mut out = Vec::new();
        while let Some(x) = l.next_line().unwrap() {
            if !x.blank {
                out.push((x.source, x.line, String::from_utf8(x.bytes).unwrap()));
            }
        }
        out
    }

    #[test]
    fn files_globs_and_directories_resolve_to_one_sorted_list() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["b.jsonl", "a.jsonl", "c.jsonl.gz", "notes.txt"] {
            std::fs::write(d.join(name), "{\"text\": \"x\"}\n").unwrap();
        }
        let got = resolve(&[d.to_path_buf()]).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["a.jsonl", "b.jsonl", "c.jsonl.gz"]);
        let pattern = d.join("*.jsonl");
        let got = resolve(&[d.join("b.jsonl"), pattern, d.join("a.jsonl")]).unwrap();
        assert_eq!(got, vec![d.join("a.jsonl"), d.join("b.jsonl")]);
        let err = format!("{:#}", resolve(&[d.join("*.none")]).unwrap_err());
        assert!(err.contains("matches no file"), "{err}");
        let err = format!("{:#}", resolve(&[d.join("missing.jsonl")]).unwrap_err());
        assert!(err.contains("cannot read data file"), "{err}");
    }

    #[test]
    fn compressed_files_read_as_their_text_and_positions_resume() {
        let dir = tempfile::tempdir().unwrap();
        let text = "\u{feff}{\"text\": \"a\"}\r\n\n{\"text\": \"b\"}\n{\"text\": \"c\"}";
        let plain = dir.path().join("p.jsonl");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.path().join("g.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(
            File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap();
        let zst = dir.path().join("z.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        for f in [&plain, &gz, &zst] {
            let got = all_lines(vec![f.clone()], Position::default());
            let texts: Vec<_> = got.iter().map(|x| x.2.as_str()).collect();
            assert_eq!(
                texts,
                [
                    "{\"text\": \"a\"}",
                    "{\"text\": \"b\"}",
                    "{\"text\": \"c\"}"
                ]
            );
            assert_eq!(got[1].1, 3, "line numbers count blank lines");
            // Resuming after line 3 gives the rest.
            let mut l = Lines::new(vec![f.clone()], Position::default());
            let mut at = Position::default();
            for _ in 0..3 {
                at = l.next_line().unwrap().unwrap().after;
            }
            let rest = all_lines(vec![f.clone()], at);
            assert_eq!(rest, vec![(0, 4, "{\"text\": \"c\"}".to_string())]);
        }
    }
}

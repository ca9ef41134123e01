//! A JSONL corpus of `{"text": "..."}` objects, read lazily.
//!
//! Opening a file reads it once, front to back, validating every line and keeping only where each
//! document's line starts and how long it is (16 bytes per document); texts are read back on demand
//! with positioned reads (`read_at`), so any number of threads can share one corpus and a file of
//! any size never sits in memory. A UTF-8 byte-order mark at the start and CRLF line ends are
//! accepted; blank lines are skipped. Every error names the file and the 1-based line.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What to do with a line that is not a `{"text": "..."}` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinePolicy {
    /// Stop with an error naming the file and line.
    Fail,
    /// Leave the line out, count it, and report the count and the first few reasons.
    Skip,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    len: u32,
    line: u32,
}

pub struct JsonlCorpus {
    path: PathBuf,
    file: File,
    spans: Vec<Span>,
    /// Lines left out under `LinePolicy::Skip`, with the first few reasons.
    pub skipped: usize,
    pub skipped_examples: Vec<String>,
    pub file_bytes: u64,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl JsonlCorpus {
    pub fn open(path: &Path, policy: LinePolicy) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read data file {}", path.display()))?;
        if meta.is_dir() {
            bail!(
                "{} is a directory; the data path must be a JSONL file with one {{\"text\": ...}} object per line",
                path.display()
            );
        }
        let file = File::open(path)
            .with_context(|| format!("cannot open data file {}", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut spans = Vec::new();
        let mut skipped = 0usize;
        let mut skipped_examples = Vec::new();
        let mut buf = Vec::new();
        let mut offset = 0u64;
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("reading {} at line {}", path.display(), line_no + 1))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let mut start = 0usize;
            if line_no == 1 && buf.starts_with(BOM) {
                start = BOM.len();
            }
            let end = trim_line_end(&buf);
            let content = &buf[start.min(end)..end];
            if !content.iter().all(u8::is_ascii_whitespace) {
                match parse_text(content) {
                    Ok(_) => {
                        let len = u32::try_from(content.len()).map_err(|_| {
                            anyhow::anyhow!("{}:{line_no}: line longer than 4 GiB", path.display())
                        })?;
                        let line = u32::try_from(line_no).map_err(|_| {
                            anyhow::anyhow!("{}: more than 4 billion lines", path.display())
                        })?;
                        spans.push(Span {
                            offset: offset + start as u64,
                            len,
                            line,
                        });
                    }
                    Err(reason) => match policy {
                        LinePolicy::Fail => bail!(
                            "{}:{line_no}: {reason} (use --skip-bad-lines to leave such lines out)",
                            path.display()
                        ),
                        LinePolicy::Skip => {
                            skipped += 1;
                            if skipped_examples.len() < 5 {
                                skipped_examples.push(format!("line {line_no}: {reason}"));
                            }
                        }
                    },
                }
            }
            offset += n as u64;
        }
        if spans.is_empty() {
            if offset == 0 {
                bail!(
                    "{} is empty; expected one {{\"text\": ...}} object per line",
                    path.display()
                );
            }
            bail!(
                "{} has no usable documents ({line_no} lines, {skipped} skipped as invalid)",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            spans,
            skipped,
            skipped_examples,
            file_bytes: offset,
        })
    }

    /// Keep only the first `n` documents (a subset for short runs).
    pub fn truncate(&mut self, n: usize) {
        self.spans.truncate(n);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of documents (valid, non-blank lines).
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// 1-based line number of document `i` in the file.
    pub fn line_of(&self, i: usize) -> usize {
        self.spans[i].line as usize
    }

    /// The text of document `i` (0-based, in file order).
    pub fn text(&self, i: usize) -> Result<String> {
        let span = *self.spans.get(i).with_context(|| {
            format!("document {i} out of range ({} documents)", self.spans.len())
        })?;
        let mut bytes = vec![0u8; span.len as usize];
        self.file
            .read_exact_at(&mut bytes, span.offset)
            .with_context(|| {
                format!(
                    "{}:{}: reading the line failed (was the file changed while training?)",
                    self.path.display(),
                    span.line
                )
            })?;
        parse_text(&bytes).map_err(|reason| {
            anyhow::anyhow!(
                "{}:{}: {reason} (was the file changed while training?)",
                self.path.display(),
                span.line
            )
        })
    }

    /// Every document's text in file order.
    pub fn iter_texts(&self) -> impl Iterator<Item = Result<String>> + Send + '_ {
        (0..self.len()).map(move |i| self.text(i))
    }
}

fn trim_line_end(buf: &[u8]) -> usize {
    let mut end = buf.len();
    if end > 0 && buf[end - 1] == b'\n' {
        end -= 1;
    }
    if end > 0 && buf[end - 1] == b'\r' {
        end -= 1;
    }
    end
}

/// The `text` field of one JSONL line, or why there is none.
pub(crate) fn parse_text(line: &[u8]) -> std::result::Result<String, String> {
    let s = std::str::from_utf8(line)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    // Fast path: a struct with one field skips building a map of every field. It succeeds only
    // on an object with exactly one string "text" (a duplicate key is an error here), where the
    // general path below gives the same text; anything else takes the general path, so its
    // messages (and last-key-wins for duplicates) are unchanged.
    #[derive(serde::Deserialize)]
    struct TextOnly {
        text: String,
    }
    // (A derived struct also accepts a JSON array, hence the check for an object.)
    if s.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        if let Ok(t) = serde_json::from_str::<TextOnly>(s) {
            return Ok(t.text);
        }
    }
    let value: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("invalid JSON ({e})"))?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(format!(
            "expected a JSON object {{\"text\": ...}}, found {}",
            kind_of(&value)
        ));
    };
    match map.remove("text") {
        Some(serde_json::Value::String(text)) => Ok(text),
        Some(other) => Err(format!("\"text\" is {}, not a string", kind_of(&other))),
        None => Err("object has no \"text\" field".to_string()),
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn corpus(bytes: &[u8], policy: LinePolicy) -> Result<JsonlCorpus> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        // The open corpus keeps its own handle; the name may go when `f` drops.
        JsonlCorpus::open(f.path(), policy)
    }

    #[test]
    fn bom_crlf_and_blank_lines_are_accepted() {
        let c = corpus(
            b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n\r\n{\"text\": \"b\\n\", \"x\": 1}\r\n",
            LinePolicy::Fail,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.text(0).unwrap(), "a");
        assert_eq!(c.text(1).unwrap(), "b\n");
        assert_eq!(c.line_of(1), 3);
    }

    #[test]
    fn last_line_without_newline_is_read() {
        let c = corpus(b"{\"text\": \"a\"}\n{\"text\": \"z\"}", LinePolicy::Fail).unwrap();
        assert_eq!(c.text(1).unwrap(), "z");
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"text\": \"a\"}\n{\"text\": \n", ":2: invalid JSON"),
            (b"{\"txt\": \"a\"}\n", ":1: object has no \"text\" field"),
            (b"{\"text\": 3}\n", ":1: \"text\" is a number, not a string"),
            (b"[1]\n", ":1: expected a JSON object"),
            (
                b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n",
                ":2: invalid UTF-8",
            ),
            (b"", "is empty"),
        ];
        for (bytes, want) in cases {
            let err = format!(
                "{:#}",
                corpus(bytes, LinePolicy::Fail).err().expect("must fail")
            );
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn skip_policy_counts_bad_lines() {
        let c = corpus(
            b"{\"text\": \"a\"}\nnope\n{\"text\": 1}\n{\"text\": \"b\"}\n",
            LinePolicy::Skip,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.skipped, 2);
        assert_eq!(c.text(1).unwrap(), "b");
        assert!(c.skipped_examples[0].starts_with("line 2:"));
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_one() {
        for line in [
            &b"{\"text\": \"a\"}"[..],
            b"[\"a\"]",
            b"{\"text\": \"a\", \"text\": \"b\"}",
            b"{\"x\": 1, \"text\": \"c\"}",
            b" {\"text\": \"d\"} ",
        ] {
            let general = std::str::from_utf8(line)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                .and_then(|v| v.get("text").and_then(|t| t.as_str().map(str::to_string)));
            assert_eq!(
                parse_text(line).ok(),
                general,
                "{:?}",
                std::str::from_utf8(line)
            );
        }
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            JsonlCorpus::open(dir.path(), LinePolicy::Fail)
                .err()
                .unwrap()
        );
        assert!(err.contains("is a directory"), "{err}");
    }
}

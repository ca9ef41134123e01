//! Byte-level BPE to ids, for the tokenizing pass: what `tokenizers::Tokenizer::encode_fast(text,
//! false)` computes for one shape of tokenizer.json, without its per-call strings, offsets and
//! encodings, and with one word cache per thread.
//!
//! The shape is MiniMind's (both its tokenizers) and GPT-2's: no normalizer; the `ByteLevel`
//! pre-tokenizer with GPT-2's split (`use_regex`, no prefix space); a `BPE` model without dropout,
//! unk token, subword prefix or suffix, byte fallback or `ignore_merges`; added tokens matched
//! as written (not normalized, no lstrip, rstrip or single_word). [`ByteLevelBpe::from_json`]
//! says why any other tokenizer.json does not fit, and [`super::tokenizer::TextTokenizer`] then
//! uses the `tokenizers` crate for it.
//!
//! The steps are the crate's, one by one:
//! 1. The text is cut at added tokens: leftmost-longest matches over all of them (aho-corasick,
//!    as the crate does), each becoming its id.
//! 2. Every other stretch is split into pieces by GPT-2's pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, written out as
//!    [`next_piece`] (Oniguruma and regex-syntax both carry Unicode 16.0's classes).
//! 3. A piece's bytes start as one symbol each; BPE merges the lowest-ranked adjacent pair,
//!    leftmost first, until no pair has a merge: [`merge`] is the crate's `Word::merge_all`
//!    without dropout, heap order and stale-entry test included.
//!
//! `tests/tokenizer_fast_path.rs` compares the ids with the crate's on the shipped tokenizers,
//! on the embedded corpus, on hand-made texts for every branch of the pattern and by proptest.
use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// Word-cache entries a thread keeps before it starts over (bounded memory on any corpus).
const CACHE_ENTRIES: usize = 1 << 17;
/// Pieces longer than this are not cached (rare, and they would crowd the cache).
const CACHE_MAX_BYTES: usize = 96;

/// A tokenizer.json of the supported shape, ready to encode.
pub struct ByteLevelBpe {
    /// Id of each byte's single-byte token.
    byte_ids: [u32; 256],
    /// (left id, right id) -> (rank, merged id), the later of repeated pairs winning as in the crate.
    merges: HashMap<(u32, u32), (u32, u32), ahash::RandomState>,
    /// Added tokens and their ids, in the trie's pattern order.
    added: Option<(AhoCorasick, Vec<u32>)>,
    /// Tells this tokenizer's word cache from another's in a thread that uses both.
    key: usize,
}

/// Why a tokenizer.json does not have the supported shape (one sentence, naming the field).
pub type Unsupported = String;

impl ByteLevelBpe {
    /// The fast path for `json` (a parsed tokenizer.json), or why it does not fit.
    pub fn from_json(json: &serde_json::Value) -> Result<Self, Unsupported> {
        use serde_json::Value;
        fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
            static NULL: Value = Value::Null;
            v.get(k).unwrap_or(&NULL)
        }
        if !field(json, "normalizer").is_null() {
            return Err("it has a normalizer".into());
        }
        let pre = field(json, "pre_tokenizer");
        if pre.get("type").and_then(Value::as_str) != Some("ByteLevel")
            || pre.get("add_prefix_space").and_then(Value::as_bool) != Some(false)
            || pre.get("use_regex").and_then(Value::as_bool) == Some(false)
        {
            return Err(
                "its pre_tokenizer is not ByteLevel with GPT-2's split and no prefix space".into(),
            );
        }
        let model = field(json, "model");
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err("its model is not BPE".into());
        }
        let off = |k: &str| match model.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => true,
            Some(Value::Number(n)) if k == "dropout" => n.as_f64() == Some(0.0),
            _ => false,
        };
        for k in [
            "dropout",
            "unk_token",
            "continuing_subword_prefix",
            "end_of_word_suffix",
            "byte_fallback",
            "ignore_merges",
        ] {
            if !off(k) {
                return Err(format!("its model sets `{k}`"));
            }
        }
        let vocab: HashMap<&str, u32> = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or("its model has no vocab object")?
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.as_str(),
                    v.as_u64().ok_or("a vocab id is not a number")? as u32,
                ))
            })
            .collect::<Result<_, &str>>()?;
        let chars = bytes_char();
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *vocab
                .get(c.to_string().as_str())
                .ok_or_else(|| format!("its vocab lacks the token of byte {b:#04x}"))?;
        }
        let mut merges = HashMap::with_hasher(ahash::RandomState::with_seeds(1, 2, 3, 4));
        let list = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or("its model has no merges list")?;
        for (rank, m) in list.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => {
                    let parts: Vec<&str> = s.split(' ').collect();
                    if parts.len() != 2 {
                        return Err(format!("merge {} is not two tokens", rank + 1));
                    }
                    (parts[0].to_string(), parts[1].to_string())
                }
                Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => return Err(format!("merge {} is not two tokens", rank + 1)),
                },
                _ => return Err(format!("merge {} is not two tokens", rank + 1)),
            };
            let id = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| format!("merge {} names {t:?}, not in the vocab", rank + 1))
            };
            let new = id(&format!("{a}{b}"))?;
            merges.insert((id(&a)?, id(&b)?), (rank as u32, new));
        }
        let mut patterns = Vec::new();
        let mut ids = Vec::new();
        if let Some(list) = json.get("added_tokens").and_then(Value::as_array) {
            for t in list {
                let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
                if flag("normalized") || flag("lstrip") || flag("rstrip") || flag("single_word") {
                    return Err(
                        "an added token is normalized, lstrip, rstrip or single_word".into(),
                    );
                }
                let content = t
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or("an added token has no content")?;
                let id = t
                    .get("id")
                    .and_then(Value::as_u64)
                    .ok_or("an added token has no id")?;
                if !content.is_empty() {
                    patterns.push(content.to_string());
                    ids.push(id as u32);
                }
            }
        }
        let added = if patterns.is_empty() {
            None
        } else {
            let trie = AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .map_err(|e| format!("its added tokens do not build a trie: {e}"))?;
            Some((trie, ids))
        };
        static KEYS: AtomicUsize = AtomicUsize::new(1);
        Ok(Self {
            byte_ids,
            merges,
            added,
            key: KEYS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The ids of `text`, appended to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.key != self.key {
                s.cache.clear();
                s.key = self.key;
            }
            match &self.added {
                None => self.encode_stretch(text, &mut s, out),
                Some((trie, ids)) => {
                    let mut at = 0;
                    for m in trie.find_iter(text) {
                        self.encode_stretch(&text[at..m.start()], &mut s, out);
                        out.push(ids[m.pattern().as_usize()]);
                        at = m.end();
                    }
                    self.encode_stretch(&text[at..], &mut s, out);
                }
            }
        })
    }

    /// The ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 2 + 4);
        self.encode_into(text, &mut out);
        out
    }

    fn encode_stretch(&self, text: &str, s: &mut Scratch, out: &mut Vec<u32>) {
        let classes = classes();
        let mut i = 0;
        while i < text.len() {
            let end = next_piece(text, i, classes);
            self.encode_piece(&text.as_bytes()[i..end], s, out);
            i = end;
        }
    }

    fn encode_piece(&self, piece: &[u8], s: &mut Scratch, out: &mut Vec<u32>) {
        if piece.len() == 1 {
            out.push(self.byte_ids[piece[0] as usize]);
            return;
        }
        let cacheable = piece.len() <= CACHE_MAX_BYTES;
        if cacheable {
            if let Some(ids) = s.cache.get(piece) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let from = out.len();
        merge(
            &self.merges,
            piece.iter().map(|&b| self.byte_ids[b as usize]),
            &mut s.word,
            out,
        );
        if cacheable {
            if s.cache.len() >= CACHE_ENTRIES {
                s.cache.clear();
            }
            s.cache.insert(piece.into(), out[from..].into());
        }
    }
}

/// A thread's word cache and merge buffers.
struct Scratch {
    key: usize,
    cache: HashMap<Box<[u8]>, Box<[u32]>, ahash::RandomState>,
    word: Word,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        key: 0,
        cache: HashMap::with_hasher(ahash::RandomState::with_seeds(5, 6, 7, 8)),
        word: Word::default(),
    });
}

#[derive(Clone, Copy)]
struct Symbol {
    c: u32,
    prev: isize,
    next: isize,
    /// 0 once merged into its left neighbour.
    len: usize,
}

/// A pending merge; the heap pops the lowest rank first, then the leftmost position.
#[derive(PartialEq, Eq)]
struct Merge {
    pos: usize,
    rank: u32,
    new_id: u32,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Default)]
struct Word {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Merge>,
}

/// BPE over one piece whose bytes' ids are `ids`: the merged ids appended to `out`.
fn merge(
    merges: &HashMap<(u32, u32), (u32, u32), ahash::RandomState>,
    ids: impl Iterator<Item = u32>,
    w: &mut Word,
    out: &mut Vec<u32>,
) {
    let sy = &mut w.symbols;
    sy.clear();
    for (i, c) in ids.enumerate() {
        sy.push(Symbol {
            c,
            prev: i as isize - 1,
            next: i as isize + 1,
            len: 1,
        });
    }
    let n = sy.len();
    if let Some(last) = sy.last_mut() {
        last.next = -1;
    }
    let q = &mut w.queue;
    q.clear();
    for pos in 0..n.saturating_sub(1) {
        if let Some(&(rank, new_id)) = merges.get(&(sy[pos].c, sy[pos + 1].c)) {
            q.push(Merge { pos, rank, new_id });
        }
    }
    while let Some(top) = q.pop() {
        if sy[top.pos].len == 0 || sy[top.pos].next == -1 {
            continue;
        }
        let next_pos = sy[top.pos].next as usize;
        let right = sy[next_pos];
        // An entry whose pair has changed since it was queued is stale.
        if merges
            .get(&(sy[top.pos].c, right.c))
            .is_none_or(|&(_, id)| id != top.new_id)
        {
            continue;
        }
        sy[top.pos].c = top.new_id;
        sy[top.pos].len += right.len;
        sy[top.pos].next = right.next;
        sy[next_pos].len = 0;
        if right.next > -1 && (right.next as usize) < n {
            sy[right.next as usize].prev = top.pos as isize;
        }
        let cur = sy[top.pos];
        if cur.prev >= 0 {
            let prev = cur.prev as usize;
            if let Some(&(rank, new_id)) = merges.get(&(sy[prev].c, cur.c)) {
                q.push(Merge {
                    pos: prev,
                    rank,
                    new_id,
                });
            }
        }
        let next = cur.next as usize;
        if cur.next >= 0 && next < n {
            if let Some(&(rank, new_id)) = merges.get(&(cur.c, sy[next].c)) {
                q.push(Merge {
                    pos: top.pos,
                    rank,
                    new_id,
                });
            }
        }
    }
    out.extend(sy.iter().filter(|s| s.len != 0).map(|s| s.c));
}

/// GPT-2's byte -> char table (printable bytes stand for themselves, the rest move to 256 + n).
pub fn bytes_char() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("a Latin-1 code point")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("a code point below 512")
        };
    }
    out
}

/// The classes GPT-2's pattern tells apart.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// `\p{L}`, `\p{N}` and `\s` as regex-syntax defines them (Unicode 16.0, as Oniguruma's tables):
/// a table for the Basic Multilingual Plane, sorted ranges above it.
pub struct Classes {
    bmp: Vec<Class>,
    astral: Vec<(u32, u32, Class)>,
}

impl Classes {
    #[inline]
    pub fn of(&self, c: char) -> Class {
        let u = c as u32;
        if u < 0x10000 {
            return self.bmp[u as usize];
        }
        match self.astral.binary_search_by(|&(lo, hi, _)| {
            if hi < u {
                std::cmp::Ordering::Less
            } else if lo > u {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => self.astral[i].2,
            Err(_) => Class::Other,
        }
    }
}

fn ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(true)
        .build()
        .parse(pattern)
        .expect("a valid Unicode class");
    match hir.kind() {
        regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => unreachable!("{pattern} parsed to {other:?}"),
    }
}

/// The class tables, built once.
pub fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut bmp = vec![Class::Other; 0x10000];
        let mut astral = Vec::new();
        for (pattern, class) in [
            (r"\p{L}", Class::Letter),
            (r"\p{N}", Class::Number),
            (r"\s", Class::Space),
        ] {
            for (lo, hi) in ranges(pattern) {
                for u in lo..=hi.min(0xffff) {
                    bmp[u as usize] = class;
                }
                if hi >= 0x10000 {
                    astral.push((lo.max(0x10000), hi, class));
                }
            }
        }
        astral.sort_unstable_by_key(|r| r.0);
        Classes { bmp, astral }
    })
}

/// The end of the piece GPT-2's pattern matches at byte `i` of `s` (always past `i`).
pub fn next_piece(s: &str, i: usize, classes: &Classes) -> usize {
    let b = s.as_bytes();
    if b[i] == b'\'' {
        let rest = &b[i + 1..];
        if rest.starts_with(b"re") || rest.starts_with(b"ve") || rest.starts_with(b"ll") {
            return i + 3;
        }
        if matches!(rest.first(), Some(b's' | b't' | b'm' | b'd')) {
            return i + 2;
        }
    }
    let mut chars = s[i..].char_indices();
    let (_, c0) = chars.next().expect("i is before the end");
    let class0 = classes.of(c0);
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a space takes the run of the class after it.
    let (run_class, run_from) = if c0 == ' ' {
        match s[i + 1..].chars().next().map(|c| classes.of(c)) {
            Some(k) if k != Class::Space => (k, i + 1),
            _ => (Class::Space, i),
        }
    } else {
        (class0, i)
    };
    let run_end = |from: usize, k: Class| {
        s[from..]
            .char_indices()
            .find(|&(_, c)| classes.of(c) != k)
            .map_or(s.len(), |(j, _)| from + j)
    };
    if run_class != Class::Space {
        return run_end(run_from, run_class);
    }
    // `\s+(?!\S)`: the whitespace run, less its last character when a non-space follows it;
    // `\s+` otherwise (a single whitespace character before a non-space).
    let end = run_end(i, Class::Space);
    if end == s.len() {
        return end;
    }
    let last = s[i..end]
        .char_indices()
        .last()
        .map(|(j, _)| i + j)
        .expect("the run holds c0");
    if last > i {
        last
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str) -> Vec<&str> {
        let c = classes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let e = next_piece(s, i, c);
            out.push(&s[i..e]);
            i = e;
        }
        out
    }

    #[test]
    fn the_split_follows_each_branch_of_gpt2s_pattern() {
        assert_eq!(pieces("I'm here"), ["I", "'m", " here"]);
        assert_eq!(pieces("they'll've 're"), ["they", "'ll", "'ve", " '", "re"]);
        assert_eq!(pieces("a  b"), ["a", " ", " b"]);
        assert_eq!(pieces("a \n\tb"), ["a", " \n", "\t", "b"]);
        assert_eq!(pieces("x   "), ["x", "   "]);
        assert_eq!(pieces("12 345abc"), ["12", " 345", "abc"]);
        assert_eq!(
            pieces("春眠不覺曉，處處聞啼鳥。"),
            ["春眠不覺曉", "，", "處處聞啼鳥", "。"]
        );
        assert_eq!(pieces(" !!?x"), [" !!?", "x"]);
        assert_eq!(pieces("a\u{3000}b"), ["a", "\u{3000}", "b"]);
        assert_eq!(pieces("''s"), ["''", "s"]);
    }

    #[test]
    fn classes_are_unicodes() {
        let c = classes();
        assert_eq!(c.of('a'), Class::Letter);
        assert_eq!(c.of('春'), Class::Letter);
        assert_eq!(c.of('\u{20000}'), Class::Letter); // CJK extension B
        assert_eq!(c.of('٣'), Class::Number);
        assert_eq!(c.of('Ⅻ'), Class::Number); // Nl
        assert_eq!(c.of('\u{3000}'), Class::Space);
        assert_eq!(c.of('\u{85}'), Class::Space);
        assert_eq!(c.of('，'), Class::Other);
        assert_eq!(c.of('\u{301}'), Class::Other); // a combining mark is not \p{L}
        assert_eq!(c.of('😀'), Class::Other);
    }
}

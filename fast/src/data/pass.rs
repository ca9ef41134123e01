//! The tokenizing pass: a corpus's lines -> token cache shards, on every core, in bounded memory.
//!
//! One reader thread cuts the files into chunks of lines; `threads` workers parse and tokenize
//! chunks (each with its own copy of the tokenizer, so no cache or lock is shared); this thread
//! puts the results back in corpus order and appends them to the current shard, which is closed
//! (fsynced, renamed, recorded in the manifest) every `shard_tokens` ids. At most `2 * threads + 2`
//! chunks exist at once, whatever the corpus's size, so memory is bounded by the chunk size
//! times that, not by the corpus. A pass that stops (killed, or `--max-docs` reached) leaves a
//! manifest naming its complete shards and the position after them; the next pass continues
//! from there.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};

use super::corpus::parse_text;
use super::sources::{Line, Lines, Position};
use super::token_cache::{write_manifest, Manifest, ShardWriter};
use super::tokenizer::TextTokenizer;

/// Ids per shard by default: 16M (32 MB of u16), so an interrupted pass loses little.
pub const DEFAULT_SHARD_TOKENS: u64 = 1 << 24;

/// Lines per chunk handed to a worker, and the bytes that close a chunk early.
const CHUNK_LINES: usize = 512;
const CHUNK_BYTES: usize = 4 << 20;

/// How one pass runs.
pub struct PassOptions {
    pub threads: usize,
    pub max_docs: Option<u64>,
    pub shard_tokens: u64,
    pub progress: bool,
}

/// What a pass did, for its summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassStats {
    pub docs: u64,
    pub tokens: u64,
    /// Bytes of the sources read (as stored).
    pub bytes: u64,
    pub seconds: f64,
}

impl PassStats {
    pub fn describe(&self, threads: usize) -> String {
        let s = self.seconds.max(1e-9);
        let mb = self.bytes as f64 / 1e6;
        format!(
            "{} documents, {} tokens from {:.1} MB in {:.1}s: {:.1} MB/s, {:.0} documents/s ({} threads: {:.2} MB/s and {:.0} documents/s per thread)",
            self.docs,
            self.tokens,
            mb,
            self.seconds,
            mb / s,
            self.docs as f64 / s,
            threads,
            mb / s / threads as f64,
            self.docs as f64 / s / threads as f64
        )
    }
}

struct Chunk {
    seq: u64,
    lines: Vec<Line>,
}

enum Event {
    /// A document: its ids are `ids[from..to]` of the chunk's result.
    Doc {
        from: usize,
        to: usize,
        after: Position,
    },
    Skipped {
        reason: String,
    },
}

struct Done {
    seq: u64,
    ids: Vec<u32>,
    events: Vec<Event>,
}

fn read_chunks(mut lines: Lines, jobs: Sender<Chunk>, slots: Receiver<()>) -> Result<()> {
    let mut seq = 0u64;
    let mut chunk = Vec::with_capacity(CHUNK_LINES);
    let mut bytes = 0usize;
    loop {
        let line = lines.next_line()?;
        let end = line.is_none();
        if let Some(l) = line {
            if !l.blank {
                bytes += l.bytes.len();
                chunk.push(l);
            }
        }
        if (end && !chunk.is_empty()) || chunk.len() >= CHUNK_LINES || bytes >= CHUNK_BYTES {
            // One slot per chunk in flight: the writer returns it when it has used the chunk.
            if slots.recv().is_err() {
                return Ok(());
            }
            let lines = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_LINES));
            if jobs.send(Chunk { seq, lines }).is_err() {
                return Ok(());
            }
            seq += 1;
            bytes = 0;
        }
        if end {
            return Ok(());
        }
    }
}

fn tokenize_chunk(
    chunk: Chunk,
    tok: &TextTokenizer,
    files: &[PathBuf],
    skip_bad: bool,
) -> Result<Done> {
    let mut ids = Vec::new();
    let mut events = Vec::with_capacity(chunk.lines.len());
    for l in chunk.lines {
        let path = files[l.source].display();
        match parse_text(&l.bytes) {
            Ok(text) => {
                let from = ids.len();
                let got = tok
                    .encode(&text)
                    .with_context(|| format!("{path}:{}", l.line))?;
                ids.extend_from_slice(&got);
                events.push(Event::Doc {
                    from,
                    to: ids.len(),
                    after: l.after,
                });
            }
            Err(reason) if skip_bad => events.push(Event::Skipped {
                reason: format!("{path}:{}: {reason}", l.line),
            }),
            Err(reason) => bail!(
                "{path}:{}: {reason} (use --skip-bad-lines to leave such lines out)",
                l.line
            ),
        }
    }
    Ok(Done {
        seq: chunk.seq,
        ids,
        events,
    })
}

fn progress_bar(total: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "tokenizing {bar:30} {bytes}/{total_bytes} ({binary_bytes_per_sec}) {msg} ETA {eta}",
        )
        .expect("a valid template"),
    );
    pb
}

/// Continues (or starts) the pass of `manifest` in `dir` over `files` with `tok`, until the
/// corpus ends or `opts.max_docs` documents are in the shards; updates `manifest` and writes it
/// after every shard.
pub fn run(
    dir: &Path,
    files: &[PathBuf],
    manifest: &mut Manifest,
    tok: &TextTokenizer,
    opts: &PassOptions,
) -> Result<PassStats> {
    let started = Instant::now();
    let threads = opts.threads.clamp(1, 256);
    let in_flight = 2 * threads + 2;
    let lines = Lines::new(files.to_vec(), manifest.next);
    let bytes_read = lines.bytes_read.clone();
    let total_bytes: u64 = manifest.sources.iter().map(|s| s.size).sum();
    let already: u64 = manifest.sources[..manifest.next.source.min(manifest.sources.len())]
        .iter()
        .map(|s| s.size)
        .sum::<u64>()
        + manifest.next.offset.min(
            manifest
                .sources
                .get(manifest.next.source)
                .map_or(0, |s| s.size),
        );
    let pb = progress_bar(total_bytes, opts.progress);
    pb.set_position(already);
    let docs_before = manifest.docs;

    let (jobs_tx, jobs_rx) = bounded::<Chunk>(in_flight);
    let (done_tx, done_rx) = bounded::<Result<Done>>(in_flight);
    let (slot_tx, slot_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        slot_tx.send(()).expect("the slot channel has room");
    }
    let skip_bad = manifest.skip_bad_lines;
    let result = std::thread::scope(|s| -> Result<PassStats> {
        let reader = std::thread::Builder::new()
            .name("tokenize-read".into())
            .spawn_scoped(s, {
                let done_tx = done_tx.clone();
                move || {
                    if let Err(e) = read_chunks(lines, jobs_tx, slot_rx) {
                        let _ = done_tx.send(Err(e));
                    }
                }
            })
            .context("spawning the reader thread")?;
        for w in 0..threads {
            let (jobs_rx, done_tx) = (jobs_rx.clone(), done_tx.clone());
            let tok = tok.clone();
            std::thread::Builder::new()
                .name(format!("tokenize-{w}"))
                .spawn_scoped(s, move || {
                    for chunk in jobs_rx {
                        let r = tokenize_chunk(chunk, &tok, files, skip_bad);
                        if done_tx.send(r).is_err() {
                            return;
                        }
                    }
                })
                .context("spawning a tokenizing thread")?;
        }
        drop(done_tx);
        drop(jobs_rx);
        let out = write_in_order(
            dir,
            manifest,
            &done_rx,
            &slot_tx,
            opts,
            &pb,
            &bytes_read,
            already,
        );
        // Dropping the receivers ends the reader and workers (their sends fail).
        drop(done_rx);
        drop(slot_tx);
        let _ = reader.join();
        out
    });
    pb.finish_and_clear();
    let mut stats = result?;
    stats.docs = manifest.docs - docs_before;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
fn write_in_order(
    dir: &Path,
    manifest: &mut Manifest,
    done: &Receiver<Result<Done>>,
    slots: &Sender<()>,
    opts: &PassOptions,
    pb: &indicatif::ProgressBar,
    bytes_read: &std::sync::atomic::AtomicU64,
    already: u64,
) -> Result<PassStats> {
    let mut stats = PassStats::default();
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut shard = ShardWriter::new(dir, manifest.shards.len(), manifest.token_width)?;
    let (mut shard_skipped, mut shard_examples) = (0u64, Vec::new());
    let mut last_after = manifest.next;
    let mut last_shown = Instant::now() - Duration::from_secs(1);
    let t0 = Instant::now();
    let docs_before = manifest.docs;
    manifest.max_docs = opts.max_docs;
    let limit_reached = |m: &Manifest, shard: &ShardWriter| {
        opts.max_docs
            .is_some_and(|lim| m.docs + shard.docs() >= lim)
    };
    let mut stopped = limit_reached(manifest, &shard);
    // Closes the current shard (if it holds anything) and records it with the position after it.
    let close = |manifest: &mut Manifest,
                 shard: ShardWriter,
                 skipped: &mut u64,
                 examples: &mut Vec<String>,
                 after: Position|
     -> Result<()> {
        if shard.docs() > 0 {
            let rec = shard.finish()?;
            manifest.docs += rec.docs;
            manifest.tokens += rec.tokens;
            manifest.shards.push(rec);
        } else {
            shard.discard();
        }
        manifest.lines_skipped += *skipped;
        for e in examples.drain(..) {
            if manifest.skipped_examples.len() < 5 {
                manifest.skipped_examples.push(e);
            }
        }
        *skipped = 0;
        manifest.next = after;
        write_manifest(dir, manifest)
    };
    'chunks: while !stopped {
        let d = match done.recv() {
            Ok(d) => d?,
            Err(_) => break, // every chunk is in: the corpus has ended
        };
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&next_seq) {
            next_seq += 1;
            let _ = slots.send(());
            for ev in d.events {
                match ev {
                    Event::Skipped { reason } => {
                        shard_skipped += 1;
                        if shard_examples.len() < 5 {
                            shard_examples.push(reason);
                        }
                    }
                    Event::Doc { from, to, after } => {
                        shard.push(&d.ids[from..to])?;
                        stats.tokens += (to - from) as u64;
                        last_after = after;
                        if limit_reached(manifest, &shard) {
                            stopped = true;
                            break 'chunks;
                        }
                        if shard.tokens() >= opts.shard_tokens {
                            let next = ShardWriter::new(
                                dir,
                                manifest.shards.len() + 1,
                                manifest.token_width,
                            )?;
                            let full = std::mem::replace(&mut shard, next);
                            close(
                                manifest,
                                full,
                                &mut shard_skipped,
                                &mut shard_examples,
                                after,
                            )?;
                        }
                    }
                }
            }
            if last_shown.elapsed() > Duration::from_millis(250) {
                last_shown = Instant::now();
                let docs = manifest.docs + shard.docs() - docs_before;
                pb.set_position(already + bytes_read.load(Ordering::Relaxed));
                pb.set_message(format!(
                    "{docs} documents, {:.0}/s",
                    docs as f64 / t0.elapsed().as_secs_f64().max(1e-9)
                ));
            }
        }
    }
    if !stopped {
        manifest.exhausted = true;
    }
    close(
        manifest,
        shard,
        &mut shard_skipped,
        &mut shard_examples,
        last_after,
    )?;
    // Partial shard files of an interrupted pass are overwritten by the next one; after a
    // complete pass none is left.
    stats.bytes = bytes_read.load(Ordering::Relaxed);
    Ok(stats)
}

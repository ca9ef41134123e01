//! `--tensorboard DIR`: the run's curves as TensorBoard event files, written by the format itself
//! (no TensorFlow, no protobuf compiler).
//!
//! An event file is a sequence of records: `u64` length (little-endian), masked CRC32C of those
//! 8 bytes, the data, masked CRC32C of the data. Each record's data is an `Event` protobuf:
//! the first says `file_version: "brain.Event:2"`, then one per log line with a `Summary` of
//! scalar values at the run's micro-step, and one with the run configuration as a text summary
//! (the text plugin's string tensor). The few messages and fields needed are encoded by hand
//! below (field numbers from tensorflow/core/util/event.proto and framework/summary.proto).
//!
//! Like metrics.jsonl, the file is rewritten at every start from the run's history (which a
//! resume checkpoint carries) and then appended to at every log line: a resumed run's curve
//! continues without the steps of the killed run that the resume redoes, and a killed run keeps
//! every line it logged. One file per run (`events.out.tfevents.<unix time>.<weights stem>`);
//! a start removes the earlier starts' files of the same run from the directory, and leaves
//! every other file alone.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::metrics::MetricRow;
use super::run_config::RunConfig;

/// What each log line puts on TensorBoard: a tag and the row's value (None: nothing logged for
/// that row). A new `MetricRow` field is one more line here.
const SCALARS: &[(&str, fn(&MetricRow) -> Option<f64>)] = &[
    ("train/loss", |r| Some(r.loss_avg)),
    ("train/loss_last_batch", |r| Some(r.loss)),
    ("train/ce", |r| Some(r.ce)),
    ("train/aux", |r| Some(r.aux)),
    ("train/lr", |r| Some(r.lr)),
    ("train/grad_norm", |r| r.grad_norm),
    ("perf/tokens_per_s", |r| Some(r.tokens_per_s)),
    ("perf/useful_tokens_per_s", |r| Some(r.useful_tokens_per_s)),
    ("perf/data_wait_share", |r| Some(r.data_wait_share)),
    ("eval/heldout_loss", |r| r.eval_loss),
];

/// The tag of the run configuration's text summary.
pub const CONFIG_TAG: &str = "run_config";

const FILE_PREFIX: &str = "events.out.tfevents.";

/// Rank 0's event file, open for appending.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
    /// Unix time the run started, counting the time of the runs it continues: a row's wall time
    /// is `t0 + row.elapsed_s`, so rewritten history keeps its own times.
    t0: f64,
}

impl EventWriter {
    /// Start the run's event file in `dir`: the file version, the configuration (at micro-step
    /// `global`), every row of `history`; then remove this run's older files there.
    pub fn start(
        dir: &Path,
        cfg: &RunConfig,
        history: &[MetricRow],
        global: usize,
        elapsed_before: f64,
    ) -> Result<EventWriter> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--tensorboard {}: creating the directory", dir.display()))?;
        let now = unix_now();
        let suffix = run_suffix(cfg);
        let path = dir.join(format!("{FILE_PREFIX}{}{suffix}", now as u64));
        let t0 = now - elapsed_before;
        let mut bytes = record(&event(now, 0, Payload::FileVersion("brain.Event:2")));
        let config = serde_json::to_string_pretty(cfg)?;
        // Indented: the text plugin renders markdown, where an indented block is verbatim.
        let text: String = config.lines().map(|l| format!("    {l}\n")).collect();
        bytes.extend(record(&event(
            now,
            global as i64,
            Payload::Summary(&text_summary(CONFIG_TAG, &text)),
        )));
        for r in history {
            bytes.extend(record(&row_event(t0, r)));
        }
        crate::io::checkpoint::write_atomic(&path, &bytes)
            .with_context(|| format!("writing TensorBoard events {}", path.display()))?;
        remove_older_files(dir, &suffix, &path);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(EventWriter { path, file, t0 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One log line's scalars, handed to the OS at once (a killed run keeps them).
    pub fn log(&mut self, row: &MetricRow) -> Result<()> {
        self.file
            .write_all(&record(&row_event(self.t0, row)))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing TensorBoard events {}", self.path.display()))
    }
}

/// `.<weights stem>`: which run a file belongs to, so a start replaces only its own run's file.
fn run_suffix(cfg: &RunConfig) -> String {
    let weights = cfg.weights_path();
    let stem = weights
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.save_weight.clone());
    format!(".{stem}")
}

/// Earlier starts' files of this run; a file that cannot be removed only leaves a second curve.
fn remove_older_files(dir: &Path, suffix: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name
            .strip_prefix(FILE_PREFIX)
            .and_then(|rest| rest.strip_suffix(suffix))
            .is_some_and(|stamp| !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()));
        if ours && e.path() != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn row_event(t0: f64, r: &MetricRow) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in SCALARS {
        if let Some(v) = value(r) {
            summary.extend(scalar_value(tag, v as f32));
        }
    }
    event(t0 + r.elapsed_s, r.step as i64, Payload::Summary(&summary))
}

// ---- the record framing ----

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: a CRC of data that holds CRCs would otherwise be weak.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---- the protobuf messages, field by field ----

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field key: field number and wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    key(out, field, 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

enum Payload<'a> {
    FileVersion(&'a str),
    /// The encoded `Summary.value` entries.
    Summary(&'a [u8]),
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step as u64);
    match payload {
        Payload::FileVersion(v) => bytes_field(&mut e, 3, v.as_bytes()),
        Payload::Summary(values) => bytes_field(&mut e, 5, values),
    }
    e
}

/// One `Summary.value` entry (`Summary { repeated Value value = 1 }`):
/// `Value { tag = 1, simple_value = 2 (float) }`.
fn scalar_value(tag: &str, v: f32) -> Vec<u8> {
    let mut value = Vec::new();
    bytes_field(&mut value, 1, tag.as_bytes());
    key(&mut value, 2, 5);
    value.extend_from_slice(&v.to_le_bytes());
    let mut entry = Vec::new();
    bytes_field(&mut entry, 1, &value);
    entry
}

/// A text summary as the text plugin reads it: `Value { tag = 1, metadata = 9 { plugin_data = 1
/// { plugin_name = 1: "text" } }, tensor = 8 { dtype = 1: DT_STRING (7), tensor_shape = 2 (a
/// scalar: no dims), string_val = 8 } }`.
fn text_summary(tag: &str, text: &str) -> Vec<u8> {
    let mut plugin = Vec::new();
    bytes_field(&mut plugin, 1, b"text");
    let mut metadata = Vec::new();
    bytes_field(&mut metadata, 1, &plugin);
    let mut tensor = Vec::new();
    key(&mut tensor, 1, 0);
    varint(&mut tensor, 7);
    bytes_field(&mut tensor, 2, &[]);
    bytes_field(&mut tensor, 8, text.as_bytes());
    let mut value = Vec::new();
    bytes_field(&mut value, 1, tag.as_bytes());
    bytes_field(&mut value, 9, &metadata);
    bytes_field(&mut value, 8, &tensor);
    let mut entry = Vec::new();
    bytes_field(&mut entry, 1, &value);
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720's check value for CRC-32C, and TFRecord's mask of it.
    #[test]
    fn crc32c_matches_the_published_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        let c = 0xE306_9283u32;
        assert_eq!(
            masked_crc32c(b"123456789"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
    }

    /// A record is its length, the length's CRC, the data and the data's CRC, in that order.
    #[test]
    fn a_record_frames_its_data_with_checked_lengths() {
        let data = b"an event";
        let r = record(data);
        assert_eq!(r.len(), 8 + 4 + data.len() + 4);
        assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 8);
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            masked_crc32c(&r[..8])
        );
        assert_eq!(&r[12..20], data);
        assert_eq!(
            u32::from_le_bytes(r[20..].try_into().unwrap()),
            masked_crc32c(data)
        );
    }

    /// Protobuf's own example: field 1 = 150 is 08 96 01; a negative step is ten varint bytes.
    #[test]
    fn varints_follow_the_protobuf_encoding() {
        let mut v = Vec::new();
        key(&mut v, 1, 0);
        varint(&mut v, 150);
        assert_eq!(v, [0x08, 0x96, 0x01]);
        let mut n = Vec::new();
        varint(&mut n, -1i64 as u64);
        assert_eq!(n.len(), 10);
    }

    /// Only files named like this run's (`events.out.tfevents.<digits>.<stem>`) are replaced.
    #[test]
    fn a_start_removes_only_its_own_runs_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in [
            "events.out.tfevents.100.pretrain_32",
            "events.out.tfevents.100.pretrain_64",
            "events.out.tfevents.100.host.pretrain_32",
            "notes.txt",
        ] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        let keep = d.join("events.out.tfevents.200.pretrain_32");
        std::fs::write(&keep, b"y").unwrap();
        remove_older_files(d, ".pretrain_32", &keep);
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "events.out.tfevents.100.host.pretrain_32",
                "events.out.tfevents.100.pretrain_64",
                "events.out.tfevents.200.pretrain_32",
                "notes.txt"
            ]
        );
    }
}

//! Weights files and resume checkpoints.
//!
//! - Weights, as MiniMind saves them after every save interval: float16 tensors under MiniMind's
//!   state_dict names in `{save_dir}/{save_weight}_{hidden}[_moe].safetensors` (the tied
//!   `lm_head.weight` is not stored twice), the model config as JSON beside it (and in the file's
//!   metadata).
//! - A resume checkpoint, `{checkpoint_dir}/{save_weight}_{hidden}[_moe]_resume.safetensors`: one
//!   safetensors file holding the model in float32, the optimizer's state tensors (and the
//!   gradients of a half-finished accumulation window) plus, in its metadata, the run state as JSON
//!   (config, epoch and step, world size, optimizer step count, scaler, seed, metric history) and
//!   a SHA-256 over the state and every tensor, verified on load.
//! - The run's tokenizer, copied into `{stem}.tokenizer/` beside the weights and recorded (folder
//!   and SHA-256) in their config JSON, so `fast export` finds the tokenizer the weights were
//!   trained with.
//!
//! Every file is written atomically: a temp file in the same directory, fsync, rename, fsync of the
//! directory. A crash leaves either the old file or the new one, never a torn one.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::safetensors::{raw, serialize, Raw};
use crate::train::metrics::MetricRow;
use crate::train::run_config::RunConfig;

pub const RESUME_FORMAT: &str = "minimind-rs-resume-v1";

/// Removes the temp files a killed [`write_atomic`] of `path` left behind (`.{name}.tmp{pid}`).
/// Called once at the start of a run, before anything of this run writes `path`.
pub fn remove_stale_temp_files(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{name}.tmp");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // The rename is durable only once the directory entry is.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The weights file as MiniMind saves it: float16, MiniMind names, no tied lm_head copy; the
/// model config JSON beside it (`.json`) and in the metadata under `config`.
pub fn save_weights_f16(
    path: &Path,
    named: &[(String, Tensor)],
    model_config: &serde_json::Value,
) -> Result<()> {
    let tensors: Vec<(String, Raw)> = named
        .iter()
        .filter(|(n, _)| n != super::weights::TIED_LM_HEAD)
        .map(|(n, t)| {
            Ok((
                n.clone(),
                raw(t, Kind::Half).with_context(|| format!("tensor {n}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let config = serde_json::to_string_pretty(model_config)?;
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("config".to_string(), config.clone()),
    ]);
    let bytes = serialize(&tensors, &metadata)?;
    write_atomic(path, &bytes).with_context(|| format!("saving weights {}", path.display()))?;
    write_atomic(&path.with_extension("json"), (config + "\n").as_bytes())?;
    Ok(())
}

// ---- the tokenizer beside the weights ----

/// The files of a tokenizer folder that travel with the weights (the first is required).
pub const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// `{stem}.tokenizer/` beside `{stem}.safetensors`: one folder per weights file, so runs that
/// share a save directory with different tokenizers do not overwrite each other's.
pub fn tokenizer_dir_beside(weights: &Path) -> PathBuf {
    let stem = weights
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".into());
    weights.with_file_name(format!("{stem}.tokenizer"))
}

/// The tokenizer files of `source` (a folder, or a tokenizer.json with its config beside it) as
/// (name in the folder, bytes).
fn tokenizer_files(source: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let (json, dir) = if source.is_dir() {
        (source.join(TOKENIZER_FILES[0]), source.to_path_buf())
    } else {
        let dir = source.parent().map(Path::to_path_buf).unwrap_or_default();
        (source.to_path_buf(), dir)
    };
    let mut out = vec![(
        TOKENIZER_FILES[0],
        std::fs::read(&json).with_context(|| format!("reading tokenizer {}", json.display()))?,
    )];
    for name in &TOKENIZER_FILES[1..] {
        let p = dir.join(name);
        if p.is_file() {
            out.push((
                *name,
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            ));
        }
    }
    Ok(out)
}

fn tokenizer_sha256(files: &[(&str, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (name, bytes) in files {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Copy the run's tokenizer `source` into [`tokenizer_dir_beside`] `weights` (only when it
/// changed) and return the record saved in the weights' config JSON: the folder, relative to
/// the weights, and the SHA-256 of its files.
pub fn save_tokenizer_beside(weights: &Path, source: &Path) -> Result<serde_json::Value> {
    let files = tokenizer_files(source)?;
    let sum = tokenizer_sha256(&files);
    let dir = tokenizer_dir_beside(weights);
    let current = tokenizer_files(&dir).ok().map(|f| tokenizer_sha256(&f));
    if current.as_deref() != Some(sum.as_str()) {
        for (name, bytes) in &files {
            write_atomic(&dir.join(name), bytes)
                .with_context(|| format!("copying the tokenizer into {}", dir.display()))?;
        }
    }
    let rel = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(serde_json::json!({ "dir": rel, "sha256": sum }))
}

/// `--tokenizer` of export / eval / generate: the given path or built-in name, else the
/// tokenizer recorded with `weights` (said on stderr).
pub fn tokenizer_for(
    given: Option<&Path>,
    weights: &Path,
    config: Option<&Path>,
) -> Result<PathBuf> {
    if !weights.is_file() {
        bail!(
            "--weights {}: {}",
            weights.display(),
            if weights.exists() {
                "not a file"
            } else {
                "no such file"
            }
        );
    }
    match given {
        Some(t) => crate::train::options::resolve_tokenizer(t),
        None => {
            let dir = recorded_tokenizer(weights, config)?;
            eprintln!("tokenizer: {} (recorded with the weights)", dir.display());
            Ok(dir)
        }
    }
}

/// The tokenizer recorded with `weights` (in the config JSON beside them, else in the file's
/// metadata), checked against its hash. The error says why none can be used and names
/// `--tokenizer`.
pub fn recorded_tokenizer(weights: &Path, config: Option<&Path>) -> Result<PathBuf> {
    let give = "pass --tokenizer DIR (tokenizer.json + tokenizer_config.json), or a built-in \
                name: poems, minimind2, minimind3";
    let record = |v: &serde_json::Value| -> Option<(String, String)> {
        let t = v
            .get("tokenizer")
            .or_else(|| v.get("config")?.get("tokenizer"))?;
        Some((
            t["dir"].as_str()?.to_string(),
            t["sha256"].as_str()?.to_string(),
        ))
    };
    let from_json = super::weights::find_config(weights, config)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| record(&v));
    let from_metadata = || -> Option<(String, String)> {
        if weights.extension()? != "safetensors" {
            return None;
        }
        let bytes = std::fs::read(weights).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let config = meta.metadata().as_ref()?.get("config")?.clone();
        record(&serde_json::from_str(&config).ok()?)
    };
    let Some((rel, want)) = from_json.or_else(from_metadata) else {
        bail!(
            "{}: no tokenizer is recorded with these weights (MiniMind's .pth files and weights \
             saved before runs recorded theirs carry none); {give}",
            weights.display()
        );
    };
    let dir = weights
        .parent()
        .map(|d| d.join(&rel))
        .unwrap_or_else(|| PathBuf::from(&rel));
    let files = tokenizer_files(&dir).with_context(|| {
        format!(
            "{}: the tokenizer recorded with these weights ({}) is missing; {give}",
            weights.display(),
            dir.display()
        )
    })?;
    let got = tokenizer_sha256(&files);
    if got != want {
        bail!(
            "{}: the tokenizer in {} is not the one the run recorded (sha256 {got}, recorded \
             {want}); {give}",
            weights.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// Where a run stands, stored in the resume checkpoint's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeState {
    pub format: String,
    pub config: RunConfig,
    /// Model config JSON (for error messages and for loading without the CLI).
    pub model_config: serde_json::Value,
    /// 0-based epoch the saved step belongs to.
    pub epoch: usize,
    /// Micro-steps done within that epoch (MiniMind's `step`, 1-based index of the last one).
    pub step: usize,
    /// Micro-steps per epoch at save time (for rescaling and sanity checks).
    pub iters: usize,
    /// Micro-steps done in the whole run.
    pub global_step: usize,
    pub world_size: usize,
    /// Everything else the optimizer, scaler and step logic need (counts, scale, window).
    pub trainer: serde_json::Value,
    /// Seed of init and of the data permutation: the only randomness a run has.
    pub seed: u64,
    pub useful_tokens_seen: u64,
    pub elapsed_s: f64,
    pub metrics: Vec<MetricRow>,
    /// True once the run's last step is done.
    pub completed: bool,
}

fn checksum(state_json: &str, tensors: &[(String, Raw)]) -> String {
    let mut h = Sha256::new();
    h.update(state_json.as_bytes());
    let mut sorted: Vec<&(String, Raw)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, r) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", r.dtype, r.shape).as_bytes());
        h.update((r.data.len() as u64).to_le_bytes());
        h.update(&r.data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Save a resume checkpoint: `tensors` are stored in their own dtype (the model in float32).
pub fn save_resume(path: &Path, state: &ResumeState, tensors: &[(String, Tensor)]) -> Result<()> {
    let raws: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(n, t)| {
            let kind = if t.is_floating_point() {
                Kind::Float
            } else {
                Kind::Int64
            };
            Ok((
                n.clone(),
                raw(t, kind).with_context(|| format!("tensor {n}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let state_json = serde_json::to_string(state)?;
    let sum = checksum(&state_json, &raws);
    let metadata = BTreeMap::from([
        ("format".to_string(), RESUME_FORMAT.to_string()),
        ("state".to_string(), state_json),
        ("sha256".to_string(), sum),
    ]);
    let bytes = serialize(&raws, &metadata)?;
    write_atomic(path, &bytes)
        .with_context(|| format!("saving resume checkpoint {}", path.display()))
}

pub struct Resume {
    pub state: ResumeState,
    pub tensors: HashMap<String, Tensor>,
}

/// Read and verify a resume checkpoint. `Ok(None)` when the file does not exist.
pub fn load_resume(path: &Path) -> Result<Option<Resume>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading resume checkpoint {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: truncated or not a safetensors file ({e}); delete it or start without --from-resume 1",
            path.display()
        )
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: unreadable header ({e})", path.display()))?;
    let md = meta.metadata().clone().unwrap_or_default();
    if md.get("format").map(String::as_str) != Some(RESUME_FORMAT) {
        bail!(
            "{} is not a resume checkpoint written by `fast pretrain` (format {:?}, expected {RESUME_FORMAT:?})",
            path.display(),
            md.get("format")
        );
    }
    let (Some(state_json), Some(want)) = (md.get("state"), md.get("sha256")) else {
        bail!(
            "{}: resume checkpoint without its state or checksum",
            path.display()
        );
    };
    let mut raws = Vec::new();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            safetensors::Dtype::F32 => Kind::Float,
            safetensors::Dtype::I64 => Kind::Int64,
            other => bail!(
                "{}: tensor {name} has unexpected dtype {other:?}",
                path.display()
            ),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(
            name.clone(),
            Tensor::f_from_data_size(view.data(), &shape, kind)?,
        );
        raws.push((
            name,
            Raw {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            },
        ));
    }
    let got = checksum(state_json, &raws);
    if &got != want {
        bail!(
            "{}: checksum mismatch (stored {want}, computed {got}): the file is corrupted",
            path.display()
        );
    }
    let state: ResumeState = serde_json::from_str(state_json).with_context(|| {
        format!(
            "{}: resume state is not readable by this version",
            path.display()
        )
    })?;
    Ok(Some(Resume { state, tensors }))
}

/// Fields that must agree between the saved run and this one for a resume to continue it; the
/// error lists every difference.
pub fn check_compatible(path: &Path, saved: &RunConfig, now: &RunConfig) -> Result<()> {
    let mut diffs = Vec::new();
    macro_rules! same {
        ($($f:ident),*) => {$(
            if saved.$f != now.$f {
                diffs.push(format!("--{}: saved {:?}, now {:?}", stringify!($f).replace('_', "-"), saved.$f, now.$f));
            }
        )*};
    }
    // The model, field by field, in MiniMind's config names.
    let (a, b) = (
        serde_json::to_value(&saved.model).unwrap_or_default(),
        serde_json::to_value(&now.model).unwrap_or_default(),
    );
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, va) in a {
            if b.get(k) != Some(va) {
                diffs.push(format!(
                    "model {k}: saved {va}, now {}",
                    b.get(k).cloned().unwrap_or_default()
                ));
            }
        }
    }
    same!(
        max_seq_len,
        data_path,
        tokenizer,
        data_mode,
        max_docs,
        batch_size,
        accumulation_steps,
        epochs,
        learning_rate,
        warmup_steps,
        lr_schedule,
        objective,
        weight_decay,
        optimizer,
        seed,
        loss_normalization,
        dtype
    );
    diffs.extend(now.data_differences(saved));
    if !diffs.is_empty() {
        bail!(
            "{} was written by a different run configuration:\n  {}\n(resume with the same options, or use another --checkpoint-dir / --from-resume 0 to start over)",
            path.display(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::train::options::PretrainArgs,
    }

    fn state(cfg: &RunConfig) -> ResumeState {
        ResumeState {
            format: RESUME_FORMAT.into(),
            config: cfg.clone(),
            model_config: serde_json::json!({"hidden_size": 8, "vocab_size": 16}),
            epoch: 0,
            step: 3,
            iters: 10,
            global_step: 3,
            world_size: 1,
            trainer: serde_json::json!({"adam_t": 1, "scaler": null, "window_count": 0}),
            seed: 42,
            useful_tokens_seen: 99,
            elapsed_s: 1.5,
            metrics: Vec::new(),
            completed: false,
        }
    }

    /// The same state and tensors give the same file bytes, every time and in every process (the
    /// metadata's keys are written in one order), and the file loads back.
    #[test]
    fn a_checkpoint_of_the_same_state_has_the_same_bytes() {
        let args =
            Cli::parse_from(["x", "--data-path", "c.jsonl", "--tokenizer", "minimind2"]).args;
        let cfg = args
            .resolve(tch::Device::Cpu, || unreachable!("paths given"))
            .unwrap();
        let tensors = vec![
            ("param.a".to_string(), Tensor::from_slice(&[1.0f32, 2.0])),
            ("adam.step.a".to_string(), Tensor::from_slice(&[3.0f32])),
        ];
        let dir = tempfile::tempdir().unwrap();
        let (p1, p2) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        save_resume(&p1, &state(&cfg), &tensors).unwrap();
        save_resume(&p2, &state(&cfg), &tensors).unwrap();
        assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        let back = load_resume(&p1).unwrap().unwrap();
        assert_eq!(back.state.step, 3);
        assert!(back.tensors["param.a"].equal(&tensors[0].1));
        let w = [("model.w".to_string(), Tensor::from_slice(&[0.5f32]))];
        let (w1, w2) = (
            dir.path().join("w1.safetensors"),
            dir.path().join("w2.safetensors"),
        );
        save_weights_f16(&w1, &w, &serde_json::json!({"b": 1, "a": 2})).unwrap();
        save_weights_f16(&w2, &w, &serde_json::json!({"b": 1, "a": 2})).unwrap();
        assert_eq!(std::fs::read(&w1).unwrap(), std::fs::read(&w2).unwrap());
    }
}

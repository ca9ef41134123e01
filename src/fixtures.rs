//! Reading golden fixture folders (format: `golden/minimind/README.md`). Sizes always come
//! from the files; errors name the file and the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayD, IxDyn};
use reference::ModelConfig;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

/// Every tensor of a safetensors file: floats as f64, integers as i64.
#[derive(Debug, Default)]
pub struct Tensors {
    pub path: PathBuf,
    pub floats: BTreeMap<String, ArrayD<f64>>,
    pub ints: BTreeMap<String, ArrayD<i64>>,
}

impl Tensors {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("parsing safetensors {}", path.display()))?;
        let mut out = Tensors {
            path: path.to_path_buf(),
            ..Default::default()
        };
        for (name, view) in st.tensors() {
            let shape = IxDyn(view.shape());
            let data = view.data();
            let ctx = || format!("tensor {name} in {}", path.display());
            match view.dtype() {
                Dtype::F64 => {
                    let v = data
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()));
                    out.floats.insert(
                        name.clone(),
                        ArrayD::from_shape_vec(shape, v.collect()).with_context(ctx)?,
                    );
                }
                Dtype::F32 => {
                    let v = data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64);
                    out.floats.insert(
                        name.clone(),
                        ArrayD::from_shape_vec(shape, v.collect()).with_context(ctx)?,
                    );
                }
                Dtype::I64 => {
                    let v = data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()));
                    out.ints.insert(
                        name.clone(),
                        ArrayD::from_shape_vec(shape, v.collect()).with_context(ctx)?,
                    );
                }
                other => bail!("{}: unsupported dtype {other:?}", ctx()),
            }
        }
        Ok(out)
    }

    pub fn float(&self, name: &str) -> Result<&ArrayD<f64>> {
        self.floats
            .get(name)
            .with_context(|| format!("{}: no float tensor {name}", self.path.display()))
    }

    /// An integer [B, T] tensor (input_ids, labels).
    pub fn int2(&self, name: &str) -> Result<Array2<i64>> {
        let t = self
            .ints
            .get(name)
            .with_context(|| format!("{}: no integer tensor {name}", self.path.display()))?;
        t.clone()
            .into_dimensionality()
            .with_context(|| format!("{}: {name} is not 2-D", self.path.display()))
    }

    /// Tensors named `<prefix><name>`, keyed by `<name>` (e.g. prefix `param.`).
    pub fn group(&self, prefix: &str) -> BTreeMap<String, ArrayD<f64>> {
        self.floats
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing JSON {}", path.display()))
}

fn field<T: for<'de> Deserialize<'de>>(json: &Value, key: &str, path: &Path) -> Result<T> {
    let v = json
        .get(key)
        .with_context(|| format!("{}: missing field `{key}`", path.display()))?;
    T::deserialize(v).with_context(|| format!("{}: bad field `{key}`", path.display()))
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct AdamWJson {
    #[serde(default)]
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWJson {
    pub fn config(&self) -> reference::adamw::AdamWConfig {
        reference::adamw::AdamWConfig {
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// How a model fixture's batch is run: the objective (its JSON's `objective`, "mlm" for masked
/// LM) and, for packed rows, each row's document starts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FixtureRun {
    pub masked_lm: bool,
    /// Per row: the sorted positions where a document (segment) starts, 0 included.
    pub segments: Option<Vec<Vec<usize>>>,
}

impl FixtureRun {
    /// The reference's run options.
    pub fn reference(&self) -> reference::model::RunOptions {
        match (&self.segments, self.masked_lm) {
            (_, true) => reference::model::RunOptions::masked_lm(),
            (Some(s), false) => reference::model::RunOptions::packed(s.clone()),
            (None, false) => reference::model::RunOptions::causal(),
        }
    }

    /// The segment start of every token, row-major `[B, T]` (the fast path's `seg_start`).
    pub fn seg_start(&self, t: usize) -> Option<Vec<i32>> {
        self.segments.as_ref().map(|rows| {
            rows.iter()
                .flat_map(|starts| {
                    (0..t).map(move |i| starts[starts.partition_point(|&s| s <= i) - 1] as i32)
                })
                .collect()
        })
    }
}

/// `<name>.json` with `ce_loss` (or a masked LM's `loss`) + `<name>.safetensors`: one
/// forward/backward/step of a model.
#[derive(Debug)]
pub struct ModelFixture {
    pub name: String,
    pub config: ModelConfig,
    pub run: FixtureRun,
    pub ce_loss: f64,
    pub aux_loss: f64,
    pub total_loss: f64,
    pub grad_total_norm_before_clip: f64,
    pub clip: f64,
    pub adamw: AdamWJson,
    pub input_ids: Array2<i64>,
    pub labels: Array2<i64>,
    /// [B, T, V]
    pub logits: ArrayD<f64>,
    pub params: reference::Params,
    pub grads: reference::Params,
    pub after_step: reference::Params,
}

/// Whether `name` is a tensor of a layer of which the fixture holds no tensor at all.
fn layer_absent<'a>(name: &str, mut names: impl Iterator<Item = &'a String>) -> bool {
    let layer = |n: &str| {
        n.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .map(str::to_string)
    };
    match layer(name) {
        Some(l) => !names.any(|k| layer(k).as_deref() == Some(l.as_str())),
        None => false,
    }
}

/// The config field a mis-shaped parameter most likely points to.
fn field_behind(name: &str) -> &'static str {
    let tail = name.rsplit('.').nth(1).unwrap_or("");
    match tail {
        "q_proj" | "o_proj" => "num_attention_heads / head_dim",
        "k_proj" | "v_proj" => "num_key_value_heads / head_dim",
        "q_norm" | "k_norm" => "qk_norm / head_dim",
        "gate" => "num_experts / n_routed_experts",
        "gate_proj" | "up_proj" | "down_proj" if name.contains(".experts.") => {
            "moe_intermediate_size / num_experts"
        }
        "gate_proj" | "up_proj" | "down_proj" => "intermediate_size / architecture",
        _ => "hidden_size / vocab_size",
    }
}

/// The config's counts can size a model: the fields every shape is derived from, one sentence
/// naming the field where one cannot.
fn check_config(json: &Path, c: &ModelConfig) -> Result<()> {
    let at = json.display();
    for (field, v) in [
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("num_key_value_heads", c.num_key_value_heads),
        ("vocab_size", c.vocab_size),
    ] {
        if v == 0 {
            bail!("{at}: field config.{field} is 0; it must be at least 1");
        }
    }
    if c.num_attention_heads % c.num_key_value_heads != 0 {
        bail!(
            "{at}: field config.num_attention_heads {} is not a multiple of num_key_value_heads {}",
            c.num_attention_heads,
            c.num_key_value_heads
        );
    }
    match c.head_dim {
        Some(0) => bail!("{at}: field config.head_dim is 0; it must be at least 1"),
        None if c.hidden_size % c.num_attention_heads != 0 => bail!(
            "{at}: field config.hidden_size {} is not a multiple of num_attention_heads {} and no head_dim is given",
            c.hidden_size,
            c.num_attention_heads
        ),
        _ => {}
    }
    if c.head_dim() % 2 != 0 {
        bail!(
            "{at}: the head size {} (field config.head_dim, or hidden_size / num_attention_heads) is odd; RoPE rotates pairs",
            c.head_dim()
        );
    }
    if c.use_moe && !(1..=c.routed_experts()).contains(&c.num_experts_per_tok) {
        bail!(
            "{at}: field config.num_experts_per_tok {} must be between 1 and the {} routed experts (num_experts / n_routed_experts)",
            c.num_experts_per_tok,
            c.routed_experts()
        );
    }
    Ok(())
}

/// The fixture's parameters are exactly the ones its config describes (names and shapes): a
/// config field this harness reads differently from the code that made the fixture surfaces
/// here as one sentence, not as a shape panic inside the model.
pub fn check_params(json: &Path, config: &ModelConfig, params: &reference::Params) -> Result<()> {
    check_config(json, config)?;
    let want: BTreeMap<String, Vec<usize>> = reference::params::param_shapes(config)
        .into_iter()
        .collect();
    for (name, shape) in &want {
        match params.get(name) {
            None => bail!(
                "{}: its config describes a tensor {name} that the fixture does not hold (field {})",
                json.display(),
                if layer_absent(name, params.keys()) {
                    "num_hidden_layers"
                } else {
                    field_behind(name)
                }
            ),
            Some(a) if a.shape() != shape.as_slice() => bail!(
                "{}: its config gives {name} the shape {shape:?} but the fixture holds {:?} (field {})",
                json.display(),
                a.shape(),
                field_behind(name)
            ),
            _ => {}
        }
    }
    if let Some(extra) = params.keys().find(|n| !want.contains_key(*n)) {
        bail!(
            "{}: the fixture holds {extra}, which its config does not describe (field {})",
            json.display(),
            if layer_absent(extra, want.keys()) {
                "num_hidden_layers"
            } else {
                field_behind(extra)
            }
        );
    }
    Ok(())
}

impl ModelFixture {
    pub fn load(dir: &Path, name: &str) -> Result<Self> {
        let jp = dir.join(format!("{name}.json"));
        let json = read_json(&jp)?;
        let t = Tensors::load(&dir.join(format!("{name}.safetensors")))?;
        let config: ModelConfig = field(&json, "config", &jp)?;
        check_params(&jp, &config, &t.group("param."))?;
        let masked_lm = match json.get("objective").and_then(Value::as_str) {
            None | Some("clm") => false,
            Some("mlm") => true,
            Some(other) => bail!(
                "{}: field objective is {other:?}; this harness knows clm and mlm",
                jp.display()
            ),
        };
        // A masked-LM fixture states one `loss` (no aux: its model is dense).
        let (ce_loss, aux_loss, total_loss) = if masked_lm {
            let loss: f64 = field(&json, "loss", &jp)?;
            (loss, 0.0, loss)
        } else {
            (
                field(&json, "ce_loss", &jp)?,
                field(&json, "aux_loss", &jp)?,
                field(&json, "total_loss", &jp)?,
            )
        };
        Ok(ModelFixture {
            name: name.to_string(),
            config,
            run: FixtureRun {
                masked_lm,
                segments: None,
            },
            ce_loss,
            aux_loss,
            total_loss,
            grad_total_norm_before_clip: field(&json, "grad_total_norm_before_clip", &jp)?,
            clip: field(&json, "clip", &jp)?,
            adamw: field(&json, "adamw", &jp)?,
            input_ids: t.int2("input_ids")?,
            labels: t.int2("labels")?,
            logits: t.float("logits")?.clone(),
            params: t.group("param."),
            grads: t.group("grad."),
            after_step: t.group("after_step."),
        })
    }
}

/// One micro-step row of a trajectory.
#[derive(Debug, Clone, Deserialize)]
pub struct TrajectoryRow {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub optimizer_step: bool,
    pub grad_norm: Option<f64>,
}

/// `train_*.json` with `rows` + `.safetensors`: a short MiniMind training run.
#[derive(Debug)]
pub struct TrainFixture {
    pub name: String,
    pub config: ModelConfig,
    pub micro_steps: usize,
    pub accumulation_steps: u64,
    pub lr: f64,
    pub clip: f64,
    pub adamw: AdamWJson,
    pub rows: Vec<TrajectoryRow>,
    /// (input_ids, labels) per micro-step.
    pub batches: Vec<(Array2<i64>, Array2<i64>)>,
    pub params: reference::Params,
    pub final_params: reference::Params,
}

impl TrainFixture {
    pub fn load(dir: &Path, name: &str) -> Result<Self> {
        let jp = dir.join(format!("{name}.json"));
        let json = read_json(&jp)?;
        let t = Tensors::load(&dir.join(format!("{name}.safetensors")))?;
        let micro_steps: usize = field(&json, "micro_steps", &jp)?;
        let batches = (0..micro_steps)
            .map(|i| {
                Ok((
                    t.int2(&format!("batch{i}.input_ids"))?,
                    t.int2(&format!("batch{i}.labels"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let config: ModelConfig = field(&json, "config", &jp)?;
        check_params(&jp, &config, &t.group("param."))?;
        Ok(TrainFixture {
            name: name.to_string(),
            config,
            micro_steps,
            accumulation_steps: match field(&json, "accumulation_steps", &jp)? {
                0 => bail!(
                    "{}: field accumulation_steps is 0; it must be at least 1",
                    jp.display()
                ),
                n => n,
            },
            lr: field(&json, "lr", &jp)?,
            clip: field(&json, "clip", &jp)?,
            adamw: field(&json, "adamw", &jp)?,
            rows: field(&json, "rows", &jp)?,
            batches,
            params: t.group("param."),
            final_params: t.group("final."),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LrCase {
    pub step: u64,
    pub total: u64,
    pub lr: f64,
    pub value: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SkipBatchCase {
    pub indices: Vec<usize>,
    pub batch_size: usize,
    pub skip_batches: usize,
    pub batches: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DistributedCase {
    pub n: usize,
    pub world_size: usize,
    pub rank: usize,
    pub drop_last: bool,
    pub indices: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RescaleCase {
    pub step: u64,
    pub saved_ws: u64,
    pub current_ws: u64,
    pub value: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScalerStep {
    pub step: u64,
    /// "None", "inf", "-inf" or "nan".
    pub injected: String,
    pub scale_after_update: f64,
    pub param_changed: bool,
    pub param: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScalerCase {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    pub loss: String,
    pub trajectory: Vec<ScalerStep>,
}

#[derive(Debug, Clone, Deserialize)]
struct Cases<T> {
    cases: Vec<T>,
}

/// `components.json`.
#[derive(Debug, Clone)]
pub struct Components {
    pub lr_schedule: Vec<LrCase>,
    pub skip_batch_sampler: Vec<SkipBatchCase>,
    pub distributed_sampler_no_shuffle: Vec<DistributedCase>,
    pub world_size_step_rescale: Vec<RescaleCase>,
    pub grad_scaler: ScalerCase,
}

impl Components {
    pub fn load(path: &Path) -> Result<Self> {
        let json = read_json(path)?;
        Ok(Components {
            lr_schedule: field::<Cases<LrCase>>(&json, "lr_schedule", path)?.cases,
            skip_batch_sampler: field(&json, "skip_batch_sampler", path)?,
            distributed_sampler_no_shuffle: field(&json, "distributed_sampler_no_shuffle", path)?,
            world_size_step_rescale: field::<Cases<RescaleCase>>(
                &json,
                "world_size_step_rescale",
                path,
            )?
            .cases,
            grad_scaler: field(&json, "grad_scaler", path)?,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatasetCase {
    pub text: String,
    pub max_length: usize,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// `dataset_cases.json`.
pub fn load_dataset_cases(path: &Path) -> Result<Vec<DatasetCase>> {
    let json = read_json(path)?;
    field(&json, "cases", path)
}

/// One `linear_schedule_with_warmup` case of `components_seed004.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LinearScheduleCase {
    pub num_warmup_steps: u64,
    pub num_training_steps: u64,
    pub base_lr: f64,
    /// The lr each optimizer step k = 0, 1, ... used.
    pub lr_before_optimizer_step: Vec<f64>,
}

/// One `group_texts` case: token lists cut into rows of `block_size`.
#[derive(Debug, Clone, Deserialize)]
pub struct GroupTextsCase {
    pub token_lists: Vec<Vec<u32>>,
    pub block_size: usize,
    pub result: GroupTextsResult,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupTextsResult {
    pub input_ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
}

/// `components_seed004.json`: the textbook recipe's schedule and concat-and-chunk.
#[derive(Debug, Clone, Deserialize)]
pub struct RecipeComponents {
    pub linear_schedule_with_warmup: Vec<LinearScheduleCase>,
    pub group_texts: Vec<GroupTextsCase>,
}

impl RecipeComponents {
    pub fn load(path: &Path) -> Result<Self> {
        let json = read_json(path)?;
        Ok(RecipeComponents {
            linear_schedule_with_warmup: field(&json, "linear_schedule_with_warmup", path)?,
            group_texts: field(&json, "group_texts", path)?,
        })
    }
}

/// What a fixture folder holds, discovered by file pattern.
#[derive(Debug, Default, Clone)]
pub struct Inventory {
    /// `<name>.json` (with `config` and `ce_loss`) + `<name>.safetensors`.
    pub models: Vec<String>,
    /// `<name>.json` (with `config` and `rows`) + `<name>.safetensors`.
    pub trajectories: Vec<String>,
    pub components: Option<PathBuf>,
    /// `components_seed004.json`: the linear schedule and group_texts cases.
    pub recipe: Option<PathBuf>,
    pub dataset_cases: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// `muon_cases.json` (golden/muon).
    pub muon: Option<PathBuf>,
}

/// Lists the fixtures in `dir`, sorted by name.
pub fn discover(dir: &Path) -> Result<Inventory> {
    let mut inv = Inventory::default();
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let Some(file) = p.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        match file {
            "components.json" => inv.components = Some(p.clone()),
            "components_seed004.json" => inv.recipe = Some(p.clone()),
            "dataset_cases.json" => inv.dataset_cases = Some(p.clone()),
            "tokenizer.json" => inv.tokenizer = Some(p.clone()),
            "muon_cases.json" => inv.muon = Some(p.clone()),
            _ => {}
        }
        let Some(stem) = file.strip_suffix(".json") else {
            continue;
        };
        let json = read_json(&p)?;
        if json.get("config").is_none() {
            continue;
        }
        let model = json.get("ce_loss").is_some() || json.get("objective").is_some();
        let trajectory = json.get("rows").is_some();
        if !dir.join(format!("{stem}.safetensors")).exists() {
            if model || trajectory {
                bail!(
                    "{}: a {} fixture, but its tensors {stem}.safetensors are not beside it",
                    p.display(),
                    if model { "model" } else { "trajectory" }
                );
            }
            continue;
        }
        if model {
            inv.models.push(stem.to_string());
        } else if trajectory {
            inv.trajectories.push(stem.to_string());
        }
    }
    Ok(inv)
}

/// `torch.optim.Muon`'s options in a Muon case (golden/muon/README.md).
#[derive(Debug, Clone, Deserialize)]
pub struct MuonOptions {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub ns_coefficients: (f64, f64, f64),
    pub eps: f64,
    pub ns_steps: usize,
    /// null | "original" | "match_rms_adamw".
    pub adjust_lr_fn: Option<String>,
}

impl MuonOptions {
    /// Whether torch scaled the rate Moonshot's way (else Keller Jordan's, torch's default).
    pub fn match_rms_adamw(&self) -> Result<bool> {
        match self.adjust_lr_fn.as_deref() {
            None | Some("original") => Ok(false),
            Some("match_rms_adamw") => Ok(true),
            Some(other) => bail!("unknown adjust_lr_fn {other:?}"),
        }
    }
}

/// One step of a Muon case: the gradients set before it and torch's weights after it.
#[derive(Debug, Clone)]
pub struct MuonStep {
    pub grads: BTreeMap<String, Array2<f64>>,
    pub after: BTreeMap<String, Array2<f64>>,
}

/// One case of `muon_cases.json`: torch's Muon over a few matrices for a few steps.
#[derive(Debug, Clone)]
pub struct MuonCase {
    pub name: String,
    /// "float64" (torch with Newton-Schulz kept in float64) or "bfloat16" (stock torch).
    pub newton_schulz: String,
    pub options: MuonOptions,
    pub initial: BTreeMap<String, Array2<f64>>,
    pub steps: Vec<MuonStep>,
}

/// Every case of a `muon_cases.json`; errors name the file and the case.
pub fn load_muon_cases(path: &Path) -> Result<Vec<MuonCase>> {
    let j = read_json(path)?;
    let cases = j["cases"]
        .as_array()
        .with_context(|| format!("{}: no \"cases\" array", path.display()))?;
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c["name"].as_str().unwrap_or("?").to_string();
            parse_muon_case(c, &name)
                .with_context(|| format!("{}: case {i} ({name})", path.display()))
        })
        .collect()
}

fn parse_muon_case(c: &Value, name: &str) -> Result<MuonCase> {
    let params = c["params"].as_object().context("no \"params\" object")?;
    let shape = |k: &str| -> Result<(usize, usize)> {
        let s: Vec<usize> = serde_json::from_value(params[k]["shape"].clone())
            .with_context(|| format!("params.{k}.shape"))?;
        match s.as_slice() {
            [r, c] => Ok((*r, *c)),
            _ => bail!("params.{k}.shape {s:?} is not a matrix"),
        }
    };
    let matrices = |v: &Value, what: &str| -> Result<BTreeMap<String, Array2<f64>>> {
        let o = v
            .as_object()
            .with_context(|| format!("{what} is not an object"))?;
        o.iter()
            .map(|(k, data)| {
                let data: Vec<f64> =
                    serde_json::from_value(data.clone()).with_context(|| format!("{what}.{k}"))?;
                let m = Array2::from_shape_vec(shape(k)?, data)
                    .with_context(|| format!("{what}.{k}: length does not match its shape"))?;
                Ok((k.clone(), m))
            })
            .collect()
    };
    let initial = matrices(
        &params
            .iter()
            .map(|(k, v)| (k.clone(), v["initial"].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        "params.*.initial",
    )?;
    let steps = c["steps"]
        .as_array()
        .context("no \"steps\" array")?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(MuonStep {
                grads: matrices(&s["grads"], &format!("steps[{i}].grads"))?,
                after: matrices(&s["after"], &format!("steps[{i}].after"))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(MuonCase {
        name: name.to_string(),
        newton_schulz: c["newton_schulz"]
            .as_str()
            .context("no \"newton_schulz\"")?
            .to_string(),
        options: serde_json::from_value(c["options"].clone()).context("options")?,
        initial,
        steps,
    })
}

//! `verify`: a path (the reference, or the fast path on a device in a precision) against a golden
//! fixture folder (format: `golden/minimind/README.md`), one row per check.
//!
//! [`run`] is the one loop over what a folder holds; each path answers the same questions
//! through [`Checks`] (`reference.rs`, `fast.rs`; `pth.rs` for MiniMind's weight files).

pub mod fast;
pub mod pth;
pub mod reference;

use std::path::Path;

use anyhow::{Context, Result};

use crate::fixtures::{self, Components, ModelFixture, RecipeComponents, TrainFixture};
use crate::report::Row;

pub use self::fast::FastChecks;
pub use self::reference::ReferenceChecks;

/// Which implementation a run of `verify` checks.
pub enum Target {
    Reference,
    Fast(FastChecks),
}

impl Target {
    pub fn checks(&self) -> &dyn Checks {
        match self {
            Target::Reference => &ReferenceChecks,
            Target::Fast(f) => f,
        }
    }
}

/// The checks of one path, one method per kind of fixture.
pub trait Checks {
    /// One forward/backward/clip/AdamW step of a model fixture.
    fn model(&self, fx: &ModelFixture) -> Result<Vec<Row>>;
    /// A case made by the reference (`cases.rs`): only another implementation has anything to
    /// prove against it.
    fn reference_case(&self, _fx: &ModelFixture) -> Result<Vec<Row>> {
        Ok(Vec::new())
    }
    /// A multi-step training trajectory.
    fn trajectory(&self, fx: &TrainFixture) -> Result<Vec<Row>>;
    /// Schedule, samplers, rescale, scaler.
    fn components(&self, c: &Components) -> Result<Vec<Row>>;
    /// MiniMind's PretrainDataset encoding.
    fn dataset(&self, cases: &Path, tokenizer: &Path) -> Result<Vec<Row>>;
    /// The textbook recipe: transformers' linear schedule and group_texts.
    fn recipe(&self, c: &RecipeComponents) -> Result<Vec<Row>>;
    /// MiniMind `.pth` weight files and the logits they give.
    fn pth(&self, dir: &Path) -> Result<Vec<Row>>;
    /// torch.optim.Muon's steps (golden/muon).
    fn muon(&self, cases: &[fixtures::MuonCase]) -> Result<Vec<Row>>;
}

/// `check`'s rows, or its error, or (a fixture this harness cannot read, past every check made
/// before running it) its panic as an error naming `what`.
fn guarded(what: &str, check: impl FnOnce() -> Result<Vec<Row>>) -> Result<Vec<Row>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(r) => r.with_context(|| format!("checking {what}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            anyhow::bail!("checking {what}: the check failed inside ({msg})")
        }
    }
}

/// Every check the folder's files allow, on `target`.
pub fn run(dir: &Path, target: &Target) -> Result<Vec<Row>> {
    let checks = target.checks();
    let inv = fixtures::discover(dir)?;
    let mut rows = Vec::new();
    for name in &inv.models {
        let fx = ModelFixture::load(dir, name).with_context(|| format!("model fixture {name}"))?;
        rows.extend(guarded(name, || checks.model(&fx))?);
    }
    // The cases the reference makes run beside any folder; they are not the folder's fixtures.
    let mut made = 0;
    for fx in crate::cases::all() {
        let r = guarded(&fx.name, || checks.reference_case(&fx))?;
        made += r.len();
        rows.extend(r);
    }
    for name in &inv.trajectories {
        let fx =
            TrainFixture::load(dir, name).with_context(|| format!("trajectory fixture {name}"))?;
        rows.extend(guarded(name, || checks.trajectory(&fx))?);
    }
    if let Some(p) = &inv.components {
        let c = Components::load(p)?;
        rows.extend(guarded("components.json", || checks.components(&c))?);
    }
    if let Some(p) = &inv.recipe {
        let c = RecipeComponents::load(p)?;
        rows.extend(guarded("components_seed004.json", || checks.recipe(&c))?);
    }
    if let (Some(cases), Some(tok)) = (&inv.dataset_cases, &inv.tokenizer) {
        rows.extend(guarded("dataset_cases.json", || {
            checks.dataset(cases, tok)
        })?);
    }
    if let Some(p) = &inv.muon {
        let cases = fixtures::load_muon_cases(p)?;
        rows.extend(guarded("muon_cases.json", || checks.muon(&cases))?);
    }
    rows.extend(guarded("the .pth weight files", || checks.pth(dir))?);
    anyhow::ensure!(rows.len() > made, "{}: no fixtures found", dir.display());
    Ok(rows)
}

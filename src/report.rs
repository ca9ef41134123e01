//! Verification rows and the table `verify` prints.

use ndarray::{ArrayD, ArrayViewD};

/// One check: max abs error, max error relative to the expected tensor's largest magnitude,
/// and whether that relative error is within `tol`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub fixture: String,
    pub group: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub tol: f64,
    pub ok: bool,
}

/// (max |a - e|, max |a - e| / max |e|) over an array pair. Shapes must agree (else infinite
/// error); any NaN gives NaN errors. An all-zero expectation needs an exact match.
pub fn errors(actual: ArrayViewD<f64>, expected: ArrayViewD<f64>) -> (f64, f64) {
    if actual.shape() != expected.shape() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let mut max_abs = 0.0f64;
    let mut scale = 0.0f64;
    for (a, e) in actual.iter().zip(expected.iter()) {
        let d = (a - e).abs();
        if d.is_nan() || !a.is_finite() && a != e {
            return (f64::NAN, f64::NAN);
        }
        max_abs = max_abs.max(d);
        scale = scale.max(e.abs());
    }
    let rel = if max_abs == 0.0 { 0.0 } else { max_abs / scale };
    (max_abs, rel)
}

impl Row {
    /// Compares two arrays; passes when `max_rel <= tol` (NaN never passes).
    pub fn compare(
        fixture: &str,
        group: &str,
        actual: ArrayViewD<f64>,
        expected: ArrayViewD<f64>,
        tol: f64,
    ) -> Row {
        let (max_abs, max_rel) = errors(actual, expected);
        Row {
            fixture: fixture.to_string(),
            group: group.to_string(),
            max_abs,
            max_rel,
            tol,
            ok: max_rel <= tol,
        }
    }

    pub fn scalar(fixture: &str, group: &str, actual: f64, expected: f64, tol: f64) -> Row {
        let a = ndarray::arr0(actual).into_dyn();
        let e = ndarray::arr0(expected).into_dyn();
        Row::compare(fixture, group, a.view(), e.view(), tol)
    }

    /// An exact check of discrete outputs (indices, ids, flags): 0 or 1 mismatch.
    pub fn exact(fixture: &str, group: &str, equal: bool) -> Row {
        let err = if equal { 0.0 } else { 1.0 };
        Row {
            fixture: fixture.to_string(),
            group: group.to_string(),
            max_abs: err,
            max_rel: err,
            tol: 0.0,
            ok: equal,
        }
    }
}

/// ||a - e|| / ||e|| (0/0 = 0), and max |a - e|.
pub fn normwise(a: &ArrayD<f64>, e: &ArrayD<f64>) -> (f64, f64) {
    if a.shape() != e.shape() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(e.iter()) {
        let d = x - y;
        if !d.is_finite() {
            return (f64::NAN, f64::NAN);
        }
        num += d * d;
        den += y * y;
        max_abs = max_abs.max(d.abs());
    }
    let rel = if num == 0.0 { 0.0 } else { (num / den).sqrt() };
    (rel, max_abs)
}

/// A row with the precision's error measure.
pub fn compare(
    fixture: &str,
    group: &str,
    a: &ArrayD<f64>,
    e: &ArrayD<f64>,
    tol: f64,
    nw: bool,
) -> Row {
    if nw {
        let (rel, max_abs) = normwise(a, e);
        Row {
            fixture: fixture.into(),
            group: format!("{group} (norm)"),
            max_abs,
            max_rel: rel,
            tol,
            ok: rel <= tol,
        }
    } else {
        Row::compare(fixture, group, a.view(), e.view(), tol)
    }
}

/// Rows comparing two named tensor sets under one error measure (`nw`: norm-wise), the worst
/// row per group kept; a tensor missing on either side fails.
pub fn named_rows(
    fixture: &str,
    prefix: &str,
    actual: &reference::Params,
    expected: &reference::Params,
    tol: f64,
    nw: bool,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (name, e) in expected {
        let group = format!("{prefix}{}", group_name(name));
        match actual.get(name) {
            Some(a) => rows.push(compare(fixture, &group, a, e, tol, nw)),
            None => rows.push(Row::exact(
                fixture,
                &format!("{prefix}{name} (missing)"),
                false,
            )),
        }
    }
    for name in actual.keys().filter(|n| !expected.contains_key(*n)) {
        rows.push(Row::exact(
            fixture,
            &format!("{prefix}{name} (unexpected)"),
            false,
        ));
    }
    worst_per_group(rows)
}

/// Groups a tensor name: layer and expert indices become `*`.
/// `model.layers.1.mlp.experts.3.up_proj.weight` -> `model.layers.*.mlp.experts.*.up_proj.weight`.
pub fn group_name(name: &str) -> String {
    let mut parts: Vec<&str> = name.split('.').collect();
    for i in 1..parts.len() {
        if matches!(parts[i - 1], "layers" | "experts" | "shared_experts")
            && parts[i].chars().all(|c| c.is_ascii_digit())
        {
            parts[i] = "*";
        }
    }
    parts.join(".")
}

/// Merges rows with the same (fixture, group) into the worst one, naming how many it covers.
pub fn worst_per_group(rows: Vec<Row>) -> Vec<Row> {
    let mut out: Vec<(Row, usize)> = Vec::new();
    for r in rows {
        match out
            .iter_mut()
            .find(|(o, _)| o.fixture == r.fixture && o.group == r.group)
        {
            Some((o, n)) => {
                *n += 1;
                let worse = r.max_rel.is_nan() || r.max_rel > o.max_rel;
                let ok = o.ok && r.ok;
                if worse {
                    *o = r;
                }
                o.ok = ok;
            }
            None => out.push((r, 1)),
        }
    }
    out.into_iter()
        .map(|(mut r, n)| {
            if n > 1 {
                r.group = format!("{} (x{n})", r.group);
            }
            r
        })
        .collect()
}

/// The table: one line per row, OK / NOT OK last.
pub fn format_table(rows: &[Row]) -> String {
    let fw = rows
        .iter()
        .map(|r| r.fixture.len())
        .max()
        .unwrap_or(0)
        .max(7);
    let gw = rows.iter().map(|r| r.group.len()).max().unwrap_or(0).max(5);
    let mut s = format!(
        "{:fw$}  {:gw$}  {:>10}  {:>10}  {:>8}  result\n",
        "fixture", "check", "max abs", "max rel", "tol"
    );
    for r in rows {
        s += &format!(
            "{:fw$}  {:gw$}  {:>10.3e}  {:>10.3e}  {:>8.0e}  {}\n",
            r.fixture,
            r.group,
            r.max_abs,
            r.max_rel,
            r.tol,
            if r.ok { "OK" } else { "NOT OK" }
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    s += &format!("{} checks, {} failed\n", rows.len(), failed);
    s
}

/// The rows of the linear-schedule cases: every optimizer step's lr through `lr(k, warmup,
/// total, base)`, exact to float64 round-off (1e-13 relative: one division and one product, as
/// transformers computes it).
pub fn linear_schedule_rows(
    cases: &[crate::fixtures::LinearScheduleCase],
    lr: impl Fn(u64, u64, u64, f64) -> f64,
) -> Vec<Row> {
    let rows = cases
        .iter()
        .flat_map(|c| {
            c.lr_before_optimizer_step
                .iter()
                .enumerate()
                .map(|(k, &want)| {
                    let got = lr(
                        k as u64,
                        c.num_warmup_steps,
                        c.num_training_steps,
                        c.base_lr,
                    );
                    Row::scalar(
                        "components_seed004",
                        "linear_schedule_with_warmup",
                        got,
                        want,
                        1e-13,
                    )
                })
        })
        .collect();
    worst_per_group(rows)
}

/// One exact row for the group_texts cases: `rows(token_lists, block_size)` gives (input_ids,
/// labels) rows equal to transformers'.
pub fn group_texts_row(
    cases: &[crate::fixtures::GroupTextsCase],
    rows: impl Fn(&[Vec<u32>], usize) -> (Vec<Vec<i64>>, Vec<Vec<i64>>),
) -> Row {
    let ok = cases.iter().all(|c| {
        let (ids, labels) = rows(&c.token_lists, c.block_size);
        ids == c.result.input_ids && labels == c.result.labels
    });
    Row::exact(
        "components_seed004",
        &format!("group_texts ({} cases)", cases.len()),
        ok,
    )
}

/// Weights by name, as a Muon case holds them.
pub type Matrices = std::collections::BTreeMap<String, ndarray::Array2<f64>>;

/// One row per Muon case (golden/muon): each step taken from torch's weights before it by
/// `step(weights, grads)` (an optimizer `start(case)` built, so the momentum carries over from
/// step to step), compared with torch's step (`after - before`) relative to its largest
/// magnitude; the worst over matrices and steps, within `tol(case)`. Every step restarts from
/// torch's weights, so one step's error does not feed the next.
pub fn muon_rows<S>(
    cases: &[crate::fixtures::MuonCase],
    tol: impl Fn(&crate::fixtures::MuonCase) -> f64,
    start: impl Fn(&crate::fixtures::MuonCase) -> anyhow::Result<S>,
) -> anyhow::Result<Vec<Row>>
where
    S: FnMut(&Matrices, &Matrices) -> anyhow::Result<Matrices>,
{
    let mut rows = Vec::new();
    for case in cases {
        let mut step = start(case)?;
        let mut before = case.initial.clone();
        let mut worst = 0.0f64;
        let mut max_abs = 0.0f64;
        for s in &case.steps {
            let ours = step(&before, &s.grads)?;
            for (k, after) in &s.after {
                let theirs = after - &before[k];
                let mine = match ours.get(k) {
                    Some(m) => m - &before[k],
                    None => anyhow::bail!("{}: no weights {k} after the step", case.name),
                };
                let (abs, rel) = errors(mine.view().into_dyn(), theirs.view().into_dyn());
                worst = if rel.is_nan() {
                    f64::NAN
                } else {
                    worst.max(rel)
                };
                max_abs = max_abs.max(abs);
            }
            before = s.after.clone();
        }
        let tol = tol(case);
        rows.push(Row {
            fixture: "muon".into(),
            group: format!("{} ({} Newton-Schulz)", case.name, case.newton_schulz),
            max_abs,
            max_rel: worst,
            tol,
            ok: worst <= tol,
        });
    }
    Ok(rows)
}

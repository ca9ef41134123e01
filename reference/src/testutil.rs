//! Test-only helpers: where the golden fixtures live and how to read them.
//!
//! Fixture folders live in the project's `golden/<name>`; a missing one fails the test with its
//! path named.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::Params;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn golden(name: &str) -> PathBuf {
    let dir = workspace().join("golden").join(name);
    assert!(dir.is_dir(), "fixture folder {} not found", dir.display());
    dir
}

pub fn golden_minimind() -> PathBuf {
    golden("minimind")
}

pub fn golden_minimind3() -> PathBuf {
    golden("minimind3")
}

pub fn golden_seed004() -> PathBuf {
    golden("seed004")
}

pub fn golden_muon() -> PathBuf {
    golden("muon")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tensors of a fixture's safetensors file: float64 ones as `f64` arrays, int64 ones as
/// `[B, T]` id matrices.
pub struct Tensors {
    pub floats: Params,
    pub ints: std::collections::BTreeMap<String, Array2<i64>>,
}

impl Tensors {
    pub fn load(path: &Path) -> Tensors {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut out = Tensors {
            floats: Params::new(),
            ints: Default::default(),
        };
        for (name, t) in st.tensors() {
            let words = t.data().chunks_exact(8).map(|c| c.try_into().unwrap());
            match t.dtype() {
                Dtype::F64 => {
                    let v: Vec<f64> = words.map(f64::from_le_bytes).collect();
                    out.floats
                        .insert(name, ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap());
                }
                Dtype::I64 => {
                    let v: Vec<i64> = words.map(i64::from_le_bytes).collect();
                    let shape = (t.shape()[0], t.shape()[1]);
                    out.ints
                        .insert(name, Array2::from_shape_vec(shape, v).unwrap());
                }
                other => panic!("{name}: unexpected dtype {other:?}"),
            }
        }
        out
    }

    /// The float tensors whose names start with `prefix`, with the prefix removed.
    pub fn group(&self, prefix: &str) -> Params {
        self.floats
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }
}

/// max |a - e| / max |e| (the golden checks' error measure); shapes must agree.
pub fn rel_err(a: &ArrayD<f64>, e: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), e.shape());
    let scale = e.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(e.iter())
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    if diff == 0.0 {
        0.0
    } else {
        diff / scale
    }
}

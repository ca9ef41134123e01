//! Helpers shared by the CLI tests (`mod common;` in each).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The `fast` binary. Tests run in parallel: keep each run's libtorch to one thread.
pub fn fast() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fast"));
    c.env("OMP_NUM_THREADS", "1");
    c
}

/// Every tensor of a safetensors file as (name, bytes, shape), sorted by name.
pub fn read_tensors(path: &Path) -> Vec<(String, Vec<u8>, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec(), t.shape().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `file` under `a` and under `b` hold the same tensor names and bytes.
pub fn assert_same_tensors(a: &Path, b: &Path, files: &[&str]) {
    for file in files {
        let (ta, tb) = (read_tensors(&a.join(file)), read_tensors(&b.join(file)));
        assert_eq!(ta.len(), tb.len(), "{file}: tensor count");
        for (x, y) in ta.iter().zip(&tb) {
            assert_eq!(x.0, y.0, "{file}: tensor names");
            assert!(x.1 == y.1, "{file}: tensor {} differs", x.0);
        }
    }
}

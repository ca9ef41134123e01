//! Writing safetensors files byte-deterministically: the same tensors and metadata give the same
//! bytes in every process. (The `safetensors` crate's writer takes its metadata as a `HashMap`,
//! whose order changes from process to process, so a resumed run's checkpoint could differ
//! from an uninterrupted one's in its header alone.) Reading stays with the `safetensors` crate.
//!
//! Format: an 8-byte little-endian header length N, N bytes of JSON (`{"__metadata__": {..},
//! name: {"dtype", "shape", "data_offsets": [begin, end]}}`, keys sorted, padded with spaces so
//! the data starts 8-byte aligned), then every tensor's bytes back to back in name order.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

/// One tensor's bytes as stored.
pub struct Raw {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The safetensors dtype of a libtorch kind.
pub fn dtype_of(kind: Kind) -> Result<safetensors::Dtype> {
    Ok(match kind {
        Kind::Half => safetensors::Dtype::F16,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Float => safetensors::Dtype::F32,
        Kind::Double => safetensors::Dtype::F64,
        Kind::Int64 => safetensors::Dtype::I64,
        other => bail!("cannot store a {other:?} tensor"),
    })
}

/// A CPU copy of `t` converted to `kind`, as safetensors bytes.
pub fn raw(t: &Tensor, kind: Kind) -> Result<Raw> {
    let dtype = dtype_of(kind)?;
    let t = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(kind)
        .contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(Raw { dtype, shape, data })
}

/// `named` tensors converted to `kind`, as [`Raw`]s; errors name the tensor.
pub fn raws(named: &[(String, Tensor)], kind: Kind) -> Result<Vec<(String, Raw)>> {
    named
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                raw(t, kind).with_context(|| format!("tensor {n}"))?,
            ))
        })
        .collect()
}

fn dtype_name(d: safetensors::Dtype) -> String {
    // The format's names are the Debug names of the crate's enum (F16, BF16, F32, ...).
    format!("{d:?}")
}

/// The file's bytes: tensors in name order, metadata and header keys sorted.
pub fn serialize(
    tensors: &[(String, Raw)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut sorted: Vec<&(String, Raw)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("two tensors named {}", w[0].0);
    }
    let mut header = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, r) in &sorted {
        let n: usize = r.shape.iter().product::<usize>() * r.dtype.bitsize() / 8;
        if n != r.data.len() {
            bail!(
                "tensor {name}: {} bytes for shape {:?} of {:?}",
                r.data.len(),
                r.shape,
                r.dtype
            );
        }
        header.insert(
            name.clone(),
            json!({"dtype": dtype_name(r.dtype), "shape": r.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    // serde_json writes a Map's keys in one fixed order (sorted, or insertion order, which is
    // sorted here too).
    let mut text = serde_json::to_string(&Value::Object(header))?;
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    for (_, r) in sorted {
        out.extend_from_slice(&r.data);
    }
    Ok(out)
}

/// Named tensors (converted to `kind`) with `metadata`, as file bytes.
pub fn to_bytes(
    named: &[(String, Tensor)],
    kind: Kind,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    serialize(&raws(named, kind)?, metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Tensor)> {
        vec![
            ("b.weight".into(), Tensor::from_slice(&[1.0f32, 2.0, 3.0])),
            (
                "a.weight".into(),
                Tensor::from_slice(&[4.0f32, 5.0]).reshape([1, 2]),
            ),
        ]
    }

    /// The bytes depend only on the tensors and the metadata, and the crate reads them back.
    #[test]
    fn the_same_tensors_give_the_same_bytes_and_read_back() {
        let meta = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("config".to_string(), "{\"x\": 1}".to_string()),
        ]);
        let a = to_bytes(&sample(), Kind::Half, &meta).unwrap();
        let mut reversed = sample();
        reversed.reverse();
        let b = to_bytes(&reversed, Kind::Half, &meta).unwrap();
        assert_eq!(a, b);
        let header_len = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&a).unwrap();
        let v = st.tensor("a.weight").unwrap();
        assert_eq!(v.shape(), &[1, 2]);
        assert_eq!(v.dtype(), safetensors::Dtype::F16);
        let (_, m) = safetensors::SafeTensors::read_metadata(&a).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["config"], "{\"x\": 1}");
        let t = Tensor::f_from_data_size(st.tensor("b.weight").unwrap().data(), &[3], Kind::Half)
            .unwrap();
        assert_eq!(
            Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn two_tensors_of_one_name_are_refused() {
        let mut named = sample();
        named.push(("a.weight".into(), Tensor::from_slice(&[0.0f32])));
        let err = to_bytes(&named, Kind::Float, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("a.weight"), "{err}");
    }
}

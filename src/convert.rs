//! Between the reference's ndarrays and the fast path's tensors, and between their configs.

use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};
use tch::{Device, Kind, Tensor};

/// f64 array -> CPU f64 tensor.
pub fn to_tensor(a: &ArrayD<f64>) -> Tensor {
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    let v: Vec<f64> = a.iter().copied().collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// i64 array -> CPU int64 tensor.
pub fn to_tensor_i64(a: &ndarray::Array2<i64>) -> Tensor {
    let (b, t) = a.dim();
    let v: Vec<i64> = a.iter().copied().collect();
    Tensor::from_slice(&v).reshape([b as i64, t as i64])
}

/// Any tensor -> f64 array (copied to the CPU).
pub fn to_array(t: &Tensor) -> ArrayD<f64> {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let flat = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Double)
        .reshape([-1]);
    let v = Vec::<f64>::try_from(&flat).expect("f64 tensor to vec");
    ArrayD::from_shape_vec(IxDyn(&shape), v).expect("shape matches")
}

pub fn scalar(t: &Tensor) -> f64 {
    f64::try_from(
        t.detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .reshape([]),
    )
    .expect("scalar")
}

/// Named f64 arrays -> named CPU tensors.
pub fn to_named(p: &reference::Params) -> HashMap<String, Tensor> {
    p.iter().map(|(n, a)| (n.clone(), to_tensor(a))).collect()
}

/// Named tensors -> named f64 arrays.
pub fn from_named(v: &[(String, Tensor)]) -> reference::Params {
    v.iter().map(|(n, t)| (n.clone(), to_array(t))).collect()
}

/// The reference config as the fast crate's (same JSON fields).
pub fn fast_config(c: &reference::ModelConfig) -> fast::model::config::ModelConfig {
    serde_json::from_value(serde_json::to_value(c).expect("config to JSON"))
        .expect("config from JSON")
}

//! The harness: fixtures and verification shared by `verify`, `tests/` and `benches/`. It is the
//! only code that depends on both `reference` and `fast`.
//!
//! fixtures (reading golden folders) -> cases (fixtures the reference makes) -> verify (each path
//! checked against them, `report` rows); `convert` moves values between ndarray and libtorch.

pub mod cases;
pub mod convert;
pub mod fixtures;
pub mod report;
pub mod verify;

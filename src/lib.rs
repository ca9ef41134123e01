//! The harness: fixtures and verification shared by `verify`, `tests/` and `benches/`.

pub mod fixtures;
pub mod report;
pub mod verify_fast;
pub mod verify_pth;
pub mod verify_reference;

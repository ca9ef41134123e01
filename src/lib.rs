//! The harness: fixtures and verification shared by `verify`, `tests/` and `benches/`.

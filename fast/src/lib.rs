//! MiniMind pretraining on libtorch through `tch`: the program people train with.
//! It never calls the `reference` crate; tests compare the two.

pub mod doctor;

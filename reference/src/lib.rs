//! The oracle: every MiniMind pretraining component in plain float64 ndarray.

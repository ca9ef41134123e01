//! `fast doctor`: what libtorch this binary runs on, and what each device can do.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Devices to check: `auto` (every CUDA device, else the CPU), `cpu`, `cuda`, or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    println!("tch {} / libtorch {}", "0.24.0", libtorch_version());
    let n = tch::Cuda::device_count();
    println!("CUDA available: {} ({} device(s))", tch::Cuda::is_available(), n);
    Ok(())
}

fn libtorch_version() -> String {
    "?".into()
}

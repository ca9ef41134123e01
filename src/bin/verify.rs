//! `verify`: checks a path (reference or fast) against a golden fixture folder and prints one
//! row per check. Exits 1 if any check fails.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use harness::report::format_table;
use harness::verify::{FastChecks, Target};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PathKind {
    Reference,
    Fast,
}

#[derive(Parser, Debug)]
#[command(about = "Check the reference or fast path against golden fixtures")]
struct Args {
    /// Fixture folder (format: golden/minimind/README.md).
    #[arg(long, default_value = "golden/minimind")]
    fixtures: PathBuf,
    #[arg(long, value_enum)]
    path: PathKind,
    /// Fast path only: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Fast path only: fp32, bf16, fp16 or fp64.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Fast path only: the kernel choices (`--moe-experts loop` checks MoE's per-expert loop
    /// instead of its grouped experts).
    #[command(flatten)]
    kernels: fast::kernels::KernelConfig,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let target = match args.path {
        PathKind::Reference => Ok(Target::Reference),
        PathKind::Fast => FastChecks::new(&args.device, &args.precision)
            .map(|f| Target::Fast(f.with_kernels(args.kernels))),
    };
    let rows = target.and_then(|t| harness::verify::run(&args.fixtures, &t));
    match rows {
        Ok(rows) => {
            print!("{}", format_table(&rows));
            if rows.iter().all(|r| r.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("verify: {e:#}");
            ExitCode::FAILURE
        }
    }
}

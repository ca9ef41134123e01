use clap::{Parser, Subcommand};

/// MiniMind pretraining on libtorch.
#[derive(Parser)]
#[command(name = "fast", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print libtorch and CUDA facts and measure a bf16 matmul and causal attention per device.
    Doctor(fast::doctor::DoctorArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => fast::doctor::run(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

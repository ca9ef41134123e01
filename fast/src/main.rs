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
    Doctor(fast::commands::doctor::DoctorArgs),
    /// Pretrain a MiniMind model (MiniMind's train_pretrain.py options; no options = embedded poems).
    // A repeated option takes its last value, as with MiniMind's argparse.
    #[command(args_override_self = true)]
    Pretrain(fast::train::options::PretrainArgs),
    /// Time the training step (forward, backward, clip, optimizer step) and print one JSON line.
    Bench(fast::commands::bench::BenchArgs),
    /// Check the fused CUDA kernels against libtorch's unfused ops and time both (GPU only).
    Kernels(fast::commands::kernels::KernelsArgs),
    /// Tokenize a JSONL corpus once into the token cache pretrain, bench and eval read.
    Tokenize(fast::commands::tokenize::TokenizeArgs),
    /// Train MiniMind's byte-level BPE tokenizer on a JSONL corpus.
    TrainTokenizer(fast::commands::train_tokenizer::TrainTokenizerArgs),
    /// Check the data-parallel communicator (run under torchrun) and time a gradient all-reduce.
    DistCheck(fast::commands::dist_check::DistCheckArgs),
    /// Continue a prompt with a model (.pth or .safetensors), streaming text (KV-cached sampling).
    Generate(fast::commands::generate::GenerateArgs),
    /// Write a Hugging Face folder (config.json, model.safetensors, tokenizer) or a GGUF file from weights.
    Export(fast::commands::export::ExportArgs),
    /// Held-out loss and perplexity of a model over a JSONL (token-weighted over counted labels).
    Eval(fast::commands::eval::EvalArgs),
}

fn main() {
    // A closed output pipe (`fast ... | head`) ends the process as it ends other Unix tools,
    // by SIGPIPE, instead of a panic in the next print. A run keeps its last resume checkpoint.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => fast::commands::doctor::run(&args),
        Command::Pretrain(args) => fast::train::run(&args).map(|_| ()),
        Command::Bench(args) => fast::commands::bench::run(&args),
        Command::Kernels(args) => fast::commands::kernels::run(&args),
        Command::Tokenize(args) => fast::commands::tokenize::run(&args),
        Command::TrainTokenizer(args) => fast::commands::train_tokenizer::run(&args),
        Command::DistCheck(args) => fast::commands::dist_check::run(&args),
        Command::Generate(args) => fast::commands::generate::run(&args),
        Command::Export(args) => fast::commands::export::run(&args),
        Command::Eval(args) => fast::commands::eval::run(&args),
    };
    if let Err(err) = result {
        if let Some(stop) = err.downcast_ref::<fast::train::Interrupted>() {
            eprintln!("{stop}");
            std::process::exit(128 + stop.signal);
        }
        eprintln!("error: {err:#}");
        fast::parallel::report_failure(&format!("{err:#}"));
        std::process::exit(1);
    }
}

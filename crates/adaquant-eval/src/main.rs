//! `adaquant`: sweeps of KV-cache bit allocations, weight and activation analysis, generation, perplexity and
//! task accuracy through any cache configuration.

use clap::{Parser, Subcommand};

use adaquant_eval::cli;

#[derive(Parser)]
#[command(
    name = "adaquant",
    version,
    about = "Mixed-precision KV-cache quantization: more bits for keys, fewer for values"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a grid of cache configurations (K x V bits, layouts, budgets) against the full-precision cache;
    /// resumable and shardable. With no arguments: the paper's key points and a budget-4 allocation.
    Sweep(Box<cli::SweepArgs>),
    /// Norms and spectra of W_K/W_V and of K/V activations; writes report.json/md, plots and sensitivities.json.
    Analyze(Box<adaquant_analysis::AnalyzeArgs>),
    /// Greedy generation through any cache configuration.
    Generate(Box<adaquant_model::generate::GenerateArgs>),
    /// Perplexity (llama.cpp protocol) of one cache configuration, optionally with KL against the f32 cache.
    Ppl(Box<cli::PplArgs>),
    /// HellaSwag, ARC-Easy, LAMBADA and passkey accuracy of one cache configuration.
    EvalTasks(Box<cli::TasksArgs>),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sweep(a) => cli::sweep(&a),
        Command::Analyze(a) => adaquant_analysis::run(&a).map(|out| println!("analysis written to {}", out.display())),
        Command::Generate(a) => adaquant_model::generate::run(&a),
        Command::Ppl(a) => cli::ppl(&a),
        Command::EvalTasks(a) => cli::eval_tasks(&a),
    }
}

//! `adaquant`: sweeps of KV-cache bit allocations, weight and activation analysis, generation, perplexity and
//! task accuracy through any cache configuration.

use clap::{Parser, Subcommand};

use adaquant_eval::cli;

#[derive(Parser)]
#[command(
    name = "adaquant",
    version,
    about = "Mixed-precision KV-cache quantization: more bits for keys, fewer for values",
    after_help = format!("Run `adaquant <command> --help` for examples.\n\n{}", cli::DATA_HELP)
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How linear layers compute: `packed` (the default) keeps GGUF weights in their block formats (8-bit block
    /// activations, integer dot products, about 0.6 bytes per Q4 weight); `f32` dequantizes them at load (the
    /// reference path, and always the path of safetensors checkpoints). `bench` takes a comma-separated list
    /// (`--weights packed,f32`) and measures each in the same process.
    #[arg(long, global = true, value_enum, value_delimiter = ',', default_value = "packed")]
    weights: Vec<adaquant_model::WeightsMode>,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a grid of cache configurations (K x V bits, layouts, budgets) against the full-precision cache;
    /// resumable and shardable. With no arguments: the paper's key points and a budget-4 allocation.
    #[command(after_help = format!("{}\n\n{}", cli::SWEEP_EXAMPLES, cli::DATA_HELP))]
    Sweep(Box<cli::SweepArgs>),
    /// Norms and spectra of W_K/W_V and of K/V activations; writes report.json/md, plots and sensitivities.json.
    #[command(after_help = format!("{}\n\n{}", cli::ANALYZE_EXAMPLES, cli::DATA_HELP))]
    Analyze(Box<adaquant_analysis::AnalyzeArgs>),
    /// Greedy generation through any cache configuration; says how much of the cache was quantized.
    #[command(after_help = format!("{}\n\n{}\n\n{}", cli::GENERATE_EXAMPLES, cli::CACHE_HELP, cli::DATA_HELP))]
    Generate(Box<adaquant_model::generate::GenerateArgs>),
    /// Perplexity (llama.cpp protocol) of one cache configuration; with --kl also KL and top-1 against the f32
    /// cache.
    #[command(after_help = format!("{}\n\n{}\n\n{}", cli::PPL_EXAMPLES, cli::CACHE_HELP, cli::DATA_HELP))]
    Ppl(Box<cli::PplArgs>),
    /// HellaSwag, ARC-Easy, LAMBADA and passkey accuracy of one cache configuration.
    #[command(after_help = format!("{}\n\n{}\n\n{}", cli::TASKS_EXAMPLES, cli::CACHE_HELP, cli::DATA_HELP))]
    EvalTasks(Box<cli::TasksArgs>),
    /// Prompt and decoding speed at given cache depths, per cache configuration (after llama-bench).
    Bench(Box<adaquant_eval::bench::BenchArgs>),
}

fn main() -> anyhow::Result<()> {
    // Before anything else: the build assumes x86-64-v3, and an older CPU would otherwise die with an illegal
    // instruction.
    adaquant_kernels::baseline::exit_unless_supported("adaquant");
    let cli = Cli::parse();
    let Some(&first) = cli.weights.first() else { anyhow::bail!("--weights needs a mode: packed or f32") };
    if cli.weights.len() > 1 && !matches!(cli.command, Command::Bench(_)) {
        anyhow::bail!("only `bench` takes several --weights modes");
    }
    adaquant_model::set_default_weights_mode(first);
    // The whole command runs on a worker of the thread pool: a parallel loop started from outside the pool hands
    // its work to a worker and wakes it up, once per loop (hundreds of times per decoded token), and the idle
    // main thread made one thread more than `--threads`.
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Command::Bench(a) = &cli.command {
        match a.threads {
            Some(0) => anyhow::bail!("--threads must be at least 1"),
            Some(t) => pool = pool.num_threads(t),
            None => {}
        }
    }
    let pool = pool.build()?;
    pool.install(|| match cli.command {
        Command::Sweep(a) => cli::sweep(&a),
        Command::Analyze(a) => adaquant_analysis::run(&a).map(|out| println!("analysis written to {}", out.display())),
        Command::Generate(a) => adaquant_model::generate::run(&a),
        Command::Ppl(a) => cli::ppl(&a),
        Command::EvalTasks(a) => cli::eval_tasks(&a),
        Command::Bench(a) => adaquant_eval::bench::run_modes(&a, &cli.weights),
    })
}

//! `cargo xtask`: the project's task runner.
//!
//! It stays thin: `sweep`, `analyze` and `generate` build and run the release `adaquant` binary (crate
//! `adaquant-eval`) rather than linking it, `bench` runs the criterion benchmarks, `fetch` obtains the models and
//! datasets listed in `data/manifest.json`, `ci` runs the checks CI runs, and `gpu-check` prepares and runs the GPU
//! test-and-benchmark bundle.

mod fetch;
mod gpu_check;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "adaquant task runner", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a bit-allocation sweep (the main job). Fetches missing data first. All arguments go to `adaquant sweep`;
    /// see `cargo xtask sweep --help`.
    #[command(disable_help_flag = true)]
    Sweep {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write the norm/SVD report of a model. Fetches missing data first. Arguments go to `adaquant analyze`.
    #[command(disable_help_flag = true)]
    Analyze {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Generate text with the model through a (quantized) cache. Arguments go to `adaquant generate`.
    #[command(disable_help_flag = true)]
    Generate {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the criterion benchmarks (`benches/`). Extra arguments go to criterion (e.g. a name filter).
    Bench {
        /// Only this bench target (kernels, cache).
        #[arg(long)]
        bench: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Obtain the models and datasets of data/manifest.json into data/ (or $ADAQUANT_DATA), verifying sha256.
    Fetch(fetch::FetchArgs),
    /// Run the CI checks, cheapest first: fmt, clippy, tests, benches compile.
    Ci,
    /// Build the CUDA test and benchmark binaries here and run them on a GPU machine (see docs/CUDA.md).
    #[command(name = "gpu-check", disable_help_flag = true)]
    GpuCheck {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the root").to_path_buf()
}

/// Runs a command from the repository root, failing with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    eprintln!("$ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo run --release -p adaquant-eval --bin adaquant -- <sub> <args>`.
fn adaquant(sub: &str, args: &[String]) -> Result<()> {
    let mut c = cargo();
    c.args(["run", "--release", "--quiet", "-p", "adaquant-eval", "--bin", "adaquant", "--", sub]).args(args);
    run(&mut c)
}

fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "--help" || a == "-h")
}

fn main() -> Result<()> {
    // xtask is built with the workspace's flags too (x86-64-v3): stop with a message, not an illegal instruction.
    adaquant_kernels::baseline::exit_unless_supported("cargo xtask");
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Sweep { args } => {
            if !wants_help(&args) {
                fetch::ensure_default(&args)?;
            }
            adaquant("sweep", &args)
        }
        Cmd::Analyze { args } => {
            if !wants_help(&args) {
                fetch::ensure_default(&args)?;
            }
            adaquant("analyze", &args)
        }
        Cmd::Generate { args } => {
            if !wants_help(&args) {
                fetch::ensure_default(&args)?;
            }
            adaquant("generate", &args)
        }
        Cmd::Bench { bench, args } => {
            let mut c = cargo();
            c.args(["bench", "-p", "adaquant-benches"]);
            if let Some(b) = bench {
                c.args(["--bench", &b]);
            }
            c.arg("--").args(args);
            run(&mut c)
        }
        Cmd::Fetch(a) => fetch::fetch(&a),
        Cmd::Ci => {
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
            run(cargo().args(["test", "--workspace"]))?;
            run(cargo().args(["bench", "--workspace", "--no-run"]))
        }
        Cmd::GpuCheck { args } => gpu_check::run(&args),
    }
}

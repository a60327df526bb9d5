//! Runs the analysis from the command line without the `adaquant` binary:
//! `cargo run --release -p adaquant-analysis --example analyze -- --tokens 2048`.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: adaquant_analysis::AnalyzeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = adaquant_analysis::run(&cli.args)?;
    println!("analysis written to {}", out.display());
    Ok(())
}

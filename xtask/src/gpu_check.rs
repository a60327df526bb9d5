//! GPU check bundle (see docs/CUDA.md).

/// Builds and runs the GPU checks.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the GPU check bundle is not built yet")
}

//! `cargo xtask`: the project's own build, lab and CI tasks.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("no tasks yet")
}

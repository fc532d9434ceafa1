//! `reap --dead`: removes what runs whose owner process is gone left on this machine (a killed
//! `cargo xtask test`, a bench stopped by `timeout -s KILL`), and says what.
//! `reap --run PREFIX`: removes everything of run PREFIX (xtask's safety net after a harness).

use anyhow::{bail, Result};
use tests::teardown;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--dead"] => {
            let runs = teardown::remove_dead_runs();
            if runs.is_empty() {
                println!("  no leftovers of dead runs");
            }
            for (run, removed) in runs {
                println!(
                    "  removed {} leftovers of dead run {run}: {}",
                    removed.len(),
                    removed.join(", ")
                );
            }
        }
        ["--run", prefix] => {
            let removed = teardown::remove_run(prefix);
            if !removed.is_empty() {
                println!(
                    "  removed {} leftovers of run {prefix}: {}",
                    removed.len(),
                    removed.join(", ")
                );
            }
        }
        _ => bail!("usage: reap --dead | reap --run PREFIX"),
    }
    Ok(())
}

//! Run last by `cargo xtask test`: nothing the suite made may be left behind. Leftovers of
//! other runs are named, not failed on.

#[test]
fn the_suite_left_nothing_behind() -> anyhow::Result<()> {
    let prefix = std::env::var(tests::names::RUN_ENV).map_err(|_| {
        anyhow::anyhow!(
            "{} is not set: run the suites through `cargo xtask test`",
            tests::names::RUN_ENV
        )
    })?;
    let found = tests::leaks::check(&prefix)?;
    if !found.others.is_empty() {
        println!(
            "not this run's (not failed on):\n  {}",
            found.others.join("\n  ")
        );
    }
    assert!(
        found.own.is_empty(),
        "leaked by run {prefix}:\n{}",
        found.own.join("\n")
    );
    Ok(())
}

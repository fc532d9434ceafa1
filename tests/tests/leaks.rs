//! Run last by `cargo xtask test`: nothing the suite made may be left behind.

#[test]
fn the_suite_left_nothing_behind() -> anyhow::Result<()> {
    let prefix = std::env::var(tests::names::RUN_ENV).map_err(|_| {
        anyhow::anyhow!(
            "{} is not set: run the suites through `cargo xtask test`",
            tests::names::RUN_ENV
        )
    })?;
    let left = tests::leaks::leftovers(&prefix)?;
    assert!(
        left.is_empty(),
        "leaked by run {prefix}:\n{}",
        left.join("\n")
    );
    Ok(())
}

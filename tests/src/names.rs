//! Unique names for everything a run creates, so runs never collide and leaks are findable.

use std::sync::atomic::{AtomicU32, Ordering};

/// Environment variable carrying the run prefix from `cargo xtask test` to every test binary.
pub const RUN_ENV: &str = "PIA_RUN";

/// Prefix of every name this run creates (netns, cgroups, temp dirs): `$PIA_RUN`, or one
/// derived from the process id when a test binary runs on its own.
pub fn run_prefix() -> String {
    std::env::var(RUN_ENV).unwrap_or_else(|_| format!("pia{}", std::process::id()))
}

/// A fresh name within this run: `<prefix>-<n>`.
pub fn unique() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", run_prefix(), NEXT.fetch_add(1, Ordering::Relaxed))
}

//! Waits scaled for slow machines: the kernel matrix's VMs run under TCG, many times slower
//! than the host, and a start-up or a first request that takes 3 s here may take 30 s there
//! when the host is busy. The scale stretches how long a test waits, never what it asserts.

use std::time::Duration;

/// `limit` times `PIA_WAIT_SCALE` (a whole number from the environment; 1 when unset or
/// unreadable).
pub fn scaled(limit: Duration) -> Duration {
    limit * factor()
}

fn factor() -> u32 {
    std::env::var("PIA_WAIT_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|f| *f >= 1)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_stretches_waits_and_ignores_nonsense() {
        // One process-wide variable: set and read in one test.
        std::env::set_var("PIA_WAIT_SCALE", "3");
        assert_eq!(scaled(Duration::from_secs(20)), Duration::from_secs(60));
        for bad in ["0", "-1", "fast", ""] {
            std::env::set_var("PIA_WAIT_SCALE", bad);
            assert_eq!(scaled(Duration::from_secs(20)), Duration::from_secs(20));
        }
        std::env::remove_var("PIA_WAIT_SCALE");
        assert_eq!(scaled(Duration::from_secs(20)), Duration::from_secs(20));
    }
}

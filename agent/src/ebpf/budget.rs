//! The per-pod limits the connect hooks enforce (a connect budget and a cap on open
//! connections): their kernel settings, the pods the kernel tracks, and the removal of pods
//! that are gone.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use agent_common::BudgetConfig;

use crate::cgroup::QOS_CLASSES;

/// Connects per second and burst each pod may make to the credential addresses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectBudget {
    /// Sustained connects per second (> 0).
    pub rate: f64,
    /// Connects a pod may make at once after being idle (>= 1).
    pub burst: f64,
}

/// What the connect hooks limit per pod.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodLimits {
    /// Connect rate and burst; `None`: no budget.
    pub budget: Option<ConnectBudget>,
    /// Most connections a pod may hold open to the credential addresses; 0: no cap.
    pub max_connections: u64,
}

impl PodLimits {
    /// The kernel's form for pods under `pods_root` (its cgroup id) and its QoS cgroups.
    pub fn to_kernel(self, pods_root: u64, qos: [u64; 2]) -> BudgetConfig {
        let base = match self.budget {
            Some(b) => b.to_kernel(pods_root, qos),
            None => BudgetConfig {
                pods_root,
                qos,
                ..BudgetConfig::default()
            },
        };
        BudgetConfig {
            max_connections: self.max_connections,
            ..base
        }
    }
}

impl ConnectBudget {
    /// The kernel's form for pods under `pods_root` (its cgroup id) and its QoS cgroups.
    pub fn to_kernel(self, pods_root: u64, qos: [u64; 2]) -> BudgetConfig {
        let interval_ns = (1e9 / self.rate).round().max(1.0) as u64;
        BudgetConfig {
            pods_root,
            qos,
            interval_ns,
            tolerance_ns: ((self.burst - 1.0).max(0.0) * interval_ns as f64).round() as u64,
            max_connections: 0,
        }
    }
}

/// The cgroup id of a directory (its inode in cgroup2fs); 0 when it does not exist.
pub fn cgroup_id(dir: &Path) -> u64 {
    std::fs::metadata(dir).map_or(0, |m| m.ino())
}

/// Ids of the QoS-class cgroups under `pods_root` (0 for one not made yet).
pub fn qos_ids(pods_root: &Path) -> [u64; 2] {
    QOS_CLASSES.map(|names| {
        names
            .iter()
            .map(|n| cgroup_id(&pods_root.join(n)))
            .find(|&id| id != 0)
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// The kernel's settings for `rate` and `burst`.
    fn kernel(rate: f64, burst: f64) -> BudgetConfig {
        ConnectBudget { rate, burst }.to_kernel(1, [0; 2])
    }

    /// Runs `attempts` connects at `at` (ns) and returns how many were admitted.
    fn burst(cfg: &BudgetConfig, tat: &mut u64, at: u64, attempts: u32) -> u32 {
        let mut admitted = 0;
        for _ in 0..attempts {
            if let Some(next) = cfg.admit(*tat, at) {
                *tat = next;
                admitted += 1;
            }
        }
        admitted
    }

    #[test]
    fn a_fresh_pod_gets_its_burst_then_its_rate() {
        let cfg = kernel(10.0, 5.0);
        assert_eq!(
            (cfg.interval_ns, cfg.tolerance_ns),
            (SEC / 10, 4 * SEC / 10)
        );
        let t0 = 1_000 * SEC;
        let mut tat = 0;
        assert_eq!(burst(&cfg, &mut tat, t0, 50), 5, "the burst, then nothing");
        // The clock stands still: still nothing.
        assert_eq!(burst(&cfg, &mut tat, t0, 10), 0);
        // One interval later: exactly one more.
        assert_eq!(burst(&cfg, &mut tat, t0 + SEC / 10, 10), 1);
        // Just short of the next interval: none.
        assert_eq!(burst(&cfg, &mut tat, t0 + 2 * SEC / 10 - 1, 10), 0);
        // Idle for a minute: the bucket holds the burst again, not more.
        assert_eq!(burst(&cfg, &mut tat, t0 + 60 * SEC, 50), 5);
    }

    #[test]
    fn sustained_admissions_follow_the_rate() {
        let cfg = kernel(100.0, 200.0);
        let mut tat = 0;
        let t0 = 5 * SEC;
        // 1,000 attempts per second for 10 s, 1 ms apart.
        let admitted: u32 = (0..10_000)
            .map(|i| burst(&cfg, &mut tat, t0 + i * SEC / 1000, 1))
            .sum();
        // burst + rate × elapsed (9.999 s), give or take the one in flight.
        assert!((1_198..=1_201).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_cold_start_of_ten_concurrent_connects_fits_the_default_budget() {
        let cfg = kernel(100.0, 200.0);
        let mut tat = 0;
        // Ten concurrent requests, each retried three times at once (the worst SDK retry).
        assert_eq!(burst(&cfg, &mut tat, SEC, 40), 40);
    }

    #[test]
    fn fractional_rates_and_a_burst_of_one() {
        let cfg = kernel(0.5, 1.0);
        assert_eq!((cfg.interval_ns, cfg.tolerance_ns), (2 * SEC, 0));
        let mut tat = 0;
        assert_eq!(burst(&cfg, &mut tat, 10 * SEC, 3), 1);
        assert_eq!(burst(&cfg, &mut tat, 11 * SEC, 3), 0);
        assert_eq!(burst(&cfg, &mut tat, 12 * SEC, 3), 1);
    }

    #[test]
    fn no_overflow_at_the_ends_of_the_clock() {
        let cfg = kernel(1.0, 3.0);
        let mut tat = u64::MAX - 10;
        assert_eq!(burst(&cfg, &mut tat, u64::MAX - 5, 3), 3);
        assert_eq!(tat, u64::MAX, "saturates, never wraps to admit forever");
    }

    #[test]
    fn pod_level_cgroups_lists_pods_and_qos_classes() {
        let dir = std::env::temp_dir().join(format!("budget-walk-{}", std::process::id()));
        let pod = dir.join("besteffort/podA");
        let guaranteed = dir.join("podB");
        std::fs::create_dir_all(pod.join("ctr")).unwrap();
        std::fs::create_dir_all(&guaranteed).unwrap();
        let found = crate::cgroup::pod_level(&dir);
        let qos = qos_ids(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let mut paths: Vec<_> = found.values().cloned().collect();
        paths.sort();
        assert_eq!(paths, [dir.join("besteffort"), pod, guaranteed]);
        assert_ne!(qos[0], 0);
        assert_eq!(qos[1], 0, "no burstable cgroup made");
    }
}

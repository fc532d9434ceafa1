//! A kubelet-shaped cgroup v2 subtree made by the test, torn down (processes killed) on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How the kubelet names pod cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods/<qos>/pod<uid>/<container-id>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`.
    Systemd,
}

/// The cgroup2 mount point (the agent's own discovery, from /proc/self/mountinfo).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = agent::cgroup::cgroup2_mounts()?;
    mounts.into_iter().next().context("no cgroup2 mount")
}

/// Every cgroup v1 hierarchy's mount point (a real runtime makes each container's cgroup in
/// all of them, beside the unified one).
pub fn v1_mounts() -> Vec<PathBuf> {
    procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map(|m| {
            m.0.into_iter()
                .filter(|m| m.fs_type == "cgroup")
                .map(|m| m.mount_point)
                .collect()
        })
        .unwrap_or_default()
}

/// `<cgroup2>/<name>/kubepods[.slice]`, owned by the test.
#[derive(Debug)]
pub struct CgroupTree {
    base: PathBuf,
    pods_root: PathBuf,
    driver: Driver,
}

impl CgroupTree {
    /// Creates the tree's base and its pods cgroup.
    pub fn create(name: &str, driver: Driver) -> Result<Self> {
        crate::teardown::check_not_stopping()?;
        let base = cgroup2_mount()?.join(name);
        let pods_root = base.join(match driver {
            Driver::Cgroupfs => "kubepods",
            Driver::Systemd => "kubepods.slice",
        });
        // The kubelet makes its QoS cgroups when it starts, before any pod.
        let qos = match driver {
            Driver::Cgroupfs => ["besteffort", "burstable"],
            Driver::Systemd => ["kubepods-besteffort.slice", "kubepods-burstable.slice"],
        };
        for dir in qos.map(|q| pods_root.join(q)) {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Self {
            base,
            pods_root,
            driver,
        })
    }

    /// The pods cgroup, where the agent attaches.
    pub fn pods_root(&self) -> &Path {
        &self.pods_root
    }

    /// The naming driver.
    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// A directory directly under the base, outside the pods cgroup (node daemons live there).
    pub fn outside_pods(&self, name: &str) -> Result<PathBuf> {
        let dir = self.base.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Creates the cgroup of one container of a best-effort pod.
    pub fn container(&self, pod_uid: &str, container_id: &str) -> Result<PathBuf> {
        crate::teardown::check_not_stopping()?;
        let dir = match self.driver {
            Driver::Cgroupfs => self
                .pods_root
                .join("besteffort")
                .join(format!("pod{pod_uid}"))
                .join(container_id),
            Driver::Systemd => {
                let uid = pod_uid.replace('-', "_");
                self.pods_root
                    .join("kubepods-besteffort.slice")
                    .join(format!("kubepods-besteffort-pod{uid}.slice"))
                    .join(format!("cri-containerd-{container_id}.scope"))
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        remove_tree(&self.base);
    }
}

/// Kills every process in `dir`'s subtree, then removes the directories bottom-up.
pub fn remove_tree(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dirs = subdirs_deepest_first(dir);
        let mut busy = false;
        for d in &dirs {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                    busy = true;
                    // SAFETY: sending a signal to a process of our own test cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if !busy {
            for d in &dirs {
                let _ = std::fs::remove_dir(d);
            }
            if !dir.exists() || Instant::now() > deadline {
                return;
            }
        }
        if Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        out.push(d);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

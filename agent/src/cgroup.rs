//! cgroup v2 facts: where the hierarchy is mounted, where the kubelet keeps its pods,
//! which directory a cgroup id names, and which pod a cgroup path belongs to.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a cgroup could not be found or resolved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// /proc/self/mountinfo could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[from] procfs::ProcError),
    /// No cgroup2 file system is mounted.
    #[error("no cgroup2 file system is mounted (cgroup v2 is required for eBPF attribution)")]
    NoCgroup2,
    /// Neither kubepods.slice nor kubepods exists under the cgroup2 mount.
    #[error(
        "no kubelet pods cgroup (kubepods.slice or kubepods) under {mount}; \
         pass --cgroup-root, or --no-ebpf (refusing to attach to the root cgroup)"
    )]
    NoPodsCgroup {
        /// The cgroup2 mount that was searched.
        mount: PathBuf,
    },
}

/// Every cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>, CgroupError> {
    let infos = procfs::process::Process::myself()?.mountinfo()?;
    let mounts: Vec<PathBuf> = infos
        .0
        .into_iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .collect();
    if mounts.is_empty() {
        return Err(CgroupError::NoCgroup2);
    }
    Ok(mounts)
}

/// The kubelet's pods cgroup (systemd or cgroupfs driver) under a cgroup2 mount. In a
/// container the first cgroup2 mount may be its own namespaced one; the host's tree mounted
/// beside it is the one that holds the pods.
pub fn default_pods_root() -> Result<PathBuf, CgroupError> {
    let mounts = cgroup2_mounts()?;
    mounts
        .iter()
        .flat_map(|m| ["kubepods.slice", "kubepods"].map(|name| m.join(name)))
        .find(|p| p.is_dir())
        .ok_or_else(|| CgroupError::NoPodsCgroup {
            mount: mounts[0].clone(),
        })
}

/// Finds the directory under `root` whose inode is `id` (a cgroup id is its directory's
/// inode number in cgroup2fs). `None` when it no longer exists.
pub fn find_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        stack.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

/// The pod UID named by a kubelet cgroup path, per docs/protocol.md §4: the last component
/// that names a pod, in cgroupfs (`pod<uid>`) or systemd (`kubepods-<qos>-pod<uid_>.slice`) form.
pub fn pod_uid_from_path(path: &Path) -> Option<String> {
    path.components().rev().find_map(|c| {
        let name = c.as_os_str().to_str()?;
        let name = name.strip_suffix(".slice").unwrap_or(name);
        // systemd: kubepods-pod<uid>, kubepods-<qos>-pod<uid>
        let pod = name.rsplit_once("-pod").map_or(name, |(_, uid)| uid);
        let uid = if pod.len() < name.len() {
            pod
        } else {
            name.strip_prefix("pod")?
        };
        let uid = uid.replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

/// A Kubernetes UID: 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn pod_uid_from_kubelet_paths() {
        let u = UID.replace('-', "_");
        let cases = [
            format!("/kubepods/besteffort/pod{UID}/abc123"),
            format!("/kubepods/pod{UID}/abc123"),
            format!("/kubepods/burstable/pod{UID}/abc123/nested/deeper"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-abc.scope"),
            format!("/kubepods.slice/kubepods-pod{u}.slice/crio-abc.scope"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-abc.scope/sub"),
            format!("/sys/fs/cgroup/kubepods.slice/kubepods-pod{u}.slice"),
        ];
        for c in cases {
            assert_eq!(
                pod_uid_from_path(Path::new(&c)).as_deref(),
                Some(UID),
                "{c}"
            );
        }
        for not_pod in [
            "/kubepods/besteffort",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/system.slice/containerd.service",
            "/kubepods/podnotauid/abc",
            "/",
        ] {
            assert_eq!(pod_uid_from_path(Path::new(not_pod)), None, "{not_pod}");
        }
    }

    #[test]
    fn finds_a_directory_by_inode() {
        let tmp = std::env::temp_dir().join(format!("cg-find-{}", std::process::id()));
        let deep = tmp.join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        let ino = std::fs::metadata(&deep).unwrap().ino();
        assert_eq!(find_by_id(&tmp, ino), Some(deep));
        assert_eq!(find_by_id(&tmp, 1), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

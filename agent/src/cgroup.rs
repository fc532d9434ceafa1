//! cgroup v2 facts: where the hierarchy is mounted, where the kubelet keeps its pods,
//! which directory a cgroup id names, and which pod a cgroup path belongs to.

use std::collections::HashMap;
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

/// QoS-class cgroups the kubelet makes under the pods cgroup (cgroupfs and systemd names).
pub const QOS_CLASSES: [[&str; 2]; 2] = [
    ["besteffort", "kubepods-besteffort.slice"],
    ["burstable", "kubepods-burstable.slice"],
];

/// Whether `name` is a QoS-class cgroup's.
fn is_qos(name: &std::ffi::OsStr) -> bool {
    QOS_CLASSES.iter().flatten().any(|q| name == *q)
}

/// Whether `path` sits where the kubelet puts a pod: directly under `pods_root`, or under
/// one of its QoS cgroups. What a container nests below its own cgroup never does.
pub fn at_pod_position(pods_root: &Path, path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    parent == pods_root
        || (parent.parent() == Some(pods_root) && parent.file_name().is_some_and(is_qos))
}

/// Every cgroup at a pod's position under `pods_root` (its children, and the children of its
/// QoS cgroups; the QoS cgroups themselves included), by id (a cgroup id is its directory's
/// inode number in cgroup2fs). Nothing a container nests below itself. A node has at most a
/// few hundred pods: the walk is a few hundred stats.
pub fn pod_level(pods_root: &Path) -> HashMap<u64, PathBuf> {
    let subdirs = |dir: &Path| -> Vec<(u64, PathBuf)> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| Some((e.metadata().ok()?.ino(), e.path())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut found = HashMap::new();
    for (id, dir) in subdirs(pods_root) {
        if dir.file_name().is_some_and(is_qos) {
            found.extend(subdirs(&dir));
        }
        found.insert(id, dir);
    }
    found
}

/// The directory at a pod's position under `pods_root` whose id is `id`; `None` when there
/// is none (gone, or not a pod-level cgroup).
pub fn find_pod_level(pods_root: &Path, id: u64) -> Option<PathBuf> {
    pod_level(pods_root).remove(&id)
}

/// The pod UID a pod-level cgroup's own name carries, per docs/protocol.md §4: cgroupfs
/// (`pod<uid>`) or systemd (`kubepods-<qos>-pod<uid_>.slice`, `kubepods-pod<uid_>.slice`).
/// Only that one name counts: a name deeper in a path is a container's to choose.
pub fn pod_uid_from_name(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let uid = match name.rsplit_once("-pod") {
        Some((prefix, uid)) if prefix.starts_with("kubepods") => uid,
        Some(_) => return None,
        None => name.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
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
    fn pod_uid_from_kubelet_names() {
        let u = UID.replace('-', "_");
        for name in [
            format!("pod{UID}"),
            format!("kubepods-burstable-pod{u}.slice"),
            format!("kubepods-besteffort-pod{u}.slice"),
            format!("kubepods-pod{u}.slice"),
        ] {
            assert_eq!(pod_uid_from_name(&name).as_deref(), Some(UID), "{name}");
        }
        for not_pod in [
            "besteffort".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            "containerd.service".to_owned(),
            "podnotauid".to_owned(),
            format!("cri-containerd-pod{u}.scope"),
            format!("x-pod{u}.slice"),
            String::new(),
        ] {
            assert_eq!(pod_uid_from_name(&not_pod), None, "{not_pod}");
        }
    }

    #[test]
    fn the_pod_position_is_a_child_of_the_root_or_of_a_qos_cgroup() {
        let root = Path::new("/sys/fs/cgroup/kubepods.slice");
        for (path, at) in [
            ("/sys/fs/cgroup/kubepods.slice/kubepods-podX.slice", true),
            (
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/p",
                true,
            ),
            ("/sys/fs/cgroup/kubepods.slice/besteffort/p", true),
            (
                "/sys/fs/cgroup/kubepods.slice/kubepods-podX.slice/ctr",
                false,
            ),
            ("/sys/fs/cgroup/kubepods.slice/other/p", false),
            ("/sys/fs/cgroup/kubepods.slice", false),
            ("/elsewhere/p", false),
        ] {
            assert_eq!(at_pod_position(root, Path::new(path)), at, "{path}");
        }
    }

    #[test]
    fn finds_a_pod_level_directory_by_inode_and_nothing_deeper() {
        let tmp = std::env::temp_dir().join(format!("cg-find-{}", std::process::id()));
        let pod = tmp.join("besteffort/podA");
        let deep = pod.join("ctr/nested");
        std::fs::create_dir_all(&deep).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(find_pod_level(&tmp, ino(&pod)), Some(pod.clone()));
        assert_eq!(find_pod_level(&tmp, ino(&deep)), None);
        assert_eq!(find_pod_level(&tmp, ino(&pod.join("ctr"))), None);
        assert_eq!(find_pod_level(&tmp, 1), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

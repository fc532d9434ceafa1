//! Who is calling: the kernel's cgroup id for a connection, resolved to a cgroup path and a pod.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup;

/// The caller of one connection, as far as the kernel vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Arrived on a plain listener from this address: no hook ran, nothing else is known.
    Plain(std::net::IpAddr),
    /// Arrived on the attributed listener and the kernel recorded the connecting cgroup.
    Attributed(u64),
    /// Arrived on the attributed listener without a kernel record: refused, never guessed.
    Unattributed,
}

impl Caller {
    /// The listener kind the connection arrived on, for logs and metrics.
    pub fn listener(&self) -> &'static str {
        match self {
            Caller::Plain(_) => "plain",
            Caller::Attributed(_) | Caller::Unattributed => "attributed",
        }
    }

    /// The kernel-recorded cgroup id, if any.
    pub fn cgroup_id(&self) -> Option<u64> {
        match self {
            Caller::Attributed(id) => Some(*id),
            _ => None,
        }
    }
}

/// What the kernel's attribution says about a request's caller, checked against its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The caller's pod is the pod the token names.
    Attributed,
    /// The caller's pod is not the pod the token names (a replayed token).
    Mismatch,
    /// No kernel record for the connection.
    Unattributed,
    /// The caller's cgroup is not a pod's.
    NotAPod,
}

impl Outcome {
    /// Every outcome (their series are exported from the start, at 0).
    pub const ALL: [Outcome; 4] = [
        Outcome::Attributed,
        Outcome::Mismatch,
        Outcome::Unattributed,
        Outcome::NotAPod,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Attributed => "attributed",
            Outcome::Mismatch => "mismatch",
            Outcome::Unattributed => "unattributed",
            Outcome::NotAPod => "not_a_pod",
        }
    }
}

/// What to do with callers on the plain listener, which no hook vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnattributedPolicy {
    /// Serve them, checking only the token (the reference agent's behaviour).
    Allow,
    /// Refuse them with 403.
    Deny,
}

/// A resolved caller cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The cgroup directory.
    pub path: Arc<Path>,
    /// The pod UID in the path, when the cgroup belongs to a pod.
    pub pod_uid: Option<Arc<str>>,
}

/// Who a request is from once the kernel's word is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A pod the kernel attributed the connection to.
    Pod {
        /// Its UID (from its cgroup path).
        uid: Arc<str>,
        /// The calling container's cgroup directory.
        cgroup: Arc<Path>,
    },
    /// A plain-listener caller the policy allows, known only by its address.
    Peer(std::net::IpAddr),
}

impl PodCgroup {
    /// The pod identity this cgroup proves, if it is a pod's.
    pub fn identity(&self) -> Option<Identity> {
        Some(Identity::Pod {
            uid: self.pod_uid.clone()?,
            cgroup: self.path.clone(),
        })
    }
}

/// How long a resolution is trusted before the cgroup's existence is checked again.
const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// Most cgroup ids remembered; a node runs at most a few hundred pods' containers.
const CACHE_LIMIT: usize = 16_384;

/// Resolves cgroup ids under the attach root, caching the answers.
#[derive(Debug)]
pub struct Resolver {
    root: PathBuf,
    /// id → (resolution, when it was last checked against the file system).
    cache: Mutex<HashMap<u64, (Arc<PodCgroup>, Instant)>>,
}

impl Resolver {
    /// A resolver for cgroups below `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers the cgroup at `path` before anyone connects from it (pre-warm sees containers
    /// appear), so a new container's first request does not walk the cgroup tree.
    pub fn learn(&self, path: &Path) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let resolved = Arc::new(PodCgroup {
            pod_uid: cgroup::pod_uid_from_path(path).map(Arc::from),
            path: Arc::from(path),
        });
        self.remember(meta.ino(), resolved);
    }

    fn remember(&self, id: u64, resolved: Arc<PodCgroup>) {
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(id, (resolved, Instant::now()));
    }

    /// The cgroup `id` names, if it still exists below the root. cgroup2 ids are never reused
    /// while the system runs, so a cached answer can be stale (cgroup gone) but never wrong.
    pub fn resolve(&self, id: u64) -> Option<Arc<PodCgroup>> {
        let hit = self.cache.lock().expect("not poisoned").get(&id).cloned();
        if let Some((hit, checked)) = hit {
            // A removed cgroup must stop resolving; checking costs a path walk, so at most
            // once per second per cgroup (the hot path serves from memory).
            if checked.elapsed() < RECHECK_AFTER {
                return Some(hit);
            }
            if std::fs::metadata(&hit.path).is_ok_and(|m| m.ino() == id) {
                if let Some(e) = self.cache.lock().expect("not poisoned").get_mut(&id) {
                    e.1 = Instant::now();
                }
                return Some(hit);
            }
            self.cache.lock().expect("not poisoned").remove(&id);
            return None;
        }
        let path = cgroup::find_by_id(&self.root, id)?;
        // Shared, not cloned, on every request of this cgroup (the hot path).
        let resolved = Arc::new(PodCgroup {
            pod_uid: cgroup::pod_uid_from_path(&path).map(Arc::from),
            path: Arc::from(path),
        });
        self.remember(id, resolved.clone());
        Some(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_cgroup_stops_resolving() {
        let root = std::env::temp_dir().join(format!("resolver-{}", std::process::id()));
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let dir = root.join(format!("kubepods/besteffort/pod{uid}/ctr"));
        std::fs::create_dir_all(&dir).unwrap();
        let id = std::fs::metadata(&dir).unwrap().ino();
        let r = Resolver::new(&root);
        let got = r.resolve(id).unwrap();
        assert_eq!(
            (&*got.path, got.pod_uid.as_deref()),
            (dir.as_path(), Some(uid))
        );
        // Cached, and still checked against the file system.
        assert_eq!(r.resolve(id), Some(got));
        std::fs::remove_dir(&dir).unwrap();
        std::thread::sleep(RECHECK_AFTER + Duration::from_millis(50));
        assert_eq!(r.resolve(id), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_learned_cgroup_resolves_without_a_walk() {
        let base = std::env::temp_dir().join(format!("resolver-learn-{}", std::process::id()));
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        // Outside the resolver's root: only what was learned can resolve it.
        let dir = base.join(format!("elsewhere/pod{uid}/ctr"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(base.join("root")).unwrap();
        let id = std::fs::metadata(&dir).unwrap().ino();
        let r = Resolver::new(&base.join("root"));
        assert_eq!(r.resolve(id), None);
        r.learn(&dir);
        let got = r.resolve(id).unwrap();
        assert_eq!(got.pod_uid.as_deref(), Some(uid));
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! Who is calling: the pod the kernel recorded for a connection (its pod-level cgroup, found by
//! position), or, for a connection the kernel did not record, whether it came from the node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup;

/// The caller of one connection, as far as the kernel vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The kernel recorded the connection: opened by the pod whose pod-level cgroup has this id.
    Pod(u64),
    /// Not recorded, from one of the node's own addresses: a node daemon (or a hostNetwork
    /// pod whose connection the kernel could not record; counted by the kernel).
    Node(IpAddr),
    /// Not recorded, from an address that is not the node's: it reached the agent around the
    /// connect hook (a DNAT, a load balancer). Always refused.
    Bypassed(IpAddr),
    /// No kernel attribution at all (fallback mode): known only by its address.
    Plain(IpAddr),
}

impl Caller {
    /// Whether the kernel recorded the connection, for logs and metrics (`attributed`, `plain`).
    pub fn listener(&self) -> &'static str {
        match self {
            Caller::Pod(_) => "attributed",
            _ => "plain",
        }
    }

    /// The kernel-recorded pod cgroup id, if any.
    pub fn cgroup_id(&self) -> Option<u64> {
        match self {
            Caller::Pod(id) => Some(*id),
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
    /// No kernel record for the connection (a node caller, or fallback mode).
    Unattributed,
    /// The caller's cgroup is not a pod's.
    NotAPod,
    /// No kernel record and not from a node address: it came around the hook.
    Bypassed,
    /// The token names the calling pod but another service account or namespace than the
    /// pod's credentials were fetched for (a forged token).
    IdentityChanged,
}

impl Outcome {
    /// Every outcome (their series are exported from the start, at 0).
    pub const ALL: [Outcome; 6] = [
        Outcome::Attributed,
        Outcome::Mismatch,
        Outcome::Unattributed,
        Outcome::NotAPod,
        Outcome::Bypassed,
        Outcome::IdentityChanged,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Attributed => "attributed",
            Outcome::Mismatch => "mismatch",
            Outcome::Unattributed => "unattributed",
            Outcome::NotAPod => "not_a_pod",
            Outcome::Bypassed => "bypassed",
            Outcome::IdentityChanged => "identity_changed",
        }
    }
}

/// What to do with callers the kernel did not attribute to a pod (node daemons; everyone in
/// fallback mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnattributedPolicy {
    /// Serve them, checking only the token (the reference agent's behaviour).
    Allow,
    /// Refuse them with 403.
    Deny,
}

/// A resolved pod-level cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's cgroup directory.
    pub path: Arc<Path>,
    /// The pod UID its name carries; `None` when the cgroup at the pod position is not a
    /// pod's (a QoS cgroup made after the agent started).
    pub pod_uid: Option<Arc<str>>,
}

/// Who a request is from once the kernel's word is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A pod the kernel attributed the connection to.
    Pod {
        /// Its UID (from its pod-level cgroup's name, which the kubelet made).
        uid: Arc<str>,
        /// The pod's cgroup directory.
        cgroup: Arc<Path>,
    },
    /// A caller the kernel did not attribute, allowed by the policy, known by its address.
    Peer(IpAddr),
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
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// Most cgroup ids remembered; a node runs at most a few hundred pods.
const CACHE_LIMIT: usize = 16_384;

/// Resolves pod-level cgroup ids under the pods cgroup, caching the answers.
#[derive(Debug)]
pub struct Resolver {
    root: PathBuf,
    /// id → (resolution, when it was last checked against the file system). Hashed with
    /// foldhash: ids are the kernel's cgroup inode numbers, nothing a pod picks.
    cache: Mutex<HashMap<u64, (Arc<PodCgroup>, Instant), foldhash::fast::RandomState>>,
}

impl Resolver {
    /// A resolver for pods under the pods cgroup `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            cache: Mutex::new(HashMap::default()),
        }
    }

    /// Remembers the pod cgroup at `path` before anyone connects from it (pre-warm sees pods
    /// appear), so a new pod's first request does not list the pods cgroup. Ignored unless
    /// `path` is at a pod's position.
    pub fn learn(&self, path: &Path) {
        if !cgroup::at_pod_position(&self.root, path) {
            return;
        }
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        self.remember(meta.ino(), resolved(path));
    }

    fn remember(&self, id: u64, resolved: Arc<PodCgroup>) {
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(id, (resolved, Instant::now()));
    }

    /// The pod-level cgroup `id` names, if it still exists at a pod's position. cgroup2 ids
    /// are never reused while the system runs, so a cached answer can be stale (cgroup gone)
    /// but never wrong.
    pub fn resolve(&self, id: u64) -> Option<Arc<PodCgroup>> {
        let hit = self.cache.lock().expect("not poisoned").get(&id).cloned();
        if let Some((hit, checked)) = hit {
            // A removed cgroup must stop resolving; checking costs a stat, so at most once per
            // second per pod (the hot path serves from memory).
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
        let path = cgroup::find_pod_level(&self.root, id)?;
        // Shared, not cloned, on every request of this pod (the hot path).
        let resolved = resolved(&path);
        self.remember(id, resolved.clone());
        Some(resolved)
    }
}

fn resolved(path: &Path) -> Arc<PodCgroup> {
    Arc::new(PodCgroup {
        pod_uid: path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(cgroup::pod_uid_from_name)
            .map(Arc::from),
        path: Arc::from(path),
    })
}

/// How long the node's address list is reused before it is read again.
const NODE_ADDRS_TTL: Duration = Duration::from_secs(1);

/// The node's own addresses (the agent runs in the node's network namespace): a connection
/// the kernel did not record is a node daemon's only if it comes from one of them.
#[derive(Debug, Default)]
pub struct NodeAddresses {
    known: Mutex<Option<(Instant, Vec<IpAddr>)>>,
}

impl NodeAddresses {
    /// Whether `ip` is assigned to an interface of this network namespace. The list is read
    /// at most once per `NODE_ADDRS_TTL`, however many callers ask.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut known = self.known.lock().expect("not poisoned");
        match &*known {
            Some((at, addrs)) if at.elapsed() < NODE_ADDRS_TTL => addrs.contains(&ip),
            _ => {
                let addrs = local_addresses();
                let found = addrs.contains(&ip);
                *known = Some((Instant::now(), addrs));
                found
            }
        }
    }
}

/// Every address on this namespace's interfaces (loopback included).
fn local_addresses() -> Vec<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(ifs) => ifs
            .filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect(),
        Err(e) => {
            // Nothing is a node address then: unattributed callers are refused (fail closed).
            tracing::warn!(error = %e, "cannot list the node's addresses");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn a_removed_pod_stops_resolving() {
        let root = std::env::temp_dir().join(format!("resolver-{}", std::process::id()));
        let dir = root.join(format!("besteffort/pod{UID}"));
        std::fs::create_dir_all(dir.join("ctr")).unwrap();
        let id = std::fs::metadata(&dir).unwrap().ino();
        let r = Resolver::new(&root);
        let got = r.resolve(id).unwrap();
        assert_eq!(
            (&*got.path, got.pod_uid.as_deref()),
            (dir.as_path(), Some(UID))
        );
        // Cached, and still checked against the file system.
        assert_eq!(r.resolve(id), Some(got));
        std::fs::remove_dir_all(&dir).unwrap();
        std::thread::sleep(RECHECK_AFTER + Duration::from_millis(50));
        assert_eq!(r.resolve(id), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_the_pod_position_resolves_whatever_is_nested_below() {
        let root = std::env::temp_dir().join(format!("resolver-pos-{}", std::process::id()));
        let other = "11111111-2222-4333-8444-555555555555";
        // A container of pod UID made a cgroup named after another pod, and a QoS-looking one.
        let pod = root.join(format!("burstable/pod{UID}"));
        let nested = pod.join(format!("ctr/pod{other}"));
        let fake_qos = pod.join(format!("ctr/besteffort/pod{other}"));
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::create_dir_all(&fake_qos).unwrap();
        let id = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let r = Resolver::new(&root);
        assert_eq!(r.resolve(id(&nested)), None, "a nested cgroup is no pod");
        assert_eq!(r.resolve(id(&fake_qos)), None);
        r.learn(&nested);
        assert_eq!(r.resolve(id(&nested)), None, "learning refuses it too");
        assert_eq!(r.resolve(id(&pod)).unwrap().pod_uid.as_deref(), Some(UID));
        // The QoS cgroup itself sits at a pod's position but names no pod.
        let qos = r.resolve(id(&root.join("burstable"))).unwrap();
        assert_eq!(qos.pod_uid, None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_learned_pod_resolves() {
        let root = std::env::temp_dir().join(format!("resolver-learn-{}", std::process::id()));
        let dir = root.join(format!("pod{UID}"));
        std::fs::create_dir_all(&dir).unwrap();
        let r = Resolver::new(&root);
        r.learn(&dir);
        let id = std::fs::metadata(&dir).unwrap().ino();
        assert!(r.cache.lock().unwrap().contains_key(&id));
        assert_eq!(r.resolve(id).unwrap().pod_uid.as_deref(), Some(UID));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_node_has_its_loopback_and_not_a_documentation_address() {
        let n = NodeAddresses::default();
        assert!(n.contains("127.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!n.contains("192.0.2.77".parse().unwrap()));
    }
}

//! `--prewarm`: a pod's credentials are fetched before it asks, so its first request (and
//! every pod's first request after an agent restart) is a cache hit.
//!
//! New pods are noticed by inotify on the pods cgroup and its QoS children (a pod's cgroup
//! appears when the kubelet creates the pod sandbox, before its volumes are mounted and its
//! containers start); existing pods by a scan at start, newest first. Each pod's token is
//! looked for in the kubelet's layout,
//! `<kubelet-root>/pods/<uid>/volumes/kubernetes.io~projected/*/eks-pod-identity-token`,
//! waiting for it with a bounded backoff (the kubelet writes it after the cgroup exists). A
//! pod without that file is no pod-identity pod and costs nothing more. Calls go through the
//! cache's refresh budget (`--max-service-qps`, half the in-flight permits) under the key a
//! request from that pod would use. With kernel attribution each pod's cgroup is watched
//! too, and its containers' cgroups are handed to the resolver as they appear, so a new
//! container's first request does not walk the cgroup tree.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::attribution::Resolver;
use crate::cache::{Cache, Key, Lookup};
use crate::cgroup::pod_uid_from_name;
use crate::token::{self, MAX_TOKEN_BYTES};

/// The token file's name in its projected volume.
pub const TOKEN_FILE: &str = "eks-pod-identity-token";
/// How long a new pod's token is waited for before the pod is taken for one without.
const TOKEN_WAIT: Duration = Duration::from_secs(120);
/// First and longest pause between looks for a new pod's token (doubling in between).
const POLL: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(5));

/// Reads a token file the kubelet wrote: at most [`MAX_TOKEN_BYTES`], surrounding
/// whitespace dropped. `None` if it is missing, too large or empty.
pub fn read_token(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .ok()?;
    let token = text.trim();
    (!token.is_empty() && token.len() <= MAX_TOKEN_BYTES).then(|| token.to_owned())
}

/// The cgroups directly below `dir`: (pods with their UIDs, the others).
fn children(dir: &Path) -> (Vec<(String, PathBuf)>, Vec<PathBuf>) {
    let (mut pods, mut others) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match entry.file_name().to_str().and_then(pod_uid_from_name) {
            Some(uid) => pods.push((uid, entry.path())),
            None => others.push(entry.path()),
        }
    }
    (pods, others)
}

/// The inotify watches and what each watched directory is.
struct Watched {
    watches: inotify::Watches,
    /// The pods cgroup and its QoS cgroups: new children are pods (or QoS cgroups).
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl Watched {
    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        let wd = self
            .watches
            .add(dir, WatchMask::CREATE | WatchMask::ONLYDIR)?;
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Watches `dir` (and, from the pods cgroup, its QoS children) for new pods; returns
    /// the pods already there.
    fn tree(&mut self, dir: &Path, root: bool) -> std::io::Result<Vec<(String, PathBuf)>> {
        self.add(dir)?;
        let (mut pods, others) = children(dir);
        if root {
            for qos in others {
                pods.extend(self.tree(&qos, false)?);
            }
        }
        Ok(pods)
    }

    /// The watched directories.
    fn all(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.dirs.values().cloned()
    }
}

/// Watches for pods and warms the cache for them.
#[derive(Debug)]
pub struct Prewarmer {
    cache: Arc<Cache>,
    pods_root: PathBuf,
    kubelet_root: PathBuf,
    /// With kernel attribution (entries keyed by pod), the cgroup id resolver; without
    /// (entries keyed by token hash), `None`.
    resolver: Option<Arc<Resolver>>,
}

impl Prewarmer {
    /// A pre-warmer for the pods under `pods_root`, with tokens under `kubelet_root`.
    pub fn new(
        cache: Arc<Cache>,
        pods_root: PathBuf,
        kubelet_root: PathBuf,
        resolver: Option<Arc<Resolver>>,
    ) -> Self {
        Self {
            cache,
            pods_root,
            kubelet_root,
            resolver,
        }
    }

    /// Runs in the background for the life of the agent.
    pub fn spawn(self) {
        tokio::spawn(async move {
            let root = self.pods_root.clone();
            if let Err(e) = Arc::new(self).run().await {
                tracing::error!(pods_root = %root.display(), error = %e, "pre-warm stopped: pods are served as without it");
            }
        });
    }

    async fn run(self: Arc<Self>) -> std::io::Result<()> {
        let inotify = Inotify::init()?;
        let mut watches = Watched {
            watches: inotify.watches(),
            dirs: HashMap::new(),
        };
        // Watch first, then scan: a pod made in between is seen twice, and warming twice
        // costs nothing (the second finds the entry fresh or in flight).
        let mut pods = watches.tree(&self.pods_root, true)?;
        for (_, dir) in &pods {
            self.learn_pod(dir);
        }
        // Newest first: a pod that started recently is the likeliest to be initialising
        // its SDK; long-running ones hold credentials in their SDK's own cache.
        pods.sort_by_key(|(_, dir)| {
            std::cmp::Reverse(
                std::fs::metadata(dir)
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH),
            )
        });
        tracing::info!(pods = pods.len(), pods_root = %self.pods_root.display(), kubelet_root = %self.kubelet_root.display(), "pre-warm: warming the pods already on the node");
        tokio::spawn(self.clone().warm_present(pods));
        let mut events = inotify.into_event_stream([0u8; 4096])?;
        while let Some(event) = events.next().await {
            let event = event?;
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // Events were lost: look at every watched cgroup again (warming is idempotent).
                tracing::warn!("pre-warm: inotify queue overflowed; rescanning the pods cgroup");
                let pods: Vec<(String, PathBuf)> =
                    watches.all().flat_map(|dir| children(&dir).0).collect();
                for (uid, dir) in pods {
                    self.learn_pod(&dir);
                    tokio::spawn(self.clone().warm_new(uid, dir));
                }
                continue;
            }
            let (Some(parent), Some(name)) = (watches.dirs.get(&event.wd), event.name) else {
                continue;
            };
            if !event.mask.contains(EventMask::CREATE | EventMask::ISDIR) {
                continue;
            }
            let dir = parent.join(&name);
            match name.to_str().and_then(pod_uid_from_name) {
                Some(uid) => {
                    self.learn_pod(&dir);
                    tokio::spawn(self.clone().warm_new(uid, dir));
                }
                // A QoS cgroup (kubepods/burstable) that appeared late: watch it too.
                None => match watches.tree(&dir, false) {
                    Ok(found) => {
                        for (uid, dir) in found {
                            self.learn_pod(&dir);
                            tokio::spawn(self.clone().warm_new(uid, dir));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "pre-warm: cannot watch a new cgroup")
                    }
                },
            }
        }
        Ok(())
    }

    /// With attribution, hands pod cgroup `dir` to the resolver (the kernel records pods by
    /// their pod-level cgroup).
    fn learn_pod(&self, dir: &Path) {
        if let Some(resolver) = &self.resolver {
            resolver.learn(dir);
        }
    }

    /// The pods found at start, in order, one budget token at a time; the calls overlap.
    async fn warm_present(self: Arc<Self>, pods: Vec<(String, PathBuf)>) {
        for (uid, dir) in pods {
            let Some((lookup, file)) = self.lookup(&uid, &dir) else {
                continue;
            };
            if self.cache.needs_call(&lookup.key) {
                let budget = self.cache.prewarm_budget().await;
                let cache = self.cache.clone();
                tokio::spawn(async move { cache.prewarm(lookup, file, budget).await });
            }
        }
    }

    /// A new pod: waits (bounded, backing off) for the kubelet to write its token, then warms.
    async fn warm_new(self: Arc<Self>, uid: String, dir: PathBuf) {
        let give_up = tokio::time::Instant::now() + TOKEN_WAIT;
        let mut pause = POLL.0;
        loop {
            if let Some((lookup, file)) = self.lookup(&uid, &dir) {
                if self.cache.needs_call(&lookup.key) {
                    let budget = self.cache.prewarm_budget().await;
                    self.cache.prewarm(lookup, file, budget).await;
                }
                return;
            }
            if !dir.exists() || tokio::time::Instant::now() >= give_up {
                return; // gone, or no pod-identity token: nothing to do
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL.1);
        }
    }

    /// The lookup a request from pod `uid` would make, from the token on disk, and the token
    /// file; `None` while there is no (valid) token for that pod.
    fn lookup(&self, uid: &str, dir: &Path) -> Option<(Lookup, Arc<Path>)> {
        let volumes = self
            .kubelet_root
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~projected");
        let (file, token) = std::fs::read_dir(volumes)
            .ok()?
            .flatten()
            .map(|volume| volume.path().join(TOKEN_FILE))
            .find_map(|file| read_token(&file).map(|t| (file, t)))?;
        let parsed = token::Parsed::new(&token).ok()?;
        parsed.facts.check_window(token::epoch_secs() as i64).ok()?;
        // A token naming another pod is never used for this one.
        if parsed.facts.pod_uid.as_deref() != Some(uid) {
            return None;
        }
        let (key, subject) = if self.resolver.is_some() {
            (Key::for_pod(uid), Some(parsed.facts.subject.clone()))
        } else {
            (Key::for_token(&token), None)
        };
        let lookup = Lookup {
            key: Arc::new(key),
            token_exp: parsed.facts.exp,
            token: parsed.token,
            cgroup: Some(Arc::from(dir)),
            subject,
            facts: Some(parsed.facts),
        };
        Some((lookup, Arc::from(file.as_path())))
    }
}

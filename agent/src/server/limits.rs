//! Caps on open connections, per listener group and per peer, so that no caller (a pod
//! flooding the metrics port with unfinished requests, say) can take the file descriptors the
//! credential listeners need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept back from the credential listeners: the admin listeners' cap, EKS Auth
/// connections, BPF maps and links, logs.
const RESERVED_FDS: usize = 512;
/// Most connections one caller may hold open to the credential listeners.
const CREDENTIAL_PER_PEER: usize = 1024;
/// Most connections open to the probe and metrics listeners together, and per peer.
const ADMIN_TOTAL: usize = 128;
const ADMIN_PER_PEER: usize = 16;

/// Who a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The pod the kernel recorded for it (its pod-level cgroup id).
    Pod(u64),
    /// Its source address (everything else).
    Ip(IpAddr),
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener group is at its cap.
    Total,
    /// This peer is at its cap.
    PerPeer,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "listener_full",
            Refusal::PerPeer => "peer_full",
        }
    }
}

/// The caps of one group of listeners.
#[derive(Debug)]
pub struct ConnLimits {
    total: Arc<Semaphore>,
    per_peer: usize,
    peers: Mutex<HashMap<Peer, usize>>,
}

/// An admitted connection's place; given back on drop.
#[derive(Debug)]
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    limits: Arc<ConnLimits>,
    peer: Peer,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut peers = self.limits.peers.lock().expect("not poisoned");
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

impl ConnLimits {
    /// At most `total` connections, `per_peer` of them from one peer.
    pub fn new(total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(total)),
            per_peer,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// The credential listeners' caps for a process allowed `fds` descriptors.
    pub fn credentials(fds: usize) -> Arc<Self> {
        let total = fds.saturating_sub(RESERVED_FDS).max(64);
        Self::new(total, CREDENTIAL_PER_PEER.min(total))
    }

    /// The probe and metrics listeners' caps.
    pub fn admin() -> Arc<Self> {
        Self::new(ADMIN_TOTAL, ADMIN_PER_PEER)
    }

    /// A place for a connection from `peer`, or why there is none.
    pub fn admit(self: &Arc<Self>, peer: Peer) -> Result<ConnGuard, Refusal> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)?;
        let mut peers = self.peers.lock().expect("not poisoned");
        let n = peers.entry(peer).or_insert(0);
        if *n >= self.per_peer {
            return Err(Refusal::PerPeer);
        }
        *n += 1;
        Ok(ConnGuard {
            _permit: permit,
            limits: self.clone(),
            peer,
        })
    }
}

/// Raises this process's soft descriptor limit to its hard one (servers want all they may
/// have) and returns it.
pub fn raise_fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_peer_and_in_all_and_places_come_back() {
        let limits = ConnLimits::new(3, 2);
        let a = Peer::Pod(1);
        let b = Peer::Ip("10.0.0.2".parse().unwrap());
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::PerPeer);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::Total);
        drop(a1);
        assert!(
            limits.admit(a).is_ok(),
            "a closed connection gives its place back"
        );
    }

    #[test]
    fn credential_caps_keep_descriptors_in_reserve() {
        let l = ConnLimits::credentials(4096);
        assert_eq!(l.total.available_permits(), 4096 - RESERVED_FDS);
        assert_eq!(l.per_peer, CREDENTIAL_PER_PEER);
        assert_eq!(ConnLimits::credentials(100).total.available_permits(), 64);
    }
}

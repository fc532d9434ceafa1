//! Caps on open connections, per listener group and per peer, so that no caller (a pod
//! flooding the metrics port with unfinished requests, say) can take the file descriptors the
//! credential listeners need.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

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
    total: usize,
    per_peer: usize,
    open: Mutex<Open>,
}

/// The connections open now: in all and per peer (one lock for all, taken once at accept
/// and once at close). Pods' cgroup ids are the kernel's numbers and hash with foldhash;
/// addresses keep SipHash: a peer's address is partly the caller's choice.
#[derive(Debug, Default)]
struct Open {
    all: usize,
    pods: HashMap<u64, usize, foldhash::fast::RandomState>,
    ips: HashMap<IpAddr, usize>,
}

impl Open {
    /// One more connection of `peer`, unless it has `cap` open.
    fn take(&mut self, peer: Peer, cap: usize) -> bool {
        fn take<K: Hash + Eq, S: BuildHasher>(
            m: &mut HashMap<K, usize, S>,
            k: K,
            cap: usize,
        ) -> bool {
            let n = m.entry(k).or_insert(0);
            let admitted = *n < cap;
            *n += usize::from(admitted);
            admitted
        }
        match peer {
            Peer::Pod(id) => take(&mut self.pods, id, cap),
            Peer::Ip(ip) => take(&mut self.ips, ip, cap),
        }
    }

    /// One connection of `peer` fewer; a peer with none open is forgotten.
    fn give_back(&mut self, peer: Peer) {
        fn give_back<K: Hash + Eq, S: BuildHasher>(m: &mut HashMap<K, usize, S>, k: K) {
            // One hash for the decrement and the removal.
            if let Entry::Occupied(mut n) = m.entry(k) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                }
            }
        }
        match peer {
            Peer::Pod(id) => give_back(&mut self.pods, id),
            Peer::Ip(ip) => give_back(&mut self.ips, ip),
        }
    }

    /// Connections `peer` has open.
    #[cfg(test)]
    fn of(&self, peer: Peer) -> Option<usize> {
        match peer {
            Peer::Pod(id) => self.pods.get(&id).copied(),
            Peer::Ip(ip) => self.ips.get(&ip).copied(),
        }
    }
}

/// An admitted connection's place; given back on drop.
#[derive(Debug)]
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    peer: Peer,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.all -= 1;
        open.give_back(self.peer);
    }
}

impl ConnLimits {
    /// At most `total` connections, `per_peer` of them from one peer.
    pub fn new(total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_peer,
            open: Mutex::default(),
        })
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut open = self.open();
        if open.all >= self.total {
            return Err(Refusal::Total);
        }
        if !open.take(peer, self.per_peer) {
            return Err(Refusal::PerPeer);
        }
        open.all += 1;
        Ok(ConnGuard {
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
        let _a3 = limits
            .admit(a)
            .expect("a closed connection gives its place back");
        // Refusals take no place; the counts are exactly what is open.
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::Total);
        {
            let open = limits.open();
            assert_eq!((open.all, open.of(a), open.of(b)), (3, Some(2), Some(1)));
        }
        drop(_b1);
        assert!(
            limits.open().of(b).is_none(),
            "a peer with nothing open is forgotten"
        );
    }

    #[test]
    fn credential_caps_keep_descriptors_in_reserve() {
        let l = ConnLimits::credentials(4096);
        assert_eq!(l.total, 4096 - RESERVED_FDS);
        assert_eq!(l.per_peer, CREDENTIAL_PER_PEER);
        assert_eq!(ConnLimits::credentials(100).total, 64);
    }
}

//! Upgrades without a gap: a starting agent takes the listening sockets and the credential
//! cache from the agent already serving this node, over a Unix socket only root can reach,
//! and the old agent stops accepting only once the new one accepts.
//!
//! The accept queues move with the sockets (`SCM_RIGHTS` passes the sockets themselves), so no
//! connect is refused and no queued connection is reset; the credentials move in memory, so
//! nothing is fetched again. Every step is bounded: a hung or dying old agent costs the new
//! one [`TAKE_TIMEOUT`], then it starts cold (binding beside the old one with `SO_REUSEPORT`).
//!
//! The exchange, on one connection (frames are length-prefixed JSON, see [`wire`]):
//! 1. new → old: `Hello {version, pid}`
//! 2. old → new: `Offer {version, pid, listeners}`, the listeners' descriptors, the cache
//! 3. new → old: `Taken {pid}` once it accepts on them; the old agent then stops accepting,
//!    finishes what it holds and idles until it is told to stop (a container that exited by
//!    itself would be restarted, and take everything back).

mod give;
mod take;
mod wire;

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use give::{Giver, Offering};
pub use take::{take, Inherited};

/// Where `server` listens for the agent that replaces it (a directory only root can enter).
pub const DEFAULT_SOCKET: &str = "/run/eks-pod-identity-agent/handover.sock";

/// The protocol version both sides must speak.
const VERSION: u32 = 1;
/// The longest a starting agent waits on the old one, in all.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest an old agent waits for the new one to say it accepts. The new one knocks
/// first and then loads and attaches its eBPF programs: seconds on a loaded node (a 10 s
/// bound was outlasted in the kernel matrix's emulated VMs). The old one serves meanwhile,
/// and this stays under the DaemonSet's 30 s grace period.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);

/// First frame: who asks.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    pid: u32,
}

/// Second frame: what follows (the listeners' addresses, in the order of their descriptors).
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    version: u32,
    pid: u32,
    listeners: Vec<std::net::SocketAddr>,
}

/// Last frame: the new agent accepts on the sockets.
#[derive(Debug, Serialize, Deserialize)]
struct Taken {
    pid: u32,
}

/// Why a handover could not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket's directory could be reached by others than root.
    #[error("handover directory {dir}: {reason}")]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The process at the other end is not this agent's user.
    #[error("handover peer pid {pid} runs as uid {uid}, not {ours}: refused")]
    PeerNotRoot {
        /// Its pid.
        pid: i32,
        /// Its uid.
        uid: u32,
        /// Ours.
        ours: u32,
    },
    /// The other end broke the exchange, or took too long.
    #[error("handover over {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The other end said something this version does not understand.
    #[error("handover protocol: {0}")]
    Protocol(String),
}

impl HandoverError {
    /// The metric label of this failure.
    pub fn label(&self) -> &'static str {
        match self {
            HandoverError::UnsafeDir { .. } | HandoverError::PeerNotRoot { .. } => "refused",
            HandoverError::Io { .. } | HandoverError::Protocol(_) => "failed",
        }
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks that only this agent's user can have put a socket in `dir`: a directory it owns
/// that nobody else may write. Others may enter it (the kubelet makes a `DirectoryOrCreate`
/// hostPath 0755): connecting is no use to them, the giver takes only its own user
/// (`SO_PEERCRED`). (Abstract sockets would not do: any host-network pod could squat the
/// name first.)
fn check_dir(dir: &Path) -> Result<(), HandoverError> {
    let unsafe_dir = |reason: String| HandoverError::UnsafeDir {
        dir: dir.to_path_buf(),
        reason,
    };
    let md = std::fs::symlink_metadata(dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if !md.file_type().is_dir() {
        return Err(unsafe_dir("not a directory".into()));
    }
    if md.uid() != euid() {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not {}",
            md.uid(),
            euid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:o} lets other users write",
            md.mode() & 0o777
        )));
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if missing, narrows it to 0700 if it is ours, then checks it.
fn prepare_dir(dir: &Path) -> Result<(), HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err)?;
    let md = std::fs::symlink_metadata(dir).map_err(io_err)?;
    if md.file_type().is_dir() && md.uid() == euid() && md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    check_dir(dir)
}

/// The directory holding `socket`.
fn dir_of(socket: &Path) -> &Path {
    socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The peer's pid, if it runs as this agent's user (checked by the kernel's `SO_PEERCRED`).
fn peer_pid(stream: &UnixStream) -> Result<i32, HandoverError> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| HandoverError::Protocol(format!("SO_PEERCRED: {e}")))?;
    if cred.uid() != euid() {
        return Err(HandoverError::PeerNotRoot {
            pid: cred.pid(),
            uid: cred.uid(),
            ours: euid(),
        });
    }
    Ok(cred.pid())
}

/// The pid to log for the peer: the kernel's (`SO_PEERCRED`), or the one the peer names when
/// the kernel gives 0 (the peer is in another pid namespace: another container).
fn shown_pid(peer: i32, named: u32) -> i32 {
    if peer == 0 {
        named as i32
    } else {
        peer
    }
}

/// Sets both timeouts of `stream` to what is left until `deadline` (an error once it passed).
fn arm(stream: &UnixStream, deadline: std::time::Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::Arc;

    /// An EKS Auth that never answers (these tests make no calls).
    struct Silent;

    impl crate::upstream::Fetcher for Silent {
        fn fetch(
            &self,
            _token: String,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            crate::credentials::Credentials,
                            crate::upstream::UpstreamError,
                        >,
                    > + Send,
            >,
        > {
            Box::pin(std::future::pending())
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("handover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn a_new_agent_takes_the_listeners_with_their_queue_and_the_old_one_hears_it() {
        let dir = scratch("take");
        let path = dir.join("sub/handover.sock");
        let giver = Giver::bind(&path).unwrap();
        let md = std::fs::metadata(dir.join("sub")).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A connection waiting in the queue when the socket changes hands.
        let _waiting = std::net::TcpStream::connect(addr).unwrap();
        let offered: Arc<[(std::net::SocketAddr, std::os::fd::OwnedFd)]> =
            Arc::new([(addr, listener.as_fd().try_clone_to_owned().unwrap())]);
        drop(listener);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let cache = crate::cache::Cache::new(Arc::new(Silent), Default::default(), metrics.clone());
        let serving = tokio::spawn({
            let (metrics, cache) = (metrics.clone(), cache.clone());
            async move {
                giver
                    .serve(&Offering {
                        sockets: offered,
                        cache,
                        metrics,
                    })
                    .await
            }
        });
        let p = path.clone();
        let inherited = tokio::task::spawn_blocking(move || take(&p))
            .await
            .unwrap()
            .unwrap()
            .expect("an agent serves there");
        assert_eq!(inherited.from_pid, std::process::id() as i32);
        assert!(inherited.entries.is_empty());
        let [(got, taken)] = &inherited.listeners[..] else {
            panic!("{:?}", inherited.listeners)
        };
        assert_eq!(*got, addr);
        let (_, peer) = taken.accept().unwrap();
        assert_eq!(peer.ip(), addr.ip(), "the queued connection came along");
        assert!(!serving.is_finished(), "no handover before Taken");
        tokio::task::spawn_blocking(move || inherited.confirm())
            .await
            .unwrap()
            .unwrap();
        let pid = tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pid, std::process::id() as i32);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn nobody_serving_is_a_cold_start_and_a_dir_others_may_write_is_refused() {
        let dir = scratch("cold");
        let path = dir.join("handover.sock");
        assert!(take(&path).unwrap().is_none(), "no directory");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(take(&path).unwrap().is_none(), "no socket");
        // A socket file nobody listens on (its agent died).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(take(&path).unwrap().is_none(), "a dead agent's socket");
        // The kubelet's hostPath DirectoryOrCreate: 0755, others may enter but not write.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            take(&path).unwrap().is_none(),
            "a 0755 directory, nobody serving"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o733)).unwrap();
        let e = take(&path).unwrap_err();
        assert!(
            matches!(e, HandoverError::UnsafeDir { .. }),
            "{e}: another user could have put the socket there"
        );
        // The serving side narrows its own directory back to 0700.
        drop(Giver::bind(&path).unwrap());
        let md = std::fs::metadata(&dir).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        assert!(!path.exists(), "the socket goes with its agent");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_old_agent_dying_after_passing_the_sockets_leaves_them_and_their_queue_to_the_new_one() {
        let dir = scratch("dying");
        prepare_dir(&dir).unwrap();
        let path = dir.join("handover.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let _waiting = std::net::TcpStream::connect(addr).unwrap();
        // The old agent: offers, passes the sockets, and dies before the cache.
        let old = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let (mut stream, _) = unix.accept().unwrap();
            let _: Hello = wire::read_frame(&mut stream).unwrap();
            let offer = Offer {
                version: VERSION,
                pid: std::process::id(),
                listeners: vec![addr],
            };
            wire::write_frame(&mut stream, &offer).unwrap();
            wire::send_fds(&stream, &[tcp.as_raw_fd()]).unwrap();
        });
        let inherited = take(&path).unwrap().expect("the sockets came");
        old.join().unwrap();
        assert!(
            matches!(inherited.cache_lost, Some(HandoverError::Io { .. })),
            "{:?}",
            inherited.cache_lost
        );
        assert!(inherited.entries.is_empty());
        let (_, taken) = &inherited.listeners[0];
        let (_, peer) = taken.accept().unwrap();
        assert_eq!(
            peer.ip(),
            addr.ip(),
            "the queued connection survived its agent"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

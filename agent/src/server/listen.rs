//! Binding listeners with an accept queue as deep as the node allows: a connect burst (a
//! deployment's restart, the agent's own restart) that outruns the accept loop must queue,
//! not drop SYNs (each drop costs the client a 1 s retransmit, longer than SDKs wait).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Where the kernel's cap on accept queues is (per network namespace).
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// The kernel's default `net.core.somaxconn` since Linux 5.4, used if it cannot be read.
const DEFAULT_SOMAXCONN: u32 = 4096;

/// The accept queue length: `flag` if set, else this network namespace's
/// `net.core.somaxconn` (the kernel caps any larger request to it anyway).
pub fn backlog(flag: Option<u32>) -> u32 {
    flag.unwrap_or_else(|| {
        std::fs::read_to_string(SOMAXCONN)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_SOMAXCONN)
    })
}

/// Binds `addr` and listens with `backlog`. Address reuse on, as `TcpListener::bind` does,
/// and port reuse: an agent starting beside one that hangs (its handover timed out) binds
/// the same ports, as the DaemonSet's surge update needs.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Listening sockets handed over by the agent this one replaces, by address.
#[derive(Debug, Default)]
pub struct Inherited(Vec<(SocketAddr, std::net::TcpListener)>);

impl Inherited {
    /// Sockets to use before binding new ones.
    pub fn new(sockets: Vec<(SocketAddr, std::net::TcpListener)>) -> Self {
        Self(sockets)
    }

    /// The inherited socket on `addr` with its queue resized to `backlog`, else a new one.
    /// The accept queue comes with it: connections waiting there are served, not reset.
    pub fn open(&mut self, addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
        let Some(at) = self.0.iter().position(|(a, _)| *a == addr) else {
            return bind(addr, backlog);
        };
        let (_, listener) = self.0.swap_remove(at);
        let backlog = nix::sys::socket::Backlog::new(backlog.min(i32::MAX as u32) as i32)
            .unwrap_or(nix::sys::socket::Backlog::MAXALLOWABLE);
        nix::sys::socket::listen(&listener, backlog)?;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    }

    /// Addresses handed over that this agent does not listen on (its flags changed).
    pub fn unused(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|(a, _)| *a).collect()
    }
}

/// A connection already waiting in the queue of listening socket `fd`, taken without waiting
/// for the reactor to report it: at a stop, the reactor may not have seen the last arrivals
/// yet, and whatever is left in a queue is reset when the listener closes.
pub(crate) fn waiting(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    use nix::sys::socket::{accept4, SockFlag};
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let accepted = accept4(
        fd.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .ok()?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(accepted) })
}

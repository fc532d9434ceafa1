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

/// Binds `addr` (address reuse on, as `TcpListener::bind` does) and listens with `backlog`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

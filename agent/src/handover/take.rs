//! The starting agent's side: takes the listening sockets and the cache of the agent
//! serving this node, if one is.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeVal;

use super::wire::{read_frame, recv_fds, write_frame};
use super::*;
use crate::cache::EntrySnapshot;

/// What an agent handed over: its listeners (accepting on them is this agent's job now),
/// its cache, and the connection on which to say so.
#[derive(Debug)]
pub struct Inherited {
    stream: UnixStream,
    path: PathBuf,
    /// The old agent's pid.
    pub from_pid: i32,
    /// Its listening sockets, by local address.
    pub listeners: Vec<(SocketAddr, TcpListener)>,
    /// Its cache entries.
    pub entries: Vec<EntrySnapshot>,
    /// Why the cache did not come (the old agent died after passing the sockets); the
    /// sockets are kept all the same: closing them would reset their queued connections.
    pub cache_lost: Option<HandoverError>,
}

impl Inherited {
    /// Tells the old agent this one accepts on the sockets now: it stops accepting.
    pub fn confirm(mut self) -> Result<(), HandoverError> {
        let io_err = |source| HandoverError::Io {
            path: self.path.clone(),
            source,
        };
        arm(&self.stream, Instant::now() + TAKE_TIMEOUT).map_err(io_err)?;
        write_frame(
            &mut self.stream,
            &Taken {
                pid: std::process::id(),
            },
        )
        .map_err(io_err)
    }
}

/// Takes over from the agent listening on `path`, waiting at most [`TAKE_TIMEOUT`] in all.
/// `Ok(None)`: no agent serves there (no socket, or a socket nobody listens on).
pub fn take(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let deadline = Instant::now() + TAKE_TIMEOUT;
    let io_err = |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = dir_of(path);
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        _ => check_dir(dir)?,
    }
    let mut stream = match connect(path, TAKE_TIMEOUT) {
        Ok(s) => s,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => {
            return Ok(None)
        }
        Err(e) => return Err(io_err(e)),
    };
    tracing::debug!("connected to the agent serving this node");
    let from_pid = peer_pid(&stream)?;
    arm(&stream, deadline).map_err(io_err)?;
    write_frame(
        &mut stream,
        &Hello {
            version: VERSION,
            pid: std::process::id(),
        },
    )
    .map_err(io_err)?;
    let offer: Offer = read_frame(&mut stream).map_err(io_err)?;
    if offer.version != VERSION {
        return Err(HandoverError::Protocol(format!(
            "pid {} speaks version {}, this agent {VERSION}",
            offer.pid, offer.version
        )));
    }
    let from_pid = shown_pid(from_pid, offer.pid);
    arm(&stream, deadline).map_err(io_err)?;
    let fds = recv_fds(&stream, offer.listeners.len()).map_err(io_err)?;
    let listeners = offer
        .listeners
        .into_iter()
        .zip(fds)
        .map(|(addr, fd)| listening(addr, fd))
        .collect::<Result<Vec<_>, _>>()?;
    let entries =
        arm(&stream, deadline).and_then(|()| read_frame::<Vec<EntrySnapshot>>(&mut stream));
    let (entries, cache_lost) = match entries {
        Ok(entries) => (entries, None),
        Err(e) => (Vec::new(), Some(io_err(e))),
    };
    Ok(Some(Inherited {
        stream,
        path: path.to_path_buf(),
        from_pid,
        listeners,
        entries,
        cache_lost,
    }))
}

/// `fd` as a TCP listener on `addr`, or why it is not one.
fn listening(addr: SocketAddr, fd: OwnedFd) -> Result<(SocketAddr, TcpListener), HandoverError> {
    let accepting = sock::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let listener = TcpListener::from(fd);
    match listener.local_addr() {
        Ok(local) if accepting && local == addr => Ok((addr, listener)),
        local => Err(HandoverError::Protocol(format!(
            "descriptor for {addr} is not a TCP socket listening there (bound to {local:?}, listening: {accepting})"
        ))),
    }
}

/// Connects to `path`, waiting at most `timeout` (a listener whose queue is full, because
/// its agent hangs, would otherwise block the connect for good).
fn connect(path: &Path, timeout: std::time::Duration) -> io::Result<UnixStream> {
    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let limit = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    sock::setsockopt(&fd, sockopt::SendTimeout, &limit)?;
    sock::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

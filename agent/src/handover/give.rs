//! The serving agent's side: hands its listening sockets and its cache to the agent that
//! replaces it.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::wire::{read_frame, send_fds, write_frame};
use super::*;
use crate::cache::Cache;
use crate::metrics::{HandoverLabels, Metrics};

/// What a serving agent hands over: copies of its listeners' descriptors, its cache, and the
/// metrics that count the handovers.
#[derive(Clone)]
pub struct Offering {
    /// The listeners, by local address.
    pub sockets: Arc<[(SocketAddr, OwnedFd)]>,
    /// The credential cache.
    pub cache: Arc<Cache>,
    /// Where handovers are counted.
    pub metrics: Arc<Metrics>,
}

/// The handover socket of a serving agent. Dropped, it removes the socket file, unless a
/// newer agent has put its own there.
#[derive(Debug)]
pub struct Giver {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    inode: u64,
    /// Set once handed over: the socket file is the new agent's to replace.
    handed_over: Arc<std::sync::atomic::AtomicBool>,
    /// Held by the exchange in progress (released when its blocking part ends, even if the
    /// future that awaited it was dropped at a stop).
    exchange: Arc<tokio::sync::Semaphore>,
}

impl Giver {
    /// Listens on `path` (mode 0600, in a directory only this user can enter, made if
    /// missing). A socket file left there by an agent that is gone is replaced.
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        let io_err = |source| HandoverError::Io {
            path: path.to_path_buf(),
            source,
        };
        prepare_dir(dir_of(path))?;
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(io_err)?,
            Ok(_) => {
                return Err(HandoverError::UnsafeDir {
                    dir: path.to_path_buf(),
                    reason: "exists and is not a socket".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        let inode = std::fs::symlink_metadata(path).map_err(io_err)?.ino();
        listener.set_nonblocking(true).map_err(io_err)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            inode,
            handed_over: Default::default(),
            exchange: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// Answers agents asking to take over, one at a time, until one has: returns its pid.
    /// A failed attempt changes nothing here: this agent goes on serving.
    pub async fn serve(&self, offering: &Offering) -> i32 {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "handover socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "handover socket: a connection unusable");
                    continue;
                }
            };
            if let Some(pid) = self.answer(stream, offering).await {
                return pid;
            }
        }
    }

    /// At a stop: lets the exchange in progress end, then answers the agents already waiting
    /// on the socket (a surge's new agent whose pod the kubelet saw ready, which is why this
    /// one is stopped). Whether one took over.
    pub async fn serve_waiting(&self, offering: &Offering) -> bool {
        drop(self.exchange.acquire().await);
        if self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        use std::os::fd::AsFd as _;
        while let Some(fd) = crate::server::listen::waiting(self.listener.as_fd()) {
            let stream = UnixStream::from(fd);
            if self.answer(stream, offering).await.is_some() {
                return true;
            }
        }
        false
    }

    /// One exchange, counted and logged; the new agent's pid if it took over.
    async fn answer(&self, stream: UnixStream, offering: &Offering) -> Option<i32> {
        let permit = self.exchange.clone().acquire_owned().await.ok()?;
        let Offering {
            sockets: offered,
            cache,
            metrics,
        } = offering.clone();
        let (path, handed_over) = (self.path.clone(), self.handed_over.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let given = give(stream, &path, &offered, &cache);
            let outcome = match &given {
                Ok(_) => "ok",
                Err(e) => e.label(),
            };
            metrics
                .handovers
                .get_or_create(&HandoverLabels {
                    direction: "given",
                    outcome,
                })
                .inc();
            match given {
                Ok((pid, entries)) => {
                    handed_over.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(
                        to_pid = pid,
                        listeners = offered.len(),
                        entries,
                        "handed the listeners and the cache over; no longer accepting"
                    );
                    Some(pid)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a handover did not complete; still serving");
                    None
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

impl Drop for Giver {
    fn drop(&mut self) {
        if self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|md| md.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One exchange: checks the peer, offers the sockets and the cache, waits for `Taken`.
/// Returns the new agent's pid and how many entries it got.
fn give(
    mut stream: UnixStream,
    path: &Path,
    sockets: &[(SocketAddr, OwnedFd)],
    cache: &Cache,
) -> Result<(i32, usize), HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: path.to_path_buf(),
        source,
    };
    stream.set_nonblocking(false).map_err(io_err)?;
    let pid = peer_pid(&stream)?;
    arm(&stream, Instant::now() + TAKE_TIMEOUT).map_err(io_err)?;
    let hello: Hello = read_frame(&mut stream).map_err(io_err)?;
    if hello.version != VERSION {
        return Err(HandoverError::Protocol(format!(
            "pid {} speaks version {}, this agent {VERSION}",
            hello.pid, hello.version
        )));
    }
    let entries = cache.export();
    let offer = Offer {
        version: VERSION,
        pid: std::process::id(),
        listeners: sockets.iter().map(|(addr, _)| *addr).collect(),
    };
    write_frame(&mut stream, &offer).map_err(io_err)?;
    let fds: Vec<_> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    send_fds(&stream, &fds).map_err(io_err)?;
    write_frame(&mut stream, &entries).map_err(io_err)?;
    arm(&stream, Instant::now() + CONFIRM_TIMEOUT).map_err(io_err)?;
    let taken: Taken = read_frame(&mut stream).map_err(io_err)?;
    Ok((shown_pid(pid, taken.pid), entries.len()))
}

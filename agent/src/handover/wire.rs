//! Framing on the handover socket: length-prefixed JSON frames, and descriptors passed with
//! `SCM_RIGHTS` on a one-byte message of their own (so a frame read never swallows them).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame accepted: 2,000 cache entries are about 8 MiB.
const MAX_FRAME: usize = 64 << 20;
/// Most descriptors one handover passes (listeners: two credential addresses, probes, metrics).
pub const MAX_FDS: usize = 8;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Writes `value` as one frame.
pub fn write_frame<T: Serialize>(stream: &mut UnixStream, value: &T) -> io::Result<()> {
    let body = serde_json::to_vec(value)?;
    let len = u32::try_from(body.len()).map_err(|_| invalid("frame too large".into()))?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(&body)
}

/// Reads one frame as `T`.
pub fn read_frame<T: DeserializeOwned>(stream: &mut UnixStream) -> io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "a frame of {len} bytes (most: {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Sends `fds` (the receiver gets its own copies).
pub fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let marker = [1u8];
    let iov = [IoSlice::new(&marker)];
    let rights = [ControlMessage::ScmRights(fds)];
    sendmsg::<UnixAddr>(stream.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives exactly `expected` descriptors (close-on-exec); any other number is an error,
/// and whatever arrived is closed.
pub fn recv_fds(stream: &UnixStream, expected: usize) -> io::Result<Vec<OwnedFd>> {
    if expected > MAX_FDS {
        return Err(invalid(format!(
            "{expected} descriptors offered (most: {MAX_FDS})"
        )));
    }
    let mut marker = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut marker)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() != expected {
        return Err(invalid(format!(
            "{} descriptors arrived, {expected} were announced",
            fds.len()
        )));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn frames_and_descriptors_cross_a_socket_pair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        write_frame(&mut a, &serde_json::json!({"hello": 1})).unwrap();
        send_fds(&a, &[listener.as_fd().as_raw_fd()]).unwrap();
        write_frame(&mut a, &vec![1u32, 2, 3]).unwrap();
        let hello: serde_json::Value = read_frame(&mut b).unwrap();
        assert_eq!(hello["hello"], 1);
        let fds = recv_fds(&b, 1).unwrap();
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        assert_eq!(read_frame::<Vec<u32>>(&mut b).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_count_other_than_announced_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_fds(&a, &[l1.as_raw_fd()]).unwrap();
        let e = recv_fds(&b, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let e = read_frame::<serde_json::Value>(&mut b).unwrap_err();
        assert!(e.to_string().contains("most"), "{e}");
    }
}

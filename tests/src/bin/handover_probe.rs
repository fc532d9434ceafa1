//! What any process gets from an agent's handover socket, asked as the new agent asks:
//! `handover-probe SOCKET`. Connects, sends a `Hello` frame of the current protocol, reads
//! everything the agent sends for up to 3 s (counting the descriptors that come with it), and
//! prints one JSON line: `{"connect": "ok" | error, "errno": N, "bytes": N, "fds": N}`.
//! The tests run it as a user that is not root: it must get nothing.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: handover-probe SOCKET");
        std::process::exit(2);
    };
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            report(
                &format!("{:?}", e.kind()),
                e.raw_os_error().unwrap_or(0),
                0,
                0,
            );
            return;
        }
    };
    let hello = serde_json::json!({ "version": 1, "pid": std::process::id() }).to_string();
    let _ = stream
        .write_all(&(hello.len() as u32).to_be_bytes())
        .and_then(|()| stream.write_all(hello.as_bytes()));
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut bytes, mut fds) = (0usize, 0usize);
    while let Some(left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        let _ = stream.set_read_timeout(Some(left));
        match receive(&stream) {
            Some((0, _)) | None => break,
            Some((n, f)) => {
                bytes += n;
                fds += f;
            }
        }
    }
    report("ok", 0, bytes, fds);
}

/// One `recvmsg`: bytes read and descriptors received (closed at once), or `None` on error.
fn receive(stream: &UnixStream) -> Option<(usize, usize)> {
    let mut buf = [0u8; 65536];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 64];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return None;
    }
    let mut fds = 0;
    // SAFETY: walking the control messages the kernel just wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    libc::close(*data.add(i));
                }
                fds += count;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Some((n as usize, fds))
}

fn report(connect: &str, errno: i32, bytes: usize, fds: usize) {
    println!(
        "{}",
        serde_json::json!({ "connect": connect, "errno": errno, "bytes": bytes, "fds": fds })
    );
}

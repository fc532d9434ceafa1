//! `relay LISTEN (--original-dst | TARGET)`: a TCP relay run inside a pod. With
//! `--original-dst` it is a mesh sidecar's transparent proxy: connections REDIRECTed to it
//! are dialled on to their original destination (`SO_ORIGINAL_DST`). With TARGET it is an
//! in-cluster forward proxy that relays every connection to TARGET. Prints `listening` once
//! bound; relays until killed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6): the same number, per level.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the client dialled before netfilter redirected it here.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let v6 = s.local_addr()?.is_ipv6();
    // SAFETY: sockaddr_in6 is larger than sockaddr_in; zeroed is a valid value of both.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: addr and len describe a writable buffer of len bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(if v6 {
        SocketAddr::new(
            std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr).into(),
            u16::from_be(addr.sin6_port),
        )
    } else {
        // SAFETY: for IPv4 the kernel wrote a sockaddr_in at the start of the buffer.
        let v4: libc::sockaddr_in =
            unsafe { std::ptr::from_ref(&addr).cast::<libc::sockaddr_in>().read() };
        SocketAddr::new(
            std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)).into(),
            u16::from_be(v4.sin_port),
        )
    })
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target] = &args[..] else {
        eprintln!("usage: relay LISTEN (--original-dst | TARGET)");
        std::process::exit(2);
    };
    let fixed: Option<SocketAddr> =
        (target != "--original-dst").then(|| target.parse().expect("TARGET"));
    let listener = TcpListener::bind(listen.parse::<SocketAddr>().expect("LISTEN")).expect("bind");
    println!("listening");
    for client in listener.incoming().flatten() {
        let dst = match fixed {
            Some(t) => t,
            None => match original_dst(&client) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("relay: no original destination: {e}");
                    continue;
                }
            },
        };
        std::thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(dst) else {
                return;
            };
            let (c2, u2) = (
                client.try_clone().expect("clone"),
                upstream.try_clone().expect("clone"),
            );
            let back = std::thread::spawn(move || pipe(u2, c2));
            pipe(client, upstream);
            let _ = back.join();
        });
    }
}

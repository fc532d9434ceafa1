//! `connect-bench ADDR COUNT`: COUNT sequential connects to ADDR, each closed with RST
//! (SO_LINGER 0, so TIME_WAIT does not skew the figure). Prints connects per second.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, count] = &args[..] else {
        eprintln!("usage: connect-bench ADDR COUNT");
        std::process::exit(2);
    };
    let count: u64 = count.parse().expect("COUNT");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let (mut ok, mut failed) = (0u64, 0u64);
    let started = Instant::now();
    for _ in 0..count {
        match TcpStream::connect(addr) {
            Ok(s) => {
                // SAFETY: setsockopt on an open socket with a properly sized linger struct.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    );
                }
                ok += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"connects": ok, "failed": failed, "elapsed_ms": (secs * 1000.0) as u64, "per_sec": ok as f64 / secs})
    );
}

//! `connect-bench ADDR COUNT [THREADS]`: COUNT connects to ADDR (spread over THREADS, default
//! 1), each closed with RST (SO_LINGER 0, so TIME_WAIT does not skew the figure). Prints
//! connects per second, failures, and connects that took over 900 ms (a dropped SYN costs the
//! client a 1 s retransmit: the signature of a full accept queue).

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Counts of one thread: (ok, failed, slow).
fn run(addr: &str, count: u64) -> (u64, u64, u64) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let (mut ok, mut failed, mut slow) = (0, 0, 0);
    for _ in 0..count {
        let started = Instant::now();
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
        if started.elapsed() > Duration::from_millis(900) {
            slow += 1;
        }
    }
    (ok, failed, slow)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, count, threads) = match &args[..] {
        [addr, count] => (addr, count, "1"),
        [addr, count, threads] => (addr, count, threads.as_str()),
        _ => {
            eprintln!("usage: connect-bench ADDR COUNT [THREADS]");
            std::process::exit(2);
        }
    };
    let count: u64 = count.parse().expect("COUNT");
    let threads: u64 = threads.parse().expect("THREADS");
    let started = Instant::now();
    let (ok, failed, slow) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = count / threads + u64::from(t < count % threads);
                s.spawn(move || run(addr, share))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("connect thread"))
            .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"connects": ok, "failed": failed, "slow": slow,
            "elapsed_ms": (secs * 1000.0) as u64, "per_sec": ok as f64 / secs})
    );
}

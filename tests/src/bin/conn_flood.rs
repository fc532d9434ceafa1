//! `conn-flood ADDR COUNT HOLD_SECS`: opens COUNT connections to ADDR, sends each an
//! unfinished request head, prints one JSON line (opened, failed), then holds them for
//! HOLD_SECS. The hardening suite's descriptor-exhaustion attack.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, count, hold] = &args[..] else {
        eprintln!("usage: conn-flood ADDR COUNT HOLD_SECS");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("COUNT");
    let hold: u64 = hold.parse().expect("HOLD_SECS");
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr.parse().expect("ADDR"), Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                held.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"opened": held.len(), "failed": failed})
    );
    std::thread::sleep(Duration::from_secs(hold));
}

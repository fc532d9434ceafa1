//! A deliberately crude HTTP client for malformed and slow requests that curl will not send:
//! `raw-http ADDR [--drip SECONDS] [--half-close] [--wait SECONDS]` writes stdin to ADDR (all
//! at once, or one byte every SECONDS; then shuts its sending side with --half-close; with
//! --wait, only SECONDS after connecting, having said `connected` on stderr), and prints what
//! came back and how long until the server answered or closed.
//! Output: one JSON line `{"status":N,"response":"...","closed_after_ms":N}`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .expect("usage: raw-http ADDR [--drip SECONDS] [--half-close] [--wait SECONDS]");
    let (mut drip, mut half_close, mut wait) = (None, false, None);
    while let Some(flag) = args.next() {
        let mut seconds = || {
            let secs: f64 = args
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{flag} SECONDS"));
            Some(Duration::from_secs_f64(secs))
        };
        match flag.as_str() {
            "--drip" => drip = seconds(),
            "--wait" => wait = seconds(),
            "--half-close" => half_close = true,
            other => panic!("unknown flag {other}"),
        }
    }
    let mut request = Vec::new();
    std::io::stdin().read_to_end(&mut request).expect("stdin");
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let started = Instant::now();
    if let Some(wait) = wait {
        eprintln!("connected");
        std::thread::sleep(wait);
    }
    match drip {
        None => {
            let _ = stream.write_all(&request);
        }
        Some(every) => {
            // Stop dripping once the server has closed on us.
            let _ = stream.set_nonblocking(true);
            for b in &request {
                if stream.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(every);
                let mut probe = [0u8; 1];
                if matches!(stream.peek(&mut probe), Ok(0) | Ok(1..)) {
                    break;
                }
            }
            let _ = stream.set_nonblocking(false);
        }
    }
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "status": status,
            "response": text,
            "closed_after_ms": started.elapsed().as_millis() as u64,
        })
    );
}

//! A bounded load client run inside a pod:
//! `load ADDR HOST TOKEN_FILE COUNT CONCURRENCY [PATH]`.
//! Each request is a new connection (as SDKs do): connect, `GET PATH` (default
//! `/v1/credentials`), read to EOF.
//! A refused connect backs off 10 ms. Stops after COUNT requests or 120 s. Prints one JSON line with status counts, connection
//! errors and latency percentiles (µs).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, host, token_file, count, concurrency, path) = match &args[..] {
        [a, h, t, n, c] => (a, h, t, n, c, "/v1/credentials"),
        [a, h, t, n, c, p] => (a, h, t, n, c, p.as_str()),
        _ => {
            eprintln!("usage: load ADDR HOST TOKEN_FILE COUNT CONCURRENCY [PATH]");
            std::process::exit(2);
        }
    };
    let token = std::fs::read_to_string(token_file).expect("token file");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    );
    let count: usize = count.parse().expect("COUNT");
    let concurrency: usize = concurrency.parse().expect("CONCURRENCY");
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new((
        BTreeMap::<u16, u64>::new(),
        [0u64; 2],
        Vec::<u64>::new(),
    )));
    let expect: Option<String> = std::env::var("LOAD_EXPECT").ok();
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, results, request, addr, expect) = (
                next.clone(),
                results.clone(),
                request.clone(),
                addr.clone(),
                expect.clone(),
            );
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                    let t = Instant::now();
                    let status = one(&addr, &request, expect.as_deref());
                    let micros = t.elapsed().as_micros() as u64;
                    let mut r = results.lock().unwrap();
                    match status {
                        Ok(s) => *r.0.entry(s).or_default() += 1,
                        Err(Failure::Refused) => {
                            r.1[0] += 1;
                            drop(r);
                            // Back off like an SDK would, instead of burning the budget.
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(Failure::Broken) => r.1[1] += 1,
                    }
                    r.2.push(micros);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let (statuses, [refused, broken], mut lat) =
        Arc::try_unwrap(results).unwrap().into_inner().unwrap();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let statuses: BTreeMap<String, u64> = statuses
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "statuses": statuses,
            "errors": refused + broken,
            "refused": refused,
            "broken": broken,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "elapsed_ms": started.elapsed().as_millis() as u64,
        })
    );
}

/// How a request failed without an HTTP answer.
enum Failure {
    /// The connect itself failed (nothing listening).
    Refused,
    /// Connected, but no complete answer (reset, timeout, garbage).
    Broken,
}

/// One request on a fresh connection; the status, or how it failed.
/// A 200 whose body lacks `$LOAD_EXPECT` (when set) is reported as status 299: an answer with
/// the wrong content.
fn one(addr: &str, request: &str, expect: Option<&str>) -> Result<u16, Failure> {
    let mut s = TcpStream::connect(addr).map_err(|_| Failure::Refused)?;
    let broken = |_| Failure::Broken;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(broken)?;
    s.write_all(request.as_bytes()).map_err(broken)?;
    let mut buf = Vec::with_capacity(1024);
    s.read_to_end(&mut buf).map_err(broken)?;
    let status: u16 = buf
        .get(9..12)
        .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
        .ok_or(Failure::Broken)?;
    let wrong = status == 200 && expect.is_some_and(|e| !String::from_utf8_lossy(&buf).contains(e));
    Ok(if wrong { 299 } else { status })
}

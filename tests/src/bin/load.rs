//! A bounded load client run inside a pod:
//! `load ADDR HOST TOKEN_FILE COUNT CONCURRENCY [PATH]`.
//!
//! By default each request is a new connection (as SDKs do): connect, `GET PATH` (default
//! `/v1/credentials`), read to EOF. A refused connect backs off 10 ms. Stops after COUNT
//! requests or 120 s, and prints one JSON line: status counts, connection failures (and the
//! connect errors by kind), latency percentiles (µs), wall time.
//!
//! Environment:
//! - `LOAD_KEEPALIVE=1`: one persistent connection per worker.
//! - `LOAD_TOKENS=FILE`: one token per line, used in turn (instead of TOKEN_FILE's one token).
//! - `LOAD_RETRIES=N`: retry a 5xx or a failed connection up to N times, 1 s apart (as SDKs do).
//! - `LOAD_EXPECT=TEXT`: a 200 whose body lacks TEXT is counted as status 299 (wrong answer).
//! - `LOAD_INTERVAL_MS=N`: each worker waits N ms after each request (a quiet, paced caller).
//! - `LOAD_SECONDS=N`: stop after N s instead of 120 s.
//! - `LOAD_TRACE=FILE`: also write one line per request to FILE: its start (µs since the
//!   Unix epoch), its latency (µs) and how it ended (`ok`, `refused`, `broken`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a request failed without an HTTP answer.
enum Failure {
    /// The connect itself failed (nothing listening, or refused by the kernel's budget).
    Refused(std::io::ErrorKind),
    /// Connected, but no complete answer (reset, timeout, garbage).
    Broken,
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, u64>,
    refused: u64,
    /// Connect failures by error kind (`ConnectionRefused`, ...).
    connect_errors: BTreeMap<String, u64>,
    broken: u64,
    retries: u64,
    latencies: Vec<u64>,
    /// (start µs since the epoch, latency µs, outcome), with `LOAD_TRACE`.
    trace: Vec<(u128, u64, &'static str)>,
}

struct Options {
    addr: String,
    requests: Vec<String>,
    keepalive: bool,
    retries: u32,
    expect: Option<String>,
    interval: Duration,
    trace: bool,
}

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
    let keepalive = std::env::var("LOAD_KEEPALIVE").is_ok_and(|v| v == "1");
    let tokens: Vec<String> = match std::env::var("LOAD_TOKENS") {
        Ok(file) => std::fs::read_to_string(file)
            .expect("LOAD_TOKENS file")
            .lines()
            .map(str::to_owned)
            .collect(),
        Err(_) => vec![std::fs::read_to_string(token_file).expect("token file")],
    };
    let connection = if keepalive { "keep-alive" } else { "close" };
    let options = Arc::new(Options {
        addr: addr.clone(),
        requests: tokens
            .iter()
            .map(|t| {
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {t}\r\nConnection: {connection}\r\n\r\n")
            })
            .collect(),
        keepalive,
        retries: env_number("LOAD_RETRIES").unwrap_or(0) as u32,
        expect: std::env::var("LOAD_EXPECT").ok(),
        interval: Duration::from_millis(env_number("LOAD_INTERVAL_MS").unwrap_or(0)),
        trace: std::env::var_os("LOAD_TRACE").is_some(),
    });
    let count: usize = count.parse().expect("COUNT");
    let concurrency: usize = concurrency.parse().expect("CONCURRENCY");
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = Instant::now() + Duration::from_secs(env_number("LOAD_SECONDS").unwrap_or(120));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, tally, options) = (next.clone(), tally.clone(), options.clone());
            std::thread::spawn(move || worker(&options, &next, count, deadline, &tally))
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let mut t = Arc::try_unwrap(tally)
        .ok()
        .expect("workers done")
        .into_inner()
        .unwrap();
    if let Some(file) = std::env::var_os("LOAD_TRACE") {
        let lines: String = t
            .trace
            .iter()
            .map(|(at, us, outcome)| format!("{at} {us} {outcome}\n"))
            .collect();
        std::fs::write(file, lines).expect("LOAD_TRACE file");
    }
    t.latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((t.latencies.len() as f64 * p) as usize).min(t.latencies.len().saturating_sub(1));
        t.latencies.get(i).copied().unwrap_or(0)
    };
    let statuses: BTreeMap<String, u64> = t
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "statuses": statuses,
            "errors": t.refused + t.broken,
            "refused": t.refused,
            "connect_errors": t.connect_errors,
            "broken": t.broken,
            "retries": t.retries,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "elapsed_ms": started.elapsed().as_millis() as u64,
        })
    );
}

fn worker(o: &Options, next: &AtomicUsize, count: usize, deadline: Instant, tally: &Mutex<Tally>) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count || Instant::now() >= deadline {
            return;
        }
        let request = &o.requests[i % o.requests.len()];
        let started = Instant::now();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let mut attempt = 0;
        let result = loop {
            let r = if o.keepalive {
                keepalive(&o.addr, request, &mut conn)
            } else {
                fresh(&o.addr, request)
            };
            let retry = matches!(&r, Ok((s, _)) if *s >= 500) || r.is_err();
            if !retry || attempt >= o.retries {
                break r;
            }
            attempt += 1;
            tally.lock().unwrap().retries += 1;
            std::thread::sleep(Duration::from_secs(1));
        };
        let micros = started.elapsed().as_micros() as u64;
        let mut t = tally.lock().unwrap();
        if o.trace {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Failure::Refused(_)) => "refused",
                Err(Failure::Broken) => "broken",
            };
            t.trace.push((wall, micros, outcome));
        }
        match result {
            Ok((status, body)) => {
                let wrong = status == 200 && o.expect.as_deref().is_some_and(|e| !body.contains(e));
                *t.statuses
                    .entry(if wrong { 299 } else { status })
                    .or_default() += 1;
            }
            Err(Failure::Refused(kind)) => {
                t.refused += 1;
                *t.connect_errors.entry(format!("{kind:?}")).or_default() += 1;
                drop(t);
                // Back off like an SDK would, instead of burning the budget.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(Failure::Broken) => t.broken += 1,
        }
        t.latencies.push(micros);
        drop(t);
        if !o.interval.is_zero() {
            std::thread::sleep(o.interval);
        }
    }
}

/// A numeric environment option.
fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// One request on a fresh connection.
fn fresh(addr: &str, request: &str) -> Result<(u16, String), Failure> {
    let mut s = TcpStream::connect(addr).map_err(|e| Failure::Refused(e.kind()))?;
    let broken = |_| Failure::Broken;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(broken)?;
    s.write_all(request.as_bytes()).map_err(broken)?;
    let mut buf = Vec::with_capacity(1024);
    s.read_to_end(&mut buf).map_err(broken)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or(Failure::Broken)?;
    Ok((status, text))
}

/// One request on the worker's persistent connection (opened on first use or after a failure).
fn keepalive(
    addr: &str,
    request: &str,
    conn: &mut Option<BufReader<TcpStream>>,
) -> Result<(u16, String), Failure> {
    if conn.is_none() {
        let s = TcpStream::connect(addr).map_err(|e| Failure::Refused(e.kind()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|_| Failure::Broken)?;
        let _ = s.set_nodelay(true);
        *conn = Some(BufReader::new(s));
    }
    let r = exchange(conn.as_mut().expect("just set"), request);
    if r.is_err() {
        *conn = None;
    }
    r
}

fn exchange(c: &mut BufReader<TcpStream>, request: &str) -> Result<(u16, String), Failure> {
    let broken = |_| Failure::Broken;
    c.get_mut().write_all(request.as_bytes()).map_err(broken)?;
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if c.read_line(&mut line).map_err(broken)? == 0 {
            return Err(Failure::Broken);
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().map_err(|_| Failure::Broken)?;
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let mut body = vec![0u8; length];
    c.read_exact(&mut body).map_err(broken)?;
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or(Failure::Broken)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

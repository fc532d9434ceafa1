//! Baselines for `cargo xtask bench`: `bare-server ADDR BODY_FILE` answers every request with
//! the fixed body (a bare hyper server, the limit for the agent's warm path);
//! `bare-server ADDR --accept-only` accepts connections and drops them. `BARE_AS_AGENT=timer,drain`
//! adds the agent's HTTP/1 settings and its stop handling.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, mode] = &args[..] else {
        anyhow::bail!("usage: bare-server ADDR (BODY_FILE | --accept-only)");
    };
    // The agent's own listener set-up (accept queue up to somaxconn): a fair baseline.
    let backlog = agent::server::listen::backlog(None);
    let listener = agent::server::listen::bind(addr.parse()?, backlog)?;
    if mode == "--accept-only" {
        loop {
            let (stream, _) = listener.accept().await?;
            drop(stream);
        }
    }
    let body = Bytes::from(std::fs::read(mode)?);
    // BARE_AS_AGENT=timer,drain: connection settings, to measure what each costs: hyper's
    // header read timer (what the admin listeners use); the agent's stop handling and head
    // timer (`drain`) (`cargo xtask bench`
    // with BENCH_CANDIDATE_BARE).
    let like = std::env::var("BARE_AS_AGENT").unwrap_or_default();
    let (timer, drain) = (like.contains("timer"), like.contains("drain"));
    let stopper = std::sync::Arc::new(agent::server::drain::Stopper::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let stop = drain.then(|| stopper.register());
        tokio::spawn(async move {
            // With `drain`, the requests are counted for the head timer as the agent's are.
            let progress = std::sync::Arc::new(agent::server::drain::Progress::default());
            let svc = service_fn({
                let progress = progress.clone();
                move |_req| {
                    let body = body.clone();
                    let progress = drain.then(|| progress.clone());
                    if let Some(p) = &progress {
                        p.begun();
                    }
                    async move {
                        let mut resp = hyper::Response::new(Full::new(body));
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().expect("valid"));
                        if let Some(p) = progress {
                            p.answered(std::time::Instant::now());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                }
            });
            let builder = if timer {
                agent::server::http1()
            } else {
                http1::Builder::new()
            };
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            if let Some(stop) = stop {
                let timeout = agent::server::HEADER_READ_TIMEOUT;
                let _ =
                    agent::server::drain::serve_until_stopped(conn, &progress, timeout, stop).await;
            } else {
                let _ = conn.await;
            }
        });
    }
}

//! Baselines for `cargo xtask bench`: `bare-server ADDR BODY_FILE` answers every request with
//! the fixed body (a bare hyper server, the limit for the agent's warm path);
//! `bare-server ADDR --accept-only` accepts connections and drops them.

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
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    let mut resp = hyper::Response::new(Full::new(body));
                    resp.headers_mut()
                        .insert("content-type", "application/json".parse().expect("valid"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

//! A fake EKS Auth (`AssumeRoleForPodIdentity`, restJson1) listening on the node
//! namespace's loopback: verifies the issuer's JWTs, maps (namespace, service account) to a
//! role, answers the real response and error shapes, counts calls, and injects faults.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::issuer::{AUDIENCE, ISSUER};
use crate::netns::NetNs;

/// The account the fake's roles live in.
pub const ACCOUNT: &str = "111122223333";
/// The region the fake pretends to serve.
pub const REGION: &str = "us-west-2";

/// What the next calls should suffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer normally after a delay.
    Latency(Duration),
    /// Answer with this status and the matching EKS Auth error code.
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer 200 with a well-formed body that lacks the credentials.
    NoCredentials,
    /// Send a response head promising more body than follows, then close.
    Truncated,
    /// Throttle (429) calls beyond this many in the last second.
    RateLimit(usize),
}

/// Credentials the fake handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Namespace of the caller's service account.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The pod the token named.
    pub pod_name: String,
    /// Role ARN.
    pub role_arn: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret key.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
    /// Expiry, epoch seconds.
    pub expiration: u64,
}

#[derive(Debug)]
struct Shared {
    cluster: String,
    /// `None`: claims are read without checking the signature (kind recipe only).
    key: Option<DecodingKey>,
    associations: Mutex<HashMap<(String, String), String>>,
    fault: Mutex<Fault>,
    calls: AtomicUsize,
    issued: Mutex<Vec<Issued>>,
    signers: Mutex<Vec<String>>,
    lifetime: Mutex<Duration>,
    recent: Mutex<std::collections::VecDeque<std::time::Instant>>,
}

/// Handle to a running fake, served by its own runtime; it stops when the last clone drops.
#[derive(Debug, Clone)]
pub struct FakeEksAuth {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _runtime: Arc<tokio::runtime::Runtime>,
}

impl FakeEksAuth {
    /// Starts the fake on `127.0.0.1:<ephemeral>` inside `node`.
    pub fn start(node: &NetNs, cluster: &str, key: DecodingKey) -> Result<Self> {
        let listener = node.run_in(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
        Self::serve(listener, cluster, Some(key))
    }

    /// Serves on `std_listener`; with `key` `None`, token signatures are not checked.
    pub fn serve(
        std_listener: std::net::TcpListener,
        cluster: &str,
        key: Option<DecodingKey>,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let shared = Arc::new(Shared {
            cluster: cluster.to_owned(),
            key,
            associations: Mutex::new(HashMap::new()),
            fault: Mutex::new(Fault::None),
            calls: AtomicUsize::new(0),
            issued: Mutex::new(Vec::new()),
            signers: Mutex::new(Vec::new()),
            recent: Mutex::new(std::collections::VecDeque::new()),
            lifetime: Mutex::new(Duration::from_secs(6 * 3600)),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if *s.fault.lock().unwrap() == Fault::Truncated {
                    s.calls.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(truncated(stream));
                    continue;
                }
                if *s.fault.lock().unwrap() == Fault::Reset {
                    s.calls.fetch_add(1, Ordering::SeqCst);
                    // Linger 0: the close sends RST, as a dying load balancer would.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(answer(&s, req).await) }
                    });
                    // One call per connection, so an injected reset hits every call.
                    let _ = http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            _runtime: Arc::new(runtime),
        })
    }

    /// `http://127.0.0.1:<port>` (reachable from the node namespace only).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Associates (namespace, service account) with a role name.
    pub fn associate(&self, namespace: &str, service_account: &str, role: &str) {
        self.shared.associations.lock().unwrap().insert(
            (namespace.into(), service_account.into()),
            format!("arn:aws:iam::{ACCOUNT}:role/{role}"),
        );
    }

    /// Sets the fault for subsequent calls.
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks the calling thread for as long as the fake should run.
    pub fn wait_forever(&self) -> ! {
        loop {
            std::thread::park();
        }
    }

    /// Sets the lifetime of credentials issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        *self.shared.lifetime.lock().unwrap() = lifetime;
    }

    /// Calls received (every attempt, faulted or not).
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// The access key id that signed each well-formed call, oldest first.
    pub fn signers(&self) -> Vec<String> {
        self.shared.signers.lock().unwrap().clone()
    }

    /// Credentials issued so far, oldest first.
    pub fn issued(&self) -> Vec<Issued> {
        self.shared.issued.lock().unwrap().clone()
    }
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "message": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-errortype", code)
        .header("x-amzn-requestid", "fake-request-id")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn code_for_status(status: u16) -> &'static str {
    match status {
        400 => "InvalidRequestException",
        403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        _ => "InternalServerException",
    }
}

async fn answer(s: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let fault = s.fault.lock().unwrap().clone();
    match fault {
        // Reset is handled at accept.
        Fault::None | Fault::Reset => {}
        Fault::Latency(d) => tokio::time::sleep(d).await,
        Fault::Status(code) => {
            return error(code, code_for_status(code), "injected fault");
        }
        Fault::Garbage => {
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"<html>this is not JSON {")))
                .expect("valid response");
        }
        Fault::NoCredentials => {
            let body = serde_json::json!({"audience": AUDIENCE, "subject": {"namespace": "x", "serviceAccount": "y"}});
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("valid response");
        }
        Fault::Truncated => unreachable!("handled at accept"),
        Fault::RateLimit(per_sec) => {
            let now = std::time::Instant::now();
            let mut recent = s.recent.lock().unwrap();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
            {
                recent.pop_front();
            }
            if recent.len() >= per_sec {
                return error(429, "ThrottlingException", "Rate exceeded");
            }
            recent.push_back(now);
        }
    }
    let expected_path = format!("/clusters/{}/assume-role-for-pod-identity", s.cluster);
    if req.method() != http::Method::POST || req.uri().path() != expected_path {
        return error(404, "UnknownOperationException", "no such operation");
    }
    // SigV4 with signing name eks-auth, as the real service requires.
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !auth.starts_with("AWS4-HMAC-SHA256 Credential=") || !auth.contains("/eks-auth/aws4_request")
    {
        return error(
            403,
            "AccessDeniedException",
            "request is not SigV4-signed for eks-auth",
        );
    }
    let signer = auth["AWS4-HMAC-SHA256 Credential=".len()..]
        .split('/')
        .next()
        .unwrap_or_default();
    s.signers.lock().unwrap().push(signer.to_owned());
    let Ok(body) = req.into_body().collect().await else {
        return error(400, "InvalidRequestException", "unreadable body");
    };
    let token = serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
        .ok()
        .and_then(|v| v.get("token")?.as_str().map(str::to_owned));
    let Some(token) = token else {
        return error(400, "InvalidParameterException", "token is required");
    };
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[ISSUER]);
    validation.leeway = 0;
    let decoded = match &s.key {
        Some(key) => jsonwebtoken::decode::<serde_json::Value>(&token, key, &validation),
        None => jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&token),
    };
    let claims = match decoded {
        Ok(d) => d.claims,
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
            return error(
                400,
                "ExpiredTokenException",
                "the service account token has expired",
            );
        }
        Err(e) => {
            return error(
                400,
                "InvalidTokenException",
                &format!("invalid service account token: {e}"),
            );
        }
    };
    let k8s = &claims["kubernetes.io"];
    let namespace = k8s["namespace"].as_str().unwrap_or_default().to_owned();
    let service_account = k8s["serviceaccount"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let pod_name = k8s["pod"]["name"].as_str().unwrap_or_default().to_owned();
    let role_arn = s
        .associations
        .lock()
        .unwrap()
        .get(&(namespace.clone(), service_account.clone()))
        .cloned();
    let Some(role_arn) = role_arn else {
        return error(
            404,
            "ResourceNotFoundException",
            &format!(
                "no Pod Identity association for service account {namespace}/{service_account}"
            ),
        );
    };
    let lifetime = *s.lifetime.lock().unwrap();
    let expiration = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + lifetime.as_secs();
    let issued = Issued {
        namespace: namespace.clone(),
        service_account: service_account.clone(),
        pod_name: pod_name.clone(),
        role_arn: role_arn.clone(),
        access_key_id: format!("ASIA{}", random_hex(8).to_uppercase()),
        secret_access_key: random_hex(20),
        // The pod's name inside the session token lets tests check whose credentials a pod got.
        session_token: format!("IQoJb3JpZ2luX2Vj.{pod_name}.{}", random_hex(32)),
        expiration,
    };
    s.issued.lock().unwrap().push(issued.clone());
    let role_name = role_arn.rsplit('/').next().unwrap_or_default();
    let session = format!("eks-{}-{pod_name}", s.cluster);
    let body = serde_json::json!({
        "subject": {"namespace": namespace, "serviceAccount": service_account},
        "audience": AUDIENCE,
        "podIdentityAssociation": {
            "associationArn": format!("arn:aws:eks:{REGION}:{ACCOUNT}:podidentityassociation/{}/a-sandbox", s.cluster),
            "associationId": "a-sandbox",
        },
        "assumedRoleUser": {
            "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role_name}/{session}"),
            "assumeRoleId": format!("AROASANDBOX:{session}"),
        },
        "credentials": {
            "accessKeyId": issued.access_key_id,
            "secretAccessKey": issued.secret_access_key,
            "sessionToken": issued.session_token,
            "expiration": expiration,
        },
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// Reads the request, then answers with a head promising 500 bytes and sends 12.
async fn truncated(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"subject\":{")
        .await;
    let _ = stream.shutdown().await;
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system randomness");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

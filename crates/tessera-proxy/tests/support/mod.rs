//! Test support: in-process backends, a proxy on ephemeral ports, and clients.
//!
//! Backends are real hyper servers running in the test's own runtime; the proxy runs its own
//! worker threads, exactly as in production. Every port is ephemeral.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tessera_model::Config;
use tessera_proxy::{Options, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type Body = BoxBody<Bytes, hyper::Error>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync>;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
}

/// An in-process HTTP/1.1 + h2c backend.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The listener task and every connection task, for `kill`.
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Backend {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn last(&self) -> Seen {
        self.seen().last().cloned().expect("the backend saw no request")
    }
    /// Dies like a crashed process: the listener closes and every connection is dropped.
    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Starts a backend that answers with `h`.
pub async fn backend_with(h: Handler) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b = Backend {
        addr,
        connections: Arc::default(),
        seen: Arc::default(),
        tasks: Arc::default(),
    };
    let (conns, seen, tasks) = (b.connections.clone(), b.seen.clone(), b.tasks.clone());
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            let (h, seen) = (h.clone(), seen.clone());
            let conn = tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    seen.lock().unwrap().push(Seen {
                        method: req.method().clone(),
                        uri: req.uri().to_string(),
                        version: req.version(),
                        headers: req.headers().clone(),
                    });
                    let fut = h(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
            tasks.lock().unwrap().push(conn.abort_handle());
        }
    });
    b.tasks.lock().unwrap().push(accept.abort_handle());
    b
}

/// A backend that answers `200 <name> <path>` and echoes nothing else.
pub async fn backend(name: &'static str) -> Backend {
    backend_with(Arc::new(move |req: Request<Incoming>| {
        let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        Box::pin(async move {
            let mut r = Response::new(full(format!("{name} {path}")));
            r.headers_mut().insert("x-backend", name.parse().unwrap());
            r
        })
    }))
    .await
}

/// Parses `yaml` (panicking with every error) and starts a proxy with two workers and an admin API.
pub async fn proxy(yaml: &str) -> Server {
    proxy_with(yaml, 2).await
}

pub async fn proxy_with(yaml: &str, concurrency: usize) -> Server {
    let cfg = Config::from_yaml(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    Server::start(
        cfg,
        Options {
            concurrency,
            admin: Some("127.0.0.1:0".parse().unwrap()),
            secret_refresh: std::time::Duration::from_millis(50),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("proxy did not start: {e}"))
}

/// A one-listener HTTP proxy config with `routes` (YAML list items, indented 10) and `clusters`.
pub fn http_config(routes: &str, clusters: &str) -> String {
    format!(
        r#"
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - http:
      stat_prefix: ingress
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
{routes}
clusters:
{clusters}
"#
    )
}

pub fn listener(server: &Server) -> SocketAddr {
    server.listener_addr("http").expect("listener `http`")
}

/// One HTTP/1.1 connection to `addr`.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    tx
}

/// One HTTP/2 (prior knowledge) connection to `addr`.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx
}

/// A collected response.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
}

pub async fn collect(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("response body");
    let trailers = collected.trailers().cloned();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
    }
}

pub fn req(method: &str, uri: &str) -> http::request::Builder {
    Request::builder().method(method).uri(uri).header("host", "test.local")
}

/// GET `path` on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str) -> Got {
    send(addr, req("GET", path).body(empty()).unwrap()).await
}

/// Sends `r` on a new HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, r: Request<Body>) -> Got {
    let mut c = h1(addr).await;
    collect(c.send_request(r).await.expect("response")).await
}

/// Writes raw bytes and reads until the peer closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// GET on the admin API.
pub async fn admin(server: &Server, path: &str) -> Got {
    get(server.admin_addr().expect("admin"), path).await
}

pub async fn admin_post(server: &Server, path: &str) -> Got {
    send(
        server.admin_addr().expect("admin"),
        req("POST", path).body(empty()).unwrap(),
    )
    .await
}

/// Waits until `f` holds, or panics after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn stat(server: &Server, name: &str) -> i128 {
    server.stat(name).unwrap_or_else(|| panic!("no stat `{name}`"))
}

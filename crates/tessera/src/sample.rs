//! The sample service shipped for demos and tests: HTTP/1.1 and h2c on one port.
//!
//! `GET /` says hello; `/echo` returns the request body; `/headers` returns the request as JSON;
//! `/status/N` answers with status N; `/delay/MS` answers after MS milliseconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Binds `addr` and serves each accepted connection with `serve` on a task of its own.
async fn listen<F, Fut>(addr: SocketAddr, name: String, serve: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(tokio::net::TcpStream, Arc<str>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("sample service `{name}`: cannot bind {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream, name.clone()));
        }
    });
    Ok(bound)
}

pub(crate) async fn start(addr: SocketAddr, name: String) -> anyhow::Result<SocketAddr> {
    listen(addr, name, |stream, name| async move {
        let svc = hyper::service::service_fn(move |req| handle(name.clone(), req));
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
    .await
}

async fn handle(name: Arc<str>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let reply = |status: StatusCode, ct: &'static str, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
        r
    };
    if path == "/echo" {
        let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut r = reply(StatusCode::OK, "application/octet-stream", body);
        if let Some(ct) = ct {
            r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        }
        return Ok(r);
    }
    if path == "/headers" {
        let mut headers = serde_json::Map::new();
        for (k, v) in req.headers() {
            headers.insert(k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned().into());
        }
        let v = serde_json::json!({
            "service": &*name,
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        return Ok(reply(StatusCode::OK, "application/json", Bytes::from(v.to_string())));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        return Ok(reply(status, "text/plain", Bytes::from(format!("{status}\n"))));
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0).min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(reply(
            StatusCode::OK,
            "text/plain",
            Bytes::from(format!("waited {ms}ms\n")),
        ));
    }
    Ok(reply(
        StatusCode::OK,
        "text/plain",
        Bytes::from(format!("hello from {name} ({path})\n")),
    ))
}

/// The Dubbo sample service: answers every request with the string
/// `hello from <name>: <interface>.<method>` (Hessian2, status OK) and heartbeats with their
/// reply; a connection that sends something that is not Dubbo is closed.
pub(crate) async fn start_dubbo(addr: SocketAddr, name: String) -> anyhow::Result<SocketAddr> {
    listen(addr, name, serve_dubbo).await
}

async fn serve_dubbo(mut stream: tokio::net::TcpStream, name: Arc<str>) {
    use tessera_rpc::{Codec, Kind, Limits, Need, dubbo, hessian};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let codec = dubbo::Dubbo;
    let limits = Limits::default();
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut out = Vec::new();
        loop {
            let frame = match codec.decode(&mut buf, &limits) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(service = %name, error = %e, "sample Dubbo service: closing");
                    return;
                }
            };
            match frame.kind {
                Kind::Request => {
                    let text = match codec.route_keys(&frame, Need { body: true }, &limits) {
                        Ok(k) => format!("hello from {name}: {}.{}", k.service, k.method),
                        Err(e) => format!("hello from {name}: unreadable request ({e})"),
                    };
                    let mut w = hessian::Writer::new(hessian::Dialect::Final);
                    w.int(1).string(&text);
                    out.extend_from_slice(&dubbo::encode_response(
                        frame.request_id,
                        dubbo::STATUS_OK,
                        &w.into_vec(),
                    ));
                }
                Kind::Heartbeat => out.extend_from_slice(&codec.heartbeat_reply(&frame)),
                _ => {}
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// `tessera call dubbo`: one Dubbo request (no arguments) to `target`, the answer's value or
/// error printed. Bounded by `timeout`.
pub(crate) async fn call_dubbo(
    target: SocketAddr,
    interface: &str,
    method: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    use tessera_rpc::{Codec, Kind, Limits, dubbo, hessian};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {target}: {e}"))?;
        let req = dubbo::Request {
            id: 1,
            dubbo_version: "2.0.2",
            path: interface,
            version: "",
            method,
            descriptor: "",
            args: &[],
            attachments: &[("path", interface), ("interface", interface)],
            twoway: true,
        };
        s.write_all(&req.encode()).await?;
        let mut buf = bytes::BytesMut::new();
        let limits = Limits::default();
        loop {
            if s.read_buf(&mut buf).await? == 0 {
                anyhow::bail!("{target} closed the connection without answering");
            }
            let Some(f) = dubbo::Dubbo.decode(&mut buf, &limits)? else {
                continue;
            };
            if f.kind != Kind::Response {
                continue;
            }
            let body = f.raw.get(16..).unwrap_or_default();
            let mut r = hessian::Reader::new(body, hessian::Dialect::Final);
            if f.status != Some(u16::from(dubbo::STATUS_OK)) {
                let msg = r.read_string().unwrap_or_default();
                anyhow::bail!("Dubbo status {}: {msg}", f.status.unwrap_or_default());
            }
            let flag = r.read_int().map_err(|e| anyhow::anyhow!("unreadable answer: {e}"))?;
            return match flag {
                1 | 4 => Ok(r.read_string().map_err(|e| anyhow::anyhow!("unreadable answer: {e}"))?),
                2 | 5 => Ok("(null)".to_string()),
                _ => anyhow::bail!("the service threw (response flag {flag})"),
            };
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {target} within {timeout:?}"))?
}

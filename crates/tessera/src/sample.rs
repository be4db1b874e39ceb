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

pub(crate) async fn start(addr: SocketAddr, name: String) -> anyhow::Result<SocketAddr> {
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
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(name.clone(), req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
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

//! A remote Check server: the same policy engines the sidecar runs in process, behind Envoy's
//! external authorization gRPC API (`envoy.service.auth.v3.Authorization/Check`). It is what
//! Istio's Mixer was, a network hop per request, kept to measure what the in-process design
//! saves and to serve proxies that only speak ext_authz (Envoy's `ext_authz` filter works with it).
//!
//! Plaintext HTTP/2 (h2c). Allowed requests get `status {code: 0}` and an `ok_response`; denied
//! ones `PERMISSION_DENIED` (7) with a 403 `denied_response`, quota refusals `RESOURCE_EXHAUSTED`
//! (8) with 429, a failing quota backend 503 (code 14). A malformed request is answered with
//! gRPC status 3 (INVALID_ARGUMENT) and never evaluated.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_policy::ext_authz::{self as proto, CHECK_PATH, CheckDecision};

use crate::policy::{Outcome, PolicyRt};
use crate::stats::Stats;

/// The largest CheckRequest accepted.
const MAX_REQUEST: usize = 1 << 20;

/// Serves Check calls on `listener` with `policy` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, policy: &tessera_model::Policy) -> Result<(), String> {
    let stats = Stats::default();
    let rt = PolicyRt::new(policy, "check_server", &stats)?.ok_or("the policy has no checks and no quotas")?;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, Infallible>(handle(&rt, req, remote).await) }
            });
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%remote, error = %e, "check connection ended");
            }
        });
    }
}

async fn handle(rt: &Arc<PolicyRt>, req: Request<Incoming>, remote: SocketAddr) -> Response<GrpcBody> {
    if req.uri().path() != CHECK_PATH {
        return grpc_error(12, &format!("unknown method {}", req.uri().path()));
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return grpc_error(3, &format!("request body: {e}")),
    };
    let attrs = match proto::grpc_unframe(&body).and_then(proto::decode_check_request) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "malformed CheckRequest");
            return grpc_error(3, &e.to_string());
        }
    };
    let outcome = if rt.is_async() {
        rt.evaluate_async(&attrs).await
    } else {
        rt.evaluate(&attrs)
    };
    let decision = match outcome {
        Outcome::Allow => CheckDecision {
            allowed: true,
            http_status: 200,
            body: String::new(),
            headers: Vec::new(),
        },
        Outcome::Remote(d) => d,
        Outcome::Deny(text) => CheckDecision {
            allowed: false,
            http_status: 403,
            body: text,
            headers: Vec::new(),
        },
        Outcome::OverQuota {
            name,
            limit,
            remaining,
            reset,
        } => CheckDecision {
            allowed: false,
            http_status: 429,
            body: format!("RESOURCE_EXHAUSTED: quota `{name}` exceeded"),
            headers: vec![
                ("x-ratelimit-limit".into(), limit.to_string()),
                ("x-ratelimit-remaining".into(), remaining.to_string()),
                ("x-ratelimit-reset".into(), reset.as_secs().max(1).to_string()),
            ],
        },
        Outcome::Unavailable { name, reason } => CheckDecision {
            allowed: false,
            http_status: 503,
            body: format!("UNAVAILABLE: quota `{name}`: {reason}"),
            headers: Vec::new(),
        },
    };
    let mut msg = Vec::with_capacity(128);
    proto::encode_check_response(&decision, &mut msg);
    let mut framed = Vec::with_capacity(msg.len() + 5);
    proto::grpc_frame(&msg, &mut framed);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    grpc_response(GrpcBody {
        data: Some(Bytes::from(framed)),
        trailers: Some(trailers),
    })
}

fn grpc_response(body: GrpcBody) -> Response<GrpcBody> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r
}

/// A trailers-only gRPC error.
fn grpc_error(code: u8, message: &str) -> Response<GrpcBody> {
    let mut r = grpc_response(GrpcBody {
        data: None,
        trailers: None,
    });
    let h = r.headers_mut();
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    let printable: String = message
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&printable) {
        h.insert("grpc-message", v);
    }
    r
}

/// One message, then trailers.
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

//! Envoy's `ext_authz` over gRPC: a remote Check per request (`envoy.service.auth.v3.Authorization/
//! Check`), the way Istio's Mixer worked. Tessera's own checks run in process; this exists for
//! authorization servers users already run, and to measure what the in-process design saves.
//!
//! One HTTP/2 connection per check, shared by every request (each call is a stream), made on
//! first use and again after it breaks. Every call is bounded by `timeout`, connecting included;
//! a call that fails or times out answers `fail_open` (Envoy's `failure_mode_allow`, default
//! deny), counted `error` and logged at most once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_policy::Attributes;
use tessera_policy::ext_authz::{self as proto, CHECK_PATH};

use crate::stats::Counter;

pub(crate) struct ExtAuthz {
    name: String,
    address: String,
    timeout: Duration,
    fail_open: bool,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    last_warning: AtomicU64,
    errors: Arc<Counter>,
}

impl ExtAuthz {
    pub(crate) fn new(cfg: &tessera_model::ExtAuthzCheck, errors: Arc<Counter>) -> ExtAuthz {
        ExtAuthz {
            name: cfg.name.clone(),
            address: cfg.address.clone(),
            timeout: cfg.timeout,
            fail_open: cfg.fail_open,
            conn: tokio::sync::Mutex::new(None),
            last_warning: AtomicU64::new(0),
            errors,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `Ok` when the server allows the request (or fails and the check fails open); otherwise
    /// the answer to give: the server's `denied_response`, or 403 when the call failed (Envoy's
    /// `status_on_error`).
    pub(crate) async fn check(&self, attrs: &(dyn Attributes + Sync)) -> Result<(), proto::CheckDecision> {
        let mut msg = Vec::with_capacity(256);
        proto::encode_check_request(attrs, &mut msg);
        let mut framed = Vec::with_capacity(msg.len() + 5);
        proto::grpc_frame(&msg, &mut framed);
        let answer = match tokio::time::timeout(self.timeout, self.call(Bytes::from(framed))).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        match answer {
            Ok(d) if d.allowed => Ok(()),
            Ok(mut d) => {
                if d.body.is_empty() {
                    d.body = format!("PERMISSION_DENIED: {}: denied by the authorization server", self.name);
                }
                Err(d)
            }
            Err(why) => {
                self.errors.inc();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if self.last_warning.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(check = %self.name, server = %self.address, fail_open = self.fail_open, "ext_authz: {why}");
                }
                if self.fail_open {
                    Ok(())
                } else {
                    Err(proto::CheckDecision::deny(
                        403,
                        format!("PERMISSION_DENIED: {}: authorization server failed: {why}", self.name),
                    ))
                }
            }
        }
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let mut slot = self.conn.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|e| format!("connect {}: {e}", self.address))?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) =
            hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/2 handshake with {}: {e}", self.address))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *slot = Some(tx.clone());
        Ok(tx)
    }

    async fn call(&self, body: Bytes) -> Result<proto::CheckDecision, String> {
        let mut tx = self.sender().await?;
        tx.ready().await.map_err(|e| format!("connection: {e}"))?;
        let req = Request::post(format!("http://{}{CHECK_PATH}", self.address))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let resp = match tx.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                *self.conn.lock().await = None;
                return Err(format!("request: {e}"));
            }
        };
        if resp.status() != StatusCode::OK {
            return Err(format!("HTTP status {}", resp.status()));
        }
        let header_status = resp.headers().get("grpc-status").cloned();
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?;
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(header_status);
        match status.as_ref().and_then(|v| v.to_str().ok()) {
            Some("0") => {}
            Some(code) => return Err(format!("grpc-status {code}")),
            None => return Err("no grpc-status".into()),
        }
        let bytes = collected.to_bytes();
        let msg = proto::grpc_unframe(&bytes).map_err(|e| e.to_string())?;
        proto::decode_check_response(msg).map_err(|e| e.to_string())
    }
}

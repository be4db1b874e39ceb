//! Active health checking on the control thread: HTTP, TCP and `grpc.health.v1`, with interval,
//! jitter, timeout and healthy/unhealthy thresholds. A host failing any check leaves the load
//! balancer's healthy set; its state shows at `/clusters`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_model::{HealthCheck, HealthCheckKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::cluster::{ClusterRt, FAILED_ACTIVE_HC, Host, now_ms};
use crate::tls::{Alpn, ClientTls, Stream};
use crate::util::rand_below;

/// Starts one checking loop per configured health check of `cluster`.
pub(crate) fn spawn(cluster: &Arc<ClusterRt>) {
    for (k, hc) in cluster.cfg.health_checks.iter().enumerate().take(32) {
        let weak: Weak<ClusterRt> = Arc::downgrade(cluster);
        let hc = hc.clone();
        tokio::spawn(async move { run(weak, k, hc).await });
    }
}

/// Consecutive results of one check against one host.
#[derive(Default)]
struct Tally {
    successes: u32,
    failures: u32,
    checked: bool,
}

async fn run(weak: Weak<ClusterRt>, k: usize, hc: HealthCheck) {
    let bit = 1u32 << k;
    let mut tallies: HashMap<u64, Tally> = HashMap::new();
    loop {
        let (hosts, authority, tls) = match weak.upgrade() {
            Some(c) => (c.hosts(), c.name().to_string(), c.tls.clone()),
            None => return,
        };
        let mut round = JoinSet::new();
        for h in hosts {
            let (hc, authority, tls) = (hc.clone(), authority.clone(), tls.clone());
            round.spawn(async move {
                let r = match tokio::time::timeout(hc.timeout, check(&hc, &h, &authority, tls.as_deref())).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {:?}", hc.timeout)),
                };
                (h, r)
            });
        }
        let mut results = Vec::new();
        while let Some(done) = round.join_next().await {
            if let Ok(r) = done {
                results.push(r);
            }
        }
        let Some(c) = weak.upgrade() else { return };
        let mut flipped = false;
        let live: Vec<u64> = results.iter().map(|(h, _)| h.id).collect();
        tallies.retain(|id, _| live.contains(id));
        for (h, r) in results {
            c.stats.health_check_attempt.inc();
            let t = tallies.entry(h.id).or_default();
            let failing = h.hc_failing.load(Ordering::Relaxed) & bit != 0;
            match r {
                Ok(()) => {
                    c.stats.health_check_success.inc();
                    t.failures = 0;
                    t.successes += 1;
                    // A host's very first pass brings it in at once, as in Envoy.
                    if failing && (!t.checked || t.successes >= hc.healthy_threshold) {
                        flipped |= set_failing(&h, bit, false);
                        tracing::info!(cluster = c.name(), host = %h.addr, "health check passing; host healthy");
                    }
                }
                Err(why) => {
                    c.stats.health_check_failure.inc();
                    t.successes = 0;
                    t.failures += 1;
                    if !failing && t.failures >= hc.unhealthy_threshold {
                        flipped |= set_failing(&h, bit, true);
                        tracing::warn!(cluster = c.name(), host = %h.addr, reason = %why, "health check failing; host unhealthy");
                    } else {
                        tracing::debug!(cluster = c.name(), host = %h.addr, reason = %why, "health check failed");
                    }
                }
            }
            t.checked = true;
        }
        c.hc_rounds.fetch_add(1, Ordering::Release);
        if flipped {
            c.rebuild();
        }
        drop(c);
        let jitter = if hc.interval_jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_millis(rand_below(hc.interval_jitter.as_millis() as u64 + 1))
        };
        tokio::time::sleep(hc.interval + jitter).await;
    }
}

/// Sets or clears this check's failing bit; true when the host's health flag changed.
fn set_failing(h: &Host, bit: u32, failing: bool) -> bool {
    let before = if failing {
        h.hc_failing.fetch_or(bit, Ordering::AcqRel)
    } else {
        h.hc_failing.fetch_and(!bit, Ordering::AcqRel)
    };
    let after = if failing { before | bit } else { before & !bit };
    if (before == 0) == (after == 0) {
        return false;
    }
    if after == 0 {
        h.health.fetch_and(!FAILED_ACTIVE_HC, Ordering::AcqRel);
        h.warm_since_ms.store(now_ms().max(1), Ordering::Relaxed);
    } else {
        h.health.fetch_or(FAILED_ACTIVE_HC, Ordering::AcqRel);
    }
    true
}

/// Checks run over the cluster's transport: TLS when the cluster originates TLS, as in Envoy.
async fn check(hc: &HealthCheck, h: &Host, authority: &str, tls: Option<&ClientTls>) -> Result<(), String> {
    match &hc.kind {
        HealthCheckKind::Http {
            path,
            host,
            expected_statuses,
        } => {
            let status = http_check(h, tls, path, host.as_deref().unwrap_or(authority)).await?;
            if expected_statuses
                .iter()
                .any(|r| (r.start..r.end).contains(&status.as_u16()))
            {
                Ok(())
            } else {
                Err(format!("status {status} is not expected"))
            }
        }
        HealthCheckKind::Tcp { send, receive } => tcp_check(h, tls, send.as_deref(), receive).await,
        HealthCheckKind::Grpc {
            service_name,
            authority: a,
        } => grpc_check(h, tls, service_name, a.as_deref().unwrap_or(authority)).await,
    }
}

async fn connect(h: &Host, tls: Option<&ClientTls>, alpn: Alpn) -> Result<Stream, String> {
    let s = TcpStream::connect(h.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    match tls {
        None => Ok(Stream::Plain(s)),
        Some(t) => t
            .connect(s, h.addr.ip(), alpn)
            .await
            .map_err(|(r, e)| format!("TLS handshake ({}): {e}", r.name())),
    }
}

async fn http_check(h: &Host, tls: Option<&ClientTls>, path: &str, host: &str) -> Result<StatusCode, String> {
    let s = connect(h, tls, Alpn::Http1).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "Envoy/HC")
        .header(header::CONNECTION, "close")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("request: {e}"))?;
    let resp = tx.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    Ok(resp.status())
}

async fn tcp_check(h: &Host, tls: Option<&ClientTls>, send: Option<&[u8]>, receive: &[Vec<u8>]) -> Result<(), String> {
    let mut s = connect(h, tls, Alpn::Configured).await?;
    if let Some(b) = send {
        s.write_all(b).await.map_err(|e| format!("send: {e}"))?;
    }
    if receive.is_empty() {
        return Ok(());
    }
    // Every expected byte string must appear in the reply, in order (Envoy's rule).
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let mut rest = &got[..];
        let mut all = true;
        for want in receive {
            match rest.windows(want.len().max(1)).position(|w| w == &want[..]) {
                Some(at) => rest = &rest[at + want.len()..],
                None => {
                    all = false;
                    break;
                }
            }
        }
        if all {
            return Ok(());
        }
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 || got.len() > 64 * 1024 {
            return Err("the reply did not contain the expected bytes".into());
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// `grpc.health.v1.HealthCheckRequest { service }`, framed.
fn grpc_request(service: &str) -> Bytes {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(5 + msg.len());
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed.freeze()
}

/// The `status` of a framed `HealthCheckResponse` (1 is SERVING).
fn grpc_status_of(mut body: Bytes) -> Option<u64> {
    if body.len() < 5 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    let mut msg = body.get(..len)?;
    while !msg.is_empty() {
        let tag = msg[0];
        msg = &msg[1..];
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *msg.first()?;
            msg = &msg[1..];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
        if tag == 0x08 {
            return Some(v);
        }
        if tag & 7 != 0 {
            return None; // only varint fields are expected
        }
    }
    Some(0)
}

async fn grpc_check(h: &Host, tls: Option<&ClientTls>, service: &str, authority: &str) -> Result<(), String> {
    let s = connect(h, tls, Alpn::Http2).await?;
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(s))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::post(format!("http://{authority}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "Envoy/HC")
        .body(Full::new(grpc_request(service)))
        .map_err(|e| format!("request: {e}"))?;
    let resp = tx.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let header_status = resp.headers().get("grpc-status").cloned();
    let collected = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(header_status);
    match grpc_status.as_ref().and_then(|v| v.to_str().ok()) {
        Some("0") => {}
        Some(code) => return Err(format!("grpc-status {code}")),
        None => return Err("no grpc-status".into()),
    }
    match grpc_status_of(collected.to_bytes()) {
        Some(1) => Ok(()),
        Some(s) => Err(format!("serving status {s} (SERVING is 1)")),
        None => Err("malformed HealthCheckResponse".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages() {
        assert_eq!(&grpc_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&grpc_request("a.B")[..], &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']);
        assert_eq!(grpc_status_of(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1])), Some(1));
        assert_eq!(grpc_status_of(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 2])), Some(2));
        assert_eq!(
            grpc_status_of(Bytes::from_static(&[0, 0, 0, 0, 0])),
            Some(0),
            "UNKNOWN when absent"
        );
        assert_eq!(grpc_status_of(Bytes::from_static(&[0, 0, 0, 0, 9, 0x08])), None);
        assert_eq!(grpc_status_of(Bytes::from_static(&[0, 0])), None);
    }
}

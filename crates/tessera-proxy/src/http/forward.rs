//! Forwarding one request upstream: the circuit breakers, host choice, attempts with per-try and
//! overall timeouts, retries with back-off, outlier reporting, mirrors, and the response on its
//! way back.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tessera_model::{self as model, HashPolicyKind, RoutingPriority, Thresholds};
use tokio::time::Instant;

use super::{
    Finish, Stream, authority, is_upgrade, local_reply, prepare_request, response_mutations, set_target,
    strip_response_hop_by_hop,
};
use crate::body::{ReqBody, ReqTrack, RespBody, SharedBody, UpstreamBody};
use crate::cluster::{ClusterRt, Host, PickContext};
use crate::flags::ResponseFlags;
use crate::lb::hash64;
use crate::outlier::{self, Outcome};
use crate::pool::{self, Conn, ConnectError, Pooled};
use crate::retry::{self, Failure};
use crate::router::{Dest, Forward, Route, RouteTable, VirtualHost};
use crate::util::rand_below;

/// Why an attempt got no response.
pub(super) enum Fail {
    Connect(ConnectError),
    Reset(hyper::Error),
    /// The circuit breaker refused: too many requests waiting for a connection.
    Overflow,
}

impl Fail {
    fn failure(&self) -> Failure {
        match self {
            Fail::Connect(_) | Fail::Overflow => Failure::Connect,
            Fail::Reset(e) if refused_stream(e) => Failure::RefusedStream,
            Fail::Reset(_) => Failure::Reset,
        }
    }
}

/// True when an HTTP/2 stream was refused (REFUSED_STREAM): the upstream did not process it.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        src = s.source();
    }
    false
}

/// The circuit-breaker thresholds for a route's priority.
fn thresholds(cluster: &ClusterRt, prio: RoutingPriority) -> &Thresholds {
    match prio {
        RoutingPriority::Default => &cluster.cfg.circuit_breakers.default,
        RoutingPriority::High => &cluster.cfg.circuit_breakers.high,
    }
}

/// Where the upstream request's body comes from.
enum Source {
    Empty,
    /// The downstream body, sent once (no retries, no mirrors).
    Stream(Option<Incoming>),
    /// Kept for retries and mirrors.
    Shared(SharedBody),
}

impl Source {
    /// The body for the next attempt; `None` when the body cannot be sent again.
    fn attempt(&mut self, track: &Option<Arc<ReqTrack>>) -> Option<ReqBody> {
        match self {
            Source::Empty => Some(ReqBody::Empty),
            Source::Stream(b) => b.take().map(|b| ReqBody::new(b, track.clone())),
            Source::Shared(s) => s.reader().map(ReqBody::Shared),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Source::Empty => true,
            Source::Stream(b) => b.is_some(),
            Source::Shared(s) => s.replayable(),
        }
    }

    /// (bytes received, whole body received) so far.
    fn progress(&self, track: &Option<Arc<ReqTrack>>) -> (u64, bool) {
        match self {
            Source::Shared(s) => (s.bytes(), s.ended()),
            Source::Empty => (0, true),
            Source::Stream(_) => track.as_ref().map_or((0, false), |t| {
                (t.bytes.load(Ordering::Relaxed), t.done.load(Ordering::Relaxed))
            }),
        }
    }
}

/// Counts a retry in flight for the retry circuit breaker while it lives.
struct RetryGuard(Arc<ClusterRt>);

impl RetryGuard {
    fn new(c: &Arc<ClusterRt>) -> RetryGuard {
        c.retries_active.fetch_add(1, Ordering::Relaxed);
        c.stats.upstream_rq_retry_active.inc();
        RetryGuard(c.clone())
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries_active.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.upstream_rq_retry_active.dec();
    }
}

/// `grpc-timeout`: digits and a unit (H, M, S, m, u, n).
pub(super) fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (digits, unit) = b.split_at(b.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The consistent-hash key of a request: the hashes of every policy that yields a value,
/// combined, stopping after a `terminal` one that did.
pub(super) fn hash_key(policies: &[model::HashPolicy], parts: &Parts, client: IpAddr) -> Option<u64> {
    let mut acc: Option<u64> = None;
    for p in policies {
        let h = match &p.kind {
            HashPolicyKind::Header(name) => parts.headers.get(name.as_str()).map(|v| hash64(v.as_bytes(), 0)),
            HashPolicyKind::Cookie(name) => parts.headers.get_all(header::COOKIE).iter().find_map(|v| {
                v.to_str().ok()?.split(';').find_map(|kv| {
                    let (k, val) = kv.trim().split_once('=')?;
                    (k == name).then(|| hash64(val.as_bytes(), 0))
                })
            }),
            HashPolicyKind::SourceIp => Some(hash64(client.to_string().as_bytes(), 0)),
            HashPolicyKind::QueryParameter(name) => parts.uri.query().and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then(|| hash64(val.as_bytes(), 0))
                })
            }),
        };
        if let Some(h) = h {
            acc = Some(acc.map_or(h, |a| a.rotate_left(1) ^ h));
            if p.terminal {
                break;
            }
        }
    }
    acc
}

/// A copy of a request's head for another attempt or a mirror (extensions are not copied).
fn clone_parts(p: &Parts) -> Parts {
    let (mut c, ()) = Request::new(()).into_parts();
    c.method = p.method.clone();
    c.uri = p.uri.clone();
    c.version = p.version;
    c.headers = p.headers.clone();
    c
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The text and flags Envoy answers with when an attempt got no response.
fn failure_reply(fail: &Fail) -> (String, ResponseFlags, &'static str) {
    match fail {
        Fail::Connect(ConnectError::Timeout) => (
            "upstream connect error or disconnect/reset before headers. reset reason: connection timeout".to_string(),
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            "upstream_reset_before_response_started{connection_timeout}",
        ),
        Fail::Connect(ConnectError::Io(e)) => (
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {e}"
            ),
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            "upstream_reset_before_response_started{connection_failure}",
        ),
        Fail::Connect(ConnectError::Tls(r, e)) => (
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS error: {}: {e}",
                r.name()
            ),
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            "upstream_reset_before_response_started{connection_failure,TLS_error}",
        ),
        Fail::Connect(ConnectError::Handshake(e)) => (
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error, transport failure reason: {e}"
            ),
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            "upstream_reset_before_response_started{protocol_error}",
        ),
        Fail::Reset(e) => (
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination ({})",
                crate::util::error_chain(e)
            ),
            ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            "upstream_reset_before_response_started{connection_termination}",
        ),
        Fail::Overflow => (
            "upstream connect error or disconnect/reset before headers. reset reason: overflow".to_string(),
            ResponseFlags::UPSTREAM_OVERFLOW,
            "upstream_reset_before_response_started{overflow}",
        ),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    mut st: Stream,
    mut parts: Parts,
    body: Incoming,
    table: &RouteTable,
    vh: &VirtualHost,
    route: &Route,
    f: &Forward,
    grpc: bool,
) -> Response<RespBody> {
    let start = st.start;
    let version = parts.version;
    let dest = f.target.pick();
    let cluster = dest.cluster.clone();
    if let Some(l) = st.log() {
        l.upstream_cluster = Some(cluster.name().to_string());
    }
    let th = thresholds(&cluster, f.priority);
    if cluster.stats.upstream_rq_active.get() >= i64::from(th.max_requests) {
        cluster.stats.upstream_rq_pending_overflow.inc();
        let (text, flag, details) = failure_reply(&Fail::Overflow);
        return local_reply(st, grpc, version, StatusCode::SERVICE_UNAVAILABLE, text, flag, details);
    }
    let to_h2 = match cluster.cfg.protocol {
        model::UpstreamProtocol::Http1 => false,
        model::UpstreamProtocol::Http2 => true,
        model::UpstreamProtocol::Downstream => version == Version::HTTP_2,
    };
    let upgrade = !to_h2 && version == Version::HTTP_11 && is_upgrade(&parts.headers);
    let down_upgrade = if upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };

    // The overall deadline: the route timeout, a gRPC client's own deadline, max stream duration.
    let grpc_timeout = (grpc && f.grpc_timeout_header)
        .then(|| parts.headers.get("grpc-timeout").and_then(parse_grpc_timeout))
        .flatten()
        .map(|t| f.grpc_timeout_max.map_or(t, |m| t.min(m)));
    let grpc_deadline_rules = grpc_timeout.is_some_and(|g| f.timeout.is_none_or(|t| g <= t));
    let timeout = match (f.timeout, grpc_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let stream_deadline = f.max_stream_duration.map(|d| start + d);
    let deadline = min_deadline(timeout.map(|t| start + t), stream_deadline);
    let hash = if cluster.cfg.lb_policy.is_hashing() {
        hash_key(&f.hash_policy, &parts, st.cx.remote.ip())
    } else {
        None
    };

    prepare_request(&st.cx, &mut parts, table, vh, route, f, to_h2, upgrade);
    if let Some(l) = st.log() {
        // Envoy's %REQ()% sees the request as sent upstream (rewritten path, x-envoy-original-path).
        l.req_headers.clear();
        l.capture_request(&parts, authority(&parts));
    }

    let retry = f.retry.as_ref().filter(|_| !upgrade);
    let idempotent = retry::idempotent(&parts.method);
    let mirrors: Vec<&Dest> = if upgrade {
        Vec::new()
    } else {
        f.mirrors
            .iter()
            .filter(|(_, pct)| rand_below(10_000) < (*pct * 100.0) as u64)
            .map(|(d, _)| d)
            .collect()
    };
    let chain = st.cx.chain.clone();
    let track: Option<Arc<ReqTrack>> = (st.log.is_some() || chain.request_timeout.is_some()).then(Arc::default);
    let mut source = if body.is_end_stream() {
        if let Some(t) = &track {
            t.done.store(true, Ordering::Relaxed);
        }
        Source::Empty
    } else if retry.is_some() || !mirrors.is_empty() {
        Source::Shared(SharedBody::new(body, f.buffer_limit))
    } else {
        Source::Stream(Some(body))
    };
    for m in mirrors {
        mirror(m, &parts, version, &source, timeout.unwrap_or(Duration::from_secs(15)));
    }

    let req_deadline = chain.request_timeout.map(|t| start + t);
    let mut tried: Vec<u64> = Vec::new();
    let mut retries = 0u32;
    let mut retry_guard: Option<RetryGuard> = None;
    let mut template = Some(parts);
    loop {
        let avoid: &[u64] = if retry.is_some_and(|r| r.skip_previous_hosts) {
            &tried
        } else {
            &[]
        };
        let pick = PickContext {
            hash,
            avoid,
            subset: dest.subset,
            max_attempts: retry.map_or(1, |r| r.host_selection_retry_max_attempts),
            original_dst: st.cx.original_dst,
        };
        let Some(host) = cluster.pick(&pick) else {
            return local_reply(
                st,
                grpc,
                version,
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                "no_healthy_upstream",
            );
        };
        if let Some(l) = st.log() {
            l.upstream_host = Some(host.addr);
        }
        if retry.is_some() {
            tried.push(host.id);
        }
        // With retries the template stays for later attempts; without, it is sent as it is.
        let attempt_parts = if retry.is_some() {
            template.as_ref().map(clone_parts)
        } else {
            template.take()
        };
        let (Some(mut p), Some(body)) = (attempt_parts, source.attempt(&track)) else {
            let (text, flag, details) = failure_reply(&Fail::Overflow);
            return local_reply(st, grpc, version, StatusCode::SERVICE_UNAVAILABLE, text, flag, details);
        };
        if f.auto_host_rewrite
            && let Some(name) = &host.hostname
        {
            set_target(&mut p, None, Some(name.clone()), to_h2);
        }
        st.sent(cluster.clone(), host.clone());
        let per_try = retry.and_then(|r| (!r.per_try_timeout.is_zero()).then(|| Instant::now() + r.per_try_timeout));

        enum Outcome2 {
            Sent(Result<(Response<Incoming>, Pooled), Fail>),
            PerTryTimeout,
            UpstreamTimeout,
            RequestTimeout,
        }
        let outcome = {
            let send = send(&cluster, &host, Request::from_parts(p, body), to_h2, upgrade, th);
            tokio::pin!(send);
            let attempt_timer = at(min_deadline(per_try, deadline));
            tokio::pin!(attempt_timer);
            let req_timer = at(req_deadline);
            tokio::pin!(req_timer);
            let mut req_timer_live = req_deadline.is_some() && !source.progress(&track).1;
            loop {
                tokio::select! {
                    r = send.as_mut() => break Outcome2::Sent(r),
                    () = attempt_timer.as_mut() => {
                        break if per_try.is_some_and(|p| deadline.is_none_or(|d| p < d)) { Outcome2::PerTryTimeout } else { Outcome2::UpstreamTimeout };
                    }
                    () = req_timer.as_mut(), if req_timer_live => {
                        if source.progress(&track).1 {
                            req_timer_live = false;
                        } else {
                            break Outcome2::RequestTimeout;
                        }
                    }
                }
            }
        };
        if let Some(l) = st.log.as_mut() {
            l.bytes_received = source.progress(&track).0;
        }
        // The retry this attempt was (if any) is over.
        drop(retry_guard.take());
        let may_retry = |st: &Stream| -> bool {
            let Some(r) = retry else { return false };
            if retries >= r.num_retries {
                cluster.stats.upstream_rq_retry_limit_exceeded.inc();
                return false;
            }
            if !source.replayable() {
                return false;
            }
            if !retry::breaker_allows(
                th,
                cluster.retries_active.load(Ordering::Relaxed),
                cluster.stats.upstream_rq_active.get(),
            ) {
                cluster.stats.upstream_rq_retry_overflow.inc();
                return false;
            }
            let _ = st;
            true
        };

        match outcome {
            Outcome2::Sent(Ok((resp, pooled))) => {
                let status = resp.status();
                outlier::record(
                    &cluster,
                    &host,
                    if status.as_u16() >= 500 {
                        Outcome::Upstream5xx(status.as_u16())
                    } else {
                        Outcome::Success
                    },
                );
                let grpc_status = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
                let wants_retry =
                    retry.is_some_and(|r| retry::retry_response(r, status.as_u16(), grpc_status, idempotent));
                if wants_retry && may_retry(&st) {
                    cluster.stats.status(status.as_u16());
                    pooled.release(false, cluster.cfg.max_requests_per_connection, cluster.cfg.idle_timeout);
                    drop(resp);
                    st.upstream_failed(false);
                    retries += 1;
                    if let Some(r) = retry {
                        backoff(r, retries, deadline).await;
                    }
                    cluster.stats.upstream_rq_retry.inc();
                    retry_guard = Some(RetryGuard::new(&cluster));
                    continue;
                }
                if retries > 0 {
                    if wants_retry {
                        if let Some(l) = st.log() {
                            l.flags.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                        }
                    } else {
                        cluster.stats.upstream_rq_retry_success.inc();
                    }
                }
                return respond(
                    st,
                    resp,
                    pooled,
                    cluster,
                    table,
                    vh,
                    route,
                    version,
                    upgrade,
                    down_upgrade,
                    track,
                    stream_deadline,
                );
            }
            Outcome2::Sent(Err(fail)) => {
                outlier::record(&cluster, &host, Outcome::LocalFailure);
                if let Fail::Reset(e) = &fail {
                    cluster.stats.upstream_rq_rx_reset.inc();
                    // With TLS 1.3 a server refuses our client certificate only after the client's
                    // side of the handshake is done, so the refusal arrives as a reset: count it.
                    if let (Some(tls), Some(reason)) = (&cluster.tls, crate::tls::tls_reason(e)) {
                        tls.stats.failed(reason);
                    }
                }
                if retry.is_some_and(|r| retry::retry_failure(r, fail.failure(), idempotent)) && may_retry(&st) {
                    st.upstream_failed(false);
                    retries += 1;
                    if let Some(r) = retry {
                        backoff(r, retries, deadline).await;
                    }
                    cluster.stats.upstream_rq_retry.inc();
                    retry_guard = Some(RetryGuard::new(&cluster));
                    continue;
                }
                st.upstream_failed(false);
                let (text, mut flag, details) = failure_reply(&fail);
                if let (Fail::Connect(_), Some(l)) = (&fail, st.log()) {
                    l.upstream_failure = text.split("transport failure reason: ").nth(1).map(str::to_string);
                }
                if retries > 0 {
                    flag.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                }
                return local_reply(st, grpc, version, StatusCode::SERVICE_UNAVAILABLE, text, flag, details);
            }
            Outcome2::PerTryTimeout => {
                cluster.stats.upstream_rq_per_try_timeout.inc();
                outlier::record(&cluster, &host, Outcome::LocalFailure);
                if retry.is_some_and(|r| retry::retry_failure(r, Failure::PerTryTimeout, idempotent)) && may_retry(&st)
                {
                    st.upstream_failed(true);
                    retries += 1;
                    if let Some(r) = retry {
                        backoff(r, retries, deadline).await;
                    }
                    cluster.stats.upstream_rq_retry.inc();
                    retry_guard = Some(RetryGuard::new(&cluster));
                    continue;
                }
                st.upstream_failed(true);
                cluster.stats.upstream_rq_timeout.inc();
                return timeout_reply(st, grpc, version, false);
            }
            Outcome2::UpstreamTimeout => {
                outlier::record(&cluster, &host, Outcome::LocalFailure);
                st.upstream_failed(true);
                cluster.stats.upstream_rq_timeout.inc();
                return timeout_reply(st, grpc, version, grpc_deadline_rules);
            }
            Outcome2::RequestTimeout => {
                st.upstream_failed(false);
                chain.stats.downstream_rq_timeout.inc();
                return local_reply(
                    st,
                    grpc,
                    version,
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout",
                    ResponseFlags::NONE,
                    "request_overall_timeout",
                );
            }
        }
    }
}

/// Sleeps the policy's back-off before retry `n`, but not past the request's deadline.
async fn backoff(policy: &model::RetryPolicy, n: u32, deadline: Option<Instant>) {
    let wake = Instant::now() + retry::backoff(policy, n);
    tokio::time::sleep_until(deadline.map_or(wake, |d| wake.min(d))).await;
}

/// 504 `UT`; for a gRPC request whose own deadline ran out, DEADLINE_EXCEEDED.
fn timeout_reply(st: Stream, grpc: bool, version: Version, grpc_deadline: bool) -> Response<RespBody> {
    if grpc && grpc_deadline {
        return super::grpc_local_reply(
            st,
            version,
            4,
            "upstream request timeout",
            ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
            "upstream_response_timeout",
        );
    }
    local_reply(
        st,
        grpc,
        version,
        StatusCode::GATEWAY_TIMEOUT,
        "upstream request timeout",
        ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        "upstream_response_timeout",
    )
}

/// Turns the upstream response into the downstream one.
#[allow(clippy::too_many_arguments)]
fn respond(
    mut st: Stream,
    resp: Response<Incoming>,
    pooled: Pooled,
    cluster: Arc<ClusterRt>,
    table: &RouteTable,
    vh: &VirtualHost,
    route: &Route,
    version: Version,
    upgrade: bool,
    down_upgrade: Option<OnUpgrade>,
    track: Option<Arc<ReqTrack>>,
    stream_deadline: Option<Instant>,
) -> Response<RespBody> {
    let status = resp.status();
    cluster.stats.status(status.as_u16());
    let (mut rparts, rbody) = resp.into_parts();
    let switching = upgrade && status == StatusCode::SWITCHING_PROTOCOLS;
    strip_response_hop_by_hop(&mut rparts.headers, switching);
    response_mutations(&mut rparts.headers, table, vh, route);
    rparts.version = version;
    if switching && let (Some(down), Some(up)) = (down_upgrade, rparts.extensions.remove::<OnUpgrade>()) {
        st.cx.chain.stats.downstream_cx_upgrades_total.inc();
        tokio::spawn(tunnel(down, up));
    }
    let start = st.start;
    if let Some(l) = st.log() {
        l.response_code = status.as_u16();
        l.response_duration = Some(start.elapsed());
        l.capture_response(&rparts.headers);
    }
    let finish = Finish {
        st,
        cluster,
        pooled,
        status: status.as_u16(),
        track,
    };
    Response::from_parts(
        rparts,
        RespBody::Upstream(UpstreamBody::new(rbody, finish, stream_deadline)),
    )
}

/// Copies bytes both ways between an upgraded downstream and upstream (WebSocket and friends).
async fn tunnel(down: OnUpgrade, up: OnUpgrade) {
    match tokio::try_join!(down, up) {
        Ok((d, u)) => {
            let mut d = TokioIo::new(d);
            let mut u = TokioIo::new(u);
            if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// Sends a copy of the request to a shadow cluster and forgets it: its outcome never touches the
/// primary response. The shadow's Host gets a `-shadow` suffix, as Envoy's does.
fn mirror(dest: &Dest, parts: &Parts, down_version: Version, source: &Source, timeout: Duration) {
    let cluster = dest.cluster.clone();
    let Some(host) = cluster.pick(&PickContext {
        subset: dest.subset,
        max_attempts: 1,
        ..PickContext::default()
    }) else {
        return;
    };
    let body = match source {
        Source::Empty => ReqBody::Empty,
        Source::Shared(s) => match s.reader() {
            Some(r) => ReqBody::Shared(r),
            None => return,
        },
        Source::Stream(_) => return,
    };
    let to_h2 = match cluster.cfg.protocol {
        model::UpstreamProtocol::Http1 => false,
        model::UpstreamProtocol::Http2 => true,
        model::UpstreamProtocol::Downstream => down_version == Version::HTTP_2,
    };
    let mut p = clone_parts(parts);
    let shadow = {
        let a = authority(&p).to_string();
        match a
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty())
        {
            Some((h, port)) => format!("{h}-shadow:{port}"),
            None => format!("{a}-shadow"),
        }
    };
    if let Ok(v) = HeaderValue::from_str(&shadow) {
        set_target(&mut p, None, Some(v), to_h2);
    }
    let req = Request::from_parts(p, body);
    tokio::spawn(async move {
        let s = &cluster.stats;
        s.upstream_rq_total.inc();
        s.upstream_rq_active.inc();
        let th = cluster.cfg.circuit_breakers.default.clone();
        match tokio::time::timeout(timeout, send(&cluster, &host, req, to_h2, false, &th)).await {
            Ok(Ok((resp, pooled))) => {
                s.status(resp.status().as_u16());
                let mut b = resp.into_body();
                let mut clean = true;
                while let Some(frame) = b.frame().await {
                    if frame.is_err() {
                        clean = false;
                        break;
                    }
                }
                pooled.release(clean, cluster.cfg.max_requests_per_connection, cluster.cfg.idle_timeout);
            }
            Ok(Err(_)) => s.upstream_rq_rx_reset.inc(),
            Err(_) => s.upstream_rq_timeout.inc(),
        }
        s.upstream_rq_active.dec();
    });
}

/// Sends `req` over a pooled connection, or a new one. A pooled HTTP/1 connection the upstream
/// closed while idle gives the request back unsent; it then goes out on another connection.
/// At `max_connections` a request waits for a connection this worker releases, as a pending
/// request bounded by `max_pending_requests`; a worker with no connection to the host may open one.
pub(super) async fn send(
    cluster: &ClusterRt,
    host: &Arc<Host>,
    mut req: Request<ReqBody>,
    h2: bool,
    upgrade: bool,
    th: &Thresholds,
) -> Result<(Response<Incoming>, Pooled), Fail> {
    let cfg = &cluster.cfg;
    if upgrade {
        // An upgraded connection becomes a tunnel, so it is never shared.
        let Conn::H1 { mut sender, .. } = pool::connect(cluster, host, false).await.map_err(Fail::Connect)? else {
            unreachable!("asked for HTTP/1")
        };
        let resp = sender.send_request(req).await.map_err(Fail::Reset)?;
        return Ok((resp, Pooled::None));
    }
    for _ in 0..3 {
        let (conn, reused) = if h2 {
            h2_conn(cluster, host).await.map_err(Fail::Connect)?
        } else {
            match pool::take_h1(host.id, cfg.idle_timeout) {
                Some((sender, uses)) => (Conn::H1 { sender, uses }, true),
                None => h1_new_or_wait(cluster, host, th).await?,
            }
        };
        match conn {
            Conn::H1 { mut sender, uses } => {
                if reused && sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        return Ok((
                            resp,
                            Pooled::H1 {
                                host: host.id,
                                sender,
                                uses: uses + 1,
                            },
                        ));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(r) if reused => req = r,
                        _ => return Err(Fail::Reset(e.into_error())),
                    },
                }
            }
            Conn::H2 { mut sender, active } => match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Pooled::H2(active))),
                Err(mut e) => {
                    active.fetch_sub(1, Ordering::Relaxed);
                    match e.take_message() {
                        Some(r) if reused => req = r,
                        _ => return Err(Fail::Reset(e.into_error())),
                    }
                }
            },
        }
    }
    // Three pooled connections in a row were dead: make a fresh one, and report what it says.
    match pool::connect(cluster, host, h2).await.map_err(Fail::Connect)? {
        Conn::H1 { mut sender, uses } => {
            let resp = sender.send_request(req).await.map_err(Fail::Reset)?;
            Ok((
                resp,
                Pooled::H1 {
                    host: host.id,
                    sender,
                    uses: uses + 1,
                },
            ))
        }
        Conn::H2 { mut sender, active } => match sender.send_request(req).await {
            Ok(resp) => Ok((resp, Pooled::H2(active))),
            Err(e) => {
                active.fetch_sub(1, Ordering::Relaxed);
                Err(Fail::Reset(e))
            }
        },
    }
}

/// A new HTTP/1 connection, or, at the cluster's connection limit, the next one this worker
/// releases (a pending request).
async fn h1_new_or_wait(cluster: &ClusterRt, host: &Arc<Host>, th: &Thresholds) -> Result<(Conn, bool), Fail> {
    let s = &cluster.stats;
    if s.upstream_cx_active.get() >= i64::from(th.max_connections) {
        if pool::h1_live(host.id) > 0 {
            if s.upstream_rq_pending_active.get() >= i64::from(th.max_pending_requests) {
                s.upstream_rq_pending_overflow.inc();
                return Err(Fail::Overflow);
            }
            s.upstream_rq_pending_active.inc();
            let got = pool::wait_h1(host.id).await;
            s.upstream_rq_pending_active.dec();
            if let Ok((sender, uses)) = got {
                return Ok((Conn::H1 { sender, uses }, true));
            }
        }
        // Envoy, too, lets a worker with no connection to the host open one over the limit.
        s.upstream_cx_overflow.inc();
    }
    Ok((pool::connect(cluster, host, false).await.map_err(Fail::Connect)?, false))
}

/// An HTTP/2 connection with a free stream: a pooled one, the one another request is making, or a new one.
async fn h2_conn(cluster: &ClusterRt, host: &Arc<Host>) -> Result<(Conn, bool), ConnectError> {
    let cfg = &cluster.cfg;
    for _ in 0..8 {
        match pool::h2_slot(
            host.id,
            cfg.http2_max_concurrent_streams,
            cfg.max_requests_per_connection,
        ) {
            pool::H2Slot::Ready(sender, active) => return Ok((Conn::H2 { sender, active }, true)),
            pool::H2Slot::Wait(c) => c.wait().await?,
            pool::H2Slot::Connect(g) => return Ok((pool::connect_h2(cluster, host, Some(g)).await?, false)),
        }
    }
    // Connections keep filling up under us: make one of our own.
    Ok((pool::connect_h2(cluster, host, None).await?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let p = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(p("100m"), Some(Duration::from_millis(100)));
        assert_eq!(p("2S"), Some(Duration::from_secs(2)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("5u"), Some(Duration::from_micros(5)));
        assert_eq!(p("123456789m"), None, "at most 8 digits");
        assert_eq!(p("10x"), None);
        assert_eq!(p("m"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn hash_keys_follow_the_policies() {
        let (parts, ()) = Request::get("/p?user=alice&x=1")
            .header("x-user", "bob")
            .header("cookie", "a=1; session=s3cr3t")
            .body(())
            .unwrap()
            .into_parts();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let pol = |kind, terminal| model::HashPolicy { kind, terminal };
        let h = |v: &[u8]| hash64(v, 0);
        assert_eq!(
            hash_key(&[pol(HashPolicyKind::Header("x-user".into()), false)], &parts, ip),
            Some(h(b"bob"))
        );
        assert_eq!(
            hash_key(&[pol(HashPolicyKind::Cookie("session".into()), false)], &parts, ip),
            Some(h(b"s3cr3t"))
        );
        assert_eq!(
            hash_key(&[pol(HashPolicyKind::QueryParameter("user".into()), false)], &parts, ip),
            Some(h(b"alice"))
        );
        assert_eq!(
            hash_key(&[pol(HashPolicyKind::SourceIp, false)], &parts, ip),
            Some(h(b"10.0.0.1"))
        );
        assert_eq!(
            hash_key(&[pol(HashPolicyKind::Header("absent".into()), false)], &parts, ip),
            None
        );
        let terminal = hash_key(
            &[
                pol(HashPolicyKind::Header("x-user".into()), true),
                pol(HashPolicyKind::SourceIp, false),
            ],
            &parts,
            ip,
        );
        assert_eq!(terminal, Some(h(b"bob")), "terminal stops after a value");
        let both = hash_key(
            &[
                pol(HashPolicyKind::Header("x-user".into()), false),
                pol(HashPolicyKind::SourceIp, false),
            ],
            &parts,
            ip,
        );
        assert_ne!(both, terminal, "non-terminal policies combine");
    }
}

//! The HTTP connection manager: serves a downstream connection (HTTP/1.1 or HTTP/2, detected),
//! routes each request, forwards it over a pooled upstream connection and streams the answer back.
//!
//! Per request the path loads the route table once (`ArcSwap`), picks a cluster and a host, takes
//! a connection from the worker's own pool and touches only atomics: no lock, no blocking call.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tessera_model as model;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::access_log::{LogRecord, LogSink, LogSpec};
use crate::body::{Ending, ReqTrack, RespBody};
use crate::cluster::{ClusterRt, Host};
use crate::flags::ResponseFlags;
use crate::listener::Accepted;
use crate::policy::{HttpAttrs as PolicyAttrs, Outcome, PolicyRt};
use crate::pool::Pooled;
use crate::ratelimit::RateLimiter;
use crate::router::{self, Action, Forward, RequestView, Route, RouteTable, VirtualHost, mutate};
use crate::stats::{Counter, Gauge, Scope, Stats};
use crate::tls::TlsInfo;
use crate::util::{rand_below, uuid_v4};

mod forward;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Envoy's `http.<stat_prefix>.*` stats.
pub(crate) struct HttpStats {
    pub(crate) downstream_cx_total: Arc<Counter>,
    pub(crate) downstream_cx_active: Arc<Gauge>,
    pub(crate) downstream_cx_upgrades_total: Arc<Counter>,
    pub(crate) downstream_rq_total: Arc<Counter>,
    pub(crate) downstream_rq_active: Arc<Gauge>,
    pub(crate) downstream_rq_http1_total: Arc<Counter>,
    pub(crate) downstream_rq_http2_total: Arc<Counter>,
    pub(crate) downstream_rq_xx: [Arc<Counter>; 5],
    pub(crate) downstream_rq_completed: Arc<Counter>,
    pub(crate) downstream_rq_timeout: Arc<Counter>,
    pub(crate) downstream_rq_too_many_headers: Arc<Counter>,
    pub(crate) downstream_rq_rx_reset: Arc<Counter>,
    pub(crate) no_route: Arc<Counter>,
    pub(crate) rq_redirect: Arc<Counter>,
    pub(crate) rq_direct_response: Arc<Counter>,
    pub(crate) local_rate_limited: Arc<Counter>,
    pub(crate) policy_denied: Arc<Counter>,
    pub(crate) policy_over_quota: Arc<Counter>,
    pub(crate) local_rate_limit_ok: Arc<Counter>,
    pub(crate) fault_delays_injected: Arc<Counter>,
    pub(crate) fault_aborts_injected: Arc<Counter>,
}

impl HttpStats {
    pub(crate) fn new(stats: &Stats, prefix: &str) -> HttpStats {
        let s = Scope::tagged("http", "envoy_http_conn_manager_prefix", prefix);
        let c = |n: &str| stats.counter(&s, n);
        HttpStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: stats.gauge(&s, "downstream_cx_active"),
            downstream_cx_upgrades_total: c("downstream_cx_upgrades_total"),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_active: stats.gauge(&s, "downstream_rq_active"),
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            downstream_rq_xx: [
                c("downstream_rq_1xx"),
                c("downstream_rq_2xx"),
                c("downstream_rq_3xx"),
                c("downstream_rq_4xx"),
                c("downstream_rq_5xx"),
            ],
            downstream_rq_completed: c("downstream_rq_completed"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_too_many_headers: c("downstream_rq_too_many_headers"),
            downstream_rq_rx_reset: c("downstream_rq_rx_reset"),
            no_route: c("no_route"),
            rq_redirect: c("rq_redirect"),
            rq_direct_response: c("rq_direct_response"),
            local_rate_limited: c("local_rate_limit.rate_limited"),
            policy_denied: c("policy.denied"),
            policy_over_quota: c("policy.over_quota"),
            local_rate_limit_ok: c("local_rate_limit.ok"),
            fault_delays_injected: c("fault.delays_injected"),
            fault_aborts_injected: c("fault.aborts_injected"),
        }
    }
}

/// One HTTP filter chain at run time.
pub(crate) struct HttpChainRt {
    pub(crate) cfg: model::HttpConnectionManager,
    /// Shared with the previous config's chain of the same name, so keep-alive connections
    /// accepted before a reload route their next requests by the new table.
    pub(crate) routes: Arc<ArcSwap<RouteTable>>,
    pub(crate) stats: HttpStats,
    pub(crate) logs: Option<Arc<LogSpec>>,
    builder: auto::Builder<TokioExecutor>,
    request_timeout: Option<Duration>,
    max_headers: usize,
    rate_limit: Option<Arc<RateLimiter>>,
    /// Checks and quotas, before routing.
    policy: Option<Arc<PolicyRt>>,
}

impl HttpChainRt {
    pub(crate) fn new(
        cfg: model::HttpConnectionManager,
        routes: Arc<ArcSwap<RouteTable>>,
        stats: &Stats,
    ) -> Result<HttpChainRt, String> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder = match cfg.codec_type {
            model::CodecType::Auto => builder,
            model::CodecType::Http1 => builder.http1_only(),
            model::CodecType::Http2 => builder.http2_only(),
        };
        let header_bytes = (cfg.max_request_headers_kb as usize) * 1024;
        let headers_timeout = (!cfg.request_headers_timeout.is_zero()).then_some(cfg.request_headers_timeout);
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // hyper sizes its read buffer from this, and cannot go below 8 KiB.
            .max_buf_size(header_bytes.max(8192))
            .max_headers(cfg.max_request_headers_count as usize)
            .header_read_timeout(headers_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.http2_max_concurrent_streams)
            .max_header_list_size(header_bytes as u32);
        let policy = PolicyRt::new(&cfg.policy, &cfg.stat_prefix, stats)?;
        if let Some(rl) = &cfg.local_rate_limit {
            RateLimiter::headers(rl)?;
        }
        Ok(HttpChainRt {
            policy,
            stats: HttpStats::new(stats, &cfg.stat_prefix),
            logs: LogSpec::new(&cfg.access_log),
            request_timeout: (!cfg.request_timeout.is_zero()).then_some(cfg.request_timeout),
            max_headers: cfg.max_request_headers_count as usize,
            rate_limit: cfg.local_rate_limit.clone().map(|c| Arc::new(RateLimiter::new(c))),
            routes,
            builder,
            cfg,
        })
    }
}

/// What every request of one downstream connection shares.
pub(crate) struct ConnCtx {
    chain: Arc<HttpChainRt>,
    sink: Option<LogSink>,
    remote: SocketAddr,
    local: SocketAddr,
    /// The destination before a REDIRECT, for ORIGINAL_DST clusters.
    pub(crate) original_dst: Option<SocketAddr>,
    id: u64,
    /// The client's address as a header value, made once per connection for `x-forwarded-for`.
    remote_ip: HeaderValue,
    /// What TLS negotiated, when the connection is TLS.
    tls: Option<Arc<TlsInfo>>,
    /// `http` or `https`.
    scheme: &'static str,
    /// Streams in flight, and when the last one ended (ms since `born`), for the idle timeout.
    active: AtomicU32,
    last_done_ms: AtomicU64,
    born: Instant,
}

impl ConnCtx {
    fn begin(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.chain.stats.downstream_rq_active.inc();
    }

    /// Settles a stream: counters, idle tracking and the access log. Status 0: no response went out.
    fn end(&self, status: u16, log: Option<Box<LogRecord>>) {
        let s = &self.chain.stats;
        s.downstream_rq_active.dec();
        if status != 0 {
            s.downstream_rq_completed.inc();
        }
        if let Some(c) = s.downstream_rq_xx.get(usize::from(status / 100).wrapping_sub(1)) {
            c.inc();
        }
        self.last_done_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
        if let (Some(log), Some(sink)) = (log, &self.sink) {
            sink.send(log);
        }
    }
}

/// One request, from its headers to its last response byte. It owns the request's accounting:
/// `finish` settles the counters and writes the access log. If it is dropped unfinished (the
/// client went away and hyper dropped the request or its response), the request is counted and
/// logged as a downstream reset (`DC`): never lost silently.
pub(crate) struct Stream {
    cx: Arc<ConnCtx>,
    log: Option<Box<LogRecord>>,
    /// The upstream request in flight, once one was sent.
    upstream: Option<(Arc<ClusterRt>, Arc<Host>)>,
    start: Instant,
    done: bool,
}

impl Stream {
    fn new(cx: Arc<ConnCtx>, log: Option<Box<LogRecord>>, start: Instant) -> Stream {
        cx.begin();
        Stream {
            cx,
            log,
            upstream: None,
            start,
            done: false,
        }
    }

    fn log(&mut self) -> Option<&mut LogRecord> {
        self.log.as_deref_mut()
    }

    /// Counts the request as sent to `host` of `cluster`.
    fn sent(&mut self, cluster: Arc<ClusterRt>, host: Arc<Host>) {
        cluster.stats.upstream_rq_total.inc();
        cluster.stats.upstream_rq_active.inc();
        host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
        host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
        self.upstream = Some((cluster, host));
    }

    /// The upstream request failed before any response (the proxy answers instead).
    fn upstream_failed(&mut self, timeout: bool) {
        if let Some((cluster, host)) = self.upstream.take() {
            cluster.stats.upstream_rq_active.dec();
            host.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
            host.stats.rq_error.fetch_add(1, Ordering::Relaxed);
            if timeout {
                host.stats.rq_timeout.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Ends the stream after a response with `status` (0: none) ended as `ending`.
    fn finish(mut self, status: u16, ending: Ending, bytes_sent: u64) {
        self.settle(status, ending, bytes_sent);
    }

    fn settle(&mut self, status: u16, ending: Ending, bytes_sent: u64) {
        self.done = true;
        if let Some((cluster, host)) = self.upstream.take() {
            cluster.stats.upstream_rq_active.dec();
            host.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
            if ending == Ending::Complete && (1..500).contains(&status) {
                host.stats.rq_success.fetch_add(1, Ordering::Relaxed);
            } else {
                host.stats.rq_error.fetch_add(1, Ordering::Relaxed);
            }
            match ending {
                Ending::Complete => {}
                Ending::UpstreamError => cluster.stats.upstream_rq_rx_reset.inc(),
                Ending::Dropped => cluster.stats.upstream_rq_tx_reset.inc(),
                Ending::MaxDuration => cluster.stats.upstream_rq_max_duration_reached.inc(),
            }
        }
        if ending == Ending::Dropped {
            self.cx.chain.stats.downstream_rq_rx_reset.inc();
        }
        let mut log = self.log.take();
        if let Some(l) = log.as_mut() {
            l.bytes_sent = bytes_sent;
            l.duration = Some(self.start.elapsed());
            match ending {
                Ending::Complete => {}
                Ending::UpstreamError => l.flags.insert(ResponseFlags::UPSTREAM_REMOTE_RESET),
                Ending::Dropped => l.flags.insert(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION),
                Ending::MaxDuration => l.flags.insert(ResponseFlags::DURATION_TIMEOUT),
            }
        }
        self.cx.end(status, log);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.done {
            tracing::debug!(remote = %self.cx.remote, "client went away before the response ended");
            let status = self.log.as_ref().map_or(0, |l| l.response_code);
            self.settle(status, Ending::Dropped, 0);
        }
    }
}

/// Serves one downstream connection until it closes, the listener drains, or it idles out.
pub(crate) async fn serve(
    conn: Accepted,
    chain: Arc<HttpChainRt>,
    sink: Option<LogSink>,
    mut drain: watch::Receiver<bool>,
) {
    let Accepted {
        stream,
        tls,
        remote,
        local,
        original_dst,
        id,
    } = conn;
    chain.stats.downstream_cx_total.inc();
    chain.stats.downstream_cx_active.inc();
    let _cx_active = scopeguard(chain.stats.downstream_cx_active.clone());
    let idle = chain.cfg.idle_timeout;
    let cx = Arc::new(ConnCtx {
        sink: if chain.logs.is_some() { sink } else { None },
        remote_ip: HeaderValue::from_str(&remote.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown")),
        scheme: if tls.is_some() { "https" } else { "http" },
        tls,
        remote,
        local,
        original_dst,
        id,
        active: AtomicU32::new(0),
        last_done_ms: AtomicU64::new(0),
        born: Instant::now(),
        chain: chain.clone(),
    });
    let svc_cx = cx.clone();
    let svc = hyper::service::service_fn(move |req| handle(svc_cx.clone(), req));
    let conn = chain.builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);

    let mut closing = *drain.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    let idle_on = !idle.is_zero();
    let sleep = tokio::time::sleep(if idle_on { idle } else { Duration::from_secs(86_400) });
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "downstream connection ended with an error");
                }
                break;
            }
            changed = drain.changed(), if !closing => {
                if changed.is_err() || *drain.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = sleep.as_mut(), if idle_on && !closing => {
                let now = Instant::now();
                if cx.active.load(Ordering::Relaxed) == 0 {
                    let last = cx.born + Duration::from_millis(cx.last_done_ms.load(Ordering::Relaxed));
                    if now.duration_since(last) >= idle {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        sleep.as_mut().reset(last + idle);
                    }
                } else {
                    sleep.as_mut().reset(now + idle);
                }
            }
        }
    }
}

struct GaugeDec(Arc<Gauge>);
impl Drop for GaugeDec {
    fn drop(&mut self) {
        self.0.dec();
    }
}
fn scopeguard(g: Arc<Gauge>) -> GaugeDec {
    GaugeDec(g)
}

/// The host a request is for: the URI's authority (HTTP/2, absolute-form) or the `Host` header.
fn authority(parts: &Parts) -> &str {
    parts
        .uri
        .authority()
        .map(Authority::as_str)
        .or_else(|| parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()))
        .unwrap_or("")
}

async fn handle(cx: Arc<ConnCtx>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let chain = cx.chain.clone();
    let stats = &chain.stats;
    stats.downstream_rq_total.inc();
    if req.version() == Version::HTTP_2 {
        stats.downstream_rq_http2_total.inc();
    } else {
        stats.downstream_rq_http1_total.inc();
    }
    let (mut parts, body) = req.into_parts();
    if chain.cfg.generate_request_id
        && !parts.headers.contains_key(X_REQUEST_ID)
        && let Ok(v) = HeaderValue::from_bytes(&uuid_v4())
    {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    let grpc = router::is_grpc(&parts.headers);
    let trace = crate::report::trace(&mut parts.headers);
    let log = chain.logs.as_ref().map(|spec| {
        let mut r = Box::new(LogRecord::new(spec, cx.remote, cx.local, cx.id));
        r.capture_request(&parts, authority(&parts));
        r.grpc = grpc;
        r.trace = trace;
        r.scheme = cx.scheme;
        r.tls = cx.tls.clone();
        r
    });
    let mut st = Stream::new(cx, log, start);

    // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host; HTTP/2 needs an authority.
    let mut host_values = parts.headers.get_all(header::HOST).iter();
    let hosts = usize::from(host_values.next().is_some()) + usize::from(host_values.next().is_some());
    if hosts > 1 || (hosts == 0 && parts.uri.authority().is_none() && parts.version != Version::HTTP_10) {
        let details = if hosts > 1 {
            "multiple_host_headers"
        } else {
            "missing_host_header"
        };
        return Ok(local_reply(
            st,
            grpc,
            parts.version,
            StatusCode::BAD_REQUEST,
            "",
            ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
            details,
        ));
    }
    if parts.headers.len() > chain.max_headers {
        stats.downstream_rq_too_many_headers.inc();
        return Ok(local_reply(
            st,
            grpc,
            parts.version,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "",
            ResponseFlags::NONE,
            "request_headers_too_many",
        ));
    }

    // The merged Mixer's Check and Quota: in process, before routing.
    if let Some(policy) = &chain.policy {
        let attrs = PolicyAttrs {
            parts: &parts,
            host: authority(&parts),
            remote: st.cx.remote,
            remote_ip: st.cx.remote_ip.to_str().unwrap_or(""),
            local: st.cx.local,
            tls: st.cx.tls.as_deref(),
            scheme: st.cx.scheme,
            grpc,
        };
        let outcome = if policy.is_async() {
            policy.evaluate_async(&attrs).await
        } else {
            policy.evaluate(&attrs)
        };
        match outcome {
            Outcome::Allow => {}
            Outcome::Unavailable { name, reason } => {
                stats.policy_over_quota.inc();
                let text = format!("UNAVAILABLE: quota `{name}`: {reason}");
                return Ok(if grpc {
                    grpc_local_reply(
                        st,
                        parts.version,
                        14,
                        &text,
                        ResponseFlags::RATELIMIT_SERVICE_ERROR,
                        "quota_backend_failed",
                    )
                } else {
                    local_reply(
                        st,
                        grpc,
                        parts.version,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        text,
                        ResponseFlags::RATELIMIT_SERVICE_ERROR,
                        "quota_backend_failed",
                    )
                });
            }
            Outcome::Remote(d) => {
                stats.policy_denied.inc();
                let status = StatusCode::from_u16(d.http_status).unwrap_or(StatusCode::FORBIDDEN);
                let mut resp = local_reply(
                    st,
                    grpc,
                    parts.version,
                    status,
                    d.body,
                    ResponseFlags::UNAUTHORIZED_EXTERNAL_SERVICE,
                    "ext_authz_denied",
                );
                for (k, v) in &d.headers {
                    if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                        resp.headers_mut().append(k, v);
                    }
                }
                return Ok(resp);
            }
            Outcome::Deny(reason) => {
                stats.policy_denied.inc();
                let text = reason;
                return Ok(local_reply(
                    st,
                    grpc,
                    parts.version,
                    StatusCode::FORBIDDEN,
                    text,
                    ResponseFlags::UNAUTHORIZED_EXTERNAL_SERVICE,
                    "policy_denied",
                ));
            }
            Outcome::OverQuota {
                name,
                limit,
                remaining,
                reset,
            } => {
                stats.policy_over_quota.inc();
                let text = format!("RESOURCE_EXHAUSTED: quota `{name}` exceeded");
                let mut resp = if grpc {
                    grpc_local_reply(
                        st,
                        parts.version,
                        8,
                        &text,
                        ResponseFlags::RATE_LIMITED,
                        "quota_exceeded",
                    )
                } else {
                    local_reply(
                        st,
                        grpc,
                        parts.version,
                        StatusCode::TOO_MANY_REQUESTS,
                        text,
                        ResponseFlags::RATE_LIMITED,
                        "quota_exceeded",
                    )
                };
                let h = resp.headers_mut();
                h.insert("x-ratelimit-limit", HeaderValue::from(limit));
                h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
                h.insert("x-ratelimit-reset", HeaderValue::from(reset.as_secs().max(1)));
                return Ok(resp);
            }
        }
    }

    let table = chain.routes.load_full();
    let found = table.route(&RequestView {
        host: authority(&parts),
        path: parts.uri.path(),
        query: parts.uri.query(),
        method: &parts.method,
        scheme: st.cx.scheme,
        headers: &parts.headers,
    });
    let Some((vh, route)) = found else {
        stats.no_route.inc();
        return Ok(local_reply(
            st,
            grpc,
            parts.version,
            StatusCode::NOT_FOUND,
            "",
            ResponseFlags::NO_ROUTE_FOUND,
            "route_not_found",
        ));
    };
    tracing::trace!(virtual_host = %vh.name, route = ?route.name, "routed");
    if let Some(l) = st.log() {
        l.route_name = route.name.clone();
    }
    // Local rate limit: the route's bucket, else the connection manager's.
    if let Some(rl) = route.rate_limit.as_ref().or(chain.rate_limit.as_ref()) {
        let v = rl.check(&parts.headers, st.cx.remote.ip());
        if !v.allowed {
            stats.local_rate_limited.inc();
            let mut resp = local_reply(
                st,
                grpc,
                parts.version,
                StatusCode::TOO_MANY_REQUESTS,
                "local_rate_limited",
                ResponseFlags::RATE_LIMITED,
                "local_rate_limited",
            );
            if rl.cfg.response_headers {
                let h = resp.headers_mut();
                h.insert("x-ratelimit-limit", HeaderValue::from(v.limit));
                h.insert("x-ratelimit-remaining", HeaderValue::from(v.remaining));
                h.insert("x-ratelimit-reset", HeaderValue::from(v.reset_secs));
            }
            if !rl.extra_headers.is_empty() {
                router::mutate(resp.headers_mut(), &[], &rl.extra_headers);
            }
            return Ok(resp);
        }
        stats.local_rate_limit_ok.inc();
    }
    // Fault injection (Istio's HTTPFaultInjection): a delay, then perhaps an abort.
    if let Some(fault) = &route.fault {
        let view = RequestView {
            host: authority(&parts),
            path: parts.uri.path(),
            query: parts.uri.query(),
            method: &parts.method,
            scheme: st.cx.scheme,
            headers: &parts.headers,
        };
        if fault.headers.iter().all(|h| router::header_matches(h, &view)) {
            let hit = |pct: f64| rand_below(10_000) < (pct * 100.0) as u64;
            if let Some(d) = fault.delay.as_ref().filter(|d| hit(d.percentage)) {
                stats.fault_delays_injected.inc();
                if let Some(l) = st.log() {
                    l.flags.insert(ResponseFlags::DELAY_INJECTED);
                }
                tokio::time::sleep(d.fixed_delay).await;
            }
            if let Some(a) = fault.abort.as_ref().filter(|a| hit(a.percentage)) {
                stats.fault_aborts_injected.inc();
                return Ok(match a.status {
                    model::AbortStatus::Http(code) => {
                        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        local_reply(
                            st,
                            grpc,
                            parts.version,
                            status,
                            "fault filter abort",
                            ResponseFlags::FAULT_INJECTED,
                            "fault_filter_abort",
                        )
                    }
                    model::AbortStatus::Grpc(code) => grpc_local_reply(
                        st,
                        parts.version,
                        code,
                        "fault filter abort",
                        ResponseFlags::FAULT_INJECTED,
                        "fault_filter_abort",
                    ),
                });
            }
        }
    }
    let resp = match &route.action {
        Action::Direct { status, body: text } => {
            stats.rq_direct_response.inc();
            let mut resp = Response::new(RespBody::full(text.clone()));
            *resp.status_mut() = *status;
            if !text.is_empty() {
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            response_mutations(resp.headers_mut(), &table, vh, route);
            finish_local(st, resp, ResponseFlags::NONE, "direct_response")
        }
        Action::Redirect(r) => {
            stats.rq_redirect.inc();
            let loc = router::redirect_location(
                r,
                &route.matcher,
                "http",
                authority(&parts),
                parts.uri.path(),
                parts.uri.query(),
            );
            let mut resp = Response::new(RespBody::empty());
            *resp.status_mut() = StatusCode::from_u16(r.response_code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            match HeaderValue::from_str(&loc) {
                Ok(v) => {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                Err(_) => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            }
            response_mutations(resp.headers_mut(), &table, vh, route);
            finish_local(st, resp, ResponseFlags::NONE, "redirect")
        }
        Action::Forward(f) => {
            let mut resp = forward::forward(st, parts, body, &table, vh, route, f, grpc).await;
            // The router's own answers (503 no healthy upstream, 504 timeout...) carry the route's
            // response headers too, as Envoy's do; upstream answers got them in `forward`.
            if resp.extensions_mut().remove::<LocalReply>().is_some() {
                response_mutations(resp.headers_mut(), &table, vh, route);
            }
            resp
        }
    };
    Ok(resp)
}

fn response_mutations(h: &mut HeaderMap, table: &RouteTable, vh: &VirtualHost, route: &Route) {
    // Envoy's default order: route, then virtual host, then route table.
    for m in [&route.mutations, &vh.mutations, &table.mutations] {
        if !m.response_add.is_empty() || !m.response_remove.is_empty() {
            mutate(h, &m.response_remove, &m.response_add);
        }
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        })
}

const HOP_CONNECTION: u8 = 1;
const HOP_OTHER: u8 = 2;
const HOP_TE: u8 = 4;
const HOP_UPGRADE: u8 = 8;
const HOP_EXPECT: u8 = 16;

/// Which hop-by-hop headers are present, in one pass over the names (most requests have none,
/// and comparing standard names is cheaper than hashing for each of them).
fn hop_by_hop_present(h: &HeaderMap) -> u8 {
    let mut found = 0;
    for k in h.keys() {
        found |= if k == header::CONNECTION {
            HOP_CONNECTION
        } else if k == header::TRANSFER_ENCODING {
            HOP_OTHER
        } else if k == header::TE {
            HOP_TE
        } else if k == header::UPGRADE {
            HOP_UPGRADE
        } else if k == header::EXPECT {
            HOP_EXPECT
        } else if k == KEEP_ALIVE || k == PROXY_CONNECTION || k == HTTP2_SETTINGS {
            HOP_OTHER
        } else {
            0
        };
    }
    found
}

/// Removes hop-by-hop headers, including any the `Connection` header names, and `Expect`
/// (the proxy answers `100-continue` itself: hyper does when the body is first read).
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let found = hop_by_hop_present(h);
    if found & HOP_CONNECTION != 0 {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !["close", "keep-alive", "upgrade"]
                        .iter()
                        .any(|x| t.eq_ignore_ascii_case(x))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| n != header::HOST)
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    if found & HOP_OTHER != 0 {
        h.remove(KEEP_ALIVE);
        h.remove(PROXY_CONNECTION);
        h.remove(header::TRANSFER_ENCODING);
        h.remove(HTTP2_SETTINGS);
    }
    if found & HOP_EXPECT != 0 {
        h.remove(header::EXPECT);
    }
    if found & HOP_TE != 0
        && h.get(header::TE)
            .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if found & HOP_UPGRADE != 0 {
        h.remove(header::UPGRADE);
    }
}

fn strip_response_hop_by_hop(h: &mut HeaderMap, switching: bool) {
    let found = hop_by_hop_present(h);
    if found == 0 {
        return;
    }
    if !switching {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    if found & HOP_OTHER != 0 {
        h.remove(KEEP_ALIVE);
        h.remove(PROXY_CONNECTION);
        h.remove(header::TRANSFER_ENCODING);
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_request(
    cx: &ConnCtx,
    parts: &mut Parts,
    table: &RouteTable,
    vh: &VirtualHost,
    route: &Route,
    f: &Forward,
    to_h2: bool,
    upgrade: bool,
) {
    let cfg = &cx.chain.cfg;
    let h = &mut parts.headers;
    strip_hop_by_hop(h, upgrade);
    if cfg.use_remote_address {
        match h.get(X_FORWARDED_FOR) {
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + cx.remote_ip.len());
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(cx.remote_ip.as_bytes());
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.insert(X_FORWARDED_FOR, v);
                }
            }
            None => {
                h.insert(X_FORWARDED_FOR, cx.remote_ip.clone());
            }
        }
        if !h.contains_key(X_FORWARDED_PROTO) {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(cx.scheme));
        }
    }
    forward_client_cert(cx, h);
    for m in [&route.mutations, &vh.mutations, &table.mutations] {
        if !m.request_add.is_empty() || !m.request_remove.is_empty() {
            mutate(h, &m.request_remove, &m.request_add);
        }
    }
    let new_path = router::rewrite_path(f, &route.matcher, parts.uri.path());
    if new_path.is_some()
        && let Ok(v) = HeaderValue::from_str(parts.uri.path())
    {
        parts.headers.insert(X_ENVOY_ORIGINAL_PATH, v);
    }
    // `auto_host_rewrite` needs the chosen host, so it is applied per attempt.
    let new_authority = f.host_rewrite.clone();
    set_target(parts, new_path, new_authority, to_h2);
}

/// Puts the request line in the upstream protocol's form: origin-form plus `Host` for HTTP/1.1,
/// scheme and authority for HTTP/2.
fn set_target(parts: &mut Parts, new_path: Option<String>, new_authority: Option<HeaderValue>, to_h2: bool) {
    let path_and_query: Option<PathAndQuery> = match &new_path {
        Some(p) => {
            let pq = match parts.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p.clone(),
            };
            match PathAndQuery::try_from(pq) {
                Ok(pq) => Some(pq),
                Err(e) => {
                    tracing::debug!(error = %e, "rewritten path is not a valid URI path; keeping the original");
                    None
                }
            }
        }
        None => None,
    };
    if to_h2 {
        parts.version = Version::HTTP_2;
        let authority = new_authority
            .as_ref()
            .and_then(|a| Authority::try_from(a.as_bytes()).ok())
            .or_else(|| parts.uri.authority().cloned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            });
        let needs = path_and_query.is_some()
            || new_authority.is_some()
            || parts.uri.scheme().is_none()
            || parts.uri.authority().is_none();
        if needs {
            let pq = path_and_query
                .or_else(|| parts.uri.path_and_query().cloned())
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            let mut b = Uri::builder().scheme(parts.uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
            if let Some(a) = authority {
                b = b.authority(a);
            }
            if let Ok(u) = b.path_and_query(pq).build() {
                parts.uri = u;
            }
        }
        parts.headers.remove(header::HOST);
    } else {
        parts.version = Version::HTTP_11;
        if let Some(a) = new_authority {
            parts.headers.insert(header::HOST, a);
        } else if !parts.headers.contains_key(header::HOST)
            && let Some(a) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, a);
        }
        if path_and_query.is_some() || parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let pq = path_and_query
                .or_else(|| parts.uri.path_and_query().cloned())
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::from(pq);
        }
    }
}

/// Settles a forwarded request when its response stream ends.
pub(crate) struct Finish {
    st: Stream,
    cluster: Arc<ClusterRt>,
    pooled: Pooled,
    status: u16,
    track: Option<Arc<ReqTrack>>,
}

impl Finish {
    pub(crate) fn complete(self, ending: Ending, bytes_sent: u64) {
        let Finish {
            mut st,
            cluster,
            pooled,
            status,
            track,
        } = self;
        let cfg = &cluster.cfg;
        pooled.release(
            ending == Ending::Complete,
            cfg.max_requests_per_connection,
            cfg.idle_timeout,
        );
        if let (Some(l), Some(t)) = (st.log(), &track) {
            l.bytes_received = t.bytes.load(Ordering::Relaxed);
        }
        st.finish(status, ending, bytes_sent);
    }
}

/// Envoy's mapping from an HTTP status to a gRPC status for local replies.
fn grpc_status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A reply made by the proxy: plain text for HTTP, trailers-only for gRPC, as Envoy answers.
#[allow(clippy::too_many_arguments)]
fn local_reply(
    st: Stream,
    grpc: bool,
    version: Version,
    status: StatusCode,
    text: impl Into<Bytes>,
    flags: ResponseFlags,
    details: &'static str,
) -> Response<RespBody> {
    let text: Bytes = text.into();
    let resp = if grpc {
        let mut r = Response::new(RespBody::empty());
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(GRPC_STATUS, HeaderValue::from(u16::from(grpc_status_for(status))));
        let msg = if text.is_empty() {
            Bytes::from(status.canonical_reason().unwrap_or("").to_string())
        } else {
            text
        };
        if let Ok(v) = HeaderValue::from_maybe_shared(percent_encode_grpc(&msg)) {
            h.insert(GRPC_MESSAGE, v);
        }
        r
    } else {
        let mut r = Response::new(RespBody::full(text.clone()));
        *r.status_mut() = status;
        if !text.is_empty() {
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        r
    };
    let mut resp = resp;
    *resp.version_mut() = version;
    if flags.contains(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR) && version != Version::HTTP_2 {
        // After a protocol error the connection's framing can't be trusted: close it.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    finish_local(st, resp, flags, details)
}

/// A trailers-only gRPC answer with `code` (HTTP 200), whatever the request's framing.
fn grpc_local_reply(
    st: Stream,
    version: Version,
    code: u8,
    text: &str,
    flags: ResponseFlags,
    details: &'static str,
) -> Response<RespBody> {
    let mut r = Response::new(RespBody::empty());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_maybe_shared(percent_encode_grpc(text.as_bytes())) {
        h.insert(GRPC_MESSAGE, v);
    }
    *r.version_mut() = version;
    finish_local(st, r, flags, details)
}

/// Marks an answer the proxy made itself (not the upstream's).
#[derive(Clone, Copy)]
struct LocalReply;

fn finish_local(
    mut st: Stream,
    mut resp: Response<RespBody>,
    flags: ResponseFlags,
    details: &'static str,
) -> Response<RespBody> {
    let status = resp.status().as_u16();
    let bytes = match resp.body() {
        RespBody::Local(b) => b.as_ref().map_or(0, |b| b.len() as u64),
        RespBody::Upstream(_) => 0,
    };
    if let Some(l) = st.log() {
        l.response_code = status;
        l.flags.insert(flags);
        l.details = details;
        l.capture_response(resp.headers());
    }
    if !flags.is_empty() {
        tracing::debug!(status, %flags, details, "local reply");
    }
    st.finish(status, Ending::Complete, bytes);
    resp.extensions_mut().insert(LocalReply);
    resp
}

/// gRPC's percent-encoding for `grpc-message`: printable ASCII except `%` passes through.
fn percent_encode_grpc(b: &[u8]) -> Bytes {
    if b.iter().all(|c| (0x20..0x7f).contains(c) && *c != b'%') {
        return Bytes::copy_from_slice(b);
    }
    let mut out = Vec::with_capacity(b.len() * 3);
    for c in b {
        if (0x20..0x7f).contains(c) && *c != b'%' {
            out.push(*c);
        } else {
            out.extend_from_slice(format!("%{c:02X}").as_bytes());
        }
    }
    Bytes::from(out)
}

/// Applies `forward_client_cert_details` to `x-forwarded-client-cert`, as Envoy does: the header
/// survives only from clients that presented a certificate (unless told to always forward), and
/// this hop can append or set its own element `By=<our URI SAN>;Hash=<client cert SHA-256>;...`.
fn forward_client_cert(cx: &ConnCtx, h: &mut HeaderMap) {
    use model::ForwardClientCert as F;
    let cfg = &cx.chain.cfg;
    let peer = cx.tls.as_deref().and_then(|t| t.peer.as_ref().map(|p| (t, p)));
    match (cfg.forward_client_cert_details, peer) {
        (F::AlwaysForwardOnly, _) | (F::ForwardOnly, Some(_)) => {}
        (F::Sanitize, _) | (_, None) => {
            h.remove(X_FORWARDED_CLIENT_CERT);
        }
        (mode @ (F::AppendForward | F::SanitizeSet), Some((t, p))) => {
            let d = cfg.set_current_client_cert_details;
            let mut e = String::with_capacity(160);
            if let Some(by) = t.local.as_deref().and_then(|l| l.uri.first()) {
                e.push_str("By=");
                e.push_str(by);
                e.push(';');
            }
            e.push_str("Hash=");
            e.push_str(&p.sha256);
            if d.cert {
                e.push_str(";Cert=\"");
                e.push_str(&url_encode(&crate::util::pem("CERTIFICATE", &p.der)));
                e.push('"');
            }
            if d.subject {
                e.push_str(";Subject=\"");
                e.push_str(&p.info.subject.replace('"', "\\\""));
                e.push('"');
            }
            if d.uri {
                for u in &p.info.uri {
                    e.push_str(";URI=");
                    e.push_str(u);
                }
            }
            if d.dns {
                for n in &p.info.dns {
                    e.push_str(";DNS=");
                    e.push_str(n);
                }
            }
            let value = match (mode, h.get(X_FORWARDED_CLIENT_CERT)) {
                (F::AppendForward, Some(prev)) => {
                    let mut v = prev.as_bytes().to_vec();
                    v.push(b',');
                    v.extend_from_slice(e.as_bytes());
                    HeaderValue::from_bytes(&v)
                }
                _ => HeaderValue::from_str(&e),
            };
            match value {
                Ok(v) => {
                    h.insert(X_FORWARDED_CLIENT_CERT, v);
                }
                Err(_) => {
                    h.remove(X_FORWARDED_CLIENT_CERT);
                }
            }
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)], v: Version) -> Parts {
        let mut b = Request::builder().uri(uri).version(v);
        for (k, val) in headers {
            b = b.header(*k, *val);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut p = parts(
            "/",
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "gzip"),
                ("upgrade", "h2c"),
                ("x-keep", "1"),
            ],
            Version::HTTP_11,
        );
        strip_hop_by_hop(&mut p.headers, false);
        let names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
        let mut p = parts(
            "/",
            &[("te", "trailers"), ("connection", "Upgrade"), ("upgrade", "websocket")],
            Version::HTTP_11,
        );
        strip_hop_by_hop(&mut p.headers, true);
        assert_eq!(p.headers.get("te").unwrap(), "trailers");
        assert_eq!(p.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(p.headers.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn request_target_per_upstream_protocol() {
        // h2 downstream (absolute URI) to h1 upstream: origin-form plus Host.
        let mut p = parts("http://example.com:8080/a?b=c", &[], Version::HTTP_2);
        set_target(&mut p, None, None, false);
        assert_eq!(p.uri.to_string(), "/a?b=c");
        assert_eq!(p.headers.get("host").unwrap(), "example.com:8080");
        assert_eq!(p.version, Version::HTTP_11);
        // h1 downstream to h2 upstream: scheme and authority from Host, Host removed.
        let mut p = parts("/a", &[("host", "example.com")], Version::HTTP_11);
        set_target(&mut p, None, None, true);
        assert_eq!(p.uri.to_string(), "http://example.com/a");
        assert!(p.headers.get("host").is_none());
        // Rewrites keep the query and replace the host.
        let mut p = parts("/old/x?q=1", &[("host", "a")], Version::HTTP_11);
        set_target(
            &mut p,
            Some("/new/x".into()),
            Some(HeaderValue::from_static("b.example")),
            false,
        );
        assert_eq!(p.uri.to_string(), "/new/x?q=1");
        assert_eq!(p.headers.get("host").unwrap(), "b.example");
        // An unchanged h1 to h1 request is left alone.
        let mut p = parts("/same", &[("host", "a")], Version::HTTP_11);
        set_target(&mut p, None, None, false);
        assert_eq!(p.uri.to_string(), "/same");
    }

    #[test]
    fn grpc_status_mapping_and_message_encoding() {
        assert_eq!(grpc_status_for(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(grpc_status_for(StatusCode::NOT_FOUND), 12);
        assert_eq!(grpc_status_for(StatusCode::FORBIDDEN), 7);
        assert_eq!(&percent_encode_grpc(b"no healthy upstream")[..], b"no healthy upstream");
        assert_eq!(&percent_encode_grpc("50% off\n".as_bytes())[..], b"50%25 off%0A");
    }

    #[test]
    fn upgrade_detection() {
        let p = parts(
            "/",
            &[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")],
            Version::HTTP_11,
        );
        assert!(is_upgrade(&p.headers));
        let p = parts("/", &[("upgrade", "websocket")], Version::HTTP_11);
        assert!(!is_upgrade(&p.headers));
    }
}

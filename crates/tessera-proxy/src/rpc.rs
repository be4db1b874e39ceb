//! The RPC connection manager: SOFA Bolt and Dubbo requests from one downstream connection,
//! routed on service, method, version, group and headers, multiplexed over pooled upstream
//! connections under ids the sidecar hands out, and answered in the protocol's own error format
//! whenever the sidecar cannot get a response (no route, no upstream, timeout, overflow, rate
//! limit), so a client never hangs.
//!
//! A request goes through these phases, in order:
//! 1. decode: a frame off the connection (several per read, partial frames wait); a malformed
//!    frame closes the connection.
//! 2. heartbeat: answered here, never forwarded.
//! 3. route keys and route: the first route whose criteria hold, else `NoRoute`.
//! 4. rate limit, then the cluster's request circuit breaker.
//! 5. host choice and upstream connection; the request is written under a new id.
//! 6. response, failure or timeout: the response is written back under the client's id, or a
//!    native error; retries follow connect failures (and resets on routes marked idempotent).
//! 7. stats and access log.
//!
//! The downstream connection is one task; it owns its in-flight requests (a slab) and their
//! deadlines. Upstream connections send it [`upstream::Event`]s.

mod upstream;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use slab::Slab;
use tessera_model as model;
use tessera_rpc::{Codec, CodecError, Failure, Frame, Kind, Limits, Need, RouteKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::access_log::{LogRecord, LogSink, LogSpec, RpcLog};
use crate::cluster::{ClusterRt, Host, PickContext};
use crate::flags::ResponseFlags;
use crate::listener::Accepted;
use crate::outlier::{self, Outcome};
use crate::policy::{Outcome as PolicyOutcome, PolicyRt, RpcAttrs};
use crate::ratelimit::RateLimiter;
use crate::router::{Target, header_value_matches};
use crate::server::Shared;
use crate::stats::{Counter, Gauge, Histogram, Scope, Stats};
use crate::util::FastMap;
use upstream::{Event, Ticket, UpConn, UpError, UpstreamParams};

/// Distinct (service, method) pairs given their own stats per chain and worker; further pairs
/// are counted under `other`, so a client cannot grow the stats without bound.
const MAX_METHODS: usize = 1024;

/// `rpc.<stat_prefix>.*`.
pub(crate) struct RpcStats {
    downstream_cx_total: Arc<Counter>,
    downstream_cx_active: Arc<Gauge>,
    downstream_cx_protocol_error: Arc<Counter>,
    request_total: Arc<Counter>,
    request_oneway: Arc<Counter>,
    heartbeat: Arc<Counter>,
    no_route: Arc<Counter>,
    rate_limited: Arc<Counter>,
    overflow: Arc<Counter>,
    no_healthy_upstream: Arc<Counter>,
    upstream_failure: Arc<Counter>,
    timeout: Arc<Counter>,
    retry: Arc<Counter>,
    local_reply: Arc<Counter>,
    downstream_reset: Arc<Counter>,
    policy_denied: Arc<Counter>,
    policy_over_quota: Arc<Counter>,
    response_success: Arc<Counter>,
    response_error: Arc<Counter>,
}

/// One route at run time.
struct RouteRt {
    cfg: model::RpcRoute,
    name: Option<Arc<str>>,
    target: Target,
    timeout: Option<Duration>,
    limiter: Option<RateLimiter>,
}

/// One RPC filter chain at run time.
pub(crate) struct RpcChainRt {
    cfg: model::RpcProxy,
    routes: Vec<RouteRt>,
    /// Some route matches on the group or on headers/attachments, or a rate limit is keyed by one.
    needs_attachments: bool,
    limits: Limits,
    scope: Scope,
    stats: RpcStats,
    logs: Option<Arc<LogSpec>>,
    /// Checks and quotas, before routing.
    policy: Option<Arc<PolicyRt>>,
}

impl RpcChainRt {
    pub(crate) fn new(
        cfg: model::RpcProxy,
        clusters: &HashMap<String, Arc<ClusterRt>>,
        stats: &Stats,
    ) -> Result<RpcChainRt, String> {
        let cluster = |name: &str| {
            clusters
                .get(name)
                .cloned()
                .ok_or_else(|| format!("rpc chain `{}` refers to unknown cluster `{name}`", cfg.stat_prefix))
        };
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for r in &cfg.routes {
            let a = &r.route;
            let target = Target::compile(&a.cluster, &a.metadata_match, &cluster)?;
            routes.push(RouteRt {
                name: r.name.as_deref().map(Arc::from),
                target,
                timeout: (!a.timeout.is_zero()).then_some(a.timeout),
                limiter: a.local_rate_limit.clone().map(RateLimiter::new),
                cfg: r.clone(),
            });
        }
        let scope = Scope::tagged("rpc", "envoy_rpc_prefix", &cfg.stat_prefix);
        let c = |n: &str| stats.counter(&scope, n);
        let st = RpcStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: stats.gauge(&scope, "downstream_cx_active"),
            downstream_cx_protocol_error: c("downstream_cx_protocol_error"),
            request_total: c("request_total"),
            request_oneway: c("request_oneway"),
            heartbeat: c("heartbeat"),
            no_route: c("no_route"),
            rate_limited: c("rate_limited"),
            overflow: c("overflow"),
            no_healthy_upstream: c("no_healthy_upstream"),
            upstream_failure: c("upstream_failure"),
            timeout: c("timeout"),
            retry: c("retry"),
            local_reply: c("local_reply"),
            downstream_reset: c("downstream_reset"),
            policy_denied: c("policy_denied"),
            policy_over_quota: c("policy_over_quota"),
            response_success: c("response_success"),
            response_error: c("response_error"),
        };
        Ok(RpcChainRt {
            policy: PolicyRt::new(&cfg.policy, &cfg.stat_prefix, stats)?,
            needs_attachments: cfg.routes.iter().any(|r| {
                r.matcher.needs_attachments()
                    || r.route
                        .local_rate_limit
                        .as_ref()
                        .is_some_and(|l| matches!(l.descriptor, Some(model::RateLimitKey::Header(_))))
            }) || cfg.policy.attributes().iter().any(|a| {
                a == "*" || a.starts_with("rpc.attachments[") || a.starts_with("request.headers[") || a == "rpc.group"
            }),
            limits: Limits {
                max_frame: cfg.max_frame_bytes as usize,
                ..Limits::default()
            },
            logs: LogSpec::new(&cfg.access_log),
            scope,
            stats: st,
            routes,
            cfg,
        })
    }

    /// The codec for a connection whose first bytes are `first`: `Err(true)` to wait for more.
    fn codec_for(&self, first: &[u8]) -> Result<Arc<dyn Codec>, bool> {
        let c: Arc<dyn Codec> = Arc::from(tessera_rpc::detect(first)?);
        let wanted = match self.cfg.protocol {
            model::RpcProtocol::Auto => true,
            model::RpcProtocol::Bolt => c.name() == "bolt",
            model::RpcProtocol::Dubbo => c.name() == "dubbo",
        };
        if wanted { Ok(c) } else { Err(false) }
    }

    /// The first route whose criteria hold for `keys`.
    fn route(&self, keys: &RouteKeys<'_>) -> Option<(usize, &RouteRt)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| route_matches(&r.cfg.matcher, keys))
    }
}

/// Whether a request with `keys` meets `m`. Header and attachment names are compared without
/// ASCII case (config names are lower-cased; Dubbo attachments are often camelCase).
fn route_matches(m: &model::RpcMatch, keys: &RouteKeys<'_>) -> bool {
    let field = |c: &Option<model::StringMatch>, v: &str| c.as_ref().is_none_or(|c| c.matches(v, false));
    field(&m.service, &keys.service)
        && field(&m.method, &keys.method)
        && field(&m.version, &keys.version)
        && field(&m.group, &keys.group)
        && m.headers
            .iter()
            .all(|h| header_value_matches(h, header_ci(keys, &h.name)))
}

fn header_ci<'a>(keys: &'a RouteKeys<'_>, name: &str) -> Option<&'a str> {
    keys.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

// ---------------------------------------------------------------- per-method stats

/// Response-status slots per method: Bolt's codes (0..=0x12) by value, Dubbo's (20..=100, steps
/// of 5) after them, and one for anything else.
const STATUS_SLOTS: usize = 38;

fn status_slot(status: u16) -> (usize, Option<u16>) {
    match status {
        0..=19 => (usize::from(status), Some(status)),
        20..=100 if status.is_multiple_of(5) => (20 + usize::from((status - 20) / 5), Some(status)),
        _ => (STATUS_SLOTS - 1, None),
    }
}

/// `rpc.<prefix>.<service>.<method>.*`, tagged `rpc_service` and `rpc_method`.
struct MethodStats {
    rq_total: Arc<Counter>,
    rq_time: Arc<Histogram>,
    scope: Scope,
    /// `rq_completed` by response status (tag `rpc_status`), created on first sight.
    by_status: [OnceLock<Arc<Counter>>; STATUS_SLOTS],
}

impl MethodStats {
    fn completed(&self, stats: &Stats, status: u16, took: Duration) {
        self.rq_time.record(took);
        let (slot, known) = status_slot(status);
        self.by_status[slot]
            .get_or_init(|| {
                let label = known.map_or_else(|| "other".to_string(), |s| s.to_string());
                stats.counter(&self.scope.child("rpc_status", &label), "rq_completed")
            })
            .inc();
    }
}

type MethodTable = FastMap<String, FastMap<String, Arc<MethodStats>>>;

thread_local! {
    /// Per chain (stat prefix): service -> method -> stats. Thread-local so the request path takes
    /// no lock; the registry behind it hands every worker the same atomics.
    static METHODS: RefCell<HashMap<String, (usize, MethodTable)>> = RefCell::new(HashMap::new());
}

/// The stats of one (service, method), looked up once per request.
fn method_stats(chain: &RpcChainRt, stats: &Stats, service: &str, method: &str) -> Arc<MethodStats> {
    METHODS.with(|m| {
        let mut m = m.borrow_mut();
        if !m.contains_key(&chain.cfg.stat_prefix) {
            m.insert(chain.cfg.stat_prefix.clone(), Default::default());
        }
        let Some((count, table)) = m.get_mut(&chain.cfg.stat_prefix) else {
            unreachable!("inserted above")
        };
        if let Some(s) = table.get(service).and_then(|t| t.get(method)) {
            return s.clone();
        }
        let (service, method) = if *count >= MAX_METHODS {
            ("other", "other")
        } else {
            (service, method)
        };
        if let Some(s) = table.get(service).and_then(|t| t.get(method)) {
            return s.clone();
        }
        *count += 1;
        let name = |s: &str| {
            if s.is_empty() {
                "unknown".to_string()
            } else {
                s.to_string()
            }
        };
        let scope = chain
            .scope
            .child("rpc_service", &name(service))
            .child("rpc_method", &name(method));
        let s = Arc::new(MethodStats {
            rq_total: stats.counter(&scope, "rq_total"),
            rq_time: stats.histogram(&scope, "rq_time"),
            scope,
            by_status: std::array::from_fn(|_| OnceLock::new()),
        });
        table
            .entry(service.to_string())
            .or_default()
            .insert(method.to_string(), s.clone());
        s
    })
}

/// When in-flight requests time out. Deadlines are appended in order (a connection's requests
/// mostly share one timeout) and are not removed when a request completes: the queue is
/// compacted when it grows past twice the requests in flight, and entries whose request is gone
/// are skipped when they come due. One timer per connection, armed at the earliest deadline.
#[derive(Default)]
struct Deadlines {
    q: VecDeque<(Instant, usize, u64)>,
}

impl Deadlines {
    fn push(&mut self, at: Instant, slot: usize, seq: u64) {
        if self.q.back().is_none_or(|(last, ..)| *last <= at) {
            self.q.push_back((at, slot, seq));
        } else {
            let i = self.q.partition_point(|(d, ..)| *d <= at);
            self.q.insert(i, (at, slot, seq));
        }
    }

    fn first(&self) -> Option<Instant> {
        self.q.front().map(|(d, ..)| *d)
    }

    /// Takes the entries due at `now`.
    fn due(&mut self, now: Instant) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        while let Some((d, slot, seq)) = self.q.front().copied() {
            if d > now {
                break;
            }
            self.q.pop_front();
            out.push((slot, seq));
        }
        out
    }

    /// Drops entries of completed requests once they outnumber the live ones.
    fn compact(&mut self, live: usize, is_live: impl Fn(usize, u64) -> bool) {
        if self.q.len() > 2 * live + 64 {
            self.q.retain(|(_, slot, seq)| is_live(*slot, *seq));
        }
    }
}

// ---------------------------------------------------------------- the downstream connection

/// What to do with a request.
enum Decision {
    /// Answer it here with this failure, message and response flag.
    Local(Failure, String, ResponseFlags),
    /// Send it to `host` of `cluster`.
    Forward {
        route: usize,
        cluster: Arc<ClusterRt>,
        subset: Option<usize>,
        host: Arc<Host>,
        timeout: Duration,
    },
}

/// A decision, the request's method stats and its access-log record.
type Decided = (Decision, Arc<MethodStats>, Option<Box<LogRecord>>);

/// A request waiting for its upstream.
struct Inflight {
    /// The chain the request was routed by (its route index points into it).
    chain: Arc<RpcChainRt>,
    seq: u64,
    down_id: u64,
    start: Instant,
    route: usize,
    cluster: Arc<ClusterRt>,
    subset: Option<usize>,
    host: Arc<Host>,
    /// The connection and id it is outstanding under, while it is.
    sent: Option<(Arc<UpConn>, u64)>,
    stats: Arc<MethodStats>,
    /// The request; its bytes move to `wire` when written.
    frame: Frame,
    /// The bytes last written upstream (shared, not copied), for a retry or an error reply.
    wire: Option<Bytes>,
    attempts: u32,
    tried: Vec<u64>,
    log: Option<Box<LogRecord>>,
}

impl Inflight {
    /// The request with its bytes back in place (a copy, on the failure path only).
    fn restore(&mut self) {
        if self.frame.raw.is_empty()
            && let Some(w) = &self.wire
        {
            self.frame.raw = BytesMut::from(&w[..]);
        }
    }
}

struct Downstream {
    /// The chain as of the latest request; `cell` has the newest (swapped on reload).
    chain: Arc<RpcChainRt>,
    cell: Arc<ArcSwap<RpcChainRt>>,
    shared: Arc<Shared>,
    codec: Arc<dyn Codec>,
    events: mpsc::UnboundedSender<Event>,
    inflight: Slab<Inflight>,
    next_seq: u64,
    deadlines: Deadlines,
    out: BytesMut,
    remote: SocketAddr,
    /// `remote`'s IP as text, for policies.
    remote_ip: String,
    local: SocketAddr,
    conn_id: u64,
    sink: Option<LogSink>,
    params: UpstreamParams,
}

/// Serves one downstream RPC connection until it closes, breaks the protocol, idles out, or the
/// listener drains (then in-flight requests finish first).
pub(crate) async fn serve(
    conn: Accepted,
    cell: Arc<ArcSwap<RpcChainRt>>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) {
    let chain = cell.load_full();
    let Accepted {
        stream,
        remote,
        local,
        id,
        ..
    } = conn;
    let st = &chain.stats;
    st.downstream_cx_total.inc();
    st.downstream_cx_active.inc();
    let _active = GaugeDown(chain.stats.downstream_cx_active.clone());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let idle = chain.cfg.idle_timeout;
    let idle_deadline = |now: Instant| (!idle.is_zero()).then(|| now + idle);

    // Which protocol: from the first bytes.
    let codec = loop {
        match chain.codec_for(&rbuf) {
            Ok(c) => break c,
            Err(false) => {
                st.downstream_cx_protocol_error.inc();
                tracing::debug!(%remote, first = ?&rbuf[..rbuf.len().min(16)], "not a {:?} RPC connection; closing", chain.cfg.protocol);
                return;
            }
            Err(true) => {}
        }
        let read = rd.read_buf(&mut rbuf);
        let n = match idle_deadline(Instant::now()) {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => return,
            },
            None => read.await,
        };
        match n {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let mut d = Downstream {
        params: UpstreamParams {
            codec: codec.clone(),
            limits: chain.limits,
            max_per_conn: 0,
        },
        sink: shared.log_sink(),
        chain: chain.clone(),
        cell,
        shared,
        codec,
        events,
        inflight: Slab::new(),
        next_seq: 0,
        deadlines: Deadlines::default(),
        out: BytesMut::new(),
        remote,
        remote_ip: remote.ip().to_string(),
        local,
        conn_id: id,
    };
    let max_inflight = chain.cfg.max_concurrent_requests as usize;
    let mut reading = true;
    let mut draining = *drain.borrow();
    let mut last_active = Instant::now();
    let idle_sleep = tokio::time::sleep(idle.max(Duration::from_millis(1)));
    tokio::pin!(idle_sleep);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    // Bytes that arrived with the first read are decoded before anything else.
    let mut fresh = true;
    loop {
        if fresh || !rbuf.is_empty() && reading && d.inflight.len() < max_inflight {
            fresh = false;
            if let Err(e) = d.decode(&mut rbuf, max_inflight) {
                st.downstream_cx_protocol_error.inc();
                tracing::info!(%remote, error = %e, "malformed RPC frame from downstream; closing");
                reading = false;
                rbuf.clear();
            }
        }
        if !d.out.is_empty() {
            if let Err(e) = wr.write_all(&d.out).await {
                tracing::debug!(%remote, error = %e, "RPC downstream write failed");
                break;
            }
            d.out.clear();
        }
        if !reading && d.inflight.is_empty() {
            break;
        }
        if d.inflight.is_empty() && !idle.is_zero() {
            idle_sleep.as_mut().reset(last_active + idle);
        }
        // The deadline timer is re-armed only when the earliest deadline moved earlier (or it fired).
        let first = d.deadlines.first();
        if let Some(f) = first
            && armed.is_none_or(|a| f < a)
        {
            timer.as_mut().reset(f);
            armed = Some(f);
        }
        tokio::select! {
            biased;
            Some(ev) = events_rx.recv() => {
                d.on_event(ev);
                while let Ok(ev) = events_rx.try_recv() {
                    d.on_event(ev);
                }
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                for (slot, seq) in d.deadlines.due(Instant::now()) {
                    if d.inflight.get(slot).is_some_and(|i| i.seq == seq) {
                        d.on_timeout(slot);
                    }
                }
            }
            r = rd.read_buf(&mut rbuf), if reading && !draining && d.inflight.len() < max_inflight => {
                last_active = Instant::now();
                match r {
                    Ok(0) => reading = false,
                    Ok(_) => {
                        if let Err(e) = d.decode(&mut rbuf, max_inflight) {
                            st.downstream_cx_protocol_error.inc();
                            tracing::info!(%remote, error = %e, "malformed RPC frame from downstream; closing");
                            reading = false;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "RPC downstream read failed");
                        break;
                    }
                }
            }
            changed = drain.changed(), if !draining => {
                if changed.is_err() || *drain.borrow() {
                    // No way to tell a Bolt or Dubbo client to go away: finish what is in flight,
                    // then close, and the client reconnects elsewhere.
                    draining = true;
                    reading = false;
                }
            }
            () = &mut idle_sleep, if !idle.is_zero() && d.inflight.is_empty() => {
                tracing::debug!(%remote, "RPC connection idle; closing");
                break;
            }
        }
    }
    d.reset_all();
}

struct GaugeDown(Arc<Gauge>);
impl Drop for GaugeDown {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Downstream {
    /// Takes every whole frame off `buf` (stopping at `max` in flight: the rest waits).
    fn decode(&mut self, buf: &mut BytesMut, max: usize) -> Result<(), CodecError> {
        while self.inflight.len() < max {
            let Some(frame) = self.codec.decode(buf, &self.chain.limits)? else {
                return Ok(());
            };
            self.on_frame(frame)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), CodecError> {
        let st = &self.chain.stats;
        match frame.kind {
            Kind::Heartbeat => {
                st.heartbeat.inc();
                self.out.extend_from_slice(&self.codec.heartbeat_reply(&frame));
                Ok(())
            }
            Kind::Request | Kind::OneWay => self.on_request(frame),
            Kind::Response | Kind::HeartbeatReply => {
                tracing::debug!(remote = %self.remote, id = frame.request_id, "RPC client sent a response; ignored");
                Ok(())
            }
        }
    }

    fn on_request(&mut self, mut frame: Frame) -> Result<(), CodecError> {
        // A reload swaps the cell: this request and later ones use the new routes.
        {
            let cur = self.cell.load();
            if !Arc::ptr_eq(&cur, &self.chain) {
                self.chain = Arc::clone(&cur);
            }
        }
        let chain = self.chain.clone();
        let st = &chain.stats;
        st.request_total.inc();
        let oneway = frame.kind == Kind::OneWay;
        if oneway {
            st.request_oneway.inc();
        }
        let start = Instant::now();
        let (decision, ms, log) = self.decide(&frame)?;
        let Decision::Forward {
            route: ri,
            cluster,
            subset,
            host,
            timeout,
        } = decision
        else {
            if let Decision::Local(failure, msg, flag) = decision {
                self.local_reply(&frame, failure, &msg, &ms, start, log, flag);
            }
            return Ok(());
        };
        self.params.max_per_conn = cluster.cfg.http2_max_concurrent_streams as usize;
        if oneway {
            let sent = upstream::connection(&cluster, &host, &self.params).and_then(|conn| {
                let id = conn.register(None).ok()?;
                self.codec.set_request_id(&mut frame, id);
                conn.write(id, frame.raw.split().freeze(), true).ok()
            });
            cluster.stats.upstream_rq_total.inc();
            let flag = if sent.is_some() {
                ResponseFlags::NONE
            } else {
                st.upstream_failure.inc();
                ResponseFlags::UPSTREAM_CONNECTION_FAILURE
            };
            self.log(log, None, 0, flag, start);
            return Ok(());
        }
        self.next_seq += 1;
        let token = self.inflight.insert(Inflight {
            chain,
            seq: self.next_seq,
            down_id: frame.request_id,
            start,
            route: ri,
            cluster,
            subset,
            host,
            sent: None,
            stats: ms,
            frame,
            wire: None,
            attempts: 0,
            tried: Vec::new(),
            log,
        });
        self.deadlines.push(start + timeout, token, self.next_seq);
        let inflight = &self.inflight;
        self.deadlines.compact(inflight.len(), |slot, seq| {
            inflight.get(slot).is_some_and(|i| i.seq == seq)
        });
        self.send(token);
        Ok(())
    }

    /// Phases 3 and 4 for one request: its keys (borrowed from the frame), route, rate limit,
    /// breaker and host. Everything returned is owned, so the frame is free to move afterwards.
    fn decide(&self, frame: &Frame) -> Result<Decided, CodecError> {
        let chain = &*self.chain;
        let st = &chain.stats;
        // Bolt clients often leave the method out of the header; reading it from the body is
        // cheap (the first field), and stats and logs want it. A Dubbo body is read past the
        // arguments only when a route needs the attachments.
        let need = Need {
            body: chain.needs_attachments || self.codec.name() == "bolt",
        };
        let keys = match self.codec.route_keys(frame, need, &chain.limits) {
            Ok(k) => k,
            // A serialization we cannot read: only routes that ask for nothing can take it.
            Err(CodecError::Serialization { .. }) => RouteKeys::default(),
            Err(e) => return Err(e),
        };
        let ms = method_stats(chain, &self.shared.stats, &keys.service, &keys.method);
        ms.rq_total.inc();
        let mut log = chain.logs.as_ref().map(|spec| {
            let mut l = Box::new(LogRecord::new(spec, self.remote, self.local, self.conn_id));
            l.rpc = Some(RpcLog {
                protocol: frame.protocol.name(),
                service: keys.service.to_string(),
                method: keys.method.to_string(),
                status: None,
                request_id: frame.request_id,
            });
            l.bytes_received = frame.raw.len() as u64;
            l
        });
        let local = |f, msg: String, flag| Decision::Local(f, msg, flag);
        // The merged Mixer's Check and Quota: in process, before routing.
        if let Some(policy) = &chain.policy {
            let attrs = RpcAttrs {
                keys: &keys,
                protocol: frame.protocol.name(),
                remote: self.remote,
                remote_ip: &self.remote_ip,
                local: self.local,
            };
            match policy.evaluate(&attrs) {
                PolicyOutcome::Allow => {}
                // The config refuses Redis quotas on RPC chains; should one get here, refuse
                // rather than let the request past an unasked quota.
                PolicyOutcome::Unavailable { .. } | PolicyOutcome::Remote(_) => {
                    st.policy_over_quota.inc();
                    let msg = "UNAVAILABLE: this quota's backend cannot be asked on an RPC chain".to_string();
                    return Ok((
                        local(Failure::RateLimited, msg, ResponseFlags::RATELIMIT_SERVICE_ERROR),
                        ms,
                        log,
                    ));
                }
                PolicyOutcome::Deny(reason) => {
                    st.policy_denied.inc();
                    let d = local(Failure::Denied, reason, ResponseFlags::UNAUTHORIZED_EXTERNAL_SERVICE);
                    return Ok((d, ms, log));
                }
                PolicyOutcome::OverQuota { name, .. } => {
                    st.policy_over_quota.inc();
                    let msg = format!("RESOURCE_EXHAUSTED: quota `{name}` exceeded");
                    return Ok((local(Failure::RateLimited, msg, ResponseFlags::RATE_LIMITED), ms, log));
                }
            }
        }
        let Some((ri, route)) = chain.route(&keys) else {
            st.no_route.inc();
            let msg = format!("no route for service `{}` method `{}`", keys.service, keys.method);
            return Ok((local(Failure::NoRoute, msg, ResponseFlags::NO_ROUTE_FOUND), ms, log));
        };
        if let Some(l) = log.as_mut() {
            l.route_name = route.name.clone();
        }
        if let Some(limiter) = &route.limiter
            && !limiter.check_with(self.remote.ip(), |h| header_ci(&keys, h)).allowed
        {
            st.rate_limited.inc();
            let d = local(
                Failure::RateLimited,
                "rate limited by the sidecar".into(),
                ResponseFlags::RATE_LIMITED,
            );
            return Ok((d, ms, log));
        }
        let dest = route.target.pick();
        let cluster = dest.cluster.clone();
        if let Some(l) = log.as_mut() {
            l.upstream_cluster = Some(cluster.name().to_string());
        }
        if cluster.stats.upstream_rq_active.get() >= i64::from(cluster.cfg.circuit_breakers.default.max_requests) {
            st.overflow.inc();
            cluster.stats.upstream_rq_pending_overflow.inc();
            let msg = "upstream overflow (circuit breaker)".to_string();
            return Ok((local(Failure::Overflow, msg, ResponseFlags::UPSTREAM_OVERFLOW), ms, log));
        }
        let Some(host) = cluster.pick(&PickContext {
            subset: dest.subset,
            ..PickContext::default()
        }) else {
            st.no_healthy_upstream.inc();
            let msg = format!("no healthy upstream in cluster `{}`", cluster.name());
            return Ok((
                local(Failure::Unavailable, msg, ResponseFlags::NO_HEALTHY_UPSTREAM),
                ms,
                log,
            ));
        };
        if let Some(l) = log.as_mut() {
            l.upstream_host = Some(host.addr);
        }
        let timeout = match (frame.timeout.or(keys.timeout), route.timeout) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(chain.cfg.request_timeout),
        };
        let d = Decision::Forward {
            route: ri,
            subset: dest.subset,
            cluster,
            host,
            timeout,
        };
        Ok((d, ms, log))
    }

    /// Sends (or sends again) in-flight request `token` to its host.
    fn send(&mut self, token: usize) {
        let Some(inf) = self.inflight.get(token) else { return };
        let (cluster, host) = (inf.cluster.clone(), inf.host.clone());
        let ticket = Ticket {
            slot: token,
            seq: inf.seq,
        };
        let Some(conn) = upstream::connection(&cluster, &host, &self.params) else {
            self.chain.stats.overflow.inc();
            self.fail(
                token,
                Failure::Overflow,
                "upstream connection overflow (circuit breaker)".into(),
                ResponseFlags::UPSTREAM_OVERFLOW,
            );
            return;
        };
        let id = match conn.register(Some((&self.events, ticket))) {
            Ok(id) => id,
            Err(e) => return self.on_failure(token, e),
        };
        let inf = &mut self.inflight[token];
        inf.restore();
        self.codec.set_request_id(&mut inf.frame, id);
        let wire = inf.frame.raw.split().freeze();
        inf.wire = Some(wire.clone());
        cluster.stats.upstream_rq_total.inc();
        cluster.stats.upstream_rq_active.inc();
        host.stats.rq_total.fetch_add(1, Relaxed);
        host.stats.rq_active.fetch_add(1, Relaxed);
        inf.sent = Some((conn.clone(), id));
        if let Err(e) = conn.write(id, wire, false) {
            self.on_failure(token, e);
        }
    }

    fn on_event(&mut self, ev: Event) {
        let (ticket, ev) = match ev {
            Event::Response { ticket, frame } => (ticket, Ok(frame)),
            Event::Failed { ticket, error } => (ticket, Err(error)),
        };
        if !self
            .inflight
            .get(ticket.slot)
            .is_some_and(|i| i.seq == ticket.seq && i.sent.is_some())
        {
            return;
        }
        match ev {
            Ok(frame) => self.on_response(ticket.slot, frame),
            Err(e) => self.on_failure(ticket.slot, e),
        }
    }

    /// The request left the upstream's hands (answered or failed): upstream gauges down.
    fn settle(inf: &mut Inflight) {
        if inf.sent.take().is_some() {
            inf.cluster.stats.upstream_rq_active.dec();
            inf.host.stats.rq_active.fetch_sub(1, Relaxed);
        }
    }

    fn on_response(&mut self, token: usize, mut frame: Frame) {
        let Some(mut inf) = self.inflight.try_remove(token) else {
            return;
        };
        Self::settle(&mut inf);
        let status = frame.status.unwrap_or(0);
        let ok = status == success_status(&*self.codec);
        let cs = &inf.cluster.stats;
        cs.status(if ok { 200 } else { 500 });
        if ok {
            self.chain.stats.response_success.inc();
            inf.host.stats.rq_success.fetch_add(1, Relaxed);
            outlier::record(&inf.cluster, &inf.host, Outcome::Success);
        } else {
            self.chain.stats.response_error.inc();
            inf.host.stats.rq_error.fetch_add(1, Relaxed);
            outlier::record(&inf.cluster, &inf.host, Outcome::Upstream5xx(500));
        }
        if inf.attempts > 0 {
            cs.upstream_rq_retry_success.inc();
        }
        self.codec.set_request_id(&mut frame, inf.down_id);
        self.out.extend_from_slice(&frame.raw);
        self.finish(inf, status, frame.raw.len(), ResponseFlags::NONE);
    }

    fn on_failure(&mut self, token: usize, error: UpError) {
        let Some(inf) = self.inflight.get_mut(token) else {
            return;
        };
        let chain = inf.chain.clone();
        Self::settle(inf);
        let route = &chain.routes[inf.route];
        let (retryable, flag, why) = match &error {
            UpError::Connect(why) => (
                true,
                ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
                format!("upstream connect failed: {why}"),
            ),
            UpError::Reset => (
                route.cfg.route.idempotent,
                ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                "upstream connection closed".to_string(),
            ),
            UpError::Protocol(why) => (
                route.cfg.route.idempotent,
                ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
                format!("upstream protocol error: {why}"),
            ),
        };
        outlier::record(&inf.cluster, &inf.host, Outcome::LocalFailure);
        if let UpError::Reset | UpError::Protocol(_) = error {
            inf.cluster.stats.upstream_rq_rx_reset.inc();
        }
        if retryable && self.retry(token) {
            return;
        }
        chain.stats.upstream_failure.inc();
        if let Some(l) = self.inflight.get_mut(token).and_then(|i| i.log.as_mut()) {
            l.upstream_failure = Some(why.clone());
        }
        self.fail(token, Failure::Unavailable, why, flag);
    }

    /// Tries another attempt on another host if the route and the retry breaker allow it.
    fn retry(&mut self, token: usize) -> bool {
        let Some(inf) = self.inflight.get_mut(token) else {
            return false;
        };
        let chain = inf.chain.clone();
        let route = &chain.routes[inf.route];
        if inf.attempts >= route.cfg.route.num_retries {
            if route.cfg.route.num_retries > 0 {
                inf.cluster.stats.upstream_rq_retry_limit_exceeded.inc();
            }
            return false;
        }
        let th = &inf.cluster.cfg.circuit_breakers.default;
        let active = inf.cluster.retries_active.load(Relaxed);
        if !crate::retry::breaker_allows(th, active, inf.cluster.stats.upstream_rq_active.get()) {
            inf.cluster.stats.upstream_rq_retry_overflow.inc();
            return false;
        }
        inf.tried.push(inf.host.id);
        let Some(host) = inf.cluster.pick(&PickContext {
            subset: inf.subset,
            avoid: &inf.tried,
            max_attempts: 3,
            ..PickContext::default()
        }) else {
            return false;
        };
        inf.attempts += 1;
        inf.host = host;
        if let Some(l) = inf.log.as_mut() {
            l.upstream_host = Some(inf.host.addr);
        }
        inf.cluster.stats.upstream_rq_retry.inc();
        chain.stats.retry.inc();
        self.send(token);
        true
    }

    fn on_timeout(&mut self, token: usize) {
        let Some(inf) = self.inflight.get_mut(token) else {
            return;
        };
        if let Some((conn, id)) = &inf.sent {
            conn.cancel(*id);
        }
        Self::settle(inf);
        inf.cluster.stats.upstream_rq_timeout.inc();
        inf.host.stats.rq_timeout.fetch_add(1, Relaxed);
        outlier::record(&inf.cluster, &inf.host, Outcome::LocalFailure);
        self.chain.stats.timeout.inc();
        let msg = format!("upstream {} did not answer in time", inf.host.addr);
        self.fail(token, Failure::Timeout, msg, ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
    }

    /// Ends in-flight request `token` with a native error response.
    fn fail(&mut self, token: usize, failure: Failure, msg: String, flag: ResponseFlags) {
        let Some(mut inf) = self.inflight.try_remove(token) else {
            return;
        };
        Self::settle(&mut inf);
        inf.restore();
        self.codec.set_request_id(&mut inf.frame, inf.down_id);
        let reply = self.codec.error_response(&inf.frame, failure, &msg);
        self.chain.stats.local_reply.inc();
        self.chain.stats.response_error.inc();
        let status = decode_status(&*self.codec, &reply);
        self.out.extend_from_slice(&reply);
        self.finish(inf, status, reply.len(), flag);
    }

    /// Answers `frame` locally before it was ever in flight.
    #[allow(clippy::too_many_arguments)]
    fn local_reply(
        &mut self,
        frame: &Frame,
        failure: Failure,
        msg: &str,
        ms: &MethodStats,
        start: Instant,
        log: Option<Box<LogRecord>>,
        flag: ResponseFlags,
    ) {
        self.chain.stats.local_reply.inc();
        if frame.kind == Kind::OneWay {
            // Nobody waits for an answer; the log and the counters say what happened.
            self.log(log, None, 0, flag, start);
            return;
        }
        self.chain.stats.response_error.inc();
        let reply = self.codec.error_response(frame, failure, msg);
        let status = decode_status(&*self.codec, &reply);
        ms.completed(&self.shared.stats, status, start.elapsed());
        self.out.extend_from_slice(&reply);
        self.log(log, Some(status), reply.len(), flag, start);
    }

    fn finish(&mut self, inf: Inflight, status: u16, sent: usize, flag: ResponseFlags) {
        inf.stats.completed(&self.shared.stats, status, inf.start.elapsed());
        self.log(inf.log, Some(status), sent, flag, inf.start);
    }

    fn log(&self, log: Option<Box<LogRecord>>, status: Option<u16>, sent: usize, flag: ResponseFlags, start: Instant) {
        if let (Some(mut l), Some(sink)) = (log, &self.sink) {
            if let Some(r) = l.rpc.as_mut() {
                r.status = status;
            }
            l.response_code = status.unwrap_or(0);
            l.flags.insert(flag);
            l.bytes_sent = sent as u64;
            l.duration = Some(start.elapsed());
            sink.send(l);
        }
    }

    /// The connection is going away: every request still in flight is cancelled upstream,
    /// counted, and logged with `DC`.
    fn reset_all(&mut self) {
        let tokens: Vec<usize> = self.inflight.iter().map(|(t, _)| t).collect();
        for t in tokens {
            if let Some(mut inf) = self.inflight.try_remove(t) {
                if let Some((conn, id)) = &inf.sent {
                    conn.cancel(*id);
                    inf.cluster.stats.upstream_rq_tx_reset.inc();
                }
                Self::settle(&mut inf);
                self.chain.stats.downstream_reset.inc();
                let start = inf.start;
                self.log(
                    inf.log,
                    None,
                    0,
                    ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
                    start,
                );
            }
        }
    }
}

/// The status a codec's successful responses carry (Bolt 0, Dubbo 20).
fn success_status(codec: &dyn Codec) -> u16 {
    if codec.name() == "dubbo" { 20 } else { 0 }
}

/// The status of a response the codec just built (error path only).
fn decode_status(codec: &dyn Codec, reply: &[u8]) -> u16 {
    let mut buf = BytesMut::from(reply);
    match codec.decode(&mut buf, &Limits::default()) {
        Ok(Some(f)) => f.status.unwrap_or(u16::MAX),
        _ => u16::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{HeaderMatchSpec, HeaderMatcher, RpcMatch, StringMatch};

    fn keys<'a>(service: &'a str, method: &'a str, headers: &[(&'a str, &'a str)]) -> RouteKeys<'a> {
        RouteKeys {
            service: service.into(),
            method: method.into(),
            version: "1.0".into(),
            group: "blue".into(),
            headers: headers.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            timeout: None,
        }
    }

    #[test]
    fn route_criteria_all_must_hold() {
        let exact = |s: &str| Some(StringMatch::Exact(s.into()));
        let m = RpcMatch {
            service: Some(StringMatch::Prefix("com.example.".into())),
            method: exact("echo"),
            version: exact("1.0"),
            group: None,
            headers: vec![HeaderMatcher {
                name: "x-tenant".into(),
                spec: HeaderMatchSpec::String {
                    matcher: StringMatch::Exact("blue".into()),
                    ignore_case: false,
                },
                invert_match: false,
            }],
        };
        let cases = [
            (keys("com.example.Echo", "echo", &[("X-Tenant", "blue")]), true),
            (keys("com.example.Echo", "echo", &[("x-tenant", "green")]), false),
            (keys("com.example.Echo", "echo", &[]), false),
            (keys("com.example.Echo", "add", &[("x-tenant", "blue")]), false),
            (keys("org.other.Echo", "echo", &[("x-tenant", "blue")]), false),
        ];
        for (k, want) in cases {
            assert_eq!(route_matches(&m, &k), want, "{k:?}");
        }
        assert!(
            route_matches(&RpcMatch::default(), &keys("", "", &[])),
            "an empty match takes everything"
        );
    }
}

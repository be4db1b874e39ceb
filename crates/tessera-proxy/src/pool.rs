//! Upstream connection pools, one per worker thread, so taking or returning a connection never
//! takes a lock. HTTP/1.1 connections are reused one request at a time (keep-alive); HTTP/2
//! connections carry many streams, up to the cluster's `http2_max_concurrent_streams`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::body::ReqBody;
use crate::cluster::{ClusterRt, Host};
use crate::tls::{Alpn, Reason, Stream};

pub(crate) type H1Sender = http1::SendRequest<ReqBody>;
pub(crate) type H2Sender = http2::SendRequest<ReqBody>;

/// Idle HTTP/1 connections kept per host and worker; more are closed.
const MAX_IDLE_PER_HOST: usize = 1024;
/// How often a worker sweeps its pools for closed or expired connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

struct IdleH1 {
    sender: H1Sender,
    uses: u32,
    since: Instant,
}

pub(crate) struct H2Conn {
    sender: H2Sender,
    active: Arc<AtomicU32>,
    uses: u32,
}

#[derive(Default)]
struct Pools {
    h1: HashMap<u64, Vec<IdleH1>>,
    h2: HashMap<u64, Vec<H2Conn>>,
    /// HTTP/2 connections being made, so concurrent requests wait for one instead of each dialling.
    h2_connecting: HashMap<u64, Arc<Connecting>>,
    /// Live HTTP/1 connections per host on this worker (busy or idle).
    h1_live: HashMap<u64, u32>,
    /// Requests waiting for an HTTP/1 connection to come back (the cluster is at max_connections).
    h1_waiters: HashMap<u64, VecDeque<oneshot::Sender<(H1Sender, u32)>>>,
    last_sweep: Option<Instant>,
}

/// An HTTP/2 connect in progress; waiters learn how it ended.
#[derive(Default)]
pub(crate) struct Connecting {
    done: tokio::sync::Notify,
    failure: std::sync::OnceLock<(io::ErrorKind, String, bool)>,
}

impl Connecting {
    /// Waits for the connect to end; `Err` carries its failure.
    pub(crate) async fn wait(&self) -> Result<(), ConnectError> {
        let notified = self.done.notified();
        if self.failure.get().is_none() {
            notified.await;
        }
        match self.failure.get() {
            Some((_, _, true)) => Err(ConnectError::Timeout),
            Some((kind, msg, false)) => Err(ConnectError::Io(io::Error::new(*kind, msg.clone()))),
            None => Ok(()),
        }
    }
}

/// What an HTTP/2 request should do for a connection.
pub(crate) enum H2Slot {
    /// Use this connection; a stream slot is taken.
    Ready(H2Sender, Arc<AtomicU32>),
    /// Another request is connecting: wait for it, then ask again.
    Wait(Arc<Connecting>),
    /// Connect; the caller is now the one others wait for.
    Connect(ConnectingGuard),
}

/// Ends an HTTP/2 connect on drop (success, failure or cancellation) and wakes its waiters.
pub(crate) struct ConnectingGuard {
    host: u64,
    state: Arc<Connecting>,
}

impl ConnectingGuard {
    fn fail(&self, e: &ConnectError) {
        let f = match e {
            ConnectError::Timeout => (io::ErrorKind::TimedOut, "connect timeout".to_string(), true),
            ConnectError::Io(e) => (e.kind(), e.to_string(), false),
            ConnectError::Tls(r, e) => (
                io::ErrorKind::InvalidData,
                format!("TLS error: {}: {e}", r.name()),
                false,
            ),
            ConnectError::Handshake(e) => (io::ErrorKind::InvalidData, format!("HTTP/2 handshake: {e}"), false),
        };
        let _ = self.state.failure.set(f);
    }
}

impl Drop for ConnectingGuard {
    fn drop(&mut self) {
        let _ = POOLS.try_with(|p| p.borrow_mut().h2_connecting.remove(&self.host));
        self.state.done.notify_waiters();
    }
}

/// An HTTP/2 connection for `host` with a free stream, or what to do instead.
pub(crate) fn h2_slot(host: u64, max_streams: u32, max_requests: u32) -> H2Slot {
    if let Some((s, a)) = take_h2(host, max_streams, max_requests) {
        return H2Slot::Ready(s, a);
    }
    POOLS
        .try_with(|p| {
            let mut p = p.borrow_mut();
            if let Some(c) = p.h2_connecting.get(&host) {
                return H2Slot::Wait(c.clone());
            }
            let state = Arc::new(Connecting::default());
            p.h2_connecting.insert(host, state.clone());
            H2Slot::Connect(ConnectingGuard { host, state })
        })
        .unwrap_or_else(|_| {
            H2Slot::Connect(ConnectingGuard {
                host,
                state: Arc::default(),
            })
        })
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::default();
}

/// A connection ready for one request.
pub(crate) enum Conn {
    H1 { sender: H1Sender, uses: u32 },
    H2 { sender: H2Sender, active: Arc<AtomicU32> },
}

/// What to do with the connection when the response ends.
pub(crate) enum Pooled {
    /// Put this HTTP/1 connection back (if the response ended cleanly).
    H1 { host: u64, sender: H1Sender, uses: u32 },
    /// Release one HTTP/2 stream slot.
    H2(Arc<AtomicU32>),
    /// Nothing: the connection is not shared (upgrades).
    None,
}

impl Pooled {
    /// Settles the connection: an HTTP/1 connection is reused only after a clean end.
    pub(crate) fn release(self, clean: bool, max_requests: u32, idle_timeout: Duration) {
        match self {
            Pooled::H1 { host, sender, uses } => {
                if clean && (max_requests == 0 || uses < max_requests) && !sender.is_closed() {
                    put_h1(host, sender, uses, idle_timeout);
                }
            }
            Pooled::H2(active) => {
                active.fetch_sub(1, Ordering::Relaxed);
            }
            Pooled::None => {}
        }
    }
}

/// Takes an idle HTTP/1 connection to `host`, most recently used first.
pub(crate) fn take_h1(host: u64, idle_timeout: Duration) -> Option<(H1Sender, u32)> {
    POOLS
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let now = Instant::now();
            let list = p.h1.get_mut(&host)?;
            while let Some(c) = list.pop() {
                if !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout {
                    return Some((c.sender, c.uses));
                }
            }
            None
        })
        .ok()
        .flatten()
}

fn put_h1(host: u64, sender: H1Sender, uses: u32, idle_timeout: Duration) {
    let _ = POOLS.try_with(|p| {
        let mut p = p.borrow_mut();
        let now = Instant::now();
        // A waiting request gets the connection first.
        let mut sender = sender;
        if let Some(q) = p.h1_waiters.get_mut(&host) {
            while let Some(w) = q.pop_front() {
                match w.send((sender, uses)) {
                    Ok(()) => return,
                    Err((back, _)) => sender = back,
                }
            }
        }
        let list = p.h1.entry(host).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(IdleH1 {
                sender,
                uses,
                since: now,
            });
        }
        if p.last_sweep.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            p.h1_waiters.retain(|_, q| {
                q.retain(|w| !w.is_closed());
                !q.is_empty()
            });
            p.last_sweep = Some(now);
            sweep(&mut p, now, idle_timeout);
        }
    });
}

fn sweep(p: &mut Pools, now: Instant, idle_timeout: Duration) {
    p.h1.retain(|_, list| {
        list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout);
        !list.is_empty()
    });
    p.h2.retain(|_, list| {
        list.retain(|c| !c.sender.is_closed());
        !list.is_empty()
    });
}

/// HTTP/1 connections to `host` this worker holds, busy or idle.
pub(crate) fn h1_live(host: u64) -> u32 {
    POOLS
        .try_with(|p| p.borrow().h1_live.get(&host).copied().unwrap_or(0))
        .unwrap_or(0)
}

/// Queues for the next HTTP/1 connection to `host` released on this worker.
pub(crate) fn wait_h1(host: u64) -> oneshot::Receiver<(H1Sender, u32)> {
    let (tx, rx) = oneshot::channel();
    let _ = POOLS.try_with(|p| p.borrow_mut().h1_waiters.entry(host).or_default().push_back(tx));
    rx
}

fn h1_live_add(host: u64, delta: i32) {
    let _ = POOLS.try_with(|p| {
        let mut p = p.borrow_mut();
        let n = p.h1_live.entry(host).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            p.h1_live.remove(&host);
        }
    });
}

/// A live HTTP/2 connection to `host` with a free stream slot, the slot already taken.
fn take_h2(host: u64, max_streams: u32, max_requests: u32) -> Option<(H2Sender, Arc<AtomicU32>)> {
    POOLS
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let list = p.h2.get_mut(&host)?;
            list.retain(|c| !c.sender.is_closed() && (max_requests == 0 || c.uses < max_requests));
            let c = list
                .iter_mut()
                .find(|c| c.active.load(Ordering::Relaxed) < max_streams)?;
            c.active.fetch_add(1, Ordering::Relaxed);
            c.uses += 1;
            Some((c.sender.clone(), c.active.clone()))
        })
        .ok()
        .flatten()
}

fn add_h2(host: u64, conn: H2Conn) {
    let _ = POOLS.try_with(|p| p.borrow_mut().h2.entry(host).or_default().push(conn));
}

/// Why a connection could not be made.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Timeout,
    Io(io::Error),
    /// The TLS handshake failed.
    Tls(Reason, io::Error),
    Handshake(hyper::Error),
}

/// Opens a new connection to `host`. An HTTP/2 connection joins the worker's pool at once so
/// concurrent requests share it; an HTTP/1 connection is the caller's until the response ends.
pub(crate) async fn connect(cluster: &ClusterRt, host: &Arc<Host>, h2: bool) -> Result<Conn, ConnectError> {
    if h2 {
        // Callers that did not go through `h2_slot` still announce the connect.
        let guard = match h2_slot(host.id, 0, 0) {
            H2Slot::Connect(g) => Some(g),
            _ => None,
        };
        return connect_h2(cluster, host, guard).await;
    }
    connect_inner(cluster, host, false).await
}

/// Makes the HTTP/2 connection `guard` stands for; waiters learn the outcome when it drops.
pub(crate) async fn connect_h2(
    cluster: &ClusterRt,
    host: &Arc<Host>,
    guard: Option<ConnectingGuard>,
) -> Result<Conn, ConnectError> {
    let r = connect_inner(cluster, host, true).await;
    if let (Err(e), Some(g)) = (&r, &guard) {
        g.fail(e);
    }
    drop(guard);
    r
}

async fn connect_inner(cluster: &ClusterRt, host: &Arc<Host>, h2: bool) -> Result<Conn, ConnectError> {
    let stream = connect_stream(cluster, host, if h2 { Alpn::Http2 } else { Alpn::Http1 }).await?;
    let guard = ConnGuard::new(cluster, host);
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<_, ReqBody>(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        let active = Arc::new(AtomicU32::new(1));
        add_h2(
            host.id,
            H2Conn {
                sender: sender.clone(),
                active: active.clone(),
                uses: 1,
            },
        );
        Ok(Conn::H2 { sender, active })
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, ReqBody>(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let id = host.id;
        h1_live_add(id, 1);
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended with an error");
            }
            // The connection task runs on the worker that made it, so this is that worker's pool.
            h1_live_add(id, -1);
        });
        Ok(Conn::H1 { sender, uses: 0 })
    }
}

/// A connection to `host`: TCP, then TLS when the cluster originates it, all within the
/// cluster's connect timeout.
pub(crate) async fn connect_stream(cluster: &ClusterRt, host: &Host, alpn: Alpn) -> Result<Stream, ConnectError> {
    let tcp = connect_tcp(cluster, host).await?;
    let Some(tls) = &cluster.tls else {
        return Ok(Stream::Plain(tcp));
    };
    match tokio::time::timeout(cluster.cfg.connect_timeout, tls.connect(tcp, host.addr.ip(), alpn)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err((reason, e))) => {
            cluster.stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
            Err(ConnectError::Tls(reason, e))
        }
        Err(_) => {
            tls.stats.failed(Reason::Timeout);
            cluster.stats.upstream_cx_connect_fail.inc();
            cluster.stats.upstream_cx_connect_timeout.inc();
            host.stats.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
            Err(ConnectError::Timeout)
        }
    }
}

/// A TCP connection to `host` within the cluster's connect timeout, counted in the stats.
pub(crate) async fn connect_tcp(cluster: &ClusterRt, host: &Host) -> Result<TcpStream, ConnectError> {
    let stats = &cluster.stats;
    stats.upstream_cx_total.inc();
    host.stats.cx_total.fetch_add(1, Ordering::Relaxed);
    let r = tokio::time::timeout(cluster.cfg.connect_timeout, TcpStream::connect(host.addr)).await;
    let fail = |host: &Host| {
        stats.upstream_cx_connect_fail.inc();
        host.stats.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
    };
    match r {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            fail(host);
            Err(ConnectError::Io(e))
        }
        Err(_) => {
            fail(host);
            stats.upstream_cx_connect_timeout.inc();
            Err(ConnectError::Timeout)
        }
    }
}

/// Counts a live upstream connection in the cluster and host gauges for as long as it lives.
pub(crate) struct ConnGuard {
    gauge: Arc<crate::stats::Gauge>,
    host: Arc<Host>,
}

impl ConnGuard {
    pub(crate) fn new(cluster: &ClusterRt, host: &Arc<Host>) -> ConnGuard {
        cluster.stats.upstream_cx_active.inc();
        host.stats.cx_active.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            gauge: cluster.stats.upstream_cx_active.clone(),
            host: host.clone(),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        self.host.stats.cx_active.fetch_sub(1, Ordering::Relaxed);
    }
}

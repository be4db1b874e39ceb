//! Multiplexed upstream RPC connections: one writer/reader task per connection, requests from
//! many downstream connections sharing it under ids the sidecar hands out, and a per-worker pool.
//!
//! The pending map is behind a `Mutex` although only one worker thread touches it (the
//! connection's task and the downstream tasks of that worker): tasks must be `Send`, and an
//! uncontended lock costs a few nanoseconds.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tessera_rpc::{Codec, Frame, Kind, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::{ClusterRt, Host};
use crate::pool::{ConnGuard, ConnectError, connect_stream};
use crate::tls::Alpn;
use crate::util::FastMap;

/// Why an upstream request got no response.
#[derive(Debug, Clone)]
pub(crate) enum UpError {
    /// The connection could not be made; the request was never sent, so any request may be retried.
    Connect(String),
    /// The connection closed or broke with the request outstanding.
    Reset,
    /// The upstream sent bytes that are not a valid frame; the connection was closed.
    Protocol(String),
}

/// Which in-flight request of a downstream connection: its slab slot, and a sequence number so
/// an event that crossed paths with a timeout cannot land on the slot's next occupant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) slot: usize,
    pub(crate) seq: u64,
}

/// What an upstream connection tells the downstream connection a request came from.
pub(crate) enum Event {
    Response { ticket: Ticket, frame: Frame },
    Failed { ticket: Ticket, error: UpError },
}

struct Waiter {
    events: mpsc::UnboundedSender<Event>,
    ticket: Ticket,
}

/// One upstream connection shared by the requests of a worker.
pub(crate) struct UpConn {
    tx: mpsc::UnboundedSender<Bytes>,
    pending: Mutex<FastMap<u64, Waiter>>,
    /// `pending.len()`, readable without the lock when choosing a connection.
    outstanding: AtomicUsize,
    next_id: AtomicU64,
    alive: AtomicBool,
    /// Bolt request ids are 32 bits, Dubbo's 64.
    id_mask: u64,
}

impl UpConn {
    fn pending_len(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// A fresh request id; the response (or the failure) will arrive as an [`Event`] for
    /// `waiter`. One-way requests (`waiter` is `None`) expect nothing back.
    pub(crate) fn register(&self, waiter: Option<(&mpsc::UnboundedSender<Event>, Ticket)>) -> Result<u64, UpError> {
        if !self.alive.load(Ordering::Relaxed) {
            return Err(UpError::Reset);
        }
        let Some((events, ticket)) = waiter else {
            return Ok(self.next_id.fetch_add(1, Ordering::Relaxed) & self.id_mask);
        };
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // Ids wrap (Bolt's after 2^32 requests); skip any still outstanding.
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) & self.id_mask;
            if !pending.contains_key(&id) {
                break id;
            }
        };
        pending.insert(
            id,
            Waiter {
                events: events.clone(),
                ticket,
            },
        );
        self.outstanding.store(pending.len(), Ordering::Relaxed);
        Ok(id)
    }

    /// Queues the frame registered under `id` for writing.
    pub(crate) fn write(&self, id: u64, wire: Bytes, oneway: bool) -> Result<(), UpError> {
        if self.tx.send(wire).is_err() {
            // The connection ended after `register`. If its task already failed our waiter, the
            // event is on its way; otherwise fail here.
            if oneway || self.cancel(id) {
                return Err(UpError::Reset);
            }
        }
        Ok(())
    }

    /// Forgets the request sent under `id` (timed out, or its client left); a late response is
    /// dropped and counted. True when it was still outstanding.
    pub(crate) fn cancel(&self, id: u64) -> bool {
        self.take(id).is_some()
    }

    fn take(&self, id: u64) -> Option<Waiter> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let w = pending.remove(&id);
        self.outstanding.store(pending.len(), Ordering::Relaxed);
        w
    }

    /// Marks the connection dead and fails every outstanding request with `error`.
    fn fail_all(&self, error: &UpError) {
        self.alive.store(false, Ordering::Relaxed);
        let drained: Vec<Waiter> = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            self.outstanding.store(0, Ordering::Relaxed);
            p.drain().map(|(_, w)| w).collect()
        };
        for w in drained {
            let _ = w.events.send(Event::Failed {
                ticket: w.ticket,
                error: error.clone(),
            });
        }
    }
}

/// Connections per (host, protocol), on this worker.
type Pool = FastMap<(u64, &'static str), Vec<Arc<UpConn>>>;

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// What an upstream connection needs besides the host.
pub(crate) struct UpstreamParams {
    pub(crate) codec: Arc<dyn Codec>,
    pub(crate) limits: Limits,
    /// Requests outstanding on one connection before another is opened.
    pub(crate) max_per_conn: usize,
}

/// A connection to `host` with room for one more request: a pooled one, or a new one whose
/// connect starts now (requests queue on it meanwhile, so concurrent callers do not each dial).
/// `None` when the cluster's `max_connections` breaker is full and no connection has room.
pub(crate) fn connection(cluster: &Arc<ClusterRt>, host: &Arc<Host>, p: &UpstreamParams) -> Option<Arc<UpConn>> {
    let key = (host.id, p.codec.name());
    let found = POOL.with(|pool| {
        let pool = pool.borrow();
        // The first live connection with room: requests concentrate on few connections, so
        // writes batch better, and a new connection opens only when they are all full.
        pool.get(&key)?
            .iter()
            .find(|c| c.alive.load(Ordering::Relaxed) && c.pending_len() < p.max_per_conn)
            .cloned()
    });
    if let Some(c) = found {
        return Some(c);
    }
    if cluster.stats.upstream_cx_active.get() >= i64::from(cluster.cfg.circuit_breakers.default.max_connections) {
        cluster.stats.upstream_cx_overflow.inc();
        return None;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(UpConn {
        tx,
        pending: Mutex::new(FastMap::default()),
        outstanding: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        alive: AtomicBool::new(true),
        id_mask: if p.codec.name() == "bolt" {
            u64::from(u32::MAX)
        } else {
            u64::MAX
        },
    });
    POOL.with(|pool| pool.borrow_mut().entry(key).or_default().push(conn.clone()));
    tokio::spawn(run(
        conn.clone(),
        rx,
        cluster.clone(),
        host.clone(),
        p.codec.clone(),
        p.limits,
    ));
    Some(conn)
}

fn remove(key: (u64, &'static str), conn: &Arc<UpConn>) {
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if let Some(v) = pool.get_mut(&key) {
            v.retain(|c| !Arc::ptr_eq(c, conn));
            if v.is_empty() {
                pool.remove(&key);
            }
        }
    });
}

/// The connection's task: connect, then write what requests queue and hand responses back,
/// until the upstream closes, breaks the protocol, or the connection idles out.
async fn run(
    conn: Arc<UpConn>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    cluster: Arc<ClusterRt>,
    host: Arc<Host>,
    codec: Arc<dyn Codec>,
    limits: Limits,
) {
    let key = (host.id, codec.name());
    let stream = match connect_stream(&cluster, &host, Alpn::Configured).await {
        Ok(s) => s,
        Err(e) => {
            let why = match e {
                ConnectError::Timeout => "connect timeout".to_string(),
                ConnectError::Io(e) => e.to_string(),
                ConnectError::Tls(r, e) => format!("TLS error ({}): {e}", r.name()),
                ConnectError::Handshake(e) => e.to_string(),
            };
            tracing::debug!(upstream = %host.addr, error = %why, "RPC upstream connect failed");
            remove(key, &conn);
            rx.close();
            conn.fail_all(&UpError::Connect(why));
            return;
        }
    };
    let _guard = ConnGuard::new(&cluster, &host);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let mut wbuf = BytesMut::new();
    let idle = cluster.cfg.idle_timeout;
    let idle_sleep = tokio::time::sleep(idle.max(Duration::from_millis(1)));
    tokio::pin!(idle_sleep);
    let stats = &cluster.stats;
    let end = loop {
        tokio::select! {
            biased;
            m = rx.recv() => {
                let Some(first) = m else { break UpError::Reset };
                wbuf.extend_from_slice(&first);
                while let Ok(more) = rx.try_recv() {
                    wbuf.extend_from_slice(&more);
                }
                stats.upstream_cx_tx_bytes_total.add(wbuf.len() as u64);
                if let Err(e) = wr.write_all(&wbuf).await {
                    tracing::debug!(upstream = %host.addr, error = %e, "RPC upstream write failed");
                    break UpError::Reset;
                }
                wbuf.clear();
            }
            r = rd.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) | Err(_) => break UpError::Reset,
                    Ok(n) => stats.upstream_cx_rx_bytes_total.add(n as u64),
                }
                if let Err(e) = dispatch(&conn, &*codec, &mut rbuf, &limits, &mut wbuf) {
                    tracing::info!(upstream = %host.addr, error = %e, "RPC upstream sent a malformed frame; closing");
                    break UpError::Protocol(e.to_string());
                }
                if !wbuf.is_empty() {
                    // Heartbeats the upstream sent us, answered.
                    if wr.write_all(&wbuf).await.is_err() {
                        break UpError::Reset;
                    }
                    wbuf.clear();
                }
            }
            () = &mut idle_sleep, if !idle.is_zero() => {
                if conn.pending_len() == 0 {
                    tracing::trace!(upstream = %host.addr, "RPC upstream connection idle; closing");
                    break UpError::Reset;
                }
            }
        }
        if !idle.is_zero() {
            idle_sleep.as_mut().reset(Instant::now() + idle);
        }
    };
    remove(key, &conn);
    rx.close();
    conn.fail_all(&end);
}

/// Hands every whole frame in `buf` to whoever waits for it; answers upstream heartbeats.
fn dispatch(
    conn: &UpConn,
    codec: &dyn Codec,
    buf: &mut BytesMut,
    limits: &Limits,
    out: &mut BytesMut,
) -> Result<(), tessera_rpc::CodecError> {
    while let Some(frame) = codec.decode(buf, limits)? {
        match frame.kind {
            Kind::Response => match conn.take(frame.request_id) {
                Some(w) => {
                    let _ = w.events.send(Event::Response {
                        ticket: w.ticket,
                        frame,
                    });
                }
                None => {
                    // Its request timed out or its client left; that request was answered already.
                    tracing::debug!(
                        id = frame.request_id,
                        "RPC response for no outstanding request; dropped"
                    );
                }
            },
            Kind::Heartbeat => out.extend_from_slice(&codec.heartbeat_reply(&frame)),
            Kind::HeartbeatReply => {}
            Kind::Request | Kind::OneWay => {
                tracing::debug!(id = frame.request_id, "RPC upstream sent a request; ignored");
            }
        }
    }
    Ok(())
}

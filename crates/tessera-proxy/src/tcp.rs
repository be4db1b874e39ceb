//! The TCP proxy: both directions, half-close, connect and idle timeouts, byte counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_model as model;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::access_log::{LogRecord, LogSink, LogSpec};
use crate::cluster::ClusterRt;
use crate::flags::ResponseFlags;
use crate::listener::Accepted;
use crate::pool::{ConnGuard, ConnectError, connect_stream};
use crate::stats::{Counter, Gauge, Scope, Stats};
use crate::tls::{Alpn, Stream};

/// Bytes read per system call, per direction.
const BUF: usize = 32 * 1024;

/// Envoy's `tcp.<stat_prefix>.*` stats.
pub(crate) struct TcpStats {
    pub(crate) downstream_cx_total: Arc<Counter>,
    pub(crate) downstream_cx_active: Arc<Gauge>,
    pub(crate) downstream_cx_rx_bytes_total: Arc<Counter>,
    pub(crate) downstream_cx_tx_bytes_total: Arc<Counter>,
    pub(crate) downstream_cx_no_route: Arc<Counter>,
    pub(crate) idle_timeout: Arc<Counter>,
    pub(crate) upstream_connect_fail: Arc<Counter>,
}

/// One TCP proxy filter chain at run time.
pub(crate) struct TcpProxyRt {
    pub(crate) cfg: model::TcpProxy,
    pub(crate) cluster: Arc<ClusterRt>,
    pub(crate) stats: TcpStats,
    pub(crate) logs: Option<Arc<LogSpec>>,
}

impl TcpProxyRt {
    pub(crate) fn new(cfg: model::TcpProxy, cluster: Arc<ClusterRt>, stats: &Stats) -> TcpProxyRt {
        let s = Scope::tagged("tcp", "envoy_tcp_prefix", &cfg.stat_prefix);
        TcpProxyRt {
            stats: TcpStats {
                downstream_cx_total: stats.counter(&s, "downstream_cx_total"),
                downstream_cx_active: stats.gauge(&s, "downstream_cx_active"),
                downstream_cx_rx_bytes_total: stats.counter(&s, "downstream_cx_rx_bytes_total"),
                downstream_cx_tx_bytes_total: stats.counter(&s, "downstream_cx_tx_bytes_total"),
                downstream_cx_no_route: stats.counter(&s, "downstream_cx_no_route"),
                idle_timeout: stats.counter(&s, "idle_timeout"),
                upstream_connect_fail: stats.counter(&s, "upstream_connect_fail"),
            },
            logs: LogSpec::new(&cfg.access_log),
            cluster,
            cfg,
        }
    }
}

/// Proxies one downstream connection to the cluster until both sides are done.
pub(crate) async fn proxy(conn: Accepted, t: Arc<TcpProxyRt>, sink: Option<LogSink>) {
    let Accepted {
        stream: down,
        tls,
        remote,
        local,
        original_dst,
        id,
    } = conn;
    let s = &t.stats;
    s.downstream_cx_total.inc();
    s.downstream_cx_active.inc();
    let start = Instant::now();
    let mut log = t
        .logs
        .as_ref()
        .map(|spec| Box::new(LogRecord::new(spec, remote, local, id)));
    if let Some(l) = log.as_mut() {
        l.upstream_cluster = Some(t.cluster.name().to_string());
        l.tls = tls;
    }
    let outcome = async {
        let Some(host) = t.cluster.pick(&crate::cluster::PickContext {
            original_dst,
            ..Default::default()
        }) else {
            s.downstream_cx_no_route.inc();
            tracing::debug!(%remote, cluster = t.cluster.name(), "no healthy upstream; closing");
            return (ResponseFlags::NO_HEALTHY_UPSTREAM, 0, 0);
        };
        if let Some(l) = log.as_mut() {
            l.upstream_host = Some(host.addr);
        }
        let up = match connect_stream(&t.cluster, &host, Alpn::Configured).await {
            Ok(up) => up,
            Err(e) => {
                s.upstream_connect_fail.inc();
                let why = match e {
                    ConnectError::Timeout => "connect timeout".to_string(),
                    ConnectError::Io(e) => e.to_string(),
                    ConnectError::Tls(r, e) => format!("TLS error ({}): {e}", r.name()),
                    ConnectError::Handshake(e) => e.to_string(),
                };
                tracing::debug!(%remote, upstream = %host.addr, error = %why, "upstream connect failed; closing");
                if let Some(l) = log.as_mut() {
                    l.upstream_failure = Some(why);
                }
                return (ResponseFlags::UPSTREAM_CONNECTION_FAILURE, 0, 0);
            }
        };
        let _guard = ConnGuard::new(&t.cluster, &host);
        let idle = (!t.cfg.idle_timeout.is_zero()).then_some(t.cfg.idle_timeout);
        let counters = Counters {
            rx: [
                &s.downstream_cx_rx_bytes_total,
                &t.cluster.stats.upstream_cx_tx_bytes_total,
            ],
            tx: [
                &s.downstream_cx_tx_bytes_total,
                &t.cluster.stats.upstream_cx_rx_bytes_total,
            ],
        };
        let (rx, tx, timed_out) = relay(down, up, idle, &counters).await;
        if timed_out {
            s.idle_timeout.inc();
            tracing::debug!(%remote, "TCP proxy idle timeout");
        }
        (
            if timed_out {
                ResponseFlags::STREAM_IDLE_TIMEOUT
            } else {
                ResponseFlags::NONE
            },
            rx,
            tx,
        )
    }
    .await;
    s.downstream_cx_active.dec();
    if let (Some(mut l), Some(sink)) = (log, sink) {
        l.flags.insert(outcome.0);
        l.bytes_received = outcome.1;
        l.bytes_sent = outcome.2;
        l.duration = Some(start.elapsed());
        sink.send(l);
    }
}

struct Counters<'a> {
    /// Downstream-to-upstream bytes.
    rx: [&'a Counter; 2],
    /// Upstream-to-downstream bytes.
    tx: [&'a Counter; 2],
}

/// Copies both ways. When one side finishes sending, its FIN is passed on and the other
/// direction goes on (half-close). An error on either side ends both. Returns the bytes each way
/// and whether the idle timeout ended it.
async fn relay(down: Stream, up: Stream, idle: Option<Duration>, c: &Counters<'_>) -> (u64, u64, bool) {
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let rx = AtomicU64::new(0);
    let tx = AtomicU64::new(0);
    // Both halves are polled by this one task, so the split's lock is never contended.
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    let both = async {
        tokio::try_join!(
            pump(&mut dr, &mut uw, &last, base, &rx, &c.rx),
            pump(&mut ur, &mut dw, &last, base, &tx, &c.tx)
        )
    };
    let timed_out = match idle {
        None => {
            let _ = both.await;
            false
        }
        Some(idle) => {
            tokio::select! {
                _ = both => false,
                () = idle_watch(&last, base, idle) => true,
            }
        }
    };
    (rx.load(Ordering::Relaxed), tx.load(Ordering::Relaxed), timed_out)
}

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    last: &AtomicU64,
    base: Instant,
    total: &AtomicU64,
    counters: &[&Counter; 2],
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps going.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        let n = n as u64;
        total.fetch_add(n, Ordering::Relaxed);
        counters[0].add(n);
        counters[1].add(n);
        last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn idle_watch(last: &AtomicU64, base: Instant, idle: Duration) {
    loop {
        let deadline = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

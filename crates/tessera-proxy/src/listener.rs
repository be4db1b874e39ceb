//! Listeners: sockets bound once per worker with SO_REUSEPORT, accept loops, and the choice of
//! filter chain for each connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tessera_model::FilterChainMatch;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::HttpChainRt;
use crate::server::Shared;
use crate::stats::{Counter, Gauge, Scope, Stats};
use crate::tcp::TcpProxyRt;
use crate::tls::{ServerTls, Stream, TlsInfo};
use crate::tls_inspect::{self, Inspect};

/// The network filter of a chain at run time.
pub(crate) enum ChainFilter {
    Tcp(Arc<TcpProxyRt>),
    Http(Arc<HttpChainRt>),
    /// A cell, so open connections pick up a reloaded chain for their next request.
    Rpc(Arc<ArcSwap<crate::rpc::RpcChainRt>>),
}

pub(crate) struct ChainRt {
    pub(crate) name: String,
    pub(crate) matcher: FilterChainMatch,
    /// TLS termination, when the chain has a `tls` block.
    pub(crate) tls: Option<Arc<ServerTls>>,
    pub(crate) filter: ChainFilter,
}

/// What a listener does with new connections; swapped whole on reload.
pub(crate) struct ListenerCfg {
    pub(crate) chains: Vec<ChainRt>,
    pub(crate) inspect: bool,
    /// Some chain matches on `http/1.1`, `http/1.0` or `h2c`: read the request line of plaintext.
    pub(crate) inspect_http: bool,
    pub(crate) inspect_timeout: Duration,
    /// On inspection timeout, choose a chain with what was seen instead of closing.
    pub(crate) continue_on_timeout: bool,
    /// Restore the destination from before an iptables REDIRECT and hand the connection to the
    /// unbound listener for it.
    pub(crate) use_original_dst: bool,
    /// False for a listener that only takes handed-over connections.
    pub(crate) bind_to_port: bool,
}

pub(crate) struct ListenerStats {
    pub(crate) downstream_cx_total: Arc<Counter>,
    pub(crate) downstream_cx_active: Arc<Gauge>,
    pub(crate) no_filter_chain_match: Arc<Counter>,
    pub(crate) downstream_listener_filter_error: Arc<Counter>,
}

/// A listener at run time. Survives reloads while its name and address stay the same.
pub(crate) struct ListenerRt {
    pub(crate) name: String,
    /// The address the config asked for (port 0 allowed).
    pub(crate) requested: SocketAddr,
    /// The address actually bound.
    pub(crate) bound: SocketAddr,
    pub(crate) cfg: ArcSwap<ListenerCfg>,
    pub(crate) stats: ListenerStats,
    stop: watch::Sender<bool>,
    /// Connections watch the sender current when they were accepted; a changed listener swaps
    /// in a fresh one and drains the connections of the old.
    drain: ArcSwap<watch::Sender<bool>>,
}

impl ListenerRt {
    pub(crate) fn new(
        name: &str,
        requested: SocketAddr,
        bound: SocketAddr,
        cfg: ListenerCfg,
        stats: &Stats,
    ) -> ListenerRt {
        let s = Scope::tagged("listener", "envoy_listener_address", &bound.to_string());
        ListenerRt {
            name: name.to_string(),
            requested,
            bound,
            cfg: ArcSwap::from_pointee(cfg),
            stats: ListenerStats {
                downstream_cx_total: stats.counter(&s, "downstream_cx_total"),
                downstream_cx_active: stats.gauge(&s, "downstream_cx_active"),
                no_filter_chain_match: stats.counter(&s, "no_filter_chain_match"),
                downstream_listener_filter_error: stats.counter(&s, "downstream_listener_filter_error"),
            },
            stop: watch::channel(false).0,
            drain: ArcSwap::from_pointee(watch::channel(false).0),
        }
    }

    /// Stops accepting on every worker.
    pub(crate) fn stop_accepting(&self) {
        self.stop.send_replace(true);
    }

    /// Asks open connections to finish: HTTP/1 closes after the current request, HTTP/2 sends GOAWAY.
    pub(crate) fn drain_connections(&self) {
        self.drain.load().send_replace(true);
    }

    /// After a change to the listener: connections accepted under the old definition finish
    /// (as `drain_connections`), new ones are served by the new one, as Envoy drains a listener's
    /// old version. Route changes alone do not come here: open connections take new routes.
    pub(crate) fn drain_old_connections(&self) {
        let old = self.drain.swap(Arc::new(watch::channel(false).0));
        old.send_replace(true);
    }

    pub(crate) fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Binds `n` sockets to `addr` with SO_REUSEPORT, one per worker. Port 0 takes one ephemeral
/// port for all of them.
pub(crate) fn bind(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n.max(1) {
        let s = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&at.into())?;
        s.listen(4096)?;
        let l: std::net::TcpListener = s.into();
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Accepts connections on one worker until the listener stops.
pub(crate) async fn accept_loop(l: Arc<ListenerRt>, sock: std::net::TcpListener, shared: Arc<Shared>) {
    let listener = match TcpListener::from_std(sock) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(listener = %l.name, error = %e, "cannot register listener socket");
            return;
        }
    };
    let mut stop = l.stop.subscribe();
    if *stop.borrow() {
        return;
    }
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            r = listener.accept() => match r {
                Ok((stream, remote)) => {
                    tokio::spawn(on_connection(stream, remote, l.clone(), shared.clone()));
                }
                Err(e) => {
                    // Out of descriptors or memory: back off rather than spin.
                    tracing::warn!(listener = %l.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The destination a connection had before an iptables REDIRECT / TPROXY (`SO_ORIGINAL_DST`);
/// `None` when it was not redirected.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4().ok()?,
        SocketAddr::V6(_) => sock.original_dst_v6().ok()?,
    };
    addr.as_socket()
}

/// The listener that takes a connection whose original destination is `dst`: one without a
/// socket for exactly that address, else for its port on any address (Envoy's order).
fn handoff(shared: &Shared, from: &Arc<ListenerRt>, dst: SocketAddr) -> Option<Arc<ListenerRt>> {
    let unbound = shared.handoff.load();
    let any = SocketAddr::new(
        match dst {
            SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        },
        dst.port(),
    );
    unbound
        .get(&dst)
        .or_else(|| unbound.get(&any))
        .filter(|t| !Arc::ptr_eq(t, from))
        .cloned()
}

async fn on_connection(stream: TcpStream, remote: SocketAddr, l: Arc<ListenerRt>, shared: Arc<Shared>) {
    let _active = shared.connection_started();
    let mut local = stream.local_addr().unwrap_or(l.bound);
    let mut original = None;
    let mut l = l;
    if l.cfg.load().use_original_dst
        && let Some(dst) = original_dst(&stream)
    {
        original = Some(dst);
        local = dst;
        if let Some(target) = handoff(&shared, &l, dst) {
            l.stats.downstream_cx_total.inc();
            l = target;
        }
    }
    l.stats.downstream_cx_total.inc();
    l.stats.downstream_cx_active.inc();
    let _g = GaugeDown(&l.stats.downstream_cx_active);
    let cfg = l.cfg.load_full();
    let meta = if cfg.inspect {
        match peek_hello(&stream, cfg.inspect_timeout, cfg.inspect_http).await {
            Peeked::Meta(m) => m,
            Peeked::TimedOut if cfg.continue_on_timeout => ConnMeta::default(),
            Peeked::TimedOut | Peeked::Closed => {
                l.stats.downstream_listener_filter_error.inc();
                return;
            }
        }
    } else {
        ConnMeta::default()
    };
    let Some(chain) = select_chain(&cfg.chains, local.port(), remote.ip(), &meta) else {
        l.stats.no_filter_chain_match.inc();
        tracing::debug!(listener = %l.name, %remote, sni = ?meta.sni, "no filter chain matches; closing");
        return;
    };
    let id = shared.next_connection_id();
    tracing::trace!(listener = %l.name, chain = %chain.name, %remote, id, "connection");
    let (stream, tls) = match &chain.tls {
        None => (Stream::Plain(stream), None),
        Some(t) => match t.accept(stream, remote).await {
            Some((s, info)) => (s, Some(Arc::new(info))),
            None => return,
        },
    };
    let conn = Accepted {
        stream,
        tls,
        remote,
        local,
        original_dst: original,
        id,
    };
    match &chain.filter {
        ChainFilter::Tcp(t) => crate::tcp::proxy(conn, t.clone(), shared.log_sink()).await,
        ChainFilter::Http(h) => {
            crate::http::serve(conn, h.clone(), shared.log_sink(), l.drain.load().subscribe()).await
        }
        ChainFilter::Rpc(r) => crate::rpc::serve(conn, r.clone(), shared.clone(), l.drain.load().subscribe()).await,
    }
}

struct GaugeDown<'a>(&'a Gauge);
impl Drop for GaugeDown<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An accepted downstream connection, after TLS if the chain terminates it.
pub(crate) struct Accepted {
    pub(crate) stream: Stream,
    pub(crate) tls: Option<Arc<TlsInfo>>,
    pub(crate) remote: SocketAddr,
    pub(crate) local: SocketAddr,
    /// The destination before a REDIRECT, when the listener restored it (ORIGINAL_DST clusters
    /// connect there).
    pub(crate) original_dst: Option<SocketAddr>,
    pub(crate) id: u64,
}

/// What the first bytes said.
#[derive(Debug, Default)]
pub(crate) struct ConnMeta {
    pub(crate) tls: bool,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Vec<String>,
}

/// What peeking at the first bytes gave.
enum Peeked {
    Meta(ConnMeta),
    /// Nothing conclusive arrived in time (a server-first protocol, or a slow client).
    TimedOut,
    /// The peer closed or the socket failed.
    Closed,
}

/// Peeks at the first bytes without consuming them: a TLS ClientHello (SNI, ALPN), else an
/// HTTP/2 preface or HTTP/1 request line, which give the application protocol `h2c` or
/// `http/1.1` as Envoy's HTTP inspector does.
async fn peek_hello(stream: &TcpStream, timeout: Duration, http: bool) -> Peeked {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let mut last_len = usize::MAX;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Peeked::TimedOut,
            Ok(Err(_)) | Ok(Ok(0)) => return Peeked::Closed,
            Ok(Ok(n)) => n,
        };
        let more = match tls_inspect::inspect(&buf[..n]) {
            Inspect::NotTls if !http => return Peeked::Meta(ConnMeta::default()),
            Inspect::NotTls => match http_inspect(&buf[..n]) {
                Some(proto) => {
                    return Peeked::Meta(ConnMeta {
                        alpn: proto.map(|p| vec![p.to_string()]).unwrap_or_default(),
                        ..ConnMeta::default()
                    });
                }
                None => true,
            },
            Inspect::Tls(h) => {
                return Peeked::Meta(ConnMeta {
                    tls: true,
                    sni: h.server_name,
                    alpn: h.alpn,
                });
            }
            Inspect::NeedMore if n == buf.len() => {
                return Peeked::Meta(ConnMeta {
                    tls: true,
                    ..ConnMeta::default()
                });
            }
            Inspect::NeedMore => true,
        };
        if more {
            if n == buf.len() {
                return Peeked::Meta(ConnMeta::default());
            }
            // peek() returns at once while data is buffered; wait a little for the rest.
            if n == last_len {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last_len = n;
            if tokio::time::Instant::now() >= deadline {
                return Peeked::TimedOut;
            }
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Envoy's HTTP inspector on plaintext bytes: `Some(Some("h2c"))` for the HTTP/2 preface,
/// `Some(Some("http/1.1"))` (or `http/1.0`) for an HTTP/1 request line, `Some(None)` when the
/// bytes are neither, `None` when more bytes are needed to tell.
pub(crate) fn http_inspect(b: &[u8]) -> Option<Option<&'static str>> {
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Some(Some("h2c")) } else { None };
    }
    // METHOD SP request-target SP HTTP/1.x CRLF; the method is a token.
    let line_end = b.iter().position(|c| *c == b'\n');
    let line = match line_end {
        Some(i) => &b[..i],
        None if b.len() >= 8192 => return Some(None),
        None => {
            // Not finished yet: give up early if what is there cannot be an HTTP/1 request line.
            let method_len = b.iter().position(|c| *c == b' ').unwrap_or(b.len());
            let tokenish = b[..method_len]
                .iter()
                .all(|c| c.is_ascii_uppercase() || *c == b'-' || *c == b'_');
            return if tokenish && method_len <= 20 { None } else { Some(None) };
        }
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|c| *c == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(None);
    };
    let token = |c: &u8| c.is_ascii_uppercase() || *c == b'-' || *c == b'_';
    if method.is_empty() || !method.iter().all(token) || target.is_empty() {
        return Some(None);
    }
    match version {
        b"HTTP/1.1" => Some(Some("http/1.1")),
        b"HTTP/1.0" => Some(Some("http/1.0")),
        _ => Some(None),
    }
}

/// Envoy's filter chain selection: at each criterion in turn (destination port, server name,
/// transport protocol, application protocols, source address), keep only the chains with the most
/// specific match; an empty criterion matches anything but loses to a specific one.
pub(crate) fn select_chain<'a>(
    chains: &'a [ChainRt],
    dst_port: u16,
    src: IpAddr,
    meta: &ConnMeta,
) -> Option<&'a ChainRt> {
    let mut cands: Vec<&ChainRt> = chains.iter().collect();
    let transport = if meta.tls { "tls" } else { "raw_buffer" };
    narrow(&mut cands, |m| match m.destination_port {
        None => Some(0),
        Some(p) if p == dst_port => Some(1),
        Some(_) => None,
    });
    narrow(&mut cands, |m| {
        if m.server_names.is_empty() {
            return Some(0);
        }
        let sni = meta.sni.as_deref()?;
        m.server_names
            .iter()
            .filter_map(|n| {
                if n == sni {
                    Some(u32::MAX)
                } else {
                    n.strip_prefix('*')
                        .filter(|suffix| sni.len() > suffix.len() && sni.ends_with(suffix))
                        .map(|s| s.len() as u32)
                }
            })
            .max()
    });
    narrow(&mut cands, |m| match &m.transport_protocol {
        None => Some(0),
        Some(t) if t == transport => Some(1),
        Some(_) => None,
    });
    narrow(&mut cands, |m| {
        if m.application_protocols.is_empty() {
            Some(0)
        } else {
            m.application_protocols
                .iter()
                .any(|p| meta.alpn.contains(p))
                .then_some(1)
        }
    });
    narrow(&mut cands, |m| {
        if m.source_prefix_ranges.is_empty() {
            return Some(0);
        }
        m.source_prefix_ranges
            .iter()
            .filter(|c| c.contains(src))
            .map(|c| 1 + u32::from(c.len))
            .max()
    });
    cands.first().copied()
}

fn narrow(cands: &mut Vec<&ChainRt>, score: impl Fn(&FilterChainMatch) -> Option<u32>) {
    let best = cands.iter().filter_map(|c| score(&c.matcher)).max();
    match best {
        None => cands.clear(),
        Some(b) => cands.retain(|c| score(&c.matcher) == Some(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterRt;
    use tessera_model::{Cidr, TcpProxy};

    fn chain(name: &str, m: FilterChainMatch) -> ChainRt {
        let stats = Stats::default();
        let cfg = tessera_model::Config::from_yaml("clusters: [{name: c, endpoints: [127.0.0.1:1]}]", "t").unwrap();
        let cluster = Arc::new(ClusterRt::new(cfg.clusters[0].clone(), &stats, None, None));
        let t = TcpProxy {
            stat_prefix: name.into(),
            cluster: "c".into(),
            idle_timeout: Duration::ZERO,
            access_log: vec![],
        };
        ChainRt {
            name: name.into(),
            matcher: m,
            tls: None,
            filter: ChainFilter::Tcp(Arc::new(TcpProxyRt::new(t, cluster, &stats))),
        }
    }

    fn pick(chains: &[ChainRt], port: u16, src: &str, tls: bool, sni: Option<&str>, alpn: &[&str]) -> Option<String> {
        let meta = ConnMeta {
            tls,
            sni: sni.map(str::to_string),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
        };
        select_chain(chains, port, src.parse().unwrap(), &meta).map(|c| c.name.clone())
    }

    #[test]
    fn most_specific_chain_wins_at_each_step() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let chains = vec![
            chain("default", FilterChainMatch::default()),
            chain(
                "port",
                FilterChainMatch {
                    destination_port: Some(443),
                    ..Default::default()
                },
            ),
            chain(
                "exact_sni",
                FilterChainMatch {
                    destination_port: Some(443),
                    server_names: names(&["api.example.com"]),
                    ..Default::default()
                },
            ),
            chain(
                "wild_sni",
                FilterChainMatch {
                    destination_port: Some(443),
                    server_names: names(&["*.example.com"]),
                    ..Default::default()
                },
            ),
            chain(
                "h2",
                FilterChainMatch {
                    destination_port: Some(8443),
                    application_protocols: names(&["h2"]),
                    ..Default::default()
                },
            ),
            chain(
                "tls",
                FilterChainMatch {
                    destination_port: Some(8443),
                    transport_protocol: Some("tls".into()),
                    ..Default::default()
                },
            ),
            chain(
                "internal",
                FilterChainMatch {
                    destination_port: Some(80),
                    source_prefix_ranges: vec![Cidr::parse("10.0.0.0/8").unwrap()],
                    ..Default::default()
                },
            ),
            chain(
                "internal_narrow",
                FilterChainMatch {
                    destination_port: Some(80),
                    source_prefix_ranges: vec![Cidr::parse("10.1.0.0/16").unwrap()],
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(
            pick(&chains, 9999, "1.2.3.4", false, None, &[]).as_deref(),
            Some("default")
        );
        assert_eq!(
            pick(&chains, 443, "1.2.3.4", true, Some("api.example.com"), &[]).as_deref(),
            Some("exact_sni")
        );
        assert_eq!(
            pick(&chains, 443, "1.2.3.4", true, Some("www.example.com"), &[]).as_deref(),
            Some("wild_sni")
        );
        assert_eq!(
            pick(&chains, 443, "1.2.3.4", true, Some("other.org"), &[]).as_deref(),
            Some("port")
        );
        assert_eq!(pick(&chains, 443, "1.2.3.4", false, None, &[]).as_deref(), Some("port"));
        assert_eq!(
            pick(&chains, 8443, "1.2.3.4", true, None, &["h2"]).as_deref(),
            Some("tls"),
            "transport is decided before ALPN"
        );
        assert_eq!(
            pick(&chains, 8443, "1.2.3.4", false, None, &[]).as_deref(),
            None,
            "specific port matched, nothing under it fits"
        );
        assert_eq!(
            pick(&chains, 80, "10.1.2.3", false, None, &[]).as_deref(),
            Some("internal_narrow")
        );
        assert_eq!(
            pick(&chains, 80, "10.9.2.3", false, None, &[]).as_deref(),
            Some("internal")
        );
        assert_eq!(pick(&chains, 80, "192.168.0.1", false, None, &[]), None);
    }
}

#[cfg(test)]
mod inspect_tests {
    use super::http_inspect;

    #[test]
    fn http_inspector_tells_h2c_http1_and_other_bytes() {
        assert_eq!(http_inspect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"), Some(Some("h2c")));
        assert_eq!(
            http_inspect(b"PRI * HTTP/2"),
            None,
            "a partial preface needs more bytes"
        );
        assert_eq!(http_inspect(b"GET / HTTP/1.1\r\nHost: a\r\n"), Some(Some("http/1.1")));
        assert_eq!(http_inspect(b"POST /x?y HTTP/1.0\r\n"), Some(Some("http/1.0")));
        assert_eq!(http_inspect(b"GET / HT"), None);
        assert_eq!(http_inspect(b"GET / SIP/2.0\r\n"), Some(None));
        assert_eq!(http_inspect(b"\x16\x03\x01"), Some(None), "binary is not HTTP");
        assert_eq!(http_inspect(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(None));
        assert_eq!(http_inspect(b"*1\r\n$4\r\nPING\r\n"), Some(None), "redis protocol");
        assert_eq!(http_inspect(b"plain text"), Some(None), "methods are upper case");
    }
}

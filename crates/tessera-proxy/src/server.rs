//! The running proxy: workers, listeners, clusters and the admin API, and how a configuration is
//! applied to them (at start and on every reload) and how they drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use tessera_model::{Config, DiscoveryType, NetworkFilter};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::access_log::LogSink;
use crate::cluster::{ClusterRt, spawn_control};
use crate::http::HttpChainRt;
use crate::listener::{self, ChainFilter, ChainRt, ListenerCfg, ListenerRt};
use crate::router::RouteTable;
use crate::stats::{Counter, Gauge, Scope, Stats};
use crate::tcp::TcpProxyRt;
use crate::tls::secrets::SecretRt;
use crate::tls::{ClientTls, SecretSet, ServerTls, SslStats};
use crate::worker::{self, Cmd, Worker};

/// Envoy's server states, as `/ready` and `server.state` report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    /// Serving.
    Live = 0,
    /// Draining: failing health checks or shutting down.
    Draining = 1,
    /// Starting.
    PreInitializing = 2,
}

impl ServerState {
    fn from_u8(v: u8) -> ServerState {
        match v {
            0 => ServerState::Live,
            1 => ServerState::Draining,
            _ => ServerState::PreInitializing,
        }
    }

    /// Envoy's name for the state.
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Live => "LIVE",
            ServerState::Draining => "DRAINING",
            ServerState::PreInitializing => "PRE_INITIALIZING",
        }
    }
}

/// Why the proxy could not start or take a configuration.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address.
    #[error("listener `{listener}`: cannot bind {addr}: {source}{hint}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The admin API could not bind its address.
    #[error("admin API: cannot bind {addr}: {source}")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread or the log writer could not start.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The configuration refers to something that does not exist (a bug if validation passed).
    #[error("configuration: {0}")]
    Compile(String),
    /// A certificate, key or trust bundle could not be loaded.
    #[error("{0}")]
    Secret(#[from] crate::tls::SecretError),
    /// A TLS context could not be built from its secrets and parameters.
    #[error("{0}")]
    Tls(String),
    /// The Report pipeline (`telemetry:`) could not start.
    #[error("{0}")]
    Telemetry(String),
}

/// How to run the proxy.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads; each has its own event loop and listener sockets.
    pub concurrency: usize,
    /// Admin address overriding the config's.
    pub admin: Option<SocketAddr>,
    /// How often certificate and trust-bundle files are read again for rotation (zero: never).
    pub secret_refresh: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            admin: None,
            secret_refresh: Duration::from_secs(1),
        }
    }
}

pub(crate) struct ServerStats {
    pub(crate) live: Arc<Gauge>,
    pub(crate) state: Arc<Gauge>,
    pub(crate) concurrency: Arc<Gauge>,
    pub(crate) total_connections: Arc<Gauge>,
    pub(crate) uptime: Arc<Gauge>,
    pub(crate) config_reload_success: Arc<Counter>,
    pub(crate) config_reload_failure: Arc<Counter>,
}

/// State that workers and the admin API read; written only by the control side.
/// Computes the xDS part of `/config_dump` on demand (Envoy's `configs` list).
pub type ConfigDumpProvider = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

pub(crate) struct Shared {
    pub(crate) stats: Stats,
    pub(crate) server_stats: ServerStats,
    pub(crate) config: ArcSwap<Config>,
    pub(crate) config_version: AtomicU64,
    pub(crate) config_loaded_at: ArcSwap<SystemTime>,
    /// The xDS section of `/config_dump`, when a control plane drives the sidecar.
    pub(crate) xds_dump: ArcSwapOption<ConfigDumpProvider>,
    pub(crate) clusters: ArcSwap<Vec<Arc<ClusterRt>>>,
    pub(crate) listeners: ArcSwap<Vec<Arc<ListenerRt>>>,
    /// Listeners without a socket, by the address they stand for: where a `use_original_dst`
    /// listener hands a redirected connection (one lookup per connection).
    pub(crate) handoff: ArcSwap<HashMap<SocketAddr, Arc<ListenerRt>>>,
    /// Every loaded certificate and trust bundle (for `/certs` and the file watcher).
    pub(crate) secrets: ArcSwap<Vec<Arc<SecretRt>>>,
    state: AtomicU8,
    healthcheck_failed: AtomicBool,
    pub(crate) quit: Notify,
    active: AtomicUsize,
    conn_ids: AtomicU64,
    sink: ArcSwapOption<LogSink>,
    /// Report (`telemetry:`), when configured; fixed at start.
    pub(crate) report: Option<Arc<crate::report::Report>>,
    pub(crate) concurrency: usize,
    pub(crate) started: std::time::Instant,
}

impl Shared {
    pub(crate) fn state(&self) -> ServerState {
        let s = ServerState::from_u8(self.state.load(Ordering::Relaxed));
        if s == ServerState::Live && self.healthcheck_failed.load(Ordering::Relaxed) {
            ServerState::Draining
        } else {
            s
        }
    }

    fn set_state(&self, s: ServerState) {
        self.state.store(s as u8, Ordering::Relaxed);
        self.refresh_state_gauges();
    }

    pub(crate) fn set_healthcheck_failed(&self, failed: bool) {
        self.healthcheck_failed.store(failed, Ordering::Relaxed);
        self.refresh_state_gauges();
    }

    fn refresh_state_gauges(&self) {
        let s = self.state();
        self.server_stats.state.set(s as i64);
        self.server_stats.live.set(i64::from(s == ServerState::Live));
    }

    /// Counts an open downstream connection until the guard drops.
    pub(crate) fn connection_started(self: &Arc<Self>) -> ActiveConn {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.server_stats.total_connections.inc();
        ActiveConn(self.clone())
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn log_sink(&self) -> Option<LogSink> {
        self.sink.load().as_deref().cloned()
    }

    /// Stops accepting everywhere and asks connections to finish (`/drain_listeners`).
    pub(crate) fn drain_listeners(&self) {
        for l in self.listeners.load().iter() {
            l.stop_accepting();
            l.drain_connections();
        }
    }
}

pub(crate) struct ActiveConn(Arc<Shared>);

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.server_stats.total_connections.dec();
    }
}

struct Control {
    /// The node the clusters were built for (a locality change rebuilds them).
    node: tessera_model::Node,
    workers: Vec<Worker>,
    listeners: HashMap<String, Arc<ListenerRt>>,
    clusters: HashMap<String, Arc<ClusterRt>>,
    route_cells: HashMap<(String, String), Arc<ArcSwap<RouteTable>>>,
    /// RPC chains by (listener, chain): open connections route new requests by the new one.
    rpc_cells: HashMap<(String, String), Arc<ArcSwap<crate::rpc::RpcChainRt>>>,
    /// Each listener's definition without its routes: a change drains its old connections.
    listener_ids: HashMap<String, String>,
    secrets: SecretSet,
    log_thread: Option<std::thread::JoinHandle<()>>,
}

/// A listener's definition minus its HTTP and RPC route tables (those change under open
/// connections without draining them), as text to compare.
fn listener_identity(l: &tessera_model::Listener) -> String {
    let mut l = l.clone();
    for c in &mut l.filter_chains {
        match &mut c.filter {
            NetworkFilter::Http(h) => {
                let r = &mut h.route_config;
                r.virtual_hosts.clear();
                r.request_headers_to_add.clear();
                r.request_headers_to_remove.clear();
                r.response_headers_to_add.clear();
                r.response_headers_to_remove.clear();
            }
            // RPC routes, too, reach open connections through their cell.
            NetworkFilter::Rpc(r) => r.routes.clear(),
            NetworkFilter::TcpProxy(_) => {}
        }
    }
    serde_json::to_string(&l).unwrap_or_default()
}

/// A running proxy.
pub struct Server {
    shared: Arc<Shared>,
    control: Mutex<Control>,
    admin_addr: Option<SocketAddr>,
    admin_task: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts workers, applies `cfg` and opens the admin API. Call from inside a tokio runtime:
    /// the admin API, DNS refresh and other control work run on it, never on a worker.
    pub async fn start(cfg: Config, opts: Options) -> Result<Server, StartError> {
        let stats = Stats::default();
        let server_scope = Scope::plain("server");
        let server_stats = ServerStats {
            live: stats.gauge(&server_scope, "live"),
            state: stats.gauge(&server_scope, "state"),
            concurrency: stats.gauge(&server_scope, "concurrency"),
            total_connections: stats.gauge(&server_scope, "total_connections"),
            uptime: stats.gauge(&server_scope, "uptime"),
            config_reload_success: stats.counter(&server_scope, "config_reload_success"),
            config_reload_failure: stats.counter(&server_scope, "config_reload_failure"),
        };
        let report = match &cfg.telemetry {
            Some(t) => Some(crate::report::Report::start(t).map_err(StartError::Telemetry)?.0),
            None => None,
        };
        let log_scope = Scope::plain("access_log");
        let (sink, log_thread) = LogSink::start(
            stats.counter(&log_scope, "dropped"),
            stats.counter(&log_scope, "written"),
            report.clone(),
        )
        .map_err(StartError::Thread)?;
        let concurrency = opts.concurrency.max(1);
        server_stats.concurrency.set(concurrency as i64);
        let shared = Arc::new(Shared {
            stats,
            server_stats,
            config: ArcSwap::from_pointee(cfg.clone()),
            config_version: AtomicU64::new(0),
            config_loaded_at: ArcSwap::from_pointee(SystemTime::now()),
            xds_dump: ArcSwapOption::empty(),
            clusters: ArcSwap::from_pointee(Vec::new()),
            listeners: ArcSwap::from_pointee(Vec::new()),
            handoff: ArcSwap::from_pointee(HashMap::new()),
            secrets: ArcSwap::from_pointee(Vec::new()),
            state: AtomicU8::new(ServerState::PreInitializing as u8),
            healthcheck_failed: AtomicBool::new(false),
            quit: Notify::new(),
            active: AtomicUsize::new(0),
            conn_ids: AtomicU64::new(1),
            sink: ArcSwapOption::from_pointee(sink),
            report,
            concurrency,
            started: std::time::Instant::now(),
        });
        shared.refresh_state_gauges();
        let mut workers = Vec::with_capacity(concurrency);
        for i in 0..concurrency {
            workers.push(worker::spawn(i, shared.clone()).map_err(StartError::Thread)?);
        }
        let admin_addr = opts.admin.or(cfg.admin.as_ref().map(|a| a.address));
        let (admin_task, admin_bound) = match admin_addr {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Admin { addr, source })?;
                let bound = l.local_addr().map_err(|source| StartError::Admin { addr, source })?;
                (Some(crate::admin::spawn(l, shared.clone())), Some(bound))
            }
            None => (None, None),
        };
        let server = Server {
            shared: shared.clone(),
            control: Mutex::new(Control {
                node: tessera_model::Node::default(),
                workers,
                listeners: HashMap::new(),
                clusters: HashMap::new(),
                route_cells: HashMap::new(),
                rpc_cells: HashMap::new(),
                listener_ids: HashMap::new(),
                secrets: SecretSet::default(),
                log_thread: Some(log_thread),
            }),
            admin_addr: admin_bound,
            admin_task,
        };
        server.apply(cfg).await?;
        shared.set_state(ServerState::Live);
        if !opts.secret_refresh.is_zero() {
            spawn_secret_watch(&shared, opts.secret_refresh);
        }
        let uptime = shared.clone();
        tokio::spawn(async move {
            loop {
                uptime
                    .server_stats
                    .uptime
                    .set(uptime.started.elapsed().as_secs() as i64);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(server)
    }

    /// Applies a new configuration. New connections and streams use it; open connections finish
    /// on the old one. On error nothing changes.
    pub async fn reload(&self, cfg: Config) -> Result<(), StartError> {
        let r = self.apply(cfg).await;
        match &r {
            Ok(()) => self.shared.server_stats.config_reload_success.inc(),
            Err(_) => self.shared.server_stats.config_reload_failure.inc(),
        }
        r
    }

    async fn apply(&self, cfg: Config) -> Result<(), StartError> {
        let shared = &self.shared;
        let stats = &shared.stats;
        let mut ctl = self.control.lock().await;
        let now = serde_json::to_string(&cfg.telemetry).unwrap_or_default();
        let running = serde_json::to_string(&shared.report.as_ref().map(|r| r.config())).unwrap_or_default();
        if now != running {
            tracing::warn!("the `telemetry` block changed; it takes effect when the sidecar restarts");
        }

        // Phase 1: build everything and bind new sockets; nothing visible changes yet.
        // Certificates first (file reads, so on a blocking thread); unchanged ones are kept.
        let old_secrets = std::mem::take(&mut ctl.secrets);
        let (cfg_copy, sh) = (cfg.clone(), shared.clone());
        let joined = tokio::task::spawn_blocking(move || {
            let r = SecretSet::build(&cfg_copy, &old_secrets, &sh.stats);
            (old_secrets, r)
        })
        .await
        .map_err(|e| StartError::Tls(format!("loading certificates: {e}")))?;
        ctl.secrets = joined.0;
        let secrets = joined.1?;
        let node = cfg.node.locality.as_ref();
        let mut clusters: HashMap<String, Arc<ClusterRt>> = HashMap::new();
        let mut checking = Vec::new();
        for c in &cfg.clusters {
            let same_tls = |old: &ClusterRt| match (&old.tls, &c.tls) {
                (None, None) => true,
                (Some(o), Some(n)) => o.uses(&secrets, &n.common),
                _ => false,
            };
            let rt = match ctl.clusters.get(&c.name) {
                Some(old) if old.cfg == *c && ctl.node == cfg.node && same_tls(old) => old.clone(),
                // An EDS cluster whose endpoints alone changed keeps its runtime (pools, counters).
                Some(old)
                    if c.discovery == DiscoveryType::Eds
                        && old.cfg.same_but_endpoints(c)
                        && ctl.node == cfg.node
                        && same_tls(old) =>
                {
                    old.set_endpoints(&c.endpoints);
                    old.clone()
                }
                old => {
                    let tls = match &c.tls {
                        Some(t) => {
                            let scope = Scope::tagged("cluster", "envoy_cluster_name", &c.name);
                            let ssl = Arc::new(SslStats::new(stats, &scope));
                            let ct = ClientTls::new(t.clone(), secrets.deps_for(&t.common), ssl)
                                .map_err(|e| StartError::Tls(format!("cluster `{}`: tls: {e}", c.name)))?;
                            Some(Arc::new(ct))
                        }
                        None => None,
                    };
                    // Pooled connections belong to hosts; with another transport they must not carry over.
                    let old = old.filter(|o| o.cfg.tls == c.tls);
                    let rt = Arc::new(ClusterRt::new(c.clone(), stats, old.map(|o| o.as_ref()), node).with_tls(tls));
                    if c.discovery == DiscoveryType::StrictDns {
                        rt.resolve().await;
                    }
                    spawn_control(&rt);
                    if !c.health_checks.is_empty() {
                        checking.push(rt.clone());
                    }
                    rt
                }
            };
            clusters.insert(c.name.clone(), rt);
        }
        // Like Envoy's cluster warming: give new health-checked clusters their first round (bounded
        // by the checks' timeouts) before traffic reaches them.
        for c in checking {
            let limit =
                c.cfg.health_checks.iter().map(|h| h.timeout).max().unwrap_or_default() + Duration::from_millis(200);
            let deadline = tokio::time::Instant::now() + limit;
            let rounds = c.cfg.health_checks.len() as u64;
            while c.hc_rounds.load(Ordering::Acquire) < rounds && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let our_addrs: Vec<SocketAddr> = ctl.listeners.values().map(|l| l.bound).collect();
        let mut route_cells = HashMap::new();
        let mut tables_to_store = Vec::new();
        let mut rpc_cells = HashMap::new();
        let mut rpc_to_store = Vec::new();
        let mut pending = Vec::new();
        for l in &cfg.listeners {
            let existing = ctl
                .listeners
                .get(&l.name)
                .filter(|o| o.requested == l.address && !o.is_stopped() && o.cfg.load().bind_to_port == l.bind_to_port)
                .cloned();
            let sockets = match existing {
                Some(_) => None,
                // Takes connections handed over by a `use_original_dst` listener only.
                None if !l.bind_to_port => None,
                None => {
                    let bind_err = |source: std::io::Error, hint| StartError::Bind {
                        listener: l.name.clone(),
                        addr: l.address,
                        source,
                        hint,
                    };
                    // SO_REUSEPORT would let us share a port with another process without a word;
                    // make sure nobody else holds it first.
                    if l.address.port() != 0 && !our_addrs.contains(&l.address) {
                        std::net::TcpListener::bind(l.address)
                            .map_err(|e| bind_err(e, " (is another process, or another Tessera, using it?)"))?;
                    }
                    Some(listener::bind(l.address, ctl.workers.len()).map_err(|e| bind_err(e, ""))?)
                }
            };
            let bound = match (&existing, &sockets) {
                (Some(e), _) => e.bound,
                (None, Some(socks)) => socks.first().and_then(|s| s.local_addr().ok()).unwrap_or(l.address),
                (None, None) => l.address,
            };
            let listener_scope = Scope::tagged("listener", "envoy_listener_address", &bound.to_string());
            let mut chains = Vec::with_capacity(l.filter_chains.len());
            for ch in &l.filter_chains {
                let tls = match &ch.tls {
                    Some(t) => {
                        let ssl = Arc::new(SslStats::new(stats, &listener_scope));
                        let st = ServerTls::new(t.clone(), secrets.deps_for(&t.common), ssl).map_err(|e| {
                            StartError::Tls(format!("listener `{}` filter chain `{}`: tls: {e}", l.name, ch.name))
                        })?;
                        Some(Arc::new(st))
                    }
                    None => None,
                };
                let filter = match &ch.filter {
                    NetworkFilter::TcpProxy(t) => {
                        let cluster = clusters
                            .get(&t.cluster)
                            .ok_or_else(|| StartError::Compile(format!("unknown cluster `{}`", t.cluster)))?;
                        ChainFilter::Tcp(Arc::new(TcpProxyRt::new(t.clone(), cluster.clone(), stats)))
                    }
                    NetworkFilter::Http(h) => {
                        let table = RouteTable::compile(&h.route_config, &clusters).map_err(StartError::Compile)?;
                        let key = (l.name.clone(), ch.name.clone());
                        let cell = match ctl.route_cells.get(&key) {
                            Some(cell) => {
                                tables_to_store.push((cell.clone(), table));
                                cell.clone()
                            }
                            None => Arc::new(ArcSwap::from_pointee(table)),
                        };
                        route_cells.insert(key, cell.clone());
                        let rt = HttpChainRt::new((**h).clone(), cell, stats).map_err(|e| {
                            StartError::Compile(format!("listener `{}` filter chain `{}`: {e}", l.name, ch.name))
                        })?;
                        ChainFilter::Http(Arc::new(rt))
                    }
                    NetworkFilter::Rpc(r) => {
                        let rt = crate::rpc::RpcChainRt::new((**r).clone(), &clusters, stats)
                            .map_err(StartError::Compile)?;
                        let key = (l.name.clone(), ch.name.clone());
                        let cell = match ctl.rpc_cells.get(&key) {
                            Some(cell) => {
                                rpc_to_store.push((cell.clone(), rt));
                                cell.clone()
                            }
                            None => Arc::new(ArcSwap::from_pointee(rt)),
                        };
                        rpc_cells.insert(key, cell.clone());
                        ChainFilter::Rpc(cell)
                    }
                };
                chains.push(ChainRt {
                    name: ch.name.clone(),
                    matcher: ch.filter_chain_match.clone(),
                    tls,
                    filter,
                });
            }
            let lcfg = ListenerCfg {
                chains,
                inspect: l.needs_inspection(),
                inspect_http: l.filter_chains.iter().any(|c| {
                    c.filter_chain_match
                        .application_protocols
                        .iter()
                        .any(|p| matches!(p.as_str(), "http/1.1" | "http/1.0" | "h2c"))
                }),
                inspect_timeout: l.listener_filters_timeout,
                continue_on_timeout: l.continue_on_listener_filters_timeout,
                use_original_dst: l.use_original_dst,
                bind_to_port: l.bind_to_port,
            };
            pending.push((l.name.clone(), l.address, lcfg, existing, sockets));
        }

        let identities: HashMap<String, String> = cfg
            .listeners
            .iter()
            .map(|l| (l.name.clone(), listener_identity(l)))
            .collect();

        // Phase 2: commit.
        for (cell, table) in tables_to_store {
            cell.store(Arc::new(table));
        }
        for (cell, rt) in rpc_to_store {
            cell.store(Arc::new(rt));
        }
        let mut listeners = HashMap::new();
        for (name, requested, lcfg, existing, sockets) in pending {
            match (existing, sockets) {
                (Some(l), _) => {
                    l.cfg.store(Arc::new(lcfg));
                    if ctl.listener_ids.get(&name) != identities.get(&name) {
                        tracing::info!(listener = %name, "listener changed; draining the connections it had");
                        l.drain_old_connections();
                    }
                    listeners.insert(name, l);
                }
                (None, Some(socks)) => {
                    let bound = socks.first().and_then(|s| s.local_addr().ok()).unwrap_or(requested);
                    let l = Arc::new(ListenerRt::new(&name, requested, bound, lcfg, stats));
                    for (w, s) in ctl.workers.iter().zip(socks) {
                        let _ = w.tx.send(Cmd::Listen(l.clone(), s));
                    }
                    tracing::info!(listener = %name, address = %bound, "listening");
                    listeners.insert(name, l);
                }
                (None, None) => {
                    let l = Arc::new(ListenerRt::new(&name, requested, requested, lcfg, stats));
                    tracing::info!(listener = %name, address = %requested, "listening (handed over by original destination, no socket)");
                    listeners.insert(name, l);
                }
            }
        }
        for (name, old) in ctl.listeners.drain() {
            if !listeners.get(&name).is_some_and(|n| Arc::ptr_eq(n, &old)) {
                tracing::info!(listener = %name, address = %old.bound, "listener removed; draining its connections");
                old.stop_accepting();
                old.drain_connections();
            }
        }
        let mut lview: Vec<Arc<ListenerRt>> = listeners.values().cloned().collect();
        lview.sort_by(|a, b| a.name.cmp(&b.name));
        let cview: Vec<Arc<ClusterRt>> = cfg
            .clusters
            .iter()
            .filter_map(|c| clusters.get(&c.name).cloned())
            .collect();
        ctl.listeners = listeners;
        ctl.clusters = clusters;
        ctl.route_cells = route_cells;
        ctl.rpc_cells = rpc_cells;
        ctl.listener_ids = identities;
        ctl.node = cfg.node.clone();
        shared.secrets.store(Arc::new(secrets.all()));
        ctl.secrets = secrets;
        let handoff: HashMap<SocketAddr, Arc<ListenerRt>> = lview
            .iter()
            .filter(|l| !l.cfg.load().bind_to_port)
            .map(|l| (l.requested, l.clone()))
            .collect();
        shared.handoff.store(Arc::new(handoff));
        shared.listeners.store(Arc::new(lview));
        shared.clusters.store(Arc::new(cview));
        shared.config.store(Arc::new(cfg));
        shared.config_version.fetch_add(1, Ordering::Relaxed);
        shared.config_loaded_at.store(Arc::new(SystemTime::now()));
        Ok(())
    }

    /// Replaces the endpoints of the EDS cluster `cluster` without touching anything else: its
    /// hosts whose endpoint persists keep their pools, health and counters. Nothing else is rebuilt.
    pub async fn set_endpoints(&self, cluster: &str, endpoints: &[tessera_model::Endpoint]) -> Result<(), String> {
        let ctl = self.control.lock().await;
        let rt = ctl
            .clusters
            .get(cluster)
            .ok_or_else(|| format!("no cluster `{cluster}`"))?;
        if rt.cfg.discovery != DiscoveryType::Eds {
            return Err(format!("cluster `{cluster}` does not take its endpoints from EDS"));
        }
        rt.set_endpoints(endpoints);
        Ok(())
    }

    /// Adds a section to `/config_dump`: `provider` is called for each request (the xDS client's
    /// resources with their versions, computed only when asked for).
    pub fn set_config_dump(&self, provider: ConfigDumpProvider) {
        self.shared.xds_dump.store(Some(Arc::new(provider)));
    }

    /// The bound address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .listeners
            .load()
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.bound)
    }

    /// The bound admin address, if the admin API is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The current state.
    pub fn state(&self) -> ServerState {
        self.shared.state()
    }

    /// A stat's value by its text name (`cluster.backend.upstream_rq_total`).
    pub fn stat(&self, name: &str) -> Option<i128> {
        self.shared.stats.value(name)
    }

    /// The configuration in effect.
    pub fn config(&self) -> Arc<Config> {
        self.shared.config.load_full()
    }

    /// Resolves when `/quitquitquit` is called.
    pub async fn quit_requested(&self) {
        self.shared.quit.notified().await;
    }

    /// Open downstream connections.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain_time`, then stops the
    /// workers and flushes the access logs.
    pub async fn shutdown(mut self, drain_time: Duration) {
        let shared = self.shared.clone();
        shared.set_state(ServerState::Draining);
        shared.drain_listeners();
        let deadline = tokio::time::Instant::now() + drain_time;
        while shared.active.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = shared.active.load(Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain time over; closing the connections still open"
            );
        }
        let mut ctl = self.control.lock().await;
        let threads: Vec<_> = ctl
            .workers
            .iter_mut()
            .filter_map(|w| {
                let _ = w.tx.send(Cmd::Exit);
                w.thread.take()
            })
            .collect();
        shared.sink.store(None);
        let log_thread = ctl.log_thread.take();
        drop(ctl);
        let report = shared.report.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            if let Some(t) = log_thread {
                let _ = t.join();
            }
            // After the log thread, which feeds it: export what is queued, then stop.
            if let Some(r) = report {
                r.shutdown();
            }
        })
        .await;
        if let Some(t) = self.admin_task.take() {
            t.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Without an orderly shutdown, at least stop the threads we started.
        if let Ok(ctl) = self.control.try_lock() {
            for w in &ctl.workers {
                let _ = w.tx.send(Cmd::Exit);
            }
        }
        self.shared.sink.store(None);
        if let Some(t) = self.admin_task.take() {
            t.abort();
        }
    }
}

/// Reads certificate and trust-bundle files again every `every`, on a blocking thread, and swaps
/// in what changed; TLS contexts pick the new material up on their next handshake.
fn spawn_secret_watch(shared: &Arc<Shared>, every: Duration) {
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(shared) = weak.upgrade() else { return };
            let all = shared.secrets.load_full();
            drop(shared);
            if all.is_empty() {
                continue;
            }
            let _ = tokio::task::spawn_blocking(move || {
                for s in all.iter() {
                    let _ = s.refresh();
                }
            })
            .await;
        }
    });
}

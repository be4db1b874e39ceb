//! Upstream clusters: hosts, their health, and the snapshot the workers pick from.
//!
//! Everything that changes which host a request may get — membership (DNS), active health checks,
//! outlier ejections, slow start, localities, subsets — is folded into an immutable [`Snapshot`] by
//! the control thread and swapped in atomically. A worker's pick is one `ArcSwap` load and a
//! picker call: no lock, no allocation. A worker that ejects a host sets an atomic flag, which the
//! next pick already honours, and asks the control thread for a new snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tessera_model::{self as model, Locality, SubsetFallback};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lb::{self, LbContext, Picker};
use crate::stats::{Counter, Gauge, Scope, Stats};
use crate::util::rand_below;

static NEXT_HOST_ID: AtomicU64 = AtomicU64::new(1);

/// Failing active health checks.
pub(crate) const FAILED_ACTIVE_HC: u8 = 1;
/// Ejected by outlier detection.
pub(crate) const FAILED_OUTLIER: u8 = 2;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process's epoch, on tokio's clock (so paused-clock tests work).
/// Never 0: 0 marks "no time" in the atomics that store these.
pub(crate) fn now_ms() -> u64 {
    Instant::now().duration_since(epoch()).as_millis() as u64 + 1
}

/// One upstream endpoint.
pub(crate) struct Host {
    /// Unique for the life of the process; keys the per-worker connection pools.
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    /// The DNS name the address came from, for `auto_host_rewrite`.
    pub(crate) hostname: Option<HeaderValue>,
    pub(crate) weight: u32,
    pub(crate) priority: u32,
    pub(crate) locality: Option<Locality>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) stats: HostStats,
    /// `FAILED_ACTIVE_HC | FAILED_OUTLIER`; zero is healthy.
    pub(crate) health: AtomicU8,
    /// When the host joined or last became healthy (ms, [`now_ms`]), for slow start.
    pub(crate) warm_since_ms: AtomicU64,
    pub(crate) outlier: OutlierState,
    /// One bit per configured active health check that is failing.
    pub(crate) hc_failing: AtomicU32,
}

impl Host {
    pub(crate) fn new(addr: SocketAddr, ep: &model::Endpoint, hostname: Option<&str>) -> Host {
        Host {
            id: NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            hostname: hostname.and_then(|n| HeaderValue::from_str(n).ok()),
            weight: ep.weight.max(1),
            priority: ep.priority,
            locality: ep.locality.clone(),
            labels: ep.labels.clone(),
            stats: HostStats::default(),
            health: AtomicU8::new(0),
            warm_since_ms: AtomicU64::new(0),
            outlier: OutlierState::default(),
            hc_failing: AtomicU32::new(0),
        }
    }

    /// True when no health check or outlier detector has taken it out.
    #[inline]
    pub(crate) fn available(&self) -> bool {
        self.health.load(Ordering::Relaxed) == 0
    }

    /// Envoy's `health_flags` text for `/clusters`.
    pub(crate) fn health_text(&self) -> String {
        let h = self.health.load(Ordering::Relaxed);
        if h == 0 {
            return "healthy".into();
        }
        let mut s = String::new();
        if h & FAILED_ACTIVE_HC != 0 {
            s.push_str("/failed_active_hc");
        }
        if h & FAILED_OUTLIER != 0 {
            s.push_str("/failed_outlier_check");
        }
        s
    }

    fn same_endpoint(&self, addr: SocketAddr, ep: &model::Endpoint) -> bool {
        self.addr == addr
            && self.weight == ep.weight.max(1)
            && self.priority == ep.priority
            && self.locality == ep.locality
            && self.labels == ep.labels
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Per-host counters, shown at `/clusters`.
#[derive(Default)]
pub(crate) struct HostStats {
    pub(crate) cx_total: AtomicU64,
    pub(crate) cx_active: AtomicI64,
    pub(crate) cx_connect_fail: AtomicU64,
    pub(crate) rq_total: AtomicU64,
    pub(crate) rq_active: AtomicI64,
    pub(crate) rq_success: AtomicU64,
    pub(crate) rq_error: AtomicU64,
    pub(crate) rq_timeout: AtomicU64,
}

/// Outlier-detection bookkeeping of one host, updated by workers with atomics.
#[derive(Default)]
pub(crate) struct OutlierState {
    pub(crate) consecutive_5xx: AtomicU32,
    pub(crate) consecutive_gateway: AtomicU32,
    pub(crate) consecutive_local: AtomicU32,
    pub(crate) success: AtomicU64,
    pub(crate) total: AtomicU64,
    /// When it was ejected ([`now_ms`]); 0 when it is not.
    pub(crate) ejected_at_ms: AtomicU64,
    /// Times ejected, decayed while it behaves; multiplies the ejection time.
    pub(crate) ejections: AtomicU32,
}

// ---------------------------------------------------------------- snapshots

/// The hosts of one effective priority, ready for picking.
pub(crate) struct Level {
    pub(crate) hosts: Vec<Arc<Host>>,
    picker: Box<dyn Picker>,
    /// Too few healthy hosts: balance over all of them (Envoy's panic mode).
    pub(crate) panic: bool,
}

/// Hosts grouped by effective priority, and the share of traffic each priority takes.
pub(crate) struct PrioritySet {
    pub(crate) levels: Vec<Level>,
    /// Percent per level; sums to 100.
    pub(crate) load: Vec<u32>,
}

impl PrioritySet {
    /// `None` when `hosts` is empty.
    fn build(hosts: &[Arc<Host>], cfg: &model::Cluster, node: Option<&Locality>, now: u64) -> Option<PrioritySet> {
        if hosts.is_empty() {
            return None;
        }
        // Istio's locality failover: nearer localities form earlier priorities within each
        // configured priority.
        let effective = |h: &Host| -> u32 {
            let proximity = match (cfg.locality_lb, node) {
                (true, Some(me)) => h.locality.as_ref().map_or(3, |l| me.proximity(l)),
                _ => 0,
            };
            h.priority * 4 + proximity
        };
        let mut prios: Vec<u32> = hosts.iter().map(|h| effective(h)).collect();
        prios.sort_unstable();
        prios.dedup();
        let groups: Vec<Vec<Arc<Host>>> = prios
            .iter()
            .map(|p| hosts.iter().filter(|h| effective(h) == *p).cloned().collect())
            .collect();
        let weights: Vec<(u64, u64)> = groups
            .iter()
            .map(|g| {
                let total: u64 = g.iter().map(|h| u64::from(h.weight)).sum();
                let healthy: u64 = g.iter().filter(|h| h.available()).map(|h| u64::from(h.weight)).sum();
                (healthy, total)
            })
            .collect();
        let load = lb::priority_load(&weights, cfg.overprovisioning_factor);
        let total_health: u64 = weights
            .iter()
            .map(|(h, t)| {
                if *t == 0 {
                    0
                } else {
                    (h * u64::from(cfg.overprovisioning_factor) / t).min(100)
                }
            })
            .sum::<u64>()
            .min(100);
        let levels = groups
            .into_iter()
            .zip(weights)
            .map(|(group, (healthy, total))| {
                // Envoy: a priority panics only when the cluster as a whole is short of health.
                let healthy_pct = if total == 0 {
                    0.0
                } else {
                    healthy as f64 * 100.0 / total as f64
                };
                let panic = total_health < 100 && healthy_pct < cfg.healthy_panic_threshold;
                let chosen: Vec<Arc<Host>> = if panic {
                    group
                } else {
                    group.into_iter().filter(|h| h.available()).collect()
                };
                let w: Vec<u32> = chosen.iter().map(|h| effective_weight(h, cfg, now)).collect();
                Level {
                    picker: lb::picker(&cfg.lb_policy, &chosen, &w),
                    hosts: chosen,
                    panic,
                }
            })
            .collect();
        Some(PrioritySet { levels, load })
    }

    fn level(&self, ctx: &LbContext) -> Option<&Level> {
        if self.levels.len() == 1 {
            return self.levels.first();
        }
        // Hashing requests choose the priority by their key too, so they stay sticky.
        let mut r = match ctx.hash {
            Some(h) => (h % 100) as u32,
            None => rand_below(100) as u32,
        };
        for (i, share) in self.load.iter().enumerate() {
            if r < *share {
                return self.levels.get(i);
            }
            r -= share;
        }
        self.levels.iter().find(|l| !l.hosts.is_empty())
    }
}

/// A host's weight in the picker: configured weight ×100, scaled down during slow start.
fn effective_weight(h: &Host, cfg: &model::Cluster, now: u64) -> u32 {
    let base = h.weight * 100;
    let Some(ss) = &cfg.slow_start else { return base };
    let since = h.warm_since_ms.load(Ordering::Relaxed);
    if since == 0 {
        return base;
    }
    let elapsed = Duration::from_millis(now.saturating_sub(since));
    let f = lb::slow_start_factor(elapsed, ss.window, ss.aggression, ss.min_weight_percent);
    ((f64::from(base) * f) as u32).max(1)
}

/// What the workers pick from.
pub(crate) struct Snapshot {
    /// Every member, healthy or not.
    pub(crate) hosts: Vec<Arc<Host>>,
    main: Option<PrioritySet>,
    /// By subset index (see [`ClusterRt::register_subset`]); `None` for an empty subset.
    subsets: Vec<Option<PrioritySet>>,
    default_subset: Option<PrioritySet>,
}

/// What a pick needs from the request.
#[derive(Default)]
pub(crate) struct PickContext<'a> {
    pub(crate) hash: Option<u64>,
    pub(crate) avoid: &'a [u64],
    pub(crate) subset: Option<usize>,
    /// Picks tried to find a host that is available and not in `avoid`.
    pub(crate) max_attempts: u32,
    /// The downstream connection's destination before a REDIRECT (ORIGINAL_DST clusters).
    pub(crate) original_dst: Option<SocketAddr>,
}

// ---------------------------------------------------------------- stats

/// Envoy's per-cluster stats.
pub(crate) struct ClusterStats {
    pub(crate) upstream_cx_total: Arc<Counter>,
    pub(crate) upstream_cx_active: Arc<Gauge>,
    pub(crate) upstream_cx_connect_fail: Arc<Counter>,
    pub(crate) upstream_cx_connect_timeout: Arc<Counter>,
    pub(crate) upstream_cx_none_healthy: Arc<Counter>,
    pub(crate) upstream_cx_overflow: Arc<Counter>,
    pub(crate) upstream_cx_rx_bytes_total: Arc<Counter>,
    pub(crate) upstream_cx_tx_bytes_total: Arc<Counter>,
    pub(crate) upstream_rq_total: Arc<Counter>,
    pub(crate) upstream_rq_active: Arc<Gauge>,
    pub(crate) upstream_rq_pending_active: Arc<Gauge>,
    pub(crate) upstream_rq_pending_overflow: Arc<Counter>,
    pub(crate) upstream_rq_completed: Arc<Counter>,
    pub(crate) upstream_rq_xx: [Arc<Counter>; 5],
    pub(crate) upstream_rq_timeout: Arc<Counter>,
    pub(crate) upstream_rq_per_try_timeout: Arc<Counter>,
    pub(crate) upstream_rq_rx_reset: Arc<Counter>,
    /// Requests the proxy reset upstream because the client went away.
    pub(crate) upstream_rq_tx_reset: Arc<Counter>,
    pub(crate) upstream_rq_max_duration_reached: Arc<Counter>,
    pub(crate) upstream_rq_retry: Arc<Counter>,
    pub(crate) upstream_rq_retry_success: Arc<Counter>,
    pub(crate) upstream_rq_retry_overflow: Arc<Counter>,
    pub(crate) upstream_rq_retry_limit_exceeded: Arc<Counter>,
    pub(crate) upstream_rq_retry_active: Arc<Gauge>,
    pub(crate) membership_total: Arc<Gauge>,
    pub(crate) membership_healthy: Arc<Gauge>,
    pub(crate) update_success: Arc<Counter>,
    pub(crate) update_failure: Arc<Counter>,
    pub(crate) health_check_attempt: Arc<Counter>,
    pub(crate) health_check_success: Arc<Counter>,
    pub(crate) health_check_failure: Arc<Counter>,
    pub(crate) outlier_ejections_active: Arc<Gauge>,
    pub(crate) outlier_ejections_enforced_total: Arc<Counter>,
    pub(crate) outlier_ejections_overflow: Arc<Counter>,
    pub(crate) outlier_ejections_enforced: [Arc<Counter>; 4],
    pub(crate) outlier_ejections_detected: [Arc<Counter>; 4],
}

/// Outlier detectors, indexing `outlier_ejections_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detector {
    Consecutive5xx = 0,
    ConsecutiveGateway = 1,
    ConsecutiveLocalOrigin = 2,
    SuccessRate = 3,
}

impl ClusterStats {
    fn new(stats: &Stats, name: &str) -> ClusterStats {
        let s = Scope::tagged("cluster", "envoy_cluster_name", name);
        let c = |n: &str| stats.counter(&s, n);
        let g = |n: &str| stats.gauge(&s, n);
        let det = |prefix: &str| {
            [
                "consecutive_5xx",
                "consecutive_gateway_failure",
                "consecutive_local_origin_failure",
                "success_rate",
            ]
            .map(|d| c(&format!("outlier_detection.{prefix}_{d}")))
        };
        ClusterStats {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: g("upstream_cx_active"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_rq_pending_active: g("upstream_rq_pending_active"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_rq_completed: c("upstream_rq_completed"),
            upstream_rq_xx: [
                c("upstream_rq_1xx"),
                c("upstream_rq_2xx"),
                c("upstream_rq_3xx"),
                c("upstream_rq_4xx"),
                c("upstream_rq_5xx"),
            ],
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_per_try_timeout: c("upstream_rq_per_try_timeout"),
            upstream_rq_rx_reset: c("upstream_rq_rx_reset"),
            upstream_rq_tx_reset: c("upstream_rq_tx_reset"),
            upstream_rq_max_duration_reached: c("upstream_rq_max_duration_reached"),
            upstream_rq_retry: c("upstream_rq_retry"),
            upstream_rq_retry_success: c("upstream_rq_retry_success"),
            upstream_rq_retry_overflow: c("upstream_rq_retry_overflow"),
            upstream_rq_retry_limit_exceeded: c("upstream_rq_retry_limit_exceeded"),
            upstream_rq_retry_active: g("upstream_rq_retry_active"),
            membership_total: g("membership_total"),
            membership_healthy: g("membership_healthy"),
            update_success: c("update_success"),
            update_failure: c("update_failure"),
            health_check_attempt: c("health_check.attempt"),
            health_check_success: c("health_check.success"),
            health_check_failure: c("health_check.failure"),
            outlier_ejections_active: g("outlier_detection.ejections_active"),
            outlier_ejections_enforced_total: c("outlier_detection.ejections_enforced_total"),
            outlier_ejections_overflow: c("outlier_detection.ejections_overflow"),
            outlier_ejections_enforced: det("ejections_enforced"),
            outlier_ejections_detected: det("ejections_detected"),
        }
    }

    /// Counts a response status in its class.
    pub(crate) fn status(&self, code: u16) {
        if let Some(c) = self.upstream_rq_xx.get(usize::from(code / 100).wrapping_sub(1)) {
            c.inc();
        }
        self.upstream_rq_completed.inc();
    }
}

// ---------------------------------------------------------------- the cluster

/// A cluster at run time.
pub(crate) struct ClusterRt {
    pub(crate) cfg: model::Cluster,
    node_locality: Option<Locality>,
    snapshot: ArcSwap<Snapshot>,
    /// Label sets routes asked for, by index; only the control side touches it.
    subsets: Mutex<Vec<BTreeMap<String, String>>>,
    /// Serialises snapshot rebuilds (control side only).
    rebuilding: Mutex<()>,
    pub(crate) stats: ClusterStats,
    /// Outlier ejections in force.
    pub(crate) ejected: AtomicU32,
    /// Retries in flight, for the retry circuit breaker.
    pub(crate) retries_active: AtomicI64,
    /// Workers ask the control thread for a new snapshot through this.
    pub(crate) changed: Arc<Notify>,
    /// Health-check rounds completed (all checks together).
    pub(crate) hc_rounds: AtomicU64,
    /// TLS origination, when the cluster has a `tls` block.
    pub(crate) tls: Option<Arc<crate::tls::ClientTls>>,
    /// ORIGINAL_DST clusters: a host per destination seen.
    original_hosts: Mutex<HashMap<SocketAddr, Arc<Host>>>,
}

/// Destinations an ORIGINAL_DST cluster remembers before starting afresh.
const ORIGINAL_DST_HOSTS: usize = 4096;

impl Drop for ClusterRt {
    fn drop(&mut self) {
        // Lets the control task notice the cluster is gone and end.
        self.changed.notify_one();
    }
}

impl ClusterRt {
    /// A cluster for `cfg`, taking over hosts from `previous` where endpoints persist so their
    /// pooled connections and counters carry over.
    pub(crate) fn new(
        cfg: model::Cluster,
        stats: &Stats,
        previous: Option<&ClusterRt>,
        node: Option<&Locality>,
    ) -> ClusterRt {
        let rt = ClusterRt {
            stats: ClusterStats::new(stats, &cfg.name),
            snapshot: ArcSwap::from_pointee(Snapshot {
                hosts: Vec::new(),
                main: None,
                subsets: Vec::new(),
                default_subset: None,
            }),
            node_locality: node.cloned(),
            subsets: Mutex::new(Vec::new()),
            rebuilding: Mutex::new(()),
            ejected: AtomicU32::new(0),
            retries_active: AtomicI64::new(0),
            changed: Arc::new(Notify::new()),
            hc_rounds: AtomicU64::new(0),
            tls: None,
            original_hosts: Mutex::new(HashMap::new()),
            cfg,
        };
        if let Some(prev) = previous {
            let hosts = prev.snapshot.load().hosts.clone();
            rt.snapshot.store(Arc::new(Snapshot {
                hosts,
                main: None,
                subsets: Vec::new(),
                default_subset: None,
            }));
        }
        if matches!(
            rt.cfg.discovery,
            model::DiscoveryType::Static | model::DiscoveryType::Eds
        ) {
            rt.set_endpoints(&rt.cfg.endpoints);
        } else {
            rt.rebuild();
        }
        rt
    }

    /// Sets the TLS context connections to the endpoints use.
    pub(crate) fn with_tls(mut self, tls: Option<Arc<crate::tls::ClientTls>>) -> ClusterRt {
        self.tls = tls;
        self
    }

    pub(crate) fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Registers a label set a route selects; its index goes into [`PickContext::subset`].
    pub(crate) fn register_subset(&self, labels: &BTreeMap<String, String>) -> usize {
        let mut s = self.subsets.lock().unwrap_or_else(|p| p.into_inner());
        let i = match s.iter().position(|l| l == labels) {
            Some(i) => i,
            None => {
                s.push(labels.clone());
                s.len() - 1
            }
        };
        drop(s);
        self.rebuild();
        i
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Every member host.
    pub(crate) fn hosts(&self) -> Vec<Arc<Host>> {
        self.snapshot.load().hosts.clone()
    }

    /// Picks a host for one request: `None` when none may serve it.
    pub(crate) fn pick(&self, ctx: &PickContext<'_>) -> Option<Arc<Host>> {
        if self.cfg.discovery == model::DiscoveryType::OriginalDst {
            return self.original_dst_host(ctx.original_dst);
        }
        let snap = self.snapshot.load();
        let set = match ctx.subset {
            None => snap.main.as_ref(),
            Some(i) => match snap.subsets.get(i) {
                Some(Some(s)) => Some(s),
                _ => match self.cfg.lb_subset_config.fallback_policy {
                    SubsetFallback::NoFallback => None,
                    SubsetFallback::AnyEndpoint => snap.main.as_ref(),
                    SubsetFallback::DefaultSubset => snap.default_subset.as_ref(),
                },
            },
        };
        let picked = set.and_then(|set| {
            let mut last = None;
            let mut used = None;
            for attempt in 0..ctx.max_attempts.max(1) {
                let lc = LbContext {
                    hash: ctx.hash,
                    attempt,
                };
                let level = set.level(&lc)?;
                used = Some(level);
                let Some(i) = level.picker.pick(&level.hosts, &lc) else {
                    continue;
                };
                let h = &level.hosts[i];
                // A host ejected since the snapshot was built is skipped at once.
                if (level.panic || h.available()) && !ctx.avoid.contains(&h.id) {
                    return Some(h.clone());
                }
                if level.panic || h.available() {
                    last = Some(h.clone());
                }
            }
            // The picker kept landing on hosts to avoid: look through the level once for one that
            // is usable and untried (rare, bounded by the level's size). Not for consistent
            // hashing, whose order is the point.
            if let Some(level) = used.filter(|_| ctx.max_attempts > 1 && !self.cfg.lb_policy.is_hashing()) {
                let n = level.hosts.len();
                let start = rand_below(n.max(1) as u64) as usize;
                let found = (0..n)
                    .map(|k| &level.hosts[(start + k) % n])
                    .find(|h| (level.panic || h.available()) && !ctx.avoid.contains(&h.id));
                if let Some(h) = found {
                    return Some(h.clone());
                }
            }
            last
        });
        if picked.is_none() {
            self.stats.upstream_cx_none_healthy.inc();
        }
        picked
    }

    /// ORIGINAL_DST: the host is the connection's own destination, made on first use and kept
    /// (bounded) so its pooled connections are reused. The map's lock is taken only for these
    /// clusters, for a lookup; a connection without a restored destination gets no host (503 /
    /// closed), never a connection back to the proxy itself.
    fn original_dst_host(&self, dst: Option<SocketAddr>) -> Option<Arc<Host>> {
        let Some(dst) = dst else {
            self.stats.upstream_cx_none_healthy.inc();
            return None;
        };
        let mut hosts = self.original_hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hosts.get(&dst) {
            return Some(h.clone());
        }
        if hosts.len() >= ORIGINAL_DST_HOSTS {
            hosts.clear();
        }
        let h = Arc::new(Host::new(
            dst,
            &model::Endpoint::new(dst.ip().to_string(), dst.port()),
            None,
        ));
        hosts.insert(dst, h.clone());
        Some(h)
    }

    /// Replaces the members with IP endpoints (static and EDS clusters); names are skipped.
    pub(crate) fn set_endpoints(&self, endpoints: &[model::Endpoint]) {
        let resolved = endpoints
            .iter()
            .filter_map(|e| Some((SocketAddr::new(e.host.parse().ok()?, e.port), e.clone(), None)))
            .collect();
        self.set_hosts(resolved);
    }

    /// Replaces the members, keeping `Host` objects whose endpoint is unchanged.
    pub(crate) fn set_hosts(&self, resolved: Vec<(SocketAddr, model::Endpoint, Option<String>)>) {
        let old = self.snapshot.load_full();
        let checks = self.cfg.health_checks.len().min(32) as u32;
        let initial_hc = if checks == 0 { 0 } else { FAILED_ACTIVE_HC };
        let initial_mask = if checks == 0 { 0 } else { u32::MAX >> (32 - checks) };
        let warm = if old.hosts.is_empty() { 0 } else { now_ms() };
        // By address, so a large EDS push is linear rather than quadratic.
        let mut by_addr: HashMap<SocketAddr, Vec<&Arc<Host>>> = HashMap::with_capacity(old.hosts.len());
        for h in &old.hosts {
            by_addr.entry(h.addr).or_default().push(h);
        }
        let hosts: Vec<Arc<Host>> = resolved
            .into_iter()
            .map(|(addr, ep, name)| {
                by_addr
                    .get(&addr)
                    .and_then(|hs| hs.iter().find(|h| h.same_endpoint(addr, &ep)))
                    .map(|h| Arc::clone(h))
                    .unwrap_or_else(|| {
                        let h = Host::new(addr, &ep, name.as_deref());
                        // With health checks, a new host waits for its first passing check (as Envoy).
                        h.health.store(initial_hc, Ordering::Relaxed);
                        h.hc_failing.store(initial_mask, Ordering::Relaxed);
                        // Slow start applies to hosts that join a running cluster.
                        h.warm_since_ms.store(warm, Ordering::Relaxed);
                        Arc::new(h)
                    })
            })
            .collect();
        let same = hosts.len() == old.hosts.len() && hosts.iter().zip(old.hosts.iter()).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            let kept: std::collections::HashSet<*const Host> = hosts.iter().map(Arc::as_ptr).collect();
            let gone = old.hosts.iter().filter(|h| !kept.contains(&Arc::as_ptr(h)));
            for h in gone {
                if h.outlier.ejected_at_ms.swap(0, Ordering::Relaxed) != 0 {
                    self.ejected.fetch_sub(1, Ordering::Relaxed);
                    self.stats.outlier_ejections_active.dec();
                }
            }
            self.stats.membership_total.set(hosts.len() as i64);
            // Straight to the complete snapshot: a half-built one (hosts without their priority
            // set) would leave a worker picking in between with no host, answering 503.
            self.rebuild_with(hosts);
        } else {
            self.rebuild();
        }
    }

    /// Builds a new snapshot from the members' current state. Control side only.
    pub(crate) fn rebuild(&self) {
        let _serial = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        let hosts = self.snapshot.load().hosts.clone();
        self.publish(hosts);
    }

    /// Builds and publishes the snapshot of new members. Control side only.
    fn rebuild_with(&self, hosts: Vec<Arc<Host>>) {
        let _serial = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        self.publish(hosts);
    }

    /// The snapshot of `hosts` as they are now; the caller holds `rebuilding`.
    fn publish(&self, hosts: Vec<Arc<Host>>) {
        let now = now_ms();
        let node = self.node_locality.as_ref();
        let subsets: Vec<BTreeMap<String, String>> = self.subsets.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let select = |labels: &BTreeMap<String, String>| -> Vec<Arc<Host>> {
            hosts.iter().filter(|h| h.matches(labels)).cloned().collect()
        };
        let snap = Snapshot {
            main: PrioritySet::build(&hosts, &self.cfg, node, now),
            subsets: subsets
                .iter()
                .map(|l| PrioritySet::build(&select(l), &self.cfg, node, now))
                .collect(),
            default_subset: if self.cfg.lb_subset_config.fallback_policy == SubsetFallback::DefaultSubset {
                PrioritySet::build(&select(&self.cfg.lb_subset_config.default_subset), &self.cfg, node, now)
            } else {
                None
            },
            hosts,
        };
        self.stats
            .membership_healthy
            .set(snap.hosts.iter().filter(|h| h.available()).count() as i64);
        self.snapshot.store(Arc::new(snap));
    }

    /// True while any host is inside its slow-start window (the snapshot needs refreshing).
    fn warming(&self) -> bool {
        let Some(ss) = &self.cfg.slow_start else { return false };
        let now = now_ms();
        let window = ss.window.as_millis() as u64;
        self.snapshot.load().hosts.iter().any(|h| {
            let since = h.warm_since_ms.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) < window
        })
    }

    /// Resolves every strict_dns endpoint now. A name that fails to resolve keeps its previous
    /// addresses (Envoy does the same), so a DNS outage does not empty the cluster.
    pub(crate) async fn resolve(&self) {
        let mut out: Vec<(SocketAddr, model::Endpoint, Option<String>)> = Vec::new();
        let mut failed = false;
        let old = self.snapshot.load_full();
        for ep in &self.cfg.endpoints {
            let lookup = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((ep.host.as_str(), ep.port)),
            )
            .await;
            match lookup {
                Ok(Ok(addrs)) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    // Prefer IPv4 when a name has both, as Envoy's V4_PREFERRED does.
                    let v4: Vec<SocketAddr> = addrs.iter().copied().filter(SocketAddr::is_ipv4).collect();
                    let chosen = if v4.is_empty() { addrs } else { v4 };
                    for a in chosen {
                        if !out.iter().any(|(x, _, _)| *x == a) {
                            out.push((a, ep.clone(), Some(ep.host.clone())));
                        }
                    }
                }
                Ok(Err(e)) => {
                    failed = true;
                    tracing::warn!(cluster = %self.cfg.name, host = %ep.host, error = %e, "DNS resolution failed; keeping previous addresses");
                    keep_previous(&old.hosts, ep, &mut out);
                }
                Err(_) => {
                    failed = true;
                    tracing::warn!(cluster = %self.cfg.name, host = %ep.host, "DNS resolution timed out after 5s; keeping previous addresses");
                    keep_previous(&old.hosts, ep, &mut out);
                }
            }
        }
        if failed {
            self.stats.update_failure.inc();
        } else {
            self.stats.update_success.inc();
        }
        self.set_hosts(out);
    }
}

fn keep_previous(
    old: &[Arc<Host>],
    ep: &model::Endpoint,
    out: &mut Vec<(SocketAddr, model::Endpoint, Option<String>)>,
) {
    for h in old {
        if h.addr.port() == ep.port && h.hostname.as_ref().is_some_and(|n| n.as_bytes() == ep.host.as_bytes()) {
            out.push((h.addr, ep.clone(), Some(ep.host.clone())));
        }
    }
}

/// The control thread's work for one cluster, until the cluster is dropped: DNS refresh, snapshot
/// rebuilds when workers report changes, slow-start ticks, outlier-detection sweeps, health checks.
pub(crate) fn spawn_control(cluster: &Arc<ClusterRt>) {
    let weak: Weak<ClusterRt> = Arc::downgrade(cluster);
    let cfg = &cluster.cfg;
    let dns = (cfg.discovery == model::DiscoveryType::StrictDns).then_some(cfg.dns_refresh_rate);
    let sweep = cfg.outlier_detection.as_ref().map(|o| o.interval);
    if !cfg.health_checks.is_empty() {
        crate::health::spawn(cluster);
    }
    let changed = cluster.changed.clone();
    tokio::spawn(async move {
        let far = Duration::from_secs(3600);
        let mut next_dns = Instant::now() + dns.unwrap_or(far);
        let mut next_sweep = Instant::now() + sweep.unwrap_or(far);
        loop {
            let warming = match weak.upgrade() {
                Some(c) => c.warming(),
                None => return,
            };
            let tick = Instant::now() + if warming { Duration::from_secs(1) } else { far };
            let wake = next_dns.min(next_sweep).min(tick);
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            let Some(c) = weak.upgrade() else { return };
            let now = Instant::now();
            if now >= next_dns {
                next_dns = now + dns.unwrap_or(far);
                if dns.is_some() {
                    c.resolve().await;
                    continue;
                }
            }
            if now >= next_sweep {
                next_sweep = now + sweep.unwrap_or(far);
                crate::outlier::sweep(&c);
            }
            c.rebuild();
        }
    });
}

#[cfg(test)]
pub(crate) mod tests;

//! Upstream clusters: a host set swapped atomically, a load balancer, stats, DNS refresh.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tessera_model as model;

use crate::stats::{Counter, Gauge, Scope, Stats};
use crate::util::rand_below;

static NEXT_HOST_ID: AtomicU64 = AtomicU64::new(1);

/// One upstream endpoint.
pub(crate) struct Host {
    /// Unique for the life of the process; keys the per-worker connection pools.
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    /// The DNS name the address came from, for `auto_host_rewrite`.
    pub(crate) hostname: Option<HeaderValue>,
    pub(crate) weight: u32,
    pub(crate) stats: HostStats,
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

/// A cluster's endpoints at one moment, with a precomputed round-robin schedule.
pub(crate) struct HostSet {
    pub(crate) hosts: Vec<Arc<Host>>,
    /// Smooth weighted round robin order (nginx's algorithm), one entry per unit of weight.
    schedule: Vec<u32>,
}

impl HostSet {
    fn new(hosts: Vec<Arc<Host>>) -> HostSet {
        let schedule = smooth_wrr(&hosts.iter().map(|h| h.weight).collect::<Vec<_>>());
        HostSet { hosts, schedule }
    }
}

/// The smooth weighted round-robin sequence for `weights`: each host appears `weight` times, spread out.
fn smooth_wrr(weights: &[u32]) -> Vec<u32> {
    if weights.iter().all(|w| *w == weights[0]) {
        return (0..weights.len() as u32).collect();
    }
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

/// Chooses a host. Implementations must be cheap and lock-free: `pick` runs once per request.
pub(crate) trait LoadBalancer: Send + Sync {
    fn pick(&self, set: &HostSet) -> Option<Arc<Host>>;
}

/// Weighted round robin over the host set's schedule, shared by all workers through one atomic.
#[derive(Default)]
pub(crate) struct RoundRobin {
    next: AtomicUsize,
}

impl LoadBalancer for RoundRobin {
    fn pick(&self, set: &HostSet) -> Option<Arc<Host>> {
        if set.schedule.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % set.schedule.len();
        set.hosts.get(set.schedule[i] as usize).cloned()
    }
}

/// Uniform random choice.
pub(crate) struct Random;

impl LoadBalancer for Random {
    fn pick(&self, set: &HostSet) -> Option<Arc<Host>> {
        if set.hosts.is_empty() {
            return None;
        }
        set.hosts.get(rand_below(set.hosts.len() as u64) as usize).cloned()
    }
}

/// Envoy's per-cluster stats.
pub(crate) struct ClusterStats {
    pub(crate) upstream_cx_total: Arc<Counter>,
    pub(crate) upstream_cx_active: Arc<Gauge>,
    pub(crate) upstream_cx_connect_fail: Arc<Counter>,
    pub(crate) upstream_cx_connect_timeout: Arc<Counter>,
    pub(crate) upstream_cx_none_healthy: Arc<Counter>,
    pub(crate) upstream_cx_rx_bytes_total: Arc<Counter>,
    pub(crate) upstream_cx_tx_bytes_total: Arc<Counter>,
    pub(crate) upstream_rq_total: Arc<Counter>,
    pub(crate) upstream_rq_active: Arc<Gauge>,
    pub(crate) upstream_rq_completed: Arc<Counter>,
    pub(crate) upstream_rq_xx: [Arc<Counter>; 5],
    pub(crate) upstream_rq_timeout: Arc<Counter>,
    pub(crate) upstream_rq_rx_reset: Arc<Counter>,
    /// Requests the proxy reset upstream because the client went away.
    pub(crate) upstream_rq_tx_reset: Arc<Counter>,
    pub(crate) membership_total: Arc<Gauge>,
    pub(crate) update_success: Arc<Counter>,
    pub(crate) update_failure: Arc<Counter>,
}

impl ClusterStats {
    fn new(stats: &Stats, name: &str) -> ClusterStats {
        let s = Scope::tagged("cluster", "envoy_cluster_name", name);
        let c = |n: &str| stats.counter(&s, n);
        ClusterStats {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: stats.gauge(&s, "upstream_cx_active"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_active: stats.gauge(&s, "upstream_rq_active"),
            upstream_rq_completed: c("upstream_rq_completed"),
            upstream_rq_xx: [
                c("upstream_rq_1xx"),
                c("upstream_rq_2xx"),
                c("upstream_rq_3xx"),
                c("upstream_rq_4xx"),
                c("upstream_rq_5xx"),
            ],
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_rx_reset: c("upstream_rq_rx_reset"),
            upstream_rq_tx_reset: c("upstream_rq_tx_reset"),
            membership_total: stats.gauge(&s, "membership_total"),
            update_success: c("update_success"),
            update_failure: c("update_failure"),
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

/// A cluster at run time.
pub(crate) struct ClusterRt {
    pub(crate) cfg: model::Cluster,
    hosts: ArcSwap<HostSet>,
    lb: Box<dyn LoadBalancer>,
    pub(crate) stats: ClusterStats,
}

impl ClusterRt {
    /// A cluster for `cfg`, taking over hosts from `previous` where addresses persist so their
    /// pooled connections and counters carry over.
    pub(crate) fn new(cfg: model::Cluster, stats: &Stats, previous: Option<&ClusterRt>) -> ClusterRt {
        let lb: Box<dyn LoadBalancer> = match cfg.lb_policy {
            model::LbPolicy::RoundRobin => Box::<RoundRobin>::default(),
            model::LbPolicy::Random => Box::new(Random),
        };
        let rt = ClusterRt {
            stats: ClusterStats::new(stats, &cfg.name),
            hosts: ArcSwap::from_pointee(HostSet::new(Vec::new())),
            lb,
            cfg,
        };
        if let Some(prev) = previous {
            rt.hosts.store(prev.hosts.load_full());
        }
        if rt.cfg.discovery == model::DiscoveryType::Static {
            let resolved = rt
                .cfg
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip = e.host.parse().ok()?;
                    Some((SocketAddr::new(ip, e.port), e.weight, None))
                })
                .collect();
            rt.set_hosts(resolved);
        }
        rt
    }

    pub(crate) fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Picks a host for one request; `None` when the cluster has none.
    #[inline]
    pub(crate) fn pick(&self) -> Option<Arc<Host>> {
        let set = self.hosts.load();
        let h = self.lb.pick(&set);
        if h.is_none() {
            self.stats.upstream_cx_none_healthy.inc();
        }
        h
    }

    pub(crate) fn host_set(&self) -> Arc<HostSet> {
        self.hosts.load_full()
    }

    /// Replaces the host set, keeping `Host` objects whose address and weight are unchanged.
    pub(crate) fn set_hosts(&self, resolved: Vec<(SocketAddr, u32, Option<String>)>) {
        let old = self.hosts.load();
        let hosts: Vec<Arc<Host>> = resolved
            .into_iter()
            .map(|(addr, weight, name)| {
                old.hosts
                    .iter()
                    .find(|h| h.addr == addr && h.weight == weight)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Host {
                            id: NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed),
                            addr,
                            hostname: name.and_then(|n| HeaderValue::from_str(&n).ok()),
                            weight,
                            stats: HostStats::default(),
                        })
                    })
            })
            .collect();
        let same = hosts.len() == old.hosts.len() && hosts.iter().zip(old.hosts.iter()).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            self.stats.membership_total.set(hosts.len() as i64);
            self.hosts.store(Arc::new(HostSet::new(hosts)));
        }
    }

    /// Resolves every strict_dns endpoint now. A name that fails to resolve keeps its previous
    /// addresses (Envoy does the same), so a DNS outage does not empty the cluster.
    pub(crate) async fn resolve(&self) {
        let mut out: Vec<(SocketAddr, u32, Option<String>)> = Vec::new();
        let mut failed = false;
        let old = self.hosts.load_full();
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
                            out.push((a, ep.weight, Some(ep.host.clone())));
                        }
                    }
                }
                Ok(Err(e)) => {
                    failed = true;
                    tracing::warn!(cluster = %self.cfg.name, host = %ep.host, error = %e, "DNS resolution failed; keeping previous addresses");
                    keep_previous(&old, ep, &mut out);
                }
                Err(_) => {
                    failed = true;
                    tracing::warn!(cluster = %self.cfg.name, host = %ep.host, "DNS resolution timed out after 5s; keeping previous addresses");
                    keep_previous(&old, ep, &mut out);
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

fn keep_previous(old: &HostSet, ep: &model::Endpoint, out: &mut Vec<(SocketAddr, u32, Option<String>)>) {
    for h in &old.hosts {
        if h.addr.port() == ep.port && h.hostname.as_ref().is_some_and(|n| n.as_bytes() == ep.host.as_bytes()) {
            out.push((h.addr, h.weight, Some(ep.host.clone())));
        }
    }
}

/// Re-resolves a strict_dns cluster every `dns_refresh_rate` until the cluster is dropped.
pub(crate) fn spawn_dns_refresh(cluster: &Arc<ClusterRt>) {
    let weak: Weak<ClusterRt> = Arc::downgrade(cluster);
    let every = cluster.cfg.dns_refresh_rate;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(c) = weak.upgrade() else { return };
            c.resolve().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(endpoints: &[(&str, u32)]) -> ClusterRt {
        let cfg = model::Cluster {
            name: "c".into(),
            discovery: model::DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            lb_policy: model::LbPolicy::RoundRobin,
            protocol: model::UpstreamProtocol::Http1,
            dns_refresh_rate: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            http2_max_concurrent_streams: 100,
            max_requests_per_connection: 0,
            endpoints: endpoints
                .iter()
                .map(|(a, w)| {
                    let (host, port) = model::split_host_port(a).unwrap();
                    model::Endpoint { host, port, weight: *w }
                })
                .collect(),
        };
        ClusterRt::new(cfg, &Stats::default(), None)
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let c = cluster(&[("10.0.0.1:80", 5), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let picks: Vec<u8> = (0..7)
            .map(|_| c.pick().unwrap().addr.ip().to_string().as_bytes()[7] - b'0')
            .collect();
        assert_eq!(picks, vec![1, 1, 2, 1, 3, 1, 1], "nginx's smooth WRR order");
        let mut counts = [0; 4];
        for _ in 0..700 {
            counts[usize::from(c.pick().unwrap().addr.ip().to_string().as_bytes()[7] - b'0')] += 1;
        }
        assert_eq!(counts[1..], [500, 100, 100]);
    }

    #[test]
    fn equal_weights_rotate() {
        let c = cluster(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let a = c.pick().unwrap().addr;
        let b = c.pick().unwrap().addr;
        assert_ne!(a, b);
        assert_eq!(c.pick().unwrap().addr, a);
    }

    #[test]
    fn empty_cluster_picks_nothing_and_counts_it() {
        let c = cluster(&[]);
        assert!(c.pick().is_none());
        assert_eq!(c.stats.upstream_cx_none_healthy.get(), 1);
    }

    #[test]
    fn set_hosts_keeps_unchanged_hosts() {
        let c = cluster(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let before = c.host_set();
        c.set_hosts(vec![
            ("10.0.0.2:80".parse().unwrap(), 1, None),
            ("10.0.0.9:80".parse().unwrap(), 1, None),
        ]);
        let after = c.host_set();
        assert!(Arc::ptr_eq(&before.hosts[1], &after.hosts[0]), "10.0.0.2 kept its Host");
        assert_ne!(after.hosts[1].id, before.hosts[0].id);
        assert_eq!(c.stats.membership_total.get(), 2);
    }

    #[tokio::test]
    async fn strict_dns_resolves_localhost_preferring_v4() {
        let mut c = cluster(&[]);
        c.cfg.discovery = model::DiscoveryType::StrictDns;
        c.cfg.endpoints = vec![model::Endpoint {
            host: "localhost".into(),
            port: 8080,
            weight: 1,
        }];
        c.resolve().await;
        let set = c.host_set();
        assert_eq!(set.hosts.len(), 1, "localhost resolves to one IPv4 address");
        assert_eq!(set.hosts[0].addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(set.hosts[0].hostname.as_ref().unwrap(), "localhost");
        // A name that does not resolve keeps the previous addresses.
        c.cfg.endpoints[0].host = "no-such-host.invalid".into();
        c.resolve().await;
        assert_eq!(c.stats.update_failure.get(), 1);
        assert_eq!(c.host_set().hosts.len(), 0, "different name, nothing to keep");
    }
}

//! Tessera's data-plane runtime: listeners and filter chains, the TCP proxy, the HTTP connection
//! manager, the router, upstream clusters and pools, access logs and the admin API.
//!
//! It turns a validated [`tessera_model::Config`] into running state and keeps it running:
//! N worker threads, each a single-threaded event loop owning its sockets; configuration
//! snapshots swapped atomically; the admin API, DNS and log writing off the workers.
//! It must not parse configuration files (the model does) or handle process signals (the binary does).

mod access_log;
mod admin;
mod body;
pub mod check_server;
mod cluster;
mod flags;
mod health;
mod http;
mod lb;
mod listener;
mod outlier;
mod policy;
mod pool;
mod ratelimit;
mod report;
mod retry;
mod router;
mod rpc;
mod server;
mod stats;
mod tcp;
mod tls;
mod tls_inspect;
mod util;
mod worker;

pub use body::RespBody;
pub use flags::ResponseFlags;
pub use server::{ConfigDumpProvider, Options, Server, ServerState, StartError};
pub use tls::{ControlPlaneTls, SecretError};

/// Loads every certificate, key and trust bundle `cfg` names, as the proxy would at start, and
/// returns every failure, each naming the configuration place and the file (for `tessera
/// check`). Reads files: call off the async runtime.
pub fn check_tls(cfg: &tessera_model::Config) -> Vec<String> {
    tls::check_all(cfg)
}

/// Hooks for tests, fuzz targets and benchmarks of this crate. Not part of the proxy's behaviour
/// and not a stable API.
#[doc(hidden)]
pub mod testing {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use http::{HeaderMap, Method};

    use crate::cluster::ClusterRt;
    use crate::router::{RequestView, RouteTable};
    use crate::stats::Stats;

    /// A TLS ClientHello record offering `sni` and `alpn`, as a client's first bytes.
    pub fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        crate::tls_inspect::build::client_hello(sni, alpn)
    }

    /// Envoy's tls_inspector on the first bytes of a connection: `Some((sni, alpn))` for a
    /// ClientHello, `None` for plaintext or too few bytes.
    pub fn inspect(first_bytes: &[u8]) -> Option<(Option<String>, Vec<String>)> {
        match crate::tls_inspect::inspect(first_bytes) {
            crate::tls_inspect::Inspect::Tls(h) => Some((h.server_name, h.alpn)),
            _ => None,
        }
    }

    /// The identity a peer certificate (DER) gives a connection: SPIFFE URI SAN, else DNS SAN,
    /// else subject; plus its SHA-256 fingerprint. What every mutual-TLS handshake computes.
    pub fn peer_identity(der: &[u8]) -> Option<(String, String)> {
        let info = crate::tls::x509::parse(der).ok()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Some((info.principal().to_string(), crate::tls::x509::hex(digest.as_ref())))
    }

    /// The clusters and route table of the first HTTP chain of `cfg`, compiled as the proxy does.
    pub struct Routes {
        table: RouteTable,
    }

    impl Routes {
        /// Compiles the first HTTP filter chain's routes.
        pub fn new(cfg: &tessera_model::Config) -> Result<Routes, String> {
            Ok(Routes {
                table: first_route_table(cfg)?,
            })
        }

        /// `(virtual host, route index)` for a request, as the router picks it.
        pub fn route(
            &self,
            host: &str,
            path: &str,
            query: Option<&str>,
            method: &Method,
            headers: &HeaderMap,
        ) -> Option<(String, usize)> {
            let view = RequestView {
                host,
                path,
                query,
                method,
                scheme: "http",
                headers,
            };
            let (vh, r) = self.table.route(&view)?;
            let idx = vh.routes.iter().position(|x| std::ptr::eq(x, r))?;
            Some((vh.name.clone(), idx))
        }
    }

    /// The route table of `cfg`'s first HTTP filter chain, compiled against its clusters.
    pub(crate) fn first_route_table(cfg: &tessera_model::Config) -> Result<RouteTable, String> {
        let stats = Stats::default();
        let clusters: HashMap<String, Arc<ClusterRt>> = cfg
            .clusters
            .iter()
            .map(|c| (c.name.clone(), Arc::new(ClusterRt::new(c.clone(), &stats, None, None))))
            .collect();
        let hcm = cfg
            .listeners
            .iter()
            .flat_map(|l| &l.filter_chains)
            .find_map(|c| match &c.filter {
                tessera_model::NetworkFilter::Http(h) => Some(h),
                _ => None,
            })
            .ok_or("no HTTP filter chain")?;
        RouteTable::compile(&hcm.route_config, &clusters)
    }

    /// The retry circuit breaker's check for a cluster with default thresholds.
    pub fn retry_breaker_allows(retries_active: i64, requests_active: i64) -> bool {
        crate::retry::breaker_allows(&tessera_model::Thresholds::default(), retries_active, requests_active)
    }

    /// Whether a `5xx,unavailable` policy retries a response, as the router decides per attempt.
    pub fn retry_decision(status: u16, grpc_status: Option<u32>) -> bool {
        static POLICY: std::sync::OnceLock<tessera_model::RetryPolicy> = std::sync::OnceLock::new();
        let p = POLICY.get_or_init(|| tessera_model::RetryPolicy {
            retry_on: tessera_model::RetryOn::parse("5xx,unavailable").unwrap_or_default(),
            num_retries: 2,
            per_try_timeout: std::time::Duration::ZERO,
            base_interval: std::time::Duration::from_millis(25),
            max_interval: std::time::Duration::from_millis(250),
            retriable_status_codes: Vec::new(),
            skip_previous_hosts: true,
            host_selection_retry_max_attempts: 3,
            retry_non_idempotent: false,
        });
        crate::retry::retry_response(p, status, grpc_status, true)
    }

    /// Removes hop-by-hop headers as the connection manager does.
    pub fn strip_hop_by_hop(h: &mut HeaderMap) {
        crate::http::strip_hop_by_hop(h, false);
    }

    /// A cluster's load balancer over `weights.len()` hosts.
    pub struct Picker(ClusterRt);

    impl Picker {
        /// `policy` (`round_robin`, `random`, `least_request`, `ring_hash`, `maglev`) over hosts
        /// 10.x.y.z:80 with the given weights.
        pub fn new(weights: &[u32], policy: &str) -> Picker {
            let eps: Vec<String> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    format!(
                        "{{ address: \"10.{}.{}.{}:80\", weight: {w} }}",
                        (i >> 16) & 255,
                        (i >> 8) & 255,
                        i & 255
                    )
                })
                .collect();
            let yaml = format!(
                "clusters: [{{ name: bench, lb_policy: {policy}, endpoints: [{}] }}]",
                eps.join(", ")
            );
            let cfg = tessera_model::Config::from_yaml(&yaml, "picker").unwrap_or_else(|e| panic!("{e}"));
            Picker(ClusterRt::new(cfg.clusters[0].clone(), &Stats::default(), None, None))
        }

        /// One pick, with an optional consistent-hash key.
        pub fn pick(&self, hash: Option<u64>) -> Option<SocketAddr> {
            self.0
                .pick(&crate::cluster::PickContext {
                    hash,
                    ..Default::default()
                })
                .map(|h| h.addr)
        }
    }
}

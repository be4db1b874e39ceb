//! The configuration model: plain Rust types in the shapes of Envoy's concepts.
//!
//! Everything here is already validated: regexes are compiled, cluster references resolve,
//! durations are durations. `Serialize` gives `/config_dump` its JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::decode::Cidr;
use crate::format::LogFormat;
use crate::tls::*;
use crate::traffic::*;

/// The whole configuration of one sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where this sidecar runs.
    pub node: Node,
    /// The admin API, if enabled.
    pub admin: Option<Admin>,
    /// How long SIGTERM waits for in-flight requests before exiting.
    #[serde(serialize_with = "ser_duration")]
    pub drain_time: Duration,
    /// Listeners, in file order.
    pub listeners: Vec<Listener>,
    /// Upstream clusters, in file order.
    pub clusters: Vec<Cluster>,
    /// Certificates and trust bundles by name, for TLS contexts to refer to.
    pub secrets: Vec<Secret>,
    /// Report: Istio metrics, statsd, access logs, exported off the request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<crate::telemetry::Telemetry>,
}

impl Config {
    /// The cluster called `name`.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// The admin API's listener.
#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    /// Where the admin API listens.
    pub address: SocketAddr,
}

/// A listening socket and the filter chains that handle its connections.
#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Bind address (port 0 picks an ephemeral port).
    pub address: SocketAddr,
    /// How long to wait for the first bytes when a chain matches on SNI, ALPN or transport.
    #[serde(serialize_with = "ser_duration")]
    pub listener_filters_timeout: Duration,
    /// On that timeout, pick a chain with what was seen so far instead of closing (Istio's
    /// protocol sniffing for server-first protocols).
    pub continue_on_listener_filters_timeout: bool,
    /// Take the connection's destination from before an iptables REDIRECT (`SO_ORIGINAL_DST`)
    /// and hand it to the listener bound, without a socket, to that address (Istio's
    /// `virtualOutbound` / `virtualInbound`; Envoy's `use_original_dst` and `original_dst` filter).
    pub use_original_dst: bool,
    /// Open a socket; a listener without one only takes connections handed over by a
    /// `use_original_dst` listener (Envoy's `bind_to_port: false`).
    pub bind_to_port: bool,
    /// Filter chains; the most specific match wins, as in Envoy.
    pub filter_chains: Vec<FilterChain>,
}

impl Listener {
    /// True when choosing a chain needs the first bytes: the TLS ClientHello (SNI, ALPN, transport
    /// protocol) or the HTTP request line (`http/1.1` / `h2c` application protocols).
    pub fn needs_inspection(&self) -> bool {
        self.filter_chains.iter().any(|c| {
            let m = &c.filter_chain_match;
            !m.server_names.is_empty() || m.transport_protocol.is_some() || !m.application_protocols.is_empty()
        })
    }
}

/// A filter chain: a match and the network filter that handles matching connections.
#[derive(Debug, Clone, Serialize)]
pub struct FilterChain {
    /// Name, unique within the listener (defaults to `chain<N>`).
    pub name: String,
    /// Which connections this chain takes.
    pub filter_chain_match: FilterChainMatch,
    /// TLS termination, if the chain terminates TLS.
    pub tls: Option<DownstreamTls>,
    /// What handles them.
    pub filter: NetworkFilter,
}

/// Criteria for choosing a filter chain; an empty criterion matches anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FilterChainMatch {
    /// The connection's destination port.
    pub destination_port: Option<u16>,
    /// SNI names, exact or `*.suffix`.
    pub server_names: Vec<String>,
    /// `tls` or `raw_buffer`.
    pub transport_protocol: Option<String>,
    /// ALPN protocols offered by the client.
    pub application_protocols: Vec<String>,
    /// Source address prefixes.
    #[serde(serialize_with = "ser_display_vec")]
    pub source_prefix_ranges: Vec<Cidr>,
}

/// The network filter of a chain: a closed set, so an enum.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkFilter {
    /// Plain TCP proxying.
    TcpProxy(TcpProxy),
    /// The HTTP connection manager.
    Http(Box<HttpConnectionManager>),
    /// The RPC connection manager (SOFA Bolt, Dubbo).
    Rpc(Box<crate::rpc::RpcProxy>),
}

/// TCP proxy to a cluster.
#[derive(Debug, Clone, Serialize)]
pub struct TcpProxy {
    /// Prefix for this filter's stats (`tcp.<stat_prefix>.`).
    pub stat_prefix: String,
    /// The upstream cluster.
    pub cluster: String,
    /// Close the connection after this long with no bytes either way; zero disables.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Access logs written when a connection closes.
    pub access_log: Vec<AccessLog>,
}

/// Which HTTP codecs a connection manager accepts downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodecType {
    /// HTTP/1.1 and HTTP/2 (prior knowledge), detected from the first bytes.
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// What happens to `x-forwarded-client-cert` (Envoy's `forward_client_cert_details`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForwardClientCert {
    /// Remove it (the default).
    Sanitize,
    /// Pass it on unchanged when the client presented a certificate; else remove it.
    ForwardOnly,
    /// With a client certificate, append this hop's details; else remove it.
    AppendForward,
    /// With a client certificate, replace it with this hop's details; else remove it.
    SanitizeSet,
    /// Pass it on unchanged, whatever the connection.
    AlwaysForwardOnly,
}

/// Which client certificate fields go into `x-forwarded-client-cert` (`By` and `Hash` always do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClientCertDetails {
    /// `Subject="..."`.
    pub subject: bool,
    /// `Cert="<URL-encoded PEM>"`.
    pub cert: bool,
    /// Not supported; rejected when set.
    pub chain: bool,
    /// `DNS=` for each DNS SAN.
    pub dns: bool,
    /// `URI=` for each URI SAN.
    pub uri: bool,
}

/// The HTTP connection manager: codec settings, limits, routes, access logs.
#[derive(Debug, Clone, Serialize)]
pub struct HttpConnectionManager {
    /// Handling of `x-forwarded-client-cert`.
    pub forward_client_cert_details: ForwardClientCert,
    /// Fields this hop adds to `x-forwarded-client-cert`.
    pub set_current_client_cert_details: ClientCertDetails,
    /// Prefix for this filter's stats (`http.<stat_prefix>.`).
    pub stat_prefix: String,
    /// Downstream codec.
    pub codec_type: CodecType,
    /// Largest request header block accepted, in KiB (431 beyond it).
    pub max_request_headers_kb: u32,
    /// Most request headers accepted (431 beyond it).
    pub max_request_headers_count: u32,
    /// Time to receive the whole request; zero disables. 408 when exceeded.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// Time to receive the request headers on an HTTP/1 connection; zero disables.
    #[serde(serialize_with = "ser_duration")]
    pub request_headers_timeout: Duration,
    /// Close an HTTP/1 connection idle this long between requests; zero disables.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Most concurrent HTTP/2 streams per downstream connection.
    pub http2_max_concurrent_streams: u32,
    /// Add `x-request-id` to requests that lack one.
    pub generate_request_id: bool,
    /// Append the client address to `x-forwarded-for` and set `x-forwarded-proto`.
    pub use_remote_address: bool,
    /// The route table.
    pub route_config: RouteConfig,
    /// Access logs written when a request completes.
    pub access_log: Vec<AccessLog>,
    /// A token bucket for every request through this connection manager (routes may override).
    pub local_rate_limit: Option<LocalRateLimit>,
    /// Checks and quotas every request passes before it is routed.
    pub policy: crate::policy::Policy,
}

/// Where and how an access log is written.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLog {
    /// A file path; `/dev/stdout` and `/dev/stderr` go to the process's streams.
    pub path: String,
    /// The line format.
    pub format: LogFormat,
}

/// A route table: virtual hosts chosen by host, then routes in order.
#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    /// Name, for stats and dumps.
    pub name: String,
    /// Virtual hosts.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Headers added to every request routed by this table.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from every request.
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to every response.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from every response.
    pub response_headers_to_remove: Vec<String>,
}

/// A set of domains and the routes for them.
#[derive(Debug, Clone, Serialize)]
pub struct VirtualHost {
    /// Name, unique within the table.
    pub name: String,
    /// `example.com`, `*.example.com`, `example.*` or `*`; compared without case.
    pub domains: Vec<String>,
    /// Routes; the first that matches wins.
    pub routes: Vec<Route>,
    /// Headers added to requests routed through this host.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from requests.
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to responses.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from responses.
    pub response_headers_to_remove: Vec<String>,
}

/// A match and what to do with matching requests.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Optional name, for logs (`%ROUTE_NAME%`).
    pub name: Option<String>,
    /// Which requests this route takes.
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    /// What happens to them.
    pub action: RouteAction,
    /// Headers added to requests on this route.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from requests on this route.
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to responses on this route.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from responses on this route.
    pub response_headers_to_remove: Vec<String>,
    /// Delays and aborts injected on this route.
    pub fault: Option<FaultInjection>,
    /// A token bucket for this route, replacing the connection manager's.
    pub local_rate_limit: Option<LocalRateLimit>,
}

/// Request criteria of a route; all must hold.
#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    /// The path criterion.
    pub path: PathMatch,
    /// Compare the path with case (default true).
    pub case_sensitive: bool,
    /// Header criteria.
    pub headers: Vec<HeaderMatcher>,
    /// Query parameter criteria.
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// Only gRPC requests (content-type application/grpc...).
    pub grpc: bool,
}

/// How the path is matched.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    /// The path (without query) starts with this.
    Prefix(String),
    /// The path (without query) is exactly this.
    Path(String),
    /// The path (without query) matches this regex entirely.
    SafeRegex(Pattern),
}

/// A regex that serializes as its source. Matching is whole-string, as in Envoy.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// Anchored form used for whole-string matches.
    pub full: regex::Regex,
    /// Unanchored form used for search and replace.
    pub raw: regex::Regex,
}

impl Pattern {
    /// Compiles `src`; the error says why it is not a valid regex.
    pub fn new(src: &str) -> Result<Pattern, String> {
        let raw = regex::Regex::new(src).map_err(|e| e.to_string())?;
        let full = regex::Regex::new(&format!("^(?:{src})$")).map_err(|e| e.to_string())?;
        Ok(Pattern { full, raw })
    }

    /// True when the whole of `s` matches.
    pub fn is_full_match(&self, s: &str) -> bool {
        self.full.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.raw.as_str() == other.raw.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.raw.as_str())
    }
}

/// A string comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// Matches the regex entirely.
    SafeRegex(Pattern),
}

impl StringMatch {
    /// Applies the comparison, ignoring ASCII case when asked (not for regexes).
    pub fn matches(&self, v: &str, ignore_case: bool) -> bool {
        fn eq(a: &str, b: &str, ic: bool) -> bool {
            if ic { a.eq_ignore_ascii_case(b) } else { a == b }
        }
        match self {
            StringMatch::Exact(s) => eq(v, s, ignore_case),
            StringMatch::Prefix(s) => {
                v.len() >= s.len() && v.is_char_boundary(s.len()) && eq(&v[..s.len()], s, ignore_case)
            }
            StringMatch::Suffix(s) => {
                v.len() >= s.len()
                    && v.is_char_boundary(v.len() - s.len())
                    && eq(&v[v.len() - s.len()..], s, ignore_case)
            }
            StringMatch::Contains(s) => {
                if ignore_case {
                    v.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
                } else {
                    v.contains(s.as_str())
                }
            }
            StringMatch::SafeRegex(p) => p.is_full_match(v),
        }
    }
}

/// A header criterion.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatcher {
    /// Header name, lower case. `:authority`, `:method`, `:path` and `:scheme` work too.
    pub name: String,
    /// The test.
    pub spec: HeaderMatchSpec,
    /// Negate the result.
    pub invert_match: bool,
}

/// What a header criterion tests.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMatchSpec {
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
    /// A string comparison on the value.
    String {
        /// The comparison.
        matcher: StringMatch,
        /// Ignore ASCII case.
        ignore_case: bool,
    },
    /// The value is an integer in `[start, end)`.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// A query parameter criterion.
#[derive(Debug, Clone, Serialize)]
pub struct QueryParameterMatcher {
    /// Parameter name.
    pub name: String,
    /// `None` means "present".
    pub string_match: Option<StringMatch>,
    /// Ignore ASCII case in the comparison.
    pub ignore_case: bool,
}

/// What a route does.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAction {
    /// Forward to a cluster.
    Route(Box<ForwardAction>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly.
    DirectResponse(DirectResponse),
}

/// Forwarding to one or several weighted clusters, with rewrites and a timeout.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardAction {
    /// Where to send the request.
    pub cluster: ClusterSpecifier,
    /// Time from the request's start to the upstream response headers; zero disables.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Replace the matched path prefix.
    pub prefix_rewrite: Option<String>,
    /// Regex substitution on the path.
    pub regex_rewrite: Option<RegexRewrite>,
    /// Replace the Host / :authority.
    pub host_rewrite_literal: Option<String>,
    /// Replace the Host with the DNS name of the chosen endpoint (strict_dns clusters).
    pub auto_host_rewrite: bool,
    /// Only endpoints with these labels (subset load balancing).
    pub metadata_match: BTreeMap<String, String>,
    /// Retries.
    pub retry_policy: Option<RetryPolicy>,
    /// Keys for consistent hashing.
    pub hash_policy: Vec<HashPolicy>,
    /// Shadow copies of requests.
    pub request_mirror_policies: Vec<MirrorPolicy>,
    /// Longest a stream may last, body included; zero disables.
    #[serde(serialize_with = "ser_duration")]
    pub max_stream_duration: Duration,
    /// Use a gRPC request's `grpc-timeout` as its timeout (capped by `grpc_timeout_header_max` when set).
    pub grpc_timeout_header: bool,
    /// Cap for `grpc-timeout`; zero: no cap.
    #[serde(serialize_with = "ser_duration")]
    pub grpc_timeout_header_max: Duration,
    /// Chooses the circuit-breaker thresholds.
    pub priority: RoutingPriority,
    /// Request bytes kept for retries and mirrors; a longer body disables both for that request.
    pub per_request_buffer_limit_bytes: u32,
}

/// One cluster or a weighted set.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterSpecifier {
    /// One cluster.
    Cluster(String),
    /// A weighted choice between clusters.
    WeightedClusters(Vec<WeightedCluster>),
}

/// One entry of a weighted cluster set.
#[derive(Debug, Clone, Serialize)]
pub struct WeightedCluster {
    /// The cluster.
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Only endpoints with these labels (on top of the route's).
    pub metadata_match: BTreeMap<String, String>,
}

/// A regex substitution, as Envoy's `regex_rewrite`.
#[derive(Debug, Clone, Serialize)]
pub struct RegexRewrite {
    /// What to find.
    pub pattern: Pattern,
    /// What to put instead (`\1` refers to groups).
    pub substitution: String,
}

/// A redirect answer.
#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    /// New scheme.
    pub scheme_redirect: Option<String>,
    /// New host.
    pub host_redirect: Option<String>,
    /// New port.
    pub port_redirect: Option<u16>,
    /// New path (query kept unless `strip_query`).
    pub path_redirect: Option<String>,
    /// Replace the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub response_code: u16,
    /// Drop the query string.
    pub strip_query: bool,
}

/// A fixed answer.
#[derive(Debug, Clone, Serialize)]
pub struct DirectResponse {
    /// Status code.
    pub status: u16,
    /// Body, if any.
    pub body: Option<String>,
}

/// A header to add and how it combines with an existing one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderValueOption {
    /// Header name (lower case).
    pub key: String,
    /// Value.
    pub value: String,
    /// Combination rule.
    pub append_action: AppendAction,
}

/// Envoy's `append_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    /// Add another value (the default).
    AppendIfExistsOrAdd,
    /// Add only if absent.
    AddIfAbsent,
    /// Replace any existing value, or add.
    OverwriteIfExistsOrAdd,
    /// Replace only if present.
    OverwriteIfExists,
}

/// How a cluster's endpoints are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryType {
    /// Fixed IP addresses.
    Static,
    /// Host names resolved periodically; every address returned is an endpoint.
    StrictDns,
    /// IP endpoints pushed by a control plane (xDS EDS); `endpoints` holds the latest push.
    Eds,
    /// The connection's original destination (after an iptables REDIRECT): Istio's
    /// `PassthroughCluster`.
    OriginalDst,
}

/// Upstream HTTP protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// Whatever the downstream request used.
    Downstream,
}

/// An upstream cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// Unique name.
    pub name: String,
    /// Endpoint discovery.
    #[serde(rename = "type")]
    pub discovery: DiscoveryType,
    /// TCP connect timeout.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Endpoint selection.
    pub lb_policy: LbPolicy,
    /// HTTP protocol towards the endpoints.
    pub protocol: UpstreamProtocol,
    /// How often strict_dns names are resolved again.
    #[serde(serialize_with = "ser_duration")]
    pub dns_refresh_rate: Duration,
    /// Close pooled connections idle this long.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Streams per upstream HTTP/2 connection before another is opened.
    pub http2_max_concurrent_streams: u32,
    /// Requests per upstream connection before it is retired; zero means no limit.
    pub max_requests_per_connection: u32,
    /// Active health checks.
    pub health_checks: Vec<HealthCheck>,
    /// Passive health checking.
    pub outlier_detection: Option<OutlierDetection>,
    /// Circuit breakers per routing priority.
    pub circuit_breakers: CircuitBreakers,
    /// Ramp-up for new endpoints.
    pub slow_start: Option<SlowStart>,
    /// Subset load balancing.
    pub lb_subset_config: SubsetConfig,
    /// Below this share of healthy hosts (percent), balance over all hosts, healthy or not.
    pub healthy_panic_threshold: f64,
    /// Envoy's overprovisioning factor, in percent (140: a priority at 72% health still takes all traffic).
    pub overprovisioning_factor: u32,
    /// Prefer endpoints near the node's locality (Istio's locality load balancing).
    pub locality_lb: bool,
    /// TLS towards the endpoints, if any.
    pub tls: Option<UpstreamTls>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Cluster {
    /// True when `other` differs from this cluster in its endpoints alone (an EDS push).
    pub fn same_but_endpoints(&self, other: &Cluster) -> bool {
        // Everything else compared through a copy carrying our endpoints.
        let mut probe = other.clone();
        probe.endpoints.clone_from(&self.endpoints);
        probe == *self
    }
}

/// One endpoint: `host:port` (an IP for static clusters), a weight, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Host (IP or DNS name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Load-balancing weight, 1 to 128.
    pub weight: u32,
    /// Failover priority: 0 first; higher priorities take traffic as lower ones lose health.
    pub priority: u32,
    /// Region / zone / sub-zone.
    pub locality: Option<Locality>,
    /// Labels for subset load balancing (Istio's `version: v2`).
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint with weight 1 and nothing else.
    pub fn new(host: impl Into<String>, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
            weight: 1,
            priority: 0,
            locality: None,
            labels: BTreeMap::new(),
        }
    }
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// Formats a duration the way the config writes it (`250ms`, `5s`, `1.5s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}us", d.as_micros())
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs())
    }
}

pub(crate) fn ser_display<S: Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

fn ser_display_vec<S: Serializer, T: std::fmt::Display>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

//! Traffic management: load-balancing policies, localities, subsets, health checks, outlier
//! detection, circuit breakers, retries, hashing, mirroring, fault injection and rate limits.
//! Field names and defaults follow Envoy; Istio's DestinationRule and VirtualService map onto them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::config::{HeaderMatcher, ser_duration};

/// Where this sidecar runs (Envoy's `node`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Service cluster of the node.
    pub cluster: String,
    /// Region / zone / sub-zone, for locality-aware load balancing.
    pub locality: Option<Locality>,
}

/// A region, zone and sub-zone; empty parts match only empty parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone within the region.
    pub zone: String,
    /// Sub-zone within the zone.
    pub sub_zone: String,
}

impl Locality {
    /// Istio's failover order: 0 for the same sub-zone, 1 same zone, 2 same region, 3 elsewhere.
    pub fn proximity(&self, other: &Locality) -> u32 {
        if self.region != other.region {
            3
        } else if self.zone != other.zone {
            2
        } else if self.sub_zone != other.sub_zone {
            1
        } else {
            0
        }
    }
}

/// How a cluster chooses an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin (smooth: weights interleave rather than burst).
    RoundRobin,
    /// Power of `choice_count` choices on active requests, weighted.
    LeastRequest {
        /// Hosts sampled per pick (2 is "power of two choices").
        choice_count: u32,
        /// How strongly active requests count against weight (Envoy's `active_request_bias`).
        active_request_bias: f64,
    },
    /// Uniform random among healthy hosts.
    Random,
    /// Consistent hashing on a ring (Ketama style); the route's `hash_policy` gives the key.
    RingHash {
        /// Smallest ring.
        minimum_ring_size: u64,
        /// Largest ring.
        maximum_ring_size: u64,
    },
    /// Maglev consistent hashing; the route's `hash_policy` gives the key.
    Maglev {
        /// Lookup table size (a prime).
        table_size: u64,
    },
}

impl LbPolicy {
    /// True for the consistent-hashing policies.
    pub fn is_hashing(&self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }
}

/// New endpoints ramp up their share of traffic over a window (Envoy's `slow_start_config`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlowStart {
    /// How long the ramp lasts.
    #[serde(serialize_with = "ser_duration")]
    pub window: Duration,
    /// Curve shape: 1.0 linear, larger ramps faster at first.
    pub aggression: f64,
    /// The share of its weight an endpoint gets at the start, in percent.
    pub min_weight_percent: f64,
}

/// What a route that asks for a subset gets when the subset has no endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SubsetFallback {
    /// No endpoint: 503 `UH` (what Istio's subsets do).
    NoFallback,
    /// Any endpoint of the cluster.
    AnyEndpoint,
    /// The endpoints matching `default_subset`.
    DefaultSubset,
}

/// Subset load balancing (Envoy's `lb_subset_config`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubsetConfig {
    /// When the requested subset is empty.
    pub fallback_policy: SubsetFallback,
    /// Labels of the default subset.
    pub default_subset: BTreeMap<String, String>,
}

impl Default for SubsetConfig {
    fn default() -> SubsetConfig {
        SubsetConfig {
            fallback_policy: SubsetFallback::NoFallback,
            default_subset: BTreeMap::new(),
        }
    }
}

/// An active health check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthCheck {
    /// Time allowed for one check.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Time between checks.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Up to this much random time is added to each interval.
    #[serde(serialize_with = "ser_duration")]
    pub interval_jitter: Duration,
    /// Failures in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Successes in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// What is checked.
    pub kind: HealthCheckKind,
}

/// The kinds of active health check.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// An HTTP/1.1 GET whose status must fall in one of the ranges.
    Http {
        /// Request path.
        path: String,
        /// Host header; the cluster name when absent.
        host: Option<String>,
        /// `[start, end)` ranges; default `[200, 201)`.
        expected_statuses: Vec<StatusRange>,
    },
    /// A TCP connect, optionally sending bytes and expecting bytes back.
    Tcp {
        /// Bytes to send.
        #[serde(serialize_with = "ser_hex_opt")]
        send: Option<Vec<u8>>,
        /// Byte strings that must all appear in the reply, in order.
        #[serde(serialize_with = "ser_hex_vec")]
        receive: Vec<Vec<u8>>,
    },
    /// `grpc.health.v1.Health/Check` over h2c; healthy when the answer is SERVING.
    Grpc {
        /// Service name to ask about; empty for the whole server.
        service_name: String,
        /// `:authority`; the cluster name when absent.
        authority: Option<String>,
    },
}

/// An HTTP status range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatusRange {
    /// First status in the range.
    pub start: u16,
    /// First status after the range.
    pub end: u16,
}

/// Passive health checking: eject endpoints that fail (Envoy's `outlier_detection`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    /// 5xx responses (and local-origin failures unless split) in a row before ejection.
    pub consecutive_5xx: u32,
    /// 502/503/504 (and local-origin failures unless split) in a row before ejection.
    pub consecutive_gateway_failure: u32,
    /// Connect failures, timeouts and resets in a row before ejection (when split).
    pub consecutive_local_origin_failure: u32,
    /// How often ejections are reviewed and success rates computed.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Ejection time, multiplied by the number of times the host was ejected.
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection_time: Duration,
    /// Upper bound of the ejection time.
    #[serde(serialize_with = "ser_duration")]
    pub max_ejection_time: Duration,
    /// At most this share of the cluster's hosts is ejected at once, in percent.
    pub max_ejection_percent: u32,
    /// Chance (percent) that a consecutive-5xx detection ejects.
    pub enforcing_consecutive_5xx: u32,
    /// Chance (percent) that a consecutive-gateway-failure detection ejects.
    pub enforcing_consecutive_gateway_failure: u32,
    /// Chance (percent) that a consecutive-local-origin detection ejects.
    pub enforcing_consecutive_local_origin_failure: u32,
    /// Chance (percent) that a success-rate detection ejects.
    pub enforcing_success_rate: u32,
    /// Hosts with enough requests needed before success rates are compared.
    pub success_rate_minimum_hosts: u32,
    /// Requests in an interval a host needs to be judged on its success rate.
    pub success_rate_request_volume: u32,
    /// Ejected below mean − (factor / 1000) × stdev.
    pub success_rate_stdev_factor: u32,
    /// Count local-origin failures (connect, timeout, reset) apart from upstream 5xx.
    pub split_external_local_origin_errors: bool,
}

impl Default for OutlierDetection {
    fn default() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            split_external_local_origin_errors: false,
        }
    }
}

/// Circuit-breaker thresholds for one routing priority.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thresholds {
    /// Upstream connections.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
    /// Retries allowed as a share of requests in flight; overrides `max_retries` when set.
    pub retry_budget: Option<RetryBudget>,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// Envoy's retry budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryBudget {
    /// Retries allowed, in percent of requests in flight.
    pub budget_percent: f64,
    /// Retries always allowed regardless of the percentage.
    pub min_retry_concurrency: u32,
}

/// Per-priority circuit breakers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CircuitBreakers {
    /// For routes of DEFAULT priority.
    pub default: Thresholds,
    /// For routes of HIGH priority.
    pub high: Thresholds,
}

/// A route's priority, choosing the circuit-breaker thresholds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RoutingPriority {
    /// The usual.
    #[default]
    Default,
    /// Separate, usually larger, thresholds.
    High,
}

/// The conditions a retry policy retries on, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(pub u32);

macro_rules! retry_on {
    ($($name:ident = $bit:expr, $text:literal;)*) => {
        impl RetryOn {
            $(#[doc = concat!("`", $text, "`")] pub const $name: RetryOn = RetryOn(1 << $bit);)*
            /// Every condition with its name, as Envoy spells it.
            pub const ALL: &'static [(RetryOn, &'static str)] = &[$((RetryOn::$name, $text)),*];
        }
    };
}

retry_on! {
    FIVE_XX = 0, "5xx";
    GATEWAY_ERROR = 1, "gateway-error";
    RESET = 2, "reset";
    CONNECT_FAILURE = 3, "connect-failure";
    RETRIABLE_4XX = 4, "retriable-4xx";
    RETRIABLE_STATUS_CODES = 5, "retriable-status-codes";
    REFUSED_STREAM = 6, "refused-stream";
    GRPC_CANCELLED = 7, "cancelled";
    GRPC_DEADLINE_EXCEEDED = 8, "deadline-exceeded";
    GRPC_RESOURCE_EXHAUSTED = 9, "resource-exhausted";
    GRPC_UNAVAILABLE = 10, "unavailable";
}

impl RetryOn {
    /// True when any bit of `other` is set.
    pub fn has(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    /// Parses Envoy's comma-separated list; the error names the unknown condition.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut out = RetryOn(0);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bit = RetryOn::ALL
                .iter()
                .find(|(_, n)| *n == part)
                .map(|(b, _)| *b)
                .ok_or_else(|| {
                    let names: Vec<&str> = RetryOn::ALL.iter().map(|(_, n)| *n).collect();
                    format!(
                        "unknown retry condition `{part}`; expected one of: {}",
                        names.join(", ")
                    )
                })?;
            out.0 |= bit.0;
        }
        Ok(out)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = RetryOn::ALL
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A route's retry policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// When to retry.
    pub retry_on: RetryOn,
    /// Retries after the first attempt.
    pub num_retries: u32,
    /// Time allowed for each attempt; zero means only the route timeout applies.
    #[serde(serialize_with = "ser_duration")]
    pub per_try_timeout: Duration,
    /// Base of the exponential back-off (full jitter).
    #[serde(serialize_with = "ser_duration")]
    pub base_interval: Duration,
    /// Cap of the back-off.
    #[serde(serialize_with = "ser_duration")]
    pub max_interval: Duration,
    /// Statuses retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Prefer hosts not yet tried (Envoy's `previous_hosts` predicate).
    pub skip_previous_hosts: bool,
    /// Picks tried to find an untried host.
    pub host_selection_retry_max_attempts: u32,
    /// Retry POST and PATCH on conditions where the upstream may have processed the request.
    pub retry_non_idempotent: bool,
}

/// What a consistent-hash key is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashPolicyKind {
    /// A request header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
    /// A query parameter's value.
    QueryParameter(String),
}

/// One element of a route's `hash_policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HashPolicy {
    /// The key source.
    pub kind: HashPolicyKind,
    /// Stop at this element when it produced a key.
    pub terminal: bool,
}

/// Copy requests to another cluster, fire and forget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MirrorPolicy {
    /// The shadow cluster.
    pub cluster: String,
    /// Share of requests mirrored, 0 to 100.
    pub percentage: f64,
}

/// Istio's HTTPFaultInjection on a route.
#[derive(Debug, Clone, Serialize)]
pub struct FaultInjection {
    /// Delay a share of requests.
    pub delay: Option<FaultDelay>,
    /// Fail a share of requests.
    pub abort: Option<FaultAbort>,
    /// Only requests matching all of these are faulted.
    pub headers: Vec<HeaderMatcher>,
}

/// A fixed delay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelay {
    /// The delay.
    #[serde(serialize_with = "ser_duration")]
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0 to 100.
    pub percentage: f64,
}

/// An injected failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbort {
    /// What the client gets.
    pub status: AbortStatus,
    /// Share of requests aborted, 0 to 100.
    pub percentage: f64,
}

/// An abort's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortStatus {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status code (on HTTP 200, trailers-only).
    Grpc(u8),
}

/// A local token-bucket rate limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalRateLimit {
    /// Bucket size.
    pub max_tokens: u32,
    /// Tokens added each fill.
    pub tokens_per_fill: u32,
    /// Time between fills.
    #[serde(serialize_with = "ser_duration")]
    pub fill_interval: Duration,
    /// One bucket per distinct value of this key; one shared bucket when absent.
    pub descriptor: Option<RateLimitKey>,
    /// Add `x-ratelimit-limit`, `-remaining` and `-reset` to responses.
    pub response_headers: bool,
    /// Headers added to the 429 answers (Envoy's `response_headers_to_add`).
    pub response_headers_to_add: Vec<crate::config::HeaderValueOption>,
}

/// What splits a rate limit into separate buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitKey {
    /// A request header's value (requests without it share one bucket).
    Header(String),
    /// The client's IP address.
    SourceIp,
}

fn ser_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ser_hex_opt<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&ser_hex(b)),
        None => s.serialize_none(),
    }
}

fn ser_hex_vec<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|b| ser_hex(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parses_and_prints() {
        let r = RetryOn::parse("5xx, connect-failure,unavailable").unwrap();
        assert!(r.has(RetryOn::FIVE_XX) && r.has(RetryOn::CONNECT_FAILURE) && r.has(RetryOn::GRPC_UNAVAILABLE));
        assert!(!r.has(RetryOn::RESET));
        assert_eq!(r.to_string(), "5xx,connect-failure,unavailable");
        assert!(
            RetryOn::parse("5xx,bogus")
                .unwrap_err()
                .contains("unknown retry condition `bogus`")
        );
    }

    #[test]
    fn proximity_follows_istio() {
        let l = |r: &str, z: &str, s: &str| Locality {
            region: r.into(),
            zone: z.into(),
            sub_zone: s.into(),
        };
        let me = l("eu", "eu-1a", "rack1");
        assert_eq!(me.proximity(&l("eu", "eu-1a", "rack1")), 0);
        assert_eq!(me.proximity(&l("eu", "eu-1a", "rack2")), 1);
        assert_eq!(me.proximity(&l("eu", "eu-1b", "rack1")), 2);
        assert_eq!(me.proximity(&l("us", "eu-1a", "rack1")), 3);
    }
}

//! `envoy.config.cluster.v3.Cluster` and `envoy.config.endpoint.v3.ClusterLoadAssignment` into
//! [`tessera_model::Cluster`].

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, OutlierDetection, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthCheck, HealthStatus, Metadata, address, health_check, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use prost::Message;
use tessera_model as model;

use crate::{Problems, Unsupported, duration};

/// The type URL of upstream HTTP protocol options (`typed_extension_protocol_options`).
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Converts a cluster whose endpoints are inline (STATIC, STRICT_DNS). `at` prefixes the paths
/// of problems (e.g. `static_resources.clusters[3]`).
pub fn cluster(c: &Cluster, at: &str) -> Result<model::Cluster, Vec<Unsupported>> {
    let mut p = Problems::default();
    let f = |field: &str| format!("{at}.{field}");
    if c.name.is_empty() {
        p.add(f("name"), "a cluster needs a name");
    }
    let discovery = match &c.cluster_discovery_type {
        None => model::DiscoveryType::Static,
        Some(cluster::ClusterDiscoveryType::Type(t)) => match cluster::DiscoveryType::try_from(*t) {
            Ok(cluster::DiscoveryType::Static) => model::DiscoveryType::Static,
            Ok(cluster::DiscoveryType::StrictDns) => model::DiscoveryType::StrictDns,
            // Envoy's LOGICAL_DNS connects to the first address a name resolves to; Tessera
            // resolves it as STRICT_DNS, which is the same for the one-address names it is used
            // for and spreads load over every address otherwise (docs/xds.md).
            Ok(cluster::DiscoveryType::LogicalDns) => model::DiscoveryType::StrictDns,
            Ok(cluster::DiscoveryType::OriginalDst) => {
                if let Some(cluster::LbConfig::OriginalDstLbConfig(o)) = &c.lb_config
                    && (o.use_http_header || o.upstream_port_override.is_some())
                {
                    p.add(
                        f("original_dst_lb_config"),
                        "the destination comes from the connection only (no header, no port override)",
                    );
                }
                model::DiscoveryType::OriginalDst
            }
            Ok(cluster::DiscoveryType::Eds) => {
                if let Some(cfg) = &c.eds_cluster_config
                    && let Some(src) = &cfg.eds_config
                    && !is_ads(src)
                {
                    p.add(
                        f("eds_cluster_config.eds_config"),
                        "endpoints come over the ADS stream only (`eds_config: {ads: {}}`)",
                    );
                }
                model::DiscoveryType::Eds
            }
            Err(_) => {
                p.add(f("type"), format!("unknown discovery type {t}"));
                model::DiscoveryType::Static
            }
        },
        Some(cluster::ClusterDiscoveryType::ClusterType(t)) => {
            p.add(
                f("cluster_type"),
                format!("custom cluster type `{}` is not supported", t.name),
            );
            model::DiscoveryType::Static
        }
    };
    let connect_timeout = match &c.connect_timeout {
        None => Duration::from_secs(5),
        Some(d) => duration(d).filter(|d| !d.is_zero()).unwrap_or_else(|| {
            p.add(f("connect_timeout"), "must be a positive duration");
            Duration::from_secs(5)
        }),
    };
    let lb_policy = lb_policy(c, &f, &mut p);
    let protocol = protocol(c, &f, &mut p);
    // Deprecated in Envoy's API but still accepted by Envoy and common in real configs.
    #[allow(deprecated)]
    let dns_refresh_rate = c
        .dns_refresh_rate
        .as_ref()
        .and_then(duration)
        .filter(|d| *d >= Duration::from_millis(1))
        .unwrap_or(Duration::from_secs(5));
    let mut circuit_breakers = model::CircuitBreakers::default();
    if let Some(cb) = &c.circuit_breakers {
        for (i, t) in cb.thresholds.iter().enumerate() {
            let target = match t.priority {
                0 => &mut circuit_breakers.default,
                1 => &mut circuit_breakers.high,
                other => {
                    p.add(
                        f(&format!("circuit_breakers.thresholds[{i}].priority")),
                        format!("unknown priority {other}"),
                    );
                    continue;
                }
            };
            let v = |w: &Option<UInt32Value>, d: u32| w.as_ref().map_or(d, |w| w.value);
            target.max_connections = v(&t.max_connections, target.max_connections);
            target.max_pending_requests = v(&t.max_pending_requests, target.max_pending_requests);
            target.max_requests = v(&t.max_requests, target.max_requests);
            target.max_retries = v(&t.max_retries, target.max_retries);
            if let Some(b) = &t.retry_budget {
                target.retry_budget = Some(model::RetryBudget {
                    budget_percent: b.budget_percent.as_ref().map_or(20.0, |x| x.value),
                    min_retry_concurrency: b.min_retry_concurrency.as_ref().map_or(3, |x| x.value),
                });
            }
        }
    }
    let tls = c
        .transport_socket
        .as_ref()
        .and_then(|ts| crate::tls::upstream(ts, &f("transport_socket"), &mut p));
    let health_checks: Vec<model::HealthCheck> = c
        .health_checks
        .iter()
        .enumerate()
        .filter_map(|(i, hc)| health_check(hc, &f(&format!("health_checks[{i}]")), protocol, &mut p))
        .collect();
    if c.health_checks.len() > 32 {
        // Tessera tracks each check's verdict per host in one 32-bit mask.
        p.add(
            f("health_checks"),
            format!(
                "{} health checks; Tessera runs at most 32 per cluster",
                c.health_checks.len()
            ),
        );
    }
    let outlier_detection = c
        .outlier_detection
        .as_ref()
        .and_then(|od| outlier_detection(od, &f("outlier_detection"), !c.health_checks.is_empty(), &mut p));
    let mut endpoints = Vec::new();
    let mut overprovisioning_factor = 140;
    if let Some(cla) = &c.load_assignment {
        let (e, o) = load_assignment(cla, &f("load_assignment"), &mut p);
        endpoints = e;
        overprovisioning_factor = o;
        if !c.health_checks.is_empty() {
            endpoint_health_overrides(cla, &health_checks, &f("load_assignment"), &mut p);
        }
    }
    if discovery == model::DiscoveryType::Static
        && let Some(e) = endpoints.iter().find(|e| e.host.parse::<std::net::IpAddr>().is_err())
    {
        p.add(
            f("load_assignment"),
            format!(
                "a STATIC cluster's endpoints are IP addresses; `{}` is a name (use STRICT_DNS)",
                e.host
            ),
        );
    }
    let healthy_panic_threshold = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map_or(50.0, |t| t.value);
    p.finish(model::Cluster {
        name: c.name.clone(),
        discovery,
        connect_timeout,
        lb_policy,
        protocol,
        dns_refresh_rate,
        idle_timeout: Duration::from_secs(3600),
        http2_max_concurrent_streams: 100,
        max_requests_per_connection: 0,
        health_checks,
        outlier_detection,
        circuit_breakers,
        slow_start: None,
        lb_subset_config: model::SubsetConfig::default(),
        healthy_panic_threshold,
        overprovisioning_factor,
        locality_lb: true,
        tls,
        endpoints,
    })
}

fn lb_policy(c: &Cluster, f: &dyn Fn(&str) -> String, p: &mut Problems) -> model::LbPolicy {
    use cluster::LbConfig;
    let cfg = c.lb_config.as_ref();
    match cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(cluster::LbPolicy::RoundRobin) => model::LbPolicy::RoundRobin,
        Ok(cluster::LbPolicy::Random) => model::LbPolicy::Random,
        Ok(cluster::LbPolicy::LeastRequest) => {
            let (choice_count, bias) = match cfg {
                Some(LbConfig::LeastRequestLbConfig(l)) => (
                    l.choice_count.as_ref().map_or(2, |c| c.value),
                    l.active_request_bias.as_ref().map_or(1.0, |b| b.default_value),
                ),
                _ => (2, 1.0),
            };
            if choice_count < 2 {
                p.add(f("least_request_lb_config.choice_count"), "must be at least 2");
            }
            model::LbPolicy::LeastRequest {
                choice_count,
                active_request_bias: bias,
            }
        }
        Ok(cluster::LbPolicy::RingHash) => {
            let (min, max) = match cfg {
                Some(LbConfig::RingHashLbConfig(r)) => (
                    r.minimum_ring_size.as_ref().map_or(1024, |v| v.value),
                    r.maximum_ring_size.as_ref().map_or(8 * 1024 * 1024, |v| v.value),
                ),
                _ => (1024, 8 * 1024 * 1024),
            };
            if min > max {
                p.add(f("ring_hash_lb_config"), "minimum_ring_size is above maximum_ring_size");
            }
            model::LbPolicy::RingHash {
                minimum_ring_size: min,
                maximum_ring_size: max,
            }
        }
        Ok(cluster::LbPolicy::Maglev) => model::LbPolicy::Maglev {
            table_size: match cfg {
                Some(LbConfig::MaglevLbConfig(m)) => m.table_size.as_ref().map_or(65537, |v| v.value),
                _ => 65537,
            },
        },
        // ORIGINAL_DST clusters pick the connection's destination; Envoy requires this policy
        // for them (and the field is ignored otherwise).
        Ok(cluster::LbPolicy::ClusterProvided)
            if c.cluster_discovery_type
                == Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::OriginalDst as i32,
                )) =>
        {
            model::LbPolicy::RoundRobin
        }
        Ok(other) => {
            p.add(f("lb_policy"), format!("{} is not supported", other.as_str_name()));
            model::LbPolicy::RoundRobin
        }
        Err(_) => {
            p.add(f("lb_policy"), format!("unknown LB policy {}", c.lb_policy));
            model::LbPolicy::RoundRobin
        }
    }
}

/// HTTP/1.1 unless the cluster asks for HTTP/2: the deprecated `http2_protocol_options`, or
/// `typed_extension_protocol_options` with explicit HTTP/2 or "use downstream protocol".
fn protocol(c: &Cluster, f: &dyn Fn(&str) -> String, p: &mut Problems) -> model::UpstreamProtocol {
    use http_protocol_options::UpstreamProtocolOptions as U;
    use http_protocol_options::explicit_http_config::ProtocolConfig as P;
    // Deprecated in Envoy's API (use typed_extension_protocol_options) but still accepted.
    #[allow(deprecated)]
    let deprecated_http2 = c.http2_protocol_options.is_some();
    let mut protocol = if deprecated_http2 {
        model::UpstreamProtocol::Http2
    } else {
        model::UpstreamProtocol::Http1
    };
    for (key, any) in &c.typed_extension_protocol_options {
        let at = f(&format!("typed_extension_protocol_options[\"{key}\"]"));
        let type_name = any.type_url.rsplit('/').next().unwrap_or("");
        if type_name != HTTP_PROTOCOL_OPTIONS {
            p.add(at, format!("`{type_name}` is not supported"));
            continue;
        }
        let opts = match HttpProtocolOptions::decode(any.value.as_slice()) {
            Ok(o) => o,
            Err(e) => {
                p.add(at, format!("malformed {HTTP_PROTOCOL_OPTIONS}: {e}"));
                continue;
            }
        };
        protocol = match opts.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(P::Http2ProtocolOptions(_)) => model::UpstreamProtocol::Http2,
                Some(P::HttpProtocolOptions(_)) | None => model::UpstreamProtocol::Http1,
                Some(P::Http3ProtocolOptions(_)) => {
                    p.add(at, "HTTP/3 upstreams are not supported");
                    model::UpstreamProtocol::Http1
                }
            },
            Some(U::UseDownstreamProtocolConfig(_)) => model::UpstreamProtocol::Downstream,
            Some(U::AutoConfig(_)) => {
                p.add(
                    at,
                    "auto_config (ALPN-negotiated upstream protocol) is not supported; use explicit_http_config",
                );
                model::UpstreamProtocol::Http1
            }
            None => model::UpstreamProtocol::Http1,
        };
    }
    protocol
}

/// A required duration above zero (Envoy's `required: true, gt: {}`); `None` after a problem.
fn positive_duration(d: Option<&PbDuration>, at: String, p: &mut Problems) -> Option<Duration> {
    let Some(d) = d else {
        p.add(at, "required (Envoy refuses a health check without it)");
        return None;
    };
    let d = duration(d).filter(|d| !d.is_zero());
    if d.is_none() {
        p.add(at, "must be a positive duration");
    }
    d
}

/// An optional duration that must not be negative; zero when absent.
fn optional_duration(d: Option<&PbDuration>, at: String, p: &mut Problems) -> Duration {
    d.map_or(Duration::ZERO, |d| {
        duration(d).unwrap_or_else(|| {
            p.add(at, "must not be negative");
            Duration::ZERO
        })
    })
}

/// One active health check. Envoy's defaults apply; what Tessera's checker cannot do is listed.
///
/// Accepted but not followed (docs/xds.md lists them): `no_traffic_interval` and
/// `no_traffic_healthy_interval`, which only slow the checks of a cluster that has had no traffic
/// (Tessera checks at `interval` from the start, so never less often than Envoy);
/// `reuse_connection` (Tessera opens a connection per check); `alt_port` (Envoy does not implement
/// it either).
fn health_check(
    hc: &HealthCheck,
    at: &str,
    protocol: model::UpstreamProtocol,
    p: &mut Problems,
) -> Option<model::HealthCheck> {
    use health_check::HealthChecker as K;
    let field = |name: &str| format!("{at}.{name}");
    let timeout = positive_duration(hc.timeout.as_ref(), field("timeout"), p);
    let interval = positive_duration(hc.interval.as_ref(), field("interval"), p);
    // Tessera's own config refuses shorter intervals: a check loop that tight is a mistake.
    let interval = interval.filter(|i| {
        let ok = *i >= Duration::from_millis(10);
        if !ok {
            p.add(field("interval"), "must be at least 10ms");
        }
        ok
    });
    let threshold = |name: &str, v: Option<&UInt32Value>, p: &mut Problems| match v {
        None => {
            p.add(field(name), "required (Envoy refuses a health check without it)");
            None
        }
        Some(v) if (1..=1000).contains(&v.value) => Some(v.value),
        Some(v) => {
            p.add(field(name), format!("{} is outside 1..=1000", v.value));
            None
        }
    };
    let unhealthy_threshold = threshold("unhealthy_threshold", hc.unhealthy_threshold.as_ref(), p);
    let healthy_threshold = threshold("healthy_threshold", hc.healthy_threshold.as_ref(), p);
    let mut interval_jitter = optional_duration(hc.interval_jitter.as_ref(), field("interval_jitter"), p);
    if hc.interval_jitter_percent != 0 {
        // Envoy adds a random share of `interval * interval_jitter_percent / 100`: the same
        // uniform jitter Tessera adds, when it is the only one.
        if !interval_jitter.is_zero() {
            p.add(
                field("interval_jitter_percent"),
                "Tessera adds one random jitter per interval; give interval_jitter or interval_jitter_percent, not both",
            );
        } else if let Some(i) = interval {
            match i.checked_mul(hc.interval_jitter_percent) {
                Some(j) => interval_jitter = j / 100,
                None => p.add(field("interval_jitter_percent"), "the jitter it gives is too large"),
            }
        }
    }
    if optional_duration(hc.initial_jitter.as_ref(), field("initial_jitter"), p) != Duration::ZERO {
        p.add(
            field("initial_jitter"),
            "Tessera starts checking at once; a random delay before the first check is not supported",
        );
    }
    for (name, d) in [
        ("no_traffic_interval", &hc.no_traffic_interval),
        ("no_traffic_healthy_interval", &hc.no_traffic_healthy_interval),
    ] {
        if let Some(d) = d {
            positive_duration(Some(d), field(name), p);
        }
    }
    // Their default is `interval`, which is what Tessera uses for every host.
    for (name, d) in [
        ("unhealthy_interval", &hc.unhealthy_interval),
        ("unhealthy_edge_interval", &hc.unhealthy_edge_interval),
        ("healthy_edge_interval", &hc.healthy_edge_interval),
    ] {
        if let Some(d) = d
            && let Some(d) = positive_duration(Some(d), field(name), p)
            && interval.is_some_and(|i| i != d)
        {
            p.add(
                field(name),
                "Tessera checks every host at `interval`, healthy or not; another interval is not supported",
            );
        }
    }
    #[allow(deprecated)] // still accepted by Envoy; the event_logger extension replaces it
    let event_log_path = !hc.event_log_path.is_empty();
    if event_log_path || !hc.event_logger.is_empty() || hc.event_service.is_some() {
        p.add(
            at,
            "health check event logs (event_log_path, event_logger, event_service) are not supported; Tessera logs health changes in its own log",
        );
    }
    if hc.tls_options.is_some() {
        p.add(
            field("tls_options"),
            "checks use the cluster's transport socket as it is; other ALPN for health checks is not supported",
        );
    }
    if hc.transport_socket_match_criteria.is_some() {
        p.add(
            field("transport_socket_match_criteria"),
            "checks use the cluster's transport socket; transport socket matches are not supported",
        );
    }
    let kind = match &hc.health_checker {
        Some(K::HttpHealthCheck(h)) => http_health_check(h, &field("http_health_check"), p),
        Some(K::TcpHealthCheck(t)) => {
            let at = field("tcp_health_check");
            if t.proxy_protocol_config.is_some() {
                p.add(
                    format!("{at}.proxy_protocol_config"),
                    "PROXY protocol headers on health checks are not supported",
                );
            }
            let send = t.send.as_ref().and_then(|s| payload(s, &format!("{at}.send"), p));
            let receive: Vec<Vec<u8>> = t
                .receive
                .iter()
                .enumerate()
                .filter_map(|(i, r)| payload(r, &format!("{at}.receive[{i}]"), p))
                .collect();
            Some(model::HealthCheckKind::Tcp { send, receive })
        }
        Some(K::GrpcHealthCheck(g)) => {
            let at = field("grpc_health_check");
            if !g.initial_metadata.is_empty() {
                p.add(
                    format!("{at}.initial_metadata"),
                    "metadata on gRPC health checks is not supported",
                );
            }
            if protocol == model::UpstreamProtocol::Http1 {
                p.add(
                    &at,
                    "the cluster must speak HTTP/2 for gRPC health checks, as Envoy requires; set explicit_http_config.http2_protocol_options in typed_extension_protocol_options",
                );
            }
            Some(model::HealthCheckKind::Grpc {
                service_name: g.service_name.clone(),
                authority: (!g.authority.is_empty()).then(|| g.authority.clone()),
            })
        }
        Some(K::CustomHealthCheck(c)) => {
            p.add(
                field("custom_health_check"),
                format!(
                    "custom health checker `{}` is not supported; Tessera runs http_health_check, tcp_health_check and grpc_health_check",
                    c.name
                ),
            );
            None
        }
        None => {
            p.add(
                at,
                "a health check needs http_health_check, tcp_health_check or grpc_health_check",
            );
            None
        }
    };
    Some(model::HealthCheck {
        timeout: timeout?,
        interval: interval?,
        interval_jitter,
        unhealthy_threshold: unhealthy_threshold?,
        healthy_threshold: healthy_threshold?,
        kind: kind?,
    })
}

/// An HTTP health check: an HTTP/1.1 GET whose status must be expected (200 by default).
fn http_health_check(h: &health_check::HttpHealthCheck, at: &str, p: &mut Problems) -> Option<model::HealthCheckKind> {
    use envoy_types::pb::envoy::config::core::v3::RequestMethod;
    use envoy_types::pb::envoy::r#type::v3::CodecClientType;
    let field = |name: &str| format!("{at}.{name}");
    let mut ok = true;
    if h.path.is_empty() {
        p.add(
            field("path"),
            "required (Envoy refuses an HTTP health check without a path)",
        );
        ok = false;
    }
    let refuse = |cond: bool, name: &str, why: &str, p: &mut Problems| {
        if cond {
            p.add(field(name), why);
        }
    };
    refuse(
        h.send.is_some(),
        "send",
        "request bodies on health checks are not supported; Tessera sends a GET",
        p,
    );
    refuse(
        !h.receive.is_empty(),
        "receive",
        "matching the response body is not supported; Tessera checks the status only",
        p,
    );
    refuse(
        !h.request_headers_to_add.is_empty(),
        "request_headers_to_add",
        "extra headers on health checks are not supported",
        p,
    );
    refuse(
        !h.request_headers_to_remove.is_empty(),
        "request_headers_to_remove",
        "removing headers from health checks is not supported",
        p,
    );
    refuse(
        !h.retriable_statuses.is_empty(),
        "retriable_statuses",
        "retriable statuses are not supported; every status outside expected_statuses is a failure",
        p,
    );
    refuse(
        h.service_name_matcher.is_some(),
        "service_name_matcher",
        "checking x-envoy-upstream-healthchecked-cluster is not supported",
        p,
    );
    match CodecClientType::try_from(h.codec_client_type) {
        Ok(CodecClientType::Http1) => {}
        Ok(other) => p.add(
            field("codec_client_type"),
            format!(
                "{} health checks are not supported; Tessera's HTTP checks use HTTP/1.1 (grpc_health_check uses HTTP/2)",
                other.as_str_name()
            ),
        ),
        Err(_) => p.add(
            field("codec_client_type"),
            format!("unknown codec {}", h.codec_client_type),
        ),
    }
    match RequestMethod::try_from(h.method) {
        Ok(RequestMethod::MethodUnspecified | RequestMethod::Get) => {}
        Ok(other) => p.add(
            field("method"),
            format!(
                "{} health checks are not supported; Tessera sends a GET",
                other.as_str_name()
            ),
        ),
        Err(_) => p.add(field("method"), format!("unknown method {}", h.method)),
    }
    let mut expected_statuses = Vec::with_capacity(h.expected_statuses.len());
    for (i, r) in h.expected_statuses.iter().enumerate() {
        match (u16::try_from(r.start), u16::try_from(r.end)) {
            (Ok(start), Ok(end)) if 100 <= start && start < end && end <= 600 => {
                expected_statuses.push(model::StatusRange { start, end });
            }
            _ => {
                p.add(
                    field(&format!("expected_statuses[{i}]")),
                    format!(
                        "[{}, {}) is not a range of statuses within [100, 600) (end is exclusive)",
                        r.start, r.end
                    ),
                );
                ok = false;
            }
        }
    }
    if expected_statuses.is_empty() {
        expected_statuses.push(model::StatusRange { start: 200, end: 201 });
    }
    ok.then(|| model::HealthCheckKind::Http {
        path: h.path.clone(),
        host: (!h.host.is_empty()).then(|| h.host.clone()),
        expected_statuses,
    })
}

/// A TCP health-check payload: hex `text` or `binary` bytes.
fn payload(pl: &health_check::Payload, at: &str, p: &mut Problems) -> Option<Vec<u8>> {
    use health_check::payload::Payload as P;
    match &pl.payload {
        Some(P::Text(t)) => {
            let bytes = (!t.is_empty() && t.len().is_multiple_of(2))
                .then(|| {
                    (0..t.len())
                        .step_by(2)
                        .map(|i| t.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten();
            if bytes.is_none() {
                p.add(format!("{at}.text"), "must be hex digits in pairs, e.g. 000000FF");
            }
            bytes
        }
        Some(P::Binary(b)) => Some(b.clone()),
        None => {
            p.add(at, "a payload needs text (hex) or binary");
            None
        }
    }
}

/// Per-endpoint health-check settings of an inline load assignment that Tessera's checks cannot
/// follow: another port or address, another Host / :authority, or no active checks for one
/// endpoint. A `port_value` equal to the endpoint's own port changes nothing and is accepted.
pub(crate) fn endpoint_health_overrides(
    cla: &ClusterLoadAssignment,
    checks: &[model::HealthCheck],
    at: &str,
    p: &mut Problems,
) {
    let named = checks
        .iter()
        .any(|c| !matches!(c.kind, model::HealthCheckKind::Tcp { .. }));
    for (li, group) in cla.endpoints.iter().enumerate() {
        for (ei, e) in group.lb_endpoints.iter().enumerate() {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(hcc) = &ep.health_check_config else {
                continue;
            };
            let here = format!("{at}.endpoints[{li}].lb_endpoints[{ei}].endpoint.health_check_config");
            let own_port = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(port)) => Some(port),
                    _ => None,
                },
                _ => None,
            };
            if hcc.port_value != 0 && Some(hcc.port_value) != own_port {
                p.add(
                    format!("{here}.port_value"),
                    "checking an endpoint on another port is not supported; Tessera checks each endpoint at its own address",
                );
            }
            if hcc.address.is_some() {
                p.add(
                    format!("{here}.address"),
                    "checking an endpoint at another address is not supported; Tessera checks each endpoint at its own address",
                );
            }
            if !hcc.hostname.is_empty() && named {
                p.add(
                    format!("{here}.hostname"),
                    "a Host for one endpoint's checks is not supported; set the cluster-wide http_health_check.host (or grpc_health_check.authority)",
                );
            }
            if hcc.disable_active_health_check {
                p.add(
                    format!("{here}.disable_active_health_check"),
                    "Tessera checks every endpoint of a cluster with health checks; leaving one out is not supported",
                );
            }
        }
    }
}

/// Outlier detection with Envoy's defaults. A consecutive-failure threshold of 0 turns that
/// detector off in Envoy (Istio writes 0 with enforcing 0 for "off"); Tessera's model needs a
/// threshold of at least 1, so 0 becomes an enforcing chance of 0 at Envoy's default threshold.
fn outlier_detection(
    od: &OutlierDetection,
    at: &str,
    active_checks: bool,
    p: &mut Problems,
) -> Option<model::OutlierDetection> {
    let field = |name: &str| format!("{at}.{name}");
    let d = model::OutlierDetection::default();
    let mut ok = true;
    let mut count = |name: &str, v: &Option<UInt32Value>, def: u32, max: u32, p: &mut Problems| -> Option<u32> {
        match v.as_ref().map(|v| v.value) {
            None => Some(def),
            Some(0) => None,
            Some(n) if n <= max => Some(n),
            Some(n) => {
                p.add(field(name), format!("{n} is above {max}"));
                ok = false;
                Some(def)
            }
        }
    };
    let c5xx = count("consecutive_5xx", &od.consecutive_5xx, d.consecutive_5xx, 1_000_000, p);
    let cgw = count(
        "consecutive_gateway_failure",
        &od.consecutive_gateway_failure,
        d.consecutive_gateway_failure,
        1_000_000,
        p,
    );
    let clocal = count(
        "consecutive_local_origin_failure",
        &od.consecutive_local_origin_failure,
        d.consecutive_local_origin_failure,
        1_000_000,
        p,
    );
    let min_hosts = count(
        "success_rate_minimum_hosts",
        &od.success_rate_minimum_hosts,
        d.success_rate_minimum_hosts,
        1_000_000,
        p,
    );
    let volume = count(
        "success_rate_request_volume",
        &od.success_rate_request_volume,
        d.success_rate_request_volume,
        1_000_000_000,
        p,
    );
    let mut pct = |name: &str, v: &Option<UInt32Value>, def: u32, p: &mut Problems| -> u32 {
        match v.as_ref().map(|v| v.value) {
            None => def,
            Some(n) if n <= 100 => n,
            Some(n) => {
                p.add(field(name), format!("{n} is above 100 (a percentage)"));
                ok = false;
                def
            }
        }
    };
    let max_ejection_percent = pct(
        "max_ejection_percent",
        &od.max_ejection_percent,
        d.max_ejection_percent,
        p,
    );
    let enforcing_consecutive_5xx = pct(
        "enforcing_consecutive_5xx",
        &od.enforcing_consecutive_5xx,
        d.enforcing_consecutive_5xx,
        p,
    );
    let enforcing_consecutive_gateway_failure = pct(
        "enforcing_consecutive_gateway_failure",
        &od.enforcing_consecutive_gateway_failure,
        d.enforcing_consecutive_gateway_failure,
        p,
    );
    let enforcing_consecutive_local_origin_failure = pct(
        "enforcing_consecutive_local_origin_failure",
        &od.enforcing_consecutive_local_origin_failure,
        d.enforcing_consecutive_local_origin_failure,
        p,
    );
    let enforcing_success_rate = pct(
        "enforcing_success_rate",
        &od.enforcing_success_rate,
        d.enforcing_success_rate,
        p,
    );
    let enforcing_local_origin_success_rate = pct(
        "enforcing_local_origin_success_rate",
        &od.enforcing_local_origin_success_rate,
        100,
        p,
    );
    let enforcing_failure_percentage = pct("enforcing_failure_percentage", &od.enforcing_failure_percentage, 0, p);
    let enforcing_failure_percentage_local_origin = pct(
        "enforcing_failure_percentage_local_origin",
        &od.enforcing_failure_percentage_local_origin,
        0,
        p,
    );
    let _ = pct("failure_percentage_threshold", &od.failure_percentage_threshold, 85, p);
    let success_rate_stdev_factor = match od.success_rate_stdev_factor.as_ref().map(|v| v.value) {
        None => d.success_rate_stdev_factor,
        Some(n) if n <= 100_000 => n,
        Some(n) => {
            p.add(field("success_rate_stdev_factor"), format!("{n} is above 100000"));
            ok = false;
            d.success_rate_stdev_factor
        }
    };
    let mut time = |name: &str, v: Option<&PbDuration>, def: Duration, p: &mut Problems| -> Duration {
        match v {
            None => def,
            Some(v) => duration(v).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                p.add(field(name), "must be a positive duration");
                ok = false;
                def
            }),
        }
    };
    let interval = time("interval", od.interval.as_ref(), d.interval, p);
    let base_ejection_time = time(
        "base_ejection_time",
        od.base_ejection_time.as_ref(),
        d.base_ejection_time,
        p,
    );
    // Unset, Envoy takes 300s or base_ejection_time, whichever is larger.
    let max_ejection_time = time(
        "max_ejection_time",
        od.max_ejection_time.as_ref(),
        d.max_ejection_time.max(base_ejection_time),
        p,
    );
    if max_ejection_time < base_ejection_time {
        p.add(
            field("max_ejection_time"),
            "must not be below base_ejection_time (Envoy refuses it too)",
        );
        ok = false;
    }
    if optional_duration(
        od.max_ejection_time_jitter.as_ref(),
        field("max_ejection_time_jitter"),
        p,
    ) != Duration::ZERO
    {
        p.add(
            field("max_ejection_time_jitter"),
            "random extra ejection time is not supported",
        );
        ok = false;
    }
    if enforcing_failure_percentage != 0 || enforcing_failure_percentage_local_origin != 0 {
        p.add(
            at,
            "failure-percentage ejection (enforcing_failure_percentage, enforcing_failure_percentage_local_origin) is not supported; use success-rate or consecutive-failure ejection",
        );
        ok = false;
    }
    let split = od.split_external_local_origin_errors;
    if split && (enforcing_success_rate != 0 || enforcing_local_origin_success_rate != 0) {
        p.add(
            field("split_external_local_origin_errors"),
            "with the split, Envoy judges external and local-origin success rates apart; Tessera judges one success rate over all outcomes. Set enforcing_success_rate and enforcing_local_origin_success_rate to 0, or do not split",
        );
        ok = false;
    }
    if active_checks
        && od
            .successful_active_health_check_uneject_host
            .as_ref()
            .is_none_or(|b| b.value)
    {
        p.add(
            field("successful_active_health_check_uneject_host"),
            "Tessera keeps an ejected host out for its whole ejection time, even when it passes an active health check (Envoy's default brings it back); set this to false to accept that",
        );
        ok = false;
    }
    if !od.monitors.is_empty() {
        p.add(field("monitors"), "outlier detection monitors are not supported");
        ok = false;
    }
    if od.detect_degraded_hosts.as_ref().is_some_and(|b| b.value) {
        p.add(field("detect_degraded_hosts"), "degraded hosts are not supported");
        ok = false;
    }
    // `always_eject_one_host` is accepted either way: Tessera always lets one host be ejected,
    // whatever max_ejection_percent gives (docs/xds.md says so).
    ok.then(|| model::OutlierDetection {
        consecutive_5xx: c5xx.unwrap_or(d.consecutive_5xx),
        consecutive_gateway_failure: cgw.unwrap_or(d.consecutive_gateway_failure),
        consecutive_local_origin_failure: clocal.unwrap_or(d.consecutive_local_origin_failure),
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent,
        enforcing_consecutive_5xx: if c5xx.is_some() { enforcing_consecutive_5xx } else { 0 },
        enforcing_consecutive_gateway_failure: if cgw.is_some() {
            enforcing_consecutive_gateway_failure
        } else {
            0
        },
        enforcing_consecutive_local_origin_failure: if clocal.is_some() {
            enforcing_consecutive_local_origin_failure
        } else {
            0
        },
        enforcing_success_rate,
        // 0 judges the same hosts as 1: a host without requests has no success rate to compare.
        success_rate_minimum_hosts: min_hosts.unwrap_or(1),
        success_rate_request_volume: volume.unwrap_or(1),
        success_rate_stdev_factor,
        split_external_local_origin_errors: split,
    })
}

/// True when a config source is the ADS stream (`ads: {}`), the only one Tessera follows.
pub(crate) fn is_ads(src: &envoy_types::pb::envoy::config::core::v3::ConfigSource) -> bool {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    matches!(src.config_source_specifier, Some(ConfigSourceSpecifier::Ads(_)))
}

/// The name an EDS cluster asks EDS for: `eds_cluster_config.service_name`, or its own name.
/// `None` for clusters that do not use EDS.
pub fn eds_service_name(c: &Cluster) -> Option<&str> {
    match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) if *t == cluster::DiscoveryType::Eds as i32 => Some(
            c.eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.as_str())
                .filter(|n| !n.is_empty())
                .unwrap_or(&c.name),
        ),
        _ => None,
    }
}

/// Endpoints of a load assignment, and its overprovisioning factor. Endpoints marked UNHEALTHY,
/// DRAINING or TIMEOUT by the control plane are left out, as Envoy stops sending them traffic.
pub fn load_assignment(cla: &ClusterLoadAssignment, at: &str, p: &mut Problems) -> (Vec<model::Endpoint>, u32) {
    let mut out = Vec::new();
    for (li, group) in cla.endpoints.iter().enumerate() {
        let locality = group.locality.as_ref().map(|l| model::Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            sub_zone: l.sub_zone.clone(),
        });
        let locality = locality.filter(|l| !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()));
        for (ei, e) in group.lb_endpoints.iter().enumerate() {
            // Paths are only formatted for problems: a push may carry tens of thousands of endpoints.
            let here = || format!("{at}.endpoints[{li}].lb_endpoints[{ei}]");
            if matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
            ) {
                continue;
            }
            let endpoint = match &e.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
                Some(lb_endpoint::HostIdentifier::EndpointName(n)) => {
                    p.add(here(), format!("named endpoint `{n}` is not supported"));
                    continue;
                }
                None => {
                    p.add(here(), "an endpoint needs an address");
                    continue;
                }
            };
            let Some((host, port)) = endpoint
                .address
                .as_ref()
                .and_then(|a| socket(a, &|| format!("{}.endpoint.address", here()), p))
            else {
                continue;
            };
            let weight = e.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if !(1..=128).contains(&weight) {
                p.add(
                    format!("{}.load_balancing_weight", here()),
                    format!("{weight} is outside 1..=128"),
                );
            }
            out.push(model::Endpoint {
                host,
                port,
                weight: weight.clamp(1, 128),
                priority: group.priority,
                locality: locality.clone(),
                labels: lb_labels(e.metadata.as_ref()),
            });
        }
    }
    let factor = cla
        .policy
        .as_ref()
        .and_then(|pol| pol.overprovisioning_factor.as_ref())
        .map_or(140, |f| f.value);
    (out, factor)
}

/// `host` and `port` of a socket address.
fn socket(a: &Address, at: &dyn Fn() -> String, p: &mut Problems) -> Option<(String, u16)> {
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            if s.protocol != socket_address::Protocol::Tcp as i32 {
                p.add(format!("{}.socket_address.protocol", at()), "only TCP is supported");
                return None;
            }
            match &s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(port)) => match u16::try_from(*port) {
                    Ok(port) if port != 0 => Some((s.address.clone(), port)),
                    _ => {
                        p.add(
                            format!("{}.socket_address.port_value", at()),
                            format!("{port} is not a port"),
                        );
                        None
                    }
                },
                Some(socket_address::PortSpecifier::NamedPort(n)) => {
                    p.add(
                        format!("{}.socket_address.named_port", at()),
                        format!("named port `{n}` is not supported"),
                    );
                    None
                }
                None => {
                    p.add(format!("{}.socket_address", at()), "a port_value is required");
                    None
                }
            }
        }
        _ => {
            p.add(
                at(),
                "only socket addresses are supported (no pipes or internal addresses)",
            );
            None
        }
    }
}

/// String values of the `envoy.lb` filter metadata, the labels subset load balancing matches.
/// The `envoy.lb` labels of endpoint or route metadata (subset load balancing).
pub(crate) fn lb_labels(m: Option<&Metadata>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(fields) = m.and_then(|m| m.filter_metadata.get("envoy.lb")) {
        for (k, v) in &fields.fields {
            let text = match &v.kind {
                Some(ValueKind::StringValue(s)) => s.clone(),
                Some(ValueKind::BoolValue(b)) => b.to_string(),
                Some(ValueKind::NumberValue(n)) => n.to_string(),
                _ => continue,
            };
            out.insert(k.clone(), text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Locality, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints};
    use envoy_types::pb::google::protobuf::{Any, Struct, Value};

    fn addr(host: &str, port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: host.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn lb(host: &str, port: u32) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(addr(host, port)),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn base() -> Cluster {
        Cluster {
            name: "web".into(),
            connect_timeout: Some(PbDuration {
                seconds: 0,
                nanos: 250_000_000,
            }),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: "web".into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![lb("10.0.0.1", 8080), lb("10.0.0.2", 8080)],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn secs(s: i64) -> Option<PbDuration> {
        Some(PbDuration { seconds: s, nanos: 0 })
    }

    fn u32v(value: u32) -> Option<UInt32Value> {
        Some(UInt32Value { value })
    }

    /// A health check with Envoy's required fields and the given checker.
    fn check(kind: health_check::HealthChecker) -> HealthCheck {
        HealthCheck {
            timeout: secs(1),
            interval: secs(5),
            unhealthy_threshold: u32v(3),
            healthy_threshold: u32v(2),
            health_checker: Some(kind),
            ..Default::default()
        }
    }

    fn http(path: &str) -> health_check::HealthChecker {
        health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            path: path.into(),
            ..Default::default()
        })
    }

    fn paths(errs: &[Unsupported]) -> Vec<&str> {
        errs.iter().map(|u| u.path.as_str()).collect()
    }

    #[test]
    fn http_and_tcp_health_checks() {
        use envoy_types::pb::envoy::r#type::v3::Int64Range;
        use health_check::payload::Payload as P;
        let mut c = base();
        let mut h = check(health_check::HealthChecker::HttpHealthCheck(
            health_check::HttpHealthCheck {
                path: "/healthz".into(),
                host: "web.internal".into(),
                expected_statuses: vec![Int64Range { start: 200, end: 300 }],
                ..Default::default()
            },
        ));
        h.interval_jitter = Some(PbDuration {
            seconds: 0,
            nanos: 500_000_000,
        });
        // Accepted: Tessera checks at `interval` whether or not the cluster has had traffic.
        h.no_traffic_interval = secs(60);
        h.unhealthy_interval = secs(5);
        let tcp = check(health_check::HealthChecker::TcpHealthCheck(
            health_check::TcpHealthCheck {
                send: Some(health_check::Payload {
                    payload: Some(P::Text("50494e47".into())),
                }),
                receive: vec![health_check::Payload {
                    payload: Some(P::Binary(b"PONG".to_vec())),
                }],
                proxy_protocol_config: None,
            },
        ));
        let mut plain = check(http("/"));
        plain.interval_jitter_percent = 20;
        c.health_checks = vec![h, tcp, plain];
        let got = cluster(&c, "c").unwrap();
        assert_eq!(got.health_checks.len(), 3);
        let h = &got.health_checks[0];
        assert_eq!(
            (h.timeout, h.interval, h.interval_jitter),
            (
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_millis(500)
            )
        );
        assert_eq!((h.unhealthy_threshold, h.healthy_threshold), (3, 2));
        assert_eq!(
            h.kind,
            model::HealthCheckKind::Http {
                path: "/healthz".into(),
                host: Some("web.internal".into()),
                expected_statuses: vec![model::StatusRange { start: 200, end: 300 }],
            }
        );
        assert_eq!(
            got.health_checks[1].kind,
            model::HealthCheckKind::Tcp {
                send: Some(b"PING".to_vec()),
                receive: vec![b"PONG".to_vec()],
            }
        );
        // Envoy's default: 200 only, the cluster's name as Host.
        let plain = &got.health_checks[2];
        assert_eq!(
            plain.kind,
            model::HealthCheckKind::Http {
                path: "/".into(),
                host: None,
                expected_statuses: vec![model::StatusRange { start: 200, end: 201 }],
            }
        );
        assert_eq!(plain.interval_jitter, Duration::from_secs(1), "20% of 5s");
    }

    #[test]
    fn grpc_health_checks_need_an_http2_cluster() {
        let grpc = check(health_check::HealthChecker::GrpcHealthCheck(
            health_check::GrpcHealthCheck {
                service_name: "web.v1.Web".into(),
                ..Default::default()
            },
        ));
        let mut c = base();
        c.health_checks = vec![grpc];
        let errs = cluster(&c, "c").unwrap_err();
        assert_eq!(paths(&errs), ["c.health_checks[0].grpc_health_check"], "{errs:#?}");
        assert!(errs[0].reason.contains("must speak HTTP/2"), "{errs:?}");
        #[allow(deprecated)]
        {
            c.http2_protocol_options = Some(Default::default());
        }
        let got = cluster(&c, "c").unwrap();
        assert_eq!(
            got.health_checks[0].kind,
            model::HealthCheckKind::Grpc {
                service_name: "web.v1.Web".into(),
                authority: None,
            }
        );
    }

    #[test]
    fn what_health_checks_cannot_do_is_refused() {
        use envoy_types::pb::envoy::config::endpoint::v3::endpoint::HealthCheckConfig;
        use envoy_types::pb::envoy::r#type::v3::{CodecClientType, Int64Range};
        let mut c = base();
        let mut missing = check(http("/"));
        missing.timeout = None;
        missing.unhealthy_threshold = u32v(0);
        let mut timing = check(http("/"));
        timing.initial_jitter = secs(1);
        timing.unhealthy_interval = secs(30);
        timing.interval_jitter = secs(1);
        timing.interval_jitter_percent = 10;
        let http_extras = check(health_check::HealthChecker::HttpHealthCheck(
            health_check::HttpHealthCheck {
                path: "/".into(),
                method: envoy_types::pb::envoy::config::core::v3::RequestMethod::Post as i32,
                codec_client_type: CodecClientType::Http2 as i32,
                receive: vec![health_check::Payload::default()],
                expected_statuses: vec![Int64Range { start: 0, end: 700 }],
                ..Default::default()
            },
        ));
        let custom = check(health_check::HealthChecker::CustomHealthCheck(
            health_check::CustomHealthCheck {
                name: "envoy.health_checkers.redis".into(),
                config_type: None,
            },
        ));
        let bad_hex = check(health_check::HealthChecker::TcpHealthCheck(
            health_check::TcpHealthCheck {
                send: Some(health_check::Payload {
                    payload: Some(health_check::payload::Payload::Text("PING".into())),
                }),
                ..Default::default()
            },
        ));
        c.health_checks = vec![missing, timing, http_extras, custom, bad_hex];
        // The same port as the endpoint's changes nothing; another port or a Host does.
        let endpoints = &mut c.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints;
        for (e, hcc) in endpoints.iter_mut().zip([
            HealthCheckConfig {
                port_value: 8080,
                ..Default::default()
            },
            HealthCheckConfig {
                port_value: 9000,
                hostname: "web-2".into(),
                ..Default::default()
            },
        ]) {
            if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &mut e.host_identifier {
                ep.health_check_config = Some(hcc);
            }
        }
        let errs = cluster(&c, "c").unwrap_err();
        let hc = "c.health_checks";
        let ep = "c.load_assignment.endpoints[0].lb_endpoints[1].endpoint.health_check_config";
        let want = [
            format!("{hc}[0].timeout"),
            format!("{hc}[0].unhealthy_threshold"),
            format!("{hc}[1].interval_jitter_percent"),
            format!("{hc}[1].initial_jitter"),
            format!("{hc}[1].unhealthy_interval"),
            format!("{hc}[2].http_health_check.receive"),
            format!("{hc}[2].http_health_check.codec_client_type"),
            format!("{hc}[2].http_health_check.method"),
            format!("{hc}[2].http_health_check.expected_statuses[0]"),
            format!("{hc}[3].custom_health_check"),
            format!("{hc}[4].tcp_health_check.send.text"),
            format!("{ep}.port_value"),
            format!("{ep}.hostname"),
        ];
        assert_eq!(paths(&errs), want, "{errs:#?}");
    }

    #[test]
    fn outlier_detection_with_envoy_defaults() {
        let mut c = base();
        c.outlier_detection = Some(OutlierDetection::default());
        let got = cluster(&c, "c").unwrap();
        assert_eq!(got.outlier_detection, Some(model::OutlierDetection::default()));

        c.outlier_detection = Some(OutlierDetection {
            consecutive_gateway_failure: u32v(3),
            enforcing_consecutive_gateway_failure: u32v(100),
            // Istio's "off": a threshold of 0, which never trips in Envoy.
            consecutive_5xx: u32v(0),
            enforcing_consecutive_5xx: u32v(0),
            base_ejection_time: secs(600),
            max_ejection_percent: u32v(50),
            enforcing_success_rate: u32v(0),
            interval: secs(5),
            // Failure-percentage thresholds without enforcement eject nothing.
            failure_percentage_threshold: u32v(90),
            always_eject_one_host: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            ..Default::default()
        });
        let od = cluster(&c, "c").unwrap().outlier_detection.unwrap();
        assert_eq!(
            (od.consecutive_gateway_failure, od.enforcing_consecutive_gateway_failure),
            (3, 100)
        );
        assert_eq!(od.enforcing_consecutive_5xx, 0, "off");
        assert_eq!(od.consecutive_5xx, 5);
        assert_eq!(od.interval, Duration::from_secs(5));
        assert_eq!(
            (od.base_ejection_time, od.max_ejection_time),
            (Duration::from_secs(600), Duration::from_secs(600)),
            "an unset max_ejection_time is 300s or base_ejection_time, whichever is larger"
        );
        assert_eq!((od.max_ejection_percent, od.enforcing_success_rate), (50, 0));
        // Even 0 on a detector Envoy would trip once is off: no threshold of 0 reaches the model.
        c.outlier_detection = Some(OutlierDetection {
            consecutive_local_origin_failure: u32v(0),
            split_external_local_origin_errors: true,
            enforcing_success_rate: u32v(0),
            enforcing_local_origin_success_rate: u32v(0),
            ..Default::default()
        });
        let od = cluster(&c, "c").unwrap().outlier_detection.unwrap();
        assert_eq!(
            (
                od.consecutive_local_origin_failure,
                od.enforcing_consecutive_local_origin_failure
            ),
            (5, 0)
        );
        assert!(od.split_external_local_origin_errors);
    }

    #[test]
    fn what_outlier_detection_cannot_do_is_refused() {
        let mut c = base();
        c.health_checks = vec![check(http("/"))];
        c.outlier_detection = Some(OutlierDetection {
            base_ejection_time: secs(60),
            max_ejection_time: secs(30),
            max_ejection_percent: u32v(150),
            max_ejection_time_jitter: secs(1),
            enforcing_failure_percentage: u32v(100),
            split_external_local_origin_errors: true,
            detect_degraded_hosts: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            ..Default::default()
        });
        let errs = cluster(&c, "c").unwrap_err();
        let at = "c.outlier_detection";
        let want = [
            format!("{at}.max_ejection_percent"),
            format!("{at}.max_ejection_time"),
            format!("{at}.max_ejection_time_jitter"),
            at.to_string(),
            format!("{at}.split_external_local_origin_errors"),
            format!("{at}.successful_active_health_check_uneject_host"),
            format!("{at}.detect_degraded_hosts"),
        ];
        assert_eq!(paths(&errs), want, "{errs:#?}");
        // With active checks, ejections that outlast a passing check must be asked for.
        c.outlier_detection = Some(OutlierDetection {
            successful_active_health_check_uneject_host: Some(envoy_types::pb::google::protobuf::BoolValue {
                value: false,
            }),
            ..Default::default()
        });
        assert!(cluster(&c, "c").unwrap().outlier_detection.is_some());
    }

    #[test]
    fn the_locality_fixture_converts_with_its_health_check() {
        let text = include_str!("../tests/fixtures/envoy-bootstrap/locality-load-balancing-envoy.yaml");
        let b = crate::load::bootstrap_text(text, "locality-load-balancing-envoy.yaml").unwrap();
        let cfg = crate::bootstrap::bootstrap(&b).unwrap_or_else(|e| panic!("{e:#?}"));
        let hc = &cfg.clusters[0].health_checks;
        assert_eq!(hc.len(), 1);
        assert_eq!(
            (
                hc[0].interval,
                hc[0].timeout,
                hc[0].unhealthy_threshold,
                hc[0].healthy_threshold
            ),
            (Duration::from_secs(2), Duration::from_secs(3), 1, 1)
        );
        assert!(matches!(&hc[0].kind, model::HealthCheckKind::Http { path, host: None, .. } if path == "/"));
    }

    #[test]
    fn a_static_cluster_with_defaults() {
        let c = cluster(&base(), "clusters[0]").unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.discovery, model::DiscoveryType::Static);
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.lb_policy, model::LbPolicy::RoundRobin);
        assert_eq!(c.protocol, model::UpstreamProtocol::Http1);
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!((c.endpoints[1].host.as_str(), c.endpoints[1].port), ("10.0.0.2", 8080));
        assert_eq!(c.circuit_breakers, model::CircuitBreakers::default());
    }

    #[test]
    fn http2_least_request_localities_priorities_labels_and_health() {
        let mut c = base();
        c.lb_policy = cluster::LbPolicy::LeastRequest as i32;
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32,
        ));
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            Any {
                type_url: format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}"),
                value: opts.encode_to_vec(),
            },
        );
        let mut labelled = lb("web-v2.local", 80);
        labelled.load_balancing_weight = Some(UInt32Value { value: 7 });
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "version".to_string(),
            Value {
                kind: Some(ValueKind::StringValue("v2".into())),
            },
        );
        let mut meta = Metadata::default();
        meta.filter_metadata.insert("envoy.lb".into(), Struct { fields });
        labelled.metadata = Some(meta);
        let mut sick = lb("web-sick.local", 80);
        sick.health_status = HealthStatus::Unhealthy as i32;
        c.load_assignment.as_mut().unwrap().endpoints.push(LocalityLbEndpoints {
            locality: Some(Locality {
                region: "eu".into(),
                zone: "eu-1a".into(),
                ..Default::default()
            }),
            priority: 1,
            lb_endpoints: vec![labelled, sick],
            ..Default::default()
        });
        let got = cluster(&c, "clusters[0]").unwrap();
        assert_eq!(got.discovery, model::DiscoveryType::StrictDns);
        assert_eq!(got.protocol, model::UpstreamProtocol::Http2);
        assert!(matches!(
            got.lb_policy,
            model::LbPolicy::LeastRequest { choice_count: 2, .. }
        ));
        assert_eq!(got.endpoints.len(), 3, "the unhealthy endpoint is left out");
        let e = &got.endpoints[2];
        assert_eq!((e.host.as_str(), e.weight, e.priority), ("web-v2.local", 7, 1));
        assert_eq!(e.locality.as_ref().map(|l| l.zone.as_str()), Some("eu-1a"));
        assert_eq!(e.labels.get("version").map(String::as_str), Some("v2"));
    }

    #[test]
    fn what_cannot_be_honoured_is_listed_with_paths() {
        let mut logical = base();
        logical.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::LogicalDns as i32,
        ));
        assert_eq!(
            cluster(&logical, "c").unwrap().discovery,
            model::DiscoveryType::StrictDns
        );
        let mut c = base();
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32));
        c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
        c.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints[0].load_balancing_weight =
            Some(UInt32Value { value: 500 });
        c.typed_extension_protocol_options.insert(
            "x".into(),
            Any {
                type_url: "type.googleapis.com/some.Other".into(),
                value: vec![],
            },
        );
        let errs = cluster(&c, "clusters[4]").unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let want = [
            "clusters[4].lb_policy: CLUSTER_PROVIDED is not supported",
            "clusters[4].load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight: 500 is outside 1..=128",
            "clusters[4].typed_extension_protocol_options[\"x\"]: `some.Other` is not supported",
        ];
        for w in want {
            assert!(text.iter().any(|t| t.starts_with(w)), "missing {w:?} in {text:#?}");
        }
    }

    #[test]
    fn eds_clusters_name_their_service_and_must_follow_ads() {
        use envoy_types::pb::envoy::config::core::v3::{ApiConfigSource, ConfigSource, config_source};
        let mut c = base();
        c.load_assignment = None;
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32));
        assert_eq!(eds_service_name(&c), Some("web"));
        assert_eq!(cluster(&c, "c").unwrap().discovery, model::DiscoveryType::Eds);
        c.eds_cluster_config = Some(cluster::EdsClusterConfig {
            service_name: "outbound|80||web.default".into(),
            eds_config: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                    ApiConfigSource::default(),
                )),
                ..Default::default()
            }),
        });
        assert_eq!(eds_service_name(&c), Some("outbound|80||web.default"));
        let errs = cluster(&c, "c").unwrap_err();
        assert_eq!(errs[0].path, "c.eds_cluster_config.eds_config", "{errs:?}");
        assert_eq!(eds_service_name(&base()), None);
    }

    #[test]
    fn a_static_cluster_with_a_name_is_refused() {
        let mut c = base();
        c.load_assignment.as_mut().unwrap().endpoints[0]
            .lb_endpoints
            .push(lb("db.local", 5432));
        let errs = cluster(&c, "c").unwrap_err();
        assert!(errs[0].reason.contains("`db.local` is a name"), "{errs:?}");
    }
}

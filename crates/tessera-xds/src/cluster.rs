//! `envoy.config.cluster.v3.Cluster` and `envoy.config.endpoint.v3.ClusterLoadAssignment` into
//! [`tessera_model::Cluster`].

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, HealthStatus, Metadata, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
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
            Ok(other) => {
                p.add(
                    f("type"),
                    format!(
                        "{} clusters are not supported yet; use STATIC, STRICT_DNS or EDS",
                        other.as_str_name()
                    ),
                );
                model::DiscoveryType::Static
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
            let v =
                |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| w.as_ref().map_or(d, |w| w.value);
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
    if c.outlier_detection.is_some() {
        p.add(
            f("outlier_detection"),
            "outlier detection from xDS is not supported yet",
        );
    }
    if !c.health_checks.is_empty() {
        p.add(f("health_checks"), "health checks from xDS are not supported yet");
    }
    let mut endpoints = Vec::new();
    let mut overprovisioning_factor = 140;
    if let Some(cla) = &c.load_assignment {
        let (e, o) = load_assignment(cla, &f("load_assignment"), &mut p);
        endpoints = e;
        overprovisioning_factor = o;
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
        health_checks: Vec::new(),
        outlier_detection: None,
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
            let here = format!("{at}.endpoints[{li}].lb_endpoints[{ei}]");
            if matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
            ) {
                continue;
            }
            let endpoint = match &e.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
                Some(lb_endpoint::HostIdentifier::EndpointName(n)) => {
                    p.add(&here, format!("named endpoint `{n}` is not supported"));
                    continue;
                }
                None => {
                    p.add(&here, "an endpoint needs an address");
                    continue;
                }
            };
            let Some((host, port)) = endpoint
                .address
                .as_ref()
                .and_then(|a| socket(a, &format!("{here}.endpoint.address"), p))
            else {
                continue;
            };
            let weight = e.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if !(1..=128).contains(&weight) {
                p.add(
                    format!("{here}.load_balancing_weight"),
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
fn socket(a: &Address, at: &str, p: &mut Problems) -> Option<(String, u16)> {
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            if s.protocol != socket_address::Protocol::Tcp as i32 {
                p.add(format!("{at}.socket_address.protocol"), "only TCP is supported");
                return None;
            }
            match &s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(port)) => match u16::try_from(*port) {
                    Ok(port) if port != 0 => Some((s.address.clone(), port)),
                    _ => {
                        p.add(
                            format!("{at}.socket_address.port_value"),
                            format!("{port} is not a port"),
                        );
                        None
                    }
                },
                Some(socket_address::PortSpecifier::NamedPort(n)) => {
                    p.add(
                        format!("{at}.socket_address.named_port"),
                        format!("named port `{n}` is not supported"),
                    );
                    None
                }
                None => {
                    p.add(format!("{at}.socket_address"), "a port_value is required");
                    None
                }
            }
        }
        _ => {
            p.add(
                at,
                "only socket addresses are supported (no pipes or internal addresses)",
            );
            None
        }
    }
}

/// String values of the `envoy.lb` filter metadata, the labels subset load balancing matches.
fn lb_labels(m: Option<&Metadata>) -> BTreeMap<String, String> {
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
    use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, Struct, UInt32Value, Value};

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
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        ));
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
            "clusters[4].type: ORIGINAL_DST clusters are not supported yet",
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

//! The service model into Envoy resources every sidecar gets (no per-node scoping yet):
//! - per service port, an EDS cluster `outbound|<port>||<host>` (Istio's name) and its
//!   ClusterLoadAssignment (healthy instances, weights, `envoy.lb` labels, localities);
//! - one HTTP listener (`outbound-http`, on the configured address) whose routes (RDS
//!   `outbound-http`) pick the cluster by Host: `<host>`, `<name>.<namespace>`, with or without
//!   `:<port>` (the first HTTP port of a service also takes the bare names).
//!
//! TCP, Bolt and Dubbo ports get their clusters and endpoints but no listener yet.
//!
//! With Istio configuration ([`translate_with`], see [`crate::istio`]): ServiceEntry hosts become
//! services of their own (EDS for STATIC, STRICT_DNS for DNS); DestinationRule policies set the
//! clusters' load balancing, circuit breakers, outlier detection and TLS, and each subset gets a
//! cluster `outbound|<port>|<subset>|<host>` with the endpoints its labels select; a
//! VirtualService's HTTP routes replace the default route of its hosts' virtual hosts.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Http2ProtocolOptions, Locality, Metadata, SocketAddress,
    address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, Struct, UInt32Value, Value, value};
use tessera_xds::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

use crate::model::{Protocol, Snapshot};

/// Route configuration and listener name of the outbound HTTP listener.
pub const OUTBOUND_HTTP: &str = "outbound-http";

/// What Pilot generates for sidecars.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    /// Where the outbound HTTP listener listens.
    pub outbound_http: SocketAddr,
}

/// The resources of every type, ready for the ADS server.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resources {
    /// Clusters.
    pub clusters: Vec<Any>,
    /// Cluster load assignments.
    pub endpoints: Vec<Any>,
    /// Listeners.
    pub listeners: Vec<Any>,
    /// Route configurations.
    pub routes: Vec<Any>,
}

impl Resources {
    /// `(type URL, resources)` for `AdsServer::set_all`.
    pub fn by_type(self) -> Vec<(&'static str, Vec<Any>)> {
        vec![
            (CLUSTER, self.clusters),
            (ENDPOINT, self.endpoints),
            (LISTENER, self.listeners),
            (ROUTE, self.routes),
        ]
    }
}

fn any<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: prost::Message::encode_to_vec(m),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn socket(ip: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Istio's outbound cluster name.
pub fn cluster_name(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

/// What a cluster is built from: a registry service or one host of a ServiceEntry.
struct Target {
    /// The host name clusters are named after.
    host: String,
    /// `<name>.<namespace>` for registry services.
    short: Option<String>,
    ports: Vec<crate::model::Port>,
    endpoints: Vec<Ep>,
    /// Endpoints are names the sidecar resolves (STRICT_DNS) rather than EDS addresses.
    dns: bool,
}

/// An endpoint: an IP address (or a DNS name), with its port per service port name.
struct Ep {
    address: String,
    ports: BTreeMap<String, u16>,
    labels: BTreeMap<String, String>,
    weight: u32,
    locality: Option<(String, String, String)>,
}

fn targets(s: &Snapshot, istio: &crate::istio::Config, problems: &mut Vec<crate::Problem>) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for (key, svc) in &s.services {
        let instances = s.instances.get(key).map(|v| v.as_slice()).unwrap_or(&[]);
        out.push(Target {
            host: svc.hostname(),
            short: Some(format!("{}.{}", svc.name, svc.namespace)),
            ports: svc.ports.clone(),
            endpoints: instances
                .iter()
                .filter(|i| i.healthy)
                .map(|i| Ep {
                    address: i.address.to_string(),
                    ports: i.ports.clone(),
                    labels: i.labels.clone(),
                    weight: i.weight,
                    locality: i.locality.clone(),
                })
                .collect(),
            dns: false,
        });
    }
    for se in istio.service_entries() {
        for (i, host) in se.hosts.iter().enumerate() {
            if out.iter().any(|t| &t.host == host) {
                problems.push(se.meta.problem(
                    &format!("spec.hosts[{i}]"),
                    format!("`{host}` is already a service (from a registry or an earlier ServiceEntry); this entry's definition of it is ignored"),
                ));
                continue;
            }
            let ports: Vec<crate::model::Port> = se
                .ports
                .iter()
                .map(|p| crate::model::Port {
                    name: p.name.clone(),
                    port: p.number,
                    protocol: p.protocol,
                })
                .collect();
            let endpoints = se
                .endpoints
                .iter()
                .map(|e| {
                    let mut ports = e.ports.clone();
                    for p in &se.ports {
                        ports.entry(p.name.clone()).or_insert(p.target_port.unwrap_or(p.number));
                    }
                    Ep {
                        address: e.address.clone(),
                        ports,
                        labels: e.labels.clone(),
                        weight: e.weight,
                        locality: e.locality.clone(),
                    }
                })
                .collect();
            out.push(Target {
                host: host.clone(),
                short: None,
                ports,
                endpoints,
                dns: se.dns,
            });
        }
    }
    out
}

fn lb_metadata(labels: &BTreeMap<String, String>) -> Option<Metadata> {
    let labels: BTreeMap<String, Value> = labels
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Value {
                    kind: Some(value::Kind::StringValue(v.clone())),
                },
            )
        })
        .collect();
    (!labels.is_empty()).then(|| Metadata {
        filter_metadata: [(
            "envoy.lb".to_string(),
            Struct {
                fields: labels.into_iter().collect(),
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    })
}

fn load_assignment<'a>(name: &str, port: &str, eps: impl Iterator<Item = &'a Ep>) -> ClusterLoadAssignment {
    // Endpoints, grouped by locality.
    let mut groups: BTreeMap<Option<(String, String, String)>, Vec<LbEndpoint>> = BTreeMap::new();
    for e in eps {
        let Some(p) = e.ports.get(port) else { continue };
        groups.entry(e.locality.clone()).or_default().push(LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_named(&e.address, *p)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            metadata: lb_metadata(&e.labels),
            ..Default::default()
        });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: groups
            .into_iter()
            .map(|(loc, lb_endpoints)| {
                // A locality and its weight (the sum of its endpoints'), as Istio sends them:
                // gRPC's xDS client ignores localities without a weight.
                let weight: u32 = lb_endpoints
                    .iter()
                    .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
                    .sum();
                LocalityLbEndpoints {
                    locality: Some(
                        loc.map(|(region, zone, sub_zone)| Locality { region, zone, sub_zone })
                            .unwrap_or_default(),
                    ),
                    load_balancing_weight: Some(UInt32Value { value: weight.max(1) }),
                    lb_endpoints,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn socket_named(address: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn base_cluster(name: &str, t: &Target, port: &crate::model::Port) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(PbDuration { seconds: 1, nanos: 0 }),
        ..Default::default()
    };
    if t.dns {
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32,
        ));
    } else {
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32));
        c.eds_cluster_config = Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        });
    }
    if matches!(port.protocol, Protocol::Http2 | Protocol::Grpc) {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            any(&opts),
        );
    }
    c
}

/// Istio's subset cluster name.
pub fn subset_cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Translates a snapshot.
pub fn translate(s: &Snapshot, sidecar: &SidecarSettings) -> Resources {
    translate_with(s, &crate::istio::Config::default(), sidecar).0
}

/// Translates a snapshot with Istio traffic configuration; the problems are the references the
/// configuration makes to what does not exist (a VirtualService with one is left out whole).
pub fn translate_with(
    s: &Snapshot,
    istio: &crate::istio::Config,
    sidecar: &SidecarSettings,
) -> (Resources, Vec<crate::Problem>) {
    let mut problems = Vec::new();
    let targets = targets(s, istio, &mut problems);
    let mut out = Resources::default();
    for t in &targets {
        let dr = istio.rule_for(&t.host);
        for port in &t.ports {
            let mut subsets: Vec<(Option<&str>, BTreeMap<String, String>)> = vec![(None, BTreeMap::new())];
            if let Some(dr) = dr {
                subsets.extend(dr.subsets.iter().map(|s| (Some(s.name.as_str()), s.labels.clone())));
            }
            for (subset, labels) in subsets {
                let name = match subset {
                    None => cluster_name(port.port, &t.host),
                    Some(n) => subset_cluster_name(port.port, n, &t.host),
                };
                let mut c = base_cluster(&name, t, port);
                crate::istio::xds::apply(&mut c, &crate::istio::xds::effective(dr, subset, port.port), &t.host);
                let eps = t
                    .endpoints
                    .iter()
                    .filter(|e| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)));
                let cla = load_assignment(&name, &port.name, eps);
                if t.dns {
                    c.load_assignment = Some(cla);
                } else {
                    out.endpoints.push(any(&cla));
                }
                out.clusters.push(any(&c));
            }
        }
    }
    for dr in istio.destination_rules() {
        if !targets.iter().any(|t| crate::istio::host_matches(&dr.host, &t.host)) {
            problems.push(dr.meta.problem(
                "spec.host",
                format!(
                    "`{}` is not a known service (from a registry or a ServiceEntry); the rule applies to nothing",
                    dr.host
                ),
            ));
        }
    }
    let routes = crate::istio::routes::virtual_hosts(istio, &targets_view(&targets), &mut problems);
    let mut vhosts = Vec::new();
    for t in &targets {
        let mut first_http = true;
        for port in t.ports.iter().filter(|p| p.protocol.is_http()) {
            let host = &t.host;
            let mut domains = vec![format!("{host}:{}", port.port)];
            if let Some(short) = &t.short {
                domains.push(format!("{short}:{}", port.port));
            }
            if first_http {
                let mut bare = vec![host.clone()];
                bare.extend(t.short.clone());
                domains.splice(0..0, bare);
                first_http = false;
            }
            let routes = routes.get(&(host.clone(), port.port)).cloned().unwrap_or_else(|| {
                vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster_name(port.port, host))),
                        ..Default::default()
                    })),
                    ..Default::default()
                }]
            });
            vhosts.push(VirtualHost {
                name: format!("{host}:{}", port.port),
                domains,
                routes,
                ..Default::default()
            });
        }
    }
    out.routes.push(any(&RouteConfiguration {
        name: OUTBOUND_HTTP.into(),
        virtual_hosts: vhosts,
        ..Default::default()
    }));
    let hcm = HttpConnectionManager {
        stat_prefix: OUTBOUND_HTTP.into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: OUTBOUND_HTTP.into(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    out.listeners.push(any(&Listener {
        name: OUTBOUND_HTTP.into(),
        address: Some(socket(sidecar.outbound_http.ip(), sidecar.outbound_http.port())),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }));
    (out, problems)
}

fn targets_view(ts: &[Target]) -> Vec<crate::istio::routes::Host> {
    ts.iter()
        .map(|t| crate::istio::routes::Host {
            host: t.host.clone(),
            ports: t.ports.iter().map(|p| (p.port, p.protocol.is_http())).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn services_become_clusters_endpoints_and_host_routes() {
        let snap = crate::file::parse(
            "services:\n- name: reviews\n  ports: [{ name: http, port: 9080 }, { name: grpc, port: 9090, protocol: grpc }]\n  instances:\n  - { address: 10.0.0.7, ports: { http: 19080, grpc: 19090 }, labels: { version: v1 }, locality: eu/eu-1a }\n  - { address: 10.0.0.8, healthy: false }\n",
            "a.yaml",
            "file:a.yaml",
        )
        .unwrap();
        let r = translate(
            &snap,
            &SidecarSettings {
                outbound_http: "127.0.0.1:15001".parse().unwrap(),
            },
        );
        assert_eq!(r.clusters.len(), 2);
        let grpc = Cluster::decode(r.clusters[1].value.as_slice()).unwrap();
        assert_eq!(grpc.name, "outbound|9090||reviews.default.svc.cluster.local");
        assert!(
            grpc.typed_extension_protocol_options
                .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        );
        let cla = ClusterLoadAssignment::decode(r.endpoints[0].value.as_slice()).unwrap();
        assert_eq!(cla.endpoints.len(), 1, "the unhealthy instance is left out");
        assert_eq!(cla.endpoints[0].locality.as_ref().unwrap().zone, "eu-1a");
        // Everything converts in the sidecar's own converter.
        for c in &r.clusters {
            let c = Cluster::decode(c.value.as_slice()).unwrap();
            tessera_xds::cluster::cluster(&c, "c").unwrap();
        }
        let rc = RouteConfiguration::decode(r.routes[0].value.as_slice()).unwrap();
        assert_eq!(rc.virtual_hosts.len(), 2);
        assert_eq!(
            rc.virtual_hosts[0].domains,
            [
                "reviews.default.svc.cluster.local",
                "reviews.default",
                "reviews.default.svc.cluster.local:9080",
                "reviews.default:9080"
            ]
        );
        tessera_xds::route::route_configuration(&rc, "r").unwrap();
        let l = Listener::decode(r.listeners[0].value.as_slice()).unwrap();
        tessera_xds::listener::listener_with_rds(&l, "l", Some(&|_| None)).unwrap();
    }
}

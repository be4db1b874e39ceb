//! The service model into Envoy resources every sidecar gets (no per-node scoping yet):
//! - per service port, an EDS cluster `outbound|<port>||<host>` (Istio's name) and its
//!   ClusterLoadAssignment (healthy instances, weights, `envoy.lb` labels, localities);
//! - one HTTP listener (`outbound-http`, on the configured address) whose routes (RDS
//!   `outbound-http`) pick the cluster by Host: `<host>`, `<name>.<namespace>`, with or without
//!   `:<port>` (the first HTTP port of a service also takes the bare names).
//!
//! TCP, Bolt and Dubbo ports get their clusters and endpoints but no listener yet.

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

/// Translates a snapshot.
pub fn translate(s: &Snapshot, sidecar: &SidecarSettings) -> Resources {
    let mut out = Resources::default();
    let mut vhosts = Vec::new();
    for (key, svc) in &s.services {
        let host = svc.hostname();
        let short = format!("{}.{}", svc.name, svc.namespace);
        let instances = s.instances.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let mut first_http = true;
        for port in &svc.ports {
            let name = cluster_name(port.port, &host);
            let mut c = Cluster {
                name: name.clone(),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(cluster::EdsClusterConfig {
                    eds_config: Some(ads()),
                    service_name: String::new(),
                }),
                connect_timeout: Some(PbDuration { seconds: 1, nanos: 0 }),
                ..Default::default()
            };
            if matches!(port.protocol, Protocol::Http2 | Protocol::Grpc) {
                let opts = HttpProtocolOptions {
                    upstream_protocol_options: Some(
                        http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                            http_protocol_options::ExplicitHttpConfig {
                                protocol_config: Some(
                                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                        Http2ProtocolOptions::default(),
                                    ),
                                ),
                            },
                        ),
                    ),
                    ..Default::default()
                };
                c.typed_extension_protocol_options.insert(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                    any(&opts),
                );
            }
            out.clusters.push(any(&c));
            // Endpoints, grouped by locality.
            let mut groups: BTreeMap<Option<(String, String, String)>, Vec<LbEndpoint>> = BTreeMap::new();
            for i in instances.iter().filter(|i| i.healthy) {
                let Some(p) = i.ports.get(&port.name) else { continue };
                let labels: BTreeMap<String, Value> = i
                    .labels
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
                let metadata = (!labels.is_empty()).then(|| Metadata {
                    filter_metadata: [(
                        "envoy.lb".to_string(),
                        Struct {
                            fields: labels.into_iter().collect(),
                        },
                    )]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                });
                groups.entry(i.locality.clone()).or_default().push(LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(i.address, *p)),
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: i.weight }),
                    metadata,
                    ..Default::default()
                });
            }
            let cla = ClusterLoadAssignment {
                cluster_name: name.clone(),
                endpoints: groups
                    .into_iter()
                    .map(|(loc, lb_endpoints)| LocalityLbEndpoints {
                        locality: loc.map(|(region, zone, sub_zone)| Locality { region, zone, sub_zone }),
                        lb_endpoints,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            out.endpoints.push(any(&cla));
            if port.protocol.is_http() {
                let mut domains = vec![format!("{host}:{}", port.port), format!("{short}:{}", port.port)];
                if first_http {
                    domains.insert(0, host.clone());
                    domains.insert(1, short.clone());
                    first_http = false;
                }
                vhosts.push(VirtualHost {
                    name: format!("{host}:{}", port.port),
                    domains,
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name.clone())),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                });
            }
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
    out
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

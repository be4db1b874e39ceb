//! Listeners that depend on the node or on RPC protocols, added to what `translate` gives every
//! sidecar of a group:
//! - **inbound** (see [`crate::scope`]): for each `LISTEN=APP` a sidecar declares, a listener
//!   `inbound|<port>` on LISTEN and a static cluster `inbound|<port>||` to APP. It speaks the
//!   protocol of the service port whose instance is registered at LISTEN: HTTP (an HTTP
//!   connection manager, so routes, policy and metrics apply), Dubbo (a `dubbo_proxy`, so Dubbo
//!   requests are decoded and multiplexed), and TCP or Bolt (a TCP proxy). Nothing registered at
//!   LISTEN: a TCP proxy.
//! - **outbound Dubbo** (`sidecar.outbound_dubbo` in pilot.yaml): one listener whose
//!   `dubbo_proxy` routes each Dubbo interface to its service's cluster. A service's interface
//!   is its label `interface` (the ZooKeeper registry sets it), else its name.
//!
//! Bolt has no Envoy v3 proxy message, so outbound Bolt routing by service is not generated
//! (Bolt ports get clusters and endpoints; use a static `rpc` chain for them).

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::dubbo_proxy::v3 as dubbo;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};

use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;

use crate::model::{Instance, Protocol, Service, Snapshot};
use crate::translate::{Resources, cluster_name};

/// Listener name of the outbound Dubbo listener.
pub const OUTBOUND_DUBBO: &str = "outbound-dubbo";

fn any<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: prost::Message::encode_to_vec(m),
    }
}

fn socket(a: SocketAddr) -> envoy_types::pb::envoy::config::core::v3::Address {
    use envoy_types::pb::envoy::config::core::v3::{SocketAddress, address, socket_address};
    envoy_types::pb::envoy::config::core::v3::Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    }
}

/// The RBAC filters (Istio AuthorizationPolicy, DENY first) for a workload with these labels in
/// this namespace.
pub type RbacFor<'a> = dyn Fn(&std::collections::BTreeMap<String, String>, &str) -> Vec<Rbac> + 'a;

/// What is registered at an address: the protocol of the service port whose instance listens
/// there, the service, and the instance.
pub fn registered_at(s: &Snapshot, at: SocketAddr) -> Option<(Protocol, &Service, &Instance)> {
    for (key, insts) in &s.instances {
        let Some(svc) = s.services.get(key) else { continue };
        for i in insts.iter().filter(|i| i.address == at.ip()) {
            for port in &svc.ports {
                if i.ports.get(&port.name) == Some(&at.port()) {
                    return Some((port.protocol, svc, i));
                }
            }
        }
    }
    None
}

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
        ..Default::default()
    }
}

/// An HTTP connection manager named `name` whose inline routes send every path under `prefix`
/// (any host) to `cluster`, through `http_filters`.
fn single_route_hcm(name: &str, prefix: &str, cluster: &str, http_filters: Vec<HttpFilter>) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: name.into(),
                virtual_hosts: vec![VirtualHost {
                    name: name.into(),
                    domains: vec!["*".into()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.into())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters,
        ..Default::default()
    }
}

fn filter_of<M: prost::Name>(name: &str, m: &M) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(m))),
    }
}

fn dubbo_filter(stat_prefix: &str, route_config: Vec<dubbo::RouteConfiguration>) -> Filter {
    #[allow(deprecated)]
    let d = dubbo::DubboProxy {
        stat_prefix: stat_prefix.into(),
        protocol_type: dubbo::ProtocolType::Dubbo as i32,
        serialization_type: dubbo::SerializationType::Hessian2 as i32,
        route_config,
        ..Default::default()
    };
    filter_of("envoy.filters.network.dubbo_proxy", &d)
}

fn dubbo_route(name: &str, interface: &str, cluster: &str) -> dubbo::RouteConfiguration {
    dubbo::RouteConfiguration {
        name: name.into(),
        interface: interface.into(),
        routes: vec![dubbo::Route {
            r#match: Some(dubbo::RouteMatch::default()),
            route: Some(dubbo::RouteAction {
                cluster_specifier: Some(dubbo::route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// Adds the inbound listeners and clusters of `inbound` (the group's `LISTEN=APP` pairs); an HTTP
/// one carries the RBAC filters `rbac` gives for the workload registered at LISTEN.
pub fn inbound(out: &mut Resources, s: &Snapshot, inbound: &[(SocketAddr, SocketAddr)], rbac: &RbacFor<'_>) {
    for &(listen, app) in inbound {
        let name = format!("inbound|{}", listen.port());
        let cluster = format!("inbound|{}||", listen.port());
        out.clusters.push(any(&Cluster {
            name: cluster.clone(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            )),
            connect_timeout: Some(PbDuration { seconds: 1, nanos: 0 }),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: cluster.clone(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(app)),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }));
        let at = registered_at(s, listen);
        let f = match at {
            Some((p, svc, inst)) if p.is_http() => {
                let mut http_filters: Vec<HttpFilter> = rbac(&inst.labels, &svc.namespace)
                    .iter()
                    .map(|r| HttpFilter {
                        name: "envoy.filters.http.rbac".into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(any(r))),
                        ..Default::default()
                    })
                    .collect();
                http_filters.push(router());
                let hcm = single_route_hcm(&name, "/", &cluster, http_filters);
                filter_of("envoy.filters.network.http_connection_manager", &hcm)
            }
            Some((Protocol::Dubbo, _, _)) => dubbo_filter(&name, vec![dubbo_route(&name, "*", &cluster)]),
            _ => filter_of(
                "envoy.filters.network.tcp_proxy",
                &TcpProxy {
                    stat_prefix: name.clone(),
                    cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.clone())),
                    ..Default::default()
                },
            ),
        };
        out.listeners.push(any(&Listener {
            name,
            address: Some(socket(listen)),
            filter_chains: vec![FilterChain {
                filters: vec![f],
                ..Default::default()
            }],
            ..Default::default()
        }));
    }
}

/// Proxyless gRPC (`xds:///host:port`): per HTTP, HTTP/2 or gRPC service port, an API listener
/// named `<host>:<port>` and `<name>.<ns>:<port>` whose inline routes send everything to the
/// port's cluster.
pub fn grpc_listeners(s: &Snapshot) -> Vec<Any> {
    use envoy_types::pb::envoy::config::listener::v3::ApiListener;
    let mut out = Vec::new();
    for svc in s.services.values() {
        for port in svc.ports.iter().filter(|p| p.protocol.is_http()) {
            let cluster = cluster_name(port.port, &svc.hostname());
            for name in [
                format!("{}:{}", svc.hostname(), port.port),
                format!("{}.{}:{}", svc.name, svc.namespace, port.port),
            ] {
                let hcm = single_route_hcm(&name, "", &cluster, vec![router()]);
                out.push(any(&Listener {
                    name,
                    api_listener: Some(ApiListener {
                        api_listener: Some(any(&hcm)),
                    }),
                    ..Default::default()
                }));
            }
        }
    }
    out
}

/// Adds the outbound Dubbo listener on `at`, routing each visible Dubbo service by interface.
pub fn outbound_dubbo(out: &mut Resources, s: &Snapshot, at: SocketAddr) {
    let mut routes = Vec::new();
    for svc in s.services.values() {
        for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Dubbo) {
            let interface = svc.labels.get("interface").cloned().unwrap_or_else(|| svc.name.clone());
            let cluster = cluster_name(port.port, &svc.hostname());
            routes.push(dubbo_route(
                &format!("{}:{}", svc.hostname(), port.port),
                &interface,
                &cluster,
            ));
        }
    }
    out.listeners.push(any(&Listener {
        name: OUTBOUND_DUBBO.into(),
        address: Some(socket(at)),
        filter_chains: vec![FilterChain {
            filters: vec![dubbo_filter(OUTBOUND_DUBBO, routes)],
            ..Default::default()
        }],
        ..Default::default()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn inbound_and_dubbo_listeners_convert_in_the_sidecar() {
        let snap = crate::file::parse(
            "services:\n- name: web\n  ports: [{ name: http, port: 80 }]\n  instances: [{ address: 127.0.0.1, port: 16001 }]\n- name: greeter\n  labels: { interface: com.example.Greeter }\n  ports: [{ name: dubbo, port: 20880, protocol: dubbo }]\n  instances: [{ address: 127.0.0.1, port: 16002 }]\n",
            "s.yaml",
            "file:s.yaml",
        )
        .unwrap();
        let mut r = Resources::default();
        let pairs = [
            ("127.0.0.1:16001".parse().unwrap(), "127.0.0.1:18080".parse().unwrap()),
            ("127.0.0.1:16002".parse().unwrap(), "127.0.0.1:18081".parse().unwrap()),
            ("127.0.0.1:16003".parse().unwrap(), "127.0.0.1:18082".parse().unwrap()),
        ];
        inbound(&mut r, &snap, &pairs, &|_, _| Vec::new());
        outbound_dubbo(&mut r, &snap, "127.0.0.1:20880".parse().unwrap());
        assert_eq!(r.clusters.len(), 3);
        for c in &r.clusters {
            tessera_xds::cluster::cluster(&Cluster::decode(c.value.as_slice()).unwrap(), "c").unwrap();
        }
        let mut kinds = Vec::new();
        for l in &r.listeners {
            let l = Listener::decode(l.value.as_slice()).unwrap();
            kinds.push(l.filter_chains[0].filters[0].name.clone());
            tessera_xds::listener::listener_with_rds(&l, "l", Some(&|_| None)).unwrap();
        }
        assert_eq!(
            kinds,
            [
                "envoy.filters.network.http_connection_manager",
                "envoy.filters.network.dubbo_proxy",
                "envoy.filters.network.tcp_proxy",
                "envoy.filters.network.dubbo_proxy"
            ]
        );
        let l = Listener::decode(r.listeners[3].value.as_slice()).unwrap();
        let Some(filter::ConfigType::TypedConfig(a)) = &l.filter_chains[0].filters[0].config_type else {
            panic!("typed config")
        };
        #[allow(deprecated)]
        let routes = dubbo::DubboProxy::decode(a.value.as_slice()).unwrap().route_config;
        assert_eq!(routes[0].interface, "com.example.Greeter");
    }
}

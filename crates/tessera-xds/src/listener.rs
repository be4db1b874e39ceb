//! `envoy.config.listener.v3.Listener` into [`tessera_model::Listener`]: filter chains and their
//! match, the HTTP connection manager (inline routes) and the TCP proxy.
//!
//! HTTP filters: `router` is required and must be last; filters Istio adds that change nothing a
//! Tessera sidecar does on its own (metadata exchange, Istio's stats, ALPN override, gRPC stats)
//! are accepted as documented no-ops; any other filter is refused unless it is `is_optional`,
//! as Envoy does with filters it does not know.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Address, address, socket_address};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tessera_model as model;

use crate::{Problems, Unsupported, duration};

const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";

/// HTTP filters accepted and not run: what they do is either done by Tessera itself or only
/// feeds Istio's telemetry, which Tessera's Report replaces. `cors` acts only through a CORS policy
/// on a virtual host or route, and those are refused with their paths, so the bare filter Istio
/// puts in every connection manager changes nothing.
pub const NO_OP_HTTP_FILTERS: &[&str] = &[
    "istio.metadata_exchange",
    "istio.stats",
    "istio.alpn",
    "envoy.filters.http.grpc_stats",
    "envoy.filters.http.cors",
];

/// Network filters accepted and not run, for the same reason: Istio's peer metadata exchange and
/// TCP stats, which Tessera's Report replaces.
pub const NO_OP_NETWORK_FILTERS: &[&str] = &[
    "istio.metadata_exchange",
    "istio.stats",
    "envoy.filters.network.metadata_exchange",
];

/// The type name of an `Any` (`type.googleapis.com/a.b.C` → `a.b.C`).
pub(crate) fn type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or("")
}

/// Route configurations an HTTP connection manager names through RDS: `Some(table)` once RDS
/// delivered it; `None` while it has not (the listener then answers 404, as Envoy does when a
/// route configuration never arrives).
pub type RdsLookup<'a> = &'a dyn Fn(&str) -> Option<model::RouteConfig>;

/// Converts a listener with inline routes (a bootstrap's static listener); `at` prefixes
/// problem paths.
pub fn listener(l: &Listener, at: &str) -> Result<model::Listener, Vec<Unsupported>> {
    listener_with_rds(l, at, None)
}

/// Converts a listener whose HTTP connection managers may take routes from RDS through `rds`.
pub fn listener_with_rds(
    l: &Listener,
    at: &str,
    rds: Option<RdsLookup<'_>>,
) -> Result<model::Listener, Vec<Unsupported>> {
    let mut p = Problems::default();
    let address = l
        .address
        .as_ref()
        .and_then(|a| socket_addr(a, &format!("{at}.address"), &mut p))
        .unwrap_or_else(|| {
            if l.address.is_none() {
                p.add(format!("{at}.address"), "a listener needs an address");
            }
            SocketAddr::from(([0, 0, 0, 0], 0))
        });
    // Envoy's deprecated listener field and the `original_dst` listener filter say the same.
    #[allow(deprecated)]
    let mut use_original_dst = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    for (i, f) in l.listener_filters.iter().enumerate() {
        match f.name.as_str() {
            // Tessera inspects the ClientHello and the first bytes itself when a chain matches on
            // SNI, ALPN or transport protocol.
            "envoy.filters.listener.tls_inspector" | "envoy.filters.listener.http_inspector" => {}
            "envoy.filters.listener.original_dst" => use_original_dst = true,
            other => p.add(
                format!("{at}.listener_filters[{i}]"),
                format!("listener filter `{other}` is not supported"),
            ),
        }
    }
    if l.default_filter_chain.is_some() {
        p.add(
            format!("{at}.default_filter_chain"),
            "default_filter_chain is not supported yet",
        );
    }
    let mut chains = Vec::with_capacity(l.filter_chains.len());
    for (i, c) in l.filter_chains.iter().enumerate() {
        if let Some(c) = chain(c, i, rds, &format!("{at}.filter_chains[{i}]"), &mut p) {
            chains.push(c);
        }
    }
    if l.filter_chains.is_empty() {
        p.add(
            format!("{at}.filter_chains"),
            "a listener needs at least one filter chain",
        );
    }
    p.finish(model::Listener {
        name: l.name.clone(),
        address,
        listener_filters_timeout: l
            .listener_filters_timeout
            .as_ref()
            .and_then(duration)
            .unwrap_or(Duration::from_secs(15)),
        continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
        use_original_dst,
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|b| b.value),
        filter_chains: chains,
    })
}

/// The route configurations a listener's HTTP connection managers take from RDS, in order.
pub fn rds_names(l: &Listener) -> Vec<String> {
    let mut out = Vec::new();
    for c in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &c.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                continue;
            };
            if type_name(any) != HCM {
                continue;
            }
            if let Ok(h) = HttpConnectionManager::decode(any.value.as_slice())
                && let Some(http_connection_manager::RouteSpecifier::Rds(r)) = h.route_specifier
                && !out.contains(&r.route_config_name)
            {
                out.push(r.route_config_name);
            }
        }
    }
    out
}

pub(crate) fn socket_addr(a: &Address, at: &str, p: &mut Problems) -> Option<SocketAddr> {
    let Some(address::Address::SocketAddress(s)) = &a.address else {
        p.add(at, "only socket addresses are supported");
        return None;
    };
    let port = match s.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(v)) => u16::try_from(v).ok(),
        _ => None,
    };
    let Some(port) = port else {
        p.add(
            format!("{at}.socket_address.port_value"),
            "a port from 0 to 65535 is required",
        );
        return None;
    };
    match s.address.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, port)),
        Err(_) => {
            p.add(
                format!("{at}.socket_address.address"),
                format!("`{}` is not an IP address", s.address),
            );
            None
        }
    }
}

fn chain(
    c: &FilterChain,
    index: usize,
    rds: Option<RdsLookup<'_>>,
    at: &str,
    p: &mut Problems,
) -> Option<model::FilterChain> {
    let mut m = model::FilterChainMatch::default();
    if let Some(fm) = &c.filter_chain_match {
        let f = |x: &str| format!("{at}.filter_chain_match.{x}");
        m.destination_port = fm.destination_port.as_ref().and_then(|v| u16::try_from(v.value).ok());
        m.server_names = fm.server_names.clone();
        m.transport_protocol = (!fm.transport_protocol.is_empty()).then(|| fm.transport_protocol.clone());
        m.application_protocols = fm.application_protocols.clone();
        for (i, r) in fm.source_prefix_ranges.iter().enumerate() {
            let len = r
                .prefix_len
                .as_ref()
                .map_or(if r.address_prefix.contains(':') { 128 } else { 32 }, |l| l.value);
            match model::Cidr::parse(&format!("{}/{len}", r.address_prefix)) {
                Some(cidr) => m.source_prefix_ranges.push(cidr),
                None => p.add(
                    f(&format!("source_prefix_ranges[{i}]")),
                    format!("`{}/{len}` is not a CIDR range", r.address_prefix),
                ),
            }
        }
        if !fm.prefix_ranges.is_empty() {
            p.add(
                f("prefix_ranges"),
                "matching on the destination IP is not supported yet",
            );
        }
        if !fm.source_ports.is_empty() {
            p.add(f("source_ports"), "matching on the source port is not supported");
        }
        if fm.source_type != 0 {
            p.add(f("source_type"), "matching on the source type is not supported");
        }
    }
    let tls = c
        .transport_socket
        .as_ref()
        .and_then(|ts| crate::tls::downstream(ts, &format!("{at}.transport_socket"), p));
    let name = if c.name.is_empty() {
        format!("chain{index}")
    } else {
        c.name.clone()
    };
    let mut network = None;
    for (i, f) in c.filters.iter().enumerate() {
        let here = format!("{at}.filters[{i}]");
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            p.add(
                &here,
                format!(
                    "filter `{}` needs a typed_config (config discovery is not supported)",
                    f.name
                ),
            );
            continue;
        };
        let any = match crate::typed_struct::unwrap(any) {
            Ok(a) => a,
            Err(e) => {
                p.add(format!("{here}.typed_config"), e);
                continue;
            }
        };
        // Istio's TCP telemetry filters ahead of the TCP proxy: Report does their work.
        if NO_OP_NETWORK_FILTERS.contains(&f.name.as_str()) {
            continue;
        }
        if network.is_some() {
            p.add(&here, "only one terminal network filter per chain is supported");
            continue;
        }
        network = match type_name(&any) {
            HCM => match HttpConnectionManager::decode(any.value.as_slice()) {
                Ok(h) => {
                    hcm(&h, rds, &format!("{here}.typed_config"), p).map(|h| model::NetworkFilter::Http(Box::new(h)))
                }
                Err(e) => {
                    p.add(&here, format!("malformed HttpConnectionManager: {e}"));
                    None
                }
            },
            TCP_PROXY => match TcpProxy::decode(any.value.as_slice()) {
                Ok(t) => tcp(&t, &format!("{here}.typed_config"), p).map(model::NetworkFilter::TcpProxy),
                Err(e) => {
                    p.add(&here, format!("malformed TcpProxy: {e}"));
                    None
                }
            },
            crate::dubbo::DUBBO_PROXY => {
                match envoy_types::pb::envoy::extensions::filters::network::dubbo_proxy::v3::DubboProxy::decode(
                    any.value.as_slice(),
                ) {
                    Ok(d) => crate::dubbo::dubbo_proxy(&d, &format!("{here}.typed_config"), p)
                        .map(|r| model::NetworkFilter::Rpc(Box::new(r))),
                    Err(e) => {
                        p.add(&here, format!("malformed DubboProxy: {e}"));
                        None
                    }
                }
            }
            other => {
                p.add(
                    &here,
                    format!("network filter `{}` (`{other}`) is not supported", f.name),
                );
                None
            }
        };
    }
    let filter = network.or_else(|| {
        if c.filters.is_empty() {
            p.add(format!("{at}.filters"), "a filter chain needs a network filter");
        }
        None
    })?;
    Some(model::FilterChain {
        name,
        filter_chain_match: m,
        tls,
        filter,
    })
}

fn tcp(t: &TcpProxy, at: &str, p: &mut Problems) -> Option<model::TcpProxy> {
    let cluster = match &t.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => c.clone(),
        _ => {
            p.add(
                format!("{at}.cluster"),
                "a TCP proxy needs a cluster (weighted clusters are not supported)",
            );
            return None;
        }
    };
    Some(model::TcpProxy {
        stat_prefix: t.stat_prefix.clone(),
        cluster,
        idle_timeout: t
            .idle_timeout
            .as_ref()
            .and_then(duration)
            .unwrap_or(Duration::from_secs(3600)),
        access_log: crate::access_log::access_logs(&t.access_log, &format!("{at}.access_log"), p),
    })
}

fn hcm(
    h: &HttpConnectionManager,
    rds: Option<RdsLookup<'_>>,
    at: &str,
    p: &mut Problems,
) -> Option<model::HttpConnectionManager> {
    let mut route_config = match &h.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            crate::route::route_config(rc, &format!("{at}.route_config"), p)
        }
        Some(http_connection_manager::RouteSpecifier::Rds(r)) => {
            let Some(rds) = rds else {
                p.add(
                    format!("{at}.rds"),
                    format!(
                        "route configuration `{}` from RDS needs dynamic_resources (an ADS control plane)",
                        r.route_config_name
                    ),
                );
                return None;
            };
            if let Some(src) = &r.config_source
                && !crate::cluster::is_ads(src)
            {
                p.add(
                    format!("{at}.rds.config_source"),
                    "routes come over the ADS stream only (`config_source: {ads: {}}`)",
                );
            }
            rds(&r.route_config_name).unwrap_or_else(|| model::RouteConfig {
                name: r.route_config_name.clone(),
                virtual_hosts: Vec::new(),
                request_headers_to_add: Vec::new(),
                request_headers_to_remove: Vec::new(),
                response_headers_to_add: Vec::new(),
                response_headers_to_remove: Vec::new(),
            })
        }
        Some(http_connection_manager::RouteSpecifier::ScopedRoutes(_)) => {
            p.add(format!("{at}.scoped_routes"), "scoped routes are not supported");
            return None;
        }
        None => {
            p.add(at, "an HTTP connection manager needs route_config");
            return None;
        }
    };
    let mut local_rate_limit = None;
    let mut seen_fault = false;
    let mut checks = Vec::new();
    let n = h.http_filters.len();
    for (i, f) in h.http_filters.iter().enumerate() {
        let here = format!("{at}.http_filters[{i}]");
        // Istio wraps its own filters' configs in a TypedStruct: look inside.
        let unwrapped = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => match crate::typed_struct::unwrap(a) {
                Ok(a) => Some(a),
                Err(e) => {
                    p.add(format!("{here}.typed_config"), e);
                    continue;
                }
            },
            _ => None,
        };
        let type_url = unwrapped.as_deref().map(type_name).unwrap_or("").to_string();
        let is_router = f.name == "envoy.filters.http.router" || type_url == ROUTER;
        if is_router {
            if i + 1 != n {
                p.add(&here, "the router must be the last HTTP filter");
            }
            continue;
        }
        if f.disabled {
            continue;
        }
        if let Some(any) = unwrapped.as_deref() {
            let tat = format!("{here}.typed_config");
            match type_url.as_str() {
                crate::http_filters::FAULT => {
                    seen_fault = true;
                    if let Some(fault) = crate::http_filters::fault(any, &tat, p) {
                        for r in route_config
                            .virtual_hosts
                            .iter_mut()
                            .flat_map(|vh| vh.routes.iter_mut())
                        {
                            if r.fault.is_none() {
                                r.fault = Some(fault.clone());
                            }
                        }
                    }
                    continue;
                }
                crate::rbac::RBAC => {
                    // Check names name the stats: keep them unique when a filter name repeats.
                    let name = if checks.iter().any(|c: &model::Check| c.name() == f.name) {
                        format!("{}-{i}", f.name)
                    } else {
                        f.name.clone()
                    };
                    checks.extend(crate::rbac::rbac(any, &name, &tat, p));
                    continue;
                }
                crate::http_filters::LOCAL_RATELIMIT => {
                    if seen_fault {
                        p.add(
                            &here,
                            "Tessera applies the listener-wide rate limit before route faults; list local_ratelimit before fault",
                        );
                    }
                    local_rate_limit = crate::http_filters::local_ratelimit(any, &tat, p);
                    continue;
                }
                _ => {}
            }
        }
        if NO_OP_HTTP_FILTERS.contains(&f.name.as_str()) || f.is_optional {
            continue;
        }
        p.add(
            &here,
            format!(
                "HTTP filter `{}` is not supported yet (mark it is_optional to skip it)",
                f.name
            ),
        );
    }
    if !h.http_filters.iter().any(|f| {
        f.name == "envoy.filters.http.router"
            || matches!(&f.config_type, Some(http_filter::ConfigType::TypedConfig(a)) if type_name(a) == ROUTER)
    }) {
        p.add(
            format!("{at}.http_filters"),
            "the router filter is required (as the last HTTP filter)",
        );
    }
    let codec_type = match h.codec_type {
        0 => model::CodecType::Auto,
        1 => model::CodecType::Http1,
        2 => model::CodecType::Http2,
        _ => {
            p.add(format!("{at}.codec_type"), "HTTP/3 is not supported");
            model::CodecType::Auto
        }
    };
    let access_log = crate::access_log::access_logs(&h.access_log, &format!("{at}.access_log"), p);
    Some(model::HttpConnectionManager {
        forward_client_cert_details: model::ForwardClientCert::Sanitize,
        set_current_client_cert_details: model::ClientCertDetails::default(),
        stat_prefix: h.stat_prefix.clone(),
        codec_type,
        max_request_headers_kb: h.max_request_headers_kb.as_ref().map_or(60, |v| v.value),
        max_request_headers_count: h
            .common_http_protocol_options
            .as_ref()
            .and_then(|c| c.max_headers_count.as_ref())
            .map_or(100, |v| v.value),
        request_timeout: h.request_timeout.as_ref().and_then(duration).unwrap_or(Duration::ZERO),
        request_headers_timeout: h
            .request_headers_timeout
            .as_ref()
            .and_then(duration)
            .unwrap_or(Duration::ZERO),
        idle_timeout: h
            .common_http_protocol_options
            .as_ref()
            .and_then(|c| c.idle_timeout.as_ref())
            .and_then(duration)
            .unwrap_or(Duration::from_secs(3600)),
        http2_max_concurrent_streams: h
            .http2_protocol_options
            .as_ref()
            .and_then(|o| o.max_concurrent_streams.as_ref())
            .map_or(1024, |v| v.value),
        generate_request_id: h.generate_request_id.as_ref().is_none_or(|b| b.value),
        // Envoy's default, unlike Tessera's YAML.
        use_remote_address: h.use_remote_address.as_ref().is_some_and(|b| b.value),
        route_config,
        access_log,
        local_rate_limit,
        policy: model::Policy {
            checks,
            quotas: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::SocketAddress;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChainMatch};
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;

    fn addr(port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn any<M: Message>(type_name: &str, m: &M) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: m.encode_to_vec(),
        }
    }

    fn filter(name: &str, a: Any) -> Filter {
        Filter {
            name: name.into(),
            config_type: Some(filter::ConfigType::TypedConfig(a)),
        }
    }

    fn http_filter(name: &str) -> HttpFilter {
        HttpFilter {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn http_and_tcp_chains() {
        let h = HttpConnectionManager {
            stat_prefix: "ingress".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                RouteConfiguration {
                    name: "local".into(),
                    ..Default::default()
                },
            )),
            http_filters: vec![
                http_filter("istio.metadata_exchange"),
                http_filter("envoy.filters.http.router"),
            ],
            ..Default::default()
        };
        let t = TcpProxy {
            stat_prefix: "db".into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster("pg".into())),
            ..Default::default()
        };
        let l = Listener {
            name: "main".into(),
            address: Some(addr(10000)),
            filter_chains: vec![
                FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 5432 }),
                        ..Default::default()
                    }),
                    filters: vec![filter("envoy.filters.network.tcp_proxy", any(TCP_PROXY, &t))],
                    ..Default::default()
                },
                FilterChain {
                    filters: vec![filter("envoy.filters.network.http_connection_manager", any(HCM, &h))],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let got = listener(&l, "listeners[0]").unwrap();
        assert_eq!(got.address.port(), 10000);
        assert_eq!(got.filter_chains.len(), 2);
        assert_eq!(got.filter_chains[0].filter_chain_match.destination_port, Some(5432));
        assert!(matches!(&got.filter_chains[0].filter, model::NetworkFilter::TcpProxy(t) if t.cluster == "pg"));
        let model::NetworkFilter::Http(h) = &got.filter_chains[1].filter else {
            panic!("an HTTP chain")
        };
        assert_eq!(h.stat_prefix, "ingress");
        assert!(!h.use_remote_address, "Envoy's default");
    }

    #[test]
    fn rds_unknown_filters_and_a_missing_router_are_named() {
        let h = HttpConnectionManager {
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                RouteConfiguration::default(),
            )),
            http_filters: vec![http_filter("envoy.filters.http.lua")],
            ..Default::default()
        };
        let l = Listener {
            name: "l".into(),
            address: Some(addr(1)),
            filter_chains: vec![FilterChain {
                filters: vec![filter("hcm", any(HCM, &h))],
                ..Default::default()
            }],
            ..Default::default()
        };
        let errs: Vec<String> = listener(&l, "l").unwrap_err().iter().map(ToString::to_string).collect();
        for want in [
            "l.filter_chains[0].filters[0].typed_config.http_filters[0]: HTTP filter `envoy.filters.http.lua` is not supported yet",
            "l.filter_chains[0].filters[0].typed_config.http_filters: the router filter is required",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errs:#?}"
            );
        }
    }
}

//! Envoy's `envoy.filters.network.dubbo_proxy` (what Aeraki and hand-written Envoy configs use
//! for Dubbo) into Tessera's RPC chain with `protocol: dubbo`: route configurations by interface,
//! group and version, routes by method name and attachments, to a cluster or weighted clusters
//! with `envoy.lb` subset labels. Tessera's RPC chain multiplexes and remaps request ids the same
//! way for every route, so nothing else in the config is needed.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::network::dubbo_proxy::v3::{
    DubboProxy, ProtocolType, RouteConfiguration, SerializationType, dubbo_proxy, route_action,
};
use tessera_model as model;

use crate::Problems;

/// The type name of the filter's config.
pub(crate) const DUBBO_PROXY: &str = "envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy";
const ROUTER: &str = "envoy.filters.dubbo.router";

/// Converts a Dubbo proxy; every problem is recorded under `at`.
pub(crate) fn dubbo_proxy(d: &DubboProxy, at: &str, p: &mut Problems) -> Option<model::RpcProxy> {
    if ProtocolType::try_from(d.protocol_type) != Ok(ProtocolType::Dubbo) {
        p.add(format!("{at}.protocol_type"), "only Dubbo is supported");
    }
    if SerializationType::try_from(d.serialization_type) != Ok(SerializationType::Hessian2) {
        p.add(format!("{at}.serialization_type"), "only Hessian2 is supported");
    }
    for (i, f) in d.dubbo_filters.iter().enumerate() {
        if f.name != ROUTER {
            p.add(
                format!("{at}.dubbo_filters[{i}]"),
                format!("Dubbo filter `{}` is not supported (only the router)", f.name),
            );
        }
    }
    #[allow(deprecated)]
    let (configs, field): (&[RouteConfiguration], &str) = match &d.route_specifier {
        Some(dubbo_proxy::RouteSpecifier::MultipleRouteConfig(m)) => {
            (&m.route_config, "multiple_route_config.route_config")
        }
        Some(dubbo_proxy::RouteSpecifier::Drds(_)) => {
            p.add(
                format!("{at}.drds"),
                "Dubbo routes from xDS (DRDS) are not supported; give them in place",
            );
            return None;
        }
        None => (&d.route_config, "route_config"),
    };
    let mut routes = Vec::new();
    for (ci, rc) in configs.iter().enumerate() {
        let cat = format!("{at}.{field}[{ci}]");
        let service =
            (!rc.interface.is_empty() && rc.interface != "*").then(|| model::StringMatch::Exact(rc.interface.clone()));
        let exact = |s: &str| (!s.is_empty()).then(|| model::StringMatch::Exact(s.to_string()));
        for (ri, r) in rc.routes.iter().enumerate() {
            let rat = format!("{cat}.routes[{ri}]");
            let mut matcher = model::RpcMatch {
                service: service.clone(),
                method: None,
                version: exact(&rc.version),
                group: exact(&rc.group),
                headers: Vec::new(),
            };
            if let Some(m) = &r.r#match {
                if let Some(method) = &m.method {
                    if let Some(name) = &method.name {
                        matcher.method =
                            crate::route::string_match(name, &format!("{rat}.match.method.name"), p).map(|(m, _)| m);
                    }
                    if !method.params_match.is_empty() {
                        p.add(
                            format!("{rat}.match.method.params_match"),
                            "matching on method arguments is not supported",
                        );
                    }
                }
                for (hi, h) in m.headers.iter().enumerate() {
                    if let Some(h) = crate::route::header_matcher(h, &format!("{rat}.match.headers[{hi}]"), p) {
                        matcher.headers.push(h);
                    }
                }
            }
            let Some(action) = &r.route else {
                p.add(format!("{rat}.route"), "a route needs a route action");
                continue;
            };
            let cluster = match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => model::ClusterSpecifier::Cluster(c.clone()),
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => crate::route::weighted_clusters(w),
                None => {
                    p.add(format!("{rat}.route"), "a route action needs a cluster");
                    continue;
                }
            };
            routes.push(model::RpcRoute {
                name: None,
                matcher,
                route: model::RpcAction {
                    cluster,
                    metadata_match: crate::cluster::lb_labels(action.metadata_match.as_ref()),
                    timeout: Duration::ZERO,
                    idempotent: false,
                    num_retries: 0,
                    local_rate_limit: None,
                },
            });
        }
    }
    Some(model::RpcProxy {
        stat_prefix: d.stat_prefix.clone(),
        protocol: model::RpcProtocol::Dubbo,
        routes,
        request_timeout: model::DEFAULT_RPC_TIMEOUT,
        idle_timeout: Duration::from_secs(3600),
        max_frame_bytes: 8 * 1024 * 1024,
        max_concurrent_requests: 10_000,
        access_log: Vec::new(),
        policy: model::Policy::default(),
    })
}

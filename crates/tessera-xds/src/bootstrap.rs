//! `envoy.config.bootstrap.v3.Bootstrap` into [`tessera_model::Config`]: node, admin address and
//! `static_resources` (listeners, clusters). `dynamic_resources` (ADS) are reported as not built
//! yet; the parts of a bootstrap that only tune Envoy itself (stats sinks and flush interval,
//! layered runtime, watchdogs, overload manager) are accepted and ignored, as the README says.

use std::collections::HashSet;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use tessera_model as model;

use crate::{Problems, Unsupported};

/// Converts a bootstrap; every problem is listed with its path.
pub fn bootstrap(b: &Bootstrap) -> Result<model::Config, Vec<Unsupported>> {
    let mut p = Problems::default();
    let node = b
        .node
        .as_ref()
        .map(|n| model::Node {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
            locality: n.locality.as_ref().map(|l| model::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            }),
        })
        .unwrap_or_default();
    let admin = b.admin.as_ref().and_then(|a| {
        a.address
            .as_ref()
            .and_then(|addr| crate::listener::socket_addr(addr, "admin.address", &mut p))
            .map(|address| model::Admin { address })
    });
    let cds = match dynamic(b) {
        Ok(d) => d.is_some_and(|d| d.cds),
        Err(errs) => {
            errs.into_iter().for_each(|u| p.add(u.path, u.reason));
            true
        }
    };
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    let mut secrets = Vec::new();
    if let Some(s) = &b.static_resources {
        let pipe = ads_pipe_cluster(b);
        for (i, c) in s.clusters.iter().enumerate() {
            if pipe == Some(c.name.as_str()) {
                continue;
            }
            match crate::cluster::cluster(c, &format!("static_resources.clusters[{i}]")) {
                Ok(c) => clusters.push(c),
                Err(e) => e.into_iter().for_each(|u| p.add(u.path, u.reason)),
            }
        }
        for (i, l) in s.listeners.iter().enumerate() {
            match crate::listener::listener(l, &format!("static_resources.listeners[{i}]")) {
                Ok(l) => listeners.push(l),
                Err(e) => e.into_iter().for_each(|u| p.add(u.path, u.reason)),
            }
        }
        for (i, sec) in s.secrets.iter().enumerate() {
            match crate::tls::secret(sec, &format!("static_resources.secrets[{i}]")) {
                Ok(sec) => secrets.push(sec),
                Err(e) => e.into_iter().for_each(|u| p.add(u.path, u.reason)),
            }
        }
    }
    // Cross references Envoy checks at load: every route and TCP proxy names a known cluster.
    // Clusters refused above still count as defined: their own problems are already listed.
    let known: HashSet<&str> = b
        .static_resources
        .iter()
        .flat_map(|s| s.clusters.iter().map(|c| c.name.as_str()))
        .collect();
    // With CDS the control plane may define them later (until then such routes answer 503).
    for (li, l) in listeners.iter().enumerate().filter(|_| !cds) {
        for (ci, c) in l.filter_chains.iter().enumerate() {
            let at = format!("static_resources.listeners[{li}].filter_chains[{ci}]");
            for name in referenced_clusters(&c.filter) {
                if !known.contains(name) {
                    p.add(
                        &at,
                        format!("refers to cluster `{name}`, which static_resources does not define"),
                    );
                }
            }
        }
    }
    p.finish(model::Config {
        node,
        admin,
        drain_time: model::DEFAULT_DRAIN_TIME,
        listeners,
        clusters,
        secrets,
        telemetry: None,
    })
}

/// An Envoy v3 bootstrap (YAML) for a sidecar whose listeners and clusters all come over ADS
/// from `ads` (plaintext, HTTP/2): what `tessera up`, the tests and the benchmarks give Tessera
/// and Envoy alike. `api_type` is `GRPC` (state of the world) or `DELTA_GRPC`; `admin` adds an
/// admin listener on 127.0.0.1 (0: any free port).
pub fn ads_bootstrap_yaml(
    node_id: &str,
    node_cluster: &str,
    ads: std::net::SocketAddr,
    admin: Option<u16>,
    api_type: &str,
) -> String {
    let admin = admin
        .map(|p| format!("admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}\n"))
        .unwrap_or_default();
    format!(
        r#"node:
  id: {node_id}
  cluster: {node_cluster}
{admin}dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds-grpc}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}
"#,
        ads.ip(),
        ads.port()
    )
}

/// How a sidecar talks to its control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdsMode {
    /// State of the world (`api_type: GRPC`): every response carries the whole set of a type.
    Sotw,
    /// Incremental (`api_type: DELTA_GRPC`): responses carry changes and removals.
    Delta,
}

/// `dynamic_resources` of a bootstrap: one ADS stream to the control plane.
#[derive(Debug, Clone)]
pub struct Dynamic {
    /// State of the world or delta.
    pub mode: XdsMode,
    /// The static cluster that reaches the control plane (`grpc_services[0].envoy_grpc.cluster_name`).
    pub cluster: String,
    /// Its first endpoint, `host:port` (an IP, or a name resolved at each connection).
    pub address: String,
    /// TLS (and a client certificate for mTLS) towards the control plane, from that cluster.
    pub tls: Option<model::UpstreamTls>,
    /// Listeners come from the control plane (`lds_config: {ads: {}}`).
    pub lds: bool,
    /// Clusters come from the control plane (`cds_config: {ads: {}}`).
    pub cds: bool,
    /// The node, as sent on the stream (id, cluster, metadata, locality).
    pub node: envoy_types::pb::envoy::config::core::v3::Node,
    /// `ads_config.set_node_on_first_message_only` (Istio sets it).
    pub node_on_first_only: bool,
}

/// The Unix socket path of a cluster's first endpoint (`pipe: {path}`), as Istio's bootstrap
/// reaches istio-agent's xDS proxy.
fn pipe_path(c: &envoy_types::pb::envoy::config::cluster::v3::Cluster) -> Option<String> {
    use envoy_types::pb::envoy::config::core::v3::address;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
    let e = c.load_assignment.as_ref()?.endpoints.first()?.lb_endpoints.first()?;
    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
        return None;
    };
    match ep.address.as_ref()?.address.as_ref()? {
        address::Address::Pipe(p) => Some(p.path.clone()),
        _ => None,
    }
}

/// The static cluster that carries ADS over a Unix socket: the ADS client dials it itself, and
/// the proxy (which forwards TCP only) leaves it out.
fn ads_pipe_cluster(b: &Bootstrap) -> Option<&str> {
    use envoy_types::pb::envoy::config::core::v3::grpc_service;
    let name = match b
        .dynamic_resources
        .as_ref()?
        .ads_config
        .as_ref()?
        .grpc_services
        .first()?
        .target_specifier
        .as_ref()?
    {
        grpc_service::TargetSpecifier::EnvoyGrpc(e) => e.cluster_name.as_str(),
        grpc_service::TargetSpecifier::GoogleGrpc(_) => return None,
    };
    let c = b.static_resources.as_ref()?.clusters.iter().find(|c| c.name == name)?;
    pipe_path(c).map(|_| name)
}

/// The ADS part of a bootstrap, if it has one; problems are listed with their paths.
pub fn dynamic(b: &Bootstrap) -> Result<Option<Dynamic>, Vec<Unsupported>> {
    use envoy_types::pb::envoy::config::core::v3::{ApiConfigSource, api_config_source, grpc_service};
    let Some(d) = &b.dynamic_resources else {
        return Ok(None);
    };
    let mut p = Problems::default();
    let ads_only = |src: &Option<envoy_types::pb::envoy::config::core::v3::ConfigSource>,
                    field: &str,
                    p: &mut Problems| match src {
        None => false,
        Some(s) if crate::cluster::is_ads(s) => true,
        Some(_) => {
            p.add(
                format!("dynamic_resources.{field}"),
                "only `{ads: {}}` is supported: every resource comes over the one ADS stream",
            );
            false
        }
    };
    let lds = ads_only(&d.lds_config, "lds_config", &mut p);
    let cds = ads_only(&d.cds_config, "cds_config", &mut p);
    if !d.lds_resources_locator.is_empty() || !d.cds_resources_locator.is_empty() {
        p.add("dynamic_resources", "xdstp:// resource locators are not supported");
    }
    let Some(ads): Option<&ApiConfigSource> = d.ads_config.as_ref() else {
        p.add(
            "dynamic_resources.ads_config",
            "an ADS server is required (`ads_config`)",
        );
        return Err(p.finish(()).err().unwrap_or_default());
    };
    let mode = match api_config_source::ApiType::try_from(ads.api_type) {
        Ok(api_config_source::ApiType::Grpc | api_config_source::ApiType::AggregatedGrpc) => XdsMode::Sotw,
        Ok(api_config_source::ApiType::DeltaGrpc | api_config_source::ApiType::AggregatedDeltaGrpc) => XdsMode::Delta,
        _ => {
            p.add(
                "dynamic_resources.ads_config.api_type",
                "ADS needs GRPC (state of the world) or DELTA_GRPC",
            );
            XdsMode::Sotw
        }
    };
    let cluster = match ads.grpc_services.first().and_then(|g| g.target_specifier.as_ref()) {
        Some(grpc_service::TargetSpecifier::EnvoyGrpc(e)) => e.cluster_name.clone(),
        Some(grpc_service::TargetSpecifier::GoogleGrpc(_)) => {
            p.add(
                "dynamic_resources.ads_config.grpc_services[0].google_grpc",
                "use envoy_grpc with a static cluster",
            );
            String::new()
        }
        None => {
            p.add(
                "dynamic_resources.ads_config.grpc_services",
                "one envoy_grpc service naming a static cluster is required",
            );
            String::new()
        }
    };
    let mut target = None;
    let node_on_first_only = ads.set_node_on_first_message_only;
    if !cluster.is_empty() {
        let found = b
            .static_resources
            .iter()
            .flat_map(|s| s.clusters.iter())
            .find(|c| c.name == cluster);
        let pipe = found.and_then(pipe_path);
        match found.map(|c| match &pipe {
            Some(_) => Err(Vec::new()),
            None => crate::cluster::cluster(c, &format!("cluster \"{cluster}\"")),
        }) {
            _ if pipe.is_some() => target = pipe.map(|path| (format!("unix:{path}"), None)),
            None => p.add(
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                format!("no static cluster `{cluster}`"),
            ),
            Some(Err(errs)) => errs.into_iter().for_each(|u| p.add(u.path, u.reason)),
            Some(Ok(c)) => match c.endpoints.first() {
                // A name (STRICT_DNS / LOGICAL_DNS) is resolved at each connection, as Envoy does.
                Some(e) => {
                    let host = if e.host.contains(':') {
                        format!("[{}]", e.host)
                    } else {
                        e.host.clone()
                    };
                    target = Some((format!("{host}:{}", e.port), c.tls));
                }
                None => p.add(
                    format!("cluster \"{cluster}\".load_assignment"),
                    "the ADS cluster needs an endpoint",
                ),
            },
        }
    }
    let node = b.node.clone().unwrap_or_default();
    let (address, tls) = match target {
        Some(t) => t,
        None => return Err(p.finish(()).err().unwrap_or_default()),
    };
    p.finish(Some(Dynamic {
        mode,
        cluster,
        address,
        tls,
        lds,
        cds,
        node,
        node_on_first_only,
    }))
}

pub(crate) fn referenced_clusters(f: &model::NetworkFilter) -> Vec<&str> {
    match f {
        model::NetworkFilter::TcpProxy(t) => vec![t.cluster.as_str()],
        model::NetworkFilter::Http(h) => h
            .route_config
            .virtual_hosts
            .iter()
            .flat_map(|vh| vh.routes.iter())
            .flat_map(|r| match &r.action {
                model::RouteAction::Route(f) => {
                    let mut names: Vec<&str> = match &f.cluster {
                        model::ClusterSpecifier::Cluster(c) => vec![c.as_str()],
                        model::ClusterSpecifier::WeightedClusters(w) => w.iter().map(|c| c.name.as_str()).collect(),
                    };
                    // Mirrors need their clusters too.
                    names.extend(f.request_mirror_policies.iter().map(|m| m.cluster.as_str()));
                    names
                }
                _ => Vec::new(),
            })
            .collect(),
        model::NetworkFilter::Rpc(r) => r
            .routes
            .iter()
            .flat_map(|route| match &route.route.cluster {
                model::ClusterSpecifier::Cluster(c) => vec![c.as_str()],
                model::ClusterSpecifier::WeightedClusters(w) => w.iter().map(|c| c.name.as_str()).collect(),
            })
            .collect(),
    }
}

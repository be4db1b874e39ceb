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
    if b.dynamic_resources.is_some() {
        p.add(
            "dynamic_resources",
            "ADS / xDS subscriptions need the ADS client, which is not built yet; use static_resources",
        );
    }
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if let Some(s) = &b.static_resources {
        for (i, c) in s.clusters.iter().enumerate() {
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
        if !s.secrets.is_empty() {
            p.add(
                "static_resources.secrets",
                "secrets from a bootstrap are not supported yet",
            );
        }
    }
    // Cross references Envoy checks at load: every route and TCP proxy names a known cluster.
    // Clusters refused above still count as defined: their own problems are already listed.
    let known: HashSet<&str> = b
        .static_resources
        .iter()
        .flat_map(|s| s.clusters.iter().map(|c| c.name.as_str()))
        .collect();
    for (li, l) in listeners.iter().enumerate() {
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
        secrets: Vec::new(),
        telemetry: None,
    })
}

fn referenced_clusters(f: &model::NetworkFilter) -> Vec<&str> {
    match f {
        model::NetworkFilter::TcpProxy(t) => vec![t.cluster.as_str()],
        model::NetworkFilter::Http(h) => h
            .route_config
            .virtual_hosts
            .iter()
            .flat_map(|vh| vh.routes.iter())
            .flat_map(|r| match &r.action {
                model::RouteAction::Route(f) => match &f.cluster {
                    model::ClusterSpecifier::Cluster(c) => vec![c.as_str()],
                    model::ClusterSpecifier::WeightedClusters(w) => w.iter().map(|c| c.name.as_str()).collect(),
                },
                _ => Vec::new(),
            })
            .collect(),
        model::NetworkFilter::Rpc(_) => Vec::new(),
    }
}

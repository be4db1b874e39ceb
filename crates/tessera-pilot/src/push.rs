//! Pushing per group: for every group of connected sidecars (see [`crate::scope`]), the
//! resources its sidecars see, and only the types that changed for that group. A group shares
//! one computation per namespace; a group that appears is computed at once, without waiting for
//! the debounce; a group whose last sidecar left is forgotten.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use envoy_types::pb::google::protobuf::Any;
use tessera_xds::server::AdsServer;

use crate::model::Snapshot;
use crate::scope::{Group, Imports};
use crate::translate::Resources;

/// What a push needs besides the snapshot.
pub struct Settings<'a> {
    /// The RBAC filters (AuthorizationPolicy) of a workload's inbound listener.
    pub rbac: &'a crate::sidecar::RbacFor<'a>,
    /// Per-namespace imports.
    pub imports: &'a Imports,
    /// The outbound listeners (HTTP, Dubbo) of sidecars that do not name their own.
    pub outbound_http: SocketAddr,
    /// The outbound Dubbo listener, if any.
    pub outbound_dubbo: Option<SocketAddr>,
    /// The translation of what a namespace sees, with the outbound HTTP listener at the address
    /// given (`translate::translate` with its settings).
    pub translate: &'a dyn Fn(&Snapshot, SocketAddr) -> Resources,
}

/// Per group, per type: what was last set.
#[derive(Default)]
pub struct Pusher {
    version: u64,
    last: HashMap<String, BTreeMap<&'static str, Vec<Any>>>,
}

/// What one push did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// The version set.
    pub version: u64,
    /// Groups computed.
    pub groups: usize,
    /// Groups that changed, and per type how many groups changed it.
    pub changed_groups: usize,
    /// `Cluster: 2` ...
    pub types: BTreeMap<&'static str, usize>,
}

impl Pusher {
    /// Computes `groups` (all connected ones when `None`) from `s` and sets what changed.
    pub fn push(&mut self, ads: &AdsServer, s: &Snapshot, set: &Settings<'_>, only_new: bool) -> Pushed {
        let connected = ads.groups();
        // Forget groups nobody holds any more.
        self.last.retain(|g, _| connected.contains_key(g));
        ads.retain_groups(&|g| connected.contains_key(g));
        let keys: Vec<&String> = connected
            .keys()
            .filter(|g| !only_new || !self.last.contains_key(*g))
            .collect();
        let mut out = Pushed {
            groups: keys.len(),
            ..Default::default()
        };
        if keys.is_empty() {
            return out;
        }
        self.version += 1;
        out.version = self.version;
        let v = self.version.to_string();
        // Groups of one namespace and the same outbound listeners share the computation.
        let mut shared: BTreeMap<(String, Option<crate::scope::Outbound>, bool), Resources> = BTreeMap::new();
        for key in keys {
            let g = Group::parse(key);
            let base = shared
                .entry((g.namespace.clone(), g.outbound.clone(), g.grpc))
                .or_insert_with(|| {
                    let visible = set.imports.visible(s, &g.namespace);
                    if g.grpc {
                        // Proxyless gRPC: the clusters and endpoints, and API listeners for them.
                        let mut r = (set.translate)(&visible, set.outbound_http);
                        r.listeners = crate::sidecar::grpc_listeners(&visible);
                        r.routes.clear();
                        return r;
                    }
                    let (http, dubbo) = match &g.outbound {
                        None => (Some(set.outbound_http), set.outbound_dubbo),
                        Some(o) => (o.http, o.dubbo),
                    };
                    let mut r = (set.translate)(&visible, http.unwrap_or(set.outbound_http));
                    if http.is_none() {
                        r.listeners.retain(|l| !is_listener(l, crate::translate::OUTBOUND_HTTP));
                    }
                    if let Some(at) = dubbo {
                        crate::sidecar::outbound_dubbo(&mut r, &visible, at);
                    }
                    r
                });
            let mut r = base.clone();
            // Inbound ports are looked up in everything registered, not only what is imported.
            crate::sidecar::inbound(&mut r, s, &g.inbound, set.rbac);
            let last = self.last.entry(key.clone()).or_default();
            let mut changed: Vec<(&str, &str, Vec<Any>)> = Vec::new();
            for (t, res) in r.by_type() {
                if last.get(t) != Some(&res) {
                    last.insert(t, res.clone());
                    *out.types.entry(t.rsplit('.').next().unwrap_or(t)).or_default() += 1;
                    changed.push((t, v.as_str(), res));
                }
            }
            if !changed.is_empty() {
                out.changed_groups += 1;
                ads.set_group(key, changed);
            }
        }
        out
    }
}

fn is_listener(a: &Any, name: &str) -> bool {
    use prost::Message;
    envoy_types::pb::envoy::config::listener::v3::Listener::decode(a.value.as_slice()).is_ok_and(|l| l.name == name)
}

/// Logs a push.
pub fn log(p: &Pushed, services: usize, waited: Option<std::time::Duration>, started: Instant) {
    if p.groups == 0 {
        return;
    }
    let types: Vec<String> = p.types.iter().map(|(t, n)| format!("{t}:{n}")).collect();
    tracing::info!(
        version = p.version,
        services,
        groups = p.groups,
        changed_groups = p.changed_groups,
        types = %types.join(","),
        waited = ?waited,
        took = ?started.elapsed(),
        "pushed"
    );
}

//! What the sidecar holds from its control plane, and the rules for taking a response in:
//! decoding, validation (a NACK names the resource and field), SotW and delta bookkeeping,
//! subscriptions that follow what listeners and clusters reference, warming and the
//! does-not-exist timer. No sockets and no clocks of its own: the driver passes `now`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tessera_model as model;

/// Type URLs of the resources Tessera follows.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Route configurations (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Clusters (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Endpoints (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Secrets (SDS).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A resource type, in the order Envoy asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ty {
    /// CDS.
    Cluster = 0,
    /// EDS.
    Endpoint = 1,
    /// LDS.
    Listener = 2,
    /// RDS.
    Route = 3,
    /// SDS.
    Secret = 4,
}

impl Ty {
    /// All of them, in request order.
    pub const ALL: [Ty; 5] = [Ty::Cluster, Ty::Endpoint, Ty::Listener, Ty::Route, Ty::Secret];

    /// The type URL.
    pub fn url(self) -> &'static str {
        match self {
            Ty::Cluster => CLUSTER,
            Ty::Endpoint => ENDPOINT,
            Ty::Listener => LISTENER,
            Ty::Route => ROUTE,
            Ty::Secret => SECRET,
        }
    }

    /// The type for a URL, if Tessera follows it.
    pub fn from_url(url: &str) -> Option<Ty> {
        Ty::ALL.into_iter().find(|t| t.url() == url)
    }

    /// LDS and CDS ask for everything (wildcard); RDS and EDS ask by name.
    pub fn wildcard(self) -> bool {
        matches!(self, Ty::Cluster | Ty::Listener)
    }

    /// The short name used in logs and errors.
    pub fn short(self) -> &'static str {
        match self {
            Ty::Cluster => "Cluster",
            Ty::Endpoint => "ClusterLoadAssignment",
            Ty::Listener => "Listener",
            Ty::Route => "RouteConfiguration",
            Ty::Secret => "Secret",
        }
    }
}

/// A resource as decoded and converted.
#[derive(Debug)]
pub enum Model {
    /// A listener is converted again whenever its routes change, so the proto is kept; with the
    /// route configurations it takes from RDS and the secrets its TLS names.
    Listener(Box<Listener>, Vec<String>, Vec<String>),
    /// A cluster, and the EDS name it takes endpoints from.
    Cluster(Box<model::Cluster>, Option<String>),
    /// A secret (certificate and key, or trust bundle).
    Secret(Box<model::Secret>),
    /// A route configuration.
    Route(Box<model::RouteConfig>),
    /// The endpoints of a load assignment.
    Endpoints(Vec<model::Endpoint>),
}

/// One accepted resource.
#[derive(Debug)]
pub struct Stored {
    /// As received (for `/config_dump`).
    pub any: Any,
    /// Its version: the response's in SotW, the resource's own in delta.
    pub version: String,
    /// When it was accepted.
    pub updated: SystemTime,
    /// Converted.
    pub model: Model,
}

/// One response, whichever the protocol variant.
#[derive(Debug, Default)]
pub struct Incoming {
    /// Its type URL.
    pub type_url: String,
    /// SotW `version_info`, delta `system_version_info`.
    pub version: String,
    /// The nonce to echo.
    pub nonce: String,
    /// Resources: the name delta gives (SotW names come from the payload), version, payload.
    pub resources: Vec<(Option<String>, String, Option<Any>)>,
    /// Delta removals.
    pub removed: Vec<String>,
    /// True for SotW: for LDS and CDS a resource left out is deleted.
    pub sotw: bool,
}

/// Per type bookkeeping.
#[derive(Debug, Default, Clone)]
pub struct TypeState {
    /// Last accepted version (SotW `version_info`, delta `system_version_info`).
    pub version: String,
    /// Nonce of the last response.
    pub nonce: String,
    /// Names subscribed to (RDS, EDS).
    pub names: BTreeSet<String>,
    /// The last NACK: when, and why.
    pub last_nack: Option<(SystemTime, String)>,
    /// Responses accepted and rejected.
    pub acks: u64,
    /// Responses rejected.
    pub nacks: u64,
}

/// What taking a response in changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Anything but endpoints changed: the whole configuration must be assembled again.
    pub full: bool,
    /// EDS names whose endpoints changed.
    pub endpoints: Vec<String>,
    /// Subscriptions changed: (type, added, removed).
    pub subscriptions: Vec<(Ty, Vec<String>, Vec<String>)>,
}

/// Everything accepted from the control plane.
#[derive(Debug)]
pub struct State {
    /// Accepted resources, per type (indexed by `Ty as usize`).
    pub resources: [BTreeMap<String, Arc<Stored>>; 5],
    /// Bookkeeping per type.
    pub types: [TypeState; 5],
    /// Names wanted and not yet received, since when.
    waiting: HashMap<(Ty, String), Instant>,
    /// Names the control plane did not send within `absent_after`, or removed: known to be empty.
    absent: BTreeSet<(Ty, String)>,
    /// How long a wanted resource may take before it counts as absent (Envoy: 15 s).
    pub absent_after: Duration,
    /// Secrets the bootstrap defines: never asked for over SDS.
    pub static_secrets: BTreeSet<String>,
}

impl State {
    /// Nothing received yet.
    pub fn new(absent_after: Duration) -> State {
        State {
            resources: Default::default(),
            types: Default::default(),
            waiting: HashMap::new(),
            absent: BTreeSet::new(),
            absent_after,
            static_secrets: BTreeSet::new(),
        }
    }

    /// The accepted resources of one type.
    pub fn of(&self, ty: Ty) -> &BTreeMap<String, Arc<Stored>> {
        &self.resources[ty as usize]
    }

    /// Takes a response in. `Err` is the NACK's message (nothing changed); `Ok` says what changed.
    pub fn accept(&mut self, inc: Incoming, now: Instant) -> Result<Change, String> {
        let Some(ty) = Ty::from_url(&inc.type_url) else {
            return Err(format!(
                "resource type `{}` is not supported by Tessera (it follows Listener, RouteConfiguration, Cluster and ClusterLoadAssignment)",
                inc.type_url
            ));
        };
        let updated = SystemTime::now();
        let mut decoded: BTreeMap<String, Arc<Stored>> = BTreeMap::new();
        let mut errors = Vec::new();
        for (i, (name, version, any)) in inc.resources.into_iter().enumerate() {
            let Some(any) = any else {
                // Delta: a name with no payload is a heartbeat of an unchanged resource.
                continue;
            };
            if any.type_url != inc.type_url {
                errors.push(format!(
                    "resources[{i}]: a `{}` in a `{}` response",
                    any.type_url,
                    ty.short()
                ));
                continue;
            }
            match self.decode(ty, &any) {
                Ok((n, m)) => {
                    if let Some(given) = &name
                        && *given != n
                    {
                        errors.push(format!(
                            "resources[{i}]: named `{given}` but the {} is `{n}`",
                            ty.short()
                        ));
                        continue;
                    }
                    if decoded.contains_key(&n) {
                        errors.push(format!("{} `{n}` appears twice in one response", ty.short()));
                        continue;
                    }
                    let version = if inc.sotw { inc.version.clone() } else { version };
                    decoded.insert(
                        n,
                        Arc::new(Stored {
                            any,
                            version,
                            updated,
                            model: m,
                        }),
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let mut change = Change::default();
        let map = &mut self.resources[ty as usize];
        let same = |a: &Stored, b: &Stored| a.any.value == b.any.value;
        let mut touched = Vec::new();
        if inc.sotw && ty.wildcard() {
            // The whole set: anything left out is deleted.
            let gone: Vec<String> = map.keys().filter(|k| !decoded.contains_key(*k)).cloned().collect();
            for k in gone {
                map.remove(&k);
                touched.push(k);
            }
        }
        for k in &inc.removed {
            if map.remove(k).is_some() {
                touched.push(k.clone());
            }
            if !ty.wildcard() && self.types[ty as usize].names.contains(k) {
                self.absent.insert((ty, k.clone()));
            }
        }
        for (k, v) in decoded {
            self.waiting.remove(&(ty, k.clone()));
            self.absent.remove(&(ty, k.clone()));
            match map.get(&k) {
                Some(old) if same(old, &v) => {
                    // Unchanged payload: not a change; the new version, the old update time.
                    let mut v = v;
                    let when = old.updated;
                    if let Some(s) = Arc::get_mut(&mut v) {
                        s.updated = when;
                    }
                    map.insert(k, v);
                }
                _ => {
                    map.insert(k.clone(), v);
                    touched.push(k);
                }
            }
        }
        let ts = &mut self.types[ty as usize];
        ts.version = inc.version;
        ts.nonce = inc.nonce;
        ts.acks += 1;
        match ty {
            Ty::Endpoint => change.endpoints = touched,
            _ => change.full = !touched.is_empty(),
        }
        change.subscriptions = self.resubscribe(now);
        Ok(change)
    }

    /// Records a NACK for `ty`: the nonce is taken, the version stays.
    pub fn rejected(&mut self, ty_url: &str, nonce: String, why: &str) {
        if let Some(ty) = Ty::from_url(ty_url) {
            let ts = &mut self.types[ty as usize];
            ts.nonce = nonce;
            ts.nacks += 1;
            ts.last_nack = Some((SystemTime::now(), why.to_string()));
        }
    }

    fn decode(&self, ty: Ty, any: &Any) -> Result<(String, Model), String> {
        let bad = |e: prost::DecodeError| format!("a malformed {} payload: {e}", ty.short());
        let problems = |name: &str, errs: Vec<crate::Unsupported>| {
            let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
            format!("{} `{name}`: {}", ty.short(), list.join("; "))
        };
        match ty {
            Ty::Listener => {
                let l = Listener::decode(any.value.as_slice()).map_err(bad)?;
                let at = format!("listener \"{}\"", l.name);
                // Routes are validated when RDS brings them; here the listener's own fields.
                let m =
                    crate::listener::listener_with_rds(&l, &at, Some(&|_| None)).map_err(|e| problems(&l.name, e))?;
                let rds = crate::listener::rds_names(&l);
                let mut sds: Vec<String> = m
                    .filter_chains
                    .iter()
                    .filter_map(|c| c.tls.as_ref())
                    .flat_map(|t| t.common.secret_names().map(str::to_string))
                    .collect();
                sds.sort();
                sds.dedup();
                Ok((l.name.clone(), Model::Listener(Box::new(l), rds, sds)))
            }
            Ty::Cluster => {
                let c = Cluster::decode(any.value.as_slice()).map_err(bad)?;
                let at = format!("cluster \"{}\"", c.name);
                let m = crate::cluster::cluster(&c, &at).map_err(|e| problems(&c.name, e))?;
                let eds = crate::cluster::eds_service_name(&c).map(str::to_string);
                Ok((c.name, Model::Cluster(Box::new(m), eds)))
            }
            Ty::Route => {
                let r = RouteConfiguration::decode(any.value.as_slice()).map_err(bad)?;
                let at = format!("route_configuration \"{}\"", r.name);
                let m = crate::route::route_configuration(&r, &at).map_err(|e| problems(&r.name, e))?;
                Ok((r.name, Model::Route(Box::new(m))))
            }
            Ty::Endpoint => {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice()).map_err(bad)?;
                let at = format!("cluster_load_assignment \"{}\"", cla.cluster_name);
                let mut p = crate::Problems::default();
                let (eps, _) = crate::cluster::load_assignment(&cla, &at, &mut p);
                if let Some(e) = eps.iter().find(|e| e.host.parse::<std::net::IpAddr>().is_err()) {
                    p.add(&at, format!("EDS endpoints are IP addresses; `{}` is a name", e.host));
                }
                let eps = p.finish(eps).map_err(|e| problems(&cla.cluster_name, e))?;
                if cla.cluster_name.is_empty() {
                    return Err("a ClusterLoadAssignment needs cluster_name".into());
                }
                Ok((cla.cluster_name, Model::Endpoints(eps)))
            }
            Ty::Secret => {
                let sec = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(
                    any.value.as_slice(),
                )
                .map_err(bad)?;
                let at = format!("secret \"{}\"", sec.name);
                let m = crate::tls::secret(&sec, &at).map_err(|e| problems(&sec.name, e))?;
                Ok((sec.name, Model::Secret(Box::new(m))))
            }
        }
    }

    /// The names listeners (RDS, SDS) and clusters (EDS, SDS) reference now.
    fn wanted(&self, static_secrets: &BTreeSet<String>) -> [BTreeSet<String>; 3] {
        let mut rds = BTreeSet::new();
        let mut sds = BTreeSet::new();
        for s in self.of(Ty::Listener).values() {
            if let Model::Listener(_, names, secrets) = &s.model {
                rds.extend(names.iter().cloned());
                sds.extend(secrets.iter().cloned());
            }
        }
        let mut eds = BTreeSet::new();
        for s in self.of(Ty::Cluster).values() {
            if let Model::Cluster(c, eds_name) = &s.model {
                eds.extend(eds_name.iter().cloned());
                if let Some(t) = &c.tls {
                    sds.extend(t.common.secret_names().map(str::to_string));
                }
            }
        }
        // Secrets the bootstrap defines are not asked for.
        sds.retain(|n| !static_secrets.contains(n));
        [rds, eds, sds]
    }

    /// Follows what is referenced: new names are asked for (and timed), names nothing references
    /// any more are dropped (RDS and EDS are deleted implicitly).
    fn resubscribe(&mut self, now: Instant) -> Vec<(Ty, Vec<String>, Vec<String>)> {
        let [rds, eds, sds] = self.wanted(&self.static_secrets);
        let mut out = Vec::new();
        for (ty, want) in [(Ty::Endpoint, eds), (Ty::Route, rds), (Ty::Secret, sds)] {
            let have = &self.types[ty as usize].names;
            if *have == want {
                continue;
            }
            let added: Vec<String> = want.difference(have).cloned().collect();
            let removed: Vec<String> = have.difference(&want).cloned().collect();
            for n in &added {
                if !self.resources[ty as usize].contains_key(n) {
                    self.waiting.insert((ty, n.clone()), now);
                }
            }
            for n in &removed {
                self.resources[ty as usize].remove(n);
                self.waiting.remove(&(ty, n.clone()));
                self.absent.remove(&(ty, n.clone()));
            }
            self.types[ty as usize].names = want;
            out.push((ty, added, removed));
        }
        out
    }

    /// When the next wanted resource will count as absent.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.values().min().map(|t| *t + self.absent_after)
    }

    /// Marks resources wanted for longer than `absent_after` as absent; true if any were.
    pub fn expire(&mut self, now: Instant) -> Vec<(Ty, String)> {
        let after = self.absent_after;
        let late: Vec<(Ty, String)> = self
            .waiting
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= after)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &late {
            self.waiting.remove(k);
            self.absent.insert(k.clone());
        }
        late
    }

    /// True when every cluster has its endpoints (or they are known absent).
    pub fn clusters_warm(&self) -> bool {
        !self.waiting.keys().any(|(t, _)| *t == Ty::Endpoint)
    }

    /// True when every referenced resource has arrived or counts as absent: the configuration
    /// can be applied without a listener or cluster that is still warming.
    pub fn warm(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Every resource wanted again (a new stream): restarts the does-not-exist timers of those
    /// not received yet.
    pub fn restart_timers(&mut self, now: Instant) {
        for t in self.waiting.values_mut() {
            *t = now;
        }
    }

    /// Every EDS name with the clusters that take their endpoints from it.
    pub fn clusters_by_eds_name(&self) -> std::collections::HashMap<&str, Vec<&str>> {
        let mut out: std::collections::HashMap<&str, Vec<&str>> = std::collections::HashMap::new();
        for (name, s) in self.of(Ty::Cluster) {
            if let Model::Cluster(_, Some(eds)) = &s.model {
                out.entry(eds.as_str()).or_default().push(name.as_str());
            }
        }
        out
    }

    /// The endpoints EDS gave for `eds` (empty while absent).
    pub fn endpoints(&self, eds: &str) -> &[model::Endpoint] {
        match self.of(Ty::Endpoint).get(eds).map(|s| &s.model) {
            Some(Model::Endpoints(e)) => e,
            _ => &[],
        }
    }

    /// The whole configuration: `base` (the bootstrap's static part) with every dynamic cluster
    /// and listener. A route or TCP proxy naming a cluster nobody defined gets an empty one, so
    /// it answers 503 (no healthy upstream) as Envoy answers for an unknown cluster.
    pub fn assemble(&self, base: &model::Config) -> Result<model::Config, String> {
        let mut cfg = base.clone();
        for (name, s) in self.of(Ty::Cluster) {
            let Model::Cluster(c, eds) = &s.model else { continue };
            if cfg.clusters.iter().any(|x| x.name == *name) {
                return Err(format!(
                    "cluster `{name}` is defined both in static_resources and by CDS"
                ));
            }
            let mut c = (**c).clone();
            if let Some(eds) = eds {
                c.endpoints = self.endpoints(eds).to_vec();
            }
            cfg.clusters.push(c);
        }
        let routes = self.of(Ty::Route);
        let lookup = |name: &str| match routes.get(name).map(|s| &s.model) {
            Some(Model::Route(r)) => Some((**r).clone()),
            _ => None,
        };
        for (name, s) in self.of(Ty::Listener) {
            let Model::Listener(l, _, _) = &s.model else { continue };
            if cfg.listeners.iter().any(|x| x.name == *name) {
                return Err(format!(
                    "listener `{name}` is defined both in static_resources and by LDS"
                ));
            }
            let at = format!("listener \"{name}\"");
            let l = crate::listener::listener_with_rds(l, &at, Some(&lookup)).map_err(|errs| {
                let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
                list.join("; ")
            })?;
            cfg.listeners.push(l);
        }
        for (name, s) in self.of(Ty::Secret) {
            let Model::Secret(sec) = &s.model else { continue };
            if cfg.secrets.iter().any(|x| x.name == *name) {
                return Err(format!(
                    "secret `{name}` is defined both in static_resources and by SDS"
                ));
            }
            cfg.secrets.push((**sec).clone());
        }
        let mut missing = BTreeSet::new();
        for l in &cfg.listeners {
            for ch in &l.filter_chains {
                for n in crate::bootstrap::referenced_clusters(&ch.filter) {
                    if !cfg.clusters.iter().any(|c| c.name == n) {
                        missing.insert(n.to_string());
                    }
                }
            }
        }
        for n in missing {
            let empty = Cluster {
                name: n.clone(),
                ..Default::default()
            };
            let c = crate::cluster::cluster(&empty, &n).map_err(|e| format!("placeholder cluster `{n}`: {e:?}"))?;
            cfg.clusters.push(c);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests;

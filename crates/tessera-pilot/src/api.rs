//! The Open Service Registry API: REST + JSON here, gRPC (an event stream and stream-bound
//! sessions) in `api_grpc.rs`, both on one address. Registrations live in memory (persisted
//! with a store); an instance with a `ttl` is ephemeral and expires unless heart-beaten.
//!
//! ```text
//! GET    /v1/services                                             {revision, services}
//! PUT    /v1/namespaces/{ns}/services/{name}                      {ports, labels}
//! DELETE /v1/namespaces/{ns}/services/{name}
//! GET    /v1/namespaces/{ns}/services/{name}/instances[?watch=true&sinceRevision=N]
//! PUT    /v1/namespaces/{ns}/services/{name}/instances/{id}       {address, port|ports, labels, weight, healthy, ttl}
//! DELETE /v1/namespaces/{ns}/services/{name}/instances/{id}
//! POST   /v1/namespaces/{ns}/services/{name}/instances/{id}/heartbeat
//! ```
//! The OpenAPI document is `docs/openapi/registry.yaml` (and `GET /openapi.yaml`). Bodies are
//! checked as the file registry checks its files; a bad one is a 400 naming the
//! field. Every change bumps the revision; a watch returns as soon as the revision passes
//! `sinceRevision`, or after 30 s with the same revision.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::model::{Instance, Service, Snapshot};

pub mod grpc;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../../../docs/openapi/registry.yaml");

/// How long a watch waits for a change.
const WATCH_LIMIT: Duration = Duration::from_secs(30);
/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;
/// How many events the registry keeps for watches that resume from a revision.
const MAX_EVENTS: usize = 10_000;

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Registered.
    Added,
    /// Replaced by something different.
    Modified,
    /// Deregistered (or expired).
    Deleted,
}

/// What changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A service.
    Service(Service),
    /// An instance of the service `namespace/name`.
    Instance {
        /// `namespace/name`.
        service: String,
        /// Its id in the service.
        id: String,
        /// The instance (before the change, for a deletion).
        instance: Instance,
    },
}

impl Object {
    /// Namespace and service name.
    pub fn service_key(&self) -> (&str, &str) {
        match self {
            Object::Service(s) => (&s.namespace, &s.name),
            Object::Instance { service, .. } => service.split_once('/').unwrap_or((service, "")),
        }
    }
}

/// One change, with the revision that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The registry's revision after the change.
    pub revision: u64,
    /// Added, modified or deleted.
    pub kind: Kind,
    /// What.
    pub object: Object,
}

/// The events after a revision are no longer kept (or the revision is ahead of the registry's,
/// as after a restart): the watcher must start again from the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Events after this revision are kept.
    pub oldest: u64,
    /// The registry's revision.
    pub current: u64,
}

struct Registered {
    instance: Instance,
    /// Ephemeral: how long it lives without a heartbeat, and when it expires.
    ttl: Option<(Duration, Instant)>,
    /// With the etcd store: the lease the instance's key is attached to (0: none). etcd, not
    /// `ttl`, expires it then.
    lease: i64,
}

#[derive(Default)]
struct Inner {
    revision: u64,
    services: BTreeMap<String, Service>,
    instances: BTreeMap<String, BTreeMap<String, Registered>>,
    /// The last changes, oldest first; every change after `floor` is here.
    log: VecDeque<Event>,
    floor: u64,
}

impl Inner {
    /// Appends `changes` to the log at the current revision, dropping the oldest past the limit.
    fn record(&mut self, changes: Vec<(Kind, Object)>) {
        let revision = self.revision;
        self.log.extend(
            changes
                .into_iter()
                .map(|(kind, object)| Event { revision, kind, object }),
        );
        while self.log.len() > MAX_EVENTS {
            if let Some(e) = self.log.pop_front() {
                self.floor = e.revision;
            }
        }
    }

    /// The changes that turn `self` into `next` (a whole new view, as from etcd).
    fn diff(&self, next: &Inner) -> Vec<(Kind, Object)> {
        let mut out = Vec::new();
        let empty = BTreeMap::new();
        for (key, s) in &next.services {
            match self.services.get(key) {
                None => out.push((Kind::Added, Object::Service(s.clone()))),
                Some(old) if old != s => out.push((Kind::Modified, Object::Service(s.clone()))),
                Some(_) => {}
            }
        }
        let keys: std::collections::BTreeSet<&String> = self.instances.keys().chain(next.instances.keys()).collect();
        for key in keys {
            let (old, new) = (
                self.instances.get(key).unwrap_or(&empty),
                next.instances.get(key).unwrap_or(&empty),
            );
            let obj = |id: &String, r: &Registered| Object::Instance {
                service: key.clone(),
                id: id.clone(),
                instance: r.instance.clone(),
            };
            for (id, r) in new {
                match old.get(id) {
                    None => out.push((Kind::Added, obj(id, r))),
                    Some(o) if o.instance != r.instance => out.push((Kind::Modified, obj(id, r))),
                    Some(_) => {}
                }
            }
            for (id, r) in old {
                if !new.contains_key(id) {
                    out.push((Kind::Deleted, obj(id, r)));
                }
            }
        }
        for (key, s) in &self.services {
            if !next.services.contains_key(key) {
                out.push((Kind::Deleted, Object::Service(s.clone())));
            }
        }
        out
    }

    /// The instance events of a whole service's instances.
    fn instance_events(&self, key: &str, kind: Kind) -> Vec<(Kind, Object)> {
        self.instances
            .get(key)
            .into_iter()
            .flatten()
            .map(|(id, r)| {
                (
                    kind,
                    Object::Instance {
                        service: key.to_string(),
                        id: id.clone(),
                        instance: r.instance.clone(),
                    },
                )
            })
            .collect()
    }
}

/// The registry behind the API.
pub struct ApiRegistry {
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Where registrations are persisted, when a store is configured.
    store: Option<std::sync::mpsc::Sender<crate::store::Op>>,
    /// The shared etcd store: registrations are written there, and `inner` follows it.
    etcd: Option<Arc<crate::etcd::store::EtcdStore>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, &json!({"error": msg.into()}))
}

fn ttl(v: &Value) -> Result<Option<Duration>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            let (n, unit) = s
                .find(|c: char| !c.is_ascii_digit())
                .map(|i| s.split_at(i))
                .ok_or("no unit")?;
            let n: u64 = n.parse().map_err(|_| "not a number")?;
            let d = match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n * 60),
                _ => return Err("use ms, s or m".into()),
            };
            if d < Duration::from_millis(100) {
                return Err("at least 100ms".into());
            }
            Ok(Some(d))
        }
        _ => Err("a duration such as 30s".into()),
    }
}

fn ports_json(s: &Service) -> Value {
    Value::Array(
        s.ports
            .iter()
            .map(|p| {
                let proto = p.protocol.name();
                json!({"name": p.name, "port": p.port, "protocol": proto})
            })
            .collect(),
    )
}

/// Why a body was refused: one message, or the checker's list.
pub(crate) enum Refused {
    Message(String),
    Problems(Vec<crate::Problem>),
}

impl Refused {
    pub(crate) fn reply(self) -> Response<Full<Bytes>> {
        match self {
            Refused::Message(m) => error(StatusCode::BAD_REQUEST, m),
            Refused::Problems(p) => problems_reply(&p),
        }
    }
}

/// A service from a PUT body (`{ports, labels}`), checked as registry files are; problems name
/// `file` (the request body, or the etcd key holding it).
pub(crate) fn service_from(ns: &str, name: &str, body: &Value, file: &str, source: &str) -> Result<Service, Refused> {
    let Some(o) = body.as_object() else {
        return Err(Refused::Message(format!("{file}: expected a JSON object")));
    };
    if let Some(k) = o.keys().find(|k| !["ports", "labels"].contains(&k.as_str())) {
        return Err(Refused::Message(format!(
            "{file}: {k}: unknown field (known: ports, labels)"
        )));
    }
    let mut svc = serde_json::Map::new();
    svc.insert("name".into(), json!(name));
    svc.insert("namespace".into(), json!(ns));
    for (k, v) in o {
        svc.insert(k.clone(), v.clone());
    }
    let doc = json!({"services": [svc]});
    let mut snap = crate::file::parse_value(&doc, file, source).map_err(Refused::Problems)?;
    snap.services
        .remove(&format!("{ns}/{name}"))
        .ok_or_else(|| Refused::Message(format!("{file}: no service")))
}

/// An instance of `service` from a PUT body, and its TTL; the body without `ttl` is what persists.
pub(crate) fn instance_from(
    service: &Service,
    body: &Value,
    file: &str,
    source: &str,
) -> Result<(Instance, Option<Duration>, Value), Refused> {
    let Some(o) = body.as_object() else {
        return Err(Refused::Message(format!("{file}: expected a JSON object")));
    };
    let ttl = ttl(o.get("ttl").unwrap_or(&Value::Null)).map_err(|e| Refused::Message(format!("{file}: ttl: {e}")))?;
    let mut inst = o.clone();
    inst.remove("ttl");
    let doc = json!({"services": [{
        "name": service.name, "namespace": service.namespace, "ports": ports_json(service), "instances": [inst.clone()],
    }]});
    let key = format!("{}/{}", service.namespace, service.name);
    let mut snap = crate::file::parse_value(&doc, file, source).map_err(Refused::Problems)?;
    let instance = snap
        .instances
        .remove(&key)
        .and_then(|v| std::sync::Arc::unwrap_or_clone(v).pop())
        .ok_or_else(|| Refused::Message(format!("{file}: no instance")))?;
    Ok((instance, ttl, Value::Object(inst)))
}

impl ApiRegistry {
    /// An empty registry, in memory only.
    pub fn new() -> Arc<ApiRegistry> {
        Arc::new(ApiRegistry {
            inner: Mutex::new(Inner::default()),
            changed: tokio::sync::watch::channel(0).0,
            store: None,
            etcd: None,
        })
    }

    /// A registry whose registrations live in etcd (`store.etcd`), shared by every Pilot
    /// replica on the same prefix: this one follows the prefix (range, then watch) and serves
    /// what it holds; writes go to etcd and are answered once this replica's view has them.
    /// While etcd is away the view stays as last seen and writes answer 503. Call inside a
    /// tokio runtime: the follower is a task.
    pub fn etcd(cfg: &crate::etcd::EtcdConfig) -> Arc<ApiRegistry> {
        let st = Arc::new(crate::etcd::store::EtcdStore::new(cfg.clone()));
        let reg = Arc::new(ApiRegistry {
            inner: Mutex::new(Inner::default()),
            changed: tokio::sync::watch::channel(0).0,
            store: None,
            etcd: Some(st.clone()),
        });
        let weak = Arc::downgrade(&reg);
        tokio::spawn(async move {
            let prefix = st.watch_prefix();
            let mut reported: BTreeMap<String, i64> = BTreeMap::new();
            let mut cache = crate::etcd::layout::Cache::default();
            let endpoints = st.cfg.endpoints.join(",");
            let on_view = |m: &crate::etcd::follow::Mirror| {
                let Some(reg) = weak.upgrade() else { return };
                let source = |k: &crate::etcd::layout::Key, _: &str| match k {
                    crate::etcd::layout::Key::Instance { id, .. } => format!("api:{id}"),
                    crate::etcd::layout::Key::Service { .. } => "api".to_string(),
                };
                let (read, skipped) = crate::etcd::layout::read(&st.cfg.prefix, "default", &m.kvs, &source, &mut cache);
                reported.retain(|k, _| m.kvs.contains_key(k));
                for sk in skipped {
                    let rev = m.kvs.get(&sk.key).map_or(0, |v| v.mod_revision);
                    if reported.insert(sk.key.clone(), rev) != Some(rev) {
                        tracing::error!(store = "etcd", key = %sk.key, reason = %sk.reason, "registry store: value skipped");
                    }
                }
                let mut next = Inner {
                    revision: u64::try_from(m.revision).unwrap_or(0),
                    ..Inner::default()
                };
                for (k, rs) in read {
                    let list = rs
                        .instances
                        .into_iter()
                        .map(|(id, ri)| {
                            (
                                id,
                                Registered {
                                    instance: ri.instance,
                                    ttl: None,
                                    lease: ri.lease,
                                },
                            )
                        })
                        .collect();
                    next.instances.insert(k.clone(), list);
                    next.services.insert(k, rs.service);
                }
                let rev = next.revision;
                let mut inner = lock(&reg.inner);
                let changes = inner.diff(&next);
                next.log = std::mem::take(&mut inner.log);
                next.floor = inner.floor;
                *inner = next;
                if !changes.is_empty() {
                    inner.record(changes);
                }
                drop(inner);
                reg.changed.send_replace(rev);
            };
            let on_down = |e: &crate::etcd::client::EtcdError, wait: Duration| {
                tracing::warn!(store = "etcd", endpoints = %endpoints, error = %e, retry_in = ?wait, "registry store (etcd) unreachable; serving the last view and reconnecting");
            };
            crate::etcd::follow::follow(&st.client, &prefix, on_view, on_down).await;
        });
        reg
    }

    /// Waits (up to 5 s) until this replica's view has revision `rev`, so that a client reads
    /// its own write from the replica it wrote through.
    async fn caught_up(&self, rev: u64) {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while *rx.borrow_and_update() < rev {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }

    /// The write routes with the etcd store.
    async fn write_etcd(
        &self,
        st: &crate::etcd::store::EtcdStore,
        method: &Method,
        path: &[&str],
        body: Result<Value, String>,
    ) -> Response<Full<Bytes>> {
        let unavailable = |e: crate::etcd::client::EtcdError| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the registry store (etcd) is unavailable: {e}"),
            )
        };
        let done = |rev: i64, created: bool| async move {
            let rev = u64::try_from(rev).unwrap_or(0);
            self.caught_up(rev).await;
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            reply(status, &json!({"revision": rev}))
        };
        match (method, path) {
            (&Method::PUT, ["v1", "namespaces", ns, "services", name]) => {
                let b = match body {
                    Ok(b) => b,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                if let Err(r) = service_from(ns, name, &b, "request body", "api") {
                    return r.reply();
                }
                match st.put_service(ns, name, &b).await {
                    Ok((rev, created)) => done(rev, created).await,
                    Err(e) => unavailable(e),
                }
            }
            (&Method::DELETE, ["v1", "namespaces", ns, "services", name]) => match st.delete_service(ns, name).await {
                Ok(Some(rev)) => done(rev, false).await,
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    format!("service `{ns}/{name}` is not registered"),
                ),
                Err(e) => unavailable(e),
            },
            (&Method::PUT, ["v1", "namespaces", ns, "services", name, "instances", id]) => {
                let key = format!("{ns}/{name}");
                let b = match body {
                    Ok(b) => b,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                let service = lock(&self.inner).services.get(&key).cloned();
                let not_found = || {
                    error(
                        StatusCode::NOT_FOUND,
                        format!("service `{key}` is not registered through this API; PUT it first"),
                    )
                };
                let Some(service) = service else {
                    return not_found();
                };
                let ttl = match instance_from(&service, &b, "request body", &format!("api:{id}")) {
                    Ok((_, ttl, _)) => ttl,
                    Err(r) => return r.reply(),
                };
                // The body as given, `ttl` included: every replica lists it.
                match st.put_instance(ns, name, id, &b, ttl).await {
                    Ok(Some((rev, created))) => done(rev, created).await,
                    Ok(None) => not_found(),
                    Err(e) => unavailable(e),
                }
            }
            (&Method::DELETE, ["v1", "namespaces", ns, "services", name, "instances", id]) => {
                match st.delete_instance(ns, name, id).await {
                    Ok(Some(rev)) => done(rev, false).await,
                    Ok(None) => error(
                        StatusCode::NOT_FOUND,
                        format!("instance `{id}` of `{ns}/{name}` is not registered"),
                    ),
                    Err(e) => unavailable(e),
                }
            }
            (&Method::POST, ["v1", "namespaces", ns, "services", name, "instances", id, "heartbeat"]) => {
                let key = format!("{ns}/{name}");
                let gone = || {
                    error(
                        StatusCode::NOT_FOUND,
                        format!("instance `{id}` of `{key}` is not registered (it may have expired)"),
                    )
                };
                let (lease, revision) = {
                    let inner = lock(&self.inner);
                    let lease = inner.instances.get(&key).and_then(|m| m.get(*id)).map(|r| r.lease);
                    (lease, inner.revision)
                };
                match lease {
                    None => gone(),
                    Some(0) => reply(StatusCode::OK, &json!({"revision": revision})),
                    Some(l) => match st.heartbeat(l).await {
                        Ok(true) => reply(StatusCode::OK, &json!({"revision": revision})),
                        Ok(false) => gone(),
                        Err(e) => unavailable(e),
                    },
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} /{}", path.join("/")),
            ),
        }
    }

    /// A registry persisted in the redb file at `path`: what it holds is registered again
    /// (entries that no longer pass the checks are logged and skipped).
    pub fn open(path: &std::path::Path) -> Result<Arc<ApiRegistry>, crate::store::StoreError> {
        let ((services, instances), tx) = crate::store::open(path)?;
        let mut inner = Inner::default();
        for (key, body) in services {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            match serde_json::from_str::<Value>(&body)
                .map_err(|e| Refused::Message(e.to_string()))
                .and_then(|b| service_from(ns, name, &b, "request body", "api"))
            {
                Ok(s) => {
                    inner.services.insert(key, s);
                }
                Err(_) => {
                    tracing::error!(store = %path.display(), service = %key, "a stored service no longer passes the checks; skipped")
                }
            }
        }
        for (key, body) in instances {
            let mut parts = key.rsplitn(2, '/');
            let (Some(id), Some(svc_key)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(service) = inner.services.get(svc_key).cloned() else {
                continue;
            };
            match serde_json::from_str::<Value>(&body)
                .map_err(|e| Refused::Message(e.to_string()))
                .and_then(|b| instance_from(&service, &b, "request body", &format!("api:{id}")))
            {
                Ok((instance, _, _)) => {
                    inner.instances.entry(svc_key.to_string()).or_default().insert(
                        id.to_string(),
                        Registered {
                            instance,
                            ttl: None,
                            lease: 0,
                        },
                    );
                }
                Err(_) => {
                    tracing::error!(store = %path.display(), instance = %key, "a stored instance no longer passes the checks; skipped")
                }
            }
        }
        tracing::info!(
            store = %path.display(),
            services = inner.services.len(),
            instances = inner.instances.values().map(BTreeMap::len).sum::<usize>(),
            "registrations loaded"
        );
        inner.revision = 1;
        inner.floor = 1;
        Ok(Arc::new(ApiRegistry {
            inner: Mutex::new(inner),
            changed: tokio::sync::watch::channel(1).0,
            store: Some(tx),
            etcd: None,
        }))
    }

    fn persist(&self, op: crate::store::Op) {
        if let Some(tx) = &self.store
            && tx.send(op).is_err()
        {
            tracing::error!("the store's writer has stopped; registrations are not persisted");
        }
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A new revision made of `changes`.
    fn bump(&self, inner: &mut Inner, changes: Vec<(Kind, Object)>) -> u64 {
        inner.revision += 1;
        inner.record(changes);
        self.changed.send_replace(inner.revision);
        inner.revision
    }

    /// The current state as ADDED events of the services `filter` keeps (by namespace and
    /// name), and its revision.
    pub fn state(&self, filter: impl Fn(&str, &str) -> bool) -> (u64, Vec<Event>) {
        let inner = lock(&self.inner);
        let revision = inner.revision;
        let mut out = Vec::new();
        for (key, s) in &inner.services {
            if !filter(&s.namespace, &s.name) {
                continue;
            }
            out.push(Event {
                revision,
                kind: Kind::Added,
                object: Object::Service(s.clone()),
            });
            out.extend(
                inner
                    .instance_events(key, Kind::Added)
                    .into_iter()
                    .map(|(kind, object)| Event { revision, kind, object }),
            );
        }
        (revision, out)
    }

    /// Up to `max` events after revision `after` (whole revisions, unless one revision alone
    /// is larger) that `filter` keeps, and the revision they bring a watcher to.
    pub fn events_after(
        &self,
        after: u64,
        max: usize,
        filter: impl Fn(&str, &str) -> bool,
    ) -> Result<(Vec<Event>, u64), Compacted> {
        let inner = lock(&self.inner);
        if after < inner.floor || after > inner.revision {
            return Err(Compacted {
                oldest: inner.floor,
                current: inner.revision,
            });
        }
        let start = inner.log.partition_point(|e| e.revision <= after);
        let mut out = Vec::new();
        let (mut reached, mut taken, mut exhausted) = (after, 0, true);
        for e in inner.log.range(start..) {
            if e.revision != reached && taken >= max {
                exhausted = false;
                break;
            }
            reached = e.revision;
            taken += 1;
            let (ns, name) = e.object.service_key();
            if filter(ns, name) {
                out.push(e.clone());
            }
        }
        // Revisions without events of their own (an etcd revision elsewhere in the keyspace)
        // count as seen once every kept event is.
        if exhausted {
            reached = inner.revision;
        }
        Ok((out, reached))
    }

    /// What is registered, for the service model.
    pub fn snapshot(&self) -> Snapshot {
        let inner = lock(&self.inner);
        Snapshot {
            services: inner.services.clone(),
            instances: inner
                .services
                .keys()
                .map(|k| {
                    let list = inner
                        .instances
                        .get(k)
                        .map(|m| std::sync::Arc::new(m.values().map(|r| r.instance.clone()).collect()))
                        .unwrap_or_default();
                    (k.clone(), list)
                })
                .collect(),
        }
    }

    /// Registers (or replaces) instance `id` of the service `key` in memory; `stored`, the
    /// body to persist (None: ephemeral, not persisted). The revision, and whether it is new.
    pub(crate) fn put_instance_mem(
        &self,
        key: &str,
        id: &str,
        instance: Instance,
        ttl: Option<Duration>,
        stored: Option<Value>,
    ) -> (u64, bool) {
        let mut inner = lock(&self.inner);
        let m = inner.instances.entry(key.to_string()).or_default();
        let old = m.insert(
            id.to_string(),
            Registered {
                instance: instance.clone(),
                ttl: ttl.map(|d| (d, Instant::now() + d)),
                lease: 0,
            },
        );
        let kind = if old.is_none() { Kind::Added } else { Kind::Modified };
        let object = Object::Instance {
            service: key.to_string(),
            id: id.to_string(),
            instance,
        };
        let revision = self.bump(&mut inner, vec![(kind, object)]);
        let skey = format!("{key}/{id}");
        self.persist(match stored {
            Some(b) => crate::store::Op::PutInstance(skey, b.to_string()),
            None => crate::store::Op::DeleteInstance(skey),
        });
        (revision, old.is_none())
    }

    /// Deregisters instance `id` of the service `key` held in memory; the revision, or None
    /// when it is not registered.
    pub(crate) fn delete_instance_mem(&self, key: &str, id: &str) -> Option<u64> {
        let mut inner = lock(&self.inner);
        let gone = inner.instances.get_mut(key).and_then(|m| m.remove(id))?;
        let object = Object::Instance {
            service: key.to_string(),
            id: id.to_string(),
            instance: gone.instance,
        };
        let revision = self.bump(&mut inner, vec![(Kind::Deleted, object)]);
        self.persist(crate::store::Op::DeleteInstance(format!("{key}/{id}")));
        Some(revision)
    }

    /// Drops ephemeral instances whose TTL ran out; how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut inner = lock(&self.inner);
        let mut gone = Vec::new();
        for (svc, m) in inner.instances.iter_mut() {
            m.retain(|id, r| {
                let alive = r.ttl.is_none_or(|(_, until)| until > now);
                if !alive {
                    tracing::info!(service = %svc, instance = %id, "instance expired (no heartbeat within its ttl)");
                    gone.push((
                        Kind::Deleted,
                        Object::Instance {
                            service: svc.clone(),
                            id: id.clone(),
                            instance: r.instance.clone(),
                        },
                    ));
                }
                alive
            });
        }
        let n = gone.len();
        if n > 0 {
            self.bump(&mut inner, gone);
        }
        n
    }

    /// Serves one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")),
        };
        let path: Vec<&str> = parts.uri.path().trim_matches('/').split('/').collect();
        let query = parts.uri.query().unwrap_or("");
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
        };
        // The error is the message of a 400.
        let json_body = || -> Result<Value, String> {
            if body.is_empty() {
                return Ok(json!({}));
            }
            serde_json::from_slice(&body).map_err(|e| format!("request body: not JSON: {e}"))
        };
        if let Some(st) = self.etcd.clone()
            && parts.method != Method::GET
        {
            return self.write_etcd(&st, &parts.method, &path, json_body()).await;
        }
        match (&parts.method, path.as_slice()) {
            (&Method::GET, ["openapi.yaml"]) => {
                let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/yaml"),
                );
                r
            }
            (&Method::GET, ["v1", "services"]) => {
                let inner = lock(&self.inner);
                let list: Vec<Value> = inner
                    .services
                    .values()
                    .map(|s| json!({"namespace": s.namespace, "name": s.name, "ports": ports_json(s), "labels": s.labels}))
                    .collect();
                reply(StatusCode::OK, &json!({"revision": inner.revision, "services": list}))
            }
            (&Method::PUT, ["v1", "namespaces", ns, "services", name]) => {
                let b = match json_body() {
                    Ok(b) => b,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                match service_from(ns, name, &b, "request body", "api") {
                    Ok(service) => {
                        let key = format!("{ns}/{name}");
                        let mut inner = lock(&self.inner);
                        let created = !inner.services.contains_key(&key);
                        let kind = match inner.services.insert(key.clone(), service.clone()) {
                            None => Kind::Added,
                            Some(_) => Kind::Modified,
                        };
                        let revision = self.bump(&mut inner, vec![(kind, Object::Service(service))]);
                        self.persist(crate::store::Op::PutService(key, b.to_string()));
                        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                        reply(status, &json!({"revision": revision}))
                    }
                    Err(r) => r.reply(),
                }
            }
            (&Method::DELETE, ["v1", "namespaces", ns, "services", name]) => {
                let key = format!("{ns}/{name}");
                let mut inner = lock(&self.inner);
                let Some(service) = inner.services.remove(&key) else {
                    return error(StatusCode::NOT_FOUND, format!("service `{key}` is not registered"));
                };
                let mut changes = inner.instance_events(&key, Kind::Deleted);
                changes.push((Kind::Deleted, Object::Service(service)));
                inner.instances.remove(&key);
                let revision = self.bump(&mut inner, changes);
                self.persist(crate::store::Op::DeleteService(key));
                reply(StatusCode::OK, &json!({"revision": revision}))
            }
            (&Method::GET, ["v1", "namespaces", ns, "services", name, "instances"]) => {
                let key = format!("{ns}/{name}");
                if param("watch") == Some("true") {
                    let since: u64 = param("sinceRevision").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let mut rx = self.subscribe();
                    let deadline = tokio::time::Instant::now() + WATCH_LIMIT;
                    while *rx.borrow_and_update() <= since {
                        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                            break;
                        }
                    }
                }
                let inner = lock(&self.inner);
                if !inner.services.contains_key(&key) {
                    return error(StatusCode::NOT_FOUND, format!("service `{key}` is not registered"));
                }
                let now = Instant::now();
                let list: Vec<Value> = inner
                    .instances
                    .get(&key)
                    .map(|m| {
                        m.iter()
                            .map(|(id, r)| {
                                let i = &r.instance;
                                json!({
                                    "id": id, "address": i.address.to_string(), "ports": i.ports,
                                    "labels": i.labels, "weight": i.weight, "healthy": i.healthy,
                                    "ttl_remaining_ms": r.ttl.map(|(_, until)| until.saturating_duration_since(now).as_millis() as u64),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                reply(StatusCode::OK, &json!({"revision": inner.revision, "instances": list}))
            }
            (&Method::PUT, ["v1", "namespaces", ns, "services", name, "instances", id]) => {
                let key = format!("{ns}/{name}");
                let b = match json_body() {
                    Ok(b) => b,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                let service = lock(&self.inner).services.get(&key).cloned();
                let Some(service) = service else {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("service `{key}` is not registered through this API; PUT it first"),
                    );
                };
                match instance_from(&service, &b, "request body", &format!("api:{id}")) {
                    Ok((instance, ttl, stored)) => {
                        // Only instances without a TTL persist; ephemeral ones re-register.
                        let stored = ttl.is_none().then_some(stored);
                        let (revision, created) = self.put_instance_mem(&key, id, instance, ttl, stored);
                        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                        reply(status, &json!({"revision": revision}))
                    }
                    Err(r) => r.reply(),
                }
            }
            (&Method::DELETE, ["v1", "namespaces", ns, "services", name, "instances", id]) => {
                let key = format!("{ns}/{name}");
                match self.delete_instance_mem(&key, id) {
                    Some(revision) => reply(StatusCode::OK, &json!({"revision": revision})),
                    None => error(
                        StatusCode::NOT_FOUND,
                        format!("instance `{id}` of `{key}` is not registered"),
                    ),
                }
            }
            (&Method::POST, ["v1", "namespaces", ns, "services", name, "instances", id, "heartbeat"]) => {
                let key = format!("{ns}/{name}");
                let mut inner = lock(&self.inner);
                let Some(r) = inner.instances.get_mut(&key).and_then(|m| m.get_mut(*id)) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("instance `{id}` of `{key}` is not registered (it may have expired)"),
                    );
                };
                if let Some((d, until)) = &mut r.ttl {
                    *until = Instant::now() + *d;
                }
                let revision = inner.revision;
                reply(StatusCode::OK, &json!({"revision": revision}))
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {} {}", parts.method, parts.uri.path()),
            ),
        }
    }
}

fn problems_reply(problems: &[crate::Problem]) -> Response<Full<Bytes>> {
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    reply(
        StatusCode::BAD_REQUEST,
        &json!({"error": list.first().cloned().unwrap_or_default(), "problems": list}),
    )
}

/// How often an HTTP/2 connection of the API is pinged, and how long a ping may go unanswered
/// before the connection (and every session on it) is dropped.
const PING: Duration = Duration::from_secs(10);

/// Serves the API on `listener` until the future is dropped: REST over HTTP/1.1 or HTTP/2,
/// and gRPC (`content-type: application/grpc`) over HTTP/2.
pub async fn serve(listener: tokio::net::TcpListener, reg: Arc<ApiRegistry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let reg = reg.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reg = reg.clone();
                async move {
                    let grpc = req
                        .headers()
                        .get(hyper::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    let resp = if grpc {
                        grpc::handle(reg, req).map(http_body_util::Either::Right)
                    } else {
                        reg.handle(req).await.map(http_body_util::Either::Left)
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(PING))
                .keep_alive_timeout(PING);
            let _ = b.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> Service {
        Service {
            namespace: "ns".into(),
            name: name.into(),
            ports: Vec::new(),
            labels: BTreeMap::new(),
            source: "api".into(),
        }
    }

    fn instance(weight: u32) -> Instance {
        Instance {
            address: std::net::IpAddr::from([10, 0, 0, 1]),
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
            weight,
            healthy: true,
            locality: None,
            source: "api:x".into(),
        }
    }

    fn kinds(events: &[Event]) -> Vec<(u64, Kind)> {
        events.iter().map(|e| (e.revision, e.kind)).collect()
    }

    /// Every change is an event at the revision that made it; a watcher resumes from any kept
    /// revision, and one too old or ahead is told so instead of missing events.
    #[test]
    fn the_event_log_replays_changes_after_a_revision() {
        let reg = ApiRegistry::new();
        lock(&reg.inner).services.insert("ns/a".into(), service("a"));
        let (r1, _) = reg.put_instance_mem("ns/a", "i1", instance(1), None, None);
        let (r2, created) = reg.put_instance_mem("ns/a", "i1", instance(2), None, None);
        assert!(!created);
        let r3 = reg.delete_instance_mem("ns/a", "i1").expect("registered");
        assert_eq!(reg.delete_instance_mem("ns/a", "i1"), None);
        let all = |_: &str, _: &str| true;
        let (events, reached) = reg.events_after(0, 100, all).expect("kept");
        assert_eq!(
            kinds(&events),
            [(r1, Kind::Added), (r2, Kind::Modified), (r3, Kind::Deleted)]
        );
        assert_eq!(reached, r3);
        let (events, _) = reg.events_after(r1, 100, all).expect("kept");
        assert_eq!(kinds(&events), [(r2, Kind::Modified), (r3, Kind::Deleted)]);
        // A deletion carries what was deleted.
        assert!(matches!(&events[1].object, Object::Instance { instance, .. } if instance.weight == 2));
        // Batches end at a revision boundary and say how far they got.
        let (events, reached) = reg.events_after(0, 1, all).expect("kept");
        assert_eq!((events.len(), reached), (1, r1));
        // Filtered out: no events, but the watcher still reaches the current revision.
        let (events, reached) = reg.events_after(0, 100, |ns, _| ns == "other").expect("kept");
        assert_eq!((events.len(), reached), (0, r3));
        assert_eq!(
            reg.events_after(r3 + 5, 100, all),
            Err(Compacted { oldest: 0, current: r3 })
        );
        // Past the log's limit the oldest events go, and a watcher from before them is refused.
        for i in 0..MAX_EVENTS {
            reg.put_instance_mem("ns/a", "i2", instance(1 + (i % 100) as u32), None, None);
        }
        let floor = match reg.events_after(r1, 100, all) {
            Err(c) => c.oldest,
            Ok(_) => panic!("events from r1 are no longer kept"),
        };
        assert!(floor > r1);
        assert!(reg.events_after(floor, 100, all).is_ok());
        // The state is every service and instance, as ADDED at the current revision.
        let (rev, state) = reg.state(all);
        assert_eq!(kinds(&state), [(rev, Kind::Added), (rev, Kind::Added)]);
    }

    /// A whole new view (as the etcd store delivers) becomes the events between the two.
    #[test]
    fn a_new_view_becomes_the_events_between_the_two() {
        let reg = |weights: &[(&str, u32)], services: &[&str]| {
            let mut inner = Inner::default();
            for s in services {
                inner.services.insert(format!("ns/{s}"), service(s));
            }
            for (id, w) in weights {
                inner.instances.entry("ns/a".into()).or_default().insert(
                    (*id).to_string(),
                    Registered {
                        instance: instance(*w),
                        ttl: None,
                        lease: 0,
                    },
                );
            }
            inner
        };
        let old = reg(&[("i1", 1), ("i2", 1)], &["a", "b"]);
        let new = reg(&[("i2", 3), ("i3", 1)], &["a", "c"]);
        let got: Vec<(Kind, String)> = old
            .diff(&new)
            .into_iter()
            .map(|(k, o)| {
                let what = match o {
                    Object::Service(s) => s.name,
                    Object::Instance { id, .. } => id,
                };
                (k, what)
            })
            .collect();
        let want = [
            (Kind::Added, "c"),
            (Kind::Modified, "i2"),
            (Kind::Added, "i3"),
            (Kind::Deleted, "i1"),
            (Kind::Deleted, "b"),
        ];
        assert_eq!(got, want.map(|(k, w)| (k, w.to_string())));
        assert!(old.diff(&reg(&[("i1", 1), ("i2", 1)], &["a", "b"])).is_empty());
    }

    /// The OpenAPI document parses and describes exactly the routes `handle` serves.
    #[test]
    fn the_openapi_document_matches_the_routes() {
        let doc = tessera_xds::load::yaml_to_json(OPENAPI).expect("the OpenAPI document is YAML");
        assert_eq!(doc["openapi"], "3.0.3");
        let mut documented: Vec<String> = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for m in ["get", "put", "post", "delete"] {
                if item.get(m).is_some() {
                    documented.push(format!("{} {path}", m.to_uppercase()));
                }
            }
        }
        documented.sort();
        let served = [
            "DELETE /v1/namespaces/{ns}/services/{name}",
            "DELETE /v1/namespaces/{ns}/services/{name}/instances/{id}",
            "GET /v1/namespaces/{ns}/services/{name}/instances",
            "GET /v1/services",
            "POST /v1/namespaces/{ns}/services/{name}/instances/{id}/heartbeat",
            "PUT /v1/namespaces/{ns}/services/{name}",
            "PUT /v1/namespaces/{ns}/services/{name}/instances/{id}",
        ];
        assert_eq!(documented, served);
        // Every field the instance body accepts is documented, and nothing else.
        let props: Vec<&String> = doc["components"]["schemas"]["InstanceIn"]["properties"]
            .as_object()
            .expect("InstanceIn")
            .keys()
            .collect();
        let mut props: Vec<&str> = props.iter().map(|s| s.as_str()).collect();
        props.sort();
        assert_eq!(
            props,
            [
                "address", "healthy", "labels", "locality", "port", "ports", "ttl", "weight"
            ]
        );
    }
}

//! The Open Service Registry API, gRPC part: the service `tessera.registry.v1.Registry` of
//! `proto/tessera/registry/v1/registry.proto`, served on the REST API's address (a request
//! with `content-type: application/grpc` is gRPC).
//!
//! - `Watch`: the registry's changes as ADDED / MODIFIED / DELETED events with revisions, from
//!   the registry's event log (`Inner::log`); from revision 0 the current state comes first.
//! - `Session`: an instance registered for as long as its stream lives. In memory (and with
//!   the redb store) it is ephemeral and never persisted; with the etcd store it is written on
//!   a lease of [`SESSION_TTL`] that this stream keeps alive, so that a Pilot that dies takes
//!   its sessions' instances with it within the TTL.
//!
//! The messages are hand-written prost structs matching the proto; the test
//! `tests/registry_grpc.rs` calls this server through stubs that grpcio-tools generates from
//! the proto, so the two cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tessera_xds::grpc_wire::{self, Msg, MsgBody, ReadEnd, Reader};
use tokio::sync::mpsc;

use super::{ApiRegistry, Event, Kind, Object, Refused, instance_from, lock};

/// The watch method.
pub const WATCH_PATH: &str = "/tessera.registry.v1.Registry/Watch";
/// The session method.
pub const SESSION_PATH: &str = "/tessera.registry.v1.Registry/Session";
/// With the etcd store, the lease a session's instance lives on; the stream renews it every
/// third of it.
pub const SESSION_TTL: Duration = Duration::from_secs(10);
/// Events per watch response.
const BATCH: usize = 500;

/// A service port.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PortMsg {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Port.
    #[prost(uint32, tag = "2")]
    pub port: u32,
    /// Protocol name.
    #[prost(string, tag = "3")]
    pub protocol: String,
}

/// A service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceMsg {
    /// Namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Ports.
    #[prost(message, repeated, tag = "3")]
    pub ports: Vec<PortMsg>,
    /// Labels.
    #[prost(btree_map = "string, string", tag = "4")]
    pub labels: BTreeMap<String, String>,
    /// Which registry defined it.
    #[prost(string, tag = "5")]
    pub source: String,
}

/// An instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstanceMsg {
    /// Namespace of its service.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Its service.
    #[prost(string, tag = "2")]
    pub service: String,
    /// Id in the service.
    #[prost(string, tag = "3")]
    pub id: String,
    /// IP address.
    #[prost(string, tag = "4")]
    pub address: String,
    /// Port by service port name.
    #[prost(btree_map = "string, uint32", tag = "5")]
    pub ports: BTreeMap<String, u32>,
    /// One port for every service port (requests only).
    #[prost(uint32, tag = "6")]
    pub port: u32,
    /// Labels.
    #[prost(btree_map = "string, string", tag = "7")]
    pub labels: BTreeMap<String, String>,
    /// Weight; 0 means 1.
    #[prost(uint32, tag = "8")]
    pub weight: u32,
    /// Unset means healthy.
    #[prost(bool, optional, tag = "9")]
    pub healthy: Option<bool>,
    /// `region/zone/sub_zone`.
    #[prost(string, tag = "10")]
    pub locality: String,
    /// Which registry registered it.
    #[prost(string, tag = "11")]
    pub source: String,
}

/// `Watch`'s request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    /// Only this namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Only this service of the namespace.
    #[prost(string, tag = "2")]
    pub service: String,
    /// 0: the state, then changes; N: the changes after N.
    #[prost(uint64, tag = "3")]
    pub since_revision: u64,
}

/// ADDED, MODIFIED, DELETED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EventType {
    /// Registered.
    Added = 0,
    /// Replaced.
    Modified = 1,
    /// Deregistered.
    Deleted = 2,
}

/// What an event is about.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EventObject {
    /// A service.
    #[prost(message, tag = "3")]
    Service(ServiceMsg),
    /// An instance.
    #[prost(message, tag = "4")]
    Instance(InstanceMsg),
}

/// One event.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventMsg {
    /// ADDED, MODIFIED or DELETED.
    #[prost(enumeration = "EventType", tag = "1")]
    pub r#type: i32,
    /// The revision of the change.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    /// What changed.
    #[prost(oneof = "EventObject", tags = "3, 4")]
    pub object: Option<EventObject>,
}

/// `Watch`'s responses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    /// The revision after these events.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// The events.
    #[prost(message, repeated, tag = "2")]
    pub events: Vec<EventMsg>,
    /// Part of the current state.
    #[prost(bool, tag = "3")]
    pub initial: bool,
    /// The last part of the current state.
    #[prost(bool, tag = "4")]
    pub synced: bool,
}

/// `Session`'s requests.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionRequest {
    /// The instance, registered or replaced.
    #[prost(message, optional, tag = "1")]
    pub instance: Option<InstanceMsg>,
}

/// `Session`'s responses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionResponse {
    /// The revision the request made.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
}

/// gRPC status codes used here.
mod code {
    pub(super) const INVALID_ARGUMENT: u8 = 3;
    pub(super) const NOT_FOUND: u8 = 5;
    pub(super) const OUT_OF_RANGE: u8 = 11;
    pub(super) const UNIMPLEMENTED: u8 = 12;
    pub(super) const UNAVAILABLE: u8 = 14;
}

type Out = mpsc::Sender<Msg>;
/// The body of a gRPC response.
pub type GrpcBody = MsgBody;

async fn send<M: prost::Message>(tx: &Out, m: &M) -> bool {
    grpc_wire::send(tx, grpc_wire::whole(m)).await
}

/// Ends the response with `status` (0: OK) and its message.
async fn end(tx: &Out, status: u8, message: &str) {
    if status != 0 {
        tracing::debug!(status, message, "registry gRPC stream ended with an error");
    }
    grpc_wire::end(tx, status, message).await;
}

/// Serves one gRPC request.
pub fn handle(reg: Arc<ApiRegistry>, req: Request<Incoming>) -> Response<GrpcBody> {
    let (tx, body_out) = grpc_wire::body(16);
    let path = req.uri().path().to_string();
    let body = req.into_body();
    match path.as_str() {
        WATCH_PATH => {
            tokio::spawn(watch(reg, Reader::new(body), tx));
        }
        SESSION_PATH => {
            tokio::spawn(session(reg, Reader::new(body), tx));
        }
        other => {
            let msg = format!("unknown method {other} (known: {WATCH_PATH}, {SESSION_PATH})");
            tokio::spawn(async move { end(&tx, code::UNIMPLEMENTED, &msg).await });
        }
    }
    let mut resp = Response::new(body_out);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    resp
}

fn service_msg(s: &crate::model::Service) -> ServiceMsg {
    ServiceMsg {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        ports: s
            .ports
            .iter()
            .map(|p| PortMsg {
                name: p.name.clone(),
                port: u32::from(p.port),
                protocol: p.protocol.name().to_string(),
            })
            .collect(),
        labels: s.labels.clone(),
        source: s.source.clone(),
    }
}

fn instance_msg(service: &str, id: &str, i: &crate::model::Instance) -> InstanceMsg {
    let (namespace, name) = service.split_once('/').unwrap_or((service, ""));
    InstanceMsg {
        namespace: namespace.to_string(),
        service: name.to_string(),
        id: id.to_string(),
        address: i.address.to_string(),
        ports: i.ports.iter().map(|(k, v)| (k.clone(), u32::from(*v))).collect(),
        port: 0,
        labels: i.labels.clone(),
        weight: i.weight,
        healthy: Some(i.healthy),
        locality: i
            .locality
            .as_ref()
            .map(|(r, z, s)| format!("{r}/{z}/{s}"))
            .unwrap_or_default(),
        source: i.source.clone(),
    }
}

fn event_msg(e: &Event) -> EventMsg {
    let t = match e.kind {
        Kind::Added => EventType::Added,
        Kind::Modified => EventType::Modified,
        Kind::Deleted => EventType::Deleted,
    };
    EventMsg {
        r#type: t as i32,
        revision: e.revision,
        object: Some(match &e.object {
            Object::Service(s) => EventObject::Service(service_msg(s)),
            Object::Instance { service, id, instance } => EventObject::Instance(instance_msg(service, id, instance)),
        }),
    }
}

/// One watch: the state (from 0), then the log, until the client goes.
async fn watch(reg: Arc<ApiRegistry>, mut reader: Reader<WatchRequest>, tx: Out) {
    let req = match reader.next().await {
        Ok(r) => r,
        Err(ReadEnd::Bad(why)) => return end(&tx, code::INVALID_ARGUMENT, &why).await,
        Err(ReadEnd::Closed) => return end(&tx, code::INVALID_ARGUMENT, "no WatchRequest").await,
    };
    if req.namespace.is_empty() && !req.service.is_empty() {
        return end(&tx, code::INVALID_ARGUMENT, "service: set namespace too").await;
    }
    let filter = |ns: &str, name: &str| {
        (req.namespace.is_empty() || ns == req.namespace) && (req.service.is_empty() || name == req.service)
    };
    let mut changed = reg.subscribe();
    changed.borrow_and_update();
    let mut at = req.since_revision;
    if at == 0 {
        let (revision, events) = reg.state(filter);
        let parts: Vec<&[Event]> = if events.is_empty() {
            vec![&[]]
        } else {
            events.chunks(BATCH).collect()
        };
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            let r = WatchResponse {
                revision,
                events: part.iter().map(event_msg).collect(),
                initial: true,
                synced: i == last,
            };
            if !send(&tx, &r).await {
                return;
            }
        }
        at = revision;
    }
    loop {
        loop {
            let (events, reached) = match reg.events_after(at, BATCH, filter) {
                Ok(r) => r,
                Err(c) => {
                    let msg = if at > c.current {
                        format!(
                            "revision {at} is ahead of the registry's ({}): was Pilot restarted? watch again from 0",
                            c.current
                        )
                    } else {
                        format!(
                            "revision {at} is no longer kept: the registry is at revision {} and keeps the events after {}; watch again from 0",
                            c.current, c.oldest
                        )
                    };
                    return end(&tx, code::OUT_OF_RANGE, &msg).await;
                }
            };
            if !events.is_empty() {
                let r = WatchResponse {
                    revision: reached,
                    events: events.iter().map(event_msg).collect(),
                    initial: false,
                    synced: false,
                };
                if !send(&tx, &r).await {
                    return;
                }
            }
            if reached == at {
                break;
            }
            at = reached;
        }
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return end(&tx, 0, "").await;
                }
                changed.borrow_and_update();
            }
            () = tx.closed() => return,
        }
    }
}

/// The instance a session holds.
struct Held {
    namespace: String,
    service: String,
    id: String,
    /// With the etcd store, its lease.
    lease: i64,
}

/// A refusal: status and message.
type Status = (u8, String);

/// The REST body for an instance message (so both APIs check instances the same way).
fn instance_body(m: &InstanceMsg) -> Value {
    let mut b = serde_json::Map::new();
    b.insert("address".into(), json!(m.address));
    if m.port != 0 {
        b.insert("port".into(), json!(m.port));
    }
    if !m.ports.is_empty() {
        b.insert("ports".into(), json!(m.ports));
    }
    if !m.labels.is_empty() {
        b.insert("labels".into(), json!(m.labels));
    }
    if m.weight != 0 {
        b.insert("weight".into(), json!(m.weight));
    }
    if let Some(h) = m.healthy {
        b.insert("healthy".into(), json!(h));
    }
    if !m.locality.is_empty() {
        b.insert("locality".into(), json!(m.locality));
    }
    Value::Object(b)
}

fn refusal(r: Refused) -> Status {
    let msg = match r {
        Refused::Message(m) => m,
        Refused::Problems(p) => p
            .iter()
            .map(|p| {
                let field = p.path.strip_prefix("services[0].instances[0].").unwrap_or(&p.path);
                format!("instance.{field}: {}", p.reason)
            })
            .collect::<Vec<_>>()
            .join("; "),
    };
    (code::INVALID_ARGUMENT, msg)
}

/// Registers or replaces the session's instance; the revision.
async fn put(reg: &ApiRegistry, req: SessionRequest, held: &mut Option<Held>) -> Result<u64, Status> {
    let Some(m) = req.instance else {
        return Err((code::INVALID_ARGUMENT, "instance: required".into()));
    };
    for (field, v) in [("namespace", &m.namespace), ("service", &m.service), ("id", &m.id)] {
        if v.is_empty() {
            return Err((code::INVALID_ARGUMENT, format!("instance.{field}: required")));
        }
        if v.contains('/') {
            return Err((code::INVALID_ARGUMENT, format!("instance.{field}: `{v}` contains `/`")));
        }
    }
    if let Some(h) = held.as_ref()
        && (h.namespace != m.namespace || h.service != m.service || h.id != m.id)
    {
        return Err((
            code::INVALID_ARGUMENT,
            format!(
                "instance: a session holds one instance ({}/{} id {}); this request names {}/{} id {}",
                h.namespace, h.service, h.id, m.namespace, m.service, m.id
            ),
        ));
    }
    let key = format!("{}/{}", m.namespace, m.service);
    let not_found = || {
        (
            code::NOT_FOUND,
            format!("instance.service: `{key}` is not registered through this API; register the service first"),
        )
    };
    let Some(service) = lock(&reg.inner).services.get(&key).cloned() else {
        return Err(not_found());
    };
    let mut body = instance_body(&m);
    let (instance, _, _) = instance_from(&service, &body, "instance", &format!("api:{}", m.id)).map_err(refusal)?;
    match &reg.etcd {
        None => {
            let (rev, _) = reg.put_instance_mem(&key, &m.id, instance, None, None);
            Ok(finish_put(held, m, 0, rev))
        }
        Some(st) => {
            // The body as the REST API stores it, so every replica lists it as ephemeral.
            if let Value::Object(o) = &mut body {
                o.insert("ttl".into(), json!(format!("{}s", SESSION_TTL.as_secs())));
            }
            let unavailable = |e: crate::etcd::client::EtcdError| {
                (
                    code::UNAVAILABLE,
                    format!("the registry store (etcd) is unavailable: {e}"),
                )
            };
            let (rev, _) = st
                .put_instance(&m.namespace, &m.service, &m.id, &body, Some(SESSION_TTL))
                .await
                .map_err(unavailable)?
                .ok_or_else(not_found)?;
            let rev = u64::try_from(rev).unwrap_or(0);
            reg.caught_up(rev).await;
            let lease = lock(&reg.inner)
                .instances
                .get(&key)
                .and_then(|i| i.get(&m.id))
                .map_or(0, |r| r.lease);
            Ok(finish_put(held, m, lease, rev))
        }
    }
}

fn finish_put(held: &mut Option<Held>, m: InstanceMsg, lease: i64, rev: u64) -> u64 {
    *held = Some(Held {
        namespace: m.namespace,
        service: m.service,
        id: m.id,
        lease,
    });
    rev
}

/// Deregisters the session's instance.
async fn release(reg: &ApiRegistry, h: Held) {
    let key = format!("{}/{}", h.namespace, h.service);
    tracing::info!(service = %key, instance = %h.id, "registry session ended; instance deregistered");
    match &reg.etcd {
        None => {
            reg.delete_instance_mem(&key, &h.id);
        }
        Some(st) => {
            if let Err(e) = st.delete_instance(&h.namespace, &h.service, &h.id).await {
                tracing::warn!(service = %key, instance = %h.id, error = %e, "cannot delete a session's instance from etcd; its lease lapses by itself");
            }
        }
    }
}

/// One session: the instance lives until the stream ends.
async fn session(reg: Arc<ApiRegistry>, mut reader: Reader<SessionRequest>, tx: Out) {
    let mut held: Option<Held> = None;
    let mut renew = tokio::time::interval(SESSION_TTL / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status: Result<(), Status> = loop {
        let next = tokio::select! {
            m = reader.next() => m,
            _ = renew.tick() => {
                if let (Some(st), Some(h)) = (&reg.etcd, held.as_ref())
                    && h.lease != 0
                {
                    match st.heartbeat(h.lease).await {
                        Ok(true) => {}
                        Ok(false) => break Err((code::NOT_FOUND, "the session's instance is gone from the store (its lease expired)".into())),
                        Err(e) => tracing::warn!(error = %e, "registry session: cannot renew the lease; retrying"),
                    }
                }
                continue;
            }
        };
        match next {
            Err(ReadEnd::Closed) => break Ok(()),
            Err(ReadEnd::Bad(why)) => break Err((code::INVALID_ARGUMENT, why)),
            Ok(req) => match put(&reg, req, &mut held).await {
                Ok(revision) => {
                    if !send(&tx, &SessionResponse { revision }).await {
                        break Ok(());
                    }
                }
                Err(s) => break Err(s),
            },
        }
    };
    if let Some(h) = held {
        release(&reg, h).await;
    }
    match status {
        Ok(()) => end(&tx, 0, "").await,
        Err((c, msg)) => end(&tx, c, &msg).await,
    }
}

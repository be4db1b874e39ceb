//! A snapshot-cache ADS server (gRPC framed by hand on hyper, `grpc_wire`): the caller sets a snapshot per
//! type (version and resources) and the server answers each stream as a snapshot cache does
//! (state of the world: the whole set when the version or the names asked for change; delta:
//! changed and removed resources per subscription). Every request is logged, so the ACK / NACK
//! sequence of each client can be read back.
//!
//! The tests and the xDS benchmark drive sidecars (Tessera's and Envoy's) with it, and Pilot
//! serves with it:
//! - **groups** (per-node scoping): a scoper maps each stream's node to a group, and each group
//!   has its own snapshots (Pilot groups sidecars by what they import);
//! - a snapshot remembers what changed since the version before it, so a stream holding that
//!   version looks at the changed names alone, and a state-of-the-world stream none of whose
//!   resources changed is not pushed at all (an endpoint change reaches only the sidecars that
//!   use the cluster);
//! - snapshots are shared (`Arc`) by the streams, never copied per stream, and a push is a few
//!   slices of the snapshot's encoding (adjacent resources merged into runs);
//! - what a stream keeps is small: its subscription is a list shared with every stream that
//!   asked for the same names, and a request's names are read as slices of it and hashed (an
//!   ACK that repeats them costs no allocation per name);
//! - metrics with Istio's names, and `syncz`;
//! - the request/response logs (for tests) can be turned off.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{broadcast, mpsc, watch};

pub use crate::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

/// A resource from protobuf JSON (Envoy's field names), through the built-in descriptors.
pub fn any(type_url: &str, json: serde_json::Value) -> Result<Any, String> {
    let name = type_url.rsplit('/').next().unwrap_or("");
    let value = crate::load::transcode(name, json).map_err(|e| format!("{name}: {e}"))?;
    Ok(Any {
        type_url: type_url.to_string(),
        value,
    })
}

/// One request a client sent.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct Req {
    /// When it arrived.
    pub at: Instant,
    pub type_url: String,
    pub version: String,
    pub nonce: String,
    pub names: Vec<String>,
    pub unsubscribe: Vec<String>,
    pub initial: BTreeMap<String, String>,
    pub error: Option<String>,
    pub node_id: Option<String>,
    pub node_meta: Vec<String>,
    pub delta: bool,
    pub stream: u64,
}

impl Req {
    /// `Listener`, `Cluster`...
    pub fn short_type(&self) -> &str {
        self.type_url.rsplit('.').next().unwrap_or("")
    }

    /// `Cluster ACK v1`, `Listener NACK v1`, `ClusterLoadAssignment ask [a, b]`...
    pub fn describe(&self) -> String {
        let kind = if self.error.is_some() {
            "NACK"
        } else if !self.nonce.is_empty() {
            "ACK"
        } else {
            "ask"
        };
        format!(
            "{} {kind} v={:?} names={:?}",
            self.short_type(),
            self.version,
            self.names
        )
    }
}

/// One type's resources in one group, at a version. Shared by every stream (an `Arc`), never
/// copied per stream.
#[derive(Default)]
struct Snap {
    version: String,
    /// Name -> the resource. Names are shared (`Arc<str>`) with the snapshot before and with
    /// the subscriptions of every stream, so a thousand sidecars subscribed to the same ten
    /// thousand names hold pointers, not copies.
    resources: BTreeMap<Arc<str>, Res>,
    /// Every resource's state-of-the-world encoding, in name order: what a wildcard stream is
    /// sent, shared. Pushes of a part are slices of it (`grpc_wire::runs`).
    all_sotw: Bytes,
    /// Every resource's delta encoding, in name order.
    all_delta: Bytes,
    /// The version this one replaced, and the names added, changed or removed since: a stream
    /// that holds `prev` looks at these alone.
    prev: String,
    changed: BTreeSet<Arc<str>>,
}

/// One resource of a snapshot: its content hash (the delta version) and where its encodings as a
/// field of a state-of-the-world and of a delta response are in the snapshot's buffers (built
/// once, shared by every stream).
struct Res {
    hash: u64,
    sotw: crate::grpc_wire::Span,
    delta: crate::grpc_wire::Span,
}

impl Snap {
    fn new(version: &str, resources: Vec<Any>, before: Option<&Snap>) -> Snap {
        let named: BTreeMap<Arc<str>, Any> = resources
            .into_iter()
            .map(|a| {
                let name = name_of(&a);
                let key = match before.and_then(|b| b.resources.get_key_value(name.as_str())) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(name),
                };
                (key, a)
            })
            .collect();
        let list: Vec<&Any> = named.values().collect();
        let (all_sotw, sotw) = crate::grpc_wire::sotw_fields(&list);
        let hashes: Vec<u64> = list.iter().map(|a| hash_of(a)).collect();
        let (all_delta, delta) = crate::grpc_wire::delta_fields(
            &named
                .iter()
                .zip(&hashes)
                .map(|((n, a), h)| (&**n, format!("{h:x}"), a))
                .collect::<Vec<_>>(),
        );
        let resources: BTreeMap<Arc<str>, Res> = named
            .keys()
            .cloned()
            .zip(hashes.into_iter().zip(sotw).zip(delta))
            .map(|(k, ((hash, sotw), delta))| (k, Res { hash, sotw, delta }))
            .collect();
        let (prev, changed) = match before {
            None => (String::new(), resources.keys().cloned().collect()),
            Some(b) => {
                let mut c: BTreeSet<Arc<str>> = resources
                    .iter()
                    .filter(|(n, r)| b.resources.get(*n).map(|br| br.hash) != Some(r.hash))
                    .map(|(n, _)| n.clone())
                    .collect();
                c.extend(b.resources.keys().filter(|n| !resources.contains_key(*n)).cloned());
                (b.version.clone(), c)
            }
        };
        Snap {
            version: version.to_string(),
            resources,
            all_sotw,
            all_delta,
            prev,
            changed,
        }
    }

    /// `name` as the snapshot's shared key when it has it.
    fn intern(snap: Option<&Snap>, name: &str) -> Arc<str> {
        match snap.and_then(|s| s.resources.get_key_value(name)) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        }
    }
}

/// Maps a node to its group: streams of one group share one snapshot per type.
pub type Scoper = Arc<dyn Fn(Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> String + Send + Sync>;

/// Push counters and the convergence histogram (Istio's metric names).
#[derive(Default)]
struct Metrics {
    /// Responses sent, per type URL.
    pushes: BTreeMap<String, u64>,
    /// NACKs received, per type URL.
    rejects: BTreeMap<String, u64>,
    /// Milliseconds from a snapshot being set to its ACK, bucketed.
    convergence: Histogram,
}

/// Upper bounds of the convergence buckets, in milliseconds.
const BUCKETS_MS: [u64; 14] = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000];

/// A latency histogram with buckets from 1 ms to 60 s, rendered as Prometheus text in seconds.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    counts: [u64; BUCKETS_MS.len() + 1],
    sum_ms: f64,
    count: u64,
}

impl Histogram {
    /// Renders as the Prometheus histogram `name`.
    pub fn render(&self, name: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1000.0);
        }
        cum += self.counts[BUCKETS_MS.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ms / 1000.0);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }

    /// Adds a sample.
    pub fn observe(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b as f64)
            .unwrap_or(BUCKETS_MS.len());
        self.counts[i] += 1;
        self.sum_ms += ms;
        self.count += 1;
    }
}

type Group = HashMap<String, Arc<Snap>>;

/// The last versions set of one group and type, with when.
type SetTimes = VecDeque<(String, Instant)>;

struct Shared {
    /// Group -> type URL -> snapshot.
    snaps: Mutex<HashMap<String, Group>>,
    scoper: Mutex<Option<Scoper>>,
    /// The groups of connected streams, with how many streams each; `wanted` ticks when one appears.
    groups: Mutex<BTreeMap<String, usize>>,
    wanted: watch::Sender<u64>,
    /// Keep every request and response (tests read them back); off for Pilot at scale.
    keep_log: std::sync::atomic::AtomicBool,
    metrics: Mutex<Metrics>,
    /// Per (group, type): when each of the last versions was set.
    set_times: Mutex<HashMap<(String, String), SetTimes>>,
    changed: watch::Sender<u64>,
    log: Mutex<VecDeque<Req>>,
    nonce: AtomicU64,
    streams: AtomicU64,
    raw: broadcast::Sender<DiscoveryResponse>,
    sent: Mutex<VecDeque<Sent>>,
    /// Connected streams, for `syncz`.
    syncz: Mutex<BTreeMap<u64, StreamSync>>,
    /// Delta: the system version each response nonce carried, so an ACK can be logged with it.
    delta_versions: Mutex<HashMap<String, String>>,
    /// State-of-the-world subscriptions, shared: a thousand sidecars asking for the same
    /// thousand names hold one list. By type, hash of the names as sent, and count.
    sub_lists: Mutex<HashMap<(String, u64, usize), SharedList>>,
}

/// A subscription's names, shared by the streams that hold it.
type SharedList = std::sync::Weak<[Arc<str>]>;

/// What `/debug/syncz` shows of one stream.
#[derive(Debug, Clone, Default)]
struct StreamSync {
    node_id: String,
    /// Its group (see [`Scoper`]); `joined` once resolved.
    group: String,
    joined: bool,
    delta: bool,
    since: Option<std::time::SystemTime>,
    /// Per type URL: last version ACKed, its nonce, the last NACK, counts.
    types: BTreeMap<String, TypeSync>,
}

#[derive(Debug, Clone, Default)]
struct TypeSync {
    acked: String,
    nonce: String,
    last_nack: Option<String>,
    acks: u64,
    nacks: u64,
}

impl Shared {
    fn record_request(&self, r: Req) {
        {
            let mut all = lock(&self.syncz);
            let st = all.entry(r.stream).or_default();
            if let Some(id) = &r.node_id {
                st.node_id.clone_from(id);
            }
            st.delta = r.delta;
            st.since.get_or_insert_with(std::time::SystemTime::now);
            let t = st.types.entry(r.type_url.clone()).or_default();
            if !r.nonce.is_empty() {
                t.nonce.clone_from(&r.nonce);
                match &r.error {
                    Some(e) => {
                        t.nacks += 1;
                        t.last_nack = Some(e.clone());
                        *lock(&self.metrics).rejects.entry(r.type_url.clone()).or_default() += 1;
                    }
                    None => {
                        t.acks += 1;
                        if t.acked != r.version {
                            t.acked.clone_from(&r.version);
                            // Convergence: from the version being set to this ACK of it (the
                            // last few versions of each group and type are remembered).
                            let at = lock(&self.set_times)
                                .get(&(st.group.clone(), r.type_url.clone()))
                                .and_then(|h| h.iter().rev().find(|(v, _)| *v == r.version).map(|(_, t)| *t));
                            if let Some(at) = at {
                                lock(&self.metrics).convergence.observe(at.elapsed());
                            }
                        }
                    }
                }
            }
        }
        if self.keep_log.load(Ordering::Relaxed) {
            bounded_push(&mut lock(&self.log), r);
        }
    }

    /// The shared list equal to `names` (sorted, deduplicated; sent with hash `hash`), or
    /// `names` made the shared one.
    fn shared_list(&self, type_url: &str, hash: u64, names: Vec<Arc<str>>) -> Arc<[Arc<str>]> {
        let key = (type_url.to_string(), hash, names.len());
        let mut lists = lock(&self.sub_lists);
        if let Some(l) = lists.get(&key).and_then(std::sync::Weak::upgrade)
            && *l == *names
        {
            return l;
        }
        let l: Arc<[Arc<str>]> = names.into();
        // Lists no stream holds any more are dropped as the table doubles.
        if lists.len() >= 64 && lists.len().is_power_of_two() {
            lists.retain(|_, w| w.strong_count() > 0);
        }
        lists.insert(key, Arc::downgrade(&l));
        l
    }

    /// The stream's group, resolved from its node on its first request.
    fn join_group(&self, stream: u64, node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> String {
        let scoper = lock(&self.scoper).clone();
        let g = scoper.map(|f| f(node)).unwrap_or_default();
        {
            let mut all = lock(&self.syncz);
            let st = all.entry(stream).or_default();
            st.group.clone_from(&g);
            st.joined = true;
        }
        let mut groups = lock(&self.groups);
        let n = groups.entry(g.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.wanted.send_modify(|v| *v += 1);
        }
        g
    }

    fn snap(&self, group: &str, type_url: &str) -> Option<Arc<Snap>> {
        lock(&self.snaps).get(group).and_then(|g| g.get(type_url)).cloned()
    }

    fn stream_ended(&self, stream: u64) {
        let Some(st) = lock(&self.syncz).remove(&stream) else {
            return;
        };
        if !st.joined {
            return;
        }
        let mut groups = lock(&self.groups);
        if let Some(n) = groups.get_mut(&st.group) {
            *n -= 1;
            if *n == 0 {
                groups.remove(&st.group);
            }
        }
    }

    fn record(&self, type_url: &str, version: &str, nonce: &str, resources: usize) {
        *lock(&self.metrics).pushes.entry(type_url.to_string()).or_default() += 1;
        if !self.keep_log.load(Ordering::Relaxed) {
            return;
        }
        bounded_push(
            &mut lock(&self.sent),
            Sent {
                at: Instant::now(),
                type_url: type_url.to_string(),
                version: version.to_string(),
                nonce: nonce.to_string(),
                resources,
            },
        );
    }

    fn next_nonce(&self) -> String {
        format!("n{}", self.nonce.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// Requests and responses remembered (the oldest go first), so a long-running server's logs
/// stay bounded.
const LOG_LIMIT: usize = 65_536;

fn bounded_push<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= LOG_LIMIT {
        q.pop_front();
    }
    q.push_back(item);
}

/// A poisoned lock only means a panicking thread held it; the data is still usable here.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One response the server sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// When.
    pub at: Instant,
    /// Its type URL.
    pub type_url: String,
    /// `version_info` (SotW) or `system_version_info` (delta).
    pub version: String,
    /// Its nonce.
    pub nonce: String,
    /// How many resources it carried.
    pub resources: usize,
}

fn name_of(any: &Any) -> String {
    use prost::Message;
    let n = match any.type_url.as_str() {
        LISTENER => {
            envoy_types::pb::envoy::config::listener::v3::Listener::decode(any.value.as_slice()).map(|x| x.name)
        }
        ROUTE => {
            envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(any.value.as_slice()).map(|x| x.name)
        }
        CLUSTER => envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(any.value.as_slice()).map(|x| x.name),
        ENDPOINT => envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(any.value.as_slice())
            .map(|x| x.cluster_name),
        SECRET => envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(any.value.as_slice())
            .map(|x| x.name),
        _ => Ok(String::new()),
    };
    n.unwrap_or_default()
}

/// `Cluster` of `type.googleapis.com/envoy.config.cluster.v3.Cluster`.
fn short(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

/// The node metadata's keys (what a test wants to see arrived).
fn meta_keys(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> Vec<String> {
    node.and_then(|n| n.metadata.as_ref())
        .map(|m| m.fields.keys().cloned().collect())
        .unwrap_or_default()
}

fn hash_of(a: &Any) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.value.hash(&mut h);
    h.finish()
}

/// What a state-of-the-world stream last sent of a type: the version and the names asked for.
/// (Per-resource hashes are not kept per stream: a stream more than one version behind is
/// sent its set again, which is rare and cheap next to the memory of a thousand streams.)
struct SotwSent {
    version: String,
    /// The subscription's generation it was sent for.
    generation: u64,
}

/// What a state-of-the-world stream asked for of a type: the names (shared with the snapshot),
/// a hash of the names as the client sent them (an ACK repeats them: equal hash, nothing to
/// redo), and a generation that changes when the names do.
#[derive(Default)]
struct SotwSub {
    /// Shared by the streams that ask for the same names (`Shared::shared_list`).
    names: Arc<[Arc<str>]>,
    raw_hash: u64,
    raw_len: usize,
    generation: u64,
}

fn names_hash(names: &[Bytes]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut h);
    h.finish()
}

/// A `DiscoveryRequest` as the server reads it: the names stay slices of the request's buffer
/// (an ACK repeats a thousand names, of which only a hash is needed; decoding them as
/// `String`s cost a thousand allocations per ACK), and the node stays encoded until a stream
/// needs it (its first request). Wire-compatible with `DiscoveryRequest` (fields 1 to 6;
/// `resource_locators` is skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct SotwRequest {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(bytes = "bytes", optional, tag = "2")]
    node: Option<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    resource_names: Vec<Bytes>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    response_nonce: String,
    #[prost(message, optional, tag = "6")]
    error_detail: Option<envoy_types::pb::google::rpc::Status>,
}

impl SotwRequest {
    /// The node, decoded.
    fn decoded_node(
        &self,
    ) -> Result<Option<envoy_types::pb::envoy::config::core::v3::Node>, crate::grpc_wire::ReadEnd> {
        use prost::Message;
        self.node
            .clone()
            .map(envoy_types::pb::envoy::config::core::v3::Node::decode)
            .transpose()
            .map_err(|e| crate::grpc_wire::ReadEnd::Bad(format!("undecodable node: {e}")))
    }

    /// The names as text; a name that is not UTF-8 is a bad request.
    fn names(&self) -> Result<Vec<&str>, crate::grpc_wire::ReadEnd> {
        self.resource_names
            .iter()
            .map(|n| {
                std::str::from_utf8(n)
                    .map_err(|_| crate::grpc_wire::ReadEnd::Bad("a resource name is not UTF-8".into()))
            })
            .collect()
    }
}

type Out = mpsc::Sender<crate::grpc_wire::Msg>;
use crate::grpc_wire::send;

/// Ends the response with the status trailers.
async fn finish(tx: &Out, end: Option<crate::grpc_wire::ReadEnd>) {
    let t = match end {
        Some(crate::grpc_wire::ReadEnd::Bad(why)) => {
            tracing::warn!(reason = %why, "ADS stream ended: bad request");
            crate::grpc_wire::trailers(3, &why)
        }
        _ => crate::grpc_wire::trailers(0, ""),
    };
    let _ = tx.send(crate::grpc_wire::Msg::End(Box::new(t))).await;
}

/// One state-of-the-world stream.
async fn sotw_stream(sh: Arc<Shared>, mut inbound: crate::grpc_wire::Reader<SotwRequest>, tx: Out) {
    let stream = sh.streams.fetch_add(1, Ordering::Relaxed) + 1;
    let mut changed = sh.changed.subscribe();
    let mut raw = sh.raw.subscribe();
    let mut group: Option<String> = None;
    let mut subs: BTreeMap<String, SotwSub> = BTreeMap::new();
    // Per type: the version last sent (or passed over) and the names it was for, so a push that
    // changes none of them is skipped.
    let mut sent: HashMap<String, SotwSent> = HashMap::new();
    let end = loop {
        let types: Vec<String> = tokio::select! {
            m = inbound.next() => match m {
                Ok(r) => {
                    let keep_log = sh.keep_log.load(Ordering::Relaxed);
                    let node = if group.is_none() || keep_log {
                        match r.decoded_node() {
                            Ok(n) => n,
                            Err(e) => break Some(e),
                        }
                    } else {
                        None
                    };
                    if group.is_none() {
                        group = Some(sh.join_group(stream, node.as_ref()));
                    }
                    let names = match r.names() {
                        Ok(n) => n,
                        Err(e) => break Some(e),
                    };
                    sh.record_request(Req {
                        at: Instant::now(),
                        type_url: r.type_url.clone(),
                        version: r.version_info.clone(),
                        nonce: r.response_nonce.clone(),
                        names: if keep_log { names.iter().map(|n| (*n).to_string()).collect() } else { Vec::new() },
                        unsubscribe: Vec::new(),
                        initial: BTreeMap::new(),
                        error: r.error_detail.as_ref().map(|e| e.message.clone()),
                        node_id: node.as_ref().map(|n| n.id.clone()),
                        node_meta: meta_keys(node.as_ref()),
                        delta: false,
                        stream,
                    });
                    let raw_hash = names_hash(&r.resource_names);
                    let sub = subs.entry(r.type_url.clone()).or_default();
                    if sub.generation == 0 || sub.raw_hash != raw_hash || sub.raw_len != names.len() {
                        let snap = sh.snap(group.as_deref().unwrap_or(""), &r.type_url);
                        sub.raw_len = names.len();
                        let mut list: Vec<Arc<str>> =
                            names.iter().map(|n| Snap::intern(snap.as_deref(), n)).collect();
                        list.sort();
                        list.dedup();
                        sub.names = sh.shared_list(&r.type_url, raw_hash, list);
                        sub.raw_hash = raw_hash;
                        sub.generation += 1;
                    }
                    vec![r.type_url]
                }
                Err(e) => break Some(e),
            },
            c = changed.changed() => {
                if c.is_err() { break None; }
                subs.keys().cloned().collect()
            }
            m = raw.recv() => {
                if let Ok(mut m) = m {
                    m.nonce = sh.next_nonce();
                    if !send(&tx, crate::grpc_wire::whole(&m)).await { break None; }
                }
                continue;
            }
        };
        let g = group.as_deref().unwrap_or("");
        for t in types {
            let Some(snap) = sh.snap(g, &t) else {
                continue;
            };
            let (names, generation) = subs.get(&t).map(|s| (&*s.names, s.generation)).unwrap_or((&[], 0));
            // Empty names (or `*`) ask for everything; a client that names listeners or clusters
            // (gRPC's xDS client does) gets those alone.
            let wildcard = names.is_empty() || names.iter().any(|n| &**n == "*");
            // For types other than listeners and clusters, a state-of-the-world response need
            // only carry the resources that changed (xDS protocol, "Grouping resources into
            // responses"), as Istio sends incremental EDS: a stream that holds the previous
            // version and asks for the same names gets the changed ones it asked for, and
            // nothing at all when none of them changed.
            let mut only: Option<Vec<crate::grpc_wire::Span>> = None;
            if let Some(l) = sent.get_mut(&t)
                && l.generation == generation
            {
                if l.version == snap.version {
                    continue;
                }
                if !wildcard && l.version == snap.prev {
                    let hit: Vec<crate::grpc_wire::Span> = snap
                        .changed
                        .iter()
                        .filter(|n| names.binary_search(n).is_ok())
                        .filter_map(|n| snap.resources.get(n))
                        .map(|r| r.sotw)
                        .collect();
                    if hit.is_empty() {
                        l.version.clone_from(&snap.version);
                        continue;
                    }
                    only = Some(hit);
                }
            }
            let (parts, count) = if let Some(p) = only {
                let n = p.len();
                (crate::grpc_wire::runs(&snap.all_sotw, p), n)
            } else if wildcard {
                (vec![snap.all_sotw.clone()], snap.resources.len())
            } else {
                let p: Vec<crate::grpc_wire::Span> = names
                    .iter()
                    .filter_map(|n| snap.resources.get(n))
                    .map(|r| r.sotw)
                    .collect();
                let n = p.len();
                (crate::grpc_wire::runs(&snap.all_sotw, p), n)
            };
            let nonce = sh.next_nonce();
            let header = DiscoveryResponse {
                version_info: snap.version.clone(),
                type_url: t.clone(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            sh.record(&t, &snap.version, &nonce, count);
            sent.insert(
                t,
                SotwSent {
                    version: snap.version.clone(),
                    generation,
                },
            );
            use prost::Message;
            if !send(&tx, crate::grpc_wire::message(&header.encode_to_vec(), parts)).await {
                sh.stream_ended(stream);
                return;
            }
        }
    };
    sh.stream_ended(stream);
    finish(&tx, end).await;
}

/// One delta (incremental) stream.
async fn delta_stream(sh: Arc<Shared>, mut inbound: crate::grpc_wire::Reader<DeltaDiscoveryRequest>, tx: Out) {
    let stream = sh.streams.fetch_add(1, Ordering::Relaxed) + 1;
    let mut changed = sh.changed.subscribe();
    let mut group: Option<String> = None;
    // type -> (wildcard, names); what the client holds: type -> name -> version.
    let mut subs: BTreeMap<String, (bool, BTreeSet<Arc<str>>)> = BTreeMap::new();
    let mut known: HashMap<String, HashMap<Arc<str>, u64>> = HashMap::new();
    // Per type: the snapshot version last looked at (cleared when the subscription changes, so
    // every resource is compared, not only the changed ones).
    let mut seen: HashMap<String, String> = HashMap::new();
    let end = loop {
        let types: Vec<String> = tokio::select! {
            m = inbound.next() => match m {
                Ok(r) => {
                    if group.is_none() {
                        group = Some(sh.join_group(stream, r.node.as_ref()));
                    }
                    let acked = lock(&sh.delta_versions).get(&r.response_nonce).cloned();
                    sh.record_request(Req {
                        at: Instant::now(),
                        type_url: r.type_url.clone(),
                        version: acked.unwrap_or_default(),
                        nonce: r.response_nonce.clone(),
                        names: if sh.keep_log.load(Ordering::Relaxed) { r.resource_names_subscribe.clone() } else { Vec::new() },
                        unsubscribe: r.resource_names_unsubscribe.clone(),
                        initial: r.initial_resource_versions.clone().into_iter().collect(),
                        error: r.error_detail.as_ref().map(|e| e.message.clone()),
                        node_id: r.node.as_ref().map(|n| n.id.clone()),
                        node_meta: meta_keys(r.node.as_ref()),
                        delta: true,
                        stream,
                    });
                    let first = !subs.contains_key(&r.type_url);
                    let entry = subs.entry(r.type_url.clone()).or_insert_with(|| {
                        let wildcard = (r.type_url == LISTENER || r.type_url == CLUSTER)
                            && (r.resource_names_subscribe.is_empty() || r.resource_names_subscribe.iter().any(|n| n == "*"));
                        (wildcard, BTreeSet::new())
                    });
                    let snap = sh.snap(group.as_deref().unwrap_or(""), &r.type_url);
                    entry.1.extend(
                        r.resource_names_subscribe
                            .iter()
                            .filter(|n| *n != "*")
                            .map(|n| Snap::intern(snap.as_deref(), n)),
                    );
                    let k = known.entry(r.type_url.clone()).or_default();
                    for n in &r.resource_names_unsubscribe {
                        entry.1.remove(n.as_str());
                        k.remove(n.as_str());
                    }
                    if first {
                        // Versions we sent are hex hashes; anything else is sent again.
                        k.extend(r.initial_resource_versions.iter().map(|(n, v)| {
                            (Snap::intern(snap.as_deref(), n), u64::from_str_radix(v, 16).unwrap_or(0))
                        }));
                    }
                    seen.remove(&r.type_url);
                    if !r.response_nonce.is_empty() {
                        continue;
                    }
                    vec![r.type_url]
                }
                Err(e) => break Some(e),
            },
            c = changed.changed() => {
                if c.is_err() { break None; }
                subs.keys().cloned().collect()
            }
        };
        let g = group.as_deref().unwrap_or("");
        for t in types {
            let Some(snap) = sh.snap(g, &t) else {
                continue;
            };
            let Some((wildcard, names)) = subs.get(&t) else {
                continue;
            };
            let wildcard = *wildcard;
            let k = known.entry(t.clone()).or_default();
            if seen.get(&t) == Some(&snap.version) {
                continue;
            }
            // Holding the previous version: only what changed since needs a look.
            let incremental = seen.get(&t).is_some_and(|v| *v == snap.prev);
            seen.insert(t.clone(), snap.version.clone());
            let candidates: Vec<Arc<str>> = if incremental {
                snap.changed.iter().cloned().collect()
            } else if wildcard {
                snap.resources
                    .keys()
                    .chain(k.keys().filter(|n| !snap.resources.contains_key(*n)))
                    .cloned()
                    .collect()
            } else {
                names
                    .iter()
                    .chain(k.keys().filter(|n| !names.contains(*n)))
                    .cloned()
                    .collect()
            };
            let mut parts = Vec::new();
            let mut removed = Vec::new();
            for n in &candidates {
                let wanted = wildcard || names.contains(n);
                match snap.resources.get(n) {
                    Some(r) if wanted && k.get(n) != Some(&r.hash) => {
                        k.insert(n.clone(), r.hash);
                        parts.push(r.delta);
                    }
                    None if k.contains_key(n) => removed.push(n.to_string()),
                    _ => {}
                }
            }
            for n in &removed {
                k.remove(n.as_str());
            }
            if parts.is_empty() && removed.is_empty() {
                continue;
            }
            let nonce = sh.next_nonce();
            {
                let mut v = lock(&sh.delta_versions);
                // Nonces older than the last few thousand are never ACKed any more.
                if v.len() >= LOG_LIMIT {
                    v.clear();
                }
                v.insert(nonce.clone(), snap.version.clone());
            }
            sh.record(&t, &snap.version, &nonce, parts.len());
            let parts = crate::grpc_wire::runs(&snap.all_delta, parts);
            let header = DeltaDiscoveryResponse {
                system_version_info: snap.version.clone(),
                type_url: t.clone(),
                removed_resources: removed,
                nonce,
                ..Default::default()
            };
            use prost::Message;
            if !send(&tx, crate::grpc_wire::message(&header.encode_to_vec(), parts)).await {
                sh.stream_ended(stream);
                return;
            }
        }
    };
    sh.stream_ended(stream);
    finish(&tx, end).await;
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// One HTTP/2 connection ([`crate::http2`]): each request is an ADS stream served by its
/// own task.
async fn connection<S: crate::http2::Sock>(stream: S, sh: Arc<Shared>) {
    crate::http2::serve(stream, move |path, body, tx| match path {
        SOTW_PATH => {
            tokio::spawn(sotw_stream(sh.clone(), crate::grpc_wire::Reader::new(body), tx));
        }
        DELTA_PATH => {
            tokio::spawn(delta_stream(sh.clone(), crate::grpc_wire::Reader::new(body), tx));
        }
        other => {
            let msg = format!("unknown method {other}");
            tokio::spawn(async move { crate::grpc_wire::end(&tx, 12, &msg).await });
        }
    })
    .await;
}

/// The server; dropping it (or [`AdsServer::stop`]) ends every stream.
pub struct AdsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl AdsServer {
    /// Listens on `127.0.0.1:port` (0: any free port), retrying a taken port for up to 10 s
    /// (a restarted control plane reusing its address), on a runtime thread of its own.
    pub fn start(port: u16) -> std::io::Result<AdsServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Listens on `at` (port 0: any free port), retrying a taken port for up to 10 s.
    pub fn start_on(at: SocketAddr) -> std::io::Result<AdsServer> {
        let port = at.port();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // A deep accept queue: a thousand sidecars reconnect at once after a restart.
                let bound = if at.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .and_then(|sock| {
                    sock.set_reuseaddr(true)?;
                    sock.bind(at)?;
                    sock.listen(4096)
                });
                match bound {
                    Ok(l) => break Ok(l),
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(port, error = %e, "ADS server: port taken; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => break Err(e),
                }
            }
        })?;
        let addr = listener.local_addr()?;
        Self::serve(rt, addr, Listener::Tcp(listener))
    }

    /// Listens on the Unix socket `path` (Istio's sidecars reach istio-agent's xDS proxy so);
    /// `addr` then reads 0.0.0.0:0.
    pub fn start_unix(path: &std::path::Path) -> std::io::Result<AdsServer> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let _ = std::fs::remove_file(path);
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(path) })?;
        Self::serve(rt, SocketAddr::from(([0, 0, 0, 0], 0)), Listener::Unix(listener))
    }

    fn serve(rt: tokio::runtime::Runtime, addr: SocketAddr, listener: Listener) -> std::io::Result<AdsServer> {
        let (changed, _) = watch::channel(0);
        let (wanted, _) = watch::channel(0);
        let (raw, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            snaps: Mutex::new(HashMap::new()),
            scoper: Mutex::new(None),
            groups: Mutex::new(BTreeMap::new()),
            wanted,
            keep_log: std::sync::atomic::AtomicBool::new(true),
            metrics: Mutex::new(Metrics::default()),
            set_times: Mutex::new(HashMap::new()),
            changed,
            log: Mutex::new(VecDeque::new()),
            nonce: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            raw,
            delta_versions: Mutex::new(HashMap::new()),
            sub_lists: Mutex::new(HashMap::new()),
            sent: Mutex::new(VecDeque::new()),
            syncz: Mutex::new(BTreeMap::new()),
        });
        let sh = shared.clone();
        let serving = async move {
            loop {
                match &listener {
                    Listener::Tcp(l) => {
                        if let Ok((s, _)) = l.accept().await {
                            let _ = s.set_nodelay(true);
                            tokio::spawn(connection(s, sh.clone()));
                        }
                    }
                    Listener::Unix(l) => {
                        if let Ok((s, _)) = l.accept().await {
                            tokio::spawn(connection(s, sh.clone()));
                        }
                    }
                }
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("ads-server".into()).spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    () = serving => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime ends every stream.
        })?;
        Ok(AdsServer {
            addr,
            shared,
            stop: Some((stop, thread)),
        })
    }

    /// Sets the resources of a type (the whole set) at `version`, and pushes them to every
    /// stream that asked for the type.
    pub fn set(&self, type_url: &str, version: &str, resources: Vec<Any>) {
        self.set_group("", vec![(type_url, version, resources)]);
    }

    /// Sets several types at once: streams see them together, in type order (CDS, EDS, LDS, RDS).
    pub fn set_all(&self, sets: Vec<(&str, &str, Vec<Any>)>) {
        self.set_group("", sets);
    }

    /// [`AdsServer::set_all`] for the streams of one group (see [`AdsServer::set_scoper`]).
    /// Hashing and diffing happen outside the lock streams read under.
    pub fn set_group(&self, group: &str, sets: Vec<(&str, &str, Vec<Any>)>) {
        let built: Vec<(String, Arc<Snap>)> = sets
            .into_iter()
            .map(|(type_url, version, resources)| {
                let before = self.shared.snap(group, type_url);
                (
                    type_url.to_string(),
                    Arc::new(Snap::new(version, resources, before.as_deref())),
                )
            })
            .collect();
        {
            let mut times = lock(&self.shared.set_times);
            for (t, snap) in &built {
                let h = times.entry((group.to_string(), t.clone())).or_default();
                if h.len() >= 16 {
                    h.pop_front();
                }
                h.push_back((snap.version.clone(), Instant::now()));
            }
        }
        let mut snaps = lock(&self.shared.snaps);
        let g = snaps.entry(group.to_string()).or_default();
        for (t, snap) in built {
            g.insert(t, snap);
        }
        drop(snaps);
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Groups streams by node: each stream's group is `scoper(node)` of its first request, and
    /// it is served the snapshots set for that group. Without a scoper every stream is in `""`.
    pub fn set_scoper(&self, scoper: Scoper) {
        *lock(&self.shared.scoper) = Some(scoper);
    }

    /// The groups of the connected streams, with their stream counts.
    pub fn groups(&self) -> BTreeMap<String, usize> {
        lock(&self.shared.groups).clone()
    }

    /// Ticks whenever a group gains its first stream (a control plane then computes it).
    pub fn watch_groups(&self) -> watch::Receiver<u64> {
        self.shared.wanted.subscribe()
    }

    /// Forgets the snapshots of groups not in `keep`.
    pub fn retain_groups(&self, keep: &dyn Fn(&str) -> bool) {
        lock(&self.shared.snaps).retain(|g, _| keep(g));
        lock(&self.shared.set_times).retain(|(g, _), _| keep(g));
    }

    /// Whether requests and responses are kept for [`AdsServer::requests`] / [`AdsServer::sent`]
    /// (on by default; a control plane at scale turns it off and reads the metrics instead).
    pub fn keep_log(&self, keep: bool) {
        self.shared.keep_log.store(keep, Ordering::Relaxed);
    }

    /// Connected streams.
    pub fn connected(&self) -> usize {
        lock(&self.shared.syncz).len()
    }

    /// Prometheus text, with Istio's metric names: `pilot_xds` (connected proxies),
    /// `pilot_xds_pushes{type}`, `pilot_total_xds_rejects{type}` and the histogram
    /// `pilot_proxy_convergence_time` (seconds from a snapshot being set to each ACK of it).
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let m = lock(&self.shared.metrics);
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE pilot_xds gauge\npilot_xds {}", self.connected());
        let _ = writeln!(out, "# TYPE pilot_xds_pushes counter");
        for (t, n) in &m.pushes {
            let _ = writeln!(out, "pilot_xds_pushes{{type=\"{}\"}} {n}", short(t));
        }
        let _ = writeln!(out, "# TYPE pilot_total_xds_rejects counter");
        for (t, n) in &m.rejects {
            let _ = writeln!(out, "pilot_total_xds_rejects{{type=\"{}\"}} {n}", short(t));
        }
        m.convergence.render("pilot_proxy_convergence_time", &mut out);
        out
    }

    /// Sends `resp` as it is on every state-of-the-world stream (garbage, unknown types...).
    pub fn send_raw(&self, resp: DiscoveryResponse) {
        let _ = self.shared.raw.send(resp);
    }

    /// The requests so far (the last 65,536).
    pub fn requests(&self) -> Vec<Req> {
        lock(&self.shared.log).iter().cloned().collect()
    }

    /// Streams opened so far.
    pub fn streams(&self) -> u64 {
        self.shared.streams.load(Ordering::Relaxed)
    }

    /// Istio's `/debug/syncz`, for every connected stream: the node, state of the world or
    /// delta, and per type the version ACKed, the nonce, the last NACK and the counts.
    pub fn syncz(&self) -> serde_json::Value {
        let all = lock(&self.shared.syncz);
        let list: Vec<serde_json::Value> = all
            .iter()
            .map(|(stream, st)| {
                let types: serde_json::Map<String, serde_json::Value> = st
                    .types
                    .iter()
                    .map(|(t, ts)| {
                        (
                            t.rsplit('.').next().unwrap_or(t).to_string(),
                            serde_json::json!({
                                "acked_version": ts.acked,
                                "nonce": ts.nonce,
                                "acks": ts.acks,
                                "nacks": ts.nacks,
                                "last_nack": ts.last_nack,
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "stream": stream,
                    "node": st.node_id,
                    "group": st.group,
                    "mode": if st.delta { "delta" } else { "sotw" },
                    "connected_since": st.since.map(tessera_model::rfc3339),
                    "types": types,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// The responses so far (the last 65,536).
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.shared.sent).iter().cloned().collect()
    }

    fn timed_out(&self, what: &str, limit: Duration) -> String {
        let reqs: Vec<String> = self.requests().iter().map(Req::describe).collect();
        format!("no {what} within {limit:?}; requests:\n{}", reqs.join("\n"))
    }

    /// Waits (blocking, polling) until the requests so far satisfy `pred`, up to `limit`.
    pub fn wait_all(&self, what: &str, limit: Duration, pred: &dyn Fn(&[Req]) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while !pred(&self.requests()) {
            if Instant::now() >= deadline {
                return Err(self.timed_out(what, limit));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Waits (blocking, polling) for a request matching `pred` (among all so far), up to `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&Req) -> bool) -> Result<Req, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(what, limit));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops serving: every stream ends.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some((stop, thread)) = self.stop.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    fn cla(name: &str, port: u32) -> Any {
        any(
            ENDPOINT,
            serde_json::json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}),
        )
        .unwrap()
    }

    /// One SotW stream asking EDS for `names` as node `id`; answers are ACKed as they come.
    async fn stream(
        addr: SocketAddr,
        id: &str,
        names: &[&str],
    ) -> (mpsc::Sender<DiscoveryRequest>, mpsc::Receiver<DiscoveryResponse>) {
        let mut client = crate::ads::connect_raw(&addr.to_string()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let first = DiscoveryRequest {
            node: Some(Node {
                id: id.into(),
                ..Default::default()
            }),
            type_url: ENDPOINT.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        tx.send(first.clone()).await.unwrap();
        let mut inbound = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let (out, got) = mpsc::channel(8);
        let ack = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let mut next = first.clone();
                next.version_info.clone_from(&r.version_info);
                next.response_nonce.clone_from(&r.nonce);
                let _ = ack.send(next).await;
                let _ = out.send(r).await;
            }
        });
        (tx, got)
    }

    async fn next(rx: &mut mpsc::Receiver<DiscoveryResponse>, within: Duration) -> Option<DiscoveryResponse> {
        tokio::time::timeout(within, rx.recv()).await.ok().flatten()
    }

    /// Raw HTTP/2 to the server: a POST to `path` with `body`; the trailers' grpc-status and
    /// grpc-message.
    async fn raw_call(addr: SocketAddr, path: &str, body: Vec<u8>) -> (String, String) {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(format!("http://xds{path}"))
            .header("content-type", "application/grpc")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let collected = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .expect("the server ends the response")
            .unwrap();
        let t = collected.trailers().cloned().unwrap_or_default();
        let get = |k: &str| t.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        (get("grpc-status"), get("grpc-message"))
    }

    /// The server's lean reading of a `DiscoveryRequest` sees what the full message holds.
    #[test]
    fn the_lean_request_reads_what_envoy_sends() {
        use prost::Message;
        let full = DiscoveryRequest {
            version_info: "7".into(),
            node: Some(envoy_types::pb::envoy::config::core::v3::Node {
                id: "sidecar~1".into(),
                cluster: "web".into(),
                ..Default::default()
            }),
            resource_names: vec!["b".into(), "a".into(), "é".into()],
            type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment".into(),
            response_nonce: "n3".into(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "rejected".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let lean = SotwRequest::decode(Bytes::from(full.encode_to_vec())).expect("decodes");
        assert_eq!(lean.version_info, "7");
        assert_eq!(lean.type_url, full.type_url);
        assert_eq!(lean.response_nonce, "n3");
        assert_eq!(lean.error_detail.as_ref().map(|e| e.message.as_str()), Some("rejected"));
        assert_eq!(lean.names().ok(), Some(vec!["b", "a", "é"]));
        assert_eq!(lean.decoded_node().ok().flatten(), full.node);
        let bad = SotwRequest {
            resource_names: vec![Bytes::from_static(&[0xff, 0xfe])],
            ..Default::default()
        };
        assert!(bad.names().is_err());
    }

    #[test]
    fn malformed_requests_end_the_stream_with_a_grpc_error() {
        let server = AdsServer::start(0).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Not a DiscoveryRequest.
            let (st, msg) = raw_call(server.addr, SOTW_PATH, vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
            assert_eq!(st, "3", "{msg}");
            assert!(msg.contains("undecodable request"), "{msg}");
            // Compressed, which nothing negotiated.
            let (st, msg) = raw_call(server.addr, DELTA_PATH, vec![1, 0, 0, 0, 0]).await;
            assert_eq!(
                (st.as_str(), msg.as_str()),
                ("3", "compressed messages are not supported")
            );
            // Longer than the limit: refused from the length prefix, before reading it.
            let (st, msg) = raw_call(server.addr, SOTW_PATH, vec![0, 0x7f, 0xff, 0xff, 0xff]).await;
            assert_eq!(st, "3");
            assert!(msg.contains("over the"), "{msg}");
            // A method the server does not have.
            let (st, msg) = raw_call(server.addr, "/envoy.service.discovery.v3.Nope/Nope", Vec::new()).await;
            assert_eq!(st, "12", "{msg}");
            // A client that just goes away ends its stream cleanly.
            let (st, _) = raw_call(server.addr, SOTW_PATH, Vec::new()).await;
            assert_eq!(st, "0");
            // And the server still serves a real client.
            server.set(ENDPOINT, "1", vec![cla("x", 1)]);
            let (_t, mut rx) = stream(server.addr, "n", &["x"]).await;
            assert!(next(&mut rx, Duration::from_secs(5)).await.is_some());
        });
    }

    #[test]
    fn groups_are_scoped_and_an_endpoint_change_reaches_only_its_users() {
        let server = AdsServer::start(0).unwrap();
        // Nodes `a-*` form group "a", the rest group "b".
        server.set_scoper(Arc::new(|n: Option<&Node>| {
            n.map(|n| n.id.split('-').next().unwrap_or("").to_string())
                .unwrap_or_default()
        }));
        let wanted = server.watch_groups();
        server.set_group("a", vec![(ENDPOINT, "1", vec![cla("x", 1), cla("y", 2)])]);
        server.set_group("b", vec![(ENDPOINT, "1", vec![cla("x", 11)])]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_ta, mut a) = stream(server.addr, "a-1", &["x"]).await;
            let (_ta2, mut a2) = stream(server.addr, "a-2", &["y"]).await;
            let (_tb, mut b) = stream(server.addr, "b-1", &["x"]).await;
            let (_ta3, mut a3) = stream(server.addr, "a-3", &["x", "y"]).await;
            let port = |r: &DiscoveryResponse| {
                use prost::Message;
                let c = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
                c.endpoints[0].lb_endpoints[0].clone()
            };
            let ra = next(&mut a, Duration::from_secs(5)).await.expect("a-1 gets x");
            let rb = next(&mut b, Duration::from_secs(5)).await.expect("b-1 gets x");
            assert_ne!(port(&ra), port(&rb), "each group has its own snapshot");
            next(&mut a2, Duration::from_secs(5)).await.expect("a-2 gets y");
            let r = next(&mut a3, Duration::from_secs(5)).await.expect("a-3 gets x and y");
            assert_eq!(r.resources.len(), 2);
            assert!(wanted.has_changed().unwrap());
            assert_eq!(server.groups().get("a"), Some(&3));
            // Only y changes: a-2 (which uses it) is pushed, a-1 and b-1 are not.
            server.set_group("a", vec![(ENDPOINT, "2", vec![cla("x", 1), cla("y", 3)])]);
            let r = next(&mut a2, Duration::from_secs(5)).await.expect("a-2 is pushed y");
            assert_eq!(r.version_info, "2");
            let r = next(&mut a3, Duration::from_secs(5)).await.expect("a-3 is pushed y");
            assert_eq!(
                (r.version_info.as_str(), r.resources.len()),
                ("2", 1),
                "only the changed resource"
            );
            assert!(
                next(&mut a, Duration::from_millis(300)).await.is_none(),
                "a-1 does not use y"
            );
            assert!(
                next(&mut b, Duration::from_millis(100)).await.is_none(),
                "b is another group"
            );
            // x changes in group a: a-1 is pushed the whole of its subscription.
            server.set_group("a", vec![(ENDPOINT, "3", vec![cla("x", 4), cla("y", 3)])]);
            let r = next(&mut a, Duration::from_secs(5)).await.expect("a-1 is pushed x");
            assert_eq!((r.version_info.as_str(), r.resources.len()), ("3", 1));
            let r = next(&mut a3, Duration::from_secs(5)).await.expect("a-3 is pushed x");
            assert_eq!((r.version_info.as_str(), r.resources.len()), ("3", 1));
            assert!(next(&mut a2, Duration::from_millis(300)).await.is_none());
        });
        // Every ACK of a version set is a convergence sample; pushes are counted.
        server
            .wait_all("acks", Duration::from_secs(5), &|reqs| {
                reqs.iter().filter(|r| !r.nonce.is_empty()).count() >= 8
            })
            .unwrap();
        let m = server.metrics_text();
        assert!(m.contains("pilot_xds 4"), "{m}");
        assert!(m.contains("pilot_xds_pushes{type=\"ClusterLoadAssignment\"} 8"), "{m}");
        assert!(m.contains("pilot_proxy_convergence_time_count 8"), "{m}");
    }
}

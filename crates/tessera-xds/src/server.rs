//! A snapshot-cache ADS server on envoy-types' tonic service: the caller sets a snapshot per
//! type (version and resources) and the server answers each stream as a snapshot cache does
//! (state of the world: the whole set when the version or the names asked for change; delta:
//! changed and removed resources per subscription). Every request is logged, so the ACK / NACK
//! sequence of each client can be read back.
//!
//! The tests and the xDS benchmark drive sidecars (Tessera's and Envoy's) with it; Pilot's xDS
//! server will grow from it (per-node scoping, debouncing and push metrics are not here yet).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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

#[derive(Default, Clone)]
struct Snap {
    version: String,
    resources: BTreeMap<String, Any>,
}

struct Shared {
    snaps: Mutex<HashMap<String, Snap>>,
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
}

/// What `/debug/syncz` shows of one stream.
#[derive(Debug, Clone, Default)]
struct StreamSync {
    node_id: String,
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
                    }
                    None => {
                        t.acks += 1;
                        t.acked.clone_from(&r.version);
                    }
                }
            }
        }
        bounded_push(&mut lock(&self.log), r);
    }

    fn stream_ended(&self, stream: u64) {
        lock(&self.syncz).remove(&stream);
    }

    fn record(&self, type_url: &str, version: &str, nonce: &str, resources: usize) {
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

/// The node metadata's keys (what a test wants to see arrived).
fn meta_keys(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> Vec<String> {
    node.and_then(|n| n.metadata.as_ref())
        .map(|m| m.fields.keys().cloned().collect())
        .unwrap_or_default()
}

fn hash_version(a: &Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.value.hash(&mut h);
    format!("{:x}", h.finish())
}

#[derive(Clone)]
struct Svc(Arc<Shared>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Svc {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let sh = self.0.clone();
        let stream = sh.streams.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let mut changed = sh.changed.subscribe();
            let mut raw = sh.raw.subscribe();
            let mut subs: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut sent: HashMap<String, (String, Vec<String>)> = HashMap::new();
            loop {
                let types: Vec<String> = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => {
                            sh.record_request(Req {
                                at: Instant::now(),
                                type_url: r.type_url.clone(),
                                version: r.version_info.clone(),
                                nonce: r.response_nonce.clone(),
                                names: r.resource_names.clone(),
                                unsubscribe: Vec::new(),
                                initial: BTreeMap::new(),
                                error: r.error_detail.as_ref().map(|e| e.message.clone()),
                                node_id: r.node.as_ref().map(|n| n.id.clone()),
                                node_meta: meta_keys(r.node.as_ref()),
                                delta: false,
                                stream,
                            });
                            let mut names = r.resource_names.clone();
                            names.sort();
                            subs.insert(r.type_url.clone(), names);
                            vec![r.type_url]
                        }
                        _ => break,
                    },
                    c = changed.changed() => {
                        if c.is_err() { break; }
                        subs.keys().cloned().collect()
                    }
                    m = raw.recv() => {
                        if let Ok(mut m) = m {
                            m.nonce = sh.next_nonce();
                            if tx.send(Ok(m)).await.is_err() { break; }
                        }
                        continue;
                    }
                };
                for t in types {
                    let Some(snap) = lock(&sh.snaps).get(&t).cloned() else {
                        continue;
                    };
                    let names = subs.get(&t).cloned().unwrap_or_default();
                    let key = (snap.version.clone(), names.clone());
                    if sent.get(&t) == Some(&key) {
                        continue;
                    }
                    let wildcard = t == LISTENER || t == CLUSTER || names.is_empty();
                    let resources = snap
                        .resources
                        .iter()
                        .filter(|(n, _)| wildcard || names.contains(n))
                        .map(|(_, a)| a.clone())
                        .collect();
                    let resp = DiscoveryResponse {
                        version_info: snap.version.clone(),
                        resources,
                        type_url: t.clone(),
                        nonce: sh.next_nonce(),
                        ..Default::default()
                    };
                    sh.record(&resp.type_url, &resp.version_info, &resp.nonce, resp.resources.len());
                    sent.insert(t, key);
                    if tx.send(Ok(resp)).await.is_err() {
                        sh.stream_ended(stream);
                        return;
                    }
                }
            }
            sh.stream_ended(stream);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let sh = self.0.clone();
        let stream = sh.streams.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let mut changed = sh.changed.subscribe();
            // type -> (wildcard, names); what the client holds: type -> name -> version.
            let mut subs: BTreeMap<String, (bool, BTreeSet<String>)> = BTreeMap::new();
            let mut known: HashMap<String, HashMap<String, String>> = HashMap::new();
            loop {
                let types: Vec<String> = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => {
                            let acked = lock(&sh.delta_versions).get(&r.response_nonce).cloned();
                            sh.record_request(Req {
                                at: Instant::now(),
                                type_url: r.type_url.clone(),
                                version: acked.unwrap_or_default(),
                                nonce: r.response_nonce.clone(),
                                names: r.resource_names_subscribe.clone(),
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
                            entry.1.extend(r.resource_names_subscribe.iter().filter(|n| *n != "*").cloned());
                            let k = known.entry(r.type_url.clone()).or_default();
                            for n in &r.resource_names_unsubscribe {
                                entry.1.remove(n);
                                k.remove(n);
                            }
                            if first {
                                k.extend(r.initial_resource_versions.clone());
                            }
                            if !r.response_nonce.is_empty() {
                                continue;
                            }
                            vec![r.type_url]
                        }
                        _ => break,
                    },
                    c = changed.changed() => {
                        if c.is_err() { break; }
                        subs.keys().cloned().collect()
                    }
                };
                for t in types {
                    let snap = lock(&sh.snaps).get(&t).cloned().unwrap_or_default();
                    let (wildcard, names) = subs.get(&t).cloned().unwrap_or_default();
                    let k = known.entry(t.clone()).or_default();
                    let mut resources = Vec::new();
                    for (n, a) in &snap.resources {
                        if !(wildcard || names.contains(n)) {
                            continue;
                        }
                        let v = hash_version(a);
                        if k.get(n) != Some(&v) {
                            k.insert(n.clone(), v.clone());
                            resources.push(Resource {
                                name: n.clone(),
                                version: v,
                                resource: Some(a.clone()),
                                ..Default::default()
                            });
                        }
                    }
                    let removed: Vec<String> = k.keys().filter(|n| !snap.resources.contains_key(*n)).cloned().collect();
                    for n in &removed {
                        k.remove(n);
                    }
                    if resources.is_empty() && removed.is_empty() {
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
                    let resp = DeltaDiscoveryResponse {
                        system_version_info: snap.version.clone(),
                        resources,
                        type_url: t.clone(),
                        removed_resources: removed,
                        nonce,
                        ..Default::default()
                    };
                    sh.record(
                        &resp.type_url,
                        &resp.system_version_info,
                        &resp.nonce,
                        resp.resources.len(),
                    );
                    if tx.send(Ok(resp)).await.is_err() {
                        sh.stream_ended(stream);
                        return;
                    }
                }
            }
            sh.stream_ended(stream);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// One HTTP/2 connection.
async fn connection<S>(stream: S, svc: AggregatedDiscoveryServiceServer<Svc>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let h = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut svc = svc.clone();
        async move { tonic::codegen::Service::call(&mut svc, req).await }
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), h)
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
                match tokio::net::TcpListener::bind(at).await {
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
        let (raw, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            snaps: Mutex::new(HashMap::new()),
            changed,
            log: Mutex::new(VecDeque::new()),
            nonce: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            raw,
            delta_versions: Mutex::new(HashMap::new()),
            sent: Mutex::new(VecDeque::new()),
            syncz: Mutex::new(BTreeMap::new()),
        });
        let svc = AggregatedDiscoveryServiceServer::new(Svc(shared.clone())).max_decoding_message_size(64 << 20);
        // Served by hyper's HTTP/2 server directly (tonic's own server needs its `router` feature).
        let serving = async move {
            loop {
                match &listener {
                    Listener::Tcp(l) => {
                        if let Ok((s, _)) = l.accept().await {
                            let _ = s.set_nodelay(true);
                            tokio::spawn(connection(s, svc.clone()));
                        }
                    }
                    Listener::Unix(l) => {
                        if let Ok((s, _)) = l.accept().await {
                            tokio::spawn(connection(s, svc.clone()));
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
        let resources = resources.into_iter().map(|a| (name_of(&a), a)).collect();
        lock(&self.shared.snaps).insert(
            type_url.to_string(),
            Snap {
                version: version.to_string(),
                resources,
            },
        );
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Sets several types at once: streams see them together, in type order (CDS, EDS, LDS, RDS).
    pub fn set_all(&self, sets: Vec<(&str, &str, Vec<Any>)>) {
        let mut snaps = lock(&self.shared.snaps);
        for (type_url, version, resources) in sets {
            let resources = resources.into_iter().map(|a| (name_of(&a), a)).collect();
            snaps.insert(
                type_url.to_string(),
                Snap {
                    version: version.to_string(),
                    resources,
                },
            );
        }
        drop(snaps);
        self.shared.changed.send_modify(|v| *v += 1);
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

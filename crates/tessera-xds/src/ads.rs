//! The ADS client: one gRPC stream to the control plane (state of the world or delta) carrying
//! CDS, EDS, LDS and RDS, in Envoy's order (clusters, their endpoints, then listeners and their
//! routes), with ACKs and NACKs, warming, a does-not-exist timer and reconnection with backoff.
//! The last good configuration keeps serving whatever the control plane does.
//!
//! What a response changes reaches the proxy through [`Apply`]: a whole configuration when
//! listeners, routes or clusters changed, or just one cluster's endpoints for an EDS push.

mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use serde_json::{Value, json};
use tessera_model as model;
use tessera_model::rfc3339;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub use state::{CLUSTER, ENDPOINT, Incoming, LISTENER, Model, ROUTE, SECRET, State, Stored, Ty, TypeState};

use crate::bootstrap::{Dynamic, XdsMode};

/// Where accepted configuration goes (the proxy).
pub trait Apply {
    /// Applies a whole configuration; `Err` is NACKed with its message.
    fn config(&self, cfg: model::Config) -> impl Future<Output = Result<(), String>>;
    /// Replaces one EDS cluster's endpoints.
    fn endpoints(&self, cluster: &str, endpoints: &[model::Endpoint]) -> impl Future<Output = Result<(), String>>;
}

/// Any byte stream the gRPC connection can run over.
pub trait AsyncIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> AsyncIo for T {}

/// A boxed [`AsyncIo`].
pub type BoxIo = Box<dyn AsyncIo>;

/// TLS (or mTLS) towards the control plane: wraps each new TCP connection.
pub trait Connect: Send + Sync + 'static {
    /// Runs the handshake on `tcp`.
    fn wrap(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send + 'static>>;
}

/// A bare ADS client on a plaintext connection to `address` (`host:port` or `unix:PATH`), for
/// load clients and tests that speak the protocol themselves.
pub async fn connect_raw(address: &str) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, String> {
    let dialer = Dialer {
        target: address.to_string(),
        tls: None,
    };
    let channel = tonic::transport::Endpoint::from_static("http://xds.control-plane")
        .connect_with_connector(dialer)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20))
}

/// Dials the control plane for tonic: TCP (with TLS when set) or a Unix socket (`unix:PATH`).
#[derive(Clone)]
struct Dialer {
    target: String,
    tls: Option<Arc<dyn Connect>>,
}

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<BoxIo>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let (target, tls) = (self.target.clone(), self.tls.clone());
        Box::pin(async move {
            let dial = async {
                let io: BoxIo = if let Some(path) = target.strip_prefix("unix:") {
                    Box::new(tokio::net::UnixStream::connect(path).await?)
                } else {
                    let tcp = tokio::net::TcpStream::connect(&target).await?;
                    tcp.set_nodelay(true)?;
                    match &tls {
                        Some(t) => t.wrap(tcp).await?,
                        None => Box::new(tcp),
                    }
                };
                Ok::<_, std::io::Error>(io)
            };
            let io = tokio::time::timeout(Duration::from_secs(5), dial)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting took over 5 s"))??;
            Ok(hyper_util::rt::TokioIo::new(io))
        })
    }
}

/// How the client runs.
#[derive(Clone)]
pub struct Settings {
    /// The control plane and the node (from the bootstrap's `dynamic_resources`).
    pub dynamic: Dynamic,
    /// The bootstrap's static part, which every assembled configuration starts from.
    pub base: model::Config,
    /// A wanted resource not sent within this long counts as absent (Envoy: 15 s).
    pub absent_after: Duration,
    /// First reconnection delay, doubled up to `backoff_max` (Envoy: 500 ms to 30 s).
    pub backoff_base: Duration,
    /// Longest reconnection delay.
    pub backoff_max: Duration,
    /// Largest response accepted; a bigger one ends the stream (and is logged), as with Envoy.
    pub max_message: usize,
    /// Send the node on the first request of a stream only (`set_node_on_first_message_only`).
    pub node_on_first_only: bool,
    /// The handshake for the ADS cluster's `transport_socket`; required when it has one.
    pub tls: Option<Arc<dyn Connect>>,
}

impl Settings {
    /// Envoy's defaults around `dynamic`.
    pub fn new(dynamic: Dynamic, base: model::Config) -> Settings {
        let node_on_first_only = dynamic.node_on_first_only;
        Settings {
            dynamic,
            base,
            absent_after: Duration::from_secs(15),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_message: 64 << 20,
            node_on_first_only,
            tls: None,
        }
    }
}

/// What `/config_dump` shows of the control plane's resources.
#[derive(Debug, Default, Clone)]
pub struct DumpView {
    resources: [BTreeMap<String, Arc<Stored>>; 5],
    types: [TypeState; 5],
    connected: bool,
    server: String,
    mode: &'static str,
}

impl DumpView {
    /// Envoy's `configs` list: listeners, clusters, routes and endpoints, each resource with its
    /// version and last update; the last NACK of each type under `error_state`.
    pub fn to_json(&self) -> Value {
        let entry = |ty: Ty, name: &str, s: &Stored| {
            let body = crate::load::any_to_json(&s.any);
            let (v, t) = (s.version.clone(), rfc3339(s.updated));
            match ty {
                Ty::Listener => {
                    json!({"name": name, "active_state": {"version_info": v, "listener": body, "last_updated": t}})
                }
                Ty::Cluster => json!({"version_info": v, "cluster": body, "last_updated": t}),
                Ty::Route => json!({"version_info": v, "route_config": body, "last_updated": t}),
                Ty::Endpoint => json!({"version_info": v, "endpoint_config": body, "last_updated": t}),
                // Never the key: the model's view, which redacts inline private keys.
                Ty::Secret => {
                    let secret = match &s.model {
                        Model::Secret(m) => serde_json::to_value(&**m).unwrap_or_default(),
                        _ => Value::Null,
                    };
                    json!({"name": name, "version_info": v, "last_updated": t, "secret": secret})
                }
            }
        };
        let mut out = Vec::new();
        for (ty, dump_type, key) in [
            (Ty::Listener, "ListenersConfigDump", "dynamic_listeners"),
            (Ty::Cluster, "ClustersConfigDump", "dynamic_active_clusters"),
            (Ty::Route, "RoutesConfigDump", "dynamic_route_configs"),
            (Ty::Endpoint, "EndpointsConfigDump", "dynamic_endpoint_configs"),
            (Ty::Secret, "SecretsConfigDump", "dynamic_active_secrets"),
        ] {
            let list: Vec<Value> = self.resources[ty as usize]
                .iter()
                .map(|(n, s)| entry(ty, n, s))
                .collect();
            let ts = &self.types[ty as usize];
            let mut v = json!({
                "@type": format!("type.googleapis.com/envoy.admin.v3.{dump_type}"),
                "version_info": ts.version,
                key: list,
                "update_success": ts.acks,
                "update_rejected": ts.nacks,
            });
            if let Some((when, why)) = &ts.last_nack {
                v["error_state"] = json!({"last_update_attempt": rfc3339(*when), "details": why});
            }
            out.push(v);
        }
        out.push(json!({
            "@type": "tessera.ControlPlane",
            "server": self.server,
            "mode": self.mode,
            "connected": self.connected,
        }));
        Value::Array(out)
    }
}

/// The ADS client.
pub struct Client<A> {
    settings: Settings,
    apply: A,
    state: State,
    /// Something changed that needs a whole configuration, not applied yet (warming).
    dirty: bool,
    /// CDS has come in and its clusters are warm: LDS may be asked for (also after reconnects).
    cds_initialized: bool,
    dump: Arc<ArcSwap<DumpView>>,
}

/// Requests going out on one stream.
struct Out {
    mode: XdsMode,
    sotw: Option<mpsc::UnboundedSender<DiscoveryRequest>>,
    delta: Option<mpsc::UnboundedSender<DeltaDiscoveryRequest>>,
    node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    node_on_first_only: bool,
    sent_lds: bool,
}

impl Out {
    fn node(&mut self) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
        if self.node_on_first_only {
            self.node.take()
        } else {
            self.node.clone()
        }
    }

    fn status(error: Option<&str>) -> Option<Status> {
        error.map(|m| Status {
            code: 13,
            message: m.to_string(),
            details: Vec::new(),
        })
    }

    /// SotW: every request is the type's whole state (version, names, nonce, error).
    fn sotw(&mut self, state: &State, ty: Ty, error: Option<&str>) {
        self.sotw_with(state, ty, true, error);
    }

    /// `with_nonce: false` for the first request of a new stream: the server has no nonce of
    /// ours to match.
    fn sotw_with(&mut self, state: &State, ty: Ty, with_nonce: bool, error: Option<&str>) {
        let ts = &state.types[ty as usize];
        let req = DiscoveryRequest {
            version_info: ts.version.clone(),
            node: self.node(),
            resource_names: if ty.wildcard() {
                Vec::new()
            } else {
                ts.names.iter().cloned().collect()
            },
            type_url: ty.url().to_string(),
            response_nonce: if with_nonce { ts.nonce.clone() } else { String::new() },
            error_detail: Self::status(error),
            ..Default::default()
        };
        if let Some(tx) = &self.sotw {
            let _ = tx.send(req);
        }
    }

    fn delta(&mut self, mut req: DeltaDiscoveryRequest) {
        req.node = self.node();
        if let Some(tx) = &self.delta {
            let _ = tx.send(req);
        }
    }

    /// The first request for a type on this stream.
    fn initial(&mut self, state: &State, ty: Ty) {
        match self.mode {
            XdsMode::Sotw => self.sotw_with(state, ty, false, None),
            XdsMode::Delta => {
                let ts = &state.types[ty as usize];
                self.delta(DeltaDiscoveryRequest {
                    type_url: ty.url().to_string(),
                    resource_names_subscribe: if ty.wildcard() {
                        Vec::new()
                    } else {
                        ts.names.iter().cloned().collect()
                    },
                    initial_resource_versions: state
                        .of(ty)
                        .iter()
                        .map(|(n, s)| (n.clone(), s.version.clone()))
                        .collect(),
                    ..Default::default()
                });
            }
        }
    }

    fn subscribe(&mut self, state: &State, ty: Ty, added: Vec<String>, removed: Vec<String>) {
        match self.mode {
            XdsMode::Sotw => self.sotw(state, ty, None),
            XdsMode::Delta => self.delta(DeltaDiscoveryRequest {
                type_url: ty.url().to_string(),
                resource_names_subscribe: added,
                resource_names_unsubscribe: removed,
                ..Default::default()
            }),
        }
    }

    /// ACK (no error) or NACK: SotW repeats the accepted version with the new nonce.
    fn answer(&mut self, state: &State, type_url: &str, nonce: &str, error: Option<&str>) {
        match (self.mode, Ty::from_url(type_url)) {
            (XdsMode::Sotw, Some(ty)) => self.sotw(state, ty, error),
            (XdsMode::Sotw, None) => {
                let req = DiscoveryRequest {
                    node: self.node(),
                    type_url: type_url.to_string(),
                    response_nonce: nonce.to_string(),
                    error_detail: Self::status(error),
                    ..Default::default()
                };
                if let Some(tx) = &self.sotw {
                    let _ = tx.send(req);
                }
            }
            (XdsMode::Delta, _) => self.delta(DeltaDiscoveryRequest {
                type_url: type_url.to_string(),
                response_nonce: nonce.to_string(),
                error_detail: Self::status(error),
                ..Default::default()
            }),
        }
    }
}

enum Inbound {
    Sotw(tonic::Streaming<DiscoveryResponse>),
    Delta(tonic::Streaming<DeltaDiscoveryResponse>),
}

impl Inbound {
    async fn next(&mut self) -> Result<Option<Incoming>, tonic::Status> {
        Ok(match self {
            Inbound::Sotw(s) => s.message().await?.map(|r| Incoming {
                type_url: r.type_url,
                version: r.version_info,
                nonce: r.nonce,
                resources: r
                    .resources
                    .into_iter()
                    .map(|a| (None, String::new(), Some(a)))
                    .collect(),
                removed: Vec::new(),
                sotw: true,
            }),
            Inbound::Delta(s) => s.message().await?.map(|r| Incoming {
                type_url: r.type_url,
                version: r.system_version_info,
                nonce: r.nonce,
                resources: r
                    .resources
                    .into_iter()
                    .map(|x| (Some(x.name), x.version, x.resource))
                    .collect(),
                removed: r.removed_resources,
                sotw: false,
            }),
        })
    }
}

/// A little jitter without a random number generator: the clock's nanoseconds.
fn jitter(d: Duration) -> Duration {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // 50% to 100% of `d`.
    d / 2 + d.mul_f64(f64::from(n % 1000) / 2000.0)
}

impl<A: Apply> Client<A> {
    /// A client; nothing happens until [`Client::run`].
    pub fn new(settings: Settings, apply: A) -> Client<A> {
        let mut state = State::new(settings.absent_after);
        state.static_secrets = settings.base.secrets.iter().map(|s| s.name.clone()).collect();
        let dump = DumpView {
            server: settings.dynamic.address.to_string(),
            mode: match settings.dynamic.mode {
                XdsMode::Sotw => "sotw",
                XdsMode::Delta => "delta",
            },
            ..Default::default()
        };
        Client {
            settings,
            apply,
            state,
            dirty: false,
            cds_initialized: false,
            dump: Arc::new(ArcSwap::from_pointee(dump)),
        }
    }

    /// What `/config_dump` shows; updated after every response.
    pub fn dump(&self) -> Arc<ArcSwap<DumpView>> {
        self.dump.clone()
    }

    /// Runs forever: connects, follows the stream, reconnects with backoff when it ends.
    pub async fn run(mut self) {
        let mut backoff = self.settings.backoff_base;
        loop {
            let started = Instant::now();
            match self.stream().await {
                Ok(()) => {
                    tracing::warn!(server = %self.settings.dynamic.address, "the control plane closed the ADS stream")
                }
                Err(e) => {
                    tracing::warn!(server = %self.settings.dynamic.address, error = %e, "ADS stream failed; serving the last good configuration")
                }
            }
            self.set_connected(false);
            if started.elapsed() > Duration::from_secs(30) {
                backoff = self.settings.backoff_base;
            }
            let wait = jitter(backoff);
            tracing::info!(delay = ?wait, "reconnecting to the control plane");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.settings.backoff_max);
        }
    }

    fn set_connected(&self, connected: bool) {
        let mut v = (**self.dump.load()).clone();
        v.connected = connected;
        self.dump.store(Arc::new(v));
    }

    fn publish(&self) {
        let v = DumpView {
            resources: self.state.resources.clone(),
            types: self.state.types.clone(),
            connected: true,
            server: self.settings.dynamic.address.to_string(),
            mode: self.dump.load().mode,
        };
        self.dump.store(Arc::new(v));
    }

    async fn stream(&mut self) -> Result<(), String> {
        let d = self.settings.dynamic.clone();
        if d.tls.is_some() && self.settings.tls.is_none() {
            return Err("the ADS cluster has a transport_socket but no TLS connector was given".into());
        }
        let dialer = Dialer {
            target: d.address.clone(),
            tls: self.settings.tls.clone(),
        };
        // The URI only names the :authority; the dialer decides where bytes go.
        let channel = tonic::transport::Endpoint::from_static("http://xds.control-plane")
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_with_connector(dialer)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", d.address))?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(self.settings.max_message);
        let mut out = Out {
            mode: d.mode,
            sotw: None,
            delta: None,
            node: Some(d.node.clone()),
            node_on_first_only: self.settings.node_on_first_only,
            sent_lds: false,
        };
        let now = Instant::now();
        self.state.restart_timers(now);
        let mut inbound = match d.mode {
            XdsMode::Sotw => {
                let (tx, rx) = mpsc::unbounded_channel();
                out.sotw = Some(tx);
                self.initial_requests(&mut out);
                let r = client
                    .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
                    .await
                    .map_err(|e| format!("StreamAggregatedResources: {e}"))?;
                Inbound::Sotw(r.into_inner())
            }
            XdsMode::Delta => {
                let (tx, rx) = mpsc::unbounded_channel();
                out.delta = Some(tx);
                self.initial_requests(&mut out);
                let r = client
                    .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
                    .await
                    .map_err(|e| format!("DeltaAggregatedResources: {e}"))?;
                Inbound::Delta(r.into_inner())
            }
        };
        tracing::info!(server = %d.address, mode = ?d.mode, "ADS stream open");
        self.set_connected(true);
        loop {
            let deadline = self.state.next_deadline();
            tokio::select! {
                m = inbound.next() => match m {
                    Ok(Some(inc)) => self.handle(inc, &mut out).await,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(format!("{}: {}", status.code(), status.message())),
                },
                () = async {
                    match deadline {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => self.on_timer(&mut out).await,
            }
        }
    }

    fn initial_requests(&self, out: &mut Out) {
        let d = &self.settings.dynamic;
        if d.cds {
            out.initial(&self.state, Ty::Cluster);
        }
        if !self.state.types[Ty::Endpoint as usize].names.is_empty() {
            out.initial(&self.state, Ty::Endpoint);
        }
        if !self.state.types[Ty::Secret as usize].names.is_empty() {
            out.initial(&self.state, Ty::Secret);
        }
        if d.lds && (!d.cds || self.cds_initialized) {
            out.initial(&self.state, Ty::Listener);
            out.sent_lds = true;
            if !self.state.types[Ty::Route as usize].names.is_empty() {
                out.initial(&self.state, Ty::Route);
            }
        }
    }

    async fn handle(&mut self, inc: Incoming, out: &mut Out) {
        let type_url = inc.type_url.clone();
        let nonce = inc.nonce.clone();
        let version = inc.version.clone();
        let ty = Ty::from_url(&type_url);
        let before = ty.map(|t| {
            (
                self.state.resources[t as usize].clone(),
                self.state.types[t as usize].clone(),
            )
        });
        let n = inc.resources.len();
        let started = Instant::now();
        // What to answer; sent after /config_dump shows the outcome, so whoever sees the ACK or
        // NACK also sees it there.
        let error = match self.state.accept(inc, Instant::now()) {
            Err(e) => {
                tracing::warn!(type_url = %type_url, version = %version, error = %e, "NACK: configuration rejected; keeping the last good one");
                self.state.rejected(&type_url, nonce.clone(), &e);
                Some(e)
            }
            Ok(change) => {
                for (t, added, removed) in change.subscriptions.iter().cloned() {
                    out.subscribe(&self.state, t, added, removed);
                }
                let decoded = started.elapsed();
                match self.apply_change(&change).await {
                    Ok(()) => {
                        tracing::debug!(
                            type_url = %type_url,
                            version = %version,
                            resources = n,
                            decode = ?decoded,
                            total = ?started.elapsed(),
                            "ACK"
                        );
                        None
                    }
                    Err(e) => {
                        tracing::warn!(type_url = %type_url, version = %version, error = %e, "NACK: the proxy refused the configuration; keeping the last good one");
                        if let (Some(t), Some((res, ts))) = (ty, before) {
                            self.state.resources[t as usize] = res;
                            self.state.types[t as usize] = ts;
                        }
                        self.state.rejected(&type_url, nonce.clone(), &e);
                        Some(e)
                    }
                }
            }
        };
        self.publish();
        out.answer(&self.state, &type_url, &nonce, error.as_deref());
        self.maybe_start_lds(out);
    }

    async fn on_timer(&mut self, out: &mut Out) {
        for (ty, name) in self.state.expire(Instant::now()) {
            tracing::warn!(
                resource = %name,
                type_url = ty.url(),
                after = ?self.settings.absent_after,
                "the control plane did not send a resource in time; treating it as absent"
            );
        }
        if let Err(e) = self.apply_change(&state::Change::default()).await {
            tracing::error!(error = %e, "configuration not applied; keeping the last good one");
        }
        self.maybe_start_lds(out);
    }

    fn maybe_start_lds(&mut self, out: &mut Out) {
        let d = &self.settings.dynamic;
        if d.cds
            && !self.cds_initialized
            && self.state.types[Ty::Cluster as usize].acks > 0
            && self.state.clusters_warm()
        {
            self.cds_initialized = true;
        }
        if d.lds && !out.sent_lds && (!d.cds || self.cds_initialized) {
            out.initial(&self.state, Ty::Listener);
            out.sent_lds = true;
        }
    }

    /// Applies what changed: a whole configuration once nothing is warming, or just endpoints.
    async fn apply_change(&mut self, change: &state::Change) -> Result<(), String> {
        if change.full {
            self.dirty = true;
        }
        if self.dirty {
            if !self.state.warm() {
                return Ok(());
            }
            let cfg = self.state.assemble(&self.settings.base)?;
            self.apply.config(cfg).await?;
            self.dirty = false;
            return Ok(());
        }
        if change.endpoints.is_empty() {
            return Ok(());
        }
        // Which clusters take each EDS name, once per push (a push may name every cluster).
        let users = self.state.clusters_by_eds_name();
        for eds in &change.endpoints {
            for cluster in users.get(eds.as_str()).into_iter().flatten() {
                self.apply.endpoints(cluster, self.state.endpoints(eds)).await?;
            }
        }
        Ok(())
    }
}

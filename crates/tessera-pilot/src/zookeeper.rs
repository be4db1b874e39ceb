//! The ZooKeeper / Dubbo registry adapter (`registries.zookeeper` in pilot.yaml):
//!
//! ```yaml
//! registries:
//!   zookeeper:
//!     servers: "127.0.0.1:2181,127.0.0.1:2182"   # required; host:port, tried in turn
//!     root: /dubbo                                # Dubbo's registry root (default /dubbo)
//!     namespace: default                          # of every service it defines (default default)
//!     session_timeout: 10s                        # asked of the server, which may clamp it
//! ```
//!
//! Dubbo providers register ephemeral nodes `<root>/<interface>/providers/<url-encoded URL>`,
//! the URL being like `dubbo://10.0.0.7:20880/com.foo.DemoService?version=1.0.0&group=g1&...`.
//! The mapping ([`map_providers`], a pure function):
//! - each interface is a Service named after it, lower-cased, every run of characters other
//!   than `a-z0-9` made one `-` (`com.foo.DemoService` → `com-foo-demoservice`), in the
//!   configured namespace, with the label `interface` = the interface as written. Two
//!   interfaces mapping to one name: the first in order keeps it, the other is reported;
//! - the URL scheme is the port: `dubbo` → port `dubbo` (protocol dubbo), `tri` and `grpc` →
//!   `tri` / `grpc` (protocol grpc: Triple is gRPC over HTTP/2), `bolt` → `bolt`, `rest` and
//!   `http` → `http` (protocol http); other schemes are reported and skipped. A service port's
//!   number is the one most of its providers use (ties: the lowest);
//! - each provider URL is an Instance with that one port: its address (an IP: provider host
//!   names are not resolved), labels `version`, `group`, `application` and `tag` from the URL
//!   parameters of those names, weight from `weight` (Dubbo's default 100) clamped to 1..128,
//!   unhealthy when `enabled=false` or `disabled`/`disabled=true`. The same address and port
//!   registered twice (a stale node of a previous provider session) counts once, the newest
//!   `timestamp` winning;
//! - a service stays (with no instances) once its providers are gone, as long as the
//!   interface's node does; an interface that never had a provider defines nothing (Dubbo's
//!   `config` and `metadata` nodes live under the same root).
//!
//! A malformed URL is logged with its node path and the reason, and skipped.
//!
//! The adapter speaks the ZooKeeper protocol itself ([`wire`]): one session, child watches on
//! the root and on every `<interface>/providers` node, each change re-read and a whole view
//! published. On a lost connection, a silent server or an expired session it reports
//! `connected: false` with the error, keeps its last view, and reconnects with jittered
//! exponential backoff (200 ms doubling to 10 s), each time with a new session that re-reads
//! everything: the adapter owns no ephemeral node, so nothing is lost by not resuming a session.

mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::Problem;
use crate::model::{Instance, Port, Protocol, Service, Snapshot};
use crate::registry::{Adapter, Feed, Section, absolute_path};
use wire::{Conn, Listing, WireError};

/// Dubbo's default provider weight.
const DEFAULT_WEIGHT: i64 = 100;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The adapter's settings, from `registries.zookeeper`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkConfig {
    /// `host:port` of each server, in the order given.
    pub servers: Vec<String>,
    /// The servers as written, for `source`.
    pub servers_text: String,
    /// The registry root, `/dubbo` by default.
    pub root: String,
    /// The namespace of every service.
    pub namespace: String,
    /// The session timeout asked for.
    pub session_timeout: Duration,
}

const FIELDS: &[&str] = &["servers", "root", "namespace", "session_timeout"];

/// Checks one `host:port` of `servers`.
fn check_server(s: &str) -> Result<(), String> {
    if s.contains('/') {
        return Err(format!(
            "`{s}`: a chroot path is not supported in `servers`; set `root` instead"
        ));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or_else(|| format!("`{s}`: `[` without `]`"))?;
        (h, p.strip_prefix(':').ok_or_else(|| format!("`{s}` has no port"))?)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port (host:port)"))?
    };
    if host.is_empty() {
        return Err(format!("`{s}` has no host"));
    }
    if s.starts_with('[') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!("`{host}` is not an IPv6 address"));
    }
    if !s.starts_with('[') && host.contains(':') {
        return Err(format!("`{s}`: write an IPv6 address as [addr]:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{s}`: `{port}` is not a port from 1 to 65535")),
    }
}

impl ZkConfig {
    /// Reads `registries.zookeeper`; every problem names its field.
    pub fn parse(v: &Value, file: &str) -> Result<ZkConfig, Vec<Problem>> {
        let mut sec = Section::new(
            v,
            file,
            "registries.zookeeper",
            FIELDS,
            "{ servers: \"127.0.0.1:2181\" }",
        )?;
        let servers_text = sec.string("servers");
        let mut servers = Vec::new();
        match &servers_text {
            None if sec.get("servers").is_none() => sec.problem(
                "servers",
                "required: the ZooKeeper servers, e.g. \"127.0.0.1:2181\" or \"zk1:2181,zk2:2181\"".into(),
            ),
            None => {}
            Some(text) => {
                for s in text.split(',').map(str::trim) {
                    if s.is_empty() {
                        sec.problem("servers", format!("an empty server in `{text}`"));
                        continue;
                    }
                    match check_server(s) {
                        Ok(()) => servers.push(s.to_string()),
                        Err(r) => sec.problem("servers", r),
                    }
                }
            }
        }
        let root = sec.string("root").unwrap_or_else(|| "/dubbo".to_string());
        if root != "/" && !absolute_path(&root) {
            sec.problem(
                "root",
                format!(
                    "`{root}` is not an absolute ZooKeeper path such as /dubbo (no trailing `/`, no empty, `.` or `..` part)"
                ),
            );
        }
        let namespace = sec.namespace();
        let session_timeout = sec.duration(
            "session_timeout",
            Duration::from_secs(10),
            (Duration::from_secs(1), Duration::from_secs(600), "from 1s to 10m"),
            "10s or 4000ms",
        );
        sec.finish(ZkConfig {
            servers,
            servers_text: servers_text.unwrap_or_default(),
            root,
            namespace,
            session_timeout,
        })
    }

    /// The path of `child` under the root.
    fn path(&self, child: &str) -> String {
        if self.root == "/" {
            format!("/{child}")
        } else {
            format!("{}/{child}", self.root)
        }
    }

    /// The providers node of `interface`.
    fn providers(&self, interface: &str) -> String {
        format!("{}/providers", self.path(interface))
    }
}

/// Builds the adapter from its pilot.yaml section.
pub fn from_config(v: &Value, file: &str) -> Result<Arc<dyn Adapter>, Vec<Problem>> {
    Ok(Arc::new(ZooKeeper {
        cfg: ZkConfig::parse(v, file)?,
    }))
}

// ---------------------------------------------------------------------------------------------
// Mapping: Dubbo provider URLs into the service model.

/// One provider URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The port name and protocol its scheme maps to.
    pub port_name: &'static str,
    /// The protocol.
    pub protocol: Protocol,
    /// Address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// `version`, `group`, `application`, `tag`.
    pub labels: BTreeMap<String, String>,
    /// 1 to 128.
    pub weight: u32,
    /// False when disabled.
    pub healthy: bool,
    /// The `timestamp` parameter (0 without one), to prefer the newest of duplicates.
    pub timestamp: u64,
}

/// The schemes providers may register, the port name and protocol each becomes.
pub const SCHEMES: &[(&str, &str, Protocol)] = &[
    ("dubbo", "dubbo", Protocol::Dubbo),
    ("tri", "tri", Protocol::Grpc),
    ("grpc", "grpc", Protocol::Grpc),
    ("bolt", "bolt", Protocol::Bolt),
    ("rest", "http", Protocol::Http),
    ("http", "http", Protocol::Http),
];

/// The URL parameters that become instance labels.
pub const LABELS: &[&str] = &["version", "group", "application", "tag"];

/// Decodes `%XX` escapes and `+` (Java's `URLEncoder` writes a space as `+`).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad %-escape at byte {i}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".to_string())
}

/// Parses one provider node name (a URL-encoded Dubbo URL).
pub fn parse_provider(node: &str) -> Result<Provider, String> {
    let url = percent_decode(node)?;
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL (no `://`)"))?;
    let scheme_l = scheme.to_ascii_lowercase();
    let &(_, port_name, protocol) = SCHEMES.iter().find(|(s, _, _)| *s == scheme_l).ok_or_else(|| {
        let known: Vec<&str> = SCHEMES.iter().map(|(s, _, _)| *s).collect();
        format!("unsupported protocol `{scheme}` (known: {})", known.join(", "))
    })?;
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or("");
    // user:password@ is Dubbo-legal; drop it.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, p) = r
            .split_once(']')
            .ok_or_else(|| format!("`{hostport}`: `[` without `]`"))?;
        (h, p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let address: IpAddr = host
        .parse()
        .map_err(|_| format!("host `{host}` is not an IP address (Pilot does not resolve provider host names)"))?;
    if address.is_unspecified() {
        return Err(format!("host `{host}` cannot be called"));
    }
    let port = port.ok_or_else(|| format!("`{hostport}` has no port"))?;
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("`{port}` is not a port from 1 to 65535")),
    };
    let mut params: HashMap<&str, &str> = HashMap::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        params.insert(k, v);
    }
    if let Some(side) = params.get("side")
        && *side != "provider"
    {
        return Err(format!("registered with side={side}, not as a provider"));
    }
    let weight = match params.get("weight") {
        None => DEFAULT_WEIGHT,
        Some(w) => w
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("weight `{w}` is not an integer"))?,
    };
    let weight = weight.clamp(1, 128) as u32;
    let disabled = matches!(params.get("disabled"), Some(&"") | Some(&"true"));
    let healthy = !disabled && params.get("enabled") != Some(&"false");
    let labels = LABELS
        .iter()
        .filter_map(|k| {
            params
                .get(k)
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v.to_string()))
        })
        .collect();
    let timestamp = params.get("timestamp").and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(Provider {
        port_name,
        protocol,
        address,
        port,
        labels,
        weight,
        healthy,
        timestamp,
    })
}

/// The service name of a Dubbo interface (module docs); None when nothing is left.
pub fn service_name(interface: &str) -> Option<String> {
    let mut out = String::with_capacity(interface.len());
    for c in interface.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

/// A provider node skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The node (or interface) path.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// Maps what the registry holds into a whole view. `listing` is, per interface, its provider
/// node names (None: no `providers` node); `remembered` keeps the ports of services whose
/// providers are gone (see the module docs), and is updated.
pub fn map_providers(
    cfg: &ZkConfig,
    listing: &BTreeMap<String, Option<Vec<String>>>,
    remembered: &mut BTreeMap<String, Vec<Port>>,
) -> (Snapshot, Vec<Skipped>) {
    let mut snap = Snapshot::default();
    let mut skipped = Vec::new();
    let mut owner: BTreeMap<String, &str> = BTreeMap::new();
    remembered.retain(|iface, _| listing.contains_key(iface));
    for (iface, children) in listing {
        let dir = cfg.providers(iface);
        let Some(name) = service_name(iface) else {
            skipped.push(Skipped {
                path: cfg.path(iface),
                reason: "the interface name has no letter or digit to name a service after".into(),
            });
            continue;
        };
        let mut providers: Vec<(String, Provider)> = Vec::new();
        for node in children.iter().flatten() {
            match parse_provider(node) {
                Ok(p) => providers.push((node.clone(), p)),
                Err(reason) => skipped.push(Skipped {
                    path: format!("{dir}/{node}"),
                    reason,
                }),
            }
        }
        // Ports: per port name, the number most providers use (ties: the lowest).
        let mut counts: BTreeMap<&'static str, (Protocol, BTreeMap<u16, usize>)> = BTreeMap::new();
        for (_, p) in &providers {
            *counts
                .entry(p.port_name)
                .or_insert((p.protocol, BTreeMap::new()))
                .1
                .entry(p.port)
                .or_default() += 1;
        }
        let ports: Vec<Port> = if counts.is_empty() {
            match remembered.get(iface) {
                Some(p) if children.is_some() => p.clone(),
                _ => continue,
            }
        } else {
            counts
                .into_iter()
                .map(|(pname, (protocol, by_port))| {
                    let mut best: Option<(u16, usize)> = None;
                    for (port, n) in by_port {
                        if best.is_none_or(|(_, m)| n > m) {
                            best = Some((port, n));
                        }
                    }
                    Port {
                        name: pname.to_string(),
                        port: best.map_or(0, |(p, _)| p),
                        protocol,
                    }
                })
                .collect()
        };
        if let Some(first) = owner.get(&name) {
            skipped.push(Skipped {
                path: cfg.path(iface),
                reason: format!("its service name `{name}` is already taken by interface `{first}`"),
            });
            continue;
        }
        owner.insert(name.clone(), iface);
        remembered.insert(iface.clone(), ports.clone());
        let source = format!("zookeeper:{}{dir}", cfg.servers_text);
        // One instance per address, port name and port; the newest registration wins.
        let mut by_endpoint: BTreeMap<(IpAddr, &'static str, u16), Provider> = BTreeMap::new();
        for (_, p) in providers {
            let key = (p.address, p.port_name, p.port);
            match by_endpoint.get(&key) {
                Some(old) if old.timestamp >= p.timestamp => {}
                _ => {
                    by_endpoint.insert(key, p);
                }
            }
        }
        let instances: Vec<Instance> = by_endpoint
            .into_values()
            .map(|p| Instance {
                address: p.address,
                ports: BTreeMap::from([(p.port_name.to_string(), p.port)]),
                labels: p.labels,
                weight: p.weight,
                healthy: p.healthy,
                locality: None,
                source: source.clone(),
            })
            .collect();
        let key = format!("{}/{name}", cfg.namespace);
        snap.services.insert(
            key.clone(),
            Service {
                namespace: cfg.namespace.clone(),
                name,
                ports,
                labels: BTreeMap::from([("interface".to_string(), iface.clone())]),
                source,
            },
        );
        snap.instances.insert(key, std::sync::Arc::new(instances));
    }
    (snap, skipped)
}

// ---------------------------------------------------------------------------------------------
// The adapter: a session, its watches, reconnection.

/// The ZooKeeper / Dubbo registry adapter.
#[derive(Debug)]
pub struct ZooKeeper {
    cfg: ZkConfig,
}

impl ZooKeeper {
    /// An adapter for `cfg`.
    pub fn new(cfg: ZkConfig) -> ZooKeeper {
        ZooKeeper { cfg }
    }
}

impl Adapter for ZooKeeper {
    fn kind(&self) -> &'static str {
        "zookeeper"
    }

    fn run(self: Arc<Self>, feed: Feed) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move { watch_forever(&self.cfg, &feed).await })
    }
}

/// A random number, enough for jitter (std's hasher keys are random per process and per call).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// Half to all of `d`.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(2) as u64;
    Duration::from_millis(ms / 2 + random() % (ms / 2 + 1))
}

async fn watch_forever(cfg: &ZkConfig, feed: &Feed) {
    let mut backoff = BACKOFF_MIN;
    // Start at a random server so that many Pilots spread over the ensemble.
    let mut next = (random() % cfg.servers.len().max(1) as u64) as usize;
    let mut state = State::default();
    loop {
        let Some(server) = cfg.servers.get(next % cfg.servers.len().max(1)) else {
            return;
        };
        next = next.wrapping_add(1);
        let mut published = false;
        let err = session(cfg, server, feed, &mut state, &mut published).await;
        if published {
            backoff = BACKOFF_MIN;
        }
        let wait = jitter(backoff);
        tracing::warn!(
            registry = "zookeeper",
            server = %server,
            error = %err,
            retry_in = ?wait,
            "zookeeper registry disconnected; Pilot keeps its last view and reconnects"
        );
        feed.status(false, Some(err.to_string()));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// What the adapter keeps across sessions.
#[derive(Debug, Default)]
struct State {
    /// Ports of services whose providers are gone (see [`map_providers`]).
    remembered: BTreeMap<String, Vec<Port>>,
    /// Bad nodes already logged, so a re-read does not log them again.
    reported: BTreeSet<String>,
}

/// One session: read everything, publish, then follow the watches until the session ends;
/// returns why it ended.
async fn session(cfg: &ZkConfig, server: &str, feed: &Feed, state: &mut State, published: &mut bool) -> WireError {
    let mut conn = match Conn::connect(server, cfg.session_timeout).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    tracing::info!(
        registry = "zookeeper",
        server = %server,
        session = format_args!("{:#x}", conn.session),
        timeout = ?conn.timeout,
        "zookeeper session established; reading {}",
        cfg.root
    );
    // Per interface, its provider nodes (None: no providers node yet).
    let mut listing: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    let mut root_dirty = true;
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    loop {
        if root_dirty {
            root_dirty = false;
            let ifaces = match conn.children(std::slice::from_ref(&cfg.root)).await {
                Ok(mut l) => match l.pop() {
                    Some(Listing::Children(c)) => c,
                    _ => Vec::new(),
                },
                Err(e) => return e,
            };
            let ifaces: BTreeSet<String> = ifaces.into_iter().collect();
            listing.retain(|k, _| ifaces.contains(k));
            for i in ifaces {
                if !listing.contains_key(&i) {
                    dirty.insert(i);
                }
            }
        }
        if !dirty.is_empty() {
            let ifaces: Vec<String> = std::mem::take(&mut dirty).into_iter().collect();
            let paths: Vec<String> = ifaces.iter().map(|i| cfg.providers(i)).collect();
            let lists = match conn.children(&paths).await {
                Ok(l) => l,
                Err(e) => return e,
            };
            for (i, l) in ifaces.into_iter().zip(lists) {
                let kids = match l {
                    Listing::Children(mut c) => {
                        c.sort();
                        Some(c)
                    }
                    Listing::Missing => None,
                };
                listing.insert(i, kids);
            }
        }
        let (snap, skipped) = map_providers(cfg, &listing, &mut state.remembered);
        if state.reported.len() > 10_000 {
            state.reported.clear();
        }
        for s in skipped {
            if state.reported.insert(format!("{}\n{}", s.path, s.reason)) {
                tracing::warn!(registry = "zookeeper", node = %s.path, reason = %s.reason, "Dubbo provider skipped");
            }
        }
        tracing::debug!(
            registry = "zookeeper",
            services = snap.services.len(),
            "zookeeper view published"
        );
        feed.publish(snap);
        *published = true;
        // Wait for a change; take every notification already here before re-reading.
        loop {
            let ev = match conn.next_event().await {
                Ok(ev) => ev,
                Err(e) => return e,
            };
            if ev.kind == wire::EVENT_NONE {
                // A state change on a live connection (the server says SyncConnected): nothing
                // to re-read.
                continue;
            }
            if ev.path == cfg.root {
                root_dirty = true;
            } else if let Some(iface) = ev
                .path
                .strip_suffix("/providers")
                .and_then(|p| p.strip_prefix(cfg.path("").as_str()))
                .filter(|i| !i.contains('/') && listing.contains_key(*i))
            {
                dirty.insert(iface.to_string());
            }
            if (root_dirty || !dirty.is_empty()) && !conn.has_events() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! The Istio kinds in their CRD form, read strictly into what Pilot translates. Fields a sidecar
//! cannot honour are refused here, with the reason, so a file is accepted or rejected whole.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::rbac::v3::Policy;
use serde_json::Value;

use super::read::{
    Cx, O, boolean, duration, int, join, list, obj, one_of, percent, port, string, string_map, strings, sub, u32_,
};
use crate::model::Protocol;

/// Where a resource came from: its file, its place in the file, and its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// The kind (`VirtualService`...).
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace (`default` when the document gives none, as kubectl does).
    pub namespace: String,
    /// The file.
    pub file: String,
    /// How problems name the document: `document 2 (VirtualService default/reviews)`.
    pub doc: String,
}

impl Meta {
    /// A problem at `path` in this resource.
    pub fn problem(&self, path: &str, reason: impl Into<String>) -> crate::Problem {
        crate::Problem {
            file: self.file.clone(),
            path: format!("{} {path}", self.doc),
            reason: reason.into(),
        }
    }
}

/// One accepted resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// A ServiceEntry.
    ServiceEntry(Box<ServiceEntry>),
    /// A DestinationRule.
    DestinationRule(Box<DestinationRule>),
    /// A VirtualService.
    VirtualService(Box<VirtualService>),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    /// A PeerAuthentication or a Sidecar: checked, and with no effect on what Pilot generates.
    Checked(Meta),
}

impl Resource {
    /// Where it came from.
    pub fn meta(&self) -> &Meta {
        match self {
            Resource::ServiceEntry(r) => &r.meta,
            Resource::DestinationRule(r) => &r.meta,
            Resource::VirtualService(r) => &r.meta,
            Resource::AuthorizationPolicy(r) => &r.meta,
            Resource::Checked(m) => m,
        }
    }
}

/// Short names resolve in the resource's namespace, as in Istio.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// A ServiceEntry: services of its own, by host name.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEntry {
    /// Where from.
    pub meta: Meta,
    /// Host names, each a service.
    pub hosts: Vec<String>,
    /// Ports.
    pub ports: Vec<SePort>,
    /// True: endpoints are names resolved by the sidecar (STRICT_DNS); false: IP addresses (EDS).
    pub dns: bool,
    /// Endpoints (for DNS without endpoints, the hosts themselves).
    pub endpoints: Vec<SeEndpoint>,
}

/// A ServiceEntry port.
#[derive(Debug, Clone, PartialEq)]
pub struct SePort {
    /// Number clients call.
    pub number: u16,
    /// Name (endpoints map ports by it).
    pub name: String,
    /// What it speaks (TLS, HTTPS, MONGO... are TCP to Pilot).
    pub protocol: Protocol,
    /// The endpoints' port when they give none.
    pub target_port: Option<u16>,
}

/// A ServiceEntry endpoint (WorkloadEntry).
#[derive(Debug, Clone, PartialEq)]
pub struct SeEndpoint {
    /// IP address (STATIC) or host name (DNS).
    pub address: String,
    /// Port per port name.
    pub ports: BTreeMap<String, u16>,
    /// Labels (subsets select on them).
    pub labels: BTreeMap<String, String>,
    /// Weight.
    pub weight: u32,
    /// Region / zone / sub-zone.
    pub locality: Option<(String, String, String)>,
}

/// A DestinationRule.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRule {
    /// Where from.
    pub meta: Meta,
    /// The host, resolved (`reviews` in `default` is `reviews.default.svc.cluster.local`).
    pub host: String,
    /// The policy for every port and subset.
    pub policy: Option<TrafficPolicy>,
    /// Subsets.
    pub subsets: Vec<Subset>,
}

/// A subset: endpoints selected by labels, with its own policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    /// Name (`v1`).
    pub name: String,
    /// Endpoint labels it selects.
    pub labels: BTreeMap<String, String>,
    /// Its policy, over the rule's.
    pub policy: Option<TrafficPolicy>,
}

/// A traffic policy (each part replaces the one of a less specific policy whole, as in Istio).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    /// Load balancing.
    pub lb: Option<Lb>,
    /// Connection pool (circuit breakers, connect timeout).
    pub pool: Option<Pool>,
    /// Outlier detection.
    pub outlier: Option<Outlier>,
    /// TLS origination.
    pub tls: Option<Tls>,
    /// Per port.
    pub ports: Vec<(u16, TrafficPolicy)>,
}

/// Load balancing.
#[derive(Debug, Clone, PartialEq)]
pub enum Lb {
    /// ROUND_ROBIN.
    RoundRobin,
    /// LEAST_REQUEST (and the deprecated LEAST_CONN).
    LeastRequest,
    /// RANDOM.
    Random,
    /// consistentHash: a ring hash (minimum ring size) or Maglev (table size), and what to hash.
    Hash {
        /// What requests hash on.
        key: HashKey,
        /// Maglev rather than a ring.
        maglev: bool,
        /// minimumRingSize or tableSize.
        size: Option<u64>,
    },
}

/// What a consistent hash hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The client's IP.
    SourceIp,
    /// A query parameter.
    Query(String),
}

/// Connection pool settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pool {
    /// tcp.maxConnections.
    pub max_connections: Option<u32>,
    /// tcp.connectTimeout.
    pub connect_timeout: Option<Duration>,
    /// http.http1MaxPendingRequests.
    pub max_pending: Option<u32>,
    /// http.http2MaxRequests.
    pub max_requests: Option<u32>,
    /// http.maxRetries.
    pub max_retries: Option<u32>,
    /// http.useClientProtocol.
    pub use_client_protocol: bool,
}

/// Outlier detection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outlier {
    /// consecutive5xxErrors.
    pub consecutive_5xx: Option<u32>,
    /// consecutiveGatewayErrors.
    pub consecutive_gateway: Option<u32>,
    /// consecutiveLocalOriginFailures.
    pub consecutive_local_origin: Option<u32>,
    /// splitExternalLocalOriginErrors.
    pub split: bool,
    /// interval.
    pub interval: Option<Duration>,
    /// baseEjectionTime.
    pub base_ejection_time: Option<Duration>,
    /// maxEjectionPercent.
    pub max_ejection_percent: Option<u32>,
    /// minHealthPercent (the panic threshold).
    pub min_health_percent: Option<u32>,
}

/// TLS towards the destination.
#[derive(Debug, Clone, PartialEq)]
pub enum Tls {
    /// Plaintext.
    Disable,
    /// SIMPLE or MUTUAL origination.
    Originate {
        /// CA file the server certificate is verified against (none: insecureSkipVerify).
        ca: Option<String>,
        /// Client certificate and key files (MUTUAL).
        client: Option<(String, String)>,
        /// SNI.
        sni: Option<String>,
        /// Accepted server SANs.
        sans: Vec<String>,
    },
}

/// A VirtualService (its HTTP routes; TCP and TLS routes are refused).
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    /// Where from.
    pub meta: Meta,
    /// Hosts, resolved.
    pub hosts: Vec<String>,
    /// HTTP routes in order.
    pub http: Vec<HttpRoute>,
}

/// An HTTP route.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    /// Its path in the document (`spec.http[1]`).
    pub at: String,
    /// Name.
    pub name: Option<String>,
    /// Matches, any of which selects the route (none: every request).
    pub matches: Vec<Match>,
    /// What it does.
    pub action: Action,
    /// Path and authority rewrites.
    pub rewrite: Rewrite,
    /// Timeout (none: no timeout, as in Istio).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: Option<Retries>,
    /// Mirrors with their percentage.
    pub mirrors: Vec<(Dest, f64)>,
    /// Header edits.
    pub headers: Headers,
}

/// A match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Match {
    /// uri.
    pub uri: Option<StrMatch>,
    /// ignoreUriCase.
    pub ignore_uri_case: bool,
    /// Header conditions: name, value (none: present), inverted (withoutHeaders).
    pub headers: Vec<(String, Option<StrMatch>, bool)>,
    /// Query parameter conditions.
    pub query: Vec<(String, Option<StrMatch>)>,
    /// Only for this service port.
    pub port: Option<u16>,
}

/// Istio's StringMatch.
#[derive(Debug, Clone, PartialEq)]
pub enum StrMatch {
    /// exact.
    Exact(String),
    /// prefix.
    Prefix(String),
    /// regex (RE2).
    Regex(String),
}

/// What a route does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Forward to destinations with weights.
    Route(Vec<(Dest, u32)>),
    /// Redirect.
    Redirect {
        /// New path.
        uri: Option<String>,
        /// New prefix in place of the matched one.
        prefix: Option<String>,
        /// New authority.
        authority: Option<String>,
        /// New port.
        port: Option<u16>,
        /// New scheme.
        scheme: Option<String>,
        /// 301, 302, 303, 307 or 308.
        code: u32,
    },
    /// A response from the sidecar itself.
    Direct {
        /// Status.
        status: u32,
        /// Body.
        body: Option<String>,
    },
}

/// A destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Dest {
    /// Its path in the document.
    pub at: String,
    /// Host, resolved.
    pub host: String,
    /// Subset.
    pub subset: Option<String>,
    /// Port.
    pub port: Option<u16>,
}

/// Path and authority rewrites.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rewrite {
    /// rewrite.uri (the matched prefix, or the whole path, is replaced).
    pub uri: Option<String>,
    /// rewrite.authority.
    pub authority: Option<String>,
    /// rewrite.uriRegexRewrite: pattern and substitution.
    pub regex: Option<(String, String)>,
}

/// Retries.
#[derive(Debug, Clone, PartialEq)]
pub struct Retries {
    /// attempts.
    pub attempts: u32,
    /// perTryTimeout.
    pub per_try_timeout: Option<Duration>,
    /// retryOn conditions (Envoy names; status codes apart).
    pub retry_on: Vec<String>,
    /// Retriable status codes from retryOn.
    pub codes: Vec<u32>,
    /// retryIgnorePreviousHosts (Istio's default: true).
    pub ignore_previous_hosts: bool,
    /// backoff.
    pub backoff: Option<Duration>,
}

/// Header edits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headers {
    /// Request: set (overwrite), add (append), remove.
    pub request: HeaderOps,
    /// Response: the same.
    pub response: HeaderOps,
}

/// One direction's header edits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    /// Replace or add.
    pub set: BTreeMap<String, String>,
    /// Append.
    pub add: BTreeMap<String, String>,
    /// Remove.
    pub remove: Vec<String>,
}

/// An AuthorizationPolicy, compiled to Envoy RBAC policies when read.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    /// Where from.
    pub meta: Meta,
    /// Workload labels it selects (empty: every workload of the namespace).
    pub selector: BTreeMap<String, String>,
    /// DENY (true) or ALLOW (false).
    pub deny: bool,
    /// Envoy policies by name, one per rule.
    pub policies: Vec<(String, Policy)>,
}

const METADATA: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "finalizers",
    "ownerReferences",
    "generateName",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

const NETWORKING: &[&str] = &[
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];
const SECURITY: &[&str] = &["security.istio.io/v1beta1", "security.istio.io/v1"];

/// Reads one file's documents; every problem is listed, none is fatal to the others.
pub fn parse(text: &str, file: &str) -> Result<Vec<Resource>, Vec<crate::Problem>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, (line, doc)) in super::read::documents(text).into_iter().enumerate() {
        let n = i + 1;
        let mut cx = Cx::new(file, format!("document {n} (line {line})"));
        let json = match tessera_xds::load::yaml_to_json(&doc) {
            Ok(j) => j,
            Err(e) => {
                cx.add("", format!("not YAML: {e}"));
                problems.extend(cx.problems);
                continue;
            }
        };
        if let Some(r) = document(&mut cx, &json, file, n) {
            out.push(r);
        }
        problems.extend(cx.problems);
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

fn document(cx: &mut Cx, v: &Value, file: &str, n: usize) -> Option<Resource> {
    let top = obj(cx, v, "", &["apiVersion", "kind", "metadata", "spec", "status"])?;
    let kind = string(cx, top, "", "kind").unwrap_or_default();
    let api = string(cx, top, "", "apiVersion").unwrap_or_default();
    let md = sub(cx, top, "", "metadata", METADATA);
    let name = md.and_then(|m| string(cx, m, "metadata", "name")).unwrap_or_default();
    let namespace = md
        .and_then(|m| string(cx, m, "metadata", "namespace"))
        .unwrap_or_else(|| "default".to_string());
    if let Some(m) = md {
        string_map(cx, m, "metadata", "labels");
        string_map(cx, m, "metadata", "annotations");
    }
    cx.doc = format!("document {n} ({kind} {namespace}/{name})");
    if name.is_empty() {
        cx.add("metadata.name", "required");
    }
    let meta = Meta {
        kind: kind.clone(),
        name,
        namespace,
        file: file.to_string(),
        doc: cx.doc.clone(),
    };
    let group = match kind.as_str() {
        "VirtualService" | "DestinationRule" | "ServiceEntry" | "Sidecar" | "Gateway" | "WorkloadEntry"
        | "WorkloadGroup" | "EnvoyFilter" | "ProxyConfig" => NETWORKING,
        "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication" => SECURITY,
        "" => {
            cx.add("kind", "required");
            return None;
        }
        other => {
            cx.add(
                "kind",
                format!("`{other}` is not an Istio kind Pilot reads (VirtualService, DestinationRule, ServiceEntry, AuthorizationPolicy, PeerAuthentication, Sidecar)"),
            );
            return None;
        }
    };
    if !group.contains(&api.as_str()) {
        cx.add(
            "apiVersion",
            format!("`{api}` is not one of {} for {kind}", group.join(", ")),
        );
    }
    let Some(spec) = top.get("spec") else {
        cx.add("spec", "required");
        return None;
    };
    match kind.as_str() {
        "ServiceEntry" => service_entry(cx, spec, meta).map(|r| Resource::ServiceEntry(Box::new(r))),
        "DestinationRule" => destination_rule(cx, spec, meta).map(|r| Resource::DestinationRule(Box::new(r))),
        "VirtualService" => virtual_service(cx, spec, meta).map(|r| Resource::VirtualService(Box::new(r))),
        "AuthorizationPolicy" => {
            super::rbac::authorization_policy(cx, spec, meta).map(|r| Resource::AuthorizationPolicy(Box::new(r)))
        }
        "PeerAuthentication" => peer_authentication(cx, spec).then_some(Resource::Checked(meta)),
        "Sidecar" => sidecar(cx, spec).then_some(Resource::Checked(meta)),
        "Gateway" => {
            cx.add(
                "kind",
                "Gateway configures ingress and egress gateways; Pilot configures sidecars only",
            );
            None
        }
        other => {
            cx.add("kind", format!("{other} is not supported by Pilot yet"));
            None
        }
    }
}

/// exportTo: Pilot gives every sidecar everything, so only mesh-wide visibility can be honoured.
fn export_to(cx: &mut Cx, o: O<'_>) {
    for (i, e) in strings(cx, o, "spec", "exportTo").iter().enumerate() {
        if e != "*" {
            cx.add(
                &format!("spec.exportTo[{i}]"),
                format!("`{e}`: every sidecar gets every resource (no per-namespace visibility yet); only `*` can be honoured"),
            );
        }
    }
}

const NO_SCOPING: &str =
    "every sidecar gets the same configuration (no per-workload scoping yet), so this cannot be honoured";

fn selector_refused(cx: &mut Cx, o: O<'_>, k: &str) {
    o.refuse(cx, "spec", k, NO_SCOPING);
}

fn protocol(cx: &mut Cx, s: &str, at: &str) -> Option<Protocol> {
    Some(match s.to_ascii_uppercase().as_str() {
        "HTTP" => Protocol::Http,
        "HTTP2" => Protocol::Http2,
        "GRPC" | "GRPC-WEB" => Protocol::Grpc,
        // Opaque to the sidecar: clusters and endpoints, no listener yet.
        "TCP" | "TLS" | "HTTPS" | "MONGO" | "MYSQL" | "REDIS" => Protocol::Tcp,
        _ => {
            cx.add(
                at,
                format!("`{s}` is not a protocol Pilot knows (HTTP, HTTP2, GRPC, GRPC-WEB, HTTPS, TLS, TCP, MONGO, MYSQL, REDIS)"),
            );
            return None;
        }
    })
}

fn service_entry(cx: &mut Cx, v: &Value, meta: Meta) -> Option<ServiceEntry> {
    let at = "spec";
    let o = obj(
        cx,
        v,
        at,
        &[
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
            "subjectAltNames",
        ],
    )?;
    let hosts = strings(cx, o, at, "hosts");
    if hosts.is_empty() {
        cx.add("spec.hosts", "at least one host is required");
    }
    for (i, h) in hosts.iter().enumerate() {
        let wildcard_ok = !h.contains('*') || h.strip_prefix("*.").is_some_and(|rest| !rest.contains('*'));
        if !wildcard_ok {
            cx.add(
                &format!("spec.hosts[{i}]"),
                format!("`{h}`: a wildcard is only allowed as the first label (`*.example.com`)"),
            );
        }
    }
    o.refuse(
        cx,
        at,
        "addresses",
        "virtual IPs need traffic captured by destination address; Pilot's sidecars take outbound traffic on an explicit HTTP listener and route by Host",
    );
    selector_refused(cx, o, "workloadSelector");
    o.refuse(
        cx,
        at,
        "subjectAltNames",
        "Pilot does not provide mesh mutual TLS yet, so there is no peer identity to verify",
    );
    export_to(cx, o);
    one_of(cx, o, at, "location", &["MESH_EXTERNAL", "MESH_INTERNAL"]);
    let mut ports = Vec::new();
    for (here, p) in list(cx, o, at, "ports") {
        let Some(po) = obj(cx, p, &here, &["number", "protocol", "name", "targetPort"]) else {
            continue;
        };
        let number = port(cx, po, &here, "number");
        if !po.has("number") {
            cx.add(&join(&here, "number"), "required");
        }
        let name = string(cx, po, &here, "name").unwrap_or_default();
        if name.is_empty() {
            cx.add(&join(&here, "name"), "required");
        }
        let proto = string(cx, po, &here, "protocol").unwrap_or_else(|| "TCP".into());
        let protocol = protocol(cx, &proto, &join(&here, "protocol"));
        let target_port = port(cx, po, &here, "targetPort");
        if let (Some(number), Some(protocol)) = (number, protocol) {
            if ports.iter().any(|p: &SePort| p.name == name || p.number == number) {
                cx.add(&here, "port names and numbers must be unique");
            }
            ports.push(SePort {
                number,
                name,
                protocol,
                target_port,
            });
        }
    }
    if ports.is_empty() && !o.has("ports") {
        cx.add("spec.ports", "at least one port is required");
    }
    let resolution =
        one_of(cx, o, at, "resolution", &["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]).unwrap_or_else(|| "NONE".into());
    let dns = match resolution.as_str() {
        "STATIC" => false,
        "DNS" | "DNS_ROUND_ROBIN" => true,
        _ => {
            cx.add(
                "spec.resolution",
                "NONE passes traffic on to the address the client dialled, which needs transparent capture; Pilot's sidecars take outbound HTTP on an explicit listener. Use STATIC with endpoints, or DNS",
            );
            false
        }
    };
    let mut endpoints = Vec::new();
    for (here, e) in list(cx, o, at, "endpoints") {
        let Some(eo) = obj(
            cx,
            e,
            &here,
            &[
                "address",
                "ports",
                "labels",
                "network",
                "locality",
                "weight",
                "serviceAccount",
            ],
        ) else {
            continue;
        };
        eo.refuse(cx, &here, "network", "multi-network meshes are not supported");
        eo.refuse(
            cx,
            &here,
            "serviceAccount",
            "Pilot does not provide mesh mutual TLS yet, so there is no workload identity to give",
        );
        let Some(address) = string(cx, eo, &here, "address") else {
            cx.add(&join(&here, "address"), "required");
            continue;
        };
        if address.starts_with("unix://") {
            cx.add(
                &join(&here, "address"),
                "Unix domain socket endpoints are not supported by the sidecar",
            );
            continue;
        }
        if !dns && address.parse::<std::net::IpAddr>().is_err() {
            cx.add(
                &join(&here, "address"),
                format!("`{address}`: STATIC endpoints are IP addresses; use resolution DNS for names"),
            );
            continue;
        }
        let mut eports = BTreeMap::new();
        if let Some(pm) = eo.get("ports") {
            match pm.as_object() {
                Some(m) => {
                    for (k, n) in m {
                        match n.as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) {
                            Some(n) => {
                                if !ports.iter().any(|p: &SePort| &p.name == k) {
                                    cx.add(
                                        &format!("{here}.ports.{k}"),
                                        format!("no port named `{k}` in spec.ports"),
                                    );
                                }
                                eports.insert(k.clone(), n);
                            }
                            None => cx.add(&format!("{here}.ports.{k}"), "expected a port from 1 to 65535"),
                        }
                    }
                }
                None => cx.add(&join(&here, "ports"), "expected a mapping of port name to number"),
            }
        }
        let labels = string_map(cx, eo, &here, "labels");
        let weight = match eo.get("weight") {
            None => 1,
            Some(_) => u32_(cx, eo, &here, "weight").filter(|w| *w > 0).unwrap_or(1),
        };
        let locality = string(cx, eo, &here, "locality").map(|l| {
            let mut parts = l.splitn(3, '/').map(str::to_string);
            (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            )
        });
        endpoints.push(SeEndpoint {
            address,
            ports: eports,
            labels,
            weight,
            locality,
        });
    }
    if !dns && endpoints.is_empty() && !o.has("endpoints") && resolution == "STATIC" {
        cx.add("spec.endpoints", "STATIC resolution needs endpoints");
    }
    if dns && endpoints.is_empty() {
        for (i, h) in hosts.iter().enumerate() {
            if h.contains('*') {
                cx.add(
                    &format!("spec.hosts[{i}]"),
                    format!("`{h}`: DNS resolution of a wildcard host needs endpoints"),
                );
            }
        }
        endpoints = hosts
            .iter()
            .map(|h| SeEndpoint {
                address: h.clone(),
                ports: BTreeMap::new(),
                labels: BTreeMap::new(),
                weight: 1,
                locality: None,
            })
            .collect();
    }
    Some(ServiceEntry {
        meta,
        hosts,
        ports,
        dns,
        endpoints,
    })
}

fn destination_rule(cx: &mut Cx, v: &Value, meta: Meta) -> Option<DestinationRule> {
    let at = "spec";
    let o = obj(
        cx,
        v,
        at,
        &["host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"],
    )?;
    let host = string(cx, o, at, "host").unwrap_or_default();
    if host.is_empty() {
        cx.add("spec.host", "required");
    }
    export_to(cx, o);
    selector_refused(cx, o, "workloadSelector");
    let policy = o
        .get("trafficPolicy")
        .and_then(|p| traffic_policy(cx, p, "spec.trafficPolicy", true));
    let mut subsets = Vec::new();
    for (here, s) in list(cx, o, at, "subsets") {
        let Some(so) = obj(cx, s, &here, &["name", "labels", "trafficPolicy"]) else {
            continue;
        };
        let name = string(cx, so, &here, "name").unwrap_or_default();
        if name.is_empty() {
            cx.add(&join(&here, "name"), "required");
        }
        if subsets.iter().any(|s: &Subset| s.name == name) {
            cx.add(&join(&here, "name"), format!("subset `{name}` is defined twice"));
        }
        let labels = string_map(cx, so, &here, "labels");
        let policy = so
            .get("trafficPolicy")
            .and_then(|p| traffic_policy(cx, p, &join(&here, "trafficPolicy"), true));
        subsets.push(Subset { name, labels, policy });
    }
    let host = fqdn(&host, &meta.namespace);
    Some(DestinationRule {
        meta,
        host,
        policy,
        subsets,
    })
}

fn traffic_policy(cx: &mut Cx, v: &Value, at: &str, top: bool) -> Option<TrafficPolicy> {
    let known: &[&str] = if top {
        &[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "tls",
            "portLevelSettings",
            "tunnel",
            "proxyProtocol",
            "retryBudget",
        ]
    } else {
        &["port", "loadBalancer", "connectionPool", "outlierDetection", "tls"]
    };
    let o = obj(cx, v, at, known)?;
    o.refuse(
        cx,
        at,
        "tunnel",
        "tunnelling (HTTP CONNECT) to the destination is not supported by the sidecar",
    );
    o.refuse(
        cx,
        at,
        "proxyProtocol",
        "sending the PROXY protocol upstream is not supported by the sidecar",
    );
    o.refuse(
        cx,
        at,
        "retryBudget",
        "a retry budget per destination is not supported yet; use connectionPool.http.maxRetries",
    );
    let mut p = TrafficPolicy {
        lb: sub(
            cx,
            o,
            at,
            "loadBalancer",
            &[
                "simple",
                "consistentHash",
                "localityLbSetting",
                "warmupDurationSecs",
                "warmup",
            ],
        )
        .and_then(|lo| load_balancer(cx, lo, &join(at, "loadBalancer"))),
        pool: sub(cx, o, at, "connectionPool", &["tcp", "http"]).map(|po| pool(cx, po, &join(at, "connectionPool"))),
        outlier: sub(
            cx,
            o,
            at,
            "outlierDetection",
            &[
                "splitExternalLocalOriginErrors",
                "consecutiveLocalOriginFailures",
                "consecutiveGatewayErrors",
                "consecutive5xxErrors",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
                "minHealthPercent",
                "consecutiveErrors",
            ],
        )
        .map(|oo| outlier(cx, oo, &join(at, "outlierDetection"))),
        tls: sub(
            cx,
            o,
            at,
            "tls",
            &[
                "mode",
                "clientCertificate",
                "privateKey",
                "caCertificates",
                "credentialName",
                "subjectAltNames",
                "sni",
                "insecureSkipVerify",
                "caCrl",
            ],
        )
        .and_then(|to| tls(cx, to, &join(at, "tls"))),
        ports: Vec::new(),
    };
    for (here, pl) in list(cx, o, at, "portLevelSettings") {
        let Some(pp) = traffic_policy(cx, pl, &here, false) else {
            continue;
        };
        let n = pl
            .get("port")
            .and_then(|x| obj(cx, x, &join(&here, "port"), &["number"]))
            .and_then(|x| port(cx, x, &join(&here, "port"), "number"));
        match n {
            Some(n) => p.ports.push((n, pp)),
            None => cx.add(&join(&here, "port.number"), "required"),
        }
    }
    Some(p)
}

fn load_balancer(cx: &mut Cx, o: O<'_>, at: &str) -> Option<Lb> {
    o.refuse(
        cx,
        at,
        "localityLbSetting",
        "locality failover and distribution settings are not supported yet",
    );
    o.refuse(
        cx,
        at,
        "warmupDurationSecs",
        "slow start (warm-up) is not supported by the sidecar",
    );
    o.refuse(cx, at, "warmup", "slow start (warm-up) is not supported by the sidecar");
    if o.has("simple") && o.has("consistentHash") {
        cx.add(at, "give simple or consistentHash, not both");
    }
    if let Some(s) = one_of(
        cx,
        o,
        at,
        "simple",
        &[
            "UNSPECIFIED",
            "LEAST_CONN",
            "RANDOM",
            "PASSTHROUGH",
            "ROUND_ROBIN",
            "LEAST_REQUEST",
        ],
    ) {
        return match s.as_str() {
            "ROUND_ROBIN" => Some(Lb::RoundRobin),
            "LEAST_CONN" | "LEAST_REQUEST" => Some(Lb::LeastRequest),
            "RANDOM" => Some(Lb::Random),
            "PASSTHROUGH" => {
                cx.add(
                    &join(at, "simple"),
                    "PASSTHROUGH sends to the address the client dialled, which needs transparent capture; not supported",
                );
                None
            }
            _ => None,
        };
    }
    let here = join(at, "consistentHash");
    let h = sub(
        cx,
        o,
        at,
        "consistentHash",
        &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "maglev",
            "minimumRingSize",
        ],
    )?;
    let mut keys = Vec::new();
    if let Some(n) = string(cx, h, &here, "httpHeaderName") {
        keys.push(HashKey::Header(n));
    }
    if let Some(c) = sub(cx, h, &here, "httpCookie", &["name", "path", "ttl", "attributes"]) {
        let cat = join(&here, "httpCookie");
        let why = "the sidecar does not generate the cookie (Envoy does when ttl is set); leave out ttl, path and attributes to hash on a cookie clients already send";
        c.refuse(cx, &cat, "ttl", why);
        c.refuse(cx, &cat, "path", why);
        c.refuse(cx, &cat, "attributes", why);
        match string(cx, c, &cat, "name") {
            Some(n) if !n.is_empty() => keys.push(HashKey::Cookie(n)),
            _ => cx.add(&join(&cat, "name"), "required"),
        }
    }
    if boolean(cx, h, &here, "useSourceIp") == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(n) = string(cx, h, &here, "httpQueryParameterName") {
        keys.push(HashKey::Query(n));
    }
    if keys.len() != 1 {
        cx.add(
            &here,
            "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is required",
        );
        return None;
    }
    let mut maglev = false;
    let mut size = int(cx, h, &here, "minimumRingSize", 1, 8 * 1024 * 1024);
    if let Some(r) = sub(cx, h, &here, "ringHash", &["minimumRingSize"]) {
        size = int(cx, r, &join(&here, "ringHash"), "minimumRingSize", 1, 8 * 1024 * 1024).or(size);
    }
    if let Some(m) = sub(cx, h, &here, "maglev", &["tableSize"]) {
        maglev = true;
        size = int(cx, m, &join(&here, "maglev"), "tableSize", 1, 5_000_011);
    }
    keys.pop().map(|key| Lb::Hash { key, maglev, size })
}

fn pool(cx: &mut Cx, o: O<'_>, at: &str) -> Pool {
    let mut p = Pool::default();
    let tat = join(at, "tcp");
    if let Some(t) = sub(
        cx,
        o,
        at,
        "tcp",
        &[
            "maxConnections",
            "connectTimeout",
            "tcpKeepalive",
            "maxConnectionDuration",
            "idleTimeout",
        ],
    ) {
        p.max_connections = u32_(cx, t, &tat, "maxConnections");
        p.connect_timeout = duration(cx, t, &tat, "connectTimeout");
        if p.connect_timeout.is_some_and(|d| d.is_zero()) {
            cx.add(&join(&tat, "connectTimeout"), "must be above zero");
        }
        t.refuse(
            cx,
            &tat,
            "tcpKeepalive",
            "upstream TCP keepalive settings are not supported by the sidecar",
        );
        t.refuse(
            cx,
            &tat,
            "maxConnectionDuration",
            "a maximum upstream connection age is not supported by the sidecar",
        );
        t.refuse(
            cx,
            &tat,
            "idleTimeout",
            "the sidecar's upstream idle timeout is fixed (1h)",
        );
    }
    let hat = join(at, "http");
    if let Some(h) = sub(
        cx,
        o,
        at,
        "http",
        &[
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ],
    ) {
        p.max_pending = u32_(cx, h, &hat, "http1MaxPendingRequests");
        p.max_requests = u32_(cx, h, &hat, "http2MaxRequests");
        p.max_retries = u32_(cx, h, &hat, "maxRetries");
        p.use_client_protocol = boolean(cx, h, &hat, "useClientProtocol").unwrap_or(false);
        h.refuse(
            cx,
            &hat,
            "maxRequestsPerConnection",
            "the sidecar does not limit requests per upstream connection yet",
        );
        h.refuse(
            cx,
            &hat,
            "idleTimeout",
            "the sidecar's upstream idle timeout is fixed (1h)",
        );
        h.refuse(
            cx,
            &hat,
            "maxConcurrentStreams",
            "the sidecar's upstream HTTP/2 stream limit is fixed (100)",
        );
        if let Some(u) = one_of(
            cx,
            h,
            &hat,
            "h2UpgradePolicy",
            &["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"],
        ) && u == "UPGRADE"
        {
            cx.add(
                &join(&hat, "h2UpgradePolicy"),
                "upgrading HTTP/1.1 to HTTP/2 upstream is not supported; declare the port http2 or grpc",
            );
        }
    }
    p
}

fn outlier(cx: &mut Cx, o: O<'_>, at: &str) -> Outlier {
    o.refuse(
        cx,
        at,
        "consecutiveErrors",
        "deprecated in Istio; use consecutive5xxErrors or consecutiveGatewayErrors",
    );
    let r = Outlier {
        consecutive_5xx: u32_(cx, o, at, "consecutive5xxErrors"),
        consecutive_gateway: u32_(cx, o, at, "consecutiveGatewayErrors"),
        consecutive_local_origin: u32_(cx, o, at, "consecutiveLocalOriginFailures"),
        split: boolean(cx, o, at, "splitExternalLocalOriginErrors").unwrap_or(false),
        interval: duration(cx, o, at, "interval"),
        base_ejection_time: duration(cx, o, at, "baseEjectionTime"),
        max_ejection_percent: int(cx, o, at, "maxEjectionPercent", 0, 100).map(|n| n as u32),
        min_health_percent: int(cx, o, at, "minHealthPercent", 0, 100).map(|n| n as u32),
    };
    for (k, d) in [("interval", r.interval), ("baseEjectionTime", r.base_ejection_time)] {
        if d.is_some_and(|d| d < Duration::from_millis(1)) {
            cx.add(&join(at, k), "must be at least 1ms");
        }
    }
    r
}

fn tls(cx: &mut Cx, o: O<'_>, at: &str) -> Option<Tls> {
    let mode =
        one_of(cx, o, at, "mode", &["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]).unwrap_or_else(|| "DISABLE".into());
    o.refuse(
        cx,
        at,
        "credentialName",
        "certificates from Kubernetes secrets are not available to Pilot; give clientCertificate, privateKey and caCertificates files",
    );
    o.refuse(
        cx,
        at,
        "caCrl",
        "certificate revocation lists are not supported by the sidecar",
    );
    match mode.as_str() {
        "DISABLE" => Some(Tls::Disable),
        "ISTIO_MUTUAL" => {
            cx.add(
                &join(at, "mode"),
                "ISTIO_MUTUAL needs workload certificates from the mesh CA, which Pilot does not issue yet; sending plaintext instead would silently drop the encryption asked for. Use DISABLE, or SIMPLE / MUTUAL with certificate files",
            );
            None
        }
        _ => {
            let ca = string(cx, o, at, "caCertificates");
            let skip = boolean(cx, o, at, "insecureSkipVerify").unwrap_or(false);
            if ca.is_none() && !skip {
                cx.add(
                    &join(at, "caCertificates"),
                    "required: Istio verifies against the system trust store when it is empty, and Pilot cannot know where the sidecar's is; give a CA file (e.g. /etc/ssl/certs/ca-certificates.crt) or insecureSkipVerify: true",
                );
            }
            let client = if mode == "MUTUAL" {
                match (string(cx, o, at, "clientCertificate"), string(cx, o, at, "privateKey")) {
                    (Some(c), Some(k)) => Some((c, k)),
                    _ => {
                        cx.add(at, "MUTUAL needs clientCertificate and privateKey");
                        None
                    }
                }
            } else {
                for k in ["clientCertificate", "privateKey"] {
                    o.refuse(cx, at, k, "only used with mode MUTUAL");
                }
                None
            };
            Some(Tls::Originate {
                ca: if skip { None } else { ca },
                client,
                sni: string(cx, o, at, "sni"),
                sans: strings(cx, o, at, "subjectAltNames"),
            })
        }
    }
}

fn str_match(cx: &mut Cx, v: &Value, at: &str) -> Option<Option<StrMatch>> {
    let o = obj(cx, v, at, &["exact", "prefix", "regex"])?;
    let mut found = Vec::new();
    if let Some(s) = string(cx, o, at, "exact") {
        found.push(StrMatch::Exact(s));
    }
    if let Some(s) = string(cx, o, at, "prefix") {
        found.push(StrMatch::Prefix(s));
    }
    if let Some(s) = string(cx, o, at, "regex") {
        found.push(StrMatch::Regex(s));
    }
    if found.len() > 1 {
        cx.add(at, "give one of exact, prefix, regex");
        return None;
    }
    Some(found.pop())
}

fn destination(cx: &mut Cx, v: &Value, at: &str, ns: &str) -> Option<Dest> {
    let o = obj(cx, v, at, &["host", "subset", "port"])?;
    let host = string(cx, o, at, "host").unwrap_or_default();
    if host.is_empty() {
        cx.add(&join(at, "host"), "required");
        return None;
    }
    let port = sub(cx, o, at, "port", &["number"]).and_then(|p| port(cx, p, &join(at, "port"), "number"));
    Some(Dest {
        at: at.to_string(),
        host: fqdn(&host, ns),
        subset: string(cx, o, at, "subset").filter(|s| !s.is_empty()),
        port,
    })
}

fn virtual_service(cx: &mut Cx, v: &Value, meta: Meta) -> Option<VirtualService> {
    let at = "spec";
    let o = obj(cx, v, at, &["hosts", "gateways", "http", "tls", "tcp", "exportTo"])?;
    let ns = meta.namespace.clone();
    let hosts: Vec<String> = strings(cx, o, at, "hosts").iter().map(|h| fqdn(h, &ns)).collect();
    for (i, g) in strings(cx, o, at, "gateways").iter().enumerate() {
        if g != "mesh" {
            cx.add(
                &format!("spec.gateways[{i}]"),
                format!("`{g}`: Pilot configures sidecars only (the `mesh` gateway); routes bound to gateways are not supported"),
            );
        }
    }
    export_to(cx, o);
    o.refuse(
        cx,
        at,
        "tcp",
        "TCP routes need TCP listeners, which Pilot does not generate yet (TCP ports get clusters and endpoints only)",
    );
    o.refuse(
        cx,
        at,
        "tls",
        "TLS (SNI) routes need TLS passthrough listeners, which Pilot does not generate yet",
    );
    let mut http = Vec::new();
    for (here, r) in list(cx, o, at, "http") {
        if let Some(r) = http_route(cx, r, &here, &ns) {
            http.push(r);
        }
    }
    Some(VirtualService { meta, hosts, http })
}

fn header_ops(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> HeaderOps {
    let Some(h) = sub(cx, o, at, k, &["set", "add", "remove"]) else {
        return HeaderOps::default();
    };
    let here = join(at, k);
    HeaderOps {
        set: string_map(cx, h, &here, "set"),
        add: string_map(cx, h, &here, "add"),
        remove: strings(cx, h, &here, "remove"),
    }
}

fn http_route(cx: &mut Cx, v: &Value, at: &str, ns: &str) -> Option<HttpRoute> {
    let o = obj(
        cx,
        v,
        at,
        &[
            "name",
            "match",
            "route",
            "redirect",
            "directResponse",
            "delegate",
            "rewrite",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "mirrorPercent",
            "corsPolicy",
            "headers",
        ],
    )?;
    o.refuse(cx, at, "delegate", "VirtualService delegation is not supported yet");
    o.refuse(
        cx,
        at,
        "fault",
        "the sidecar applies the fault filter to a whole listener, not per route (per-route fault config is not supported yet)",
    );
    o.refuse(
        cx,
        at,
        "corsPolicy",
        "the sidecar does not support CORS yet (its route converter refuses CORS policies)",
    );
    o.refuse(cx, at, "mirrorPercent", "deprecated in Istio; use mirrorPercentage");
    let mut matches = Vec::new();
    for (here, m) in list(cx, o, at, "match") {
        if let Some(m) = http_match(cx, m, &here) {
            matches.push(m);
        }
    }
    let mut kinds = 0;
    let mut action = None;
    let rat = join(at, "route");
    if o.has("route") {
        kinds += 1;
        let mut dests = Vec::new();
        let items = list(cx, o, at, "route");
        let n = items.len();
        for (here, d) in items {
            let Some(d) = obj(cx, d, &here, &["destination", "weight", "headers"]) else {
                continue;
            };
            d.refuse(
                cx,
                &here,
                "headers",
                "header edits per destination are not supported by the sidecar; set them on the route (`headers`)",
            );
            let Some(dest) = d
                .get("destination")
                .and_then(|x| destination(cx, x, &join(&here, "destination"), ns))
            else {
                if !d.has("destination") {
                    cx.add(&join(&here, "destination"), "required");
                }
                continue;
            };
            let weight = match d.get("weight") {
                Some(_) => u32_(cx, d, &here, "weight").unwrap_or(0),
                None if n == 1 => 100,
                None => 0,
            };
            dests.push((dest, weight));
        }
        if !dests.is_empty() && dests.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
            cx.add(&rat, "the weights add up to 0: give each destination its weight");
        }
        if n == 0 {
            cx.add(&rat, "at least one destination is required");
        }
        action = Some(Action::Route(dests));
    }
    if let Some(r) = sub(
        cx,
        o,
        at,
        "redirect",
        &[
            "uri",
            "authority",
            "port",
            "derivePort",
            "scheme",
            "redirectCode",
            "prefixRewrite",
        ],
    ) {
        kinds += 1;
        let here = join(at, "redirect");
        r.refuse(
            cx,
            &here,
            "derivePort",
            "deriving the redirect port from the request is not supported; give port",
        );
        let code = match r.get("redirectCode") {
            None => 301,
            Some(_) => {
                let c = u32_(cx, r, &here, "redirectCode").unwrap_or(301);
                if ![301, 302, 303, 307, 308].contains(&c) {
                    cx.add(
                        &join(&here, "redirectCode"),
                        format!("{c}: use 301, 302, 303, 307 or 308"),
                    );
                }
                c
            }
        };
        if r.has("uri") && r.has("prefixRewrite") {
            cx.add(&here, "give uri or prefixRewrite, not both");
        }
        action = Some(Action::Redirect {
            uri: string(cx, r, &here, "uri"),
            prefix: string(cx, r, &here, "prefixRewrite"),
            authority: string(cx, r, &here, "authority"),
            port: port(cx, r, &here, "port"),
            scheme: string(cx, r, &here, "scheme"),
            code,
        });
    }
    if let Some(d) = sub(cx, o, at, "directResponse", &["status", "body"]) {
        kinds += 1;
        let here = join(at, "directResponse");
        let status = int(cx, d, &here, "status", 200, 599).unwrap_or(200) as u32;
        if !d.has("status") {
            cx.add(&join(&here, "status"), "required");
        }
        let body = sub(cx, d, &here, "body", &["string", "bytes"]).and_then(|b| {
            b.refuse(cx, &join(&here, "body"), "bytes", "give the body as `string`");
            string(cx, b, &join(&here, "body"), "string")
        });
        action = Some(Action::Direct { status, body });
    }
    if kinds != 1 {
        cx.add(at, "exactly one of route, redirect, directResponse is required");
        return None;
    }
    if o.has("redirect") || o.has("directResponse") {
        for k in ["rewrite", "retries", "timeout", "mirror", "mirrors"] {
            o.refuse(cx, at, k, "only with `route`");
        }
    }
    let mut rewrite = Rewrite::default();
    if let Some(r) = sub(cx, o, at, "rewrite", &["uri", "authority", "uriRegexRewrite"]) {
        let here = join(at, "rewrite");
        rewrite.uri = string(cx, r, &here, "uri");
        rewrite.authority = string(cx, r, &here, "authority");
        if let Some(rr) = sub(cx, r, &here, "uriRegexRewrite", &["match", "rewrite"]) {
            let rat = join(&here, "uriRegexRewrite");
            match (string(cx, rr, &rat, "match"), string(cx, rr, &rat, "rewrite")) {
                (Some(m), Some(s)) => rewrite.regex = Some((m, s)),
                _ => cx.add(&rat, "match and rewrite are required"),
            }
        }
        if rewrite.uri.is_some() && rewrite.regex.is_some() {
            cx.add(&here, "give uri or uriRegexRewrite, not both");
        }
    }
    let timeout = duration(cx, o, at, "timeout");
    let retries = sub(
        cx,
        o,
        at,
        "retries",
        &[
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ],
    )
    .map(|r| {
        let here = join(at, "retries");
        r.refuse(
            cx,
            &here,
            "retryRemoteLocalities",
            "retrying in other localities is not supported by the sidecar",
        );
        let mut retry_on = Vec::new();
        let mut codes = Vec::new();
        for c in string(cx, r, &here, "retryOn").unwrap_or_default().split(',') {
            let c = c.trim();
            if c.is_empty() {
                continue;
            }
            match c.parse::<u32>() {
                Ok(code) if (100..=599).contains(&code) => codes.push(code),
                Ok(_) => cx.add(&join(&here, "retryOn"), format!("`{c}` is not an HTTP status")),
                Err(_) => retry_on.push(c.to_string()),
            }
        }
        if !codes.is_empty() && !retry_on.iter().any(|c| c == "retriable-status-codes") {
            retry_on.push("retriable-status-codes".into());
        }
        Retries {
            attempts: u32_(cx, r, &here, "attempts").unwrap_or(0),
            per_try_timeout: duration(cx, r, &here, "perTryTimeout"),
            retry_on,
            codes,
            ignore_previous_hosts: boolean(cx, r, &here, "retryIgnorePreviousHosts").unwrap_or(true),
            backoff: duration(cx, r, &here, "backoff"),
        }
    });
    let mut mirrors = Vec::new();
    if let Some(m) = o
        .get("mirror")
        .and_then(|m| destination(cx, m, &join(at, "mirror"), ns))
    {
        let pct = percent(cx, o, at, "mirrorPercentage").unwrap_or(100.0);
        mirrors.push((m, pct));
    } else if o.has("mirrorPercentage") {
        cx.add(&join(at, "mirrorPercentage"), "only with `mirror`");
    }
    for (here, m) in list(cx, o, at, "mirrors") {
        let Some(mo) = obj(cx, m, &here, &["destination", "percentage"]) else {
            continue;
        };
        let Some(d) = mo
            .get("destination")
            .and_then(|d| destination(cx, d, &join(&here, "destination"), ns))
        else {
            cx.add(&join(&here, "destination"), "required");
            continue;
        };
        let pct = percent(cx, mo, &here, "percentage").unwrap_or(100.0);
        mirrors.push((d, pct));
    }
    if o.has("mirror") && o.has("mirrors") {
        cx.add(at, "give mirror or mirrors, not both");
    }
    let headers = sub(cx, o, at, "headers", &["request", "response"])
        .map(|h| {
            let here = join(at, "headers");
            Headers {
                request: header_ops(cx, h, &here, "request"),
                response: header_ops(cx, h, &here, "response"),
            }
        })
        .unwrap_or_default();
    Some(HttpRoute {
        at: at.to_string(),
        name: string(cx, o, at, "name"),
        matches,
        action: action?,
        rewrite,
        timeout,
        retries,
        mirrors,
        headers,
    })
}

fn http_match(cx: &mut Cx, v: &Value, at: &str) -> Option<Match> {
    let o = obj(
        cx,
        v,
        at,
        &[
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "port",
            "sourceLabels",
            "gateways",
            "queryParams",
            "ignoreUriCase",
            "withoutHeaders",
            "sourceNamespace",
            "statPrefix",
        ],
    )?;
    o.refuse(cx, at, "sourceLabels", NO_SCOPING);
    o.refuse(cx, at, "sourceNamespace", NO_SCOPING);
    o.refuse(
        cx,
        at,
        "gateways",
        "Pilot configures sidecars only; matches on gateways are not supported",
    );
    o.refuse(
        cx,
        at,
        "statPrefix",
        "per-route stats prefixes are not supported by the sidecar",
    );
    string(cx, o, at, "name");
    let mut m = Match {
        uri: o.get("uri").and_then(|u| str_match(cx, u, &join(at, "uri"))).flatten(),
        ignore_uri_case: boolean(cx, o, at, "ignoreUriCase").unwrap_or(false),
        port: port(cx, o, at, "port"),
        ..Match::default()
    };
    for (k, pseudo) in [
        ("scheme", ":scheme"),
        ("method", ":method"),
        ("authority", ":authority"),
    ] {
        if let Some(s) = o.get(k).and_then(|u| str_match(cx, u, &join(at, k))) {
            m.headers.push((pseudo.to_string(), s, false));
        }
    }
    for (k, invert) in [("headers", false), ("withoutHeaders", true)] {
        if let Some(h) = o.get(k) {
            let Some(map) = h.as_object() else {
                cx.add(&join(at, k), "expected a mapping of header name to match");
                continue;
            };
            for (name, hv) in map {
                if let Some(s) = str_match(cx, hv, &format!("{}.{name}", join(at, k))) {
                    m.headers.push((name.to_ascii_lowercase(), s, invert));
                }
            }
        }
    }
    if let Some(q) = o.get("queryParams") {
        match q.as_object() {
            Some(map) => {
                for (name, qv) in map {
                    if let Some(s) = str_match(cx, qv, &format!("{at}.queryParams.{name}")) {
                        m.query.push((name.clone(), s));
                    }
                }
            }
            None => cx.add(
                &join(at, "queryParams"),
                "expected a mapping of parameter name to match",
            ),
        }
    }
    Some(m)
}

fn workload_selector(cx: &mut Cx, o: O<'_>, at: &str, k: &str, inner: &str) -> BTreeMap<String, String> {
    sub(cx, o, at, k, &[inner])
        .map(|s| string_map(cx, s, &join(at, k), inner))
        .unwrap_or_default()
}

pub(crate) fn selector(cx: &mut Cx, o: O<'_>) -> BTreeMap<String, String> {
    workload_selector(cx, o, "spec", "selector", "matchLabels")
}

fn peer_authentication(cx: &mut Cx, v: &Value) -> bool {
    let at = "spec";
    let Some(o) = obj(cx, v, at, &["selector", "mtls", "portLevelMtls"]) else {
        return false;
    };
    selector(cx, o);
    let before = cx.problems.len();
    let strict = "STRICT mutual TLS needs workload certificates from the mesh CA, which Pilot does not issue yet; accepting plaintext instead would silently drop the requirement. Use PERMISSIVE or DISABLE until then";
    let modes = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
    if let Some(m) = sub(cx, o, at, "mtls", &["mode"])
        && one_of(cx, m, "spec.mtls", "mode", &modes).as_deref() == Some("STRICT")
    {
        cx.add("spec.mtls.mode", strict);
    }
    if let Some(pl) = o.get("portLevelMtls") {
        match pl.as_object() {
            Some(map) => {
                for (p, mv) in map {
                    let here = format!("spec.portLevelMtls.{p}");
                    if p.parse::<u16>().ok().filter(|n| *n > 0).is_none() {
                        cx.add(&here, format!("`{p}` is not a port"));
                    }
                    if let Some(m) = obj(cx, mv, &here, &["mode"])
                        && one_of(cx, m, &here, "mode", &modes).as_deref() == Some("STRICT")
                    {
                        cx.add(&join(&here, "mode"), strict);
                    }
                }
            }
            None => cx.add("spec.portLevelMtls", "expected a mapping of port to mTLS settings"),
        }
    }
    cx.problems.len() == before
}

fn sidecar(cx: &mut Cx, v: &Value) -> bool {
    let at = "spec";
    let Some(o) = obj(
        cx,
        v,
        at,
        &[
            "workloadSelector",
            "ingress",
            "egress",
            "outboundTrafficPolicy",
            "inboundConnectionPool",
        ],
    ) else {
        return false;
    };
    let before = cx.problems.len();
    workload_selector(cx, o, at, "workloadSelector", "labels");
    // Egress hosts only narrow what a workload sees; with every sidecar given everything, the
    // narrowing is not applied, which changes no routing decision.
    for (here, e) in list(cx, o, at, "egress") {
        let Some(eo) = obj(cx, e, &here, &["port", "bind", "captureMode", "hosts"]) else {
            continue;
        };
        for (i, h) in strings(cx, eo, &here, "hosts").iter().enumerate() {
            if !h.contains('/') {
                cx.add(
                    &format!("{here}.hosts[{i}]"),
                    format!("`{h}`: hosts are `namespace/dnsName`"),
                );
            }
        }
        for k in ["port", "bind", "captureMode"] {
            eo.refuse(
                cx,
                &here,
                k,
                "egress listeners of their own are not supported; the sidecar has one outbound HTTP listener",
            );
        }
    }
    o.refuse(
        cx,
        at,
        "ingress",
        "inbound listeners are not generated from Sidecar resources",
    );
    o.refuse(
        cx,
        at,
        "inboundConnectionPool",
        "inbound connection pools are not supported",
    );
    if let Some(p) = sub(cx, o, at, "outboundTrafficPolicy", &["mode", "egressProxy"]) {
        let here = "spec.outboundTrafficPolicy";
        p.refuse(cx, here, "egressProxy", "egress proxies are not supported");
        if one_of(cx, p, here, "mode", &["REGISTRY_ONLY", "ALLOW_ANY"]).as_deref() == Some("ALLOW_ANY") {
            cx.add(
                &join(here, "mode"),
                "ALLOW_ANY passes unknown destinations through, which needs transparent capture; the sidecar routes only registered hosts (REGISTRY_ONLY)",
            );
        }
    }
    cx.problems.len() == before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "cfg/a.yaml") {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    const VS: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: { name: r, namespace: shop }\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{ destination: { host: reviews }, weight: 100 }]\n";

    #[test]
    fn a_good_document_is_read_with_short_names_resolved() {
        let r = parse(VS, "a.yaml").unwrap();
        let Resource::VirtualService(vs) = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(vs.hosts, ["reviews.shop.svc.cluster.local"]);
        assert_eq!(vs.meta.doc, "document 1 (VirtualService shop/r)");
        let Action::Route(d) = &vs.http[0].action else { panic!() };
        assert_eq!((d[0].0.host.as_str(), d[0].1), ("reviews.shop.svc.cluster.local", 100));
    }

    #[test]
    fn unknown_fields_are_named_with_file_document_and_path() {
        let p = problems(&format!(
            "{VS}---\n{}",
            VS.replace("weight: 100", "wieght: 100").replace("name: r", "name: s")
        ));
        assert_eq!(
            p,
            [
                "cfg/a.yaml: document 2 (VirtualService shop/s) spec.http[0].route[0].wieght: unknown field `wieght` (known here: destination, weight, headers)"
            ]
        );
        let p = problems(&VS.replace("hosts:", "hostz:"));
        assert!(p[0].contains("spec.hostz: unknown field `hostz`"), "{p:?}");
    }

    #[test]
    fn types_versions_kinds_and_yaml_errors_are_named() {
        let p = problems(&VS.replace("weight: 100", "weight: heavy"));
        assert!(
            p[0].ends_with("spec.http[0].route[0].weight: expected an integer from 0 to 4294967295, not \"heavy\""),
            "{p:?}"
        );
        let p = problems(&VS.replace("v1alpha3", "v2"));
        assert!(
            p[0].contains("apiVersion: `networking.istio.io/v2` is not one of"),
            "{p:?}"
        );
        let p = problems(&VS.replace("kind: VirtualService", "kind: Deployment"));
        assert!(
            p[0].contains("kind: `Deployment` is not an Istio kind Pilot reads"),
            "{p:?}"
        );
        let p = problems(&format!("{VS}---\nspec: [\n"));
        assert!(p[0].starts_with("cfg/a.yaml: document 2 (line 9): not YAML"), "{p:?}");
        let p = problems(&VS.replace("name: r, ", ""));
        assert!(p[0].contains("metadata.name: required"), "{p:?}");
        let p = problems(&VS.replace(
            "http:\n",
            "http:\n  - timeout: soon\n    route: [{ destination: { host: a } }]\n",
        ));
        assert!(p[0].contains("spec.http[0].timeout: `soon` is not a duration"), "{p:?}");
    }

    #[test]
    fn what_a_sidecar_cannot_honour_is_refused_with_the_reason() {
        let p = problems(&VS.replace("  http:\n", "  gateways: [ingress]\n  http:\n"));
        assert!(
            p[0].contains("spec.gateways[0]: `ingress`: Pilot configures sidecars only"),
            "{p:?}"
        );
        let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: { name: e }\nspec:\n  hosts: [a.example]\n  ports: [{ number: 80, name: http, protocol: HTTP }]\n  resolution: STATIC\n  endpoints: [{ address: a.example }]\n";
        let p = problems(se);
        assert!(p[0].ends_with("spec.endpoints[0].address: `a.example`: STATIC endpoints are IP addresses; use resolution DNS for names"), "{p:?}");
        let p = problems(&se.replace("protocol: HTTP", "protocol: SMTP"));
        assert!(
            p.iter()
                .any(|x| x.contains("spec.ports[0].protocol: `SMTP` is not a protocol")),
            "{p:?}"
        );
    }

    #[test]
    fn service_entries_map_ports_and_endpoints() {
        let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: { name: e }\nspec:\n  hosts: [a.example]\n  ports: [{ number: 80, name: http, protocol: HTTP, targetPort: 8080 }, { number: 443, name: tls, protocol: TLS }]\n  resolution: DNS\n";
        let r = parse(se, "se.yaml").unwrap();
        let Resource::ServiceEntry(e) = &r[0] else { panic!() };
        assert!(e.dns);
        assert_eq!(
            e.endpoints[0].address, "a.example",
            "DNS without endpoints resolves the host"
        );
        assert_eq!(e.ports[1].protocol, Protocol::Tcp);
        assert_eq!(e.ports[0].target_port, Some(8080));
    }

    proptest::proptest! {
        /// Any text, and any truncation or byte flip of a valid file, is accepted or rejected
        /// with problems; never a panic.
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}", cut in 0usize..400, flip in 0usize..400, to in 0u8..128) {
            let _ = parse(&text, "p.yaml");
            let full = format!("{VS}---\n{}", include_str!("../../tests/fixtures/istio/testdata-destination-rule-all.yaml"));
            let mut bytes = full.into_bytes();
            bytes.truncate(cut.max(1) * bytes.len() / 400);
            if let Some(b) = bytes.get_mut(flip) {
                *b = to;
            }
            let _ = parse(&String::from_utf8_lossy(&bytes), "p.yaml");
        }
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard() {
        assert!(super::super::host_matches("*.example.com", "a.example.com"));
        assert!(!super::super::host_matches("*.example.com", "example.com"));
        assert!(super::super::host_matches("*", "x"));
        assert!(super::super::host_matches("a.b", "a.b"));
        assert_eq!(fqdn("reviews", "shop"), "reviews.shop.svc.cluster.local");
        assert_eq!(fqdn("a.example", "shop"), "a.example");
    }
}

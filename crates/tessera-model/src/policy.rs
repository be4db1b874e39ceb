//! In-sidecar policy (the merged Mixer's Check and Quota): checks and quotas attached to an HTTP
//! connection manager or an RPC chain, evaluated over the request's attributes (Istio's names:
//! `source.ip`, `request.headers[x-user]`, `rpc.service`...).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::ser_duration;

/// The checks and quotas every request through a chain passes, in order: checks first (the first
/// denial answers), then quotas.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    /// Allow/deny decisions.
    pub checks: Vec<Check>,
    /// Request quotas.
    pub quotas: Vec<Quota>,
}

impl Policy {
    /// True when there is nothing to evaluate.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty() && self.quotas.is_empty()
    }

    /// Every attribute the checks and quotas read (RBAC headers as `request.headers[name]`; `*`
    /// when an OPA check may read any).
    pub fn attributes(&self) -> Vec<String> {
        fn perm(p: &Permission, out: &mut Vec<String>) {
            match p {
                Permission::AndRules(v) | Permission::OrRules(v) => v.iter().for_each(|p| perm(p, out)),
                Permission::NotRule(p) => perm(p, out),
                Permission::Header(h) => out.push(format!("request.headers[{}]", h.name)),
                _ => {}
            }
        }
        fn princ(p: &Principal, out: &mut Vec<String>) {
            match p {
                Principal::AndIds(v) | Principal::OrIds(v) => v.iter().for_each(|p| princ(p, out)),
                Principal::NotId(p) => princ(p, out),
                Principal::Header(h) => out.push(format!("request.headers[{}]", h.name)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        for c in &self.checks {
            match c {
                Check::List(l) => out.push(l.attribute.clone()),
                // Rego may read any attribute.
                Check::Opa(_) | Check::ExtAuthz(_) => out.push("*".to_string()),
                Check::Rbac(r) => {
                    for (_, p) in &r.policies {
                        p.permissions.iter().for_each(|x| perm(x, &mut out));
                        p.principals.iter().for_each(|x| princ(x, &mut out));
                    }
                }
            }
        }
        for q in &self.quotas {
            out.extend(q.dimensions.iter().cloned());
            out.extend(
                q.overrides
                    .iter()
                    .flat_map(|o| o.dimensions.iter().map(|(k, _)| k.clone())),
            );
        }
        out
    }
}

/// One check.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Mixer's listchecker: an attribute's value against a list.
    List(ListCheck),
    /// Envoy's RBAC filter (what Istio's AuthorizationPolicy compiles to).
    Rbac(RbacCheck),
    /// A Rego policy evaluated in process.
    Opa(OpaCheck),
    /// Envoy's ext_authz: a remote Check call per request (the Mixer way; HTTP chains only).
    ExtAuthz(ExtAuthzCheck),
}

impl Check {
    /// The check's name (stats, logs, reasons).
    pub fn name(&self) -> &str {
        match self {
            Check::List(l) => &l.name,
            Check::Rbac(r) => &r.name,
            Check::Opa(o) => &o.name,
            Check::ExtAuthz(e) => &e.name,
        }
    }
}

/// An OPA check: Rego modules evaluated in process (regorus) with the request's attributes as
/// `input`; the query's value decides.
#[derive(Debug, Clone, Serialize)]
pub struct OpaCheck {
    /// Unique among the chain's checks.
    pub name: String,
    /// Rego files, watched and reloaded when they change.
    pub files: Vec<PathBuf>,
    /// A Rego module written in the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rego: Option<String>,
    /// The rule that decides, e.g. `data.tessera.authz.allow`: `true` allows; `false`, undefined
    /// or an object whose `allowed` is not `true` denies (the object's `reason` is the reason).
    pub query: String,
    /// When evaluation fails (a runtime error, a non-boolean result): allow (`true`) or deny
    /// (`false`, the default: fail closed).
    pub fail_open: bool,
}

/// A remote authorization server speaking `envoy.service.auth.v3.Authorization` over gRPC.
#[derive(Debug, Clone, Serialize)]
pub struct ExtAuthzCheck {
    /// Unique among the chain's checks.
    pub name: String,
    /// The server, `host:port` (plaintext HTTP/2).
    pub address: String,
    /// The longest a request waits for the answer, connecting included (Envoy: 200ms).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Allow requests when the server fails or is too slow (Envoy's `failure_mode_allow`).
    pub fail_open: bool,
}

/// What an RBAC check does when a policy matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RbacAction {
    /// Allow only requests some policy matches.
    Allow,
    /// Deny requests some policy matches.
    Deny,
    /// Allow everything; count and log matches.
    Log,
}

/// An RBAC check (Envoy `config.rbac.v3.RBAC`).
#[derive(Debug, Clone, Serialize)]
pub struct RbacCheck {
    /// Unique among the chain's checks.
    pub name: String,
    /// ALLOW, DENY or LOG.
    pub action: RbacAction,
    /// Only count and log the decision (Envoy's `shadow_rules`); never deny.
    pub shadow: bool,
    /// Named policies, in order.
    pub policies: Vec<(String, RbacPolicy)>,
}

/// A policy: it matches when any permission and any principal match.
#[derive(Debug, Clone, Serialize)]
pub struct RbacPolicy {
    /// What the request does.
    pub permissions: Vec<Permission>,
    /// Who sends it.
    pub principals: Vec<Principal>,
}

/// A string comparison that may ignore ASCII case (Envoy's `StringMatcher`).
#[derive(Debug, Clone, Serialize)]
pub struct CaseMatch {
    /// The comparison.
    #[serde(flatten)]
    pub matcher: crate::config::StringMatch,
    /// Compare ignoring ASCII case (not for regexes).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_case: bool,
}

/// What a request does (Envoy `Permission`, plus RPC service and method).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Anything.
    Any,
    /// All of these.
    AndRules(Vec<Permission>),
    /// One of these.
    OrRules(Vec<Permission>),
    /// Not this.
    NotRule(Box<Permission>),
    /// A request header.
    Header(crate::config::HeaderMatcher),
    /// The path without the query.
    UrlPath(CaseMatch),
    /// The HTTP method (Istio's `methods`).
    Method(String),
    /// The port the request arrived on.
    DestinationPort(u16),
    /// A port range, end exclusive.
    DestinationPortRange(u16, u16),
    /// The RPC service.
    RpcService(CaseMatch),
    /// The RPC method.
    RpcMethod(CaseMatch),
}

/// Who sends a request (Envoy `Principal`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    /// Anyone.
    Any,
    /// All of these.
    AndIds(Vec<Principal>),
    /// One of these.
    OrIds(Vec<Principal>),
    /// Not this.
    NotId(Box<Principal>),
    /// The mTLS peer's identity (URI SAN), e.g. `spiffe://cluster.local/ns/default/sa/sleep`.
    Authenticated(CaseMatch),
    /// The client's address.
    SourceIp(#[serde(serialize_with = "crate::config::ser_display")] crate::decode::Cidr),
    /// A request header.
    Header(crate::config::HeaderMatcher),
}

/// What the entries of a list are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    /// Exact strings.
    Strings,
    /// Regular expressions matching the whole value.
    Regex,
    /// IP addresses and CIDR ranges.
    IpAddresses,
}

/// A list check.
#[derive(Debug, Clone, Serialize)]
pub struct ListCheck {
    /// Unique among the chain's checks.
    pub name: String,
    /// The attribute checked, e.g. `request.headers[x-user]` or `source.ip`.
    pub attribute: String,
    /// What the entries are.
    pub kind: ListKind,
    /// Entries written in the config.
    pub entries: Vec<String>,
    /// A file with one entry per line (`#` comments), watched and reloaded; its entries join
    /// `entries`.
    pub file: Option<PathBuf>,
    /// Deny on a match (a blacklist); otherwise allow only on a match.
    pub blacklist: bool,
    /// Compare strings without ASCII case.
    pub case_insensitive: bool,
}

/// How a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaAlgorithm {
    /// At most `max` per window, windows back to back.
    FixedWindow,
    /// A token bucket: `max` tokens, refilled evenly over `window`.
    RollingWindow,
}

/// A memory quota per key.
#[derive(Debug, Clone, Serialize)]
pub struct Quota {
    /// Unique among the chain's quotas.
    pub name: String,
    /// Requests allowed per window and key.
    pub max: u32,
    /// The window.
    #[serde(serialize_with = "ser_duration")]
    pub window: Duration,
    /// How requests are counted.
    pub algorithm: QuotaAlgorithm,
    /// The attributes whose values make the key (none: one key for all requests).
    pub dimensions: Vec<String>,
    /// Other limits for given dimension values.
    pub overrides: Vec<QuotaOverride>,
    /// Keys kept at most; when full, expired keys are evicted, then new keys are refused. For a
    /// Redis quota: keys holding prefetched tokens.
    pub max_keys: usize,
    /// Count in Redis, shared by every sidecar that names the same server and quota; `None`:
    /// in this sidecar's memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisBackend>,
}

/// Where and how a Redis quota counts.
#[derive(Debug, Clone, Serialize)]
pub struct RedisBackend {
    /// `host:port` of a standalone server, or of cluster nodes (seeds) when `cluster`.
    pub addresses: Vec<String>,
    /// Talk Redis Cluster (slots, MOVED/ASK) instead of one server.
    pub cluster: bool,
    /// The longest a request waits for Redis, connecting included; then `fail_open` answers.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// When Redis is down or slow: allow (true, the default) or refuse the request.
    pub fail_open: bool,
    /// Tokens taken from Redis per trip and spent locally (Istio's prefetch); 0 or 1: every
    /// request asks Redis.
    pub prefetch: u32,
    /// The first part of every key: `<key_prefix>:<quota>:<dimension values>`.
    pub key_prefix: String,
}

/// A different `max` for requests whose dimensions have these values.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaOverride {
    /// Dimension (attribute) name to value; every one must match.
    pub dimensions: Vec<(String, String)>,
    /// The limit for them.
    pub max: u32,
}

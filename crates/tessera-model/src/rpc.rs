//! The RPC connection manager's configuration: a listener chain that speaks SOFA Bolt or Dubbo,
//! routed on service, method, version, group and headers (Bolt header map, Dubbo attachments).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::{AccessLog, ClusterSpecifier, HeaderMatcher, StringMatch, ser_duration};
use crate::traffic::LocalRateLimit;

/// Which protocol an RPC chain accepts downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcProtocol {
    /// Detected from the first bytes of each connection (Bolt v1/v2 or Dubbo).
    Auto,
    /// SOFA Bolt v1 and v2.
    Bolt,
    /// Dubbo 2.
    Dubbo,
}

/// An RPC proxy chain.
#[derive(Debug, Clone, Serialize)]
pub struct RpcProxy {
    /// Prefix for this chain's stats (`rpc.<stat_prefix>.`).
    pub stat_prefix: String,
    /// The protocol accepted downstream; upstream connections speak the same one.
    pub protocol: RpcProtocol,
    /// Routes, first match wins.
    pub routes: Vec<RpcRoute>,
    /// Timeout for a request whose frame, attachments and route give none.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// Close a downstream connection with no request in flight for this long; zero disables.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Largest frame accepted from either side, header included.
    pub max_frame_bytes: u32,
    /// Requests in flight per downstream connection before the sidecar stops reading from it.
    pub max_concurrent_requests: u32,
    /// Access logs, one line per request.
    pub access_log: Vec<AccessLog>,
    /// Checks and quotas every request passes before it is routed.
    pub policy: crate::policy::Policy,
}

/// One RPC route.
#[derive(Debug, Clone, Serialize)]
pub struct RpcRoute {
    /// Optional name (`%ROUTE_NAME%`).
    pub name: Option<String>,
    /// Request criteria; all must hold.
    #[serde(rename = "match")]
    pub matcher: RpcMatch,
    /// Where matching requests go.
    pub route: RpcAction,
}

/// RPC request criteria. Absent criteria match anything.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RpcMatch {
    /// The service: Bolt's `service` header as sent (`interface:version[:uniqueId]`), Dubbo's
    /// interface.
    pub service: Option<StringMatch>,
    /// The method name.
    pub method: Option<StringMatch>,
    /// The service version.
    pub version: Option<StringMatch>,
    /// The group (Dubbo `group`, Bolt `uniqueId`).
    pub group: Option<StringMatch>,
    /// Bolt header or Dubbo attachment criteria (names compared without ASCII case).
    pub headers: Vec<HeaderMatcher>,
}

impl RpcMatch {
    /// Whether matching needs the Dubbo attachments or the whole Bolt header map, not only the
    /// service, method and version (which Dubbo carries before the arguments).
    pub fn needs_attachments(&self) -> bool {
        self.group.is_some() || !self.headers.is_empty()
    }
}

/// What an RPC route does.
#[derive(Debug, Clone, Serialize)]
pub struct RpcAction {
    /// A cluster or weighted clusters.
    pub cluster: ClusterSpecifier,
    /// Endpoint labels to pick from (subset load balancing).
    pub metadata_match: BTreeMap<String, String>,
    /// Overrides the client's timeout when shorter; zero means the client's or the chain's.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// The methods this route matches may be sent twice: retries may follow a reset connection
    /// or a protocol error, not only a failed connect.
    pub idempotent: bool,
    /// Further attempts, on other hosts where there are any, after a failed connect (always
    /// safe: nothing was sent) or, when `idempotent`, after the connection broke with the request
    /// outstanding. A timeout is final: the client's deadline has passed.
    pub num_retries: u32,
    /// A token bucket for the requests this route matches.
    pub local_rate_limit: Option<LocalRateLimit>,
}

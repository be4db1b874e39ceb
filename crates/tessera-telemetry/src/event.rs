//! The event the request path produces: owned, so it can cross to the telemetry thread, and
//! cheap to build, because label values that repeat across requests are shared [`Label`]s.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::trace::TraceContext;

/// A label value shared between events (workload names, namespaces, principals...): cloning
/// it is a reference-count increment, not a copy.
pub type Label = Arc<str>;

/// What was proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An HTTP/1.1 or HTTP/2 request.
    Http,
    /// A gRPC call.
    Grpc,
    /// A TCP connection (or a periodic report about one, see [`TcpCounters`]).
    Tcp,
    /// A request of a multiplexed RPC protocol, e.g. `"bolt"` or `"dubbo"`.
    Rpc {
        /// The protocol name, written as `request_protocol`.
        protocol: &'static str,
    },
}

impl Kind {
    /// Istio's `request_protocol` label value.
    pub fn request_protocol(&self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Grpc => "grpc",
            Kind::Tcp => "tcp",
            Kind::Rpc { protocol } => protocol,
        }
    }
}

/// Istio's `reporter` label: which side of the call this proxy was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReporterSide {
    /// The client side: outbound traffic leaving this workload.
    #[default]
    Source,
    /// The server side: inbound traffic to this workload (Istio's sidecar-server).
    Destination,
}

impl ReporterSide {
    /// The label value, `"source"` or `"destination"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReporterSide::Source => "source",
            ReporterSide::Destination => "destination",
        }
    }
}

/// Istio's `connection_security_policy` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SecurityPolicy {
    /// The peer connection was mutual TLS.
    MutualTls,
    /// Plain text.
    None,
    /// Not known (Istio writes this on the source side).
    #[default]
    Unknown,
}

impl SecurityPolicy {
    /// The label value: `"mutual_tls"`, `"none"` or `"unknown"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
            SecurityPolicy::Unknown => "unknown",
        }
    }
}

/// One side of a call (source or destination workload). `None` is written as `"unknown"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Workload name (Istio `*_workload`), e.g. the Deployment name.
    pub workload: Option<Label>,
    /// Workload namespace (`*_workload_namespace`).
    pub namespace: Option<Label>,
    /// Peer identity, e.g. `spiffe://cluster.local/ns/default/sa/reviews` (`*_principal`).
    pub principal: Option<Label>,
    /// The `app` label of the workload (`*_app`).
    pub app: Option<Label>,
    /// The `version` label of the workload (`*_version`).
    pub version: Option<Label>,
    /// The mesh cluster (e.g. Kubernetes cluster id) the workload runs in (`*_cluster`).
    /// Not the Envoy upstream cluster: that is [`Event::upstream_cluster`].
    pub cluster: Option<Label>,
}

/// Byte counts and lifecycle flags of a TCP connection report.
///
/// As in Istio, a long connection may be reported several times: each report carries the bytes
/// since the previous one, `opened` is set on the first and `closed` on the last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Bytes sent to the downstream (the response direction) since the last report.
    pub sent_bytes: u64,
    /// Bytes received from the downstream (the request direction) since the last report.
    pub received_bytes: u64,
    /// This report is the first for its connection.
    pub opened: bool,
    /// This report is the last for its connection.
    pub closed: bool,
}

/// One request or TCP connection report, as the proxy saw it.
///
/// Build with [`Event::new`] and set the fields you know; every `Option` left `None` is reported as
/// Istio reports a missing value (`"unknown"` in metrics, `-`/`null` in access logs).
#[derive(Debug, Clone)]
pub struct Event {
    /// What was proxied; decides which metrics the event feeds.
    pub kind: Kind,
    /// Which side of the call this proxy was.
    pub reporter: ReporterSide,
    /// When the request (or connection) started.
    pub start_time: SystemTime,
    /// From the first downstream byte to the last response byte (or to this report, for TCP).
    pub duration: Duration,
    /// The calling workload.
    pub source: Peer,
    /// The called workload.
    pub destination: Peer,
    /// The destination service host, e.g. `reviews.default.svc.cluster.local`.
    pub destination_service: Option<Label>,
    /// The destination service's short name, e.g. `reviews`.
    pub destination_service_name: Option<Label>,
    /// The destination service's namespace.
    pub destination_service_namespace: Option<Label>,
    /// The Envoy upstream cluster the request was routed to (`%UPSTREAM_CLUSTER%`).
    pub upstream_cluster: Option<Label>,
    /// The upstream endpoint that served the request (`%UPSTREAM_HOST%`).
    pub upstream_host: Option<SocketAddr>,
    /// The downstream peer address (`%DOWNSTREAM_REMOTE_ADDRESS%`).
    pub downstream_remote_address: Option<SocketAddr>,
    /// Response status: the HTTP status, or the RPC protocol's status mapped to HTTP; 0 for TCP.
    pub response_code: u16,
    /// The gRPC status (`grpc-status`), when the call was gRPC and one was seen.
    pub grpc_response_status: Option<u32>,
    /// Envoy response flags (`UH`, `UF,URX`...), `-` when none.
    pub response_flags: Cow<'static, str>,
    /// Whether the connection to the peer was mutual TLS.
    pub connection_security_policy: SecurityPolicy,
    /// Request size in bytes, headers and body, as Istio counts it.
    pub request_bytes: u64,
    /// Response size in bytes, headers and body.
    pub response_bytes: u64,
    /// TCP bytes and open/close flags; meaningful when `kind` is [`Kind::Tcp`].
    pub tcp: TcpCounters,
    /// Request method (`GET`), or the RPC method name.
    pub method: Option<String>,
    /// Request path, or the RPC service name.
    pub path: Option<String>,
    /// The `:authority` / `Host` header.
    pub authority: Option<String>,
    /// The `user-agent` header.
    pub user_agent: Option<String>,
    /// The `x-request-id` header.
    pub request_id: Option<String>,
    /// The trace this request belongs to, if it was traced.
    pub trace: Option<TraceContext>,
}

impl Event {
    /// A new event started now, with every optional field empty and no response flags.
    pub fn new(kind: Kind, reporter: ReporterSide) -> Event {
        Event {
            kind,
            reporter,
            start_time: SystemTime::now(),
            duration: Duration::ZERO,
            source: Peer::default(),
            destination: Peer::default(),
            destination_service: None,
            destination_service_name: None,
            destination_service_namespace: None,
            upstream_cluster: None,
            upstream_host: None,
            downstream_remote_address: None,
            response_code: 0,
            grpc_response_status: None,
            response_flags: Cow::Borrowed("-"),
            connection_security_policy: SecurityPolicy::Unknown,
            request_bytes: 0,
            response_bytes: 0,
            tcp: TcpCounters::default(),
            method: None,
            path: None,
            authority: None,
            user_agent: None,
            request_id: None,
            trace: None,
        }
    }

    /// Istio's `request_protocol` label value.
    pub fn request_protocol(&self) -> &'static str {
        self.kind.request_protocol()
    }

    /// Bytes received from the downstream: the request size, or the TCP received count.
    pub fn bytes_received(&self) -> u64 {
        match self.kind {
            Kind::Tcp => self.tcp.received_bytes,
            _ => self.request_bytes,
        }
    }

    /// Bytes sent to the downstream: the response size, or the TCP sent count.
    pub fn bytes_sent(&self) -> u64 {
        match self.kind {
            Kind::Tcp => self.tcp.sent_bytes,
            _ => self.response_bytes,
        }
    }
}

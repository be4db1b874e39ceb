//! Sans-IO codecs for multiplexed request/response RPC protocols (what MOSN calls XProtocol):
//! SOFA Bolt v1/v2 and Dubbo 2 today, Tars and Thrift next. A codec turns bytes into [`Frame`]s
//! and back; it never touches a socket, a clock or a runtime, so it is unit-tested and fuzzed
//! directly. The sidecar's RPC connection manager (in `tessera-proxy`) does the I/O.
//!
//! Adding a protocol means implementing [`Codec`] and listing it in [`codecs`]; nothing else.
//!
//! What a codec guarantees: malformed input yields a [`CodecError`] (the caller closes the
//! connection), never a panic; no allocation is sized by a length field before that length is
//! checked against [`Limits`].

use std::borrow::Cow;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

pub mod bolt;
pub mod dubbo;
pub mod hessian;

/// Which protocol a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// SOFA Bolt, protocol code 1.
    BoltV1,
    /// SOFA Bolt, protocol code 2.
    BoltV2,
    /// Dubbo 2 (the `dubbo` protocol, 16-byte header).
    Dubbo,
}

impl Protocol {
    /// A short lower-case name for stats and logs (`bolt`, `bolt_v2`, `dubbo`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::BoltV1 => "bolt",
            Protocol::BoltV2 => "bolt_v2",
            Protocol::Dubbo => "dubbo",
        }
    }
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request that expects a response.
    Request,
    /// A request that expects none.
    OneWay,
    /// A response to a request.
    Response,
    /// A keep-alive request (answered by whoever receives it, never forwarded by the sidecar).
    Heartbeat,
    /// The answer to a keep-alive.
    HeartbeatReply,
}

/// One decoded frame. `raw` holds every byte of it exactly as received, so forwarding is a
/// copy-free write of `raw` after [`Codec::set_request_id`].
#[derive(Debug, Clone)]
pub struct Frame {
    /// The protocol (Bolt v1 and v2 share a codec).
    pub protocol: Protocol,
    /// Request, response, heartbeat...
    pub kind: Kind,
    /// The id that pairs a response with its request (Bolt: u32, Dubbo: i64 as u64).
    pub request_id: u64,
    /// The timeout the client put in the frame header, if it did (Bolt; Dubbo carries it in the
    /// `timeout` attachment, see [`RouteKeys::timeout`]).
    pub timeout: Option<Duration>,
    /// Response status in the protocol's own numbering (Bolt `respStatus`, Dubbo status byte).
    pub status: Option<u16>,
    /// The whole frame.
    pub raw: BytesMut,
}

/// The fields routing, policy and logs use, borrowed from the frame where the bytes allow
/// (plain UTF-8 in one piece: the usual case), so routing a request allocates nothing per field.
/// Only what was asked for is read: the body is parsed only when `Need::body` is set and the
/// header alone does not carry the value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteKeys<'a> {
    /// Bolt: the `service` header (`interface:version[:uniqueId]`); Dubbo: the interface (the
    /// `interface` attachment when read, else the service path from the body).
    pub service: Cow<'a, str>,
    /// The method name (Bolt: `sofa_head_method_name`, else the SofaRequest body; Dubbo: body).
    pub method: Cow<'a, str>,
    /// The service version (Dubbo body or `version` attachment; Bolt: after the first `:` of `service`).
    pub version: Cow<'a, str>,
    /// The group (Dubbo `group` attachment; Bolt: `uniqueId`, the part after the second `:`).
    pub group: Cow<'a, str>,
    /// The Bolt header map or the Dubbo attachments, string values only, in wire order.
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The timeout the client asked for in the body or attachments (Dubbo `timeout`), if any.
    pub timeout: Option<Duration>,
}

impl RouteKeys<'_> {
    /// The first value of header or attachment `name` (exact, case-sensitive as on the wire).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_ref())
    }

    /// The keys with every field copied, to outlive the frame.
    pub fn into_owned(self) -> RouteKeys<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        RouteKeys {
            service: own(self.service),
            method: own(self.method),
            version: own(self.version),
            group: own(self.group),
            headers: self.headers.into_iter().map(|(k, v)| (own(k), own(v))).collect(),
            timeout: self.timeout,
        }
    }
}

/// How much of a request the caller needs read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// Parse the body where the header lacks a value (Bolt method, Dubbo attachments and group).
    pub body: bool,
}

/// Why the sidecar answers a request itself; each codec maps it to its native error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No route for the service/method.
    NoRoute,
    /// No healthy upstream, or the connection to it failed or was reset.
    Unavailable,
    /// The upstream did not answer within the timeout.
    Timeout,
    /// A circuit breaker or a queue limit refused the request.
    Overflow,
    /// A local rate limit or quota refused the request.
    RateLimited,
    /// A policy (list, RBAC, OPA) denied the request.
    Denied,
    /// Anything else that went wrong in the sidecar.
    Internal,
}

/// Caps on what a peer may make us buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, header included (default 8 MiB, Dubbo's default payload limit).
    pub max_frame: usize,
    /// Most header-map or attachment entries read (default 1,024).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame: 8 << 20,
            max_headers: 1024,
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// This codec's protocol.
    Yes,
    /// Not this codec's protocol.
    No,
    /// Too few bytes to tell.
    NeedMore,
}

/// A protocol error: the connection cannot be trusted any more and is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not this protocol (bad magic or protocol code).
    #[error("not a {0} frame: {1}")]
    NotThisProtocol(&'static str, String),
    /// A length field is over the limit.
    #[error("{what} of {len} bytes is over the limit of {limit}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A frame is inconsistent (lengths that do not add up, a bad CRC, a truncated field...).
    #[error("malformed {protocol} frame: {why}")]
    Malformed {
        /// The protocol.
        protocol: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The body uses a serialization this codec cannot read (only when the body was needed).
    #[error("{protocol} serialization {id} is not supported for reading the body")]
    Serialization {
        /// The protocol.
        protocol: &'static str,
        /// The serialization id.
        id: u8,
    },
}

/// One RPC protocol, sans IO.
pub trait Codec: Send + Sync + 'static {
    /// The protocol family's name (`bolt`, `dubbo`).
    fn name(&self) -> &'static str;

    /// Whether `first` (the first bytes a client sent) starts a frame of this protocol.
    fn detect(&self, first: &[u8]) -> Detect;

    /// Splits one frame off the front of `buf`: `Ok(None)` when `buf` holds only part of a frame
    /// (nothing is consumed), `Ok(Some(frame))` when a whole one was taken off (later frames stay
    /// in `buf`). Checks lengths against `limits` before waiting for or copying the body.
    fn decode(&self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, CodecError>;

    /// Rewrites the request id inside `frame.raw` (and `frame.request_id`), fixing up anything
    /// that covers it (Bolt v2's CRC32). Used to multiplex many clients on one upstream connection.
    /// Bolt ids are 32-bit: the upper bits of `id` are dropped.
    fn set_request_id(&self, frame: &mut Frame, id: u64);

    /// The routing keys of a request (see [`RouteKeys`] and [`Need`]).
    fn route_keys<'a>(&self, frame: &'a Frame, need: Need, limits: &Limits) -> Result<RouteKeys<'a>, CodecError>;

    /// A response to `request` that reports `failure` in the protocol's own terms (Bolt response
    /// status with an `RpcServerException` body, see [`bolt::failure_status`]; Dubbo status
    /// 31/40/60/80/100 with the message as a Hessian string, see [`dubbo::failure_status`]),
    /// carrying `request`'s id, so the client fails fast rather than hanging.
    fn error_response(&self, request: &Frame, failure: Failure, message: &str) -> Bytes;

    /// The reply to a heartbeat request, as the protocol's servers send it.
    fn heartbeat_reply(&self, heartbeat: &Frame) -> Bytes;

    /// A heartbeat request with id `id`, for keeping upstream connections alive and checking them.
    fn heartbeat(&self, protocol: Protocol, id: u64) -> Bytes;
}

/// Every codec, in the order detection tries them.
pub fn codecs() -> Vec<Box<dyn Codec>> {
    vec![Box::new(bolt::Bolt), Box::new(dubbo::Dubbo)]
}

/// The codec whose protocol `first` starts, `Err(true)` when more bytes are needed, `Err(false)`
/// when no codec recognises them.
pub fn detect(first: &[u8]) -> Result<Box<dyn Codec>, bool> {
    let mut need_more = false;
    for c in codecs() {
        match c.detect(first) {
            Detect::Yes => return Ok(c),
            Detect::NeedMore => need_more = true,
            Detect::No => {}
        }
    }
    Err(need_more)
}

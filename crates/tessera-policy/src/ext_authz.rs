//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`) for HTTP
//! requests: a hand-written proto3 codec for both ends of the call, so the sidecar can ask an
//! ext_authz server (encode `CheckRequest`, decode `CheckResponse`) and serve checks to Envoy
//! (decode `CheckRequest`, encode `CheckResponse`), plus the gRPC message framing around them.
//!
//! Field numbers were read from envoyproxy/data-plane-api at commit
//! `84e84367f2560cdb47b9bb78fd3e615feb80c3e4` (the mirror of envoy's `api/` tree) and from
//! googleapis' `google/rpc/status.proto` and `code.proto`. Implemented (everything else is
//! skipped as an unknown field):
//! - `envoy/service/auth/v3/external_auth.proto`: `CheckRequest.attributes` = 1;
//!   `CheckResponse.status` = 1, `denied_response` = 2, `ok_response` = 3, `error_response` = 5;
//!   `DeniedHttpResponse.status` = 1, `headers` = 2, `body` = 3; `OkHttpResponse.headers` = 2.
//! - `envoy/service/auth/v3/attribute_context.proto`: `AttributeContext.source` = 1,
//!   `destination` = 2, `request` = 4; `Peer.address` = 1, `service` = 2, `labels` = 3,
//!   `principal` = 4; `Request.http` = 2; `HttpRequest.method` = 2, `headers` = 3 (map entries
//!   key = 1, value = 2), `path` = 4 (query included), `host` = 5, `scheme` = 6,
//!   `header_map` = 13.
//! - `envoy/config/core/v3/address.proto`: `Address.socket_address` = 1;
//!   `SocketAddress.address` = 2, `port_value` = 3.
//! - `envoy/config/core/v3/base.proto`: `HeaderValue.key` = 1, `value` = 2, `raw_value` = 3;
//!   `HeaderValueOption.header` = 1; `HeaderMap.headers` = 1.
//! - `envoy/type/v3/http_status.proto`: `HttpStatus.code` = 1, an enum whose values are the
//!   HTTP status codes.
//! - `google/rpc/status.proto`: `Status.code` = 1, `message` = 2; `google/rpc/code.proto`:
//!   `OK` = 0, `PERMISSION_DENIED` = 7, `RESOURCE_EXHAUSTED` = 8.
//!
//! Decoders never panic and never allocate more than the input holds: every length is checked
//! against the bytes left, varints longer than 10 bytes are errors, groups and the undefined wire
//! types are rejected, and nesting follows the fixed message structure (unknown fields are
//! skipped by their length, never descended into).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use crate::Verdict;
use crate::attr::{Attr, Attributes, MapAttributes};

/// The gRPC method path of the Check call.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// `google.rpc.Code.PERMISSION_DENIED`.
const PERMISSION_DENIED: u64 = 7;
/// `google.rpc.Code.RESOURCE_EXHAUSTED`.
const RESOURCE_EXHAUSTED: u64 = 8;
/// The HTTP status Envoy sends for a denial that names none.
const DEFAULT_DENIED_STATUS: u16 = 403;
/// The largest protobuf field number.
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;
/// The pseudo-headers Envoy puts in `HttpRequest.headers` beside the dedicated fields.
const PSEUDO_HEADERS: [&str; 4] = [":authority", ":method", ":path", ":scheme"];

/// Why a Check message or its gRPC frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtAuthzError {
    /// The input ends in the middle of a value.
    #[error("{at}: the input ends inside {what}; the message is truncated")]
    Truncated {
        /// Message path and field number.
        at: String,
        /// What was being read.
        what: &'static str,
    },
    /// A varint runs over 10 bytes or 64 bits.
    #[error("{at}: varint longer than 10 bytes or over 64 bits")]
    VarintTooLong {
        /// Message path and field number.
        at: String,
    },
    /// A length-delimited field claims more bytes than are left.
    #[error("{at}: the field declares {len} bytes but only {remaining} remain")]
    LengthOverrun {
        /// Message path and field number.
        at: String,
        /// The declared length.
        len: u64,
        /// Bytes left in the enclosing message.
        remaining: usize,
    },
    /// A tag holds field number 0 or one above 2^29 - 1.
    #[error("{at}: field number {number} is outside 1..=536870911")]
    BadFieldNumber {
        /// Message path.
        at: String,
        /// The field number read.
        number: u64,
    },
    /// A group (wire types 3 and 4) or an undefined wire type (6, 7).
    #[error("{at}: wire type {wire_type} is not accepted (groups are not part of this API; 6 and 7 are undefined)")]
    UnsupportedWireType {
        /// Message path and field number.
        at: String,
        /// The wire type read.
        wire_type: u8,
    },
    /// A known field arrived with a wire type its declared type cannot have.
    #[error("{at}: expected a {expected} field, got wire type {got}")]
    WrongWireType {
        /// Field path.
        at: String,
        /// The wire type the proto declares.
        expected: &'static str,
        /// The wire type read.
        got: u8,
    },
    /// A `string` field is not UTF-8 (proto3 requires it).
    #[error("{at}: string is not valid UTF-8")]
    InvalidUtf8 {
        /// Field path.
        at: String,
    },
    /// `HttpStatus.code` is not an HTTP status code.
    #[error("{at}: HTTP status {code} is outside 100..=599")]
    BadHttpStatus {
        /// Field path.
        at: String,
        /// The code read.
        code: i64,
    },
    /// Fewer than the 5 bytes of a gRPC message prefix.
    #[error("gRPC frame: {len} bytes, shorter than the 5-byte message prefix")]
    FrameTooShort {
        /// Bytes available.
        len: usize,
    },
    /// The compressed flag is set.
    #[error(
        "gRPC frame: the message is compressed, which is not supported; the peer must not use grpc-encoding other than identity"
    )]
    Compressed,
    /// The compressed flag is neither 0 nor 1.
    #[error("gRPC frame: compressed flag is {flag}, expected 0")]
    BadFrameFlag {
        /// The flag byte read.
        flag: u8,
    },
    /// The prefix declares more bytes than follow it.
    #[error("gRPC frame: the prefix declares {declared} bytes but only {available} follow; the frame is truncated")]
    FrameTruncated {
        /// Length in the prefix.
        declared: u32,
        /// Bytes after the prefix.
        available: usize,
    },
    /// Bytes follow the declared message.
    #[error("gRPC frame: the prefix declares {declared} bytes but {available} follow; expected exactly one message")]
    FrameTrailing {
        /// Length in the prefix.
        declared: u32,
        /// Bytes after the prefix.
        available: usize,
    },
}

/// An ext_authz server's answer, as the sidecar applies it or as our check server sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckDecision {
    /// True when the request may proceed.
    pub allowed: bool,
    /// The HTTP status of the local reply to a denial (403, 429...); 200 when allowed, where it
    /// is not sent. 0 on a denial sends none, and Envoy then replies 403.
    pub http_status: u16,
    /// The body of the local reply to a denial; empty when allowed.
    pub body: String,
    /// When denied, headers of the local reply (`DeniedHttpResponse.headers`); when allowed,
    /// headers to set on the upstream request (`OkHttpResponse.headers`).
    pub headers: Vec<(String, String)>,
}

impl CheckDecision {
    /// Allows the request, adding no headers.
    pub fn allow() -> Self {
        Self {
            allowed: true,
            http_status: 200,
            body: String::new(),
            headers: Vec::new(),
        }
    }

    /// Denies the request with `http_status` and `body`.
    pub fn deny(http_status: u16, body: impl Into<String>) -> Self {
        Self {
            allowed: false,
            http_status,
            body: body.into(),
            headers: Vec::new(),
        }
    }
}

/// An allowed verdict allows; a denial answers 403 with the reason as body.
impl From<&Verdict> for CheckDecision {
    fn from(v: &Verdict) -> Self {
        if v.allowed {
            Self::allow()
        } else {
            Self::deny(DEFAULT_DENIED_STATUS, v.reason.as_ref())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Wire type of varint fields.
const VARINT: u8 = 0;
/// Wire type of 64-bit fields.
const I64: u8 = 1;
/// Wire type of length-delimited fields.
const LEN: u8 = 2;
/// Wire type of 32-bit fields.
const I32: u8 = 5;

/// Writes `v` as a varint into `buf`, returning the bytes used.
fn varint_into(buf: &mut [u8; 10], mut v: u64) -> usize {
    let mut n = 0;
    for slot in buf.iter_mut() {
        n += 1;
        if v < 0x80 {
            *slot = v as u8;
            break;
        }
        *slot = (v as u8) | 0x80;
        v >>= 7;
    }
    n
}

/// Appends `v` as a varint.
fn put_varint(out: &mut Vec<u8>, v: u64) {
    let mut buf = [0; 10];
    let n = varint_into(&mut buf, v);
    out.extend_from_slice(&buf[..n]);
}

/// Appends a field tag.
fn put_tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

/// Appends a `string` field, omitted when empty as proto3 does.
fn put_string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_tag(out, field, LEN);
        put_varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
}

/// Appends an unsigned varint field, omitted when 0 as proto3 does.
fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_tag(out, field, VARINT);
        put_varint(out, v);
    }
}

/// Appends an embedded message written by `body`, always present (even when empty).
fn put_message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    put_tag(out, field, LEN);
    let start = out.len();
    body(out);
    // The length is known only once the body is written: insert it before the body, which
    // moves the body once per nesting level (at most six here) instead of allocating.
    let mut prefix = [0; 10];
    let n = varint_into(&mut prefix, (out.len() - start) as u64);
    out.splice(start..start, prefix[..n].iter().copied());
}

/// Appends a map<string, string> entry (key = 1, value = 2) as field `field`.
fn put_entry(out: &mut Vec<u8>, field: u32, key: &str, value: &str) {
    put_message(out, field, |out| {
        put_string(out, 1, key);
        put_string(out, 2, value);
    });
}

/// Appends a `HeaderValueOption { header: HeaderValue { key, value } }` as field `field`.
fn put_header_option(out: &mut Vec<u8>, field: u32, key: &str, value: &str) {
    put_message(out, field, |out| put_entry(out, 1, key, value));
}

/// A port attribute as a port number; anything else is not sent.
fn port(value: Option<Cow<'_, str>>) -> Option<u16> {
    value.and_then(|v| v.parse().ok()).filter(|&p| p != 0)
}

/// Appends the fields of an `AttributeContext.Peer`.
fn put_peer(out: &mut Vec<u8>, ip: Option<&str>, port: Option<u16>, service: Option<&str>, principal: Option<&str>) {
    if ip.is_some() || port.is_some() {
        // Address { socket_address: SocketAddress { address, port_value } }
        put_message(out, 1, |out| {
            put_message(out, 1, |out| {
                put_string(out, 2, ip.unwrap_or_default());
                put_uint(out, 3, port.map_or(0, u64::from));
            })
        });
    }
    put_string(out, 2, service.unwrap_or_default());
    put_string(out, 4, principal.unwrap_or_default());
}

/// Appends the fields of an `AttributeContext.HttpRequest`.
fn put_http_request(out: &mut Vec<u8>, attrs: &dyn Attributes) {
    let method = attrs.get(&Attr::RequestMethod);
    let path = attrs.get(&Attr::RequestPath);
    let host = attrs.get(&Attr::RequestHost);
    let scheme = attrs.get(&Attr::RequestScheme);
    put_string(out, 2, method.as_deref().unwrap_or_default());
    // Envoy sends the pseudo-headers in the map too, and servers read them there: send each
    // once, preferring the request's own over one rebuilt from the dedicated attribute.
    let mut seen = [false; PSEUDO_HEADERS.len()];
    attrs.each_header(&mut |name, value| {
        if name.is_empty() {
            return;
        }
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        if let Some(i) = PSEUDO_HEADERS.iter().position(|p| *p == name) {
            if seen[i] {
                return;
            }
            seen[i] = true;
        }
        put_entry(out, 3, &name, value);
    });
    let rebuilt = [&host, &method, &path, &scheme];
    for ((name, value), seen) in PSEUDO_HEADERS.iter().zip(rebuilt).zip(seen) {
        if let Some(value) = value.as_deref().filter(|_| !seen) {
            put_entry(out, 3, name, value);
        }
    }
    put_string(out, 4, path.as_deref().unwrap_or_default());
    put_string(out, 5, host.as_deref().unwrap_or_default());
    put_string(out, 6, scheme.as_deref().unwrap_or_default());
}

/// Appends a `CheckRequest` for an HTTP request described by `attrs`.
///
/// Sends the source peer (`source.ip`, `source.port`, `source.principal`), the destination peer
/// (`destination.port` with no address, as the destination IP is not an attribute, and
/// `destination.service` as `Peer.service`), and the HTTP request: method, path with query,
/// host, scheme, and the headers from [`Attributes::each_header`] plus the `:authority`,
/// `:method`, `:path` and `:scheme` pseudo-headers as Envoy sends them, each once.
pub fn encode_check_request(attrs: &dyn Attributes, out: &mut Vec<u8>) {
    put_message(out, 1, |out| {
        let ip = attrs.get(&Attr::SourceIp);
        let source_port = port(attrs.get(&Attr::SourcePort));
        let principal = attrs.get(&Attr::SourcePrincipal);
        if ip.is_some() || source_port.is_some() || principal.is_some() {
            put_message(out, 1, |out| {
                put_peer(out, ip.as_deref(), source_port, None, principal.as_deref())
            });
        }
        let destination_port = port(attrs.get(&Attr::DestinationPort));
        let service = attrs.get(&Attr::DestinationService);
        if destination_port.is_some() || service.is_some() {
            put_message(out, 2, |out| {
                put_peer(out, None, destination_port, service.as_deref(), None)
            });
        }
        put_message(out, 4, |out| put_message(out, 2, |out| put_http_request(out, attrs)));
    });
}

/// Appends a `CheckResponse` carrying `decision`.
///
/// Allowed: `status {}` (code OK) and `ok_response { headers }`. Denied: `status { code, message:
/// body }` with `RESOURCE_EXHAUSTED` for 429 and `PERMISSION_DENIED` otherwise, and
/// `denied_response { status, headers, body }`.
pub fn encode_check_response(decision: &CheckDecision, out: &mut Vec<u8>) {
    if decision.allowed {
        put_message(out, 1, |_| {});
        put_message(out, 3, |out| {
            for (key, value) in &decision.headers {
                put_header_option(out, 2, key, value);
            }
        });
        return;
    }
    let code = if decision.http_status == 429 {
        RESOURCE_EXHAUSTED
    } else {
        PERMISSION_DENIED
    };
    put_message(out, 1, |out| {
        put_uint(out, 1, code);
        put_string(out, 2, &decision.body);
    });
    put_message(out, 2, |out| {
        if decision.http_status != 0 {
            put_message(out, 1, |out| put_uint(out, 1, u64::from(decision.http_status)));
        }
        for (key, value) in &decision.headers {
            put_header_option(out, 2, key, value);
        }
        put_string(out, 3, &decision.body);
    });
}

/// Appends `msg` as one uncompressed gRPC length-prefixed message.
///
/// # Panics
///
/// If `msg` is 4 GiB or longer, which gRPC cannot frame (its default limit is 4 MiB).
pub fn grpc_frame(msg: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(msg.len()).expect("a gRPC message is shorter than 4 GiB");
    out.reserve(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
}

/// The message inside `buf`, which must hold exactly one uncompressed gRPC message.
pub fn grpc_unframe(buf: &[u8]) -> Result<&[u8], ExtAuthzError> {
    let Some((&[flag, a, b, c, d], msg)) = buf.split_first_chunk::<5>() else {
        return Err(ExtAuthzError::FrameTooShort { len: buf.len() });
    };
    match flag {
        0 => {}
        1 => return Err(ExtAuthzError::Compressed),
        flag => return Err(ExtAuthzError::BadFrameFlag { flag }),
    }
    let declared = u32::from_be_bytes([a, b, c, d]);
    let available = msg.len();
    match u64::from(declared).cmp(&(available as u64)) {
        std::cmp::Ordering::Equal => Ok(msg),
        std::cmp::Ordering::Greater => Err(ExtAuthzError::FrameTruncated { declared, available }),
        std::cmp::Ordering::Less => Err(ExtAuthzError::FrameTrailing { declared, available }),
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Where a decoder is, for error messages: `CheckRequest.attributes.source.address`. Built on
/// the stack and printed only on error.
#[derive(Clone, Copy)]
struct Path<'p> {
    parent: Option<&'p Path<'p>>,
    name: &'static str,
}

impl Path<'static> {
    /// A top-level message.
    fn root(name: &'static str) -> Self {
        Path { parent: None, name }
    }
}

impl Path<'_> {
    /// A field of this message.
    fn child(&self, name: &'static str) -> Path<'_> {
        Path {
            parent: Some(self),
            name,
        }
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            write!(f, "{parent}.")?;
        }
        f.write_str(self.name)
    }
}

/// Why a varint could not be read.
enum VarintFault {
    Truncated,
    TooLong,
}

/// Reads a varint from the front of `buf`, advancing it.
fn read_varint(buf: &mut &[u8]) -> Result<u64, VarintFault> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some((&byte, rest)) = buf.split_first() else {
            return Err(VarintFault::Truncated);
        };
        *buf = rest;
        // The tenth byte holds only the 64th bit.
        if i == 9 && byte > 1 {
            return Err(VarintFault::TooLong);
        }
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err(VarintFault::TooLong)
}

/// A field's value, by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed,
    Bytes(&'a [u8]),
}

/// One field read from a message.
struct Field<'a> {
    number: u32,
    wire_type: u8,
    value: Value<'a>,
}

impl<'a> Field<'a> {
    /// The payload of a length-delimited field (string, bytes, message, map entry).
    fn bytes(&self, at: &Path<'_>) -> Result<&'a [u8], ExtAuthzError> {
        match self.value {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.wrong(at, "length-delimited")),
        }
    }

    /// A `string` field.
    fn str(&self, at: &Path<'_>) -> Result<&'a str, ExtAuthzError> {
        std::str::from_utf8(self.bytes(at)?).map_err(|_| ExtAuthzError::InvalidUtf8 { at: at.to_string() })
    }

    /// A varint field (int32, uint32, enum...).
    fn varint(&self, at: &Path<'_>) -> Result<u64, ExtAuthzError> {
        match self.value {
            Value::Varint(v) => Ok(v),
            _ => Err(self.wrong(at, "varint")),
        }
    }

    fn wrong(&self, at: &Path<'_>, expected: &'static str) -> ExtAuthzError {
        ExtAuthzError::WrongWireType {
            at: at.to_string(),
            expected,
            got: self.wire_type,
        }
    }
}

/// Reads the fields of one message, skipping none: callers ignore the numbers they do not know,
/// which skips unknown fields of every accepted wire type without descending into them.
struct Reader<'a, 'p> {
    buf: &'a [u8],
    at: &'p Path<'p>,
}

impl<'a, 'p> Reader<'a, 'p> {
    fn new(buf: &'a [u8], at: &'p Path<'p>) -> Self {
        Self { buf, at }
    }

    /// The next field, or `None` at the end of the message.
    fn next(&mut self) -> Result<Option<Field<'a>>, ExtAuthzError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let path = self.at;
        let tag = read_varint(&mut self.buf).map_err(|fault| varint_error(fault, path.to_string(), "a field tag"))?;
        let number = tag >> 3;
        let wire_type = (tag & 7) as u8;
        if number == 0 || number > MAX_FIELD_NUMBER {
            return Err(ExtAuthzError::BadFieldNumber {
                at: path.to_string(),
                number,
            });
        }
        let at = || format!("{path} field {number}");
        let value = match wire_type {
            VARINT => Value::Varint(read_varint(&mut self.buf).map_err(|fault| varint_error(fault, at(), "a varint"))?),
            I64 => self.skip(8, at, "a 64-bit value")?,
            I32 => self.skip(4, at, "a 32-bit value")?,
            LEN => {
                let len = read_varint(&mut self.buf).map_err(|fault| varint_error(fault, at(), "a length"))?;
                let remaining = self.buf.len();
                if len > remaining as u64 {
                    return Err(ExtAuthzError::LengthOverrun {
                        at: at(),
                        len,
                        remaining,
                    });
                }
                // `len` fits: it is at most `remaining`.
                let (payload, rest) = self.buf.split_at(len as usize);
                self.buf = rest;
                Value::Bytes(payload)
            }
            _ => return Err(ExtAuthzError::UnsupportedWireType { at: at(), wire_type }),
        };
        Ok(Some(Field {
            number: number as u32,
            wire_type,
            value,
        }))
    }

    /// Skips a fixed-width value.
    fn skip(&mut self, n: usize, at: impl FnOnce() -> String, what: &'static str) -> Result<Value<'a>, ExtAuthzError> {
        match self.buf.get(n..) {
            Some(rest) => {
                self.buf = rest;
                Ok(Value::Fixed)
            }
            None => Err(ExtAuthzError::Truncated { at: at(), what }),
        }
    }
}

/// The error for a varint that could not be read at `at`.
fn varint_error(fault: VarintFault, at: String, what: &'static str) -> ExtAuthzError {
    match fault {
        VarintFault::Truncated => ExtAuthzError::Truncated { at, what },
        VarintFault::TooLong => ExtAuthzError::VarintTooLong { at },
    }
}

/// A peer as decoded; proto3 empty values mean absent.
#[derive(Default)]
struct PeerDraft {
    ip: String,
    port: u32,
    service: String,
    principal: String,
    labels: Vec<(String, String)>,
}

/// A `CheckRequest` as decoded, before it becomes attributes.
#[derive(Default)]
struct RequestDraft {
    source: PeerDraft,
    destination: PeerDraft,
    method: String,
    path: String,
    host: String,
    scheme: String,
    /// `HttpRequest.headers`, a map: a repeated key replaces the earlier value.
    headers: Vec<(String, String)>,
    /// `HttpRequest.header_map`: repeated keys are separate headers.
    header_map: Vec<(String, String)>,
}

/// A `map<string, string>` entry.
fn decode_entry(buf: &[u8], at: &Path<'_>) -> Result<(String, String), ExtAuthzError> {
    let (mut key, mut value) = (String::new(), String::new());
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            1 => key = f.str(&at.child("key"))?.to_owned(),
            2 => value = f.str(&at.child("value"))?.to_owned(),
            _ => {}
        }
    }
    Ok((key, value))
}

/// A `HeaderValue`; `raw_value` (bytes) is read lossily, the last of `value`/`raw_value` wins.
fn decode_header_value(buf: &[u8], at: &Path<'_>, header: &mut (String, String)) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            1 => header.0 = f.str(&at.child("key"))?.to_owned(),
            2 => header.1 = f.str(&at.child("value"))?.to_owned(),
            3 => header.1 = String::from_utf8_lossy(f.bytes(&at.child("raw_value"))?).into_owned(),
            _ => {}
        }
    }
    Ok(())
}

/// A `HeaderMap`.
fn decode_header_map(buf: &[u8], at: &Path<'_>, out: &mut Vec<(String, String)>) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        if f.number == 1 {
            let at = at.child("headers");
            let mut header = Default::default();
            decode_header_value(f.bytes(&at)?, &at, &mut header)?;
            out.push(header);
        }
    }
    Ok(())
}

/// A `SocketAddress`.
fn decode_socket_address(buf: &[u8], at: &Path<'_>, peer: &mut PeerDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            2 => peer.ip = f.str(&at.child("address"))?.to_owned(),
            // uint32: a wider varint is truncated, as protobuf does.
            3 => peer.port = f.varint(&at.child("port_value"))? as u32,
            _ => {}
        }
    }
    Ok(())
}

/// An `Address`; pipes and internal addresses are skipped.
fn decode_address(buf: &[u8], at: &Path<'_>, peer: &mut PeerDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        if f.number == 1 {
            let at = at.child("socket_address");
            decode_socket_address(f.bytes(&at)?, &at, peer)?;
        }
    }
    Ok(())
}

/// An `AttributeContext.Peer`.
fn decode_peer(buf: &[u8], at: &Path<'_>, peer: &mut PeerDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                let at = at.child("address");
                decode_address(f.bytes(&at)?, &at, peer)?;
            }
            2 => peer.service = f.str(&at.child("service"))?.to_owned(),
            3 => {
                let at = at.child("labels");
                peer.labels.push(decode_entry(f.bytes(&at)?, &at)?);
            }
            4 => peer.principal = f.str(&at.child("principal"))?.to_owned(),
            _ => {}
        }
    }
    Ok(())
}

/// An `AttributeContext.HttpRequest`.
fn decode_http_request(buf: &[u8], at: &Path<'_>, d: &mut RequestDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            2 => d.method = f.str(&at.child("method"))?.to_owned(),
            3 => {
                let at = at.child("headers");
                d.headers.push(decode_entry(f.bytes(&at)?, &at)?);
            }
            4 => d.path = f.str(&at.child("path"))?.to_owned(),
            5 => d.host = f.str(&at.child("host"))?.to_owned(),
            6 => d.scheme = f.str(&at.child("scheme"))?.to_owned(),
            13 => {
                let at = at.child("header_map");
                decode_header_map(f.bytes(&at)?, &at, &mut d.header_map)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// An `AttributeContext.Request`.
fn decode_request(buf: &[u8], at: &Path<'_>, d: &mut RequestDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        if f.number == 2 {
            let at = at.child("http");
            decode_http_request(f.bytes(&at)?, &at, d)?;
        }
    }
    Ok(())
}

/// An `AttributeContext`.
fn decode_attribute_context(buf: &[u8], at: &Path<'_>, d: &mut RequestDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                let at = at.child("source");
                decode_peer(f.bytes(&at)?, &at, &mut d.source)?;
            }
            2 => {
                let at = at.child("destination");
                decode_peer(f.bytes(&at)?, &at, &mut d.destination)?;
            }
            4 => {
                let at = at.child("request");
                decode_request(f.bytes(&at)?, &at, d)?;
            }
            _ => {}
        }
    }
    Ok(())
}

impl RequestDraft {
    fn into_attributes(self) -> MapAttributes {
        let mut out = MapAttributes::new();
        let mut set = |attr: Attr, value: String| {
            if !value.is_empty() {
                out.insert(attr, value);
            }
        };
        let Self {
            source,
            destination,
            method,
            path,
            host,
            scheme,
            headers,
            header_map,
        } = self;
        set(Attr::SourceIp, source.ip);
        if source.port != 0 {
            set(Attr::SourcePort, source.port.to_string());
        }
        set(Attr::SourcePrincipal, source.principal);
        for (k, v) in source.labels {
            if !k.is_empty() {
                set(Attr::SourceLabel(k), v);
            }
        }
        if destination.port != 0 {
            set(Attr::DestinationPort, destination.port.to_string());
        }
        set(Attr::DestinationService, destination.service);
        for (k, v) in destination.labels {
            if !k.is_empty() {
                set(Attr::DestinationLabel(k), v);
            }
        }
        // Envoy fills `headers` unless told to encode raw headers, then only `header_map`,
        // where repeated names are separate entries: join them with `,` as Envoy does.
        let (list, join) = if headers.is_empty() {
            (header_map, true)
        } else {
            (headers, false)
        };
        let mut pseudo: [String; PSEUDO_HEADERS.len()] = Default::default();
        let mut regular: HashMap<String, String> = HashMap::new();
        for (name, value) in list {
            let name = name.to_ascii_lowercase();
            if let Some(i) = PSEUDO_HEADERS.iter().position(|p| *p == name) {
                pseudo[i] = value;
            } else if name.starts_with(':') || name.is_empty() {
                // `:protocol`, `:status`...: not request headers.
            } else if let (true, Some(prev)) = (join, regular.get_mut(&name)) {
                prev.push(',');
                prev.push_str(&value);
            } else {
                regular.insert(name, value);
            }
        }
        let [authority, pseudo_method, pseudo_path, pseudo_scheme] = pseudo;
        let or = |field: String, pseudo: String| if field.is_empty() { pseudo } else { field };
        set(Attr::RequestHost, or(host, authority));
        set(Attr::RequestMethod, or(method, pseudo_method));
        set(Attr::RequestPath, or(path, pseudo_path));
        set(Attr::RequestScheme, or(scheme, pseudo_scheme));
        for (name, value) in regular {
            // An empty header value is still a header.
            out.insert(Attr::RequestHeader(name), value);
        }
        out
    }
}

/// The attributes of the HTTP request in a `CheckRequest`, for a check server.
///
/// Maps back what [`encode_check_request`] sends (and what Envoy sends): source IP, port and
/// principal, source and destination labels, destination port and service (`Peer.service`),
/// method, path (query included), host, scheme, and the request headers lower-cased. The
/// `:authority`, `:method`, `:path` and `:scheme` pseudo-headers are not headers; they fill
/// host, method, path and scheme when the dedicated fields are empty. `header_map` is read when
/// `headers` is empty (Envoy's `encode_raw_headers`). Unknown fields are skipped.
pub fn decode_check_request(buf: &[u8]) -> Result<MapAttributes, ExtAuthzError> {
    let root = Path::root("CheckRequest");
    let mut draft = RequestDraft::default();
    let mut r = Reader::new(buf, &root);
    while let Some(f) = r.next()? {
        if f.number == 1 {
            let at = root.child("attributes");
            decode_attribute_context(f.bytes(&at)?, &at, &mut draft)?;
        }
    }
    Ok(draft.into_attributes())
}

/// The HTTP part of a denial as decoded.
#[derive(Default)]
struct DeniedDraft {
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: String,
}

/// The `http_response` oneof of a `CheckResponse`; the last member on the wire wins.
enum HttpResponse {
    None,
    Ok(Vec<(String, String)>),
    Denied(DeniedDraft),
    Error(DeniedDraft),
}

/// Repeated `HeaderValueOption`s are pushed to `out`; `append_action` and the rest are skipped.
fn decode_header_option(buf: &[u8], at: &Path<'_>, out: &mut Vec<(String, String)>) -> Result<(), ExtAuthzError> {
    let mut header = Default::default();
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        if f.number == 1 {
            let at = at.child("header");
            decode_header_value(f.bytes(&at)?, &at, &mut header)?;
        }
    }
    out.push(header);
    Ok(())
}

/// A `DeniedHttpResponse`.
fn decode_denied(buf: &[u8], at: &Path<'_>, d: &mut DeniedDraft) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                let at = at.child("status");
                let mut r = Reader::new(f.bytes(&at)?, &at);
                while let Some(f) = r.next()? {
                    if f.number == 1 {
                        let at = at.child("code");
                        // An enum is an int32 on the wire.
                        let code = f.varint(&at)? as i32;
                        d.status = match code {
                            0 => None,
                            100..=599 => Some(code as u16),
                            _ => {
                                return Err(ExtAuthzError::BadHttpStatus {
                                    at: at.to_string(),
                                    code: code.into(),
                                });
                            }
                        };
                    }
                }
            }
            2 => {
                let at = at.child("headers");
                decode_header_option(f.bytes(&at)?, &at, &mut d.headers)?;
            }
            3 => d.body = f.str(&at.child("body"))?.to_owned(),
            _ => {}
        }
    }
    Ok(())
}

/// An `OkHttpResponse`: only the headers to set upstream are read.
fn decode_ok(buf: &[u8], at: &Path<'_>, headers: &mut Vec<(String, String)>) -> Result<(), ExtAuthzError> {
    let mut r = Reader::new(buf, at);
    while let Some(f) = r.next()? {
        if f.number == 2 {
            let at = at.child("headers");
            decode_header_option(f.bytes(&at)?, &at, headers)?;
        }
    }
    Ok(())
}

/// The decision in a `CheckResponse`, for the sidecar as ext_authz client.
///
/// Allowed iff `status.code` is OK (0, also when `status` is absent). A denial takes its HTTP
/// status, headers and body from `denied_response` (or `error_response`), with 403 when no
/// status is given, as Envoy does. An allowed decision carries `ok_response.headers`.
pub fn decode_check_response(buf: &[u8]) -> Result<CheckDecision, ExtAuthzError> {
    let root = Path::root("CheckResponse");
    let mut code: i32 = 0;
    let mut http = HttpResponse::None;
    let mut r = Reader::new(buf, &root);
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                let at = root.child("status");
                let mut r = Reader::new(f.bytes(&at)?, &at);
                while let Some(f) = r.next()? {
                    if f.number == 1 {
                        // int32: a wider varint is truncated, as protobuf does.
                        code = f.varint(&at.child("code"))? as i32;
                    }
                }
            }
            2 => {
                let at = root.child("denied_response");
                let bytes = f.bytes(&at)?;
                if !matches!(http, HttpResponse::Denied(_)) {
                    http = HttpResponse::Denied(DeniedDraft::default());
                }
                if let HttpResponse::Denied(d) = &mut http {
                    decode_denied(bytes, &at, d)?;
                }
            }
            3 => {
                let at = root.child("ok_response");
                let bytes = f.bytes(&at)?;
                if !matches!(http, HttpResponse::Ok(_)) {
                    http = HttpResponse::Ok(Vec::new());
                }
                if let HttpResponse::Ok(headers) = &mut http {
                    decode_ok(bytes, &at, headers)?;
                }
            }
            5 => {
                let at = root.child("error_response");
                let bytes = f.bytes(&at)?;
                if !matches!(http, HttpResponse::Error(_)) {
                    http = HttpResponse::Error(DeniedDraft::default());
                }
                if let HttpResponse::Error(d) = &mut http {
                    decode_denied(bytes, &at, d)?;
                }
            }
            _ => {}
        }
    }
    if code == 0 {
        let mut decision = CheckDecision::allow();
        if let HttpResponse::Ok(headers) = http {
            decision.headers = headers;
        }
        return Ok(decision);
    }
    let denied = match http {
        HttpResponse::Denied(d) | HttpResponse::Error(d) => d,
        HttpResponse::None | HttpResponse::Ok(_) => DeniedDraft::default(),
    };
    Ok(CheckDecision {
        allowed: false,
        http_status: denied.status.unwrap_or(DEFAULT_DENIED_STATUS),
        body: denied.body,
        headers: denied.headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tag byte for fields 1..=15.
    fn tag(field: u8, wire_type: u8) -> u8 {
        assert!((1..16).contains(&field));
        (field << 3) | wire_type
    }

    /// A length-delimited field with a one- or two-byte length, assembled by hand.
    fn ld(field: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![tag(field, LEN)];
        if len < 0x80 {
            v.push(len as u8);
        } else {
            assert!(len < 0x4000);
            v.extend([(len & 0x7f) as u8 | 0x80, (len >> 7) as u8]);
        }
        v.extend_from_slice(payload);
        v
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn full_attrs() -> MapAttributes {
        MapAttributes::new()
            .with(Attr::SourceIp, "10.1.2.3")
            .with(Attr::SourcePort, "51234")
            .with(Attr::SourcePrincipal, "spiffe://cluster.local/ns/default/sa/sleep")
            .with(Attr::DestinationPort, "8080")
            .with(Attr::DestinationService, "reviews.default.svc.cluster.local")
            .with(Attr::RequestMethod, "POST")
            .with(Attr::RequestPath, "/api/v1/items?limit=10&x=%20")
            .with(Attr::RequestHost, "reviews:8080")
            .with(Attr::RequestScheme, "https")
            .with(Attr::RequestHeader("x-user".into()), "ann")
            .with(Attr::RequestHeader("content-type".into()), "application/json")
            .with(Attr::RequestHeader("x-empty".into()), "")
    }

    /// The `HttpRequest.headers` entries of an encoded `CheckRequest`, via the decoder's reader.
    fn sent_headers(buf: &[u8]) -> Vec<(String, String)> {
        fn only(buf: &[u8], number: u32) -> &[u8] {
            let root = Path::root("test");
            let mut r = Reader::new(buf, &root);
            while let Some(f) = r.next().unwrap() {
                if f.number == number {
                    return f.bytes(&root).unwrap();
                }
            }
            panic!("no field {number}");
        }
        let http = only(only(only(buf, 1), 4), 2);
        let root = Path::root("test");
        let mut r = Reader::new(http, &root);
        let mut out = Vec::new();
        while let Some(f) = r.next().unwrap() {
            if f.number == 3 {
                out.push(decode_entry(f.bytes(&root).unwrap(), &root).unwrap());
            }
        }
        out
    }

    #[test]
    fn request_round_trips_through_bytes() {
        let attrs = full_attrs();
        let mut buf = Vec::new();
        encode_check_request(&attrs, &mut buf);
        assert_eq!(decode_check_request(&buf).unwrap(), attrs);

        let empty = MapAttributes::new();
        buf.clear();
        encode_check_request(&empty, &mut buf);
        assert_eq!(decode_check_request(&buf).unwrap(), empty);
    }

    #[test]
    fn request_encoding_matches_hand_assembled_bytes() {
        // Only a destination port: no address is sent for the unknown destination IP.
        let attrs = MapAttributes::new().with(Attr::DestinationPort, "8080");
        let mut buf = Vec::new();
        encode_check_request(&attrs, &mut buf);
        let socket_address = [tag(3, VARINT), 0x90, 0x3f]; // port_value 8080
        let address = ld(1, &socket_address);
        let peer = ld(1, &address);
        let request = ld(4, &ld(2, &[]));
        let want = ld(1, &cat(&[&ld(2, &peer), &request]));
        assert_eq!(buf, want);
    }

    #[test]
    fn pseudo_headers_are_sent_once_as_envoy_does() {
        let attrs = full_attrs().with(Attr::RequestHeader(":path".into()), "/from-the-request");
        let mut buf = Vec::new();
        encode_check_request(&attrs, &mut buf);
        let headers = sent_headers(&buf);
        for name in PSEUDO_HEADERS {
            assert_eq!(
                headers.iter().filter(|(k, _)| k == name).count(),
                1,
                "{name} in {headers:?}"
            );
        }
        assert!(headers.contains(&(":path".into(), "/from-the-request".into())));
        assert!(headers.contains(&(":authority".into(), "reviews:8080".into())));
        assert!(headers.contains(&(":method".into(), "POST".into())));
        // The dedicated field still carries the attribute; the pseudo-header is not a header.
        let back = decode_check_request(&buf).unwrap();
        assert_eq!(
            back.get(&Attr::RequestPath).as_deref(),
            Some("/api/v1/items?limit=10&x=%20")
        );
        assert_eq!(back.get(&Attr::RequestHeader(":path".into())), None);
    }

    /// A `CheckRequest` as Envoy sends it with `encode_raw_headers`, holding unknown fields of
    /// every accepted wire type at several levels.
    fn envoy_like_request() -> Vec<u8> {
        let header = |k: &str, raw: &str| ld(1, &cat(&[&ld(1, k.as_bytes()), &ld(3, raw.as_bytes())]));
        let header_map = cat(&[
            &header(":authority", "svc.example:8000"),
            &header(":method", "GET"),
            &header(":path", "/a/b?c=d"),
            &header(":scheme", "http"),
            &header(":protocol", "websocket"),
            &header("X-User", "ann"),
            &header("x-user", "bob"),
            &ld(1, &ld(1, b"x-value-form")), // key only: an empty value
        ]);
        let http = cat(&[
            &ld(1, b"1234567890"),                   // id
            &[tag(9, VARINT), 0xd2, 0x09],           // size = 1234
            &ld(10, b"HTTP/1.1"),                    // protocol
            &[tag(14, I64), 1, 2, 3, 4, 5, 6, 7, 8], // unknown 64-bit
            &[tag(15, I32), 1, 2, 3, 4],             // unknown 32-bit
            &[0x80, 0x7d, 0x01],                     // unknown field 2000, varint 1
            &ld(13, &header_map),                    // header_map
        ]);
        let request = cat(&[
            &ld(1, &[tag(1, VARINT), 0xff, 0xff, 0xff, 0xff, 0x0f]), // time.seconds
            &ld(2, &http),
        ]);
        let source = cat(&[
            &ld(
                1,
                &ld(
                    1,
                    &cat(&[
                        &[tag(1, VARINT), 0],
                        &ld(2, b"192.0.2.7"),
                        &[tag(3, VARINT), 0xb9, 0x60],
                    ]),
                ),
            ),
            &ld(2, b"sleep"), // Peer.service of the source: no attribute
            &ld(3, &cat(&[&ld(1, b"app"), &ld(2, b"sleep")])),
            &ld(4, b"spiffe://td/ns/a/sa/sleep"),
            &ld(5, b"-----BEGIN%20CERTIFICATE-----"),
        ]);
        let destination = ld(1, &ld(1, &cat(&[&ld(2, b"10.0.0.1"), &[tag(3, VARINT), 0xc0, 0x3e]])));
        let attributes = cat(&[
            &ld(1, &source),
            &ld(2, &destination),
            &ld(4, &request),
            &ld(10, &cat(&[&ld(1, b"k"), &ld(2, b"v")])), // context_extensions
            &ld(11, &ld(1, &cat(&[&ld(1, b"ns"), &ld(2, &[])]))), // metadata_context
            &ld(12, &ld(1, b"svc.example")),              // tls_session.sni
            &ld(13, &[]),                                 // route_metadata_context
        ]);
        cat(&[&ld(1, &attributes), &[tag(7, I32), 0, 0, 0, 0]])
    }

    #[test]
    fn decodes_an_envoy_request_skipping_unknown_fields_and_reading_header_map() {
        let got = decode_check_request(&envoy_like_request()).unwrap();
        let want = MapAttributes::new()
            .with(Attr::SourceIp, "192.0.2.7")
            .with(Attr::SourcePort, "12345")
            .with(Attr::SourcePrincipal, "spiffe://td/ns/a/sa/sleep")
            .with(Attr::SourceLabel("app".into()), "sleep")
            .with(Attr::DestinationPort, "8000")
            .with(Attr::RequestHost, "svc.example:8000")
            .with(Attr::RequestMethod, "GET")
            .with(Attr::RequestPath, "/a/b?c=d")
            .with(Attr::RequestScheme, "http")
            .with(Attr::RequestHeader("x-user".into()), "ann,bob")
            .with(Attr::RequestHeader("x-value-form".into()), "");
        assert_eq!(got, want);
    }

    #[test]
    fn headers_map_wins_over_header_map_and_dedicated_fields_over_pseudo_headers() {
        let http = cat(&[
            &ld(2, b"PUT"),
            &ld(3, &cat(&[&ld(1, b":method"), &ld(2, b"GET")])),
            &ld(3, &cat(&[&ld(1, b"X-A"), &ld(2, b"1")])),
            &ld(3, &cat(&[&ld(1, b"x-a"), &ld(2, b"2")])), // a map: the last value wins
            &ld(13, &ld(1, &cat(&[&ld(1, b"x-b"), &ld(2, b"ignored")]))),
        ]);
        let buf = ld(1, &ld(4, &ld(2, &http)));
        let want = MapAttributes::new()
            .with(Attr::RequestMethod, "PUT")
            .with(Attr::RequestHeader("x-a".into()), "2");
        assert_eq!(decode_check_request(&buf).unwrap(), want);
    }

    #[test]
    fn repeated_messages_merge_as_protobuf_does() {
        let a = ld(1, &ld(1, &ld(4, b"spiffe://a")));
        let b = ld(1, &ld(4, &ld(2, &ld(2, b"GET"))));
        let got = decode_check_request(&cat(&[&a, &b])).unwrap();
        assert_eq!(got.get(&Attr::SourcePrincipal).as_deref(), Some("spiffe://a"));
        assert_eq!(got.get(&Attr::RequestMethod).as_deref(), Some("GET"));
    }

    #[test]
    fn malformed_requests_say_what_and_where() {
        let http = |payload: &[u8]| ld(1, &ld(4, &ld(2, payload)));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                http(&[tag(3, 3)]),
                "CheckRequest.attributes.request.http field 3: wire type 3 is not accepted",
            ),
            (http(&[tag(3, 4)]), "wire type 4 is not accepted"),
            (http(&[tag(3, 6)]), "wire type 6 is not accepted"),
            (http(&[tag(3, 7)]), "wire type 7 is not accepted"),
            (
                http(&[tag(2, VARINT), 1]),
                "CheckRequest.attributes.request.http.method: expected a length-delimited field, got wire type 0",
            ),
            (
                http(&ld(4, &[0xff, 0xfe])),
                "CheckRequest.attributes.request.http.path: string is not valid UTF-8",
            ),
            (
                http(&[tag(4, LEN), 5, b'/']),
                "CheckRequest.attributes.request.http field 4: the field declares 5 bytes but only 1 remain",
            ),
            (
                http(&[
                    tag(9, VARINT),
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0x01,
                ]),
                "field 9: varint longer than 10 bytes",
            ),
            (
                http(&[
                    tag(9, VARINT),
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0x02,
                ]),
                "varint longer than 10 bytes or over 64 bits",
            ),
            (http(&[tag(9, VARINT), 0x80]), "field 9: the input ends inside a varint"),
            (
                http(&[tag(9, I64), 0, 0]),
                "field 9: the input ends inside a 64-bit value",
            ),
            (
                http(&[tag(9, I32), 0, 0]),
                "field 9: the input ends inside a 32-bit value",
            ),
            (
                http(&[0x80]),
                "CheckRequest.attributes.request.http: the input ends inside a field tag",
            ),
            (http(&[0x00]), "field number 0 is outside"),
            (
                http(&[0x80, 0x80, 0x80, 0x80, 0x10]),
                "field number 536870912 is outside 1..=536870911",
            ),
            (
                ld(1, &ld(1, &ld(1, &ld(1, &[tag(3, LEN), 0])))),
                "CheckRequest.attributes.source.address.socket_address.port_value: expected a varint field",
            ),
        ];
        for (buf, want) in cases {
            let err = decode_check_request(&buf).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn every_prefix_and_corruption_decodes_or_errors_without_panicking() {
        let mut encoded = Vec::new();
        encode_check_request(&full_attrs(), &mut encoded);
        for full in [envoy_like_request(), encoded] {
            assert!(decode_check_request(&full).is_ok());
            let mut errors = 0;
            for cut in 0..full.len() {
                errors += usize::from(decode_check_request(&full[..cut]).is_err());
            }
            // Only cuts between top-level fields decode: the empty prefix, and for the Envoy-like
            // request the one before its trailing unknown field.
            assert!(errors >= full.len() - 2, "{errors} of {} prefixes failed", full.len());
            for i in 0..full.len() {
                let mut bad = full.clone();
                bad[i] ^= 0xff;
                let _ = decode_check_request(&bad);
                bad[i] = 0x80;
                let _ = decode_check_request(&bad);
            }
        }
    }

    #[test]
    fn decisions_round_trip_through_bytes() {
        let mut allow = CheckDecision::allow();
        allow.headers = vec![("x-auth-user".into(), "ann".into()), ("x-empty".into(), String::new())];
        let mut deny = CheckDecision::deny(403, "RBAC: access denied");
        deny.headers = vec![("www-authenticate".into(), "Bearer".into()), ("x-a".into(), "1".into())];
        let limited = CheckDecision::deny(429, "");
        let unauthorized = CheckDecision::deny(401, "who are you");
        for d in [CheckDecision::allow(), allow, deny, limited, unauthorized] {
            let mut buf = Vec::new();
            encode_check_response(&d, &mut buf);
            assert_eq!(decode_check_response(&buf).unwrap(), d);
        }
    }

    #[test]
    fn response_encoding_matches_hand_assembled_bytes() {
        let mut buf = Vec::new();
        encode_check_response(&CheckDecision::allow(), &mut buf);
        assert_eq!(buf, cat(&[&ld(1, &[]), &ld(3, &[])]));

        buf.clear();
        encode_check_response(&CheckDecision::deny(429, "slow"), &mut buf);
        let status = cat(&[&[tag(1, VARINT), 8], &ld(2, b"slow")]); // RESOURCE_EXHAUSTED
        let http_status = [tag(1, VARINT), 0xad, 0x03]; // 429
        let denied = cat(&[&ld(1, &http_status), &ld(3, b"slow")]);
        assert_eq!(buf, cat(&[&ld(1, &status), &ld(2, &denied)]));

        buf.clear();
        let mut d = CheckDecision::deny(403, "");
        d.headers.push(("k".into(), "v".into()));
        encode_check_response(&d, &mut buf);
        let option = ld(1, &cat(&[&ld(1, b"k"), &ld(2, b"v")]));
        let denied = cat(&[&ld(1, &[tag(1, VARINT), 0x93, 0x03]), &ld(2, &option)]);
        assert_eq!(buf, cat(&[&ld(1, &[tag(1, VARINT), 7]), &ld(2, &denied)]));
    }

    #[test]
    fn response_defaults_follow_proto3_and_envoy() {
        // No status at all: code 0, allowed.
        assert_eq!(decode_check_response(&[]).unwrap(), CheckDecision::allow());
        // A denial without denied_response: 403, no body.
        let buf = ld(1, &[tag(1, VARINT), 7]);
        assert_eq!(decode_check_response(&buf).unwrap(), CheckDecision::deny(403, ""));
        // UNAUTHENTICATED with a denied_response that names no status.
        let buf = cat(&[&ld(1, &[tag(1, VARINT), 16]), &ld(2, &ld(3, b"nope"))]);
        assert_eq!(decode_check_response(&buf).unwrap(), CheckDecision::deny(403, "nope"));
        // error_response is read like denied_response.
        let buf = cat(&[
            &ld(1, &[tag(1, VARINT), 13]),
            &ld(5, &ld(1, &[tag(1, VARINT), 0xf7, 0x03])),
        ]);
        assert_eq!(decode_check_response(&buf).unwrap(), CheckDecision::deny(503, ""));
        // OK status wins over a denied_response; unknown fields (dynamic_metadata) are skipped.
        let buf = cat(&[
            &ld(1, &[]),
            &ld(2, &ld(3, b"x")),
            &ld(4, &ld(1, &[])),
            &[tag(15, I64), 0, 0, 0, 0, 0, 0, 0, 0],
        ]);
        assert_eq!(decode_check_response(&buf).unwrap(), CheckDecision::allow());
        // A status code that is no HTTP status.
        let buf = cat(&[&ld(1, &[tag(1, VARINT), 7]), &ld(2, &ld(1, &[tag(1, VARINT), 0x63]))]);
        let err = decode_check_response(&buf).unwrap_err().to_string();
        assert_eq!(
            err,
            "CheckResponse.denied_response.status.code: HTTP status 99 is outside 100..=599"
        );
    }

    #[test]
    fn every_response_prefix_decodes_or_errors_without_panicking() {
        let mut d = CheckDecision::deny(429, "too many");
        d.headers.push(("retry-after".into(), "3".into()));
        let mut full = Vec::new();
        encode_check_response(&d, &mut full);
        assert_eq!(decode_check_response(&full).unwrap(), d);
        for cut in 0..full.len() {
            let _ = decode_check_response(&full[..cut]);
        }
    }

    #[test]
    fn verdicts_become_decisions() {
        let allowed = Verdict {
            allowed: true,
            reason: "ok".into(),
        };
        assert_eq!(CheckDecision::from(&allowed), CheckDecision::allow());
        let denied = Verdict {
            allowed: false,
            reason: "source.ip 10.0.0.1 is in the deny list".into(),
        };
        assert_eq!(
            CheckDecision::from(&denied),
            CheckDecision::deny(403, "source.ip 10.0.0.1 is in the deny list")
        );
    }

    #[test]
    fn grpc_frames_round_trip_and_bad_frames_are_errors() {
        for msg in [&b""[..], b"x", &[7; 300]] {
            let mut out = Vec::new();
            grpc_frame(msg, &mut out);
            assert_eq!(out.len(), msg.len() + 5);
            assert_eq!(&out[1..5], &(msg.len() as u32).to_be_bytes());
            assert_eq!(grpc_unframe(&out).unwrap(), msg);
        }
        for len in 0..5 {
            assert_eq!(grpc_unframe(&vec![0; len]), Err(ExtAuthzError::FrameTooShort { len }));
        }
        assert_eq!(grpc_unframe(&[1, 0, 0, 0, 0]), Err(ExtAuthzError::Compressed));
        assert!(
            grpc_unframe(&[1, 0, 0, 0, 1, 9])
                .unwrap_err()
                .to_string()
                .contains("compressed")
        );
        assert_eq!(
            grpc_unframe(&[2, 0, 0, 0, 0]),
            Err(ExtAuthzError::BadFrameFlag { flag: 2 })
        );
        assert_eq!(
            grpc_unframe(&[0, 0, 0, 0, 3, 1, 2]),
            Err(ExtAuthzError::FrameTruncated {
                declared: 3,
                available: 2
            })
        );
        assert_eq!(
            grpc_unframe(&[0, 0xff, 0xff, 0xff, 0xff]),
            Err(ExtAuthzError::FrameTruncated {
                declared: u32::MAX,
                available: 0
            })
        );
        assert_eq!(
            grpc_unframe(&[0, 0, 0, 0, 1, 1, 2]),
            Err(ExtAuthzError::FrameTrailing {
                declared: 1,
                available: 2
            })
        );
        assert_eq!(CHECK_PATH, "/envoy.service.auth.v3.Authorization/Check");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_check_request(&b);
            let _ = decode_check_response(&b);
            let _ = grpc_unframe(&b);
        }

        #[test]
        fn arbitrary_headers_round_trip(
            headers in proptest::collection::hash_map("[a-z0-9-]{1,12}", "[ -~]{0,24}", 0..12),
            path in "/[ -~]{0,40}",
        ) {
            let mut attrs = MapAttributes::new().with(Attr::RequestPath, path);
            for (k, v) in headers {
                attrs.insert(Attr::RequestHeader(k), v);
            }
            let mut buf = Vec::new();
            encode_check_request(&attrs, &mut buf);
            proptest::prop_assert_eq!(decode_check_request(&buf).unwrap(), attrs);
        }

        #[test]
        fn arbitrary_decisions_round_trip(
            allowed in proptest::bool::ANY,
            status in 100u16..600,
            body in "\\PC{0,40}",
            headers in proptest::collection::vec(("[a-z0-9-]{1,12}", "[ -~]{0,24}"), 0..6),
        ) {
            let mut d = if allowed { CheckDecision::allow() } else { CheckDecision::deny(status, body) };
            d.headers = headers;
            let mut buf = Vec::new();
            encode_check_response(&d, &mut buf);
            proptest::prop_assert_eq!(decode_check_response(&buf).unwrap(), d);
        }
    }
}

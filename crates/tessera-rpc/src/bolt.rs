//! SOFA Bolt, protocol codes 1 (v1) and 2 (v2). All integers are big-endian.
//!
//! ```text
//! v1 request  (22): proto=1 type cmdcode:2 ver2 id:4 codec timeout:4    classLen:2 headerLen:2 contentLen:4
//! v1 response (20): proto=1 type cmdcode:2 ver2 id:4 codec status:2     classLen:2 headerLen:2 contentLen:4
//! v2 request  (24): proto=2 ver1 type cmdcode:2 ver2 id:4 codec switch timeout:4 classLen headerLen contentLen
//! v2 response (22): proto=2 ver1 type cmdcode:2 ver2 id:4 codec switch status:2  classLen headerLen contentLen
//! then className, header, content, and (v2 with ver1 = 2 and switch bit 0 set) a CRC-32 of all
//! bytes before it.
//! ```
//! type: 0 response, 1 request, 2 one-way request; cmdcode: 0 heartbeat, 1 request, 2 response.
//! The header is a run of `int32 len, key, int32 len, value` (UTF-8; a value length of -1 is a
//! null, which sofa-bolt-node writes). SOFARPC's `service` header carries the target service
//! unique name `interface:version[:uniqueId]`; Hessian clients other than anthunder send no method
//! header, so the method may have to come from the `SofaRequest` body (its `methodName` field).
//!
//! Error replies: a response with a status from [`failure_status`] and, like sofa-bolt's own
//! `createExceptionResponse`, an `RpcServerException` body carrying the message. sofa-bolt-node
//! ignores the class name of a non-success response and reads the content as an exception
//! object (a SofaResponse there would surface as "[object Object]", an empty content as a generic
//! "Server exception" text), so the object has the `detailMessage` and `stackTrace` fields that
//! make hessian.js turn it into an `Error` with our message. It is written in the dialect of the
//! request body (draft unless the client sent final-dialect Hessian).

use std::borrow::Cow;
use std::ops::Range;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::hessian::{Dialect, Reader, Writer};
use crate::{Codec, CodecError, Detect, Failure, Frame, Kind, Limits, Need, Protocol, RouteKeys};

/// The Bolt codec, for both protocol versions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bolt;

/// Serializer code for Hessian 2 (`SerializerManager.Hessian2`).
pub const HESSIAN2: u8 = 1;
/// Serializer code for protobuf, as sofa-bolt-node and anthunder use it.
pub const PROTOBUF: u8 = 11;

/// The class name of a SOFARPC request.
pub const SOFA_REQUEST: &str = "com.alipay.sofa.rpc.core.request.SofaRequest";
/// The class name of a SOFARPC response.
pub const SOFA_RESPONSE: &str = "com.alipay.sofa.rpc.core.response.SofaResponse";
/// The class name of the exception sofa-bolt servers answer errors with.
pub const RPC_SERVER_EXCEPTION: &str = "com.alipay.remoting.rpc.exception.RpcServerException";

/// Response status `SUCCESS`.
pub const STATUS_SUCCESS: u16 = 0x0000;
/// Response status `SERVER_EXCEPTION`.
pub const STATUS_SERVER_EXCEPTION: u16 = 0x0002;
/// Response status `SERVER_THREADPOOL_BUSY`.
pub const STATUS_SERVER_THREADPOOL_BUSY: u16 = 0x0004;
/// Response status `NO_PROCESSOR`.
pub const STATUS_NO_PROCESSOR: u16 = 0x0006;
/// Response status `TIMEOUT`.
pub const STATUS_TIMEOUT: u16 = 0x0007;
/// Response status `CONNECTION_CLOSED` (the codes are hex: it follows 0x0009).
pub const STATUS_CONNECTION_CLOSED: u16 = 0x0010;

/// The response status that reports `failure`. No route, no healthy upstream, overflow and timeout
/// are MOSN's choices. The Java client (sofa-bolt `RpcResponseResolver`, then SOFARPC's
/// `BoltClientTransport`) turns `TIMEOUT` into a client timeout and `SERVER_THREADPOOL_BUSY` into
/// `SERVER_BUSY`, the two errors SOFARPC's failover retries; `CONNECTION_CLOSED` into a client
/// network error; `NO_PROCESSOR` into a generic `InvokeException` naming the status; and
/// `SERVER_EXCEPTION` into an `InvokeServerException` whose cause is our `RpcServerException`, the
/// one status that shows Java users the message, so denials and internal faults use it.
pub fn failure_status(failure: Failure) -> u16 {
    match failure {
        Failure::NoRoute => STATUS_NO_PROCESSOR,
        Failure::Unavailable => STATUS_CONNECTION_CLOSED,
        Failure::Timeout => STATUS_TIMEOUT,
        Failure::Overflow | Failure::RateLimited => STATUS_SERVER_THREADPOOL_BUSY,
        Failure::Denied | Failure::Internal => STATUS_SERVER_EXCEPTION,
    }
}

/// A Bolt frame to encode, for replies the sidecar makes itself and for tests, benches and tools.
/// Start from [`Message::new`] and override fields with struct update syntax.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// [`Protocol::BoltV2`] for v2; anything else encodes v1.
    pub protocol: Protocol,
    /// The command: request, one-way, response, heartbeat or heartbeat ack.
    pub kind: Kind,
    /// The request id.
    pub id: u32,
    /// v2 only: the protocol version (`ver1`); the CRC needs 2.
    pub version: u8,
    /// v2 only: the switch byte; bit 0 turns the CRC on (with `version` 2).
    pub switch: u8,
    /// The serializer code ([`HESSIAN2`], [`PROTOBUF`]).
    pub codec: u8,
    /// Requests: the timeout in milliseconds (-1 or 0 for none).
    pub timeout_ms: i32,
    /// Responses: the status.
    pub status: u16,
    /// The class name (under 64 KiB).
    pub class: &'a [u8],
    /// The header map (under 64 KiB encoded).
    pub headers: &'a [(&'a str, &'a str)],
    /// The content, serialized with `codec`.
    pub content: &'a [u8],
}

impl<'a> Message<'a> {
    /// A frame with no class, header or content: Hessian, no timeout, status success, and for v2
    /// protocol version 2 with the CRC on.
    pub fn new(protocol: Protocol, kind: Kind, id: u32) -> Message<'a> {
        Message {
            protocol,
            kind,
            id,
            version: 2,
            switch: 1,
            codec: HESSIAN2,
            timeout_ms: -1,
            status: STATUS_SUCCESS,
            class: b"",
            headers: &[],
            content: b"",
        }
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Bytes {
        let v2 = self.protocol == Protocol::BoltV2;
        let (ty, cmd) = match self.kind {
            Kind::Request => (1, 1),
            Kind::OneWay => (2, 1),
            Kind::Heartbeat => (1, 0),
            Kind::Response => (0, 2),
            Kind::HeartbeatReply => (0, 0),
        };
        let header_len: usize = self.headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = BytesMut::with_capacity(28 + self.class.len() + header_len + self.content.len());
        if v2 {
            out.put_u8(2);
            out.put_u8(self.version);
        } else {
            out.put_u8(1);
        }
        out.put_u8(ty);
        out.put_u16(cmd);
        out.put_u8(1); // ver2, the command version
        out.put_u32(self.id);
        out.put_u8(self.codec);
        if v2 {
            out.put_u8(self.switch);
        }
        if ty == 0 {
            out.put_u16(self.status);
        } else {
            out.put_i32(self.timeout_ms);
        }
        out.put_u16(self.class.len() as u16);
        out.put_u16(header_len as u16);
        out.put_u32(self.content.len() as u32);
        out.put_slice(self.class);
        for (k, v) in self.headers {
            out.put_u32(k.len() as u32);
            out.put_slice(k.as_bytes());
            out.put_u32(v.len() as u32);
            out.put_slice(v.as_bytes());
        }
        out.put_slice(self.content);
        if v2 && self.version == 2 && self.switch & 1 != 0 {
            out.put_u32(crc32(&out));
        }
        out.freeze()
    }
}

/// A `SofaRequest` object as SOFARPC writes it (`methodName`, `methodArgSigs`,
/// `targetServiceUniqueName`, `targetAppName` null, `requestProps` null). The arguments follow it
/// in the content as separate Hessian values; append them to the result.
pub fn sofa_request_body(dialect: Dialect, service: &str, method: &str, arg_types: &[&str]) -> Vec<u8> {
    let fields = [
        "methodName",
        "methodArgSigs",
        "targetServiceUniqueName",
        "targetAppName",
        "requestProps",
    ];
    let mut w = Writer::new(dialect);
    w.object(SOFA_REQUEST, &fields)
        .string(method)
        .string_list("[java.lang.String", arg_types)
        .string(service)
        .null()
        .null();
    w.into_vec()
}

/// The fixed part of a frame and where its parts lie.
#[derive(Debug, Clone, Copy)]
struct Head {
    protocol: Protocol,
    version: u8,
    kind: Kind,
    codec: u8,
    switch: u8,
    id: u32,
    /// Requests: the timeout; responses: the status.
    timeout_or_status: i32,
    fixed: usize,
    class_len: usize,
    header_len: usize,
    content_len: usize,
    crc: bool,
}

impl Head {
    /// The head at the start of `b`; `None` when more bytes are needed to read it.
    fn parse(b: &[u8]) -> Result<Option<Head>, CodecError> {
        let protocol = match b.first() {
            None => return Ok(None),
            Some(1) => Protocol::BoltV1,
            Some(2) => Protocol::BoltV2,
            Some(p) => return Err(CodecError::NotThisProtocol("bolt", format!("protocol code {p}"))),
        };
        let o = usize::from(protocol == Protocol::BoltV2);
        let version = match (o, b.get(1)) {
            (0, _) => 1,
            (_, None) => return Ok(None),
            (_, Some(&v @ (1 | 2))) => v,
            (_, Some(v)) => return Err(malformed(format!("protocol version {v}"))),
        };
        let Some(&ty) = b.get(1 + o) else { return Ok(None) };
        let fixed = match ty {
            0 => 20 + 2 * o,
            1 | 2 => 22 + 2 * o,
            _ => return Err(malformed(format!("command type {ty}"))),
        };
        let Some(b) = b.get(..fixed) else { return Ok(None) };
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let i32_at = |i: usize| i32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let cmd = u16_at(2 + o);
        let kind = match (ty, cmd) {
            (0, 0) => Kind::HeartbeatReply,
            (0, 2) => Kind::Response,
            (1 | 2, 0) => Kind::Heartbeat,
            (1, 1) => Kind::Request,
            (2, 1) => Kind::OneWay,
            _ => return Err(malformed(format!("command type {ty} with command code {cmd}"))),
        };
        let switch = if o == 1 { b[11] } else { 0 };
        let timeout_or_status = if ty == 0 {
            i32::from(u16_at(10 + 2 * o))
        } else {
            i32_at(10 + 2 * o)
        };
        let content_len = i32_at(fixed - 4);
        Ok(Some(Head {
            protocol,
            version,
            kind,
            codec: b[9 + o],
            switch,
            id: i32_at(5 + o) as u32,
            timeout_or_status,
            fixed,
            class_len: usize::from(u16_at(fixed - 8)),
            header_len: usize::from(u16_at(fixed - 6)),
            content_len: usize::try_from(content_len)
                .map_err(|_| malformed(format!("negative content length {content_len}")))?,
            crc: o == 1 && version == 2 && switch & 1 != 0,
        }))
    }

    /// The whole frame's length, CRC included.
    fn len(&self) -> usize {
        let crc = if self.crc { 4 } else { 0 };
        self.fixed + self.class_len + self.header_len + self.content_len + crc
    }

    fn id_at(&self) -> usize {
        if self.protocol == Protocol::BoltV2 { 6 } else { 5 }
    }

    fn class(&self) -> Range<usize> {
        self.fixed..self.fixed + self.class_len
    }

    fn header(&self) -> Range<usize> {
        let start = self.class().end;
        start..start + self.header_len
    }

    fn content(&self) -> Range<usize> {
        let start = self.header().end;
        start..start + self.content_len
    }

    fn is_response(&self) -> bool {
        matches!(self.kind, Kind::Response | Kind::HeartbeatReply)
    }
}

/// The head of a whole frame (as [`Frame::raw`] holds).
fn whole(raw: &[u8]) -> Result<Head, CodecError> {
    match Head::parse(raw)? {
        Some(h) if raw.len() >= h.len() => Ok(h),
        _ => Err(malformed("truncated frame".to_string())),
    }
}

fn malformed(why: String) -> CodecError {
    CodecError::Malformed { protocol: "bolt", why }
}

impl Codec for Bolt {
    fn name(&self) -> &'static str {
        "bolt"
    }

    fn detect(&self, first: &[u8]) -> Detect {
        let o = match first.first() {
            None => return Detect::NeedMore,
            Some(1) => 0,
            Some(2) => 1,
            Some(_) => return Detect::No,
        };
        if o == 1 && first.get(1).is_some_and(|v| !matches!(v, 1 | 2)) {
            return Detect::No;
        }
        let Some(&[ty, c0, c1]) = first.get(1 + o..4 + o) else {
            return Detect::NeedMore;
        };
        match (ty, u16::from_be_bytes([c0, c1])) {
            (0, 0 | 2) | (1 | 2, 0 | 1) => Detect::Yes,
            _ => Detect::No,
        }
    }

    fn decode(&self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, CodecError> {
        let Some(head) = Head::parse(buf)? else { return Ok(None) };
        let len = head.len();
        if len > limits.max_frame {
            return Err(CodecError::TooLarge {
                what: "bolt frame",
                len,
                limit: limits.max_frame,
            });
        }
        let Some(bytes) = buf.get(..len) else { return Ok(None) };
        if head.crc {
            let (data, trailer) = bytes.split_at(len - 4);
            let (sent, computed) = (
                u32::from_be_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]),
                crc32(data),
            );
            if sent != computed {
                return Err(malformed(format!(
                    "CRC32 trailer {sent:08x}, frame's CRC32 {computed:08x}"
                )));
            }
        }
        let timeout = (!head.is_response() && head.timeout_or_status > 0)
            .then(|| Duration::from_millis(head.timeout_or_status as u64));
        Ok(Some(Frame {
            protocol: head.protocol,
            kind: head.kind,
            request_id: u64::from(head.id),
            timeout,
            status: head.is_response().then_some(head.timeout_or_status as u16),
            raw: buf.split_to(len),
        }))
    }

    fn set_request_id(&self, frame: &mut Frame, id: u64) {
        let id = id as u32;
        frame.request_id = u64::from(id);
        let Ok(head) = whole(&frame.raw) else { return };
        let at = head.id_at();
        frame.raw[at..at + 4].copy_from_slice(&id.to_be_bytes());
        if head.crc {
            let end = head.len() - 4;
            let crc = crc32(&frame.raw[..end]);
            frame.raw[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        }
    }

    fn route_keys<'a>(&self, frame: &'a Frame, need: Need, limits: &Limits) -> Result<RouteKeys<'a>, CodecError> {
        let head = whole(&frame.raw)?;
        if matches!(head.kind, Kind::Heartbeat | Kind::HeartbeatReply) {
            return Ok(RouteKeys::default());
        }
        let raw: &'a [u8] = &frame.raw;
        let headers = header_map(&raw[head.header()], limits.max_headers)?;
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut service = header("service")
            .or_else(|| header("sofa_head_target_service"))
            .unwrap_or_default();
        let mut method = header("sofa_head_method_name").unwrap_or_default();
        let sofa_request = &raw[head.class()] == SOFA_REQUEST.as_bytes();
        if need.body && (method.is_empty() || service.is_empty()) && sofa_request && !head.is_response() {
            if head.codec != HESSIAN2 {
                return Err(CodecError::Serialization {
                    protocol: "bolt",
                    id: head.codec,
                });
            }
            let [body_method, body_service] = sofa_request_fields(&raw[head.content()])?;
            if method.is_empty() {
                method = body_method.unwrap_or_default();
            }
            if service.is_empty() {
                service = body_service.unwrap_or_default();
            }
        }
        // version and group are parts of `service`: borrowed when it is.
        let part = |i: usize| -> Cow<'a, str> {
            match &service {
                Cow::Borrowed(s) => Cow::Borrowed(s.splitn(3, ':').nth(i).unwrap_or_default()),
                Cow::Owned(s) => Cow::Owned(s.splitn(3, ':').nth(i).unwrap_or_default().to_owned()),
            }
        };
        let (version, group) = (part(1), part(2));
        Ok(RouteKeys {
            service,
            method,
            version,
            group,
            headers,
            timeout: None,
        })
    }

    fn error_response(&self, request: &Frame, failure: Failure, message: &str) -> Bytes {
        let head = whole(&request.raw).ok();
        let content = head.and_then(|h| request.raw.get(h.content())).unwrap_or_default();
        let codec = head.map_or(HESSIAN2, |h| h.codec);
        let body = match codec {
            HESSIAN2 => server_exception(body_dialect(content), message),
            PROTOBUF => message.as_bytes().to_vec(),
            _ => Vec::new(),
        };
        let class = if body.is_empty() { "" } else { RPC_SERVER_EXCEPTION };
        Message {
            version: head.map_or(2, |h| h.version),
            switch: head.map_or(0, |h| h.switch),
            codec,
            status: failure_status(failure),
            class: class.as_bytes(),
            content: &body,
            ..Message::new(request.protocol, Kind::Response, request.request_id as u32)
        }
        .encode()
    }

    fn heartbeat_reply(&self, heartbeat: &Frame) -> Bytes {
        let head = whole(&heartbeat.raw).ok();
        Message {
            version: head.map_or(2, |h| h.version),
            switch: head.map_or(0, |h| h.switch),
            codec: head.map_or(HESSIAN2, |h| h.codec),
            ..Message::new(heartbeat.protocol, Kind::HeartbeatReply, heartbeat.request_id as u32)
        }
        .encode()
    }

    fn heartbeat(&self, protocol: Protocol, id: u64) -> Bytes {
        Message::new(protocol, Kind::Heartbeat, id as u32).encode()
    }
}

/// The Hessian dialect of a request body: a `SofaRequest` starts with its class definition, `C`
/// in the final dialect and `O` in the draft one, SOFA's default.
fn body_dialect(content: &[u8]) -> Dialect {
    if content.first() == Some(&b'C') {
        Dialect::Final
    } else {
        Dialect::Draft
    }
}

/// `methodName` and `targetServiceUniqueName` of a `SofaRequest` body.
fn sofa_request_fields(content: &[u8]) -> Result<[Option<Cow<'_, str>>; 2], CodecError> {
    match content.first() {
        None => return Ok([None, None]),
        Some(b'C' | b'O') => {}
        Some(b) => {
            return Err(malformed(format!(
                "SofaRequest body starts with 0x{b:02x}, not a class definition"
            )));
        }
    }
    let fields = Reader::new(content, body_dialect(content))
        .read_object_strs(&["methodName", "targetServiceUniqueName"])
        .map_err(|e| malformed(e.to_string()))?;
    let mut fields = fields.into_iter();
    Ok([fields.next().flatten(), fields.next().flatten()])
}

/// An `RpcServerException` with the `Throwable` fields Java and hessian.js read: `detailMessage`,
/// `cause` (null) and `stackTrace` (empty).
fn server_exception(dialect: Dialect, message: &str) -> Vec<u8> {
    let mut w = Writer::new(dialect);
    w.object(RPC_SERVER_EXCEPTION, &["detailMessage", "cause", "stackTrace"])
        .string(message)
        .null()
        .string_list("[java.lang.StackTraceElement", &[]);
    w.into_vec()
}

/// The header map: `int32 len, key, int32 len, value` until the bytes run out. Entries with a
/// null (-1) key or value are left out; reading stops after `max` entries.
type HeaderMap<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

fn header_map(mut b: &[u8], max: usize) -> Result<HeaderMap<'_>, CodecError> {
    fn field<'a>(b: &mut &'a [u8]) -> Result<Option<&'a [u8]>, CodecError> {
        let Some((len, rest)) = b.split_first_chunk::<4>() else {
            return Err(malformed("truncated header map".to_string()));
        };
        let len = i32::from_be_bytes(*len);
        if len == -1 {
            *b = rest;
            return Ok(None);
        }
        let value = usize::try_from(len).ok().and_then(|n| rest.get(..n));
        let value =
            value.ok_or_else(|| malformed(format!("header field length {len} with {} bytes left", rest.len())))?;
        *b = &rest[value.len()..];
        Ok(Some(value))
    }
    let mut out = Vec::new();
    while !b.is_empty() && out.len() < max {
        let key = field(&mut b)?;
        let value = field(&mut b)?;
        if let (Some(k), Some(v)) = (key, value) {
            out.push((String::from_utf8_lossy(k), String::from_utf8_lossy(v)));
        }
    }
    Ok(out)
}

/// CRC-32 (IEEE 802.3, as `java.util.zip.CRC32`), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data
        .iter()
        .fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_java() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn header_map_nulls_and_truncation() {
        let mut b = Vec::new();
        for (k, v) in [(&b"a"[..], 1i32), (b"b", -1), (b"c", 0)] {
            b.extend_from_slice(&(k.len() as i32).to_be_bytes());
            b.extend_from_slice(k);
            b.extend_from_slice(&v.to_be_bytes());
            b.extend(std::iter::repeat_n(b'x', v.max(0) as usize));
        }
        let map = header_map(&b, 10).unwrap();
        assert_eq!(map, [("a".into(), "x".into()), ("c".into(), Cow::Borrowed(""))]);
        assert_eq!(header_map(&b, 1).unwrap().len(), 1);
        assert!(header_map(&b[..b.len() - 1], 10).is_err());
        assert!(header_map(&[0, 0, 0, 5, b'a'], 10).is_err());
        assert!(header_map(&[0xff, 0xff, 0xff, 0xfe], 10).is_err());
    }

    #[test]
    fn failure_statuses() {
        assert_eq!(failure_status(Failure::NoRoute), 0x0006);
        assert_eq!(failure_status(Failure::Unavailable), 0x0010);
        assert_eq!(failure_status(Failure::Timeout), 0x0007);
        assert_eq!(failure_status(Failure::Overflow), 0x0004);
        assert_eq!(failure_status(Failure::RateLimited), 0x0004);
        assert_eq!(failure_status(Failure::Denied), 0x0002);
        assert_eq!(failure_status(Failure::Internal), 0x0002);
    }
}

//! Dubbo 2 (the `dubbo` protocol). A 16-byte header, big-endian:
//!
//! ```text
//! magic 0xdabb : 2 | flag : 1 | status : 1 | request id : 8 | body length : 4 | body
//! flag = 0x80 request | 0x40 two-way | 0x20 event | serialization id (& 0x1f, 2 = hessian2)
//! ```
//! An event request is a heartbeat (its body a serialized null, Hessian `N`); Java answers it with
//! the same id, flag `serialization | event`, status 20 and body `N`.
//!
//! A hessian2 request body is a run of top-level values with no envelope: the Dubbo version, the
//! service path, the service version (may be null), the method, the parameter descriptor (JVM
//! style, `Ljava/lang/String;I[J`), one value per parameter, then the attachments map (`path`,
//! `interface`, `version`, `group`, `timeout`, user keys). Service, version and method come from
//! the first values alone; the attachments (and so the group and the timeout) need the arguments
//! skipped, which is only done when the caller asks for the body.
//!
//! A response whose status is not 20 carries one Hessian string, the error message.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::hessian::{Dialect, Reader, Writer};
use crate::{Codec, CodecError, Detect, Failure, Frame, Kind, Limits, Need, Protocol, RouteKeys};

/// The Dubbo codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dubbo;

const MAGIC: [u8; 2] = [0xda, 0xbb];
const HEADER: usize = 16;

/// Flag bit: a request.
pub const FLAG_REQUEST: u8 = 0x80;
/// Flag bit: the request expects a response.
pub const FLAG_TWOWAY: u8 = 0x40;
/// Flag bit: an event (heartbeat).
pub const FLAG_EVENT: u8 = 0x20;
/// Mask of the serialization id in the flag.
pub const SERIALIZATION_MASK: u8 = 0x1f;
/// Serialization id of hessian2, the only one whose bodies this codec reads.
pub const HESSIAN2: u8 = 2;

/// Response status OK.
pub const STATUS_OK: u8 = 20;
/// Response status SERVER_TIMEOUT.
pub const STATUS_SERVER_TIMEOUT: u8 = 31;
/// Response status BAD_REQUEST.
pub const STATUS_BAD_REQUEST: u8 = 40;
/// Response status SERVICE_NOT_FOUND.
pub const STATUS_SERVICE_NOT_FOUND: u8 = 60;
/// Response status SERVER_ERROR.
pub const STATUS_SERVER_ERROR: u8 = 80;
/// Response status SERVER_THREADPOOL_EXHAUSTED_ERROR.
pub const STATUS_SERVER_THREADPOOL_EXHAUSTED: u8 = 100;

/// The response status that reports `failure`. Java's `DefaultFuture` turns 30/31 into a
/// `TimeoutException` and every other non-OK status into a `RemotingException` with the body's
/// message; the failover cluster retries both. So the status mostly tells people what happened:
/// no route is SERVICE_NOT_FOUND, a refused request (breaker, queue, rate limit) is
/// SERVER_THREADPOOL_EXHAUSTED, a policy denial is BAD_REQUEST, and no healthy or reachable
/// upstream, like any other sidecar fault, is SERVER_ERROR (as Envoy's dubbo proxy answers it).
pub fn failure_status(failure: Failure) -> u8 {
    match failure {
        Failure::NoRoute => STATUS_SERVICE_NOT_FOUND,
        Failure::Timeout => STATUS_SERVER_TIMEOUT,
        Failure::Overflow | Failure::RateLimited => STATUS_SERVER_THREADPOOL_EXHAUSTED,
        Failure::Denied => STATUS_BAD_REQUEST,
        Failure::Unavailable | Failure::Internal => STATUS_SERVER_ERROR,
    }
}

/// A hessian2 request to encode, for tests, benches and tools.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request id.
    pub id: u64,
    /// The Dubbo framework version (`2.0.2`).
    pub dubbo_version: &'a str,
    /// The service path (the interface).
    pub path: &'a str,
    /// The service version; empty writes a null.
    pub version: &'a str,
    /// The method.
    pub method: &'a str,
    /// The JVM parameter descriptor (`Ljava/lang/String;I`).
    pub descriptor: &'a str,
    /// The arguments, already Hessian-encoded, one value per parameter.
    pub args: &'a [u8],
    /// The attachments.
    pub attachments: &'a [(&'a str, &'a str)],
    /// Whether a response is expected.
    pub twoway: bool,
}

impl Request<'_> {
    /// The frame's bytes.
    pub fn encode(&self) -> Bytes {
        let mut w = Writer::new(Dialect::Final);
        w.string(self.dubbo_version).string(self.path);
        if self.version.is_empty() {
            w.null();
        } else {
            w.string(self.version);
        }
        w.string(self.method)
            .string(self.descriptor)
            .raw(self.args)
            .string_map(self.attachments);
        let twoway = if self.twoway { FLAG_TWOWAY } else { 0 };
        frame(FLAG_REQUEST | twoway | HESSIAN2, 0, self.id, &w.into_vec())
    }
}

/// A hessian2 response with `status` and an already-encoded body (for status 20, an int flag
/// such as 1 "value" then the value; otherwise the error message as a string).
pub fn encode_response(id: u64, status: u8, body: &[u8]) -> Bytes {
    frame(HESSIAN2, status, id, body)
}

fn frame(flag: u8, status: u8, id: u64, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER + body.len());
    out.put_slice(&MAGIC);
    out.put_u8(flag);
    out.put_u8(status);
    out.put_u64(id);
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    out.freeze()
}

fn malformed(why: String) -> CodecError {
    CodecError::Malformed { protocol: "dubbo", why }
}

fn hessian(e: crate::hessian::HessianError) -> CodecError {
    malformed(e.to_string())
}

/// The number of parameters in a JVM descriptor: one per primitive letter and per `L…;`, with
/// array prefixes `[` not counted (MOSN's `getArgumentCount`).
fn parameter_count(descriptor: &str) -> Result<usize, CodecError> {
    let mut n = 0;
    let mut chars = descriptor.bytes();
    while let Some(c) = chars.next() {
        match c {
            b'[' => continue,
            b'V' | b'Z' | b'B' | b'C' | b'D' | b'F' | b'I' | b'J' | b'S' => {}
            b'L' => {
                if !chars.any(|c| c == b';') {
                    return Err(malformed(format!("unterminated class in descriptor {descriptor:?}")));
                }
            }
            _ => return Err(malformed(format!("bad descriptor {descriptor:?}"))),
        }
        n += 1;
    }
    Ok(n)
}

impl Codec for Dubbo {
    fn name(&self) -> &'static str {
        "dubbo"
    }

    fn detect(&self, first: &[u8]) -> Detect {
        match first {
            [] | [0xda] => Detect::NeedMore,
            [0xda, 0xbb, ..] => Detect::Yes,
            _ => Detect::No,
        }
    }

    fn decode(&self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, CodecError> {
        let seen = buf.len().min(2);
        if buf[..seen] != MAGIC[..seen] {
            return Err(CodecError::NotThisProtocol(
                "dubbo",
                format!("magic {:02x?}", &buf[..seen]),
            ));
        }
        let Some(head) = buf.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let flag = head[2];
        let status = head[3];
        let id = u64::from_be_bytes([head[4], head[5], head[6], head[7], head[8], head[9], head[10], head[11]]);
        let body = i32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        let body = usize::try_from(body).map_err(|_| malformed(format!("negative body length {body}")))?;
        let len = HEADER + body;
        if len > limits.max_frame {
            return Err(CodecError::TooLarge {
                what: "dubbo frame",
                len,
                limit: limits.max_frame,
            });
        }
        if buf.len() < len {
            return Ok(None);
        }
        let kind = match (
            flag & FLAG_REQUEST != 0,
            flag & FLAG_EVENT != 0,
            flag & FLAG_TWOWAY != 0,
        ) {
            (true, true, _) => Kind::Heartbeat,
            (true, false, true) => Kind::Request,
            (true, false, false) => Kind::OneWay,
            (false, true, _) => Kind::HeartbeatReply,
            (false, false, _) => Kind::Response,
        };
        Ok(Some(Frame {
            protocol: Protocol::Dubbo,
            kind,
            request_id: id,
            timeout: None,
            status: (flag & FLAG_REQUEST == 0).then_some(u16::from(status)),
            raw: buf.split_to(len),
        }))
    }

    fn set_request_id(&self, frame: &mut Frame, id: u64) {
        frame.request_id = id;
        if let Some(at) = frame.raw.get_mut(4..12) {
            at.copy_from_slice(&id.to_be_bytes());
        }
    }

    fn route_keys<'a>(&self, frame: &'a Frame, need: Need, limits: &Limits) -> Result<RouteKeys<'a>, CodecError> {
        if !matches!(frame.kind, Kind::Request | Kind::OneWay) {
            return Ok(RouteKeys::default());
        }
        let raw: &'a [u8] = &frame.raw;
        let (Some(&flag), Some(body)) = (raw.get(2), raw.get(HEADER..)) else {
            return Err(malformed("truncated frame".to_string()));
        };
        let serialization = flag & SERIALIZATION_MASK;
        if serialization != HESSIAN2 {
            return Err(CodecError::Serialization {
                protocol: "dubbo",
                id: serialization,
            });
        }
        let mut r = Reader::new(body, Dialect::Final);
        r.skip_value().map_err(hessian)?; // the Dubbo version
        let mut keys = RouteKeys {
            service: r.read_str().map_err(hessian)?,
            version: r.read_nullable_str().map_err(hessian)?.unwrap_or_default(),
            method: r.read_str().map_err(hessian)?,
            ..RouteKeys::default()
        };
        if !need.body {
            return Ok(keys);
        }
        let descriptor = r.read_nullable_str().map_err(hessian)?.unwrap_or_default();
        for _ in 0..parameter_count(&descriptor)? {
            r.skip_value().map_err(hessian)?;
        }
        if !r.at_end() {
            keys.headers = r.read_str_map(limits.max_headers).map_err(hessian)?;
        }
        let attachment =
            |keys: &RouteKeys<'a>, name: &str| keys.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if let Some(interface) = attachment(&keys, "interface").filter(|s| !s.is_empty()) {
            keys.service = interface;
        }
        if keys.version.is_empty() {
            keys.version = attachment(&keys, "version").unwrap_or_default();
        }
        keys.group = attachment(&keys, "group").unwrap_or_default();
        keys.timeout = keys
            .header("timeout")
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        Ok(keys)
    }

    fn error_response(&self, request: &Frame, failure: Failure, message: &str) -> Bytes {
        // The body is Hessian whatever the request used, so the flag says hessian2.
        let mut w = Writer::new(Dialect::Final);
        w.string(message);
        frame(HESSIAN2, failure_status(failure), request.request_id, &w.into_vec())
    }

    fn heartbeat_reply(&self, heartbeat: &Frame) -> Bytes {
        let serialization = heartbeat.raw.get(2).map_or(HESSIAN2, |f| f & SERIALIZATION_MASK);
        // The body is a serialized null; for other serializations echo the heartbeat's own.
        let body = match heartbeat.raw.get(HEADER..) {
            Some(body) if serialization != HESSIAN2 => body,
            _ => b"N",
        };
        frame(serialization | FLAG_EVENT, STATUS_OK, heartbeat.request_id, body)
    }

    fn heartbeat(&self, _protocol: Protocol, id: u64) -> Bytes {
        frame(FLAG_REQUEST | FLAG_TWOWAY | FLAG_EVENT | HESSIAN2, 0, id, b"N")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_counts_parameters_not_semicolons() {
        assert_eq!(parameter_count("").unwrap(), 0);
        assert_eq!(parameter_count("II").unwrap(), 2);
        assert_eq!(parameter_count("Ljava/lang/String;I[J").unwrap(), 3);
        assert_eq!(parameter_count("[[Ljava/lang/String;Z").unwrap(), 2);
        assert!(parameter_count("Ljava/lang/String").is_err());
        assert!(parameter_count("Q").is_err());
    }

    #[test]
    fn failure_statuses() {
        assert_eq!(failure_status(Failure::NoRoute), 60);
        assert_eq!(failure_status(Failure::Unavailable), 80);
        assert_eq!(failure_status(Failure::Timeout), 31);
        assert_eq!(failure_status(Failure::Overflow), 100);
        assert_eq!(failure_status(Failure::RateLimited), 100);
        assert_eq!(failure_status(Failure::Denied), 40);
        assert_eq!(failure_status(Failure::Internal), 80);
    }
}

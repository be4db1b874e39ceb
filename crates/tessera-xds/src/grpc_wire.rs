//! gRPC framing for the ADS server, without copying resources per stream.
//!
//! A control plane sends the same resources to many sidecars. Encoding a `DiscoveryResponse` per
//! stream (what a generated gRPC server does) copies every resource once per sidecar, and with a
//! thousand sidecars taking a full push at once that is gigabytes in flight. Protobuf lets a
//! message be written as its fields in any order and repeated fields as separate runs, so a
//! response here is: a small header (version, type URL, nonce, removed names) encoded per stream,
//! followed by the resources' field encodings, each a shared `Bytes` slice of one buffer built
//! once per snapshot. The HTTP/2 layer sends those slices as they are: a stream costs reference
//! counts, not copies.
//!
//! The framing half (`Reader`, `message`, `whole`, `trailers`) is public: Pilot's registry API
//! serves its gRPC streams with it too.

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::google::protobuf::Any;
use http_body_util::BodyExt;
use prost::Message;

/// The longest request accepted (as tonic's limit on the server before).
pub const MAX_REQUEST: usize = 64 << 20;

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Appends `field` (wire type LEN) holding `payload`'s bytes.
fn put_len_field(out: &mut BytesMut, field: u32, payload_len: usize) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, payload_len as u64);
}

/// Field 2 of `DiscoveryResponse` (`repeated Any resources`) for each resource, in one buffer;
/// returns the buffer and each resource's slice of it.
pub(crate) fn sotw_fields(resources: &[&Any]) -> (Bytes, Vec<Bytes>) {
    let mut buf = BytesMut::new();
    let mut spans = Vec::with_capacity(resources.len());
    for a in resources {
        let start = buf.len();
        let len = a.encoded_len();
        buf.reserve(len + 1 + varint_len(len as u64));
        put_len_field(&mut buf, 2, len);
        // Encoding into a BytesMut cannot fail: it grows as needed.
        let _ = a.encode(&mut buf);
        spans.push((start, buf.len()));
    }
    let all = buf.freeze();
    let slices = spans.into_iter().map(|(s, e)| all.slice(s..e)).collect();
    (all, slices)
}

/// Field 2 of `DeltaDiscoveryResponse` (`repeated Resource resources`) for each
/// `(name, version, resource)`, in one buffer; returns each one's slice.
pub(crate) fn delta_fields(resources: &[(&str, String, &Any)]) -> Vec<Bytes> {
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    let mut buf = BytesMut::new();
    let mut spans = Vec::with_capacity(resources.len());
    for (name, version, a) in resources {
        let start = buf.len();
        // Resource { version = 1, resource = 2, name = 3 }: encoded by hand around the Any, so
        // the Any is not cloned into a Resource first.
        let any_len = a.encoded_len();
        let body_len = 1
            + varint_len(version.len() as u64)
            + version.len()
            + 1
            + varint_len(any_len as u64)
            + any_len
            + 1
            + varint_len(name.len() as u64)
            + name.len();
        put_len_field(&mut buf, 2, body_len);
        put_len_field(&mut buf, 1, version.len());
        buf.put_slice(version.as_bytes());
        put_len_field(&mut buf, 2, any_len);
        let _ = a.encode(&mut buf);
        put_len_field(&mut buf, 3, name.len());
        buf.put_slice(name.as_bytes());
        spans.push((start, buf.len()));
        debug_assert!(Resource::decode(&buf[start + 1 + varint_len(body_len as u64)..]).is_ok());
    }
    let all = buf.freeze();
    spans.into_iter().map(|(s, e)| all.slice(s..e)).collect()
}

/// One gRPC message as chunks: the 5-byte prefix with the header, then the shared parts.
pub fn message(header: &[u8], parts: Vec<Bytes>) -> Vec<Bytes> {
    let len = header.len() + parts.iter().map(Bytes::len).sum::<usize>();
    let mut head = BytesMut::with_capacity(5 + header.len());
    head.put_u8(0);
    head.put_u32(len as u32);
    head.put_slice(header);
    let mut out = Vec::with_capacity(1 + parts.len());
    out.push(head.freeze());
    out.extend(parts);
    out
}

/// A whole message encoded at once (small responses, raw test responses).
pub fn whole<M: Message>(m: &M) -> Vec<Bytes> {
    message(&m.encode_to_vec(), Vec::new())
}

/// Why a request stream ended.
#[derive(Debug)]
pub enum ReadEnd {
    /// The client half-closed or the connection went.
    Closed,
    /// A message that is not the expected protobuf, compressed, or too long.
    Bad(String),
}

/// Reads gRPC messages of type `M` from a request body.
pub struct Reader<M> {
    body: hyper::body::Incoming,
    buf: BytesMut,
    _m: std::marker::PhantomData<M>,
}

impl<M: Message + Default> Reader<M> {
    /// Reads from `body`, a gRPC request stream.
    pub fn new(body: hyper::body::Incoming) -> Self {
        Reader {
            body,
            buf: BytesMut::new(),
            _m: std::marker::PhantomData,
        }
    }

    /// The next message.
    pub async fn next(&mut self) -> Result<M, ReadEnd> {
        loop {
            if self.buf.len() >= 5 {
                let compressed = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if compressed != 0 {
                    return Err(ReadEnd::Bad("compressed messages are not supported".into()));
                }
                if len > MAX_REQUEST {
                    return Err(ReadEnd::Bad(format!(
                        "a {len}-byte request is over the {MAX_REQUEST}-byte limit"
                    )));
                }
                if self.buf.len() >= 5 + len {
                    let _ = self.buf.split_to(5);
                    let msg = self.buf.split_to(len);
                    // A stream lives long and its big requests are rare: do not keep their buffer.
                    if self.buf.is_empty() && self.buf.capacity() > 16 * 1024 {
                        self.buf = BytesMut::new();
                    }
                    return M::decode(msg.freeze()).map_err(|e| ReadEnd::Bad(format!("undecodable request: {e}")));
                }
            }
            match self.body.frame().await {
                None => return Err(ReadEnd::Closed),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "ADS request stream ended");
                    return Err(ReadEnd::Closed);
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Trailers that end a response: `grpc-status` and, when not OK, `grpc-message`.
pub fn trailers(status: u8, message: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from(u16::from(status)));
    if !message.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(&message.replace(['\r', '\n'], " "))
    {
        t.insert("grpc-message", v);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};

    fn concat(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn split_encodings_decode_as_the_whole_message() {
        let a = Any {
            type_url: "type.googleapis.com/x".into(),
            value: vec![7; 300],
        };
        let b = Any {
            type_url: "type.googleapis.com/y".into(),
            value: vec![1, 2, 3],
        };
        let (_, slices) = sotw_fields(&[&a, &b]);
        let header = DiscoveryResponse {
            version_info: "3".into(),
            type_url: "t".into(),
            nonce: "n1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let wire = concat(&message(&header, slices));
        assert_eq!(wire[0], 0);
        let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        assert_eq!(len, wire.len() - 5);
        let r = DiscoveryResponse::decode(&wire[5..]).unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("3", "n1"));
        assert_eq!(r.resources, [a.clone(), b.clone()]);

        let parts = delta_fields(&[("a", "v1".into(), &a), ("b", "v2".into(), &b)]);
        let header = DeltaDiscoveryResponse {
            system_version_info: "3".into(),
            type_url: "t".into(),
            removed_resources: vec!["gone".into()],
            nonce: "n2".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let wire = concat(&message(&header, parts));
        let r = DeltaDiscoveryResponse::decode(&wire[5..]).unwrap();
        assert_eq!(r.removed_resources, ["gone"]);
        assert_eq!(r.resources.len(), 2);
        assert_eq!(
            (r.resources[1].name.as_str(), r.resources[1].version.as_str()),
            ("b", "v2")
        );
        assert_eq!(r.resources[0].resource.as_ref(), Some(&a));
    }
}

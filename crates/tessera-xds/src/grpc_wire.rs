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
//! The framing half (`Reader`, `message`, `whole`, `trailers`, `body`, `send`, `end`) is
//! public: Pilot's registry API serves its gRPC streams with it too.

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

/// Where one resource's encoding is in its snapshot's buffer.
pub(crate) type Span = (usize, usize);

/// The slices of `all` at `spans`, adjacent spans merged: a push of many resources that sit
/// side by side in the snapshot's buffer (name order, as streams ask for them) goes out as a few
/// large chunks, one HTTP/2 frame-queue entry and one write each, not one per resource.
pub(crate) fn runs(all: &Bytes, spans: impl IntoIterator<Item = Span>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut cur: Option<Span> = None;
    for (s, e) in spans {
        match &mut cur {
            Some((_, ce)) if *ce == s => *ce = e,
            _ => {
                if let Some((a, b)) = cur.replace((s, e)) {
                    out.push(all.slice(a..b));
                }
            }
        }
    }
    if let Some((a, b)) = cur {
        out.push(all.slice(a..b));
    }
    out
}

/// Field 2 of `DiscoveryResponse` (`repeated Any resources`) for each resource, in one buffer;
/// returns the buffer and each resource's span of it.
pub(crate) fn sotw_fields(resources: &[&Any]) -> (Bytes, Vec<Span>) {
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
    (buf.freeze(), spans)
}

/// Field 2 of `DeltaDiscoveryResponse` (`repeated Resource resources`) for each
/// `(name, version, resource)`, in one buffer; returns the buffer and each one's span of it.
pub(crate) fn delta_fields(resources: &[(&str, String, &Any)]) -> (Bytes, Vec<Span>) {
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
    (buf.freeze(), spans)
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

/// A request body: hyper's, or the ADS server's own HTTP/2 ([`crate::http2`]).
pub enum Body {
    /// From a hyper server.
    Hyper(hyper::body::Incoming),
    /// From [`crate::http2::serve`].
    Own(crate::http2::RecvBody),
}

impl From<hyper::body::Incoming> for Body {
    fn from(b: hyper::body::Incoming) -> Self {
        Body::Hyper(b)
    }
}

impl From<crate::http2::RecvBody> for Body {
    fn from(b: crate::http2::RecvBody) -> Self {
        Body::Own(b)
    }
}

/// Reads gRPC messages of type `M` from a request body.
pub struct Reader<M> {
    body: Body,
    buf: BytesMut,
    _m: std::marker::PhantomData<M>,
}

impl<M: Message + Default> Reader<M> {
    /// Reads from `body`, a gRPC request stream.
    pub fn new(body: impl Into<Body>) -> Self {
        Reader {
            body: body.into(),
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
                    // A stream lives long and its big requests are rare: do not keep their
                    // buffer (what is left of it after the split still holds the allocation).
                    if self.buf.is_empty() && len > 16 * 1024 {
                        self.buf = BytesMut::new();
                    }
                    return M::decode(msg.freeze()).map_err(|e| ReadEnd::Bad(format!("undecodable request: {e}")));
                }
            }
            let data = match &mut self.body {
                Body::Hyper(b) => match b.frame().await {
                    None => return Err(ReadEnd::Closed),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "gRPC request stream ended");
                        return Err(ReadEnd::Closed);
                    }
                    Some(Ok(f)) => f.into_data().unwrap_or_default(),
                },
                Body::Own(b) => b.chunk().await.ok_or(ReadEnd::Closed)?,
            };
            self.buf.extend_from_slice(&data);
        }
    }
}

/// What a stream's task hands the HTTP/2 layer: one gRPC message's chunks, or the trailers
/// that end the response.
pub enum Msg {
    /// One message, as chunks (shared slices).
    Data(Vec<Bytes>),
    /// The status trailers.
    End(Box<http::HeaderMap>),
}

/// A gRPC response body fed by a task a message at a time. A queue slot is a `Msg` (32 bytes)
/// and a message is one slot however many chunks it has, so a thousand idle streams keep small
/// queues; the chunks become HTTP/2 data frames as the connection takes them.
pub struct MsgBody {
    rx: tokio::sync::mpsc::Receiver<Msg>,
    pending: std::vec::IntoIter<Bytes>,
}

/// A response body and the sender that feeds it, `depth` messages deep.
pub fn body(depth: usize) -> (tokio::sync::mpsc::Sender<Msg>, MsgBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(depth);
    (
        tx,
        MsgBody {
            rx,
            pending: Vec::new().into_iter(),
        },
    )
}

impl hyper::body::Body for MsgBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        loop {
            if let Some(b) = self.pending.next() {
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(b))));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Msg::Data(chunks))) => self.pending = chunks.into_iter(),
                Poll::Ready(Some(Msg::End(t))) => return Poll::Ready(Some(Ok(hyper::body::Frame::trailers(*t)))),
            }
        }
    }
}

/// Sends one message's chunks; false when the client is gone.
pub async fn send(tx: &tokio::sync::mpsc::Sender<Msg>, chunks: Vec<Bytes>) -> bool {
    tx.send(Msg::Data(chunks)).await.is_ok()
}

/// Ends the response with `status` (0: OK) and `message`.
pub async fn end(tx: &tokio::sync::mpsc::Sender<Msg>, status: u8, message: &str) {
    let _ = tx.send(Msg::End(Box::new(trailers(status, message)))).await;
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
        let (all, spans) = sotw_fields(&[&a, &b]);
        // Adjacent spans become one run; apart, one each.
        assert_eq!(runs(&all, spans.clone()).len(), 1);
        assert_eq!(runs(&all, [spans[1], spans[0]]).len(), 2);
        let slices = runs(&all, spans);
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

        let (all, spans) = delta_fields(&[("a", "v1".into(), &a), ("b", "v2".into(), &b)]);
        let parts = runs(&all, spans);
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

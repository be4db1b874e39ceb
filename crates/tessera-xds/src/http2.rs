//! A small HTTP/2 server (RFC 9113) for gRPC streams, written for the ADS server's scale.
//!
//! hyper's HTTP/2 keeps about 37 KB per connection for as long as it lives: a 16 KB write
//! buffer, a read buffer grown to a whole frame, a 4 KB HPACK buffer. A control plane holds
//! thousands of mostly idle connections, so here an idle connection holds no buffer at all:
//! - reads go into one scratch buffer per thread; only a frame cut by a read is kept, and
//!   only until its end arrives;
//! - writes are queued as shared slices (the snapshots' own encodings, never copied) and
//!   handed to `writev`;
//! - request bodies reach their stream as exact-size chunks, and their flow-control window
//!   is given back only as the stream's task takes them, so a slow task holds at most one
//!   window (64 KB) of its client's data.
//!
//! What it serves: POST streams (gRPC), any number per connection up to
//! [`MAX_STREAMS`]; each new stream is handed to the handler with its path, its request
//! body ([`RecvBody`]) and the sender of its response ([`Msg`]s: data, then trailers). It
//! answers PING, honours SETTINGS, both flow-control windows and RST_STREAM, and ends the
//! connection with GOAWAY on a protocol error. It never pushes, never sends PRIORITY, and
//! does not use HPACK's dynamic table for its own headers.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use bytes::{Buf, Bytes};
use tokio::io::Interest;
use tokio::sync::{Notify, mpsc};

use crate::grpc_wire::Msg;
use crate::hpack;

/// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_STREAMS: usize = 100;
/// Our receive window per stream (the protocol's default, so no setting is sent for it).
const STREAM_WINDOW: i64 = 65_535;
/// Our receive window for the connection, raised from the default at the start.
const CONN_WINDOW: i64 = 1 << 20;
/// The largest frame we accept (the protocol's default and minimum).
const MAX_FRAME: usize = 16_384;
/// The largest header list we accept (SETTINGS_MAX_HEADER_LIST_SIZE).
const MAX_HEADER_LIST: usize = 16 * 1024;
/// Queued output past which no more response data is taken from the streams.
const OUT_HIGH: usize = 256 * 1024;
/// Queued output past which the connection stops reading: what a client that sends (PINGs,
/// SETTINGS, DATA on closed streams) without reading our answers can make us hold.
const OUT_LIMIT: usize = 1024 * 1024;
/// The queue of response messages per stream.
pub const QUEUE_DEPTH: usize = 4;
/// Read scratch, one per thread.
const SCRATCH: usize = 32 * 1024;
/// How long a connection ending on an error may take to send its GOAWAY.
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;
// Error codes.
const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;

/// A socket the server reads and writes by readiness.
pub trait Sock: Send + Sync + 'static {
    /// Waits for the socket to be ready for `interest`.
    fn ready(&self, interest: Interest) -> impl Future<Output = std::io::Result<tokio::io::Ready>> + Send;
    /// Reads what is there, without waiting.
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes what fits, without waiting.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
}

macro_rules! sock {
    ($t:ty) => {
        impl Sock for $t {
            fn ready(&self, interest: Interest) -> impl Future<Output = std::io::Result<tokio::io::Ready>> + Send {
                <$t>::ready(self, interest)
            }
            fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
        }
    };
}
sock!(tokio::net::TcpStream);
sock!(tokio::net::UnixStream);

/// A request body: its DATA, as chunks, until the client ends the stream (or resets it, or
/// the connection closes: then `chunk` returns None too).
pub struct RecvBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    taken: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

impl RecvBody {
    /// The next chunk; taking it gives its bytes of window back to the client.
    pub async fn chunk(&mut self) -> Option<Bytes> {
        let b = self.rx.recv().await?;
        self.taken.fetch_add(b.len(), Ordering::Relaxed);
        self.wake.notify_one();
        Some(b)
    }
}

/// Why a connection ended early.
#[derive(Debug)]
enum Fail {
    /// The socket failed (or the peer went away mid-frame).
    Io,
    /// A connection error: GOAWAY with this code and reason.
    Proto(u32, String),
}

fn proto(code: u32, why: impl Into<String>) -> Fail {
    Fail::Proto(code, why.into())
}

struct Stream {
    id: u32,
    /// The request body's sender; None once the client ended its side.
    inbound: Option<mpsc::UnboundedSender<Bytes>>,
    taken: Arc<AtomicUsize>,
    /// What the client may still send us on this stream.
    recv_window: i64,
    /// What we may still send.
    send_window: i64,
    rx: mpsc::Receiver<Msg>,
    /// The message being sent.
    pending: VecDeque<Bytes>,
    trailers: Option<Box<http::HeaderMap>>,
    /// The task dropped its sender without trailers.
    abandoned: bool,
}

/// A header block being read across HEADERS and CONTINUATION frames.
struct Block {
    id: u32,
    end_stream: bool,
    bytes: Vec<u8>,
}

struct Conn<H> {
    handler: H,
    streams: Vec<Stream>,
    last_id: u32,
    send_window: i64,
    recv_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    decoder: hpack::Decoder,
    block: Option<Block>,
    preface: usize,
    partial: Vec<u8>,
    out: VecDeque<Bytes>,
    out_bytes: usize,
    wake: Arc<Notify>,
    /// Window given back for bytes no stream will take (padding, closed streams).
    conn_credit: usize,
    /// The client sent GOAWAY: no new streams.
    goaway: bool,
}

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Serves one connection until it closes; `handler` gets each new stream.
pub async fn serve<S: Sock, H: FnMut(&str, RecvBody, mpsc::Sender<Msg>)>(sock: S, handler: H) {
    let wake = Arc::new(Notify::new());
    let mut c = Conn {
        handler,
        streams: Vec::new(),
        last_id: 0,
        send_window: 65_535,
        recv_window: CONN_WINDOW,
        peer_initial_window: 65_535,
        peer_max_frame: 16_384,
        decoder: hpack::Decoder::default(),
        block: None,
        preface: 0,
        partial: Vec::new(),
        out: VecDeque::new(),
        out_bytes: 0,
        wake: wake.clone(),
        conn_credit: 0,
        goaway: false,
    };
    let mut settings = Vec::new();
    for (id, v) in [(0x3u16, MAX_STREAMS as u32), (0x6, MAX_HEADER_LIST as u32)] {
        settings.extend_from_slice(&id.to_be_bytes());
        settings.extend_from_slice(&v.to_be_bytes());
    }
    c.frame(SETTINGS, 0, 0, &settings);
    c.frame(WINDOW_UPDATE, 0, 0, &((CONN_WINDOW - 65_535) as u32).to_be_bytes());
    let end = c.run(&sock, &wake).await;
    if let Err(Fail::Proto(code, why)) = end {
        tracing::debug!(code, reason = %why, "ADS connection: protocol error");
        let mut p = c.last_id.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(why.as_bytes());
        c.frame(GOAWAY, 0, 0, &p);
        let _ = tokio::time::timeout(GOAWAY_GRACE, async {
            while !c.out.is_empty() {
                if sock.ready(Interest::WRITABLE).await.is_err() || c.flush(&sock).is_err() {
                    break;
                }
            }
        })
        .await;
    }
}

impl<H: FnMut(&str, RecvBody, mpsc::Sender<Msg>)> Conn<H> {
    async fn run<S: Sock>(&mut self, sock: &S, wake: &Notify) -> Result<(), Fail> {
        loop {
            self.credit();
            // Fill and write until the socket is full or nothing more may be sent: output is
            // taken from the streams only up to OUT_HIGH at a time.
            loop {
                self.fill();
                if self.out.is_empty() {
                    break;
                }
                self.flush(sock)?;
                if !self.out.is_empty() || !self.sendable() {
                    break;
                }
            }
            if self.goaway && self.streams.is_empty() && self.out.is_empty() {
                return Ok(());
            }
            let interest = if self.out.is_empty() {
                Interest::READABLE
            } else if self.out_bytes >= OUT_LIMIT {
                Interest::WRITABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let streams = &mut self.streams;
            tokio::select! {
                r = sock.ready(interest) => {
                    let r = r.map_err(|_| Fail::Io)?;
                    if (r.is_readable() || r.is_read_closed()) && self.out_bytes < OUT_LIMIT && !self.read(sock)? {
                        return Ok(());
                    }
                }
                () = wake.notified() => {}
                () = std::future::poll_fn(|cx| poll_streams(streams, cx)) => {}
            }
        }
    }

    /// Reads what the socket has (up to a few scratch buffers, then lets others run); false
    /// at the end of the stream.
    fn read<S: Sock>(&mut self, sock: &S) -> Result<bool, Fail> {
        for _ in 0..4 {
            let got = SCRATCH_BUF.with(|s| -> Result<Option<bool>, Fail> {
                let mut s = s.borrow_mut();
                if s.len() < SCRATCH {
                    s.resize(SCRATCH, 0);
                }
                match sock.try_read(&mut s) {
                    Ok(0) => Ok(Some(false)),
                    Ok(n) => {
                        self.input(&s[..n])?;
                        Ok(None)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Some(true)),
                    Err(_) => Err(Fail::Io),
                }
            })?;
            if let Some(open) = got {
                return Ok(open);
            }
        }
        Ok(true)
    }

    /// Takes bytes from the socket: the preface, then whole frames; a frame cut short is kept.
    fn input(&mut self, mut data: &[u8]) -> Result<(), Fail> {
        if self.preface < PREFACE.len() {
            let n = (PREFACE.len() - self.preface).min(data.len());
            if data[..n] != PREFACE[self.preface..self.preface + n] {
                return Err(proto(PROTOCOL_ERROR, "not an HTTP/2 connection preface"));
            }
            self.preface += n;
            data = &data[n..];
        }
        if self.partial.is_empty() {
            let used = self.frames(data)?;
            self.partial.extend_from_slice(&data[used..]);
        } else {
            self.partial.extend_from_slice(data);
            let buf = std::mem::take(&mut self.partial);
            let used = self.frames(&buf)?;
            self.partial = buf;
            self.partial.drain(..used);
            if self.partial.is_empty() && self.partial.capacity() > 1024 {
                self.partial = Vec::new();
            }
        }
        Ok(())
    }

    /// Handles the whole frames at the start of `buf`; returns how many bytes they took.
    fn frames(&mut self, buf: &[u8]) -> Result<usize, Fail> {
        let mut at = 0;
        while buf.len() - at >= 9 {
            let h = &buf[at..at + 9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if len > MAX_FRAME {
                return Err(proto(
                    FRAME_SIZE_ERROR,
                    format!("a {len}-byte frame (limit {MAX_FRAME})"),
                ));
            }
            if buf.len() - at < 9 + len {
                break;
            }
            let (ty, flags) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            self.frame_in(ty, flags, id, &buf[at + 9..at + 9 + len])?;
            at += 9 + len;
        }
        Ok(at)
    }

    fn frame_in(&mut self, ty: u8, flags: u8, id: u32, p: &[u8]) -> Result<(), Fail> {
        if let Some(b) = &self.block
            && (ty != CONTINUATION || id != b.id)
        {
            return Err(proto(PROTOCOL_ERROR, "a header block interrupted"));
        }
        match ty {
            DATA => self.data(flags, id, p),
            HEADERS => {
                if id == 0 || id.is_multiple_of(2) {
                    return Err(proto(PROTOCOL_ERROR, format!("HEADERS on stream {id}")));
                }
                let p = unpad(flags, p)?;
                let p = if flags & PRIORITY_FLAG != 0 {
                    p.get(5..)
                        .ok_or_else(|| proto(FRAME_SIZE_ERROR, "short HEADERS priority"))?
                } else {
                    p
                };
                let block = Block {
                    id,
                    end_stream: flags & END_STREAM != 0,
                    bytes: p.to_vec(),
                };
                self.header_part(flags, block)
            }
            CONTINUATION => {
                let Some(mut b) = self.block.take() else {
                    return Err(proto(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                b.bytes.extend_from_slice(p);
                if b.bytes.len() > 4 * MAX_HEADER_LIST {
                    return Err(proto(PROTOCOL_ERROR, "header block too large"));
                }
                self.header_part(flags, b)
            }
            PRIORITY => {
                if p.len() != 5 {
                    return Err(proto(FRAME_SIZE_ERROR, "PRIORITY is 5 bytes"));
                }
                Ok(())
            }
            RST_STREAM => {
                if p.len() != 4 {
                    return Err(proto(FRAME_SIZE_ERROR, "RST_STREAM is 4 bytes"));
                }
                if id == 0 || id > self.last_id {
                    return Err(proto(PROTOCOL_ERROR, format!("RST_STREAM on idle stream {id}")));
                }
                // Dropping it closes the request body and the response queue: the task ends.
                if let Some(i) = self.find(id) {
                    self.forget(i);
                }
                Ok(())
            }
            SETTINGS => self.settings(flags, id, p),
            PUSH_PROMISE => Err(proto(PROTOCOL_ERROR, "a client cannot push")),
            PING => {
                if p.len() != 8 || id != 0 {
                    return Err(proto(FRAME_SIZE_ERROR, "PING is 8 bytes on stream 0"));
                }
                if flags & ACK == 0 {
                    self.frame(PING, ACK, 0, p);
                }
                Ok(())
            }
            GOAWAY => {
                self.goaway = true;
                Ok(())
            }
            WINDOW_UPDATE => {
                if p.len() != 4 {
                    return Err(proto(FRAME_SIZE_ERROR, "WINDOW_UPDATE is 4 bytes"));
                }
                let inc = i64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff);
                if id == 0 {
                    if inc == 0 {
                        return Err(proto(PROTOCOL_ERROR, "a zero window increment"));
                    }
                    self.send_window += inc;
                    if self.send_window > i64::from(i32::MAX) {
                        return Err(proto(FLOW_CONTROL_ERROR, "connection window over 2^31-1"));
                    }
                } else if let Some(i) = self.find(id) {
                    let s = &mut self.streams[i];
                    s.send_window += inc;
                    if inc == 0 || s.send_window > i64::from(i32::MAX) {
                        let code = if inc == 0 { PROTOCOL_ERROR } else { FLOW_CONTROL_ERROR };
                        self.reset(i, code);
                    }
                } else if id > self.last_id {
                    return Err(proto(PROTOCOL_ERROR, format!("WINDOW_UPDATE on idle stream {id}")));
                }
                Ok(())
            }
            // Unknown frame types are ignored (RFC 9113 5.5).
            _ => Ok(()),
        }
    }

    /// A header block so far: handled when END_HEADERS ends it, else kept for CONTINUATION.
    fn header_part(&mut self, flags: u8, block: Block) -> Result<(), Fail> {
        if flags & END_HEADERS != 0 {
            self.headers(block)
        } else {
            self.block = Some(block);
            Ok(())
        }
    }

    fn settings(&mut self, flags: u8, id: u32, p: &[u8]) -> Result<(), Fail> {
        if id != 0 {
            return Err(proto(PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if flags & ACK != 0 {
            return if p.is_empty() {
                Ok(())
            } else {
                Err(proto(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"))
            };
        }
        if !p.len().is_multiple_of(6) {
            return Err(proto(FRAME_SIZE_ERROR, "SETTINGS is a multiple of 6 bytes"));
        }
        for s in p.chunks_exact(6) {
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match u16::from_be_bytes([s[0], s[1]]) {
                0x2 if v > 1 => return Err(proto(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")),
                0x4 => {
                    if v > i32::MAX as u32 {
                        return Err(proto(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1"));
                    }
                    let delta = i64::from(v) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(v);
                    for s in &mut self.streams {
                        s.send_window += delta;
                    }
                }
                0x5 => {
                    if !(16_384..=16_777_215).contains(&v) {
                        return Err(proto(PROTOCOL_ERROR, format!("MAX_FRAME_SIZE {v}")));
                    }
                    self.peer_max_frame = v as usize;
                }
                // Table size: our encoder never indexes. Others: nothing for a server to do.
                _ => {}
            }
        }
        self.frame(SETTINGS, ACK, 0, &[]);
        Ok(())
    }

    fn headers(&mut self, b: Block) -> Result<(), Fail> {
        let mut path = None;
        let mut bad = None;
        self.decoder
            .decode(&b.bytes, MAX_HEADER_LIST, |n, v| {
                if &n[..] == b":path" {
                    match String::from_utf8(v.to_vec()) {
                        Ok(p) => path = Some(p),
                        Err(_) => bad = Some("a :path that is not UTF-8"),
                    }
                }
            })
            .map_err(|e| proto(COMPRESSION_ERROR, e.to_string()))?;
        if let Some(i) = self.find(b.id) {
            // Trailers from the client: they end its side.
            if !b.end_stream {
                self.reset(i, PROTOCOL_ERROR);
            } else {
                self.streams[i].inbound = None;
            }
            return Ok(());
        }
        if b.id <= self.last_id {
            return Err(proto(STREAM_CLOSED, format!("HEADERS on closed stream {}", b.id)));
        }
        self.last_id = b.id;
        if self.goaway || self.streams.len() >= MAX_STREAMS {
            self.rst(b.id, REFUSED_STREAM);
            return Ok(());
        }
        let Some(path) = path.filter(|_| bad.is_none()) else {
            self.rst(b.id, PROTOCOL_ERROR);
            return Ok(());
        };
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let taken = Arc::new(AtomicUsize::new(0));
        let body = RecvBody {
            rx: in_rx,
            taken: taken.clone(),
            wake: self.wake.clone(),
        };
        self.streams.push(Stream {
            id: b.id,
            inbound: (!b.end_stream).then_some(in_tx),
            taken,
            recv_window: STREAM_WINDOW,
            send_window: self.peer_initial_window,
            rx,
            pending: VecDeque::new(),
            trailers: None,
            abandoned: false,
        });
        // The response headers go at once, as a gRPC server's do.
        let mut h = vec![hpack::STATUS_200];
        hpack::encode_literal(&mut h, hpack::CONTENT_TYPE, "", b"application/grpc");
        self.frame(HEADERS, END_HEADERS, b.id, &h);
        (self.handler)(&path, body, tx);
        Ok(())
    }

    fn data(&mut self, flags: u8, id: u32, p: &[u8]) -> Result<(), Fail> {
        if id == 0 {
            return Err(proto(PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = p.len() as i64;
        self.recv_window -= len;
        if self.recv_window < 0 {
            return Err(proto(FLOW_CONTROL_ERROR, "DATA past the connection window"));
        }
        let body = unpad(flags, p)?;
        let Some(i) = self.find(id) else {
            // Nobody takes it: its window comes back at once.
            self.conn_credit += p.len();
            if id > self.last_id {
                return Err(proto(PROTOCOL_ERROR, format!("DATA on idle stream {id}")));
            }
            self.rst(id, STREAM_CLOSED);
            return Ok(());
        };
        let s = &mut self.streams[i];
        s.recv_window -= len;
        if s.recv_window < 0 {
            self.reset(i, FLOW_CONTROL_ERROR);
            return Ok(());
        }
        let Some(inbound) = &s.inbound else {
            self.reset(i, STREAM_CLOSED);
            return Ok(());
        };
        // Padding is never taken, nor is a body whose task has ended: their window comes back
        // at once (through the stream, which gives it to the connection too).
        let mut back = p.len() - body.len();
        if !body.is_empty() && inbound.send(Bytes::copy_from_slice(body)).is_err() {
            back += body.len();
        }
        s.taken.fetch_add(back, Ordering::Relaxed);
        if flags & END_STREAM != 0 {
            s.inbound = None;
        }
        Ok(())
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// Resets stream `i` and forgets it.
    fn reset(&mut self, i: usize, code: u32) {
        let id = self.forget(i);
        self.rst(id, code);
    }

    /// Drops stream `i`; what it received and nobody will take is given back to the
    /// connection's window. Returns its id.
    fn forget(&mut self, i: usize) -> u32 {
        let s = self.streams.swap_remove(i);
        self.conn_credit += unreturned(&s);
        s.id
    }

    fn rst(&mut self, id: u32, code: u32) {
        self.frame(RST_STREAM, 0, id, &code.to_be_bytes());
    }

    /// Queues a control frame.
    fn frame(&mut self, ty: u8, flags: u8, id: u32, p: &[u8]) {
        let f = frame_bytes(ty, flags, id, p);
        self.out_bytes += f.len();
        self.out.push_back(f);
    }

    /// Gives back the window of what the streams' tasks took.
    fn credit(&mut self) {
        let mut conn = std::mem::take(&mut self.conn_credit);
        let mut updates: Vec<(u32, usize)> = Vec::new();
        for s in &mut self.streams {
            let n = s.taken.swap(0, Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            conn += n;
            s.recv_window += n as i64;
            if s.inbound.is_some() {
                updates.push((s.id, n));
            }
        }
        for (id, n) in updates {
            self.frame(WINDOW_UPDATE, 0, id, &(n as u32).to_be_bytes());
        }
        if conn > 0 {
            self.recv_window += conn as i64;
            self.frame(WINDOW_UPDATE, 0, 0, &(conn as u32).to_be_bytes());
        }
    }

    /// Moves response data the windows allow from the streams to the output queue.
    fn fill(&mut self) {
        let Conn {
            streams,
            out,
            out_bytes,
            send_window,
            peer_max_frame,
            conn_credit,
            ..
        } = self;
        let mut enqueue = |b: Bytes, out_bytes: &mut usize| {
            *out_bytes += b.len();
            out.push_back(b);
        };
        let mut i = 0;
        while i < streams.len() {
            let s = &mut streams[i];
            while *out_bytes < OUT_HIGH && s.send_window > 0 && *send_window > 0 {
                let Some(front) = s.pending.front_mut() else { break };
                let n = front
                    .len()
                    .min(*peer_max_frame)
                    .min(s.send_window as usize)
                    .min(*send_window as usize);
                let piece = front.split_to(n);
                if front.is_empty() {
                    s.pending.pop_front();
                }
                if n == 0 {
                    continue;
                }
                s.send_window -= n as i64;
                *send_window -= n as i64;
                // The frame header, then the payload itself: a slice of the snapshot, not a copy.
                enqueue(Bytes::copy_from_slice(&frame_header(DATA, 0, s.id, n)), out_bytes);
                enqueue(piece, out_bytes);
            }
            let mut done = false;
            if s.pending.is_empty() {
                if let Some(t) = s.trailers.take() {
                    let mut h = Vec::new();
                    for (name, value) in t.iter() {
                        hpack::encode_literal(&mut h, 0, name.as_str(), value.as_bytes());
                    }
                    enqueue(frame_bytes(HEADERS, END_HEADERS | END_STREAM, s.id, &h), out_bytes);
                    // The response is complete: a client still sending is told to stop.
                    if s.inbound.is_some() {
                        enqueue(frame_bytes(RST_STREAM, 0, s.id, &NO_ERROR.to_be_bytes()), out_bytes);
                    }
                    done = true;
                } else if s.abandoned {
                    enqueue(frame_bytes(RST_STREAM, 0, s.id, &CANCEL.to_be_bytes()), out_bytes);
                    done = true;
                }
            }
            if done {
                *conn_credit += unreturned(&streams.swap_remove(i));
            } else {
                i += 1;
            }
        }
    }

    /// Whether a stream has something the windows let it send.
    fn sendable(&self) -> bool {
        self.streams.iter().any(|s| {
            (!s.pending.is_empty() && s.send_window > 0 && self.send_window > 0)
                || (s.pending.is_empty() && (s.trailers.is_some() || s.abandoned))
        })
    }

    /// Writes what the socket takes now.
    fn flush<S: Sock>(&mut self, sock: &S) -> Result<(), Fail> {
        while !self.out.is_empty() {
            let slices: Vec<IoSlice<'_>> = self.out.iter().take(64).map(|b| IoSlice::new(b)).collect();
            match sock.try_write_vectored(&slices) {
                Ok(0) => return Err(Fail::Io),
                Ok(mut n) => {
                    self.out_bytes -= n;
                    while n > 0 {
                        let Some(front) = self.out.front_mut() else { break };
                        if front.len() <= n {
                            n -= front.len();
                            self.out.pop_front();
                        } else {
                            front.advance(n);
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Fail::Io),
            }
        }
        if self.out.capacity() > 64 {
            self.out = VecDeque::new();
        }
        Ok(())
    }
}

/// Takes the next message of each stream that has none in hand; ready when any got one.
fn poll_streams(streams: &mut [Stream], cx: &mut std::task::Context<'_>) -> Poll<()> {
    let mut got = false;
    for s in streams.iter_mut() {
        while s.pending.is_empty() && s.trailers.is_none() && !s.abandoned {
            match s.rx.poll_recv(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => s.abandoned = true,
                Poll::Ready(Some(Msg::Data(chunks))) => s.pending = chunks.into(),
                Poll::Ready(Some(Msg::End(t))) => s.trailers = Some(t),
            }
            got = true;
        }
    }
    if got { Poll::Ready(()) } else { Poll::Pending }
}

/// What a stream received and has not given back yet (taken or not).
fn unreturned(s: &Stream) -> usize {
    (STREAM_WINDOW - s.recv_window).max(0) as usize
}

/// A frame's 9-byte header, for a `len`-byte payload.
fn frame_header(ty: u8, flags: u8, id: u32, len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    h[3] = ty;
    h[4] = flags;
    h[5..].copy_from_slice(&id.to_be_bytes());
    h
}

/// A whole frame, header and payload.
fn frame_bytes(ty: u8, flags: u8, id: u32, p: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(9 + p.len());
    f.extend_from_slice(&frame_header(ty, flags, id, p.len()));
    f.extend_from_slice(p);
    Bytes::from(f)
}

/// A frame's payload without its padding.
fn unpad(flags: u8, p: &[u8]) -> Result<&[u8], Fail> {
    if flags & PADDED == 0 {
        return Ok(p);
    }
    let pad = usize::from(
        *p.first()
            .ok_or_else(|| proto(FRAME_SIZE_ERROR, "padded frame without a pad length"))?,
    );
    if pad + 1 > p.len() {
        return Err(proto(PROTOCOL_ERROR, "padding longer than the frame"));
    }
    Ok(&p[1..p.len() - pad])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server whose streams answer each request message (any bytes) with `reply(len)`
    /// chunks, then end with grpc-status 0 when the client ends; `/big` also reads the whole
    /// body first and answers with its length.
    async fn server() -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s, |path, mut body, tx| {
                    let path = path.to_string();
                    tokio::spawn(async move {
                        if path == "/big" {
                            let mut n = 0usize;
                            while let Some(c) = body.chunk().await {
                                n += c.len();
                            }
                            let _ = tx.send(Msg::Data(vec![Bytes::from(n.to_string())])).await;
                        } else if let Some(size) = path.strip_prefix("/send/") {
                            // One message of `size` bytes in 1000-byte chunks (shared slices).
                            let size: usize = size.parse().unwrap();
                            let all = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
                            let chunks = (0..size)
                                .step_by(1000)
                                .map(|i| all.slice(i..(i + 1000).min(size)))
                                .collect();
                            let _ = tx.send(Msg::Data(chunks)).await;
                            while body.chunk().await.is_some() {}
                        } else if path == "/hold" {
                            // Holds its body unread: its window is never given back.
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            drop(body);
                        } else if path == "/cancel" {
                            // Reports (in the process-wide counter) when its client went away.
                            while body.chunk().await.is_some() {}
                            CANCELLED.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let _ = tx.send(Msg::End(Box::new(crate::grpc_wire::trailers(0, "")))).await;
                    });
                }));
            }
        });
        addr
    }

    static CANCELLED: AtomicUsize = AtomicUsize::new(0);

    type Chunk = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
    type Upload = tokio::sync::mpsc::Sender<Chunk>;
    type UploadBody = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<Chunk>>;

    /// hyper's client (an HTTP/2 implementation we did not write) with small windows.
    async fn client(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<UploadBody> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    /// A POST to `path` whose body is fed through the returned sender.
    fn request(path: &str) -> (hyper::Request<UploadBody>, Upload) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (hyper::Request::post(format!("http://x{path}")).body(body).unwrap(), tx)
    }

    #[tokio::test]
    async fn responses_and_requests_larger_than_the_windows_go_through_whole() {
        let addr = server().await;
        let mut send = client(addr).await;
        // 3 MB out, against the client's 64 KB windows: sent as its window updates allow.
        let (req, up) = request("/send/3000000");
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        drop(up);
        let got = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        let trailers = got.trailers().cloned().unwrap();
        let data = got.to_bytes();
        assert_eq!(data.len(), 3_000_000);
        assert!(
            data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
            "bytes in order"
        );
        assert_eq!(trailers["grpc-status"], "0");
        // 1 MB in, against our 64 KB stream window: read as the stream's task takes it.
        let (req, up) = request("/big");
        let writer = tokio::spawn(async move {
            for _ in 0..64 {
                up.send(Ok(hyper::body::Frame::data(Bytes::from(vec![7u8; 16 * 1024]))))
                    .await
                    .unwrap();
            }
        });
        let resp = send.send_request(req).await.unwrap();
        writer.await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.to_bytes(), Bytes::from((64 * 16 * 1024).to_string()));
    }

    #[tokio::test]
    async fn streams_on_one_connection_are_independent_and_a_reset_reaches_the_task() {
        let addr = server().await;
        let send = client(addr).await;
        let mut calls = Vec::new();
        for i in 0..20 {
            let mut send = send.clone();
            calls.push(tokio::spawn(async move {
                let size = 10_000 * (i + 1);
                let (req, up) = request(&format!("/send/{size}"));
                let resp = send.send_request(req).await.unwrap();
                drop(up);
                let got = resp.into_body().collect().await.unwrap();
                (size, got.to_bytes().len())
            }));
        }
        for c in calls {
            let (want, got) = tokio::time::timeout(Duration::from_secs(10), c).await.unwrap().unwrap();
            assert_eq!(want, got);
        }
        // A client that resets its stream (RST_STREAM, CANCEL): the task's body ends.
        let before = CANCELLED.load(Ordering::SeqCst);
        let mut open = Vec::new();
        hpack::encode_literal(&mut open, 4, "", b"/cancel");
        let mut frames = raw_frame(HEADERS, END_HEADERS, 1, &open);
        frames.extend(raw_frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()));
        let f = exchange_for(addr, &frames, true, Duration::from_millis(300)).await;
        assert!(
            f.iter().any(|f| f.0 == HEADERS && f.2 == 1),
            "response headers at once: {f:?}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while CANCELLED.load(Ordering::SeqCst) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the reset never reached the stream's task"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Raw frames: what a broken or hostile client can send.
    fn raw_frame(ty: u8, flags: u8, id: u32, p: &[u8]) -> Vec<u8> {
        frame_bytes(ty, flags, id, p).to_vec()
    }

    /// Sends `bytes` after the preface and a SETTINGS; returns the frames read back until the
    /// server closes (or 3 s pass), as (type, flags, stream, payload).
    async fn exchange(addr: std::net::SocketAddr, bytes: &[u8], preface: bool) -> Vec<(u8, u8, u32, Vec<u8>)> {
        exchange_for(addr, bytes, preface, Duration::from_secs(3)).await
    }

    async fn exchange_for(
        addr: std::net::SocketAddr,
        bytes: &[u8],
        preface: bool,
        wait: Duration,
    ) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if preface {
            s.write_all(PREFACE).await.unwrap();
            s.write_all(&raw_frame(SETTINGS, 0, 0, &[])).await.unwrap();
        }
        s.write_all(bytes).await.unwrap();
        let mut all = Vec::new();
        let _ = tokio::time::timeout(wait, s.read_to_end(&mut all)).await;
        let mut frames = Vec::new();
        let mut at = 0;
        while all.len() - at >= 9 {
            let len = (usize::from(all[at]) << 16) | (usize::from(all[at + 1]) << 8) | usize::from(all[at + 2]);
            let Some(p) = all.get(at + 9..at + 9 + len) else { break };
            let id = u32::from_be_bytes([all[at + 5], all[at + 6], all[at + 7], all[at + 8]]);
            frames.push((all[at + 3], all[at + 4], id, p.to_vec()));
            at += 9 + len;
        }
        frames
    }

    fn goaway_code(frames: &[(u8, u8, u32, Vec<u8>)]) -> Option<u32> {
        frames
            .iter()
            .find(|f| f.0 == GOAWAY)
            .map(|f| u32::from_be_bytes([f.3[4], f.3[5], f.3[6], f.3[7]]))
    }

    #[tokio::test]
    async fn protocol_errors_end_the_connection_with_goaway_and_the_server_keeps_serving() {
        let addr = server().await;
        // Not HTTP/2 at all.
        let f = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
        assert_eq!(goaway_code(&f), Some(PROTOCOL_ERROR));
        // A frame over the 16 KB we advertise.
        let mut big = raw_frame(DATA, 0, 1, &[]);
        big[..3].copy_from_slice(&[0x01, 0x00, 0x00]);
        assert_eq!(goaway_code(&exchange(addr, &big, true).await), Some(FRAME_SIZE_ERROR));
        // A header block HPACK cannot read (index 0).
        let f = exchange(addr, &raw_frame(HEADERS, END_HEADERS, 1, &[0x80]), true).await;
        assert_eq!(goaway_code(&f), Some(COMPRESSION_ERROR));
        // DATA on stream 0, a CONTINUATION out of nowhere, a PUSH_PROMISE from a client.
        assert_eq!(
            goaway_code(&exchange(addr, &raw_frame(DATA, 0, 0, b"x"), true).await),
            Some(PROTOCOL_ERROR)
        );
        assert_eq!(
            goaway_code(&exchange(addr, &raw_frame(CONTINUATION, END_HEADERS, 1, &[]), true).await),
            Some(PROTOCOL_ERROR)
        );
        assert_eq!(
            goaway_code(&exchange(addr, &raw_frame(PUSH_PROMISE, 0, 1, &[0; 4]), true).await),
            Some(PROTOCOL_ERROR)
        );
        // More DATA than the window we granted.
        let mut open = Vec::new();
        hpack::encode_literal(&mut open, 4, "", b"/hold");
        let mut flood = raw_frame(HEADERS, END_HEADERS, 1, &open);
        for _ in 0..5 {
            flood.extend(raw_frame(DATA, 0, 1, &[0u8; 16_000]));
        }
        let f = exchange_for(addr, &flood, true, Duration::from_millis(500)).await;
        assert!(
            f.iter()
                .any(|f| f.0 == RST_STREAM && f.2 == 1 && f.3 == FLOW_CONTROL_ERROR.to_be_bytes()),
            "{f:?}"
        );
        // A PING is answered with its payload; SETTINGS are acknowledged.
        let f = exchange_for(
            addr,
            &raw_frame(PING, 0, 0, b"12345678"),
            true,
            Duration::from_millis(500),
        )
        .await;
        assert!(
            f.iter().any(|f| f.0 == PING && f.1 == ACK && f.3 == b"12345678"),
            "{f:?}"
        );
        assert!(f.iter().any(|f| f.0 == SETTINGS && f.1 == ACK), "{f:?}");
        // A client that sends PINGs and never reads the answers: the server stops reading
        // once it holds OUT_LIMIT of answers, and the client's writes stall.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        let pings: Vec<u8> = (0..4000).flat_map(|_| raw_frame(PING, 0, 0, b"flooding")).collect();
        let mut written = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), s.write_all(&pings)).await {
                Ok(Ok(())) => written += pings.len(),
                Ok(Err(e)) => panic!("the server closed on a PING flood: {e}"),
                Err(_) => break,
            }
            assert!(written < 64 << 20, "the server kept reading PINGs it could not answer");
        }
        drop(s);
        // Random frames never panic the server; a real client is still served after them all.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20 {
            let mut junk = Vec::new();
            for _ in 0..20 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p: Vec<u8> = (0..(x % 40)).map(|i| (x >> (i % 56)) as u8).collect();
                junk.extend(raw_frame((x % 11) as u8, (x >> 8) as u8, (x >> 16) as u32 % 8, &p));
            }
            let _ = exchange_for(addr, &junk, true, Duration::from_millis(100)).await;
        }
        let mut send = client(addr).await;
        let (req, up) = request("/send/100");
        drop(up);
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().len(), 100);
    }
}

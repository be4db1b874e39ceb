//! The few ZooKeeper client requests the adapter needs, spoken over one TCP connection: the
//! session handshake, `getChildren` and `exists` with a watch, pings, and watch notifications.
//!
//! Written from the protocol documentation (the jute records of `zookeeper.jute`): every frame
//! is a 4-byte big-endian length and a record; integers are big-endian, a string or a buffer is
//! an `int` length (-1: null) and its bytes, a vector an `int` count and its items, a boolean
//! one byte. A request is `RequestHeader {int xid; int type}` and its body; a reply is
//! `ReplyHeader {int xid; long zxid; int err}` and, when `err` is 0, its body. Replies come in
//! the order of the requests, so requests may be pipelined; notifications (`xid` -1) and ping
//! answers (`xid` -2) can arrive between them.
//!
//! Everything read is checked: a short or oversized frame, a negative length or an unexpected
//! reply is an error that ends the connection, never a panic. Reads are cancel-safe (bytes land
//! in `Conn::buf` before any await can be dropped).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The largest frame accepted. ZooKeeper's own limit (`jute.maxbuffer`) is 1 MiB by default;
/// a long provider list can exceed it on servers configured larger, so allow more, but bound
/// what a broken peer can make us allocate.
const MAX_FRAME: usize = 64 << 20;

/// Requests written before their replies are read.
const PIPELINE: usize = 256;
const OP_EXISTS: i32 = 3;
const OP_GET_CHILDREN: i32 = 8;
const OP_PING: i32 = 11;
const XID_WATCH: i32 = -1;
const XID_PING: i32 = -2;
/// `KeeperException.Code.NONODE`.
const ERR_NO_NODE: i32 = -101;

/// A watch notification (`WatcherEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// `NodeCreated` 1, `NodeDeleted` 2, `NodeDataChanged` 3, `NodeChildrenChanged` 4; -1 for
    /// a change of session state.
    pub(crate) kind: i32,
    /// `SyncConnected` 3, `Disconnected` 0, `Expired` -112...
    pub(crate) state: i32,
    /// The watched node.
    pub(crate) path: String,
}

/// The session state `Expired` in a notification.
pub(crate) const STATE_EXPIRED: i32 = -112;
/// The event type of a change of session state rather than of a node.
pub(crate) const EVENT_NONE: i32 = -1;

/// Why the connection could not be used; each ends the session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// Connecting, reading or writing failed.
    #[error("{what} {server}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The server.
        server: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("{server} did not answer within {after:?} while {what}; is it up and reachable?")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// The server.
        server: String,
        /// How long we waited.
        after: Duration,
    },
    /// The server closed the connection.
    #[error("{server} closed the connection while {what}")]
    Closed {
        /// What was being done.
        what: &'static str,
        /// The server.
        server: String,
    },
    /// The server refused the session (it answered a timeout of 0: expired or not served).
    #[error("{server} refused the session (expired, or the server is not serving: is it in a quorum?)")]
    Refused {
        /// The server.
        server: String,
    },
    /// The session expired.
    #[error("the session with {server} expired")]
    Expired {
        /// The server.
        server: String,
    },
    /// A request failed with a ZooKeeper error code.
    #[error("{server}: {op} {path} failed with ZooKeeper error {code}")]
    Server {
        /// The server.
        server: String,
        /// The request.
        op: &'static str,
        /// Its path.
        path: String,
        /// `KeeperException.Code`.
        code: i32,
    },
    /// The server sent something that is not the protocol.
    #[error("{server} broke the protocol: {reason}")]
    Protocol {
        /// The server.
        server: String,
        /// What was wrong.
        reason: String,
    },
}

/// A record being decoded; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

/// A record ended early or held an impossible length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed record: {0}")]
pub(crate) struct Malformed(pub(crate) &'static str);

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.b.len() < n {
            return Err(Malformed(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    pub(crate) fn int(&mut self) -> Result<i32, Malformed> {
        let b = self.take(4, "short int")?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn long(&mut self) -> Result<i64, Malformed> {
        let b = self.take(8, "short long")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    /// A buffer; null reads as empty.
    pub(crate) fn buffer(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.int()?;
        if n < 0 {
            return Ok(&[]);
        }
        let n = usize::try_from(n).map_err(|_| Malformed("length"))?;
        self.take(n, "buffer longer than its record")
    }

    /// A string; null reads as empty; invalid UTF-8 is an error.
    pub(crate) fn string(&mut self) -> Result<String, Malformed> {
        let b = self.buffer()?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed("string not UTF-8"))
    }

    /// A vector of strings; null reads as empty.
    pub(crate) fn strings(&mut self) -> Result<Vec<String>, Malformed> {
        let n = self.int()?;
        if n < 0 {
            return Ok(Vec::new());
        }
        // Each string takes at least its 4-byte length: a count beyond that is a lie, and must not
        // size an allocation.
        let n = usize::try_from(n).map_err(|_| Malformed("count"))?;
        if n > self.b.len() / 4 {
            return Err(Malformed("vector count beyond its record"));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.string()?);
        }
        Ok(v)
    }
}

fn put_int(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_long(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // Paths are far below 2 GiB; a longer one would be cut rather than mis-framed.
    let b = s.as_bytes();
    let n = b.len().min(i32::MAX as usize);
    put_int(out, n as i32);
    out.extend_from_slice(&b[..n]);
}

/// Appends a length-prefixed frame built by `body`.
fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let n = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&n.to_be_bytes());
}

/// `ConnectRequest {int protocolVersion; long lastZxidSeen; int timeOut; long sessionId;
/// buffer passwd}` and the `readOnly` flag servers since 3.4 read: always a new session.
pub(crate) fn connect_request(timeout: Duration) -> Vec<u8> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let mut out = Vec::new();
    frame(&mut out, |b| {
        put_int(b, 0);
        put_long(b, 0);
        put_int(b, ms);
        put_long(b, 0);
        put_int(b, 16);
        b.extend_from_slice(&[0; 16]);
        b.push(0);
    });
    out
}

/// `ConnectResponse {int protocolVersion; int timeOut; long sessionId; buffer passwd}`:
/// (negotiated timeout in ms, session id).
pub(crate) fn connect_response(b: &[u8]) -> Result<(i32, i64), Malformed> {
    let mut r = Reader::new(b);
    let _version = r.int()?;
    let timeout = r.int()?;
    let session = r.long()?;
    let _passwd = r.buffer()?;
    Ok((timeout, session))
}

/// A request frame for `op` on `path` with a watch (`GetChildrenRequest` and `ExistsRequest`
/// are both `{ustring path; boolean watch}`).
fn watch_request(out: &mut Vec<u8>, xid: i32, op: i32, path: &str) {
    frame(out, |b| {
        put_int(b, xid);
        put_int(b, op);
        put_string(b, path);
        b.push(1);
    });
}

/// A reply or notification, split into its header and body.
#[derive(Debug)]
pub(crate) struct Reply<'a> {
    pub(crate) xid: i32,
    pub(crate) err: i32,
    pub(crate) body: Reader<'a>,
}

pub(crate) fn reply(b: &[u8]) -> Result<Reply<'_>, Malformed> {
    let mut r = Reader::new(b);
    let xid = r.int()?;
    let _zxid = r.long()?;
    let err = r.int()?;
    Ok(Reply { xid, err, body: r })
}

impl std::fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reader({} bytes left)", self.b.len())
    }
}

/// `WatcherEvent {int type; int state; ustring path}`.
pub(crate) fn event(r: &mut Reader<'_>) -> Result<Event, Malformed> {
    Ok(Event {
        kind: r.int()?,
        state: r.int()?,
        path: r.string()?,
    })
}

/// What `children` found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listing {
    /// The node's children (a child watch is set).
    Children(Vec<String>),
    /// No such node (an existence watch is set, so its creation is notified).
    Missing,
}

/// One session on one server.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet taken as frames.
    buf: Vec<u8>,
    /// The server, for messages.
    pub(crate) server: String,
    /// The session id the server gave.
    pub(crate) session: i64,
    /// The timeout the server agreed to.
    pub(crate) timeout: Duration,
    xid: i32,
    /// Notifications read while waiting for replies.
    events: VecDeque<Event>,
    last_sent: Instant,
    last_received: Instant,
}

impl Conn {
    /// Connects to `server` (`host:port`) and opens a new session asking for `timeout`.
    pub(crate) async fn connect(server: &str, timeout: Duration) -> Result<Conn, WireError> {
        let server_s = server.to_string();
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(server)).await {
            Err(_) => {
                return Err(WireError::Timeout {
                    what: "connecting",
                    server: server_s,
                    after: timeout,
                });
            }
            Ok(Err(source)) => {
                return Err(WireError::Io {
                    what: "cannot connect to",
                    server: server_s,
                    source,
                });
            }
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        let mut c = Conn {
            stream,
            buf: Vec::new(),
            server: server_s,
            session: 0,
            timeout,
            xid: 0,
            events: VecDeque::new(),
            last_sent: now,
            last_received: now,
        };
        c.send(&connect_request(timeout), "opening a session").await?;
        let deadline = Instant::now() + timeout;
        let Some(f) = c.read_frame(deadline, "opening a session").await? else {
            return Err(WireError::Timeout {
                what: "opening a session",
                server: c.server.clone(),
                after: timeout,
            });
        };
        let (negotiated, session) = connect_response(&f).map_err(|e| c.protocol(e.to_string()))?;
        if negotiated <= 0 {
            return Err(WireError::Refused { server: c.server });
        }
        c.session = session;
        c.timeout = Duration::from_millis(negotiated as u64);
        Ok(c)
    }

    fn protocol(&self, reason: String) -> WireError {
        WireError::Protocol {
            server: self.server.clone(),
            reason,
        }
    }

    /// How long a silent server is trusted: two thirds of the session timeout, as the Java
    /// client does, so a dead server is noticed before the session could expire.
    fn read_timeout(&self) -> Duration {
        self.timeout * 2 / 3
    }

    /// How often an idle session is pinged.
    fn ping_interval(&self) -> Duration {
        self.timeout / 3
    }

    async fn send(&mut self, bytes: &[u8], what: &'static str) -> Result<(), WireError> {
        let limit = self.read_timeout().max(Duration::from_millis(500));
        match tokio::time::timeout(limit, self.stream.write_all(bytes)).await {
            Err(_) => Err(WireError::Timeout {
                what,
                server: self.server.clone(),
                after: limit,
            }),
            Ok(Err(source)) => Err(WireError::Io {
                what: "cannot write to",
                server: self.server.clone(),
                source,
            }),
            Ok(Ok(())) => {
                self.last_sent = Instant::now();
                Ok(())
            }
        }
    }

    /// Takes one whole frame out of the buffer, if there is one.
    fn take_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let n = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_FRAME)
            .ok_or_else(|| self.protocol(format!("frame length {n}")))?;
        if self.buf.len() < 4 + n {
            return Ok(None);
        }
        let f = self.buf[4..4 + n].to_vec();
        self.buf.drain(..4 + n);
        Ok(Some(f))
    }

    /// The next frame, or None at `deadline`.
    async fn read_frame(&mut self, deadline: Instant, what: &'static str) -> Result<Option<Vec<u8>>, WireError> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(f) = self.take_frame()? {
                self.last_received = Instant::now();
                return Ok(Some(f));
            }
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Ok(None),
                Ok(Err(source)) => {
                    return Err(WireError::Io {
                        what: "cannot read from",
                        server: self.server.clone(),
                        source,
                    });
                }
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err(WireError::Closed {
                    what,
                    server: self.server.clone(),
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a ping answer, queueing notifications; an error if the server
    /// stays silent past the read timeout.
    async fn next_reply(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        loop {
            let deadline = self.last_received + self.read_timeout();
            let Some(f) = self.read_frame(deadline, what).await? else {
                return Err(WireError::Timeout {
                    what,
                    server: self.server.clone(),
                    after: self.read_timeout(),
                });
            };
            let r = reply(&f).map_err(|e| self.protocol(e.to_string()))?;
            match r.xid {
                XID_PING => continue,
                XID_WATCH => {
                    let mut body = r.body;
                    let ev = event(&mut body).map_err(|e| self.protocol(e.to_string()))?;
                    self.events.push_back(ev);
                }
                _ => return Ok(f),
            }
        }
    }

    fn next_xid(&mut self) -> i32 {
        // Positive, wrapping before the reserved negative ids.
        self.xid = if self.xid >= i32::MAX - 1 { 1 } else { self.xid + 1 };
        self.xid
    }

    /// Sends `op` with a watch for every path in `paths`, pipelined in batches, and returns each
    /// reply's error code and, for `getChildren` with no error, the children.
    async fn pipelined(
        &mut self,
        op: i32,
        paths: &[&str],
        what: &'static str,
    ) -> Result<Vec<(i32, Vec<String>)>, WireError> {
        let mut out = Vec::with_capacity(paths.len());
        // Bounded batches: a server stops reading a connection with too many requests
        // outstanding (`globalOutstandingLimit`, 1000 by default) while we would still be
        // writing, not yet reading its replies.
        for batch in paths.chunks(PIPELINE) {
            let mut req = Vec::new();
            let mut xids = Vec::with_capacity(batch.len());
            for path in batch {
                let xid = self.next_xid();
                watch_request(&mut req, xid, op, path);
                xids.push(xid);
            }
            self.send(&req, what).await?;
            for xid in xids {
                let f = self.next_reply(what).await?;
                let mut r = reply(&f).map_err(|e| self.protocol(e.to_string()))?;
                if r.xid != xid {
                    return Err(self.protocol(format!("reply {} where {xid} was due", r.xid)));
                }
                let kids = if r.err == 0 && op == OP_GET_CHILDREN {
                    r.body.strings().map_err(|e| self.protocol(e.to_string()))?
                } else {
                    Vec::new()
                };
                out.push((r.err, kids));
            }
        }
        Ok(out)
    }

    /// Lists the children of every path with a child watch; a missing node gets an existence
    /// watch instead (and is listed again if it appeared in between).
    pub(crate) async fn children(&mut self, paths: &[String]) -> Result<Vec<Listing>, WireError> {
        let mut out: Vec<Option<Listing>> = vec![None; paths.len()];
        let mut todo: Vec<usize> = (0..paths.len()).collect();
        // A node that keeps appearing between our two requests is listed again a few times; past
        // that the session is restarted rather than looping.
        for _ in 0..8 {
            if todo.is_empty() {
                break;
            }
            let asked: Vec<&str> = todo.iter().map(|&i| paths[i].as_str()).collect();
            let replies = self.pipelined(OP_GET_CHILDREN, &asked, "listing children").await?;
            let mut missing = Vec::new();
            for (&i, (err, kids)) in todo.iter().zip(replies) {
                match err {
                    0 => out[i] = Some(Listing::Children(kids)),
                    ERR_NO_NODE => missing.push(i),
                    code => return Err(self.server_error("getChildren", &paths[i], code)),
                }
            }
            let asked: Vec<&str> = missing.iter().map(|&i| paths[i].as_str()).collect();
            let replies = self.pipelined(OP_EXISTS, &asked, "watching for a node").await?;
            let mut again = Vec::new();
            for (&i, (err, _)) in missing.iter().zip(replies) {
                match err {
                    ERR_NO_NODE => out[i] = Some(Listing::Missing),
                    // Created since it was listed: list it again.
                    0 => again.push(i),
                    code => return Err(self.server_error("exists", &paths[i], code)),
                }
            }
            todo = again;
        }
        if !todo.is_empty() {
            return Err(self.protocol("nodes kept appearing and vanishing while listed".into()));
        }
        Ok(out.into_iter().map(|l| l.unwrap_or(Listing::Missing)).collect())
    }

    fn server_error(&self, op: &'static str, path: &str, code: i32) -> WireError {
        WireError::Server {
            server: self.server.clone(),
            op,
            path: path.to_string(),
            code,
        }
    }

    /// True when notifications are queued.
    pub(crate) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next watch notification, pinging the server while idle. An error when the server
    /// goes silent, closes the connection or expires the session.
    pub(crate) async fn next_event(&mut self) -> Result<Event, WireError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                if e.kind == EVENT_NONE && e.state == STATE_EXPIRED {
                    return Err(WireError::Expired {
                        server: self.server.clone(),
                    });
                }
                return Ok(e);
            }
            let ping_at = self.last_sent + self.ping_interval();
            let dead_at = self.last_received + self.read_timeout();
            if Instant::now() >= dead_at {
                return Err(WireError::Timeout {
                    what: "watching",
                    server: self.server.clone(),
                    after: self.read_timeout(),
                });
            }
            if Instant::now() >= ping_at {
                let mut req = Vec::new();
                frame(&mut req, |b| {
                    put_int(b, XID_PING);
                    put_int(b, OP_PING);
                });
                self.send(&req, "pinging").await?;
                continue;
            }
            let Some(f) = self.read_frame(ping_at.min(dead_at), "watching").await? else {
                continue;
            };
            let r = reply(&f).map_err(|e| self.protocol(e.to_string()))?;
            match r.xid {
                XID_PING => {}
                XID_WATCH => {
                    let mut body = r.body;
                    let ev = event(&mut body).map_err(|e| self.protocol(e.to_string()))?;
                    self.events.push_back(ev);
                }
                x => return Err(self.protocol(format!("reply {x} with no request outstanding"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_request_is_the_documented_record() {
        let f = connect_request(Duration::from_secs(10));
        // length, version 0, zxid 0, timeout 10000, session 0, passwd (16 zeros), readOnly false.
        assert_eq!(&f[..4], &(4 + 8 + 4 + 8 + 4 + 16 + 1u32).to_be_bytes());
        assert_eq!(&f[16..20], &10_000i32.to_be_bytes());
        assert_eq!(f.len(), 4 + 45);
    }

    #[test]
    fn records_decode_and_refuse_lies() {
        let mut b = Vec::new();
        put_int(&mut b, 2);
        put_string(&mut b, "a");
        put_string(&mut b, "bc");
        assert_eq!(Reader::new(&b).strings(), Ok(vec!["a".to_string(), "bc".to_string()]));
        // A count far beyond the bytes, a string longer than its record, a short header.
        let mut lie = Vec::new();
        put_int(&mut lie, i32::MAX);
        assert!(Reader::new(&lie).strings().is_err());
        let mut long = Vec::new();
        put_int(&mut long, 100);
        long.extend_from_slice(b"abc");
        assert!(Reader::new(&long).string().is_err());
        assert!(reply(&[0, 0, 0]).is_err());
        // Null string and vector read as empty.
        let mut null = Vec::new();
        put_int(&mut null, -1);
        assert_eq!(Reader::new(&null).strings(), Ok(vec![]));
        assert_eq!(Reader::new(&null).string(), Ok(String::new()));
    }

    #[test]
    fn a_notification_decodes() {
        let mut b = Vec::new();
        put_int(&mut b, XID_WATCH);
        put_long(&mut b, -1);
        put_int(&mut b, 0);
        put_int(&mut b, 4);
        put_int(&mut b, 3);
        put_string(&mut b, "/dubbo");
        let mut r = reply(&b).unwrap();
        assert_eq!(r.xid, XID_WATCH);
        assert_eq!(
            event(&mut r.body),
            Ok(Event {
                kind: 4,
                state: 3,
                path: "/dubbo".into()
            })
        );
    }

    /// A one-connection server that reads the connect request and answers `reply` (raw bytes).
    async fn fake(reply: Vec<u8>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 49];
            let _ = s.read_exact(&mut req).await;
            let _ = s.write_all(&reply).await;
            // Hold the connection open, silent.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        at
    }

    fn connect_reply(timeout_ms: i32) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, |b| {
            put_int(b, 0);
            put_int(b, timeout_ms);
            put_long(b, 0x1234);
            put_int(b, 16);
            b.extend_from_slice(&[7; 16]);
        });
        out
    }

    #[tokio::test]
    async fn a_session_opens_then_a_silent_server_times_out() {
        let at = fake(connect_reply(600)).await;
        let mut c = Conn::connect(&at, Duration::from_secs(2)).await.unwrap();
        assert_eq!((c.session, c.timeout), (0x1234, Duration::from_millis(600)));
        // Pings go out every 200 ms, no answer comes: dead after 400 ms.
        let started = Instant::now();
        let err = c.next_event().await.unwrap_err();
        assert!(matches!(err, WireError::Timeout { what: "watching", .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_refused_session_a_garbage_frame_and_a_closed_port_are_errors() {
        let at = fake(connect_reply(0)).await;
        let err = Conn::connect(&at, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, WireError::Refused { .. }), "{err}");

        let at = fake(vec![0xff, 0xff, 0xff, 0xf0]).await;
        let err = Conn::connect(&at, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().contains("frame length -16"), "{err}");

        let at = fake(vec![0x7f, 0, 0, 0]).await;
        let err = Conn::connect(&at, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().contains("frame length"), "{err}");

        let at = fake(connect_reply(600)[..10].to_vec()).await;
        let err = Conn::connect(&at, Duration::from_millis(300)).await.unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Timeout {
                    what: "opening a session",
                    ..
                }
            ),
            "{err}"
        );

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let err = Conn::connect(&closed, Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().starts_with("cannot connect to 127.0.0.1:"), "{err}");
    }
}

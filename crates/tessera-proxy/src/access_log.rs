//! Access logs, written off the request path.
//!
//! A request captures a small record (only the headers its formats name); the record goes into a
//! bounded channel; one writer thread formats and writes it. When the channel is full the record
//! is dropped and counted (`access_log.dropped`), never waited for.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Version};
use tessera_model::format::{HeaderRef, Op, Token};
use tessera_model::{AccessLog, LogFormat};

use crate::flags::ResponseFlags;
use crate::stats::Counter;
use crate::util::rfc3339;

/// Records waiting for the writer; beyond this they are dropped and counted.
const QUEUE: usize = 16 * 1024;

/// The writer's pause after each pass over the queue.
const NAP: Duration = Duration::from_millis(5);

/// The access logs of one filter chain, with the headers their formats need.
pub(crate) struct LogSpec {
    logs: Vec<AccessLog>,
    req_headers: Vec<HeaderName>,
    resp_headers: Vec<HeaderName>,
}

impl LogSpec {
    /// Compiles `logs`; `None` when there are none and nothing is reported, so requests skip
    /// their record entirely.
    pub(crate) fn new(logs: &[AccessLog]) -> Option<Arc<LogSpec>> {
        if logs.is_empty() && !crate::report::reporting() {
            return None;
        }
        let mut req = Vec::new();
        let mut resp = Vec::new();
        for l in logs {
            for t in l.format.tokens() {
                let (list, h) = match t {
                    Token::Op(Op::Req(h)) => (&mut req, h),
                    Token::Op(Op::Resp(h)) => (&mut resp, h),
                    _ => continue,
                };
                for name in std::iter::once(&h.name).chain(h.alt.iter()) {
                    if name.starts_with(':') {
                        continue;
                    }
                    if let Ok(n) = HeaderName::from_bytes(name.as_bytes())
                        && !list.contains(&n)
                    {
                        list.push(n);
                    }
                }
            }
        }
        Some(Arc::new(LogSpec {
            logs: logs.to_vec(),
            req_headers: req,
            resp_headers: resp,
        }))
    }
}

/// Everything an access-log line can print about one request or TCP connection.
pub(crate) struct LogRecord {
    pub(crate) spec: Arc<LogSpec>,
    pub(crate) start: SystemTime,
    pub(crate) method: Option<http::Method>,
    pub(crate) path: Option<String>,
    pub(crate) authority: Option<String>,
    pub(crate) scheme: &'static str,
    pub(crate) protocol: Option<Version>,
    pub(crate) req_headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) resp_headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) response_code: u16,
    pub(crate) flags: ResponseFlags,
    pub(crate) details: &'static str,
    pub(crate) bytes_received: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) duration: Option<Duration>,
    pub(crate) response_duration: Option<Duration>,
    pub(crate) upstream_host: Option<SocketAddr>,
    pub(crate) upstream_cluster: Option<String>,
    pub(crate) downstream_remote: SocketAddr,
    pub(crate) downstream_local: SocketAddr,
    pub(crate) route_name: Option<Arc<str>>,
    pub(crate) connection_id: u64,
    /// What the downstream TLS handshake negotiated, if the connection is TLS.
    pub(crate) tls: Option<Arc<crate::tls::TlsInfo>>,
    /// Why the upstream connection failed (`%UPSTREAM_TRANSPORT_FAILURE_REASON%`).
    pub(crate) upstream_failure: Option<String>,
    /// The RPC call, for requests of an RPC chain.
    pub(crate) rpc: Option<RpcLog>,
    /// A gRPC request, and its `grpc-status` when the proxy knows it.
    pub(crate) grpc: bool,
    pub(crate) grpc_status: Option<u32>,
    /// The sidecar's span, when tracing is on.
    pub(crate) trace: Option<tessera_telemetry::TraceContext>,
}

/// What an access log prints about an RPC call.
pub(crate) struct RpcLog {
    pub(crate) protocol: &'static str,
    pub(crate) service: String,
    pub(crate) method: String,
    /// The status in the protocol's own numbering, once there is a response.
    pub(crate) status: Option<u16>,
    pub(crate) request_id: u64,
}

impl LogRecord {
    /// A record for a connection or request starting now.
    pub(crate) fn new(spec: &Arc<LogSpec>, remote: SocketAddr, local: SocketAddr, connection_id: u64) -> LogRecord {
        LogRecord {
            spec: spec.clone(),
            start: SystemTime::now(),
            method: None,
            path: None,
            authority: None,
            scheme: "http",
            protocol: None,
            req_headers: Vec::new(),
            resp_headers: Vec::new(),
            response_code: 0,
            flags: ResponseFlags::NONE,
            details: "",
            bytes_received: 0,
            bytes_sent: 0,
            duration: None,
            response_duration: None,
            upstream_host: None,
            upstream_cluster: None,
            downstream_remote: remote,
            downstream_local: local,
            route_name: None,
            connection_id,
            tls: None,
            upstream_failure: None,
            rpc: None,
            grpc: false,
            grpc_status: None,
            trace: None,
        }
    }

    /// Captures the request line and the request headers the formats name.
    pub(crate) fn capture_request(&mut self, parts: &http::request::Parts, authority: &str) {
        self.method = Some(parts.method.clone());
        self.path = Some(
            parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
        );
        self.authority = Some(authority.to_string());
        self.protocol = Some(parts.version);
        capture(&self.spec.req_headers, &parts.headers, &mut self.req_headers);
    }

    /// Captures the response headers the formats name.
    pub(crate) fn capture_response(&mut self, headers: &HeaderMap) {
        if self.grpc
            && let Some(code) = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        {
            self.grpc_status = Some(code);
        }
        let spec = self.spec.clone();
        capture(&spec.resp_headers, headers, &mut self.resp_headers);
    }
}

fn capture(names: &[HeaderName], headers: &HeaderMap, out: &mut Vec<(HeaderName, HeaderValue)>) {
    for n in names {
        if let Some(v) = headers.get(n) {
            out.push((n.clone(), v.clone()));
        }
    }
}

/// The sending side, cloned into every worker.
#[derive(Clone)]
pub(crate) struct LogSink {
    tx: SyncSender<Box<LogRecord>>,
    dropped: Arc<Counter>,
    written: Arc<Counter>,
}

impl LogSink {
    /// Starts the writer thread. It ends when every sink is dropped, after writing what is queued.
    pub(crate) fn start(
        dropped: Arc<Counter>,
        written: Arc<Counter>,
        report: Option<Arc<crate::report::Report>>,
    ) -> io::Result<(LogSink, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel(QUEUE);
        let w = written.clone();
        let handle = std::thread::Builder::new()
            .name("tessera-access-log".into())
            .spawn(move || writer(rx, w, report))?;
        Ok((LogSink { tx, dropped, written }, handle))
    }

    /// Queues a record; never blocks.
    pub(crate) fn send(&self, rec: Box<LogRecord>) {
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    #[allow(dead_code)]
    pub(crate) fn written(&self) -> u64 {
        self.written.get()
    }
}

enum Out {
    Stdout(io::Stdout),
    Stderr(io::Stderr),
    File(BufWriter<File>),
}

impl Out {
    fn open(path: &str) -> io::Result<Out> {
        Ok(match path {
            "/dev/stdout" => Out::Stdout(io::stdout()),
            "/dev/stderr" => Out::Stderr(io::stderr()),
            p => Out::File(BufWriter::with_capacity(
                64 * 1024,
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Out::Stdout(s) => s.lock().write_all(b),
            Out::Stderr(s) => s.lock().write_all(b),
            Out::File(f) => f.write_all(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::Stdout(s) => s.lock().flush(),
            Out::Stderr(s) => s.lock().flush(),
            Out::File(f) => f.flush(),
        }
    }
}

fn writer(rx: Receiver<Box<LogRecord>>, written: Arc<Counter>, report: Option<Arc<crate::report::Report>>) {
    let mut outs: HashMap<String, Option<Out>> = HashMap::new();
    let mut line = String::with_capacity(512);
    loop {
        // Block for the first record, then drain whatever is queued before flushing once.
        let rec = match rx.recv() {
            Ok(r) => r,
            Err(_) => break,
        };
        let mut next = Some(rec);
        while let Some(rec) = next.take() {
            if let Some(r) = &report {
                r.report(&rec);
            }
            for log in &rec.spec.logs {
                line.clear();
                render(&log.format, &rec, &mut line);
                let out = outs.entry(log.path.clone()).or_insert_with(|| match Out::open(&log.path) {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::error!(path = %log.path, error = %e, "cannot open access log; its lines are discarded");
                        None
                    }
                });
                if let Some(o) = out {
                    if let Err(e) = o.write_all(line.as_bytes()) {
                        tracing::error!(path = %log.path, error = %e, "access log write failed");
                    } else {
                        written.inc();
                    }
                }
            }
            next = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
            };
        }
        for o in outs.values_mut().flatten() {
            let _ = o.flush();
        }
        // Nap before blocking again: a worker only pays a wake-up (a futex call on the request
        // path) when this thread is blocked, which under load this makes rare. Records wait at
        // most this long; the queue holds far more than arrives meanwhile.
        std::thread::sleep(NAP);
    }
    for o in outs.values_mut().flatten() {
        let _ = o.flush();
    }
}

/// Renders one line (text formats end as written; JSON gets a newline).
pub(crate) fn render(format: &LogFormat, rec: &LogRecord, out: &mut String) {
    match format {
        LogFormat::Text { tokens, .. } => {
            for t in tokens.iter() {
                match t {
                    Token::Literal(s) => out.push_str(s),
                    Token::Op(op) => match value(op, rec) {
                        Some(v) => out.push_str(&v),
                        None => out.push('-'),
                    },
                }
            }
        }
        LogFormat::Json { fields } => {
            let mut map = serde_json::Map::with_capacity(fields.len());
            for (key, _, tokens) in fields {
                let v = match tokens.as_slice() {
                    [Token::Op(op)] => match value(op, rec) {
                        Some(v) if op.is_numeric() => v.parse::<u64>().map_or(serde_json::Value::String(v), Into::into),
                        Some(v) => serde_json::Value::String(v),
                        None => serde_json::Value::Null,
                    },
                    _ => {
                        let mut s = String::new();
                        for t in tokens {
                            match t {
                                Token::Literal(l) => s.push_str(l),
                                Token::Op(op) => s.push_str(value(op, rec).as_deref().unwrap_or("-")),
                            }
                        }
                        serde_json::Value::String(s)
                    }
                };
                map.insert(key.clone(), v);
            }
            out.push_str(&serde_json::Value::Object(map).to_string());
            out.push('\n');
        }
    }
}

fn header(h: &HeaderRef, rec: &LogRecord, response: bool) -> Option<String> {
    let lookup = |name: &str| -> Option<String> {
        if !response {
            match name {
                ":method" => return rec.method.as_ref().map(|m| m.to_string()),
                ":path" => return rec.path.clone(),
                ":authority" => return rec.authority.clone(),
                ":scheme" => return rec.method.as_ref().map(|_| rec.scheme.to_string()),
                _ => {}
            }
        }
        let list = if response { &rec.resp_headers } else { &rec.req_headers };
        list.iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut v = lookup(&h.name).or_else(|| h.alt.as_deref().and_then(lookup))?;
    if let Some(max) = h.max_len
        && v.len() > max
    {
        let mut cut = max;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
    Some(v)
}

fn value(op: &Op, rec: &LogRecord) -> Option<String> {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis().to_string());
    match op {
        Op::StartTime => Some(rfc3339(rec.start)),
        Op::Req(h) => header(h, rec, false),
        Op::Resp(h) => header(h, rec, true),
        Op::Protocol if rec.rpc.is_some() => rec.rpc.as_ref().map(|r| r.protocol.to_string()),
        Op::Protocol => rec.protocol.map(|v| {
            match v {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_3 => "HTTP/3",
                _ => "HTTP/0.9",
            }
            .to_string()
        }),
        Op::ResponseCode => Some(rec.response_code.to_string()),
        Op::ResponseFlags => Some(rec.flags.to_string()),
        Op::ResponseCodeDetails => (!rec.details.is_empty()).then(|| rec.details.to_string()),
        Op::BytesReceived => Some(rec.bytes_received.to_string()),
        Op::BytesSent => Some(rec.bytes_sent.to_string()),
        Op::Duration => ms(rec.duration),
        Op::ResponseDuration => ms(rec.response_duration),
        Op::UpstreamHost => rec.upstream_host.map(|a| a.to_string()),
        Op::UpstreamCluster => rec.upstream_cluster.clone(),
        Op::DownstreamRemoteAddress => Some(rec.downstream_remote.to_string()),
        Op::DownstreamRemoteAddressWithoutPort => Some(rec.downstream_remote.ip().to_string()),
        Op::DownstreamLocalAddress => Some(rec.downstream_local.to_string()),
        Op::RouteName => rec.route_name.as_deref().map(str::to_string),
        Op::ConnectionId => Some(rec.connection_id.to_string()),
        Op::Hostname => hostname(),
        Op::UpstreamTransportFailureReason => rec.upstream_failure.clone(),
        Op::RpcService => rec
            .rpc
            .as_ref()
            .filter(|r| !r.service.is_empty())
            .map(|r| r.service.clone()),
        Op::RpcMethod => rec
            .rpc
            .as_ref()
            .filter(|r| !r.method.is_empty())
            .map(|r| r.method.clone()),
        Op::RpcStatus => rec.rpc.as_ref().and_then(|r| r.status).map(|s| s.to_string()),
        Op::RpcRequestId => rec.rpc.as_ref().map(|r| r.request_id.to_string()),
        tls_op => {
            let t = rec.tls.as_deref()?;
            let peer = t.peer.as_ref().map(|p| &p.info);
            let local = t.local.as_deref();
            let joined = |v: &[String]| (!v.is_empty()).then(|| v.join(","));
            match tls_op {
                Op::RequestedServerName => t.sni.clone(),
                Op::DownstreamTlsVersion => Some(t.version.to_string()),
                Op::DownstreamTlsCipher => Some(t.cipher.to_string()),
                Op::DownstreamPeerUriSan => peer.and_then(|p| joined(&p.uri)),
                Op::DownstreamPeerDnsSan => peer.and_then(|p| joined(&p.dns)),
                Op::DownstreamPeerSubject => peer.map(|p| p.subject.clone()),
                Op::DownstreamPeerIssuer => peer.map(|p| p.issuer.clone()),
                Op::DownstreamPeerSerial => peer.map(|p| p.serial.clone()),
                Op::DownstreamPeerFingerprint256 => t.peer.as_ref().map(|p| p.sha256.clone()),
                Op::DownstreamLocalUriSan => local.and_then(|l| joined(&l.uri)),
                Op::DownstreamLocalSubject => local.map(|l| l.subject.clone()),
                _ => None,
            }
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_model::format::parse;

    fn rec(format: LogFormat) -> LogRecord {
        let spec = LogSpec::new(&[AccessLog {
            path: "/dev/null".into(),
            format,
        }])
        .unwrap();
        let mut r = LogRecord::new(
            &spec,
            "10.0.0.1:5555".parse().unwrap(),
            "127.0.0.1:10000".parse().unwrap(),
            7,
        );
        let req = http::Request::builder()
            .method("POST")
            .uri("/a/b?c=d")
            .header("user-agent", "curl/8.0")
            .header("x-request-id", "abc")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        r.capture_request(&parts, "example.com");
        r.response_code = 503;
        r.flags = ResponseFlags::UPSTREAM_CONNECTION_FAILURE;
        r.duration = Some(Duration::from_millis(12));
        r.bytes_sent = 91;
        r.upstream_host = Some("127.0.0.1:18080".parse().unwrap());
        r
    }

    #[test]
    fn text_format_renders_envoy_style() {
        let src = "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %DURATION% %UPSTREAM_HOST% %REQ(USER-AGENT):4% %REQ(X-MISSING)% %BYTES_SENT% %CONNECTION_ID%\n";
        let f = LogFormat::Text {
            source: src.into(),
            tokens: parse(src).unwrap(),
        };
        let r = rec(f.clone());
        let mut out = String::new();
        render(&f, &r, &mut out);
        assert_eq!(out, "POST /a/b?c=d HTTP/1.1 503 UF 12 127.0.0.1:18080 curl - 91 7\n");
    }

    #[test]
    fn json_format_types_numbers_and_nulls() {
        let fields = vec![
            (
                "code".to_string(),
                "%RESPONSE_CODE%".to_string(),
                parse("%RESPONSE_CODE%").unwrap(),
            ),
            (
                "id".to_string(),
                "%REQ(X-REQUEST-ID)%".to_string(),
                parse("%REQ(X-REQUEST-ID)%").unwrap(),
            ),
            (
                "missing".to_string(),
                "%RESP(X-NOPE)%".to_string(),
                parse("%RESP(X-NOPE)%").unwrap(),
            ),
            (
                "mixed".to_string(),
                "%REQ(:METHOD)% to %REQ(:AUTHORITY)%".to_string(),
                parse("%REQ(:METHOD)% to %REQ(:AUTHORITY)%").unwrap(),
            ),
        ];
        let f = LogFormat::Json { fields };
        let r = rec(f.clone());
        let mut out = String::new();
        render(&f, &r, &mut out);
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["code"], 503);
        assert_eq!(v["id"], "abc");
        assert!(v["missing"].is_null());
        assert_eq!(v["mixed"], "POST to example.com");
    }

    #[test]
    fn full_queue_counts_drops_instead_of_blocking() {
        let (tx, _rx) = sync_channel(1);
        let sink = LogSink {
            tx,
            dropped: Arc::default(),
            written: Arc::default(),
        };
        let f = LogFormat::default_text();
        sink.send(Box::new(rec(f.clone())));
        sink.send(Box::new(rec(f.clone())));
        sink.send(Box::new(rec(f)));
        assert_eq!(sink.dropped.get(), 2);
    }
}

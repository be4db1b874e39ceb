//! A lean etcd v3 client: the JSON gateway etcd serves beside gRPC on its client port
//! (`POST /v3/kv/range`, `/v3/kv/put`, `/v3/kv/deleterange`, `/v3/kv/txn`, `/v3/watch`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`, `/v3/maintenance/status`),
//! HTTP/1.1 on hyper, keys and values base64, 64-bit numbers as JSON strings.
//!
//! Several endpoints: a call goes to the endpoint that last answered and, when that one cannot
//! be reached, times out or says it is unavailable (no leader, leader changed), to the next one,
//! each in turn; an answer that is etcd's own refusal (a bad request, a lease not found) is
//! returned at once. Every call is bounded: connecting by the dial timeout, the whole call by
//! the request timeout. Connections are kept and reused per endpoint.
//!
//! Why not the `etcd-client` crate: it brings tonic's transport and etcd's generated protobuf
//! (a few dozen crates to build on two cores) for nine requests the gateway answers in JSON.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use serde_json::{Value, json};

/// Largest unary answer read (etcd's own request limit is 1.5 MiB; a range can be larger).
const MAX_RESPONSE: usize = 256 << 20;
/// Largest single watch message (a batch of events).
const MAX_WATCH_MESSAGE: usize = 64 << 20;
/// Idle connections kept per endpoint.
const POOL: usize = 8;

/// What went wrong talking to etcd.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// One endpoint could not be reached, timed out, or said it cannot serve now.
    #[error("{endpoint}: {reason}")]
    Unavailable {
        /// `host:port`.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// No endpoint answered.
    #[error("no etcd endpoint answered: {0}")]
    AllFailed(String),
    /// etcd refused the request (gRPC status `code`).
    #[error("etcd refused the request: {message} (code {code})")]
    Refused {
        /// The gRPC status code.
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// The answer was not what the gateway sends.
    #[error("{endpoint}: unexpected answer: {reason}")]
    Protocol {
        /// `host:port`.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// A watch asked for a revision etcd has compacted away: read everything again.
    #[error("revision compacted (oldest kept: {0}); reading everything again")]
    Compacted(i64),
}

impl EtcdError {
    /// Worth trying the next endpoint.
    fn next_endpoint(&self) -> bool {
        matches!(self, EtcdError::Unavailable { .. } | EtcdError::Protocol { .. })
    }
}

/// gRPC codes meaning "this member cannot serve now": Unavailable, DeadlineExceeded, Aborted.
fn transient(code: i64) -> bool {
    matches!(code, 14 | 4 | 10)
}

/// One key-value pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (UTF-8 is not required by etcd; ours are).
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// Its lease, 0 for none.
    pub lease: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was written.
    Put(KeyValue),
    /// The key was deleted (or its lease expired).
    Delete(Vec<u8>),
}

/// A range's answer.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// The store's revision when read.
    pub revision: i64,
    /// What was found.
    pub kvs: Vec<KeyValue>,
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum TxnOp {
    /// Put `key` = `value`, attached to `lease` (0: none).
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Lease, 0 for none.
        lease: i64,
    },
    /// Delete `key`, or every key with the prefix `key` when `prefix`.
    Delete {
        /// Key or prefix.
        key: Vec<u8>,
        /// A prefix.
        prefix: bool,
    },
}

/// What a transaction did.
#[derive(Debug, Clone, Default)]
pub struct TxnResult {
    /// The compare held and the success branch ran.
    pub succeeded: bool,
    /// The store's revision after it.
    pub revision: i64,
    /// Per put, the previous pair if there was one; per delete, what it deleted.
    pub prev: Vec<Vec<KeyValue>>,
}

/// The key just past every key starting with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (or empty): every key from `prefix` on.
    vec![0]
}

fn b64(b: &[u8]) -> String {
    B64.encode(b)
}

/// A 64-bit number as the gateway writes it: a string, or absent for 0.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes_field(v: &Value, at: &str) -> Result<Vec<u8>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => B64.decode(s).map_err(|e| format!("{at}: not base64: {e}")),
        other => Err(format!("{at}: expected base64, not {other}")),
    }
}

fn key_value(v: &Value) -> Result<KeyValue, String> {
    Ok(KeyValue {
        key: bytes_field(&v["key"], "kv.key")?,
        value: bytes_field(&v["value"], "kv.value")?,
        mod_revision: int(&v["mod_revision"]),
        lease: int(&v["lease"]),
    })
}

fn kvs(v: &Value) -> Result<Vec<KeyValue>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a.iter().map(key_value).collect(),
        other => Err(format!("expected a list of pairs, not {other}")),
    }
}

struct Endpoint {
    /// `host:port`.
    authority: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// An etcd client on several endpoints (see the module docs).
pub struct Client {
    endpoints: Vec<Endpoint>,
    /// The endpoint that last answered.
    preferred: AtomicUsize,
    dial_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoint_names())
            .finish_non_exhaustive()
    }
}

/// An open watch (see [`Client::watch_prefix`]).
pub struct Watch {
    endpoint: usize,
    authority: String,
    body: Incoming,
    buf: Vec<u8>,
    _conn: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Closing the connection cancels the watch on the server.
        self._conn.abort();
    }
}

/// What one watch message brought.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    /// The store's revision with these events.
    pub revision: i64,
    /// In order; empty for a progress notice.
    pub events: Vec<Event>,
}

impl Client {
    /// A client on `endpoints` (`host:port`), in the order given.
    pub fn new(endpoints: Vec<String>, dial_timeout: Duration, request_timeout: Duration) -> Client {
        Client {
            endpoints: endpoints
                .into_iter()
                .map(|authority| Endpoint {
                    authority,
                    idle: Mutex::new(Vec::new()),
                })
                .collect(),
            preferred: AtomicUsize::new(0),
            dial_timeout,
            request_timeout,
        }
    }

    /// The endpoints, `host:port`.
    pub fn endpoint_names(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.authority.clone()).collect()
    }

    async fn connect(
        &self,
        ep: &Endpoint,
    ) -> Result<(SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>), EtcdError> {
        let unavailable = |reason: String| EtcdError::Unavailable {
            endpoint: ep.authority.clone(),
            reason,
        };
        let stream = tokio::time::timeout(self.dial_timeout, tokio::net::TcpStream::connect(ep.authority.as_str()))
            .await
            .map_err(|_| unavailable(format!("no connection within {:?} (dial_timeout)", self.dial_timeout)))?
            .map_err(|e| unavailable(format!("cannot connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(format!("HTTP handshake: {e}")))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((send, task))
    }

    fn request(
        ep: &Endpoint,
        path: &str,
        body: &Value,
        extra: Option<(&'static str, &'static str)>,
    ) -> hyper::Request<Full<Bytes>> {
        let mut b = hyper::Request::post(path)
            .header(hyper::header::HOST, ep.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some((k, v)) = extra {
            b = b.header(k, v);
        }
        b.body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| hyper::Request::new(Full::new(Bytes::new())))
    }

    /// Reads a unary answer: the JSON, or why not.
    async fn answer(ep: &Endpoint, resp: hyper::Response<Incoming>) -> Result<Value, EtcdError> {
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| EtcdError::Unavailable {
                endpoint: ep.authority.clone(),
                reason: format!("reading the answer: {e}"),
            })?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).map_err(|e| EtcdError::Protocol {
            endpoint: ep.authority.clone(),
            reason: format!(
                "HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        })?;
        if status.is_success() && v.get("error").is_none() {
            return Ok(v);
        }
        Err(status_error(&ep.authority, status.as_u16(), &v))
    }

    /// One call on one endpoint: a kept connection if one is idle, a new one otherwise.
    async fn call_on(&self, ep: &Endpoint, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let pooled = {
            let mut idle = ep.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut found = None;
            while let Some(s) = idle.pop() {
                if !s.is_closed() {
                    found = Some(s);
                    break;
                }
            }
            found
        };
        let fresh = pooled.is_none();
        let mut send = match pooled {
            Some(s) => s,
            None => self.connect(ep).await?.0,
        };
        let sent = async {
            send.ready().await?;
            send.send_request(Self::request(ep, path, body, None)).await
        }
        .await;
        let resp = match sent {
            Ok(r) => r,
            // A kept connection the server closed meanwhile: once more on a new one.
            Err(_) if !fresh => {
                send = self.connect(ep).await?.0;
                send.ready().await.map_err(|e| EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason: e.to_string(),
                })?;
                send.send_request(Self::request(ep, path, body, None))
                    .await
                    .map_err(|e| EtcdError::Unavailable {
                        endpoint: ep.authority.clone(),
                        reason: e.to_string(),
                    })?
            }
            Err(e) => {
                return Err(EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let v = Self::answer(ep, resp).await?;
        let mut idle = ep.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < POOL && !send.is_closed() {
            idle.push(send);
        }
        Ok(v)
    }

    /// A call, failing over (see the module docs).
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(EtcdError::AllFailed("no endpoint configured".into()));
        }
        let start = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let ep = &self.endpoints[idx];
            let r = match tokio::time::timeout(self.request_timeout, self.call_on(ep, path, &body)).await {
                Ok(r) => r,
                Err(_) => Err(EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason: format!("{path}: no answer within {:?} (request_timeout)", self.request_timeout),
                }),
            };
            match r {
                Ok(v) => {
                    if idx != start {
                        self.preferred.store(idx, Ordering::Relaxed);
                        tracing::info!(endpoint = %ep.authority, "etcd: now using this endpoint");
                    }
                    return Ok(v);
                }
                Err(e) if e.next_endpoint() => {
                    tracing::debug!(error = %e, "etcd: trying the next endpoint");
                    errors.push(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::AllFailed(errors.join("; ")))
    }

    /// Every pair whose key starts with `prefix`, and the revision read at.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<Range, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix), "range_end": b64(&prefix_end(prefix))}),
            )
            .await?;
        Ok(Range {
            revision: int(&v["header"]["revision"]),
            kvs: kvs(&v["kvs"]).map_err(|reason| EtcdError::Protocol {
                endpoint: "range".into(),
                reason,
            })?,
        })
    }

    /// One key, if present.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key)})).await?;
        let mut list = kvs(&v["kvs"]).map_err(|reason| EtcdError::Protocol {
            endpoint: "range".into(),
            reason,
        })?;
        Ok(list.pop())
    }

    /// Writes `key` = `value` (attached to `lease` unless 0); the revision and the previous pair.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<(i64, Option<KeyValue>), EtcdError> {
        let mut body = json!({"key": b64(key), "value": b64(value), "prev_kv": true});
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let v = self.call("/v3/kv/put", body).await?;
        let prev = match &v["prev_kv"] {
            Value::Null => None,
            p => Some(key_value(p).map_err(|reason| EtcdError::Protocol {
                endpoint: "put".into(),
                reason,
            })?),
        };
        Ok((int(&v["header"]["revision"]), prev))
    }

    /// Deletes `key` (every key with that prefix when `prefix`); the revision and what went.
    pub async fn delete(&self, key: &[u8], prefix: bool) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let mut body = json!({"key": b64(key), "prev_kv": true});
        if prefix {
            body["range_end"] = json!(b64(&prefix_end(key)));
        }
        let v = self.call("/v3/kv/deleterange", body).await?;
        let prev = kvs(&v["prev_kvs"]).map_err(|reason| EtcdError::Protocol {
            endpoint: "deleterange".into(),
            reason,
        })?;
        Ok((int(&v["header"]["revision"]), prev))
    }

    /// If `must_exist` exists (its version is above 0), runs `ops` atomically.
    pub async fn txn_if_exists(&self, must_exist: &[u8], ops: &[TxnOp]) -> Result<TxnResult, EtcdError> {
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, value, lease } => {
                    let mut p = json!({"key": b64(key), "value": b64(value), "prev_kv": true});
                    if *lease != 0 {
                        p["lease"] = json!(lease.to_string());
                    }
                    json!({"request_put": p})
                }
                TxnOp::Delete { key, prefix } => {
                    let mut d = json!({"key": b64(key), "prev_kv": true});
                    if *prefix {
                        d["range_end"] = json!(b64(&prefix_end(key)));
                    }
                    json!({"request_delete_range": d})
                }
            })
            .collect();
        let body = json!({
            "compare": [{"target": "VERSION", "result": "GREATER", "key": b64(must_exist), "version": "0"}],
            "success": success,
        });
        let v = self.call("/v3/kv/txn", body).await?;
        let protocol = |reason: String| EtcdError::Protocol {
            endpoint: "txn".into(),
            reason,
        };
        let mut prev = Vec::new();
        for r in v["responses"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(p) = r.get("response_put") {
                prev.push(match &p["prev_kv"] {
                    Value::Null => Vec::new(),
                    kv => vec![key_value(kv).map_err(protocol)?],
                });
            } else if let Some(d) = r.get("response_delete_range") {
                prev.push(kvs(&d["prev_kvs"]).map_err(protocol)?);
            }
        }
        Ok(TxnResult {
            succeeded: v["succeeded"].as_bool().unwrap_or(false),
            revision: int(&v["header"]["revision"]),
            prev,
        })
    }

    /// A lease of `ttl` seconds (etcd may raise it to its minimum); its id.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", json!({"TTL": ttl.to_string()})).await?;
        if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
            return Err(EtcdError::Refused {
                code: 0,
                message: e.to_string(),
            });
        }
        match int(&v["ID"]) {
            0 => Err(EtcdError::Protocol {
                endpoint: "lease/grant".into(),
                reason: format!("no lease id in {v}"),
            }),
            id => Ok(id),
        }
    }

    /// Renews `lease` once; its TTL in seconds, 0 when it has expired (or never was).
    pub async fn lease_keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        // A streaming call: the first message answers this one request.
        let v = self
            .call_stream_first("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        Ok(int(&v["result"]["TTL"]))
    }

    /// Revokes `lease` (its keys are deleted); a lease already gone is no error.
    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", json!({"ID": lease.to_string()})).await {
            Ok(_) => Ok(()),
            // NotFound: the lease expired already.
            Err(EtcdError::Refused { code: 5, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks endpoint `idx` for its status; an error when it cannot be reached or has no leader.
    pub async fn probe(&self, idx: usize) -> Result<(), EtcdError> {
        let Some(ep) = self.endpoints.get(idx) else {
            return Err(EtcdError::AllFailed("no such endpoint".into()));
        };
        let v = match tokio::time::timeout(
            self.request_timeout,
            self.call_on(ep, "/v3/maintenance/status", &json!({})),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason: format!("status: no answer within {:?}", self.request_timeout),
                });
            }
        };
        // Member ids are unsigned 64-bit: compared as text, absent or "0" for none.
        if matches!(v["leader"].as_str(), None | Some("" | "0")) {
            return Err(EtcdError::Unavailable {
                endpoint: ep.authority.clone(),
                reason: "this member has no leader".into(),
            });
        }
        Ok(())
    }

    /// A streaming call whose first message is the answer (lease keepalive), failing over.
    async fn call_stream_first(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let ep = &self.endpoints[idx];
            let attempt = async {
                let (mut send, conn) = self.connect(ep).await?;
                let unavailable = |reason: String| EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason,
                };
                let r = async {
                    send.ready().await.map_err(|e| unavailable(e.to_string()))?;
                    let resp = send
                        .send_request(Self::request(ep, path, &body, None))
                        .await
                        .map_err(|e| unavailable(e.to_string()))?;
                    let status = resp.status();
                    let mut body = resp.into_body();
                    let mut buf = Vec::new();
                    let v = next_message(&ep.authority, &mut body, &mut buf).await?;
                    if !status.is_success() || v.get("error").is_some() {
                        return Err(status_error(
                            &ep.authority,
                            status.as_u16(),
                            v.get("error").unwrap_or(&v),
                        ));
                    }
                    Ok(v)
                }
                .await;
                conn.abort();
                r
            };
            let r = match tokio::time::timeout(self.request_timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Err(EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason: format!("{path}: no answer within {:?}", self.request_timeout),
                }),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if e.next_endpoint() => errors.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::AllFailed(errors.join("; ")))
    }

    /// Watches every key starting with `prefix` from `start_revision` on, on the first endpoint
    /// (from the one that last answered) that accepts; returns once etcd confirmed the watch.
    /// The watch asks for a member with a leader: one that loses it ends the watch. A start
    /// revision etcd has compacted away is confirmed first, then ended: [`Watch::next`] returns
    /// [`EtcdError::Compacted`].
    pub async fn watch_prefix(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        let body = json!({"create_request": {
            "key": b64(prefix), "range_end": b64(&prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        for i in 0..n {
            let idx = (start + i) % n;
            let ep = &self.endpoints[idx];
            let attempt = async {
                let (mut send, conn) = self.connect(ep).await?;
                let unavailable = |reason: String| EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason,
                };
                send.ready().await.map_err(|e| unavailable(e.to_string()))?;
                // gRPC metadata through the gateway: etcd's "require leader" for watches.
                let req = Self::request(ep, "/v3/watch", &body, Some(("grpc-metadata-hasleader", "true")));
                let resp = send.send_request(req).await.map_err(|e| unavailable(e.to_string()))?;
                let status = resp.status();
                let mut w = Watch {
                    endpoint: idx,
                    authority: ep.authority.clone(),
                    body: resp.into_body(),
                    buf: Vec::new(),
                    _conn: conn,
                };
                if !status.is_success() {
                    let v = next_message(&ep.authority, &mut w.body, &mut w.buf).await?;
                    return Err(status_error(
                        &ep.authority,
                        status.as_u16(),
                        v.get("error").unwrap_or(&v),
                    ));
                }
                // The first message confirms (or refuses) the watch.
                w.next().await?;
                Ok(w)
            };
            let r = match tokio::time::timeout(self.request_timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Err(EtcdError::Unavailable {
                    endpoint: ep.authority.clone(),
                    reason: format!("watch: not confirmed within {:?}", self.request_timeout),
                }),
            };
            match r {
                Ok(w) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(w);
                }
                Err(e) if e.next_endpoint() => errors.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::AllFailed(errors.join("; ")))
    }
}

fn status_error(endpoint: &str, http: u16, v: &Value) -> EtcdError {
    let code = v.get("code").or_else(|| v.get("grpc_code")).map_or(0, int);
    let message = v
        .get("message")
        .or_else(|| v.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if transient(code) || (code == 0 && http >= 500) {
        EtcdError::Unavailable {
            endpoint: endpoint.to_string(),
            reason: format!("HTTP {http}: {message}"),
        }
    } else {
        EtcdError::Refused { code, message }
    }
}

/// The next newline-delimited JSON message of a streaming answer.
async fn next_message(endpoint: &str, body: &mut Incoming, buf: &mut Vec<u8>) -> Result<Value, EtcdError> {
    loop {
        if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            return serde_json::from_slice(line).map_err(|e| EtcdError::Protocol {
                endpoint: endpoint.to_string(),
                reason: format!("a stream message is not JSON: {e}"),
            });
        }
        if buf.len() > MAX_WATCH_MESSAGE {
            return Err(EtcdError::Protocol {
                endpoint: endpoint.to_string(),
                reason: format!("a stream message is larger than {MAX_WATCH_MESSAGE} bytes"),
            });
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Err(EtcdError::Unavailable {
                    endpoint: endpoint.to_string(),
                    reason: format!("stream broken: {e}"),
                });
            }
            None => {
                // A last message without its newline.
                let rest = std::mem::take(buf);
                let rest = rest.trim_ascii();
                if !rest.is_empty()
                    && let Ok(v) = serde_json::from_slice(rest)
                {
                    return Ok(v);
                }
                return Err(EtcdError::Unavailable {
                    endpoint: endpoint.to_string(),
                    reason: "the server ended the stream".into(),
                });
            }
        }
    }
}

/// Reads one watch message into a batch.
pub fn watch_message(v: &Value) -> Result<WatchBatch, WatchEnd> {
    if let Some(e) = v.get("error") {
        return Err(WatchEnd::Error(e.clone()));
    }
    let r = &v["result"];
    if r.is_null() {
        return Err(WatchEnd::Malformed(format!("no `result` in {v}")));
    }
    if r["canceled"].as_bool().unwrap_or(false) {
        let compact = int(&r["compact_revision"]);
        if compact > 0 {
            return Err(WatchEnd::Compacted(compact));
        }
        return Err(WatchEnd::Canceled(
            r["cancel_reason"]
                .as_str()
                .unwrap_or("canceled by the server")
                .to_string(),
        ));
    }
    let mut events = Vec::new();
    for e in r["events"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let kv = key_value(&e["kv"]).map_err(WatchEnd::Malformed)?;
        // PUT is the enum's zero: the gateway leaves it out.
        match e["type"].as_str() {
            None | Some("PUT") => events.push(Event::Put(kv)),
            Some("DELETE") => events.push(Event::Delete(kv.key)),
            Some(other) => return Err(WatchEnd::Malformed(format!("unknown event type `{other}`"))),
        }
    }
    Ok(WatchBatch {
        revision: int(&r["header"]["revision"]),
        events,
    })
}

/// Why a watch message ends the watch.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEnd {
    /// An error message from the gateway.
    Error(Value),
    /// The revision asked for is compacted.
    Compacted(i64),
    /// The server canceled the watch.
    Canceled(String),
    /// Not a watch message.
    Malformed(String),
}

impl Watch {
    /// The index of the endpoint this watch is on (for [`Client::probe`]).
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// `host:port` of the endpoint.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The next message: events, a progress notice, or why the watch ended.
    pub async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        let v = next_message(&self.authority, &mut self.body, &mut self.buf).await?;
        watch_message(&v).map_err(|end| match end {
            WatchEnd::Compacted(r) => EtcdError::Compacted(r),
            WatchEnd::Error(e) => status_error(&self.authority, 0, &e),
            WatchEnd::Canceled(reason) => EtcdError::Unavailable {
                endpoint: self.authority.clone(),
                reason: format!("watch canceled: {reason}"),
            },
            WatchEnd::Malformed(reason) => EtcdError::Protocol {
                endpoint: self.authority.clone(),
                reason,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn watch_messages_as_etcd_3_4_writes_them() {
        let put = serde_json::from_str::<Value>(r#"{"result":{"header":{"revision":"7"},"events":[{"kv":{"key":"L3QvYQ==","create_revision":"2","mod_revision":"7","version":"1","value":"aGVsbG8=","lease":"42"}},{"type":"DELETE","kv":{"key":"L3QvYg==","mod_revision":"7"}}]}}"#).unwrap();
        let b = watch_message(&put).unwrap();
        assert_eq!(b.revision, 7);
        assert_eq!(
            b.events,
            [
                Event::Put(KeyValue {
                    key: b"/t/a".to_vec(),
                    value: b"hello".to_vec(),
                    mod_revision: 7,
                    lease: 42
                }),
                Event::Delete(b"/t/b".to_vec())
            ]
        );
        let created =
            serde_json::from_str::<Value>(r#"{"result":{"header":{"revision":"2"},"created":true}}"#).unwrap();
        assert!(watch_message(&created).unwrap().events.is_empty());
        let compacted = serde_json::from_str::<Value>(
            r#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"3"}}"#,
        )
        .unwrap();
        assert_eq!(watch_message(&compacted).unwrap_err(), WatchEnd::Compacted(3));
        let bad = serde_json::from_str::<Value>(r#"{"result":{"events":[{"kv":{"key":"!!"}}]}}"#).unwrap();
        assert!(matches!(watch_message(&bad), Err(WatchEnd::Malformed(_))));
        let err = serde_json::from_str::<Value>(
            r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}"#,
        )
        .unwrap();
        assert!(matches!(watch_message(&err), Err(WatchEnd::Error(_))));
        assert!(matches!(
            status_error("e", 0, &err["error"]),
            EtcdError::Unavailable { .. }
        ));
    }
}

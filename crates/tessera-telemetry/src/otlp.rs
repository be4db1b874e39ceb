//! OTLP trace export (cargo feature `otlp`): one span per sampled event, sent as OTLP/HTTP with
//! the JSON encoding (`POST /v1/traces`, `application/json`) to a collector.
//!
//! The export thread is a plain thread, so the request is a blocking HTTP/1.1 POST on a fresh
//! connection per batch, bounded by `timeout` for connecting, writing and reading the status
//! line. A collector that is down or answers an error fails the batch (counted by the reporter,
//! logged at most every 10 s); spans are not retried. JSON encoding per the OTLP spec: trace and
//! span ids as hex, 64-bit integers as decimal strings, enums as numbers.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::event::{Event, Kind, ReporterSide};
use crate::sink::{Sink, SinkError};

/// Where and as whom spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP address (usually port 4318).
    pub address: SocketAddr,
    /// The request path; OTLP's default is `/v1/traces`.
    pub path: String,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Bound on connecting, sending and reading the answer.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// Defaults (`/v1/traces`, 2 s) for `address` and `service_name`.
    pub fn new(address: SocketAddr, service_name: impl Into<String>) -> OtlpConfig {
        OtlpConfig {
            address,
            path: "/v1/traces".into(),
            service_name: service_name.into(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// The OTLP/HTTP JSON trace sink.
pub struct OtlpSink {
    cfg: OtlpConfig,
    body: Vec<u8>,
}

impl OtlpSink {
    /// A sink sending to `cfg.address`; nothing is connected until the first batch.
    pub fn new(cfg: OtlpConfig) -> OtlpSink {
        OtlpSink { cfg, body: Vec::new() }
    }

    fn post(&mut self) -> Result<(), SinkError> {
        let io = |what: &'static str| move |source| SinkError::Io { what, source };
        let mut s = TcpStream::connect_timeout(&self.cfg.address, self.cfg.timeout)
            .map_err(io("connect to the OTLP collector"))?;
        s.set_write_timeout(Some(self.cfg.timeout))
            .map_err(io("set a write timeout"))?;
        s.set_read_timeout(Some(self.cfg.timeout))
            .map_err(io("set a read timeout"))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.cfg.path,
            self.cfg.address,
            self.body.len()
        );
        s.write_all(head.as_bytes()).map_err(io("send spans"))?;
        s.write_all(&self.body).map_err(io("send spans"))?;
        let mut status = String::new();
        BufReader::new(s)
            .read_line(&mut status)
            .map_err(io("read the collector's answer"))?;
        let code = status.split_whitespace().nth(1).unwrap_or("");
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(SinkError::Other(format!(
                "OTLP collector at {} answered `{}`",
                self.cfg.address,
                status.trim_end()
            )))
        }
    }
}

impl Sink for OtlpSink {
    fn name(&self) -> &str {
        "otlp"
    }

    fn export(&mut self, batch: &[Event]) -> Result<(), SinkError> {
        let spans: Vec<Value> = batch.iter().filter_map(span).collect();
        if spans.is_empty() {
            return Ok(());
        }
        let doc = json!({
            "resourceSpans": [{
                "resource": { "attributes": [attr_str("service.name", &self.cfg.service_name)] },
                "scopeSpans": [{
                    "scope": { "name": "tessera", "version": env!("CARGO_PKG_VERSION") },
                    "spans": spans,
                }],
            }],
        });
        self.body.clear();
        serde_json::to_writer(&mut self.body, &doc).map_err(|e| SinkError::Other(e.to_string()))?;
        self.post()
    }
}

fn attr_str(key: &str, value: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": value } })
}

fn attr_int(key: &str, value: u64) -> Value {
    json!({ "key": key, "value": { "intValue": value.to_string() } })
}

/// The span of one sampled event, as OTLP JSON.
fn span(e: &Event) -> Option<Value> {
    let t = e.trace.as_ref()?;
    if !t.sampling.is_sampled() {
        return None;
    }
    let start = e.start_time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let end = start + e.duration;
    let name = match (&e.kind, &e.method, &e.authority) {
        (Kind::Tcp, _, _) => "tcp".to_string(),
        (_, Some(m), Some(a)) => format!("{m} {a}"),
        (_, Some(m), None) => m.clone(),
        _ => e.request_protocol().to_string(),
    };
    let mut attrs = vec![
        attr_str("component", "proxy"),
        attr_str("request.protocol", e.request_protocol()),
        attr_str("response_flags", &e.response_flags),
    ];
    if let Some(m) = &e.method {
        attrs.push(attr_str("http.method", m));
    }
    if let Some(p) = &e.path {
        attrs.push(attr_str("http.url", p));
    }
    if e.response_code != 0 {
        attrs.push(attr_int("http.status_code", u64::from(e.response_code)));
    }
    if let Some(c) = &e.upstream_cluster {
        attrs.push(attr_str("upstream_cluster", c));
    }
    if let Some(h) = &e.upstream_host {
        attrs.push(attr_str("upstream_address", &h.to_string()));
    }
    if let Some(s) = &e.destination_service {
        attrs.push(attr_str("istio.canonical_service", s));
    }
    attrs.push(attr_int("request_size", e.bytes_received()));
    attrs.push(attr_int("response_size", e.bytes_sent()));
    // SPAN_KIND_SERVER = 2 for the called side, SPAN_KIND_CLIENT = 3 for the caller.
    let kind = match e.reporter {
        ReporterSide::Destination => 2,
        ReporterSide::Source => 3,
    };
    // STATUS_CODE_ERROR = 2 for a 5xx or a failed connection; UNSET otherwise, as Envoy does.
    let error = e.response_code >= 500 || (e.response_code == 0 && e.response_flags != "-");
    let mut span = json!({
        "traceId": format!("{:032x}", t.trace_id.get()),
        "spanId": format!("{:016x}", t.span_id.get()),
        "name": name,
        "kind": kind,
        "startTimeUnixNano": start.as_nanos().to_string(),
        "endTimeUnixNano": end.as_nanos().to_string(),
        "attributes": attrs,
        "status": { "code": if error { 2 } else { 0 } },
    });
    if let (Some(p), Some(obj)) = (t.parent_span_id, span.as_object_mut()) {
        obj.insert("parentSpanId".into(), Value::String(format!("{:016x}", p.get())));
    }
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Sampling, SpanId, TraceContext, TraceId};

    fn event(sampling: Sampling) -> Event {
        let mut e = Event::new(Kind::Http, ReporterSide::Destination);
        e.method = Some("GET".into());
        e.authority = Some("shop".into());
        e.path = Some("/a?b=1".into());
        e.response_code = 503;
        e.duration = Duration::from_millis(3);
        e.trace = Some(TraceContext {
            trace_id: TraceId::new(0xabc).unwrap(),
            span_id: SpanId::new(0x12).unwrap(),
            parent_span_id: SpanId::new(0x34),
            sampling,
        });
        e
    }

    #[test]
    fn spans_carry_hex_ids_parent_times_and_status() {
        let s = span(&event(Sampling::Sampled)).unwrap();
        assert_eq!(s["traceId"], "00000000000000000000000000000abc");
        assert_eq!(s["spanId"], "0000000000000012");
        assert_eq!(s["parentSpanId"], "0000000000000034");
        assert_eq!(s["name"], "GET shop");
        assert_eq!(s["kind"], 2);
        assert_eq!(s["status"]["code"], 2, "a 503 is an error");
        let start: u128 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u128 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert_eq!(end - start, 3_000_000);
        assert!(
            span(&event(Sampling::NotSampled)).is_none(),
            "unsampled traces are not exported"
        );
        let mut untraced = event(Sampling::Sampled);
        untraced.trace = None;
        assert!(span(&untraced).is_none());
    }

    #[test]
    fn a_dead_collector_fails_the_batch() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut sink = OtlpSink::new(OtlpConfig::new(dead, "t"));
        assert!(sink.export(&[event(Sampling::Sampled)]).is_err());
        assert!(sink.export(&[event(Sampling::NotSampled)]).is_ok(), "nothing to send");
    }
}

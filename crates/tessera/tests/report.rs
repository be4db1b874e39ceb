//! Report (issue 7): Istio's standard metrics on `/stats/prometheus` (read by the real Python
//! `prometheus_client` parser, which `.ci/run` installs), statsd datagrams read by a UDP socket
//! in the test, a JSON access log written off the request path, and a dead statsd server that
//! slows nothing.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn sidecar(telemetry: &str, upstream: SocketAddr, dir: &TempDir) -> (Proc, SocketAddr, SocketAddr) {
    let routes =
        "          - match: { prefix: /missing }\n            direct_response: { status: 404, body: \"nothing here\" }";
    let (p, listen, admin) = start_ready(
        dir,
        &ingress_yaml(&format!("telemetry:\n{telemetry}"), "", routes, upstream),
    );
    (p, listen, admin)
}

fn get(url: &str) -> String {
    curl_ok(&["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
}

/// Polls `/stats/prometheus` until `want` shows (the export thread batches every 100 ms here).
fn prometheus_until(admin: SocketAddr, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = curl_ok(&[&format!("http://{admin}/stats/prometheus")]);
        if text.contains(want) {
            return text;
        }
        assert!(Instant::now() < deadline, "never saw {want:?} in\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn istio_metrics_statsd_and_access_log() {
    let (_svc, svc) = sample_service("reviews");
    let dir = TempDir::new("report");
    let statsd = UdpSocket::bind("127.0.0.1:0").unwrap();
    statsd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let log = dir.path("access.json");
    let telemetry = format!(
        r#"  flush_interval: 100ms
  workload: {{ name: reviews-v1, namespace: shop, app: reviews, version: v1 }}
  statsd: {{ address: "{}", prefix: mesh }}
  access_log: {{ path: "{}", max_bytes: 1048576, max_files: 2 }}"#,
        statsd.local_addr().unwrap(),
        log.display()
    );
    let (_p, listen, admin) = sidecar(&telemetry, svc, &dir);
    for _ in 0..3 {
        assert_eq!(get(&format!("http://{listen}/hello")), "200");
    }
    assert_eq!(get(&format!("http://{listen}/missing")), "404");

    let text = prometheus_until(admin, "response_code=\"404\"");
    // Istio's names and labels, as its dashboards query them.
    let ok = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("no 200 series in\n{text}"));
    for label in [
        "reporter=\"destination\"",
        "destination_workload=\"reviews-v1\"",
        "destination_workload_namespace=\"shop\"",
        "destination_app=\"reviews\"",
        "destination_version=\"v1\"",
        "source_workload=\"unknown\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"none\"",
    ] {
        assert!(ok.contains(label), "missing {label} in {ok}");
    }
    assert!(ok.trim_end().ends_with(" 3"), "three requests: {ok}");
    assert!(text.contains("istio_request_duration_milliseconds_bucket{"), "{text}");
    assert!(text.contains("istio_response_bytes_sum{"), "{text}");

    // The real parser reads every family, and agrees on the count.
    let file = dir.write("metrics.txt", &text);
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
total = 0
names = set()
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    names.add(fam.name)
    if fam.name == "istio_requests":
        for s in fam.samples:
            if s.name == "istio_requests_total":
                total += s.value
print(int(total), " ".join(sorted(names)))
"#;
    let out = Command::new("python3")
        .args(["-c", script, file.to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "prometheus_client rejected the text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.starts_with("4 "), "four requests in istio_requests_total: {out}");
    for family in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ] {
        assert!(out.contains(family), "{family} not parsed: {out}");
    }

    // statsd: real datagrams, DogStatsD tags.
    let mut buf = [0u8; 2048];
    let mut lines = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lines.contains("response_code:404") && Instant::now() < deadline {
        if let Ok(n) = statsd.recv(&mut buf) {
            lines.push_str(&String::from_utf8_lossy(&buf[..n]));
            lines.push('\n');
        }
    }
    assert!(lines.contains("mesh.requests_total:1|c|#"), "{lines}");
    assert!(lines.contains("response_code:404"), "{lines}");
    assert!(lines.contains("mesh.request_duration_milliseconds:"), "{lines}");
    assert!(lines.contains("destination_service_name:127.0.0.1,"), "{lines}");

    // The JSON access log, one object per request.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while text.lines().count() < 4 && Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(text.lines().count(), 4, "{text}");
    let last = text.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).expect("a JSON line");
    assert_eq!(v["response_code"], 404, "{last}");
    assert_eq!(v["path"], "/missing", "{last}");
}

/// A statsd address nobody listens on and a tiny queue: requests are not slowed, and what the
/// export thread could not keep up with is dropped and counted.
#[test]
fn a_failing_sink_never_slows_requests() {
    let (_svc, svc) = sample_service("ratings");
    let dir = TempDir::new("report-dead");
    let dead = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let telemetry = format!(
        "  queue: 16\n  flush_interval: 1s\n  statsd: {{ address: \"{dead}\" }}\n  access_log: {{ path: \"{}\" }}",
        dir.path("a.log").display()
    );
    let (_p, listen, admin) = sidecar(&telemetry, svc, &dir);
    // h2load: 2,000 requests on 10 connections, each answered.
    let out = Command::new("h2load")
        .args(["--h1", "-n", "2000", "-c", "10", &format!("http://{listen}/")])
        .output()
        .expect("h2load");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("2000 succeeded"), "{out}");
    let text = prometheus_until(admin, "tessera_telemetry_events_dropped_total");
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let accepted = value("tessera_telemetry_events_accepted_total");
    let dropped = value("tessera_telemetry_events_dropped_total");
    assert!(accepted > 0, "{text}");
    assert!(accepted + dropped <= 2000, "{accepted} + {dropped}");
}

/// A collector stand-in: accepts OTLP/HTTP POSTs on loopback and hands their bodies over. (No
/// OpenTelemetry collector runs here; the bodies are checked against the real OTLP protobuf
/// schema with the `opentelemetry-proto` package, which `.ci/run` installs.)
fn collector() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            let mut line = String::new();
            let mut first = true;
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if first {
                    assert!(line.starts_with("POST /v1/traces HTTP/1.1"), "{line}");
                    first = false;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_ok() {
                let _ = (&s).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
            }
        }
    });
    (addr, rx)
}

#[test]
fn traces_are_propagated_and_exported_over_otlp() {
    let (_svc, svc) = sample_service("traced");
    let dir = TempDir::new("report-otlp");
    let (addr, bodies) = collector();
    let telemetry = format!(
        "  flush_interval: 100ms\n  workload: {{ name: traced-v1 }}\n  tracing: {{ otlp: \"{addr}\", sampling: 100 }}"
    );
    let (_p, listen, _admin) = sidecar(&telemetry, svc, &dir);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let seen = curl_ok(&[
        "-s",
        "-H",
        &format!("traceparent: 00-{trace}-{caller}-01"),
        &format!("http://{listen}/headers"),
    ]);
    let seen: serde_json::Value = serde_json::from_str(&seen).expect("the sample service's JSON");
    let forwarded = seen["headers"]["traceparent"].as_str().expect("traceparent forwarded");
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(parts.len(), 4, "{forwarded}");
    assert_eq!(parts[1], trace, "same trace");
    assert_ne!(parts[2], caller, "the sidecar's own span is the upstream's parent");
    assert_eq!(parts[3], "01", "sampled");
    // B3 multi headers are rewritten the same way.
    let seen = curl_ok(&[
        "-s",
        "-H",
        "x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124",
        "-H",
        "x-b3-spanid: a2fb4a1d1a96d312",
        "-H",
        "x-b3-sampled: 1",
        &format!("http://{listen}/headers"),
    ]);
    let seen: serde_json::Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(seen["headers"]["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(seen["headers"]["x-b3-parentspanid"], "a2fb4a1d1a96d312");

    // The exported span: this trace, the caller as parent, the forwarded span as its id.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    let span = loop {
        if let Ok(b) = bodies.recv_timeout(Duration::from_millis(200)) {
            all.push(b);
        }
        let found = all.iter().find_map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).ok()?;
            let spans = v["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array()?.clone();
            spans.into_iter().find(|s| s["traceId"] == trace)
        });
        if let Some(s) = found {
            break s;
        }
        assert!(Instant::now() < deadline, "no span for the trace; bodies: {all:?}");
    };
    assert_eq!(span["parentSpanId"], caller, "{span}");
    assert_eq!(span["spanId"], parts[2], "{span}");
    assert_eq!(span["kind"], 2, "a server span: {span}");
    assert_eq!(span["name"], format!("GET {listen}"), "{span}");
    // The real OTLP schema accepts the document.
    let file = dir.write("otlp.json", &all[0]);
    let check = r#"
import sys
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
req = json_format.Parse(open(sys.argv[1]).read(), ExportTraceServiceRequest())
spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
assert spans and all(s.end_time_unix_nano >= s.start_time_unix_nano > 0 for s in spans), spans
print(len(spans), req.resource_spans[0].resource.attributes[0].value.string_value)
"#;
    let out = Command::new("python3")
        .args(["-c", check, file.to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the OTLP schema rejected the export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim_end().ends_with(" traced-v1"));
}

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
    let yaml = format!(
        r#"admin: {{ address: "127.0.0.1:0" }}
telemetry:
{telemetry}
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - http:
      stat_prefix: ingress
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {{ prefix: /missing }}
            direct_response: {{ status: 404, body: "nothing here" }}
          - match: {{ prefix: / }}
            route: {{ cluster: app }}
clusters:
- {{ name: app, endpoints: ["{upstream}"] }}
"#
    );
    let f = dir.write("sidecar.yaml", &yaml);
    let (p, listen, admin) = start_sidecar(&f, &[]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
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

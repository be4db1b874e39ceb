//! The reporter end to end: real UDP datagrams, a real Prometheus parser, a slow sink behind a
//! small queue, and access log rotation on disk.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_telemetry::{
    AccessLogConfig, AccessLogFormat, AccessLogOutput, AccessLogSink, Event, IstioMetrics, IstioMetricsConfig, Kind,
    Reporter, ReporterConfig, ReporterSide, SecurityPolicy, Sink, SinkError, StatsdConfig, StatsdSink, TcpCounters,
};

fn label(s: &str) -> Option<Arc<str>> {
    Some(Arc::from(s))
}

fn http_event(code: u16, millis: u64) -> Event {
    let mut e = Event::new(Kind::Http, ReporterSide::Source);
    e.source.workload = label("productpage-v1");
    e.source.namespace = label("default");
    e.destination.workload = label("reviews-v2");
    e.destination_service = label("reviews.default.svc.cluster.local");
    e.destination_service_name = label("reviews");
    e.response_code = code;
    e.duration = Duration::from_millis(millis);
    e.request_bytes = 300;
    e.response_bytes = 5000;
    e
}

fn tcp_event() -> Event {
    let mut e = Event::new(Kind::Tcp, ReporterSide::Destination);
    e.destination.workload = label("mysql");
    e.connection_security_policy = SecurityPolicy::MutualTls;
    e.tcp = TcpCounters {
        sent_bytes: 1200,
        received_bytes: 80,
        opened: true,
        closed: false,
    };
    e
}

fn unique_temp_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("tessera-telemetry-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn statsd_sink_sends_real_datagrams() {
    let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
    collector.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sink = StatsdSink::new(StatsdConfig::new(collector.local_addr().unwrap())).unwrap();
    let (reporter, join) = Reporter::start(ReporterConfig::default(), vec![Box::new(sink)]).unwrap();

    let mut grpc = http_event(200, 12);
    grpc.kind = Kind::Grpc;
    grpc.grpc_response_status = Some(14);
    grpc.response_flags = Cow::Borrowed("UF,URX");
    assert!(reporter.report(grpc));
    assert!(reporter.report(tcp_event()));
    reporter.shutdown();
    let stats = join.join();
    assert_eq!(stats.sinks[0].exported, 2);
    assert_eq!(stats.sinks[0].errors, 0);

    // 4 request lines + sent, received, opened for the TCP event.
    let mut lines = Vec::new();
    let mut buf = [0u8; 65_536];
    while lines.len() < 7 {
        let n = collector.recv(&mut buf).expect("statsd datagram within 5 s");
        assert!(n <= 1432, "datagram of {n} bytes exceeds the configured maximum");
        lines.extend(std::str::from_utf8(&buf[..n]).unwrap().split('\n').map(str::to_string));
    }
    assert_eq!(lines.len(), 7, "{lines:#?}");

    let parsed: Vec<(String, String, HashMap<String, String>)> = lines
        .iter()
        .map(|line| {
            let (metric, tags) = line.split_once("|#").expect("DogStatsD tags");
            let tags = tags
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once(':').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            let (name, value) = metric.split_once(':').unwrap();
            (name.to_string(), value.to_string(), tags)
        })
        .collect();
    let names: Vec<(&str, &str)> = parsed.iter().map(|(n, v, _)| (n.as_str(), v.as_str())).collect();
    assert_eq!(
        names,
        [
            ("istio.requests_total", "1|c"),
            ("istio.request_duration_milliseconds", "12|ms"),
            ("istio.request_bytes", "300|h"),
            ("istio.response_bytes", "5000|h"),
            ("istio.tcp_sent_bytes_total", "1200|c"),
            ("istio.tcp_received_bytes_total", "80|c"),
            ("istio.tcp_connections_opened_total", "1|c"),
        ]
    );
    let grpc_tags = &parsed[0].2;
    assert_eq!(grpc_tags["reporter"], "source");
    assert_eq!(grpc_tags["source_workload"], "productpage-v1");
    assert_eq!(grpc_tags["source_principal"], "unknown");
    assert_eq!(grpc_tags["request_protocol"], "grpc");
    assert_eq!(grpc_tags["grpc_response_status"], "14");
    // The comma inside the flags would split the tag: it is replaced.
    assert_eq!(grpc_tags["response_flags"], "UF_URX");
    let tcp_tags = &parsed[4].2;
    assert_eq!(tcp_tags["reporter"], "destination");
    assert_eq!(tcp_tags["connection_security_policy"], "mutual_tls");
    assert!(!tcp_tags.contains_key("response_code"));
}

/// One sample of the text format, parsed by hand so the structure is checked even without Python.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_sample(line: &str) -> Sample {
    let Some(open) = line.find('{') else {
        let (name, value) = line.split_once(' ').unwrap();
        return Sample {
            name: name.to_string(),
            labels: Vec::new(),
            value: value.parse().unwrap(),
        };
    };
    let chars: Vec<char> = line[open + 1..].chars().collect();
    let mut i = 0;
    let mut labels = Vec::new();
    loop {
        let key_start = i;
        while chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[key_start..i].iter().collect();
        assert_eq!(chars[i + 1], '"', "label value must be quoted in {line}");
        i += 2;
        let mut value = String::new();
        loop {
            let c = chars[i];
            i += 1;
            match c {
                '\\' => {
                    value.push(match chars[i] {
                        '\\' => '\\',
                        '"' => '"',
                        'n' => '\n',
                        other => panic!("bad escape \\{other} in {line}"),
                    });
                    i += 1;
                }
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key, value));
        match chars[i] {
            ',' => i += 1,
            '}' => {
                let rest: String = chars[i + 1..].iter().collect();
                return Sample {
                    name: line[..open].to_string(),
                    labels,
                    value: rest.strip_prefix(' ').unwrap().parse().unwrap(),
                };
            }
            other => panic!("unexpected {other:?} after a label in {line}"),
        }
    }
}

#[test]
fn istio_metrics_render_parses_as_prometheus_text() {
    let metrics = IstioMetrics::new(IstioMetricsConfig::default()).unwrap();
    let view = metrics.view();
    let (reporter, join) = Reporter::start(ReporterConfig::default(), vec![Box::new(metrics)]).unwrap();
    let weird = "we\"ird\\wl\nx";
    let mut odd = http_event(404, 7);
    odd.source.workload = label(weird);
    for event in [http_event(200, 10), http_event(200, 30), odd, tcp_event()] {
        assert!(reporter.report(event));
    }
    reporter.shutdown();
    join.join();

    let mut text = String::new();
    view.render_prometheus(&mut text);

    // Structure, checked in Rust.
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') {
            samples.push(parse_sample(line));
        }
    }
    assert_eq!(types["istio_requests_total"], "counter");
    assert_eq!(types["istio_request_duration_milliseconds"], "histogram");
    assert_eq!(types["istio_request_bytes"], "histogram");
    assert_eq!(types["istio_response_bytes"], "histogram");
    assert_eq!(types["istio_tcp_sent_bytes_total"], "counter");
    assert_eq!(types["istio_tcp_connections_opened_total"], "counter");
    let get = |s: &Sample, k: &str| s.labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let requests: Vec<&Sample> = samples.iter().filter(|s| s.name == "istio_requests_total").collect();
    assert_eq!(requests.len(), 2, "200 and 404 are two series");
    let ok = requests
        .iter()
        .find(|s| get(s, "response_code").as_deref() == Some("200"))
        .unwrap();
    assert_eq!(ok.value, 2.0);
    assert_eq!(ok.labels.len(), 21, "Istio's request label set: {:?}", ok.labels);
    assert_eq!(get(ok, "grpc_response_status").as_deref(), Some(""));
    assert_eq!(get(ok, "destination_principal").as_deref(), Some("unknown"));
    assert_eq!(get(ok, "response_flags").as_deref(), Some("-"));
    let odd = requests
        .iter()
        .find(|s| get(s, "response_code").as_deref() == Some("404"))
        .unwrap();
    assert_eq!(
        get(odd, "source_workload").as_deref(),
        Some(weird),
        "escaping round-trips"
    );

    let buckets: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == "istio_request_duration_milliseconds_bucket" && get(s, "response_code").as_deref() == Some("200")
        })
        .collect();
    assert_eq!(buckets.len(), 20, "19 bounds and +Inf");
    let at = |le: &str| {
        buckets
            .iter()
            .find(|s| get(s, "le").as_deref() == Some(le))
            .unwrap()
            .value
    };
    assert_eq!(at("5"), 0.0);
    assert_eq!(at("10"), 1.0, "le is inclusive");
    assert_eq!(at("25"), 1.0);
    assert_eq!(at("50"), 2.0);
    assert_eq!(at("+Inf"), 2.0);
    assert!(
        buckets.windows(2).all(|w| w[0].value <= w[1].value),
        "buckets are cumulative"
    );
    let sum = samples
        .iter()
        .find(|s| {
            s.name == "istio_request_duration_milliseconds_sum" && get(s, "response_code").as_deref() == Some("200")
        })
        .unwrap();
    assert_eq!(sum.value, 40.0);
    let tcp = samples.iter().find(|s| s.name == "istio_tcp_sent_bytes_total").unwrap();
    assert_eq!(tcp.value, 1200.0);
    assert_eq!(tcp.labels.len(), 19, "TCP drops response_code and grpc_response_status");

    // The same text through the reference parser, when it is installed.
    let has_parser = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_parser {
        eprintln!(
            "SKIPPED the prometheus_client half of istio_metrics_render_parses_as_prometheus_text: \
             `python3 -c 'import prometheus_client'` failed (pip install prometheus_client); \
             the Rust-side structure checks above did run"
        );
        return;
    }
    let dir = unique_temp_dir("prom");
    let file = dir.join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        print(json.dumps([family.name, family.type, s.name, s.labels, s.value]))
"#;
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        output.status.success(),
        "prometheus_client rejected the text:\n{}\n---\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    /// family name, family type, sample name, labels, value
    #[derive(serde::Deserialize)]
    struct Row(String, String, String, HashMap<String, String>, f64);
    let rows: Vec<Row> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), samples.len(), "the parser saw every sample");
    let families: HashMap<&str, &str> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    // The parser names counter families without `_total`.
    assert_eq!(families.get("istio_requests"), Some(&"counter"));
    assert_eq!(families.get("istio_request_duration_milliseconds"), Some(&"histogram"));
    assert_eq!(families.get("istio_tcp_connections_opened"), Some(&"counter"));
    let parsed_odd = rows
        .iter()
        .find(|r| r.2 == "istio_requests_total" && r.3.get("response_code").map(String::as_str) == Some("404"))
        .unwrap();
    assert_eq!(parsed_odd.3["source_workload"], weird);
    assert_eq!(parsed_odd.4, 1.0);
    let parsed_inf = rows
        .iter()
        .find(|r| {
            r.2 == "istio_request_duration_milliseconds_bucket"
                && r.3.get("le").map(String::as_str) == Some("+Inf")
                && r.3.get("response_code").map(String::as_str) == Some("200")
        })
        .unwrap();
    assert_eq!(parsed_inf.4, 2.0);
}

/// Sleeps in every export, like a collector that has stopped answering.
struct SlowSink {
    delay: Duration,
    exported: Arc<AtomicU64>,
}

impl Sink for SlowSink {
    fn name(&self) -> &str {
        "slow"
    }
    fn export(&mut self, batch: &[Event]) -> Result<(), SinkError> {
        thread::sleep(self.delay);
        self.exported.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn a_slow_sink_never_blocks_report() {
    let exported = Arc::new(AtomicU64::new(0));
    let sink = SlowSink {
        delay: Duration::from_millis(100),
        exported: Arc::clone(&exported),
    };
    let config = ReporterConfig {
        queue_capacity: 8,
        max_batch: 4,
        flush_interval: Duration::from_millis(10),
        ..ReporterConfig::default()
    };
    let (reporter, join) = Reporter::start(config, vec![Box::new(sink)]).unwrap();

    const SENT: u64 = 5_000;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for i in 0..SENT {
        let event = http_event(200, i % 100);
        let t = Instant::now();
        reporter.report(event);
        slowest = slowest.max(t.elapsed());
    }
    let total = started.elapsed();
    let stats = reporter.stats();
    assert_eq!(stats.accepted + stats.dropped, SENT);
    assert!(
        stats.dropped > 0,
        "a 100 ms sink behind an 8-slot queue must drop: {stats:?}"
    );
    assert!(
        slowest < Duration::from_millis(50),
        "report() blocked for {slowest:?} (total {total:?})"
    );

    reporter.shutdown();
    let stats = join.join();
    assert_eq!(
        exported.load(Ordering::SeqCst),
        stats.accepted,
        "every accepted event reaches the sink by shutdown"
    );
    assert_eq!(stats.sinks[0].exported, stats.accepted);
    assert!(
        !reporter.report(http_event(200, 1)),
        "reports after shutdown are dropped"
    );
}

#[test]
fn access_log_rotates_by_size_and_keeps_max_files() {
    let dir = unique_temp_dir("rotate");
    let path = dir.join("access.log");
    let sink = AccessLogSink::new(AccessLogConfig {
        format: AccessLogFormat::Text("%REQ_PATH%".into()),
        output: AccessLogOutput::File {
            path: path.clone(),
            // Each line is "/req-NN\n", 8 bytes: three fit in 24 bytes, a fourth would not.
            max_bytes: Some(30),
            max_files: 2,
        },
    })
    .unwrap();
    let (reporter, join) = Reporter::start(ReporterConfig::default(), vec![Box::new(sink)]).unwrap();
    for i in 1..=10 {
        let mut e = http_event(200, 1);
        e.path = Some(format!("/req-{i:02}"));
        assert!(reporter.report(e));
    }
    reporter.shutdown();
    let stats = join.join();
    assert_eq!(stats.sinks[0].exported, 10);
    assert_eq!(stats.sinks[0].errors, 0);

    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(read(path.clone()), "/req-10\n");
    assert_eq!(read(dir.join("access.log.1")), "/req-07\n/req-08\n/req-09\n");
    assert_eq!(read(dir.join("access.log.2")), "/req-04\n/req-05\n/req-06\n");
    assert!(
        !dir.join("access.log.3").exists(),
        "only max_files rotated files are kept"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn access_log_write_failure_is_counted_not_fatal() {
    let dir = unique_temp_dir("fail");
    let path = dir.join("access.log");
    let sink = AccessLogSink::new(AccessLogConfig {
        format: AccessLogFormat::Json,
        output: AccessLogOutput::File {
            path,
            max_bytes: Some(10),
            max_files: 1,
        },
    })
    .unwrap();
    let (reporter, join) = Reporter::start(ReporterConfig::default(), vec![Box::new(sink)]).unwrap();
    assert!(reporter.report(http_event(200, 1)));
    // Let the first line land, then take the directory away: the rotation before the next line
    // cannot reopen the file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reporter.stats().sinks[0].exported < 1 {
        assert!(Instant::now() < deadline, "first batch never exported");
        thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(reporter.report(http_event(200, 1)));
    reporter.shutdown();
    let stats = join.join();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.sinks[0].exported, 1);
    assert!(stats.sinks[0].errors >= 1, "{stats:?}");
}

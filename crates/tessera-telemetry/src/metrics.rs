//! Istio's standard metrics, aggregated from events and rendered as Prometheus text.
//!
//! The sink ([`IstioMetrics`]) runs on the reporter thread; the admin endpoint scrapes through a
//! cloned [`IstioMetricsView`]. Both take one mutex, which is fine: neither is on the request path.
//!
//! Request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) are fed by HTTP, gRPC and RPC events; TCP metrics
//! (`istio_tcp_*`) by TCP events, with Istio's label set minus `response_code` and
//! `grpc_response_status`.
//!
//! Cardinality is bounded: once [`IstioMetricsConfig::max_series`] label sets exist (request and
//! TCP together), events that would create a new one are not recorded, and
//! `tessera_telemetry_series_overflow_total` counts them. Existing series keep counting.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use crate::TelemetryError;
use crate::event::{Event, Kind, Label, Peer, ReporterSide, SecurityPolicy};
use crate::sink::{Sink, SinkError};

/// Istio's default buckets for `istio_request_duration_milliseconds` (Envoy's default histogram
/// buckets), in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Buckets for `istio_request_bytes` / `istio_response_bytes`: powers of ten from 1 B to 1 GB.
///
/// Mixer's Prometheus adapter used exponential buckets (1 to 1e7, factor 10); Istio on Envoy
/// reuses the duration buckets above, which stop at 3.6 MB and have millisecond-shaped steps.
/// Decades up to 1e9 keep the Mixer shape and cover large bodies, at 11 series per label set.
pub const SIZE_BUCKETS_BYTES: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Configuration of [`IstioMetrics`].
#[derive(Debug, Clone)]
pub struct IstioMetricsConfig {
    /// Most distinct label sets kept (request and TCP series together); see the module docs.
    pub max_series: usize,
    /// Upper bounds of the duration histogram, in milliseconds, strictly increasing.
    pub duration_buckets_ms: Vec<f64>,
    /// Upper bounds of the request/response size histograms, in bytes, strictly increasing.
    pub size_buckets_bytes: Vec<f64>,
}

impl Default for IstioMetricsConfig {
    fn default() -> Self {
        IstioMetricsConfig {
            max_series: 10_000,
            duration_buckets_ms: DURATION_BUCKETS_MS.to_vec(),
            size_buckets_bytes: SIZE_BUCKETS_BYTES.to_vec(),
        }
    }
}

fn check_buckets(name: &str, bounds: &[f64]) -> Result<Arc<[f64]>, TelemetryError> {
    if bounds.is_empty() {
        return Err(TelemetryError::InvalidConfig(format!(
            "{name}: at least one bucket is needed"
        )));
    }
    if bounds.iter().any(|b| !b.is_finite()) {
        return Err(TelemetryError::InvalidConfig(format!(
            "{name}: bucket bounds must be finite (+Inf is always added)"
        )));
    }
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err(TelemetryError::InvalidConfig(format!(
            "{name}: bucket bounds must be strictly increasing, got {bounds:?}"
        )));
    }
    Ok(bounds.into())
}

/// Appends `value` escaped as a Prometheus text-format label value (backslash, double quote and
/// line feed are escaped; everything else is written as is).
pub fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A histogram with fixed upper bounds; counts are kept per bucket and summed when rendered.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: Arc<[f64]>,
    /// One count per bound, plus the last for values above every bound (`+Inf`).
    counts: Box<[u64]>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: Arc<[f64]>) -> Histogram {
        let counts = vec![0; bounds.len() + 1].into_boxed_slice();
        Histogram {
            bounds,
            counts,
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        // `le` is inclusive: a value equal to a bound belongs to that bound's bucket.
        let index = self.bounds.partition_point(|&bound| bound < value);
        if let Some(slot) = self.counts.get_mut(index) {
            *slot += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// Writes `_bucket` (cumulative, ending in `+Inf`), `_sum` and `_count` samples.
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The labels both request and TCP metrics carry, in Istio's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PeerLabels {
    reporter: ReporterSide,
    /// source workload, namespace, principal, app, version, cluster; then the same for the
    /// destination; then destination service, service name, service namespace.
    values: [Option<Label>; 15],
    request_protocol: &'static str,
}

const PEER_LABEL_NAMES: [&str; 15] = [
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
];

impl PeerLabels {
    fn of(event: &Event) -> PeerLabels {
        let peer = |p: &Peer| {
            [
                p.workload.clone(),
                p.namespace.clone(),
                p.principal.clone(),
                p.app.clone(),
                p.version.clone(),
                p.cluster.clone(),
            ]
        };
        let [sw, sn, sp, sa, sv, sc] = peer(&event.source);
        let [dw, dn, dp, da, dv, dc] = peer(&event.destination);
        PeerLabels {
            reporter: event.reporter,
            values: [
                sw,
                sn,
                sp,
                sa,
                sv,
                sc,
                dw,
                dn,
                dp,
                da,
                dv,
                event.destination_service.clone(),
                event.destination_service_name.clone(),
                event.destination_service_namespace.clone(),
                dc,
            ],
            request_protocol: event.request_protocol(),
        }
    }

    /// Writes `reporter="..",...,request_protocol=".."` (no braces).
    fn render(&self, out: &mut String) {
        out.push_str("reporter=\"");
        out.push_str(self.reporter.as_str());
        out.push('"');
        // Istio's display order puts destination_cluster after the service labels.
        for (name, value) in PEER_LABEL_NAMES.iter().zip(self.values.iter()) {
            push_label(out, name, value.as_deref().unwrap_or("unknown"));
        }
        push_label(out, "request_protocol", self.request_protocol);
    }
}

fn push_label(out: &mut String, name: &str, value: &str) {
    out.push(',');
    out.push_str(name);
    out.push_str("=\"");
    escape_label_value(value, out);
    out.push('"');
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    peers: PeerLabels,
    response_code: u16,
    grpc_response_status: Option<u32>,
    response_flags: Cow<'static, str>,
    security: SecurityPolicy,
}

impl RequestKey {
    fn render(&self) -> String {
        let mut out = String::with_capacity(512);
        self.peers.render(&mut out);
        push_label(&mut out, "response_code", &self.response_code.to_string());
        // Istio leaves the label empty (not "unknown") for calls that are not gRPC.
        let grpc = self.grpc_response_status.map(|s| s.to_string()).unwrap_or_default();
        push_label(&mut out, "grpc_response_status", &grpc);
        push_label(&mut out, "response_flags", &self.response_flags);
        push_label(&mut out, "connection_security_policy", self.security.as_str());
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TcpKey {
    peers: PeerLabels,
    response_flags: Cow<'static, str>,
    security: SecurityPolicy,
}

impl TcpKey {
    fn render(&self) -> String {
        let mut out = String::with_capacity(512);
        self.peers.render(&mut out);
        push_label(&mut out, "response_flags", &self.response_flags);
        push_label(&mut out, "connection_security_policy", self.security.as_str());
        out
    }
}

#[derive(Debug, Clone)]
struct RequestSeries {
    requests: u64,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Debug, Clone, Default)]
struct TcpSeries {
    sent_bytes: u64,
    received_bytes: u64,
    opened: u64,
    closed: u64,
}

#[derive(Debug)]
struct State {
    requests: HashMap<RequestKey, RequestSeries>,
    tcp: HashMap<TcpKey, TcpSeries>,
    overflow: u64,
    max_series: usize,
    duration_bounds: Arc<[f64]>,
    size_bounds: Arc<[f64]>,
}

impl State {
    fn series(&self) -> usize {
        self.requests.len() + self.tcp.len()
    }

    fn record(&mut self, event: &Event) {
        let peers = PeerLabels::of(event);
        let full = self.series() >= self.max_series;
        match event.kind {
            Kind::Tcp => {
                let key = TcpKey {
                    peers,
                    response_flags: event.response_flags.clone(),
                    security: event.connection_security_policy,
                };
                let series = match self.tcp.get_mut(&key) {
                    Some(series) => series,
                    None if full => {
                        self.overflow += 1;
                        return;
                    }
                    None => self.tcp.entry(key).or_default(),
                };
                series.sent_bytes += event.tcp.sent_bytes;
                series.received_bytes += event.tcp.received_bytes;
                series.opened += u64::from(event.tcp.opened);
                series.closed += u64::from(event.tcp.closed);
            }
            Kind::Http | Kind::Grpc | Kind::Rpc { .. } => {
                let key = RequestKey {
                    peers,
                    response_code: event.response_code,
                    grpc_response_status: event.grpc_response_status,
                    response_flags: event.response_flags.clone(),
                    security: event.connection_security_policy,
                };
                let series = match self.requests.get_mut(&key) {
                    Some(series) => series,
                    None if full => {
                        self.overflow += 1;
                        return;
                    }
                    None => self.requests.entry(key).or_insert_with(|| RequestSeries {
                        requests: 0,
                        duration_ms: Histogram::new(Arc::clone(&self.duration_bounds)),
                        request_bytes: Histogram::new(Arc::clone(&self.size_bounds)),
                        response_bytes: Histogram::new(Arc::clone(&self.size_bounds)),
                    }),
                };
                series.requests += 1;
                series.duration_ms.observe(event.duration.as_secs_f64() * 1000.0);
                series.request_bytes.observe(event.request_bytes as f64);
                series.response_bytes.observe(event.response_bytes as f64);
            }
        }
    }

    fn render(&self, out: &mut String) {
        // Sorted, so scrapes are stable and diffable.
        let mut requests: Vec<(String, &RequestSeries)> = self
            .requests
            .iter()
            .map(|(key, series)| (key.render(), series))
            .collect();
        requests.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut tcp: Vec<(String, &TcpSeries)> = self.tcp.iter().map(|(key, series)| (key.render(), series)).collect();
        tcp.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        header(
            out,
            "istio_requests_total",
            "counter",
            "Requests handled, by Istio's standard labels.",
        );
        for (labels, series) in &requests {
            let _ = writeln!(out, "istio_requests_total{{{labels}}} {}", series.requests);
        }
        let histograms: [(&str, &str, HistogramOf); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds.",
                |s| &s.duration_ms,
            ),
            ("istio_request_bytes", "Request size in bytes, headers and body.", |s| {
                &s.request_bytes
            }),
            (
                "istio_response_bytes",
                "Response size in bytes, headers and body.",
                |s| &s.response_bytes,
            ),
        ];
        for (name, help, get) in histograms {
            header(out, name, "histogram", help);
            for (labels, series) in &requests {
                get(series).render(name, labels, out);
            }
        }
        let counters: [(&str, &str, TcpCounterOf); 4] = [
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the downstream over TCP connections.",
                |s| s.sent_bytes,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the downstream over TCP connections.",
                |s| s.received_bytes,
            ),
            ("istio_tcp_connections_opened_total", "TCP connections opened.", |s| {
                s.opened
            }),
            ("istio_tcp_connections_closed_total", "TCP connections closed.", |s| {
                s.closed
            }),
        ];
        for (name, help, get) in counters {
            header(out, name, "counter", help);
            for (labels, series) in &tcp {
                let _ = writeln!(out, "{name}{{{labels}}} {}", get(series));
            }
        }
        header(
            out,
            "tessera_telemetry_series_overflow_total",
            "counter",
            "Events not recorded in Istio metrics because the series limit was reached.",
        );
        let _ = writeln!(out, "tessera_telemetry_series_overflow_total {}", self.overflow);
    }
}

/// Picks one histogram of a request series.
type HistogramOf = fn(&RequestSeries) -> &Histogram;
/// Picks one counter of a TCP series.
type TcpCounterOf = fn(&TcpSeries) -> u64;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// The sink that aggregates events into Istio's standard metrics.
#[derive(Debug)]
pub struct IstioMetrics {
    state: Arc<Mutex<State>>,
}

/// A cloneable read handle on an [`IstioMetrics`] sink's aggregates, for the admin endpoint.
#[derive(Debug, Clone)]
pub struct IstioMetricsView {
    state: Arc<Mutex<State>>,
}

impl IstioMetrics {
    /// A sink with the given limits and buckets; rejects empty, unsorted or non-finite buckets.
    pub fn new(config: IstioMetricsConfig) -> Result<IstioMetrics, TelemetryError> {
        let duration_bounds = check_buckets("duration_buckets_ms", &config.duration_buckets_ms)?;
        let size_bounds = check_buckets("size_buckets_bytes", &config.size_buckets_bytes)?;
        Ok(IstioMetrics {
            state: Arc::new(Mutex::new(State {
                requests: HashMap::new(),
                tcp: HashMap::new(),
                overflow: 0,
                max_series: config.max_series,
                duration_bounds,
                size_bounds,
            })),
        })
    }

    /// A read handle sharing this sink's aggregates.
    pub fn view(&self) -> IstioMetricsView {
        IstioMetricsView {
            state: Arc::clone(&self.state),
        }
    }

    /// Records one event; what [`Sink::export`] does for each event of a batch.
    pub fn record(&self, event: &Event) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).record(event);
    }
}

impl Sink for IstioMetrics {
    fn name(&self) -> &str {
        "istio_metrics"
    }

    fn export(&mut self, batch: &[Event]) -> Result<(), SinkError> {
        // One lock per batch, not per event, so a scrape waits at most one batch.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for event in batch {
            state.record(event);
        }
        Ok(())
    }
}

impl IstioMetricsView {
    /// Appends every metric in the Prometheus text exposition format, version 0.0.4.
    pub fn render_prometheus(&self, out: &mut String) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).render(out);
    }

    /// Distinct label sets held now (request and TCP).
    pub fn series(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).series()
    }

    /// Events not recorded because the series limit was reached.
    pub fn overflow(&self) -> u64 {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).overflow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TcpCounters;
    use std::time::Duration;

    fn escaped(value: &str) -> String {
        let mut out = String::new();
        escape_label_value(value, &mut out);
        out
    }

    #[test]
    fn label_values_are_escaped_per_the_text_format() {
        assert_eq!(escaped("plain-value.1"), "plain-value.1");
        assert_eq!(escaped(r#"a"b"#), r#"a\"b"#);
        assert_eq!(escaped(r"a\b"), r"a\\b");
        assert_eq!(escaped("a\nb"), r"a\nb");
        // Only those three: other control-ish characters and non-ASCII pass through.
        assert_eq!(escaped("tab\there é"), "tab\there é");
        assert_eq!(escaped("\\\"\n"), "\\\\\\\"\\n");
    }

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let mut h = Histogram::new(Arc::from(&[1.0, 5.0, 10.0][..]));
        for v in [0.2, 1.0, 1.5, 5.0, 7.0, 10.0, 11.0, 1e9] {
            h.observe(v);
        }
        assert_eq!(&*h.counts, &[2, 2, 2, 2]);
        assert_eq!(h.count, 8);
        let mut out = String::new();
        h.render("m", "a=\"b\"", &mut out);
        let expected = "m_bucket{a=\"b\",le=\"1\"} 2\n\
                        m_bucket{a=\"b\",le=\"5\"} 4\n\
                        m_bucket{a=\"b\",le=\"10\"} 6\n\
                        m_bucket{a=\"b\",le=\"+Inf\"} 8\n";
        assert!(out.starts_with(expected), "{out}");
        assert!(out.contains(&format!(
            "m_sum{{a=\"b\"}} {}\n",
            0.2 + 1.0 + 1.5 + 5.0 + 7.0 + 10.0 + 11.0 + 1e9
        )));
        assert!(out.ends_with("m_count{a=\"b\"} 8\n"), "{out}");
    }

    #[test]
    fn unsorted_or_empty_buckets_are_rejected() {
        for bad in [vec![], vec![5.0, 1.0], vec![1.0, 1.0], vec![1.0, f64::INFINITY]] {
            let config = IstioMetricsConfig {
                duration_buckets_ms: bad.clone(),
                ..IstioMetricsConfig::default()
            };
            assert!(IstioMetrics::new(config).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn series_beyond_the_limit_are_counted_not_kept() {
        let config = IstioMetricsConfig {
            max_series: 2,
            ..IstioMetricsConfig::default()
        };
        let mut sink = IstioMetrics::new(config).unwrap();
        let view = sink.view();
        let mut batch = Vec::new();
        for code in [200, 404, 500, 200, 503] {
            let mut e = Event::new(Kind::Http, ReporterSide::Source);
            e.response_code = code;
            e.duration = Duration::from_millis(3);
            batch.push(e);
        }
        sink.export(&batch).unwrap();
        assert_eq!(view.series(), 2);
        assert_eq!(view.overflow(), 2);
        let mut out = String::new();
        view.render_prometheus(&mut out);
        assert!(out.contains("response_code=\"200\""));
        assert!(!out.contains("response_code=\"500\""));
        assert!(out.contains("tessera_telemetry_series_overflow_total 2\n"));
    }

    #[test]
    fn tcp_series_drop_response_code_labels_and_sum_counters() {
        let sink = IstioMetrics::new(IstioMetricsConfig::default()).unwrap();
        let mut e = Event::new(Kind::Tcp, ReporterSide::Destination);
        e.destination.workload = Some(Arc::from("db"));
        e.connection_security_policy = SecurityPolicy::MutualTls;
        e.tcp = TcpCounters {
            sent_bytes: 10,
            received_bytes: 4,
            opened: true,
            closed: false,
        };
        sink.record(&e);
        e.tcp = TcpCounters {
            sent_bytes: 5,
            received_bytes: 1,
            opened: false,
            closed: true,
        };
        sink.record(&e);
        let mut out = String::new();
        sink.view().render_prometheus(&mut out);
        let line = out
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .expect("a tcp sample");
        assert!(line.ends_with("} 15"), "{line}");
        assert!(line.contains("destination_workload=\"db\""));
        assert!(line.contains("source_workload=\"unknown\""));
        assert!(line.contains("request_protocol=\"tcp\""));
        assert!(line.contains("connection_security_policy=\"mutual_tls\""));
        assert!(!line.contains("response_code"), "{line}");
        assert!(!line.contains("grpc_response_status"), "{line}");
        for family in [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
        ] {
            let line = out.lines().find(|l| l.starts_with(family)).expect("a tcp sample");
            assert!(line.ends_with("} 1"), "{line}");
        }
        // TCP events feed no request metrics.
        assert!(!out.lines().any(|l| l.starts_with("istio_requests_total{")));
    }
}

//! Report: every finished request, RPC call and TCP connection becomes one `tessera-telemetry`
//! event, off the request path.
//!
//! The request path already hands each finished request's record to the access-log thread
//! through a bounded queue (drop and count when full); with `telemetry:` configured, that thread
//! also turns the record into an [`Event`] and gives it to the [`Reporter`], whose own thread
//! batches events into the sinks (Istio metrics for `/stats/prometheus`, statsd, a rotated
//! access log). Nothing here runs on a worker. Telemetry is read at start; a reload that changes
//! it is reported as needing a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tessera_model::telemetry as model;
use tessera_telemetry::otlp::{OtlpConfig, OtlpSink};
use tessera_telemetry::trace::{B3, Sampling, SpanId, TraceContext};
use tessera_telemetry::{
    AccessLogConfig, AccessLogFormat, AccessLogOutput, AccessLogSink, Event, IstioMetrics, IstioMetricsConfig,
    IstioMetricsView, Kind, Label, Peer, Reporter, ReporterConfig, ReporterJoin, ReporterSide, SecurityPolicy, Sink,
    StatsdConfig, StatsdSink, TagFormat,
};

use crate::access_log::LogRecord;

/// Set once a server with `telemetry:` starts: chains then keep a record of every request even
/// without an access log of their own.
static REPORTING: AtomicBool = AtomicBool::new(false);

/// True when finished requests are reported.
pub(crate) fn reporting() -> bool {
    REPORTING.load(Ordering::Relaxed)
}

/// New traces sampled per million when tracing is on; `u32::MAX`: tracing is off.
static SAMPLE_PER_MILLION: AtomicU32 = AtomicU32::new(u32::MAX);

/// Starts (or continues) the request's trace: reads the caller's context (`traceparent`, then
/// B3 single, then B3 multi), makes this sidecar's span its child, and rewrites the propagation
/// headers so the upstream sees the sidecar's span as its parent. `None` when tracing is off.
pub(crate) fn trace(headers: &mut http::HeaderMap) -> Option<TraceContext> {
    let per_million = SAMPLE_PER_MILLION.load(Ordering::Relaxed);
    if per_million == u32::MAX {
        return None;
    }
    let text = |h: &http::HeaderMap, name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let w3c = text(headers, "traceparent").and_then(|v| TraceContext::parse_traceparent(&v).ok());
    let (b3_single, b3_sampling) = match text(headers, "b3").map(|v| TraceContext::parse_b3(&v)) {
        Some(Ok(B3::Context(c))) => (Some(c), None),
        Some(Ok(B3::SamplingOnly(s))) => (None, Some(s)),
        _ => (None, None),
    };
    let b3_multi = if headers.contains_key("x-b3-traceid") {
        let h = &*headers;
        TraceContext::parse_b3_multi(|name| h.get(name).and_then(|v| v.to_str().ok())).ok()
    } else {
        None
    };
    let parent = w3c.or(b3_single).or(b3_multi);
    let decide = |s: Sampling| match s {
        Sampling::Deferred if crate::util::rand_below(1_000_000) < u64::from(per_million) => Sampling::Sampled,
        Sampling::Deferred => Sampling::NotSampled,
        other => other,
    };
    let span = SpanId::random();
    let ctx = match parent {
        Some(p) => {
            let mut c = p.child(span);
            c.sampling = decide(c.sampling);
            c
        }
        None => {
            let mut c = TraceContext::new_root(decide(b3_sampling.unwrap_or(Sampling::Deferred)));
            c.span_id = span;
            c
        }
    };
    let set = |h: &mut http::HeaderMap, name: &'static str, v: String| {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    set(headers, "traceparent", ctx.to_traceparent());
    if b3_single.is_some() || b3_sampling.is_some() {
        set(headers, "b3", ctx.to_b3());
    }
    if b3_multi.is_some() {
        for (name, v) in ctx.to_b3_multi() {
            set(headers, name, v);
        }
    }
    Some(ctx)
}

/// The running Report pipeline.
pub(crate) struct Report {
    reporter: Reporter,
    side: ReporterSide,
    workload: Peer,
    metrics: Option<IstioMetricsView>,
    cfg: model::Telemetry,
}

impl Report {
    /// Starts the export thread and its sinks.
    pub(crate) fn start(cfg: &model::Telemetry) -> Result<(Arc<Report>, ReporterJoin), String> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        let metrics = if cfg.prometheus {
            let m = IstioMetrics::new(IstioMetricsConfig::default()).map_err(|e| format!("telemetry: {e}"))?;
            let view = m.view();
            sinks.push(Box::new(m));
            Some(view)
        } else {
            None
        };
        if let Some(s) = &cfg.statsd {
            let mut c = StatsdConfig::new(s.address);
            c.prefix = s.prefix.clone();
            c.tags = if s.dogstatsd {
                TagFormat::DogStatsd
            } else {
                TagFormat::None
            };
            sinks.push(Box::new(
                StatsdSink::new(c).map_err(|e| format!("telemetry.statsd: {e}"))?,
            ));
        }
        if let Some(l) = &cfg.access_log {
            let format = match &l.format {
                None => AccessLogFormat::Json,
                Some(f) => AccessLogFormat::Text(f.clone()),
            };
            let output = match &l.path {
                None => AccessLogOutput::Stdout,
                Some(p) => AccessLogOutput::File {
                    path: p.clone(),
                    max_bytes: l.max_bytes,
                    max_files: l.max_files,
                },
            };
            sinks.push(Box::new(
                AccessLogSink::new(AccessLogConfig { format, output })
                    .map_err(|e| format!("telemetry.access_log: {e}"))?,
            ));
        }
        if let Some(t) = &cfg.tracing {
            let mut c = OtlpConfig::new(t.otlp, t.service_name.clone());
            c.path = t.path.clone();
            sinks.push(Box::new(OtlpSink::new(c)));
        }
        let rc = ReporterConfig {
            queue_capacity: cfg.queue,
            flush_interval: cfg.flush_interval,
            thread_name: "tessera-report".into(),
            ..ReporterConfig::default()
        };
        let (reporter, join) = Reporter::start(rc, sinks).map_err(|e| format!("telemetry: {e}"))?;
        let label = |v: &Option<String>| v.as_deref().map(Label::from);
        let w = &cfg.workload;
        REPORTING.store(true, Ordering::Relaxed);
        if let Some(t) = &cfg.tracing {
            SAMPLE_PER_MILLION.store((t.sampling * 10_000.0).round() as u32, Ordering::Relaxed);
        }
        Ok((
            Arc::new(Report {
                reporter,
                side: match cfg.reporter {
                    model::ReporterSide::Destination => ReporterSide::Destination,
                    model::ReporterSide::Source => ReporterSide::Source,
                },
                workload: Peer {
                    workload: label(&w.name),
                    namespace: label(&w.namespace),
                    app: label(&w.app),
                    version: label(&w.version),
                    cluster: label(&w.cluster),
                    principal: None,
                },
                metrics,
                cfg: cfg.clone(),
            }),
            join,
        ))
    }

    /// The configuration it runs.
    pub(crate) fn config(&self) -> &model::Telemetry {
        &self.cfg
    }

    /// Appends Istio's metrics and the pipeline's own counters, in Prometheus text.
    pub(crate) fn render_prometheus(&self, out: &mut String) {
        if let Some(m) = &self.metrics {
            m.render_prometheus(out);
        }
        self.reporter.stats().render_prometheus(out);
    }

    /// Queues the event for `rec`; never blocks (a full queue drops and counts).
    pub(crate) fn report(&self, rec: &LogRecord) {
        self.reporter.report(self.event(rec));
    }

    /// Stops the export thread after exporting what is queued (blocking: not on a worker).
    pub(crate) fn shutdown(&self) {
        self.reporter.shutdown();
    }

    fn event(&self, rec: &LogRecord) -> Event {
        let kind = match (&rec.rpc, &rec.method) {
            (Some(r), _) => Kind::Rpc { protocol: r.protocol },
            (None, Some(_)) if rec.grpc => Kind::Grpc,
            (None, Some(_)) => Kind::Http,
            (None, None) => Kind::Tcp,
        };
        let mut e = Event::new(kind, self.side);
        e.start_time = rec.start;
        e.duration = rec.duration.unwrap_or_default();
        let peer_principal = rec
            .tls
            .as_ref()
            .and_then(|t| t.peer.as_ref())
            .and_then(|p| p.info.uri.first())
            .map(|u| Label::from(u.as_str()));
        e.connection_security_policy = match &rec.tls {
            Some(t) if t.peer.is_some() => SecurityPolicy::MutualTls,
            Some(_) => SecurityPolicy::None,
            None => SecurityPolicy::None,
        };
        let mut us = self.workload.clone();
        let mut them = Peer {
            principal: peer_principal,
            ..Peer::default()
        };
        if self.side == ReporterSide::Source {
            std::mem::swap(&mut us, &mut them);
        }
        e.destination = us;
        e.source = them;
        let service = match (&rec.rpc, &rec.authority) {
            (Some(r), _) if !r.service.is_empty() => Some(r.service.as_str()),
            (_, Some(a)) => Some(a.as_str()),
            _ => rec.upstream_cluster.as_deref(),
        };
        if let Some(s) = service {
            e.destination_service = Some(Label::from(s));
            // An RPC service is an interface name, not a DNS name: kept whole.
            let short = if rec.rpc.is_some() { s } else { service_name(s) };
            e.destination_service_name = Some(Label::from(short));
        }
        e.upstream_cluster = rec.upstream_cluster.as_deref().map(Label::from);
        e.upstream_host = rec.upstream_host;
        e.downstream_remote_address = Some(rec.downstream_remote);
        e.response_code = rec.response_code;
        e.grpc_response_status = rec.grpc_status;
        e.trace = rec.trace;
        let flags = rec.flags.to_string();
        if flags != "-" {
            e.response_flags = flags.into();
        }
        if let Kind::Tcp = e.kind {
            e.tcp.received_bytes = rec.bytes_received;
            e.tcp.sent_bytes = rec.bytes_sent;
            e.tcp.opened = true;
            e.tcp.closed = true;
        } else {
            e.request_bytes = rec.bytes_received;
            e.response_bytes = rec.bytes_sent;
        }
        e.method = rec.method.as_ref().map(|m| m.to_string());
        e.path = rec.path.clone();
        e.authority = rec.authority.clone();
        if let Some(r) = &rec.rpc {
            e.method = Some(r.method.clone());
            e.path = Some(format!("{}/{}", r.service, r.method));
        }
        e
    }
}

/// Istio's `destination_service_name`: the first label of a DNS name without its port
/// (`reviews` of `reviews.shop.svc.cluster.local:9080`); an IP address stays whole.
fn service_name(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|r| r.find(']')) {
        return &host[..end + 2];
    }
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return bare;
    }
    bare.split('.').next().unwrap_or(bare)
}

#[cfg(test)]
mod tests {
    use super::service_name;

    #[test]
    fn service_names() {
        assert_eq!(service_name("reviews.shop.svc.cluster.local:9080"), "reviews");
        assert_eq!(service_name("reviews"), "reviews");
        assert_eq!(service_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(service_name("10.1.2.3"), "10.1.2.3");
        assert_eq!(service_name("[::1]:80"), "[::1]");
    }
}

#![doc = r#"
Report, moved off the request path (what Istio's Mixer did with `Report`, done inside the sidecar).

This crate owns:
- [`Event`]: one finished request, or one report about a TCP connection, built by the proxy.
- [`Reporter`]: the only thing the request path touches. [`Reporter::report`] is a non-blocking
  `try_send` into a bounded queue; when the queue is full the event is dropped and counted, never
  waited for. A dedicated `std::thread` (not a tokio worker, so it never steals a worker) collects
  batches and hands them to every [`Sink`].
- Sinks: [`IstioMetrics`] (Istio's standard metrics, scraped as Prometheus text through
  [`IstioMetricsView`]), [`StatsdSink`] (statsd / DogStatsD over UDP) and [`AccessLogSink`]
  (JSON lines or an Envoy-style `%OPERATOR%` format, to stdout or a size-rotated file).
- [`trace`]: pure helpers for W3C `traceparent` and Zipkin B3 propagation, and id generation.

What it must not do: block or lock on the request path, panic on a sink failure, or grow without
bound (the queue, the number of metric series and the log files are all capped).

It knows nothing of sockets on the data path, of xDS or of the proxy's config model: the proxy
fills [`Event`]s and picks sinks.

OTLP (cargo feature `otlp`): [`otlp::OtlpSink`] exports one span per sampled event over
OTLP/HTTP with the JSON encoding; OTLP metrics and logs are not built.
"#]

pub mod access_log;
pub mod event;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod reporter;
pub mod sink;
pub mod statsd;
pub mod trace;

mod time;

pub use access_log::{AccessLogConfig, AccessLogFormat, AccessLogOutput, AccessLogSink};
pub use event::{Event, Kind, Label, Peer, ReporterSide, SecurityPolicy, TcpCounters};
pub use metrics::{IstioMetrics, IstioMetricsConfig, IstioMetricsView};
pub use reporter::{Reporter, ReporterConfig, ReporterJoin, SinkStats, StatsSnapshot};
pub use sink::{Sink, SinkError};
pub use statsd::{SizeMetricType, StatsdConfig, StatsdSink, TagFormat};
pub use trace::{Sampling, SpanId, TraceContext, TraceError, TraceId};

/// Configuration and start-up errors of this crate (sink failures at run time are [`SinkError`]s).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An access log format names an operator this crate does not implement.
    #[error(
        "access log format: unknown operator %{operator}% at byte {position}; known: {known}",
        known = access_log::KNOWN_OPERATORS.join(", ")
    )]
    UnknownOperator {
        /// The name between the `%` signs.
        operator: String,
        /// Byte offset of the opening `%`.
        position: usize,
    },
    /// An access log format has a `%` with no closing `%`.
    #[error("access log format: `%` at byte {position} is not closed; write `%%` for a literal percent sign")]
    UnterminatedOperator {
        /// Byte offset of the opening `%`.
        position: usize,
    },
    /// A configuration value is out of range or malformed.
    #[error("invalid telemetry config: {0}")]
    InvalidConfig(String),
    /// Opening a file or socket for a sink failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. "open access log /var/log/a.log".
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

//! Report (the merged Mixer's third part): what the sidecar exports about every request and TCP
//! connection, off the request path, and who it says it is.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::ser_duration;

/// `telemetry:` at the top level of a sidecar config.
#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    /// Which side of the call this sidecar reports as (Istio's `reporter` label).
    pub reporter: ReporterSide,
    /// The workload this sidecar serves: the destination labels of inbound reports.
    pub workload: Workload,
    /// Events waiting for the export thread; beyond this they are dropped and counted.
    pub queue: usize,
    /// The longest an event waits before its batch is exported.
    #[serde(serialize_with = "ser_duration")]
    pub flush_interval: Duration,
    /// Istio's standard metrics on the admin API's `/stats/prometheus`.
    pub prometheus: bool,
    /// statsd / DogStatsD over UDP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statsd: Option<Statsd>,
    /// An access log written by the export thread (JSON lines or a format), rotated by size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<ReportLog>,
    /// Spans for HTTP requests, exported over OTLP/HTTP; trace context propagated upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

/// Tracing: W3C `traceparent` and B3 propagation, one span per request, OTLP export.
#[derive(Debug, Clone, Serialize)]
pub struct Tracing {
    /// The OTLP/HTTP collector (`host:port`, usually 4318).
    pub otlp: SocketAddr,
    /// The request path (`/v1/traces`).
    pub path: String,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Percent of new traces (no sampling decision from the caller) that are sampled.
    pub sampling: f64,
}

/// Istio's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReporterSide {
    /// The sidecar of the called workload (inbound).
    Destination,
    /// The sidecar of the calling workload (outbound).
    Source,
}

/// Labels of the workload this sidecar belongs to; empty ones are reported as `unknown`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Workload {
    /// Workload name (e.g. the Deployment).
    pub name: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// `app` label.
    pub app: Option<String>,
    /// `version` label.
    pub version: Option<String>,
    /// The mesh cluster.
    pub cluster: Option<String>,
}

/// Where statsd lines go.
#[derive(Debug, Clone, Serialize)]
pub struct Statsd {
    /// The statsd server (UDP).
    pub address: SocketAddr,
    /// Metric name prefix.
    pub prefix: String,
    /// Labels as DogStatsD tags (`|#k:v`); plain statsd otherwise (labels left out).
    pub dogstatsd: bool,
}

/// An access log written off the request path.
#[derive(Debug, Clone, Serialize)]
pub struct ReportLog {
    /// A file; `None`: standard output.
    pub path: Option<PathBuf>,
    /// `None`: JSON lines; otherwise a format with `%OPERATOR%`s.
    pub format: Option<String>,
    /// Rotate when the file would pass this size.
    pub max_bytes: Option<u64>,
    /// Rotated files kept (`path.1`...).
    pub max_files: usize,
}

//! A statsd / DogStatsD sink over UDP.
//!
//! Per request-like event (HTTP, gRPC, RPC) it writes, with the default prefix `istio`:
//! ```text
//! istio.requests_total:1|c
//! istio.request_duration_milliseconds:12.5|ms
//! istio.request_bytes:512|h
//! istio.response_bytes:2048|h
//! ```
//! and per TCP event `istio.tcp_sent_bytes_total:N|c`, `istio.tcp_received_bytes_total:N|c`
//! (omitted when zero), `istio.tcp_connections_opened_total:1|c` and
//! `istio.tcp_connections_closed_total:1|c` (when the event opens or closes the connection).
//!
//! With [`TagFormat::DogStatsd`], each line ends in `|#reporter:source,source_workload:...`: the same
//! label set as the Prometheus metrics. With [`TagFormat::None`] (plain statsd) labels are left
//! out, so the collector sees one aggregate per metric; folding label values into metric names,
//! as Envoy's statsd sink does with its tag-extracted names, would multiply names by label
//! combinations and needs a name-escaping scheme the collectors do not share.
//!
//! Lines are packed into datagrams of at most `max_datagram_bytes`, separated by `\n`. Sends are
//! non-blocking: a datagram the kernel will not take now is lost and counted.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};

use crate::TelemetryError;
use crate::event::{Event, Kind, Label};
use crate::sink::{Sink, SinkError};

/// How labels are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TagFormat {
    /// DogStatsD tags: `|#key:value,key:value`.
    #[default]
    DogStatsd,
    /// Plain statsd: no labels.
    None,
}

/// The statsd type used for the request and response size metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SizeMetricType {
    /// `|h`, a histogram (DogStatsD, Telegraf).
    #[default]
    Histogram,
    /// `|ms`, a timer, for servers that know no histograms (classic Etsy statsd).
    Timer,
}

/// Configuration of [`StatsdSink`].
#[derive(Debug, Clone)]
pub struct StatsdConfig {
    /// Where to send datagrams.
    pub address: SocketAddr,
    /// Prepended to every metric name with a `.`; empty for none. Letters, digits, `_`, `-`, `.`.
    pub prefix: String,
    /// Whether labels are sent as DogStatsD tags.
    pub tags: TagFormat,
    /// Statsd type of the size metrics.
    pub size_metric_type: SizeMetricType,
    /// Largest datagram payload; 1432 fits an Ethernet MTU with IPv6 and tunnel headers to spare.
    pub max_datagram_bytes: usize,
}

impl StatsdConfig {
    /// Defaults (prefix `istio`, DogStatsD tags, `|h` sizes, 1432-byte datagrams) for `address`.
    pub fn new(address: SocketAddr) -> StatsdConfig {
        StatsdConfig {
            address,
            prefix: "istio".to_string(),
            tags: TagFormat::DogStatsd,
            size_metric_type: SizeMetricType::Histogram,
            max_datagram_bytes: 1432,
        }
    }
}

/// Sends Istio's metrics, per event, as statsd lines over UDP.
#[derive(Debug)]
pub struct StatsdSink {
    socket: UdpSocket,
    config: StatsdConfig,
    datagram: String,
    line: String,
    tags: String,
}

/// Largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65_507;

impl StatsdSink {
    /// Validates `config` and opens a non-blocking UDP socket connected to `config.address`.
    pub fn new(config: StatsdConfig) -> Result<StatsdSink, TelemetryError> {
        if let Some(bad) = config
            .prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(TelemetryError::InvalidConfig(format!(
                "statsd prefix {:?} contains {bad:?}; use letters, digits, '_', '-' or '.'",
                config.prefix
            )));
        }
        if !(64..=MAX_UDP_PAYLOAD).contains(&config.max_datagram_bytes) {
            return Err(TelemetryError::InvalidConfig(format!(
                "statsd max_datagram_bytes {} is outside 64..={MAX_UDP_PAYLOAD}",
                config.max_datagram_bytes
            )));
        }
        let local: SocketAddr = if config.address.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let io_err = |what: &str| {
            let what = format!("statsd sink: {what} (target {})", config.address);
            move |source| TelemetryError::Io { what, source }
        };
        let socket = UdpSocket::bind(local).map_err(io_err("bind a UDP socket"))?;
        socket
            .connect(config.address)
            .map_err(io_err("connect the UDP socket"))?;
        socket
            .set_nonblocking(true)
            .map_err(io_err("make the UDP socket non-blocking"))?;
        Ok(StatsdSink {
            socket,
            datagram: String::with_capacity(config.max_datagram_bytes),
            line: String::with_capacity(256),
            tags: String::with_capacity(512),
            config,
        })
    }

    fn write_tags(&mut self, event: &Event) {
        self.tags.clear();
        if self.config.tags == TagFormat::None {
            return;
        }
        fn unknown(value: &Option<Label>) -> Cow<'_, str> {
            Cow::Borrowed(value.as_deref().unwrap_or("unknown"))
        }
        let (s, d) = (&event.source, &event.destination);
        let mut pairs: Vec<(&str, Cow<'_, str>)> = vec![
            ("reporter", Cow::Borrowed(event.reporter.as_str())),
            ("source_workload", unknown(&s.workload)),
            ("source_workload_namespace", unknown(&s.namespace)),
            ("source_principal", unknown(&s.principal)),
            ("source_app", unknown(&s.app)),
            ("source_version", unknown(&s.version)),
            ("source_cluster", unknown(&s.cluster)),
            ("destination_workload", unknown(&d.workload)),
            ("destination_workload_namespace", unknown(&d.namespace)),
            ("destination_principal", unknown(&d.principal)),
            ("destination_app", unknown(&d.app)),
            ("destination_version", unknown(&d.version)),
            ("destination_service", unknown(&event.destination_service)),
            ("destination_service_name", unknown(&event.destination_service_name)),
            (
                "destination_service_namespace",
                unknown(&event.destination_service_namespace),
            ),
            ("destination_cluster", unknown(&d.cluster)),
            ("request_protocol", Cow::Borrowed(event.request_protocol())),
        ];
        if event.kind != Kind::Tcp {
            pairs.push(("response_code", Cow::Owned(event.response_code.to_string())));
            if let Some(status) = event.grpc_response_status {
                pairs.push(("grpc_response_status", Cow::Owned(status.to_string())));
            }
        }
        pairs.push(("response_flags", Cow::Borrowed(&event.response_flags)));
        pairs.push((
            "connection_security_policy",
            Cow::Borrowed(event.connection_security_policy.as_str()),
        ));
        self.tags.push_str("|#");
        for (i, (key, value)) in pairs.iter().enumerate() {
            if i > 0 {
                self.tags.push(',');
            }
            self.tags.push_str(key);
            self.tags.push(':');
            // `,` separates tags and `|` sections; a newline would end the line.
            self.tags.extend(
                value
                    .chars()
                    .map(|c| if matches!(c, ',' | '|' | '\n' | '\r') { '_' } else { c }),
            );
        }
    }

    /// Formats one metric line and appends it to the pending datagram, sending that first if the
    /// line would not fit.
    fn push_line(&mut self, name: &str, value: std::fmt::Arguments<'_>, kind: &str, sent: &mut Sender) {
        self.line.clear();
        if !self.config.prefix.is_empty() {
            self.line.push_str(&self.config.prefix);
            self.line.push('.');
        }
        let _ = write!(self.line, "{name}:{value}|{kind}{}", self.tags);
        if !self.datagram.is_empty() && self.datagram.len() + 1 + self.line.len() > self.config.max_datagram_bytes {
            sent.send(&self.socket, &mut self.datagram);
        }
        if !self.datagram.is_empty() {
            self.datagram.push('\n');
        }
        // A single line longer than the limit still goes out alone: truncating it would corrupt it.
        self.datagram.push_str(&self.line);
    }
}

/// Sends datagrams and remembers which events were in failed ones.
struct Sender {
    /// Index of the event whose lines are being written.
    current: usize,
    /// Index of the first event with a line in the pending datagram.
    first_in_datagram: usize,
    failed_events: usize,
    last_failed: Option<usize>,
    first_error: Option<io::Error>,
}

impl Sender {
    fn send(&mut self, socket: &UdpSocket, datagram: &mut String) {
        if datagram.is_empty() {
            return;
        }
        let result = socket.send(datagram.as_bytes());
        datagram.clear();
        if let Err(error) = result {
            let start = self
                .last_failed
                .map_or(self.first_in_datagram, |l| (l + 1).max(self.first_in_datagram));
            if self.current >= start {
                self.failed_events += self.current - start + 1;
            }
            self.last_failed = Some(self.current);
            self.first_error.get_or_insert(error);
        }
        self.first_in_datagram = self.current;
    }
}

impl Sink for StatsdSink {
    fn name(&self) -> &str {
        "statsd"
    }

    fn export(&mut self, batch: &[Event]) -> Result<(), SinkError> {
        let mut sender = Sender {
            current: 0,
            first_in_datagram: 0,
            failed_events: 0,
            last_failed: None,
            first_error: None,
        };
        let size_kind = match self.config.size_metric_type {
            SizeMetricType::Histogram => "h",
            SizeMetricType::Timer => "ms",
        };
        for (index, event) in batch.iter().enumerate() {
            sender.current = index;
            if self.datagram.is_empty() {
                sender.first_in_datagram = index;
            }
            self.write_tags(event);
            match event.kind {
                Kind::Tcp => {
                    let tcp = event.tcp;
                    if tcp.sent_bytes > 0 {
                        self.push_line(
                            "tcp_sent_bytes_total",
                            format_args!("{}", tcp.sent_bytes),
                            "c",
                            &mut sender,
                        );
                    }
                    if tcp.received_bytes > 0 {
                        self.push_line(
                            "tcp_received_bytes_total",
                            format_args!("{}", tcp.received_bytes),
                            "c",
                            &mut sender,
                        );
                    }
                    if tcp.opened {
                        self.push_line("tcp_connections_opened_total", format_args!("1"), "c", &mut sender);
                    }
                    if tcp.closed {
                        self.push_line("tcp_connections_closed_total", format_args!("1"), "c", &mut sender);
                    }
                }
                Kind::Http | Kind::Grpc | Kind::Rpc { .. } => {
                    // Microsecond resolution; f64 Display prints "12.5", not "12.500000".
                    let millis = event.duration.as_micros() as f64 / 1000.0;
                    self.push_line("requests_total", format_args!("1"), "c", &mut sender);
                    self.push_line(
                        "request_duration_milliseconds",
                        format_args!("{millis}"),
                        "ms",
                        &mut sender,
                    );
                    self.push_line(
                        "request_bytes",
                        format_args!("{}", event.request_bytes),
                        size_kind,
                        &mut sender,
                    );
                    self.push_line(
                        "response_bytes",
                        format_args!("{}", event.response_bytes),
                        size_kind,
                        &mut sender,
                    );
                }
            }
        }
        sender.current = batch.len().saturating_sub(1);
        sender.send(&self.socket, &mut self.datagram);
        match sender.first_error {
            None => Ok(()),
            Some(source) => Err(SinkError::Partial {
                failed: sender.failed_events,
                total: batch.len(),
                what: "send statsd datagram",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ReporterSide;
    use std::time::Duration;

    #[test]
    fn bad_prefix_and_sizes_are_rejected() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut config = StatsdConfig::new(addr);
        config.prefix = "istio|x".into();
        assert!(matches!(StatsdSink::new(config), Err(TelemetryError::InvalidConfig(_))));
        let mut config = StatsdConfig::new(addr);
        config.max_datagram_bytes = 10;
        assert!(matches!(StatsdSink::new(config), Err(TelemetryError::InvalidConfig(_))));
    }

    #[test]
    fn lines_are_packed_under_the_limit() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut config = StatsdConfig::new(receiver.local_addr().unwrap());
        config.tags = TagFormat::None;
        config.max_datagram_bytes = 100;
        let mut sink = StatsdSink::new(config).unwrap();
        let mut event = Event::new(Kind::Http, ReporterSide::Source);
        event.duration = Duration::from_micros(12_500);
        event.request_bytes = 7;
        sink.export(&[event.clone(), event]).unwrap();
        let mut lines = Vec::new();
        let mut buf = [0u8; 2048];
        while lines.len() < 8 {
            let n = receiver.recv(&mut buf).unwrap();
            assert!(n <= 100, "datagram of {n} bytes");
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            assert!(!text.ends_with('\n'));
            lines.extend(text.split('\n').map(str::to_string));
        }
        assert_eq!(lines.len(), 8);
        assert_eq!(lines[0], "istio.requests_total:1|c");
        assert_eq!(lines[1], "istio.request_duration_milliseconds:12.5|ms");
        assert_eq!(lines[2], "istio.request_bytes:7|h");
        assert_eq!(lines[3], "istio.response_bytes:0|h");
        assert_eq!(lines[4..], lines[..4]);
    }
}

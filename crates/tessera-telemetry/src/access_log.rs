//! Access logs: one line per event, as JSON or an Envoy-style `%OPERATOR%` format, to stdout or a
//! file rotated by size.
//!
//! Missing values print as `-` in text lines and `null` in JSON, as Envoy does. Control characters
//! in values (a newline in a path, say) are written as `\n`-style escapes in text lines, so one
//! event is always one line.
//!
//! Rotation: before a line would take the file past `max_bytes`, `path.{max_files-1}` is renamed to
//! `path.{max_files}`, ..., `path.1` to `path.2`, `path` to `path.1`, and a new `path` is started; so
//! at most `max_files` old files are kept. A single line larger than `max_bytes` still gets written,
//! alone in a fresh file. With `max_files` 0 the file is truncated instead.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::TelemetryError;
use crate::event::Event;
use crate::sink::{Sink, SinkError};
use crate::time::write_rfc3339_millis;

/// The operators a text format may use, without the `%` signs.
pub const KNOWN_OPERATORS: [&str; 12] = [
    "START_TIME",
    "REQ_METHOD",
    "REQ_PATH",
    "RESPONSE_CODE",
    "RESPONSE_FLAGS",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "DURATION",
    "UPSTREAM_CLUSTER",
    "UPSTREAM_HOST",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "PROTOCOL",
];

/// A format close to Envoy's default text access log, with this crate's operators.
pub const DEFAULT_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ_METHOD% %REQ_PATH% %PROTOCOL%\" %RESPONSE_CODE% \
%RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \"%UPSTREAM_CLUSTER%\" \"%UPSTREAM_HOST%\" \
\"%DOWNSTREAM_REMOTE_ADDRESS%\"\n";

/// How each event is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line, with Envoy/Istio's JSON access log keys.
    Json,
    /// A format string with `%OPERATOR%`s (see [`KNOWN_OPERATORS`]) and `%%` for a literal `%`. A
    /// newline is added when the format does not end with one.
    Text(String),
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogOutput {
    /// The process's standard output.
    Stdout,
    /// A file, appended to, rotated by size.
    File {
        /// The file; created if absent.
        path: PathBuf,
        /// Rotate before the file would grow past this many bytes; `None` never rotates.
        max_bytes: Option<u64>,
        /// Rotated files kept (`path.1` newest ... `path.{max_files}` oldest).
        max_files: usize,
    },
}

/// Configuration of [`AccessLogSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Line format.
    pub format: AccessLogFormat,
    /// Destination.
    pub output: AccessLogOutput,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    StartTime,
    ReqMethod,
    ReqPath,
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamCluster,
    UpstreamHost,
    DownstreamRemoteAddress,
    Protocol,
}

impl Operator {
    fn from_name(name: &str) -> Option<Operator> {
        Some(match name {
            "START_TIME" => Operator::StartTime,
            "REQ_METHOD" => Operator::ReqMethod,
            "REQ_PATH" => Operator::ReqPath,
            "RESPONSE_CODE" => Operator::ResponseCode,
            "RESPONSE_FLAGS" => Operator::ResponseFlags,
            "BYTES_RECEIVED" => Operator::BytesReceived,
            "BYTES_SENT" => Operator::BytesSent,
            "DURATION" => Operator::Duration,
            "UPSTREAM_CLUSTER" => Operator::UpstreamCluster,
            "UPSTREAM_HOST" => Operator::UpstreamHost,
            "DOWNSTREAM_REMOTE_ADDRESS" => Operator::DownstreamRemoteAddress,
            "PROTOCOL" => Operator::Protocol,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Op(Operator),
}

fn parse_format(format: &str) -> Result<Vec<Segment>, TelemetryError> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    let mut offset = 0;
    while let Some(start) = rest.find('%') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(len) = after.find('%') else {
            return Err(TelemetryError::UnterminatedOperator {
                position: offset + start,
            });
        };
        let name = &after[..len];
        if name.is_empty() {
            literal.push('%');
        } else {
            let op = Operator::from_name(name).ok_or_else(|| TelemetryError::UnknownOperator {
                operator: name.to_string(),
                position: offset + start,
            })?;
            if !literal.is_empty() {
                segments.push(Segment::Literal(std::mem::take(&mut literal)));
            }
            segments.push(Segment::Op(op));
        }
        let consumed = start + 1 + len + 1;
        rest = &rest[consumed..];
        offset += consumed;
    }
    literal.push_str(rest);
    if !literal.ends_with('\n') {
        literal.push('\n');
    }
    segments.push(Segment::Literal(literal));
    Ok(segments)
}

/// Appends `value` with control characters escaped, so it cannot break the line.
fn push_clean(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

fn render_text(segments: &[Segment], event: &Event, out: &mut String) {
    for segment in segments {
        let op = match segment {
            Segment::Literal(text) => {
                out.push_str(text);
                continue;
            }
            Segment::Op(op) => *op,
        };
        let opt = |out: &mut String, v: Option<&str>| match v {
            Some(v) if !v.is_empty() => push_clean(out, v),
            _ => out.push('-'),
        };
        match op {
            Operator::StartTime => write_rfc3339_millis(event.start_time, out),
            Operator::ReqMethod => opt(out, event.method.as_deref()),
            Operator::ReqPath => opt(out, event.path.as_deref()),
            Operator::ResponseCode => {
                let _ = write!(out, "{}", event.response_code);
            }
            Operator::ResponseFlags => opt(out, Some(&event.response_flags)),
            Operator::BytesReceived => {
                let _ = write!(out, "{}", event.bytes_received());
            }
            Operator::BytesSent => {
                let _ = write!(out, "{}", event.bytes_sent());
            }
            Operator::Duration => {
                let _ = write!(out, "{}", event.duration.as_millis());
            }
            Operator::UpstreamCluster => opt(out, event.upstream_cluster.as_deref()),
            Operator::UpstreamHost => match event.upstream_host {
                Some(addr) => {
                    let _ = write!(out, "{addr}");
                }
                None => out.push('-'),
            },
            Operator::DownstreamRemoteAddress => match event.downstream_remote_address {
                Some(addr) => {
                    let _ = write!(out, "{addr}");
                }
                None => out.push('-'),
            },
            Operator::Protocol => out.push_str(event.request_protocol()),
        }
    }
}

/// Istio's JSON access log keys, for the values an [`Event`] has.
#[derive(Serialize)]
struct JsonLine<'a> {
    start_time: &'a str,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: &'a str,
    response_code: u16,
    grpc_status: Option<u32>,
    response_flags: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    authority: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    upstream_cluster: Option<&'a str>,
    upstream_host: Option<std::net::SocketAddr>,
    downstream_remote_address: Option<std::net::SocketAddr>,
    reporter: &'a str,
    connection_security_policy: &'a str,
    trace_id: Option<String>,
    span_id: Option<String>,
}

fn render_json(event: &Event, scratch: &mut String, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    scratch.clear();
    write_rfc3339_millis(event.start_time, scratch);
    let flags: &str = &event.response_flags;
    let line = JsonLine {
        start_time: scratch,
        method: event.method.as_deref(),
        path: event.path.as_deref(),
        protocol: event.request_protocol(),
        response_code: event.response_code,
        grpc_status: event.grpc_response_status,
        response_flags: flags,
        bytes_received: event.bytes_received(),
        bytes_sent: event.bytes_sent(),
        duration: u64::try_from(event.duration.as_millis()).unwrap_or(u64::MAX),
        authority: event.authority.as_deref(),
        user_agent: event.user_agent.as_deref(),
        request_id: event.request_id.as_deref(),
        upstream_cluster: event.upstream_cluster.as_deref(),
        upstream_host: event.upstream_host,
        downstream_remote_address: event.downstream_remote_address,
        reporter: event.reporter.as_str(),
        connection_security_policy: event.connection_security_policy.as_str(),
        trace_id: event.trace.map(|t| t.trace_id.to_string()),
        span_id: event.trace.map(|t| t.span_id.to_string()),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.push(b'\n');
    Ok(())
}

#[derive(Debug)]
enum Renderer {
    Json,
    Text(Vec<Segment>),
}

#[derive(Debug)]
struct RotatingFile {
    path: PathBuf,
    max_bytes: Option<u64>,
    max_files: usize,
    /// `None` after an error: the next write reopens.
    writer: Option<BufWriter<File>>,
    size: u64,
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl RotatingFile {
    fn open(&mut self, truncate: bool) -> io::Result<&mut BufWriter<File>> {
        let file = OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .open(&self.path)?;
        self.size = if truncate { 0 } else { file.metadata()?.len() };
        Ok(self.writer.insert(BufWriter::new(file)))
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut writer) = self.writer.take() {
            writer.flush()?;
        }
        if self.max_files > 0 {
            for n in (1..self.max_files).rev() {
                rename_if_exists(&numbered(&self.path, n), &numbered(&self.path, n + 1))?;
            }
            rename_if_exists(&self.path, &numbered(&self.path, 1))?;
        }
        self.open(true)?;
        Ok(())
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let result = self.try_write_line(line);
        if result.is_err() {
            // The buffered writer's state is unknown after a failure: start over next time.
            self.writer = None;
        }
        result
    }

    fn try_write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.writer.is_none() {
            self.open(false)?;
        }
        let len = line.len() as u64;
        if let Some(max) = self.max_bytes
            && self.size > 0
            && self.size.saturating_add(len) > max
        {
            self.rotate()?;
        }
        let writer = match &mut self.writer {
            Some(writer) => writer,
            None => self.open(false)?,
        };
        writer.write_all(line)?;
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(writer) => {
                let result = writer.flush();
                if result.is_err() {
                    self.writer = None;
                }
                result
            }
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
enum Output {
    Stdout,
    File(RotatingFile),
}

/// Writes one access log line per event.
#[derive(Debug)]
pub struct AccessLogSink {
    renderer: Renderer,
    output: Output,
    text: String,
    bytes: Vec<u8>,
}

impl AccessLogSink {
    /// Parses the format (an unknown `%OPERATOR%` is an error here, not at run time) and opens the
    /// file, creating it if needed.
    pub fn new(config: AccessLogConfig) -> Result<AccessLogSink, TelemetryError> {
        let renderer = match &config.format {
            AccessLogFormat::Json => Renderer::Json,
            AccessLogFormat::Text(format) => Renderer::Text(parse_format(format)?),
        };
        let output = match config.output {
            AccessLogOutput::Stdout => Output::Stdout,
            AccessLogOutput::File {
                path,
                max_bytes,
                max_files,
            } => {
                if max_bytes == Some(0) {
                    return Err(TelemetryError::InvalidConfig(
                        "access log max_bytes must be greater than 0 (or unset to never rotate)".into(),
                    ));
                }
                let mut file = RotatingFile {
                    path,
                    max_bytes,
                    max_files,
                    writer: None,
                    size: 0,
                };
                if let Err(source) = file.open(false).map(drop) {
                    return Err(TelemetryError::Io {
                        what: format!("open access log {}", file.path.display()),
                        source,
                    });
                }
                Output::File(file)
            }
        };
        Ok(AccessLogSink {
            renderer,
            output,
            text: String::with_capacity(512),
            bytes: Vec::with_capacity(512),
        })
    }

    /// Renders `event` into `self.bytes`.
    fn render(&mut self, event: &Event) -> Result<(), SinkError> {
        self.bytes.clear();
        match &self.renderer {
            Renderer::Json => render_json(event, &mut self.text, &mut self.bytes)
                .map_err(|e| SinkError::Other(format!("encode access log JSON: {e}")))?,
            Renderer::Text(segments) => {
                self.text.clear();
                render_text(segments, event, &mut self.text);
                self.bytes.extend_from_slice(self.text.as_bytes());
            }
        }
        Ok(())
    }
}

impl Sink for AccessLogSink {
    fn name(&self) -> &str {
        "access_log"
    }

    fn export(&mut self, batch: &[Event]) -> Result<(), SinkError> {
        let mut failed = 0;
        let mut first_error: Option<io::Error> = None;
        let mut stdout = match self.output {
            Output::Stdout => Some(io::stdout().lock()),
            Output::File(_) => None,
        };
        for event in batch {
            if let Err(e) = self.render(event) {
                failed += 1;
                first_error.get_or_insert_with(|| io::Error::other(e.to_string()));
                continue;
            }
            let written = match (&mut self.output, &mut stdout) {
                (Output::File(file), _) => file.write_line(&self.bytes),
                (Output::Stdout, Some(out)) => out.write_all(&self.bytes),
                (Output::Stdout, None) => Ok(()),
            };
            if let Err(e) = written {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        if let Some(out) = &mut stdout
            && let Err(e) = out.flush()
        {
            first_error.get_or_insert(e);
        }
        match first_error {
            None => Ok(()),
            Some(source) => Err(SinkError::Partial {
                failed,
                total: batch.len(),
                what: "write access log",
                source,
            }),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        match &mut self.output {
            Output::File(file) => file.flush().map_err(|source| SinkError::Io {
                what: "flush access log",
                source,
            }),
            Output::Stdout => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, ReporterSide};
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    fn event() -> Event {
        let mut e = Event::new(Kind::Http, ReporterSide::Destination);
        e.start_time = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        e.duration = Duration::from_millis(42);
        e.method = Some("GET".into());
        e.path = Some("/a\nb".into());
        e.response_code = 503;
        e.response_flags = Cow::Borrowed("UF,URX");
        e.request_bytes = 10;
        e.response_bytes = 20;
        e.upstream_cluster = Some(Arc::from("outbound|80||reviews"));
        e
    }

    #[test]
    fn text_format_renders_operators_and_escapes_values() {
        let segments =
            parse_format("%START_TIME% %REQ_METHOD% %REQ_PATH% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS% %PROTOCOL% 100%%")
                .unwrap();
        let mut out = String::new();
        render_text(&segments, &event(), &mut out);
        assert_eq!(
            out,
            "2023-11-14T22:13:20.123Z GET /a\\nb 503 UF,URX 10 20 42 outbound|80||reviews - http 100%\n"
        );
    }

    #[test]
    fn bad_formats_fail_at_construction() {
        let err = parse_format("ok %REQ_METHOD% %NOPE% x").unwrap_err();
        assert!(
            matches!(&err, TelemetryError::UnknownOperator { operator, position: 16 } if operator == "NOPE"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("START_TIME"),
            "error lists known operators: {err}"
        );
        assert!(matches!(
            parse_format("50% done"),
            Err(TelemetryError::UnterminatedOperator { position: 2 })
        ));
        let config = AccessLogConfig {
            format: AccessLogFormat::Text("%REQ(:METHOD)%".into()),
            output: AccessLogOutput::Stdout,
        };
        assert!(AccessLogSink::new(config).is_err());
        assert!(parse_format(DEFAULT_TEXT_FORMAT).is_ok());
    }

    #[test]
    fn json_lines_carry_istio_keys() {
        let mut bytes = Vec::new();
        render_json(&event(), &mut String::new(), &mut bytes).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "one line per event");
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a\nb");
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UF,URX");
        assert_eq!(v["bytes_received"], 10);
        assert_eq!(v["bytes_sent"], 20);
        assert_eq!(v["duration"], 42);
        assert_eq!(v["upstream_cluster"], "outbound|80||reviews");
        assert!(v["authority"].is_null());
    }
}

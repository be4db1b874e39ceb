//! Access loggers (`envoy.access_loggers.file`, `.stdout`, `.stderr`) into Tessera's access logs:
//! Envoy's default format, a text format, or a JSON format of string fields.

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{SubstitutionFormatString, substitution_format_string};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    StderrAccessLog, StdoutAccessLog, stderr_access_log, stdout_access_log,
};
use envoy_types::pb::google::protobuf::{Struct, value::Kind};
use prost::Message;
use tessera_model as model;
use tessera_model::format;

use crate::Problems;
use crate::listener::type_name;

const FILE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Converts the access logs of a connection manager or TCP proxy.
pub(crate) fn access_logs(logs: &[AccessLog], at: &str, p: &mut Problems) -> Vec<model::AccessLog> {
    let mut out = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let here = format!("{at}[{i}]");
        if l.filter.is_some() {
            p.add(format!("{here}.filter"), "access log filters are not supported yet");
            continue;
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = &l.config_type else {
            p.add(&here, "an access log needs a typed_config");
            continue;
        };
        let bad = |p: &mut Problems, e: prost::DecodeError| p.add(&here, format!("malformed {}: {e}", type_name(any)));
        let (path, fmt) = match type_name(any) {
            FILE => match FileAccessLog::decode(any.value.as_slice()) {
                Ok(f) => {
                    let fmt = match f.access_log_format {
                        None => Fmt::Default,
                        #[allow(deprecated)]
                        Some(file_access_log::AccessLogFormat::Format(s)) => Fmt::Text(s),
                        #[allow(deprecated)]
                        Some(file_access_log::AccessLogFormat::JsonFormat(j)) => Fmt::Json(j),
                        Some(file_access_log::AccessLogFormat::LogFormat(s)) => substitution(s),
                        Some(_) => Fmt::Unsupported,
                    };
                    (f.path, fmt)
                }
                Err(e) => {
                    bad(p, e);
                    continue;
                }
            },
            STDOUT => match StdoutAccessLog::decode(any.value.as_slice()) {
                Ok(s) => (
                    "/dev/stdout".to_string(),
                    match s.access_log_format {
                        None => Fmt::Default,
                        Some(stdout_access_log::AccessLogFormat::LogFormat(f)) => substitution(f),
                    },
                ),
                Err(e) => {
                    bad(p, e);
                    continue;
                }
            },
            STDERR => match StderrAccessLog::decode(any.value.as_slice()) {
                Ok(s) => (
                    "/dev/stderr".to_string(),
                    match s.access_log_format {
                        None => Fmt::Default,
                        Some(stderr_access_log::AccessLogFormat::LogFormat(f)) => substitution(f),
                    },
                ),
                Err(e) => {
                    bad(p, e);
                    continue;
                }
            },
            other => {
                p.add(&here, format!("access logger `{other}` is not supported"));
                continue;
            }
        };
        let format = match fmt {
            Fmt::Default => model::LogFormat::default_text(),
            Fmt::Text(s) => match format::parse(&s) {
                Ok(tokens) => model::LogFormat::Text { source: s, tokens },
                Err(e) => {
                    p.add(format!("{here}.format"), e);
                    continue;
                }
            },
            Fmt::Json(j) => match json(&j) {
                Ok(fields) => model::LogFormat::Json { fields },
                Err(e) => {
                    p.add(format!("{here}.json_format"), e);
                    continue;
                }
            },
            Fmt::Unsupported => {
                p.add(&here, "only text and JSON formats are supported");
                continue;
            }
        };
        out.push(model::AccessLog { path, format });
    }
    out
}

enum Fmt {
    Default,
    Text(String),
    Json(Struct),
    Unsupported,
}

fn substitution(s: SubstitutionFormatString) -> Fmt {
    // text_format is deprecated for text_format_source but still what configs write.
    #[allow(deprecated)]
    match s.format {
        Some(substitution_format_string::Format::TextFormat(t)) => Fmt::Text(t),
        Some(substitution_format_string::Format::JsonFormat(j)) => Fmt::Json(j),
        None => Fmt::Default,
        Some(_) => Fmt::Unsupported,
    }
}

fn json(j: &Struct) -> Result<Vec<(String, String, Vec<format::Token>)>, String> {
    let mut keys: Vec<&String> = j.fields.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let Some(Kind::StringValue(src)) = j.fields.get(k).and_then(|v| v.kind.as_ref()) else {
            return Err(format!("field `{k}`: only string values are supported"));
        };
        out.push((
            k.clone(),
            src.clone(),
            format::parse(src).map_err(|e| format!("field `{k}`: {e}"))?,
        ));
    }
    Ok(out)
}

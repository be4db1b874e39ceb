//! Registry adapters: each maps a foreign registry's model (ZooKeeper's Dubbo provider URLs, an
//! etcd key layout, and next Consul, Nacos, Eureka, SOFARegistry, Kubernetes) into ours and
//! watches it. An adapter runs as one task and publishes its whole view as a [`Snapshot`]
//! through a [`Feed`]; Pilot merges the views of every registry.
//!
//! The contract every adapter keeps:
//! - it publishes a full view each time its backend changes (never a partial one);
//! - when the backend goes away it keeps its last published view (Pilot keeps serving the last
//!   good state), says so through [`Feed::status`], and reconnects with backoff;
//! - every service and instance it publishes has `source` = `<kind>:<where>`, e.g.
//!   `zookeeper:127.0.0.1:2181/dubbo/com.foo.Bar/providers`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::Problem;
use crate::model::Snapshot;

/// The state of an adapter's connection to its backend, shown on Pilot's admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Connected and watching.
    pub connected: bool,
    /// Why the last attempt or watch failed, if it did.
    pub last_error: Option<String>,
    /// Views published so far.
    pub updates: u64,
}

/// Where an adapter publishes.
#[derive(Debug, Clone)]
pub struct Feed {
    view: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<Status>,
}

impl Feed {
    /// A feed and the receivers Pilot reads.
    pub fn new() -> (Feed, watch::Receiver<Arc<Snapshot>>, watch::Receiver<Status>) {
        let (view, vr) = watch::channel(Arc::new(Snapshot::default()));
        let (status, sr) = watch::channel(Status::default());
        (Feed { view, status }, vr, sr)
    }

    /// Publishes a full view (ignored when equal to the last one).
    pub fn publish(&self, s: Snapshot) {
        self.view.send_if_modified(|cur| {
            if **cur == s {
                return false;
            }
            *cur = Arc::new(s);
            true
        });
        self.status.send_modify(|st| {
            st.updates += 1;
            st.connected = true;
            st.last_error = None;
        });
    }

    /// Records the connection state.
    pub fn status(&self, connected: bool, error: Option<String>) {
        self.status.send_modify(|st| {
            st.connected = connected;
            if error.is_some() {
                st.last_error = error;
            }
        });
    }
}

/// A registry adapter.
pub trait Adapter: Send + Sync + std::fmt::Debug + 'static {
    /// `zookeeper`, `etcd`, ...: the key under `registries:` in pilot.yaml.
    fn kind(&self) -> &'static str;
    /// Runs until the future is dropped, publishing through `feed`.
    fn run(self: Arc<Self>, feed: Feed) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// A namespace an adapter may map into: a DNS label (lower case, digits, `-`, at most 63).
pub(crate) fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The adapters pilot.yaml can name under `registries:` besides `file` and `api`.
pub const KINDS: &[&str] = &["zookeeper", "etcd"];

/// Builds the adapter configured under `registries.<kind>` of `file`.
pub fn from_config(
    kind: &str,
    v: &Value,
    file: &str,
    base: &std::path::Path,
) -> Result<Arc<dyn Adapter>, Vec<Problem>> {
    let _ = (v, base);
    if kind == "zookeeper" {
        return crate::zookeeper::from_config(v, file);
    }
    if kind == "etcd" {
        return crate::etcd::adapter::from_config(v, file);
    }
    Err(vec![Problem {
        file: file.to_string(),
        path: format!("registries.{kind}"),
        reason: format!("the `{kind}` registry adapter is not built yet"),
    }])
}

/// An adapter's config section (`registries.zookeeper`...), read field by field: every problem
/// names `<section>.<field>`, and the checks every adapter shares (unknown fields, strings, the
/// namespace, durations in a range, absolute key paths) are written once.
pub(crate) struct Section<'a> {
    file: &'a str,
    at: &'a str,
    map: &'a serde_json::Map<String, Value>,
    problems: Vec<Problem>,
}

impl<'a> Section<'a> {
    /// The section `v` at `at`, with its fields checked against `known`; a problem when it is not
    /// a map (`example` shows one).
    pub(crate) fn new(
        v: &'a Value,
        file: &'a str,
        at: &'a str,
        known: &[&str],
        example: &str,
    ) -> Result<Self, Vec<Problem>> {
        let mut s = Section {
            file,
            at,
            map: match v.as_object() {
                Some(m) => m,
                None => {
                    return Err(vec![Problem {
                        file: file.to_string(),
                        path: at.to_string(),
                        reason: format!("expected a map such as {example}, not {v}"),
                    }]);
                }
            },
            problems: Vec::new(),
        };
        for k in s.map.keys() {
            if !known.contains(&k.as_str()) {
                s.problem(k, format!("unknown field (known: {})", known.join(", ")));
            }
        }
        Ok(s)
    }

    /// Records a problem with `field`.
    pub(crate) fn problem(&mut self, field: &str, reason: String) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            path: format!("{}.{field}", self.at),
            reason,
        });
    }

    /// The raw value of `field`; None when absent or null.
    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// `field` as a trimmed string; None when absent (or not a string: a problem).
    pub(crate) fn string(&mut self, field: &str) -> Option<String> {
        match self.get(field)? {
            Value::String(s) => Some(s.trim().to_string()),
            other => {
                self.problem(field, format!("expected a string, not {other}"));
                None
            }
        }
    }

    /// `namespace`, `default` when absent; it must be a DNS label.
    pub(crate) fn namespace(&mut self) -> String {
        let namespace = self.string("namespace").unwrap_or_else(|| "default".to_string());
        if !dns_label(&namespace) {
            self.problem(
                "namespace",
                format!("`{namespace}` is not a namespace: lower-case letters, digits and `-`, at most 63"),
            );
        }
        namespace
    }

    /// `field` as a duration from `min` to `max` (`range` says so in words, `example` shows two),
    /// `default` when absent or wrong.
    pub(crate) fn duration(
        &mut self,
        field: &str,
        default: Duration,
        (min, max, range): (Duration, Duration, &str),
        example: &str,
    ) -> Duration {
        let Some(s) = self.string(field) else {
            return default;
        };
        match crate::config::duration(&s) {
            Some(d) if d >= min && d <= max => d,
            Some(_) => {
                self.problem(field, format!("`{s}` is out of range: {range}"));
                default
            }
            None => {
                self.problem(field, format!("`{s}` is not a duration such as {example}"));
                default
            }
        }
    }

    /// `value`, or every problem found.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, Vec<Problem>> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.problems)
        }
    }
}

/// An absolute key path: starts with `/`, no trailing `/`, no empty, `.` or `..` part.
pub(crate) fn absolute_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.ends_with('/')
        && p[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

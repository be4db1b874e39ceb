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

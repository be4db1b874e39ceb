//! The etcd registry adapter (`registries.etcd`): services and instances written to etcd in the
//! key layout of [`super::layout`] become Pilot services and instances.
//!
//! It follows the prefix ([`super::follow`]): one range read, then a prefix watch from the next
//! revision, the whole view published after each batch of events. An ephemeral instance is a
//! key attached to a lease: when its owner stops renewing the lease, etcd deletes the key and
//! the instance goes. When etcd goes away the adapter keeps its last view (Pilot keeps serving
//! it), reports `connected: false` with the error, and reconnects with jittered backoff, trying
//! every endpoint. A value that does not pass the checks is logged once with its key and the
//! reason, and skipped; the rest of the view is published.
//!
//! Every service and instance has `source` = `etcd:<endpoints><key>`, e.g.
//! `etcd:127.0.0.1:2379/tessera/registry/instances/shop/reviews/i-1`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use super::EtcdConfig;
use super::layout::{self, Key};
use crate::Problem;
use crate::registry::{Adapter, Feed};

/// The adapter.
#[derive(Debug)]
pub struct Etcd {
    cfg: EtcdConfig,
}

/// Builds the adapter from its pilot.yaml section `registries.etcd`.
pub fn from_config(v: &Value, file: &str) -> Result<Arc<dyn Adapter>, Vec<Problem>> {
    Ok(Arc::new(Etcd {
        cfg: EtcdConfig::parse(v, file, "registries.etcd", true)?,
    }))
}

impl Adapter for Etcd {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn run(self: Arc<Self>, feed: Feed) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move { self.watch_forever(&feed).await })
    }
}

impl Etcd {
    async fn watch_forever(&self, feed: &Feed) {
        let client = self.cfg.client();
        let cfg = &self.cfg;
        let endpoints = cfg.endpoints.join(",");
        let source = |_: &Key, key: &str| format!("etcd:{endpoints}{key}");
        // Skipped keys already logged, at the revision they were logged at.
        let mut reported: BTreeMap<String, i64> = BTreeMap::new();
        let mut cache = layout::Cache::default();
        // Shared by both closures: log "connected" again after each outage.
        let connected = std::sync::atomic::AtomicBool::new(false);
        let on_view = |m: &super::follow::Mirror| {
            let (read, skipped) = layout::read(&cfg.prefix, &cfg.namespace, &m.kvs, &source, &mut cache);
            reported.retain(|k, _| m.kvs.contains_key(k));
            for s in skipped {
                let rev = m.kvs.get(&s.key).map_or(0, |st| st.mod_revision);
                if reported.insert(s.key.clone(), rev) != Some(rev) {
                    tracing::error!(registry = "etcd", key = %s.key, reason = %s.reason, "etcd registry: value skipped");
                }
            }
            let snap = layout::snapshot(&read);
            if !connected.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(
                    registry = "etcd",
                    revision = m.revision,
                    services = snap.services.len(),
                    "etcd registry connected"
                );
            }
            feed.publish(snap);
        };
        let on_down = |e: &super::client::EtcdError, wait: std::time::Duration| {
            tracing::warn!(
                registry = "etcd",
                error = %e,
                retry_in = ?wait,
                "etcd registry disconnected; Pilot keeps its last view and reconnects"
            );
            connected.store(false, std::sync::atomic::Ordering::Relaxed);
            feed.status(false, Some(e.to_string()));
        };
        super::follow::follow(&client, &format!("{}/", cfg.prefix), on_view, on_down).await;
    }
}

//! The registry API's shared store (`store.etcd`): what the API is given is written to etcd in
//! the layout of [`super::layout`], and every Pilot replica's API view follows that prefix (see
//! `ApiRegistry::etcd`), so replicas hold no state of their own: a registration through one is
//! served by all. Services and instances without a TTL are plain keys; an instance with a TTL
//! is a key attached to a lease of its own of that TTL (whole seconds, rounded up; etcd may
//! raise it to its minimum), a heartbeat renews the lease once, and when the lease lapses etcd
//! deletes the key and every replica drops the instance. Writes are transactions that check the
//! service key exists, so an instance never outlives a concurrent service delete.

use std::time::Duration;

use serde_json::Value;

use super::EtcdConfig;
use super::client::{Client, EtcdError, TxnOp};
use super::layout;

/// The store: a client and where the layout lives.
#[derive(Debug)]
pub struct EtcdStore {
    /// The client.
    pub client: std::sync::Arc<Client>,
    /// The settings.
    pub cfg: EtcdConfig,
}

/// Whole seconds of `ttl`, rounded up, at least 1.
pub fn lease_seconds(ttl: Duration) -> i64 {
    let s = ttl.as_millis().div_ceil(1000).max(1);
    i64::try_from(s).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// A store on `cfg`'s endpoints.
    pub fn new(cfg: EtcdConfig) -> EtcdStore {
        EtcdStore {
            client: std::sync::Arc::new(cfg.client()),
            cfg,
        }
    }

    /// The prefix the API view follows (with its trailing `/`).
    pub fn watch_prefix(&self) -> String {
        format!("{}/", self.cfg.prefix)
    }

    /// Revokes `lease` without waiting; a failure only means it lapses by itself.
    fn revoke_later(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.lease_revoke(lease).await {
                tracing::debug!(lease, error = %e, "etcd store: cannot revoke a lease no key uses; it will lapse");
            }
        });
    }

    /// Writes service `ns/name`; the revision, and whether it is new.
    pub async fn put_service(&self, ns: &str, name: &str, body: &Value) -> Result<(i64, bool), EtcdError> {
        let key = layout::service_key(&self.cfg.prefix, ns, name);
        let (rev, prev) = self.client.put(key.as_bytes(), body.to_string().as_bytes(), 0).await?;
        Ok((rev, prev.is_none()))
    }

    /// Deletes service `ns/name` and its instances; None when it was not there.
    pub async fn delete_service(&self, ns: &str, name: &str) -> Result<Option<i64>, EtcdError> {
        let key = layout::service_key(&self.cfg.prefix, ns, name);
        let r = self
            .client
            .txn_if_exists(
                key.as_bytes(),
                &[
                    TxnOp::Delete {
                        key: key.clone().into_bytes(),
                        prefix: false,
                    },
                    TxnOp::Delete {
                        key: layout::instances_prefix(&self.cfg.prefix, ns, name).into_bytes(),
                        prefix: true,
                    },
                ],
            )
            .await?;
        if !r.succeeded {
            return Ok(None);
        }
        for kv in r.prev.iter().flatten() {
            self.revoke_later(kv.lease);
        }
        Ok(Some(r.revision))
    }

    /// Writes instance `id` of `ns/name` (on a lease of its own when `ttl`); None when the
    /// service is not there. The revision, and whether it is new.
    pub async fn put_instance(
        &self,
        ns: &str,
        name: &str,
        id: &str,
        body: &Value,
        ttl: Option<Duration>,
    ) -> Result<Option<(i64, bool)>, EtcdError> {
        let lease = match ttl {
            Some(t) => self.client.lease_grant(lease_seconds(t)).await?,
            None => 0,
        };
        let skey = layout::service_key(&self.cfg.prefix, ns, name);
        let ikey = layout::instance_key(&self.cfg.prefix, ns, name, id);
        let r = self
            .client
            .txn_if_exists(
                skey.as_bytes(),
                &[TxnOp::Put {
                    key: ikey.into_bytes(),
                    value: body.to_string().into_bytes(),
                    lease,
                }],
            )
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.revoke_later(lease);
                return Err(e);
            }
        };
        if !r.succeeded {
            self.revoke_later(lease);
            return Ok(None);
        }
        let prev = r.prev.first().and_then(|p| p.first());
        if let Some(p) = prev
            && p.lease != lease
        {
            // The old lease held only this key, now on the new one (or on none).
            self.revoke_later(p.lease);
        }
        Ok(Some((r.revision, prev.is_none())))
    }

    /// Deletes instance `id` of `ns/name`; None when it was not there.
    pub async fn delete_instance(&self, ns: &str, name: &str, id: &str) -> Result<Option<i64>, EtcdError> {
        let key = layout::instance_key(&self.cfg.prefix, ns, name, id);
        let (rev, prev) = self.client.delete(key.as_bytes(), false).await?;
        if prev.is_empty() {
            return Ok(None);
        }
        for kv in &prev {
            self.revoke_later(kv.lease);
        }
        Ok(Some(rev))
    }

    /// Renews `lease`; false when it has lapsed.
    pub async fn heartbeat(&self, lease: i64) -> Result<bool, EtcdError> {
        Ok(self.client.lease_keepalive(lease).await? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(100)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(2000)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(2001)), 3);
    }
}

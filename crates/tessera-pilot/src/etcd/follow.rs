//! Following a prefix: read everything at revision R, watch from R+1, hand over the whole
//! mirror after the read and after every batch of events. When the watch breaks (an endpoint
//! dies, a member loses its leader, the stream ends) the follower reports it, keeps the mirror
//! it has (the caller keeps serving it), and reads again with jittered exponential backoff
//! (200 ms doubling to 10 s), the client trying each endpoint in turn. A compacted revision is
//! no failure: the follower reads again at once.

use std::collections::BTreeMap;
use std::time::Duration;

use super::client::{Client, EtcdError, Event};
use super::layout::Stored;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often the member serving the watch is asked whether it is alive and has a leader (a
/// silent member would otherwise leave the watch waiting forever).
const PROBE: Duration = Duration::from_secs(3);

/// What the follower holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// The store's revision the mirror is at.
    pub revision: i64,
    /// Every pair under the prefix.
    pub kvs: BTreeMap<String, Stored>,
}

/// A random number, enough for jitter (std's hasher keys are random per process and per call).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// Half to all of `d`.
pub(crate) fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(2) as u64;
    Duration::from_millis(ms / 2 + random() % (ms / 2 + 1))
}

/// Follows `prefix` until the future is dropped: `on_view` gets the mirror after each change,
/// `on_down` each failure (and how long until the next attempt).
pub async fn follow(
    client: &Client,
    prefix: &str,
    mut on_view: impl FnMut(&Mirror) + Send,
    mut on_down: impl FnMut(&EtcdError, Duration) + Send,
) {
    let mut mirror = Mirror::default();
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut published = false;
        let err = session(client, prefix, &mut mirror, &mut on_view, &mut published).await;
        if let EtcdError::Compacted(r) = err {
            tracing::info!(
                prefix,
                compacted = r,
                "etcd: the watch fell behind a compaction; reading everything again"
            );
            continue;
        }
        if published {
            backoff = BACKOFF_MIN;
        }
        let wait = jitter(backoff);
        on_down(&err, wait);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    client: &Client,
    prefix: &str,
    mirror: &mut Mirror,
    on_view: &mut (impl FnMut(&Mirror) + Send),
    published: &mut bool,
) -> EtcdError {
    let range = match client.range_prefix(prefix.as_bytes()).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let mut next = Mirror {
        revision: range.revision,
        kvs: BTreeMap::new(),
    };
    for kv in range.kvs {
        next.kvs.insert(
            String::from_utf8_lossy(&kv.key).into_owned(),
            Stored {
                value: kv.value,
                lease: kv.lease,
                mod_revision: kv.mod_revision,
            },
        );
    }
    *mirror = next;
    on_view(mirror);
    *published = true;
    let mut watch = match client.watch_prefix(prefix.as_bytes(), range.revision + 1).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    tracing::info!(
        prefix,
        endpoint = %watch.authority(),
        revision = range.revision,
        "etcd: watching"
    );
    let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + PROBE, PROBE);
    loop {
        tokio::select! {
            batch = watch.next() => {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => return e,
                };
                if batch.events.is_empty() {
                    continue;
                }
                for ev in batch.events {
                    match ev {
                        Event::Put(kv) => {
                            mirror.kvs.insert(
                                String::from_utf8_lossy(&kv.key).into_owned(),
                                Stored { value: kv.value, lease: kv.lease, mod_revision: kv.mod_revision },
                            );
                        }
                        Event::Delete(key) => {
                            mirror.kvs.remove(String::from_utf8_lossy(&key).as_ref());
                        }
                    }
                }
                mirror.revision = mirror.revision.max(batch.revision);
                on_view(mirror);
            }
            _ = probe.tick() => {
                if let Err(e) = client.probe(watch.endpoint()).await {
                    return e;
                }
            }
        }
    }
}

//! Mixer's redisquota, in the sidecar: the same fixed window and token bucket as the memory
//! quota, counted in Redis so every sidecar naming the same server and quota shares one limit.
//!
//! Each decision is one Lua script (atomic on the server, one round trip; EVALSHA, with EVAL
//! when the server does not know the script yet). The bucket reads the server's clock (`TIME`),
//! so sidecars with skewed clocks agree. With `prefetch: N` a sidecar takes up to N tokens per
//! trip and spends them locally (Istio's prefetch), keeping Redis off most requests; tokens held
//! locally lapse with the window they came from.
//!
//! Every call is bounded by `timeout` (connecting included). When Redis is down, slow or
//! answers an error, the quota answers `fail_open` at once: allowed (counted `failed_open`) or
//! refused (`failed_closed`), and a warning is logged at most once a second. A standalone server
//! is reached through redis-rs's `ConnectionManager`, which reconnects on its own; a cluster
//! connection is made on first use and again after it fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tessera_model as model;
use tessera_policy::{Algorithm, Attributes, Quota, QuotaSpec};
use tokio::time::Instant;

use crate::stats::{Counter, Scope, Stats};

/// `KEYS[1]` the counter; `ARGV` max, window (ms), tokens wanted. Grants what is left, up to
/// the amount wanted; returns {granted, remaining, ms until the window ends}.
const FIXED: &str = r#"
local max = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(want, max - used)
if grant < 0 then grant = 0 end
if grant > 0 then
  used = redis.call('INCRBY', KEYS[1], grant)
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  if used > 0 then redis.call('PEXPIRE', KEYS[1], window) end
  ttl = window
end
local left = max - used
if left < 0 then left = 0 end
return {grant, left, ttl}
"#;

/// A token bucket of `max` tokens refilled evenly over `window` ms, on the server's clock.
/// Returns {granted, remaining, ms until the bucket is full again}.
const BUCKET: &str = r#"
local max = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 't', 'n')
local last = tonumber(s[1])
local tokens = tonumber(s[2])
if last == nil or tokens == nil then
  last = now
  tokens = max
end
local rate = max / window
local elapsed = now - last
if elapsed < 0 then elapsed = 0 end
tokens = math.min(max, tokens + elapsed * rate)
local grant = math.min(want, math.floor(tokens))
if grant < 0 then grant = 0 end
tokens = tokens - grant
redis.call('HSET', KEYS[1], 't', now, 'n', tostring(tokens))
redis.call('PEXPIRE', KEYS[1], window)
return {grant, math.floor(tokens), math.ceil((max - tokens) / rate)}
"#;

static FIXED_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FIXED));
static BUCKET_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BUCKET));

/// Shards of the prefetched-token pool.
const SHARDS: usize = 16;

enum Backend {
    Single(ConnectionManager),
    Cluster(Box<Cluster>),
}

struct Cluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

/// Tokens this sidecar took from Redis and has not spent, for one key.
struct Local {
    tokens: u32,
    /// Redis's `remaining` when they were taken.
    remaining: u32,
    /// They lapse with the window they came from.
    until: Instant,
}

/// What a Redis quota decided.
pub(crate) enum RedisAnswer {
    Granted,
    Exceeded {
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
    /// Redis failed and the quota fails closed.
    Unavailable(String),
}

pub(crate) struct RedisQuota {
    /// Computes keys and limits (its own counters are never used).
    keys: Quota,
    prefix: String,
    algorithm: Algorithm,
    window_ms: u64,
    backend: Backend,
    timeout: Duration,
    fail_open: bool,
    prefetch: u32,
    max_keys: usize,
    local: Box<[Mutex<HashMap<String, Local>>]>,
    last_warning: AtomicU64,
    calls: Arc<Counter>,
    errors: Arc<Counter>,
    timeouts: Arc<Counter>,
    failed_open: Arc<Counter>,
    failed_closed: Arc<Counter>,
    prefetched: Arc<Counter>,
}

impl RedisQuota {
    pub(crate) fn new(
        spec: QuotaSpec,
        cfg: &model::RedisBackend,
        stats: &Stats,
        scope: &Scope,
    ) -> Result<RedisQuota, String> {
        let name = spec.name.clone();
        let algorithm = spec.algorithm;
        let window_ms = u64::try_from(spec.window.as_millis()).unwrap_or(u64::MAX).max(1);
        let max_keys = spec.max_keys;
        let keys = Quota::new(spec, std::time::Instant::now()).map_err(|e| e.to_string())?;
        let urls: Vec<String> = cfg.addresses.iter().map(|a| format!("redis://{a}/")).collect();
        let backend = if cfg.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(urls)
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout)
                .retries(1)
                .build()
                .map_err(|e| format!("quota `{name}`: Redis cluster: {e}"))?;
            Backend::Cluster(Box::new(Cluster {
                client,
                conn: tokio::sync::Mutex::new(None),
            }))
        } else {
            let client = redis::Client::open(urls[0].as_str()).map_err(|e| format!("quota `{name}`: Redis: {e}"))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout))
                .set_response_timeout(Some(cfg.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| format!("quota `{name}`: Redis: {e}"))?;
            Backend::Single(manager)
        };
        Ok(RedisQuota {
            keys,
            prefix: format!("{}:{name}:", cfg.key_prefix),
            algorithm,
            window_ms,
            backend,
            timeout: cfg.timeout,
            fail_open: cfg.fail_open,
            prefetch: cfg.prefetch.max(1),
            max_keys,
            local: std::iter::repeat_with(Default::default).take(SHARDS).collect(),
            last_warning: AtomicU64::new(0),
            calls: stats.counter(scope, "redis_calls"),
            errors: stats.counter(scope, "redis_error"),
            timeouts: stats.counter(scope, "redis_timeout"),
            failed_open: stats.counter(scope, "failed_open"),
            failed_closed: stats.counter(scope, "failed_closed"),
            prefetched: stats.counter(scope, "prefetch_hit"),
        })
    }

    /// The request's Redis key and limit.
    pub(crate) fn key(&self, attrs: &dyn Attributes) -> (String, u32) {
        let (text, limit) = self.keys.key_text(attrs);
        (format!("{}{text}", self.prefix), limit)
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.local[(h as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Spends a prefetched token for `key`, if this sidecar holds one.
    pub(crate) fn take_local(&self, key: &str) -> bool {
        if self.prefetch <= 1 {
            return false;
        }
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some(l) if l.tokens > 0 && l.until > now => {
                l.tokens -= 1;
                self.prefetched.inc();
                true
            }
            _ => false,
        }
    }

    /// Asks Redis for tokens (one for this request, the rest kept when prefetching).
    pub(crate) async fn take(&self, key: String, limit: u32) -> RedisAnswer {
        let want = self.prefetch.min(limit.max(1));
        self.calls.inc();
        let script = match self.algorithm {
            Algorithm::FixedWindow => &*FIXED_SCRIPT,
            Algorithm::RollingWindow => &*BUCKET_SCRIPT,
        };
        let mut inv = script.prepare_invoke();
        inv.key(&key).arg(limit).arg(self.window_ms).arg(want);
        let call = async {
            match &self.backend {
                Backend::Single(m) => {
                    let mut c = m.clone();
                    invoke(&inv, &mut c).await
                }
                Backend::Cluster(cl) => {
                    let Cluster { client, conn } = &**cl;
                    let mut slot = conn.lock().await;
                    let mut c = match slot.as_ref() {
                        Some(c) => c.clone(),
                        None => {
                            let c = client.get_async_connection().await?;
                            *slot = Some(c.clone());
                            c
                        }
                    };
                    drop(slot);
                    let r = invoke(&inv, &mut c).await;
                    if r.as_ref().is_err_and(|e| e.is_io_error() || e.is_connection_dropped()) {
                        *conn.lock().await = None;
                    }
                    r
                }
            }
        };
        let reply = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) if e.is_timeout() => {
                self.timeouts.inc();
                return self.failed(format!("Redis did not answer within {:?}", self.timeout));
            }
            Ok(Err(e)) => {
                self.errors.inc();
                return self.failed(format!("Redis error: {e}"));
            }
            Err(_) => {
                self.timeouts.inc();
                return self.failed(format!("Redis did not answer within {:?}", self.timeout));
            }
        };
        let [granted, remaining, reset_ms] = reply;
        let granted = u32::try_from(granted.max(0)).unwrap_or(u32::MAX);
        let remaining = u32::try_from(remaining.max(0)).unwrap_or(u32::MAX);
        let reset = Duration::from_millis(u64::try_from(reset_ms.max(0)).unwrap_or(0));
        if granted == 0 {
            return RedisAnswer::Exceeded {
                limit,
                remaining,
                reset,
            };
        }
        if granted > 1 {
            let until = Instant::now()
                + match self.algorithm {
                    Algorithm::FixedWindow => reset,
                    Algorithm::RollingWindow => Duration::from_millis(self.window_ms),
                };
            let mut shard = self.shard(&key);
            let cap = self.max_keys / SHARDS + 1;
            if shard.len() >= cap {
                let now = Instant::now();
                shard.retain(|_, l| l.tokens > 0 && l.until > now);
            }
            // Past the bound the extra tokens are left unused (they lapse in Redis).
            if shard.len() < cap || shard.contains_key(&key) {
                let l = shard.entry(key).or_insert(Local {
                    tokens: 0,
                    remaining,
                    until,
                });
                l.tokens += granted - 1;
                l.remaining = remaining;
                l.until = until;
            }
        }
        RedisAnswer::Granted
    }

    fn failed(&self, why: String) -> RedisAnswer {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_warning.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(quota = self.keys.name(), fail_open = self.fail_open, "{why}");
        }
        if self.fail_open {
            self.failed_open.inc();
            RedisAnswer::Granted
        } else {
            self.failed_closed.inc();
            RedisAnswer::Unavailable(why)
        }
    }

    /// The quota's name.
    pub(crate) fn name(&self) -> &str {
        self.keys.name()
    }
}

async fn invoke<C: ConnectionLike + Send>(
    inv: &redis::ScriptInvocation<'_>,
    c: &mut C,
) -> redis::RedisResult<[i64; 3]> {
    let v: Vec<i64> = inv.invoke_async(c).await?;
    match v.as_slice() {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err((
            redis::ErrorKind::Client,
            "the quota script answered an unexpected shape",
        )
            .into()),
    }
}

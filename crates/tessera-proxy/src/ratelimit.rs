//! Local rate limits: token buckets refilled lazily from the clock, lock-free for the shared
//! bucket. Per-descriptor buckets (one per header value or client IP) live in a map behind a
//! read-mostly lock: a known key costs one shared read lock; a new key takes the write lock once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderMap;
use tessera_model::{LocalRateLimit, RateLimitKey};

use crate::cluster::now_ms;

/// Most distinct descriptor values kept; past it, buckets that are full again are dropped.
const MAX_KEYS: usize = 100_000;

/// One token bucket. State is `tokens << 32 | fills` packed in one atomic: `fills` counts whole
/// fill intervals since `origin`, so refilling is a pure function of the clock.
pub(crate) struct Bucket {
    state: AtomicU64,
    origin_ms: u64,
}

impl Bucket {
    fn new(max: u32, now: u64) -> Bucket {
        Bucket {
            state: AtomicU64::new(u64::from(max) << 32),
            origin_ms: now,
        }
    }

    /// Takes a token if there is one; returns the tokens left after the attempt, or `None`.
    fn take(&self, cfg: &LocalRateLimit, now: u64) -> Option<u32> {
        let interval = cfg.fill_interval.as_millis().max(1) as u64;
        let fills_now = (now.saturating_sub(self.origin_ms) / interval) & 0xffff_ffff;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let tokens = cur >> 32;
            let fills = cur & 0xffff_ffff;
            let gained = fills_now.wrapping_sub(fills) & 0xffff_ffff;
            let refilled =
                (tokens + gained.saturating_mul(u64::from(cfg.tokens_per_fill))).min(u64::from(cfg.max_tokens));
            if refilled == 0 {
                // Record the fills we saw even when empty, so they are not counted twice.
                let next = fills_now;
                if next != fills {
                    let _ = self
                        .state
                        .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed);
                }
                return None;
            }
            let next = ((refilled - 1) << 32) | fills_now;
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some((refilled - 1) as u32),
                Err(actual) => cur = actual,
            }
        }
    }

    fn full(&self, cfg: &LocalRateLimit, now: u64) -> bool {
        let interval = cfg.fill_interval.as_millis().max(1) as u64;
        let fills_now = (now.saturating_sub(self.origin_ms) / interval) & 0xffff_ffff;
        let cur = self.state.load(Ordering::Relaxed);
        let gained = fills_now.wrapping_sub(cur & 0xffff_ffff) & 0xffff_ffff;
        (cur >> 32) + gained.saturating_mul(u64::from(cfg.tokens_per_fill)) >= u64::from(cfg.max_tokens)
    }
}

/// The answer for one request.
pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    pub(crate) limit: u32,
    pub(crate) remaining: u32,
    /// Seconds until the next fill.
    pub(crate) reset_secs: u64,
}

/// A configured local rate limit at run time.
pub(crate) struct RateLimiter {
    pub(crate) cfg: LocalRateLimit,
    /// `response_headers_to_add`, ready to set on a 429.
    pub(crate) extra_headers: Vec<(http::HeaderName, http::HeaderValue, tessera_model::AppendAction)>,
    shared: Bucket,
    keyed: RwLock<HashMap<String, Arc<Bucket>>>,
}

impl RateLimiter {
    pub(crate) fn new(cfg: LocalRateLimit) -> RateLimiter {
        let now = now_ms();
        RateLimiter {
            extra_headers: Self::headers(&cfg).unwrap_or_default(),
            shared: Bucket::new(cfg.max_tokens, now),
            keyed: RwLock::new(HashMap::new()),
            cfg,
        }
    }

    /// `response_headers_to_add` as header names and values; the first invalid one is an error
    /// (checked when a configuration is built, so a bad name is refused, not skipped).
    pub(crate) fn headers(
        cfg: &LocalRateLimit,
    ) -> Result<Vec<(http::HeaderName, http::HeaderValue, tessera_model::AppendAction)>, String> {
        cfg.response_headers_to_add
            .iter()
            .map(|o| {
                let n = http::HeaderName::from_bytes(o.key.as_bytes())
                    .map_err(|_| format!("local rate limit: invalid header name `{}`", o.key))?;
                let v = http::HeaderValue::from_str(&o.value)
                    .map_err(|_| format!("local rate limit: invalid value for header `{}`", o.key))?;
                Ok((n, v, o.append_action))
            })
            .collect()
    }

    /// Decides for a request with these headers from `client`.
    pub(crate) fn check(&self, headers: &HeaderMap, client: IpAddr) -> Verdict {
        self.check_with(client, |h| headers.get(h).and_then(|v| v.to_str().ok()))
    }

    /// Decides for a request from `client` whose header values `header` looks up (by the
    /// lower-case name the descriptor holds): RPC requests carry a Bolt header map or Dubbo
    /// attachments rather than HTTP headers.
    pub(crate) fn check_with<'a>(&self, client: IpAddr, header: impl FnOnce(&str) -> Option<&'a str>) -> Verdict {
        let now = now_ms();
        let key: Option<std::borrow::Cow<'_, str>> = match &self.cfg.descriptor {
            None => None,
            Some(RateLimitKey::SourceIp) => Some(client.to_string().into()),
            Some(RateLimitKey::Header(h)) => header(h.as_str()).map(Into::into),
        };
        let left = match key {
            None => self.shared.take(&self.cfg, now),
            Some(k) => self.bucket(&k, now).take(&self.cfg, now),
        };
        let interval = self.cfg.fill_interval.as_millis().max(1) as u64;
        Verdict {
            allowed: left.is_some(),
            limit: self.cfg.max_tokens,
            remaining: left.unwrap_or(0),
            reset_secs: Duration::from_millis(interval - now.saturating_sub(self.shared.origin_ms) % interval)
                .as_secs()
                .max(1),
        }
    }

    fn bucket(&self, key: &str, now: u64) -> Arc<Bucket> {
        if let Some(b) = self.keyed.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            return b.clone();
        }
        let mut map = self.keyed.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS {
            // Keys whose bucket refilled completely carry no state worth keeping.
            map.retain(|_, b| !b.full(&self.cfg, now));
        }
        map.entry(key.to_string())
            .or_insert_with(|| Arc::new(Bucket::new(self.cfg.max_tokens, now)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: u32, per_fill: u32, every_ms: u64, descriptor: Option<RateLimitKey>) -> LocalRateLimit {
        LocalRateLimit {
            response_headers_to_add: Vec::new(),
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(every_ms),
            descriptor,
            response_headers: true,
        }
    }

    #[test]
    fn bucket_spends_and_refills_by_the_clock() {
        let c = cfg(3, 2, 100, None);
        let b = Bucket::new(3, 1000);
        assert_eq!(b.take(&c, 1000), Some(2));
        assert_eq!(b.take(&c, 1010), Some(1));
        assert_eq!(b.take(&c, 1020), Some(0));
        assert_eq!(b.take(&c, 1099), None, "empty until the next fill");
        assert_eq!(b.take(&c, 1100), Some(1), "one fill adds 2 tokens");
        assert_eq!(b.take(&c, 1100), Some(0));
        assert_eq!(b.take(&c, 1100), None);
        assert_eq!(b.take(&c, 2000), Some(2), "refill is capped at max_tokens");
    }

    #[test]
    fn concurrent_takes_never_exceed_the_bucket() {
        let c = Arc::new(cfg(1000, 1, 3_600_000, None));
        let b = Arc::new(Bucket::new(1000, 0));
        let taken: u32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let (b, c) = (b.clone(), c.clone());
                    s.spawn(move || (0..600).filter(|_| b.take(&c, 10).is_some()).count() as u32)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 1000, "exactly the bucket, under contention");
    }

    #[test]
    fn descriptors_split_buckets() {
        let rl = RateLimiter::new(cfg(1, 1, 3_600_000, Some(RateLimitKey::Header("x-user".into()))));
        let mut alice = HeaderMap::new();
        alice.insert("x-user", "alice".parse().unwrap());
        let mut bob = HeaderMap::new();
        bob.insert("x-user", "bob".parse().unwrap());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(rl.check(&alice, ip).allowed);
        assert!(!rl.check(&alice, ip).allowed);
        assert!(rl.check(&bob, ip).allowed, "bob has his own bucket");
        assert!(rl.check(&HeaderMap::new(), ip).allowed, "no header: the shared bucket");
        let by_ip = RateLimiter::new(cfg(1, 1, 3_600_000, Some(RateLimitKey::SourceIp)));
        assert!(by_ip.check(&alice, ip).allowed);
        assert!(!by_ip.check(&bob, ip).allowed, "same IP, same bucket");
        assert!(by_ip.check(&bob, "10.0.0.2".parse().unwrap()).allowed);
    }
}

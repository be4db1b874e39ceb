//! Mixer's memquota: request quotas counted in memory, per key, where a key is the values of the
//! quota's dimension attributes.
//!
//! Two algorithms:
//! - **fixed window**: at most `max` per window; windows are back to back from the `start`
//!   instant given to [`Quota::new`], so every key's window ends at the same instants.
//! - **rolling window**: a token bucket of `max` tokens refilled evenly over `window` (a rate of
//!   `max / window`), computed exactly in integer nanoseconds (GCRA form: one "theoretical
//!   arrival time" per key, no floating point).
//!
//! Concurrency: keys live in [`SHARDS`] shards, each a `Mutex<HashMap>`; a key's shard is chosen
//! by its hash, and a call locks one shard only while it updates that key (no global lock, no
//! lock held across calls, never two shard locks at once). Because a key's counter only changes
//! under its shard's lock, grants are exact: no window ever grants more than its limit, whatever
//! the number of threads.
//!
//! Memory: at most `max_keys` keys, counted by one atomic across shards. When a new key finds the
//! quota full, keys that hold no information are evicted — a fixed-window key whose window has
//! ended, a bucket that has refilled to `max` — first in the key's own shard, then in the
//! others, one shard at a time. Eviction is lossless: a fresh key would answer the same. If
//! nothing can be evicted, the request is refused with [`Denial::TooManyKeys`] rather than grow
//! the map; the refusal's `reset` says when the first key can be evicted. A shard remembers the
//! earliest instant any of its keys can be evicted, so a full quota does not rescan its keys on
//! every new key (it still takes each shard's lock once per refused new key). Memory is `max_keys` times (the key's dimension values plus about 100 bytes);
//! value lengths are bounded by the proxy's header-size limits.
//!
//! Time is the caller's: every call takes `now`; nothing here reads a clock.

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::{fmt, iter};

use crate::attr::{Attr, Attributes};

/// How many shards a quota's keys are spread over (a power of two).
pub const SHARDS: usize = 16;

/// How a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// At most `max` per window, windows back to back from the quota's start.
    FixedWindow,
    /// A token bucket: `max` tokens, refilled evenly over `window`.
    RollingWindow,
}

/// A quota as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSpec {
    /// The quota's name, for stats and logs.
    pub name: String,
    /// Units allowed per window and key (the bucket size for a rolling window).
    pub max: u32,
    /// The window (the time a rolling window takes to refill completely).
    pub window: Duration,
    /// How units are counted.
    pub algorithm: Algorithm,
    /// The attributes whose values make the key; a missing attribute counts as the empty value.
    /// No dimensions: one key for every request.
    pub dimensions: Vec<Attr>,
    /// Other limits for some dimension values; the first that matches applies.
    pub overrides: Vec<Override>,
    /// Keys kept at most.
    pub max_keys: usize,
}

/// A different limit for requests whose dimensions have given values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// Dimension and value pairs; every one must match. Each attribute must be one of the
    /// quota's dimensions.
    pub dimensions: Vec<(Attr, String)>,
    /// The limit for those requests.
    pub max: u32,
}

/// Why a quota spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The window is zero.
    #[error("quota `{0}`: the window must be longer than zero")]
    ZeroWindow(String),
    /// No key may be kept.
    #[error("quota `{0}`: max_keys must be at least 1")]
    ZeroMaxKeys(String),
    /// A dimension is listed twice.
    #[error("quota `{name}`: dimension `{attr}` is listed twice")]
    DuplicateDimension {
        /// The quota.
        name: String,
        /// The repeated attribute.
        attr: String,
    },
    /// An override names an attribute that is not a dimension of the quota.
    #[error("quota `{name}`: override on `{attr}`, which is not one of the quota's dimensions; add it to `dimensions`")]
    OverrideNotADimension {
        /// The quota.
        name: String,
        /// The attribute.
        attr: String,
    },
    /// An override repeats an attribute or names none.
    #[error("quota `{name}`: override {index} must name each dimension at most once, and at least one")]
    BadOverride {
        /// The quota.
        name: String,
        /// The override's position, from 0.
        index: usize,
    },
}

/// The answer to [`Quota::alloc`], with what the rate-limit headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// True when the units were granted; then `denial` is `None`.
    pub granted: bool,
    /// The key's limit (`max`, or an override's).
    pub limit: u32,
    /// Units left now, after this allocation.
    pub remaining: u32,
    /// How long until `remaining` is back to `limit`: the end of the window, or the time the
    /// bucket takes to refill completely. A client that waits this long will be granted.
    pub reset: Duration,
    /// Why the units were refused.
    pub denial: Option<Denial>,
}

/// Why units were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// The key has used its limit.
    OverQuota,
    /// The key is new and the quota tracks `max_keys` keys, none of them evictable yet.
    TooManyKeys,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denial::OverQuota => "quota exceeded",
            Denial::TooManyKeys => "quota is tracking its maximum number of keys",
        })
    }
}

/// A memory quota; share it between threads (`&Quota` is all [`Quota::alloc`] needs).
#[derive(Debug)]
pub struct Quota {
    name: String,
    max: u32,
    window_ns: u128,
    algorithm: Algorithm,
    dimensions: Box<[Attr]>,
    overrides: Box<[CompiledOverride]>,
    max_keys: usize,
    start: Instant,
    hasher: RandomState,
    keys: AtomicUsize,
    shards: Box<[Mutex<Shard>]>,
}

/// An override's (dimension index, value) pairs, and its limit.
#[derive(Debug)]
struct CompiledOverride {
    pairs: Box<[(usize, Box<str>)]>,
    max: u32,
}

#[derive(Debug)]
struct Shard {
    map: HashMap<StoredKey, Counter, BuildHasherDefault<Prehashed>>,
    /// No key of this shard can be evicted before this tick (a lower bound; `u128::MAX`: none).
    evictable_from: u128,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            map: HashMap::default(),
            evictable_from: u128::MAX,
        }
    }
}

/// The state of one key. Times are nanoseconds since the quota's start ("ticks").
#[derive(Debug, Clone, Copy)]
struct Counter {
    limit: u32,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Units used in window number `window`.
    Fixed { window: u64, used: u32 },
    /// The bucket's theoretical arrival time, in ticks times `limit`: the bucket is full at or
    /// after it, and each unit taken pushes it `window` further.
    Bucket { tat: u128 },
}

impl Quota {
    /// Builds a quota whose fixed windows start at `start`.
    pub fn new(spec: QuotaSpec, start: Instant) -> Result<Self, QuotaError> {
        let QuotaSpec {
            name,
            max,
            window,
            algorithm,
            dimensions,
            overrides,
            max_keys,
        } = spec;
        if window.is_zero() {
            return Err(QuotaError::ZeroWindow(name));
        }
        if max_keys == 0 {
            return Err(QuotaError::ZeroMaxKeys(name));
        }
        for (i, d) in dimensions.iter().enumerate() {
            if dimensions[..i].contains(d) {
                return Err(QuotaError::DuplicateDimension {
                    name,
                    attr: d.to_string(),
                });
            }
        }
        let mut compiled = Vec::with_capacity(overrides.len());
        for (index, o) in overrides.into_iter().enumerate() {
            let mut pairs: Vec<(usize, Box<str>)> = Vec::with_capacity(o.dimensions.len());
            for (attr, value) in o.dimensions {
                let Some(at) = dimensions.iter().position(|d| *d == attr) else {
                    return Err(QuotaError::OverrideNotADimension {
                        name,
                        attr: attr.to_string(),
                    });
                };
                if pairs.iter().any(|(i, _)| *i == at) {
                    return Err(QuotaError::BadOverride { name, index });
                }
                pairs.push((at, value.into()));
            }
            if pairs.is_empty() {
                return Err(QuotaError::BadOverride { name, index });
            }
            compiled.push(CompiledOverride {
                pairs: pairs.into(),
                max: o.max,
            });
        }
        Ok(Quota {
            name,
            max,
            window_ns: window.as_nanos(),
            algorithm,
            dimensions: dimensions.into(),
            overrides: compiled.into(),
            max_keys,
            start,
            hasher: RandomState::new(),
            keys: AtomicUsize::new(0),
            shards: iter::repeat_with(Default::default).take(SHARDS).collect(),
        })
    }

    /// The quota's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `amount` units for the request's key at `now`. All or nothing: a refused request
    /// takes nothing. `amount == 0` only reports the key's state; an amount over the key's limit
    /// is refused without tracking the key.
    pub fn alloc(&self, attrs: &dyn Attributes, amount: u32, now: Instant) -> Grant {
        let values: Vec<Cow<'_, str>> = self
            .dimensions
            .iter()
            .map(|d| attrs.get(d).unwrap_or(Cow::Borrowed("")))
            .collect();
        let limit = self.limit_for(&values);
        let now = now.saturating_duration_since(self.start).as_nanos();
        let key = LookupKey {
            hash: self.hash(&values),
            parts: &values,
        };
        let shard_index = (key.hash >> 32) as usize & (SHARDS - 1);
        let view: &dyn KeyView = &key;

        let mut shard = self.lock(shard_index);
        if let Some(counter) = shard.map.get_mut(view) {
            return counter.take(amount, now, self.window_ns);
        }
        if amount == 0 || amount > limit {
            // Nothing to count: answer as a fresh key would, without storing one.
            return Counter::new(limit, self.algorithm).take(amount, now, self.window_ns);
        }
        if !self.reserve_key(&mut shard, now) {
            // Never hold two shard locks: let go of ours while the others are swept.
            drop(shard);
            let evictable_from = self.sweep_others(shard_index, now);
            shard = self.lock(shard_index);
            if let Some(counter) = shard.map.get_mut(view) {
                return counter.take(amount, now, self.window_ns);
            }
            if !self.reserve_key(&mut shard, now) {
                // No evictable time known (keys being inserted as we looked): say one window.
                let earliest = evictable_from.min(shard.evictable_from);
                let wait = if earliest == u128::MAX {
                    self.window_ns
                } else {
                    earliest.saturating_sub(now)
                };
                return Grant {
                    granted: false,
                    limit,
                    remaining: 0,
                    reset: duration(wait),
                    denial: Some(Denial::TooManyKeys),
                };
            }
        }
        let mut counter = Counter::new(limit, self.algorithm);
        let grant = counter.take(amount, now, self.window_ns);
        shard.evictable_from = shard.evictable_from.min(counter.evictable_at(self.window_ns));
        let parts = values.iter().map(|v| Box::<str>::from(v.as_ref())).collect();
        shard.map.insert(StoredKey { hash: key.hash, parts }, counter);
        grant
    }

    /// The request's key as text (the dimension values joined by `|`, `|` and `\\` escaped with
    /// `\\`) and its limit: what a shared store (Redis) counts under.
    pub fn key_text(&self, attrs: &dyn Attributes) -> (String, u32) {
        let values: Vec<Cow<'_, str>> = self
            .dimensions
            .iter()
            .map(|d| attrs.get(d).unwrap_or(Cow::Borrowed("")))
            .collect();
        let mut key = String::with_capacity(values.iter().map(|v| v.len() + 1).sum());
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                key.push('|');
            }
            for c in v.chars() {
                if c == '|' || c == '\\' {
                    key.push('\\');
                }
                key.push(c);
            }
        }
        (key, self.limit_for(&values))
    }

    fn limit_for(&self, values: &[Cow<'_, str>]) -> u32 {
        self.overrides
            .iter()
            .find(|o| o.pairs.iter().all(|(at, want)| values[*at] == **want))
            .map_or(self.max, |o| o.max)
    }

    fn hash(&self, values: &[Cow<'_, str>]) -> u64 {
        let mut h = self.hasher.build_hasher();
        hash_parts(values.iter().map(|v| v.as_ref()), &mut h);
        h.finish()
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic under the lock leaves counters that are still valid numbers; keep serving.
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more key if there is room, evicting idle keys of `shard` if there is not.
    fn reserve_key(&self, shard: &mut Shard, now: u128) -> bool {
        let take = |keys: &AtomicUsize| {
            keys.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok()
        };
        take(&self.keys) || (self.evict(shard, now) > 0 && take(&self.keys))
    }

    /// Sweeps every shard but `skip`, one at a time; returns the earliest tick at which one of
    /// their keys can be evicted.
    fn sweep_others(&self, skip: usize, now: u128) -> u128 {
        let mut earliest = u128::MAX;
        for index in (0..SHARDS).filter(|&i| i != skip) {
            let mut shard = self.lock(index);
            self.evict(&mut shard, now);
            earliest = earliest.min(shard.evictable_from);
        }
        earliest
    }

    /// Removes the keys of `shard` that can be evicted at `now`; returns how many.
    fn evict(&self, shard: &mut Shard, now: u128) -> usize {
        if shard.evictable_from > now {
            return 0;
        }
        let before = shard.map.len();
        let mut earliest = u128::MAX;
        shard.map.retain(|_, counter| {
            let at = counter.evictable_at(self.window_ns);
            let keep = at > now;
            if keep {
                earliest = earliest.min(at);
            }
            keep
        });
        let evicted = before - shard.map.len();
        shard.evictable_from = earliest;
        self.keys.fetch_sub(evicted, Ordering::AcqRel);
        evicted
    }
}

impl Counter {
    fn new(limit: u32, algorithm: Algorithm) -> Self {
        let state = match algorithm {
            Algorithm::FixedWindow => State::Fixed { window: 0, used: 0 },
            Algorithm::RollingWindow => State::Bucket { tat: 0 },
        };
        Counter { limit, state }
    }

    /// Takes `amount` if it fits (nothing otherwise) and reports the state after.
    fn take(&mut self, amount: u32, now: u128, window_ns: u128) -> Grant {
        let limit = self.limit;
        let (granted, remaining, reset) = match &mut self.state {
            State::Fixed { window, used } => {
                // A `now` older than the key's window (threads' clocks read moments apart)
                // counts in the key's window, never in an earlier one.
                let current = u64::try_from(now / window_ns).unwrap_or(u64::MAX);
                if current > *window {
                    *window = current;
                    *used = 0;
                }
                let granted = u64::from(*used) + u64::from(amount) <= u64::from(limit);
                if granted {
                    *used += amount;
                }
                let end = (u128::from(*window) + 1) * window_ns;
                (granted, limit - *used, end.saturating_sub(now))
            }
            State::Bucket { tat } => {
                let l = u128::from(limit);
                let now_s = now * l;
                let capacity = window_ns * l;
                let next = (*tat).max(now_s) + u128::from(amount) * window_ns;
                let granted = next - now_s <= capacity;
                if granted {
                    *tat = next;
                }
                let debt = (*tat).max(now_s) - now_s;
                let remaining = (capacity - debt.min(capacity)) / window_ns;
                let reset = if l == 0 { 0 } else { debt.div_ceil(l) };
                (granted, u32::try_from(remaining).unwrap_or(limit), reset)
            }
        };
        Grant {
            granted,
            limit,
            remaining,
            reset: duration(reset),
            denial: (!granted).then_some(Denial::OverQuota),
        }
    }

    /// The tick from which this key holds nothing a fresh key would not.
    fn evictable_at(&self, window_ns: u128) -> u128 {
        match self.state {
            State::Fixed { window, .. } => (u128::from(window) + 1) * window_ns,
            State::Bucket { tat } if self.limit == 0 => tat,
            State::Bucket { tat } => tat.div_ceil(u128::from(self.limit)),
        }
    }
}

fn duration(ns: u128) -> Duration {
    const NANOS: u128 = 1_000_000_000;
    let secs = u64::try_from(ns / NANOS).unwrap_or(u64::MAX);
    Duration::new(secs, (ns % NANOS) as u32)
}

fn hash_parts<'a>(parts: impl ExactSizeIterator<Item = &'a str>, h: &mut impl Hasher) {
    h.write_usize(parts.len());
    for p in parts {
        p.hash(h);
    }
}

// Keys are looked up by borrowed values, so a request for a known key allocates nothing but the
// vector of values: the map's key type borrows as `dyn KeyView`, which both the stored and the
// looked-up key implement. The hash is computed once (it also picks the shard) and carried along.

trait KeyView {
    fn hash64(&self) -> u64;
    fn len(&self) -> usize;
    fn part(&self, i: usize) -> &str;
}

struct LookupKey<'a, 'b> {
    hash: u64,
    parts: &'a [Cow<'b, str>],
}

#[derive(Debug)]
struct StoredKey {
    hash: u64,
    parts: Box<[Box<str>]>,
}

impl KeyView for LookupKey<'_, '_> {
    fn hash64(&self) -> u64 {
        self.hash
    }
    fn len(&self) -> usize {
        self.parts.len()
    }
    fn part(&self, i: usize) -> &str {
        &self.parts[i]
    }
}

impl KeyView for StoredKey {
    fn hash64(&self) -> u64 {
        self.hash
    }
    fn len(&self) -> usize {
        self.parts.len()
    }
    fn part(&self, i: usize) -> &str {
        &self.parts[i]
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash64());
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.hash64() == other.hash64()
            && self.len() == other.len()
            && (0..self.len()).all(|i| self.part(i) == other.part(i))
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for StoredKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn KeyView).hash(h);
    }
}

impl PartialEq for StoredKey {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn KeyView) == (other as &dyn KeyView)
    }
}

impl Eq for StoredKey {}

impl<'a> Borrow<dyn KeyView + 'a> for StoredKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

/// The map's hasher: keys arrive hashed (with the quota's random seed), so pass the hash through.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else rather than lose it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::MapAttributes;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);
    const NS: Duration = Duration::from_nanos(1);

    fn user() -> Attr {
        Attr::RequestHeader("x-user".into())
    }

    fn spec(algorithm: Algorithm, max: u32, window: Duration) -> QuotaSpec {
        QuotaSpec {
            name: "per-user".into(),
            max,
            window,
            algorithm,
            dimensions: vec![user()],
            overrides: vec![],
            max_keys: 1000,
        }
    }

    fn as_user(name: &str) -> MapAttributes {
        MapAttributes::new().with(user(), name)
    }

    /// (offset from start, amount, granted, remaining, reset)
    type Step = (Duration, u32, bool, u32, Duration);

    fn run(quota: &Quota, t0: Instant, who: &MapAttributes, steps: &[Step]) {
        for (i, &(at, amount, granted, remaining, reset)) in steps.iter().enumerate() {
            let g = quota.alloc(who, amount, t0 + at);
            assert_eq!(
                (g.granted, g.remaining, g.reset),
                (granted, remaining, reset),
                "step {i}: {amount} at {at:?} -> {g:?}"
            );
            assert_eq!(g.denial.is_none(), g.granted, "step {i}");
        }
    }

    #[test]
    fn fixed_window_boundaries() {
        let t0 = Instant::now();
        let q = Quota::new(spec(Algorithm::FixedWindow, 5, 60 * S), t0).unwrap();
        let ann = as_user("ann");
        run(
            &q,
            t0,
            &ann,
            &[
                (Duration::ZERO, 1, true, 4, 60 * S),
                (10 * S, 3, true, 1, 50 * S),
                (20 * S, 2, false, 1, 40 * S), // all or nothing
                (20 * S, 1, true, 0, 40 * S),
                (30 * S, 1, false, 0, 30 * S),
                (60 * S - NS, 1, false, 0, NS),
                (60 * S, 1, true, 4, 60 * S), // the next window starts exactly at start + window
                (60 * S, 6, false, 4, 60 * S), // more than the limit: refused, nothing taken
                (60 * S, 0, true, 4, 60 * S), // zero only looks
                (119 * S, 4, true, 0, S),
                (250 * S, 5, true, 0, 50 * S), // skipped windows do not matter
            ],
        );
        let g = q.alloc(&ann, 1, t0 + 250 * S);
        assert_eq!((g.limit, g.denial), (5, Some(Denial::OverQuota)));
    }

    #[test]
    fn fixed_window_clock_skew_never_reopens_a_window() {
        let t0 = Instant::now();
        let q = Quota::new(spec(Algorithm::FixedWindow, 2, 10 * S), t0).unwrap();
        let ann = as_user("ann");
        // A thread that read the clock just before the window turned arrives after one that
        // read it just after: it counts in the newer window.
        run(
            &q,
            t0,
            &ann,
            &[(10 * S, 1, true, 1, 10 * S), (10 * S - MS, 1, true, 0, 10 * S + MS)],
        );
        run(&q, t0, &ann, &[(10 * S - MS, 1, false, 0, 10 * S + MS)]);
        // Instants before the start count in the first window.
        let early = Quota::new(spec(Algorithm::FixedWindow, 1, 10 * S), t0 + 5 * S).unwrap();
        run(&early, t0 + 5 * S, &ann, &[(Duration::ZERO, 1, true, 0, 10 * S)]);
        assert!(!early.alloc(&ann, 1, t0).granted);
    }

    #[test]
    fn token_bucket_refill_math() {
        let t0 = Instant::now();
        // 10 tokens, refilled over 10 s: one per second.
        let q = Quota::new(spec(Algorithm::RollingWindow, 10, 10 * S), t0).unwrap();
        let ann = as_user("ann");
        run(
            &q,
            t0,
            &ann,
            &[
                (Duration::ZERO, 1, true, 9, S),
                (Duration::ZERO, 9, true, 0, 10 * S),
                (Duration::ZERO, 1, false, 0, 10 * S),
                (500 * MS, 1, false, 0, 9500 * MS),
                (S, 1, true, 0, 10 * S),
                (3500 * MS, 2, true, 0, 9500 * MS), // 2.5 tokens were there
                (3500 * MS, 0, true, 0, 9500 * MS),
                (100 * S, 0, true, 10, Duration::ZERO), // full again, and no more than full
                (100 * S, 10, true, 0, 10 * S),
                (100 * S, 11, false, 0, 10 * S),
            ],
        );
    }

    #[test]
    fn token_bucket_is_exact_when_the_rate_does_not_divide() {
        let t0 = Instant::now();
        // 3 tokens a second: one every 333,333,333.3 ns.
        let q = Quota::new(spec(Algorithm::RollingWindow, 3, S), t0).unwrap();
        let ann = as_user("ann");
        run(
            &q,
            t0,
            &ann,
            &[
                (Duration::ZERO, 3, true, 0, S),
                (333_333_333 * NS, 1, false, 0, 666_666_667 * NS),
                (333_333_334 * NS, 1, true, 0, S), // full in 999,999,999.3 ns: rounded up
                (S + 333_333_334 * NS, 3, true, 0, S),
            ],
        );
    }

    #[test]
    fn overrides_pick_the_first_matching_limit() {
        let t0 = Instant::now();
        let ns = Attr::SourceNamespace;
        let mut s = spec(Algorithm::FixedWindow, 5, 60 * S);
        s.dimensions.push(ns.clone());
        s.overrides = vec![
            Override {
                dimensions: vec![(user(), "vip".into())],
                max: 100,
            },
            Override {
                dimensions: vec![(user(), "ann".into()), (ns.clone(), "prod".into())],
                max: 2,
            },
            Override {
                dimensions: vec![(user(), String::new())],
                max: 1,
            },
            Override {
                dimensions: vec![(user(), "vip".into())],
                max: 7,
            }, // shadowed by the first
        ];
        let q = Quota::new(s, t0).unwrap();
        let table: &[(&[(&str, &str)], u32)] = &[
            (&[("request.headers[x-user]", "vip")], 100),
            (&[("request.headers[x-user]", "vip"), ("source.namespace", "prod")], 100),
            (&[("request.headers[x-user]", "ann"), ("source.namespace", "prod")], 2),
            (&[("request.headers[x-user]", "ann"), ("source.namespace", "dev")], 5),
            (&[("request.headers[x-user]", "ann")], 5),
            (&[("source.namespace", "prod")], 1), // a missing attribute is the empty value
            (&[("request.headers[x-user]", "")], 1),
            (&[("request.headers[x-user]", "bob")], 5),
        ];
        for &(pairs, limit) in table {
            let attrs = MapAttributes::parse(pairs.iter().copied()).unwrap();
            let g = q.alloc(&attrs, 1, t0);
            assert_eq!((g.granted, g.limit, g.remaining), (true, limit, limit - 1), "{pairs:?}");
        }
        // "no header" and "empty header" are one key: the earlier request used its one unit.
        assert!(
            !q.alloc(&MapAttributes::parse([("source.namespace", "prod")]).unwrap(), 1, t0)
                .granted
        );
    }

    #[test]
    fn key_text_escapes_and_applies_overrides() {
        let q = Quota::new(
            QuotaSpec {
                name: "q".into(),
                max: 5,
                window: Duration::from_secs(1),
                algorithm: Algorithm::FixedWindow,
                dimensions: vec![Attr::RequestHeader("x-user".into()), Attr::SourceIp],
                overrides: vec![Override {
                    dimensions: vec![(Attr::RequestHeader("x-user".into()), "vip".into())],
                    max: 9,
                }],
                max_keys: 10,
            },
            Instant::now(),
        )
        .unwrap();
        let a = MapAttributes::new()
            .with(Attr::RequestHeader("x-user".into()), "a|b\\")
            .with(Attr::SourceIp, "10.0.0.1");
        assert_eq!(q.key_text(&a), ("a\\|b\\\\|10.0.0.1".to_string(), 5));
        let vip = MapAttributes::new().with(Attr::RequestHeader("x-user".into()), "vip");
        assert_eq!(q.key_text(&vip), ("vip|".to_string(), 9));
    }

    #[test]
    fn keys_are_the_dimension_values() {
        let t0 = Instant::now();
        let mut s = spec(Algorithm::FixedWindow, 1, S);
        s.dimensions = vec![Attr::SourceIp, Attr::RequestPath];
        let q = Quota::new(s, t0).unwrap();
        let req = |ip: &str, path: &str| {
            MapAttributes::new()
                .with(Attr::SourceIp, ip)
                .with(Attr::RequestPath, path)
        };
        assert!(q.alloc(&req("10.0.0.1", "/a"), 1, t0).granted);
        assert!(!q.alloc(&req("10.0.0.1", "/a"), 1, t0).granted);
        assert!(q.alloc(&req("10.0.0.1", "/b"), 1, t0).granted);
        assert!(q.alloc(&req("10.0.0.2", "/a"), 1, t0).granted);
        // Values are not glued together: ("a", "bc") and ("ab", "c") are different keys.
        assert!(q.alloc(&req("a", "bc"), 1, t0).granted);
        assert!(q.alloc(&req("ab", "c"), 1, t0).granted);
        assert_eq!(q.len(), 5);

        let mut one = spec(Algorithm::FixedWindow, 2, S);
        one.dimensions.clear();
        let one = Quota::new(one, t0).unwrap();
        assert!(one.alloc(&as_user("ann"), 1, t0).granted);
        assert!(one.alloc(&as_user("bob"), 1, t0).granted);
        assert!(!one.alloc(&MapAttributes::new(), 1, t0).granted);
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn looking_and_impossible_requests_store_no_key() {
        let t0 = Instant::now();
        let q = Quota::new(spec(Algorithm::RollingWindow, 5, S), t0).unwrap();
        let g = q.alloc(&as_user("ann"), 0, t0);
        assert_eq!((g.granted, g.remaining, g.reset), (true, 5, Duration::ZERO));
        let g = q.alloc(&as_user("bob"), 6, t0);
        assert_eq!((g.granted, g.remaining, g.denial), (false, 5, Some(Denial::OverQuota)));
        assert!(q.is_empty());
        let mut zero = spec(Algorithm::FixedWindow, 0, S);
        zero.max_keys = 1;
        let zero = Quota::new(zero, t0).unwrap();
        for who in ["ann", "bob"] {
            let g = zero.alloc(&as_user(who), 1, t0);
            assert_eq!((g.granted, g.limit, g.denial), (false, 0, Some(Denial::OverQuota)));
        }
        assert!(zero.is_empty());
    }

    #[test]
    fn fixed_window_keys_are_evicted_when_their_window_ends() {
        let t0 = Instant::now();
        let mut s = spec(Algorithm::FixedWindow, 3, 10 * S);
        s.max_keys = 2;
        let q = Quota::new(s, t0).unwrap();
        assert!(q.alloc(&as_user("ann"), 1, t0).granted);
        assert!(q.alloc(&as_user("bob"), 1, t0 + S).granted);
        let g = q.alloc(&as_user("carol"), 1, t0 + 2 * S);
        assert_eq!(
            g,
            Grant {
                granted: false,
                limit: 3,
                remaining: 0,
                reset: 8 * S,
                denial: Some(Denial::TooManyKeys)
            }
        );
        // Known keys are still served while the quota is full.
        assert!(q.alloc(&as_user("ann"), 1, t0 + 2 * S).granted);
        assert_eq!(q.len(), 2);
        // The window ended: the old keys hold nothing, so at least one goes (eviction stops once
        // there is room; which keys go depends on the shards they hashed to, seeded per process).
        let g = q.alloc(&as_user("carol"), 1, t0 + 10 * S);
        assert_eq!((g.granted, g.remaining), (true, 2));
        assert!((1..=2).contains(&q.len()), "{} keys", q.len());
        // A returning key starts afresh, as it would have anyway.
        assert_eq!(q.alloc(&as_user("ann"), 1, t0 + 11 * S).remaining, 2);
    }

    #[test]
    fn token_bucket_keys_are_evicted_when_full_again() {
        let t0 = Instant::now();
        let mut s = spec(Algorithm::RollingWindow, 2, 2 * S);
        s.max_keys = 2;
        let q = Quota::new(s, t0).unwrap();
        assert!(q.alloc(&as_user("ann"), 1, t0).granted); // full again at 1 s
        assert!(q.alloc(&as_user("bob"), 2, t0).granted); // full again at 2 s
        let g = q.alloc(&as_user("carol"), 1, t0 + 500 * MS);
        assert_eq!(
            (g.granted, g.reset, g.denial),
            (false, 500 * MS, Some(Denial::TooManyKeys))
        );
        assert!(q.alloc(&as_user("carol"), 1, t0 + S).granted); // ann went
        assert_eq!(q.len(), 2);
        let g = q.alloc(&as_user("dave"), 1, t0 + S);
        assert_eq!((g.granted, g.reset), (false, S)); // bob goes at 2 s, carol at 2 s
        // bob is not evictable yet, so it still has its debt.
        assert!(!q.alloc(&as_user("bob"), 2, t0 + S).granted);
    }

    #[test]
    fn memory_is_bounded_across_shards() {
        let t0 = Instant::now();
        let mut s = spec(Algorithm::FixedWindow, 1, S);
        s.max_keys = 100;
        let q = Quota::new(s, t0).unwrap();
        let names: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let granted = names.iter().filter(|n| q.alloc(&as_user(n), 1, t0).granted).count();
        assert_eq!((granted, q.len()), (100, 100));
        let used: usize = q.shards.iter().map(|s| s.lock().unwrap().map.len()).sum();
        assert_eq!(used, 100);
        // One window later, new keys replace old ones wherever their shards are.
        let granted = names[500..]
            .iter()
            .filter(|n| q.alloc(&as_user(n), 1, t0 + S).granted)
            .count();
        assert_eq!((granted, q.len()), (100, 100));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let t0 = Instant::now();
        let base = spec(Algorithm::FixedWindow, 5, S);
        let with = |f: &dyn Fn(&mut QuotaSpec)| {
            let mut s = base.clone();
            f(&mut s);
            Quota::new(s, t0).unwrap_err()
        };
        let table: Vec<(QuotaError, &str)> = vec![
            (
                with(&|s| s.window = Duration::ZERO),
                "quota `per-user`: the window must be longer than zero",
            ),
            (
                with(&|s| s.max_keys = 0),
                "quota `per-user`: max_keys must be at least 1",
            ),
            (
                with(&|s| s.dimensions.push(user())),
                "quota `per-user`: dimension `request.headers[x-user]` is listed twice",
            ),
            (
                with(&|s| {
                    s.overrides.push(Override {
                        dimensions: vec![(Attr::SourceIp, "x".into())],
                        max: 1,
                    })
                }),
                "quota `per-user`: override on `source.ip`, which is not one of the quota's dimensions; add it to `dimensions`",
            ),
            (
                with(&|s| {
                    s.overrides.push(Override {
                        dimensions: vec![],
                        max: 1,
                    })
                }),
                "quota `per-user`: override 0 must name each dimension at most once, and at least one",
            ),
            (
                with(&|s| {
                    s.overrides.push(Override {
                        dimensions: vec![(user(), "a".into()), (user(), "b".into())],
                        max: 1,
                    })
                }),
                "quota `per-user`: override 0 must name each dimension at most once, and at least one",
            ),
        ];
        for (err, want) in table {
            assert_eq!(err.to_string(), want);
        }
    }
}

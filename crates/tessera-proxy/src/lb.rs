//! Load-balancing algorithms behind one trait, and the pure arithmetic around them: priority load
//! with overprovisioning, slow-start weights, stable hashing, hash rings and Maglev tables.
//!
//! A [`Picker`] is built on the control thread for one set of hosts with fixed weights; `pick`
//! runs on the workers and takes no lock and allocates nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tessera_model::LbPolicy;

use crate::cluster::Host;
use crate::util::{rand_below, rand_u64};

/// What a pick may use beyond the hosts.
#[derive(Default)]
pub(crate) struct LbContext {
    /// The request's consistent-hash key, for ring hash and Maglev.
    pub(crate) hash: Option<u64>,
    /// Which re-pick this is, so hashing policies can move on from a refused host.
    pub(crate) attempt: u32,
}

/// Chooses one of a fixed set of hosts. Implementations precompute what they need when built.
pub(crate) trait Picker: Send + Sync {
    /// An index into the hosts the picker was built for.
    fn pick(&self, hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize>;
}

/// Builds the picker for `policy` over hosts with these effective `weights` (same order).
pub(crate) fn picker(policy: &LbPolicy, hosts: &[Arc<Host>], weights: &[u32]) -> Box<dyn Picker> {
    match *policy {
        LbPolicy::RoundRobin => Box::new(RoundRobin::new(weights)),
        LbPolicy::Random => Box::new(Random),
        LbPolicy::LeastRequest {
            choice_count,
            active_request_bias,
        } => Box::new(LeastRequest {
            weights: weights.to_vec(),
            equal: weights.windows(2).all(|w| w[0] == w[1]),
            choice_count: choice_count.max(2),
            bias: active_request_bias,
        }),
        LbPolicy::RingHash {
            minimum_ring_size,
            maximum_ring_size,
        } => Box::new(Ring::new(hosts, weights, minimum_ring_size, maximum_ring_size)),
        LbPolicy::Maglev { table_size } => Box::new(Maglev::new(hosts, weights, table_size)),
    }
}

// ---------------------------------------------------------------- round robin

/// Longest round-robin schedule; larger weight totals are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

/// Smooth weighted round robin: a precomputed schedule walked by one atomic counter.
pub(crate) struct RoundRobin {
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub(crate) fn new(weights: &[u32]) -> RoundRobin {
        RoundRobin {
            schedule: smooth_wrr(weights),
            next: AtomicUsize::new(rand_below(1 << 16) as usize),
        }
    }
}

impl Picker for RoundRobin {
    fn pick(&self, _hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let i = self
            .next
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(ctx.attempt as usize);
        Some(self.schedule[i % self.schedule.len()] as usize)
    }
}

/// nginx's smooth weighted round robin: each host appears in proportion to its weight, spread out.
/// Weight totals above [`MAX_SCHEDULE`] are scaled down (every host keeps at least one slot).
pub(crate) fn smooth_wrr(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    if weights.iter().all(|w| *w == weights[0]) {
        return (0..weights.len() as u32).collect();
    }
    // Weights arrive in hundredths (for slow start); their common factor only lengthens the cycle.
    let g = weights.iter().fold(0u32, |g, w| gcd(g, *w)).max(1);
    let weights: Vec<u32> = weights.iter().map(|w| w / g).collect();
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let scaled: Vec<i64> = if total > MAX_SCHEDULE.max(weights.len() as u64) {
        weights
            .iter()
            .map(|w| ((u64::from(*w) * MAX_SCHEDULE) / total).max(1) as i64)
            .collect()
    } else {
        weights.iter().map(|w| i64::from((*w).max(1))).collect()
    };
    let total: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in scaled.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// ---------------------------------------------------------------- random

/// Uniform random.
pub(crate) struct Random;

impl Picker for Random {
    fn pick(&self, hosts: &[Arc<Host>], _ctx: &LbContext) -> Option<usize> {
        (!hosts.is_empty()).then(|| rand_below(hosts.len() as u64) as usize)
    }
}

// ---------------------------------------------------------------- least request

/// Power of N choices on requests in flight. With unequal weights a host scores
/// `weight / (active + 1)^bias`, as Envoy's weighted least request does.
pub(crate) struct LeastRequest {
    weights: Vec<u32>,
    equal: bool,
    choice_count: u32,
    bias: f64,
}

impl Picker for LeastRequest {
    fn pick(&self, hosts: &[Arc<Host>], _ctx: &LbContext) -> Option<usize> {
        let n = hosts.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return Some(0);
        }
        let active = |i: usize| hosts[i].stats.rq_active.load(Ordering::Relaxed).max(0) as f64;
        let mut best = rand_below(n as u64) as usize;
        for _ in 1..self.choice_count {
            let c = rand_below(n as u64) as usize;
            let better = if self.equal {
                active(c) < active(best)
            } else {
                let score = |i: usize| f64::from(self.weights[i]) / (active(i) + 1.0).powf(self.bias);
                score(c) > score(best)
            };
            if better {
                best = c;
            }
        }
        Some(best)
    }
}

// ---------------------------------------------------------------- hashing

/// A stable 64-bit hash (FNV-1a, then murmur3's finaliser for avalanche). Stable across processes
/// and builds, so every sidecar maps a key to the same host.
pub(crate) fn hash64(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A hashing policy's key for this attempt: a refused host moves the key on, deterministically.
fn attempt_hash(ctx: &LbContext) -> u64 {
    match ctx.hash {
        Some(h) if ctx.attempt == 0 => h,
        Some(h) => fmix64(h ^ u64::from(ctx.attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        None => rand_u64(),
    }
}

fn host_key(h: &Host) -> String {
    h.addr.to_string()
}

/// A Ketama-style ring: each host owns points proportional to its weight.
pub(crate) struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub(crate) fn new(hosts: &[Arc<Host>], weights: &[u32], min_size: u64, max_size: u64) -> Ring {
        Ring::from_keys(
            &hosts.iter().map(|h| host_key(h)).collect::<Vec<_>>(),
            weights,
            min_size,
            max_size,
        )
    }

    /// A host gets `min_size / 8` points per unit of weight (weights arrive ×100), so its points
    /// depend on nothing but itself: adding or removing a host moves only that host's keys.
    /// (Envoy sizes the whole ring instead, which reshuffles every host's share on a change.)
    fn from_keys(keys: &[String], weights: &[u32], min_size: u64, max_size: u64) -> Ring {
        if keys.is_empty() {
            return Ring { points: Vec::new() };
        }
        let per_unit = (min_size / 8).max(16) as f64;
        let wanted: f64 = weights.iter().map(|w| f64::from(*w) / 100.0 * per_unit).sum();
        // Only a ring past its maximum is scaled down (and then shares shift).
        let scale = if wanted > max_size as f64 {
            max_size as f64 / wanted
        } else {
            1.0
        };
        let mut points = Vec::with_capacity(wanted.min(max_size as f64) as usize + keys.len());
        for (i, key) in keys.iter().enumerate() {
            let n = ((f64::from(weights[i]) / 100.0 * per_unit * scale).round() as u64).max(1);
            for j in 0..n {
                points.push((hash64(format!("{key}_{j}").as_bytes(), 0), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    fn lookup(&self, h: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(p, _)| *p < h);
        Some(self.points[i % self.points.len()].1 as usize)
    }
}

impl Picker for Ring {
    fn pick(&self, _hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        self.lookup(attempt_hash(ctx))
    }
}

/// Maglev: a lookup table of `size` (a prime) slots filled from each host's permutation, with
/// turns proportional to weight. Changing one host moves few slots (property-tested).
pub(crate) struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    pub(crate) fn new(hosts: &[Arc<Host>], weights: &[u32], size: u64) -> Maglev {
        Maglev::from_keys(&hosts.iter().map(|h| host_key(h)).collect::<Vec<_>>(), weights, size)
    }

    fn from_keys(keys: &[String], weights: &[u32], size: u64) -> Maglev {
        let m = size as usize;
        if keys.is_empty() || m == 0 {
            return Maglev { table: Vec::new() };
        }
        let offsets: Vec<usize> = keys.iter().map(|k| (hash64(k.as_bytes(), 1) % size) as usize).collect();
        let skips: Vec<usize> = keys
            .iter()
            .map(|k| (hash64(k.as_bytes(), 2) % (size - 1) + 1) as usize)
            .collect();
        let max_w = f64::from(weights.iter().copied().max().unwrap_or(1).max(1));
        let mut next = vec![0usize; keys.len()];
        let mut filled = vec![0u64; keys.len()];
        let mut table = vec![u32::MAX; m];
        let mut placed = 0;
        let mut round = 0u64;
        while placed < m {
            round += 1;
            for i in 0..keys.len() {
                // A host may hold `round * weight / max_weight` slots after `round` rounds.
                let allowed = (round as f64 * f64::from(weights[i]) / max_w) as u64;
                while filled[i] < allowed && placed < m {
                    let mut slot = (offsets[i] + next[i] * skips[i]) % m;
                    while table[slot] != u32::MAX {
                        next[i] += 1;
                        slot = (offsets[i] + next[i] * skips[i]) % m;
                    }
                    table[slot] = i as u32;
                    next[i] += 1;
                    filled[i] += 1;
                    placed += 1;
                }
            }
        }
        Maglev { table }
    }
}

impl Picker for Maglev {
    fn pick(&self, _hosts: &[Arc<Host>], ctx: &LbContext) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(attempt_hash(ctx) % self.table.len() as u64) as usize] as usize)
    }
}

// ---------------------------------------------------------------- priorities and slow start

/// Envoy's priority load: each priority's health (healthy/total weight × overprovisioning,
/// capped at 100 %) takes traffic in order; if the priorities together are under 100 % healthy,
/// their shares are scaled up. Input: `(healthy_weight, total_weight)` per priority. Output: percent
/// per priority, summing to 100 (all to the first priority when nothing is healthy).
pub(crate) fn priority_load(levels: &[(u64, u64)], overprovisioning_percent: u32) -> Vec<u32> {
    if levels.is_empty() {
        return Vec::new();
    }
    let health: Vec<u64> = levels
        .iter()
        .map(|(healthy, total)| {
            if *total == 0 {
                0
            } else {
                (healthy * u64::from(overprovisioning_percent) / total).min(100)
            }
        })
        .collect();
    let sum: u64 = health.iter().sum();
    let mut load = vec![0u32; levels.len()];
    if sum == 0 {
        load[0] = 100;
        return load;
    }
    let normalized = sum.min(100);
    let mut remaining = 100u64;
    for (i, h) in health.iter().enumerate() {
        let share = (h * 100 / normalized).min(remaining);
        load[i] = share as u32;
        remaining -= share;
    }
    // Integer division can leave a point or two: give them to the first priority with health.
    if remaining > 0
        && let Some(i) = health.iter().position(|h| *h > 0)
    {
        load[i] += remaining as u32;
    }
    load
}

/// The weight factor of a host `elapsed` into a slow-start `window`: `(t/window)^(1/aggression)`,
/// floored at `min_percent`, 1.0 once the window has passed.
pub(crate) fn slow_start_factor(
    elapsed: std::time::Duration,
    window: std::time::Duration,
    aggression: f64,
    min_percent: f64,
) -> f64 {
    if elapsed >= window || window.is_zero() {
        return 1.0;
    }
    let t = elapsed.as_secs_f64() / window.as_secs_f64();
    t.powf(1.0 / aggression.max(0.01)).max(min_percent / 100.0).min(1.0)
}

#[cfg(test)]
mod tests;

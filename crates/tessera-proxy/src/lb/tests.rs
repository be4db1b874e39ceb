//! The algorithms as pure functions: distributions, weights, minimal disruption, priority load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tessera_model::Endpoint;

use super::*;
use crate::cluster::Host;

fn hosts(n: usize) -> Vec<Arc<Host>> {
    (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("10.0.{}.{}:80", i / 256, i % 256).parse().unwrap();
            Arc::new(Host::new(addr, &Endpoint::new(addr.ip().to_string(), 80), None))
        })
        .collect()
}

fn keys(n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(|i| hash64(&i.to_le_bytes(), 7))
}

#[test]
fn smooth_wrr_interleaves_by_weight() {
    assert_eq!(smooth_wrr(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(smooth_wrr(&[1, 1, 1]), vec![0, 1, 2]);
    assert!(smooth_wrr(&[]).is_empty());
    // Large totals are scaled down but keep proportions and every host.
    let s = smooth_wrr(&[10_000, 1, 5_000]);
    assert!(s.len() <= 4096 + 3);
    let c = |i| s.iter().filter(|x| **x == i).count() as f64;
    assert!(c(1) >= 1.0);
    assert!((c(0) / c(2) - 2.0).abs() < 0.05, "{} vs {}", c(0), c(2));
}

#[test]
fn least_request_prefers_idle_hosts() {
    let hs = hosts(2);
    hs[0].stats.rq_active.store(50, std::sync::atomic::Ordering::Relaxed);
    let p = picker(
        &LbPolicy::LeastRequest {
            choice_count: 2,
            active_request_bias: 1.0,
        },
        &hs,
        &[100, 100],
    );
    let mut to_busy = 0;
    for _ in 0..1000 {
        if p.pick(&hs, &LbContext::default()) == Some(0) {
            to_busy += 1;
        }
    }
    // P2C picks the busy host only when both samples land on it: about a quarter of the time.
    assert!((150..350).contains(&to_busy), "{to_busy}");
    let three = picker(
        &LbPolicy::LeastRequest {
            choice_count: 5,
            active_request_bias: 1.0,
        },
        &hs,
        &[100, 100],
    );
    let busy5 = (0..1000)
        .filter(|_| three.pick(&hs, &LbContext::default()) == Some(0))
        .count();
    assert!(busy5 < 80, "more choices, fewer bad picks: {busy5}");
}

#[test]
fn hashing_policies_are_sticky_and_spread() {
    let hs = hosts(10);
    let w = vec![100; 10];
    for policy in [
        LbPolicy::RingHash {
            minimum_ring_size: 1024,
            maximum_ring_size: 1 << 20,
        },
        LbPolicy::Maglev { table_size: 65537 },
    ] {
        let p = picker(&policy, &hs, &w);
        let mut counts = HashMap::new();
        for k in keys(10_000) {
            let ctx = LbContext {
                hash: Some(k),
                attempt: 0,
            };
            let a = p.pick(&hs, &ctx).unwrap();
            assert_eq!(p.pick(&hs, &ctx), Some(a), "same key, same host");
            *counts.entry(a).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 10);
        assert!(
            counts.values().all(|c| (600..1400).contains(c)),
            "{policy:?}: {counts:?}"
        );
        let moved = keys(1000)
            .filter(|k| {
                p.pick(
                    &hs,
                    &LbContext {
                        hash: Some(*k),
                        attempt: 0,
                    },
                ) != p.pick(
                    &hs,
                    &LbContext {
                        hash: Some(*k),
                        attempt: 1,
                    },
                )
            })
            .count();
        assert!(moved > 800, "a retry attempt moves the key on: {moved}");
    }
}

#[test]
fn maglev_and_ring_honour_weights() {
    let hs = hosts(3);
    for policy in [
        LbPolicy::RingHash {
            minimum_ring_size: 4096,
            maximum_ring_size: 1 << 20,
        },
        LbPolicy::Maglev { table_size: 65537 },
    ] {
        let p = picker(&policy, &hs, &[100, 200, 100]);
        let mut counts = [0u32; 3];
        for k in keys(40_000) {
            counts[p
                .pick(
                    &hs,
                    &LbContext {
                        hash: Some(k),
                        attempt: 0,
                    },
                )
                .unwrap()] += 1;
        }
        let ratio = f64::from(counts[1]) / f64::from(counts[0]);
        assert!((1.6..2.4).contains(&ratio), "{policy:?}: {counts:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Removing a host from a ring moves only that host's keys.
    #[test]
    fn ring_removal_moves_only_the_removed_hosts_keys(n in 2usize..20, gone in any::<prop::sample::Index>()) {
        let all: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:80")).collect();
        let g = gone.index(n);
        let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != g).map(|(_, k)| k.clone()).collect();
        let before = Ring::from_keys(&all, &vec![100; n], 1024, 1 << 20);
        let after = Ring::from_keys(&rest, &vec![100; n - 1], 1024, 1 << 20);
        for k in keys(2000) {
            let b = &all[before.lookup(k).unwrap()];
            let a = &rest[after.lookup(k).unwrap()];
            if *b != all[g] {
                prop_assert_eq!(a, b);
            }
        }
    }

    /// Removing a host from a Maglev table moves few other keys (the paper's near-minimal disruption).
    #[test]
    fn maglev_removal_moves_few_other_keys(n in 5usize..30, gone in any::<prop::sample::Index>()) {
        let all: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:80")).collect();
        let g = gone.index(n);
        let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != g).map(|(_, k)| k.clone()).collect();
        let before = Maglev::from_keys(&all, &vec![1; n], 65537);
        let after = Maglev::from_keys(&rest, &vec![1; n - 1], 65537);
        let (mut stayed, mut moved) = (0u32, 0u32);
        for slot in 0..before.table.len() {
            let b = &all[before.table[slot] as usize];
            let a = &rest[after.table[slot] as usize];
            if *b != all[g] {
                if a == b { stayed += 1 } else { moved += 1 }
            }
        }
        let share = f64::from(moved) / f64::from(moved + stayed);
        prop_assert!(share < 0.15, "{share:.3} of other keys moved (n = {n})");
    }

    /// Priority load always sums to 100 and is monotone in health.
    #[test]
    fn priority_load_sums_to_100(levels in prop::collection::vec((0u64..100, 1u64..100), 1..6)) {
        let levels: Vec<(u64, u64)> = levels.into_iter().map(|(h, t)| (h.min(t), t)).collect();
        let load = priority_load(&levels, 140);
        prop_assert_eq!(load.iter().sum::<u32>(), 100);
        prop_assert_eq!(load.len(), levels.len());
    }

    /// Weighted round robin gives each host exactly its share of a full cycle.
    #[test]
    fn wrr_cycle_matches_weights(w in prop::collection::vec(1u32..50, 1..20)) {
        let s = smooth_wrr(&w);
        let total: u32 = w.iter().sum();
        for (i, wi) in w.iter().enumerate() {
            let got = s.iter().filter(|x| **x as usize == i).count() as u32;
            prop_assert_eq!(got * total, wi * s.len() as u32, "host {} of {:?}", i, w);
        }
    }
}

#[test]
fn priority_load_follows_envoy() {
    assert_eq!(
        priority_load(&[(10, 10), (10, 10)], 140),
        vec![100, 0],
        "healthy P0 takes all"
    );
    assert_eq!(
        priority_load(&[(5, 10), (10, 10)], 140),
        vec![70, 30],
        "50% × 1.4 = 70%"
    );
    assert_eq!(
        priority_load(&[(8, 10), (10, 10)], 140),
        vec![100, 0],
        "80% × 1.4 caps at 100%"
    );
    assert_eq!(priority_load(&[(0, 10), (10, 10)], 140), vec![0, 100]);
    assert_eq!(
        priority_load(&[(0, 10), (0, 10)], 140),
        vec![100, 0],
        "nothing healthy: P0 (in panic)"
    );
    assert_eq!(
        priority_load(&[(2, 10), (2, 10)], 140),
        vec![50, 50],
        "28% + 28%: scaled up"
    );
}

#[test]
fn slow_start_ramps_to_full_weight() {
    let w = Duration::from_secs(10);
    assert_eq!(
        slow_start_factor(Duration::ZERO, w, 1.0, 10.0),
        0.1,
        "floored at min_weight_percent"
    );
    assert!(
        (slow_start_factor(Duration::from_secs(5), w, 1.0, 10.0) - 0.5).abs() < 1e-9,
        "linear"
    );
    assert!(
        slow_start_factor(Duration::from_secs(5), w, 2.0, 10.0) > 0.7,
        "aggression ramps faster"
    );
    assert_eq!(slow_start_factor(Duration::from_secs(11), w, 1.0, 10.0), 1.0);
}

#[test]
fn hash64_is_stable() {
    // Pinned: changing the hash would remap every consistently-hashed key in a running mesh, and
    // sidecars of different versions would disagree.
    assert_eq!(hash64(b"tessera", 0), 0xb4d7_79de_6b4c_ce0b);
    assert_eq!(hash64(b"10.0.0.1:80", 1), 0x7d8f_bbfc_6baf_e1f9);
    assert_ne!(hash64(b"a", 0), hash64(b"a", 1), "seeds matter");
}

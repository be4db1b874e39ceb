//! Property tests: quotas against reference models, CIDR lists against a naive matcher,
//! attribute names round-tripping.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tessera_policy::{Algorithm, Attr, Entries, MapAttributes, Quota, QuotaSpec};

fn quota(algorithm: Algorithm, max: u32, window: Duration, start: Instant) -> Quota {
    let spec = QuotaSpec {
        name: "q".into(),
        max,
        window,
        algorithm,
        dimensions: vec![],
        overrides: vec![],
        max_keys: 1,
    };
    Quota::new(spec, start).expect("valid spec")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A fixed window grants exactly what fits: per window, the sum granted never exceeds
    /// `max`, and a request is refused only when it would go over.
    #[test]
    fn fixed_window_matches_its_model(
        max in 0u32..20,
        window_ms in 1u64..1000,
        steps in prop::collection::vec((0u64..400, 0u32..8), 1..60),
    ) {
        let t0 = Instant::now();
        let window = Duration::from_millis(window_ms);
        let q = quota(Algorithm::FixedWindow, max, window, t0);
        let (mut at_ms, mut current, mut used) = (0u64, 0u64, 0u32);
        for (dt, amount) in steps {
            at_ms += dt;
            let w = at_ms / window_ms;
            if w != current {
                (current, used) = (w, 0);
            }
            let want = used + amount <= max;
            if want {
                used += amount;
            }
            let g = q.alloc(&MapAttributes::new(), amount, t0 + Duration::from_millis(at_ms));
            prop_assert_eq!(g.granted, want);
            prop_assert_eq!(g.remaining, max - used);
            prop_assert!(used <= max);
            prop_assert_eq!(g.reset, Duration::from_millis((w + 1) * window_ms - at_ms));
        }
    }

    /// The token bucket agrees with a plain bucket counted in exact integers (tokens times
    /// `window` in ns, refilled by `max` per ns) and never holds more than `max`.
    #[test]
    fn token_bucket_matches_its_model(
        max in 1u32..50,
        window_us in 1u64..2_000_000,
        steps in prop::collection::vec((0u64..500_000, 0u32..10), 1..80),
    ) {
        let t0 = Instant::now();
        let window_ns = u128::from(window_us) * 1000;
        let q = quota(Algorithm::RollingWindow, max, Duration::from_micros(window_us), t0);
        let capacity = u128::from(max) * window_ns;
        let (mut at_ns, mut level, mut last) = (0u128, capacity, 0u128);
        let mut granted_total = 0u128;
        for (dt_us, amount) in steps {
            at_ns += u128::from(dt_us) * 1000;
            level = (level + (at_ns - last) * u128::from(max)).min(capacity);
            last = at_ns;
            let cost = u128::from(amount) * window_ns;
            let want = cost <= level;
            if want {
                level -= cost;
                granted_total += u128::from(amount);
            }
            let now = t0 + Duration::from_nanos(u64::try_from(at_ns).unwrap());
            let g = q.alloc(&MapAttributes::new(), amount, now);
            prop_assert_eq!(g.granted, want, "at {} ns, {} units, level {}", at_ns, amount, level);
            prop_assert_eq!(u128::from(g.remaining), level / window_ns);
            prop_assert!(g.remaining <= max);
            // Over the whole run: at most a full bucket plus what the elapsed time refilled.
            prop_assert!(granted_total <= u128::from(max) + at_ns * u128::from(max) / window_ns);
        }
    }

    /// CIDR lists agree with a naive "any entry's network contains the address" matcher.
    #[test]
    fn ipv4_lists_match_like_masks(
        nets in prop::collection::vec((any::<u32>(), 0u8..=32), 0..12),
        probes in prop::collection::vec(any::<u32>(), 1..20),
    ) {
        let text: Vec<String> = nets.iter().map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(*a))).collect();
        let list = Entries::ips(&text).unwrap();
        let near: Vec<u32> = nets.iter().flat_map(|(a, _)| [*a, a.wrapping_add(1), a.wrapping_sub(1)]).collect();
        for ip in probes.into_iter().chain(near) {
            let want = nets.iter().any(|&(a, p)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
                a & mask == ip & mask
            });
            prop_assert_eq!(list.contains(&Ipv4Addr::from(ip).to_string()), want, "{} in {:?}", Ipv4Addr::from(ip), text);
        }
    }

    #[test]
    fn ipv6_lists_match_like_masks(
        nets in prop::collection::vec((any::<u128>(), 0u8..=128), 0..12),
        probes in prop::collection::vec(any::<u128>(), 1..20),
    ) {
        let text: Vec<String> = nets.iter().map(|(a, p)| format!("{}/{p}", Ipv6Addr::from(*a))).collect();
        let list = Entries::ips(&text).unwrap();
        let near: Vec<u128> = nets.iter().flat_map(|(a, _)| [*a, a.wrapping_add(1), a.wrapping_sub(1)]).collect();
        for ip in probes.into_iter().chain(near) {
            let want = nets.iter().any(|&(a, p)| {
                let mask = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
                a & mask == ip & mask
            });
            let shown = IpAddr::from(Ipv6Addr::from(ip));
            // `::ffff:a.b.c.d` also matches v4 entries, and none are generated here.
            prop_assert_eq!(list.contains(&shown.to_string()), want, "{} in {:?}", shown, text);
        }
    }

    /// Keyed names print back as parsed (header names lower-cased), and parsing never panics.
    #[test]
    fn attribute_names_round_trip(key in "[A-Za-z0-9_.:/-]{1,20}", base in 0usize..4) {
        let base = ["source.labels", "destination.labels", "request.headers", "rpc.attachments"][base];
        let attr: Attr = format!("{base}[{key}]").parse().unwrap();
        let key = if base == "request.headers" { key.to_ascii_lowercase() } else { key };
        prop_assert_eq!(attr.to_string(), format!("{base}[{key}]"));
        prop_assert_eq!(attr.to_string().parse::<Attr>().unwrap(), attr);
    }

    #[test]
    fn attribute_parsing_never_panics(name in "\\PC{0,30}") {
        let _ = name.parse::<Attr>();
    }
}

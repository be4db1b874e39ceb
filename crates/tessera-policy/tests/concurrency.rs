//! Many threads on one quota: grants stay exact and keys stay bounded.

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use tessera_policy::{Algorithm, Attr, Denial, MapAttributes, Quota, QuotaSpec};

const THREADS: usize = 8;

fn quota(algorithm: Algorithm, max: u32, max_keys: usize, start: Instant) -> Quota {
    let spec = QuotaSpec {
        name: "hammered".into(),
        max,
        window: Duration::from_secs(60),
        algorithm,
        dimensions: vec![Attr::RequestHeader("x-user".into())],
        overrides: vec![],
        max_keys,
    };
    Quota::new(spec, start).expect("valid spec")
}

/// Every thread calls `alloc` `tries` times at `now` on the key `key(thread, try)`; returns the
/// units granted in all.
fn hammer(q: &Quota, now: Instant, tries: usize, amount: u32, key: impl Fn(usize, usize) -> String + Sync) -> u64 {
    let barrier = Barrier::new(THREADS);
    thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (barrier, key) = (&barrier, &key);
                s.spawn(move || {
                    barrier.wait();
                    let mut granted = 0u64;
                    for i in 0..tries {
                        let who = MapAttributes::new().with(Attr::RequestHeader("x-user".into()), key(t, i));
                        let g = q.alloc(&who, amount, now);
                        assert!(g.remaining <= g.limit);
                        if g.granted {
                            granted += u64::from(amount);
                        }
                    }
                    granted
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic")).sum()
    })
}

#[test]
fn one_key_never_gets_more_than_max_in_a_window() {
    for algorithm in [Algorithm::FixedWindow, Algorithm::RollingWindow] {
        for (max, amount) in [(1000, 1), (999, 3), (1, 1)] {
            let t0 = Instant::now();
            let q = quota(algorithm, max, 16, t0);
            // Twice the demand the limit allows, all at one instant: exactly `max` is granted
            // when `amount` divides it, never more.
            let tries = 2 * max as usize / THREADS + 1;
            let granted = hammer(&q, t0, tries, amount, |_, _| "ann".into());
            assert_eq!(
                granted,
                u64::from(max / amount * amount),
                "{algorithm:?} max={max} amount={amount}"
            );
            // The next window (or a full refill) grants again, exactly as much.
            let granted = hammer(&q, t0 + Duration::from_secs(60), tries, amount, |_, _| "ann".into());
            assert_eq!(granted, u64::from(max / amount * amount), "{algorithm:?} next window");
        }
    }
}

#[test]
fn many_new_keys_at_once_stay_within_max_keys() {
    let t0 = Instant::now();
    let q = quota(Algorithm::FixedWindow, 1, 64, t0);
    let granted = hammer(&q, t0, 200, 1, |t, i| format!("user-{t}-{i}"));
    assert_eq!((granted, q.len()), (64, 64));
    let full = q.alloc(
        &MapAttributes::new().with(Attr::RequestHeader("x-user".into()), "late"),
        1,
        t0,
    );
    assert_eq!(full.denial, Some(Denial::TooManyKeys));
    // A window later every old key is evictable; the new ones take their places, no more.
    let granted = hammer(&q, t0 + Duration::from_secs(60), 200, 1, |t, i| format!("next-{t}-{i}"));
    assert_eq!((granted, q.len()), (64, 64));
}

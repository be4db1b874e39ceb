//! Snapshots and picks: priorities and failover, panic mode, localities, subsets, slow start,
//! ejection taking effect before the next snapshot, membership changes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use tessera_model::Config;

use super::*;

fn cluster_with(yaml: &str, node: Option<&Locality>) -> ClusterRt {
    let cfg = Config::from_yaml(&format!("clusters:\n{yaml}"), "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    ClusterRt::new(cfg.clusters[0].clone(), &Stats::default(), None, node)
}

fn tally(c: &ClusterRt, ctx: &PickContext<'_>, n: usize) -> HashMap<SocketAddr, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        if let Some(h) = c.pick(ctx) {
            *m.entry(h.addr).or_insert(0) += 1;
        }
    }
    m
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn mark(c: &ClusterRt, a: &str, flag: u8) {
    let h = c.hosts().into_iter().find(|h| h.addr == addr(a)).unwrap();
    h.health.fetch_or(flag, Ordering::Relaxed);
}

const PRIOS: &str = r#"
- name: c
  endpoints:
  - { address: "10.0.0.1:80" }
  - { address: "10.0.0.2:80" }
  - { address: "10.0.1.1:80", priority: 1 }
  - { address: "10.0.1.2:80", priority: 1 }
"#;

#[test]
fn priority_zero_takes_everything_while_healthy() {
    let c = cluster_with(PRIOS, None);
    let t = tally(&c, &PickContext::default(), 1000);
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(t.contains_key(&addr("10.0.0.1:80")) && t.contains_key(&addr("10.0.0.2:80")));
}

#[test]
fn failover_follows_overprovisioned_health() {
    let c = cluster_with(PRIOS, None);
    mark(&c, "10.0.0.1:80", FAILED_ACTIVE_HC);
    c.rebuild();
    let t = tally(&c, &PickContext::default(), 10_000);
    let p0 = t.get(&addr("10.0.0.2:80")).copied().unwrap_or(0);
    let p1 = t.get(&addr("10.0.1.1:80")).copied().unwrap_or(0) + t.get(&addr("10.0.1.2:80")).copied().unwrap_or(0);
    assert!(!t.contains_key(&addr("10.0.0.1:80")), "the unhealthy host gets nothing");
    // P0 at 50% health × 1.4 takes 70%.
    assert!((6_500..7_500).contains(&p0), "p0 {p0} p1 {p1}");
    assert_eq!(p0 + p1, 10_000);
}

#[test]
fn panic_mode_uses_every_host() {
    let c = cluster_with(PRIOS, None);
    for a in ["10.0.0.1:80", "10.0.0.2:80", "10.0.1.1:80", "10.0.1.2:80"] {
        mark(&c, a, FAILED_ACTIVE_HC);
    }
    c.rebuild();
    let t = tally(&c, &PickContext::default(), 1000);
    assert_eq!(t.values().sum::<usize>(), 1000, "every request still gets a host");
    assert!(
        t.keys().all(|a| a.ip().to_string().starts_with("10.0.0.")),
        "panic within P0: {t:?}"
    );
}

#[test]
fn locality_keeps_traffic_near_and_fails_over() {
    let me = Locality {
        region: "eu".into(),
        zone: "eu-1a".into(),
        sub_zone: String::new(),
    };
    let yaml = r#"
- name: c
  endpoints:
  - { address: "10.0.0.1:80", locality: { region: eu, zone: eu-1a } }
  - { address: "10.0.0.2:80", locality: { region: eu, zone: eu-1b } }
  - { address: "10.0.0.3:80", locality: { region: us, zone: us-1a } }
"#;
    let c = cluster_with(yaml, Some(&me));
    let t = tally(&c, &PickContext::default(), 500);
    assert_eq!(
        t.keys().copied().collect::<Vec<_>>(),
        vec![addr("10.0.0.1:80")],
        "local zone only"
    );
    mark(&c, "10.0.0.1:80", FAILED_OUTLIER);
    c.rebuild();
    let t = tally(&c, &PickContext::default(), 500);
    assert_eq!(
        t.keys().copied().collect::<Vec<_>>(),
        vec![addr("10.0.0.2:80")],
        "then the same region"
    );
    let off = cluster_with(&yaml.replace("- name: c", "- name: c\n  locality_lb: false"), Some(&me));
    assert_eq!(
        tally(&off, &PickContext::default(), 600).len(),
        3,
        "locality_lb: false spreads"
    );
}

#[test]
fn subsets_and_their_fallbacks() {
    let yaml = |fallback: &str| {
        format!(
            r#"
- name: c
  lb_subset_config: {{ fallback_policy: {fallback}, default_subset: {{ version: v1 }} }}
  endpoints:
  - {{ address: "10.0.0.1:80", labels: {{ version: v1 }} }}
  - {{ address: "10.0.0.2:80", labels: {{ version: v2, canary: "yes" }} }}
  - {{ address: "10.0.0.3:80", labels: {{ version: v2 }} }}
"#
        )
    };
    let c = cluster_with(&yaml("NO_FALLBACK"), None);
    let v2 = c.register_subset(&[("version".to_string(), "v2".to_string())].into());
    let canary = c.register_subset(
        &[
            ("version".to_string(), "v2".to_string()),
            ("canary".to_string(), "yes".to_string()),
        ]
        .into(),
    );
    let none = c.register_subset(&[("version".to_string(), "v9".to_string())].into());
    let t = tally(
        &c,
        &PickContext {
            subset: Some(v2),
            ..Default::default()
        },
        400,
    );
    assert_eq!(t.len(), 2);
    assert!(!t.contains_key(&addr("10.0.0.1:80")));
    let t = tally(
        &c,
        &PickContext {
            subset: Some(canary),
            ..Default::default()
        },
        100,
    );
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![addr("10.0.0.2:80")]);
    assert!(
        c.pick(&PickContext {
            subset: Some(none),
            ..Default::default()
        })
        .is_none(),
        "NO_FALLBACK: no host"
    );
    let any = cluster_with(&yaml("ANY_ENDPOINT"), None);
    let s = any.register_subset(&[("version".to_string(), "v9".to_string())].into());
    assert_eq!(
        tally(
            &any,
            &PickContext {
                subset: Some(s),
                ..Default::default()
            },
            600
        )
        .len(),
        3
    );
    let def = cluster_with(&yaml("DEFAULT_SUBSET"), None);
    let s = def.register_subset(&[("version".to_string(), "v9".to_string())].into());
    assert_eq!(
        tally(
            &def,
            &PickContext {
                subset: Some(s),
                ..Default::default()
            },
            100
        )
        .keys()
        .copied()
        .collect::<Vec<_>>(),
        vec![addr("10.0.0.1:80")]
    );
}

#[test]
fn an_ejected_host_is_skipped_before_the_next_snapshot() {
    let c = cluster_with("- { name: c, endpoints: [10.0.0.1:80, 10.0.0.2:80] }", None);
    mark(&c, "10.0.0.1:80", FAILED_OUTLIER);
    // No rebuild: the pick itself checks availability.
    let t = tally(
        &c,
        &PickContext {
            max_attempts: 3,
            ..Default::default()
        },
        200,
    );
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![addr("10.0.0.2:80")]);
}

#[test]
fn avoid_list_steers_retries_to_other_hosts() {
    let c = cluster_with(
        "- { name: c, endpoints: [10.0.0.1:80, 10.0.0.2:80, 10.0.0.3:80] }",
        None,
    );
    let first = c.pick(&PickContext::default()).unwrap();
    let avoid = [first.id];
    for _ in 0..100 {
        let h = c
            .pick(&PickContext {
                avoid: &avoid,
                max_attempts: 5,
                ..Default::default()
            })
            .unwrap();
        assert_ne!(h.id, first.id);
    }
    // With one host, avoiding it still gives it (best effort, as Envoy).
    let one = cluster_with("- { name: c, endpoints: [10.0.0.1:80] }", None);
    let h = one.pick(&PickContext::default()).unwrap();
    assert_eq!(
        one.pick(&PickContext {
            avoid: &[h.id],
            max_attempts: 3,
            ..Default::default()
        })
        .unwrap()
        .id,
        h.id
    );
}

#[test]
fn slow_start_gives_new_hosts_a_small_share() {
    let c = cluster_with(
        "- { name: c, slow_start: { window: 60s, min_weight_percent: 10 }, endpoints: [10.0.0.1:80] }",
        None,
    );
    // A host joining a running cluster starts warming.
    c.set_hosts(vec![
        (addr("10.0.0.1:80"), tessera_model::Endpoint::new("10.0.0.1", 80), None),
        (addr("10.0.0.2:80"), tessera_model::Endpoint::new("10.0.0.2", 80), None),
    ]);
    let t = tally(&c, &PickContext::default(), 11_000);
    let new = t.get(&addr("10.0.0.2:80")).copied().unwrap_or(0);
    assert!((600..1400).contains(&new), "the new host gets about 10/110: {new}");
}

#[test]
fn membership_changes_keep_unchanged_hosts() {
    let c = cluster_with("- { name: c, endpoints: [10.0.0.1:80, 10.0.0.2:80] }", None);
    let before = c.hosts();
    c.set_hosts(vec![
        (addr("10.0.0.2:80"), tessera_model::Endpoint::new("10.0.0.2", 80), None),
        (addr("10.0.0.9:80"), tessera_model::Endpoint::new("10.0.0.9", 80), None),
    ]);
    let after = c.hosts();
    assert!(
        Arc::ptr_eq(&before[1], &after[0]),
        "10.0.0.2 kept its Host (and its pools)"
    );
    assert_ne!(after[1].id, before[0].id);
    assert_eq!(c.stats.membership_total.get(), 2);
}

#[test]
fn empty_cluster_picks_nothing_and_counts_it() {
    let c = cluster_with("- { name: c, endpoints: [] }", None);
    assert!(c.pick(&PickContext::default()).is_none());
    assert_eq!(c.stats.upstream_cx_none_healthy.get(), 1);
}

#[test]
fn health_checked_hosts_start_unhealthy() {
    let c = cluster_with(
        "- { name: c, health_checks: [{ tcp_health_check: {} }], endpoints: [10.0.0.1:80] }",
        None,
    );
    let h = &c.hosts()[0];
    assert!(!h.available());
    assert_eq!(h.health_text(), "/failed_active_hc");
    assert_eq!(h.hc_failing.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn strict_dns_resolves_localhost_preferring_v4() {
    let c = cluster_with("- { name: c, type: strict_dns, endpoints: [localhost:8080] }", None);
    c.resolve().await;
    let hosts = c.hosts();
    assert_eq!(hosts.len(), 1, "localhost resolves to one IPv4 address");
    assert_eq!(hosts[0].addr, addr("127.0.0.1:8080"));
    assert_eq!(hosts[0].hostname.as_ref().unwrap(), "localhost");
    let bad = cluster_with(
        "- { name: c, type: strict_dns, endpoints: [no-such-host.invalid:80] }",
        None,
    );
    bad.resolve().await;
    assert_eq!(bad.stats.update_failure.get(), 1);
    assert!(bad.hosts().is_empty());
}

#[test]
fn retries_find_the_one_untried_host_even_when_random_keeps_missing_it() {
    let eps: Vec<String> = (1..=10).map(|i| format!("10.0.0.{i}:80")).collect();
    let c = cluster_with(
        &format!("- {{ name: c, lb_policy: random, endpoints: [{}] }}", eps.join(", ")),
        None,
    );
    let hosts = c.hosts();
    let avoid: Vec<u64> = hosts[..9].iter().map(|h| h.id).collect();
    for _ in 0..500 {
        let h = c
            .pick(&PickContext {
                avoid: &avoid,
                max_attempts: 3,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            h.id, hosts[9].id,
            "three random draws miss it 73% of the time; the scan must not"
        );
    }
}

/// Endpoints replaced while workers pick (an EDS push under traffic): every pick finds a host.
/// A snapshot published with its hosts but not yet its priority set used to answer 503 here.
#[test]
fn picks_never_miss_while_endpoints_are_replaced() {
    let c = Arc::new(cluster_with(
        "- name: c\n  endpoints: [{ address: \"10.0.0.1:80\" }]\n",
        None,
    ));
    let flipper = {
        let c = c.clone();
        std::thread::spawn(move || {
            for i in 0..3_000u16 {
                let mut a = model::Endpoint::new("10.0.0.1", 80);
                let mut b = model::Endpoint::new("10.0.0.2", 80 + (i % 7));
                a.weight = 1 + u32::from(i % 3);
                b.weight = 1;
                let eps = if i % 2 == 0 { vec![a] } else { vec![a, b] };
                c.set_endpoints(&eps);
            }
        })
    };
    let mut missed = 0;
    let mut picks = 0;
    while !flipper.is_finished() {
        for _ in 0..100 {
            picks += 1;
            if c.pick(&PickContext::default()).is_none() {
                missed += 1;
            }
        }
    }
    flipper.join().unwrap();
    assert_eq!(missed, 0, "{missed} of {picks} picks found no host");
}

//! Decoding of the traffic-management parts of the config.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Refs, decode_header_matcher};
use crate::decode::{Ctx, Obj, Path, enumeration, parse_scalar, scalar, string, uint};
use crate::traffic::*;
use crate::yaml::{Kind, Node as YNode};

/// A number in `[min, max]`.
pub(super) fn number(ctx: &mut Ctx, n: &YNode, p: &Path, min: f64, max: f64) -> Option<f64> {
    let want = format!("a number from {min} to {max}");
    let v = parse_scalar(ctx, n, p, &want, |s| s.parse::<f64>().ok().filter(|v| v.is_finite()))?;
    if v < min || v > max {
        ctx.error(n.mark, p, format!("expected {want}, found {v}"));
        return None;
    }
    Some(v)
}

/// A percentage: `10`, `12.5`, Istio's `{value: 10}` or Envoy's `{numerator: 1, denominator: HUNDRED}`.
pub(super) fn percentage(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<f64> {
    match &n.kind {
        Kind::Map(_) => {
            let mut o = Obj::open(ctx, n, p)?;
            let r = if o.has("value") {
                o.get("value").and_then(|(n, p)| number(ctx, n, &p, 0.0, 100.0))
            } else {
                let num = o
                    .require(ctx, "numerator")
                    .and_then(|(n, p)| uint::<u64>(ctx, n, &p, 0, u64::from(u32::MAX)));
                let den = o
                    .get("denominator")
                    .and_then(|(n, p)| {
                        enumeration(
                            ctx,
                            n,
                            &p,
                            &[("HUNDRED", 100.0), ("TEN_THOUSAND", 10_000.0), ("MILLION", 1_000_000.0)],
                        )
                    })
                    .unwrap_or(100.0);
                num.map(|num| (num as f64 / den * 100.0).min(100.0))
            };
            o.finish(ctx);
            r
        }
        _ => number(ctx, n, p, 0.0, 100.0),
    }
}

/// A `string -> string` map (labels, metadata_match).
pub(super) fn labels(ctx: &mut Ctx, n: &YNode, p: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &n.kind {
        Kind::Map(entries) => {
            for (k, v) in entries {
                let Some(key) = scalar(ctx, k, p, "a label name") else {
                    continue;
                };
                let fp = p.field(key);
                if let Some(val) = string(ctx, v, &fp) {
                    out.insert(key.to_string(), val);
                }
            }
        }
        Kind::Null => {}
        _ => ctx.error(
            n.mark,
            p,
            format!("expected a mapping of labels, found {}", n.describe()),
        ),
    }
    out
}

/// `metadata_match`: a flat label map, or Envoy's `{filter_metadata: {envoy.lb: {...}}}`.
pub(super) fn metadata_match(ctx: &mut Ctx, n: &YNode, p: &Path) -> BTreeMap<String, String> {
    if let Kind::Map(entries) = &n.kind
        && entries
            .iter()
            .any(|(k, _)| matches!(&k.kind, Kind::Scalar { text } if text == "filter_metadata"))
    {
        let Some(mut o) = Obj::open(ctx, n, p) else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        if let Some((fm, fp)) = o.get("filter_metadata")
            && let Some(mut f) = Obj::open(ctx, fm, &fp)
        {
            if let Some((lb, lp)) = f.get("envoy.lb") {
                out = labels(ctx, lb, &lp);
            }
            f.finish(ctx);
        }
        o.finish(ctx);
        return out;
    }
    labels(ctx, n, p)
}

pub(super) fn locality(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<Locality> {
    let mut o = Obj::open(ctx, n, p)?;
    let l = Locality {
        region: o.string(ctx, "region").unwrap_or_default(),
        zone: o.string(ctx, "zone").unwrap_or_default(),
        sub_zone: o.string(ctx, "sub_zone").unwrap_or_default(),
    };
    o.finish(ctx);
    Some(l)
}

pub(super) fn node(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<Node> {
    let mut o = Obj::open(ctx, n, p)?;
    let node = Node {
        id: o.string(ctx, "id").unwrap_or_default(),
        cluster: o.string(ctx, "cluster").unwrap_or_default(),
        locality: o.get("locality").and_then(|(n, p)| locality(ctx, n, &p)),
    };
    o.finish(ctx);
    Some(node)
}

/// Reads `lb_policy` and the policy's own config block from a cluster.
pub(super) fn lb_policy(ctx: &mut Ctx, o: &mut Obj<'_>) -> LbPolicy {
    #[derive(Clone, Copy)]
    enum K {
        Rr,
        Lr,
        Random,
        Ring,
        Maglev,
    }
    let kind = o
        .get("lb_policy")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("round_robin", K::Rr),
                    ("least_request", K::Lr),
                    ("random", K::Random),
                    ("ring_hash", K::Ring),
                    ("maglev", K::Maglev),
                ],
            )
        })
        .unwrap_or(K::Rr);
    let lr = o.get("least_request_lb_config");
    let ring = o.get("ring_hash_lb_config");
    let mag = o.get("maglev_lb_config");
    let misplaced = |ctx: &mut Ctx, cfg: Option<(&YNode, Path)>, policy: &str| {
        if let Some((n, p)) = cfg {
            ctx.error(
                n.mark,
                &p,
                format!("this block configures lb_policy {policy}, but the cluster uses another policy"),
            );
        }
    };
    match kind {
        K::Rr => {
            misplaced(ctx, lr, "least_request");
            misplaced(ctx, ring, "ring_hash");
            misplaced(ctx, mag, "maglev");
            LbPolicy::RoundRobin
        }
        K::Random => {
            misplaced(ctx, lr, "least_request");
            misplaced(ctx, ring, "ring_hash");
            misplaced(ctx, mag, "maglev");
            LbPolicy::Random
        }
        K::Lr => {
            misplaced(ctx, ring, "ring_hash");
            misplaced(ctx, mag, "maglev");
            let (mut choice_count, mut active_request_bias) = (2, 1.0);
            if let Some((n, p)) = lr
                && let Some(mut c) = Obj::open(ctx, n, &p)
            {
                choice_count = c.uint(ctx, "choice_count", 2, 100).unwrap_or(2);
                active_request_bias = c
                    .get("active_request_bias")
                    .and_then(|(n, p)| number(ctx, n, &p, 0.0, 10.0))
                    .unwrap_or(1.0);
                c.finish(ctx);
            }
            LbPolicy::LeastRequest {
                choice_count,
                active_request_bias,
            }
        }
        K::Ring => {
            misplaced(ctx, lr, "least_request");
            misplaced(ctx, mag, "maglev");
            let (mut min, mut max) = (1024, 8 * 1024 * 1024);
            if let Some((n, p)) = ring
                && let Some(mut c) = Obj::open(ctx, n, &p)
            {
                min = c.uint(ctx, "minimum_ring_size", 1, 8 * 1024 * 1024).unwrap_or(1024);
                max = c
                    .uint(ctx, "maximum_ring_size", 1, 8 * 1024 * 1024)
                    .unwrap_or(8 * 1024 * 1024);
                if min > max {
                    ctx.error(
                        c.mark,
                        &c.path,
                        format!("minimum_ring_size {min} is above maximum_ring_size {max}"),
                    );
                }
                c.finish(ctx);
            }
            LbPolicy::RingHash {
                minimum_ring_size: min,
                maximum_ring_size: max,
            }
        }
        K::Maglev => {
            misplaced(ctx, lr, "least_request");
            misplaced(ctx, ring, "ring_hash");
            let mut table_size = 65537;
            if let Some((n, p)) = mag
                && let Some(mut c) = Obj::open(ctx, n, &p)
            {
                if let Some((n, p)) = c.get("table_size")
                    && let Some(t) = uint::<u64>(ctx, n, &p, 3, 5_000_011)
                {
                    if is_prime(t) {
                        table_size = t;
                    } else {
                        ctx.error(n.mark, &p, format!("table_size must be a prime; {t} is not"));
                    }
                }
                c.finish(ctx);
            }
            LbPolicy::Maglev { table_size }
        }
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

pub(super) fn slow_start(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<SlowStart> {
    let mut o = Obj::open(ctx, n, p)?;
    let window = o.require(ctx, "window").and_then(|(n, p)| {
        parse_scalar(ctx, n, &p, "a duration such as 30s", crate::parse_duration).filter(|d| !d.is_zero())
    });
    let aggression = o
        .get("aggression")
        .and_then(|(n, p)| number(ctx, n, &p, 0.01, 100.0))
        .unwrap_or(1.0);
    let min_weight_percent = o
        .get("min_weight_percent")
        .and_then(|(n, p)| number(ctx, n, &p, 0.0, 100.0))
        .unwrap_or(10.0);
    o.finish(ctx);
    Some(SlowStart {
        window: window?,
        aggression,
        min_weight_percent,
    })
}

pub(super) fn subset_config(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<SubsetConfig> {
    let mut o = Obj::open(ctx, n, p)?;
    let fallback_policy = o
        .get("fallback_policy")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("NO_FALLBACK", SubsetFallback::NoFallback),
                    ("ANY_ENDPOINT", SubsetFallback::AnyEndpoint),
                    ("DEFAULT_SUBSET", SubsetFallback::DefaultSubset),
                ],
            )
        })
        .unwrap_or(SubsetFallback::NoFallback);
    let default_subset = o
        .get("default_subset")
        .map(|(n, p)| labels(ctx, n, &p))
        .unwrap_or_default();
    if fallback_policy == SubsetFallback::DefaultSubset && default_subset.is_empty() {
        ctx.error(
            o.mark,
            &o.path.field("default_subset"),
            "fallback_policy DEFAULT_SUBSET needs a default_subset",
        );
    }
    let _ = o.get("subset_selectors"); // Envoy's index hints; subsets are indexed from the routes that use them.
    o.finish(ctx);
    Some(SubsetConfig {
        fallback_policy,
        default_subset,
    })
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A TCP health-check payload: Envoy's `{text: HEX}` or `{string: "plain"}`.
fn payload(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<Vec<u8>> {
    let mut o = Obj::open(ctx, n, p)?;
    let text = o
        .get("text")
        .and_then(|(n, p)| parse_scalar(ctx, n, &p, "hex digits, e.g. 50494e47", hex));
    let plain = o.string(ctx, "string").map(String::into_bytes);
    o.finish(ctx);
    match (text, plain) {
        (Some(b), None) | (None, Some(b)) => Some(b),
        _ => {
            ctx.error(n.mark, p, "a payload has one of `text` (hex) or `string`");
            None
        }
    }
}

pub(super) fn health_check(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<HealthCheck> {
    let mut o = Obj::open(ctx, n, p)?;
    let timeout = o.duration(ctx, "timeout").unwrap_or(Duration::from_secs(1));
    let interval = o.duration(ctx, "interval").unwrap_or(Duration::from_secs(10));
    if interval < Duration::from_millis(10) {
        ctx.error(o.mark, &o.path.field("interval"), "must be at least 10ms");
    }
    let interval_jitter = o.duration(ctx, "interval_jitter").unwrap_or(Duration::ZERO);
    let unhealthy_threshold = o.uint(ctx, "unhealthy_threshold", 1, 1000).unwrap_or(3);
    let healthy_threshold = o.uint(ctx, "healthy_threshold", 1, 1000).unwrap_or(2);
    let http = o.get("http_health_check");
    let tcp = o.get("tcp_health_check");
    let grpc = o.get("grpc_health_check");
    let kind = match (http, tcp, grpc) {
        (Some((n, p)), None, None) => (|| {
            let mut h = Obj::open(ctx, n, &p)?;
            let path = h.string(ctx, "path").unwrap_or_else(|| "/".to_string());
            let host = h.string(ctx, "host");
            let mut expected_statuses = h.list(ctx, "expected_statuses", |ctx, n, p| {
                let mut r = Obj::open(ctx, n, p)?;
                let start = r
                    .require(ctx, "start")
                    .and_then(|(n, p)| uint::<u16>(ctx, n, &p, 100, 599));
                let end = r
                    .require(ctx, "end")
                    .and_then(|(n, p)| uint::<u16>(ctx, n, &p, 101, 600));
                r.finish(ctx);
                let (start, end) = (start?, end?);
                if start >= end {
                    ctx.error(
                        n.mark,
                        p,
                        format!("range start {start} must be below end {end} (end is exclusive)"),
                    );
                    return None;
                }
                Some(StatusRange { start, end })
            });
            if expected_statuses.is_empty() {
                expected_statuses.push(StatusRange { start: 200, end: 201 });
            }
            h.finish(ctx);
            Some(HealthCheckKind::Http {
                path,
                host,
                expected_statuses,
            })
        })(),
        (None, Some((n, p)), None) => (|| {
            let mut t = Obj::open(ctx, n, &p)?;
            let send = t.get("send").and_then(|(n, p)| payload(ctx, n, &p));
            let receive = t.list(ctx, "receive", payload);
            t.finish(ctx);
            Some(HealthCheckKind::Tcp { send, receive })
        })(),
        (None, None, Some((n, p))) => (|| {
            let mut g = Obj::open(ctx, n, &p)?;
            let service_name = g.string(ctx, "service_name").unwrap_or_default();
            let authority = g.string(ctx, "authority");
            g.finish(ctx);
            Some(HealthCheckKind::Grpc {
                service_name,
                authority,
            })
        })(),
        _ => {
            ctx.error(
                o.mark,
                &o.path,
                "a health check has exactly one of `http_health_check`, `tcp_health_check` or `grpc_health_check`",
            );
            None
        }
    };
    o.finish(ctx);
    Some(HealthCheck {
        timeout,
        interval,
        interval_jitter,
        unhealthy_threshold,
        healthy_threshold,
        kind: kind?,
    })
}

pub(super) fn outlier_detection(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<OutlierDetection> {
    let mut o = Obj::open(ctx, n, p)?;
    let d = OutlierDetection::default();
    let pct = |o: &mut Obj<'_>, ctx: &mut Ctx, name: &'static str, def: u32| o.uint(ctx, name, 0, 100).unwrap_or(def);
    let r = OutlierDetection {
        consecutive_5xx: o
            .uint(ctx, "consecutive_5xx", 1, 1_000_000)
            .unwrap_or(d.consecutive_5xx),
        consecutive_gateway_failure: o
            .uint(ctx, "consecutive_gateway_failure", 1, 1_000_000)
            .unwrap_or(d.consecutive_gateway_failure),
        consecutive_local_origin_failure: o
            .uint(ctx, "consecutive_local_origin_failure", 1, 1_000_000)
            .unwrap_or(d.consecutive_local_origin_failure),
        interval: o
            .duration(ctx, "interval")
            .filter(|i| !i.is_zero())
            .unwrap_or(d.interval),
        base_ejection_time: o.duration(ctx, "base_ejection_time").unwrap_or(d.base_ejection_time),
        max_ejection_time: o.duration(ctx, "max_ejection_time").unwrap_or(d.max_ejection_time),
        max_ejection_percent: pct(&mut o, ctx, "max_ejection_percent", d.max_ejection_percent),
        enforcing_consecutive_5xx: pct(&mut o, ctx, "enforcing_consecutive_5xx", d.enforcing_consecutive_5xx),
        enforcing_consecutive_gateway_failure: pct(
            &mut o,
            ctx,
            "enforcing_consecutive_gateway_failure",
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: pct(
            &mut o,
            ctx,
            "enforcing_consecutive_local_origin_failure",
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_success_rate: pct(&mut o, ctx, "enforcing_success_rate", d.enforcing_success_rate),
        success_rate_minimum_hosts: o
            .uint(ctx, "success_rate_minimum_hosts", 1, 1_000_000)
            .unwrap_or(d.success_rate_minimum_hosts),
        success_rate_request_volume: o
            .uint(ctx, "success_rate_request_volume", 1, 1_000_000_000)
            .unwrap_or(d.success_rate_request_volume),
        success_rate_stdev_factor: o
            .uint(ctx, "success_rate_stdev_factor", 0, 100_000)
            .unwrap_or(d.success_rate_stdev_factor),
        split_external_local_origin_errors: o.bool(ctx, "split_external_local_origin_errors").unwrap_or(false),
    };
    if r.max_ejection_time < r.base_ejection_time {
        ctx.error(
            o.mark,
            &o.path.field("max_ejection_time"),
            "must not be below base_ejection_time",
        );
    }
    o.finish(ctx);
    Some(r)
}

pub(super) fn circuit_breakers(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<CircuitBreakers> {
    let mut o = Obj::open(ctx, n, p)?;
    let mut cb = CircuitBreakers::default();
    let mut seen = Vec::new();
    let items = o.list(ctx, "thresholds", |ctx, n, p| {
        let mut t = Obj::open(ctx, n, p)?;
        let prio = t
            .get("priority")
            .and_then(|(n, p)| {
                enumeration(
                    ctx,
                    n,
                    &p,
                    &[("DEFAULT", RoutingPriority::Default), ("HIGH", RoutingPriority::High)],
                )
            })
            .unwrap_or(RoutingPriority::Default);
        let d = Thresholds::default();
        let th = Thresholds {
            max_connections: t
                .uint(ctx, "max_connections", 1, u64::from(u32::MAX))
                .unwrap_or(d.max_connections),
            max_pending_requests: t
                .uint(ctx, "max_pending_requests", 0, u64::from(u32::MAX))
                .unwrap_or(d.max_pending_requests),
            max_requests: t
                .uint(ctx, "max_requests", 1, u64::from(u32::MAX))
                .unwrap_or(d.max_requests),
            max_retries: t
                .uint(ctx, "max_retries", 0, u64::from(u32::MAX))
                .unwrap_or(d.max_retries),
            retry_budget: t.get("retry_budget").and_then(|(n, p)| {
                let mut b = Obj::open(ctx, n, &p)?;
                let budget_percent = b
                    .get("budget_percent")
                    .and_then(|(n, p)| percentage(ctx, n, &p))
                    .unwrap_or(20.0);
                let min_retry_concurrency = b
                    .uint(ctx, "min_retry_concurrency", 0, u64::from(u32::MAX))
                    .unwrap_or(3);
                b.finish(ctx);
                Some(RetryBudget {
                    budget_percent,
                    min_retry_concurrency,
                })
            }),
        };
        t.finish(ctx);
        Some((prio, th, n.mark, p.clone()))
    });
    for (prio, th, mark, p) in items {
        if seen.contains(&prio) {
            ctx.error(
                mark,
                &p.field("priority"),
                "thresholds for this priority are already given",
            );
        }
        seen.push(prio);
        match prio {
            RoutingPriority::Default => cb.default = th,
            RoutingPriority::High => cb.high = th,
        }
    }
    o.finish(ctx);
    Some(cb)
}

pub(super) fn retry_policy(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<RetryPolicy> {
    let mut o = Obj::open(ctx, n, p)?;
    let retry_on = o
        .get("retry_on")
        .and_then(|(n, p)| {
            let s = string(ctx, n, &p)?;
            match RetryOn::parse(&s) {
                Ok(r) => Some(r),
                Err(e) => {
                    ctx.error(n.mark, &p, e);
                    None
                }
            }
        })
        .unwrap_or(RetryOn(0));
    let num_retries = o.uint(ctx, "num_retries", 0, 100).unwrap_or(1);
    let per_try_timeout = o.duration(ctx, "per_try_timeout").unwrap_or(Duration::ZERO);
    let (mut base_interval, mut max_interval) = (Duration::from_millis(25), None);
    if let Some((n, p)) = o.get("retry_back_off")
        && let Some(mut b) = Obj::open(ctx, n, &p)
    {
        base_interval = b.duration(ctx, "base_interval").unwrap_or(base_interval);
        max_interval = b.duration(ctx, "max_interval");
        b.finish(ctx);
    }
    if base_interval.is_zero() {
        ctx.error(
            o.mark,
            &o.path.field("retry_back_off.base_interval"),
            "must be above zero",
        );
    }
    let max_interval = max_interval.unwrap_or(base_interval * 10);
    let retriable_status_codes = o.list(ctx, "retriable_status_codes", |ctx, n, p| {
        uint::<u16>(ctx, n, p, 100, 599)
    });
    let skip_previous_hosts = o.bool(ctx, "skip_previous_hosts").unwrap_or(true);
    let host_selection_retry_max_attempts = o.uint(ctx, "host_selection_retry_max_attempts", 1, 100).unwrap_or(3);
    let retry_non_idempotent = o.bool(ctx, "retry_non_idempotent").unwrap_or(false);
    if retry_on.0 == 0 {
        ctx.error(
            o.mark,
            &o.path.field("retry_on"),
            "a retry policy needs `retry_on`, e.g. \"5xx,reset,connect-failure\"",
        );
    }
    o.finish(ctx);
    Some(RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        base_interval,
        max_interval,
        retriable_status_codes,
        skip_previous_hosts,
        host_selection_retry_max_attempts,
        retry_non_idempotent,
    })
}

pub(super) fn hash_policy(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<HashPolicy> {
    let mut o = Obj::open(ctx, n, p)?;
    let header = o.get("header").and_then(|(n, p)| {
        let mut h = Obj::open(ctx, n, &p)?;
        let name = h.req_string(ctx, "header_name").map(|s| s.to_ascii_lowercase());
        h.finish(ctx);
        name.map(HashPolicyKind::Header)
    });
    let cookie = o.get("cookie").and_then(|(n, p)| {
        let mut c = Obj::open(ctx, n, &p)?;
        let name = c.req_string(ctx, "name");
        let _ = c.get("ttl"); // Cookie generation is not done; a request without the cookie hashes randomly.
        let _ = c.get("path");
        c.finish(ctx);
        name.map(HashPolicyKind::Cookie)
    });
    let source_ip = o.get("connection_properties").and_then(|(n, p)| {
        let mut c = Obj::open(ctx, n, &p)?;
        let v = c.bool(ctx, "source_ip").unwrap_or(false);
        c.finish(ctx);
        v.then_some(HashPolicyKind::SourceIp)
    });
    let query = o.get("query_parameter").and_then(|(n, p)| {
        let mut q = Obj::open(ctx, n, &p)?;
        let name = q.req_string(ctx, "name");
        q.finish(ctx);
        name.map(HashPolicyKind::QueryParameter)
    });
    let terminal = o.bool(ctx, "terminal").unwrap_or(false);
    let kinds: Vec<HashPolicyKind> = [header, cookie, source_ip, query].into_iter().flatten().collect();
    let r = if kinds.len() == 1 {
        kinds.into_iter().next().map(|kind| HashPolicy { kind, terminal })
    } else {
        ctx.error(o.mark, &o.path, "a hash policy has exactly one of `header`, `cookie`, `connection_properties: {source_ip: true}` or `query_parameter`");
        None
    };
    o.finish(ctx);
    r
}

pub(super) fn mirror_policy(ctx: &mut Ctx, n: &YNode, p: &Path, refs: &Refs<'_>) -> Option<MirrorPolicy> {
    let mut o = Obj::open(ctx, n, p)?;
    let cluster = o.require(ctx, "cluster").and_then(|(n, p)| refs.cluster(ctx, n, &p));
    // Envoy spells the share `runtime_fraction: {default_value: {numerator, denominator}}`.
    let percentage = if let Some((n, p)) = o.get("runtime_fraction") {
        Obj::open(ctx, n, &p).and_then(|mut r| {
            let v = r
                .require(ctx, "default_value")
                .and_then(|(n, p)| percentage(ctx, n, &p));
            let _ = r.get("runtime_key");
            r.finish(ctx);
            v
        })
    } else {
        o.get("percentage")
            .and_then(|(n, p)| percentage(ctx, n, &p))
            .or(Some(100.0))
    };
    o.finish(ctx);
    Some(MirrorPolicy {
        cluster: cluster?,
        percentage: percentage?,
    })
}

/// A gRPC status: a number or a name such as `UNAVAILABLE`.
fn grpc_status(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<u8> {
    const NAMES: &[&str] = &[
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    parse_scalar(
        ctx,
        n,
        p,
        "a gRPC status code (0-16) or name such as UNAVAILABLE",
        |s| {
            s.parse::<u8>()
                .ok()
                .filter(|c| *c <= 16)
                .or_else(|| NAMES.iter().position(|x| x.eq_ignore_ascii_case(s)).map(|i| i as u8))
        },
    )
}

pub(super) fn fault(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<FaultInjection> {
    let mut o = Obj::open(ctx, n, p)?;
    let delay = o.get("delay").and_then(|(n, p)| {
        let mut d = Obj::open(ctx, n, &p)?;
        let fixed_delay = d
            .require(ctx, "fixed_delay")
            .and_then(|(n, p)| parse_scalar(ctx, n, &p, "a duration such as 5s", crate::parse_duration));
        let percentage = d
            .get("percentage")
            .and_then(|(n, p)| percentage(ctx, n, &p))
            .unwrap_or(100.0);
        d.finish(ctx);
        Some(FaultDelay {
            fixed_delay: fixed_delay?,
            percentage,
        })
    });
    let abort = o.get("abort").and_then(|(n, p)| {
        let mut a = Obj::open(ctx, n, &p)?;
        let http = a
            .get("http_status")
            .and_then(|(n, p)| uint::<u16>(ctx, n, &p, 200, 599));
        let grpc = a.get("grpc_status").and_then(|(n, p)| grpc_status(ctx, n, &p));
        let percentage = a
            .get("percentage")
            .and_then(|(n, p)| percentage(ctx, n, &p))
            .unwrap_or(100.0);
        let status = match (http, grpc) {
            (Some(h), None) => Some(AbortStatus::Http(h)),
            (None, Some(g)) => Some(AbortStatus::Grpc(g)),
            _ => {
                ctx.error(a.mark, &a.path, "an abort has one of `http_status` or `grpc_status`");
                None
            }
        };
        a.finish(ctx);
        Some(FaultAbort {
            status: status?,
            percentage,
        })
    });
    let headers = o.list(ctx, "headers", decode_header_matcher);
    if delay.is_none() && abort.is_none() && !o.has("delay") && !o.has("abort") {
        ctx.error(o.mark, &o.path, "a fault needs a `delay`, an `abort` or both");
    }
    o.finish(ctx);
    Some(FaultInjection { delay, abort, headers })
}

pub(super) fn local_rate_limit(ctx: &mut Ctx, n: &YNode, p: &Path) -> Option<LocalRateLimit> {
    let mut o = Obj::open(ctx, n, p)?;
    let bucket = o.require(ctx, "token_bucket").and_then(|(n, p)| {
        let mut b = Obj::open(ctx, n, &p)?;
        let max_tokens = b
            .require(ctx, "max_tokens")
            .and_then(|(n, p)| uint::<u32>(ctx, n, &p, 1, u64::from(u32::MAX)));
        let tokens_per_fill = b.uint(ctx, "tokens_per_fill", 1, u64::from(u32::MAX)).unwrap_or(1);
        let fill_interval = b.require(ctx, "fill_interval").and_then(|(n, p)| {
            parse_scalar(ctx, n, &p, "a duration of at least 1ms", crate::parse_duration)
                .filter(|d| *d >= Duration::from_millis(1))
        });
        b.finish(ctx);
        Some((max_tokens?, tokens_per_fill, fill_interval?))
    });
    let descriptor = o.get("descriptor").and_then(|(n, p)| {
        let mut d = Obj::open(ctx, n, &p)?;
        let header = d
            .string(ctx, "header")
            .map(|h| RateLimitKey::Header(h.to_ascii_lowercase()));
        let ip = d
            .bool(ctx, "source_ip")
            .unwrap_or(false)
            .then_some(RateLimitKey::SourceIp);
        let r = match (header, ip) {
            (Some(h), None) => Some(h),
            (None, Some(i)) => Some(i),
            _ => {
                ctx.error(
                    d.mark,
                    &d.path,
                    "a descriptor has one of `header: NAME` or `source_ip: true`",
                );
                None
            }
        };
        d.finish(ctx);
        r
    });
    let response_headers = o.bool(ctx, "response_headers").unwrap_or(true);
    let response_headers_to_add = o.list(ctx, "response_headers_to_add", super::decode_header_value_option);
    o.finish(ctx);
    let (max_tokens, tokens_per_fill, fill_interval) = bucket?;
    Some(LocalRateLimit {
        max_tokens,
        tokens_per_fill,
        fill_interval,
        descriptor,
        response_headers,
        response_headers_to_add,
    })
}

/// Endpoint extras: priority, locality and labels.
pub(super) fn endpoint_extras(ctx: &mut Ctx, o: &mut Obj<'_>) -> (u32, Option<Locality>, BTreeMap<String, String>) {
    let priority = o.uint(ctx, "priority", 0, 127).unwrap_or(0);
    let loc = o.get("locality").and_then(|(n, p)| locality(ctx, n, &p));
    let labels = o.get("labels").map(|(n, p)| labels(ctx, n, &p)).unwrap_or_default();
    (priority, loc, labels)
}

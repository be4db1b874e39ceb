//! Outlier detection (passive health checking), as Envoy does it: consecutive 5xx, consecutive
//! gateway failures, consecutive local-origin failures and success rate; ejection time growing with
//! repeated ejections; at most `max_ejection_percent` of the cluster (but at least one host) out.
//!
//! Workers record outcomes with atomics and may eject at once; the control thread sweeps every
//! `interval` to bring hosts back and to judge success rates.

use std::sync::atomic::Ordering;

use crate::cluster::{ClusterRt, Detector, FAILED_OUTLIER, Host, now_ms};
use crate::util::rand_below;

/// How a request to a host ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx response from the upstream.
    Upstream5xx(u16),
    /// Connect failure, timeout or reset: the request never got an answer.
    LocalFailure,
}

/// Records `outcome` for `host`; ejects it when a detector trips.
pub(crate) fn record(cluster: &ClusterRt, host: &Host, outcome: Outcome) {
    let Some(od) = &cluster.cfg.outlier_detection else {
        return;
    };
    let o = &host.outlier;
    o.total.fetch_add(1, Ordering::Relaxed);
    let status = match outcome {
        Outcome::Success => {
            o.success.fetch_add(1, Ordering::Relaxed);
            o.consecutive_5xx.store(0, Ordering::Relaxed);
            o.consecutive_gateway.store(0, Ordering::Relaxed);
            o.consecutive_local.store(0, Ordering::Relaxed);
            return;
        }
        Outcome::LocalFailure if od.split_external_local_origin_errors => {
            let n = o.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= od.consecutive_local_origin_failure {
                detect(
                    cluster,
                    host,
                    Detector::ConsecutiveLocalOrigin,
                    od.enforcing_consecutive_local_origin_failure,
                );
            }
            return;
        }
        // Not split: a local failure counts as the 503 the client gets.
        Outcome::LocalFailure => 503,
        Outcome::Upstream5xx(s) => s,
    };
    let n = o.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
    let gateway = if (502..=504).contains(&status) {
        o.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        o.consecutive_gateway.store(0, Ordering::Relaxed);
        0
    };
    if n >= od.consecutive_5xx && detect(cluster, host, Detector::Consecutive5xx, od.enforcing_consecutive_5xx) {
        return;
    }
    if gateway >= od.consecutive_gateway_failure {
        detect(
            cluster,
            host,
            Detector::ConsecutiveGateway,
            od.enforcing_consecutive_gateway_failure,
        );
    }
}

/// A detector tripped: count it, and eject with the `enforcing` chance (percent).
fn detect(cluster: &ClusterRt, host: &Host, det: Detector, enforcing: u32) -> bool {
    cluster.stats.outlier_ejections_detected[det as usize].inc();
    if rand_below(100) >= u64::from(enforcing) {
        return false;
    }
    eject(cluster, host, det)
}

/// Ejects `host` unless it already is, or the cluster is at its ejection limit.
pub(crate) fn eject(cluster: &ClusterRt, host: &Host, det: Detector) -> bool {
    let Some(od) = &cluster.cfg.outlier_detection else {
        return false;
    };
    let now = now_ms().max(1);
    if host
        .outlier
        .ejected_at_ms
        .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    let total = cluster.snapshot().hosts.len() as u32;
    // Envoy: at most max_ejection_percent, but always at least one host.
    let limit = (total * od.max_ejection_percent / 100).max(1);
    if cluster.ejected.fetch_add(1, Ordering::AcqRel) >= limit {
        cluster.ejected.fetch_sub(1, Ordering::AcqRel);
        host.outlier.ejected_at_ms.store(0, Ordering::Relaxed);
        cluster.stats.outlier_ejections_overflow.inc();
        return false;
    }
    host.health.fetch_or(FAILED_OUTLIER, Ordering::AcqRel);
    host.outlier.ejections.fetch_add(1, Ordering::Relaxed);
    host.outlier.consecutive_5xx.store(0, Ordering::Relaxed);
    host.outlier.consecutive_gateway.store(0, Ordering::Relaxed);
    host.outlier.consecutive_local.store(0, Ordering::Relaxed);
    let s = &cluster.stats;
    s.outlier_ejections_enforced[det as usize].inc();
    s.outlier_ejections_enforced_total.inc();
    s.outlier_ejections_active.inc();
    tracing::info!(cluster = cluster.name(), host = %host.addr, detector = ?det, "outlier ejected");
    cluster.changed.notify_one();
    true
}

/// The control thread's periodic pass: return hosts whose ejection time is over, decay the
/// ejection multiplier of well-behaved hosts, and eject success-rate outliers.
pub(crate) fn sweep(cluster: &ClusterRt) {
    let Some(od) = &cluster.cfg.outlier_detection else {
        return;
    };
    let now = now_ms();
    let hosts = cluster.hosts();
    for h in &hosts {
        let o = &h.outlier;
        let at = o.ejected_at_ms.load(Ordering::Relaxed);
        if at != 0 {
            let times = o.ejections.load(Ordering::Relaxed).max(1);
            let eject_for = (od.base_ejection_time * times).min(od.max_ejection_time.max(od.base_ejection_time));
            if now.saturating_sub(at) >= eject_for.as_millis() as u64 {
                o.ejected_at_ms.store(0, Ordering::Relaxed);
                h.health.fetch_and(!FAILED_OUTLIER, Ordering::AcqRel);
                h.warm_since_ms.store(now.max(1), Ordering::Relaxed);
                cluster.ejected.fetch_sub(1, Ordering::AcqRel);
                cluster.stats.outlier_ejections_active.dec();
                tracing::info!(cluster = cluster.name(), host = %h.addr, "outlier ejection over");
            }
        } else {
            let _ = o
                .ejections
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
    // Success rate over the interval that just ended.
    let rates: Vec<(usize, f64)> = hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let total = h.outlier.total.swap(0, Ordering::Relaxed);
            let ok = h.outlier.success.swap(0, Ordering::Relaxed);
            (h.outlier.ejected_at_ms.load(Ordering::Relaxed) == 0 && total >= u64::from(od.success_rate_request_volume))
                .then(|| (i, ok as f64 / total as f64))
        })
        .collect();
    for i in success_rate_outliers(
        &rates,
        od.success_rate_minimum_hosts as usize,
        od.success_rate_stdev_factor,
    ) {
        detect(cluster, &hosts[i], Detector::SuccessRate, od.enforcing_success_rate);
    }
}

/// Hosts whose success rate is below mean − (factor/1000) × stdev, if enough hosts have volume.
pub(crate) fn success_rate_outliers(rates: &[(usize, f64)], minimum_hosts: usize, stdev_factor: u32) -> Vec<usize> {
    if rates.len() < minimum_hosts.max(1) {
        return Vec::new();
    }
    let n = rates.len() as f64;
    let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
    let var = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
    let threshold = mean - f64::from(stdev_factor) / 1000.0 * var.sqrt();
    rates.iter().filter(|(_, r)| *r < threshold).map(|(i, _)| *i).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cluster::PickContext;
    use crate::stats::Stats;

    fn cluster(od: &str) -> ClusterRt {
        let yaml = format!(
            "clusters: [{{ name: c, outlier_detection: {{ {od} }}, endpoints: [10.0.0.1:80, 10.0.0.2:80, 10.0.0.3:80] }}]"
        );
        let cfg = tessera_model::Config::from_yaml(&yaml, "t").unwrap_or_else(|e| panic!("{e}"));
        ClusterRt::new(cfg.clusters[0].clone(), &Stats::default(), None, None)
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_each_ejection_and_decays() {
        let c =
            cluster("consecutive_5xx: 2, base_ejection_time: 30s, max_ejection_time: 300s, max_ejection_percent: 100");
        let h = c.hosts()[0].clone();
        record(&c, &h, Outcome::Upstream5xx(500));
        assert!(h.available(), "one 5xx is not enough");
        record(&c, &h, Outcome::Upstream5xx(500));
        assert!(!h.available(), "ejected on the second");
        tokio::time::advance(Duration::from_secs(29)).await;
        sweep(&c);
        assert!(!h.available(), "still out at 29s");
        tokio::time::advance(Duration::from_secs(1)).await;
        sweep(&c);
        assert!(h.available(), "back after 30s");
        // Ejected again: twice the time.
        record(&c, &h, Outcome::Upstream5xx(503));
        record(&c, &h, Outcome::Upstream5xx(503));
        assert!(!h.available());
        tokio::time::advance(Duration::from_secs(59)).await;
        sweep(&c);
        assert!(!h.available(), "the second ejection lasts 60s");
        tokio::time::advance(Duration::from_secs(1)).await;
        sweep(&c);
        assert!(h.available());
        assert_eq!(h.outlier.ejections.load(Ordering::Relaxed), 2);
        sweep(&c);
        assert_eq!(
            h.outlier.ejections.load(Ordering::Relaxed),
            1,
            "good behaviour decays the multiplier"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_is_reset_and_the_ejection_cap_holds() {
        let c = cluster("consecutive_5xx: 2, max_ejection_percent: 10");
        let hosts = c.hosts();
        record(&c, &hosts[0], Outcome::Upstream5xx(500));
        record(&c, &hosts[0], Outcome::Success);
        record(&c, &hosts[0], Outcome::Upstream5xx(500));
        assert!(hosts[0].available(), "a success in between resets the count");
        for h in &hosts {
            record(&c, h, Outcome::Upstream5xx(500));
            record(&c, h, Outcome::Upstream5xx(500));
        }
        // 10% of three hosts is zero, but one host may always be ejected.
        assert_eq!(hosts.iter().filter(|h| !h.available()).count(), 1);
        assert_eq!(c.stats.outlier_ejections_overflow.get(), 2);
        assert!(
            c.pick(&PickContext {
                max_attempts: 3,
                ..Default::default()
            })
            .is_some_and(|h| h.available())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn local_origin_failures_count_apart_when_split() {
        let c = cluster(
            "consecutive_5xx: 2, consecutive_local_origin_failure: 3, split_external_local_origin_errors: true, max_ejection_percent: 100",
        );
        let h = c.hosts()[0].clone();
        record(&c, &h, Outcome::LocalFailure);
        record(&c, &h, Outcome::LocalFailure);
        assert!(h.available(), "split: connect failures are not 5xx");
        record(&c, &h, Outcome::LocalFailure);
        assert!(!h.available());
        assert_eq!(
            c.stats.outlier_ejections_enforced[Detector::ConsecutiveLocalOrigin as usize].get(),
            1
        );
        let unsplit = cluster("consecutive_5xx: 2, max_ejection_percent: 100");
        let h = unsplit.hosts()[0].clone();
        record(&unsplit, &h, Outcome::LocalFailure);
        record(&unsplit, &h, Outcome::LocalFailure);
        assert!(!h.available(), "not split: a connect failure counts as a 503");
    }

    #[test]
    fn success_rate_outliers_follow_envoys_formula() {
        // Nine hosts at 99-100 %, one at 50 %: only the last is below mean - 1.9 stdev.
        let mut rates: Vec<(usize, f64)> = (0..9).map(|i| (i, 0.99 + 0.001 * i as f64)).collect();
        rates.push((9, 0.5));
        assert_eq!(success_rate_outliers(&rates, 5, 1900), vec![9]);
        assert!(
            success_rate_outliers(&rates[..4], 5, 1900).is_empty(),
            "too few hosts with volume"
        );
        let even: Vec<(usize, f64)> = (0..6).map(|i| (i, 0.9)).collect();
        assert!(
            success_rate_outliers(&even, 5, 1900).is_empty(),
            "no spread, no outlier"
        );
    }
}

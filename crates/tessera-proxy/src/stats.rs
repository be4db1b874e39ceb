//! Counters, gauges and latency histograms: atomics handed out once at configuration time, read by the admin API.
//!
//! The request path holds `Arc<Counter>`s and does relaxed atomic adds; only creating a stat or
//! rendering them takes the registry's lock, and both happen off the request path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    #[inline]
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub(crate) struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    #[inline]
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    #[inline]
    pub(crate) fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Sets the value.
    pub(crate) fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub(crate) fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (milliseconds) of the latency histogram buckets: Envoy's defaults.
pub(crate) const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// A latency distribution: a count per bucket (the last one is +Inf) and the sum in microseconds.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one sample.
    #[inline]
    pub(crate) fn record(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let ms = us as f64 / 1000.0;
        let i = BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Samples per bucket, not cumulative.
    fn counts(&self) -> [u64; BUCKETS_MS.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    /// The number of samples.
    pub(crate) fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// The bucket bound under which `q` (0..=1) of the samples fall, as Envoy's `P99(...)` approximates.
    fn quantile(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(BUCKETS_MS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

#[derive(Clone)]
enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

impl Metric {
    fn value(&self) -> i128 {
        match self {
            Metric::Counter(c) => i128::from(c.get()),
            Metric::Gauge(g) => i128::from(g.get()),
            Metric::Histogram(h) => i128::from(h.count()),
        }
    }

    /// The `/stats` text of the metric: a number, or Envoy-style quantiles for a histogram.
    fn text(&self) -> String {
        match self {
            Metric::Histogram(h) => {
                let counts = h.counts();
                let q = |x: f64| Histogram::quantile(&counts, x).map_or("nan".to_string(), |v| format!("{v}"));
                format!(
                    "P50({}) P90({}) P99({}) P100({}) count({})",
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    q(1.0),
                    counts.iter().sum::<u64>()
                )
            }
            m => m.value().to_string(),
        }
    }
}

struct Entry {
    metric: Metric,
    /// Prometheus family name, e.g. `envoy_cluster_upstream_rq_total`.
    family: String,
    /// Prometheus labels, e.g. `envoy_cluster_name="backend"`.
    labels: String,
}

/// A naming scope: `cluster.backend.` in Envoy's text form, `envoy_cluster_*{envoy_cluster_name="backend"}`
/// in Prometheus form.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    text: String,
    family: String,
    labels: String,
}

impl Scope {
    /// A scope with no tag, e.g. `server.`.
    pub(crate) fn plain(prefix: &str) -> Scope {
        Scope {
            text: format!("{prefix}."),
            family: format!("envoy_{prefix}_"),
            labels: String::new(),
        }
    }

    /// A tagged scope, e.g. `cluster.<name>.` tagged `envoy_cluster_name`.
    pub(crate) fn tagged(prefix: &str, tag: &str, value: &str) -> Scope {
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        Scope {
            text: format!("{prefix}.{value}."),
            family: format!("envoy_{prefix}_"),
            labels: format!("{tag}=\"{escaped}\""),
        }
    }
}

impl Scope {
    /// This scope with one more tag: `<text><value>.` and `,tag="value"`.
    pub(crate) fn child(&self, tag: &str, value: &str) -> Scope {
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let sep = if self.labels.is_empty() { "" } else { "," };
        Scope {
            text: format!("{}{value}.", self.text),
            family: self.family.clone(),
            labels: format!("{}{sep}{tag}=\"{escaped}\"", self.labels),
        }
    }
}

/// All stats of one server.
#[derive(Default)]
pub(crate) struct Stats {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Stats {
    /// The counter `name` in `scope`, created on first use; the same name always gives the same counter,
    /// so counts survive configuration reloads.
    pub(crate) fn counter(&self, scope: &Scope, name: &str) -> Arc<Counter> {
        match self.get_or_insert(scope, name, || Metric::Counter(Arc::default())) {
            Metric::Counter(c) => c,
            _ => Arc::default(),
        }
    }

    /// The gauge `name` in `scope`, created on first use.
    pub(crate) fn gauge(&self, scope: &Scope, name: &str) -> Arc<Gauge> {
        match self.get_or_insert(scope, name, || Metric::Gauge(Arc::default())) {
            Metric::Gauge(g) => g,
            _ => Arc::default(),
        }
    }

    /// The latency histogram `name` in `scope`, created on first use.
    pub(crate) fn histogram(&self, scope: &Scope, name: &str) -> Arc<Histogram> {
        match self.get_or_insert(scope, name, || Metric::Histogram(Arc::default())) {
            Metric::Histogram(h) => h,
            _ => Arc::default(),
        }
    }

    fn get_or_insert(&self, scope: &Scope, name: &str, make: impl FnOnce() -> Metric) -> Metric {
        let key = format!("{}{name}", scope.text);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| Entry {
                metric: make(),
                family: sanitize(&format!("{}{name}", scope.family)),
                labels: scope.labels.clone(),
            })
            .metric
            .clone()
    }

    /// The value of the stat with the full text name, if it exists.
    pub(crate) fn value(&self, name: &str) -> Option<i128> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|e| e.metric.value())
    }

    /// Envoy's `/stats` text: `name: value` per line, sorted; `filter` keeps names it matches.
    pub(crate) fn render_text(&self, filter: Option<&regex::Regex>) -> String {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(map.len() * 48);
        for (name, e) in map.iter() {
            if filter.is_some_and(|f| !f.is_match(name)) {
                continue;
            }
            let _ = writeln!(out, "{name}: {}", e.metric.text());
        }
        out
    }

    /// JSON: `{"stats": [{"name": ..., "value": ...}]}`, as Envoy's `/stats?format=json`.
    pub(crate) fn render_json(&self, filter: Option<&regex::Regex>) -> serde_json::Value {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let stats: Vec<serde_json::Value> = map
            .iter()
            .filter(|(n, _)| filter.is_none_or(|f| f.is_match(n)))
            .map(|(n, e)| serde_json::json!({"name": n, "value": e.metric.value() as i64}))
            .collect();
        serde_json::json!({ "stats": stats })
    }

    /// Prometheus text exposition, one `# TYPE` line per family.
    pub(crate) fn render_prometheus(&self) -> String {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // family -> (is a counter, [(labels, value)])
        type Family<'a> = (bool, Vec<(&'a str, i128)>);
        let mut families: BTreeMap<&str, Family<'_>> = BTreeMap::new();
        for e in map.values().filter(|e| !matches!(e.metric, Metric::Histogram(_))) {
            let is_counter = matches!(e.metric, Metric::Counter(_));
            families
                .entry(&e.family)
                .or_insert((is_counter, Vec::new()))
                .1
                .push((&e.labels, e.metric.value()));
        }
        let mut out = String::with_capacity(map.len() * 64);
        let mut histograms: BTreeMap<&str, Vec<(&str, &Histogram)>> = BTreeMap::new();
        for e in map.values() {
            if let Metric::Histogram(h) = &e.metric {
                histograms.entry(&e.family).or_default().push((&e.labels, h));
            }
        }
        for (family, samples) in histograms {
            let _ = writeln!(out, "# TYPE {family} histogram");
            for (labels, h) in samples {
                let sep = if labels.is_empty() { "" } else { "," };
                let counts = h.counts();
                let mut cum = 0;
                for (i, c) in counts.iter().enumerate() {
                    cum += c;
                    let le = BUCKETS_MS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                    let _ = writeln!(out, "{family}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
                }
                let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1000.0;
                let braces = |s: &str| {
                    if s.is_empty() {
                        String::new()
                    } else {
                        format!("{{{s}}}")
                    }
                };
                let _ = writeln!(out, "{family}_sum{} {sum}", braces(labels));
                let _ = writeln!(out, "{family}_count{} {cum}", braces(labels));
            }
        }
        for (family, (is_counter, samples)) in families {
            let _ = writeln!(out, "# TYPE {family} {}", if is_counter { "counter" } else { "gauge" });
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{family} {v}");
                } else {
                    let _ = writeln!(out, "{family}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_counter_and_both_renderings() {
        let s = Stats::default();
        let scope = Scope::tagged("cluster", "envoy_cluster_name", "web");
        let a = s.counter(&scope, "upstream_rq_total");
        let b = s.counter(&scope, "upstream_rq_total");
        a.inc();
        b.add(2);
        let g = s.gauge(&Scope::plain("server"), "live");
        g.set(1);
        assert_eq!(s.value("cluster.web.upstream_rq_total"), Some(3));
        let text = s.render_text(None);
        assert!(text.contains("cluster.web.upstream_rq_total: 3\n"), "{text}");
        assert!(text.contains("server.live: 1\n"), "{text}");
        let prom = s.render_prometheus();
        assert!(prom.contains("# TYPE envoy_cluster_upstream_rq_total counter\nenvoy_cluster_upstream_rq_total{envoy_cluster_name=\"web\"} 3\n"), "{prom}");
        assert!(
            prom.contains("# TYPE envoy_server_live gauge\nenvoy_server_live 1\n"),
            "{prom}"
        );
        let h = s.histogram(&scope.child("rpc_method", "echo"), "rq_time");
        h.record(std::time::Duration::from_micros(700));
        h.record(std::time::Duration::from_millis(20));
        let prom = s.render_prometheus();
        assert!(prom.contains("# TYPE envoy_cluster_rq_time histogram\n"), "{prom}");
        assert!(
            prom.contains(
                "envoy_cluster_rq_time_bucket{envoy_cluster_name=\"web\",rpc_method=\"echo\",le=\"0.5\"} 0\n"
            ),
            "{prom}"
        );
        assert!(
            prom.contains("envoy_cluster_rq_time_bucket{envoy_cluster_name=\"web\",rpc_method=\"echo\",le=\"1\"} 1\n"),
            "{prom}"
        );
        assert!(
            prom.contains("envoy_cluster_rq_time_bucket{envoy_cluster_name=\"web\",rpc_method=\"echo\",le=\"25\"} 2\n"),
            "{prom}"
        );
        assert!(
            prom.contains("envoy_cluster_rq_time_count{envoy_cluster_name=\"web\",rpc_method=\"echo\"} 2\n"),
            "{prom}"
        );
        assert!(
            prom.contains("envoy_cluster_rq_time_sum{envoy_cluster_name=\"web\",rpc_method=\"echo\"} 20.7\n"),
            "{prom}"
        );
        assert!(
            s.render_text(None)
                .contains("cluster.web.echo.rq_time: P50(1) P90(25) P99(25) P100(25) count(2)\n"),
            "{}",
            s.render_text(None)
        );
        let re = regex::Regex::new("^server").unwrap();
        assert_eq!(s.render_text(Some(&re)), "server.live: 1\n");
    }
}

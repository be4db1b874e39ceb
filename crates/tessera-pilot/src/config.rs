//! `pilot.yaml`:
//!
//! ```yaml
//! xds:
//!   listen: 127.0.0.1:15010          # the ADS server (state of the world and delta)
//! registries:
//!   file: { dir: services, watch_interval: 1s }   # relative to this file
//!   api: { listen: 127.0.0.1:15080 }               # the Open Service Registry REST API
//! store:
//!   path: pilot.redb                 # API registrations survive restarts (absent: memory only)
//!   # or, shared by every Pilot replica (see crate::etcd):
//!   # etcd: { endpoints: [http://127.0.0.1:2379], prefix: /tessera/registry }
//! push:
//!   debounce: 100ms                  # quiet period before a push
//!   debounce_max: 1s                 # longest a change waits
//! sidecar:
//!   outbound_http: 127.0.0.1:15001   # the HTTP listener every sidecar gets
//!   outbound_dubbo: 127.0.0.1:20880  # the Dubbo listener every sidecar gets (absent: none)
//!   imports:                         # per namespace, Istio Sidecar egress hosts (absent: `*/*`)
//!     shop: ["./*", "shared/*"]
//! config: { dir: istio, watch_interval: 1s }  # Istio VirtualService, DestinationRule... (relative to this file)
//! admin:
//!   listen: 127.0.0.1:15014          # /debug/syncz, /ready (absent: no admin API)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::Problem;

/// Pilot's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The ADS server's address.
    pub xds_listen: SocketAddr,
    /// The file registry's directory.
    pub file_dir: Option<PathBuf>,
    /// How often it is read for changes.
    pub watch_interval: Duration,
    /// Quiet period before a push.
    pub debounce: Duration,
    /// Longest a change waits.
    pub debounce_max: Duration,
    /// What sidecars get.
    pub sidecar: crate::translate::SidecarSettings,
    /// The admin API's address, if any.
    pub admin: Option<SocketAddr>,
    /// The Open Service Registry API's address, if any.
    pub api: Option<SocketAddr>,
    /// The redb file the API's registrations persist in; memory only when absent.
    pub store: Option<PathBuf>,
    /// The etcd store the API's registrations live in, shared by Pilot replicas (`store.etcd`).
    pub store_etcd: Option<crate::etcd::EtcdConfig>,
    /// The Istio config directory (`config.dir`), if any.
    pub istio_dir: Option<PathBuf>,
    /// How often it is read for changes.
    pub istio_watch_interval: Duration,
    /// The outbound Dubbo listener's address, if any.
    pub outbound_dubbo: Option<SocketAddr>,
    /// What each namespace's sidecars import.
    pub imports: crate::scope::Imports,
    /// The registry adapters (`registries.zookeeper`, `registries.etcd`...).
    pub adapters: Vec<std::sync::Arc<dyn crate::registry::Adapter>>,
}

/// A duration in whole `ms`, `s` or `m` (`100ms`, `2s`, `1m`), as Pilot's config files write
/// them; None for anything else, or one too long to hold.
pub(crate) fn duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i))?;
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

impl Config {
    /// Reads and checks `path`; every problem is listed with its field.
    pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Problem {
                file: file.clone(),
                path: "(file)".into(),
                reason: format!("cannot read: {e}"),
            }]
        })?;
        Self::from_yaml(&text, &file, path.parent().unwrap_or(Path::new(".")))
    }

    /// [`Config::load`] of `text`, named `file` in problems, relative paths from `base`.
    pub fn from_yaml(text: &str, file: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        let file = file.to_string();
        let problem = |p: &str, r: String| Problem {
            file: file.clone(),
            path: p.to_string(),
            reason: r,
        };
        let doc =
            tessera_xds::load::yaml_to_json(text).map_err(|e| vec![problem("(file)", format!("not YAML: {e}"))])?;
        let mut problems = Vec::new();
        let mut get = |ptr: &str, field: &str| -> Option<String> {
            match doc.pointer(ptr) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => {
                    problems.push(problem(field, format!("expected a string, not {v}")));
                    None
                }
            }
        };
        let addr = |s: Option<String>, field: &str, default: &str, problems: &mut Vec<Problem>| -> SocketAddr {
            let s = s.unwrap_or_else(|| default.to_string());
            s.parse().unwrap_or_else(|_| {
                problems.push(problem(field, format!("`{s}` is not an IP:port address")));
                default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            })
        };
        let xds = get("/xds/listen", "xds.listen");
        let dir = get("/registries/file/dir", "registries.file.dir");
        let watch = get("/registries/file/watch_interval", "registries.file.watch_interval");
        let debounce = get("/push/debounce", "push.debounce");
        let debounce_max = get("/push/debounce_max", "push.debounce_max");
        let outbound = get("/sidecar/outbound_http", "sidecar.outbound_http");
        let admin = get("/admin/listen", "admin.listen");
        let api = get("/registries/api/listen", "registries.api.listen");
        let store = get("/store/path", "store.path");
        let istio_dir = get("/config/dir", "config.dir");
        let istio_watch = get("/config/watch_interval", "config.watch_interval");
        if let Some(o) = doc.pointer("/push").and_then(Value::as_object) {
            for k in o.keys().filter(|k| !["debounce", "debounce_max"].contains(&k.as_str())) {
                problems.push(problem(
                    &format!("push.{k}"),
                    "unknown field (known: debounce, debounce_max)".into(),
                ));
            }
        }
        if let Some(o) = doc.pointer("/config").and_then(Value::as_object) {
            for k in o.keys().filter(|k| !["dir", "watch_interval"].contains(&k.as_str())) {
                problems.push(problem(
                    &format!("config.{k}"),
                    "unknown field (known: dir, watch_interval)".into(),
                ));
            }
        }
        if let Some(o) = doc.as_object() {
            for k in o.keys() {
                if !["xds", "registries", "push", "sidecar", "admin", "store", "config"].contains(&k.as_str()) {
                    problems.push(problem(
                        k,
                        "unknown field (known: xds, registries, push, sidecar, admin, store, config)".into(),
                    ));
                }
            }
        }
        let dur = |v: Option<String>, field: &str, default: Duration, problems: &mut Vec<Problem>| match v {
            None => default,
            Some(s) => duration(&s).unwrap_or_else(|| {
                problems.push(problem(field, format!("`{s}` is not a duration such as 100ms or 1s")));
                default
            }),
        };
        let cfg = Config {
            xds_listen: addr(xds, "xds.listen", "127.0.0.1:15010", &mut problems),
            file_dir: dir.map(|d| base.join(d)),
            watch_interval: dur(
                watch,
                "registries.file.watch_interval",
                Duration::from_secs(1),
                &mut problems,
            ),
            debounce: dur(debounce, "push.debounce", Duration::from_millis(100), &mut problems),
            debounce_max: dur(debounce_max, "push.debounce_max", Duration::from_secs(1), &mut problems),
            sidecar: crate::translate::SidecarSettings {
                outbound_http: addr(outbound, "sidecar.outbound_http", "127.0.0.1:15001", &mut problems),
            },
            admin: admin.map(|a| addr(Some(a), "admin.listen", "127.0.0.1:15014", &mut problems)),
            api: api.map(|a| addr(Some(a), "registries.api.listen", "127.0.0.1:15080", &mut problems)),
            store: store.map(|p| base.join(p)),
            store_etcd: None,
            istio_dir: istio_dir.map(|d| base.join(d)),
            istio_watch_interval: dur(
                istio_watch,
                "config.watch_interval",
                Duration::from_secs(1),
                &mut problems,
            ),
            outbound_dubbo: None,
            imports: crate::scope::Imports::default(),
            adapters: Vec::new(),
        };
        let mut cfg = cfg;
        if let Some(st) = doc.pointer("/store").and_then(Value::as_object) {
            for k in st.keys().filter(|k| !["path", "etcd"].contains(&k.as_str())) {
                problems.push(problem(
                    &format!("store.{k}"),
                    "unknown field (known: path, etcd)".into(),
                ));
            }
            if let Some(v) = st.get("etcd").filter(|v| !v.is_null()) {
                if st.contains_key("path") {
                    problems.push(problem(
                        "store.etcd",
                        "give `path` (one Pilot's own file) or `etcd` (shared by replicas), not both".into(),
                    ));
                }
                match crate::etcd::EtcdConfig::parse(v, &file, "store.etcd", false) {
                    Ok(c) => cfg.store_etcd = Some(c),
                    Err(p) => problems.extend(p),
                }
            }
        }
        if let Some(sc) = doc.pointer("/sidecar").and_then(Value::as_object) {
            for k in sc.keys() {
                if !["outbound_http", "outbound_dubbo", "imports"].contains(&k.as_str()) {
                    problems.push(problem(
                        &format!("sidecar.{k}"),
                        "unknown field (known: outbound_http, outbound_dubbo, imports)".into(),
                    ));
                }
            }
        }
        match doc.pointer("/sidecar/outbound_dubbo") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => match s.parse() {
                Ok(a) => cfg.outbound_dubbo = Some(a),
                Err(_) => problems.push(problem(
                    "sidecar.outbound_dubbo",
                    format!("`{s}` is not an IP:port address"),
                )),
            },
            Some(v) => problems.push(problem("sidecar.outbound_dubbo", format!("expected a string, not {v}"))),
        }
        match doc.pointer("/sidecar/imports") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (ns, list) in m {
                    let at = format!("sidecar.imports.{ns}");
                    let Some(list) = list.as_array() else {
                        problems.push(problem(&at, "expected a list of NAMESPACE/HOST patterns".into()));
                        continue;
                    };
                    let mut pats = Vec::new();
                    for (i, p) in list.iter().enumerate() {
                        match p.as_str().map(|s| (s, crate::scope::check_pattern(s))) {
                            Some((s, Ok(()))) => pats.push(s.to_string()),
                            Some((_, Err(e))) => problems.push(problem(&format!("{at}[{i}]"), e)),
                            None => problems.push(problem(&format!("{at}[{i}]"), "expected a string".into())),
                        }
                    }
                    cfg.imports.0.insert(ns.clone(), pats);
                }
            }
            Some(v) => problems.push(problem(
                "sidecar.imports",
                format!("expected a mapping of namespace to patterns, not {v}"),
            )),
        }
        if let Some(regs) = doc.pointer("/registries").and_then(Value::as_object) {
            for (kind, v) in regs {
                if kind == "file" || kind == "api" {
                    continue;
                }
                if !crate::registry::KINDS.contains(&kind.as_str()) {
                    problems.push(problem(
                        &format!("registries.{kind}"),
                        format!(
                            "unknown registry (known: file, api, {})",
                            crate::registry::KINDS.join(", ")
                        ),
                    ));
                    continue;
                }
                match crate::registry::from_config(kind, v, &file, base) {
                    Ok(a) => cfg.adapters.push(a),
                    Err(p) => problems.extend(p),
                }
            }
        }
        // A replica on the shared etcd store serves what others registered, even without its own API.
        if cfg.file_dir.is_none() && cfg.api.is_none() && cfg.adapters.is_empty() && cfg.store_etcd.is_none() {
            problems.push(problem(
                "registries",
                format!(
                    "a registry is required: `file: {{ dir: ... }}`, `api: {{ listen: ... }}` or one of {}",
                    crate::registry::KINDS.join(", ")
                ),
            ));
        }
        if problems.is_empty() { Ok(cfg) } else { Err(problems) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole ms, s and m; anything else, or a minute count too large to hold, is no duration
    /// (not a panic).
    #[test]
    fn durations_in_config_files() {
        assert_eq!(duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(duration("3m"), Some(Duration::from_secs(180)));
        for bad in ["", "2", "s", "1.5s", "2h", "-1s", "999999999999999999m"] {
            assert_eq!(duration(bad), None, "{bad:?}");
        }
    }

    /// A misspelt push setting is named, not silently ignored.
    #[test]
    fn unknown_push_fields_are_refused() {
        let e = Config::from_yaml(
            "registries: { file: { dir: s } }\npush: { debounce: 50ms, debounce_mx: 1s }\n",
            "pilot.yaml",
            Path::new("."),
        )
        .err()
        .unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            (e[0].file.as_str(), e[0].path.as_str()),
            ("pilot.yaml", "push.debounce_mx")
        );
        assert!(
            e[0].reason.contains("unknown field (known: debounce, debounce_max)"),
            "{e:?}"
        );
        assert!(
            Config::from_yaml(
                "registries: { file: { dir: s } }\npush: { debounce: 50ms, debounce_max: 1s }\n",
                "p",
                Path::new(".")
            )
            .is_ok()
        );
    }
}

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
//! push:
//!   debounce: 100ms                  # quiet period before a push
//!   debounce_max: 1s                 # longest a change waits
//! sidecar:
//!   outbound_http: 127.0.0.1:15001   # the HTTP listener every sidecar gets
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
    /// The registry adapters (`registries.zookeeper`, `registries.etcd`...).
    pub adapters: Vec<std::sync::Arc<dyn crate::registry::Adapter>>,
}

fn duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i))?;
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

impl Config {
    /// Reads and checks `path`; every problem is listed with its field.
    pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
        let file = path.display().to_string();
        let problem = |p: &str, r: String| Problem {
            file: file.clone(),
            path: p.to_string(),
            reason: r,
        };
        let text = std::fs::read_to_string(path).map_err(|e| vec![problem("(file)", format!("cannot read: {e}"))])?;
        let doc =
            tessera_xds::load::yaml_to_json(&text).map_err(|e| vec![problem("(file)", format!("not YAML: {e}"))])?;
        let base = path.parent().unwrap_or(Path::new("."));
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
        if let Some(o) = doc.as_object() {
            for k in o.keys() {
                if !["xds", "registries", "push", "sidecar", "admin", "store"].contains(&k.as_str()) {
                    problems.push(problem(
                        k,
                        "unknown field (known: xds, registries, push, sidecar, admin, store)".into(),
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
            adapters: Vec::new(),
        };
        let mut cfg = cfg;
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
        if cfg.file_dir.is_none() && cfg.api.is_none() && cfg.adapters.is_empty() {
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

//! The file registry: a directory of YAML files, each listing services and their instances,
//! read again whenever a file changes. A file with a problem keeps its last good content in
//! force (the problem is logged with the file, the field and the reason).
//!
//! ```yaml
//! services:
//! - name: reviews
//!   namespace: default             # default: default
//!   labels: { app: reviews }
//!   ports: [{ name: http, port: 9080, protocol: http }]   # http | http2 | grpc | tcp | bolt | dubbo
//!   instances:
//!   - { address: 10.0.0.7, port: 9080, labels: { version: v1 }, weight: 1 }
//!   - { address: 10.0.0.8, ports: { http: 19080 }, healthy: false, locality: us-east/us-east-1a }
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::Problem;
use crate::model::{Instance, Port, Protocol, Service, Snapshot};

struct Ctx<'a> {
    file: &'a str,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn add(&mut self, path: &str, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            path: path.to_string(),
            reason: reason.into(),
        });
    }

    fn fields<'v>(&mut self, v: &'v Value, at: &str, known: &[&str]) -> Option<&'v serde_json::Map<String, Value>> {
        let Some(o) = v.as_object() else {
            self.add(at, "expected a mapping");
            return None;
        };
        for k in o.keys() {
            if !known.contains(&k.as_str()) {
                self.add(
                    &format!("{at}.{k}"),
                    format!("unknown field (known: {})", known.join(", ")),
                );
            }
        }
        Some(o)
    }

    fn string(&mut self, o: &serde_json::Map<String, Value>, at: &str, key: &str) -> Option<String> {
        match o.get(key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => {
                self.add(&format!("{at}.{key}"), "expected a non-empty string");
                None
            }
        }
    }

    fn labels(&mut self, o: &serde_json::Map<String, Value>, at: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match o.get("labels") {
            None => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        Value::Number(n) => {
                            out.insert(k.clone(), n.to_string());
                        }
                        Value::Bool(b) => {
                            out.insert(k.clone(), b.to_string());
                        }
                        _ => self.add(&format!("{at}.labels.{k}"), "a label value is a string"),
                    }
                }
            }
            Some(_) => self.add(&format!("{at}.labels"), "expected a mapping of strings"),
        }
        out
    }

    fn port(&mut self, v: Option<&Value>, at: &str) -> Option<u16> {
        match v
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
        {
            Some(p) => Some(p),
            None => {
                self.add(at, "a port from 1 to 65535 is required");
                None
            }
        }
    }
}

/// Parses one file's text into services and instances; every problem is listed.
pub fn parse(text: &str, file: &str, source: &str) -> Result<Snapshot, Vec<Problem>> {
    match tessera_xds::load::yaml_to_json(text) {
        Ok(doc) => parse_value(&doc, file, source),
        Err(e) => Err(vec![Problem {
            file: file.to_string(),
            path: "(file)".into(),
            reason: format!("not YAML: {e}"),
        }]),
    }
}

/// [`parse`] on a document already read (the registry API's JSON bodies use the same checks).
pub fn parse_value(doc: &Value, file: &str, source: &str) -> Result<Snapshot, Vec<Problem>> {
    let mut cx = Ctx {
        file,
        problems: Vec::new(),
    };
    let mut snap = Snapshot::default();
    let Some(top) = cx.fields(doc, "(top)", &["services"]) else {
        return Err(cx.problems);
    };
    let list: &[Value] = match top.get("services") {
        Some(Value::Array(a)) => a,
        Some(_) => {
            cx.add("services", "expected a list");
            &[]
        }
        None => &[],
    };
    for (i, s) in list.iter().enumerate() {
        let at = format!("services[{i}]");
        let Some(o) = cx.fields(s, &at, &["name", "namespace", "labels", "ports", "instances"]) else {
            continue;
        };
        let name = cx.string(o, &at, "name");
        if o.get("name").is_none() {
            cx.add(&format!("{at}.name"), "a service needs a name");
        }
        let namespace = if o.contains_key("namespace") {
            cx.string(o, &at, "namespace")
        } else {
            Some("default".to_string())
        };
        let labels = cx.labels(o, &at);
        let mut ports: Vec<Port> = Vec::new();
        match o.get("ports") {
            Some(Value::Array(ps)) if !ps.is_empty() => {
                for (pi, p) in ps.iter().enumerate() {
                    let pat = format!("{at}.ports[{pi}]");
                    let Some(po) = cx.fields(p, &pat, &["name", "port", "protocol"]) else {
                        continue;
                    };
                    let port = cx.port(po.get("port"), &format!("{pat}.port"));
                    let protocol = match po.get("protocol") {
                        None => Some(Protocol::Http),
                        Some(Value::String(s)) => {
                            let p = Protocol::NAMES
                                .iter()
                                .find(|(n, _)| n.eq_ignore_ascii_case(s))
                                .map(|(_, p)| *p);
                            if p.is_none() {
                                cx.add(
                                    &format!("{pat}.protocol"),
                                    format!("unknown protocol `{s}` (use http, http2, grpc, tcp, bolt or dubbo)"),
                                );
                            }
                            p
                        }
                        Some(_) => {
                            cx.add(&format!("{pat}.protocol"), "expected a string");
                            None
                        }
                    };
                    let pname = if po.contains_key("name") {
                        cx.string(po, &pat, "name")
                    } else {
                        port.map(|p| p.to_string())
                    };
                    if let (Some(name), Some(port), Some(protocol)) = (pname, port, protocol) {
                        if ports.iter().any(|x| x.name == name) {
                            cx.add(&format!("{pat}.name"), format!("port name `{name}` is used twice"));
                        } else if ports.iter().any(|x| x.port == port) {
                            cx.add(&format!("{pat}.port"), format!("port {port} is declared twice"));
                        } else {
                            ports.push(Port { name, port, protocol });
                        }
                    }
                }
            }
            _ => cx.add(&format!("{at}.ports"), "a service needs a list of ports"),
        }
        let mut instances = Vec::new();
        if let Some(list) = o.get("instances") {
            let Some(list) = list.as_array() else {
                cx.add(&format!("{at}.instances"), "expected a list");
                continue;
            };
            for (ii, inst) in list.iter().enumerate() {
                let iat = format!("{at}.instances[{ii}]");
                let Some(io) = cx.fields(
                    inst,
                    &iat,
                    &["address", "port", "ports", "labels", "weight", "healthy", "locality"],
                ) else {
                    continue;
                };
                let address = match io.get("address").and_then(Value::as_str).map(str::parse::<IpAddr>) {
                    Some(Ok(a)) => Some(a),
                    Some(Err(_)) | None => {
                        cx.add(&format!("{iat}.address"), "an IP address is required");
                        None
                    }
                };
                let mut iports = BTreeMap::new();
                match (io.get("port"), io.get("ports")) {
                    (Some(p), None) => {
                        // One number for every service port (the common single-port case).
                        if let Some(p) = cx.port(Some(p), &format!("{iat}.port")) {
                            for sp in &ports {
                                iports.insert(sp.name.clone(), p);
                            }
                        }
                    }
                    (None, Some(Value::Object(m))) => {
                        for (k, v) in m {
                            if !ports.iter().any(|sp| sp.name == *k) {
                                cx.add(
                                    &format!("{iat}.ports.{k}"),
                                    format!("the service has no port named `{k}`"),
                                );
                                continue;
                            }
                            if let Some(p) = cx.port(Some(v), &format!("{iat}.ports.{k}")) {
                                iports.insert(k.clone(), p);
                            }
                        }
                    }
                    (None, None) => {
                        // The instance listens on the service's own ports.
                        for sp in &ports {
                            iports.insert(sp.name.clone(), sp.port);
                        }
                    }
                    _ => cx.add(&iat, "give `port` or `ports` (by service port name), not both"),
                }
                let weight = match io.get("weight") {
                    None => 1,
                    Some(v) => match v.as_u64().filter(|w| (1..=128).contains(w)) {
                        Some(w) => w as u32,
                        None => {
                            cx.add(&format!("{iat}.weight"), "a weight from 1 to 128");
                            1
                        }
                    },
                };
                let healthy = match io.get("healthy") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        cx.add(&format!("{iat}.healthy"), "expected true or false");
                        true
                    }
                };
                let locality = match io.get("locality") {
                    None => None,
                    Some(Value::String(s)) => {
                        let mut parts = s.splitn(3, '/').map(str::to_string);
                        Some((
                            parts.next().unwrap_or_default(),
                            parts.next().unwrap_or_default(),
                            parts.next().unwrap_or_default(),
                        ))
                    }
                    Some(_) => {
                        cx.add(&format!("{iat}.locality"), "expected `region/zone/sub_zone`");
                        None
                    }
                };
                let labels = cx.labels(io, &iat);
                if let Some(address) = address {
                    instances.push(Instance {
                        address,
                        ports: iports,
                        labels,
                        weight,
                        healthy,
                        locality,
                        source: source.to_string(),
                    });
                }
            }
        }
        if let (Some(name), Some(namespace)) = (name, namespace) {
            let key = format!("{namespace}/{name}");
            if snap.services.contains_key(&key) {
                cx.add(&format!("{at}.name"), format!("service `{key}` is defined twice"));
                continue;
            }
            snap.services.insert(
                key.clone(),
                Service {
                    namespace,
                    name,
                    ports,
                    labels,
                    source: source.to_string(),
                },
            );
            snap.instances.insert(key, std::sync::Arc::new(instances));
        }
    }
    if cx.problems.is_empty() {
        Ok(snap)
    } else {
        Err(cx.problems)
    }
}

/// A watched directory of YAML files as last read: each file's bytes (to notice changes) and
/// what its last good content gave. A file with a problem keeps its last good content in force
/// (the problems are logged); a file removed takes its content with it. The file registry and
/// the Istio config directory both read this way.
#[derive(Debug)]
pub struct DirWatch<T> {
    /// What the files are, in logs (`registry`, `Istio config`).
    what: &'static str,
    seen: BTreeMap<PathBuf, Vec<u8>>,
    /// Per file, what its last good content gave.
    pub good: BTreeMap<PathBuf, T>,
}

impl<T> DirWatch<T> {
    /// An empty watch; `what` names the files in logs.
    pub fn new(what: &'static str) -> Self {
        DirWatch {
            what,
            seen: BTreeMap::new(),
            good: BTreeMap::new(),
        }
    }

    /// Reads `dir` again; a file whose bytes changed goes through `parse(text, file name)`.
    /// True when what `good` holds changed.
    pub fn refresh(&mut self, dir: &Path, parse: impl Fn(&str, &str) -> Result<T, Vec<Problem>>) -> bool {
        let list = match files(dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the {} directory; keeping what was read before", self.what);
                return false;
            }
        };
        let mut changed = false;
        let gone: Vec<PathBuf> = self.seen.keys().filter(|p| !list.contains(p)).cloned().collect();
        for p in gone {
            self.seen.remove(&p);
            changed |= self.good.remove(&p).is_some();
        }
        for p in list {
            let Ok(bytes) = std::fs::read(&p) else { continue };
            if self.seen.get(&p) == Some(&bytes) {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            self.seen.insert(p.clone(), bytes);
            match parse(&text, &p.display().to_string()) {
                Ok(v) => {
                    tracing::info!(file = %p.display(), "{} file accepted", self.what);
                    self.good.insert(p, v);
                    changed = true;
                }
                Err(problems) => {
                    for pr in problems {
                        tracing::error!("{} file rejected; its last good content stays: {pr}", self.what);
                    }
                }
            }
        }
        changed
    }
}

/// The YAML files of a directory, sorted.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    out.sort();
    Ok(out)
}

/// Merges per-file snapshots; a service defined by two files is kept from the first (by file
/// name) and reported.
pub fn merge(parts: &BTreeMap<PathBuf, Snapshot>) -> (Snapshot, Vec<String>) {
    let mut all = Snapshot::default();
    let mut clashes = Vec::new();
    for (f, s) in parts {
        for (k, svc) in &s.services {
            if let Some(first) = all.services.get(k) {
                clashes.push(format!(
                    "{}: service `{k}` is already defined by {}; this definition is ignored",
                    f.display(),
                    first.source
                ));
                continue;
            }
            all.services.insert(k.clone(), svc.clone());
            all.instances
                .insert(k.clone(), s.instances.get(k).cloned().unwrap_or_default());
        }
    }
    (all, clashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_parses_with_defaults() {
        let s = parse(
            "services:\n- name: reviews\n  ports: [{ name: http, port: 9080 }]\n  instances:\n  - { address: 10.0.0.7, port: 19080, labels: { version: v1 } }\n  - { address: 10.0.0.8 }\n",
            "a.yaml",
            "file:a.yaml",
        )
        .unwrap();
        let svc = &s.services["default/reviews"];
        assert_eq!(svc.hostname(), "reviews.default.svc.cluster.local");
        assert_eq!(svc.ports[0].protocol, Protocol::Http);
        let i = &s.instances["default/reviews"];
        assert_eq!(i[0].ports["http"], 19080);
        assert_eq!(
            i[1].ports["http"], 9080,
            "an instance without ports listens on the service's"
        );
        assert_eq!(i[0].labels["version"], "v1");
    }

    #[test]
    fn every_problem_is_named_with_file_and_path() {
        let e = parse(
            "services:\n- name: x\n  ports: [{ name: http, port: 80 }, { name: http, port: 81 }, { name: x, port: 82, protocol: htp }]\n  instances:\n  - { address: nowhere, ports: { grpc: 1 }, weight: 500, colour: red }\n",
            "bad.yaml",
            "file:bad.yaml",
        )
        .unwrap_err();
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        for want in [
            "bad.yaml: services[0].ports[2].protocol: unknown protocol `htp`",
            "bad.yaml: services[0].ports[1].name: port name `http` is used twice",
            "bad.yaml: services[0].instances[0].colour: unknown field",
            "bad.yaml: services[0].instances[0].address: an IP address is required",
            "bad.yaml: services[0].instances[0].ports.grpc: the service has no port named `grpc`",
            "bad.yaml: services[0].instances[0].weight: a weight from 1 to 128",
        ] {
            assert!(
                text.iter().any(|t| t.starts_with(want)),
                "missing {want:?} in {text:#?}"
            );
        }
    }
}

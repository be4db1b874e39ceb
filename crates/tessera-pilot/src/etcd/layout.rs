//! The key layout, shared by the etcd registry adapter and the registry API's etcd store:
//!
//! ```text
//! <prefix>/services/<ns>/<name>            {"ports": [...], "labels": {...}}
//! <prefix>/services/<name>                 the same, in the configured namespace
//! <prefix>/instances/<ns>/<name>/<id>      {"address": ..., "port" | "ports": ..., "labels", "weight", "healthy", "locality"}
//! <prefix>/instances/<name>/<id>           the same, in the configured namespace
//! ```
//!
//! Values are the JSON bodies of the registry REST API (`PUT .../services/{name}` and
//! `PUT .../instances/{id}`), checked by the same code as registry files. An instance value may
//! carry the API's `ttl` (the registry API writes it beside the lease); the lease, not the field,
//! decides how long the key lives. An instance whose service key is absent is skipped, as is
//! any value that does not pass the checks: each is reported with its key and the reason.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::api::Refused;
use crate::model::{Instance, Service};

/// What a key of the layout names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A service.
    Service {
        /// Namespace.
        ns: String,
        /// Name.
        name: String,
    },
    /// An instance of a service.
    Instance {
        /// Namespace.
        ns: String,
        /// Service name.
        name: String,
        /// Instance id, unique in the service.
        id: String,
    },
}

/// The key of service `ns/name`.
pub fn service_key(prefix: &str, ns: &str, name: &str) -> String {
    format!("{prefix}/services/{ns}/{name}")
}

/// The key of instance `id` of `ns/name`.
pub fn instance_key(prefix: &str, ns: &str, name: &str, id: &str) -> String {
    format!("{prefix}/instances/{ns}/{name}/{id}")
}

/// The prefix of every instance key of `ns/name`.
pub fn instances_prefix(prefix: &str, ns: &str, name: &str) -> String {
    format!("{prefix}/instances/{ns}/{name}/")
}

/// Reads a key under `prefix` (which the caller ranged over); `default_ns` for keys naming none.
pub fn parse_key(prefix: &str, default_ns: &str, key: &str) -> Result<Key, String> {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| format!("not under `{prefix}/`"))?;
    let (kind, rest) = rest
        .split_once('/')
        .ok_or_else(|| "neither a services/ nor an instances/ key".to_string())?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty() || p.trim() != *p) {
        return Err("an empty part, or spaces around one".into());
    }
    let s = |x: &str| x.to_string();
    match (kind, parts.as_slice()) {
        ("services", [name]) => Ok(Key::Service {
            ns: s(default_ns),
            name: s(name),
        }),
        ("services", [ns, name]) => Ok(Key::Service {
            ns: s(ns),
            name: s(name),
        }),
        ("services", _) => Err("a service key is services/<ns>/<name> or services/<name>".into()),
        ("instances", [name, id]) => Ok(Key::Instance {
            ns: s(default_ns),
            name: s(name),
            id: s(id),
        }),
        ("instances", [ns, name, id]) => Ok(Key::Instance {
            ns: s(ns),
            name: s(name),
            id: s(id),
        }),
        ("instances", _) => Err("an instance key is instances/<ns>/<name>/<id> or instances/<name>/<id>".into()),
        _ => Err("neither a services/ nor an instances/ key".into()),
    }
}

/// What one pair holds, as the follower keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The value.
    pub value: Vec<u8>,
    /// Its lease, 0 for none.
    pub lease: i64,
    /// The revision of its last change.
    pub mod_revision: i64,
}

/// An instance read from the layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadInstance {
    /// The instance.
    pub instance: Instance,
    /// Its lease, 0 for none.
    pub lease: i64,
    /// The `ttl` its value carries, if any.
    pub ttl: Option<std::time::Duration>,
}

/// A service read from the layout, with its instances by id.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadService {
    /// The service.
    pub service: Service,
    /// The revision of its key's last change.
    pub revision: i64,
    /// By id.
    pub instances: BTreeMap<String, ReadInstance>,
}

/// A key skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The key.
    pub key: String,
    /// Why.
    pub reason: String,
}

fn refused_text(r: Refused, key: &str) -> String {
    match r {
        Refused::Message(m) => m
            .strip_prefix(key)
            .and_then(|m| m.strip_prefix(": "))
            .unwrap_or(&m)
            .to_string(),
        Refused::Problems(p) => p
            .iter()
            .map(|p| {
                let path = p
                    .path
                    .strip_prefix("services[0].instances[0].")
                    .or_else(|| p.path.strip_prefix("services[0]."))
                    .unwrap_or(&p.path);
                format!("{path}: {}", p.reason)
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

fn json(value: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))
}

/// What [`read`] made of each key, by the revision it read: a view is rebuilt after every
/// batch of events, and only the keys that changed are checked again.
#[derive(Debug, Default)]
pub struct Cache {
    services: HashMap<String, (i64, Result<Service, String>)>,
    /// By the instance's revision and its service's.
    instances: HashMap<String, (i64, i64, InstanceRead)>,
}

type InstanceRead = Result<(Instance, Option<std::time::Duration>), String>;

/// Reads every pair (key → what it holds) into services by `ns/name`; `source(key)` is what
/// each service and instance records as its source (it must give the same for the same key
/// every time, as `cache` keeps what it gave). Pairs that do not pass are in the second list.
pub fn read(
    prefix: &str,
    default_ns: &str,
    kvs: &BTreeMap<String, Stored>,
    source: &dyn Fn(&Key, &str) -> String,
    cache: &mut Cache,
) -> (BTreeMap<String, ReadService>, Vec<Skipped>) {
    cache.services.retain(|k, _| kvs.contains_key(k));
    cache.instances.retain(|k, _| kvs.contains_key(k));
    let mut out: BTreeMap<String, ReadService> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut instances = Vec::new();
    for (key, st) in kvs {
        let k = match parse_key(prefix, default_ns, key) {
            Ok(k) => k,
            Err(reason) => {
                skipped.push(Skipped {
                    key: key.clone(),
                    reason,
                });
                continue;
            }
        };
        match &k {
            Key::Service { ns, name } => {
                let svc = match cache.services.get(key) {
                    Some((rev, r)) if *rev == st.mod_revision => r.clone(),
                    _ => {
                        let r = json(&st.value).and_then(|v| {
                            crate::api::service_from(ns, name, &v, key, &source(&k, key))
                                .map_err(|r| refused_text(r, key))
                        });
                        cache.services.insert(key.clone(), (st.mod_revision, r.clone()));
                        r
                    }
                };
                match svc {
                    Ok(service) => {
                        let id = format!("{ns}/{name}");
                        if let Some(first) = out.get(&id) {
                            // services/<name> and services/<default ns>/<name>: the first read wins.
                            skipped.push(Skipped {
                                key: key.clone(),
                                reason: format!("service `{id}` is already defined by {}", first.service.source),
                            });
                            continue;
                        }
                        out.insert(
                            id,
                            ReadService {
                                service,
                                revision: st.mod_revision,
                                instances: BTreeMap::new(),
                            },
                        );
                    }
                    Err(reason) => skipped.push(Skipped {
                        key: key.clone(),
                        reason,
                    }),
                }
            }
            Key::Instance { .. } => instances.push((k, key, st)),
        }
    }
    for (k, key, st) in instances {
        let Key::Instance { ns, name, id } = &k else {
            continue;
        };
        let Some(rs) = out.get_mut(&format!("{ns}/{name}")) else {
            skipped.push(Skipped {
                key: key.clone(),
                reason: format!(
                    "service `{ns}/{name}` is not defined (no {})",
                    service_key(prefix, ns, name)
                ),
            });
            continue;
        };
        if rs.instances.contains_key(id) {
            skipped.push(Skipped {
                key: key.clone(),
                reason: format!("instance `{id}` of `{ns}/{name}` is already defined under another key"),
            });
            continue;
        }
        let inst = match cache.instances.get(key) {
            Some((rev, srev, r)) if *rev == st.mod_revision && *srev == rs.revision => r.clone(),
            _ => {
                let r = json(&st.value).and_then(|v| {
                    crate::api::instance_from(&rs.service, &v, key, &source(&k, key))
                        .map(|(i, ttl, _)| (i, ttl))
                        .map_err(|r| refused_text(r, key))
                });
                cache
                    .instances
                    .insert(key.clone(), (st.mod_revision, rs.revision, r.clone()));
                r
            }
        };
        match inst {
            Ok((instance, ttl)) => {
                rs.instances.insert(
                    id.clone(),
                    ReadInstance {
                        instance,
                        lease: st.lease,
                        ttl,
                    },
                );
            }
            Err(reason) => skipped.push(Skipped {
                key: key.clone(),
                reason,
            }),
        }
    }
    (out, skipped)
}

/// The service model of what [`read`] gave.
pub fn snapshot(read: &BTreeMap<String, ReadService>) -> crate::model::Snapshot {
    let mut snap = crate::model::Snapshot::default();
    for (k, rs) in read {
        snap.services.insert(k.clone(), rs.service.clone());
        snap.instances.insert(
            k.clone(),
            std::sync::Arc::new(rs.instances.values().map(|r| r.instance.clone()).collect()),
        );
    }
    snap
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/tessera/registry";

    fn kv(pairs: &[(&str, &str)]) -> BTreeMap<String, Stored> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    format!("{P}/{k}"),
                    Stored {
                        value: v.as_bytes().to_vec(),
                        lease: 0,
                        mod_revision: 1,
                    },
                )
            })
            .collect()
    }

    fn src(_: &Key, key: &str) -> String {
        format!("etcd:{key}")
    }

    #[test]
    fn etcd_keys_parse_with_and_without_namespace() {
        let k = |s: &str| parse_key(P, "default", &format!("{P}/{s}"));
        assert_eq!(
            k("services/shop/reviews"),
            Ok(Key::Service {
                ns: "shop".into(),
                name: "reviews".into()
            })
        );
        assert_eq!(
            k("services/reviews"),
            Ok(Key::Service {
                ns: "default".into(),
                name: "reviews".into()
            })
        );
        assert_eq!(
            k("instances/shop/reviews/i-1"),
            Ok(Key::Instance {
                ns: "shop".into(),
                name: "reviews".into(),
                id: "i-1".into()
            })
        );
        assert_eq!(
            k("instances/reviews/i-1"),
            Ok(Key::Instance {
                ns: "default".into(),
                name: "reviews".into(),
                id: "i-1".into()
            })
        );
        for bad in [
            "services",
            "services/a/b/c",
            "instances/a",
            "instances//b/c",
            "other/x",
            "services/a ",
        ] {
            assert!(k(bad).is_err(), "{bad}");
        }
        assert!(parse_key(P, "default", "/elsewhere/services/a").is_err());
        assert_eq!(
            service_key(P, "shop", "reviews"),
            "/tessera/registry/services/shop/reviews"
        );
        assert_eq!(
            instance_key(P, "shop", "reviews", "i1"),
            "/tessera/registry/instances/shop/reviews/i1"
        );
        assert!(instance_key(P, "shop", "reviews", "i1").starts_with(&instances_prefix(P, "shop", "reviews")));
    }

    #[test]
    fn etcd_values_are_checked_and_bad_ones_skipped_with_the_key() {
        let (read, skipped) = read(
            P,
            "default",
            &kv(&[
                (
                    "services/shop/reviews",
                    r#"{"ports": [{"name": "http", "port": 9080}]}"#,
                ),
                (
                    "services/ratings",
                    r#"{"ports": [{"name": "http", "port": 9080, "protocol": "htp"}]}"#,
                ),
                ("services/shop/broken", "{not json"),
                (
                    "instances/shop/reviews/a",
                    r#"{"address": "127.0.0.1", "port": 19080, "labels": {"v": "1"}}"#,
                ),
                ("instances/shop/reviews/b", r#"{"address": "nowhere", "weight": 900}"#),
                ("instances/shop/reviews/c", r#"{"address": "127.0.0.2", "ttl": "10s"}"#),
                ("instances/shop/nope/x", r#"{"address": "127.0.0.1"}"#),
                ("odd/key", "{}"),
            ]),
            &src,
            &mut Cache::default(),
        );
        let reviews = &read["shop/reviews"];
        assert_eq!(reviews.service.source, "etcd:/tessera/registry/services/shop/reviews");
        let ids: Vec<&String> = reviews.instances.keys().collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(reviews.instances["a"].instance.ports["http"], 19080);
        assert_eq!(reviews.instances["c"].instance.ports["http"], 9080);
        assert_eq!(reviews.instances["c"].ttl, Some(std::time::Duration::from_secs(10)));
        assert_eq!(read.len(), 1, "{read:?}");
        let text: Vec<String> = skipped.iter().map(|s| format!("{}: {}", s.key, s.reason)).collect();
        for want in [
            "/tessera/registry/services/ratings: ports[0].protocol: unknown protocol `htp`",
            "/tessera/registry/services/shop/broken: not JSON",
            "/tessera/registry/instances/shop/reviews/b: address: an IP address is required; weight: a weight from 1 to 128",
            "/tessera/registry/instances/shop/nope/x: service `shop/nope` is not defined",
            "/tessera/registry/odd/key: neither a services/ nor an instances/ key",
        ] {
            assert!(
                text.iter().any(|t| t.starts_with(want)),
                "missing {want:?} in {text:#?}"
            );
        }
        let snap = snapshot(&read);
        assert_eq!(snap.instances["shop/reviews"].len(), 2);
    }

    #[test]
    fn etcd_values_never_panic_on_junk() {
        for junk in [
            "",
            "null",
            "[]",
            "1",
            "\"x\"",
            r#"{"ports": 7}"#,
            r#"{"ports": [{}]}"#,
            "\u{0}\u{ff}",
        ] {
            let (read, skipped) = read(
                P,
                "default",
                &kv(&[("services/a", junk), ("instances/a/i", junk)]),
                &src,
                &mut Cache::default(),
            );
            assert!(read.is_empty(), "{junk:?}");
            assert!(!skipped.is_empty(), "{junk:?}");
        }
    }

    #[test]
    fn etcd_cache_rechecks_instances_when_their_service_changes() {
        let mut cache = Cache::default();
        let mut pairs = kv(&[
            ("services/a", r#"{"ports": [{"name": "http", "port": 80}]}"#),
            ("instances/a/i", r#"{"address": "127.0.0.1", "ports": {"http": 8080}}"#),
        ]);
        let first = read(P, "default", &pairs, &src, &mut cache);
        assert_eq!(first.0["default/a"].instances.len(), 1);
        assert_eq!(
            read(P, "default", &pairs, &src, &mut cache),
            first,
            "the cache gives the same"
        );
        // The service's port is renamed: the instance's `ports.http` no longer fits.
        pairs.insert(
            format!("{P}/services/a"),
            Stored {
                value: br#"{"ports": [{"name": "web", "port": 80}]}"#.to_vec(),
                lease: 0,
                mod_revision: 5,
            },
        );
        let (r, skipped) = read(P, "default", &pairs, &src, &mut cache);
        assert!(r["default/a"].instances.is_empty());
        assert!(
            skipped[0].reason.contains("the service has no port named `http`"),
            "{skipped:?}"
        );
    }

    proptest::proptest! {
        /// Any key, and any cut of a good value, is read or skipped with a reason; never a panic.
        #[test]
        fn etcd_layout_never_panics(key in "\\PC{0,80}", cut in 0usize..200, flip in 0usize..200, to in 0u8..128) {
            let _ = parse_key(P, "default", &key);
            let _ = parse_key(P, "default", &format!("{P}/{key}"));
            let good = r#"{"address": "127.0.0.1", "ports": {"http": 80}, "labels": {"a": "b"}, "weight": 3, "locality": "r/z/s"}"#;
            let mut bytes = good.as_bytes().to_vec();
            bytes.truncate(cut.min(bytes.len()));
            if let Some(b) = bytes.get_mut(flip) {
                *b = to;
            }
            let mut pairs = kv(&[("services/a", r#"{"ports": [{"name": "http", "port": 80}]}"#)]);
            pairs.insert(format!("{P}/instances/a/i"), Stored { value: bytes.clone(), lease: 7, mod_revision: 2 });
            pairs.insert(format!("{P}/services/{key}"), Stored { value: bytes, lease: 0, mod_revision: 2 });
            let (read, _) = read(P, "default", &pairs, &src, &mut Cache::default());
            proptest::prop_assert!(read.len() <= 2);
        }
    }
}

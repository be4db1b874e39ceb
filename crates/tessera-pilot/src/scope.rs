//! Per-node scoping. Each sidecar's node is mapped to a *group*: its namespace and the inbound
//! ports it fronts. Sidecars of one group get the same resources, computed once:
//! - **imports**, like Istio's `Sidecar` egress hosts: a namespace sees the services its import
//!   list names (`./*` its own namespace, `ns/*` another namespace, `*/host` a host anywhere,
//!   `*/*` everything, the default);
//! - **inbound ports**: a sidecar that fronts a workload says so in its node metadata,
//!   `TESSERA_INBOUND: "LISTEN=APP[,LISTEN=APP...]"` (each `IP:port`): Pilot gives it a listener on
//!   LISTEN that forwards to APP, speaking the protocol of the service whose instance is
//!   registered at LISTEN. (Istio finds this from the pod's IP and iptables capture; on one host
//!   without capture the addresses say it.)
//!
//! - **outbound listeners**: every sidecar gets Pilot's outbound listeners (`sidecar.outbound_http`,
//!   `sidecar.outbound_dubbo`) unless its node metadata says otherwise:
//!   `TESSERA_OUTBOUND: "none"` (a sidecar that only fronts its workload) or
//!   `"http=IP:port,dubbo=IP:port"` (sidecars sharing one host need their own ports).
//!
//! - **proxyless gRPC** (node metadata `GENERATOR: grpc`, Istio's mark): API listeners named
//!   `host:port` for gRPC's `xds:///host:port` targets, and no sidecar listeners.
//!
//! The namespace is the node metadata's `NAMESPACE` (as Istio's agent sets it), else the
//! `<ns>.svc.cluster.local` part of an Istio node id `sidecar~IP~POD.NS~NS.svc.cluster.local`,
//! else `default`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;

use crate::model::Snapshot;

/// What a group is: a namespace and the inbound ports of its sidecars.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    /// The sidecars' namespace.
    pub namespace: String,
    /// `(listen, app)` pairs.
    pub inbound: Vec<(SocketAddr, SocketAddr)>,
    /// The node's own outbound listener addresses, if it named them.
    pub outbound: Option<Outbound>,
    /// A proxyless gRPC client (node metadata `GENERATOR: grpc`, as Istio marks them): it gets
    /// an API listener per service port, named `host:port`, instead of the sidecar's listeners.
    pub grpc: bool,
}

/// A node's outbound listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Outbound {
    /// HTTP; none: no HTTP listener.
    pub http: Option<SocketAddr>,
    /// Dubbo; none: no Dubbo listener.
    pub dubbo: Option<SocketAddr>,
}

/// The metadata key a sidecar names its outbound listeners with.
pub const OUTBOUND_KEY: &str = "TESSERA_OUTBOUND";

fn parse_outbound(spec: &str) -> Result<Outbound, String> {
    let mut o = Outbound::default();
    if spec.trim() == "none" {
        return Ok(o);
    }
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected http=IP:port or dubbo=IP:port"))?;
        let a: SocketAddr = v
            .trim()
            .parse()
            .map_err(|_| format!("`{v}` is not an IP:port address"))?;
        match k.trim() {
            "http" => o.http = Some(a),
            "dubbo" => o.dubbo = Some(a),
            other => return Err(format!("`{other}`: known listeners are http and dubbo")),
        }
    }
    Ok(o)
}

/// The metadata key a sidecar names its inbound ports with.
pub const INBOUND_KEY: &str = "TESSERA_INBOUND";

impl Group {
    /// The group of a node. Bad `TESSERA_INBOUND` entries are logged and left out.
    pub fn of(node: Option<&Node>) -> Group {
        let Some(node) = node else {
            return Group {
                namespace: "default".into(),
                ..Default::default()
            };
        };
        let meta = |k: &str| -> Option<String> {
            node.metadata.as_ref()?.fields.get(k).and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            })
        };
        let namespace = meta("NAMESPACE")
            .or_else(|| {
                let domain = node.id.split('~').nth(3)?;
                let ns = domain.strip_suffix(".svc.cluster.local")?;
                (!ns.is_empty()).then(|| ns.to_string())
            })
            .unwrap_or_else(|| "default".into());
        let mut inbound = Vec::new();
        if let Some(spec) = meta(INBOUND_KEY) {
            for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let parsed = part
                    .split_once('=')
                    .and_then(|(l, a)| Some((l.trim().parse().ok()?, a.trim().parse().ok()?)));
                match parsed {
                    Some(pair) => inbound.push(pair),
                    None => {
                        tracing::warn!(node = %node.id, entry = part, "{INBOUND_KEY}: expected LISTEN=APP with IP:port addresses; entry ignored")
                    }
                }
            }
        }
        inbound.sort();
        inbound.dedup();
        let outbound = meta(OUTBOUND_KEY).and_then(|spec| match parse_outbound(&spec) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(node = %node.id, "{OUTBOUND_KEY}: {e}; Pilot's outbound listeners are used");
                None
            }
        });
        let grpc = meta("GENERATOR").is_some_and(|g| g == "grpc");
        Group {
            namespace,
            inbound,
            outbound,
            grpc,
        }
    }

    /// The group's key (what the ADS server groups streams by).
    pub fn key(&self) -> String {
        let mut k = format!("ns={}", self.namespace);
        if !self.inbound.is_empty() {
            k.push_str(";in=");
            let parts: Vec<String> = self.inbound.iter().map(|(l, a)| format!("{l}={a}")).collect();
            k.push_str(&parts.join(","));
        }
        if let Some(o) = &self.outbound {
            k.push_str(";out=");
            let mut parts = Vec::new();
            if let Some(a) = o.http {
                parts.push(format!("http={a}"));
            }
            if let Some(a) = o.dubbo {
                parts.push(format!("dubbo={a}"));
            }
            k.push_str(if parts.is_empty() { "none" } else { "" });
            k.push_str(&parts.join(","));
        }
        if self.grpc {
            k.push_str(";gen=grpc");
        }
        k
    }

    /// Back from [`Group::key`].
    pub fn parse(key: &str) -> Group {
        let mut g = Group::default();
        for part in key.split(';') {
            if let Some(ns) = part.strip_prefix("ns=") {
                g.namespace = ns.to_string();
            } else if let Some(list) = part.strip_prefix("in=") {
                g.inbound = list
                    .split(',')
                    .filter_map(|p| {
                        let (l, a) = p.split_once('=')?;
                        Some((l.parse().ok()?, a.parse().ok()?))
                    })
                    .collect();
            } else if part == "gen=grpc" {
                g.grpc = true;
            } else if let Some(spec) = part.strip_prefix("out=") {
                g.outbound = parse_outbound(spec).ok();
            }
        }
        g
    }
}

/// Import lists per namespace (Istio `Sidecar` egress hosts); a namespace not listed imports
/// everything (`*/*`), as in Istio.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imports(pub BTreeMap<String, Vec<String>>);

/// Checks one import pattern: `ns/host`, where `ns` is a namespace, `.` or `*`, and `host` is
/// `*`, a host name, or `*.suffix`.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let Some((ns, host)) = p.split_once('/') else {
        return Err(format!(
            "`{p}`: expected NAMESPACE/HOST such as `./*`, `shared/*` or `*/reviews.default.svc.cluster.local`"
        ));
    };
    if ns.is_empty() || host.is_empty() {
        return Err(format!("`{p}`: the namespace and the host must not be empty"));
    }
    let wildcard_ok = host == "*" || host.strip_prefix("*.").is_some_and(|rest| !rest.contains('*'));
    if host.contains('*') && !wildcard_ok {
        return Err(format!("`{p}`: a host wildcard is `*` or a leading `*.`"));
    }
    Ok(())
}

fn host_matches(pattern: &str, host: &str) -> bool {
    pattern == "*" || pattern == host || pattern.strip_prefix('*').is_some_and(|suffix| host.ends_with(suffix))
}

impl Imports {
    /// Whether a sidecar in `ns` sees the service `svc_ns/host`.
    pub fn sees(&self, ns: &str, svc_ns: &str, hosts: &[String]) -> bool {
        let Some(list) = self.0.get(ns) else {
            return true;
        };
        list.iter().any(|p| {
            let Some((pns, phost)) = p.split_once('/') else {
                return false;
            };
            let ns_ok = match pns {
                "*" => true,
                "." => svc_ns == ns,
                other => other == svc_ns,
            };
            ns_ok && hosts.iter().any(|h| host_matches(phost, h))
        })
    }

    /// The part of `s` a sidecar in `ns` sees.
    pub fn visible(&self, s: &Snapshot, ns: &str) -> Snapshot {
        let Some(list) = self.0.get(ns) else {
            return s.clone();
        };
        let mut out = Snapshot::default();
        // Whole namespaces only (`./*`, `shop/*`, the usual case): a range of the snapshot's
        // `namespace/name` keys per namespace, not a look at every service.
        let whole: Option<Vec<&str>> = list
            .iter()
            .map(|p| match p.split_once('/') {
                Some((".", "*")) => Some(ns),
                Some((n, "*")) if n != "*" => Some(n),
                _ => None,
            })
            .collect();
        if let Some(mut namespaces) = whole {
            namespaces.sort_unstable();
            namespaces.dedup();
            for n in namespaces {
                let from = format!("{n}/");
                for (k, svc) in s
                    .services
                    .range(from.clone()..)
                    .take_while(|(k, _)| k.starts_with(&from))
                {
                    out.services.insert(k.clone(), svc.clone());
                    if let Some(i) = s.instances.get(k) {
                        out.instances.insert(k.clone(), i.clone());
                    }
                }
            }
            return out;
        }
        for (k, svc) in &s.services {
            let hosts = [svc.hostname(), format!("{}.{}", svc.name, svc.namespace)];
            if self.sees(ns, &svc.namespace, &hosts) {
                out.services.insert(k.clone(), svc.clone());
                if let Some(i) = s.instances.get(k) {
                    out.instances.insert(k.clone(), i.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_maps_to_its_namespace_and_inbound_ports() {
        let g = Group::of(Some(&node("sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local", &[])));
        assert_eq!(g.key(), "ns=shop");
        let g = Group::of(Some(&node(
            "x",
            &[
                ("NAMESPACE", "pay"),
                (INBOUND_KEY, "127.0.0.1:16001=127.0.0.1:18080, nonsense"),
            ],
        )));
        assert_eq!(g.key(), "ns=pay;in=127.0.0.1:16001=127.0.0.1:18080");
        assert_eq!(Group::parse(&g.key()), g);
        assert_eq!(Group::of(None).key(), "ns=default");
        let g = Group::of(Some(&node("grpc-client", &[("GENERATOR", "grpc")])));
        assert_eq!(g.key(), "ns=default;gen=grpc");
        assert_eq!(Group::parse(&g.key()), g);
        for (spec, key) in [
            ("none", "ns=default;out=none"),
            (
                "http=127.0.0.1:1, dubbo=127.0.0.1:2",
                "ns=default;out=http=127.0.0.1:1,dubbo=127.0.0.1:2",
            ),
            ("bogus", "ns=default"),
        ] {
            let g = Group::of(Some(&node("x", &[(OUTBOUND_KEY, spec)])));
            assert_eq!(g.key(), key);
            assert_eq!(Group::parse(&g.key()), g);
        }
    }

    #[test]
    fn imports_follow_istio_sidecar_egress_hosts() {
        let snap = crate::file::parse(
            "services:\n- { name: a, namespace: shop, ports: [{ name: http, port: 80 }] }\n- { name: b, namespace: pay, ports: [{ name: http, port: 80 }] }\n- { name: c, namespace: misc, ports: [{ name: http, port: 80 }] }\n",
            "s.yaml",
            "file:s.yaml",
        )
        .unwrap();
        let imports = Imports(
            [(
                "shop".to_string(),
                vec!["./*".to_string(), "*/b.pay.svc.cluster.local".to_string()],
            )]
            .into_iter()
            .collect(),
        );
        let seen: Vec<String> = imports.visible(&snap, "shop").services.into_keys().collect();
        assert_eq!(seen, ["pay/b", "shop/a"]);
        assert_eq!(
            imports.visible(&snap, "other").services.len(),
            3,
            "not listed: everything"
        );
        assert!(check_pattern("./*").is_ok());
        assert!(check_pattern("*/*.pay.svc.cluster.local").is_ok());
        assert!(check_pattern("shop").is_err());
        assert!(check_pattern("a/b*c").is_err());
    }
}

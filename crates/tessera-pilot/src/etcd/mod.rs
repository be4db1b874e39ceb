//! etcd in Pilot: a lean v3 client over etcd's JSON gateway ([`client`]), the key layout both
//! uses share ([`layout`]), the follower that mirrors a prefix by range + watch ([`follow`]),
//! the registry adapter `registries.etcd` ([`adapter`]) and the shared store of the registry
//! API, `store.etcd` ([`store`]).
//!
//! ```yaml
//! registries:
//!   etcd:
//!     endpoints: [http://127.0.0.1:2379, http://127.0.0.1:22379]  # required; tried in turn
//!     prefix: /tessera/registry     # default; the layout is under it (see `layout`)
//!     namespace: default            # of services whose key names none (default default)
//!     dial_timeout: 2s              # to connect to one endpoint (default 2s)
//!     request_timeout: 5s           # for one call, connect included (default 5s)
//! store:
//!   etcd: { endpoints: [http://127.0.0.1:2379], prefix: /tessera/registry }   # same fields, no namespace
//! ```
//!
//! Only `http://` endpoints: the client speaks no TLS yet (keep etcd on loopback or a private
//! network).

pub mod adapter;
pub mod client;
pub mod follow;
pub mod layout;
pub mod store;

use std::time::Duration;

use serde_json::Value;

use crate::Problem;

/// Settings shared by `registries.etcd` and `store.etcd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each endpoint, in the order given.
    pub endpoints: Vec<String>,
    /// Where the layout lives, e.g. `/tessera/registry` (no trailing `/`).
    pub prefix: String,
    /// The namespace of services whose key names none.
    pub namespace: String,
    /// To connect to one endpoint.
    pub dial_timeout: Duration,
    /// For one call, connecting included.
    pub request_timeout: Duration,
}

/// The default prefix.
pub const DEFAULT_PREFIX: &str = "/tessera/registry";

/// Checks one endpoint URL; returns its `host:port`.
pub fn check_endpoint(s: &str) -> Result<String, String> {
    if s.starts_with("https://") {
        return Err(format!(
            "`{s}`: TLS is not supported yet; use an http:// endpoint (etcd on loopback or a private network)"
        ));
    }
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!("`{s}` is not an endpoint URL such as http://127.0.0.1:2379"));
    };
    let hostport = rest.strip_suffix('/').unwrap_or(rest);
    if hostport.contains('/') || hostport.contains('?') || hostport.contains('@') {
        return Err(format!("`{s}`: an endpoint is http://host:port, with no path"));
    }
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, p) = r.split_once(']').ok_or_else(|| format!("`{s}`: `[` without `]`"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{s}`: `{h}` is not an IPv6 address"));
        }
        (h, p.strip_prefix(':').ok_or_else(|| format!("`{s}` has no port"))?)
    } else {
        let (h, p) = hostport
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port (http://host:port)"))?;
        if h.contains(':') {
            return Err(format!("`{s}`: write an IPv6 address as http://[addr]:port"));
        }
        (h, p)
    };
    if host.is_empty() {
        return Err(format!("`{s}` has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(hostport.to_string()),
        _ => Err(format!("`{s}`: `{port}` is not a port from 1 to 65535")),
    }
}

impl EtcdConfig {
    /// Reads the section at `at` (`registries.etcd` or `store.etcd`); every problem names its
    /// field. `namespace` is only known in the registry's section.
    pub fn parse(v: &Value, file: &str, at: &str, with_namespace: bool) -> Result<EtcdConfig, Vec<Problem>> {
        let known: &[&str] = if with_namespace {
            &["endpoints", "prefix", "namespace", "dial_timeout", "request_timeout"]
        } else {
            &["endpoints", "prefix", "dial_timeout", "request_timeout"]
        };
        let mut sec = crate::registry::Section::new(v, file, at, known, "{ endpoints: [http://127.0.0.1:2379] }")?;
        let mut endpoints = Vec::new();
        match sec.get("endpoints") {
            None => sec.problem(
                "endpoints",
                "required: the etcd endpoints, e.g. [http://127.0.0.1:2379]".into(),
            ),
            Some(Value::Array(list)) if list.is_empty() => sec.problem(
                "endpoints",
                "at least one endpoint, e.g. [http://127.0.0.1:2379]".into(),
            ),
            Some(Value::Array(list)) => {
                for (i, e) in list.iter().enumerate() {
                    match e.as_str().map(str::trim) {
                        Some(s) => match check_endpoint(s) {
                            Ok(hp) => endpoints.push(hp),
                            Err(r) => sec.problem(&format!("endpoints[{i}]"), r),
                        },
                        None => sec.problem(&format!("endpoints[{i}]"), format!("expected a URL string, not {e}")),
                    }
                }
            }
            Some(other) => sec.problem(
                "endpoints",
                format!("expected a list such as [http://127.0.0.1:2379], not {other}"),
            ),
        }
        let prefix = sec.string("prefix").unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        if !crate::registry::absolute_path(&prefix) {
            sec.problem(
                "prefix",
                format!(
                    "`{prefix}` is not a key prefix such as /tessera/registry (starts with `/`, no trailing `/`, no empty part)"
                ),
            );
        }
        let namespace = sec.namespace();
        let range = (Duration::from_millis(100), Duration::from_secs(60), "from 100ms to 60s");
        let dial_timeout = sec.duration("dial_timeout", Duration::from_secs(2), range, "2s or 500ms");
        let request_timeout = sec.duration("request_timeout", Duration::from_secs(5), range, "2s or 500ms");
        sec.finish(EtcdConfig {
            endpoints,
            prefix,
            namespace,
            dial_timeout,
            request_timeout,
        })
    }

    /// A client on these endpoints.
    pub fn client(&self) -> client::Client {
        client::Client::new(self.endpoints.clone(), self.dial_timeout, self.request_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, ns: bool) -> Result<EtcdConfig, Vec<String>> {
        let v = tessera_xds::load::yaml_to_json(yaml).expect("yaml");
        EtcdConfig::parse(&v, "pilot.yaml", "registries.etcd", ns)
            .map_err(|p| p.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn etcd_config_defaults() {
        let c = parse("endpoints: [http://127.0.0.1:2379, \"http://[::1]:2380/\"]", true).unwrap();
        assert_eq!(c.endpoints, ["127.0.0.1:2379", "[::1]:2380"]);
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert_eq!(c.namespace, "default");
        assert_eq!(c.dial_timeout, Duration::from_secs(2));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn etcd_config_problems_name_the_field() {
        let e = parse(
            "endpoints: [https://127.0.0.1:2379, \"127.0.0.1:2379\", http://h:0, 7]\nprefix: tessera/\nnamespace: Shop\ndial_timeout: soon\nrequest_timeout: 2h\ncolour: red\n",
            true,
        )
        .unwrap_err();
        for want in [
            "pilot.yaml: registries.etcd.endpoints[0]: `https://127.0.0.1:2379`: TLS is not supported yet",
            "pilot.yaml: registries.etcd.endpoints[1]: `127.0.0.1:2379` is not an endpoint URL",
            "pilot.yaml: registries.etcd.endpoints[2]: `http://h:0`: `0` is not a port",
            "pilot.yaml: registries.etcd.endpoints[3]: expected a URL string",
            "pilot.yaml: registries.etcd.prefix: `tessera/` is not a key prefix",
            "pilot.yaml: registries.etcd.namespace: `Shop` is not a namespace",
            "pilot.yaml: registries.etcd.dial_timeout: `soon` is not a duration",
            "pilot.yaml: registries.etcd.request_timeout: `2h` is not a duration",
            "pilot.yaml: registries.etcd.colour: unknown field",
        ] {
            assert!(e.iter().any(|t| t.starts_with(want)), "missing {want:?} in {e:#?}");
        }
        let e = parse("{}", true).unwrap_err();
        assert!(e[0].contains("registries.etcd.endpoints: required"), "{e:?}");
        let e = parse("endpoints: http://127.0.0.1:2379", true).unwrap_err();
        assert!(e[0].contains("expected a list"), "{e:?}");
        let e = parse("endpoints: [http://127.0.0.1:2379]\nnamespace: x", false).unwrap_err();
        assert!(e[0].contains("namespace: unknown field"), "{e:?}");
    }
}

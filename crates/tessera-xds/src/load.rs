//! Envoy bootstraps as text (YAML or JSON) into `envoy-types` structs, through the protobuf
//! descriptors of the Envoy v3 API (`descriptors/envoy.bin`, made by
//! `scripts/gen-envoy-descriptors` from the .proto files envoy-types ships): YAML → JSON →
//! `prost_reflect::DynamicMessage` (unknown fields rejected, `Any` resolved by type URL) →
//! protobuf bytes → `envoy_types` message.
//!
//! Envoy accepts enum names in lower case (`lb_policy: round_robin`); the JSON mapping does not,
//! so enum strings are upper-cased first, guided by the descriptors.

use std::sync::LazyLock;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor};
use serde_json::Value;

static DESCRIPTORS: &[u8] = include_bytes!("../descriptors/envoy.bin");

static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| format!("the built-in Envoy descriptors: {e}")));

/// Why a bootstrap file could not be read as an Envoy v3 bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML / JSON.
    #[error("{file}: not YAML or JSON: {reason}")]
    Syntax {
        /// The file.
        file: String,
        /// The parser's message, with the position.
        reason: String,
    },
    /// Not an Envoy v3 bootstrap (an unknown field, a wrong type, an unknown `@type`).
    #[error("{file}: {reason}")]
    Schema {
        /// The file.
        file: String,
        /// What is wrong, as the protobuf JSON mapping reports it.
        reason: String,
    },
}

/// Reads `path` as an Envoy v3 bootstrap.
pub fn bootstrap_file(path: &std::path::Path) -> Result<Bootstrap, LoadError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        file: file.clone(),
        source,
    })?;
    bootstrap_text(&text, &file)
}

/// Parses YAML or JSON text as an Envoy v3 bootstrap; `file` names it in errors.
pub fn bootstrap_text(text: &str, file: &str) -> Result<Bootstrap, LoadError> {
    let json = yaml_to_json(text).map_err(|reason| LoadError::Syntax {
        file: file.to_string(),
        reason,
    })?;
    let bytes = transcode("envoy.config.bootstrap.v3.Bootstrap", json).map_err(|reason| LoadError::Schema {
        file: file.to_string(),
        reason,
    })?;
    Bootstrap::decode(bytes.as_slice()).map_err(|e| LoadError::Schema {
        file: file.to_string(),
        reason: format!("the transcoded bootstrap does not decode: {e}"),
    })
}

/// JSON (protobuf JSON mapping, Envoy's field names) to the encoded message `type_name`.
pub fn transcode(type_name: &str, mut json: Value) -> Result<Vec<u8>, String> {
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    let desc = pool
        .get_message_by_name(type_name)
        .ok_or_else(|| format!("no descriptor for {type_name}"))?;
    upper_enums(pool, &desc, &mut json);
    let msg =
        DynamicMessage::deserialize_with_options(desc, json, &DeserializeOptions::new().deny_unknown_fields(true))
            .map_err(|e| e.to_string())?;
    Ok(msg.encode_to_vec())
}

/// An `Any` (an xDS resource) as protobuf JSON with its `@type`, for `/config_dump`; a payload the
/// descriptors do not know is shown by type and size.
pub fn any_to_json(any: &envoy_types::pb::google::protobuf::Any) -> Value {
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    let decoded = POOL.as_ref().ok().and_then(|pool| {
        let desc = pool.get_message_by_name(name)?;
        let msg = DynamicMessage::decode(desc, any.value.as_slice()).ok()?;
        // Envoy's /config_dump writes the proto field names (snake_case), not JSON's camelCase.
        let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
        msg.serialize_with_options(serde_json::value::Serializer, &opts).ok()
    });
    match decoded {
        Some(Value::Object(mut m)) => {
            m.insert("@type".into(), Value::String(any.type_url.clone()));
            Value::Object(m)
        }
        _ => serde_json::json!({"@type": any.type_url, "bytes": any.value.len()}),
    }
}

/// Upper-cases enum names written in lower case, following the descriptors (and `@type` of Anys).
fn upper_enums(pool: &DescriptorPool, desc: &MessageDescriptor, v: &mut Value) {
    let Value::Object(obj) = v else { return };
    if desc.full_name() == "google.protobuf.Any" {
        let inner = obj
            .get("@type")
            .and_then(Value::as_str)
            .and_then(|t| t.rsplit('/').next())
            .and_then(|t| pool.get_message_by_name(t));
        if let Some(inner) = inner {
            upper_enums(pool, &inner, v);
        }
        return;
    }
    for (key, value) in obj.iter_mut() {
        let field = desc.get_field_by_name(key).or_else(|| desc.get_field_by_json_name(key));
        let Some(field) = field else { continue };
        let kind = field.kind();
        let each = |value: &mut Value, f: &mut dyn FnMut(&mut Value)| match value {
            Value::Array(items) => items.iter_mut().for_each(&mut *f),
            other => f(other),
        };
        match kind {
            Kind::Enum(e) => each(value, &mut |x| {
                // Envoy matches enum names without case (`round_robin`, `TLSv1_3`): write the
                // descriptor's spelling so the JSON mapping accepts it.
                if let Value::String(s) = x
                    && e.get_value_by_name(s).is_none()
                    && let Some(v) = e.values().find(|v| v.name().eq_ignore_ascii_case(s))
                {
                    *s = v.name().to_string();
                }
            }),
            Kind::Message(m) if field.is_map() => {
                let value_field = m.map_entry_value_field();
                if let (Kind::Message(vm), Value::Object(map)) = (value_field.kind(), value) {
                    for item in map.values_mut() {
                        upper_enums(pool, &vm, item);
                    }
                }
            }
            Kind::Message(m) => each(value, &mut |x| upper_enums(pool, &m, x)),
            _ => {}
        }
    }
}

/// YAML (a superset of JSON) to a JSON value; the first document only.
/// YAML text as JSON (the first document); errors carry the parser's position.
pub fn yaml_to_json(text: &str) -> Result<Value, String> {
    use yaml_rust2::{Yaml, YamlLoader};
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    let doc = docs.into_iter().next().ok_or("the file is empty")?;
    fn conv(y: Yaml) -> Result<Value, String> {
        Ok(match y {
            Yaml::Real(s) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::String(s), Value::Number),
            Yaml::Integer(i) => Value::from(i),
            Yaml::String(s) => Value::String(s),
            Yaml::Boolean(b) => Value::Bool(b),
            Yaml::Array(a) => Value::Array(a.into_iter().map(conv).collect::<Result<_, _>>()?),
            Yaml::Hash(h) => {
                let mut m = serde_json::Map::new();
                for (k, v) in h {
                    let key = match k {
                        Yaml::String(s) => s,
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => return Err(format!("a mapping key must be a string, found {other:?}")),
                    };
                    m.insert(key, conv(v)?);
                }
                Value::Object(m)
            }
            Yaml::Null => Value::Null,
            Yaml::Alias(_) => return Err("YAML aliases are not supported".into()),
            Yaml::BadValue => return Err("a value YAML could not read".into()),
        })
    }
    conv(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 9901 } }
static_resources:
  listeners:
  - name: main
    address: { socket_address: { address: 0.0.0.0, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: auto
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: web, timeout: 2.5s } }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: web
    connect_timeout: 0.25s
    lb_policy: least_request
    load_assignment:
      cluster_name: web
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8080 } } } }] }]
"#;

    #[test]
    fn a_small_bootstrap_loads_with_lowercase_enums() {
        let b = bootstrap_text(SMALL, "small.yaml").unwrap();
        let s = b.static_resources.as_ref().unwrap();
        assert_eq!(s.clusters[0].lb_policy, 1, "least_request");
        let cfg = crate::bootstrap::bootstrap(&b).unwrap();
        assert_eq!(cfg.listeners[0].address.port(), 10000);
        assert!(matches!(
            cfg.clusters[0].lb_policy,
            tessera_model::LbPolicy::LeastRequest { .. }
        ));
        assert_eq!(cfg.admin.map(|a| a.address.port()), Some(9901));
    }

    #[test]
    fn schema_errors_name_the_problem() {
        let bad = SMALL.replace(
            "connect_timeout: 0.25s",
            "connect_timeout: 0.25s\n    connect_timeout_typo: 1s",
        );
        let e = bootstrap_text(&bad, "bad.yaml").unwrap_err().to_string();
        assert!(e.starts_with("bad.yaml: ") && e.contains("connect_timeout_typo"), "{e}");
        let e = bootstrap_text("a: [", "broken.yaml").unwrap_err();
        assert!(matches!(e, LoadError::Syntax { .. }), "{e}");
        let unknown = SMALL.replace("router.v3.Router", "router.v3.NoSuchThing");
        let e = bootstrap_text(&unknown, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("NoSuchThing"), "{e}");
    }
}

//! `udpa.type.v1.TypedStruct` and `xds.type.v3.TypedStruct`: a filter config given as a JSON-like
//! `Struct` with the type it stands for. Istio wraps its own filters' configs this way. Neither
//! message is in envoy-types, so it is defined here from its two fields.

use std::borrow::Cow;

use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::Message;

const UDPA: &str = "udpa.type.v1.TypedStruct";
const XDS: &str = "xds.type.v3.TypedStruct";

/// The wrapper: `type_url = 1`, `value = 2`.
#[derive(Clone, PartialEq, Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

/// `any` itself, or what its TypedStruct stands for: the inner type encoded through the built-in
/// descriptors when they know it, otherwise an empty payload of that type (the filter is then
/// judged by its name and type, as Istio's own filters are).
pub(crate) fn unwrap(any: &Any) -> Result<Cow<'_, Any>, String> {
    let name = crate::listener::type_name(any);
    if name != UDPA && name != XDS {
        return Ok(Cow::Borrowed(any));
    }
    let ts = TypedStruct::decode(any.value.as_slice()).map_err(|e| format!("a malformed TypedStruct: {e}"))?;
    if ts.type_url.is_empty() {
        return Err("a TypedStruct needs type_url".into());
    }
    let inner = ts.type_url.rsplit('/').next().unwrap_or("");
    let json = serde_json::Value::Object(
        ts.value
            .unwrap_or_default()
            .fields
            .into_iter()
            .map(|(k, v)| (k, to_json(v)))
            .collect(),
    );
    let value = match crate::load::transcode(inner, json) {
        Ok(bytes) => bytes,
        Err(e) if e.starts_with("no descriptor") => Vec::new(),
        Err(e) => return Err(format!("TypedStruct for `{inner}`: {e}")),
    };
    Ok(Cow::Owned(Any {
        type_url: ts.type_url,
        value,
    }))
}

fn to_json(v: Value) -> serde_json::Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, |n| {
            // Integral numbers as integers, so integer fields take them.
            if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                serde_json::Value::from(n.as_f64().unwrap_or_default() as i64)
            } else {
                serde_json::Value::Number(n)
            }
        }),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StructValue(s)) => {
            serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, to_json(v))).collect())
        }
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.into_iter().map(to_json).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    fn wrap(outer: &str, inner: &str, fields: HashMap<String, Value>) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{outer}"),
            value: TypedStruct {
                type_url: format!("type.googleapis.com/{inner}"),
                value: Some(Struct { fields }),
            }
            .encode_to_vec(),
        }
    }

    #[test]
    fn known_inner_types_are_encoded_and_unknown_ones_keep_their_type() {
        let mut f = HashMap::new();
        f.insert("stat_prefix".to_string(), s("tcp"));
        f.insert("cluster".to_string(), s("backend"));
        let a = wrap(UDPA, "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", f);
        let got = unwrap(&a).unwrap();
        let t =
            envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy::decode(got.value.as_slice())
                .unwrap();
        assert_eq!(t.stat_prefix, "tcp");
        let istio = wrap(XDS, "io.istio.http.peer_metadata.Config", HashMap::new());
        let got = unwrap(&istio).unwrap();
        assert_eq!(got.type_url, "type.googleapis.com/io.istio.http.peer_metadata.Config");
        assert!(got.value.is_empty());
        let mut bad = HashMap::new();
        bad.insert("no_such_field".to_string(), s("x"));
        let e = unwrap(&wrap(
            UDPA,
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            bad,
        ))
        .unwrap_err();
        assert!(e.contains("no_such_field"), "{e}");
        let plain = Any {
            type_url: "type.googleapis.com/x.Y".into(),
            value: vec![1],
        };
        assert!(matches!(unwrap(&plain), Ok(Cow::Borrowed(_))));
    }
}

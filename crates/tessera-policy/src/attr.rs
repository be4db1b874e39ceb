//! Request attributes named in Istio's vocabulary (`source.ip`, `request.headers[x-user]`,
//! `rpc.service`...), and the [`Attributes`] trait through which checks and quotas read them.
//!
//! Names are parsed once, when a policy is built; the request path only matches on [`Attr`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// One attribute of a request.
///
/// Keyed variants hold the key from the brackets: header names are lower-cased by the parser
/// (HTTP header names are case-insensitive); label and attachment keys are kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attr {
    /// `source.ip`: the downstream peer's IP address.
    SourceIp,
    /// `source.port`: the downstream peer's port.
    SourcePort,
    /// `source.principal`: the peer's authenticated identity (SPIFFE id from mTLS).
    SourcePrincipal,
    /// `source.namespace`: the peer workload's namespace, where known.
    SourceNamespace,
    /// `source.labels[k]`: a label of the peer workload, where known.
    SourceLabel(String),
    /// `destination.service`: the service the request is for.
    DestinationService,
    /// `destination.port`: the port the request arrived on.
    DestinationPort,
    /// `destination.namespace`: the destination workload's namespace.
    DestinationNamespace,
    /// `destination.labels[k]`: a label of the destination workload.
    DestinationLabel(String),
    /// `request.host`: the HTTP authority.
    RequestHost,
    /// `request.method`: the HTTP method.
    RequestMethod,
    /// `request.path`: the HTTP path, query included.
    RequestPath,
    /// `request.scheme`: `http` or `https`.
    RequestScheme,
    /// `request.headers[name]`: a request header; the name is lower-case.
    RequestHeader(String),
    /// `rpc.protocol`: the RPC protocol (`bolt`, `dubbo`...).
    RpcProtocol,
    /// `rpc.service`: the RPC service (interface).
    RpcService,
    /// `rpc.method`: the RPC method.
    RpcMethod,
    /// `rpc.version`: the RPC service version.
    RpcVersion,
    /// `rpc.group`: the RPC service group.
    RpcGroup,
    /// `rpc.attachments[k]`: an RPC header or attachment.
    RpcAttachment(String),
    /// `context.protocol`: `tcp`, `http`, `grpc`, `bolt`, `dubbo`...
    ContextProtocol,
}

/// Attributes without a key, by name.
const PLAIN: &[(&str, Attr)] = &[
    ("source.ip", Attr::SourceIp),
    ("source.port", Attr::SourcePort),
    ("source.principal", Attr::SourcePrincipal),
    ("source.namespace", Attr::SourceNamespace),
    ("destination.service", Attr::DestinationService),
    ("destination.port", Attr::DestinationPort),
    ("destination.namespace", Attr::DestinationNamespace),
    ("request.host", Attr::RequestHost),
    ("request.method", Attr::RequestMethod),
    ("request.path", Attr::RequestPath),
    ("request.scheme", Attr::RequestScheme),
    ("rpc.protocol", Attr::RpcProtocol),
    ("rpc.service", Attr::RpcService),
    ("rpc.method", Attr::RpcMethod),
    ("rpc.version", Attr::RpcVersion),
    ("rpc.group", Attr::RpcGroup),
    ("context.protocol", Attr::ContextProtocol),
];

/// Makes a keyed attribute from its key.
type WithKey = fn(String) -> Attr;

/// Attributes with a key in brackets, by the name before the brackets.
const KEYED: &[(&str, WithKey)] = &[
    ("source.labels", Attr::SourceLabel),
    ("destination.labels", Attr::DestinationLabel),
    ("request.headers", Attr::RequestHeader),
    ("rpc.attachments", Attr::RpcAttachment),
];

/// Every accepted form, for error messages.
const KNOWN: &str = "source.ip, source.port, source.principal, source.namespace, source.labels[k], \
destination.service, destination.port, destination.namespace, destination.labels[k], request.host, \
request.method, request.path, request.scheme, request.headers[name], rpc.protocol, rpc.service, \
rpc.method, rpc.version, rpc.group, rpc.attachments[k], context.protocol";

/// Why an attribute name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// The name is empty.
    #[error("empty attribute name; expected one of: {known}", known = KNOWN)]
    Empty,
    /// Not an attribute this crate knows.
    #[error("unknown attribute `{0}`; expected one of: {known}", known = KNOWN)]
    Unknown(String),
    /// A plain attribute was given a key.
    #[error("attribute `{0}` takes no key in brackets")]
    UnexpectedKey(String),
    /// A keyed attribute was given without one.
    #[error("attribute `{0}` needs a key in brackets, e.g. `{0}[name]`")]
    MissingKey(String),
    /// The brackets are empty.
    #[error("attribute `{0}`: the key in brackets is empty")]
    EmptyKey(String),
    /// The brackets are not closed at the end of the name, or the key holds a bracket.
    #[error("attribute `{0}`: write the key as `name[key]`, with nothing after `]` and no brackets inside the key")]
    Malformed(String),
}

impl FromStr for Attr {
    type Err = AttrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(AttrError::Empty);
        }
        let Some((base, rest)) = s.split_once('[') else {
            if let Some((_, attr)) = PLAIN.iter().find(|(name, _)| *name == s) {
                return Ok(attr.clone());
            }
            if KEYED.iter().any(|(name, _)| *name == s) {
                return Err(AttrError::MissingKey(s.to_owned()));
            }
            return Err(AttrError::Unknown(s.to_owned()));
        };
        let Some(&(_, make)) = KEYED.iter().find(|(name, _)| *name == base) else {
            if PLAIN.iter().any(|(name, _)| *name == base) {
                return Err(AttrError::UnexpectedKey(base.to_owned()));
            }
            return Err(AttrError::Unknown(s.to_owned()));
        };
        let key = match rest.strip_suffix(']') {
            Some(key) if !key.contains(['[', ']']) => key,
            _ => return Err(AttrError::Malformed(s.to_owned())),
        };
        if key.is_empty() {
            return Err(AttrError::EmptyKey(s.to_owned()));
        }
        let key = if base == "request.headers" {
            key.to_ascii_lowercase()
        } else {
            key.to_owned()
        };
        Ok(make(key))
    }
}

impl Attr {
    /// The name without its key (`request.headers` for `request.headers[x-user]`).
    pub fn base_name(&self) -> &'static str {
        match self {
            Attr::SourceIp => "source.ip",
            Attr::SourcePort => "source.port",
            Attr::SourcePrincipal => "source.principal",
            Attr::SourceNamespace => "source.namespace",
            Attr::SourceLabel(_) => "source.labels",
            Attr::DestinationService => "destination.service",
            Attr::DestinationPort => "destination.port",
            Attr::DestinationNamespace => "destination.namespace",
            Attr::DestinationLabel(_) => "destination.labels",
            Attr::RequestHost => "request.host",
            Attr::RequestMethod => "request.method",
            Attr::RequestPath => "request.path",
            Attr::RequestScheme => "request.scheme",
            Attr::RequestHeader(_) => "request.headers",
            Attr::RpcProtocol => "rpc.protocol",
            Attr::RpcService => "rpc.service",
            Attr::RpcMethod => "rpc.method",
            Attr::RpcVersion => "rpc.version",
            Attr::RpcGroup => "rpc.group",
            Attr::RpcAttachment(_) => "rpc.attachments",
            Attr::ContextProtocol => "context.protocol",
        }
    }

    /// The key in brackets, for keyed attributes.
    pub fn key(&self) -> Option<&str> {
        match self {
            Attr::SourceLabel(k) | Attr::DestinationLabel(k) | Attr::RequestHeader(k) | Attr::RpcAttachment(k) => {
                Some(k)
            }
            _ => None,
        }
    }
}

/// Prints the name as parsed, so `a.to_string().parse() == Ok(a)`.
impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key() {
            Some(key) => write!(f, "{}[{key}]", self.base_name()),
            None => f.write_str(self.base_name()),
        }
    }
}

/// A request as policies see it. The proxy implements this over its request view; values are
/// borrowed from the request where they can be, so a lookup is cheap.
///
/// A header with several values should read as the values joined with `,` (as Envoy does); an
/// attribute the request does not have (no such header, no mTLS principal) is `None`.
pub trait Attributes {
    /// The value of `attr`, or `None` when the request does not have it.
    fn get(&self, attr: &Attr) -> Option<Cow<'_, str>>;

    /// Calls `f` with every request header (lower-case name, value), for policies that read
    /// them all (OPA's `input.request.headers`). Repeated headers come once each.
    fn each_header(&self, _f: &mut dyn FnMut(&str, &str)) {}

    /// Calls `f` with every RPC header or attachment (`input.rpc.attachments`).
    fn each_attachment(&self, _f: &mut dyn FnMut(&str, &str)) {}
}

impl<T: Attributes + ?Sized> Attributes for &T {
    fn get(&self, attr: &Attr) -> Option<Cow<'_, str>> {
        (**self).get(attr)
    }

    fn each_header(&self, f: &mut dyn FnMut(&str, &str)) {
        (**self).each_header(f)
    }

    fn each_attachment(&self, f: &mut dyn FnMut(&str, &str)) {
        (**self).each_attachment(f)
    }
}

/// Attributes held in a map, for tests and tools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapAttributes {
    values: HashMap<Attr, String>,
}

impl MapAttributes {
    /// No attributes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `attr` to `value`, replacing any earlier value.
    pub fn insert(&mut self, attr: Attr, value: impl Into<String>) {
        self.values.insert(attr, value.into());
    }

    /// These attributes with `attr` set to `value`.
    pub fn with(mut self, attr: Attr, value: impl Into<String>) -> Self {
        self.insert(attr, value);
        self
    }

    /// Attributes from `(name, value)` pairs, names parsed as in config.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, AttrError> {
        let mut out = Self::new();
        for (name, value) in pairs {
            out.insert(name.parse()?, value);
        }
        Ok(out)
    }
}

impl Attributes for MapAttributes {
    fn get(&self, attr: &Attr) -> Option<Cow<'_, str>> {
        self.values.get(attr).map(|v| Cow::Borrowed(v.as_str()))
    }

    fn each_header(&self, f: &mut dyn FnMut(&str, &str)) {
        for (k, v) in &self.values {
            if let Attr::RequestHeader(name) = k {
                f(name, v);
            }
        }
    }

    fn each_attachment(&self, f: &mut dyn FnMut(&str, &str)) {
        for (k, v) in &self.values {
            if let Attr::RpcAttachment(name) = k {
                f(name, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name() {
        let table: &[(&str, Attr)] = &[
            ("source.ip", Attr::SourceIp),
            ("source.port", Attr::SourcePort),
            ("source.principal", Attr::SourcePrincipal),
            ("source.namespace", Attr::SourceNamespace),
            ("source.labels[app]", Attr::SourceLabel("app".into())),
            ("destination.service", Attr::DestinationService),
            ("destination.port", Attr::DestinationPort),
            ("destination.namespace", Attr::DestinationNamespace),
            ("destination.labels[Version]", Attr::DestinationLabel("Version".into())),
            ("request.host", Attr::RequestHost),
            ("request.method", Attr::RequestMethod),
            ("request.path", Attr::RequestPath),
            ("request.scheme", Attr::RequestScheme),
            ("request.headers[x-user]", Attr::RequestHeader("x-user".into())),
            ("request.headers[X-User]", Attr::RequestHeader("x-user".into())),
            ("rpc.protocol", Attr::RpcProtocol),
            ("rpc.service", Attr::RpcService),
            ("rpc.method", Attr::RpcMethod),
            ("rpc.version", Attr::RpcVersion),
            ("rpc.group", Attr::RpcGroup),
            ("rpc.attachments[Tenant]", Attr::RpcAttachment("Tenant".into())),
            ("context.protocol", Attr::ContextProtocol),
        ];
        for (name, want) in table {
            assert_eq!(name.parse::<Attr>().as_ref(), Ok(want), "{name}");
        }
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        let table: &[(&str, AttrError)] = &[
            ("", AttrError::Empty),
            ("source.ipp", AttrError::Unknown("source.ipp".into())),
            (" source.ip", AttrError::Unknown(" source.ip".into())),
            ("SOURCE.IP", AttrError::Unknown("SOURCE.IP".into())),
            ("request.header[x]", AttrError::Unknown("request.header[x]".into())),
            ("source.ip[x]", AttrError::UnexpectedKey("source.ip".into())),
            ("request.headers", AttrError::MissingKey("request.headers".into())),
            ("request.headers[]", AttrError::EmptyKey("request.headers[]".into())),
            ("request.headers[x", AttrError::Malformed("request.headers[x".into())),
            (
                "request.headers[x]y",
                AttrError::Malformed("request.headers[x]y".into()),
            ),
            (
                "request.headers[a[b]]",
                AttrError::Malformed("request.headers[a[b]]".into()),
            ),
        ];
        for (name, want) in table {
            assert_eq!(name.parse::<Attr>().as_ref(), Err(want), "{name:?}");
        }
    }

    #[test]
    fn errors_say_what_to_write() {
        let unknown = "source.ipp".parse::<Attr>().unwrap_err().to_string();
        assert!(unknown.contains("unknown attribute `source.ipp`"), "{unknown}");
        assert!(unknown.contains("request.headers[name]"), "{unknown}");
        let missing = "request.headers".parse::<Attr>().unwrap_err().to_string();
        assert_eq!(
            missing,
            "attribute `request.headers` needs a key in brackets, e.g. `request.headers[name]`"
        );
    }

    #[test]
    fn display_round_trips() {
        for name in KNOWN.split(", ") {
            let name = name.replace("[k]", "[app]").replace("[name]", "[x-user]");
            let attr: Attr = name.parse().unwrap();
            assert_eq!(attr.to_string(), name);
        }
        assert_eq!(KNOWN.split(", ").count(), PLAIN.len() + KEYED.len());
    }

    #[test]
    fn map_attributes_answer_what_they_hold() {
        let attrs = MapAttributes::parse([("request.headers[X-User]", "ann"), ("source.ip", "10.1.2.3")]).unwrap();
        assert_eq!(attrs.get(&Attr::RequestHeader("x-user".into())).as_deref(), Some("ann"));
        assert_eq!(attrs.get(&Attr::SourceIp).as_deref(), Some("10.1.2.3"));
        assert_eq!(attrs.get(&Attr::SourcePrincipal), None);
        assert!(MapAttributes::parse([("bogus", "x")]).is_err());
    }
}

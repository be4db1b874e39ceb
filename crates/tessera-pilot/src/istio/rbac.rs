//! AuthorizationPolicy into Envoy RBAC (`envoy.filters.http.rbac`), as Istio compiles it: one
//! Envoy policy per rule; a rule's sources are OR'ed, its operations are OR'ed, and sources,
//! operations and conditions are AND'ed. ALLOW and DENY policies become two filters, DENY first.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac, permission, principal, rbac};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use serde_json::Value;

use super::parse::{AuthorizationPolicy, Meta};
use super::read::{Cx, O, join, list, obj, one_of, strings, sub};

/// The root namespace: its policies apply to every workload, as in Istio.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The HTTP filter name the sidecar and Envoy know RBAC by.
pub const RBAC_FILTER: &str = "envoy.filters.http.rbac";

fn sm(p: string_matcher::MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(p),
        ignore_case: false,
    }
}

fn regex(r: String) -> StringMatcher {
    sm(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
        regex: r,
        ..Default::default()
    }))
}

/// Istio's value forms: `x`, `x*` (prefix), `*x` (suffix), `*` (any non-empty value).
fn value(v: &str, prefix: &str) -> StringMatcher {
    use string_matcher::MatchPattern as M;
    if v == "*" {
        regex(".+".into())
    } else if let Some(s) = v.strip_prefix('*') {
        sm(M::Suffix(s.to_string()))
    } else if let Some(s) = v.strip_suffix('*') {
        sm(M::Prefix(format!("{prefix}{s}")))
    } else {
        sm(M::Exact(format!("{prefix}{v}")))
    }
}

/// A glob (`*` anywhere) as an escaped RE2 pattern.
fn glob(v: &str) -> String {
    v.split('*').map(regex_escape).collect::<Vec<_>>().join(".*")
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(m),
        })),
    }
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn any_id() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn and_rules(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn any_rule() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn header(name: &str, v: &str) -> HeaderMatcher {
    let spec = if v == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else {
        header_matcher::HeaderMatchSpecifier::StringMatch(value(v, ""))
    };
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn cidr(cx: &mut Cx, v: &str, at: &str) -> Option<CidrRange> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (v, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        cx.add(at, format!("`{v}` is not an IP address or CIDR range"));
        return None;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) if l <= max => l,
        None if !v.contains('/') => max,
        _ => {
            cx.add(at, format!("`{v}`: the prefix length must be 0 to {max}"));
            return None;
        }
    };
    Some(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    })
}

/// One source or condition field's values as principals (OR'ed).
fn principal_values(cx: &mut Cx, field: &str, values: &[String], ns: &str, at: &str) -> Option<Principal> {
    let mut ids = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let id = match field {
            "principals" | "source.principal" => authenticated(value(v, "spiffe://")),
            "namespaces" | "source.namespace" => authenticated(regex(format!(".*/ns/{}/.*", glob(v)))),
            "trustDomains" | "source.trustDomain" => authenticated(regex(format!("spiffe://{}/.*", glob(v)))),
            "serviceAccounts" => {
                let (sa_ns, sa) = v.split_once('/').unwrap_or((ns, v));
                if sa.is_empty() || sa_ns.is_empty() || sa.contains('/') {
                    cx.add(&here, format!("`{v}`: a service account is `name` or `namespace/name`"));
                    continue;
                }
                authenticated(value(&format!("cluster.local/ns/{sa_ns}/sa/{sa}"), "spiffe://"))
            }
            "ipBlocks" | "source.ip" => Principal {
                identifier: Some(principal::Identifier::DirectRemoteIp(cidr(cx, v, &here)?)),
            },
            "remoteIpBlocks" | "remote.ip" => Principal {
                identifier: Some(principal::Identifier::RemoteIp(cidr(cx, v, &here)?)),
            },
            _ => return None,
        };
        ids.push(id);
    }
    Some(or_ids(ids))
}

/// One operation or condition field's values as permissions (OR'ed).
fn permission_values(cx: &mut Cx, field: &str, values: &[String], at: &str) -> Option<Permission> {
    let mut rules = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let r = match field {
            "methods" => permission::Rule::Header(header(":method", v)),
            "hosts" => {
                let mut h = header(":authority", v);
                if let Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) = &mut h.header_match_specifier {
                    s.ignore_case = true;
                }
                permission::Rule::Header(h)
            }
            "paths" => {
                if v.contains('{') || v.contains('}') {
                    cx.add(
                        &here,
                        format!("`{v}`: path templates ({{*}}, {{**}}) are not supported by the sidecar's RBAC"),
                    );
                    continue;
                }
                let m = if v == "*" {
                    sm(string_matcher::MatchPattern::Prefix("/".into()))
                } else {
                    value(v, "")
                };
                permission::Rule::UrlPath(PathMatcher {
                    rule: Some(path_matcher::Rule::Path(m)),
                })
            }
            "ports" | "destination.port" => match v.parse::<u16>() {
                Ok(p) if p > 0 => permission::Rule::DestinationPort(u32::from(p)),
                _ => {
                    cx.add(&here, format!("`{v}` is not a port"));
                    continue;
                }
            },
            _ => return None,
        };
        rules.push(Permission { rule: Some(r) });
    }
    Some(or_rules(rules))
}

const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "namespaces",
    "ipBlocks",
    "remoteIpBlocks",
    "serviceAccounts",
    "trustDomains",
];
const JWT: &str = "request principals and request.auth.* need JWT authentication (RequestAuthentication), which the sidecar does not support";

fn cap(f: &str) -> String {
    let mut c = f.chars();
    c.next()
        .map(|h| h.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

fn source(cx: &mut Cx, v: &Value, at: &str, ns: &str) -> Option<Principal> {
    let mut known: Vec<String> = Vec::new();
    for f in SOURCE_FIELDS.iter().chain(&["requestPrincipals"]) {
        known.push(f.to_string());
        known.push(format!("not{}", cap(f)));
    }
    let known_ref: Vec<&str> = known.iter().map(String::as_str).collect();
    let o = obj(cx, v, at, &known_ref)?;
    o.refuse(cx, at, "requestPrincipals", JWT);
    o.refuse(cx, at, "notRequestPrincipals", JWT);
    let mut ids = Vec::new();
    for f in SOURCE_FIELDS {
        for (k, neg) in [(f.to_string(), false), (format!("not{}", cap(f)), true)] {
            let vals = strings(cx, o, at, &k);
            if !o.has(&k) {
                continue;
            }
            if vals.is_empty() {
                cx.add(&join(at, &k), "an empty list matches nothing; leave the field out");
                continue;
            }
            if let Some(p) = principal_values(cx, f, &vals, ns, &join(at, &k)) {
                ids.push(if neg { not_id(p) } else { p });
            }
        }
    }
    if ids.is_empty() {
        cx.add(at, "a source needs at least one field");
    }
    Some(and_ids(ids))
}

fn operation(cx: &mut Cx, v: &Value, at: &str) -> Option<Permission> {
    let fields = ["hosts", "ports", "methods", "paths"];
    let o = obj(
        cx,
        v,
        at,
        &[
            "hosts",
            "notHosts",
            "ports",
            "notPorts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ],
    )?;
    let mut rules = Vec::new();
    for f in fields {
        for (k, neg) in [(f.to_string(), false), (format!("not{}", cap(f)), true)] {
            if !o.has(&k) {
                continue;
            }
            let vals = strings(cx, o, at, &k);
            if vals.is_empty() {
                cx.add(&join(at, &k), "an empty list matches nothing; leave the field out");
                continue;
            }
            if let Some(p) = permission_values(cx, f, &vals, &join(at, &k)) {
                rules.push(if neg { not_rule(p) } else { p });
            }
        }
    }
    if rules.is_empty() {
        cx.add(at, "an operation needs at least one field");
    }
    Some(and_rules(rules))
}

/// A `when` condition: a permission or a principal.
enum Cond {
    Perm(Permission),
    Id(Principal),
}

fn condition(cx: &mut Cx, v: &Value, at: &str, ns: &str) -> Option<Cond> {
    let o = obj(cx, v, at, &["key", "values", "notValues"])?;
    let key = super::read::string(cx, o, at, "key").unwrap_or_default();
    let values = strings(cx, o, at, "values");
    let not_values = strings(cx, o, at, "notValues");
    if values.is_empty() && not_values.is_empty() {
        cx.add(at, "values or notValues is required");
        return None;
    }
    let kat = join(at, "key");
    let header_name = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
        .map(str::to_ascii_lowercase);
    let perm_field = match key.as_str() {
        "destination.port" => Some("destination.port"),
        _ => None,
    };
    let id_field = match key.as_str() {
        "source.ip" | "remote.ip" | "source.namespace" | "source.principal" | "source.trustDomain" => {
            Some(key.as_str())
        }
        _ => None,
    };
    let mut parts_p = Vec::new();
    let mut parts_i = Vec::new();
    for (vals, k, neg) in [(&values, "values", false), (&not_values, "notValues", true)] {
        if vals.is_empty() {
            continue;
        }
        let here = join(at, k);
        if let Some(h) = &header_name {
            let p = or_rules(
                vals.iter()
                    .map(|v| Permission {
                        rule: Some(permission::Rule::Header(header(h, v))),
                    })
                    .collect(),
            );
            parts_p.push(if neg { not_rule(p) } else { p });
        } else if let Some(f) = perm_field
            && let Some(p) = permission_values(cx, f, vals, &here)
        {
            parts_p.push(if neg { not_rule(p) } else { p });
        } else if let Some(f) = id_field
            && let Some(p) = principal_values(cx, f, vals, ns, &here)
        {
            parts_i.push(if neg { not_id(p) } else { p });
        }
    }
    if header_name.is_some() || perm_field.is_some() {
        return Some(Cond::Perm(and_rules(parts_p)));
    }
    if id_field.is_some() {
        return Some(Cond::Id(and_ids(parts_i)));
    }
    let reason = if key.starts_with("request.auth.") {
        JWT.to_string()
    } else if key == "destination.ip" || key == "connection.sni" || key.starts_with("experimental.") {
        format!(
            "`{key}` is not supported by the sidecar's RBAC (it matches headers, paths, ports, peer addresses and peer certificates)"
        )
    } else {
        format!("`{key}` is not a condition key Istio defines")
    };
    cx.add(&kat, reason);
    None
}

pub(crate) fn authorization_policy(cx: &mut Cx, v: &Value, meta: Meta) -> Option<AuthorizationPolicy> {
    let at = "spec";
    let o: O<'_> = obj(
        cx,
        v,
        at,
        &["selector", "targetRef", "targetRefs", "rules", "action", "provider"],
    )?;
    let selector = super::parse::selector(cx, o);
    o.refuse(
        cx,
        at,
        "targetRef",
        "policies attached to gateways or waypoints are not supported; use selector",
    );
    o.refuse(
        cx,
        at,
        "targetRefs",
        "policies attached to gateways or waypoints are not supported; use selector",
    );
    let action = one_of(cx, o, at, "action", &["ALLOW", "DENY", "AUDIT", "CUSTOM"]).unwrap_or_else(|| "ALLOW".into());
    match action.as_str() {
        "CUSTOM" => cx.add(
            "spec.action",
            "CUSTOM delegates the decision to an external authorizer (ext_authz), which the sidecar does not support",
        ),
        "AUDIT" => cx.add(
            "spec.action",
            "AUDIT needs an audit logging provider, which the sidecar does not support",
        ),
        _ => o.refuse(cx, at, "provider", "only with action CUSTOM"),
    }
    let _ = sub(cx, o, at, "provider", &["name"]);
    let ns = meta.namespace.clone();
    let mut policies = Vec::new();
    for (i, (here, r)) in list(cx, o, at, "rules").into_iter().enumerate() {
        let Some(ro) = obj(cx, r, &here, &["from", "to", "when"]) else {
            continue;
        };
        let mut principals = Vec::new();
        for (fat, f) in list(cx, ro, &here, "from") {
            if let Some(fo) = obj(cx, f, &fat, &["source"])
                && let Some(s) = fo.get("source")
                && let Some(p) = source(cx, s, &join(&fat, "source"), &ns)
            {
                principals.push(p);
            }
        }
        let mut permissions = Vec::new();
        for (tat, t) in list(cx, ro, &here, "to") {
            if let Some(to) = obj(cx, t, &tat, &["operation"])
                && let Some(op) = to.get("operation")
                && let Some(p) = operation(cx, op, &join(&tat, "operation"))
            {
                permissions.push(p);
            }
        }
        let mut cond_p = Vec::new();
        let mut cond_i = Vec::new();
        for (wat, w) in list(cx, ro, &here, "when") {
            match condition(cx, w, &wat, &ns) {
                Some(Cond::Perm(p)) => cond_p.push(p),
                Some(Cond::Id(p)) => cond_i.push(p),
                None => {}
            }
        }
        let mut perm = vec![if permissions.is_empty() {
            any_rule()
        } else {
            or_rules(permissions)
        }];
        perm.extend(cond_p);
        let mut ids = vec![if principals.is_empty() {
            any_id()
        } else {
            or_ids(principals)
        }];
        ids.extend(cond_i);
        policies.push((
            format!("ns[{ns}]-policy[{}]-rule[{i}]", meta.name),
            Policy {
                permissions: vec![and_rules(perm)],
                principals: vec![and_ids(ids)],
                ..Default::default()
            },
        ));
    }
    Some(AuthorizationPolicy {
        meta,
        selector,
        deny: action == "DENY",
        policies,
    })
}

/// The RBAC filter configs for a workload with `labels` in `namespace`: DENY first, then ALLOW,
/// as Istio orders them; none when no policy selects the workload. Applied on inbound listeners.
pub fn filters<'a>(
    policies: impl Iterator<Item = &'a AuthorizationPolicy>,
    labels: &BTreeMap<String, String>,
    namespace: &str,
) -> Vec<RbacFilter> {
    let mut deny = BTreeMap::new();
    let mut allow = BTreeMap::new();
    let mut any_allow = false;
    for p in policies {
        let applies = (p.meta.namespace == namespace || p.meta.namespace == ROOT_NAMESPACE)
            && p.selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        if !applies {
            continue;
        }
        any_allow |= !p.deny;
        let into = if p.deny { &mut deny } else { &mut allow };
        for (n, pol) in &p.policies {
            into.insert(n.clone(), pol.clone());
        }
    }
    let mut out = Vec::new();
    if !deny.is_empty() {
        out.push(RbacFilter {
            rules: Some(Rbac {
                action: rbac::Action::Deny as i32,
                policies: deny.into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    // An ALLOW policy without rules still counts: it allows nothing, so everything else is denied.
    if any_allow {
        out.push(RbacFilter {
            rules: Some(Rbac {
                action: rbac::Action::Allow as i32,
                policies: allow.into_iter().collect(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    out
}

//! `envoy.filters.http.rbac` (what Istio's AuthorizationPolicy compiles to) into a Tessera RBAC
//! check on the connection manager's policy: ALLOW / DENY / LOG rules, shadow rules, permissions
//! and principals. CEL conditions, metadata and filter-state matchers are refused.

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac, permission, principal};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, path_matcher};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tessera_model as model;

use crate::Problems;

pub(crate) const RBAC: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";

/// The filter's checks: the rules, then the shadow rules (each a check of its own).
pub(crate) fn rbac(any: &Any, name: &str, at: &str, p: &mut Problems) -> Vec<model::Check> {
    let Ok(f) = RbacFilter::decode(any.value.as_slice()).map_err(|e| p.add(at, format!("malformed {RBAC}: {e}")))
    else {
        return Vec::new();
    };
    if f.matcher.is_some() || f.shadow_matcher.is_some() {
        p.add(at, "the matcher form of RBAC is not supported; use rules");
    }
    let mut out = Vec::new();
    if let Some(r) = &f.rules {
        out.extend(check(r, name.to_string(), false, &format!("{at}.rules"), p));
    }
    if let Some(r) = &f.shadow_rules {
        out.extend(check(
            r,
            format!("{name}-shadow"),
            true,
            &format!("{at}.shadow_rules"),
            p,
        ));
    }
    out
}

fn check(r: &Rbac, name: String, shadow: bool, at: &str, p: &mut Problems) -> Option<model::Check> {
    let action = match r.action {
        0 => model::RbacAction::Allow,
        1 => model::RbacAction::Deny,
        2 => model::RbacAction::Log,
        other => {
            p.add(format!("{at}.action"), format!("unknown action {other}"));
            return None;
        }
    };
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for n in names {
        let pol: &Policy = &r.policies[n];
        let pat = format!("{at}.policies[\"{n}\"]");
        if pol.condition.is_some() || pol.checked_condition.is_some() {
            p.add(format!("{pat}.condition"), "CEL conditions are not supported");
            continue;
        }
        let permissions: Vec<_> = pol
            .permissions
            .iter()
            .enumerate()
            .filter_map(|(i, x)| perm(x, &format!("{pat}.permissions[{i}]"), p))
            .collect();
        let principals: Vec<_> = pol
            .principals
            .iter()
            .enumerate()
            .filter_map(|(i, x)| princ(x, &format!("{pat}.principals[{i}]"), p))
            .collect();
        policies.push((
            n.clone(),
            model::RbacPolicy {
                permissions,
                principals,
            },
        ));
    }
    Some(model::Check::Rbac(model::RbacCheck {
        name,
        action,
        shadow,
        policies,
    }))
}

fn path(m: &PathMatcher, at: &str, p: &mut Problems) -> Option<model::CaseMatch> {
    let Some(path_matcher::Rule::Path(sm)) = &m.rule else {
        p.add(at, "a path matcher needs `path`");
        return None;
    };
    let (matcher, ignore_case) = crate::route::string_match(sm, at, p)?;
    Some(model::CaseMatch { matcher, ignore_case })
}

fn cidr(c: &CidrRange, at: &str, p: &mut Problems) -> Option<model::Cidr> {
    let len = c
        .prefix_len
        .as_ref()
        .map_or(if c.address_prefix.contains(':') { 128 } else { 32 }, |l| l.value);
    let text = format!("{}/{len}", c.address_prefix);
    model::Cidr::parse(&text).or_else(|| {
        p.add(at, format!("`{text}` is not a CIDR range"));
        None
    })
}

fn perm(x: &Permission, at: &str, p: &mut Problems) -> Option<model::Permission> {
    use permission::Rule as R;
    let all = |v: &[Permission], at: &str, p: &mut Problems| -> Vec<model::Permission> {
        v.iter()
            .enumerate()
            .filter_map(|(i, x)| perm(x, &format!("{at}[{i}]"), p))
            .collect()
    };
    Some(match x.rule.as_ref() {
        Some(R::Any(true)) => model::Permission::Any,
        Some(R::AndRules(s)) => model::Permission::AndRules(all(&s.rules, &format!("{at}.and_rules.rules"), p)),
        Some(R::OrRules(s)) => model::Permission::OrRules(all(&s.rules, &format!("{at}.or_rules.rules"), p)),
        Some(R::NotRule(n)) => model::Permission::NotRule(Box::new(perm(n, &format!("{at}.not_rule"), p)?)),
        Some(R::Header(h)) => model::Permission::Header(crate::route::header_matcher(h, &format!("{at}.header"), p)?),
        Some(R::UrlPath(m)) => model::Permission::UrlPath(path(m, &format!("{at}.url_path"), p)?),
        Some(R::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(port) => model::Permission::DestinationPort(port),
            Err(_) => {
                p.add(format!("{at}.destination_port"), format!("{port} is not a port"));
                return None;
            }
        },
        Some(R::DestinationPortRange(r)) => match (u16::try_from(r.start), u16::try_from(r.end.min(65535))) {
            (Ok(a), Ok(b)) if a < b => model::Permission::DestinationPortRange(a, b),
            _ => {
                p.add(
                    format!("{at}.destination_port_range"),
                    "start must be below end, within 0..65536",
                );
                return None;
            }
        },
        _ => {
            p.add(
                at,
                "this permission is not supported (use any, and/or/not, header, url_path, destination_port[_range])",
            );
            return None;
        }
    })
}

fn princ(x: &Principal, at: &str, p: &mut Problems) -> Option<model::Principal> {
    use principal::Identifier as I;
    let all = |v: &[Principal], at: &str, p: &mut Problems| -> Vec<model::Principal> {
        v.iter()
            .enumerate()
            .filter_map(|(i, x)| princ(x, &format!("{at}[{i}]"), p))
            .collect()
    };
    #[allow(deprecated)] // source_ip is deprecated but Istio and many configs still write it
    let id = x.identifier.as_ref();
    Some(match id {
        Some(I::Any(true)) => model::Principal::Any,
        Some(I::AndIds(s)) => model::Principal::AndIds(all(&s.ids, &format!("{at}.and_ids.ids"), p)),
        Some(I::OrIds(s)) => model::Principal::OrIds(all(&s.ids, &format!("{at}.or_ids.ids"), p)),
        Some(I::NotId(n)) => model::Principal::NotId(Box::new(princ(n, &format!("{at}.not_id"), p)?)),
        Some(I::Authenticated(a)) => {
            let sm = a.principal_name.as_ref();
            let m = sm.and_then(|sm| crate::route::string_match(sm, &format!("{at}.authenticated"), p))?;
            model::Principal::Authenticated(model::CaseMatch {
                matcher: m.0,
                ignore_case: m.1,
            })
        }
        #[allow(deprecated)]
        Some(I::SourceIp(c)) => model::Principal::SourceIp(cidr(c, &format!("{at}.source_ip"), p)?),
        Some(I::DirectRemoteIp(c)) => model::Principal::SourceIp(cidr(c, &format!("{at}.direct_remote_ip"), p)?),
        Some(I::RemoteIp(c)) => model::Principal::SourceIp(cidr(c, &format!("{at}.remote_ip"), p)?),
        Some(I::Header(h)) => model::Principal::Header(crate::route::header_matcher(h, &format!("{at}.header"), p)?),
        _ => {
            p.add(
                at,
                "this principal is not supported (use any, and/or/not, authenticated, *_ip, header)",
            );
            return None;
        }
    })
}

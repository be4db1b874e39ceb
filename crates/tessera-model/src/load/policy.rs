//! Decoding `policy:` blocks (checks and quotas) of HTTP connection managers and RPC chains.

use std::collections::HashSet;
use std::time::Duration;

use crate::decode::{Ctx, Obj, Path, enumeration, parse_scalar, string};
use crate::policy::*;
use crate::yaml::{Kind, Node};

/// Whether `name` is an attribute the sidecar knows (Istio's vocabulary); the reason when not.
pub(crate) fn attribute(name: &str) -> Result<(), String> {
    const PLAIN: &[&str] = &[
        "source.ip",
        "source.port",
        "source.principal",
        "source.namespace",
        "destination.service",
        "destination.port",
        "destination.namespace",
        "request.host",
        "request.method",
        "request.path",
        "request.scheme",
        "rpc.protocol",
        "rpc.service",
        "rpc.method",
        "rpc.version",
        "rpc.group",
        "context.protocol",
    ];
    const KEYED: &[&str] = &[
        "source.labels",
        "destination.labels",
        "request.headers",
        "rpc.attachments",
    ];
    if PLAIN.contains(&name) {
        return Ok(());
    }
    if let Some((base, rest)) = name.split_once('[')
        && KEYED.contains(&base)
        && rest.len() > 1
        && rest.ends_with(']')
        && !rest[..rest.len() - 1].contains([']', '['])
    {
        return Ok(());
    }
    Err(format!(
        "unknown attribute `{name}`; known: {}, and {}",
        PLAIN.join(", "),
        KEYED
            .iter()
            .map(|k| format!("{k}[NAME]"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn attr(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<String> {
    let name = string(ctx, n, p)?;
    match attribute(&name) {
        Ok(()) => Some(name),
        Err(why) => {
            ctx.error(n.mark, p, why);
            None
        }
    }
}

pub(super) fn policy(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Policy> {
    let mut o = Obj::open(ctx, n, p)?;
    let checks = o.list(ctx, "checks", check);
    let quotas = o.list(ctx, "quotas", quota);
    o.finish(ctx);
    let mut seen = HashSet::new();
    for name in checks
        .iter()
        .map(Check::name)
        .chain(quotas.iter().map(|q| q.name.as_str()))
    {
        if !seen.insert(name.to_string()) {
            ctx.error(n.mark, p, format!("two checks or quotas are named `{name}`"));
        }
    }
    Some(Policy { checks, quotas })
}

fn check(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Check> {
    let mut o = Obj::open(ctx, n, p)?;
    let list = o.get("list");
    let rbac = o.get("rbac");
    let opa = o.get("opa");
    let ext = o.get("ext_authz");
    o.finish(ctx);
    match (list, rbac, opa, ext) {
        (Some((n, p)), None, None, None) => list_check(ctx, n, &p).map(Check::List),
        (None, Some((n, p)), None, None) => rbac_check(ctx, n, &p).map(Check::Rbac),
        (None, None, Some((n, p)), None) => opa_check(ctx, n, &p).map(Check::Opa),
        (None, None, None, Some((n, p))) => ext_authz_check(ctx, n, &p).map(Check::ExtAuthz),
        (None, None, None, None) => {
            ctx.error(
                n.mark,
                p,
                "a check has one of `list: {...}`, `rbac: {...}`, `opa: {...}`, `ext_authz: {...}`",
            );
            None
        }
        _ => {
            ctx.error(
                n.mark,
                p,
                "a check has only one of `list`, `rbac`, `opa`, `ext_authz`; write two checks",
            );
            None
        }
    }
}

/// `ext_authz: { name, address, timeout, fail_open }`.
fn ext_authz_check(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<ExtAuthzCheck> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let address = o.req_string(ctx, "address");
    let timeout = o.duration(ctx, "timeout").unwrap_or(Duration::from_millis(200));
    let fail_open = o.bool(ctx, "fail_open").unwrap_or(false);
    o.finish(ctx);
    if let Some(a) = &address
        && super::split_host_port(a).is_none()
    {
        ctx.error(n.mark, &p.field("address"), format!("`{a}` is not host:port"));
        return None;
    }
    Some(ExtAuthzCheck {
        name: name?,
        address: address?,
        timeout,
        fail_open,
    })
}

fn list_check(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<ListCheck> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let attribute = o.require(ctx, "attribute").and_then(|(n, p)| attr(ctx, n, &p));
    let kind = o
        .get("kind")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("strings", ListKind::Strings),
                    ("regex", ListKind::Regex),
                    ("ip_addresses", ListKind::IpAddresses),
                ],
            )
        })
        .unwrap_or(ListKind::Strings);
    let entries = o.list(ctx, "entries", string);
    let file = o.string(ctx, "file").map(|f| super::tls::resolve(ctx, &f));
    let blacklist = o.bool(ctx, "blacklist").unwrap_or(false);
    let case_insensitive = o.bool(ctx, "case_insensitive").unwrap_or(false);
    if entries.is_empty() && file.is_none() && !blacklist {
        ctx.error(
            o.mark,
            &o.path,
            "an allow list with no `entries` and no `file` denies everything",
        );
    }
    o.finish(ctx);
    Some(ListCheck {
        name: name?,
        attribute: attribute?,
        kind,
        entries,
        file,
        blacklist,
        case_insensitive,
    })
}

fn quota(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Quota> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let max = o
        .require(ctx, "max")
        .and_then(|(n, p)| crate::decode::uint(ctx, n, &p, 1, u64::from(u32::MAX)));
    let window = o.require(ctx, "window").and_then(|(n, p)| {
        parse_scalar(ctx, n, &p, "a duration of at least 1ms", |s| {
            crate::parse_duration(s).filter(|d| *d >= Duration::from_millis(1))
        })
    });
    let algorithm = o
        .get("algorithm")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("fixed_window", QuotaAlgorithm::FixedWindow),
                    ("rolling_window", QuotaAlgorithm::RollingWindow),
                ],
            )
        })
        .unwrap_or(QuotaAlgorithm::FixedWindow);
    let dimensions = o.list(ctx, "dimensions", attr);
    let overrides = o.list(ctx, "overrides", |ctx, n, p| {
        let mut ov = Obj::open(ctx, n, p)?;
        let max = ov
            .require(ctx, "max")
            .and_then(|(n, p)| crate::decode::uint(ctx, n, &p, 0, u64::from(u32::MAX)));
        let dims = ov.require(ctx, "dimensions").and_then(|(n, p)| match &n.kind {
            Kind::Map(entries) => {
                let mut out = Vec::new();
                for (k, v) in entries {
                    let key = attr(ctx, k, &p)?;
                    let value = string(ctx, v, &p.field(&key))?;
                    out.push((key, value));
                }
                Some(out)
            }
            _ => {
                ctx.error(
                    n.mark,
                    &p,
                    format!("expected a mapping of attribute to value, found {}", n.describe()),
                );
                None
            }
        });
        ov.finish(ctx);
        Some(QuotaOverride {
            dimensions: dims?,
            max: max?,
        })
    });
    for ov in &overrides {
        if let Some((k, _)) = ov.dimensions.iter().find(|(k, _)| !dimensions.contains(k)) {
            ctx.error(
                o.mark,
                &o.path,
                format!("override on `{k}`, which is not one of the quota's `dimensions`"),
            );
        }
    }
    let max_keys = o.uint(ctx, "max_keys", 1, 10_000_000).unwrap_or(100_000);
    let redis = o.get("redis").and_then(|(n, p)| redis_backend(ctx, n, &p));
    o.finish(ctx);
    Some(Quota {
        name: name?,
        max: max?,
        window: window?,
        algorithm,
        dimensions,
        overrides,
        max_keys,
        redis,
    })
}

/// `redis: { address | cluster: [...], timeout, fail_open, prefetch, key_prefix }`.
fn redis_backend(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<RedisBackend> {
    let mut o = Obj::open(ctx, n, p)?;
    let address = o.string(ctx, "address");
    let cluster = o.list(ctx, "cluster", string);
    let timeout = o.duration(ctx, "timeout").unwrap_or(Duration::from_millis(100));
    let fail_open = o.bool(ctx, "fail_open").unwrap_or(true);
    let prefetch = o.uint(ctx, "prefetch", 0, 1_000_000).unwrap_or(0);
    let key_prefix = o.string(ctx, "key_prefix").unwrap_or_else(|| "tessera".to_string());
    let mark = o.mark;
    o.finish(ctx);
    let (addresses, is_cluster) = match (address, cluster.is_empty()) {
        (Some(a), true) => (vec![a], false),
        (None, false) => (cluster, true),
        (None, true) => {
            ctx.error(
                mark,
                p,
                "a Redis quota needs `address: host:port` or `cluster: [host:port, ...]`",
            );
            return None;
        }
        (Some(_), false) => {
            ctx.error(mark, p, "write `address` (one server) or `cluster` (nodes), not both");
            return None;
        }
    };
    for a in &addresses {
        if super::split_host_port(a).is_none() {
            ctx.error(mark, p, format!("`{a}` is not host:port"));
            return None;
        }
    }
    if timeout.is_zero() {
        ctx.error(mark, &p.field("timeout"), "the timeout must be longer than zero");
        return None;
    }
    Some(RedisBackend {
        addresses,
        cluster: is_cluster,
        timeout,
        fail_open,
        prefetch,
        key_prefix,
    })
}

/// `opa: { name, files: [...] | file, rego, query, fail_open }`.
fn opa_check(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<OpaCheck> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let mut files: Vec<_> = o
        .list(ctx, "files", string)
        .into_iter()
        .map(|f| super::tls::resolve(ctx, &f))
        .collect();
    if let Some(f) = o.string(ctx, "file") {
        files.push(super::tls::resolve(ctx, &f));
    }
    let rego = o.string(ctx, "rego");
    let query = o.req_string(ctx, "query");
    let fail_open = o.bool(ctx, "fail_open").unwrap_or(false);
    if files.is_empty() && rego.is_none() {
        ctx.error(n.mark, p, "an opa check needs Rego: `file`, `files` or `rego`");
    }
    if let Some(q) = &query
        && !q.starts_with("data.")
    {
        let qp = p.field("query");
        ctx.error(
            n.mark,
            &qp,
            format!("`{q}` is not a rule reference; write `data.<package>.<rule>`"),
        );
    }
    o.finish(ctx);
    Some(OpaCheck {
        name: name?,
        files,
        rego,
        query: query?,
        fail_open,
    })
}

/// `rbac: { name, action, shadow, policies: { NAME: { permissions: [...], principals: [...] } } }`.
pub(super) fn rbac_check(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<RbacCheck> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let action = o
        .get("action")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("ALLOW", RbacAction::Allow),
                    ("DENY", RbacAction::Deny),
                    ("LOG", RbacAction::Log),
                ],
            )
        })
        .unwrap_or(RbacAction::Allow);
    let shadow = o.bool(ctx, "shadow").unwrap_or(false);
    let policies = o.require(ctx, "policies").and_then(|(n, p)| match &n.kind {
        Kind::Map(entries) => {
            let mut out = Vec::new();
            for (k, v) in entries {
                let Some(pname) = string(ctx, k, &p) else { continue };
                let pp = p.field(&pname);
                let Some(mut po) = Obj::open(ctx, v, &pp) else { continue };
                let permissions = po.list(ctx, "permissions", permission);
                let principals = po.list(ctx, "principals", principal);
                if permissions.is_empty() || principals.is_empty() {
                    ctx.error(
                        v.mark,
                        &pp,
                        "a policy needs `permissions` and `principals` (use `any: true` for all)",
                    );
                }
                po.finish(ctx);
                out.push((
                    pname,
                    RbacPolicy {
                        permissions,
                        principals,
                    },
                ));
            }
            Some(out)
        }
        _ => {
            ctx.error(
                n.mark,
                &p,
                format!("expected a mapping of policy names to policies, found {}", n.describe()),
            );
            None
        }
    });
    o.finish(ctx);
    Some(RbacCheck {
        name: name?,
        action,
        shadow,
        policies: policies?,
    })
}

fn case((matcher, ignore_case): (crate::config::StringMatch, bool)) -> CaseMatch {
    CaseMatch { matcher, ignore_case }
}

/// The one key of a rule object, its node and path.
fn one_key<'n>(ctx: &mut Ctx, n: &'n Node, p: &Path, what: &str) -> Option<(String, &'n Node, Path)> {
    match &n.kind {
        Kind::Map(entries) if entries.len() == 1 => {
            let (k, v) = &entries[0];
            let key = string(ctx, k, p)?;
            let path = p.field(&key);
            Some((key, v, path))
        }
        _ => {
            ctx.error(
                n.mark,
                p,
                format!("a {what} is a mapping with exactly one rule, e.g. `any: true`"),
            );
            None
        }
    }
}

fn rules<T>(
    ctx: &mut Ctx,
    n: &Node,
    p: &Path,
    key: &'static str,
    each: fn(&mut Ctx, &Node, &Path) -> Option<T>,
) -> Option<Vec<T>> {
    let mut o = Obj::open(ctx, n, p)?;
    let v = o.list(ctx, key, each);
    o.finish(ctx);
    Some(v)
}

fn permission(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Permission> {
    let (key, v, vp) = one_key(ctx, n, p, "permission")?;
    Some(match key.as_str() {
        "any" => Permission::Any,
        "and_rules" => Permission::AndRules(rules(ctx, v, &vp, "rules", permission)?),
        "or_rules" => Permission::OrRules(rules(ctx, v, &vp, "rules", permission)?),
        "not_rule" => Permission::NotRule(Box::new(permission(ctx, v, &vp)?)),
        "header" => Permission::Header(super::decode_header_matcher(ctx, v, &vp)?),
        "url_path" => {
            let mut o = Obj::open(ctx, v, &vp)?;
            let m = o
                .require(ctx, "path")
                .and_then(|(n, p)| super::decode_string_matcher(ctx, n, &p));
            o.finish(ctx);
            Permission::UrlPath(case(m?))
        }
        "method" => Permission::Method(string(ctx, v, &vp)?.to_ascii_uppercase()),
        "destination_port" => Permission::DestinationPort(crate::decode::uint(ctx, v, &vp, 1, 65535)?),
        "destination_port_range" => {
            let mut o = Obj::open(ctx, v, &vp)?;
            let start = o
                .require(ctx, "start")
                .and_then(|(n, p)| crate::decode::uint(ctx, n, &p, 0, 65535));
            let end = o
                .require(ctx, "end")
                .and_then(|(n, p)| crate::decode::uint(ctx, n, &p, 1, 65536));
            o.finish(ctx);
            let (start, end): (u32, u32) = (start?, end?);
            if start >= end {
                ctx.error(
                    v.mark,
                    &vp,
                    "the range's start must be below its end (end is exclusive)",
                );
                return None;
            }
            Permission::DestinationPortRange(start as u16, end.min(65535) as u16)
        }
        "rpc_service" => Permission::RpcService(case(super::decode_string_matcher(ctx, v, &vp)?)),
        "rpc_method" => Permission::RpcMethod(case(super::decode_string_matcher(ctx, v, &vp)?)),
        other => {
            ctx.error(
                n.mark,
                p,
                format!(
                    "unknown permission `{other}`; known: any, and_rules, or_rules, not_rule, header, url_path, method, destination_port, destination_port_range, rpc_service, rpc_method"
                ),
            );
            return None;
        }
    })
}

fn principal(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Principal> {
    let (key, v, vp) = one_key(ctx, n, p, "principal")?;
    Some(match key.as_str() {
        "any" => Principal::Any,
        "and_ids" => Principal::AndIds(rules(ctx, v, &vp, "ids", principal)?),
        "or_ids" => Principal::OrIds(rules(ctx, v, &vp, "ids", principal)?),
        "not_id" => Principal::NotId(Box::new(principal(ctx, v, &vp)?)),
        "authenticated" => {
            let mut o = Obj::open(ctx, v, &vp)?;
            let m = o
                .require(ctx, "principal_name")
                .and_then(|(n, p)| super::decode_string_matcher(ctx, n, &p));
            o.finish(ctx);
            Principal::Authenticated(case(m?))
        }
        "source_ip" | "remote_ip" | "direct_remote_ip" => Principal::SourceIp(cidr(ctx, v, &vp)?),
        "header" => Principal::Header(super::decode_header_matcher(ctx, v, &vp)?),
        other => {
            ctx.error(
                n.mark,
                p,
                format!("unknown principal `{other}`; known: any, and_ids, or_ids, not_id, authenticated, source_ip, remote_ip, direct_remote_ip, header"),
            );
            return None;
        }
    })
}

/// `10.0.0.0/8`, or Envoy's `{address_prefix, prefix_len}`.
fn cidr(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<crate::decode::Cidr> {
    let text = match &n.kind {
        Kind::Map(_) => {
            let mut o = Obj::open(ctx, n, p)?;
            let a = o.req_string(ctx, "address_prefix");
            let l = o.uint::<u8>(ctx, "prefix_len", 0, 128);
            o.finish(ctx);
            match l {
                Some(l) => format!("{}/{l}", a?),
                None => a?,
            }
        }
        _ => string(ctx, n, p)?,
    };
    match crate::decode::Cidr::parse(&text) {
        Some(c) => Some(c),
        None => {
            ctx.error(n.mark, p, format!("`{text}` is not an IP address or prefix"));
            None
        }
    }
}

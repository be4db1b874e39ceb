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
    let mut unbuilt = false;
    for (key, what) in [("rbac", "`rbac`"), ("opa", "`opa`")] {
        if let Some((n, p)) = o.get(key) {
            ctx.error(
                n.mark,
                &p,
                format!("{what} checks are not built yet (issue 7); use `list`"),
            );
            unbuilt = true;
        }
    }
    o.finish(ctx);
    let (n, p) = list.or_else(|| {
        if !unbuilt {
            ctx.error(n.mark, p, "a check has `list: {...}`");
        }
        None
    })?;
    list_check(ctx, n, &p).map(Check::List)
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
    o.finish(ctx);
    Some(Quota {
        name: name?,
        max: max?,
        window: window?,
        algorithm,
        dimensions,
        overrides,
        max_keys,
    })
}

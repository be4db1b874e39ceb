//! Decoding the `rpc:` filter chain (SOFA Bolt, Dubbo) and the Triple route-match shorthand.

use std::time::Duration;

use super::{Refs, decode_access_log_with, decode_header_matcher, decode_string_matcher, traffic};
use crate::config::{HeaderMatchSpec, HeaderMatcher, PathMatch, StringMatch};
use crate::decode::{Ctx, Obj, Path, enumeration};
use crate::format::RPC_DEFAULT_FORMAT;
use crate::rpc::*;
use crate::yaml::Node;

/// Default timeout for an RPC request that names none (SOFARPC's and Dubbo's client default is
/// 3 s and 1 s; a proxy must not be the one to give up first).
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) fn rpc_proxy(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>, listener: &str) -> Option<RpcProxy> {
    let mut o = Obj::open(ctx, n, p)?;
    let stat_prefix = o.string(ctx, "stat_prefix").unwrap_or_else(|| listener.to_string());
    let protocol = o
        .get("protocol")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("auto", RpcProtocol::Auto),
                    ("bolt", RpcProtocol::Bolt),
                    ("dubbo", RpcProtocol::Dubbo),
                ],
            )
        })
        .unwrap_or(RpcProtocol::Auto);
    let routes = o.list(ctx, "routes", |ctx, n, p| rpc_route(ctx, n, p, refs));
    if routes.is_empty() && !o.has("routes") {
        ctx.error(
            o.mark,
            &o.path,
            "an rpc chain needs `routes` (a route with an empty `match` takes everything)",
        );
    }
    let request_timeout = o.duration(ctx, "request_timeout").unwrap_or(DEFAULT_RPC_TIMEOUT);
    let idle_timeout = o.duration(ctx, "idle_timeout").unwrap_or(Duration::from_secs(3600));
    let max_frame_bytes = o
        .uint(ctx, "max_frame_bytes", 64, 256 * 1024 * 1024)
        .unwrap_or(8 * 1024 * 1024);
    let max_concurrent_requests = o.uint(ctx, "max_concurrent_requests", 1, 1_000_000).unwrap_or(10_000);
    let access_log = o.list(ctx, "access_log", |ctx, n, p| {
        decode_access_log_with(ctx, n, p, RPC_DEFAULT_FORMAT)
    });
    let policy = o
        .get("policy")
        .and_then(|(n, p)| {
            let policy = super::policy::policy(ctx, n, &p)?;
            for (i, c) in policy.checks.iter().enumerate() {
                if let crate::policy::Check::ExtAuthz(_) = c {
                    let cp = p.field("checks").index(i).field("ext_authz");
                    ctx.error(n.mark, &cp, "ext_authz is not built for RPC chains; use list, rbac or opa");
                }
            }
            for (i, q) in policy.quotas.iter().enumerate() {
                if q.redis.is_some() {
                    let qp = p.field("quotas").index(i).field("redis");
                    ctx.error(
                        n.mark,
                        &qp,
                        "Redis quotas are not built for RPC chains yet (their decisions are synchronous); use a memory quota",
                    );
                }
            }
            Some(policy)
        })
        .unwrap_or_default();
    o.finish(ctx);
    Some(RpcProxy {
        stat_prefix,
        protocol,
        routes,
        request_timeout,
        idle_timeout,
        max_frame_bytes,
        max_concurrent_requests,
        access_log,
        policy,
    })
}

fn rpc_route(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<RpcRoute> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.string(ctx, "name");
    let matcher = match o.get("match") {
        Some((n, p)) => rpc_match(ctx, n, &p)?,
        None => RpcMatch::default(),
    };
    let route = o.require(ctx, "route").and_then(|(n, p)| rpc_action(ctx, n, &p, refs));
    o.finish(ctx);
    Some(RpcRoute {
        name,
        matcher,
        route: route?,
    })
}

/// A string criterion written as a bare string (exact) or as a string matcher.
fn criterion(ctx: &mut Ctx, o: &mut Obj<'_>, name: &'static str) -> Option<StringMatch> {
    let (n, p) = o.get(name)?;
    if let crate::yaml::Kind::Scalar { text } = &n.kind {
        return Some(StringMatch::Exact(text.clone()));
    }
    let (m, ignore_case) = decode_string_matcher(ctx, n, &p)?;
    if ignore_case {
        ctx.error(
            n.mark,
            &p,
            "`ignore_case` is not supported for RPC criteria; names are compared as sent",
        );
    }
    Some(m)
}

fn rpc_match(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<RpcMatch> {
    let mut o = Obj::open(ctx, n, p)?;
    let m = RpcMatch {
        service: criterion(ctx, &mut o, "service"),
        method: criterion(ctx, &mut o, "method"),
        version: criterion(ctx, &mut o, "version"),
        group: criterion(ctx, &mut o, "group"),
        headers: o.list(ctx, "headers", decode_header_matcher),
    };
    o.finish(ctx);
    Some(m)
}

fn rpc_action(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<RpcAction> {
    let mut o = Obj::open(ctx, n, p)?;
    let cluster = super::cluster_specifier(ctx, &mut o, refs, "an rpc route");
    let metadata_match = o
        .get("metadata_match")
        .map(|(n, p)| traffic::metadata_match(ctx, n, &p))
        .unwrap_or_default();
    let timeout = o.duration(ctx, "timeout").unwrap_or(Duration::ZERO);
    let idempotent = o.bool(ctx, "idempotent").unwrap_or(false);
    let num_retries = o.uint(ctx, "num_retries", 0, 10).unwrap_or(0);
    let local_rate_limit = o
        .get("local_rate_limit")
        .and_then(|(n, p)| traffic::local_rate_limit(ctx, n, &p));
    o.finish(ctx);
    Some(RpcAction {
        cluster: cluster?,
        metadata_match,
        timeout,
        idempotent,
        num_retries,
        local_rate_limit,
    })
}

/// The Triple (Dubbo 3) shorthand in an HTTP route match:
/// `triple: {service: org.example.Greeter, method: greet, version: 1.0.0, group: blue}` means
/// path `/org.example.Greeter/greet` (or the prefix `/org.example.Greeter/` without a method)
/// and the `tri-service-version` / `tri-service-group` headers.
pub(super) fn triple(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<(PathMatch, Vec<HeaderMatcher>)> {
    let mut o = Obj::open(ctx, n, p)?;
    let service = o.req_string(ctx, "service");
    let method = o.string(ctx, "method");
    let version = o.string(ctx, "version");
    let group = o.string(ctx, "group");
    o.finish(ctx);
    let service = service?;
    if service.is_empty() || service.contains('/') {
        ctx.error(n.mark, p, format!("`{service}` is not an interface name"));
        return None;
    }
    let path = match method {
        Some(m) => PathMatch::Path(format!("/{service}/{m}")),
        None => PathMatch::Prefix(format!("/{service}/")),
    };
    let exact = |name: &str, v: String| HeaderMatcher {
        name: name.to_string(),
        spec: HeaderMatchSpec::String {
            matcher: StringMatch::Exact(v),
            ignore_case: false,
        },
        invert_match: false,
    };
    let mut headers = Vec::new();
    headers.extend(version.map(|v| exact("tri-service-version", v)));
    headers.extend(group.map(|g| exact("tri-service-group", g)));
    Some((path, headers))
}

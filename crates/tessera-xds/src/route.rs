//! `envoy.config.route.v3.RouteConfiguration` into [`tessera_model::RouteConfig`].
//!
//! Converted: virtual hosts (domains, header mutations, retry and mirror policies for their
//! routes), routes matching on prefix / path / safe_regex, case sensitivity, headers, query
//! parameters and gRPC, routed to a cluster or weighted clusters with a timeout, prefix and regex
//! rewrites, retries, hash policies and mirrors; redirects and direct responses. Everything else a
//! route asks for is listed as unsupported with its path rather than ignored.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, header_value_option};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RetryPolicy, RouteConfiguration, VirtualHost, header_matcher,
    query_parameter_matcher, redirect_action, route, route_action, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use tessera_model as model;

use crate::{Problems, Unsupported, duration};

/// Converts a route configuration; `at` prefixes problem paths.
pub fn route_configuration(rc: &RouteConfiguration, at: &str) -> Result<model::RouteConfig, Vec<Unsupported>> {
    let mut p = Problems::default();
    let out = route_config(rc, at, &mut p);
    p.finish(out)
}

pub(crate) fn route_config(rc: &RouteConfiguration, at: &str, p: &mut Problems) -> model::RouteConfig {
    if rc.vhds.is_some() {
        p.add(format!("{at}.vhds"), "VHDS is not supported");
    }
    let mirrors = mirror_policies(&rc.request_mirror_policies, &format!("{at}.request_mirror_policies"), p);
    model::RouteConfig {
        name: rc.name.clone(),
        virtual_hosts: rc
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, vh)| virtual_host(vh, &format!("{at}.virtual_hosts[{i}]"), &mirrors, p))
            .collect(),
        request_headers_to_add: header_options(&rc.request_headers_to_add, &format!("{at}.request_headers_to_add"), p),
        request_headers_to_remove: rc.request_headers_to_remove.clone(),
        response_headers_to_add: header_options(
            &rc.response_headers_to_add,
            &format!("{at}.response_headers_to_add"),
            p,
        ),
        response_headers_to_remove: rc.response_headers_to_remove.clone(),
    }
}

/// A virtual host; `table_mirrors` are the route table's mirror policies.
fn virtual_host(
    vh: &VirtualHost,
    at: &str,
    table_mirrors: &[model::MirrorPolicy],
    p: &mut Problems,
) -> model::VirtualHost {
    if vh.domains.is_empty() {
        p.add(format!("{at}.domains"), "a virtual host needs at least one domain");
    }
    #[allow(deprecated)] // still sent by control planes that predate the CORS filter config
    let cors = vh.cors.is_some();
    if cors {
        p.add(format!("{at}.cors"), "CORS is not supported yet");
    }
    if vh.retry_policy_typed_config.is_some() {
        p.add(
            format!("{at}.retry_policy_typed_config"),
            "retry policy extensions are not supported; use retry_policy",
        );
    }
    // Envoy applies these to routes without their own; a route's own replaces them whole.
    let retry = vh
        .retry_policy
        .as_ref()
        .and_then(|r| retry_policy(r, &format!("{at}.retry_policy"), p));
    let mirrors = mirror_policies(&vh.request_mirror_policies, &format!("{at}.request_mirror_policies"), p);
    let inherited = Inherited {
        retry_policy: retry.as_ref(),
        mirrors: if vh.request_mirror_policies.is_empty() {
            table_mirrors
        } else {
            &mirrors
        },
    };
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        let here = format!("{at}.routes[{i}]");
        if let Some(r) = route(r, &here, inherited, p) {
            routes.push(r);
        }
    }
    model::VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.clone(),
        routes,
        request_headers_to_add: header_options(&vh.request_headers_to_add, &format!("{at}.request_headers_to_add"), p),
        request_headers_to_remove: vh.request_headers_to_remove.clone(),
        response_headers_to_add: header_options(
            &vh.response_headers_to_add,
            &format!("{at}.response_headers_to_add"),
            p,
        ),
        response_headers_to_remove: vh.response_headers_to_remove.clone(),
    }
}

fn route(
    r: &envoy_types::pb::envoy::config::route::v3::Route,
    at: &str,
    inherited: Inherited<'_>,
    p: &mut Problems,
) -> Option<model::Route> {
    let m = r.r#match.as_ref().or_else(|| {
        p.add(format!("{at}.match"), "a route needs a match");
        None
    })?;
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(s)) => model::PathMatch::Prefix(s.clone()),
        Some(route_match::PathSpecifier::Path(s)) => model::PathMatch::Path(s.clone()),
        Some(route_match::PathSpecifier::SafeRegex(re)) => match model::Pattern::new(&re.regex) {
            Ok(pat) => model::PathMatch::SafeRegex(pat),
            Err(e) => {
                p.add(format!("{at}.match.safe_regex"), format!("bad regex: {e}"));
                return None;
            }
        },
        Some(other) => {
            p.add(
                format!("{at}.match"),
                format!("path matcher {other:?} is not supported")
                    .chars()
                    .take(120)
                    .collect::<String>(),
            );
            return None;
        }
        None => {
            p.add(format!("{at}.match"), "a route match needs prefix, path or safe_regex");
            return None;
        }
    };
    if m.runtime_fraction.is_some() {
        p.add(
            format!("{at}.match.runtime_fraction"),
            "runtime fractions are not supported",
        );
    }
    let query_parameters = m
        .query_parameters
        .iter()
        .enumerate()
        .filter_map(|(i, q)| query_matcher(q, &format!("{at}.match.query_parameters[{i}]"), p))
        .collect();
    let headers = m
        .headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| header_matcher(h, &format!("{at}.match.headers[{i}]"), p))
        .collect();
    let action = match &r.action {
        Some(route::Action::Route(a)) => {
            model::RouteAction::Route(Box::new(forward(a, &format!("{at}.route"), inherited, p)?))
        }
        Some(route::Action::Redirect(rd)) => model::RouteAction::Redirect(redirect(rd, &format!("{at}.redirect"), p)),
        Some(route::Action::DirectResponse(d)) => {
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => None,
                Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => {
                    Some(s.clone())
                }
                Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                Some(_) => {
                    p.add(format!("{at}.direct_response.body"), "only inline bodies are supported");
                    None
                }
            };
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .unwrap_or_else(|| {
                    p.add(
                        format!("{at}.direct_response.status"),
                        format!("{} is not an HTTP status", d.status),
                    );
                    200
                });
            model::RouteAction::DirectResponse(model::DirectResponse { status, body })
        }
        Some(_) => {
            p.add(at, "only route, redirect and direct_response actions are supported");
            return None;
        }
        None => {
            p.add(at, "a route needs an action");
            return None;
        }
    };
    let mut local_rate_limit = None;
    for (name, any) in &r.typed_per_filter_config {
        let here = format!("{at}.typed_per_filter_config[\"{name}\"]");
        if crate::listener::type_name(any) == crate::http_filters::LOCAL_RATELIMIT {
            local_rate_limit = crate::http_filters::local_ratelimit(any, &here, p);
        } else {
            p.add(here, format!("per-route config of `{name}` is not supported yet"));
        }
    }
    Some(model::Route {
        name: (!r.name.is_empty()).then(|| r.name.clone()),
        matcher: model::RouteMatch {
            path,
            case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
            headers,
            query_parameters,
            grpc: m.grpc.is_some(),
        },
        action,
        request_headers_to_add: header_options(&r.request_headers_to_add, &format!("{at}.request_headers_to_add"), p),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: header_options(
            &r.response_headers_to_add,
            &format!("{at}.response_headers_to_add"),
            p,
        ),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        fault: None,
        local_rate_limit,
    })
}

fn forward(
    a: &envoy_types::pb::envoy::config::route::v3::RouteAction,
    at: &str,
    inherited: Inherited<'_>,
    p: &mut Problems,
) -> Option<model::ForwardAction> {
    let cluster = match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => model::ClusterSpecifier::Cluster(c.clone()),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => weighted_clusters(w),
        Some(_) => {
            p.add(
                format!("{at}.cluster_specifier"),
                "only cluster and weighted_clusters are supported",
            );
            return None;
        }
        None => {
            p.add(at, "a route action needs a cluster");
            return None;
        }
    };
    let timeout = a.timeout.as_ref().map_or(model::DEFAULT_ROUTE_TIMEOUT, |d| {
        duration(d).unwrap_or_else(|| {
            p.add(format!("{at}.timeout"), "must not be negative");
            model::DEFAULT_ROUTE_TIMEOUT
        })
    });
    let (host_rewrite_literal, auto_host_rewrite) = match &a.host_rewrite_specifier {
        None => (None, false),
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => (Some(h.clone()), false),
        Some(route_action::HostRewriteSpecifier::AutoHostRewrite(b)) => (None, b.value),
        Some(_) => {
            p.add(
                format!("{at}.host_rewrite"),
                "only host_rewrite_literal and auto_host_rewrite are supported",
            );
            (None, false)
        }
    };
    if a.retry_policy_typed_config.is_some() {
        p.add(
            format!("{at}.retry_policy_typed_config"),
            "retry policy extensions are not supported; use retry_policy",
        );
    }
    let retry_policy = match &a.retry_policy {
        Some(r) => retry_policy(r, &format!("{at}.retry_policy"), p),
        None => inherited.retry_policy.cloned(),
    };
    let hash_policy = hash_policies(&a.hash_policy, &format!("{at}.hash_policy"), p);
    let request_mirror_policies = if a.request_mirror_policies.is_empty() {
        inherited.mirrors.to_vec()
    } else {
        mirror_policies(&a.request_mirror_policies, &format!("{at}.request_mirror_policies"), p)
    };
    let regex_rewrite = a.regex_rewrite.as_ref().and_then(|rr| {
        let here = format!("{at}.regex_rewrite");
        let Some(re) = &rr.pattern else {
            p.add(format!("{here}.pattern"), "required");
            return None;
        };
        match model::Pattern::new(&re.regex) {
            Ok(pattern) => Some(model::RegexRewrite {
                pattern,
                substitution: rr.substitution.clone(),
            }),
            Err(e) => {
                p.add(format!("{here}.pattern.regex"), format!("bad regex: {e}"));
                None
            }
        }
    });
    if !a.prefix_rewrite.is_empty() && a.regex_rewrite.is_some() {
        p.add(
            at,
            "give prefix_rewrite or regex_rewrite, not both (Envoy refuses both)",
        );
    }
    if a.path_rewrite_policy.is_some() || !a.path_rewrite.is_empty() {
        p.add(
            at,
            "path_rewrite_policy and path_rewrite are not supported; use prefix_rewrite or regex_rewrite",
        );
    }
    Some(model::ForwardAction {
        cluster,
        timeout,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite_literal,
        auto_host_rewrite,
        // Subset load balancing on the endpoints' `envoy.lb` labels.
        metadata_match: crate::cluster::lb_labels(a.metadata_match.as_ref()),
        retry_policy,
        hash_policy,
        request_mirror_policies,
        max_stream_duration: a
            .max_stream_duration
            .as_ref()
            .and_then(|m| m.max_stream_duration.as_ref())
            .and_then(duration)
            .unwrap_or(Duration::ZERO),
        grpc_timeout_header: a
            .max_stream_duration
            .as_ref()
            .is_some_and(|m| m.grpc_timeout_header_max.is_some()),
        grpc_timeout_header_max: a
            .max_stream_duration
            .as_ref()
            .and_then(|m| m.grpc_timeout_header_max.as_ref())
            .and_then(duration)
            .unwrap_or(Duration::ZERO),
        priority: if a.priority == 1 {
            model::RoutingPriority::High
        } else {
            model::RoutingPriority::Default
        },
        per_request_buffer_limit_bytes: 1024 * 1024,
    })
}

/// What a virtual host (and the route table above it) hands down to routes without their own.
#[derive(Clone, Copy, Default)]
struct Inherited<'a> {
    /// The virtual host's retry policy.
    retry_policy: Option<&'a model::RetryPolicy>,
    /// The most specific non-empty mirror policies above the route.
    mirrors: &'a [model::MirrorPolicy],
}

/// Retry conditions Envoy has and Tessera does not run.
const UNSUPPORTED_RETRY_ON: &[&str] = &[
    "reset-before-request",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "internal",
];

/// The host predicate Tessera runs: prefer hosts not tried yet.
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// A retry policy with Envoy's defaults (one retry, 25ms back-off base, ten times that as cap,
/// one host pick). Envoy retries whatever the method, so `retry_non_idempotent` is set. `None`
/// for a policy that retries nothing and sets no per-try timeout: it changes nothing.
fn retry_policy(r: &RetryPolicy, at: &str, p: &mut Problems) -> Option<model::RetryPolicy> {
    use envoy_types::pb::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType;
    let field = |name: &str| format!("{at}.{name}");
    // This policy's own problems, to know whether it converted.
    let mut q = Problems::default();
    let mut retry_on = model::RetryOn(0);
    for cond in r.retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        if let Some((bit, _)) = model::RetryOn::ALL.iter().find(|(_, n)| *n == cond) {
            retry_on.0 |= bit.0;
        } else if UNSUPPORTED_RETRY_ON.contains(&cond) {
            let known: Vec<&str> = model::RetryOn::ALL.iter().map(|(_, n)| *n).collect();
            q.add(
                field("retry_on"),
                format!(
                    "retry condition `{cond}` is not supported; Tessera retries on {}",
                    known.join(", ")
                ),
            );
        }
        // Envoy skips conditions it does not know, so a typo retries on nothing: the same here.
    }
    let num_retries = r.num_retries.as_ref().map_or(1, |n| n.value);
    if num_retries > 100 {
        q.add(field("num_retries"), format!("{num_retries} is above 100"));
    }
    let per_try_timeout = r.per_try_timeout.as_ref().map_or(Duration::ZERO, |d| {
        duration(d).unwrap_or_else(|| {
            q.add(field("per_try_timeout"), "must not be negative");
            Duration::ZERO
        })
    });
    if r.per_try_idle_timeout.is_some() {
        q.add(
            field("per_try_idle_timeout"),
            "per-try idle timeouts are not supported; per_try_timeout is",
        );
    }
    if let Some(rp) = &r.retry_priority {
        q.add(
            field("retry_priority"),
            format!("retry priority `{}` is not supported", rp.name),
        );
    }
    let mut skip_previous_hosts = false;
    for (i, h) in r.retry_host_predicate.iter().enumerate() {
        let type_name = match &h.config_type {
            Some(ConfigType::TypedConfig(any)) => crate::listener::type_name(any),
            None => "",
        };
        if h.name == PREVIOUS_HOSTS || type_name == PREVIOUS_HOSTS_TYPE {
            skip_previous_hosts = true;
        } else {
            q.add(
                field(&format!("retry_host_predicate[{i}]")),
                format!(
                    "retry host predicate `{}` is not supported; only {PREVIOUS_HOSTS}",
                    h.name
                ),
            );
        }
    }
    if !r.retry_options_predicates.is_empty() {
        q.add(
            field("retry_options_predicates"),
            "retry options predicates are not supported",
        );
    }
    // Envoy's default is one pick; 0 means the default.
    let host_selection_retry_max_attempts = match r.host_selection_retry_max_attempts {
        0 => 1,
        n => u32::try_from(n).ok().filter(|n| *n <= 100).unwrap_or_else(|| {
            q.add(
                field("host_selection_retry_max_attempts"),
                format!("{n} is outside 1..=100"),
            );
            1
        }),
    };
    let mut retriable_status_codes = Vec::with_capacity(r.retriable_status_codes.len());
    for (i, code) in r.retriable_status_codes.iter().enumerate() {
        match u16::try_from(*code).ok().filter(|c| (100..=599).contains(c)) {
            Some(c) => retriable_status_codes.push(c),
            None => q.add(
                field(&format!("retriable_status_codes[{i}]")),
                format!("{code} is not an HTTP status"),
            ),
        }
    }
    // Envoy rounds intervals below a millisecond up to one.
    let ms = |d: Duration| d.max(Duration::from_millis(1));
    let (mut base_interval, mut max_interval) = (Duration::from_millis(25), None);
    if let Some(b) = &r.retry_back_off {
        match b.base_interval.as_ref().map(duration) {
            Some(Some(d)) => base_interval = ms(d),
            Some(None) => q.add(field("retry_back_off.base_interval"), "must not be negative"),
            None => q.add(
                field("retry_back_off.base_interval"),
                "required (Envoy refuses a back-off without it)",
            ),
        }
        match b.max_interval.as_ref().map(duration) {
            Some(Some(d)) if ms(d) >= base_interval => max_interval = Some(ms(d)),
            Some(Some(_)) => q.add(
                field("retry_back_off.max_interval"),
                "must not be below base_interval (Envoy refuses it too)",
            ),
            Some(None) => q.add(field("retry_back_off.max_interval"), "must not be negative"),
            None => {}
        }
    }
    if r.rate_limited_retry_back_off.is_some() {
        q.add(
            field("rate_limited_retry_back_off"),
            "back-off from rate-limit response headers is not supported",
        );
    }
    if !r.retriable_headers.is_empty() {
        q.add(
            field("retriable_headers"),
            "retrying on response headers is not supported",
        );
    }
    if !r.retriable_request_headers.is_empty() {
        q.add(
            field("retriable_request_headers"),
            "retrying only requests with given headers is not supported",
        );
    }
    // `refresh_cluster_on_retry` only acts on dynamic cluster specifiers, which are refused.
    if !p.absorb(q) || (retry_on.0 == 0 && per_try_timeout.is_zero()) {
        return None;
    }
    Some(model::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        base_interval,
        max_interval: max_interval.unwrap_or(base_interval * 10),
        retriable_status_codes,
        skip_previous_hosts,
        host_selection_retry_max_attempts,
        retry_non_idempotent: true,
    })
}

/// A route's hash policies, in order. A `connection_properties` element without `source_ip`
/// produces no hash in Envoy, so it is left out: the result is the same.
fn hash_policies(list: &[route_action::HashPolicy], at: &str, p: &mut Problems) -> Vec<model::HashPolicy> {
    use route_action::hash_policy::PolicySpecifier as S;
    let mut out = Vec::with_capacity(list.len());
    for (i, h) in list.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let kind = match &h.policy_specifier {
            Some(S::Header(hd)) => {
                if hd.regex_rewrite.is_some() {
                    p.add(
                        format!("{here}.header.regex_rewrite"),
                        "rewriting the header value before hashing is not supported",
                    );
                }
                non_empty(&hd.header_name, &format!("{here}.header.header_name"), p)
                    .map(|n| model::HashPolicyKind::Header(n.to_ascii_lowercase()))
            }
            Some(S::Cookie(c)) => {
                if c.ttl.is_some() {
                    p.add(
                        format!("{here}.cookie.ttl"),
                        "Tessera does not generate the cookie (Envoy does when ttl is set); without ttl, requests that carry the cookie hash on it",
                    );
                }
                non_empty(&c.name, &format!("{here}.cookie.name"), p)
                    .map(|n| model::HashPolicyKind::Cookie(n.to_string()))
            }
            Some(S::ConnectionProperties(c)) if c.source_ip => Some(model::HashPolicyKind::SourceIp),
            Some(S::ConnectionProperties(_)) => continue,
            Some(S::QueryParameter(q)) => non_empty(&q.name, &format!("{here}.query_parameter.name"), p)
                .map(|n| model::HashPolicyKind::QueryParameter(n.to_string())),
            Some(S::FilterState(_)) => {
                p.add(
                    format!("{here}.filter_state"),
                    "hashing on filter state is not supported",
                );
                None
            }
            None => {
                p.add(
                    &here,
                    "a hash policy needs header, cookie, connection_properties or query_parameter",
                );
                None
            }
        };
        if let Some(kind) = kind {
            out.push(model::HashPolicy {
                kind,
                terminal: h.terminal,
            });
        }
    }
    out
}

fn non_empty<'a>(s: &'a str, at: &str, p: &mut Problems) -> Option<&'a str> {
    if s.is_empty() {
        p.add(at, "required");
        None
    } else {
        Some(s)
    }
}

/// Mirror policies (`runtime_fraction`'s default value gives the share; its runtime key is not
/// read). The shadow's Host gets Envoy's `-shadow` suffix.
fn mirror_policies(list: &[route_action::RequestMirrorPolicy], at: &str, p: &mut Problems) -> Vec<model::MirrorPolicy> {
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let mut ok = true;
        let mut refuse = |cond: bool, name: &str, why: &str| {
            if cond {
                p.add(format!("{here}.{name}"), why);
                ok = false;
            }
        };
        refuse(
            !m.cluster_header.is_empty(),
            "cluster_header",
            "mirroring to a cluster named by a request header is not supported; name the cluster in `cluster`",
        );
        refuse(
            m.trace_sampled.is_some(),
            "trace_sampled",
            "the shadow request carries the original's trace headers, so it inherits its sampling; forcing it is not supported",
        );
        refuse(
            m.disable_shadow_host_suffix_append,
            "disable_shadow_host_suffix_append",
            "the shadow's Host always gets the -shadow suffix in Tessera",
        );
        refuse(
            !m.request_headers_mutations.is_empty(),
            "request_headers_mutations",
            "header mutations on shadow requests are not supported",
        );
        refuse(
            !m.host_rewrite_literal.is_empty(),
            "host_rewrite_literal",
            "rewriting the shadow's Host is not supported",
        );
        if m.cluster.is_empty() && m.cluster_header.is_empty() {
            p.add(format!("{here}.cluster"), "a mirror policy needs a cluster");
            ok = false;
        }
        let percentage = match &m.runtime_fraction {
            None => 100.0,
            Some(rf) => match &rf.default_value {
                Some(f) => crate::http_filters::percent(Some(f)),
                None => {
                    p.add(
                        format!("{here}.runtime_fraction.default_value"),
                        "required (Envoy refuses a runtime fraction without it)",
                    );
                    ok = false;
                    0.0
                }
            },
        };
        if ok {
            out.push(model::MirrorPolicy {
                cluster: m.cluster.clone(),
                percentage,
            });
        }
    }
    out
}

/// A query parameter matcher: presence (`present_match: true`, or no criterion) or a string match.
fn query_matcher(q: &QueryParameterMatcher, at: &str, p: &mut Problems) -> Option<model::QueryParameterMatcher> {
    use query_parameter_matcher::QueryParameterMatchSpecifier as S;
    let name = non_empty(&q.name, &format!("{at}.name"), p)?;
    let (string_match, ignore_case) = match &q.query_parameter_match_specifier {
        None | Some(S::PresentMatch(true)) => (None, false),
        Some(S::PresentMatch(false)) => {
            // Envoy's meaning of `false` hangs on a runtime flag (absent, or present as before).
            p.add(
                format!("{at}.present_match"),
                "only `present_match: true` is supported; matching an absent parameter is not",
            );
            return None;
        }
        Some(S::StringMatch(sm)) => {
            let (m, ic) = string_match(sm, &format!("{at}.string_match"), p)?;
            (Some(m), ic)
        }
    };
    Some(model::QueryParameterMatcher {
        name: name.to_string(),
        string_match,
        ignore_case,
    })
}

fn redirect(
    r: &envoy_types::pb::envoy::config::route::v3::RedirectAction,
    at: &str,
    p: &mut Problems,
) -> model::Redirect {
    let scheme_redirect = match &r.scheme_rewrite_specifier {
        Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
        _ => None,
    };
    let (path_redirect, prefix_rewrite) = match &r.path_rewrite_specifier {
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(s)) => (Some(s.clone()), None),
        Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(s)) => (None, Some(s.clone())),
        Some(_) => {
            p.add(format!("{at}.regex_rewrite"), "regex redirects are not supported yet");
            (None, None)
        }
        None => (None, None),
    };
    // RedirectResponseCode: MOVED_PERMANENTLY 0 (301), FOUND 1, SEE_OTHER 2, TEMPORARY 3, PERMANENT 4.
    let response_code = match r.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        other => {
            p.add(format!("{at}.response_code"), format!("unknown redirect code {other}"));
            301
        }
    };
    model::Redirect {
        scheme_redirect,
        host_redirect: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port_redirect: u16::try_from(r.port_redirect).ok().filter(|p| *p != 0),
        path_redirect,
        prefix_rewrite,
        response_code,
        strip_query: r.strip_query,
    }
}

pub(crate) fn string_match(m: &StringMatcher, at: &str, p: &mut Problems) -> Option<(model::StringMatch, bool)> {
    let sm = match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => model::StringMatch::Exact(s.clone()),
        Some(string_matcher::MatchPattern::Prefix(s)) => model::StringMatch::Prefix(s.clone()),
        Some(string_matcher::MatchPattern::Suffix(s)) => model::StringMatch::Suffix(s.clone()),
        Some(string_matcher::MatchPattern::Contains(s)) => model::StringMatch::Contains(s.clone()),
        Some(string_matcher::MatchPattern::SafeRegex(re)) => match model::Pattern::new(&re.regex) {
            Ok(pat) => model::StringMatch::SafeRegex(pat),
            Err(e) => {
                p.add(at, format!("bad regex: {e}"));
                return None;
            }
        },
        _ => {
            p.add(at, "unsupported string matcher");
            return None;
        }
    };
    Some((sm, m.ignore_case))
}

/// A route (or RBAC) header matcher.
pub(crate) fn header_matcher(h: &HeaderMatcher, at: &str, p: &mut Problems) -> Option<model::HeaderMatcher> {
    use header_matcher::HeaderMatchSpecifier as S;
    #[allow(deprecated)] // exact_match and friends are deprecated in the API and common in configs
    let spec = match &h.header_match_specifier {
        None => model::HeaderMatchSpec::Present(true),
        Some(S::PresentMatch(b)) => model::HeaderMatchSpec::Present(*b),
        Some(S::ExactMatch(s)) => string(model::StringMatch::Exact(s.clone())),
        Some(S::PrefixMatch(s)) => string(model::StringMatch::Prefix(s.clone())),
        Some(S::SuffixMatch(s)) => string(model::StringMatch::Suffix(s.clone())),
        Some(S::ContainsMatch(s)) => string(model::StringMatch::Contains(s.clone())),
        Some(S::SafeRegexMatch(re)) => match model::Pattern::new(&re.regex) {
            Ok(pat) => string(model::StringMatch::SafeRegex(pat)),
            Err(e) => {
                p.add(at, format!("bad regex: {e}"));
                return None;
            }
        },
        Some(S::RangeMatch(r)) => model::HeaderMatchSpec::Range {
            start: r.start,
            end: r.end,
        },
        Some(S::StringMatch(m)) => {
            let (matcher, ignore_case) = string_match(m, &format!("{at}.string_match"), p)?;
            model::HeaderMatchSpec::String { matcher, ignore_case }
        }
    };
    Some(model::HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        spec,
        invert_match: h.invert_match,
    })
}

fn string(matcher: model::StringMatch) -> model::HeaderMatchSpec {
    model::HeaderMatchSpec::String {
        matcher,
        ignore_case: false,
    }
}

/// Weighted clusters (also Dubbo routes'), with their `envoy.lb` subset labels.
pub(crate) fn weighted_clusters(
    w: &envoy_types::pb::envoy::config::route::v3::WeightedCluster,
) -> model::ClusterSpecifier {
    model::ClusterSpecifier::WeightedClusters(
        w.clusters
            .iter()
            .map(|c| model::WeightedCluster {
                name: c.name.clone(),
                weight: c.weight.as_ref().map_or(0, |w| w.value),
                metadata_match: crate::cluster::lb_labels(c.metadata_match.as_ref()),
            })
            .collect(),
    )
}

pub(crate) fn header_options(v: &[HeaderValueOption], at: &str, p: &mut Problems) -> Vec<model::HeaderValueOption> {
    let mut out = Vec::with_capacity(v.len());
    for (i, o) in v.iter().enumerate() {
        let Some(h) = &o.header else {
            p.add(format!("{at}[{i}]"), "a header option needs a header");
            continue;
        };
        #[allow(deprecated)] // `append` is deprecated but still what most configs write
        let legacy_append = o.append.as_ref().map(|b| b.value);
        let append_action = match (
            legacy_append,
            header_value_option::HeaderAppendAction::try_from(o.append_action),
        ) {
            (Some(true), _) => model::AppendAction::AppendIfExistsOrAdd,
            (Some(false), _) => model::AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(header_value_option::HeaderAppendAction::AppendIfExistsOrAdd)) => {
                model::AppendAction::AppendIfExistsOrAdd
            }
            (None, Ok(header_value_option::HeaderAppendAction::AddIfAbsent)) => model::AppendAction::AddIfAbsent,
            (None, Ok(header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd)) => {
                model::AppendAction::OverwriteIfExistsOrAdd
            }
            (None, Ok(header_value_option::HeaderAppendAction::OverwriteIfExists)) => {
                model::AppendAction::OverwriteIfExists
            }
            (None, Err(_)) => {
                p.add(
                    format!("{at}[{i}].append_action"),
                    format!("unknown action {}", o.append_action),
                );
                continue;
            }
        };
        let value = if h.value.is_empty() && !h.raw_value.is_empty() {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        } else {
            h.value.clone()
        };
        out.push(model::HeaderValueOption {
            key: h.key.to_ascii_lowercase(),
            value,
            append_action,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
    use envoy_types::pb::envoy::config::route::v3::{
        DirectResponseAction, Route, RouteAction, RouteMatch, WeightedCluster, retry_policy,
    };
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

    fn prefix(p: &str) -> Option<RouteMatch> {
        Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
            ..Default::default()
        })
    }

    fn to(cluster: &str) -> RouteAction {
        RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }
    }

    fn forwarding(path: &str, a: RouteAction) -> Route {
        Route {
            r#match: prefix(path),
            action: Some(route::Action::Route(a)),
            ..Default::default()
        }
    }

    fn table(vh: VirtualHost) -> RouteConfiguration {
        RouteConfiguration {
            virtual_hosts: vec![VirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                ..vh
            }],
            ..Default::default()
        }
    }

    /// The forward actions of the only virtual host's routes.
    fn forwards(rc: &model::RouteConfig) -> Vec<&model::ForwardAction> {
        rc.virtual_hosts[0]
            .routes
            .iter()
            .filter_map(|r| match &r.action {
                model::RouteAction::Route(f) => Some(&**f),
                _ => None,
            })
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn pb_ms(n: i32) -> Option<PbDuration> {
        Some(PbDuration {
            seconds: 0,
            nanos: n * 1_000_000,
        })
    }

    fn paths(errs: &[Unsupported]) -> Vec<&str> {
        errs.iter().map(|u| u.path.as_str()).collect()
    }

    #[test]
    fn retry_policies_with_envoy_defaults_and_the_virtual_host_fallback() {
        let full = RetryPolicy {
            retry_on: "5xx, connect-failure,retriable-status-codes,unavailable,no-such-condition".into(),
            num_retries: Some(UInt32Value { value: 3 }),
            per_try_timeout: pb_ms(500),
            retry_host_predicate: vec![retry_policy::RetryHostPredicate {
                name: PREVIOUS_HOSTS.into(),
                config_type: None,
            }],
            host_selection_retry_max_attempts: 5,
            retriable_status_codes: vec![503, 409],
            retry_back_off: Some(retry_policy::RetryBackOff {
                base_interval: pb_ms(10),
                max_interval: pb_ms(80),
            }),
            ..Default::default()
        };
        let rc = table(VirtualHost {
            retry_policy: Some(RetryPolicy {
                retry_on: "gateway-error".into(),
                ..Default::default()
            }),
            routes: vec![
                forwarding(
                    "/own",
                    RouteAction {
                        retry_policy: Some(full),
                        ..to("a")
                    },
                ),
                forwarding("/inherits", to("a")),
                // A route's own policy replaces the virtual host's whole, even one that retries nothing.
                forwarding(
                    "/none",
                    RouteAction {
                        retry_policy: Some(RetryPolicy::default()),
                        ..to("a")
                    },
                ),
            ],
            ..Default::default()
        });
        let got = route_configuration(&rc, "rc").unwrap();
        let f = forwards(&got);
        let own = f[0].retry_policy.as_ref().unwrap();
        assert_eq!(
            own.retry_on.to_string(),
            "5xx,connect-failure,retriable-status-codes,unavailable",
            "Envoy skips the unknown condition"
        );
        assert_eq!(
            (
                own.num_retries,
                own.per_try_timeout,
                own.base_interval,
                own.max_interval
            ),
            (3, ms(500), ms(10), ms(80))
        );
        assert_eq!(own.retriable_status_codes, [503, 409]);
        assert!(own.skip_previous_hosts && own.retry_non_idempotent);
        assert_eq!(own.host_selection_retry_max_attempts, 5);
        let inherited = f[1].retry_policy.as_ref().unwrap();
        assert_eq!(inherited.retry_on, model::RetryOn::GATEWAY_ERROR);
        // Envoy's defaults: one retry, 25ms base, ten times that as cap, one host pick.
        assert_eq!(
            (inherited.num_retries, inherited.base_interval, inherited.max_interval),
            (1, ms(25), ms(250))
        );
        assert_eq!(inherited.per_try_timeout, Duration::ZERO);
        assert!(!inherited.skip_previous_hosts && inherited.retry_non_idempotent);
        assert_eq!(inherited.host_selection_retry_max_attempts, 1);
        assert!(f[2].retry_policy.is_none());
    }

    #[test]
    fn what_a_retry_policy_cannot_do_is_refused() {
        let rc = table(VirtualHost {
            retry_policy: Some(RetryPolicy {
                retry_on: "5xx,retriable-headers".into(),
                ..Default::default()
            }),
            routes: vec![forwarding(
                "/",
                RouteAction {
                    retry_policy: Some(RetryPolicy {
                        retry_on: "reset".into(),
                        num_retries: Some(UInt32Value { value: 500 }),
                        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
                            name: "envoy.retry_host_predicates.omit_canary_hosts".into(),
                            config_type: None,
                        }],
                        host_selection_retry_max_attempts: -1,
                        retriable_status_codes: vec![42],
                        retry_back_off: Some(retry_policy::RetryBackOff {
                            base_interval: pb_ms(100),
                            max_interval: pb_ms(50),
                        }),
                        per_try_idle_timeout: pb_ms(5),
                        ..Default::default()
                    }),
                    ..to("a")
                },
            )],
            ..Default::default()
        });
        let errs = route_configuration(&rc, "rc").unwrap_err();
        let at = "rc.virtual_hosts[0].routes[0].route.retry_policy";
        let want = [
            "rc.virtual_hosts[0].retry_policy.retry_on".to_string(),
            format!("{at}.num_retries"),
            format!("{at}.per_try_idle_timeout"),
            format!("{at}.retry_host_predicate[0]"),
            format!("{at}.host_selection_retry_max_attempts"),
            format!("{at}.retriable_status_codes[0]"),
            format!("{at}.retry_back_off.max_interval"),
        ];
        assert_eq!(paths(&errs), want, "{errs:#?}");
        assert!(
            errs[0].reason.contains("`retriable-headers` is not supported"),
            "{errs:?}"
        );
    }

    #[test]
    fn hash_policies_in_order() {
        use route_action::hash_policy::{self, PolicySpecifier as S};
        let hp = |s: S, terminal: bool| route_action::HashPolicy {
            policy_specifier: Some(s),
            terminal,
        };
        let rc = table(VirtualHost {
            routes: vec![forwarding(
                "/",
                RouteAction {
                    hash_policy: vec![
                        hp(
                            S::Header(hash_policy::Header {
                                header_name: "X-User".into(),
                                regex_rewrite: None,
                            }),
                            true,
                        ),
                        hp(
                            S::Cookie(hash_policy::Cookie {
                                name: "session".into(),
                                path: "/".into(),
                                ..Default::default()
                            }),
                            false,
                        ),
                        // Produces no hash in Envoy: left out.
                        hp(
                            S::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: false }),
                            false,
                        ),
                        hp(
                            S::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: true }),
                            false,
                        ),
                        hp(
                            S::QueryParameter(hash_policy::QueryParameter { name: "u".into() }),
                            false,
                        ),
                    ],
                    ..to("a")
                },
            )],
            ..Default::default()
        });
        let got = route_configuration(&rc, "rc").unwrap();
        let kinds: Vec<(model::HashPolicyKind, bool)> = forwards(&got)[0]
            .hash_policy
            .iter()
            .map(|h| (h.kind.clone(), h.terminal))
            .collect();
        assert_eq!(
            kinds,
            [
                (model::HashPolicyKind::Header("x-user".into()), true),
                (model::HashPolicyKind::Cookie("session".into()), false),
                (model::HashPolicyKind::SourceIp, false),
                (model::HashPolicyKind::QueryParameter("u".into()), false),
            ]
        );

        let refused = table(VirtualHost {
            routes: vec![forwarding(
                "/",
                RouteAction {
                    hash_policy: vec![
                        hp(
                            S::Cookie(hash_policy::Cookie {
                                name: "sticky".into(),
                                ttl: Some(PbDuration { seconds: 60, nanos: 0 }),
                                ..Default::default()
                            }),
                            false,
                        ),
                        hp(S::FilterState(hash_policy::FilterState { key: "k".into() }), false),
                        route_action::HashPolicy::default(),
                    ],
                    ..to("a")
                },
            )],
            ..Default::default()
        });
        let errs = route_configuration(&refused, "rc").unwrap_err();
        let at = "rc.virtual_hosts[0].routes[0].route.hash_policy";
        assert_eq!(
            paths(&errs),
            [
                format!("{at}[0].cookie.ttl"),
                format!("{at}[1].filter_state"),
                format!("{at}[2]")
            ],
            "{errs:#?}"
        );
        assert!(errs[0].reason.contains("does not generate the cookie"), "{errs:?}");
    }

    #[test]
    fn mirrors_take_the_most_specific_non_empty_list() {
        use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
        use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
        let mirror = |cluster: &str, share: Option<(u32, DenominatorType)>| route_action::RequestMirrorPolicy {
            cluster: cluster.into(),
            runtime_fraction: share.map(|(numerator, d)| RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator,
                    denominator: d as i32,
                }),
                runtime_key: "ignored".into(),
            }),
            ..Default::default()
        };
        let rc = RouteConfiguration {
            request_mirror_policies: vec![mirror("table-shadow", None)],
            virtual_hosts: vec![
                VirtualHost {
                    name: "with".into(),
                    domains: vec!["a.example".into()],
                    request_mirror_policies: vec![mirror("vhost-shadow", Some((25, DenominatorType::Hundred)))],
                    routes: vec![
                        forwarding(
                            "/own",
                            RouteAction {
                                request_mirror_policies: vec![mirror(
                                    "route-shadow",
                                    Some((125, DenominatorType::TenThousand)),
                                )],
                                ..to("a")
                            },
                        ),
                        forwarding("/", to("a")),
                    ],
                    ..Default::default()
                },
                VirtualHost {
                    name: "without".into(),
                    domains: vec!["*".into()],
                    routes: vec![forwarding("/", to("a"))],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let got = route_configuration(&rc, "rc").unwrap();
        let mirrors = |vh: usize, r: usize| -> Vec<(String, f64)> {
            match &got.virtual_hosts[vh].routes[r].action {
                model::RouteAction::Route(f) => f
                    .request_mirror_policies
                    .iter()
                    .map(|m| (m.cluster.clone(), m.percentage))
                    .collect(),
                _ => panic!("a forward"),
            }
        };
        assert_eq!(mirrors(0, 0), [("route-shadow".to_string(), 1.25)]);
        assert_eq!(mirrors(0, 1), [("vhost-shadow".to_string(), 25.0)]);
        assert_eq!(mirrors(1, 0), [("table-shadow".to_string(), 100.0)]);
    }

    #[test]
    fn what_a_mirror_cannot_do_is_refused() {
        let rc = table(VirtualHost {
            routes: vec![forwarding(
                "/",
                RouteAction {
                    request_mirror_policies: vec![
                        route_action::RequestMirrorPolicy {
                            cluster_header: "x-mirror-cluster".into(),
                            ..Default::default()
                        },
                        route_action::RequestMirrorPolicy {
                            cluster: "shadow".into(),
                            disable_shadow_host_suffix_append: true,
                            trace_sampled: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
                            ..Default::default()
                        },
                        route_action::RequestMirrorPolicy::default(),
                    ],
                    ..to("a")
                },
            )],
            ..Default::default()
        });
        let errs = route_configuration(&rc, "rc").unwrap_err();
        let at = "rc.virtual_hosts[0].routes[0].route.request_mirror_policies";
        assert_eq!(
            paths(&errs),
            [
                format!("{at}[0].cluster_header"),
                format!("{at}[1].trace_sampled"),
                format!("{at}[1].disable_shadow_host_suffix_append"),
                format!("{at}[2].cluster"),
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn regex_rewrites_and_their_conflicts() {
        use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
        let rr = |re: &str| {
            Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: re.into(),
                    ..Default::default()
                }),
                substitution: r"/v2/\1".into(),
            })
        };
        let rc = table(VirtualHost {
            routes: vec![forwarding(
                "/",
                RouteAction {
                    regex_rewrite: rr("^/v1/(.*)$"),
                    ..to("a")
                },
            )],
            ..Default::default()
        });
        let got = route_configuration(&rc, "rc").unwrap();
        let r = forwards(&got)[0].regex_rewrite.as_ref().unwrap();
        assert_eq!(
            (r.pattern.raw.as_str(), r.substitution.as_str()),
            ("^/v1/(.*)$", r"/v2/\1")
        );

        let bad = table(VirtualHost {
            routes: vec![
                forwarding(
                    "/",
                    RouteAction {
                        regex_rewrite: rr("(unclosed"),
                        ..to("a")
                    },
                ),
                forwarding(
                    "/",
                    RouteAction {
                        regex_rewrite: rr("x"),
                        prefix_rewrite: "/y".into(),
                        ..to("a")
                    },
                ),
            ],
            ..Default::default()
        });
        let errs = route_configuration(&bad, "rc").unwrap_err();
        assert_eq!(
            paths(&errs),
            [
                "rc.virtual_hosts[0].routes[0].route.regex_rewrite.pattern.regex",
                "rc.virtual_hosts[0].routes[1].route"
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn query_parameter_matchers() {
        use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
        use query_parameter_matcher::QueryParameterMatchSpecifier as S;
        let q = |name: &str, s: Option<S>| QueryParameterMatcher {
            name: name.into(),
            query_parameter_match_specifier: s,
        };
        let with = |qs: Vec<QueryParameterMatcher>| {
            table(VirtualHost {
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        query_parameters: qs,
                        ..prefix("/").unwrap()
                    }),
                    ..forwarding("/", to("a"))
                }],
                ..Default::default()
            })
        };
        let rc = with(vec![
            q(
                "v",
                Some(S::StringMatch(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact("Two".into())),
                    ignore_case: true,
                })),
            ),
            q("debug", Some(S::PresentMatch(true))),
            q("trace", None),
        ]);
        let got = route_configuration(&rc, "rc").unwrap();
        let qs = &got.virtual_hosts[0].routes[0].matcher.query_parameters;
        assert_eq!(qs.len(), 3);
        assert_eq!(qs[0].name, "v");
        assert_eq!(qs[0].string_match, Some(model::StringMatch::Exact("Two".into())));
        assert!(qs[0].ignore_case);
        assert!(qs[1].string_match.is_none() && qs[2].string_match.is_none());

        let errs =
            route_configuration(&with(vec![q("gone", Some(S::PresentMatch(false))), q("", None)]), "rc").unwrap_err();
        let at = "rc.virtual_hosts[0].routes[0].match.query_parameters";
        assert_eq!(
            paths(&errs),
            [format!("{at}[0].present_match"), format!("{at}[1].name")],
            "{errs:#?}"
        );
    }

    #[test]
    fn the_route_mirror_fixture_needs_only_the_header_named_mirror() {
        let text = include_str!("../tests/fixtures/envoy-bootstrap/route-mirror-envoy.yaml");
        let b = crate::load::bootstrap_text(text, "route-mirror-envoy.yaml").unwrap();
        let errs = crate::bootstrap::bootstrap(&b).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0]
                .path
                .ends_with("virtual_hosts[0].routes[1].route.request_mirror_policies[0].cluster_header"),
            "{errs:#?}"
        );
    }

    #[test]
    fn routes_weights_headers_and_direct_responses() {
        let rc = RouteConfiguration {
            name: "local".into(),
            virtual_hosts: vec![VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![
                    Route {
                        r#match: Some(RouteMatch {
                            headers: vec![HeaderMatcher {
                                name: "X-Canary".into(),
                                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
                                ..Default::default()
                            }],
                            ..prefix("/").unwrap()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                                WeightedCluster {
                                    clusters: vec![
                                        ClusterWeight {
                                            name: "v1".into(),
                                            weight: Some(UInt32Value { value: 90 }),
                                            ..Default::default()
                                        },
                                        ClusterWeight {
                                            name: "v2".into(),
                                            weight: Some(UInt32Value { value: 10 }),
                                            ..Default::default()
                                        },
                                    ],
                                    ..Default::default()
                                },
                            )),
                            timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
                            prefix_rewrite: "/api/".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    },
                    Route {
                        r#match: prefix("/health"),
                        action: Some(route::Action::DirectResponse(DirectResponseAction {
                            status: 204,
                            ..Default::default()
                        })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let got = route_configuration(&rc, "rc").unwrap();
        let routes = &got.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 2);
        let model::RouteAction::Route(f) = &routes[0].action else {
            panic!("a forward")
        };
        assert_eq!(f.timeout, Duration::from_secs(2));
        assert_eq!(f.prefix_rewrite.as_deref(), Some("/api/"));
        let model::ClusterSpecifier::WeightedClusters(w) = &f.cluster else {
            panic!("weighted")
        };
        assert_eq!((w[0].weight, w[1].name.as_str()), (90, "v2"));
        assert_eq!(routes[0].matcher.headers[0].name, "x-canary");
        assert!(matches!(
            routes[1].action,
            model::RouteAction::DirectResponse(model::DirectResponse { status: 204, .. })
        ));
    }

    #[test]
    fn unsupported_route_features_are_named() {
        let rc = RouteConfiguration {
            virtual_hosts: vec![VirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: prefix("/"),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::ClusterHeader("x-cluster".into())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let errs = route_configuration(&rc, "rc").unwrap_err();
        assert_eq!(
            errs[0].path, "rc.virtual_hosts[0].routes[0].route.cluster_specifier",
            "{errs:?}"
        );
    }
}

//! `envoy.config.route.v3.RouteConfiguration` into [`tessera_model::RouteConfig`].
//!
//! Converted: virtual hosts (domains, header mutations), routes matching on prefix / path /
//! safe_regex, case sensitivity, headers and gRPC, routed to a cluster or weighted clusters with a
//! timeout and rewrites, redirects and direct responses. Everything else a route asks for is
//! listed as unsupported with its path rather than ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, header_value_option};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RouteConfiguration, VirtualHost, header_matcher, redirect_action, route, route_action, route_match,
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
    model::RouteConfig {
        name: rc.name.clone(),
        virtual_hosts: rc
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, vh)| virtual_host(vh, &format!("{at}.virtual_hosts[{i}]"), p))
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

fn virtual_host(vh: &VirtualHost, at: &str, p: &mut Problems) -> model::VirtualHost {
    if vh.domains.is_empty() {
        p.add(format!("{at}.domains"), "a virtual host needs at least one domain");
    }
    #[allow(deprecated)] // still sent by control planes that predate the CORS filter config
    let cors = vh.cors.is_some();
    if cors {
        p.add(format!("{at}.cors"), "CORS is not supported yet");
    }
    if vh.retry_policy.is_some() {
        p.add(
            format!("{at}.retry_policy"),
            "virtual-host retry policies are not supported yet; set it on the route",
        );
    }
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        let here = format!("{at}.routes[{i}]");
        if let Some(r) = route(r, &here, p) {
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

fn route(r: &envoy_types::pb::envoy::config::route::v3::Route, at: &str, p: &mut Problems) -> Option<model::Route> {
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
    if !m.query_parameters.is_empty() {
        p.add(
            format!("{at}.match.query_parameters"),
            "query parameter matching from xDS is not supported yet",
        );
    }
    let headers = m
        .headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| header_matcher(h, &format!("{at}.match.headers[{i}]"), p))
        .collect();
    let action = match &r.action {
        Some(route::Action::Route(a)) => model::RouteAction::Route(Box::new(forward(a, &format!("{at}.route"), p)?)),
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
            query_parameters: Vec::new(),
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
    p: &mut Problems,
) -> Option<model::ForwardAction> {
    let cluster = match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => model::ClusterSpecifier::Cluster(c.clone()),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => model::ClusterSpecifier::WeightedClusters(
            w.clusters
                .iter()
                .map(|c| model::WeightedCluster {
                    name: c.name.clone(),
                    weight: c.weight.as_ref().map_or(0, |w| w.value),
                    metadata_match: BTreeMap::new(),
                })
                .collect(),
        ),
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
    if a.retry_policy.is_some() {
        p.add(
            format!("{at}.retry_policy"),
            "retry policies from xDS are not supported yet",
        );
    }
    if !a.hash_policy.is_empty() {
        p.add(
            format!("{at}.hash_policy"),
            "hash policies from xDS are not supported yet",
        );
    }
    if !a.request_mirror_policies.is_empty() {
        p.add(
            format!("{at}.request_mirror_policies"),
            "mirroring from xDS is not supported yet",
        );
    }
    if a.regex_rewrite.is_some() {
        p.add(
            format!("{at}.regex_rewrite"),
            "regex rewrites from xDS are not supported yet",
        );
    }
    Some(model::ForwardAction {
        cluster,
        timeout,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite: None,
        host_rewrite_literal,
        auto_host_rewrite,
        metadata_match: BTreeMap::new(),
        retry_policy: None,
        hash_policy: Vec::new(),
        request_mirror_policies: Vec::new(),
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

fn header_options(v: &[HeaderValueOption], at: &str, p: &mut Problems) -> Vec<model::HeaderValueOption> {
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
        DirectResponseAction, Route, RouteAction, RouteMatch, WeightedCluster,
    };
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

    fn prefix(p: &str) -> Option<RouteMatch> {
        Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
            ..Default::default()
        })
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

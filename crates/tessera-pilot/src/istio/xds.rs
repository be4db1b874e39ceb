//! DestinationRule policies onto clusters and VirtualService routes into Envoy routes.

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, RuntimeFractionalPercent, TransportSocket, data_source,
    header_value_option, transport_socket,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction,
    RouteMatch, WeightedCluster, header_matcher, query_parameter_matcher, redirect_action, retry_policy, route,
    route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};

use super::parse::{Action, DestinationRule, HashKey, HttpRoute, Lb, Match, StrMatch, Tls, TrafficPolicy};

fn any<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: prost::Message::encode_to_vec(m),
    }
}

pub(crate) fn pb_duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The policy for `port` of `subset` (or the whole host): the rule's, then its port's, then the
/// subset's, then the subset's port's; each part (lb, pool, outlier, tls) replaces the one before.
pub(crate) fn effective(dr: Option<&DestinationRule>, subset: Option<&str>, port: u16) -> TrafficPolicy {
    let mut out = TrafficPolicy::default();
    let Some(dr) = dr else { return out };
    let mut layer = |p: &TrafficPolicy| {
        let mut apply = |q: &TrafficPolicy| {
            if q.lb.is_some() {
                out.lb.clone_from(&q.lb);
            }
            if q.pool.is_some() {
                out.pool.clone_from(&q.pool);
            }
            if q.outlier.is_some() {
                out.outlier.clone_from(&q.outlier);
            }
            if q.tls.is_some() {
                out.tls.clone_from(&q.tls);
            }
        };
        apply(p);
        if let Some((_, pp)) = p.ports.iter().find(|(n, _)| *n == port) {
            apply(pp);
        }
    };
    if let Some(p) = &dr.policy {
        layer(p);
    }
    if let Some(s) = subset.and_then(|n| dr.subsets.iter().find(|s| s.name == n))
        && let Some(p) = &s.policy
    {
        layer(p);
    }
    out
}

/// Sets the policy's load balancing, circuit breakers, outlier detection and TLS on `c`.
/// `host` gives TLS its default SNI.
pub(crate) fn apply(c: &mut Cluster, p: &TrafficPolicy, host: &str) {
    use cluster::LbPolicy;
    match &p.lb {
        None => {}
        Some(Lb::RoundRobin) => c.lb_policy = LbPolicy::RoundRobin as i32,
        Some(Lb::LeastRequest) => c.lb_policy = LbPolicy::LeastRequest as i32,
        Some(Lb::Random) => c.lb_policy = LbPolicy::Random as i32,
        Some(Lb::Hash { maglev: true, size, .. }) => {
            c.lb_policy = LbPolicy::Maglev as i32;
            c.lb_config = size.map(|s| {
                cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                    table_size: Some(envoy_types::pb::google::protobuf::UInt64Value { value: s }),
                })
            });
        }
        Some(Lb::Hash {
            maglev: false, size, ..
        }) => {
            c.lb_policy = LbPolicy::RingHash as i32;
            c.lb_config = size.map(|s| {
                cluster::LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
                    minimum_ring_size: Some(envoy_types::pb::google::protobuf::UInt64Value { value: s }),
                    ..Default::default()
                })
            });
        }
    }
    if let Some(pool) = &p.pool {
        let u = |v: Option<u32>| v.map(|value| UInt32Value { value });
        if pool.max_connections.is_some()
            || pool.max_pending.is_some()
            || pool.max_requests.is_some()
            || pool.max_retries.is_some()
        {
            c.circuit_breakers = Some(CircuitBreakers {
                thresholds: vec![circuit_breakers::Thresholds {
                    max_connections: u(pool.max_connections),
                    max_pending_requests: u(pool.max_pending),
                    max_requests: u(pool.max_requests),
                    max_retries: u(pool.max_retries),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        if let Some(d) = pool.connect_timeout {
            c.connect_timeout = Some(pb_duration(d));
        }
        if pool.use_client_protocol {
            let opts = HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(Default::default()),
                ),
                ..Default::default()
            };
            c.typed_extension_protocol_options.insert(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                any(&opts),
            );
        }
    }
    if let Some(o) = &p.outlier {
        let u = |v: Option<u32>| v.map(|value| UInt32Value { value });
        let enforce = |v: Option<u32>| {
            v.map(|n| UInt32Value {
                value: if n > 0 { 100 } else { 0 },
            })
        };
        c.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: u(o.consecutive_5xx.filter(|n| *n > 0)),
            enforcing_consecutive_5xx: enforce(o.consecutive_5xx),
            consecutive_gateway_failure: u(o.consecutive_gateway.filter(|n| *n > 0)),
            // Envoy leaves gateway-failure ejection off unless asked, as Istio does.
            enforcing_consecutive_gateway_failure: Some(UInt32Value {
                value: if o.consecutive_gateway.is_some_and(|n| n > 0) {
                    100
                } else {
                    0
                },
            }),
            consecutive_local_origin_failure: u(o.consecutive_local_origin.filter(|n| *n > 0)),
            enforcing_consecutive_local_origin_failure: enforce(o.consecutive_local_origin),
            split_external_local_origin_errors: o.split,
            interval: o.interval.map(pb_duration),
            base_ejection_time: o.base_ejection_time.map(pb_duration),
            max_ejection_percent: u(o.max_ejection_percent),
            // Istio turns success-rate ejection off.
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            ..Default::default()
        });
        if let Some(m) = o.min_health_percent {
            c.common_lb_config = Some(cluster::CommonLbConfig {
                healthy_panic_threshold: Some(Percent { value: f64::from(m) }),
                ..Default::default()
            });
        }
    }
    if let Some(Tls::Originate { ca, client, sni, sans }) = &p.tls {
        let file = |f: &str| DataSource {
            specifier: Some(data_source::Specifier::Filename(f.to_string())),
            ..Default::default()
        };
        let validation = ca.as_ref().map(|ca| {
            common_tls_context::ValidationContextType::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(file(ca)),
                match_typed_subject_alt_names: sans
                    .iter()
                    .map(|s| SubjectAltNameMatcher {
                        san_type: if s.contains("://") {
                            subject_alt_name_matcher::SanType::Uri as i32
                        } else {
                            subject_alt_name_matcher::SanType::Dns as i32
                        },
                        matcher: Some(StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact(s.clone())),
                            ignore_case: false,
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        });
        let ctx = UpstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: client
                    .iter()
                    .map(|(cert, key)| TlsCertificate {
                        certificate_chain: Some(file(cert)),
                        private_key: Some(file(key)),
                        ..Default::default()
                    })
                    .collect(),
                validation_context_type: validation,
                ..Default::default()
            }),
            sni: sni.clone().unwrap_or_else(|| {
                if host.contains('*') {
                    String::new()
                } else {
                    host.to_string()
                }
            }),
            ..Default::default()
        };
        c.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
        });
    }
}

fn string_matcher(m: &StrMatch) -> StringMatcher {
    use string_matcher::MatchPattern as M;
    StringMatcher {
        match_pattern: Some(match m {
            StrMatch::Exact(s) => M::Exact(s.clone()),
            StrMatch::Prefix(s) => M::Prefix(s.clone()),
            StrMatch::Regex(s) => M::SafeRegex(RegexMatcher {
                regex: s.clone(),
                ..Default::default()
            }),
        }),
        ignore_case: false,
    }
}

/// An Envoy route match for an Istio match (`None`: every request).
pub(crate) fn route_match(m: Option<&Match>) -> RouteMatch {
    let mut out = RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    let Some(m) = m else { return out };
    out.path_specifier = Some(match &m.uri {
        None => route_match::PathSpecifier::Prefix("/".into()),
        Some(StrMatch::Exact(s)) => route_match::PathSpecifier::Path(s.clone()),
        Some(StrMatch::Prefix(s)) => route_match::PathSpecifier::Prefix(s.clone()),
        Some(StrMatch::Regex(s)) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: s.clone(),
            ..Default::default()
        }),
    });
    if m.ignore_uri_case {
        out.case_sensitive = Some(BoolValue { value: false });
    }
    out.headers = m
        .headers
        .iter()
        .map(|(name, v, invert)| HeaderMatcher {
            name: name.clone(),
            header_match_specifier: Some(match v {
                None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
                Some(v) => header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(v)),
            }),
            invert_match: *invert,
            ..Default::default()
        })
        .collect();
    out.query_parameters = m
        .query
        .iter()
        .map(|(name, v)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(match v {
                None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
                Some(v) => query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_matcher(v)),
            }),
        })
        .collect();
    out
}

fn header_options(ops: &super::parse::HeaderOps) -> Vec<HeaderValueOption> {
    use header_value_option::HeaderAppendAction as A;
    let one = |(k, v): (&String, &String), a: A| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        append_action: a as i32,
        ..Default::default()
    };
    ops.set
        .iter()
        .map(|kv| one(kv, A::OverwriteIfExistsOrAdd))
        .chain(ops.add.iter().map(|kv| one(kv, A::AppendIfExistsOrAdd)))
        .collect()
}

/// One Envoy route for `r` under match `m`; `clusters` are the route's destinations already
/// resolved to cluster names with weights, `mirrors` likewise, `hash` the single destination's
/// consistent-hash key.
pub(crate) fn route(
    r: &HttpRoute,
    m: Option<&Match>,
    clusters: &[(String, u32)],
    mirrors: &[(String, f64)],
    hash: Option<&HashKey>,
) -> Route {
    use route_action::hash_policy::PolicySpecifier as H;
    let action = match &r.action {
        Action::Route(_) => {
            let live: Vec<&(String, u32)> = clusters.iter().filter(|(_, w)| *w > 0).collect();
            let spec = match live.as_slice() {
                [(one, _)] => route_action::ClusterSpecifier::Cluster(one.clone()),
                _ => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: live
                        .iter()
                        .map(|(name, w)| weighted_cluster::ClusterWeight {
                            name: name.clone(),
                            weight: Some(UInt32Value { value: *w }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
            };
            let retry_policy = r.retries.as_ref().filter(|x| x.attempts > 0).map(|x| RetryPolicy {
                retry_on: if x.retry_on.is_empty() {
                    // Istio's default conditions.
                    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into()
                } else {
                    x.retry_on.join(",")
                },
                num_retries: Some(UInt32Value { value: x.attempts }),
                per_try_timeout: x.per_try_timeout.map(pb_duration),
                retriable_status_codes: x.codes.clone(),
                retry_host_predicate: if x.ignore_previous_hosts {
                    vec![retry_policy::RetryHostPredicate {
                        name: "envoy.retry_host_predicates.previous_hosts".into(),
                        config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
                            &PreviousHostsPredicate::default(),
                        ))),
                    }]
                } else {
                    Vec::new()
                },
                host_selection_retry_max_attempts: if x.ignore_previous_hosts { 5 } else { 0 },
                retry_back_off: x.backoff.map(|b| retry_policy::RetryBackOff {
                    base_interval: Some(pb_duration(b)),
                    ..Default::default()
                }),
                ..Default::default()
            });
            let hash_policy = hash
                .map(|h| route_action::HashPolicy {
                    policy_specifier: Some(match h {
                        HashKey::Header(n) => H::Header(route_action::hash_policy::Header {
                            header_name: n.clone(),
                            ..Default::default()
                        }),
                        HashKey::Cookie(n) => H::Cookie(route_action::hash_policy::Cookie {
                            name: n.clone(),
                            ..Default::default()
                        }),
                        HashKey::SourceIp => {
                            H::ConnectionProperties(route_action::hash_policy::ConnectionProperties { source_ip: true })
                        }
                        HashKey::Query(n) => {
                            H::QueryParameter(route_action::hash_policy::QueryParameter { name: n.clone() })
                        }
                    }),
                    terminal: false,
                })
                .into_iter()
                .collect();
            route::Action::Route(RouteAction {
                cluster_specifier: Some(spec),
                // Istio sets no route timeout unless the VirtualService gives one.
                timeout: Some(pb_duration(r.timeout.unwrap_or_default())),
                prefix_rewrite: r.rewrite.uri.clone().unwrap_or_default(),
                regex_rewrite: r.rewrite.regex.as_ref().map(|(pattern, sub)| RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: pattern.clone(),
                        ..Default::default()
                    }),
                    substitution: sub.clone(),
                }),
                host_rewrite_specifier: r
                    .rewrite
                    .authority
                    .clone()
                    .map(route_action::HostRewriteSpecifier::HostRewriteLiteral),
                retry_policy,
                hash_policy,
                request_mirror_policies: mirrors
                    .iter()
                    .map(|(cluster, pct)| route_action::RequestMirrorPolicy {
                        cluster: cluster.clone(),
                        runtime_fraction: (*pct < 100.0).then(|| RuntimeFractionalPercent {
                            default_value: Some(FractionalPercent {
                                numerator: (pct * 10_000.0).round() as u32,
                                denominator: fractional_percent::DenominatorType::Million as i32,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        }
        Action::Redirect {
            uri,
            prefix,
            authority,
            port,
            scheme,
            code,
        } => route::Action::Redirect(RedirectAction {
            path_rewrite_specifier: uri
                .clone()
                .map(redirect_action::PathRewriteSpecifier::PathRedirect)
                .or_else(|| prefix.clone().map(redirect_action::PathRewriteSpecifier::PrefixRewrite)),
            host_redirect: authority.clone().unwrap_or_default(),
            port_redirect: port.map(u32::from).unwrap_or(0),
            scheme_rewrite_specifier: scheme
                .clone()
                .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
            response_code: match code {
                302 => redirect_action::RedirectResponseCode::Found,
                303 => redirect_action::RedirectResponseCode::SeeOther,
                307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
                308 => redirect_action::RedirectResponseCode::PermanentRedirect,
                _ => redirect_action::RedirectResponseCode::MovedPermanently,
            } as i32,
            ..Default::default()
        }),
        Action::Direct { status, body } => route::Action::DirectResponse(DirectResponseAction {
            status: *status,
            body: body.clone().map(|b| DataSource {
                specifier: Some(data_source::Specifier::InlineString(b)),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    Route {
        name: r.name.clone().unwrap_or_default(),
        r#match: Some(route_match(m)),
        action: Some(action),
        request_headers_to_add: header_options(&r.headers.request),
        request_headers_to_remove: r.headers.request.remove.clone(),
        response_headers_to_add: header_options(&r.headers.response),
        response_headers_to_remove: r.headers.response.remove.clone(),
        ..Default::default()
    }
}

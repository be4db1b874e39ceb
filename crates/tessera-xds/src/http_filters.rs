//! HTTP filters from Envoy config that Tessera runs natively: `envoy.filters.http.fault` (as a
//! fault on every route without its own) and `envoy.filters.http.local_ratelimit` (listener-wide,
//! or per route through `typed_per_filter_config`). Runtime overrides (`*_runtime` keys) are not
//! read: the configured defaults apply.

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tessera_model as model;

use crate::{Problems, duration};

pub(crate) const FAULT: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
pub(crate) const LOCAL_RATELIMIT: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// A fractional percent as 0 to 100.
pub(crate) fn percent(f: Option<&FractionalPercent>) -> f64 {
    let Some(f) = f else { return 0.0 };
    let scale = match f.denominator {
        1 => 10_000.0,
        2 => 1_000_000.0,
        _ => 100.0,
    };
    (f64::from(f.numerator) * 100.0 / scale).min(100.0)
}

/// The fault filter's configuration.
pub(crate) fn fault(any: &Any, at: &str, p: &mut Problems) -> Option<model::FaultInjection> {
    let f = HttpFault::decode(any.value.as_slice())
        .map_err(|e| p.add(at, format!("malformed {FAULT}: {e}")))
        .ok()?;
    let delay = f.delay.as_ref().and_then(|d| match &d.fault_delay_secifier {
        Some(fault_delay::FaultDelaySecifier::FixedDelay(fd)) => Some(model::FaultDelay {
            fixed_delay: duration(fd).unwrap_or_default(),
            percentage: percent(d.percentage.as_ref()),
        }),
        _ => {
            p.add(format!("{at}.delay"), "only fixed_delay is supported");
            None
        }
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let status = match &a.error_type {
            Some(fault_abort::ErrorType::HttpStatus(s)) => match u16::try_from(*s) {
                Ok(s) if (200..600).contains(&s) => model::AbortStatus::Http(s),
                _ => {
                    p.add(format!("{at}.abort.http_status"), format!("{s} is not an HTTP status"));
                    return None;
                }
            },
            Some(fault_abort::ErrorType::GrpcStatus(s)) => model::AbortStatus::Grpc(u8::try_from(*s).unwrap_or(2)),
            _ => {
                p.add(format!("{at}.abort"), "header-controlled aborts are not supported");
                return None;
            }
        };
        Some(model::FaultAbort {
            status,
            percentage: percent(a.percentage.as_ref()),
        })
    });
    if !f.upstream_cluster.is_empty() || !f.downstream_nodes.is_empty() || f.response_rate_limit.is_some() {
        p.add(
            at,
            "upstream_cluster, downstream_nodes and response_rate_limit are not supported",
        );
    }
    let headers = f
        .headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| crate::route::header_matcher(h, &format!("{at}.headers[{i}]"), p))
        .collect();
    Some(model::FaultInjection { delay, abort, headers })
}

fn full(r: Option<&RuntimeFractionalPercent>) -> f64 {
    percent(r.and_then(|r| r.default_value.as_ref()))
}

/// The local rate limit filter's configuration: `None` when it limits nothing (Envoy's default
/// `filter_enabled` and `filter_enforced` are 0%).
pub(crate) fn local_ratelimit(any: &Any, at: &str, p: &mut Problems) -> Option<model::LocalRateLimit> {
    let l = LocalRateLimit::decode(any.value.as_slice())
        .map_err(|e| p.add(at, format!("malformed {LOCAL_RATELIMIT}: {e}")))
        .ok()?;
    let (enabled, enforced) = (full(l.filter_enabled.as_ref()), full(l.filter_enforced.as_ref()));
    if enabled == 0.0 || enforced == 0.0 {
        return None;
    }
    if enabled < 100.0 || enforced < 100.0 {
        p.add(
            at,
            "filter_enabled and filter_enforced must be 0% or 100%; partial rate limiting is not supported",
        );
        return None;
    }
    if !l.descriptors.is_empty() {
        p.add(
            format!("{at}.descriptors"),
            "rate limit descriptors are not supported yet",
        );
    }
    if l.local_rate_limit_per_downstream_connection {
        p.add(
            format!("{at}.local_rate_limit_per_downstream_connection"),
            "per-connection buckets are not supported",
        );
    }
    let Some(tb) = &l.token_bucket else {
        p.add(format!("{at}.token_bucket"), "a token bucket is required");
        return None;
    };
    let fill_interval = tb.fill_interval.as_ref().and_then(duration).unwrap_or_default();
    if fill_interval.is_zero() || tb.max_tokens == 0 {
        p.add(
            format!("{at}.token_bucket"),
            "max_tokens and fill_interval must be above zero",
        );
        return None;
    }
    Some(model::LocalRateLimit {
        max_tokens: tb.max_tokens,
        tokens_per_fill: tb.tokens_per_fill.as_ref().map_or(1, |v| v.value),
        fill_interval,
        descriptor: None,
        response_headers: l.enable_x_ratelimit_headers != 0,
        response_headers_to_add: crate::route::header_options(
            &l.response_headers_to_add,
            &format!("{at}.response_headers_to_add"),
            p,
        ),
    })
}

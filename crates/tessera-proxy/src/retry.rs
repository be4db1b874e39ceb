//! Retry decisions as pure functions: which outcomes a policy retries, which methods are safe to
//! send twice, the back-off, and the retry circuit breaker.

use std::time::Duration;

use http::Method;
use tessera_model::{RetryOn, RetryPolicy, Thresholds};

use crate::util::rand_below;

/// Why an attempt got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection could not be made: the request never left.
    Connect,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    RefusedStream,
    /// The connection or stream was reset before the response headers.
    Reset,
    /// The per-try timeout passed.
    PerTryTimeout,
}

/// GET, HEAD, OPTIONS, PUT, DELETE and TRACE may be sent twice without harm (RFC 9110 §9.2.2).
pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether `policy` retries a response with `status` (and, for gRPC, its `grpc-status` header).
/// Non-idempotent requests are not retried on a response unless the policy says so: the upstream
/// may have acted on them.
pub(crate) fn retry_response(policy: &RetryPolicy, status: u16, grpc_status: Option<u32>, idempotent: bool) -> bool {
    if !idempotent && !policy.retry_non_idempotent {
        return false;
    }
    let on = policy.retry_on;
    (on.has(RetryOn::FIVE_XX) && status >= 500)
        || (on.has(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
        || (on.has(RetryOn::RETRIABLE_4XX) && status == 409)
        || (on.has(RetryOn::RETRIABLE_STATUS_CODES) && policy.retriable_status_codes.contains(&status))
        || grpc_status.is_some_and(|g| {
            (on.has(RetryOn::GRPC_CANCELLED) && g == 1)
                || (on.has(RetryOn::GRPC_DEADLINE_EXCEEDED) && g == 4)
                || (on.has(RetryOn::GRPC_RESOURCE_EXHAUSTED) && g == 8)
                || (on.has(RetryOn::GRPC_UNAVAILABLE) && g == 14)
        })
}

/// Whether `policy` retries an attempt that got no response. A connect failure or a refused
/// stream never reached the application, so even non-idempotent requests are retried then.
pub(crate) fn retry_failure(policy: &RetryPolicy, f: Failure, idempotent: bool) -> bool {
    let on = policy.retry_on;
    let safe = idempotent || policy.retry_non_idempotent;
    match f {
        Failure::Connect => {
            on.has(RetryOn::CONNECT_FAILURE) || on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR)
        }
        Failure::RefusedStream => on.has(RetryOn::REFUSED_STREAM) || on.has(RetryOn::FIVE_XX),
        Failure::Reset => {
            safe && (on.has(RetryOn::RESET) || on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR))
        }
        Failure::PerTryTimeout => {
            safe && (on.has(RetryOn::RESET) || on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR))
        }
    }
}

/// Envoy's back-off before retry `n` (1-based): uniform in `[0, (2^n − 1) × base]`, capped.
pub(crate) fn backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let base = policy.base_interval.as_micros() as u64;
    let upper = base
        .saturating_mul((1u64 << n.min(30)) - 1)
        .min(policy.max_interval.as_micros() as u64);
    Duration::from_micros(rand_below(upper + 1))
}

/// Whether one more retry fits the circuit breaker: `max_retries` in flight, or the retry budget
/// (a share of requests in flight, never below its minimum) when one is set.
pub(crate) fn breaker_allows(th: &Thresholds, retries_active: i64, requests_active: i64) -> bool {
    let limit = match &th.retry_budget {
        Some(b) => {
            ((requests_active.max(0) as f64 * b.budget_percent / 100.0) as i64).max(i64::from(b.min_retry_concurrency))
        }
        None => i64::from(th.max_retries),
    };
    retries_active < limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_model::RetryBudget;

    fn policy(on: &str) -> RetryPolicy {
        RetryPolicy {
            retry_on: RetryOn::parse(on).unwrap(),
            num_retries: 2,
            per_try_timeout: Duration::ZERO,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            retriable_status_codes: vec![418],
            skip_previous_hosts: true,
            host_selection_retry_max_attempts: 3,
            retry_non_idempotent: false,
        }
    }

    #[test]
    fn responses() {
        let p = policy("5xx");
        assert!(retry_response(&p, 503, None, true));
        assert!(retry_response(&p, 500, None, true));
        assert!(!retry_response(&p, 404, None, true));
        assert!(
            !retry_response(&p, 503, None, false),
            "POST is not retried on a response"
        );
        let g = policy("gateway-error");
        assert!(retry_response(&g, 502, None, true) && retry_response(&g, 504, None, true));
        assert!(!retry_response(&g, 500, None, true));
        let c = policy("retriable-4xx,retriable-status-codes");
        assert!(retry_response(&c, 409, None, true) && retry_response(&c, 418, None, true));
        assert!(!retry_response(&c, 404, None, true));
        let grpc = policy("unavailable,cancelled");
        assert!(retry_response(&grpc, 200, Some(14), true) && retry_response(&grpc, 200, Some(1), true));
        assert!(!retry_response(&grpc, 200, Some(4), true) && !retry_response(&grpc, 200, None, true));
    }

    #[test]
    fn failures() {
        let cf = policy("connect-failure");
        assert!(
            retry_failure(&cf, Failure::Connect, false),
            "never reached the app: safe even for POST"
        );
        assert!(!retry_failure(&cf, Failure::Reset, true));
        let five = policy("5xx");
        for f in [
            Failure::Connect,
            Failure::RefusedStream,
            Failure::Reset,
            Failure::PerTryTimeout,
        ] {
            assert!(retry_failure(&five, f, true), "{f:?}");
        }
        assert!(
            !retry_failure(&five, Failure::Reset, false),
            "a reset POST may have been processed"
        );
        let mut yes = policy("reset");
        yes.retry_non_idempotent = true;
        assert!(retry_failure(&yes, Failure::Reset, false));
        assert!(retry_failure(&policy("refused-stream"), Failure::RefusedStream, false));
    }

    #[test]
    fn backoff_is_bounded_with_jitter() {
        let p = policy("5xx");
        for n in 1..10 {
            for _ in 0..200 {
                let b = backoff(&p, n);
                assert!(
                    b <= Duration::from_millis(25 * ((1 << n) - 1)).min(Duration::from_millis(250)),
                    "n={n} {b:?}"
                );
            }
        }
        let spread: std::collections::HashSet<Duration> = (0..50).map(|_| backoff(&p, 3)).collect();
        assert!(spread.len() > 10, "jittered");
    }

    #[test]
    fn retry_breaker_and_budget() {
        let th = Thresholds::default();
        assert!(breaker_allows(&th, 2, 100));
        assert!(!breaker_allows(&th, 3, 100), "max_retries 3");
        let budget = Thresholds {
            retry_budget: Some(RetryBudget {
                budget_percent: 20.0,
                min_retry_concurrency: 3,
            }),
            ..Thresholds::default()
        };
        assert!(breaker_allows(&budget, 19, 100), "20% of 100");
        assert!(!breaker_allows(&budget, 20, 100));
        assert!(
            breaker_allows(&budget, 2, 1),
            "the minimum applies when few requests are active"
        );
        assert!(!breaker_allows(&budget, 3, 1));
    }

    #[test]
    fn idempotency() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }
}

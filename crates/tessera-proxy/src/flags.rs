//! Envoy's response flags: short codes that say why a request ended the way it did.

use std::fmt;

/// A set of response flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseFlags(u32);

macro_rules! flags {
    ($($name:ident = $bit:expr, $code:literal, $doc:literal;)*) => {
        impl ResponseFlags {
            $(#[doc = $doc] pub const $name: ResponseFlags = ResponseFlags(1 << $bit);)*
            const ALL: &'static [(ResponseFlags, &'static str)] = &[$((ResponseFlags::$name, $code)),*];
        }
    };
}

flags! {
    FAILED_LOCAL_HEALTHCHECK = 0, "LH", "Local health check failed.";
    NO_HEALTHY_UPSTREAM = 1, "UH", "No healthy upstream host.";
    UPSTREAM_REQUEST_TIMEOUT = 2, "UT", "Upstream request timed out.";
    LOCAL_RESET = 3, "LR", "Reset locally.";
    UPSTREAM_REMOTE_RESET = 4, "UR", "The upstream reset the stream.";
    UPSTREAM_CONNECTION_FAILURE = 5, "UF", "Connecting upstream failed.";
    UPSTREAM_CONNECTION_TERMINATION = 6, "UC", "The upstream connection closed.";
    UPSTREAM_OVERFLOW = 7, "UO", "A circuit breaker overflowed.";
    NO_ROUTE_FOUND = 8, "NR", "No route matched, or no filter chain matched.";
    DELAY_INJECTED = 9, "DI", "A fault delay was injected.";
    FAULT_INJECTED = 10, "FI", "A fault abort was injected.";
    RATE_LIMITED = 11, "RL", "Rate limited.";
    DOWNSTREAM_CONNECTION_TERMINATION = 12, "DC", "The downstream connection closed.";
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 13, "URX", "Retries or connect attempts ran out.";
    STREAM_IDLE_TIMEOUT = 14, "SI", "The stream was idle too long.";
    DOWNSTREAM_PROTOCOL_ERROR = 15, "DPE", "The downstream broke the protocol.";
    UPSTREAM_PROTOCOL_ERROR = 16, "UPE", "The upstream broke the protocol.";
    DURATION_TIMEOUT = 17, "DT", "A request exceeded its allowed duration.";
    OVERLOAD_MANAGER = 18, "OM", "Rejected while draining or overloaded.";
    UNAUTHORIZED_EXTERNAL_SERVICE = 19, "UAEX", "Denied by policy.";
    RATELIMIT_SERVICE_ERROR = 20, "RLSE", "The quota backend failed and the quota fails closed.";
}

impl ResponseFlags {
    /// No flags.
    pub const NONE: ResponseFlags = ResponseFlags(0);

    /// Adds `other`.
    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    /// True when all of `other` is set.
    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// True when nothing is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for ResponseFlags {
    /// Comma-separated short codes, or `-` when empty, as Envoy prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, code) in ResponseFlags::ALL {
            if self.contains(*flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(code)?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_envoy() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::NO_ROUTE_FOUND.to_string(), "NR");
        let both = ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
        assert_eq!(both.to_string(), "UF,URX");
        assert!(both.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE));
        assert!(!both.contains(ResponseFlags::NO_HEALTHY_UPSTREAM));
    }
}

//! Trace context propagation as pure functions: W3C `traceparent` and Zipkin B3 (single `b3`
//! header and `x-b3-*` headers), plus id generation. No exporter here.
//!
//! Parsing is strict where the specs are: ids must have the exact length, be lowercase hex and
//! not all zero; anything else is a [`TraceError`] and the caller starts a new trace.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a trace header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// The header does not have the shape the spec requires.
    #[error("malformed {header} header: {reason}")]
    Malformed {
        /// Which header.
        header: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A trace or span id of all zeros, which both specs declare invalid.
    #[error("{header} header has an all-zero {field}")]
    ZeroId {
        /// Which header.
        header: &'static str,
        /// `"trace id"` or `"span id"`.
        field: &'static str,
    },
    /// A required B3 header is absent.
    #[error("missing {0} header")]
    Missing(&'static str),
}

/// A 128-bit trace id, never zero. A 64-bit B3 id is held in the low half.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(u128);

/// A 64-bit span id, never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(u64);

impl TraceId {
    /// `None` for zero, which is not a valid id.
    pub fn new(value: u128) -> Option<TraceId> {
        (value != 0).then_some(TraceId(value))
    }

    /// A random id from this thread's generator.
    pub fn random() -> TraceId {
        loop {
            let value = (u128::from(next_random()) << 64) | u128::from(next_random());
            if value != 0 {
                return TraceId(value);
            }
        }
    }

    /// The numeric value.
    pub fn get(self) -> u128 {
        self.0
    }
}

impl SpanId {
    /// `None` for zero, which is not a valid id.
    pub fn new(value: u64) -> Option<SpanId> {
        (value != 0).then_some(SpanId(value))
    }

    /// A random id from this thread's generator.
    pub fn random() -> SpanId {
        loop {
            let value = next_random();
            if value != 0 {
                return SpanId(value);
            }
        }
    }

    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Always 32 lowercase hex digits (64-bit ids are zero-padded, as W3C and B3 both allow).
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Always 16 lowercase hex digits.
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The sampling decision carried with a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Sampling {
    /// No decision yet (B3 without a sampling state); the receiver decides.
    #[default]
    Deferred,
    /// Record and export.
    Sampled,
    /// Do not record.
    NotSampled,
    /// Sampled and forced through every sampler (B3 `d` / `x-b3-flags: 1`).
    Debug,
}

impl Sampling {
    /// Whether spans should be recorded (`Debug` counts as sampled).
    pub fn is_sampled(self) -> bool {
        matches!(self, Sampling::Sampled | Sampling::Debug)
    }
}

/// The propagated part of a span: which trace, which span, and the sampling decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The span that sent (or will send) the request.
    pub span_id: SpanId,
    /// The span's parent, when known (B3 carries it; `traceparent` does not).
    pub parent_span_id: Option<SpanId>,
    /// The sampling decision.
    pub sampling: Sampling,
}

/// What a `b3` single header carries: a context, or only a sampling decision (`b3: 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3 {
    /// Ids and sampling.
    Context(TraceContext),
    /// Only the sampling state, no ids.
    SamplingOnly(Sampling),
}

impl TraceContext {
    /// A new trace with random ids and no parent.
    pub fn new_root(sampling: Sampling) -> TraceContext {
        TraceContext {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent_span_id: None,
            sampling,
        }
    }

    /// The context to send upstream for a new span under this one: same trace and sampling,
    /// `new_span_id` as the span, this span as its parent.
    pub fn child(&self, new_span_id: SpanId) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: new_span_id,
            parent_span_id: Some(self.span_id),
            sampling: self.sampling,
        }
    }

    /// Parses a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
    ///
    /// Per the spec, a version above `00` (but not `ff`) is read as version 00 if its first four
    /// fields have version 00's shape, and anything it appends after a `-` is ignored.
    pub fn parse_traceparent(value: &str) -> Result<TraceContext, TraceError> {
        const H: &str = "traceparent";
        let bad = |reason| TraceError::Malformed { header: H, reason };
        let value = value.trim_matches([' ', '\t']);
        if !value.is_ascii() {
            // Also keeps the byte-offset slicing below on character boundaries.
            return Err(bad("non-ASCII characters"));
        }
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return Err(bad("shorter than 55 characters"));
        }
        let version = parse_hex::<u8>(&value[..2], 2).ok_or_else(|| bad("version is not 2 lowercase hex digits"))?;
        if version == 0xff {
            return Err(bad("version ff is invalid"));
        }
        if version == 0 && bytes.len() != 55 {
            return Err(bad("version 00 must be exactly 55 characters"));
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return Err(bad("unexpected data after the flags"));
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(bad("fields are not separated by '-' at the expected positions"));
        }
        let trace_id =
            parse_hex::<u128>(&value[3..35], 32).ok_or_else(|| bad("trace id is not 32 lowercase hex digits"))?;
        let span_id =
            parse_hex::<u64>(&value[36..52], 16).ok_or_else(|| bad("span id is not 16 lowercase hex digits"))?;
        let flags = parse_hex::<u8>(&value[53..55], 2).ok_or_else(|| bad("flags are not 2 lowercase hex digits"))?;
        Ok(TraceContext {
            trace_id: TraceId::new(trace_id).ok_or(TraceError::ZeroId {
                header: H,
                field: "trace id",
            })?,
            span_id: SpanId::new(span_id).ok_or(TraceError::ZeroId {
                header: H,
                field: "span id",
            })?,
            parent_span_id: None,
            sampling: if flags & 0x01 != 0 {
                Sampling::Sampled
            } else {
                Sampling::NotSampled
            },
        })
    }

    /// Formats a version-00 `traceparent`. Flags carry only the sampled bit; `Deferred` is
    /// written as not sampled, since W3C has no "undecided".
    pub fn to_traceparent(&self) -> String {
        let flags = u8::from(self.sampling.is_sampled());
        format!("00-{}-{}-{flags:02x}", self.trace_id, self.span_id)
    }

    /// Parses a B3 single header: `{trace}-{span}[-{sampling}[-{parent}]]`, or just `{sampling}`.
    pub fn parse_b3(value: &str) -> Result<B3, TraceError> {
        const H: &str = "b3";
        let bad = |reason| TraceError::Malformed { header: H, reason };
        let mut parts = value.trim().split('-');
        let first = parts.next().unwrap_or_default();
        let Some(span) = parts.next() else {
            return parse_b3_sampling(H, first, false).map(B3::SamplingOnly);
        };
        let trace_id = parse_b3_trace_id(H, first)?;
        let span_id = parse_b3_span_id(H, "span id", span)?;
        let sampling = match parts.next() {
            Some(s) => parse_b3_sampling(H, s, false)?,
            None => Sampling::Deferred,
        };
        let parent_span_id = match parts.next() {
            Some(p) => Some(parse_b3_span_id(H, "parent span id", p)?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(bad("more than four fields"));
        }
        Ok(B3::Context(TraceContext {
            trace_id,
            span_id,
            parent_span_id,
            sampling,
        }))
    }

    /// Formats a B3 single header; the sampling field is left out when deferred.
    pub fn to_b3(&self) -> String {
        let mut out = format!("{}-{}", self.trace_id, self.span_id);
        let sampling = match self.sampling {
            Sampling::Deferred => None,
            Sampling::Sampled => Some("1"),
            Sampling::NotSampled => Some("0"),
            Sampling::Debug => Some("d"),
        };
        match (sampling, self.parent_span_id) {
            (Some(s), Some(parent)) => out.push_str(&format!("-{s}-{parent}")),
            (Some(s), None) => out.push_str(&format!("-{s}")),
            // The parent field comes after the sampling field, so it needs one: "1" is what a
            // receiver would decide anyway for a context we propagate.
            (None, Some(parent)) => out.push_str(&format!("-1-{parent}")),
            (None, None) => {}
        }
        out
    }

    /// Parses B3 multi headers through `header(name)`, which returns a header's value by
    /// lowercase name (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`,
    /// `x-b3-flags`).
    pub fn parse_b3_multi<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Result<TraceContext, TraceError> {
        let trace_id = parse_b3_trace_id(
            "x-b3-traceid",
            header("x-b3-traceid")
                .ok_or(TraceError::Missing("x-b3-traceid"))?
                .trim(),
        )?;
        let span_id = parse_b3_span_id(
            "x-b3-spanid",
            "span id",
            header("x-b3-spanid").ok_or(TraceError::Missing("x-b3-spanid"))?.trim(),
        )?;
        let parent_span_id = match header("x-b3-parentspanid") {
            Some(p) => Some(parse_b3_span_id("x-b3-parentspanid", "span id", p.trim())?),
            None => None,
        };
        let debug = match header("x-b3-flags").map(str::trim) {
            None | Some("0") => false,
            Some("1") => true,
            Some(_) => {
                return Err(TraceError::Malformed {
                    header: "x-b3-flags",
                    reason: "must be 1 or 0",
                });
            }
        };
        let sampling = if debug {
            Sampling::Debug
        } else {
            match header("x-b3-sampled") {
                Some(s) => parse_b3_sampling("x-b3-sampled", s.trim(), true)?,
                None => Sampling::Deferred,
            }
        };
        Ok(TraceContext {
            trace_id,
            span_id,
            parent_span_id,
            sampling,
        })
    }

    /// The B3 multi headers for this context, as (lowercase name, value) pairs.
    pub fn to_b3_multi(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("x-b3-traceid", self.trace_id.to_string()),
            ("x-b3-spanid", self.span_id.to_string()),
        ];
        if let Some(parent) = self.parent_span_id {
            headers.push(("x-b3-parentspanid", parent.to_string()));
        }
        match self.sampling {
            Sampling::Deferred => {}
            Sampling::Sampled => headers.push(("x-b3-sampled", "1".to_string())),
            Sampling::NotSampled => headers.push(("x-b3-sampled", "0".to_string())),
            // Debug implies sampled; the spec says not to send x-b3-sampled with it.
            Sampling::Debug => headers.push(("x-b3-flags", "1".to_string())),
        }
        headers
    }
}

/// Parses exactly `len` lowercase hex digits.
fn parse_hex<T: FromHexDigits>(s: &str, len: usize) -> Option<T> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    T::from_hex(s)
}

trait FromHexDigits: Sized {
    fn from_hex(s: &str) -> Option<Self>;
}

macro_rules! from_hex_digits {
    ($($t:ty),*) => {$(
        impl FromHexDigits for $t {
            fn from_hex(s: &str) -> Option<Self> {
                <$t>::from_str_radix(s, 16).ok()
            }
        }
    )*};
}
from_hex_digits!(u8, u64, u128);

fn parse_b3_trace_id(header: &'static str, s: &str) -> Result<TraceId, TraceError> {
    let value = match s.len() {
        16 => parse_hex::<u64>(s, 16).map(u128::from),
        32 => parse_hex::<u128>(s, 32),
        _ => None,
    }
    .ok_or(TraceError::Malformed {
        header,
        reason: "trace id is not 16 or 32 lowercase hex digits",
    })?;
    TraceId::new(value).ok_or(TraceError::ZeroId {
        header,
        field: "trace id",
    })
}

fn parse_b3_span_id(header: &'static str, field: &'static str, s: &str) -> Result<SpanId, TraceError> {
    let value = parse_hex::<u64>(s, 16).ok_or(TraceError::Malformed {
        header,
        reason: "span id is not 16 lowercase hex digits",
    })?;
    SpanId::new(value).ok_or(TraceError::ZeroId { header, field })
}

/// `1`/`0`/`d` (single header); the multi header also takes legacy `true`/`false` but not `d`.
fn parse_b3_sampling(header: &'static str, s: &str, multi: bool) -> Result<Sampling, TraceError> {
    match s {
        "1" => Ok(Sampling::Sampled),
        "0" => Ok(Sampling::NotSampled),
        "d" if !multi => Ok(Sampling::Debug),
        "true" if multi => Ok(Sampling::Sampled),
        "false" if multi => Ok(Sampling::NotSampled),
        _ => Err(TraceError::Malformed {
            header,
            reason: "sampling state must be 1, 0 or d",
        }),
    }
}

/// A process-wide counter mixed into each thread's seed, so two threads seeded in the same
/// instant still differ.
static SEED_COUNTER: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RNG_STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // RandomState is seeded by the OS once per process and perturbed per instance.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(SEED_COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.finish()
}

/// SplitMix64: fast, passes BigCrush, fine for ids (not for secrets).
fn next_random() -> u64 {
    RNG_STATE.with(|state| {
        let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let ctx = TraceContext::parse_traceparent(TP).unwrap();
        assert_eq!(ctx.trace_id.get(), 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ctx.span_id.get(), 0x00f067aa0ba902b7);
        assert_eq!(ctx.sampling, Sampling::Sampled);
        assert_eq!(ctx.to_traceparent(), TP);
        let unsampled = TraceContext::parse_traceparent(&TP.replace("-01", "-00")).unwrap();
        assert_eq!(unsampled.sampling, Sampling::NotSampled);
        assert!(unsampled.to_traceparent().ends_with("-00"));
    }

    #[test]
    fn traceparent_future_version_is_read_leniently() {
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert!(TraceContext::parse_traceparent(future).is_ok());
    }

    #[test]
    fn traceparent_rejects_bad_input() {
        let cases = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-x00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // Multi-byte characters must not cause a panic on slicing.
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ];
        for case in cases {
            assert!(
                matches!(TraceContext::parse_traceparent(case), Err(TraceError::Malformed { .. })),
                "{case:?} accepted"
            );
        }
        let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zero_span = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        assert!(matches!(
            TraceContext::parse_traceparent(zero_trace),
            Err(TraceError::ZeroId { field: "trace id", .. })
        ));
        assert!(matches!(
            TraceContext::parse_traceparent(zero_span),
            Err(TraceError::ZeroId { field: "span id", .. })
        ));
    }

    #[test]
    fn b3_single_header() {
        let full = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90";
        let B3::Context(ctx) = TraceContext::parse_b3(full).unwrap() else {
            panic!("expected a context");
        };
        assert_eq!(ctx.span_id.get(), 0xe457b5a2e4d86bd1);
        assert_eq!(ctx.parent_span_id.map(SpanId::get), Some(0x05e3ac9a4f6e3b90));
        assert_eq!(ctx.sampling, Sampling::Sampled);
        assert_eq!(ctx.to_b3(), full);

        let B3::Context(short) = TraceContext::parse_b3("64fe8b2a57d3eff7-e457b5a2e4d86bd1").unwrap() else {
            panic!("expected a context");
        };
        assert_eq!(short.trace_id.get(), 0x64fe8b2a57d3eff7);
        assert_eq!(short.sampling, Sampling::Deferred);
        assert_eq!(short.to_b3(), "000000000000000064fe8b2a57d3eff7-e457b5a2e4d86bd1");

        assert_eq!(
            TraceContext::parse_b3("0").unwrap(),
            B3::SamplingOnly(Sampling::NotSampled)
        );
        assert_eq!(TraceContext::parse_b3("d").unwrap(), B3::SamplingOnly(Sampling::Debug));

        for bad in [
            "",
            "x",
            "true",
            "64fe8b2a57d3eff-e457b5a2e4d86bd1",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-2",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-x",
            "0000000000000000-e457b5a2e4d86bd1",
            "64fe8b2a57d3eff7-0000000000000000",
            "64FE8B2A57D3EFF7-e457b5a2e4d86bd1",
        ] {
            assert!(TraceContext::parse_b3(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn b3_multi_headers() {
        let mut headers: HashMap<&str, &str> = HashMap::from([
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]);
        let ctx = TraceContext::parse_b3_multi(|name| headers.get(name).copied()).unwrap();
        assert_eq!(ctx.trace_id.get(), 0x463ac35c9f6413ad48485a3953bb6124);
        assert_eq!(ctx.parent_span_id.map(SpanId::get), Some(0x0020000000000001));
        assert_eq!(ctx.sampling, Sampling::Sampled);
        let out: HashMap<&str, String> = ctx.to_b3_multi().into_iter().collect();
        for (name, value) in &headers {
            assert_eq!(out.get(name).map(String::as_str), Some(*value), "{name}");
        }

        let mut debug_headers = headers.clone();
        debug_headers.insert("x-b3-flags", "1");
        let debug = TraceContext::parse_b3_multi(|name| debug_headers.get(name).copied()).unwrap();
        assert_eq!(debug.sampling, Sampling::Debug);
        assert!(debug.to_b3_multi().contains(&("x-b3-flags", "1".to_string())));

        headers.insert("x-b3-traceid", "463ac35c9f6413ad");
        let short = TraceContext::parse_b3_multi(|name| headers.get(name).copied()).unwrap();
        assert_eq!(short.trace_id.get(), 0x463ac35c9f6413ad);
        headers.insert("x-b3-sampled", "false");
        let legacy = TraceContext::parse_b3_multi(|name| headers.get(name).copied()).unwrap();
        assert_eq!(legacy.sampling, Sampling::NotSampled);

        for (name, value) in [
            ("x-b3-traceid", "463ac35c9f6413a"),
            ("x-b3-traceid", "00000000000000000000000000000000"),
            ("x-b3-spanid", "a2fb4a1d1a96d31g"),
            ("x-b3-sampled", "yes"),
            ("x-b3-sampled", "d"),
            ("x-b3-flags", "2"),
        ] {
            let mut broken = headers.clone();
            broken.insert(name, value);
            assert!(
                TraceContext::parse_b3_multi(|n| broken.get(n).copied()).is_err(),
                "{name}: {value} accepted"
            );
        }
        assert_eq!(
            TraceContext::parse_b3_multi(|_| None),
            Err(TraceError::Missing("x-b3-traceid"))
        );
    }

    #[test]
    fn child_keeps_trace_and_points_at_parent() {
        let root = TraceContext::new_root(Sampling::Sampled);
        let span = SpanId::random();
        let child = root.child(span);
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.span_id, span);
        assert_eq!(child.parent_span_id, Some(root.span_id));
        assert_eq!(child.sampling, Sampling::Sampled);
    }

    #[test]
    fn random_ids_are_distinct_and_nonzero() {
        let ids: HashSet<u64> = (0..10_000).map(|_| SpanId::random().get()).collect();
        assert_eq!(ids.len(), 10_000);
        let other_thread = std::thread::spawn(|| TraceId::random().get()).join().unwrap();
        assert_ne!(other_thread, TraceId::random().get());
    }
}

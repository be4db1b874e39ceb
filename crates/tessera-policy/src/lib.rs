//! The merged Mixer's decisions (issue 7): **Check** and **Quota** evaluated inside the sidecar,
//! as pure functions over a request's attributes, named in Istio's vocabulary (`source.ip`,
//! `request.headers[x-user]`, `rpc.service`...).
//!
//! What it owns:
//! - [`attr`]: attribute names ([`Attr`], parsed from config strings with errors that say what
//!   to write) and the [`Attributes`] trait the proxy implements over its borrowed request view.
//! - [`list`]: Mixer's listchecker — allow/deny lists of strings, regexes or IP/CIDR ranges over
//!   any attribute, answering a [`Verdict`] with a reason.
//! - [`rbac`]: RBAC with Envoy's RBAC v3 semantics (ALLOW/DENY/LOG policies of permissions and
//!   principals, shadow rules that are only reported), in the form Istio's AuthorizationPolicy
//!   compiles to, answering an [`RbacDecision`] whose denials say `RBAC: access denied`.
//! - [`opa`]: Rego policies evaluated in process with `regorus`, the attributes as `input`;
//!   errors fail closed unless the check says `fail_open`.
//! - [`quota`]: Mixer's memquota — fixed-window and token-bucket quotas per key of dimension
//!   values, with overrides, exact under concurrency, in bounded memory.
//!
//! What it must not do: no I/O (list files are read and watched by the proxy, which hands the
//! text to [`list::parse_entries`]), no clocks (every time-dependent call takes `now` from the
//! caller), no lock held across calls (a quota locks one shard for the duration of one update),
//! no dependency on `tessera-model` (the proxy translates the model's policy config into these
//! types), no knowledge of HTTP status codes or RPC error frames (the proxy maps a denial to
//! 403 / 429 / PERMISSION_DENIED / native RPC errors).
//!
//! Not here: the Redis quota (it does I/O; the proxy owns it) and Report (`tessera-telemetry`).

use std::borrow::Cow;

pub mod attr;
pub mod ext_authz;
pub mod list;
pub mod opa;
pub mod quota;
pub mod rbac;

pub use attr::{Attr, AttrError, Attributes, MapAttributes};
pub use list::{Entries, ListChecker, ListError, ListKind, parse_entries};
pub use opa::{Opa, OpaError, OpaVerdict};
pub use quota::{Algorithm, Denial, Grant, Override, Quota, QuotaError, QuotaSpec};
pub use rbac::{
    Action, CidrRange, HeaderMatcher, Permission, Policy, Principal, Rbac, RbacDecision, RbacEngine, RbacError,
    RbacFilter, RbacOutcome, StringMatcher,
};

/// A check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// True when the request may proceed.
    pub allowed: bool,
    /// Why: a static phrase when allowed; when denied, the attribute, its value and the check.
    pub reason: Cow<'static, str>,
}

//! Role-based access control with Envoy's RBAC v3 semantics (`envoy.config.rbac.v3.RBAC`), the
//! form Istio's AuthorizationPolicy compiles to.
//!
//! An [`Rbac`] is an action ([`Action::Allow`], [`Action::Deny`] or [`Action::Log`]) and named
//! [`Policy`]s. A policy matches a request when **any** of its [`Permission`]s (what is done:
//! headers, path, method, port, RPC service/method) and **any** of its [`Principal`]s (who does
//! it: authenticated identity, source IP, headers) match. Then, as Envoy:
//! - ALLOW: the request is allowed iff some policy matches;
//! - DENY: the request is denied iff some policy matches;
//! - LOG: the request is always allowed; a match only asks for it to be logged.
//!
//! Policies are tried in lexicographic order of their names (Envoy keeps them in an ordered map),
//! so the policy a decision reports is the first matching one in that order.
//!
//! A missing attribute (no such header, no mTLS principal, no port) matches nothing, so a
//! [`Permission::NotRule`], a [`Principal::NotId`] or an inverted [`HeaderMatcher`] over it does
//! match, as in Envoy.
//!
//! Shadow mode: an [`RbacFilter`] holds the enforced rules and, optionally, shadow rules whose
//! [`RbacDecision`] is only reported (the caller counts `shadow_allowed` / `shadow_denied` with
//! [`RbacDecision::shadow_counter`] and logs [`RbacDecision::matched_policy`]).
//!
//! The config types here are plain data; [`RbacEngine::new`] validates them (as Envoy's proto
//! validation does) and compiles them for matching. Nothing here does I/O.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use regex::Regex;

use crate::Verdict;
use crate::attr::{Attr, Attributes};
use crate::list::{Entries, ListError};

/// What Envoy answers a denied HTTP request with (the body of its 403).
pub const ACCESS_DENIED: &str = "RBAC: access denied";

/// The prefix Istio puts before a principal to make a SPIFFE id.
pub const SPIFFE_PREFIX: &str = "spiffe://";

/// Envoy's `type.matcher.v3.StringMatcher`.
///
/// `ignore_case` folds ASCII case only, as Envoy does. Regexes match the whole value (Envoy's
/// `safe_regex`); [`RbacEngine::new`] anchors the pattern, so `Regex::new("/api/.*")` matches
/// `/api/x` but not `/x/api/y`. Flags set through `RegexBuilder` are not kept; write them inline
/// (`(?i)`).
#[derive(Debug, Clone)]
pub enum StringMatcher {
    /// The whole value equals `value`.
    Exact {
        /// The value.
        value: String,
        /// Compare ignoring ASCII case.
        ignore_case: bool,
    },
    /// The value starts with `value` (which must not be empty, as in Envoy).
    Prefix {
        /// The prefix.
        value: String,
        /// Compare ignoring ASCII case.
        ignore_case: bool,
    },
    /// The value ends with `value` (which must not be empty).
    Suffix {
        /// The suffix.
        value: String,
        /// Compare ignoring ASCII case.
        ignore_case: bool,
    },
    /// The value contains `value` (which must not be empty).
    Contains {
        /// The substring.
        value: String,
        /// Compare ignoring ASCII case.
        ignore_case: bool,
    },
    /// The whole value matches the regex.
    Regex(Regex),
}

impl StringMatcher {
    /// An exact, case-sensitive match.
    pub fn exact(value: impl Into<String>) -> Self {
        StringMatcher::Exact {
            value: value.into(),
            ignore_case: false,
        }
    }

    /// A case-sensitive prefix match.
    pub fn prefix(value: impl Into<String>) -> Self {
        StringMatcher::Prefix {
            value: value.into(),
            ignore_case: false,
        }
    }

    /// A case-sensitive suffix match.
    pub fn suffix(value: impl Into<String>) -> Self {
        StringMatcher::Suffix {
            value: value.into(),
            ignore_case: false,
        }
    }

    /// A case-sensitive substring match.
    pub fn contains(value: impl Into<String>) -> Self {
        StringMatcher::Contains {
            value: value.into(),
            ignore_case: false,
        }
    }

    /// A regex over the whole value.
    pub fn regex(pattern: &str) -> Result<Self, RbacError> {
        Regex::new(pattern)
            .map(StringMatcher::Regex)
            .map_err(|e| RbacError::Regex {
                pattern: pattern.to_owned(),
                message: e.to_string(),
            })
    }

    /// The same matcher ignoring ASCII case (no effect on a regex, as in Envoy: use `(?i)`).
    pub fn ignoring_case(self) -> Self {
        match self {
            StringMatcher::Exact { value, .. } => StringMatcher::Exact {
                value,
                ignore_case: true,
            },
            StringMatcher::Prefix { value, .. } => StringMatcher::Prefix {
                value,
                ignore_case: true,
            },
            StringMatcher::Suffix { value, .. } => StringMatcher::Suffix {
                value,
                ignore_case: true,
            },
            StringMatcher::Contains { value, .. } => StringMatcher::Contains {
                value,
                ignore_case: true,
            },
            StringMatcher::Regex(r) => StringMatcher::Regex(r),
        }
    }

    /// What Istio compiles an AuthorizationPolicy value to (`paths`, `hosts`, header values...):
    /// `*` is any non-empty value, `x*` a prefix, `*x` a suffix, anything else exact.
    pub fn istio(value: &str) -> Self {
        Self::istio_with_prefix(value, "")
    }

    /// What Istio compiles a `principals` entry to: a match on the SPIFFE id, so
    /// `cluster.local/ns/x/sa/y` is exactly `spiffe://cluster.local/ns/x/sa/y`, `cluster.local/ns/x/*`
    /// the prefix `spiffe://cluster.local/ns/x/`, `*/sa/y` any SPIFFE id ending in `/sa/y`, and
    /// `*` any non-empty principal.
    pub fn istio_principal(value: &str) -> Self {
        Self::istio_with_prefix(value, SPIFFE_PREFIX)
    }

    /// Istio's `StringMatcherWithPrefix`: `prefix` is put before the value, except for `*`.
    fn istio_with_prefix(value: &str, prefix: &str) -> Self {
        if value == "*" {
            return StringMatcher::Regex(Regex::new(".+").expect("constant regex"));
        }
        if let Some(suffix) = value.strip_prefix('*') {
            if prefix.is_empty() {
                return StringMatcher::suffix(suffix);
            }
            // Istio writes `prefix.*suffix` unescaped; escaping keeps `.` in the suffix literal.
            let pattern = format!("{}.*{}", regex::escape(prefix), regex::escape(suffix));
            return StringMatcher::Regex(Regex::new(&pattern).expect("escaped regex"));
        }
        if let Some(start) = value.strip_suffix('*') {
            return StringMatcher::prefix(format!("{prefix}{start}"));
        }
        StringMatcher::exact(format!("{prefix}{value}"))
    }
}

/// Envoy's `config.route.v3.HeaderMatcher` (the subset RBAC uses), over
/// `request.headers[name]`.
///
/// The pseudo-headers Istio uses read the matching attribute: `:authority` and `host` read
/// `request.host`, `:method` `request.method`, `:path` `request.path` (query included, as in
/// Envoy), `:scheme` `request.scheme`.
#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    /// The header name, lower-case (it is lower-cased when compiled).
    pub name: String,
    /// How the value must match; `None`: the header is present, whatever its value.
    pub matcher: Option<StringMatcher>,
    /// Inverts the result; a missing header then matches.
    pub invert: bool,
}

impl HeaderMatcher {
    /// Header `name` matching `matcher`.
    pub fn new(name: impl Into<String>, matcher: StringMatcher) -> Self {
        HeaderMatcher {
            name: name.into(),
            matcher: Some(matcher),
            invert: false,
        }
    }

    /// Header `name` present.
    pub fn present(name: impl Into<String>) -> Self {
        HeaderMatcher {
            name: name.into(),
            matcher: None,
            invert: false,
        }
    }

    /// The same matcher, inverted.
    pub fn inverted(self) -> Self {
        HeaderMatcher {
            invert: !self.invert,
            ..self
        }
    }
}

/// An IP address or CIDR range (`10.0.0.0/8`, `2001:db8::/32`, `10.1.2.3`), as Istio writes
/// `ipBlocks`. Host bits after the prefix are ignored, as Envoy's `CidrRange` does; an
/// IPv4-mapped IPv6 address (`::ffff:10.1.2.3`) is inside IPv4 ranges, as in list checks.
#[derive(Debug, Clone)]
pub struct CidrRange {
    text: Box<str>,
    range: Entries,
}

impl CidrRange {
    /// Parses `text`; the errors are the list checker's, naming the entry.
    pub fn parse(text: &str) -> Result<Self, RbacError> {
        Ok(CidrRange {
            text: text.into(),
            range: Entries::ips([text])?,
        })
    }

    /// True when `ip` is an IP address inside the range (anything else is outside).
    pub fn contains(&self, ip: &str) -> bool {
        self.range.contains(ip)
    }
}

impl FromStr for CidrRange {
    type Err = RbacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CidrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Envoy's `config.rbac.v3.Permission` (a subset, plus RPC service and method): what a request
/// does.
#[derive(Debug, Clone)]
pub enum Permission {
    /// Every request.
    Any,
    /// Every rule matches (at least one rule).
    AndRules(Vec<Permission>),
    /// Some rule matches (at least one rule).
    OrRules(Vec<Permission>),
    /// The rule does not match.
    NotRule(Box<Permission>),
    /// A request header.
    Header(HeaderMatcher),
    /// `request.path` without its query and fragment.
    UrlPath(StringMatcher),
    /// `request.method`, exactly (Istio's `methods`).
    Method(String),
    /// `destination.port`.
    DestinationPort(u16),
    /// `destination.port` in `[start, end)`: end excluded, as Envoy's `Int32Range`.
    DestinationPortRange(u16, u16),
    /// `rpc.service`.
    RpcService(StringMatcher),
    /// `rpc.method`.
    RpcMethod(StringMatcher),
}

/// Envoy's `config.rbac.v3.Principal` (a subset): who makes a request.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Every request.
    Any,
    /// Every id matches (at least one id).
    AndIds(Vec<Principal>),
    /// Some id matches (at least one id).
    OrIds(Vec<Principal>),
    /// The id does not match.
    NotId(Box<Principal>),
    /// `source.principal` (the peer's mTLS identity) matches; no principal matches nothing.
    Authenticated(StringMatcher),
    /// `source.ip` is in the range.
    SourceIp(CidrRange),
    /// `source.ip` is in the range (Envoy's remote IP; the same attribute here).
    RemoteIp(CidrRange),
    /// A request header.
    Header(HeaderMatcher),
}

impl Principal {
    /// What Istio compiles a `principals` entry to (see [`StringMatcher::istio_principal`]).
    pub fn istio(principal: &str) -> Self {
        Principal::Authenticated(StringMatcher::istio_principal(principal))
    }
}

/// Envoy's `config.rbac.v3.Policy`: matches when any permission and any principal match.
#[derive(Debug, Clone)]
pub struct Policy {
    /// What is done (at least one).
    pub permissions: Vec<Permission>,
    /// Who does it (at least one).
    pub principals: Vec<Principal>,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allowed iff some policy matches.
    Allow,
    /// Denied iff some policy matches.
    Deny,
    /// Always allowed; a match asks for the request to be logged.
    Log,
}

impl Action {
    /// `ALLOW`, `DENY` or `LOG`, as Envoy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Log => "LOG",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Envoy's `config.rbac.v3.RBAC`: an action and named policies.
#[derive(Debug, Clone)]
pub struct Rbac {
    /// What a matching policy does.
    pub action: Action,
    /// Policies by name; names are unique.
    pub policies: Vec<(String, Policy)>,
}

/// Why RBAC rules were rejected. Errors found while compiling a policy name it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbacError {
    /// Two policies have the same name.
    #[error("RBAC policy `{0}` is defined twice; policy names must be unique")]
    DuplicatePolicy(String),
    /// A policy has no permissions.
    #[error("RBAC policy `{0}` has no permissions; give at least one (Any for every request)")]
    NoPermissions(String),
    /// A policy has no principals.
    #[error("RBAC policy `{0}` has no principals; give at least one (Any for everyone)")]
    NoPrincipals(String),
    /// An And/Or combinator has nothing to combine.
    #[error("RBAC policy `{policy}`: {combinator} needs at least one rule")]
    EmptySet {
        /// The policy.
        policy: String,
        /// `and_rules`, `or_rules`, `and_ids` or `or_ids`.
        combinator: &'static str,
    },
    /// A prefix, suffix or substring is empty (Envoy rejects them).
    #[error("RBAC policy `{policy}`: an empty {kind} match is not allowed; use the regex `.*` to match anything")]
    EmptyPattern {
        /// The policy.
        policy: String,
        /// `prefix`, `suffix` or `contains`.
        kind: &'static str,
    },
    /// A header matcher has no name.
    #[error("RBAC policy `{0}`: a header matcher has an empty header name")]
    EmptyHeaderName(String),
    /// A port range is empty.
    #[error(
        "RBAC policy `{policy}`: destination port range [{start}, {end}) is empty; the end is excluded, so it must be greater than the start"
    )]
    PortRange {
        /// The policy.
        policy: String,
        /// First port.
        start: u16,
        /// First port after the range.
        end: u16,
    },
    /// A regex does not compile (or not once anchored).
    #[error("RBAC: `{pattern}` is not a valid regular expression: {message}")]
    Regex {
        /// The pattern as written.
        pattern: String,
        /// What the regex parser said.
        message: String,
    },
    /// An IP range does not parse.
    #[error("RBAC: {0}")]
    Cidr(#[from] ListError),
}

/// What an engine decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbacDecision {
    /// True when the engine lets the request through (always, for LOG).
    pub allowed: bool,
    /// The first matching policy in name order (Envoy's `effective_policy_id`); `None` when no
    /// policy matched.
    pub matched_policy: Option<Arc<str>>,
    /// Why. Denials start with [`ACCESS_DENIED`] and name the matched policy (DENY) or say that
    /// no policy matched (ALLOW); allowed requests get a static phrase.
    pub reason: Cow<'static, str>,
    /// The engine's action.
    pub action: Action,
    /// Envoy's `access_log_hint`: a LOG engine matched, so the request should be logged.
    pub log: bool,
}

impl RbacDecision {
    /// `allowed` or `denied`: Envoy's `shadow_engine_result` metadata value.
    pub fn engine_result(&self) -> &'static str {
        if self.allowed { "allowed" } else { "denied" }
    }

    /// The counter to bump for an enforced engine: `allowed` or `denied`.
    pub fn counter(&self) -> &'static str {
        self.engine_result()
    }

    /// The counter to bump for a shadow engine: `shadow_allowed` or `shadow_denied`.
    pub fn shadow_counter(&self) -> &'static str {
        if self.allowed {
            "shadow_allowed"
        } else {
            "shadow_denied"
        }
    }

    /// Envoy's response code details for a denial: `rbac_access_denied_matched_policy[name]`,
    /// or `[none]` when no policy matched.
    pub fn response_code_details(&self) -> String {
        format!(
            "rbac_access_denied_matched_policy[{}]",
            self.matched_policy.as_deref().unwrap_or("none")
        )
    }

    /// The decision as a check's verdict (to chain with list checks).
    pub fn verdict(&self) -> Verdict {
        Verdict {
            allowed: self.allowed,
            reason: self.reason.clone(),
        }
    }
}

/// Compiled RBAC rules: evaluates requests, immutable, shareable across threads.
#[derive(Debug, Clone)]
pub struct RbacEngine {
    action: Action,
    /// Sorted by name.
    policies: Vec<(Arc<str>, CompiledPolicy)>,
}

impl RbacEngine {
    /// Validates and compiles `rbac`, as Envoy's config validation would: policy names unique,
    /// at least one permission and one principal per policy, at least one rule per And/Or, no
    /// empty prefix/suffix/contains, no empty header name, no empty port range.
    pub fn new(rbac: Rbac) -> Result<Self, RbacError> {
        let mut seen = HashSet::new();
        let mut policies: Vec<(Arc<str>, CompiledPolicy)> = Vec::with_capacity(rbac.policies.len());
        for (name, policy) in &rbac.policies {
            if !seen.insert(name.as_str()) {
                return Err(RbacError::DuplicatePolicy(name.clone()));
            }
            policies.push((name.as_str().into(), CompiledPolicy::compile(name, policy)?));
        }
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(RbacEngine {
            action: rbac.action,
            policies,
        })
    }

    /// The engine's action.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The policy names, in the order they are tried (lexicographic).
    pub fn policy_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.policies.iter().map(|(name, _)| &**name)
    }

    /// The first policy, in name order, that matches the request.
    pub fn matching_policy(&self, attrs: &dyn Attributes) -> Option<&Arc<str>> {
        self.policies
            .iter()
            .find(|(_, policy)| policy.matches(attrs))
            .map(|(name, _)| name)
    }

    /// Decides for one request. Allocates only to name a denying policy in the reason.
    pub fn evaluate(&self, attrs: &dyn Attributes) -> RbacDecision {
        let matched = self.matching_policy(attrs).cloned();
        let (allowed, reason): (bool, Cow<'static, str>) = match (self.action, &matched) {
            (Action::Allow, Some(_)) => (true, "RBAC: allowed by a matching policy".into()),
            (Action::Allow, None) => (false, "RBAC: access denied, no policy matched".into()),
            (Action::Deny, Some(name)) => (false, format!("{ACCESS_DENIED}, matched policy `{name}`").into()),
            (Action::Deny, None) => (true, "RBAC: allowed, no deny policy matched".into()),
            (Action::Log, Some(_)) => (true, "RBAC: allowed, log policy matched".into()),
            (Action::Log, None) => (true, "RBAC: allowed, no log policy matched".into()),
        };
        RbacDecision {
            allowed,
            log: self.action == Action::Log && matched.is_some(),
            matched_policy: matched,
            reason,
            action: self.action,
        }
    }
}

/// Envoy's RBAC filter: enforced rules and shadow rules, each optional.
#[derive(Debug, Clone, Default)]
pub struct RbacFilter {
    /// The rules that decide; `None`: every request is allowed.
    pub rules: Option<RbacEngine>,
    /// Rules only evaluated and reported, never enforced.
    pub shadow_rules: Option<RbacEngine>,
}

/// Both engines' decisions for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbacOutcome {
    /// The enforced decision, when there are rules.
    pub enforced: Option<RbacDecision>,
    /// The shadow decision, when there are shadow rules: report it, never enforce it.
    pub shadow: Option<RbacDecision>,
}

impl RbacFilter {
    /// Evaluates the shadow rules, then the enforced ones (Envoy's order).
    pub fn check(&self, attrs: &dyn Attributes) -> RbacOutcome {
        let shadow = self.shadow_rules.as_ref().map(|e| e.evaluate(attrs));
        let enforced = self.rules.as_ref().map(|e| e.evaluate(attrs));
        RbacOutcome { enforced, shadow }
    }
}

impl RbacOutcome {
    /// True when the request may proceed: the shadow decision never counts.
    pub fn allowed(&self) -> bool {
        self.enforced.as_ref().is_none_or(|d| d.allowed)
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled forms.

#[derive(Debug, Clone)]
struct CompiledPolicy {
    permissions: Vec<Perm>,
    principals: Vec<Princ>,
}

impl CompiledPolicy {
    fn compile(name: &str, policy: &Policy) -> Result<Self, RbacError> {
        if policy.permissions.is_empty() {
            return Err(RbacError::NoPermissions(name.to_owned()));
        }
        if policy.principals.is_empty() {
            return Err(RbacError::NoPrincipals(name.to_owned()));
        }
        Ok(CompiledPolicy {
            permissions: policy
                .permissions
                .iter()
                .map(|p| Perm::compile(name, p))
                .collect::<Result<_, _>>()?,
            principals: policy
                .principals
                .iter()
                .map(|p| Princ::compile(name, p))
                .collect::<Result<_, _>>()?,
        })
    }

    fn matches(&self, attrs: &dyn Attributes) -> bool {
        self.permissions.iter().any(|p| p.matches(attrs)) && self.principals.iter().any(|p| p.matches(attrs))
    }
}

#[derive(Debug, Clone)]
enum Str {
    /// Lower-case when `ignore_case`.
    Exact(Box<str>, bool),
    Prefix(Box<str>, bool),
    Suffix(Box<str>, bool),
    Contains(Box<str>, bool),
    /// Anchored.
    Regex(Regex),
}

impl Str {
    fn compile(policy: &str, m: &StringMatcher) -> Result<Self, RbacError> {
        let folded = |value: &str, ignore_case: bool| -> Box<str> {
            if ignore_case {
                value.to_ascii_lowercase().into()
            } else {
                value.into()
            }
        };
        let non_empty = |value: &str, kind: &'static str| {
            if value.is_empty() {
                Err(RbacError::EmptyPattern {
                    policy: policy.to_owned(),
                    kind,
                })
            } else {
                Ok(())
            }
        };
        Ok(match m {
            StringMatcher::Exact { value, ignore_case } => Str::Exact(folded(value, *ignore_case), *ignore_case),
            StringMatcher::Prefix { value, ignore_case } => {
                non_empty(value, "prefix")?;
                Str::Prefix(folded(value, *ignore_case), *ignore_case)
            }
            StringMatcher::Suffix { value, ignore_case } => {
                non_empty(value, "suffix")?;
                Str::Suffix(folded(value, *ignore_case), *ignore_case)
            }
            StringMatcher::Contains { value, ignore_case } => {
                non_empty(value, "contains")?;
                Str::Contains(folded(value, *ignore_case), *ignore_case)
            }
            StringMatcher::Regex(r) => {
                let anchored = format!("^(?:{})$", r.as_str());
                Str::Regex(Regex::new(&anchored).map_err(|e| RbacError::Regex {
                    pattern: r.as_str().to_owned(),
                    message: e.to_string(),
                })?)
            }
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(p, false) => v == &**p,
            Str::Exact(p, true) => v.eq_ignore_ascii_case(p),
            Str::Prefix(p, false) => v.starts_with(&**p),
            Str::Prefix(p, true) => v.len() >= p.len() && v.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes()),
            Str::Suffix(p, false) => v.ends_with(&**p),
            Str::Suffix(p, true) => {
                v.len() >= p.len() && v.as_bytes()[v.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
            }
            Str::Contains(p, false) => v.contains(&**p),
            Str::Contains(p, true) => {
                if v.bytes().any(|b| b.is_ascii_uppercase()) {
                    v.to_ascii_lowercase().contains(&**p)
                } else {
                    v.contains(&**p)
                }
            }
            Str::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
struct Header {
    attr: Attr,
    matcher: Option<Str>,
    invert: bool,
}

impl Header {
    fn compile(policy: &str, h: &HeaderMatcher) -> Result<Self, RbacError> {
        if h.name.is_empty() {
            return Err(RbacError::EmptyHeaderName(policy.to_owned()));
        }
        let name = h.name.to_ascii_lowercase();
        let attr = match name.as_str() {
            ":authority" | "host" => Attr::RequestHost,
            ":method" => Attr::RequestMethod,
            ":path" => Attr::RequestPath,
            ":scheme" => Attr::RequestScheme,
            _ => Attr::RequestHeader(name),
        };
        Ok(Header {
            attr,
            matcher: h.matcher.as_ref().map(|m| Str::compile(policy, m)).transpose()?,
            invert: h.invert,
        })
    }

    /// Envoy's `HeaderUtility::matchHeaders`: a missing header is `invert`.
    fn matches(&self, attrs: &dyn Attributes) -> bool {
        match attrs.get(&self.attr) {
            None => self.invert,
            Some(v) => self.matcher.as_ref().is_none_or(|m| m.matches(&v)) != self.invert,
        }
    }
}

#[derive(Debug, Clone)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(Header),
    UrlPath(Str),
    Method(Box<str>),
    /// Inclusive.
    Ports(u16, u16),
    RpcService(Str),
    RpcMethod(Str),
}

impl Perm {
    fn compile(policy: &str, p: &Permission) -> Result<Self, RbacError> {
        let set = |rules: &[Permission], combinator| {
            if rules.is_empty() {
                return Err(RbacError::EmptySet {
                    policy: policy.to_owned(),
                    combinator,
                });
            }
            rules.iter().map(|r| Perm::compile(policy, r)).collect()
        };
        Ok(match p {
            Permission::Any => Perm::Any,
            Permission::AndRules(rules) => Perm::And(set(rules, "and_rules")?),
            Permission::OrRules(rules) => Perm::Or(set(rules, "or_rules")?),
            Permission::NotRule(rule) => Perm::Not(Box::new(Perm::compile(policy, rule)?)),
            Permission::Header(h) => Perm::Header(Header::compile(policy, h)?),
            Permission::UrlPath(m) => Perm::UrlPath(Str::compile(policy, m)?),
            Permission::Method(m) => Perm::Method(m.as_str().into()),
            Permission::DestinationPort(port) => Perm::Ports(*port, *port),
            &Permission::DestinationPortRange(start, end) => {
                if start >= end {
                    return Err(RbacError::PortRange {
                        policy: policy.to_owned(),
                        start,
                        end,
                    });
                }
                Perm::Ports(start, end - 1)
            }
            Permission::RpcService(m) => Perm::RpcService(Str::compile(policy, m)?),
            Permission::RpcMethod(m) => Perm::RpcMethod(Str::compile(policy, m)?),
        })
    }

    fn matches(&self, attrs: &dyn Attributes) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(rules) => rules.iter().all(|r| r.matches(attrs)),
            Perm::Or(rules) => rules.iter().any(|r| r.matches(attrs)),
            Perm::Not(rule) => !rule.matches(attrs),
            Perm::Header(h) => h.matches(attrs),
            Perm::UrlPath(m) => attrs.get(&Attr::RequestPath).is_some_and(|path| {
                let end = path.find(['?', '#']).unwrap_or(path.len());
                m.matches(&path[..end])
            }),
            Perm::Method(method) => attrs.get(&Attr::RequestMethod).is_some_and(|m| *m == **method),
            Perm::Ports(start, end) => attrs
                .get(&Attr::DestinationPort)
                .and_then(|p| p.parse::<u16>().ok())
                .is_some_and(|p| (*start..=*end).contains(&p)),
            Perm::RpcService(m) => attrs.get(&Attr::RpcService).is_some_and(|v| m.matches(&v)),
            Perm::RpcMethod(m) => attrs.get(&Attr::RpcMethod).is_some_and(|v| m.matches(&v)),
        }
    }
}

#[derive(Debug, Clone)]
enum Princ {
    Any,
    And(Vec<Princ>),
    Or(Vec<Princ>),
    Not(Box<Princ>),
    Authenticated(Str),
    Ip(CidrRange),
    Header(Header),
}

impl Princ {
    fn compile(policy: &str, p: &Principal) -> Result<Self, RbacError> {
        let set = |ids: &[Principal], combinator| {
            if ids.is_empty() {
                return Err(RbacError::EmptySet {
                    policy: policy.to_owned(),
                    combinator,
                });
            }
            ids.iter().map(|r| Princ::compile(policy, r)).collect()
        };
        Ok(match p {
            Principal::Any => Princ::Any,
            Principal::AndIds(ids) => Princ::And(set(ids, "and_ids")?),
            Principal::OrIds(ids) => Princ::Or(set(ids, "or_ids")?),
            Principal::NotId(id) => Princ::Not(Box::new(Princ::compile(policy, id)?)),
            Principal::Authenticated(m) => Princ::Authenticated(Str::compile(policy, m)?),
            Principal::SourceIp(range) | Principal::RemoteIp(range) => Princ::Ip(range.clone()),
            Principal::Header(h) => Princ::Header(Header::compile(policy, h)?),
        })
    }

    fn matches(&self, attrs: &dyn Attributes) -> bool {
        match self {
            Princ::Any => true,
            Princ::And(ids) => ids.iter().all(|r| r.matches(attrs)),
            Princ::Or(ids) => ids.iter().any(|r| r.matches(attrs)),
            Princ::Not(id) => !id.matches(attrs),
            Princ::Authenticated(m) => attrs.get(&Attr::SourcePrincipal).is_some_and(|v| m.matches(&v)),
            Princ::Ip(range) => attrs.get(&Attr::SourceIp).is_some_and(|ip| range.contains(&ip)),
            Princ::Header(h) => h.matches(attrs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::MapAttributes;

    fn header(name: &str) -> Attr {
        Attr::RequestHeader(name.into())
    }

    /// An engine of one policy `p` with `permission` and `principal`.
    fn engine(action: Action, permission: Permission, principal: Principal) -> RbacEngine {
        RbacEngine::new(Rbac {
            action,
            policies: vec![(
                "p".into(),
                Policy {
                    permissions: vec![permission],
                    principals: vec![principal],
                },
            )],
        })
        .unwrap()
    }

    fn permits(permission: Permission, attrs: &MapAttributes) -> bool {
        engine(Action::Allow, permission, Principal::Any)
            .evaluate(attrs)
            .allowed
    }

    fn identifies(principal: Principal, attrs: &MapAttributes) -> bool {
        engine(Action::Allow, Permission::Any, principal)
            .evaluate(attrs)
            .allowed
    }

    fn re(p: &str) -> StringMatcher {
        StringMatcher::regex(p).unwrap()
    }

    #[test]
    fn string_matchers() {
        // (matcher, value, matches)
        let table: Vec<(StringMatcher, &str, bool)> = vec![
            (StringMatcher::exact("/info"), "/info", true),
            (StringMatcher::exact("/info"), "/Info", false),
            (StringMatcher::exact("/info").ignoring_case(), "/INFO", true),
            (StringMatcher::exact(""), "", true),
            (StringMatcher::exact(""), "x", false),
            (StringMatcher::prefix("/api/"), "/api/v1", true),
            (StringMatcher::prefix("/api/"), "/api", false),
            (StringMatcher::prefix("/api/"), "/API/v1", false),
            (StringMatcher::prefix("/api/").ignoring_case(), "/API/v1", true),
            (StringMatcher::prefix("é").ignoring_case(), "É", false),
            (StringMatcher::suffix(".local"), "svc.cluster.local", true),
            (StringMatcher::suffix(".local"), "local", false),
            (
                StringMatcher::suffix(".LOCAL").ignoring_case(),
                "svc.cluster.local",
                true,
            ),
            (StringMatcher::contains("admin"), "super-admin-1", true),
            (StringMatcher::contains("admin"), "ADMIN", false),
            (StringMatcher::contains("admin").ignoring_case(), "SUPER-ADMIN", true),
            (re("/api/v[0-9]+/.*"), "/api/v2/users", true),
            (re("/api/v[0-9]+/.*"), "/x/api/v2/users", false),
            (re("a|b"), "ab", false),
            (re("a|b"), "b", true),
            (re("(?i)get"), "GET", true),
            (re("get").ignoring_case(), "GET", false),
        ];
        for (m, value, want) in table {
            let compiled = Str::compile("p", &m).unwrap();
            assert_eq!(compiled.matches(value), want, "{m:?} {value:?}");
        }
    }

    #[test]
    fn permissions() {
        let get_info = MapAttributes::new()
            .with(Attr::RequestMethod, "GET")
            .with(Attr::RequestPath, "/info/a?x=/admin#frag")
            .with(Attr::DestinationPort, "8080")
            .with(header("x-user"), "ann")
            .with(Attr::RequestHost, "shop.example.com")
            .with(Attr::RpcService, "com.acme.Orders")
            .with(Attr::RpcMethod, "place");
        let table: Vec<(Permission, bool)> = vec![
            (Permission::Any, true),
            (Permission::Method("GET".into()), true),
            (Permission::Method("get".into()), false),
            (Permission::Method("POST".into()), false),
            (Permission::UrlPath(StringMatcher::prefix("/info")), true),
            (Permission::UrlPath(StringMatcher::exact("/info/a")), true),
            (Permission::UrlPath(StringMatcher::contains("admin")), false),
            (Permission::UrlPath(StringMatcher::suffix("frag")), false),
            (Permission::DestinationPort(8080), true),
            (Permission::DestinationPort(80), false),
            (Permission::DestinationPortRange(8000, 8081), true),
            (Permission::DestinationPortRange(8000, 8080), false),
            (Permission::DestinationPortRange(8080, 8081), true),
            (
                Permission::Header(HeaderMatcher::new("x-user", StringMatcher::exact("ann"))),
                true,
            ),
            (
                Permission::Header(HeaderMatcher::new("X-User", StringMatcher::exact("ann"))),
                true,
            ),
            (
                Permission::Header(HeaderMatcher::new("x-user", StringMatcher::exact("bob"))),
                false,
            ),
            (Permission::Header(HeaderMatcher::present("x-user")), true),
            (Permission::Header(HeaderMatcher::present("x-user").inverted()), false),
            (
                Permission::Header(HeaderMatcher::new("x-user", StringMatcher::exact("bob")).inverted()),
                true,
            ),
            (
                Permission::Header(HeaderMatcher::new(":authority", StringMatcher::suffix(".example.com"))),
                true,
            ),
            (
                Permission::Header(HeaderMatcher::new(":method", StringMatcher::exact("GET"))),
                true,
            ),
            (
                Permission::Header(HeaderMatcher::new(":path", StringMatcher::suffix("#frag"))),
                true,
            ),
            (Permission::RpcService(StringMatcher::prefix("com.acme.")), true),
            (Permission::RpcService(StringMatcher::exact("com.acme.Users")), false),
            (Permission::RpcMethod(StringMatcher::exact("place")), true),
            (Permission::RpcMethod(StringMatcher::exact("cancel")), false),
        ];
        for (p, want) in table {
            assert_eq!(permits(p.clone(), &get_info), want, "{p:?}");
        }
    }

    #[test]
    fn combinators() {
        let attrs = MapAttributes::new()
            .with(Attr::RequestMethod, "GET")
            .with(Attr::RequestPath, "/info");
        let get = || Permission::Method("GET".into());
        let post = || Permission::Method("POST".into());
        let table: Vec<(Permission, bool)> = vec![
            (Permission::AndRules(vec![get(), Permission::Any]), true),
            (Permission::AndRules(vec![get(), post()]), false),
            (Permission::OrRules(vec![post(), get()]), true),
            (Permission::OrRules(vec![post(), post()]), false),
            (Permission::NotRule(Box::new(post())), true),
            (Permission::NotRule(Box::new(get())), false),
            (
                Permission::AndRules(vec![
                    Permission::OrRules(vec![post(), get()]),
                    Permission::NotRule(Box::new(Permission::UrlPath(StringMatcher::prefix("/admin")))),
                ]),
                true,
            ),
        ];
        for (p, want) in table {
            assert_eq!(permits(p.clone(), &attrs), want, "{p:?}");
        }
        let sleep = MapAttributes::new().with(Attr::SourcePrincipal, "spiffe://cluster.local/ns/default/sa/sleep");
        let is_sleep = || Principal::istio("cluster.local/ns/default/sa/sleep");
        let any_default = || Principal::istio("cluster.local/ns/default/*");
        let ids: Vec<(Principal, bool)> = vec![
            (Principal::AndIds(vec![is_sleep(), any_default()]), true),
            (
                Principal::AndIds(vec![is_sleep(), Principal::NotId(Box::new(any_default()))]),
                false,
            ),
            (
                Principal::OrIds(vec![Principal::NotId(Box::new(is_sleep())), any_default()]),
                true,
            ),
            (
                Principal::OrIds(vec![Principal::NotId(Box::new(Principal::Any))]),
                false,
            ),
            (Principal::NotId(Box::new(Principal::NotId(Box::new(is_sleep())))), true),
        ];
        for (p, want) in ids {
            assert_eq!(identifies(p.clone(), &sleep), want, "{p:?}");
        }
    }

    #[test]
    fn principals() {
        let cidr = |s: &str| CidrRange::parse(s).unwrap();
        let v4 = MapAttributes::new()
            .with(Attr::SourceIp, "10.1.2.3")
            .with(Attr::SourcePrincipal, "spiffe://cluster.local/ns/default/sa/sleep")
            .with(header("x-team"), "Payments");
        let v6 = MapAttributes::new().with(Attr::SourceIp, "2001:db8:1::7");
        let mapped = MapAttributes::new().with(Attr::SourceIp, "::ffff:10.9.9.9");
        let garbage = MapAttributes::new().with(Attr::SourceIp, "somewhere");
        let table: Vec<(Principal, &MapAttributes, bool)> = vec![
            (Principal::Any, &v4, true),
            (Principal::SourceIp(cidr("10.0.0.0/8")), &v4, true),
            (Principal::SourceIp(cidr("10.1.2.3")), &v4, true),
            (Principal::SourceIp(cidr("10.1.2.4/32")), &v4, false),
            (Principal::RemoteIp(cidr("10.1.0.0/16")), &v4, true),
            (Principal::RemoteIp(cidr("192.168.0.0/16")), &v4, false),
            (Principal::SourceIp(cidr("10.0.0.0/8")), &v6, false),
            (Principal::SourceIp(cidr("2001:db8::/32")), &v6, true),
            (Principal::SourceIp(cidr("2001:db8:2::/48")), &v6, false),
            (Principal::RemoteIp(cidr("::/0")), &v6, true),
            (Principal::SourceIp(cidr("::/0")), &v4, false),
            (Principal::SourceIp(cidr("10.0.0.0/8")), &mapped, true),
            (Principal::SourceIp(cidr("0.0.0.0/0")), &garbage, false),
            (
                Principal::Authenticated(StringMatcher::exact("spiffe://cluster.local/ns/default/sa/sleep")),
                &v4,
                true,
            ),
            (Principal::istio("cluster.local/ns/default/sa/sleep"), &v4, true),
            (Principal::istio("cluster.local/ns/prod/sa/sleep"), &v4, false),
            (Principal::istio("*/sa/sleep"), &v4, true),
            (Principal::istio("*"), &v4, true),
            (Principal::istio("*"), &v6, false),
            (
                Principal::Header(HeaderMatcher::new(
                    "x-team",
                    StringMatcher::exact("payments").ignoring_case(),
                )),
                &v4,
                true,
            ),
            (Principal::Header(HeaderMatcher::present("x-team")), &v6, false),
        ];
        for (p, attrs, want) in table {
            assert_eq!(identifies(p.clone(), attrs), want, "{p:?} {attrs:?}");
        }
    }

    #[test]
    fn istio_translation_of_values() {
        let show = |m: StringMatcher| match m {
            StringMatcher::Exact { value, .. } => format!("exact {value}"),
            StringMatcher::Prefix { value, .. } => format!("prefix {value}"),
            StringMatcher::Suffix { value, .. } => format!("suffix {value}"),
            StringMatcher::Contains { value, .. } => format!("contains {value}"),
            StringMatcher::Regex(r) => format!("regex {}", r.as_str()),
        };
        let table = [
            (StringMatcher::istio("/info*"), "prefix /info"),
            (StringMatcher::istio("*.local"), "suffix .local"),
            (StringMatcher::istio("/info"), "exact /info"),
            (StringMatcher::istio("*"), "regex .+"),
            (
                StringMatcher::istio_principal("cluster.local/ns/x/sa/y"),
                "exact spiffe://cluster.local/ns/x/sa/y",
            ),
            (
                StringMatcher::istio_principal("cluster.local/ns/x/*"),
                "prefix spiffe://cluster.local/ns/x/",
            ),
            (StringMatcher::istio_principal("*/sa/y"), "regex spiffe://.*/sa/y"),
            (StringMatcher::istio_principal("*"), "regex .+"),
        ];
        for (m, want) in table {
            assert_eq!(show(m), want);
        }
        // The suffix after `*` is literal: `.` does not match any character.
        let m = Str::compile("p", &StringMatcher::istio_principal("*.sa")).unwrap();
        assert!(m.matches("spiffe://x.sa"));
        assert!(!m.matches("spiffe://xxsa"));
    }

    #[test]
    fn missing_attributes_match_nothing_but_negations_match() {
        let nothing = MapAttributes::new();
        let perms: Vec<(Permission, bool)> = vec![
            (Permission::Any, true),
            (Permission::Method("GET".into()), false),
            (Permission::UrlPath(StringMatcher::istio("*")), false),
            (Permission::DestinationPort(80), false),
            (Permission::DestinationPortRange(0, 65535), false),
            (Permission::RpcService(StringMatcher::istio("*")), false),
            (Permission::RpcMethod(StringMatcher::istio("*")), false),
            (Permission::Header(HeaderMatcher::present("x-user")), false),
            (Permission::Header(HeaderMatcher::present("x-user").inverted()), true),
            (
                Permission::Header(HeaderMatcher::new("x-user", StringMatcher::exact("blocked")).inverted()),
                true,
            ),
            (Permission::NotRule(Box::new(Permission::Method("GET".into()))), true),
        ];
        for (p, want) in perms {
            assert_eq!(permits(p.clone(), &nothing), want, "{p:?}");
        }
        let ids: Vec<(Principal, bool)> = vec![
            (Principal::istio("*"), false),
            (Principal::SourceIp(CidrRange::parse("0.0.0.0/0").unwrap()), false),
            (Principal::Header(HeaderMatcher::present("x-user")), false),
            (Principal::NotId(Box::new(Principal::istio("*"))), true),
        ];
        for (p, want) in ids {
            assert_eq!(identifies(p.clone(), &nothing), want, "{p:?}");
        }
        // An unparsable port is no port.
        let odd = MapAttributes::new().with(Attr::DestinationPort, "http");
        assert!(!permits(Permission::DestinationPortRange(0, 65535), &odd));
    }

    #[test]
    fn actions() {
        let blocked = MapAttributes::new().with(header("x-user"), "blocked");
        let ann = MapAttributes::new().with(header("x-user"), "ann");
        let is_blocked = || Permission::Header(HeaderMatcher::new("x-user", StringMatcher::exact("blocked")));
        // (action, attrs, allowed, matched, log, reason)
        type Row<'a> = (Action, &'a MapAttributes, bool, bool, bool, &'a str);
        let table: [Row<'_>; 6] = [
            (
                Action::Allow,
                &blocked,
                true,
                true,
                false,
                "RBAC: allowed by a matching policy",
            ),
            (
                Action::Allow,
                &ann,
                false,
                false,
                false,
                "RBAC: access denied, no policy matched",
            ),
            (
                Action::Deny,
                &blocked,
                false,
                true,
                false,
                "RBAC: access denied, matched policy `p`",
            ),
            (
                Action::Deny,
                &ann,
                true,
                false,
                false,
                "RBAC: allowed, no deny policy matched",
            ),
            (
                Action::Log,
                &blocked,
                true,
                true,
                true,
                "RBAC: allowed, log policy matched",
            ),
            (
                Action::Log,
                &ann,
                true,
                false,
                false,
                "RBAC: allowed, no log policy matched",
            ),
        ];
        for (action, attrs, allowed, matched, log, reason) in table {
            let d = engine(action, is_blocked(), Principal::Any).evaluate(attrs);
            assert_eq!(
                d,
                RbacDecision {
                    allowed,
                    matched_policy: matched.then(|| "p".into()),
                    reason: reason.to_owned().into(),
                    action,
                    log,
                },
                "{action} {attrs:?}"
            );
            assert_eq!(d.verdict().allowed, allowed);
        }
    }

    #[test]
    fn policies_need_a_permission_and_a_principal_and_are_tried_in_name_order() {
        let get = MapAttributes::new().with(Attr::RequestMethod, "GET");
        let policy = |method: &str, principal: Principal| Policy {
            permissions: vec![Permission::Method(method.into())],
            principals: vec![principal],
        };
        let rbac = Rbac {
            action: Action::Deny,
            policies: vec![
                ("zeta".into(), policy("GET", Principal::Any)),
                ("beta".into(), policy("GET", Principal::istio("*"))),
                ("alpha".into(), policy("POST", Principal::Any)),
                ("gamma".into(), policy("GET", Principal::Any)),
            ],
        };
        let e = RbacEngine::new(rbac).unwrap();
        assert_eq!(e.policy_names().collect::<Vec<_>>(), ["alpha", "beta", "gamma", "zeta"]);
        let d = e.evaluate(&get);
        // beta's permission matches but its principal does not (no mTLS identity).
        assert_eq!(d.matched_policy.as_deref(), Some("gamma"));
        assert_eq!(d.reason, "RBAC: access denied, matched policy `gamma`");
        assert_eq!(d.response_code_details(), "rbac_access_denied_matched_policy[gamma]");
        assert!(d.reason.starts_with(ACCESS_DENIED));

        let none = RbacEngine::new(Rbac {
            action: Action::Allow,
            policies: vec![],
        })
        .unwrap()
        .evaluate(&get);
        assert!(!none.allowed);
        assert_eq!(none.response_code_details(), "rbac_access_denied_matched_policy[none]");
    }

    #[test]
    fn invalid_rules_are_rejected_with_the_policy_named() {
        let one = |permission: Permission, principal: Principal| Rbac {
            action: Action::Allow,
            policies: vec![(
                "web".into(),
                Policy {
                    permissions: vec![permission],
                    principals: vec![principal],
                },
            )],
        };
        let err = |rbac: Rbac| RbacEngine::new(rbac).unwrap_err();
        let pol = |s: &str| s.to_owned();
        assert_eq!(
            err(one(Permission::AndRules(vec![]), Principal::Any)),
            RbacError::EmptySet {
                policy: pol("web"),
                combinator: "and_rules"
            }
        );
        assert_eq!(
            err(one(Permission::Any, Principal::OrIds(vec![]))),
            RbacError::EmptySet {
                policy: pol("web"),
                combinator: "or_ids"
            }
        );
        assert_eq!(
            err(one(Permission::UrlPath(StringMatcher::prefix("")), Principal::Any)),
            RbacError::EmptyPattern {
                policy: pol("web"),
                kind: "prefix"
            }
        );
        assert_eq!(
            err(one(Permission::Any, Principal::Header(HeaderMatcher::present("")))),
            RbacError::EmptyHeaderName(pol("web"))
        );
        assert_eq!(
            err(one(Permission::DestinationPortRange(90, 90), Principal::Any)),
            RbacError::PortRange {
                policy: pol("web"),
                start: 90,
                end: 90
            }
        );
        let mut no_principals = one(Permission::Any, Principal::Any);
        no_principals.policies[0].1.principals.clear();
        assert_eq!(err(no_principals), RbacError::NoPrincipals(pol("web")));
        let mut no_permissions = one(Permission::Any, Principal::Any);
        no_permissions.policies[0].1.permissions.clear();
        assert_eq!(err(no_permissions), RbacError::NoPermissions(pol("web")));
        let mut twice = one(Permission::Any, Principal::Any);
        twice.policies.push(twice.policies[0].clone());
        assert_eq!(err(twice), RbacError::DuplicatePolicy(pol("web")));

        assert!(matches!(StringMatcher::regex("a("), Err(RbacError::Regex { .. })));
        let cidr = CidrRange::parse("10.0.0.0/33").unwrap_err();
        assert_eq!(
            cidr.to_string(),
            "RBAC: list entry `10.0.0.0/33`: the prefix length is at most 32 for this address family"
        );
        assert!("fe80::/10".parse::<CidrRange>().is_ok());
    }

    #[test]
    fn shadow_rules_are_reported_not_enforced() {
        let deny_blocked = engine(
            Action::Deny,
            Permission::Header(HeaderMatcher::new("x-user", StringMatcher::exact("blocked"))),
            Principal::Any,
        );
        let blocked = MapAttributes::new().with(header("x-user"), "blocked");
        let ann = MapAttributes::new().with(header("x-user"), "ann");

        let shadow_only = RbacFilter {
            rules: None,
            shadow_rules: Some(deny_blocked.clone()),
        };
        let out = shadow_only.check(&blocked);
        assert!(out.allowed());
        assert_eq!(out.enforced, None);
        let shadow = out.shadow.unwrap();
        assert_eq!(
            (shadow.shadow_counter(), shadow.engine_result()),
            ("shadow_denied", "denied")
        );
        assert_eq!(shadow.matched_policy.as_deref(), Some("p"));
        let out = shadow_only.check(&ann);
        assert_eq!(out.shadow.unwrap().shadow_counter(), "shadow_allowed");

        let both = RbacFilter {
            rules: Some(deny_blocked),
            shadow_rules: Some(engine(Action::Allow, Permission::Any, Principal::istio("*"))),
        };
        let out = both.check(&ann);
        assert!(out.allowed());
        assert_eq!(out.enforced.as_ref().unwrap().counter(), "allowed");
        assert_eq!(out.shadow.as_ref().unwrap().shadow_counter(), "shadow_denied");
        assert!(!both.check(&blocked).allowed());
        assert!(RbacFilter::default().check(&blocked).allowed());
    }
}

//! The merged Mixer's Check and Quota, in the sidecar: a chain's `policy` compiled into
//! `tessera-policy` engines, evaluated over the request's attributes before it is routed, with no
//! remote call. HTTP and RPC each implement [`Attributes`] over their own request view.
//!
//! List files are re-read when they change (checked every second by a control task); a file that
//! fails to parse keeps the previous entries and logs why.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tessera_model as model;
use tessera_policy::{
    Action, Algorithm, Attr, Attributes, CidrRange, Entries, ListChecker, ListKind, Opa, Override, Permission,
    Principal, Quota, QuotaSpec, Rbac, RbacEngine, StringMatcher,
};

use crate::stats::{Counter, Scope, Stats};

mod ext_authz;
mod redis_quota;
use ext_authz::ExtAuthz;
use redis_quota::{RedisAnswer, RedisQuota};

/// Policies in use, by (stat prefix, configuration): a reload that keeps a policy keeps its
/// runtime. Only configuration changes take the lock.
type Live = std::collections::HashMap<(String, String), Weak<PolicyRt>>;
static LIVE: std::sync::LazyLock<std::sync::Mutex<Live>> = std::sync::LazyLock::new(Default::default);

/// How often list files are looked at.
const FILE_CHECK: Duration = Duration::from_secs(1);

/// What the policy says about a request.
pub(crate) enum Outcome {
    Allow,
    /// A check denied it: the answer's text (`RBAC: access denied` for RBAC, as Envoy says it;
    /// `PERMISSION_DENIED: <check>: <reason>` otherwise).
    Deny(String),
    /// A quota is used up.
    OverQuota {
        name: String,
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
    /// A remote check (ext_authz) denied it: answer with its status, headers and body.
    Remote(tessera_policy::ext_authz::CheckDecision),
    /// A quota's backend (Redis) failed and the quota fails closed.
    Unavailable {
        name: String,
        reason: String,
    },
}

struct CheckRt {
    name: String,
    kind: CheckKind,
    allowed: Arc<Counter>,
    denied: Arc<Counter>,
}

enum CheckKind {
    List {
        checker: ArcSwap<ListChecker>,
        /// Where more entries come from, and what the config itself listed.
        file: Option<ListFile>,
    },
    Rbac {
        engine: RbacEngine,
        /// Only counted (`shadow_allowed` / `shadow_denied`) and logged, never enforced.
        shadow: Option<(Arc<Counter>, Arc<Counter>)>,
        /// LOG policies that matched.
        logged: Arc<Counter>,
    },
    Opa {
        opa: ArcSwap<Opa>,
        files: Option<RegoFiles>,
        /// Evaluations that failed (fail_open answered).
        errors: Arc<Counter>,
    },
    /// A remote check: only [`PolicyRt::evaluate_async`] asks it.
    ExtAuthz(Box<ExtAuthz>),
}

/// The Rego files of an OPA check, watched like list files.
struct RegoFiles {
    paths: Vec<PathBuf>,
    inline: Option<String>,
    query: String,
    fail_open: bool,
    modified: std::sync::Mutex<Vec<Option<SystemTime>>>,
    reloaded: Arc<Counter>,
    reload_failed: Arc<Counter>,
}

struct ListFile {
    path: PathBuf,
    inline: Vec<String>,
    kind: ListKind,
    case_insensitive: bool,
    modified: std::sync::Mutex<Option<SystemTime>>,
    reloaded: Arc<Counter>,
    reload_failed: Arc<Counter>,
}

struct QuotaRt {
    kind: QuotaKind,
    granted: Arc<Counter>,
    exceeded: Arc<Counter>,
}

enum QuotaKind {
    Memory(Quota),
    Redis(Box<RedisQuota>),
}

impl QuotaRt {
    /// Takes one unit of a memory quota; `Some` answer when it is used up.
    fn memory(&self, quota: &Quota, attrs: &dyn Attributes, now: std::time::Instant) -> Option<Outcome> {
        let g = quota.alloc(attrs, 1, now);
        if !g.granted {
            self.exceeded.inc();
            return Some(Outcome::OverQuota {
                name: quota.name().to_string(),
                limit: g.limit,
                remaining: g.remaining,
                reset: g.reset,
            });
        }
        self.granted.inc();
        None
    }
}

/// A chain's checks and quotas at run time.
pub(crate) struct PolicyRt {
    checks: Vec<CheckRt>,
    quotas: Vec<QuotaRt>,
    /// A check or quota does I/O (ext_authz, Redis).
    is_async: bool,
}

fn kind(k: model::ListKind) -> ListKind {
    match k {
        model::ListKind::Strings => ListKind::Strings,
        model::ListKind::Regex => ListKind::Regex,
        model::ListKind::IpAddresses => ListKind::IpAddresses,
    }
}

fn attr(name: &str) -> Result<Attr, String> {
    name.parse::<Attr>().map_err(|e| e.to_string())
}

/// Reads `path` (one entry per line) after `inline`; the file's text when it was read.
fn list_entries(path: &PathBuf, inline: &[String], kind: ListKind, ci: bool) -> Result<Entries, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let all = inline
        .iter()
        .map(String::as_str)
        .chain(tessera_policy::parse_entries(&text));
    Entries::compile(kind, all, ci).map_err(|e| format!("{}: {e}", path.display()))
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl PolicyRt {
    /// The runtime for `cfg`, `None` when it is empty. Stats go under `policy.<prefix>.`. A
    /// policy that a reload leaves unchanged (same prefix, same configuration) is the same
    /// runtime, so quota windows and counts carry over and old and new connections share them.
    pub(crate) fn new(cfg: &model::Policy, prefix: &str, stats: &Stats) -> Result<Option<Arc<PolicyRt>>, String> {
        if cfg.is_empty() {
            return Ok(None);
        }
        let key = (prefix.to_string(), serde_json::to_string(cfg).unwrap_or_default());
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, w| w.strong_count() > 0);
        if let Some(p) = live.get(&key).and_then(Weak::upgrade) {
            return Ok(Some(p));
        }
        let p = PolicyRt::build(cfg, prefix, stats)?;
        live.insert(key, Arc::downgrade(&p));
        Ok(Some(p))
    }

    fn build(cfg: &model::Policy, prefix: &str, stats: &Stats) -> Result<Arc<PolicyRt>, String> {
        let scope = Scope::tagged("policy", "envoy_policy_prefix", prefix);
        let mut checks = Vec::with_capacity(cfg.checks.len());
        for c in &cfg.checks {
            let s = scope.child("policy_check", c.name());
            let kind = match c {
                model::Check::List(l) => list_check(l, stats, &s)?,
                model::Check::Rbac(r) => CheckKind::Rbac {
                    engine: RbacEngine::new(rbac(r)?).map_err(|e| format!("check `{}`: {e}", r.name))?,
                    shadow: r
                        .shadow
                        .then(|| (stats.counter(&s, "shadow_allowed"), stats.counter(&s, "shadow_denied"))),
                    logged: stats.counter(&s, "logged"),
                },
                model::Check::ExtAuthz(e) => {
                    CheckKind::ExtAuthz(Box::new(ExtAuthz::new(e, stats.counter(&s, "error"))))
                }
                model::Check::Opa(o) => {
                    let modules = rego_modules(&o.files, o.rego.as_deref())?;
                    let opa =
                        Opa::new(&modules, &o.query, o.fail_open).map_err(|e| format!("check `{}`: {e}", o.name))?;
                    CheckKind::Opa {
                        opa: ArcSwap::from_pointee(opa),
                        files: (!o.files.is_empty()).then(|| RegoFiles {
                            modified: std::sync::Mutex::new(o.files.iter().map(modified).collect()),
                            paths: o.files.clone(),
                            inline: o.rego.clone(),
                            query: o.query.clone(),
                            fail_open: o.fail_open,
                            reloaded: stats.counter(&s, "rego_reloaded"),
                            reload_failed: stats.counter(&s, "rego_reload_failed"),
                        }),
                        errors: stats.counter(&s, "error"),
                    }
                }
            };
            checks.push(CheckRt {
                name: c.name().to_string(),
                kind,
                allowed: stats.counter(&s, "allowed"),
                denied: stats.counter(&s, "denied"),
            });
        }
        let mut quotas = Vec::with_capacity(cfg.quotas.len());
        for q in &cfg.quotas {
            let s = scope.child("policy_quota", &q.name);
            let spec = QuotaSpec {
                name: q.name.clone(),
                max: q.max,
                window: q.window,
                algorithm: match q.algorithm {
                    model::QuotaAlgorithm::FixedWindow => Algorithm::FixedWindow,
                    model::QuotaAlgorithm::RollingWindow => Algorithm::RollingWindow,
                },
                dimensions: q.dimensions.iter().map(|d| attr(d)).collect::<Result<_, _>>()?,
                overrides: q
                    .overrides
                    .iter()
                    .map(|o| {
                        Ok(Override {
                            dimensions: o
                                .dimensions
                                .iter()
                                .map(|(k, v)| Ok((attr(k)?, v.clone())))
                                .collect::<Result<_, String>>()?,
                            max: o.max,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                max_keys: q.max_keys,
            };
            let kind = match &q.redis {
                Some(r) => QuotaKind::Redis(Box::new(RedisQuota::new(spec, r, stats, &s)?)),
                None => QuotaKind::Memory(
                    Quota::new(spec, tokio::time::Instant::now().into_std()).map_err(|e| e.to_string())?,
                ),
            };
            quotas.push(QuotaRt {
                kind,
                granted: stats.counter(&s, "granted"),
                exceeded: stats.counter(&s, "exceeded"),
            });
        }
        let is_async = checks.iter().any(|c| matches!(c.kind, CheckKind::ExtAuthz(_)))
            || quotas.iter().any(|q| matches!(q.kind, QuotaKind::Redis(_)));
        let rt = Arc::new(PolicyRt {
            checks,
            quotas,
            is_async,
        });
        if rt.checks.iter().any(CheckRt::watches_files) {
            spawn_file_watch(Arc::downgrade(&rt));
        }
        Ok(rt)
    }

    /// Checks in order (the first denial answers), then quotas.
    pub(crate) fn evaluate(&self, attrs: &dyn Attributes) -> Outcome {
        for c in &self.checks {
            if let CheckKind::ExtAuthz(e) = &c.kind {
                // The config refuses remote checks where decisions are synchronous (RPC chains).
                return Outcome::Unavailable {
                    name: e.name().to_string(),
                    reason: "a remote check cannot be asked here".into(),
                };
            }
            if let Some(o) = c.decide(attrs) {
                return o;
            }
        }
        let now = tokio::time::Instant::now().into_std();
        for q in &self.quotas {
            match &q.kind {
                QuotaKind::Memory(quota) => {
                    if let Some(o) = q.memory(quota, attrs, now) {
                        return o;
                    }
                }
                QuotaKind::Redis(r) => {
                    return Outcome::Unavailable {
                        name: r.name().to_string(),
                        reason: "a Redis quota cannot be asked here".into(),
                    };
                }
            }
        }
        Outcome::Allow
    }

    /// True when a check or quota does I/O: then callers use [`PolicyRt::evaluate_async`].
    pub(crate) fn is_async(&self) -> bool {
        self.is_async
    }

    /// [`PolicyRt::evaluate`], with remote checks (ext_authz) and Redis quotas asked in order;
    /// each remote call is bounded by its own timeout.
    pub(crate) async fn evaluate_async(&self, attrs: &(dyn Attributes + Sync)) -> Outcome {
        for c in &self.checks {
            if let CheckKind::ExtAuthz(e) = &c.kind {
                match e.check(attrs).await {
                    Ok(()) => c.allowed.inc(),
                    Err(d) => {
                        c.denied.inc();
                        return Outcome::Remote(d);
                    }
                }
            } else if let Some(o) = c.decide(attrs) {
                return o;
            }
        }
        let now = tokio::time::Instant::now().into_std();
        for q in &self.quotas {
            match &q.kind {
                QuotaKind::Memory(quota) => {
                    if let Some(o) = q.memory(quota, attrs, now) {
                        return o;
                    }
                }
                QuotaKind::Redis(r) => {
                    let (key, limit) = r.key(attrs);
                    if r.take_local(&key) {
                        q.granted.inc();
                        continue;
                    }
                    match r.take(key, limit).await {
                        RedisAnswer::Granted => q.granted.inc(),
                        RedisAnswer::Exceeded {
                            limit,
                            remaining,
                            reset,
                        } => {
                            q.exceeded.inc();
                            return Outcome::OverQuota {
                                name: r.name().to_string(),
                                limit,
                                remaining,
                                reset,
                            };
                        }
                        RedisAnswer::Unavailable(reason) => {
                            return Outcome::Unavailable {
                                name: r.name().to_string(),
                                reason,
                            };
                        }
                    }
                }
            }
        }
        Outcome::Allow
    }

    /// Re-reads the list files whose modification time changed (blocking file reads: the caller
    /// runs it off the request path).
    fn refresh_files(&self) {
        for c in &self.checks {
            match &c.kind {
                CheckKind::List { checker, file: Some(f) } => f.refresh(checker, &c.name),
                CheckKind::Opa {
                    opa, files: Some(f), ..
                } => f.refresh(opa, &c.name),
                _ => {}
            }
        }
    }
}

impl CheckRt {
    /// A check that needs no I/O, counted: `None` lets the request through.
    fn decide(&self, attrs: &dyn Attributes) -> Option<Outcome> {
        match self.evaluate(attrs) {
            Some(denial) => {
                self.denied.inc();
                Some(Outcome::Deny(denial))
            }
            None => {
                self.allowed.inc();
                None
            }
        }
    }

    fn watches_files(&self) -> bool {
        matches!(
            self.kind,
            CheckKind::List { file: Some(_), .. } | CheckKind::Opa { files: Some(_), .. }
        )
    }

    /// `None` when the check lets the request through; otherwise the answer's text.
    fn evaluate(&self, attrs: &dyn Attributes) -> Option<String> {
        match &self.kind {
            CheckKind::List { checker, .. } => {
                let checker = checker.load();
                let v = checker.check(attrs);
                (!v.allowed).then(|| format!("PERMISSION_DENIED: {}: {}", self.name, v.reason))
            }
            CheckKind::Rbac { engine, shadow, logged } => {
                let d = engine.evaluate(attrs);
                if d.log {
                    logged.inc();
                    tracing::info!(check = %self.name, policy = d.matched_policy.as_deref().unwrap_or("-"), "RBAC log policy matched");
                }
                match shadow {
                    Some((allowed, denied)) => {
                        if d.allowed {
                            allowed.inc();
                        } else {
                            denied.inc();
                            tracing::debug!(check = %self.name, reason = %d.reason, "RBAC shadow denial");
                        }
                        None
                    }
                    None => (!d.allowed).then(|| tessera_policy::rbac::ACCESS_DENIED.to_string()),
                }
            }
            // Asked by `PolicyRt::evaluate_async`; never here.
            CheckKind::ExtAuthz(e) => Some(format!(
                "PERMISSION_DENIED: {}: a remote check cannot be asked here",
                e.name()
            )),
            CheckKind::Opa { opa, errors, .. } => {
                let v = opa.load().evaluate(attrs);
                if v.error {
                    errors.inc();
                    tracing::warn!(check = %self.name, reason = %v.reason, allowed = v.allowed, "OPA evaluation failed");
                }
                (!v.allowed).then(|| format!("PERMISSION_DENIED: {}: {}", self.name, v.reason))
            }
        }
    }
}

impl ListFile {
    fn refresh(&self, checker: &ArcSwap<ListChecker>, name: &str) {
        let now = modified(&self.path);
        let mut seen = self.modified.lock().unwrap_or_else(|p| p.into_inner());
        if now == *seen {
            return;
        }
        *seen = now;
        match list_entries(&self.path, &self.inline, self.kind, self.case_insensitive) {
            Ok(entries) => {
                let next = checker.load().with_entries(Arc::new(entries));
                checker.store(Arc::new(next));
                self.reloaded.inc();
                tracing::info!(file = %self.path.display(), check = name, "list reloaded");
            }
            Err(e) => {
                self.reload_failed.inc();
                tracing::warn!(error = %e, check = name, "list file not reloaded; keeping the previous entries");
            }
        }
    }
}

impl RegoFiles {
    fn refresh(&self, opa: &ArcSwap<Opa>, name: &str) {
        let now: Vec<_> = self.paths.iter().map(modified).collect();
        let mut seen = self.modified.lock().unwrap_or_else(|p| p.into_inner());
        if now == *seen {
            return;
        }
        *seen = now;
        let next = rego_modules(&self.paths, self.inline.as_deref())
            .and_then(|m| Opa::new(&m, &self.query, self.fail_open).map_err(|e| e.to_string()));
        match next {
            Ok(next) => {
                opa.store(Arc::new(next));
                self.reloaded.inc();
                tracing::info!(check = name, "Rego policy reloaded");
            }
            Err(e) => {
                self.reload_failed.inc();
                tracing::warn!(error = %e, check = name, "Rego policy not reloaded; keeping the previous one");
            }
        }
    }
}

/// Reads the Rego files (and the inline module) as (label, text).
fn rego_modules(paths: &[PathBuf], inline: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::with_capacity(paths.len() + 1);
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        out.push((p.display().to_string(), text));
    }
    if let Some(text) = inline {
        out.push(("rego (inline)".to_string(), text.to_string()));
    }
    Ok(out)
}

fn list_check(l: &model::ListCheck, stats: &Stats, s: &Scope) -> Result<CheckKind, String> {
    let k = kind(l.kind);
    let entries = match &l.file {
        Some(path) => list_entries(path, &l.entries, k, l.case_insensitive),
        None => {
            Entries::compile(k, l.entries.iter().map(String::as_str), l.case_insensitive).map_err(|e| e.to_string())
        }
    }
    .map_err(|e| format!("check `{}`: {e}", l.name))?;
    let checker = ListChecker::new(l.name.as_str(), attr(&l.attribute)?, l.blacklist, Arc::new(entries));
    Ok(CheckKind::List {
        checker: ArcSwap::from_pointee(checker),
        file: l.file.as_ref().map(|path| ListFile {
            modified: std::sync::Mutex::new(modified(path)),
            path: path.clone(),
            inline: l.entries.clone(),
            kind: k,
            case_insensitive: l.case_insensitive,
            reloaded: stats.counter(s, "list_reloaded"),
            reload_failed: stats.counter(s, "list_reload_failed"),
        }),
    })
}

fn string_matcher(m: &model::CaseMatch) -> Result<StringMatcher, String> {
    let base = match &m.matcher {
        model::StringMatch::Exact(v) => StringMatcher::exact(v.as_str()),
        model::StringMatch::Prefix(v) => StringMatcher::prefix(v.as_str()),
        model::StringMatch::Suffix(v) => StringMatcher::suffix(v.as_str()),
        model::StringMatch::Contains(v) => StringMatcher::contains(v.as_str()),
        model::StringMatch::SafeRegex(p) => StringMatcher::regex(p.raw.as_str()).map_err(|e| e.to_string())?,
    };
    Ok(if m.ignore_case { base.ignoring_case() } else { base })
}

fn header_matcher(h: &model::HeaderMatcher) -> Result<tessera_policy::HeaderMatcher, String> {
    let m = match &h.spec {
        model::HeaderMatchSpec::Present(true) => tessera_policy::HeaderMatcher::present(h.name.as_str()),
        model::HeaderMatchSpec::Present(false) => tessera_policy::HeaderMatcher::present(h.name.as_str()).inverted(),
        model::HeaderMatchSpec::String { matcher, ignore_case } => tessera_policy::HeaderMatcher::new(
            h.name.as_str(),
            string_matcher(&model::CaseMatch {
                matcher: matcher.clone(),
                ignore_case: *ignore_case,
            })?,
        ),
        model::HeaderMatchSpec::Range { .. } => {
            return Err(format!(
                "RBAC header `{}`: range_match is not supported in RBAC",
                h.name
            ));
        }
    };
    Ok(if h.invert_match { m.inverted() } else { m })
}

fn permission(p: &model::Permission) -> Result<Permission, String> {
    use model::Permission as M;
    let all = |v: &[M]| v.iter().map(permission).collect::<Result<Vec<_>, _>>();
    Ok(match p {
        M::Any => Permission::Any,
        M::AndRules(v) => Permission::AndRules(all(v)?),
        M::OrRules(v) => Permission::OrRules(all(v)?),
        M::NotRule(p) => Permission::NotRule(Box::new(permission(p)?)),
        M::Header(h) => Permission::Header(header_matcher(h)?),
        M::UrlPath(m) => Permission::UrlPath(string_matcher(m)?),
        M::Method(m) => Permission::Method(m.clone()),
        M::DestinationPort(p) => Permission::DestinationPort(*p),
        M::DestinationPortRange(a, b) => Permission::DestinationPortRange(*a, *b),
        M::RpcService(m) => Permission::RpcService(string_matcher(m)?),
        M::RpcMethod(m) => Permission::RpcMethod(string_matcher(m)?),
    })
}

fn principal_rule(p: &model::Principal) -> Result<Principal, String> {
    use model::Principal as M;
    let all = |v: &[M]| v.iter().map(principal_rule).collect::<Result<Vec<_>, _>>();
    Ok(match p {
        M::Any => Principal::Any,
        M::AndIds(v) => Principal::AndIds(all(v)?),
        M::OrIds(v) => Principal::OrIds(all(v)?),
        M::NotId(p) => Principal::NotId(Box::new(principal_rule(p)?)),
        M::Authenticated(m) => Principal::Authenticated(string_matcher(m)?),
        M::SourceIp(c) => Principal::SourceIp(CidrRange::parse(&c.to_string()).map_err(|e| e.to_string())?),
        M::Header(h) => Principal::Header(header_matcher(h)?),
    })
}

fn rbac(r: &model::RbacCheck) -> Result<Rbac, String> {
    let policies = r
        .policies
        .iter()
        .map(|(name, p)| {
            let permissions = p.permissions.iter().map(permission).collect::<Result<_, _>>();
            let principals = p.principals.iter().map(principal_rule).collect::<Result<_, _>>();
            Ok((
                name.clone(),
                tessera_policy::Policy {
                    permissions: permissions.map_err(|e| format!("check `{}` policy `{name}`: {e}", r.name))?,
                    principals: principals.map_err(|e: String| format!("check `{}` policy `{name}`: {e}", r.name))?,
                },
            ))
        })
        .collect::<Result<_, String>>()?;
    Ok(Rbac {
        action: match r.action {
            model::RbacAction::Allow => Action::Allow,
            model::RbacAction::Deny => Action::Deny,
            model::RbacAction::Log => Action::Log,
        },
        policies,
    })
}

/// Looks at the list files every second while the policy lives; the reads run on the blocking
/// pool, not on a worker.
fn spawn_file_watch(policy: Weak<PolicyRt>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        loop {
            tokio::time::sleep(FILE_CHECK).await;
            let Some(p) = policy.upgrade() else { return };
            let _ = tokio::task::spawn_blocking(move || p.refresh_files()).await;
        }
    });
}

// ---------------------------------------------------------------- attribute views

/// An HTTP request as policies see it.
pub(crate) struct HttpAttrs<'a> {
    pub(crate) parts: &'a http::request::Parts,
    pub(crate) host: &'a str,
    pub(crate) remote: SocketAddr,
    /// `remote`'s IP as text, made once per connection.
    pub(crate) remote_ip: &'a str,
    pub(crate) local: SocketAddr,
    pub(crate) tls: Option<&'a crate::tls::TlsInfo>,
    pub(crate) scheme: &'static str,
    pub(crate) grpc: bool,
}

fn principal(tls: Option<&crate::tls::TlsInfo>) -> Option<Cow<'_, str>> {
    let peer = tls?.peer.as_ref()?;
    peer.info.uri.first().map(|u| Cow::Borrowed(u.as_str()))
}

impl Attributes for HttpAttrs<'_> {
    fn get(&self, a: &Attr) -> Option<Cow<'_, str>> {
        Some(match a {
            Attr::SourceIp => Cow::Borrowed(self.remote_ip),
            Attr::SourcePort => Cow::Owned(self.remote.port().to_string()),
            Attr::SourcePrincipal => return principal(self.tls),
            Attr::DestinationPort => Cow::Owned(self.local.port().to_string()),
            Attr::DestinationService | Attr::RequestHost => Cow::Borrowed(self.host),
            Attr::RequestMethod => Cow::Borrowed(self.parts.method.as_str()),
            Attr::RequestPath => Cow::Borrowed(self.parts.uri.path_and_query().map_or("/", |p| p.as_str())),
            Attr::RequestScheme => Cow::Borrowed(self.scheme),
            Attr::RequestHeader(h) => {
                let mut values = self
                    .parts
                    .headers
                    .get_all(h.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok());
                let first = values.next()?;
                match values.next() {
                    None => Cow::Borrowed(first),
                    Some(second) => {
                        let mut joined = format!("{first},{second}");
                        for v in values {
                            joined.push(',');
                            joined.push_str(v);
                        }
                        Cow::Owned(joined)
                    }
                }
            }
            Attr::ContextProtocol => Cow::Borrowed(if self.grpc { "grpc" } else { "http" }),
            _ => return None,
        })
    }

    fn each_header(&self, f: &mut dyn FnMut(&str, &str)) {
        let headers = &self.parts.headers;
        for name in headers.keys() {
            let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
            let Some(first) = values.next() else { continue };
            match values.next() {
                None => f(name.as_str(), first),
                Some(second) => {
                    let joined = [first, second].into_iter().chain(values).collect::<Vec<_>>().join(",");
                    f(name.as_str(), &joined);
                }
            }
        }
    }
}

/// An RPC request as policies see it.
pub(crate) struct RpcAttrs<'a> {
    pub(crate) keys: &'a tessera_rpc::RouteKeys<'a>,
    pub(crate) protocol: &'static str,
    pub(crate) remote: SocketAddr,
    /// `remote`'s IP as text, made once per connection.
    pub(crate) remote_ip: &'a str,
    pub(crate) local: SocketAddr,
}

impl Attributes for RpcAttrs<'_> {
    fn get(&self, a: &Attr) -> Option<Cow<'_, str>> {
        let k = self.keys;
        let non_empty = |s: &'_ str| (!s.is_empty()).then_some(());
        Some(match a {
            Attr::SourceIp => Cow::Borrowed(self.remote_ip),
            Attr::SourcePort => Cow::Owned(self.remote.port().to_string()),
            Attr::DestinationPort => Cow::Owned(self.local.port().to_string()),
            Attr::RpcProtocol | Attr::ContextProtocol => Cow::Borrowed(self.protocol),
            Attr::DestinationService | Attr::RpcService => {
                non_empty(&k.service)?;
                Cow::Borrowed(k.service.as_ref())
            }
            Attr::RpcMethod => {
                non_empty(&k.method)?;
                Cow::Borrowed(k.method.as_ref())
            }
            Attr::RpcVersion => {
                non_empty(&k.version)?;
                Cow::Borrowed(k.version.as_ref())
            }
            Attr::RpcGroup => {
                non_empty(&k.group)?;
                Cow::Borrowed(k.group.as_ref())
            }
            Attr::RpcAttachment(name) | Attr::RequestHeader(name) => Cow::Borrowed(
                k.headers
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_ref())?,
            ),
            _ => return None,
        })
    }

    fn each_header(&self, f: &mut dyn FnMut(&str, &str)) {
        self.each_attachment(f)
    }

    fn each_attachment(&self, f: &mut dyn FnMut(&str, &str)) {
        for (k, v) in &self.keys.headers {
            f(k, v);
        }
    }
}

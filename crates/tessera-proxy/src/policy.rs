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
use tessera_policy::{Algorithm, Attr, Attributes, Entries, ListChecker, ListKind, Override, Quota, QuotaSpec};

use crate::stats::{Counter, Scope, Stats};

/// Policies in use, by (stat prefix, configuration): a reload that keeps a policy keeps its
/// runtime. Only configuration changes take the lock.
type Live = std::collections::HashMap<(String, String), Weak<PolicyRt>>;
static LIVE: std::sync::LazyLock<std::sync::Mutex<Live>> = std::sync::LazyLock::new(Default::default);

/// How often list files are looked at.
const FILE_CHECK: Duration = Duration::from_secs(1);

/// What the policy says about a request.
pub(crate) enum Outcome {
    Allow,
    /// A check denied it: the reason names the check, the attribute and its value.
    Deny(String),
    /// A quota is used up.
    OverQuota {
        name: String,
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
}

struct CheckRt {
    checker: ArcSwap<ListChecker>,
    /// Where more entries come from, and what the config itself listed.
    file: Option<ListFile>,
    allowed: Arc<Counter>,
    denied: Arc<Counter>,
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
    quota: Quota,
    granted: Arc<Counter>,
    exceeded: Arc<Counter>,
}

/// A chain's checks and quotas at run time.
pub(crate) struct PolicyRt {
    checks: Vec<CheckRt>,
    quotas: Vec<QuotaRt>,
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
            let model::Check::List(l) = c;
            let s = scope.child("policy_check", &l.name);
            let k = kind(l.kind);
            let entries = match &l.file {
                Some(path) => list_entries(path, &l.entries, k, l.case_insensitive),
                None => Entries::compile(k, l.entries.iter().map(String::as_str), l.case_insensitive)
                    .map_err(|e| e.to_string()),
            }
            .map_err(|e| format!("check `{}`: {e}", l.name))?;
            let checker = ListChecker::new(l.name.as_str(), attr(&l.attribute)?, l.blacklist, Arc::new(entries));
            checks.push(CheckRt {
                checker: ArcSwap::from_pointee(checker),
                file: l.file.as_ref().map(|path| ListFile {
                    modified: std::sync::Mutex::new(modified(path)),
                    path: path.clone(),
                    inline: l.entries.clone(),
                    kind: k,
                    case_insensitive: l.case_insensitive,
                    reloaded: stats.counter(&s, "list_reloaded"),
                    reload_failed: stats.counter(&s, "list_reload_failed"),
                }),
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
            let quota = Quota::new(spec, tokio::time::Instant::now().into_std()).map_err(|e| e.to_string())?;
            quotas.push(QuotaRt {
                quota,
                granted: stats.counter(&s, "granted"),
                exceeded: stats.counter(&s, "exceeded"),
            });
        }
        let rt = Arc::new(PolicyRt { checks, quotas });
        if rt.checks.iter().any(|c| c.file.is_some()) {
            spawn_file_watch(Arc::downgrade(&rt));
        }
        Ok(rt)
    }

    /// Checks in order (the first denial answers), then quotas.
    pub(crate) fn evaluate(&self, attrs: &dyn Attributes) -> Outcome {
        for c in &self.checks {
            let checker = c.checker.load();
            let v = checker.check(attrs);
            if !v.allowed {
                c.denied.inc();
                return Outcome::Deny(format!("{}: {}", checker.name(), v.reason));
            }
            c.allowed.inc();
        }
        if !self.quotas.is_empty() {
            let now = tokio::time::Instant::now().into_std();
            for q in &self.quotas {
                let g = q.quota.alloc(attrs, 1, now);
                if !g.granted {
                    q.exceeded.inc();
                    return Outcome::OverQuota {
                        name: q.quota.name().to_string(),
                        limit: g.limit,
                        remaining: g.remaining,
                        reset: g.reset,
                    };
                }
                q.granted.inc();
            }
        }
        Outcome::Allow
    }

    /// Re-reads the list files whose modification time changed (blocking file reads: the caller
    /// runs it off the request path).
    fn refresh_files(&self) {
        for c in &self.checks {
            let Some(f) = &c.file else { continue };
            let now = modified(&f.path);
            let mut seen = f.modified.lock().unwrap_or_else(|p| p.into_inner());
            if now == *seen {
                continue;
            }
            *seen = now;
            match list_entries(&f.path, &f.inline, f.kind, f.case_insensitive) {
                Ok(entries) => {
                    let next = c.checker.load().with_entries(Arc::new(entries));
                    c.checker.store(Arc::new(next));
                    f.reloaded.inc();
                    tracing::info!(file = %f.path.display(), check = c.checker.load().name(), "list reloaded");
                }
                Err(e) => {
                    f.reload_failed.inc();
                    tracing::warn!(error = %e, "list file not reloaded; keeping the previous entries");
                }
            }
        }
    }
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
}

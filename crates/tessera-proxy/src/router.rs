//! Route tables compiled from the model: virtual host by domain, then the first matching route.
//!
//! Matching is a pure function of a [`RequestView`]; nothing here does I/O.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tessera_model::{self as model, AppendAction, ClusterSpecifier, HeaderMatchSpec, PathMatch, RouteAction};

use crate::cluster::ClusterRt;
use crate::ratelimit::RateLimiter;
use crate::util::rand_below;

/// What matching needs to know of a request.
pub(crate) struct RequestView<'a> {
    /// Host without normalisation (`Host` or `:authority`).
    pub(crate) host: &'a str,
    /// Path without the query.
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) method: &'a Method,
    pub(crate) scheme: &'a str,
    pub(crate) headers: &'a HeaderMap,
}

/// Header additions and removals at one level (table, virtual host or route).
#[derive(Default)]
pub(crate) struct Mutations {
    pub(crate) request_add: Vec<(HeaderName, HeaderValue, AppendAction)>,
    pub(crate) request_remove: Vec<HeaderName>,
    pub(crate) response_add: Vec<(HeaderName, HeaderValue, AppendAction)>,
    pub(crate) response_remove: Vec<HeaderName>,
}

impl Mutations {
    fn compile(
        req_add: &[model::HeaderValueOption],
        req_rm: &[String],
        resp_add: &[model::HeaderValueOption],
        resp_rm: &[String],
    ) -> Result<Mutations, String> {
        let add = |v: &[model::HeaderValueOption]| -> Result<Vec<_>, String> {
            v.iter()
                .map(|h| {
                    let name = HeaderName::from_bytes(h.key.as_bytes())
                        .map_err(|_| format!("invalid header name `{}`", h.key))?;
                    let value = HeaderValue::from_bytes(h.value.as_bytes())
                        .map_err(|_| format!("invalid value for header `{}`", h.key))?;
                    Ok((name, value, h.append_action))
                })
                .collect()
        };
        let rm = |v: &[String]| -> Result<Vec<HeaderName>, String> {
            v.iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("invalid header name `{n}`")))
                .collect()
        };
        Ok(Mutations {
            request_add: add(req_add)?,
            request_remove: rm(req_rm)?,
            response_add: add(resp_add)?,
            response_remove: rm(resp_rm)?,
        })
    }
}

/// Applies removals then additions with Envoy's append rules.
pub(crate) fn mutate(headers: &mut HeaderMap, remove: &[HeaderName], add: &[(HeaderName, HeaderValue, AppendAction)]) {
    for name in remove {
        headers.remove(name);
    }
    for (name, value, action) in add {
        match action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(name.clone(), value.clone());
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(name.clone(), value.clone());
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
    }
}

/// A cluster, and the subset of its endpoints a route asked for.
pub(crate) struct Dest {
    pub(crate) cluster: Arc<ClusterRt>,
    /// Index of a registered label set (see `ClusterRt::register_subset`).
    pub(crate) subset: Option<usize>,
}

impl Dest {
    pub(crate) fn new(
        cluster: Arc<ClusterRt>,
        route: &BTreeMap<String, String>,
        entry: &BTreeMap<String, String>,
    ) -> Dest {
        let mut labels = route.clone();
        labels.extend(entry.iter().map(|(k, v)| (k.clone(), v.clone())));
        let subset = (!labels.is_empty()).then(|| cluster.register_subset(&labels));
        Dest { cluster, subset }
    }
}

/// Where a forwarding route sends requests.
pub(crate) enum Target {
    One(Dest),
    Weighted { clusters: Vec<(Dest, u64)>, total: u64 },
}

impl Target {
    /// The target of a route action: its cluster(s), each with the route's and its own endpoint
    /// labels; `cluster` resolves a name.
    pub(crate) fn compile(
        spec: &ClusterSpecifier,
        labels: &BTreeMap<String, String>,
        cluster: &dyn Fn(&str) -> Result<Arc<ClusterRt>, String>,
    ) -> Result<Target, String> {
        Ok(match spec {
            ClusterSpecifier::Cluster(c) => Target::One(Dest::new(cluster(c)?, labels, &BTreeMap::new())),
            ClusterSpecifier::WeightedClusters(ws) => {
                let clusters = ws
                    .iter()
                    .filter(|w| w.weight > 0)
                    .map(|w| {
                        Ok((
                            Dest::new(cluster(&w.name)?, labels, &w.metadata_match),
                            u64::from(w.weight),
                        ))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                let total = clusters.iter().map(|(_, w)| *w).sum();
                Target::Weighted { clusters, total }
            }
        })
    }

    /// The destination for one request.
    #[inline]
    pub(crate) fn pick(&self) -> &Dest {
        match self {
            Target::One(c) => c,
            Target::Weighted { clusters, total } => {
                let mut r = rand_below(*total);
                for (c, w) in clusters {
                    if r < *w {
                        return c;
                    }
                    r -= w;
                }
                &clusters[clusters.len() - 1].0
            }
        }
    }
}

pub(crate) struct Forward {
    pub(crate) target: Target,
    pub(crate) timeout: Option<Duration>,
    pub(crate) prefix_rewrite: Option<String>,
    pub(crate) regex_rewrite: Option<model::RegexRewrite>,
    pub(crate) host_rewrite: Option<HeaderValue>,
    pub(crate) auto_host_rewrite: bool,
    pub(crate) retry: Option<model::RetryPolicy>,
    pub(crate) hash_policy: Vec<model::HashPolicy>,
    /// Shadow destinations and the share of requests each gets.
    pub(crate) mirrors: Vec<(Dest, f64)>,
    pub(crate) max_stream_duration: Option<Duration>,
    pub(crate) grpc_timeout_header: bool,
    pub(crate) grpc_timeout_max: Option<Duration>,
    pub(crate) priority: model::RoutingPriority,
    pub(crate) buffer_limit: u64,
}

pub(crate) enum Action {
    Forward(Box<Forward>),
    Redirect(model::Redirect),
    Direct { status: StatusCode, body: Bytes },
}

pub(crate) struct Route {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) matcher: model::RouteMatch,
    pub(crate) action: Action,
    pub(crate) mutations: Mutations,
    pub(crate) fault: Option<model::FaultInjection>,
    pub(crate) rate_limit: Option<Arc<RateLimiter>>,
}

pub(crate) struct VirtualHost {
    pub(crate) name: String,
    pub(crate) routes: Vec<Route>,
    pub(crate) mutations: Mutations,
}

/// A compiled route table.
pub(crate) struct RouteTable {
    pub(crate) vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `.example.com`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `example.*` stored as `example.`, longest first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    pub(crate) mutations: Mutations,
}

impl RouteTable {
    /// Compiles `cfg`, resolving cluster names against `clusters`.
    pub(crate) fn compile(
        cfg: &model::RouteConfig,
        clusters: &HashMap<String, Arc<ClusterRt>>,
    ) -> Result<RouteTable, String> {
        let cluster = |name: &str| {
            clusters
                .get(name)
                .cloned()
                .ok_or_else(|| format!("route table `{}` refers to unknown cluster `{name}`", cfg.name))
        };
        let mut t = RouteTable {
            vhosts: Vec::with_capacity(cfg.virtual_hosts.len()),
            exact: HashMap::new(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
            mutations: Mutations::compile(
                &cfg.request_headers_to_add,
                &cfg.request_headers_to_remove,
                &cfg.response_headers_to_add,
                &cfg.response_headers_to_remove,
            )?,
        };
        for (i, vh) in cfg.virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    t.any.get_or_insert(i);
                } else if let Some(s) = d.strip_prefix('*') {
                    t.suffixes.push((s.to_string(), i));
                } else if let Some(p) = d.strip_suffix('*') {
                    t.prefixes.push((p.to_string(), i));
                } else {
                    t.exact.entry(d).or_insert(i);
                }
            }
            let mut routes = Vec::with_capacity(vh.routes.len());
            for r in &vh.routes {
                let action = match &r.action {
                    RouteAction::Route(f) => Action::Forward(Box::new(Forward {
                        target: Target::compile(&f.cluster, &f.metadata_match, &cluster)?,
                        timeout: (!f.timeout.is_zero()).then_some(f.timeout),
                        prefix_rewrite: f.prefix_rewrite.clone(),
                        regex_rewrite: f.regex_rewrite.clone(),
                        host_rewrite: f
                            .host_rewrite_literal
                            .as_ref()
                            .map(|h| {
                                HeaderValue::from_str(h).map_err(|_| format!("invalid host_rewrite_literal `{h}`"))
                            })
                            .transpose()?,
                        auto_host_rewrite: f.auto_host_rewrite,
                        retry: f.retry_policy.clone(),
                        hash_policy: f.hash_policy.clone(),
                        mirrors: f
                            .request_mirror_policies
                            .iter()
                            .map(|m| {
                                Ok((
                                    Dest::new(cluster(&m.cluster)?, &BTreeMap::new(), &BTreeMap::new()),
                                    m.percentage,
                                ))
                            })
                            .collect::<Result<Vec<_>, String>>()?,
                        max_stream_duration: (!f.max_stream_duration.is_zero()).then_some(f.max_stream_duration),
                        grpc_timeout_header: f.grpc_timeout_header,
                        grpc_timeout_max: (!f.grpc_timeout_header_max.is_zero()).then_some(f.grpc_timeout_header_max),
                        priority: f.priority,
                        buffer_limit: u64::from(f.per_request_buffer_limit_bytes),
                    })),
                    RouteAction::Redirect(r) => Action::Redirect(r.clone()),
                    RouteAction::DirectResponse(d) => Action::Direct {
                        status: StatusCode::from_u16(d.status).map_err(|_| format!("invalid status {}", d.status))?,
                        body: d.body.clone().map(Bytes::from).unwrap_or_default(),
                    },
                };
                routes.push(Route {
                    name: r.name.as_deref().map(Arc::from),
                    matcher: r.matcher.clone(),
                    fault: r.fault.clone(),
                    rate_limit: match &r.local_rate_limit {
                        Some(c) => {
                            RateLimiter::headers(c)?;
                            Some(Arc::new(RateLimiter::new(c.clone())))
                        }
                        None => None,
                    },
                    action,
                    mutations: Mutations::compile(
                        &r.request_headers_to_add,
                        &r.request_headers_to_remove,
                        &r.response_headers_to_add,
                        &r.response_headers_to_remove,
                    )?,
                });
            }
            t.vhosts.push(VirtualHost {
                name: vh.name.clone(),
                routes,
                mutations: Mutations::compile(
                    &vh.request_headers_to_add,
                    &vh.request_headers_to_remove,
                    &vh.response_headers_to_add,
                    &vh.response_headers_to_remove,
                )?,
            });
        }
        // Envoy: longer wildcard matches win over shorter ones.
        t.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        t.prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(t)
    }

    /// The virtual host for `host`: exact, then longest `*.suffix`, then longest `prefix.*`, then `*`.
    /// A host with a port matches an exact `host:port` domain, else is matched without its port.
    pub(crate) fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let lower: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let idx = match strip_port(&lower) {
            // `host:port` may be listed as such; otherwise the port plays no part.
            Some(bare) => self
                .exact
                .get(lower.as_ref())
                .copied()
                .or_else(|| self.lookup(bare))
                .or_else(|| self.lookup(&lower)),
            None => self.lookup(&lower),
        }
        .or(self.any)?;
        self.vhosts.get(idx)
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        if let Some((_, i)) = self
            .suffixes
            .iter()
            .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
        {
            return Some(*i);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
            .map(|(_, i)| *i)
    }

    /// The first route of the chosen virtual host that matches.
    pub(crate) fn route(&self, req: &RequestView<'_>) -> Option<(&VirtualHost, &Route)> {
        let vh = self.virtual_host(req.host)?;
        let r = vh.routes.iter().find(|r| route_matches(&r.matcher, req))?;
        Some((vh, r))
    }
}

/// `host:port` to `host`; bracketed IPv6 keeps its brackets.
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        let end = host.find(']')?;
        return (end + 1 < host.len()).then(|| &host[..=end]);
    }
    let (h, p) = host.rsplit_once(':')?;
    (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then_some(h)
}

pub(crate) fn route_matches(m: &model::RouteMatch, req: &RequestView<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Prefix(p) => {
            if m.case_sensitive {
                req.path.starts_with(p.as_str())
            } else {
                req.path.len() >= p.len()
                    && req.path.is_char_boundary(p.len())
                    && req.path[..p.len()].eq_ignore_ascii_case(p)
            }
        }
        PathMatch::Path(p) => {
            if m.case_sensitive {
                req.path == p
            } else {
                req.path.eq_ignore_ascii_case(p)
            }
        }
        PathMatch::SafeRegex(re) => re.is_full_match(req.path),
    };
    if !path_ok {
        return false;
    }
    if m.grpc && !is_grpc(req.headers) {
        return false;
    }
    if !m.headers.iter().all(|h| header_matches(h, req)) {
        return false;
    }
    m.query_parameters.iter().all(|q| query_matches(q, req.query))
}

/// True for gRPC requests: `content-type: application/grpc` or `application/grpc+...`.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let b = v.as_bytes();
        b.starts_with(b"application/grpc") && matches!(b.get(16), None | Some(b'+') | Some(b';'))
    })
}

fn header_value<'a>(name: &str, req: &'a RequestView<'_>) -> Option<Cow<'a, str>> {
    match name {
        ":authority" => Some(Cow::Borrowed(req.host)),
        ":method" => Some(Cow::Borrowed(req.method.as_str())),
        ":scheme" => Some(Cow::Borrowed(req.scheme)),
        ":path" => Some(match req.query {
            Some(q) => Cow::Owned(format!("{}?{q}", req.path)),
            None => Cow::Borrowed(req.path),
        }),
        _ => {
            let mut values = req.headers.get_all(name).iter();
            let first = values.next()?;
            let first = first.to_str().unwrap_or("");
            let mut rest = values.peekable();
            if rest.peek().is_none() {
                return Some(Cow::Borrowed(first));
            }
            // Envoy joins repeated headers with commas before matching.
            let mut joined = first.to_string();
            for v in rest {
                joined.push(',');
                joined.push_str(v.to_str().unwrap_or(""));
            }
            Some(Cow::Owned(joined))
        }
    }
}

pub(crate) fn header_matches(h: &model::HeaderMatcher, req: &RequestView<'_>) -> bool {
    header_value_matches(h, header_value(&h.name, req).as_deref())
}

/// Applies `h` to a header's value, `None` when the header is absent (HTTP headers, Bolt
/// header maps and Dubbo attachments alike).
pub(crate) fn header_value_matches(h: &model::HeaderMatcher, value: Option<&str>) -> bool {
    let Some(value) = value else {
        // Envoy: on an absent header only a presence test can match, inverted or not.
        return match h.spec {
            HeaderMatchSpec::Present(want) => want == h.invert_match,
            _ => false,
        };
    };
    let result = match &h.spec {
        HeaderMatchSpec::Present(want) => *want,
        HeaderMatchSpec::String { matcher, ignore_case } => matcher.matches(value, *ignore_case),
        HeaderMatchSpec::Range { start, end } => value.trim().parse::<i64>().is_ok_and(|n| n >= *start && n < *end),
    };
    result != h.invert_match
}

fn query_matches(q: &model::QueryParameterMatcher, query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    query.split('&').any(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k == q.name
            && match &q.string_match {
                None => true,
                Some(m) => m.matches(v, q.ignore_case),
            }
    })
}

/// The new path for a forwarded request after `prefix_rewrite` or `regex_rewrite`, or `None` when unchanged.
pub(crate) fn rewrite_path(fwd: &Forward, m: &model::RouteMatch, path: &str) -> Option<String> {
    if let Some(new_prefix) = &fwd.prefix_rewrite {
        let matched = match &m.path {
            PathMatch::Prefix(p) => p.len().min(path.len()),
            _ => path.len(),
        };
        let mut out = String::with_capacity(new_prefix.len() + path.len() - matched);
        out.push_str(new_prefix);
        out.push_str(&path[matched..]);
        return Some(out);
    }
    let rr = fwd.regex_rewrite.as_ref()?;
    // Envoy's substitution uses \1 for groups; the regex crate uses ${1}.
    let sub = backslash_groups(&rr.substitution);
    Some(rr.pattern.raw.replace_all(path, sub.as_str()).into_owned())
}

fn backslash_groups(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// The `Location` of a redirect.
pub(crate) fn redirect_location(
    r: &model::Redirect,
    m: &model::RouteMatch,
    scheme: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
) -> String {
    let scheme_out = r.scheme_redirect.as_deref().unwrap_or(scheme);
    let mut host_out: String = r.host_redirect.clone().unwrap_or_else(|| host.to_string());
    if let Some(port) = r.port_redirect {
        let bare = strip_port(&host_out).unwrap_or(&host_out).to_string();
        host_out = format!("{bare}:{port}");
    } else if r.scheme_redirect.is_some() && r.host_redirect.is_none() {
        // Changing scheme drops the old scheme's port, as Envoy does.
        if let Some(bare) = strip_port(&host_out) {
            host_out = bare.to_string();
        }
    }
    let mut path_out = if let Some(p) = &r.path_redirect {
        p.clone()
    } else if let Some(pre) = &r.prefix_rewrite {
        let matched = match &m.path {
            PathMatch::Prefix(p) => p.len().min(path.len()),
            _ => path.len(),
        };
        format!("{pre}{}", &path[matched..])
    } else {
        path.to_string()
    };
    // A path_redirect that carries its own query replaces the original one.
    let has_own_query = r.path_redirect.as_deref().is_some_and(|p| p.contains('?'));
    if !r.strip_query
        && !has_own_query
        && let Some(q) = query
    {
        path_out.push('?');
        path_out.push_str(q);
    }
    format!("{scheme_out}://{host_out}{path_out}")
}

#[cfg(test)]
mod tests;

//! Reading the static YAML format into [`Config`], collecting every error on the way.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path as FsPath;
use std::time::Duration;

use crate::config::*;
use crate::decode::{Cidr, Ctx, Obj, Path, enumeration, list, parse_scalar, scalar, socket_addr, string, uint};
use crate::error::{ConfigError, LoadError};
use crate::format::{self, LogFormat};
use crate::traffic::{LbPolicy, RoutingPriority};
use crate::yaml::{self, Kind, Node};

/// Default drain time on SIGTERM.
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(5);
/// Default route timeout, as Envoy's.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<FsPath>) -> Result<Config, LoadError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            file: name.clone(),
            source,
        })?;
        Config::from_yaml(&src, &name)
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn from_yaml(src: &str, file: &str) -> Result<Config, LoadError> {
        let root = yaml::parse(src).map_err(|e| {
            LoadError::Invalid(vec![ConfigError {
                file: file.to_string(),
                line: e.mark.line,
                col: e.mark.col,
                path: "(syntax)".into(),
                reason: e.reason,
            }])
        })?;
        let mut ctx = Ctx::new(file);
        let cfg = decode_config(&mut ctx, &root);
        match cfg {
            Some(cfg) if ctx.errors.is_empty() => Ok(cfg),
            _ => {
                let mut errors = ctx.errors;
                if errors.is_empty() {
                    errors.push(ConfigError {
                        file: file.to_string(),
                        line: root.mark.line,
                        col: root.mark.col,
                        path: "(top level)".into(),
                        reason: "the configuration is empty".into(),
                    });
                }
                errors.sort_by_key(|e| (e.line, e.col));
                Err(LoadError::Invalid(errors))
            }
        }
    }
}

impl crate::policy::Policy {
    /// Reads a file whose top level is `policy: { checks, quotas }` (the check server's input);
    /// relative file names in it resolve against the file's directory.
    pub fn load(path: impl AsRef<FsPath>) -> Result<crate::policy::Policy, LoadError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            file: file.clone(),
            source,
        })?;
        let invalid = |line, col, path: &str, reason: String| {
            LoadError::Invalid(vec![ConfigError {
                file: file.clone(),
                line,
                col,
                path: path.into(),
                reason,
            }])
        };
        let root = yaml::parse(&src).map_err(|e| invalid(e.mark.line, e.mark.col, "(syntax)", e.reason))?;
        let mut ctx = Ctx::new(&file);
        let policy = Obj::open(&mut ctx, &root, &Path::root()).and_then(|mut o| {
            let p = o
                .require(&mut ctx, "policy")
                .and_then(|(n, p)| policy::policy(&mut ctx, n, &p));
            o.finish(&mut ctx);
            p
        });
        match policy {
            Some(p) if ctx.errors.is_empty() => Ok(p),
            _ if ctx.errors.is_empty() => Err(invalid(
                root.mark.line,
                root.mark.col,
                "(top level)",
                "expected `policy: {checks, quotas}`".into(),
            )),
            _ => {
                let mut errors = ctx.errors;
                errors.sort_by_key(|e| (e.line, e.col));
                Err(LoadError::Invalid(errors))
            }
        }
    }
}

fn decode_config(ctx: &mut Ctx, root: &Node) -> Option<Config> {
    let mut o = Obj::open(ctx, root, &Path::root())?;
    // Secrets, then clusters, whatever their place in the file, so references can be checked in place.
    let mut secret_names = HashSet::new();
    let secrets = o.list(ctx, "secrets", |ctx, n, p| {
        let s = tls::secret(ctx, n, p)?;
        if !secret_names.insert(s.name.clone()) {
            ctx.error(n.mark, &p.field("name"), format!("duplicate secret name `{}`", s.name));
        }
        Some(s)
    });
    let secret_refs = tls::SecretNames::new(&secrets);
    let mut names = HashSet::new();
    let clusters = o.list(ctx, "clusters", |ctx, n, p| {
        let c = decode_cluster(ctx, n, p, &secret_refs)?;
        if !names.insert(c.name.clone()) {
            ctx.error(n.mark, &p.field("name"), format!("duplicate cluster name `{}`", c.name));
        }
        Some(c)
    });
    let refs = Refs {
        clusters: &names,
        secrets: &secret_refs,
    };

    let admin = o.get("admin").and_then(|(n, p)| {
        let mut a = Obj::open(ctx, n, &p)?;
        let address = a.require(ctx, "address").and_then(|(n, p)| socket_addr(ctx, n, &p));
        a.finish(ctx);
        Some(Admin { address: address? })
    });
    let drain_time = o.duration(ctx, "drain_time").unwrap_or(DEFAULT_DRAIN_TIME);
    let telemetry = o.get("telemetry").and_then(|(n, p)| telemetry::telemetry(ctx, n, &p));
    let node = o
        .get("node")
        .and_then(|(n, p)| traffic::node(ctx, n, &p))
        .unwrap_or_default();
    let mut listeners: Vec<Listener> = Vec::new();
    for l in o.list(ctx, "listeners", |ctx, n, p| {
        decode_listener(ctx, n, p, &refs).map(|l| (l, n.mark, p.clone()))
    }) {
        let (l, mark, p) = l;
        check_listener_unique(ctx, mark, &p, &l, &listeners, admin.as_ref());
        listeners.push(l);
    }
    o.finish(ctx);
    Some(Config {
        node,
        admin,
        drain_time,
        listeners,
        clusters,
        secrets,
        telemetry,
    })
}

struct Refs<'a> {
    clusters: &'a HashSet<String>,
    secrets: &'a tls::SecretNames,
}

impl Refs<'_> {
    fn cluster(&self, ctx: &mut Ctx, n: &Node, p: &Path) -> Option<String> {
        let name = string(ctx, n, p)?;
        if !self.clusters.contains(&name) {
            let mut known: Vec<&String> = self.clusters.iter().collect();
            known.sort();
            let hint = if known.is_empty() {
                "no clusters are defined".to_string()
            } else {
                format!(
                    "defined clusters: {}",
                    known.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )
            };
            ctx.error(n.mark, p, format!("unknown cluster `{name}` ({hint})"));
            return None;
        }
        Some(name)
    }
}

fn check_listener_unique(
    ctx: &mut Ctx,
    mark: crate::yaml::Mark,
    p: &Path,
    l: &Listener,
    earlier: &[Listener],
    admin: Option<&Admin>,
) {
    for prev in earlier {
        if prev.name == l.name {
            ctx.error(mark, &p.field("name"), format!("duplicate listener name `{}`", l.name));
        }
        if prev.address == l.address && l.address.port() != 0 {
            ctx.error(
                mark,
                &p.field("address"),
                format!(
                    "listener `{}` binds {} which listener `{}` already binds",
                    l.name, l.address, prev.name
                ),
            );
        }
    }
    if let Some(a) = admin
        && a.address == l.address
        && l.address.port() != 0
    {
        ctx.error(mark, &p.field("address"), format!("{} is the admin address", l.address));
    }
}

fn decode_listener(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<Listener> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let address = o.require(ctx, "address").and_then(|(n, p)| socket_addr(ctx, n, &p));
    let listener_filters_timeout = o
        .duration(ctx, "listener_filters_timeout")
        .unwrap_or(Duration::from_secs(15));
    let continue_on_listener_filters_timeout = o.bool(ctx, "continue_on_listener_filters_timeout").unwrap_or(false);
    let use_original_dst = o.bool(ctx, "use_original_dst").unwrap_or(false);
    let bind_to_port = o.bool(ctx, "bind_to_port").unwrap_or(true);
    let lname = name.clone().unwrap_or_default();
    let mut chains: Vec<FilterChain> = Vec::new();
    if let Some((cn, cp)) = o.require(ctx, "filter_chains") {
        let decoded = list(ctx, cn, &cp, &mut |ctx, n, p| {
            decode_chain(ctx, n, p, refs, &lname).map(|c| (c, n.mark, p.clone()))
        });
        if matches!(&cn.kind, Kind::Seq(items) if items.is_empty()) {
            ctx.error(cn.mark, &cp, "a listener needs at least one filter chain");
        }
        for (c, m, p) in decoded {
            for prev in &chains {
                if prev.name == c.name {
                    ctx.error(m, &p.field("name"), format!("duplicate filter chain name `{}`", c.name));
                }
                if prev.filter_chain_match == c.filter_chain_match {
                    ctx.error(
                        m,
                        &p.field("filter_chain_match"),
                        format!(
                            "filter chain `{}` has the same match as `{}`; one of them could never be chosen",
                            c.name, prev.name
                        ),
                    );
                }
            }
            chains.push(c);
        }
    }
    o.finish(ctx);
    Some(Listener {
        name: name?,
        address: address?,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        use_original_dst,
        bind_to_port,
        filter_chains: chains,
    })
}

fn decode_chain(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>, listener: &str) -> Option<FilterChain> {
    let idx = p
        .as_str()
        .rsplit('[')
        .next()
        .and_then(|s| s.trim_end_matches(']').parse::<usize>().ok())
        .unwrap_or(0);
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.string(ctx, "name").unwrap_or_else(|| format!("chain{idx}"));
    let filter_chain_match = match o.get("filter_chain_match") {
        Some((n, p)) => decode_chain_match(ctx, n, &p)?,
        None => FilterChainMatch::default(),
    };
    let tls = o
        .get("tls")
        .and_then(|(n, p)| tls::downstream(ctx, n, &p, refs.secrets));
    if let Some((tn, tp)) = o.get("transport_socket") {
        ctx.error(
            tn.mark,
            &tp,
            "write TLS termination as `tls:` with the DownstreamTlsContext fields (see docs/config.md)",
        );
    }
    let tcp = o.get("tcp_proxy");
    let http = o.get("http");
    let rpc = o.get("rpc");
    let filter = match (tcp, http, rpc) {
        (Some((n, p)), None, None) => NetworkFilter::TcpProxy(decode_tcp_proxy(ctx, n, &p, refs, listener)?),
        (None, Some((n, p)), None) => NetworkFilter::Http(Box::new(decode_hcm(ctx, n, &p, refs, listener)?)),
        (None, None, Some((n, p))) => NetworkFilter::Rpc(Box::new(rpc::rpc_proxy(ctx, n, &p, refs, listener)?)),
        (None, None, None) => {
            ctx.error(o.mark, &o.path, "a filter chain needs `tcp_proxy`, `http` or `rpc`");
            return None;
        }
        _ => {
            ctx.error(
                o.mark,
                &o.path,
                "a filter chain has one of `tcp_proxy`, `http` or `rpc`, not several",
            );
            return None;
        }
    };
    o.finish(ctx);
    Some(FilterChain {
        name,
        filter_chain_match,
        tls,
        filter,
    })
}

fn decode_chain_match(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<FilterChainMatch> {
    let mut o = Obj::open(ctx, n, p)?;
    let m = FilterChainMatch {
        destination_port: o.uint(ctx, "destination_port", 1, 65535),
        server_names: o.list(ctx, "server_names", |ctx, n, p| {
            let s = string(ctx, n, p)?.to_ascii_lowercase();
            let valid_wildcard = s.strip_prefix("*.").is_some_and(|rest| !rest.contains('*'));
            if s.contains('*') && !valid_wildcard {
                ctx.error(
                    n.mark,
                    p,
                    format!("`{s}`: a wildcard server name has the form *.example.com"),
                );
                return None;
            }
            Some(s)
        }),
        transport_protocol: o.get("transport_protocol").and_then(|(n, p)| {
            enumeration(ctx, n, &p, &[("tls", "tls"), ("raw_buffer", "raw_buffer")]).map(str::to_string)
        }),
        application_protocols: o.list(ctx, "application_protocols", string),
        source_prefix_ranges: o.list(ctx, "source_prefix_ranges", |ctx, n, p| {
            parse_scalar(ctx, n, p, "an IP prefix such as 10.0.0.0/8", Cidr::parse)
        }),
    };
    o.finish(ctx);
    Some(m)
}

fn decode_tcp_proxy(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>, listener: &str) -> Option<TcpProxy> {
    let mut o = Obj::open(ctx, n, p)?;
    let stat_prefix = o.string(ctx, "stat_prefix").unwrap_or_else(|| listener.to_string());
    let cluster = o.require(ctx, "cluster").and_then(|(n, p)| refs.cluster(ctx, n, &p));
    let idle_timeout = o.duration(ctx, "idle_timeout").unwrap_or(Duration::from_secs(3600));
    let access_log = o.list(ctx, "access_log", decode_access_log);
    o.finish(ctx);
    Some(TcpProxy {
        stat_prefix,
        cluster: cluster?,
        idle_timeout,
        access_log,
    })
}

fn decode_hcm(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>, listener: &str) -> Option<HttpConnectionManager> {
    let mut o = Obj::open(ctx, n, p)?;
    let stat_prefix = o.string(ctx, "stat_prefix").unwrap_or_else(|| listener.to_string());
    let codec_type = o
        .get("codec_type")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("auto", CodecType::Auto),
                    ("http1", CodecType::Http1),
                    ("http2", CodecType::Http2),
                ],
            )
        })
        .unwrap_or(CodecType::Auto);
    let max_request_headers_kb = o.uint(ctx, "max_request_headers_kb", 1, 8192).unwrap_or(60);
    let max_request_headers_count = o.uint(ctx, "max_request_headers_count", 1, 10_000).unwrap_or(100);
    let request_timeout = o.duration(ctx, "request_timeout").unwrap_or(Duration::ZERO);
    let request_headers_timeout = o.duration(ctx, "request_headers_timeout").unwrap_or(Duration::ZERO);
    let idle_timeout = o.duration(ctx, "idle_timeout").unwrap_or(Duration::from_secs(3600));
    let http2_max_concurrent_streams = o.uint(ctx, "http2_max_concurrent_streams", 1, 1 << 20).unwrap_or(1024);
    let generate_request_id = o.bool(ctx, "generate_request_id").unwrap_or(true);
    let use_remote_address = o.bool(ctx, "use_remote_address").unwrap_or(true);
    let route_config = o
        .require(ctx, "route_config")
        .and_then(|(n, p)| decode_route_config(ctx, n, &p, refs));
    let access_log = o.list(ctx, "access_log", decode_access_log);
    let local_rate_limit = o
        .get("local_rate_limit")
        .and_then(|(n, p)| traffic::local_rate_limit(ctx, n, &p));
    let policy = o
        .get("policy")
        .and_then(|(n, p)| policy::policy(ctx, n, &p))
        .unwrap_or_default();
    let forward_client_cert_details = o
        .get("forward_client_cert_details")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("SANITIZE", ForwardClientCert::Sanitize),
                    ("FORWARD_ONLY", ForwardClientCert::ForwardOnly),
                    ("APPEND_FORWARD", ForwardClientCert::AppendForward),
                    ("SANITIZE_SET", ForwardClientCert::SanitizeSet),
                    ("ALWAYS_FORWARD_ONLY", ForwardClientCert::AlwaysForwardOnly),
                ],
            )
        })
        .unwrap_or(ForwardClientCert::Sanitize);
    let set_current_client_cert_details = o
        .get("set_current_client_cert_details")
        .and_then(|(n, p)| {
            let mut d = Obj::open(ctx, n, &p)?;
            let r = ClientCertDetails {
                subject: d.bool(ctx, "subject").unwrap_or(false),
                cert: d.bool(ctx, "cert").unwrap_or(false),
                chain: d.bool(ctx, "chain").unwrap_or(false),
                dns: d.bool(ctx, "dns").unwrap_or(false),
                uri: d.bool(ctx, "uri").unwrap_or(false),
            };
            if r.chain {
                ctx.error(
                    n.mark,
                    &p.field("chain"),
                    "chain is not supported; `cert` forwards the leaf",
                );
            }
            d.finish(ctx);
            Some(r)
        })
        .unwrap_or_default();
    o.finish(ctx);
    Some(HttpConnectionManager {
        forward_client_cert_details,
        set_current_client_cert_details,
        stat_prefix,
        codec_type,
        max_request_headers_kb,
        max_request_headers_count,
        request_timeout,
        request_headers_timeout,
        idle_timeout,
        http2_max_concurrent_streams,
        generate_request_id,
        use_remote_address,
        route_config: route_config?,
        access_log,
        local_rate_limit,
        policy,
    })
}

fn decode_access_log(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<AccessLog> {
    decode_access_log_with(ctx, n, p, format::DEFAULT_FORMAT)
}

/// An access log whose format defaults to `default` when none is written.
fn decode_access_log_with(ctx: &mut Ctx, n: &Node, p: &Path, default: &str) -> Option<AccessLog> {
    let mut o = Obj::open(ctx, n, p)?;
    let path = o.string(ctx, "path").unwrap_or_else(|| "/dev/stdout".to_string());
    let text = o.get("format");
    let json = o.get("json_format");
    let format = match (text, json) {
        (Some(_), Some(_)) => {
            ctx.error(o.mark, &o.path, "an access log has `format` or `json_format`, not both");
            None
        }
        (Some((n, p)), None) => {
            let s = string(ctx, n, &p)?;
            match format::parse(&s) {
                Ok(tokens) => Some(LogFormat::Text { source: s, tokens }),
                Err(e) => {
                    ctx.error(n.mark, &p, e);
                    None
                }
            }
        }
        (None, Some((n, p))) => {
            let mut fields = Vec::new();
            match &n.kind {
                Kind::Map(entries) => {
                    for (k, v) in entries {
                        let Some(key) = scalar(ctx, k, &p, "a field name") else {
                            continue;
                        };
                        let fp = p.field(key);
                        let Some(src) = string(ctx, v, &fp) else { continue };
                        match format::parse(&src) {
                            Ok(tokens) => fields.push((key.to_string(), src, tokens)),
                            Err(e) => ctx.error(v.mark, &fp, e),
                        }
                    }
                }
                _ => ctx.error(
                    n.mark,
                    &p,
                    format!("expected a mapping of field names to formats, found {}", n.describe()),
                ),
            }
            Some(LogFormat::Json { fields })
        }
        (None, None) => Some(LogFormat::text(default)),
    };
    o.finish(ctx);
    Some(AccessLog { path, format: format? })
}

fn decode_route_config(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<RouteConfig> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.string(ctx, "name").unwrap_or_else(|| "default".to_string());
    let mut virtual_hosts: Vec<VirtualHost> = Vec::new();
    if let Some((n, p)) = o.get("virtual_hosts") {
        let decoded = list(ctx, n, &p, &mut |ctx, n, p| {
            decode_virtual_host(ctx, n, p, refs).map(|v| (v, n.mark, p.clone()))
        });
        for (vh, mark, p) in decoded {
            for d in &vh.domains {
                if let Some(other) = virtual_hosts.iter().find(|o| o.domains.iter().any(|x| x == d)) {
                    ctx.error(
                        mark,
                        &p.field("domains"),
                        format!("domain `{d}` is also claimed by virtual host `{}`", other.name),
                    );
                }
            }
            virtual_hosts.push(vh);
        }
    }
    let (request_headers_to_add, request_headers_to_remove, response_headers_to_add, response_headers_to_remove) =
        header_mutations(ctx, &mut o);
    o.finish(ctx);
    Some(RouteConfig {
        name,
        virtual_hosts,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    })
}

type Mutations = (Vec<HeaderValueOption>, Vec<String>, Vec<HeaderValueOption>, Vec<String>);

fn header_mutations(ctx: &mut Ctx, o: &mut Obj<'_>) -> Mutations {
    (
        o.list(ctx, "request_headers_to_add", decode_header_value_option),
        o.list(ctx, "request_headers_to_remove", header_name),
        o.list(ctx, "response_headers_to_add", decode_header_value_option),
        o.list(ctx, "response_headers_to_remove", header_name),
    )
}

fn header_name(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<String> {
    parse_scalar(ctx, n, p, "a header name", |s| {
        let lower = s.to_ascii_lowercase();
        http_token(&lower).then_some(lower)
    })
}

fn http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub(crate) fn decode_header_value_option(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<HeaderValueOption> {
    let mut o = Obj::open(ctx, n, p)?;
    // Envoy's shape nests the pair under `header`; the flat shape is easier to write by hand.
    let (key, value) = if let Some((hn, hp)) = o.get("header") {
        let mut h = Obj::open(ctx, hn, &hp)?;
        let k = h.require(ctx, "key").and_then(|(n, p)| header_name(ctx, n, &p));
        let v = h.req_string(ctx, "value");
        h.finish(ctx);
        (k, v)
    } else {
        let k = o.require(ctx, "key").and_then(|(n, p)| header_name(ctx, n, &p));
        let v = o.req_string(ctx, "value");
        (k, v)
    };
    let legacy_append = o.bool(ctx, "append");
    let append_action = o
        .get("append_action")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("APPEND_IF_EXISTS_OR_ADD", AppendAction::AppendIfExistsOrAdd),
                    ("ADD_IF_ABSENT", AppendAction::AddIfAbsent),
                    ("OVERWRITE_IF_EXISTS_OR_ADD", AppendAction::OverwriteIfExistsOrAdd),
                    ("OVERWRITE_IF_EXISTS", AppendAction::OverwriteIfExists),
                ],
            )
        })
        .unwrap_or(match legacy_append {
            Some(false) => AppendAction::OverwriteIfExistsOrAdd,
            _ => AppendAction::AppendIfExistsOrAdd,
        });
    if let Some(v) = &value
        && v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
    {
        ctx.error(
            o.mark,
            &o.path.field("value"),
            "header values cannot contain CR, LF or NUL",
        );
        return None;
    }
    o.finish(ctx);
    Some(HeaderValueOption {
        key: key?,
        value: value?,
        append_action,
    })
}

fn decode_virtual_host(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<VirtualHost> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let domains = match o.require(ctx, "domains") {
        Some((n, p)) => list(ctx, n, &p, &mut |ctx, n, p| {
            let d = string(ctx, n, p)?.to_ascii_lowercase();
            let stars = d.matches('*').count();
            let ok = d == "*" || stars == 0 || (stars == 1 && (d.starts_with('*') || d.ends_with('*')) && d.len() > 1);
            if !ok {
                ctx.error(
                    n.mark,
                    p,
                    format!("`{d}`: a domain is exact, `*.suffix`, `prefix.*` or `*`"),
                );
                return None;
            }
            Some(d)
        }),
        None => Vec::new(),
    };
    let routes = o.list(ctx, "routes", |ctx, n, p| decode_route(ctx, n, p, refs));
    let (request_headers_to_add, request_headers_to_remove, response_headers_to_add, response_headers_to_remove) =
        header_mutations(ctx, &mut o);
    o.finish(ctx);
    Some(VirtualHost {
        name: name?,
        domains,
        routes,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    })
}

fn decode_route(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<Route> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.string(ctx, "name");
    let matcher = o
        .require(ctx, "match")
        .and_then(|(n, p)| decode_route_match(ctx, n, &p));
    let route = o.get("route");
    let redirect = o.get("redirect");
    let direct = o.get("direct_response");
    let given = [route.is_some(), redirect.is_some(), direct.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    let action = if given != 1 {
        ctx.error(
            o.mark,
            &o.path,
            "a route has exactly one of `route`, `redirect` or `direct_response`",
        );
        None
    } else if let Some((n, p)) = route {
        decode_forward(ctx, n, &p, refs).map(|f| RouteAction::Route(Box::new(f)))
    } else if let Some((n, p)) = redirect {
        decode_redirect(ctx, n, &p).map(RouteAction::Redirect)
    } else if let Some((n, p)) = direct {
        decode_direct(ctx, n, &p).map(RouteAction::DirectResponse)
    } else {
        None
    };
    let (request_headers_to_add, request_headers_to_remove, response_headers_to_add, response_headers_to_remove) =
        header_mutations(ctx, &mut o);
    let fault = o.get("fault").and_then(|(n, p)| traffic::fault(ctx, n, &p));
    let local_rate_limit = o
        .get("local_rate_limit")
        .and_then(|(n, p)| traffic::local_rate_limit(ctx, n, &p));
    o.finish(ctx);
    Some(Route {
        fault,
        local_rate_limit,
        name,
        matcher: matcher?,
        action: action?,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    })
}

/// Reads a regex written as a string or as Envoy's `{regex: ...}` (with an optional `google_re2: {}`).
fn regex(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Pattern> {
    let (src, mark, path) = match &n.kind {
        Kind::Map(_) => {
            let mut o = Obj::open(ctx, n, p)?;
            let _ = o.get("google_re2");
            let r = o
                .require(ctx, "regex")
                .and_then(|(rn, rp)| string(ctx, rn, &rp).map(|s| (s, rn.mark, rp)));
            o.finish(ctx);
            r?
        }
        _ => (string(ctx, n, p)?, n.mark, p.clone()),
    };
    match Pattern::new(&src) {
        Ok(pat) => Some(pat),
        Err(e) => {
            ctx.error(
                mark,
                &path,
                format!("invalid regex: {}", e.lines().last().unwrap_or(&e)),
            );
            None
        }
    }
}

fn decode_route_match(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<RouteMatch> {
    let mut o = Obj::open(ctx, n, p)?;
    let prefix = o.string(ctx, "prefix");
    let exact = o.string(ctx, "path");
    let re = o.get("safe_regex").map(|(n, p)| regex(ctx, n, &p));
    let triple = o.get("triple").map(|(n, p)| rpc::triple(ctx, n, &p));
    let mut triple_headers = Vec::new();
    let path = match (prefix, exact, re, triple) {
        (Some(s), None, None, None) => Some(PathMatch::Prefix(s)),
        (None, Some(s), None, None) => Some(PathMatch::Path(s)),
        (None, None, Some(r), None) => r.map(PathMatch::SafeRegex),
        (None, None, None, Some(t)) => t.map(|(path, headers)| {
            triple_headers = headers;
            path
        }),
        _ => {
            ctx.error(
                o.mark,
                &o.path,
                "a route match has exactly one of `prefix`, `path`, `safe_regex` or `triple`",
            );
            None
        }
    };
    let case_sensitive = o.bool(ctx, "case_sensitive").unwrap_or(true);
    let mut headers = o.list(ctx, "headers", decode_header_matcher);
    headers.extend(triple_headers);
    let query_parameters = o.list(ctx, "query_parameters", decode_query_matcher);
    // Envoy writes `grpc: {}`; `grpc: true` reads better by hand.
    let grpc = match o.get("grpc") {
        Some((n, _)) if matches!(n.kind, Kind::Map(_)) => true,
        Some((n, p)) => parse_scalar(ctx, n, &p, "true, false or {}", |s| s.parse::<bool>().ok()).unwrap_or(false),
        None => o.has("grpc"),
    };
    o.finish(ctx);
    Some(RouteMatch {
        path: path?,
        case_sensitive,
        headers,
        query_parameters,
        grpc,
    })
}

/// Reads a string matcher from fields of `o`: `exact`, `prefix`, `suffix`, `contains`, `safe_regex`.
/// Returns `Some(None)` when none is given.
fn string_match_fields(ctx: &mut Ctx, o: &mut Obj<'_>) -> Option<Option<StringMatch>> {
    let mut found = Vec::new();
    if let Some(s) = o.string(ctx, "exact") {
        found.push(StringMatch::Exact(s));
    }
    if let Some(s) = o.string(ctx, "prefix") {
        found.push(StringMatch::Prefix(s));
    }
    if let Some(s) = o.string(ctx, "suffix") {
        found.push(StringMatch::Suffix(s));
    }
    if let Some(s) = o.string(ctx, "contains") {
        found.push(StringMatch::Contains(s));
    }
    if let Some((n, p)) = o.get("safe_regex") {
        found.push(StringMatch::SafeRegex(regex(ctx, n, &p)?));
    }
    match found.len() {
        0 => Some(None),
        1 => found.pop().map(Some),
        _ => {
            ctx.error(
                o.mark,
                &o.path,
                "give one of `exact`, `prefix`, `suffix`, `contains` or `safe_regex`",
            );
            None
        }
    }
}

fn decode_string_matcher(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<(StringMatch, bool)> {
    let mut o = Obj::open(ctx, n, p)?;
    let m = string_match_fields(ctx, &mut o)?;
    let ic = o.bool(ctx, "ignore_case").unwrap_or(false);
    let Some(m) = m else {
        ctx.error(
            o.mark,
            &o.path,
            "a string match needs one of `exact`, `prefix`, `suffix`, `contains` or `safe_regex`",
        );
        return None;
    };
    o.finish(ctx);
    Some((m, ic))
}

fn decode_header_matcher(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<HeaderMatcher> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.require(ctx, "name").and_then(|(n, p)| {
        parse_scalar(ctx, n, &p, "a header name", |s| {
            let l = s.to_ascii_lowercase();
            (http_token(&l) || matches!(l.as_str(), ":authority" | ":method" | ":path" | ":scheme")).then_some(l)
        })
    });
    let invert_match = o.bool(ctx, "invert_match").unwrap_or(false);
    let shortcut = string_match_fields(ctx, &mut o)?;
    let ignore_case = o.bool(ctx, "ignore_case").unwrap_or(false);
    let sm = o.get("string_match").map(|(n, p)| decode_string_matcher(ctx, n, &p));
    let present = o.bool(ctx, "present_match");
    let range = o.get("range_match").map(|(n, p)| -> Option<HeaderMatchSpec> {
        let mut r = Obj::open(ctx, n, &p)?;
        let start = r
            .require(ctx, "start")
            .and_then(|(n, p)| parse_scalar(ctx, n, &p, "an integer", |s| s.parse::<i64>().ok()));
        let end = r
            .require(ctx, "end")
            .and_then(|(n, p)| parse_scalar(ctx, n, &p, "an integer", |s| s.parse::<i64>().ok()));
        r.finish(ctx);
        let (start, end) = (start?, end?);
        if start >= end {
            ctx.error(
                n.mark,
                &p,
                format!("range start {start} must be below end {end} (end is exclusive)"),
            );
            return None;
        }
        Some(HeaderMatchSpec::Range { start, end })
    });
    let given = usize::from(shortcut.is_some())
        + usize::from(sm.is_some())
        + usize::from(present.is_some())
        + usize::from(range.is_some());
    let spec = if given > 1 {
        ctx.error(
            o.mark,
            &o.path,
            "a header matcher has one criterion: a string match, `present_match` or `range_match`",
        );
        None
    } else if let Some(m) = shortcut {
        Some(HeaderMatchSpec::String {
            matcher: m,
            ignore_case,
        })
    } else if let Some(sm) = sm {
        sm.map(|(matcher, ignore_case)| HeaderMatchSpec::String { matcher, ignore_case })
    } else if let Some(r) = range {
        r
    } else {
        // Envoy: a matcher with no criterion tests presence.
        Some(HeaderMatchSpec::Present(present.unwrap_or(true)))
    };
    o.finish(ctx);
    Some(HeaderMatcher {
        name: name?,
        spec: spec?,
        invert_match,
    })
}

fn decode_query_matcher(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<QueryParameterMatcher> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let shortcut = string_match_fields(ctx, &mut o)?;
    let ignore_case = o.bool(ctx, "ignore_case").unwrap_or(false);
    let sm = o.get("string_match").map(|(n, p)| decode_string_matcher(ctx, n, &p));
    let present = o.bool(ctx, "present_match");
    if present == Some(false) {
        ctx.error(
            o.mark,
            &o.path.field("present_match"),
            "only `present_match: true` is supported",
        );
    }
    let (string_match, ignore_case) = match (shortcut, sm) {
        (Some(_), Some(_)) => {
            ctx.error(
                o.mark,
                &o.path,
                "give a string match once, either inline or under `string_match`",
            );
            return None;
        }
        (Some(m), None) => (Some(m), ignore_case),
        (None, Some(sm)) => {
            let (m, ic) = sm?;
            (Some(m), ic)
        }
        (None, None) => (None, false),
    };
    o.finish(ctx);
    Some(QueryParameterMatcher {
        name: name?,
        string_match,
        ignore_case,
    })
}

/// `cluster: NAME` or `weighted_clusters: [...]`, exactly one (`what` names the object in errors).
fn cluster_specifier(ctx: &mut Ctx, o: &mut Obj<'_>, refs: &Refs<'_>, what: &str) -> Option<ClusterSpecifier> {
    let single = o.get("cluster");
    let weighted = o.get("weighted_clusters");
    match (single, weighted) {
        (Some((n, p)), None) => refs.cluster(ctx, n, &p).map(ClusterSpecifier::Cluster),
        (None, Some((n, p))) => decode_weighted(ctx, n, &p, refs).map(ClusterSpecifier::WeightedClusters),
        _ => {
            ctx.error(
                o.mark,
                &o.path,
                format!("{what} has exactly one of `cluster` or `weighted_clusters`"),
            );
            None
        }
    }
}

fn decode_forward(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<ForwardAction> {
    let mut o = Obj::open(ctx, n, p)?;
    let cluster = cluster_specifier(ctx, &mut o, refs, "a route action");
    let timeout = o.duration(ctx, "timeout").unwrap_or(DEFAULT_ROUTE_TIMEOUT);
    let prefix_rewrite = o.string(ctx, "prefix_rewrite");
    let regex_rewrite = o.get("regex_rewrite").and_then(|(n, p)| {
        let mut r = Obj::open(ctx, n, &p)?;
        let pattern = r.require(ctx, "pattern").and_then(|(n, p)| regex(ctx, n, &p));
        let substitution = r.req_string(ctx, "substitution");
        r.finish(ctx);
        Some(RegexRewrite {
            pattern: pattern?,
            substitution: substitution?,
        })
    });
    if prefix_rewrite.is_some() && regex_rewrite.is_some() {
        ctx.error(o.mark, &o.path, "give `prefix_rewrite` or `regex_rewrite`, not both");
    }
    let host_rewrite_literal = o.string(ctx, "host_rewrite_literal");
    let auto_host_rewrite = o.bool(ctx, "auto_host_rewrite").unwrap_or(false);
    if host_rewrite_literal.is_some() && auto_host_rewrite {
        ctx.error(
            o.mark,
            &o.path,
            "give `host_rewrite_literal` or `auto_host_rewrite`, not both",
        );
    }
    let metadata_match = o
        .get("metadata_match")
        .map(|(n, p)| traffic::metadata_match(ctx, n, &p))
        .unwrap_or_default();
    let retry_policy = o
        .get("retry_policy")
        .and_then(|(n, p)| traffic::retry_policy(ctx, n, &p));
    let hash_policy = o.list(ctx, "hash_policy", traffic::hash_policy);
    let request_mirror_policies = o.list(ctx, "request_mirror_policies", |ctx, n, p| {
        traffic::mirror_policy(ctx, n, p, refs)
    });
    let (mut max_stream_duration, mut grpc_timeout_header_max) = (Duration::ZERO, Duration::ZERO);
    if let Some((n, p)) = o.get("max_stream_duration")
        && let Some(mut m) = Obj::open(ctx, n, &p)
    {
        max_stream_duration = m.duration(ctx, "max_stream_duration").unwrap_or(Duration::ZERO);
        grpc_timeout_header_max = m.duration(ctx, "grpc_timeout_header_max").unwrap_or(Duration::ZERO);
        m.finish(ctx);
    }
    let grpc_timeout_header = o.bool(ctx, "grpc_timeout_header").unwrap_or(true);
    let priority = o
        .get("priority")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[("DEFAULT", RoutingPriority::Default), ("HIGH", RoutingPriority::High)],
            )
        })
        .unwrap_or_default();
    let per_request_buffer_limit_bytes = o
        .uint(ctx, "per_request_buffer_limit_bytes", 0, 64 * 1024 * 1024)
        .unwrap_or(1024 * 1024);
    o.finish(ctx);
    Some(ForwardAction {
        cluster: cluster?,
        timeout,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite_literal,
        auto_host_rewrite,
        metadata_match,
        retry_policy,
        hash_policy,
        request_mirror_policies,
        max_stream_duration,
        grpc_timeout_header,
        grpc_timeout_header_max,
        priority,
        per_request_buffer_limit_bytes,
    })
}

fn decode_weighted(ctx: &mut Ctx, n: &Node, p: &Path, refs: &Refs<'_>) -> Option<Vec<WeightedCluster>> {
    // Envoy nests the list under `clusters`; a bare list is accepted too.
    let (ln, lp) = match &n.kind {
        Kind::Map(_) => {
            let mut o = Obj::open(ctx, n, p)?;
            let _ = o.uint::<u32>(ctx, "total_weight", 1, u64::from(u32::MAX));
            let r = o.require(ctx, "clusters");
            o.finish(ctx);
            r?
        }
        _ => (n, p.clone()),
    };
    let items = list(ctx, ln, &lp, &mut |ctx, n, p| {
        let mut o = Obj::open(ctx, n, p)?;
        let name = o.require(ctx, "name").and_then(|(n, p)| refs.cluster(ctx, n, &p));
        let weight = o
            .require(ctx, "weight")
            .and_then(|(n, p)| uint(ctx, n, &p, 0, 1_000_000));
        let metadata_match = o
            .get("metadata_match")
            .map(|(n, p)| traffic::metadata_match(ctx, n, &p))
            .unwrap_or_default();
        o.finish(ctx);
        Some(WeightedCluster {
            name: name?,
            weight: weight?,
            metadata_match,
        })
    });
    if items.iter().map(|w| u64::from(w.weight)).sum::<u64>() == 0 {
        ctx.error(ln.mark, &lp, "weighted clusters need a total weight above zero");
        return None;
    }
    Some(items)
}

fn decode_redirect(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Redirect> {
    let mut o = Obj::open(ctx, n, p)?;
    let https = o.bool(ctx, "https_redirect").unwrap_or(false);
    let scheme = o.string(ctx, "scheme_redirect");
    if https && scheme.is_some() {
        ctx.error(o.mark, &o.path, "give `https_redirect` or `scheme_redirect`, not both");
    }
    let path_redirect = o.string(ctx, "path_redirect");
    let prefix_rewrite = o.string(ctx, "prefix_rewrite");
    if path_redirect.is_some() && prefix_rewrite.is_some() {
        ctx.error(o.mark, &o.path, "give `path_redirect` or `prefix_rewrite`, not both");
    }
    let response_code = o
        .get("response_code")
        .and_then(|(n, p)| {
            parse_scalar(
                ctx,
                n,
                &p,
                "MOVED_PERMANENTLY, FOUND, SEE_OTHER, TEMPORARY_REDIRECT, PERMANENT_REDIRECT or 301/302/303/307/308",
                |s| match s.to_ascii_uppercase().as_str() {
                    "MOVED_PERMANENTLY" | "301" => Some(301),
                    "FOUND" | "302" => Some(302),
                    "SEE_OTHER" | "303" => Some(303),
                    "TEMPORARY_REDIRECT" | "307" => Some(307),
                    "PERMANENT_REDIRECT" | "308" => Some(308),
                    _ => None,
                },
            )
        })
        .unwrap_or(301);
    let r = Redirect {
        scheme_redirect: if https { Some("https".into()) } else { scheme },
        host_redirect: o.string(ctx, "host_redirect"),
        port_redirect: o.uint(ctx, "port_redirect", 1, 65535),
        path_redirect,
        prefix_rewrite,
        response_code,
        strip_query: o.bool(ctx, "strip_query").unwrap_or(false),
    };
    o.finish(ctx);
    Some(r)
}

fn decode_direct(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<DirectResponse> {
    let mut o = Obj::open(ctx, n, p)?;
    let status = o.require(ctx, "status").and_then(|(n, p)| uint(ctx, n, &p, 200, 599));
    let body = o.get("body").and_then(|(n, p)| match &n.kind {
        Kind::Map(_) => {
            let mut b = Obj::open(ctx, n, &p)?;
            let s = b.req_string(ctx, "inline_string");
            b.finish(ctx);
            s
        }
        _ => string(ctx, n, &p),
    });
    o.finish(ctx);
    Some(DirectResponse { status: status?, body })
}

fn decode_cluster(ctx: &mut Ctx, n: &Node, p: &Path, secrets: &tls::SecretNames) -> Option<Cluster> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let discovery = o.get("type").and_then(|(n, p)| {
        enumeration(
            ctx,
            n,
            &p,
            &[
                ("static", DiscoveryType::Static),
                ("strict_dns", DiscoveryType::StrictDns),
                ("original_dst", DiscoveryType::OriginalDst),
            ],
        )
    });
    let connect_timeout = o.duration(ctx, "connect_timeout").unwrap_or(Duration::from_secs(5));
    let lb_policy = traffic::lb_policy(ctx, &mut o);
    let protocol = o
        .get("protocol")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("http1", UpstreamProtocol::Http1),
                    ("http2", UpstreamProtocol::Http2),
                    ("downstream", UpstreamProtocol::Downstream),
                ],
            )
        })
        .unwrap_or(UpstreamProtocol::Http1);
    let dns_refresh_rate = o.duration(ctx, "dns_refresh_rate").unwrap_or(Duration::from_secs(5));
    if dns_refresh_rate < Duration::from_millis(1) {
        ctx.error(o.mark, &o.path.field("dns_refresh_rate"), "must be at least 1ms");
    }
    let idle_timeout = o.duration(ctx, "idle_timeout").unwrap_or(Duration::from_secs(3600));
    let http2_max_concurrent_streams = o.uint(ctx, "http2_max_concurrent_streams", 1, 1 << 20).unwrap_or(100);
    let max_requests_per_connection = o
        .uint(ctx, "max_requests_per_connection", 0, u64::from(u32::MAX))
        .unwrap_or(0);
    let health_checks = o.list(ctx, "health_checks", traffic::health_check);
    let outlier_detection = o
        .get("outlier_detection")
        .and_then(|(n, p)| traffic::outlier_detection(ctx, n, &p));
    let circuit_breakers = o
        .get("circuit_breakers")
        .and_then(|(n, p)| traffic::circuit_breakers(ctx, n, &p))
        .unwrap_or_default();
    let slow_start = o.get("slow_start").and_then(|(n, p)| traffic::slow_start(ctx, n, &p));
    if slow_start.is_some() && !matches!(lb_policy, LbPolicy::RoundRobin | LbPolicy::LeastRequest { .. }) {
        ctx.error(
            o.mark,
            &o.path.field("slow_start"),
            "slow start works with round_robin and least_request only",
        );
    }
    let lb_subset_config = o
        .get("lb_subset_config")
        .and_then(|(n, p)| traffic::subset_config(ctx, n, &p))
        .unwrap_or_default();
    let healthy_panic_threshold = o
        .get("healthy_panic_threshold")
        .and_then(|(n, p)| traffic::percentage(ctx, n, &p))
        .unwrap_or(50.0);
    let overprovisioning_factor = o.uint(ctx, "overprovisioning_factor", 100, 100_000).unwrap_or(140);
    let locality_lb = o.bool(ctx, "locality_lb").unwrap_or(true);
    let tls = o.get("tls").and_then(|(n, p)| tls::upstream(ctx, n, &p, secrets));
    if let Some((tn, tp)) = o.get("transport_socket") {
        ctx.error(
            tn.mark,
            &tp,
            "write TLS origination as `tls:` with the UpstreamTlsContext fields (see docs/config.md)",
        );
    }
    let endpoints = o.list(ctx, "endpoints", decode_endpoint);
    let all_ips = endpoints.iter().all(|e| e.host.parse::<IpAddr>().is_ok());
    let discovery = match discovery {
        Some(DiscoveryType::Static) if !all_ips => {
            if let Some((n, p)) = o.get("endpoints") {
                ctx.error(
                    n.mark,
                    &p,
                    "a static cluster's endpoints must be IP addresses; use `type: strict_dns` for host names",
                );
            }
            None
        }
        Some(DiscoveryType::OriginalDst) if !endpoints.is_empty() => {
            if let Some((n, p)) = o.get("endpoints") {
                ctx.error(
                    n.mark,
                    &p,
                    "an original_dst cluster connects to each connection's original destination; it has no endpoints",
                );
            }
            None
        }
        Some(d) => Some(d),
        None if all_ips => Some(DiscoveryType::Static),
        None => Some(DiscoveryType::StrictDns),
    };
    o.finish(ctx);
    Some(Cluster {
        name: name?,
        discovery: discovery?,
        connect_timeout,
        lb_policy,
        protocol,
        dns_refresh_rate,
        idle_timeout,
        http2_max_concurrent_streams,
        max_requests_per_connection,
        health_checks,
        outlier_detection,
        circuit_breakers,
        slow_start,
        lb_subset_config,
        healthy_panic_threshold,
        overprovisioning_factor,
        locality_lb,
        tls,
        endpoints,
    })
}

fn decode_endpoint(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Endpoint> {
    let (addr_node, addr_path, weight, extras) = match &n.kind {
        Kind::Map(_) => {
            let mut o = Obj::open(ctx, n, p)?;
            let a = o.require(ctx, "address");
            let w = o.uint(ctx, "weight", 1, 128).unwrap_or(1);
            let extras = traffic::endpoint_extras(ctx, &mut o);
            o.finish(ctx);
            let (an, ap) = a?;
            (an, ap, w, extras)
        }
        _ => (n, p.clone(), 1, Default::default()),
    };
    let (host, port) = parse_scalar(
        ctx,
        addr_node,
        &addr_path,
        "host:port, e.g. 127.0.0.1:8080, [::1]:8080 or backend.local:80",
        split_host_port,
    )?;
    let (priority, locality, labels) = extras;
    Some(Endpoint {
        host,
        port,
        weight,
        priority,
        locality,
        labels,
    })
}

/// Splits `host:port`; IPv6 hosts are bracketed.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, r) = rest.split_once(']')?;
        (h, r.strip_prefix(':')?)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

mod policy;
mod rpc;
mod telemetry;
mod tls;
mod traffic;

pub use rpc::DEFAULT_RPC_TIMEOUT;

#[cfg(test)]
mod tests;

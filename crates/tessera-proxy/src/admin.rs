//! The admin API, on its own address and on the control runtime (never a worker). Envoy's paths.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::server::Shared;
use crate::util::rfc3339;

const HELP: &str = "admin commands are:
  /: this help
  /ready: LIVE (200) or DRAINING / PRE_INITIALIZING (503)
  /server_info: version, state, uptime, concurrency (JSON)
  /stats: counters and gauges; ?filter=REGEX, ?format=json|prometheus
  /stats/prometheus: Prometheus text format
  /config_dump: the configuration in effect (JSON)
  /clusters: endpoints with health and counters; ?format=json
  /listeners: listeners and their addresses; ?format=json
  /certs: loaded certificates and trust bundles: SANs, serials, expiry (JSON)
  /healthcheck/fail (POST): report DRAINING at /ready
  /healthcheck/ok (POST): report LIVE again
  /drain_listeners (POST): stop accepting and drain connections
  /quitquitquit (POST): drain and exit
";

pub(crate) fn spawn(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    })
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, max-age=0"),
    );
    r
}

fn text(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "text/plain; charset=UTF-8", body)
}

fn json_reply(v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(v).unwrap_or_default(),
    )
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query();
    let post_only = matches!(
        path,
        "/healthcheck/fail" | "/healthcheck/ok" | "/quitquitquit" | "/drain_listeners"
    );
    if post_only && req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=UTF-8",
            "Method GET not allowed, POST required.\n",
        );
    }
    match path {
        "/" | "/help" => text(HELP),
        "/ready" => {
            let s = shared.state();
            let code = if s == crate::ServerState::Live {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(code, "text/plain; charset=UTF-8", format!("{}\n", s.name()))
        }
        "/server_info" => json_reply(&json!({
            "version": env!("CARGO_PKG_VERSION"),
            "state": shared.state().name(),
            "uptime_current_epoch": format!("{}s", shared.started.elapsed().as_secs()),
            "concurrency": shared.concurrency,
        })),
        "/stats" => {
            let filter = match query_param(query, "filter").map(percent_decode) {
                Some(f) => match regex::Regex::new(&f) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            "text/plain; charset=UTF-8",
                            format!("invalid filter regex: {e}\n"),
                        );
                    }
                },
                None => None,
            };
            match query_param(query, "format") {
                Some("json") => json_reply(&shared.stats.render_json(filter.as_ref())),
                Some("prometheus") => reply(StatusCode::OK, "text/plain; version=0.0.4", prometheus(shared)),
                None | Some("text") => text(shared.stats.render_text(filter.as_ref())),
                Some(other) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain; charset=UTF-8",
                    format!("unknown format `{other}`; use json, prometheus or text\n"),
                ),
            }
        }
        "/stats/prometheus" => reply(StatusCode::OK, "text/plain; version=0.0.4", prometheus(shared)),
        "/config_dump" => {
            let cfg = shared.config.load();
            let mut dump = json!({
                "version_info": shared.config_version.load(Ordering::Relaxed).to_string(),
                "last_updated": rfc3339(**shared.config_loaded_at.load()),
                "config": serde_json::to_value(&**cfg).unwrap_or_default(),
            });
            // Under a control plane: every xDS resource with its version and update time, in
            // Envoy's shape (`configs: [ListenersConfigDump, ClustersConfigDump, ...]`).
            if let Some(xds) = shared.xds_dump.load_full() {
                dump["configs"] = xds();
            }
            json_reply(&dump)
        }
        "/clusters" => clusters(shared, query_param(query, "format") == Some("json")),
        "/certs" => json_reply(&certs(shared)),
        "/listeners" => {
            let ls = shared.listeners.load();
            if query_param(query, "format") == Some("json") {
                let v: Vec<_> = ls
                    .iter()
                    .map(|l| json!({"name": l.name, "local_address": {"socket_address": {"address": l.bound.ip().to_string(), "port_value": l.bound.port()}}}))
                    .collect();
                json_reply(&json!({ "listener_statuses": v }))
            } else {
                let mut out = String::new();
                for l in ls.iter() {
                    let _ = writeln!(out, "{}::{}", l.name, l.bound);
                }
                text(out)
            }
        }
        "/healthcheck/fail" => {
            shared.set_healthcheck_failed(true);
            text("OK\n")
        }
        "/healthcheck/ok" => {
            shared.set_healthcheck_failed(false);
            text("OK\n")
        }
        "/drain_listeners" => {
            shared.drain_listeners();
            text("OK\n")
        }
        "/quitquitquit" => {
            shared.quit.notify_one();
            text("OK\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=UTF-8",
            format!("invalid path. {HELP}"),
        ),
    }
}

fn clusters(shared: &Shared, as_json: bool) -> Response<Full<Bytes>> {
    let clusters = shared.clusters.load();
    let l = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    let li = |v: &std::sync::atomic::AtomicI64| v.load(Ordering::Relaxed);
    if as_json {
        let v: Vec<_> = clusters
            .iter()
            .map(|c| {
                let hosts: Vec<_> = c
                    .hosts()
                    .iter()
                    .map(|h| {
                        let s = &h.stats;
                        json!({
                            "address": {"socket_address": {"address": h.addr.ip().to_string(), "port_value": h.addr.port()}},
                            "hostname": h.hostname.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
                            "weight": h.weight,
                            "health_status": {
                                "eds_health_status": "HEALTHY",
                                "failed_active_health_check": h.health.load(Ordering::Relaxed) & crate::cluster::FAILED_ACTIVE_HC != 0,
                                "failed_outlier_check": h.health.load(Ordering::Relaxed) & crate::cluster::FAILED_OUTLIER != 0,
                            },
                            "priority": h.priority,
                            "locality": h.locality,
                            "stats": [
                                {"name": "cx_total", "value": l(&s.cx_total)},
                                {"name": "cx_active", "value": li(&s.cx_active), "type": "GAUGE"},
                                {"name": "cx_connect_fail", "value": l(&s.cx_connect_fail)},
                                {"name": "rq_total", "value": l(&s.rq_total)},
                                {"name": "rq_active", "value": li(&s.rq_active), "type": "GAUGE"},
                                {"name": "rq_success", "value": l(&s.rq_success)},
                                {"name": "rq_error", "value": l(&s.rq_error)},
                                {"name": "rq_timeout", "value": l(&s.rq_timeout)},
                            ],
                        })
                    })
                    .collect();
                json!({"name": c.name(), "host_statuses": hosts})
            })
            .collect();
        return json_reply(&json!({ "cluster_statuses": v }));
    }
    let mut out = String::new();
    for c in clusters.iter() {
        let n = c.name();
        let _ = writeln!(out, "{n}::observability_name::{n}");
        for h in c.hosts().iter() {
            let s = &h.stats;
            let a = h.addr;
            let _ = writeln!(out, "{n}::{a}::cx_active::{}", li(&s.cx_active));
            let _ = writeln!(out, "{n}::{a}::cx_connect_fail::{}", l(&s.cx_connect_fail));
            let _ = writeln!(out, "{n}::{a}::cx_total::{}", l(&s.cx_total));
            let _ = writeln!(out, "{n}::{a}::rq_active::{}", li(&s.rq_active));
            let _ = writeln!(out, "{n}::{a}::rq_error::{}", l(&s.rq_error));
            let _ = writeln!(out, "{n}::{a}::rq_success::{}", l(&s.rq_success));
            let _ = writeln!(out, "{n}::{a}::rq_timeout::{}", l(&s.rq_timeout));
            let _ = writeln!(out, "{n}::{a}::rq_total::{}", l(&s.rq_total));
            let _ = writeln!(
                out,
                "{n}::{a}::hostname::{}",
                h.hostname.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("")
            );
            let _ = writeln!(out, "{n}::{a}::health_flags::{}", h.health_text());
            let _ = writeln!(out, "{n}::{a}::priority::{}", h.priority);
            if let Some(l) = &h.locality {
                let _ = writeln!(out, "{n}::{a}::region::{}", l.region);
                let _ = writeln!(out, "{n}::{a}::zone::{}", l.zone);
                let _ = writeln!(out, "{n}::{a}::sub_zone::{}", l.sub_zone);
            }
            let _ = writeln!(out, "{n}::{a}::weight::{}", h.weight);
        }
    }
    text(out)
}

/// Every loaded certificate and trust bundle, in the spirit of Envoy's `/certs`.
fn certs(shared: &Shared) -> serde_json::Value {
    use crate::tls::secrets::Material;
    use crate::tls::x509::{CertInfo, rfc3339};
    let now = crate::tls::secrets::now_secs();
    let cert = |c: &CertInfo| {
        let mut sans = Vec::new();
        sans.extend(c.uri.iter().map(|u| json!({ "uri": u })));
        sans.extend(c.dns.iter().map(|d| json!({ "dns": d })));
        sans.extend(c.ip.iter().map(|i| json!({ "ip_address": i.to_string() })));
        sans.extend(c.email.iter().map(|e| json!({ "email": e })));
        json!({
            "serial_number": c.serial,
            "subject": c.subject,
            "issuer": c.issuer,
            "subject_alt_names": sans,
            "valid_from": rfc3339(c.not_before),
            "expiration_time": rfc3339(c.not_after),
            "days_until_expiration": (c.not_after - now).div_euclid(86_400),
        })
    };
    let list: Vec<_> = shared
        .secrets
        .load()
        .iter()
        .map(|s| {
            let mut v = json!({ "name": s.name, "version": s.version() });
            match s.material().as_deref() {
                Some(Material::Cert(c)) => {
                    let mut chain = vec![cert(&c.leaf)];
                    chain.extend(c.chain.iter().map(cert));
                    v["cert_chain"] = json!(chain);
                }
                Some(Material::Ca(c)) => {
                    v["ca_cert"] = json!(c.certs.iter().map(cert).collect::<Vec<_>>());
                }
                None => {}
            }
            if let Some(e) = s.last_error.load().as_deref() {
                v["last_update_error"] = json!(e);
            }
            v
        })
        .collect();
    json!({ "certificates": list })
}

/// The stats registry, then Report's Istio metrics when `telemetry` is on.
fn prometheus(shared: &Shared) -> String {
    let mut out = shared.stats.render_prometheus();
    if let Some(r) = &shared.report {
        r.render_prometheus(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(query_param(Some("a=1&format=json"), "format"), Some("json"));
        assert_eq!(query_param(Some("usedonly"), "usedonly"), Some(""));
        assert_eq!(query_param(None, "x"), None);
        assert_eq!(percent_decode("cluster%5C.web+x%"), "cluster\\.web x%");
    }
}

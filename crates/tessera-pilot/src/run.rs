//! Pilot running: the file registry read on change, a debounced push of the translated
//! resources to every connected sidecar through the snapshot-cache ADS server.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tessera_xds::server::AdsServer;

use crate::config::Config;
use crate::model::Snapshot;

/// Starts the ADS server for `cfg`. Call outside any async runtime: the server runs one of its own.
pub fn listen(cfg: &Config) -> Result<AdsServer, Error> {
    AdsServer::start_on(cfg.xds_listen).map_err(|source| Error::Listen {
        addr: cfg.xds_listen,
        source,
    })
}

/// Why Pilot could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened.
    #[error("{0}")]
    Store(crate::store::StoreError),
    /// The ADS server or the admin API could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Push timings, for `/metrics`.
#[derive(Default)]
struct Metrics {
    /// Computing and setting a push.
    push: std::sync::Mutex<tessera_xds::server::Histogram>,
    /// From the first change to its push (the debounce).
    wait: std::sync::Mutex<tessera_xds::server::Histogram>,
    pushes: std::sync::atomic::AtomicU64,
}

impl Metrics {
    fn observe_push(&self, took: Duration, waited: Duration) {
        self.push
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(took);
        self.wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(waited);
        self.pushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn render(&self, ads: &AdsServer) -> String {
        use std::fmt::Write;
        let mut out = ads.metrics_text();
        let _ = writeln!(
            out,
            "# TYPE pilot_push_triggers counter\npilot_push_triggers {}",
            self.pushes.load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE pilot_xds_groups gauge\npilot_xds_groups {}",
            ads.groups().len()
        );
        self.push
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .render("pilot_xds_push_time", &mut out);
        self.wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .render("pilot_debounce_time", &mut out);
        out
    }
}

/// What the admin API reads.
struct AdminView {
    ads: std::sync::Arc<AdsServer>,
    metrics: std::sync::Arc<Metrics>,
    registries: Vec<(&'static str, tokio::sync::watch::Receiver<crate::registry::Status>)>,
}

impl AdminView {
    fn registryz(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.registries
                .iter()
                .map(|(kind, st)| {
                    let st = st.borrow().clone();
                    serde_json::json!({"kind": kind, "connected": st.connected, "last_error": st.last_error, "updates": st.updates})
                })
                .collect(),
        )
    }
}

/// The admin API: `/debug/syncz` (every connected sidecar: node, group, mode, per type the
/// version ACKed and the last NACK), `/debug/registryz` (each registry adapter's connection),
/// `/metrics` (Prometheus text) and `/ready`.
async fn admin(listener: tokio::net::TcpListener, view: std::sync::Arc<AdminView>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let view = view.clone();
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/debug/syncz" => (
                            200,
                            "application/json",
                            serde_json::to_string_pretty(&view.ads.syncz()).unwrap_or_default(),
                        ),
                        "/debug/registryz" => (
                            200,
                            "application/json",
                            serde_json::to_string_pretty(&view.registryz()).unwrap_or_default(),
                        ),
                        "/metrics" => (200, "text/plain; version=0.0.4", view.metrics.render(&view.ads)),
                        "/ready" => (200, "text/plain", "LIVE\n".to_string()),
                        _ => (
                            404,
                            "text/plain",
                            "paths: /debug/syncz, /debug/registryz, /metrics, /ready\n".to_string(),
                        ),
                    };
                    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(ctype),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn push_settings<'a>(
    cfg: &'a Config,
    translate: &'a dyn Fn(&Snapshot, std::net::SocketAddr) -> crate::translate::Resources,
    rbac: &'a crate::sidecar::RbacFor<'a>,
) -> crate::push::Settings<'a> {
    crate::push::Settings {
        rbac,
        imports: &cfg.imports,
        outbound_http: cfg.sidecar.outbound_http,
        outbound_dubbo: cfg.outbound_dubbo,
        translate,
    }
}

/// Feeds `ads` from the registries (and serves the admin API) until the future is dropped.
pub async fn run(cfg: Config, ads: AdsServer) -> Result<(), Error> {
    let ads = std::sync::Arc::new(ads);
    // Sidecars are grouped by namespace and inbound ports; the logs of every request are for tests.
    ads.set_scoper(std::sync::Arc::new(|n| crate::scope::Group::of(n).key()));
    ads.keep_log(false);
    let metrics = std::sync::Arc::new(Metrics::default());
    let api = match (&cfg.store, &cfg.store_etcd) {
        (_, Some(etcd)) => crate::api::ApiRegistry::etcd(etcd),
        (Some(path), None) => crate::api::ApiRegistry::open(path).map_err(Error::Store)?,
        (None, None) => crate::api::ApiRegistry::new(),
    };
    let mut api_changed = api.subscribe();
    if let Some(at) = cfg.api {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|source| Error::Listen { addr: at, source })?;
        let bound = l.local_addr().unwrap_or(at);
        tracing::info!(address = %bound, "pilot registry API ready");
        tokio::spawn(crate::api::serve(l, api.clone()));
    }
    // Registry adapters: each runs as a task and publishes whole views.
    let mut feeds = Vec::new();
    for a in &cfg.adapters {
        let (feed, view, status) = crate::registry::Feed::new();
        tracing::info!(kind = a.kind(), "registry adapter starting");
        feeds.push((a.kind(), view, status));
        tokio::spawn(a.clone().run(feed));
    }
    if let Some(at) = cfg.admin {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|source| Error::Listen { addr: at, source })?;
        let bound = l.local_addr().unwrap_or(at);
        tracing::info!(address = %bound, "pilot admin API ready");
        let view = AdminView {
            ads: ads.clone(),
            metrics: metrics.clone(),
            registries: feeds.iter().map(|(k, _, st)| (*k, st.clone())).collect(),
        };
        tokio::spawn(admin(l, std::sync::Arc::new(view)));
    }
    let mut adapter_woke = false;
    let mut api_seen = 0u64;
    let mut files = crate::file::DirWatch::new("registry");
    let mut pusher = crate::push::Pusher::default();
    let mut groups_changed = ads.watch_groups();
    // Istio traffic config (`config.dir`): read on change, translated with every snapshot; what
    // it refers to that does not exist is logged once per config.
    let mut istio_files = crate::istio::Watch::default();
    let mut istio_read: Option<Instant> = None;
    let istio = std::sync::Mutex::new(crate::istio::Config::default());
    let istio_logged = std::sync::Mutex::new(std::collections::BTreeSet::<String>::new());
    let translate = |s: &Snapshot, outbound_http: std::net::SocketAddr| {
        let mut sidecar = cfg.sidecar.clone();
        sidecar.outbound_http = outbound_http;
        let (r, problems) = crate::translate::translate_with(
            s,
            &istio.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            &sidecar,
        );
        let mut logged = istio_logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in problems {
            let p = p.to_string();
            if logged.insert(p.clone()) {
                tracing::warn!("Istio config: {p}");
            }
        }
        r
    };
    // AuthorizationPolicy on the inbound listeners of the workloads it selects.
    let rbac = |labels: &BTreeMap<String, String>, ns: &str| {
        istio
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rbac_for(labels, ns)
    };
    let mut current = Snapshot::default();
    let mut pending_since: Option<Instant> = None;
    let mut last_change = Instant::now();
    loop {
        api.expire(Instant::now());
        let api_now = *api_changed.borrow_and_update();
        let files_changed = cfg.file_dir.as_ref().is_some_and(|dir| {
            files.refresh(dir, |text, file| {
                crate::file::parse(text, file, &format!("file:{file}"))
            })
        });
        if let Some(dir) = &cfg.istio_dir
            && istio_read.is_none_or(|t| t.elapsed() >= cfg.istio_watch_interval)
        {
            istio_read = Some(Instant::now());
            if istio_files.refresh(dir) {
                *istio.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = istio_files.config();
                istio_logged
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                last_change = Instant::now();
                pending_since.get_or_insert(last_change);
            }
        }
        // A wake-up by an adapter consumed its change (`changed()` marks the view seen).
        let mut adapters_changed = std::mem::take(&mut adapter_woke);
        for (_, view, _) in &mut feeds {
            if view.has_changed().unwrap_or(false) {
                view.mark_unchanged();
                adapters_changed = true;
            }
        }
        if files_changed || api_now != api_seen || adapters_changed {
            api_seen = api_now;
            let (mut snap, clashes) = crate::file::merge(&files.good);
            for c in clashes {
                tracing::warn!("{c}");
            }
            // Registrations through the API join what the files define; a file's service wins.
            let registered = api.snapshot();
            for (k, svc) in registered.services {
                if snap.services.contains_key(&k) {
                    tracing::warn!(service = %k, "registered through the API and defined by a file; the file's definition is used");
                    continue;
                }
                snap.instances
                    .insert(k.clone(), registered.instances.get(&k).cloned().unwrap_or_default());
                snap.services.insert(k, svc);
            }
            // Then each adapter's view; the first registry to define a service keeps it.
            for (kind, view, _) in &feeds {
                let view = view.borrow().clone();
                for (k, svc) in &view.services {
                    if let Some(first) = snap.services.get(k) {
                        tracing::warn!(service = %k, registry = kind, defined_by = %first.source, "service already defined by another registry; this registry's definition is ignored");
                        continue;
                    }
                    snap.instances
                        .insert(k.clone(), view.instances.get(k).cloned().unwrap_or_default());
                    snap.services.insert(k.clone(), svc.clone());
                }
            }
            if snap != current {
                current = snap;
                last_change = Instant::now();
                pending_since.get_or_insert(last_change);
            }
        }
        // Debounce: push after a quiet period, or when a change has waited long enough.
        if let Some(since) = pending_since
            && (last_change.elapsed() >= cfg.debounce || since.elapsed() >= cfg.debounce_max)
        {
            let started = Instant::now();
            let p = pusher.push(&ads, &current, &push_settings(&cfg, &translate, &rbac), false);
            metrics.observe_push(started.elapsed(), since.elapsed());
            crate::push::log(&p, current.services.len(), Some(since.elapsed()), started);
            pending_since = None;
        }
        let tick = if pending_since.is_some() {
            cfg.debounce.min(Duration::from_millis(50))
        } else {
            // Often enough for TTLs to lapse on time.
            cfg.watch_interval.min(Duration::from_millis(500))
        };
        let adapter_changed = async {
            if feeds.is_empty() {
                std::future::pending::<()>().await;
            }
            let waits = feeds.iter_mut().map(|(_, v, _)| Box::pin(v.changed()));
            let _ = futures_select_any(waits).await;
        };
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = api_changed.changed() => {}
            () = adapter_changed => adapter_woke = true,
            _ = groups_changed.changed() => {
                // A sidecar of a new group connected: compute its group now, not at the next change.
                groups_changed.mark_unchanged();
                let started = Instant::now();
                let p = pusher.push(&ads, &current, &push_settings(&cfg, &translate, &rbac), true);
                crate::push::log(&p, current.services.len(), None, started);
            }
        }
    }
}

/// Resolves when the first of `futs` does.
async fn futures_select_any<F: Future + Unpin>(futs: impl Iterator<Item = F>) -> Option<F::Output> {
    let mut futs: Vec<F> = futs.collect();
    if futs.is_empty() {
        return None;
    }
    std::future::poll_fn(|cx| {
        for f in &mut futs {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(Some(v));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

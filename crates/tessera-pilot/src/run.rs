//! Pilot running: the file registry read on change, a debounced push of the translated
//! resources to every connected sidecar through the snapshot-cache ADS server.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
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

/// The registry files as last read: content (to notice changes) and what they gave.
#[derive(Default)]
struct Files {
    seen: BTreeMap<PathBuf, Vec<u8>>,
    good: BTreeMap<PathBuf, Snapshot>,
}

impl Files {
    /// Reads the directory; true when anything changed. Problems are logged; a bad file keeps
    /// its last good content.
    fn refresh(&mut self, dir: &std::path::Path) -> bool {
        let list = match crate::file::files(dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the registry directory; keeping what was read before");
                return false;
            }
        };
        let mut changed = false;
        let gone: Vec<PathBuf> = self.seen.keys().filter(|p| !list.contains(p)).cloned().collect();
        for p in gone {
            self.seen.remove(&p);
            self.good.remove(&p);
            changed = true;
        }
        for p in list {
            let Ok(bytes) = std::fs::read(&p) else { continue };
            if self.seen.get(&p) == Some(&bytes) {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            self.seen.insert(p.clone(), bytes);
            let file = p.display().to_string();
            match crate::file::parse(&text, &file, &format!("file:{file}")) {
                Ok(s) => {
                    self.good.insert(p, s);
                    changed = true;
                }
                Err(problems) => {
                    for pr in problems {
                        tracing::error!("registry file rejected; its last good content stays: {pr}");
                    }
                }
            }
        }
        changed
    }
}

/// The admin API: `/debug/syncz` (every connected sidecar: node, mode, per type the version
/// ACKed and the last NACK) and `/ready`.
async fn admin(listener: tokio::net::TcpListener, ads: std::sync::Arc<AdsServer>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ads = ads.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let ads = ads.clone();
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/debug/syncz" => (
                            200,
                            "application/json",
                            serde_json::to_string_pretty(&ads.syncz()).unwrap_or_default(),
                        ),
                        "/ready" => (200, "text/plain", "LIVE\n".to_string()),
                        _ => (404, "text/plain", "paths: /debug/syncz, /ready\n".to_string()),
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

/// Feeds `ads` from the registries (and serves the admin API) until the future is dropped.
pub async fn run(cfg: Config, ads: AdsServer) -> Result<(), Error> {
    let ads = std::sync::Arc::new(ads);
    if let Some(at) = cfg.admin {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|source| Error::Listen { addr: at, source })?;
        let bound = l.local_addr().unwrap_or(at);
        tracing::info!(address = %bound, "pilot admin API ready");
        tokio::spawn(admin(l, ads.clone()));
    }
    let api = match &cfg.store {
        Some(path) => crate::api::ApiRegistry::open(path).map_err(Error::Store)?,
        None => crate::api::ApiRegistry::new(),
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
    let mut api_seen = 0u64;
    let mut files = Files::default();
    let mut version = 0u64;
    let mut current = Snapshot::default();
    let mut pending_since: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut last: BTreeMap<&'static str, Vec<envoy_types::pb::google::protobuf::Any>> = BTreeMap::new();
    loop {
        api.expire(Instant::now());
        let api_now = *api_changed.borrow_and_update();
        let files_changed = cfg.file_dir.as_ref().is_some_and(|dir| files.refresh(dir));
        let mut adapters_changed = false;
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
            version += 1;
            let started = Instant::now();
            let r = crate::translate::translate(&current, &cfg.sidecar).by_type();
            let v = version.to_string();
            // Only the types whose resources changed are pushed: an instance change is EDS alone.
            let mut changed: Vec<(&str, &str, Vec<envoy_types::pb::google::protobuf::Any>)> = Vec::new();
            for (t, res) in r {
                if last.get(t) != Some(&res) {
                    last.insert(t, res.clone());
                    changed.push((t, v.as_str(), res));
                }
            }
            let types: Vec<&str> = changed
                .iter()
                .map(|(t, _, _)| t.rsplit('.').next().unwrap_or(t))
                .collect();
            tracing::info!(
                version,
                services = current.services.len(),
                types = %types.join(","),
                waited = ?since.elapsed(),
                translate = ?started.elapsed(),
                "pushed"
            );
            if !changed.is_empty() {
                ads.set_all(changed);
            }
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
            () = adapter_changed => {}
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

//! Pilot running: the file registry read on change, a debounced push of the translated
//! resources to every connected sidecar through the snapshot-cache ADS server.

use std::collections::BTreeMap;
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
    /// The ADS server could not listen.
    #[error("xds.listen {addr}: {source}")]
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

/// Feeds `ads` from the registries until the future is dropped.
pub async fn run(cfg: Config, ads: AdsServer) {
    let mut files = Files::default();
    let mut version = 0u64;
    let mut current = Snapshot::default();
    let mut pending_since: Option<Instant> = None;
    let mut last_change = Instant::now();
    loop {
        if let Some(dir) = &cfg.file_dir
            && files.refresh(dir)
        {
            let (snap, clashes) = crate::file::merge(&files.good);
            for c in clashes {
                tracing::warn!("{c}");
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
            let r = crate::translate::translate(&current, &cfg.sidecar);
            let v = version.to_string();
            ads.set_all(r.by_type().into_iter().map(|(t, res)| (t, v.as_str(), res)).collect());
            tracing::info!(
                version,
                services = current.services.len(),
                waited = ?since.elapsed(),
                translate = ?started.elapsed(),
                "pushed"
            );
            pending_since = None;
        }
        let tick = if pending_since.is_some() {
            cfg.debounce.min(Duration::from_millis(50))
        } else {
            cfg.watch_interval
        };
        tokio::time::sleep(tick).await;
    }
}

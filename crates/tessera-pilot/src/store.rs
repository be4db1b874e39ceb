//! The embedded store: what the registry API was given (services, and instances without a TTL)
//! persisted in a local redb file, so registrations survive a restart. Ephemeral instances live
//! in memory only and come back with their clients' next registration, as in SOFARegistry and
//! Nacos. Writes go to a thread of their own (a commit waits for the disk), never an async task.

use std::path::Path;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// `namespace/name` → the service's JSON body (`{ports, labels}`).
const SERVICES: TableDefinition<'_, &str, &str> = TableDefinition::new("services");
/// `namespace/name/id` → the instance's JSON body.
const INSTANCES: TableDefinition<'_, &str, &str> = TableDefinition::new("instances");

/// A change to persist.
#[derive(Debug)]
pub(crate) enum Op {
    /// A service's body under `ns/name`.
    PutService(String, String),
    /// The service and its instances are gone.
    DeleteService(String),
    /// An instance's body under `ns/name/id`.
    PutInstance(String, String),
    /// An instance is gone.
    DeleteInstance(String),
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("store {path}: {reason}")]
pub struct StoreError {
    /// The file.
    pub path: String,
    /// What failed.
    pub reason: String,
}

/// What the file held at start: `(key, body)` for services and instances.
pub(crate) type Loaded = (Vec<(String, String)>, Vec<(String, String)>);

/// Opens (or creates) the file, reads what it holds, and starts the writer thread.
pub(crate) fn open(path: &Path) -> Result<(Loaded, mpsc::Sender<Op>), StoreError> {
    let err = |e: &dyn std::fmt::Display| StoreError {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let db = Database::create(path).map_err(|e| err(&e))?;
    // Make sure both tables exist, so the first read finds them.
    {
        let tx = db.begin_write().map_err(|e| err(&e))?;
        tx.open_table(SERVICES).map_err(|e| err(&e))?;
        tx.open_table(INSTANCES).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
    }
    let read = |def: TableDefinition<'_, &str, &str>| -> Result<Vec<(String, String)>, StoreError> {
        let tx = db.begin_read().map_err(|e| err(&e))?;
        let t = tx.open_table(def).map_err(|e| err(&e))?;
        let mut out = Vec::new();
        for e in t.iter().map_err(|e| err(&e))? {
            let (k, v) = e.map_err(|e| err(&e))?;
            out.push((k.value().to_string(), v.value().to_string()));
        }
        Ok(out)
    };
    let loaded = (read(SERVICES)?, read(INSTANCES)?);
    let (tx, rx) = mpsc::channel::<Op>();
    let file = path.display().to_string();
    std::thread::Builder::new()
        .name("pilot-store".into())
        .spawn(move || writer(db, rx, file))
        .map_err(|e| err(&e))?;
    Ok((loaded, tx))
}

/// Commits what arrives, a batch per commit, until every sender is gone.
fn writer(db: Database, rx: mpsc::Receiver<Op>, file: String) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let r = (|| -> Result<(), Box<dyn std::error::Error>> {
            let tx = db.begin_write()?;
            {
                let mut services = tx.open_table(SERVICES)?;
                let mut instances = tx.open_table(INSTANCES)?;
                for op in &batch {
                    match op {
                        Op::PutService(k, v) => {
                            services.insert(k.as_str(), v.as_str())?;
                        }
                        Op::DeleteService(k) => {
                            services.remove(k.as_str())?;
                            let prefix = format!("{k}/");
                            let gone: Vec<String> = instances
                                .iter()?
                                .filter_map(Result::ok)
                                .map(|(k, _)| k.value().to_string())
                                .filter(|k| k.starts_with(&prefix))
                                .collect();
                            for g in gone {
                                instances.remove(g.as_str())?;
                            }
                        }
                        Op::PutInstance(k, v) => {
                            instances.insert(k.as_str(), v.as_str())?;
                        }
                        Op::DeleteInstance(k) => {
                            instances.remove(k.as_str())?;
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = r {
            // The registration stands in memory; it would be lost on restart. Said loudly.
            tracing::error!(store = %file, error = %e, changes = batch.len(), "cannot persist registrations");
        }
    }
}

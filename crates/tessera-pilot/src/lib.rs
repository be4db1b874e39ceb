//! Pilot (issue 9, first slice): one service model ([`model`]) fed by registries (so far the
//! file registry, [`file`], and the Open Service Registry REST API, [`api`]), translated into Envoy resources ([`translate`]) and served over ADS
//! (state of the world and delta) from `tessera_xds::server`, with debounced pushes ([`run`]).
//!
//! Not built yet (issue 9): the embedded redb / etcd store, the registry API's gRPC part, the
//! ZooKeeper and etcd adapters, Istio traffic configuration, per-node scoping, push metrics,
//! `/debug/syncz`, TCP and RPC ports in the generated sidecar config.

pub mod api;
pub mod config;
pub mod file;
pub mod model;
pub mod registry;
pub mod run;
pub mod store;
pub mod translate;

/// One thing wrong in a file, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {path}: {reason}")]
pub struct Problem {
    /// The file.
    pub file: String,
    /// Where in it, e.g. `services[0].ports[1].protocol`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

//! Pilot (issue 9): one service model ([`model`]) fed by registries (the file registry,
//! [`file`]; the Open Service Registry API, [`api`], REST and gRPC, on an embedded redb [`store`] or on
//! [`etcd`]; and adapters behind [`registry::Adapter`]: [`zookeeper`] for Dubbo, [`etcd`]),
//! Istio traffic configuration ([`istio`]), translated per group of sidecars ([`scope`],
//! [`translate`], [`sidecar`], [`push`]) into Envoy resources served over ADS (state of the world
//! and delta) from `tessera_xds::server`, with debounced pushes and metrics ([`run`]).
//!
//! Not built yet: Consul/Nacos/Eureka/SOFARegistry/Kubernetes
//! adapters, outbound TCP and Bolt listeners, workload certificates (docs/pilot.md).

pub mod api;
pub mod config;
pub mod etcd;
pub mod file;
pub mod istio;
pub mod model;
pub mod push;
pub mod registry;
pub mod run;
pub mod scope;
pub mod sidecar;
pub mod store;
pub mod translate;
pub mod zookeeper;

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

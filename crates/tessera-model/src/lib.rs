//! The one internal configuration model of Tessera: listeners, filter chains, routes, clusters
//! and endpoints, their validation, and the static YAML format.
//!
//! This crate owns *what* the configuration is. It must not know about sockets, runtimes or
//! protobuf: the proxy turns a [`Config`] into running state, and the xDS crate translates
//! Envoy's protos into it at its own boundary.

mod config;
mod decode;
mod error;
pub mod format;
mod load;
mod mesh;
mod policy;
mod rpc;
pub mod telemetry;
mod time;
mod tls;
mod traffic;
mod yaml;

pub use config::*;
pub use decode::{Cidr, parse_duration};
pub use error::{ConfigError, LoadError};
pub use format::LogFormat;
pub use load::{DEFAULT_DRAIN_TIME, DEFAULT_ROUTE_TIMEOUT, DEFAULT_RPC_TIMEOUT, split_host_port};
pub use mesh::{ClientSpec, MeshSpec, PilotSpec, SampleProtocol, SampleService, SidecarSpec};
pub use policy::*;
pub use rpc::*;
pub use time::{rfc3339, rfc3339_secs};
pub use tls::*;
pub use traffic::*;
pub use yaml::Mark;

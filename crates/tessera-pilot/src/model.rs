//! The service model every registry maps into: services with ports and protocols, and the
//! instances that serve them, each remembering which source registered it.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// What a port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1.
    Http,
    /// HTTP/2 (h2c between sidecar and instance).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Plain TCP.
    Tcp,
    /// SOFA Bolt.
    Bolt,
    /// Dubbo.
    Dubbo,
}

impl Protocol {
    /// The names a file may use.
    pub const NAMES: &'static [(&'static str, Protocol)] = &[
        ("http", Protocol::Http),
        ("http2", Protocol::Http2),
        ("grpc", Protocol::Grpc),
        ("tcp", Protocol::Tcp),
        ("bolt", Protocol::Bolt),
        ("dubbo", Protocol::Dubbo),
    ];

    /// The name files and the APIs use for it.
    pub fn name(self) -> &'static str {
        Protocol::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("http", |(n, _)| n)
    }

    /// Served through the sidecar's HTTP listener.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Name, unique in the service (`http`, `grpc-web`...).
    pub name: String,
    /// The port clients call.
    pub port: u16,
    /// What it speaks.
    pub protocol: Protocol,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name, unique in the namespace.
    pub name: String,
    /// Ports.
    pub ports: Vec<Port>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Which registry defined it (`file:<path>`...).
    pub source: String,
}

impl Service {
    /// Istio's host name: `name.namespace.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Address.
    pub address: IpAddr,
    /// Port per service port name.
    pub ports: BTreeMap<String, u16>,
    /// Labels (subsets select on them).
    pub labels: BTreeMap<String, String>,
    /// Load-balancing weight, 1 to 128.
    pub weight: u32,
    /// False: left out of EDS.
    pub healthy: bool,
    /// Region / zone / sub-zone.
    pub locality: Option<(String, String, String)>,
    /// Which registry registered it.
    pub source: String,
}

/// Everything the registries know, at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By `namespace/name`.
    pub services: BTreeMap<String, Service>,
    /// By `namespace/name`, the service's instances.
    pub instances: BTreeMap<String, std::sync::Arc<Vec<Instance>>>,
}

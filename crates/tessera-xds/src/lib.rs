//! xDS at the boundary (issue 8): Envoy v3 resources, as `envoy-types` decodes them, converted into
//! `tessera-model`. Every conversion reports all it cannot honour at once, each with the field
//! path and the reason, so a NACK (or a bootstrap rejection) says exactly what to change.
//!
//! Built so far: [`load`] (YAML/JSON bootstraps through Envoy's descriptors), [`bootstrap`]
//! (node, admin, static resources, cross references), [`listener`] (filter chains, the HTTP
//! connection manager with inline routes, the TCP proxy), [`route`] and [`cluster`] (STATIC and
//! STRICT_DNS with inline endpoints). docs/xds.md lists what converts and what is refused; the
//! ADS client, TLS, secrets and most HTTP filters are not built yet.

mod access_log;
pub mod ads;
pub mod bootstrap;
pub mod cluster;
mod dubbo;
pub mod grpc_wire;
mod hpack;
pub mod http2;
mod http_filters;
pub mod listener;
pub mod load;
mod rbac;
pub mod route;
pub mod server;
pub mod tls;
mod typed_struct;

/// One thing a resource asks for that Tessera cannot honour, or that is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Unsupported {
    /// Where, e.g. `clusters[2].lb_policy` or `cluster "web".load_assignment.endpoints[0]`.
    pub path: String,
    /// Why, and what would work instead.
    pub reason: String,
}

/// Collects [`Unsupported`]s under a path prefix.
#[derive(Debug, Default)]
pub struct Problems {
    list: Vec<Unsupported>,
}

impl Problems {
    /// Records a problem at `path`.
    pub fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.list.push(Unsupported {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// The problems, or `Ok(value)` when there are none.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<Unsupported>> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.list)
        }
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Moves `other`'s problems into these; true when it had none.
    pub(crate) fn absorb(&mut self, other: Problems) -> bool {
        let clean = other.list.is_empty();
        self.list.extend(other.list);
        clean
    }
}

/// A protobuf `Duration` as a std one; negative or out-of-range values are `None`.
pub(crate) fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Option<std::time::Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(std::time::Duration::new(secs, nanos))
}

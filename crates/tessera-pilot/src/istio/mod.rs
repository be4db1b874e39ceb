//! Istio traffic configuration (issue 9): `VirtualService`, `DestinationRule`, `ServiceEntry` and
//! `AuthorizationPolicy` (and `PeerAuthentication`, `Sidecar`, checked only) in their Kubernetes
//! CRD YAML form, read from a watched directory and translated into sidecar configuration by
//! [`crate::translate::translate_with`]. What a sidecar cannot honour is refused with the file,
//! the document, the field and the reason; a file is accepted or rejected whole, and a rejected
//! file keeps its last good content.
//!
//! Not here: Gateways, per-workload scoping (`sourceLabels`, `workloadSelector`, `exportTo`
//! other than `*`), mesh mutual TLS, TCP and TLS routes (see docs/pilot.md).

mod parse;
pub mod rbac;
mod read;
pub(crate) mod routes;
pub(crate) mod xds;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use parse::{
    Action, AuthorizationPolicy, Dest, DestinationRule, HashKey, HeaderOps, Headers, HttpRoute, Lb, Match, Meta,
    Outlier, Pool, Resource, Retries, Rewrite, SeEndpoint, SePort, ServiceEntry, StrMatch, Subset, Tls, TrafficPolicy,
    VirtualService, fqdn, parse,
};

/// Every accepted resource, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// The resources.
    pub resources: Vec<Resource>,
}

impl Config {
    /// Every resource of `files`, by file name.
    pub fn from_files(files: &BTreeMap<PathBuf, Vec<Resource>>) -> Config {
        Config {
            resources: files.values().flatten().cloned().collect(),
        }
    }

    /// Parses one text as a file named `file` (tests and tools).
    pub fn from_text(text: &str, file: &str) -> Result<Config, Vec<crate::Problem>> {
        parse(text, file).map(|resources| Config { resources })
    }

    /// The ServiceEntries.
    pub fn service_entries(&self) -> impl Iterator<Item = &ServiceEntry> {
        self.resources.iter().filter_map(|r| match r {
            Resource::ServiceEntry(s) => Some(&**s),
            _ => None,
        })
    }

    /// The DestinationRules.
    pub fn destination_rules(&self) -> impl Iterator<Item = &DestinationRule> {
        self.resources.iter().filter_map(|r| match r {
            Resource::DestinationRule(s) => Some(&**s),
            _ => None,
        })
    }

    /// The VirtualServices.
    pub fn virtual_services(&self) -> impl Iterator<Item = &VirtualService> {
        self.resources.iter().filter_map(|r| match r {
            Resource::VirtualService(s) => Some(&**s),
            _ => None,
        })
    }

    /// The AuthorizationPolicies.
    pub fn authorization_policies(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        self.resources.iter().filter_map(|r| match r {
            Resource::AuthorizationPolicy(s) => Some(&**s),
            _ => None,
        })
    }

    /// The DestinationRule for `host`: one naming it exactly first, else the longest wildcard;
    /// the first rule (by file) wins a tie.
    pub fn rule_for(&self, host: &str) -> Option<&DestinationRule> {
        let mut best: Option<&DestinationRule> = None;
        for d in self.destination_rules().filter(|d| host_matches(&d.host, host)) {
            let rank = |d: &DestinationRule| (d.host == host, d.host.len());
            if best.is_none_or(|b| rank(d) > rank(b)) {
                best = Some(d);
            }
        }
        best
    }

    /// The RBAC filter configs (`envoy.filters.http.rbac`, DENY first, then ALLOW) for the
    /// inbound listener of a workload with `labels` in `namespace`; empty when no policy
    /// selects it.
    pub fn rbac_for(
        &self,
        labels: &BTreeMap<String, String>,
        namespace: &str,
    ) -> Vec<envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac> {
        rbac::filters(self.authorization_policies(), labels, namespace)
    }
}

/// Whether `host` is matched by `pattern` (`*.example.com`, `*`, or exactly).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => pattern == "*" || (host.ends_with(suffix) && host.len() > suffix.len()),
        None => pattern == host,
    }
}

/// The Istio config directory as last read (see `file::DirWatch`).
#[derive(Debug)]
pub struct Watch(crate::file::DirWatch<Vec<Resource>>);

impl Default for Watch {
    fn default() -> Self {
        Watch(crate::file::DirWatch::new("Istio config"))
    }
}

impl Watch {
    /// Reads the directory's `.yaml` / `.yml` files; true when the accepted config changed.
    /// A rejected file is logged with every problem and keeps its last good content.
    pub fn refresh(&mut self, dir: &Path) -> bool {
        self.0.refresh(dir, parse)
    }

    /// The accepted config.
    pub fn config(&self) -> Config {
        Config::from_files(&self.0.good)
    }
}

//! In-sidecar policy (the merged Mixer's Check and Quota): checks and quotas attached to an HTTP
//! connection manager or an RPC chain, evaluated over the request's attributes (Istio's names:
//! `source.ip`, `request.headers[x-user]`, `rpc.service`...).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::ser_duration;

/// The checks and quotas every request through a chain passes, in order: checks first (the first
/// denial answers), then quotas.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    /// Allow/deny decisions.
    pub checks: Vec<Check>,
    /// Request quotas.
    pub quotas: Vec<Quota>,
}

impl Policy {
    /// True when there is nothing to evaluate.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty() && self.quotas.is_empty()
    }

    /// Every attribute the checks and quotas read.
    pub fn attributes(&self) -> impl Iterator<Item = &str> {
        let checks = self.checks.iter().map(|c| match c {
            Check::List(l) => l.attribute.as_str(),
        });
        let quotas = self.quotas.iter().flat_map(|q| {
            q.dimensions.iter().map(String::as_str).chain(
                q.overrides
                    .iter()
                    .flat_map(|o| o.dimensions.iter().map(|(k, _)| k.as_str())),
            )
        });
        checks.chain(quotas)
    }
}

/// One check.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Mixer's listchecker: an attribute's value against a list.
    List(ListCheck),
}

impl Check {
    /// The check's name (stats, logs, reasons).
    pub fn name(&self) -> &str {
        match self {
            Check::List(l) => &l.name,
        }
    }
}

/// What the entries of a list are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    /// Exact strings.
    Strings,
    /// Regular expressions matching the whole value.
    Regex,
    /// IP addresses and CIDR ranges.
    IpAddresses,
}

/// A list check.
#[derive(Debug, Clone, Serialize)]
pub struct ListCheck {
    /// Unique among the chain's checks.
    pub name: String,
    /// The attribute checked, e.g. `request.headers[x-user]` or `source.ip`.
    pub attribute: String,
    /// What the entries are.
    pub kind: ListKind,
    /// Entries written in the config.
    pub entries: Vec<String>,
    /// A file with one entry per line (`#` comments), watched and reloaded; its entries join
    /// `entries`.
    pub file: Option<PathBuf>,
    /// Deny on a match (a blacklist); otherwise allow only on a match.
    pub blacklist: bool,
    /// Compare strings without ASCII case.
    pub case_insensitive: bool,
}

/// How a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaAlgorithm {
    /// At most `max` per window, windows back to back.
    FixedWindow,
    /// A token bucket: `max` tokens, refilled evenly over `window`.
    RollingWindow,
}

/// A memory quota per key.
#[derive(Debug, Clone, Serialize)]
pub struct Quota {
    /// Unique among the chain's quotas.
    pub name: String,
    /// Requests allowed per window and key.
    pub max: u32,
    /// The window.
    #[serde(serialize_with = "ser_duration")]
    pub window: Duration,
    /// How requests are counted.
    pub algorithm: QuotaAlgorithm,
    /// The attributes whose values make the key (none: one key for all requests).
    pub dimensions: Vec<String>,
    /// Other limits for given dimension values.
    pub overrides: Vec<QuotaOverride>,
    /// Keys kept at most; when full, expired keys are evicted, then new keys are refused.
    pub max_keys: usize,
}

/// A different `max` for requests whose dimensions have these values.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaOverride {
    /// Dimension (attribute) name to value; every one must match.
    pub dimensions: Vec<(String, String)>,
    /// The limit for them.
    pub max: u32,
}

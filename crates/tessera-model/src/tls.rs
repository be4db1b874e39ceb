//! TLS: certificates and trust bundles as named secrets, the TLS contexts of filter chains
//! (termination) and clusters (origination), in the shapes of Envoy's `CommonTlsContext`,
//! `DownstreamTlsContext` and `UpstreamTlsContext`.
//!
//! The model only says *where* certificates come from; reading and checking them is the proxy's
//! job, and its errors point back here through [`At`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::config::{StringMatch, ser_duration};

/// Where a value was written in the configuration, for error messages. Never part of equality:
/// the same file named in two places is the same thing.
#[derive(Debug, Clone, Default, Eq)]
pub struct At {
    /// Configuration file.
    pub file: String,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
    /// Field path (`secrets[0].tls_certificate.private_key`).
    pub field: String,
}

impl PartialEq for At {
    fn eq(&self, _: &At) -> bool {
        true
    }
}

impl std::hash::Hash for At {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // Converted from a source without positions (an Envoy bootstrap, xDS): the field path.
            write!(f, "{}: {}", self.file, self.field)
        } else {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.field)
        }
    }
}

/// Where bytes come from (Envoy's `DataSource`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// A file, read at start and watched for changes. Relative paths were resolved against the
    /// configuration file's directory.
    Filename(PathBuf),
    /// The bytes themselves, written in the configuration.
    InlineString(String),
}

impl DataSource {
    /// A short description for logs: the path, or `<inline>`.
    pub fn describe(&self) -> String {
        match self {
            DataSource::Filename(p) => p.display().to_string(),
            DataSource::InlineString(_) => "<inline>".to_string(),
        }
    }
}

impl Serialize for DataSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            DataSource::Filename(p) => m.serialize_entry("filename", &p.display().to_string())?,
            DataSource::InlineString(v) => m.serialize_entry("inline_string", v)?,
        }
        m.end()
    }
}

/// A private key source; inline keys never appear in `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrivateKey(pub DataSource);

impl Serialize for PrivateKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            DataSource::Filename(_) => self.0.serialize(s),
            DataSource::InlineString(_) => s.serialize_str("[redacted]"),
        }
    }
}

/// A certificate chain and its private key (Envoy's `TlsCertificate`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CertificateFiles {
    /// PEM: the leaf first, then intermediates.
    pub certificate_chain: DataSource,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub private_key: PrivateKey,
    /// Where it was written.
    #[serde(skip)]
    pub at: At,
}

/// A trust bundle: the CAs that peer certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TrustedCa {
    /// PEM: one or more CA certificates.
    pub trusted_ca: DataSource,
    /// Where it was written.
    #[serde(skip)]
    pub at: At,
}

/// A named secret (Envoy's SDS `Secret`): Istio calls the workload certificate `default` and its
/// trust bundle `ROOTCA`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Secret {
    /// Unique name.
    pub name: String,
    /// What it holds.
    #[serde(flatten)]
    pub kind: SecretKind,
}

/// What a secret holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    /// A certificate chain with its key.
    TlsCertificate(CertificateFiles),
    /// A trust bundle.
    ValidationContext(TrustedCa),
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum TlsVersion {
    /// TLS 1.2.
    #[serde(rename = "TLSv1_2")]
    Tls12,
    /// TLS 1.3.
    #[serde(rename = "TLSv1_3")]
    Tls13,
}

/// The TLS 1.2 and 1.3 cipher suites Tessera can use, by IANA name. OpenSSL/BoringSSL names
/// (`ECDHE-ECDSA-AES128-GCM-SHA256`), as Envoy writes them, are accepted too.
pub const CIPHER_SUITES: &[(&str, &str)] = &[
    ("TLS13_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"),
    ("TLS13_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
    ("TLS13_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256"),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ),
    ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
    ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384"),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ),
];

/// Key exchange groups, by Envoy's names.
pub const ECDH_CURVES: &[&str] = &["X25519", "P-256", "P-384"];

/// Protocol versions, cipher suites and curves (Envoy's `TlsParameters`). Empty lists mean the
/// defaults: every suite above, X25519 then P-256 then P-384.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsParams {
    /// Lowest version accepted (default TLS 1.2).
    pub tls_minimum_protocol_version: TlsVersion,
    /// Highest version accepted (default TLS 1.3).
    pub tls_maximum_protocol_version: TlsVersion,
    /// Allowed cipher suites by IANA name (TLS 1.3 suites spelt `TLS13_…`), in preference order.
    pub cipher_suites: Vec<String>,
    /// Allowed key exchange groups, in preference order.
    pub ecdh_curves: Vec<String>,
}

impl Default for TlsParams {
    fn default() -> TlsParams {
        TlsParams {
            tls_minimum_protocol_version: TlsVersion::Tls12,
            tls_maximum_protocol_version: TlsVersion::Tls13,
            cipher_suites: Vec::new(),
            ecdh_curves: Vec::new(),
        }
    }
}

/// Which subject alternative names a matcher looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SanType {
    /// dNSName.
    Dns,
    /// uniformResourceIdentifier (SPIFFE IDs).
    Uri,
    /// rfc822Name.
    Email,
    /// iPAddress.
    IpAddress,
}

/// A check on the peer certificate's subject alternative names (Envoy's
/// `match_typed_subject_alt_names`; `match_subject_alt_names` entries have no type and look at
/// every DNS, URI, email and IP SAN).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SanMatcher {
    /// SAN type, or every type.
    pub san_type: Option<SanType>,
    /// The comparison.
    pub matcher: StringMatch,
    /// Compare ignoring ASCII case.
    pub ignore_case: bool,
}

/// How to verify the peer's certificate (Envoy's `CertificateValidationContext`, combined with
/// `validation_context_sds_secret_config`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Validation {
    /// Trust bundle given in place.
    pub trusted_ca: Option<TrustedCa>,
    /// Trust bundle from the named secret (Istio's `ROOTCA`).
    pub trusted_ca_secret: Option<String>,
    /// The peer must present a SAN matching one of these; empty accepts any.
    pub match_subject_alt_names: Vec<SanMatcher>,
}

impl Validation {
    /// True when a trust bundle is configured, in place or by secret name.
    pub fn has_ca(&self) -> bool {
        self.trusted_ca.is_some() || self.trusted_ca_secret.is_some()
    }
}

/// What terminating and originating TLS share (Envoy's `CommonTlsContext`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommonTls {
    /// Certificates given in place.
    pub tls_certificates: Vec<CertificateFiles>,
    /// Certificates from the secret store, by name (Istio's `default`).
    pub tls_certificate_sds_secret_configs: Vec<String>,
    /// Peer verification, if any.
    pub validation: Option<Validation>,
    /// ALPN protocols offered (upstream) or accepted in preference order (downstream).
    pub alpn_protocols: Vec<String>,
    /// Versions, suites and curves.
    pub tls_params: TlsParams,
}

impl CommonTls {
    /// Every secret name this context refers to.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.tls_certificate_sds_secret_configs
            .iter()
            .map(String::as_str)
            .chain(self.validation.iter().filter_map(|v| v.trusted_ca_secret.as_deref()))
    }

    /// True when there is a certificate to present.
    pub fn has_certificate(&self) -> bool {
        !self.tls_certificates.is_empty() || !self.tls_certificate_sds_secret_configs.is_empty()
    }
}

/// TLS termination on a filter chain (Envoy's `DownstreamTlsContext`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownstreamTls {
    /// Certificates, trust and parameters.
    #[serde(flatten)]
    pub common: CommonTls,
    /// Refuse clients without a valid certificate (mutual TLS).
    pub require_client_certificate: bool,
    /// A handshake not done within this closes the connection.
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// Turn off TLS 1.3 session tickets / TLS 1.2 stateless resumption.
    pub disable_stateless_session_resumption: bool,
    /// Turn off the server-side session cache.
    pub disable_stateful_session_resumption: bool,
}

/// TLS origination towards a cluster's endpoints (Envoy's `UpstreamTlsContext`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamTls {
    /// Client certificate, trust and parameters.
    #[serde(flatten)]
    pub common: CommonTls,
    /// SNI to send; without it, none is sent (as in Envoy).
    pub sni: Option<String>,
}

//! TLS transport sockets (`envoy.extensions.transport_sockets.tls.v3` Downstream / Upstream
//! TlsContext) into Tessera's TLS settings: certificates from files or inline PEM, ALPN, protocol
//! versions, cipher suites and curves, a trusted CA with SAN matchers, client certificates.
//! Certificates are read when the config is applied, as for Tessera's own YAML. Secrets named
//! through SDS (`tls_certificate_sds_secret_configs`, `validation_context_sds_secret_config`,
//! Istio's `combined_validation_context`) come from the bootstrap's static secrets or over ADS.

use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, UpstreamTlsContext,
    common_tls_context, secret, subject_alt_name_matcher,
};
use prost::Message;
use tessera_model as model;

use crate::Problems;
use crate::listener::type_name;

const DOWNSTREAM: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn context<M: Message + Default>(ts: &TransportSocket, want: &str, at: &str, p: &mut Problems) -> Option<M> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        p.add(at, "a transport socket needs a typed_config");
        return None;
    };
    if type_name(any) != want {
        p.add(
            at,
            format!("transport socket `{}` is not supported; use {want}", type_name(any)),
        );
        return None;
    }
    M::decode(any.value.as_slice())
        .map_err(|e| p.add(at, format!("malformed {want}: {e}")))
        .ok()
}

/// A listener filter chain's TLS termination.
pub(crate) fn downstream(ts: &TransportSocket, at: &str, p: &mut Problems) -> Option<model::DownstreamTls> {
    let d: DownstreamTlsContext = context(ts, DOWNSTREAM, at, p)?;
    let at = format!("{at}.typed_config");
    let common = common(d.common_tls_context.as_ref(), &format!("{at}.common_tls_context"), p);
    if !common.has_certificate() {
        p.add(
            format!("{at}.common_tls_context.tls_certificates"),
            "TLS termination needs a certificate",
        );
    }
    let require_client_certificate = d.require_client_certificate.as_ref().is_some_and(|b| b.value);
    if require_client_certificate && !common.validation.as_ref().is_some_and(|v| v.has_ca()) {
        p.add(
            format!("{at}.require_client_certificate"),
            "needs a validation_context with a trusted_ca",
        );
    }
    Some(model::DownstreamTls {
        common,
        require_client_certificate,
        handshake_timeout: std::time::Duration::from_secs(15),
        disable_stateless_session_resumption: false,
        disable_stateful_session_resumption: d.disable_stateful_session_resumption,
    })
}

/// A cluster's TLS origination.
pub(crate) fn upstream(ts: &TransportSocket, at: &str, p: &mut Problems) -> Option<model::UpstreamTls> {
    let u: UpstreamTlsContext = context(ts, UPSTREAM, at, p)?;
    let at = format!("{at}.typed_config");
    Some(model::UpstreamTls {
        common: common(u.common_tls_context.as_ref(), &format!("{at}.common_tls_context"), p),
        sni: (!u.sni.is_empty()).then(|| u.sni.clone()),
    })
}

fn source(d: Option<&DataSource>, at: &str, p: &mut Problems) -> Option<model::DataSource> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) => Some(model::DataSource::Filename(f.into())),
        Some(data_source::Specifier::InlineString(s)) => Some(model::DataSource::InlineString(s.clone())),
        Some(data_source::Specifier::InlineBytes(b)) => {
            Some(model::DataSource::InlineString(String::from_utf8_lossy(b).into_owned()))
        }
        Some(data_source::Specifier::EnvironmentVariable(v)) => {
            p.add(
                at,
                format!("environment_variable `{v}` is not supported; use filename or inline_string"),
            );
            None
        }
        None => {
            p.add(at, "filename or inline_string is required");
            None
        }
    }
}

fn here(at: &str) -> model::At {
    model::At {
        file: "Envoy bootstrap".into(),
        line: 0,
        col: 0,
        field: at.to_string(),
    }
}

fn version(v: i32, default: model::TlsVersion, at: &str, p: &mut Problems) -> model::TlsVersion {
    match v {
        0 => default,
        3 => model::TlsVersion::Tls12,
        4 => model::TlsVersion::Tls13,
        _ => {
            p.add(at, "only TLSv1_2 and TLSv1_3 are supported");
            default
        }
    }
}

fn common(c: Option<&CommonTlsContext>, at: &str, p: &mut Problems) -> model::CommonTls {
    let mut out = model::CommonTls {
        tls_certificates: Vec::new(),
        tls_certificate_sds_secret_configs: Vec::new(),
        validation: None,
        alpn_protocols: Vec::new(),
        tls_params: model::TlsParams::default(),
    };
    let Some(c) = c else { return out };
    for (i, cert) in c.tls_certificates.iter().enumerate() {
        let here_at = format!("{at}.tls_certificates[{i}]");
        let chain = source(
            cert.certificate_chain.as_ref(),
            &format!("{here_at}.certificate_chain"),
            p,
        );
        let key = source(cert.private_key.as_ref(), &format!("{here_at}.private_key"), p);
        if let (Some(certificate_chain), Some(key)) = (chain, key) {
            out.tls_certificates.push(model::CertificateFiles {
                certificate_chain,
                private_key: model::PrivateKey(key),
                at: here(&here_at),
            });
        }
    }
    for (i, sds) in c.tls_certificate_sds_secret_configs.iter().enumerate() {
        if let Some(name) = sds_name(sds, &format!("{at}.tls_certificate_sds_secret_configs[{i}]"), p) {
            out.tls_certificate_sds_secret_configs.push(name);
        }
    }
    // Envoy takes each list entry as one protocol; a comma inside one is a common mistake that
    // Envoy also accepts verbatim, so split it the way clients would read the intent.
    out.alpn_protocols = c
        .alpn_protocols
        .iter()
        .flat_map(|a| a.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from))
        .collect();
    if let Some(t) = &c.tls_params {
        out.tls_params = model::TlsParams {
            tls_minimum_protocol_version: version(
                t.tls_minimum_protocol_version,
                model::TlsVersion::Tls12,
                &format!("{at}.tls_params.tls_minimum_protocol_version"),
                p,
            ),
            tls_maximum_protocol_version: version(
                t.tls_maximum_protocol_version,
                model::TlsVersion::Tls13,
                &format!("{at}.tls_params.tls_maximum_protocol_version"),
                p,
            ),
            cipher_suites: t.cipher_suites.clone(),
            ecdh_curves: t.ecdh_curves.clone(),
        };
    }
    match &c.validation_context_type {
        None => {}
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
            out.validation = Some(validation(v, None, &format!("{at}.validation_context"), p));
        }
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            let vat = format!("{at}.validation_context_sds_secret_config");
            out.validation = sds_name(sds, &vat, p).map(|name| model::Validation {
                trusted_ca: None,
                trusted_ca_secret: Some(name),
                match_subject_alt_names: Vec::new(),
            });
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            // Istio's shape: SAN matchers in place, the trust bundle (ROOTCA) by SDS.
            let cat = format!("{at}.combined_validation_context");
            let name = match &c.validation_context_sds_secret_config {
                Some(sds) => sds_name(sds, &format!("{cat}.validation_context_sds_secret_config"), p),
                None => {
                    p.add(&cat, "validation_context_sds_secret_config is required");
                    None
                }
            };
            let default = c.default_validation_context.clone().unwrap_or_default();
            out.validation = Some(validation(
                &default,
                name,
                &format!("{cat}.default_validation_context"),
                p,
            ));
        }
        Some(_) => p.add(
            format!("{at}.validation_context_type"),
            "this validation context source is not supported; use validation_context or SDS",
        ),
    }
    out
}

/// A peer validation context; `secret` names an SDS trust bundle that takes the place of
/// `trusted_ca`.
fn validation(
    v: &CertificateValidationContext,
    secret: Option<String>,
    vat: &str,
    p: &mut Problems,
) -> model::Validation {
    let trusted_ca = v.trusted_ca.as_ref().and_then(|d| {
        source(Some(d), &format!("{vat}.trusted_ca"), p).map(|trusted_ca| model::TrustedCa {
            trusted_ca,
            at: here(&format!("{vat}.trusted_ca")),
        })
    });
    if trusted_ca.is_some() && secret.is_some() {
        p.add(
            format!("{vat}.trusted_ca"),
            "give the trust bundle in place or by SDS, not both",
        );
    }
    let mut sans = Vec::new();
    #[allow(deprecated)]
    let legacy = &v.match_subject_alt_names;
    if !legacy.is_empty() {
        p.add(
            format!("{vat}.match_subject_alt_names"),
            "use match_typed_subject_alt_names (the untyped form is deprecated)",
        );
    }
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let mat = format!("{vat}.match_typed_subject_alt_names[{i}]");
        let san_type = match subject_alt_name_matcher::SanType::try_from(m.san_type) {
            Ok(subject_alt_name_matcher::SanType::Dns) => Some(model::SanType::Dns),
            Ok(subject_alt_name_matcher::SanType::Uri) => Some(model::SanType::Uri),
            Ok(subject_alt_name_matcher::SanType::Email) => Some(model::SanType::Email),
            Ok(subject_alt_name_matcher::SanType::IpAddress) => Some(model::SanType::IpAddress),
            _ => {
                p.add(format!("{mat}.san_type"), "use DNS, URI, EMAIL or IP_ADDRESS");
                None
            }
        };
        if let Some((matcher, ignore_case)) = m
            .matcher
            .as_ref()
            .and_then(|sm| crate::route::string_match(sm, &format!("{mat}.matcher"), p))
        {
            sans.push(model::SanMatcher {
                san_type,
                matcher,
                ignore_case,
            });
        }
    }
    model::Validation {
        trusted_ca,
        trusted_ca_secret: secret,
        match_subject_alt_names: sans,
    }
}

/// The name of an SDS secret; it comes from the bootstrap's static secrets (no `sds_config`) or
/// over the ADS stream (`sds_config: {ads: {}}`).
fn sds_name(s: &SdsSecretConfig, at: &str, p: &mut Problems) -> Option<String> {
    if s.name.is_empty() {
        p.add(format!("{at}.name"), "a secret name is required");
        return None;
    }
    if let Some(src) = &s.sds_config
        && !crate::cluster::is_ads(src)
    {
        p.add(
            format!("{at}.sds_config"),
            "secrets come over the ADS stream only (`sds_config: {ads: {}}`), or from static_resources.secrets",
        );
        return None;
    }
    Some(s.name.clone())
}

/// An SDS `Secret` (or a bootstrap's static one): a certificate with its key, or a trust bundle.
pub fn secret(s: &Secret, at: &str) -> Result<model::Secret, Vec<crate::Unsupported>> {
    let mut p = Problems::default();
    if s.name.is_empty() {
        p.add(format!("{at}.name"), "a secret needs a name");
    }
    let kind = match &s.r#type {
        Some(secret::Type::TlsCertificate(c)) => {
            let cat = format!("{at}.tls_certificate");
            let chain = source(
                c.certificate_chain.as_ref(),
                &format!("{cat}.certificate_chain"),
                &mut p,
            );
            let key = source(c.private_key.as_ref(), &format!("{cat}.private_key"), &mut p);
            chain.zip(key).map(|(certificate_chain, key)| {
                model::SecretKind::TlsCertificate(model::CertificateFiles {
                    certificate_chain,
                    private_key: model::PrivateKey(key),
                    at: here(&cat),
                })
            })
        }
        Some(secret::Type::ValidationContext(v)) => {
            let vat = format!("{at}.validation_context");
            if !v.match_typed_subject_alt_names.is_empty() {
                p.add(
                    format!("{vat}.match_typed_subject_alt_names"),
                    "SAN matchers go in the TLS context that uses the secret, not in the secret",
                );
            }
            match v.trusted_ca.as_ref() {
                Some(d) => source(Some(d), &format!("{vat}.trusted_ca"), &mut p).map(|trusted_ca| {
                    model::SecretKind::ValidationContext(model::TrustedCa {
                        trusted_ca,
                        at: here(&format!("{vat}.trusted_ca")),
                    })
                }),
                None => {
                    p.add(format!("{vat}.trusted_ca"), "a trust bundle is required");
                    None
                }
            }
        }
        Some(_) => {
            p.add(at, "session ticket keys and generic secrets are not supported");
            None
        }
        None => {
            p.add(at, "a secret needs tls_certificate or validation_context");
            None
        }
    };
    let name = s.name.clone();
    match kind {
        Some(kind) => p.finish(model::Secret { name, kind }),
        None => Err(p.finish(()).err().unwrap_or_default()),
    }
}

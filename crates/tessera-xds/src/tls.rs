//! TLS transport sockets (`envoy.extensions.transport_sockets.tls.v3` Downstream / Upstream
//! TlsContext) into Tessera's TLS settings: certificates from files or inline PEM, ALPN, protocol
//! versions, cipher suites and curves, a trusted CA with SAN matchers, client certificates.
//! Certificates are read when the config is applied, as for Tessera's own YAML; SDS secrets are
//! not built yet.

use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
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
    if !c.tls_certificate_sds_secret_configs.is_empty() {
        p.add(
            format!("{at}.tls_certificate_sds_secret_configs"),
            "SDS is not built yet",
        );
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
            let vat = format!("{at}.validation_context");
            let trusted_ca = v.trusted_ca.as_ref().and_then(|d| {
                source(Some(d), &format!("{vat}.trusted_ca"), p).map(|trusted_ca| model::TrustedCa {
                    trusted_ca,
                    at: here(&format!("{vat}.trusted_ca")),
                })
            });
            let mut sans = Vec::new();
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
            out.validation = Some(model::Validation {
                trusted_ca,
                trusted_ca_secret: None,
                match_subject_alt_names: sans,
            });
        }
        Some(_) => p.add(
            format!("{at}.validation_context_type"),
            "SDS and combined validation contexts are not built yet; use validation_context",
        ),
    }
    out
}

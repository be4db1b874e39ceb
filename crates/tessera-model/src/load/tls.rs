//! Decoding of secrets and TLS contexts.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use super::string_match_fields;
use crate::config::StringMatch;
use crate::decode::{Ctx, Obj, Path, enumeration, list, scalar, string};
use crate::tls::*;
use crate::yaml::{Kind, Node};

/// The secrets a configuration defines, by name, for checking references in place.
#[derive(Default)]
pub(super) struct SecretNames {
    kinds: HashMap<String, &'static str>,
}

impl SecretNames {
    pub(super) fn new(secrets: &[Secret]) -> SecretNames {
        SecretNames {
            kinds: secrets
                .iter()
                .map(|s| {
                    let kind = match s.kind {
                        SecretKind::TlsCertificate(_) => "tls_certificate",
                        SecretKind::ValidationContext(_) => "validation_context",
                    };
                    (s.name.clone(), kind)
                })
                .collect(),
        }
    }

    /// Reads a secret name (`default` or Envoy's `{name: default, sds_config: ...}` without the
    /// config source) and checks that a secret of that kind exists.
    fn reference(&self, ctx: &mut Ctx, n: &Node, p: &Path, kind: &'static str) -> Option<String> {
        let name = match &n.kind {
            Kind::Map(_) => {
                let mut o = Obj::open(ctx, n, p)?;
                let name = o.req_string(ctx, "name");
                if let Some((sn, sp)) = o.get("sds_config") {
                    ctx.error(
                        sn.mark,
                        &sp,
                        "SDS config sources are not supported in static files; secrets come from the \
                         top-level `secrets` list (or from ADS, once xDS is configured)",
                    );
                }
                o.finish(ctx);
                name?
            }
            _ => string(ctx, n, p)?,
        };
        match self.kinds.get(&name) {
            Some(k) if *k == kind => Some(name),
            Some(k) => {
                ctx.error(n.mark, p, format!("secret `{name}` is a {k}, not a {kind}"));
                None
            }
            None => {
                let mut known: Vec<&str> = self
                    .kinds
                    .iter()
                    .filter(|(_, k)| **k == kind)
                    .map(|(n, _)| n.as_str())
                    .collect();
                known.sort_unstable();
                let hint = if known.is_empty() {
                    format!("no {kind} secrets are defined under `secrets`")
                } else {
                    format!("defined: {}", known.join(", "))
                };
                ctx.error(n.mark, p, format!("unknown secret `{name}` ({hint})"));
                None
            }
        }
    }
}

fn at(ctx: &Ctx, n: &Node, p: &Path) -> At {
    At {
        file: ctx.file.clone(),
        line: n.mark.line,
        col: n.mark.col,
        field: p.as_str().to_string(),
    }
}

/// Relative file names are relative to the directory of the configuration file.
pub(super) fn resolve(ctx: &Ctx, name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.is_absolute() {
        return p;
    }
    match FsPath::new(&ctx.file).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p,
    }
}

/// Envoy's `DataSource`: a plain string is a file name; `{filename}` or `{inline_string}`.
fn data_source(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<DataSource> {
    match &n.kind {
        Kind::Map(_) => {
            let mut o = Obj::open(ctx, n, p)?;
            let file = o.string(ctx, "filename");
            let inline = o.string(ctx, "inline_string");
            if let Some((bn, bp)) = o.get("inline_bytes") {
                ctx.error(
                    bn.mark,
                    &bp,
                    "inline_bytes is not supported; put PEM text in `inline_string`",
                );
            }
            if let Some((en, ep)) = o.get("environment_variable") {
                ctx.error(en.mark, &ep, "environment_variable is not supported; use `filename`");
            }
            let r = match (file, inline) {
                (Some(f), None) if !f.is_empty() => Some(DataSource::Filename(resolve(ctx, &f))),
                (None, Some(s)) if !s.is_empty() => Some(DataSource::InlineString(s)),
                (Some(_), Some(_)) => {
                    ctx.error(n.mark, p, "give `filename` or `inline_string`, not both");
                    None
                }
                _ => {
                    ctx.error(n.mark, p, "needs a non-empty `filename` or `inline_string`");
                    None
                }
            };
            o.finish(ctx);
            r
        }
        _ => {
            let s = scalar(ctx, n, p, "a file name or {filename: ...}")?;
            if s.is_empty() {
                ctx.error(n.mark, p, "the file name is empty");
                return None;
            }
            Some(DataSource::Filename(resolve(ctx, s)))
        }
    }
}

/// `{certificate_chain, private_key}`.
pub(super) fn certificate(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<CertificateFiles> {
    let mut o = Obj::open(ctx, n, p)?;
    let chain = o
        .require(ctx, "certificate_chain")
        .and_then(|(n, p)| data_source(ctx, n, &p));
    let key = o.require(ctx, "private_key").and_then(|(n, p)| data_source(ctx, n, &p));
    if let Some((n, p)) = o.get("password") {
        ctx.error(
            n.mark,
            &p,
            "encrypted private keys are not supported; give an unencrypted PEM key",
        );
    }
    o.finish(ctx);
    Some(CertificateFiles {
        certificate_chain: chain?,
        private_key: PrivateKey(key?),
        at: at(ctx, n, p),
    })
}

fn trusted_ca(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<TrustedCa> {
    Some(TrustedCa {
        trusted_ca: data_source(ctx, n, p)?,
        at: at(ctx, n, p),
    })
}

/// One entry of the top-level `secrets` list.
pub(super) fn secret(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Secret> {
    let mut o = Obj::open(ctx, n, p)?;
    let name = o.req_string(ctx, "name");
    let cert = o.get("tls_certificate").map(|(n, p)| certificate(ctx, n, &p));
    let val = o.get("validation_context").map(|(n, p)| {
        let mut v = Obj::open(ctx, n, &p)?;
        let ca = v.require(ctx, "trusted_ca").and_then(|(n, p)| trusted_ca(ctx, n, &p));
        v.finish(ctx);
        ca
    });
    let kind = match (cert, val) {
        (Some(c), None) => SecretKind::TlsCertificate(c?),
        (None, Some(v)) => SecretKind::ValidationContext(v?),
        (Some(_), Some(_)) => {
            ctx.error(
                o.mark,
                &o.path,
                "a secret holds either `tls_certificate` or `validation_context`, not both",
            );
            return None;
        }
        (None, None) => {
            ctx.error(
                o.mark,
                &o.path,
                "a secret needs `tls_certificate` or `validation_context`",
            );
            return None;
        }
    };
    o.finish(ctx);
    Some(Secret { name: name?, kind })
}

fn san_type(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<SanType> {
    enumeration(
        ctx,
        n,
        p,
        &[
            ("DNS", SanType::Dns),
            ("URI", SanType::Uri),
            ("EMAIL", SanType::Email),
            ("IP_ADDRESS", SanType::IpAddress),
        ],
    )
}

fn string_matcher(ctx: &mut Ctx, o: &mut Obj<'_>) -> Option<(StringMatch, bool)> {
    let m = string_match_fields(ctx, o)?;
    let ic = o.bool(ctx, "ignore_case").unwrap_or(false);
    match m {
        Some(m) => Some((m, ic)),
        None => {
            ctx.error(
                o.mark,
                &o.path,
                "a SAN matcher needs one of `exact`, `prefix`, `suffix`, `contains` or `safe_regex`",
            );
            None
        }
    }
}

fn untyped_san(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<SanMatcher> {
    let mut o = Obj::open(ctx, n, p)?;
    let (matcher, ignore_case) = string_matcher(ctx, &mut o)?;
    o.finish(ctx);
    Some(SanMatcher {
        san_type: None,
        matcher,
        ignore_case,
    })
}

fn typed_san(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<SanMatcher> {
    let mut o = Obj::open(ctx, n, p)?;
    let t = o.require(ctx, "san_type").and_then(|(n, p)| san_type(ctx, n, &p));
    let m = o.require(ctx, "matcher").and_then(|(n, p)| {
        let mut m = Obj::open(ctx, n, &p)?;
        let r = string_matcher(ctx, &mut m);
        m.finish(ctx);
        r
    });
    o.finish(ctx);
    let (matcher, ignore_case) = m?;
    Some(SanMatcher {
        san_type: Some(t?),
        matcher,
        ignore_case,
    })
}

fn version(ctx: &mut Ctx, n: &Node, p: &Path, minimum: bool) -> Option<TlsVersion> {
    let v = enumeration(
        ctx,
        n,
        p,
        &[
            ("TLS_AUTO", None),
            ("TLSv1_0", Some(10u8)),
            ("TLSv1_1", Some(11)),
            ("TLSv1_2", Some(12)),
            ("TLSv1_3", Some(13)),
        ],
    )?;
    match v {
        None if minimum => Some(TlsVersion::Tls12),
        None => Some(TlsVersion::Tls13),
        Some(13) => Some(TlsVersion::Tls13),
        Some(12) => Some(TlsVersion::Tls12),
        // TLS 1.0 and 1.1 are not implemented by rustls; as a minimum they mean "the oldest we have".
        Some(_) if minimum => Some(TlsVersion::Tls12),
        Some(_) => {
            ctx.error(
                n.mark,
                p,
                "TLS 1.0 and 1.1 are not supported; the maximum must be TLSv1_2 or TLSv1_3",
            );
            None
        }
    }
}

/// A cipher suite by IANA or OpenSSL name; Envoy's `[A|B]` equal-preference groups are flattened.
fn cipher_suites(ctx: &mut Ctx, n: &Node, p: &Path) -> Vec<String> {
    let names: Vec<String> = list(ctx, n, p, &mut |ctx, n, p| string(ctx, n, p));
    let mut out = Vec::new();
    for name in &names {
        for part in name.trim_matches(|c| c == '[' || c == ']').split('|') {
            let part = part.trim();
            match CIPHER_SUITES.iter().find(|(iana, alt)| *iana == part || *alt == part) {
                Some((iana, _)) => {
                    if !out.iter().any(|s: &String| s == iana) {
                        out.push((*iana).to_string());
                    }
                }
                None => {
                    let known: Vec<&str> = CIPHER_SUITES.iter().map(|(_, alt)| *alt).collect();
                    ctx.error(
                        n.mark,
                        p,
                        format!(
                            "cipher suite `{part}` is not supported (CBC and non-ECDHE suites are not \
                             implemented); supported: {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
    }
    out
}

fn tls_params(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<TlsParams> {
    let mut o = Obj::open(ctx, n, p)?;
    let min = o
        .get("tls_minimum_protocol_version")
        .and_then(|(n, p)| version(ctx, n, &p, true))
        .unwrap_or(TlsVersion::Tls12);
    let max = o
        .get("tls_maximum_protocol_version")
        .and_then(|(n, p)| version(ctx, n, &p, false))
        .unwrap_or(TlsVersion::Tls13);
    if min > max {
        ctx.error(
            o.mark,
            &o.path,
            "tls_minimum_protocol_version is above tls_maximum_protocol_version",
        );
    }
    let cipher_suites = o
        .get("cipher_suites")
        .map(|(n, p)| cipher_suites(ctx, n, &p))
        .unwrap_or_default();
    let ecdh_curves = o.list(ctx, "ecdh_curves", |ctx, n, p| {
        let s = string(ctx, n, p)?;
        let canon = match s.as_str() {
            "X25519" => "X25519",
            "P-256" | "secp256r1" | "prime256v1" => "P-256",
            "P-384" | "secp384r1" => "P-384",
            _ => {
                ctx.error(
                    n.mark,
                    p,
                    format!("curve `{s}` is not supported; supported: {}", ECDH_CURVES.join(", ")),
                );
                return None;
            }
        };
        Some(canon.to_string())
    });
    if let Some((n, p)) = o.get("signature_algorithms") {
        ctx.error(
            n.mark,
            &p,
            "signature_algorithms is not supported; the defaults are used",
        );
    }
    o.finish(ctx);
    // With TLS 1.2 allowed and only 1.3 suites listed (or the reverse) nothing could be agreed.
    let has13 = cipher_suites.iter().any(|s| s.starts_with("TLS13_"));
    let has12 = cipher_suites.iter().any(|s| !s.starts_with("TLS13_"));
    if !cipher_suites.is_empty() && max == TlsVersion::Tls12 && !has12 {
        ctx.error(
            n.mark,
            p,
            "cipher_suites lists no TLS 1.2 suite, but TLS 1.3 is not allowed",
        );
    }
    if !cipher_suites.is_empty() && min == TlsVersion::Tls13 && !has13 {
        ctx.error(
            n.mark,
            p,
            "cipher_suites lists no TLS 1.3 suite, but only TLS 1.3 is allowed",
        );
    }
    Some(TlsParams {
        tls_minimum_protocol_version: min,
        tls_maximum_protocol_version: max,
        cipher_suites,
        ecdh_curves,
    })
}

fn validation(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Validation> {
    let mut o = Obj::open(ctx, n, p)?;
    let trusted_ca = o.get("trusted_ca").and_then(|(n, p)| trusted_ca(ctx, n, &p));
    let mut sans = o.list(ctx, "match_subject_alt_names", untyped_san);
    sans.extend(o.list(ctx, "match_typed_subject_alt_names", typed_san));
    for unsupported in ["verify_certificate_spki", "verify_certificate_hash", "crl"] {
        if let Some((n, p)) = o.get(unsupported) {
            ctx.error(n.mark, &p, format!("{unsupported} is not supported yet"));
        }
    }
    o.finish(ctx);
    Some(Validation {
        trusted_ca,
        trusted_ca_secret: None,
        match_subject_alt_names: sans,
    })
}

/// The `CommonTlsContext` fields of a `tls` block.
fn common(ctx: &mut Ctx, o: &mut Obj<'_>, secrets: &SecretNames) -> CommonTls {
    let tls_certificates = o.list(ctx, "tls_certificates", certificate);
    let tls_certificate_sds_secret_configs = o.list(ctx, "tls_certificate_sds_secret_configs", |ctx, n, p| {
        secrets.reference(ctx, n, p, "tls_certificate")
    });
    let mut val = o.get("validation_context").and_then(|(n, p)| validation(ctx, n, &p));
    if let Some((n, p)) = o.get("validation_context_sds_secret_config")
        && let Some(name) = secrets.reference(ctx, n, &p, "validation_context")
    {
        let v = val.get_or_insert_with(|| Validation {
            trusted_ca: None,
            trusted_ca_secret: None,
            match_subject_alt_names: Vec::new(),
        });
        if v.trusted_ca.is_some() {
            ctx.error(
                n.mark,
                &p,
                "give the trust bundle once: `validation_context.trusted_ca` or \
                     `validation_context_sds_secret_config`",
            );
        }
        v.trusted_ca_secret = Some(name);
    }
    let alpn_protocols = o.list(ctx, "alpn_protocols", |ctx, n, p| {
        let s = string(ctx, n, p)?;
        if s.is_empty() || s.len() > 255 {
            ctx.error(n.mark, p, "an ALPN protocol name is 1 to 255 bytes");
            return None;
        }
        Some(s)
    });
    let tls_params = o
        .get("tls_params")
        .and_then(|(n, p)| tls_params(ctx, n, &p))
        .unwrap_or_default();
    CommonTls {
        tls_certificates,
        tls_certificate_sds_secret_configs,
        validation: val,
        alpn_protocols,
        tls_params,
    }
}

/// SAN matchers without a trust bundle would check names anyone can put in a certificate.
fn require_ca_for_sans(ctx: &mut Ctx, o: &Obj<'_>, common: &CommonTls, peer: &str) {
    if let Some(v) = &common.validation
        && !v.has_ca()
        && !v.match_subject_alt_names.is_empty()
    {
        ctx.error(
            o.mark,
            &o.path.field("validation_context"),
            format!("matching {peer} SANs needs a trust bundle (`trusted_ca`); an unverified SAN proves nothing"),
        );
    }
}

/// A filter chain's `tls` block.
pub(super) fn downstream(ctx: &mut Ctx, n: &Node, p: &Path, secrets: &SecretNames) -> Option<DownstreamTls> {
    let mut o = Obj::open(ctx, n, p)?;
    let common = common(ctx, &mut o, secrets);
    let require_client_certificate = o.bool(ctx, "require_client_certificate").unwrap_or(false);
    let handshake_timeout = o.duration(ctx, "handshake_timeout").unwrap_or(Duration::from_secs(10));
    let disable_stateless_session_resumption = o.bool(ctx, "disable_stateless_session_resumption").unwrap_or(false);
    let disable_stateful_session_resumption = o.bool(ctx, "disable_stateful_session_resumption").unwrap_or(false);
    if !common.has_certificate() {
        ctx.error(
            o.mark,
            &o.path,
            "terminating TLS needs a certificate: `tls_certificates` or `tls_certificate_sds_secret_configs`",
        );
    }
    require_ca_for_sans(ctx, &o, &common, "client");
    let has_ca = common.validation.as_ref().is_some_and(Validation::has_ca);
    if require_client_certificate && !has_ca {
        ctx.error(
            o.mark,
            &o.path.field("require_client_certificate"),
            "requiring client certificates needs a trust bundle to check them against \
             (`validation_context.trusted_ca` or `validation_context_sds_secret_config`)",
        );
    }
    if handshake_timeout.is_zero() {
        ctx.error(o.mark, &o.path.field("handshake_timeout"), "must be above zero");
    }
    o.finish(ctx);
    Some(DownstreamTls {
        common,
        require_client_certificate,
        handshake_timeout,
        disable_stateless_session_resumption,
        disable_stateful_session_resumption,
    })
}

/// A cluster's `tls` block.
pub(super) fn upstream(ctx: &mut Ctx, n: &Node, p: &Path, secrets: &SecretNames) -> Option<UpstreamTls> {
    let mut o = Obj::open(ctx, n, p)?;
    let common = common(ctx, &mut o, secrets);
    let sni = o.string(ctx, "sni").filter(|s| !s.is_empty());
    if common.tls_certificates.len() + common.tls_certificate_sds_secret_configs.len() > 1 {
        ctx.error(o.mark, &o.path, "a cluster presents at most one client certificate");
    }
    require_ca_for_sans(ctx, &o, &common, "server");
    o.finish(ctx);
    Some(UpstreamTls { common, sni })
}

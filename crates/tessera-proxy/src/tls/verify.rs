//! Certificate choice and peer verification on top of rustls/webpki: certificates chosen by
//! SNI, SAN matching (Istio's `subjectAltNames`) after chain verification, and Envoy's rule
//! that an upstream certificate is checked against the trust bundle and SAN matchers, not
//! against the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use tessera_model::{SanMatcher, SanType};

use super::x509::{self, CertInfo};

/// True when one of the certificate's SANs satisfies one of the matchers (or there are none).
pub(crate) fn sans_match(matchers: &[SanMatcher], info: &CertInfo) -> bool {
    if matchers.is_empty() {
        return true;
    }
    matchers.iter().any(|m| {
        let test = |v: &str| m.matcher.matches(v, m.ignore_case);
        let dns = || info.dns.iter().any(|v| test(v));
        let uri = || info.uri.iter().any(|v| test(v));
        let email = || info.email.iter().any(|v| test(v));
        let ip = || info.ip.iter().any(|v| test(&v.to_string()));
        match m.san_type {
            Some(SanType::Dns) => dns(),
            Some(SanType::Uri) => uri(),
            Some(SanType::Email) => email(),
            Some(SanType::IpAddress) => ip(),
            None => dns() || uri() || email() || ip(),
        }
    })
}

fn check_sans(matchers: &[SanMatcher], end_entity: &CertificateDer<'_>) -> Result<(), Error> {
    if matchers.is_empty() {
        return Ok(());
    }
    match x509::parse(end_entity) {
        Ok(info) if sans_match(matchers, &info) => Ok(()),
        Ok(info) => {
            tracing::debug!(dns = ?info.dns, uri = ?info.uri, "peer certificate SANs match no configured matcher");
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
        Err(_) => Err(Error::InvalidCertificate(CertificateError::BadEncoding)),
    }
}

/// Client certificate verification: webpki's chain checks, then the SAN matchers.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    sans: Vec<SanMatcher>,
}

impl ClientVerifier {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>, sans: Vec<SanMatcher>) -> ClientVerifier {
        ClientVerifier { inner, sans }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_sans(&self.sans, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server certificate verification for upstream connections, as Envoy does it: with a trust
/// bundle, the chain must verify (expiry, issuer, usage) but the host name is not compared (the
/// SAN matchers are how a cluster pins an identity); without one, any certificate is accepted.
/// Handshake signatures are always checked.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    sans: Vec<SanMatcher>,
}

impl ServerVerifier {
    pub(crate) fn new(
        inner: Option<Arc<WebPkiServerVerifier>>,
        provider: Arc<CryptoProvider>,
        sans: Vec<SanMatcher>,
    ) -> ServerVerifier {
        ServerVerifier { inner, provider, sans }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if let Some(inner) = &self.inner {
            match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
                Ok(_) => {}
                // webpki checks the name last, after the chain: a name mismatch means the chain is good.
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        check_sans(&self.sans, end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A cluster's client certificate.
#[derive(Debug)]
pub(crate) struct ClientCert(pub(crate) Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A listener chain's certificates, chosen by SNI against each leaf's DNS SANs (exact, then
/// `*.` wildcard one label deep), then by what the client can verify; the first is the default.
#[derive(Debug, Default)]
pub(crate) struct SniCerts {
    certs: Vec<(Arc<CertifiedKey>, Vec<String>, Arc<CertInfo>)>,
}

impl SniCerts {
    pub(crate) fn new(certs: Vec<(Arc<CertifiedKey>, Vec<String>, Arc<CertInfo>)>) -> SniCerts {
        SniCerts { certs }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Indexes of the certificates for `sni`, best first; all of them when none names it.
    fn candidates(&self, sni: Option<&str>) -> Vec<usize> {
        let Some(sni) = sni.map(str::to_ascii_lowercase) else {
            return (0..self.certs.len()).collect();
        };
        let exact: Vec<usize> = (0..self.certs.len())
            .filter(|i| self.certs[*i].1.contains(&sni))
            .collect();
        if !exact.is_empty() {
            return exact;
        }
        let parent = sni.split_once('.').map(|(_, rest)| rest);
        let wild: Vec<usize> = (0..self.certs.len())
            .filter(|i| {
                self.certs[*i]
                    .1
                    .iter()
                    .any(|n| n.strip_prefix("*.").is_some_and(|suffix| Some(suffix) == parent))
            })
            .collect();
        if !wild.is_empty() {
            return wild;
        }
        (0..self.certs.len()).collect()
    }

    /// The certificate a connection with this SNI is served (for logs and XFCC `By`).
    pub(crate) fn local_for(&self, sni: Option<&str>) -> Option<Arc<CertInfo>> {
        if self.certs.len() == 1 {
            return self.certs.first().map(|c| c.2.clone());
        }
        self.candidates(sni).first().map(|i| self.certs[*i].2.clone())
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.certs.len() == 1 {
            return self.certs.first().map(|c| c.0.clone());
        }
        let cands = self.candidates(hello.server_name());
        let schemes = hello.signature_schemes();
        cands
            .iter()
            .find(|i| self.certs[**i].0.key.choose_scheme(schemes).is_some())
            .or(cands.first())
            .map(|i| self.certs[*i].0.clone())
    }
}

use std::io;
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, SanType as RcSan};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tessera_model::{SanMatcher, SanType, StringMatch};

use super::verify::{SniCerts, sans_match};
use super::x509::{self, CertInfo};
use super::{Reason, default_provider};

fn info(dns: &[&str], uri: &[&str]) -> CertInfo {
    CertInfo {
        dns: dns.iter().map(|s| s.to_string()).collect(),
        uri: uri.iter().map(|s| s.to_string()).collect(),
        ..CertInfo::default()
    }
}

fn m(t: Option<SanType>, sm: StringMatch) -> SanMatcher {
    SanMatcher {
        san_type: t,
        matcher: sm,
        ignore_case: false,
    }
}

#[test]
fn san_matchers_look_at_the_right_names() {
    let spiffe = info(
        &["svc.ns.svc.cluster.local"],
        &["spiffe://cluster.local/ns/ns/sa/reviews"],
    );
    assert!(sans_match(&[], &spiffe), "no matcher accepts any certificate");
    let exact_uri = m(
        Some(SanType::Uri),
        StringMatch::Exact("spiffe://cluster.local/ns/ns/sa/reviews".into()),
    );
    assert!(sans_match(std::slice::from_ref(&exact_uri), &spiffe));
    let wrong_sa = m(
        Some(SanType::Uri),
        StringMatch::Exact("spiffe://cluster.local/ns/ns/sa/ratings".into()),
    );
    assert!(!sans_match(std::slice::from_ref(&wrong_sa), &spiffe));
    assert!(sans_match(&[wrong_sa, exact_uri], &spiffe), "any matcher may match");
    let dns_as_uri = m(Some(SanType::Uri), StringMatch::Suffix(".cluster.local".into()));
    assert!(
        !sans_match(&[dns_as_uri], &spiffe),
        "a typed matcher ignores other SAN types"
    );
    let untyped = m(None, StringMatch::Suffix(".cluster.local".into()));
    assert!(sans_match(&[untyped], &spiffe), "an untyped matcher looks at every SAN");
    let prefix = m(
        Some(SanType::Uri),
        StringMatch::Prefix("spiffe://cluster.local/ns/ns/".into()),
    );
    assert!(sans_match(&[prefix], &spiffe));
}

fn cert(names: &[&str]) -> (Arc<CertifiedKey>, Vec<String>, Arc<CertInfo>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    for n in names {
        p.subject_alt_names.push(RcSan::DnsName((*n).try_into().unwrap()));
    }
    let c = p.self_signed(&key).unwrap();
    let der = CertificateDer::from(c.der().to_vec());
    let info = x509::parse(&der).unwrap();
    let k = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let ck = CertifiedKey::from_der(vec![der], k, &default_provider()).unwrap();
    (
        Arc::new(ck),
        names.iter().map(|s| s.to_string()).collect(),
        Arc::new(info),
    )
}

#[test]
fn certificates_are_chosen_by_sni_exact_then_wildcard_then_default() {
    let certs = SniCerts::new(vec![
        cert(&["default.example"]),
        cert(&["*.example.com"]),
        cert(&["api.example.com"]),
    ]);
    let pick = |sni: Option<&str>| certs.local_for(sni).unwrap().dns[0].clone();
    assert_eq!(pick(Some("api.example.com")), "api.example.com");
    assert_eq!(
        pick(Some("API.Example.com")),
        "api.example.com",
        "SNI compares without case"
    );
    assert_eq!(pick(Some("www.example.com")), "*.example.com");
    assert_eq!(
        pick(Some("a.b.example.com")),
        "default.example",
        "a wildcard covers one label"
    );
    assert_eq!(pick(Some("other.org")), "default.example");
    assert_eq!(pick(None), "default.example");
}

#[test]
fn io_errors_without_tls_detail_are_classified_by_kind() {
    let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "eof");
    assert_eq!(Reason::classify(&eof), Reason::Closed);
    let tls = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
    );
    assert_eq!(Reason::classify(&tls), Reason::Expired);
    let unknown = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
    );
    assert_eq!(Reason::classify(&unknown), Reason::UnknownCa);
    let alert = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
    );
    assert_eq!(Reason::classify(&alert), Reason::PeerRejectedCert);
}

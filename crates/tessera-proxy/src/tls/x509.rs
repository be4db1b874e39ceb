//! Just enough X.509 (RFC 5280) to name a peer: serial, subject, issuer, validity and subject
//! alternative names, read from DER without allocating more than the answer. Signature and
//! chain checks are rustls' and webpki's; this only reads fields of certificates they accepted
//! (or that we are about to serve), and every malformed input is an error, never a panic.

use std::fmt::Write as _;
use std::net::IpAddr;

/// What went wrong reading a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed certificate: {0}")]
pub(crate) struct X509Error(&'static str);

/// The fields Tessera uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// Serial number, lower-case hex without leading zero bytes.
    pub(crate) serial: String,
    /// Subject in RFC 4514 form (`CN=a,O=b`, last RDN first), as Envoy prints it.
    pub(crate) subject: String,
    /// Issuer, in the same form.
    pub(crate) issuer: String,
    /// Validity, Unix seconds.
    pub(crate) not_before: i64,
    /// Validity, Unix seconds.
    pub(crate) not_after: i64,
    /// dNSName SANs.
    pub(crate) dns: Vec<String>,
    /// URI SANs (SPIFFE IDs).
    pub(crate) uri: Vec<String>,
    /// rfc822Name SANs.
    pub(crate) email: Vec<String>,
    /// iPAddress SANs.
    pub(crate) ip: Vec<IpAddr>,
}

impl CertInfo {
    /// The identity Istio uses for a peer: the first URI SAN (a SPIFFE ID), else the first DNS
    /// SAN, else the subject.
    pub(crate) fn principal(&self) -> &str {
        self.uri
            .first()
            .or(self.dns.first())
            .map(String::as_str)
            .unwrap_or(&self.subject)
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const CTX0: u8 = 0xa0;
const CTX3: u8 = 0xa3;

const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// A DER reader over a byte slice.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(b: &'a [u8]) -> Der<'a> {
        Der { rest: b }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element: its tag and contents.
    fn any(&mut self) -> Result<(u8, &'a [u8]), X509Error> {
        let [tag, first, ..] = *self.rest else {
            return Err(X509Error("truncated element"));
        };
        if tag & 0x1f == 0x1f {
            return Err(X509Error("high tag numbers are not used in certificates"));
        }
        let (len, hdr) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 {
                return Err(X509Error("indefinite length is not DER"));
            }
            if n > 4 {
                return Err(X509Error("length too large"));
            }
            let bytes = self.rest.get(2..2 + n).ok_or(X509Error("truncated length"))?;
            let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, 2 + n)
        };
        let end = hdr.checked_add(len).ok_or(X509Error("length too large"))?;
        let body = self
            .rest
            .get(hdr..end)
            .ok_or(X509Error("element longer than its container"))?;
        self.rest = &self.rest[end..];
        Ok((tag, body))
    }

    fn expect(&mut self, want: u8, what: &'static str) -> Result<&'a [u8], X509Error> {
        let (tag, body) = self.any()?;
        if tag != want {
            return Err(X509Error(what));
        }
        Ok(body)
    }
}

/// Reads the fields of a DER certificate.
pub(crate) fn parse(der: &[u8]) -> Result<CertInfo, X509Error> {
    let mut outer = Der::new(der);
    let cert = outer.expect(SEQUENCE, "a certificate is a SEQUENCE")?;
    let mut cert = Der::new(cert);
    let tbs = cert.expect(SEQUENCE, "tbsCertificate is a SEQUENCE")?;
    let mut t = Der::new(tbs);
    if t.peek_tag() == Some(CTX0) {
        t.any()?; // version
    }
    let serial = t.expect(INTEGER, "serialNumber is an INTEGER")?;
    t.expect(SEQUENCE, "signature is an AlgorithmIdentifier")?;
    let issuer = name(t.expect(SEQUENCE, "issuer is a Name")?)?;
    let mut validity = Der::new(t.expect(SEQUENCE, "validity is a SEQUENCE")?);
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    let subject = name(t.expect(SEQUENCE, "subject is a Name")?)?;
    t.expect(SEQUENCE, "subjectPublicKeyInfo is a SEQUENCE")?;
    let mut info = CertInfo {
        serial: hex(trim_zeros(serial)),
        subject,
        issuer,
        not_before,
        not_after,
        ..CertInfo::default()
    };
    while !t.is_empty() {
        let (tag, body) = t.any()?;
        if tag == CTX3 {
            extensions(body, &mut info)?;
        }
    }
    Ok(info)
}

fn trim_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len().saturating_sub(1));
    &b[i..]
}

/// Lower-case hex.
pub(crate) fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn extensions(body: &[u8], info: &mut CertInfo) -> Result<(), X509Error> {
    let mut outer = Der::new(body);
    let mut list = Der::new(outer.expect(SEQUENCE, "extensions are a SEQUENCE")?);
    while !list.is_empty() {
        let mut ext = Der::new(list.expect(SEQUENCE, "an extension is a SEQUENCE")?);
        let oid = ext.expect(OID, "extnID is an OID")?;
        if ext.peek_tag() == Some(BOOLEAN) {
            ext.any()?;
        }
        let value = ext.expect(OCTET_STRING, "extnValue is an OCTET STRING")?;
        if oid == OID_SAN {
            sans(value, info)?;
        }
    }
    Ok(())
}

fn sans(value: &[u8], info: &mut CertInfo) -> Result<(), X509Error> {
    let mut outer = Der::new(value);
    let mut names = Der::new(outer.expect(SEQUENCE, "subjectAltName is a SEQUENCE")?);
    while !names.is_empty() {
        let (tag, body) = names.any()?;
        let text = || {
            std::str::from_utf8(body)
                .map(str::to_string)
                .map_err(|_| X509Error("a SAN is not ASCII"))
        };
        match tag {
            0x81 => info.email.push(text()?),
            0x82 => info.dns.push(text()?),
            0x86 => info.uri.push(text()?),
            0x87 => match body.len() {
                4 => info.ip.push(IpAddr::from(
                    <[u8; 4]>::try_from(body).map_err(|_| X509Error("bad IP SAN"))?,
                )),
                16 => info.ip.push(IpAddr::from(
                    <[u8; 16]>::try_from(body).map_err(|_| X509Error("bad IP SAN"))?,
                )),
                _ => return Err(X509Error("an IP SAN is 4 or 16 bytes")),
            },
            _ => {} // otherName, directoryName, ...: not used for identity here
        }
    }
    Ok(())
}

/// A Name as RFC 4514 text: RDNs in reverse order, attributes of one RDN joined with `+`.
fn name(body: &[u8]) -> Result<String, X509Error> {
    let mut rdns = Vec::new();
    let mut seq = Der::new(body);
    while !seq.is_empty() {
        let mut set = Der::new(seq.expect(SET, "an RDN is a SET")?);
        let mut parts = Vec::new();
        while !set.is_empty() {
            let mut atv = Der::new(set.expect(SEQUENCE, "an attribute is a SEQUENCE")?);
            let oid = atv.expect(OID, "an attribute type is an OID")?;
            let (tag, value) = atv.any()?;
            let mut s = String::new();
            match attr_name(oid) {
                Some(n) => s.push_str(n),
                None => s.push_str(&oid_text(oid)),
            }
            s.push('=');
            escape_into(&string_value(tag, value), &mut s);
            parts.push(s);
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn attr_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x09] => "STREET",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        [0x55, 0x04, 0x05] => "serialNumber",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress",
        _ => return None,
    })
}

/// Dotted decimal form of an OID.
fn oid_text(oid: &[u8]) -> String {
    let mut out = String::new();
    let mut v: u64 = 0;
    let mut first = true;
    for b in oid {
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if first {
                let (a, b) = if v < 80 { (v / 40, v % 40) } else { (2, v - 80) };
                let _ = write!(out, "{a}.{b}");
                first = false;
            } else {
                let _ = write!(out, ".{v}");
            }
            v = 0;
        }
    }
    out
}

fn string_value(tag: u8, v: &[u8]) -> String {
    match tag {
        // BMPString: UCS-2 big endian.
        0x1e => {
            let units: Vec<u16> = v.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16_lossy(&units)
        }
        // UniversalString: UCS-4 big endian.
        0x1c => v
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('\u{fffd}'))
            .collect(),
        // UTF8String, PrintableString, IA5String, TeletexString, VisibleString, NumericString.
        0x0c | 0x13 | 0x16 | 0x14 | 0x1a | 0x12 => String::from_utf8_lossy(v).into_owned(),
        _ => format!("#{}", hex(v)),
    }
}

/// RFC 4514 escaping of an attribute value.
fn escape_into(v: &str, out: &mut String) {
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

fn time(d: &mut Der<'_>) -> Result<i64, X509Error> {
    let (tag, v) = d.any()?;
    let s = std::str::from_utf8(v).map_err(|_| X509Error("a time is ASCII"))?;
    let digits = |r: std::ops::Range<usize>| -> Result<i64, X509Error> {
        s.get(r)
            .filter(|x| x.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|x| x.parse::<i64>().ok())
            .ok_or(X509Error("a time has digits where digits belong"))
    };
    let (year, rest) = match tag {
        UTC_TIME if s.len() == 13 => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        GENERALIZED_TIME if s.len() == 15 => (digits(0..4)?, 4),
        UTC_TIME | GENERALIZED_TIME => return Err(X509Error("a time is YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ")),
        _ => return Err(X509Error("validity holds times")),
    };
    if !s.ends_with('Z') {
        return Err(X509Error("a certificate time is in UTC"));
    }
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let hour = digits(rest + 4..rest + 6)?;
    let min = digits(rest + 6..rest + 8)?;
    let sec = digits(rest + 8..rest + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err(X509Error("a time is out of range"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 UTC timestamp for Unix seconds.
pub(crate) use tessera_model::rfc3339_secs as rfc3339;

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_sans_subject_and_validity() {
        let mut p = CertificateParams::new(vec!["api.example.com".into(), "*.example.org".into()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/default/sa/bookinfo".try_into().unwrap(),
        ));
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.subject_alt_names.push(SanType::IpAddress("::1".parse().unwrap()));
        p.subject_alt_names
            .push(SanType::Rfc822Name("ops@example.com".try_into().unwrap()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Example, Inc.");
        dn.push(DnType::CommonName, "api");
        p.distinguished_name = dn;
        p.not_before = rcgen::date_time_ymd(2024, 2, 29);
        p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x8a, 0x01]));
        let info = parse(&cert(p)).unwrap();
        assert_eq!(info.dns, ["api.example.com", "*.example.org"]);
        assert_eq!(info.uri, ["spiffe://cluster.local/ns/default/sa/bookinfo"]);
        assert_eq!(info.email, ["ops@example.com"]);
        assert_eq!(
            info.ip,
            ["127.0.0.1".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]
        );
        assert_eq!(info.subject, "CN=api,O=Example\\, Inc.");
        assert_eq!(info.subject, info.issuer, "self-signed");
        assert_eq!(info.serial, "8a01");
        assert_eq!(rfc3339(info.not_before), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339(info.not_after), "2049-12-31T00:00:00Z");
        assert_eq!(info.principal(), "spiffe://cluster.local/ns/default/sa/bookinfo");
    }

    #[test]
    fn principal_falls_back_to_dns_then_subject() {
        let p = CertificateParams::new(vec!["db.internal".into()]).unwrap();
        assert_eq!(parse(&cert(p)).unwrap().principal(), "db.internal");
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "legacy");
        p.distinguished_name = dn;
        assert_eq!(parse(&cert(p)).unwrap().principal(), "CN=legacy");
    }

    #[test]
    fn times_and_oids() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        for secs in [0i64, 86_399, 951_782_400, 4_102_444_800, 1_700_000_000] {
            let s = rfc3339(secs);
            let y: i64 = s[0..4].parse().unwrap();
            let m: i64 = s[5..7].parse().unwrap();
            let d: i64 = s[8..10].parse().unwrap();
            assert_eq!(days_from_civil(y, m, d), secs.div_euclid(86_400), "{s}");
        }
        assert_eq!(
            oid_text(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
            "1.2.840.113549.1.9.1"
        );
        assert_eq!(oid_text(&[0x55, 0x1d, 0x11]), "2.5.29.17");
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let mut p = CertificateParams::new(vec!["a.example".into()]).unwrap();
        p.subject_alt_names
            .push(SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap()));
        let der = cert(p);
        assert!(parse(&der).is_ok());
        for cut in 0..der.len() {
            assert!(parse(&der[..cut]).is_err(), "a certificate cut at {cut} parsed");
        }
        // Flip every byte in turn: parsing may succeed or fail, but must not panic.
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = parse(&bad);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse(&b);
        }
    }
}

//! Reads SNI and ALPN from a TLS ClientHello without terminating TLS, so a filter chain can be
//! chosen by server name (Envoy's `tls_inspector`). A pure parser over the first bytes.

/// What the ClientHello offers.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ClientHello {
    pub(crate) server_name: Option<String>,
    pub(crate) alpn: Vec<String>,
}

/// The result of looking at the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inspect {
    /// Not TLS.
    NotTls,
    /// TLS, but the hello is not complete yet.
    NeedMore,
    /// A ClientHello, parsed.
    Tls(ClientHello),
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.bytes(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }
}

/// Inspects the first bytes of a connection.
pub(crate) fn inspect(buf: &[u8]) -> Inspect {
    if buf.is_empty() {
        return Inspect::NeedMore;
    }
    if buf[0] != HANDSHAKE {
        return Inspect::NotTls;
    }
    if buf.len() >= 2 && buf[1] != 3 {
        return Inspect::NotTls;
    }
    if buf.len() < 5 {
        return Inspect::NeedMore;
    }
    let rec_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if rec_len > 16_384 + 2048 {
        return Inspect::NotTls;
    }
    if buf.len() < 5 + rec_len {
        return Inspect::NeedMore;
    }
    let mut r = Reader(&buf[5..5 + rec_len]);
    match parse_hello(&mut r) {
        Some(h) => Inspect::Tls(h),
        // A hello that spans several records, or a malformed one: TLS without names.
        None => Inspect::Tls(ClientHello::default()),
    }
}

fn parse_hello(r: &mut Reader<'_>) -> Option<ClientHello> {
    if r.u8()? != CLIENT_HELLO {
        return None;
    }
    let len = usize::from(r.u8()?) << 16 | usize::from(r.u16()?);
    let mut r = Reader(r.bytes(len)?);
    r.bytes(2 + 32)?; // version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Some(hello);
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let mut data = Reader(exts.vec16()?);
        match ty {
            EXT_SERVER_NAME => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 {
                        hello.server_name = std::str::from_utf8(name).ok().map(|s| s.to_ascii_lowercase());
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    if let Ok(p) = std::str::from_utf8(list.vec8()?) {
                        hello.alpn.push(p.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// Test helpers shared with the integration tests.
pub(crate) mod build {
    use super::*;

    /// Builds a minimal ClientHello record with the given SNI and ALPN.
    pub(crate) fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend(entry);
            exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend(list);
        }
        if !alpn.is_empty() {
            let mut protos = Vec::new();
            for p in alpn {
                protos.push(p.len() as u8);
                protos.extend_from_slice(p.as_bytes());
            }
            let mut list = (protos.len() as u16).to_be_bytes().to_vec();
            list.extend(protos);
            exts.extend_from_slice(&EXT_ALPN.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend(list);
        }
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::build::client_hello;
    use super::*;

    #[test]
    fn reads_sni_and_alpn() {
        let b = client_hello(Some("API.Example.com"), &["h2", "http/1.1"]);
        assert_eq!(
            inspect(&b),
            Inspect::Tls(ClientHello {
                server_name: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()]
            })
        );
        assert_eq!(inspect(&client_hello(None, &[])), Inspect::Tls(ClientHello::default()));
    }

    #[test]
    fn partial_and_plaintext() {
        let b = client_hello(Some("a.example"), &[]);
        for cut in [1, 4, 10, b.len() - 1] {
            assert_eq!(inspect(&b[..cut]), Inspect::NeedMore, "cut at {cut}");
        }
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n"), Inspect::NotTls);
        assert_eq!(inspect(b"PRI * HTTP/2.0\r\n"), Inspect::NotTls);
        assert_eq!(inspect(&[22, 9]), Inspect::NotTls);
    }

    #[test]
    fn garbage_never_panics() {
        let b = client_hello(Some("a.example"), &["h2"]);
        for i in 5..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xff;
            let _ = inspect(&c);
            let _ = inspect(&c[..i]);
        }
    }
}

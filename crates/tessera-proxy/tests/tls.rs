//! TLS end to end: termination with SNI certificate choice and ALPN, mutual TLS with SPIFFE
//! identities, SAN matching, origination, two sidecars in mTLS, certificate rotation under load,
//! TLS and plaintext on one port, and clear failures. The peers here are rustls clients and
//! servers driven by the test (certificates from rcgen); curl, openssl and grpcio are exercised
//! against the binary in the `tessera` crate's interop tests.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A throwaway directory for certificate files.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tessera-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        // Write then rename, as a certificate manager would, so readers never see half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// An issued certificate: PEM chain and key, and the DER forms for rustls clients.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    fn issue(&self, dns: &[&str], uri: &[&str], expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for u in uri {
            p.subject_alt_names.push(SanType::URI((*u).try_into().unwrap()));
        }
        p.distinguished_name
            .push(DnType::CommonName, dns.first().copied().unwrap_or("workload"));
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: CertificateDer::from(cert.der().to_vec()),
            key_der: key.serialize_der(),
        }
    }
}

impl Leaf {
    /// Writes `<name>.pem` and `<name>.key`; returns their paths.
    fn write(&self, dir: &Dir, name: &str) -> (String, String) {
        (
            dir.write(&format!("{name}.pem"), &self.cert_pem),
            dir.write(&format!("{name}.key"), &self.key_pem),
        )
    }
}

/// A rustls client config trusting `ca`, optionally presenting `client`, offering `alpn`.
/// Session resumption is off, so every handshake is a full one and shows the server's current
/// certificate (a resumed TLS 1.3 session does not send it again).
fn client_config(ca: &Ca, client: Option<&Leaf>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match client {
        Some(l) => b
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn handshake(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, sni: &str) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    // With TLS 1.3 a server rejects a client certificate after the client thinks the handshake
    // is done, so callers that test rejection also send a request.
    TlsConnector::from(cfg).connect(name, tcp).await
}

/// GET `path` over an established TLS stream with HTTP/1.1 or, if negotiated, HTTP/2.
async fn get_over(s: Tls, path: &str) -> Result<Got, String> {
    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
    let r = req("GET", &format!("https://test.local{path}")).body(empty()).unwrap();
    if h2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = tx.send_request(r).await.map_err(|e| e.to_string())?;
        Ok(collect(resp).await)
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut r = r;
        *r.uri_mut() = path.parse().unwrap();
        let resp = tx.send_request(r).await.map_err(|e| e.to_string())?;
        Ok(collect(resp).await)
    }
}

/// Handshake and GET; `Err` carries whichever step failed.
async fn tls_get(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, sni: &str, path: &str) -> Result<Got, String> {
    let s = handshake(addr, cfg, sni).await.map_err(|e| e.to_string())?;
    get_over(s, path).await
}

/// True when the certificate the server presented carries `name` (searched in its DER bytes,
/// which is enough to tell the test's certificates apart; X.509 parsing is unit-tested in the
/// crate).
fn served(s: &Tls, name: &str) -> bool {
    let der = &s.get_ref().1.peer_certificates().expect("a server certificate")[0];
    der.windows(name.len()).any(|w| w == name.as_bytes())
}

fn tls_listener(chain_tls: &str, cluster: &str) -> String {
    format!(
        r#"
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - tls:
{chain_tls}
    http:
      forward_client_cert_details: SANITIZE_SET
      set_current_client_cert_details: {{ uri: true, subject: true, dns: true }}
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {{ prefix: / }}
            route: {{ cluster: {cluster} }}
"#
    )
}

/// A proxy with `workers` workers terminating TLS with one certificate for `names` (issued by a
/// fresh CA, written to `server.pem`/`server.key`; `extra` adds lines to the `tls` block) in
/// front of backend `app`.
struct Site {
    p: tessera_proxy::Server,
    be: Backend,
    dir: Dir,
    ca: Ca,
    cert: String,
}

async fn site(tag: &str, names: &[&str], extra: &str, workers: usize) -> Site {
    let be = backend("app").await;
    let dir = Dir::new(tag);
    let ca = Ca::new("ca");
    let (cert, key) = ca.issue(names, &[], false).write(&dir, "server");
    let yaml = tls_listener(
        &format!("      tls_certificates: [{{ certificate_chain: \"{cert}\", private_key: \"{key}\" }}]\n{extra}"),
        "app",
    ) + &format!("clusters: [{{ name: app, endpoints: [\"{}\"] }}]\n", be.addr);
    let p = proxy_with(&yaml, workers).await;
    Site { p, be, dir, ca, cert }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminates_tls_choosing_the_certificate_by_sni_and_negotiating_h2() {
    let be = backend("app").await;
    let dir = Dir::new("sni");
    let ca = Ca::new("test-ca");
    let (a_cert, a_key) = ca.issue(&["a.example.com"], &[], false).write(&dir, "a");
    let (b_cert, b_key) = ca.issue(&["*.b.example.com"], &[], false).write(&dir, "b");
    let yaml = tls_listener(
        &format!(
            r#"      tls_certificates:
      - {{ certificate_chain: {{ filename: "{a_cert}" }}, private_key: {{ filename: "{a_key}" }} }}
      - {{ certificate_chain: "{b_cert}", private_key: "{b_key}" }}
      alpn_protocols: [h2, http/1.1]"#
        ),
        "app",
    ) + &format!("clusters: [{{ name: app, endpoints: [\"{}\"] }}]\n", be.addr);
    let p = proxy(&yaml).await;
    let addr = listener(&p);

    let s = handshake(addr, client_config(&ca, None, &["h2", "http/1.1"]), "a.example.com")
        .await
        .unwrap();
    assert!(served(&s, "a.example.com"));
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let got = get_over(s, "/x").await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "app /x");
    let seen = be.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(
        !seen.headers.contains_key("x-forwarded-client-cert"),
        "no client certificate, no XFCC"
    );

    let s = handshake(addr, client_config(&ca, None, &["http/1.1"]), "www.b.example.com")
        .await
        .unwrap();
    assert!(served(&s, "*.b.example.com"), "wildcard certificate for www.b");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(s, "/y").await.unwrap().body, "app /y");

    let s = handshake(addr, client_config(&ca, None, &[]), "a.example.com")
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None, "no ALPN offered, none chosen");
    assert_eq!(get_over(s, "/z").await.unwrap().body, "app /z");

    let stats_name = format!("listener.{addr}.ssl.handshake");
    assert_eq!(stat(&p, &stats_name), 3);
    assert_eq!(stat(&p, &format!("listener.{addr}.ssl.versions.TLSv1.3")), 3);

    let certs = admin(&p, "/certs").await;
    assert_eq!(certs.status, StatusCode::OK);
    assert!(
        certs.body.contains("a.example.com") && certs.body.contains("*.b.example.com"),
        "{}",
        certs.body
    );
    assert!(certs.body.contains("days_until_expiration"), "{}", certs.body);
}

const SPIFFE_GOOD: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const SPIFFE_BAD: &str = "spiffe://cluster.local/ns/shop/sa/intruder";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_only_trusted_unexpired_matching_clients() {
    let be = backend("app").await;
    let dir = Dir::new("mtls");
    let ca = Ca::new("mesh-ca");
    let other = Ca::new("other-ca");
    let (cert, key) = ca
        .issue(&["app.shop.svc"], &["spiffe://cluster.local/ns/shop/sa/app"], false)
        .write(&dir, "server");
    let ca_path = dir.write("ca.pem", &ca.pem);
    let yaml = tls_listener(
        &format!(
            r#"      tls_certificates: [{{ certificate_chain: "{cert}", private_key: "{key}" }}]
      require_client_certificate: true
      validation_context:
        trusted_ca: {{ filename: "{ca_path}" }}
        match_typed_subject_alt_names:
        - {{ san_type: URI, matcher: {{ prefix: "spiffe://cluster.local/ns/shop/sa/front" }} }}"#
        ),
        "app",
    ) + &format!("clusters: [{{ name: app, endpoints: [\"{}\"] }}]\n", be.addr);
    let p = proxy(&yaml).await;
    let addr = listener(&p);
    let failed = |r: &str| stat(&p, &format!("listener.{addr}.ssl.handshake_failed.{r}"));

    // A trusted client with the right identity gets through, and the backend learns who it is.
    let good = ca.issue(&["frontend.shop.svc"], &[SPIFFE_GOOD], false);
    let got = tls_get(addr, client_config(&ca, Some(&good), &["h2"]), "app.shop.svc", "/ok")
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let xfcc = be.last().headers["x-forwarded-client-cert"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/shop/sa/app;Hash="),
        "XFCC names our identity first: {xfcc}"
    );
    assert!(xfcc.contains(&format!("URI={SPIFFE_GOOD}")), "{xfcc}");
    assert!(xfcc.contains("Subject=\"CN=frontend.shop.svc\""), "{xfcc}");
    assert!(xfcc.contains("DNS=frontend.shop.svc"), "{xfcc}");

    // No certificate.
    let r = tls_get(addr, client_config(&ca, None, &[]), "app.shop.svc", "/").await;
    assert!(r.is_err(), "a client without a certificate got in: {r:?}");
    eventually(Duration::from_secs(5), "no_client_cert counted", || {
        failed("no_client_cert") == 1
    })
    .await;

    // A certificate from another CA.
    let stranger = other.issue(&["frontend.shop.svc"], &[SPIFFE_GOOD], false);
    assert!(
        tls_get(addr, client_config(&ca, Some(&stranger), &[]), "app.shop.svc", "/")
            .await
            .is_err()
    );
    eventually(Duration::from_secs(5), "unknown_ca counted", || {
        failed("unknown_ca") == 1
    })
    .await;

    // An expired certificate from the right CA.
    let expired = ca.issue(&["frontend.shop.svc"], &[SPIFFE_GOOD], true);
    assert!(
        tls_get(addr, client_config(&ca, Some(&expired), &[]), "app.shop.svc", "/")
            .await
            .is_err()
    );
    eventually(Duration::from_secs(5), "expired counted", || failed("expired") == 1).await;

    // The right CA, the wrong identity.
    let intruder = ca.issue(&["intruder.shop.svc"], &[SPIFFE_BAD], false);
    assert!(
        tls_get(addr, client_config(&ca, Some(&intruder), &[]), "app.shop.svc", "/")
            .await
            .is_err()
    );
    eventually(Duration::from_secs(5), "san_mismatch counted", || {
        failed("san_mismatch") == 1
    })
    .await;
    assert_eq!(be.seen().len(), 1, "only the good client reached the backend");
    assert_eq!(stat(&p, &format!("listener.{addr}.ssl.handshake")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_xfcc_header_is_removed_from_plain_clients() {
    let Site { p, be, ca, .. } = site("xfcc", &["app.local"], "", 2).await;
    let s = handshake(listener(&p), client_config(&ca, None, &[]), "app.local")
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let r = req("GET", "/")
        .header(
            "x-forwarded-client-cert",
            "By=spiffe://evil;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
        )
        .body(empty())
        .unwrap();
    assert_eq!(collect(tx.send_request(r).await.unwrap()).await.status, StatusCode::OK);
    assert!(!be.last().headers.contains_key("x-forwarded-client-cert"));
}

/// Two sidecars: the client sidecar takes plaintext and originates mTLS; the server sidecar
/// terminates it, checks the caller's SPIFFE ID and forwards plaintext to the application.
fn mesh_pair(dir: &Dir, ca: &Ca) -> (String, String) {
    let ca_path = dir.write("ca.pem", &ca.pem);
    let (scert, skey) = ca
        .issue(
            &["reviews.shop.svc"],
            &["spiffe://cluster.local/ns/shop/sa/reviews"],
            false,
        )
        .write(dir, "reviews");
    let (ccert, ckey) = ca
        .issue(&["frontend.shop.svc"], &[SPIFFE_GOOD], false)
        .write(dir, "frontend");
    let server = format!(
        r#"
secrets:
- name: default
  tls_certificate: {{ certificate_chain: "{scert}", private_key: "{skey}" }}
- name: ROOTCA
  validation_context: {{ trusted_ca: "{ca_path}" }}
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - filter_chain_match: {{ transport_protocol: tls }}
    tls:
      tls_certificate_sds_secret_configs: [default]
      validation_context_sds_secret_config: ROOTCA
      validation_context:
        match_subject_alt_names: [{{ exact: "{SPIFFE_GOOD}" }}]
      require_client_certificate: true
      alpn_protocols: [h2, http/1.1]
    http:
      forward_client_cert_details: APPEND_FORWARD
      set_current_client_cert_details: {{ uri: true }}
      route_config:
        virtual_hosts:
        - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: app }} }}] }}
"#
    );
    let client = format!(
        r#"
secrets:
- name: default
  tls_certificate: {{ certificate_chain: "{ccert}", private_key: "{ckey}" }}
- name: ROOTCA
  validation_context: {{ trusted_ca: "{ca_path}" }}
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: reviews }} }}] }}
"#
    );
    (server, client)
}

fn client_cluster(server: SocketAddr, protocol: &str, sans: &str) -> String {
    format!(
        r#"clusters:
- name: reviews
  protocol: {protocol}
  endpoints: ["{server}"]
  tls:
    sni: reviews.shop.svc
    tls_certificate_sds_secret_configs: [default]
    validation_context_sds_secret_config: ROOTCA
    validation_context:
      match_subject_alt_names: [{{ exact: "{sans}" }}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_talk_mutual_tls_with_plaintext_applications() {
    let app = backend("reviews").await;
    let dir = Dir::new("pair");
    let ca = Ca::new("mesh-ca");
    let (server_yaml, client_yaml) = mesh_pair(&dir, &ca);
    let server = proxy(&(server_yaml + &format!("clusters: [{{ name: app, endpoints: [\"{}\"] }}]\n", app.addr))).await;
    let saddr = listener(&server);
    for protocol in ["http1", "http2"] {
        // One worker, so one pool: every request shares the one TLS connection.
        let client = proxy_with(
            &(client_yaml.clone() + &client_cluster(saddr, protocol, "spiffe://cluster.local/ns/shop/sa/reviews")),
            1,
        )
        .await;
        let got = get(listener(&client), "/reviews/1").await;
        assert_eq!(got.status, StatusCode::OK, "{protocol}: {got:?}");
        assert_eq!(got.body, "reviews /reviews/1");
        let seen = app.last();
        assert_eq!(
            seen.headers["x-forwarded-client-cert"].to_str().unwrap(),
            &format!(
                "By=spiffe://cluster.local/ns/shop/sa/reviews;Hash={};URI={SPIFFE_GOOD}",
                seen.headers["x-forwarded-client-cert"]
                    .to_str()
                    .unwrap()
                    .split("Hash=")
                    .nth(1)
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
            ),
            "{protocol}"
        );
        assert_eq!(
            stat(&client, "cluster.reviews.ssl.handshake"),
            1,
            "{protocol}: one pooled connection"
        );
        // Ten more requests reuse the pooled TLS connection.
        for _ in 0..10 {
            assert_eq!(get(listener(&client), "/again").await.status, StatusCode::OK);
        }
        assert_eq!(
            stat(&client, "cluster.reviews.ssl.handshake"),
            1,
            "{protocol}: still one"
        );
    }

    // The client sidecar insists on another identity: the handshake fails, the caller gets 503 UF.
    let client =
        proxy(&(client_yaml + &client_cluster(saddr, "http1", "spiffe://cluster.local/ns/shop/sa/ratings"))).await;
    let got = get(listener(&client), "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(got.body.contains("TLS"), "{}", got.body);
    assert_eq!(stat(&client, "cluster.reviews.ssl.handshake_failed.san_mismatch"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_rotates_under_load_without_a_failed_request() {
    let Site { p, dir, ca, .. } = site("rotate", &["v1.app.local", "app.local"], "", 2).await;
    let addr = listener(&p);
    let cfg = client_config(&ca, None, &["http/1.1"]);

    // A kept-alive connection made before the rotation, used after it.
    let old = handshake(addr, cfg.clone(), "app.local").await.unwrap();
    assert!(served(&old, "v1.app.local"));
    let (mut old_tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old)).await.unwrap();
    tokio::spawn(conn);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, bad, cfg) = (stop.clone(), ok.clone(), bad.clone(), cfg.clone());
        load.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                match tls_get(addr, cfg.clone(), "app.local", "/").await {
                    Ok(g) if g.status == StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    eventually(Duration::from_secs(10), "load running", || {
        ok.load(Ordering::Relaxed) > 50
    })
    .await;
    // Rotate: a new key and certificate written in place.
    let v2 = ca.issue(&["v2.app.local", "app.local"], &[], false);
    dir.write("server.key", &v2.key_pem);
    dir.write("server.pem", &v2.cert_pem);
    let mut rotated = false;
    for _ in 0..200 {
        let s = handshake(addr, cfg.clone(), "app.local").await.unwrap();
        if served(&s, "v2.app.local") {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "new handshakes never got the new certificate");
    let before = ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "load after rotation", || {
        ok.load(Ordering::Relaxed) > before + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(bad.load(Ordering::Relaxed), 0, "requests failed during rotation");
    // The connection made before the rotation still works.
    let r = req("GET", "/still").body(empty()).unwrap();
    assert_eq!(
        collect(old_tx.send_request(r).await.unwrap()).await.status,
        StatusCode::OK
    );
    let certs = admin(&p, "/certs").await.body;
    assert!(
        certs.contains("v2.app.local") && !certs.contains("v1.app.local"),
        "{certs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rotation_keeps_the_old_certificate_and_says_why() {
    let Site { p, dir, ca, cert, .. } = site("badrot", &["app.local"], "", 2).await;
    // A key that does not belong to the certificate.
    dir.write("server.key", &KeyPair::generate().unwrap().serialize_pem());
    eventually(Duration::from_secs(5), "rotation rejected", || {
        p.stat(&format!("secret.file:{cert}.update_rejected")).unwrap_or(0) >= 1
    })
    .await;
    let certs = admin(&p, "/certs").await.body;
    assert!(certs.contains("does not fit"), "{certs}");
    let got = tls_get(listener(&p), client_config(&ca, None, &[]), "app.local", "/")
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK, "the old certificate still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_refused_with_the_file_and_field() {
    let dir = Dir::new("badfiles");
    let ca = Ca::new("ca");
    let (cert, key) = ca.issue(&["app.local"], &[], false).write(&dir, "server");
    let other_key = dir.write("other.key", &KeyPair::generate().unwrap().serialize_pem());
    let missing = dir.0.join("missing.pem").display().to_string();
    let garbage = dir.write("garbage.pem", "not a certificate\n");
    let cases = [
        (
            format!("certificate_chain: \"{missing}\", private_key: \"{key}\""),
            "cannot read",
        ),
        (
            format!("certificate_chain: \"{garbage}\", private_key: \"{key}\""),
            "no PEM certificate",
        ),
        (
            format!("certificate_chain: \"{cert}\", private_key: \"{other_key}\""),
            "does not fit",
        ),
        (
            format!("certificate_chain: \"{cert}\", private_key: \"{cert}\""),
            "no PEM private key",
        ),
    ];
    for (certs, why) in cases {
        let yaml = tls_listener(&format!("      tls_certificates: [{{ {certs} }}]"), "app")
            + "clusters: [{ name: app, endpoints: [\"127.0.0.1:1\"] }]\n";
        let cfg = tessera_model::Config::from_yaml(&yaml, "mesh.yaml").unwrap();
        let err = match tessera_proxy::Server::start(cfg.clone(), tessera_proxy::Options::default()).await {
            Ok(_) => panic!("started with {certs}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(why), "{err}");
        assert!(
            err.starts_with("mesh.yaml:") && err.contains("filter_chains[0].tls.tls_certificates[0]"),
            "the error names the file and field: {err}"
        );
        let check = tessera_proxy::check_tls(&cfg);
        assert_eq!(check.len(), 1, "{check:?}");
        assert!(check[0].contains(why));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_serves_tls_and_plaintext_chosen_by_the_inspectors() {
    let tls_app = backend("tls-app").await;
    let plain_app = backend("plain-app").await;
    let dir = Dir::new("permissive");
    let ca = Ca::new("ca");
    let (cert, key) = ca.issue(&["app.local"], &[], false).write(&dir, "server");
    let yaml = format!(
        r#"
listeners:
- name: http
  address: 127.0.0.1:0
  listener_filters_timeout: 300ms
  filter_chains:
  - name: mtls
    filter_chain_match: {{ transport_protocol: tls }}
    tls:
      tls_certificates: [{{ certificate_chain: "{cert}", private_key: "{key}" }}]
    http:
      route_config:
        virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: tls_app }} }}] }}]
  - name: plaintext-http
    filter_chain_match: {{ transport_protocol: raw_buffer, application_protocols: [http/1.1, h2c] }}
    http:
      route_config:
        virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: plain_app }} }}] }}]
clusters:
- {{ name: tls_app, endpoints: ["{}"] }}
- {{ name: plain_app, endpoints: ["{}"] }}
"#,
        tls_app.addr, plain_app.addr
    );
    let p = proxy(&yaml).await;
    let addr = listener(&p);
    assert_eq!(get(addr, "/").await.body, "plain-app /", "HTTP/1.1 plaintext");
    let mut c = h2(addr).await;
    let got = collect(
        c.send_request(req("GET", "http://test.local/h2").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.body, "plain-app /h2", "h2c plaintext");
    let got = tls_get(addr, client_config(&ca, None, &["h2"]), "app.local", "/t")
        .await
        .unwrap();
    assert_eq!(got.body, "tls-app /t", "TLS");
    // Plaintext that is not HTTP matches no chain and is closed, counted.
    let out = raw(addr, b"\x00\x01binary-protocol\r\n", Duration::from_secs(2)).await;
    assert_eq!(out, "");
    eventually(Duration::from_secs(2), "no_filter_chain_match", || {
        stat(&p, &format!("listener.{addr}.no_filter_chain_match")) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_parameters_limit_versions_and_a_silent_client_times_out() {
    let extra = "      tls_params: { tls_minimum_protocol_version: TLSv1_3 }\n      handshake_timeout: 300ms";
    let Site { p, ca, .. } = site("params", &["app.local"], extra, 2).await;
    let addr = listener(&p);
    // A TLS 1.2-only client.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let tls12 = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    assert!(handshake(addr, tls12, "app.local").await.is_err());
    eventually(Duration::from_secs(5), "protocol_version counted", || {
        stat(&p, &format!("listener.{addr}.ssl.handshake_failed.protocol_version")) == 1
    })
    .await;
    // TLS 1.3 works.
    assert_eq!(
        tls_get(addr, client_config(&ca, None, &[]), "app.local", "/")
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    // A client that connects and says nothing is closed after the handshake timeout.
    let started = tokio::time::Instant::now();
    let out = raw(addr, b"", Duration::from_secs(5)).await;
    assert_eq!(out, "");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed by the handshake timeout"
    );
    eventually(Duration::from_secs(2), "timeout counted", || {
        stat(&p, &format!("listener.{addr}.ssl.handshake_failed.timeout")) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_terminates_and_originates_tls() {
    // Server side: a sidecar terminating TLS in front of a plain TCP echo of HTTP (the backend).
    let app = backend("app").await;
    let dir = Dir::new("tcp");
    let ca = Ca::new("ca");
    let (scert, skey) = ca.issue(&["db.local"], &[], false).write(&dir, "server");
    let ca_path = dir.write("ca.pem", &ca.pem);
    let server = proxy(&format!(
        r#"
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - tls: {{ tls_certificates: [{{ certificate_chain: "{scert}", private_key: "{skey}" }}] }}
    tcp_proxy: {{ cluster: app }}
clusters: [{{ name: app, endpoints: ["{}"] }}]
"#,
        app.addr
    ))
    .await;
    // Client side: plaintext TCP in, TLS out, verifying the server against the CA and its name.
    let client = proxy(&format!(
        r#"
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - tcp_proxy: {{ cluster: db }}
clusters:
- name: db
  endpoints: ["{}"]
  tls:
    sni: db.local
    validation_context:
      trusted_ca: "{ca_path}"
      match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: db.local }} }}]
"#,
        listener(&server)
    ))
    .await;
    let got = get(listener(&client), "/over-tcp").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "app /over-tcp");
    assert_eq!(stat(&client, "cluster.db.ssl.handshake"), 1);
    assert_eq!(
        stat(&server, &format!("listener.{}.ssl.handshake", listener(&server))),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_unless_resumption_is_turned_off() {
    for (off, want_resumed) in [("false", true), ("true", false)] {
        let extra = format!(
            "      disable_stateless_session_resumption: {off}\n      disable_stateful_session_resumption: {off}"
        );
        let Site { p, ca, .. } = site("resume", &["app.local"], &extra, 1).await;
        let addr = listener(&p);
        // A client that keeps sessions, as browsers and most TLS clients do.
        let mut cfg = (*client_config(&ca, None, &["http/1.1"])).clone();
        cfg.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let cfg = Arc::new(cfg);
        // TLS 1.3 tickets arrive after the handshake: one request makes sure the client has read them.
        assert_eq!(
            tls_get(addr, cfg.clone(), "app.local", "/1").await.unwrap().status,
            StatusCode::OK
        );
        let s = handshake(addr, cfg.clone(), "app.local").await.unwrap();
        let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        assert_eq!(resumed, want_resumed, "resumption off = {off}");
        assert_eq!(get_over(s, "/2").await.unwrap().status, StatusCode::OK);
        let reused = stat(&p, &format!("listener.{addr}.ssl.session_reused"));
        assert_eq!(reused, i128::from(want_resumed), "resumption off = {off}");
    }
}

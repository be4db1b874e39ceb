//! TLS interop with peers we did not write: curl and `openssl s_client` against TLS listeners
//! (SNI selection, ALPN h2, mutual TLS), grpcio over TLS and mTLS through the sidecar, and the
//! sidecar originating TLS to `openssl s_server`. Certificates come from the openssl CLI.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A sidecar terminating TLS on listener `http` in front of `upstream`.
fn tls_sidecar(
    dir: &TempDir,
    tls: &str,
    http_extra: &str,
    upstream: SocketAddr,
    protocol: &str,
) -> (Proc, SocketAddr, SocketAddr) {
    let cfg = format!(
        r#"admin: {{ address: "127.0.0.1:0" }}
drain_time: 1s
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
{tls}
    http:
{http_extra}
      route_config:
        virtual_hosts:
        - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: app, timeout: 0s }} }}] }}
clusters:
- {{ name: app, protocol: {protocol}, endpoints: ["{upstream}"] }}
"#
    );
    let f = dir.write("sidecar.yaml", &cfg);
    let check = Command::new(bin()).args(["check", p(&f)]).output().unwrap();
    assert!(
        check.status.success(),
        "tessera check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let (proc, listen, admin) = start_sidecar(&f, &["--concurrency", "2"]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
    (proc, listen, admin)
}

#[test]
fn curl_and_openssl_see_sni_certificates_alpn_and_mutual_tls() {
    let (_svc, svc) = sample_service("svc");
    let pki = Pki::new("tls-curl");
    let (a, a_key) = pki.issue("a", "a.test", "DNS:a.test");
    let (b, b_key) = pki.issue("b", "b.test", "DNS:b.test");
    let tls = format!(
        r#"  - tls:
      tls_certificates:
      - {{ certificate_chain: "{}", private_key: "{}" }}
      - {{ certificate_chain: "{}", private_key: "{}" }}
      alpn_protocols: [h2, http/1.1]"#,
        p(&a),
        p(&a_key),
        p(&b),
        p(&b_key)
    );
    let (_side, addr, admin) = tls_sidecar(&pki.dir, &tls, "", svc, "http1");
    let port = addr.port();
    let url = |host: &str| format!("https://{host}:{port}/hello");
    let resolve = |host: &str| format!("{host}:{port}:127.0.0.1");

    // curl verifies the certificate against our CA and the name it asked for.
    for (host, proto, want) in [("a.test", "--http1.1", "1.1"), ("b.test", "--http2", "2")] {
        let out = curl_ok(&[
            "--cacert",
            p(&pki.ca),
            "--resolve",
            &resolve(host),
            proto,
            "-w",
            "\n%{http_version}",
            &url(host),
        ]);
        assert_eq!(out, format!("hello from svc (/hello)\n\n{want}"), "{host}");
    }

    // openssl s_client: the certificate chosen by SNI, and ALPN.
    let s_client = |sni: &str, alpn: &str| {
        let out = Command::new(tool("openssl", "apt-get install -y openssl"))
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                sni,
                "-alpn",
                alpn,
                "-CAfile",
                p(&pki.ca),
                "-verify_return_error",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = s_client("b.test", "h2");
    assert!(out.contains("subject=CN = b.test"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let out = s_client("a.test", "http/1.1");
    assert!(out.contains("subject=CN = a.test"), "{out}");
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");

    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=ssl")]);
    assert!(stats.contains(&format!("listener.{addr}.ssl.handshake: 4")), "{stats}");
}

#[test]
fn mutual_tls_with_curl_and_the_peer_identity_in_the_access_log() {
    let (_svc, svc) = sample_service("svc");
    let pki = Pki::new("tls-mtls");
    let (srv, srv_key) = pki.issue(
        "server",
        "app.test",
        "DNS:app.test,URI:spiffe://cluster.local/ns/default/sa/app",
    );
    let (cli, cli_key) = pki.issue(
        "client",
        "frontend",
        "URI:spiffe://cluster.local/ns/default/sa/frontend",
    );
    let log = pki.dir.path("access.log");
    let tls = format!(
        r#"  - tls:
      tls_certificates: [{{ certificate_chain: "{}", private_key: "{}" }}]
      require_client_certificate: true
      validation_context: {{ trusted_ca: "{}" }}"#,
        p(&srv),
        p(&srv_key),
        p(&pki.ca)
    );
    let http_extra = format!(
        "      access_log: [{{ path: \"{}\", format: \"peer=%DOWNSTREAM_PEER_URI_SAN% local=%DOWNSTREAM_LOCAL_URI_SAN% tls=%DOWNSTREAM_TLS_VERSION% sni=%REQUESTED_SERVER_NAME%\\n\" }}]",
        p(&log)
    );
    let (_side, addr, _admin) = tls_sidecar(&pki.dir, &tls, &http_extra, svc, "http1");
    let url = format!("https://app.test:{}/x", addr.port());
    let resolve = format!("app.test:{}:127.0.0.1", addr.port());
    let base = ["--cacert", p(&pki.ca), "--resolve", &resolve];

    let out = curl(&[&base[..], &[url.as_str()]].concat());
    assert!(!out.status.success(), "no client certificate, yet curl succeeded");

    let out = curl_ok(&[&base[..], &["--cert", p(&cli), "--key", p(&cli_key), url.as_str()]].concat());
    assert_eq!(out, "hello from svc (/x)\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("peer=") {
            assert_eq!(
                text,
                "peer=spiffe://cluster.local/ns/default/sa/frontend local=spiffe://cluster.local/ns/default/sa/app tls=TLSv1.3 sni=app.test\n"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no access log line");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn grpcio_through_tls_and_mutual_tls() {
    let py = tool("python3", "apt-get install -y python3");
    let peer = repo().join("crates/tessera/tests/peers/grpc_peer.py");
    let mut server = Proc::spawn(Command::new(&py).arg(&peer).arg("serve").stdin(Stdio::piped()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let port: u16 = loop {
        if let Some(line) = server.log().lines().next() {
            break line
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("grpc peer said: {}", server.log()));
        }
        if let Some(st) = server.child.try_wait().unwrap() {
            panic!("grpc peer exited {st}: {}", server.log());
        }
        assert!(std::time::Instant::now() < deadline, "grpc peer did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let pki = Pki::new("tls-grpc");
    let (srv, srv_key) = pki.issue(
        "server",
        "grpc.test",
        "DNS:grpc.test,URI:spiffe://cluster.local/ns/default/sa/echo",
    );
    let (cli, cli_key) = pki.issue("client", "caller", "URI:spiffe://cluster.local/ns/default/sa/caller");
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for mutual in [false, true] {
        let tls = format!(
            r#"  - tls:
      tls_certificates: [{{ certificate_chain: "{}", private_key: "{}" }}]
      alpn_protocols: [h2]
      require_client_certificate: {mutual}
      validation_context: {{ trusted_ca: "{}" }}"#,
            p(&srv),
            p(&srv_key),
            p(&pki.ca)
        );
        let extra =
            "      forward_client_cert_details: SANITIZE_SET\n      set_current_client_cert_details: { uri: true }";
        let (_side, addr, _admin) = tls_sidecar(&pki.dir, &tls, extra, upstream, "http2");
        let mut args = vec![
            p(&peer).to_string(),
            "call".into(),
            addr.to_string(),
            "--tls".into(),
            p(&pki.ca).to_string(),
            "grpc.test".into(),
        ];
        if mutual {
            args.push(p(&cli).to_string());
            args.push(p(&cli_key).to_string());
        }
        let out = Command::new("timeout").arg("60").arg(&py).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "grpc client (mutual={mutual}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["unary"], "unary:hi");
        assert_eq!(v["bidi"], serde_json::json!(["echo:1", "echo:2", "echo:3"]));
        assert_eq!(
            v["fail"],
            serde_json::json!(["FAILED_PRECONDITION", "deliberate failure"])
        );
        assert_eq!(v["metadata"]["x-forwarded-proto"], "https");
        let xfcc = v["metadata"]["x-forwarded-client-cert"].as_str().map(str::to_string);
        if mutual {
            let xfcc = xfcc.expect("XFCC with a client certificate");
            assert!(
                xfcc.starts_with("By=spiffe://cluster.local/ns/default/sa/echo;Hash="),
                "{xfcc}"
            );
            assert!(
                xfcc.ends_with(";URI=spiffe://cluster.local/ns/default/sa/caller"),
                "{xfcc}"
            );
        } else {
            assert_eq!(xfcc, None, "no client certificate, no XFCC");
        }
    }
    drop(server);
}

/// `openssl s_server -www` on a free port (it cannot report an ephemeral one), answering every
/// GET with a status page; optionally demanding a client certificate from `ca`.
fn s_server(cert: &Path, key: &Path, verify_ca: Option<&Path>) -> (Proc, SocketAddr) {
    let port = free_port();
    let mut cmd = Command::new(tool("openssl", "apt-get install -y openssl"));
    cmd.args([
        "s_server",
        "-accept",
        &format!("127.0.0.1:{port}"),
        "-cert",
        p(cert),
        "-key",
        p(key),
        "-www",
        "-naccept",
        "100",
    ]);
    if let Some(ca) = verify_ca {
        cmd.args(["-Verify", "1", "-CAfile", p(ca)]);
    }
    let proc = Proc::spawn(cmd.stdin(Stdio::null()));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_port(addr, Duration::from_secs(10));
    (proc, addr)
}

/// A sidecar whose cluster `upstream` originates TLS to `upstream` (SNI upstream.test, trusting
/// `ca`, pinning the DNS SAN), presenting `client` when given.
fn origin_sidecar(pki: &Pki, upstream: SocketAddr, client: Option<(&Path, &Path)>) -> (Proc, SocketAddr, SocketAddr) {
    let client_cert = client
        .map(|(c, k)| {
            format!(
                "    tls_certificates: [{{ certificate_chain: \"{}\", private_key: \"{}\" }}]\n",
                p(c),
                p(k)
            )
        })
        .unwrap_or_default();
    let cfg = format!(
        r#"admin: {{ address: "127.0.0.1:0" }}
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: upstream }} }}] }}
clusters:
- name: upstream
  endpoints: ["{upstream}"]
  tls:
    sni: upstream.test
{client_cert}    validation_context:
      trusted_ca: "{}"
      match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: upstream.test }} }}]
"#,
        p(&pki.ca)
    );
    let f = pki.dir.write(&format!("origin-{}.yaml", upstream.port()), &cfg);
    let (side, addr, admin) = start_sidecar(&f, &[]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
    (side, addr, admin)
}

#[test]
fn the_sidecar_originates_tls_and_mutual_tls_to_openssl_s_server() {
    let pki = Pki::new("tls-origin");
    let (srv, srv_key) = pki.issue("upstream", "upstream.test", "DNS:upstream.test");
    let (cli, cli_key) = pki.issue("sidecar", "sidecar", "URI:spiffe://cluster.local/ns/default/sa/sidecar");
    for mutual in [false, true] {
        let (_s, upstream) = s_server(&srv, &srv_key, mutual.then_some(pki.ca.as_path()));
        let client = mutual.then_some((cli.as_path(), cli_key.as_path()));
        let (_side, addr, admin) = origin_sidecar(&pki, upstream, client);
        let out = curl_ok(&["-w", "\n%{http_code}", &format!("http://{addr}/")]);
        assert!(out.ends_with("\n200"), "mutual={mutual}: {out}");
        assert!(
            out.contains("s_server"),
            "the answer comes from openssl s_server: {out}"
        );
        assert!(out.contains("TLSv1.3"), "{out}");
        let stats = curl_ok(&[&format!("http://{admin}/stats?filter=cluster.upstream.ssl")]);
        assert!(
            stats.contains("cluster.upstream.ssl.handshake: 1"),
            "mutual={mutual}: {stats}"
        );
    }

    // Without the client certificate, s_server (which demands one) refuses us: 503 UF, counted.
    let (_s, upstream) = s_server(&srv, &srv_key, Some(pki.ca.as_path()));
    let (_side, addr, admin) = origin_sidecar(&pki, upstream, None);
    let out = curl_ok(&["-w", "\n%{http_code}", &format!("http://{addr}/")]);
    assert!(out.ends_with("\n503"), "{out}");
    // TLS 1.3: the refusal comes as an alert after our side of the handshake, so as a reset.
    assert!(
        out.contains("CertificateRequired"),
        "the reason reaches the caller: {out}"
    );
    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=cluster.upstream.ssl")]);
    assert!(
        stats.contains("cluster.upstream.ssl.handshake_failed.peer_rejected_cert: 1"),
        "{stats}"
    );
}

#[test]
fn tessera_check_names_a_missing_certificate_file_and_its_field() {
    let dir = TempDir::new("tls-check");
    let f = dir.write(
        "bad.yaml",
        r#"secrets:
- name: default
  tls_certificate: { certificate_chain: /nonexistent/cert.pem, private_key: /nonexistent/key.pem }
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - tls: { tls_certificate_sds_secret_configs: [default, missing] }
    tcp_proxy: { cluster: c }
clusters: [{ name: c, endpoints: ["127.0.0.1:1"] }]
"#,
    );
    let out = Command::new(bin()).args(["check", p(&f)]).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("listeners[0].filter_chains[0].tls.tls_certificate_sds_secret_configs[1]: unknown secret `missing` (defined: default)"),
        "{text}"
    );
    // With the reference fixed, the file itself is the problem.
    let f = dir.write(
        "bad2.yaml",
        &std::fs::read_to_string(&f).unwrap().replace(", missing", ""),
    );
    let out = Command::new(bin()).args(["check", p(&f)]).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "bad2.yaml:3:20: secrets[0].tls_certificate: certificate_chain: cannot read /nonexistent/cert.pem"
        ),
        "{text}"
    );
    // And the sidecar refuses to start with the same message.
    let mut side = Proc::tessera(&["sidecar", "--config", p(&f)]);
    let st = side.wait(Duration::from_secs(20));
    assert!(!st.success());
    assert!(
        side.log().contains("cannot read /nonexistent/cert.pem"),
        "{}",
        side.log()
    );
}

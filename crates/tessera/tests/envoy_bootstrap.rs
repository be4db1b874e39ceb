//! Envoy v3 bootstraps (issue 8, first part): the 15 real bootstraps under
//! `crates/tessera-xds/tests/fixtures/envoy-bootstrap` (from Envoy's repositories) all parse through the Envoy descriptors, and each either
//! loads or lists precisely what Tessera cannot run yet; `examples/envoy-bootstrap.yaml` runs in
//! Tessera and in Envoy 1.40 (installed by `.ci/run` into `bench/.venv`), which answer the same
//! requests with the same status codes, bodies and redirects.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn fixtures() -> PathBuf {
    repo().join("crates/tessera-xds/tests/fixtures/envoy-bootstrap")
}

fn check(files: &[PathBuf]) -> String {
    let out = Command::new(bin())
        .arg("check")
        .arg("--envoy-bootstrap")
        .args(files)
        .output()
        .expect("tessera check");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_fixture_parses_and_says_what_it_needs() {
    let dir = fixtures();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 15, "{files:?}");
    let out = check(&files);
    // Each file gets one verdict line: loaded, or a count of what it needs; never a schema error.
    for f in &files {
        let name = f.display().to_string();
        let line = out
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("no verdict for {name} in\n{out}"));
        assert!(
            line.contains(": OK as an Envoy bootstrap")
                || line.contains("thing(s) Tessera cannot run yet")
                || line.contains("certificate problem(s)"),
            "{line}"
        );
    }
    // These convert whole; the TLS ones then need their certificate files, as in Envoy.
    for ok in [
        "load_balancing-circuit-breaker-config.yaml: OK as an Envoy bootstrap",
        // ADS through a STRICT_DNS cluster: the name is resolved when the client connects.
        "dynamic-config-cp-envoy.yaml: OK as an Envoy bootstrap",
        // Extra headers on rate-limited answers.
        "local_ratelimit-envoy.yaml: OK as an Envoy bootstrap",
        // ORIGINAL_DST with the original_dst listener filter (tests/original_dst.rs runs it).
        "original-dst-cluster-proxy_config.yaml: OK as an Envoy bootstrap",
        // Active HTTP health checks (its no_traffic intervals only slow checks of an idle cluster).
        "locality-load-balancing-envoy.yaml: OK as an Envoy bootstrap",
    ] {
        assert!(out.lines().any(|l| l.contains(ok)), "{ok} in\n{out}");
    }
    assert!(
        out.contains("best_practices-edge.yaml: 1 certificate problem(s)")
            && out.contains("certificate_chain: cannot read certs/servercert.pem"),
        "{out}"
    );
    // Precise reasons, with Envoy's field paths.
    for want in [
        "typed_per_filter_config[\"envoy.filters.http.local_ratelimit\"].descriptors: rate limit descriptors are not supported yet",
        // The first route's mirror converts; the second names its cluster in a request header.
        "route-mirror-envoy.yaml: 1 thing(s) Tessera cannot run yet",
        "typed_config.route_config.virtual_hosts[0].routes[1].route.request_mirror_policies[0].cluster_header: mirroring to a cluster named by a request header is not supported",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn a_broken_bootstrap_is_refused_with_the_reason() {
    let dir = TempDir::new("badboot");
    let text = std::fs::read_to_string(repo().join("examples/envoy-bootstrap.yaml"))
        .unwrap()
        .replace("connect_timeout: 1s", "connect_timeout: 1s\n    conect_timeout: 2s");
    let f = dir.write("bad.yaml", &text);
    let out = check(&[f]);
    assert!(out.contains("bad.yaml") && out.contains("conect_timeout"), "{out}");
}

/// Envoy 1.40 on `config`, once it accepts connections on `listen`; `None` (and a note) when it
/// is not installed.
fn start_envoy(config: &std::path::Path, listen: u16) -> Option<Proc> {
    let Some(envoy) = envoy_bin() else {
        // `.ci/run` installs Envoy (scripts/test); a developer machine may not have it yet.
        eprintln!("SKIPPED the Envoy half: no bench/.venv Envoy (run scripts/test or bench/run once)");
        return None;
    };
    let e = spawn_envoy(&envoy, config, listen);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(Instant::now() < deadline, "Envoy did not start:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Clusters initialise just after the listener binds.
    std::thread::sleep(Duration::from_millis(300));
    Some(e)
}

/// What a proxy answers: status, location and body, for each request.
fn answers(listen: SocketAddr) -> Vec<String> {
    let base = format!("http://{listen}");
    let reqs: [&[&str]; 5] = [
        &["/hello"],
        &["/healthz"],
        &["/old/page?x=1"],
        &["/teapot", "-H", "x-tea: 1"],
        &["/teapot"],
    ];
    reqs.iter()
        .map(|r| {
            let mut args = vec!["-s", "-o", "-", "-w", "|%{http_code}|%{redirect_url}"];
            let url = format!("{base}{}", r[0]);
            args.push(&url);
            args.extend_from_slice(&r[1..]);
            curl_ok(&args)
        })
        .collect()
}

fn config_with(sample: SocketAddr, listen: u16, admin: u16) -> String {
    std::fs::read_to_string(repo().join("examples/envoy-bootstrap.yaml"))
        .unwrap()
        .replace("port_value: 18080", &format!("port_value: {}", sample.port()))
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
}

#[test]
fn the_example_runs_and_answers_as_envoy_does() {
    let (_svc, sample) = sample_service("boot");
    let dir = TempDir::new("boot");
    let (listen, admin) = (free_port(), free_port());
    let f = dir.write("boot.yaml", &config_with(sample, listen, admin));
    let p = Proc::tessera(&["sidecar", "--envoy-bootstrap", f.to_str().unwrap()]);
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    wait_port(addr, Duration::from_secs(20));
    let ours = answers(addr);
    assert_eq!(ours[0], "hello from boot (/hello)\n|200|", "{:?}\n{}", ours, p.log());
    assert_eq!(ours[1], "ok|200|");
    assert!(
        ours[2].ends_with(&format!("|301|http://{addr}/new/page?x=1")),
        "{}",
        ours[2]
    );
    assert_eq!(ours[3], "short and stout|418|");
    // The stdout access logger with a JSON format, one object per request.
    p.wait_log(r#""path":"/teapot""#, Duration::from_secs(5));
    let line = p
        .log()
        .lines()
        .find(|l| l.contains(r#""path":"/hello""#))
        .map(str::to_string);
    let v: serde_json::Value = serde_json::from_str(line.as_deref().unwrap_or("{}")).unwrap();
    assert_eq!(v["code"], 200, "{v}");

    let (elisten, eadmin) = (free_port(), free_port());
    let ef = dir.write("envoy.yaml", &config_with(sample, elisten, eadmin));
    let eaddr: SocketAddr = format!("127.0.0.1:{elisten}").parse().unwrap();
    let Some(_e) = start_envoy(&ef, elisten) else { return };
    let theirs = answers(eaddr);
    let normalize =
        |v: &[String], a: SocketAddr| -> Vec<String> { v.iter().map(|s| s.replace(&a.to_string(), "ADDR")).collect() };
    assert_eq!(normalize(&ours, addr), normalize(&theirs, eaddr), "Tessera vs Envoy");
}

/// TLS termination written as Envoy writes it (a DownstreamTlsContext transport socket with
/// certificate files and ALPN), served by Tessera and by Envoy from the same bootstrap.
#[test]
fn tls_termination_from_an_envoy_bootstrap() {
    let (_svc, sample) = sample_service("tlsboot");
    let pki = Pki::new("tlsboot");
    let (cert, key) = pki.issue("server", "boot.test", "DNS:boot.test");
    let config = |listen: u16, admin: u16| {
        let text = config_with(sample, listen, admin).replace(
            "    filter_chains:\n    - filters:",
            &format!(
                r#"    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_params: {{ tls_minimum_protocol_version: TLSv1_2 }}
            tls_certificates:
            - certificate_chain: {{ filename: "{}" }}
              private_key: {{ filename: "{}" }}
      filters:"#,
                cert.display(),
                key.display()
            ),
        );
        assert!(text.contains("DownstreamTlsContext"), "the example's shape changed");
        text
    };
    let get = |port: u16| {
        curl_ok(&[
            "-s",
            "--cacert",
            pki.ca.to_str().unwrap(),
            "--resolve",
            &format!("boot.test:{port}:127.0.0.1"),
            "-w",
            "|%{http_code}|%{http_version}",
            &format!("https://boot.test:{port}/hello"),
        ])
    };
    let dir = TempDir::new("tlsboot-cfg");
    let (listen, admin) = (free_port(), free_port());
    let f = dir.write("boot.yaml", &config(listen, admin));
    let out = Command::new(bin())
        .args(["check", "--envoy-bootstrap", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK as an Envoy bootstrap"),
        "{out:?}"
    );
    let p = Proc::tessera(&["sidecar", "--envoy-bootstrap", f.to_str().unwrap()]);
    wait_port(format!("127.0.0.1:{listen}").parse().unwrap(), Duration::from_secs(20));
    let ours = get(listen);
    assert_eq!(
        ours,
        "hello from tlsboot (/hello)\n|200|2",
        "ALPN h2 over TLS; log:\n{}",
        p.log()
    );

    let (elisten, eadmin) = (free_port(), free_port());
    let ef = dir.write("envoy.yaml", &config(elisten, eadmin));
    let Some(_e) = start_envoy(&ef, elisten) else { return };
    assert_eq!(get(elisten), ours, "Tessera vs Envoy");
}

/// Envoy's fault and local rate limit HTTP filters, run by Tessera natively, answer as Envoy does.
/// (Tessera runs the listener-wide rate limit before route faults, so it refuses the other order.)
#[test]
fn fault_and_local_rate_limit_filters_match_envoy() {
    let (_svc, sample) = sample_service("filters");
    let dir = TempDir::new("filtersboot");
    let config = |listen: u16, admin: u16| {
        config_with(sample, listen, admin).replace(
            "          http_filters:\n",
            r#"          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rl
              token_bucket: { max_tokens: 3, tokens_per_fill: 3, fill_interval: 3600s }
              filter_enabled: { default_value: { numerator: 100, denominator: HUNDRED }, runtime_key: rl_on }
              filter_enforced: { default_value: { numerator: 100, denominator: HUNDRED }, runtime_key: rl_enforced }
              response_headers_to_add:
              - { append_action: OVERWRITE_IF_EXISTS_OR_ADD, header: { key: x-local-rate-limit, value: "true" } }
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: { http_status: 503, percentage: { numerator: 100, denominator: HUNDRED } }
              headers: [{ name: x-fault, present_match: true }]
"#,
        )
    };
    let run = |listen: u16| -> Vec<String> {
        let url = format!("http://127.0.0.1:{listen}/hello");
        let mut out = vec![curl_ok(&["-s", "-w", "|%{http_code}", "-H", "x-fault: 1", &url])];
        for _ in 0..4 {
            out.push(curl_ok(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]));
        }
        // The rate-limited answer carries the configured header.
        let head = curl_ok(&["-s", "-i", &url]).to_lowercase();
        out.push(format!(
            "x-local-rate-limit: {}",
            head.contains("x-local-rate-limit: true")
        ));
        out
    };
    let (listen, admin) = (free_port(), free_port());
    let f = dir.write("t.yaml", &config(listen, admin));
    let p = Proc::tessera(&["sidecar", "--envoy-bootstrap", f.to_str().unwrap()]);
    wait_port(format!("127.0.0.1:{listen}").parse().unwrap(), Duration::from_secs(20));
    let ours = run(listen);
    assert_eq!(ours[0], "fault filter abort|503", "{ours:?}\n{}", p.log());
    // The rate limit comes first, so the aborted request took a token: two pass, then 429.
    assert_eq!(
        &ours[1..],
        ["200", "200", "429", "429", "x-local-rate-limit: true"],
        "{ours:?}"
    );
    let (elisten, eadmin) = (free_port(), free_port());
    let ef = dir.write("e.yaml", &config(elisten, eadmin));
    let Some(_e) = start_envoy(&ef, elisten) else { return };
    let theirs = run(elisten);
    assert_eq!(ours, theirs, "Tessera vs Envoy");
}

/// Envoy's RBAC HTTP filter, as Istio's AuthorizationPolicy compiles to it: an ALLOW policy on
/// the path and a DENY policy on a header, with shadow rules; the same answers as Envoy's.
#[test]
fn rbac_filter_matches_envoy() {
    let (_svc, sample) = sample_service("rbacboot");
    let dir = TempDir::new("rbacboot");
    let config = |listen: u16, admin: u16| {
        config_with(sample, listen, admin).replace(
            "          http_filters:\n",
            r#"          http_filters:
          - name: deny-header
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  blocked:
                    permissions: [{ any: true }]
                    principals: [{ header: { name: x-user, string_match: { exact: blocked } } }]
          - name: allow-paths
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  readers:
                    permissions:
                    - and_rules:
                        rules:
                        - header: { name: ":method", string_match: { exact: GET } }
                        - or_rules: { rules: [{ url_path: { path: { prefix: /hello } } }, { url_path: { path: { exact: /healthz } } }] }
                    principals: [{ remote_ip: { address_prefix: 127.0.0.0, prefix_len: 8 } }]
              shadow_rules:
                action: DENY
                policies:
                  audit: { permissions: [{ any: true }], principals: [{ any: true }] }
"#,
        )
    };
    let run = |listen: u16| -> Vec<String> {
        let base = format!("http://127.0.0.1:{listen}");
        [
            vec![format!("{base}/hello")],
            vec![format!("{base}/healthz")],
            vec![format!("{base}/other")],
            vec!["-X".into(), "POST".into(), format!("{base}/hello")],
            vec!["-H".into(), "x-user: blocked".into(), format!("{base}/hello")],
        ]
        .iter()
        .map(|a| {
            let mut args: Vec<&str> = vec!["-s", "-w", "|%{http_code}"];
            args.extend(a.iter().map(String::as_str));
            curl_ok(&args)
        })
        .collect()
    };
    let (listen, admin) = (free_port(), free_port());
    let f = dir.write("t.yaml", &config(listen, admin));
    let p = Proc::tessera(&["sidecar", "--envoy-bootstrap", f.to_str().unwrap()]);
    wait_port(format!("127.0.0.1:{listen}").parse().unwrap(), Duration::from_secs(20));
    let ours = run(listen);
    assert_eq!(ours[0], "hello from rbacboot (/hello)\n|200", "{ours:?}\n{}", p.log());
    assert_eq!(
        &ours[2..],
        [
            "RBAC: access denied|403",
            "RBAC: access denied|403",
            "RBAC: access denied|403"
        ]
    );
    let stats = curl_ok(&[&format!("http://127.0.0.1:{admin}/stats?filter=shadow")]);
    assert!(stats.contains("allow-paths-shadow.shadow_denied:"), "{stats}");
    let (elisten, eadmin) = (free_port(), free_port());
    let ef = dir.write("e.yaml", &config(elisten, eadmin));
    let Some(_e) = start_envoy(&ef, elisten) else { return };
    assert_eq!(ours, run(elisten), "Tessera vs Envoy");
}

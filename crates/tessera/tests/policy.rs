//! Check and Quota in the sidecar (issue 7: list, RBAC and OPA checks, memory quotas), through
//! the real binary with real clients: curl for HTTP and gRPC framing, the npm Dubbo client and
//! server for RPC.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn http_sidecar(policy: &str, upstream: SocketAddr) -> (Proc, SocketAddr, SocketAddr, TempDir) {
    http_sidecar_with(policy, upstream, &[])
}

/// Writes `files` into the sidecar's directory first; `DIR/` in the policy names that directory.
fn http_sidecar_with(
    policy: &str,
    upstream: SocketAddr,
    files: &[(&str, &str)],
) -> (Proc, SocketAddr, SocketAddr, TempDir) {
    let dir = TempDir::new("policy");
    for (name, text) in files {
        std::fs::write(dir.path(name), text).unwrap();
    }
    let policy = policy.replace("DIR/", &format!("{}/", dir.path("").display()));
    let chain = format!("      policy:\n{policy}").replace("LISTFILE", &dir.path("teams.txt").display().to_string());
    std::fs::write(dir.path("teams.txt"), "# teams allowed\nred\n").unwrap();
    let (p, listen, admin) = start_ready(&dir, &ingress_yaml("", &chain, "", upstream));
    (p, listen, admin, dir)
}

const POLICY: &str = r#"        checks:
        - list: { name: blocked-users, attribute: "request.headers[x-user]", entries: [blocked], blacklist: true }
        - list: { name: teams, attribute: "request.headers[x-team]", file: LISTFILE, case_insensitive: true }
        quotas:
        - name: per-user
          max: 5
          window: 1m
          dimensions: ["request.headers[x-user]"]
          overrides: [{ dimensions: { "request.headers[x-user]": vip }, max: 7 }]"#;

fn status(url: &str, headers: &[&str]) -> String {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    for h in headers {
        args.extend_from_slice(&["-H", h]);
    }
    args.push(url);
    String::from_utf8_lossy(&curl(&args).stdout).into_owned()
}

#[test]
fn http_deny_lists_and_quotas_answer_403_and_429() {
    let (_svc, svc) = sample_service("svc");
    let (_p, listen, admin, _dir) = http_sidecar(POLICY, svc);
    let url = format!("http://{listen}/");

    // The deny list, with Mixer's wording.
    let out = curl_ok(&["-i", "-H", "x-user: blocked", "-H", "x-team: red", &url]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("PERMISSION_DENIED: blocked-users:"), "{out}");
    // The allow list from a file: a team not in it is refused, case folded for those in it.
    assert_eq!(status(&url, &["x-user: zed", "x-team: blue"]), "403");
    assert_eq!(status(&url, &["x-user: zed", "x-team: RED"]), "200");

    // Five a minute per user; the sixth gets 429 with the rate-limit headers.
    let codes: Vec<String> = (0..6).map(|_| status(&url, &["x-user: ann", "x-team: red"])).collect();
    assert_eq!(codes, ["200", "200", "200", "200", "200", "429"]);
    let out = curl_ok(&["-i", "-H", "x-user: ann", "-H", "x-team: red", &url]);
    let lower = out.to_ascii_lowercase();
    assert!(
        lower.contains("x-ratelimit-limit: 5\r\n") && lower.contains("x-ratelimit-remaining: 0\r\n"),
        "{out}"
    );
    assert!(out.contains("RESOURCE_EXHAUSTED: quota `per-user` exceeded"), "{out}");
    // Another user has their own window; an override gives vip 7.
    assert_eq!(status(&url, &["x-user: bob", "x-team: red"]), "200");
    let vip: Vec<String> = (0..8).map(|_| status(&url, &["x-user: vip", "x-team: red"])).collect();
    assert_eq!(vip.iter().filter(|c| *c == "200").count(), 7, "{vip:?}");

    // gRPC clients get PERMISSION_DENIED (7) and RESOURCE_EXHAUSTED (8).
    let grpc = |user: &str| {
        let out = curl_ok(&[
            "-i",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            &format!("x-user: {user}"),
            "-H",
            "x-team: red",
            "--data-binary",
            "",
            &format!("{url}svc.Echo/Call"),
        ]);
        out.to_ascii_lowercase()
    };
    assert!(grpc("blocked").contains("grpc-status: 7"), "{}", grpc("blocked"));
    assert!(grpc("ann").contains("grpc-status: 8"), "{}", grpc("ann"));

    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=^policy")]);
    for want in [
        "policy.ingress.blocked-users.denied: 2",
        "policy.ingress.teams.denied: 1",
        "policy.ingress.per-user.exceeded: ",
    ] {
        assert!(stats.contains(want), "missing {want:?} in\n{stats}");
    }
    let dump = curl_ok(&[&format!("http://{admin}/config_dump")]);
    assert!(
        dump.contains("\"per-user\"") && dump.contains("blocked-users"),
        "the policy is in /config_dump"
    );
}

#[test]
fn list_files_are_reloaded_when_they_change() {
    let (_svc, svc) = sample_service("svc");
    let (p, listen, admin, dir) = http_sidecar(POLICY, svc);
    let url = format!("http://{listen}/");
    assert_eq!(status(&url, &["x-user: a", "x-team: green"]), "403");
    std::fs::write(dir.path("teams.txt"), "red\ngreen\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&url, &["x-user: a", "x-team: green"]) != "200" {
        assert!(
            Instant::now() < deadline,
            "the list was not reloaded; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A file that no longer parses is logged and the entries in force stay.
    std::fs::remove_file(dir.path("teams.txt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !curl_ok(&[&format!("http://{admin}/stats?filter=list_reload_failed")]).contains("list_reload_failed: 1") {
        assert!(
            Instant::now() < deadline,
            "no reload failure counted; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&url, &["x-user: a", "x-team: green"]), "200");
}

#[test]
fn unchanged_policies_keep_their_quota_across_reloads() {
    let (_svc, svc) = sample_service("svc");
    let (p, listen, _admin, dir) = http_sidecar(POLICY, svc);
    let url = format!("http://{listen}/");
    let ann = ["x-user: ann", "x-team: red"];
    for _ in 0..5 {
        assert_eq!(status(&url, &ann), "200");
    }
    let reloads = |p: &Proc| p.log().matches("configuration reloaded").count();
    let reload = |n: usize| {
        p.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads(&p) < n {
            assert!(Instant::now() < deadline, "no reload; log:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    reload(1);
    assert_eq!(status(&url, &ann), "429", "the same policy keeps its windows");
    let f = dir.path("sidecar.yaml");
    let yaml = std::fs::read_to_string(&f).unwrap().replace("max: 5", "max: 6");
    std::fs::write(&f, yaml).unwrap();
    reload(2);
    assert_eq!(status(&url, &ann), "200", "a changed quota starts afresh");
}

/// RBAC as Istio's AuthorizationPolicy compiles to it: an ALLOW policy (GET on /info*, or
/// anything from 127.0.0.0/8 with `x-role: admin`), a DENY policy on a header, and a shadow
/// policy that only counts.
#[test]
fn rbac_allow_deny_and_shadow() {
    let (_svc, svc) = sample_service("svc");
    let policy = r#"        checks:
        - rbac:
            name: deny-blocked
            action: DENY
            policies:
              blocked:
                permissions: [{ any: true }]
                principals: [{ header: { name: x-user, exact: blocked } }]
        - rbac:
            name: allow-info
            action: ALLOW
            policies:
              readers:
                permissions:
                - and_rules: { rules: [{ method: GET }, { url_path: { path: { prefix: /info } } }] }
                principals: [{ any: true }]
              admins:
                permissions: [{ any: true }]
                principals:
                - and_ids: { ids: [{ source_ip: 127.0.0.0/8 }, { header: { name: x-role, exact: admin } }] }
        - rbac:
            name: audit
            action: DENY
            shadow: true
            policies:
              everything: { permissions: [{ any: true }], principals: [{ any: true }] }"#;
    let (_p, listen, admin, _dir) = http_sidecar(policy, svc);
    let base = format!("http://{listen}");
    assert_eq!(status(&format!("{base}/info"), &[]), "200");
    assert_eq!(status(&format!("{base}/info/x"), &[]), "200");
    let out = curl_ok(&["-i", "-X", "POST", &format!("{base}/info")]);
    assert!(
        out.starts_with("HTTP/1.1 403") && out.contains("RBAC: access denied"),
        "{out}"
    );
    assert_eq!(status(&format!("{base}/other"), &[]), "403");
    assert_eq!(status(&format!("{base}/other"), &["x-role: admin"]), "200");
    assert_eq!(status(&format!("{base}/info"), &["x-user: blocked"]), "403");
    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=^policy")]);
    for want in [
        "policy.ingress.deny-blocked.denied: 1",
        "policy.ingress.allow-info.denied: 2",
        "policy.ingress.audit.shadow_denied: 3",
    ] {
        assert!(stats.contains(want), "missing {want:?} in\n{stats}");
    }
}

fn nanos_from_now(d: Duration) -> u128 {
    (std::time::SystemTime::now() + d)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn wait_for(what: &str, p: &Proc, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "{what}; log:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Real Rego through the sidecar: path-based and time-based rules, an evaluation error that fails
/// closed, and the file re-read when it changes (a broken edit keeps the policy in force).
#[test]
fn opa_rego_paths_time_errors_and_reload() {
    let (_svc, svc) = sample_service("svc");
    let deadline = nanos_from_now(Duration::from_secs(8));
    let rego = |extra: &str| {
        format!(
            r#"package mesh.authz

allow if startswith(input.request.url_path, "/public/")

# Open until a moment a few seconds after the sidecar starts.
allow if {{
    input.request.url_path == "/timed"
    time.now_ns() < {deadline}
}}

# Two values for one complete rule: an evaluation error.
allow := true if input.request.headers["x-a"] == "1"
allow := false if input.request.headers["x-b"] == "1"
{extra}
"#,
        )
    };
    let policy = r#"        checks:
        - opa: { name: authz, file: DIR/authz.rego, query: data.mesh.authz.allow }"#;
    let (p, listen, admin, dir) = http_sidecar_with(policy, svc, &[("authz.rego", &rego(""))]);
    let start = Instant::now();
    let base = format!("http://{listen}");
    assert_eq!(status(&format!("{base}/public/a"), &[]), "200");
    assert_eq!(status(&format!("{base}/private?to=/public/"), &[]), "403");
    assert_eq!(status(&format!("{base}/timed"), &[]), "200", "before the deadline");
    let out = curl_ok(&["-s", "-H", "x-a: 1", "-H", "x-b: 1", &format!("{base}/public/a")]);
    assert!(
        out.starts_with("PERMISSION_DENIED: authz: OPA: evaluating"),
        "fails closed: {out}"
    );
    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=authz")]);
    assert!(stats.contains("policy.ingress.authz.error: 1"), "{stats}");

    // An edit that opens /private is picked up; a broken edit is counted and ignored.
    std::fs::write(
        dir.path("authz.rego"),
        rego(r#"allow if input.request.url_path == "/private""#),
    )
    .unwrap();
    wait_for("the Rego file was not reloaded", &p, || {
        status(&format!("{base}/private"), &[]) == "200"
    });
    std::fs::write(dir.path("authz.rego"), "package mesh.authz\nallow if {").unwrap();
    wait_for("no reload failure counted", &p, || {
        curl_ok(&[&format!("http://{admin}/stats?filter=rego_reload_failed")]).contains("rego_reload_failed: 1")
    });
    assert_eq!(
        status(&format!("{base}/private"), &[]),
        "200",
        "the last good policy stays"
    );

    // After the deadline the time-based rule no longer allows.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(start.elapsed()));
    assert_eq!(status(&format!("{base}/timed"), &[]), "403", "after the deadline");
}

/// The Mixer way, for comparison and for existing authorization servers: the sidecar's ext_authz
/// check calls `tessera check-server` (Envoy's external authorization gRPC API) per request.
/// The server's answers (403, 429 with its headers) come back as they are; a dead server fails
/// closed within the timeout.
#[test]
fn ext_authz_to_the_check_server() {
    let (_svc, svc) = sample_service("svc");
    let dir = TempDir::new("checksrv");
    let policy = dir.write(
        "mixer.yaml",
        r#"policy:
  checks:
  - list: { name: blocked-users, attribute: "request.headers[x-user]", entries: [blocked], blacklist: true }
  quotas:
  - { name: per-user, max: 2, window: 1h, dimensions: ["request.headers[x-user]"] }
"#,
    );
    let mut server = Proc::tessera(&[
        "check-server",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    let addr = server.logged_addr("check server ready", Duration::from_secs(20));
    let checks =
        format!("        checks:\n        - ext_authz: {{ name: mixer, address: \"{addr}\", timeout: 500ms }}");
    let (p, listen, admin, _dir) = http_sidecar(&checks, svc);
    let url = format!("http://{listen}/");
    assert_eq!(status(&url, &["x-user: ann"]), "200");
    let out = curl_ok(&["-s", "-i", "-H", "x-user: blocked", &url]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("PERMISSION_DENIED: blocked-users:"), "{out}");
    assert_eq!(status(&url, &["x-user: ann"]), "200");
    let out = curl_ok(&["-s", "-i", "-H", "x-user: ann", &url]);
    assert!(out.starts_with("HTTP/1.1 429"), "the server's status: {out}");
    assert!(
        out.to_ascii_lowercase().contains("x-ratelimit-limit: 2"),
        "the server's headers: {out}"
    );
    // The server dies: fail closed (Envoy's default), quickly.
    server.signal("KILL");
    let _ = server.wait(Duration::from_secs(5));
    let t = Instant::now();
    let out = curl_ok(&["-s", "-i", "-H", "x-user: zed", &url]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("authorization server failed"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=mixer")]);
    assert!(stats.contains("policy.ingress.mixer.error: 1"), "{stats}\n{}", p.log());
}

/// The check server answers a malformed CheckRequest with gRPC INVALID_ARGUMENT, and an unknown
/// method with UNIMPLEMENTED, and keeps serving (curl speaks h2c to it).
#[test]
fn the_check_server_refuses_malformed_requests() {
    let dir = TempDir::new("checkbad");
    let policy = dir.write(
        "p.yaml",
        "policy:\n  checks:\n  - list: { name: l, attribute: \"request.headers[x-user]\", entries: [blocked], blacklist: true }\n",
    );
    let server = Proc::tessera(&[
        "check-server",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    let addr = server.logged_addr("check server ready", Duration::from_secs(20));
    let garbage = dir.write("garbage.bin", "\u{0}\u{0}\u{0}\u{0}\u{3}\u{ff}\u{ff}\u{ff}");
    // An unknown method is called without a body: the server answers it without reading one,
    // and a body still on its way would race the stream's end (curl then reports a reset).
    let call = |path: &str, body: bool| {
        let data = format!("@{}", garbage.display());
        let url = format!("http://{addr}{path}");
        let mut args = vec![
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
        ];
        if body {
            args.extend(["--data-binary", &data]);
        } else {
            args.extend(["-X", "POST"]);
        }
        args.push(&url);
        curl_ok(&args).to_ascii_lowercase()
    };
    let out = call("/envoy.service.auth.v3.Authorization/Check", true);
    assert!(out.contains("grpc-status: 3"), "{out}");
    let out = call("/some.Other/Method", false);
    assert!(out.contains("grpc-status: 12"), "{out}");
    assert!(out.starts_with("http/2 200"), "still serving: {out}");
}

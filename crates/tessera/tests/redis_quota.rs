//! Redis quotas (issue 7) against a real `redis-server` (installed by `.ci/run`), started by each
//! test on a free port: several sidecars sharing one limit, both algorithms, prefetch, Redis
//! killed (fail-open and fail-closed) and restarted, and a three-node Redis Cluster.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A redis-server on `port`, without persistence; killed on drop. Err (with its log) when it
/// exits or does not answer within 10 s.
fn try_redis(port: u16, extra: &[&str], dir: &TempDir) -> Result<Proc, String> {
    let p = Proc::spawn(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", dir.path("").to_str().unwrap()])
            .args(extra),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut p = p;
    while !redis_cli(port, &["ping"]).contains("PONG") {
        if Instant::now() > deadline || p.child.try_wait().ok().flatten().is_some() {
            return Err(p.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

/// [`try_redis`], panicking with the log.
fn redis(port: u16, extra: &[&str], dir: &TempDir) -> Proc {
    try_redis(port, extra, dir).unwrap_or_else(|log| panic!("redis-server did not start; log:\n{log}"))
}

/// A redis-server on a port picked here: a port found free can be taken by another test's
/// connection before redis binds it (seen in CI), so a bind failure picks again (3 tries).
/// With `cluster`, the port is low enough for Redis's cluster bus port (port + 10000).
fn redis_free_port(extra: &[&str], dir: &TempDir, cluster: bool) -> (Proc, u16) {
    let mut last = String::new();
    for _ in 0..3 {
        let port = loop {
            let p = free_port();
            if !cluster || p <= 55_535 {
                break p;
            }
        };
        match try_redis(port, extra, dir) {
            Ok(p) => return (p, port),
            Err(log) if log.contains("Address already in use") => last = log,
            Err(log) => panic!("redis-server did not start; log:\n{log}"),
        }
    }
    panic!("redis-server found its port taken three times; last log:\n{last}")
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sidecar whose chain has one Redis quota (`redis:` block given) of `max` per `window` per
/// `x-user`.
struct Side {
    p: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    _svc: Proc,
    _dir: TempDir,
}

fn sidecar(redis: &str, max: u32, window: &str, algorithm: &str, tag: &str) -> Side {
    let (svc, svc_addr) = sample_service(tag);
    let dir = TempDir::new(tag);
    let policy = format!(
        "      policy:
        quotas:
        - name: per-user
          max: {max}
          window: {window}
          algorithm: {algorithm}
          dimensions: [\"request.headers[x-user]\"]
          redis: {redis}"
    );
    let (p, listen, admin) = start_ready(&dir, &ingress_yaml("", &policy, "", svc_addr));
    Side {
        p,
        listen,
        admin,
        _svc: svc,
        _dir: dir,
    }
}

fn code(listen: SocketAddr, user: &str) -> String {
    curl_ok(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "-H",
        &format!("x-user: {user}"),
        &format!("http://{listen}/"),
    ])
}

fn stat(admin: SocketAddr, name: &str) -> u64 {
    let text = curl_ok(&[&format!("http://{admin}/stats?filter=per-user")]);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("policy.ingress.per-user.{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn sidecars_share_one_fixed_window_limit() {
    let dir = TempDir::new("redis");
    let (_r, port) = redis_free_port(&[], &dir, false);
    let backend = format!("{{ address: 127.0.0.1:{port}, fail_open: false }}");
    let sa = sidecar(&backend, 5, "1m", "fixed_window", "ra");
    let sb = sidecar(&backend, 5, "1m", "fixed_window", "rb");
    let codes: Vec<String> = (0..8)
        .map(|i| code(if i % 2 == 0 { sa.listen } else { sb.listen }, "ann"))
        .collect();
    assert_eq!(codes, ["200", "200", "200", "200", "200", "429", "429", "429"]);
    assert_eq!(code(sb.listen, "bob"), "200", "another user has their own count");
    assert_eq!(redis_cli(port, &["get", "tessera:per-user:ann"]).trim(), "5");
    let ttl: i64 = redis_cli(port, &["pttl", "tessera:per-user:ann"])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "the window expires the key: {ttl}");
    let out = curl_ok(&["-s", "-i", "-H", "x-user: ann", &format!("http://{}/", sa.listen)]);
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-ratelimit-limit: 5"), "{out}");
}

#[test]
fn rolling_window_refills_on_the_servers_clock() {
    let dir = TempDir::new("redis");
    let (_r, port) = redis_free_port(&[], &dir, false);
    let backend = format!("{{ address: 127.0.0.1:{port} }}");
    // Three tokens, refilled over 1.5 s: one every half second.
    let sa = sidecar(&backend, 3, "1500ms", "rolling_window", "rr");
    let codes: Vec<String> = (0..4).map(|_| code(sa.listen, "ann")).collect();
    assert_eq!(codes, ["200", "200", "200", "429"]);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(code(sa.listen, "ann"), "200", "a token came back");
    assert_eq!(code(sa.listen, "ann"), "429");
}

#[test]
fn prefetch_spends_tokens_locally_and_never_exceeds_the_limit() {
    let dir = TempDir::new("redis");
    let (_r, port) = redis_free_port(&[], &dir, false);
    let backend = format!("{{ address: 127.0.0.1:{port}, prefetch: 4 }}");
    let sa = sidecar(&backend, 10, "1m", "fixed_window", "pa");
    let sb = sidecar(&backend, 10, "1m", "fixed_window", "pb");
    // Sidecar A takes tokens 4 at a time; B gets what is left.
    let a: Vec<String> = (0..8).map(|_| code(sa.listen, "ann")).collect();
    assert!(a.iter().all(|c| c == "200"), "{a:?}");
    let b: Vec<String> = (0..4).map(|_| code(sb.listen, "ann")).collect();
    let granted = a.iter().chain(&b).filter(|c| *c == "200").count();
    assert_eq!(granted, 10, "exactly the limit across both sidecars: a {a:?} b {b:?}");
    assert_eq!(stat(sa.admin, "redis_calls"), 2, "8 requests, 2 trips to Redis");
    assert_eq!(stat(sa.admin, "prefetch_hit"), 6);
}

#[test]
fn redis_killed_mid_load_fails_open_or_closed_and_recovers_on_restart() {
    let dir = TempDir::new("redis");
    let (mut r, port) = redis_free_port(&[], &dir, false);
    let open = format!("{{ address: 127.0.0.1:{port}, fail_open: true, timeout: 200ms }}");
    let closed = format!("{{ address: 127.0.0.1:{port}, fail_open: false, timeout: 200ms }}");
    let so = sidecar(&open, 1000, "1m", "fixed_window", "fo");
    let sc = sidecar(&closed, 1000, "1m", "fixed_window", "fc");
    assert_eq!(code(so.listen, "ann"), "200");
    assert_eq!(code(sc.listen, "ann"), "200");

    // Load on both while Redis dies: every request is answered, none hangs.
    let load = |listen: SocketAddr| {
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(2);
            let mut codes = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                codes.push((code(listen, "ann"), t.elapsed()));
            }
            codes
        })
    };
    let (to, tc) = (load(so.listen), load(sc.listen));
    std::thread::sleep(Duration::from_millis(500));
    let _ = r.child.kill();
    let _ = r.child.wait();
    let (open_codes, closed_codes) = (to.join().unwrap(), tc.join().unwrap());
    for (c, took) in open_codes.iter().chain(&closed_codes) {
        assert!(took < &Duration::from_secs(2), "a request took {took:?} ({c})");
    }
    assert!(open_codes.iter().all(|(c, _)| c == "200"), "fail-open: {open_codes:?}");
    assert!(
        closed_codes.iter().any(|(c, _)| c == "200"),
        "before the kill: {closed_codes:?}"
    );
    assert!(
        closed_codes.iter().any(|(c, _)| c == "500"),
        "after the kill: {closed_codes:?}"
    );
    assert!(
        closed_codes.iter().all(|(c, _)| c == "200" || c == "500"),
        "{closed_codes:?}"
    );
    let body = curl_ok(&["-s", "-H", "x-user: ann", &format!("http://{}/", sc.listen)]);
    assert!(body.starts_with("UNAVAILABLE: quota `per-user`: Redis"), "{body}");
    assert!(stat(so.admin, "failed_open") > 0, "{}", so.p.log());
    assert!(stat(sc.admin, "failed_closed") > 0, "{}", sc.p.log());
    assert!(
        sc.p.log().contains("fail_open=false"),
        "the failure is logged:\n{}",
        sc.p.log()
    );

    // Redis back on the same port: the fail-closed sidecar reconnects and counts again.
    let _r2 = redis(port, &[], &dir);
    let deadline = Instant::now() + Duration::from_secs(15);
    while code(sc.listen, "zed") != "200" {
        assert!(Instant::now() < deadline, "never reconnected; log:\n{}", sc.p.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(redis_cli(port, &["get", "tessera:per-user:zed"]).trim(), "1");
}

#[test]
fn a_redis_cluster_shares_the_limit() {
    let dir = TempDir::new("rcluster");
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for i in 0..3 {
        let node_dir = TempDir::new(&format!("rnode{i}"));
        let conf = node_dir.path("nodes.conf");
        let (node, port) = redis_free_port(
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf.to_str().unwrap(),
            ],
            &node_dir,
            true,
        );
        ports.push(port);
        nodes.push((node, node_dir));
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ports
        .iter()
        .all(|p| redis_cli(*p, &["cluster", "info"]).contains("cluster_state:ok"))
    {
        assert!(Instant::now() < deadline, "the cluster never became ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = dir;
    let backend = format!(
        "{{ cluster: [{}], fail_open: false, timeout: 500ms }}",
        addrs.join(", ")
    );
    let sa = sidecar(&backend, 3, "1m", "fixed_window", "ca");
    let sb = sidecar(&backend, 3, "1m", "fixed_window", "cb");
    // Users whose keys hash to different slots (and so, likely, nodes).
    for user in ["ann", "bob", "carl", "dora"] {
        let codes: Vec<String> = (0..4)
            .map(|i| code(if i % 2 == 0 { sa.listen } else { sb.listen }, user))
            .collect();
        assert_eq!(codes, ["200", "200", "200", "429"], "user {user}");
    }
    let found: usize = ports
        .iter()
        .map(|p| {
            redis_cli(*p, &["--scan", "--pattern", "tessera:per-user:*"])
                .lines()
                .count()
        })
        .sum();
    assert_eq!(found, 4, "one key per user across the cluster");
}

#[test]
fn a_stalled_redis_is_answered_within_the_timeout() {
    let dir = TempDir::new("redis");
    let (r, port) = redis_free_port(&[], &dir, false);
    let open = format!("{{ address: 127.0.0.1:{port}, fail_open: true, timeout: 150ms }}");
    let closed = format!("{{ address: 127.0.0.1:{port}, fail_open: false, timeout: 150ms }}");
    let so = sidecar(&open, 100, "1m", "fixed_window", "so");
    let sc = sidecar(&closed, 100, "1m", "fixed_window", "sc");
    assert_eq!(code(so.listen, "ann"), "200");
    assert_eq!(code(sc.listen, "ann"), "200");
    r.signal("STOP");
    for (side, want) in [(&so, "200"), (&sc, "500")] {
        let t = Instant::now();
        assert_eq!(code(side.listen, "ann"), want);
        assert!(t.elapsed() < Duration::from_secs(1), "answered after {:?}", t.elapsed());
        assert!(stat(side.admin, "redis_timeout") >= 1, "{}", side.p.log());
    }
    r.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while code(sc.listen, "ann") != "200" {
        assert!(Instant::now() < deadline, "never recovered; log:\n{}", sc.p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

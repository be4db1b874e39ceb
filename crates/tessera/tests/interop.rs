//! Interop with clients and servers we did not write: curl, h2load (nghttp2) and grpcio, through
//! the real binary. Missing tools fail the test with the command that installs them.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A sidecar in front of the sample service; returns (sidecar, service, listen addr, admin addr).
fn sidecar_before_sample(protocol: &str) -> (Proc, Proc, SocketAddr, SocketAddr, TempDir) {
    let (svc, svc_addr) = sample_service("svc");
    let dir = TempDir::new("interop");
    let f = dir.write("s.yaml", &sidecar_config(0, 0, svc_addr, protocol));
    let (p, listen, admin) = start_sidecar(&f, &["--concurrency", "2"]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
    (p, svc, listen, admin, dir)
}

#[test]
fn curl_over_http1_and_h2c() {
    let (_p, _svc, addr, admin, dir) = sidecar_before_sample("downstream");
    let base = format!("http://{addr}");
    let out = curl_ok(&["-w", "\n%{http_version}", &format!("{base}/hello")]);
    assert_eq!(out, "hello from svc (/hello)\n\n1.1");
    let out = curl_ok(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        &format!("{base}/hello"),
    ]);
    assert_eq!(out, "hello from svc (/hello)\n\n2");

    // A body with a length, a chunked upload, and a large upload curl sends with Expect: 100-continue.
    assert_eq!(
        curl_ok(&["--data-binary", "payload", &format!("{base}/echo")]),
        "payload"
    );
    let big: String = (0..2_000_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let f = dir.write("big.txt", &big);
    let at = format!("@{}", f.display());
    let chunked = curl_ok(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &at,
        &format!("{base}/echo"),
    ]);
    assert!(chunked == big, "chunked upload echoed ({} bytes)", chunked.len());
    let verbose = curl(&[
        "-v",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &at,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/echo"),
    ]);
    let err = String::from_utf8_lossy(&verbose.stderr);
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    assert_eq!(String::from_utf8_lossy(&verbose.stdout), "200");
    let h2 = curl_ok(&["--http2-prior-knowledge", "--data-binary", &at, &format!("{base}/echo")]);
    assert!(h2 == big, "h2 upload echoed");

    // Errors are Envoy's: 404 from the sample service passes through, HEAD works.
    assert_eq!(
        curl_ok(&["-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/status/404")]),
        "404"
    );
    assert_eq!(
        curl_ok(&["-I", "-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/hello")]),
        "200"
    );
    let stats = curl_ok(&[&format!("http://{admin}/stats/prometheus")]);
    assert!(
        stats.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"app\"}"),
        "{stats}"
    );
}

fn h2load(args: &[&str]) -> String {
    let h2load = tool("h2load", "apt-get install -y nghttp2-client");
    let out = Command::new("timeout")
        .arg("60")
        .arg(h2load)
        .args(args)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "h2load {args:?} failed:\n{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn assert_all_succeeded(report: &str, n: u32) {
    let want = format!("requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored, 0 timeout");
    assert!(report.contains(&want), "wanted `{want}` in:\n{report}");
    assert!(report.contains(&format!("status codes: {n} 2xx")), "{report}");
}

#[test]
fn h2load_h2c_and_http1_through_the_sidecar() {
    let (_p, _svc, addr, admin, _dir) = sidecar_before_sample("http1");
    let url = format!("http://{addr}/");
    assert_all_succeeded(&h2load(&["-n", "5000", "-c", "10", "-m", "10", &url]), 5000);
    assert_all_succeeded(&h2load(&["--h1", "-n", "5000", "-c", "10", &url]), 5000);
    let stats = curl_ok(&[&format!("http://{admin}/stats")]);
    assert!(stats.contains("http.http.downstream_rq_http2_total: 5000"), "{stats}");
    assert!(stats.contains("http.http.downstream_rq_http1_total: 5000"), "{stats}");
    assert!(stats.contains("cluster.app.upstream_rq_2xx: 10000"), "{stats}");
    // Pooling: upstream HTTP/1.1 connections follow concurrency (10 x 10 streams at most), not
    // the 10,000 requests.
    let cx: i64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cluster.app.upstream_cx_total: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(cx <= 110, "upstream connections: {cx}");
}

fn python() -> std::path::PathBuf {
    let py = tool("python3", "apt-get install -y python3");
    let ok = Command::new(&py)
        .args(["-c", "import grpc, grpc_health.v1.health"])
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "python3 lacks grpcio or grpcio-health-checking; run .ci/run, or: pip install grpcio grpcio-health-checking"
    );
    py
}

/// Starts the grpcio peer server; returns it (stdin open for `up`/`down`) and its port.
fn grpc_server(py: &std::path::Path) -> (Proc, u16) {
    let peer = repo().join("crates/tessera/tests/peers/grpc_peer.py");
    let mut server = Proc::spawn(Command::new(py).arg(&peer).arg("serve").stdin(Stdio::piped()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = server.log().lines().next() {
            match line.trim().parse::<u16>() {
                Ok(p) => return (server, p),
                Err(_) => panic!("grpc peer said: {}", server.log()),
            }
        }
        if let Some(st) = server.child.try_wait().unwrap() {
            panic!("grpc peer exited {st}: {}", server.log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "grpc peer did not start: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn grpcio_client_and_server_through_the_sidecar() {
    let py = python();
    let peer = repo().join("crates/tessera/tests/peers/grpc_peer.py");
    let (server, port) = grpc_server(&py);
    let dir = TempDir::new("grpc");
    let f = dir.write(
        "s.yaml",
        &sidecar_config(0, 0, format!("127.0.0.1:{port}").parse().unwrap(), "http2"),
    );
    let (_p, listen, admin) = start_sidecar(&f, &[]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));

    let out = Command::new("timeout")
        .arg("60")
        .arg(&py)
        .arg(&peer)
        .arg("call")
        .arg(listen.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpc client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["unary"], "unary:hi");
    assert_eq!(v["unary_trailer"], "unary-done", "trailing metadata intact");
    assert_eq!(
        v["server_stream"],
        serde_json::json!(["n-0", "n-1", "n-2", "n-3", "n-4"])
    );
    assert_eq!(v["server_stream_trailer"], "5");
    assert_eq!(v["client_stream"], "a+b+c");
    assert_eq!(v["bidi"], serde_json::json!(["echo:1", "echo:2", "echo:3"]));
    assert_eq!(
        v["fail"],
        serde_json::json!(["FAILED_PRECONDITION", "deliberate failure"]),
        "status errors pass through"
    );
    assert_eq!(v["metadata"]["x-client"], "py");
    assert_eq!(v["metadata"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["metadata"]["x-request-id"].as_str().map(str::len), Some(36));
    assert_eq!(v["unimplemented"], "UNIMPLEMENTED");
    let stats = curl_ok(&[&format!("http://{admin}/stats")]);
    assert!(stats.contains("cluster.app.upstream_rq_2xx: 7"), "{stats}");
    drop(server);
}

#[test]
fn grpc_client_gets_unavailable_when_the_backend_is_down() {
    let py = python();
    // Nothing listens on port 1 of loopback: connections are refused.
    let dir = TempDir::new("grpcdown");
    let f = dir.write("s.yaml", &sidecar_config(0, 0, "127.0.0.1:1".parse().unwrap(), "http2"));
    let (_p, listen, admin) = start_sidecar(&f, &[]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
    let script = format!(
        "import grpc\ntry:\n    grpc.insecure_channel('{listen}').unary_unary('/a.B/C')(b'x', timeout=10)\nexcept grpc.RpcError as e:\n    print(e.code().name, '|', e.details())\n"
    );
    let out = Command::new(&py).arg("-c").arg(script).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with("UNAVAILABLE | upstream connect error"),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn grpc_health_checks_against_grpcio_health_service() {
    use std::io::Write;
    let py = python();
    let (mut server, port) = grpc_server(&py);
    let dir = TempDir::new("grpchc");
    let cfg = sidecar_config(0, 0, format!("127.0.0.1:{port}").parse().unwrap(), "http2").replace(
        "  protocol: http2\n",
        "  protocol: http2\n  health_checks:\n  - { interval: 100ms, timeout: 1s, unhealthy_threshold: 1, healthy_threshold: 1, grpc_health_check: { service_name: tessera.test.Echo } }\n",
    );
    let f = dir.write("s.yaml", &cfg);
    let (_p, _listen, admin) = start_sidecar(&f, &[]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
    let flag = format!("app::127.0.0.1:{port}::health_flags::");
    let wait_flag = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = curl_ok(&[&format!("http://{admin}/clusters")]);
            if c.contains(&format!("{flag}{want}")) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never {want}:\n{c}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_flag("healthy");
    let stdin = server.child.stdin.as_mut().unwrap();
    writeln!(stdin, "down").unwrap();
    stdin.flush().unwrap();
    wait_flag("/failed_active_hc");
    let stdin = server.child.stdin.as_mut().unwrap();
    writeln!(stdin, "up").unwrap();
    stdin.flush().unwrap();
    wait_flag("healthy");
    let stats = curl_ok(&[&format!("http://{admin}/stats?filter=health_check")]);
    assert!(stats.contains("cluster.app.health_check.failure: "), "{stats}");
}

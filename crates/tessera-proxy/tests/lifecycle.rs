//! The proxy over time: reloads, drain, the admin API, access logs, idle timeouts, the TCP proxy
//! and filter chain choice by SNI.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;
use tessera_model::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn two_clusters(a: &Backend, b: &Backend, to: &str) -> String {
    http_config(
        &format!("          - {{ match: {{ prefix: / }}, route: {{ cluster: {to} }} }}"),
        &format!(
            "- {{ name: a, endpoints: [\"{}\"] }}\n- {{ name: b, endpoints: [\"{}\"] }}",
            a.addr, b.addr
        ),
    )
}

fn cfg(yaml: &str) -> Config {
    Config::from_yaml(yaml, "reload.yaml").unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn reload_routes_new_streams_on_open_connections_by_the_new_table() {
    let a = backend("a").await;
    let b = backend("b").await;
    let p = proxy(&two_clusters(&a, &b, "a")).await;
    let addr = listener(&p);
    let mut kept = h1(addr).await;
    let g = collect(
        kept.send_request(req("GET", "/1").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(g.body, "a /1");

    p.reload(cfg(&two_clusters(&a, &b, "b"))).await.unwrap();
    assert_eq!(listener(&p), addr, "the listener kept its socket");
    let g = collect(
        kept.send_request(req("GET", "/2").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(g.body, "b /2", "the open connection's next request used the new routes");
    assert_eq!(get(addr, "/3").await.body, "b /3");
    let dump = admin(&p, "/config_dump").await.body;
    assert!(dump.contains("\"version_info\": \"2\""), "{dump}");
    assert_eq!(stat(&p, "server.config_reload_success"), 1);
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let a = backend("a").await;
    let b = backend("b").await;
    let base = two_clusters(&a, &b, "a");
    let p = proxy(&base).await;
    let first = listener(&p);
    let with_second = base.replace(
        "clusters:",
        "- name: second\n  address: 127.0.0.1:0\n  filter_chains:\n  - tcp_proxy: { cluster: b }\nclusters:",
    );
    p.reload(cfg(&with_second)).await.unwrap();
    let second = p.listener_addr("second").expect("second listener");
    let mut s = TcpStream::connect(second).await.unwrap();
    s.write_all(b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.ends_with("b /tcp"), "{out}");

    // Only `second` remains: `http` stops accepting.
    let only_second = with_second.replacen(
        "- name: http\n  address: 127.0.0.1:0\n  filter_chains:\n  - http:",
        "- name: gone\n  address: 127.0.0.1:0\n  filter_chains:\n  - http:",
        1,
    );
    let only_second = only_second.replace("- name: gone", "- name: unused_http");
    p.reload(cfg(&only_second)).await.unwrap();
    assert!(p.listener_addr("http").is_none());
    eventually(Duration::from_secs(3), "old listener closed", || {
        std::net::TcpStream::connect(first).is_err()
    })
    .await;
    assert_eq!(
        p.listener_addr("second"),
        Some(second),
        "unchanged listener kept its socket"
    );
}

#[tokio::test]
async fn a_reload_that_cannot_apply_changes_nothing() {
    let a = backend("a").await;
    let b = backend("b").await;
    let p = proxy(&two_clusters(&a, &b, "a")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let bad = two_clusters(&a, &b, "b").replace(
        "clusters:",
        &format!("- name: clash\n  address: {busy}\n  filter_chains:\n  - tcp_proxy: {{ cluster: b }}\nclusters:"),
    );
    let err = p.reload(cfg(&bad)).await.unwrap_err().to_string();
    assert!(err.contains(&format!("listener `clash`: cannot bind {busy}")), "{err}");
    assert!(err.contains("another process"), "{err}");
    assert_eq!(get(listener(&p), "/x").await.body, "a /x", "old routes still in force");
    assert!(p.listener_addr("clash").is_none());
    assert_eq!(stat(&p, "server.config_reload_failure"), 1);
}

fn slow_backend(delay: Duration) -> support::Handler {
    Arc::new(move |_r: Request<Incoming>| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Response::new(full("finished"))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let be = backend_with(slow_backend(Duration::from_millis(600))).await;
    let p = proxy(&http_config(
        "          - { match: { prefix: / }, route: { cluster: be } }",
        &format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr),
    ))
    .await;
    let addr = listener(&p);
    let inflight = tokio::spawn(async move { get(addr, "/slow").await });
    eventually(Duration::from_secs(2), "request reached the backend", || {
        be.seen().len() == 1
    })
    .await;
    let t = Instant::now();
    p.shutdown(Duration::from_secs(10)).await;
    let took = t.elapsed();
    let g = inflight.await.unwrap();
    assert_eq!((g.status, g.body.as_str()), (StatusCode::OK, "finished"));
    assert!(
        took < Duration::from_secs(5),
        "shutdown waited only for the request: {took:?}"
    );
    assert!(std::net::TcpStream::connect(addr).is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_time_bounds_shutdown() {
    let be = backend_with(slow_backend(Duration::from_secs(30))).await;
    let p = proxy(&http_config(
        "          - { match: { prefix: / }, route: { cluster: be, timeout: 0s } }",
        &format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr),
    ))
    .await;
    let addr = listener(&p);
    let stuck = tokio::spawn(async move {
        let mut c = h1(addr).await;
        c.send_request(req("GET", "/forever").body(empty()).unwrap()).await
    });
    eventually(Duration::from_secs(2), "request reached the backend", || {
        be.seen().len() == 1
    })
    .await;
    let t = Instant::now();
    p.shutdown(Duration::from_millis(300)).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drain time respected: {:?}",
        t.elapsed()
    );
    let r = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("client released")
        .unwrap();
    assert!(
        r.is_err(),
        "the unfinished request was cut at the end of the drain time"
    );
}

#[tokio::test]
async fn admin_api_paths() {
    let be = backend("be").await;
    let p = proxy(&http_config(
        "          - { match: { prefix: / }, route: { cluster: be } }",
        &format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr),
    ))
    .await;
    get(listener(&p), "/x").await;

    let r = admin(&p, "/ready").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "LIVE\n"));
    assert_eq!(
        admin(&p, "/healthcheck/fail").await.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "mutations need POST"
    );
    assert_eq!(admin_post(&p, "/healthcheck/fail").await.status, StatusCode::OK);
    let r = admin(&p, "/ready").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    );
    assert_eq!(stat(&p, "server.live"), 0);
    admin_post(&p, "/healthcheck/ok").await;
    assert_eq!(admin(&p, "/ready").await.status, StatusCode::OK);

    let stats = admin(&p, "/stats").await.body;
    assert!(stats.contains("cluster.be.upstream_rq_2xx: 1\n"), "{stats}");
    assert!(stats.contains("http.ingress.downstream_rq_total: 1\n"), "{stats}");
    let filtered = admin(&p, "/stats?filter=%5Eserver%5C.").await.body;
    assert!(filtered.lines().all(|l| l.starts_with("server.")), "{filtered}");
    assert!(filtered.contains("server.concurrency: 2"), "{filtered}");
    let json: serde_json::Value = serde_json::from_str(&admin(&p, "/stats?format=json").await.body).unwrap();
    assert!(
        json["stats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "cluster.be.upstream_rq_total" && s["value"] == 1)
    );
    assert_eq!(admin(&p, "/stats?filter=(").await.status, StatusCode::BAD_REQUEST);
    let prom = admin(&p, "/stats/prometheus").await.body;
    assert!(
        prom.contains("# TYPE envoy_cluster_upstream_rq_total counter\n"),
        "{prom}"
    );
    assert!(
        prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"be\"} 1\n"),
        "{prom}"
    );

    let dump: serde_json::Value = serde_json::from_str(&admin(&p, "/config_dump").await.body).unwrap();
    assert_eq!(dump["config"]["clusters"][0]["name"], "be");
    assert_eq!(dump["config"]["listeners"][0]["name"], "http");

    let listeners = admin(&p, "/listeners").await.body;
    assert_eq!(listeners, format!("http::{}\n", listener(&p)));
    let lj: serde_json::Value = serde_json::from_str(&admin(&p, "/listeners?format=json").await.body).unwrap();
    assert_eq!(
        lj["listener_statuses"][0]["local_address"]["socket_address"]["port_value"],
        listener(&p).port()
    );

    let clusters = admin(&p, "/clusters").await.body;
    assert!(
        clusters.contains(&format!("be::{}::rq_success::1", be.addr)),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("be::{}::health_flags::healthy", be.addr)),
        "{clusters}"
    );
    let cj: serde_json::Value = serde_json::from_str(&admin(&p, "/clusters?format=json").await.body).unwrap();
    assert_eq!(
        cj["cluster_statuses"][0]["host_statuses"][0]["address"]["socket_address"]["port_value"],
        be.addr.port()
    );

    assert_eq!(admin(&p, "/nope").await.status, StatusCode::NOT_FOUND);
    assert!(admin(&p, "/").await.body.contains("/config_dump"));

    let quit = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(p.quit_requested(), admin_post(&p, "/quitquitquit"))
    });
    quit.await.expect("/quitquitquit signals the owner");
}

#[tokio::test]
async fn drain_listeners_stops_accepting() {
    let p = proxy(&http_config(
        "          - { match: { prefix: / }, direct_response: { status: 200 } }",
        "",
    ))
    .await;
    let addr = listener(&p);
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    admin_post(&p, "/drain_listeners").await;
    eventually(Duration::from_secs(3), "listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
}

#[tokio::test]
async fn access_logs_in_text_and_json() {
    let dir = std::env::temp_dir().join(format!("tessera-alog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text_path = dir.join("access.log");
    let json_path = dir.join("access.json");
    let be = backend("be").await;
    let cfg = http_config(
        "          - { name: to_be, match: { prefix: /ok }, route: { cluster: be } }\n          - { match: { prefix: /dead }, route: { cluster: dead } }",
        &format!("- {{ name: be, endpoints: [\"{}\"] }}\n- {{ name: dead, endpoints: [] }}", be.addr),
    )
    .replace(
        "stat_prefix: ingress",
        &format!(
            "stat_prefix: ingress\n      access_log:\n      - {{ path: {}, format: \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER% %ROUTE_NAME% %BYTES_SENT% %REQ(USER-AGENT)%\\n\" }}\n      - {{ path: {}, json_format: {{ code: \"%RESPONSE_CODE%\", flags: \"%RESPONSE_FLAGS%\", upstream: \"%UPSTREAM_HOST%\", id: \"%REQ(X-REQUEST-ID)%\" }} }}",
            text_path.display(),
            json_path.display()
        ),
    );
    let p = proxy(&cfg).await;
    let addr = listener(&p);
    send(
        addr,
        req("GET", "/ok?q=1")
            .header("user-agent", "test-agent")
            .body(empty())
            .unwrap(),
    )
    .await;
    get(addr, "/dead").await;
    get(addr, "/nowhere").await;
    eventually(Duration::from_secs(5), "three log lines", || {
        std::fs::read_to_string(&text_path)
            .map(|s| s.lines().count() == 3)
            .unwrap_or(false)
            && std::fs::read_to_string(&json_path)
                .map(|s| s.lines().count() == 3)
                .unwrap_or(false)
    })
    .await;
    let text = std::fs::read_to_string(&text_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "GET /ok?q=1 HTTP/1.1 200 - be to_be 10 test-agent");
    assert_eq!(lines[1], "GET /dead HTTP/1.1 503 UH dead - 19 -");
    assert_eq!(lines[2], "GET /nowhere HTTP/1.1 404 NR - - 0 -");
    let json: Vec<serde_json::Value> = std::fs::read_to_string(&json_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json[0]["code"], 200);
    assert_eq!(json[0]["upstream"], be.addr.to_string());
    assert_eq!(json[0]["id"].as_str().unwrap().len(), 36);
    assert_eq!(json[1]["flags"], "UH");
    assert!(json[2]["upstream"].is_null());
    assert_eq!(stat(&p, "access_log.written"), 6);
    assert_eq!(stat(&p, "access_log.dropped"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn idle_http_connections_are_closed() {
    let cfg = http_config(
        "          - { match: { prefix: / }, direct_response: { status: 200, body: hi } }",
        "",
    )
    .replace(
        "stat_prefix: ingress",
        "stat_prefix: ingress\n      idle_timeout: 200ms",
    );
    let p = proxy(&cfg).await;
    let mut s = TcpStream::connect(listener(&p)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hi"));
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed by the proxy")
        .unwrap();
    assert_eq!(n, 0);
    assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
}

/// A TCP server that echoes what it reads and, when the client half-closes, writes `bye` and closes.
async fn echo_tcp() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => {
                            let _ = s.write_all(b"bye").await;
                            return;
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

fn tcp_config(upstream: &str, extra: &str) -> String {
    format!(
        "listeners:\n- name: tcp\n  address: 127.0.0.1:0\n  filter_chains:\n  - tcp_proxy: {{ stat_prefix: t, cluster: up{extra} }}\nclusters:\n- {{ name: up, connect_timeout: 1s, endpoints: [\"{upstream}\"] }}\n"
    )
}

#[tokio::test]
async fn tcp_proxy_copies_both_ways_with_half_close() {
    let up = echo_tcp().await;
    let p = proxy(&tcp_config(&up.to_string(), "")).await;
    let mut s = TcpStream::connect(p.listener_addr("tcp").unwrap()).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 256) as u8).collect();
    let (mut r, mut w) = s.split();
    let (_, got) = tokio::join!(
        async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        }
    );
    assert_eq!(got.len(), payload.len() + 3);
    assert!(got[..payload.len()] == payload[..]);
    assert_eq!(
        &got[payload.len()..],
        b"bye",
        "the upstream answered after our half-close"
    );
    eventually(Duration::from_secs(2), "byte counters", || {
        p.stat("tcp.t.downstream_cx_rx_bytes_total") == Some(300_000)
            && p.stat("tcp.t.downstream_cx_tx_bytes_total") == Some(300_003)
    })
    .await;
    assert_eq!(stat(&p, "cluster.up.upstream_cx_tx_bytes_total"), 300_000);
}

#[tokio::test]
async fn tcp_proxy_idle_timeout_and_connect_failure() {
    let up = echo_tcp().await;
    let p = proxy(&tcp_config(&up.to_string(), ", idle_timeout: 200ms")).await;
    let mut s = TcpStream::connect(p.listener_addr("tcp").unwrap()).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).await.unwrap(), 1);
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b))
        .await
        .expect("idle close")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(stat(&p, "tcp.t.idle_timeout"), 1);

    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let p = proxy(&tcp_config(&dead.to_string(), "")).await;
    let mut s = TcpStream::connect(p.listener_addr("tcp").unwrap()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(stat(&p, "tcp.t.upstream_connect_fail"), 1);
}

/// Records the first bytes each connection sends.
async fn recorder() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                g.lock().unwrap().push(buf);
            });
        }
    });
    (addr, got)
}

#[tokio::test]
async fn filter_chains_are_chosen_by_sni_without_consuming_the_hello() {
    let (a, got_a) = recorder().await;
    let (b, got_b) = recorder().await;
    let yaml = format!(
        r#"
listeners:
- name: tls
  address: 127.0.0.1:0
  filter_chains:
  - filter_chain_match: {{ server_names: ["*.a.example"] }}
    tcp_proxy: {{ cluster: a }}
  - tcp_proxy: {{ cluster: b }}
clusters:
- {{ name: a, endpoints: ["{a}"] }}
- {{ name: b, endpoints: ["{b}"] }}
"#
    );
    let p = proxy(&yaml).await;
    let addr = p.listener_addr("tls").unwrap();
    let hello = tessera_proxy::testing::client_hello(Some("api.a.example"), &["h2"]);
    let other = tessera_proxy::testing::client_hello(Some("api.b.example"), &[]);
    for bytes in [&hello, &other, &b"plain text".to_vec()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    }
    eventually(Duration::from_secs(3), "three connections recorded", || {
        got_a.lock().unwrap().len() + got_b.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(
        got_a.lock().unwrap().clone(),
        vec![hello],
        "SNI match; the ClientHello arrived whole"
    );
    let b_seen = got_b.lock().unwrap().clone();
    assert_eq!(b_seen.len(), 2);
    assert!(b_seen.contains(&other) && b_seen.contains(&b"plain text".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_across_workers() {
    let be = backend("be").await;
    let p = proxy_with(
        &http_config(
            "          - { match: { prefix: / }, route: { cluster: be } }",
            &format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr),
        ),
        2,
    )
    .await;
    let addr = listener(&p);
    let mut tasks = Vec::new();
    for i in 0..200 {
        tasks.push(tokio::spawn(async move { get(addr, &format!("/{i}")).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().body, format!("be /{i}"));
    }
    assert_eq!(stat(&p, "http.ingress.downstream_rq_2xx"), 200);
    assert!(be.connections() <= 200);
}

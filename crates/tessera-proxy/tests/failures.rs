//! What clients get when things go wrong: Envoy-style local replies with the right status, body,
//! gRPC status and counters, and clear answers to malformed input. Never a hang.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn route_to(cluster_yaml: &str) -> String {
    http_config(
        "          - { match: { prefix: /, headers: [{ name: x-nope, present_match: true }] }, route: { cluster: be } }\n          - { match: { prefix: /api/ }, route: { cluster: be, timeout: 300ms } }",
        cluster_yaml,
    )
}

/// An address nothing listens on.
async fn dead_addr() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A raw TCP backend that runs `f` on every connection.
async fn raw_backend<F, Fut>(f: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let f = f.clone();
            tokio::spawn(async move { f(s).await });
        }
    });
    addr
}

async fn read_request(s: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            return;
        }
        buf.push(b[0]);
    }
}

#[tokio::test]
async fn no_route_is_404() {
    let p = proxy(&route_to("- { name: be, endpoints: [\"127.0.0.1:1\"] }")).await;
    let g = get(listener(&p), "/nowhere").await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    assert_eq!(g.body, "");
    assert_eq!(stat(&p, "http.ingress.no_route"), 1);
    assert_eq!(stat(&p, "http.ingress.downstream_rq_4xx"), 1);
}

#[tokio::test]
async fn empty_cluster_is_503_no_healthy_upstream() {
    let p = proxy(&route_to("- { name: be, endpoints: [] }")).await;
    let g = get(listener(&p), "/api/x").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(g.body, "no healthy upstream");
    assert_eq!(stat(&p, "cluster.be.upstream_cx_none_healthy"), 1);
}

#[tokio::test]
async fn refused_connection_is_503_connection_failure() {
    let dead = dead_addr().await;
    let p = proxy(&route_to(&format!(
        "- {{ name: be, connect_timeout: 1s, endpoints: [\"{dead}\"] }}"
    )))
    .await;
    let g = get(listener(&p), "/api/x").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        g.body
            .starts_with("upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
        "{}",
        g.body
    );
    assert_eq!(stat(&p, "cluster.be.upstream_cx_connect_fail"), 1);
    let clusters = admin(&p, "/clusters").await.body;
    assert!(
        clusters.contains(&format!("be::{dead}::cx_connect_fail::1")),
        "{clusters}"
    );
}

#[tokio::test]
async fn slow_upstream_is_504_after_the_route_timeout() {
    let be = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("late"))
        })
    }))
    .await;
    let p = proxy(&route_to(&format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr))).await;
    let t = Instant::now();
    let g = get(listener(&p), "/api/slow").await;
    let took = t.elapsed();
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(g.body, "upstream request timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
    assert_eq!(stat(&p, "cluster.be.upstream_rq_timeout"), 1);
}

#[tokio::test]
async fn upstream_reset_before_headers_is_503_connection_termination() {
    let addr = raw_backend(|mut s| async move {
        read_request(&mut s).await;
        drop(s);
    })
    .await;
    let p = proxy(&route_to(&format!("- {{ name: be, endpoints: [\"{addr}\"] }}"))).await;
    let g = get(listener(&p), "/api/x").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(g.body.contains("reset reason: connection termination"), "{}", g.body);
    assert_eq!(stat(&p, "cluster.be.upstream_rq_rx_reset"), 1);
}

#[tokio::test]
async fn upstream_closing_mid_body_reaches_the_client_as_an_error() {
    let addr = raw_backend(|mut s| async move {
        read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
    })
    .await;
    let p = proxy(&route_to(&format!("- {{ name: be, endpoints: [\"{addr}\"] }}"))).await;
    let mut c = h1(listener(&p)).await;
    let resp = c
        .send_request(req("GET", "/api/x").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("no hang");
    assert!(body.is_err(), "a truncated body must not look complete");
    eventually(Duration::from_secs(2), "reset counted", || {
        p.stat("cluster.be.upstream_rq_rx_reset") == Some(1)
    })
    .await;
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let be = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            let mut r = Response::new(full("backend says no"));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        })
    }))
    .await;
    let p = proxy(&route_to(&format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr))).await;
    let g = get(listener(&p), "/api/x").await;
    assert_eq!(
        (g.status, g.body.as_str()),
        (StatusCode::BAD_GATEWAY, "backend says no")
    );
    assert_eq!(stat(&p, "cluster.be.upstream_rq_5xx"), 1);
}

#[tokio::test]
async fn a_stale_pooled_connection_is_replaced_without_an_error() {
    // Answers one request per connection with keep-alive, then closes it while idle, as a
    // backend with a short idle timeout does.
    let addr = raw_backend(|mut s| async move {
        read_request(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(s);
    })
    .await;
    let p = proxy_with(&route_to(&format!("- {{ name: be, endpoints: [\"{addr}\"] }}")), 1).await;
    let mut c = h1(listener(&p)).await;
    for _ in 0..5 {
        let g = collect(
            c.send_request(req("GET", "/api/x").body(empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((g.status, g.body.as_str()), (StatusCode::OK, "ok"));
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
}

#[tokio::test]
async fn grpc_requests_get_grpc_local_replies() {
    let p = proxy(&route_to("- { name: be, endpoints: [] }")).await;
    let mut c = h2(listener(&p)).await;
    let r = Request::post("http://svc/api/Method")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    let g = collect(c.send_request(r).await.unwrap()).await;
    assert_eq!(g.status, StatusCode::OK, "gRPC errors ride on HTTP 200");
    assert_eq!(g.headers["grpc-status"], "14", "UNAVAILABLE");
    assert_eq!(g.headers["grpc-message"], "no healthy upstream");
    assert_eq!(g.headers["content-type"], "application/grpc");
}

#[tokio::test]
async fn malformed_http1_is_400() {
    let p = proxy(&route_to("- { name: be, endpoints: [] }")).await;
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    ] {
        let out = raw(listener(&p), bad, Duration::from_secs(5)).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{:?} -> {out:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let out = raw(listener(&p), b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "no Host: {out}");
    let out = raw(
        listener(&p),
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "two Hosts: {out}");
}

#[tokio::test]
async fn oversized_and_too_many_headers_are_431() {
    let cfg = http_config(
        "          - { match: { prefix: / }, direct_response: { status: 200 } }",
        "",
    )
    .replace(
        "stat_prefix: ingress",
        "stat_prefix: ingress\n      max_request_headers_kb: 16\n      max_request_headers_count: 20",
    );
    let p = proxy(&cfg).await;
    let addr = listener(&p);
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "x".repeat(20 * 1024));
    let out = raw(addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{}", &out[..out.len().min(100)]);
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = raw(addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // HTTP/2 has no codec-level count limit in hyper: the connection manager enforces it.
    let mut c = h2(addr).await;
    let mut r = Request::get("http://a/");
    for i in 0..30 {
        r = r.header(format!("x-h{i}"), "v");
    }
    let g = collect(c.send_request(r.body(empty()).unwrap()).await.unwrap()).await;
    assert_eq!(g.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(stat(&p, "http.ingress.downstream_rq_too_many_headers"), 1);
    // Within the limits all is well.
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_request_body_that_never_arrives_is_408() {
    let be = backend_with(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let b = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Response::new(full(b))
        })
    }))
    .await;
    let cfg = http_config(
        "          - { match: { prefix: / }, route: { cluster: be } }",
        &format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr),
    )
    .replace(
        "stat_prefix: ingress",
        "stat_prefix: ingress\n      request_timeout: 300ms",
    );
    let p = proxy(&cfg).await;
    let t = Instant::now();
    let out = raw(
        listener(&p),
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
        Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(stat(&p, "http.ingress.downstream_rq_timeout"), 1);
    // A request that arrives whole in time is not affected.
    let g = send(listener(&p), req("POST", "/").body(full("0123456789")).unwrap()).await;
    assert_eq!(g.body, "0123456789");
}

#[tokio::test]
async fn unanswered_connect_is_503_after_the_connect_timeout() {
    // A listener that never accepts and whose accept queue is full: the kernel drops further
    // SYNs, so a connect hangs as it would towards a host that is down or firewalled.
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        fillers.push(c);
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    let p = proxy(&route_to(&format!(
        "- {{ name: be, connect_timeout: 250ms, endpoints: [\"{addr}\"] }}"
    )))
    .await;
    let t = Instant::now();
    let g = get(listener(&p), "/api/x").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(g.body.ends_with("reset reason: connection timeout"), "{}", g.body);
    assert!(
        t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stat(&p, "cluster.be.upstream_cx_connect_timeout"), 1);
    drop(fillers);
}

#[tokio::test]
async fn a_client_that_gives_up_is_counted_and_logged_as_a_downstream_reset() {
    let dir = std::env::temp_dir().join(format!("tessera-dc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let logf = dir.join("access.log");
    let be = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full("too late"))
        })
    }))
    .await;
    let cfg = route_to(&format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr)).replace(
        "stat_prefix: ingress",
        &format!("stat_prefix: ingress\n      access_log: [{{ path: {}, format: \"%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\\n\" }}]", logf.display()),
    );
    let p = proxy(&cfg).await;
    let mut s = tokio::net::TcpStream::connect(listener(&p)).await.unwrap();
    s.write_all(b"GET /api/slow HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    eventually(Duration::from_secs(2), "request reached the backend", || {
        be.seen().len() == 1
    })
    .await;
    assert_eq!(stat(&p, "cluster.be.upstream_rq_active"), 1);
    drop(s);
    eventually(Duration::from_secs(3), "reset counted", || {
        p.stat("http.ingress.downstream_rq_rx_reset") == Some(1)
    })
    .await;
    assert_eq!(stat(&p, "cluster.be.upstream_rq_tx_reset"), 1);
    assert_eq!(stat(&p, "cluster.be.upstream_rq_active"), 0, "no leaked upstream gauge");
    assert_eq!(
        stat(&p, "http.ingress.downstream_rq_active"),
        0,
        "no leaked downstream gauge"
    );
    assert_eq!(
        stat(&p, "http.ingress.downstream_rq_completed"),
        0,
        "no response went out"
    );
    eventually(Duration::from_secs(3), "log line", || {
        std::fs::read_to_string(&logf).is_ok_and(|s| s.lines().count() == 1)
    })
    .await;
    assert_eq!(std::fs::read_to_string(&logf).unwrap(), "0 DC be\n");
    let _ = std::fs::remove_dir_all(&dir);
}

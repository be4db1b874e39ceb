//! Traffic management end to end, against backends that fail on demand: retries, outlier
//! detection, health checks, circuit breakers, timeouts, fault injection, mirroring, local rate
//! limits, consistent hashing and subsets.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Channel};
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn cfg(routes: &str, clusters: &str) -> String {
    http_config(routes, clusters)
}

/// A backend that answers `status` with body `name`.
async fn status_backend(name: &'static str, status: u16) -> Backend {
    backend_with(Arc::new(move |_r: Request<Incoming>| {
        Box::pin(async move {
            let mut r = Response::new(full(name));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            r
        })
    }))
    .await
}

async fn dead_port() -> std::net::SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

#[tokio::test]
async fn retries_go_around_a_dead_host_and_a_failing_one() {
    let good = status_backend("good", 200).await;
    let bad = status_backend("bad", 503).await;
    let dead = dead_port().await;
    let routes = r#"
          - match: { prefix: / }
            route:
              cluster: c
              retry_policy: { retry_on: "5xx,connect-failure", num_retries: 3, retry_back_off: { base_interval: 1ms } }"#;
    let clusters = format!(
        "- {{ name: c, endpoints: [\"{}\", \"{}\", \"{dead}\"] }}",
        good.addr, bad.addr
    );
    let p = proxy(&cfg(routes, &clusters)).await;
    let addr = listener(&p);
    for i in 0..60 {
        let g = get(addr, &format!("/{i}")).await;
        assert_eq!((g.status, g.body.as_str()), (StatusCode::OK, "good"), "request {i}");
    }
    assert!(
        stat(&p, "cluster.c.upstream_rq_retry") >= 20,
        "{}",
        stat(&p, "cluster.c.upstream_rq_retry")
    );
    assert!(stat(&p, "cluster.c.upstream_rq_retry_success") >= 1);
    assert!(stat(&p, "cluster.c.upstream_cx_connect_fail") >= 1);
}

#[tokio::test]
async fn exhausted_retries_answer_with_the_last_failure_and_urx() {
    let bad = status_backend("bad", 503).await;
    let routes = r#"
          - match: { prefix: / }
            route: { cluster: c, retry_policy: { retry_on: 5xx, num_retries: 2, retry_back_off: { base_interval: 1ms } } }"#;
    let p = proxy(&cfg(routes, &format!("- {{ name: c, endpoints: [\"{}\"] }}", bad.addr))).await;
    let g = get(listener(&p), "/").await;
    assert_eq!((g.status, g.body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "bad"));
    assert_eq!(bad.seen().len(), 3, "one attempt and two retries");
    assert_eq!(stat(&p, "cluster.c.upstream_rq_retry"), 2);
    assert_eq!(stat(&p, "cluster.c.upstream_rq_retry_limit_exceeded"), 1);
}

/// A raw backend that reads a request and all of its body, then closes without answering.
async fn resetting_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Read everything the client sends (until it pauses), then drop the connection.
                let mut buf = [0u8; 65536];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                }
                drop(s);
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn posts_are_not_retried_after_a_reset_but_gets_are() {
    let (reset, hits) = resetting_backend().await;
    let routes = r#"
          - match: { prefix: / }
            route: { cluster: c, retry_policy: { retry_on: "5xx,reset", num_retries: 2, retry_back_off: { base_interval: 1ms } } }"#;
    let p = proxy(&cfg(routes, &format!("- {{ name: c, endpoints: [\"{reset}\"] }}"))).await;
    let addr = listener(&p);
    let g = send(addr, req("POST", "/").body(full("order #1")).unwrap()).await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a POST the upstream may have processed is sent once"
    );
    let g = get(addr, "/").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hits.load(Ordering::SeqCst), 4, "a GET is tried three times");
}

#[tokio::test]
async fn the_request_body_is_replayed_on_retry_within_the_buffer_limit() {
    let (reset, _) = resetting_backend().await;
    let echo = backend_with(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move { Response::new(full(req.into_body().collect().await.unwrap().to_bytes())) })
    }))
    .await;
    let routes = r#"
          - match: { prefix: / }
            route:
              cluster: c
              per_request_buffer_limit_bytes: 100000
              retry_policy: { retry_on: reset, num_retries: 3, retry_back_off: { base_interval: 1ms }, skip_previous_hosts: true }"#;
    let p = proxy(&cfg(
        routes,
        &format!(
            "- {{ name: c, lb_policy: random, endpoints: [\"{reset}\", \"{}\"] }}",
            echo.addr
        ),
    ))
    .await;
    let addr = listener(&p);
    let body: String = (0..50_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    for _ in 0..10 {
        // A streamed (chunked) PUT: idempotent, so retried after a reset.
        let (mut tx, ch) = Channel::<Bytes, hyper::Error>::new(4);
        let b2 = body.clone();
        tokio::spawn(async move {
            for chunk in b2.as_bytes().chunks(10_000) {
                let _ = tx.send_data(Bytes::copy_from_slice(chunk)).await;
            }
        });
        let g = send(addr, req("PUT", "/").body(ch.boxed()).unwrap()).await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
        assert!(g.body == body, "the echo got the whole body ({} bytes)", g.body.len());
    }
    // Past the buffer limit a body cannot be replayed, so there is no retry.
    let big: String = "x".repeat(200_000);
    let mut failed = 0;
    for _ in 0..10 {
        let g = send(addr, req("PUT", "/").body(full(big.clone())).unwrap()).await;
        if g.status != StatusCode::OK {
            failed += 1;
        }
    }
    assert!(
        failed > 0,
        "some big bodies hit the resetting host and could not be retried"
    );
}

#[tokio::test]
async fn outlier_detection_ejects_a_host_that_keeps_failing() {
    let good = status_backend("good", 200).await;
    let bad = status_backend("bad", 500).await;
    let routes = "          - { match: { prefix: / }, route: { cluster: c } }";
    let clusters = format!(
        "- {{ name: c, outlier_detection: {{ consecutive_5xx: 3, interval: 100ms, base_ejection_time: 30s, max_ejection_percent: 50 }}, endpoints: [\"{}\", \"{}\"] }}",
        good.addr, bad.addr
    );
    let p = proxy_with(&cfg(routes, &clusters), 1).await;
    let addr = listener(&p);
    let mut c = h1(addr).await;
    for _ in 0..20 {
        collect(c.send_request(req("GET", "/").body(empty()).unwrap()).await.unwrap()).await;
    }
    assert_eq!(
        stat(&p, "cluster.c.outlier_detection.ejections_enforced_consecutive_5xx"),
        1
    );
    assert_eq!(stat(&p, "cluster.c.outlier_detection.ejections_active"), 1);
    let clusters = admin(&p, "/clusters").await.body;
    assert!(
        clusters.contains(&format!("c::{}::health_flags::/failed_outlier_check", bad.addr)),
        "{clusters}"
    );
    let before = bad.seen().len();
    for _ in 0..30 {
        let g = collect(c.send_request(req("GET", "/").body(empty()).unwrap()).await.unwrap()).await;
        assert_eq!(g.body, "good");
    }
    assert_eq!(bad.seen().len(), before, "the ejected host got nothing");
}

#[tokio::test]
async fn ejection_ends_after_the_ejection_time() {
    let good = status_backend("good", 200).await;
    let flaky_down = Arc::new(AtomicBool::new(true));
    let f = flaky_down.clone();
    let flaky = backend_with(Arc::new(move |_r: Request<Incoming>| {
        let down = f.load(Ordering::SeqCst);
        Box::pin(async move {
            let mut r = Response::new(full("flaky"));
            if down {
                *r.status_mut() = StatusCode::BAD_GATEWAY;
            }
            r
        })
    }))
    .await;
    let clusters = format!(
        "- {{ name: c, outlier_detection: {{ consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100, consecutive_5xx: 100, interval: 50ms, base_ejection_time: 300ms, max_ejection_percent: 50 }}, endpoints: [\"{}\", \"{}\"] }}",
        good.addr, flaky.addr
    );
    let p = proxy_with(
        &cfg("          - { match: { prefix: / }, route: { cluster: c } }", &clusters),
        1,
    )
    .await;
    let addr = listener(&p);
    for _ in 0..10 {
        get(addr, "/").await;
    }
    assert_eq!(
        stat(
            &p,
            "cluster.c.outlier_detection.ejections_enforced_consecutive_gateway_failure"
        ),
        1
    );
    flaky_down.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(3), "the host came back", || {
        p.stat("cluster.c.outlier_detection.ejections_active") == Some(0)
    })
    .await;
    let mut flaky_hits = 0;
    for _ in 0..20 {
        if get(addr, "/").await.body == "flaky" {
            flaky_hits += 1;
        }
    }
    assert!(flaky_hits > 0, "traffic returns to the host");
}

#[tokio::test]
async fn health_checks_take_a_host_out_and_bring_it_back() {
    let sick = Arc::new(AtomicBool::new(false));
    let s = sick.clone();
    let a = backend_with(Arc::new(move |r: Request<Incoming>| {
        let status = if r.uri().path() == "/healthz" && s.load(Ordering::SeqCst) {
            503
        } else {
            200
        };
        Box::pin(async move {
            let mut resp = Response::new(full("a"));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            resp
        })
    }))
    .await;
    let b = status_backend("b", 200).await;
    let clusters = format!(
        r#"- name: c
  health_checks:
  - {{ interval: 100ms, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 2, http_health_check: {{ path: /healthz }} }}
  endpoints: ["{}", "{}"]"#,
        a.addr, b.addr
    );
    let p = proxy(&cfg(
        "          - { match: { prefix: / }, route: { cluster: c } }",
        &clusters,
    ))
    .await;
    let addr = listener(&p);
    // The first round ran before the config was applied: both hosts are in.
    let clusters = admin(&p, "/clusters").await.body;
    assert!(
        clusters.contains(&format!("c::{}::health_flags::healthy", a.addr)),
        "{clusters}"
    );
    let hc = a.seen().iter().filter(|s| s.uri == "/healthz").count();
    assert!(hc >= 1 && a.last().headers["user-agent"] == "Envoy/HC");
    sick.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a marked unhealthy", || {
        p.stat("cluster.c.membership_healthy") == Some(1)
    })
    .await;
    let clusters = admin(&p, "/clusters").await.body;
    assert!(
        clusters.contains(&format!("c::{}::health_flags::/failed_active_hc", a.addr)),
        "{clusters}"
    );
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.body, "b");
    }
    sick.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a healthy again", || {
        p.stat("cluster.c.membership_healthy") == Some(2)
    })
    .await;
    assert!(stat(&p, "cluster.c.health_check.failure") >= 2);
}

#[tokio::test]
async fn tcp_health_check_sends_and_expects_bytes() {
    // A line protocol server: answers PING with PONG, anything else with ERR.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answer = Arc::new(std::sync::Mutex::new(&b"PONG"[..]));
    let ans = answer.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ans = ans.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                if let Ok(n) = s.read(&mut buf).await {
                    let reply: &[u8] = if &buf[..n] == b"PING" {
                        *ans.lock().unwrap()
                    } else {
                        b"ERR"
                    };
                    let _ = s.write_all(reply).await;
                }
            });
        }
    });
    let clusters = format!(
        "- {{ name: c, health_checks: [{{ interval: 50ms, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{ send: {{ text: \"50494e47\" }}, receive: [{{ string: PONG }}] }} }}], endpoints: [\"{addr}\"] }}"
    );
    let p = proxy(&format!("listeners: []\nclusters:\n{clusters}\n")).await;
    eventually(Duration::from_secs(3), "healthy", || {
        p.stat("cluster.c.membership_healthy") == Some(1)
    })
    .await;
    *answer.lock().unwrap() = b"NOPE";
    eventually(Duration::from_secs(3), "unhealthy on a wrong reply", || {
        p.stat("cluster.c.membership_healthy") == Some(0)
    })
    .await;
}

#[tokio::test]
async fn max_requests_overflow_answers_503_uo_at_once() {
    let slow = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Response::new(full("slow"))
        })
    }))
    .await;
    let clusters = format!(
        "- {{ name: c, circuit_breakers: {{ thresholds: [{{ max_requests: 2 }}] }}, endpoints: [\"{}\"] }}",
        slow.addr
    );
    let p = proxy(&cfg(
        "          - { match: { prefix: / }, route: { cluster: c } }",
        &clusters,
    ))
    .await;
    let addr = listener(&p);
    let mut tasks = Vec::new();
    for i in 0..2 {
        tasks.push(tokio::spawn(async move { get(addr, &format!("/{i}")).await }));
    }
    eventually(Duration::from_secs(2), "two in flight", || slow.seen().len() == 2).await;
    let t = Instant::now();
    let g = get(addr, "/third").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(g.body.ends_with("reset reason: overflow"), "{}", g.body);
    assert!(t.elapsed() < Duration::from_millis(300), "answered at once, not queued");
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(stat(&p, "cluster.c.upstream_rq_pending_overflow"), 1);
}

#[tokio::test]
async fn max_connections_queue_pending_requests_within_bounds() {
    let slow = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(full("ok"))
        })
    }))
    .await;
    let clusters = format!(
        "- {{ name: c, circuit_breakers: {{ thresholds: [{{ max_connections: 1, max_pending_requests: 1 }}] }}, endpoints: [\"{}\"] }}",
        slow.addr
    );
    let p = proxy_with(
        &cfg("          - { match: { prefix: / }, route: { cluster: c } }", &clusters),
        1,
    )
    .await;
    let addr = listener(&p);
    let first = tokio::spawn(async move { get(addr, "/1").await });
    eventually(Duration::from_secs(2), "first in flight", || slow.seen().len() == 1).await;
    let second = tokio::spawn(async move { get(addr, "/2").await });
    eventually(Duration::from_secs(2), "second pending", || {
        p.stat("cluster.c.upstream_rq_pending_active") == Some(1)
    })
    .await;
    let third = get(addr, "/3").await;
    assert_eq!(
        third.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the pending queue is full"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        second.await.unwrap().status,
        StatusCode::OK,
        "the pending request got the connection back"
    );
    assert_eq!(slow.connections(), 1, "never more than max_connections");
}

#[tokio::test]
async fn per_try_timeout_moves_on_to_another_host() {
    let slow = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full("slow"))
        })
    }))
    .await;
    let fast = status_backend("fast", 200).await;
    let routes = r#"
          - match: { prefix: / }
            route: { cluster: c, timeout: 3s, retry_policy: { retry_on: 5xx, num_retries: 2, per_try_timeout: 150ms, retry_back_off: { base_interval: 1ms } } }"#;
    let p = proxy(&cfg(
        routes,
        &format!("- {{ name: c, endpoints: [\"{}\", \"{}\"] }}", slow.addr, fast.addr),
    ))
    .await;
    let addr = listener(&p);
    for _ in 0..6 {
        let t = Instant::now();
        let g = get(addr, "/").await;
        assert_eq!(g.body, "fast");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    assert!(stat(&p, "cluster.c.upstream_rq_per_try_timeout") >= 1);
}

#[tokio::test]
async fn grpc_timeout_header_sets_the_deadline() {
    let slow = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full("late"))
        })
    }))
    .await;
    let p = proxy(&cfg(
        "          - { match: { prefix: / }, route: { cluster: c, timeout: 10s } }",
        &format!("- {{ name: c, protocol: http2, endpoints: [\"{}\"] }}", slow.addr),
    ))
    .await;
    let mut c = h2(listener(&p)).await;
    let r = Request::post("http://svc/pkg.S/M")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "200m")
        .body(full(&b"\0\0\0\0\0"[..]))
        .unwrap();
    let t = Instant::now();
    let g = collect(c.send_request(r).await.unwrap()).await;
    assert!(
        t.elapsed() >= Duration::from_millis(200) && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(g.headers["grpc-status"], "4", "DEADLINE_EXCEEDED");
}

#[tokio::test]
async fn max_stream_duration_ends_long_streams() {
    let streamer = backend_with(Arc::new(|_r: Request<Incoming>| {
        Box::pin(async {
            let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(4);
            tokio::spawn(async move {
                for _ in 0..50 {
                    if tx.send_data(Bytes::from_static(b"tick\n")).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            Response::new(body.boxed())
        })
    }))
    .await;
    let routes = "          - { match: { prefix: / }, route: { cluster: c, max_stream_duration: { max_stream_duration: 300ms } } }";
    let p = proxy(&cfg(
        routes,
        &format!("- {{ name: c, endpoints: [\"{}\"] }}", streamer.addr),
    ))
    .await;
    let mut c = h1(listener(&p)).await;
    let resp = c.send_request(req("GET", "/").body(empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t = Instant::now();
    let r = resp.into_body().collect().await;
    assert!(r.is_err(), "the stream was cut");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    eventually(Duration::from_secs(2), "counted", || {
        p.stat("cluster.c.upstream_rq_max_duration_reached") == Some(1)
    })
    .await;
}

#[tokio::test]
async fn fault_injection_aborts_and_delays_at_the_configured_rates() {
    let be = backend("be").await;
    let routes = r#"
          - match: { prefix: /abort }
            route: { cluster: c }
            fault: { abort: { http_status: 555, percentage: 30 } }
          - match: { prefix: /delay }
            route: { cluster: c }
            fault: { delay: { fixed_delay: 200ms, percentage: 100 }, headers: [{ name: x-chaos, exact: "on" }] }
          - match: { prefix: /grpc }
            route: { cluster: c }
            fault: { abort: { grpc_status: UNAVAILABLE } }"#;
    let p = proxy(&cfg(routes, &format!("- {{ name: c, endpoints: [\"{}\"] }}", be.addr))).await;
    let addr = listener(&p);
    let mut c = h1(addr).await;
    let mut aborted = 0;
    for _ in 0..400 {
        let g = collect(
            c.send_request(req("GET", "/abort").body(empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        if g.status.as_u16() == 555 {
            aborted += 1;
        } else {
            assert_eq!(g.status, StatusCode::OK);
        }
    }
    // 30% of 400 = 120; ±4 standard deviations (sd ≈ 9.2).
    assert!((83..=157).contains(&aborted), "{aborted} of 400 aborted");
    assert_eq!(stat(&p, "http.ingress.fault.aborts_injected"), aborted as i128);
    let t = Instant::now();
    send(
        addr,
        req("GET", "/delay").header("x-chaos", "on").body(empty()).unwrap(),
    )
    .await;
    assert!(t.elapsed() >= Duration::from_millis(200));
    let t = Instant::now();
    get(addr, "/delay").await;
    assert!(t.elapsed() < Duration::from_millis(150), "no header, no delay");
    let g = send(
        addr,
        req("POST", "/grpc")
            .header("content-type", "application/grpc")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (g.status, g.headers["grpc-status"].to_str().unwrap()),
        (StatusCode::OK, "14")
    );
}

#[tokio::test]
async fn mirrored_requests_reach_the_shadow_and_never_touch_the_answer() {
    let primary = backend_with(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move { Response::new(full(req.into_body().collect().await.unwrap().to_bytes())) })
    }))
    .await;
    let shadow_bodies = Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
    let sb = shadow_bodies.clone();
    let shadow = backend_with(Arc::new(move |req: Request<Incoming>| {
        let sb = sb.clone();
        Box::pin(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            sb.lock().unwrap().push(body);
            let mut r = Response::new(full("shadow says no"));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }))
    .await;
    let dead = dead_port().await;
    let routes = r#"
          - match: { prefix: /m }
            route: { cluster: primary, request_mirror_policies: [{ cluster: shadow, percentage: 100 }, { cluster: dead }] }"#;
    let clusters = format!(
        "- {{ name: primary, endpoints: [\"{}\"] }}\n- {{ name: shadow, endpoints: [\"{}\"] }}\n- {{ name: dead, endpoints: [\"{dead}\"] }}",
        primary.addr, shadow.addr
    );
    let p = proxy(&cfg(routes, &clusters)).await;
    let addr = listener(&p);
    for i in 0..5 {
        let g = send(
            addr,
            Request::post("/m")
                .header("host", "shop.example:8080")
                .body(full(format!("order {i}")))
                .unwrap(),
        )
        .await;
        assert_eq!(
            (g.status, g.body),
            (StatusCode::OK, format!("order {i}")),
            "the primary's answer, untouched"
        );
    }
    eventually(Duration::from_secs(3), "five shadow copies", || {
        shadow_bodies.lock().unwrap().len() == 5
    })
    .await;
    let mut got: Vec<Bytes> = shadow_bodies.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        (0..5).map(|i| Bytes::from(format!("order {i}"))).collect::<Vec<_>>()
    );
    assert_eq!(
        shadow.last().headers["host"],
        "shop.example-shadow:8080",
        "Envoy's -shadow suffix, port kept"
    );
    eventually(Duration::from_secs(3), "dead shadow counted", || {
        p.stat("cluster.dead.upstream_rq_rx_reset") == Some(5)
    })
    .await;
}

#[tokio::test]
async fn local_rate_limit_answers_429_with_headers() {
    let be = backend("be").await;
    let yaml = cfg(
        r#"          - { match: { prefix: /per-ip }, route: { cluster: c }, local_rate_limit: { token_bucket: { max_tokens: 2, fill_interval: 1h }, descriptor: { source_ip: true } } }
          - { match: { prefix: / }, route: { cluster: c } }"#,
        &format!("- {{ name: c, endpoints: [\"{}\"] }}", be.addr),
    )
    .replace("stat_prefix: ingress", "stat_prefix: ingress\n      local_rate_limit: { token_bucket: { max_tokens: 5, tokens_per_fill: 5, fill_interval: 1h } }");
    let p = proxy(&yaml).await;
    let addr = listener(&p);
    for _ in 0..5 {
        assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    }
    let g = get(addr, "/").await;
    assert_eq!(g.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(g.body, "local_rate_limited");
    assert_eq!(g.headers["x-ratelimit-limit"], "5");
    assert_eq!(g.headers["x-ratelimit-remaining"], "0");
    assert!(g.headers.contains_key("x-ratelimit-reset"));
    // The route's own bucket replaces the connection manager's.
    assert_eq!(get(addr, "/per-ip").await.status, StatusCode::OK);
    assert_eq!(get(addr, "/per-ip").await.status, StatusCode::OK);
    assert_eq!(get(addr, "/per-ip").await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(stat(&p, "http.ingress.local_rate_limit.rate_limited"), 2);
}

#[tokio::test]
async fn consistent_hashing_keeps_a_key_on_one_host() {
    let backs = [backend("a").await, backend("b").await, backend("c").await];
    for policy in ["ring_hash", "maglev"] {
        let routes = "          - { match: { prefix: / }, route: { cluster: c, hash_policy: [{ header: { header_name: x-user } }] } }";
        let clusters = format!(
            "- {{ name: c, lb_policy: {policy}, endpoints: [\"{}\", \"{}\", \"{}\"] }}",
            backs[0].addr, backs[1].addr, backs[2].addr
        );
        let p = proxy(&cfg(routes, &clusters)).await;
        let addr = listener(&p);
        let mut seen_hosts = std::collections::HashSet::new();
        for user in 0..30 {
            let mut first = None;
            for _ in 0..5 {
                let g = send(
                    addr,
                    req("GET", "/")
                        .header("x-user", format!("user{user}"))
                        .body(empty())
                        .unwrap(),
                )
                .await;
                let host = g.body.split(' ').next().unwrap().to_string();
                assert_eq!(*first.get_or_insert(host.clone()), host, "{policy}: user{user} moved");
                seen_hosts.insert(host);
            }
        }
        assert_eq!(seen_hosts.len(), 3, "{policy}: 30 users spread over the hosts");
    }
}

#[tokio::test]
async fn subsets_route_by_labels_and_split_by_weight() {
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let routes = r#"
          - match: { prefix: /, headers: [{ name: end-user, exact: jason }] }
            route: { cluster: reviews, metadata_match: { version: v2 } }
          - match: { prefix: / }
            route: { weighted_clusters: [{ name: reviews, weight: 80, metadata_match: { version: v1 } }, { name: reviews, weight: 20, metadata_match: { version: v2 } }] }"#;
    let clusters = format!(
        "- {{ name: reviews, endpoints: [{{ address: \"{}\", labels: {{ version: v1 }} }}, {{ address: \"{}\", labels: {{ version: v2 }} }}] }}",
        v1.addr, v2.addr
    );
    let p = proxy(&cfg(routes, &clusters)).await;
    let addr = listener(&p);
    for _ in 0..20 {
        let g = send(addr, req("GET", "/").header("end-user", "jason").body(empty()).unwrap()).await;
        assert!(g.body.starts_with("v2"), "jason goes to v2");
    }
    let mut to_v2 = 0;
    let mut c = h1(addr).await;
    for _ in 0..500 {
        if collect(c.send_request(req("GET", "/").body(empty()).unwrap()).await.unwrap())
            .await
            .body
            .starts_with("v2")
        {
            to_v2 += 1;
        }
    }
    assert!((60..140).contains(&to_v2), "20% of 500 to v2: {to_v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_under_load_costs_no_idempotent_request() {
    let backs = [backend("a").await, backend("b").await, backend("c").await];
    let routes = r#"
          - match: { prefix: / }
            route: { cluster: c, retry_policy: { retry_on: "5xx,reset,connect-failure", num_retries: 3, retry_back_off: { base_interval: 1ms } } }"#;
    let clusters = format!(
        r#"- name: c
  outlier_detection: {{ consecutive_5xx: 2, interval: 100ms, base_ejection_time: 30s, max_ejection_percent: 50 }}
  health_checks: [{{ interval: 100ms, timeout: 200ms, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}} }}]
  endpoints: ["{}", "{}", "{}"]"#,
        backs[0].addr, backs[1].addr, backs[2].addr
    );
    let p = proxy(&cfg(routes, &clusters)).await;
    let addr = listener(&p);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut c = h1(addr).await;
            while !stop.load(Ordering::Relaxed) {
                match c.send_request(req("GET", "/").body(empty()).unwrap()).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = r.into_body().collect().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        c = h1(addr).await;
                    }
                }
            }
        }));
    }
    // Load first (by count, not time: a busy machine runs fewer requests a second).
    eventually(Duration::from_secs(20), "load before the kill", || {
        done.load(Ordering::Relaxed) > 50
    })
    .await;
    let before_kill = done.load(Ordering::Relaxed);
    backs[1].kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    eventually(Duration::from_secs(20), "load after the kill", || {
        done.load(Ordering::Relaxed) > before_kill + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let total = done.load(Ordering::Relaxed);
    assert!(
        before_kill > 50 && total > before_kill + 100,
        "load ran: {before_kill} then {total}"
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no client saw a failure");
    eventually(Duration::from_secs(2), "killed host out of the healthy set", || {
        p.stat("cluster.c.membership_healthy") == Some(2)
    })
    .await;
}

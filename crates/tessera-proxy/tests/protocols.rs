//! HTTP/1.1 and HTTP/2 through the proxy: keep-alive and pooling, chunked bodies,
//! `Expect: 100-continue`, upgrades, h2c detection, protocol translation, trailers, multiplexing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Channel};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn one_cluster(be: &Backend, protocol: &str) -> String {
    let routes = "          - { match: { prefix: / }, route: { cluster: be } }";
    http_config(
        routes,
        &format!("- {{ name: be, protocol: {protocol}, endpoints: [\"{}\"] }}", be.addr),
    )
}

/// A backend that echoes the request body (and its trailers) back.
async fn echo_backend() -> Backend {
    backend_with(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let body = req.into_body();
            Response::new(body.boxed())
        })
    }))
    .await
}

#[tokio::test]
async fn http1_upstream_connections_are_reused() {
    let be = backend("be").await;
    let p = proxy_with(&one_cluster(&be, "http1"), 1).await;
    let addr = listener(&p);
    let mut c = h1(addr).await;
    for i in 0..20 {
        let g = collect(
            c.send_request(req("GET", &format!("/{i}")).body(empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(g.body, format!("be /{i}"));
    }
    for i in 0..10 {
        assert_eq!(get(addr, &format!("/new-conn/{i}")).await.status, StatusCode::OK);
    }
    assert_eq!(
        be.connections(),
        1,
        "30 sequential requests share one upstream connection"
    );
    assert_eq!(stat(&p, "cluster.be.upstream_cx_total"), 1);
    assert_eq!(stat(&p, "cluster.be.upstream_rq_total"), 30);
}

#[tokio::test]
async fn chunked_bodies_stream_both_ways() {
    let be = echo_backend().await;
    let p = proxy(&one_cluster(&be, "http1")).await;
    let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(4);
    let mut c = h1(listener(&p)).await;
    let sending = tokio::spawn(async move {
        for i in 0..50 {
            tx.send_data(Bytes::from(format!("chunk-{i};"))).await.unwrap();
        }
    });
    let resp = c
        .send_request(req("POST", "/echo").body(body.boxed()).unwrap())
        .await
        .unwrap();
    sending.await.unwrap();
    let seen = be.last();
    assert_eq!(
        seen.headers["transfer-encoding"], "chunked",
        "an unknown length stays chunked upstream"
    );
    let g = collect(resp).await;
    let want: String = (0..50).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(g.body, want);
}

#[tokio::test]
async fn large_bodies_pass_intact() {
    let be = echo_backend().await;
    let p = proxy(&one_cluster(&be, "http1")).await;
    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut c = h1(listener(&p)).await;
    let resp = c
        .send_request(req("POST", "/big").body(full(payload.clone())).unwrap())
        .await
        .unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), payload.len());
    assert!(got[..] == payload[..], "4 MiB body came back byte for byte");
}

#[tokio::test]
async fn expect_continue_is_answered_before_the_body() {
    let be = echo_backend().await;
    let p = proxy(&one_cluster(&be, "http1")).await;
    let mut s = TcpStream::connect(listener(&p)).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 Continue in time")
        .unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.starts_with("HTTP/1.1 100 Continue"), "{first}");
    s.write_all(b"hello").await.unwrap();
    let mut rest = String::new();
    while !rest.ends_with("hello") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {rest}");
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // The echo streams its answer, so its head may arrive with the 100 Continue.
    let all = format!("{first}{rest}");
    assert!(all.contains("HTTP/1.1 200 OK"), "{all}");
    assert!(all.find("100 Continue") < all.find("200 OK"), "{all}");
    assert!(
        be.last().headers.get("expect").is_none(),
        "the proxy answered Expect itself"
    );
}

#[tokio::test]
async fn upgrade_passes_through_as_a_tunnel() {
    // A backend that accepts `Upgrade: echo` and then echoes raw bytes, like a WebSocket server would.
    let be = backend_with(Arc::new(|mut req: Request<Incoming>| {
        Box::pin(async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
            r
        })
    }))
    .await;
    let p = proxy(&one_cluster(&be, "http1")).await;
    let mut s = TcpStream::connect(listener(&p)).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in ["ping", "second message"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    assert_eq!(be.last().headers["upgrade"], "echo");
    assert_eq!(stat(&p, "http.ingress.downstream_cx_upgrades_total"), 1);
}

#[tokio::test]
async fn h2c_downstream_reaches_an_http1_upstream() {
    let be = backend("be").await;
    let p = proxy(&one_cluster(&be, "http1")).await;
    let mut c = h2(listener(&p)).await;
    let g = collect(
        c.send_request(Request::get("http://svc.local/a?b=1").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(g.body, "be /a?b=1");
    let seen = be.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.headers["host"], "svc.local");
    assert_eq!(seen.uri, "/a?b=1");
    assert_eq!(stat(&p, "http.ingress.downstream_rq_http2_total"), 1);
}

#[tokio::test]
async fn http1_downstream_reaches_an_h2c_upstream() {
    let be = backend("be").await;
    let p = proxy(&one_cluster(&be, "http2")).await;
    let g = get(listener(&p), "/over-h2").await;
    assert_eq!(g.body, "be /over-h2");
    let seen = be.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.uri, "http://test.local/over-h2");
}

#[tokio::test]
async fn h2_to_h2_keeps_trailers_and_streams() {
    // gRPC's shape: a streamed request and a streamed response ending in trailers.
    let be = backend_with(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(8);
            tokio::spawn(async move {
                let mut inb = req.into_body();
                let mut n = 0;
                while let Some(Ok(f)) = inb.frame().await {
                    if let Ok(d) = f.into_data() {
                        n += d.len();
                        let _ = tx.send_data(d).await;
                    }
                }
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("x-bytes", n.to_string().parse().unwrap());
                let _ = tx.send_trailers(t).await;
            });
            let mut r = Response::new(body.boxed());
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            r
        })
    }))
    .await;
    let p = proxy(&one_cluster(&be, "downstream")).await;
    let mut c = h2(listener(&p)).await;
    let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(8);
    let r = Request::post("http://grpc.local/pkg.Svc/Bidi")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body.boxed())
        .unwrap();
    let resp = c.send_request(r).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "headers arrive before the request ends");
    let mut rb = resp.into_body();
    for i in 0..5 {
        let msg = Bytes::from(format!("msg{i}"));
        tx.send_data(msg.clone()).await.unwrap();
        let f: Frame<Bytes> = tokio::time::timeout(Duration::from_secs(5), rb.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            f.into_data().unwrap(),
            msg,
            "each message comes back before the next is sent"
        );
    }
    drop(tx);
    let f = rb.frame().await.unwrap().unwrap();
    let t = f.into_trailers().expect("trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-bytes"], "20");
    let seen = be.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.headers["te"], "trailers", "te: trailers survives for gRPC");
}

#[tokio::test]
async fn h2_upstream_streams_share_one_connection() {
    let be = backend_with(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Response::new(full(req.uri().path().to_string()))
        })
    }))
    .await;
    let p = proxy_with(&one_cluster(&be, "http2"), 1).await;
    let addr = listener(&p);
    let mut tasks = Vec::new();
    for i in 0..30 {
        tasks.push(tokio::spawn(async move { get(addr, &format!("/c{i}")).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().body, format!("/c{i}"));
    }
    assert_eq!(
        be.connections(),
        1,
        "30 concurrent requests multiplexed on one HTTP/2 connection"
    );
}

#[tokio::test]
async fn h2_upstream_opens_another_connection_past_the_stream_limit() {
    let be = backend_with(Arc::new(|_req: Request<Incoming>| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Response::new(full("ok"))
        })
    }))
    .await;
    let routes = "          - { match: { prefix: / }, route: { cluster: be } }";
    let cfg = http_config(
        routes,
        &format!(
            "- {{ name: be, protocol: http2, http2_max_concurrent_streams: 5, endpoints: [\"{}\"] }}",
            be.addr
        ),
    );
    let p = proxy_with(&cfg, 1).await;
    let addr = listener(&p);
    let mut c = h2(addr).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let r = c.send_request(req("GET", "http://t/").body(empty()).unwrap());
        tasks.push(tokio::spawn(r));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(be.connections(), 2, "10 concurrent streams at 5 per connection");
}

#[tokio::test]
async fn http10_without_host_is_served() {
    let be = backend("be").await;
    let p = proxy(&one_cluster(&be, "http1")).await;
    let out = raw(listener(&p), b"GET /old HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.ends_with("be /old"), "{out}");
}

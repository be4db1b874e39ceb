//! Routing through the running proxy: virtual hosts, matchers, weighted clusters, rewrites,
//! redirects, direct responses and header handling, as a client and a backend see them.

mod support;

use http::StatusCode;
use support::*;

#[tokio::test]
async fn virtual_hosts_and_first_match_wins() {
    let a = backend("a").await;
    let b = backend("b").await;
    let c = backend("c").await;
    let cfg = format!(
        r#"
listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - name: api
          domains: ["api.example.com"]
          routes:
          - {{ match: {{ prefix: /v2/, headers: [{{ name: x-canary, exact: "yes" }}] }}, route: {{ cluster: c }} }}
          - {{ match: {{ prefix: /v2/ }}, route: {{ cluster: b }} }}
          - {{ match: {{ prefix: / }}, route: {{ cluster: a }} }}
        - name: wildcard
          domains: ["*.example.com"]
          routes:
          - {{ match: {{ safe_regex: "/items/[0-9]+" }}, route: {{ cluster: b }} }}
          - {{ match: {{ prefix: /, query_parameters: [{{ name: v, exact: "3" }}] }}, route: {{ cluster: c }} }}
        - name: rest
          domains: ["*"]
          routes:
          - {{ match: {{ path: /exact }}, route: {{ cluster: a }} }}
clusters:
- {{ name: a, endpoints: ["{a}"] }}
- {{ name: b, endpoints: ["{b}"] }}
- {{ name: c, endpoints: ["{c}"] }}
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    );
    let p = proxy(&cfg).await;
    let addr = listener(&p);
    let ask = |host: &'static str, path: &'static str, canary: bool| async move {
        let mut r = http::Request::builder().uri(path).header("host", host);
        if canary {
            r = r.header("x-canary", "yes");
        }
        send(addr, r.body(empty()).unwrap()).await
    };
    assert_eq!(ask("api.example.com", "/v2/x", true).await.body, "c /v2/x");
    assert_eq!(ask("api.example.com", "/v2/x", false).await.body, "b /v2/x");
    assert_eq!(ask("API.EXAMPLE.COM:80", "/other", false).await.body, "a /other");
    assert_eq!(ask("www.example.com", "/items/12", false).await.body, "b /items/12");
    assert_eq!(
        ask("www.example.com", "/items/x?v=3", false).await.body,
        "c /items/x?v=3"
    );
    let miss = ask("www.example.com", "/items/x", false).await;
    assert_eq!(
        miss.status,
        StatusCode::NOT_FOUND,
        "no route in the chosen virtual host"
    );
    assert_eq!(ask("other.org", "/exact", false).await.body, "a /exact");
    assert_eq!(ask("other.org", "/exact/no", false).await.status, StatusCode::NOT_FOUND);
    assert_eq!(stat(&p, "http.http.no_route"), 2);
}

#[tokio::test]
async fn weighted_clusters_split_traffic() {
    let a = backend("a").await;
    let b = backend("b").await;
    let routes = r#"
          - match: { prefix: / }
            route:
              weighted_clusters:
                clusters: [{ name: a, weight: 75 }, { name: b, weight: 25 }]"#;
    let clusters = format!(
        "- {{ name: a, endpoints: [\"{}\"] }}\n- {{ name: b, endpoints: [\"{}\"] }}",
        a.addr, b.addr
    );
    let p = proxy(&http_config(routes, &clusters)).await;
    let addr = listener(&p);
    let mut c = h1(addr).await;
    let mut to_a = 0;
    for _ in 0..400 {
        let g = collect(c.send_request(req("GET", "/").body(empty()).unwrap()).await.unwrap()).await;
        if g.body.starts_with("a ") {
            to_a += 1;
        }
    }
    assert!((250..350).contains(&to_a), "75% of 400 expected at a, got {to_a}");
}

#[tokio::test]
async fn rewrites_and_header_mutations() {
    let be = backend("be").await;
    let routes = r#"
          - match: { prefix: /api/v1/ }
            route: { cluster: be, prefix_rewrite: /internal/, host_rewrite_literal: upstream.local }
            request_headers_to_add:
            - { key: x-route, value: v1 }
            - { header: { key: x-tenant, value: route }, append_action: OVERWRITE_IF_EXISTS_OR_ADD }
            request_headers_to_remove: [x-secret]
            response_headers_to_add:
            - { key: x-served-by, value: tessera }
            response_headers_to_remove: [x-backend]
          - match: { prefix: /re/ }
            route: { cluster: be, regex_rewrite: { pattern: "^/re/(\\w+)/(\\w+)$", substitution: "/\\2/\\1" } }"#;
    let clusters = format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr);
    let p = proxy(&http_config(routes, &clusters)).await;
    let addr = listener(&p);

    let g = send(
        addr,
        req("GET", "/api/v1/users?limit=2")
            .header("x-tenant", "client")
            .header("x-secret", "s3cr3t")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.body, "be /internal/users?limit=2");
    assert_eq!(g.headers["x-served-by"], "tessera");
    assert!(g.headers.get("x-backend").is_none(), "response header removed");
    let seen = be.last();
    assert_eq!(seen.headers["host"], "upstream.local");
    assert_eq!(seen.headers["x-route"], "v1");
    assert_eq!(seen.headers.get_all("x-tenant").iter().collect::<Vec<_>>(), ["route"]);
    assert!(seen.headers.get("x-secret").is_none());
    assert_eq!(seen.headers["x-envoy-original-path"], "/api/v1/users");

    assert_eq!(get(addr, "/re/alpha/beta").await.body, "be /beta/alpha");
}

#[tokio::test]
async fn forwarding_headers_request_id_and_hop_by_hop() {
    let be = backend("be").await;
    let clusters = format!("- {{ name: be, endpoints: [\"{}\"] }}", be.addr);
    let p = proxy(&http_config(
        "          - { match: { prefix: / }, route: { cluster: be } }",
        &clusters,
    ))
    .await;
    let addr = listener(&p);

    get(addr, "/one").await;
    let first = be.last();
    assert_eq!(first.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(first.headers["x-forwarded-proto"], "http");
    let id = first.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");

    send(
        addr,
        req("GET", "/two")
            .header("x-request-id", "given-id")
            .header("x-forwarded-for", "10.1.1.1")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "drop me")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "gzip")
            .body(empty())
            .unwrap(),
    )
    .await;
    let second = be.last();
    assert_eq!(second.headers["x-request-id"], "given-id", "an existing id is kept");
    assert_eq!(second.headers["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    for h in ["x-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(
            second.headers.get(h).is_none(),
            "{h} is hop-by-hop and must not reach the backend"
        );
    }
    assert_ne!(second.headers["x-request-id"], first.headers["x-request-id"]);
}

#[tokio::test]
async fn direct_responses_and_redirects() {
    let routes = r#"
          - match: { path: /health }
            direct_response: { status: 200, body: "healthy\n" }
            response_headers_to_add: [{ key: cache-control, value: no-store }]
          - match: { prefix: /old/ }
            redirect: { prefix_rewrite: /new/, response_code: PERMANENT_REDIRECT }
          - match: { prefix: /secure }
            redirect: { https_redirect: true }
          - match: { prefix: /teapot }
            direct_response: { status: 418 }"#;
    let p = proxy(&http_config(routes, "")).await;
    let addr = listener(&p);
    let g = get(addr, "/health").await;
    assert_eq!((g.status, g.body.as_str()), (StatusCode::OK, "healthy\n"));
    assert_eq!(g.headers["cache-control"], "no-store");
    assert_eq!(g.headers["content-type"], "text/plain");

    let g = get(addr, "/old/page?x=1").await;
    assert_eq!(g.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(g.headers["location"], "http://test.local/new/page?x=1");

    let g = send(
        addr,
        http::Request::get("/secure/area")
            .header("host", "shop.example:8080")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(g.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(g.headers["location"], "https://shop.example/secure/area");

    let g = get(addr, "/teapot").await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (418, ""));
    assert_eq!(stat(&p, "http.ingress.rq_redirect"), 2);
    assert_eq!(stat(&p, "http.ingress.rq_direct_response"), 2);
}

#[tokio::test]
async fn strict_dns_cluster_resolves_and_rewrites_host() {
    let be = backend("dns").await;
    let routes = "          - { match: { prefix: / }, route: { cluster: by_name, auto_host_rewrite: true } }";
    let clusters = format!(
        "- {{ name: by_name, type: strict_dns, dns_refresh_rate: 100ms, endpoints: [\"localhost:{}\"] }}",
        be.addr.port()
    );
    let p = proxy(&http_config(routes, &clusters)).await;
    let g = get(listener(&p), "/x").await;
    assert_eq!(g.body, "dns /x");
    assert_eq!(be.last().headers["host"], "localhost");
    let clusters = admin(&p, "/clusters").await.body;
    assert!(
        clusters.contains(&format!("by_name::127.0.0.1:{}::hostname::localhost", be.addr.port())),
        "{clusters}"
    );
}

//! Microbenchmarks of the functions every request runs: route matching, hop-by-hop header
//! handling, the load balancer's pick and the ClientHello reader. `cargo bench -p tessera-proxy`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use tessera_model::Config;
use tessera_proxy::testing::{
    Picker, Routes, client_hello, inspect, peer_identity, retry_breaker_allows, retry_decision, strip_hop_by_hop,
};

fn routes(n: usize) -> Routes {
    let mut r = String::new();
    for i in 0..n {
        r.push_str(&format!("          - {{ match: {{ prefix: /svc{i}/, headers: [{{ name: x-version, exact: v{i} }}] }}, route: {{ cluster: c }} }}\n"));
    }
    r.push_str("          - { match: { prefix: / }, route: { cluster: c } }\n");
    let yaml = format!(
        "listeners:\n- name: l\n  address: 127.0.0.1:0\n  filter_chains:\n  - http:\n      route_config:\n        virtual_hosts:\n        - name: api\n          domains: [api.example.com, \"*.example.com\"]\n          routes:\n{r}        - {{ name: any, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: c }} }}] }}\nclusters:\n- {{ name: c, endpoints: [127.0.0.1:1] }}\n"
    );
    Routes::new(&Config::from_yaml(&yaml, "bench.yaml").unwrap()).unwrap()
}

fn bench_routing(c: &mut Criterion) {
    let mut h = HeaderMap::new();
    h.insert("x-version", HeaderValue::from_static("v9"));
    h.insert("user-agent", HeaderValue::from_static("bench"));
    for n in [1, 10, 100] {
        let t = routes(n);
        c.bench_function(&format!("route/{n}_routes_last_match"), |b| {
            b.iter(|| {
                black_box(t.route(
                    black_box("www.example.com"),
                    black_box("/other/path"),
                    None,
                    &Method::GET,
                    &h,
                ))
            })
        });
    }
    let t = routes(10);
    c.bench_function("route/10_routes_header_match", |b| {
        b.iter(|| {
            black_box(t.route(
                black_box("api.example.com:8080"),
                black_box("/svc9/x"),
                Some("a=1"),
                &Method::GET,
                &h,
            ))
        })
    });
}

fn bench_headers(c: &mut Criterion) {
    let mut typical = HeaderMap::new();
    for (k, v) in [
        ("host", "example.com"),
        ("user-agent", "curl/8"),
        ("accept", "*/*"),
        ("x-request-id", "abc"),
    ] {
        typical.insert(k, HeaderValue::from_static(v));
    }
    c.bench_function("headers/strip_hop_by_hop_none_present", |b| {
        b.iter(|| {
            let mut h = typical.clone();
            strip_hop_by_hop(&mut h);
            black_box(h)
        })
    });
    let mut hop = typical.clone();
    hop.insert("connection", HeaderValue::from_static("keep-alive, x-foo"));
    hop.insert("x-foo", HeaderValue::from_static("1"));
    hop.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    c.bench_function("headers/strip_hop_by_hop_some_present", |b| {
        b.iter(|| {
            let mut h = hop.clone();
            strip_hop_by_hop(&mut h);
            black_box(h)
        })
    });
    c.bench_function("headers/clone_baseline", |b| b.iter(|| black_box(typical.clone())));
}

fn bench_lb(c: &mut Criterion) {
    let equal: Vec<u32> = vec![1; 100];
    let weighted: Vec<u32> = (1..=100).collect();
    for (name, policy, weights) in [
        ("round_robin_100_hosts", "round_robin", &equal),
        ("weighted_round_robin_100_hosts", "round_robin", &weighted),
        ("random_100_hosts", "random", &equal),
        ("least_request_100_hosts", "least_request", &equal),
        ("weighted_least_request_100_hosts", "least_request", &weighted),
        ("ring_hash_100_hosts", "ring_hash", &equal),
        ("maglev_100_hosts", "maglev", &equal),
    ] {
        let p = Picker::new(weights, policy);
        let mut key = 0u64;
        c.bench_function(&format!("lb/{name}"), |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
                black_box(p.pick(Some(key)))
            })
        });
    }
}

fn bench_breakers(c: &mut Criterion) {
    c.bench_function("breaker/retry_check", |b| {
        b.iter(|| black_box(retry_breaker_allows(black_box(2), black_box(100))))
    });
    c.bench_function("retry/decide_on_response", |b| {
        b.iter(|| black_box(retry_decision(black_box(503), black_box(Some(14)))))
    });
}

fn bench_tls_inspect(c: &mut Criterion) {
    let hello = client_hello(Some("api.example.com"), &["h2", "http/1.1"]);
    c.bench_function("codec/client_hello_sni_alpn", |b| {
        b.iter(|| black_box(inspect(black_box(&hello))))
    });
}

fn bench_peer_identity(c: &mut Criterion) {
    // A workload certificate as Istio issues them: a SPIFFE URI SAN and a DNS SAN, ECDSA P-256.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["reviews.shop.svc.cluster.local".to_string()]).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/reviews".try_into().unwrap(),
    ));
    let der = p.self_signed(&key).unwrap().der().to_vec();
    c.bench_function("tls/peer_identity_and_fingerprint", |b| {
        b.iter(|| black_box(peer_identity(black_box(&der))))
    });
}

criterion_group!(
    benches,
    bench_routing,
    bench_headers,
    bench_lb,
    bench_breakers,
    bench_tls_inspect,
    bench_peer_identity
);
criterion_main!(benches);

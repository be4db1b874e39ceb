use super::*;
use crate::policy::*;
use crate::rpc::*;
use crate::tls::*;
use crate::traffic::*;

fn load(src: &str) -> Result<Config, Vec<ConfigError>> {
    Config::from_yaml(src, "test.yaml").map_err(|e| e.errors().to_vec())
}

fn errors(src: &str) -> Vec<String> {
    match load(src) {
        Ok(_) => panic!("expected errors, config loaded"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

const GOOD: &str = r#"
admin:
  address: 127.0.0.1:9901
drain_time: 2s
listeners:
- name: ingress
  address: 127.0.0.1:10000
  filter_chains:
  - http:
      stat_prefix: ingress_http
      request_timeout: 30s
      route_config:
        virtual_hosts:
        - name: web
          domains: ["example.com", "*.example.com"]
          routes:
          - match: { prefix: /api/, headers: [{ name: x-canary, exact: "1" }] }
            route: { cluster: canary, prefix_rewrite: /, timeout: 2s }
          - match: { safe_regex: "/users/[0-9]+" }
            route:
              weighted_clusters:
                clusters:
                - { name: backend, weight: 80 }
                - { name: canary, weight: 20 }
          - match: { path: /old }
            redirect: { path_redirect: /new, response_code: FOUND }
          - match: { prefix: / }
            direct_response: { status: 200, body: { inline_string: hi } }
        - name: catchall
          domains: ["*"]
          routes:
          - match: { prefix: / }
            route: { cluster: backend }
            request_headers_to_add:
            - header: { key: x-from, value: tessera }
              append_action: OVERWRITE_IF_EXISTS_OR_ADD
            - { key: x-flat, value: yes }
- name: tcp
  address: 127.0.0.1:10001
  filter_chains:
  - tcp_proxy: { cluster: backend, idle_timeout: 10m }
clusters:
- name: backend
  endpoints: ["127.0.0.1:18080", { address: "127.0.0.2:18080", weight: 3 }]
- name: canary
  type: STRICT_DNS
  lb_policy: ROUND_ROBIN
  protocol: http2
  endpoints: [localhost:18081]
"#;

#[test]
fn a_complete_config_loads() {
    let cfg = load(GOOD).unwrap();
    assert_eq!(cfg.drain_time, Duration::from_secs(2));
    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(cfg.clusters[0].discovery, DiscoveryType::Static);
    assert_eq!(cfg.clusters[0].endpoints[1].weight, 3);
    assert_eq!(cfg.clusters[1].discovery, DiscoveryType::StrictDns);
    assert_eq!(cfg.clusters[1].protocol, UpstreamProtocol::Http2);
    let NetworkFilter::Http(hcm) = &cfg.listeners[0].filter_chains[0].filter else {
        panic!("not http")
    };
    assert_eq!(hcm.request_timeout, Duration::from_secs(30));
    assert_eq!(hcm.max_request_headers_kb, 60);
    let vh = &hcm.route_config.virtual_hosts[0];
    assert_eq!(vh.routes.len(), 4);
    let RouteAction::Redirect(r) = &vh.routes[2].action else {
        panic!()
    };
    assert_eq!(r.response_code, 302);
    let catchall = &hcm.route_config.virtual_hosts[1].routes[0];
    assert_eq!(
        catchall.request_headers_to_add[0].append_action,
        AppendAction::OverwriteIfExistsOrAdd
    );
    assert_eq!(catchall.request_headers_to_add[1].key, "x-flat");
    // config_dump serialises the model.
    let json = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        json["listeners"][1]["filter_chains"][0]["filter"]["tcp_proxy"]["idle_timeout"],
        "600s"
    );
    assert_eq!(
        json["listeners"][0]["filter_chains"][0]["filter"]["http"]["route_config"]["virtual_hosts"][0]["routes"][1]["match"]
            ["path"]["safe_regex"],
        "/users/[0-9]+"
    );
}

#[test]
fn every_error_is_reported_with_position_and_path() {
    let src = r#"
listeners:
- name: a
  adress: 127.0.0.1:1
  filter_chains:
  - tcp_proxy: { cluster: nope, idle_timeout: 5 parsecs }
clusters:
- name: c
  connect_timeout: soon
  endpoints: [127.0.0.1]
"#;
    let e = errors(src);
    let joined = e.join("\n");
    assert!(
        joined.contains("test.yaml:4:3: listeners[0].adress: unknown field `adress`, did you mean `address`?"),
        "{joined}"
    );
    assert!(
        joined.contains("listeners[0].address: missing required field"),
        "{joined}"
    );
    assert!(joined.contains("test.yaml:6:27: listeners[0].filter_chains[0].tcp_proxy.cluster: unknown cluster `nope` (defined clusters: c)"), "{joined}");
    assert!(
        joined.contains("tcp_proxy.idle_timeout: expected a duration"),
        "{joined}"
    );
    assert!(joined.contains("test.yaml:9:20: clusters[0].connect_timeout: expected a duration such as 250ms, 5s, 1.5s, 2m or 1h, found `soon`"), "{joined}");
    assert!(
        joined.contains("clusters[0].endpoints[0]: expected host:port"),
        "{joined}"
    );
    assert_eq!(e.len(), 6, "{joined}");
}

#[test]
fn duplicates_are_rejected() {
    let src = r#"
listeners:
- name: a
  address: 127.0.0.1:1000
  filter_chains: [{ tcp_proxy: { cluster: c } }]
- name: a
  address: 127.0.0.1:1000
  filter_chains:
  - tcp_proxy: { cluster: c }
  - tcp_proxy: { cluster: c }
clusters:
- { name: c, endpoints: [127.0.0.1:1] }
- { name: c, endpoints: [127.0.0.1:2] }
"#;
    let joined = errors(src).join("\n");
    assert!(joined.contains("duplicate listener name `a`"), "{joined}");
    assert!(
        joined.contains("listener `a` binds 127.0.0.1:1000 which listener `a` already binds"),
        "{joined}"
    );
    assert!(
        joined.contains("clusters[1].name: duplicate cluster name `c`"),
        "{joined}"
    );
    assert!(joined.contains("has the same match as"), "{joined}");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let e = errors("listeners:\n  - name: [unclosed\n");
    assert!(e[0].starts_with("test.yaml:"), "{e:?}");
    assert!(e[0].contains("(syntax)"), "{e:?}");
}

#[test]
fn wrong_shapes_are_explained() {
    let joined = errors("listeners: {}\nclusters: 3\n").join("\n");
    assert!(
        joined.contains("listeners: expected a list, found a mapping"),
        "{joined}"
    );
    assert!(joined.contains("clusters: expected a list, found a scalar"), "{joined}");
}

#[test]
fn bad_regex_enum_and_format_are_caught() {
    let src = r#"
listeners:
- name: a
  address: 127.0.0.1:1000
  filter_chains:
  - http:
      codec_type: http3
      access_log: [{ format: "%NOPE%" }]
      route_config:
        virtual_hosts:
        - name: v
          domains: ["*", "a*b"]
          routes:
          - match: { safe_regex: "(" }
            route: { cluster: c }
          - match: { prefix: /, path: /x }
            direct_response: { status: 200 }
          - match: { prefix: / }
clusters:
- { name: c, type: static, endpoints: [example.com:80] }
"#;
    let joined = errors(src).join("\n");
    assert!(
        joined.contains("unknown value `http3`; expected one of: auto, http1, http2"),
        "{joined}"
    );
    assert!(joined.contains("unknown command operator `%NOPE%`"), "{joined}");
    assert!(joined.contains("`a*b`: a domain is exact"), "{joined}");
    assert!(joined.contains("invalid regex"), "{joined}");
    assert!(
        joined.contains("exactly one of `prefix`, `path`, `safe_regex` or `triple`"),
        "{joined}"
    );
    assert!(
        joined.contains("exactly one of `route`, `redirect` or `direct_response`"),
        "{joined}"
    );
    assert!(
        joined.contains("a static cluster's endpoints must be IP addresses"),
        "{joined}"
    );
}

#[test]
fn duplicate_yaml_keys_and_domains() {
    let src = r#"
listeners:
- name: a
  name: b
  address: 127.0.0.1:1000
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - { name: v1, domains: ["*"], routes: [] }
        - { name: v2, domains: ["*"], routes: [] }
"#;
    let joined = errors(src).join("\n");
    assert!(
        joined.contains("test.yaml:4:3: listeners[0].name: duplicate key"),
        "{joined}"
    );
    assert!(
        joined.contains("domain `*` is also claimed by virtual host `v1`"),
        "{joined}"
    );
}

#[test]
fn header_matchers_read_both_shapes() {
    let src = r#"
listeners:
- name: a
  address: 127.0.0.1:1000
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - match:
              prefix: /
              headers:
              - { name: x-a, string_match: { prefix: ab, ignore_case: true } }
              - { name: x-b, range_match: { start: 1, end: 10 }, invert_match: true }
              - { name: x-c }
              - { name: x-d, present_match: false }
              query_parameters:
              - { name: debug }
              - { name: v, exact: "2" }
              grpc: {}
            direct_response: { status: 204 }
"#;
    let cfg = load(src).unwrap();
    let NetworkFilter::Http(h) = &cfg.listeners[0].filter_chains[0].filter else {
        panic!()
    };
    let m = &h.route_config.virtual_hosts[0].routes[0].matcher;
    assert!(m.grpc);
    assert!(
        matches!(&m.headers[0].spec, HeaderMatchSpec::String { matcher: StringMatch::Prefix(p), ignore_case: true } if p == "ab")
    );
    assert!(matches!(m.headers[1].spec, HeaderMatchSpec::Range { start: 1, end: 10 }) && m.headers[1].invert_match);
    assert!(matches!(m.headers[2].spec, HeaderMatchSpec::Present(true)));
    assert!(matches!(m.headers[3].spec, HeaderMatchSpec::Present(false)));
    assert!(m.query_parameters[0].string_match.is_none());
    assert!(matches!(&m.query_parameters[1].string_match, Some(StringMatch::Exact(v)) if v == "2"));
}

#[test]
fn host_port_splitting() {
    assert_eq!(split_host_port("127.0.0.1:80"), Some(("127.0.0.1".into(), 80)));
    assert_eq!(split_host_port("[::1]:80"), Some(("::1".into(), 80)));
    assert_eq!(
        split_host_port("Backend.Local:8080"),
        Some(("backend.local".into(), 8080))
    );
    assert_eq!(split_host_port("::1:80"), None);
    assert_eq!(split_host_port("host:0"), None);
    assert_eq!(split_host_port("host"), None);
    assert_eq!(split_host_port(":80"), None);
}

#[test]
fn the_shipped_examples_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).expect("examples/ exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // envoy-bootstrap.yaml is Envoy's format (tessera-xds tests it), pilot.yaml Pilot's
        // (crates/tessera/tests/pilot.rs tests it); the mesh files are loaded as such.
        if ["quickstart.yaml", "mesh.yaml"].contains(&name.as_str()) {
            crate::MeshSpec::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else if name.ends_with(".yaml") && !["envoy-bootstrap.yaml", "pilot.yaml"].contains(&name.as_str()) {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "expected the example configs, found {n}");
}

const TRAFFIC: &str = r#"
node: { id: sidecar-1, cluster: web, locality: { region: eu, zone: eu-1a } }
listeners:
- name: l
  address: 127.0.0.1:0
  filter_chains:
  - http:
      local_rate_limit: { token_bucket: { max_tokens: 100, tokens_per_fill: 10, fill_interval: 1s } }
      route_config:
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - match: { prefix: /api }
            route:
              cluster: api
              metadata_match: { version: v2 }
              priority: HIGH
              retry_policy:
                retry_on: "5xx,reset,connect-failure,unavailable"
                num_retries: 3
                per_try_timeout: 500ms
                retry_back_off: { base_interval: 10ms, max_interval: 1s }
                retriable_status_codes: [409]
              hash_policy:
              - { header: { header_name: X-User }, terminal: true }
              - { connection_properties: { source_ip: true } }
              request_mirror_policies:
              - { cluster: shadow, runtime_fraction: { default_value: { numerator: 25, denominator: HUNDRED } } }
              max_stream_duration: { max_stream_duration: 30s, grpc_timeout_header_max: 10s }
            fault:
              delay: { fixed_delay: 2s, percentage: { value: 10 } }
              abort: { grpc_status: UNAVAILABLE, percentage: 5 }
              headers: [{ name: x-chaos, exact: "on" }]
            local_rate_limit:
              token_bucket: { max_tokens: 5, fill_interval: 100ms }
              descriptor: { source_ip: true }
          - match: { prefix: / }
            route:
              weighted_clusters:
              - { name: api, weight: 80, metadata_match: { filter_metadata: { envoy.lb: { version: v1 } } } }
              - { name: api, weight: 20, metadata_match: { version: v2 } }
clusters:
- name: api
  lb_policy: least_request
  least_request_lb_config: { choice_count: 3 }
  slow_start: { window: 30s, aggression: 2 }
  lb_subset_config: { fallback_policy: DEFAULT_SUBSET, default_subset: { version: v1 } }
  health_checks:
  - timeout: 1s
    interval: 5s
    interval_jitter: 1s
    unhealthy_threshold: 2
    healthy_threshold: 1
    http_health_check: { path: /healthz, expected_statuses: [{ start: 200, end: 300 }] }
  - { interval: 5s, tcp_health_check: { send: { text: "50494e47" }, receive: [{ string: PONG }] } }
  - { interval: 5s, grpc_health_check: { service_name: api.v1 } }
  outlier_detection: { consecutive_5xx: 3, interval: 1s, base_ejection_time: 10s, max_ejection_percent: 50 }
  circuit_breakers:
    thresholds:
    - { max_connections: 10, max_pending_requests: 5, max_requests: 20, max_retries: 2 }
    - { priority: HIGH, max_requests: 100, retry_budget: { budget_percent: 25, min_retry_concurrency: 5 } }
  endpoints:
  - { address: "10.0.0.1:80", labels: { version: v1 }, locality: { region: eu, zone: eu-1a } }
  - { address: "10.0.0.2:80", weight: 2, priority: 1, labels: { version: v2 }, locality: { region: us, zone: us-1 } }
- name: shadow
  lb_policy: maglev
  maglev_lb_config: { table_size: 65537 }
  endpoints: ["10.0.1.1:80"]
"#;

#[test]
fn traffic_management_config_loads() {
    let cfg = load(TRAFFIC).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(cfg.node.locality.as_ref().unwrap().zone, "eu-1a");
    let api = cfg.cluster("api").unwrap();
    assert_eq!(
        api.lb_policy,
        LbPolicy::LeastRequest {
            choice_count: 3,
            active_request_bias: 1.0
        }
    );
    assert_eq!(api.slow_start.as_ref().unwrap().aggression, 2.0);
    assert_eq!(api.lb_subset_config.fallback_policy, SubsetFallback::DefaultSubset);
    assert_eq!(api.health_checks.len(), 3);
    assert!(
        matches!(&api.health_checks[1].kind, HealthCheckKind::Tcp { send: Some(s), receive } if s == b"PING" && receive[0] == b"PONG")
    );
    assert!(
        matches!(&api.health_checks[2].kind, HealthCheckKind::Grpc { service_name, .. } if service_name == "api.v1")
    );
    assert_eq!(api.outlier_detection.as_ref().unwrap().consecutive_5xx, 3);
    assert_eq!(
        api.outlier_detection.as_ref().unwrap().consecutive_gateway_failure,
        5,
        "defaults fill the rest"
    );
    assert_eq!(api.circuit_breakers.default.max_pending_requests, 5);
    assert_eq!(
        api.circuit_breakers.high.retry_budget.as_ref().unwrap().budget_percent,
        25.0
    );
    assert_eq!(api.endpoints[1].priority, 1);
    assert_eq!(api.endpoints[1].labels["version"], "v2");
    assert_eq!(
        cfg.cluster("shadow").unwrap().lb_policy,
        LbPolicy::Maglev { table_size: 65537 }
    );

    let NetworkFilter::Http(h) = &cfg.listeners[0].filter_chains[0].filter else {
        panic!()
    };
    assert_eq!(h.local_rate_limit.as_ref().unwrap().max_tokens, 100);
    let r = &h.route_config.virtual_hosts[0].routes[0];
    let RouteAction::Route(f) = &r.action else { panic!() };
    assert_eq!(f.metadata_match["version"], "v2");
    assert_eq!(f.priority, RoutingPriority::High);
    let rp = f.retry_policy.as_ref().unwrap();
    assert!(rp.retry_on.has(RetryOn::GRPC_UNAVAILABLE) && rp.retry_on.has(RetryOn::RESET));
    assert_eq!(
        (rp.num_retries, rp.per_try_timeout, rp.max_interval),
        (3, Duration::from_millis(500), Duration::from_secs(1))
    );
    assert_eq!(
        f.hash_policy[0],
        HashPolicy {
            kind: HashPolicyKind::Header("x-user".into()),
            terminal: true
        }
    );
    assert_eq!(f.request_mirror_policies[0].percentage, 25.0);
    assert_eq!(f.grpc_timeout_header_max, Duration::from_secs(10));
    let fault = r.fault.as_ref().unwrap();
    assert_eq!(fault.delay.as_ref().unwrap().percentage, 10.0);
    assert_eq!(fault.abort.as_ref().unwrap().status, AbortStatus::Grpc(14));
    assert_eq!(
        r.local_rate_limit.as_ref().unwrap().descriptor,
        Some(RateLimitKey::SourceIp)
    );
    let RouteAction::Route(w) = &h.route_config.virtual_hosts[0].routes[1].action else {
        panic!()
    };
    let ClusterSpecifier::WeightedClusters(ws) = &w.cluster else {
        panic!()
    };
    assert_eq!(ws[0].metadata_match["version"], "v1", "Envoy's filter_metadata shape");
    let json = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        json["listeners"][0]["filter_chains"][0]["filter"]["http"]["route_config"]["virtual_hosts"][0]["routes"][0]["action"]
            ["route"]["retry_policy"]["retry_on"],
        "5xx,reset,connect-failure,unavailable"
    );
}

#[test]
fn traffic_management_errors_are_precise() {
    let bad = TRAFFIC
        .replace("5xx,reset,connect-failure,unavailable", "5xx,sometimes")
        .replace("table_size: 65537", "table_size: 65536")
        .replace("percentage: 5 }", "percentage: 500 }")
        .replace(
            "least_request_lb_config: { choice_count: 3 }",
            "ring_hash_lb_config: {}",
        )
        .replace(
            "{ interval: 5s, grpc_health_check: { service_name: api.v1 } }",
            "{ interval: 5s }",
        )
        .replace("{ cluster: shadow, runtime", "{ cluster: nowhere, runtime");
    let joined = errors(&bad).join("\n");
    for needle in [
        "retry_policy.retry_on: unknown retry condition `sometimes`",
        "maglev_lb_config.table_size: table_size must be a prime; 65536 is not",
        "abort.percentage: expected a number from 0 to 100, found 500",
        "ring_hash_lb_config: this block configures lb_policy ring_hash, but the cluster uses another policy",
        "health_checks[2]: a health check has exactly one of",
        "request_mirror_policies[0].cluster: unknown cluster `nowhere`",
    ] {
        assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
    }
}

const TLS: &str = r#"
secrets:
- name: default
  tls_certificate: { certificate_chain: { filename: certs/cert.pem }, private_key: certs/key.pem }
- name: ROOTCA
  validation_context: { trusted_ca: /etc/ca.pem }
listeners:
- name: inbound
  address: 127.0.0.1:15006
  filter_chains:
  - filter_chain_match: { transport_protocol: tls }
    tls:
      tls_certificate_sds_secret_configs: [default, { name: default }]
      validation_context_sds_secret_config: ROOTCA
      validation_context:
        match_subject_alt_names: [{ prefix: "spiffe://cluster.local/" }]
        match_typed_subject_alt_names: [{ san_type: URI, matcher: { exact: "spiffe://td/ns/a/sa/b" } }]
      require_client_certificate: true
      alpn_protocols: [istio-peer-exchange, h2]
      tls_params:
        tls_minimum_protocol_version: TLSv1_1
        cipher_suites: ["[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]", TLS13_AES_256_GCM_SHA384]
        ecdh_curves: [X25519, prime256v1]
    http:
      forward_client_cert_details: APPEND_FORWARD
      set_current_client_cert_details: { subject: true, uri: true, dns: true }
      route_config: { virtual_hosts: [{ name: a, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: app } }] }] }
clusters:
- name: app
  endpoints: ["127.0.0.1:8080"]
  tls:
    sni: app.default.svc
    tls_certificate_sds_secret_configs: [default]
    validation_context:
      trusted_ca: { inline_string: "-----BEGIN CERTIFICATE-----" }
"#;

#[test]
fn tls_contexts_and_secrets_decode() {
    let cfg = Config::from_yaml(TLS, "/etc/tessera/mesh.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.secrets.len(), 2);
    match &cfg.secrets[0].kind {
        SecretKind::TlsCertificate(c) => {
            assert_eq!(
                c.certificate_chain,
                DataSource::Filename("/etc/tessera/certs/cert.pem".into()),
                "relative to the config file"
            );
            assert_eq!(
                c.private_key.0,
                DataSource::Filename("/etc/tessera/certs/key.pem".into())
            );
            assert_eq!(c.at.line, 4);
            assert_eq!(c.at.field, "secrets[0].tls_certificate");
        }
        other => panic!("{other:?}"),
    }
    let chain = &cfg.listeners[0].filter_chains[0];
    let t = chain.tls.as_ref().unwrap();
    assert_eq!(t.common.tls_certificate_sds_secret_configs, ["default", "default"]);
    let v = t.common.validation.as_ref().unwrap();
    assert_eq!(v.trusted_ca_secret.as_deref(), Some("ROOTCA"));
    assert_eq!(v.match_subject_alt_names.len(), 2);
    assert_eq!(v.match_subject_alt_names[0].san_type, None);
    assert_eq!(v.match_subject_alt_names[1].san_type, Some(SanType::Uri));
    assert!(t.require_client_certificate);
    assert_eq!(t.common.alpn_protocols, ["istio-peer-exchange", "h2"]);
    let p = &t.common.tls_params;
    assert_eq!(
        p.tls_minimum_protocol_version,
        TlsVersion::Tls12,
        "1.1 means the oldest we have"
    );
    assert_eq!(
        p.cipher_suites,
        [
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS13_AES_256_GCM_SHA384"
        ]
    );
    assert_eq!(p.ecdh_curves, ["X25519", "P-256"]);
    assert_eq!(t.handshake_timeout, Duration::from_secs(10));
    let NetworkFilter::Http(h) = &chain.filter else {
        panic!()
    };
    assert_eq!(h.forward_client_cert_details, ForwardClientCert::AppendForward);
    assert!(h.set_current_client_cert_details.uri && !h.set_current_client_cert_details.cert);
    let up = cfg.clusters[0].tls.as_ref().unwrap();
    assert_eq!(up.sni.as_deref(), Some("app.default.svc"));
    assert!(matches!(
        up.common
            .validation
            .as_ref()
            .unwrap()
            .trusted_ca
            .as_ref()
            .unwrap()
            .trusted_ca,
        DataSource::InlineString(_)
    ));
    // Inline keys never reach /config_dump.
    let dump = serde_json::to_string(&cfg).unwrap();
    assert!(dump.contains("\"filename\":\"/etc/tessera/certs/key.pem\""), "{dump}");
}

#[test]
fn tls_mistakes_are_named() {
    let errs = errors(
        r#"
secrets:
- name: ca
  validation_context: { trusted_ca: ca.pem }
- name: ca
  tls_certificate: { certificate_chain: "", private_key: k.pem }
listeners:
- name: l
  address: 127.0.0.1:1
  filter_chains:
  - tls:
      tls_certificate_sds_secret_configs: [ca, nope]
      require_client_certificate: true
      tls_params: { tls_maximum_protocol_version: TLSv1_1, cipher_suites: [AES128-SHA] }
      handshake_timeout: 0s
    tcp_proxy: { cluster: c }
  - filter_chain_match: { destination_port: 1 }
    tls: { alpn_protocols: [h2] }
    tcp_proxy: { cluster: c }
clusters:
- name: c
  endpoints: ["127.0.0.1:2"]
  tls:
    validation_context: { match_subject_alt_names: [{ exact: x }] }
    tls_certificates:
    - { certificate_chain: a.pem, private_key: a.key }
    - { certificate_chain: b.pem, private_key: b.key, password: secret }
"#,
    );
    let want = [
        "test.yaml:6:41: secrets[1].tls_certificate.certificate_chain: the file name is empty",
        "test.yaml:12:44: listeners[0].filter_chains[0].tls.tls_certificate_sds_secret_configs[0]: secret `ca` is a validation_context, not a tls_certificate",
        "listeners[0].filter_chains[0].tls.tls_certificate_sds_secret_configs[1]: unknown secret `nope` (no tls_certificate secrets are defined under `secrets`)",
        "listeners[0].filter_chains[0].tls.tls_params.tls_maximum_protocol_version: TLS 1.0 and 1.1 are not supported",
        "cipher suite `AES128-SHA` is not supported",
        "listeners[0].filter_chains[0].tls.require_client_certificate: requiring client certificates needs a trust bundle",
        "listeners[0].filter_chains[0].tls.handshake_timeout: must be above zero",
        "listeners[0].filter_chains[1].tls: terminating TLS needs a certificate",
        "clusters[0].tls: a cluster presents at most one client certificate",
        "clusters[0].tls.validation_context: matching server SANs needs a trust bundle",
        "clusters[0].tls.tls_certificates[1].password: encrypted private keys are not supported",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.contains(w)),
            "missing {w:?} in:\n{}",
            errs.join("\n")
        );
    }
}

const RPC: &str = r#"
listeners:
- name: rpc
  address: 127.0.0.1:12200
  filter_chains:
  - rpc:
      stat_prefix: bolt_in
      protocol: bolt
      request_timeout: 3s
      routes:
      - name: echo
        match:
          service: com.example.EchoService:1.0
          method: { prefix: ec }
          headers: [{ name: X-Tenant, exact: blue }]
        route: { cluster: a, timeout: 500ms, idempotent: true, num_retries: 2, metadata_match: { version: v2 } }
      - match: { service: { safe_regex: "com\\.example\\..*" } }
        route:
          weighted_clusters: [{ name: a, weight: 1 }, { name: b, weight: 3 }]
          local_rate_limit: { token_bucket: { max_tokens: 5, fill_interval: 1s } }
      - route: { cluster: b }
      access_log: [{ path: /dev/null }]
- name: grpc
  address: 127.0.0.1:10000
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: { triple: { service: org.apache.dubbo.samples.HelloWorld, method: unary, version: 1.0.0, group: blue } }
            route: { cluster: a }
          - match: { triple: { service: org.apache.dubbo.samples.HelloWorld } }
            route: { cluster: b }
clusters:
- { name: a, endpoints: ["127.0.0.1:12201"] }
- { name: b, endpoints: ["127.0.0.1:12202"] }
"#;

#[test]
fn rpc_chains_and_triple_matches_load() {
    let cfg = load(RPC).unwrap();
    let NetworkFilter::Rpc(r) = &cfg.listeners[0].filter_chains[0].filter else {
        panic!("not an rpc chain")
    };
    assert_eq!(r.protocol, RpcProtocol::Bolt);
    assert_eq!(r.request_timeout, Duration::from_secs(3));
    assert_eq!(r.routes.len(), 3);
    let echo = &r.routes[0];
    assert_eq!(
        echo.matcher.service,
        Some(StringMatch::Exact("com.example.EchoService:1.0".into()))
    );
    assert_eq!(echo.matcher.method, Some(StringMatch::Prefix("ec".into())));
    assert_eq!(echo.matcher.headers[0].name, "x-tenant");
    assert!(echo.matcher.needs_attachments());
    assert!(echo.route.idempotent);
    assert_eq!(echo.route.num_retries, 2);
    assert_eq!(echo.route.timeout, Duration::from_millis(500));
    assert_eq!(echo.route.metadata_match.get("version").map(String::as_str), Some("v2"));
    assert!(!r.routes[1].matcher.needs_attachments());
    assert!(r.routes[1].route.local_rate_limit.is_some());
    assert!(matches!(&r.routes[1].route.cluster, ClusterSpecifier::WeightedClusters(w) if w.len() == 2));
    assert!(
        r.routes[2].matcher.service.is_none(),
        "a route without match takes everything"
    );
    // The RPC default log line names the service, method, status and request id.
    let LogFormat::Text { source, .. } = &r.access_log[0].format else {
        panic!()
    };
    assert!(
        source.contains("%RPC_SERVICE%") && source.contains("%RPC_REQUEST_ID%"),
        "{source}"
    );

    let NetworkFilter::Http(h) = &cfg.listeners[1].filter_chains[0].filter else {
        panic!()
    };
    let routes = &h.route_config.virtual_hosts[0].routes;
    let m = &routes[0].matcher;
    assert!(matches!(&m.path, PathMatch::Path(p) if p == "/org.apache.dubbo.samples.HelloWorld/unary"));
    let names: Vec<&str> = m.headers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["tri-service-version", "tri-service-group"]);
    assert!(matches!(&routes[1].matcher.path, PathMatch::Prefix(p) if p == "/org.apache.dubbo.samples.HelloWorld/"));
    assert!(routes[1].matcher.headers.is_empty());
}

#[test]
fn rpc_config_errors_name_the_field() {
    let bad = RPC
        .replace("protocol: bolt", "protocol: thrift")
        .replace("{ cluster: b }", "{ cluster: nope }")
        .replace("num_retries: 2", "num_retries: 99")
        .replace("service: org.apache.dubbo.samples.HelloWorld }", "service: a/b }");
    let e = errors(&bad).join("\n");
    for want in [
        "listeners[0].filter_chains[0].rpc.protocol",
        "thrift",
        "rpc.routes[2].route.cluster",
        "nope",
        "rpc.routes[0].route.num_retries",
        "`a/b` is not an interface name",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    let both = RPC.replace("  - rpc:\n", "  - tcp_proxy: { cluster: a }\n    rpc:\n");
    assert!(errors(&both).join("\n").contains("one of `tcp_proxy`, `http` or `rpc`"));
}

const POLICY: &str = r#"
listeners:
- name: http
  address: 127.0.0.1:10000
  filter_chains:
  - http:
      policy:
        checks:
        - list: { name: blocked, attribute: "request.headers[x-user]", entries: [blocked], blacklist: true }
        - list: { name: office, attribute: source.ip, kind: ip_addresses, entries: ["127.0.0.0/8", "::1"] }
        quotas:
        - name: per-user
          max: 5
          window: 1m
          dimensions: ["request.headers[x-user]"]
          overrides: [{ dimensions: { "request.headers[x-user]": vip }, max: 100 }]
      route_config:
        virtual_hosts:
        - { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: app } }] }
clusters:
- { name: app, endpoints: ["127.0.0.1:18080"] }
"#;

#[test]
fn policy_checks_and_quotas_load() {
    let cfg = load(POLICY).unwrap();
    let NetworkFilter::Http(h) = &cfg.listeners[0].filter_chains[0].filter else {
        panic!()
    };
    let p = &h.policy;
    assert_eq!(p.checks.len(), 2);
    let Check::List(blocked) = &p.checks[0] else {
        panic!("a list check")
    };
    assert_eq!(
        (blocked.attribute.as_str(), blocked.blacklist, blocked.kind),
        ("request.headers[x-user]", true, ListKind::Strings)
    );
    let Check::List(office) = &p.checks[1] else {
        panic!("a list check")
    };
    assert_eq!(office.kind, ListKind::IpAddresses);
    let q = &p.quotas[0];
    assert_eq!(
        (q.max, q.window, q.algorithm),
        (5, Duration::from_secs(60), QuotaAlgorithm::FixedWindow)
    );
    assert_eq!(
        q.overrides[0].dimensions,
        [("request.headers[x-user]".to_string(), "vip".to_string())]
    );
    assert_eq!(q.overrides[0].max, 100);
}

#[test]
fn policy_errors_name_the_field() {
    let bad = POLICY
        .replace("attribute: source.ip", "attribute: source.ipp")
        .replace("window: 1m", "window: 0s")
        .replace(
            r#"overrides: [{ dimensions: { "request.headers[x-user]": vip }"#,
            r#"overrides: [{ dimensions: { "source.ip": vip }"#,
        )
        .replace(
            "      route_config:",
            "        - { name: r1, max: 1, window: 1s, redis: { timeout: 1s } }\n        \
             - { name: r2, max: 1, window: 1s, redis: { address: nohost } }\n      route_config:",
        )
        .replace(
            "- list: { name: blocked",
            "- rbac: { name: r, action: MAYBE, policies: { p: { permissions: [{ bogus: 1 }], principals: [{ any: true }] } } }\n        \
             - opa: { name: o, query: allow }\n        \
             - { opa: { name: o2, rego: x, query: data.x.y }, rbac: { name: r2, policies: {} } }\n        \
             - list: { name: blocked",
        );
    let e = errors(&bad).join("\n");
    for want in [
        "policy.checks[4].list.attribute: unknown attribute `source.ipp`",
        "policy.quotas[0].window",
        "override on `source.ip`, which is not one of the quota's `dimensions`",
        "policy.checks[0].rbac.action",
        "unknown permission `bogus`",
        "policy.checks[1].opa: an opa check needs Rego",
        "policy.checks[1].opa.query: `allow` is not a rule reference",
        "policy.checks[2]: a check has only one of `list`, `rbac`, `opa`, `ext_authz`",
        "policy.quotas[1].redis: a Redis quota needs `address: host:port` or `cluster: [host:port, ...]`",
        "policy.quotas[2].redis: `nohost` is not host:port",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn redis_quotas_load_for_http_and_are_refused_on_rpc_chains() {
    let yaml = POLICY.replace(
        "          overrides:",
        "          redis: { cluster: [\"127.0.0.1:7000\", \"127.0.0.1:7001\"], prefetch: 10, fail_open: false, timeout: 50ms }\n          overrides:",
    );
    let cfg = load(&yaml).unwrap();
    let NetworkFilter::Http(h) = &cfg.listeners[0].filter_chains[0].filter else {
        panic!("an http chain")
    };
    let r = h.policy.quotas[0].redis.as_ref().expect("a redis backend");
    assert!(r.cluster && !r.fail_open);
    assert_eq!(
        (r.addresses.len(), r.prefetch, r.timeout),
        (2, 10, Duration::from_millis(50))
    );
    assert_eq!(r.key_prefix, "tessera");
    let rpc = RPC.replace(
        "      routes:",
        "      policy: { quotas: [{ name: q, max: 1, window: 1s, redis: { address: \"127.0.0.1:6379\" } }] }\n      routes:",
    );
    let e = errors(&rpc).join("\n");
    assert!(
        e.contains("policy.quotas[0].redis: Redis quotas are not built for RPC chains yet"),
        "{e}"
    );
}

#[test]
fn telemetry_loads_and_its_errors_name_the_field() {
    let ok = format!(
        "{POLICY}telemetry:\n  reporter: source\n  workload: {{ name: web-v1, namespace: shop }}\n  statsd: {{ address: \"127.0.0.1:8125\", dogstatsd: false }}\n  access_log: {{ path: /tmp/a.json, max_bytes: 4096, max_files: 2 }}\n  tracing: {{ otlp: \"127.0.0.1:4318\", sampling: 12.5 }}\n"
    );
    let t = load(&ok).unwrap().telemetry.expect("a telemetry block");
    assert_eq!(t.reporter, crate::telemetry::ReporterSide::Source);
    assert_eq!(t.workload.name.as_deref(), Some("web-v1"));
    assert!(!t.statsd.as_ref().unwrap().dogstatsd);
    let tr = t.tracing.as_ref().unwrap();
    assert_eq!((tr.sampling, tr.service_name.as_str()), (12.5, "web-v1"));
    let bad = format!(
        "{POLICY}telemetry:\n  reporter: sideways\n  flush_interval: 0s\n  access_log: {{ max_bytes: 4096 }}\n  tracing: {{ otlp: \"127.0.0.1:4318\", sampling: 150, path: v1/traces }}\n  statsd: {{ prefix: x }}\n"
    );
    let e = errors(&bad).join("\n");
    for want in [
        "telemetry.reporter: unknown value `sideways`",
        "telemetry.flush_interval: must be longer than zero",
        "telemetry.access_log.max_bytes: rotation needs a `path`",
        "telemetry.tracing.sampling",
        "telemetry.tracing.path: the path starts with `/`",
        "telemetry.statsd.address",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn transparent_capture_listeners_and_original_dst_clusters() {
    let src = r#"
listeners:
- name: virtual-outbound
  address: 127.0.0.1:15001
  use_original_dst: true
  filter_chains:
  - tcp_proxy: { cluster: passthrough }
- name: reviews
  address: 10.0.0.5:9080
  bind_to_port: false
  filter_chains:
  - tcp_proxy: { cluster: passthrough }
clusters:
- name: passthrough
  type: original_dst
"#;
    let cfg = load(src).unwrap();
    assert!(cfg.listeners[0].use_original_dst && cfg.listeners[0].bind_to_port);
    assert!(!cfg.listeners[1].use_original_dst && !cfg.listeners[1].bind_to_port);
    assert_eq!(cfg.clusters[0].discovery, DiscoveryType::OriginalDst);
    let bad = src.replace(
        "  type: original_dst",
        "  type: original_dst\n  endpoints: [\"127.0.0.1:80\"]",
    );
    let e = errors(&bad);
    assert!(
        e.iter()
            .any(|e| e.contains("connects to each connection's original destination")),
        "{e:?}"
    );
}

use super::*;

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
        joined.contains("exactly one of `prefix`, `path` or `safe_regex`"),
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
        if name.ends_with(".yaml") && name != "quickstart.yaml" {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "expected the example configs, found {n}");
}

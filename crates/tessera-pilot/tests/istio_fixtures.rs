//! Every Istio fixture (tests/fixtures/istio, from istio/istio: Bookinfo samples and test data)
//! is either accepted and translated, with what it should produce checked, or rejected with the
//! precise reasons a sidecar cannot honour it. Everything Pilot emits passes the sidecar's own
//! converters (tessera-xds).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tessera_pilot::Problem;
use tessera_pilot::istio::Config;
use tessera_pilot::model::Snapshot;
use tessera_pilot::translate::{Resources, SidecarSettings, translate_with};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/istio/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load(name: &str) -> Result<Config, Vec<Problem>> {
    Config::from_text(&fixture(name), name)
}

fn accepted(name: &str) -> Config {
    load(name).unwrap_or_else(|p| panic!("{name} should be accepted: {p:#?}"))
}

/// The reasons a rejected fixture gives, as `path: reason` lines.
fn rejected(name: &str) -> Vec<String> {
    match load(name) {
        Ok(_) => panic!("{name} should be rejected"),
        Err(p) => {
            for x in &p {
                assert_eq!(x.file, name);
                assert!(x.path.starts_with("document "), "{x}");
            }
            p.iter().map(|x| format!("{}: {}", x.path, x.reason)).collect()
        }
    }
}

fn has(list: &[String], path: &str, reason: &str) {
    assert!(
        list.iter().any(|l| l.contains(path) && l.contains(reason)),
        "no problem at `{path}` saying `{reason}` in {list:#?}"
    );
}

/// Bookinfo's services in `default`, with v1..v3 instances, as a registry would give them.
fn bookinfo() -> Snapshot {
    let mut y = String::from("services:\n");
    for (svc, versions) in [("productpage", 1), ("reviews", 3), ("ratings", 2), ("details", 2)] {
        y.push_str(&format!(
            "- name: {svc}\n  ports: [{{ name: http, port: 9080 }}]\n  instances:\n"
        ));
        for v in 1..=versions {
            y.push_str(&format!(
                "  - {{ address: 127.0.0.{v}, ports: {{ http: 908{v} }}, labels: {{ version: v{v} }} }}\n"
            ));
        }
    }
    tessera_pilot::file::parse(&y, "bookinfo.yaml", "file:bookinfo.yaml").expect("bookinfo registry")
}

fn settings() -> SidecarSettings {
    SidecarSettings {
        outbound_http: "127.0.0.1:15001".parse().expect("address"),
    }
}

fn decode<M: Message + Default>(a: &Any) -> M {
    M::decode(a.value.as_slice()).expect("decodes")
}

/// Every resource through the sidecar's converters.
fn converts(r: &Resources) {
    for c in &r.clusters {
        let c: Cluster = decode(c);
        if let Err(e) = tessera_xds::cluster::cluster(&c, &c.name) {
            panic!("cluster {} does not convert: {e:#?}", c.name);
        }
    }
    for e in &r.endpoints {
        let cla: ClusterLoadAssignment = decode(e);
        let mut p = tessera_xds::Problems::default();
        tessera_xds::cluster::load_assignment(&cla, &cla.cluster_name, &mut p);
        assert!(p.is_empty(), "{}: {p:?}", cla.cluster_name);
    }
    for rc in &r.routes {
        let rc: RouteConfiguration = decode(rc);
        if let Err(e) = tessera_xds::route::route_configuration(&rc, "routes") {
            panic!("routes do not convert: {e:#?}");
        }
    }
    for l in &r.listeners {
        let l: Listener = decode(l);
        tessera_xds::listener::listener_with_rds(&l, "l", Some(&|_| None)).expect("listener converts");
    }
}

fn translate(cfg: &Config) -> (Resources, Vec<String>) {
    let (r, p) = translate_with(&bookinfo(), cfg, &settings());
    converts(&r);
    (r, p.iter().map(ToString::to_string).collect())
}

fn cluster_names(r: &Resources) -> Vec<String> {
    r.clusters.iter().map(|c| decode::<Cluster>(c).name).collect()
}

fn routes_of(r: &Resources, vhost: &str) -> Vec<envoy_types::pb::envoy::config::route::v3::Route> {
    let rc: RouteConfiguration = decode(&r.routes[0]);
    rc.virtual_hosts
        .into_iter()
        .find(|v| v.name == vhost)
        .unwrap_or_else(|| panic!("no virtual host {vhost}"))
        .routes
}

/// The clusters and weights a route sends to.
fn targets(r: &envoy_types::pb::envoy::config::route::v3::Route) -> Vec<(String, u32)> {
    match &r.action {
        Some(route::Action::Route(a)) => match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 100)],
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                .collect(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";

/// A DestinationRule with Bookinfo's subsets and no TLS setting.
const SUBSETS: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: all }\nspec:\n  host: reviews\n  subsets:\n  - { name: v1, labels: { version: v1 } }\n  - { name: v2, labels: { version: v2 } }\n  - { name: v3, labels: { version: v3 } }\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: others }\nspec:\n  host: '*.default.svc.cluster.local'\n  subsets:\n  - { name: v1, labels: { version: v1 } }\n";

fn with_subsets(name: &str) -> Config {
    let mut cfg = accepted(name);
    let dr = Config::from_text(SUBSETS, "subsets.yaml").expect("subsets");
    cfg.resources.extend(dr.resources);
    cfg
}

/// The RBAC filters through the sidecar's listener converter, in an inbound HTTP connection
/// manager as the lead's inbound listeners will carry them.
fn rbac_converts(filters: &[envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac]) {
    let mut http_filters: Vec<HttpFilter> = filters
        .iter()
        .map(|f| HttpFilter {
            name: tessera_pilot::istio::rbac::RBAC_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(f))),
            ..Default::default()
        })
        .collect();
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: "inbound".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: "inbound".into(),
                ..Default::default()
            },
        )),
        http_filters,
        ..Default::default()
    };
    let l = Listener {
        name: "inbound".into(),
        address: Some(envoy_types::pb::envoy::config::core::v3::Address {
            address: Some(
                envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                    envoy_types::pb::envoy::config::core::v3::SocketAddress {
                        address: "127.0.0.1".into(),
                        port_specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(15006),
                        ),
                        ..Default::default()
                    },
                ),
            ),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    if let Err(e) = tessera_xds::listener::listener(&l, "inbound") {
        panic!("RBAC does not convert: {e:#?}");
    }
}

fn any<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Every field of crds-authz-valid.yaml a sidecar can honour, with the fixture's values.
const SUPPORTED_AUTHZ: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: full
spec:
  selector:
    matchLabels:
      app: httpbin
  rules:
    - from:
        - source:
            principals: ["principal", "principal-prefix-*", "*-suffix-principal", "*"]
            namespaces: ["ns", "ns-prefix-*", "*-ns-suffix", "*"]
            ipBlocks: ["1.2.3.4", "5.6.0.0/16"]
            remoteIpBlocks: ["1.2.3.4", "5.6.0.0/16"]
            notPrincipals: ["not-principal", "not-principal-prefix-*", "*-not-suffix-principal", "*"]
            notNamespaces: ["not-ns", "not-ns-prefix-*", "*-not-ns-suffix", "*"]
            notIpBlocks: ["9.0.0.1", "9.2.0.0/16"]
            notRemoteIpBlocks: ["9.0.0.1", "9.2.0.0/16"]
            trustDomains: ["cluster.local", "cluster-prefix-*", "*-suffix-cluster", "*"]
            notTrustDomains: ["not-cluster.local", "not-cluster-prefix-*", "*-not-suffix-cluster", "*"]
      to:
        - operation:
            methods: ["method", "method-prefix-*", "*-suffix-method", "*"]
            hosts: ["exact.com", "*.suffix.com", "prefix.*", "*"]
            ports: ["80", "90"]
            paths: ["/exact", "/prefix/*", "*/suffix", "*"]
            notMethods: ["not-method", "not-method-prefix-*", "*-not-suffix-method", "*"]
            notHosts: ["not-exact.com", "*.not-suffix.com", "not-prefix.*", "*"]
            notPorts: ["8000", "9000"]
            notPaths: ["/not-exact", "/not-prefix/*", "*/not-suffix", "*"]
      when:
        - key: "request.headers[X-header]"
          values: ["header", "header-prefix-*", "*-suffix-header", "*"]
          notValues: ["not-header", "not-header-prefix-*", "*-not-suffix-header", "*"]
        - key: "source.ip"
          values: ["10.10.10.10", "192.168.10.0/24"]
          notValues: ["90.10.10.10", "90.168.10.0/24"]
        - key: "remote.ip"
          values: ["10.10.10.10", "192.168.10.0/24"]
          notValues: ["90.10.10.10", "90.168.10.0/24"]
        - key: "source.namespace"
          values: ["ns", "ns-prefix-*", "*-ns-suffix", "*"]
          notValues: ["not-ns", "not-ns-prefix-*", "*-not-ns-suffix", "*"]
        - key: "source.principal"
          values: ["principal", "principal-prefix-*", "*-suffix-principal", "*"]
          notValues: ["not-principal", "not-principal-prefix-*", "*-not-suffix-principal", "*"]
        - key: "destination.port"
          values: ["91", "92"]
          notValues: ["9001", "9002"]
        - key: "source.trustDomain"
          values: ["cluster.local", "cluster-prefix-*", "*-suffix-cluster", "*"]
          notValues: ["not-cluster.local", "not-cluster-prefix-*", "*-not-suffix-cluster", "*"]
"#;

/// What each fixture is expected to do; a new fixture needs an entry.
const EXPECTED: &[&str] = &[
    "analyzer-virtualservice_destinationrules.yaml",
    "authz-builder-custom-simple-http-in.yaml",
    "authz-builder-deny-and-allow-in.yaml",
    "bookinfo-destination-rule-all-mtls.yaml",
    "bookinfo-egress-rule-google-apis.yaml",
    "bookinfo-fault-injection-details-v1.yaml",
    "bookinfo-virtual-service-all-v1.yaml",
    "bookinfo-virtual-service-ratings-test-delay.yaml",
    "bookinfo-virtual-service-reviews-80-20.yaml",
    "bookinfo-virtual-service-reviews-jason-v2-v3.yaml",
    "crds-authz-valid.yaml",
    "crds-peerauth-valid.yaml",
    "gateway-http.golden.yaml",
    "tcp-echo-tcp-echo-20-v2.yaml",
    "testdata-destination-rule-all.yaml",
    "testdata-rule-default-route.yaml",
    "testdata-rule-regex-route.yaml",
    "testdata-se-example.yaml",
    "testdata-virtual-service-all.yaml",
];

#[test]
fn every_fixture_has_an_expectation() {
    let dir = format!("{}/tests/fixtures/istio", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert_eq!(names, EXPECTED);
    // Whatever happens to a file, no field of Istio's API is unknown to the reader.
    for n in names {
        if let Err(p) = load(&n) {
            assert!(!p.iter().any(|x| x.reason.contains("unknown field")), "{n}: {p:#?}");
        }
    }
}

#[test]
fn analyzer_reports_the_subsets_that_do_not_exist() {
    let (r, p) = translate(&accepted("analyzer-virtualservice_destinationrules.yaml"));
    let bogus: Vec<&String> = p.iter().filter(|x| x.contains("subset `bogus`")).collect();
    assert_eq!(bogus.len(), 2, "{p:#?}");
    has(
        &p,
        "document 3 (VirtualService default/reviews-bogussubset) spec.http[0].route[0].destination.subset",
        "subset `bogus` of `reviews.default.svc.cluster.local` does not exist: DestinationRule default/reviews defines v1",
    );
    has(
        &p,
        "document 6 (VirtualService default/reviews-mirror-bogussubset) spec.http[0].mirror.subset",
        "subset `bogus`",
    );
    // The valid references (short and FQDN hosts, a mirror to v1) raise no subset problem.
    for doc in ["document 2 ", "document 4 ", "document 5 "] {
        assert!(!p.iter().any(|x| x.contains(doc) && x.contains("subset")), "{p:#?}");
    }
    // These VirtualServices have no hosts (Istio's analyzer test data leaves them out): reported.
    has(&p, "document 2 (VirtualService default/reviews) spec.hosts", "no hosts");
    // The DestinationRule's subset becomes a cluster with its own endpoints.
    let v1 = format!("outbound|9080|v1|{REVIEWS}");
    assert!(cluster_names(&r).contains(&v1));
    let cla = r
        .endpoints
        .iter()
        .map(decode::<ClusterLoadAssignment>)
        .find(|c| c.cluster_name == v1)
        .expect("v1 endpoints");
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1, "only the v1 instance");
}

#[test]
fn authorization_policies_custom_is_refused() {
    let p = rejected("authz-builder-custom-simple-http-in.yaml");
    has(
        &p,
        "document 1 (AuthorizationPolicy foo/httpbin-1) spec.action",
        "CUSTOM delegates the decision to an external authorizer",
    );
    has(
        &p,
        "document 2 (AuthorizationPolicy foo/httpbin-2) spec.action",
        "CUSTOM",
    );
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn authorization_policies_deny_and_allow_become_two_rbac_filters() {
    use envoy_types::pb::envoy::config::rbac::v3::rbac::Action;
    let cfg = accepted("authz-builder-deny-and-allow-in.yaml");
    let f = cfg.rbac_for(&BTreeMap::new(), "foo");
    assert_eq!(f.len(), 2);
    let deny = f[0].rules.as_ref().expect("rules");
    let allow = f[1].rules.as_ref().expect("rules");
    assert_eq!(deny.action, Action::Deny as i32);
    assert_eq!(allow.action, Action::Allow as i32);
    assert!(deny.policies.contains_key("ns[foo]-policy[httpbin-deny]-rule[0]"));
    assert!(allow.policies.contains_key("ns[foo]-policy[httpbin-allow]-rule[0]"));
    rbac_converts(&f);
    assert!(cfg.rbac_for(&BTreeMap::new(), "bar").is_empty(), "another namespace");
}

#[test]
fn every_authorization_policy_field_is_translated_or_refused() {
    let p = rejected("crds-authz-valid.yaml");
    has(&p, "source.requestPrincipals", "JWT");
    has(&p, "source.notRequestPrincipals", "JWT");
    has(&p, "operation.paths[4]", "path templates");
    has(&p, "operation.notPaths[5]", "path templates");
    has(&p, "spec.rules[0].when[5].key", "JWT");
    has(&p, "spec.rules[0].when[10].key", "`destination.ip` is not supported");
    has(&p, "spec.rules[0].when[12].key", "`connection.sni` is not supported");
    has(&p, "spec.rules[0].when[14].key", "`experimental.envoy.filters.a.b[c]`");
    assert_eq!(p.len(), 14, "{p:#?}");
    // Without what the sidecar cannot do, the rest (principals, namespaces, IP blocks, trust
    // domains, hosts, ports, methods, paths, header / IP / namespace / port conditions)
    // translates and converts.
    // The fixture's own values for them (its second document is untouched).
    let full = fixture("crds-authz-valid.yaml");
    let second = full.split("\n---\n").nth(1).expect("second document");
    let text = format!("{SUPPORTED_AUTHZ}---\n{second}");
    let cfg = Config::from_text(&text, "authz.yaml").unwrap_or_else(|p| panic!("{p:#?}"));
    let labels: BTreeMap<String, String> = [("app".to_string(), "httpbin".to_string())].into();
    let f = cfg.rbac_for(&labels, "default");
    assert_eq!(f.len(), 1, "ALLOW only");
    assert_eq!(f[0].rules.as_ref().map(|r| r.policies.len()), Some(2));
    rbac_converts(&f);
    // The selector: another workload gets only the selector-less policy.
    let other = cfg.rbac_for(&BTreeMap::new(), "default");
    assert_eq!(other[0].rules.as_ref().map(|r| r.policies.len()), Some(1));
}

#[test]
fn istio_mutual_tls_is_refused() {
    let p = rejected("bookinfo-destination-rule-all-mtls.yaml");
    assert_eq!(p.len(), 4, "{p:#?}");
    for (i, dr) in ["productpage", "reviews", "ratings", "details"].iter().enumerate() {
        has(
            &p,
            &format!(
                "document {} (DestinationRule default/{dr}) spec.trafficPolicy.tls.mode",
                i + 1
            ),
            "ISTIO_MUTUAL needs workload certificates",
        );
    }
}

#[test]
fn egress_to_google_apis_needs_a_ca_and_then_originates_tls() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    let p = rejected("bookinfo-egress-rule-google-apis.yaml");
    has(
        &p,
        "document 3 (DestinationRule default/originate-tls-for-googleapis) spec.trafficPolicy.portLevelSettings[0].tls.caCertificates",
        "Pilot cannot know where the sidecar's is",
    );
    assert_eq!(p.len(), 1);
    let text = fixture("bookinfo-egress-rule-google-apis.yaml").replace(
        "mode: SIMPLE",
        "caCertificates: /etc/ssl/certs/ca-certificates.crt\n        mode: SIMPLE",
    );
    let (r, p) = translate(&Config::from_text(&text, "egress.yaml").expect("accepted"));
    assert!(p.is_empty(), "{p:#?}");
    let clusters: Vec<Cluster> = r.clusters.iter().map(decode).collect();
    let https = clusters
        .iter()
        .find(|c| c.name == "outbound|443||www.googleapis.com")
        .expect("the HTTPS port's cluster");
    assert_eq!(
        https.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
    );
    let tls = tessera_xds::cluster::cluster(https, "c")
        .expect("converts")
        .tls
        .expect("TLS");
    assert_eq!(tls.sni.as_deref(), Some("www.googleapis.com"));
    let http = clusters
        .iter()
        .find(|c| c.name == "outbound|80||www.googleapis.com")
        .expect("port 80");
    assert!(http.transport_socket.is_none(), "TLS on port 443 only");
    // The VirtualService sends port 80 to port 443.
    let routes = routes_of(&r, "www.googleapis.com:80");
    assert_eq!(
        targets(&routes[0]),
        [("outbound|443||www.googleapis.com".to_string(), 100)]
    );
}

#[test]
fn fault_injection_is_refused() {
    for (f, vs) in [
        ("bookinfo-fault-injection-details-v1.yaml", "details"),
        ("bookinfo-virtual-service-ratings-test-delay.yaml", "ratings"),
    ] {
        let p = rejected(f);
        assert_eq!(p.len(), 1, "{p:#?}");
        has(
            &p,
            &format!("document 1 (VirtualService default/{vs}) spec.http[0].fault"),
            "not per route",
        );
    }
}

#[test]
fn all_v1_routes_to_the_v1_subsets() {
    let (_, p) = translate(&accepted("bookinfo-virtual-service-all-v1.yaml"));
    assert_eq!(p.len(), 4, "without DestinationRules, every subset is missing: {p:#?}");
    has(
        &p,
        "spec.http[0].route[0].destination.subset",
        "no DestinationRule defines subsets",
    );
    let (r, p) = translate(&with_subsets("bookinfo-virtual-service-all-v1.yaml"));
    assert!(p.is_empty(), "{p:#?}");
    for svc in ["productpage", "reviews", "ratings", "details"] {
        let host = format!("{svc}.default.svc.cluster.local");
        let routes = routes_of(&r, &format!("{host}:9080"));
        assert_eq!(targets(&routes[0]), [(format!("outbound|9080|v1|{host}"), 100)]);
    }
}

#[test]
fn reviews_80_20_is_a_weighted_split() {
    let (r, p) = translate(&with_subsets("bookinfo-virtual-service-reviews-80-20.yaml"));
    assert!(p.is_empty(), "{p:#?}");
    let routes = routes_of(&r, &format!("{REVIEWS}:9080"));
    assert_eq!(routes.len(), 1);
    assert_eq!(
        targets(&routes[0]),
        [
            (format!("outbound|9080|v1|{REVIEWS}"), 80),
            (format!("outbound|9080|v2|{REVIEWS}"), 20)
        ]
    );
}

#[test]
fn jason_goes_to_v2_and_everyone_else_to_v3() {
    use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    let (r, p) = translate(&with_subsets("bookinfo-virtual-service-reviews-jason-v2-v3.yaml"));
    assert!(p.is_empty(), "{p:#?}");
    let routes = routes_of(&r, &format!("{REVIEWS}:9080"));
    assert_eq!(routes.len(), 2);
    let m = routes[0].r#match.as_ref().expect("match");
    assert_eq!(m.headers[0].name, "end-user");
    assert!(
        matches!(&m.headers[0].header_match_specifier, Some(HeaderMatchSpecifier::StringMatch(s)) if format!("{s:?}").contains("jason"))
    );
    assert_eq!(targets(&routes[0]), [(format!("outbound|9080|v2|{REVIEWS}"), 100)]);
    assert_eq!(targets(&routes[1]), [(format!("outbound|9080|v3|{REVIEWS}"), 100)]);
    // Services without a VirtualService keep their default route.
    let ratings = routes_of(&r, "ratings.default.svc.cluster.local:9080");
    assert_eq!(
        targets(&ratings[0]),
        [("outbound|9080||ratings.default.svc.cluster.local".to_string(), 100)]
    );
}

#[test]
fn peer_authentication_strict_is_refused_and_permissive_accepted() {
    let p = rejected("crds-peerauth-valid.yaml");
    assert_eq!(p.len(), 1, "{p:#?}");
    has(
        &p,
        "document 1 (PeerAuthentication default/full) spec.portLevelMtls.80.mode",
        "STRICT mutual TLS needs workload certificates",
    );
    let text = fixture("crds-peerauth-valid.yaml").replace("STRICT", "DISABLE");
    let cfg = Config::from_text(&text, "pa.yaml").unwrap_or_else(|p| panic!("{p:#?}"));
    assert_eq!(cfg.resources.len(), 2);
}

#[test]
fn gateways_and_cors_are_refused() {
    let p = rejected("gateway-http.golden.yaml");
    has(
        &p,
        "document 1 (Gateway istio-system/",
        "Pilot configures sidecars only",
    );
    has(&p, "spec.gateways[0]", "routes bound to gateways are not supported");
    has(
        &p,
        "document 4 (VirtualService",
        "spec.http[0].corsPolicy: the sidecar does not support CORS",
    );
    assert_eq!(
        p.iter().filter(|x| x.contains("spec.gateways[0]")).count(),
        12,
        "every VirtualService"
    );
    let p = rejected("testdata-virtual-service-all.yaml");
    assert_eq!(p.len(), 1, "{p:#?}");
    has(&p, "spec.gateways[0]", "`my-gateway`");
}

#[test]
fn tcp_routes_are_refused() {
    let p = rejected("tcp-echo-tcp-echo-20-v2.yaml");
    has(
        &p,
        "document 1 (VirtualService default/tcp-echo) spec.tcp",
        "TCP routes need TCP listeners",
    );
    has(&p, "spec.gateways[0]", "`tcp-echo-gateway`");
}

#[test]
fn destination_rule_policies_become_cluster_settings() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
    let p = rejected("testdata-destination-rule-all.yaml");
    assert_eq!(p.len(), 2, "{p:#?}");
    has(
        &p,
        "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
        "does not limit requests per upstream connection",
    );
    has(
        &p,
        "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        "does not generate the cookie",
    );
    let text = fixture("testdata-destination-rule-all.yaml")
        .replace("        maxRequestsPerConnection: 65\n", "")
        .replace("              ttl: 30s\n", "");
    let (r, p) = translate(&Config::from_text(&text, "dr.yaml").unwrap_or_else(|p| panic!("{p:#?}")));
    assert!(p.is_empty(), "{p:#?}");
    let host = "destall.default.svc.cluster.local";
    let clusters: Vec<Cluster> = r.clusters.iter().map(decode).collect();
    let c = clusters
        .iter()
        .find(|c| c.name == format!("outbound|81||{host}"))
        .expect("cluster");
    assert_eq!(c.lb_policy, LbPolicy::RoundRobin as i32);
    assert_eq!(c.connect_timeout.map(|d| d.seconds), Some(6));
    let t = &c.circuit_breakers.as_ref().expect("circuit breakers").thresholds[0];
    let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>| x.as_ref().map(|w| w.value);
    assert_eq!(
        (
            v(&t.max_connections),
            v(&t.max_pending_requests),
            v(&t.max_requests),
            v(&t.max_retries)
        ),
        (Some(99), Some(14), Some(33), Some(4))
    );
    let od = c.outlier_detection.as_ref().expect("outlier detection");
    assert_eq!(od.interval.map(|d| d.nanos), Some(8_000_000));
    assert_eq!(od.base_ejection_time.map(|d| d.seconds), Some(60));
    assert_eq!(v(&od.max_ejection_percent), Some(11));
    let model = tessera_xds::cluster::cluster(c, "c").expect("converts");
    assert_eq!(model.circuit_breakers.default.max_connections, 99);
    let v2 = clusters
        .iter()
        .find(|c| c.name == format!("outbound|81|v2|{host}"))
        .expect("subset v2");
    assert_eq!(v2.lb_policy, LbPolicy::RingHash as i32, "the subset's own policy");
    assert!(v2.circuit_breakers.is_some(), "and the rule's connection pool");
    // The ServiceEntry's STATIC endpoint, on its mapped port.
    let cla = r
        .endpoints
        .iter()
        .map(decode::<ClusterLoadAssignment>)
        .find(|c| c.cluster_name == format!("outbound|81||{host}"))
        .expect("endpoints");
    assert!(format!("{cla:?}").contains("127.0.0.2") && format!("{cla:?}").contains("7072"));
}

#[test]
fn routes_bound_to_gateways_are_refused_and_work_on_the_mesh() {
    let p = rejected("testdata-rule-default-route.yaml");
    assert_eq!(p.len(), 2, "{p:#?}");
    has(
        &p,
        "document 2 (VirtualService testns/default-route-1) spec.gateways[0]",
        "`my-gateway`",
    );
    let text = fixture("testdata-rule-default-route.yaml").replace("- my-gateway", "- mesh");
    let (r, p) = translate(&Config::from_text(&text, "mesh.yaml").unwrap_or_else(|p| panic!("{p:#?}")));
    // Two VirtualServices for one host: the first routes it, the second is reported.
    assert_eq!(p.len(), 1, "{p:#?}");
    has(
        &p,
        "document 3 (VirtualService testns/default-route-2) spec.hosts[0]",
        "already routed by VirtualService testns/default-route-1",
    );
    let routes = routes_of(&r, "c.foo:80");
    assert_eq!(routes.len(), 1);
    assert_eq!(targets(&routes[0]), [("outbound|80||c.foo".to_string(), 100)]);
}

#[test]
fn source_labels_are_refused() {
    let p = rejected("testdata-rule-regex-route.yaml");
    assert_eq!(p.len(), 1, "{p:#?}");
    has(&p, "spec.http[0].match[0].sourceLabels", "no per-workload scoping");
    let text = fixture("testdata-rule-regex-route.yaml").replace("        sourceLabels:\n          version: v1\n", "");
    let (r, p) = translate(&Config::from_text(&text, "regex.yaml").unwrap_or_else(|p| panic!("{p:#?}")));
    assert!(p.is_empty(), "{p:#?}");
    let routes = routes_of(&r, "regex.extsvc.com:9003");
    assert_eq!(
        targets(&routes[0]),
        [("outbound|9003|v2|regex.extsvc.com".to_string(), 100)]
    );
    assert!(format!("{:?}", routes[0].r#match).contains("b.*"));
    assert_eq!(
        targets(&routes[1]),
        [("outbound|9003|v1|regex.extsvc.com".to_string(), 100)]
    );
}

#[test]
fn service_entries_the_sidecar_cannot_honour() {
    let p = rejected("testdata-se-example.yaml");
    assert_eq!(p.len(), 4, "{p:#?}");
    has(
        &p,
        "document 3 (ServiceEntry seexamples/external-svc-mongocluster) spec.addresses",
        "virtual IPs",
    );
    has(
        &p,
        "document 6 (VirtualService seexamples/tls-routing) spec.tls",
        "TLS (SNI) routes",
    );
    has(
        &p,
        "document 7 (ServiceEntry seexamples/external-svc-wildcard-example) spec.resolution",
        "NONE",
    );
    has(
        &p,
        "document 8 (ServiceEntry seexamples/unix-domain-socket-example) spec.endpoints[0].address",
        "Unix domain socket",
    );
    // The Sidecar, the STATIC and DNS entries and the MUTUAL DestinationRule are fine alone
    // (the Mongo entry without its VIPs).
    let full = fixture("testdata-se-example.yaml");
    let text: Vec<&str> = full
        .lines()
        .filter(|l| !l.contains("addresses:") && !l.contains("192.192.192.192"))
        .collect();
    let text = text.join("\n");
    let docs: Vec<&str> = text.split("\n---\n").collect();
    let keep: Vec<&str> = docs
        .iter()
        .copied()
        .filter(|d| {
            !["tls-routing", "wildcard-example", "unix-domain"]
                .iter()
                .any(|n| d.contains(n))
        })
        .collect();
    let cfg = Config::from_text(&keep.join("\n---\n"), "se.yaml").unwrap_or_else(|p| panic!("{p:#?}"));
    let (r, p) = translate(&cfg);
    assert!(p.is_empty(), "{p:#?}");
    let names = cluster_names(&r);
    assert!(
        names.contains(&"outbound|1200||test.seexamples".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"outbound|8000||foo.bar.com".to_string()), "{names:?}");
    assert!(
        names.contains(&"outbound|443||api.dropboxapi.com".to_string()),
        "{names:?}"
    );
    let mongo: Cluster = r
        .clusters
        .iter()
        .map(decode::<Cluster>)
        .find(|c| c.name == "outbound|27018||mymongodb.somedomain")
        .expect("mongo cluster");
    let tls = tessera_xds::cluster::cluster(&mongo, "c")
        .expect("converts")
        .tls
        .expect("MUTUAL TLS");
    assert_eq!(tls.sni.as_deref(), Some("v1.mymongodb.somedomain"));
    assert_eq!(tls.common.tls_certificates.len(), 1, "the client certificate");
    let dns: Cluster = r
        .clusters
        .iter()
        .map(decode::<Cluster>)
        .find(|c| c.name == "outbound|8000||foo.bar.com")
        .expect("dns cluster");
    let la = format!("{:?}", dns.load_assignment);
    assert!(
        la.contains("us.foo.bar.com") && la.contains("8080") && la.contains("in.foo.bar.com"),
        "{la}"
    );
}

/// Every HTTP feature of a VirtualService a sidecar supports, in one, through the converters.
#[test]
fn http_route_features_translate_and_convert() {
    const VS: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: { name: reviews, namespace: default }
spec:
  hosts: [reviews]
  gateways: [mesh]
  http:
  - name: exact-and-regex
    match:
    - uri: { exact: /health }
      method: { exact: GET }
      ignoreUriCase: true
    - uri: { regex: "/v[0-9]+/.*" }
      queryParams: { debug: { exact: "1" } }
      withoutHeaders: { x-skip: {} }
    route:
    - destination: { host: reviews, subset: v1, port: { number: 9080 } }
    timeout: 2s
    retries: { attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,503,connect-failure" }
    mirror: { host: ratings }
    mirrorPercentage: { value: 25 }
    headers:
      request: { set: { x-a: "1" }, add: { x-b: "2" }, remove: [x-c] }
      response: { set: { x-d: "3" }, remove: [server] }
  - match: [{ uri: { prefix: /old } }]
    rewrite: { uri: /new, authority: reviews.internal }
    route:
    - { destination: { host: reviews, subset: v2 }, weight: 75 }
    - { destination: { host: reviews.default.svc.cluster.local, subset: v3 }, weight: 25 }
  - match: [{ uri: { prefix: /re } }]
    rewrite: { uriRegexRewrite: { match: "^/re/(.*)$", rewrite: "/\\1" } }
    route: [{ destination: { host: reviews } }]
  - match: [{ uri: { prefix: /moved } }]
    redirect: { uri: /here, authority: example.com, redirectCode: 302 }
  - match: [{ uri: { prefix: /gone } }]
    directResponse: { status: 410, body: { string: gone } }
  - match: [{ port: 9999 }]
    route: [{ destination: { host: reviews } }]
  - route: [{ destination: { host: reviews, subset: v1 } }]
"#;
    let mut cfg = Config::from_text(VS, "vs.yaml").unwrap_or_else(|p| panic!("{p:#?}"));
    cfg.resources
        .extend(Config::from_text(SUBSETS, "s.yaml").expect("subsets").resources);
    let (r, p) = translate(&cfg);
    assert!(p.is_empty(), "{p:#?}");
    let rc: RouteConfiguration = decode(&r.routes[0]);
    let model = tessera_xds::route::route_configuration(&rc, "r").expect("converts");
    let vh = model
        .virtual_hosts
        .iter()
        .find(|v| v.name == format!("{REVIEWS}:9080"))
        .expect("vhost");
    // Two matches make two routes; the port-9999 match does not apply to port 9080.
    assert_eq!(vh.routes.len(), 7, "{:#?}", vh.routes);
    let text = format!("{vh:?}");
    for want in [
        "/health",
        "x-skip",
        "debug",
        "/new",
        "reviews.internal",
        "/here",
        "gone",
        "x-a",
        "server",
    ] {
        assert!(text.contains(want), "{want} missing from {text}");
    }
    let Some(route::Action::Route(a)) = &routes_of(&r, &format!("{REVIEWS}:9080"))[0].action else {
        panic!("a forward")
    };
    assert_eq!(a.timeout.map(|d| d.seconds), Some(2));
    let retry = a.retry_policy.as_ref().expect("retries");
    assert_eq!(retry.retry_on, "5xx,connect-failure,retriable-status-codes");
    assert_eq!(retry.retriable_status_codes, [503]);
    assert_eq!(
        a.request_mirror_policies[0].cluster,
        "outbound|9080||ratings.default.svc.cluster.local"
    );
    // Without a timeout, none (Istio's default), rather than Envoy's 15s.
    let Some(route::Action::Route(a)) = &routes_of(&r, &format!("{REVIEWS}:9080"))[6].action else {
        panic!("a forward")
    };
    assert_eq!(a.timeout.map(|d| (d.seconds, d.nanos)), Some((0, 0)));
}

/// A consistent hash in a DestinationRule sets the route's hash policy.
#[test]
fn consistent_hash_sets_the_route_hash_policy() {
    const CFG: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: r }\nspec:\n  host: reviews\n  trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: x-user, maglev: { tableSize: 65537 } } } }\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: r }\nspec:\n  hosts: [reviews]\n  http: [{ route: [{ destination: { host: reviews } }] }]\n";
    let (r, p) = translate(&Config::from_text(CFG, "h.yaml").expect("accepted"));
    assert!(p.is_empty(), "{p:#?}");
    let Some(route::Action::Route(a)) = &routes_of(&r, &format!("{REVIEWS}:9080"))[0].action else {
        panic!("a forward")
    };
    assert!(format!("{:?}", a.hash_policy).contains("x-user"));
    let c: Cluster = r
        .clusters
        .iter()
        .map(decode::<Cluster>)
        .find(|c| c.name == format!("outbound|9080||{REVIEWS}"))
        .expect("cluster");
    assert_eq!(
        c.lb_policy,
        envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::Maglev as i32
    );
}

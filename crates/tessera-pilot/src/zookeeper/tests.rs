use super::*;

fn cfg() -> ZkConfig {
    ZkConfig::parse(
        &serde_json::json!({ "servers": "127.0.0.1:2181", "namespace": "shop" }),
        "pilot.yaml",
    )
    .unwrap()
}

/// A node name as Dubbo writes it: the whole URL percent-encoded.
fn node(url: &str) -> String {
    let mut out = String::new();
    for b in url.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const DEMO: &str = "dubbo://10.0.0.7:20880/com.foo.DemoService?anyhost=true&application=demo&interface=com.foo.DemoService&methods=sayHello&version=1.0.0&group=g1&side=provider&weight=100&timestamp=1700000000000";

#[test]
fn a_dubbo_provider_url_becomes_an_instance() {
    let p = parse_provider(&node(DEMO)).unwrap();
    assert_eq!(p.port_name, "dubbo");
    assert_eq!(p.protocol, Protocol::Dubbo);
    assert_eq!(p.address, "10.0.0.7".parse::<IpAddr>().unwrap());
    assert_eq!(p.port, 20880);
    assert_eq!(p.weight, 100);
    assert!(p.healthy);
    assert_eq!(p.timestamp, 1_700_000_000_000);
    let labels: Vec<(&str, &str)> = p.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(labels, [("application", "demo"), ("group", "g1"), ("version", "1.0.0")]);
}

#[test]
fn schemes_weights_and_health_map_as_documented() {
    // (url, port name, protocol, weight, healthy)
    let table: &[(&str, &str, Protocol, u32, bool)] = &[
        ("tri://10.0.0.1:50051/a.B", "tri", Protocol::Grpc, 100, true),
        ("grpc://10.0.0.1:50051/a.B", "grpc", Protocol::Grpc, 100, true),
        ("bolt://10.0.0.1:12200/a.B", "bolt", Protocol::Bolt, 100, true),
        ("rest://10.0.0.1:8080/a.B", "http", Protocol::Http, 100, true),
        (
            "DUBBO://10.0.0.1:20880/a.B?weight=500",
            "dubbo",
            Protocol::Dubbo,
            128,
            true,
        ),
        ("dubbo://10.0.0.1:20880/a.B?weight=0", "dubbo", Protocol::Dubbo, 1, true),
        (
            "dubbo://10.0.0.1:20880/a.B?weight=-3",
            "dubbo",
            Protocol::Dubbo,
            1,
            true,
        ),
        ("dubbo://10.0.0.1:20880/a.B?weight=7", "dubbo", Protocol::Dubbo, 7, true),
        (
            "dubbo://10.0.0.1:20880/a.B?enabled=false",
            "dubbo",
            Protocol::Dubbo,
            100,
            false,
        ),
        (
            "dubbo://10.0.0.1:20880/a.B?enabled=true",
            "dubbo",
            Protocol::Dubbo,
            100,
            true,
        ),
        (
            "dubbo://10.0.0.1:20880/a.B?disabled=true",
            "dubbo",
            Protocol::Dubbo,
            100,
            false,
        ),
        (
            "dubbo://10.0.0.1:20880/a.B?disabled",
            "dubbo",
            Protocol::Dubbo,
            100,
            false,
        ),
        (
            "dubbo://10.0.0.1:20880/a.B?disabled=false",
            "dubbo",
            Protocol::Dubbo,
            100,
            true,
        ),
        ("dubbo://u:p@10.0.0.1:20880/a.B", "dubbo", Protocol::Dubbo, 100, true),
        ("dubbo://10.0.0.1:20880", "dubbo", Protocol::Dubbo, 100, true),
    ];
    for &(url, name, protocol, weight, healthy) in table {
        let p = parse_provider(&node(url)).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(
            (p.port_name, p.protocol, p.weight, p.healthy),
            (name, protocol, weight, healthy),
            "{url}"
        );
    }
    let v6 = parse_provider(&node("dubbo://[::1]:20880/a.B")).unwrap();
    assert_eq!(v6.address, "::1".parse::<IpAddr>().unwrap());
}

#[test]
fn malformed_urls_are_refused_with_a_reason() {
    let table: &[(&str, &str)] = &[
        ("not-a-url", "no `://`"),
        ("%zz", "bad %-escape"),
        ("%", "bad %-escape"),
        ("%C3%28", "not UTF-8"),
        ("injvm://10.0.0.1:20880/a.B", "unsupported protocol `injvm`"),
        ("dubbo://demo-host:20880/a.B", "not an IP address"),
        ("dubbo://10.0.0.1/a.B", "has no port"),
        ("dubbo://10.0.0.1:0/a.B", "not a port"),
        ("dubbo://10.0.0.1:70000/a.B", "not a port"),
        ("dubbo://10.0.0.1:x/a.B", "not a port"),
        ("dubbo://:20880/a.B", "has no host"),
        ("dubbo://0.0.0.0:20880/a.B", "cannot be called"),
        ("dubbo://[::1/a.B", "without `]`"),
        ("dubbo://10.0.0.1:20880/a.B?weight=heavy", "weight `heavy`"),
        ("dubbo://10.0.0.1:20880/a.B?side=consumer", "side=consumer"),
    ];
    for &(raw, want) in table {
        // Raw text, not re-encoded: what a broken registrant may write.
        let err = parse_provider(raw).expect_err(raw);
        assert!(err.contains(want), "{raw}: {err:?} lacks {want:?}");
    }
}

#[test]
fn interface_names_become_service_names() {
    for (iface, want) in [
        ("com.foo.DemoService", Some("com-foo-demoservice")),
        (
            "org.apache.dubbo.samples.api.GreetingsService",
            Some("org-apache-dubbo-samples-api-greetingsservice"),
        ),
        ("a.b$Inner", Some("a-b-inner")),
        ("..x..", Some("x")),
        ("$$$", None),
    ] {
        assert_eq!(service_name(iface).as_deref(), want, "{iface}");
    }
}

fn listing(entries: &[(&str, Option<&[&str]>)]) -> BTreeMap<String, Option<Vec<String>>> {
    entries
        .iter()
        .map(|(i, kids)| (i.to_string(), kids.map(|k| k.iter().map(|u| node(u)).collect())))
        .collect()
}

#[test]
fn providers_map_to_one_service_per_interface() {
    let c = cfg();
    let mut remembered = BTreeMap::new();
    let l = listing(&[
        (
            "com.foo.DemoService",
            Some(&[
                DEMO,
                "dubbo://10.0.0.8:20880/com.foo.DemoService?version=2.0.0&weight=50",
                "dubbo://10.0.0.9:20881/com.foo.DemoService",
                "tri://10.0.0.9:50051/com.foo.DemoService",
                "dubbo://nowhere:1/com.foo.DemoService",
            ]),
        ),
        ("config", None),
        ("com.foo.Empty", Some(&[])),
    ]);
    let (snap, skipped) = map_providers(&c, &l, &mut remembered);
    assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["shop/com-foo-demoservice"]);
    let svc = &snap.services["shop/com-foo-demoservice"];
    assert_eq!(svc.labels["interface"], "com.foo.DemoService");
    assert_eq!(
        svc.source,
        "zookeeper:127.0.0.1:2181/dubbo/com.foo.DemoService/providers"
    );
    let ports: Vec<(&str, u16, Protocol)> = svc
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.protocol))
        .collect();
    // 20880 is what most dubbo providers use.
    assert_eq!(
        ports,
        [("dubbo", 20880, Protocol::Dubbo), ("tri", 50051, Protocol::Grpc)]
    );
    let inst = &snap.instances["shop/com-foo-demoservice"];
    // Each instance has the one port of its URL.
    let got: Vec<String> = inst
        .iter()
        .map(|i| {
            let ports: Vec<String> = i.ports.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {} w{}", i.address, ports.join(","), i.weight)
        })
        .collect();
    assert_eq!(
        got,
        [
            "10.0.0.7 dubbo=20880 w100",
            "10.0.0.8 dubbo=20880 w50",
            "10.0.0.9 dubbo=20881 w100",
            "10.0.0.9 tri=50051 w100",
        ]
    );
    assert!(inst.iter().all(|i| i.source == svc.source));
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0]
            .path
            .starts_with("/dubbo/com.foo.DemoService/providers/dubbo%3A%2F%2Fnowhere")
    );
    assert!(skipped[0].reason.contains("not an IP address"));

    // Providers gone: the service stays without instances while its node does.
    let l = listing(&[("com.foo.DemoService", Some(&[]))]);
    let (snap, _) = map_providers(&c, &l, &mut remembered);
    assert_eq!(snap.services["shop/com-foo-demoservice"].ports.len(), 2);
    assert!(snap.instances["shop/com-foo-demoservice"].is_empty());
    // The interface gone: so is the service, and what was remembered of it.
    let (snap, _) = map_providers(&c, &BTreeMap::new(), &mut remembered);
    assert!(snap.services.is_empty());
    assert!(remembered.is_empty());
}

#[test]
fn duplicates_keep_the_newest_and_name_clashes_are_reported() {
    let c = cfg();
    let l = listing(&[
        (
            "a.B",
            Some(&[
                "dubbo://10.0.0.1:20880/a.B?version=old&timestamp=1",
                "dubbo://10.0.0.1:20880/a.B?version=new&timestamp=2",
            ]),
        ),
        ("a_b", Some(&["dubbo://10.0.0.2:20880/a_b"])),
    ]);
    let (snap, skipped) = map_providers(&c, &l, &mut BTreeMap::new());
    let inst = &snap.instances["shop/a-b"];
    assert_eq!(inst.len(), 1);
    assert_eq!(inst[0].labels["version"], "new");
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].path, "/dubbo/a_b");
    assert!(skipped[0].reason.contains("already taken by interface `a.B`"));
}

fn problems(v: serde_json::Value) -> Vec<String> {
    ZkConfig::parse(&v, "pilot.yaml")
        .expect_err("problems")
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn the_config_section_is_checked_field_by_field() {
    let ok = ZkConfig::parse(
        &serde_json::json!({ "servers": "127.0.0.1:2181, [::1]:2182,zk1:2181", "root": "/", "session_timeout": "4000ms" }),
        "f",
    )
    .unwrap();
    assert_eq!(ok.servers, ["127.0.0.1:2181", "[::1]:2182", "zk1:2181"]);
    assert_eq!(ok.root, "/");
    assert_eq!(ok.namespace, "default");
    assert_eq!(ok.session_timeout, Duration::from_millis(4000));
    assert_eq!(ok.providers("x.Y"), "/x.Y/providers");
    let d = ZkConfig::parse(&serde_json::json!({ "servers": "127.0.0.1:2181" }), "f").unwrap();
    assert_eq!(
        (d.root.as_str(), d.session_timeout),
        ("/dubbo", Duration::from_secs(10))
    );

    let p = problems(serde_json::json!({
        "servers": "127.0.0.1,127.0.0.1:0,,zk:2181/chroot,::1:2181",
        "root": "dubbo/",
        "namespace": "Shop",
        "session_timeout": "soon",
        "colour": "red"
    }));
    for want in [
        "pilot.yaml: registries.zookeeper.servers: `127.0.0.1` has no port",
        "registries.zookeeper.servers: `127.0.0.1:0`: `0` is not a port from 1 to 65535",
        "registries.zookeeper.servers: an empty server in",
        "registries.zookeeper.servers: `zk:2181/chroot`: a chroot path is not supported",
        "registries.zookeeper.servers: `::1:2181`: write an IPv6 address as [addr]:port",
        "registries.zookeeper.root: `dubbo/` is not an absolute ZooKeeper path",
        "registries.zookeeper.namespace: `Shop` is not a namespace",
        "registries.zookeeper.session_timeout: `soon` is not a duration",
        "registries.zookeeper.colour: unknown field (known: servers, root, namespace, session_timeout)",
    ] {
        assert!(p.iter().any(|l| l.contains(want)), "missing {want:?} in {p:#?}");
    }
    assert_eq!(p.len(), 9, "{p:#?}");
    assert_eq!(
        problems(serde_json::json!({})),
        [
            "pilot.yaml: registries.zookeeper.servers: required: the ZooKeeper servers, e.g. \"127.0.0.1:2181\" or \"zk1:2181,zk2:2181\""
        ]
    );
    assert!(problems(serde_json::json!({ "servers": 2181 }))[0].contains("servers: expected a string, not 2181"));
    assert!(problems(serde_json::json!("127.0.0.1:2181"))[0].contains("registries.zookeeper: expected a map"));
    assert!(
        problems(serde_json::json!({ "servers": "127.0.0.1:2181", "session_timeout": "0s" }))[0]
            .contains("out of range")
    );
    assert!(problems(serde_json::json!({ "servers": "127.0.0.1:2181", "root": "/a//b" }))[0].contains("root"));
}

#[test]
fn jitter_stays_within_half_to_all() {
    for _ in 0..100 {
        let j = jitter(Duration::from_millis(1000));
        assert!(
            j >= Duration::from_millis(500) && j <= Duration::from_millis(1000),
            "{j:?}"
        );
    }
}

proptest::proptest! {
    #[test]
    fn the_parser_never_panics(s in "\\PC{0,200}") {
        let _ = parse_provider(&s);
        let _ = service_name(&s);
    }

    #[test]
    fn url_like_node_names_parse_or_say_why(
        scheme in "(dubbo|tri|bolt|rest|x)",
        host in "(127\\.0\\.0\\.[0-9]{1,3}|\\[::1\\]|[a-z]{1,5}|)",
        port in "(:[0-9]{0,6})?",
        query in "[a-z=&%0-9]{0,40}",
    ) {
        let url = format!("{scheme}://{host}{port}/a.B?{query}");
        match parse_provider(&node(&url)) {
            Ok(p) => proptest::prop_assert!((1..=128).contains(&p.weight)),
            Err(reason) => proptest::prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn the_decoder_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
        let mut r = wire::Reader::new(&b);
        let _ = r.strings();
        let _ = wire::reply(&b).map(|mut r| wire::event(&mut r.body));
        let _ = wire::connect_response(&b);
    }
}

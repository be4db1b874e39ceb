use super::*;
use crate::load::transcode;
use serde_json::json;

fn any(type_url: &str, v: serde_json::Value) -> Any {
    let name = type_url.rsplit('/').next().unwrap();
    Any {
        type_url: type_url.into(),
        value: transcode(name, v).unwrap(),
    }
}

fn eds_cluster(name: &str) -> Any {
    any(
        CLUSTER,
        json!({"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}),
    )
}

fn static_cluster(name: &str) -> Any {
    any(CLUSTER, json!({"name": name}))
}

fn cla(name: &str, ports: &[u16]) -> Any {
    let eps: Vec<_> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    any(
        ENDPOINT,
        json!({"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}),
    )
}

fn tcp_listener(name: &str, cluster: &str) -> Any {
    any(
        LISTENER,
        json!({"name": name,
               "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
               "filter_chains": [{"filters": [{"name": "tcp",
                 "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                   "stat_prefix": "t", "cluster": cluster}}]}]}),
    )
}

fn sotw(type_url: &str, version: &str, resources: Vec<Any>) -> Incoming {
    Incoming {
        type_url: type_url.into(),
        version: version.into(),
        nonce: format!("n-{version}"),
        resources: resources.into_iter().map(|a| (None, String::new(), Some(a))).collect(),
        removed: Vec::new(),
        sotw: true,
    }
}

fn base() -> model::Config {
    crate::bootstrap::bootstrap(&Default::default()).unwrap()
}

#[test]
fn sotw_clusters_are_a_whole_set_and_eds_follows_them() {
    let mut s = State::new(Duration::from_secs(15));
    let t0 = Instant::now();
    let c = s
        .accept(sotw(CLUSTER, "1", vec![eds_cluster("a"), static_cluster("b")]), t0)
        .unwrap();
    assert!(c.full);
    assert_eq!(c.subscriptions, vec![(Ty::Endpoint, vec!["a".to_string()], vec![])]);
    assert!(!s.warm(), "cluster a waits for its endpoints");
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(15)));
    let c = s.accept(sotw(ENDPOINT, "1", vec![cla("a", &[81, 82])]), t0).unwrap();
    assert_eq!(c.endpoints, ["a"]);
    assert!(s.warm());
    assert_eq!(s.endpoints("a").len(), 2);
    assert_eq!(s.clusters_by_eds_name()["a"], ["a"]);
    let cfg = s.assemble(&base()).unwrap();
    assert_eq!(cfg.clusters.len(), 2);
    assert_eq!(cfg.clusters[0].discovery, model::DiscoveryType::Eds);
    assert_eq!(cfg.clusters[0].endpoints.len(), 2);

    // The same payload again is not a change; a set without `a` deletes it and its endpoints.
    let c = s.accept(sotw(ENDPOINT, "2", vec![cla("a", &[81, 82])]), t0).unwrap();
    assert!(c.endpoints.is_empty());
    assert_eq!(s.types[Ty::Endpoint as usize].version, "2");
    let c = s.accept(sotw(CLUSTER, "2", vec![static_cluster("b")]), t0).unwrap();
    assert!(c.full);
    assert_eq!(c.subscriptions, vec![(Ty::Endpoint, vec![], vec!["a".to_string()])]);
    assert!(
        s.of(Ty::Endpoint).is_empty(),
        "EDS resources go with the clusters that used them"
    );
    assert_eq!(s.of(Ty::Cluster).keys().collect::<Vec<_>>(), ["b"]);
}

#[test]
fn a_resource_never_sent_counts_as_absent_after_the_timer() {
    let mut s = State::new(Duration::from_secs(15));
    let t0 = Instant::now();
    s.accept(sotw(CLUSTER, "1", vec![eds_cluster("a")]), t0).unwrap();
    assert!(s.expire(t0 + Duration::from_secs(14)).is_empty());
    assert!(!s.clusters_warm());
    assert_eq!(
        s.expire(t0 + Duration::from_secs(15)),
        [(Ty::Endpoint, "a".to_string())]
    );
    assert!(s.clusters_warm() && s.warm());
    assert!(s.endpoints("a").is_empty());
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn bad_responses_are_refused_whole_with_the_resource_named() {
    let mut s = State::new(Duration::from_secs(15));
    let now = Instant::now();
    let e = s
        .accept(sotw("type.googleapis.com/some.Thing", "1", vec![]), now)
        .unwrap_err();
    assert!(e.contains("`type.googleapis.com/some.Thing` is not supported"), "{e}");
    let e = s.accept(sotw(LISTENER, "1", vec![eds_cluster("x")]), now).unwrap_err();
    assert!(
        e.contains("resources[0]: a `type.googleapis.com/envoy.config.cluster.v3.Cluster` in a `Listener` response"),
        "{e}"
    );
    let e = s
        .accept(sotw(CLUSTER, "1", vec![static_cluster("x"), static_cluster("x")]), now)
        .unwrap_err();
    assert!(e.contains("Cluster `x` appears twice"), "{e}");
    let garbage = Any {
        type_url: CLUSTER.into(),
        value: vec![0xff; 4],
    };
    let e = s.accept(sotw(CLUSTER, "1", vec![garbage]), now).unwrap_err();
    assert!(e.starts_with("a malformed Cluster payload"), "{e}");
    let odd = any(
        CLUSTER,
        json!({"name": "odd", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED"}),
    );
    let e = s
        .accept(sotw(CLUSTER, "1", vec![static_cluster("fine"), odd]), now)
        .unwrap_err();
    assert!(
        e.contains("Cluster `odd`: cluster \"odd\".lb_policy: CLUSTER_PROVIDED"),
        "{e}"
    );
    // Nothing was taken.
    assert!(s.of(Ty::Cluster).is_empty());
    assert_eq!(s.types[Ty::Cluster as usize].version, "");
}

#[test]
fn delta_upserts_and_removes_and_a_removed_endpoint_set_is_empty() {
    let mut s = State::new(Duration::from_secs(15));
    let now = Instant::now();
    let delta = |ty: &str, res: Vec<Any>, removed: &[&str]| Incoming {
        type_url: ty.into(),
        version: "sys".into(),
        nonce: "n".into(),
        resources: res.into_iter().map(|a| (None, "r1".to_string(), Some(a))).collect(),
        removed: removed.iter().map(|r| r.to_string()).collect(),
        sotw: false,
    };
    s.accept(delta(CLUSTER, vec![eds_cluster("a")], &[]), now).unwrap();
    s.accept(delta(CLUSTER, vec![eds_cluster("b")], &[]), now).unwrap();
    assert_eq!(s.of(Ty::Cluster).len(), 2, "delta adds to what is there");
    assert_eq!(s.of(Ty::Cluster)["a"].version, "r1", "per-resource versions");
    s.accept(delta(ENDPOINT, vec![cla("a", &[1]), cla("b", &[2])], &[]), now)
        .unwrap();
    assert!(s.warm());
    let c = s.accept(delta(ENDPOINT, vec![], &["a"]), now).unwrap();
    assert_eq!(c.endpoints, ["a"]);
    assert!(
        s.endpoints("a").is_empty() && s.warm(),
        "removed: known to be empty, not warming"
    );
    let c = s.accept(delta(CLUSTER, vec![], &["b"]), now).unwrap();
    assert!(c.full);
    assert_eq!(s.of(Ty::Cluster).keys().collect::<Vec<_>>(), ["a"]);
    // A name in a delta resource must match its payload.
    let mut bad = delta(CLUSTER, vec![static_cluster("c")], &[]);
    bad.resources[0].0 = Some("d".into());
    assert!(
        s.accept(bad, now)
            .unwrap_err()
            .contains("named `d` but the Cluster is `c`")
    );
}

#[test]
fn assembly_fills_unknown_clusters_and_refuses_clashes_with_static_ones() {
    let mut s = State::new(Duration::from_secs(15));
    let now = Instant::now();
    s.accept(sotw(LISTENER, "1", vec![tcp_listener("l", "nowhere")]), now)
        .unwrap();
    let cfg = s.assemble(&base()).unwrap();
    let c = cfg.clusters.iter().find(|c| c.name == "nowhere").unwrap();
    assert!(
        c.endpoints.is_empty(),
        "a placeholder with no endpoints: 503, as Envoy for an unknown cluster"
    );
    let mut b = base();
    b.clusters.push(c.clone());
    s.accept(sotw(CLUSTER, "1", vec![static_cluster("nowhere")]), now)
        .unwrap();
    let e = s.assemble(&b).unwrap_err();
    assert!(
        e.contains("cluster `nowhere` is defined both in static_resources and by CDS"),
        "{e}"
    );
}

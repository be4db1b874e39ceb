//! The sidecar driven over ADS by a scripted control plane (`tessera_xds::server`, a snapshot
//! cache on envoy-types' tonic service): initial config in Envoy's warming order, route change, endpoint
//! churn under traffic, a NACKed listener while the old one serves, garbage from the control
//! plane, a control-plane restart, delta subscribe / unsubscribe, and `/config_dump`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use serde_json::json;
use tessera_xds::server::{AdsServer, CLUSTER, ENDPOINT, LISTENER, ROUTE, Req, SECRET};

const T: Duration = Duration::from_secs(20);

fn any(type_url: &str, json: serde_json::Value) -> Any {
    tessera_xds::server::any(type_url, json).unwrap()
}

fn ads_start(port: u16) -> AdsServer {
    AdsServer::start(port).expect("the ADS server starts")
}

/// An Envoy v3 bootstrap whose listeners and clusters come from the ADS server at `ads`.
pub fn ads_bootstrap(ads: SocketAddr, admin: u16, api_type: &str) -> String {
    tessera_xds::bootstrap::ads_bootstrap_yaml(
        "sidecar~127.0.0.1~web-1.default~default.svc.cluster.local",
        "web.default",
        ads,
        Some(admin),
        api_type,
    )
}

pub fn eds_cluster(name: &str) -> Any {
    any(
        CLUSTER,
        json!({"name": name, "type": "EDS", "connect_timeout": "1s",
               "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}),
    )
}

pub fn cla(name: &str, addrs: &[SocketAddr]) -> Any {
    let eps: Vec<_> = addrs
        .iter()
        .map(|a| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
        .collect();
    any(
        ENDPOINT,
        json!({"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}),
    )
}

pub fn rds_listener(name: &str, port: u16, route: &str) -> Any {
    any(
        LISTENER,
        json!({"name": name,
               "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                 "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                   "stat_prefix": "ingress",
                   "rds": {"route_config_name": route, "config_source": {"ads": {}, "resource_api_version": "V3"}},
                   "http_filters": [{"name": "envoy.filters.http.router",
                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}),
    )
}

/// Routes `/<prefix>` of every host to clusters, in order; `tag` goes into a response header.
pub fn routes(name: &str, to: &[(&str, &str)], tag: &str) -> Any {
    let rs: Vec<_> = to
        .iter()
        .map(|(prefix, cluster)| json!({"match": {"prefix": prefix}, "route": {"cluster": cluster}}))
        .collect();
    any(
        ROUTE,
        json!({"name": name,
               "response_headers_to_add": [{"header": {"key": "x-route", "value": tag}}],
               "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": rs}]}),
    )
}

struct Mesh {
    _dir: TempDir,
    sidecar: Proc,
    admin: SocketAddr,
    url: String,
    s1: (Proc, SocketAddr),
    s2: (Proc, SocketAddr),
}

/// Two sample services and a sidecar on ADS with a listener routing `/` to them via `backend`.
fn mesh(ads: &AdsServer, api_type: &str, extra: &[&str]) -> Mesh {
    let s1 = sample_service("one");
    let s2 = sample_service("two");
    let port = free_port();
    ads.set(CLUSTER, "1", vec![eds_cluster("backend")]);
    ads.set(ENDPOINT, "1", vec![cla("backend", &[s1.1])]);
    ads.set(LISTENER, "1", vec![rds_listener("ingress", port, "routes")]);
    ads.set(ROUTE, "1", vec![routes("routes", &[("/", "backend")], "v1")]);
    let dir = TempDir::new("ads");
    let boot = dir.write("bootstrap.yaml", &ads_bootstrap(ads.addr, 0, api_type));
    let mut args = vec!["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()];
    args.extend_from_slice(extra);
    let sidecar = Proc::tessera(&args);
    let admin = sidecar.logged_addr("admin API ready", T);
    let url = format!("http://127.0.0.1:{port}/");
    wait_status(&url, "200", T);
    Mesh {
        _dir: dir,
        sidecar,
        admin,
        url,
        s1,
        s2,
    }
}

fn index(reqs: &[Req], what: &str, pred: impl Fn(&Req) -> bool) -> usize {
    reqs.iter().position(pred).unwrap_or_else(|| {
        panic!(
            "no {what} in\n{}",
            reqs.iter().map(Req::describe).collect::<Vec<_>>().join("\n")
        )
    })
}

fn ack(r: &Req, t: &str, v: &str) -> bool {
    r.type_url == t && r.error.is_none() && !r.nonce.is_empty() && r.version == v
}

/// Who answers `url`, `n` times.
fn who(url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let body = curl_ok(&[url]);
            if body.contains("hello from one") {
                "one".into()
            } else if body.contains("hello from two") {
                "two".into()
            } else {
                body
            }
        })
        .collect()
}

fn config_dump(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&curl_ok(&[&format!("http://{admin}/config_dump")])).unwrap()
}

fn dump_of<'a>(d: &'a serde_json::Value, ty: &str) -> &'a serde_json::Value {
    d["configs"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(ty))))
        .unwrap_or_else(|| panic!("no {ty} in {d:#}"))
}

#[test]
fn sotw_warms_in_envoys_order_then_follows_route_and_endpoint_changes() {
    let ads = ads_start(0);
    let m = mesh(
        &ads,
        "GRPC",
        &[
            "--node-meta",
            "NAMESPACE=default",
            "--node-meta",
            r#"LABELS={"app":"web"}"#,
        ],
    );
    assert_eq!(who(&m.url, 3), ["one", "one", "one"]);

    // Envoy's order: CDS, then EDS for its clusters (asked before CDS is ACKed), LDS only once the
    // clusters are warm, then RDS.
    let reqs = ads.requests();
    let first = &reqs[0];
    assert_eq!(first.type_url, CLUSTER, "{}", first.describe());
    assert_eq!(
        first.node_id.as_deref(),
        Some("sidecar~127.0.0.1~web-1.default~default.svc.cluster.local")
    );
    assert!(first.node_meta.contains(&"NAMESPACE".to_string()) && first.node_meta.contains(&"LABELS".to_string()));
    let eds_ask = index(&reqs, "EDS ask", |r| {
        r.type_url == ENDPOINT && r.nonce.is_empty() && r.names == ["backend"]
    });
    let cds_ack = index(&reqs, "CDS ACK", |r| ack(r, CLUSTER, "1"));
    let eds_ack = index(&reqs, "EDS ACK", |r| ack(r, ENDPOINT, "1"));
    let lds_ask = index(&reqs, "LDS ask", |r| r.type_url == LISTENER && r.nonce.is_empty());
    let rds_ask = index(&reqs, "RDS ask", |r| r.type_url == ROUTE && r.names == ["routes"]);
    let lds_ack = index(&reqs, "LDS ACK", |r| ack(r, LISTENER, "1"));
    index(&reqs, "RDS ACK", |r| ack(r, ROUTE, "1"));
    assert!(eds_ask < cds_ack, "EDS is asked for before CDS is ACKed");
    assert!(eds_ack < lds_ask, "LDS waits for warm clusters");
    assert!(rds_ask < lds_ack, "RDS is asked for before LDS is ACKed");

    // A route change.
    ads.set(ROUTE, "2", vec![routes("routes", &[("/", "backend")], "v2")]);
    ads.wait_for("RDS ACK v2", T, |r| ack(r, ROUTE, "2")).unwrap();
    wait_until("the new route", T, || curl_ok(&["-si", &m.url]).contains("x-route: v2"));

    // Endpoint churn under traffic: no request fails while endpoints come and go.
    let url = m.url.clone();
    let load = std::thread::spawn(move || {
        let mut bad = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut n = 0;
        while Instant::now() < deadline {
            let out = curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]);
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            if code != "200" {
                bad.push(code);
            }
            n += 1;
        }
        (n, bad)
    });
    ads.set(ENDPOINT, "2", vec![cla("backend", &[m.s1.1, m.s2.1])]);
    ads.wait_for("EDS ACK v2", T, |r| ack(r, ENDPOINT, "2")).unwrap();
    wait_until("two answers", T, || who(&m.url, 4).contains(&"two".to_string()));
    ads.set(ENDPOINT, "3", vec![cla("backend", &[m.s2.1])]);
    ads.wait_for("EDS ACK v3", T, |r| ack(r, ENDPOINT, "3")).unwrap();
    wait_until("only two answers", T, || who(&m.url, 4).iter().all(|w| w == "two"));
    let (n, bad) = load.join().unwrap();
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed during endpoint churn: {bad:?}",
        bad.len()
    );

    // /config_dump: each resource with its version, as Envoy shows them.
    let d = config_dump(m.admin);
    let routes_dump = dump_of(&d, "RoutesConfigDump");
    assert_eq!(routes_dump["version_info"], "2");
    let rc = &routes_dump["dynamic_route_configs"][0];
    assert_eq!(rc["version_info"], "2");
    assert_eq!(rc["route_config"]["name"], "routes");
    assert!(rc["last_updated"].as_str().is_some_and(|t| t.ends_with('Z')), "{rc:#}");
    let eds = dump_of(&d, "EndpointsConfigDump");
    assert_eq!(eds["dynamic_endpoint_configs"][0]["version_info"], "3");
    let l = &dump_of(&d, "ListenersConfigDump")["dynamic_listeners"][0];
    assert_eq!(l["name"], "ingress");
    assert_eq!(l["active_state"]["version_info"], "1");
    drop(m.sidecar);
}

#[test]
fn a_bad_listener_or_garbage_is_nacked_and_the_old_config_keeps_serving() {
    let ads = ads_start(0);
    let m = mesh(&ads, "GRPC", &[]);
    let port: u16 = m.url.trim_end_matches('/').rsplit(':').next().unwrap().parse().unwrap();

    // A listener with an HTTP filter Tessera does not run, not marked optional.
    let mut bad = serde_json::json!({
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "rds": {"route_config_name": "routes", "config_source": {"ads": {}}},
            "http_filters": [
              {"name": "envoy.filters.http.buffer", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 1024}},
              {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]});
    ads.set(LISTENER, "2", vec![any(LISTENER, bad.take())]);
    let nack = ads
        .wait_for("LDS NACK", T, |r| r.type_url == LISTENER && r.error.is_some())
        .unwrap();
    assert_eq!(nack.version, "1", "a NACK carries the last accepted version");
    let why = nack.error.unwrap();
    assert!(
        why.contains("listener \"ingress\".filter_chains[0].filters[0].typed_config.http_filters[0]")
            && why.contains("envoy.filters.http.buffer"),
        "{why}"
    );
    assert_eq!(who(&m.url, 2), ["one", "one"], "the old listener keeps serving");

    // Garbage: a type nobody asked for, and a payload that is not a Listener.
    ads.send_raw(DiscoveryResponse {
        version_info: "x".into(),
        type_url: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig".into(),
        ..Default::default()
    });
    let unknown = ads
        .wait_for("NACK of an unknown type", T, |r| {
            r.type_url.ends_with("TypedExtensionConfig")
        })
        .unwrap();
    assert!(
        unknown.error.as_deref().is_some_and(|e| e.contains("not supported")),
        "{unknown:?}"
    );
    ads.send_raw(DiscoveryResponse {
        version_info: "3".into(),
        type_url: LISTENER.into(),
        resources: vec![Any {
            type_url: LISTENER.into(),
            value: vec![0xff, 0xff, 0xff, 0x0f, 0x01],
        }],
        ..Default::default()
    });
    let malformed = ads
        .wait_for("NACK of a malformed listener", T, |r| {
            r.type_url == LISTENER && r.error.as_deref().is_some_and(|e| e.contains("malformed"))
        })
        .unwrap();
    assert_eq!(malformed.version, "1");
    // A cluster in a listener response.
    ads.send_raw(DiscoveryResponse {
        version_info: "4".into(),
        type_url: LISTENER.into(),
        resources: vec![eds_cluster("stray")],
        ..Default::default()
    });
    ads.wait_for("NACK of a misplaced resource", T, |r| {
        r.type_url == LISTENER
            && r.error
                .as_deref()
                .is_some_and(|e| e.contains("in a `Listener` response"))
    })
    .unwrap();
    assert_eq!(who(&m.url, 2), ["one", "one"]);

    // The rejection is visible in /config_dump, and a good push is taken again.
    let d = config_dump(m.admin);
    let lds = dump_of(&d, "ListenersConfigDump");
    assert_eq!(lds["version_info"], "1");
    assert!(lds["error_state"]["details"].as_str().is_some(), "{lds:#}");
    ads.set(LISTENER, "5", vec![rds_listener("ingress", port, "routes")]);
    ads.wait_for("LDS ACK v5", T, |r| ack(r, LISTENER, "5")).unwrap();
    assert_eq!(who(&m.url, 2), ["one", "one"]);
}

#[test]
fn the_last_good_config_serves_while_the_control_plane_restarts() {
    let ads = ads_start(0);
    let m = mesh(&ads, "GRPC", &[]);
    let port = ads.addr.port();
    ads.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(who(&m.url, 3), ["one", "one", "one"], "serving without a control plane");
    m.sidecar.wait_log("reconnecting to the control plane", T);

    // A new control plane on the same address, with a new route: the sidecar reconnects, says
    // which versions it holds, and takes the change.
    let ads = ads_start(port);
    ads.set(CLUSTER, "1", vec![eds_cluster("backend")]);
    ads.set(ENDPOINT, "1", vec![cla("backend", &[m.s1.1])]);
    ads.set(
        LISTENER,
        "1",
        vec![rds_listener(
            "ingress",
            m.url[17..m.url.len() - 1].parse().unwrap(),
            "routes",
        )],
    );
    ads.set(ROUTE, "2", vec![routes("routes", &[("/", "backend")], "after-restart")]);
    let hello = ads
        .wait_for("a CDS request after reconnecting", Duration::from_secs(40), |r| {
            r.type_url == CLUSTER
        })
        .unwrap();
    assert_eq!(
        hello.version, "1",
        "the reconnecting sidecar reports the version it holds"
    );
    assert!(hello.node_id.is_some());
    ads.wait_for("RDS ACK v2", T, |r| ack(r, ROUTE, "2")).unwrap();
    wait_until("the new route", T, || {
        curl_ok(&["-si", &m.url]).contains("x-route: after-restart")
    });
}

#[test]
fn delta_subscribes_and_unsubscribes_as_clusters_come_and_go() {
    let ads = ads_start(0);
    let m = mesh(&ads, "DELTA_GRPC", &[]);
    assert_eq!(who(&m.url, 2), ["one", "one"]);
    let reqs = ads.requests();
    assert!(reqs.iter().all(|r| r.delta));
    index(&reqs, "EDS subscribe", |r| {
        r.type_url == ENDPOINT && r.names == ["backend"]
    });

    // A second cluster and a route to it: EDS subscribes to it.
    ads.set(ENDPOINT, "2", vec![cla("backend", &[m.s1.1]), cla("other", &[m.s2.1])]);
    ads.set(CLUSTER, "2", vec![eds_cluster("backend"), eds_cluster("other")]);
    ads.wait_for("EDS subscribe other", T, |r| {
        r.type_url == ENDPOINT && r.names == ["other"]
    })
    .unwrap();
    ads.set(
        ROUTE,
        "2",
        vec![routes("routes", &[("/other", "other"), ("/", "backend")], "v2")],
    );
    let other = format!("{}other", m.url);
    wait_until("/other routed to two", T, || who(&other, 1) == ["two"]);
    assert_eq!(who(&m.url, 1), ["one"]);

    // The cluster goes: EDS unsubscribes; the route to it (still there) answers 503.
    ads.set(CLUSTER, "3", vec![eds_cluster("backend")]);
    ads.wait_for("EDS unsubscribe other", T, |r| {
        r.type_url == ENDPOINT && r.unsubscribe == ["other"]
    })
    .unwrap();
    wait_status(&other, "503", T);
    assert_eq!(who(&m.url, 1), ["one"]);

    // Delta removal of the route configuration: the listener answers 404, as Envoy's does.
    ads.set(ROUTE, "3", vec![]);
    wait_status(&m.url, "404", T);
}

/// A listener whose HTTP connection manager carries a filter of a type neither proxy knows.
fn listener_with_unknown_filter(port: u16) -> Any {
    use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, http_filter,
    };
    use prost::Message;
    let good = rds_listener("ingress", port, "routes");
    let mut l = Listener::decode(good.value.as_slice()).unwrap();
    let Some(filter::ConfigType::TypedConfig(hcm_any)) = &mut l.filter_chains[0].filters[0].config_type else {
        unreachable!()
    };
    let mut hcm = HttpConnectionManager::decode(hcm_any.value.as_slice()).unwrap();
    hcm.http_filters.insert(
        0,
        HttpFilter {
            name: "istio.unknown".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/acme.NoSuchFilter".into(),
                value: Vec::new(),
            })),
            ..Default::default()
        },
    );
    hcm_any.value = hcm.encode_to_vec();
    Any {
        type_url: LISTENER.into(),
        value: l.encode_to_vec(),
    }
}

/// Per type, what a client said: `ask [names]`, `ACK v`, `NACK v`, in order.
fn conversation(reqs: &[Req]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for ty in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let said = reqs
            .iter()
            .filter(|r| r.type_url == ty)
            .map(|r| {
                let mut names = r.names.clone();
                names.sort();
                let subs = if names.is_empty() && r.unsubscribe.is_empty() {
                    String::new()
                } else {
                    format!(" +{names:?} -{:?}", r.unsubscribe)
                };
                let kind = if r.error.is_some() {
                    "NACK"
                } else if r.nonce.is_empty() {
                    "ask"
                } else {
                    "ACK"
                };
                format!("{kind} v{}{subs}", r.version)
            })
            .collect();
        out.push((ty.rsplit('.').next().unwrap().to_string(), said));
    }
    out
}

/// The same pushes to Envoy 1.40 and to Tessera, each from its own scripted server: the same
/// ACK / NACK conversation, and the same answers to the same requests.
#[test]
fn envoy_and_tessera_answer_the_same_sotw_pushes_the_same_way() {
    differential("GRPC");
}

#[test]
fn envoy_and_tessera_answer_the_same_delta_pushes_the_same_way() {
    differential("DELTA_GRPC");
}

fn differential(api_type: &str) {
    let Some(envoy) = envoy_bin() else {
        eprintln!("SKIPPED: no bench/.venv Envoy (scripts/test installs it)");
        return;
    };
    let s1 = sample_service("one");
    let s2 = sample_service("two");
    let dir = TempDir::new("ads-diff");
    let mut sides = Vec::new();
    for who_ in ["envoy", "tessera"] {
        let ads = ads_start(0);
        let port = free_port();
        ads.set(CLUSTER, "1", vec![eds_cluster("backend")]);
        ads.set(ENDPOINT, "1", vec![cla("backend", &[s1.1])]);
        ads.set(LISTENER, "1", vec![rds_listener("ingress", port, "routes")]);
        ads.set(ROUTE, "1", vec![routes("routes", &[("/", "backend")], "v1")]);
        let admin = free_port();
        let boot = dir.write(&format!("{who_}.yaml"), &ads_bootstrap(ads.addr, admin, api_type));
        let proc_ = if who_ == "envoy" {
            spawn_envoy(&envoy, &boot, port)
        } else {
            Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()])
        };
        sides.push((who_, ads, port, proc_));
    }
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let answer = |port: u16, path: &str| {
        let out = curl(&["-s", "-i", &url(port, path)]);
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        let status = text.split_whitespace().nth(1).unwrap_or("").to_string();
        let route = text
            .lines()
            .find_map(|l| l.strip_prefix("x-route: "))
            .unwrap_or("-")
            .trim()
            .to_string();
        let body = if text.contains("hello from one") {
            "one"
        } else if text.contains("hello from two") {
            "two"
        } else {
            "-"
        };
        format!("{status} {route} {body}")
    };
    for (_, _, port, _) in &sides {
        wait_status(&url(*port, "/"), "200", Duration::from_secs(30));
    }
    let step = |name: &str, f: &dyn Fn(&AdsServer, u16), settled: &dyn Fn(&[Req]) -> bool| {
        for (w, ads, port, _) in &sides {
            f(ads, *port);
            ads.wait_all(&format!("{name} on {w}"), T, settled).unwrap();
        }
        // Both have answered the push; give Envoy's main thread a moment to publish it to its worker.
        std::thread::sleep(Duration::from_millis(300));
        let answers: Vec<String> = sides
            .iter()
            .map(|(_, _, port, _)| format!("{} | {}", answer(*port, "/"), answer(*port, "/other")))
            .collect();
        assert_eq!(answers[0], answers[1], "after {name}: Envoy vs Tessera");
        answers[0].clone()
    };
    let acked = |t: &'static str, v: &'static str| move |reqs: &[Req]| reqs.iter().any(|r| ack(r, t, v));
    assert_eq!(
        step("nothing", &|_, _| {}, &acked(ROUTE, "1")),
        "200 v1 one | 200 v1 one"
    );
    step(
        "route v2",
        &|ads, _| ads.set(ROUTE, "2", vec![routes("routes", &[("/", "backend")], "v2")]),
        &acked(ROUTE, "2"),
    );
    step(
        "a listener with an unknown filter",
        &|ads, port| ads.set(LISTENER, "2", vec![listener_with_unknown_filter(port)]),
        &|reqs| reqs.iter().any(|r| r.type_url == LISTENER && r.error.is_some()),
    );
    step(
        "endpoints moved",
        &|ads, _| ads.set(ENDPOINT, "2", vec![cla("backend", &[s2.1])]),
        &acked(ENDPOINT, "2"),
    );
    step(
        "a second cluster",
        &|ads, _| {
            ads.set_all(vec![
                (ENDPOINT, "3", vec![cla("backend", &[s2.1]), cla("other", &[s1.1])]),
                (CLUSTER, "2", vec![eds_cluster("backend"), eds_cluster("other")]),
            ])
        },
        // Endpoints of `other` ACKed after subscribing to it.
        &|reqs| {
            let sub = reqs
                .iter()
                .position(|r| r.type_url == ENDPOINT && r.names.iter().any(|n| n == "other"));
            sub.is_some_and(|i| reqs[i..].iter().any(|r| ack(r, ENDPOINT, "3")))
        },
    );
    let last = step(
        "a route to it",
        &|ads, _| {
            ads.set(
                ROUTE,
                "3",
                vec![routes("routes", &[("/other", "other"), ("/", "backend")], "v3")],
            )
        },
        &acked(ROUTE, "3"),
    );
    assert_eq!(last, "200 v3 two | 200 v3 one");
    step(
        "the cluster removed",
        &|ads, _| ads.set(CLUSTER, "3", vec![eds_cluster("backend")]),
        &acked(CLUSTER, "3"),
    );
    let e = conversation(&sides[0].1.requests());
    let t = conversation(&sides[1].1.requests());
    eprintln!("Envoy:   {e:?}\nTessera: {t:?}");
    assert_eq!(e, t, "the ACK/NACK conversation differs");
    let nack = |ads: &AdsServer| ads.requests().into_iter().find_map(|r| r.error).unwrap();
    eprintln!(
        "Envoy's NACK:   {}\nTessera's NACK: {}",
        nack(&sides[0].1),
        nack(&sides[1].1)
    );
}

/// Envoy terminating mTLS in front of a plaintext ADS server: a real TLS peer for the control
/// plane connection.
fn envoy_mtls_front(envoy: &std::path::Path, dir: &TempDir, pki: &Pki, ads: SocketAddr) -> (Proc, u16) {
    let (cert, key) = pki.issue("xds-server", "xds.mesh.test", "DNS:xds.mesh.test");
    let port = free_port();
    let cfg = format!(
        r#"static_resources:
  listeners:
  - name: xds-tls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
            validation_context: {{trusted_ca: {{filename: {ca}}}}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: xds
          cluster: ads
  clusters:
  - name: ads
    type: STATIC
    load_assignment:
      cluster_name: ads
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ads_port}}}}}}}}}]}}]
"#,
        cert = cert.display(),
        key = key.display(),
        ca = pki.ca.display(),
        ads_port = ads.port(),
    );
    let f = dir.write("front.yaml", &cfg);
    let p = spawn_envoy(envoy, &f, port);
    wait_port(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(30));
    (p, port)
}

/// The ADS cluster with an UpstreamTlsContext: mTLS to the control plane (through Envoy).
#[test]
fn the_control_plane_is_reached_over_mtls() {
    let Some(envoy) = envoy_bin() else {
        eprintln!("SKIPPED: no bench/.venv Envoy (scripts/test installs it)");
        return;
    };
    let ads = ads_start(0);
    let s1 = sample_service("one");
    let port = free_port();
    ads.set(CLUSTER, "1", vec![eds_cluster("backend")]);
    ads.set(ENDPOINT, "1", vec![cla("backend", &[s1.1])]);
    ads.set(LISTENER, "1", vec![rds_listener("ingress", port, "routes")]);
    ads.set(ROUTE, "1", vec![routes("routes", &[("/", "backend")], "v1")]);
    let pki = Pki::new("xds-mtls");
    let dir = TempDir::new("xds-mtls");
    let (_front, front) = envoy_mtls_front(&envoy, &dir, &pki, ads.addr);
    let (cert, key) = pki.issue("sidecar", "web", "URI:spiffe://cluster.local/ns/default/sa/web");
    let tls = |with_cert: bool| {
        let certs = if with_cert {
            format!(
                "\n          tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        format!(
            r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: xds.mesh.test
        common_tls_context:{certs}
          validation_context:
            trusted_ca: {{filename: {}}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: xds.mesh.test}}}}]
"#,
            pki.ca.display()
        )
    };
    let boot = |with_cert: bool| {
        let b = ads_bootstrap(SocketAddr::from(([127, 0, 0, 1], front)), 0, "GRPC");
        b.replace(
            "    load_assignment:\n      cluster_name: xds-grpc",
            &format!("{}    load_assignment:\n      cluster_name: xds-grpc", tls(with_cert)),
        )
    };

    // Without a client certificate the control plane refuses the handshake: no configuration.
    let f = dir.write("nocert.yaml", &boot(false));
    let refused = Proc::tessera(&["sidecar", "--envoy-bootstrap", f.to_str().unwrap()]);
    refused.wait_log("ADS stream failed", T);
    assert!(ads.requests().is_empty(), "nothing reached the control plane");
    drop(refused);

    let f = dir.write("mtls.yaml", &boot(true));
    let sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", f.to_str().unwrap()]);
    sidecar.wait_log("ADS stream open", T);
    wait_status(&format!("http://127.0.0.1:{port}/"), "200", T);
    ads.wait_for("RDS ACK over mTLS", T, |r| ack(r, ROUTE, "1")).unwrap();
}

/// Istio's bootstrap reaches istio-agent's xDS proxy over a Unix socket (`pipe`), with the node
/// on the first message only and delta ADS.
#[test]
fn istio_style_bootstrap_over_a_unix_socket() {
    let dir = TempDir::new("xds-uds");
    let sock = dir.path("XDS");
    let ads = AdsServer::start_unix(&sock).unwrap();
    let s1 = sample_service("one");
    let port = free_port();
    ads.set(CLUSTER, "1", vec![eds_cluster("backend")]);
    ads.set(ENDPOINT, "1", vec![cla("backend", &[s1.1])]);
    ads.set(LISTENER, "1", vec![rds_listener("ingress", port, "routes")]);
    ads.set(ROUTE, "1", vec![routes("routes", &[("/", "backend")], "v1")]);
    let boot = format!(
        r#"node:
  id: sidecar~10.1.2.3~web-1.default~default.svc.cluster.local
  cluster: web.default
  metadata: {{NAMESPACE: default, ISTIO_VERSION: "1.24.0", CLUSTER_ID: Kubernetes, LABELS: {{app: web}}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  cds_config: {{ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3}}
  lds_config: {{ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: {}}}}}}}}}]}}]
"#,
        sock.display()
    );
    let f = dir.write("istio.yaml", &boot);
    let check = std::process::Command::new(bin())
        .args(["check", "--envoy-bootstrap", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("OK as an Envoy bootstrap"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let _sidecar = Proc::tessera(&[
        "sidecar",
        "--envoy-bootstrap",
        f.to_str().unwrap(),
        "--node-meta",
        "NETWORK=net-1",
    ]);
    wait_status(&format!("http://127.0.0.1:{port}/"), "200", T);
    let reqs = ads.requests();
    assert!(reqs.iter().all(|r| r.delta));
    assert_eq!(
        reqs[0].node_id.as_deref(),
        Some("sidecar~10.1.2.3~web-1.default~default.svc.cluster.local")
    );
    for k in ["NAMESPACE", "ISTIO_VERSION", "CLUSTER_ID", "LABELS", "NETWORK"] {
        assert!(
            reqs[0].node_meta.iter().any(|m| m == k),
            "{k} in {:?}",
            reqs[0].node_meta
        );
    }
    assert!(
        reqs[1..].iter().all(|r| r.node_id.is_none()),
        "the node goes on the first message only"
    );
}

fn tls_secret(name: &str, cert: &std::path::Path, key: &std::path::Path) -> Any {
    any(
        SECRET,
        json!({"name": name, "tls_certificate": {
            "certificate_chain": {"inline_string": std::fs::read_to_string(cert).unwrap()},
            "private_key": {"inline_string": std::fs::read_to_string(key).unwrap()}}}),
    )
}

/// A listener whose certificate comes over SDS (Istio's `default`), then rotates.
#[test]
fn sds_certificates_arrive_and_rotate_over_ads() {
    let pki = Pki::new("xds-sds");
    let (c1, k1) = pki.issue("web-v1", "web-v1", "DNS:web.mesh.test");
    let (c2, k2) = pki.issue("web-v2", "web-v2", "DNS:web.mesh.test");
    let ads = ads_start(0);
    let s1 = sample_service("one");
    let port = free_port();
    let mut l: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &tessera_xds::load::any_to_json(&rds_listener("ingress", port, "routes"))
            .to_string()
            .into_bytes(),
    ))
    .unwrap();
    l.as_object_mut().unwrap().remove("@type");
    l["filter_chains"][0]["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {"tls_certificate_sds_secret_configs": [
            {"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}]}}});
    ads.set(SECRET, "1", vec![tls_secret("default", &c1, &k1)]);
    ads.set(CLUSTER, "1", vec![eds_cluster("backend")]);
    ads.set(ENDPOINT, "1", vec![cla("backend", &[s1.1])]);
    ads.set(LISTENER, "1", vec![any(LISTENER, l)]);
    ads.set(ROUTE, "1", vec![routes("routes", &[("/", "backend")], "v1")]);
    let dir = TempDir::new("xds-sds");
    let boot = dir.write("b.yaml", &ads_bootstrap(ads.addr, 0, "GRPC"));
    let sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);
    let admin = sidecar.logged_addr("admin API ready", T);
    let served_by = || {
        let out = curl(&[
            "-v",
            "--cacert",
            pki.ca.to_str().unwrap(),
            "--resolve",
            &format!("web.mesh.test:{port}:127.0.0.1"),
            &format!("https://web.mesh.test:{port}/"),
        ]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let cn = err
            .lines()
            .find_map(|l| l.split("subject: CN=").nth(1))
            .map(|s| s.trim().to_string());
        (cn, body.contains("hello from one"))
    };
    wait_until("HTTPS with the SDS certificate", T, || {
        served_by() == (Some("web-v1".into()), true)
    });
    let asked = ads
        .wait_for("an SDS request", T, |r| r.type_url == SECRET && r.names == ["default"])
        .unwrap();
    assert!(asked.error.is_none());

    ads.set(SECRET, "2", vec![tls_secret("default", &c2, &k2)]);
    ads.wait_for("SDS ACK v2", T, |r| ack(r, SECRET, "2")).unwrap();
    wait_until("the rotated certificate", T, || {
        served_by() == (Some("web-v2".into()), true)
    });

    let d = config_dump(admin);
    let secrets = dump_of(&d, "SecretsConfigDump");
    let s = &secrets["dynamic_active_secrets"][0];
    assert_eq!(s["name"], "default");
    assert_eq!(s["version_info"], "2");
    let text = secrets.to_string();
    assert!(
        !text.contains("PRIVATE KEY"),
        "the key never reaches /config_dump: {text}"
    );
}

/// One GET on a kept-alive connection: `Some(head)` with the response head, `None` if the proxy
/// closed the connection instead.
fn get_on(c: &mut std::net::TcpStream) -> Option<String> {
    use std::io::{Read, Write};
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(text[..end].to_string());
            }
        }
    }
}

/// A route change reaches open connections; a listener change drains them (Envoy's listener
/// update): the old connection is closed, new ones use the new listener.
#[test]
fn a_changed_listener_drains_its_connections_and_a_route_change_does_not() {
    let ads = ads_start(0);
    let m = mesh(&ads, "GRPC", &[]);
    let port: u16 = m.url.trim_end_matches('/').rsplit(':').next().unwrap().parse().unwrap();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(get_on(&mut c).unwrap().contains("x-route: v1"));

    ads.set(ROUTE, "2", vec![routes("routes", &[("/", "backend")], "v2")]);
    ads.wait_for("RDS ACK v2", T, |r| ack(r, ROUTE, "2")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let head = get_on(&mut c).expect("the connection survives a route change");
    assert!(
        head.contains("x-route: v2") && !head.contains("connection: close"),
        "{head}"
    );

    // The same listener with another stat prefix: a new version of it.
    let mut l = tessera_xds::load::any_to_json(&rds_listener("ingress", port, "routes"));
    l.as_object_mut().unwrap().remove("@type");
    l["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = json!("ingress_v2");
    ads.set(LISTENER, "2", vec![any(LISTENER, l)]);
    ads.wait_for("LDS ACK v2", T, |r| ack(r, LISTENER, "2")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    match get_on(&mut c) {
        None => {}
        Some(head) => assert!(
            head.contains("connection: close"),
            "the old connection must drain: {head}"
        ),
    }
    assert_eq!(who(&m.url, 2), ["one", "one"], "new connections are served");
}

/// A response over the 64 MiB limit ends the stream (logged) rather than the sidecar's memory:
/// it reconnects, says what it holds, and keeps serving the last good configuration.
#[test]
fn an_oversized_response_ends_the_stream_not_the_sidecar() {
    let ads = ads_start(0);
    let m = mesh(&ads, "GRPC", &[]);
    let streams = ads.streams();
    ads.send_raw(DiscoveryResponse {
        version_info: "huge".into(),
        type_url: LISTENER.into(),
        resources: vec![Any {
            type_url: LISTENER.into(),
            value: vec![0u8; 65 << 20],
        }],
        ..Default::default()
    });
    m.sidecar.wait_log("ADS stream failed", T);
    wait_until("a new stream", Duration::from_secs(30), || ads.streams() > streams);
    assert_eq!(who(&m.url, 2), ["one", "one"]);
    assert!(
        ads.requests().iter().all(|r| r.version != "huge"),
        "nothing was ACKed or NACKed for the oversized response"
    );
}

/// A "control plane" that answers the gRPC connection with garbage: every stream fails, is
/// logged and retried with backoff; the sidecar stays up and serves its static part.
#[test]
fn a_control_plane_speaking_garbage_is_retried_not_fatal() {
    use std::io::Write;
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = garbage.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for c in garbage.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut c = c;
            let _ = c.write_all(b"\x00\x00\x12\x04\x00garbage, not HTTP/2 at all\r\n\r\n");
        }
    });
    let dir = TempDir::new("xds-garbage");
    let boot = dir.write("b.yaml", &ads_bootstrap(addr, 0, "GRPC"));
    let sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);
    let admin = sidecar.logged_addr("admin API ready", T);
    sidecar.wait_log("ADS stream failed", T);
    wait_until("a second attempt", T, || {
        accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2
    });
    assert_eq!(curl_ok(&[&format!("http://{admin}/ready")]).trim(), "LIVE");
    let d = config_dump(admin);
    assert_eq!(
        d["configs"]
            .as_array()
            .and_then(|c| c.last())
            .map(|c| c["connected"].clone()),
        Some(json!(false))
    );
}

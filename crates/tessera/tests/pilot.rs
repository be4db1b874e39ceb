//! Pilot (issue 9, first slice): services from the file registry, served over ADS to a Tessera
//! sidecar and to Envoy 1.40 from the same Pilot; both route by Host to the instances, follow an
//! instance added to the file, and keep the last good state when a file turns bad.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::registry::*;
use common::*;

const T: Duration = Duration::from_secs(30);

fn bootstrap(xds: SocketAddr, id: &str) -> String {
    tessera_xds::bootstrap::ads_bootstrap_yaml(id, "web", xds, None, "GRPC")
}

fn services(instances: &[SocketAddr]) -> String {
    let list: Vec<String> = instances
        .iter()
        .map(|a| format!("  - {{ address: {}, port: {} }}", a.ip(), a.port()))
        .collect();
    // A second service, whose endpoints never change: an EDS push for reviews alone must leave
    // its endpoints in place (state-of-the-world EDS responses carry the changed clusters only).
    let first = instances[0];
    format!(
        "services:\n- name: reviews\n  namespace: shop\n  ports: [{{ name: http, port: 9080, protocol: http }}]\n  instances:\n{}\n- name: ratings\n  namespace: shop\n  ports: [{{ name: http, port: 9080 }}]\n  instances: [{{ address: {}, port: {} }}]\n",
        list.join("\n"),
        first.ip(),
        first.port()
    )
}

/// Who answers for reviews through the sidecar's outbound listener, `n` times.
fn who(listen: u16, n: usize) -> Vec<String> {
    who_answers(listen, "reviews.shop.svc.cluster.local", n)
}

/// [`common::wait_until`] with this file's limit.
fn wait_until(what: &str, f: impl FnMut() -> bool) {
    common::wait_until(what, T, f)
}

#[test]
fn pilot_serves_file_registered_services_to_tessera_and_envoy() {
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let dir = TempDir::new("pilot");
    std::fs::create_dir_all(dir.path("services")).unwrap();
    let svc = dir.write("services/shop.yaml", &services(&[one]));
    let (xds, tout, eout) = (free_port(), free_port(), free_port());
    // Each proxy gets its own Pilot so the generated outbound listener ports do not collide.
    let pilot_cfg = |xds: u16, out: u16, name: &str| {
        dir.write(
            name,
            &format!(
                "xds: {{ listen: \"127.0.0.1:{xds}\" }}\nregistries: {{ file: {{ dir: services, watch_interval: 200ms }} }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\n"
            ),
        )
    };
    let tp = pilot_cfg(xds, tout, "pilot-t.yaml");
    let pilot = Proc::tessera(&["pilot", "--config", tp.to_str().unwrap()]);
    let xds_addr = pilot.logged_addr("pilot ready", T);
    let boot = dir.write(
        "sidecar.yaml",
        &bootstrap(xds_addr, "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local"),
    );
    let _sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);
    wait_until("Tessera routes to reviews", || who(tout, 1) == ["one"]);

    // An instance added to the file reaches the sidecar.
    std::fs::write(&svc, services(&[one, two])).unwrap();
    wait_until("Tessera sees the second instance", || {
        who(tout, 6).contains(&"two".to_string())
    });

    // A broken file: Pilot says where, and keeps serving the last good state.
    std::fs::write(&svc, "services:\n- name: reviews\n  ports: [{ port: 0 }]\n").unwrap();
    pilot.wait_log(
        "shop.yaml: services[0].ports[0].port: a port from 1 to 65535 is required",
        T,
    );
    let w = who(tout, 6);
    assert!(
        w.contains(&"one".to_string()) && w.contains(&"two".to_string()),
        "{w:?}"
    );
    std::fs::write(&svc, services(&[one, two])).unwrap();

    // Envoy, from its own Pilot on the same registry directory.
    let Some(envoy) = envoy_bin() else {
        eprintln!("SKIPPED the Envoy half: no bench/.venv Envoy (scripts/test installs it)");
        return;
    };
    let ep = pilot_cfg(0, eout, "pilot-e.yaml");
    let epilot = Proc::tessera(&["pilot", "--config", ep.to_str().unwrap()]);
    let exds = epilot.logged_addr("pilot ready", T);
    let eboot = dir.write(
        "envoy.yaml",
        &bootstrap(exds, "sidecar~127.0.0.1~web-2.shop~shop.svc.cluster.local"),
    );
    let _e = spawn_envoy(&envoy, &eboot, eout);
    wait_until("Envoy routes to reviews", || who(eout, 1) != ["-"]);
    let mut seen = who(eout, 8);
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["one", "two"], "Envoy balances over both instances Pilot sent");
    // reviews loses an instance: Envoy follows, and ratings (not in that push) keeps routing.
    std::fs::write(&svc, services(&[one])).unwrap();
    wait_until("Envoy drops the second instance", || {
        who(eout, 6).iter().all(|w| w == "one")
    });
    let ratings = curl_ok(&["-s", "-H", "Host: ratings.shop", &format!("http://127.0.0.1:{eout}/")]);
    assert!(ratings.contains("hello from one"), "{ratings}");
    let ratings = curl_ok(&["-s", "-H", "Host: ratings.shop", &format!("http://127.0.0.1:{tout}/")]);
    assert!(ratings.contains("hello from one"), "the Tessera sidecar too: {ratings}");
}

#[test]
fn a_broken_pilot_config_names_the_field() {
    let dir = TempDir::new("pilot-bad");
    assert_pilot_refuses(
        &dir,
        "xds: { listen: \"nowhere\" }\npush: { debounce: soon }\n",
        &[
            "xds.listen: `nowhere` is not an IP:port address",
            "push.debounce: `soon` is not a duration",
            "registries: a registry is required",
        ],
    );
}

#[test]
fn the_example_pilot_config_and_services_load() {
    let cfg = tessera_pilot::config::Config::load(&repo().join("examples/pilot.yaml")).unwrap();
    let dir = cfg.file_dir.unwrap();
    let files = tessera_pilot::file::files(&dir).unwrap();
    assert!(!files.is_empty(), "{}", dir.display());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        tessera_pilot::file::parse(&text, &f.display().to_string(), "file").unwrap();
    }
}

/// A Pilot serving the registry API (in memory), its outbound HTTP port for a sidecar, and the
/// service shop/reviews registered through the API.
struct ApiPilot {
    dir: TempDir,
    out: u16,
    pilot: Proc,
    xds: SocketAddr,
    reg: SocketAddr,
    /// The service's REST URL.
    base: String,
}

fn api_pilot(tag: &str) -> ApiPilot {
    let dir = TempDir::new(tag);
    let out = free_port();
    let cfg = dir.write(
        "pilot.yaml",
        &format!("xds: {{ listen: \"127.0.0.1:0\" }}\nregistries: {{ api: {{ listen: \"127.0.0.1:0\" }} }}\npush: {{ debounce: 50ms }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\n"),
    );
    let pilot = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
    let xds = pilot.logged_addr("pilot ready", T);
    let reg = pilot.logged_addr("pilot registry API ready", T);
    let base = format!("http://{reg}/v1/namespaces/shop/services/reviews");
    let (code, _) = api(
        "PUT",
        &base,
        Some(r#"{"ports": [{"name": "http", "port": 9080, "protocol": "http"}]}"#),
    );
    assert_eq!(code, 201);
    ApiPilot {
        dir,
        out,
        pilot,
        xds,
        reg,
        base,
    }
}

/// The Open Service Registry REST API: a service and instances registered with curl reach the
/// sidecar; a watch returns on change; a bad body is a 400 naming the field; an instance
/// heart-beaten lives past its TTL and one left alone expires.
#[test]
fn instances_registered_through_the_api_reach_the_sidecar_and_expire() {
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let ApiPilot {
        dir,
        out,
        pilot,
        xds,
        reg,
        base,
    } = api_pilot("pilot-api");
    let (code, v) = api(
        "PUT",
        &format!("{base}/instances/i1"),
        Some(&format!(
            r#"{{"address": "127.0.0.1", "port": {}, "ttl": "2s"}}"#,
            one.port()
        )),
    );
    assert_eq!(code, 201, "{v}");
    let boot = dir.write(
        "sidecar.yaml",
        &bootstrap(xds, "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local"),
    );
    let _sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);
    wait_until("the sidecar routes to the registered instance", || {
        who(out, 1) == ["one"]
    });

    // A watch from the current revision returns when the second instance arrives.
    let (_, listed) = api("GET", &format!("{base}/instances"), None);
    let rev = listed["revision"].as_u64().unwrap();
    let watch_url = format!("{base}/instances?watch=true&sinceRevision={rev}");
    let watcher = std::thread::spawn(move || api("GET", &watch_url, None));
    std::thread::sleep(Duration::from_millis(300));
    let (code, _) = api(
        "PUT",
        &format!("{base}/instances/i2"),
        Some(&format!(r#"{{"address": "127.0.0.1", "port": {}}}"#, two.port())),
    );
    assert_eq!(code, 201);
    let (code, seen) = watcher.join().unwrap();
    assert_eq!(code, 200);
    assert!(seen["revision"].as_u64().unwrap() > rev, "{seen}");
    assert_eq!(seen["instances"].as_array().map(Vec::len), Some(2), "{seen}");

    // Bad input: the field is named.
    let (code, e) = api(
        "PUT",
        &format!("{base}/instances/bad"),
        Some(r#"{"address": "somewhere", "weight": 900}"#),
    );
    assert_eq!(code, 400);
    let text = e.to_string();
    assert!(
        text.contains("request body: services[0].instances[0].address: an IP address is required"),
        "{text}"
    );
    assert!(text.contains("weight: a weight from 1 to 128"), "{text}");
    let (code, _) = api(
        "PUT",
        &format!("http://{reg}/v1/namespaces/shop/services/nope/instances/x"),
        Some(r#"{"address": "127.0.0.1"}"#),
    );
    assert_eq!(code, 404);

    // Heartbeats keep i1 alive past its 2 s TTL; without them it expires and only two answers.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(900));
        let (code, _) = api("POST", &format!("{base}/instances/i1/heartbeat"), None);
        assert_eq!(code, 200);
    }
    assert!(who(out, 8).contains(&"one".to_string()), "i1 is still served");
    wait_until("i1 expires", || {
        let (_, l) = api("GET", &format!("{base}/instances"), None);
        l["instances"].as_array().map(Vec::len) == Some(1)
    });
    pilot.wait_log("instance expired", T);
    wait_until("only two answers", || who(out, 6).iter().all(|w| w == "two"));
    let (code, _) = api("POST", &format!("{base}/instances/i1/heartbeat"), None);
    assert_eq!(code, 404, "an expired instance must register again");
}

fn instance_line(id: &str, port: u16, extra: &str) -> String {
    format!(
        r#"{{"namespace": "shop", "service": "reviews", "id": "{id}", "address": "127.0.0.1", "port": {port}{extra}}}"#
    )
}

/// The Open Service Registry API's gRPC part, called by grpcio through stubs that grpcio-tools
/// generates from our proto: a watch from 0 gets the state then every change, with revisions;
/// a watch resumed from a revision gets exactly the changes after it; an instance registered by
/// a session reaches the sidecar and is deregistered when the session ends — closed by the
/// client, its process killed, or its process frozen (HTTP/2 pings go unanswered); bad
/// requests end the stream with a status naming the field.
#[test]
fn the_registry_grpc_api_streams_events_and_ties_instances_to_sessions() {
    use std::io::Write;
    let py = python_grpc_tools();
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let ApiPilot {
        dir,
        out,
        pilot: _pilot,
        xds,
        reg,
        base,
    } = api_pilot("pilot-grpc-api");
    let boot = dir.write(
        "sidecar.yaml",
        &bootstrap(xds, "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local"),
    );
    let _sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);

    // A watch from 0: the state (the service), marked initial and synced.
    let watch = registry_client(&py, &["watch", &reg.to_string(), "", "0"]);
    wait_until("the initial state", || {
        printed(&watch).iter().any(|r| r["synced"] == true)
    });
    let first = &printed(&watch)[0];
    assert_eq!(first["initial"], true, "{first}");
    let ev = &first["events"][0];
    assert_eq!(
        (ev["type"].as_str(), ev["kind"].as_str(), ev["name"].as_str()),
        (Some("ADDED"), Some("service"), Some("reviews")),
        "{first}"
    );
    // A watch of another namespace has an empty state.
    let other = registry_client(&py, &["watch", &reg.to_string(), "other", "0"]);
    wait_until("the other namespace's state", || {
        printed(&other).iter().any(|r| r["synced"] == true)
    });
    assert_eq!(printed(&other)[0]["events"], serde_json::json!([]));

    // A session registers i1: the sidecar routes to it, the watch sees it added.
    let mut s1 = registry_client(&py, &["session", &reg.to_string()]);
    let mut s1_in = s1.child.stdin.take().unwrap();
    writeln!(s1_in, "{}", instance_line("i1", one.port(), "")).unwrap();
    wait_until("the session's first answer", || {
        printed(&s1).iter().any(|r| r["revision"].is_u64())
    });
    let added_at = printed(&s1)[0]["revision"].as_u64().unwrap();
    let added = wait_event(&watch, "ADDED", "i1");
    assert_eq!(added["revision"].as_u64(), Some(added_at), "{added}");
    assert_eq!(added["initial"], false);
    assert_eq!(added["ports"]["http"].as_u64(), Some(u64::from(one.port())), "{added}");
    assert_eq!(added["source"], "api:i1");
    wait_until("the sidecar routes to the session's instance", || {
        who(out, 1) == ["one"]
    });
    let (_, listed) = api("GET", &format!("{base}/instances"), None);
    assert_eq!(listed["instances"][0]["id"], "i1", "{listed}");

    // The session replaces its instance: MODIFIED, with the new fields.
    writeln!(
        s1_in,
        "{}",
        instance_line("i1", one.port(), r#", "weight": 7, "labels": {"v": "2"}"#)
    )
    .unwrap();
    let modified = wait_event(&watch, "MODIFIED", "i1");
    assert_eq!(
        (modified["weight"].as_u64(), modified["labels"]["v"].as_str()),
        (Some(7), Some("2"))
    );
    assert!(modified["revision"].as_u64() > Some(added_at));

    // The client ends the session: the instance is deregistered.
    drop(s1_in);
    s1.wait(T);
    assert_eq!(printed(&s1).last().unwrap()["end"], "OK", "{}", s1.log());
    let deleted = wait_event(&watch, "DELETED", "i1");
    wait_until("the sidecar stops routing to it", || who(out, 1) == ["-"]);

    // A watch resumed from the ADDED revision gets exactly what came after it.
    let resumed = registry_client(&py, &["watch", &reg.to_string(), "", &added_at.to_string()]);
    wait_event(&resumed, "DELETED", "i1");
    let kinds: Vec<(String, u64)> = watched(&resumed)
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_string(), e["revision"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("MODIFIED".to_string(), modified["revision"].as_u64().unwrap()),
            ("DELETED".to_string(), deleted["revision"].as_u64().unwrap())
        ]
    );

    // A session whose client is killed: its instance goes with the connection.
    let mut s2 = registry_client(&py, &["session", &reg.to_string()]);
    let mut s2_in = s2.child.stdin.take().unwrap();
    writeln!(s2_in, "{}", instance_line("i2", two.port(), "")).unwrap();
    wait_until("the sidecar routes to i2", || who(out, 1) == ["two"]);
    s2.signal("KILL");
    wait_event(&watch, "DELETED", "i2");
    let _ = s2.wait(T);

    // A session whose client freezes (SIGSTOP: the socket stays open, pings go unanswered)
    // loses its instance within the ping interval and timeout (10 s + 10 s).
    let s3 = registry_client(&py, &["session", &reg.to_string()]);
    let mut s3_in = s3.child.stdin.as_ref().unwrap();
    writeln!(s3_in, "{}", instance_line("i3", two.port(), "")).unwrap();
    wait_event(&watch, "ADDED", "i3");
    s3.signal("STOP");
    let frozen = std::time::Instant::now();
    wait_event(&watch, "DELETED", "i3");
    assert!(frozen.elapsed() < Duration::from_secs(35), "{:?}", frozen.elapsed());
    s3.signal("KILL");

    // Bad requests: a status naming the field, and nothing left registered.
    let bad = session_once(&py, reg, &[instance_line("b1", one.port(), r#", "weight": 500"#)]);
    assert_ended(&bad, "INVALID_ARGUMENT", "instance.weight: a weight from 1 to 128");
    let line = instance_line("b2", one.port(), "").replace("reviews", "nope");
    assert_ended(&session_once(&py, reg, &[line]), "NOT_FOUND", "");
    let bad = session_once(
        &py,
        reg,
        &[instance_line("b3", one.port(), ""), instance_line("b4", one.port(), "")],
    );
    assert_eq!(bad[0]["revision"].as_u64().map(|r| r > 0), Some(true), "{bad:?}");
    assert_ended(&bad, "INVALID_ARGUMENT", "a session holds one instance");
    wait_event(&watch, "DELETED", "b3");
    let (_, listed) = api("GET", &format!("{base}/instances"), None);
    assert_eq!(listed["instances"], serde_json::json!([]), "{listed}");
    let mut ahead = registry_client(&py, &["watch", &reg.to_string(), "", "1000000"]);
    ahead.wait(T);
    let end = printed(&ahead);
    assert_ended(&end, "OUT_OF_RANGE", "");
    // Malformed and unknown gRPC requests (sent with curl) end with a status; the server
    // keeps serving.
    let junk = dir.path("junk.bin");
    std::fs::write(&junk, [0u8, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap();
    // The unknown method is called without a body: it is answered unread, and a body still on
    // its way would race the stream's end (curl then reports a reset).
    let grpc_curl = |method: &str, body: bool| {
        let data = format!("@{}", junk.display());
        let url = format!("http://{reg}/tessera.registry.v1.Registry/{method}");
        let mut args = vec![
            "-s",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ];
        if body {
            args.extend(["--data-binary", &data]);
        } else {
            args.extend(["-X", "POST"]);
        }
        args.push(&url);
        String::from_utf8_lossy(&curl(&args).stdout).into_owned()
    };
    let got = grpc_curl("Watch", true);
    assert!(
        got.contains("grpc-status: 3") && got.contains("undecodable request"),
        "{got}"
    );
    let got = grpc_curl("Session", true);
    assert!(got.contains("grpc-status: 3"), "{got}");
    let got = grpc_curl("Nope", false);
    assert!(
        got.contains("grpc-status: 12") && got.contains("unknown method"),
        "{got}"
    );
    assert_eq!(api("GET", &format!("{base}/instances"), None).0, 200);
    // No event was sent twice, and revisions never went back.
    let revs: Vec<u64> = watched(&watch)
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(revs.windows(2).all(|w| w[0] <= w[1]), "{revs:?}");
}

/// With `store: { path }`, services and TTL-less instances registered through the API survive a
/// Pilot restart (redb); ephemeral ones do not, as their clients register them again.
#[test]
fn registrations_survive_a_pilot_restart() {
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let dir = TempDir::new("pilot-store");
    let (xds, reg, out) = (free_port(), free_port(), free_port());
    let cfg = dir.write(
        "pilot.yaml",
        &format!(
            "xds: {{ listen: \"127.0.0.1:{xds}\" }}\nregistries: {{ api: {{ listen: \"127.0.0.1:{reg}\" }} }}\nstore: {{ path: state.redb }}\npush: {{ debounce: 50ms }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\n"
        ),
    );
    let start = || {
        let p = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
        p.wait_log("pilot registry API ready", T);
        p
    };
    let pilot = start();
    let base = format!("http://127.0.0.1:{reg}/v1/namespaces/shop/services/reviews");
    assert_eq!(
        api("PUT", &base, Some(r#"{"ports": [{"name": "http", "port": 9080}]}"#)).0,
        201
    );
    let body = |port: u16, ttl: &str| format!(r#"{{"address": "127.0.0.1", "port": {port}{ttl}}}"#);
    assert_eq!(
        api("PUT", &format!("{base}/instances/kept"), Some(&body(one.port(), ""))).0,
        201
    );
    assert_eq!(
        api(
            "PUT",
            &format!("{base}/instances/ephemeral"),
            Some(&body(two.port(), r#", "ttl": "60s""#))
        )
        .0,
        201
    );
    let boot = dir.write(
        "sidecar.yaml",
        &bootstrap(
            SocketAddr::from(([127, 0, 0, 1], xds)),
            "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local",
        ),
    );
    let _sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);
    wait_until("both instances answer", || {
        let w = who(out, 8);
        w.contains(&"one".to_string()) && w.contains(&"two".to_string())
    });

    drop(pilot);
    let pilot = start();
    pilot.wait_log("registrations loaded", T);
    assert!(pilot.log().contains("services=1 instances=1"), "{}", pilot.log());
    let (code, listed) = api("GET", &format!("{base}/instances"), None);
    assert_eq!(code, 200);
    let ids: Vec<&str> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, ["kept"], "{listed}");
    // The sidecar reconnects to the restarted Pilot and follows what it serves.
    wait_until("only the persisted instance answers", || {
        who(out, 6).iter().all(|w| w == "one")
    });
}

/// A sidecar that fronts a workload (`TESSERA_INBOUND`) gets an inbound listener to it, and the
/// AuthorizationPolicy that selects the workload's labels guards that listener.
#[test]
fn inbound_listeners_carry_the_workloads_authorization_policy() {
    let (_app, app) = sample_service("hello");
    let dir = TempDir::new("pilot-inbound");
    std::fs::create_dir_all(dir.path("services")).unwrap();
    std::fs::create_dir_all(dir.path("istio")).unwrap();
    let inbound = free_port();
    dir.write(
        "services/hello.yaml",
        &format!(
            "services:\n- name: hello\n  ports: [{{ name: http, port: 80 }}]\n  instances: [{{ address: 127.0.0.1, port: {inbound}, labels: {{ app: hello }} }}]\n"
        ),
    );
    dir.write(
        "istio/deny-admin.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: no-admin, namespace: default }\nspec:\n  selector: { matchLabels: { app: hello } }\n  action: DENY\n  rules:\n  - to: [{ operation: { paths: [\"/admin*\"] } }]\n",
    );
    let cfg = dir.write(
        "pilot.yaml",
        "xds: { listen: \"127.0.0.1:0\" }\nregistries: { file: { dir: services, watch_interval: 100ms } }\nconfig: { dir: istio }\npush: { debounce: 50ms }\n",
    );
    let pilot = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
    let xds = pilot.logged_addr("pilot ready", T);
    let sadmin = free_port();
    let boot = dir.write(
        "sidecar.yaml",
        &tessera_xds::bootstrap::ads_bootstrap_yaml(
            "sidecar~127.0.0.1~hello-1.default~default.svc.cluster.local",
            "hello",
            xds,
            Some(sadmin),
            "GRPC",
        ),
    );
    let meta_in = format!("TESSERA_INBOUND=127.0.0.1:{inbound}=127.0.0.1:{}", app.port());
    let sidecar = Proc::tessera(&[
        "sidecar",
        "--envoy-bootstrap",
        boot.to_str().unwrap(),
        "--node-meta",
        &meta_in,
        "--node-meta",
        "TESSERA_OUTBOUND=none",
    ]);
    let url = format!("http://127.0.0.1:{inbound}");
    wait_status(&format!("{url}/"), "200", T);
    assert_eq!(curl_ok(&[&format!("{url}/")]), "hello from hello (/)\n");
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{url}/admin/users"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "403",
        "the DENY policy applies; pilot:\n{}\nsidecar:\n{}\n{}",
        pilot.log(),
        sidecar.log(),
        curl_ok(&[&format!("http://127.0.0.1:{sadmin}/config_dump")])
    );
    // The policy removed: the path is served again (a pushed listener change).
    std::fs::remove_file(dir.path("istio/deny-admin.yaml")).unwrap();
    wait_status(&format!("{url}/admin/users"), "200", T);
}

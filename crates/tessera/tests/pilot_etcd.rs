//! Pilot and etcd, against real etcd servers (the Debian `etcd-server` 3.4 binary, members of
//! our own on free loopback ports with temporary data directories). Keys are written with curl
//! through etcd's own JSON gateway, a client we did not write:
//! - the etcd registry: a service and instances written to etcd route a Tessera sidecar's
//!   requests; a deleted key or a revoked lease removes an instance; a bad value is logged with
//!   its key; with etcd gone Pilot keeps serving and says so, and follows again once it is back;
//! - a 3-member cluster: the leader dies, Pilot keeps serving and follows a change through a
//!   surviving member;
//! - the shared store: two Pilots on one etcd; what is registered through A's REST API is
//!   served by B, and an ephemeral instance whose lease lapses leaves both; an instance held
//!   by a gRPC session through A outlives its lease's TTL, shows in B's gRPC watch, and leaves
//!   when the session ends.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::*;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(40);
const HOST: &str = "reviews.shop.svc.cluster.local";

fn etcd_bin() -> PathBuf {
    tool("etcd", "apt-get install -y etcd-server (scripts/test does)")
}

fn b64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One etcd member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    proc: Option<Proc>,
}

/// Members started together (one, or a cluster of three), killed on drop.
struct Etcd {
    // Dropped in this order: the members are killed before their data directory goes.
    members: Vec<Member>,
    dir: TempDir,
}

impl Etcd {
    fn start(tag: &str, n: usize) -> Etcd {
        let dir = TempDir::new(tag);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                proc: None,
            })
            .collect();
        let mut e = Etcd { members, dir };
        for i in 0..n {
            e.spawn(i);
        }
        for m in &e.members {
            wait_port(SocketAddr::from(([127, 0, 0, 1], m.client)), T);
        }
        e.wait_leader();
        e
    }

    fn cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again: same data directory).
    fn spawn(&mut self, i: usize) {
        let cluster = self.cluster();
        let data = self.dir.path(&format!("{}.etcd", self.members[i].name));
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let p = Proc::spawn(
            Command::new(etcd_bin())
                .args(["--name", &m.name, "--data-dir"])
                .arg(&data)
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("tessera-{}", self.members[0].peer)])
                .args(["--log-level", "warn"]),
        );
        self.members[i].proc = Some(p);
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    fn endpoints(&self, order: &[usize]) -> String {
        let list: Vec<String> = order.iter().map(|i| self.url(*i)).collect();
        format!("[{}]", list.join(", "))
    }

    /// A gateway call on member `i`.
    fn call(&self, i: usize, path: &str, body: &Value) -> Value {
        let out = curl(&[
            "-s",
            "-X",
            "POST",
            &format!("{}{path}", self.url(i)),
            "-d",
            &body.to_string(),
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn put(&self, i: usize, key: &str, value: &str, lease: Option<&str>) {
        let mut body = json!({"key": b64(key), "value": b64(value)});
        if let Some(l) = lease {
            body["lease"] = json!(l);
        }
        let v = self.call(i, "/v3/kv/put", &body);
        assert!(v["header"]["revision"].is_string(), "put {key} on member {i}: {v}");
    }

    fn delete(&self, i: usize, key: &str) {
        let v = self.call(i, "/v3/kv/deleterange", &json!({"key": b64(key)}));
        assert_eq!(v["deleted"], "1", "delete {key}: {v}");
    }

    fn grant(&self, i: usize, ttl: u64) -> String {
        let v = self.call(i, "/v3/lease/grant", &json!({"TTL": ttl.to_string()}));
        v["ID"].as_str().unwrap_or_else(|| panic!("grant: {v}")).to_string()
    }

    fn revoke(&self, i: usize, lease: &str) {
        let v = self.call(i, "/v3/lease/revoke", &json!({"ID": lease}));
        assert!(v.get("error").is_none(), "revoke: {v}");
    }

    /// The index of the leader, asked of every living member.
    fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.proc.is_none() {
                continue;
            }
            let v = self.call(i, "/v3/maintenance/status", &json!({}));
            let (Some(me), Some(leader)) = (v["header"]["member_id"].as_str(), v["leader"].as_str()) else {
                continue;
            };
            if me == leader {
                return Some(i);
            }
        }
        None
    }

    fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + T;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(Instant::now() < deadline, "etcd elected no leader within {T:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.signal("KILL");
            p.wait(T);
        }
    }
}

/// Who answers for reviews through the sidecar's outbound listener, `n` times (`-`: nobody).
fn who(out: u16, n: usize) -> Vec<String> {
    who_answers(out, HOST, n)
}

/// Waits until `n` requests are answered by exactly the set `want` (empty: by nobody).
fn wait_who(out: u16, want: &[&str], what: &str, pilot: &Proc) {
    let deadline = Instant::now() + T;
    loop {
        let mut got = who(out, 6);
        got.sort();
        got.dedup();
        let expect: Vec<String> = if want.is_empty() {
            vec!["-".to_string()]
        } else {
            want.iter().map(|s| s.to_string()).collect()
        };
        if got == expect {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: answered by {got:?}, not {expect:?} within {T:?}; pilot log:\n{}",
            pilot.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sidecar(dir: &TempDir, xds: SocketAddr) -> Proc {
    let boot = dir.write(
        "sidecar.yaml",
        &tessera_xds::bootstrap::ads_bootstrap_yaml(
            "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local",
            "web",
            xds,
            None,
            "GRPC",
        ),
    );
    Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()])
}

fn instance(addr: SocketAddr) -> String {
    format!(
        r#"{{"address": "{}", "port": {}, "labels": {{"version": "v1"}}}}"#,
        addr.ip(),
        addr.port()
    )
}

const SVC: &str = "/tessera/registry/services/shop/reviews";
const SERVICE: &str = r#"{"ports": [{"name": "http", "port": 9080, "protocol": "http"}]}"#;

fn inst_key(id: &str) -> String {
    format!("/tessera/registry/instances/shop/reviews/{id}")
}

fn registryz(admin: SocketAddr) -> Value {
    let out = curl_ok(&[&format!("http://{admin}/debug/registryz")]);
    serde_json::from_str::<Value>(&out).unwrap_or(Value::Null)
}

#[test]
fn services_in_etcd_reach_the_sidecar_and_survive_an_outage() {
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let mut etcd = Etcd::start("pilot-etcd", 1);
    let dir = TempDir::new("pilot-etcd-run");
    let out = free_port();
    let cfg = dir.write(
        "pilot.yaml",
        &format!(
            "xds: {{ listen: \"127.0.0.1:0\" }}\nregistries:\n  etcd: {{ endpoints: {}, prefix: /tessera/registry, namespace: default, dial_timeout: 2s }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\npush: {{ debounce: 50ms, debounce_max: 200ms }}\n",
            etcd.endpoints(&[0])
        ),
    );
    let pilot = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
    let xds = pilot.logged_addr("pilot ready", T);
    let admin = pilot.logged_addr("pilot admin API ready", T);
    pilot.wait_log("etcd registry connected", T);
    let _sidecar = sidecar(&dir, xds);

    // A service and an instance, written with curl through etcd's gateway.
    etcd.put(0, SVC, SERVICE, None);
    etcd.put(0, &inst_key("one"), &instance(one), None);
    wait_who(out, &["one"], "the instance written to etcd answers", &pilot);

    // An ephemeral instance on a lease, and a value that does not pass the checks.
    let lease = etcd.grant(0, 60);
    etcd.put(0, &inst_key("two"), &instance(two), Some(&lease));
    etcd.put(0, &inst_key("bad"), r#"{"address": "nowhere", "weight": 900}"#, None);
    wait_who(out, &["one", "two"], "the leased instance joins", &pilot);
    pilot.wait_log(&format!("key={}", inst_key("bad")), T);
    pilot.wait_log("address: an IP address is required; weight: a weight from 1 to 128", T);

    // A deleted key and a revoked lease take their instances away.
    etcd.delete(0, &inst_key("one"));
    wait_who(out, &["two"], "the deleted instance leaves", &pilot);
    etcd.revoke(0, &lease);
    wait_who(out, &[], "the instance whose lease went leaves", &pilot);
    etcd.put(0, &inst_key("one"), &instance(one), None);
    wait_who(out, &["one"], "the instance is back", &pilot);

    // etcd dies: Pilot says so (log and admin API) and keeps serving what it had.
    etcd.kill(0);
    pilot.wait_log("etcd registry disconnected", T);
    let deadline = Instant::now() + T;
    while registryz(admin)[0]["connected"] != false {
        assert!(Instant::now() < deadline, "registryz: {}", registryz(admin));
        std::thread::sleep(Duration::from_millis(100));
    }
    let z = registryz(admin);
    assert_eq!(z[0]["kind"], "etcd", "{z}");
    assert!(
        z[0]["last_error"].as_str().is_some_and(|e| e.contains("127.0.0.1")),
        "{z}"
    );
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(who(out, 2), ["one", "one"], "the last view stays while etcd is down");
        std::thread::sleep(Duration::from_millis(200));
    }

    // etcd is back on the same data: Pilot reconnects and follows again.
    let connects = pilot.log().matches("etcd registry connected").count();
    etcd.spawn(0);
    etcd.wait_leader();
    let deadline = Instant::now() + T;
    while pilot.log().matches("etcd registry connected").count() <= connects {
        assert!(
            Instant::now() < deadline,
            "Pilot did not reconnect; log:\n{}",
            pilot.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    etcd.put(0, &inst_key("two"), &instance(two), None);
    wait_who(
        out,
        &["one", "two"],
        "after the outage, a new instance reaches the sidecar",
        &pilot,
    );
    assert_eq!(registryz(admin)[0]["connected"], true);
}

#[test]
fn pilot_follows_a_three_member_cluster_through_a_leader_kill() {
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let mut etcd = Etcd::start("pilot-etcd3", 3);
    let leader = etcd.wait_leader();
    // The leader first: Pilot starts on it, so its watch must move when the leader dies.
    let order: Vec<usize> = std::iter::once(leader).chain((0..3).filter(|i| *i != leader)).collect();
    let dir = TempDir::new("pilot-etcd3-run");
    let out = free_port();
    let cfg = dir.write(
        "pilot.yaml",
        &format!(
            "xds: {{ listen: \"127.0.0.1:0\" }}\nregistries:\n  etcd: {{ endpoints: {}, dial_timeout: 1s, request_timeout: 3s }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\npush: {{ debounce: 50ms, debounce_max: 200ms }}\n",
            etcd.endpoints(&order)
        ),
    );
    let pilot = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
    let xds = pilot.logged_addr("pilot ready", T);
    pilot.wait_log("etcd registry connected", T);
    pilot.wait_log(&format!("endpoint=127.0.0.1:{}", etcd.members[leader].client), T);
    let _sidecar = sidecar(&dir, xds);
    etcd.put(order[1], SVC, SERVICE, None);
    etcd.put(order[2], &inst_key("one"), &instance(one), None);
    wait_who(out, &["one"], "an instance written to a follower answers", &pilot);

    // The leader dies. Pilot keeps serving, then follows a change made through a survivor.
    etcd.kill(leader);
    assert_eq!(who(out, 3), ["one", "one", "one"], "served right after the leader died");
    let new_leader = etcd.wait_leader();
    assert_ne!(new_leader, leader);
    let survivor = order[1];
    etcd.put(survivor, &inst_key("two"), &instance(two), None);
    wait_who(
        out,
        &["one", "two"],
        "a change after the leader died reaches the sidecar",
        &pilot,
    );
    etcd.delete(order[2], &inst_key("one"));
    wait_who(out, &["two"], "and the next one too", &pilot);
    // The watch was on the dead leader: Pilot said so and moved to a survivor.
    let log = pilot.log();
    assert!(log.contains("etcd registry disconnected"), "{log}");
    let last = log.lines().rfind(|l| l.contains("etcd: watching")).unwrap_or_default();
    assert!(
        !last.contains(&format!("endpoint=127.0.0.1:{} ", etcd.members[leader].client)),
        "{last}"
    );
}

fn ids(listed: &Value) -> Vec<String> {
    let mut v: Vec<String> = listed["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn two_pilots_share_registrations_through_the_etcd_store() {
    let (_one, one) = sample_service("one");
    let (_two, two) = sample_service("two");
    let etcd = Etcd::start("pilot-etcd-store", 1);
    let dir = TempDir::new("pilot-etcd-store-run");
    let (out_a, out_b) = (free_port(), free_port());
    let pilot_cfg = |name: &str, out: u16| {
        dir.write(
            name,
            &format!(
                "xds: {{ listen: \"127.0.0.1:0\" }}\nregistries: {{ api: {{ listen: \"127.0.0.1:0\" }} }}\nstore:\n  etcd: {{ endpoints: {}, prefix: /tessera/api }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\npush: {{ debounce: 50ms, debounce_max: 200ms }}\n",
                etcd.endpoints(&[0])
            ),
        )
    };
    let a_cfg = pilot_cfg("a.yaml", out_a);
    let b_cfg = pilot_cfg("b.yaml", out_b);
    let a = Proc::tessera(&["pilot", "--config", a_cfg.to_str().unwrap()]);
    let b = Proc::tessera(&["pilot", "--config", b_cfg.to_str().unwrap()]);
    let a_api = a.logged_addr("pilot registry API ready", T);
    let b_api = b.logged_addr("pilot registry API ready", T);
    let b_xds = b.logged_addr("pilot ready", T);
    let _sidecar = sidecar(&dir, b_xds);
    let base_a = format!("http://{a_api}/v1/namespaces/shop/services/reviews");
    let base_b = format!("http://{b_api}/v1/namespaces/shop/services/reviews");

    // Registered through A, served by B's sidecar.
    assert_eq!(api("PUT", &base_a, Some(SERVICE)).0, 201);
    assert_eq!(api("PUT", &base_a, Some(SERVICE)).0, 200, "the second PUT updates");
    let (code, v) = api("PUT", &format!("{base_a}/instances/one"), Some(&instance(one)));
    assert_eq!(code, 201, "{v}");
    let (_, listed) = api("GET", &format!("{base_a}/instances"), None);
    assert_eq!(ids(&listed), ["one"], "A reads its own write at once: {listed}");
    wait_who(out_b, &["one"], "B's sidecar routes to what A registered", &b);

    // Bad input is refused by A before it reaches etcd; a missing service is a 404.
    let (code, e) = api(
        "PUT",
        &format!("{base_a}/instances/bad"),
        Some(r#"{"address": "x", "weight": 900}"#),
    );
    assert_eq!(code, 400, "{e}");
    assert!(e.to_string().contains("weight: a weight from 1 to 128"), "{e}");
    let (code, _) = api(
        "PUT",
        &format!("http://{a_api}/v1/namespaces/shop/services/nope/instances/x"),
        Some(r#"{"address": "127.0.0.1"}"#),
    );
    assert_eq!(code, 404);

    // An ephemeral instance through A, heart-beaten through B: etcd's lease is shared.
    let body = format!(r#"{{"address": "127.0.0.1", "port": {}, "ttl": "2s"}}"#, two.port());
    let (code, v) = api("PUT", &format!("{base_a}/instances/two"), Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_who(out_b, &["one", "two"], "the ephemeral instance reaches B", &b);
    let deadline = Instant::now() + T;
    while ids(&api("GET", &format!("{base_b}/instances"), None).1) != ["one", "two"] {
        assert!(Instant::now() < deadline, "B's API never listed both");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(900));
        let (code, v) = api("POST", &format!("{base_b}/instances/two/heartbeat"), None);
        assert_eq!(code, 200, "{v}");
    }
    assert!(
        who(out_b, 8).contains(&"two".to_string()),
        "heart-beaten past its TTL, two stays"
    );

    // No more heartbeats: the lease lapses, etcd deletes the key, both replicas drop it.
    wait_who(out_b, &["one"], "the lapsed instance leaves B", &b);
    let deadline = Instant::now() + T;
    while ids(&api("GET", &format!("{base_a}/instances"), None).1) != ["one"] {
        assert!(Instant::now() < deadline, "A still lists the lapsed instance");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = api("POST", &format!("{base_a}/instances/two/heartbeat"), None);
    assert_eq!(code, 404, "a lapsed instance must register again");

    // The registry's gRPC API on the etcd store: B's watch sees what a session on A registers;
    // the session's lease outlives its TTL while the stream lives, and the instance leaves
    // every replica when the session ends.
    let py = python_grpc_tools();
    let watch_b = registry_client(&py, &["watch", &b_api.to_string(), "shop", "0"]);
    let deadline = Instant::now() + T;
    while !printed(&watch_b).iter().any(|r| r["synced"] == true) {
        assert!(Instant::now() < deadline, "B's watch never synced: {}", watch_b.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut session = registry_client(&py, &["session", &a_api.to_string()]);
    let mut session_in = session.child.stdin.take().unwrap();
    writeln!(
        session_in,
        r#"{{"namespace": "shop", "service": "reviews", "id": "s1", "address": "127.0.0.1", "port": {}}}"#,
        two.port()
    )
    .unwrap();
    let added = wait_event(&watch_b, "ADDED", "s1");
    assert_eq!(added["initial"], false, "{added}");
    wait_who(out_b, &["one", "two"], "the session's instance reaches B", &b);
    // Past the session lease's 10 s TTL: still there, renewed by the stream.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(ids(&api("GET", &format!("{base_b}/instances"), None).1), ["one", "s1"]);
    drop(session_in);
    session.wait(T);
    assert!(session.log().contains(r#""end": "OK""#), "{}", session.log());
    wait_event(&watch_b, "DELETED", "s1");
    wait_who(out_b, &["one"], "the ended session's instance leaves B", &b);

    // A service deleted through B goes with its instances, everywhere.
    assert_eq!(api("DELETE", &base_b, None).0, 200);
    wait_who(out_b, &[], "the deleted service leaves", &b);
    let deadline = Instant::now() + T;
    while api("GET", &format!("{base_a}/instances"), None).0 != 404 {
        assert!(Instant::now() < deadline, "A still serves the deleted service");
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = etcd.call(
        0,
        "/v3/kv/range",
        &json!({"key": b64("/tessera/api/"), "range_end": b64("/tessera/api0")}),
    );
    assert!(left.get("kvs").is_none(), "nothing left in etcd: {left}");
    drop(a);
}

#[test]
fn a_broken_etcd_section_names_its_fields() {
    let dir = TempDir::new("pilot-etcd-bad");
    assert_pilot_refuses(
        &dir,
        "registries:\n  etcd: { endpoints: [\"127.0.0.1:2379\"], prefix: registry/, dial_timeout: soon, colour: red }\nstore: { path: x.redb, etcd: { endpoints: [https://127.0.0.1:2379] } }\n",
        &[
            "registries.etcd.endpoints[0]: `127.0.0.1:2379` is not an endpoint URL such as http://127.0.0.1:2379",
            "registries.etcd.prefix: `registry/` is not a key prefix",
            "registries.etcd.dial_timeout: `soon` is not a duration",
            "registries.etcd.colour: unknown field (known: endpoints, prefix, namespace, dial_timeout, request_timeout)",
            "store.etcd: give `path` (one Pilot's own file) or `etcd` (shared by replicas), not both",
            "store.etcd.endpoints[0]: `https://127.0.0.1:2379`: TLS is not supported yet",
        ],
    );
}

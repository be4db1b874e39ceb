//! Pilot's ZooKeeper / Dubbo registry against a real ZooKeeper (the Debian `zookeeperd` jars,
//! a standalone server of our own on a free loopback port): Dubbo-style provider nodes written
//! by ZooKeeper's own CLI reach a Tessera sidecar over ADS, vanish with their session, survive
//! in Pilot while ZooKeeper is down, and Pilot follows again once it is back.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(40);
const IFACE: &str = "com.foo.DemoService";
const CLUSTER: &str = "outbound|20880||com-foo-demoservice.default.svc.cluster.local";

/// The jars of the Debian package, checked: the test fails with what to install, never skips.
fn classpath(logger: &str) -> String {
    let dir = Path::new("/usr/share/java");
    let jars = ["zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", logger];
    for j in jars {
        assert!(
            dir.join(j).is_file(),
            "/usr/share/java/{j} is missing; run scripts/test, or apt-get install -y zookeeperd"
        );
    }
    jars.map(|j| dir.join(j).display().to_string()).join(":")
}

fn java() -> PathBuf {
    tool("java", "apt-get install -y zookeeperd (it brings a JRE)")
}

/// A standalone ZooKeeper on 127.0.0.1:`port` keeping its data in `dir`.
fn zookeeper(dir: &TempDir, port: u16) -> Proc {
    let data = dir.path("zk-data");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = dir.write(
        "zoo.cfg",
        &format!(
            "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxSessionTimeout=60000\n",
            data.display()
        ),
    );
    let p = Proc::spawn(
        Command::new(java())
            .arg("-Xmx128m")
            .arg("-cp")
            .arg(classpath("slf4j-simple.jar"))
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg),
    );
    p.wait_log("binding to port", T);
    wait_port(SocketAddr::from(([127, 0, 0, 1], port)), T);
    p
}

/// ZooKeeper's own CLI, one session, fed commands on its standard input.
struct Cli {
    proc: Proc,
    stdin: ChildStdin,
}

impl Cli {
    fn new(port: u16) -> Cli {
        let mut proc = Proc::spawn(
            Command::new(java())
                .arg("-Xmx64m")
                .arg("-cp")
                .arg(classpath("slf4j-nop.jar"))
                .arg("org.apache.zookeeper.ZooKeeperMain")
                .arg("-server")
                .arg(format!("127.0.0.1:{port}"))
                .stdin(Stdio::piped()),
        );
        let stdin = proc.child.stdin.take().unwrap();
        proc.wait_log("state:SyncConnected", T);
        Cli { proc, stdin }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Creates the persistent parents, then `node` as an ephemeral child of the providers node.
    fn provider(&mut self, url: &str) -> String {
        for p in [
            "/dubbo".to_string(),
            format!("/dubbo/{IFACE}"),
            format!("/dubbo/{IFACE}/providers"),
        ] {
            self.send(&format!("create {p}"));
        }
        let path = format!("/dubbo/{IFACE}/providers/{}", encode(url));
        self.send(&format!("create -e {path}"));
        self.proc.wait_log(&format!("Created {path}"), T);
        path
    }

    /// Closes the session (its ephemeral nodes go with it) and waits for the CLI to exit.
    fn quit(mut self) {
        self.send("quit");
        self.proc.wait(T);
    }
}

/// What Dubbo's `URL.encode` does to a provider URL.
fn encode(url: &str) -> String {
    url.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.*".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn url(ip: &str, extra: &str) -> String {
    format!(
        "dubbo://{ip}:20880/{IFACE}?anyhost=true&application=demo&interface={IFACE}&methods=sayHello&side=provider&version=1.0.0&timestamp=1700000000000{extra}"
    )
}

/// The endpoints the sidecar holds for the Dubbo cluster, with their weights.
fn endpoints(admin: SocketAddr) -> Option<Vec<(String, u64)>> {
    let out = curl(&[&format!("http://{admin}/clusters?format=json")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let c = v["cluster_statuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == CLUSTER)?;
    let mut eps: Vec<(String, u64)> = c["host_statuses"]
        .as_array()?
        .iter()
        .map(|h| {
            let a = &h["address"]["socket_address"];
            (
                format!("{}:{}", a["address"].as_str().unwrap_or("?"), a["port_value"]),
                h["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    eps.sort();
    Some(eps)
}

fn wait_endpoints(admin: SocketAddr, want: &[(&str, u64)], what: &str, pilot: &Proc) {
    let want: Vec<(String, u64)> = want.iter().map(|(a, w)| (a.to_string(), *w)).collect();
    let deadline = Instant::now() + T;
    loop {
        let got = endpoints(admin);
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the sidecar has {got:?}, not {want:?} within {T:?}; pilot log:\n{}",
            pilot.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dubbo_providers_in_zookeeper_reach_the_sidecar_and_survive_an_outage() {
    let dir = TempDir::new("pilot-zk");
    let zk_port = free_port();
    let mut zk = zookeeper(&dir, zk_port);

    // Pilot starts on an empty ZooKeeper: it must notice /dubbo and everything under it appear.
    let cfg = dir.write(
        "pilot.yaml",
        &format!(
            "xds: {{ listen: \"127.0.0.1:0\" }}\nregistries:\n  zookeeper: {{ servers: \"127.0.0.1:{zk_port}\", root: /dubbo, namespace: default, session_timeout: 4s }}\nsidecar: {{ outbound_http: \"127.0.0.1:{}\" }}\npush: {{ debounce: 50ms, debounce_max: 200ms }}\n",
            free_port()
        ),
    );
    let pilot = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
    let xds = pilot.logged_addr("pilot ready", T);
    pilot.wait_log("zookeeper session established", T);
    let boot = dir.write(
        "sidecar.yaml",
        &tessera_xds::bootstrap::ads_bootstrap_yaml(
            "sidecar~127.0.0.1~web-1.default~default.svc.cluster.local",
            "web",
            xds,
            Some(0),
            "GRPC",
        ),
    );
    let sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]);
    let admin = sidecar.logged_addr("admin API ready", T);

    // Two providers, each in its own ZooKeeper session, and one malformed node.
    let mut a = Cli::new(zk_port);
    a.provider(&url("127.0.0.7", "&group=g1&weight=100"));
    let mut b = Cli::new(zk_port);
    b.provider(&url("127.0.0.8", "&weight=7"));
    let bad = b.provider("dubbo://not-an-ip:20880/com.foo.DemoService?side=provider");
    wait_endpoints(
        admin,
        &[("127.0.0.7:20880", 100), ("127.0.0.8:20880", 7)],
        "both providers reach the sidecar",
        &pilot,
    );
    pilot.wait_log(&format!("node={bad}"), T);
    pilot.wait_log("host `not-an-ip` is not an IP address", T);

    // B's session closes: its ephemeral nodes go, and so does its endpoint.
    b.quit();
    wait_endpoints(
        admin,
        &[("127.0.0.7:20880", 100)],
        "the provider whose session closed leaves",
        &pilot,
    );

    // ZooKeeper dies: Pilot says so, and keeps serving the last view.
    zk.signal("KILL");
    zk.wait(T);
    pilot.wait_log("zookeeper registry disconnected", T);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            endpoints(admin),
            Some(vec![("127.0.0.7:20880".to_string(), 100)]),
            "the last view stays while ZooKeeper is down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // ZooKeeper is back (same data; A's session resumes, its node with it): Pilot reconnects,
    // re-reads everything and follows new providers.
    let sessions = pilot.log().matches("zookeeper session established").count();
    let _zk = zookeeper(&dir, zk_port);
    let deadline = Instant::now() + T;
    while pilot.log().matches("zookeeper session established").count() <= sessions {
        assert!(
            Instant::now() < deadline,
            "Pilot did not reconnect; log:\n{}",
            pilot.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = Cli::new(zk_port);
    c.provider(&url("127.0.0.9", "&weight=300"));
    wait_endpoints(
        admin,
        &[("127.0.0.7:20880", 100), ("127.0.0.9:20880", 128)],
        "after the outage, a new provider reaches the sidecar (weight clamped to 128)",
        &pilot,
    );
    c.quit();
    a.quit();
    wait_endpoints(admin, &[], "every provider gone", &pilot);
}

#[test]
fn a_broken_zookeeper_section_names_its_fields() {
    let dir = TempDir::new("pilot-zk-bad");
    assert_pilot_refuses(
        &dir,
        "registries:\n  zookeeper: { servers: \"127.0.0.1\", root: dubbo, session_timeout: soon, colour: red }\n",
        &[
            "registries.zookeeper.servers: `127.0.0.1` has no port (host:port)",
            "registries.zookeeper.root: `dubbo` is not an absolute ZooKeeper path",
            "registries.zookeeper.session_timeout: `soon` is not a duration",
            "registries.zookeeper.colour: unknown field (known: servers, root, namespace, session_timeout)",
        ],
    );
}

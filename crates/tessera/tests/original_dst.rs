//! Transparent capture, as Istio's sidecar sees traffic: in a network namespace the test makes,
//! iptables REDIRECTs a client's connections to the sidecar's `virtualOutbound` listener, which
//! restores the original destination (`SO_ORIGINAL_DST`), hands a connection for a service
//! address to the socketless listener for it (`bind_to_port: false`) and sends anything else
//! through an ORIGINAL_DST cluster (`PassthroughCluster`) to where it was going. The same Envoy
//! bootstrap runs in Envoy 1.40 and in Tessera; both must answer the same.
//!
//! Needs root (network namespaces, iptables); `.ci/run` has both (scripts/test installs
//! iptables). Elsewhere the test says it is skipped.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        let root = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&root.stdout).trim() != "0" {
            return None;
        }
        let name = format!("tessera-odst-{}", std::process::id());
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        if !ok(Command::new("ip").args(["netns", "add", &name])) {
            return None;
        }
        let ns = Netns(name);
        if !ok(ns.cmd("ip").args(["link", "set", "lo", "up"])) {
            return None;
        }
        Some(ns)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The client's source ports: only these connections are redirected, so the proxies' own
/// upstream connections (ephemeral ports) go where they are sent.
const CLIENT_PORTS: &str = "20000-20099";

fn bootstrap(admin: u16) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 15001}}}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    filter_chains:
    - name: virtualOutbound-catchall-tcp
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  - name: 127.0.0.5_8080
    address: {{socket_address: {{address: 127.0.0.5, port_value: 8080}}}}
    bind_to_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_8080
          route_config:
            name: "8080"
            virtual_hosts:
            - name: reviews
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: outbound|8080||reviews}}
                response_headers_to_add: [{{header: {{key: x-via, value: vip-listener}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
  - name: outbound|8080||reviews
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: outbound|8080||reviews
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.7, port_value: 8081}}}}}}}}]}}]
"#
    )
}

/// What the client gets for `url` inside the namespace: status, `x-via`, and who answered.
fn ask(ns: &Netns, url: &str) -> String {
    let out = ns
        .cmd("curl")
        .args(["-s", "-i", "--max-time", "5", "--local-port", CLIENT_PORTS, url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let status = text.split_whitespace().nth(1).unwrap_or("-").to_string();
    let via = text
        .lines()
        .find_map(|l| l.strip_prefix("x-via: "))
        .map_or("-", str::trim)
        .to_string();
    let who = ["reviews", "legacy"]
        .into_iter()
        .find(|w| text.contains(&format!("hello from {w}")))
        .unwrap_or("-");
    format!("{status} {via} {who}")
}

fn answers(ns: &Netns) -> Vec<String> {
    // A service address with a listener, and one without (passthrough).
    vec![ask(ns, "http://127.0.0.5:8080/"), ask(ns, "http://127.0.0.6:9090/x")]
}

/// Connections the passthrough cluster made (Envoy's stat name, which Tessera shares).
fn passthrough_connections(ns: &Netns) -> u64 {
    let out = ns
        .cmd("curl")
        .args(["-s", "--max-time", "5", "http://127.0.0.1:15000/stats"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("cluster.PassthroughCluster.upstream_cx_total: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_answer(ns: &Netns, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask(ns, "http://127.0.0.5:8080/") != want {
        assert!(Instant::now() < deadline, "never answered {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn redirected_connections_reach_their_listener_or_pass_through_as_in_envoy() {
    let Some(ns) = Netns::new() else {
        eprintln!("SKIPPED: needs root and `ip netns` (network namespaces) for transparent capture");
        return;
    };
    let ok = ns
        .cmd("iptables")
        .args(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.0/8"])
        .args([
            "--sport",
            &CLIENT_PORTS.replace('-', ":"),
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: iptables cannot REDIRECT here (scripts/test installs iptables)");
        return;
    }
    let service =
        |name: &str, addr: &str| Proc::spawn(ns.cmd(bin()).args(["sample-service", "--listen", addr, "--name", name]));
    let _reviews = service("reviews", "127.0.0.7:8081");
    let _legacy = service("legacy", "127.0.0.6:9090");
    let dir = TempDir::new("odst");
    let boot = dir.write("capture.yaml", &bootstrap(15000));

    let tessera = Proc::spawn(
        ns.cmd(bin())
            .args(["sidecar", "--envoy-bootstrap", boot.to_str().unwrap()]),
    );
    wait_answer(&ns, "200 vip-listener reviews");
    let t = answers(&ns);
    assert_eq!(t, ["200 vip-listener reviews", "200 - legacy"], "{}", tessera.log());
    assert!(
        passthrough_connections(&ns) >= 1,
        "the passthrough went through the sidecar"
    );
    drop(tessera);

    let Some(envoy) = envoy_bin() else {
        eprintln!("SKIPPED the Envoy half: no bench/.venv Envoy (scripts/test installs it)");
        return;
    };
    std::thread::sleep(Duration::from_millis(300));
    let e = Proc::spawn(
        ns.cmd(envoy.to_str().unwrap())
            .args([
                "-c",
                boot.to_str().unwrap(),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "error",
            ])
            .args(["--base-id", &(std::process::id() % 50_000 + 3000).to_string()]),
    );
    wait_answer(&ns, "200 vip-listener reviews");
    assert_eq!(answers(&ns), t, "Envoy vs Tessera\n{}", e.log());
    assert!(passthrough_connections(&ns) >= 1, "Envoy's passthrough");
}

//! Python grpcio's own xDS client (not written by us) resolving a service through Pilot: a
//! proxyless channel to `xds:///who.default:50051` with a bootstrap naming Pilot (node metadata
//! `GENERATOR: grpc`, as Istio marks proxyless clients) reaches the registered gRPC server; the
//! same call through a Tessera sidecar fed by the same Pilot routes the same way; and when the
//! registry moves the service to another server, both follow.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn python() -> std::path::PathBuf {
    let py = tool("python3", "apt-get install -y python3");
    let ok = Command::new(&py)
        .args(["-c", "import grpc"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "python3 lacks grpcio; run .ci/run, or: pip install grpcio");
    py
}

fn peer() -> std::path::PathBuf {
    repo().join("crates/tessera/tests/peers/grpc_xds.py")
}

/// A grpcio server answering `name`; returns it (alive while its stdin is open) and its port.
fn server(py: &std::path::Path, name: &str) -> (Proc, u16) {
    let s = Proc::spawn(Command::new(py).arg(peer()).args(["serve", name]).stdin(Stdio::piped()));
    let deadline = Instant::now() + T;
    loop {
        if let Some(line) = s.log().lines().next()
            && let Ok(p) = line.trim().parse()
        {
            return (s, p);
        }
        assert!(Instant::now() < deadline, "grpc server: {}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn registry(port: u16) -> String {
    format!(
        "services:\n- name: who\n  ports: [{{ name: grpc, port: 50051, protocol: grpc }}]\n  instances: [{{ address: 127.0.0.1, port: {port} }}]\n"
    )
}

/// One call; the answer, or the error text.
fn call(py: &std::path::Path, target: &str, authority: Option<&str>, bootstrap: &std::path::Path) -> String {
    let mut cmd = Command::new(py);
    cmd.arg(peer()).args(["call", target]);
    if let Some(a) = authority {
        cmd.arg(a);
    }
    let out = cmd.env("GRPC_XDS_BOOTSTRAP", bootstrap).output().unwrap();
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        format!("error: {}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

fn until(what: &str, mut f: impl FnMut() -> String, want: &str) {
    let deadline = Instant::now() + T;
    loop {
        let got = f();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: wanted {want:?}, last got {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn grpcio_xds_client_and_the_sidecar_resolve_through_pilot() {
    let py = python();
    let (_one, one) = server(&py, "one");
    let (_two, two) = server(&py, "two");
    let dir = TempDir::new("pilot-grpc");
    std::fs::create_dir_all(dir.path("services")).unwrap();
    let reg = dir.write("services/who.yaml", &registry(one));
    let out = free_port();
    let cfg = dir.write(
        "pilot.yaml",
        &format!(
            "xds: {{ listen: \"127.0.0.1:0\" }}\nregistries: {{ file: {{ dir: services, watch_interval: 100ms }} }}\npush: {{ debounce: 50ms }}\nsidecar: {{ outbound_http: \"127.0.0.1:{out}\" }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\n"
        ),
    );
    let pilot = Proc::tessera(&["pilot", "--config", cfg.to_str().unwrap()]);
    let xds: SocketAddr = pilot.logged_addr("pilot ready", T);
    // gRPC's bootstrap (gRFC A27), as istio-agent writes it for proxyless clients.
    let boot = dir.write(
        "grpc-bootstrap.json",
        &serde_json::json!({
            "xds_servers": [{"server_uri": xds.to_string(), "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
            "node": {"id": "sidecar~127.0.0.1~client-1.default~default.svc.cluster.local", "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"}},
        })
        .to_string(),
    );
    until(
        "grpcio's xDS client",
        || call(&py, "xds:///who.default:50051", None, &boot),
        "one",
    );
    assert_eq!(
        call(&py, "xds:///who.default.svc.cluster.local:50051", None, &boot),
        "one"
    );
    let unknown = call(&py, "xds:///nobody.default:50051", None, &boot);
    assert!(unknown.starts_with("error: "), "{unknown}");

    // The same through a Tessera sidecar fed by the same Pilot.
    let sboot = dir.write(
        "sidecar.yaml",
        &tessera_xds::bootstrap::ads_bootstrap_yaml(
            "sidecar~127.0.0.1~web-1.default~default.svc.cluster.local",
            "web",
            xds,
            None,
            "GRPC",
        ),
    );
    let _sidecar = Proc::tessera(&["sidecar", "--envoy-bootstrap", sboot.to_str().unwrap()]);
    let via = format!("127.0.0.1:{out}");
    until(
        "the sidecar",
        || call(&py, &via, Some("who.default:50051"), &boot),
        "one",
    );

    // The registry moves the service: both follow.
    std::fs::write(&reg, registry(two)).unwrap();
    until(
        "grpcio after the move",
        || call(&py, "xds:///who.default:50051", None, &boot),
        "two",
    );
    until(
        "the sidecar after the move",
        || call(&py, &via, Some("who.default:50051"), &boot),
        "two",
    );
    // grpcio ACKed what Pilot sent (no NACK in /debug/syncz).
    let admin = pilot.logged_addr("pilot admin API ready", T);
    let syncz = curl_ok(&[&format!("http://{admin}/debug/syncz")]);
    assert!(!syncz.contains("\"last_nack\": \""), "{syncz}");
}

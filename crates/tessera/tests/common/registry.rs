//! Pilot's registry gRPC API from Python: grpcio calling through stubs that grpcio-tools
//! generates from our proto (`peers/registry_grpc.py`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{Proc, repo, tool};

/// Python with grpcio and grpcio-tools (scripts/test installs them).
pub fn python_grpc_tools() -> PathBuf {
    let py = tool("python3", "apt-get install -y python3");
    let ok = std::process::Command::new(&py)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "python3 lacks grpcio-tools; run .ci/run, or: pip install grpcio grpcio-tools"
    );
    py
}

/// The registry gRPC client (`peers/registry_grpc.py`, stubs generated from our proto by
/// grpcio-tools): `args` after the script, stdin piped.
pub fn registry_client(py: &Path, args: &[&str]) -> Proc {
    Proc::spawn(
        std::process::Command::new(py)
            .arg(repo().join("crates/tessera/tests/peers/registry_grpc.py"))
            .args(args)
            .stdin(std::process::Stdio::piped()),
    )
}

/// The JSON lines a registry client printed so far.
pub fn printed(p: &Proc) -> Vec<Value> {
    p.log().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Every event a watch client printed, flattened, with the response's `initial` flag.
pub fn watched(p: &Proc) -> Vec<Value> {
    printed(p)
        .iter()
        .flat_map(|r| {
            let initial = r["initial"].clone();
            r["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut e| {
                    e["initial"] = initial.clone();
                    e
                })
        })
        .collect()
}

/// Waits until the watch printed an event of `kind` (`ADDED`...) for instance `id`; returns it.
pub fn wait_event(p: &Proc, kind: &str, id: &str) -> Value {
    let mut found = Value::Null;
    super::wait_until(&format!("a {kind} event for {id}"), Duration::from_secs(45), || {
        found = watched(p)
            .into_iter()
            .find(|e| e["type"] == kind && e["id"] == id)
            .unwrap_or(Value::Null);
        !found.is_null()
    });
    found
}

/// Sends `lines` on a new session, closes it, and returns what the client printed.
pub fn session_once(py: &Path, reg: SocketAddr, lines: &[String]) -> Vec<Value> {
    use std::io::Write;
    let mut p = registry_client(py, &["session", &reg.to_string()]);
    let mut stdin = p.child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    p.wait(Duration::from_secs(30));
    printed(&p)
}

/// The client's last line says its stream ended with `code`, with `details` holding `text`.
pub fn assert_ended(printed: &[Value], code: &str, text: &str) {
    let end = printed.last().cloned().unwrap_or(Value::Null);
    assert_eq!(end["end"], code, "{printed:?}");
    assert!(end["details"].as_str().unwrap_or("").contains(text), "{printed:?}");
}

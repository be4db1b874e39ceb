//! Pilot's scale benchmark load client (run it through `bench/pilot`): simulated sidecars that
//! hold ADS streams to Pilot as Envoy does, and a registry that changes under them.
//!
//! ```text
//! xds_load gen --dir D --namespaces 100 --services 100 --instances 10 [--imports]
//!     writes D/services/ns-K.yaml (the file registry) and D/imports.yaml (pilot.yaml's
//!     `sidecar.imports`: each namespace imports itself, like an Istio `Sidecar` with `./*`)
//! xds_load run --target 127.0.0.1:15010 --dir D --sidecars 1000 --namespaces 100
//!     --services 100 --instances 10 [--changes 20] [--timeout 300]
//! ```
//!
//! Each simulated sidecar is one state-of-the-world ADS stream (node
//! `sidecar~IP~load-N.ns-K~ns-K.svc.cluster.local`, metadata `NAMESPACE: ns-K`) that asks, ACKs
//! and follows like Envoy: CDS (wildcard), then EDS for every EDS cluster CDS gave, LDS
//! (wildcard), RDS for `outbound-http`; every response is ACKed at once.
//!
//! Measured and printed as one JSON object:
//! - the full push: from all streams opening at once to the last sidecar holding CDS, EDS, LDS
//!   and RDS;
//! - per change (an instance's port changed in its namespace's registry file, written atomically;
//!   the time counts from the rename): the delay until each sidecar of that namespace received
//!   the EDS response with the new port (it ACKs in the same step), its p50 / p99 over every
//!   (change, sidecar), and per change the last sidecar's delay (p50 / p99 / max);
//! - EDS responses that reached sidecars of other namespaces during the changes (a scoped push
//!   sends them nothing).
//!
//! Everything is on loopback; every wait is bounded.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use tessera_xds::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

#[derive(Clone)]
struct Args {
    dir: PathBuf,
    target: String,
    sidecars: usize,
    namespaces: usize,
    services: usize,
    instances: usize,
    changes: usize,
    timeout: Duration,
    imports: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: xds_load gen --dir D [--namespaces 100] [--services 100] [--instances 10] [--imports]\n       xds_load run --target ADDR --dir D [--sidecars 1000] [--namespaces 100] [--services 100] [--instances 10] [--changes 20] [--timeout 300]"
    );
    std::process::exit(2)
}

fn parse(argv: &[String]) -> Args {
    let mut a = Args {
        dir: PathBuf::new(),
        target: "127.0.0.1:15010".into(),
        sidecars: 1000,
        namespaces: 100,
        services: 100,
        instances: 10,
        changes: 20,
        timeout: Duration::from_secs(300),
        imports: false,
    };
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let mut v = || it.next().cloned().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<usize>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v()),
            "--target" => a.target = v(),
            "--sidecars" => a.sidecars = num(v()),
            "--namespaces" => a.namespaces = num(v()),
            "--services" => a.services = num(v()),
            "--instances" => a.instances = num(v()),
            "--changes" => a.changes = num(v()),
            "--timeout" => a.timeout = Duration::from_secs(num(v()) as u64),
            "--imports" => a.imports = true,
            _ => usage(),
        }
    }
    a
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else { usage() };
    let args = parse(&argv[1..]);
    match cmd.as_str() {
        "gen" => generate(&args),
        "run" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| {
                    eprintln!("xds_load: {e}");
                    std::process::exit(1)
                });
            let out = rt.block_on(run(args));
            println!("{out}");
        }
        _ => usage(),
    }
}

// ------------------------------------------------------------------------------- registry

/// The file of namespace `ns`; `changed`: (service, port) whose first instance listens on `port`.
fn namespace_file(a: &Args, ns: usize, changed: Option<(usize, u16)>) -> String {
    let mut s = String::from("services:\n");
    for svc in 0..a.services {
        s.push_str(&format!(
            "- name: svc-{svc}\n  namespace: ns-{ns}\n  ports: [{{ name: http, port: 80 }}]\n  instances:\n"
        ));
        for i in 0..a.instances {
            let port = match changed {
                Some((c, p)) if c == svc && i == 0 => p,
                _ => 8080,
            };
            s.push_str(&format!(
                "  - {{ address: 10.{}.{}.{}, port: {port} }}\n",
                ns % 256,
                svc % 256,
                (i % 250) + 1
            ));
        }
    }
    s
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        eprintln!("xds_load: cannot write {}: {e}", path.display());
        std::process::exit(1);
    }
}

fn generate(a: &Args) {
    let dir = a.dir.join("services");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("xds_load: {}: {e}", dir.display());
        std::process::exit(1);
    }
    for ns in 0..a.namespaces {
        write_atomic(&dir.join(format!("ns-{ns}.yaml")), &namespace_file(a, ns, None));
    }
    let mut imports = String::from("  imports:\n");
    if a.imports {
        for ns in 0..a.namespaces {
            imports.push_str(&format!("    ns-{ns}: [\"./*\"]\n"));
        }
    } else {
        imports = String::new();
    }
    write_atomic(&a.dir.join("imports.yaml"), &imports);
}

// ------------------------------------------------------------------------------- sidecars

/// The change being watched for: namespace, cluster, new port, when it was written.
#[derive(Clone)]
struct Change {
    id: usize,
    ns: usize,
    cluster: String,
    port: u32,
    at: Instant,
}

#[derive(Default)]
struct Shared {
    change: Mutex<Option<Change>>,
    /// (change id, sidecar) -> delay.
    seen: Mutex<HashMap<(usize, usize), Duration>>,
    initial: Mutex<Vec<Duration>>,
    ready: AtomicUsize,
    reconnects: AtomicU64,
    unaffected_eds: AtomicU64,
    responses: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

fn request(node: &Node, type_url: &str, names: Vec<String>, ack: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.into(),
        resource_names: names,
        version_info: ack.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: ack.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// A sidecar: sessions until told to stop; a broken stream is counted and reopened after a
/// short pause, as Envoy does.
async fn sidecar(idx: usize, ns: usize, a: Args, sh: Arc<Shared>, started: Instant) -> Result<(), String> {
    let mut ready = false;
    while !sh.stop.load(Ordering::Relaxed) {
        match session(idx, ns, &a, &sh, started, &mut ready).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                sh.reconnects.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut errs) = sh.errors.lock() {
                    errs.push(format!("sidecar {idx}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(200 + (idx as u64 * 37) % 800)).await;
            }
        }
    }
    Ok(())
}

async fn session(
    idx: usize,
    ns: usize,
    a: &Args,
    sh: &Shared,
    started: Instant,
    ready: &mut bool,
) -> Result<(), String> {
    let node = Node {
        id: format!(
            "sidecar~10.200.{}.{}~load-{idx}.ns-{ns}~ns-{ns}.svc.cluster.local",
            idx / 250,
            idx % 250 + 1
        ),
        cluster: format!("load.ns-{ns}"),
        metadata: Some(Struct {
            fields: [(
                "NAMESPACE".to_string(),
                Value {
                    kind: Some(Kind::StringValue(format!("ns-{ns}"))),
                },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match tessera_xds::ads::connect_raw(&a.target).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(16);
    let send = |r: DiscoveryRequest| {
        let tx = tx.clone();
        async move { tx.send(r).await.map_err(|_| "request channel closed".to_string()) }
    };
    send(request(&node, CLUSTER, Vec::new(), None)).await?;
    let mut inbound = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("stream: {e}"))?
        .into_inner();
    let mut eds_names: Vec<String> = Vec::new();
    let mut got: BTreeSet<&'static str> = BTreeSet::new();
    while !sh.stop.load(Ordering::Relaxed) {
        let r = match tokio::time::timeout(Duration::from_millis(500), inbound.message()).await {
            Err(_) => continue,
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Err("the stream ended".into()),
            Ok(Err(e)) => return Err(format!("stream: {e}")),
        };
        sh.responses.fetch_add(1, Ordering::Relaxed);
        match r.type_url.as_str() {
            CLUSTER => {
                let mut names: Vec<String> = r
                    .resources
                    .iter()
                    .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                    .filter(|c| {
                        c.cluster_discovery_type
                            == Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32))
                    })
                    .map(|c| c.name)
                    .collect();
                names.sort();
                send(request(&node, CLUSTER, Vec::new(), Some(&r))).await?;
                let first = got.insert("cds");
                if names != eds_names {
                    eds_names = names;
                    send(request(&node, ENDPOINT, eds_names.clone(), None)).await?;
                }
                if first {
                    send(request(&node, LISTENER, Vec::new(), None)).await?;
                }
            }
            ENDPOINT => {
                send(request(&node, ENDPOINT, eds_names.clone(), Some(&r))).await?;
                got.insert("eds");
                let change = sh.change.lock().map(|c| c.clone()).unwrap_or(None);
                if let Some(c) = change {
                    if c.ns != ns {
                        sh.unaffected_eds.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let has = r
                            .resources
                            .iter()
                            .filter_map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).ok())
                            .filter(|cla| cla.cluster_name == c.cluster)
                            .flat_map(|cla| cla.endpoints)
                            .flat_map(|l| l.lb_endpoints)
                            .any(|e| match e.host_identifier {
                                Some(HostIdentifier::Endpoint(ep)) => ep
                                    .address
                                    .and_then(|a| a.address)
                                    .is_some_and(|a| match a {
                                        envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) => {
                                            s.port_specifier
                                                == Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(c.port))
                                        }
                                        _ => false,
                                    }),
                                _ => false,
                            });
                        if has && let Ok(mut seen) = sh.seen.lock() {
                            seen.entry((c.id, idx)).or_insert_with(|| c.at.elapsed());
                        }
                    }
                }
            }
            LISTENER => {
                send(request(&node, LISTENER, Vec::new(), Some(&r))).await?;
                if got.insert("lds") {
                    send(request(&node, ROUTE, vec!["outbound-http".into()], None)).await?;
                }
            }
            ROUTE => {
                send(request(&node, ROUTE, vec!["outbound-http".into()], Some(&r))).await?;
                got.insert("rds");
            }
            _ => {}
        }
        if !*ready && got.len() == 4 {
            *ready = true;
            if let Ok(mut v) = sh.initial.lock() {
                v.push(started.elapsed());
            }
            sh.ready.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

async fn run(a: Args) -> serde_json::Value {
    let sh = Arc::new(Shared::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for idx in 0..a.sidecars {
        let ns = idx % a.namespaces;
        let (a2, sh2) = (a.clone(), sh.clone());
        tasks.push(tokio::spawn(async move {
            let _ = sidecar(idx, ns, a2, sh2, started).await;
        }));
    }
    // Phase 1: every sidecar holds its whole config.
    let deadline = Instant::now() + a.timeout;
    while sh.ready.load(Ordering::Relaxed) < a.sidecars && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = sh.ready.load(Ordering::Relaxed);
    let mut initial: Vec<f64> = sh
        .initial
        .lock()
        .map(|v| v.iter().map(Duration::as_secs_f64).collect())
        .unwrap_or_default();
    let full_push = initial.iter().cloned().fold(0.0, f64::max);
    let initial_p50 = pct(&mut initial, 50.0);
    eprintln!(
        "xds_load: {ready}/{} sidecars hold their config after {full_push:.2}s",
        a.sidecars
    );
    // Let the initial wave settle before measuring changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let responses_before = sh.responses.load(Ordering::Relaxed);
    let per_ns = |ns: usize| (0..a.sidecars).filter(|i| i % a.namespaces == ns).count();
    let mut last_per_change = Vec::new();
    let mut missing = 0usize;
    for id in 0..a.changes {
        let ns = (id * 7) % a.namespaces;
        let svc = (id * 13) % a.services;
        let port = 40000 + id as u16;
        let text = namespace_file(&a, ns, Some((svc, port)));
        let path = a.dir.join("services").join(format!("ns-{ns}.yaml"));
        let cluster = format!("outbound|80||svc-{svc}.ns-{ns}.svc.cluster.local");
        // Written first to a temporary name, so the clock starts at the rename.
        let tmp = path.with_extension("yaml.tmp");
        if let Err(e) = std::fs::write(&tmp, &text) {
            eprintln!("xds_load: {e}");
            break;
        }
        let at = Instant::now();
        if let Ok(mut c) = sh.change.lock() {
            *c = Some(Change {
                id,
                ns,
                cluster,
                port: u32::from(port),
                at,
            });
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            eprintln!("xds_load: {e}");
            break;
        }
        let want = per_ns(ns);
        let limit = Instant::now() + Duration::from_secs(10);
        loop {
            let n = sh
                .seen
                .lock()
                .map(|s| s.keys().filter(|(c, _)| *c == id).count())
                .unwrap_or(0);
            if n >= want || Instant::now() > limit {
                missing += want.saturating_sub(n);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let last = sh
            .seen
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|((c, _), _)| *c == id)
                    .map(|(_, d)| d.as_secs_f64())
                    .fold(0.0, f64::max)
            })
            .unwrap_or(0.0);
        last_per_change.push(last);
        // Quiet between changes, so each is its own push.
        tokio::time::sleep(Duration::from_millis(400)).await;
        if let Ok(mut c) = sh.change.lock() {
            *c = None;
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let mut all: Vec<f64> = sh
        .seen
        .lock()
        .map(|s| s.values().map(Duration::as_secs_f64).collect())
        .unwrap_or_default();
    let mut lasts = last_per_change.clone();
    let errors = sh.errors.lock().map(|e| e.clone()).unwrap_or_default();
    // Errors after the stop (streams cut by the shutdown) are not the run's.
    serde_json::json!({
        "sidecars": a.sidecars,
        "namespaces": a.namespaces,
        "services": a.namespaces * a.services,
        "instances": a.namespaces * a.services * a.instances,
        "ready": ready,
        "full_push_s": full_push,
        "initial_p50_s": initial_p50,
        "changes": a.changes,
        "affected_per_change": per_ns(0),
        "convergence_samples": all.len(),
        "convergence_p50_ms": pct(&mut all, 50.0) * 1000.0,
        "convergence_p99_ms": pct(&mut all, 99.0) * 1000.0,
        "last_sidecar_p50_ms": pct(&mut lasts, 50.0) * 1000.0,
        "last_sidecar_p99_ms": pct(&mut lasts, 99.0) * 1000.0,
        "last_sidecar_max_ms": last_per_change.iter().cloned().fold(0.0, f64::max) * 1000.0,
        "missing": missing,
        "unaffected_eds_responses": sh.unaffected_eds.load(Ordering::Relaxed),
        "responses_during_changes": sh.responses.load(Ordering::Relaxed) - responses_before,
        "errors": errors.iter().take(5).collect::<Vec<_>>(),
        "reconnects": sh.reconnects.load(Ordering::Relaxed),
    })
}

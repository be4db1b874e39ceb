//! The xDS benchmark (run it through `bench/xds`): an EDS push of N endpoints across M clusters,
//! applied by Tessera and by Envoy 1.40 from the same snapshot-cache ADS server
//! (`tessera_xds::server`), while a probe sends keep-alive requests through each proxy.
//!
//! Measured per target: the time from the server sending the push to the proxy's ACK (both
//! proxies ACK after applying), the probe's latency during pushes against between them, requests
//! that failed, and memory with the whole config loaded (RSS; for Envoy also its `/memory`).
//!
//! Everything listens on 127.0.0.1; every phase is bounded in time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::google::protobuf::Any;
use serde_json::json;
use tessera_xds::server::{AdsServer, CLUSTER, ENDPOINT, LISTENER, ROUTE, Req, any};

struct Args {
    tessera: PathBuf,
    envoy: Option<PathBuf>,
    clusters: usize,
    endpoints: usize,
    updates: usize,
    out: Option<PathBuf>,
    pin: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: eds_bench --tessera PATH [--envoy PATH] [--clusters 1000] [--endpoints 10000] [--updates 5] [--out FILE.json] [--no-pin]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        tessera: PathBuf::new(),
        envoy: None,
        clusters: 1000,
        endpoints: 10_000,
        updates: 5,
        out: None,
        pin: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--tessera" => a.tessera = v().into(),
            "--envoy" => a.envoy = Some(v().into()),
            "--clusters" => a.clusters = v().parse().unwrap_or_else(|_| usage()),
            "--endpoints" => a.endpoints = v().parse().unwrap_or_else(|_| usage()),
            "--updates" => a.updates = v().parse().unwrap_or_else(|_| usage()),
            "--out" => a.out = Some(v().into()),
            "--no-pin" => a.pin = false,
            _ => usage(),
        }
    }
    if a.tessera.as_os_str().is_empty() || a.clusters == 0 || a.endpoints < a.clusters {
        usage()
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    )
}

/// The proxy on CPU 0 when pinning (this process and its probe run where `bench/xds` put them).
fn proxy_cmd(pin: bool, program: &Path) -> Command {
    if pin && Path::new("/usr/bin/taskset").exists() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One HTTP/1.1 GET on a kept-alive connection; the status code.
fn get(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok(status);
    }
}

/// Requests through `addr` until `stop`, one at a time; (start, latency, ok) of each.
fn probe(addr: SocketAddr, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<(Instant, Duration, bool)> {
    let mut out = Vec::with_capacity(200_000);
    let mut buf = Vec::with_capacity(8192);
    let mut conn: Option<TcpStream> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(c) => {
                    let _ = c.set_nodelay(true);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    conn.insert(c)
                }
                Err(_) => {
                    out.push((t, t.elapsed(), false));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let ok = matches!(get(c, &mut buf), Ok(200));
        if !ok {
            conn = None;
        }
        out.push((t, t.elapsed(), ok));
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Endpoints of every cluster for push `round`: `total` spread evenly, on 127.1.0.0/16 (never
/// connected to: the probe only uses the `live` cluster).
fn assignments(clusters: usize, total: usize, round: usize) -> Vec<Any> {
    let per = total / clusters;
    (0..clusters)
        .map(|c| {
            let eps: Vec<_> = (0..per)
                .map(|e| {
                    let n = c * per + e;
                    let ip = format!("127.1.{}.{}", (n / 250) % 250, n % 250 + 1);
                    json!({"endpoint": {"address": {"socket_address": {"address": ip, "port_value": 10_000 + round}}}})
                })
                .collect();
            any(
                ENDPOINT,
                json!({"cluster_name": format!("c{c}"), "endpoints": [{"lb_endpoints": eps}]}),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

fn bootstrap(ads: SocketAddr, admin: u16) -> String {
    tessera_xds::bootstrap::ads_bootstrap_yaml("bench", "bench", ads, Some(admin), "GRPC")
}

struct Outcome {
    target: &'static str,
    initial_ms: f64,
    push_ms: Vec<f64>,
    steady: Vec<Duration>,
    during: Vec<Duration>,
    failed: usize,
    requests: usize,
    rss_kib: u64,
    envoy_allocated: Option<u64>,
}

fn acked_at(reqs: &[Req], type_url: &str, version: &str) -> Option<Instant> {
    reqs.iter()
        .find(|r| r.type_url == type_url && r.version == version && !r.nonce.is_empty() && r.error.is_none())
        .map(|r| r.at)
}

fn run(target: &'static str, program: &Path, a: &Args, backend: SocketAddr, dir: &Path) -> Outcome {
    let ads = AdsServer::start(0).unwrap_or_else(|e| panic!("ADS server: {e}"));
    let listen = free_port();
    let admin = free_port();
    let mut clusters: Vec<_> = (0..a.clusters)
        .map(|c| {
            any(
                CLUSTER,
                json!({"name": format!("c{c}"), "type": "EDS", "connect_timeout": "1s",
                       "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}),
            )
        })
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    clusters.push(
        any(
            CLUSTER,
            json!({"name": "live", "type": "EDS", "connect_timeout": "1s",
                   "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}),
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let live = any(
        ENDPOINT,
        json!({"cluster_name": "live", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend.port()}}}}]}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let eds = |round: usize| {
        let mut v = assignments(a.clusters, a.endpoints, round);
        v.push(live.clone());
        v
    };
    let listener = any(
        LISTENER,
        json!({"name": "ingress", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                 "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                   "stat_prefix": "ingress", "generate_request_id": false,
                   "rds": {"route_config_name": "routes", "config_source": {"ads": {}, "resource_api_version": "V3"}},
                   "http_filters": [{"name": "envoy.filters.http.router",
                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let routes = any(
        ROUTE,
        json!({"name": "routes", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "live"}}]}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    ads.set_all(vec![
        (CLUSTER, "1", clusters),
        (ENDPOINT, "1", eds(1)),
        (LISTENER, "1", vec![listener]),
        (ROUTE, "1", vec![routes]),
    ]);
    let boot = dir.join(format!("{target}.yaml"));
    std::fs::write(&boot, bootstrap(ads.addr, admin)).unwrap_or_else(|e| panic!("{}: {e}", boot.display()));
    let started = Instant::now();
    let child = match target {
        "envoy" => spawn(proxy_cmd(a.pin, program).args([
            "-c",
            boot.to_str().unwrap_or_default(),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "error",
            "--base-id",
            &(listen % 60_000 + 1000).to_string(),
        ])),
        _ => spawn(proxy_cmd(a.pin, program).args([
            "sidecar",
            "--envoy-bootstrap",
            boot.to_str().unwrap_or_default(),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ])),
    };
    let pid = child.0.id();
    let limit = Duration::from_secs(60);
    ads.wait_for("the route ACK", limit, |r| {
        r.type_url == ROUTE && r.version == "1" && !r.nonce.is_empty()
    })
    .unwrap_or_else(|e| panic!("{target}: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let deadline = Instant::now() + limit;
    loop {
        let ok = TcpStream::connect(addr)
            .ok()
            .and_then(|mut c| get(&mut c, &mut Vec::new()).ok())
            == Some(200);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "{target} never served the route");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reqs = ads.requests();
    let first = ads
        .sent()
        .into_iter()
        .find(|s| s.type_url == CLUSTER)
        .map(|s| s.at)
        .unwrap_or(started);
    let initial_ms = acked_at(&reqs, ROUTE, "1").map_or(f64::NAN, |t| (t - first).as_secs_f64() * 1e3);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || probe(addr, stop))
    };
    std::thread::sleep(Duration::from_secs(1));
    let mut windows = Vec::new();
    let mut push_ms = Vec::new();
    for round in 2..a.updates + 2 {
        let v = round.to_string();
        ads.set(ENDPOINT, &v, eds(round));
        let r = ads
            .wait_for("the EDS ACK", limit, |r| {
                r.type_url == ENDPOINT && r.version == v && !r.nonce.is_empty()
            })
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        let sent = ads
            .sent()
            .into_iter()
            .find(|s| s.type_url == ENDPOINT && s.version == v)
            .map(|s| s.at)
            .unwrap_or(r.at);
        push_ms.push((r.at - sent).as_secs_f64() * 1e3);
        windows.push((sent, r.at + Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(700));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = probe_thread.join().unwrap_or_default();
    let rss = rss_kib(pid);
    let envoy_allocated = (target == "envoy")
        .then(|| {
            let mut c = TcpStream::connect(("127.0.0.1", admin)).ok()?;
            c.write_all(b"GET /memory HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut s = String::new();
            c.read_to_string(&mut s).ok()?;
            // One small JSON object, whatever the framing (Envoy may chunk it).
            let body = &s[s.find('{')?..=s.rfind('}')?];
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            v["allocated"].as_str()?.parse().ok()
        })
        .flatten();
    let mut steady = Vec::new();
    let mut during = Vec::new();
    let mut failed = 0;
    for (t, d, ok) in &samples {
        if !ok {
            failed += 1;
        }
        if windows.iter().any(|(a, b)| *t >= *a && *t <= *b) {
            during.push(*d);
        } else {
            steady.push(*d);
        }
    }
    steady.sort();
    during.sort();
    drop(child);
    Outcome {
        target,
        initial_ms,
        push_ms,
        steady,
        during,
        failed,
        requests: samples.len(),
        rss_kib: rss,
        envoy_allocated,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { f64::NAN } else { s[s.len() / 2] }
}

fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("tessera-eds-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let backend_port = free_port();
    let _backend =
        spawn(proxy_cmd(false, &a.tessera).args(["sample-service", "--listen", &format!("127.0.0.1:{backend_port}")]));
    let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(backend).is_err() {
        assert!(Instant::now() < deadline, "the sample service did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut outcomes = vec![run("tessera", &a.tessera, &a, backend, &dir)];
    if let Some(e) = &a.envoy {
        outcomes.push(run("envoy", e, &a, backend, &dir));
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "EDS: {} endpoints across {} clusters (+1 live cluster), {} pushes, one worker each\n",
        a.endpoints, a.clusters, a.updates
    );
    println!(
        "| target | initial config to ACK (ms) | EDS push to ACK, median [min-max] (ms) | probe p50 / p99 / max between pushes (µs) | during pushes (µs) | failed / requests | RSS (MiB) | Envoy /memory allocated (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut json_out = Vec::new();
    for o in &outcomes {
        let (lo, hi) = o
            .push_ms
            .iter()
            .fold((f64::MAX, 0.0f64), |(l, h), x| (l.min(*x), h.max(*x)));
        println!(
            "| {} | {:.0} | {:.1} [{:.1}-{:.1}] | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {} / {} | {:.1} | {} |",
            o.target,
            o.initial_ms,
            median(&o.push_ms),
            lo,
            hi,
            pct(&o.steady, 0.5),
            pct(&o.steady, 0.99),
            pct(&o.steady, 1.0),
            pct(&o.during, 0.5),
            pct(&o.during, 0.99),
            pct(&o.during, 1.0),
            o.failed,
            o.requests,
            o.rss_kib as f64 / 1024.0,
            o.envoy_allocated
                .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0)),
        );
        json_out.push(json!({
            "target": o.target, "initial_ms": o.initial_ms, "push_ms": o.push_ms,
            "steady_us": {"p50": pct(&o.steady, 0.5), "p99": pct(&o.steady, 0.99), "max": pct(&o.steady, 1.0), "n": o.steady.len()},
            "during_us": {"p50": pct(&o.during, 0.5), "p99": pct(&o.during, 0.99), "max": pct(&o.during, 1.0), "n": o.during.len()},
            "failed": o.failed, "requests": o.requests, "rss_kib": o.rss_kib, "envoy_allocated": o.envoy_allocated,
        }));
    }
    if let Some(out) = &a.out {
        let doc = json!({"clusters": a.clusters, "endpoints": a.endpoints, "updates": a.updates, "results": json_out});
        std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    }
    if outcomes.iter().any(|o| o.failed > 0) {
        eprintln!("requests failed during the pushes");
        std::process::exit(1);
    }
}

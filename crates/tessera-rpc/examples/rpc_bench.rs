//! The benchmark's RPC echo server and load generator (bench/run's `bolt` and `dubbo` scenarios).
//!
//! ```text
//! rpc_bench server --protocol bolt|dubbo --listen 127.0.0.1:PORT
//! rpc_bench load   --protocol bolt|dubbo --target 127.0.0.1:PORT [--connections 50] [--depth 8] [--duration 10]
//!                  [--requests N]   (stop after N requests in all, spread over the connections)
//! ```
//!
//! The server answers every request at once with a small success response under the request's id
//! (and heartbeats with their reply); the Node and Python peers of the interop tests are far too
//! slow to measure a proxy with. The load generator keeps `depth` requests in flight on each of
//! `connections` connections (one thread each, blocking I/O), checks that every response carries
//! an id it is waiting for and a success status, and prints one JSON line:
//! `{"requests":N,"errors":E,"seconds":S,"rps":R,"p50_us":..,"p99_us":..,"p999_us":..}`.
//! Both use the same codecs as the sidecar, so a codec bug shows as errors here too.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tessera_rpc::bolt::{self, Bolt};
use tessera_rpc::dubbo::{self, Dubbo};
use tessera_rpc::hessian::{Dialect, Writer};
use tessera_rpc::{Codec, Kind, Limits, Protocol};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let protocol = get("--protocol", "bolt");
    if protocol != "bolt" && protocol != "dubbo" {
        usage("--protocol is bolt or dubbo");
    }
    match args.first().map(String::as_str) {
        Some("server") => server(&protocol, &get("--listen", "127.0.0.1:0")),
        Some("load") => {
            let num = |name: &str, default: &str| get(name, default).parse::<u64>().unwrap_or_else(|_| usage(name));
            load(
                &protocol,
                &get("--target", ""),
                num("--connections", "50") as usize,
                num("--depth", "8") as usize,
                Duration::from_secs(num("--duration", "10")),
                num("--requests", "0"),
            )
        }
        _ => usage("server or load"),
    }
}

fn usage(what: &str) -> ! {
    eprintln!("rpc_bench: bad arguments ({what}); see the source's header");
    std::process::exit(2)
}

fn codec(protocol: &str) -> Box<dyn Codec> {
    if protocol == "bolt" {
        Box::new(Bolt)
    } else {
        Box::new(Dubbo)
    }
}

// ------------------------------------------------------------------------------- server

fn server(protocol: &str, listen: &str) {
    let l = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("rpc_bench: bind {listen}: {e}");
        std::process::exit(1)
    });
    println!("listening {}", l.local_addr().map(|a| a.port()).unwrap_or(0));
    let _ = std::io::stdout().flush();
    for conn in l.incoming().flatten() {
        let protocol = protocol.to_string();
        std::thread::spawn(move || serve(&protocol, conn));
    }
}

/// The success response to `id`: SOFARPC's SofaResponse with a short string, or Dubbo's
/// "value" flag and a short string.
fn response(protocol: &str, proto: Protocol, id: u64) -> Bytes {
    if protocol == "bolt" {
        let mut w = Writer::new(Dialect::Draft);
        w.object(
            bolt::SOFA_RESPONSE,
            &["isError", "errorMsg", "appResponse", "responseProps"],
        )
        .bool(false)
        .null()
        .string("pong")
        .null();
        let body = w.into_vec();
        bolt::Message {
            class: bolt::SOFA_RESPONSE.as_bytes(),
            content: &body,
            ..bolt::Message::new(proto, Kind::Response, id as u32)
        }
        .encode()
    } else {
        let mut w = Writer::new(Dialect::Final);
        w.int(1).string("pong");
        dubbo::encode_response(id, dubbo::STATUS_OK, &w.into_vec())
    }
}

fn serve(protocol: &str, mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let c = codec(protocol);
    let limits = Limits::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match c.decode(&mut buf, &limits) {
                Ok(Some(f)) => match f.kind {
                    Kind::Request => out.extend_from_slice(&response(protocol, f.protocol, f.request_id)),
                    Kind::Heartbeat => out.extend_from_slice(&c.heartbeat_reply(&f)),
                    _ => {}
                },
                Ok(None) => break,
                Err(e) => {
                    eprintln!("rpc_bench server: {e}; closing");
                    return;
                }
            }
        }
        if !out.is_empty() {
            if conn.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

// ------------------------------------------------------------------------------- load

/// A request template and where its id sits, so each request is a copy with the id patched in.
struct Template {
    bytes: Vec<u8>,
    id_at: usize,
    id_len: usize,
}

fn template(protocol: &str) -> Template {
    if protocol == "bolt" {
        let service = "com.example.EchoService:1.0";
        let mut body = bolt::sofa_request_body(Dialect::Draft, service, "echo", &["java.lang.String"]);
        let mut w = Writer::new(Dialect::Draft);
        w.string("ping");
        body.extend_from_slice(&w.into_vec());
        let bytes = bolt::Message {
            class: bolt::SOFA_REQUEST.as_bytes(),
            headers: &[("service", service), ("sofa_head_method_name", "echo")],
            content: &body,
            timeout_ms: 3000,
            ..bolt::Message::new(Protocol::BoltV1, Kind::Request, 0)
        }
        .encode();
        Template {
            bytes: bytes.to_vec(),
            id_at: 5,
            id_len: 4,
        }
    } else {
        let mut w = Writer::new(Dialect::Final);
        w.string("ping");
        let args = w.into_vec();
        let iface = "org.apache.dubbo.demo.EchoService";
        let bytes = dubbo::Request {
            id: 0,
            dubbo_version: "2.0.2",
            path: iface,
            version: "0.0.0",
            method: "echo",
            descriptor: "Ljava/lang/String;",
            args: &args,
            attachments: &[("path", iface), ("interface", iface), ("version", "0.0.0")],
            twoway: true,
        }
        .encode();
        Template {
            bytes: bytes.to_vec(),
            id_at: 4,
            id_len: 8,
        }
    }
}

impl Template {
    fn put(&self, out: &mut Vec<u8>, id: u64) {
        let at = out.len() + self.id_at;
        out.extend_from_slice(&self.bytes);
        let be = id.to_be_bytes();
        out[at..at + self.id_len].copy_from_slice(&be[8 - self.id_len..]);
    }
}

struct Outcome {
    latencies_us: Vec<u32>,
    errors: u64,
}

fn load(protocol: &str, target: &str, connections: usize, depth: usize, duration: Duration, requests: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let conns = connections.max(1) as u64;
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let (protocol, target, stop) = (protocol.to_string(), target.to_string(), stop.clone());
            // With --requests, connection i sends its share (the first ones take the remainder).
            let quota = (requests > 0).then(|| requests / conns + u64::from(i < requests % conns));
            std::thread::spawn(move || drive(&protocol, &target, depth, &stop, quota))
        })
        .collect();
    if requests == 0 {
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in threads {
        match t.join() {
            Ok(o) => {
                lat.extend(o.latencies_us);
                errors += o.errors;
            }
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64().min(duration.as_secs_f64() + 0.001);
    lat.sort_unstable();
    let pct = |q: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((q / 100.0 * lat.len() as f64).round() as usize).clamp(1, lat.len()) - 1;
        lat[i]
    };
    println!(
        "{{\"requests\":{},\"errors\":{},\"seconds\":{:.3},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{}}}",
        lat.len(),
        errors,
        secs,
        lat.len() as f64 / secs,
        pct(50.0),
        pct(99.0),
        pct(99.9)
    );
}

/// One connection: `depth` requests in flight until `stop` (or `quota` requests), then the
/// stragglers (up to 2 s).
fn drive(protocol: &str, target: &str, depth: usize, stop: &AtomicBool, quota: Option<u64>) -> Outcome {
    let mut o = Outcome {
        latencies_us: Vec::with_capacity(1 << 16),
        errors: 0,
    };
    let Ok(mut conn) = TcpStream::connect(target) else {
        o.errors += 1;
        return o;
    };
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let c = codec(protocol);
    let ok_status = if protocol == "bolt" {
        bolt::STATUS_SUCCESS
    } else {
        u16::from(dubbo::STATUS_OK)
    };
    let t = template(protocol);
    let limits = Limits::default();
    let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(depth * 2);
    let mut next_id = 1u64;
    let more = |next_id: u64| !stop.load(Ordering::Relaxed) && quota.is_none_or(|q| next_id <= q);
    let mut out = Vec::with_capacity(t.bytes.len() * depth);
    for _ in 0..depth {
        if !more(next_id) {
            break;
        }
        t.put(&mut out, next_id);
        sent.insert(next_id, Instant::now());
        next_id += 1;
    }
    if conn.write_all(&out).is_err() {
        o.errors += 1;
        return o;
    }
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    while !sent.is_empty() {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => {
                o.errors += sent.len() as u64;
                return o;
            }
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        loop {
            let f = match c.decode(&mut buf, &limits) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    o.errors += sent.len() as u64;
                    return o;
                }
            };
            match sent.remove(&f.request_id) {
                Some(at) if f.status == Some(ok_status) => o
                    .latencies_us
                    .push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                _ => o.errors += 1,
            }
            if more(next_id) {
                t.put(&mut out, next_id);
                sent.insert(next_id, Instant::now());
                next_id += 1;
            }
        }
        if !out.is_empty() && conn.write_all(&out).is_err() {
            o.errors += sent.len() as u64;
            return o;
        }
    }
    o
}

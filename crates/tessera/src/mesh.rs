//! `tessera up` with `pilot:` in the mesh file: a whole mesh in one process.
//!
//! 1. Pilot on its embedded store (redb), its ADS server, registry API and admin API;
//! 2. each sample service (HTTP or Dubbo) on its address;
//! 3. each service registered through Pilot's registry REST API, its instance at its sidecar's
//!    inbound address (where other sidecars reach it);
//! 4. one sidecar per service, fed by Pilot over ADS, which declares its inbound port in its node
//!    metadata (`TESSERA_INBOUND`) and has no outbound listeners (`TESSERA_OUTBOUND: none`);
//! 5. a client sidecar with the outbound listeners;
//! 6. the `curl` line, printed once a request went client -> sidecar -> sidecar -> service.
//!
//! Ctrl-C (or SIGTERM) drains the sidecars and stops Pilot.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use tessera_model::{MeshSpec, SampleProtocol};
use tessera_proxy::{Options, Server};

use crate::{NodeFlags, Source};

/// A temporary directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One sidecar to start: its node identity.
struct SidecarPlan {
    label: String,
    node_id: String,
    meta: Vec<String>,
    admin: Option<SocketAddr>,
}

/// One HTTP/1.1 request to `connect` with `host` as its Host header; the status and body.
async fn request(connect: &str, method: &str, path: &str, host: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(connect).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// A request to the registry API at `api`.
async fn http(api: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let at = api.to_string();
    request(&at, method, path, &at, body).await
}

/// A GET through a proxy with a Host header; the answer's status and body.
async fn get_via(proxy: SocketAddr, host: &str) -> anyhow::Result<(u16, String)> {
    request(&proxy.to_string(), "GET", "/", host, "").await
}

async fn register(api: SocketAddr, ns: &str, s: &tessera_model::SampleService) -> anyhow::Result<()> {
    let inbound = s
        .inbound
        .context("a service under Pilot needs `sidecar: { inbound: ADDR }`")?;
    let (port_name, protocol, port) = match s.protocol {
        SampleProtocol::Http => ("http", "http", 80),
        SampleProtocol::Dubbo => ("dubbo", "dubbo", 20880),
    };
    let labels = match (&s.protocol, &s.interface) {
        (SampleProtocol::Dubbo, Some(i)) => format!(r#", "labels": {{"interface": "{i}"}}"#),
        _ => String::new(),
    };
    let base = format!("/v1/namespaces/{ns}/services/{}", s.name);
    let body = format!(r#"{{"ports": [{{"name": "{port_name}", "port": {port}, "protocol": "{protocol}"}}]{labels}}}"#);
    let (code, text) = http(api, "PUT", &base, &body).await?;
    anyhow::ensure!(code < 300, "registering service `{}`: {code} {text}", s.name);
    let body = format!(r#"{{"address": "{}", "port": {}}}"#, inbound.ip(), inbound.port());
    let (code, text) = http(api, "PUT", &format!("{base}/instances/{}-1", s.name), &body).await?;
    anyhow::ensure!(code < 300, "registering an instance of `{}`: {code} {text}", s.name);
    Ok(())
}

/// Runs the mesh until Ctrl-C.
pub(crate) async fn up(spec: MeshSpec, file: &Path) -> anyhow::Result<()> {
    let Some(pilot) = spec.pilot.clone() else {
        anyhow::bail!("{}: no `pilot:`", file.display());
    };
    let ns = spec.namespace.clone();
    let scratch = Scratch(std::env::temp_dir().join(format!("tessera-up-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).with_context(|| format!("cannot create {}", scratch.0.display()))?;
    let store = pilot.store.clone().unwrap_or_else(|| scratch.0.join("pilot.redb"));
    let client = spec.client.clone().unwrap_or(tessera_model::ClientSpec {
        outbound_http: SocketAddr::from(([127, 0, 0, 1], 15001)),
        outbound_dubbo: None,
        admin: None,
    });
    let dubbo_line = client
        .outbound_dubbo
        .map(|a| format!("  outbound_dubbo: \"{a}\"\n"))
        .unwrap_or_default();
    let pilot_yaml = format!(
        "xds: {{ listen: \"{}\" }}\nregistries: {{ api: {{ listen: \"{}\" }} }}\nstore: {{ path: \"{}\" }}\nadmin: {{ listen: \"{}\" }}\nsidecar:\n  outbound_http: \"{}\"\n{dubbo_line}",
        pilot.xds,
        pilot.api,
        store.display(),
        pilot.admin,
        client.outbound_http,
    );
    let cfg = tessera_pilot::config::Config::from_yaml(&pilot_yaml, &format!("{} (pilot)", file.display()), &scratch.0)
        .map_err(|p| {
            let list: Vec<String> = p.iter().map(|p| format!("  {p}")).collect();
            anyhow::anyhow!("pilot:\n{}", list.join("\n"))
        })?;
    // The ADS server starts a runtime of its own: not from inside this one.
    let ads = {
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || tessera_pilot::run::listen(&c))
            .await?
            .map_err(|e| anyhow::anyhow!("pilot: {e}"))?
    };
    let xds = ads.addr;
    let pilot_task = tokio::spawn(tessera_pilot::run::run(cfg, ads));
    println!("tessera up: {}", file.display());
    println!(
        "  pilot    xDS {xds}   registry http://{}/v1/services   admin http://{}/debug/syncz",
        pilot.api, pilot.admin
    );

    // Services, then their registration (the API may take a moment to listen).
    let mut plans = Vec::new();
    for s in &spec.services {
        let addr = match s.protocol {
            SampleProtocol::Http => crate::sample::start(s.address, s.name.clone()).await?,
            SampleProtocol::Dubbo => crate::sample::start_dubbo(s.address, s.name.clone()).await?,
        };
        let inbound = s.inbound.with_context(|| {
            format!(
                "{}: service `{}`: `sidecar: {{ inbound: ADDR }}` is required under Pilot",
                file.display(),
                s.name
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match register(pilot.api, &ns, s).await {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "registry API not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.context("cannot register with Pilot")),
            }
        }
        let kind = match s.protocol {
            SampleProtocol::Http => "http",
            SampleProtocol::Dubbo => "dubbo",
        };
        println!(
            "  service  {:<10} {kind:<5} app {addr}   sidecar inbound {inbound}{}",
            s.name,
            s.interface.as_ref().map(|i| format!("   ({i})")).unwrap_or_default()
        );
        plans.push(SidecarPlan {
            label: s.name.clone(),
            node_id: format!("sidecar~{}~{}-1.{ns}~{ns}.svc.cluster.local", inbound.ip(), s.name),
            meta: vec![
                format!("NAMESPACE={ns}"),
                format!("{}={inbound}={addr}", tessera_pilot::scope::INBOUND_KEY),
                format!("{}=none", tessera_pilot::scope::OUTBOUND_KEY),
            ],
            admin: None,
        });
    }
    plans.push(SidecarPlan {
        label: "client".into(),
        node_id: format!("sidecar~127.0.0.1~client-1.{ns}~{ns}.svc.cluster.local"),
        meta: vec![format!("NAMESPACE={ns}")],
        admin: client.admin,
    });

    // The sidecars, each with its ADS client.
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for p in &plans {
        let boot = scratch.0.join(format!("{}.yaml", p.label));
        let text =
            tessera_xds::bootstrap::ads_bootstrap_yaml(&p.node_id, &p.label, xds, p.admin.map(|a| a.port()), "GRPC");
        std::fs::write(&boot, text).with_context(|| format!("cannot write {}", boot.display()))?;
        let src = Source::Envoy(boot.clone());
        let mut cfg = crate::load(&src).await?;
        let flags = NodeFlags {
            meta: p.meta.clone(),
            ..NodeFlags::default()
        };
        let d = crate::xds::dynamic(&boot, &flags, &mut cfg)?.context("the generated bootstrap has no ADS")?;
        let base = cfg.clone();
        let opts = Options {
            concurrency: 1,
            ..Options::default()
        };
        let server = Server::start(cfg, opts)
            .await
            .with_context(|| format!("cannot start the sidecar of {}", p.label))?;
        clients.push((crate::xds::settings(d, base)?, p.label.clone()));
        servers.push(server);
    }
    let running: Vec<Pin<Box<dyn Future<Output = String> + '_>>> = clients
        .into_iter()
        .zip(&servers)
        .map(|((settings, label), server)| {
            let c = tessera_xds::ads::Client::new(settings, crate::xds::ToProxy(server));
            Box::pin(async move {
                c.run().await;
                label
            }) as Pin<Box<dyn Future<Output = String> + '_>>
        })
        .collect();
    let http_target = spec
        .services
        .iter()
        .find(|s| s.protocol == SampleProtocol::Http)
        .map(|s| format!("{}.{ns}", s.name));
    let dubbo_target = spec
        .services
        .iter()
        .find(|s| s.protocol == SampleProtocol::Dubbo)
        .map(|s| s.interface.clone().unwrap_or_else(|| s.name.clone()));
    let announce = async {
        println!(
            "  sidecar  client     outbound http {}{}{}",
            client.outbound_http,
            client
                .outbound_dubbo
                .map(|a| format!(", dubbo {a}"))
                .unwrap_or_default(),
            client
                .admin
                .map(|a| format!("   admin http://{a}/"))
                .unwrap_or_default()
        );
        // Wait (bounded) until a request makes the whole trip, so the line printed works.
        if let Some(host) = &http_target {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match get_via(client.outbound_http, host).await {
                    Ok((200, _)) => break,
                    _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Ok((code, body)) => {
                        println!("  (the mesh is not routing yet: {code} {})", body.trim());
                        break;
                    }
                    Err(e) => {
                        println!("  (the mesh is not routing yet: {e})");
                        break;
                    }
                }
            }
            println!("try: curl -H 'Host: {host}' http://{}/", client.outbound_http);
        }
        if let (Some(iface), Some(at)) = (&dubbo_target, client.outbound_dubbo) {
            // The Dubbo path is configured by pushes of its own: wait (bounded) for it too.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match crate::sample::call_dubbo(at, iface, "sayHello", Duration::from_secs(2)).await {
                    Ok(_) => break,
                    Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => {
                        println!("  (the mesh is not routing Dubbo yet: {e})");
                        break;
                    }
                }
            }
            println!("     tessera call dubbo {at} {iface} sayHello");
        }
        println!("Ctrl-C stops the mesh.");
        std::future::pending::<()>().await;
    };
    let any_client_ended = select_first(running);
    let reason = tokio::select! {
        r = crate::wait_for_stop(servers.first()) => { r?; "stop requested".to_string() }
        label = any_client_ended => format!("the ADS client of {label} ended"),
        () = announce => unreachable!("announce never ends"),
        r = pilot_task => format!("pilot stopped: {r:?}"),
    };
    tracing::info!(%reason, "stopping the mesh");
    for s in servers {
        s.shutdown(Duration::from_millis(500)).await;
    }
    drop(scratch);
    Ok(())
}

/// The output of whichever future ends first.
async fn select_first<T>(mut futs: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> T {
    if futs.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for f in &mut futs {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

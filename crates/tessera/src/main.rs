//! The `tessera` binary: command line, process lifecycle (signals, reload, drain) and wiring.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tessera_model::{Config, LoadError, MeshSpec};
use tessera_proxy::{Options, Server};
use tokio::signal::unix::{SignalKind, signal};

mod mesh;
mod sample;
mod xds;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera service mesh: sidecar, edge sidecar and Pilot"
)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `tessera_proxy=trace` (RUST_LOG works too).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar on a static config file; SIGHUP or editing the file reloads it.
    Sidecar {
        /// The config file.
        #[arg(
            long,
            short,
            required_unless_present = "envoy_bootstrap",
            conflicts_with = "envoy_bootstrap"
        )]
        config: Option<PathBuf>,
        /// An Envoy v3 bootstrap (YAML or JSON) to run instead: its static resources, where
        /// Tessera supports them (docs/xds.md).
        #[arg(long)]
        envoy_bootstrap: Option<PathBuf>,
        /// Worker threads (default: number of cores).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Admin API address, overriding the config's.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// How long SIGTERM waits for in-flight requests, overriding the config's `drain_time`.
        #[arg(long, value_parser = parse_duration)]
        drain_time: Option<Duration>,
        /// How often to look for changes to the config file (0 turns watching off). A bootstrap
        /// with `dynamic_resources` is not watched: the control plane owns the configuration.
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        watch_interval: Duration,
        #[command(flatten)]
        node: NodeFlags,
    },
    /// Validate config files; print every error and exit 1 if there are any.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The files are Envoy v3 bootstraps: each loads, or every unsupported field is listed.
        #[arg(long)]
        envoy_bootstrap: bool,
    },
    /// Run Pilot: services from registries (the file registry so far) served over ADS to every
    /// sidecar (issue 9, in progress; docs/pilot.md).
    Pilot {
        /// The config file (pilot.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a local mesh (sample services and sidecars) from a mesh file.
    Up {
        /// The mesh file, e.g. examples/quickstart.yaml.
        file: PathBuf,
    },
    /// Serve the checks and quotas of a policy file (`policy: {checks, quotas}`) remotely, over
    /// Envoy's ext_authz gRPC API: the Mixer way, for proxies that only speak ext_authz and for
    /// measuring what the in-process design saves.
    CheckServer {
        /// Where to listen (plaintext HTTP/2).
        #[arg(long, default_value = "127.0.0.1:9191")]
        listen: std::net::SocketAddr,
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
    },
    /// One RPC request, its answer printed: `tessera call dubbo 127.0.0.1:20880 com.example.Greeter sayHello`.
    Call {
        /// The protocol (only `dubbo` so far).
        #[arg(value_parser = ["dubbo"])]
        protocol: String,
        /// Where to send it (a sidecar's outbound listener, or the service itself).
        target: std::net::SocketAddr,
        /// The interface.
        interface: String,
        /// The method (called without arguments).
        method: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Run the sample HTTP service (HTTP/1.1 and h2c).
    SampleService {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: std::net::SocketAddr,
        /// Name shown in answers.
        #[arg(long, default_value = "sample")]
        name: String,
    },
}

/// The node identity a control plane sees (Istio's pilot-agent passes these to Envoy).
#[derive(clap::Args, Clone, Default)]
struct NodeFlags {
    /// Node id, overriding the bootstrap's `node.id` (Istio: `sidecar~IP~POD.NS~NS.svc.cluster.local`).
    #[arg(long)]
    node_id: Option<String>,
    /// Node cluster (Istio: the workload's service cluster), overriding `node.cluster`.
    #[arg(long)]
    cluster: Option<String>,
    /// Node metadata `KEY=VALUE`, repeatable; VALUE is JSON when it parses (`LABELS={"app":"web"}`)
    /// and a string otherwise. Istio reads NAMESPACE, LABELS, INSTANCE_IPS, ISTIO_VERSION,
    /// CLUSTER_ID, MESH_ID, NETWORK and more from here.
    #[arg(long = "node-meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// ADS variant, overriding `ads_config.api_type`.
    #[arg(long, value_enum)]
    xds_mode: Option<XdsModeArg>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum XdsModeArg {
    /// State of the world.
    Sotw,
    /// Incremental.
    Delta,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tessera_model::parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration such as 250ms, 5s or 1m"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match cli.cmd {
        Cmd::Check { files, envoy_bootstrap } => {
            return if envoy_bootstrap {
                check(&[], &files)
            } else {
                check(&files, &[])
            };
        }
        Cmd::Sidecar {
            config,
            envoy_bootstrap,
            concurrency,
            admin,
            drain_time,
            watch_interval,
            node,
        } => {
            let src = match (config, envoy_bootstrap) {
                (Some(p), _) => Source::Tessera(p),
                (None, Some(p)) => Source::Envoy(p),
                (None, None) => unreachable!("clap requires one of them"),
            };
            runtime().and_then(|rt| rt.block_on(sidecar(src, concurrency, admin, drain_time, watch_interval, node)))
        }
        Cmd::Up { file } => runtime().and_then(|rt| rt.block_on(up(file))),
        Cmd::Pilot { config } => (|| {
            let cfg = tessera_pilot::config::Config::load(&config).map_err(|problems| {
                let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
                anyhow::anyhow!("{}: {} problem(s):\n{}", config.display(), problems.len(), list.join("\n"))
            })?;
            // The ADS server runs on a thread and runtime of its own.
            let ads = tessera_pilot::run::listen(&cfg).map_err(|e| anyhow::anyhow!("pilot: {e}"))?;
            eprintln!("pilot xDS (ADS) listening on {}", ads.addr);
            tracing::info!(address = %ads.addr, "pilot ready");
            runtime()?.block_on(async {
                tokio::select! {
                    r = tessera_pilot::run::run(cfg, ads) => r.map_err(|e| anyhow::anyhow!("pilot: {e}")),
                    r = wait_for_stop(None) => r,
                }
            })
        })(),
        Cmd::CheckServer { listen, policy } => runtime().and_then(|rt| {
            rt.block_on(async {
                let p = tessera_model::Policy::load(&policy).map_err(|e| anyhow::anyhow!("{e}"))?;
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("check server: cannot bind {listen}"))?;
                let addr = l.local_addr().context("check server address")?;
                eprintln!("check server listening on http://{addr}");
                tracing::info!(address = %addr, "check server ready");
                tokio::select! {
                    r = tessera_proxy::check_server::serve(l, &p) => r.map_err(|e| anyhow::anyhow!("check server: {e}")),
                    r = wait_for_stop(None) => r,
                }
            })
        }),
        Cmd::Call {
            protocol: _,
            target,
            interface,
            method,
            timeout,
        } => runtime().and_then(|rt| {
            rt.block_on(async {
                let answer = sample::call_dubbo(target, &interface, &method, timeout).await?;
                println!("{answer}");
                Ok(())
            })
        }),
        Cmd::SampleService { listen, name } => runtime().and_then(|rt| {
            rt.block_on(async {
                let addr = sample::start(listen, name).await?;
                eprintln!("sample service listening on http://{addr}");
                wait_for_stop(None).await?;
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The control runtime: admin API, reloads, DNS, signals. Workers have their own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("tessera-control")
        .build()
        .context("cannot start the control runtime")
}

fn check(files: &[PathBuf], envoy: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    for f in envoy {
        match Source::Envoy(f.clone()).parse_file() {
            Ok(cfg) => {
                // Certificates and keys it names must load too, as Envoy requires.
                let tls_errors = tessera_proxy::check_tls(&cfg);
                if tls_errors.is_empty() {
                    println!(
                        "{}: OK as an Envoy bootstrap ({} listeners, {} clusters)",
                        f.display(),
                        cfg.listeners.len(),
                        cfg.clusters.len()
                    );
                } else {
                    bad = true;
                    println!("{}: {} certificate problem(s):", f.display(), tls_errors.len());
                    for e in tls_errors {
                        println!("  {e}");
                    }
                }
            }
            Err(e) => {
                bad = true;
                println!("{e}");
            }
        }
    }
    for f in files {
        match Config::load(f) {
            Ok(cfg) => {
                // The files the config names (certificates, keys, CAs) must load too.
                let tls_errors = tessera_proxy::check_tls(&cfg);
                if tls_errors.is_empty() {
                    println!(
                        "{}: OK ({} listeners, {} clusters, {} secrets)",
                        f.display(),
                        cfg.listeners.len(),
                        cfg.clusters.len(),
                        cfg.secrets.len()
                    );
                } else {
                    bad = true;
                    for e in tls_errors {
                        println!("{e}");
                    }
                }
            }
            Err(e) => {
                bad = true;
                println!("{e}");
            }
        }
    }
    if bad { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Where the sidecar's configuration comes from.
#[derive(Clone)]
enum Source {
    /// Tessera's YAML.
    Tessera(PathBuf),
    /// An Envoy v3 bootstrap.
    Envoy(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Tessera(p) | Source::Envoy(p) => p,
        }
    }

    /// Validates `text`; the error lists every problem with the file's name.
    fn parse(&self, text: &str) -> Result<Config, String> {
        let file = self.path().display().to_string();
        match self {
            Source::Tessera(_) => Config::from_yaml(text, &file).map_err(|e: LoadError| e.to_string()),
            Source::Envoy(_) => {
                let b = tessera_xds::load::bootstrap_text(text, &file).map_err(|e| e.to_string())?;
                tessera_xds::bootstrap::bootstrap(&b).map_err(|errs| {
                    let mut out = format!("{file}: {} thing(s) Tessera cannot run yet:", errs.len());
                    for e in errs {
                        out.push_str(&format!("\n  {e}"));
                    }
                    out
                })
            }
        }
    }

    fn parse_file(&self) -> Result<Config, String> {
        let text =
            std::fs::read_to_string(self.path()).map_err(|e| format!("{}: cannot read: {e}", self.path().display()))?;
        self.parse(&text)
    }
}

/// Reads and validates a config without blocking the control runtime.
async fn load(src: &Source) -> anyhow::Result<Config> {
    let path = src.path();
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    src.parse(&text).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn sidecar(
    src: Source,
    concurrency: Option<usize>,
    admin: Option<std::net::SocketAddr>,
    drain_time: Option<Duration>,
    watch_interval: Duration,
    node: NodeFlags,
) -> anyhow::Result<()> {
    let mut cfg = load(&src).await?;
    let dynamic = match &src {
        Source::Envoy(p) => xds::dynamic(p, &node, &mut cfg)?,
        Source::Tessera(_) => None,
    };
    let path = src.path().to_path_buf();
    let mut opts = Options::default();
    if let Some(n) = concurrency {
        opts.concurrency = n;
    }
    opts.admin = admin;
    opts.secret_refresh = watch_interval;
    let base = cfg.clone();
    let server = Server::start(cfg, opts).await.context("cannot start the sidecar")?;
    announce(&server, &path);
    let reason = match dynamic {
        None => {
            run_until_stop(
                &server,
                &src,
                (!watch_interval.is_zero()).then_some(watch_interval),
                true,
            )
            .await?
        }
        Some(d) => {
            let client = tessera_xds::ads::Client::new(xds::settings(d, base)?, xds::ToProxy(&server));
            let dump = client.dump();
            server.set_config_dump(Box::new(move || dump.load().to_json()));
            tokio::select! {
                () = client.run() => "the ADS client ended",
                r = run_until_stop(&server, &src, None, false) => r?,
            }
        }
    };
    let drain = drain_time.unwrap_or(server.config().drain_time);
    tracing::info!(%reason, drain = ?drain, "draining, then exiting");
    server.shutdown(drain).await;
    Ok(())
}

fn announce(server: &Server, path: &Path) {
    let cfg = server.config();
    for l in &cfg.listeners {
        if let Some(a) = server.listener_addr(&l.name) {
            tracing::info!(config = %path.display(), listener = %l.name, address = %a, "listener ready");
        }
    }
    if let Some(a) = server.admin_addr() {
        tracing::info!(address = %a, "admin API ready");
    }
}

/// Serves until SIGTERM, SIGINT or `/quitquitquit`, reloading `path` on SIGHUP and, when
/// `watch` is set, whenever its content changes (checked at that interval).
async fn run_until_stop(
    server: &Server,
    src: &Source,
    watch: Option<Duration>,
    owns_config: bool,
) -> anyhow::Result<&'static str> {
    let path = src.path();
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut last = tokio::fs::read(path).await.ok();
    let mut tick = tokio::time::interval(watch.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if !owns_config {
                    tracing::warn!("SIGHUP ignored: the control plane owns this sidecar's configuration");
                    continue;
                }
                last = tokio::fs::read(path).await.ok();
                reload(server, src, "SIGHUP").await;
            }
            _ = tick.tick(), if watch.is_some() => {
                let now = tokio::fs::read(path).await.ok();
                if now.is_some() && now != last {
                    last = now;
                    reload(server, src, "file changed").await;
                }
            }
            _ = term.recv() => return Ok("SIGTERM"),
            _ = int.recv() => return Ok("SIGINT"),
            () = server.quit_requested() => return Ok("/quitquitquit"),
        }
    }
}

async fn reload(server: &Server, src: &Source, why: &str) {
    let path = src.path();
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(config = %path.display(), error = %e, "cannot read the config; keeping the current one");
            return;
        }
    };
    match src.parse(&text) {
        Ok(cfg) => match server.reload(cfg).await {
            Ok(()) => tracing::info!(config = %path.display(), reason = why, "configuration reloaded"),
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "configuration not applied; keeping the current one")
            }
        },
        Err(e) => tracing::error!("configuration rejected ({why}); keeping the current one:\n{e}"),
    }
}

async fn wait_for_stop(server: Option<&Server>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let quit = async {
        match server {
            Some(s) => s.quit_requested().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = quit => {}
    }
    Ok(())
}

async fn up(file: PathBuf) -> anyhow::Result<()> {
    let spec = {
        let f = file.clone();
        tokio::task::spawn_blocking(move || MeshSpec::load(&f))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    if spec.pilot.is_some() {
        return mesh::up(spec, &file).await;
    }
    println!("tessera up: {}", file.display());
    for s in &spec.services {
        let addr = sample::start(s.address, s.name.clone()).await?;
        println!("  service  {:<12} http://{addr}", s.name);
    }
    let mut servers = Vec::new();
    let mut try_url = None;
    for sc in &spec.sidecars {
        let cfg = load(&Source::Tessera(sc.config.clone())).await?;
        let opts = Options {
            concurrency: sc.concurrency,
            ..Options::default()
        };
        let server = Server::start(cfg, opts)
            .await
            .with_context(|| format!("cannot start the sidecar of {}", sc.config.display()))?;
        let cfg = server.config();
        for l in &cfg.listeners {
            if let Some(a) = server.listener_addr(&l.name) {
                println!(
                    "  sidecar  {:<12} listener {} on {a}",
                    sc.config.file_stem().unwrap_or_default().to_string_lossy(),
                    l.name
                );
                try_url.get_or_insert(format!("http://{a}/"));
            }
        }
        if let Some(a) = server.admin_addr() {
            println!("  admin    http://{a}/");
        }
        servers.push(server);
    }
    if let Some(u) = try_url {
        println!("try: curl {u}");
    }
    println!("Ctrl-C stops the mesh.");
    wait_for_stop(servers.first()).await?;
    for s in servers {
        let d = s.config().drain_time;
        s.shutdown(d).await;
    }
    Ok(())
}

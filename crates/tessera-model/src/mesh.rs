//! The file `tessera up` reads: a local mesh of sample services and sidecars for demos and
//! development. Two forms:
//! - **static**: `services` (sample HTTP services) and `sidecars` (each from its own config file);
//! - **with Pilot** (`pilot:` present): Pilot on its embedded store, each service registered
//!   through Pilot's registry API and fronted by a sidecar fed by Pilot over ADS (`sidecar:
//!   { inbound: ADDR }`), and a client sidecar (`client:`) with the outbound listeners.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};

use crate::decode::{Ctx, Obj, Path, socket_addr};
use crate::error::{ConfigError, LoadError};
use crate::yaml;

/// A local mesh.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    /// Sample HTTP services to run in-process.
    pub services: Vec<SampleService>,
    /// Sidecars to run, each from its own config file.
    pub sidecars: Vec<SidecarSpec>,
    /// Pilot, when the mesh runs under it.
    pub pilot: Option<PilotSpec>,
    /// The namespace services are registered in (default `default`).
    pub namespace: String,
    /// The client sidecar (with Pilot).
    pub client: Option<ClientSpec>,
}

/// Pilot in a local mesh.
#[derive(Debug, Clone)]
pub struct PilotSpec {
    /// The ADS server (default 127.0.0.1:15010).
    pub xds: SocketAddr,
    /// The registry API (default 127.0.0.1:15080).
    pub api: SocketAddr,
    /// The admin API (default 127.0.0.1:15014).
    pub admin: SocketAddr,
    /// The embedded store's file; absent: a file in a temporary directory.
    pub store: Option<PathBuf>,
}

/// The client sidecar of a local mesh: the outbound listeners applications call.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// The outbound HTTP listener (default 127.0.0.1:15001).
    pub outbound_http: SocketAddr,
    /// The outbound Dubbo listener, if any.
    pub outbound_dubbo: Option<SocketAddr>,
    /// Its admin API, if any.
    pub admin: Option<SocketAddr>,
}

/// What a sample service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleProtocol {
    /// HTTP/1.1 and h2c.
    Http,
    /// Dubbo (Hessian2).
    Dubbo,
}

/// A sample HTTP service (HTTP/1.1 and h2c) that answers `/`, `/echo`, `/headers`, `/status/N`, `/delay/MS`.
#[derive(Debug, Clone)]
pub struct SampleService {
    /// Name, shown in its answers.
    pub name: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// What it speaks (default http).
    pub protocol: SampleProtocol,
    /// Dubbo: the interface it serves (default `com.example.<Name>`).
    pub interface: Option<String>,
    /// With Pilot: its sidecar's inbound listener, where other sidecars reach it.
    pub inbound: Option<SocketAddr>,
}

/// A sidecar of the mesh.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    /// Its config file, relative paths taken from the mesh file's directory.
    pub config: PathBuf,
    /// Worker threads; defaults to 1 in a local mesh.
    pub concurrency: usize,
}

impl MeshSpec {
    /// Reads and validates a mesh file.
    pub fn load(path: impl AsRef<FsPath>) -> Result<MeshSpec, LoadError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            file: file.clone(),
            source,
        })?;
        let root = yaml::parse(&src).map_err(|e| {
            LoadError::Invalid(vec![ConfigError {
                file: file.clone(),
                line: e.mark.line,
                col: e.mark.col,
                path: "(syntax)".into(),
                reason: e.reason,
            }])
        })?;
        let base = path.parent().unwrap_or(FsPath::new("."));
        let mut ctx = Ctx::new(file);
        let spec = (|| {
            let mut o = Obj::open(&mut ctx, &root, &Path::root())?;
            let services = o.list(&mut ctx, "services", |ctx, n, p| {
                let mut s = Obj::open(ctx, n, p)?;
                let name = s.req_string(ctx, "name");
                let address = s.require(ctx, "address").and_then(|(n, p)| socket_addr(ctx, n, &p));
                let protocol = match s.get("protocol") {
                    None => Some(SampleProtocol::Http),
                    Some((n, p)) => match crate::decode::string(ctx, n, &p).as_deref() {
                        Some("http") => Some(SampleProtocol::Http),
                        Some("dubbo") => Some(SampleProtocol::Dubbo),
                        Some(other) => {
                            ctx.error(n.mark, &p, format!("unknown protocol `{other}` (known: http, dubbo)"));
                            None
                        }
                        None => None,
                    },
                };
                let interface = s.string(ctx, "interface");
                let inbound = s.get("sidecar").and_then(|(n, p)| {
                    let mut sc = Obj::open(ctx, n, &p)?;
                    let a = sc.require(ctx, "inbound").and_then(|(n, p)| socket_addr(ctx, n, &p));
                    sc.finish(ctx);
                    a
                });
                s.finish(ctx);
                Some(SampleService {
                    name: name?,
                    address: address?,
                    protocol: protocol?,
                    interface,
                    inbound,
                })
            });
            let addr_or = |ctx: &mut Ctx, o: &mut Obj<'_>, key: &'static str, default: &str| -> Option<SocketAddr> {
                match o.get(key) {
                    Some((n, p)) => socket_addr(ctx, n, &p),
                    None => default.parse().ok(),
                }
            };
            let pilot = o.get("pilot").and_then(|(n, p)| {
                let mut po = Obj::open(&mut ctx, n, &p)?;
                let xds = addr_or(&mut ctx, &mut po, "xds", "127.0.0.1:15010");
                let api = addr_or(&mut ctx, &mut po, "api", "127.0.0.1:15080");
                let admin = addr_or(&mut ctx, &mut po, "admin", "127.0.0.1:15014");
                let store = po.string(&mut ctx, "store").map(|s| base.join(s));
                po.finish(&mut ctx);
                Some(PilotSpec {
                    xds: xds?,
                    api: api?,
                    admin: admin?,
                    store,
                })
            });
            let namespace = o.string(&mut ctx, "namespace").unwrap_or_else(|| "default".into());
            let client = o.get("client").and_then(|(n, p)| {
                let mut co = Obj::open(&mut ctx, n, &p)?;
                let outbound_http = addr_or(&mut ctx, &mut co, "outbound_http", "127.0.0.1:15001");
                let outbound_dubbo = co.get("outbound_dubbo").and_then(|(n, p)| socket_addr(&mut ctx, n, &p));
                let admin = co.get("admin").and_then(|(n, p)| socket_addr(&mut ctx, n, &p));
                co.finish(&mut ctx);
                Some(ClientSpec {
                    outbound_http: outbound_http?,
                    outbound_dubbo,
                    admin,
                })
            });
            let sidecars = o.list(&mut ctx, "sidecars", |ctx, n, p| {
                let mut s = Obj::open(ctx, n, p)?;
                let config = s.req_string(ctx, "config");
                let concurrency = s.uint(ctx, "concurrency", 1, 1024).unwrap_or(1);
                s.finish(ctx);
                Some(SidecarSpec {
                    config: base.join(config?),
                    concurrency,
                })
            });
            o.finish(&mut ctx);
            Some(MeshSpec {
                services,
                sidecars,
                pilot,
                namespace,
                client,
            })
        })();
        match spec {
            Some(s) if ctx.errors.is_empty() => Ok(s),
            _ => Err(LoadError::Invalid(ctx.errors)),
        }
    }
}

//! The file `tessera up` reads: a local mesh of sample services and sidecars for demos and
//! development.

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
}

/// A sample HTTP service (HTTP/1.1 and h2c) that answers `/`, `/echo`, `/headers`, `/status/N`, `/delay/MS`.
#[derive(Debug, Clone)]
pub struct SampleService {
    /// Name, shown in its answers.
    pub name: String,
    /// Where it listens.
    pub address: SocketAddr,
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
                s.finish(ctx);
                Some(SampleService {
                    name: name?,
                    address: address?,
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
            Some(MeshSpec { services, sidecars })
        })();
        match spec {
            Some(s) if ctx.errors.is_empty() => Ok(s),
            _ => Err(LoadError::Invalid(ctx.errors)),
        }
    }
}

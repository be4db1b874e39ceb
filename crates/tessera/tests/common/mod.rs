//! Support for tests that run the real `tessera` binary and real peers (curl, h2load, grpcio).
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod registry;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tessera")
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A free port on 127.0.0.1, found by binding port 0 (for configs that must name a port).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The path of an external tool, or a failure that says how to install it. Tests never skip.
pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed; run .ci/run, or install it with: {package}");
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tessera-{tag}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop, its stderr collected.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    /// The threads copying stdout and stderr into `log`; they end when the process's pipes close.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let log = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            }));
        }
        Proc { child, log, readers }
    }

    pub fn tessera(args: &[&str]) -> Proc {
        Proc::spawn(Command::new(bin()).args(args).env("RUST_LOG", "info"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for exit; panics with the log after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Everything the process wrote is in the log once its pipes are drained.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return s;
            }
            if Instant::now() > deadline {
                panic!("process did not exit within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                panic!("log never showed {needle:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The address in the first log line containing `needle`, written `address=IP:PORT` or
    /// `http://IP:PORT` (waits up to `limit` for it).
    pub fn logged_addr(&self, needle: &str, limit: Duration) -> SocketAddr {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                let at = line
                    .find("address=")
                    .map(|i| i + "address=".len())
                    .or_else(|| line.find("http://").map(|i| i + "http://".len()))
                    .unwrap_or_else(|| panic!("no address in {line:?}"));
                let text: String = line[at..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '/')
                    .collect();
                return text
                    .parse()
                    .unwrap_or_else(|e| panic!("bad address {text:?} in {line:?}: {e}"));
            }
            if Instant::now() > deadline {
                panic!("log never showed {needle:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A sidecar started from `config` (listener `http`, admin on port 0) and its two addresses.
pub fn start_sidecar(config: &Path, extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let mut args = vec!["sidecar", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let p = Proc::tessera(&args);
    let admin = p.logged_addr("admin API ready", Duration::from_secs(20));
    let listen = p.logged_addr("listener=http ", Duration::from_secs(20));
    (p, listen, admin)
}

/// Waits until something accepts connections on `addr`.
pub fn wait_port(addr: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if Instant::now() > deadline {
            panic!("nothing listens on {addr} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs curl with `args`; returns (stdout, stderr, status).
pub fn curl(args: &[&str]) -> Output {
    let curl = tool("curl", "apt-get install -y curl");
    Command::new(curl)
        .arg("-sS")
        .arg("--max-time")
        .arg("10")
        .args(args)
        .output()
        .unwrap()
}

pub fn curl_ok(args: &[&str]) -> String {
    let out = curl(args);
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `url` with curl until it answers `want` (status code), or panics.
pub fn wait_status(url: &str, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", url]);
        if String::from_utf8_lossy(&out.stdout) == want {
            return;
        }
        if Instant::now() > deadline {
            panic!("{url} never answered {want}");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// A sample service (the one shipped in the binary) on an ephemeral port.
pub fn sample_service(name: &str) -> (Proc, SocketAddr) {
    let p = Proc::tessera(&["sample-service", "--listen", "127.0.0.1:0", "--name", name]);
    let addr = p.logged_addr("sample service listening on", Duration::from_secs(20));
    wait_port(addr, Duration::from_secs(10));
    (p, addr)
}

/// A one-route HTTP sidecar config: listener `http` on `listen`, admin on `admin` (0: ephemeral),
/// cluster `app` at `upstream`.
pub fn sidecar_config(listen: u16, admin: u16, upstream: SocketAddr, protocol: &str) -> String {
    format!(
        r#"admin: {{ address: "127.0.0.1:{admin}" }}
drain_time: 5s
listeners:
- name: http
  address: 127.0.0.1:{listen}
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {{ prefix: / }}
            route: {{ cluster: app, timeout: 0s }}
clusters:
- name: app
  protocol: {protocol}
  endpoints: ["{upstream}"]
"#
    )
}

/// One HTTP listener `http` (stat prefix `ingress`, ephemeral port) routing everything to cluster
/// `app` at `upstream`, admin on an ephemeral port. `top` is top-level YAML (`telemetry: ...`),
/// `chain` connection-manager fields indented by 6 (`      policy: ...`), `routes` routes before
/// the catch-all indented by 10; each empty or ending without a newline.
pub fn ingress_yaml(top: &str, chain: &str, routes: &str, upstream: SocketAddr) -> String {
    let line = |s: &str| if s.is_empty() { String::new() } else { format!("{s}\n") };
    format!(
        r#"admin: {{ address: "127.0.0.1:0" }}
{top}listeners:
- name: http
  address: 127.0.0.1:0
  filter_chains:
  - http:
      stat_prefix: ingress
{chain}      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
{routes}          - match: {{ prefix: / }}
            route: {{ cluster: app }}
clusters:
- {{ name: app, protocol: downstream, endpoints: ["{upstream}"] }}
"#,
        top = line(top),
        chain = line(chain),
        routes = line(routes),
    )
}

/// Writes `yaml` into `dir` and starts a sidecar on it, returned once `/ready` answers 200.
pub fn start_ready(dir: &TempDir, yaml: &str) -> (Proc, SocketAddr, SocketAddr) {
    let f = dir.write("sidecar.yaml", yaml);
    let (p, listen, admin) = start_sidecar(&f, &[]);
    wait_status(&format!("http://{admin}/ready"), "200", Duration::from_secs(10));
    (p, listen, admin)
}

/// Certificates made with the `openssl` command-line tool (a peer we did not write): an ECDSA
/// P-256 CA and leaves signed by it, as PEM files in a directory.
pub struct Pki {
    pub dir: TempDir,
    pub ca: PathBuf,
    ca_key: PathBuf,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = TempDir::new(tag);
        let (ca, ca_key) = (dir.path("ca.pem"), dir.path("ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            ca_key.to_str().unwrap(),
            "-out",
            ca.to_str().unwrap(),
            "-days",
            "30",
            "-subj",
            "/CN=tessera-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        Pki { dir, ca, ca_key }
    }

    /// A leaf `name` with subject CN=`cn` and `sans` (`DNS:a.test,URI:spiffe://...`), valid for
    /// server and client use. Returns (certificate, key).
    pub fn issue(&self, name: &str, cn: &str, sans: &str) -> (PathBuf, PathBuf) {
        let (cert, key, csr) = (
            self.dir.path(&format!("{name}.pem")),
            self.dir.path(&format!("{name}.key")),
            self.dir.path(&format!("{name}.csr")),
        );
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        let ext = self.dir.write(
            &format!("{name}.ext"),
            &format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            self.ca.to_str().unwrap(),
            "-CAkey",
            self.ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "30",
            "-extfile",
            ext.to_str().unwrap(),
        ]);
        (cert, key)
    }
}

/// Runs the openssl CLI, panicking with its output on failure.
pub fn openssl(args: &[&str]) -> Output {
    let bin = tool("openssl", "apt-get install -y openssl");
    let out = Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Envoy 1.40 from bench/.venv (`.ci/run` installs it through scripts/test); `None` on a
/// developer machine that has not installed it yet.
pub fn envoy_bin() -> Option<PathBuf> {
    let venv = repo().join("bench/.venv/lib");
    let entries = std::fs::read_dir(&venv).ok()?;
    entries
        .flatten()
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
}

/// Envoy on `config` with one worker; `id` keeps its shared memory apart from other Envoys.
pub fn spawn_envoy(envoy: &Path, config: &Path, id: u16) -> Proc {
    Proc::spawn(
        Command::new(envoy)
            .args([
                "-c",
                config.to_str().unwrap(),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .args(["--base-id", &(u32::from(id) % 60_000 + 1000).to_string()]),
    )
}

/// Polls `f` (every 50 ms) until it holds; fails naming `what` after `limit`.
#[allow(dead_code)]
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One call of Pilot's registry REST API with curl: the status and the JSON body (Null when
/// it is not JSON).
pub fn api(method: &str, url: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut args = vec!["-s", "-w", "\n%{http_code}", "-X", method, url];
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "-d", b]);
    }
    let out = curl_ok(&args);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Who answers `host` through a sidecar listening at `listen`, `n` times: `one` or `two` (the
/// sample services' names), `-` for anyone else or no answer.
pub fn who_answers(listen: u16, host: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let out = curl(&[
                "-s",
                "-H",
                &format!("Host: {host}"),
                &format!("http://127.0.0.1:{listen}/"),
            ]);
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            ["one", "two"]
                .into_iter()
                .find(|w| body.contains(&format!("hello from {w}")))
                .unwrap_or("-")
                .to_string()
        })
        .collect()
}

/// `tessera pilot` on the config `yaml` exits with an error whose text holds each of `wants`.
pub fn assert_pilot_refuses(dir: &TempDir, yaml: &str, wants: &[&str]) {
    let f = dir.write("pilot.yaml", yaml);
    let out = Command::new(bin())
        .args(["pilot", "--config", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in wants {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
}

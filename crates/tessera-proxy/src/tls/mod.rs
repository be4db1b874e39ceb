//! TLS with rustls and ring, one crypto provider for the whole process: termination on filter
//! chains ([`ServerTls`]), origination towards clusters ([`ClientTls`]), the secret store they
//! draw certificates from, peer identities (SPIFFE URI SANs) and handshake failure accounting.
//!
//! A context keeps the rustls config it last built, stamped with the versions of the secrets it
//! was built from. Each new connection compares the stamp (a few atomic loads) and rebuilds when
//! a secret rotated, so rotation needs no reload and open connections are never touched.

pub(crate) mod secrets;
mod verify;
pub(crate) mod x509;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};
use tessera_model::{CommonTls, Config, DownstreamTls, TlsParams, TlsVersion, UpstreamTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use self::secrets::{Material, SecretKey, SecretRt};
use self::x509::CertInfo;
use crate::stats::{Counter, Scope, Stats};

pub use self::secrets::SecretError;

/// The process's crypto provider: ring, every suite and group it has.
pub(crate) fn default_provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The provider narrowed to the configured suites and curves, in their order.
fn provider_for(params: &TlsParams) -> Arc<CryptoProvider> {
    if params.cipher_suites.is_empty() && params.ecdh_curves.is_empty() {
        return default_provider();
    }
    let base = rustls::crypto::ring::default_provider();
    let mut p = base.clone();
    if !params.cipher_suites.is_empty() {
        p.cipher_suites = params
            .cipher_suites
            .iter()
            .filter_map(|name| {
                base.cipher_suites
                    .iter()
                    .find(|s| s.suite().as_str() == Some(name.as_str()))
                    .copied()
            })
            .collect();
    }
    if !params.ecdh_curves.is_empty() {
        p.kx_groups = params
            .ecdh_curves
            .iter()
            .filter_map(|name| {
                let want = match name.as_str() {
                    "X25519" => rustls::NamedGroup::X25519,
                    "P-256" => rustls::NamedGroup::secp256r1,
                    _ => rustls::NamedGroup::secp384r1,
                };
                base.kx_groups.iter().find(|g| g.name() == want).copied()
            })
            .collect();
    }
    Arc::new(p)
}

fn versions(params: &TlsParams) -> Vec<&'static SupportedProtocolVersion> {
    let mut v = Vec::with_capacity(2);
    if params.tls_maximum_protocol_version >= TlsVersion::Tls13 {
        v.push(&rustls::version::TLS13);
    }
    if params.tls_minimum_protocol_version <= TlsVersion::Tls12 {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// Why a handshake failed, as counted in `ssl.handshake_failed.<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Expired,
    NotYetValid,
    UnknownCa,
    BadCertificate,
    SanMismatch,
    NoClientCert,
    PeerRejectedCert,
    NoSharedCipher,
    NoAlpn,
    ProtocolVersion,
    Protocol,
    Timeout,
    Closed,
    Io,
}

impl Reason {
    const ALL: [Reason; 14] = [
        Reason::Expired,
        Reason::NotYetValid,
        Reason::UnknownCa,
        Reason::BadCertificate,
        Reason::SanMismatch,
        Reason::NoClientCert,
        Reason::PeerRejectedCert,
        Reason::NoSharedCipher,
        Reason::NoAlpn,
        Reason::ProtocolVersion,
        Reason::Protocol,
        Reason::Timeout,
        Reason::Closed,
        Reason::Io,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::UnknownCa => "unknown_ca",
            Reason::BadCertificate => "bad_certificate",
            Reason::SanMismatch => "san_mismatch",
            Reason::NoClientCert => "no_client_cert",
            Reason::PeerRejectedCert => "peer_rejected_cert",
            Reason::NoSharedCipher => "no_shared_cipher",
            Reason::NoAlpn => "no_alpn",
            Reason::ProtocolVersion => "protocol_version",
            Reason::Protocol => "protocol",
            Reason::Timeout => "timeout",
            Reason::Closed => "closed",
            Reason::Io => "io",
        }
    }

    /// Classifies the error a tokio-rustls handshake returned.
    pub(crate) fn classify(e: &io::Error) -> Reason {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    Reason::Closed
                }
                io::ErrorKind::TimedOut => Reason::Timeout,
                io::ErrorKind::InvalidData => Reason::Protocol,
                _ => Reason::Io,
            };
        };
        match tls {
            E::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => Reason::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Reason::NotYetValid,
                C::UnknownIssuer => Reason::UnknownCa,
                C::ApplicationVerificationFailure => Reason::SanMismatch,
                _ => Reason::BadCertificate,
            },
            E::NoCertificatesPresented => Reason::NoClientCert,
            E::NoApplicationProtocol => Reason::NoAlpn,
            E::PeerIncompatible(p) => {
                use rustls::PeerIncompatible as P;
                match p {
                    P::ServerDoesNotSupportTls12Or13
                    | P::ServerTlsVersionIsDisabledByOurConfig
                    | P::SupportedVersionsExtensionRequired
                    | P::Tls12NotOffered
                    | P::Tls12NotOfferedOrEnabled
                    | P::Tls13RequiredForQuic => Reason::ProtocolVersion,
                    _ => Reason::NoSharedCipher,
                }
            }
            E::AlertReceived(a) => match a {
                A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired => Reason::PeerRejectedCert,
                A::HandshakeFailure | A::InsufficientSecurity => Reason::NoSharedCipher,
                A::NoApplicationProtocol => Reason::NoAlpn,
                A::ProtocolVersion => Reason::ProtocolVersion,
                _ => Reason::Protocol,
            },
            _ => Reason::Protocol,
        }
    }
}

/// The TLS failure behind an error, if a rustls error is in its source chain (a reset caused by
/// a fatal alert, say).
pub(crate) fn tls_reason(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|i| i.is::<rustls::Error>())
        {
            return Some(Reason::classify(io));
        }
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(Reason::classify(&io::Error::new(io::ErrorKind::InvalidData, t.clone())));
        }
        cur = err.source();
    }
    None
}

/// Envoy's `ssl.*` stats for a listener or cluster, plus failure reasons.
pub(crate) struct SslStats {
    pub(crate) handshake: Arc<Counter>,
    pub(crate) connection_error: Arc<Counter>,
    pub(crate) session_reused: Arc<Counter>,
    tls12: Arc<Counter>,
    tls13: Arc<Counter>,
    failed: Vec<Arc<Counter>>,
    /// Second of the last logged failure and how many were logged in it (a handshake storm
    /// must not flood the log).
    log_budget: AtomicU64,
}

impl SslStats {
    pub(crate) fn new(stats: &Stats, scope: &Scope) -> SslStats {
        SslStats {
            handshake: stats.counter(scope, "ssl.handshake"),
            connection_error: stats.counter(scope, "ssl.connection_error"),
            session_reused: stats.counter(scope, "ssl.session_reused"),
            tls12: stats.counter(scope, "ssl.versions.TLSv1.2"),
            tls13: stats.counter(scope, "ssl.versions.TLSv1.3"),
            failed: Reason::ALL
                .iter()
                .map(|r| stats.counter(scope, &format!("ssl.handshake_failed.{}", r.name())))
                .collect(),
            log_budget: AtomicU64::new(0),
        }
    }

    /// Counts a failed handshake; true when it may be logged (at most 10 per second).
    pub(crate) fn failed(&self, r: Reason) -> bool {
        self.connection_error.inc();
        if let Some(c) = Reason::ALL
            .iter()
            .position(|x| *x == r)
            .and_then(|i| self.failed.get(i))
        {
            c.inc();
        }
        let now = secrets::now_secs() as u64;
        let cur = self.log_budget.load(Ordering::Relaxed);
        let (sec, n) = (cur >> 8, cur & 0xff);
        let next = if sec == now {
            (now << 8) | (n + 1).min(0xff)
        } else {
            now << 8
        };
        self.log_budget.store(next, Ordering::Relaxed);
        sec != now || n < 10
    }

    fn done(&self, version: Option<rustls::ProtocolVersion>, resumed: bool) {
        self.handshake.inc();
        match version {
            Some(rustls::ProtocolVersion::TLSv1_3) => self.tls13.inc(),
            Some(rustls::ProtocolVersion::TLSv1_2) => self.tls12.inc(),
            _ => {}
        }
        if resumed {
            self.session_reused.inc();
        }
    }
}

/// The peer's certificate, as far as routing, policy and logs need it.
#[derive(Debug, Clone)]
pub(crate) struct PeerCert {
    pub(crate) info: CertInfo,
    /// SHA-256 of the DER, lower-case hex (Envoy's fingerprint and XFCC `Hash`).
    pub(crate) sha256: String,
    /// The leaf in DER (XFCC `Cert`).
    pub(crate) der: Vec<u8>,
}

impl PeerCert {
    fn new(der: &[u8]) -> Option<PeerCert> {
        let info = x509::parse(der).ok()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Some(PeerCert {
            info,
            sha256: x509::hex(digest.as_ref()),
            der: der.to_vec(),
        })
    }
}

/// What a TLS connection negotiated, kept on the connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsInfo {
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<String>,
    pub(crate) version: &'static str,
    pub(crate) cipher: &'static str,
    pub(crate) resumed: bool,
    /// The client's certificate, when it presented one (it was verified if a CA is configured).
    pub(crate) peer: Option<PeerCert>,
    /// Our own certificate on this connection.
    pub(crate) local: Option<Arc<CertInfo>>,
}

impl TlsInfo {
    fn from_common(c: &rustls::CommonState) -> TlsInfo {
        TlsInfo {
            sni: None,
            alpn: c.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
            version: match c.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "",
            },
            cipher: c
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or(""),
            resumed: c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            peer: c
                .peer_certificates()
                .and_then(|p| p.first())
                .and_then(|d| PeerCert::new(d)),
            local: None,
        }
    }

    /// The verified peer identity: SPIFFE URI SAN, else DNS SAN, else subject.
    pub(crate) fn peer_principal(&self) -> Option<&str> {
        self.peer.as_ref().map(|p| p.info.principal())
    }
}

/// A downstream or upstream connection, plain or TLS; one type so the HTTP and TCP code paths
/// are not duplicated per transport.
pub(crate) enum Stream {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Server(s) => s.is_write_vectored(),
            Stream::Client(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Secrets a context was built from, resolved by the server's store.
pub(crate) struct Deps {
    pub(crate) certs: Vec<Arc<SecretRt>>,
    pub(crate) ca: Option<Arc<SecretRt>>,
}

impl Deps {
    /// A number that changes whenever one of the secrets is updated.
    fn stamp(&self) -> u64 {
        self.certs
            .iter()
            .chain(self.ca.iter())
            .fold(17u64, |acc, s| acc.wrapping_mul(1_000_003).wrapping_add(s.version()))
    }

    fn cert_materials(&self) -> Vec<(Arc<CertifiedKey>, Vec<String>, Arc<CertInfo>)> {
        self.certs
            .iter()
            .filter_map(|s| match s.material().as_deref() {
                Some(Material::Cert(c)) => Some((c.key.clone(), c.names.clone(), Arc::new(c.leaf.clone()))),
                _ => None,
            })
            .collect()
    }

    fn roots(&self) -> Option<Arc<rustls::RootCertStore>> {
        match self.ca.as_ref()?.material().as_deref() {
            Some(Material::Ca(c)) => Some(c.roots.clone()),
            _ => None,
        }
    }
}

/// What `cell` holds, rebuilt and stored first when its stamp no longer matches the secrets'
/// versions. Workers racing on a rotation may each build; the last store wins, all are valid.
fn rebuilt_if_stale<T>(
    cell: &ArcSwap<T>,
    stamp_of: impl Fn(&T) -> u64,
    deps: &Deps,
    build: impl FnOnce() -> Result<T, String>,
) -> Arc<T> {
    let b = cell.load_full();
    if stamp_of(&b) == deps.stamp() {
        return b;
    }
    match build() {
        Ok(n) => {
            let n = Arc::new(n);
            cell.store(n.clone());
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot rebuild a TLS context after a secret update; keeping the previous one");
            b
        }
    }
}

struct BuiltServer {
    stamp: u64,
    config: Arc<ServerConfig>,
    certs: Arc<verify::SniCerts>,
}

/// TLS termination for one filter chain.
pub(crate) struct ServerTls {
    pub(crate) cfg: DownstreamTls,
    deps: Deps,
    provider: Arc<CryptoProvider>,
    cache: Arc<dyn StoresServerSessions>,
    ticketer: Option<Arc<dyn ProducesTickets>>,
    built: ArcSwap<BuiltServer>,
    pub(crate) stats: Arc<SslStats>,
}

impl ServerTls {
    pub(crate) fn new(cfg: DownstreamTls, deps: Deps, stats: Arc<SslStats>) -> Result<ServerTls, String> {
        let provider = provider_for(&cfg.common.tls_params);
        let cache: Arc<dyn StoresServerSessions> = if cfg.disable_stateful_session_resumption {
            Arc::new(NoServerSessionStorage {})
        } else {
            ServerSessionMemoryCache::new(4096)
        };
        let ticketer = if cfg.disable_stateless_session_resumption {
            None
        } else {
            Some(rustls::crypto::ring::Ticketer::new().map_err(|e| format!("session tickets: {e}"))?)
        };
        let first = Self::build_with(&cfg, &deps, &provider, &cache, ticketer.as_ref())?;
        Ok(ServerTls {
            cfg,
            deps,
            provider,
            cache,
            ticketer,
            built: ArcSwap::from_pointee(first),
            stats,
        })
    }

    fn build(&self) -> Result<BuiltServer, String> {
        Self::build_with(
            &self.cfg,
            &self.deps,
            &self.provider,
            &self.cache,
            self.ticketer.as_ref(),
        )
    }

    fn build_with(
        cfg: &DownstreamTls,
        deps: &Deps,
        provider: &Arc<CryptoProvider>,
        cache: &Arc<dyn StoresServerSessions>,
        ticketer: Option<&Arc<dyn ProducesTickets>>,
    ) -> Result<BuiltServer, String> {
        let stamp = deps.stamp();
        let common = &cfg.common;
        let verifier: Arc<dyn ClientCertVerifier> = match (&common.validation, deps.roots()) {
            (Some(v), Some(roots)) => {
                let mut b = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
                if !cfg.require_client_certificate {
                    b = b.allow_unauthenticated();
                }
                let inner = b.build().map_err(|e| format!("client certificate verifier: {e}"))?;
                Arc::new(verify::ClientVerifier::new(inner, v.match_subject_alt_names.clone()))
            }
            _ => rustls::server::WebPkiClientVerifier::no_client_auth(),
        };
        let certs = Arc::new(verify::SniCerts::new(deps.cert_materials()));
        if certs.is_empty() {
            return Err("no certificate could be loaded".into());
        }
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions(&common.tls_params))
            .map_err(|e| format!("TLS parameters: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.session_storage = cache.clone();
        if let Some(t) = ticketer {
            config.ticketer = t.clone();
        }
        config.max_early_data_size = 0;
        Ok(BuiltServer {
            stamp,
            config: Arc::new(config),
            certs,
        })
    }

    /// The config for a new connection, rebuilt first if a secret changed since the last build.
    fn current(&self) -> Arc<BuiltServer> {
        rebuilt_if_stale(&self.built, |b| b.stamp, &self.deps, || self.build())
    }

    /// Runs the server handshake on `tcp` within the handshake timeout. Failures are counted
    /// and logged here; `None` means the connection is done.
    pub(crate) async fn accept(&self, tcp: TcpStream, remote: std::net::SocketAddr) -> Option<(Stream, TlsInfo)> {
        let b = self.current();
        let acceptor = tokio_rustls::TlsAcceptor::from(b.config.clone());
        let r = tokio::time::timeout(self.cfg.handshake_timeout, acceptor.accept(tcp)).await;
        let s = match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = Reason::classify(&e);
                if self.stats.failed(reason) {
                    tracing::info!(%remote, reason = reason.name(), error = %e, "downstream TLS handshake failed");
                }
                return None;
            }
            Err(_) => {
                if self.stats.failed(Reason::Timeout) {
                    tracing::info!(%remote, reason = "timeout", "downstream TLS handshake timed out");
                }
                return None;
            }
        };
        let conn = s.get_ref().1;
        let mut info = TlsInfo::from_common(conn);
        info.sni = conn.server_name().map(str::to_string);
        info.local = b.certs.local_for(info.sni.as_deref());
        self.stats.done(conn.protocol_version(), info.resumed);
        tracing::debug!(
            %remote,
            sni = ?info.sni,
            alpn = ?info.alpn,
            version = info.version,
            resumed = info.resumed,
            peer = ?info.peer_principal(),
            "downstream TLS handshake done"
        );
        Some((Stream::Server(Box::new(s)), info))
    }
}

struct BuiltClient {
    stamp: u64,
    /// Per ALPN choice: the configured list (or none), `http/1.1`, `h2`.
    configs: [Arc<ClientConfig>; 3],
}

/// Which ALPN list an upstream connection offers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Alpn {
    /// The cluster's `alpn_protocols` (none for TCP unless configured).
    Configured = 0,
    /// `http/1.1` unless the cluster configured a list.
    Http1 = 1,
    /// `h2` unless the cluster configured a list.
    Http2 = 2,
}

/// TLS origination for one cluster.
pub(crate) struct ClientTls {
    pub(crate) cfg: UpstreamTls,
    deps: Deps,
    provider: Arc<CryptoProvider>,
    resumption: Arc<dyn ClientSessionStore>,
    sni: Option<ServerName<'static>>,
    built: ArcSwap<BuiltClient>,
    pub(crate) stats: Arc<SslStats>,
}

impl ClientTls {
    pub(crate) fn new(cfg: UpstreamTls, deps: Deps, stats: Arc<SslStats>) -> Result<ClientTls, String> {
        let sni = match &cfg.sni {
            Some(s) => Some(ServerName::try_from(s.clone()).map_err(|e| format!("sni `{s}`: {e}"))?),
            None => None,
        };
        let provider = provider_for(&cfg.common.tls_params);
        let resumption: Arc<dyn ClientSessionStore> = Arc::new(ClientSessionMemoryCache::new(256));
        let first = Self::build_with(&cfg, &deps, &provider, &resumption, sni.is_some())?;
        Ok(ClientTls {
            cfg,
            deps,
            provider,
            resumption,
            sni,
            built: ArcSwap::from_pointee(first),
            stats,
        })
    }

    fn build(&self) -> Result<BuiltClient, String> {
        Self::build_with(
            &self.cfg,
            &self.deps,
            &self.provider,
            &self.resumption,
            self.sni.is_some(),
        )
    }

    fn build_with(
        cfg: &UpstreamTls,
        deps: &Deps,
        provider: &Arc<CryptoProvider>,
        resumption: &Arc<dyn ClientSessionStore>,
        sni: bool,
    ) -> Result<BuiltClient, String> {
        let stamp = deps.stamp();
        let common: &CommonTls = &cfg.common;
        let roots = deps.roots();
        let inner = match &roots {
            Some(r) => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(r.clone(), provider.clone())
                    .build()
                    .map_err(|e| format!("server certificate verifier: {e}"))?,
            ),
            None => None,
        };
        let sans = common
            .validation
            .as_ref()
            .map(|v| v.match_subject_alt_names.clone())
            .unwrap_or_default();
        let verifier: Arc<dyn ServerCertVerifier> =
            Arc::new(verify::ServerVerifier::new(inner, provider.clone(), sans));
        let client_cert = deps.cert_materials().into_iter().next().map(|(k, _, _)| k);
        let make = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, String> {
            let b = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&versions(&common.tls_params))
                .map_err(|e| format!("TLS parameters: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone());
            let mut c = match &client_cert {
                Some(k) => b.with_client_cert_resolver(Arc::new(verify::ClientCert(k.clone()))),
                None => b.with_no_client_auth(),
            };
            c.alpn_protocols = alpn;
            c.resumption = Resumption::store(resumption.clone());
            c.enable_sni = sni;
            Ok(Arc::new(c))
        };
        let configured: Vec<Vec<u8>> = common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        let (h1, h2) = if configured.is_empty() {
            (vec![b"http/1.1".to_vec()], vec![b"h2".to_vec()])
        } else {
            (configured.clone(), configured.clone())
        };
        Ok(BuiltClient {
            stamp,
            configs: [make(configured)?, make(h1)?, make(h2)?],
        })
    }

    fn current(&self) -> Arc<BuiltClient> {
        rebuilt_if_stale(&self.built, |b| b.stamp, &self.deps, || self.build())
    }

    /// Runs the client handshake on `tcp`. The error is counted; its reason is returned.
    pub(crate) async fn connect(&self, tcp: TcpStream, ip: IpAddr, alpn: Alpn) -> Result<Stream, (Reason, io::Error)> {
        let b = self.current();
        let connector = tokio_rustls::TlsConnector::from(b.configs[alpn as usize].clone());
        let name = self.sni.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        match connector.connect(name, tcp).await {
            Ok(s) => {
                let c = s.get_ref().1;
                self.stats.done(
                    c.protocol_version(),
                    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                );
                Ok(Stream::Client(Box::new(s)))
            }
            Err(e) => {
                let reason = Reason::classify(&e);
                self.stats.failed(reason);
                Err((reason, e))
            }
        }
    }
}

/// The secrets of one configuration, by key; kept across reloads where definitions persist so
/// rotation state and stats carry over.
#[derive(Default)]
pub(crate) struct SecretSet {
    by_key: HashMap<SecretKey, Arc<SecretRt>>,
    named: HashMap<String, Arc<SecretRt>>,
}

impl SecretSet {
    /// Loads every secret `cfg` defines or writes in place, reusing `old`'s where the definition
    /// is unchanged. Reads files: call from a blocking thread.
    pub(crate) fn build(cfg: &Config, old: &SecretSet, stats: &Stats) -> Result<SecretSet, SecretError> {
        let mut set = SecretSet::default();
        let add = |key: SecretKey, set: &mut SecretSet| -> Result<Arc<SecretRt>, SecretError> {
            if let Some(s) = set.by_key.get(&key) {
                return Ok(s.clone());
            }
            let rt = match old.by_key.get(&key) {
                Some(s) => s.clone(),
                None => Arc::new(SecretRt::load(key.clone(), stats)?),
            };
            set.by_key.insert(key, rt.clone());
            Ok(rt)
        };
        for s in &cfg.secrets {
            let rt = add(SecretKey::from_model(&s.name, &s.kind), &mut set)?;
            set.named.insert(s.name.clone(), rt);
        }
        let commons = cfg
            .listeners
            .iter()
            .flat_map(|l| l.filter_chains.iter().filter_map(|c| c.tls.as_ref().map(|t| &t.common)))
            .chain(cfg.clusters.iter().filter_map(|c| c.tls.as_ref().map(|t| &t.common)));
        for common in commons {
            for c in &common.tls_certificates {
                add(SecretKey::InlineCert(c.clone()), &mut set)?;
            }
            if let Some(ca) = common.validation.as_ref().and_then(|v| v.trusted_ca.as_ref()) {
                add(SecretKey::InlineCa(ca.clone()), &mut set)?;
            }
        }
        Ok(set)
    }

    /// The secrets a TLS context uses. Names were checked when the config was loaded.
    pub(crate) fn deps_for(&self, common: &CommonTls) -> Deps {
        let certs = common
            .tls_certificates
            .iter()
            .filter_map(|c| self.by_key.get(&SecretKey::InlineCert(c.clone())).cloned())
            .chain(
                common
                    .tls_certificate_sds_secret_configs
                    .iter()
                    .filter_map(|n| self.named.get(n).cloned()),
            )
            .collect();
        let ca = common
            .validation
            .as_ref()
            .and_then(|v| match (&v.trusted_ca, &v.trusted_ca_secret) {
                (Some(ca), _) => self.by_key.get(&SecretKey::InlineCa(ca.clone())).cloned(),
                (None, Some(n)) => self.named.get(n).cloned(),
                (None, None) => None,
            });
        Deps { certs, ca }
    }

    /// Every secret, for the file watcher and `/certs`.
    pub(crate) fn all(&self) -> Vec<Arc<SecretRt>> {
        let mut v: Vec<Arc<SecretRt>> = self.by_key.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

impl Deps {
    /// True when `other` names the very same secrets (so a context built on `self` can stay).
    pub(crate) fn same_as(&self, other: &Deps) -> bool {
        self.certs.len() == other.certs.len()
            && self.certs.iter().zip(&other.certs).all(|(a, b)| Arc::ptr_eq(a, b))
            && match (&self.ca, &other.ca) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl ClientTls {
    /// True when this context was built on the secrets `set` gives for `common`.
    pub(crate) fn uses(&self, set: &SecretSet, common: &CommonTls) -> bool {
        self.deps.same_as(&set.deps_for(common))
    }
}

/// Loads every certificate, key and trust bundle `cfg` names, as the proxy would at start, and
/// returns every failure, not just the first (for `tessera check`). Reads files: blocking.
pub(crate) fn check_all(cfg: &Config) -> Vec<String> {
    let stats = Stats::default();
    let mut keys: Vec<SecretKey> = cfg
        .secrets
        .iter()
        .map(|s| SecretKey::from_model(&s.name, &s.kind))
        .collect();
    let commons = cfg
        .listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter().filter_map(|c| c.tls.as_ref().map(|t| &t.common)))
        .chain(cfg.clusters.iter().filter_map(|c| c.tls.as_ref().map(|t| &t.common)));
    for common in commons {
        keys.extend(common.tls_certificates.iter().map(|c| SecretKey::InlineCert(c.clone())));
        if let Some(ca) = common.validation.as_ref().and_then(|v| v.trusted_ca.as_ref()) {
            keys.push(SecretKey::InlineCa(ca.clone()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut errors = Vec::new();
    for k in keys {
        if seen.insert(k.clone())
            && let Err(e) = SecretRt::load(k, &stats)
        {
            errors.push(e.to_string());
        }
    }
    for c in &cfg.clusters {
        if let Some(sni) = c.tls.as_ref().and_then(|t| t.sni.as_ref())
            && ServerName::try_from(sni.clone()).is_err()
        {
            errors.push(format!("cluster `{}`: tls.sni `{sni}` is not a valid DNS name", c.name));
        }
    }
    errors
}

#[cfg(test)]
mod tests;

/// TLS, or mTLS with a client certificate, towards a control plane: the ADS cluster's
/// `transport_socket`, with certificates and CAs loaded as for any cluster (re-read when the
/// files change) and ALPN `h2` for gRPC.
pub struct ControlPlaneTls(ClientTls);

impl ControlPlaneTls {
    /// Loads what `tls` names; `cfg` is the configuration that defines it (its secrets). Reads
    /// files: call at startup or from a blocking thread.
    pub fn new(cfg: &Config, tls: &UpstreamTls) -> Result<ControlPlaneTls, String> {
        let stats = Stats::default();
        let secrets = SecretSet::build(cfg, &SecretSet::default(), &stats).map_err(|e| e.to_string())?;
        let ssl = Arc::new(SslStats::new(&stats, &crate::stats::Scope::plain("xds")));
        let client = ClientTls::new(tls.clone(), secrets.deps_for(&tls.common), ssl)?;
        Ok(ControlPlaneTls(client))
    }

    /// The client handshake on a connected socket.
    pub async fn connect(
        &self,
        tcp: TcpStream,
    ) -> io::Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> {
        let ip = tcp.peer_addr()?.ip();
        self.0.connect(tcp, ip, Alpn::Http2).await.map_err(|(_, e)| e)
    }
}

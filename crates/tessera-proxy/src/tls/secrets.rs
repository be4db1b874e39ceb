//! The secret store: certificates and trust bundles by name, read from files (and, once xDS
//! lands, from SDS), checked, and swapped atomically when their files change. TLS contexts hold
//! `Arc<SecretRt>`s and rebuild their rustls configs when a secret's version moves, so new
//! handshakes use the new certificate while open connections go on with the old one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tessera_model::{At, CertificateFiles, DataSource, SecretKind, TrustedCa};

use super::x509::{self, CertInfo};
use crate::stats::{Counter, Gauge, Scope, Stats};

/// Why a secret could not be loaded. Names the configuration place and the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{at}: {what}")]
pub struct SecretError {
    /// Where the secret is configured.
    pub at: At,
    /// What is wrong, naming the file.
    pub what: String,
}

/// What identifies a secret across reloads: its name (or, for certificates written in place, its
/// files) and its definition. The same key means the same `SecretRt` is kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum SecretKey {
    /// A certificate from the `secrets` list.
    NamedCert(String, CertificateFiles),
    /// A trust bundle from the `secrets` list.
    NamedCa(String, TrustedCa),
    /// A certificate written inside a TLS context.
    InlineCert(CertificateFiles),
    /// A trust bundle written inside a TLS context.
    InlineCa(TrustedCa),
}

impl SecretKey {
    pub(crate) fn from_model(name: &str, kind: &SecretKind) -> SecretKey {
        match kind {
            SecretKind::TlsCertificate(c) => SecretKey::NamedCert(name.to_string(), c.clone()),
            SecretKind::ValidationContext(v) => SecretKey::NamedCa(name.to_string(), v.clone()),
        }
    }

    /// The name shown in logs, stats and `/certs`.
    pub(crate) fn display_name(&self) -> String {
        match self {
            SecretKey::NamedCert(n, _) | SecretKey::NamedCa(n, _) => n.clone(),
            SecretKey::InlineCert(c) => format!("file:{}", c.certificate_chain.describe()),
            SecretKey::InlineCa(v) => format!("file:{}", v.trusted_ca.describe()),
        }
    }

    fn at(&self) -> &At {
        match self {
            SecretKey::NamedCert(_, c) | SecretKey::InlineCert(c) => &c.at,
            SecretKey::NamedCa(_, v) | SecretKey::InlineCa(v) => &v.at,
        }
    }
}

/// A loaded certificate with its key.
#[derive(Debug)]
pub(crate) struct CertMaterial {
    pub(crate) key: Arc<CertifiedKey>,
    /// The leaf's fields.
    pub(crate) leaf: CertInfo,
    /// The rest of the chain's fields.
    pub(crate) chain: Vec<CertInfo>,
    /// DNS SANs of the leaf, lower case, for choosing a certificate by SNI.
    pub(crate) names: Vec<String>,
}

/// A loaded trust bundle.
#[derive(Debug)]
pub(crate) struct CaMaterial {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) certs: Vec<CertInfo>,
}

/// What a secret holds once loaded.
#[derive(Debug)]
pub(crate) enum Material {
    Cert(Box<CertMaterial>),
    Ca(CaMaterial),
}

struct SecretStats {
    update_success: Arc<Counter>,
    update_rejected: Arc<Counter>,
    /// Days until the earliest expiry among its certificates (negative once expired).
    days_until_expiration: Arc<Gauge>,
}

/// A secret at run time.
pub(crate) struct SecretRt {
    pub(crate) key: SecretKey,
    pub(crate) name: String,
    current: ArcSwapOption<Material>,
    /// Bumped on every successful update; TLS contexts compare it to rebuild.
    version: AtomicU64,
    /// The bytes last loaded, to tell a real change from a touch.
    last: std::sync::Mutex<Vec<Vec<u8>>>,
    /// The last load error, for `/certs`.
    pub(crate) last_error: ArcSwapOption<String>,
    stats: SecretStats,
}

impl std::fmt::Debug for SecretRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRt").field("name", &self.name).finish()
    }
}

impl SecretRt {
    /// A secret, loaded now; the error says which file and field are wrong.
    pub(crate) fn load(key: SecretKey, stats: &Stats) -> Result<SecretRt, SecretError> {
        let name = key.display_name();
        let scope = Scope::tagged("secret", "secret_name", &name);
        let rt = SecretRt {
            name,
            current: ArcSwapOption::empty(),
            version: AtomicU64::new(0),
            last: std::sync::Mutex::new(Vec::new()),
            last_error: ArcSwapOption::empty(),
            stats: SecretStats {
                update_success: stats.counter(&scope, "update_success"),
                update_rejected: stats.counter(&scope, "update_rejected"),
                days_until_expiration: stats.gauge(&scope, "days_until_expiration"),
            },
            key,
        };
        let bytes = rt.read()?;
        rt.install(bytes)?;
        Ok(rt)
    }

    /// The current material; always present once `load` succeeded.
    pub(crate) fn material(&self) -> Option<Arc<Material>> {
        self.current.load_full()
    }

    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Reads the files again (blocking IO: call from a blocking thread) and swaps in the new
    /// material if the bytes changed and check out. Returns whether anything changed. On error the
    /// old material stays and the error is counted and kept for `/certs`.
    pub(crate) fn refresh(&self) -> Result<bool, SecretError> {
        let r = self.read().and_then(|bytes| {
            let same = self.last.lock().map(|l| *l == bytes).unwrap_or(false);
            if same {
                return Ok(false);
            }
            self.install(bytes).map(|()| true)
        });
        match &r {
            Ok(true) => {
                self.last_error.store(None);
                if let Some(Material::Cert(c)) = self.material().as_deref() {
                    tracing::info!(
                        secret = %self.name,
                        serial = %c.leaf.serial,
                        not_after = %x509::rfc3339(c.leaf.not_after),
                        "certificate rotated; new handshakes use it"
                    );
                } else {
                    tracing::info!(secret = %self.name, "trust bundle updated");
                }
            }
            Ok(false) => {}
            Err(e) => {
                let msg = e.to_string();
                let repeated = self.last_error.load().as_deref().is_some_and(|m| *m == msg);
                if !repeated {
                    tracing::warn!(secret = %self.name, error = %msg, "secret update rejected; keeping the previous one");
                    self.stats.update_rejected.inc();
                }
                self.last_error.store(Some(Arc::new(msg)));
            }
        }
        r
    }

    /// The bytes of each of the secret's sources, in order.
    fn read(&self) -> Result<Vec<Vec<u8>>, SecretError> {
        let at = self.key.at();
        let mut out = Vec::new();
        let sources: Vec<(&DataSource, &str)> = match &self.key {
            SecretKey::NamedCert(_, c) | SecretKey::InlineCert(c) => vec![
                (&c.certificate_chain, "certificate_chain"),
                (&c.private_key.0, "private_key"),
            ],
            SecretKey::NamedCa(_, v) | SecretKey::InlineCa(v) => vec![(&v.trusted_ca, "trusted_ca")],
        };
        for (src, field) in sources {
            match src {
                DataSource::InlineString(s) => out.push(s.as_bytes().to_vec()),
                DataSource::Filename(p) => {
                    let b = std::fs::read(p).map_err(|e| SecretError {
                        at: at.clone(),
                        what: format!("{field}: cannot read {}: {e}", p.display()),
                    })?;
                    out.push(b);
                }
            }
        }
        Ok(out)
    }

    fn install(&self, bytes: Vec<Vec<u8>>) -> Result<(), SecretError> {
        let at = self.key.at();
        let err = |what: String| SecretError { at: at.clone(), what };
        let now = now_secs();
        let material = match &self.key {
            SecretKey::NamedCert(_, c) | SecretKey::InlineCert(c) => {
                let chain_pem = bytes.first().map(Vec::as_slice).unwrap_or_default();
                let key_pem = bytes.get(1).map(Vec::as_slice).unwrap_or_default();
                let chain_src = c.certificate_chain.describe();
                let key_src = c.private_key.0.describe();
                let chain =
                    certs_from_pem(chain_pem).map_err(|e| err(format!("certificate_chain ({chain_src}): {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
                    err(format!(
                        "private_key ({key_src}): no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
                    ))
                })?;
                let provider = super::default_provider();
                let ck = CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
                    err(format!(
                        "private_key ({key_src}) does not fit certificate_chain ({chain_src}): {e}"
                    ))
                })?;
                let mut infos = Vec::with_capacity(chain.len());
                for (i, c) in chain.iter().enumerate() {
                    infos.push(
                        x509::parse(c)
                            .map_err(|e| err(format!("certificate_chain ({chain_src}) certificate {i}: {e}")))?,
                    );
                }
                let leaf = infos.remove(0);
                if leaf.not_after < now {
                    // Like Envoy: an expired certificate is still served (peers decide), but say so.
                    tracing::warn!(
                        secret = %self.name,
                        not_after = %x509::rfc3339(leaf.not_after),
                        "certificate has expired"
                    );
                }
                let names = leaf.dns.iter().map(|n| n.to_ascii_lowercase()).collect();
                self.stats
                    .days_until_expiration
                    .set((leaf.not_after - now).div_euclid(86_400));
                Material::Cert(Box::new(CertMaterial {
                    key: Arc::new(ck),
                    leaf,
                    chain: infos,
                    names,
                }))
            }
            SecretKey::NamedCa(_, v) | SecretKey::InlineCa(v) => {
                let src = v.trusted_ca.describe();
                let pem = bytes.first().map(Vec::as_slice).unwrap_or_default();
                let certs = certs_from_pem(pem).map_err(|e| err(format!("trusted_ca ({src}): {e}")))?;
                let mut roots = RootCertStore::empty();
                let mut infos = Vec::new();
                for (i, c) in certs.into_iter().enumerate() {
                    infos.push(x509::parse(&c).map_err(|e| err(format!("trusted_ca ({src}) certificate {i}: {e}")))?);
                    roots
                        .add(c)
                        .map_err(|e| err(format!("trusted_ca ({src}) certificate {i} is not a usable CA: {e}")))?;
                }
                let earliest = infos.iter().map(|c| c.not_after).min().unwrap_or(now);
                self.stats
                    .days_until_expiration
                    .set((earliest - now).div_euclid(86_400));
                Material::Ca(CaMaterial {
                    roots: Arc::new(roots),
                    certs: infos,
                })
            }
        };
        self.current.store(Some(Arc::new(material)));
        if let Ok(mut l) = self.last.lock() {
            *l = bytes;
        }
        self.version.fetch_add(1, Ordering::AcqRel);
        self.stats.update_success.inc();
        Ok(())
    }
}

fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        out.push(c.map_err(|e| format!("bad PEM: {e}"))?);
    }
    if out.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) found".into());
    }
    Ok(out)
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

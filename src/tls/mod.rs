//! TLS settings made usable: the rustls configurations for clients (`client_tls_*`) and for
//! upstream servers (`server_tls_*`), built when the configuration is read, so a reload reads
//! the certificates again while established connections keep the session they have.
//!
//! One crypto provider (ring) for everything. Modes keep PgBouncer's names and meanings.

pub mod accept;
pub mod connect;
mod verify;

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::config::General;

/// PgBouncer's `*_tls_sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum SslMode {
    #[serde(rename = "disable")]
    Disable,
    #[serde(rename = "allow")]
    Allow,
    #[serde(rename = "prefer")]
    Prefer,
    #[serde(rename = "require")]
    Require,
    #[serde(rename = "verify-ca")]
    VerifyCa,
    #[serde(rename = "verify-full")]
    VerifyFull,
}

impl SslMode {
    /// Plain text is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// The peer's certificate must chain to the configured CA.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Why TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Setting(String),
    #[error("{key}: {reason}")]
    Rustls {
        key: &'static str,
        reason: rustls::Error,
    },
}

/// The TLS side of the configuration, ready to use.
#[derive(Clone, Default)]
pub struct Tls {
    /// For clients; `None` when `client_tls_sslmode = disable`.
    pub clients: Option<tokio_rustls::TlsAcceptor>,
    pub client_mode: Option<SslMode>,
    /// For upstream servers.
    pub servers: Upstream,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_mode", &self.client_mode)
            .field("server_mode", &self.servers.mode)
            .finish()
    }
}

/// How server connections are made: the mode, and the rustls client when it is used.
#[derive(Clone)]
pub struct Upstream {
    pub mode: SslMode,
    pub connector: Option<tokio_rustls::TlsConnector>,
    /// A digest of the settings and the files read: a pool whose TLS changed on reload is
    /// replaced, so new servers use the new certificates.
    digest: u64,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            mode: SslMode::Disable,
            connector: None,
            digest: 0,
        }
    }
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.digest == other.digest
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({:?})", self.mode)
    }
}

/// Reads the certificate files and builds both sides.
pub fn load(g: &General) -> Result<Tls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (clients, client_mode) = match g.client_tls_sslmode {
        SslMode::Disable => (None, None),
        mode => (Some(client_side(g, mode, &provider)?), Some(mode)),
    };
    Ok(Tls {
        clients,
        client_mode,
        servers: upstream_side(g, &provider)?,
    })
}

/// The ALPN protocol PostgreSQL 17 defines (required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn client_side(
    g: &General,
    mode: SslMode,
    provider: &Arc<CryptoProvider>,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let (Some(cert), Some(key)) = (&g.client_tls_cert_file, &g.client_tls_key_file) else {
        return Err(TlsError::Setting(format!(
            "client_tls_sslmode = {} needs client_tls_cert_file and client_tls_key_file",
            mode_name(mode)
        )));
    };
    let chain = certificates("client_tls_cert_file", cert)?;
    let key = private_key("client_tls_key_file", key)?;
    let provider = restricted(provider, "client_tls_ciphers", &g.client_tls_ciphers)?;
    let versions = versions("client_tls_protocols", &g.client_tls_protocols)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|reason| TlsError::Rustls {
            key: "client_tls_protocols",
            reason,
        })?;
    let builder = if mode.verifies() {
        let Some(ca) = &g.client_tls_ca_file else {
            return Err(TlsError::Setting(format!(
                "client_tls_sslmode = {} needs client_tls_ca_file (the CA client certificates must be signed by)",
                mode_name(mode)
            )));
        };
        let roots = roots("client_tls_ca_file", ca)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Setting(format!("client_tls_ca_file: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|reason| TlsError::Rustls {
            key: "client_tls_key_file",
            reason,
        })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn upstream_side(g: &General, provider: &Arc<CryptoProvider>) -> Result<Upstream, TlsError> {
    let mode = g.server_tls_sslmode;
    if mode == SslMode::Disable {
        return Ok(Upstream::default());
    }
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    (mode, &g.server_tls_protocols, &g.server_tls_ciphers).hash(&mut digest);
    let provider = restricted(provider, "server_tls_ciphers", &g.server_tls_ciphers)?;
    let versions = versions("server_tls_protocols", &g.server_tls_protocols)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|reason| TlsError::Rustls {
            key: "server_tls_protocols",
            reason,
        })?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = if mode.verifies() {
        let Some(ca) = &g.server_tls_ca_file else {
            return Err(TlsError::Setting(format!(
                "server_tls_sslmode = {} needs server_tls_ca_file (the CA the server's certificate must be signed by)",
                mode_name(mode)
            )));
        };
        read("server_tls_ca_file", ca)?.hash(&mut digest);
        let roots = roots("server_tls_ca_file", ca)?;
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Setting(format!("server_tls_ca_file: {e}")))?;
        Arc::new(verify::Chain {
            webpki,
            check_name: mode == SslMode::VerifyFull,
        })
    } else {
        Arc::new(verify::Encryption { provider })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&g.server_tls_cert_file, &g.server_tls_key_file) {
        (Some(cert), Some(key)) => {
            read("server_tls_cert_file", cert)?.hash(&mut digest);
            read("server_tls_key_file", key)?.hash(&mut digest);
            let chain = certificates("server_tls_cert_file", cert)?;
            let key = private_key("server_tls_key_file", key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|reason| TlsError::Rustls {
                    key: "server_tls_key_file",
                    reason,
                })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Setting(
                "server_tls_cert_file and server_tls_key_file go together".into(),
            ));
        }
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Upstream {
        mode,
        connector: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
        digest: digest.finish(),
    })
}

pub fn mode_name(mode: SslMode) -> String {
    toml::Value::try_from(mode)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let bad = |reason: String| TlsError::File {
        key,
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(chain)
}

fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
        key,
        path: path.display().to_string(),
        reason: format!("no PEM private key in it: {e}"),
    })
}

fn roots(key: &'static str, path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certificates(key, path)? {
        store
            .add(cert)
            .map_err(|reason| TlsError::Rustls { key, reason })?;
    }
    Ok(Arc::new(store))
}

/// `*_tls_protocols`: PgBouncer's keywords (`secure`, `default`, `all`, `legacy`) or a list of
/// `tlsv1.2` / `tlsv1.3`. rustls has no TLS 1.0 or 1.1; naming only those is an error.
fn versions(
    key: &'static str,
    value: &str,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
    let mut out = Vec::new();
    for word in value
        .split([',', ':', ' '])
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
    {
        match word.as_str() {
            "secure" | "default" | "all" | "legacy" => {
                out = vec![&rustls::version::TLS13, &rustls::version::TLS12];
            }
            "tlsv1.3" => out.push(&rustls::version::TLS13),
            "tlsv1.2" => out.push(&rustls::version::TLS12),
            "tlsv1" | "tlsv1.0" | "tlsv1.1" => {
                tracing::warn!("{key}: {word} is not supported (rustls does TLS 1.2 and 1.3 only)")
            }
            other => {
                return Err(TlsError::Setting(format!(
                    "{key}: unknown protocol `{other}` (secure, all, tlsv1.2, tlsv1.3)"
                )));
            }
        }
    }
    out.dedup();
    if out.is_empty() {
        return Err(TlsError::Setting(format!(
            "{key} = \"{value}\" leaves no protocol rustls supports (tlsv1.2, tlsv1.3)"
        )));
    }
    Ok(out)
}

/// `*_tls_ciphers`: PgBouncer's keywords and OpenSSL expressions mean rustls's own suites (all
/// modern AEAD ones); a list naming suites (rustls or OpenSSL spelling) keeps exactly those.
fn restricted(
    provider: &Arc<CryptoProvider>,
    key: &'static str,
    value: &str,
) -> Result<Arc<CryptoProvider>, TlsError> {
    let wanted: Vec<String> = value
        .split([':', ',', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_uppercase().replace('-', "_"))
        .collect();
    let named: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|s| {
            let name = format!("{:?}", s.suite());
            wanted.iter().any(|w| suite_matches(&name, w))
        })
        .copied()
        .collect();
    if named.is_empty() {
        return Ok(provider.clone());
    }
    tracing::debug!(key, suites = named.len(), "cipher suites restricted");
    Ok(Arc::new(CryptoProvider {
        cipher_suites: named,
        ..(**provider).clone()
    }))
}

/// Whether rustls's suite `name` (`TLS13_AES_128_GCM_SHA256`,
/// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`) is what `wanted` names, in rustls/IANA spelling or
/// OpenSSL's (`TLS_AES_128_GCM_SHA256`, `ECDHE_RSA_AES128_GCM_SHA256` after `-` became `_`).
fn suite_matches(name: &str, wanted: &str) -> bool {
    if name == wanted || name.replace("TLS13_", "TLS_") == wanted {
        return true;
    }
    let openssl = name
        .trim_start_matches("TLS_")
        .replace("_WITH_", "_")
        .replace("AES_128", "AES128")
        .replace("AES_256", "AES256")
        .replace("_CHACHA20_POLY1305_SHA256", "_CHACHA20_POLY1305");
    openssl == wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_words() {
        assert_eq!(versions("k", "secure").unwrap().len(), 2);
        assert_eq!(versions("k", "tlsv1.3").unwrap().len(), 1);
        assert_eq!(versions("k", "tlsv1.1,tlsv1.2").unwrap().len(), 1);
        assert!(versions("k", "tlsv1.1").is_err());
        assert!(versions("k", "sslv3").is_err());
    }

    #[test]
    fn cipher_names_in_both_spellings() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let all = provider.cipher_suites.len();
        assert_eq!(
            restricted(&provider, "k", "default")
                .unwrap()
                .cipher_suites
                .len(),
            all
        );
        assert_eq!(
            restricted(&provider, "k", "HIGH:!aNULL")
                .unwrap()
                .cipher_suites
                .len(),
            all
        );
        let two = restricted(
            &provider,
            "k",
            "TLS_AES_128_GCM_SHA256:ECDHE-RSA-AES256-GCM-SHA384",
        )
        .unwrap();
        let names: Vec<String> = two
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(
            names,
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
            ]
        );
        let chacha = restricted(&provider, "k", "ECDHE-ECDSA-CHACHA20-POLY1305").unwrap();
        assert_eq!(chacha.cipher_suites.len(), 1);
    }
}

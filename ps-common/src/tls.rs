//! TLS settings read from PEM files (`--tls-cert`, `--tls-key`,
//! `--tls-ca`), turned into tonic's rustls configurations for servers,
//! workers and the servers' connections to each other, and into a plain
//! rustls server configuration for the serving REST endpoint.
//!
//! One file set serves every role of a process: its certificate and key
//! (a server's identity, or a client's for mutual TLS) and the CA bundle it
//! trusts (to verify servers, and on a server requiring client
//! certificates, to verify clients).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// A TLS file could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or not PEM.
    #[error("{flag} {path}: {message}")]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The flags do not fit together.
    #[error("{0}")]
    Flags(String),
}

/// The TLS files of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA bundle trusted for peers (PEM).
    pub ca: Option<PathBuf>,
}

impl TlsError {
    /// What is wrong with the file `path` that `flag` named.
    fn file(flag: &'static str, path: &Path, message: String) -> TlsError {
        TlsError::File {
            flag,
            path: path.to_path_buf(),
            message,
        }
    }
}

/// Reads a PEM file, checking that it holds at least one PEM block.
fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes =
        std::fs::read(path).map_err(|e| TlsError::file(flag, path, format!("cannot read: {e}")))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::file(
            flag,
            path,
            "is not a PEM file (no -----BEGIN line)".into(),
        ));
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Whether any TLS file was given.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// The certificate and key as an identity, if both are given (one
    /// without the other is an error).
    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
                read_pem("--tls-cert", cert)?,
                read_pem("--tls-key", key)?,
            ))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Flags(
                "--tls-cert and --tls-key go together".into(),
            )),
        }
    }

    /// A server's TLS: its certificate and key (required); with
    /// `require_client_cert`, clients must present a certificate signed by
    /// `--tls-ca` (mutual TLS). `None` when no TLS file was given.
    pub fn server(&self, require_client_cert: bool) -> Result<Option<ServerTlsConfig>, TlsError> {
        if !self.enabled() {
            if require_client_cert {
                return Err(TlsError::Flags(
                    "--tls-require-client-cert needs --tls-cert, --tls-key and --tls-ca".into(),
                ));
            }
            return Ok(None);
        }
        let identity = self
            .identity()?
            .ok_or_else(|| TlsError::Flags("a TLS server needs --tls-cert and --tls-key".into()))?;
        let mut config = ServerTlsConfig::new().identity(identity);
        if require_client_cert {
            let ca = self.ca.as_ref().ok_or_else(|| {
                TlsError::Flags("--tls-require-client-cert needs --tls-ca".into())
            })?;
            config = config.client_ca_root(Certificate::from_pem(read_pem("--tls-ca", ca)?));
        }
        Ok(Some(config))
    }

    /// A client's TLS: trusts `--tls-ca`, presents the certificate and key
    /// if given (for servers requiring client certificates). `None` when
    /// no TLS file was given.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let ca = self.ca.as_ref().ok_or_else(|| {
            TlsError::Flags("a TLS client needs --tls-ca to verify the servers".into())
        })?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
        if let Some(identity) = self.identity()? {
            config = config.identity(identity);
        }
        Ok(Some(config))
    }
}

impl TlsFiles {
    /// A rustls server configuration from these files, for endpoints tonic
    /// does not serve (the serving REST endpoint, HTTP/1.1): the
    /// certificate chain and key; with `require_client_cert`, clients must
    /// present a certificate signed by the CA. `names` are the flags that
    /// name the certificate, key and CA files, for errors. `None` when no
    /// file was given.
    pub fn rustls_server(
        &self,
        require_client_cert: bool,
        names: [&'static str; 3],
    ) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let [cert_flag, key_flag, ca_flag] = names;
        let (cert_path, key_path) = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) if self.ca.is_none() && !require_client_cert => return Ok(None),
            _ => {
                return Err(TlsError::Flags(format!(
                    "a TLS endpoint needs {cert_flag} and {key_flag}{}",
                    if require_client_cert {
                        format!(" (and {ca_flag} to verify clients)")
                    } else {
                        String::new()
                    }
                )));
            }
        };
        let bad = TlsError::file;
        let certs = CertificateDer::pem_slice_iter(&read_pem(cert_flag, cert_path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert_flag, cert_path, format!("bad certificate: {e}")))?;
        if certs.is_empty() {
            return Err(bad(cert_flag, cert_path, "holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read_pem(key_flag, key_path)?)
            .map_err(|e| bad(key_flag, key_path, format!("holds no private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Flags(format!("TLS versions: {e}")))?;
        let builder = if require_client_cert {
            let ca_path = self.ca.as_ref().ok_or_else(|| {
                TlsError::Flags(format!(
                    "client certificates are verified against {ca_flag}: give it"
                ))
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&read_pem(ca_flag, ca_path)?) {
                let ca = ca.map_err(|e| bad(ca_flag, ca_path, format!("bad certificate: {e}")))?;
                roots
                    .add(ca)
                    .map_err(|e| bad(ca_flag, ca_path, format!("not a CA certificate: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad(ca_flag, ca_path, format!("cannot verify clients: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad(key_flag, key_path, format!("does not fit {cert_flag}: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// An endpoint for `addr` (`HOST:PORT`, or a full URI kept as given):
/// `https` with `tls`, `http` without. Every client of a server (workers,
/// peer servers, health checks) builds its connection here, with the
/// HTTP/2 settings of [`crate::http2`].
pub fn endpoint(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint = crate::http2::client(Endpoint::from_shared(uri(addr, tls.is_some()))?);
    match tls {
        Some(tls) => endpoint.tls_config(tls),
        None => Ok(endpoint),
    }
}

/// The URI of `addr` for a connection with or without TLS.
fn uri(addr: &str, tls: bool) -> String {
    match (addr.contains("://"), tls) {
        (true, _) => addr.to_string(),
        (false, true) => format!("https://{addr}"),
        (false, false) => format!("http://{addr}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_that_do_not_fit_together_are_refused_with_their_names() {
        let dir = std::env::temp_dir().join(format!("ps-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let only_cert = TlsFiles {
            cert: Some(not_pem.clone()),
            ..TlsFiles::default()
        };
        assert!(
            only_cert
                .server(false)
                .unwrap_err()
                .to_string()
                .contains("--tls-key")
        );
        let no_ca = TlsFiles {
            cert: Some(not_pem.clone()),
            key: Some(not_pem.clone()),
            ca: None,
        };
        assert!(no_ca.client().unwrap_err().to_string().contains("--tls-ca"));
        let err = no_ca.server(false).unwrap_err().to_string();
        assert!(
            err.contains("--tls-cert") && err.contains("not a PEM file"),
            "{err}"
        );
        let missing = TlsFiles {
            ca: Some(dir.join("missing.pem")),
            ..TlsFiles::default()
        };
        assert!(
            missing
                .client()
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
        assert!(TlsFiles::default().client().unwrap().is_none());
        assert!(TlsFiles::default().server(true).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn uris_get_the_scheme_of_their_transport() {
        assert_eq!(uri("h:1", false), "http://h:1");
        assert_eq!(uri("h:1", true), "https://h:1");
        assert_eq!(uri("https://h:1", false), "https://h:1");
    }
}

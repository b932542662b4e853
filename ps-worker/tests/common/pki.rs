//! Test certificates (rcgen): a CA, and a server and a client
//! certificate it signed, as PEM files.

use std::path::{Path, PathBuf};

/// A CA and a server and a client certificate it signed, as PEM files.
pub struct Pki {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// A certificate for 127.0.0.1 and localhost, and its key.
    pub server: [PathBuf; 2],
    /// A client certificate, and its key.
    pub client: [PathBuf; 2],
}

/// A fresh CA named by `tag`, with its certificates, written under `dir`.
pub fn pki(dir: &Path, tag: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, Issuer, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let issuer: &Issuer<'_, KeyPair> = &ca;
    let write = |name: &str, text: String| {
        let path = dir.join(format!("{tag}-{name}.pem"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = |name: &str, names: &[&str]| {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        [
            write(&format!("{name}-cert"), cert.pem()),
            write(&format!("{name}-key"), key.serialize_pem()),
        ]
    };
    Pki {
        server: leaf("server", &["127.0.0.1", "localhost"]),
        client: leaf("client", &["worker"]),
        ca: write("ca", ca.pem()),
    }
}

//! The console's TLS identity: a self-signed certificate made once and kept in the daemon's
//! store (as VMMS keeps its own), so clients that pin it keep trusting it across restarts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types};

use super::ConsoleError;

const CERT_FILE: &str = "console-cert.der";
const KEY_FILE: &str = "console-key.der";

/// The certificate, its key, and what CredSSP binds to.
#[derive(Clone)]
pub struct TlsIdentity {
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_bytes", &self.cert_der.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Loads the identity from `dir`, or makes one for `host_name` and keeps it there (written
    /// atomically; the key readable by the owner only).
    pub fn load_or_create(dir: &Path, host_name: &str) -> Result<TlsIdentity, ConsoleError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert_path.exists() && key_path.exists() {
            let cert_der = fs::read(&cert_path).map_err(|e| io_error(&cert_path, e))?;
            let key_der = fs::read(&key_path).map_err(|e| io_error(&key_path, e))?;
            return TlsIdentity::from_der(cert_der, key_der);
        }
        let key = rcgen::KeyPair::generate().map_err(ConsoleError::Certificate)?;
        let mut params = rcgen::CertificateParams::new(vec![host_name.to_owned()])
            .map_err(ConsoleError::Certificate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host_name);
        let cert = params
            .self_signed(&key)
            .map_err(ConsoleError::Certificate)?;
        fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let key_der = key.serialize_der();
        write_atomically(&key_path, &key_der, 0o600)?;
        write_atomically(&cert_path, cert.der(), 0o644)?;
        TlsIdentity::from_der(cert.der().to_vec(), key_der)
    }

    fn from_der(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<TlsIdentity, ConsoleError> {
        let key =
            rcgen::KeyPair::try_from(key_der.as_slice()).map_err(ConsoleError::Certificate)?;
        Ok(TlsIdentity {
            public_key: key.public_key_raw().to_vec(),
            cert_der,
            key_der,
        })
    }

    /// The certificate (DER).
    pub fn certificate(&self) -> &[u8] {
        &self.cert_der
    }

    /// The certificate's `subjectPublicKey`: what CredSSP's `pubKeyAuth` is computed over.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// A TLS acceptor presenting this certificate.
    pub fn acceptor(&self) -> Result<TlsAcceptor, ConsoleError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ConsoleError::Tls)?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone().into()], key)
            .map_err(ConsoleError::Tls)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn io_error(path: &Path, source: std::io::Error) -> ConsoleError {
    ConsoleError::Store {
        path: path.to_owned(),
        source,
    }
}

/// temp + fsync + rename + fsync of the folder.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConsoleError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut temp = PathBuf::from(path);
    temp.set_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)
        .map_err(|e| io_error(&temp, e))?;
    file.write_all(bytes).map_err(|e| io_error(&temp, e))?;
    file.sync_all().map_err(|e| io_error(&temp, e))?;
    fs::rename(&temp, path).map_err(|e| io_error(path, e))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(dir, e))?;
    }
    Ok(())
}

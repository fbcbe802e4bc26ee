//! The HTTPS identity: rustls with the ring provider, from PEM files.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{ServerError, TlsFiles};

pub(super) fn acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| ServerError::ReadPem {
            path: path.clone(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| ServerError::ReadPem {
            path: files.cert.clone(),
            source,
        })?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| ServerError::ReadPem {
            path: files.key.clone(),
            source,
        })?
        .ok_or_else(|| ServerError::NoPrivateKey(files.key.clone()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ServerError::Tls)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(ServerError::Tls)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

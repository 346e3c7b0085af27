//! TLS 1.3 only (rustls, ring provider), certificates reloaded from disk when they change,
//! and the accept loop with its connection limits and graceful shutdown.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::Limits;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {0}")]
    Cert(String),
    #[error("cannot read TLS private key {0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The serving certificate and key, re-read when their files change on disk, so a renewed
/// or replaced certificate is served without a restart (new handshakes get it; open
/// connections keep theirs). Implements rustls' [`ResolvesServerCert`].
#[derive(Debug)]
pub struct CertificateReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
    /// The files' modification times when they last failed to load: not retried (nor
    /// reported again) until they change.
    failed: std::sync::Mutex<Option<Stamp>>,
}

/// Modification times of the certificate and key files.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

#[derive(Debug)]
struct Loaded {
    certified: Arc<CertifiedKey>,
    /// Modification times of the certificate and key files when they were read.
    stamp: Stamp,
    not_after: Option<i64>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_pair(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let stamp = (modified(cert), modified(key));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|_| TlsError::Cert(cert.display().to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Cert(cert.display().to_string()))?;
    let not_after = certs.first().and_then(|c| der_not_after(c));
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|_| TlsError::Key(key.display().to_string()))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let certified = CertifiedKey::new(certs, signing);
    // The key must be the certificate's (a renewal that wrote one file but not the other
    // is refused rather than served).
    certified
        .keys_match()
        .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?;
    Ok(Loaded {
        certified: Arc::new(certified),
        stamp,
        not_after,
    })
}

/// The `notAfter` of a DER certificate (Unix seconds).
fn der_not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The `notAfter` of the first certificate in the PEM file at `path` (Unix seconds), if it
/// parses.
pub fn certificate_not_after(path: &Path) -> Option<i64> {
    let first = CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    der_not_after(&first)
}

impl CertificateReloader {
    /// Reads the PEM certificate chain and private key.
    ///
    /// # Errors
    /// `Cert`/`Key` when a file cannot be read or parsed; `Config` when they do not match.
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(CertificateReloader {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(load_pair(cert, key)?),
            failed: std::sync::Mutex::new(None),
        }))
    }

    /// Re-reads the files if either changed since they were last read. `Ok(true)` when a
    /// new certificate is now served; on an error the old one stays in service, and the
    /// same files are not tried (nor the error returned) again until they change.
    ///
    /// # Errors
    /// As [`CertificateReloader::new`], for the changed files.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = (modified(&self.cert), modified(&self.key));
        let same = match self.current.read() {
            Ok(c) => c.stamp == stamp,
            Err(p) => p.into_inner().stamp == stamp,
        };
        let failed_before = match self.failed.lock() {
            Ok(f) => *f == Some(stamp),
            Err(p) => *p.into_inner() == Some(stamp),
        };
        if same || failed_before {
            return Ok(false);
        }
        let loaded = match load_pair(&self.cert, &self.key) {
            Ok(l) => l,
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    *f = Some(stamp);
                }
                return Err(e);
            }
        };
        match self.current.write() {
            Ok(mut c) => *c = loaded,
            Err(p) => *p.into_inner() = loaded,
        }
        Ok(true)
    }

    /// The served certificate's `notAfter` (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        match self.current.read() {
            Ok(c) => c.not_after,
            Err(p) => p.into_inner().not_after,
        }
    }
}

impl ResolvesServerCert for CertificateReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(c) => Some(c.certified.clone()),
            Err(p) => Some(p.into_inner().certified.clone()),
        }
    }
}

/// A TLS 1.3-only server configuration (ALPN `h2`, `http/1.1`) serving `reloader`'s
/// certificate.
///
/// # Errors
/// `Config` if rustls refuses the protocol set.
pub fn tls_config(reloader: Arc<CertificateReloader>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(reloader);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS 1.3-only server configuration from PEM files (not reloaded).
///
/// # Errors
/// As [`CertificateReloader::new`].
pub fn load_tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    tls_config(CertificateReloader::new(cert, key)?)
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then stops accepting
/// and lets in-flight requests finish (up to 30 s).
///
/// Limits ([`Limits`]): at most `max_connections` connections are served at once (more
/// wait in the listen backlog); a TLS handshake must finish within `handshake_timeout`;
/// HTTP/1.1 request headers must arrive within `header_timeout` of the connection being
/// ready for them, which also closes idle keep-alive connections; HTTP/2 connections are
/// pinged and closed when the client stops answering. The protocol is chosen by ALPN
/// (`h2`, else HTTP/1.1), never by waiting for the client's first bytes.
pub async fn serve(
    app: Router,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let limits = Arc::new(limits);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = crate::with_peer(app.clone(), peer);
                let watcher = graceful.watcher();
                let limits = limits.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        _ => return,
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = TowerToHyperService::new(app);
                    let io = TokioIo::new(stream);
                    if h2 {
                        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        b.timer(TokioTimer::new())
                            .keep_alive_interval(Some(limits.header_timeout))
                            .keep_alive_timeout(limits.handshake_timeout)
                            .max_concurrent_streams(256);
                        let _ = watcher.watch(b.serve_connection(io, svc)).await;
                    } else {
                        let mut b = hyper::server::conn::http1::Builder::new();
                        b.timer(TokioTimer::new())
                            .header_read_timeout(Some(limits.header_timeout))
                            .max_buf_size(256 * 1024);
                        let _ = watcher.watch(b.serve_connection(io, svc)).await;
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

//! TLS and mTLS for the gRPC listener with rustls, reloaded on SIGHUP or when the files change;
//! and the connection type that carries the peer's identity to caller authentication.
//!
//! Owns certificate loading and the TLS handshake; admission (limits, deadlines, accept
//! backoff) is src/listener.rs. Knows nothing of the gRPC service itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::api::auth::{ClientCertFingerprint, sha256_hex};
use crate::config::TlsConfig;
use crate::listener::{Admitted, Guarded};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read_certs(key: &'static str, path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        key,
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Builds the rustls config from the files named in `cfg` (fresh each call, for reloads).
pub fn load(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("server.tls.cert_file", &cfg.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| TlsError::File {
        key: "server.tls.key_file",
        path: cfg.key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("server.tls.client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Config(format!("server.tls.client_ca_file: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(format!("server.tls.client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("server.tls.cert_file / key_file: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a connection tells the service about its peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub client_cert: Option<ClientCertFingerprint>,
}

/// A TLS connection that reports its peer's certificate fingerprint.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The current TLS config, swapped on reload; each new connection uses the one in force.
#[derive(Clone)]
pub struct Reloadable {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Reloadable {
    pub fn new(cfg: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(RwLock::new(load(cfg)?)),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        let c = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        TlsAcceptor::from(c)
    }

    /// Reloads from the files; a bad new file keeps the old config (and says why).
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        let fresh = load(cfg)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Reloads on SIGHUP, and when a file's modification time changes (checked every `every`).
    pub fn watch(&self, cfg: TlsConfig, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let stamp = |cfg: &TlsConfig| -> Vec<Option<SystemTime>> {
                [
                    Some(&cfg.cert_file),
                    Some(&cfg.key_file),
                    cfg.client_ca_file.as_ref(),
                ]
                .into_iter()
                .flatten()
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect()
            };
            let mut last = stamp(&cfg);
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let hup_fut = async {
                    match hup.as_mut() {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hup_fut = std::future::pending::<()>();
                let why = tokio::select! {
                    _ = hup_fut => "SIGHUP",
                    _ = tokio::time::sleep(every) => "file change",
                };
                let now = stamp(&cfg);
                if why == "file change" && now == last {
                    continue;
                }
                last = now;
                match me.reload(&cfg) {
                    Ok(()) => tracing::info!(reason = why, "TLS certificates reloaded"),
                    Err(e) => {
                        tracing::error!(reason = why, error = %e, "TLS reload failed; keeping the previous certificates")
                    }
                }
            }
        });
    }
}

/// Takes admitted TCP connections (`listener::Admission::admit`) and hands TLS-established
/// ones to the server. Handshakes run in their own tasks so a slow client cannot hold up the
/// others; each must finish by the connection's deadline (`server.handshake_timeout`), which
/// then also bounds its HTTP/2 preface.
pub fn incoming(
    admitted: impl tokio_stream::Stream<Item = Admitted<TcpStream>> + Send + 'static,
    tls: Reloadable,
) -> tokio_stream::wrappers::ReceiverStream<Result<Guarded<TlsConn>, std::io::Error>> {
    use tokio_stream::StreamExt;
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        tokio::pin!(admitted);
        while let Some(conn) = admitted.next().await {
            if tx.is_closed() {
                return;
            }
            let Ok(remote) = conn.io.peer_addr() else {
                // Gone before its handshake started.
                continue;
            };
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let deadline = conn.deadline;
                let (tcp, conn) = conn.split();
                let handshake = tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let client_cert = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| ClientCertFingerprint(sha256_hex(c.as_ref())));
                let tls = TlsConn {
                    inner: stream,
                    info: PeerInfo {
                        remote: Some(remote),
                        client_cert,
                    },
                };
                let _ = tx.send(Ok(conn.map(tls).into_guarded())).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

//! Transport security and sidecar listeners: TLS, mTLS with a certificate-mapped caller, a wrong
//! client certificate refused, certificate reload, and a Unix socket round trip. Certificates are
//! made in the test with rcgen.

mod common;

use std::path::Path;
use std::time::Duration;

use channel_gateway::api::auth::sha256_hex;
use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use channel_gateway::config::{CertIdentity, TlsConfig};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca_pem: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            ca_pem: ca.pem(),
            ca,
        }
    }

    /// (certificate PEM, key PEM, certificate DER SHA-256)
    fn leaf(&self, cn: &str, sans: &[&str]) -> (String, String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem(), sha256_hex(cert.der()))
    }
}

fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

async fn tls_client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ChannelGatewayClient<tonic::transport::Channel>, Box<dyn std::error::Error>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(CALL_BOUND)
        .timeout(CALL_BOUND);
    let channel = bounded(endpoint.connect())
        .await
        .ok_or("no connection within the bound")??;
    Ok(ChannelGatewayClient::new(channel))
}

/// Whether a TLS client with this identity, trusting `ca_pem`, connects and is answered within
/// the bound.
async fn served(addr: std::net::SocketAddr, ca_pem: &str, identity: Option<(&str, &str)>) -> bool {
    let answered = bounded(async {
        let mut c = tls_client(addr, ca_pem, identity).await?;
        c.get_capabilities(caps()).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    matches!(answered, Some(Ok(())))
}

/// Every client call in these tests is bounded. Under TLS 1.3 a client learns that the server
/// refused its certificate only when it next reads, after its own handshake has finished; an
/// unbounded call on such a connection once hung CI for its whole budget. A refused client that
/// times out has still been refused: the server never answered it.
const CALL_BOUND: Duration = Duration::from_secs(5);

/// Runs one client step within `CALL_BOUND` however tonic queues it (its own timeout starts only
/// once a request reaches a connection); `None` when it did not finish.
async fn bounded<T>(step: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(CALL_BOUND, step).await.ok()
}

fn caps() -> pb::GetCapabilitiesRequest {
    pb::GetCapabilitiesRequest {
        channel_id: "msteams".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let (cert, key, _) = pki.leaf("gateway", &["localhost", "127.0.0.1"]);
    let cert_file = write(dir.path(), "server.pem", &cert);
    let key_file = write(dir.path(), "server.key", &key);
    let h = start_with(|c| {
        c.server.tls = Some(TlsConfig {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            client_ca_file: None,
            reload_interval: Duration::from_millis(100),
        })
    })
    .await;
    assert!(
        served(h.gateway.addr, &pki.ca_pem, None).await,
        "a TLS client is served"
    );

    // A plaintext client cannot talk to the TLS listener.
    let plain = bounded(async {
        let channel = Endpoint::from_shared(format!("http://{}", h.gateway.addr))
            .unwrap()
            .connect_timeout(CALL_BOUND)
            .timeout(CALL_BOUND)
            .connect()
            .await?;
        ChannelGatewayClient::new(channel)
            .get_capabilities(caps())
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    assert!(
        !matches!(plain, Some(Ok(()))),
        "plaintext accepted on a TLS port"
    );

    // Replace the certificate with one from another CA: new connections must present it.
    let other = Pki::new("rotated CA");
    let (cert2, key2, _) = other.leaf("gateway", &["localhost", "127.0.0.1"]);
    std::fs::write(&key_file, key2).unwrap();
    std::fs::write(&cert_file, cert2).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if served(h.gateway.addr, &other.ca_pem, None).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "certificate not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_maps_client_certificates_to_bots_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let (cert, key, _) = pki.leaf("gateway", &["localhost", "127.0.0.1"]);
    let (bot_cert, bot_key, bot_fp) = pki.leaf("bot-a", &[]);
    let (other_cert, other_key, _) = pki.leaf("unlisted", &[]);
    let stranger = Pki::new("someone else's CA");
    let (bad_cert, bad_key, _) = stranger.leaf("intruder", &[]);
    let ca_file = write(dir.path(), "ca.pem", &pki.ca_pem);
    let cert_file = write(dir.path(), "server.pem", &cert);
    let key_file = write(dir.path(), "server.key", &key);
    let h = start_with(|c| {
        c.server.tls = Some(TlsConfig {
            cert_file,
            key_file,
            client_ca_file: Some(ca_file),
            reload_interval: Duration::from_secs(10),
        });
        c.auth.clients = vec![CertIdentity {
            name: "bot-a".into(),
            cert_sha256: bot_fp,
            bots: vec![BOT.into()],
        }];
    })
    .await;

    let mut good = tls_client(h.gateway.addr, &pki.ca_pem, Some((&bot_cert, &bot_key)))
        .await
        .expect("a listed client connects");
    bounded(good.send(pb::SendRequest {
        message: Some(h.text("mtls", "hello")),
        ..Default::default()
    }))
    .await
    .expect("a listed client is answered in time")
    .expect("a listed client certificate sends as its bot");
    let mut other_bot = h.text("mtls", "as someone else");
    other_bot.address.as_mut().unwrap().bot.as_mut().unwrap().id = "another-bot".into();
    let e = bounded(good.send(pb::SendRequest {
        message: Some(other_bot),
        ..Default::default()
    }))
    .await
    .expect("a send for another bot is answered in time")
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // Signed by the right CA but not listed: authenticated TLS, unknown caller.
    let mut unlisted = tls_client(h.gateway.addr, &pki.ca_pem, Some((&other_cert, &other_key)))
        .await
        .expect("an unlisted client connects");
    let e = bounded(unlisted.get_capabilities(caps()))
        .await
        .expect("an unlisted client is answered in time")
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // A certificate from another CA, or none, does not get through the handshake.
    for identity in [Some((bad_cert.as_str(), bad_key.as_str())), None] {
        assert!(
            !served(h.gateway.addr, &pki.ca_pem, identity).await,
            "handshake accepted a client without a trusted certificate"
        );
    }
    h.fake
        .wait_for(Duration::from_secs(5), "the one message", |r| r.len() == 1)
        .await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("gateway.sock");
    let path = sock.clone();
    let h = start_with(move |c| c.server.unix_socket = Some(path)).await;
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            async move {
                let s = tokio::net::UnixStream::connect(sock).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let mut client = ChannelGatewayClient::new(channel);
    let r = client
        .send(pb::SendRequest {
            message: Some(h.text("uds", "over a socket")),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(h.fake.for_conversation("uds")[0].text(), "over a socket");
}

/// The handshake deadline covers TLS and what follows it: a client that finishes TLS and then
/// never sends the HTTP/2 preface is closed, as is one that stalls inside TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_without_an_http2_handshake_are_closed() {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let (cert, key, _) = pki.leaf("gateway", &["localhost", "127.0.0.1"]);
    let cert_file = write(dir.path(), "server.pem", &cert);
    let key_file = write(dir.path(), "server.key", &key);
    let h = start_with(|c| {
        c.server.handshake_timeout = Duration::from_millis(300);
        c.server.tls = Some(TlsConfig {
            cert_file,
            key_file,
            client_ca_file: None,
            reload_interval: Duration::from_secs(60),
        })
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(h.gateway.addr)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let mut stalled = tokio::net::TcpStream::connect(h.gateway.addr)
        .await
        .unwrap();

    let closed = |mut conn: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    };
    assert!(
        closed(Box::new(&mut tls)).await,
        "TLS done, no HTTP/2 preface: still open"
    );
    assert!(
        closed(Box::new(&mut stalled)).await,
        "no TLS handshake: still open"
    );
    assert!(
        served(h.gateway.addr, &pki.ca_pem, None).await,
        "a real client is served"
    );
}

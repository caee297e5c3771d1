#![allow(dead_code)] // each bench uses part of it
//! quinn 0.11 as a contender: one unidirectional stream carries the object, the client hashes
//! it with MD5 while reading. Shared by the loopback and lossy benches
//! (`#[path = "quic.rs"] mod quic;`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use udpferry::md5::Md5;

/// What the server writes per `write_all`.
const WRITE: usize = 1 << 20;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Which congestion controller the quinn server sends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// quinn's default.
    Cubic,
    Bbr,
}

/// One transfer's outcome.
pub struct QuicRun {
    /// Seconds from connect to the first byte read.
    pub first_byte: f64,
    /// Seconds from connect to the last byte read and its MD5 checked (or to the cut-off).
    pub complete: f64,
    /// Bytes read (all of them unless cut off).
    pub received: u64,
    /// Read every byte and the digest matched.
    pub verified: bool,
}

/// A tokio runtime and a matching server and client configuration (self-signed certificate).
pub struct Quic {
    rt: tokio::runtime::Runtime,
    server_config: quinn::ServerConfig,
    client_config: quinn::ClientConfig,
}

impl Quic {
    /// quinn with its defaults, or with `controller` on the server.
    pub fn new(controller: Option<Controller>) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(err)?;
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(err)?;
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let mut server_config =
            quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).map_err(err)?;
        if let Some(controller) = controller {
            let mut transport = quinn::TransportConfig::default();
            match controller {
                Controller::Cubic => transport.congestion_controller_factory(Arc::new(
                    quinn::congestion::CubicConfig::default(),
                )),
                Controller::Bbr => transport.congestion_controller_factory(Arc::new(
                    quinn::congestion::BbrConfig::default(),
                )),
            };
            server_config.transport_config(Arc::new(transport));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).map_err(err)?;
        let crypto = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).map_err(err)?));
        Ok(Quic {
            rt,
            server_config,
            client_config,
        })
    }

    /// One transfer of `data`, handshake included, the client connecting to `via(server)`
    /// (the server's own address, or a relay in front of it). Gives up after `limit` and
    /// reports what arrived by then.
    pub fn once(
        &self,
        data: Arc<[u8]>,
        expected: [u8; 16],
        limit: Duration,
        via: impl FnOnce(SocketAddr) -> Result<SocketAddr, String>,
    ) -> Result<QuicRun, String> {
        let server = self
            .rt
            .block_on(async {
                quinn::Endpoint::server(self.server_config.clone(), "127.0.0.1:0".parse().unwrap())
            })
            .map_err(err)?;
        let target = via(server.local_addr().map_err(err)?)?;
        let received = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let first = Arc::new(AtomicU64::new(u64::MAX));
        let outcome = self.rt.block_on(async {
            let transfer = self.transfer(&server, data, expected, target, &received, &first);
            tokio::time::timeout(limit, transfer).await
        });
        let elapsed = start.elapsed().as_secs_f64();
        server.close(0u32.into(), b"bye");
        let first_byte = match first.load(Ordering::Relaxed) {
            u64::MAX => elapsed,
            us => us as f64 / 1e6,
        };
        match outcome {
            Ok(Ok(complete)) => Ok(QuicRun {
                first_byte,
                complete,
                received: received.load(Ordering::Relaxed),
                verified: true,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(QuicRun {
                first_byte,
                complete: elapsed,
                received: received.load(Ordering::Relaxed),
                verified: false,
            }),
        }
    }

    async fn transfer(
        &self,
        server: &quinn::Endpoint,
        data: Arc<[u8]>,
        expected: [u8; 16],
        target: SocketAddr,
        received: &AtomicU64,
        first: &AtomicU64,
    ) -> Result<f64, String> {
        let size = data.len();
        let serving = {
            let server = server.clone();
            tokio::spawn(async move {
                let incoming = server.accept().await.ok_or("server endpoint closed")?;
                let conn = incoming.await.map_err(err)?;
                let mut send = conn.open_uni().await.map_err(err)?;
                for chunk in data.chunks(WRITE) {
                    send.write_all(chunk).await.map_err(err)?;
                }
                send.finish().map_err(err)?;
                // Keep the connection until the client has read everything and closes.
                conn.closed().await;
                Ok::<(), String>(())
            })
        };
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(err)?;
        client.set_default_client_config(self.client_config.clone());

        let start = Instant::now();
        let conn = client
            .connect(target, "localhost")
            .map_err(err)?
            .await
            .map_err(err)?;
        let mut recv = conn.accept_uni().await.map_err(err)?;
        let mut hasher = Md5::new();
        // The bytes are kept, as every in-memory contender keeps them.
        let mut held: Vec<u8> = Vec::with_capacity(size);
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.map_err(err)? {
            if held.is_empty() {
                first.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            hasher.update(&chunk.bytes);
            held.extend_from_slice(&chunk.bytes);
            received.store(held.len() as u64, Ordering::Relaxed);
        }
        let digest: [u8; 16] = hasher.finalize();
        let complete = start.elapsed().as_secs_f64();
        if held.len() != size || digest != expected {
            return Err(format!("got {} bytes, digest mismatch", held.len()));
        }
        conn.close(0u32.into(), b"done");
        serving.await.map_err(err)??;
        client.wait_idle().await;
        Ok(complete)
    }
}

//! Listeners: accept loops for plain and TLS sockets (HTTP/1.1 and HTTP/2, by ALPN on TLS
//! and by preface on plain TCP), and graceful shutdown that lets in-flight transfers finish
//! within the grace period. Owns sockets and connections; serves whatever [`Service`] it is
//! given and knows nothing of the protocol.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::body::Body;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
}

/// What listeners serve: one answer for every request, never an error.
pub trait Service: Send + Sync + 'static {
    fn call(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long open connections may finish after shutdown begins.
    pub grace: Duration,
    /// A response body that takes nothing for this long is dropped (`server.send_timeout`).
    pub send_timeout: Duration,
}

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 clients are pinged this often and dropped when a ping goes unanswered this long.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("server.tls.cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("server.tls.key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("server.tls: {0}")]
    Config(#[from] rustls::Error),
}

/// A TLS acceptor offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| TlsSetupError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Cert {
            path: cert.display().to_string(),
            reason: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves until `shutdown` resolves, then stops accepting and gives open connections up to
/// `grace` to finish what they are sending.
pub async fn run<S: Service>(
    service: Arc<S>,
    listeners: Vec<TcpListener>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    options: Options,
) {
    let grace = options.grace;
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            service.clone(),
            tls.clone(),
            graceful.clone(),
            stop_rx.clone(),
            options.send_timeout,
        )));
    }
    shutdown.await;
    tracing::info!("shutting down: no new connections; waiting up to {grace:?} for transfers");
    let _ = stop_tx.send(true);
    for task in accept_tasks {
        let _ = task.await;
    }
    // Accept loops are done, and connection tasks hold watchers, not the Arc.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return;
    };
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// `server.metrics.listen`: plain HTTP/1.1 answering `/metrics` and `/healthz` only, so that
/// scrapes stay off the public listeners. Runs until the process ends.
pub async fn serve_metrics(listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(match req.uri().path() {
                    "/metrics" => crate::local::metrics(),
                    "/healthz" => crate::local::healthz(),
                    path => crate::error::oci_response(&crate::local::not_found(path)),
                })
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn accept_loop<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    tls: Option<TlsAcceptor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    send_timeout: Duration,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let watch = crate::stall::Watch::new(send_timeout);
        let stream = crate::stall::Guarded::new(stream, watch.clone());
        let conn = ConnInfo {
            peer,
            tls: tls.is_some(),
        };
        let service = service.clone();
        let tls = tls.clone();
        let graceful: Watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let service = service.clone();
                let watch = watch.clone();
                async move {
                    let response = service.call(req, conn).await;
                    Ok::<_, Infallible>(response.map(|body| watch.body(body)))
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            // A fixed 1 MiB HTTP/2 window caps a distant client's push at 1 MiB per round trip:
            // grow it to the measured bandwidth-delay product instead. Pings free the streams
            // of clients that vanished without closing their connection.
            builder
                .http2()
                .adaptive_window(true)
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT);
            let result = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    graceful.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
                            graceful.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

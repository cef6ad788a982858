//! Listeners: accept loops for plain and TLS sockets (HTTP/1.1 and HTTP/2, by ALPN on TLS
//! and by preface on plain TCP) and for the forward proxy (HTTP/1.1 with `CONNECT`
//! upgrades: TLS terminated with the config the service picks by server name, or bytes
//! copied to a tunnel), and graceful shutdown that lets in-flight transfers finish within
//! the grace period. Owns sockets and connections; serves whatever [`Service`] it is given
//! and knows nothing of the registry protocol.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::forward::Intercepted;

/// Who is on the other end of a connection, and how it reached us.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
    pub(crate) via: Via,
}

#[derive(Debug, Clone)]
pub enum Via {
    /// A registry listener.
    Direct,
    /// The forward-proxy listener itself (`CONNECT`, absolute-form requests, `/ca.crt`).
    ForwardProxy,
    /// A connection the forward proxy intercepted, and what for.
    Intercepted(Arc<Intercepted>),
}

/// What becomes of a `CONNECT` on the forward-proxy listener.
pub enum Connect {
    /// Refused (or a challenge): answered as is.
    Answer(Response<Body>),
    /// Answered 200, then TLS terminated with the config `tls` picks for the client's
    /// server name (`None` aborts the handshake), and served as `intercepted`.
    Intercept {
        tls: TlsChooser,
        intercepted: Arc<Intercepted>,
    },
    /// Answered 200, then bytes copied both ways to this connection.
    Tunnel(TcpStream),
}

pub type TlsChooser = Box<dyn FnOnce(Option<&str>) -> Option<Arc<rustls::ServerConfig>> + Send>;

/// What listeners serve: one answer for every request, never an error.
pub trait Service: Send + Sync + 'static {
    fn call(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;

    /// A `CONNECT` on the forward-proxy listener.
    fn connect(
        &self,
        req: &Request<Incoming>,
        conn: &ConnInfo,
    ) -> impl Future<Output = Connect> + Send;
}

/// A bound socket and what it serves.
pub struct Listener {
    pub tcp: TcpListener,
    pub role: Role,
}

#[derive(Clone)]
pub enum Role {
    Plain,
    Tls(TlsAcceptor),
    /// HTTP/1.1 with `CONNECT` (the forward proxy).
    ForwardProxy,
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
    listeners: Vec<Listener>,
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
    listener: Listener,
    service: Arc<S>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    send_timeout: Duration,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
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
        let watcher = graceful.watcher();
        // An intercepted connection outlives its CONNECT's: shutdown waits for it on a
        // watcher of its own.
        let inner = matches!(listener.role, Role::ForwardProxy)
            .then(|| Arc::new(parking_lot::Mutex::new(Some(graceful.watcher()))));
        let service = service.clone();
        let role = listener.role.clone();
        tokio::spawn(async move {
            match role {
                Role::Plain => {
                    let conn = ConnInfo {
                        peer,
                        tls: false,
                        via: Via::Direct,
                    };
                    serve_io(stream, conn, service, watcher, send_timeout).await;
                }
                Role::Tls(acceptor) => {
                    let Some(tls) = handshake(acceptor.accept(stream), peer).await else {
                        return;
                    };
                    let conn = ConnInfo {
                        peer,
                        tls: true,
                        via: Via::Direct,
                    };
                    serve_io(tls, conn, service, watcher, send_timeout).await;
                }
                Role::ForwardProxy => {
                    let conn = ConnInfo {
                        peer,
                        tls: false,
                        via: Via::ForwardProxy,
                    };
                    let Some(inner) = inner else { return };
                    serve_proxy(stream, conn, service, watcher, send_timeout, inner).await;
                }
            }
        });
    }
}

/// A graceful-shutdown watcher for the one connection a `CONNECT` may turn into.
type InnerWatcher = Arc<parking_lot::Mutex<Option<Watcher>>>;

async fn handshake<F, T>(accepting: F, peer: SocketAddr) -> Option<T>
where
    F: Future<Output = std::io::Result<T>>,
{
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accepting).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Serves one connection (HTTP/1.1 and HTTP/2) until it ends or shutdown's grace runs out.
async fn serve_io<S, I>(
    io: I,
    conn: ConnInfo,
    service: Arc<S>,
    graceful: Watcher,
    send_timeout: Duration,
) where
    S: Service,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let watch = crate::stall::Watch::new(send_timeout);
    let io = crate::stall::Guarded::new(io, watch.clone());
    let svc = service_fn(move |req: Request<Incoming>| {
        let service = service.clone();
        let watch = watch.clone();
        let conn = conn.clone();
        async move {
            let response = service.call(req, conn).await;
            Ok::<_, Infallible>(response.map(|body| watch.body(body)))
        }
    });
    let builder = connection_builder();
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    if let Err(e) = graceful.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Serves a forward-proxy connection: HTTP/1.1, whose `CONNECT`s are handed to
/// [`Service::connect`] (an intercepted connection is served by [`serve_io`] on `inner`).
async fn serve_proxy<S: Service>(
    stream: TcpStream,
    conn: ConnInfo,
    service: Arc<S>,
    graceful: Watcher,
    send_timeout: Duration,
    inner: InnerWatcher,
) {
    let peer = conn.peer;
    let watch = crate::stall::Watch::new(send_timeout);
    let io = crate::stall::Guarded::new(stream, watch.clone());
    let svc = service_fn(move |req: Request<Incoming>| {
        let service = service.clone();
        let watch = watch.clone();
        let conn = conn.clone();
        let inner = inner.clone();
        async move {
            let response = match req.method() == Method::CONNECT {
                true => connect(service, req, conn, &inner, send_timeout).await,
                false => service.call(req, conn).await,
            };
            Ok::<_, Infallible>(response.map(|body| watch.body(body)))
        }
    });
    let builder = connection_builder().http1_only();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = graceful.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
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
    builder
}

/// A `CONNECT`: the service decides; an interception or a tunnel goes on in a task of its
/// own once hyper hands over the connection.
async fn connect<S: Service>(
    service: Arc<S>,
    req: Request<Incoming>,
    conn: ConnInfo,
    slot: &InnerWatcher,
    send_timeout: Duration,
) -> Response<Body> {
    let peer = conn.peer;
    match service.connect(&req, &conn).await {
        Connect::Answer(response) => response,
        Connect::Tunnel(mut target) => {
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let mut client = TokioIo::new(upgraded);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "CONNECT upgrade failed"),
                }
            });
            Response::new(crate::body::empty())
        }
        Connect::Intercept { tls, intercepted } => {
            let watcher = slot.lock().take();
            tokio::spawn(async move {
                let upgraded = match hyper::upgrade::on(req).await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "CONNECT upgrade failed");
                        return;
                    }
                };
                let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                    rustls::server::Acceptor::default(),
                    TokioIo::new(upgraded),
                );
                let accepting = async move {
                    let start = acceptor.await?;
                    let sni = start.client_hello().server_name().map(str::to_string);
                    let config = tls(sni.as_deref()).ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "no certificate for this server name",
                        )
                    })?;
                    start.into_stream(config).await
                };
                let Some(stream) = handshake(accepting, peer).await else {
                    return;
                };
                let conn = ConnInfo {
                    peer,
                    tls: true,
                    via: Via::Intercepted(intercepted),
                };
                match watcher {
                    Some(w) => serve_io(stream, conn, service, w, send_timeout).await,
                    None => tracing::debug!(%peer, "a second CONNECT on one connection"),
                }
            });
            Response::new(crate::body::empty())
        }
    }
}

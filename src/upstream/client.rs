//! The pooled HTTP client each upstream talks through: hyper-util's pool over hyper-rustls,
//! HTTP/2 or HTTP/1.1 by ALPN, keep-alive, connect and idle timeouts.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::dial::{DialPolicy, GuardedResolver};
use crate::body::{self, Body, BoxError};
use crate::config::UpstreamConfig;

pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Body>;

/// A response that is coming, or why none will.
pub(crate) type Responding =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send + 'static>>;

/// Where an upstream's requests go: the pooled client in production, an in-process
/// registry in the request-path tests.
pub(crate) trait Transport: Send + Sync {
    fn send(&self, request: Request<Body>) -> Responding;
}

impl Transport for HttpClient {
    fn send(&self, request: Request<Body>) -> Responding {
        let response = self.request(request);
        Box::pin(async move {
            response
                .await
                .map(|r| r.map(body::boxed))
                .map_err(BoxError::from)
        })
    }
}

/// HTTP/2 connections in use are pinged this often, and closed when a ping goes unanswered
/// this long (idle ones are closed by `idle_timeout`).
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cannot read CA bundle {path}: {source}")]
    Ca {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA bundle {path} holds no usable certificate")]
    EmptyCa { path: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Builds the pooled client for one upstream; it dials other hosts only as
/// [`DialPolicy::for_upstream`] allows.
pub(crate) fn build(config: &UpstreamConfig) -> Result<HttpClient, ClientBuildError> {
    let tls = tls_config(config)?;
    let policy = Arc::new(DialPolicy::for_upstream(config));
    let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(policy));
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        // Concurrent pulls from one upstream share one HTTP/2 connection; its fixed 5 MiB window
        // would cap them all together at 5 MiB per round trip. Grow it to the measured
        // bandwidth-delay product instead.
        .http2_adaptive_window(true)
        // Pings find a multiplexed connection whose peer vanished (a dropped NAT entry, a dead
        // path): without them every stream on it would wait forever, and new ones would join.
        .http2_keep_alive_interval(H2_PING_INTERVAL)
        .http2_keep_alive_timeout(H2_PING_TIMEOUT)
        .pool_idle_timeout(config.idle_timeout)
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

fn tls_config(config: &UpstreamConfig) -> Result<ClientConfig, ClientBuildError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    // No ALPN here: hyper-rustls sets h2 and http/1.1 itself from enable_http1/2.
    let tls = if config.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(roots(config)?)
            .with_no_client_auth()
    };
    Ok(tls)
}

/// Mozilla's roots and the system's, read once per process: every upstream, identity provider
/// and JWKS client starts from them.
fn default_roots() -> &'static RootCertStore {
    static ROOTS: std::sync::OnceLock<RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in rustls_native_certs::load_native_certs().certs {
            // A broken system certificate must not stop the proxy; it is simply not trusted.
            let _ = roots.add(cert);
        }
        roots
    })
}

/// The default roots plus the upstream's own `ca`.
fn roots(config: &UpstreamConfig) -> Result<RootCertStore, ClientBuildError> {
    let mut roots = default_roots().clone();
    if let Some(path) = &config.ca {
        let display = path.display().to_string();
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|source| ClientBuildError::Ca {
            path: display.clone(),
            source,
        })? {
            let cert = cert.map_err(|source| ClientBuildError::Ca {
                path: display.clone(),
                source,
            })?;
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
        if added == 0 {
            return Err(ClientBuildError::EmptyCa { path: display });
        }
    }
    Ok(roots)
}

/// `insecure_skip_verify: true`: accept any certificate, still checking handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

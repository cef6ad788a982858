//! The `ocigate` command: a thin CLI over the library (parse arguments, load config, set up
//! logging, bind, run).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ocigate::cache::Ownership;
use ocigate::config::{self, Config, Credentials, RouteConfig, UpstreamConfig};
use ocigate::pipeline::Gateway;
use ocigate::server::{Listener, Role};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "ocigate",
    version,
    about = "A streaming gateway in front of OCI container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API.
    Serve(Box<ServeArgs>),
    /// Validate a config file and print a summary of it.
    CheckConfig {
        /// The YAML config file.
        file: PathBuf,
    },
    /// Print the ocigate config equivalent to another tool's config (docker-registry-proxy:
    /// its environment variables, no file).
    Import {
        #[arg(value_enum)]
        kind: ImportKind,
        /// The other tool's config file.
        file: Option<PathBuf>,
    },
    /// Inspect, prune or preload the pull-through cache of a config.
    Cache {
        /// The YAML config file (needs `cache`).
        #[arg(long, env = "OCIGATE_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Print a token from the config's token server (no password asked; the ACL applies).
    Token {
        /// The YAML config file (needs `token_server`).
        #[arg(long, env = "OCIGATE_CONFIG")]
        config: PathBuf,
        /// The account the token is for.
        #[arg(long)]
        account: String,
        /// A scope such as `repository:team/app:pull,push` (repeatable).
        #[arg(long)]
        scope: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// List cached objects (least recently used first) and tags.
    Ls,
    /// Print how much the cache holds.
    Du,
    /// Delete cached objects: all of them, or those not used for a while.
    Prune {
        /// Only objects last used longer ago than this (such as 7d, 12h).
        #[arg(long)]
        older_than: Option<String>,
    },
    /// Preload images (local names: `hub/library/alpine:3.20`, `name@sha256:…`), every
    /// platform of an index.
    Warm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The YAML config file (default: the embedded Docker Hub mirror on 127.0.0.1:5000).
    #[arg(long, env = "OCIGATE_CONFIG", conflicts_with_all = ["upstream", "forward_proxy"])]
    config: Option<PathBuf>,
    /// docker-registry-proxy mode: a caching forward proxy on ADDR (default 0.0.0.0:3128),
    /// configured by that tool's environment variables (REGISTRIES, AUTH_REGISTRIES, …).
    #[arg(
        long,
        value_name = "ADDR",
        num_args = 0..=1,
        default_missing_value = config::DEFAULT_FORWARD_PROXY_LISTEN,
        conflicts_with = "upstream"
    )]
    forward_proxy: Option<String>,
    /// Quick mode: proxy every name to this registry host (or URL).
    #[arg(long, env = "REGISTRY_HOST")]
    upstream: Option<String>,
    /// Quick mode: local name `x` maps to `<prefix>/x` upstream.
    #[arg(long, env = "REPO_PREFIX", requires = "upstream")]
    repo_prefix: Option<String>,
    /// Quick mode: the address to listen on.
    #[arg(long, requires = "upstream", default_value = "127.0.0.1:5000")]
    listen: String,
    /// Quick mode: a verbatim Authorization value for the upstream.
    #[arg(
        long,
        env = "AUTH_HEADER",
        requires = "upstream",
        hide_env_values = true
    )]
    auth_header: Option<String>,
    /// Quick mode: do not redirect browsers to the upstream's web page.
    #[arg(long, env = "DISABLE_BROWSER_REDIRECTS", requires = "upstream")]
    disable_browser_redirects: bool,
    #[command(flatten)]
    token: TokenFlags,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "OCIGATE_LOG_FORMAT")]
    log_format: LogFormat,
}

/// Quick mode client auth, with the names registry-auth-proxy (and distribution) use.
#[derive(clap::Args)]
struct TokenFlags {
    /// Where clients get tokens (auth.token.realm).
    #[arg(long, requires_all = ["upstream", "token_issuer", "token_service"])]
    token_realm: Option<String>,
    /// The issuer tokens must name (auth.token.issuer).
    #[arg(long, requires = "upstream")]
    token_issuer: Option<String>,
    /// The service tokens must be for (auth.token.service).
    #[arg(long, requires = "upstream")]
    token_service: Option<String>,
    /// PEM certificates token signatures chain to (auth.token.rootcertbundle).
    #[arg(long, requires = "token_issuer")]
    token_root_cert_bundle: Option<PathBuf>,
    /// A JWKS of token signing keys, a file or an https URL (auth.token.jwks).
    #[arg(long, requires = "token_issuer")]
    token_jwks: Option<String>,
    /// Challenge with this server's own /token instead of --token-realm.
    #[arg(long, requires = "token_issuer")]
    token_auto_redirect: bool,
}

impl TokenFlags {
    fn auth(&self) -> Result<Option<config::AuthConfig>> {
        let (Some(issuer), Some(service)) = (&self.token_issuer, &self.token_service) else {
            return Ok(None);
        };
        if self.token_realm.is_none() && !self.token_auto_redirect {
            bail!("--token-issuer needs --token-realm or --token-auto-redirect");
        }
        if self.token_root_cert_bundle.is_none() && self.token_jwks.is_none() {
            bail!("--token-issuer needs --token-root-cert-bundle and/or --token-jwks");
        }
        let realm = match &self.token_realm {
            Some(r) => Some(url::Url::parse(r).with_context(|| format!("--token-realm {r:?}"))?),
            None => None,
        };
        Ok(Some(config::AuthConfig {
            token: config::TokenAuthConfig {
                realm,
                service: service.clone(),
                issuer: issuer.clone(),
                rootcertbundles: self.token_root_cert_bundle.iter().cloned().collect(),
                jwks: match &self.token_jwks {
                    None => None,
                    Some(j) if j.starts_with("https://") || j.starts_with("http://") => {
                        Some(config::JwksSource::Url(
                            url::Url::parse(j).with_context(|| format!("--token-jwks {j:?}"))?,
                        ))
                    }
                    Some(j) => Some(config::JwksSource::File(PathBuf::from(j))),
                },
                signing_algorithms: config::DEFAULT_SIGNING_ALGORITHMS.to_vec(),
                autoredirect: self.token_auto_redirect,
                realm_path: "/token".into(),
            },
            anonymous: Vec::new(),
        }))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportKind {
    /// backplane/registryproxy's YAML.
    Backplane,
    /// docker-registry-proxy's environment (REGISTRIES, AUTH_REGISTRIES, CACHE_MAX_SIZE, …).
    DockerRegistryProxy,
    /// An Ociregistry config's `registries:` list.
    Ociregistry,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Import { kind, file } => import(kind, file.as_deref()),
        Command::Token {
            config,
            account,
            scope,
        } => print_token(&config, &account, &scope),
        Command::Cache { config, action } => cache_command(&config, action),
        Command::Serve(args) => serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocigate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn import(kind: ImportKind, file: Option<&std::path::Path>) -> Result<()> {
    let read = || -> Result<(String, String)> {
        let file = file.context("give the file to convert")?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        Ok((text, file.display().to_string()))
    };
    let imported = match kind {
        ImportKind::Backplane => {
            let (text, name) = read()?;
            ocigate::import::Imported {
                yaml: ocigate::import::backplane(&text, &name)?,
                warnings: Vec::new(),
            }
        }
        ImportKind::Ociregistry => {
            let (text, name) = read()?;
            ocigate::import::ociregistry(&text, &name)?
        }
        ImportKind::DockerRegistryProxy => {
            if let Some(f) = file {
                bail!(
                    "docker-registry-proxy is configured by its environment, not a file ({})",
                    f.display()
                );
            }
            ocigate::import::docker_registry_proxy(
                &|k| std::env::var(k).ok(),
                config::DEFAULT_FORWARD_PROXY_LISTEN,
            )?
        }
    };
    for w in &imported.warnings {
        eprintln!("ocigate: warning: {w}");
    }
    print!("{}", imported.yaml);
    Ok(())
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let config = Config::load(file)?;
    // Building the gateway resolves credentials and CA bundles, so their errors show here too.
    install_crypto();
    // The cache directory is left alone: checking a file must not create or evict anything.
    let gateway = Gateway::build(
        Config {
            cache: None,
            ..config.clone()
        },
        Ownership::Guest,
    )?;
    print!("{}", config.summary());
    for warning in gateway.routes.warnings() {
        eprintln!("{}: warning: {warning}", file.display());
    }
    println!("credentials:");
    for name in config.upstreams.keys() {
        if let Some(u) = gateway.upstreams.get(name) {
            println!("  {name:<12} {}", u.credentials_summary());
        }
    }
    println!("ok");
    Ok(())
}

fn print_token(file: &std::path::Path, account: &str, scopes: &[String]) -> Result<()> {
    install_crypto();
    let config = Config::load(file)?;
    let Some(ts) = &config.token_server else {
        bail!("{}: no token_server section", file.display());
    };
    let scopes = scopes
        .iter()
        .map(|s| {
            ocigate::oci::Scope::parse(s)
                .with_context(|| format!("--scope {s:?} is not type:name:actions"))
        })
        .collect::<Result<Vec<_>>>()?;
    let server = ocigate::token::TokenServer::new(ts)?;
    println!("{}", server.token_for(account, &scopes)?);
    Ok(())
}

fn cache_command(file: &std::path::Path, action: CacheAction) -> Result<()> {
    let config = Config::load(file)?;
    let Some(cache_config) = config.cache.clone() else {
        bail!("{}: no cache section", file.display());
    };
    let open = || ocigate::cache::Cache::open(&cache_config, Ownership::Guest);
    match action {
        CacheAction::Ls => {
            let cache = open()?;
            for o in cache.store().objects() {
                let kind = ocigate::oci::Digest::parse(&o.digest)
                    .ok()
                    .and_then(|d| cache.journal().media_type(&d))
                    .unwrap_or_else(|| "blob".into());
                println!(
                    "{}  {:>12}  {}  {kind}",
                    o.digest,
                    o.size,
                    humantime::format_rfc3339_seconds(o.last_access)
                );
            }
            for t in cache.journal().tags() {
                println!(
                    "tag {}/{}:{} -> {} (checked {})",
                    t.upstream,
                    t.repo,
                    t.tag,
                    t.digest,
                    humantime::format_rfc3339_seconds(t.checked)
                );
            }
        }
        CacheAction::Du => {
            let cache = open()?;
            let store = cache.store();
            println!(
                "{} objects, {} bytes (max_size {} bytes) in {}",
                store.objects().len(),
                store.total(),
                store.max_size(),
                store.root().display()
            );
        }
        CacheAction::Prune { older_than } => {
            let cutoff = match older_than {
                Some(d) => {
                    let age = config::parse_duration(&d)
                        .with_context(|| format!("--older-than {d:?} is not a duration"))?;
                    Some(std::time::SystemTime::now() - age)
                }
                None => None,
            };
            let cache = open()?;
            let (mut count, mut bytes) = (0, 0);
            for o in cache.store().objects() {
                if cutoff.is_none_or(|c| o.last_access < c) {
                    cache.store().remove(&o.digest);
                    count += 1;
                    bytes += o.size;
                }
            }
            println!("pruned {count} objects, {bytes} bytes");
        }
        CacheAction::Warm { images } => {
            install_crypto();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let gateway = Gateway::build(config, Ownership::Guest)?;
                gateway.start().await?;
                let cache = gateway
                    .cache
                    .as_ref()
                    .context("the config has no cache section")?;
                for image in &images {
                    let warmed = ocigate::cache::warm::image(
                        cache,
                        &gateway.routes,
                        &gateway.upstreams,
                        image,
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{image}: {e}"))?;
                    println!(
                        "{image}: {} manifests, {} blobs cached",
                        warmed.manifests, warmed.blobs
                    );
                }
                Ok::<(), anyhow::Error>(())
            })?;
        }
    }
    Ok(())
}

fn install_crypto() {
    // Exactly one rustls provider, or rustls panics on first use when several are linked.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OCIGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Builds the config for `serve --upstream HOST [--repo-prefix P]`.
fn quick_config(args: &ServeArgs, host: &str) -> Result<Config> {
    let url = config::parse_upstream_url(host).map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
    let mut upstream = UpstreamConfig::new("upstream", url);
    if let Some(h) = &args.auth_header {
        upstream.credentials = Some(Credentials::Header(h.clone()));
    }
    let remote = match args.repo_prefix.as_deref().map(|p| p.trim_matches('/')) {
        None | Some("") => String::new(),
        Some(p) => {
            ocigate::oci::path::validate_name(p)
                .map_err(|e| anyhow::anyhow!("--repo-prefix {p:?}: {}", e.message))?;
            format!("{p}/")
        }
    };
    let listen = args
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} is not an address:port", args.listen))?;
    let mut config = Config::default_config()?;
    config.source = "<command line>".into();
    config.server.listen = vec![listen];
    config.upstreams = [("upstream".to_string(), upstream)].into();
    config.routes = vec![RouteConfig::new("", "upstream", &remote)];
    // The one-liner is a pass-through proxy, as the tool it replaces.
    config.cache = None;
    config.auth = args.token.auth()?;
    config.server.browser_redirects = !args.disable_browser_redirects && config.auth.is_none();
    Ok(config)
}

/// `serve --forward-proxy`: docker-registry-proxy's environment, converted exactly as
/// `import docker-registry-proxy` prints it.
fn forward_proxy_config(listen: &str) -> Result<Config> {
    let env = |k: &str| std::env::var(k).ok();
    let imported = ocigate::import::docker_registry_proxy(&env, listen)?;
    for w in &imported.warnings {
        tracing::warn!("{w}");
    }
    // The YAML holds literals only (`$` doubled): nothing is expanded twice.
    Ok(Config::parse_text(
        &imported.yaml,
        "<docker-registry-proxy environment>",
    )?)
}

fn serve(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    install_crypto();
    let config = match (&args.config, &args.upstream, &args.forward_proxy) {
        (Some(path), _, _) => Config::load(path)?,
        (None, Some(host), _) => quick_config(&args, host)?,
        (None, None, Some(listen)) => forward_proxy_config(listen)?,
        (None, None, None) => Config::default_config()?,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> Result<()> {
    ocigate::metrics::install();
    let tls = match &config.server.tls {
        Some(t) => Some(ocigate::server::tls_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    // Credentials first: a provider that cannot deliver stops the start before any listener
    // takes traffic.
    let gateway = Arc::new(Gateway::new(config)?);
    gateway.start().await?;
    let config = &gateway.config;
    let mut listeners = Vec::new();
    for addr in &config.server.listen {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = tcp.local_addr()?;
        let (scheme, role) = match &tls {
            Some(acceptor) => ("https", Role::Tls(acceptor.clone())),
            None => ("http", Role::Plain),
        };
        tracing::info!(addr = %local, scheme, "listening");
        listeners.push(Listener { tcp, role });
    }
    if listeners.is_empty() {
        bail!("no listen address");
    }
    let bound = listeners
        .iter()
        .filter_map(|l| l.tcp.local_addr().ok())
        .collect();
    gateway.listening_on(bound);
    for addr in config.forward_proxy.iter().flat_map(|f| &f.listen) {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (forward_proxy.listen)"))?;
        tracing::info!(addr = %tcp.local_addr()?, "forward proxy listening");
        listeners.push(Listener {
            tcp,
            role: Role::ForwardProxy,
        });
    }
    if let Some(addr) = config.server.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.metrics.listen)"))?;
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        tokio::spawn(ocigate::server::serve_metrics(listener));
    }
    for warning in gateway.routes.warnings() {
        tracing::warn!("{warning}");
    }
    let options = ocigate::server::Options {
        grace: config.server.shutdown_grace,
        send_timeout: config.server.send_timeout,
    };
    tracing::info!(config = %config.source, routes = config.routes.len(), upstreams = config.upstreams.len(), "ocigate {} ready", env!("CARGO_PKG_VERSION"));
    ocigate::server::run(gateway, listeners, shutdown_signal(), options).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops ocigate");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

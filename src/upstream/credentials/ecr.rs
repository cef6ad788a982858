//! Amazon ECR credentials: `GetAuthorizationToken` through the AWS SDK's standard chain
//! (environment, profile, web identity/IRSA, IMDS; `AWS_ENDPOINT_URL[_ECR]` honoured), its
//! `AWS:<password>` used as Basic credentials and refreshed in the background.
//!
//! Owns the refresh schedule and the last good token. Logs every refresh, never the token.
//! The host-name parsing is always compiled, so `auto` can say "this is ECR" in a build
//! without the SDK.

/// What an ECR registry host name says: `<account>.dkr.ecr[-fips].<region>.amazonaws.com`
/// (also `.amazonaws.com.cn`, the dual-stack `dkr-ecr.<region>.on.aws` and the isolated
/// partitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EcrHost {
    pub(crate) account: String,
    pub(crate) region: String,
}

const ECR_DOMAINS: &[&str] = &[
    "amazonaws.com",
    "amazonaws.com.cn",
    "on.aws",
    "sc2s.sgov.gov",
    "c2s.ic.gov",
    "cloud.adc-e.uk",
    "csp.hci.ic.gov",
];

impl EcrHost {
    pub(crate) fn parse(host: &str) -> Option<EcrHost> {
        let host = host.to_ascii_lowercase();
        let (account, rest) = host.split_once('.')?;
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let rest = ["dkr.ecr.", "dkr.ecr-fips.", "dkr-ecr.", "dkr-ecr-fips."]
            .iter()
            .find_map(|p| rest.strip_prefix(p))?;
        let (region, domain) = rest.split_once('.')?;
        (crate::config::is_aws_region(region) && ECR_DOMAINS.contains(&domain)).then(|| EcrHost {
            account: account.to_string(),
            region: region.to_string(),
        })
    }
}

#[cfg(feature = "ecr")]
pub(crate) use provider::EcrProvider;

#[cfg(feature = "ecr")]
mod provider {
    use std::sync::{Arc, Weak};
    use std::time::{Duration, Instant, SystemTime};

    use aws_config::BehaviorVersion;
    use aws_config::timeout::TimeoutConfig;
    use aws_sdk_ecr::error::DisplayErrorContext;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use parking_lot::Mutex;

    use super::EcrHost;
    use crate::config::EcrCredentials;
    use crate::upstream::credentials::{CredentialError, Secret};

    /// ECR's documented token lifetime, assumed when `expiresAt` is unusable.
    const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);
    /// Never refresh more often than this, whatever the token or the config says.
    const MIN_INTERVAL: Duration = Duration::from_secs(1);
    /// The longest wait between retries after failures.
    const MAX_BACKOFF: Duration = Duration::from_secs(300);

    /// One upstream's ECR token, kept fresh by a background task once [`EcrProvider::start`]
    /// has run.
    pub(crate) struct EcrProvider {
        upstream: String,
        region: Option<String>,
        profile: Option<String>,
        registry_ids: Vec<String>,
        refresh: Duration,
        state: Mutex<State>,
    }

    struct State {
        token: Option<Token>,
        /// The configured `static` token, until the SDK first succeeds.
        fallback: Option<Secret>,
        last_error: Option<String>,
    }

    struct Token {
        secret: Secret,
        valid_until: Instant,
    }

    impl EcrProvider {
        pub(crate) fn new(
            upstream: &str,
            host: Option<&EcrHost>,
            settings: &EcrCredentials,
        ) -> EcrProvider {
            let registry_ids = if settings.registry_ids.is_empty() {
                host.map(|h| vec![h.account.clone()]).unwrap_or_default()
            } else {
                settings.registry_ids.clone()
            };
            EcrProvider {
                upstream: upstream.to_string(),
                region: settings
                    .region
                    .clone()
                    .or_else(|| host.map(|h| h.region.clone())),
                profile: settings.profile.clone(),
                registry_ids,
                refresh: settings.refresh,
                state: Mutex::new(State {
                    token: None,
                    fallback: settings.static_token.as_deref().map(decode_token),
                    last_error: None,
                }),
            }
        }

        /// For `check-config`: what will be asked for, never a secret.
        pub(crate) fn describe(&self) -> String {
            format!(
                "ecr (region {}, registries {}, profile {}, refresh every {}{})",
                self.region.as_deref().unwrap_or("from the AWS config"),
                if self.registry_ids.is_empty() {
                    "the account's default".to_string()
                } else {
                    self.registry_ids.join(",")
                },
                self.profile.as_deref().unwrap_or("default chain"),
                humantime::format_duration(self.refresh),
                if self.has_fallback() {
                    ", static fall-back"
                } else {
                    ""
                }
            )
        }

        fn has_fallback(&self) -> bool {
            self.state.lock().fallback.is_some()
        }

        /// The token to use now.
        pub(crate) fn current(&self) -> Result<Secret, CredentialError> {
            let state = self.state.lock();
            if let Some(t) = &state.token
                && Instant::now() < t.valid_until
            {
                return Ok(t.secret.clone());
            }
            if let Some(f) = &state.fallback {
                return Ok(f.clone());
            }
            Err(CredentialError::Ecr {
                reason: match &state.last_error {
                    Some(e) => format!("no valid token: the last refresh failed: {e}"),
                    None => "no valid token yet".into(),
                },
            })
        }

        /// Fetches the first token, then refreshes in the background for as long as the
        /// provider lives. Fails when the first fetch fails and there is no `static` token.
        pub(crate) async fn start(self: &Arc<Self>) -> Result<(), CredentialError> {
            let client = match self.client().await {
                Ok(c) => c,
                Err(e) if self.has_fallback() => {
                    tracing::warn!(upstream = %self.upstream, error = %e, "ECR SDK not usable: using the static token, without refreshes");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let first = self.refresh_once(&client).await;
            let delay = match first {
                Ok(valid_for) => next_refresh(valid_for, self.refresh),
                Err(e) if self.has_fallback() => {
                    tracing::warn!(upstream = %self.upstream, error = %e, "ECR token fetch failed at start: using the static token");
                    backoff(1, self.refresh)
                }
                Err(e) => return Err(e),
            };
            tokio::spawn(refresh_loop(Arc::downgrade(self), client, delay));
            Ok(())
        }

        async fn client(&self) -> Result<aws_sdk_ecr::Client, CredentialError> {
            let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(60))
                    .build(),
            );
            if let Some(r) = &self.region {
                loader = loader.region(aws_config::Region::new(r.clone()));
            }
            if let Some(p) = &self.profile {
                loader = loader.profile_name(p);
            }
            let sdk = loader.load().await;
            if sdk.region().is_none() {
                return Err(CredentialError::Ecr {
                    reason: "no AWS region: set credentials.ecr.region, use an ECR host name, or set AWS_REGION".into(),
                });
            }
            Ok(aws_sdk_ecr::Client::new(&sdk))
        }

        /// One `GetAuthorizationToken`: stores the token, logs and counts the outcome, and
        /// says how long the new token is valid.
        async fn refresh_once(
            &self,
            client: &aws_sdk_ecr::Client,
        ) -> Result<Duration, CredentialError> {
            let result = self.fetch(client).await;
            crate::metrics::credential_refresh("ecr", &self.upstream, result.is_ok());
            let mut state = self.state.lock();
            match result {
                Ok((secret, valid_for)) => {
                    tracing::info!(upstream = %self.upstream, provider = "ecr", valid_for = %humantime::format_duration(valid_for), "upstream credentials refreshed");
                    state.token = Some(Token {
                        secret,
                        valid_until: Instant::now() + valid_for,
                    });
                    state.fallback = None;
                    state.last_error = None;
                    Ok(valid_for)
                }
                Err(reason) => {
                    tracing::warn!(upstream = %self.upstream, provider = "ecr", error = %reason, "upstream credential refresh failed");
                    state.last_error = Some(reason.clone());
                    Err(CredentialError::Ecr { reason })
                }
            }
        }

        async fn fetch(&self, client: &aws_sdk_ecr::Client) -> Result<(Secret, Duration), String> {
            // `registryIds` is deprecated (a token works for every registry the principal may
            // use), but it is still the key the config names and what picks the answer's
            // proxy endpoint, so it is sent when given.
            #[allow(deprecated)]
            let out = client
                .get_authorization_token()
                .set_registry_ids(Some(self.registry_ids.clone()).filter(|ids| !ids.is_empty()))
                .send()
                .await
                .map_err(|e| format!("GetAuthorizationToken: {}", DisplayErrorContext(&e)))?;
            let data = out
                .authorization_data()
                .first()
                .ok_or("GetAuthorizationToken returned no authorization data")?;
            let token = data
                .authorization_token()
                .ok_or("GetAuthorizationToken returned no token")?;
            let secret = decode_token(token);
            let expires_at = data
                .expires_at()
                .and_then(|t| SystemTime::try_from(*t).ok());
            Ok((secret, self.lifetime(expires_at, SystemTime::now())))
        }

        /// How long a token stays usable. An `expiresAt` already past (a skewed clock, or an
        /// emulator's fixed date) would mean "refresh now" forever: assume ECR's 12 hours.
        fn lifetime(&self, expires_at: Option<SystemTime>, now: SystemTime) -> Duration {
            match expires_at.map(|t| t.duration_since(now)) {
                Some(Ok(left)) if !left.is_zero() => left,
                Some(_) => {
                    tracing::warn!(upstream = %self.upstream, "ECR token's expiresAt is already past: assuming a 12h lifetime");
                    TOKEN_LIFETIME
                }
                None => TOKEN_LIFETIME,
            }
        }
    }

    /// `base64("AWS:" + password)` as `GetAuthorizationToken` hands it out; anything else is
    /// taken as the password itself (what `aws ecr get-login-password` prints: base64 too,
    /// of a JSON document, so only the `AWS:` prefix tells the two apart).
    fn decode_token(token: &str) -> Secret {
        let token = token.trim();
        let password = B64
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|d| d.strip_prefix("AWS:").map(str::to_string))
            .unwrap_or_else(|| token.to_string());
        Secret::Basic {
            username: "AWS".into(),
            password,
        }
    }

    /// The next refresh of a token valid for `valid_for`: at four fifths of its life, at
    /// least every `refresh`, never sooner than [`MIN_INTERVAL`].
    pub(super) fn next_refresh(valid_for: Duration, refresh: Duration) -> Duration {
        (valid_for * 4 / 5).min(refresh).max(MIN_INTERVAL)
    }

    /// The wait after `failures` failed refreshes in a row: doubling from one second, at most
    /// [`MAX_BACKOFF`] and never longer than the configured interval.
    pub(super) fn backoff(failures: u32, refresh: Duration) -> Duration {
        let doubled = MIN_INTERVAL.saturating_mul(1 << failures.saturating_sub(1).min(16));
        doubled.min(MAX_BACKOFF).min(refresh).max(MIN_INTERVAL)
    }

    async fn refresh_loop(
        provider: Weak<EcrProvider>,
        client: aws_sdk_ecr::Client,
        mut delay: Duration,
    ) {
        let mut failures = 0;
        loop {
            tokio::time::sleep(delay).await;
            // The gateway is gone: stop refreshing.
            let Some(p) = provider.upgrade() else { return };
            delay = match p.refresh_once(&client).await {
                Ok(valid_for) => {
                    failures = 0;
                    next_refresh(valid_for, p.refresh)
                }
                Err(_) => {
                    failures += 1;
                    backoff(failures, p.refresh)
                }
            };
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn provider() -> EcrProvider {
            EcrProvider::new("u", None, &EcrCredentials::new())
        }

        #[test]
        fn schedule_is_bounded_by_lifetime_refresh_and_floor() {
            let h = Duration::from_secs(3600);
            assert_eq!(next_refresh(12 * h, 6 * h), 6 * h);
            assert_eq!(next_refresh(h, 6 * h), h * 4 / 5);
            assert_eq!(next_refresh(Duration::ZERO, 6 * h), MIN_INTERVAL);
            assert_eq!(
                next_refresh(12 * h, Duration::from_millis(10)),
                MIN_INTERVAL
            );
        }

        #[test]
        fn past_expiry_does_not_mean_refresh_now() {
            let p = provider();
            let now = SystemTime::now();
            let past = now - Duration::from_secs(10 * 365 * 86400);
            assert_eq!(p.lifetime(Some(past), now), TOKEN_LIFETIME);
            assert_eq!(p.lifetime(Some(now), now), TOKEN_LIFETIME);
            assert_eq!(p.lifetime(None, now), TOKEN_LIFETIME);
            let soon = now + Duration::from_secs(600);
            assert_eq!(p.lifetime(Some(soon), now), Duration::from_secs(600));
            // So the schedule after an emulator's 2015 expiry is the configured interval.
            assert_eq!(next_refresh(p.lifetime(Some(past), now), DEFAULT), DEFAULT);
        }
        const DEFAULT: Duration = crate::config::DEFAULT_ECR_REFRESH;

        #[test]
        fn backoff_doubles_and_is_capped() {
            let h = Duration::from_secs(3600);
            let waits: Vec<u64> = (1..=10).map(|f| backoff(f, h).as_secs()).collect();
            assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
            assert_eq!(backoff(1000, h), MAX_BACKOFF);
            assert_eq!(backoff(10, Duration::from_secs(5)), Duration::from_secs(5));
            assert_eq!(backoff(3, Duration::from_millis(1)), MIN_INTERVAL);
        }

        #[test]
        fn tokens_decode_to_basic() {
            let t = B64.encode("AWS:secret-pw");
            assert!(
                matches!(decode_token(&t), Secret::Basic { username, password }
                if username == "AWS" && password == "secret-pw")
            );
            // What `aws ecr get-login-password` prints is the password alone, base64 of JSON.
            let login_password = B64.encode(r#"{"payload":"x","datakey":"y"}"#);
            assert!(
                matches!(decode_token(&login_password), Secret::Basic { username, password }
                if username == "AWS" && password == login_password)
            );
        }

        #[test]
        fn static_token_serves_until_the_sdk_succeeds_and_errors_say_why() {
            let mut settings = EcrCredentials::new();
            let p = EcrProvider::new("u", None, &settings);
            let e = p.current().err().unwrap().to_string();
            assert!(e.contains("no valid token yet"), "{e}");
            settings.static_token = Some(B64.encode("AWS:fallback"));
            let p = EcrProvider::new("u", None, &settings);
            assert!(
                matches!(p.current(), Ok(Secret::Basic { password, .. }) if password == "fallback")
            );
            {
                let mut s = p.state.lock();
                s.token = Some(Token {
                    secret: decode_token(&B64.encode("AWS:fresh")),
                    valid_until: Instant::now() + Duration::from_secs(60),
                });
                s.fallback = None;
            }
            assert!(
                matches!(p.current(), Ok(Secret::Basic { password, .. }) if password == "fresh")
            );
            // An expired token is not served, and the error names the last failure.
            {
                let mut s = p.state.lock();
                if let Some(t) = s.token.as_mut() {
                    t.valid_until = Instant::now();
                }
                s.last_error = Some("connection refused".into());
            }
            let e = p.current().err().unwrap().to_string();
            assert!(e.contains("last refresh failed: connection refused"), "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_host_forms() {
        let h = |account: &str, region: &str| {
            Some(EcrHost {
                account: account.into(),
                region: region.into(),
            })
        };
        assert_eq!(
            EcrHost::parse("111122223333.dkr.ecr.us-east-1.amazonaws.com"),
            h("111122223333", "us-east-1")
        );
        assert_eq!(
            EcrHost::parse("111122223333.dkr.ecr-fips.us-gov-west-1.amazonaws.com"),
            h("111122223333", "us-gov-west-1")
        );
        assert_eq!(
            EcrHost::parse("111122223333.dkr.ecr.cn-north-1.amazonaws.com.cn"),
            h("111122223333", "cn-north-1")
        );
        assert_eq!(
            EcrHost::parse("111122223333.dkr-ecr.eu-west-1.on.aws"),
            h("111122223333", "eu-west-1")
        );
        for not_ecr in [
            "public.ecr.aws",
            "11112222333.dkr.ecr.us-east-1.amazonaws.com",
            "111122223333.dkr.ecr.us-east-1.amazonaws.com.evil.example",
            "111122223333.dkr.ecr.notaregion.amazonaws.com",
            "registry.example.com",
            "127.0.0.1",
        ] {
            assert_eq!(EcrHost::parse(not_ecr), None, "{not_ecr}");
        }
    }
}

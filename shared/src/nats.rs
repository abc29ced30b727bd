//! Connecting to NATS the same way in every process: a server list,
//! credentials, TLS and reconnection.
//!
//! A server list lets a process start while one node of the cluster is down;
//! once connected, the client also learns the cluster's other nodes from the
//! server and reconnects to any live one when its node goes away. Pull
//! consumers and subscriptions are resumed by async-nats after a reconnect.

pub use crate::secret::Secret;
use async_nats::{ConnectOptions, ServerAddr};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("NATS server `{server}` in the server list is not a valid URL: {reason}")]
    BadUrl { server: String, reason: String },
    #[error("the NATS server list is empty")]
    NoServers,
    #[error("NATS credentials: give only one of user/password, token, NKey seed or a .creds file (got {0})")]
    ManyAuthMethods(String),
    #[error("NATS user `{0}` has no password")]
    NoPassword(String),
    #[error("the NATS client certificate needs both a certificate and a key file")]
    HalfClientCert,
    #[error("cannot read NATS {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot connect to NATS at {servers}: {source}")]
    Connect { servers: String, source: async_nats::ConnectError },
}

/// How to reach NATS: `[nats]` in natter.toml, overridden by [`NatsArgs`].
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// One server URL or a comma-separated list of them.
    pub url: String,
    /// User name for user/password authentication.
    pub user: String,
    pub password: Secret,
    /// A token for token authentication.
    pub token: Secret,
    /// An NKey seed (`SU...`), or the path of a file holding one.
    pub nkey: Secret,
    /// A `.creds` file (JWT and NKey seed) as `nsc` writes it.
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) that signed the servers' certificates; setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings::url("nats://127.0.0.1:4222")
    }
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &self.redacted_url())
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("nkey", &self.nkey)
            .field("creds", &self.creds)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

impl NatsSettings {
    /// Settings for servers that need no credentials.
    pub fn url(url: impl Into<String>) -> NatsSettings {
        NatsSettings {
            url: url.into(),
            user: String::new(),
            password: Secret::default(),
            token: Secret::default(),
            nkey: Secret::default(),
            creds: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    /// The server list, parsed. Spaces around the commas are allowed.
    pub fn servers(&self) -> Result<Vec<ServerAddr>, NatsError> {
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ServerAddr>()
                    .map_err(|e| NatsError::BadUrl { server: redact_userinfo(s), reason: e.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(NatsError::NoServers);
        }
        Ok(servers)
    }

    /// The server list as it may be logged: passwords in URLs replaced.
    pub fn redacted_url(&self) -> String {
        self.url.split(',').map(|s| redact_userinfo(s.trim())).collect::<Vec<_>>().join(",")
    }

    /// Connects as `name` (shown by the server's monitoring), trying the
    /// listed servers in turn, and reconnecting for ever once connected.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, NatsError> {
        let servers = self.servers()?;
        let options = self.options(name).await?;
        let redacted = self.redacted_url();
        options.connect(servers).await.map_err(|source| NatsError::Connect { servers: redacted, source })
    }

    async fn options(&self, name: &str) -> Result<ConnectOptions, NatsError> {
        let mut methods = Vec::new();
        if !self.user.trim().is_empty() {
            methods.push("user/password");
        }
        if !self.token.is_empty() {
            methods.push("token");
        }
        if !self.nkey.is_empty() {
            methods.push("NKey");
        }
        if self.creds.is_some() {
            methods.push(".creds file");
        }
        if methods.len() > 1 {
            return Err(NatsError::ManyAuthMethods(methods.join(", ")));
        }
        let process = name.to_string();
        let mut options = ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            // Never give up: a node that comes back, or another one, takes over.
            .max_reconnects(None)
            .event_callback(move |event| {
                let process = process.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(%process, "connected to NATS"),
                        async_nats::Event::Disconnected => tracing::warn!(%process, "lost NATS; reconnecting"),
                        other => tracing::warn!(%process, "NATS: {other}"),
                    }
                }
            });
        if !self.user.trim().is_empty() {
            if self.password.is_empty() {
                return Err(NatsError::NoPassword(self.user.clone()));
            }
            options = options.user_and_password(self.user.clone(), self.password.expose().to_string());
        }
        if !self.token.is_empty() {
            options = options.token(self.token.expose().trim().to_string());
        }
        if !self.nkey.is_empty() {
            options = options.nkey(self.nkey_seed().await?);
        }
        if let Some(path) = &self.creds {
            options = options.credentials_file(path).await.map_err(|source| NatsError::Read {
                what: "credentials file",
                path: path.clone(),
                source,
            })?;
        }
        if let Some(ca) = &self.tls_ca {
            readable("CA certificate", ca)?;
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                readable("client certificate", cert)?;
                readable("client key", key)?;
                options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
            }
            (None, None) => {}
            _ => return Err(NatsError::HalfClientCert),
        }
        Ok(options)
    }

    /// The seed itself, or the contents of the file it names.
    async fn nkey_seed(&self) -> Result<String, NatsError> {
        let value = self.nkey.expose().trim();
        if value.starts_with('S') && !value.contains('/') && !std::path::Path::new(value).exists() {
            return Ok(value.to_string());
        }
        let path = PathBuf::from(value);
        let text = tokio::fs::read_to_string(&path).await.map_err(|source| NatsError::Read {
            what: "NKey seed file",
            path: path.clone(),
            source,
        })?;
        Ok(text.trim().to_string())
    }
}

fn readable(what: &'static str, path: &std::path::Path) -> Result<(), NatsError> {
    std::fs::metadata(path).map(|_| ()).map_err(|source| NatsError::Read { what, path: path.into(), source })
}

/// `nats://user:pass@host` becomes `nats://user:***@host`; a bare token
/// (`nats://token@host`) becomes `nats://***@host`.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme_end, rest)) = url.find("://").map(|i| (i + 3, &url[i + 3..])) else {
        return url.to_string();
    };
    let Some(at) = rest.find('@') else { return url.to_string() };
    let userinfo = &rest[..at];
    let hidden = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{}{hidden}{}", &url[..scheme_end], &rest[at..])
}

/// The connection flags every natter binary takes, each with its environment
/// variable; set ones override `[nats]` in natter.toml.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NatsArgs {
    /// NATS server URL, or a comma-separated list of a cluster's servers.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,
    /// NATS authentication token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,
    /// NKey seed (SU...) or a file holding one.
    #[arg(long, env = "NATS_NKEY", hide_env_values = true)]
    pub nats_nkey: Option<Secret>,
    /// NATS .creds file (JWT and seed, as nsc writes it).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) for the servers' TLS certificates.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    #[arg(long, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client certificate's key (PEM).
    #[arg(long, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Replicas of each natter stream and the blob bucket (1 on one node, 3 in a cluster).
    #[arg(long, env = "NATTER_JS_REPLICAS")]
    pub js_replicas: Option<usize>,
    /// Jobs one model's queue holds (waiting or running) before new ones get 429.
    #[arg(long, env = "NATTER_MAX_PENDING")]
    pub max_pending: Option<i64>,
}

impl NatsArgs {
    /// Lays `--js-replicas` and `--max-pending` over the file's JetStream settings.
    pub fn apply_jetstream(&self, jetstream: &mut crate::jetstream::JetStreamSettings) -> Result<(), String> {
        match self.js_replicas {
            Some(0) => return Err("--js-replicas must be at least 1".into()),
            Some(replicas) => jetstream.replicas = replicas,
            None => {}
        }
        match self.max_pending {
            Some(n) if n < 1 => Err("--max-pending must be at least 1".into()),
            Some(n) => {
                jetstream.max_pending = n;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The file's settings with the given flags laid over them.
    pub fn resolve(self, file: &NatsSettings) -> NatsSettings {
        let mut settings = file.clone();
        if let Some(url) = self.nats_url {
            settings.url = url;
        }
        if let Some(user) = self.nats_user {
            settings.user = user;
        }
        if let Some(password) = self.nats_password {
            settings.password = password;
        }
        if let Some(token) = self.nats_token {
            settings.token = token;
        }
        if let Some(nkey) = self.nats_nkey {
            settings.nkey = nkey;
        }
        settings.creds = self.nats_creds.or(settings.creds).filter(|p| !p.as_os_str().is_empty());
        settings.tls_ca = self.nats_tls_ca.or(settings.tls_ca).filter(|p| !p.as_os_str().is_empty());
        settings.tls_cert = self.nats_tls_cert.or(settings.tls_cert).filter(|p| !p.as_os_str().is_empty());
        settings.tls_key = self.nats_tls_key.or(settings.tls_key).filter(|p| !p.as_os_str().is_empty());
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_is_a_server_list() {
        let settings = NatsSettings::url("nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224");
        assert_eq!(settings.servers().unwrap().len(), 3);
        let bad = NatsSettings::url("nats://127.0.0.1:4222,nats://host:notaport");
        let err = bad.servers().unwrap_err().to_string();
        assert!(err.contains("host:notaport"), "{err}");
        assert!(NatsSettings::url(" , ").servers().is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output_and_errors() {
        let mut settings = NatsSettings::url("nats://alice:hunter2@127.0.0.1:4222,nats://s3cr3t@127.0.0.1:4223");
        settings.password = Secret::new("hunter2");
        settings.token = Secret::new("s3cr3t");
        settings.nkey = Secret::new("SUAEXAMPLESEED");
        let shown = format!("{settings:?}");
        for secret in ["hunter2", "s3cr3t", "SUAEXAMPLESEED"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("alice:***@127.0.0.1:4222"), "{shown}");
        let bad = NatsSettings::url("nats://bob:pw1234@host:nope").servers().unwrap_err().to_string();
        assert!(!bad.contains("pw1234"), "{bad}");
    }

    #[tokio::test]
    async fn only_one_way_to_authenticate() {
        let mut settings = NatsSettings::url("nats://127.0.0.1:1");
        settings.token = Secret::new("t");
        settings.user = "u".into();
        settings.password = Secret::new("p");
        assert!(matches!(settings.connect("test").await, Err(NatsError::ManyAuthMethods(_))));
        let mut half = NatsSettings::url("nats://127.0.0.1:1");
        half.tls_cert = Some("cert.pem".into());
        assert!(matches!(half.connect("test").await, Err(NatsError::HalfClientCert)));
    }

    #[test]
    fn flags_override_the_file() {
        let mut file = NatsSettings::url("nats://a:4222");
        file.user = "fromfile".into();
        let args = NatsArgs { nats_url: Some("nats://b:4222,nats://c:4222".into()), ..Default::default() };
        let settings = args.resolve(&file);
        assert_eq!(settings.url, "nats://b:4222,nats://c:4222");
        assert_eq!(settings.user, "fromfile");
    }
}

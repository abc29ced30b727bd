//! natter-bots: the front-ends: the HTTP front-end (the OpenAI-compatible API
//! and the dashboard) and the Telegram and Discord bots. Every front-end shares
//! the [`client::JobClient`] and the [`fleet::Fleet`] discovery; the bots share
//! the [`chatbot`] core, the [`relay`] and the [`store`].

pub mod chatbot;
pub mod client;
pub mod discord;
pub mod fleet;
mod follow;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod store;
pub mod telegram;

use natter_shared::catalog::Catalog;
use natter_shared::jetstream::JetStreamSettings;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BotsError {
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot open the conversation store: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Telegram(#[from] telegram::TelegramError),
    #[error(transparent)]
    Discord(#[from] discord::DiscordError),
}

#[derive(Clone, Debug)]
pub struct BotsConfig {
    pub nats: natter_shared::nats::NatsSettings,
    pub jetstream: JetStreamSettings,
    pub catalog: Catalog,
    pub http_addr: SocketAddr,
    pub job_timeout: Duration,
    /// Largest file (audio, an image) the upload endpoints accept, in bytes.
    pub max_upload: usize,
    /// Keys the HTTP API asks for, each naming a user; empty leaves it open.
    pub api_keys: http::auth::ApiKeys,
    /// The Telegram bot, when a token is configured, and its store.
    pub telegram: Option<(telegram::TelegramConfig, std::path::PathBuf)>,
    /// The Discord bot, when a token is configured, and its store.
    pub discord: Option<(discord::DiscordConfig, std::path::PathBuf)>,
}

/// OpenAI's limit on audio uploads, so clients written for it fit; photos fit too.
pub const DEFAULT_MAX_UPLOAD: usize = 25 * 1024 * 1024;

/// Reads a size in bytes: `26214400`, `25MB` (powers of 1000) or `25MiB`
/// (powers of 1024); `K`, `M` and `G` alone are the binary units.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize =
        digits.parse().map_err(|_| format!("`{text}` is not a size such as 26214400, 25MB or 25MiB"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB)")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"))
}

/// Connects to NATS and serves HTTP on `config.http_addr` until `shutdown`.
pub async fn run(config: BotsConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), BotsError> {
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| BotsError::Bind { addr: config.http_addr, source })?;
    serve(listener, config, shutdown).await
}

/// Like [`run`] on a listener the caller bound (tests bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: BotsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BotsError> {
    let jobs = client::JobClient::connect(&config.nats, &config.jetstream).await?;
    // Both front-ends stop on the same signal.
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let telegram = match config.telegram {
        Some((telegram_config, store_path)) => {
            let store = store::Store::open(&store_path).await?;
            let (jobs, shutdown) = (jobs.clone(), shutdown.clone());
            Some(tokio::spawn(telegram::run(telegram_config, jobs, store, shutdown)))
        }
        None => None,
    };
    let discord = match config.discord {
        Some((discord_config, store_path)) => {
            let store = store::Store::open(&store_path).await?;
            let (jobs, shutdown) = (jobs.clone(), shutdown.clone());
            Some(tokio::spawn(discord::run(discord_config, jobs, store, shutdown)))
        }
        None => None,
    };
    let state = http::AppState {
        fleet: fleet::Fleet::new(jobs.nats().clone()),
        jobs,
        catalog: Arc::new(config.catalog),
        job_timeout: config.job_timeout,
        max_upload: config.max_upload,
        api_keys: config.api_keys,
    };
    let addr = listener.local_addr().map_err(BotsError::Serve)?;
    tracing::info!("dashboard and API on http://{addr}/");
    axum::serve(listener, http::app(state)).with_graceful_shutdown(shutdown).await.map_err(BotsError::Serve)?;
    if let Some(telegram) = telegram {
        match telegram.await {
            Ok(result) => result?,
            Err(e) => tracing::error!("the telegram bot task failed: {e}"),
        }
    }
    if let Some(discord) = discord {
        match discord.await {
            Ok(result) => result?,
            Err(e) => tracing::error!("the discord bot task failed: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_decimal_and_binary_units() {
        assert_eq!(parse_size("26214400"), Ok(DEFAULT_MAX_UPLOAD));
        assert_eq!(parse_size("25MiB"), Ok(DEFAULT_MAX_UPLOAD));
        assert_eq!(parse_size("25 M"), Ok(DEFAULT_MAX_UPLOAD));
        assert_eq!(parse_size("25MB"), Ok(25_000_000));
        assert_eq!(parse_size("512kb"), Ok(512_000));
        assert!(parse_size("25 furlongs").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}

//! `natter-bots`: the front-ends (HTTP API and dashboard, Telegram and Discord bots).

use clap::Parser;
use natter_shared::catalog::Catalog;
use natter_shared::config::FileConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "natter-bots",
    version,
    about = "natter front-ends: OpenAI-compatible API, web dashboard, Telegram and Discord bots"
)]
struct Cli {
    /// natter.toml to read; flags and environment variables override it.
    #[arg(long, env = "NATTER_CONFIG", default_value = "config/natter.toml")]
    config: PathBuf,
    #[command(flatten)]
    nats: natter_shared::nats::NatsArgs,
    /// Address of the dashboard and the API.
    #[arg(long, env = "NATTER_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// API keys as `user:key`, comma-separated; with any set, every API call needs one.
    #[arg(long, env = "NATTER_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Option<Vec<natter_shared::secret::Secret>>,
    /// The model catalog (models.toml).
    #[arg(long, env = "NATTER_CATALOG")]
    catalog: Option<PathBuf>,
    /// Seconds a request waits for its job.
    #[arg(long, env = "NATTER_JOB_TIMEOUT")]
    job_timeout: Option<f64>,
    /// Largest upload (audio for speech to text, an image for OCR): bytes, or with a unit (25MB, 25MiB).
    #[arg(long, env = "NATTER_MAX_UPLOAD", value_parser = natter_bots::parse_size,
          default_value_t = natter_bots::DEFAULT_MAX_UPLOAD)]
    max_upload: usize,
    /// Telegram bot token (from @BotFather); the bot runs when one is given.
    #[arg(long, env = "TELEGRAM_BOT_TOKEN", hide_env_values = true)]
    telegram_token: Option<String>,
    /// Telegram Bot API base URL.
    #[arg(long, env = "NATTER_TELEGRAM_API_URL")]
    telegram_api_url: Option<String>,
    /// The Telegram bot's redb file (users, settings, conversations).
    #[arg(long, env = "NATTER_TELEGRAM_STORE")]
    telegram_store: Option<PathBuf>,
    /// Telegram user ids or usernames allowed to use the bot, comma-separated; empty lets everyone in.
    #[arg(long, env = "NATTER_TELEGRAM_ALLOW", value_delimiter = ',')]
    telegram_allow: Option<Vec<String>>,
    /// Telegram user ids of the bot's admins (always let in, get /stats), comma-separated.
    #[arg(long, env = "NATTER_TELEGRAM_ADMINS", value_delimiter = ',')]
    telegram_admins: Option<Vec<u64>>,
    /// Jobs one Telegram user may start per day (UTC); 0 is no limit.
    #[arg(long, env = "NATTER_TELEGRAM_DAILY_QUOTA")]
    telegram_daily_quota: Option<u64>,
    /// Discord bot token (from the Developer Portal); the bot runs when one is given.
    #[arg(long, env = "DISCORD_BOT_TOKEN", hide_env_values = true)]
    discord_token: Option<String>,
    /// Discord REST API base URL in place of https://discord.com (a proxy).
    #[arg(long, env = "NATTER_DISCORD_API_URL")]
    discord_api_url: Option<String>,
    /// Discord gateway WebSocket URL in place of the one the REST API names.
    #[arg(long, env = "NATTER_DISCORD_GATEWAY_URL")]
    discord_gateway_url: Option<String>,
    /// The Discord bot's redb file (users, settings, conversations).
    #[arg(long, env = "NATTER_DISCORD_STORE")]
    discord_store: Option<PathBuf>,
    /// Discord user ids allowed to use the bot, comma-separated; with the roles, empty lets everyone in.
    #[arg(long, env = "NATTER_DISCORD_USERS", value_delimiter = ',')]
    discord_users: Option<Vec<u64>>,
    /// Discord role ids whose members may use the bot, comma-separated.
    #[arg(long, env = "NATTER_DISCORD_ROLES", value_delimiter = ',')]
    discord_roles: Option<Vec<u64>>,
    /// Discord server channel ids the bot answers in, comma-separated; empty: all.
    #[arg(long, env = "NATTER_DISCORD_CHANNELS", value_delimiter = ',')]
    discord_channels: Option<Vec<u64>>,
    /// Discord user ids of the bot's admins (always let in, get /stats), comma-separated.
    #[arg(long, env = "NATTER_DISCORD_ADMINS", value_delimiter = ',')]
    discord_admins: Option<Vec<u64>>,
    /// Whether the Discord bot answers direct messages.
    #[arg(long, env = "NATTER_DISCORD_DIRECT_MESSAGES")]
    discord_direct_messages: Option<bool>,
    /// Jobs one Discord user may start per day (UTC); 0 is no limit.
    #[arg(long, env = "NATTER_DISCORD_DAILY_QUOTA")]
    discord_daily_quota: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    natter_shared::telemetry::init();
    let cli = Cli::parse();
    let user_named =
        std::env::var_os("NATTER_CONFIG").is_some() || cli.config != std::path::Path::new("config/natter.toml");
    let file = FileConfig::load(&cli.config, user_named)?;
    let catalog = Catalog::load(cli.catalog.as_ref().unwrap_or(&file.models.catalog))?;
    let timeout = cli.job_timeout.unwrap_or(file.http.job_timeout_secs);
    anyhow::ensure!(timeout.is_finite() && timeout > 0.0, "--job-timeout must be positive seconds");
    anyhow::ensure!(cli.max_upload > 0, "--max-upload must be at least one byte");
    let token = cli.telegram_token.unwrap_or(file.telegram.token.clone());
    let telegram = if token.trim().is_empty() {
        None
    } else {
        let url = cli.telegram_api_url.unwrap_or(file.telegram.api_url.clone());
        let api_url = url.parse().map_err(|e| anyhow::anyhow!("--telegram-api-url `{url}`: {e}"))?;
        let allow = cli.telegram_allow.unwrap_or(file.telegram.allow.clone());
        let quota = cli.telegram_daily_quota.unwrap_or(file.telegram.daily_quota);
        let bot = natter_bots::telegram::TelegramConfig {
            token: token.trim().to_string(),
            api_url: Some(api_url),
            poll_timeout: Duration::from_secs(30),
            limits: natter_bots::relay::RelayLimits::telegram(),
            group_limits: natter_bots::relay::RelayLimits::telegram_group(),
            default_models: catalog.models.iter().filter(|m| m.default).map(|m| m.id.clone()).collect(),
            access: natter_bots::telegram::Access {
                allow: allow.into_iter().filter(|a| !a.trim().is_empty()).collect(),
                admins: cli.telegram_admins.unwrap_or(file.telegram.admins.clone()),
            },
            daily_quota: (quota > 0).then_some(quota),
            job_timeout: Duration::from_secs_f64(timeout),
        };
        Some((bot, cli.telegram_store.unwrap_or(file.telegram.store.clone())))
    };
    let token = cli.discord_token.unwrap_or(file.discord.token.clone());
    let discord = if token.trim().is_empty() {
        None
    } else {
        let non_empty = |url: String| Some(url).filter(|u| !u.trim().is_empty());
        let quota = cli.discord_daily_quota.unwrap_or(file.discord.daily_quota);
        let bot = natter_bots::discord::DiscordConfig {
            token: token.trim().to_string(),
            api_url: non_empty(cli.discord_api_url.unwrap_or(file.discord.api_url.clone())),
            gateway_url: non_empty(cli.discord_gateway_url.unwrap_or(file.discord.gateway_url.clone())),
            limits: natter_bots::relay::RelayLimits::discord(),
            default_models: catalog.models.iter().filter(|m| m.default).map(|m| m.id.clone()).collect(),
            access: natter_bots::discord::Access {
                users: cli.discord_users.unwrap_or(file.discord.users.clone()),
                roles: cli.discord_roles.unwrap_or(file.discord.roles.clone()),
                channels: cli.discord_channels.unwrap_or(file.discord.channels.clone()),
                admins: cli.discord_admins.unwrap_or(file.discord.admins.clone()),
                direct_messages: cli.discord_direct_messages.unwrap_or(file.discord.direct_messages),
            },
            daily_quota: (quota > 0).then_some(quota),
            job_timeout: Duration::from_secs_f64(timeout),
        };
        Some((bot, cli.discord_store.unwrap_or(file.discord.store.clone())))
    };
    let mut jetstream = file.jetstream;
    cli.nats.apply_jetstream(&mut jetstream).map_err(anyhow::Error::msg)?;
    let api_keys = natter_bots::http::auth::ApiKeys::parse(&cli.api_keys.unwrap_or(file.http.api_keys.clone()))?;
    let config = natter_bots::BotsConfig {
        nats: cli.nats.resolve(&file.nats),
        jetstream,
        catalog,
        http_addr: cli.http_addr.unwrap_or(file.http.addr),
        job_timeout: Duration::from_secs_f64(timeout),
        max_upload: cli.max_upload,
        api_keys,
        telegram,
        discord,
    };
    tokio::runtime::Runtime::new()?.block_on(natter_bots::run(config, natter_shared::shutdown::signal()))?;
    Ok(())
}

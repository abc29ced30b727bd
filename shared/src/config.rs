//! Config loading: `config/natter.toml` (or `--config` / `NATTER_CONFIG`) gives the
//! defaults; each binary's flags, each with an environment variable, override them.

use crate::jetstream::JetStreamSettings;
use crate::nats::NatsSettings;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is invalid: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
}

/// The whole of natter.toml; every section is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub nats: NatsSettings,
    pub jetstream: JetStreamSettings,
    pub models: ModelsSection,
    pub worker: WorkerSection,
    pub http: HttpSection,
    pub telegram: TelegramSection,
    pub discord: DiscordSection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscordSection {
    /// The bot's token from the Developer Portal; empty leaves the Discord bot
    /// off. Better kept in the environment (DISCORD_BOT_TOKEN) than in a file.
    pub token: String,
    /// The REST API's base URL in place of `https://discord.com` (a proxy, or
    /// a fake in tests); empty for Discord itself.
    pub api_url: String,
    /// The gateway's WebSocket URL; empty for the one the REST API names.
    pub gateway_url: String,
    /// The redb file holding users, settings and conversations.
    pub store: std::path::PathBuf,
    /// User ids allowed to use the bot; with `roles`, empty lets everyone in.
    pub users: Vec<u64>,
    /// Role ids whose members may use the bot.
    pub roles: Vec<u64>,
    /// Server channels the bot answers in; empty: all of them.
    pub channels: Vec<u64>,
    /// User ids that may always use the bot and see `/stats`.
    pub admins: Vec<u64>,
    /// Whether the bot answers direct messages.
    pub direct_messages: bool,
    /// Jobs one user may start per day (UTC); 0 means no limit.
    pub daily_quota: u64,
}

impl Default for DiscordSection {
    fn default() -> Self {
        DiscordSection {
            token: String::new(),
            api_url: String::new(),
            gateway_url: String::new(),
            store: "data/discord.redb".into(),
            users: Vec::new(),
            roles: Vec::new(),
            channels: Vec::new(),
            admins: Vec::new(),
            direct_messages: true,
            daily_quota: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramSection {
    /// The bot's token from @BotFather; empty leaves the Telegram bot off.
    /// Better kept in the environment (TELEGRAM_BOT_TOKEN) than in a file.
    pub token: String,
    /// The Bot API's base URL (a local Bot API server, or a fake in tests).
    pub api_url: String,
    /// The redb file holding users, settings and conversations.
    pub store: std::path::PathBuf,
    /// User ids or usernames allowed to use the bot; empty lets everyone in.
    pub allow: Vec<String>,
    /// User ids that may use the bot and see `/stats`.
    pub admins: Vec<u64>,
    /// Jobs one user may start per day (UTC); 0 means no limit.
    pub daily_quota: u64,
}

impl Default for TelegramSection {
    fn default() -> Self {
        TelegramSection {
            token: String::new(),
            api_url: "https://api.telegram.org/".into(),
            store: "data/telegram.redb".into(),
            allow: Vec::new(),
            admins: Vec::new(),
            daily_quota: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsSection {
    /// Where fetched weights and converted caches live.
    pub dir: PathBuf,
    pub catalog: PathBuf,
}

impl Default for ModelsSection {
    fn default() -> Self {
        ModelsSection { dir: "models".into(), catalog: "config/models.toml".into() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Catalog ids this worker serves; empty means the default chat model.
    pub serve: Vec<String>,
    /// Compute threads for inference; 0 means one per core.
    pub threads: usize,
    /// How long SIGTERM waits for running jobs before handing them back.
    pub drain_secs: f64,
    /// Longest prompt + answer a chat job may use, capped by the model's own window.
    pub max_context: usize,
    /// Chat conversations one model serves at once through shared forward
    /// passes; KV-cache memory is this many times `max_context` positions.
    pub chat_batch: usize,
    /// How the chat KV cache stores keys and values.
    pub kv_cache: KvCacheType,
    /// Largest input file (photo, voice note) a job may carry, in bytes.
    pub max_input_bytes: u64,
    /// Longest audio a speech-to-text job may carry, in seconds.
    pub max_audio_seconds: f64,
    /// Largest image an OCR job may carry, in pixels; checked from the
    /// image's header before any pixel is decoded.
    pub max_image_pixels: u64,
    /// Where the worker serves `/metrics` (Prometheus), `/healthz` and
    /// `/readyz`; none when unset, so several workers share a machine freely.
    pub metrics_addr: Option<SocketAddr>,
}

/// How the chat KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    /// Half floats: what the model computed, to 3 significant digits.
    F16,
    /// 8-bit integers with one scale per head and position: half the memory
    /// and half the bytes read per decoded token at long contexts, at a small
    /// cost in precision (as llama.cpp's `-ctk q8_0 -ctv q8_0`).
    Q8,
    /// Each conversation's latest 256 to 511 positions read as f16 and older
    /// ones as 8-bit: short chats are exactly as with f16, and long contexts
    /// read about half the bytes. Both forms are kept for the whole window in
    /// 8 bits plus a few pages of f16, less memory than f16 alone.
    #[default]
    Mixed,
}

impl std::str::FromStr for KvCacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" => Ok(KvCacheType::F16),
            "q8" => Ok(KvCacheType::Q8),
            "mixed" => Ok(KvCacheType::Mixed),
            other => Err(format!("unknown KV cache type {other:?} (mixed, f16 or q8)")),
        }
    }
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            serve: Vec::new(),
            threads: 0,
            drain_secs: 20.0,
            max_context: 4096,
            chat_batch: 8,
            kv_cache: KvCacheType::Mixed,
            max_input_bytes: 100 * 1024 * 1024,
            max_audio_seconds: 3600.0,
            max_image_pixels: 50_000_000,
            metrics_addr: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub addr: SocketAddr,
    /// Longest a request waits for a job to finish before giving up on it.
    pub job_timeout_secs: f64,
    /// `user:key` entries; when any is set, every API call needs
    /// `Authorization: Bearer <key>`, and its jobs belong to the key's user.
    /// Better kept in the environment (NATTER_API_KEYS) than in a file.
    pub api_keys: Vec<crate::secret::Secret>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection { addr: "127.0.0.1:8080".parse().unwrap(), job_timeout_secs: 600.0, api_keys: Vec::new() }
    }
}

impl FileConfig {
    /// Reads `path`; a missing file at the default location yields the defaults,
    /// but a path the user named must exist.
    pub fn load(path: &Path, user_named: bool) -> Result<FileConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !user_named => Ok(FileConfig::default()),
            Err(source) => Err(ConfigError::Read { path: path.into(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/natter.toml");
        let config = FileConfig::load(&path, true).unwrap();
        assert_eq!(config.http.addr.port(), 8080);
        assert!(config.jetstream.max_attempts >= 1);
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<FileConfig>("[nats]\nurll = 'x'").is_err());
    }
}

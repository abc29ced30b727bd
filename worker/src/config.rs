//! Command-line flags (each with an environment variable) layered over natter.toml.

use crate::WorkerConfig;
use clap::Args;
use natter_shared::catalog::{Catalog, CatalogError};
use natter_shared::config::{ConfigError, FileConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Flags shared by every subcommand: where the config, catalog and models are.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// natter.toml to read; flags and environment variables override it.
    #[arg(long, env = "NATTER_CONFIG", default_value = "config/natter.toml", global = true)]
    pub config: PathBuf,
    /// Directory of fetched model files and converted caches.
    #[arg(long, env = "NATTER_MODELS_DIR", global = true)]
    pub models_dir: Option<PathBuf>,
    /// The model catalog (models.toml).
    #[arg(long, env = "NATTER_CATALOG", global = true)]
    pub catalog: Option<PathBuf>,
}

/// Flags of the worker proper.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub nats: natter_shared::nats::NatsArgs,
    /// Catalog ids to serve, comma-separated (default: the default chat and NER models).
    #[arg(long, env = "NATTER_SERVE", value_delimiter = ',')]
    pub serve: Vec<String>,
    /// Inference threads (0 = one per core).
    #[arg(long, env = "NATTER_THREADS")]
    pub threads: Option<usize>,
    /// This worker's name in events and the service API (default: host-pid).
    #[arg(long, env = "NATTER_WORKER_NAME")]
    pub name: Option<String>,
    /// Seconds without an ack before a job is redelivered.
    #[arg(long, env = "NATTER_ACK_WAIT")]
    pub ack_wait: Option<f64>,
    /// Deliveries before a job is reported failed.
    #[arg(long, env = "NATTER_MAX_ATTEMPTS")]
    pub max_attempts: Option<i64>,
    /// Seconds SIGTERM waits for running jobs before handing them back.
    #[arg(long, env = "NATTER_DRAIN_SECS")]
    pub drain_secs: Option<f64>,
    /// Longest prompt + answer a chat job may use.
    #[arg(long, env = "NATTER_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Chat conversations one model serves at once (continuous batching).
    #[arg(long, env = "NATTER_CHAT_BATCH")]
    pub chat_batch: Option<usize>,
    /// How the chat KV cache stores keys and values: mixed, f16 or q8.
    #[arg(long, env = "NATTER_KV_CACHE")]
    pub kv_cache: Option<natter_shared::config::KvCacheType>,
    /// Largest photo or audio file a job may carry, in bytes.
    #[arg(long, env = "NATTER_MAX_INPUT_BYTES")]
    pub max_input_bytes: Option<u64>,
    /// Longest audio a speech-to-text job may carry, in seconds.
    #[arg(long, env = "NATTER_MAX_AUDIO_SECONDS")]
    pub max_audio_seconds: Option<f64>,
    /// Largest image an OCR job may carry, in pixels.
    #[arg(long, env = "NATTER_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<u64>,
    /// Where to serve /metrics (Prometheus), /healthz and /readyz, e.g. 0.0.0.0:9464.
    #[arg(long, env = "NATTER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error(transparent)]
    File(#[from] ConfigError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("the catalog has no default model; name one with --serve")]
    NoDefault,
    #[error("{0}")]
    Invalid(String),
}

/// The loaded file config and catalog, with the common flags applied.
pub struct Loaded {
    pub file: FileConfig,
    pub catalog: Catalog,
    pub models_dir: PathBuf,
}

impl CommonArgs {
    pub fn load(&self) -> Result<Loaded, ConfigLoadError> {
        let user_named = std::env::var_os("NATTER_CONFIG").is_some() || self.config != Path::new("config/natter.toml");
        let file = FileConfig::load(&self.config, user_named)?;
        let catalog = Catalog::load(self.catalog.as_ref().unwrap_or(&file.models.catalog))?;
        let models_dir = self.models_dir.clone().unwrap_or_else(|| file.models.dir.clone());
        Ok(Loaded { file, catalog, models_dir })
    }
}

impl RunArgs {
    /// Threads for inference, 0 meaning "let candle decide".
    pub fn threads(&self, file: &FileConfig) -> usize {
        self.threads.unwrap_or(file.worker.threads)
    }

    pub fn resolve(self, loaded: Loaded) -> Result<WorkerConfig, ConfigLoadError> {
        let Loaded { file, catalog, models_dir } = loaded;
        let mut serve = if self.serve.is_empty() { file.worker.serve.clone() } else { self.serve.clone() };
        serve.retain(|s| !s.trim().is_empty());
        if serve.is_empty() {
            serve = crate::SERVED_KINDS.iter().filter_map(|k| catalog.default_for(*k)).map(|m| m.id.clone()).collect();
            if serve.is_empty() {
                return Err(ConfigLoadError::NoDefault);
            }
        }
        let mut jetstream = file.jetstream.clone();
        if let Some(secs) = self.ack_wait {
            if !(secs.is_finite() && secs > 0.0) {
                return Err(ConfigLoadError::Invalid("--ack-wait must be positive seconds".into()));
            }
            jetstream.ack_wait = Duration::from_secs_f64(secs);
        }
        if let Some(n) = self.max_attempts {
            if n < 1 {
                return Err(ConfigLoadError::Invalid("--max-attempts must be at least 1".into()));
            }
            jetstream.max_attempts = n;
        }
        self.nats.apply_jetstream(&mut jetstream).map_err(ConfigLoadError::Invalid)?;
        let drain = self.drain_secs.unwrap_or(file.worker.drain_secs);
        if !(drain.is_finite() && drain >= 0.0) {
            return Err(ConfigLoadError::Invalid("--drain-secs must be non-negative".into()));
        }
        let max_audio = self.max_audio_seconds.unwrap_or(file.worker.max_audio_seconds);
        if !(max_audio.is_finite() && max_audio > 0.0) {
            return Err(ConfigLoadError::Invalid("--max-audio-seconds must be positive".into()));
        }
        let name = self.name.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
            format!("{}-{}", if host.is_empty() { "worker" } else { &host }, std::process::id())
        });
        Ok(WorkerConfig {
            nats: self.nats.resolve(&file.nats),
            jetstream,
            catalog,
            models_dir,
            serve,
            max_context: self.max_context.unwrap_or(file.worker.max_context),
            chat_batch: self.chat_batch.unwrap_or(file.worker.chat_batch).max(1),
            kv_cache: self.kv_cache.unwrap_or(file.worker.kv_cache),
            max_input_bytes: self.max_input_bytes.unwrap_or(file.worker.max_input_bytes),
            max_audio_seconds: max_audio,
            max_image_pixels: self.max_image_pixels.unwrap_or(file.worker.max_image_pixels),
            drain: Duration::from_secs_f64(drain),
            name,
            metrics_addr: self.metrics_addr.or(file.worker.metrics_addr),
        })
    }
}

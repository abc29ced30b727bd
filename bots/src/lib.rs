//! natter-bots: the front-ends. This scope is the HTTP front-end (the
//! OpenAI-compatible API and the dashboard); every front-end shares the
//! [`client::JobClient`] and the [`fleet::Fleet`] discovery.

pub mod client;
pub mod fleet;
pub mod http;

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
}

#[derive(Clone, Debug)]
pub struct BotsConfig {
    pub nats_url: String,
    pub jetstream: JetStreamSettings,
    pub catalog: Catalog,
    pub http_addr: SocketAddr,
    pub job_timeout: Duration,
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
    let jobs = client::JobClient::connect(&config.nats_url, &config.jetstream).await?;
    let state = http::AppState {
        fleet: fleet::Fleet::new(jobs.nats().clone()),
        jobs,
        catalog: Arc::new(config.catalog),
        job_timeout: config.job_timeout,
    };
    let addr = listener.local_addr().map_err(BotsError::Serve)?;
    tracing::info!("dashboard and API on http://{addr}/");
    axum::serve(listener, http::app(state)).with_graceful_shutdown(shutdown).await.map_err(BotsError::Serve)
}

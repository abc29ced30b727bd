//! Registration with the NATS service API, so `$SRV.PING/INFO/STATS` (and any NATS
//! tooling) list the fleet: each worker's kinds, models, version and load.

use crate::runner::Shared;
use futures::StreamExt;
use natter_shared::catalog::ModelEntry;
use natter_shared::subjects::WORKER_SERVICE;
use std::collections::HashMap;
use std::sync::Arc;

pub struct Registration {
    service: async_nats::service::Service,
    status: tokio::task::JoinHandle<()>,
}

impl Registration {
    pub async fn stop(self) {
        self.status.abort();
        let _ = self.service.stop().await;
    }
}

/// Info metadata keys: `kinds` and `models` are comma-separated; `served`
/// pairs each model with its kind (`chat:smollm2-135m-instruct,ocr:ppocr-v5`),
/// so a front-end never sends a job to a model of another kind; `worker` is
/// the worker's name.
pub async fn register(
    client: &async_nats::Client,
    name: &str,
    models: &[ModelEntry],
    shared: Arc<Shared>,
) -> Result<Registration, String> {
    use async_nats::service::ServiceExt;
    let mut kinds: Vec<&str> = models.iter().map(|m| m.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let metadata = HashMap::from([
        ("worker".to_string(), name.to_string()),
        ("kinds".to_string(), kinds.join(",")),
        ("models".to_string(), models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(",")),
        ("served".to_string(), models.iter().map(|m| format!("{}:{}", m.kind, m.id)).collect::<Vec<_>>().join(",")),
    ]);
    let load = shared.clone();
    let service = client
        .service_builder()
        .description("natter inference worker")
        .metadata(metadata)
        .stats_handler(move |_, _| serde_json::json!({ "running": load.busy() }))
        .start(WORKER_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| e.to_string())?;
    let mut endpoint = service
        .group(format!("natter.worker.{}", sanitize(name)))
        .endpoint("status")
        .await
        .map_err(|e| e.to_string())?;
    let reply = {
        let models: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
        move || serde_json::json!({ "models": models, "running": shared.busy() }).to_string()
    };
    let status = tokio::spawn(async move {
        while let Some(request) = endpoint.next().await {
            let _ = request.respond(Ok(reply().into())).await;
        }
    });
    Ok(Registration { service, status })
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

//! The live fleet, discovered through the NATS service API (`$SRV.INFO`), so the
//! models offered are the ones some worker serves right now.

use futures::StreamExt;
use natter_shared::proto::JobKind;
use natter_shared::subjects::WORKER_SERVICE;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WorkerInfo {
    pub id: String,
    pub name: String,
    pub version: String,
    pub kinds: Vec<JobKind>,
    pub models: Vec<String>,
    /// Each served model with its kind.
    pub served: Vec<(JobKind, String)>,
}

#[derive(Deserialize)]
struct ServiceInfo {
    id: String,
    version: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// The workers last discovered, and when.
type Discovered = Option<(Instant, Vec<WorkerInfo>)>;

/// Discovery with a short cache, so a burst of requests asks the fleet once.
#[derive(Clone)]
pub struct Fleet {
    client: async_nats::Client,
    cache: Arc<Mutex<Discovered>>,
    ttl: Duration,
}

impl Fleet {
    pub fn new(client: async_nats::Client) -> Self {
        Fleet { client, cache: Arc::default(), ttl: Duration::from_secs(2) }
    }

    pub async fn workers(&self) -> Vec<WorkerInfo> {
        let mut cache = self.cache.lock().await;
        if let Some((at, workers)) = cache.as_ref() {
            if at.elapsed() < self.ttl {
                return workers.clone();
            }
        }
        let workers = discover(&self.client, Duration::from_millis(400)).await;
        *cache = Some((Instant::now(), workers.clone()));
        workers
    }

    /// Models some live worker serves for `kind`, sorted, without duplicates.
    pub async fn models(&self, kind: JobKind) -> Vec<String> {
        let mut models: Vec<String> = self
            .workers()
            .await
            .into_iter()
            .flat_map(|w| w.served)
            .filter(|(served_kind, _)| *served_kind == kind)
            .map(|(_, model)| model)
            .collect();
        models.sort();
        models.dedup();
        models
    }
}

/// Asks every worker for its info and gathers the replies for up to `wait`
/// (ending early once replies stop coming).
pub async fn discover(client: &async_nats::Client, wait: Duration) -> Vec<WorkerInfo> {
    let inbox = client.new_inbox();
    let Ok(mut replies) = client.subscribe(inbox.clone()).await else { return Vec::new() };
    let subject = format!("$SRV.INFO.{WORKER_SERVICE}");
    if client.publish_with_reply(subject, inbox, "".into()).await.is_err() {
        return Vec::new();
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut quiet = wait;
    let mut workers = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + quiet), replies.next()).await;
        let Ok(Some(msg)) = next else { break };
        // After the first reply, stop once the others go quiet (a busy worker on a
        // loaded machine can answer a little later than the first).
        quiet = Duration::from_millis(150);
        let Ok(info) = serde_json::from_slice::<ServiceInfo>(&msg.payload) else { continue };
        let list = |key: &str| -> Vec<String> {
            info.metadata
                .get(key)
                .map(|s| s.split(',').filter(|x| !x.is_empty()).map(String::from).collect())
                .unwrap_or_default()
        };
        workers.push(WorkerInfo {
            name: info.metadata.get("worker").cloned().unwrap_or_else(|| info.id.clone()),
            kinds: list("kinds").iter().filter_map(|k| k.parse().ok()).collect(),
            models: list("models"),
            served: list("served")
                .iter()
                .filter_map(|pair| pair.split_once(':'))
                .filter_map(|(kind, model)| Some((kind.parse().ok()?, model.to_string())))
                .collect(),
            id: info.id,
            version: info.version,
        });
    }
    workers.sort_by(|a, b| a.name.cmp(&b.name));
    workers
}

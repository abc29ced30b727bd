//! natter on a three-node NATS cluster: streams replicated to every node, a
//! server list in NATS_URL, and the node leading the job queue lost for good
//! while chats run, with every chat still answered.

mod common;

use common::*;
use natter_shared::jetstream::{ensure_streams, JetStreamSettings, EVENTS_STREAM, JOBS_STREAM};
use natter_shared::testkit::NatsCluster;
use std::time::Duration;

fn replicated() -> JetStreamSettings {
    JetStreamSettings { replicas: 3, ..settings(3.0, 3) }
}

async fn replicas_of(js: &async_nats::jetstream::Context, name: &str) -> (usize, Option<String>) {
    let mut stream = js.get_stream(name).await.unwrap();
    let info = stream.info().await.unwrap();
    (info.config.num_replicas, info.cluster.as_ref().and_then(|c| c.leader.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_made_with_one_replica_are_raised_to_the_configured_count() {
    let cluster = NatsCluster::start();
    cluster.wait_for_jetstream().await;
    let client = cluster.settings().connect("test").await.unwrap();
    let js = async_nats::jetstream::new(client);
    ensure_streams(&js, &JetStreamSettings::default()).await.unwrap();
    assert_eq!(replicas_of(&js, JOBS_STREAM).await.0, 1);
    ensure_streams(&js, &replicated()).await.unwrap();
    for name in [JOBS_STREAM, EVENTS_STREAM, "NATTER_CANCEL", "OBJ_NATTER_BLOBS"] {
        assert_eq!(replicas_of(&js, name).await.0, 3, "{name}");
    }
    // A process configured for fewer keeps what is there.
    ensure_streams(&js, &JetStreamSettings::default()).await.unwrap();
    assert_eq!(replicas_of(&js, JOBS_STREAM).await.0, 3);
}

async fn ask(http: &reqwest::Client, url: &str, n: usize) -> Result<String, String> {
    let body = serde_json::json!({
        "model": TINY_MODEL,
        "messages": [{"role": "user", "content": format!("Question number {n}")}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let resp = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(180))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {answer}"));
    }
    Ok(answer["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_keep_being_answered_when_the_job_queue_leader_is_lost() {
    let mut cluster = NatsCluster::start();
    cluster.wait_for_jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    let _worker = InProcessWorker::start_on(
        cluster.settings(),
        catalog.clone(),
        &models_dir(),
        &[TINY_MODEL],
        "w-cluster",
        replicated(),
        CHAT_BATCH,
    )
    .await;
    let (url, _stop) = start_http_on(cluster.settings(), replicated(), catalog, Default::default()).await;
    let client = cluster.settings().connect("test").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let (replicas, leader) = replicas_of(&js, JOBS_STREAM).await;
    assert_eq!(replicas, 3);
    let leader = leader.expect("the job queue has a leader");

    let http = reqwest::Client::new();
    let quiet: Vec<String> = {
        let mut answers = Vec::new();
        for n in 0..4 {
            answers.push(ask(&http, &url, n).await.expect("answered before the loss"));
        }
        answers
    };

    // Chats in flight while the leader's machine goes away, and more after.
    let total = 24;
    let mut running = tokio::task::JoinSet::new();
    for n in 0..total {
        let (http, url) = (http.clone(), url.clone());
        running.spawn(async move { (n, ask(&http, &url, n % 4).await) });
        if n == 6 {
            cluster.kill(&leader);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut failures = Vec::new();
    let mut answered = 0;
    while let Some(joined) = running.join_next().await {
        let (n, result) = joined.unwrap();
        match result {
            // Same prompt, greedy sampling: the same answer as on the quiet cluster.
            Ok(text) => {
                assert_eq!(text, quiet[n % 4], "chat {n} differs from the quiet answer");
                answered += 1;
            }
            Err(e) => failures.push(format!("chat {n}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{answered} of {total} answered; lost: {failures:#?}");
    let (_, new_leader) = replicas_of(&js, JOBS_STREAM).await;
    assert_ne!(new_leader, Some(leader), "another node leads the job queue");
}

//! natter on a nats-server with the shipped accounts (deploy/nats-accounts.conf),
//! over TLS with client certificates: the worker and front-end users do their
//! jobs, and each is refused what its role may not do.

mod common;

use common::secure::*;
use common::*;
use natter_shared::nats::NatsSettings;
use natter_shared::secret::Secret;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_part_over_tls_and_nothing_more() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let nats = secure_server(certs.path());
    let worker = as_user(&nats, certs.path(), "worker", WORKER_PASSWORD);
    let frontend = as_user(&nats, certs.path(), "frontend", FRONTEND_PASSWORD);

    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    let config =
        worker_config(worker.clone(), catalog.clone(), &models_dir(), &[TINY_MODEL], "w-secure", settings(30.0, 3), 2);
    let _worker = InProcessWorker::run_seen_by(config, &frontend).await;
    let (url, _stop) = start_http_on(frontend.clone(), settings(30.0, 3), catalog, Default::default()).await;

    // The whole path works with each role's rights: submit, pull, stream, answer.
    let body = serde_json::json!({
        "model": TINY_MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    });
    let answer = reqwest::Client::new().post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    // Blobs: the front-end stores one too large to go inline, the worker reads it.
    let jobs = natter_bots::client::JobClient::connect(&frontend, &settings(30.0, 3)).await.unwrap();
    let photo = vec![7u8; 3 << 20];
    let stored = jobs.put_blob(photo.clone(), "image/png").await.unwrap();
    let worker_js = async_nats::jetstream::new(worker.connect("check").await.unwrap());
    let bucket = worker_js.get_object_store(natter_shared::jetstream::BLOB_BUCKET).await.unwrap();
    let (read, _) = natter_shared::blob::get(&bucket, stored, 10 << 20).await.unwrap();
    assert_eq!(read, photo);

    // A worker may not submit jobs...
    let submitted = worker_js.publish("natter.job.chat.tiny-llama", "{}".into()).await.unwrap();
    assert!(submitted.await.is_err(), "the worker user published a job");
    // ...nor follow a job's events live.
    let worker_client = worker.connect("check").await.unwrap();
    let mut spy = worker_client.subscribe("natter.events.>").await.unwrap();
    let _ = reqwest::Client::new().post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut spy)).await.is_err(),
        "the worker user read another job's events"
    );
    // A front-end may not pull jobs.
    let frontend_js = async_nats::jetstream::new(frontend.connect("check").await.unwrap());
    let queue = frontend_js.get_stream(natter_shared::jetstream::JOBS_STREAM).await.unwrap();
    let pull = queue
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("thief".into()),
            ..Default::default()
        })
        .await;
    assert!(pull.is_err(), "the front-end user made a consumer on the job queue");
    assert!(frontend_js.publish("natter.events.x", "{}".into()).await.unwrap().await.is_err());

    // Wrong password, no client certificate: no connection, and a clear error.
    let wrong = NatsSettings { password: Secret::new("guess"), ..frontend.clone() };
    let refused = tokio::time::timeout(Duration::from_secs(15), wrong.connect("check")).await;
    assert!(matches!(refused, Ok(Err(_))), "a wrong password was let in");
    let anonymous = NatsSettings { tls_cert: None, tls_key: None, ..frontend.clone() };
    let refused = tokio::time::timeout(Duration::from_secs(15), anonymous.connect("check")).await;
    assert!(matches!(refused, Ok(Err(_))), "a client without a certificate was let in");
}

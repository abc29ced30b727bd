//! API keys on the HTTP API: the official OpenAI client with and without a
//! key, OpenAI's 401 shape from plain HTTP, the open page and health check,
//! and the dashboard asking for the key once and keeping it.

mod common;

use common::*;
use natter_bots::http::auth::ApiKeys;
use natter_shared::secret::Secret;
use std::process::Command;

const KEY: &str = "sk-natter-test-alice";

struct KeyedStack {
    _nats: NatsServer,
    url: String,
    _worker: InProcessWorker,
    _front_end: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn keyed_stack(model: &str) -> KeyedStack {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    let worker =
        InProcessWorker::start(&nats, catalog.clone(), &models_dir(), &[model], "w-keys", settings(30.0, 3)).await;
    let keys = ApiKeys::parse(&[Secret::new(format!("alice:{KEY}")), Secret::new("bob:sk-bob")]).unwrap();
    let (url, stop) = start_http_on(nats.settings(), settings(30.0, 3), catalog, keys).await;
    KeyedStack { _nats: nats, url, _worker: worker, _front_end: stop, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_asks_for_a_key_and_the_openai_client_sends_it() {
    let stack = keyed_stack(TINY_MODEL).await;
    let http = reqwest::Client::new();
    // The page and the health check stay open; the API does not.
    for open in ["/", "/healthz"] {
        let status = http.get(format!("{}{open}", stack.url)).send().await.unwrap().status();
        assert_eq!(status, 200, "{open}");
    }
    let refused = http.get(format!("{}/api/fleet", stack.url)).bearer_auth("sk-wrong").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert!(!body.to_string().contains(KEY));
    let fleet = http.get(format!("{}/api/fleet", stack.url)).bearer_auth("sk-bob").send().await.unwrap();
    assert_eq!(fleet.status(), 200);

    // A key's jobs are its user's alone: another key cannot cancel them.
    let chat =
        serde_json::json!({"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let done: serde_json::Value = http
        .post(format!("{}/v1/chat/completions", stack.url))
        .bearer_auth(KEY)
        .json(&chat)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cancel = format!("{}/api/jobs/{}/cancel", stack.url, done["id"].as_str().unwrap());
    let by_bob = http.post(&cancel).bearer_auth("sk-bob").send().await.unwrap();
    assert_eq!(by_bob.status(), 404, "bob cancelled alice's job");
    let by_alice = http.post(&cancel).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(by_alice.status(), 200);

    let mut python = Command::new("python3");
    python.arg(repo_root().join("tests/openai/keys.py")).arg(&stack.url).arg(KEY).arg(TINY_MODEL);
    run_checker(python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_the_key_once_and_keeps_it() {
    let script_dir = repo_root().join("tests/dashboard");
    assert!(
        script_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed; run scripts/install-deps.sh --test"
    );
    let stack = keyed_stack(TINY_MODEL).await;
    let mut node = Command::new("node");
    node.arg("keys.mjs").arg(&stack.url).arg(KEY).arg(TINY_MODEL).current_dir(&script_dir);
    run_checker(node).await;
}

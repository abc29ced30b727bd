//! What an operator watches and leans on: `/metrics` on the front-end and on a
//! worker, scraped by a real Prometheus (Debian's `prometheus`), `/healthz`
//! and `/readyz` on both, and a bounded queue per model that answers 429 with
//! Retry-After instead of piling up jobs that would time out.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Prometheus server scraping `targets` every second; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, String)]) -> Prometheus {
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, target) in targets {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (run scripts/install-deps.sh --test to install it)");
        Prometheus { child, url: format!("http://127.0.0.1:{port}") }
    }

    /// The value of an instant query's first series, once it has one.
    async fn value(&self, http: &reqwest::Client, query: &str) -> Option<f64> {
        let response = http.get(format!("{}/api/v1/query", self.url)).query(&[("query", query)]).send().await.ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (up to a minute) for `query` to be at least `at_least`.
    async fn wait_for(&self, http: &reqwest::Client, query: &str, at_least: f64) -> f64 {
        let mut last = None;
        for _ in 0..120 {
            last = self.value(http, query).await;
            if last.is_some_and(|v| v >= at_least) {
                return last.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("prometheus never saw {query} >= {at_least} (last: {last:?})");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(http: &reqwest::Client, url: String) -> (u16, String) {
    let response = http.get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_front_end_and_the_worker() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let mut config = worker_config(
        nats.settings(),
        catalog.clone(),
        &models_dir(),
        &[TINY_MODEL],
        "w-metrics",
        settings(30.0, 3),
        CHAT_BATCH,
    );
    config.metrics_addr = Some(worker_metrics.parse().unwrap());
    let _worker = InProcessWorker::run(config).await;
    let (url, _stop) = start_http(&nats, catalog).await;
    let http = reqwest::Client::new();

    for base in [url.clone(), format!("http://{worker_metrics}")] {
        assert_eq!(get(&http, format!("{base}/healthz")).await.0, 200, "{base}");
        assert_eq!(get(&http, format!("{base}/readyz")).await, (200, "ready".into()), "{base}");
    }
    for _ in 0..3 {
        let body = serde_json::json!({
            "model": TINY_MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
        });
        let response = http.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let missing = http.get(format!("{url}/no/such/thing")).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    let front = get(&http, format!("{url}/metrics")).await.1;
    assert!(front.contains(r#"natter_queue_depth{model="tiny-llama"} 0"#), "{front}");
    assert!(front.contains(r#"natter_http_requests_total{route="unmatched",status="404"} 1"#), "{front}");

    let scraper = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start(
        scraper.path(),
        &[("natter-bots", url.trim_start_matches("http://").to_string()), ("natter-worker", worker_metrics.clone())],
    );
    assert_eq!(prometheus.wait_for(&http, r#"up{job="natter-bots"}"#, 1.0).await, 1.0);
    assert_eq!(prometheus.wait_for(&http, r#"up{job="natter-worker"}"#, 1.0).await, 1.0);
    let requests = r#"natter_http_requests_total{route="/v1/chat/completions",status="200"}"#;
    assert_eq!(prometheus.wait_for(&http, requests, 3.0).await, 3.0);
    let answered = r#"natter_jobs_total{kind="chat",outcome="done"}"#;
    assert_eq!(prometheus.wait_for(&http, answered, 3.0).await, 3.0);
    let done = r#"natter_worker_jobs_total{kind="chat",model="tiny-llama",outcome="done"}"#;
    assert_eq!(prometheus.wait_for(&http, done, 3.0).await, 3.0);
    let completion = r#"natter_worker_tokens_total{model="tiny-llama",phase="completion"}"#;
    assert!(prometheus.wait_for(&http, completion, 3.0).await <= 24.0);
    let first_token = r#"natter_time_to_first_token_seconds_count{model="tiny-llama"}"#;
    assert_eq!(prometheus.wait_for(&http, first_token, 3.0).await, 3.0);
    for series in [
        r#"natter_worker_slots{model="tiny-llama"}"#,
        r#"natter_worker_engine_busy_seconds_total{model="tiny-llama"}"#,
        r#"natter_worker_kv_cache_used_ratio{model="tiny-llama"}"#,
        r#"natter_worker_decode_tokens_per_second_count{model="tiny-llama"}"#,
    ] {
        prometheus.wait_for(&http, series, 0.0).await;
    }
    assert!(prometheus.wait_for(&http, r#"natter_worker_engine_busy_seconds_total"#, 0.0).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after_and_keeps_the_jobs_it_took() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    // One conversation at a time, and room for two jobs: the one running and
    // one waiting.
    let jetstream = natter_shared::jetstream::JetStreamSettings { max_pending: 2, ..settings(30.0, 3) };
    let _worker = InProcessWorker::start_on(
        nats.settings(),
        catalog.clone(),
        &real_model_dir(),
        &[REAL_MODEL],
        "w-busy",
        jetstream.clone(),
        1,
    )
    .await;
    let (url, _stop) = start_http_on(nats.settings(), jetstream, catalog, Default::default()).await;
    let http = reqwest::Client::new();
    let chat = |stream: bool| {
        serde_json::json!({
            "model": REAL_MODEL,
            "messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
            "max_tokens": 120,
            "temperature": 0,
            "stream": stream,
        })
    };

    // The first job runs: once its first token streams, it holds the slot.
    let mut running = http.post(format!("{url}/v1/chat/completions")).json(&chat(true)).send().await.unwrap();
    assert_eq!(running.status(), 200);
    let first = running.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    // The second waits in the queue...
    let waiting = {
        let (http, url, body) = (http.clone(), url.clone(), chat(false));
        tokio::spawn(async move { http.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap() })
    };
    let jobs = async_nats::jetstream::new(nats.connect().await);
    for _ in 0..100 {
        let mut stream = jobs.get_stream(natter_shared::jetstream::JOBS_STREAM).await.unwrap();
        if stream.info().await.unwrap().state.messages == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the third finds the queue full.
    let refused = http.post(format!("{url}/v1/chat/completions")).json(&chat(false)).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "fleet_busy", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("busy"), "{body}");

    // Nothing that was taken is lost: both finish.
    while running.chunk().await.unwrap().is_some() {}
    let waited = waiting.await.unwrap();
    assert_eq!(waited.status(), 200);
    let answer: serde_json::Value = waited.json().await.unwrap();
    assert!(answer["choices"][0]["message"]["content"].as_str().unwrap().contains('1'), "{answer}");
    let metrics = get(&http, format!("{url}/metrics")).await.1;
    assert!(metrics.contains(r#"natter_jobs_total{kind="chat",outcome="busy"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"natter_http_requests_total{route="/v1/chat/completions",status="429"} 1"#),
        "{metrics}"
    );
}

//! The end-to-end harness: a real nats-server on a free port, workers (in-process
//! or as child processes that can be killed), and the HTTP front-end on port 0.

#![allow(dead_code)]

pub mod secure;

use natter_shared::catalog::Catalog;
use natter_shared::jetstream::JetStreamSettings;
pub use natter_shared::testkit::NatsServer;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::oneshot;

pub const REAL_MODEL: &str = "smollm2-135m-instruct";
pub const TINY_MODEL: &str = "tiny-llama";
pub const NER_MODEL: &str = "rampart-pii";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Chat conversations a test worker serves at once.
pub const CHAT_BATCH: usize = 4;

/// Where the real models are: `NATTER_MODELS_DIR`, else `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("NATTER_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("models"))
}

/// The shipped catalog plus a tiny test model written into `dir` (named by its
/// absolute path, so any models directory finds it).
pub fn catalog_with_tiny(dir: &Path) -> Catalog {
    let tiny = dir.join("tiny.gguf");
    if !tiny.exists() {
        natter_worker::testkit::write_tiny_llama(&tiny, candle_core::quantized::GgmlDType::Q8_0);
    }
    let shipped = std::fs::read_to_string(repo_root().join("config/models.toml")).unwrap();
    let text = format!(
        "{shipped}\n[[model]]\nid = \"{TINY_MODEL}\"\nkind = \"chat\"\narch = \"llama\"\nfile = \"{}\"\n",
        tiny.display()
    );
    let path = dir.join("models.toml");
    std::fs::write(&path, text).unwrap();
    Catalog::load(&path).unwrap()
}

/// The real default model, which `scripts/test.sh` fetches before the tests run.
pub fn real_model_dir() -> PathBuf {
    let dir = models_dir();
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file(),
        "the real model is missing from {}; run `cargo run -p natter-worker -- models fetch` (scripts/test.sh does)",
        dir.display()
    );
    dir
}

pub fn settings(ack_wait_secs: f64, max_attempts: i64) -> JetStreamSettings {
    JetStreamSettings { ack_wait: Duration::from_secs_f64(ack_wait_secs), max_attempts, ..Default::default() }
}

/// A worker running in this process; stopped (drained) on drop or `stop`.
pub struct InProcessWorker {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessWorker {
    pub async fn start(
        nats: &NatsServer,
        catalog: Catalog,
        models_dir: &Path,
        models: &[&str],
        name: &str,
        js: JetStreamSettings,
    ) -> Self {
        Self::start_with_batch(nats, catalog, models_dir, models, name, js, CHAT_BATCH).await
    }

    /// A worker serving `chat_batch` chat conversations at once per model.
    pub async fn start_with_batch(
        nats: &NatsServer,
        catalog: Catalog,
        models_dir: &Path,
        models: &[&str],
        name: &str,
        js: JetStreamSettings,
        chat_batch: usize,
    ) -> Self {
        Self::start_on(nats.settings(), catalog, models_dir, models, name, js, chat_batch).await
    }

    /// A worker reaching NATS through `nats` (a cluster's server list, credentials).
    pub async fn start_on(
        nats: natter_shared::nats::NatsSettings,
        catalog: Catalog,
        models_dir: &Path,
        models: &[&str],
        name: &str,
        js: JetStreamSettings,
        chat_batch: usize,
    ) -> Self {
        Self::run(worker_config(nats, catalog, models_dir, models, name, js, chat_batch)).await
    }

    /// A worker run on `config` as it is; returns once it serves its models.
    pub async fn run(config: natter_worker::WorkerConfig) -> Self {
        let nats = config.nats.clone();
        Self::run_seen_by(config, &nats).await
    }

    /// Like [`InProcessWorker::run`], asking the fleet through `nats` (a user
    /// allowed to, where the worker's own may not) whether it serves yet.
    pub async fn run_seen_by(config: natter_worker::WorkerConfig, nats: &natter_shared::nats::NatsSettings) -> Self {
        let models = config.serve.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            natter_worker::run(config, async {
                let _ = stopped.await;
            })
            .await
            .expect("worker runs");
        });
        let client = nats.connect("test").await.expect("connect to NATS");
        for model in &models {
            wait_for_model(&client, model).await;
        }
        InProcessWorker { stop: Some(stop), task: Some(task) }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// The settings the tests' workers run with.
pub fn worker_config(
    nats: natter_shared::nats::NatsSettings,
    catalog: Catalog,
    models_dir: &Path,
    models: &[&str],
    name: &str,
    jetstream: JetStreamSettings,
    chat_batch: usize,
) -> natter_worker::WorkerConfig {
    natter_worker::WorkerConfig {
        nats,
        jetstream,
        catalog,
        models_dir: models_dir.to_path_buf(),
        serve: models.iter().map(|m| m.to_string()).collect(),
        max_context: 2048,
        chat_batch,
        kv_cache: Default::default(),
        max_input_bytes: 100 << 20,
        max_audio_seconds: 3600.0,
        max_image_pixels: 50_000_000,
        drain: Duration::from_secs(5),
        name: name.to_string(),
        metrics_addr: None,
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until some worker announces `model` on the service API.
pub async fn wait_for_model(client: &async_nats::Client, model: &str) {
    for _ in 0..600 {
        let workers = natter_bots::fleet::discover(client, Duration::from_millis(200)).await;
        if workers.iter().any(|w| w.models.iter().any(|m| m == model)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no worker announced {model}");
}

/// Counts workers announcing `model`.
pub async fn workers_serving(client: &async_nats::Client, model: &str) -> usize {
    natter_bots::fleet::discover(client, Duration::from_millis(300))
        .await
        .iter()
        .filter(|w| w.models.iter().any(|m| m == model))
        .count()
}

/// A whole natter on loopback: nats-server, one in-process worker serving
/// `models` from the models directory, and the front-end.
pub struct Stack {
    pub nats: NatsServer,
    pub url: String,
    pub http: reqwest::Client,
    _worker: InProcessWorker,
    _front_end: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(models: &[&str]) -> Stack {
        Self::start_with_batch(models, CHAT_BATCH).await
    }

    /// A stack whose worker serves `chat_batch` chat conversations at once (1
    /// makes a second user's request wait in the queue, as on a busy fleet).
    pub async fn start_with_batch(models: &[&str], chat_batch: usize) -> Stack {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog_with_tiny(dir.path());
        let worker = InProcessWorker::start_with_batch(
            &nats,
            catalog.clone(),
            &models_dir(),
            models,
            "w-test",
            settings(30.0, 3),
            chat_batch,
        )
        .await;
        let (url, stop) = start_http(&nats, catalog).await;
        Stack { nats, url, http: reqwest::Client::new(), _worker: worker, _front_end: stop, _dir: dir }
    }

    /// A job client of the kind every front-end uses.
    pub async fn job_client(&self) -> natter_bots::client::JobClient {
        natter_bots::client::JobClient::connect(&self.nats.settings(), &settings(30.0, 3)).await.unwrap()
    }

    /// POSTs JSON to `path`, returning the status and the JSON answer.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self.http.post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }
}

/// The front-end on a free port; returns its base URL.
pub async fn start_http(nats: &NatsServer, catalog: Catalog) -> (String, oneshot::Sender<()>) {
    start_http_on(nats.settings(), JetStreamSettings::default(), catalog, Default::default()).await
}

/// The front-end reaching NATS through `nats`, asking for `api_keys`.
pub async fn start_http_on(
    nats: natter_shared::nats::NatsSettings,
    jetstream: JetStreamSettings,
    catalog: Catalog,
    api_keys: natter_bots::http::auth::ApiKeys,
) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = natter_bots::BotsConfig {
        telegram: None,
        discord: None,
        nats,
        jetstream,
        catalog,
        http_addr: listener.local_addr().unwrap(),
        job_timeout: Duration::from_secs(300),
        max_upload: natter_bots::DEFAULT_MAX_UPLOAD,
        api_keys,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        natter_bots::serve(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .expect("front-end runs");
    });
    (url, stop)
}

/// The `natter-worker` binary, built once by the tests themselves so `cargo test`
/// alone is enough.
pub fn worker_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-q", "-p", "natter-worker", "--bin", "natter-worker"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.current_dir(repo_root()).status().expect("run cargo build");
            assert!(status.success(), "cargo build -p natter-worker failed");
            profile_dir.join("natter-worker")
        })
        .clone()
}

/// A worker in its own process, so a test can SIGKILL or SIGTERM it.
pub struct ChildWorker {
    pub child: Child,
    pub name: String,
}

impl ChildWorker {
    pub fn spawn(
        nats: &NatsServer,
        catalog_path: &Path,
        models_dir: &Path,
        model: &str,
        name: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_on(&nats.url(), catalog_path, models_dir, model, name, extra_env)
    }

    /// A worker reaching NATS at `url` (a server list for a cluster).
    pub fn spawn_on(
        url: &str,
        catalog_path: &Path,
        models_dir: &Path,
        model: &str,
        name: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(worker_binary());
        cmd.env("NATS_URL", url)
            .env("NATTER_CATALOG", catalog_path)
            .env("NATTER_MODELS_DIR", models_dir)
            .env("NATTER_SERVE", model)
            .env("NATTER_WORKER_NAME", name)
            .env("NATTER_THREADS", "1")
            .env("RUST_LOG", std::env::var("NATTER_TEST_WORKER_LOG").unwrap_or_else(|_| "warn".into()))
            .current_dir(repo_root())
            .stdout(Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start natter-worker");
        ChildWorker { child, name: name.to_string() }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an outside checker (`node dashboard.mjs URL`, `python3 client.py URL`) off
/// the runtime and asserts it reports all its checks passed.
pub async fn run_checker(mut command: Command) {
    let output = tokio::task::spawn_blocking(move || command.output().expect("run the checker")).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// The bots' notice for a job sent while the user's previous one still runs.
const BUSY: &str = "still working on your previous request";

/// Whether the texts after the first `before` hold `expect` or the busy notice.
pub fn answered_or_busy(texts: &[String], before: usize, expect: &str) -> bool {
    texts.len() > before && texts[before..].iter().any(|t| t.contains(expect) || t.contains(BUSY))
}

/// Sends a job through `attempt` (which returns how many texts there were
/// before, and the texts once [`answered_or_busy`]) until the bot takes it. An
/// answer streamed on a loaded machine can still be running when the next job
/// is sent, and the bots take one job per user at a time, so a refused job is
/// sent again, as a user would.
pub async fn send_job<F: std::future::Future<Output = (usize, Vec<String>)>>(
    mut attempt: impl FnMut() -> F,
) -> Vec<String> {
    for _ in 0..60 {
        let (before, texts) = attempt().await;
        if !texts[before..].iter().any(|t| t.contains(BUSY)) {
            return texts;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the previous job never finished");
}

//! The fault drill: chat jobs through the OpenAI API while the fleet is
//! knocked about, with every job answered, and answered as on a quiet system.
//!
//! - On a three-node cluster (streams on three replicas, a server list in
//!   NATS_URL), three worker processes are SIGKILLed at random and started
//!   again, and the node leading NATTER_JOBS is killed for good a third of
//!   the way in.
//! - On a single nats-server run as deploy/ runs it (TLS with client
//!   certificates, the shipped accounts and least-privilege users), the
//!   server is restarted mid-run.
//!
//! `cargo test --test drill` runs a short drill; `scripts/drill.sh` runs it
//! with 1,000 jobs (`NATTER_DRILL_JOBS`) and prints the figures.

mod common;

use common::secure::*;
use common::*;
use natter_shared::jetstream::{JetStreamSettings, JOBS_STREAM};
use natter_shared::testkit::NatsCluster;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Distinct conversations the jobs cycle through, each sampled from its own
/// seed, so a redelivered job must give back exactly its quiet answer.
const PROMPTS: usize = 12;
const AT_ONCE: usize = 16;

fn jobs_to_run(default: usize) -> usize {
    std::env::var("NATTER_DRILL_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

fn request(n: usize) -> serde_json::Value {
    let prompt = n % PROMPTS;
    serde_json::json!({
        "model": TINY_MODEL,
        "messages": [{"role": "user", "content": format!("Tell me about the number {prompt}.")}],
        "max_tokens": 24,
        "temperature": 0.8,
        "seed": 1000 + prompt,
    })
}

async fn ask(http: &reqwest::Client, url: &str, n: usize) -> Result<String, String> {
    let response = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&request(n))
        .timeout(Duration::from_secs(240))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    Ok(body["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
}

/// The answer of each prompt on the system before anything is disturbed.
async fn quiet_answers(http: &reqwest::Client, url: &str) -> Vec<String> {
    let mut answers = Vec::new();
    for n in 0..PROMPTS {
        answers.push(ask(http, url, n).await.expect("answered on the quiet system"));
    }
    answers
}

/// How a run went: latencies of the answered jobs, and what went wrong.
#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    lost: Vec<String>,
    differ: Vec<String>,
}

impl Outcome {
    fn report(&mut self, name: &str, jobs: usize, wall: Duration, extra: &str) {
        self.latencies.sort();
        let at = |q: f64| self.latencies[((self.latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)];
        println!(
            "drill {name}: {jobs} jobs in {:.1} s, {} lost, {} differ; latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {extra}",
            wall.as_secs_f64(),
            self.lost.len(),
            self.differ.len(),
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            self.latencies.last().unwrap().as_secs_f64() * 1e3,
        );
        assert!(self.lost.is_empty(), "{name}: lost {:#?}", self.lost);
        assert!(self.differ.is_empty(), "{name}: differ {:#?}", self.differ);
    }
}

/// Runs `jobs` chats, `AT_ONCE` at a time, calling `disturb` with the count
/// finished so far every 100 ms until they are all done.
async fn run_jobs(url: &str, quiet: &[String], jobs: usize, mut disturb: impl FnMut(usize)) -> (Outcome, Duration) {
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..AT_ONCE {
        let (http, url, next, finished, outcome) =
            (http.clone(), url.to_string(), next.clone(), finished.clone(), outcome.clone());
        let quiet = quiet.to_vec();
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return;
                }
                let asked = Instant::now();
                let result = ask(&http, &url, n).await;
                let mut outcome = outcome.lock().unwrap();
                match result {
                    Ok(text) if text == quiet[n % PROMPTS] => outcome.latencies.push(asked.elapsed()),
                    Ok(text) => outcome.differ.push(format!("job {n}: {text:?}")),
                    Err(e) => outcome.lost.push(format!("job {n}: {e}")),
                }
                finished.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while !clients.is_empty() {
        disturb(finished.load(Ordering::Relaxed));
        tokio::select! {
            _ = clients.join_next() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let outcome = std::mem::take(&mut *outcome.lock().unwrap());
    (outcome, started.elapsed())
}

/// Three worker processes; one is SIGKILLed and started again every ~2 s.
struct Workers {
    url: String,
    catalog: std::path::PathBuf,
    env: Vec<(String, String)>,
    running: Vec<ChildWorker>,
    spawned: usize,
    kills: usize,
    last_kill: Instant,
    rng: rand::rngs::StdRng,
}

impl Workers {
    fn start(url: &str, catalog: &std::path::Path, env: &[(&str, &str)]) -> Workers {
        let mut workers = Workers {
            url: url.to_string(),
            catalog: catalog.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            running: Vec::new(),
            spawned: 0,
            kills: 0,
            last_kill: Instant::now(),
            rng: rand::rngs::StdRng::seed_from_u64(22),
        };
        for _ in 0..3 {
            workers.spawn();
        }
        workers
    }

    fn spawn(&mut self) {
        self.spawned += 1;
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let name = format!("drill-{}", self.spawned);
        self.running.push(ChildWorker::spawn_on(&self.url, &self.catalog, &models_dir(), TINY_MODEL, &name, &env));
    }

    fn kill_now_and_then(&mut self) {
        if self.last_kill.elapsed() < Duration::from_millis(self.rng.random_range(1500..2500)) {
            return;
        }
        self.last_kill = Instant::now();
        let victim = self.rng.random_range(0..self.running.len());
        let worker = self.running.remove(victim);
        worker.signal(Signal::SIGKILL);
        drop(worker);
        self.kills += 1;
        self.spawn();
    }
}

async fn wait_for_workers(settings: &natter_shared::nats::NatsSettings, n: usize) {
    let client = settings.connect("drill").await.unwrap();
    for _ in 0..600 {
        if workers_serving(&client, TINY_MODEL).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the drill's workers did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_losing_workers_and_its_queue_leader_loses_no_job() {
    let jobs = jobs_to_run(150);
    let mut cluster = NatsCluster::start();
    cluster.wait_for_jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    let jetstream = JetStreamSettings { replicas: 3, ..settings(2.0, 6) };
    let env = [("NATTER_JS_REPLICAS", "3"), ("NATTER_ACK_WAIT", "2"), ("NATTER_MAX_ATTEMPTS", "6")];
    let mut workers = Workers::start(&cluster.url(), &dir.path().join("models.toml"), &env);
    wait_for_workers(&cluster.settings(), 3).await;
    let (url, _stop) = start_http_on(cluster.settings(), jetstream, catalog, Default::default()).await;
    let http = reqwest::Client::new();
    let quiet = quiet_answers(&http, &url).await;

    let js = async_nats::jetstream::new(cluster.settings().connect("drill").await.unwrap());
    let mut queue = js.get_stream(JOBS_STREAM).await.unwrap();
    let leader =
        queue.info().await.unwrap().cluster.clone().and_then(|c| c.leader).expect("the job queue has a leader");
    let mut leader_lost = false;
    let (mut outcome, wall) = run_jobs(&url, &quiet, jobs, |finished| {
        workers.kill_now_and_then();
        if !leader_lost && finished >= jobs / 3 {
            leader_lost = true;
            cluster.kill(&leader);
        }
    })
    .await;
    let extra = format!("{} worker SIGKILLs, queue leader {leader} lost for good", workers.kills);
    outcome.report("cluster", jobs, wall, &extra);
    assert!(!cluster.running().contains(&leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_single_server_restarted_mid_run_loses_no_job() {
    let jobs = jobs_to_run(150) / 2;
    // As deploy/ runs it: TLS with client certificates, the shipped accounts.
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let mut nats = secure_server(certs.path());
    let worker = as_user(&nats, certs.path(), "worker", WORKER_PASSWORD);
    let frontend = as_user(&nats, certs.path(), "frontend", FRONTEND_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_with_tiny(dir.path());
    let catalog_path = dir.path().join("models.toml");
    let mut env = worker_env(&worker);
    env.extend([("NATTER_ACK_WAIT".into(), "2".into()), ("NATTER_MAX_ATTEMPTS".into(), "6".into())]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _a = ChildWorker::spawn(&nats, &catalog_path, &models_dir(), TINY_MODEL, "drill-a", &env);
    let _b = ChildWorker::spawn(&nats, &catalog_path, &models_dir(), TINY_MODEL, "drill-b", &env);
    wait_for_workers(&frontend, 2).await;
    let (url, _stop) = start_http_on(frontend, settings(2.0, 6), catalog, Default::default()).await;
    let http = reqwest::Client::new();
    let quiet = quiet_answers(&http, &url).await;

    let mut restarted = false;
    let (mut outcome, wall) = run_jobs(&url, &quiet, jobs, |finished| {
        if !restarted && finished >= jobs / 2 {
            restarted = true;
            nats.restart();
        }
    })
    .await;
    outcome.report("single-server", jobs, wall, "TLS and the shipped accounts; nats-server restarted once");
}

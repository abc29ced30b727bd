//! Workers dying and shutting down: SIGKILL mid-answer (redelivery to another
//! worker, the new attempt replacing the partial text), SIGTERM drain, and the
//! retry limit.

mod common;

use common::*;
use futures::StreamExt;
use natter_bots::client::{ChatUpdate, JobClient};
use natter_shared::proto::*;
use nix::sys::signal::Signal;
use std::time::Duration;

fn story_job() -> Job {
    let origin = Origin { frontend: "test".into(), user: "u".into(), conversation: None };
    let params = SamplingParams { temperature: 0.0, max_tokens: 160, ..Default::default() };
    let input = ChatInput {
        messages: vec![ChatMessage {
            role: Role::User,
            content: "Write a long story about a lighthouse keeper.".into(),
        }],
        params,
    };
    Job::new(REAL_MODEL, origin, JobInput::Chat(input))
}

struct Fleet {
    nats: NatsServer,
    _dir: tempfile::TempDir,
    a: ChildWorker,
    b: ChildWorker,
    jobs: JobClient,
}

async fn two_workers(extra_env: &[(&str, &str)]) -> Fleet {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    catalog_with_tiny(dir.path());
    let catalog = dir.path().join("models.toml");
    let models = real_model_dir();
    let env: Vec<(&str, &str)> = [("NATTER_ACK_WAIT", "3")].into_iter().chain(extra_env.iter().copied()).collect();
    let a = ChildWorker::spawn(&nats, &catalog, &models, REAL_MODEL, "worker-a", &env);
    let b = ChildWorker::spawn(&nats, &catalog, &models, REAL_MODEL, "worker-b", &env);
    let client = nats.connect().await;
    // Keep the count that reached 2: asking again could miss a busy worker's
    // discovery reply on a loaded machine.
    let mut serving = 0;
    for _ in 0..600 {
        serving = workers_serving(&client, REAL_MODEL).await;
        if serving == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(serving, 2, "both workers announced themselves");
    let jobs = JobClient::connect(&nats.settings(), &settings(3.0, 3)).await.unwrap();
    Fleet { nats, _dir: dir, a, b, jobs }
}

/// Runs `job` until the first tokens arrive, then signals the worker running it.
async fn interrupt(fleet: &Fleet, job: &Job, signal: Signal) -> (String, impl futures::Stream<Item = ChatUpdate>) {
    let mut updates = Box::pin(fleet.jobs.chat_updates(job.id).await.unwrap());
    fleet.jobs.submit(job).await.unwrap();
    let mut running_on = None;
    let mut deltas = 0;
    while deltas < 5 {
        match tokio::time::timeout(Duration::from_secs(60), updates.next()).await.unwrap().unwrap() {
            ChatUpdate::Accepted { worker, attempt, .. } => {
                assert_eq!(attempt, 1);
                running_on = Some(worker);
            }
            ChatUpdate::Delta(_) => deltas += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let victim = running_on.unwrap();
    if victim == fleet.a.name {
        fleet.a.signal(signal)
    } else {
        fleet.b.signal(signal)
    }
    (victim, updates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_a_killed_worker_is_redelivered_and_finished_by_another() {
    let fleet = two_workers(&[]).await;
    let job = story_job();
    let (victim, mut updates) = interrupt(&fleet, &job, Signal::SIGKILL).await;

    // Follow it through: the new attempt restarts the answer.
    let mut answer = String::new();
    let mut restarted = false;
    let mut second_worker = None;
    let done = loop {
        match tokio::time::timeout(Duration::from_secs(120), updates.next()).await.unwrap().unwrap() {
            ChatUpdate::Delta(d) => answer.push_str(&d),
            ChatUpdate::Restart { attempt } => {
                assert_eq!(attempt, 2);
                restarted = true;
                answer.clear();
            }
            ChatUpdate::Accepted { worker, attempt, .. } => {
                assert_eq!(attempt, 2);
                second_worker = Some(worker);
            }
            ChatUpdate::Done { text, .. } => break text,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(restarted, "the partial text of attempt 1 was replaced");
    let second = second_worker.unwrap();
    assert_ne!(second, victim, "another worker finished it");
    assert_eq!(answer, done, "the client's text is exactly the final answer");
    assert!(done.split_whitespace().count() > 20);
    let _ = &fleet.nats;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_running_job_back_when_the_drain_time_runs_out() {
    let fleet = two_workers(&[("NATTER_DRAIN_SECS", "0.2")]).await;
    let job = story_job();
    let (victim, updates) = interrupt(&fleet, &job, Signal::SIGTERM).await;
    let all: Vec<ChatUpdate> = tokio::time::timeout(Duration::from_secs(120), updates.collect()).await.unwrap();
    let accepted: Vec<&String> = all
        .iter()
        .filter_map(|u| if let ChatUpdate::Accepted { worker, .. } = u { Some(worker) } else { None })
        .collect();
    assert_eq!(accepted.len(), 1, "{all:?}");
    assert_ne!(accepted[0], &victim, "picked up by the other worker at once (nak), not after AckWait");
    assert!(matches!(all.last(), Some(ChatUpdate::Done { .. })), "{:?}", all.last());
    // The drained worker exits cleanly.
    let mut victim_child = if victim == fleet.a.name { fleet.a } else { fleet.b };
    let status = tokio::task::spawn_blocking(move || victim_child.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_outlives_its_attempts_fails_instead_of_vanishing() {
    let fleet = two_workers(&[("NATTER_MAX_ATTEMPTS", "1")]).await;
    let job = story_job();
    let (_victim, updates) = interrupt(&fleet, &job, Signal::SIGKILL).await;
    let all: Vec<ChatUpdate> = tokio::time::timeout(Duration::from_secs(60), updates.collect()).await.unwrap();
    match all.last() {
        Some(ChatUpdate::Failed { code: ErrorCode::RetriesExhausted, message }) => {
            assert!(message.contains("tried 1 times"))
        }
        other => panic!("expected retries_exhausted, got {other:?}"),
    }
}

//! The worker through NATS alone: bad input of every kind gets a `failed` event
//! and the worker keeps serving; cancellation of running and queued jobs.

mod common;

use common::*;
use natter_bots::client::{ChatUpdate, JobClient};
use natter_shared::proto::*;
use std::time::Duration;

fn chat_job(model: &str, text: &str, params: SamplingParams) -> Job {
    let origin = Origin { frontend: "test".into(), user: "u".into(), conversation: None };
    Job::new(
        model,
        origin,
        JobInput::Chat(ChatInput { messages: vec![ChatMessage { role: Role::User, content: text.into() }], params }),
    )
}

async fn outcome(jobs: &JobClient, id: uuid::Uuid) -> ChatUpdate {
    let updates = jobs.chat_updates(id).await.unwrap();
    let all: Vec<ChatUpdate> =
        tokio::time::timeout(Duration::from_secs(120), futures::StreamExt::collect(updates)).await.expect("job ends");
    all.into_iter().last().expect("some update")
}

fn failed_code(u: &ChatUpdate) -> ErrorCode {
    match u {
        ChatUpdate::Failed { code, .. } => *code,
        other => panic!("expected failed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_fail_clearly_and_the_worker_keeps_serving() {
    let stack = Stack::start(&[TINY_MODEL]).await;
    let jobs = stack.job_client().await;
    let client = stack.nats.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    let greedy = SamplingParams { temperature: 0.0, max_tokens: 6, ..Default::default() };

    // Malformed JSON that still names its id, published straight on the subject.
    let id = uuid::Uuid::now_v7();
    let updates = jobs.chat_updates(id).await.unwrap();
    let bad = serde_json::json!({ "v": 1, "id": id, "kind": "chat", "input": { "messages": "not a list" } });
    js.publish(natter_shared::subjects::job(JobKind::Chat, TINY_MODEL), serde_json::to_vec(&bad).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let all: Vec<ChatUpdate> =
        tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::collect(updates)).await.unwrap();
    let last = all.last().unwrap();
    assert_eq!(failed_code(last), ErrorCode::MalformedJob);
    // Garbage with no id at all cannot be answered, but must not stop the worker.
    js.publish(natter_shared::subjects::job(JobKind::Chat, TINY_MODEL), "\u{0}garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let cases = [
        (chat_job(TINY_MODEL, "   ", greedy.clone()), ErrorCode::BadInput),
        (chat_job(TINY_MODEL, &"word ".repeat(600), greedy.clone()), ErrorCode::PromptTooLong),
        (chat_job(TINY_MODEL, "hi", SamplingParams { top_p: Some(7.0), ..greedy.clone() }), ErrorCode::InvalidParams),
        (chat_job(TINY_MODEL, "hi", SamplingParams { max_tokens: 0, ..greedy.clone() }), ErrorCode::InvalidParams),
    ];
    for (job, code) in cases {
        jobs.submit(&job).await.unwrap();
        let last = outcome(&jobs, job.id).await;
        assert_eq!(failed_code(&last), code, "{last:?}");
        if let ChatUpdate::Failed { message, .. } = last {
            assert!(message.len() > 10, "a readable message: {message}");
        }
    }
    let mut empty = chat_job(TINY_MODEL, "x", greedy.clone());
    if let JobInput::Chat(c) = &mut empty.input {
        c.messages.clear();
    }
    jobs.submit(&empty).await.unwrap();
    assert_eq!(failed_code(&outcome(&jobs, empty.id).await), ErrorCode::BadInput);

    // A job whose model field disagrees with the queue it was put on.
    let mut wrong = chat_job("some-other-model", "hi", greedy.clone());
    wrong.id = uuid::Uuid::now_v7();
    let updates = jobs.chat_updates(wrong.id).await.unwrap();
    js.publish(natter_shared::subjects::job(JobKind::Chat, TINY_MODEL), serde_json::to_vec(&wrong).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let all: Vec<ChatUpdate> =
        tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::collect(updates)).await.unwrap();
    assert_eq!(failed_code(all.last().unwrap()), ErrorCode::UnknownModel);

    // And the next good job is served.
    let good = chat_job(TINY_MODEL, "hello", greedy);
    jobs.submit(&good).await.unwrap();
    match outcome(&jobs, good.id).await {
        ChatUpdate::Done { metrics, .. } => assert_eq!(metrics.completion_tokens, 6),
        other => panic!("expected done, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_within_a_step_and_drops_a_queued_one() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let jobs = stack.job_client().await;
    let long = SamplingParams { temperature: 0.8, seed: 11, max_tokens: 2000, ..Default::default() };
    let running = chat_job(REAL_MODEL, "Write a very long story about a dragon and a knight.", long.clone());
    // The test worker batches CHAT_BATCH conversations; these fill the other
    // slots, so the last job really waits in the queue.
    let fillers: Vec<_> = (1..common::CHAT_BATCH)
        .map(|i| chat_job(REAL_MODEL, &format!("Tell story number {i}."), long.clone()))
        .collect();
    let queued = chat_job(REAL_MODEL, "Write a poem.", long);
    let mut running_updates = Box::pin(jobs.chat_updates(running.id).await.unwrap());
    jobs.submit(&running).await.unwrap();
    for job in &fillers {
        jobs.submit(job).await.unwrap();
    }
    jobs.submit(&queued).await.unwrap();

    // Wait for a few tokens of the first job, then cancel the queued one and it.
    let mut tokens = 0;
    while tokens < 3 {
        match futures::StreamExt::next(&mut running_updates).await.unwrap() {
            ChatUpdate::Delta(_) => tokens += 1,
            ChatUpdate::Accepted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    jobs.cancel(queued.id).await.unwrap();
    let cancelled_at = std::time::Instant::now();
    jobs.cancel(running.id).await.unwrap();
    let mut after_cancel = 0;
    loop {
        match futures::StreamExt::next(&mut running_updates).await.unwrap() {
            ChatUpdate::Delta(_) => after_cancel += 1,
            ChatUpdate::Cancelled => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let stopped_in = cancelled_at.elapsed();
    assert!(stopped_in < Duration::from_secs(5), "{stopped_in:?}");
    // Tokens already generated and in flight may still arrive (the cancel
    // crosses NATS twice); generation itself stops at the next step (the
    // engine test pins that down exactly).
    assert!(after_cancel <= 40, "stopped promptly, not {after_cancel} tokens later ({stopped_in:?})");

    // The queued job is dropped when fetched: cancelled without ever being accepted.
    for job in &fillers {
        jobs.cancel(job.id).await.unwrap();
    }
    let updates: Vec<ChatUpdate> = futures::StreamExt::collect(jobs.chat_updates(queued.id).await.unwrap()).await;
    assert_eq!(updates, [ChatUpdate::Cancelled]);
}

//! The Telegram bot against a fake Bot API server on loopback (the real
//! teloxide client speaking HTTP to it), a real nats-server and a worker with
//! the real chat model.

mod common;
#[path = "common/telegram.rs"]
mod fake_telegram;

use common::*;
use fake_telegram::{retry_after, FakeTelegram};
use natter_bots::relay::RelayLimits;
use natter_bots::telegram::TelegramConfig;
use natter_bots::BotsConfig;
use std::time::Duration;
use tokio::sync::oneshot;

const EDIT_INTERVAL: Duration = Duration::from_millis(400);

struct Bot {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bot {
    /// The front-end process as `natter-bots` runs it (HTTP and Telegram
    /// together), with the Bot API pointed at the fake.
    async fn start(stack: &Stack, fake: &FakeTelegram, store: &std::path::Path) -> Bot {
        let telegram = TelegramConfig {
            token: "123456:TEST".into(),
            api_url: Some(fake.url.clone()),
            poll_timeout: Duration::from_secs(1),
            limits: RelayLimits { min_edit_interval: EDIT_INTERVAL, ..RelayLimits::telegram() },
            default_model: Some(REAL_MODEL.into()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = BotsConfig {
            nats_url: stack.nats.url(),
            jetstream: Default::default(),
            catalog: natter_shared::catalog::Catalog::load(&repo_root().join("config/models.toml")).unwrap(),
            http_addr: listener.local_addr().unwrap(),
            job_timeout: Duration::from_secs(300),
            max_upload: natter_bots::DEFAULT_MAX_UPLOAD,
            telegram: Some((telegram, store.to_path_buf())),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            natter_bots::serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("the front-ends run");
        });
        Bot { stop: Some(stop), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = (&mut self.task).await;
    }
}

/// Waits until the bot has made no call for `quiet`.
async fn settle(fake: &FakeTelegram, quiet: Duration) {
    loop {
        let last = fake.calls().iter().filter(|c| c.method != "getUpdates").map(|c| c.at).max();
        if last.is_some_and(|at| at.elapsed() >= quiet) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_gets_a_streamed_answer_through_paced_edits() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;

    fake.user_says(42, "What is the capital of France? Answer in one sentence.");
    fake.wait_for(42, Duration::from_secs(120), |texts| texts.iter().any(|t| t.contains("Paris"))).await;
    settle(&fake, Duration::from_secs(3)).await;
    bot.stop().await;

    let calls = fake.calls();
    let chat_calls: Vec<_> =
        calls.iter().filter(|c| matches!(c.method.as_str(), "sendMessage" | "editMessageText")).collect();
    assert_eq!(chat_calls[0].method, "sendMessage");
    assert!(chat_calls.iter().filter(|c| c.method == "editMessageText").count() >= 1, "the answer was not streamed");
    // Paced: every call but the final flush waits the interval after the one before.
    for pair in chat_calls[..chat_calls.len() - 1].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= EDIT_INTERVAL - Duration::from_millis(20), "two calls {gap:?} apart");
    }
    // The typing indicator showed before the first text.
    let typing = calls.iter().position(|c| c.method == "sendChatAction").expect("typing was shown");
    let first_text = calls.iter().position(|c| c.method == "sendMessage").unwrap();
    assert!(typing < first_text);
    // The text shown is the whole answer, never re-sent unchanged.
    let texts: Vec<&str> = chat_calls.iter().filter_map(|c| c.params["text"].as_str()).collect();
    assert!(texts.windows(2).all(|w| w[0] != w[1]), "{texts:?}");
    assert_eq!(fake.chat_texts(42), vec![texts.last().unwrap().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_the_answer_still_arrives_whole() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;

    fake.fail_next("editMessageText", retry_after(2));
    fake.user_says(7, "Name three colours of the rainbow.");
    settle_after_answer(&fake, 7).await;
    bot.stop().await;

    let calls = fake.calls();
    let limited = calls.iter().position(|c| c.method == "editMessageText").expect("an edit was tried");
    let next = calls[limited + 1..]
        .iter()
        .find(|c| matches!(c.method.as_str(), "sendMessage" | "editMessageText"))
        .expect("the answer went on after the rate limit");
    let waited = next.at - calls[limited].at;
    assert!(waited >= Duration::from_millis(1980), "the next call came {waited:?} after a 2 s retry_after");
    let shown = fake.chat_texts(7);
    assert_eq!(shown.len(), 1);
    assert!(!shown[0].trim().is_empty());
}

/// Waits for the first text in a chat, then for the bot to go quiet.
async fn settle_after_answer(fake: &FakeTelegram, chat: i64) {
    fake.wait_for(chat, Duration::from_secs(120), |texts| !texts.is_empty()).await;
    settle(fake, Duration::from_secs(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_get_their_own_answers_and_a_new_conversation_on_request() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;

    fake.user_says(101, "What is the capital of France?");
    fake.user_says(202, "What is the capital of Italy?");
    fake.wait_for(101, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Paris"))).await;
    fake.wait_for(202, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Rome"))).await;
    fake.user_says(101, "/new");
    fake.wait_for(101, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("new conversation"))).await;
    settle(&fake, Duration::from_secs(2)).await;
    bot.stop().await;

    // Each chat saw only its own answer.
    assert!(fake.chat_texts(202).iter().all(|t| !t.contains("Paris")));
    assert!(fake.chat_texts(101).iter().all(|t| !t.contains("Rome")));
    let chats: std::collections::BTreeSet<i64> =
        fake.calls().iter().filter_map(|c| c.params["chat_id"].as_i64()).collect();
    assert_eq!(chats, [101, 202].into());
}

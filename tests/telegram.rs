//! The Telegram bot against a fake Bot API server on loopback (the real
//! teloxide client speaking HTTP to it), a real nats-server and a worker with
//! the real chat model.

mod common;
#[path = "common/telegram.rs"]
mod fake_telegram;

use common::*;
use fake_telegram::{retry_after, FakeTelegram};
use natter_bots::relay::RelayLimits;
use natter_bots::store::{Store, UserId};
use natter_bots::telegram::{Access, TelegramConfig};
use natter_bots::BotsConfig;
use natter_shared::proto::Role;
use serde_json::json;
use std::time::Duration;
use tokio::sync::oneshot;

const EDIT_INTERVAL: Duration = Duration::from_millis(400);
const GROUP_EDIT_INTERVAL: Duration = Duration::from_millis(900);
const OCR_MODEL: &str = "ppocr-v5";
const ASR_MODEL: &str = "whisper-base";

struct Bot {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bot {
    /// The front-end process as `natter-bots` runs it (HTTP and Telegram
    /// together), with the Bot API pointed at the fake.
    async fn start(stack: &Stack, fake: &FakeTelegram, store: &std::path::Path) -> Bot {
        Bot::start_with(stack, fake, store, |_| {}).await
    }

    async fn start_with(
        stack: &Stack,
        fake: &FakeTelegram,
        store: &std::path::Path,
        adjust: impl FnOnce(&mut TelegramConfig),
    ) -> Bot {
        let mut telegram = TelegramConfig {
            token: "123456:TEST".into(),
            api_url: Some(fake.url.clone()),
            poll_timeout: Duration::from_secs(1),
            limits: RelayLimits { min_edit_interval: EDIT_INTERVAL, ..RelayLimits::telegram() },
            group_limits: RelayLimits { min_edit_interval: GROUP_EDIT_INTERVAL, ..RelayLimits::telegram_group() },
            default_models: vec![REAL_MODEL.into(), OCR_MODEL.into(), ASR_MODEL.into()],
            access: Access::default(),
            daily_quota: None,
            job_timeout: Duration::from_secs(300),
        };
        adjust(&mut telegram);
        if std::env::var_os("RUST_LOG").is_some() {
            natter_shared::telemetry::init();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = BotsConfig {
            nats: stack.nats.settings(),
            jetstream: Default::default(),
            catalog: natter_shared::catalog::Catalog::load(&repo_root().join("config/models.toml")).unwrap(),
            http_addr: listener.local_addr().unwrap(),
            job_timeout: Duration::from_secs(300),
            max_upload: natter_bots::DEFAULT_MAX_UPLOAD,
            api_keys: Default::default(),
            telegram: Some((telegram, store.to_path_buf())),
            discord: None,
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
    // A webhook left from elsewhere would make getUpdates fail: it is removed first.
    fake.set_webhook("https://old.example.org/hook");
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;

    fake.user_says(101, "What is the capital of France? Answer in one sentence.");
    fake.user_says(202, "What is the capital of Italy? Answer in one sentence.");
    fake.wait_for(101, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Paris"))).await;
    fake.wait_for(202, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Rome"))).await;
    fake.user_says(101, "/new");
    fake.wait_for(101, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("new conversation"))).await;
    settle(&fake, Duration::from_secs(2)).await;
    bot.stop().await;

    let methods: Vec<String> = fake.calls().into_iter().map(|c| c.method).collect();
    let removed = methods.iter().position(|m| m == "deleteWebhook").expect("the webhook was removed");
    assert!(removed < methods.iter().position(|m| m == "getUpdates").unwrap());
    // Each chat saw only its own answer.
    assert!(fake.chat_texts(202).iter().all(|t| !t.contains("Paris")));
    assert!(fake.chat_texts(101).iter().all(|t| !t.contains("Rome")));
    let chats: std::collections::BTreeSet<i64> =
        fake.calls().iter().filter_map(|c| c.params["chat_id"].as_i64()).collect();
    assert_eq!(chats, [101, 202].into());
}

/// The texts of the bot's messages in `chat` sent after `since` calls.
fn sent_after(fake: &FakeTelegram, since: usize, method: &str) -> Vec<serde_json::Value> {
    fake.calls()[since..].iter().filter(|c| c.method == method).map(|c| c.params.clone()).collect()
}

/// The inline buttons of a sendMessage call: (label, callback data).
fn buttons(params: &serde_json::Value) -> Vec<(String, String)> {
    params["reply_markup"]["inline_keyboard"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row.as_array().unwrap().clone())
        .map(|b| (b["text"].as_str().unwrap().to_string(), b["callback_data"].as_str().unwrap().to_string()))
        .collect()
}

/// Sends `text` and waits until a new message of the bot's in `chat` contains `expect`.
async fn ask(fake: &FakeTelegram, chat: i64, text: &str, expect: &str) -> Vec<String> {
    let before = fake.chat_texts(chat).len();
    fake.user_says(chat, text);
    fake.wait_for(chat, Duration::from_secs(120), |t| {
        t.len() > before && t[before..].iter().any(|t| t.contains(expect))
    })
    .await
}

/// Like [`ask`], for a job, sent again while the bot is busy ([`send_job`]).
async fn ask_for_job(fake: &FakeTelegram, chat: i64, text: &str, expect: &str) -> Vec<String> {
    send_job(|| async move {
        let before = fake.chat_texts(chat).len();
        fake.user_says(chat, text);
        (before, fake.wait_for(chat, Duration::from_secs(120), |t| answered_or_busy(t, before, expect)).await)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_registered_and_change_the_users_settings() {
    let stack = Stack::start(&[REAL_MODEL, TINY_MODEL, NER_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.redb");
    let bot = Bot::start(&stack, &fake, &path).await;
    let me = 31;

    ask(&fake, me, "/help", "/history").await;
    assert!(fake.calls().iter().any(|c| c.method == "getWebhookInfo"));
    assert!(!fake.calls().iter().any(|c| c.method == "deleteWebhook"), "no webhook was set, none removed");
    let menu = fake.calls().iter().find(|c| c.method == "setMyCommands").expect("commands registered").params.clone();
    let names: Vec<&str> =
        menu["commands"].as_array().unwrap().iter().map(|c| c["command"].as_str().unwrap()).collect();
    for name in ["new", "history", "model", "system", "settings", "stop", "ner", "export", "help"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    // /model lists the fleet's chat models as buttons; pressing one picks it.
    let mark = fake.calls().len();
    ask(&fake, me, "/model", "fleet serves").await;
    let listing = sent_after(&fake, mark, "sendMessage").pop().unwrap();
    let choices = buttons(&listing);
    assert!(choices.iter().any(|(label, data)| label.starts_with('✓') && data == &format!("model:{REAL_MODEL}")));
    assert!(choices.iter().any(|(_, data)| data == &format!("model:{TINY_MODEL}")), "{choices:?}");
    let listing = *fake.message_ids(me).last().unwrap();
    fake.press(me, me, listing, &format!("model:{TINY_MODEL}"));
    fake.wait_for(me, Duration::from_secs(30), |t| {
        t.last().unwrap().contains(&format!("Now answering with {TINY_MODEL}"))
    })
    .await;
    wait_until(|| fake.calls().iter().any(|c| c.method == "answerCallbackQuery")).await;

    // /system and /settings are kept per user.
    ask(&fake, me, "/system You are a pirate.", "System prompt set").await;
    ask(&fake, me, "/system", "You are a pirate.").await;
    ask(&fake, me, "/settings temperature 0.3", "Temperature: 0.3").await;
    ask(&fake, me, "/settings temperature 9", "from 0 to 2").await;
    ask(&fake, me, "/settings max_tokens 40", "Max answer tokens: 40").await;
    ask(&fake, me, "/settings voice transcribe", "Voice notes: transcribe only").await;
    ask(&fake, me, "/frobnicate", "I don't know /frobnicate").await;

    // Two conversations; /history switches back to the first with a button.
    ask(&fake, me, "/model smollm2-135m-instruct", "Now answering with").await;
    ask(&fake, me, "/system clear", "cleared").await;
    ask(&fake, me, "What is the capital of France? Answer in one sentence.", "Paris").await;
    ask(&fake, me, "/new", "new conversation").await;
    ask_for_job(&fake, me, "What is the capital of Italy? Answer in one sentence.", "").await;
    settle(&fake, Duration::from_secs(2)).await;
    let mark = fake.calls().len();
    ask(&fake, me, "/history", "pick one").await;
    let listing = sent_after(&fake, mark, "sendMessage").pop().unwrap();
    let list = buttons(&listing);
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list[0].0.starts_with("✓ What is the capital of Italy?"), "{list:?}");
    let france = list.iter().find(|(label, _)| label.contains("capital of France")).unwrap().1.clone();
    // Another user pressing it cannot switch to it.
    fake.press(77, me, *fake.message_ids(me).last().unwrap(), &france);
    wait_until(|| fake.calls().iter().filter(|c| c.method == "answerCallbackQuery").count() == 2).await;
    let refused = fake.calls().iter().rev().find(|c| c.method == "answerCallbackQuery").unwrap().params.clone();
    assert!(refused["text"].as_str().unwrap().contains("not yours"), "{refused}");
    fake.press(me, me, *fake.message_ids(me).last().unwrap(), &france);
    fake.wait_for(me, Duration::from_secs(30), |t| t.last().unwrap().contains("Continuing")).await;

    // /export sends the current (first) conversation as Markdown.
    fake.user_says(me, "/export");
    wait_until(|| !fake.documents(me).is_empty()).await;
    let (name, markdown, caption) = fake.documents(me).remove(0);
    let markdown = String::from_utf8(markdown).unwrap();
    assert!(name.ends_with(".md"), "{name}");
    assert!(caption.contains("2 messages"), "{caption}");
    assert!(markdown.contains("## You") && markdown.contains("What is the capital of France?"), "{markdown}");
    assert!(markdown.contains("## natter") && markdown.contains("Paris"), "{markdown}");
    assert!(!markdown.contains("colour"), "{markdown}");

    // /ner finds the entities of a text.
    ask_for_job(&fake, me, "/ner My name is John Smith and my email is john.smith@example.com.", "Found").await;
    let found = fake.chat_texts(me).pop().unwrap();
    assert!(found.contains("john.smith@example.com"), "{found}");

    settle(&fake, Duration::from_secs(1)).await;
    bot.stop().await;
    let store = Store::open(&path).await.unwrap();
    let settings = store.user_settings(&UserId::new("telegram", me)).await.unwrap();
    assert_eq!(settings.model.as_deref(), Some(REAL_MODEL));
    assert_eq!(
        (settings.temperature, settings.max_tokens, settings.voice_transcript_only),
        (Some(0.3), Some(40), true)
    );
    assert_eq!(settings.system_prompt, None);
}

async fn wait_until(check: impl Fn() -> bool) {
    for _ in 0..600 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("it never happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_are_read_and_voice_notes_transcribed_then_answered() {
    let stack = Stack::start(&[REAL_MODEL, OCR_MODEL, ASR_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;
    let me = 51;

    // A photo, in the sizes Telegram sends, the largest one readable.
    let png = natter_worker::testkit::render_text_png(&["Meet me at the station", "at half past nine"], 32.0);
    let file = fake.add_file(png.clone());
    let thumb = fake.add_file(vec![0; 10]);
    fake.user_sends(
        me,
        json!({"photo": [
            {"file_id": thumb.id, "file_unique_id": "t", "width": 90, "height": 20, "file_size": thumb.size},
            {"file_id": file.id, "file_unique_id": "p", "width": 900, "height": 200, "file_size": file.size},
        ]}),
    );
    let texts = fake.wait_for(me, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("half past nine"))).await;
    assert!(texts.last().unwrap().starts_with("Meet me at the station"), "{texts:?}");

    // The same image sent as a file.
    let file = fake.add_file(png);
    fake.user_sends(me, json!({"document": {"file_id": file.id, "file_unique_id": "d", "file_name": "note.png", "mime_type": "image/png", "file_size": file.size}}));
    fake.wait_for(me, Duration::from_secs(60), |t| t.iter().filter(|t| t.contains("half past nine")).count() == 2)
        .await;

    // A PDF is not something natter reads; a file over 20 MB is refused before downloading.
    let before = fake.chat_texts(me).len();
    fake.user_sends(me, json!({"document": {"file_id": "pdf", "file_unique_id": "pdf", "file_name": "a.pdf", "mime_type": "application/pdf", "file_size": 1000}}));
    fake.wait_for(me, Duration::from_secs(30), |t| t.len() > before && t.last().unwrap().contains("application/pdf"))
        .await;
    fake.user_sends(me, json!({"voice": {"file_id": "huge", "file_unique_id": "huge", "duration": 3000, "mime_type": "audio/ogg", "file_size": 25 * 1024 * 1024}}));
    fake.wait_for(me, Duration::from_secs(30), |t| t.last().unwrap().contains("at most 20 MB")).await;
    // A broken image gets the worker's reason.
    let broken = fake.add_file(b"\x89PNG\r\n\x1a\nnot really".to_vec());
    fake.user_sends(me, json!({"document": {"file_id": broken.id, "file_unique_id": "b", "file_name": "b.png", "mime_type": "image/png", "file_size": broken.size}}));
    fake.wait_for(me, Duration::from_secs(60), |t| t.last().unwrap().contains("couldn't read this image")).await;
    assert!(!fake.calls().iter().any(|c| c.method == "getFile" && c.params["file_id"] == "huge"));

    // An OGG/Opus voice note: the transcript, then an answer to it.
    let speech = dir.path().join("speech.wav");
    let spoken = "Good morning everyone. Thank you for coming to the meeting today.";
    let ok = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "135", "-g", "3", "-w"])
        .arg(&speech)
        .arg(spoken)
        .status();
    assert!(ok.expect("espeak-ng runs (scripts/install-deps.sh --test)").success());
    let ogg = dir.path().join("voice.ogg");
    ffmpeg(&speech, &["-c:a", "libopus", "-b:a", "24k"], &ogg);
    let voice = fake.add_file(std::fs::read(&ogg).unwrap());
    let before = fake.chat_texts(me).len();
    fake.user_sends(me, json!({"voice": {"file_id": voice.id, "file_unique_id": "v", "duration": 2, "mime_type": "audio/ogg", "file_size": voice.size}}));
    let heard =
        |t: &str| t.starts_with("🎙️") && t.to_lowercase().contains("morning") && t.to_lowercase().contains("meeting");
    fake.wait_for(me, Duration::from_secs(180), |t| t.len() >= before + 2 && heard(&t[before])).await;
    // The answer follows in its own message, and both are kept as a conversation turn.
    settle(&fake, Duration::from_secs(3)).await;
    let texts = fake.chat_texts(me);
    assert_eq!(texts.len(), before + 2, "{texts:?}");
    assert!(!texts[before + 1].trim().is_empty());

    // A video note (MP4 with a video track) is transcribed from its sound; with
    // transcripts only, no answer follows.
    ask(&fake, me, "/settings voice transcribe", "transcribe only").await;
    let mp4 = dir.path().join("note.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=blue:s=240x240:d=8", "-i"])
        .arg(&speech)
        .args(["-shortest", "-c:v", "mpeg4", "-c:a", "aac"])
        .arg(&mp4)
        .status()
        .unwrap();
    assert!(status.success());
    let note = fake.add_file(std::fs::read(&mp4).unwrap());
    let before = fake.chat_texts(me).len();
    fake.user_sends(me, json!({"video_note": {"file_id": note.id, "file_unique_id": "n", "length": 240, "duration": 3, "file_size": note.size}}));
    fake.wait_for(me, Duration::from_secs(120), |t| t.len() > before && heard(&t[before])).await;
    settle(&fake, Duration::from_secs(3)).await;
    assert_eq!(fake.chat_texts(me).len(), before + 1, "no answer after a transcript-only note");
    bot.stop().await;
}

fn ffmpeg(input: &std::path::Path, args: &[&str], output: &std::path::Path) {
    let status = std::process::Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-i"])
        .arg(input)
        .args(args)
        .arg(output)
        .status()
        .expect("ffmpeg runs (scripts/install-deps.sh --test)");
    assert!(status.success());
}

/// Asks for an answer long enough to need three messages.
async fn ask_for_a_long_answer(fake: &FakeTelegram, chat: i64) {
    ask(fake, chat, "/settings max_tokens 2600", "Max answer tokens: 2600").await;
    ask(fake, chat, "/settings temperature 0", "Temperature: 0").await;
    // SmolLM2 writes on for the whole budget here: about 13,000 characters.
    fake.user_says(
        chat,
        "Write a very long, detailed essay about the history of the Roman Empire, with many sections.",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cancels_a_running_answer() {
    let stack = Stack::start_with_batch(&[REAL_MODEL], 1).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;
    let me = 61;
    ask_for_a_long_answer(&fake, me).await;
    fake.wait_for(me, Duration::from_secs(60), |t| {
        t.last().is_some_and(|t| t.len() > 40 && !t.contains("Temperature"))
    })
    .await;
    // A second request while one runs is told to wait.
    ask(&fake, me, "And another thing", "still working").await;
    // Someone else's request waits in the queue, and is told so.
    fake.user_says(62, "What is the capital of France? Answer in one sentence.");
    fake.wait_for(62, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("Queued: position 1"))).await;
    fake.user_says(me, "/stop");
    fake.wait_for(me, Duration::from_secs(30), |t| t.iter().any(|t| t.ends_with("(stopped)"))).await;
    settle(&fake, Duration::from_secs(2)).await;
    let stopped = fake.chat_texts(me).into_iter().find(|t| t.ends_with("(stopped)")).unwrap();
    assert!(stopped.len() < 2000, "it stopped early, not at the end: {} chars", stopped.len());
    // The queued question is answered in the message that showed the notice.
    fake.wait_for(62, Duration::from_secs(120), |t| t.len() == 1 && t[0].contains("Paris")).await;
    // The user is free to ask again.
    ask(&fake, me, "What is the capital of France? Answer in one sentence.", "Paris").await;
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_is_split_and_a_restarted_bot_finishes_it() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.redb");
    let bot = Bot::start(&stack, &fake, &path).await;
    let me = 71;
    ask_for_a_long_answer(&fake, me).await;
    let settings_replies = fake.chat_texts(me).len();
    // Stop the bot mid-answer, as a crash or a deploy would.
    fake.wait_for(me, Duration::from_secs(60), |t| t.len() > settings_replies && t.last().unwrap().len() > 200).await;
    bot.stop().await;
    let first_answer_message = *fake.message_ids(me).get(settings_replies).unwrap();

    let bot = Bot::start(&stack, &fake, &path).await;
    let store_answer = || async {
        let store = Store::open(&path).await.unwrap();
        let user = UserId::new("telegram", me);
        let conversation = store.current_conversation(&user, &me.to_string()).await.unwrap().unwrap();
        let messages = store.messages(&user, conversation.id).await.unwrap();
        store.close().await;
        messages
    };
    // Finished in the same first message, continued in new ones past 4096.
    fake.wait_for(me, Duration::from_secs(600), |t| t.len() >= settings_replies + 3).await;
    settle(&fake, Duration::from_secs(5)).await;
    bot.stop().await;
    assert_eq!(
        fake.message_ids(me)[settings_replies],
        first_answer_message,
        "the restarted bot edited the same message"
    );
    let texts = fake.chat_texts(me);
    let answer: Vec<&String> = texts[settings_replies..].iter().collect();
    assert!(answer.len() >= 3, "{} messages", answer.len());
    assert!(answer.iter().all(|t| t.encode_utf16().count() <= 4096));
    let shown: String = answer.iter().map(|t| t.as_str()).collect::<Vec<_>>().join("\n");
    let messages = store_answer().await;
    let stored = messages.iter().find(|m| m.role == Role::Assistant).expect("the answer was kept").content.clone();
    // More than two messages' worth, so the answer was split at least twice.
    assert!(stored.chars().count() > 2 * 4096, "{} chars", stored.chars().count());
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    let (shown, stored) = (squeeze(&shown), squeeze(&stored));
    let same = shown.chars().zip(stored.chars()).take_while(|(a, b)| a == b).count();
    assert!(
        shown == stored,
        "the messages differ from the answer after {same} of {} / {} characters: shown …{}… stored …{}…",
        shown.chars().count(),
        stored.chars().count(),
        shown.chars().skip(same.saturating_sub(40)).take(120).collect::<String>(),
        stored.chars().skip(same.saturating_sub(40)).take(120).collect::<String>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_get_answers_only_when_addressed_and_access_is_enforced() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin: i64 = 900;
    let bot = Bot::start_with(&stack, &fake, &dir.path().join("bot.redb"), |config| {
        config.access = Access { allow: vec!["@user81".into(), "82".into()], admins: vec![admin as u64] };
        config.daily_quota = Some(1);
    })
    .await;
    let group = -1001;

    // Not addressed: nothing. Mentioned, replied to, or commanded: an answer, quoting the asker.
    fake.group_says(group, 81, "What is the capital of France?", None);
    let asked =
        fake.group_says(group, 81, "@natter_test_bot What is the capital of France? Answer in one sentence.", None);
    let texts = fake.wait_for(group, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Paris"))).await;
    assert_eq!(texts.len(), 1, "{texts:?}");
    settle(&fake, Duration::from_secs(2)).await;
    let first =
        fake.calls().iter().find(|c| c.method == "sendMessage" && c.params["chat_id"] == group).unwrap().params.clone();
    assert_eq!(first["reply_parameters"]["message_id"], asked);
    let answer_id = fake.message_ids(group)[0];
    // A long answer, so its edits show the group pace.
    fake.group_says(
        group,
        82,
        "Write a long, detailed essay about the history of Rome, the capital of Italy, with many sections.",
        Some(answer_id),
    );
    fake.wait_for(group, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Rome"))).await;
    fake.group_says(group, 81, "/new@some_other_bot", None);
    fake.group_says(group, 81, "/new@natter_test_bot", None);
    fake.wait_for(group, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("new conversation"))).await;
    settle(&fake, Duration::from_secs(2)).await;
    assert_eq!(fake.chat_texts(group).len(), 3);

    // Someone not on the allowlist is turned away; the quota of 1 stops user81's second request.
    ask(&fake, 83, "Hello?", "this bot is private").await;
    ask(&fake, 81, "Hello?", "requests for today").await;
    // The admin is let in and sees /stats.
    ask(&fake, admin, "/stats", "Users:").await;
    let stats = fake.chat_texts(admin).pop().unwrap();
    assert!(stats.contains("Requests today: 2"), "{stats}");
    assert!(stats.contains(REAL_MODEL), "{stats}");
    ask(&fake, 82, "/stats", "for the bot's admins").await;
    bot.stop().await;
    // Edits in the group kept the group pace (all but each answer's final flush).
    let edits = fake.calls().into_iter().filter(|c| c.method == "editMessageText" && c.params["chat_id"] == group);
    let mut by_message: std::collections::BTreeMap<i64, Vec<std::time::Instant>> = Default::default();
    for edit in edits {
        by_message.entry(edit.params["message_id"].as_i64().unwrap()).or_default().push(edit.at);
    }
    assert!(by_message.values().any(|edits| edits.len() >= 2), "the group answers were streamed");
    for edits in by_message.values() {
        for pair in edits[..edits.len() - 1].windows(2) {
            assert!(pair[1] - pair[0] >= GROUP_EDIT_INTERVAL - Duration::from_millis(20), "{:?}", pair[1] - pair[0]);
        }
    }
}

//! The Discord bot against a fake Discord on loopback (the real serenity client
//! speaking REST and the gateway's WebSocket protocol to it), a real
//! nats-server and a worker with the real models.

mod common;
#[path = "common/discord.rs"]
mod fake_discord;

use common::*;
use fake_discord::{FakeDiscord, BOT_ID};
use natter_bots::discord::{Access, DiscordConfig};
use natter_bots::relay::RelayLimits;
use natter_bots::store::{Store, UserId};
use natter_bots::BotsConfig;
use natter_shared::proto::Role;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::oneshot;

const EDIT_INTERVAL: Duration = Duration::from_millis(400);
const OCR_MODEL: &str = "ppocr-v5";
const ASR_MODEL: &str = "whisper-base";
const GUILD: u64 = 1;
const CHANNEL: u64 = 10;

struct Bot {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bot {
    async fn start(stack: &Stack, fake: &FakeDiscord, store: &std::path::Path) -> Bot {
        Bot::start_with(stack, fake, store, |_| {}).await
    }

    /// The front-end process as `natter-bots` runs it (HTTP and Discord
    /// together), with REST pointed at the fake; the gateway URL comes from
    /// the fake's `GET /gateway`, as from Discord's.
    async fn start_with(
        stack: &Stack,
        fake: &FakeDiscord,
        store: &std::path::Path,
        adjust: impl FnOnce(&mut DiscordConfig),
    ) -> Bot {
        let mut discord = DiscordConfig {
            token: "TEST.TOKEN.natter".into(),
            api_url: Some(fake.url.clone()),
            gateway_url: None,
            limits: RelayLimits { min_edit_interval: EDIT_INTERVAL, ..RelayLimits::discord() },
            default_models: vec![REAL_MODEL.into(), OCR_MODEL.into(), ASR_MODEL.into()],
            access: Access::default(),
            daily_quota: None,
            job_timeout: Duration::from_secs(300),
        };
        adjust(&mut discord);
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
            telegram: None,
            discord: Some((discord, store.to_path_buf())),
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

/// Waits until the bot has made no REST call for `quiet`.
async fn settle(fake: &FakeDiscord, quiet: Duration) {
    loop {
        let last = fake.calls().iter().map(|c| c.at).max();
        if last.is_some_and(|at| at.elapsed() >= quiet) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The REST calls after the first `since` with this method and path prefix.
fn calls_to(fake: &FakeDiscord, since: usize, method: &str, prefix: &str) -> Vec<fake_discord::Call> {
    fake.calls()[since..].iter().filter(|c| c.method == method && c.path.starts_with(prefix)).cloned().collect()
}

/// The messages of `user`'s conversations (in this store, at rest).
async fn stored_conversations(path: &std::path::Path, user: u64, chat: &str) -> Vec<Vec<(Role, String)>> {
    let store = Store::open(path).await.unwrap();
    let user = UserId::new("discord", user);
    let mut all = Vec::new();
    for conversation in store.list_conversations(&user, chat).await.unwrap() {
        let messages = store.messages(&user, conversation.id).await.unwrap();
        all.push(messages.into_iter().map(|m| (m.role, m.content)).collect());
    }
    store.close().await;
    all
}

/// Runs a slash command and waits until a new bot message in `channel` contains `expect`.
async fn slash(fake: &FakeDiscord, channel: u64, user: u64, name: &str, options: Value, expect: &str) -> Vec<String> {
    let before = fake.channel_texts(channel).len();
    fake.slash(Some(GUILD), channel, user, name, options);
    fake.wait_for(channel, Duration::from_secs(120), |t| {
        t.len() > before && t[before..].iter().any(|t| t.contains(expect))
    })
    .await
}

/// Like [`slash`], for a job, sent again while the bot is busy ([`send_job`]).
async fn slash_job(fake: &FakeDiscord, user: u64, name: &str, options: Value, expect: &str) -> Vec<String> {
    send_job(|| {
        let options = options.clone();
        async move {
            let before = fake.channel_texts(CHANNEL).len();
            fake.slash(Some(GUILD), CHANNEL, user, name, options);
            (before, fake.wait_for(CHANNEL, Duration::from_secs(120), |t| answered_or_busy(t, before, expect)).await)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_gets_a_streamed_answer_and_a_reply_continues_its_conversation() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.redb");
    let bot = Bot::start(&stack, &fake, &path).await;
    let (alice, bob) = (42, 43);

    // A message that does not mention the bot is not its business.
    fake.guild_message(GUILD, CHANNEL, alice, &[], json!({"content": "What is the capital of France?"}));
    let asked = fake.mention(GUILD, CHANNEL, alice, "What is the capital of France? Answer in one sentence.");
    let texts = fake.wait_for(CHANNEL, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Paris"))).await;
    assert_eq!(texts.len(), 1, "{texts:?}");
    settle(&fake, Duration::from_secs(3)).await;
    assert!(fake.identified() && fake.heartbeats() >= 1, "the gateway session identified and kept alive");
    let identify = fake.identify().unwrap();
    assert!(identify["token"].as_str().unwrap().ends_with("TEST.TOKEN.natter"), "{identify}");
    let message_content = 1 << 15;
    assert_ne!(identify["intents"].as_u64().unwrap() & message_content, 0, "message content is needed: {identify}");

    let calls = fake.calls();
    let posts: Vec<_> = calls.iter().filter(|c| c.path == format!("/channels/{CHANNEL}/messages")).collect();
    assert_eq!(posts.len(), 1);
    // The answer quotes the question and pings nobody.
    assert_eq!(posts[0].body["message_reference"]["message_id"].to_string().trim_matches('"'), asked.to_string());
    assert_eq!(posts[0].body["allowed_mentions"]["parse"], json!([]), "{}", posts[0].body);
    // The typing indicator showed before the first text.
    let typing = calls.iter().position(|c| c.path == format!("/channels/{CHANNEL}/typing")).expect("typing shown");
    assert!(typing < calls.iter().position(|c| c.method == "POST" && c.path.ends_with("/messages")).unwrap());
    // Streamed: edited in place, each edit the interval after the one before, none repeated.
    let answer_id = fake.message_ids(CHANNEL)[0];
    let edits: Vec<_> = calls.iter().filter(|c| c.method == "PATCH").collect();
    assert!(!edits.is_empty(), "the answer was not streamed");
    assert!(edits.iter().all(|c| c.path == format!("/channels/{CHANNEL}/messages/{answer_id}")));
    let sends: Vec<_> = calls.iter().filter(|c| c.path.starts_with(&format!("/channels/{CHANNEL}/messages"))).collect();
    for pair in sends[..sends.len() - 1].windows(2) {
        assert!(pair[1].at - pair[0].at >= EDIT_INTERVAL - Duration::from_millis(20));
        assert_ne!(pair[1].body["content"], pair[0].body["content"], "unchanged text re-sent");
    }

    // A new conversation, then a reply to the first answer: that conversation goes on.
    slash(&fake, CHANNEL, alice, "new", json!([]), "new conversation").await;
    let before = fake.channel_texts(CHANNEL).len();
    fake.reply(GUILD, CHANNEL, alice, answer_id, "And what is the capital of Italy?");
    fake.wait_for(CHANNEL, Duration::from_secs(120), |t| {
        t.len() > before && t[before..].iter().any(|t| t.contains("Rome"))
    })
    .await;
    // Bob replying to Alice's answer starts a conversation of his own.
    let before = fake.channel_texts(CHANNEL).len();
    fake.reply(GUILD, CHANNEL, bob, answer_id, "What is the capital of Spain?");
    fake.wait_for(CHANNEL, Duration::from_secs(120), |t| t.len() > before && !t[before].trim().is_empty()).await;
    // Direct messages are answered without quoting.
    fake.dm(20, alice, json!({"content": "Say hello."}));
    fake.wait_for(20, Duration::from_secs(120), |t| !t.is_empty()).await;
    settle(&fake, Duration::from_secs(3)).await;
    bot.stop().await;
    let dm_post = fake.calls().into_iter().find(|c| c.method == "POST" && c.path == "/channels/20/messages").unwrap();
    assert!(dm_post.body.get("message_reference").is_none_or(Value::is_null), "{}", dm_post.body);

    let chat = format!("{GUILD}/{CHANNEL}");
    let alices = stored_conversations(&path, alice, &chat).await;
    let continued = alices.iter().find(|c| c.len() == 4).unwrap_or_else(|| panic!("{alices:?}"));
    assert_eq!(continued[0].1, "What is the capital of France? Answer in one sentence.");
    assert_eq!((continued[2].0, continued[2].1.as_str()), (Role::User, "And what is the capital of Italy?"));
    let bobs = stored_conversations(&path, bob, &chat).await;
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].len(), 2, "Bob's conversation is his own: {bobs:?}");
    assert!(!bobs[0].iter().any(|(_, text)| text.contains("France")));
}

/// Asks for an answer long enough to need several messages.
async fn ask_for_a_long_answer(fake: &FakeDiscord, user: u64) -> u64 {
    slash(
        fake,
        CHANNEL,
        user,
        "settings",
        json!([{"name": "max_tokens", "type": 4, "value": 2600}, {"name": "temperature", "type": 10, "value": 0.0}]),
        "Max answer tokens: 2600",
    )
    .await;
    // SmolLM2 writes on for the whole budget here: about 9,700 characters.
    fake.mention(
        GUILD,
        CHANNEL,
        user,
        "Write a very long, detailed essay about the history of the Roman Empire, with many sections. End with a Python program that lists the emperors.",
    )
}

/// Every message with its code fences balanced.
fn assert_fences_balanced(messages: &[String]) {
    for message in messages {
        let fences = message.lines().filter(|l| l.trim_start().starts_with("```")).count();
        assert_eq!(fences % 2, 0, "a message with an open code block:\n{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_is_split_and_a_restarted_bot_finishes_it() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.redb");
    let bot = Bot::start(&stack, &fake, &path).await;
    let me = 71;
    ask_for_a_long_answer(&fake, me).await;
    let replies_before = fake.channel_texts(CHANNEL).len();
    // Stop the bot mid-answer, as a crash or a deploy would.
    fake.wait_for(CHANNEL, Duration::from_secs(60), |t| t.len() > replies_before && t.last().unwrap().len() > 300)
        .await;
    bot.stop().await;
    let first_answer_message = fake.message_ids(CHANNEL)[replies_before];

    let bot = Bot::start(&stack, &fake, &path).await;
    // Finished in the same first message, continued in new ones past 2000 characters.
    fake.wait_for(CHANNEL, Duration::from_secs(600), |t| t.len() >= replies_before + 3).await;
    settle(&fake, Duration::from_secs(5)).await;
    bot.stop().await;
    assert_eq!(
        fake.message_ids(CHANNEL)[replies_before],
        first_answer_message,
        "the restarted bot edited the same message"
    );
    let texts = fake.channel_texts(CHANNEL);
    let answer = &texts[replies_before..];
    let sizes: Vec<usize> = answer.iter().map(|t| t.chars().count()).collect();
    assert!(sizes.iter().sum::<usize>() >= 5000 && sizes.iter().all(|n| *n <= 2000), "message sizes {sizes:?}");
    assert_fences_balanced(answer);
    let stored = stored_conversations(&path, me, &format!("{GUILD}/{CHANNEL}")).await;
    let stored = stored[0].iter().find(|(role, _)| *role == Role::Assistant).expect("the answer was kept").1.clone();
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(squeeze(&answer.join("\n")), squeeze(&stored), "the messages differ from the answer");
}

/// An answer with a code block longer than a Discord message: a tiny model
/// does not write one on request, so a stand-in worker on the real NATS
/// streams it, token by token, as a worker would.
fn scripted_answer() -> String {
    let mut code = String::new();
    for n in 1..=90 {
        code.push_str(&format!("def emperor_{n}():\n    \"\"\"The {n}th emperor.\"\"\"\n    return {n}\n\n"));
    }
    format!("Here is the program:\n\n```python\n{code}```\n\nRun it with `python3 emperors.py`.")
}

/// Serves `model` for chat jobs as a worker would, answering every job with `answer`.
async fn scripted_worker(nats: &async_nats::Client, model: &'static str, answer: String) {
    use natter_shared::proto::{Event, EventBody, FinishReason, Job, JobKind, JobResult, Metrics, V1};
    let mut info = nats.subscribe(format!("$SRV.INFO.{}", natter_shared::subjects::WORKER_SERVICE)).await.unwrap();
    let mut jobs = nats.subscribe(natter_shared::subjects::job(JobKind::Chat, model)).await.unwrap();
    nats.flush().await.unwrap();
    let client = nats.clone();
    tokio::spawn(async move {
        while let Some(msg) = futures::StreamExt::next(&mut info).await {
            let reply = json!({"id": "scripted", "version": "0.0.0", "metadata": {
                "worker": "scripted", "kinds": "chat", "models": model, "served": format!("chat:{model}"),
            }});
            let _ = client.publish(msg.reply.unwrap(), reply.to_string().into()).await;
        }
    });
    let js = async_nats::jetstream::new(nats.clone());
    tokio::spawn(async move {
        while let Some(msg) = futures::StreamExt::next(&mut jobs).await {
            let job: Job = serde_json::from_slice(&msg.payload).unwrap();
            let mut bodies = vec![EventBody::Accepted { worker: "scripted".into(), model: model.into() }];
            let chars: Vec<char> = answer.chars().collect();
            bodies.extend(
                chars.chunks(12).map(|piece| EventBody::Token { text: piece.iter().collect(), tokens: Vec::new() }),
            );
            bodies.push(EventBody::Done {
                result: JobResult::Chat { text: answer.clone(), finish_reason: FinishReason::Stop },
                metrics: Metrics::default(),
            });
            for (seq, body) in bodies.into_iter().enumerate() {
                let event = Event { v: V1, job_id: job.id, attempt: 1, seq: seq as u64 + 1, body };
                let subject = natter_shared::subjects::events(job.id);
                js.publish(subject, serde_json::to_vec(&event).unwrap().into()).await.unwrap().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_block_cut_across_messages_is_closed_and_reopened() {
    let stack = Stack::start(&[TINY_MODEL]).await;
    let nats = async_nats::connect(stack.nats.url()).await.unwrap();
    let answer = scripted_answer();
    assert!(answer.chars().count() > 4000);
    scripted_worker(&nats, "scripted-coder", answer.clone()).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start_with(&stack, &fake, &dir.path().join("bot.redb"), |config| {
        config.default_models = vec!["scripted-coder".into()];
    })
    .await;

    // Through /chat: the deferred response, then follow-ups.
    let prompt = json!([{"name": "prompt", "type": 3, "value": "Write a program listing the emperors."}]);
    fake.slash(Some(GUILD), CHANNEL, 5, "chat", prompt);
    fake.wait_for(CHANNEL, Duration::from_secs(60), |t| {
        t.last().is_some_and(|t| t.ends_with("`python3 emperors.py`."))
    })
    .await;
    settle(&fake, Duration::from_secs(2)).await;
    bot.stop().await;
    let messages = fake.channel_texts(CHANNEL);
    assert!(messages.len() >= 3, "{messages:?}");
    assert!(messages.iter().all(|m| m.chars().count() <= 2000));
    assert_fences_balanced(&messages);
    assert!(messages[1].starts_with("```python\n"), "the block is reopened with its language: {messages:?}");
    // Without the fences, the messages are the answer.
    let text =
        |s: &str| s.lines().filter(|l| !l.starts_with("```")).flat_map(|l| l.split_whitespace()).collect::<String>();
    assert_eq!(text(&messages.join("\n")), text(&answer));
    let webhooks: Vec<_> = fake.calls().into_iter().filter(|c| c.path.starts_with("/webhooks/")).collect();
    assert!(webhooks.iter().any(|c| c.method == "PATCH" && c.path.ends_with("/@original")));
    assert!(webhooks.iter().filter(|c| c.method == "POST").count() >= 2, "continued in follow-ups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_read_and_voice_messages_transcribed_then_answered() {
    let stack = Stack::start(&[REAL_MODEL, OCR_MODEL, ASR_MODEL]).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;
    let me = 51;
    let dm = 30;

    let png = natter_worker::testkit::render_text_png(&["Meet me at the station", "at half past nine"], 32.0);
    let image = fake.attachment("note.png", "image/png", png);
    fake.dm(dm, me, json!({"content": "", "attachments": [image]}));
    let texts = fake.wait_for(dm, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("half past nine"))).await;
    assert!(texts.last().unwrap().starts_with("Meet me at the station"), "{texts:?}");

    // A PDF is not something natter reads; an attachment over 25 MB is refused
    // before downloading; a broken image gets the worker's reason.
    let pdf = fake.attachment("a.pdf", "application/pdf", b"%PDF-1.4".to_vec());
    fake.dm(dm, me, json!({"content": "", "attachments": [pdf]}));
    fake.wait_for(dm, Duration::from_secs(30), |t| t.last().unwrap().contains("application/pdf")).await;
    let mut huge = fake.attachment("long.ogg", "audio/ogg", vec![0; 16]);
    huge["size"] = json!(30 * 1024 * 1024);
    fake.dm(dm, me, json!({"content": "", "attachments": [huge.clone()]}));
    fake.wait_for(dm, Duration::from_secs(30), |t| t.last().unwrap().contains("up to 25 MB")).await;
    let broken = fake.attachment("b.png", "image/png", b"\x89PNG\r\n\x1a\nnot really".to_vec());
    fake.dm(dm, me, json!({"content": "", "attachments": [broken]}));
    fake.wait_for(dm, Duration::from_secs(60), |t| t.last().unwrap().contains("couldn't read this image")).await;
    let huge_path = huge["url"].as_str().unwrap().split_once("/attachments/").unwrap().1.to_string();
    assert!(!fake.calls().iter().any(|c| c.path.contains(&huge_path)), "the oversize file was downloaded");

    // A voice message (Ogg Opus, the IS_VOICE_MESSAGE flag): the transcript, then an answer.
    let speech = dir.path().join("speech.wav");
    let spoken = "Good morning everyone. Thank you for coming to the meeting today.";
    let ok = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "135", "-g", "3", "-w"])
        .arg(&speech)
        .arg(spoken)
        .status();
    assert!(ok.expect("espeak-ng runs (scripts/install-deps.sh --test)").success());
    let ogg = dir.path().join("voice-message.ogg");
    let status = std::process::Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-i"])
        .arg(&speech)
        .args(["-c:a", "libopus", "-b:a", "24k"])
        .arg(&ogg)
        .status()
        .expect("ffmpeg runs (scripts/install-deps.sh --test)");
    assert!(status.success());
    let mut voice = fake.attachment("voice-message.ogg", "audio/ogg", std::fs::read(&ogg).unwrap());
    voice["duration_secs"] = json!(4.0);
    voice["waveform"] = json!("AAAAAAAAAAAA");
    let before = fake.channel_texts(CHANNEL).len();
    fake.guild_message(GUILD, CHANNEL, me, &[], json!({"content": "", "flags": 8192, "attachments": [voice]}));
    // In a server a voice message cannot mention the bot; it is answered as a reply to the bot…
    settle(&fake, Duration::from_secs(2)).await;
    assert_eq!(fake.channel_texts(CHANNEL).len(), before, "an unaddressed voice message was answered");
    // …or in a direct message.
    let voice = fake.attachment("voice-message.ogg", "audio/ogg", std::fs::read(&ogg).unwrap());
    let before = fake.channel_texts(dm).len();
    fake.dm(dm, me, json!({"content": "", "flags": 8192, "attachments": [voice]}));
    let heard =
        |t: &str| t.starts_with("🎙️") && t.to_lowercase().contains("morning") && t.to_lowercase().contains("meeting");
    fake.wait_for(dm, Duration::from_secs(180), |t| t.len() >= before + 2 && heard(&t[before])).await;
    settle(&fake, Duration::from_secs(3)).await;
    let texts = fake.channel_texts(dm);
    assert_eq!(texts.len(), before + 2, "{texts:?}");
    assert!(!texts[before + 1].trim().is_empty());
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slash_commands_are_registered_deferred_and_answered() {
    let stack = Stack::start(&[REAL_MODEL, TINY_MODEL, NER_MODEL]).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.redb");
    let bot = Bot::start(&stack, &fake, &path).await;
    let me = 31;

    slash(&fake, CHANNEL, me, "help", json!([]), "/history").await;
    let commands = fake.commands();
    let names: Vec<&str> = commands.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in ["chat", "new", "history", "model", "system", "settings", "stop", "ner", "export"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let model = commands.as_array().unwrap().iter().find(|c| c["name"] == "model").unwrap();
    let choices = model["options"][0]["choices"].to_string();
    assert!(choices.contains(REAL_MODEL) && choices.contains(TINY_MODEL), "the fleet's models: {choices}");

    // /chat is deferred at once, then its answer streams into the response.
    let before = fake.channel_texts(CHANNEL).len();
    let asked = fake.slash(
        Some(GUILD),
        CHANNEL,
        me,
        "chat",
        json!([{"name": "prompt", "type": 3, "value": "What is the capital of France? Answer in one sentence."}]),
    );
    fake.wait_for(CHANNEL, Duration::from_secs(120), |t| t.len() > before && t[before].contains("Paris")).await;
    let callbacks = fake.interaction_callbacks(asked);
    assert_eq!(callbacks.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(), [5], "deferred once");
    let edits = calls_to(&fake, 0, "PATCH", "/webhooks/");
    assert!(edits.iter().any(|c| c.path.ends_with("/messages/@original")), "the deferred response was filled in");

    // Settings and the system prompt, per user; the replies are the user's alone.
    slash(
        &fake,
        CHANNEL,
        me,
        "settings",
        json!([{"name": "temperature", "type": 10, "value": 0.3}]),
        "Temperature: 0.3",
    )
    .await;
    let ephemeral = fake.calls().into_iter().rev().find(|c| c.path.ends_with("/callback")).unwrap();
    assert_eq!(ephemeral.body["data"]["flags"], 64, "{}", ephemeral.body);
    slash(
        &fake,
        CHANNEL,
        me,
        "settings",
        json!([{"name": "voice", "type": 3, "value": "transcribe"}]),
        "transcribe only",
    )
    .await;
    slash(
        &fake,
        CHANNEL,
        me,
        "system",
        json!([{"name": "prompt", "type": 3, "value": "You are a pirate."}]),
        "System prompt set",
    )
    .await;
    slash(&fake, CHANNEL, me, "system", json!([]), "You are a pirate.").await;
    slash(&fake, CHANNEL, me, "system", json!([{"name": "clear", "type": 5, "value": true}]), "cleared").await;

    // /model without a name offers the fleet's models in a menu; choosing one picks it.
    slash(&fake, CHANNEL, me, "model", json!([]), "fleet serves").await;
    let menu = calls_to(&fake, 0, "PATCH", "/webhooks/").pop().unwrap();
    let options = menu.body["components"][0]["components"][0]["options"].to_string();
    assert!(options.contains(TINY_MODEL), "{options}");
    let listing = *fake.message_ids(CHANNEL).last().unwrap();
    fake.component(Some(GUILD), CHANNEL, me, listing, "model", &[TINY_MODEL]);
    fake.wait_for(CHANNEL, Duration::from_secs(30), |t| {
        t.iter().any(|t| t.contains(&format!("Now answering with {TINY_MODEL}")))
    })
    .await;
    slash(&fake, CHANNEL, me, "model", json!([{"name": "name", "type": 3, "value": REAL_MODEL}]), "Now answering with")
        .await;

    // Two conversations; /history switches back to the first through its menu.
    slash(&fake, CHANNEL, me, "new", json!([]), "new conversation").await;
    slash_job(&fake, me, "chat", json!([{"name": "prompt", "type": 3, "value": "Name a colour."}]), "").await;
    settle(&fake, Duration::from_secs(2)).await;
    slash(&fake, CHANNEL, me, "history", json!([]), "pick one").await;
    let menu = calls_to(&fake, 0, "PATCH", "/webhooks/").pop().unwrap();
    let options = menu.body["components"][0]["components"][0]["options"].as_array().unwrap().clone();
    assert_eq!(options.len(), 2, "{options:?}");
    let france = options.iter().find(|o| o["label"].as_str().unwrap().contains("capital of France")).unwrap();
    let listing = *fake.message_ids(CHANNEL).last().unwrap();
    // Another user choosing it cannot switch to it.
    fake.component(Some(GUILD), CHANNEL, 77, listing, "conv", &[france["value"].as_str().unwrap()]);
    fake.wait_for(CHANNEL, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("not yours"))).await;
    fake.component(Some(GUILD), CHANNEL, me, listing, "conv", &[france["value"].as_str().unwrap()]);
    fake.wait_for(CHANNEL, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("Continuing"))).await;

    // /export attaches the current (first) conversation as Markdown.
    fake.slash(Some(GUILD), CHANNEL, me, "export", json!([]));
    wait_until(|| !fake.files(CHANNEL).is_empty()).await;
    let (name, markdown, caption) = fake.files(CHANNEL).remove(0);
    let markdown = String::from_utf8(markdown).unwrap();
    assert!(name.ends_with(".md"), "{name}");
    assert!(caption.contains("2 messages"), "{caption}");
    assert!(markdown.contains("What is the capital of France?") && markdown.contains("Paris"), "{markdown}");
    assert!(!markdown.contains("colour"), "{markdown}");

    // /ner finds the entities of a text.
    let found = slash_job(
        &fake,
        me,
        "ner",
        json!([{"name": "text", "type": 3, "value": "My name is John Smith and my email is john.smith@example.com."}]),
        "Found",
    )
    .await;
    assert!(found.last().unwrap().contains("john.smith@example.com"), "{found:?}");
    slash(&fake, CHANNEL, me, "stats", json!([]), "for the bot's admins").await;
    settle(&fake, Duration::from_secs(1)).await;
    bot.stop().await;

    let store = Store::open(&path).await.unwrap();
    let settings = store.user_settings(&UserId::new("discord", me)).await.unwrap();
    assert_eq!(settings.model.as_deref(), Some(REAL_MODEL));
    assert_eq!((settings.temperature, settings.voice_transcript_only), (Some(0.3), true));
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
async fn rate_limits_are_honoured_and_stop_cancels_a_running_answer() {
    let stack = Stack::start_with_batch(&[REAL_MODEL], 1).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bot = Bot::start(&stack, &fake, &dir.path().join("bot.redb")).await;
    let me = 61;

    // Discord answers the first edit with 429: the edit waits retry_after and the answer still arrives whole.
    fake.rate_limit_next("PATCH", "/channels/", 1.5);
    fake.mention(GUILD, CHANNEL, me, "What is the capital of France? Answer in one sentence.");
    fake.wait_for(CHANNEL, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Paris"))).await;
    settle(&fake, Duration::from_secs(3)).await;
    let patches = calls_to(&fake, 0, "PATCH", "/channels/");
    let limited = patches.iter().position(|c| c.status == 429).expect("the edit was rate limited");
    let passed = patches[limited..].iter().find(|c| c.status == 200).expect("an edit went through after it");
    let waited = passed.at - patches[limited].at;
    assert!(waited >= Duration::from_millis(1500), "an edit went through {waited:?} after a 429 of 1.5 s");
    assert!(patches.iter().filter(|c| c.status == 429).count() <= 2, "the bot kept calling while limited");

    // A long answer; a second request meanwhile is told to wait; another user is queued; /stop stops it.
    // A new conversation: after the question above SmolLM2 writes only a short program, which
    // can end before the other user's request arrives.
    slash(&fake, CHANNEL, me, "new", json!([]), "new conversation").await;
    ask_for_a_long_answer(&fake, me).await;
    let before = fake.channel_texts(CHANNEL).len();
    fake.wait_for(CHANNEL, Duration::from_secs(60), |t| t.len() > before && t.last().unwrap().len() > 40).await;
    slash(
        &fake,
        CHANNEL,
        me,
        "chat",
        json!([{"name": "prompt", "type": 3, "value": "And another thing"}]),
        "still working",
    )
    .await;
    let other = 62;
    fake.dm(21, other, json!({"content": "What is the capital of France? Answer in one sentence."}));
    fake.wait_for(21, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("Queued: position 1"))).await;
    slash(&fake, CHANNEL, me, "stop", json!([]), "Stopping").await;
    fake.wait_for(CHANNEL, Duration::from_secs(30), |t| t.iter().any(|t| t.ends_with("(stopped)"))).await;
    let stopped = fake.channel_texts(CHANNEL).into_iter().find(|t| t.ends_with("(stopped)")).unwrap();
    assert!(stopped.len() < 1900, "it stopped early, not at the end: {} chars", stopped.len());
    // The queued question is answered in the message that showed the notice.
    fake.wait_for(21, Duration::from_secs(120), |t| t.len() == 1 && t[0].contains("Paris")).await;
    bot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_direct_messages_and_the_quota_are_enforced() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (admin, member, outsider, listed) = (900, 81, 83, 82);
    let role = 555;
    let bot = Bot::start_with(&stack, &fake, &dir.path().join("bot.redb"), |config| {
        config.access = Access {
            users: vec![listed],
            roles: vec![role],
            channels: vec![CHANNEL],
            admins: vec![admin],
            direct_messages: false,
        };
        config.daily_quota = Some(1);
    })
    .await;

    // A member with the role is answered; someone with neither role nor listing is not.
    fake.guild_message(GUILD, CHANNEL, member, &[role], json!({"content": format!("<@{BOT_ID}> What is the capital of France? Answer in one sentence."), "mentions": [fake_discord::bot_user()]}));
    fake.wait_for(CHANNEL, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Paris"))).await;
    // Until the answer is complete.
    settle(&fake, Duration::from_secs(3)).await;
    fake.mention(GUILD, CHANNEL, outsider, "Hello?");
    fake.wait_for(CHANNEL, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("this bot is private"))).await;
    // Another channel, and direct messages, are off.
    fake.mention(GUILD, 11, listed, "Hello?");
    fake.wait_for(11, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("this channel"))).await;
    fake.dm(22, listed, json!({"content": "Hello?"}));
    fake.wait_for(22, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("direct messages"))).await;
    // The quota of one stops the member's second request; the admin is exempt and sees /stats.
    fake.guild_message(
        GUILD,
        CHANNEL,
        member,
        &[role],
        json!({"content": format!("<@{BOT_ID}> Hello?"), "mentions": [fake_discord::bot_user()]}),
    );
    fake.wait_for(CHANNEL, Duration::from_secs(30), |t| t.iter().any(|t| t.contains("requests for today"))).await;
    fake.dm(23, admin, json!({"content": "What is the capital of Italy? Answer in one sentence."}));
    fake.wait_for(23, Duration::from_secs(120), |t| t.iter().any(|t| t.contains("Rome"))).await;
    let stats = slash(&fake, CHANNEL, admin, "stats", json!([]), "Users:").await;
    let stats = stats.last().unwrap();
    assert!(stats.contains("Requests today: 2"), "{stats}");
    assert!(stats.contains(REAL_MODEL), "{stats}");
    bot.stop().await;
}

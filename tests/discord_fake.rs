//! The fake Discord against the real serenity client, without the bot: every
//! event the fake sends must deserialize in serenity, every call serenity
//! makes must be answered like Discord answers it.

#[path = "common/discord.rs"]
mod fake_discord;

use fake_discord::{FakeDiscord, APP_ID, BOT_ID};
use serde_json::json;
use serenity::all::{
    ChannelId, ClientBuilder, Command, CommandDataOptionValue, CommandInteraction, CommandOptionType,
    ComponentInteraction, ComponentInteractionDataKind, Context, CreateActionRow, CreateAttachment, CreateButton,
    CreateCommand, CreateCommandOption, CreateInteractionResponse, CreateInteractionResponseFollowup,
    CreateInteractionResponseMessage, CreateMessage, EditInteractionResponse, EditMessage, EventHandler,
    GatewayIntents, GuildId, Http, HttpBuilder, Interaction, Message, MessageFlags, MessageId, MessageType, Ready,
    ShardManager, UserId,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

const GUILD: u64 = 1;
const CHANNEL: u64 = 10;
const DM_CHANNEL: u64 = 20;
const USER: u64 = 42;

enum Seen {
    Ready(Ready),
    Message(Message),
    Interaction(Interaction),
}

struct Handler(UnboundedSender<Seen>);

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _: Context, ready: Ready) {
        let _ = self.0.send(Seen::Ready(ready));
    }

    async fn message(&self, _: Context, message: Message) {
        let _ = self.0.send(Seen::Message(message));
    }

    async fn interaction_create(&self, _: Context, interaction: Interaction) {
        let _ = self.0.send(Seen::Interaction(interaction));
    }
}

/// A serenity client on the fake; serenity sends REST calls to the proxy only
/// with its rate limiter off.
async fn start(fake: &FakeDiscord, intents: GatewayIntents) -> (Arc<Http>, Arc<ShardManager>, UnboundedReceiver<Seen>) {
    let (tx, rx) = unbounded_channel();
    let http = HttpBuilder::new("fake-token").proxy(fake.url.clone()).ratelimiter_disabled(true).build();
    let mut client = ClientBuilder::new_with_http(http, intents).event_handler(Handler(tx)).await.unwrap();
    let (http, shards) = (client.http.clone(), client.shard_manager.clone());
    tokio::spawn(async move { client.start().await.unwrap() });
    (http, shards, rx)
}

/// The next event `pick` takes, skipping the others.
async fn next<T>(rx: &mut UnboundedReceiver<Seen>, pick: impl Fn(Seen) -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(found) = pick(rx.recv().await.expect("the client stopped")) {
                return found;
            }
        }
    })
    .await
    .expect("no such event within 10 s")
}

async fn message_from(rx: &mut UnboundedReceiver<Seen>, author: u64) -> Message {
    next(rx, |seen| match seen {
        Seen::Message(m) if m.author.id == author => Some(m),
        _ => None,
    })
    .await
}

async fn command(rx: &mut UnboundedReceiver<Seen>) -> CommandInteraction {
    next(rx, |seen| match seen {
        Seen::Interaction(Interaction::Command(c)) => Some(c),
        _ => None,
    })
    .await
}

async fn component(rx: &mut UnboundedReceiver<Seen>) -> ComponentInteraction {
    next(rx, |seen| match seen {
        Seen::Interaction(Interaction::Component(c)) => Some(c),
        _ => None,
    })
    .await
}

/// The HTTP status and Discord error code of a failed call.
fn refusal<T: std::fmt::Debug>(result: serenity::Result<T>) -> (u16, isize) {
    match result {
        Err(serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(e))) => {
            (e.status_code.as_u16(), e.error.code)
        }
        other => panic!("expected Discord to refuse, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serenity_talks_to_the_fake() {
    let fake = FakeDiscord::start().await;
    let intents = GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES | GatewayIntents::MESSAGE_CONTENT;

    // Pushed before the bot connects: delivered after READY.
    let early = fake.guild_message(GUILD, CHANNEL, USER, &[7, 8], json!({"content": "queued before connect"}));
    let (http, shards, mut rx) = start(&fake, intents).await;
    let ready = next(&mut rx, |s| if let Seen::Ready(r) = s { Some(r) } else { None }).await;
    assert_eq!(ready.user.id.get(), BOT_ID);
    assert!(ready.user.bot);
    assert_eq!(ready.application.id.get(), APP_ID);
    assert!(fake.identified());
    let identify = fake.identify().unwrap();
    assert_eq!(identify["intents"], json!(intents.bits()));
    assert!(identify["token"].as_str().unwrap().contains("fake-token"), "{identify}");

    let m = message_from(&mut rx, USER).await;
    assert_eq!((m.id.get(), m.content.as_str()), (early, "queued before connect"));
    assert_eq!(m.guild_id, Some(GuildId::new(GUILD)));
    let roles: Vec<u64> = m.member.as_ref().unwrap().roles.iter().map(|r| r.get()).collect();
    assert_eq!(roles, [7, 8]);

    // A mention: content, mentions, the member's roles kept.
    fake.mention(GUILD, CHANNEL, USER, "hello");
    let m = message_from(&mut rx, USER).await;
    assert_eq!(m.content, format!("<@{BOT_ID}> hello"));
    assert_eq!(m.mentions.iter().map(|u| u.id.get()).collect::<Vec<_>>(), [BOT_ID]);
    assert_eq!(m.member.unwrap().roles.len(), 2);

    // REST basics.
    assert_eq!(http.get_current_user().await.unwrap().id.get(), BOT_ID);
    assert_eq!(http.get_current_application_info().await.unwrap().id.get(), APP_ID);
    let said = ChannelId::new(CHANNEL).say(&http, "hi there").await.unwrap();
    assert_eq!(said.author.id.get(), BOT_ID);
    assert_eq!(fake.channel_texts(CHANNEL), ["hi there"]);
    // Discord echoes the bot's own messages over the gateway.
    assert_eq!(message_from(&mut rx, BOT_ID).await.id, said.id);

    // A user's reply to the bot: referenced message, and the ping on reply.
    let reply = fake.reply(GUILD, CHANNEL, USER, said.id.get(), "and then?");
    let m = message_from(&mut rx, USER).await;
    assert_eq!(m.id.get(), reply);
    assert_eq!(m.kind, MessageType::InlineReply);
    assert_eq!(m.referenced_message.as_ref().unwrap().id, said.id);
    assert_eq!(m.message_reference.as_ref().unwrap().message_id, Some(said.id));
    assert!(m.mentions.iter().any(|u| u.id.get() == BOT_ID));

    // The bot replies; a reply to a message that is gone is refused.
    let answer =
        CreateMessage::new().content("then this").reference_message((ChannelId::new(CHANNEL), MessageId::new(reply)));
    let answer = ChannelId::new(CHANNEL).send_message(&http, answer).await.unwrap();
    assert_eq!(answer.referenced_message.unwrap().id.get(), reply);
    let answer_id = answer.id.get();
    let gone = CreateMessage::new().content("x").reference_message((ChannelId::new(CHANNEL), MessageId::new(12345)));
    assert_eq!(refusal(ChannelId::new(CHANNEL).send_message(&http, gone).await), (400, 50035));

    // A voice message: the attachment downloads, with duration and waveform.
    let mut ogg = b"OggS\0\0".to_vec();
    ogg.extend(96_000u64.to_le_bytes());
    ogg.extend([0; 13]);
    let voice = fake.attachment("voice-message.ogg", "audio/ogg", ogg.clone());
    fake.guild_message(GUILD, CHANNEL, USER, &[7, 8], json!({"content": "", "attachments": [voice], "flags": 8192}));
    let m = message_from(&mut rx, USER).await;
    assert!(m.flags.unwrap().contains(MessageFlags::IS_VOICE_MESSAGE));
    let attachment = &m.attachments[0];
    assert_eq!(attachment.duration_secs, Some(2.0));
    assert!(attachment.waveform.is_some());
    assert_eq!(attachment.content_type.as_deref(), Some("audio/ogg"));
    assert_eq!(reqwest::get(&attachment.url).await.unwrap().bytes().await.unwrap(), ogg);

    // A DM: no guild, no member; the bot finds the DM channel by user.
    fake.dm(DM_CHANNEL, USER, json!({"content": "psst"}));
    let m = message_from(&mut rx, USER).await;
    assert_eq!((m.content.as_str(), m.guild_id, m.member.is_none()), ("psst", None, true));
    assert_eq!(UserId::new(USER).create_dm_channel(&http).await.unwrap().id.get(), DM_CHANNEL);

    // A file upload.
    let upload = CreateMessage::new().content("here").add_file(CreateAttachment::bytes(b"abc".to_vec(), "notes.txt"));
    let sent = ChannelId::new(CHANNEL).send_message(&http, upload).await.unwrap();
    assert_eq!(sent.attachments[0].filename, "notes.txt");
    assert_eq!(fake.files(CHANNEL), [("notes.txt".to_string(), b"abc".to_vec(), "here".to_string())]);
    assert_eq!(reqwest::get(&sent.attachments[0].url).await.unwrap().bytes().await.unwrap(), &b"abc"[..]);

    // An injected 429 reaches serenity as an error (its rate limiter is off);
    // the edit goes through once retried after retry_after.
    fake.rate_limit_next("PATCH", "/channels/", 0.3);
    let edit = || ChannelId::new(CHANNEL).edit_message(&http, said.id, EditMessage::new().content("hi there (edited)"));
    assert_eq!(refusal(edit().await).0, 429);
    let limited = fake.calls().into_iter().rev().find(|c| c.method == "PATCH").unwrap();
    assert_eq!((limited.status, limited.path.clone()), (429, format!("/channels/{CHANNEL}/messages/{}", said.id)));
    tokio::time::sleep(Duration::from_secs_f64(0.3)).await;
    assert_eq!(edit().await.unwrap().content, "hi there (edited)");
    let retried = fake.calls().into_iter().rev().find(|c| c.method == "PATCH").unwrap();
    assert!(retried.status == 200 && retried.at - limited.at >= Duration::from_secs_f64(0.3));
    assert_eq!(ChannelId::new(CHANNEL).message(&http, said.id).await.unwrap().content, "hi there (edited)");

    ChannelId::new(CHANNEL).broadcast_typing(&http).await.unwrap();
    let typing = fake.calls().into_iter().rev().find(|c| c.path.ends_with("/typing")).unwrap();
    assert_eq!((typing.method.as_str(), typing.status), ("POST", 204));

    // What Discord refuses: too long, empty, a user id as a channel, an unknown route.
    let long = json!({"content": "x".repeat(2001)});
    assert_eq!(refusal(http.send_message(ChannelId::new(CHANNEL), vec![], &long).await), (400, 50035));
    assert_eq!(
        refusal(http.send_message(ChannelId::new(CHANNEL), vec![], &json!({"content": ""})).await),
        (400, 50006)
    );
    assert_eq!(refusal(ChannelId::new(USER).say(&http, "hi").await), (404, 10003));
    assert_eq!(refusal(http.get_guild(GuildId::new(GUILD)).await).0, 404);
    assert!(fake.calls().iter().any(|c| c.path == format!("/guilds/{GUILD}") && c.status == 404));

    ChannelId::new(CHANNEL).delete_message(&http, said.id).await.unwrap();
    assert_eq!(fake.channel_texts(CHANNEL), ["then this", "here"]);
    assert_eq!(fake.message_ids(CHANNEL), [answer_id, sent.id.get()]);

    // Commands: registered with ids; an invalid one refused.
    let ask = CreateCommand::new("ask")
        .description("Ask natter")
        .add_option(CreateCommandOption::new(CommandOptionType::String, "prompt", "What to ask").required(true));
    let registered = Command::set_global_commands(&http, vec![ask]).await.unwrap();
    assert_eq!(fake.commands()[0]["name"], "ask");
    assert_eq!(fake.commands()[0]["id"], registered[0].id.to_string());
    assert_eq!(refusal(Command::set_global_commands(&http, vec![CreateCommand::new("Ask")]).await), (400, 50035));

    // A slash command in a guild: defer, edit, follow up.
    let id = fake.slash(Some(GUILD), CHANNEL, USER, "ask", json!([{"name": "prompt", "type": 3, "value": "hi"}]));
    let c = command(&mut rx).await;
    assert_eq!((c.id.get(), c.data.name.as_str(), c.data.id), (id, "ask", registered[0].id));
    assert_eq!(c.data.options[0].value, CommandDataOptionValue::String("hi".into()));
    assert_eq!((c.user.id.get(), c.guild_id), (USER, Some(GuildId::new(GUILD))));
    assert_eq!(c.member.as_ref().unwrap().roles.len(), 2);
    assert_eq!(c.token, format!("token-{id}"));
    c.create_response(&http, CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new())).await.unwrap();
    assert_eq!(fake.channel_texts(CHANNEL).last().unwrap(), "");
    assert_eq!(fake.bot_messages(CHANNEL).last().unwrap()["flags"], 128);
    c.edit_response(&http, EditInteractionResponse::new().content("the answer")).await.unwrap();
    let more = c.create_followup(&http, CreateInteractionResponseFollowup::new().content("more")).await.unwrap();
    assert_eq!(more.webhook_id.map(|w| w.get()), Some(APP_ID));
    fake.wait_for(CHANNEL, Duration::from_secs(1), |t| t.ends_with(&["the answer".into(), "more".into()])).await;
    assert_eq!(c.get_response(&http).await.unwrap().content, "the answer");
    let again = c.create_response(&http, CreateInteractionResponse::Acknowledge).await;
    assert_eq!(refusal(again), (400, 40060));
    let types: Vec<u64> = fake.interaction_callbacks(id).iter().map(|c| c.0).collect();
    assert_eq!(types, [5, 6]);
    let follow_up = fake.calls().into_iter().find(|c| c.method == "POST" && c.path.starts_with("/webhooks/")).unwrap();
    assert_eq!(follow_up.path, format!("/webhooks/{APP_ID}/token-{id}"));

    // A slash command in a DM, answered at once.
    fake.slash(None, DM_CHANNEL, USER, "ask", json!([]));
    let c = command(&mut rx).await;
    assert_eq!((c.guild_id, c.member.is_none(), c.user.id.get()), (None, true, USER));
    let reply = CreateInteractionResponseMessage::new().content("dm answer");
    c.create_response(&http, CreateInteractionResponse::Message(reply)).await.unwrap();
    assert_eq!(fake.channel_texts(DM_CHANNEL), ["dm answer"]);

    // Components: a button acknowledged, a select that edits the message.
    let buttons = CreateActionRow::Buttons(vec![CreateButton::new("again").label("Again")]);
    let menu = CreateMessage::new().content("pick one").components(vec![buttons]);
    let menu = ChannelId::new(CHANNEL).send_message(&http, menu).await.unwrap();
    assert_eq!(fake.bot_messages(CHANNEL).last().unwrap()["components"][0]["components"][0]["custom_id"], "again");
    let id = fake.component(Some(GUILD), CHANNEL, USER, menu.id.get(), "again", &[]);
    let c = component(&mut rx).await;
    assert_eq!((c.data.custom_id.as_str(), c.message.id), ("again", menu.id));
    assert!(matches!(c.data.kind, ComponentInteractionDataKind::Button), "{:?}", c.data.kind);
    c.create_response(&http, CreateInteractionResponse::Acknowledge).await.unwrap();
    assert_eq!(fake.interaction_callbacks(id)[0].0, 6);
    fake.component(Some(GUILD), CHANNEL, USER, menu.id.get(), "pick", &["a", "b"]);
    let c = component(&mut rx).await;
    let ComponentInteractionDataKind::StringSelect { values } = &c.data.kind else { panic!("{:?}", c.data.kind) };
    assert_eq!(values, &["a", "b"]);
    let update = CreateInteractionResponseMessage::new().content("picked a, b");
    c.create_response(&http, CreateInteractionResponse::UpdateMessage(update)).await.unwrap();
    assert_eq!(fake.channel_texts(CHANNEL).last().unwrap(), "picked a, b");

    // An interaction answered after its three seconds is unknown.
    fake.slash(Some(GUILD), CHANNEL, USER, "ask", json!([]));
    let c = command(&mut rx).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let late = c.create_response(&http, CreateInteractionResponse::Acknowledge).await;
    assert_eq!(refusal(late), (404, 10062));

    // Heartbeats every second, all ACKed.
    let started = Instant::now();
    while fake.heartbeats() < 2 {
        assert!(started.elapsed() < Duration::from_secs(5), "no heartbeats");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A restart: what comes while the bot is away waits for the new
    // session, after READY; without MESSAGE_CONTENT, only what mentions
    // the bot has content.
    shards.shutdown_all().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.guild_message(GUILD, CHANNEL, USER, &[], json!({"content": "secret"}));
    fake.mention(GUILD, CHANNEL, USER, "still there?");
    let (_http, shards, mut rx) = start(&fake, GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES).await;
    next(&mut rx, |s| if let Seen::Ready(r) = s { Some(r) } else { None }).await;
    // serenity runs each event's handler in a task of its own: the order may change.
    let (first, second) = (message_from(&mut rx, USER).await, message_from(&mut rx, USER).await);
    let mut contents = [(first.id, first.content), (second.id, second.content)];
    contents.sort();
    assert_eq!([&contents[0].1, &contents[1].1], ["", &format!("<@{BOT_ID}> still there?")]);
    shards.shutdown_all().await;
}

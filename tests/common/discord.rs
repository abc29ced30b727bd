//! A fake Discord on loopback that the real serenity client talks to: the REST
//! API under `/api/v10` (messages with replies and file uploads, typing,
//! command registration, interaction responses and follow-ups, DM channels),
//! the gateway websocket (Hello, Identify and READY, heartbeats, dispatches)
//! and attachment downloads. Tests push what users do (guild messages,
//! mentions, replies, DMs, voice messages, slash commands, button and select
//! presses) and read back every call with its time and the bot's messages as
//! they stand.
//!
//! It answers like Discord where a bot could get it wrong: content over 2000
//! characters, empty messages, unknown channels or messages, an interaction
//! answered twice or after its three seconds, a follow-up before the answer,
//! invalid command definitions, injected 429s. It applies the bot's gateway
//! intents as Discord does (no guild messages without `GUILD_MESSAGES`, no
//! content without `MESSAGE_CONTENT` unless the bot is mentioned), and it
//! echoes the bot's own messages back over the gateway, as Discord does.
//!
//! serenity only sends REST calls to `HttpBuilder::proxy` with its rate
//! limiter disabled (`ratelimiter_disabled(true)`): the limiter builds every
//! request without the proxy, for `https://discord.com`. So through this fake
//! an injected 429 reaches the bot as an error, and the bot has to wait it
//! out; calls on the same route before `retry_after` is over get 429 again.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::header::{HeaderName, CONTENT_TYPE, RETRY_AFTER};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

pub const BOT_ID: u64 = 9000;
pub const APP_ID: u64 = 9001;
/// The application's owner, as `/oauth2/applications/@me` reports it.
const OWNER_ID: u64 = 9002;

/// Short, so that every test heartbeats (Discord asks for about 41 s).
const HEARTBEAT_MS: u64 = 1000;
/// Discord's epoch for snowflakes (2015-01-01), in Unix milliseconds.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;
/// How long Discord waits for the first answer to an interaction.
const INTERACTION_DEADLINE: Duration = Duration::from_secs(3);
const MESSAGE_LIMIT: usize = 2000;
/// An ordinary member's permissions, and the bot's: view channel, send
/// messages, embed links, attach files, read history, use application commands.
const PERMISSIONS: &str = "2147601408";
/// Discord's waveform of a voice message: base64 of up to 256 amplitudes.
const WAVEFORM: &str = "AAAAAAAAAAAAAAAAAAAAAA==";

const GUILD_MESSAGES: u64 = 1 << 9;
const DIRECT_MESSAGES: u64 = 1 << 12;
const MESSAGE_CONTENT: u64 = 1 << 15;

const EPHEMERAL: u64 = 1 << 6;
/// The flag of a deferred answer's "thinking…" placeholder.
const LOADING: u64 = 1 << 7;

/// One REST call as the server saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// `GET`, `POST`, `PATCH`, `PUT` or `DELETE`.
    pub method: String,
    /// The path after `/api/v10`, without the query: `/channels/5/messages/77`.
    pub path: String,
    /// The JSON body, or a multipart call's `payload_json`; `Null` when none.
    pub body: Value,
    /// The status the fake answered with (429 for an injected rate limit).
    pub status: u16,
    pub at: Instant,
}

/// A status and a JSON body (`Null` for none), as a route answers.
type Reply = (StatusCode, Value);

/// A file in a multipart call.
struct Upload {
    filename: String,
    content_type: String,
    data: Vec<u8>,
}

/// An interaction as the fake tracks it until the bot has answered.
struct Interaction {
    channel: u64,
    token: String,
    /// The fields Discord sets on the messages it creates for the
    /// interaction: `interaction_metadata`, `webhook_id`, `type`...
    stamp: Value,
    /// The message a pressed component is on.
    message: Option<u64>,
    /// The message `@original` stands for, once there is one.
    original: Option<u64>,
    /// When the gateway delivered it: the three seconds run from there.
    delivered: Option<Instant>,
    acknowledged: bool,
}

#[derive(Default)]
struct Inner {
    /// The last snowflake handed out.
    last_id: u64,
    calls: Vec<Call>,
    /// Every message by id, users' and the bot's, as the REST API returns it;
    /// deleted ones are gone.
    messages: BTreeMap<u64, Value>,
    /// Channels users wrote in -> their guild, None for DMs. The bot can only
    /// post in these: a bot that writes to a user id gets "Unknown Channel".
    channels: BTreeMap<u64, Option<u64>>,
    /// User -> their DM channel with the bot.
    dms: BTreeMap<u64, u64>,
    /// (guild, user) -> the member's roles, as the last `guild_message` set them.
    roles: BTreeMap<(u64, u64), Vec<u64>>,
    /// Dispatches (event name, data) not yet delivered to an identified session.
    pending: VecDeque<(String, Value)>,
    interactions: BTreeMap<u64, Interaction>,
    /// Every interaction callback: (interaction, type, time).
    callbacks: Vec<(u64, u64, Instant)>,
    /// Attachment id -> (content type, bytes), for downloads.
    downloads: BTreeMap<u64, (String, Vec<u8>)>,
    /// Files the bot uploaded: (channel, file name, bytes, message content).
    uploads: Vec<(u64, String, Vec<u8>, String)>,
    /// The global commands, as registered.
    commands: Vec<Value>,
    /// Injected rate limits: (method, path prefix, seconds).
    rate_limits: VecDeque<(String, String, f64)>,
    /// Rate limits in force: (method, path prefix, until). Like Discord, a
    /// call made before the limit is over is refused again.
    limited_until: Vec<(String, String, Instant)>,
    /// The number of the newest identified gateway session, which gets the
    /// dispatches; 0 before any.
    session: u64,
    /// Its Identify payload (token, intents, properties).
    identify: Option<Value>,
    heartbeats: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    news: Notify,
    /// `http://127.0.0.1:PORT`, for the URLs the fake hands out.
    base: String,
}

pub struct FakeDiscord {
    /// `http://127.0.0.1:PORT`, for serenity's `HttpBuilder::proxy`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDiscord {
    pub async fn start() -> FakeDiscord {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared { inner: Mutex::default(), news: Notify::new(), base: url.clone() });
        let app = Router::new()
            .route("/gateway", get(gateway))
            .route("/attachments/{id}/{filename}", get(download))
            .fallback(api)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeDiscord { url, shared, task }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    /// A user posts in a guild channel with these member `roles` (which stay
    /// the member's for later events); `fields` are merged into the
    /// MESSAGE_CREATE payload ("content", "attachments", "flags",
    /// "message_reference"...). "mentions" defaults to the users the content
    /// mentions (`<@id>`), as Discord fills it. Returns the message id.
    pub fn guild_message(&self, guild: u64, channel: u64, user: u64, roles: &[u64], fields: Value) -> u64 {
        self.lock().roles.insert((guild, user), roles.to_vec());
        self.user_message(Some(guild), channel, user, fields)
    }

    /// A user writes in their DM channel with the bot: no guild_id, no member.
    pub fn dm(&self, channel: u64, user: u64, fields: Value) -> u64 {
        self.lock().dms.insert(user, channel);
        self.user_message(None, channel, user, fields)
    }

    /// `user` writes "<@9000> text" in a guild channel.
    pub fn mention(&self, guild: u64, channel: u64, user: u64, text: &str) -> u64 {
        self.user_message(Some(guild), channel, user, json!({ "content": format!("<@{BOT_ID}> {text}") }))
    }

    /// `user` replies to the message `to` (the bot's, usually) with `text`.
    /// As the Discord client does by default, the reply pings the author of
    /// `to`: a reply to the bot mentions the bot.
    pub fn reply(&self, guild: u64, channel: u64, user: u64, to: u64, text: &str) -> u64 {
        let referenced = self.lock().messages.get(&to).cloned();
        let referenced = referenced.unwrap_or_else(|| panic!("no message {to} to reply to"));
        let mut mentions = mentioned(text);
        if !mentions.iter().any(|m| m["id"] == referenced["author"]["id"]) {
            mentions.push(referenced["author"].clone());
        }
        let fields = json!({
            "content": text,
            "type": 19,
            "mentions": mentions,
            "message_reference": {
                "type": 0, "message_id": to.to_string(), "channel_id": channel.to_string(), "guild_id": guild.to_string()
            },
            "referenced_message": referenced,
        });
        self.user_message(Some(guild), channel, user, fields)
    }

    fn user_message(&self, guild: Option<u64>, channel: u64, user: u64, fields: Value) -> u64 {
        let mut inner = self.lock();
        inner.channels.insert(channel, guild);
        let mut message = inner.blank(channel, user);
        if let Some(content) = fields["content"].as_str().filter(|_| fields.get("mentions").is_none()) {
            message["mentions"] = Value::Array(mentioned(content));
        }
        merge(&mut message, &fields);
        let id = id_of(&message["id"]);
        inner.messages.insert(id, message.clone());
        let event = inner.gateway_form(&message, user);
        inner.pending.push_back(("MESSAGE_CREATE".into(), event));
        drop(inner);
        self.shared.news.notify_waiters();
        id
    }

    /// Makes `data` downloadable from the fake and returns the attachment
    /// object for a message's "attachments". One named `voice-message.ogg`
    /// (Discord's name for voice messages; send it with "flags": 8192) also
    /// gets `duration_secs`, read from its last Ogg page, and a `waveform`.
    pub fn attachment(&self, filename: &str, content_type: &str, data: Vec<u8>) -> Value {
        let mut inner = self.lock();
        let id = inner.next_id();
        let mut attachment = attachment_json(&self.shared.base, id, filename, content_type, data.len());
        if filename == "voice-message.ogg" {
            attachment["duration_secs"] = json!(ogg_duration(&data));
            attachment["waveform"] = json!(WAVEFORM);
        }
        inner.downloads.insert(id, (content_type.to_string(), data));
        attachment
    }

    /// `user` runs the slash command `name` in `channel` (a guild's when
    /// `guild` is Some, then as a member with their roles; else a DM);
    /// `options` is Discord's options array, e.g.
    /// `[{"name": "prompt", "type": 3, "value": "hi"}]`. Returns the
    /// interaction id; its token is `token-{id}`.
    pub fn slash(&self, guild: Option<u64>, channel: u64, user: u64, name: &str, options: Value) -> u64 {
        let mut inner = self.lock();
        let registered = inner.commands.iter().find(|c| c["name"] == name).map(|c| c["id"].clone());
        let command = registered.unwrap_or_else(|| json!(inner.next_id().to_string()));
        let data = json!({"id": command, "name": name, "type": 1, "options": options});
        let id = inner.interaction(guild, channel, user, 2, data, None);
        drop(inner);
        self.shared.news.notify_waiters();
        id
    }

    /// `user` presses the button `custom_id` on `message` in `channel`, or
    /// picks `values` in the select menu `custom_id` when there are any.
    /// Returns the interaction id; its token is `token-{id}`.
    pub fn component(
        &self,
        guild: Option<u64>,
        channel: u64,
        user: u64,
        message: u64,
        custom_id: &str,
        values: &[&str],
    ) -> u64 {
        let mut inner = self.lock();
        let pressed = inner.messages.get(&message).filter(|m| id_of(&m["channel_id"]) == channel).cloned();
        let pressed = pressed.unwrap_or_else(|| panic!("no message {message} in channel {channel} to press on"));
        let data = match values {
            [] => json!({"custom_id": custom_id, "component_type": 2}),
            _ => json!({"custom_id": custom_id, "component_type": 3, "values": values}),
        };
        let id = inner.interaction(guild, channel, user, 3, data, Some(pressed));
        drop(inner);
        self.shared.news.notify_waiters();
        id
    }

    /// The next call whose method is `method` and whose path (after
    /// `/api/v10`) starts with `path_prefix` is answered 429 with
    /// `retry_after` `seconds`, as Discord words it; call again for more.
    pub fn rate_limit_next(&self, method: &str, path_prefix: &str, seconds: f64) {
        self.lock().rate_limits.push_back((method.to_string(), path_prefix.to_string(), seconds));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The bot's messages in a channel as they stand (content, embeds,
    /// components, flags, attachments), oldest first; interaction answers and
    /// follow-ups included, deleted ones gone.
    pub fn bot_messages(&self, channel: u64) -> Vec<Value> {
        let inner = self.lock();
        let mine = |m: &&Value| id_of(&m["channel_id"]) == channel && id_of(&m["author"]["id"]) == BOT_ID;
        inner.messages.values().filter(mine).cloned().collect()
    }

    /// The texts of the bot's messages in a channel, oldest first.
    pub fn channel_texts(&self, channel: u64) -> Vec<String> {
        self.bot_messages(channel).iter().map(|m| m["content"].as_str().unwrap_or_default().to_string()).collect()
    }

    /// The ids of the bot's messages in a channel, oldest first.
    pub fn message_ids(&self, channel: u64) -> Vec<u64> {
        self.bot_messages(channel).iter().map(|m| id_of(&m["id"])).collect()
    }

    /// Waits until `check` holds for the channel's texts, or panics after `limit`.
    pub async fn wait_for(&self, channel: u64, limit: Duration, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let texts = self.channel_texts(channel);
            if check(&texts) {
                return texts;
            }
            if Instant::now() >= deadline {
                let calls: Vec<String> = self
                    .calls()
                    .iter()
                    .rev()
                    .take(12)
                    .map(|c| format!("{} {} -> {} {}", c.method, c.path, c.status, c.body))
                    .collect();
                panic!(
                    "channel {channel} never got there; it shows {texts:?}; the last calls, newest first: {calls:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The files the bot uploaded in a channel: (file name, bytes, the
    /// message's content then).
    pub fn files(&self, channel: u64) -> Vec<(String, Vec<u8>, String)> {
        let inner = self.lock();
        inner.uploads.iter().filter(|u| u.0 == channel).map(|u| (u.1.clone(), u.2.clone(), u.3.clone())).collect()
    }

    /// The global commands as registered, with their ids.
    pub fn commands(&self) -> Value {
        Value::Array(self.lock().commands.clone())
    }

    /// The callback types the bot answered interaction `id` with, refused
    /// ones included, and when.
    pub fn interaction_callbacks(&self, id: u64) -> Vec<(u64, Instant)> {
        self.lock().callbacks.iter().filter(|c| c.0 == id).map(|c| (c.1, c.2)).collect()
    }

    /// Whether a gateway session identified.
    pub fn identified(&self) -> bool {
        self.lock().identify.is_some()
    }

    /// The last Identify payload: `token`, `intents`, `properties`...
    pub fn identify(&self) -> Option<Value> {
        self.lock().identify.clone()
    }

    /// How many heartbeats the gateway has ACKed, over all sessions.
    pub fn heartbeats(&self) -> usize {
        self.lock().heartbeats
    }
}

impl Inner {
    /// A fresh snowflake: milliseconds since Discord's epoch in the high bits,
    /// so ids grow with time as Discord's do.
    fn next_id(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        self.last_id = ((now - DISCORD_EPOCH_MS) << 22).max(self.last_id + 1);
        self.last_id
    }

    /// A new, empty message by `author` with every field serenity requires.
    fn blank(&mut self, channel: u64, author: u64) -> Value {
        json!({
            "id": self.next_id().to_string(),
            "channel_id": channel.to_string(),
            "author": user_json(author),
            "content": "",
            "timestamp": timestamp(),
            "edited_timestamp": null,
            "tts": false,
            "mention_everyone": false,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": false,
            "type": 0,
            "flags": 0,
        })
    }

    /// A message as the gateway delivers it: in a guild, with the guild id and
    /// the author's member.
    fn gateway_form(&self, message: &Value, author: u64) -> Value {
        let mut event = message.clone();
        if let Some(guild) = self.channels.get(&id_of(&message["channel_id"])).copied().flatten() {
            event["guild_id"] = json!(guild.to_string());
            event["member"] = self.member(guild, author);
        }
        event
    }

    /// A guild member without the user, as messages carry it.
    fn member(&self, guild: u64, user: u64) -> Value {
        let roles = self.roles.get(&(guild, user)).map_or(&[][..], Vec::as_slice);
        json!({
            "roles": roles.iter().map(u64::to_string).collect::<Vec<_>>(),
            "joined_at": timestamp(),
            "deaf": false, "mute": false, "flags": 0, "pending": false, "nick": null, "premium_since": null,
        })
    }

    /// Stores a message of the bot's and, unless ephemeral, echoes it over the gateway.
    fn store(&mut self, message: Value) -> Value {
        self.messages.insert(id_of(&message["id"]), message.clone());
        if message["flags"].as_u64().unwrap_or(0) & EPHEMERAL == 0 {
            let event = self.gateway_form(&message, BOT_ID);
            self.pending.push_back(("MESSAGE_CREATE".into(), event));
        }
        message
    }

    /// The bot posts `payload` in `channel`; `stamp` holds the fields Discord
    /// adds to an interaction's messages.
    fn post(
        &mut self,
        base: &str,
        channel: u64,
        payload: &Value,
        uploads: Vec<Upload>,
        stamp: &Value,
    ) -> Result<Value, Reply> {
        if !self.channels.contains_key(&channel) {
            return Err(error(StatusCode::NOT_FOUND, 10003, "Unknown Channel"));
        }
        let mut message = self.blank(channel, BOT_ID);
        merge(&mut message, stamp);
        let reference = &payload["message_reference"];
        if !reference.is_null() {
            let target = id_of(&reference["message_id"]);
            match self.messages.get(&target).filter(|m| id_of(&m["channel_id"]) == channel) {
                Some(referenced) => {
                    message["type"] = json!(19);
                    message["referenced_message"] = referenced.clone();
                    message["message_reference"] = json!({
                        "type": 0,
                        "message_id": target.to_string(),
                        "channel_id": channel.to_string(),
                        "guild_id": self.channels[&channel].map(|g| g.to_string()),
                    });
                }
                None if reference["fail_if_not_exists"] == false => {}
                None => return Err(invalid_form(&["message_reference"], "REPLIES_UNKNOWN_MESSAGE", "Unknown message")),
            }
        }
        self.apply(base, channel, &mut message, payload, uploads)?;
        Ok(self.store(message))
    }

    /// Applies what the bot sent (content, embeds, components, flags,
    /// attachments kept and new files) to `message`, refusing what Discord
    /// refuses. Nothing is stored when it fails.
    fn apply(
        &mut self,
        base: &str,
        channel: u64,
        message: &mut Value,
        payload: &Value,
        uploads: Vec<Upload>,
    ) -> Result<(), Reply> {
        for key in ["content", "embeds", "components"] {
            if let Some(value) = payload.get(key).filter(|v| !v.is_null()) {
                message[key] = value.clone();
            }
        }
        let current = message["flags"].as_u64().unwrap_or(0);
        let flags = payload["flags"].as_u64().map_or(current, |f| f | (current & EPHEMERAL)) & !LOADING;
        let existing = message["attachments"].as_array().cloned().unwrap_or_default();
        // Discord keeps the old attachments a payload lists by id; listed
        // entries with a file name are the new files.
        let mut attachments: Vec<Value> = match payload["attachments"].as_array() {
            Some(listed) => existing
                .into_iter()
                .filter(|a| listed.iter().any(|l| l.get("filename").is_none() && id_of(&l["id"]) == id_of(&a["id"])))
                .collect(),
            None => existing,
        };
        let content = message["content"].as_str().unwrap_or_default().to_string();
        if content.chars().count() > MESSAGE_LIMIT {
            return Err(invalid_form(&["content"], "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length."));
        }
        let empty = |key: &str| message[key].as_array().is_none_or(Vec::is_empty);
        if content.is_empty()
            && empty("embeds")
            && empty("components")
            && attachments.is_empty()
            && uploads.is_empty()
            && payload["sticker_ids"].as_array().is_none_or(Vec::is_empty)
            && payload["poll"].is_null()
        {
            return Err(error(StatusCode::BAD_REQUEST, 50006, "Cannot send an empty message"));
        }
        for upload in uploads {
            let id = self.next_id();
            attachments.push(attachment_json(base, id, &upload.filename, &upload.content_type, upload.data.len()));
            self.downloads.insert(id, (upload.content_type, upload.data.clone()));
            self.uploads.push((channel, upload.filename, upload.data, content.clone()));
        }
        message["attachments"] = Value::Array(attachments);
        message["flags"] = json!(flags);
        Ok(())
    }

    /// A message in `channel`, or Discord's "Unknown Message".
    fn message(&self, channel: u64, id: u64) -> Result<&Value, Reply> {
        let found = self.messages.get(&id).filter(|m| id_of(&m["channel_id"]) == channel);
        found.ok_or_else(|| error(StatusCode::NOT_FOUND, 10008, "Unknown Message"))
    }

    fn edit(
        &mut self,
        base: &str,
        channel: u64,
        id: u64,
        payload: &Value,
        uploads: Vec<Upload>,
    ) -> Result<Value, Reply> {
        let mut message = self.message(channel, id)?.clone();
        if id_of(&message["author"]["id"]) != BOT_ID {
            return Err(error(StatusCode::FORBIDDEN, 50005, "Cannot edit a message authored by another user"));
        }
        self.apply(base, channel, &mut message, payload, uploads)?;
        message["edited_timestamp"] = json!(timestamp());
        self.messages.insert(id, message.clone());
        Ok(message)
    }

    fn delete(&mut self, channel: u64, id: u64) -> Result<Reply, Reply> {
        self.message(channel, id)?;
        self.messages.remove(&id);
        Ok((StatusCode::NO_CONTENT, Value::Null))
    }

    /// Queues an INTERACTION_CREATE (`kind` 2: a command, 3: a component on
    /// `pressed`) and returns its id.
    fn interaction(
        &mut self,
        guild: Option<u64>,
        channel: u64,
        user: u64,
        kind: u64,
        data: Value,
        pressed: Option<Value>,
    ) -> u64 {
        let id = self.next_id();
        let token = format!("token-{id}");
        self.channels.insert(channel, guild);
        // "0" stands for the application installed to a guild, used in a DM.
        let owners = json!({"0": guild.unwrap_or(0).to_string()});
        let mut event = json!({
            "id": id.to_string(),
            "application_id": APP_ID.to_string(),
            "type": kind,
            "data": data,
            "channel_id": channel.to_string(),
            "channel": {"id": channel.to_string(), "type": if guild.is_some() { 0 } else { 1 }},
            "token": token,
            "version": 1,
            "app_permissions": PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": owners,
            "context": if guild.is_some() { 0 } else { 1 },
            "attachment_size_limit": 10_485_760,
        });
        match guild {
            Some(guild) => {
                let mut member = self.member(guild, user);
                member["user"] = user_json(user);
                member["permissions"] = json!(PERMISSIONS);
                event["member"] = member;
                event["guild_id"] = json!(guild.to_string());
                event["guild_locale"] = json!("en-US");
            }
            None => {
                event["user"] = user_json(user);
                self.dms.insert(user, channel);
            }
        }
        let mut stamp = json!({
            "type": if kind == 2 { 20 } else { 0 },
            "webhook_id": APP_ID.to_string(),
            "application_id": APP_ID.to_string(),
            "interaction_metadata": {
                "id": id.to_string(), "type": kind, "user": user_json(user), "authorizing_integration_owners": owners
            },
        });
        if let Some(pressed) = &pressed {
            stamp["interaction_metadata"]["interacted_message_id"] = pressed["id"].clone();
            event["message"] = pressed.clone();
        }
        let message = pressed.map(|m| id_of(&m["id"]));
        let interaction =
            Interaction { channel, token, stamp, message, original: None, delivered: None, acknowledged: false };
        self.interactions.insert(id, interaction);
        self.pending.push_back(("INTERACTION_CREATE".into(), event));
        id
    }

    /// `POST /interactions/{id}/{token}/callback`: 4 answers with a message,
    /// 5 defers (a "thinking…" placeholder with empty content that an edit of
    /// `@original` fills), 6 acknowledges a press, 7 edits the pressed
    /// message; 8 and 9 (autocomplete, modal) are only recorded.
    fn callback(
        &mut self,
        base: &str,
        id: u64,
        token: &str,
        body: &Value,
        uploads: Vec<Upload>,
    ) -> Result<Reply, Reply> {
        let unknown = || error(StatusCode::NOT_FOUND, 10062, "Unknown interaction");
        let Some(interaction) = self.interactions.get(&id).filter(|i| i.token == token) else {
            return Err(unknown());
        };
        let (acknowledged, delivered) = (interaction.acknowledged, interaction.delivered);
        let (channel, stamp, pressed) = (interaction.channel, interaction.stamp.clone(), interaction.message);
        let kind = body["type"].as_u64().unwrap_or(0);
        self.callbacks.push((id, kind, Instant::now()));
        if acknowledged {
            return Err(error(StatusCode::BAD_REQUEST, 40060, "Interaction has already been acknowledged."));
        }
        if delivered.is_none_or(|at| at.elapsed() > INTERACTION_DEADLINE) {
            return Err(unknown());
        }
        let data = &body["data"];
        let original = match (kind, pressed) {
            (4, _) => Some(id_of(&self.post(base, channel, data, uploads, &stamp)?["id"])),
            (5, _) => {
                let mut placeholder = self.blank(channel, BOT_ID);
                merge(&mut placeholder, &stamp);
                placeholder["flags"] = json!(LOADING | (data["flags"].as_u64().unwrap_or(0) & EPHEMERAL));
                Some(id_of(&self.store(placeholder)["id"]))
            }
            (6, Some(_)) => pressed,
            (7, Some(message)) => {
                self.edit(base, channel, message, data, uploads)?;
                pressed
            }
            (8 | 9, _) => None,
            _ => return Err(invalid_form(&["type"], "BASE_TYPE_CHOICES", "Value must be one of the valid choices.")),
        };
        let interaction = self.interactions.get_mut(&id).unwrap();
        interaction.acknowledged = true;
        interaction.original = original;
        Ok((StatusCode::NO_CONTENT, Value::Null))
    }

    /// The interaction a webhook token belongs to, once answered: before
    /// that, Discord knows no webhook for it.
    fn answered(&self, token: &str) -> Result<&Interaction, Reply> {
        let found = self.interactions.values().find(|i| i.token == token && i.acknowledged);
        found.ok_or_else(|| error(StatusCode::NOT_FOUND, 10015, "Unknown Webhook"))
    }

    /// `GET`, `PATCH` or `DELETE /webhooks/{app}/{token}/messages/{message}`,
    /// where `message` is an id or `@original`.
    fn webhook_message(
        &mut self,
        base: &str,
        method: &str,
        token: &str,
        message: &str,
        payload: &Value,
        uploads: Vec<Upload>,
    ) -> Result<Reply, Reply> {
        let interaction = self.answered(token)?;
        let channel = interaction.channel;
        let target = if message == "@original" { interaction.original } else { message.parse().ok() };
        let target = target.ok_or_else(|| error(StatusCode::NOT_FOUND, 10008, "Unknown Message"))?;
        match method {
            "GET" => Ok((StatusCode::OK, self.message(channel, target)?.clone())),
            "PATCH" => Ok((StatusCode::OK, self.edit(base, channel, target, payload, uploads)?)),
            _ => self.delete(channel, target),
        }
    }

    /// A command as Discord returns it; a global command registered again
    /// under its name keeps its id.
    fn command(&mut self, mut command: Value, guild: Option<u64>) -> Value {
        let known = self.commands.iter().find(|c| c["name"] == command["name"]).map(|c| c["id"].clone());
        let id = match known {
            Some(id) if guild.is_none() => id,
            _ => json!(self.next_id().to_string()),
        };
        command["id"] = id;
        command["application_id"] = json!(APP_ID.to_string());
        command["version"] = json!(self.next_id().to_string());
        command["type"] = json!(command["type"].as_u64().unwrap_or(1));
        command["description"] = json!(command["description"].as_str().unwrap_or_default());
        if let Some(guild) = guild {
            command["guild_id"] = json!(guild.to_string());
        }
        command
    }

    /// `PUT .../commands`: replaces all commands (only the global ones are kept).
    fn overwrite_commands(&mut self, list: &Value, guild: Option<u64>) -> Result<Reply, Reply> {
        let list = list.as_array().cloned().unwrap_or_default();
        for (at, command) in list.iter().enumerate() {
            check_command(command, &[at.to_string()])?;
        }
        let registered: Vec<Value> = list.into_iter().map(|c| self.command(c, guild)).collect();
        if guild.is_none() {
            self.commands = registered.clone();
        }
        Ok((StatusCode::OK, Value::Array(registered)))
    }

    /// `POST .../commands`: creates a command, or replaces the one of its name.
    fn upsert_command(&mut self, command: &Value, guild: Option<u64>) -> Result<Reply, Reply> {
        check_command(command, &[])?;
        let registered = self.command(command.clone(), guild);
        if guild.is_some() {
            return Ok((StatusCode::CREATED, registered));
        }
        match self.commands.iter_mut().find(|c| c["name"] == registered["name"]) {
            Some(old) => {
                *old = registered.clone();
                Ok((StatusCode::OK, registered))
            }
            None => {
                self.commands.push(registered.clone());
                Ok((StatusCode::CREATED, registered))
            }
        }
    }

    /// `POST /users/@me/channels`: the user's DM channel, opened if need be.
    fn open_dm(&mut self, user: u64) -> Reply {
        let channel = match self.dms.get(&user) {
            Some(channel) => *channel,
            None => {
                let channel = self.next_id();
                self.dms.insert(user, channel);
                self.channels.insert(channel, None);
                channel
            }
        };
        (
            StatusCode::OK,
            json!({"id": channel.to_string(), "type": 1, "last_message_id": null, "recipients": [user_json(user)]}),
        )
    }

    /// What a session with these intents gets of a dispatch, filtered as
    /// Discord filters it; starts an interaction's three seconds.
    fn visible(&mut self, kind: String, mut data: Value, intents: u64) -> Option<(String, Value)> {
        match kind.as_str() {
            "MESSAGE_CREATE" => {
                let in_guild = !data["guild_id"].is_null();
                if intents & (if in_guild { GUILD_MESSAGES } else { DIRECT_MESSAGES }) == 0 {
                    return None;
                }
                let is_bot = |user: &Value| id_of(&user["id"]) == BOT_ID;
                let for_bot =
                    is_bot(&data["author"]) || data["mentions"].as_array().is_some_and(|m| m.iter().any(is_bot));
                // Without the privileged intent, guild messages come without
                // what they say, unless they are the bot's or mention it.
                if in_guild && intents & MESSAGE_CONTENT == 0 && !for_bot {
                    data["content"] = json!("");
                    for key in ["embeds", "attachments", "components"] {
                        data[key] = json!([]);
                    }
                }
            }
            "INTERACTION_CREATE" => {
                if let Some(interaction) = self.interactions.get_mut(&id_of(&data["id"])) {
                    interaction.delivered = Some(Instant::now());
                }
            }
            _ => {}
        }
        Some((kind, data))
    }
}

/// The REST API: every call under `/api/v10` (and any other path the gateway
/// and downloads do not take) is recorded, then answered.
async fn api(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let at = Instant::now();
    let method = request.method().to_string();
    let full = request.uri().path().to_string();
    let versioned = full.strip_prefix("/api/v10").map(str::to_string);
    let path = versioned.clone().unwrap_or_else(|| full.clone());
    let (body, uploads) = read_body(request).await;
    let mut inner = shared.inner.lock().unwrap();
    inner.calls.push(Call { method: method.clone(), path: path.clone(), body: body.clone(), status: 0, at });
    let index = inner.calls.len() - 1;
    let matches = |m: &String, p: &String| m.eq_ignore_ascii_case(&method) && path.starts_with(p.as_str());
    let in_force = inner.limited_until.iter().filter(|(m, p, _)| matches(m, p)).map(|(_, _, until)| *until).max();
    let injected = inner.rate_limits.iter().position(|(m, p, _)| matches(m, p));
    let limited = match (in_force.filter(|until| *until > at), injected) {
        (Some(until), _) => Some((until - at).as_secs_f64()),
        (None, Some(index)) => {
            let (method, prefix, seconds) = inner.rate_limits.remove(index).unwrap();
            inner.limited_until.push((method, prefix, at + Duration::from_secs_f64(seconds)));
            Some(seconds)
        }
        (None, None) => None,
    };
    let response = match limited {
        Some(seconds) => {
            inner.calls[index].status = 429;
            rate_limited(seconds)
        }
        None => {
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let (status, reply) = match versioned {
                Some(_) => route(&mut inner, &shared.base, &method, &segments, &body, uploads).unwrap_or_else(|e| e),
                None => not_found(),
            };
            inner.calls[index].status = status.as_u16();
            match reply {
                Value::Null => status.into_response(),
                reply => (status, Json(reply)).into_response(),
            }
        }
    };
    drop(inner);
    shared.news.notify_waiters();
    response
}

fn route(
    inner: &mut Inner,
    base: &str,
    method: &str,
    path: &[&str],
    body: &Value,
    uploads: Vec<Upload>,
) -> Result<Reply, Reply> {
    let id = |s: &str| s.parse::<u64>().unwrap_or(0);
    let ok = |value: Value| Ok((StatusCode::OK, value));
    match (method, path) {
        ("GET", ["gateway"]) => ok(json!({ "url": gateway_url(base) })),
        ("GET", ["gateway", "bot"]) => ok(json!({
            "url": gateway_url(base),
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1},
        })),
        ("GET", ["users", "@me"]) => ok(user_json(BOT_ID)),
        ("POST", ["users", "@me", "channels"]) => Ok(inner.open_dm(id_of(&body["recipient_id"]))),
        ("GET", ["oauth2", "applications", "@me"]) => ok(json!({
            "id": APP_ID.to_string(), "name": "natter", "icon": null, "description": "", "bot_public": false,
            "bot_require_code_grant": false, "verify_key": "0".repeat(64), "team": null, "flags": 0,
            "owner": user_json(OWNER_ID), "bot": user_json(BOT_ID),
        })),
        ("POST", ["channels", channel, "messages"]) => ok(inner.post(base, id(channel), body, uploads, &json!({}))?),
        ("GET", ["channels", channel, "messages", message]) => ok(inner.message(id(channel), id(message))?.clone()),
        ("PATCH", ["channels", channel, "messages", message]) => {
            ok(inner.edit(base, id(channel), id(message), body, uploads)?)
        }
        ("DELETE", ["channels", channel, "messages", message]) => inner.delete(id(channel), id(message)),
        ("POST", ["channels", channel, "typing"]) => match inner.channels.contains_key(&id(channel)) {
            true => Ok((StatusCode::NO_CONTENT, Value::Null)),
            false => Err(error(StatusCode::NOT_FOUND, 10003, "Unknown Channel")),
        },
        (_, ["applications", app, ..]) if id(app) != APP_ID => {
            Err(error(StatusCode::NOT_FOUND, 10002, "Unknown Application"))
        }
        ("GET", ["applications", _, "commands"]) => ok(Value::Array(inner.commands.clone())),
        ("PUT", ["applications", _, "commands"]) => inner.overwrite_commands(body, None),
        ("POST", ["applications", _, "commands"]) => inner.upsert_command(body, None),
        ("PUT", ["applications", _, "guilds", guild, "commands"]) => inner.overwrite_commands(body, Some(id(guild))),
        ("POST", ["applications", _, "guilds", guild, "commands"]) => inner.upsert_command(body, Some(id(guild))),
        ("POST", ["interactions", interaction, token, "callback"]) => {
            inner.callback(base, id(interaction), token, body, uploads)
        }
        (_, ["webhooks", app, ..]) if id(app) != APP_ID => Err(error(StatusCode::NOT_FOUND, 10015, "Unknown Webhook")),
        ("POST", ["webhooks", _, token]) => {
            let interaction = inner.answered(token)?;
            let (channel, stamp) = (interaction.channel, interaction.stamp.clone());
            ok(inner.post(base, channel, body, uploads, &stamp)?)
        }
        ("GET" | "PATCH" | "DELETE", ["webhooks", _, token, "messages", message]) => {
            inner.webhook_message(base, method, token, message, body, uploads)
        }
        _ => Err(not_found()),
    }
}

/// A call's JSON body and files: multipart calls carry the JSON in
/// `payload_json` and the files in `files[n]`.
async fn read_body(request: Request) -> (Value, Vec<Upload>) {
    let content_type = request.headers().get(CONTENT_TYPE).and_then(|t| t.to_str().ok()).unwrap_or_default();
    if !content_type.starts_with("multipart/") {
        let bytes = axum::body::to_bytes(request.into_body(), usize::MAX).await.unwrap();
        return (serde_json::from_slice(&bytes).unwrap_or(Value::Null), Vec::new());
    }
    let mut form = Multipart::from_request(request, &()).await.unwrap();
    let (mut body, mut uploads) = (Value::Null, Vec::new());
    while let Some(field) = form.next_field().await.unwrap() {
        let name = field.name().unwrap_or_default().to_string();
        if name == "payload_json" {
            body = serde_json::from_str(&field.text().await.unwrap()).unwrap();
        } else if name.starts_with("files[") {
            let filename = field.file_name().unwrap_or_default().to_string();
            let content_type = field.content_type().unwrap_or("application/octet-stream").to_string();
            uploads.push(Upload { filename, content_type, data: field.bytes().await.unwrap().to_vec() });
        }
    }
    (body, uploads)
}

async fn download(State(shared): State<Arc<Shared>>, Path((id, _name)): Path<(u64, String)>) -> Response {
    match shared.inner.lock().unwrap().downloads.get(&id).cloned() {
        Some((content_type, data)) => ([(CONTENT_TYPE, content_type)], data).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn gateway(upgrade: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> Response {
    upgrade.on_upgrade(move |socket| session(socket, shared))
}

/// One gateway connection: Hello; Identify gets READY, and from then on this
/// connection, if it is the newest identified one, gets the queued
/// dispatches, each with the next sequence number; heartbeats get ACKs; a
/// Resume gets Invalid Session, so the client identifies afresh and gets
/// READY again.
async fn session(mut socket: WebSocket, shared: Arc<Shared>) {
    let hello = json!({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}, "s": null, "t": null});
    let mut open = send(&mut socket, &hello).await;
    let mut seq = 0;
    // This connection's session number and intents, once it identified.
    let mut identified: Option<(u64, u64)> = None;
    while open {
        let news = shared.news.notified();
        tokio::pin!(news);
        news.as_mut().enable();
        let mut out = Vec::new();
        if let Some((number, intents)) = identified {
            let mut inner = shared.inner.lock().unwrap();
            while inner.session == number {
                let Some((kind, data)) = inner.pending.pop_front() else { break };
                out.extend(inner.visible(kind, data, intents));
            }
        }
        for (kind, data) in out {
            seq += 1;
            if !send(&mut socket, &json!({"op": 0, "s": seq, "t": kind, "d": data})).await {
                return;
            }
        }
        let payload: Value = tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).unwrap_or_default(),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
            () = &mut news => continue,
        };
        let reply = match payload["op"].as_u64() {
            Some(1) => {
                shared.inner.lock().unwrap().heartbeats += 1;
                json!({"op": 11, "d": null, "s": null, "t": null})
            }
            Some(2) => {
                let mut inner = shared.inner.lock().unwrap();
                inner.session += 1;
                inner.identify = Some(payload["d"].clone());
                identified = Some((inner.session, payload["d"]["intents"].as_u64().unwrap_or(0)));
                seq += 1;
                json!({"op": 0, "s": seq, "t": "READY", "d": {
                    "v": 10,
                    "user": user_json(BOT_ID),
                    "guilds": [],
                    "session_id": format!("session-{}", inner.session),
                    "resume_gateway_url": gateway_url(&shared.base),
                    "application": {"id": APP_ID.to_string(), "flags": 0},
                }})
            }
            Some(6) => json!({"op": 9, "d": false, "s": null, "t": null}),
            _ => continue,
        };
        open = send(&mut socket, &reply).await;
    }
}

async fn send(socket: &mut WebSocket, payload: &Value) -> bool {
    socket.send(Message::Text(payload.to_string().into())).await.is_ok()
}

/// Refuses a chat-input command definition as Discord does: names of 1–32
/// lowercase letters, digits, `-` or `_`; descriptions of 1–100 characters;
/// at most 25 options, required ones before optional ones.
fn check_command(command: &Value, path: &[String]) -> Result<(), Reply> {
    if command["type"].as_u64().unwrap_or(1) != 1 {
        return Ok(());
    }
    check_entry(command, path)?;
    check_options(&command["options"], path)
}

fn check_entry(entry: &Value, path: &[String]) -> Result<(), Reply> {
    let at = |key: &str| [path, &[key.to_string()]].concat();
    let name = entry["name"].as_str().unwrap_or_default();
    let lowercase = name.chars().all(|c| c == '-' || c == '_' || (c.is_alphanumeric() && !c.is_uppercase()));
    if !(1..=32).contains(&name.chars().count()) || !lowercase {
        return Err(invalid_form(&at("name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"));
    }
    match entry["description"].as_str().unwrap_or_default().chars().count() {
        0 => Err(invalid_form(&at("description"), "BASE_TYPE_REQUIRED", "This field is required")),
        101.. => Err(invalid_form(&at("description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")),
        _ => Ok(()),
    }
}

fn check_options(options: &Value, path: &[String]) -> Result<(), Reply> {
    let options = options.as_array().map(Vec::as_slice).unwrap_or_default();
    let at = [path, &["options".to_string()]].concat();
    if options.len() > 25 {
        return Err(invalid_form(&at, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."));
    }
    let mut optional = false;
    for (index, option) in options.iter().enumerate() {
        let path = [&at[..], &[index.to_string()]].concat();
        check_entry(option, &path)?;
        let required = option["required"].as_bool().unwrap_or(false);
        if required && optional {
            return Err(invalid_form(
                &path,
                "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                "Required options must be placed before non-required options",
            ));
        }
        optional |= !required;
        // Subcommands and their groups hold options of their own.
        if matches!(option["type"].as_u64(), Some(1 | 2)) {
            check_options(&option["options"], &path)?;
        }
    }
    Ok(())
}

fn error(status: StatusCode, code: u64, message: &str) -> Reply {
    (status, json!({"code": code, "message": message}))
}

fn not_found() -> Reply {
    error(StatusCode::NOT_FOUND, 0, "404: Not Found")
}

/// Discord's 400 for a bad field, with the error nested under the field's path.
fn invalid_form<S: AsRef<str>>(path: &[S], code: &str, message: &str) -> Reply {
    let mut errors = json!({"_errors": [{"code": code, "message": message}]});
    for key in path.iter().rev() {
        errors = Value::Object([(key.as_ref().to_string(), errors)].into_iter().collect());
    }
    (StatusCode::BAD_REQUEST, json!({"code": 50035, "message": "Invalid Form Body", "errors": errors}))
}

fn rate_limited(seconds: f64) -> Response {
    let body = json!({"message": "You are being rate limited.", "retry_after": seconds, "global": false});
    let headers =
        [(RETRY_AFTER, seconds.to_string()), (HeaderName::from_static("x-ratelimit-scope"), "user".to_string())];
    (StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response()
}

fn gateway_url(base: &str) -> String {
    format!("{}/gateway", base.replace("http://", "ws://"))
}

/// A snowflake as Discord writes it (a string), or as a test may (a number).
fn id_of(value: &Value) -> u64 {
    value.as_str().and_then(|s| s.parse().ok()).or_else(|| value.as_u64()).unwrap_or(0)
}

fn merge(target: &mut Value, fields: &Value) {
    for (key, value) in fields.as_object().into_iter().flatten() {
        target[key] = value.clone();
    }
}

/// The bot's user object, as in READY and in a message's "mentions".
pub fn bot_user() -> Value {
    json!({
        "id": BOT_ID.to_string(), "username": "natter", "global_name": null, "discriminator": "0001",
        "avatar": null, "bot": true, "public_flags": 0,
    })
}

fn user_json(id: u64) -> Value {
    if id == BOT_ID {
        return bot_user();
    }
    json!({
        "id": id.to_string(), "username": format!("user{id}"), "global_name": format!("User {id}"),
        "discriminator": "0", "avatar": null, "public_flags": 0,
    })
}

/// The users a content mentions (`<@id>` or `<@!id>`), as Discord lists them.
fn mentioned(content: &str) -> Vec<Value> {
    let mut ids: Vec<u64> = content
        .split("<@")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.strip_prefix('!').unwrap_or(rest);
            rest[..rest.find('>')?].parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter().map(user_json).collect()
}

fn attachment_json(base: &str, id: u64, filename: &str, content_type: &str, size: usize) -> Value {
    // Discord's CDN links end in signature parameters: the file name is not
    // the end of the URL.
    let url = format!("{base}/attachments/{id}/{filename}?ex=0&is=0&hm=0");
    json!({
        "id": id.to_string(), "filename": filename, "size": size, "url": url, "proxy_url": url,
        "content_type": content_type,
    })
}

/// An Ogg Opus file's length: the last page's granule position counts
/// 48 kHz samples.
fn ogg_duration(data: &[u8]) -> f64 {
    let last = data.windows(4).rposition(|w| w == b"OggS");
    let granule = last.and_then(|at| data.get(at + 6..at + 14));
    granule.map_or(0.0, |g| u64::from_le_bytes(g.try_into().unwrap()) as f64 / 48_000.0)
}

/// Now, as Discord writes times: `2024-05-01T12:00:00.123456+00:00`.
fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let (days, secs) = ((now.as_secs() / 86_400) as i64, now.as_secs() % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:06}+00:00", now.subsec_micros())
}

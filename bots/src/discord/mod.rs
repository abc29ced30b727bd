//! The Discord front-end on serenity. The bot answers direct messages and the
//! messages that mention it; replying to one of its answers continues that
//! answer's conversation. Slash commands are answered through deferred
//! interaction responses. Image attachments go to OCR, audio files and voice
//! messages to speech-to-text, and every answer streams into messages edited
//! in place ([`crate::relay`]).
//!
//! serenity's gateway client runs the connection; its event handler only hands
//! events to natter's loop, which runs each in a task of its own, so a slow
//! answer never holds up other users and shutdown is one `select!`.

mod commands;
mod jobs;
mod media;
mod sink;

use crate::chatbot::Assistant;
use crate::client::JobClient;
use crate::relay::RelayLimits;
use crate::store::{Store, UserId};
use serenity::all::{
    ChannelId, CreateAllowedMentions, CreateMessage, GatewayIntents, GuildId, Http, HttpBuilder, Interaction, Message,
    MessageId, MessageReference, Ready, RoleId,
};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// The largest attachment natter downloads: Discord's upload limit without Nitro boosts.
pub const MAX_DOWNLOAD: u64 = 25 * 1024 * 1024;
/// Events waiting for the bot's loop before the gateway handler waits its turn.
const EVENT_QUEUE: usize = 256;
/// How often the fleet is checked for chat models that `/model` should offer.
const COMMANDS_REFRESH: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct DiscordConfig {
    pub token: String,
    /// The REST API's base URL in place of `https://discord.com`; the tests
    /// point it at a fake server.
    pub api_url: Option<String>,
    /// The gateway's WebSocket URL in place of the one `GET /gateway` names.
    pub gateway_url: Option<String>,
    /// Edit pacing and message length.
    pub limits: RelayLimits,
    /// The catalog's default model of each kind, used when the fleet serves it.
    pub default_models: Vec<String>,
    pub access: Access,
    /// Jobs a user may start per day (UTC); admins are exempt.
    pub daily_quota: Option<u64>,
    /// How long a job may go without news before its reply gives up on it.
    pub job_timeout: Duration,
}

/// Leaves the token out, so a logged config never leaks it.
impl std::fmt::Debug for DiscordConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordConfig")
            .field("token", &"<hidden>")
            .field("api_url", &self.api_url)
            .field("gateway_url", &self.gateway_url)
            .field("limits", &self.limits)
            .field("default_models", &self.default_models)
            .field("access", &self.access)
            .field("daily_quota", &self.daily_quota)
            .field("job_timeout", &self.job_timeout)
            .finish()
    }
}

/// Who may use the bot, and where.
#[derive(Clone, Debug)]
pub struct Access {
    /// User ids let in; with `roles`, empty lets everyone in.
    pub users: Vec<u64>,
    /// Role ids whose members are let in (in servers).
    pub roles: Vec<u64>,
    /// Server channels the bot answers in; empty: all of them.
    pub channels: Vec<u64>,
    /// User ids always let in, exempt from the quota, and allowed `/stats`.
    pub admins: Vec<u64>,
    /// Whether the bot answers direct messages.
    pub direct_messages: bool,
}

impl Default for Access {
    fn default() -> Self {
        Access { users: Vec::new(), roles: Vec::new(), channels: Vec::new(), admins: Vec::new(), direct_messages: true }
    }
}

/// Why a person is not answered.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    DirectMessagesOff,
    Channel,
    User,
}

impl Refusal {
    fn reply(&self) -> &'static str {
        match self {
            Refusal::DirectMessagesOff => "I don't answer direct messages here; please mention me in a server channel.",
            Refusal::Channel => "I don't answer in this channel.",
            Refusal::User => "Sorry, this bot is private.",
        }
    }
}

impl Access {
    fn is_admin(&self, user: u64) -> bool {
        self.admins.contains(&user)
    }

    fn check(&self, user: u64, roles: &[RoleId], guild: Option<GuildId>, channel: ChannelId) -> Result<(), Refusal> {
        if self.is_admin(user) {
            return Ok(());
        }
        match guild {
            None if !self.direct_messages => return Err(Refusal::DirectMessagesOff),
            Some(_) if !self.channels.is_empty() && !self.channels.contains(&channel.get()) => {
                return Err(Refusal::Channel)
            }
            _ => {}
        }
        let open = self.users.is_empty() && self.roles.is_empty();
        if open || self.users.contains(&user) || roles.iter().any(|r| self.roles.contains(&r.get())) {
            Ok(())
        } else {
            Err(Refusal::User)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("cannot start the Discord client: {0}")]
    Client(serenity::Error),
}

/// What the gateway hands the bot's loop.
enum Event {
    Ready(Box<Ready>),
    Message(Box<Message>),
    Interaction(Box<Interaction>),
}

/// serenity's event handler: forwards events to the loop in [`run`].
struct Forward(mpsc::Sender<Event>);

#[serenity::async_trait]
impl serenity::all::EventHandler for Forward {
    async fn ready(&self, _: serenity::all::Context, ready: Ready) {
        let _ = self.0.send(Event::Ready(Box::new(ready))).await;
    }

    async fn message(&self, _: serenity::all::Context, message: Message) {
        let _ = self.0.send(Event::Message(Box::new(message))).await;
    }

    async fn interaction_create(&self, _: serenity::all::Context, interaction: Interaction) {
        let _ = self.0.send(Event::Interaction(Box::new(interaction))).await;
    }
}

/// Everything the bot's tasks share.
struct Context {
    http: Arc<Http>,
    /// The bot's own user id, known once the gateway is READY.
    me: OnceLock<serenity::all::UserId>,
    assistant: Assistant,
    /// Fetches attachments, with natter's own size limit.
    downloads: reqwest::Client,
    /// The chat models `/model` offers as registered, once registered.
    registered: std::sync::Mutex<Option<Vec<String>>>,
    config: DiscordConfig,
}

/// Where replies go: into the channel (answering a message), or through an
/// interaction's responses (answering a slash command).
#[derive(Clone, Debug)]
enum ReplyTo {
    Channel { reference: Option<MessageId> },
    Interaction { token: String, deferred: sink::Deferred },
}

/// Who is talking, where, and how replies go back.
#[derive(Clone, Debug)]
struct Talk {
    user: UserId,
    guild: Option<GuildId>,
    channel: ChannelId,
    reply: ReplyTo,
    admin: bool,
}

impl Talk {
    /// The store's key for the chat: conversations belong to (server or DM,
    /// channel, user).
    fn chat_key(&self) -> String {
        chat_key(self.guild, self.channel)
    }
}

fn chat_key(guild: Option<GuildId>, channel: ChannelId) -> String {
    match guild {
        Some(guild) => format!("{guild}/{channel}"),
        None => format!("dm/{channel}"),
    }
}

/// The channel a chat key names.
fn channel_of(chat: &str) -> Option<ChannelId> {
    chat.rsplit_once('/').and_then(|(_, channel)| channel.parse().ok()).map(ChannelId::new)
}

/// Runs the bot until `shutdown` resolves.
pub async fn run(
    config: DiscordConfig,
    client: JobClient,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DiscordError> {
    let mut http = HttpBuilder::new(&config.token)
        // Model output must never ping @everyone, roles or people.
        .default_allowed_mentions(CreateAllowedMentions::new().replied_user(false));
    if let Some(url) = &config.api_url {
        // serenity's rate limiter sends every request to discord.com whatever
        // the proxy, so it is off here; the sink waits out 429s instead.
        http = http.proxy(url.trim_end_matches('/')).ratelimiter_disabled(true);
    }
    let intents = GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES | GatewayIntents::MESSAGE_CONTENT;
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let mut gateway = serenity::client::ClientBuilder::new_with_http(http.build(), intents)
        .event_handler(Forward(events_tx))
        .await
        .map_err(DiscordError::Client)?;
    if let Some(url) = &config.gateway_url {
        *gateway.ws_url.lock().await = url.clone();
    }
    let shards = gateway.shard_manager.clone();
    let context = Arc::new(Context {
        http: gateway.http.clone(),
        me: OnceLock::new(),
        downloads: reqwest::Client::new(),
        registered: std::sync::Mutex::new(None),
        assistant: Assistant::new(
            "discord",
            client,
            store.clone(),
            config.default_models.clone(),
            config.daily_quota,
            config.job_timeout,
        ),
        config,
    });
    let connection = tokio::spawn(async move {
        if let Err(e) = gateway.start().await {
            tracing::error!("the Discord gateway connection ended: {e}");
        }
    });
    // Every event's task lives here, so shutdown stops them all; replies cut
    // off that way stay in the store's job map and the next start finishes them.
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + COMMANDS_REFRESH, COMMANDS_REFRESH);
    loop {
        let event = tokio::select! {
            () = &mut shutdown => break,
            event = events.recv() => event,
            _ = refresh.tick(), if context.me.get().is_some() => {
                let context = context.clone();
                tasks.spawn(async move { commands::register(&context).await });
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        let Some(event) = event else { break };
        let context = context.clone();
        match event {
            Event::Ready(ready) => {
                tracing::info!(bot = %ready.user.name, "discord bot connected");
                if context.me.set(ready.user.id).is_ok() {
                    // Once per start, not on every reconnection.
                    commands::register(&context).await;
                    context.resume_pending(&mut tasks).await;
                }
            }
            Event::Message(message) => {
                tasks.spawn(async move {
                    if let Err(e) = context.on_message(*message).await {
                        tracing::error!("discord message: {e:#}");
                    }
                });
            }
            Event::Interaction(interaction) => {
                tasks.spawn(async move {
                    if let Err(e) = context.on_interaction(*interaction).await {
                        tracing::error!("discord interaction: {e:#}");
                    }
                });
            }
        }
    }
    shards.shutdown_all().await;
    let _ = connection.await;
    tasks.shutdown().await;
    drop(context);
    store.close().await;
    Ok(())
}

impl Context {
    async fn on_message(self: Arc<Self>, message: Message) -> anyhow::Result<()> {
        let Some(&me) = self.me.get() else { return Ok(()) };
        if message.author.bot || message.author.id == me {
            return Ok(());
        }
        let replied_to = message.referenced_message.as_ref().filter(|m| m.author.id == me).map(|m| m.id);
        let mentioned = message.mentions.iter().any(|u| u.id == me);
        if message.guild_id.is_some() && !mentioned && replied_to.is_none() {
            return Ok(());
        }
        let reply = ReplyTo::Channel { reference: message.guild_id.map(|_| message.id) };
        let roles = message.member.as_ref().map(|m| m.roles.as_slice()).unwrap_or_default();
        let talk = Talk {
            user: self.assistant.user_id(message.author.id),
            guild: message.guild_id,
            channel: message.channel_id,
            reply,
            admin: self.config.access.is_admin(message.author.id.get()),
        };
        if let Err(refusal) = self.config.access.check(message.author.id.get(), roles, talk.guild, talk.channel) {
            self.say(&talk, refusal.reply()).await?;
            return Ok(());
        }
        self.assistant.store.touch_user(&talk.user).await?;
        if media::handle(&self, &talk, &message).await? {
            return Ok(());
        }
        let text = without_mentions_of(&message.content, me);
        if text.trim().is_empty() {
            self.say(&talk, "Yes? Write your question after the mention, or use /chat.").await?;
            return Ok(());
        }
        // A reply to one of the bot's answers continues that answer's conversation.
        let conversation = match replied_to {
            Some(answer) => {
                self.assistant.conversation_answered_by(&talk.user, &talk.chat_key(), &answer.to_string()).await?
            }
            None => None,
        };
        jobs::chat_turn(&self, &talk, conversation, text).await
    }

    /// Sends a short message where `talk` replies go.
    async fn say(&self, talk: &Talk, text: &str) -> Result<(), serenity::Error> {
        match &talk.reply {
            ReplyTo::Channel { reference } => {
                let mut message = CreateMessage::new().content(text);
                if let Some(id) = reference {
                    message = message.reference_message(MessageReference::from((talk.channel, *id)));
                }
                talk.channel.send_message(&self.http, message).await?;
            }
            ReplyTo::Interaction { token, deferred } => {
                sink::interaction_say(&self.http, token, deferred, text).await?;
            }
        }
        Ok(())
    }
}

/// The text with the bot's `<@id>` and `<@!id>` mentions taken out, as the
/// model should see it.
fn without_mentions_of(text: &str, me: serenity::all::UserId) -> String {
    text.replace(&format!("<@{me}>"), "").replace(&format!("<@!{me}>"), "").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_checks_users_roles_channels_and_direct_messages() {
        let (guild, channel) = (Some(GuildId::new(1)), ChannelId::new(10));
        let open = Access::default();
        assert_eq!(open.check(5, &[], guild, channel), Ok(()));
        assert_eq!(open.check(5, &[], None, channel), Ok(()));

        let closed =
            Access { users: vec![5], roles: vec![77], channels: vec![10], admins: vec![9], direct_messages: false };
        assert_eq!(closed.check(5, &[], guild, channel), Ok(()));
        assert_eq!(closed.check(6, &[RoleId::new(77)], guild, channel), Ok(()));
        assert_eq!(closed.check(6, &[RoleId::new(78)], guild, channel), Err(Refusal::User));
        assert_eq!(closed.check(5, &[], guild, ChannelId::new(11)), Err(Refusal::Channel));
        assert_eq!(closed.check(5, &[], None, channel), Err(Refusal::DirectMessagesOff));
        // Admins are let in everywhere.
        assert_eq!(closed.check(9, &[], None, ChannelId::new(11)), Ok(()));
    }

    #[test]
    fn mentions_of_the_bot_are_taken_out_and_chat_keys_name_their_channel() {
        let me = serenity::all::UserId::new(9000);
        assert_eq!(without_mentions_of("<@9000> what is 2+2?", me), "what is 2+2?");
        assert_eq!(without_mentions_of("hey <@!9000>, hi <@42>", me), "hey , hi <@42>");
        let key = chat_key(Some(GuildId::new(1)), ChannelId::new(10));
        assert_eq!(key, "1/10");
        assert_eq!(channel_of(&key), Some(ChannelId::new(10)));
        assert_eq!(channel_of(&chat_key(None, ChannelId::new(12))), Some(ChannelId::new(12)));
    }
}

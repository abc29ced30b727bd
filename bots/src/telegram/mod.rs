//! The Telegram front-end. In a private chat every text message is a turn in
//! the user's current conversation; in a group the bot answers when it is
//! mentioned, replied to or given a command, keeping one conversation per
//! (chat, user). Photos go to OCR, voice notes and audio to speech-to-text, and
//! answers stream into one message through live edits ([`crate::relay`]).
//!
//! natter runs its own long-polling loop over teloxide's Bot API client rather
//! than teloxide's dispatcher: each update becomes a task of ours, so a slow
//! answer never holds up other users, and shutdown is one `select!`.

mod commands;
mod jobs;
mod media;
mod sink;

use crate::chatbot::Assistant;
use crate::client::JobClient;
use crate::relay::RelayLimits;
use crate::store::{Store, UserId};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use teloxide::payloads::{GetUpdatesSetters, SendMessageSetters};
use teloxide::prelude::Requester;
use teloxide::types::{ChatId, Me, Message, MessageId, ReplyParameters, UpdateKind, User};
use teloxide::{Bot, RequestError};

/// The largest file the Bot API lets a bot download.
pub const MAX_DOWNLOAD: u32 = 20 * 1024 * 1024;

#[derive(Clone)]
pub struct TelegramConfig {
    pub token: String,
    /// The Bot API's base URL; the tests point it at a fake server.
    pub api_url: Option<reqwest::Url>,
    /// How long one getUpdates call waits for news.
    pub poll_timeout: Duration,
    /// Edit pacing and message length in private chats.
    pub limits: RelayLimits,
    /// The same in groups, where Telegram allows fewer edits.
    pub group_limits: RelayLimits,
    /// The catalog's default model of each kind, used when the fleet serves it.
    pub default_models: Vec<String>,
    pub access: Access,
    /// Jobs a user may start per day (UTC); admins are exempt.
    pub daily_quota: Option<u64>,
    /// How long a job may go without news before its reply gives up on it.
    pub job_timeout: Duration,
}

/// Leaves the token out, so a logged config never leaks it.
impl std::fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramConfig")
            .field("token", &"<hidden>")
            .field("api_url", &self.api_url.as_ref().map(|u| u.as_str()))
            .field("poll_timeout", &self.poll_timeout)
            .field("limits", &self.limits)
            .field("group_limits", &self.group_limits)
            .field("default_models", &self.default_models)
            .field("access", &self.access)
            .field("daily_quota", &self.daily_quota)
            .field("job_timeout", &self.job_timeout)
            .finish()
    }
}

/// Who may use the bot.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// User ids or usernames (with or without `@`); empty lets everyone in.
    pub allow: Vec<String>,
    /// User ids that are always let in and may see `/stats`.
    pub admins: Vec<u64>,
}

impl Access {
    pub fn is_admin(&self, user: &User) -> bool {
        self.admins.contains(&user.id.0)
    }

    pub fn allows(&self, user: &User) -> bool {
        let id = user.id.0.to_string();
        let name = user.username.as_deref().map(str::to_lowercase);
        self.allow.is_empty()
            || self.is_admin(user)
            || self
                .allow
                .iter()
                .map(|a| a.trim().trim_start_matches('@').to_lowercase())
                .any(|allowed| allowed == id || name.as_deref() == Some(allowed.as_str()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelegramError {
    #[error("the Telegram Bot API refused the token or cannot be reached: {0}")]
    Connect(RequestError),
}

/// Everything the bot's tasks share.
struct Context {
    bot: Bot,
    me: Me,
    assistant: Assistant,
    config: TelegramConfig,
}

/// Who is talking, where, and how replies go back.
#[derive(Clone, Debug)]
struct Talk {
    user: UserId,
    chat: ChatId,
    /// In groups, replies quote the message they answer.
    reply_to: Option<MessageId>,
    group: bool,
    admin: bool,
}

impl Talk {
    /// The store's key for the chat: conversations belong to (chat, user).
    fn chat_key(&self) -> String {
        self.chat.to_string()
    }
}

/// Polls for updates until `shutdown` resolves.
pub async fn run(
    config: TelegramConfig,
    client: JobClient,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TelegramError> {
    let mut bot = Bot::new(&config.token);
    if let Some(url) = config.api_url.clone() {
        bot = bot.set_api_url(url);
    }
    let me = bot.get_me().await.map_err(TelegramError::Connect)?;
    tracing::info!(bot = %me.username(), "telegram bot polling for updates");
    // Telegram refuses getUpdates while a webhook is set; polling is how natter
    // reaches the Bot API, so a leftover webhook is removed.
    match bot.get_webhook_info().await {
        Ok(info) if info.url.is_some() => {
            tracing::warn!("removing the bot's webhook so that long polling works");
            if let Err(e) = bot.delete_webhook().await {
                tracing::warn!("deleteWebhook failed: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("getWebhookInfo failed: {e}"),
    }
    if let Err(e) = bot.set_my_commands(commands::menu()).await {
        tracing::warn!("setMyCommands failed; the command menu may be stale: {e}");
    }
    let poll_timeout = config.poll_timeout;
    let assistant = Assistant::new(
        "telegram",
        client,
        store.clone(),
        config.default_models.clone(),
        config.daily_quota,
        config.job_timeout,
    );
    let context = Arc::new(Context { bot: bot.clone(), me, assistant, config });
    // Every update's task lives here, so shutdown stops them all; replies cut
    // off that way stay in the store's job map and the next start finishes them.
    let mut tasks = tokio::task::JoinSet::new();
    context.resume_pending(&mut tasks).await;
    let mut offset = 0;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let poll = bot.get_updates().offset(offset).timeout(poll_timeout.as_secs() as u32);
        let updates = tokio::select! {
            () = &mut shutdown => break,
            updates = poll => updates,
        };
        // Forget the tasks that have ended.
        while tasks.try_join_next().is_some() {}
        let updates = match updates {
            Ok(updates) => updates,
            Err(e) => {
                tracing::warn!("getUpdates failed: {e}");
                tokio::time::sleep(retry_delay(&e)).await;
                continue;
            }
        };
        for update in updates {
            offset = update.id.as_offset();
            let context = context.clone();
            match update.kind {
                UpdateKind::Message(message) => {
                    tasks.spawn(async move {
                        if let Err(e) = context.on_message(message).await {
                            tracing::error!("telegram message: {e:#}");
                        }
                    });
                }
                UpdateKind::CallbackQuery(query) => {
                    tasks.spawn(async move {
                        if let Err(e) = context.on_button(query).await {
                            tracing::error!("telegram button: {e:#}");
                        }
                    });
                }
                UpdateKind::Error(raw) => tracing::warn!("an update teloxide could not read: {raw}"),
                _ => {}
            }
        }
    }
    // Confirm the updates already handled, so the next start does not get them again.
    if offset != 0 {
        let _ = bot.get_updates().offset(offset).timeout(0).await;
    }
    tasks.shutdown().await;
    drop(context);
    store.close().await;
    Ok(())
}

fn retry_delay(e: &RequestError) -> Duration {
    match e {
        RequestError::RetryAfter(seconds) => seconds.duration(),
        _ => Duration::from_secs(1),
    }
}

impl Context {
    async fn on_message(self: Arc<Self>, message: Message) -> anyhow::Result<()> {
        let Some(from) = message.from.as_ref().filter(|u| !u.is_bot) else { return Ok(()) };
        let group = !message.chat.is_private();
        let text = message.text().or(message.caption()).unwrap_or_default();
        let command = commands::parse(text, self.me.username());
        let addressed = !group || command.is_some() || self.mentioned(text) || self.replied_to(&message);
        if !addressed {
            return Ok(());
        }
        if !self.config.access.allows(from) {
            self.say_in(message.chat.id, group.then_some(message.id), "Sorry, this bot is private.").await?;
            return Ok(());
        }
        let talk = Talk {
            user: self.assistant.user_id(from.id.0),
            chat: message.chat.id,
            reply_to: group.then_some(message.id),
            group,
            admin: self.config.access.is_admin(from),
        };
        self.assistant.store.touch_user(&talk.user).await?;
        if media::handle(&self, &talk, &message).await? {
            return Ok(());
        }
        match command {
            Some((name, args)) => commands::run(&self, &talk, &name, &args).await,
            None => {
                let text = self.without_mention(text);
                if text.trim().is_empty() {
                    return Ok(());
                }
                // A reply to one of the bot's answers continues that answer's conversation.
                let conversation = match message.reply_to_message().filter(|_| self.replied_to(&message)) {
                    Some(answer) => {
                        let chat = talk.chat_key();
                        self.assistant.conversation_answered_by(&talk.user, &chat, &answer.id.0.to_string()).await?
                    }
                    None => None,
                };
                jobs::chat_turn(&self, &talk, conversation, text).await
            }
        }
    }

    fn mentioned(&self, text: &str) -> bool {
        text.to_lowercase().contains(&format!("@{}", self.me.username().to_lowercase()))
    }

    fn replied_to(&self, message: &Message) -> bool {
        message.reply_to_message().and_then(|m| m.from.as_ref()).is_some_and(|u| u.id == self.me.id)
    }

    /// The text with the bot's `@name` taken out, as the model should see it.
    fn without_mention(&self, text: &str) -> String {
        let mention = format!("@{}", self.me.username().to_lowercase());
        let lower = text.to_lowercase();
        match lower.find(&mention) {
            // Lowercasing can change byte lengths only outside ASCII, and
            // usernames are ASCII, so the offsets carry over when they line up.
            Some(at) if lower.len() == text.len() => {
                format!("{}{}", &text[..at], &text[at + mention.len()..]).trim().to_string()
            }
            _ => text.trim().to_string(),
        }
    }

    /// Sends a short plain message, quoting `reply_to` when given.
    async fn say_in(&self, chat: ChatId, reply_to: Option<MessageId>, text: &str) -> Result<Message, RequestError> {
        let request = self.bot.send_message(chat, text);
        match reply_to {
            Some(id) => request.reply_parameters(ReplyParameters::new(id).allow_sending_without_reply()).await,
            None => request.await,
        }
    }

    async fn say(&self, talk: &Talk, text: &str) -> Result<Message, RequestError> {
        self.say_in(talk.chat, talk.reply_to, text).await
    }

    fn limits(&self, group: bool) -> crate::relay::RelayLimits {
        if group {
            self.config.group_limits.clone()
        } else {
            self.config.limits.clone()
        }
    }
}

//! The Telegram front-end: every text message in a private chat is a turn in
//! the user's current conversation, answered by a chat job whose tokens are
//! shown as live edits of one message (through [`crate::relay`]).
//!
//! natter runs its own long-polling loop over teloxide's Bot API client rather
//! than teloxide's dispatcher: each update becomes a task of ours, so a slow
//! answer never holds up other users, and shutdown is one `select!`.

use crate::client::{ChatUpdate, JobClient};
use crate::fleet::Fleet;
use crate::relay::{Mode, Relay, RelayLimits, Sink, SinkError};
use crate::store::{Store, UserId};
use futures::StreamExt;
use natter_shared::proto::{ChatInput, ChatMessage, Job, JobInput, JobKind, Origin, Role, SamplingParams};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use teloxide::payloads::{EditMessageTextSetters, GetUpdatesSetters, SendMessageSetters};
use teloxide::prelude::Requester;
use teloxide::types::{ChatAction, ChatId, MessageId, ParseMode, UpdateKind};
use teloxide::{ApiError, Bot, RequestError};

#[derive(Clone)]
pub struct TelegramConfig {
    pub token: String,
    /// The Bot API's base URL; the tests point it at a fake server.
    pub api_url: Option<reqwest::Url>,
    /// How long one getUpdates call waits for news.
    pub poll_timeout: Duration,
    pub limits: RelayLimits,
    /// The catalog's default chat model, used when the fleet serves it.
    pub default_model: Option<String>,
}

/// Leaves the token out, so a logged config never leaks it.
impl std::fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramConfig")
            .field("token", &"<hidden>")
            .field("api_url", &self.api_url.as_ref().map(|u| u.as_str()))
            .field("poll_timeout", &self.poll_timeout)
            .field("limits", &self.limits)
            .field("default_model", &self.default_model)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelegramError {
    #[error("the Telegram Bot API refused the token or cannot be reached: {0}")]
    Connect(RequestError),
}

struct Context {
    bot: Bot,
    client: JobClient,
    fleet: Fleet,
    store: Store,
    limits: RelayLimits,
    default_model: Option<String>,
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
    let fleet = Fleet::new(client.nats().clone());
    let context = Arc::new(Context {
        bot: bot.clone(),
        client,
        fleet,
        store,
        limits: config.limits,
        default_model: config.default_model,
    });
    let mut offset = 0;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let poll = bot.get_updates().offset(offset).timeout(config.poll_timeout.as_secs() as u32);
        let updates = tokio::select! {
            () = &mut shutdown => return Ok(()),
            updates = poll => updates,
        };
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
            if let UpdateKind::Message(message) = update.kind {
                let (Some(from), Some(text)) = (message.from.as_ref(), message.text()) else { continue };
                if !message.chat.is_private() {
                    continue;
                }
                let context = context.clone();
                let (user, chat, text) = (UserId::new("telegram", from.id.0), message.chat.id, text.to_owned());
                tokio::spawn(async move {
                    if let Err(e) = context.answer(user, chat, text).await {
                        tracing::error!("telegram message: {e}");
                    }
                });
            }
        }
    }
}

fn retry_delay(e: &RequestError) -> Duration {
    match e {
        RequestError::RetryAfter(seconds) => seconds.duration(),
        _ => Duration::from_secs(1),
    }
}

impl Context {
    async fn answer(&self, user: UserId, chat: ChatId, text: String) -> anyhow::Result<()> {
        let chat_key = chat.to_string();
        self.store.touch_user(&user).await?;
        if text.trim() == "/new" {
            self.store.new_conversation(&user, &chat_key, None).await?;
            self.bot.send_message(chat, "Started a new conversation.").await?;
            return Ok(());
        }
        if text.trim() == "/start" {
            self.bot.send_message(chat, "Hi! Send me a message and I will answer it.").await?;
            return Ok(());
        }
        let conversation = match self.store.current_conversation(&user, &chat_key).await? {
            Some(conversation) => conversation,
            None => self.store.new_conversation(&user, &chat_key, None).await?,
        };
        self.store.append_message(&user, conversation.id, Role::User, text).await?;
        let settings = self.store.user_settings(&user).await?;
        let mut messages = Vec::new();
        if let Some(system) = settings.system_prompt.clone() {
            messages.push(ChatMessage { role: Role::System, content: system });
        }
        messages.extend(self.store.messages(&user, conversation.id).await?.iter().map(|m| m.to_chat()));
        let defaults = SamplingParams::default();
        let params = SamplingParams {
            temperature: settings.temperature.map_or(defaults.temperature, f64::from),
            max_tokens: settings.max_tokens.unwrap_or(defaults.max_tokens),
            ..defaults
        };
        let origin = Origin {
            frontend: "telegram".into(),
            user: user.to_string(),
            conversation: Some(conversation.id.to_string()),
        };
        let Some(model) = self.model_for(settings.model.as_deref()).await else {
            self.bot.send_message(chat, "No chat model is being served right now; please try again later.").await?;
            return Ok(());
        };
        let job = Job::new(model, origin, JobInput::Chat(ChatInput { messages, params }));
        let updates = self.client.chat_updates(job.id).await?;
        self.client.submit(&job).await?;
        let texts = updates
            .scan(String::new(), |text, update| {
                let shown = match update {
                    ChatUpdate::Delta(delta) => {
                        text.push_str(&delta);
                        Some(text.clone())
                    }
                    ChatUpdate::Restart { .. } => {
                        text.clear();
                        Some(String::new())
                    }
                    ChatUpdate::Done { text: full, .. } => {
                        *text = full;
                        Some(text.clone())
                    }
                    ChatUpdate::Failed { message, .. } => Some(format!("{text}\n\n⚠️ {message}")),
                    ChatUpdate::Cancelled => Some(format!("{text}\n\n(stopped)")),
                    ChatUpdate::Accepted { .. } => None,
                };
                futures::future::ready(Some(shown))
            })
            .filter_map(futures::future::ready);
        let (answers, last) = tee_last(texts);
        let mut relay = Relay::new(ChatSink { bot: self.bot.clone(), chat }, self.limits.clone());
        relay.run(answers).await?;
        let answer = last.lock().map(|t| t.clone()).unwrap_or_default();
        if !answer.trim().is_empty() {
            self.store.append_message(&user, conversation.id, Role::Assistant, answer).await?;
        }
        Ok(())
    }
}

impl Context {
    /// The user's model if the fleet serves it, else the default, else any
    /// served chat model.
    async fn model_for(&self, wanted: Option<&str>) -> Option<String> {
        let served = self.fleet.models(JobKind::Chat).await;
        [wanted, self.default_model.as_deref()]
            .into_iter()
            .flatten()
            .find(|m| served.iter().any(|s| s == m))
            .map(str::to_string)
            .or_else(|| served.into_iter().next())
    }
}

/// Passes a stream on and keeps its last item, for storing the final answer.
fn tee_last(
    texts: impl futures::Stream<Item = String>,
) -> (impl futures::Stream<Item = String>, Arc<std::sync::Mutex<String>>) {
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    let keep = last.clone();
    let stream = texts.inspect(move |text| {
        if let Ok(mut last) = keep.lock() {
            last.clone_from(text);
        }
    });
    (stream, last)
}

/// Telegram's legacy Markdown: models write `*bold*`, `` `code` `` and code
/// fences, which it renders, while MarkdownV2 would refuse nearly every answer
/// over an unescaped `.` or `-`. What it refuses is sent plain by the relay.
#[allow(deprecated)]
const FORMATTED: ParseMode = ParseMode::Markdown;

/// One Telegram chat as the relay's sink.
struct ChatSink {
    bot: Bot,
    chat: ChatId,
}

fn sink_error(e: RequestError) -> SinkError {
    match e {
        RequestError::RetryAfter(seconds) => SinkError::RetryAfter(seconds.duration()),
        RequestError::Api(ApiError::MessageIsTooLong | ApiError::EditedMessageIsTooLong) => SinkError::TooLong,
        RequestError::Api(ApiError::CantParseEntities(reason)) => SinkError::Rejected(reason),
        e => SinkError::Other(e.to_string()),
    }
}

impl Sink for ChatSink {
    type MessageId = MessageId;

    async fn send(&self, text: &str, mode: Mode) -> Result<MessageId, SinkError> {
        let request = self.bot.send_message(self.chat, text);
        let request = match mode {
            Mode::Formatted => request.parse_mode(FORMATTED),
            Mode::Plain => request,
        };
        request.await.map(|m| m.id).map_err(sink_error)
    }

    async fn edit(&self, message: &MessageId, text: &str, mode: Mode) -> Result<(), SinkError> {
        let request = self.bot.edit_message_text(self.chat, *message, text);
        let request = match mode {
            Mode::Formatted => request.parse_mode(FORMATTED),
            Mode::Plain => request,
        };
        match request.await {
            Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => Ok(()),
            Err(e) => Err(sink_error(e)),
        }
    }

    async fn delete(&self, message: &MessageId) -> Result<(), SinkError> {
        self.bot.delete_message(self.chat, *message).await.map(|_| ()).map_err(sink_error)
    }

    async fn typing(&self) -> Result<(), SinkError> {
        self.bot.send_chat_action(self.chat, ChatAction::Typing).await.map(|_| ()).map_err(sink_error)
    }
}

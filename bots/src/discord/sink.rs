//! A Discord reply as the relay's [`Sink`]: channel messages when answering a
//! message, or an interaction's original response and follow-ups when answering
//! a slash command. A chat answer's sink also keeps the job's record in the
//! store up to date with the messages it has sent, so a restarted bot edits
//! those same messages instead of starting over.

use super::ReplyTo;
use crate::chatbot::ReplyRecord;
use crate::relay::{Mode, Sink, SinkError};
use crate::store::{JobRecord, Store};
use serenity::all::{
    Builder, ChannelId, CreateInteractionResponseFollowup, CreateMessage, EditInteractionResponse, EditMessage, Http,
    HttpError, MessageId, MessageReference, ModelError,
};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest a sink waits after a 429 before it tries again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Whether an interaction's deferred ("thinking…") response has been filled
/// in yet: the first message of its reply replaces it, later ones follow it.
#[derive(Clone, Debug, Default)]
pub(super) struct Deferred(Arc<AtomicBool>);

impl Deferred {
    /// `true` the first time only.
    fn take(&self) -> bool {
        !self.0.swap(true, Ordering::SeqCst)
    }

    pub(super) fn filled() -> Self {
        Deferred(Arc::new(AtomicBool::new(true)))
    }
}

pub(super) struct DiscordSink {
    http: Arc<Http>,
    channel: ChannelId,
    reply: ReplyTo,
    /// The interaction's original response among the messages, edited through
    /// its own route.
    original: Mutex<Option<MessageId>>,
    /// Whether a message of the reply has quoted what it answers: only the first does.
    quoted: AtomicBool,
    /// 429s in a row, for the backoff when serenity's rate limiter is off.
    rate_limited: AtomicU32,
    record: Option<ReplyRecord>,
}

impl DiscordSink {
    pub(super) fn new(http: Arc<Http>, channel: ChannelId, reply: ReplyTo) -> Self {
        DiscordSink {
            http,
            channel,
            reply,
            original: Mutex::new(None),
            quoted: AtomicBool::new(false),
            rate_limited: AtomicU32::new(0),
            record: None,
        }
    }

    /// Picks up a reply a previous run started: its first message quoted the
    /// question, or is the interaction's original response.
    pub(super) fn resumed(self, shown: &[MessageId]) -> Self {
        if let Ok(mut original) = self.original.lock() {
            *original = shown.first().copied();
        }
        self.quoted.store(!shown.is_empty(), Ordering::SeqCst);
        self
    }

    /// Keeps `record`'s message list in step with the messages sent.
    pub(super) fn recording(mut self, store: Store, record: JobRecord) -> Self {
        self.record = Some(ReplyRecord::new(store, record));
        self
    }

    async fn update_record(&self, change: impl FnOnce(&mut Vec<String>)) {
        if let Some(record) = &self.record {
            record.update(change).await;
        }
    }

    fn is_original(&self, message: MessageId) -> bool {
        self.original.lock().is_ok_and(|o| *o == Some(message))
    }

    /// Maps a failed call onto what the relay does next. A 429 only gets here
    /// with serenity's rate limiter off (behind a proxy), and serenity keeps
    /// `retry_after` to itself then: the sink backs off 1, 2, 4… s until a
    /// call passes, never calling sooner than Discord allows more than once.
    fn error(&self, e: serenity::Error) -> SinkError {
        match e {
            serenity::Error::Http(HttpError::UnsuccessfulRequest(response)) if response.status_code.as_u16() == 429 => {
                let in_a_row = self.rate_limited.fetch_add(1, Ordering::SeqCst).min(5);
                SinkError::RetryAfter((Duration::from_secs(1) * 2u32.pow(in_a_row)).min(MAX_BACKOFF))
            }
            e => sink_error(e),
        }
    }

    fn passed<T>(&self, result: Result<T, serenity::Error>) -> Result<T, SinkError> {
        match result {
            Ok(value) => {
                self.rate_limited.store(0, Ordering::SeqCst);
                Ok(value)
            }
            Err(e) => Err(self.error(e)),
        }
    }
}

fn sink_error(e: serenity::Error) -> SinkError {
    match e {
        serenity::Error::Model(ModelError::MessageTooLong(_)) => SinkError::TooLong,
        serenity::Error::Http(HttpError::UnsuccessfulRequest(response)) => {
            let status = response.status_code.as_u16();
            let message = response.error.message;
            if status == 400 && message.to_lowercase().contains("length") {
                SinkError::TooLong
            } else if status == 400 {
                SinkError::Rejected(message)
            } else {
                SinkError::Other(format!("{status}: {message}"))
            }
        }
        e => SinkError::Other(e.to_string()),
    }
}

/// Sends a short message as an interaction's next response.
pub(super) async fn interaction_say(
    http: &Http,
    token: &str,
    deferred: &Deferred,
    text: &str,
) -> Result<MessageId, serenity::Error> {
    let message = if deferred.take() {
        EditInteractionResponse::new().content(text).execute(http, token).await?
    } else {
        CreateInteractionResponseFollowup::new().content(text).execute(http, (None, token)).await?
    };
    Ok(message.id)
}

impl Sink for DiscordSink {
    type MessageId = MessageId;

    // Discord renders Markdown in every message and refuses none of it, so
    // formatted and plain texts are sent alike.
    async fn send(&self, text: &str, _mode: Mode) -> Result<MessageId, SinkError> {
        let id = match &self.reply {
            ReplyTo::Channel { reference } => {
                let mut message = CreateMessage::new().content(text);
                if let Some(id) = reference.filter(|_| !self.quoted.swap(true, Ordering::SeqCst)) {
                    message = message.reference_message(MessageReference::from((self.channel, id)));
                }
                self.passed(self.channel.send_message(&self.http, message).await)?.id
            }
            ReplyTo::Interaction { token, deferred } => {
                let id = self.passed(interaction_say(&self.http, token, deferred, text).await)?;
                if let Ok(mut original) = self.original.lock() {
                    original.get_or_insert(id);
                }
                id
            }
        };
        self.update_record(|messages| messages.push(id.to_string())).await;
        Ok(id)
    }

    async fn edit(&self, message: &MessageId, text: &str, _mode: Mode) -> Result<(), SinkError> {
        let result = match &self.reply {
            ReplyTo::Channel { .. } => {
                self.channel.edit_message(&self.http, *message, EditMessage::new().content(text)).await.map(|_| ())
            }
            ReplyTo::Interaction { token, .. } if self.is_original(*message) => {
                EditInteractionResponse::new().content(text).execute(&*self.http, token).await.map(|_| ())
            }
            ReplyTo::Interaction { token, .. } => CreateInteractionResponseFollowup::new()
                .content(text)
                .execute(&*self.http, (Some(*message), token))
                .await
                .map(|_| ()),
        };
        self.passed(result)
    }

    async fn delete(&self, message: &MessageId) -> Result<(), SinkError> {
        let result = match &self.reply {
            ReplyTo::Channel { .. } => self.channel.delete_message(&self.http, *message).await,
            ReplyTo::Interaction { token, .. } if self.is_original(*message) => {
                self.http.delete_original_interaction_response(token).await
            }
            ReplyTo::Interaction { token, .. } => self.http.delete_followup_message(token, *message).await,
        };
        self.passed(result)?;
        let gone = message.to_string();
        self.update_record(|messages| messages.retain(|m| *m != gone)).await;
        Ok(())
    }

    async fn typing(&self) -> Result<(), SinkError> {
        match self.reply {
            ReplyTo::Channel { .. } => self.passed(self.channel.broadcast_typing(&self.http).await),
            // A deferred interaction already shows "thinking…".
            ReplyTo::Interaction { .. } => Ok(()),
        }
    }
}

//! One Telegram chat as the relay's [`Sink`]. A chat answer's sink also keeps
//! the job's record in the store up to date with the messages it has sent, so a
//! restarted bot edits those same messages instead of starting over.

use crate::chatbot::ReplyRecord;
use crate::relay::{Mode, Sink, SinkError};
use crate::store::{JobRecord, Store};
use teloxide::payloads::{EditMessageTextSetters, SendMessageSetters};
use teloxide::prelude::Requester;
use teloxide::types::{ChatAction, ChatId, MessageId, ParseMode, ReplyParameters};
use teloxide::{ApiError, Bot, RequestError};

/// Telegram's legacy Markdown: models write `*bold*`, `` `code` `` and code
/// fences, which it renders, while MarkdownV2 would refuse nearly every answer
/// over an unescaped `.` or `-`. What it refuses is sent plain by the relay.
#[allow(deprecated)]
const FORMATTED: ParseMode = ParseMode::Markdown;

pub(super) struct ChatSink {
    bot: Bot,
    chat: ChatId,
    /// The message the first part of the reply quotes (in groups).
    reply_to: Option<MessageId>,
    record: Option<ReplyRecord>,
}

impl ChatSink {
    pub(super) fn new(bot: Bot, chat: ChatId, reply_to: Option<MessageId>) -> Self {
        ChatSink { bot, chat, reply_to, record: None }
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
        let mut request = self.bot.send_message(self.chat, text);
        if let Some(id) = self.reply_to {
            request = request.reply_parameters(ReplyParameters::new(id).allow_sending_without_reply());
        }
        if mode == Mode::Formatted {
            request = request.parse_mode(FORMATTED);
        }
        let id = request.await.map(|m| m.id).map_err(sink_error)?;
        self.update_record(|messages| messages.push(id.0.to_string())).await;
        Ok(id)
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
        self.bot.delete_message(self.chat, *message).await.map(|_| ()).map_err(sink_error)?;
        let gone = message.0.to_string();
        self.update_record(|messages| messages.retain(|m| *m != gone)).await;
        Ok(())
    }

    async fn typing(&self) -> Result<(), SinkError> {
        self.bot.send_chat_action(self.chat, ChatAction::Typing).await.map(|_| ()).map_err(sink_error)
    }
}

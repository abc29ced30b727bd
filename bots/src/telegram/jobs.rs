//! Running jobs for Telegram users on the shared [`crate::chatbot::Assistant`]:
//! chat turns streamed through the relay, and finishing replies that a
//! restart cut off.

use super::sink::ChatSink;
use super::{Context, Talk};
use crate::chatbot::Slot;
use crate::relay::Relay;
use crate::store::JobRecord;
use natter_shared::proto::JobKind;
use std::sync::Arc;
use teloxide::types::{ChatId, MessageId};

impl Context {
    /// Takes the user's job slot and counts the job against their daily quota,
    /// or tells them why not.
    pub(super) async fn begin_job(&self, talk: &Talk) -> anyhow::Result<Option<Slot>> {
        match self.assistant.begin_job(&talk.user, talk.admin).await? {
            Ok(slot) => Ok(Some(slot)),
            Err(refusal) => {
                self.say(talk, &refusal).await?;
                Ok(None)
            }
        }
    }

    /// Finishes the replies a previous run of the bot was streaming when it
    /// stopped: the events stream still holds each job's events from the first.
    pub(super) async fn resume_pending(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>) {
        for record in self.assistant.pending_replies().await {
            let context = self.clone();
            tasks.spawn(async move {
                let job = record.job;
                if let Err(e) = context.resume(record).await {
                    tracing::error!(%job, "resuming a reply failed: {e:#}");
                }
            });
        }
    }

    async fn resume(self: Arc<Self>, record: JobRecord) -> anyhow::Result<()> {
        tracing::info!(job = %record.job, messages = record.messages.len(), "resuming a reply");
        let chat = ChatId(record.chat.parse()?);
        let shown: Vec<MessageId> = record.messages.iter().filter_map(|m| m.parse().ok()).map(MessageId).collect();
        let _slot = self.assistant.claim_slot(&record.user, Some(record.job));
        let updates = self.assistant.client.chat_updates(record.job).await?;
        let sink = ChatSink::new(self.bot.clone(), chat, None).recording(self.assistant.store.clone(), record.clone());
        // Group and channel ids are negative, private chats positive.
        let mut relay = Relay::resume(sink, self.limits(chat.0 < 0), shown);
        self.assistant.stream_answer(&mut relay, &record, None, updates).await?;
        Ok(())
    }
}

/// Answers one text message in `conversation`, or the user's current one here.
pub(super) async fn chat_turn(
    context: &Context,
    talk: &Talk,
    conversation: Option<u64>,
    text: String,
) -> anyhow::Result<()> {
    let Some(slot) = context.begin_job(talk).await? else { return Ok(()) };
    let assistant = &context.assistant;
    let turn = match assistant.chat_turn(&talk.user, &talk.chat_key(), conversation, text).await? {
        Ok(turn) => turn,
        Err(refusal) => {
            context.say(talk, &refusal).await?;
            return Ok(());
        }
    };
    let updates = match assistant.submit_chat(&turn).await? {
        Ok(updates) => updates,
        Err(refusal) => {
            context.say(talk, &refusal).await?;
            return Ok(());
        }
    };
    slot.holds(turn.job.id);
    let sink = ChatSink::new(context.bot.clone(), talk.chat, talk.reply_to)
        .recording(assistant.store.clone(), turn.record.clone());
    let mut relay = Relay::new(sink, context.limits(talk.group));
    assistant.stream_answer(&mut relay, &turn.record, Some((JobKind::Chat, turn.model)), updates).await?;
    Ok(())
}

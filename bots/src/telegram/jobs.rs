//! Running jobs for Telegram users: one in flight per user, the daily quota,
//! the model choice, a "queued" notice while the fleet is busy, chat turns
//! streamed through the relay, and finishing replies that a restart cut off.

use super::sink::ChatSink;
use super::{Context, Talk};
use crate::client::{ChatUpdate, JobClient};
use crate::relay::Relay;
use crate::store::{JobRecord, Settings, UserId};
use futures::{Stream, StreamExt};
use natter_shared::proto::{ChatInput, ChatMessage, Job, JobInput, JobKind, Origin, Role, SamplingParams};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use teloxide::types::{ChatId, MessageId};
use time::OffsetDateTime;
use uuid::Uuid;

/// How long a job may wait for a worker before the user is told it is queued.
const QUEUED_NOTICE_AFTER: Duration = Duration::from_millis(1500);
/// The history sent with a chat turn, in characters: the worker trims it to the
/// model's window in tokens; this only keeps job messages small.
const HISTORY_CHARS: usize = 24_000;

/// A user's one job slot, given back when dropped.
pub(super) struct Slot {
    running: Arc<Mutex<HashMap<UserId, Option<Uuid>>>>,
    user: UserId,
}

impl Slot {
    /// Names the job, so `/stop` can cancel it.
    pub(super) fn holds(&self, job: Uuid) {
        if let Ok(mut running) = self.running.lock() {
            running.insert(self.user.clone(), Some(job));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.user);
        }
    }
}

impl Context {
    /// Takes the user's job slot and counts the job against their daily quota,
    /// or tells them why not.
    pub(super) async fn begin_job(&self, talk: &Talk) -> anyhow::Result<Option<Slot>> {
        let Some(slot) = self.take_slot(&talk.user, None) else {
            self.say(talk, "⏳ I'm still working on your previous request. Send /stop to cancel it.").await?;
            return Ok(None);
        };
        if let Some(quota) = self.config.daily_quota.filter(|_| !talk.admin) {
            let today = OffsetDateTime::now_utc().date();
            if self.store.jobs_on(&talk.user, today).await? >= quota {
                let message =
                    format!("You have used your {quota} requests for today. The quota starts again at midnight UTC.");
                self.say(talk, &message).await?;
                return Ok(None);
            }
        }
        self.store.count_job_today(&talk.user).await?;
        Ok(Some(slot))
    }

    fn take_slot(&self, user: &UserId, job: Option<Uuid>) -> Option<Slot> {
        let mut running = self.running.lock().ok()?;
        if running.contains_key(user) {
            return None;
        }
        running.insert(user.clone(), job);
        Some(Slot { running: self.running.clone(), user: user.clone() })
    }

    /// The job the user has running, if it has been submitted.
    pub(super) fn running_job(&self, user: &UserId) -> Option<Uuid> {
        self.running.lock().ok()?.get(user).copied().flatten()
    }

    /// `wanted` if the fleet serves it for `kind`, else the catalog's default,
    /// else any model the fleet serves for it.
    pub(super) async fn model_for(&self, kind: JobKind, wanted: Option<&str>) -> Option<String> {
        let served = self.fleet.models(kind).await;
        wanted
            .into_iter()
            .chain(self.config.default_models.iter().map(String::as_str))
            .find(|m| served.iter().any(|s| s == m))
            .map(str::to_string)
            .or_else(|| served.into_iter().next())
    }

    /// Finishes the replies a previous run of the bot was streaming when it
    /// stopped: the events stream still holds each job's events from the first.
    pub(super) async fn resume_pending(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>) {
        let records = match self.store.pending_jobs().await {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("cannot read the replies to resume: {e}");
                return;
            }
        };
        for record in records {
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
        let _slot = self.take_slot(&record.user, Some(record.job));
        let updates = self.client.chat_updates(record.job).await?;
        let sink = ChatSink::new(self.bot.clone(), chat, None).recording(self.store.clone(), record.clone());
        // Group and channel ids are negative, private chats positive.
        let relay = Relay::resume(sink, self.limits(chat.0 < 0), shown);
        self.stream_answer(relay, &record, None, updates).await
    }

    /// Shows a chat job's answer as it streams, then keeps it in the conversation.
    async fn stream_answer(
        &self,
        mut relay: Relay<ChatSink>,
        record: &JobRecord,
        queue: Option<(JobKind, String)>,
        updates: impl Stream<Item = ChatUpdate> + Send + 'static,
    ) -> anyhow::Result<()> {
        let answer = Arc::new(Mutex::new(String::new()));
        let shown = chat_texts(updates, answer.clone(), self);
        let shown = follow(self.client.clone(), queue, self.config.job_timeout, shown);
        if let Err(e) = relay.run(shown).await {
            tracing::warn!(job = %record.job, "the reply could not be shown in full: {e}");
        }
        let answer = answer.lock().map(|a| a.clone()).unwrap_or_default();
        if let Some(conversation) = record.conversation.filter(|_| !answer.trim().is_empty()) {
            self.store.append_message(&record.user, conversation, Role::Assistant, answer).await?;
        }
        self.store.finish_job(record.job).await?;
        Ok(())
    }
}

/// Answers one text message in the user's current conversation.
pub(super) async fn chat_turn(context: &Context, talk: &Talk, text: String) -> anyhow::Result<()> {
    let Some(slot) = context.begin_job(talk).await? else { return Ok(()) };
    let settings = context.store.user_settings(&talk.user).await?;
    let Some(model) = context.model_for(JobKind::Chat, settings.model.as_deref()).await else {
        context.say(talk, "No chat model is being served right now; please try again later.").await?;
        return Ok(());
    };
    let chat_key = talk.chat_key();
    let conversation = match context.store.current_conversation(&talk.user, &chat_key).await? {
        Some(conversation) => conversation,
        None => context.store.new_conversation(&talk.user, &chat_key, None).await?,
    };
    context.store.append_message(&talk.user, conversation.id, Role::User, text).await?;
    let history = context.store.messages(&talk.user, conversation.id).await?;
    let messages = prompt(&settings, history.iter().map(|m| m.to_chat()).collect());
    let origin = Origin {
        frontend: "telegram".into(),
        user: talk.user.to_string(),
        conversation: Some(conversation.id.to_string()),
    };
    let job = Job::new(model.clone(), origin, JobInput::Chat(ChatInput { messages, params: params(&settings) }));
    let record = JobRecord {
        job: job.id,
        user: talk.user.clone(),
        chat: chat_key,
        messages: Vec::new(),
        conversation: Some(conversation.id),
        started: OffsetDateTime::now_utc(),
    };
    context.store.record_job(record.clone()).await?;
    let updates = context.client.chat_updates(job.id).await?;
    if let Err(e) = context.client.submit(&job).await {
        context.store.finish_job(job.id).await?;
        context.say(talk, &format!("⚠️ {e}")).await?;
        return Ok(());
    }
    slot.holds(job.id);
    let sink =
        ChatSink::new(context.bot.clone(), talk.chat, talk.reply_to).recording(context.store.clone(), record.clone());
    let relay = Relay::new(sink, context.limits(talk.group));
    context.stream_answer(relay, &record, Some((JobKind::Chat, model)), updates).await
}

/// The messages a chat job gets: the system prompt, then as much of the
/// conversation's end as fits [`HISTORY_CHARS`] (always the latest message).
fn prompt(settings: &Settings, history: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut budget = HISTORY_CHARS;
    let mut kept: Vec<ChatMessage> = history
        .into_iter()
        .rev()
        .enumerate()
        .take_while(|(i, m)| {
            let size = m.content.chars().count();
            let fits = *i == 0 || size <= budget;
            budget = budget.saturating_sub(size);
            fits
        })
        .map(|(_, m)| m)
        .collect();
    kept.reverse();
    match settings.system_prompt.clone() {
        Some(system) => std::iter::once(ChatMessage { role: Role::System, content: system }).chain(kept).collect(),
        None => kept,
    }
}

fn params(settings: &Settings) -> SamplingParams {
    let defaults = SamplingParams::default();
    SamplingParams {
        temperature: settings.temperature.map_or(defaults.temperature, f64::from),
        max_tokens: settings.max_tokens.unwrap_or(defaults.max_tokens),
        ..defaults
    }
}

/// A chat job's updates as the text to show (`None` for news without text),
/// keeping the answer itself (without failure notes) in `answer`.
fn chat_texts(
    updates: impl Stream<Item = ChatUpdate> + Send + 'static,
    answer: Arc<Mutex<String>>,
    context: &Context,
) -> impl Stream<Item = Option<String>> + Send + 'static {
    let tokens = context.tokens.clone();
    updates.map(move |update| {
        let Ok(mut text) = answer.lock() else { return None };
        match update {
            ChatUpdate::Accepted { .. } => None,
            ChatUpdate::Delta(delta) => {
                text.push_str(&delta);
                Some(text.clone())
            }
            ChatUpdate::Restart { .. } => {
                text.clear();
                Some(String::new())
            }
            ChatUpdate::Done { text: full, metrics, .. } => {
                tokens.fetch_add(u64::from(metrics.completion_tokens), Ordering::Relaxed);
                *text = full;
                Some(text.clone())
            }
            ChatUpdate::Failed { message, .. } => Some(with_note(&text, &format!("⚠️ {message}"))),
            ChatUpdate::Cancelled => Some(with_note(&text, "(stopped)")),
        }
    })
}

pub(super) fn with_note(text: &str, note: &str) -> String {
    if text.trim().is_empty() {
        note.to_string()
    } else {
        format!("{text}\n\n{note}")
    }
}

/// Turns a job's texts (`None` for news without text) into what the relay
/// shows: a "queued" notice with the position when no worker has taken the
/// job after a moment, and a closing note when the job goes silent for `idle`.
pub(super) fn follow(
    client: JobClient,
    queue: Option<(JobKind, String)>,
    idle: Duration,
    texts: impl Stream<Item = Option<String>> + Send + 'static,
) -> impl Stream<Item = String> + Send + 'static {
    let notice_at = queue.as_ref().map(|_| tokio::time::Instant::now() + QUEUED_NOTICE_AFTER);
    let state = (Box::pin(texts), notice_at, String::new(), false);
    futures::stream::unfold(state, move |(mut texts, mut notice_at, mut last, ended)| {
        let (client, queue) = (client.clone(), queue.clone());
        async move {
            if ended {
                return None;
            }
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(idle, texts.next()) => next,
                    () = tokio::time::sleep_until(notice_at.unwrap_or_else(tokio::time::Instant::now)), if notice_at.is_some() => {
                        notice_at = None;
                        let Some((kind, model)) = &queue else { continue };
                        match client.queue_position(*kind, model).await {
                            Some(position) if position > 0 => {
                                let notice = format!("⏳ Queued: position {position} for {model}. I'll answer as soon as a worker is free.");
                                return Some((notice, (texts, notice_at, last, false)));
                            }
                            _ => continue,
                        }
                    }
                };
                match next {
                    Err(_) => {
                        let note = format!("⚠️ No news from the job for {} s; giving up on it.", idle.as_secs());
                        return Some((with_note(&last, &note), (texts, None, last, true)));
                    }
                    Ok(None) => return None,
                    Ok(Some(news)) => {
                        notice_at = None;
                        if let Some(text) = news {
                            last.clone_from(&text);
                            return Some((text, (texts, notice_at, last, false)));
                        }
                    }
                }
            }
        }
    })
}

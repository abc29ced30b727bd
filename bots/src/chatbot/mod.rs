//! What the chat bots (Telegram, Discord) share beneath their platforms: one
//! job in flight per user, the daily quota, the model choice, chat turns built
//! from the stored conversation, and a job's events turned into the texts a
//! streamed reply shows. Each bot adds only how its platform receives messages
//! and shows replies ([`crate::relay::Sink`]).

mod replies;
mod texts;

pub use replies::{describe_settings, export_markdown, ner_reply, stats_reply, Export, SettingChange};
use texts::{asr_texts, chat_texts, follow, ocr_texts};

use crate::client::{ChatUpdate, ClientError, JobClient};
use crate::fleet::Fleet;
use crate::relay::{Relay, Sink};
use crate::store::{JobRecord, Settings, Store, StoreError, UserId};
use futures::Stream;
use natter_shared::proto::{
    AsrInput, AsrTask, Blob, ChatInput, ChatMessage, Job, JobInput, JobKind, OcrInput, Origin, Role, SamplingParams,
};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;

/// The history sent with a chat turn, in characters: the worker trims it to the
/// model's window in tokens; this only keeps job messages small.
const HISTORY_CHARS: usize = 24_000;

/// The state one bot's tasks share, whatever its platform.
pub struct Assistant {
    /// The front-end's name in job origins and user ids ("telegram", "discord").
    pub frontend: &'static str,
    pub client: JobClient,
    pub fleet: Fleet,
    pub store: Store,
    /// The catalog's default model of each kind, used when the fleet serves it.
    pub default_models: Vec<String>,
    /// Jobs a user may start per day (UTC); admins are exempt.
    pub daily_quota: Option<u64>,
    /// How long a job may go without news before its reply gives up on it.
    pub job_timeout: Duration,
    /// Each user's job in flight (`None` while it is being prepared).
    running: Arc<Mutex<HashMap<UserId, Option<Uuid>>>>,
    /// Tokens generated for answers since the bot started, for `/stats`.
    pub tokens: Arc<AtomicU64>,
}

/// A user's one job slot, given back when dropped.
pub struct Slot {
    running: Arc<Mutex<HashMap<UserId, Option<Uuid>>>>,
    user: UserId,
}

impl Slot {
    /// Names the job, so `/stop` can cancel it.
    pub fn holds(&self, job: Uuid) {
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

/// A reply's job record kept in step with the platform messages that show it,
/// so a restarted bot edits those same messages instead of starting over.
pub struct ReplyRecord {
    store: Store,
    record: Mutex<JobRecord>,
}

impl ReplyRecord {
    pub fn new(store: Store, record: JobRecord) -> Self {
        ReplyRecord { store, record: Mutex::new(record) }
    }

    /// Changes the record's message ids and stores it; a failure is logged,
    /// the reply goes on.
    pub async fn update(&self, change: impl FnOnce(&mut Vec<String>)) {
        let snapshot = {
            let Ok(mut record) = self.record.lock() else { return };
            change(&mut record.messages);
            record.clone()
        };
        if let Err(e) = self.store.record_job(snapshot).await {
            tracing::warn!("could not record the reply's messages: {e}");
        }
    }
}

/// A chat job ready to submit, and where its reply is recorded.
pub struct ChatTurn {
    pub job: Job,
    pub record: JobRecord,
    pub model: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AssistantError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl Assistant {
    pub fn new(
        frontend: &'static str,
        client: JobClient,
        store: Store,
        default_models: Vec<String>,
        daily_quota: Option<u64>,
        job_timeout: Duration,
    ) -> Self {
        Assistant {
            frontend,
            fleet: Fleet::new(client.nats().clone()),
            client,
            store,
            default_models,
            daily_quota,
            job_timeout,
            running: Arc::default(),
            tokens: Arc::default(),
        }
    }

    pub fn user_id(&self, id: impl std::fmt::Display) -> UserId {
        UserId::new(self.frontend, id)
    }

    pub fn origin(&self, user: &UserId, conversation: Option<u64>) -> Origin {
        Origin {
            frontend: self.frontend.into(),
            user: user.to_string(),
            conversation: conversation.map(|c| c.to_string()),
        }
    }

    /// Takes the user's job slot and counts the job against their daily quota;
    /// `Err` carries what to tell the user instead.
    pub async fn begin_job(&self, user: &UserId, admin: bool) -> Result<Result<Slot, String>, StoreError> {
        let Some(slot) = self.claim_slot(user, None) else {
            return Ok(Err("⏳ I'm still working on your previous request. Send /stop to cancel it.".into()));
        };
        if let Some(quota) = self.daily_quota.filter(|_| !admin) {
            let today = OffsetDateTime::now_utc().date();
            if self.store.jobs_on(user, today).await? >= quota {
                return Ok(Err(format!(
                    "You have used your {quota} requests for today. The quota starts again at midnight UTC."
                )));
            }
        }
        self.store.count_job_today(user).await?;
        Ok(Ok(slot))
    }

    /// The user's slot, unless a job of theirs already holds it.
    pub fn claim_slot(&self, user: &UserId, job: Option<Uuid>) -> Option<Slot> {
        let mut running = self.running.lock().ok()?;
        if running.contains_key(user) {
            return None;
        }
        running.insert(user.clone(), job);
        Some(Slot { running: self.running.clone(), user: user.clone() })
    }

    /// The job the user has running, if it has been submitted.
    pub fn running_job(&self, user: &UserId) -> Option<Uuid> {
        self.running.lock().ok()?.get(user).copied().flatten()
    }

    /// `wanted` if the fleet serves it for `kind`, else the catalog's default,
    /// else any model the fleet serves for it.
    pub async fn model_for(&self, kind: JobKind, wanted: Option<&str>) -> Option<String> {
        let served = self.fleet.models(kind).await;
        wanted
            .into_iter()
            .chain(self.default_models.iter().map(String::as_str))
            .find(|m| served.iter().any(|s| s == m))
            .map(str::to_string)
            .or_else(|| served.into_iter().next())
    }

    /// This bot's replies that a previous run was streaming when it stopped,
    /// oldest first.
    pub async fn pending_replies(&self) -> Vec<JobRecord> {
        match self.store.pending_jobs().await {
            Ok(records) => records.into_iter().filter(|r| r.user.platform() == self.frontend).collect(),
            Err(e) => {
                tracing::error!("cannot read the replies to resume: {e}");
                Vec::new()
            }
        }
    }

    /// What a file job needs before it is submitted: the user's slot, a served
    /// model of `kind`, and the file (from `download`) in the blob store. `Err`
    /// carries what to tell the user.
    pub async fn prepare_file(
        &self,
        user: &UserId,
        admin: bool,
        kind: JobKind,
        mime: &str,
        download: impl std::future::Future<Output = Result<Vec<u8>, String>>,
    ) -> Result<Result<(Slot, String, Blob), String>, AssistantError> {
        let slot = match self.begin_job(user, admin).await? {
            Ok(slot) => slot,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let Some(model) = self.model_for(kind, None).await else {
            let what = if kind == JobKind::Ocr { "OCR" } else { "speech-to-text" };
            return Ok(Err(format!("No {what} model is being served right now; please try again later.")));
        };
        let bytes = match download.await {
            Ok(bytes) => bytes,
            Err(reason) => return Ok(Err(reason)),
        };
        Ok(Ok((slot, model, self.client.put_blob(bytes, mime).await?)))
    }

    /// Submits an OCR job on `image`; its texts show the lines as they are read.
    pub async fn read_image(
        &self,
        slot: &Slot,
        user: &UserId,
        model: &str,
        image: Blob,
    ) -> Result<impl Stream<Item = Option<String>> + Send + 'static, ClientError> {
        let job = Job::new(model.to_string(), self.origin(user, None), JobInput::Ocr(OcrInput { image }));
        let updates = self.client.ocr_updates(job.id).await?;
        self.client.submit(&job).await?;
        slot.holds(job.id);
        Ok(ocr_texts(updates))
    }

    /// Submits a speech-to-text job on `audio`; its texts show the segments as
    /// they are heard, and the final transcript is also left in `transcript`.
    pub async fn transcribe(
        &self,
        slot: &Slot,
        user: &UserId,
        model: &str,
        audio: Blob,
        transcript: Arc<Mutex<Option<String>>>,
    ) -> Result<impl Stream<Item = Option<String>> + Send + 'static, ClientError> {
        let input = AsrInput { audio, language: None, task: AsrTask::Transcribe };
        let job = Job::new(model.to_string(), self.origin(user, None), JobInput::Asr(input));
        let updates = self.client.asr_updates(job.id).await?;
        self.client.submit(&job).await?;
        slot.holds(job.id);
        Ok(asr_texts(updates, transcript))
    }

    /// Chooses a served model as the user's; the reply says how it went.
    pub async fn set_model(&self, user: &UserId, model: &str) -> Result<String, StoreError> {
        let served = self.fleet.models(JobKind::Chat).await;
        if !served.iter().any(|m| m == model) {
            return Ok(format!("{model} is not being served. Use /model to see the models that are."));
        }
        let settings = self.store.user_settings(user).await?;
        self.store.set_settings(user, Settings { model: Some(model.to_string()), ..settings }).await?;
        Ok(format!("Now answering with {model}."))
    }

    /// The user's conversation that the bot's `message` in `chat` answered,
    /// made current there: replying to an answer carries its conversation on.
    /// `None` for a message that answered someone else, or nothing known.
    pub async fn conversation_answered_by(
        &self,
        user: &UserId,
        chat: &str,
        message: &str,
    ) -> Result<Option<u64>, StoreError> {
        let Some(conversation) = self.store.answered_conversation(user, chat, message).await? else {
            return Ok(None);
        };
        self.store.switch_conversation(user, chat, conversation.id).await?;
        Ok(Some(conversation.id))
    }

    /// Adds `text` to a conversation of the user's in `chat` (`conversation`,
    /// else the current one, else a new one) and builds the job that answers
    /// it, recorded so a restart can finish its reply. `Err` carries what to
    /// tell the user.
    pub async fn chat_turn(
        &self,
        user: &UserId,
        chat: &str,
        conversation: Option<u64>,
        text: String,
    ) -> Result<Result<ChatTurn, String>, StoreError> {
        let settings = self.store.user_settings(user).await?;
        let Some(model) = self.model_for(JobKind::Chat, settings.model.as_deref()).await else {
            return Ok(Err("No chat model is being served right now; please try again later.".into()));
        };
        let conversation = match conversation {
            Some(id) => id,
            None => match self.store.current_conversation(user, chat).await? {
                Some(conversation) => conversation.id,
                None => self.store.new_conversation(user, chat, None).await?.id,
            },
        };
        self.store.append_message(user, conversation, Role::User, text).await?;
        let history = self.store.messages(user, conversation).await?;
        let messages = prompt(&settings, history.iter().map(|m| m.to_chat()).collect());
        let input = JobInput::Chat(ChatInput { messages, params: params(&settings) });
        let job = Job::new(model.clone(), self.origin(user, Some(conversation)), input);
        let record = JobRecord {
            job: job.id,
            user: user.clone(),
            chat: chat.to_string(),
            messages: Vec::new(),
            conversation: Some(conversation),
            reply_via: None,
            started: OffsetDateTime::now_utc(),
        };
        self.store.record_job(record.clone()).await?;
        Ok(Ok(ChatTurn { job, record, model }))
    }

    /// Submits a chat turn and follows its events (subscribed before the job
    /// exists, so no event is missed); `Err` carries what to tell the user.
    pub async fn submit_chat(
        &self,
        turn: &ChatTurn,
    ) -> Result<Result<impl Stream<Item = ChatUpdate> + Send + 'static, String>, AssistantError> {
        let updates = self.client.chat_updates(turn.job.id).await?;
        if let Err(e) = self.client.submit(&turn.job).await {
            self.store.finish_job(turn.job.id).await?;
            return Ok(Err(format!("⚠️ {e}")));
        }
        Ok(Ok(updates))
    }

    /// Shows a chat job's answer through `relay` as it streams, then keeps it in
    /// the conversation and forgets the job's record.
    pub async fn stream_answer<S: Sink>(
        &self,
        relay: &mut Relay<S>,
        record: &JobRecord,
        queue: Option<(JobKind, String)>,
        updates: impl Stream<Item = ChatUpdate> + Send + 'static,
    ) -> Result<(), StoreError> {
        let answer = Arc::new(Mutex::new(String::new()));
        let shown = chat_texts(updates, answer.clone(), self.tokens.clone());
        let shown = follow(self.client.clone(), queue, self.job_timeout, shown);
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

    /// Shows a file job's texts (OCR lines, transcript segments) through
    /// `relay` as one streamed reply, with the queued notice and idle timeout.
    pub async fn show_file_job<S: Sink>(
        &self,
        mut relay: Relay<S>,
        kind: JobKind,
        model: String,
        texts: impl Stream<Item = Option<String>> + Send + 'static,
    ) -> Result<(), crate::relay::RelayError> {
        relay.run(follow(self.client.clone(), Some((kind, model)), self.job_timeout, texts)).await.map(drop)
    }
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

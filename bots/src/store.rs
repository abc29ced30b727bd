//! The bots' conversation store: users, their settings, their conversations and
//! messages, the job-to-message map that lets a reply resume after a restart, and
//! daily job counters for quotas, in one redb file.
//!
//! redb is blocking, so the database lives on a thread of its own and [`Store`]
//! is a cheap, cloneable async handle that sends it closures over a bounded
//! channel (back-pressure instead of an unbounded queue) and awaits the answer on
//! a oneshot. Each closure runs in one redb transaction, so every method is atomic.
//!
//! Privacy is enforced here rather than in each bot: every method that reads or
//! changes a conversation takes the requesting [`UserId`] and answers
//! [`StoreError::NoSuchConversation`] when the conversation is someone else's,
//! the same answer as for one that does not exist, so ids cannot be probed.

use natter_shared::proto::{ChatMessage, Role};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use time::{Date, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// User id → [`User`].
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// User id → [`Settings`].
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
/// Conversation id → [`Conversation`].
const CONVERSATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("conversations");
/// (user, conversation id) → (): lists a user's conversations without a scan.
const USER_CONVERSATIONS: TableDefinition<(&str, u64), ()> = TableDefinition::new("user_conversations");
/// (conversation id, sequence number) → [`Message`]; the key keeps them in order.
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
/// (user, chat) → the conversation that chat's new messages go to.
const CURRENT: TableDefinition<(&str, &str), u64> = TableDefinition::new("current_conversation");
/// Job id → [`JobRecord`] while its reply is being delivered.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// (user, Julian day) → jobs submitted that day.
const DAILY_JOBS: TableDefinition<(&str, i32), u64> = TableDefinition::new("daily_jobs");
/// (chat, platform message id) → the conversation a finished answer in that
/// message belongs to, so replying to it continues that conversation.
const ANSWERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("answers");
/// Counters such as the next conversation id.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const NEXT_CONVERSATION: &str = "next_conversation";
/// Requests waiting for the database thread before senders wait their turn.
const QUEUE: usize = 64;
/// Titles taken from a conversation's first message are cut to this many characters.
const TITLE_CHARS: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Boxed: redb's error is large, and every result of the store carries it.
    #[error("the bots' database failed: {0}")]
    Database(Box<redb::Error>),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// Also the answer for another user's conversation, so ids cannot be probed.
    #[error("conversation {0} does not exist or is not yours")]
    NoSuchConversation(u64),
    #[error("job {0} belongs to another user")]
    JobNotYours(Uuid),
    #[error("the store is closed")]
    Closed,
    #[error("cannot create the store's folder {}: {source}", path.display())]
    Folder { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot start the store's thread: {0}")]
    Thread(std::io::Error),
}

/// Each redb operation has its own error type; all of them fold into [`redb::Error`].
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A user on one platform: `telegram:123`, `discord:456`. The platform prefix
/// keeps numeric ids of different platforms apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserId(String);

impl UserId {
    pub fn new(platform: &str, id: impl fmt::Display) -> Self {
        UserId(format!("{platform}:{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The platform part: `telegram` of `telegram:123`.
    pub fn platform(&self) -> &str {
        self.0.split_once(':').map_or("", |(platform, _)| platform)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    #[serde(with = "time::serde::timestamp::milliseconds_i64")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::timestamp::milliseconds_i64")]
    pub last_seen: OffsetDateTime,
}

/// A user's choices; `None` means the bot's default, so defaults can change later
/// without rewriting stored settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Only transcribe voice notes; by default their transcript is also
    /// answered as a chat message.
    pub voice_transcript_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: u64,
    pub user: UserId,
    /// The chat (private chat, group, channel) it was started in: a group's
    /// `/list` shows only the conversations started there, never private ones.
    pub chat: String,
    /// Empty until given, or taken from the first user message.
    pub title: String,
    #[serde(with = "time::serde::timestamp::milliseconds_i64")]
    pub created: OffsetDateTime,
    #[serde(with = "time::serde::timestamp::milliseconds_i64")]
    pub updated: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(with = "time::serde::timestamp::milliseconds_i64")]
    pub at: OffsetDateTime,
}

impl Message {
    /// The form a chat job takes its history in.
    pub fn to_chat(&self) -> ChatMessage {
        ChatMessage { role: self.role, content: self.content.clone() }
    }
}

/// Where a job's reply is being shown, kept until the reply is complete so a
/// restarted bot can stream the rest of it into the same platform messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: Uuid,
    pub user: UserId,
    pub chat: String,
    /// Platform message ids holding the reply so far, in order.
    pub messages: Vec<String>,
    /// The conversation the answer is appended to once complete.
    pub conversation: Option<u64>,
    /// How the platform reaches the reply besides the chat, e.g. the Discord
    /// interaction token its messages are edited through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_via: Option<String>,
    #[serde(with = "time::serde::timestamp::milliseconds_i64")]
    pub started: OffsetDateTime,
}

type Request = Box<dyn FnOnce(&Database) + Send>;

enum Command {
    Run(Request),
    Close(oneshot::Sender<()>),
}

/// Async handle on the database thread; clones share it.
#[derive(Clone)]
pub struct Store {
    requests: mpsc::Sender<Command>,
}

impl Store {
    /// Opens (or creates) the database file and starts its thread. One process
    /// at a time: redb locks the file.
    pub async fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let (requests, mut queue) = mpsc::channel::<Command>(QUEUE);
        let (opened_tx, opened) = oneshot::channel();
        std::thread::Builder::new()
            .name("natter-store".into())
            .spawn(move || {
                let db = match open_db(&path) {
                    Ok(db) => {
                        let _ = opened_tx.send(Ok(()));
                        db
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(command) = queue.blocking_recv() {
                    match command {
                        Command::Run(request) => request(&db),
                        Command::Close(done) => {
                            drop(db);
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
            .map_err(StoreError::Thread)?;
        opened.await.map_err(|_| StoreError::Closed)??;
        Ok(Store { requests })
    }

    /// Closes the database file once the requests already queued are done, so it
    /// can be opened again; every clone's later calls answer [`StoreError::Closed`].
    pub async fn close(self) {
        let (done, closed) = oneshot::channel();
        if self.requests.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request: Request = Box::new(move |db| {
            let _ = reply.send(f(db));
        });
        self.requests.send(Command::Run(request)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records that the user was seen now; returns them with their first sighting.
    pub async fn touch_user(&self, user: &UserId) -> Result<User, StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_write()?;
            let record = {
                let mut users = tx.open_table(USERS)?;
                let now = now();
                let record = match get_json::<_, User>(&users, user.as_str())? {
                    Some(old) => User { last_seen: now, ..old },
                    None => User { id: user.clone(), first_seen: now, last_seen: now },
                };
                users.insert(user.as_str(), to_json(&record)?.as_slice())?;
                record
            };
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    pub async fn user(&self, user: &UserId) -> Result<Option<User>, StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_read()?;
            get_json(&tx.open_table(USERS)?, user.as_str())
        })
        .await
    }

    /// The user's settings, defaults for a user who has none.
    pub async fn user_settings(&self, user: &UserId) -> Result<Settings, StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_read()?;
            Ok(get_json(&tx.open_table(SETTINGS)?, user.as_str())?.unwrap_or_default())
        })
        .await
    }

    pub async fn set_settings(&self, user: &UserId, settings: Settings) -> Result<(), StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(SETTINGS)?.insert(user.as_str(), to_json(&settings)?.as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The conversation new messages in `chat` go to, if the user has started one there.
    pub async fn current_conversation(&self, user: &UserId, chat: &str) -> Result<Option<Conversation>, StoreError> {
        let (user, chat) = (user.clone(), chat.to_owned());
        self.call(move |db| {
            let tx = db.begin_read()?;
            let Some(id) = tx.open_table(CURRENT)?.get((user.as_str(), chat.as_str()))?.map(|v| v.value()) else {
                return Ok(None);
            };
            // Current entries are only ever set to the user's own conversations;
            // checking again costs nothing and keeps the rule in one place.
            owned_conversation(&tx.open_table(CONVERSATIONS)?, &user, id).map(Some)
        })
        .await
    }

    /// Starts a conversation in `chat` and makes it the current one there.
    pub async fn new_conversation(
        &self,
        user: &UserId,
        chat: &str,
        title: Option<String>,
    ) -> Result<Conversation, StoreError> {
        let (user, chat) = (user.clone(), chat.to_owned());
        self.call(move |db| {
            let tx = db.begin_write()?;
            let conversation = {
                let mut meta = tx.open_table(META)?;
                let id = meta.get(NEXT_CONVERSATION)?.map_or(1, |v| v.value());
                meta.insert(NEXT_CONVERSATION, id + 1)?;
                let now = now();
                let conversation = Conversation {
                    id,
                    user: user.clone(),
                    chat: chat.clone(),
                    title: title.unwrap_or_default(),
                    created: now,
                    updated: now,
                };
                tx.open_table(CONVERSATIONS)?.insert(id, to_json(&conversation)?.as_slice())?;
                tx.open_table(USER_CONVERSATIONS)?.insert((user.as_str(), id), ())?;
                tx.open_table(CURRENT)?.insert((user.as_str(), chat.as_str()), id)?;
                conversation
            };
            tx.commit()?;
            Ok(conversation)
        })
        .await
    }

    /// The user's conversations started in `chat`, most recently updated first.
    pub async fn list_conversations(&self, user: &UserId, chat: &str) -> Result<Vec<Conversation>, StoreError> {
        let (user, chat) = (user.clone(), chat.to_owned());
        self.call(move |db| {
            let tx = db.begin_read()?;
            let conversations = tx.open_table(CONVERSATIONS)?;
            let mut list = Vec::new();
            for entry in tx.open_table(USER_CONVERSATIONS)?.range((user.as_str(), 0)..=(user.as_str(), u64::MAX))? {
                let id = entry?.0.value().1;
                let conversation = owned_conversation(&conversations, &user, id)?;
                if conversation.chat == chat {
                    list.push(conversation);
                }
            }
            list.sort_by(|a, b| b.updated.cmp(&a.updated).then(b.id.cmp(&a.id)));
            Ok(list)
        })
        .await
    }

    /// Makes one of the user's conversations from `chat` the current one there.
    /// A conversation from another chat is refused too: continuing a private
    /// conversation in a group would show it to the group.
    pub async fn switch_conversation(&self, user: &UserId, chat: &str, id: u64) -> Result<Conversation, StoreError> {
        let (user, chat) = (user.clone(), chat.to_owned());
        self.call(move |db| {
            let tx = db.begin_write()?;
            let conversation = owned_conversation(&tx.open_table(CONVERSATIONS)?, &user, id)?;
            if conversation.chat != chat {
                return Err(StoreError::NoSuchConversation(id));
            }
            tx.open_table(CURRENT)?.insert((user.as_str(), chat.as_str()), id)?;
            tx.commit()?;
            Ok(conversation)
        })
        .await
    }

    /// Renames one of the user's conversations.
    pub async fn rename_conversation(&self, user: &UserId, id: u64, title: String) -> Result<Conversation, StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_write()?;
            let conversation = {
                let mut conversations = tx.open_table(CONVERSATIONS)?;
                let conversation = Conversation { title, ..owned_conversation(&conversations, &user, id)? };
                conversations.insert(id, to_json(&conversation)?.as_slice())?;
                conversation
            };
            tx.commit()?;
            Ok(conversation)
        })
        .await
    }

    /// Deletes one of the user's conversations and its messages; a chat it was
    /// current in has no current conversation until the next one starts.
    pub async fn delete_conversation(&self, user: &UserId, id: u64) -> Result<(), StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_write()?;
            {
                let mut conversations = tx.open_table(CONVERSATIONS)?;
                let conversation = owned_conversation(&conversations, &user, id)?;
                conversations.remove(id)?;
                tx.open_table(USER_CONVERSATIONS)?.remove((user.as_str(), id))?;
                tx.open_table(MESSAGES)?.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                let mut current = tx.open_table(CURRENT)?;
                let scope = (user.as_str(), conversation.chat.as_str());
                if current.get(scope)?.map(|v| v.value()) == Some(id) {
                    current.remove(scope)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Adds a message at the end of one of the user's conversations; an untitled
    /// conversation takes its title from its first user message.
    pub async fn append_message(
        &self,
        user: &UserId,
        conversation: u64,
        role: Role,
        content: String,
    ) -> Result<Message, StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_write()?;
            let message = {
                let mut conversations = tx.open_table(CONVERSATIONS)?;
                let mut record = owned_conversation(&conversations, &user, conversation)?;
                let mut messages = tx.open_table(MESSAGES)?;
                let next = match messages.range((conversation, 0)..=(conversation, u64::MAX))?.next_back() {
                    Some(last) => last?.0.value().1 + 1,
                    None => 0,
                };
                let message = Message { role, content, at: now() };
                messages.insert((conversation, next), to_json(&message)?.as_slice())?;
                if record.title.is_empty() && role == Role::User {
                    record.title = title_from(&message.content);
                }
                record.updated = message.at;
                conversations.insert(conversation, to_json(&record)?.as_slice())?;
                message
            };
            tx.commit()?;
            Ok(message)
        })
        .await
    }

    /// The messages of one of the user's conversations, oldest first.
    pub async fn messages(&self, user: &UserId, conversation: u64) -> Result<Vec<Message>, StoreError> {
        let user = user.clone();
        self.call(move |db| {
            let tx = db.begin_read()?;
            owned_conversation(&tx.open_table(CONVERSATIONS)?, &user, conversation)?;
            let messages = tx.open_table(MESSAGES)?;
            let mut list = Vec::new();
            for entry in messages.range((conversation, 0)..=(conversation, u64::MAX))? {
                list.push(serde_json::from_slice(entry?.1.value())?);
            }
            Ok(list)
        })
        .await
    }

    /// Records (or updates, e.g. with more message ids) where a job's reply goes.
    /// Its conversation must be the user's, and a job already recorded for
    /// another user cannot be taken over.
    pub async fn record_job(&self, record: JobRecord) -> Result<(), StoreError> {
        self.call(move |db| {
            let tx = db.begin_write()?;
            {
                if let Some(id) = record.conversation {
                    owned_conversation(&tx.open_table(CONVERSATIONS)?, &record.user, id)?;
                }
                let key = record.job.to_string();
                let mut jobs = tx.open_table(JOBS)?;
                if let Some(old) = get_json::<_, JobRecord>(&jobs, key.as_str())? {
                    if old.user != record.user {
                        return Err(StoreError::JobNotYours(record.job));
                    }
                }
                jobs.insert(key.as_str(), to_json(&record)?.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Jobs whose replies were not finished, oldest first: a starting bot resumes them.
    pub async fn pending_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.call(|db| {
            let tx = db.begin_read()?;
            let mut list = Vec::new();
            for entry in tx.open_table(JOBS)?.iter()? {
                list.push(serde_json::from_slice::<JobRecord>(entry?.1.value())?);
            }
            list.sort_by_key(|record| record.started);
            Ok(list)
        })
        .await
    }

    /// Forgets a job whose reply is complete; returns its record if it had one.
    /// The reply's messages are remembered as its conversation's answers.
    pub async fn finish_job(&self, job: Uuid) -> Result<Option<JobRecord>, StoreError> {
        self.call(move |db| {
            let tx = db.begin_write()?;
            let record: Option<JobRecord> = match tx.open_table(JOBS)?.remove(job.to_string().as_str())? {
                Some(bytes) => Some(serde_json::from_slice(bytes.value())?),
                None => None,
            };
            if let Some(JobRecord { chat, messages, conversation: Some(conversation), .. }) = &record {
                let mut answers = tx.open_table(ANSWERS)?;
                for message in messages {
                    answers.insert((chat.as_str(), message.as_str()), *conversation)?;
                }
            }
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    /// The user's conversation that `message` in `chat` answered, if it was
    /// theirs: replying to someone else's answer continues nothing of theirs.
    pub async fn answered_conversation(
        &self,
        user: &UserId,
        chat: &str,
        message: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let (user, chat, message) = (user.clone(), chat.to_owned(), message.to_owned());
        self.call(move |db| {
            let tx = db.begin_read()?;
            let Some(id) = tx.open_table(ANSWERS)?.get((chat.as_str(), message.as_str()))?.map(|v| v.value()) else {
                return Ok(None);
            };
            match owned_conversation(&tx.open_table(CONVERSATIONS)?, &user, id) {
                Ok(conversation) => Ok(Some(conversation)),
                Err(StoreError::NoSuchConversation(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Counts one more job for the user on `day` (UTC) and returns that day's
    /// total, this one included. Earlier days' counters are dropped on the way:
    /// quotas are daily, so they are never read again.
    pub async fn count_job(&self, user: &UserId, day: Date) -> Result<u64, StoreError> {
        let user = user.clone();
        let day = day.to_julian_day();
        self.call(move |db| {
            let tx = db.begin_write()?;
            let count = {
                let mut counters = tx.open_table(DAILY_JOBS)?;
                let count = counters.get((user.as_str(), day))?.map_or(0, |v| v.value()) + 1;
                counters.retain_in((user.as_str(), i32::MIN)..(user.as_str(), day), |_, _| false)?;
                counters.insert((user.as_str(), day), count)?;
                count
            };
            tx.commit()?;
            Ok(count)
        })
        .await
    }

    /// [`Store::count_job`] for today (UTC).
    pub async fn count_job_today(&self, user: &UserId) -> Result<u64, StoreError> {
        self.count_job(user, OffsetDateTime::now_utc().date()).await
    }

    /// Jobs counted for the user on `day`, without counting one.
    pub async fn jobs_on(&self, user: &UserId, day: Date) -> Result<u64, StoreError> {
        let user = user.clone();
        let day = day.to_julian_day();
        self.call(move |db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(DAILY_JOBS)?.get((user.as_str(), day))?.map_or(0, |v| v.value()))
        })
        .await
    }
}

/// What an operator's `/stats` shows from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub users: u64,
    /// Jobs counted for every user on the day asked for.
    pub jobs_today: u64,
    pub conversations: u64,
}

impl Store {
    pub async fn stats(&self, day: Date) -> Result<StoreStats, StoreError> {
        let day = day.to_julian_day();
        self.call(move |db| {
            let tx = db.begin_read()?;
            let mut jobs_today = 0;
            for entry in tx.open_table(DAILY_JOBS)?.iter()? {
                let (key, count) = entry?;
                if key.value().1 == day {
                    jobs_today += count.value();
                }
            }
            Ok(StoreStats {
                users: tx.open_table(USERS)?.len()?,
                jobs_today,
                conversations: tx.open_table(CONVERSATIONS)?.len()?,
            })
        })
        .await
    }
}

/// Opens the file (and its folder, on the first start) and creates every
/// table, so reads never meet a missing one.
fn open_db(path: &Path) -> Result<Database, StoreError> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|source| StoreError::Folder { path: folder.to_owned(), source })?;
    }
    let db = Database::create(path)?;
    let tx = db.begin_write()?;
    tx.open_table(USERS)?;
    tx.open_table(SETTINGS)?;
    tx.open_table(CONVERSATIONS)?;
    tx.open_table(USER_CONVERSATIONS)?;
    tx.open_table(MESSAGES)?;
    tx.open_table(CURRENT)?;
    tx.open_table(JOBS)?;
    tx.open_table(DAILY_JOBS)?;
    tx.open_table(META)?;
    tx.open_table(ANSWERS)?;
    tx.commit()?;
    Ok(db)
}

/// Now, to the millisecond that records keep, so what a method returns equals
/// what is read back later.
fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now)
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(serde_json::to_vec(value)?)
}

fn get_json<'k, T, V>(table: &T, key: &'k str) -> Result<Option<V>, StoreError>
where
    T: ReadableTable<&'static str, &'static [u8]>,
    V: for<'de> Deserialize<'de>,
{
    match table.get(key)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(bytes.value())?)),
        None => Ok(None),
    }
}

/// The conversation if it exists and is the user's; the one place ownership is checked.
fn owned_conversation(
    conversations: &impl ReadableTable<u64, &'static [u8]>,
    user: &UserId,
    id: u64,
) -> Result<Conversation, StoreError> {
    let Some(bytes) = conversations.get(id)? else {
        return Err(StoreError::NoSuchConversation(id));
    };
    let conversation: Conversation = serde_json::from_slice(bytes.value())?;
    if &conversation.user != user {
        return Err(StoreError::NoSuchConversation(id));
    }
    Ok(conversation)
}

/// The first line of the text, cut at a character boundary.
fn title_from(text: &str) -> String {
    let line = text.trim().lines().next().unwrap_or_default().trim();
    let mut title: String = line.chars().take(TITLE_CHARS).collect();
    if line.chars().nth(TITLE_CHARS).is_some() {
        title.push('…');
    }
    title
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("bots.redb")).await.unwrap();
        (dir, store)
    }

    fn alice() -> UserId {
        UserId::new("telegram", 1)
    }

    fn bob() -> UserId {
        UserId::new("telegram", 2)
    }

    fn job(user: &UserId, conversation: Option<u64>, messages: &[&str]) -> JobRecord {
        JobRecord {
            job: Uuid::now_v7(),
            user: user.clone(),
            chat: "telegram:10".into(),
            messages: messages.iter().map(|m| m.to_string()).collect(),
            conversation,
            reply_via: None,
            started: now(),
        }
    }

    #[tokio::test]
    async fn everything_survives_closing_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("bots.redb");
        let store = Store::open(&path).await.unwrap();
        // A second opener is refused while the first holds the file.
        assert!(matches!(Store::open(&path).await, Err(StoreError::Database(_))));
        let settings = Settings {
            model: Some("qwen3-0.6b".into()),
            system_prompt: Some("Be brief.".into()),
            temperature: Some(0.25),
            max_tokens: Some(300),
            voice_transcript_only: true,
        };
        let first_seen = store.touch_user(&alice()).await.unwrap();
        store.set_settings(&alice(), settings.clone()).await.unwrap();
        let conversation = store.new_conversation(&alice(), "telegram:10", None).await.unwrap();
        store.append_message(&alice(), conversation.id, Role::User, "Hello there".into()).await.unwrap();
        store.append_message(&alice(), conversation.id, Role::Assistant, "Hi!".into()).await.unwrap();
        let pending = job(&alice(), Some(conversation.id), &["501", "502"]);
        store.record_job(pending.clone()).await.unwrap();
        store.count_job(&alice(), date!(2026 - 11 - 24)).await.unwrap();
        store.close().await;

        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.user(&alice()).await.unwrap(), Some(first_seen));
        assert_eq!(store.user_settings(&alice()).await.unwrap(), settings);
        let current = store.current_conversation(&alice(), "telegram:10").await.unwrap().unwrap();
        assert_eq!(current.id, conversation.id);
        assert_eq!(current.title, "Hello there");
        let messages = store.messages(&alice(), conversation.id).await.unwrap();
        assert_eq!(messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), ["Hello there", "Hi!"]);
        assert_eq!(store.pending_jobs().await.unwrap(), std::slice::from_ref(&pending));
        assert_eq!(store.jobs_on(&alice(), date!(2026 - 11 - 24)).await.unwrap(), 1);
        // Conversation ids keep counting from where they were.
        let second = store.new_conversation(&alice(), "telegram:10", None).await.unwrap();
        assert!(second.id > conversation.id);

        assert_eq!(store.finish_job(pending.job).await.unwrap(), Some(pending));
        store.close().await;
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.pending_jobs().await.unwrap(), []);
    }

    #[tokio::test]
    async fn a_user_can_never_reach_another_users_conversation() {
        let (_dir, store) = store().await;
        let theirs = store.new_conversation(&alice(), "telegram:10", Some("secret".into())).await.unwrap();
        store.append_message(&alice(), theirs.id, Role::User, "my secret".into()).await.unwrap();
        // Bob, even in the same chat (a group), sees nothing of Alice's.
        let refused =
            |r: Result<_, StoreError>| matches!(r, Err(StoreError::NoSuchConversation(id)) if id == theirs.id);
        assert!(refused(store.messages(&bob(), theirs.id).await.map(|_| ())));
        assert!(refused(store.switch_conversation(&bob(), "telegram:10", theirs.id).await.map(|_| ())));
        assert!(refused(store.append_message(&bob(), theirs.id, Role::User, "x".into()).await.map(|_| ())));
        assert!(refused(store.rename_conversation(&bob(), theirs.id, "mine".into()).await.map(|_| ())));
        assert!(refused(store.delete_conversation(&bob(), theirs.id).await));
        assert!(refused(store.record_job(job(&bob(), Some(theirs.id), &[])).await));
        assert_eq!(store.list_conversations(&bob(), "telegram:10").await.unwrap(), []);
        assert_eq!(store.current_conversation(&bob(), "telegram:10").await.unwrap(), None);
        // A conversation that does not exist reads exactly the same.
        assert!(matches!(store.messages(&bob(), 999).await, Err(StoreError::NoSuchConversation(999))));
        // Nothing of Alice's changed.
        let messages = store.messages(&alice(), theirs.id).await.unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].content, "my secret");
        let listed = store.list_conversations(&alice(), "telegram:10").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].title, "secret");

        // A job recorded for Alice cannot be taken over by Bob.
        let alices_job = job(&alice(), Some(theirs.id), &["7"]);
        store.record_job(alices_job.clone()).await.unwrap();
        let takeover = JobRecord { user: bob(), conversation: None, ..alices_job.clone() };
        assert!(matches!(store.record_job(takeover).await, Err(StoreError::JobNotYours(id)) if id == alices_job.job));
        assert_eq!(store.pending_jobs().await.unwrap(), [alices_job]);
        // Settings are per user too.
        store.set_settings(&alice(), Settings { model: Some("big".into()), ..Settings::default() }).await.unwrap();
        assert_eq!(store.user_settings(&bob()).await.unwrap(), Settings::default());
    }

    #[tokio::test]
    async fn a_finished_answer_leads_back_to_its_conversation_for_its_owner_only() {
        let (_dir, store) = store().await;
        let first = store.new_conversation(&alice(), "telegram:10", Some("first".into())).await.unwrap();
        let answer = job(&alice(), Some(first.id), &["501", "502"]);
        store.record_job(answer.clone()).await.unwrap();
        // Not before the answer is complete.
        assert_eq!(store.answered_conversation(&alice(), "telegram:10", "502").await.unwrap(), None);
        store.finish_job(answer.job).await.unwrap();
        store.new_conversation(&alice(), "telegram:10", Some("second".into())).await.unwrap();
        let found = store.answered_conversation(&alice(), "telegram:10", "502").await.unwrap();
        assert_eq!(found.map(|c| c.id), Some(first.id));
        // Bob replying to Alice's answer, another chat's message, an unknown one: nothing.
        assert_eq!(store.answered_conversation(&bob(), "telegram:10", "502").await.unwrap(), None);
        assert_eq!(store.answered_conversation(&alice(), "telegram:11", "502").await.unwrap(), None);
        assert_eq!(store.answered_conversation(&alice(), "telegram:10", "999").await.unwrap(), None);
        // A deleted conversation is gone for its answers too.
        store.delete_conversation(&alice(), first.id).await.unwrap();
        assert_eq!(store.answered_conversation(&alice(), "telegram:10", "501").await.unwrap(), None);
    }

    #[tokio::test]
    async fn conversations_are_scoped_to_the_chat_they_were_started_in() {
        let (_dir, store) = store().await;
        let private = store.new_conversation(&alice(), "telegram:1", Some("private".into())).await.unwrap();
        let group = store.new_conversation(&alice(), "telegram:-100", Some("group".into())).await.unwrap();
        assert_eq!(store.current_conversation(&alice(), "telegram:1").await.unwrap().unwrap().id, private.id);
        assert_eq!(store.current_conversation(&alice(), "telegram:-100").await.unwrap().unwrap().id, group.id);
        let titles = |list: Vec<Conversation>| list.into_iter().map(|c| c.title).collect::<Vec<_>>();
        assert_eq!(titles(store.list_conversations(&alice(), "telegram:-100").await.unwrap()), ["group"]);
        // The private conversation cannot be brought into the group.
        assert!(matches!(
            store.switch_conversation(&alice(), "telegram:-100", private.id).await,
            Err(StoreError::NoSuchConversation(_))
        ));
        // Bob's current conversation in the group is his own.
        let bobs = store.new_conversation(&bob(), "telegram:-100", None).await.unwrap();
        assert_eq!(store.current_conversation(&alice(), "telegram:-100").await.unwrap().unwrap().id, group.id);
        assert_eq!(store.current_conversation(&bob(), "telegram:-100").await.unwrap().unwrap().id, bobs.id);
    }

    #[tokio::test]
    async fn switching_and_listing_follow_the_latest_activity() {
        let (_dir, store) = store().await;
        let first = store.new_conversation(&alice(), "c", Some("first".into())).await.unwrap();
        let second = store.new_conversation(&alice(), "c", Some("second".into())).await.unwrap();
        assert_eq!(store.current_conversation(&alice(), "c").await.unwrap().unwrap().id, second.id);
        let switched = store.switch_conversation(&alice(), "c", first.id).await.unwrap();
        assert_eq!(switched.title, "first");
        assert_eq!(store.current_conversation(&alice(), "c").await.unwrap().unwrap().id, first.id);
        // Writing to the older conversation moves it to the top of the list.
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.append_message(&alice(), first.id, Role::User, "back again".into()).await.unwrap();
        let list = store.list_conversations(&alice(), "c").await.unwrap();
        assert_eq!(list.iter().map(|c| c.id).collect::<Vec<_>>(), [first.id, second.id]);
        // A given title is kept; a rename replaces it.
        assert_eq!(list[0].title, "first");
        let renamed = store.rename_conversation(&alice(), second.id, "renamed".into()).await.unwrap();
        assert_eq!(renamed.title, "renamed");
    }

    #[tokio::test]
    async fn a_deleted_conversation_is_gone_with_its_messages() {
        let (_dir, store) = store().await;
        let kept = store.new_conversation(&alice(), "c", Some("kept".into())).await.unwrap();
        store.append_message(&alice(), kept.id, Role::User, "stays".into()).await.unwrap();
        let gone = store.new_conversation(&alice(), "c", Some("gone".into())).await.unwrap();
        store.append_message(&alice(), gone.id, Role::User, "goes".into()).await.unwrap();
        store.delete_conversation(&alice(), gone.id).await.unwrap();
        assert!(matches!(store.messages(&alice(), gone.id).await, Err(StoreError::NoSuchConversation(_))));
        assert!(matches!(store.delete_conversation(&alice(), gone.id).await, Err(StoreError::NoSuchConversation(_))));
        assert_eq!(store.current_conversation(&alice(), "c").await.unwrap(), None);
        let listed = store.list_conversations(&alice(), "c").await.unwrap();
        assert_eq!(listed.iter().map(|c| c.title.as_str()).collect::<Vec<_>>(), ["kept"]);
        assert_eq!(store.messages(&alice(), kept.id).await.unwrap().len(), 1);
        // Deleting a conversation that is not current leaves the current one.
        let third = store.new_conversation(&alice(), "c", None).await.unwrap();
        store.delete_conversation(&alice(), kept.id).await.unwrap();
        assert_eq!(store.current_conversation(&alice(), "c").await.unwrap().unwrap().id, third.id);
    }

    #[tokio::test]
    async fn messages_come_back_in_the_order_they_were_added() {
        let (_dir, store) = store().await;
        let a = store.new_conversation(&alice(), "c", None).await.unwrap();
        let b = store.new_conversation(&alice(), "c", None).await.unwrap();
        // Interleaved writes to two conversations, more than ten so that a
        // lexicographic ordering of the sequence numbers would show.
        for i in 0..25 {
            let role = if i % 2 == 0 { Role::User } else { Role::Assistant };
            store.append_message(&alice(), a.id, role, format!("a{i}")).await.unwrap();
            store.append_message(&alice(), b.id, role, format!("b{i}")).await.unwrap();
        }
        let a_messages = store.messages(&alice(), a.id).await.unwrap();
        let expected: Vec<String> = (0..25).map(|i| format!("a{i}")).collect();
        assert_eq!(a_messages.iter().map(|m| m.content.clone()).collect::<Vec<_>>(), expected);
        assert_eq!(a_messages[1].role, Role::Assistant);
        assert_eq!(a_messages[0].to_chat(), ChatMessage { role: Role::User, content: "a0".into() });
        assert_eq!(store.messages(&alice(), b.id).await.unwrap().len(), 25);
        assert_eq!(store.current_conversation(&alice(), "c").await.unwrap().unwrap().title, "b0");
    }

    #[tokio::test]
    async fn the_job_map_updates_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bots.redb");
        let store = Store::open(&path).await.unwrap();
        let conversation = store.new_conversation(&alice(), "telegram:10", None).await.unwrap();
        let mut first = job(&alice(), Some(conversation.id), &["100"]);
        let second = job(&bob(), None, &["200"]);
        store.record_job(first.clone()).await.unwrap();
        store.record_job(second.clone()).await.unwrap();
        // The relay continued the reply in a second platform message.
        first.messages.push("101".into());
        store.record_job(first.clone()).await.unwrap();
        store.close().await;

        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.pending_jobs().await.unwrap(), [first.clone(), second.clone()]);
        assert_eq!(store.finish_job(first.job).await.unwrap(), Some(first.clone()));
        assert_eq!(store.finish_job(first.job).await.unwrap(), None);
        assert_eq!(store.pending_jobs().await.unwrap(), [second]);
    }

    #[tokio::test]
    async fn daily_job_counters_start_again_each_day() {
        let (_dir, store) = store().await;
        let (monday, tuesday) = (date!(2026 - 11 - 23), date!(2026 - 11 - 24));
        assert_eq!(store.count_job(&alice(), monday).await.unwrap(), 1);
        assert_eq!(store.count_job(&alice(), monday).await.unwrap(), 2);
        assert_eq!(store.count_job(&bob(), monday).await.unwrap(), 1);
        assert_eq!(store.jobs_on(&alice(), monday).await.unwrap(), 2);
        assert_eq!(store.count_job(&alice(), tuesday).await.unwrap(), 1);
        assert_eq!(store.jobs_on(&alice(), tuesday).await.unwrap(), 1);
        // The past day's counter was dropped once a new day was counted; Bob's is his own.
        assert_eq!(store.jobs_on(&alice(), monday).await.unwrap(), 0);
        assert_eq!(store.jobs_on(&bob(), monday).await.unwrap(), 1);
        assert_eq!(store.count_job_today(&bob()).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn stats_count_users_conversations_and_the_days_jobs() {
        let (_dir, store) = store().await;
        let day = date!(2026 - 11 - 23);
        store.touch_user(&alice()).await.unwrap();
        store.touch_user(&bob()).await.unwrap();
        store.new_conversation(&alice(), "c", None).await.unwrap();
        store.count_job(&alice(), day).await.unwrap();
        store.count_job(&alice(), day).await.unwrap();
        store.count_job(&bob(), day).await.unwrap();
        let stats = store.stats(day).await.unwrap();
        assert_eq!(stats, StoreStats { users: 2, jobs_today: 3, conversations: 1 });
        assert_eq!(store.stats(day.next_day().unwrap()).await.unwrap().jobs_today, 0);
    }

    #[tokio::test]
    async fn many_handles_share_one_database_and_close_together() {
        let (_dir, store) = store().await;
        let conversation = store.new_conversation(&alice(), "c", None).await.unwrap();
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    for j in 0..10 {
                        store.append_message(&alice(), conversation.id, Role::User, format!("{i}-{j}")).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        assert_eq!(store.messages(&alice(), conversation.id).await.unwrap().len(), 80);
        let other = store.clone();
        store.close().await;
        assert!(matches!(other.user_settings(&alice()).await, Err(StoreError::Closed)));
    }

    #[test]
    fn titles_are_the_first_line_cut_at_a_character() {
        assert_eq!(title_from("  Hello\nworld"), "Hello");
        let long = "é".repeat(100);
        let title = title_from(&long);
        assert_eq!(title.chars().count(), TITLE_CHARS + 1);
        assert!(title.ends_with('…'));
    }
}

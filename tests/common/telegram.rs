//! A fake Telegram Bot API server on loopback that speaks the real HTTP API
//! (`/bot<token>/<method>`, JSON in, `{"ok", "result"}` out) to the real
//! teloxide client: getMe, getWebhookInfo, getUpdates long polling with
//! offsets, sendMessage, editMessageText, deleteMessage, sendChatAction,
//! setMyCommands, answerCallbackQuery, getFile and file download, sendDocument
//! (multipart), and injected errors (`retry_after`, message too long). Tests
//! push updates in (texts, files, group messages, button presses) and read
//! every call back with its time.

use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const BOT_ID: i64 = 7000;

/// One Bot API call as the server saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub params: Value,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    updates: Vec<Value>,
    next_update: i64,
    next_message: i64,
    calls: Vec<Call>,
    /// (chat, message id) -> current text.
    messages: BTreeMap<(i64, i64), String>,
    /// Errors to answer the next calls of a method with.
    failures: VecDeque<(String, Value)>,
    /// File id -> bytes, for getFile and downloads.
    files: BTreeMap<String, Vec<u8>>,
    /// The webhook URL set for the bot; empty when none.
    webhook: String,
    /// Documents the bot sent: (chat, file name, bytes, caption).
    documents: Vec<(i64, String, Vec<u8>, String)>,
}

/// A file a test user sends, as the Bot API describes it in a message.
pub struct SentFile {
    pub id: String,
    pub size: usize,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    news: Notify,
}

pub struct FakeTelegram {
    /// Base URL for teloxide's `set_api_url`.
    pub url: reqwest::Url,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeTelegram {
    pub async fn start() -> FakeTelegram {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/{bot}/{method}", post(call))
            .route("/file/{bot}/{*path}", get(download))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeTelegram { url, shared, task }
    }

    /// A user writes `text` to the bot in their private chat.
    pub fn user_says(&self, user: i64, text: &str) -> i64 {
        self.user_sends(user, json!({ "text": text }))
    }

    /// A message from `user` in their private chat with the bot, with the
    /// given fields (`text`, `photo`, `voice`, `caption`...); returns its id.
    pub fn user_sends(&self, user: i64, fields: Value) -> i64 {
        let chat = json!({"id": user, "type": "private", "first_name": format!("User{user}")});
        self.push_message(chat, user, fields)
    }

    /// `user` writes in the group `chat` (a negative id); `reply_to` is a
    /// message of the bot's being answered.
    pub fn group_says(&self, chat: i64, user: i64, text: &str, reply_to: Option<i64>) -> i64 {
        let mut fields = json!({ "text": text });
        if let Some(id) = reply_to {
            fields["reply_to_message"] = json!({
                "message_id": id, "date": unix_now(), "from": bot_user(), "text": "…",
                "chat": {"id": chat, "type": "group", "title": "Family"},
            });
        }
        self.push_message(json!({"id": chat, "type": "group", "title": "Family"}), user, fields)
    }

    fn push_message(&self, chat: Value, user: i64, fields: Value) -> i64 {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.next_update += 1;
        inner.next_message += 1;
        let mut message = json!({
            "message_id": inner.next_message,
            "date": unix_now(),
            "chat": chat,
            "from": {"id": user, "is_bot": false, "first_name": format!("User{user}"), "username": format!("user{user}")},
        });
        for (key, value) in fields.as_object().unwrap() {
            message[key] = value.clone();
        }
        let id = inner.next_message;
        let update = json!({ "update_id": inner.next_update, "message": message });
        inner.updates.push(update);
        drop(inner);
        self.shared.news.notify_waiters();
        id
    }

    /// Makes `data` downloadable, as a file a user sent.
    pub fn add_file(&self, data: Vec<u8>) -> SentFile {
        let mut inner = self.shared.inner.lock().unwrap();
        let id = format!("file-{}", inner.files.len() + 1);
        let size = data.len();
        inner.files.insert(id.clone(), data);
        SentFile { id, size }
    }

    /// `user` presses the inline button with `data` on the bot's `message` in `chat`.
    pub fn press(&self, user: i64, chat: i64, message: i64, data: &str) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.next_update += 1;
        let text = inner.messages.get(&(chat, message)).cloned().unwrap_or_default();
        let kind = if chat > 0 { "private" } else { "group" };
        let update = json!({
            "update_id": inner.next_update,
            "callback_query": {
                "id": format!("cb-{}", inner.next_update),
                "from": {"id": user, "is_bot": false, "first_name": format!("User{user}")},
                "message": {
                    "message_id": message, "date": unix_now(), "from": bot_user(), "text": text,
                    "chat": {"id": chat, "type": kind, "first_name": "x", "title": "Family"},
                },
                "chat_instance": "1",
                "data": data,
            }
        });
        inner.updates.push(update);
        drop(inner);
        self.shared.news.notify_waiters();
    }

    /// The documents the bot sent to `chat`: (file name, bytes, caption).
    pub fn documents(&self, chat: i64) -> Vec<(String, Vec<u8>, String)> {
        let inner = self.shared.inner.lock().unwrap();
        inner.documents.iter().filter(|d| d.0 == chat).map(|d| (d.1.clone(), d.2.clone(), d.3.clone())).collect()
    }

    /// A webhook left over from another deployment.
    pub fn set_webhook(&self, url: &str) {
        self.shared.inner.lock().unwrap().webhook = url.to_string();
    }

    /// The next call of `method` fails with this Bot API error body.
    pub fn fail_next(&self, method: &str, error: Value) {
        self.shared.inner.lock().unwrap().failures.push_back((method.to_string(), error));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.inner.lock().unwrap().calls.clone()
    }

    /// The texts of the bot's messages in a chat, oldest first, as they stand.
    pub fn chat_texts(&self, chat: i64) -> Vec<String> {
        let inner = self.shared.inner.lock().unwrap();
        inner.messages.range((chat, 0)..=(chat, i64::MAX)).map(|(_, t)| t.clone()).collect()
    }

    /// The ids of the bot's messages in a chat, oldest first.
    pub fn message_ids(&self, chat: i64) -> Vec<i64> {
        let inner = self.shared.inner.lock().unwrap();
        inner.messages.range((chat, 0)..=(chat, i64::MAX)).map(|((_, id), _)| *id).collect()
    }

    /// Waits until `check` holds for the chat's texts, or panics after `limit`.
    pub async fn wait_for(&self, chat: i64, limit: Duration, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let texts = self.chat_texts(chat);
            if check(&texts) {
                return texts;
            }
            if Instant::now() >= deadline {
                let calls: Vec<String> =
                    self.calls().iter().rev().take(12).map(|c| format!("{} {}", c.method, c.params)).collect();
                panic!("chat {chat} never got there; it shows {texts:?}; the last calls, newest first: {calls:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn retry_after(seconds: u64) -> Value {
    json!({
        "ok": false,
        "error_code": 429,
        "description": format!("Too Many Requests: retry after {seconds}"),
        "parameters": {"retry_after": seconds}
    })
}

const METHODS: [&str; 12] = [
    "getMe",
    "getWebhookInfo",
    "getFile",
    "sendDocument",
    "getUpdates",
    "sendMessage",
    "editMessageText",
    "deleteMessage",
    "sendChatAction",
    "setMyCommands",
    "deleteWebhook",
    "answerCallbackQuery",
];

fn canonical(method: &str) -> String {
    METHODS.iter().find(|m| m.eq_ignore_ascii_case(method)).map_or_else(|| method.to_string(), |m| m.to_string())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn ok(result: Value) -> Json<Value> {
    Json(json!({"ok": true, "result": result}))
}

fn bot_user() -> Value {
    json!({"id": BOT_ID, "is_bot": true, "first_name": "natter", "username": "natter_test_bot"})
}

fn message(chat: i64, id: i64, text: &str) -> Value {
    json!({
        "message_id": id,
        "date": unix_now(),
        "chat": if chat < 0 { json!({"id": chat, "type": "group", "title": "Family"}) }
                else { json!({"id": chat, "type": "private", "first_name": format!("User{chat}")}) },
        "from": bot_user(),
        "text": text,
    })
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path((_bot, path)): Path<(String, String)>,
) -> Result<Vec<u8>, axum::http::StatusCode> {
    let id = path.trim_start_matches("files/");
    shared.inner.lock().unwrap().files.get(id).cloned().ok_or(axum::http::StatusCode::NOT_FOUND)
}

/// A multipart call's fields: files by their field name as (file name, bytes),
/// the rest as JSON strings or numbers.
async fn multipart_params(request: Request) -> (Value, Option<(String, Vec<u8>)>) {
    let mut form = Multipart::from_request(request, &()).await.unwrap();
    let mut params = json!({});
    let mut file = None;
    while let Some(field) = form.next_field().await.unwrap() {
        let name = field.name().unwrap_or_default().to_string();
        match field.file_name().map(str::to_string) {
            Some(file_name) => file = Some((file_name, field.bytes().await.unwrap().to_vec())),
            None => {
                let text = field.text().await.unwrap();
                params[name] = text.parse::<i64>().map_or_else(|_| json!(text), |n| json!(n));
            }
        }
    }
    (params, file)
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path((_bot, method)): Path<(String, String)>,
    request: Request,
) -> Json<Value> {
    // Bot API method names are case-insensitive; teloxide sends `GetMe`.
    let method = canonical(&method);
    let multipart =
        request.headers().get(CONTENT_TYPE).is_some_and(|t| t.to_str().unwrap_or_default().starts_with("multipart/"));
    let (params, file) = if multipart {
        multipart_params(request).await
    } else {
        let body = axum::body::to_bytes(request.into_body(), usize::MAX).await.unwrap();
        (serde_json::from_slice(&body).unwrap_or(Value::Null), None)
    };
    {
        let mut inner = shared.inner.lock().unwrap();
        inner.calls.push(Call { method: method.clone(), params: params.clone(), at: Instant::now() });
        if let Some(at) = inner.failures.iter().position(|(m, _)| *m == method) {
            let (_, error) = inner.failures.remove(at).unwrap();
            return Json(error);
        }
    }
    let chat = params["chat_id"].as_i64().unwrap_or_default();
    match method.as_str() {
        "getMe" => ok(json!({
            "id": BOT_ID, "is_bot": true, "first_name": "natter", "username": "natter_test_bot",
            "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false,
            "has_main_web_app": false
        })),
        "getUpdates" => {
            let offset = params["offset"].as_i64().unwrap_or(0);
            // As Telegram does, updates below the offset are confirmed and forgotten.
            shared.inner.lock().unwrap().updates.retain(|u| u["update_id"].as_i64().unwrap() >= offset);
            let timeout = Duration::from_secs(params["timeout"].as_u64().unwrap_or(0));
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let news = shared.news.notified();
                let pending: Vec<Value> = {
                    let inner = shared.inner.lock().unwrap();
                    inner.updates.iter().filter(|u| u["update_id"].as_i64().unwrap() >= offset).cloned().collect()
                };
                if !pending.is_empty() || tokio::time::Instant::now() >= deadline {
                    return ok(Value::Array(pending));
                }
                let _ = tokio::time::timeout_at(deadline, news).await;
            }
        }
        "sendMessage" => {
            let text = params["text"].as_str().unwrap_or_default().to_string();
            if text.encode_utf16().count() > 4096 {
                return Json(
                    json!({"ok": false, "error_code": 400, "description": "Bad Request: message is too long"}),
                );
            }
            let mut inner = shared.inner.lock().unwrap();
            inner.next_message += 1;
            let id = inner.next_message;
            inner.messages.insert((chat, id), text.clone());
            ok(message(chat, id, &text))
        }
        "editMessageText" => {
            let id = params["message_id"].as_i64().unwrap_or_default();
            let text = params["text"].as_str().unwrap_or_default().to_string();
            if text.encode_utf16().count() > 4096 {
                return Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: MESSAGE_TOO_LONG"}));
            }
            let mut inner = shared.inner.lock().unwrap();
            match inner.messages.get(&(chat, id)) {
                None => Json(
                    json!({"ok": false, "error_code": 400, "description": "Bad Request: message to edit not found"}),
                ),
                Some(old) if *old == text => Json(json!({
                    "ok": false, "error_code": 400,
                    "description": "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message"
                })),
                Some(_) => {
                    inner.messages.insert((chat, id), text.clone());
                    ok(message(chat, id, &text))
                }
            }
        }
        "deleteMessage" => {
            let id = params["message_id"].as_i64().unwrap_or_default();
            shared.inner.lock().unwrap().messages.remove(&(chat, id));
            ok(json!(true))
        }
        "getWebhookInfo" => {
            let url = shared.inner.lock().unwrap().webhook.clone();
            ok(json!({"url": url, "has_custom_certificate": false, "pending_update_count": 0}))
        }
        "deleteWebhook" => {
            shared.inner.lock().unwrap().webhook.clear();
            ok(json!(true))
        }
        "getFile" => {
            let id = params["file_id"].as_str().unwrap_or_default().to_string();
            let inner = shared.inner.lock().unwrap();
            match inner.files.get(&id) {
                Some(data) => ok(json!({
                    "file_id": id, "file_unique_id": format!("u-{id}"), "file_size": data.len(), "file_path": format!("files/{id}")
                })),
                None => Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: invalid file_id"})),
            }
        }
        "sendDocument" => {
            let (name, data) = file.unwrap_or_default();
            let caption = params["caption"].as_str().unwrap_or_default().to_string();
            let mut inner = shared.inner.lock().unwrap();
            inner.next_message += 1;
            let id = inner.next_message;
            inner.documents.push((chat, name.clone(), data, caption));
            let mut sent = message(chat, id, "");
            sent.as_object_mut().unwrap().remove("text");
            sent["document"] =
                json!({"file_id": format!("doc-{id}"), "file_unique_id": format!("doc-{id}"), "file_name": name});
            ok(sent)
        }
        "sendChatAction" | "setMyCommands" | "answerCallbackQuery" => ok(json!(true)),
        other => Json(json!({"ok": false, "error_code": 404, "description": format!("Not Found: method {other}")})),
    }
}

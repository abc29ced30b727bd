//! A fake Telegram Bot API server on loopback that speaks the real HTTP API
//! (`/bot<token>/<method>`, JSON in, `{"ok", "result"}` out) to the real
//! teloxide client: getMe, getUpdates long polling with offsets, sendMessage,
//! editMessageText, deleteMessage, sendChatAction, and injected errors
//! (`retry_after`, message too long). Tests push updates in and read every
//! call back with its time.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub const BOT_ID: i64 = 7000;

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
        let app = Router::new().route("/{bot}/{method}", post(call)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeTelegram { url, shared, task }
    }

    /// A user writes `text` to the bot in their private chat.
    pub fn user_says(&self, user: i64, text: &str) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.next_update += 1;
        inner.next_message += 1;
        let update = json!({
            "update_id": inner.next_update,
            "message": {
                "message_id": inner.next_message,
                "date": unix_now(),
                "chat": {"id": user, "type": "private", "first_name": format!("User{user}")},
                "from": {"id": user, "is_bot": false, "first_name": format!("User{user}")},
                "text": text,
            }
        });
        inner.updates.push(update);
        drop(inner);
        self.shared.news.notify_waiters();
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

    /// Waits until `check` holds for the chat's texts, or panics after `limit`.
    pub async fn wait_for(&self, chat: i64, limit: Duration, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let texts = self.chat_texts(chat);
            if check(&texts) {
                return texts;
            }
            assert!(Instant::now() < deadline, "chat {chat} never got there; it shows {texts:?}");
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

const METHODS: [&str; 9] = [
    "getMe",
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
        "chat": {"id": chat, "type": "private", "first_name": format!("User{chat}")},
        "from": bot_user(),
        "text": text,
    })
}

async fn call(
    State(shared): State<Arc<Shared>>,
    Path((_bot, method)): Path<(String, String)>,
    body: String,
) -> Json<Value> {
    // Bot API method names are case-insensitive; teloxide sends `GetMe`.
    let method = canonical(&method);
    let params: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
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
        "sendChatAction" | "setMyCommands" | "deleteWebhook" | "answerCallbackQuery" => ok(json!(true)),
        other => Json(json!({"ok": false, "error_code": 404, "description": format!("Not Found: method {other}")})),
    }
}

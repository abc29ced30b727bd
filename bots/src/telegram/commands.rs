//! The bot's commands and its inline buttons.

use super::{Context, Talk};
use crate::client::JobEnd;
use crate::store::{Settings, StoreError, UserId};
use natter_shared::proto::{Job, JobInput, JobKind, JobResult, NerInput, Origin};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use teloxide::payloads::{AnswerCallbackQuerySetters, EditMessageTextSetters, SendDocumentSetters, SendMessageSetters};
use teloxide::prelude::Requester;
use teloxide::types::{
    BotCommand, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, InputFile, ReplyParameters,
};
use time::OffsetDateTime;

/// Telegram refuses callback data over 64 bytes.
const MAX_CALLBACK_DATA: usize = 64;
/// Conversations `/history` offers to switch to.
const HISTORY_SHOWN: usize = 10;

/// The commands the Telegram client shows in its menu (setMyCommands).
pub(super) fn menu() -> Vec<BotCommand> {
    [
        ("new", "Start a new conversation"),
        ("history", "Your conversations; switch to another"),
        ("model", "Pick the chat model"),
        ("system", "Show, set or clear the system prompt"),
        ("settings", "Temperature, answer length, voice notes"),
        ("stop", "Stop the running answer"),
        ("ner", "Find names, places and organisations in a text"),
        ("export", "The conversation as a Markdown file"),
        ("help", "What this bot can do"),
    ]
    .into_iter()
    .map(|(command, description)| BotCommand::new(command, description))
    .collect()
}

/// `/name@bot args` → (name, args); `None` for text that is no command, or a
/// command addressed to another bot in a group.
pub(super) fn parse(text: &str, bot_name: &str) -> Option<(String, String)> {
    let rest = text.trim_start().strip_prefix('/')?;
    let (head, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (name, target) = head.split_once('@').map_or((head, None), |(n, t)| (n, Some(t)));
    if target.is_some_and(|t| !t.eq_ignore_ascii_case(bot_name)) || name.is_empty() {
        return None;
    }
    Some((name.to_lowercase(), args.trim().to_string()))
}

const HELP: &str = "I'm natter, a self-hosted assistant.\n\n\
Write to me and I'll answer; I remember the conversation until you send /new. \
Send a photo and I'll read the text in it; send a voice note, audio or a video note and I'll \
transcribe it and answer it.\n\n\
/new start a new conversation\n\
/history your conversations; switch to another\n\
/model pick the chat model\n\
/system show, set (/system <text>) or clear (/system clear) the system prompt\n\
/settings temperature, answer length, voice notes\n\
/stop stop the running answer\n\
/ner <text> find names, places and organisations\n\
/export the conversation as a Markdown file";

pub(super) async fn run(context: &Context, talk: &Talk, name: &str, args: &str) -> anyhow::Result<()> {
    match name {
        "start" | "help" => {
            let help =
                if talk.admin { format!("{HELP}\n/stats how the bot and the fleet are doing") } else { HELP.into() };
            context.say(talk, &help).await?;
        }
        "new" => {
            context.store.new_conversation(&talk.user, &talk.chat_key(), None).await?;
            context.say(talk, "Started a new conversation.").await?;
        }
        "history" => history(context, talk).await?,
        "model" => model(context, talk, args).await?,
        "system" => system(context, talk, args).await?,
        "settings" => settings(context, talk, args).await?,
        "stop" => {
            let reply = match context.running_job(&talk.user) {
                Some(job) => {
                    context.client.cancel(job).await?;
                    "Stopping."
                }
                None => "Nothing is running.",
            };
            context.say(talk, reply).await?;
        }
        "ner" => ner(context, talk, args).await?,
        "export" => export(context, talk).await?,
        "stats" if talk.admin => stats(context, talk).await?,
        "stats" => {
            context.say(talk, "/stats is for the bot's admins.").await?;
        }
        _ => {
            context.say(talk, &format!("I don't know /{name}. Send /help for the list.")).await?;
        }
    }
    Ok(())
}

fn keyboard(rows: Vec<(String, String)>) -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new(
        rows.into_iter()
            .filter(|(_, data)| data.len() <= MAX_CALLBACK_DATA)
            .map(|(label, data)| vec![InlineKeyboardButton::callback(label, data)]),
    )
}

async fn history(context: &Context, talk: &Talk) -> anyhow::Result<()> {
    let chat = talk.chat_key();
    let list = context.store.list_conversations(&talk.user, &chat).await?;
    if list.is_empty() {
        context.say(talk, "No conversations yet: just write to me.").await?;
        return Ok(());
    }
    let current = context.store.current_conversation(&talk.user, &chat).await?.map(|c| c.id);
    let buttons = list
        .iter()
        .take(HISTORY_SHOWN)
        .map(|c| {
            let title = if c.title.is_empty() { "(empty)" } else { c.title.as_str() };
            let mark = if Some(c.id) == current { "✓ " } else { "" };
            let day = c.updated.date();
            (format!("{mark}{title} · {day}"), format!("conv:{}", c.id))
        })
        .collect();
    let text = format!("Your conversations here ({}); pick one to continue it:", list.len());
    context.bot.send_message(talk.chat, text).reply_markup(keyboard(buttons)).await?;
    Ok(())
}

async fn model(context: &Context, talk: &Talk, args: &str) -> anyhow::Result<()> {
    let served = context.fleet.models(JobKind::Chat).await;
    if !args.is_empty() {
        let reply = set_model(context, &talk.user, args, &served).await?;
        context.say(talk, &reply).await?;
        return Ok(());
    }
    if served.is_empty() {
        context.say(talk, "No chat model is being served right now.").await?;
        return Ok(());
    }
    let settings = context.store.user_settings(&talk.user).await?;
    let current = context.model_for(JobKind::Chat, settings.model.as_deref()).await;
    let buttons = served
        .iter()
        .map(|m| {
            let mark = if Some(m) == current.as_ref() { "✓ " } else { "" };
            (format!("{mark}{m}"), format!("model:{m}"))
        })
        .collect();
    let text = format!("Answering with {}. The fleet serves:", current.as_deref().unwrap_or("nothing"));
    context.bot.send_message(talk.chat, text).reply_markup(keyboard(buttons)).await?;
    Ok(())
}

async fn set_model(context: &Context, user: &UserId, model: &str, served: &[String]) -> anyhow::Result<String> {
    if !served.iter().any(|m| m == model) {
        return Ok(format!("{model} is not being served. Send /model to see the models that are."));
    }
    let settings = context.store.user_settings(user).await?;
    context.store.set_settings(user, Settings { model: Some(model.to_string()), ..settings }).await?;
    Ok(format!("Now answering with {model}."))
}

async fn system(context: &Context, talk: &Talk, args: &str) -> anyhow::Result<()> {
    let settings = context.store.user_settings(&talk.user).await?;
    let (settings, reply) = match args {
        "" => {
            let reply = match &settings.system_prompt {
                Some(prompt) => format!(
                    "Your system prompt:\n\n{prompt}\n\nChange it with /system <text>, remove it with /system clear."
                ),
                None => "No system prompt is set. Set one with /system <text>.".into(),
            };
            context.say(talk, &reply).await?;
            return Ok(());
        }
        "clear" => (Settings { system_prompt: None, ..settings }, "System prompt cleared."),
        prompt => (Settings { system_prompt: Some(prompt.to_string()), ..settings }, "System prompt set."),
    };
    context.store.set_settings(&talk.user, settings).await?;
    context.say(talk, reply).await?;
    Ok(())
}

fn describe(settings: &Settings, model: Option<&str>) -> String {
    let voice = if settings.voice_transcript_only { "transcribe only" } else { "transcribe and answer" };
    format!(
        "Model: {}\nTemperature: {}\nMax answer tokens: {}\nSystem prompt: {}\nVoice notes: {voice}\n\n\
         Change with /settings temperature 0.7, /settings max_tokens 512, /settings voice answer|transcribe, /settings reset.",
        model.unwrap_or("none served"),
        settings.temperature.map_or("default".into(), |t| t.to_string()),
        settings.max_tokens.map_or("default".into(), |t| t.to_string()),
        if settings.system_prompt.is_some() { "set (/system shows it)" } else { "none" },
    )
}

fn voice_buttons(settings: &Settings) -> InlineKeyboardMarkup {
    let label =
        if settings.voice_transcript_only { "Voice notes: answer them too" } else { "Voice notes: transcribe only" };
    let data = if settings.voice_transcript_only { "voice:answer" } else { "voice:transcribe" };
    keyboard(vec![(label.into(), data.into())])
}

async fn settings(context: &Context, talk: &Talk, args: &str) -> anyhow::Result<()> {
    let mut settings = context.store.user_settings(&talk.user).await?;
    let mut words = args.split_whitespace();
    let change = match (words.next(), words.next()) {
        (None, _) => None,
        (Some("reset"), None) => {
            settings = Settings { model: settings.model, system_prompt: settings.system_prompt, ..Settings::default() };
            Some(Ok(()))
        }
        (Some("temperature"), Some(value)) => Some(match value.parse::<f32>() {
            Ok(t) if (0.0..=2.0).contains(&t) => {
                settings.temperature = Some(t);
                Ok(())
            }
            _ => Err("The temperature is a number from 0 to 2."),
        }),
        (Some("max_tokens"), Some(value)) => Some(match value.parse::<u32>() {
            Ok(n) if (1..=8192).contains(&n) => {
                settings.max_tokens = Some(n);
                Ok(())
            }
            _ => Err("max_tokens is a whole number from 1 to 8192."),
        }),
        (Some("voice"), Some(choice @ ("answer" | "transcribe"))) => {
            settings.voice_transcript_only = choice == "transcribe";
            Some(Ok(()))
        }
        _ => Some(Err("I don't know that setting. Send /settings to see them.")),
    };
    if let Some(Err(problem)) = change {
        context.say(talk, problem).await?;
        return Ok(());
    }
    if change.is_some() {
        context.store.set_settings(&talk.user, settings.clone()).await?;
    }
    let model = context.model_for(JobKind::Chat, settings.model.as_deref()).await;
    let mut request = context.bot.send_message(talk.chat, describe(&settings, model.as_deref()));
    if let Some(id) = talk.reply_to {
        request = request.reply_parameters(ReplyParameters::new(id).allow_sending_without_reply());
    }
    request.reply_markup(voice_buttons(&settings)).await?;
    Ok(())
}

async fn ner(context: &Context, talk: &Talk, text: &str) -> anyhow::Result<()> {
    if text.is_empty() {
        context.say(talk, "Send /ner followed by a text, e.g. /ner Ada Lovelace was born in London.").await?;
        return Ok(());
    }
    let Some(slot) = context.begin_job(talk).await? else { return Ok(()) };
    let Some(model) = context.model_for(JobKind::Ner, None).await else {
        context.say(talk, "No entity model is being served right now; please try again later.").await?;
        return Ok(());
    };
    let origin = Origin { frontend: "telegram".into(), user: talk.user.to_string(), conversation: None };
    let job = Job::new(model, origin, JobInput::Ner(NerInput { text: text.to_string() }));
    slot.holds(job.id);
    let outcome = tokio::time::timeout(context.config.job_timeout, context.client.run_job(&job)).await;
    let reply = match outcome {
        Ok(Ok((JobResult::Ner { entities }, _))) if entities.is_empty() => {
            "I found no names, places or organisations.".into()
        }
        Ok(Ok((JobResult::Ner { entities }, _))) => {
            let mut reply = String::from("Found:\n");
            for e in entities {
                let _ = writeln!(reply, "• {} — {} ({:.0}%)", e.text, e.label, e.score * 100.0);
            }
            reply
        }
        Ok(Ok(_)) => "⚠️ The worker answered with something else.".into(),
        Ok(Err(JobEnd::Failed { message, .. })) => format!("⚠️ {message}"),
        Ok(Err(JobEnd::Cancelled)) => "(stopped)".into(),
        Ok(Err(JobEnd::Lost(e))) => format!("⚠️ {e}"),
        Err(_) => "⚠️ No worker answered in time; please try again later.".into(),
    };
    context.say(talk, &reply).await?;
    Ok(())
}

async fn export(context: &Context, talk: &Talk) -> anyhow::Result<()> {
    let Some(conversation) = context.store.current_conversation(&talk.user, &talk.chat_key()).await? else {
        context.say(talk, "There is no conversation to export yet.").await?;
        return Ok(());
    };
    let messages = context.store.messages(&talk.user, conversation.id).await?;
    if messages.is_empty() {
        context.say(talk, "This conversation is empty.").await?;
        return Ok(());
    }
    let title = if conversation.title.is_empty() { "Conversation" } else { conversation.title.as_str() };
    let mut markdown = format!("# {title}\n\n_Exported from natter on {}._\n", OffsetDateTime::now_utc().date());
    for message in &messages {
        let who = match message.role {
            natter_shared::proto::Role::User => "You",
            natter_shared::proto::Role::Assistant => "natter",
            natter_shared::proto::Role::System => "System",
        };
        let at = message.at;
        let _ = write!(
            markdown,
            "\n## {who} · {} {:02}:{:02} UTC\n\n{}\n",
            at.date(),
            at.hour(),
            at.minute(),
            message.content.trim()
        );
    }
    let file = InputFile::memory(markdown.into_bytes()).file_name(format!("conversation-{}.md", conversation.id));
    context.bot.send_document(talk.chat, file).caption(format!("{title} ({} messages)", messages.len())).await?;
    Ok(())
}

async fn stats(context: &Context, talk: &Talk) -> anyhow::Result<()> {
    let stats = context.store.stats(OffsetDateTime::now_utc().date()).await?;
    let workers = context.fleet.workers().await;
    let queue = context.client.queue_depth().await;
    let mut models: Vec<&str> = workers.iter().flat_map(|w| w.models.iter().map(String::as_str)).collect();
    models.sort_unstable();
    models.dedup();
    let reply = format!(
        "Users: {}\nConversations: {}\nRequests today: {}\nTokens generated since start: {}\nQueue: {} jobs waiting or running\nWorkers: {} ({})",
        stats.users,
        stats.conversations,
        stats.jobs_today,
        context.tokens.load(Ordering::Relaxed),
        queue.map_or("unknown".into(), |q| q.to_string()),
        workers.len(),
        if models.is_empty() { "no models".to_string() } else { models.join(", ") },
    );
    context.say(talk, &reply).await?;
    Ok(())
}

impl Context {
    /// A press on one of the bot's inline buttons, acting for whoever pressed it.
    pub(super) async fn on_button(self: std::sync::Arc<Self>, query: CallbackQuery) -> anyhow::Result<()> {
        let answer = self.button(&query).await?;
        self.bot.answer_callback_query(query.id).text(answer).await?;
        Ok(())
    }

    async fn button(&self, query: &CallbackQuery) -> anyhow::Result<String> {
        if !self.config.access.allows(&query.from) {
            return Ok("Sorry, this bot is private.".into());
        }
        let Some(message) = query.message.as_ref() else { return Ok("That button has expired.".into()) };
        let (chat, shown) = (message.chat().id, message.id());
        let user = UserId::new("telegram", query.from.id.0);
        self.store.touch_user(&user).await?;
        let data = query.data.as_deref().unwrap_or_default();
        // Confirming in the message itself is only for private chats: in a group
        // the list belongs to whoever asked, and the press acts for the presser.
        let private = chat.is_user();
        let (answer, confirm) = match data.split_once(':') {
            Some(("conv", id)) => {
                let id: u64 = id.parse().unwrap_or(0);
                match self.store.switch_conversation(&user, &chat.to_string(), id).await {
                    Ok(c) => {
                        let title = if c.title.is_empty() { "(empty)".to_string() } else { c.title };
                        (format!("Switched to {title}"), format!("Continuing “{title}”. Write to carry on."))
                    }
                    Err(StoreError::NoSuchConversation(_)) => ("That conversation is not yours.".into(), String::new()),
                    Err(e) => return Err(e.into()),
                }
            }
            Some(("model", model)) => {
                let served = self.fleet.models(JobKind::Chat).await;
                let reply = set_model(self, &user, model, &served).await?;
                (reply.clone(), reply)
            }
            Some(("voice", choice)) => {
                let settings = self.store.user_settings(&user).await?;
                let settings = Settings { voice_transcript_only: choice == "transcribe", ..settings };
                self.store.set_settings(&user, settings.clone()).await?;
                let model = self.model_for(JobKind::Chat, settings.model.as_deref()).await;
                if private {
                    self.bot
                        .edit_message_text(chat, shown, describe(&settings, model.as_deref()))
                        .reply_markup(voice_buttons(&settings))
                        .await?;
                }
                let answer = if settings.voice_transcript_only {
                    "Voice notes: transcribe only"
                } else {
                    "Voice notes: transcribe and answer"
                };
                (answer.into(), String::new())
            }
            _ => ("That button has expired.".into(), String::new()),
        };
        if private && !confirm.is_empty() {
            self.bot.edit_message_text(chat, shown, confirm).await?;
        }
        Ok(answer)
    }
}

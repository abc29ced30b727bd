//! The bot's commands and its inline buttons.

use super::{Context, Talk};
use crate::chatbot::{describe_settings, export_markdown, ner_reply, stats_reply, SettingChange};
use crate::store::{Settings, StoreError};
use natter_shared::proto::JobKind;
use teloxide::payloads::{AnswerCallbackQuerySetters, EditMessageTextSetters, SendDocumentSetters, SendMessageSetters};
use teloxide::prelude::Requester;
use teloxide::types::{
    BotCommand, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, InputFile, ReplyParameters,
};

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
            context.assistant.store.new_conversation(&talk.user, &talk.chat_key(), None).await?;
            context.say(talk, "Started a new conversation.").await?;
        }
        "history" => history(context, talk).await?,
        "model" => model(context, talk, args).await?,
        "system" => system(context, talk, args).await?,
        "settings" => settings(context, talk, args).await?,
        "stop" => {
            let reply = match context.assistant.running_job(&talk.user) {
                Some(job) => {
                    context.assistant.client.cancel(job).await?;
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
    let list = context.assistant.store.list_conversations(&talk.user, &chat).await?;
    if list.is_empty() {
        context.say(talk, "No conversations yet: just write to me.").await?;
        return Ok(());
    }
    let current = context.assistant.store.current_conversation(&talk.user, &chat).await?.map(|c| c.id);
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
    let served = context.assistant.fleet.models(JobKind::Chat).await;
    if !args.is_empty() {
        let reply = context.assistant.set_model(&talk.user, args).await?;
        context.say(talk, &reply).await?;
        return Ok(());
    }
    if served.is_empty() {
        context.say(talk, "No chat model is being served right now.").await?;
        return Ok(());
    }
    let settings = context.assistant.store.user_settings(&talk.user).await?;
    let current = context.assistant.model_for(JobKind::Chat, settings.model.as_deref()).await;
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

async fn system(context: &Context, talk: &Talk, args: &str) -> anyhow::Result<()> {
    let settings = context.assistant.store.user_settings(&talk.user).await?;
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
    context.assistant.store.set_settings(&talk.user, settings).await?;
    context.say(talk, reply).await?;
    Ok(())
}

const SETTINGS_HINT: &str = "Change with /settings temperature 0.7, /settings max_tokens 512, \
/settings voice answer|transcribe, /settings reset.";

fn describe(settings: &Settings, model: Option<&str>) -> String {
    format!("{}\n\n{SETTINGS_HINT}", describe_settings(settings, model))
}

fn voice_buttons(settings: &Settings) -> InlineKeyboardMarkup {
    let label =
        if settings.voice_transcript_only { "Voice notes: answer them too" } else { "Voice notes: transcribe only" };
    let data = if settings.voice_transcript_only { "voice:answer" } else { "voice:transcribe" };
    keyboard(vec![(label.into(), data.into())])
}

async fn settings(context: &Context, talk: &Talk, args: &str) -> anyhow::Result<()> {
    let store = &context.assistant.store;
    let mut settings = store.user_settings(&talk.user).await?;
    if !args.is_empty() {
        let (name, value) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
        match SettingChange::parse(name, value.trim()) {
            Ok(change) => {
                settings = change.apply(settings);
                store.set_settings(&talk.user, settings.clone()).await?;
            }
            Err(problem) => {
                context.say(talk, problem).await?;
                return Ok(());
            }
        }
    }
    let model = context.assistant.model_for(JobKind::Chat, settings.model.as_deref()).await;
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
    let reply = ner_reply(&context.assistant, &talk.user, &slot, text).await;
    context.say(talk, &reply).await?;
    Ok(())
}

async fn export(context: &Context, talk: &Talk) -> anyhow::Result<()> {
    let export = match export_markdown(&context.assistant, &talk.user, &talk.chat_key()).await? {
        Ok(export) => export,
        Err(reason) => {
            context.say(talk, reason).await?;
            return Ok(());
        }
    };
    let file = InputFile::memory(export.markdown.into_bytes()).file_name(export.file_name);
    context.bot.send_document(talk.chat, file).caption(export.caption).await?;
    Ok(())
}

async fn stats(context: &Context, talk: &Talk) -> anyhow::Result<()> {
    let reply = stats_reply(&context.assistant).await?;
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
        let user = self.assistant.user_id(query.from.id.0);
        self.assistant.store.touch_user(&user).await?;
        let data = query.data.as_deref().unwrap_or_default();
        // Confirming in the message itself is only for private chats: in a group
        // the list belongs to whoever asked, and the press acts for the presser.
        let private = chat.is_user();
        let (answer, confirm) = match data.split_once(':') {
            Some(("conv", id)) => {
                let id: u64 = id.parse().unwrap_or(0);
                match self.assistant.store.switch_conversation(&user, &chat.to_string(), id).await {
                    Ok(c) => {
                        let title = if c.title.is_empty() { "(empty)".to_string() } else { c.title };
                        (format!("Switched to {title}"), format!("Continuing “{title}”. Write to carry on."))
                    }
                    Err(StoreError::NoSuchConversation(_)) => ("That conversation is not yours.".into(), String::new()),
                    Err(e) => return Err(e.into()),
                }
            }
            Some(("model", model)) => {
                let reply = self.assistant.set_model(&user, model).await?;
                (reply.clone(), reply)
            }
            Some(("voice", choice)) => {
                let settings = self.assistant.store.user_settings(&user).await?;
                let settings = Settings { voice_transcript_only: choice == "transcribe", ..settings };
                self.assistant.store.set_settings(&user, settings.clone()).await?;
                let model = self.assistant.model_for(JobKind::Chat, settings.model.as_deref()).await;
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

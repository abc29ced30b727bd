//! The bots' replies to commands that read the same on every platform:
//! settings, entities, the exported conversation and the admins' statistics.

use super::Assistant;
use crate::client::JobEnd;
use crate::store::{Settings, StoreError, UserId};
use natter_shared::proto::{Job, JobInput, JobKind, JobResult, NerInput, Role};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use time::OffsetDateTime;

/// One change a user asks of their settings.
#[derive(Clone, Debug, PartialEq)]
pub enum SettingChange {
    /// Back to the defaults, keeping the model and the system prompt.
    Reset,
    Temperature(f32),
    MaxTokens(u32),
    /// `true`: voice notes are transcribed only, not answered.
    TranscriptOnly(bool),
}

impl SettingChange {
    /// Reads `name value` (`temperature 0.7`, `max_tokens 512`, `voice
    /// answer|transcribe`, `reset`); `Err` says what is wrong.
    pub fn parse(name: &str, value: &str) -> Result<SettingChange, &'static str> {
        match (name, value) {
            ("reset", "") => Ok(SettingChange::Reset),
            ("temperature", value) => match value.parse::<f32>() {
                Ok(t) if (0.0..=2.0).contains(&t) => Ok(SettingChange::Temperature(t)),
                _ => Err("The temperature is a number from 0 to 2."),
            },
            ("max_tokens", value) => match value.parse::<u32>() {
                Ok(n) if (1..=8192).contains(&n) => Ok(SettingChange::MaxTokens(n)),
                _ => Err("max_tokens is a whole number from 1 to 8192."),
            },
            ("voice", choice @ ("answer" | "transcribe")) => Ok(SettingChange::TranscriptOnly(choice == "transcribe")),
            _ => Err("I don't know that setting. Use /settings to see them."),
        }
    }

    pub fn apply(&self, settings: Settings) -> Settings {
        match *self {
            SettingChange::Reset => {
                Settings { model: settings.model, system_prompt: settings.system_prompt, ..Settings::default() }
            }
            SettingChange::Temperature(t) => Settings { temperature: Some(t), ..settings },
            SettingChange::MaxTokens(n) => Settings { max_tokens: Some(n), ..settings },
            SettingChange::TranscriptOnly(only) => Settings { voice_transcript_only: only, ..settings },
        }
    }
}

/// The user's settings as a short list.
pub fn describe_settings(settings: &Settings, model: Option<&str>) -> String {
    let voice = if settings.voice_transcript_only { "transcribe only" } else { "transcribe and answer" };
    format!(
        "Model: {}\nTemperature: {}\nMax answer tokens: {}\nSystem prompt: {}\nVoice notes: {voice}",
        model.unwrap_or("none served"),
        settings.temperature.map_or("default".into(), |t| t.to_string()),
        settings.max_tokens.map_or("default".into(), |t| t.to_string()),
        if settings.system_prompt.is_some() { "set (/system shows it)" } else { "none" },
    )
}

/// Runs an entity job on `text` (the user's slot already taken) and words the result.
pub async fn ner_reply(assistant: &Assistant, user: &UserId, slot: &super::Slot, text: &str) -> String {
    let Some(model) = assistant.model_for(JobKind::Ner, None).await else {
        return "No entity model is being served right now; please try again later.".into();
    };
    let job = Job::new(model, assistant.origin(user, None), JobInput::Ner(NerInput { text: text.to_string() }));
    slot.holds(job.id);
    match tokio::time::timeout(assistant.job_timeout, assistant.client.run_job(&job)).await {
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
    }
}

/// A conversation exported as a file.
pub struct Export {
    pub file_name: String,
    pub markdown: String,
    pub caption: String,
}

/// The user's current conversation in `chat` as Markdown; `Err` says why there is none.
pub async fn export_markdown(
    assistant: &Assistant,
    user: &UserId,
    chat: &str,
) -> Result<Result<Export, &'static str>, StoreError> {
    let Some(conversation) = assistant.store.current_conversation(user, chat).await? else {
        return Ok(Err("There is no conversation to export yet."));
    };
    let messages = assistant.store.messages(user, conversation.id).await?;
    if messages.is_empty() {
        return Ok(Err("This conversation is empty."));
    }
    let title = if conversation.title.is_empty() { "Conversation" } else { conversation.title.as_str() };
    let mut markdown = format!("# {title}\n\n_Exported from natter on {}._\n", OffsetDateTime::now_utc().date());
    for message in &messages {
        let who = match message.role {
            Role::User => "You",
            Role::Assistant => "natter",
            Role::System => "System",
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
    Ok(Ok(Export {
        file_name: format!("conversation-{}.md", conversation.id),
        caption: format!("{title} ({} messages)", messages.len()),
        markdown,
    }))
}

/// How the bot and the fleet are doing, for admins.
pub async fn stats_reply(assistant: &Assistant) -> Result<String, StoreError> {
    let stats = assistant.store.stats(OffsetDateTime::now_utc().date()).await?;
    let workers = assistant.fleet.workers().await;
    let queue = assistant.client.queue_depth().await;
    let mut models: Vec<&str> = workers.iter().flat_map(|w| w.models.iter().map(String::as_str)).collect();
    models.sort_unstable();
    models.dedup();
    Ok(format!(
        "Users: {}\nConversations: {}\nRequests today: {}\nTokens generated since start: {}\nQueue: {} jobs waiting or running\nWorkers: {} ({})",
        stats.users,
        stats.conversations,
        stats.jobs_today,
        assistant.tokens.load(Ordering::Relaxed),
        queue.map_or("unknown".into(), |q| q.to_string()),
        workers.len(),
        if models.is_empty() { "no models".to_string() } else { models.join(", ") },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_changes_are_read_and_checked() {
        assert_eq!(SettingChange::parse("temperature", "0.7"), Ok(SettingChange::Temperature(0.7)));
        assert!(SettingChange::parse("temperature", "3").is_err());
        assert_eq!(SettingChange::parse("max_tokens", "512"), Ok(SettingChange::MaxTokens(512)));
        assert!(SettingChange::parse("max_tokens", "0").is_err());
        assert_eq!(SettingChange::parse("voice", "transcribe"), Ok(SettingChange::TranscriptOnly(true)));
        assert!(SettingChange::parse("colour", "blue").is_err());
        let custom = Settings { model: Some("m".into()), temperature: Some(1.5), ..Settings::default() };
        let reset = SettingChange::Reset.apply(custom);
        assert_eq!((reset.model.as_deref(), reset.temperature), (Some("m"), None));
    }
}

//! Slash commands, registered when the bot connects and again when the
//! fleet's chat models change, and the select menus
//! some of them answer with. Every interaction is deferred at once, inside
//! Discord's three-second window, and then answered through its responses;
//! replies about a user's own data are ephemeral, seen by them alone.

use super::jobs::chat_turn;
use super::sink::Deferred;
use super::{Context, ReplyTo, Talk};
use crate::chatbot::{describe_settings, export_markdown, ner_reply, stats_reply, SettingChange};
use crate::store::{Settings, StoreError};
use natter_shared::proto::JobKind;
use serenity::all::{
    Builder, Command, CommandDataOption, CommandInteraction, CommandOptionType, ComponentInteraction,
    ComponentInteractionDataKind, CreateActionRow, CreateAttachment, CreateCommand, CreateCommandOption,
    CreateInteractionResponse, CreateInteractionResponseMessage, CreateSelectMenu, CreateSelectMenuKind,
    CreateSelectMenuOption, EditInteractionResponse, Interaction, RoleId,
};

/// Discord's limits: options in a select menu, characters in a label.
const MENU_OPTIONS: usize = 25;
const LABEL_CHARS: usize = 100;

const HELP: &str = "I'm natter, a self-hosted assistant.\n\n\
Mention me or write to me directly and I'll answer; reply to one of my answers to carry that conversation on. \
Attach an image and I'll read the text in it; send a voice message, audio or video and I'll transcribe it and answer it.\n\n\
`/chat` ask something · `/new` start a new conversation · `/history` switch conversations · \
`/model` pick the chat model · `/system` the system prompt · `/settings` temperature, answer length, voice messages · \
`/stop` stop the running answer · `/ner` find names, places and organisations · `/export` the conversation as a file";

fn option(kind: CommandOptionType, name: &str, description: &str) -> CreateCommandOption {
    CreateCommandOption::new(kind, name, description)
}

/// The commands, with the chat models the fleet serves now as `/model`'s choices.
fn definitions(models: &[String]) -> Vec<CreateCommand> {
    let mut model = option(CommandOptionType::String, "name", "The model to answer with");
    for name in models.iter().take(MENU_OPTIONS) {
        model = model.add_string_choice(name, name);
    }
    vec![
        CreateCommand::new("chat")
            .description("Ask something in your current conversation")
            .add_option(option(CommandOptionType::String, "prompt", "What to ask").required(true)),
        CreateCommand::new("new").description("Start a new conversation"),
        CreateCommand::new("history").description("Your conversations here; switch to another"),
        CreateCommand::new("model").description("Pick the chat model").add_option(model),
        CreateCommand::new("system")
            .description("Show, set or clear the system prompt")
            .add_option(option(CommandOptionType::String, "prompt", "The new system prompt"))
            .add_option(option(CommandOptionType::Boolean, "clear", "Remove the system prompt")),
        CreateCommand::new("settings")
            .description("Temperature, answer length, voice messages")
            .add_option(
                option(CommandOptionType::Number, "temperature", "Sampling temperature")
                    .min_number_value(0.0)
                    .max_number_value(2.0),
            )
            .add_option(
                option(CommandOptionType::Integer, "max_tokens", "Longest answer in tokens")
                    .min_int_value(1)
                    .max_int_value(8192),
            )
            .add_option(
                option(CommandOptionType::String, "voice", "What to do with voice messages")
                    .add_string_choice("transcribe and answer", "answer")
                    .add_string_choice("transcribe only", "transcribe"),
            )
            .add_option(option(CommandOptionType::Boolean, "reset", "Back to the defaults")),
        CreateCommand::new("stop").description("Stop the running answer"),
        CreateCommand::new("ner")
            .description("Find names, places and organisations in a text")
            .add_option(option(CommandOptionType::String, "text", "The text").required(true)),
        CreateCommand::new("export").description("The conversation as a Markdown file"),
        CreateCommand::new("stats").description("How the bot and the fleet are doing (admins)"),
        CreateCommand::new("help").description("What this bot can do"),
    ]
}

/// Registers the global commands when the fleet's chat models differ from the
/// ones `/model` offers (on connecting, and as workers come and go); a failure
/// is logged and tried again next time, the bot keeps answering mentions.
pub(super) async fn register(context: &Context) {
    let mut models = context.assistant.fleet.models(JobKind::Chat).await;
    models.sort();
    let Ok(mut registered) = context.registered.lock().map(|r| r.clone()) else { return };
    if registered.as_ref() == Some(&models) {
        return;
    }
    match Command::set_global_commands(&context.http, definitions(&models)).await {
        Ok(_) => registered = Some(models),
        Err(e) => tracing::warn!("registering the slash commands failed: {e}"),
    }
    if let Ok(mut slot) = context.registered.lock() {
        *slot = registered;
    }
}

fn text_option<'a>(options: &'a [CommandDataOption], name: &str) -> Option<&'a str> {
    options.iter().find(|o| o.name == name).and_then(|o| o.value.as_str())
}

impl Context {
    pub(super) async fn on_interaction(self: std::sync::Arc<Self>, interaction: Interaction) -> anyhow::Result<()> {
        match interaction {
            Interaction::Command(command) => self.on_command(command).await,
            Interaction::Component(component) => self.on_component(component).await,
            _ => Ok(()),
        }
    }

    /// Who is behind an interaction, if they may use the bot; otherwise they
    /// are told why not.
    async fn interaction_talk(
        &self,
        user: &serenity::all::User,
        roles: &[RoleId],
        interaction: (serenity::all::InteractionId, &str),
        guild: Option<serenity::all::GuildId>,
        channel: serenity::all::ChannelId,
        public: bool,
    ) -> anyhow::Result<Option<Talk>> {
        let (id, token) = interaction;
        let refusal = self.config.access.check(user.id.get(), roles, guild, channel).err();
        let ephemeral = !public || refusal.is_some();
        let defer = CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new().ephemeral(ephemeral));
        defer.execute(&*self.http, (id, token)).await?;
        let talk = Talk {
            user: self.assistant.user_id(user.id),
            guild,
            channel,
            reply: ReplyTo::Interaction { token: token.to_string(), deferred: Deferred::default() },
            admin: self.config.access.is_admin(user.id.get()),
        };
        if let Some(refusal) = refusal {
            self.say(&talk, refusal.reply()).await?;
            return Ok(None);
        }
        self.assistant.store.touch_user(&talk.user).await?;
        Ok(Some(talk))
    }

    async fn on_command(&self, command: CommandInteraction) -> anyhow::Result<()> {
        let name = command.data.name.as_str();
        let roles = command.member.as_ref().map(|m| m.roles.as_slice()).unwrap_or_default();
        // Answers and entities are for the channel; the rest is the user's own.
        let public = matches!(name, "chat" | "ner");
        let ids = (command.id, command.token.as_str());
        let Some(talk) =
            self.interaction_talk(&command.user, roles, ids, command.guild_id, command.channel_id, public).await?
        else {
            return Ok(());
        };
        let options = command.data.options.as_slice();
        match name {
            "chat" => {
                let prompt = text_option(options, "prompt").unwrap_or_default().trim().to_string();
                if prompt.is_empty() {
                    self.say(&talk, "Ask me something: /chat prompt:<your question>").await?;
                } else {
                    chat_turn(self, &talk, None, prompt).await?;
                }
            }
            "new" => {
                self.assistant.store.new_conversation(&talk.user, &talk.chat_key(), None).await?;
                self.say(&talk, "Started a new conversation.").await?;
            }
            "history" => self.history(&talk).await?,
            "model" => self.model(&talk, text_option(options, "name")).await?,
            "system" => self.system(&talk, options).await?,
            "settings" => self.settings(&talk, options).await?,
            "stop" => {
                let reply = match self.assistant.running_job(&talk.user) {
                    Some(job) => {
                        self.assistant.client.cancel(job).await?;
                        "Stopping."
                    }
                    None => "Nothing is running.",
                };
                self.say(&talk, reply).await?;
            }
            "ner" => {
                let text = text_option(options, "text").unwrap_or_default();
                if let Some(slot) = self.begin_job(&talk).await? {
                    let reply = ner_reply(&self.assistant, &talk.user, &slot, text).await;
                    self.say(&talk, &reply).await?;
                }
            }
            "export" => self.export(&talk).await?,
            "stats" if talk.admin => self.say(&talk, &stats_reply(&self.assistant).await?).await?,
            "stats" => self.say(&talk, "/stats is for the bot's admins.").await?,
            "help" => self.say(&talk, HELP).await?,
            other => self.say(&talk, &format!("I don't know /{other}.")).await?,
        }
        Ok(())
    }

    /// Fills the deferred response with a text and a select menu.
    async fn menu(&self, talk: &Talk, text: &str, menu: CreateSelectMenu) -> anyhow::Result<()> {
        let ReplyTo::Interaction { token, .. } = &talk.reply else { return Ok(()) };
        let response = EditInteractionResponse::new().content(text).components(vec![CreateActionRow::SelectMenu(menu)]);
        response.execute(&*self.http, token.as_str()).await?;
        Ok(())
    }

    async fn history(&self, talk: &Talk) -> anyhow::Result<()> {
        let chat = talk.chat_key();
        let list = self.assistant.store.list_conversations(&talk.user, &chat).await?;
        if list.is_empty() {
            self.say(talk, "No conversations yet: just write to me.").await?;
            return Ok(());
        }
        let current = self.assistant.store.current_conversation(&talk.user, &chat).await?.map(|c| c.id);
        let options = list
            .iter()
            .take(MENU_OPTIONS)
            .map(|c| {
                let title = if c.title.is_empty() { "(empty)" } else { c.title.as_str() };
                let label: String = format!("{title} · {}", c.updated.date()).chars().take(LABEL_CHARS).collect();
                CreateSelectMenuOption::new(label, c.id.to_string()).default_selection(Some(c.id) == current)
            })
            .collect();
        let menu = CreateSelectMenu::new("conv", CreateSelectMenuKind::String { options });
        let text = format!("Your conversations here ({}); pick one to continue it:", list.len());
        self.menu(talk, &text, menu).await
    }

    async fn model(&self, talk: &Talk, name: Option<&str>) -> anyhow::Result<()> {
        if let Some(name) = name {
            let reply = self.assistant.set_model(&talk.user, name).await?;
            self.say(talk, &reply).await?;
            return Ok(());
        }
        let served = self.assistant.fleet.models(JobKind::Chat).await;
        if served.is_empty() {
            self.say(talk, "No chat model is being served right now.").await?;
            return Ok(());
        }
        let settings = self.assistant.store.user_settings(&talk.user).await?;
        let current = self.assistant.model_for(JobKind::Chat, settings.model.as_deref()).await;
        let options = served
            .iter()
            .take(MENU_OPTIONS)
            .map(|m| CreateSelectMenuOption::new(m, m).default_selection(Some(m) == current.as_ref()))
            .collect();
        let menu = CreateSelectMenu::new("model", CreateSelectMenuKind::String { options });
        let text = format!("Answering with {}. The fleet serves:", current.as_deref().unwrap_or("nothing"));
        self.menu(talk, &text, menu).await
    }

    async fn system(&self, talk: &Talk, options: &[CommandDataOption]) -> anyhow::Result<()> {
        let store = &self.assistant.store;
        let settings = store.user_settings(&talk.user).await?;
        let clear = options.iter().any(|o| o.name == "clear" && o.value.as_bool() == Some(true));
        let (settings, reply) = match (clear, text_option(options, "prompt")) {
            (true, _) => (Settings { system_prompt: None, ..settings }, "System prompt cleared."),
            (false, Some(prompt)) => {
                (Settings { system_prompt: Some(prompt.to_string()), ..settings }, "System prompt set.")
            }
            (false, None) => {
                let reply = match &settings.system_prompt {
                    Some(prompt) => format!(
                        "Your system prompt:\n\n{prompt}\n\nChange it with /system prompt:<text>, remove it with /system clear:True."
                    ),
                    None => "No system prompt is set. Set one with /system prompt:<text>.".into(),
                };
                self.say(talk, &reply).await?;
                return Ok(());
            }
        };
        store.set_settings(&talk.user, settings).await?;
        self.say(talk, reply).await?;
        Ok(())
    }

    async fn settings(&self, talk: &Talk, options: &[CommandDataOption]) -> anyhow::Result<()> {
        let store = &self.assistant.store;
        let mut settings = store.user_settings(&talk.user).await?;
        let mut changed = false;
        for option in options {
            let value = match (&option.value.as_f64(), &option.value.as_i64(), &option.value.as_str()) {
                (Some(number), _, _) => number.to_string(),
                (_, Some(integer), _) => integer.to_string(),
                (_, _, Some(text)) => text.to_string(),
                // `reset:False` asks for nothing.
                _ if option.value.as_bool() == Some(false) => continue,
                _ => String::new(),
            };
            match SettingChange::parse(&option.name, &value) {
                Ok(change) => {
                    settings = change.apply(settings);
                    changed = true;
                }
                Err(problem) => {
                    self.say(talk, problem).await?;
                    return Ok(());
                }
            }
        }
        if changed {
            store.set_settings(&talk.user, settings.clone()).await?;
        }
        let model = self.assistant.model_for(JobKind::Chat, settings.model.as_deref()).await;
        let text = format!(
            "{}\n\nChange with /settings temperature:0.7, max_tokens:512, voice:transcribe only, reset:True.",
            describe_settings(&settings, model.as_deref())
        );
        self.say(talk, &text).await?;
        Ok(())
    }

    async fn export(&self, talk: &Talk) -> anyhow::Result<()> {
        let export = match export_markdown(&self.assistant, &talk.user, &talk.chat_key()).await? {
            Ok(export) => export,
            Err(reason) => {
                self.say(talk, reason).await?;
                return Ok(());
            }
        };
        let ReplyTo::Interaction { token, .. } = &talk.reply else { return Ok(()) };
        let file = CreateAttachment::bytes(export.markdown.into_bytes(), export.file_name);
        let response = EditInteractionResponse::new().content(export.caption).new_attachment(file);
        response.execute(&*self.http, token.as_str()).await?;
        Ok(())
    }

    /// A choice in one of the bot's select menus, acting for whoever made it.
    async fn on_component(&self, component: ComponentInteraction) -> anyhow::Result<()> {
        let user = &component.user;
        let roles = component.member.as_ref().map(|m| m.roles.as_slice()).unwrap_or_default();
        let access = self.config.access.check(user.id.get(), roles, component.guild_id, component.channel_id);
        let reply = match access {
            Err(refusal) => refusal.reply().to_string(),
            Ok(()) => {
                let user = self.assistant.user_id(user.id);
                self.assistant.store.touch_user(&user).await?;
                let chosen = match &component.data.kind {
                    ComponentInteractionDataKind::StringSelect { values } => values.first().cloned(),
                    _ => None,
                };
                match (component.data.custom_id.as_str(), chosen) {
                    ("conv", Some(id)) => {
                        let chat = super::chat_key(component.guild_id, component.channel_id);
                        let id = id.parse().unwrap_or(0);
                        match self.assistant.store.switch_conversation(&user, &chat, id).await {
                            Ok(c) => {
                                let title = if c.title.is_empty() { "(empty)".to_string() } else { c.title };
                                format!("Continuing “{title}”. Write to carry on.")
                            }
                            Err(StoreError::NoSuchConversation(_)) => "That conversation is not yours.".into(),
                            Err(e) => return Err(e.into()),
                        }
                    }
                    ("model", Some(model)) => self.assistant.set_model(&user, &model).await?,
                    _ => "That menu has expired.".into(),
                }
            }
        };
        let update = CreateInteractionResponseMessage::new().content(reply).components(Vec::new());
        CreateInteractionResponse::UpdateMessage(update).execute(&*self.http, (component.id, &component.token)).await?;
        Ok(())
    }
}

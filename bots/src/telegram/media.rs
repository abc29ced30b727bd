//! Files people send: photos and images become OCR jobs whose text comes back
//! as a reply; voice notes, audio, video notes and videos become
//! speech-to-text jobs whose transcript comes back and, unless the user chose
//! transcripts only, is then answered as a chat turn.

use super::jobs::chat_turn;
use super::sink::ChatSink;
use super::{Context, Talk, MAX_DOWNLOAD};
use crate::chatbot::Slot;
use crate::relay::Relay;
use natter_shared::proto::{Blob, JobKind};
use std::sync::{Arc, Mutex};
use teloxide::net::Download;
use teloxide::prelude::Requester;
use teloxide::types::{FileMeta, Message};

enum Media<'a> {
    Image {
        file: &'a FileMeta,
        mime: String,
    },
    Sound {
        file: &'a FileMeta,
        mime: String,
    },
    /// Something sent that natter cannot use, described for the reply.
    Unsupported(String),
}

/// What kind of file a message carries, if any.
fn classify(message: &Message) -> Option<Media<'_>> {
    let mime_or =
        |mime: Option<&mime::Mime>, fallback: &str| mime.map_or_else(|| fallback.to_string(), |m| m.to_string());
    if let Some(sizes) = message.photo() {
        // Telegram sends several sizes of a photo; the largest reads best.
        let largest = sizes.iter().max_by_key(|p| u64::from(p.width) * u64::from(p.height))?;
        return Some(Media::Image { file: &largest.file, mime: "image/jpeg".into() });
    }
    if let Some(voice) = message.voice() {
        return Some(Media::Sound { file: &voice.file, mime: mime_or(voice.mime_type.as_ref(), "audio/ogg") });
    }
    if let Some(audio) = message.audio() {
        return Some(Media::Sound { file: &audio.file, mime: mime_or(audio.mime_type.as_ref(), "audio/mpeg") });
    }
    if let Some(note) = message.video_note() {
        return Some(Media::Sound { file: &note.file, mime: "video/mp4".into() });
    }
    if let Some(video) = message.video() {
        return Some(Media::Sound { file: &video.file, mime: mime_or(video.mime_type.as_ref(), "video/mp4") });
    }
    if let Some(document) = message.document() {
        let mime = document.mime_type.as_ref();
        return Some(match mime.map(|m| m.type_()) {
            Some(mime::IMAGE) => Media::Image { file: &document.file, mime: mime_or(mime, "") },
            Some(mime::AUDIO | mime::VIDEO) => Media::Sound { file: &document.file, mime: mime_or(mime, "") },
            _ => Media::Unsupported(match (&document.file_name, mime) {
                (_, Some(mime)) => format!("{mime} files"),
                (Some(name), None) => format!("files like {name}"),
                (None, None) => "this kind of file".into(),
            }),
        });
    }
    if message.sticker().is_some() {
        return Some(Media::Unsupported("stickers".into()));
    }
    None
}

/// Handles a message that carries a file; `false` when it carries none.
pub(super) async fn handle(context: &Context, talk: &Talk, message: &Message) -> anyhow::Result<bool> {
    let Some(media) = classify(message) else { return Ok(false) };
    match media {
        Media::Unsupported(what) => {
            let reply = format!(
                "I can read the text in photos and images, and transcribe voice notes, audio and video notes, but not {what}."
            );
            context.say(talk, &reply).await?;
        }
        Media::Image { file, mime } => read_image(context, talk, file, &mime).await?,
        Media::Sound { file, mime } => {
            if let Some(transcript) = transcribe(context, talk, file, &mime).await? {
                let settings = context.assistant.store.user_settings(&talk.user).await?;
                if !settings.voice_transcript_only {
                    chat_turn(context, talk, None, transcript).await?;
                }
            }
        }
    }
    Ok(true)
}

fn too_big(size: u64) -> String {
    format!(
        "That file is {:.1} MB, and Telegram lets bots download at most {} MB. Please send a smaller one.",
        size as f64 / (1024.0 * 1024.0),
        MAX_DOWNLOAD / (1024 * 1024)
    )
}

/// The file's bytes, or what to tell the user when it cannot be had.
async fn download(context: &Context, file: &FileMeta) -> Result<Vec<u8>, String> {
    // `u32::MAX` is teloxide's stand-in for a size Telegram did not give.
    if file.size != u32::MAX && file.size > MAX_DOWNLOAD {
        return Err(too_big(file.size.into()));
    }
    let info = context
        .bot
        .get_file(file.id.clone())
        .await
        .map_err(|e| format!("⚠️ Telegram would not hand me the file: {e}"))?;
    if info.meta.size != u32::MAX && info.meta.size > MAX_DOWNLOAD {
        return Err(too_big(info.meta.size.into()));
    }
    let mut bytes = Vec::new();
    context
        .bot
        .download_file(&info.path, &mut bytes)
        .await
        .map_err(|e| format!("⚠️ Downloading the file from Telegram failed: {e}"))?;
    if bytes.len() > MAX_DOWNLOAD as usize {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// What a file job needs before it is submitted: the user's job slot, a
/// served model of `kind`, and the file in the blob store. `None` once the
/// user has been told why not.
async fn prepare(
    context: &Context,
    talk: &Talk,
    kind: JobKind,
    file: &FileMeta,
    mime: &str,
) -> anyhow::Result<Option<(Slot, String, Blob)>> {
    let download = download(context, file);
    match context.assistant.prepare_file(&talk.user, talk.admin, kind, mime, download).await? {
        Ok(prepared) => Ok(Some(prepared)),
        Err(refusal) => {
            context.say(talk, &refusal).await?;
            Ok(None)
        }
    }
}

/// A streamed reply to what `talk` sent.
fn reply(context: &Context, talk: &Talk) -> Relay<ChatSink> {
    Relay::new(ChatSink::new(context.bot.clone(), talk.chat, talk.reply_to), context.limits(talk.group))
}

/// Reads the text in an image; the lines appear as the worker reads them.
async fn read_image(context: &Context, talk: &Talk, file: &FileMeta, mime: &str) -> anyhow::Result<()> {
    let Some((slot, model, image)) = prepare(context, talk, JobKind::Ocr, file, mime).await? else { return Ok(()) };
    let texts = context.assistant.read_image(&slot, &talk.user, &model, image).await?;
    context.assistant.show_file_job(reply(context, talk), JobKind::Ocr, model, texts).await?;
    Ok(())
}

/// Transcribes a voice note, audio or video; returns the transcript when there
/// is one to answer.
async fn transcribe(context: &Context, talk: &Talk, file: &FileMeta, mime: &str) -> anyhow::Result<Option<String>> {
    let Some((slot, model, audio)) = prepare(context, talk, JobKind::Asr, file, mime).await? else { return Ok(None) };
    let transcript = Arc::new(Mutex::new(None));
    let texts = context.assistant.transcribe(&slot, &talk.user, &model, audio, transcript.clone()).await?;
    context.assistant.show_file_job(reply(context, talk), JobKind::Asr, model, texts).await?;
    drop(slot);
    Ok(transcript.lock().ok().and_then(|t| t.clone()))
}

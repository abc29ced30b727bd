//! Attachments people send: images become OCR jobs whose text comes back as a
//! reply; audio files, videos and voice messages become speech-to-text jobs
//! whose transcript comes back and, unless the user chose transcripts only, is
//! then answered as a chat turn.

use super::jobs::chat_turn;
use super::sink::DiscordSink;
use super::{Context, Talk, MAX_DOWNLOAD};
use crate::chatbot::Slot;
use crate::relay::Relay;
use futures::StreamExt;
use natter_shared::proto::{Blob, JobKind};
use serenity::all::{Attachment, Message, MessageFlags};
use std::sync::{Arc, Mutex};

enum Media<'a> {
    Image(&'a Attachment, String),
    Sound(&'a Attachment, String),
    /// Something sent that natter cannot use, described for the reply.
    Unsupported(String),
}

/// What the message's first attachment is, if it has one.
fn classify(message: &Message) -> Option<Media<'_>> {
    let attachment = message.attachments.first()?;
    let voice = message.flags.is_some_and(|f| f.contains(MessageFlags::IS_VOICE_MESSAGE));
    let mime = attachment.content_type.clone().unwrap_or_else(|| guess_type(&attachment.filename).to_string());
    let kind = mime.split('/').next().unwrap_or_default();
    Some(match kind {
        // Voice messages are Ogg Opus, whatever type they are labelled with.
        _ if voice => Media::Sound(attachment, "audio/ogg".into()),
        "image" => Media::Image(attachment, mime),
        "audio" | "video" => Media::Sound(attachment, mime),
        _ if mime.is_empty() || mime == "application/octet-stream" => {
            Media::Unsupported(format!("files like {}", attachment.filename))
        }
        _ => Media::Unsupported(format!("{mime} files")),
    })
}

/// A content type from the file name, for attachments Discord sent without one.
fn guess_type(filename: &str) -> &'static str {
    let extension = filename.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "m4a" => "audio/mp4",
        "mp4" | "mov" => "video/mp4",
        "webm" => "video/webm",
        _ => "",
    }
}

/// Handles a message that carries an attachment; `false` when it carries none.
pub(super) async fn handle(context: &Context, talk: &Talk, message: &Message) -> anyhow::Result<bool> {
    let Some(media) = classify(message) else { return Ok(false) };
    match media {
        Media::Unsupported(what) => {
            let reply = format!(
                "I can read the text in images and transcribe voice messages, audio and video files, but not {what}."
            );
            context.say(talk, &reply).await?;
        }
        Media::Image(attachment, mime) => read_image(context, talk, attachment, &mime).await?,
        Media::Sound(attachment, mime) => {
            if let Some(transcript) = transcribe(context, talk, attachment, &mime).await? {
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
        "That file is {:.1} MB; I take files up to {} MB. Please send a smaller one.",
        size as f64 / (1024.0 * 1024.0),
        MAX_DOWNLOAD / (1024 * 1024)
    )
}

/// The attachment's bytes, or what to tell the user when they cannot be had.
/// The size Discord states is checked first, and the download is cut off at
/// the limit whatever it stated.
async fn download(context: &Context, attachment: &Attachment) -> Result<Vec<u8>, String> {
    if u64::from(attachment.size) > MAX_DOWNLOAD {
        return Err(too_big(attachment.size.into()));
    }
    let failed = |e: reqwest::Error| format!("⚠️ Downloading the attachment from Discord failed: {e}");
    let response = context.downloads.get(&attachment.url).send().await.and_then(|r| r.error_for_status());
    let mut chunks = response.map_err(failed)?.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        bytes.extend_from_slice(&chunk.map_err(failed)?);
        if bytes.len() as u64 > MAX_DOWNLOAD {
            return Err(too_big(bytes.len() as u64));
        }
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
    attachment: &Attachment,
    mime: &str,
) -> anyhow::Result<Option<(Slot, String, Blob)>> {
    let download = download(context, attachment);
    match context.assistant.prepare_file(&talk.user, talk.admin, kind, mime, download).await? {
        Ok(prepared) => Ok(Some(prepared)),
        Err(refusal) => {
            context.say(talk, &refusal).await?;
            Ok(None)
        }
    }
}

/// A streamed reply to what `talk` sent.
fn reply(context: &Context, talk: &Talk) -> Relay<DiscordSink> {
    Relay::new(DiscordSink::new(context.http.clone(), talk.channel, talk.reply.clone()), context.config.limits.clone())
}

/// Reads the text in an image; the lines appear as the worker reads them.
async fn read_image(context: &Context, talk: &Talk, attachment: &Attachment, mime: &str) -> anyhow::Result<()> {
    let Some((slot, model, image)) = prepare(context, talk, JobKind::Ocr, attachment, mime).await? else {
        return Ok(());
    };
    let texts = context.assistant.read_image(&slot, &talk.user, &model, image).await?;
    context.assistant.show_file_job(reply(context, talk), JobKind::Ocr, model, texts).await?;
    Ok(())
}

/// Transcribes a voice message, audio or video; returns the transcript when
/// there is one to answer.
async fn transcribe(
    context: &Context,
    talk: &Talk,
    attachment: &Attachment,
    mime: &str,
) -> anyhow::Result<Option<String>> {
    let Some((slot, model, audio)) = prepare(context, talk, JobKind::Asr, attachment, mime).await? else {
        return Ok(None);
    };
    let transcript = Arc::new(Mutex::new(None));
    let texts = context.assistant.transcribe(&slot, &talk.user, &model, audio, transcript.clone()).await?;
    context.assistant.show_file_job(reply(context, talk), JobKind::Asr, model, texts).await?;
    drop(slot);
    Ok(transcript.lock().ok().and_then(|t| t.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_guessed_from_file_names() {
        assert_eq!(guess_type("voice-message.OGG"), "audio/ogg");
        assert_eq!(guess_type("scan.jpeg"), "image/jpeg");
        assert_eq!(guess_type("notes.txt"), "");
        assert_eq!(guess_type("README"), "");
    }
}

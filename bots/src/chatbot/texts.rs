//! A job's updates as the whole texts a streamed reply shows (`None` for news
//! without text), and [`follow`], which adds the "queued" notice and gives up
//! on a job gone silent.

use crate::client::{AsrUpdate, ChatUpdate, JobClient, OcrUpdate};
use futures::{Stream, StreamExt};
use natter_shared::proto::JobKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a job may wait for a worker before the user is told it is queued.
const QUEUED_NOTICE_AFTER: Duration = Duration::from_millis(1500);

/// A chat job's texts, keeping the answer itself (without failure notes) in
/// `answer` and counting its tokens in `tokens`.
pub fn chat_texts(
    updates: impl Stream<Item = ChatUpdate> + Send + 'static,
    answer: Arc<Mutex<String>>,
    tokens: Arc<AtomicU64>,
) -> impl Stream<Item = Option<String>> + Send + 'static {
    updates.map(move |update| {
        let Ok(mut text) = answer.lock() else { return None };
        match update {
            ChatUpdate::Accepted { .. } => None,
            ChatUpdate::Delta(delta) => {
                text.push_str(&delta);
                Some(text.clone())
            }
            ChatUpdate::Restart { .. } => {
                text.clear();
                Some(String::new())
            }
            ChatUpdate::Done { text: full, metrics, .. } => {
                tokens.fetch_add(u64::from(metrics.completion_tokens), Ordering::Relaxed);
                *text = full;
                Some(text.clone())
            }
            ChatUpdate::Failed { message, .. } => Some(with_note(&text, &format!("⚠️ {message}"))),
            ChatUpdate::Cancelled => Some(with_note(&text, "(stopped)")),
        }
    })
}

/// An OCR job's texts: the lines as they are read, then the whole text.
pub fn ocr_texts(
    updates: impl Stream<Item = OcrUpdate> + Send + 'static,
) -> impl Stream<Item = Option<String>> + Send + 'static {
    updates.scan(Vec::<String>::new(), |lines, update| {
        let shown = match update {
            OcrUpdate::Accepted { .. } => None,
            OcrUpdate::Line(line) => {
                lines.push(line.text);
                Some(format!("📝 {}", lines.join("\n")))
            }
            OcrUpdate::Restart { .. } => {
                lines.clear();
                Some(String::new())
            }
            OcrUpdate::Done { text, .. } if text.trim().is_empty() => Some("I found no text in this image.".into()),
            OcrUpdate::Done { text, .. } => Some(text),
            OcrUpdate::Failed { message, .. } => Some(format!("⚠️ I couldn't read this image: {message}")),
            OcrUpdate::Cancelled => Some(with_note(&lines.join("\n"), "(stopped)")),
        };
        futures::future::ready(Some(shown))
    })
}

/// A speech-to-text job's texts: the segments as they are heard, then the
/// transcript, which is also kept in `transcript` for answering it.
pub fn asr_texts(
    updates: impl Stream<Item = AsrUpdate> + Send + 'static,
    transcript: Arc<Mutex<Option<String>>>,
) -> impl Stream<Item = Option<String>> + Send + 'static {
    updates.scan(Vec::<String>::new(), move |segments, update| {
        let shown = match update {
            AsrUpdate::Accepted { .. } => None,
            AsrUpdate::Segment(segment) => {
                segments.push(segment.text.trim().to_string());
                Some(format!("🎙️ {}", segments.join(" ")))
            }
            AsrUpdate::Restart { .. } => {
                segments.clear();
                Some(String::new())
            }
            AsrUpdate::Done { text, .. } if text.trim().is_empty() => Some("🎙️ (I heard no speech.)".into()),
            AsrUpdate::Done { text, .. } => {
                let text = text.trim().to_string();
                if let Ok(mut transcript) = transcript.lock() {
                    *transcript = Some(text.clone());
                }
                Some(format!("🎙️ {text}"))
            }
            AsrUpdate::Failed { message, .. } => Some(format!("⚠️ I couldn't transcribe this: {message}")),
            AsrUpdate::Cancelled => Some(with_note(&segments.join(" "), "(stopped)")),
        };
        futures::future::ready(Some(shown))
    })
}

fn with_note(text: &str, note: &str) -> String {
    if text.trim().is_empty() {
        note.to_string()
    } else {
        format!("{text}\n\n{note}")
    }
}

/// Turns a job's texts (`None` for news without text) into what the relay
/// shows: a "queued" notice with the position when no worker has taken the
/// job after a moment, and a closing note when the job goes silent for `idle`.
pub fn follow(
    client: JobClient,
    queue: Option<(JobKind, String)>,
    idle: Duration,
    texts: impl Stream<Item = Option<String>> + Send + 'static,
) -> impl Stream<Item = String> + Send + 'static {
    let notice_at = queue.as_ref().map(|_| tokio::time::Instant::now() + QUEUED_NOTICE_AFTER);
    let state = (Box::pin(texts), notice_at, String::new(), false);
    futures::stream::unfold(state, move |(mut texts, mut notice_at, mut last, ended)| {
        let (client, queue) = (client.clone(), queue.clone());
        async move {
            if ended {
                return None;
            }
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(idle, texts.next()) => next,
                    () = tokio::time::sleep_until(notice_at.unwrap_or_else(tokio::time::Instant::now)), if notice_at.is_some() => {
                        notice_at = None;
                        let Some((kind, model)) = &queue else { continue };
                        match client.queue_position(*kind, model).await {
                            Some(position) if position > 0 => {
                                let notice = format!("⏳ Queued: position {position} for {model}. I'll answer as soon as a worker is free.");
                                return Some((notice, (texts, notice_at, last, false)));
                            }
                            _ => continue,
                        }
                    }
                };
                match next {
                    Err(_) => {
                        let note = format!("⚠️ No news from the job for {} s; giving up on it.", idle.as_secs());
                        return Some((with_note(&last, &note), (texts, None, last, true)));
                    }
                    Ok(None) => return None,
                    Ok(Some(news)) => {
                        notice_at = None;
                        if let Some(text) = news {
                            last.clone_from(&text);
                            return Some((text, (texts, notice_at, last, false)));
                        }
                    }
                }
            }
        }
    })
}

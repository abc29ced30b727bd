//! The streaming relay both chat bots use: a streamed answer shown as a message
//! edited in place while it grows, continued in further messages past the
//! platform's length limit, at a rate the platform accepts.
//!
//! The relay takes **the whole answer so far** on every update, not deltas: a new
//! attempt of a job (after a worker died) replaces what an earlier one wrote, and
//! with whole texts that is just another update; the relay edits the messages
//! back to the new text and deletes the ones the new text no longer needs. A bot
//! turns the job client's deltas and restarts into whole texts with a `String`
//! it appends to and clears.
//!
//! The platform side is the [`Sink`] trait, one value per chat, so the relay can
//! be tested against a fake and shared by Telegram and Discord.

use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// What a platform call can answer besides success.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Rate limited (Telegram's 429 `retry_after`, Discord's `retry_after`).
    #[error("rate limited, retry after {0:?}")]
    RetryAfter(Duration),
    /// Longer than the platform accepts once it has parsed the formatting.
    #[error("the text is longer than the platform accepts")]
    TooLong,
    /// The platform refused the text itself, e.g. unbalanced Markdown entities.
    #[error("the platform refused the text: {0}")]
    Rejected(String),
    /// Anything else (network, server error); retried a few times.
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the platform refused the answer, even as plain text: {0}")]
    Rejected(String),
    #[error("the platform refused messages as too long down to {0} units")]
    TooLong(usize),
    #[error("the platform kept failing: {0}")]
    Failed(String),
}

/// How a text is to be shown. The sink renders [`Mode::Formatted`] its
/// platform's way (Markdown, HTML); the relay falls back to [`Mode::Plain`] for
/// a text the platform refused formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Formatted,
    Plain,
}

/// How a platform measures a message against its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// Unicode scalar values (Discord).
    Chars,
    /// UTF-16 code units (Telegram): an emoji outside the BMP counts 2.
    Utf16,
}

impl Measure {
    pub fn len(self, text: &str) -> usize {
        match self {
            Measure::Chars => text.chars().count(),
            Measure::Utf16 => text.encode_utf16().count(),
        }
    }

    fn char_len(self, c: char) -> usize {
        match self {
            Measure::Chars => 1,
            Measure::Utf16 => c.len_utf16(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Longest message, in [`RelayLimits::measure`] units.
    pub max_len: usize,
    pub measure: Measure,
    /// Least time between two platform calls while the answer streams.
    pub min_edit_interval: Duration,
    /// How often to repeat the "typing" indicator until the first text shows;
    /// `None` for no indicator.
    pub typing_interval: Option<Duration>,
    /// Failed calls in a row (other than rate limits) before the relay gives up.
    pub max_failures: u32,
}

impl RelayLimits {
    /// Telegram: 4096 UTF-16 units; about one edit a second per chat; "typing"
    /// shows for 5 s.
    pub fn telegram() -> Self {
        RelayLimits {
            max_len: 4096,
            measure: Measure::Utf16,
            min_edit_interval: Duration::from_secs(1),
            typing_interval: Some(Duration::from_secs(4)),
            max_failures: 5,
        }
    }

    /// Telegram in a group or channel, where a bot may send about 20 messages
    /// a minute: one call every 3 s.
    pub fn telegram_group() -> Self {
        RelayLimits { min_edit_interval: Duration::from_secs(3), ..Self::telegram() }
    }

    /// Discord: 2000 characters; 5 edits per 5 s per channel; "typing" shows for 10 s.
    pub fn discord() -> Self {
        RelayLimits {
            max_len: 2000,
            measure: Measure::Chars,
            min_edit_interval: Duration::from_secs(1),
            typing_interval: Some(Duration::from_secs(8)),
            max_failures: 5,
        }
    }
}

/// One chat on a platform. Implementations map the platform's errors onto
/// [`SinkError`], and treat an edit to the text a message already has ("message
/// is not modified") as success: after [`Relay::resume`] the relay cannot know
/// what the messages hold. `send` is also where a bot records the new message
/// in the store's job map, so that a restart resumes into it.
pub trait Sink: Send + Sync {
    type MessageId: Clone + fmt::Debug + Send + Sync;

    fn send(&self, text: &str, mode: Mode) -> impl Future<Output = Result<Self::MessageId, SinkError>> + Send;

    fn edit(
        &self,
        message: &Self::MessageId,
        text: &str,
        mode: Mode,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    fn delete(&self, message: &Self::MessageId) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Shows "typing…"; failures are ignored, it is only a courtesy.
    fn typing(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }
}

struct Posted<Id> {
    id: Id,
    /// What the message shows; `None` when resumed and not yet edited.
    text: Option<String>,
}

enum Call {
    Edit(usize, String),
    Send(String),
    /// The last message, which the current text no longer needs.
    Delete,
}

/// Shows one answer in one chat. See the module documentation.
pub struct Relay<S: Sink> {
    sink: S,
    limits: RelayLimits,
    /// `limits.max_len`, lowered when the platform answers [`SinkError::TooLong`].
    max_len: usize,
    posted: Vec<Posted<S::MessageId>>,
    /// Message index → the text the platform refused formatted; that exact text
    /// is then sent plain, a later different text is tried formatted again.
    refused: HashMap<usize, String>,
    /// Earliest next call while streaming: coalescing to the edit rate.
    next_call: Instant,
    /// Earliest next call at all: rate limits and back-off after failures.
    not_before: Instant,
    failures: u32,
}

impl<S: Sink> Relay<S> {
    pub fn new(sink: S, limits: RelayLimits) -> Self {
        Self::resume(sink, limits, Vec::new())
    }

    /// Continues an answer already shown in `messages` (from the store's job
    /// map after a restart): they are edited to the replayed text as needed.
    pub fn resume(sink: S, limits: RelayLimits, messages: Vec<S::MessageId>) -> Self {
        let now = Instant::now();
        Relay {
            max_len: limits.max_len,
            sink,
            limits,
            posted: messages.into_iter().map(|id| Posted { id, text: None }).collect(),
            refused: HashMap::new(),
            next_call: now,
            not_before: now,
            failures: 0,
        }
    }

    /// The messages that show the answer, in order.
    pub fn messages(&self) -> Vec<S::MessageId> {
        self.posted.iter().map(|p| p.id.clone()).collect()
    }

    /// Shows every update of `answers` (each the whole answer so far) until the
    /// stream ends, then delivers its last text in full and returns the messages
    /// holding it. While streaming, updates that come faster than
    /// `min_edit_interval` are coalesced into the latest; the final text goes out
    /// at once, waiting only for a rate limit the platform asked for.
    pub async fn run(&mut self, answers: impl Stream<Item = String>) -> Result<Vec<S::MessageId>, RelayError> {
        let mut answers = std::pin::pin!(answers);
        let mut latest = String::new();
        // Whether `latest` may still need a call.
        let mut pending = false;
        let mut typing_at = self.limits.typing_interval.filter(|_| self.posted.is_empty()).map(|_| Instant::now());
        loop {
            let typing = typing_at.filter(|_| self.posted.is_empty());
            tokio::select! {
                answer = answers.next() => match answer {
                    Some(text) => {
                        if text != latest {
                            latest = text;
                            pending = true;
                        }
                    }
                    None => break,
                },
                () = sleep_until(self.next_call.max(self.not_before)), if pending => match self.plan(&latest) {
                    Some(call) => self.execute(call, false).await?,
                    None => pending = false,
                },
                () = sleep_until(typing.unwrap_or_else(Instant::now).max(self.not_before)), if typing.is_some() => {
                    if let Err(e) = self.sink.typing().await {
                        tracing::debug!("typing indicator: {e}");
                    }
                    typing_at = self.limits.typing_interval.map(|every| Instant::now() + every);
                }
            }
        }
        while let Some(call) = self.plan(&latest) {
            sleep_until(self.not_before).await;
            self.execute(call, true).await?;
        }
        Ok(self.messages())
    }

    /// The next call that brings the messages closer to `text`, in order: edits
    /// and sends front to back, then deletes from the back. An empty text needs
    /// none (a restarted attempt that has not written yet leaves the old text up).
    fn plan(&self, text: &str) -> Option<Call> {
        let chunks = split_message(text, self.max_len, self.limits.measure);
        let needed = chunks.len();
        if needed == 0 {
            return None;
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            match self.posted.get(i) {
                Some(posted) if posted.text.as_deref() == Some(chunk.as_str()) => {}
                Some(_) => return Some(Call::Edit(i, chunk)),
                None => return Some(Call::Send(chunk)),
            }
        }
        (self.posted.len() > needed).then_some(Call::Delete)
    }

    fn mode(&self, index: usize, text: &str) -> Mode {
        match self.refused.get(&index) {
            Some(refused) if refused == text => Mode::Plain,
            _ => Mode::Formatted,
        }
    }

    async fn execute(&mut self, call: Call, last: bool) -> Result<(), RelayError> {
        let (index, text) = match &call {
            Call::Edit(i, text) => (*i, text.as_str()),
            Call::Send(text) => (self.posted.len(), text.as_str()),
            Call::Delete => (self.posted.len() - 1, ""),
        };
        let mode = self.mode(index, text);
        let result = match &call {
            Call::Edit(i, text) => self.sink.edit(&self.posted[*i].id, text, mode).await.map(|()| None),
            Call::Send(text) => self.sink.send(text, mode).await.map(Some),
            Call::Delete => self.sink.delete(&self.posted[index].id).await.map(|()| None),
        };
        let now = Instant::now();
        self.next_call = now + self.limits.min_edit_interval;
        let error = match result {
            Ok(sent) => {
                self.failures = 0;
                match call {
                    Call::Edit(i, text) => self.posted[i].text = Some(text),
                    Call::Send(text) => self.posted.extend(sent.map(|id| Posted { id, text: Some(text) })),
                    Call::Delete => drop(self.posted.pop()),
                }
                return Ok(());
            }
            Err(error) => error,
        };
        match error {
            SinkError::RetryAfter(wait) => self.not_before = now + wait,
            SinkError::TooLong => {
                // The platform counts differently than we do (formatting, say):
                // split shorter and try again.
                let shorter = self.max_len * 9 / 10;
                if shorter < self.limits.max_len / 2 {
                    return Err(RelayError::TooLong(self.max_len));
                }
                self.max_len = shorter;
            }
            // A message that cannot be deleted (too old) stays, no longer ours.
            SinkError::Rejected(_) if matches!(call, Call::Delete) => drop(self.posted.pop()),
            SinkError::Rejected(reason) if mode == Mode::Plain => {
                if last {
                    return Err(RelayError::Rejected(reason));
                }
                self.fail(now, reason)?;
            }
            SinkError::Rejected(reason) => {
                tracing::debug!("formatted text refused ({reason}), plain next");
                self.refused.insert(index, text.to_owned());
            }
            SinkError::Other(reason) => self.fail(now, reason)?,
        }
        Ok(())
    }

    /// Counts a failure and backs off a little longer each time.
    fn fail(&mut self, now: Instant, reason: String) -> Result<(), RelayError> {
        self.failures += 1;
        if self.failures > self.limits.max_failures {
            return Err(RelayError::Failed(reason));
        }
        self.not_before = now + self.limits.min_edit_interval * self.failures;
        Ok(())
    }
}

/// A fenced code block (CommonMark's backtick fences, which Telegram and
/// Discord both render), by byte offsets into the text.
#[derive(Debug)]
struct Fence {
    /// Where the opening line starts.
    open: usize,
    /// Just after the opening line.
    body: usize,
    /// The closing line's start and end; `None` while still open.
    close: Option<(usize, usize)>,
    /// The opening line (backticks and info string) to reopen the block with.
    opener: String,
    ticks: usize,
}

fn scan_fences(text: &str) -> Vec<Fence> {
    let mut fences = Vec::new();
    let mut open: Option<Fence> = None;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        let trimmed = content.trim_start_matches(' ');
        let ticks = trimmed.bytes().take_while(|&b| b == b'`').count();
        if content.len() - trimmed.len() > 3 || ticks < 3 {
            continue;
        }
        let after = &trimmed[ticks..];
        match &mut open {
            None if !after.contains('`') => {
                open = Some(Fence { open: start, body: pos, close: None, opener: trimmed.trim_end().into(), ticks })
            }
            Some(fence) if ticks >= fence.ticks && after.trim().is_empty() => {
                fence.close = Some((start, pos));
                fences.extend(open.take());
            }
            _ => {}
        }
    }
    fences.extend(open);
    fences
}

/// Splits `text` into messages of at most `max_len` units as `measure` counts
/// them, cutting at the last blank line, else line break, else space in the
/// second half of the room, else anywhere between two characters. A cut inside
/// a code block closes it at the end of the message and reopens it, with the
/// same info string, at the start of the next, so each message renders alone.
/// Whitespace at the cuts and at the ends is dropped (platforms strip it
/// anyway); whitespace-only text gives no messages.
pub fn split_message(text: &str, max_len: usize, measure: Measure) -> Vec<String> {
    // Fences whose opening line would take much of a message are left alone:
    // reopening them could leave no room for the text.
    let fences: Vec<Fence> =
        scan_fences(text).into_iter().filter(|f| measure.len(&f.opener) + f.ticks + 2 <= max_len / 4).collect();
    let reserve = fences.iter().map(|f| f.ticks + 1).max().unwrap_or(0);
    let open_at = |pos: usize| fences.iter().find(|f| f.body <= pos && f.close.is_none_or(|(start, _)| pos <= start));
    let mut chunks = Vec::new();
    let mut start = skip_newlines(text, 0);
    let mut reopen: Option<&Fence> = None;
    while start < text.len() {
        let prefix = reopen.map(|f| format!("{}\n", f.opener)).unwrap_or_default();
        let prefix_len = measure.len(&prefix);
        let rest = text[start..].trim_end();
        if prefix_len + measure.len(rest) <= max_len {
            if !rest.is_empty() {
                chunks.push(prefix + rest);
            }
            break;
        }
        let end = fit(text, start, max_len.saturating_sub(prefix_len + reserve), measure);
        let cut = choose_cut(text, start, end, &fences);
        let mut chunk = prefix + text[start..cut].trim_end();
        let fence = open_at(cut);
        if let Some(fence) = fence {
            chunk.push('\n');
            chunk.push_str(&"`".repeat(fence.ticks));
        }
        if !chunk.trim().is_empty() {
            chunks.push(chunk);
        }
        start = skip_separator(text, cut);
        reopen = fence;
        // The block's own closing line would make an empty block: it is closed already.
        if let Some((close_start, close_end)) = fence.and_then(|f| f.close) {
            if close_start <= start || text[start..close_start].trim().is_empty() {
                start = skip_newlines(text, close_end);
                reopen = None;
            }
        }
    }
    chunks
}

/// The end of the longest run of whole characters from `start` that fits in
/// `room` units; at least one character, so splitting always progresses.
fn fit(text: &str, start: usize, room: usize, measure: Measure) -> usize {
    let mut used = 0;
    for (i, c) in text[start..].char_indices() {
        used += measure.char_len(c);
        if used > room {
            return if i == 0 { start + c.len_utf8() } else { start + i };
        }
    }
    text.len()
}

/// Where to end the message that starts at `start` and may run to `end`.
fn choose_cut(text: &str, start: usize, end: usize, fences: &[Fence]) -> usize {
    let window = &text[start..end];
    let least = start + (end - start) / 2;
    // Never inside a fence's opening or closing line.
    let clean = |pos: usize| {
        pos > start
            && fences.iter().all(|f| {
                !(f.open < pos && pos < f.body) && f.close.is_none_or(|(close, after)| !(close < pos && pos < after))
            })
    };
    for separator in ["\n\n", "\n", " "] {
        if let Some(cut) =
            window.rmatch_indices(separator).map(|(i, _)| start + i).find(|&pos| pos >= least && clean(pos))
        {
            return cut;
        }
    }
    if clean(end) {
        return end;
    }
    // A hard cut would land inside a fence line: end the message before it.
    fences
        .iter()
        .flat_map(|f| [Some((f.open, f.body)), f.close].into_iter().flatten())
        .find(|&(line, after)| line < end && end < after && line > start)
        .map_or(end, |(line, _)| line)
}

fn skip_newlines(text: &str, pos: usize) -> usize {
    pos + text[pos..].len() - text[pos..].trim_start_matches(['\n', '\r']).len()
}

/// After a cut at a line break, the line breaks; after a cut at a space, the
/// spaces. Never a line's indentation, which code needs.
fn skip_separator(text: &str, pos: usize) -> usize {
    let rest = &text[pos..];
    if rest.starts_with(['\n', '\r']) {
        skip_newlines(text, pos)
    } else {
        pos + rest.len() - rest.trim_start_matches(' ').len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Debug, PartialEq)]
    enum Op {
        Send(String, Mode),
        Edit(usize, String, Mode),
        Delete(usize),
        Typing,
    }

    /// Stands in for the remote platform: records every call with its (paused)
    /// time, keeps what each message shows, and answers scripted errors.
    #[derive(Default)]
    struct Platform {
        calls: Vec<(Instant, Op)>,
        /// Message id → its text, `None` once deleted.
        shown: Vec<Option<String>>,
        /// Call number (from 0, typing included) → the error it answers.
        fail_at: HashMap<usize, SinkError>,
        /// Texts longer than this (UTF-16 units) are refused as too long.
        max_len: Option<usize>,
        /// Formatted texts containing this are refused, as Telegram refuses bad entities.
        refuse_formatted: Option<&'static str>,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Platform>>);

    impl Fake {
        fn with(setup: impl FnOnce(&mut Platform)) -> Self {
            let fake = Fake::default();
            setup(&mut fake.0.lock().unwrap());
            fake
        }

        /// Checks a call the way the platform would and applies it.
        fn call(&self, op: Op) -> Result<Option<usize>, SinkError> {
            let mut p = self.0.lock().unwrap();
            let number = p.calls.len();
            p.calls.push((Instant::now(), op.clone()));
            if let Some(error) = p.fail_at.remove(&number) {
                return Err(error);
            }
            if let Op::Send(text, mode) | Op::Edit(_, text, mode) = &op {
                if p.max_len.is_some_and(|max| Measure::Utf16.len(text) > max) {
                    return Err(SinkError::TooLong);
                }
                if *mode == Mode::Formatted && p.refuse_formatted.is_some_and(|bad| text.contains(bad)) {
                    return Err(SinkError::Rejected("can't parse entities".into()));
                }
            }
            match op {
                Op::Send(text, _) => {
                    p.shown.push(Some(text));
                    Ok(Some(p.shown.len() - 1))
                }
                Op::Edit(id, text, _) => {
                    assert!(p.shown[id].is_some(), "edit of deleted message {id}");
                    p.shown[id] = Some(text);
                    Ok(None)
                }
                Op::Delete(id) => {
                    p.shown[id] = None;
                    Ok(None)
                }
                Op::Typing => Ok(None),
            }
        }

        fn calls(&self) -> Vec<(Instant, Op)> {
            self.0.lock().unwrap().calls.clone()
        }

        /// The messages a user sees, in order.
        fn shown(&self) -> Vec<String> {
            self.0.lock().unwrap().shown.iter().flatten().cloned().collect()
        }
    }

    impl Sink for Fake {
        type MessageId = usize;

        fn send(&self, text: &str, mode: Mode) -> impl Future<Output = Result<usize, SinkError>> + Send {
            let result = self.call(Op::Send(text.into(), mode)).map(|id| id.unwrap());
            async move { result }
        }

        fn edit(&self, message: &usize, text: &str, mode: Mode) -> impl Future<Output = Result<(), SinkError>> + Send {
            let result = self.call(Op::Edit(*message, text.into(), mode)).map(drop);
            async move { result }
        }

        fn delete(&self, message: &usize) -> impl Future<Output = Result<(), SinkError>> + Send {
            let result = self.call(Op::Delete(*message)).map(drop);
            async move { result }
        }

        fn typing(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
            let result = self.call(Op::Typing).map(drop);
            async move { result }
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// Asserts that the calls made before `until` (while streaming) are at
    /// least the edit interval apart.
    fn assert_paced(calls: &[(Instant, Op)], until: Instant) {
        for pair in calls.windows(2).filter(|pair| pair[1].0 < until) {
            assert!(pair[1].0 - pair[0].0 >= SECOND, "calls {:?} and {:?} too close", pair[0], pair[1]);
        }
    }

    fn limits() -> RelayLimits {
        RelayLimits { typing_interval: None, max_failures: 3, ..RelayLimits::telegram() }
    }

    /// Updates that arrive `gap_ms` apart (paused time), each the whole text so far.
    fn timed(gap_ms: u64, texts: Vec<String>) -> impl Stream<Item = String> {
        futures::stream::iter(texts).then(move |text| async move {
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            text
        })
    }

    /// The whole-text updates of an answer streamed `piece` by `piece`.
    fn growing(pieces: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut text = String::new();
        pieces
            .into_iter()
            .map(|piece| {
                text.push_str(&piece);
                text.clone()
            })
            .collect()
    }

    fn words(n: usize) -> Vec<String> {
        growing((0..n).map(|i| if i % 40 == 39 { format!("w{i}.\n\n") } else { format!("w{i} ") }))
    }

    #[tokio::test(start_paused = true)]
    async fn edits_never_come_faster_than_the_limit() {
        let fake = Fake::default();
        let updates = words(400); // 20 s of tokens, one every 50 ms
        let last = updates.last().unwrap().clone();
        let started = Instant::now();
        let ids = Relay::new(fake.clone(), limits()).run(timed(50, updates)).await.unwrap();
        let streamed_until = started + Duration::from_millis(50 * 400);
        let calls = fake.calls();
        assert_paced(&calls, streamed_until);
        // Coalesced: about one call a second, not one per token.
        assert!(calls.len() <= 22, "{} calls", calls.len());
        assert!(calls.len() >= 15, "{} calls", calls.len());
        assert_eq!(fake.shown(), [last.trim_end()]);
        assert_eq!(ids, [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_text_is_never_sent_again() {
        let fake = Fake::default();
        let texts = ["Hello", "Hello", "Hello ", "Hello \n", "Hello world", "Hello world", "Hello world  "];
        let updates = texts.iter().map(|t| t.to_string()).collect();
        Relay::new(fake.clone(), limits()).run(timed(2000, updates)).await.unwrap();
        let ops: Vec<Op> = fake.calls().into_iter().map(|(_, op)| op).collect();
        assert_eq!(
            ops,
            [Op::Send("Hello".into(), Mode::Formatted), Op::Edit(0, "Hello world".into(), Mode::Formatted)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_out_and_then_the_latest_text_goes() {
        // Half a token's time past a token, so the text of the moment is unambiguous.
        const WAIT: Duration = Duration::from_millis(5025);
        // The second call is rate limited for 5 s while tokens keep coming.
        let fake = Fake::with(|p| drop(p.fail_at.insert(1, SinkError::RetryAfter(WAIT))));
        let updates = words(200); // 10 s of tokens
        let texts = updates.clone();
        let started = Instant::now();
        Relay::new(fake.clone(), limits()).run(timed(50, updates)).await.unwrap();
        let calls = fake.calls();
        let limited = calls[1].0;
        let (next, op) = &calls[2];
        assert_eq!(*next - limited, WAIT, "nothing is sent while rate limited");
        // The call after the wait carries the text of that moment, not a backlog.
        let tokens = ((*next - started).as_millis() / 50) as usize;
        let Op::Edit(0, text, _) = op else { panic!("{op:?}") };
        assert_eq!(text, texts[tokens - 1].trim_end());
        assert_eq!(fake.shown(), [texts.last().unwrap().trim_end()]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_final_flush_waits_out_a_rate_limit_too() {
        let fake = Fake::with(|p| drop(p.fail_at.insert(1, SinkError::RetryAfter(3 * SECOND))));
        let updates = vec!["Hello".to_string(), "Hello world".to_string()];
        let started = Instant::now();
        Relay::new(fake.clone(), limits()).run(timed(10, updates)).await.unwrap();
        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[2].0 - calls[1].0, 3 * SECOND);
        assert!(calls[1].0 - started < SECOND, "the final text does not wait for the edit interval");
        assert_eq!(fake.shown(), ["Hello world"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_final_text_is_delivered_even_right_after_an_edit() {
        let fake = Fake::default();
        let updates: Vec<String> = growing(["The answer", " is", " 42."].map(String::from)).into_iter().collect();
        Relay::new(fake.clone(), limits()).run(timed(100, updates)).await.unwrap();
        let calls = fake.calls();
        // The first text at 100 ms, the final one as soon as the stream ended at 300 ms.
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].1, Op::Edit(0, "The answer is 42.".into(), Mode::Formatted));
        assert_eq!(fake.shown(), ["The answer is 42."]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ten_thousand_character_answer_continues_in_new_messages() {
        let fake = Fake::with(|p| p.max_len = Some(4096));
        let updates = growing((0..1200).map(|i| {
            let word = format!("{:<8}", format!("w{i}"));
            if i % 50 == 49 {
                format!("{}\n\n", word.trim_end())
            } else {
                format!("{word} ")
            }
        }));
        let last = updates.last().unwrap().clone();
        assert!(last.len() >= 10_000);
        let streamed_until = Instant::now() + Duration::from_millis(20 * 1200);
        let ids = Relay::new(fake.clone(), limits()).run(timed(20, updates)).await.unwrap();
        assert_paced(&fake.calls(), streamed_until);
        let shown = fake.shown();
        assert_eq!(shown.len(), 3);
        assert_eq!(ids, [0, 1, 2]);
        assert!(shown.iter().all(|m| Measure::Utf16.len(m) <= 4096));
        // Split at paragraphs, nothing lost.
        assert_eq!(shown.join("\n\n"), last.trim_end());
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_code_answer_on_discord_keeps_every_message_a_whole_block() {
        let fake = Fake::default();
        let limits = RelayLimits { typing_interval: None, ..RelayLimits::discord() };
        let mut pieces = vec!["Here is a program:\n\n```python\n".to_string()];
        pieces.extend((0..150).map(|i| format!("def f{i}(x):\n    return x * {i}  # é\n")));
        pieces.push("```\n\nRun it with `python3`.".into());
        let updates = growing(pieces);
        let last = updates.last().unwrap().clone();
        assert!(last.chars().count() > 5000);
        Relay::new(fake.clone(), limits).run(timed(30, updates)).await.unwrap();
        let shown = fake.shown();
        assert!(shown.len() >= 3);
        for message in &shown {
            assert!(message.chars().count() <= 2000);
            assert_eq!(message.lines().filter(|l| l.starts_with("```")).count() % 2, 0, "open block:\n{message}");
        }
        assert!(shown[1].starts_with("```python\n"), "{}", shown[1]);
        assert!(shown.last().unwrap().ends_with("Run it with `python3`."));
        assert_eq!(strip(&shown.join("\n")), strip(&last));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_replaces_the_text_of_the_earlier_attempt() {
        let fake = Fake::default();
        let first: Vec<String> = words(1200); // about 7000 characters: two messages
        let mut updates = first.clone();
        // The worker died; the new attempt starts over (empty first) and is short.
        updates.push(String::new());
        updates.extend(growing(["Second", " attempt", " answer."].map(String::from)));
        let streamed_until = Instant::now() + Duration::from_millis(50 * updates.len() as u64);
        Relay::new(fake.clone(), limits()).run(timed(50, updates)).await.unwrap();
        assert_paced(&fake.calls(), streamed_until);
        assert_eq!(fake.shown(), ["Second attempt answer."]);
        let ops: Vec<Op> = fake.calls().into_iter().map(|(_, op)| op).collect();
        assert!(ops.contains(&Op::Delete(1)), "the second message is removed: {ops:?}");
        assert!(ops.iter().filter(|op| matches!(op, Op::Send(..))).count() == 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_that_is_longer_edits_every_message() {
        let fake = Fake::default();
        let mut updates = vec!["a ".repeat(2500)];
        updates.push("b ".repeat(2500));
        Relay::new(fake.clone(), limits()).run(timed(2000, updates)).await.unwrap();
        let shown = fake.shown();
        assert_eq!(shown.len(), 2);
        assert_eq!(shown.join(" "), "b ".repeat(2500).trim_end());
    }

    #[tokio::test(start_paused = true)]
    async fn typing_shows_until_the_first_text() {
        let fake = Fake::default();
        let limits = RelayLimits { typing_interval: Some(4 * SECOND), ..limits() };
        let updates = vec!["Hi".to_string(), "Hi there".to_string(), "Hi there, friend".to_string()];
        Relay::new(fake.clone(), limits).run(timed(10_000, updates)).await.unwrap();
        let calls = fake.calls();
        let typing: Vec<Duration> =
            calls.iter().filter(|(_, op)| *op == Op::Typing).map(|(at, _)| *at - calls[0].0).collect();
        assert_eq!(typing, [Duration::ZERO, 4 * SECOND, 8 * SECOND]);
        assert!(matches!(calls[3].1, Op::Send(..)));
        assert_eq!(calls.len(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_formatting_falls_back_to_plain_text() {
        let fake = Fake::with(|p| p.refuse_formatted = Some("**"));
        let updates = vec!["fine".to_string(), "fine **unbalanced".to_string()];
        Relay::new(fake.clone(), limits()).run(timed(2000, updates)).await.unwrap();
        let ops: Vec<Op> = fake.calls().into_iter().map(|(_, op)| op).collect();
        assert_eq!(
            ops,
            [
                Op::Send("fine".into(), Mode::Formatted),
                Op::Edit(0, "fine **unbalanced".into(), Mode::Formatted),
                Op::Edit(0, "fine **unbalanced".into(), Mode::Plain),
            ]
        );
        assert_eq!(fake.shown(), ["fine **unbalanced"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_platform_that_counts_longer_gets_shorter_messages() {
        // The platform accepts 3000 units though the relay was told 4096.
        let fake = Fake::with(|p| p.max_len = Some(3000));
        let text = "word ".repeat(1500);
        Relay::new(fake.clone(), limits()).run(timed(10, vec![text.clone()])).await.unwrap();
        let shown = fake.shown();
        assert!(shown.iter().all(|m| m.len() <= 3000));
        assert_eq!(shown.join(" "), text.trim_end());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_then_reported() {
        let fake = Fake::with(|p| {
            for call in 0..10 {
                p.fail_at.insert(call, SinkError::Other("502 Bad Gateway".into()));
            }
        });
        let result = Relay::new(fake.clone(), limits()).run(timed(10, vec!["Hello".into()])).await;
        assert!(matches!(result, Err(RelayError::Failed(reason)) if reason == "502 Bad Gateway"));
        assert_eq!(fake.calls().len(), 4, "max_failures 3: the fourth failure gives up");

        let flaky = Fake::with(|p| drop(p.fail_at.insert(0, SinkError::Other("timeout".into()))));
        Relay::new(flaky.clone(), limits()).run(timed(10, vec!["Hello".into()])).await.unwrap();
        assert_eq!(flaky.shown(), ["Hello"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_reply_edits_the_messages_it_had() {
        let fake = Fake::default();
        // Before the restart: two messages of an unfinished answer.
        fake.0.lock().unwrap().shown = vec![Some("partial".into()), Some("more".into())];
        let mut relay = Relay::resume(fake.clone(), limits(), vec![0, 1]);
        let ids = relay.run(timed(10, vec!["The whole answer.".into()])).await.unwrap();
        assert_eq!(ids, [0]);
        assert_eq!(fake.shown(), ["The whole answer."]);
    }

    #[test]
    fn short_texts_are_one_message_and_blank_ones_none() {
        assert_eq!(split_message("\n\nHello  \n", 4096, Measure::Utf16), ["Hello"]);
        assert_eq!(split_message(" \n\n \n", 4096, Measure::Utf16), Vec::<String>::new());
        assert_eq!(split_message("", 4096, Measure::Chars), Vec::<String>::new());
    }

    #[test]
    fn cuts_prefer_paragraphs_then_lines_then_spaces() {
        let paragraphs = format!("{}\n\n{}\n{}", "a".repeat(60), "b".repeat(20), "c".repeat(20));
        assert_eq!(
            split_message(&paragraphs, 100, Measure::Chars),
            ["a".repeat(60), format!("{}\n{}", "b".repeat(20), "c".repeat(20))]
        );
        let lines = format!("{}\n{} {}", "a".repeat(60), "b".repeat(20), "c".repeat(20));
        assert_eq!(split_message(&lines, 100, Measure::Chars)[0], "a".repeat(60));
        let spaces = format!("{} {} {}", "a".repeat(60), "b".repeat(30), "c".repeat(30));
        assert_eq!(
            split_message(&spaces, 100, Measure::Chars),
            [format!("{} {}", "a".repeat(60), "b".repeat(30)), "c".repeat(30)]
        );
        let solid = "x".repeat(250);
        assert_eq!(split_message(&solid, 100, Measure::Chars), ["x".repeat(100), "x".repeat(100), "x".repeat(50)]);
        // A blank line early in the room loses to a line break late in it: no tiny messages.
        let early = format!("{}\n\n{}\n{}", "a".repeat(10), "b".repeat(70), "c".repeat(50));
        assert_eq!(split_message(&early, 100, Measure::Chars)[0], format!("{}\n\n{}", "a".repeat(10), "b".repeat(70)));
    }

    #[test]
    fn a_ten_thousand_character_answer_splits_on_paragraphs() {
        let paragraph = |i: usize| format!("Paragraph {i}: {}", "lorem ipsum dolor ".repeat(20).trim_end());
        let text: String = (0..30).map(paragraph).collect::<Vec<_>>().join("\n\n");
        assert!(text.len() > 10_000);
        let chunks = split_message(&text, 4096, Measure::Utf16);
        assert_eq!(chunks.len(), 3);
        for chunk in &chunks {
            assert!(chunk.len() <= 4096);
            assert!(chunk.starts_with("Paragraph ") && chunk.ends_with("dolor"));
        }
        assert_eq!(chunks.join("\n\n"), text);
    }

    #[test]
    fn a_code_block_cut_is_closed_and_reopened_with_its_info_string() {
        let code: String = (0..200).map(|i| format!("    let x{i} = compute({i});\n")).collect();
        let text = format!("Here is the code:\n\n```rust\n{code}```\n\nThat is all.");
        assert!(text.len() > 5000);
        let chunks = split_message(&text, 2000, Measure::Chars);
        assert!(chunks.len() >= 3);
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.chars().count() <= 2000, "chunk {i} too long");
            let fences = chunk.lines().filter(|l| l.starts_with("```")).count();
            assert_eq!(fences % 2, 0, "chunk {i} leaves a block open:\n{chunk}");
            if i > 0 && i + 1 < chunks.len() {
                assert!(chunk.starts_with("```rust\n    let x"), "chunk {i} reopens the block");
                assert!(chunk.ends_with(");\n```"), "chunk {i} closes the block");
            }
        }
        assert!(chunks[0].starts_with("Here is the code:\n\n```rust\n"));
        assert!(chunks.last().unwrap().ends_with("```\n\nThat is all."));
        // Indentation inside the block survives the cuts.
        assert!(chunks[1..].iter().all(|c| c.lines().nth(1).unwrap().starts_with("    let")));
        assert_eq!(strip(&chunks.join("\n")), strip(&text));
    }

    #[test]
    fn a_cut_just_before_the_closing_line_leaves_no_empty_block() {
        let body = "y".repeat(80);
        let text = format!("```\n{body}\n```\nafter the block, some more words to push past the limit");
        let chunks = split_message(&text, 100, Measure::Chars);
        assert_eq!(chunks[0], format!("```\n{body}\n```"));
        assert!(!chunks.iter().any(|c| c.starts_with("```\n```")), "{chunks:?}");
        assert!(chunks[1].starts_with("after the block"));
    }

    #[test]
    fn longer_fences_are_closed_with_as_many_backticks() {
        let text = format!("````md\n{}\n````", "line with ``` inside\n".repeat(20));
        let chunks = split_message(&text, 200, Measure::Chars);
        assert!(chunks.len() > 1);
        assert!(chunks[0].ends_with("\n````"));
        assert!(chunks[1].starts_with("````md\n"));
    }

    #[test]
    fn multibyte_text_is_measured_as_the_platform_does_and_never_cut_in_a_character() {
        // Each emoji is one character but two UTF-16 units.
        let emoji = "😀".repeat(3000);
        let telegram = split_message(&emoji, 4096, Measure::Utf16);
        assert_eq!(telegram.iter().map(|c| c.chars().count()).collect::<Vec<_>>(), [2048, 952]);
        let discord = split_message(&emoji, 2000, Measure::Chars);
        assert_eq!(discord.iter().map(|c| c.chars().count()).collect::<Vec<_>>(), [2000, 1000]);
        let mixed = "日本語のテキスト、é и 😀 ".repeat(400);
        for max in [97, 500, 2000, 4096] {
            for measure in [Measure::Chars, Measure::Utf16] {
                let chunks = split_message(&mixed, max, measure);
                assert!(chunks.iter().all(|c| measure.len(c) <= max));
                assert_eq!(strip(&chunks.join("\n")), strip(&mixed));
            }
        }
    }

    /// Text without whitespace and fence lines: what must survive any split.
    fn strip(text: &str) -> String {
        text.lines().filter(|l| !l.trim_start().starts_with("```")).flat_map(|l| l.split_whitespace()).collect()
    }

    /// Deterministic pseudo-random answers: words, multibyte words, very long
    /// words, line breaks, paragraphs and code blocks with info strings.
    fn generated(seed: u64, target: usize) -> String {
        let mut state = seed;
        let mut next = move |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut text = String::new();
        let mut in_code = false;
        while text.len() < target {
            match next(40) {
                0 => text.push_str("\n\n"),
                1..=3 => text.push('\n'),
                4 => {
                    text.push_str(if in_code { "\n```\n" } else { "\n```python\n" });
                    in_code = !in_code;
                }
                5 => text.push_str(&"z".repeat(next(300) as usize + 1)),
                6 => text.push_str("😀日本 "),
                7 => text.push_str("    indented "),
                _ => {
                    text.push_str(["alpha", "beta", "gamma", "délta", "ε"][next(5) as usize]);
                    text.push(' ');
                }
            }
        }
        if in_code {
            text.push_str("\n```");
        }
        text
    }

    #[test]
    fn generated_answers_split_within_limits_with_nothing_lost() {
        for seed in 0..60 {
            let text = generated(seed, 2000 + (seed as usize) * 150);
            for (max, measure) in
                [(4096, Measure::Utf16), (2000, Measure::Chars), (300, Measure::Utf16), (120, Measure::Chars)]
            {
                let chunks = split_message(&text, max, measure);
                for chunk in &chunks {
                    assert!(measure.len(chunk) <= max, "seed {seed} max {max}: {} units", measure.len(chunk));
                    assert!(!chunk.trim().is_empty());
                    let fences = scan_fences(chunk);
                    assert!(fences.iter().all(|f| f.close.is_some()), "seed {seed} max {max}: open block in\n{chunk}");
                }
                let (got, want) = (strip(&chunks.join("\n")), strip(&text));
                if got != want {
                    let at = got.chars().zip(want.chars()).take_while(|(a, b)| a == b).count();
                    let around = |s: &str| s.chars().skip(at.saturating_sub(40)).take(80).collect::<String>();
                    panic!(
                        "seed {seed} max {max} at {at}: got {:?} want {:?}\n{chunks:#?}",
                        around(&got),
                        around(&want)
                    );
                }
            }
        }
    }
}

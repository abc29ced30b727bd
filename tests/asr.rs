//! Speech-to-text end to end with the real Whisper base model: sentences spoken
//! by espeak-ng, encoded the way people send them, submitted as jobs through
//! NATS (large ones through the object store), transcribed by a worker.

mod common;

use common::*;
use futures::StreamExt;
use natter_shared::proto::{AsrInput, AsrTask, ErrorCode, EventBody, Job, JobInput, JobResult, Origin, Segment};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const ASR_MODEL: &str = "whisper-base";

const SENTENCES: &str = "Good morning everyone. Thank you for coming to the meeting today. \
    We need to finish the project before the end of the month. Please send me your report by Friday.";

/// Speaks `text` into a WAV file with espeak-ng (installed by scripts/install-deps.sh --test).
fn speak(text: &str, path: &Path) {
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "135", "-g", "3", "-w"])
        .arg(path)
        .arg(text)
        .status()
        .expect("espeak-ng runs (scripts/install-deps.sh --test installs it)");
    assert!(status.success());
}

/// Re-encodes `input` with ffmpeg.
fn encode(input: &Path, args: &[&str], output: PathBuf) -> PathBuf {
    let status = Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-i"])
        .arg(input)
        .args(args)
        .arg(&output)
        .status()
        .expect("ffmpeg runs (scripts/install-deps.sh --test installs it)");
    assert!(status.success(), "ffmpeg {args:?}");
    output
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// Word error rate: word-level edit distance over the reference length.
fn word_error_rate(reference: &str, hypothesis: &str) -> f64 {
    let (r, h) = (words(reference), words(hypothesis));
    let mut row: Vec<usize> = (0..=h.len()).collect();
    for i in 1..=r.len() {
        let mut prev = row[0];
        row[0] = i;
        for j in 1..=h.len() {
            let substitute = prev + usize::from(r[i - 1] != h[j - 1]);
            prev = row[j];
            row[j] = substitute.min(row[j] + 1).min(row[j - 1] + 1);
        }
    }
    row[h.len()] as f64 / r.len() as f64
}

fn asr_job(audio: natter_shared::proto::Blob, language: Option<&str>) -> Job {
    let origin = Origin { frontend: "test".into(), user: "u".into(), conversation: None };
    let input = AsrInput { audio, language: language.map(String::from), task: AsrTask::Transcribe };
    Job::new(ASR_MODEL, origin, JobInput::Asr(input))
}

/// Runs one job, returning the segments streamed before the end and the outcome.
async fn transcribe(
    client: &natter_bots::client::JobClient,
    data: Vec<u8>,
    content_type: &str,
) -> (Vec<(Segment, Instant)>, Result<(JobResult, natter_shared::proto::Metrics), (ErrorCode, String)>, Instant) {
    let blob = client.put_blob(data, content_type).await.unwrap();
    let job = asr_job(blob, None);
    let mut events = Box::pin(client.events(job.id).await.unwrap());
    client.submit(&job).await.unwrap();
    let mut segments = Vec::new();
    while let Some(event) = events.next().await {
        match event.unwrap().body {
            EventBody::Segment { segment } => segments.push((segment, Instant::now())),
            EventBody::Done { result, metrics } => return (segments, Ok((result, metrics)), Instant::now()),
            EventBody::Failed { code, message } => return (segments, Err((code, message)), Instant::now()),
            _ => {}
        }
    }
    panic!("the event stream ended without an outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_sentences_in_every_format_people_send_are_transcribed() {
    let stack = Stack::start(&[ASR_MODEL]).await;
    let client = stack.job_client().await;
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("speech.wav");
    speak(SENTENCES, &wav);
    let files = [
        // Telegram voice notes: Opus in Ogg, 48 kHz mono.
        (encode(&wav, &["-c:a", "libopus", "-b:a", "32k", "-ar", "48000"], dir.path().join("voice.oga")), "audio/ogg"),
        // A browser's MediaRecorder: Opus in WebM.
        (encode(&wav, &["-c:a", "libopus", "-ar", "48000"], dir.path().join("rec.webm")), "audio/webm"),
        (encode(&wav, &["-ar", "44100", "-ac", "2"], dir.path().join("stereo.wav")), "audio/wav"),
        (encode(&wav, &["-c:a", "libmp3lame", "-b:a", "64k"], dir.path().join("speech.mp3")), "audio/mpeg"),
        (encode(&wav, &["-c:a", "flac"], dir.path().join("speech.flac")), "audio/flac"),
        (encode(&wav, &["-c:a", "aac", "-b:a", "64k"], dir.path().join("speech.m4a")), "audio/mp4"),
    ];
    for (path, content_type) in files {
        let data = std::fs::read(&path).unwrap();
        let size = data.len();
        // An unknown content type must work too: the container is sniffed.
        let content_type = if content_type == "audio/flac" { "application/octet-stream" } else { content_type };
        let (segments, outcome, _) = transcribe(&client, data, content_type).await;
        let (result, metrics) = outcome.unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let JobResult::Asr { text, language, segments: final_segments } = result else { panic!("not an ASR result") };
        let wer = word_error_rate(SENTENCES, &text);
        eprintln!("{} ({size} bytes): WER {:.0}% {text:?}", path.display(), wer * 100.0);
        assert!(wer <= 0.2, "{}: WER {wer:.2} for {text:?}", path.display());
        assert_eq!(language.as_deref(), Some("en"));
        assert_eq!(segments.into_iter().map(|(s, _)| s).collect::<Vec<_>>(), final_segments);
        let seconds = metrics.audio_seconds.unwrap();
        assert!((12.0..16.0).contains(&seconds), "{seconds} s of audio");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_clip_streams_segments_with_increasing_timestamps() {
    let stack = Stack::start(&[ASR_MODEL]).await;
    let client = stack.job_client().await;
    let dir = tempfile::tempdir().unwrap();
    let paragraph = "The library opens at nine in the morning and closes at six in the evening. \
        Children can borrow up to five books at a time. The reading room on the second floor is quiet, \
        and there are tables near the windows. On Saturdays there is a story hour for young readers. ";
    let wav = dir.path().join("long.wav");
    speak(&paragraph.repeat(6), &wav);
    let data = std::fs::read(&wav).unwrap();
    assert!(data.len() > natter_shared::proto::INLINE_BLOB_LIMIT, "large enough to go through the object store");
    let (segments, outcome, finished) = transcribe(&client, data, "audio/wav").await;
    let (result, metrics) = outcome.unwrap();
    let seconds = metrics.audio_seconds.unwrap();
    assert!(seconds > 100.0, "the clip is {seconds} s");
    assert!(segments.len() >= 8, "only {} segments", segments.len());
    for pair in segments.windows(2) {
        assert!(pair[0].0.start < pair[1].0.start, "timestamps go back: {:?} then {:?}", pair[0].0, pair[1].0);
        assert!(pair[0].0.end <= pair[1].0.start + 0.5, "overlap: {:?} then {:?}", pair[0].0, pair[1].0);
    }
    let last = &segments.last().unwrap().0;
    assert!(last.end > seconds - 30.0 && last.end <= seconds + 0.01, "last segment {last:?} of {seconds} s");
    // Segments arrive while later windows are still being decoded.
    let first_arrival = segments[0].1;
    assert!(finished.duration_since(first_arrival).as_secs_f64() > 2.0, "segments only came at the end");
    let JobResult::Asr { text, .. } = result else { panic!() };
    let wer = word_error_rate(&paragraph.repeat(6), &text);
    assert!(wer <= 0.25, "WER {wer:.2}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_fails_cleanly_and_the_worker_keeps_serving() {
    let stack = Stack::start(&[ASR_MODEL]).await;
    let client = stack.job_client().await;
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("hello.wav");
    speak("Hello there.", &wav);
    let ogg = std::fs::read(encode(&wav, &["-c:a", "libopus"], dir.path().join("hello.ogg"))).unwrap();

    let mut corrupt = ogg[..ogg.len().min(200)].to_vec();
    corrupt.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt ogg", corrupt, "audio/ogg"),
        ("not audio", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n".repeat(50), "application/pdf"),
        ("random bytes", (0..70_000u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 7) as u8).collect(), "audio/mpeg"),
    ];
    for (name, data, content_type) in cases {
        let (_, outcome, _) = transcribe(&client, data, content_type).await;
        let (code, message) = outcome.expect_err(name);
        assert_eq!(code, ErrorCode::BadInput, "{name}: {message}");
        assert!(!message.is_empty() && !message.contains("panick"), "{name}: {message}");
        eprintln!("{name}: {message}");
    }
    // An empty file cannot even be submitted.
    assert!(client.put_blob(Vec::new(), "audio/ogg").await.is_err());
    // A hint the model does not know is refused.
    let blob = client.put_blob(ogg.clone(), "audio/ogg").await.unwrap();
    match client.run_job(&asr_job(blob, Some("klingon"))).await {
        Err(natter_bots::client::JobEnd::Failed { code, message }) => {
            assert_eq!(code, ErrorCode::BadInput);
            assert!(message.contains("klingon"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The worker is still serving.
    let (_, outcome, _) = transcribe(&client, ogg, "audio/ogg").await;
    let (JobResult::Asr { text, .. }, _) = outcome.unwrap() else { panic!() };
    assert!(word_error_rate("Hello there.", &text) <= 0.5, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_and_noise_give_an_empty_transcript() {
    let stack = Stack::start(&[ASR_MODEL]).await;
    let client = stack.job_client().await;
    let dir = tempfile::tempdir().unwrap();
    // Room tone of several colours and levels (fixed seeds), and digital silence.
    let sources = [
        "anoisesrc=d=20:c=pink:r=16000:a=0.01:s=1",
        "anoisesrc=d=20:c=pink:r=16000:a=0.01:s=2",
        "anoisesrc=d=20:c=white:r=16000:a=0.003:s=3",
        "anoisesrc=d=20:c=brown:r=16000:a=0.02:s=4",
        "anullsrc=r=44100:cl=stereo:d=15",
    ];
    for (i, source) in sources.iter().enumerate() {
        let path = dir.path().join(format!("quiet{i}.wav"));
        let status = Command::new("ffmpeg")
            .args(["-y", "-loglevel", "error", "-f", "lavfi", "-i", source, "-t", "20"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (segments, outcome, _) = transcribe(&client, std::fs::read(&path).unwrap(), "audio/wav").await;
        let (JobResult::Asr { text, language, .. }, _) = outcome.unwrap() else { panic!() };
        assert_eq!(text, "", "hallucinated {text:?} from {source}");
        assert!(segments.is_empty());
        assert_eq!(language, None);
    }
}

#[test]
fn word_error_rate_counts_edits() {
    assert_eq!(word_error_rate("the cat sat", "The cat sat."), 0.0);
    assert!((word_error_rate("the cat sat down", "the bat sat") - 0.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn german_speech_is_detected_and_translated_to_english() {
    let stack = Stack::start(&[ASR_MODEL]).await;
    let client = stack.job_client().await;
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("de.wav");
    let status = Command::new("espeak-ng")
        .args(["-v", "de", "-s", "130", "-g", "3", "-w"])
        .arg(&wav)
        .arg("Guten Morgen. Heute ist das Wetter sehr schön. Ich trinke einen Kaffee und lese die Zeitung.")
        .status()
        .unwrap();
    assert!(status.success());
    let ogg = std::fs::read(encode(&wav, &["-c:a", "libopus"], dir.path().join("de.ogg"))).unwrap();
    let origin = Origin { frontend: "test".into(), user: "u".into(), conversation: None };
    for task in [AsrTask::Transcribe, AsrTask::Translate] {
        let audio = client.put_blob(ogg.clone(), "audio/ogg").await.unwrap();
        let job = Job::new(ASR_MODEL, origin.clone(), JobInput::Asr(AsrInput { audio, language: None, task }));
        let (JobResult::Asr { text, language, .. }, _) = client.run_job(&job).await.unwrap() else { panic!() };
        assert_eq!(language.as_deref(), Some("de"), "{text}");
        let text = text.to_lowercase();
        match task {
            AsrTask::Transcribe => assert!(text.contains("guten morgen") && text.contains("zeitung"), "{text}"),
            AsrTask::Translate => assert!(text.contains("morning") && text.contains("coffee"), "{text}"),
        }
    }
}

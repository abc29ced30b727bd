//! Speech-to-text through the front-ends against the real stack: the official
//! `openai` Python client on the OpenAI audio endpoints, and the dashboard's
//! Transcribe tab in headless Chromium (upload and microphone recording).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const SPOKEN: &str = "Good morning everyone. Thank you for coming to the meeting today. \
    We need to finish the project before the end of the month. Please send me your report by Friday.";

/// A spoken WAV (espeak-ng) and the same speech as an OGG/Opus voice note.
fn voice_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let wav = dir.join("speech.wav");
    let ogg = dir.join("voice.ogg");
    let ok =
        Command::new("espeak-ng").args(["-v", "en-us", "-s", "135", "-g", "3", "-w"]).arg(&wav).arg(SPOKEN).status();
    assert!(ok.expect("espeak-ng runs (scripts/install-deps.sh --test)").success());
    let ok = Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-i"])
        .arg(&wav)
        .args(["-c:a", "libopus"])
        .arg(&ogg)
        .status();
    assert!(ok.expect("ffmpeg runs (scripts/install-deps.sh --test)").success());
    (wav, ogg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_transcribes_and_translates() {
    let stack = Stack::start(&["whisper-base"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, ogg) = voice_files(dir.path());
    let mut python = Command::new("python3");
    python.arg(repo_root().join("tests/openai/transcribe.py")).arg(&stack.url).arg(&ogg).arg(SPOKEN);
    run_checker(python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_transcribes_uploads_and_microphone_recordings() {
    let script_dir = repo_root().join("tests/dashboard");
    assert!(
        script_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed; run scripts/install-deps.sh --test"
    );
    let stack = Stack::start(&["whisper-base"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (wav, ogg) = voice_files(dir.path());
    let mut node = Command::new("node");
    node.arg("transcribe.mjs").arg(&stack.url).arg(&ogg).arg(&wav).current_dir(&script_dir);
    node.args(["morning", "meeting", "project", "month", "report", "Friday"]);
    run_checker(node).await;
}

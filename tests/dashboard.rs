//! The dashboard in headless Chromium (playwright-core driving Debian's chromium),
//! against the real stack: nats-server, a worker with SmolLM2, the front-end.

mod common;

use common::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_chats_streams_stops_highlights_entities_and_fits_a_phone() {
    let script_dir = repo_root().join("tests/dashboard");
    assert!(
        script_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed; run scripts/install-deps.sh --test"
    );
    let stack = Stack::start(&[REAL_MODEL, NER_MODEL]).await;
    let url = stack.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg("dashboard.mjs").arg(&url).current_dir(&script_dir).output().expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "dashboard checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

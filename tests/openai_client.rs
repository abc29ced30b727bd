//! The official `openai` Python client against the real stack (installed by
//! scripts/install-deps.sh --test).

mod common;

use common::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_streams_and_lists_models() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let url = stack.url.clone();
    let script = repo_root().join("tests/openai/client.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).arg(&url).output().expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openai client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

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
    let mut node = Command::new("node");
    node.arg("dashboard.mjs").arg(&stack.url).current_dir(&script_dir);
    run_checker(node).await;
}

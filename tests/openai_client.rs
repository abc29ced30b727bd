//! The official `openai` Python client against the real stack (installed by
//! scripts/install-deps.sh --test).

mod common;

use common::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_streams_and_lists_models() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let mut python = Command::new("python3");
    python.arg(repo_root().join("tests/openai/client.py")).arg(&stack.url);
    run_checker(python).await;
}

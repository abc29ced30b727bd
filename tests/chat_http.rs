//! HTTP → NATS → worker → SSE, with the real SmolLM2 model and with the tiny one.

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

/// Reads an SSE response into its `data:` payloads.
async fn sse_data(resp: reqwest::Response) -> Vec<String> {
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(cut) = buf.find("\n\n") {
            let frame: String = buf.drain(..cut + 2).collect();
            for line in frame.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    out.push(data.trim_start().to_string());
                }
            }
        }
    }
    out
}

fn streamed_text(data: &[String]) -> String {
    data.iter()
        .filter(|d| d.as_str() != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_streams_an_answer_over_sse_and_answers_without_streaming() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let url = stack.url.clone();
    let http = stack.http.clone();

    let models: Value = http.get(format!("{url}/v1/models")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [REAL_MODEL]);

    let question = json!([{ "role": "user", "content": "What is the capital of France?" }]);
    let resp = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({ "model": REAL_MODEL, "messages": question, "stream": true, "temperature": 0, "max_tokens": 48 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(resp).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(data.len() > 4, "several chunks streamed: {data:?}");
    let text = streamed_text(&data);
    assert!(text.contains("Paris"), "answer: {text:?}");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());
    let usage = &last["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(usage["completion_tokens"].as_u64().unwrap() > 1);
    assert!(last["natter_metrics"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(last["natter_metrics"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);

    // The same question without streaming, greedy: the same answer.
    let body: Value = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({ "messages": question, "temperature": 0, "max_tokens": 48 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], REAL_MODEL, "`model` omitted picks the default");
    assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), text);
    assert_eq!(body["usage"]["total_tokens"], usage["total_tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_use_openai_shapes_and_honest_codes() {
    let stack = Stack::start(&[TINY_MODEL]).await;
    let url = stack.url.clone();
    let http = stack.http.clone();
    let post = |body: Value| stack.post("/v1/chat/completions", body);
    let hi = json!([{ "role": "user", "content": "hi" }]);

    let (status, body) = post(json!({ "model": "no-such-model", "messages": hi })).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"].as_str().unwrap().contains("no-such-model"));

    let (status, body) = post(json!({ "model": REAL_MODEL, "messages": hi })).await;
    assert_eq!(status, 503, "in the catalog but no worker serves it: {body}");
    assert_eq!(body["error"]["type"], "server_error");

    let (status, body) = post(json!({ "model": TINY_MODEL, "messages": [] })).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("empty"), "{body}");

    let (status, _) = post(json!({ "model": TINY_MODEL, "messages": hi, "temperature": -1 })).await;
    assert_eq!(status, 400);

    let resp = http
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Too long for the tiny model's 512-token window: the worker says so, the
    // streaming request gets a real 400 before any chunk.
    let long = json!([{ "role": "user", "content": "word ".repeat(600) }]);
    let (status, body) = post(json!({ "model": TINY_MODEL, "messages": long, "stream": true })).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");

    // The worker kept serving through all of it.
    let (status, body) = post(json!({ "model": TINY_MODEL, "messages": hi, "max_tokens": 5, "temperature": 0 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_job() {
    let stack = Stack::start(&[REAL_MODEL]).await;
    let url = stack.url.clone();
    let client = stack.nats.connect().await;
    let mut events = client.subscribe("natter.events.>").await.unwrap();

    let resp = stack
        .http
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "messages": [{ "role": "user", "content": "Write a very long story about a dragon and a knight." }],
            "stream": true, "max_tokens": 1500, "temperature": 0.8, "seed": 3,
        }))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);

    let cancelled = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(msg) = events.next().await {
            let event: Value = serde_json::from_slice(&msg.payload).unwrap();
            match event["type"].as_str().unwrap() {
                "cancelled" => return true,
                "done" => return false,
                _ => {}
            }
        }
        false
    })
    .await
    .expect("the job ended");
    assert!(cancelled, "the job was cancelled, not run to the end");
}

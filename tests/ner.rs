//! NER end to end with the real PII model: logits against onnxruntime's, entities
//! at the right character offsets, and the HTTP endpoint.

mod common;

use common::*;
use natter_worker::ner::NerEngine;
use serde_json::{json, Value};

fn ner_dir() -> std::path::PathBuf {
    let dir = models_dir().join("rampart-pii");
    assert!(
        dir.join("model.safetensors").is_file(),
        "run `natter-worker models fetch rampart-pii` (scripts/test.sh does)"
    );
    dir
}

/// Regenerate the fixture with `python3 tests/fixtures/make_ner_logits.py <models>/rampart-pii`.
#[test]
fn dequantized_weights_give_onnxruntimes_logits() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/ner_rampart_logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = fixture["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let expected: Vec<Vec<f32>> = serde_json::from_value(fixture["logits"].clone()).unwrap();
    let engine = NerEngine::load(&ner_dir()).unwrap();
    let logits = engine.logits(&ids).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(logits.len(), expected.len());
    let worst = logits.iter().flatten().zip(expected.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-3, "largest logit difference {worst}");
}

#[test]
fn real_model_finds_name_email_street_and_city_at_exact_offsets() {
    let engine = NerEngine::load(&ner_dir()).unwrap();
    let text = "Hi, I'm Zoë Martínez — write to zoe.martinez@example.org or visit me at 42 Oak Street, Springfield.";
    let (entities, _) = engine.entities(text).unwrap();
    let chars: Vec<char> = text.chars().collect();
    for e in &entities {
        assert_eq!(chars[e.start..e.end].iter().collect::<String>(), e.text, "{e:?}");
    }
    let find = |label: &str| entities.iter().find(|e| e.label == label).map(|e| e.text.as_str());
    assert_eq!(find("GIVEN_NAME"), Some("Zoë"), "{entities:?}");
    assert_eq!(find("SURNAME"), Some("Martínez"), "{entities:?}");
    assert_eq!(find("EMAIL"), Some("zoe.martinez@example.org"), "{entities:?}");
    assert!(find("STREET_NAME").is_some_and(|s| s.contains("Oak")), "{entities:?}");
    assert_eq!(find("CITY"), Some("Springfield"), "{entities:?}");
    let email = entities.iter().find(|e| e.label == "EMAIL").unwrap();
    assert_eq!(email.start, text[..text.find("zoe.").unwrap()].chars().count());
}

#[test]
fn offsets_count_characters_past_emoji_and_cjk() {
    let engine = NerEngine::load(&ner_dir()).unwrap();
    let text = "🙂🎉 東京の友達 — Contact Zoë Martínez at zoe.martinez@example.org today 👍";
    let (entities, _) = engine.entities(text).unwrap();
    let chars: Vec<char> = text.chars().collect();
    for e in &entities {
        assert_eq!(chars[e.start..e.end].iter().collect::<String>(), e.text, "{e:?}");
    }
    let email = entities.iter().find(|e| e.label == "EMAIL").expect("the email is found");
    assert_eq!(email.text, "zoe.martinez@example.org");
    assert_eq!(email.start, text[..text.find("zoe.").unwrap()].chars().count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ner_over_http_returns_entities_and_clear_errors() {
    let stack = Stack::start(&[NER_MODEL]).await;
    let post = |body: Value| stack.post("/api/ner", body);
    let (status, body) = post(json!({ "text": "Please email Anna Schmidt at anna.schmidt@example.com." })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], NER_MODEL);
    let labels: Vec<&str> = body["entities"].as_array().unwrap().iter().map(|e| e["label"].as_str().unwrap()).collect();
    assert!(labels.contains(&"EMAIL") && labels.contains(&"GIVEN_NAME"), "{body}");
    assert!(body["metrics"]["wall_ms"].as_f64().unwrap() > 0.0);

    // A long text (several 512-token windows) keeps every occurrence.
    let long = "Contact Anna Schmidt at anna.schmidt@example.com. ".repeat(60);
    let (status, body) = post(json!({ "text": long })).await;
    assert_eq!(status, 200);
    let entities = body["entities"].as_array().unwrap();
    let names = entities.iter().filter(|e| e["label"] == "GIVEN_NAME" && e["text"] == "Anna").count();
    assert_eq!(names, 60, "one name per sentence, none lost or doubled at window edges: {body}");
    let spans: Vec<(u64, u64)> =
        entities.iter().map(|e| (e["start"].as_u64().unwrap(), e["end"].as_u64().unwrap())).collect();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "entities are ordered and never overlap");

    let (status, body) = post(json!({ "text": "   " })).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("empty"));
    let (status, _) = post(json!({ "text": "a".repeat(100_001) })).await;
    assert_eq!(status, 413);
    let (status, _) = post(json!({ "text": "x", "model": "nope" })).await;
    assert_eq!(status, 404);
}

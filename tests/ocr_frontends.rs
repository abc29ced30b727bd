//! OCR through the front-ends against the real stack (nats-server, a worker
//! serving PP-OCRv5, the HTTP front-end): `/api/ocr` and `/api/ocr/stream`
//! over HTTP, and the dashboard's OCR tab in headless Chromium.

mod common;

use common::*;
use natter_worker::bench::character_error_rate;
use natter_worker::testkit::render_text_png;
use serde_json::Value;
use std::process::Command;

const OCR_MODEL: &str = "ppocr-v5";
const LINES: [&str; 3] = ["Invoice 2024-117", "Total due: 58.90 EUR", "Thank you for your order"];

/// A PNG's width and height, from its IHDR chunk.
fn png_size(png: &[u8]) -> (u64, u64) {
    let be = |at: usize| u64::from(u32::from_be_bytes(png[at..at + 4].try_into().unwrap()));
    (be(16), be(20))
}

/// A multipart/form-data body of `(field, file name, bytes)` parts (a part
/// without a file name is a text field), and its content type.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    const BOUNDARY: &str = "natter-ocr-test-boundary";
    let mut body = Vec::new();
    for (field, file_name, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"").as_bytes());
        if let Some(name) = file_name {
            body.extend_from_slice(format!("; filename=\"{name}\"\r\nContent-Type: image/png").as_bytes());
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

async fn post_form(stack: &Stack, path: &str, parts: &[(&str, Option<&str>, &[u8])]) -> (u16, String) {
    let (content_type, body) = multipart(parts);
    let response = stack
        .http
        .post(format!("{}{path}", stack.url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `(event, data)` pairs of a Server-Sent Events body.
fn sse(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|frame| {
            let field =
                |name: &str| frame.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_string());
            Some((field("event:")?, json(&field("data:")?)))
        })
        .collect()
}

/// Checks a reading of the rendered [`LINES`]: the text, one line each in
/// order with boxes inside the image, the image's size and the timings.
fn check_reading(v: &Value, png: &[u8]) {
    assert_eq!(v["model"], OCR_MODEL, "{v}");
    let text = v["text"].as_str().unwrap();
    let cer = character_error_rate(&LINES.join("\n"), text);
    assert!(cer <= 0.03, "CER {cer:.3}: {text:?}");
    let (width, height) = png_size(png);
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(width), Some(height)), "{v}");
    let lines = v["lines"].as_array().unwrap();
    assert_eq!(lines.len(), LINES.len(), "{v}");
    let mut previous_top = -1.0;
    for (i, (line, expected)) in lines.iter().zip(LINES).enumerate() {
        assert_eq!(line["id"], i);
        let read = line["text"].as_str().unwrap();
        assert!(character_error_rate(expected, read) <= 0.1, "line {i}: {read:?}, expected {expected:?}");
        let confidence = line["confidence"].as_f64().unwrap();
        assert!(confidence > 0.5 && confidence <= 1.0, "{line}");
        let corners: Vec<(f64, f64)> =
            line["bbox"].as_array().unwrap().iter().map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap())).collect();
        assert_eq!(corners.len(), 4);
        for (x, y) in &corners {
            assert!((0.0..=width as f64).contains(x) && (0.0..=height as f64).contains(y), "{line}");
        }
        let top = corners.iter().map(|c| c.1).fold(f64::MAX, f64::min);
        assert!(top > previous_top, "lines come top to bottom: {v}");
        previous_top = top;
    }
    let t = &v["timings"];
    for stage in ["decode_ms", "detect_ms", "classify_ms", "recognize_ms"] {
        assert!(t[stage].as_f64().is_some_and(|ms| ms >= 0.0), "{stage}: {t}");
    }
    assert!(t["detect_ms"].as_f64().unwrap() > 0.0 && t["recognize_ms"].as_f64().unwrap() > 0.0, "{t}");
    assert!(v["metrics"]["wall_ms"].as_f64().unwrap() > 0.0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_reads_an_image_and_streams_its_lines() {
    let stack = Stack::start(&[OCR_MODEL]).await;
    let png = render_text_png(&LINES, 32.0);

    let (status, body) = post_form(&stack, "/api/ocr", &[("image", Some("scan.png"), &png)]).await;
    assert_eq!(status, 200, "{body}");
    let whole = json(&body);
    check_reading(&whole, &png);

    // `file` as the field and `default` as the model work as well.
    let parts: [(&str, Option<&str>, &[u8]); 2] = [("model", None, b"default"), ("file", Some("scan.png"), &png)];
    let (status, body) = post_form(&stack, "/api/ocr", &parts).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["text"], whole["text"], "the same image reads the same");

    let (status, body) = post_form(&stack, "/api/ocr/stream", &[("image", Some("scan.png"), &png)]).await;
    assert_eq!(status, 200, "{body}");
    let events = sse(&body);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["line", "line", "line", "done"], "every line is streamed before the result: {body}");
    let done = &events[3].1;
    check_reading(done, &png);
    for (i, (_, line)) in events[..3].iter().enumerate() {
        assert_eq!(line, &done["lines"][i], "a streamed line is the result's line");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_reports_bad_images_and_unknown_models() {
    let stack = Stack::start(&[OCR_MODEL]).await;
    let png = render_text_png(&LINES, 32.0);
    let truncated = &png[..png.len() / 2];
    let not_an_image = b"%PDF-1.7 this is a document, not a picture".as_slice();
    for path in ["/api/ocr", "/api/ocr/stream"] {
        for (name, data) in [("truncated.png", truncated), ("notes.png", not_an_image)] {
            let (status, body) = post_form(&stack, path, &[("image", Some(name), data)]).await;
            assert_eq!(status, 400, "{path} {name}: {body}");
            let v = json(&body);
            assert_eq!(v["error"]["code"], "bad_input", "{v}");
            assert!(v["error"]["message"].as_str().unwrap().to_lowercase().contains("image"), "{v}");
        }
        let (status, body) = post_form(&stack, path, &[("image", Some("empty.png"), b"")]).await;
        assert_eq!(status, 400, "{path}: {body}");

        let parts: [(&str, Option<&str>, &[u8]); 2] = [("image", Some("a.png"), &png), ("model", None, b"ppocr-v9")];
        let (status, body) = post_form(&stack, path, &parts).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(json(&body)["error"]["code"], "model_not_found");

        // In the catalog, but no worker serves it here.
        let parts: [(&str, Option<&str>, &[u8]); 2] = [("image", Some("a.png"), &png), ("model", None, b"ppocr-v4")];
        let (status, body) = post_form(&stack, path, &parts).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(json(&body)["error"]["code"], "no_worker");
    }
    // The worker kept serving through the bad images.
    let (status, body) = post_form(&stack, "/api/ocr", &[("image", Some("scan.png"), &png)]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_reads_an_image_draws_its_boxes_and_copies_the_text() {
    let script_dir = repo_root().join("tests/dashboard");
    assert!(
        script_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed; run scripts/install-deps.sh --test"
    );
    let stack = Stack::start(&[OCR_MODEL]).await;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("invoice.png");
    std::fs::write(&image, render_text_png(&LINES, 32.0)).unwrap();
    let mut node = Command::new("node");
    node.arg("ocr.mjs").arg(&stack.url).arg(&image).args(LINES).current_dir(&script_dir);
    run_checker(node).await;
}

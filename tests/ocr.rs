//! OCR end to end with the real PP-OCR models: rendered images with known
//! text read back (character error rate, reading order, paragraphs, columns,
//! a line upside down, a noisy photo), and jobs through NATS: lines streamed
//! in order, a large photo through the object store with its boxes mapped
//! back, EXIF orientation, and bad images failing cleanly.

mod common;

use common::*;
use futures::StreamExt;
use image::{ImageFormat, Rgb, RgbImage};
use natter_shared::proto::{Blob, ErrorCode, EventBody, Job, JobInput, JobResult, OcrInput, OcrLine, Origin};
use natter_worker::ocr::image::DEFAULT_MAX_PIXELS;
use natter_worker::ocr::{OcrEngine, Variant};
use natter_worker::testkit::text_images::{character_error_rate, draw_text, encode, ocr_samples, photograph, Face};

const OCR_MODEL: &str = "ppocr-v5";

fn engine(id: &str, variant: Variant) -> OcrEngine {
    let dir = models_dir().join(id);
    assert!(dir.join("rec.onnx").is_file(), "run `natter-worker models fetch {id}` (scripts/test.sh does)");
    OcrEngine::load(&dir, variant, DEFAULT_MAX_PIXELS).unwrap()
}

/// Reads every sample, checks the CER bounds, returns (name, text).
/// `without_spaces` judges the characters alone.
fn read_samples(engine: &OcrEngine, label: &str, without_spaces: bool) -> Vec<(&'static str, String)> {
    let mut texts = Vec::new();
    for sample in ocr_samples() {
        let mut streamed = Vec::new();
        let reading = engine.read(&sample.image, |line| streamed.push(line.clone()), || false).unwrap();
        let cer = if without_spaces {
            let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
            character_error_rate(&squeeze(&sample.text), &squeeze(&reading.text))
        } else {
            character_error_rate(&sample.text, &reading.text)
        };
        eprintln!("{label} {}: CER {:.2}% {:?}", sample.name, cer * 100.0, reading.text);
        let bound = if sample.noisy { 0.10 } else { 0.02 };
        assert!(cer <= bound, "{label} {}: CER {cer:.3} for {:?}", sample.name, reading.text);
        assert_eq!(streamed, reading.lines, "lines are streamed as they appear in the result");
        for line in &reading.lines {
            assert!(line.confidence > 0.5 && line.confidence <= 1.0, "{line:?}");
            for [x, y] in line.bbox {
                assert!((0.0..=reading.width as f32).contains(&x) && (0.0..=reading.height as f32).contains(&y));
            }
        }
        texts.push((sample.name, reading.text));
    }
    texts
}

#[test]
fn ppocr_v5_reads_rendered_text_in_reading_order() {
    let texts = read_samples(&engine(OCR_MODEL, Variant::V5), "v5", false);
    let text = |name: &str| texts.iter().find(|(n, _)| *n == name).map(|(_, t)| t.as_str()).unwrap();
    // A blank line between paragraphs, none inside them.
    let paragraphs = text("paragraphs");
    assert_eq!(paragraphs.matches("\n\n").count(), 1, "{paragraphs:?}");
    assert!(paragraphs.split("\n\n").nth(1).unwrap().starts_with("Please review"), "{paragraphs:?}");
    // The left column is read whole before the right one.
    let columns = text("two-columns");
    assert!(columns.find("coast by evening").unwrap() < columns.find("Markets opened").unwrap(), "{columns:?}");
    // Item and price on one line.
    assert!(text("receipt").lines().any(|l| l.replace(' ', "") == "Coffee3.50"), "{:?}", text("receipt"));
    assert!(text("upside-down").contains("This side up when stored"), "{:?}", text("upside-down"));
}

/// PP-OCRv4's recognizer is the Chinese one, which drops most spaces between
/// Latin words (RapidOCR gives the same text), so its characters are judged.
#[test]
fn ppocr_v4_reads_with_the_charset_from_its_onnx_metadata() {
    read_samples(&engine("ppocr-v4", Variant::V4), "v4", true);
}

fn ocr_job(image: Blob) -> Job {
    let origin = Origin { frontend: "test".into(), user: "u".into(), conversation: None };
    Job::new(OCR_MODEL, origin, JobInput::Ocr(OcrInput { image }))
}

/// Runs one job: the lines streamed before the end, and the outcome.
async fn read_through_nats(
    client: &natter_bots::client::JobClient,
    data: Vec<u8>,
    content_type: &str,
) -> (Vec<OcrLine>, Result<JobResult, (ErrorCode, String)>) {
    // The job client refuses to store an empty blob; a front-end that skips
    // it must still get a clear answer from the worker.
    let blob = if data.is_empty() {
        Blob::Inline { content_type: content_type.into(), data }
    } else {
        client.put_blob(data, content_type).await.unwrap()
    };
    let job = ocr_job(blob);
    let mut events = Box::pin(client.events(job.id).await.unwrap());
    client.submit(&job).await.unwrap();
    let mut lines = Vec::new();
    while let Some(event) = events.next().await {
        match event.unwrap().body {
            EventBody::Line { line } => lines.push(line),
            EventBody::Done { result, .. } => return (lines, Ok(result)),
            EventBody::Failed { code, message } => return (lines, Err((code, message))),
            _ => {}
        }
    }
    panic!("the event stream ended without an outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_photo_travels_through_the_object_store_and_its_boxes_map_back() {
    let stack = Stack::start(&[OCR_MODEL]).await;
    let client = stack.job_client().await;
    // A 3000x2000 page with two lines at known places, photographed (noise
    // keeps the JPEG far above the inline limit).
    let mut page = RgbImage::from_pixel(3000, 2000, Rgb([250, 250, 250]));
    draw_text(&mut page, Face::Sans, 90.0, 400.0, 700.0, "Platform 9 departs 14:45");
    draw_text(&mut page, Face::Sans, 90.0, 400.0, 1300.0, "Mind the gap, please");
    let data = encode(&photograph(&page, 0.0, 3), ImageFormat::Jpeg);
    assert!(data.len() > 256 * 1024, "{} bytes would travel inline", data.len());
    let (streamed, outcome) = read_through_nats(&client, data, "image/jpeg").await;
    let JobResult::Ocr { text, lines, width, height, timings } = outcome.unwrap() else { panic!("not OCR") };
    assert_eq!((width, height), (3000, 2000));
    assert!(character_error_rate("Platform 9 departs 14:45\n\nMind the gap, please", &text) <= 0.05, "{text:?}");
    assert_eq!(streamed, lines);
    assert!(timings.detect_ms > 0.0 && timings.recognize_ms > 0.0, "{timings:?}");
    // The first line's baseline is at y=700 from x=400: its box, in the
    // original pixels, must surround that.
    let first = &lines[0].bbox;
    let (x0, x1) =
        (first.iter().map(|p| p[0]).fold(f32::MAX, f32::min), first.iter().map(|p| p[0]).fold(0.0, f32::max));
    let (y0, y1) =
        (first.iter().map(|p| p[1]).fold(f32::MAX, f32::min), first.iter().map(|p| p[1]).fold(0.0, f32::max));
    assert!(x0 < 420.0 && x0 > 330.0 && x1 > 1300.0 && y0 < 640.0 && y1 > 700.0 && y1 < 760.0, "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exif_orientation_is_applied_and_bad_images_fail_cleanly() {
    let stack = Stack::start(&[OCR_MODEL]).await;
    let client = stack.job_client().await;

    // A phone photo stored sideways, with EXIF saying "turn 90° clockwise".
    let mut upright = RgbImage::from_pixel(640, 160, Rgb([255, 255, 255]));
    draw_text(&mut upright, Face::Sans, 40.0, 30.0, 95.0, "Sideways photo 42");
    let stored = image::imageops::rotate270(&upright);
    let jpeg = encode(&stored, ImageFormat::Jpeg);
    let exif: &[u8] = &[
        b'E', b'x', b'i', b'f', 0, 0, b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0,
        0, 0, 0,
    ];
    let mut with_exif = jpeg[..2].to_vec();
    with_exif.extend_from_slice(&[0xFF, 0xE1]);
    with_exif.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    with_exif.extend_from_slice(exif);
    with_exif.extend_from_slice(&jpeg[2..]);
    let (_, outcome) = read_through_nats(&client, with_exif, "image/jpeg").await;
    let JobResult::Ocr { text, width, height, .. } = outcome.unwrap() else { panic!("not OCR") };
    assert_eq!((width, height), (640, 160));
    assert_eq!(text, "Sideways photo 42");

    let png = natter_worker::testkit::render_text_png(&["hello"], 30.0);
    let mut truncated = png.clone();
    truncated.truncate(png.len() / 2);
    let bomb = natter_worker::testkit::text_images::png_bomb(60_000, 60_000);
    let bad: [(Vec<u8>, ErrorCode, &str); 4] = [
        (Vec::new(), ErrorCode::BadInput, "empty"),
        (b"%PDF-1.4 not an image at all".to_vec(), ErrorCode::BadInput, "not an image"),
        (truncated, ErrorCode::BadInput, "cannot be decoded"),
        (bomb, ErrorCode::TooLarge, "megapixels"),
    ];
    for (data, code, words) in bad {
        let (lines, outcome) = read_through_nats(&client, data, "image/png").await;
        let (got, message) = outcome.expect_err("a bad image fails");
        assert_eq!(got, code, "{message}");
        assert!(message.contains(words), "{message:?} should say {words:?}");
        assert!(lines.is_empty());
    }
    // The worker is still serving.
    let (_, outcome) = read_through_nats(&client, png, "image/png").await;
    let JobResult::Ocr { text, .. } = outcome.unwrap() else { panic!("not OCR") };
    assert_eq!(text, "hello");
}

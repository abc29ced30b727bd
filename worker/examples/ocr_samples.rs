//! Writes the OCR test images and their expected text into a directory, for
//! `natter-worker bench-ocr` and the reference engines in scripts/bench-ocr.sh.
//!
//! cargo run --release -p natter-worker --features testkit --example ocr_samples -- DIR

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "ocr-samples".into()));
    std::fs::create_dir_all(&dir)?;
    for sample in natter_worker::testkit::text_images::ocr_samples() {
        let ext = if sample.content_type == "image/jpeg" { "jpg" } else { "png" };
        std::fs::write(dir.join(format!("{}.{ext}", sample.name)), &sample.image)?;
        std::fs::write(dir.join(format!("{}.txt", sample.name)), &sample.text)?;
    }
    println!("{}", dir.display());
    Ok(())
}

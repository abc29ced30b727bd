//! Text images with known content, rendered with Debian's fonts, for the OCR
//! tests and the OCR benchmark: several fonts and sizes, a paragraph, two
//! columns, a line upside down, a receipt, and a noisy, slightly turned
//! "photo" of a page.

use ab_glyph::{Font, FontVec, PxScale, ScaleFont};
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use std::io::Cursor;

pub use crate::bench::character_error_rate;

/// Fonts from `fonts-dejavu-core` and `fonts-liberation`.
#[derive(Clone, Copy, Debug)]
pub enum Face {
    Sans,
    SansBold,
    Serif,
    Mono,
    Liberation,
    LiberationSerif,
}

impl Face {
    fn path(self) -> &'static str {
        match self {
            Face::Sans => "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            Face::SansBold => "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
            Face::Serif => "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
            Face::Mono => "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
            Face::Liberation => "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            Face::LiberationSerif => "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf",
        }
    }

    fn load(self) -> FontVec {
        let data = std::fs::read(self.path()).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (install fonts-dejavu-core and fonts-liberation: scripts/install-deps.sh --test)",
                self.path()
            )
        });
        FontVec::try_from_vec(data).expect("a TrueType font")
    }
}

/// Draws `text` with its baseline at `y`, starting at `x`; returns the pen's
/// end position.
pub fn draw_text(image: &mut RgbImage, face: Face, px: f32, x: f32, y: f32, text: &str) -> f32 {
    let font = face.load();
    let scaled = font.as_scaled(PxScale::from(px));
    let mut pen = x;
    let mut previous = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(prev) = previous {
            pen += scaled.kern(prev, id);
        }
        let glyph = id.with_scale_and_position(px, ab_glyph::point(pen, y));
        pen += scaled.h_advance(id);
        previous = Some(id);
        let Some(outline) = font.outline_glyph(glyph) else { continue };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let (ix, iy) = (bounds.min.x as i64 + i64::from(gx), bounds.min.y as i64 + i64::from(gy));
            if ix < 0 || iy < 0 || ix >= i64::from(image.width()) || iy >= i64::from(image.height()) {
                return;
            }
            let p = image.get_pixel_mut(ix as u32, iy as u32);
            for c in 0..3 {
                p[c] = (f32::from(p[c]) * (1.0 - coverage.min(1.0))).round() as u8;
            }
        });
    }
    pen
}

/// Dark text on white, one line per entry, DejaVu Sans.
pub fn render_text_png(lines: &[&str], font_px: f32) -> Vec<u8> {
    let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(1) as f32 * font_px * 0.62 + 2.0 * font_px;
    let height = (lines.len() as f32 + 1.0) * font_px * 1.5;
    let mut image = RgbImage::from_pixel(width as u32, height as u32, Rgb([255, 255, 255]));
    for (k, line) in lines.iter().enumerate() {
        draw_text(&mut image, Face::Sans, font_px, font_px, font_px * (1.5 * k as f32 + 1.6), line);
    }
    encode(&image, ImageFormat::Png)
}

pub fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    match format {
        ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 70).encode_image(image).expect("encodes")
        }
        format => image.write_to(&mut out, format).expect("encodes"),
    }
    out.into_inner()
}

/// A rendered image and the text it holds, in reading order.
pub struct OcrSample {
    pub name: &'static str,
    pub image: Vec<u8>,
    pub content_type: &'static str,
    pub text: String,
    /// Photographed-looking (noise, blur, a turn): judged by a looser bound.
    pub noisy: bool,
}

const PARAGRAPH_1: [&str; 3] = [
    "The quarterly report shows that revenue grew by",
    "12.5% compared with last year, while costs stayed",
    "flat. Most of the growth came from new customers.",
];
const PARAGRAPH_2: [&str; 2] =
    ["Please review the attached figures before Friday", "and send your comments to finance@example.com."];

pub fn ocr_samples() -> Vec<OcrSample> {
    let mut samples = Vec::new();

    // Several fonts and sizes.
    let styles = [
        (Face::Sans, 30.0, "Invoice 2024-117: Total $58.90"),
        (Face::Serif, 26.0, "Meeting moved to Thursday at 3:30 pm"),
        (Face::Mono, 22.0, "ORDER #A-4471 shipped via DHL"),
        (Face::Liberation, 34.0, "Welcome to Springfield"),
        (Face::SansBold, 20.0, "Keep this receipt for your records."),
        (Face::LiberationSerif, 18.0, "Call us on +44 20 7946 0958 any time."),
    ];
    let mut image = RgbImage::from_pixel(760, 400, Rgb([255, 255, 255]));
    let mut y = 20.0;
    for (face, px, text) in styles {
        y += px * 1.6;
        draw_text(&mut image, face, px, 30.0, y, text);
    }
    let text = styles.iter().map(|s| s.2).collect::<Vec<_>>().join("\n");
    samples.push(OcrSample {
        name: "fonts",
        image: encode(&image, ImageFormat::Png),
        content_type: "image/png",
        text,
        noisy: false,
    });

    // A paragraph, a blank line, and another.
    let mut image = RgbImage::from_pixel(720, 300, Rgb([255, 255, 255]));
    let mut y = 50.0;
    for line in PARAGRAPH_1 {
        draw_text(&mut image, Face::Serif, 22.0, 30.0, y, line);
        y += 32.0;
    }
    y += 32.0;
    for line in PARAGRAPH_2 {
        draw_text(&mut image, Face::Serif, 22.0, 30.0, y, line);
        y += 32.0;
    }
    let text = format!("{}\n\n{}", PARAGRAPH_1.join("\n"), PARAGRAPH_2.join("\n"));
    samples.push(OcrSample {
        name: "paragraphs",
        image: encode(&image, ImageFormat::Png),
        content_type: "image/png",
        text,
        noisy: false,
    });

    // A title over two columns.
    let left = ["Rain is expected across", "the north on Monday,", "with strong winds near", "the coast by evening."];
    let right = ["Markets opened higher", "after the central bank", "kept interest rates", "unchanged at 4.25%."];
    let mut image = RgbImage::from_pixel(820, 330, Rgb([255, 255, 255]));
    draw_text(&mut image, Face::SansBold, 30.0, 30.0, 55.0, "Morning News Digest");
    for (k, (l, r)) in left.iter().zip(right).enumerate() {
        let y = 130.0 + 36.0 * k as f32;
        draw_text(&mut image, Face::Sans, 22.0, 30.0, y, l);
        draw_text(&mut image, Face::Sans, 22.0, 440.0, y, r);
    }
    let text = format!("Morning News Digest\n\n{}\n\n{}", left.join("\n"), right.join("\n"));
    samples.push(OcrSample {
        name: "two-columns",
        image: encode(&image, ImageFormat::Png),
        content_type: "image/png",
        text,
        noisy: false,
    });

    // One line upside down between two upright ones.
    let lines = ["Fragile: handle with care", "This side up when stored", "Return address on the back"];
    let mut image = RgbImage::from_pixel(640, 220, Rgb([255, 255, 255]));
    draw_text(&mut image, Face::Sans, 28.0, 30.0, 50.0, lines[0]);
    let mut flipped = RgbImage::from_pixel(600, 50, Rgb([255, 255, 255]));
    draw_text(&mut flipped, Face::Sans, 28.0, 10.0, 36.0, lines[1]);
    image::imageops::rotate180_in_place(&mut flipped);
    image::imageops::replace(&mut image, &flipped, 20, 80);
    draw_text(&mut image, Face::Sans, 28.0, 30.0, 180.0, lines[2]);
    samples.push(OcrSample {
        name: "upside-down",
        image: encode(&image, ImageFormat::Png),
        content_type: "image/png",
        text: lines.join("\n"),
        noisy: false,
    });

    // A receipt: item names and prices in one row each.
    let items = [("Coffee", "3.50"), ("Blueberry muffin", "2.75"), ("Orange juice", "4.10"), ("TOTAL", "10.35")];
    let mut image = RgbImage::from_pixel(520, 260, Rgb([255, 255, 255]));
    for (k, (item, price)) in items.iter().enumerate() {
        let y = 50.0 + 44.0 * k as f32;
        draw_text(&mut image, Face::Mono, 24.0, 30.0, y, item);
        draw_text(&mut image, Face::Mono, 24.0, 400.0, y, price);
    }
    let text = items.iter().map(|(i, p)| format!("{i} {p}")).collect::<Vec<_>>().join("\n");
    samples.push(OcrSample {
        name: "receipt",
        image: encode(&image, ImageFormat::Png),
        content_type: "image/png",
        text,
        noisy: false,
    });

    // A page photographed: turned 2 degrees, unevenly lit, noisy, soft, JPEG.
    let page_lines = [
        "Dear customer,",
        "your parcel 7731-XK will be delivered",
        "on Wednesday between 9:00 and 13:00.",
        "If nobody is at home, we will leave it",
        "with a neighbour or at the post office.",
    ];
    let mut page = RgbImage::from_pixel(760, 330, Rgb([250, 248, 240]));
    for (k, line) in page_lines.iter().enumerate() {
        draw_text(&mut page, Face::Liberation, 28.0, 40.0, 60.0 + 52.0 * k as f32, line);
    }
    samples.push(OcrSample {
        name: "noisy-photo",
        image: encode(&photograph(&page, 2.0_f32.to_radians(), 7), ImageFormat::Jpeg),
        content_type: "image/jpeg",
        text: page_lines.join("\n"),
        noisy: true,
    });
    samples
}

/// Makes a clean render look photographed: turned by `angle`, lit from one
/// side, grainy and slightly out of focus.
pub fn photograph(page: &RgbImage, angle: f32, seed: u64) -> RgbImage {
    let (w, h) = page.dimensions();
    let (sin, cos) = angle.sin_cos();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let turned = RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let (sx, sy) = (cx + dx * cos + dy * sin, cy - dx * sin + dy * cos);
        if sx < 0.0 || sy < 0.0 || sx >= (w - 1) as f32 || sy >= (h - 1) as f32 {
            return Rgb([90, 85, 80]);
        }
        let (x0, y0) = (sx as u32, sy as u32);
        let (fx, fy) = (sx.fract(), sy.fract());
        let mut out = [0u8; 3];
        for (c, o) in out.iter_mut().enumerate() {
            let p = |x: u32, y: u32| f32::from(page.get_pixel(x, y)[c]);
            let top = p(x0, y0) * (1.0 - fx) + p(x0 + 1, y0) * fx;
            let bottom = p(x0, y0 + 1) * (1.0 - fx) + p(x0 + 1, y0 + 1) * fx;
            *o = (top * (1.0 - fy) + bottom * fy) as u8;
        }
        Rgb(out)
    });
    RgbImage::from_fn(w, h, |x, y| {
        let light = 0.72 + 0.28 * (x as f32 / w as f32);
        let mut out = [0u8; 3];
        for (c, o) in out.iter_mut().enumerate() {
            let mut sum = 0.0;
            for (nx, ny) in [
                (x, y),
                (x.saturating_sub(1), y),
                ((x + 1).min(w - 1), y),
                (x, y.saturating_sub(1)),
                (x, (y + 1).min(h - 1)),
            ] {
                sum += f32::from(turned.get_pixel(nx, ny)[c]);
            }
            let noise: f32 = rng.random_range(-18.0..18.0);
            *o = (sum / 5.0 * light + noise).clamp(0.0, 255.0) as u8;
        }
        Rgb(out)
    })
}

/// A valid PNG header that claims `width`x`height` pixels, followed by one
/// pixel's data: a decompression bomb in miniature.
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(&RgbImage::new(1, 1), ImageFormat::Png);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    // The IHDR chunk's CRC covers its type and data.
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

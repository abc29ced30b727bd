//! Turning the bytes people send (phone photos, screenshots, scans) into an
//! upright RGB image.
//!
//! The format is sniffed from the bytes, never trusted from the content type.
//! The pixel count is checked against the limit from the header alone, before
//! any pixel is decoded, so a small file that claims to be a gigapixel image
//! (a decompression bomb) costs nothing. Phone cameras store pixels in sensor
//! order and the rotation in EXIF, so the orientation is applied here: boxes
//! are reported in the image as a person sees it.

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;

/// Largest image accepted by default: 50 megapixels covers every phone camera
/// and an A4 scan at 600 dpi.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty")]
    Empty,
    #[error("this is not an image in a supported format (JPEG, PNG, WebP, GIF, BMP or TIFF)")]
    NotAnImage,
    #[error("the image is {width}x{height} pixels; at most {max} megapixels are accepted", max = max / 1_000_000)]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("the {format} image cannot be decoded: {reason}")]
    Corrupt { format: &'static str, reason: String },
}

/// A decoded image and the format it came in.
#[derive(Debug)]
pub struct Decoded {
    pub image: RgbImage,
    pub format: &'static str,
}

pub fn decode(data: &[u8], max_pixels: u64) -> Result<Decoded, ImageError> {
    if data.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(data)).with_guessed_format().map_err(|_| ImageError::NotAnImage)?;
    let format = reader.format().ok_or(ImageError::NotAnImage)?;
    let name = format_name(format);
    let corrupt = |e: image::ImageError| ImageError::Corrupt { format: name, reason: e.to_string() };
    let mut reader = reader;
    // Decoders allocate from the header's claims; the pixel check below is the
    // real guard, this one catches formats whose frames claim more than that.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(4).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Unsupported(_) => ImageError::NotAnImage,
        e => corrupt(e),
    })?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt { format: name, reason: "it has no pixels".into() });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooManyPixels { width, height, max: max_pixels });
    }
    // A broken EXIF block should not cost the user their text.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(Decoded { image: flatten_alpha(image), format: name })
}

/// Transparent pixels become white: screenshots and stickers with alpha hold
/// dark text on a transparent background, which reads as black on black if the
/// alpha is simply dropped.
fn flatten_alpha(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(px[3]);
        for c in 0..3 {
            out[c] = ((u32::from(px[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    rgb
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb};

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img =
            RgbImage::from_fn(width, height, |x, _| if x < width / 2 { Rgb([0, 0, 0]) } else { Rgb([255, 0, 0]) });
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(img.as_raw(), width, height, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    #[test]
    fn decodes_every_supported_format() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 20, Rgb([10, 200, 30])));
        let formats = [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::Gif,
        ];
        for format in formats {
            let mut bytes = Cursor::new(Vec::new());
            img.write_to(&mut bytes, format).unwrap();
            let decoded = decode(bytes.get_ref(), DEFAULT_MAX_PIXELS).unwrap();
            assert_eq!(decoded.image.dimensions(), (40, 20), "{format:?}");
            assert_eq!(decoded.format, format_name(format));
        }
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(matches!(decode(b"", DEFAULT_MAX_PIXELS), Err(ImageError::Empty)));
        assert!(matches!(decode(b"hello, this is text", DEFAULT_MAX_PIXELS), Err(ImageError::NotAnImage)));
        let mut truncated = png(64, 64);
        truncated.truncate(truncated.len() / 2);
        let err = decode(&truncated, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { format: "PNG", .. }), "{err}");
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        let bomb = crate::testkit::text_images::png_bomb(100_000, 100_000);
        let err = decode(&bomb, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(err, ImageError::TooManyPixels { width: 100_000, height: 100_000, .. }), "{err}");
        assert!(matches!(decode(&png(100, 100), 5_000), Err(ImageError::TooManyPixels { .. })));
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG whose EXIF says "rotate 90° clockwise to display".
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, Rgb([255, 255, 255])));
        let mut jpeg = Cursor::new(Vec::new());
        img.write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
        let jpeg = jpeg.into_inner();
        let exif: &[u8] = &[
            b'E', b'x', b'i', b'f', 0, 0, b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0,
            0, 0, 0, 0, 0,
        ];
        let mut with_exif = jpeg[..2].to_vec();
        with_exif.extend_from_slice(&[0xFF, 0xE1]);
        with_exif.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        with_exif.extend_from_slice(exif);
        with_exif.extend_from_slice(&jpeg[2..]);
        let decoded = decode(&with_exif, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(decoded.image.dimensions(), (2, 4));
    }

    #[test]
    fn transparent_pixels_become_white() {
        let rgba = image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }]));
        let rgb = flatten_alpha(DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(rgb.get_pixel(1, 0), &Rgb([0, 0, 0]));
    }
}

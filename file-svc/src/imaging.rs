//! Checking and shrinking an image. The header is read first and an image with too many
//! pixels is refused before a single pixel is decoded, so a small file that declares a
//! huge image (a decompression bomb) costs nothing; the decoder then runs under
//! `image::Limits` as a second line.
//!
//! Thumbnails are JPEG, or PNG when the image has transparent pixels: product photos are
//! opaque, and as JPEG a thumbnail is several times smaller than as PNG; cut-outs on a
//! transparent background would get a black one as JPEG, so those stay PNG.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{DynamicImage, ImageDecoder as _, ImageError, ImageReader, Limits};

use crate::domain::ImageKind;

/// JPEG quality of thumbnails: no visible artefacts at thumbnail size.
const THUMBNAIL_QUALITY: u8 = 85;

/// Working memory a decoder may take beyond the image itself.
const DECODER_HEADROOM: u64 = 64 * 1024 * 1024;

/// The largest decoded pixel: 16-bit RGBA.
const MAX_BYTES_PER_PIXEL: u64 = 8;

#[derive(Clone, Copy, Debug)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub thumbnail_size: u32,
}

/// An accepted image: its size and its thumbnail.
#[derive(Debug)]
pub struct Processed {
    pub width: u32,
    pub height: u32,
    pub thumbnail: Vec<u8>,
    pub thumbnail_kind: ImageKind,
}

/// Why an image was refused; every case is the client's file, never the server.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the image is {width}×{height} pixels; at most {max} pixels are accepted")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("the image has no pixels")]
    Empty,
    #[error("the image is too large to decode within this service's limits")]
    OverLimits,
    #[error("is not a valid {kind} image ({reason})")]
    Undecodable { kind: &'static str, reason: String },
}

fn refusal(kind: ImageKind, error: ImageError) -> Refusal {
    match error {
        ImageError::Limits(_) => Refusal::OverLimits,
        other => Refusal::Undecodable {
            kind: kind.name(),
            reason: other.to_string(),
        },
    }
}

/// Checks the declared size, decodes under limits and makes the thumbnail. CPU-bound:
/// run it on a blocking thread.
pub fn process(bytes: &[u8], kind: ImageKind, limits: ImageLimits) -> Result<Processed, Refusal> {
    let side = u32::try_from(limits.max_pixels).unwrap_or(u32::MAX);
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(side);
    decode_limits.max_image_height = Some(side);
    decode_limits.max_alloc = Some(
        limits
            .max_pixels
            .saturating_mul(MAX_BYTES_PER_PIXEL)
            .saturating_add(DECODER_HEADROOM),
    );
    let mut reader = ImageReader::with_format(Cursor::new(bytes), kind.format());
    // Given before the decoder exists: the PNG decoder only takes limits at construction.
    reader.limits(decode_limits.clone());
    // Reads the header only.
    let mut decoder = reader.into_decoder().map_err(|e| refusal(kind, e))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(Refusal::Empty);
    }
    if pixels > limits.max_pixels {
        return Err(Refusal::TooManyPixels {
            width,
            height,
            max: limits.max_pixels,
        });
    }
    decode_limits
        .reserve(decoder.total_bytes())
        .map_err(|e| refusal(kind, e))?;
    decoder
        .set_limits(decode_limits)
        .map_err(|e| refusal(kind, e))?;
    // A bad orientation tag is not worth refusing the image for.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| refusal(kind, e))?;
    image.apply_orientation(orientation);
    let (thumbnail, thumbnail_kind) = thumbnail(&image, limits.thumbnail_size)?;
    Ok(Processed {
        width,
        height,
        thumbnail: encode(&thumbnail, thumbnail_kind)?,
        thumbnail_kind,
    })
}

/// The image fitted in a `size`×`size` box, never enlarged; and the format to store it in.
fn thumbnail(image: &DynamicImage, size: u32) -> Result<(DynamicImage, ImageKind), Refusal> {
    let size = size.max(1);
    let small = if image.width() > size || image.height() > size {
        image.thumbnail(size, size)
    } else {
        image.clone()
    };
    let transparent =
        small.color().has_alpha() && small.to_rgba8().pixels().any(|pixel| pixel.0[3] < u8::MAX);
    let kind = if transparent {
        ImageKind::Png
    } else {
        ImageKind::Jpeg
    };
    Ok((small, kind))
}

fn encode(image: &DynamicImage, kind: ImageKind) -> Result<Vec<u8>, Refusal> {
    let mut out = Vec::new();
    let result = match kind {
        ImageKind::Png => {
            DynamicImage::ImageRgba8(image.to_rgba8()).write_with_encoder(PngEncoder::new(&mut out))
        }
        _ => DynamicImage::ImageRgb8(image.to_rgb8())
            .write_with_encoder(JpegEncoder::new_with_quality(&mut out, THUMBNAIL_QUALITY)),
    };
    result.map_err(|e| Refusal::Undecodable {
        kind: kind.name(),
        reason: format!("its thumbnail could not be encoded: {e}"),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

    use super::*;

    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: 1_000_000,
        thumbnail_size: 64,
    };

    fn encoded(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    fn photo(width: u32, height: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        }))
    }

    #[test]
    fn an_opaque_image_gets_a_jpeg_thumbnail_fitted_in_the_box() {
        let bytes = encoded(photo(400, 100), ImageFormat::Png);
        let done = process(&bytes, ImageKind::Png, LIMITS).expect("accepted");
        assert_eq!((done.width, done.height), (400, 100));
        assert_eq!(done.thumbnail_kind, ImageKind::Jpeg);
        let thumb = image::load_from_memory(&done.thumbnail).expect("a real image");
        assert_eq!(
            image::guess_format(&done.thumbnail).ok(),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!((thumb.width(), thumb.height()), (64, 16));
    }

    #[test]
    fn transparency_keeps_the_thumbnail_png_and_small_images_are_not_enlarged() {
        let cutout = DynamicImage::ImageRgba8(RgbaImage::from_fn(20, 30, |x, _| {
            Rgba([200, 10, 10, if x < 10 { 0 } else { 255 }])
        }));
        let bytes = encoded(cutout, ImageFormat::Png);
        let done = process(&bytes, ImageKind::Png, LIMITS).expect("accepted");
        assert_eq!(done.thumbnail_kind, ImageKind::Png);
        let thumb = image::load_from_memory(&done.thumbnail).expect("a real image");
        assert_eq!((thumb.width(), thumb.height()), (20, 30), "not enlarged");
        assert_eq!(
            thumb.to_rgba8().get_pixel(0, 0).0[3],
            0,
            "still transparent"
        );

        let opaque_rgba =
            DynamicImage::ImageRgba8(RgbaImage::from_pixel(8, 8, Rgba([1, 2, 3, 255])));
        let bytes = encoded(opaque_rgba, ImageFormat::Png);
        let done = process(&bytes, ImageKind::Png, LIMITS).expect("accepted");
        assert_eq!(
            done.thumbnail_kind,
            ImageKind::Jpeg,
            "alpha channel, no transparency"
        );
    }

    #[test]
    fn every_accepted_kind_decodes() {
        for (format, kind) in [
            (ImageFormat::Jpeg, ImageKind::Jpeg),
            (ImageFormat::Gif, ImageKind::Gif),
            (ImageFormat::WebP, ImageKind::WebP),
        ] {
            let image = DynamicImage::ImageRgba8(photo(100, 80).to_rgba8());
            let image = if format == ImageFormat::Jpeg {
                DynamicImage::ImageRgb8(image.to_rgb8())
            } else {
                image
            };
            let bytes = encoded(image, format);
            assert_eq!(ImageKind::sniff(&bytes), Some(kind));
            let done = process(&bytes, kind, LIMITS).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!((done.width, done.height), (100, 80), "{kind:?}");
            let thumb = image::load_from_memory(&done.thumbnail).expect("a real image");
            assert_eq!((thumb.width(), thumb.height()), (64, 51), "{kind:?}");
        }
    }

    #[test]
    fn too_many_pixels_are_refused_from_the_header() {
        let bytes = encoded(photo(1001, 1000), ImageFormat::Png);
        assert_eq!(
            process(&bytes, ImageKind::Png, LIMITS).expect_err("refused"),
            Refusal::TooManyPixels {
                width: 1001,
                height: 1000,
                max: 1_000_000
            }
        );
    }

    #[test]
    fn a_truncated_or_mislabelled_file_is_refused_not_a_panic() {
        let bytes = encoded(photo(50, 50), ImageFormat::Png);
        let refused = process(&bytes[..bytes.len() / 2], ImageKind::Png, LIMITS);
        assert!(
            matches!(refused, Err(Refusal::Undecodable { kind: "PNG", .. })),
            "{refused:?}"
        );
        let refused = process(&bytes, ImageKind::Jpeg, LIMITS);
        assert!(
            matches!(refused, Err(Refusal::Undecodable { kind: "JPEG", .. })),
            "{refused:?}"
        );
    }
}
